"""The refresh flow against the emulator over real HTTP and a real Prefect API."""

from __future__ import annotations

import contextlib
import logging
import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.exceptions import ObjectNotFound
from prefect.settings import temporary_settings
from prefect.states import State

from cm_tasks import (
    BadCredentialsError,
    CarbonMapperStacToken,
    ConfigurationError,
    CredentialsBlockError,
    _compat,
    refresh_stac_token,
)
from cm_tasks._jwt import decode_claims
from cm_tasks._lease_limit import lease_name
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support.token_helpers import (
    EMAIL_BLOCK,
    PASSWORD_BLOCK,
    TOKEN_BLOCK,
    is_days_after_today,
    utc_today,
)


def _delete_block(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_block_document(
            client.read_block_document_by_name(name, "carbon-mapper-stac-token").id
        )


@pytest.fixture
def no_token_block() -> None:
    _delete_block(TOKEN_BLOCK)


def _run_logs(state: State[Any]) -> str:
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]})  # type: ignore[arg-type]
        )
    parts = [log.message for log in logs]
    parts.append(repr(flow_run.parameters))
    parts.append(str(flow_run.state.message if flow_run.state else ""))
    parts.extend(str(run.state.message if run.state else "") for run in task_runs)
    return "\n".join(parts)


def _assert_no_secrets(text: str, emulator: CarbonMapperEmulator) -> None:
    assert emulator.password not in text
    for token in emulator.issued_access_tokens + emulator.issued_stac_tokens:
        assert token not in text


