"""`get_stac_token()`: the STAC token for downstream code, cached per process, renewed on demand.

A token cached in this process that stays valid for `min_valid` is returned at once (no
Prefect call, no lock); otherwise `cm_tasks._renewal` re-reads the block and renews it the way
the refresh mode says (`inline`, `deployment`, `off`). A token is only returned for the API
its block names: another API's block is a `ConfigurationError` naming both URLs.
"""

from __future__ import annotations

from collections.abc import Generator
from datetime import timedelta

from cm_tasks import _renewal, _token_cache
from cm_tasks._prefect_calls import prefect_api
from cm_tasks._renewal import Call, Flight, Outcome
from cm_tasks._token_cache import TokenCacheInfo, clear_token_cache, token_cache_info
from cm_tasks.errors import ConfigurationError
from cm_tasks.settings import (
    CarbonMapperSettings,
    RefreshMode,
    check_block_name,
    load_settings,
    validate_refresh_mode,
)

__all__ = [
    "DEFAULT_MIN_VALID",
    "TokenCacheInfo",
    "aget_stac_token",
    "clear_token_cache",
    "get_stac_token",
    "token_cache_info",
]

DEFAULT_MIN_VALID = timedelta(hours=1)
"""A cached token is used only while it stays valid at least this long (1 hour)."""

_Steps = Generator[tuple[Flight, float | None], Outcome | None, str | None]


def get_stac_token(
    block_name: str | None = None,
    *,
    min_valid: timedelta = DEFAULT_MIN_VALID,
    refresh: RefreshMode | None = None,
) -> str:
    """The Carbon Mapper STAC token, valid for at least `min_valid`: cached, re-read, or new.

    Call it wherever a token is needed (a flow, a task, a mapped task, plain Python): the
    block is read once per process while its token stays valid. When the token is missing or
    expires within `min_valid`, the refresh mode decides what happens; concurrent callers, in
    this process and in others, share one renewal and wait for it without polling Prefect.
    The token is for the API of `CM_BASE_URL`; the cache is per Prefect API.

    - `inline` (default): a new token is made here with the package's tasks (the account
      credentials come from the Secret blocks named by `CM_EMAIL_BLOCK` and
      `CM_PASSWORD_BLOCK`) and saved to the block.
    - `deployment`: a run of `CM_REFRESH_DEPLOYMENT` (default `refresh-stac-token/weekly`)
      renews the block (it is joined if one is already running for it), waited for at most
      `CM_REFRESH_TIMEOUT` seconds. This process never reads a credential.
    - `off`: a `TokenBlockError` says how to refresh; nothing is called.

    In every mode, while the platform API, the Prefect API or the refresh deployment is down
    or slow, or a renewal fails for any reason but a configuration error, a cached token that
    has not expired is returned instead of an error (with a warning when something failed),
    after at most 10 s.

    Args:
        block_name: the `CarbonMapperStacToken` block; default `CM_TOKEN_BLOCK`
            (`carbon-mapper-stac-token`).
        min_valid: how long the token must stay valid from now; default 1 hour. Must be
            shorter than the shortest lifetime of a new token: `CM_TOKEN_LIFETIME_DAYS` less
            one day (tokens lapse at 00:00 UTC of their expiry date).
        refresh: `inline`, `deployment` or `off`; default `CM_REFRESH_MODE` (`inline`).

    Returns:
        The token, for an `Authorization: Bearer` header. Never log or return it from a task.

    Raises:
        ConfigurationError: block_name, min_valid or refresh is unusable, the block holds a
            token for another API than `CM_BASE_URL` (the message names both), or the
            refresh deployment does not exist.
        TokenBlockError: the block could not be read, the new token not saved, or (mode
            `off`) the token is missing or stale.
        RefreshRunError: (mode `deployment`) the refresh run failed, crashed or was cancelled;
            `RefreshTimeoutError` when it did not finish within `CM_REFRESH_TIMEOUT`.
        CredentialsBlockError: (mode `inline`) a Secret block is missing or bad.
        CarbonMapperAPIError: (mode `inline`) the platform API failed, here or in the process
            whose renewal this one waited for; in any mode, a `create-stac` whose token may
            exist (nobody renews the block for 60 s).

    Example:
        ```python
        import httpx
        from prefect import flow, task
        from cm_tasks import get_stac_token

        @task
        def download(href: str) -> int:
            headers = {"Authorization": f"Bearer {get_stac_token(refresh='deployment')}"}
            return len(httpx.get(href, headers=headers).content)

        @flow
        def ingest(hrefs: list[str]) -> int:
            return sum(download.map(hrefs).result())  # raises if a download failed
        ```
    """
    token = run_steps(token_steps(block_name, min_valid, None, refresh))
    assert token is not None  # only a renewal after a 401 gives up
    return token


