"""The Prefect server's clock as deployment mode reads it: from the `Date` of its answers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from cm_tasks import _deployment_refresh
from cm_tasks._deployment_refresh import _ServerClock


def _answer(at: datetime) -> httpx.Response:
    return httpx.Response(200, headers={"date": format_datetime(at, usegmt=True)})


def _set_local_clock(monkeypatch: pytest.MonkeyPatch, skew: timedelta) -> None:
    monkeypatch.setattr(
        _deployment_refresh, "_local_now", lambda: datetime.now(timezone.utc) + skew
    )


def _off(clock: _ServerClock) -> float:
    return abs((clock.now() - datetime.now(timezone.utc)).total_seconds())


def test_a_machine_minutes_off_reads_the_servers_time(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_local_clock(monkeypatch, timedelta(minutes=-10))
    clock = _ServerClock()

    clock.observe(_answer(datetime.now(timezone.utc)))

    assert _off(clock) < 2  # a Date is good to the second


def test_a_step_of_this_machines_clock_during_a_call_is_not_skew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by a reviewer: a machine 10 min slow whose clock time sync corrected during the
    # call ended 599 s ahead of the server, as the largest offset seen was kept.
    _set_local_clock(monkeypatch, timedelta(minutes=-10))
    clock = _ServerClock()
    clock.observe(_answer(datetime.now(timezone.utc)))

    _set_local_clock(monkeypatch, timedelta(0))  # time sync steps the clock
    for _ in range(3):
        clock.observe(_answer(datetime.now(timezone.utc)))

    assert _off(clock) < 2


def test_no_date_leaves_this_machines_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _ServerClock()

    clock.observe(httpx.Response(200))  # a proxy that strips the header
    clock.observe(httpx.Response(200, headers={"date": "yesterday"}))

    assert _off(clock) < 2


def test_a_step_of_the_servers_clock_during_a_call_is_followed() -> None:
    # Seen in review: the largest offset was kept, so a server clock stepped back 10 min
    # mid-call left this caller 10 min ahead of it for the rest of the call.
    clock = _ServerClock()
    clock.observe(_answer(datetime.now(timezone.utc) + timedelta(minutes=10)))  # server fast

    clock.observe(_answer(datetime.now(timezone.utc)))  # time sync steps it back

    assert _off(clock) < 2