def test_refresh_saves_the_issued_token(
    carbon_mapper_credentials: CarbonMapperEmulator,
    no_token_block: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    since = utc_today()
    state = refresh_stac_token(token_name="nightly-ingest", return_state=True)

    summary = state.result()
    assert state.is_completed()
    block = CarbonMapperStacToken.load(TOKEN_BLOCK)
    assert block.get() == carbon_mapper_credentials.issued_stac_tokens[-1]
    assert block.name == "nightly-ingest"
    assert block.base_url == carbon_mapper_credentials.base_url
    assert block.scopes == ["stac", "catalog:read"]
    exp = decode_claims(block.get())["exp"]  # type: ignore[index]
    assert block.expires_at == datetime.fromtimestamp(exp, timezone.utc)
    assert is_days_after_today(block.expires_at.date(), 14, since=since)
    assert summary == {
        "token_block": TOKEN_BLOCK,
        "token_name": "nightly-ingest",
        "expires_at": block.expires_at.isoformat().replace("+00:00", "Z"),
        "scopes": ["stac", "catalog:read"],
    }
    assert carbon_mapper_credentials.requests("token/pair") == 1
    assert carbon_mapper_credentials.requests("account/tokens/create-stac") == 1
    assert carbon_mapper_credentials.stac_token_requests[-1]["name"] == "nightly-ingest"
    captured = capsys.readouterr()
    _assert_no_secrets(captured.out + captured.err + _run_logs(state), carbon_mapper_credentials)


def test_second_run_rotates_the_token(carbon_mapper_credentials: CarbonMapperEmulator) -> None:
    refresh_stac_token()
    first = CarbonMapperStacToken.load(TOKEN_BLOCK).get()
    since = utc_today()
    refresh_stac_token(lifetime_days=30)
    second = CarbonMapperStacToken.load(TOKEN_BLOCK)

    assert second.get() != first
    assert second.get() == carbon_mapper_credentials.issued_stac_tokens[-1]
    assert is_days_after_today(second.expires_at.date(), 30, since=since)


def _delete_lease_limit() -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(lease_name(TOKEN_BLOCK))


def _lease_limit() -> int | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(lease_name(TOKEN_BLOCK)).limit
        except ObjectNotFound:
            return None


def test_the_first_save_of_a_block_makes_its_renewal_limit_and_later_saves_do_not(
    carbon_mapper_credentials: CarbonMapperEmulator, no_token_block: None
) -> None:
    _delete_lease_limit()

    refresh_stac_token()
    # Made once here, so that a fleet waiting on the block's first renewal finds it.
    assert _lease_limit() == 1

    _delete_lease_limit()
    refresh_stac_token()
    assert _lease_limit() is None  # the block existed: no request for the limit


def test_a_renewal_limit_prefect_refuses_to_make_does_not_fail_the_refresh(
    carbon_mapper_credentials: CarbonMapperEmulator,
    no_token_block: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _delete_lease_limit()

    def refuse(*args: object) -> None:
        raise RuntimeError("503 from the Prefect API")

    monkeypatch.setattr(_compat, "create_limit", refuse)
    state = refresh_stac_token(return_state=True)

    assert state.is_completed()
    assert (
        CarbonMapperStacToken.load(TOKEN_BLOCK).get()
        == (carbon_mapper_credentials.issued_stac_tokens[-1])
    )
    assert _lease_limit() is None


def test_making_the_renewal_limit_waits_no_longer_than_a_bounded_prefect_call(
    carbon_mapper_credentials: CarbonMapperEmulator,
    no_token_block: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by a reviewer: a Prefect API that answered 503 to this one POST held the refresh
    # for 64 s (Prefect's 5 retries), for a limit that a renewal makes anyway.
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES

    _delete_lease_limit()
    bounds: list[tuple[float, int]] = []

    def hung(*_args: object) -> None:
        bounds.append((PREFECT_API_REQUEST_TIMEOUT.value(), PREFECT_CLIENT_MAX_RETRIES.value()))
        raise httpx.ReadTimeout("no answer")

    monkeypatch.setattr(SyncPrefectClient, "create_global_concurrency_limit", hung)
    with temporary_settings({PREFECT_API_REQUEST_TIMEOUT: 60, PREFECT_CLIENT_MAX_RETRIES: 5}):
        state = refresh_stac_token(return_state=True)

    assert state.is_completed()
    assert bounds == [(10.0, 2)]


def test_default_token_name_has_utc_date_and_time(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    summary = refresh_stac_token()

    name = summary["token_name"]
    stamp = datetime.strptime(name, "prefect-%Y%m%dT%H%MZ").replace(tzinfo=timezone.utc)
    assert abs(stamp - datetime.now(timezone.utc)) < timedelta(minutes=2)


def test_settings_choose_the_block_names_and_lifetime(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    Secret(value=carbon_mapper_credentials.email).save("other-email", overwrite=True)
    Secret(value=carbon_mapper_credentials.password).save("other-password", overwrite=True)
    monkeypatch.setenv("CM_EMAIL_BLOCK", "other-email")
    monkeypatch.setenv("CM_PASSWORD_BLOCK", "other-password")
    monkeypatch.setenv("CM_TOKEN_BLOCK", "other-token")
    monkeypatch.setenv("CM_TOKEN_LIFETIME_DAYS", "20")

    summary = refresh_stac_token()

    block = CarbonMapperStacToken.load("other-token")
    assert summary["token_block"] == "other-token"
    assert block.get() == carbon_mapper_credentials.issued_stac_tokens[-1]
    assert (
        carbon_mapper_credentials.stac_token_requests[-1]["expiration_date"]
        == (datetime.now(timezone.utc).date() + timedelta(days=20)).isoformat()
    )


def test_an_empty_token_name_means_the_dated_default(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    summary = refresh_stac_token(token_name="")  # what the run form sends for an empty field

    assert re.fullmatch(r"prefect-\d{8}T\d{4}Z", summary["token_name"])


def test_a_parameter_other_than_the_default_beats_the_setting(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CM_TOKEN_BLOCK", "setting-token")

    with caplog.at_level(logging.WARNING):
        summary = refresh_stac_token(token_block="parameter-token")

    assert summary["token_block"] == "parameter-token"
    assert (
        CarbonMapperStacToken.load("parameter-token").get()
        == carbon_mapper_credentials.issued_stac_tokens[-1]
    )
    # Not silent: get_stac_token() in this process reads the other block.
    assert "CM_TOKEN_BLOCK='setting-token' of this process" in caplog.text
    assert "reads block 'setting-token'" in caplog.text


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"lifetime_days": 0}, "lifetime_days is 0"),
        ({"lifetime_days": -3}, "lifetime_days is -3"),
        ({"lifetime_days": 366}, "from 1 to 365"),
        ({"token_name": "   "}, "token_name is blank"),
        ({"token_name": "x" * 101}, "at most 100"),
        ({"token_block": "My Token"}, "token_block"),
        ({"email_block": ""}, "email_block"),
    ],
)
def test_parameters_are_checked_before_any_call(
    carbon_mapper_credentials: CarbonMapperEmulator, parameters: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        refresh_stac_token(**parameters)

    assert carbon_mapper_credentials.requests() == 0


def test_short_lifetime_warns_about_a_gap(
    carbon_mapper_credentials: CarbonMapperEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        refresh_stac_token(lifetime_days=7)

    assert "lapse before the next run" in caplog.text


def test_failure_leaves_the_stored_token_unchanged(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    refresh_stac_token(token_name="keep-me")
    before = CarbonMapperStacToken.load(TOKEN_BLOCK)
    carbon_mapper_credentials.fail("account/tokens/create-stac", Fault.status(503, times=10))

    state = refresh_stac_token(return_state=True)

    assert state.is_failed()
    assert "unavailable" in str(state.message)
    after = CarbonMapperStacToken.load(TOKEN_BLOCK)
    assert after.get() == before.get()
    assert after.model_dump(exclude={"token"}) == before.model_dump(exclude={"token"})


def test_transient_faults_are_retried_to_success(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    carbon_mapper_credentials.fail("token/pair", Fault.status(502), Fault.drop())
    carbon_mapper_credentials.fail("account/tokens/create-stac", Fault.rate_limited(retry_after=0))

    summary = refresh_stac_token()

    assert carbon_mapper_credentials.requests("token/pair") == 3
    assert carbon_mapper_credentials.requests("account/tokens/create-stac") == 2
    assert (
        CarbonMapperStacToken.load(summary["token_block"]).get()
        == (carbon_mapper_credentials.issued_stac_tokens[-1])
    )


def test_wrong_password_fails_once_and_names_the_blocks(
    carbon_mapper_credentials: CarbonMapperEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    refresh_stac_token()
    before = CarbonMapperStacToken.load(TOKEN_BLOCK).get()
    Secret(value="not-the-password-42").save(PASSWORD_BLOCK, overwrite=True)

    state = refresh_stac_token(return_state=True)

    assert state.is_failed()
    with pytest.raises(BadCredentialsError) as raised:
        state.result()
    message = str(raised.value)
    assert EMAIL_BLOCK in message
    assert PASSWORD_BLOCK in message
    assert "cm-tasks login" in message
    assert (
        carbon_mapper_credentials.requests("token/pair") == 2
    )  # one for the first run, one for this
    assert CarbonMapperStacToken.load(TOKEN_BLOCK).get() == before
    captured = capsys.readouterr()
    text = captured.out + captured.err + _run_logs(state) + message
    assert "not-the-password-42" not in text
    _assert_no_secrets(text, carbon_mapper_credentials)


def test_missing_secret_block_is_named_with_the_fix(
    carbon_mapper_env: CarbonMapperEmulator,
) -> None:
    with pytest.raises(CredentialsBlockError, match=r"'no-such-block'.*cm-tasks login"):
        refresh_stac_token(email_block="no-such-block")

    assert carbon_mapper_env.requests() == 0


def test_flow_signature_needs_no_parameter() -> None:
    schema = refresh_stac_token.parameters
    assert schema.required == []
    for name, prop in schema.properties.items():
        assert prop.get("description"), name


def test_expiry_falls_back_to_the_expiration_date() -> None:
    from cm_tasks.client import parse_issued_stac_token

    issued = parse_issued_stac_token(
        {"token_value": "opaque", "expiration_date": "2030-01-15"}, "n", date(2030, 1, 20)
    )
    assert issued.expires_at == datetime(2030, 1, 15, tzinfo=timezone.utc)
