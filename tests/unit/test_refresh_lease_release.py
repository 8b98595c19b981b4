"""Which slot a lease holder gives back: by lease, or by name after a server restart."""

from __future__ import annotations

import logging

import pytest

from cm_tasks import _compat
from cm_tasks._refresh_lease import LEASE_SECONDS, _Keeper


def _keeper(confirmed: float, lost_at: float | None) -> _Keeper:
    """A keeper whose renewals have ended (none runs): only what `slot_to_release` reads."""
    keeper = _Keeper.__new__(_Keeper)
    keeper.slot = _compat.Slot("cm-tasks-refresh-b", "lease-1")
    keeper.confirmed, keeper.lost_at, keeper.said = confirmed, lost_at, False
    return keeper


def test_a_lease_forgotten_before_it_could_lapse_is_given_back_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    slot = _keeper(100.0, 100.0 + LEASE_SECONDS - 1).slot_to_release(client=None)  # type: ignore[arg-type]
    assert slot == _compat.Slot("cm-tasks-refresh-b", None)  # a plain decrement of the limit
    assert "the server restarted" in caplog.text


def test_a_lease_that_may_have_lapsed_is_not_given_back_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server may have freed it already, and another process taken it: a decrement by name
    # would free that one's slot (two renewals at once).
    caplog.set_level(logging.WARNING)
    slot = _keeper(100.0, 100.0 + LEASE_SECONDS).slot_to_release(client=None)  # type: ignore[arg-type]
    assert slot.lease_id == "lease-1"
    assert "lease lapsed while it was out of reach" in caplog.text