async def aget_stac_token(
    block_name: str | None = None,
    *,
    min_valid: timedelta = DEFAULT_MIN_VALID,
    refresh: RefreshMode | None = None,
) -> str:
    """`get_stac_token` for async code: same cache, same renewal, never blocks the event loop.

    A cached token is returned without leaving the event loop; waiting for a renewal holds
    no thread (the renewal runs in a thread of its own, shared by every caller). N asyncio
    tasks asking at once make at most one renewal.

    Example:
        ```python
        import asyncio
        from cm_tasks import aget_stac_token

        async def main() -> None:
            tokens = await asyncio.gather(*(aget_stac_token() for _ in range(10)))
            assert len(set(tokens)) == 1

        asyncio.run(main())
        ```
    """
    token = await arun_steps(token_steps(block_name, min_valid, None, refresh))
    assert token is not None
    return token


def run_steps(steps: _Steps) -> str | None:
    """Drive `token_steps` in this thread: the answer, once every flight it waits for is over."""
    outcome = None
    while isinstance(step := _advance(steps, outcome), tuple):
        outcome = step[0].wait(step[1])
    return step


async def arun_steps(steps: _Steps) -> str | None:
    """Drive `token_steps` on an event loop: waiting for a renewal holds no thread."""
    outcome = None
    while isinstance(step := _advance(steps, outcome), tuple):
        outcome = await step[0].await_outcome(step[1])
    return step


def _advance(steps: _Steps, outcome: Outcome | None) -> tuple[Flight, float | None] | str | None:
    """The next flight to wait for (with how long), or the answer once the steps are done."""
    try:
        return steps.send(outcome)
    except StopIteration as done:  # the generator protocol: how a generator returns
        answer: str | None = done.value
        return answer


def token_steps(
    block_name: str | None,
    min_valid: timedelta,
    base_url: str | None,
    refresh: str | None,
    rejected: str | None = None,
) -> _Steps:
    """The token for the API of base_url (default `CM_BASE_URL`), as steps to drive.

    With `rejected` (a token the API answered 401 to): the token to send instead, or None
    when the 401 goes back to the caller (see `cm_tasks._renewal`).
    """
    mode = check_refresh(refresh)  # before any call
    settings = load_settings()
    name = (
        settings.token_block if block_name is None else check_block_name("block_name", block_name)
    )
    key = (prefect_api(), name)
    api_url = base_url or settings.base_url
    entry = _token_cache.get(key)
    if (
        rejected is None
        and entry is not None
        and not entry.block.expires_within(min_valid)
        and _renewal.same_api(entry.block, api_url)
    ):
        return entry.block.get()
    _check_min_valid(min_valid, settings)
    call = Call(key, settings, api_url, min_valid, rejected, mode or settings.refresh_mode)
    return (yield from _renewal.steps(call))


def check_refresh(refresh: str | None) -> RefreshMode | None:
    """The refresh= keyword as a mode (None: use `CM_REFRESH_MODE`); a bad one is an error."""
    if refresh is None:
        return None
    try:
        return validate_refresh_mode(refresh)
    except ValueError as exc:
        raise ConfigurationError(f"refresh={refresh!r}: {exc}.") from None


def _check_min_valid(min_valid: timedelta, settings: CarbonMapperSettings) -> None:
    shortest = timedelta(days=settings.token_lifetime_days - 1)
    if timedelta(0) <= min_valid < shortest:
        return
    if settings.token_lifetime_days <= 1:
        fix = "Set CM_TOKEN_LIFETIME_DAYS to 2 or more (14 is the default)."
    else:
        fix = (
            f"Use a min_valid under {shortest.days} days, or raise CM_TOKEN_LIFETIME_DAYS. "
            "The default is 1 hour."
        )
    raise ConfigurationError(
        f"min_valid is {min_valid}; it must be at least 0 and shorter than the shortest "
        f"lifetime a new token can have: CM_TOKEN_LIFETIME_DAYS={settings.token_lifetime_days} "
        "days less up to one day, because tokens lapse at 00:00 UTC of their expiry date. "
        f"Otherwise a new token could already be within min_valid. {fix}"
    )
