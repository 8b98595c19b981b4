"""Issue 16: the renewal decision and the outage rule, as pure logic (no Prefect, no HTTP)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone

import pytest

from cm_tasks import _renewal, _token_cache
from cm_tasks._prefect_calls import is_transient
from cm_tasks._renewal import Action, Call, Flight, Outcome, _RideOut, decide
from cm_tasks.blocks import CarbonMapperStacToken
from cm_tasks.client import CREATE_STAC_PATH as CREATE
from cm_tasks.errors import (
    APIUnavailableError,
    BadCredentialsError,
    ConfigurationError,
    CredentialsBlockError,
    PermissionDeniedError,
    RefreshRunError,
    TokenBlockError,
)
from cm_tasks.settings import load_settings
from tests.support.streams import ScriptedStream

API = "https://api.example/api/v1/"


def _block(token: str, left: timedelta, made_ago: timedelta) -> CarbonMapperStacToken:
    now = datetime.now(timezone.utc)
    return CarbonMapperStacToken(
        token=token,  # type: ignore[arg-type]
        name="t",
        expires_at=now + left,
        created_at=now - made_ago,
        base_url=API,
    )


def _call(rejected: str | None = None, mode: str = "inline") -> Call:
    key = ("http://prefect.test/api", "unit-block")
    return Call(key, load_settings(), API, timedelta(hours=1), rejected, mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("made_ago", [timedelta(days=3), timedelta(0), -timedelta(minutes=10)])
def test_a_rejected_token_is_renewed_once_whenever_it_was_made(made_ago: timedelta) -> None:
    # Case 13: created_at (even in the future) no longer decides; the token's history does.
    block = _block("t1", timedelta(days=10), made_ago)
    assert decide(block, _call(rejected="t1")) is Action.RENEW
    assert decide(block, _call(rejected="t1"), from_401=True) is Action.GIVE_UP
    assert decide(block, _call(rejected="t0")) is Action.USE  # already replaced


def test_off_mode_gives_every_401_back() -> None:
    # Case 11: off never renews, so a 401 is the caller's, whatever the token's age.
    block = _block("t1", timedelta(days=10), timedelta(minutes=20))
    assert decide(block, _call(rejected="t1", mode="off")) is Action.GIVE_UP


def _drive(call: Call, outcome: Outcome) -> str | None:
    """Run the steps of call with a flight that ends with outcome."""
    steps = _renewal.steps(call)
    try:
        next(steps)
        steps.send(outcome)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("steps asked for a second flight")


def _cache_a_valid_token(call: Call) -> None:
    """Token "c", 50 minutes left (within min_valid), made a day ago."""
    entry = _token_cache.Entry(_block("c", timedelta(minutes=50), timedelta(days=1)))
    _token_cache.put(call.key, entry)


@pytest.fixture
def one_finished_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_renewal, "_flight_for", lambda call: Flight(call))
    _token_cache.clear_token_cache()


@pytest.mark.usefixtures("one_finished_flight")
def test_any_failed_renewal_serves_a_valid_cached_token_in_every_mode() -> None:
    # Case 5: a failed refresh run (not transient) used to fail every deployment-mode call
    # although the cached token had 50 minutes left.
    for mode in ("inline", "deployment"):
        call = _call(mode=mode)
        _token_cache.put(
            call.key, _token_cache.Entry(_block("c", timedelta(minutes=50), timedelta(days=1)))
        )
        failed = RefreshRunError("run failed", flow_run_name="r", transient=False)
        assert _drive(call, Outcome(error=failed)) == "c"
        _token_cache.clear_token_cache()


@pytest.mark.usefixtures("one_finished_flight")
def test_a_configuration_error_is_never_served_over() -> None:
    call = _call()
    _token_cache.put(
        call.key, _token_cache.Entry(_block("c", timedelta(minutes=50), timedelta(days=1)))
    )
    with pytest.raises(ConfigurationError):
        _drive(call, Outcome(error=ConfigurationError("another API")))


@pytest.mark.parametrize(
    ("occurred_ago", "retry_after", "counts"),
    [
        (timedelta(seconds=-1), 0.0, True),  # during this wait: its outcome
        (timedelta(minutes=5), 0.0, False),  # an earlier renewal's failure, replayed on connect
        (timedelta(seconds=20), 60.0, True),  # earlier, but its cool-down still runs
        (timedelta(minutes=5), 60.0, False),  # earlier, and cooled down
    ],
)
def test_a_replayed_failure_counts_only_while_it_cools_down(
    occurred_ago: timedelta, retry_after: float, counts: bool
) -> None:
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT, Heard

    now = datetime.now(timezone.utc)
    heard = Heard(
        RENEWAL_FAILED_EVENT,
        now - occurred_ago,
        {"error": "APIUnavailableError", "retry_after": retry_after, "transient": True},
    )
    failure = _renewal._their_failure(_call(), heard, since=now - timedelta(seconds=2))
    assert (failure is not None) is counts
    _token_cache.clear_token_cache()


def test_a_failure_from_a_clock_ahead_of_ours_cools_down_no_longer_than_it_said() -> None:
    # Seen in review: an emitter 10 minutes ahead made its 60 s cool-down last 11 minutes here.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT, Heard

    now = datetime.now(timezone.utc)
    heard = Heard(
        RENEWAL_FAILED_EVENT,
        now + timedelta(minutes=10),
        {"error": "APIUnavailableError", "retry_after": 60.0, "transient": True},
    )
    call = _call()
    assert _renewal._their_failure(call, heard, since=now - timedelta(seconds=2)) is not None
    until, _error, _route = _token_cache._cooling[call.key]
    assert until - time.monotonic() <= 60.0
    _token_cache.clear_token_cache()


def test_each_refresh_route_keeps_its_own_failure() -> None:
    # Found by a reviewer: inline and deployment calls alternating during an outage each
    # overwrote the other's failure, so neither backed off: every call renewed again.
    entry = _token_cache.Entry(_block("c", timedelta(minutes=50), timedelta(days=1)))
    inline, deployment = _call().route, _call(mode="deployment").route

    assert entry.back_off(RuntimeError("platform down"), 30.0, inline)
    assert entry.back_off(RuntimeError("run failed"), 30.0, deployment)

    assert str(entry.recent_failure(inline)) == "platform down"
    assert str(entry.recent_failure(deployment)) == "run failed"
    assert not entry.back_off(RuntimeError("again"), 30.0, inline)  # said once


def test_a_joined_renewals_configuration_error_is_remembered_for_its_route_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by a reviewer: an inline caller that joined a deployment-mode renewal got its
    # ConfigurationError (no such deployment), and inline callers got it for 30 s more.
    deployment_call, inline_call = _call(mode="deployment"), _call()
    monkeypatch.setattr(_renewal, "_flight_for", lambda call: Flight(deployment_call))
    _token_cache.clear_token_cache()
    _cache_a_valid_token(inline_call)

    with pytest.raises(ConfigurationError):
        _drive(inline_call, Outcome(error=ConfigurationError("no such deployment")))

    entry = _token_cache.get(inline_call.key)
    assert entry is not None
    assert entry.recent_failure(inline_call.route) is None
    assert isinstance(entry.recent_failure(deployment_call.route), ConfigurationError)
    _token_cache.clear_token_cache()


def test_refused_credentials_hold_this_process_and_route_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by a reviewer: announced to every process, the hold made processes started after
    # `cm-tasks login` fixed the password replay the refusal for 60 s, while one of them had
    # already renewed the block with the fixed one.

    announced: list[dict[str, object]] = []
    monkeypatch.setattr(_renewal, "emit_event", lambda *_a, **kw: announced.append(kw["payload"]))
    refused = BadCredentialsError("401 from token/pair.", status_code=401, endpoint="token/pair")
    inline, deployment = _call(), _call(mode="deployment")

    _renewal._announce_failure(inline, refused)

    [payload] = announced
    assert payload["retry_after"] == 0.0  # other processes do not wait for this one's login
    held = _token_cache.cooling(inline.key, inline.route)
    assert isinstance(held, BadCredentialsError)
    assert (held.status_code, held.endpoint) == (401, "token/pair")
    assert str(held).startswith("401 from token/pair. Until 60 s after that refusal")
    assert _token_cache.cooling(deployment.key, deployment.route) is None  # its own credentials
    _token_cache.clear_token_cache()
    assert _token_cache.cooling(inline.key, inline.route) is None  # the documented way out


@pytest.fixture
def lease_asks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every try of the renewal lease (always held by another process); reads are scripted."""
    from contextlib import contextmanager

    asks: list[str] = []

    @contextmanager
    def held_elsewhere(block_name: str, _duration: float, **_options: object) -> Iterator[bool]:
        asks.append(block_name)
        yield False

    monkeypatch.setattr(_renewal, "try_lease", held_elsewhere)
    _token_cache.clear_token_cache()
    return asks


