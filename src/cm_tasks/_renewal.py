"""When a token is renewed, and how one renewal serves every caller that needs it.

- `decide`: use the token, give a 401 back, or renew. A 401 renews a token once, whenever it
  was made; a 401 on the token that renewal gave (or any 401 in mode `off`) is the caller's.
- One `Flight` per block per process, in a thread of its own: callers wait for its `Outcome`
  (the block, or the failure) without holding a thread. Across processes the flight listens
  on Prefect's events stream for a moment (jittered) before it tries the block's lease once:
  a process that heard another take it (`renewal-started`) does not ask. If the lease is
  held, the flight waits for the holder's outcome on the stream and reads the block once,
  with a slow jittered read where the stream is silent.
- A create-stac that may have made a token is everyone's failure, then a cool-down: the next
  renewal is one decision under the lease, not a race. Refused credentials hold the
  process's renewals of that route for a minute: one failed login per process a minute,
  not one per call.
- One outage rule for every mode: a caller whose cached token has not expired waits at most
  `PATIENCE_SECONDS` and gets that token on any failure but a configuration error. A renewal
  with no such token tries its block reads and lease tries again through a brief Prefect
  outage instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Generator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from functools import lru_cache
from typing import Any, TypeVar

from prefect.events import emit_event

from cm_tasks import _deployment_refresh, _messages, _token_cache, errors
from cm_tasks._logging import current_logger
from cm_tasks._prefect_calls import bounded_calls, is_transient
from cm_tasks._refresh_lease import refresh_time_bound, try_lease
from cm_tasks._token_cache import Entry, Key
from cm_tasks._token_events import (
    RENEWAL_FAILED_EVENT,
    RENEWAL_STARTED_EVENT,
    Heard,
    Listener,
    fallback_wait,
)
from cm_tasks.blocks import CarbonMapperStacToken, load_token_block
from cm_tasks.client import CREATE_STAC_PATH
from cm_tasks.errors import (
    APIUnavailableError,
    BadCredentialsError,
    CarbonMapperAPIError,
    CarbonMapperError,
    ConfigurationError,
    CredentialsBlockError,
    RefreshRunError,
    TokenBlockError,
    UnexpectedResponseError,
    UnusableTokenError,
)
from cm_tasks.notify import token_resource
from cm_tasks.refresh import resolve_request, run_refresh
from cm_tasks.retry import unprocessed
from cm_tasks.settings import CarbonMapperSettings, RefreshMode, api_identity, load_settings

T = TypeVar("T")
FlightKey = tuple[str | None, str, str]  # (Prefect API URL, block name, platform API)
Route = tuple[str, str, str | None]  # (refresh mode, platform API, refresh deployment)

RENEWAL_GRACE = timedelta(minutes=15)
"""A token made less than this long ago is used even within min_valid: another is no better."""
PATIENCE_SECONDS = 10.0
"""Longest wait for a renewal by a caller that holds a cached token that has not expired."""
OUTAGE_RETRY_SECONDS = 30.0
"""After a failed renewal, a cached token is served this long without trying again."""
COOL_DOWN_SECONDS = 60.0
"""After a create-stac that may have made a token, nobody renews the block for this long."""
REFUSED_LOGIN_HOLD_SECONDS = 60.0
"""After the API refused its credentials, a process does not log in again for this long."""
HEAR_FIRST_SECONDS = 2.0
"""A renewal listens up to this long (jittered) for another process's `renewal-started` before
it asks for the lease: processes that find a token stale together ask one at a time."""
RIDE_OUT_SECONDS = 60.0
"""A renewal with no unexpired token to serve meanwhile starts its block reads and lease tries
again for this long after a transient Prefect API failure (a busy or restarting server)."""
RIDE_OUT_PAUSES = (1.0, 2.0, 4.0, 8.0, 15.0)
"""Pauses (jittered down to half) between those attempts; the last one repeats."""
EVENT_CLOCK_SLACK = timedelta(seconds=2)
"""An outcome event this much older than a waiter's block read still counts (clock skew)."""
_ROUNDS = 2  # renewals one call may wait for: one, and one more for a stricter min_valid


