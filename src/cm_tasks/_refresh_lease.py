"""One inline refresh at a time across every process that shares a Prefect API.

The per-process lock of `cm_tasks.access` stops a refresh storm inside one process; this lease
stops it across processes (30 worker processes finding the same token about to expire would
otherwise make 30 new tokens). It is a Prefect global concurrency limit of 1 per token block,
`cm-tasks-refresh-<block>`:

- It is taken on the Prefect API current when the lease is asked for (`PREFECT_API_URL`, or a
  `temporary_settings` block around the call), so a process that talks to two Prefect APIs
  serialises each API's refreshes on that API. Prefect's own `concurrency()` is not used for
  this: its acquisition service is a per-process singleton per limit name, bound to the first
  API it was used with.
- The limit is created on first use, and created again when it has gone (deleted in the UI, a
  database reset): the acquisition is then tried once more.
- How long to wait for another process's refresh, and how long a lease outlives a holder that
  died, follow from the `CM_*` retry settings: the worst-case time of one refresh (two API
  calls under `CM_MAX_ATTEMPTS`, `CM_RETRY_BACKOFF`, `CM_RETRY_AFTER_CAP` and `CM_TIMEOUT`)
  plus a margin for the Prefect reads and the save. See `refresh_time_bound`.
- Where the Prefect client or server has no leases (Prefect 3.2), the slot is taken without
  one and released when the refresh ends.
- Every failure to take the lease (the wait ran out, the Prefect API is unreachable or
  refuses) is raised as `TokenBlockError`, `transient` when trying again later may work.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL

from cm_tasks.errors import TokenBlockError
from cm_tasks.retry import RetryPolicy
from cm_tasks.settings import CarbonMapperSettings, load_settings

LEASE_PREFIX = "cm-tasks-refresh-"
LEASE_MARGIN_SECONDS = 60.0
"""Added to the worst-case API time: reading the Secret blocks, saving the token (with its
retries of 1, 2 and 4 s), the event, and the re-read under the lease."""
MIN_LEASE_SECONDS = 60.0
MAX_LEASE_SECONDS = 86400.0
"""The lease durations a Prefect server accepts."""
MIN_POLL_SECONDS = 0.5
MAX_POLL_SECONDS = 5.0
"""Shortest and longest pause between two attempts to take a lease another process holds."""
BUSY_WAITS = (0.5, 1.0, 2.0)
"""Pauses between attempts to take the lease after the Prefect API answered 5xx or 429."""
RELEASE_WAITS = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Pauses between attempts to give the slot back after a transient Prefect API error."""
CONNECT_SECONDS = 10.0
"""The connect time-out of the token client (`CarbonMapperClient`): min(CM_TIMEOUT, 10 s)."""

_logger = logging.getLogger("cm_tasks")

# Limits known to exist, and APIs known to lack leases, per Prefect API.
_ensured: set[tuple[str | None, str]] = set()
_no_leases: set[str | None] = set()
_ensured_lock = threading.Lock()


def prefect_has_leases() -> bool:
    """Whether the installed Prefect has concurrency leases (3.4 and later; not 3.2).

    Without them a slot is held until released: one refresh at a time still holds, but a
    holder killed mid-refresh keeps the slot until an operator frees it
    (`prefect gcl update cm-tasks-refresh-<block> --active-slots 0`).
    """
    return "lease_duration" in inspect.signature(concurrency).parameters


def lease_name(block_name: str) -> str:
    """The global concurrency limit that serialises refreshes of block_name."""
    return f"{LEASE_PREFIX}{block_name}"


def refresh_time_bound(settings: CarbonMapperSettings) -> float:
    """Seconds one inline refresh can take at worst under the settings, plus a margin.

    A refresh makes two API calls (`token/pair`, `account/tokens/create-stac`). Each makes up
    to `CM_MAX_ATTEMPTS` attempts; an attempt can take the connect time-out plus `CM_TIMEOUT`
    to send and again to read, and each retry first waits the longer of the backoff (with
    its jitter) and `CM_RETRY_AFTER_CAP` (a 429's `Retry-After`). With the defaults
    (4 attempts, 30 s, 1 s backoff, 60 s cap) that is 980 s.

    Example:
        ```python
        from cm_tasks import load_settings
        from cm_tasks._refresh_lease import refresh_time_bound

        print(refresh_time_bound(load_settings()))  # 980.0 with the defaults
        ```
    """
    policy = RetryPolicy(
        max_attempts=settings.max_attempts,
        backoff=settings.retry_backoff,
        retry_after_cap=settings.retry_after_cap,
    )
    attempt = min(settings.timeout, CONNECT_SECONDS) + 2 * settings.timeout
    waits = sum(
        max(
            min(policy.backoff * 2.0 ** (n - 1), policy.max_backoff) * (1 + policy.jitter),
            policy.retry_after_cap,
        )
        for n in range(1, policy.max_attempts)
    )
    one_call = policy.max_attempts * attempt + waits
    return 2 * one_call + LEASE_MARGIN_SECONDS