def _script(monkeypatch: pytest.MonkeyPatch, heard: list[object], reads: list[object]) -> None:
    monkeypatch.setattr(_renewal, "Listener", ScriptedStream(heard))
    monkeypatch.setattr(_renewal, "_read", lambda call: reads.pop(0))


def _event(
    name: str, retry_after: float = 0.0, ago: float = -1.0, error: str = "APIUnavailableError"
) -> object:
    """An event heard on the stream; by default, one that occurs during the renewal."""
    from cm_tasks._token_events import Heard

    occurred = datetime.now(timezone.utc) - timedelta(seconds=ago)
    return Heard(name, occurred, {"error": error, "retry_after": retry_after})


STALE = _block("old", timedelta(minutes=20), timedelta(days=13))
FRESH = _block("new", timedelta(days=14), timedelta(0))


def test_a_process_that_hears_the_renewal_start_does_not_ask_for_the_lease(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str]
) -> None:
    # The fleet's cost: 12 processes that found the token stale together each asked for the
    # lease (a CSRF token and a POST, and on SQLite often a 503 retried 2 s later).
    from cm_tasks._token_events import RENEWAL_STARTED_EVENT
    from cm_tasks.notify import REFRESHED_EVENT

    reads = [STALE, FRESH]
    _script(monkeypatch, [_event(RENEWAL_STARTED_EVENT), _event(REFRESHED_EVENT)], reads)

    outcome = _renewal._renew(_call())

    assert outcome.block is FRESH
    assert lease_asks == []
    assert reads == []  # one read before, one on the refreshed event


