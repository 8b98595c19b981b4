"""`get_stac_token()`: the STAC token for downstream code, cached per process, renewed on demand.

One call gives ingest code a token it can use right now, inside or outside a flow:

1. A token cached in this process that stays valid for `min_valid` is returned at once (a dict
   look-up: no Prefect call, no lock).
2. Otherwise the token block is read again (another process may have refreshed it).
3. If the block is missing, or its token expires within `min_valid`, the token is renewed
   the way the refresh mode says (`CM_REFRESH_MODE`, or the `refresh=` keyword). `_refresh`
   is that one step:
   - `inline` (default): with the package's own tasks (`resolve_request` + `run_refresh`:
     plain task runs inside a flow, not a subflow), saved to the block, cached and returned;
     this process reads the credential Secret blocks.
   - `deployment`: by a run of the refresh deployment (`cm_tasks._deployment_refresh`), which
     a worker of its own pool executes; this process only waits for it and re-reads the block.
   - `off`: not at all; a `TokenBlockError` says how to refresh.

The rules that keep this safe where real deployments run it:

- **Bound to its API and its Prefect.** The cache and the locks are keyed by (Prefect API URL,
  block name): a process that talks to two Prefect APIs never hands one API's token to the
  other. A token is only returned for the API its block names (`base_url`): when that is not
  the API the caller will send it to (`CM_BASE_URL`, or the `base_url` of `CarbonMapperAuth`),
  a `ConfigurationError` names both URLs, and the block is never overwritten by an inline or
  401-triggered refresh (give each API its own `CM_TOKEN_BLOCK`). Only the explicit
  `refresh-stac-token` flow replaces such a block, with a warning.
- **No refresh loops.** A new token lapses at 00:00 UTC of its expiry date, so it can have up
  to a day less than `CM_TOKEN_LIFETIME_DAYS`: `min_valid` must be shorter than that
  (lifetime - 1 day). A token created less than `RENEWAL_GRACE` ago is never replaced by
  another refresh: if it is already within `min_valid` (an API that issues shorter tokens than
  asked), it is returned with a warning.
- **Bounded renewal on a 401.** `renew_rejected_token` (used by `CarbonMapperAuth` and the
  pystac-client adapter) renews a rejected token at most once: when the block still holds
  that token and it was created less than `RENEWAL_GRACE` ago, nothing is renewed and the 401
  goes back to the caller (a fresh token that is refused is not the token's fault: an asset
  the account may not read answers 401 whatever the token).
- **Serving through a Prefect outage.** When the re-read or the refresh fails transiently
  (Prefect or the platform API unreachable, a transient API error), a cached token that has
  not expired is returned with a warning, as azure-identity does; the next attempt waits
  `OUTAGE_RETRY_SECONDS`. While such a token is cached, the re-read gets one attempt of at
  most `OUTAGE_READ_SECONDS`, so a Prefect API that hangs does not hold callers either.
- **One refresh at a time.** Steps 2 and 3 run under one lock per (Prefect API, block), so the
  threads and asyncio tasks of a process that need a refresh at the same moment share one.
  Across processes, step 3 holds a Prefect global concurrency lease per block
  (`cm_tasks._refresh_lease`) and reads the block once more after taking it.
- **Fork-safe.** A forked child starts with fresh locks (`os.register_at_fork`), so a fork
  while another thread holds one cannot leave the child waiting for ever.

The async twin `aget_stac_token` runs steps 2 and 3 in a worker thread, sharing the same lock.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from functools import lru_cache

import anyio.to_thread
import httpx
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import (
    PREFECT_API_REQUEST_TIMEOUT,
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    temporary_settings,
)

from cm_tasks import _deployment_refresh
from cm_tasks._logging import current_logger
from cm_tasks._refresh_lease import refresh_lease
from cm_tasks.blocks import CarbonMapperStacToken, load_token_block
from cm_tasks.errors import CarbonMapperError, ConfigurationError, TokenBlockError
from cm_tasks.refresh import resolve_request, run_refresh
from cm_tasks.settings import (
    CarbonMapperSettings,
    RefreshMode,
    api_identity,
    load_settings,
    validate_block_name,
    validate_refresh_mode,
)

DEFAULT_MIN_VALID = timedelta(hours=1)
"""A cached token is used only while it stays valid at least this long (1 hour)."""
RENEWAL_GRACE = timedelta(minutes=15)
"""A token created less than this long ago is not replaced: not on a 401, not for min_valid."""
OUTAGE_RETRY_SECONDS = 30.0
"""After a failed re-read or refresh, the cached token is served this long without retrying."""
OUTAGE_READ_SECONDS = 10.0
"""Longest re-read (one attempt, no client retries) while a cached token could be served: a
Prefect API that accepts connections but does not answer would otherwise hold every caller
for Prefect's request time-out times its retries (6 x 60 s by default)."""

