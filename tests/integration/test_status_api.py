"""`cm-tasks status` checks the block's API against this environment's (issue 16, case 3).

On the old code `status` exited 0 even with `base_url='garbage'` in the block, while
`get_stac_token()` in the same environment refused the token.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from cm_tasks.blocks import CarbonMapperStacToken
from cm_tasks.cli import app
from cm_tasks.testing import CarbonMapperEmulator

BLOCK = "status-api-token"


def _save(base_url: str) -> None:
    now = datetime.now(timezone.utc)
    CarbonMapperStacToken(
        token="opaque-token-for-the-status-test",  # type: ignore[arg-type]
        name="status-test",
        expires_at=now + timedelta(days=10),
        created_at=now - timedelta(days=4),
        base_url=base_url,
    ).save(BLOCK, overwrite=True)


@pytest.mark.parametrize("stored", ["garbage", "https://staging.example.org/api/v1/"])
def test_a_token_for_another_api_is_a_clear_nonzero_state(
    carbon_mapper_env: CarbonMapperEmulator, stored: str
) -> None:
    _save(stored)

    shown = CliRunner().invoke(app, ["status", "--token-block", BLOCK])
    as_json = CliRunner().invoke(app, ["status", "--token-block", BLOCK, "--json"])

    assert shown.exit_code == 5, shown.output
    assert "WRONG API" in shown.output
    assert carbon_mapper_env.base_url in shown.output
    assert "cm-tasks refresh" in shown.output
    assert as_json.exit_code == 5
    record = json.loads(as_json.output)
    assert record["base_url"] == stored
    assert record["expected_base_url"] == carbon_mapper_env.base_url
    assert record["message"].startswith("WRONG API")


def test_the_same_api_in_another_spelling_is_ok(carbon_mapper_env: CarbonMapperEmulator) -> None:
    _save(carbon_mapper_env.base_url.rstrip("/").replace("http://", "HTTP://"))

    result = CliRunner().invoke(app, ["status", "--token-block", BLOCK])

    assert result.exit_code == 0, result.output
    assert "OK" in result.output