def test_a_process_that_hears_nothing_asks_for_the_lease_once(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str]
) -> None:
    from cm_tasks.notify import REFRESHED_EVENT

    _script(monkeypatch, [None, _event(REFRESHED_EVENT)], [STALE, FRESH])

    assert _renewal._renew(_call()).block is FRESH
    assert lease_asks == ["unit-block"]


@pytest.mark.parametrize(("retry_after", "asks"), [(0.0, 1), (60.0, 0)])
def test_before_asking_only_a_failure_that_cools_the_block_down_counts(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str], retry_after: float, asks: int
) -> None:
    # A failure announced just before this renewal read the block (this process's own, before
    # `clear_token_cache()`) is not this renewal's outcome; a cool-down is everyone's.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT
    from cm_tasks.notify import REFRESHED_EVENT

    failed = _event(RENEWAL_FAILED_EVENT, retry_after, ago=1.0)
    _script(monkeypatch, [failed, _event(REFRESHED_EVENT)], [STALE, FRESH])

    outcome = _renewal._renew(_call())

    assert len(lease_asks) == asks
    assert (outcome.error is not None) is (asks == 0)
    _token_cache.clear_token_cache()


def test_the_lease_holder_announces_the_renewal_before_it_renews(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cm_tasks._token_events import RENEWAL_STARTED_EVENT

    said: list[str] = []
    monkeypatch.setattr(_renewal, "emit_event", lambda name, **_kw: said.append(name))
    monkeypatch.setattr(_renewal, "_read", lambda call: STALE)
    monkeypatch.setattr(_renewal, "_mint", lambda call: said.append("minted") or FRESH)

    assert _renewal._renew_holding_lease(_call()).block is FRESH
    assert said == [RENEWAL_STARTED_EVENT, "minted"]


@pytest.mark.usefixtures("one_finished_flight")
def test_serving_through_a_longer_cool_down_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Found in review: during the 60 s hold after refused credentials, the "using the cached
    # token; trying again in 30 s" warning came again 30 s in, and the hold was not over.

    call = _call()
    _cache_a_valid_token(call)
    refused = BadCredentialsError("401 from token/pair.", status_code=401, endpoint="token/pair")
    _token_cache.cool_down(call.key, 60.0, refused, call.route)
    start = time.monotonic()

    assert _drive(call, Outcome()) == "c"
    monkeypatch.setattr(time, "monotonic", lambda: start + 31.0)
    assert _drive(call, Outcome()) == "c"

    warnings = [
        r.getMessage() for r in caplog.records if "Using the cached token" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "trying again in 60 s or more" in warnings[0]
    _token_cache.clear_token_cache()


def test_a_renewal_that_started_before_the_read_does_not_stop_this_one_asking(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str]
) -> None:
    # The stream replays the last minute: a renewal that started a second before this one
    # read the block may have ended before it too (this process's own, failed, before
    # `clear_token_cache()`): this one still asks for the lease.
    from cm_tasks._token_events import RENEWAL_STARTED_EVENT
    from cm_tasks.notify import REFRESHED_EVENT

    replayed = _event(RENEWAL_STARTED_EVENT, ago=1.0)
    _script(monkeypatch, [replayed, _event(REFRESHED_EVENT)], [STALE, FRESH])

    assert _renewal._renew(_call()).block is FRESH
    assert lease_asks == ["unit-block"]


@pytest.mark.parametrize(("ago", "held"), [(-1.0, True), (5.0, False)])
def test_a_refused_login_heard_while_waiting_holds_this_process_too(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str], ago: float, held: bool
) -> None:
    # Found in review: a process that heard another's refused login backed off 30 s, then
    # made its own failed login and warned again: two warnings and logins a minute, not one.
    # A refusal replayed from before this wait (the password may be fixed since) holds nothing.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT

    call = _call()
    refused = _event(RENEWAL_FAILED_EVENT, ago=ago, error="BadCredentialsError")
    heard: list[object] = [None, refused] if held else [refused, None]
    _script(monkeypatch, heard, [STALE] if held else [STALE, STALE])
    if not held:  # the replay is no outcome: the wait ends at its (here: immediate) deadline
        monkeypatch.setattr(_renewal, "_bound", lambda call: 0.0)

    outcome = _renewal._renew(call)

    assert ("BadCredentialsError" in str(outcome.error)) is held
    assert (_token_cache.cooling_left(call.key, call.route) > 55.0) is held
    _token_cache.clear_token_cache()