class Action(Enum):
    """What a call does with the token it finds."""

    USE = "use"  # valid for min_valid
    USE_JUST_MADE = "use-just-made"  # within min_valid, but just made: another is no better
    GIVE_UP = "give-up"  # a 401 that renewing cannot fix: it goes back to the caller
    RENEW = "renew"


@dataclass(frozen=True)
class Call:
    """What one caller asks for."""

    key: Key
    settings: CarbonMapperSettings
    api_url: str
    min_valid: timedelta
    rejected: str | None  # the token the API answered 401 to, if that is why we are here
    mode: RefreshMode

    block_name = property(lambda self: self.key[1], doc="The token block.")

    @property
    def route(self) -> Route:
        """How this call renews: its mode, platform API and (deployment mode) deployment."""
        deployment = self.settings.refresh_deployment if self.mode == "deployment" else None
        return (self.mode, _api_id(self.api_url), deployment)

    @property
    def flight_key(self) -> FlightKey:
        """Callers for one block but different platform APIs never share a renewal."""
        return (*self.key, _api_id(self.api_url))


def decide(block: CarbonMapperStacToken | None, call: Call, from_401: bool = False) -> Action:
    """The one decision: use the token, give the 401 back, or renew."""
    if block is None:
        return Action.RENEW
    if call.rejected is not None and block.get() == call.rejected:
        renewed_once = call.mode == "off" or from_401
        return Action.GIVE_UP if renewed_once else Action.RENEW
    if not block.expires_within(call.min_valid):
        return Action.USE
    just_made = datetime.now(timezone.utc) - block.created_at < RENEWAL_GRACE
    if just_made and not block.expires_within(timedelta(0)):
        return Action.USE_JUST_MADE
    return Action.RENEW


@dataclass(frozen=True)
class Outcome:
    """How a renewal ended: the block it leaves (renewed or not), or why it failed."""

    block: CarbonMapperStacToken | None = None
    error: Exception | None = None
    minted: bool = False  # this flight made the token
    refused: bool = False  # mode `off` said no: a decision, not an outage to serve through


@dataclass
class Flight:
    """One renewal of one block in progress in this process; every caller waits for it."""

    call: Call
    outcome: Outcome | None = None
    served_meanwhile: bool = False  # a caller stopped waiting and took the cached token
    _done: threading.Event = field(default_factory=threading.Event)
    _wakers: list[asyncio.Future[None]] = field(default_factory=list)

    def settle(self, outcome: Outcome) -> bool:
        """Record the outcome; returns whether a caller left early with its cached token.

        From here a caller that stops waiting takes the outcome instead (`leave_early`).
        """
        with _guard:
            self.outcome = outcome
            return self.served_meanwhile

    def leave_early(self) -> tuple[Outcome | None, bool]:
        """A caller stops waiting: the outcome if it came meanwhile, and whether it is the first."""
        with _guard:
            if self.outcome is not None:
                return self.outcome, False
            first, self.served_meanwhile = not self.served_meanwhile, True
            return None, first

    def finish(self) -> None:
        """Wake every waiter of the settled outcome, threads and event loops alike."""
        with _guard:
            self._done.set()
            _flights.pop(self.call.flight_key, None)
            wakers, self._wakers = self._wakers, []
        for waker in wakers:  # each on its own event loop, maybe another thread's or closed
            with suppress(RuntimeError):
                waker.get_loop().call_soon_threadsafe(waker.set_result, None)

    def wait(self, timeout: float | None) -> Outcome | None:
        """The outcome, or None if it did not come within timeout seconds."""
        self._done.wait(timeout)
        return self.outcome

    async def await_outcome(self, timeout: float | None) -> Outcome | None:
        """`wait` for an event loop: no thread is held while waiting."""
        waker = asyncio.get_running_loop().create_future()
        with _guard:
            if self.outcome is None:
                self._wakers.append(waker)
            else:
                waker.set_result(None)
        await asyncio.wait({waker}, timeout=timeout)
        return self.outcome


