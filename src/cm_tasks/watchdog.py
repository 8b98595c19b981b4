"""The expiry watchdog: is the saved STAC token there, and how long does it have left?

Reads the `CarbonMapperStacToken` block only - no call to the Carbon Mapper API - so it is
cheap enough to run daily. `check_token` gives a `TokenStatus` (used by `cm-tasks status`);
the `check-stac-token` flow (in `cm_tasks.flows`) publishes it and fails, with the event
`carbon-mapper.stac-token.expiring`, when the token is missing, expired or expiring soon.

"Soon", for the daily check, means before the next weekly refresh plus a day
(`RENEWAL_MARGIN_DAYS`), or within `threshold_days`, whichever is earlier to warn: a
14-day token renewed every Monday always outlasts that, and one whose Monday run failed does
not, so the check's event starts the refresh (the deployment trigger of
`cm_tasks.deployments`) the same day, not three days before it runs out.
"""

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from pydantic import BaseModel, ConfigDict, Field

from cm_tasks.blocks import load_token_block
from cm_tasks.errors import (
    CarbonMapperError,
    ConfigurationError,
    TokenBlockError,
    UnusableTokenError,
)
from cm_tasks.notify import (
    EXPIRING_EVENT,
    artifact_key,
    days_left,
    in_run,
    markdown_table,
    token_resource,
)
from cm_tasks.schedules import WEEKLY_REFRESH_CRON, next_fire
from cm_tasks.settings import DEFAULT_TOKEN_BLOCK, check_block_name, prefect_api_at

DEFAULT_THRESHOLD_DAYS = 3.0
MAX_THRESHOLD_DAYS = 365.0
#: The daily check warns when a token will not outlast the next weekly refresh by this much.
RENEWAL_MARGIN_DAYS = 1.0
REFRESH_HINT = (
    "Run the refresh now: `prefect deployment run refresh-stac-token/weekly` "
    "(or `cm-tasks refresh`)."
)


def refresh_hint(token_block: str) -> str:
    """How to refresh token_block now: the weekly run writes the default block only."""
    if token_block == DEFAULT_TOKEN_BLOCK:
        return REFRESH_HINT
    return (
        f"Run the refresh now: `cm-tasks refresh --token-block {token_block}` (or "
        f"`prefect deployment run refresh-stac-token/weekly --param token_block={token_block}`)."
    )


class TokenState(str, Enum):
    """How the saved token stands; the value is also `cm-tasks status`'s exit code's name."""

    OK = "OK"
    EXPIRING = "EXPIRING"
    EXPIRED = "EXPIRED"
    MISSING = "MISSING"

    @property
    def exit_code(self) -> int:
        """`cm-tasks status` exit code: 0 OK, 1 EXPIRING, 2 EXPIRED, 3 MISSING."""
        return _STATUS_EXIT_CODES[self]


# Written out, not the members' order: scripts and monitors depend on these numbers (an
# interface: docs/operate.md), and a new state must not renumber the others.
_STATUS_EXIT_CODES = {
    TokenState.OK: 0,
    TokenState.EXPIRING: 1,
    TokenState.EXPIRED: 2,
    TokenState.MISSING: 3,
}


class StacTokenExpiringError(CarbonMapperError):
    """The saved STAC token is missing, expired, or expires within the watchdog's threshold."""