def test_a_cool_down_heard_late_says_what_is_left_of_it(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str]
) -> None:
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT

    _script(monkeypatch, [_event(RENEWAL_FAILED_EVENT, 60.0, ago=15.0)], [STALE])

    outcome = _renewal._renew(_call())

    assert "for 45 s" in str(outcome.error)
    _token_cache.clear_token_cache()


@pytest.mark.parametrize(
    ("raised", "heard_as"),
    [
        (BadCredentialsError("401", status_code=401, endpoint="token/pair"), BadCredentialsError),
        (PermissionDeniedError("403", status_code=403, endpoint=CREATE), PermissionDeniedError),
        (APIUnavailableError("503", status_code=503, endpoint=CREATE), APIUnavailableError),
        (CredentialsBlockError("no block 'cm-password'"), CredentialsBlockError),
        (ConfigurationError("CM_TOKEN_LIFETIME_DAYS: 0"), TokenBlockError),
    ],
)
def test_a_heard_failure_of_the_platform_keeps_its_kind(
    monkeypatch: pytest.MonkeyPatch, raised: Exception, heard_as: type[Exception]
) -> None:
    # Found in review: a process that heard another's refused login gave its callers a
    # TokenBlockError, so a handler for BadCredentialsError (get_stac_token's Raises) saw the
    # refusal only in the process that logged in.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT, Heard

    announced: list[dict[str, object]] = []
    monkeypatch.setattr(_renewal, "emit_event", lambda event, **kw: announced.append(kw["payload"]))
    call = _call()
    _renewal._announce_failure(call, raised)
    _token_cache.clear_token_cache()  # the announcer's own hold is not what this test hears
    heard = Heard(RENEWAL_FAILED_EVENT, datetime.now(timezone.utc), announced[0])

    failure = _renewal._their_failure(call, heard, since=heard.occurred - timedelta(seconds=2))

    assert type(failure) is heard_as
    assert failure.transient is is_transient(raised)
    assert getattr(failure, "status_code", None) == getattr(raised, "status_code", None)
    assert getattr(failure, "endpoint", None) == getattr(raised, "endpoint", None)
    assert "Another process's renewal" in str(failure)
    _token_cache.clear_token_cache()


