"""The ParameterConflictError advice names the route that works from an installed package."""

from __future__ import annotations

import pytest

from cm_tasks.run_parameters import ParameterConflictError, choose_values
from cm_tasks.settings import DEFAULT_TOKEN_BLOCK, CarbonMapperSettings


def test_the_conflict_advice_names_cm_tasks_deploy_with_the_setting() -> None:
    settings = CarbonMapperSettings(token_block="team-token")

    with pytest.raises(ParameterConflictError) as raised:
        choose_values(settings, {"token_block": DEFAULT_TOKEN_BLOCK}, deployment_run=True)

    message = str(raised.value)
    assert "`CM_TOKEN_BLOCK=team-token cm-tasks deploy`" in message
    assert "prefect.yaml `parameters:`" in message  # the checkout route is still named
    assert "The stored token is unchanged" in message
