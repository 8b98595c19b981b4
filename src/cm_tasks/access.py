"""`get_stac_token()`: the STAC token for downstream code, cached per process, renewed on demand.

One call gives ingest code a token it can use right now, inside or outside a flow:

1. A token cached in this process that stays valid for `min_valid` is returned at once (a dict
   look-up: no Prefect call, no lock).
2. Otherwise the token block is read again (another process may have refreshed it).
3. If the block is missing, or its token expires within `min_valid`, the token is renewed
   the way the refresh mode says (`CM_REFRESH_MODE`, or the `refresh=` keyword):
   - `inline` (default): with the package's own tasks (`resolve_request` + `run_refresh`:
     plain task runs inside a flow, not a subflow), saved to the block, cached and returned;
     this process reads the credential Secret blocks.
   - `deployment`: by a run of the refresh deployment (`cm_tasks._deployment_refresh`), which
     a worker of its own pool executes; this process only waits for it and re-reads the block.
   - `off`: not at all; a `TokenBlockError` says how to refresh.

Steps 2 and 3 run under one lock per block name, so when many threads or asyncio tasks of a
process need a refresh at the same moment exactly one refresh happens and all get its token.
Across processes, step 3 holds a Prefect global concurrency lease per block name
(`cm-tasks-refresh-<block>`, created on first use) and reads the block once more after
acquiring it: many workers finding the same token about to expire make one new token.
The async twin `aget_stac_token` runs those steps in a worker thread, sharing the same lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import anyio.to_thread

from cm_tasks import _deployment_refresh
from cm_tasks._logging import current_logger
from cm_tasks._refresh_lease import refresh_lease
from cm_tasks.blocks import CarbonMapperStacToken, load_token_block
from cm_tasks.errors import ConfigurationError, TokenBlockError
from cm_tasks.refresh import resolve_request, run_refresh
from cm_tasks.settings import (
    CarbonMapperSettings,
    RefreshMode,
    load_settings,
    validate_block_name,
    validate_refresh_mode,
)

DEFAULT_MIN_VALID = timedelta(hours=1)
"""A cached token is used only while it stays valid at least this long (1 hour)."""

_cache: dict[str, CarbonMapperStacToken] = {}
_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()
_block_reads = 0
_refreshes = 0


@dataclass(frozen=True)
class TokenCacheInfo:
    """What the process-wide token cache has done since the process started.

    Attributes:
        block_reads: how many times a token block was read from the Prefect API.
        refreshes: how many inline refreshes (new tokens) this process made.
        cached_blocks: names of the blocks whose token is cached now.
    """

    block_reads: int
    refreshes: int
    cached_blocks: tuple[str, ...]


def token_cache_info() -> TokenCacheInfo:
    """Counters of the token cache, e.g. to check that a flow read the block only once.

    Example:
        ```python
        from cm_tasks import get_stac_token, token_cache_info

        get_stac_token()
        get_stac_token()
        print(token_cache_info().block_reads)  # 1
        ```
    """
    with _guard:
        return TokenCacheInfo(_block_reads, _refreshes, tuple(sorted(_cache)))


def clear_token_cache(block_name: str | None = None) -> None:
    """Forget the cached token of one block (or of all blocks when block_name is None).

    The next `get_stac_token()` reads the block again. Useful in tests, and after the API
    rejected a token (the `httpx` auth of `cm_tasks.auth` does it on a 401).

    Example:
        ```python
        from cm_tasks import clear_token_cache

        clear_token_cache()  # the next get_stac_token() reads the block again
        ```
    """
    with _guard:
        if block_name is None:
            _cache.clear()
        else:
            _cache.pop(block_name, None)


def invalidate_token(block_name: str, rejected: str) -> None:
    """Drop the cached token of block_name if it is still `rejected` (one the API refused).

    Only that exact token is dropped: when several requests fail with the same token at once,
    the first one to refresh replaces it, and the others keep the new one.
    """
    with _guard:
        cached = _cache.get(block_name)
        if cached is not None and cached.get() == rejected:
            del _cache[block_name]


def _lock_for(block_name: str) -> threading.Lock:
    with _guard:
        return _locks.setdefault(block_name, threading.Lock())


def _resolve_name(block_name: str | None) -> tuple[str, CarbonMapperSettings | None]:
    if block_name is None:
        settings = load_settings()
        return settings.token_block, settings
    try:
        return validate_block_name(block_name), None
    except ValueError as exc:
        raise ConfigurationError(f"block_name {block_name!r}: {exc}.") from None


def check_refresh(refresh: str | None) -> RefreshMode | None:
    """The refresh= keyword as a mode (None: use `CM_REFRESH_MODE`); a bad one is an error."""
    if refresh is None:
        return None
    try:
        return validate_refresh_mode(refresh)
    except ValueError as exc:
        raise ConfigurationError(f"refresh={refresh!r}: {exc}.") from None


def _check_min_valid(min_valid: timedelta, settings: CarbonMapperSettings) -> None:
    lifetime = timedelta(days=settings.token_lifetime_days)
    if min_valid < timedelta(0) or min_valid >= lifetime:
        raise ConfigurationError(
            f"min_valid is {min_valid}; it must be at least 0 and shorter than the lifetime "
            f"of a new token ({settings.token_lifetime_days} days, CM_TOKEN_LIFETIME_DAYS), "
            "or every call would refresh the token. The default is 1 hour."
        )


def _usable(
    block: CarbonMapperStacToken | None, min_valid: timedelta, rejected: str | None
) -> bool:
    return (
        block is not None
        and not block.expires_within(min_valid)
        and (rejected is None or block.get() != rejected)
    )


def _read_block(block_name: str) -> CarbonMapperStacToken | None:
    """The token block as saved in Prefect, or None when there is none."""
    global _block_reads
    with _guard:
        _block_reads += 1
    try:
        return load_token_block(block_name)
    except TokenBlockError:
        raise
    except Exception as exc:
        raise TokenBlockError(
            f"Could not read the token block {block_name!r} ({type(exc).__name__} from the "
            "Prefect API). Check that the Prefect API is reachable (PREFECT_API_URL).",
            transient=True,
        ) from None


def _refresh_disabled(
    block_name: str, block: CarbonMapperStacToken | None, min_valid: timedelta, rejected: bool
) -> TokenBlockError:
    """The error of refresh mode `off`: what is wrong with the token and where to refresh it."""
    if block is None:
        state = f"The token block {block_name!r} does not exist"
    elif rejected:
        state = (
            f"The API rejected the STAC token in block {block_name!r} (saved as valid "
            f"until {block.expires_at.isoformat()})"
        )
    elif block.expires_within(timedelta(0)):
        state = f"The STAC token in block {block_name!r} expired at {block.expires_at.isoformat()}"
    else:
        state = (
            f"The STAC token in block {block_name!r} expires at "
            f"{block.expires_at.isoformat()}, within min_valid ({min_valid})"
        )
    return TokenBlockError(
        f"{state}, and this process does not refresh tokens (refresh mode off: "
        "CM_REFRESH_MODE or refresh='off'). Refresh it where the account credentials are: "
        "run the deployment (`prefect deployment run refresh-stac-token/weekly`) or "
        "`cm-tasks refresh`, then try again."
    )


def _refresh(
    block_name: str,
    settings: CarbonMapperSettings,
    mode: RefreshMode,
    attempt: _deployment_refresh.Attempt,
    usable: Callable[[CarbonMapperStacToken | None], bool],
) -> CarbonMapperStacToken:
    """The one refresh step: inline, or through the refresh deployment."""
    if mode == "deployment":
        latest: list[CarbonMapperStacToken | None] = [None]

        def fresh() -> bool:
            latest[0] = _read_block(block_name)
            return usable(latest[0])

        _deployment_refresh.refresh_through_deployment(block_name, settings, attempt, fresh)
        return cast(CarbonMapperStacToken, latest[0])
    return _refresh_inline(block_name, settings)


def _refresh_inline(block_name: str, settings: CarbonMapperSettings) -> CarbonMapperStacToken:
    global _refreshes
    current_logger().info(
        "The STAC token in block %r is missing or about to expire: getting a new one.",
        block_name,
    )
    token = run_refresh(resolve_request(settings, token_block=block_name), settings)
    with _guard:
        _refreshes += 1
    return token


def _slow_path(
    block_name: str,
    settings: CarbonMapperSettings | None,
    min_valid: timedelta,
    rejected: str | None,
    refresh: RefreshMode | None = None,
) -> str:
    """Re-read the block and, if need be, refresh: one thread per block name at a time."""
    settings = settings or load_settings()
    mode = refresh or settings.refresh_mode
    attempt = _deployment_refresh.Attempt.start(settings)

    def usable(block: CarbonMapperStacToken | None) -> bool:
        return _usable(block, min_valid, rejected)

    with _lock_for(block_name):
        # Whoever held the lock before may have just done the work.
        with _guard:
            cached = _cache.get(block_name)
        if usable(cached):
            return cast(CarbonMapperStacToken, cached).get()
        block = _read_block(block_name)
        if not usable(block):
            if mode == "off":
                raise _refresh_disabled(block_name, block, min_valid, rejected is not None)
            lease = (
                _deployment_refresh.lease(block_name, settings, attempt)
                if mode == "deployment"
                else refresh_lease(block_name)
            )
            with lease:
                # Another process may have refreshed while this one waited for the lease.
                block = _read_block(block_name)
                if not usable(block):
                    block = _refresh(block_name, settings, mode, attempt, usable)
                    if block.expires_within(min_valid):
                        current_logger().warning(
                            "The new STAC token of block %r expires at %s, within min_valid "
                            "(%s). Raise CM_TOKEN_LIFETIME_DAYS or lower min_valid.",
                            block_name,
                            block.expires_at.isoformat(),
                            min_valid,
                        )
        with _guard:
            _cache[block_name] = cast(CarbonMapperStacToken, block)
        return cast(CarbonMapperStacToken, block).get()


def _prepare(
    block_name: str | None, min_valid: timedelta, refresh: str | None
) -> tuple[str, CarbonMapperSettings | None, str | None, RefreshMode | None]:
    """Resolve the block name; return the cached token too when it is fresh enough."""
    mode = check_refresh(refresh)
    name, settings = _resolve_name(block_name)
    cached = _cache.get(name)
    if cached is not None and not cached.expires_within(min_valid):
        return name, settings, cached.get(), mode
    settings = settings or load_settings()
    _check_min_valid(min_valid, settings)
    return name, settings, None, mode


def get_stac_token(
    block_name: str | None = None,
    *,
    min_valid: timedelta = DEFAULT_MIN_VALID,
    refresh: RefreshMode | None = None,
) -> str:
    """The Carbon Mapper STAC token, valid for at least `min_valid`: cached, re-read, or new.

    Call it wherever a token is needed (a flow, a task, a mapped task, plain Python): the
    block is read once per process while its token stays valid. When the token is missing or
    expires within `min_valid`, the refresh mode decides what happens; concurrent callers,
    in this process and in others, share one refresh:

    - `inline` (default): a new token is made here with the package's tasks (the account
      credentials come from the Secret blocks named by `CM_EMAIL_BLOCK` and
      `CM_PASSWORD_BLOCK`) and saved to the block.
    - `deployment`: a run of `CM_REFRESH_DEPLOYMENT` (default `refresh-stac-token/weekly`)
      is started with `token_block=block_name`, waited for (at most `CM_REFRESH_TIMEOUT`
      seconds) and the block read again. This process never reads a credential.
    - `off`: a `TokenBlockError` says how to refresh; nothing is called.

    Args:
        block_name: the `CarbonMapperStacToken` block; default `CM_TOKEN_BLOCK`
            (`carbon-mapper-stac-token`).
        min_valid: how long the token must stay valid from now; default 1 hour. Must be
            shorter than the lifetime of a new token (`CM_TOKEN_LIFETIME_DAYS`).
        refresh: `inline`, `deployment` or `off`; default `CM_REFRESH_MODE` (`inline`).

    Returns:
        The token, for an `Authorization: Bearer` header. Never log or return it from a task.

    Raises:
        ConfigurationError: block_name, min_valid or refresh is unusable, or the refresh
            deployment does not exist.
        TokenBlockError: the block could not be read, the new token not saved, or (mode
            `off`) the token is missing or stale.
        RefreshRunError: (mode `deployment`) the refresh run failed, crashed or was cancelled;
            `RefreshTimeoutError` when it did not finish within `CM_REFRESH_TIMEOUT`.
        CredentialsBlockError: (mode `inline`) a Secret block is missing or bad.
        CarbonMapperAPIError: (mode `inline`) the platform API failed.

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
        def ingest(hrefs: list[str]) -> None:
            download.map(hrefs).wait()
        ```
    """
    name, settings, token, mode = _prepare(block_name, min_valid, refresh)
    if token is not None:
        return token
    return _slow_path(name, settings, min_valid, None, mode)


async def aget_stac_token(
    block_name: str | None = None,
    *,
    min_valid: timedelta = DEFAULT_MIN_VALID,
    refresh: RefreshMode | None = None,
) -> str:
    """The async twin of `get_stac_token`: same cache, same lock, never blocks the event loop.

    A cached token is returned without leaving the event loop; a block read or a refresh
    (or waiting for the refresh deployment's run) happens in a worker thread. N asyncio tasks
    asking at once make at most one refresh.

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
    name, settings, token, mode = _prepare(block_name, min_valid, refresh)
    if token is not None:
        return token
    return await anyio.to_thread.run_sync(_slow_path, name, settings, min_valid, None, mode)


def renew_rejected_token(
    block_name: str | None,
    rejected: str,
    min_valid: timedelta,
    refresh: RefreshMode | None = None,
) -> str:
    """A token other than `rejected` (which the API refused): re-read the block or refresh."""
    mode = check_refresh(refresh)
    name, settings = _resolve_name(block_name)
    invalidate_token(name, rejected)
    return _slow_path(name, settings, min_valid, rejected, mode)


async def arenew_rejected_token(
    block_name: str | None,
    rejected: str,
    min_valid: timedelta,
    refresh: RefreshMode | None = None,
) -> str:
    """The async twin of `renew_rejected_token` (the work runs in a worker thread)."""
    mode = check_refresh(refresh)
    name, settings = _resolve_name(block_name)
    invalidate_token(name, rejected)
    return await anyio.to_thread.run_sync(_slow_path, name, settings, min_valid, rejected, mode)