def test_a_refusal_from_an_older_cm_tasks_still_says_401_from_token_pair() -> None:
    # Found in review: an event without status_code and endpoint (cm-tasks before they were
    # sent, in a fleet being upgraded) gave a BadCredentialsError with neither.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT, Heard

    now = datetime.now(timezone.utc)
    payload = {"error": "BadCredentialsError", "retry_after": 0.0, "transient": False}
    heard = Heard(RENEWAL_FAILED_EVENT, now, payload)

    failure = _renewal._their_failure(_call(), heard, since=now - timedelta(seconds=2))

    assert isinstance(failure, BadCredentialsError)
    assert (failure.status_code, failure.endpoint) == (401, "token/pair")
    _token_cache.clear_token_cache()


@pytest.mark.parametrize(("retry_after", "counts"), [(0.0, False), (60.0, True)])
def test_another_refresh_modes_failure_is_not_this_waits_unless_it_cools_down(
    retry_after: float, counts: bool
) -> None:
    # Found in review: a deployment-mode process, which never reads a credential, got a
    # BadCredentialsError and held its renewals for 60 s after an inline process's refused
    # login. A create-stac whose token may exist holds every mode.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT, Heard

    now = datetime.now(timezone.utc)
    payload = {"mode": "inline", "error": "BadCredentialsError", "retry_after": retry_after}
    heard = Heard(RENEWAL_FAILED_EVENT, now, payload)
    call = _call(mode="deployment")

    failure = _renewal._their_failure(call, heard, since=now - timedelta(seconds=2))

    assert (failure is not None) is counts
    assert (_token_cache.cooling_left(call.key, call.route) > 0) is counts
    _token_cache.clear_token_cache()


def test_a_refusal_heard_before_asking_but_after_the_read_ends_the_wait(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str]
) -> None:
    # Found in review: a process heard, in its listen before asking for the lease, a refusal
    # that came after its read, took it for an earlier renewal's, and logged in again: two
    # failed logins within a second. Now it is the wait's outcome, and this process holds.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT

    call = _call()
    _script(monkeypatch, [_event(RENEWAL_FAILED_EVENT, error="BadCredentialsError")], [STALE])

    outcome = _renewal._renew(call)

    assert isinstance(outcome.error, BadCredentialsError)
    assert lease_asks == []
    assert _token_cache.cooling_left(call.key, call.route) > 55.0
    _until, held, _route = _token_cache._cooling[call.key]
    assert "clear_token_cache()" in str(held)  # the callers during the hold are told why
    _token_cache.clear_token_cache()


def test_a_failure_heard_while_asking_for_the_lease_is_the_outcome_not_a_cue_to_renew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found in review: a process whose lease request was in flight when the holder's login was
    # refused got the lease next, and logged in again: two refused logins for one refusal.
    from contextlib import contextmanager

    from cm_tasks._token_events import RENEWAL_FAILED_EVENT

    @contextmanager
    def free(block_name: str, _duration: float, **_options: object) -> Iterator[bool]:
        yield True  # the holder released it after announcing its failure

    said: list[str] = []
    monkeypatch.setattr(_renewal, "try_lease", free)
    monkeypatch.setattr(_renewal, "emit_event", lambda name, **_kw: said.append(name))
    monkeypatch.setattr(_renewal, "_mint", lambda call: said.append("minted") or FRESH)
    refused = _event(RENEWAL_FAILED_EVENT, error="BadCredentialsError")
    _script(monkeypatch, [None, refused], [STALE])  # heard while the lease was asked for

    outcome = _renewal._renew(_call())

    assert isinstance(outcome.error, BadCredentialsError)
    assert said == []  # neither announced nor minted
    _token_cache.clear_token_cache()


@pytest.mark.parametrize("own", [True, False])
def test_this_processs_own_failure_from_before_the_read_is_not_this_waits(
    monkeypatch: pytest.MonkeyPatch, lease_asks: list[str], own: bool
) -> None:
    # Found in review: a process refused a moment ago, whose password was then fixed and its
    # cache cleared, could hear its own refusal replayed (inside the slack kept for other
    # hosts' clocks), get it back, and hold its logins for 60 s.
    from cm_tasks._token_events import RENEWAL_FAILED_EVENT

    refused = _event(RENEWAL_FAILED_EVENT, ago=0.5, error="BadCredentialsError")
    refused.payload["process"] = _renewal._process if own else "another-process"  # type: ignore[attr-defined]
    _script(monkeypatch, [None, refused], [STALE])
    if own:  # no outcome: the wait ends at its (here: immediate) deadline
        monkeypatch.setattr(_renewal, "_bound", lambda call: 0.0)
        monkeypatch.setattr(_renewal, "_read", lambda call: STALE)

    outcome = _renewal._renew(_call())

    assert isinstance(outcome.error, BadCredentialsError) is not own
    _token_cache.clear_token_cache()


