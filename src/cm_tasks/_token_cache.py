"""The process-wide token cache: one entry per (Prefect API URL, block name), and its counters.

Keyed by the Prefect API too, so a process that talks to two Prefect APIs never hands one
API's token to the other. Fork-safe: a forked child starts with a fresh lock
(`os.register_at_fork`), so a fork while another thread holds it cannot leave the child
waiting for ever.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import timedelta

from cm_tasks.blocks import CarbonMapperStacToken

Key = tuple[str | None, str]  # (Prefect API URL, block name)


@dataclass
class Entry:
    """A cached token block and what this process learnt about it."""

    block: CarbonMapperStacToken
    from_401: bool = False  # made by a renewal after a 401: a 401 on it is not renewed again
    # How each route (see `_renewal.Call.route`) last failed to renew it, and until when
    # (monotonic) its callers get that answer rather than try again.
    failures: dict[Hashable, tuple[float, Exception]] = field(default_factory=dict)
    warned: bool = False  # the "within min_valid, used anyway" warning was logged

    def servable(self) -> bool:
        """Whether the token may still be sent (it has not expired)."""
        return not self.block.expires_within(timedelta(0))

    def recent_failure(self, route: Hashable) -> Exception | None:
        """A failure of moments ago of a renewal made this route: its answer, not a new try.

        Only the same route: a deployment that does not exist is no answer to an inline caller.
        """
        until, failure = self.failures.get(route, (0.0, None))
        return failure if until > time.monotonic() and self.servable() else None

    def back_off(self, error: Exception, seconds: float, route: Hashable) -> bool:
        """Remember error for seconds; False if a failure is remembered already (said once)."""
        with _guard:
            if self.recent_failure(route) is not None:
                return False
            self.failures[route] = (time.monotonic() + seconds, error)
            return True


_entries: dict[Key, Entry] = {}
# A cool-down of a block: its monotonic end, why, and the route it holds (None: every route)
_cooling: dict[Key, tuple[float, Exception, Hashable | None]] = {}
_counters = {"block_reads": 0, "refreshes": 0}
_guard = threading.Lock()


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
        names = tuple(sorted({name for _, name in _entries}))
        return TokenCacheInfo(_counters["block_reads"], _counters["refreshes"], names)


def clear_token_cache(block_name: str | None = None) -> None:
    """Forget the cached token of one block (or of all blocks when block_name is None).

    The next `get_stac_token()` reads the block again (a cool-down after a failed renewal
    is forgotten too). The block's token is forgotten for every Prefect API this process
    talked to. Useful in tests.

    Example:
        ```python
        from cm_tasks import clear_token_cache

        clear_token_cache()  # the next get_stac_token() reads the block again
        ```
    """
    with _guard:
        for store in (_entries, _cooling):
            for key in [k for k in store if block_name is None or k[1] == block_name]:
                del store[key]


get = _entries.get
"""The cached entry of a key, if any."""


def put(key: Key, entry: Entry) -> None:
    """Cache entry under key."""
    with _guard:
        _entries[key] = entry


def cool_down(key: Key, seconds: float, error: Exception, route: Hashable | None = None) -> None:
    """Nobody in this process renews key's block for seconds; callers get error meanwhile.

    With a route, only renewals of that route (see `_renewal.Call.route`) wait.
    """
    with _guard:
        _cooling[key] = (time.monotonic() + seconds, error, route)


def cooling(key: Key, route: Hashable) -> Exception | None:
    """The error of a cool-down of key's block that holds route and still runs, if any."""
    return _cooling_of(key, route)[1]


def cooling_left(key: Key, route: Hashable) -> float:
    """Seconds left of a cool-down of key's block that holds route (0: none)."""
    return _cooling_of(key, route)[0]


def _cooling_of(key: Key, route: Hashable) -> tuple[float, Exception | None]:
    with _guard:
        until, error, held = _cooling.get(key, (0.0, None, None))
    left = until - time.monotonic()
    if (held is not None and held != route) or left <= 0:
        return 0.0, None
    return left, error


def count(*, reads: int = 0, refreshes: int = 0) -> None:
    """Add to the counters of `token_cache_info`."""
    with _guard:
        _counters["block_reads"] += reads
        _counters["refreshes"] += refreshes


def _reset_after_fork() -> None:
    global _guard
    _guard = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