_flights: dict[FlightKey, Flight] = {}
_process = uuid.uuid4().hex  # in renewal-failed events: a process knows its own
_guard = threading.Lock()


def steps(call: Call) -> Generator[tuple[Flight, float | None], Outcome | None, str | None]:
    """The token for call (None: give the 401 back), yielding each flight it must wait for.

    The sync and the async public functions drive this one generator, each waiting for the
    flights its own way (`Flight.wait`, `Flight.await_outcome`).
    """
    for _ in range(_ROUNDS):
        entry = _cached(call)
        if entry is not None:
            action = decide(entry.block, call, entry.from_401)
            if action is not Action.RENEW:
                return _use(call, entry, action)
            failure = entry.recent_failure(call.route)
            if call.rejected is None and failure is not None:
                return _failed(call, entry, failure)
        cooling = _token_cache.cooling(call.key, call.route)
        if cooling is not None:
            return _failed(call, entry, cooling)
        servable = _servable(call)
        flight = _flight_for(call)
        # A caller with a servable token waits PATIENCE_SECONDS at most, once per renewal.
        patience = 0.0 if flight.served_meanwhile else PATIENCE_SECONDS
        outcome = yield flight, (patience if servable else None)
        if outcome is None:  # only a caller with a servable token stops waiting
            assert entry is not None
            if entry.servable():
                outcome, first = flight.leave_early()
                if outcome is None:
                    return _meanwhile(call, entry, first)
            else:  # it expired while this caller waited: only the renewal can answer now
                outcome = yield flight, None
            assert outcome is not None
        if outcome.error is not None:  # the flight's read may have cached a servable token
            entry = None if outcome.refused else _cached(call)
            return _failed(call, entry, outcome.error, flight.call.route)
    entry = _cached(call)
    if entry is not None and entry.servable() and call.rejected is None:
        return entry.block.get()
    raise TokenBlockError(_messages.still_stale(call.block_name, call.min_valid))


def _cached(call: Call) -> Entry | None:
    entry = _token_cache.get(call.key)
    if entry is not None and not same_api(entry.block, call.api_url):
        return None  # another API's token: never served, not even through an outage
    return entry


def _use(call: Call, entry: Entry, action: Action) -> str | None:
    if action is Action.GIVE_UP:
        return None
    if action is Action.USE_JUST_MADE and not entry.warned:
        entry.warned = True
        current_logger().warning(
            _messages.within_min_valid(call.block_name, entry.block, call.min_valid)
        )
    return entry.block.get()


def _failed(call: Call, entry: Entry | None, error: Exception, route: Route | None = None) -> str:
    """The one outage rule: a token that has not expired is served; otherwise the error.

    A configuration error is raised whatever the token: no outage, nothing to wait out.
    The error is remembered for the route of the renewal that failed (default: call's).
    """
    if entry is None or call.rejected is not None or not entry.servable():
        raise error
    _back_off(call, entry, error, route or call.route)
    if isinstance(error, ConfigurationError):
        raise error
    return entry.block.get()


def _back_off(call: Call, entry: Entry, error: Exception, route: Route) -> None:
    """For a while the route's callers get error's answer, not a renewal; said once.

    The while: OUTAGE_RETRY_SECONDS, or what is left of a cool-down that holds the route.
    """
    seconds = max(OUTAGE_RETRY_SECONDS, _token_cache.cooling_left(call.key, route))
    backing_off = entry.back_off(error, seconds, route)
    if backing_off and not isinstance(error, ConfigurationError):
        current_logger().warning(
            _messages.serving_stale(call.block_name, error, entry.block, seconds)
        )


