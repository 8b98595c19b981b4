"""`cm_tasks._token_events.Listener`: where the events stream cannot be opened, a waiter still
waits between two reads (its slow fallback) instead of asking Prefect again at once."""

from __future__ import annotations

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
    monkeypatch.setattr(_token_events, "REOPEN_PAUSES", (0.0,) * 5)
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

    assert len(streams.opened) == 6  # opened, then again at most 5 times


def test_a_stream_that_never_opened_is_not_asked_again(streams: _Script) -> None:
    # No websockets on the way (a proxy): the waiter's slow reads, not a connect every second.
    streams.coming.append(_Stream(None))
    with Listener("carbon-mapper.stac-token.unit-test") as events:
        assert _all_heard(events) == []
        assert not events.live
    assert len(streams.opened) == 1
