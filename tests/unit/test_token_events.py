"""`cm_tasks._token_events.Listener`: where the events stream cannot be opened, a waiter still
waits between two reads (its slow fallback) instead of asking Prefect again at once."""

from __future__ import annotations

import time

from prefect.settings import PREFECT_API_URL, temporary_settings

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
