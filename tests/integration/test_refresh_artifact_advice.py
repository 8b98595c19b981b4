"""The refresh artifact recommends what the README recommends: `get_stac_token()`."""

from __future__ import annotations

import pytest

from cm_tasks.flows import refresh_stac_token
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.prefect_api import run_artifacts


@pytest.mark.parametrize(
    ("token_block", "call"),
    [
        ("carbon-mapper-stac-token", "`get_stac_token()`"),
        ("team-token", '`get_stac_token("team-token")`'),
    ],
)
def test_the_artifact_names_get_stac_token(
    carbon_mapper_credentials: CarbonMapperEmulator, token_block: str, call: str
) -> None:
    state = refresh_stac_token(token_block=token_block, return_state=True)

    assert state.is_completed()
    (artifact,) = run_artifacts(state.state_details.flow_run_id)
    text = artifact["data"]
    assert call in text
    assert "from cm_tasks import get_stac_token" in text
    assert "CarbonMapperStacToken.load" not in text
    for secret in [
        *carbon_mapper_credentials.issued_stac_tokens,
        carbon_mapper_credentials.password,
    ]:
        assert secret not in text
