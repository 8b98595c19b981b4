"""The renewal lease on Prefect 3.4+: short, and renewed while its holder lives.

A holder killed mid-renewal used to keep the lease for the whole refresh bound (980 s with the
defaults), and every waiter gave up just before it lapsed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

from cm_tasks import _compat, _refresh_lease
from cm_tasks._refresh_lease import LEASE_SECONDS, try_lease


@pytest.fixture
def lease(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A Prefect API whose lease calls are recorded; the keeper renews every 10 ms."""
    seen: dict[str, Any] = {"taken": [], "renewed": [], "released": 0, "lease_id": "lease-1"}
    seen["known"] = True  # what the server says of the lease
    renewed_twice = threading.Event()
    seen["renewed_twice"] = renewed_twice

    seen["client_retries"] = {"take": [], "renew": []}  # Prefect's own, when each was sent

    def take(name: str, _api: object, duration: float) -> _compat.Slot:
        seen["taken"].append(duration)
        seen["client_retries"]["take"].append(PREFECT_CLIENT_MAX_RETRIES.value())
        return _compat.Slot(name, seen["lease_id"])

    def renew(_client: object, slot: _compat.Slot, duration: float) -> bool:
        seen["renewed"].append((slot.lease_id, duration))
        seen["client_retries"]["renew"].append(PREFECT_CLIENT_MAX_RETRIES.value())
        if len(seen["renewed"]) >= 2:
            renewed_twice.set()
        return seen["known"]

    def release(_client: object, slot: _compat.Slot, _held: float) -> None:
        seen["released"] += 1
        seen["released_slot"] = slot
        seen["renewed_at_release"] = len(seen["renewed"])

    @contextmanager
    def client() -> Iterator[None]:
        yield None

    monkeypatch.setattr(_refresh_lease, "_take", take)
    monkeypatch.setattr(_compat, "release_slot", release)
    monkeypatch.setattr(_refresh_lease, "get_client", lambda **_kwargs: client())
    monkeypatch.setattr(_compat, "renew_slot", renew)
    monkeypatch.setattr(_refresh_lease, "KEEP_ALIVE_SECONDS", 0.01)
    return seen


def _keepers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cm-tasks-lease"]


def test_the_lease_is_short_and_renewed_while_its_holder_lives(lease: dict[str, Any]) -> None:
    with try_lease("block", 980.0) as held:
        assert held
        assert lease["renewed_twice"].wait(10)
    for keeper in _keepers():
        keeper.join(10)

    assert lease["taken"] == [LEASE_SECONDS]  # not the 980 s bound: a dead holder frees it soon
    assert set(lease["renewed"]) == {("lease-1", LEASE_SECONDS)}
    assert lease["released"] == 1
    assert not _keepers()  # stopped before the release: no renewal after it
    assert lease["renewed_at_release"] == len(lease["renewed"])


def test_a_holder_past_its_bound_stops_renewing(lease: dict[str, Any]) -> None:
    # A hung holder keeps the lease for the renewal's bound at most, as before.
    with try_lease("block", 0.0) as held:
        assert held
        for keeper in _keepers():
            keeper.join(10)
        assert not _keepers()
    assert lease["renewed"] == [("lease-1", LEASE_SECONDS)]  # only the check before release
    assert lease["released_slot"].lease_id == "lease-1"


def test_without_leases_nothing_is_renewed(lease: dict[str, Any]) -> None:
    lease["lease_id"] = None  # Prefect 3.2-3.3: a plain slot, held until released
    with try_lease("block", 980.0) as held:
        assert held
        assert not _keepers()
    assert lease["renewed"] == []
    assert lease["released"] == 1


