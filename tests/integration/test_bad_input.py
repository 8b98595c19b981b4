"""The bad-input matrix: every user mistake gets a clear error or warning, before any API call.

Completes what tests/integration/test_flow.py (lifetime and token_name bounds, bad block
names, missing e-mail block, wrong password, short-lifetime warning) and
tests/unit/test_settings.py (unparsable CM_* values, http:// warning, trailing slash) already
cover: unknown e-mail, every bad Secret block, boundary values, and CM_* mistakes seen through
the flow. A user mistake is a
`CarbonMapperError` with an actionable message and no chained traceback from the package.
"""

from __future__ import annotations

import re
import warnings
from datetime import date, datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import pytest
from prefect.blocks.system import Secret
from prefect.exceptions import ParameterTypeError
from pydantic import SecretStr

from cm_tasks import (
    BadCredentialsError,
    CarbonMapperError,
    CarbonMapperStacToken,
    ConfigurationError,
    CredentialsBlockError,
    load_settings,
    refresh_stac_token,
    resolve_request,
    run_refresh,
)
from cm_tasks.settings import InsecureBaseURLWarning
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.leaks import assert_no_leak, collect_secrets
from tests.support.token_helpers import is_days_after_today, utc_today

EMAIL_BLOCK = "carbon-mapper-email"
PASSWORD_BLOCK = "carbon-mapper-password"
TOKEN_BLOCK = "carbon-mapper-stac-token"


def _assert_user_error(error: BaseException, *words: str) -> None:
    """A package error, saying what and how to fix, with no chained error behind it."""
    assert isinstance(error, CarbonMapperError), type(error)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    for word in words:
        assert word in str(error), str(error)


@pytest.fixture
def stored(carbon_mapper_credentials: CarbonMapperEmulator) -> str:
    """A token already in the block: a user mistake must not touch it."""
    now = datetime.now(timezone.utc)
    token = f"stored-{uuid4().hex}"
    CarbonMapperStacToken(
        token=SecretStr(token),
        name="stored",
        expires_at=now + timedelta(days=9),
        created_at=now,
        base_url=carbon_mapper_credentials.base_url,
    ).save(TOKEN_BLOCK, overwrite=True)
    return token


def test_unknown_email_fails_once_naming_the_blocks(
    carbon_mapper_credentials: CarbonMapperEmulator, stored: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Secret(value="nobody@nowhere.example").save(EMAIL_BLOCK, overwrite=True)

    state = refresh_stac_token(return_state=True)

    error = state.result(raise_on_failure=False)
    assert isinstance(error, BadCredentialsError)
    _assert_user_error(error, EMAIL_BLOCK, PASSWORD_BLOCK, "cm-tasks login")
    assert carbon_mapper_credentials.requests("token/pair") == 1
    assert carbon_mapper_credentials.requests("account/tokens/create-stac") == 0
    assert CarbonMapperStacToken.load(TOKEN_BLOCK).get() == stored
    out, err = capsys.readouterr()
    secrets = collect_secrets(carbon_mapper_credentials, extra={"stored": stored})
    assert_no_leak(secrets, texts={"out": out, "err": err}, exceptions=[error])


@pytest.mark.parametrize(
    ("block", "value", "words"),
    [
        (PASSWORD_BLOCK, None, ["does not exist"]),
        (EMAIL_BLOCK, "", ["is empty"]),
        (EMAIL_BLOCK, "   \n", ["is empty"]),
        # A password of spaces, or text that looks like JSON, is a password: used byte for
        # byte (tests/integration/test_password_values.py).
        (PASSWORD_BLOCK, {"password": "demo-password-123"}, ["holds a JSON dict"]),
        (PASSWORD_BLOCK, ["demo-password-123"], ["holds a JSON list"]),
    ],
    ids=["missing", "empty", "whitespace-email", "json-dict", "json-list"],
)
def test_bad_secret_block_is_named_with_the_fix_before_any_call(
    carbon_mapper_credentials: CarbonMapperEmulator,
    stored: str,
    block: str,
    value: Any,
    words: list[str],
) -> None:
    name = block if value is not None else "carbon-mapper-password-missing"
    if value is not None:
        Secret(value=value).save(block, overwrite=True)

    settings = load_settings()
    request = resolve_request(settings, password_block=name if block == PASSWORD_BLOCK else None)
    with pytest.raises(CredentialsBlockError) as raised:
        run_refresh(request, settings)  # the flow's body, without a flow run's overhead

    _assert_user_error(raised.value, repr(name), "cm-tasks login", *words)
    assert carbon_mapper_credentials.requests() == 0
    assert CarbonMapperStacToken.load(TOKEN_BLOCK).get() == stored
    assert "demo-password-123" not in str(raised.value)


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"token_name": "tab\there"}, ["control characters"]),
        ({"token_name": "new\nline"}, ["control characters"]),
        ({"token_name": "y" * 250}, ["250 characters", "at most 100"]),
        ({"lifetime_days": 10_000}, ["1 to 365"]),
        ({"password_block": "Password Block"}, ["password_block", "lowercase"]),
    ],
)
def test_bad_parameter_is_rejected_before_anything_is_sent(
    carbon_mapper_env: CarbonMapperEmulator, parameters: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        resolve_request(load_settings(), **parameters)

    _assert_user_error(raised.value, *words)
    assert carbon_mapper_env.requests() == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CM_BASE_URL", "carbonmapper-api-v1"),
        ("CM_TIMEOUT", "thirty"),
        ("CM_MAX_ATTEMPTS", "many"),
        ("CM_TOKEN_LIFETIME_DAYS", "14d"),
    ],
)
def test_unusable_setting_fails_the_flow_before_any_call(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv(variable, value)

    state = refresh_stac_token(return_state=True)

    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigurationError)
    _assert_user_error(error, variable, "Fix the environment variable")
    assert value not in str(error)
    assert carbon_mapper_credentials.requests() == 0


