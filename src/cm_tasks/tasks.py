"""Prefect tasks: read the credentials, get an access token, create and save a STAC token.

Every task that receives or returns a secret has `persist_result=False`, so no secret is ever
written to result storage, whatever the server's defaults (see docs/security.md).
Retries of the Carbon Mapper calls happen inside the client (transient faults only, honouring
`Retry-After`); the save to Prefect is retried by Prefect on transient API errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any, cast

import httpx
from prefect import Task, task
from prefect.blocks.system import Secret
from prefect.client.schemas.objects import State, TaskRun
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from pydantic import SecretStr

from cm_tasks.blocks import CarbonMapperStacToken
from cm_tasks.client import CarbonMapperClient
from cm_tasks.errors import CredentialsBlockError, TokenBlockError
from cm_tasks.settings import DEFAULT_EMAIL_BLOCK, DEFAULT_PASSWORD_BLOCK, load_settings

SAVE_RETRY_DELAYS = [1.0, 2.0, 4.0]


def _secret(value: SecretStr | str) -> SecretStr:
    return value if isinstance(value, SecretStr) else SecretStr(value)


@contextmanager
def _client_or_default(client: CarbonMapperClient | None) -> Iterator[CarbonMapperClient]:
    if client is not None:
        yield client
        return
    with CarbonMapperClient.from_settings(load_settings()) as own_client:
        yield own_client


@dataclass(frozen=True)
class Credential:
    """One of the account credentials, and the `cm-tasks login` option that writes its block."""

    what: str  # for messages, e.g. "the Carbon Mapper account e-mail"
    login_option: str
    default_block: str
    exact: bool  # used byte for byte as stored (a password); else surrounding spaces go

    def how_to_create(self, block_name: str) -> str:
        """How to (re)write block_name as text: `cm-tasks login` alone writes the default only."""
        login = "cm-tasks login" + (
            "" if block_name == self.default_block else f" {self.login_option} {block_name}"
        )
        return (
            f"Store it with `{login}` (it saves exactly what you type, as text), or in Python: "
            f"`Secret(value=...).save({block_name!r}, overwrite=True)` with a str "
            "(from prefect.blocks.system import Secret)."
        )


ACCOUNT_EMAIL = Credential(
    "the Carbon Mapper account e-mail", "--email-block", DEFAULT_EMAIL_BLOCK, exact=False
)
ACCOUNT_PASSWORD = Credential(
    "the Carbon Mapper account password", "--password-block", DEFAULT_PASSWORD_BLOCK, exact=True
)


def read_secret_block(block_name: str, credential: Credential) -> SecretStr:
    """The text held by a Prefect `Secret` block, kept secret and used exactly as stored.

    A password is used byte for byte: surrounding spaces and text that looks like JSON
    (`[20240611]`, `{"a":1}`) are part of it. Prefect keeps a string saved with
    `Secret(value="...")` (as `cm-tasks login` does) a string on every supported version;
    only `Secret.get()` would parse it as JSON, so it is not called here. An e-mail address
    is stripped of surrounding whitespace (an address has none).

    Args:
        block_name: name of the Secret block.
        credential: what it should hold (`ACCOUNT_EMAIL` or `ACCOUNT_PASSWORD`), for the
            error message and its fix.

    Raises:
        CredentialsBlockError: the block is missing, empty, or holds a JSON value (a list,
            an object, a number: saved from the UI's JSON input or `Secret(value=[...])`)
            instead of text; the message names the block and how to store it as text.
    """
    what, how_to_fix = credential.what, credential.how_to_create(block_name)
    try:
        # _sync: a sync read even when called from async code (async_dispatch would await)
        block = cast("Secret[Any]", Secret.load(block_name, _sync=True))  # type: ignore[call-arg]
    except (ValueError, ObjectNotFound):
        raise CredentialsBlockError(
            f"The Secret block {block_name!r} with {what} does not exist. " + how_to_fix
        ) from None
    value = block.value.get_secret_value()
    if not isinstance(value, str):
        raise CredentialsBlockError(
            f"The Secret block {block_name!r} holds a JSON {type(value).__name__}, not text; "
            f"it should hold {what} as text. {how_to_fix}"
        )
    if not credential.exact:
        value = value.strip()
    if not value:
        raise CredentialsBlockError(
            f"The Secret block {block_name!r} is empty; it should hold {what}. " + how_to_fix
        )
    return SecretStr(value)


@task(name="read-credentials", persist_result=False)
def read_credentials(email_block: str, password_block: str) -> tuple[SecretStr, SecretStr]:
    """Read the Carbon Mapper account e-mail and password from two Prefect Secret blocks.

    Args:
        email_block: name of the Secret block holding the account e-mail.
        password_block: name of the Secret block holding the account password.

    Returns:
        The e-mail and the password, as `SecretStr`.

    Raises:
        CredentialsBlockError: a block is missing, empty or holds JSON.

    Example:
        ```python
        from prefect import flow
        from cm_tasks import read_credentials

        @flow
        def check_credentials() -> None:
            email, password = read_credentials("carbon-mapper-email", "carbon-mapper-password")
        ```
    """
    return (
        read_secret_block(email_block, ACCOUNT_EMAIL),
        read_secret_block(password_block, ACCOUNT_PASSWORD),
    )


@task(name="get-access-token", persist_result=False)
def get_access_token(
    email: SecretStr | str,
    password: SecretStr | str,
    client: CarbonMapperClient | None = None,
) -> SecretStr:
    """Exchange the account e-mail and password for a short-lived access token.

    Calls `POST token/pair`. Transient faults are retried; wrong credentials fail at once.

    Args:
        email: the account e-mail.
        password: the account password.
        client: a client to reuse (one connection for several calls); by default one is
            made from the `CM_*` settings and closed afterwards.

    Returns:
        The access token, as `SecretStr`.

    Raises:
        BadCredentialsError: the API rejected the e-mail or password.
        CarbonMapperAPIError: the API failed, after retrying transient faults.

    Example:
        ```python
        from prefect import flow
        from cm_tasks import get_access_token, read_credentials

        @flow
        def login() -> None:
            email, password = read_credentials("carbon-mapper-email", "carbon-mapper-password")
            access = get_access_token(email, password)
        ```
    """
    with _client_or_default(client) as api:
        return api.get_token_pair(_secret(email), _secret(password)).access


@task(name="create-stac-token", persist_result=False)
def create_stac_token(
    access_token: SecretStr | str,
    name: str,
    expiration_date: date | None = None,
    client: CarbonMapperClient | None = None,
    lifetime_days: int | None = None,
) -> CarbonMapperStacToken:
    """Create a scoped STAC token; returns it as an unsaved `CarbonMapperStacToken` block.

    Calls `POST account/tokens/create-stac`. The API shows the token only once: save the
    block (e.g. with `save_stac_token`) or it is lost.

    Args:
        access_token: from `get_access_token`.
        name: the token's name on the platform.
        expiration_date: the day the token lapses (or give lifetime_days).
        client: a client to reuse; by default one is made from the `CM_*` settings.
        lifetime_days: days from the UTC date at which the request is sent (not when the
            task started) to the day the token lapses. Give this or expiration_date.

    Returns:
        The new token with its name, expiry, creation time, scopes and base URL.

    Example:
        ```python
        from prefect import flow
        from cm_tasks import create_stac_token, get_access_token, read_credentials

        @flow
        def new_token() -> None:
            email, password = read_credentials("carbon-mapper-email", "carbon-mapper-password")
            access = get_access_token(email, password)
            token = create_stac_token(access, "ingest", lifetime_days=14)
            token.save("my-stac-token", overwrite=True)
        ```
    """
    with _client_or_default(client) as api:
        issued = api.create_stac_token(
            _secret(access_token), name, expiration_date, lifetime_days=lifetime_days
        )
        return CarbonMapperStacToken.from_issued(issued, api.base_url)


def _is_transient_prefect_error(error: BaseException) -> bool:
    if isinstance(error, httpx.TransportError):
        return True
    if isinstance(error, PrefectHTTPStatusError):
        return error.response.status_code in (408, 429, 500, 502, 503, 504)
    return False


def _retry_transient_save(_task: Task[..., Any], _task_run: TaskRun, state: State[Any]) -> bool:
    error = state.result(raise_on_failure=False)
    return isinstance(error, TokenBlockError) and error.transient


@task(
    name="save-stac-token",
    persist_result=False,
    retries=len(SAVE_RETRY_DELAYS),
    retry_delay_seconds=SAVE_RETRY_DELAYS,
    retry_condition_fn=_retry_transient_save,
)
def save_stac_token(token: CarbonMapperStacToken, block_name: str) -> None:
    """Save a STAC token block under block_name, replacing the token stored there.

    Transient Prefect API errors are retried. The error never carries the API's answer, which
    could echo the token.

    Args:
        token: the block to save, e.g. from `create_stac_token`.
        block_name: the block document name.

    Raises:
        TokenBlockError: the save failed; the block may still hold the previous token.
    """
    failure: TokenBlockError | None = None
    try:
        token.save(block_name, overwrite=True)
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        failure = TokenBlockError(
            f"Could not save the new STAC token to block {block_name!r} "
            f"({type(exc).__name__}{f' {status}' if status else ''} from the Prefect API). "
            "The previous token, if any, is unchanged. Check that the Prefect API is "
            "reachable and run the refresh again.",
            transient=_is_transient_prefect_error(exc),
        )
    if failure is not None:
        # Raised outside the except block: the API's error, whose text can quote the request
        # body (the token), is not even kept as the suppressed __context__.
        raise failure
