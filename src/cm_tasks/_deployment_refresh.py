"""Renew the token through a run of the refresh deployment (`CM_REFRESH_MODE=deployment`).

Holding the block's renewal lease, the caller joins a live run that renews its block (by the
run's parameters with the flow's defaults filled in: a Quick or scheduled run counts) or starts
one with `token_block` (and `base_url` where the flow takes it), then waits on the run's events.
A run Running for longer than a refresh can take is marked Crashed (which frees the
deployment's concurrency slot on every Prefect version) and not joined. A run that the
deployment's limit cancelled hands the wait to the run that holds the slot.

Run times are the Prefect server's, so they are compared with the server's time (told by the
`Date` of its responses), not with this machine's clock, which may be minutes off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any
from uuid import uuid4

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from cm_tasks._logging import current_logger
from cm_tasks._prefect_calls import bounded_calls
from cm_tasks._refresh_lease import refresh_time_bound
from cm_tasks._token_events import Listener, fallback_wait
from cm_tasks.errors import ConfigurationError, RefreshRunError, RefreshTimeoutError
from cm_tasks.settings import (
    DEFAULT_TOKEN_BLOCK,
    CarbonMapperSettings,
    api_identity,
)

TOKEN_BLOCK_PARAMETER = "token_block"
"""The refresh flow's parameter that names the block a run writes."""
BASE_URL_PARAMETER = "base_url"
"""The refresh flow's parameter that names the API a run makes the token for."""

FAILED_RUN_HOLD = timedelta(seconds=60)
"""A run for the block that failed less than this long ago is a new caller's outcome too."""
_RECENT_RUNS = 25
# A Date header is good to a second or two (see _ServerClock.observe): a smaller skew is
# noise, and our clock is the finer one. Every time compared below has a margin of 60 s or more.
_CLOCK_TOLERANCE = timedelta(seconds=5)
_DATE_JITTER = timedelta(seconds=2)  # how far apart two Dates of one clock can seem
_MAX_RUNS = 3  # one, and the runs a concurrency-limit cancel hands the wait over to
_FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
_RUN_EVENT = "prefect.flow-run."
# Run events that cannot mean the run is final: its non-final states (a worker's Submitting
# and InfrastructurePending from Prefect 3.9 on), and the heartbeat of Prefect 3.4+ (any other
# name is read, to be safe).
_NOT_FINAL = frozenset(
    {"Scheduled", "Late", "AwaitingRetry", "AwaitingConcurrencySlot", "Pending", "Running"}
    | {"Submitting", "InfrastructurePending", "Retrying", "Paused", "Suspended", "Cancelling"}
    | {"heartbeat"}
)


def refresh_through_deployment(
    block_name: str, api_url: str, settings: CarbonMapperSettings, deadline: float
) -> RefreshRunError | None:
    """Make sure a run of the refresh deployment renews block_name for api_url; wait for it.

    Returns:
        None once a run for the block completed; otherwise what went wrong with the last run
        (failed, crashed, cancelled), for the caller to raise if the block is still stale.

    Raises:
        ConfigurationError: the deployment does not exist on this Prefect API.
        RefreshTimeoutError: the run was not final by the deadline.
        TokenBlockError: the Prefect API failed (transient when it may work later).
    """
    what = f"run the refresh deployment {settings.refresh_deployment!r}"
    # With a response hook, get_client makes a client of our own (not a flow run's): it sends
    # no request more, and every response tells the clock the server's time.
    clock = _ServerClock()
    with (
        bounded_calls(what) as call,
        get_client(clock.httpx_settings(), sync_client=True) as client,
    ):
        runs = _Runs(client, call, settings, block_name, api_url, clock)
        run = runs.joinable() or runs.start()
        for _ in range(_MAX_RUNS):
            run = runs.wait_final(run, deadline)
            if run.state_type == StateType.COMPLETED and runs.serves_us(run):
                return None
            if run.state_type == StateType.COMPLETED:  # it renewed another block
                run = runs.start()
                continue
            holder = runs.live(partial(_other_than, run))
            if run.state_type != StateType.CANCELLED or holder is None:
                return _run_error(run, runs)
            current_logger().info(
                "The refresh run %r was cancelled by the deployment's concurrency limit; "
                "waiting for its run %r, which holds the slot.",
                run.name,
                holder.name,
            )
            run = holder
        return _run_error(run, runs)