def _meanwhile(call: Call, entry: Entry, first: bool) -> str:
    """A renewal still running after PATIENCE_SECONDS (slow, not failed): the cached token."""
    if first:  # said once per renewal, not once per caller
        message = _messages.still_renewing(call.block_name, entry.block, PATIENCE_SECONDS)
        current_logger().info(message)
    return entry.block.get()


def _flight_for(call: Call) -> Flight:
    """The flight renewing call's block in this process: joined, or started now."""
    with _guard:
        flight = _flights.get(call.flight_key)
        if flight is not None:
            return flight
        flight = _flights[call.flight_key] = Flight(call)
    # The thread sees the caller's Prefect settings and run context (logs go to its run).
    context = contextvars.copy_context()
    threading.Thread(
        target=context.run, args=(_fly, flight), name="cm-tasks-renewal", daemon=True
    ).start()
    return flight


def _fly(flight: Flight) -> None:
    call = flight.call
    try:
        outcome = _renew(call)
    except Exception as exc:
        outcome = Outcome(error=exc)
    if outcome.block is not None:
        from_401 = outcome.minted and call.rejected is not None
        _token_cache.put(call.key, Entry(outcome.block, from_401=from_401))
    left_early = flight.settle(outcome)
    entry = _cached(call)
    error = outcome.error
    if error is not None and left_early and entry is not None and entry.servable():
        # Its callers left with the cached token while it ran: the failure is said here, and
        # the next callers get its answer (a configuration error is theirs to see).
        _back_off(call, entry, error, call.route)
    flight.finish()


def _renew(call: Call) -> Outcome:
    """Read the block; if it does not answer the call, renew it (or hear who did)."""
    # Outcomes from before this read (the stream replays the last minute) are not this
    # wait's; a little slack for the clocks of the processes that emit them.
    read_at = datetime.now(timezone.utc)
    since = read_at - EVENT_CLOCK_SLACK
    block = _read(call)
    if decide(block, call) is not Action.RENEW:
        return Outcome(block)
    if call.mode == "off":
        disabled = _messages.refresh_disabled(call.block_name, block, call.min_valid)
        return Outcome(error=TokenBlockError(disabled), refused=True)
    bound = _bound(call)
    deadline = time.monotonic() + bound
    resource = token_resource(call.block_name)["prefect.resource.id"]
    failed = frozenset({RENEWAL_FAILED_EVENT})  # its cool-down may outlast the replay
    # One ride-out for the lease tries of this renewal, however many. They go without
    # Prefect's client retries, which would have tried a 429 twice more: so does the renewal.
    ride_out = _RideOut(call, rate_limit_tries=2, deadline=deadline)
    with Listener(resource, since=since, keep_older=failed) as events:
        heard = events.next(_hear_first()) if events.live else None
        asked = False
        while True:
            outcome = _their_outcome(call, heard, since, asked)
            if outcome is not None:
                return outcome
            news = None
            if not _renewing_since(heard, read_at):
                with ExitStack() as lease:
                    held, news = _ask_for_lease(call, lease, events, bound, ride_out)
                    if held:
                        return _failed_meanwhile(call, events, since) or _renew_holding_lease(call)
            if time.monotonic() >= deadline:
                late = _messages.waited_too_long(call.block_name, bound)
                return Outcome(error=TokenBlockError(late, transient=True))
            # Something heard between two lease tries may be the answer: no wait for more.
            heard, asked = news or events.next(fallback_wait(deadline)), True