def test_a_lease_the_server_lost_is_said_once_and_not_renewed_again(
    lease: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Found in review: a Prefect server restarted while a process held the lease (leases are
    # kept in memory) answered every renewal 410, which the keeper logged at debug level only.
    # Lost within LEASE_SECONDS of being taken, it cannot have lapsed: the slot, still counted
    # by the server, is given back by name.
    lease["known"] = False
    with try_lease("block", 980.0) as held:
        assert held
        for keeper in _keepers():
            keeper.join(10)  # it ends by itself
        assert not _keepers()

    assert len(lease["renewed"]) == 1
    lost = [r.getMessage() for r in caplog.records if "no longer known" in r.getMessage()]
    assert len(lost) == 1
    assert "given back by name" in lost[0]
    assert lease["released_slot"] == _compat.Slot("cm-tasks-refresh-block", None)


def test_a_server_still_down_at_release_is_asked_again_before_the_slot_is_given_back(
    lease: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Review: a server down when the holder ended (restarting) got the release by lease once
    # it was back: an unknown lease, answered 204, and its slot held for ever, unsaid.
    import httpx

    answers: list[object] = [httpx.ConnectError("refused"), False]

    def renew(_client: object, slot: _compat.Slot, duration: float) -> bool:
        lease["renewed"].append((slot.lease_id, duration))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)

    monkeypatch.setattr(_compat, "renew_slot", renew)
    monkeypatch.setattr(_refresh_lease, "RELEASE_WAITS", (0.0,))
    monkeypatch.setattr(_refresh_lease, "KEEP_ALIVE_SECONDS", 3600.0)  # only the release asks
    with try_lease("block", 980.0) as held:
        assert held

    assert answers == []
    assert lease["released"] == 1
    assert lease["released_slot"] == _compat.Slot("cm-tasks-refresh-block", None)
    said = [r.getMessage() for r in caplog.records if "given back by name" in r.getMessage()]
    assert len(said) == 1


def test_a_release_by_name_after_a_restart_is_not_sent_twice(
    lease: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Review: a by-name decrement whose answer was lost, sent again, freed the slot another
    # process had taken meanwhile (two holders).
    import httpx

    client_retries: list[int] = []

    def answer_lost() -> None:
        client_retries.append(PREFECT_CLIENT_MAX_RETRIES.value())
        raise httpx.ReadTimeout("answer lost")

    sent = _release_after_restart(lease, monkeypatch, [answer_lost])

    assert sent == [_compat.Slot("cm-tasks-refresh-block", None)]
    # Nor by Prefect's client, which would retry a lost answer by itself (review lead).
    assert client_retries == [0]
    assert "Could not release the renewal lease" in caplog.text


def test_a_release_by_lease_keeps_its_retries(
    lease: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Giving back a lease twice frees nothing more: Prefect's client may try it again.
    client_retries: list[int] = []

    def release(_client: object, slot: _compat.Slot, _held: float) -> None:
        client_retries.append(PREFECT_CLIENT_MAX_RETRIES.value())

    monkeypatch.setattr(_compat, "release_slot", release)
    with try_lease("block", 980.0) as held:
        assert held

    assert client_retries == [2]


def _release_after_restart(
    lease: dict[str, Any], monkeypatch: pytest.MonkeyPatch, answers: list[Callable[[], None]]
) -> list[_compat.Slot]:
    """Hold the lease of a server that then forgets it; each release takes the next answer
    (calls it). The slots sent to be released, in order."""
    lease["known"] = False
    sent: list[_compat.Slot] = []

    def release(_client: object, slot: _compat.Slot, _held: float) -> None:
        sent.append(slot)
        answers.pop(0)()

    monkeypatch.setattr(_compat, "release_slot", release)
    monkeypatch.setattr(_refresh_lease, "RELEASE_WAITS", (0.0, 0.0))
    with try_lease("block", 980.0) as held:
        assert held
        for keeper in _keepers():
            keeper.join(10)
    return sent


def _raises(error: Exception) -> Callable[[], None]:
    def answer() -> None:
        raise error

    return answer


def _busy_answer(status: int) -> Exception:
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    request = httpx.Request("POST", "http://prefect.test/api/v2/concurrency_limits/decrement")
    return PrefectHTTPStatusError(
        f"{status}", request=request, response=httpx.Response(status, request=request)
    )


def test_a_release_by_name_that_surely_did_nothing_is_sent_again(
    lease: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: with Prefect's retries off, one 503 (a busy SQLite database: nothing applied)
    # left the slot held for good after a restart, and every renewal of the block waited.
    answers: list[Callable[[], None]] = [_raises(_busy_answer(503)), lambda: None]

    sent = _release_after_restart(lease, monkeypatch, answers)

    assert sent == [_compat.Slot("cm-tasks-refresh-block", None)] * 2
    assert answers == []


@pytest.mark.parametrize("client_retries", [True, False])
def test_the_take_is_retried_by_prefects_client_only_when_asked_and_the_keeper_always(
    lease: dict[str, Any], client_retries: bool
) -> None:
    # Review: Prefect's own retries held a lease try 14 s after a 503 (36 s on a hung API),
    # deaf to the events stream; a renewal that tries again itself asks without them.
    with try_lease("block", 980.0, client_retries=client_retries) as held:
        assert held
        assert lease["renewed_twice"].wait(10)
    assert lease["client_retries"]["take"] == [2 if client_retries else 0]
    assert set(lease["client_retries"]["renew"]) == {2}