class _ServerClock:
    """The Prefect server's time, from the `Date` header of its responses: no request of its own.

    Run times (expected start, start, end) are stamped by the server. Against this machine's
    clock they are off by the skew between the two: minutes on a host without time sync.
    """

    def __init__(self) -> None:
        self._offset: timedelta | None = None  # the server's time minus ours; None: no Date yet
        # Our time is read once, then carried on by the monotonic clock: a step of the wall
        # clock during the call (time sync correcting it) would otherwise count as skew.
        self._start, self._start_monotonic = _local_now(), time.monotonic()

    def _local(self) -> datetime:
        return self._start + timedelta(seconds=time.monotonic() - self._start_monotonic)

    def httpx_settings(self) -> dict[str, Any]:
        """Settings for `get_client` that make the client's responses set the clock."""
        return {"event_hooks": {"response": [self.observe]}}

    def observe(self, response: httpx.Response) -> None:
        """Take the server's time from a response's `Date` header, if it has a valid one."""
        try:
            offset = parsedate_to_datetime(response.headers["date"]) - self._local()
        except (KeyError, TypeError, ValueError):  # none, unreadable, or without a time zone
            return
        # A Date is rounded down to the second and stamped before the response travelled
        # (uvicorn refreshes it once a second): each is at most the server's time on arrival,
        # so of offsets that agree the largest is the closest. One that disagrees by more is
        # the server's clock stepped (time sync correcting it): the newest is right then.
        if self._offset is None or abs(offset - self._offset) > _DATE_JITTER:
            self._offset = offset
        else:
            self._offset = max(offset, self._offset)

    def now(self) -> datetime:
        """The server's time now: this machine's, unless a response said it is off."""
        offset = self._offset or timedelta(0)
        return self._local() + (offset if abs(offset) > _CLOCK_TOLERANCE else timedelta(0))


def _local_now() -> datetime:
    return datetime.now(timezone.utc)