def _ask_for_lease(
    call: Call, lease: ExitStack, events: Listener, bound: float, ride_out: _RideOut
) -> tuple[bool, Heard | None]:
    """Whether the block's lease was taken (into lease); else what the stream said meanwhile.

    Through a busy Prefect API the tries are `_patiently`'s, each one request, and the renewal
    listens between them: an outcome heard there ends the asking (review: a `refreshed` heard
    during the pauses, or during Prefect's own retries, waited for the next try: the token
    came 7-30 s after it was made).
    """
    news: list[Heard] = []

    def ask() -> bool:
        if news:
            return False
        # Who tries again after a busy answer: Prefect's client where the renewal will not
        # (a token to serve: one try per outage), else the renewal, listening in between.
        taken = try_lease(call.block_name, bound, client_retries=_servable(call))
        return lease.enter_context(taken)

    def listen(seconds: float) -> None:
        # The whole pause, unless an event comes: a silence or the stream's end is no news.
        end = time.monotonic() + seconds
        while (heard := events.next(max(end - time.monotonic(), 0.0))) is None:
            if time.monotonic() >= end:
                return
        news.append(heard)

    held = _patiently(call, ask, pause=listen, ride_out=ride_out)
    return held, (news[0] if news else None)


def _renewing_since(heard: Heard | None, read_at: datetime) -> bool:
    """Whether heard says another process took the lease after read_at: no need to ask.

    No slack here: a renewal that started before the read may have ended before it too (and
    its failure is no answer to this wait); asking once for nothing costs only a request.
    """
    return heard is not None and heard.name == RENEWAL_STARTED_EVENT and heard.occurred >= read_at


def _their_outcome(call: Call, heard: Heard | None, since: datetime, asked: bool) -> Outcome | None:
    """What a waiter learns from an event (None: a silence): a failure, or a usable block.

    Once the waiter has asked for the lease, a failure about this wait is its outcome, and
    an outcome or a silence means one read of the block. Before, a failure counts if it came
    after the block was read (one just before may be this process's own, before
    `clear_token_cache()`), or while its cool-down lasts. `renewal-started`: another process
    is at it.
    """
    if heard is not None and heard.name == RENEWAL_FAILED_EVENT:
        failure = _their_failure(call, heard, _counts_from(heard, since, asked))
        return None if failure is None else Outcome(error=failure)
    if heard is None and not asked:
        return None
    if heard is not None and heard.name == RENEWAL_STARTED_EVENT:
        return None
    block = _read(call)
    return Outcome(block) if decide(block, call) is not Action.RENEW else None


def _counts_from(heard: Heard, since: datetime, asked: bool) -> datetime:
    """From when a heard failure is about this wait.

    After asking for the lease, from since (the read, less the slack for another host's
    clock). Before, and for this process's own failures (a refusal it had before
    `clear_token_cache()`, replayed), from the read itself.
    """
    own = heard.payload.get("process") == _process
    return since if asked and not own else since + EVENT_CLOCK_SLACK


def _failed_meanwhile(call: Call, events: Listener, since: datetime) -> Outcome | None:
    """A failure heard while the lease was asked for: this wait's outcome, not a cue to renew.

    Its holder released the lease after announcing it; renewing now would repeat it (one more
    refused login).
    """
    for heard in events.queued():
        if heard.name != RENEWAL_FAILED_EVENT:
            continue  # a `refreshed` needs nothing: the holder reads the block
        if ended := _their_outcome(call, heard, since, asked=True):
            return ended
    return None


def _renew_holding_lease(call: Call) -> Outcome:
    # Said at once, so that the processes still listening before they ask need not ask. If
    # another process renewed the block meanwhile, they hear its `refreshed` as well.
    _announce(RENEWAL_STARTED_EVENT, call, {"mode": call.mode})
    block = _read(call)  # another process may have renewed it while this one asked
    if decide(block, call) is not Action.RENEW:
        return Outcome(block)
    try:
        block = _mint(call)
    except Exception as exc:
        _announce_failure(call, exc)
        return Outcome(error=exc)
    if block.expires_within(call.min_valid):
        current_logger().warning(_messages.within_min_valid(call.block_name, block, call.min_valid))
    return Outcome(block, minted=True)