def _api() -> str | None:
    url = PREFECT_API_URL.value()
    return str(url).rstrip("/") if url else None


def _where(api: str | None) -> str:
    return f"the Prefect API at {api}" if api else "the local Prefect API (no PREFECT_API_URL)"


def _ensure_limit(client: SyncPrefectClient, api: str | None, name: str) -> None:
    key = (api, name)
    with _ensured_lock:
        if key in _ensured:
            return
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    except ObjectAlreadyExists:
        pass
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code != 409:  # Prefect 3.2 does not map 409 to ObjectAlreadyExists
            raise
    with _ensured_lock:
        _ensured.add(key)


def _forget_limit(api: str | None, name: str) -> None:
    with _ensured_lock:
        _ensured.discard((api, name))


def _increment(
    client: SyncPrefectClient, api: str | None, name: str, duration: float
) -> tuple[list[Any], Any]:
    """Try to take the slot once: (limits, lease id or None). 423 when someone holds it."""
    with_lease = getattr(client, "increment_concurrency_slots_with_lease", None)
    if with_lease is not None and prefect_has_leases() and api not in _no_leases:
        try:
            body = with_lease(names=[name], slots=1, mode="concurrency", lease_duration=duration)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code not in (404, 405):
                raise
            # A server older than its client (Prefect 3.2, which answers 405): no leases there.
            with _ensured_lock:
                _no_leases.add(api)
        else:
            data = body.json()
            return list(data.get("limits") or []), data.get("lease_id")
    response = client.increment_concurrency_slots(names=[name], slots=1, mode="concurrency")
    return list(response.json() or []), None