def test_a_heard_refresh_timeout_stays_a_refresh_timeout() -> None:
    from cm_tasks.errors import RefreshTimeoutError

    payload = {"error": "RefreshTimeoutError", "flow_run_name": "brave-cat", "flow_run_id": "1"}

    error = _renewal._heard_error(payload, "the run did not finish")

    assert type(error) is RefreshTimeoutError
    assert error.flow_run_name == "brave-cat"  # type: ignore[attr-defined]


@pytest.fixture
def read_attempts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The outcomes of `_read`'s requests, in order (an exception is raised); pauses of 0 s."""
    outcomes: list[object] = []

    def read_once(call: Call) -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(_renewal, "_read_once", read_once)
    monkeypatch.setattr(_renewal, "RIDE_OUT_PAUSES", (0.0,))
    _token_cache.clear_token_cache()
    return outcomes


def _busy() -> TokenBlockError:
    return TokenBlockError("Could not read the token block (ReadTimeout ...)", transient=True)


def test_a_renewal_with_nothing_to_serve_rides_out_a_busy_prefect_api(
    read_attempts: list[object],
) -> None:
    # CI, Prefect 3.2 under load: one block read timed out three times in a row (30 s) and
    # all 8 tasks of a fresh ingest process failed, while the refresh run had succeeded.
    read_attempts.extend([_busy(), _busy(), FRESH])
    assert _renewal._read(_call()) is FRESH
    assert read_attempts == []


def test_a_renewal_with_a_token_to_serve_fails_at_once_and_serves_it(
    read_attempts: list[object],
) -> None:
    call = _call()
    _cache_a_valid_token(call)
    read_attempts.extend([_busy(), FRESH])
    with pytest.raises(TokenBlockError):
        _renewal._read(call)
    assert read_attempts == [FRESH]  # one request per outage: the callers are served


@pytest.mark.parametrize(
    "failure",
    [
        TokenBlockError("403 from the Prefect API", transient=False, status_code=403),
        # A rate-limited Prefect account: more requests only prolong the limit (review: a
        # 429 tried again sent 12 requests a minute per fresh process instead of 3).
        TokenBlockError("429 from the Prefect API", transient=True, status_code=429),
    ],
)
def test_a_failure_that_trying_again_cannot_help_is_not_tried_again(
    read_attempts: list[object], failure: TokenBlockError, caplog: pytest.LogCaptureFixture
) -> None:
    read_attempts.extend([failure, FRESH])
    with pytest.raises(TokenBlockError) as err:
        _renewal._read(_call())
    assert err.value is failure
    assert read_attempts == [FRESH]
    assert "trying again" not in caplog.text