def _mint(call: Call) -> CarbonMapperStacToken:
    """A new token in the block: made here (inline) or by a run of the refresh deployment."""
    settings = call.settings
    if api_identity(settings.base_url) != api_identity(call.api_url):
        settings = load_settings(base_url=call.api_url)
    if call.mode == "deployment":
        deadline = time.monotonic() + settings.refresh_timeout
        failure = _deployment_refresh.refresh_through_deployment(
            call.block_name, call.api_url, settings, deadline
        )
        block = _read(call)  # the block decides (a cancelled run's holder may have renewed it)
        if block is not None and decide(block, call) is not Action.RENEW:
            return block
        raise failure or TokenBlockError(_messages.still_stale(call.block_name, call.min_valid))
    renewing = "The STAC token in block %r is missing or about to expire: getting a new one."
    current_logger().info(renewing, call.block_name)
    block = run_refresh(resolve_request(settings, token_block=call.block_name), settings)
    _token_cache.count(refreshes=1)
    return block


def _announce_failure(call: Call, error: Exception) -> None:
    """Tell this process and every waiting one how the renewal ended, and the cool-down."""
    # Only a token that may exist unsaved holds every process and route: refused
    # credentials are this route's, and a process that logs in with fixed ones must not wait.
    announced = COOL_DOWN_SECONDS if _may_have_made_a_token(error) else 0.0
    if announced:
        _token_cache.cool_down(call.key, announced, error)
    elif isinstance(error, BadCredentialsError):
        hold = REFUSED_LOGIN_HOLD_SECONDS
        _token_cache.cool_down(call.key, hold, _held(error, hold), call.route)
    payload = {
        "process": _process,
        "mode": call.mode,
        "error": type(error).__name__,
        "retry_after": announced,
        "transient": is_transient(error),
        "flow_run_name": getattr(error, "flow_run_name", None),
        "flow_run_id": getattr(error, "flow_run_id", None),
        "status_code": getattr(error, "status_code", None),
        "endpoint": getattr(error, "endpoint", None),
        # A run's error says what its state message (stored in Prefect already) says.
        "message": str(error) if isinstance(error, RefreshRunError) else None,
    }
    _announce(RENEWAL_FAILED_EVENT, call, payload)


def _announce(event: str, call: Call, payload: dict[str, object]) -> None:
    """Tell every process waiting on call's block; best effort (they fall back to reads)."""
    with suppress(Exception):
        emit_event(event, resource=token_resource(call.block_name), payload=payload)


def _their_failure(call: Call, heard: Heard, since: datetime) -> CarbonMapperError | None:
    """The failure another process announced, if it is about this wait (or cools it down).

    A failure of another refresh mode is not (credentials an inline renewal was refused are
    not a deployment's), unless it cools the block down: its token may exist, unsaved.
    """
    retry_after = float(heard.payload.get("retry_after") or 0.0)
    # Stamped by the emitting process's clock: one ahead of ours would make its event younger
    # than heard, and its cool-down longer than it said. Nothing is heard before it happens.
    age = max((datetime.now(timezone.utc) - heard.occurred).total_seconds(), 0.0)
    other_mode = heard.payload.get("mode", call.mode) != call.mode  # older cm-tasks: no mode
    earlier = other_mode or heard.occurred < since or age > _bound(call)
    if age > retry_after and earlier:
        return None  # an earlier renewal's failure, replayed on connect, and not cooling down
    run_name = heard.payload.get("flow_run_name")
    message = heard.payload.get("message") or _messages.their_failure(
        call.block_name, str(heard.payload.get("error")), max(retry_after - age, 0.0), run_name
    )
    error = _heard_error(heard.payload, message)
    if retry_after > age:
        _token_cache.cool_down(call.key, retry_after - age, error)
    elif heard.payload.get("error") == BadCredentialsError.__name__ and not earlier:
        # Refused credentials, heard while waiting: this process holds its logins as if they
        # were its own (a replayed refusal does not: the password may have been fixed since).
        hold = REFUSED_LOGIN_HOLD_SECONDS
        _token_cache.cool_down(call.key, hold - age, _held(error, hold), call.route)
    return error


