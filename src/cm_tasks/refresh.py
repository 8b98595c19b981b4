"""One token refresh: check the request, then credentials -> access token -> STAC token -> block.

Shared by the `refresh-stac-token` flow and by code that refreshes inline. Every check of the
request happens before any call to Prefect or the Carbon Mapper API, and the token block is
written only once the new token is in hand, so a failure anywhere leaves the stored token as
it was.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect.context import FlowRunContext
from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings
from pydantic import BaseModel, ConfigDict

from cm_tasks._lease_limit import create_lease_limit
from cm_tasks._logging import RunLogger, current_logger
from cm_tasks.blocks import CarbonMapperStacToken, load_token_block
from cm_tasks.client import CarbonMapperClient
from cm_tasks.errors import BadCredentialsError, ConfigurationError
from cm_tasks.notify import publish_refreshed
from cm_tasks.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_EMAIL_BLOCK,
    DEFAULT_PASSWORD_BLOCK,
    DEFAULT_TOKEN_LIFETIME_DAYS,
    MAX_LIFETIME_DAYS,
    MIN_LIFETIME_DAYS,
    CarbonMapperSettings,
    api_identity,
    check_block_name,
    validate_base_url,
)
from cm_tasks.tasks import create_stac_token, get_access_token, read_credentials, save_stac_token

MAX_TOKEN_NAME_LENGTH = 100
WEEKLY_REFRESH_DAYS = 7


class RefreshRequest(BaseModel):
    """A checked refresh request: every value is final and valid."""

    model_config = ConfigDict(frozen=True)

    token_name: str
    lifetime_days: int
    email_block: str
    password_block: str
    token_block: str
    base_url: str


class RefreshSummary(BaseModel):
    """What a refresh did, safe to log and return: never the token itself."""

    model_config = ConfigDict(frozen=True)

    token_block: str
    token_name: str
    expires_at: datetime
    scopes: list[str]

    @classmethod
    def of(cls, token: CarbonMapperStacToken, token_block: str) -> RefreshSummary:
        """The summary of a saved token block."""
        return cls(
            token_block=token_block,
            token_name=token.name,
            expires_at=token.expires_at,
            scopes=list(token.scopes),
        )


def default_token_name(now: datetime | None = None) -> str:
    """A token name with the UTC date and time, e.g. `prefect-20261127T0600Z`."""
    return f"prefect-{(now or datetime.now(timezone.utc)):%Y%m%dT%H%MZ}"


def _check_token_name(token_name: str | None) -> str:
    if not token_name:  # None, or the run form's empty field
        return default_token_name()
    name = token_name.strip()
    if not name:
        raise ConfigurationError(
            "token_name is blank (only spaces). Give a name such as 'weekly-ingest', or leave "
            "it empty for a dated default like 'prefect-20261127T0600Z'."
        )
    if len(name) > MAX_TOKEN_NAME_LENGTH:
        raise ConfigurationError(
            f"token_name is {len(name)} characters long; use at most {MAX_TOKEN_NAME_LENGTH}."
        )
    if not name.isprintable():
        raise ConfigurationError("token_name contains control characters; use plain text.")
    return name


def _check_lifetime(lifetime_days: int) -> int:
    if not MIN_LIFETIME_DAYS <= lifetime_days <= MAX_LIFETIME_DAYS:
        raise ConfigurationError(
            f"lifetime_days is {lifetime_days}; it must be from {MIN_LIFETIME_DAYS} to "
            f"{MAX_LIFETIME_DAYS} days (default {DEFAULT_TOKEN_LIFETIME_DAYS})."
        )
    if lifetime_days <= WEEKLY_REFRESH_DAYS:
        current_logger().warning(
            "lifetime_days=%d: the token expires at 00:00 UTC on its expiry date, so with a "
            "weekly refresh it can lapse before the next run. Use 14 days (the default) for "
            "a week of overlap.",
            lifetime_days,
        )
    return lifetime_days


def _check_block(parameter: str, value: str | None, default: str) -> str:
    return default if value is None else check_block_name(parameter, value, default)


def resolve_request(
    settings: CarbonMapperSettings,
    *,
    token_name: str | None = None,
    lifetime_days: int | None = None,
    email_block: str | None = None,
    password_block: str | None = None,
    token_block: str | None = None,
    base_url: str | None = None,
) -> RefreshRequest:
    """Fill defaults from settings and check every value, before anything is sent anywhere.

    The expiry date is not fixed here: it is counted from the day create-stac is sent.

    Raises:
        ConfigurationError: a value is unusable; the message says which and why.
    """
    lifetime = _check_lifetime(
        settings.token_lifetime_days if lifetime_days is None else lifetime_days
    )
    return RefreshRequest(
        token_name=_check_token_name(token_name),
        lifetime_days=lifetime,
        email_block=_check_block("email_block", email_block, settings.email_block),
        password_block=_check_block("password_block", password_block, settings.password_block),
        token_block=_check_block("token_block", token_block, settings.token_block),
        base_url=settings.base_url if base_url is None else _check_base_url(base_url),
    )


def _check_base_url(value: str) -> str:
    try:
        return validate_base_url(value)
    except ValueError as exc:
        problem = str(exc)
    raise ConfigurationError(
        f"base_url {problem} (it is {value!r}). Give the platform API's base URL, e.g. "
        f"{DEFAULT_BASE_URL} (the default). Nothing was sent and the stored token is unchanged."
    )


def run_refresh(
    request: RefreshRequest,
    settings: CarbonMapperSettings,
    client: CarbonMapperClient | None = None,
) -> CarbonMapperStacToken:
    """Get a new STAC token with the package's tasks and save it to the token block.

    Args:
        request: from `resolve_request`.
        settings: base URL, time-out and retry policy for the API calls.
        client: a client to use instead of one made from settings (tests inject one).

    Returns:
        The saved token block. Once it is saved, the event
        `carbon-mapper.stac-token.refreshed` is emitted and, inside a flow or task run, a
        markdown artifact is added to the run (neither carries the token).

    Raises:
        CredentialsBlockError: a Secret block is missing or bad.
        BadCredentialsError: the API rejected the credentials; names the two blocks.
        CarbonMapperAPIError: the API failed after retries.
        TokenBlockError: the new token could not be saved.
    """
    if FlowRunContext.get() is None:
        # Outside a flow the tasks' logs have no run to go to, and Prefect would warn about
        # each line; they still reach the console.
        with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
            return _refresh(request, settings, client)
    return _refresh(request, settings, client)


def _refresh(
    request: RefreshRequest,
    settings: CarbonMapperSettings,
    client: CarbonMapperClient | None,
) -> CarbonMapperStacToken:
    email, password = read_credentials(request.email_block, request.password_block)
    # The request's API, not necessarily this process's CM_BASE_URL (a run parameter beats it).
    api = client or CarbonMapperClient.from_settings(
        settings.model_copy(update={"base_url": request.base_url}), logger=RunLogger()
    )
    try:
        try:
            access = get_access_token(email, password, client=api)
        except BadCredentialsError as exc:
            raise BadCredentialsError(
                f"{exc} They were read from the Secret blocks {request.email_block!r} "
                f"(e-mail) and {request.password_block!r} (password): update them with "
                f"`{_login_command(request)}` and run again.",
                status_code=exc.status_code,
                endpoint=exc.endpoint,
            ) from None
        token = create_stac_token(
            access, request.token_name, client=api, lifetime_days=request.lifetime_days
        )
    finally:
        if client is None:
            api.close()
    first_save = _is_first_save(request.token_block, token.base_url)
    save_stac_token(token, request.token_block)
    publish_refreshed(token, request.token_block)
    if first_save:  # its renewal lease, made once here rather than by each waiting process
        create_lease_limit(request.token_block)
    return token


def _is_first_save(block_name: str, base_url: str) -> bool:
    """Whether there is no block block_name yet; warns if it holds a token for another API.

    Inline and 401-triggered refreshes never get here with such a block (`cm_tasks.access`
    refuses first); the explicit refresh flow may replace it, but not silently.
    """
    try:
        existing = load_token_block(block_name)
    except Exception:  # only for a warning: an unreadable block is replaced as before
        return False
    if existing is None:
        return True
    if api_identity(existing.base_url) != api_identity(base_url):
        current_logger().warning(
            "Block %r held a token for %s; it now holds one for %s (base_url). Code that "
            "uses this block with the other API will get a ConfigurationError: give each API "
            "its own token block (CM_TOKEN_BLOCK).",
            block_name,
            existing.base_url,
            base_url,
        )
    return False


def _login_command(request: RefreshRequest) -> str:
    """The `cm-tasks login` that writes the request's Secret blocks (it writes the defaults)."""
    options = [
        f"{option} {name}"
        for option, name, default in (
            ("--email-block", request.email_block, DEFAULT_EMAIL_BLOCK),
            ("--password-block", request.password_block, DEFAULT_PASSWORD_BLOCK),
        )
        if name != default
    ]
    return " ".join(["cm-tasks login", *options])