def test_plain_http_to_a_remote_host_warns_before_any_call(
    carbon_mapper_env: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Secret blocks are missing, so the run stops before it could reach the network.
    monkeypatch.setenv("CM_BASE_URL", "http://api.carbonmapper.example/api/v1/")

    with pytest.warns(InsecureBaseURLWarning, match="unencrypted"):
        state = refresh_stac_token(email_block="no-such-email-block", return_state=True)

    assert isinstance(state.result(raise_on_failure=False), CredentialsBlockError)
    assert carbon_mapper_env.requests() == 0


def test_base_url_without_trailing_slash_is_normalised_end_to_end(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_BASE_URL", carbon_mapper_credentials.base_url.rstrip("/"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureBaseURLWarning)  # loopback: no warning
        refresh_stac_token(token_name="slash")

    block = CarbonMapperStacToken.load(TOKEN_BLOCK)
    assert block.base_url == carbon_mapper_credentials.base_url
    assert block.get() == carbon_mapper_credentials.issued_stac_tokens[-1]


def test_wrongly_typed_parameter_is_refused_by_prefect_before_the_run(
    carbon_mapper_env: CarbonMapperEmulator,
) -> None:
    with pytest.raises(ParameterTypeError, match="lifetime_days"):
        refresh_stac_token(lifetime_days="two weeks")  # type: ignore[arg-type]

    assert carbon_mapper_env.requests() == 0


def test_expiry_date_is_sent_as_a_date(carbon_mapper_credentials: CarbonMapperEmulator) -> None:
    since = utc_today()
    refresh_stac_token(lifetime_days=30)

    sent = carbon_mapper_credentials.stac_token_requests[-1]["expiration_date"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", sent)
    assert is_days_after_today(date.fromisoformat(sent), 30, since=since)


@pytest.mark.parametrize(
    ("block", "credential", "fix"),
    [
        ("carbon-mapper-password", "ACCOUNT_PASSWORD", "`cm-tasks login`"),
        (
            "team-password",
            "ACCOUNT_PASSWORD",
            "`cm-tasks login --password-block team-password`",
        ),
        ("team-email", "ACCOUNT_EMAIL", "`cm-tasks login --email-block team-email`"),
    ],
)
def test_a_missing_secret_block_names_the_login_that_writes_it(
    block: str, credential: str, fix: str
) -> None:
    # `cm-tasks login` alone writes the default blocks: for another block it was the wrong fix.
    from cm_tasks import tasks
    from cm_tasks.errors import CredentialsBlockError
    from cm_tasks.tasks import read_secret_block

    _delete_block("secret", block)
    with pytest.raises(CredentialsBlockError) as raised:
        read_secret_block(block, getattr(tasks, credential))
    assert fix in str(raised.value)


@pytest.mark.parametrize(
    ("block", "fix"),
    [
        ("carbon-mapper-stac-token", "`prefect deployment run refresh-stac-token/weekly`"),
        ("team-token", "`cm-tasks refresh --token-block team-token`"),
    ],
)
def test_a_missing_token_block_names_the_refresh_that_writes_it(block: str, fix: str) -> None:
    # The weekly run writes the default block: for another block it was the wrong fix.
    from cm_tasks.watchdog import check_token

    _delete_block("carbon-mapper-stac-token", block)
    status = check_token(block, threshold_days=3)
    assert status.message.startswith("MISSING")
    assert fix in status.message


def _delete_block(slug: str, name: str) -> None:
    """Remove a block another test of this process may have saved (the harness is shared)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name=name, block_type_slug=slug)
        except ObjectNotFound:
            return
        client.delete_block_document(document.id)