def _heard_error(payload: dict[str, Any], message: str) -> CarbonMapperError:
    """Another process's failure as this process's callers get it: of the same kind.

    The errors a caller acts on keep their class, the platform's and the credential blocks'
    (a handler for `BadCredentialsError` sees one in every process, not only in the one that
    logged in); a run's failure is a RefreshRunError; any other is about the token block.
    """
    transient = bool(payload.get("transient"))
    run_name, run_id = payload.get("flow_run_name"), payload.get("flow_run_id")
    kind = getattr(errors, str(payload.get("error")), None)
    kind = kind if isinstance(kind, type) else object  # a name errors.py does not define
    if run_name:
        run_error = kind if issubclass(kind, RefreshRunError) else RefreshRunError
        return run_error(message, flow_run_name=run_name, flow_run_id=run_id, transient=transient)
    error: CarbonMapperError
    if issubclass(kind, CarbonMapperAPIError):
        # Only what the event says: an older cm-tasks sends neither, the class has defaults.
        where = {k: payload[k] for k in ("status_code", "endpoint") if payload.get(k) is not None}
        error = kind(message, **where)
    elif kind is CredentialsBlockError:
        error = CredentialsBlockError(message)
    else:
        return TokenBlockError(message, transient=transient)
    error.transient = transient
    return error


def _held(error: Exception, seconds: float) -> Exception:
    """The error the callers of a cool-down get: refused credentials say for how long."""
    if not isinstance(error, BadCredentialsError):
        return error
    return BadCredentialsError(
        _messages.refused_login_held(str(error), seconds),
        status_code=error.status_code,
        endpoint=error.endpoint,
    )


def _may_have_made_a_token(error: Exception) -> bool:
    """A create-stac whose answer was lost or unreadable: the token may exist, unsaved."""
    if not isinstance(error, CarbonMapperAPIError) or CREATE_STAC_PATH not in error.endpoint:
        return False
    if isinstance(error, UnexpectedResponseError):
        return True
    return isinstance(error, APIUnavailableError) and not unprocessed(error)


def _bound(call: Call) -> float:
    if call.mode == "deployment":
        return float(call.settings.refresh_timeout)
    return refresh_time_bound(call.settings)


def _hear_first() -> float:
    return random.uniform(0.0, HEAR_FIRST_SECONDS)  # noqa: S311 - jitter, not a secret


def _read(call: Call) -> CarbonMapperStacToken | None:
    """The block as saved in Prefect (through a brief outage: `_patiently`)."""
    return _patiently(call, lambda: _read_once(call))


def _patiently(
    call: Call,
    attempt: Callable[[], T],
    pause: Callable[[float], object] | None = None,
    ride_out: _RideOut | None = None,
) -> T:
    """attempt(); where no caller has a token to serve, again after transient Prefect failures.

    New attempts start for up to `RIDE_OUT_SECONDS` (at most the renewal's bound), each
    bounded like every Prefect call of a renewal: a Prefect API busy for half a minute no
    longer fails every task of an ingest flow waiting for a token. Not after a 429: more
    requests from a rate-limited Prefect account only prolong the limit (but for the two tries
    Prefect's client would have made, where it makes none: `_RideOut`). With a token to
    serve, the failure is the outcome at once and the callers are served (one try per outage).
    pause waits between two attempts (default: `time.sleep`); ride_out carries the time limit
    and the warning over several calls (default: a ride-out of this call's own).
    """
    ride_out = ride_out or _RideOut(call)
    while True:
        if ride_out.not_before:  # after a failure: the pause left (news may cut it short)
            (pause or time.sleep)(max(ride_out.not_before - time.monotonic(), 0.0))
        try:
            answer = attempt()
        except TokenBlockError as exc:
            ride_out.pause_after(exc)
            continue
        ride_out.succeeded()
        return answer