def _retry_after(response: httpx.Response) -> float:
    # At least MIN_POLL_SECONDS: the server's hint can be ~0 while the holder's refresh takes
    # a second or more, and a tight poll of many waiters loads a SQLite-backed server.
    try:
        return max(MIN_POLL_SECONDS, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _is_transient(exc: Exception) -> bool:
    return isinstance(exc, httpx.TransportError) or _busy(exc)


def _busy(exc: Exception) -> bool:
    """The Prefect API answered, but cannot serve the request now (e.g. SQLite locked)."""
    status = exc.response.status_code if isinstance(exc, PrefectHTTPStatusError) else None
    return status in (408, 429, 500, 502, 503, 504)


def _failure(exc: Exception, api: str | None, name: str, block_name: str) -> TokenBlockError:
    """The TokenBlockError for an error of the Prefect API while taking or making the lease."""
    status = exc.response.status_code if isinstance(exc, PrefectHTTPStatusError) else None
    transient = _is_transient(exc)
    hint = (
        "Check that the Prefect API is reachable (PREFECT_API_URL)."
        if transient
        else f"Check the global concurrency limit {name!r} in the Prefect UI (it must allow 1 "
        "slot), or delete it: it is created again on the next refresh."
    )
    return TokenBlockError(
        f"Could not take the refresh lease {name!r} of token block {block_name!r} on "
        f"{_where(api)} ({type(exc).__name__}{f' {status}' if status else ''}). {hint}",
        transient=transient,
    )


def _acquire(
    client: SyncPrefectClient, api: str | None, name: str, wait: float
) -> tuple[Any, float]:
    """Take the slot of limit name within wait seconds: (lease id or None, start time)."""
    deadline = time.monotonic() + wait
    duration = min(max(wait, MIN_LEASE_SECONDS), MAX_LEASE_SECONDS)
    recreated = False
    busy_waits = iter(BUSY_WAITS)
    while True:
        try:
            _ensure_limit(client, api, name)
            limits, lease_id = _increment(client, api, name, duration)
        except PrefectHTTPStatusError as exc:
            if _busy(exc) and (pause := next(busy_waits, None)) is not None:
                # A SQLite-backed server answers 500 "database is locked" when many runs
                # start at once; the next attempt usually goes through.
                time.sleep(pause)
                continue
            if exc.response.status_code != 423:
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError from None
            time.sleep(min(_retry_after(exc.response), MAX_POLL_SECONDS, remaining))
            continue
        if limits:
            return lease_id, time.monotonic()
        # No limit of that name (deleted since it was made, or the database was reset):
        # nothing was taken. Make it again and try once more.
        _forget_limit(api, name)
        if recreated:
            raise LookupError(name)
        recreated = True


def _release(api: str | None, name: str, lease_id: Any, since: float) -> None:
    """Give the slot back, trying again after transient errors (SQLite locks, restarts).

    Without leases (Prefect 3.2) a slot that is not given back stays taken: every later
    refresh of the block would wait its whole bound and fail. So a 500 from a busy SQLite
    server ("database is locked"), a 503 or a dropped connection is tried again, about 15 s
    in all, before giving up with a warning that says how to free the slot.
    """
    for wait in (*RELEASE_WAITS, None):
        try:
            with get_client(sync_client=True) as client:
                if lease_id is not None:
                    client.release_concurrency_slots_with_lease(lease_id)
                else:
                    client.release_concurrency_slots(
                        names=[name], slots=1, occupancy_seconds=time.monotonic() - since
                    )
            return
        except Exception as exc:
            if wait is not None and _is_transient(exc):
                time.sleep(wait)
                continue
            error = type(exc).__name__
            break
    # The refresh itself is done: warn, do not fail it.
    if lease_id is not None:
        _logger.warning(
            "Could not release the refresh lease %r on %s (%s); it lapses by itself.",
            name,
            _where(api),
            error,
        )
    else:
        _logger.warning(
            "Could not release the refresh slot %r on %s (%s). This Prefect has no leases, "
            "so the slot stays taken and later refreshes of the block wait for it: free it "
            "with `prefect gcl update %s --active-slots 0`.",
            name,
            _where(api),
            error,
            name,
        )


@contextmanager
def refresh_lease(
    block_name: str,
    settings: CarbonMapperSettings | None = None,
    wait_seconds: float | None = None,
) -> Iterator[None]:
    """Hold the refresh lease of block_name on the current Prefect API; others wait for it.

    Args:
        block_name: the token block being refreshed.
        settings: the retry settings the wait is derived from; default `load_settings()`.
        wait_seconds: how long to wait for the lease (and how long it outlives a holder that
            died) instead: a refresh through the deployment waits `CM_REFRESH_TIMEOUT`.

    Raises:
        TokenBlockError: the lease could not be taken in time (transient), the Prefect API
            could not be reached (transient) or refused the lease.
    """
    name = lease_name(block_name)
    wait = (
        wait_seconds
        if wait_seconds is not None
        else refresh_time_bound(settings or load_settings())
    )
    api = _api()
    failure: TokenBlockError | None = None
    try:
        with get_client(sync_client=True) as client:
            lease_id, since = _acquire(client, api, name, wait)
    except TimeoutError:
        if prefect_has_leases() and api not in _no_leases:
            hint = (
                "That refresh may be stuck: look for a hung process, or raise the wait with "
                "CM_TIMEOUT / CM_MAX_ATTEMPTS."
            )
        else:
            hint = (
                "This Prefect has no leases, so a process killed while holding it keeps it: "
                "if no process is refreshing, free it with "
                f"`prefect gcl update {name} --active-slots 0`."
            )
        failure = TokenBlockError(
            f"Waited {wait:.0f} s for another process's refresh of token block "
            f"{block_name!r} (lease {name!r} on {_where(api)}) without getting the lease. "
            f"{hint}",
            transient=True,
        )
    except LookupError:
        failure = TokenBlockError(
            f"The refresh lease {name!r} of token block {block_name!r} disappeared again "
            f"right after it was created on {_where(api)}. Check whether something deletes "
            "global concurrency limits.",
            transient=True,
        )
    except Exception as exc:
        failure = _failure(exc, api, name, block_name)
    if failure is not None:
        # Raised outside the except blocks: the Prefect error is not kept as __context__.
        raise failure
    try:
        yield
    finally:
        _release(api, name, lease_id, since)


def _reset_after_fork() -> None:
    global _ensured_lock
    _ensured_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