_Key = tuple[str | None, str]  # (Prefect API URL, block name)


@dataclass
class _Entry:
    block: CarbonMapperStacToken
    retry_at: float = 0.0  # monotonic time before which a failed re-read is not tried again
    warned: bool = False  # the "within min_valid, not refreshing again" warning was logged


_cache: dict[_Key, _Entry] = {}
_locks: dict[_Key, threading.Lock] = {}
_guard = threading.Lock()
_block_reads = 0
_refreshes = 0


@dataclass(frozen=True)
class TokenCacheInfo:
    """What the process-wide token cache has done since the process started.

    Attributes:
        block_reads: how many times a token block was read from the Prefect API.
        refreshes: how many inline refreshes (new tokens) this process made.
        cached_blocks: names of the blocks whose token is cached now (for any Prefect API).
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
        names = tuple(sorted({name for _, name in _cache}))
        return TokenCacheInfo(_block_reads, _refreshes, names)


def clear_token_cache(block_name: str | None = None) -> None:
    """Forget the cached token of one block (or of all blocks when block_name is None).

    The next `get_stac_token()` reads the block again. The block's token is forgotten for
    every Prefect API this process talked to. Useful in tests.

    Example:
        ```python
        from cm_tasks import clear_token_cache

        clear_token_cache()  # the next get_stac_token() reads the block again
        ```
    """
    with _guard:
        for key in [k for k in _cache if block_name is None or k[1] == block_name]:
            del _cache[key]


def invalidate_token(block_name: str, rejected: str) -> None:
    """Drop the cached token of block_name (current Prefect API) if it is still `rejected`.

    Only that exact token is dropped: when several requests fail with the same token at once,
    the first one to refresh replaces it, and the others keep the new one.
    """
    key = _key(block_name)
    with _guard:
        entry = _cache.get(key)
        if entry is not None and entry.block.get() == rejected:
            del _cache[key]


def _prefect_api() -> str | None:
    url = PREFECT_API_URL.value()
    return str(url).rstrip("/") if url else None


def _key(block_name: str) -> _Key:
    return (_prefect_api(), block_name)


def _lock_for(key: _Key) -> threading.Lock:
    with _guard:
        return _locks.setdefault(key, threading.Lock())


@lru_cache(maxsize=64)
def _api_id(url: str) -> str:
    return api_identity(url)


def _same_api(block: CarbonMapperStacToken, api_url: str) -> bool:
    return _api_id(block.base_url) == _api_id(api_url)


def _api_mismatch(
    block_name: str, block: CarbonMapperStacToken, api_url: str
) -> ConfigurationError:
    return ConfigurationError(
        f"The token block {block_name!r} holds a token for {block.base_url}, but it was "
        f"asked for a token for {api_url} (CM_BASE_URL, or the base_url given). A token is "
        "only sent to the API it belongs to, and that block is not overwritten with another "
        "API's token. Give this API its own token block: set CM_TOKEN_BLOCK (or block_name) "
        f"to another name, e.g. {block_name}-{_host_label(api_url)}, and the next call "
        "creates it."
    )


def _host_label(url: str) -> str:
    host = api_identity(url).split("://", 1)[-1].split("/", 1)[0]
    label = "".join(c if c.isalnum() else "-" for c in host.lower()).strip("-")
    return label or "other"


def _resolve(block_name: str | None, base_url: str | None) -> tuple[str, CarbonMapperSettings, str]:
    """The block name, the settings, and the API the token will be sent to."""
    settings = load_settings()
    if block_name is None:
        name = settings.token_block
    else:
        try:
            name = validate_block_name(block_name)
        except ValueError as exc:
            raise ConfigurationError(f"block_name {block_name!r}: {exc}.") from None
    return name, settings, base_url or settings.base_url


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


class _Decision(Enum):
    USE = "use"  # the token stays valid for min_valid
    USE_JUST_MADE = "use-just-made"  # within min_valid, but just made: another would be no better
    GIVE_UP = "give-up"  # the rejected token was just made: the 401 goes back to the caller
    REFRESH = "refresh"


def _just_made(block: CarbonMapperStacToken) -> bool:
    return datetime.now(timezone.utc) - block.created_at < RENEWAL_GRACE


def _decide(
    block: CarbonMapperStacToken | None, min_valid: timedelta, rejected: str | None
) -> _Decision:
    if block is None:
        return _Decision.REFRESH
    if rejected is not None and block.get() == rejected:
        return _Decision.GIVE_UP if _just_made(block) else _Decision.REFRESH
    if not block.expires_within(min_valid):
        return _Decision.USE
    if _just_made(block) and not block.expires_within(timedelta(0)):
        return _Decision.USE_JUST_MADE
    return _Decision.REFRESH


def _read_block(block_name: str) -> CarbonMapperStacToken | None:
    """The token block as saved in Prefect, or None when there is none."""
    global _block_reads
    with _guard:
        _block_reads += 1
    failure: TokenBlockError | None = None
    try:
        return load_token_block(block_name)
    except TokenBlockError:
        raise
    except Exception as exc:
        failure = TokenBlockError(
            f"Could not read the token block {block_name!r} ({type(exc).__name__} from the "
            f"Prefect API at {_prefect_api() or 'the local Prefect API'}). Check that the "
            "Prefect API is reachable (PREFECT_API_URL).",
            transient=True,
        )
    raise failure


def _read_block_or_serve(block_name: str, servable: bool) -> CarbonMapperStacToken | None:
    """`_read_block`, bounded to `OUTAGE_READ_SECONDS` when a cached token could be served."""
    if not servable:
        return _read_block(block_name)
    timeout = min(float(PREFECT_API_REQUEST_TIMEOUT.value()), OUTAGE_READ_SECONDS)
    with temporary_settings(
        updates={PREFECT_API_REQUEST_TIMEOUT: timeout, PREFECT_CLIENT_MAX_RETRIES: 0}
    ):
        return _read_block(block_name)


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


@dataclass(frozen=True)
class _Call:
    """What one slow-path call asks for: the API, min_valid, the rejected token, the mode."""

    api_url: str
    min_valid: timedelta
    rejected: str | None
    mode: RefreshMode
    attempt: _deployment_refresh.Attempt


def _refresh(key: _Key, settings: CarbonMapperSettings, call: _Call) -> CarbonMapperStacToken:
    """The one refresh step: inline (a new token made here), or through the deployment."""
    if call.mode == "deployment":
        latest: list[CarbonMapperStacToken | None] = [None]

        def fresh() -> bool:
            block = _read_block(key[1])
            if block is not None and not _same_api(block, call.api_url):
                raise _api_mismatch(key[1], block, call.api_url)
            latest[0] = block
            return _decide(block, call.min_valid, call.rejected) is not _Decision.REFRESH

        _deployment_refresh.refresh_through_deployment(key[1], settings, call.attempt, fresh)
        assert latest[0] is not None  # fresh() returned True
        return latest[0]
    return _refresh_inline(key[1], settings)


def _refresh_inline(block_name: str, settings: CarbonMapperSettings) -> CarbonMapperStacToken:
    """Make a new token for settings.base_url and save it to block_name."""
    global _refreshes
    current_logger().info(
        "The STAC token in block %r is missing or about to expire: getting a new one.",
        block_name,
    )
    token = run_refresh(resolve_request(settings, token_block=block_name), settings)
    with _guard:
        _refreshes += 1
    return token


def _transient(exc: Exception) -> bool:
    """Whether a failed re-read or refresh may work later (Prefect or the API was down)."""
    if isinstance(exc, CarbonMapperError):
        return exc.transient
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, PrefectHTTPStatusError):
        return exc.response.status_code in (408, 429, 500, 502, 503, 504)
    return False


class _Outcome(Exception):
    """Ends the slow path early with a token (or None: give the 401 back)."""

    def __init__(self, token: str | None) -> None:
        super().__init__()
        self.token = token


def _settle(
    key: _Key,
    block: CarbonMapperStacToken | None,
    api_url: str,
    min_valid: timedelta,
    rejected: str | None,
) -> None:
    """Raise _Outcome when block answers the call; return when a refresh is needed."""
    if block is not None and not _same_api(block, api_url):
        raise _api_mismatch(key[1], block, api_url)
    decision = _decide(block, min_valid, rejected)
    if decision is _Decision.REFRESH:
        return
    assert block is not None
    entry = _Entry(block)
    if decision is _Decision.USE_JUST_MADE:
        _warn_just_made(key[1], block, min_valid)
        entry.warned = True
    with _guard:
        _cache[key] = entry
    raise _Outcome(None if decision is _Decision.GIVE_UP else block.get())


def _warn_just_made(block_name: str, block: CarbonMapperStacToken, min_valid: timedelta) -> None:
    current_logger().warning(
        "The STAC token of block %r was made at %s and expires at %s, within min_valid (%s). "
        "It is used anyway: a refresh now would not give a longer-lived token. Lower "
        "min_valid, or check the lifetime the API grants (CM_TOKEN_LIFETIME_DAYS).",
        block_name,
        block.created_at.isoformat(),
        block.expires_at.isoformat(),
        min_valid,
    )


def _serve_stale(key: _Key, entry: _Entry | None, rejected: str | None, error: Exception) -> str:
    """The cached token while it has not expired, after a transient failure; else raise."""
    if rejected is not None or entry is None or entry.block.expires_within(timedelta(0)):
        raise error
    entry.retry_at = time.monotonic() + OUTAGE_RETRY_SECONDS
    current_logger().warning(
        "Could not re-read or refresh the STAC token of block %r (%s: %s). Using the cached "
        "token, which expires at %s; trying again in %.0f s or more.",
        key[1],
        type(error).__name__,
        error if isinstance(error, CarbonMapperError) else "Prefect API error",
        entry.block.expires_at.isoformat(),
        OUTAGE_RETRY_SECONDS,
    )
    return entry.block.get()


def _slow_path(
    key: _Key,
    settings: CarbonMapperSettings,
    api_url: str,
    min_valid: timedelta,
    rejected: str | None,
    refresh: RefreshMode | None = None,
) -> str | None:
    """Re-read the block and, if need be, refresh: one thread per (Prefect API, block)."""
    call = _Call(
        api_url,
        min_valid,
        rejected,
        refresh or settings.refresh_mode,
        _deployment_refresh.Attempt.start(settings),  # before waiting for the lock
    )
    with _lock_for(key):
        with _guard:
            entry = _cache.get(key)
        if entry is not None and not _same_api(entry.block, api_url):
            entry = None  # another API's token: never served, not even through an outage
        if entry is not None:
            # Whoever held the lock before may have just done the work.
            decision = _decide(entry.block, min_valid, rejected)
            if decision is _Decision.USE:
                return entry.block.get()
            if decision is _Decision.GIVE_UP:
                return None
            if decision is _Decision.USE_JUST_MADE:
                if not entry.warned:
                    _warn_just_made(key[1], entry.block, min_valid)
                    entry.warned = True
                return entry.block.get()
            if (
                rejected is None
                and entry.retry_at > time.monotonic()
                and not entry.block.expires_within(timedelta(0))
            ):
                return entry.block.get()  # Prefect was down moments ago: do not wait on it
        failure: Exception | None = None
        try:
            servable = (
                rejected is None
                and entry is not None
                and not entry.block.expires_within(timedelta(0))
            )
            current = _read_block_or_serve(key[1], servable)
            _settle(key, current, api_url, min_valid, rejected)
            if call.mode == "off":
                raise _refresh_disabled(key[1], current, min_valid, rejected is not None)
            block = _refresh_under_lease(key, settings, call)
        except _Outcome as outcome:
            return outcome.token
        except Exception as exc:
            if not _transient(exc):
                raise
            failure = exc
        if failure is not None:
            return _serve_stale(key, entry, rejected, failure)
        with _guard:
            _cache[key] = _Entry(block)
        return block.get()


def _refresh_under_lease(
    key: _Key, settings: CarbonMapperSettings, call: _Call
) -> CarbonMapperStacToken:
    api_url, min_valid, rejected = call.api_url, call.min_valid, call.rejected
    if _api_id(settings.base_url) != _api_id(api_url):
        settings = load_settings(base_url=api_url)
    lease = (
        _deployment_refresh.lease(key[1], settings, call.attempt)
        if call.mode == "deployment"
        else refresh_lease(key[1], settings)
    )
    with lease:
        # Another process may have refreshed while this one waited for the lease.
        _settle(key, _read_block(key[1]), api_url, min_valid, rejected)
        block = _refresh(key, settings, call)
    if block.expires_within(min_valid):
        current_logger().warning(
            "The new STAC token of block %r expires at %s, within min_valid (%s). Lower "
            "min_valid or check the lifetime the API grants (CM_TOKEN_LIFETIME_DAYS); this "
            "process will not refresh it again for %s.",
            key[1],
            block.expires_at.isoformat(),
            min_valid,
            RENEWAL_GRACE,
        )
    return block


def _prepare(
    block_name: str | None, min_valid: timedelta, base_url: str | None
) -> tuple[_Key, CarbonMapperSettings, str, str | None]:
    """Resolve the call; return the cached token too when it is fresh enough."""
    name, settings, api_url = _resolve(block_name, base_url)
    key = _key(name)
    entry = _cache.get(key)
    if (
        entry is not None
        and not entry.block.expires_within(min_valid)
        and _same_api(entry.block, api_url)
    ):
        return key, settings, api_url, entry.block.get()
    _check_min_valid(min_valid, settings)
    return key, settings, api_url, None


def _get(
    block_name: str | None,
    min_valid: timedelta,
    base_url: str | None,
    refresh: str | None = None,
) -> str:
    mode = check_refresh(refresh)  # before any call
    key, settings, api_url, token = _prepare(block_name, min_valid, base_url)
    if token is not None:
        return token
    token = _slow_path(key, settings, api_url, min_valid, None, mode)
    assert token is not None  # only a renewal gives up
    return token


async def _aget(
    block_name: str | None,
    min_valid: timedelta,
    base_url: str | None,
    refresh: str | None = None,
) -> str:
    mode = check_refresh(refresh)  # before any call
    key, settings, api_url, token = _prepare(block_name, min_valid, base_url)
    if token is not None:
        return token
    token = await anyio.to_thread.run_sync(
        _slow_path, key, settings, api_url, min_valid, None, mode
    )
    assert token is not None  # only a renewal gives up
    return token


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
    this process and in others, share one refresh. The token is for the API of
    `CM_BASE_URL`; the cache is per Prefect API.

    - `inline` (default): a new token is made here with the package's tasks (the account
      credentials come from the Secret blocks named by `CM_EMAIL_BLOCK` and
      `CM_PASSWORD_BLOCK`) and saved to the block.
    - `deployment`: a run of `CM_REFRESH_DEPLOYMENT` (default `refresh-stac-token/weekly`)
      is started with `token_block=block_name`, waited for (at most `CM_REFRESH_TIMEOUT`
      seconds) and the block read again. This process never reads a credential.
    - `off`: a `TokenBlockError` says how to refresh; nothing is called.

    While the Prefect API (or the platform API) is briefly unreachable, a cached token that
    has not expired is returned with a warning instead of an error.

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
    return _get(block_name, min_valid, None, refresh)


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
    return await _aget(block_name, min_valid, None, refresh)


def token_for_api(
    block_name: str | None,
    min_valid: timedelta,
    base_url: str | None,
    refresh: RefreshMode | None = None,
) -> str:
    """`get_stac_token` for the API of base_url (default `CM_BASE_URL`), e.g. an auth's."""
    return _get(block_name, min_valid, base_url, refresh)