class _RideOut:
    """Attempts through a busy Prefect API: until when, how far apart, said once.

    Its time runs from the first failure after a success (a renewal may ask for the lease
    again long after it started), never past deadline.
    """

    def __init__(self, call: Call, rate_limit_tries: int = 0, deadline: float | None = None):
        """A ride-out for call; rate_limit_tries: how many 429s in a row it tries again after."""
        self.call, self.rate_limit_tries, self.deadline = call, rate_limit_tries, deadline
        self.not_before = 0.0  # monotonic: no attempt before then; 0: no failure yet
        self.said = False
        self.succeeded()

    def succeeded(self) -> None:
        """An attempt got an answer: the next failure starts a ride-out afresh."""
        self.give_up: float | None = None
        self.pauses = itertools.chain(RIDE_OUT_PAUSES, itertools.repeat(RIDE_OUT_PAUSES[-1]))
        self.rate_limited = 0

    def pause_after(self, exc: TokenBlockError) -> None:
        """Set when the next attempt may start, after exc; raises exc when there is none."""
        now = time.monotonic()
        if self.give_up is None:
            self.give_up = now + min(RIDE_OUT_SECONDS, _bound(self.call))
            if self.deadline is not None:
                self.give_up = min(self.give_up, self.deadline)
        wait = next(self.pauses)
        low, high = wait / 2, wait  # jittered down: processes that failed together spread out
        if exc.status_code == 429:  # as Prefect's client paces them: Retry-After, else 2, 4 s
            self.rate_limited += 1
            wait = exc.retry_after if exc.retry_after is not None else 2.0**self.rate_limited
            low, high = wait, wait * 1.25  # never sooner than asked
        again = exc.transient and self.rate_limited <= self.rate_limit_tries
        if not again or _servable(self.call) or now + low > self.give_up:
            raise exc
        if not self.said:  # once per ride-out: the caller is not left wondering
            self.said = True
            current_logger().warning(_messages.riding_out(str(exc), self.give_up - now))
        self.not_before = now + random.uniform(low, high)  # noqa: S311 - jitter, not a secret


def _servable(call: Call) -> bool:
    """Whether call's callers have a cached token to be served if the renewal fails."""
    entry = _cached(call)
    return entry is not None and entry.servable() and call.rejected is None


def _read_once(call: Call) -> CarbonMapperStacToken | None:
    _token_cache.count(reads=1)
    try:
        with bounded_calls(f"read the token block {call.block_name!r}") as prefect:
            block: CarbonMapperStacToken | None = prefect(load_token_block, call.block_name)
    except UnusableTokenError:
        return None  # renewed like a missing token: the renewal writes a usable one
    if block is not None and not same_api(block, call.api_url):
        raise ConfigurationError(_messages.api_mismatch(call.block_name, block, call.api_url))
    if block is not None:
        _remember(call, block)
    return block


def _remember(call: Call, block: CarbonMapperStacToken) -> None:
    """Cache a block read from Prefect: a renewal that then fails can still serve its token."""
    entry = _token_cache.get(call.key)
    if entry is None or entry.block.get() != block.get():
        _token_cache.put(call.key, Entry(block))


@lru_cache(maxsize=64)
def _api_id(url: str) -> str:
    return api_identity(url)


def same_api(block: CarbonMapperStacToken, api_url: str) -> bool:
    """Whether block holds a token for the API of api_url."""
    return _api_id(block.base_url) == _api_id(api_url)


def _reset_after_fork() -> None:
    # A fork copies the lock as it is, held or not, but not the renewal threads.
    global _guard, _process
    _guard = threading.Lock()
    _flights.clear()
    _process = uuid.uuid4().hex


os.register_at_fork(after_in_child=_reset_after_fork)