def test_riding_out_is_said_once(
    read_attempts: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    # Review: a fresh caller waited up to 80 s with nothing in the log.
    read_attempts.extend([_busy(), _busy(), _busy(), FRESH])
    assert _renewal._read(_call()) is FRESH
    said = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(said) == 1
    assert "No token is cached to serve meanwhile" in said[0]


def _lease_tries(monkeypatch: pytest.MonkeyPatch, *answers: object) -> list[float]:
    """try_lease replaced: each try takes the next answer (an exception is raised, a bool is
    whether the lease is held), the last one again and again; the times of the tries."""
    from contextlib import contextmanager

    tries: list[float] = []

    @contextmanager
    def scripted(_block_name: str, _duration: float, **_options: object) -> Iterator[bool]:
        tries.append(time.monotonic())
        answer = answers[min(len(tries), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        yield bool(answer)

    monkeypatch.setattr(_renewal, "try_lease", scripted)
    monkeypatch.setattr(_renewal, "RIDE_OUT_PAUSES", (0.0,))
    _token_cache.clear_token_cache()
    return tries


def _error_of(call: Call) -> Exception:
    """The error a renewal ends with: raised (the flight makes it the outcome) or returned."""
    try:
        outcome = _renewal._renew(call)
    except TokenBlockError as exc:
        return exc
    assert outcome.error is not None, "the renewal did not fail"
    return outcome.error


class _Trickle(ScriptedStream):
    """An unrelated event every 10 ms (of a listen long enough), for ever."""

    def next(self, timeout: float) -> object:
        if timeout < 0.01:
            return None
        time.sleep(0.01)
        return _event("carbon-mapper.stac-token.expiring")


EXPIRED = _block("old", -timedelta(minutes=1), timedelta(days=14))  # nothing to serve
RATE_LIMITED = TokenBlockError(
    "429 from the Prefect API", transient=True, status_code=429, retry_after=0.0
)


def test_a_busy_prefect_api_does_not_fail_the_lease_try_of_a_renewal_with_nothing_to_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review: with only the lease endpoint answering 503, a fresh process failed in 15 s.
    from cm_tasks.notify import REFRESHED_EVENT

    tries = _lease_tries(monkeypatch, _busy(), False)  # then held by another, which renews
    # Heard: nothing before asking, nothing during the pause, then the holder's `refreshed`.
    _script(monkeypatch, [None, None, _event(REFRESHED_EVENT)], [EXPIRED, FRESH])

    assert _renewal._renew(_call()).block is FRESH
    assert len(tries) == 2


def test_an_outcome_heard_between_two_lease_tries_ends_the_asking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review: a process trying the lease again through 503s ignored the `refreshed` it heard
    # meanwhile, and got its token at 30 s instead of about 2 s.
    from cm_tasks.notify import REFRESHED_EVENT

    tries = _lease_tries(monkeypatch, _busy())
    # Heard: nothing before asking, then the other process's `refreshed` during the pause.
    _script(monkeypatch, [None, _event(REFRESHED_EVENT)], [EXPIRED, FRESH])

    assert _renewal._renew(_call()).block is FRESH
    assert len(tries) == 1  # not asked again once the answer was heard


@pytest.mark.parametrize("servable", [True, False])
def test_a_lease_try_is_retried_by_the_renewal_or_by_prefects_client_never_both(
    monkeypatch: pytest.MonkeyPatch, servable: bool
) -> None:
    from contextlib import contextmanager

    asked: list[bool] = []

    @contextmanager
    def held_elsewhere(_block_name: str, _duration: float, client_retries: bool) -> Iterator[bool]:
        asked.append(client_retries)
        yield False

    monkeypatch.setattr(_renewal, "try_lease", held_elsewhere)
    monkeypatch.setattr(_renewal, "_servable", lambda call: servable)
    call = _call()
    with ExitStack() as lease:
        held, _ = _renewal._ask_for_lease(call, lease, ScriptedStream([]), 10.0, _RideOut(call))
    assert not held
    # A token to serve: one try per outage, which Prefect's client may repeat. None: the
    # renewal asks again itself, listening between its tries.
    assert asked == [servable]


def test_news_between_busy_lease_tries_never_carries_a_renewal_past_its_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Review: each event heard between two tries skipped the bound's check and started a new
    # ride-out (and its warning): a lease endpoint answering 503 and an event every 4 s kept
    # a renewal bounded at 20 s going past 90 s.
    _lease_tries(monkeypatch, _busy())
    monkeypatch.setattr(_renewal, "_bound", lambda call: 0.5)
    monkeypatch.setattr(_renewal, "RIDE_OUT_PAUSES", (0.05,))
    monkeypatch.setattr(_renewal, "Listener", _Trickle([]))
    monkeypatch.setattr(_renewal, "_read", lambda call: EXPIRED)

    started = time.monotonic()
    assert isinstance(_error_of(_call()), TokenBlockError)  # busy, or waited its whole bound

    assert time.monotonic() - started < 5.0  # the bound (0.5 s), not for ever
    said = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert len(said) == 1


def test_a_rate_limited_lease_try_is_tried_again_twice_as_prefects_client_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review: the lease try goes without Prefect's client retries (which tried a 429 twice),
    # and the ride-out never tried a 429: one 429 failed a fresh process's renewal.
    from cm_tasks.notify import REFRESHED_EVENT

    tries = _lease_tries(monkeypatch, RATE_LIMITED, RATE_LIMITED, False)
    _script(monkeypatch, [None, None, None, _event(REFRESHED_EVENT)], [EXPIRED, FRESH])

    assert _renewal._renew(_call()).block is FRESH
    assert len(tries) == 3


def test_a_third_429_on_the_lease_is_the_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    tries = _lease_tries(monkeypatch, RATE_LIMITED)
    _script(monkeypatch, [None, None, None], [EXPIRED])

    with pytest.raises(TokenBlockError, match="429"):
        _renewal._renew(_call())
    assert len(tries) == 3


class _Silent(ScriptedStream):
    """A live stream on which nothing happens: each listen waits its whole time."""

    def next(self, timeout: float) -> object:
        time.sleep(timeout)
        return None


@pytest.mark.parametrize(("retry_after", "at_least"), [(0.3, [0.3, 0.3]), (None, [2.0, 4.0])])
def test_a_rate_limited_lease_try_waits_as_long_as_prefects_client_would(
    monkeypatch: pytest.MonkeyPatch, retry_after: float | None, at_least: list[float]
) -> None:
    # Review: the ride-out tried the lease's 429s again after 0.5-1 s and 1-2 s, where
    # Prefect's client (now off for those tries) waits what Retry-After says, else 2 and 4 s.
    limited = TokenBlockError("429", transient=True, status_code=429, retry_after=retry_after)
    tries = _lease_tries(monkeypatch, limited)
    monkeypatch.setattr(_renewal, "Listener", _Silent([]))
    monkeypatch.setattr(_renewal, "_read", lambda call: EXPIRED)

    with pytest.raises(TokenBlockError, match="429"):
        _renewal._renew(_call())
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert len(gaps) == len(at_least)
    assert all(gap >= least for gap, least in zip(gaps, at_least, strict=True))


def test_a_renewal_that_asked_long_ago_still_rides_out_a_later_busy_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review: the ride-out's time ran from the renewal's start, so a renewal that had waited
    # behind another's lease for longer than RIDE_OUT_SECONDS failed at its first 503.
    from cm_tasks.notify import REFRESHED_EVENT

    monkeypatch.setattr(_renewal, "RIDE_OUT_SECONDS", 0.3)
    tries = _lease_tries(monkeypatch, False, _busy(), False)
    _script(
        monkeypatch,
        [None, _event("carbon-mapper.stac-token.expiring"), None, _event(REFRESHED_EVENT)],
        [EXPIRED, EXPIRED, FRESH],
    )
    original_next = ScriptedStream.next

    def slow_next(self: ScriptedStream, timeout: float) -> object:
        time.sleep(0.2)  # the renewal waits well past RIDE_OUT_SECONDS in all
        return original_next(self, timeout)

    monkeypatch.setattr(ScriptedStream, "next", slow_next)
    assert _renewal._renew(_call()).block is FRESH
    assert len(tries) == 3  # held elsewhere, busy (ridden out), held elsewhere


def test_events_heard_meanwhile_do_not_cut_the_pauses_between_lease_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review: with an event every 0.3 s and a lease endpoint answering 503, a renewal asked
    # 60 times in 18 s: each event ended a pause, and the next try went out at once.
    tries = _lease_tries(monkeypatch, _busy())
    monkeypatch.setattr(_renewal, "_bound", lambda call: 1.0)
    monkeypatch.setattr(_renewal, "RIDE_OUT_PAUSES", (0.2,))  # 0.1-0.2 s, jittered
    monkeypatch.setattr(_renewal, "Listener", _Trickle([]))
    monkeypatch.setattr(_renewal, "_read", lambda call: EXPIRED)

    assert isinstance(_error_of(_call()), TokenBlockError)  # busy, or waited its whole bound
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert gaps
    assert min(gaps) >= 0.09  # each try waited its pause, events or not (load only adds)


def test_a_busy_prefect_api_is_waited_out_no_longer_than_the_patience(
    read_attempts: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_renewal, "RIDE_OUT_SECONDS", 0.3)
    monkeypatch.setattr(_renewal, "RIDE_OUT_PAUSES", (0.1,))
    read_attempts.extend([_busy() for _ in range(50)])
    with pytest.raises(TokenBlockError, match="ReadTimeout") as err:
        _renewal._read(_call())  # never ending, it would run out of scripted answers
    assert err.value.transient
    assert 50 - len(read_attempts) >= 2  # tried again within the patience, then gave up