async def atoken_for_api(
    block_name: str | None,
    min_valid: timedelta,
    base_url: str | None,
    refresh: RefreshMode | None = None,
) -> str:
    """The async twin of `token_for_api`."""
    return await _aget(block_name, min_valid, base_url, refresh)


def _renewal(
    block_name: str | None, base_url: str | None
) -> tuple[_Key, CarbonMapperSettings, str]:
    name, settings, api_url = _resolve(block_name, base_url)
    return _key(name), settings, api_url


def renew_rejected_token(
    block_name: str | None,
    rejected: str,
    min_valid: timedelta,
    base_url: str | None = None,
    refresh: RefreshMode | None = None,
) -> str | None:
    """A token to send instead of `rejected` (which the API answered 401), or None.

    At most one renewal per token: when another request already replaced `rejected`, that
    token is returned without any I/O; when the block holds `rejected` and it was created
    less than `RENEWAL_GRACE` ago, None is returned (the 401 goes back to the caller).
    Otherwise the block is re-read and, if it still holds `rejected`, refreshed the way the
    refresh mode says.
    """
    mode = check_refresh(refresh)
    key, settings, api_url = _renewal(block_name, base_url)
    return _slow_path(key, settings, api_url, min_valid, rejected, mode)


async def arenew_rejected_token(
    block_name: str | None,
    rejected: str,
    min_valid: timedelta,
    base_url: str | None = None,
    refresh: RefreshMode | None = None,
) -> str | None:
    """The async twin of `renew_rejected_token` (the work runs in a worker thread)."""
    mode = check_refresh(refresh)
    key, settings, api_url = _renewal(block_name, base_url)
    return await anyio.to_thread.run_sync(
        _slow_path, key, settings, api_url, min_valid, rejected, mode
    )


def _reset_after_fork() -> None:
    # A fork copies the locks as they are, held ones included, but not the threads that
    # would release them: the child starts with fresh ones.
    global _guard, _locks
    _guard = threading.Lock()
    _locks = {}


os.register_at_fork(after_in_child=_reset_after_fork)
