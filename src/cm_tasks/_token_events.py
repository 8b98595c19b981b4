"""Hear a renewal's outcome on Prefect's events stream instead of asking the API again.

A process that waits for another's renewal opens one websocket (`/api/events/out`, OSS servers
from Prefect 3.2) filtered on the token block's resource and reads the block once when
`carbon-mapper.stac-token.refreshed` arrives; a failed renewal announces itself with
`carbon-mapper.stac-token.renewal-failed`, whose payload says how long to wait before trying
again. The process that takes a block's renewal lease announces
`carbon-mapper.stac-token.renewal-started`, so that a process that hears it does not ask for
the lease at all. The stream sends the last minute of matching events on connect, so an
outcome that came before the socket opened is not missed, except one sent in the 5 s or so
before (the server stores events in batches, up to 5 s after it gets them). A stream that
breaks is opened again a few times (`REOPEN_PAUSES`), and the waiter then reads once for what
that gap may have held; where it cannot be opened at all (no
`PREFECT_API_URL`, a proxy without websockets) `live` is False and the waiter falls back to
slow, jittered reads (`fallback_wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from cm_tasks._prefect_calls import CALL_SECONDS, prefect_api

RENEWAL_FAILED_EVENT = "carbon-mapper.stac-token.renewal-failed"
"""Emitted by the process whose renewal of a block failed; payload: the cool-down."""
RENEWAL_STARTED_EVENT = "carbon-mapper.stac-token.renewal-started"
"""Emitted by the process that holds a block's renewal lease, before it renews the token."""
FALLBACK_SECONDS = (30.0, 60.0)
"""A waiter that hears nothing reads once somewhere in this range (jittered)."""
REOPEN_PAUSES = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Pauses (jittered down to half) before a broken stream is opened again, about a minute in
all; then the waiter falls back to its reads. They start over after a stream that stayed
open `STEADY_SECONDS`, up to `MAX_REOPENS` in all."""
STEADY_SECONDS = 20.0
"""A stream open this long (Prefect's client pings it every 20 s) was no flapping one: its
reopening starts over (a proxy that ends websockets after a while, or when idle)."""
MAX_REOPENS = 30
"""Reopens per `Listener` in all, however often they start over: the cost of a wait stays
bounded against a server that keeps each stream just long enough."""
PERSIST_SECONDS = 6.0
"""The server stores an event up to 5 s after it gets it, and only stored events are replayed
on connect: an event sent that long before a stream opened again reaches it neither way."""
_LOOK = object()  # queued PERSIST_SECONDS after a reopen: a silence (the waiter reads once)


def fallback_wait(deadline: float) -> float:
    """Seconds to listen before the next fallback read: jittered, never past deadline."""
    wait = random.uniform(*FALLBACK_SECONDS)  # noqa: S311 - jitter, not a secret
    return max(min(wait, deadline - time.monotonic()), 0.0)


@dataclass(frozen=True)
class Heard:
    """One event heard on the stream: its name, payload and when it occurred."""

    name: str
    occurred: datetime
    payload: dict[str, Any] = field(default_factory=dict)


class Listener:
    """The events of one resource, heard in a background thread while the `with` lasts."""

    def __init__(
        self,
        resource_id: str,
        *,
        name_prefix: str | None = None,
        since: datetime | None = None,
        keep_older: frozenset[str] = frozenset(),
    ) -> None:
        """Listen to resource_id's events (those whose name starts with name_prefix).

        Args:
            resource_id: the `prefect.resource.id` to hear about.
            name_prefix: only events whose name starts with this.
            since: drop events that occurred before this: the stream replays the last minute
                on connect, and an earlier renewal's outcome is not this wait's.
            keep_older: event names kept however old (a failure whose cool-down may last).
        """
        self._since, self._keep_older = since, keep_older
        self._filter = EventFilter(
            resource=EventResourceFilter(id=[resource_id]),
            event=EventNameFilter(prefix=[name_prefix]) if name_prefix else None,
        )
        self._heard: queue.Queue[Heard | object | None] = queue.Queue()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._ids: set[UUID] = set()
        self._look: asyncio.TimerHandle | None = None
        self.live = False

    def __enter__(self) -> Listener:
        if prefect_api() is not None:  # never start a temporary server just to listen
            context = contextvars.copy_context()
            threading.Thread(
                target=context.run, args=(asyncio.run, self._listen()), daemon=True
            ).start()
            self._ready.wait(CALL_SECONDS)
        return self

    def __exit__(self, *_: object) -> None:
        self._closed = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            # The stream may end (and its loop close) between the check and the call.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)

    def next(self, timeout: float) -> Heard | None:
        """The next event, or None after timeout seconds (at once when the stream just ended).

        A stream that could not be opened, or has ended, still waits out the timeout: that
        wait is the waiter's slow fallback between two reads, never a busy loop.
        """
        try:
            heard = self._heard.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if heard is None:
            self.live = False
        return heard if isinstance(heard, Heard) else None

    def queued(self) -> list[Heard]:
        """The events heard and not yet taken, without waiting (a silence is none)."""
        taken = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._heard.get_nowait()
                if item is None:
                    self.live = False
                    self._heard.put(None)  # the end stays said, for `next`
                    break
                if isinstance(item, Heard):
                    taken.append(item)
        return taken

    async def _listen(self) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            # A stream that opened and then broke (a burst of 503s from a busy server) is
            # opened again, a little later each time; one that never opened (no websockets on
            # the way) is not. The reopening is this loop's alone: Prefect's own reconnects
            # (none asked for) have no bound against a server that accepts and drops at once.
            opened_for = await self._hear()
            if opened_for is None:
                return
            pauses = iter(REOPEN_PAUSES)
            for _ in range(MAX_REOPENS):
                if opened_for is not None and opened_for >= STEADY_SECONDS:
                    pauses = iter(REOPEN_PAUSES)
                pause = next(pauses, None)
                if pause is None or self._closed:
                    return
                await asyncio.sleep(random.uniform(pause / 2, pause))  # noqa: S311 - jitter
                opened_for = await self._hear(reopened=True)
        except BaseException:  # noqa: S110 - the waiter falls back to reads; nothing to report
            pass
        finally:
            self.live = False
            self._heard.put(None)
            self._ready.set()

    async def _hear(self, reopened: bool = False) -> float | None:
        """Hear the stream until it breaks (or the listener closes): how long it was open, or
        None if it never opened."""
        opened_at = None
        try:
            async with get_events_subscriber(filter=self._filter, reconnection_attempts=0) as sub:
                opened_at = time.monotonic()
                self.live = not self._closed  # closed while connecting: leave at once
                self._ready.set()
                if self._closed:
                    return 0.0
                if reopened:  # what the replay cannot hold yet: the waiter reads once (for
                    # the last of reopens close together)
                    if self._look is not None:
                        self._look.cancel()
                    loop = asyncio.get_running_loop()
                    self._look = loop.call_later(PERSIST_SECONDS, self._heard.put, _LOOK)
                async for event in sub:
                    # A stream opened again replays the last minute: each event is heard once.
                    if self._old(event.event, event.occurred) or event.id in self._ids:
                        continue
                    self._ids.add(event.id)
                    self._heard.put(Heard(event.event, event.occurred, dict(event.payload)))
        except Exception:  # noqa: S110 - broken, or never opened: `_listen` decides
            pass
        self.live = False
        return None if opened_at is None else time.monotonic() - opened_at

    def _old(self, name: str, occurred: datetime) -> bool:
        return self._since is not None and occurred < self._since and name not in self._keep_older