class _Runs:
    """The runs of the refresh deployment, as seen by one caller."""

    def __init__(
        self,
        client: SyncPrefectClient,
        call: Any,
        settings: CarbonMapperSettings,
        block_name: str,
        api_url: str,
        clock: _ServerClock | None = None,
    ) -> None:
        self.client, self.call, self.settings = client, call, settings
        self.block_name, self.api_url = block_name, api_url
        self.clock = clock or _ServerClock()  # None: a client without its hook, our clock
        self.deployment = call(_read_deployment, client, settings)
        schema = getattr(self.deployment, "parameter_openapi_schema", None) or {}
        self.takes_base_url = BASE_URL_PARAMETER in (schema.get("properties") or {})
        self.bound = timedelta(seconds=refresh_time_bound(settings))

    def serves_us(self, run: FlowRun) -> bool:
        """Whether run renews our block for our API (with the flow's defaults filled in)."""
        params = run.parameters or {}
        if params.get(TOKEN_BLOCK_PARAMETER, DEFAULT_TOKEN_BLOCK) != self.block_name:
            return False
        theirs = params.get(BASE_URL_PARAMETER) if self.takes_base_url else None
        if theirs is None:
            # A run that does not set base_url (a Quick run, the weekly schedule) serves the
            # worker's CM_BASE_URL: joined, and the block read after it says which API it got.
            return True
        return api_identity(str(theirs)) == api_identity(self.api_url)

    def joinable(self) -> FlowRun | None:
        """A live run that renews our block, or one that failed it moments ago, if any."""
        runs = self._recent()
        run = self.live(self.serves_us, runs)
        if run is not None:
            current_logger().info(
                "Waiting for the refresh run %r of deployment %r, already renewing block %r.",
                run.name,
                self.settings.refresh_deployment,
                self.block_name,
            )
            return run
        # A caller that comes just after a run failed gets that run's failure: another run
        # now would fail the same way (a wrong password, tried again by every late caller).
        # A run the deployment's limit cancelled (a duplicate) says nothing: look past it.
        ended = (r for r in runs if r.state_type in _FINAL - {StateType.CANCELLED})
        last = next((r for r in ended if self.serves_us(r)), None)
        if last is None or last.state_type != StateType.FAILED:
            return None
        # Prefect 3.2 sets no end time on a run failed before it started: the state's time.
        failed_at = last.end_time or (last.state.timestamp if last.state else None)
        if failed_at is None or self.clock.now() - failed_at > FAILED_RUN_HOLD:
            return None
        return last

    def _recent(self) -> list[FlowRun]:
        # Not runs scheduled for later (the weekly schedule's next ones), on the server's clock.
        horizon = self.clock.now() + timedelta(minutes=1)
        runs: list[FlowRun] = self.call(
            self.client.read_flow_runs,
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment.id])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(before_=horizon)
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=_RECENT_RUNS,
        )
        return runs

    def live(
        self, wanted: Callable[[FlowRun], bool], runs: list[FlowRun] | None = None
    ) -> FlowRun | None:
        """The newest live run that is wanted; a run stuck past the bound is crashed instead."""
        for run in self._recent() if runs is None else runs:
            if run.state_type in _FINAL or run.state_type is None or not wanted(run):
                continue
            if not self._stuck(run):
                return run
            self._crash(run)
        return None

    def _stuck(self, run: FlowRun) -> bool:
        started = run.start_time
        since = self.clock.now() - started if started is not None else None
        return run.state_type == StateType.RUNNING and since is not None and since > self.bound

    def _crash(self, run: FlowRun) -> None:
        message = (
            f"Running for more than {self.bound.total_seconds():.0f} s, longer than a refresh "
            "can take: its worker is gone or hung. Marked Crashed by cm-tasks so that a new "
            "run can renew the token (this also frees the deployment's concurrency slot)."
        )
        self.call(self.client.set_flow_run_state, run.id, Crashed(message=message))
        current_logger().warning("The refresh run %r: %s", run.name, message)

    def start(self) -> FlowRun:
        """A new run for our block (and API, where the flow takes one)."""
        parameters = {TOKEN_BLOCK_PARAMETER: self.block_name}  # names only: stored in clear
        if self.takes_base_url:
            parameters[BASE_URL_PARAMETER] = self.api_url
        run: FlowRun = self.call(
            self.client.create_flow_run_from_deployment,
            self.deployment.id,
            parameters=parameters,
            # Prefect's client sends the POST again after a lost answer; the key makes the
            # second return the first run instead of a duplicate that CANCEL_NEW cancels.
            idempotency_key=f"cm-tasks-refresh-{uuid4()}",
        )
        current_logger().info(
            "The STAC token in block %r is missing or about to expire: started run %r of "
            "deployment %r to renew it.",
            self.block_name,
            run.name,
            self.settings.refresh_deployment,
        )
        return run

    def wait_final(self, run: FlowRun, deadline: float) -> FlowRun:
        """run once it is final: read when its events say it may be, or after a silence.

        run was just read or made: it is not read again unless the stream is unavailable
        (which replays the last minute of the run's events on connect, its end included).
        """
        if run.state_type in _FINAL:
            return run
        with Listener(f"prefect.flow-run.{run.id}", name_prefix=_RUN_EVENT) as events:
            read = not events.live
            while True:
                if read or time.monotonic() >= deadline:
                    run = self.call(self.client.read_flow_run, run.id)
                    if run.state_type in _FINAL:
                        return run
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _timeout(run, self.deployment, self.settings, self.block_name)
                heard = events.next(fallback_wait(deadline))
                # Each read is a metered request: none for a state that is not final.
                read = heard is None or heard.name.removeprefix(_RUN_EVENT) not in _NOT_FINAL