class TokenStatus(BaseModel):
    """What the watchdog found in the token block; safe to log and return (never the token).

    Example:
        ```python
        from cm_tasks.watchdog import check_token

        status = check_token("carbon-mapper-stac-token", threshold_days=3)
        print(status.state.value, status.days_left, status.message)
        ```
    """

    model_config = ConfigDict(frozen=True)

    state: TokenState
    token_block: str
    threshold_days: float
    checked_at: datetime
    token_name: str | None = None
    expires_at: datetime | None = None
    days_left: float | None = None
    scopes: list[str] = Field(default_factory=list)
    base_url: str | None = None
    problem: str | None = None  # why a block that exists cannot be used (never its values)

    @property
    def ok(self) -> bool:
        """Whether the token is there and valid for longer than the threshold."""
        return self.state is TokenState.OK

    @property
    def message(self) -> str:
        """One sentence an operator can act on."""
        if self.state is TokenState.MISSING:
            return (
                f"MISSING: there is no CarbonMapperStacToken block named {self.token_block!r}. "
                + refresh_hint(self.token_block)
            )
        if self.problem is not None:
            return f"{self.state.value}: {self.problem} " + refresh_hint(self.token_block)
        expiry = f"{self.expires_at:%Y-%m-%d %H:%M} UTC"
        what = f"The STAC token {self.token_name!r} in block {self.token_block!r}"
        if self.state is TokenState.EXPIRED:
            return f"EXPIRED: {what} expired on {expiry}. " + refresh_hint(self.token_block)
        if self.state is TokenState.EXPIRING:
            return (
                f"EXPIRING: {what} expires on {expiry}, in {self.days_left:.1f} days "
                f"(threshold {self.threshold_days:g} days). " + refresh_hint(self.token_block)
            )
        return f"OK: {what} expires on {expiry}, in {self.days_left:.1f} days."


def check_threshold(threshold_days: float) -> float:
    """Return threshold_days if usable, else raise ConfigurationError saying why."""
    if not 0 <= threshold_days <= MAX_THRESHOLD_DAYS:
        raise ConfigurationError(
            f"threshold_days is {threshold_days:g}; it must be from 0 to "
            f"{MAX_THRESHOLD_DAYS:g} days (default {DEFAULT_THRESHOLD_DAYS:g})."
        )
    return float(threshold_days)


def check_token(
    token_block: str,
    threshold_days: float = DEFAULT_THRESHOLD_DAYS,
    now: datetime | None = None,
) -> TokenStatus:
    """Read the token block and say whether the token is OK, expiring, expired or missing.

    Args:
        token_block: name of the CarbonMapperStacToken block.
        threshold_days: a token with this many days left or fewer is EXPIRING.
        now: the time to compare with (tests); default the current UTC time.

    Raises:
        ConfigurationError: the block name or threshold is unusable.
        TokenBlockError: the block exists but cannot be read, or the Prefect API said "not
            found" but is not a healthy Prefect API (e.g. PREFECT_API_URL without `/api`).
    """
    block_name = check_block_name("token_block", token_block)
    threshold = check_threshold(threshold_days)
    checked_at = now or datetime.now(timezone.utc)
    try:
        token = load_token_block(block_name)
    except UnusableTokenError as exc:  # as good as expired: the refresh replaces it
        return TokenStatus(
            state=TokenState.EXPIRED,
            token_block=block_name,
            threshold_days=threshold,
            checked_at=checked_at,
            problem=str(exc),
        )
    if token is None:
        _confirm_not_found(block_name)
        return TokenStatus(
            state=TokenState.MISSING,
            token_block=block_name,
            threshold_days=threshold,
            checked_at=checked_at,
        )
    left = days_left(token.expires_at, checked_at)
    if token.expires_at <= checked_at:
        state = TokenState.EXPIRED
    elif left <= threshold:
        state = TokenState.EXPIRING
    else:
        state = TokenState.OK
    return TokenStatus(
        state=state,
        token_block=block_name,
        threshold_days=threshold,
        checked_at=checked_at,
        token_name=token.name,
        expires_at=token.expires_at,
        days_left=left,
        scopes=list(token.scopes),
        base_url=token.base_url,
    )


