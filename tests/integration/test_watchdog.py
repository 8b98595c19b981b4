"""The expiry watchdog: each token state, the check flow's artifact, event and failure."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate

from cm_tasks import (
    EXPIRING_EVENT,
    ConfigurationError,
    StacTokenExpiringError,
    TokenBlockError,
    TokenState,
    check_stac_token,
    check_token,
)
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.prefect_api import api, run_artifacts
from tests.support.token_helpers import (
    SENTINEL_TOKEN,
    delete_token_block,
    save_token_expiring_in,
)

EVENT_WAIT_SECONDS = 30.0


def events_about(block_name: str, name: str, expect: int = 1) -> list[dict[str, Any]]:
    """Events called name about the block's token; polled, as events are persisted in batches."""
    return events_of(f"carbon-mapper.stac-token.{block_name}", name, expect)


def events_of(resource_id: str, name: str, expect: int = 1) -> list[dict[str, Any]]:
    """Events called name about resource_id, polled until `expect` of them are stored."""
    deadline = time.monotonic() + EVENT_WAIT_SECONDS
    while True:
        page = api(
            "events/filter",
            {"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}},
        )
        if len(page["events"]) >= expect or time.monotonic() > deadline:
            return list(page["events"])
        time.sleep(0.25)


@pytest.mark.parametrize(
    ("left", "state"),
    [
        (timedelta(days=10), TokenState.OK),
        (timedelta(days=3, hours=1), TokenState.OK),
        (timedelta(days=2, hours=23), TokenState.EXPIRING),
        (timedelta(minutes=5), TokenState.EXPIRING),
        (timedelta(minutes=-5), TokenState.EXPIRED),
        (timedelta(days=-30), TokenState.EXPIRED),
    ],
)
def test_check_token_states(left: timedelta, state: TokenState) -> None:
    expires_at = save_token_expiring_in("watched-token", left)

    status = check_token("watched-token", threshold_days=3)

    assert status.state is state
    assert status.ok is (state is TokenState.OK)
    assert status.token_name == "weekly"
    assert status.expires_at == expires_at
    assert status.days_left == pytest.approx(left.total_seconds() / 86400, abs=0.01)
    assert state.value in status.message
    assert SENTINEL_TOKEN not in status.message + status.model_dump_json()


def test_threshold_boundary_counts_as_expiring() -> None:
    expires_at = save_token_expiring_in("boundary-token", timedelta(days=5))

    assert check_token("boundary-token", 2, now=expires_at - timedelta(days=2)).state is (
        TokenState.EXPIRING
    )
    assert check_token("boundary-token", 2, now=expires_at - timedelta(days=2.01)).ok
    assert check_token("boundary-token", 0, now=expires_at).state is TokenState.EXPIRED


def test_missing_block() -> None:
    delete_token_block("never-saved")

    status = check_token("never-saved")

    assert status.state is TokenState.MISSING
    assert status.token_name is None
    assert status.days_left is None
    assert "no CarbonMapperStacToken block named 'never-saved'" in status.message
    assert "refresh-stac-token/weekly" in status.message


def test_exit_codes_are_distinct() -> None:
    codes = {state: state.exit_code for state in TokenState}
    assert codes == {
        TokenState.OK: 0,
        TokenState.EXPIRING: 1,
        TokenState.EXPIRED: 2,
        TokenState.MISSING: 3,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold_days": -1}, "threshold_days is -1; it must be from 0 to 365"),
        ({"threshold_days": 400}, "threshold_days is 400"),
        ({"token_block": "My Token"}, "token_block is 'My Token': a block name may only contain"),
    ],
)
def test_bad_input_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_token(**{"token_block": "carbon-mapper-stac-token", **kwargs})


def test_unreadable_block_does_not_quote_its_values() -> None:
    save_token_expiring_in("broken-token", timedelta(days=10))
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name("broken-token", "carbon-mapper-stac-token")
        client.update_block_document(
            document.id,
            BlockDocumentUpdate(
                data={"token": SENTINEL_TOKEN, "name": "x", "expires_at": "not a date"},
                merge_existing_data=False,
            ),
        )

    with pytest.raises(TokenBlockError, match="not a readable CarbonMapperStacToken") as info:
        check_token("broken-token")

    assert SENTINEL_TOKEN not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or SENTINEL_TOKEN not in str(info.value.__context__)


def test_flow_passes_with_an_artifact_and_no_event(
    carbon_mapper_emulator: CarbonMapperEmulator,
) -> None:
    save_token_expiring_in("fresh-token", timedelta(days=12))

    state = check_stac_token(token_block="fresh-token", return_state=True)

    assert state.is_completed()
    assert state.result()["state"] == "OK"
    artifacts = run_artifacts(state.state_details.flow_run_id)
    assert [a["key"] for a in artifacts] == ["fresh-token-check"]
    assert "| Status | OK |" in artifacts[0]["data"]
    assert "| Days left | 12.0 |" in artifacts[0]["data"]
    # Once the run's own Completed event is stored, an expiring event would be too.
    flow_run = f"prefect.flow-run.{state.state_details.flow_run_id}"
    assert len(events_of(flow_run, "prefect.flow-run.Completed")) == 1
    assert events_about("fresh-token", EXPIRING_EVENT, expect=0) == []
    assert carbon_mapper_emulator.requests() == 0  # the watchdog never calls the API


@pytest.mark.parametrize(
    ("left", "state"),
    [(timedelta(days=1), "EXPIRING"), (timedelta(days=-1), "EXPIRED"), (None, "MISSING")],
)
def test_flow_fails_and_emits_expiring(left: timedelta | None, state: str) -> None:
    block_name = f"{state.lower()}-token"
    delete_token_block(block_name)
    if left is not None:
        save_token_expiring_in(block_name, left, name=f"{state.lower()}-name")

    flow_state = check_stac_token(threshold_days=3, token_block=block_name, return_state=True)

    assert flow_state.is_failed()
    assert flow_state.message is not None
    assert state in flow_state.message
    with pytest.raises(StacTokenExpiringError, match=state):
        flow_state.result()
    events = events_about(block_name, EXPIRING_EVENT)
    assert len(events) == 1
    payload = events[0]["payload"]
    assert payload["state"] == state
    assert payload["token_block"] == block_name
    # At least 3: the daily check also warns when the token will not outlast the next weekly
    # refresh by a day (see tests/unit/test_self_heal_rules.py).
    assert payload["threshold_days"] >= 3
    if left is None:
        assert payload["days_left"] is None
    else:
        assert payload["token_name"] == f"{state.lower()}-name"
        assert payload["days_left"] == pytest.approx(left.total_seconds() / 86400, abs=0.01)
    artifacts = run_artifacts(flow_state.state_details.flow_run_id)
    assert [a["key"] for a in artifacts] == [f"{block_name}-check"]
    assert f"| Status | {state} |" in artifacts[0]["data"]
    assert SENTINEL_TOKEN not in json.dumps(events) + json.dumps(artifacts) + flow_state.message
