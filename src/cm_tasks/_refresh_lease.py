"""One renewal per token block at a time, across every process that shares a Prefect API.

A Prefect global concurrency limit of 1 per block, `cm-tasks-refresh-<block>`, taken on the
current Prefect API. It is tried once, never polled: a process that finds it held hears the
holder's outcome on the events stream (`cm_tasks._token_events`). On Prefect 3.4.10+ the lease is
short (`LEASE_SECONDS`) and renewed while its holder lives, up to the refresh's time bound: a
holder that died frees it within about a minute, not at the end of the bound. See
`cm_tasks._compat` for what differs without leases (Prefect before 3.4.10).
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect.client.orchestration import SyncPrefectClient, get_client

from cm_tasks import _compat, _messages
from cm_tasks._compat import prefect_has_leases
from cm_tasks._lease_limit import lease_name
from cm_tasks._prefect_calls import (
    bounded_calls,
    not_applied,
    prefect_api,
    without_client_retries,
)
from cm_tasks.retry import RetryPolicy
from cm_tasks.settings import CarbonMapperSettings

__all__ = ["lease_name", "prefect_has_leases", "refresh_time_bound", "try_lease"]

LEASE_MARGIN_SECONDS = 60.0
"""Added to the worst-case API time: reading the Secret blocks, saving the token, the event
(and on a block's first save its renewal limit, an already-held one here: one quick 409)."""
CONNECT_SECONDS = 10.0
"""The connect time-out of the token client (`CarbonMapperClient`): min(CM_TIMEOUT, 10 s)."""
RELEASE_WAITS = (0.5, 1.0, 2.0, 4.0)
"""Pauses between attempts to give the slot back after a transient Prefect API error."""
LEASE_SECONDS = _compat.MIN_LEASE_SECONDS
"""How long the lease outlives its holder (Prefect 3.4.10+; the server frees it within 15 s
more)."""
KEEP_ALIVE_SECONDS = LEASE_SECONDS / 3
"""How often a living holder renews its lease: two renewals may fail before it lapses."""
KEEP_ALIVE_RETRY_SECONDS = 5.0
"""How soon a holder tries again after a renewal of its lease failed (the server is away)."""
KEEPER_JOIN_SECONDS = 5.0
"""Longest wait, on release, for a lease renewal in flight."""

_logger = logging.getLogger("cm_tasks")


def refresh_time_bound(settings: CarbonMapperSettings) -> float:
    """Seconds one inline refresh can take at worst under the settings, plus a margin.

    Two API calls, each up to `CM_MAX_ATTEMPTS` attempts of the connect time-out plus
    `CM_TIMEOUT` to send and again to read, with the longer of the backoff and
    `CM_RETRY_AFTER_CAP` between attempts. With the defaults that is 980 s.
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
    return 2 * (policy.max_attempts * attempt + waits) + LEASE_MARGIN_SECONDS


@contextmanager
def try_lease(block_name: str, duration: float, client_retries: bool = True) -> Iterator[bool]:
    """Try once to hold the renewal lease of block_name; yields whether this process holds it.

    Args:
        block_name: the token block to renew.
        duration: the longest a holder keeps the lease (the renewal's time bound); one that
            died loses it after `LEASE_SECONDS` (Prefect 3.4.10+).
        client_retries: whether Prefect's client retries the request after a busy answer
            (for up to 14 s after 503s, 36 s on a hung API); False for a caller that tries
            again itself, listening for news meanwhile.

    Raises:
        TokenBlockError: the Prefect API could not be reached or refused (transient when
            trying later may work).
    """
    name, api = lease_name(block_name), prefect_api()
    asked = time.monotonic()
    with (
        bounded_calls(f"take the renewal lease {name!r}") as call,
        nullcontext() if client_retries else without_client_retries(),
    ):
        slot = call(_take, name, api, LEASE_SECONDS)
    if slot is None:
        yield False
        return
    since = time.monotonic()
    keeper = _Keeper(slot, since + duration, asked) if slot.lease_id is not None else None
    try:
        yield True
    finally:
        if keeper is not None:
            keeper.stop()
        _release(slot, api, since, keeper)


class _Keeper:
    """Renews a lease every KEEP_ALIVE_SECONDS while its holder lives, up to a time bound.

    Attempts start at a fixed rate (a slow one does not push the next back), over one client
    (one CSRF token per lease, not per renewal). A lease the server no longer knows is not
    renewed again; `slot_to_release` tells a restarted server from a lapsed lease.
    """

    def __init__(self, slot: _compat.Slot, until: float, confirmed: float) -> None:
        self.slot, self.until = slot, until
        # Monotonic start of the last request that found the lease, and end of the one that
        # found it gone: the server cannot have let it lapse within LEASE_SECONDS of the first.
        self.confirmed = confirmed
        self.lost_at: float | None = None
        self.said = False  # the loss was said (once, though the release may be tried again)
        self.released = threading.Event()
        context = contextvars.copy_context()  # the holder's Prefect settings
        self.thread = threading.Thread(
            target=context.run, args=(self._run,), name="cm-tasks-lease", daemon=True
        )
        with _keepers_guard:
            _keepers.add(self)
        self.thread.start()

    def stop(self) -> None:
        """Stop renewing; wait for a renewal in flight (no renewal after the release)."""
        self.released.set()
        if self.thread is not threading.current_thread():
            self.thread.join(KEEPER_JOIN_SECONDS)
        with _keepers_guard:
            _keepers.discard(self)

    def _run(self) -> None:
        name = self.slot.name
        next_at = time.monotonic() + KEEP_ALIVE_SECONDS
        with (
            bounded_calls(f"renew the renewal lease {name!r}"),
            get_client(sync_client=True) as client,
        ):
            while not self.released.wait(max(next_at - time.monotonic(), 0.0)):
                if time.monotonic() >= self.until:
                    return
                try:
                    if not self._renew(client):
                        return
                    next_at += KEEP_ALIVE_SECONDS
                except Exception as exc:  # the next attempt may work before the lease lapses
                    # Its type only: a Prefect error's text carries its request and response.
                    _logger.debug("Renewing the lease %r failed (%s).", name, type(exc).__name__)
                    # Soon: a server that restarted meanwhile is then found out while its
                    # loss is still known to be a restart (see `slot_to_release`).
                    next_at = time.monotonic() + KEEP_ALIVE_RETRY_SECONDS

    def _renew(self, client: SyncPrefectClient) -> bool:
        """Renew the lease once; False (and `lost_at` set) if the server no longer knows it."""
        started = time.monotonic()
        if _compat.renew_slot(client, self.slot, LEASE_SECONDS):
            self.confirmed = started
            return True
        self.lost_at = time.monotonic()
        return False

    def slot_to_release(self, client: SyncPrefectClient) -> _compat.Slot:
        """The slot to give back, once renewals have stopped: by name if the server restarted.

        Leases live in the server's memory: one that restarts forgets them, but keeps counting
        their slots, and giving back an unknown lease frees nothing. So the holder asks once
        more (on the client of the release: one request more); a lease unknown within
        LEASE_SECONDS of its last renewal cannot have lapsed, and its slot, still counted, is
        this holder's to give back by name (else it is held for ever). Later than that, the
        server may have freed it already, for another to take. Raises what the request raised.
        """
        if self.lost_at is None and self._renew(client):
            return self.slot
        assert self.lost_at is not None
        forgotten = self.lost_at - self.confirmed < LEASE_SECONDS
        if not self.said:
            said = _messages.lease_forgotten if forgotten else _messages.lease_lost
            _logger.warning(said(self.slot.name, prefect_api()))
            self.said = True
        return _compat.Slot(self.slot.name, None) if forgotten else self.slot


_keepers: set[_Keeper] = set()
_keepers_guard = threading.Lock()


@atexit.register
def _stop_keepers() -> None:
    # A holder in a daemon thread may still hold its lease when the interpreter exits: a
    # keeper still inside a request then could abort the exit (seen: exit 134).
    with _keepers_guard:
        keepers = list(_keepers)
    for keeper in keepers:
        keeper.stop()


def _take(name: str, api: str | None, duration: float) -> _compat.Slot | None:
    with get_client(sync_client=True) as client:
        return _compat.take_slot(client, api, name, duration)


def _release(
    slot: _compat.Slot, api: str | None, since: float, keeper: _Keeper | None = None
) -> None:
    """Give the slot back, trying again after transient errors; warn (never fail) if not.

    With a keeper (a lease), each attempt first asks whether the server still knows the
    lease (`_Keeper.slot_to_release`), on the same client.
    """
    # A decrement by name (after a restart, with leases) is sent again only when the first
    # surely did nothing, by this loop, never by Prefect's client: one whose answer was lost
    # may have been applied, and a second could free the slot another holder has taken since.
    once = False
    for wait in (*RELEASE_WAITS, None):
        try:
            with (
                bounded_calls(f"release the renewal lease {slot.name!r}"),
                get_client(sync_client=True) as client,
            ):
                given = keeper.slot_to_release(client) if keeper is not None else slot
                once = keeper is not None and given.lease_id is None
                with without_client_retries() if once else nullcontext():
                    _compat.release_slot(client, given, time.monotonic() - since)
            return
        except Exception as exc:
            if wait is None or (once and not not_applied(exc)):
                _logger.warning(_messages.lease_not_released(slot.name, api, exc))
                return
            time.sleep(wait)
