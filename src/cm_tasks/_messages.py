"""The long messages of the renewal: what happened, where, and the fix.

Kept out of the logic so that the decisions read top-down. None quotes a stored value: a
message names blocks, URLs, times and error types, never a token or a Prefect error's text
(which can carry a request).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from cm_tasks.settings import api_identity, prefect_api_at

if TYPE_CHECKING:
    from cm_tasks.blocks import CarbonMapperStacToken


def prefect_failed(what: str, api: str | None, exc: BaseException, status: int | None) -> str:
    """A Prefect API call of the renewal failed."""
    code = f" {status}" if status else ""
    return (
        f"Could not {what} ({type(exc).__name__}{code} from {prefect_api_at(api)}). Check that the "
        "Prefect API is reachable (PREFECT_API_URL) and that this identity may use it."
    )


def riding_out(error: str, seconds: float) -> str:
    """A renewal with nothing cached to serve tries a failed Prefect call again."""
    return f"{error} No token is cached to serve meanwhile: trying again for up to {seconds:.0f} s."


def lease_not_released(name: str, api: str | None, exc: BaseException) -> str:
    """The renewal lease could not be given back."""
    return (
        f"Could not release the renewal lease {name!r} on {prefect_api_at(api)} "
        f"({type(exc).__name__}). On Prefect 3.4.10+ it lapses by itself, unless the server "
        "restarted meanwhile (it forgets leases, not their slots). If the slot stays active "
        "for longer than a renewal can take (CM_REFRESH_TIMEOUT, or 980 s inline by default), "
        f"nobody holds it: free it with `prefect gcl update {name} --active-slots 0`."
    )


def lease_forgotten(name: str, api: str | None) -> str:
    """The Prefect server restarted while this process held the lease: freed by name."""
    return (
        f"This process's renewal lease {name!r} is no longer known to {prefect_api_at(api)}, "
        "although it could not have lapsed yet: the server restarted (it keeps leases in "
        "memory) and still counts the slot. The slot is given back by name, so that it is not "
        "held for ever."
    )


def lease_lost(name: str, api: str | None) -> str:
    """The Prefect server no longer knows the lease this process holds."""
    return (
        f"This process's renewal lease {name!r} is no longer known to {prefect_api_at(api)} (the "
        "lease lapsed while it was out of reach, or the server restarted). If the slot stays "
        "active for longer than a renewal can take (CM_REFRESH_TIMEOUT, or 980 s inline by "
        f"default), nobody holds it: free it with `prefect gcl update {name} --active-slots 0`."
    )


def api_mismatch(block_name: str, block: CarbonMapperStacToken, api_url: str) -> str:
    """The block holds a token for another API than the caller's."""
    host = api_identity(api_url).split("://", 1)[-1].split("/", 1)[0]
    label = "".join(c if c.isalnum() else "-" for c in host.lower()).strip("-") or "other"
    return (
        f"The token block {block_name!r} holds a token for {block.base_url}, but it was "
        f"asked for a token for {api_url} (CM_BASE_URL, or the base_url given). A token is "
        "only sent to the API it belongs to, and that block is not overwritten with another "
        "API's token. Give this API its own token block: set CM_TOKEN_BLOCK (or block_name) "
        f"to another name, e.g. {block_name}-{label}, and the next call creates it."
    )


def refresh_disabled(
    block_name: str, block: CarbonMapperStacToken | None, min_valid: timedelta
) -> str:
    """Refresh mode `off` and a missing or stale token: where to refresh it."""
    if block is None:
        state = f"The token block {block_name!r} does not exist"
    elif block.expires_within(timedelta(0)):
        state = f"The STAC token in block {block_name!r} expired at {block.expires_at.isoformat()}"
    else:
        state = (
            f"The STAC token in block {block_name!r} expires at "
            f"{block.expires_at.isoformat()}, within min_valid ({min_valid})"
        )
    return (
        f"{state}, and this process does not refresh tokens (refresh mode off: "
        "CM_REFRESH_MODE or refresh='off'). Refresh it where the account credentials are: "
        "run the deployment (`prefect deployment run refresh-stac-token/weekly`) or "
        "`cm-tasks refresh`, then try again."
    )


def within_min_valid(block_name: str, block: CarbonMapperStacToken, min_valid: timedelta) -> str:
    """A token made moments ago (or just now) already expires within min_valid."""
    return (
        f"The STAC token of block {block_name!r} was made at {block.created_at.isoformat()} "
        f"and expires at {block.expires_at.isoformat()}, within min_valid ({min_valid}). It is "
        "used anyway: a renewal now would not give a longer-lived token. Lower min_valid, or "
        "check the lifetime the API grants (CM_TOKEN_LIFETIME_DAYS)."
    )


def still_stale(block_name: str, min_valid: timedelta) -> str:
    """A renewal ended, but the block still has no usable token."""
    return (
        f"The renewal of block {block_name!r} ended, but the block still has no token valid "
        f"for min_valid ({min_valid}). The refresh may save tokens with a short lifetime "
        "(CM_TOKEN_LIFETIME_DAYS where it runs), or the API keeps rejecting new tokens."
    )


def serving_stale(
    block_name: str, error: Exception, block: CarbonMapperStacToken, retry: float
) -> str:
    """A renewal failed; the cached token, still valid, is used."""
    return (
        f"Could not renew the STAC token of block {block_name!r} ({type(error).__name__}: "
        f"{error}). Using the cached token, which expires at {block.expires_at.isoformat()}; "
        f"trying again in {retry:.0f} s or more."
    )


def still_renewing(block_name: str, block: CarbonMapperStacToken, patience: float) -> str:
    """A renewal is taking a while (nothing failed); the cached token, still valid, is used."""
    return (
        f"The renewal of the STAC token of block {block_name!r} is still running after "
        f"{patience:.0f} s; using the cached token meanwhile, which expires at "
        f"{block.expires_at.isoformat()}."
    )


def waited_too_long(block_name: str, bound: float) -> str:
    """Another process held the renewal lease for the whole bound."""
    return (
        f"Waited {bound:.0f} s for another process's renewal of block {block_name!r} without "
        "its outcome. Look for a hung process or refresh run; on Prefect before 3.4.10 a "
        "killed holder keeps the lease (on 3.4.10+, one that died while the server restarted): "
        f"`prefect gcl update cm-tasks-refresh-{block_name} --active-slots 0`."
    )


def their_failure(block_name: str, error: str, retry_after: float, run: str | None) -> str:
    """Another process's renewal, which this one waited for, failed."""
    cool = f" Nobody renews the block for {retry_after:.0f} s: it may hold an unsaved token."
    return (
        f"Another process's renewal of block {block_name!r} failed ({error}): see "
        f"{f'the refresh run {run!r}' if run else 'its log'}.{cool if retry_after else ''}"
    )


def refused_login_held(refused: str, seconds: float) -> str:
    """The API refused the credentials a moment ago: said to the callers that do not try again."""
    return (
        f"{refused} Until {seconds:.0f} s after that refusal, callers in this process get this "
        "error without logging in again (each try would be a failed login on the account); "
        "`clear_token_cache()` ends the wait after you fix the credentials."
    )