def renewal_threshold(threshold_days: float, now: datetime | None = None) -> float:
    """The daily check's threshold in days: until the next weekly refresh plus a day, or more.

    Args:
        threshold_days: The least threshold, whatever the schedule.
        now: The time of the check (tests); default the current UTC time.

    Example:
        ```python
        from datetime import datetime, timezone
        from cm_tasks.watchdog import renewal_threshold

        # The weekly refresh runs on Mondays at 06:00 UTC.
        monday = datetime(2026, 11, 30, 7, tzinfo=timezone.utc)  # an hour after it
        sunday = datetime(2026, 11, 29, 7, tzinfo=timezone.utc)  # 23 hours before the next
        assert renewal_threshold(3, monday) == 7.96
        assert renewal_threshold(3, sunday) == 3
        ```
    """
    checked_at = now or datetime.now(timezone.utc)
    until_refresh = days_left(next_fire(WEEKLY_REFRESH_CRON, checked_at), checked_at)
    return max(check_threshold(threshold_days), round(until_refresh + RENEWAL_MARGIN_DAYS, 2))


def _confirm_not_found(block_name: str) -> None:
    """Raise unless the "not found" came from a healthy Prefect API.

    A PREFECT_API_URL without its `/api` reaches Prefect's server, which answers 404 to every
    block read: that is "could not check", not MISSING.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    with get_client(sync_client=True) as client:
        unhealthy = client.api_healthcheck()
        if unhealthy is None:
            # Prefect 3.2-3.4 serve the UI's HTML page, 200, for any unknown path: /health
            # "succeeds" at the server's root. A Prefect API answers /hello with JSON.
            unhealthy = _not_json(client.hello())
    if unhealthy is None:
        return
    status = getattr(getattr(unhealthy, "response", None), "status_code", None)
    what = (
        str(unhealthy)  # /hello answered, but not with JSON: a web page
        if isinstance(unhealthy, ValueError)
        else f"{type(unhealthy).__name__}{f' {status}' if status else ''} on /health"
    )
    where = prefect_api_at(get_current_settings().api.url)
    raise TokenBlockError(
        f"Could not check the token block {block_name!r}: {where} answered that it does not "
        f"exist, but does not answer as a Prefect API ({what}). Check "
        "PREFECT_API_URL: it ends in /api, e.g. http://127.0.0.1:4200/api.",
        transient=True,
    )


def _not_json(response: Any) -> Exception | None:
    content_type = str(response.headers.get("content-type", ""))
    if response.status_code == 200 and content_type.startswith("application/json"):
        return None
    return ValueError(f"/hello answered {response.status_code} {content_type or 'untyped'}")


def status_payload(status: TokenStatus) -> dict[str, Any]:
    """The event payload of a check: state, block, token name, expiry, days left, threshold."""
    return status.model_dump(mode="json", exclude={"checked_at"})


def publish_status(status: TokenStatus) -> None:
    """Add the check's markdown artifact (inside a run); emit the expiring event unless OK."""
    if not status.ok:
        emit_event(
            EXPIRING_EVENT,
            resource=token_resource(status.token_block),
            payload={**status_payload(status), "message": status.message},
        )
    if not in_run():
        return
    rows: list[tuple[str, object]] = [("Status", status.state.value), ("Block", status.token_block)]
    if status.expires_at is not None:
        rows += [
            ("Token name", status.token_name),
            ("Expires", f"{status.expires_at:%Y-%m-%d %H:%M} UTC"),
            ("Days left", f"{status.days_left:.1f}"),
        ]
    rows.append(("Threshold", f"{status.threshold_days:g} days"))
    create_markdown_artifact(
        markdown_table(
            "Carbon Mapper STAC token check",
            rows,
            footer="" if status.ok else status.message,
        ),
        key=artifact_key(status.token_block, "check"),
        description=f"Days left on the STAC token in block {status.token_block}.",
        _sync=True,  # type: ignore[call-arg]  # sync even inside an async flow (else a coroutine)
    )


def __getattr__(name: str) -> Any:
    # Deployments made by cm-tasks 0.2 and earlier have the entrypoint
    # `cm_tasks.watchdog.check_stac_token`: a worker imports this module and looks the flow up
    # here. Imported on demand, because cm_tasks.flows imports this module.
    if name == "check_stac_token":
        from cm_tasks.flows import check_stac_token

        return check_stac_token
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
