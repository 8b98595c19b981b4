"""`cm_tasks._token_events.Listener`: where the events stream cannot be opened, a waiter still
waits between two reads (its slow fallback) instead of asking Prefect again at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks import _token_events
from cm_tasks._token_events import Listener


def test_a_stream_that_cannot_open_still_waits_out_each_timeout() -> None:
    with (
        temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}),
        Listener("carbon-mapper.stac-token.unit-test") as events,
    ):
        started = time.monotonic()
        heard = [events.next(0.5) for _ in range(3)]
        elapsed = time.monotonic() - started

    assert heard == [None, None, None]
    assert not events.live
    # At most one early return (the moment the stream ended); the others wait their 0.5 s.
    assert elapsed >= 1.0


class _Stream:
    """One scripted `get_events_subscriber()`: opens (or fails to), yields events, breaks."""

    def __init__(self, events: list[Any] | None = None) -> None:
        self.events = events  # None: it never opens (a 503 on the upgrade)

    async def __aenter__(self) -> _Stream:
        if self.events is None:
            raise OSError("503 Service Unavailable")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def __aiter__(self) -> AsyncIterator[Any]:
        for event in self.events or []:
            yield event
        raise ConnectionError("the server closed the stream")


def _event(name: str, event_id: UUID | None = None) -> Any:
    return SimpleNamespace(
        event=name, occurred=datetime.now(timezone.utc), payload={}, id=event_id or uuid4()
    )


@dataclass
class _Script:
    """The streams a Listener will open, in order (then ones that never open), and those it did."""

    coming: list[_Stream] = field(default_factory=list)
    opened: list[_Stream] = field(default_factory=list)

    def subscriber(self, **_kwargs: object) -> _Stream:
        stream = self.coming.pop(0) if self.coming else _Stream(None)
        self.opened.append(stream)
        return stream


@pytest.fixture
def streams(monkeypatch: pytest.MonkeyPatch) -> _Script:
    script = _Script()
    monkeypatch.setattr(_token_events, "get_events_subscriber", script.subscriber)
    monkeypatch.setattr(_token_events, "prefect_api", lambda: "http://prefect.test/api")
    monkeypatch.setattr(_token_events, "REOPEN_PAUSES", (0.0,) * 6)
    return script


def _all_heard(events: Listener) -> list[str]:
    heard = []
    while (one := events.next(5.0)) is not None:
        heard.append(one.name)
    return heard


def test_a_stream_that_broke_is_opened_again_and_hears_each_event_once(
    streams: _Script,
) -> None:
    # Review lead: a burst of 503s ended the stream for good (Prefect's reconnects fail at
    # once on a 503), and waiters got the token 25-50 s late, from their fallback reads.
    first = _event("carbon-mapper.stac-token.renewal-started")
    streams.coming += [_Stream([first]), _Stream(None), _Stream([first, _event("refreshed")])]

    with Listener("carbon-mapper.stac-token.unit-test") as events:
        assert _all_heard(events) == ["carbon-mapper.stac-token.renewal-started", "refreshed"]

    assert len(streams.opened) == 7  # opened, then again at most 6 times


def test_a_stream_that_never_opened_is_not_asked_again(streams: _Script) -> None:
    # No websockets on the way (a proxy): the waiter's slow reads, not a connect every second.
    streams.coming.append(_Stream(None))
    with Listener("carbon-mapper.stac-token.unit-test") as events:
        assert _all_heard(events) == []
        assert not events.live
    assert len(streams.opened) == 1


def test_a_stream_opened_again_asks_the_waiter_to_read_once_when_the_replay_may_lack_one(
    streams: _Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: the server stores an event up to 5 s after it gets it, and replays only stored
    # ones: an outcome sent just before the reopen reached the waiter neither way, which got
    # the token at its 30-60 s read.
    monkeypatch.setattr(_token_events, "PERSIST_SECONDS", 0.05)
    monkeypatch.setattr(_token_events, "REOPEN_PAUSES", (0.0,))

    class Open(_Stream):
        """Opens, then stays open (quiet) for a while."""

        async def __aiter__(self) -> AsyncIterator[Any]:
            await asyncio.sleep(1.0)
            for event in []:
                yield event

    streams.coming += [_Stream([]), Open([])]
    with Listener("carbon-mapper.stac-token.unit-test") as events:
        started = time.monotonic()
        assert events.next(0.8) is None  # a silence, early: time to read the block once
        assert time.monotonic() - started < 0.7
        assert events.live


def test_reopening_starts_over_after_a_steady_stream(
    streams: _Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that closes an idle websocket every minute: a long wait keeps its stream.
    monkeypatch.setattr(_token_events, "STEADY_SECONDS", 0.0)  # every stream counts as steady
    streams.coming += [_Stream([]), _Stream([]), _Stream([])]
    with Listener("carbon-mapper.stac-token.unit-test") as events:
        assert _all_heard(events) == []
    assert len(streams.opened) == 3 + 6  # three steady ones, then 6 tries that never open


def test_a_silence_does_not_hide_the_events_queued_behind_it() -> None:
    # Review: the lease holder drained what it had heard with next(0.0) until None, and a
    # silence queued after a reopen ended the drain before a `renewal-failed` (one more
    # refused login).
    from cm_tasks._token_events import _LOOK, Heard

    events = Listener("carbon-mapper.stac-token.unit-test")  # not entered: nothing connects
    failed = Heard("carbon-mapper.stac-token.renewal-failed", datetime.now(timezone.utc))
    for item in (_LOOK, failed):
        events._heard.put(item)

    assert events.queued() == [failed]
    assert events.queued() == []


def test_reopening_ends_after_max_reopens_however_often_it_starts_over(
    streams: _Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: a server keeping each stream just over 20 s had it reopened until the end of
    # the wait (up to 980 s), each reopen a connect and a read.
    monkeypatch.setattr(_token_events, "STEADY_SECONDS", 0.0)  # every stream counts as steady
    monkeypatch.setattr(_token_events, "MAX_REOPENS", 5)
    streams.coming += [_Stream([]) for _ in range(20)]
    with Listener("carbon-mapper.stac-token.unit-test") as events:
        assert _all_heard(events) == []
    assert len(streams.opened) == 1 + 5