def _other_than(run: FlowRun, other: FlowRun) -> bool:
    return other.id != run.id


def _read_deployment(client: SyncPrefectClient, settings: CarbonMapperSettings) -> Any:
    try:
        return client.read_deployment_by_name(settings.refresh_deployment)
    except ObjectNotFound:
        raise ConfigurationError(
            f"CM_REFRESH_MODE is deployment, but the refresh deployment "
            f"{settings.refresh_deployment!r} does not exist on this Prefect API. Deploy it "
            "with `cm-tasks deploy`, or set CM_REFRESH_DEPLOYMENT to the "
            "FLOW_NAME/DEPLOYMENT_NAME of yours."
        ) from None


def _state_type(run: FlowRun) -> str | None:
    return run.state_type.value if run.state_type is not None else None


def _run_error(run: FlowRun, runs: _Runs) -> RefreshRunError:
    message = (run.state.message if run.state else None) or "no message"
    what = (run.state_name or _state_type(run) or "ended").lower()
    return RefreshRunError(
        f"The refresh run {run.name!r} of deployment {runs.settings.refresh_deployment!r} "
        f"{what}: {message.strip()} The token in block {runs.block_name!r} was not renewed. "
        "See that run's logs in the Prefect UI, fix the cause on the refresh side (its "
        f"worker's credential blocks, `cm-tasks login`), then try again{_after(run)}"
        f"{_hint(runs)}",
        flow_run_name=run.name,
        flow_run_id=str(run.id),
        state_type=_state_type(run),
        transient=run.state_type in (StateType.CRASHED, StateType.CANCELLED),
    )


def _after(run: FlowRun) -> str:
    if run.state_type != StateType.FAILED:
        return "."
    hold = FAILED_RUN_HOLD.total_seconds()
    return f": until {hold:.0f} s after this run failed, callers get its failure, not a new run."


def _hint(runs: _Runs) -> str:
    # A deployment made for another block (`cm-tasks deploy` with CM_TOKEN_BLOCK set) fails a
    # run asked for the default block with ParameterConflictError, whose advice is about the
    # deployment; the setting to change is this process's.
    theirs = (getattr(runs.deployment, "parameters", None) or {}).get(TOKEN_BLOCK_PARAMETER)
    if not isinstance(theirs, str) or theirs == runs.block_name:
        return ""
    return (
        f" Note: the deployment itself renews block {theirs!r} (its {TOKEN_BLOCK_PARAMETER} "
        f"parameter), and this process asked for {runs.block_name!r} (its CM_TOKEN_BLOCK): "
        f"if {theirs!r} is the block to use, set CM_TOKEN_BLOCK={theirs} here."
    )


def _timeout(
    run: FlowRun, deployment: Any, settings: CarbonMapperSettings, block_name: str
) -> RefreshTimeoutError:
    pool = deployment.work_pool_name
    if run.state_type == StateType.SCHEDULED:
        what = (
            "was scheduled but not picked up by any worker: start one for work pool "
            f"{pool!r} with the credential blocks (`prefect worker start --pool {pool}`)"
        )
    else:
        what = (
            f"is still {run.state_name}: see its logs; a run whose worker is gone is marked "
            "Crashed by the next caller once it has run longer than a refresh can take"
        )
    return RefreshTimeoutError(
        f"The refresh run {run.name!r} of deployment {settings.refresh_deployment!r} {what}. "
        f"Waited CM_REFRESH_TIMEOUT ({settings.refresh_timeout:g} s); the token in block "
        f"{block_name!r} was not renewed.",
        flow_run_name=run.name,
        flow_run_id=str(run.id),
        state_type=_state_type(run),
        transient=True,
    )
