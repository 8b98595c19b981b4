"""Renew the token through a run of the refresh deployment (`CM_REFRESH_MODE=deployment`).

The process that needs a token never reads a Secret block and never calls the Carbon Mapper
API: it asks the Prefect API for a run of `CM_REFRESH_DEPLOYMENT` with the parameter
`token_block=<the block it reads>`, waits until that run is final (at most
`CM_REFRESH_TIMEOUT` seconds from when it started asking), then lets the caller re-read the
block. The run is a separate flow run (no parent task run), executed by a worker of the
deployment's pool, with that worker's credential blocks and settings.

One run for many callers: `cm_tasks.access` holds its per-block lock and the cross-process
refresh lease (`lease` below) around `refresh_through_deployment`, and re-reads the block
after acquiring them. A caller that got the lease after another caller's run failed finds
that run (it ended after this caller started asking) and raises its error instead of starting
a second run; a caller that finds a run for its block still scheduled or running joins it.
When the deployment's concurrency limit (1, CANCEL_NEW) cancels the new run because another
run of the deployment is running (the weekly schedule, a run from the UI), the caller waits for
that one and re-reads the block, starting one more run of its own only if the block is still
stale after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL

from cm_tasks._logging import current_logger
from cm_tasks._refresh_lease import lease_name, prefect_has_leases, refresh_lease
from cm_tasks.errors import (
    ConfigurationError,
    RefreshRunError,
    RefreshTimeoutError,
    TokenBlockError,
)
from cm_tasks.settings import CarbonMapperSettings

TOKEN_BLOCK_PARAMETER = "token_block"
"""The refresh flow's parameter that names the block a run writes."""

_FIRST_POLL_SECONDS = 0.5
_MAX_POLL_SECONDS = 2.0
_RECENT_RUNS = 25
_MAX_OWN_RUNS = 2  # one, plus one more after a run of the deployment for another block
_FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
_BROKEN = {StateType.FAILED, StateType.CRASHED}
_BUSY = {StateType.PENDING, StateType.RUNNING, StateType.CANCELLING}


@dataclass(frozen=True)
class Attempt:
    """When a caller started to need a new token, and until when it may wait for one."""

    asked_at: datetime
    deadline: float  # time.monotonic()
    timeout: float

    @classmethod
    def start(cls, settings: CarbonMapperSettings) -> Attempt:
        """An attempt starting now, allowed `CM_REFRESH_TIMEOUT` seconds."""
        timeout = settings.refresh_timeout
        return cls(datetime.now(timezone.utc), time.monotonic() + timeout, timeout)

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once past it)."""
        return self.deadline - time.monotonic()


@contextmanager
def lease(block_name: str, settings: CarbonMapperSettings, attempt: Attempt) -> Iterator[None]:
    """The refresh lease of block_name, waited for no longer than the attempt allows.

    Raises:
        RefreshTimeoutError: another process held the lease (waiting for its refresh run)
            until the deadline; says what that run is doing.
    """
    with ExitStack() as stack:
        failure: RefreshTimeoutError | None = None
        try:
            stack.enter_context(
                refresh_lease(block_name, settings, wait_seconds=max(attempt.remaining(), 1.0))
            )
        except (TimeoutError, TokenBlockError) as exc:
            if attempt.remaining() > 1.0 and isinstance(exc, TokenBlockError):
                raise  # not a wait that ran out: the Prefect API failed; its message says so
            failure = _lease_timeout(block_name, settings, attempt)
        if failure is not None:
            raise failure  # outside the except block: no chained lease error
        yield


def refresh_through_deployment(
    block_name: str,
    settings: CarbonMapperSettings,
    attempt: Attempt,
    fresh: Callable[[], bool],
) -> None:
    """Make sure a run of the refresh deployment has renewed block_name; wait for it.

    Args:
        block_name: the token block the caller reads; passed to the run as `token_block`.
        settings: `CM_REFRESH_DEPLOYMENT` and `CM_REFRESH_TIMEOUT`.
        attempt: when the caller started asking, and its deadline.
        fresh: re-reads the block; True once it holds a token the caller can use.

    Raises:
        ConfigurationError: the deployment does not exist on this Prefect API.
        RefreshRunError: the run failed, crashed or was cancelled (names the run and gives its
            state message), or completed without leaving a usable token in the block.
        RefreshTimeoutError: the run was not picked up by a worker, or did not finish, in time.
    """
    with get_client(sync_client=True) as client:
        waiter = _Waiter(client, settings, block_name, attempt)
        waiter.run(fresh)


@dataclass
class _Waiter:
    client: SyncPrefectClient
    settings: CarbonMapperSettings
    block_name: str
    attempt: Attempt
    own_runs: int = 0
    deployment: Any = field(default=None)

    def run(self, fresh: Callable[[], bool]) -> None:
        self.deployment = _call(self.settings, _read_deployment, self.client, self.settings)
        run = self._recent_run() or self._start_run()
        while True:
            run = self._wait_final(run)
            if run.state_type == StateType.COMPLETED:
                if fresh():
                    return
                if self._writes_our_block(run) or self.own_runs >= _MAX_OWN_RUNS:
                    raise self._stale_after(run)
                # A run for another block (or with the worker's default) went first.
                run = self._start_run()
            elif run.state_type == StateType.CANCELLED:
                busy = self._busy_run(exclude=run)
                if busy is None:
                    # The run that held the slot may have ended between two polls, leaving
                    # the block renewed: only a block still stale makes the cancel an error.
                    if fresh():
                        return
                    raise self._run_error(run, "was cancelled")
                current_logger().info(
                    "The refresh run %r was cancelled by the concurrency limit of deployment %r; "
                    "waiting for its run %r, which is already running.",
                    run.name,
                    self.settings.refresh_deployment,
                    busy.name,
                )
                run = busy
            else:
                raise self._run_error(
                    run, "failed" if run.state_type == StateType.FAILED else "crashed"
                )

    # -- finding and starting runs ---------------------------------------------------------

    def _writes_our_block(self, run: FlowRun) -> bool:
        return run.parameters.get(TOKEN_BLOCK_PARAMETER) == self.block_name

    def _runs(self) -> list[FlowRun]:
        """Recent and current runs of the deployment, newest first (future schedules left out)."""
        horizon = datetime.now(timezone.utc) + timedelta(minutes=1)
        runs: list[FlowRun] = _call(
            self.settings,
            self.client.read_flow_runs,
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment.id])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(before_=horizon)
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=_RECENT_RUNS,
        )
        return runs

    def _recent_run(self) -> FlowRun | None:
        """A run for our block that failed since we asked (raised), or one to join."""
        runs = [run for run in self._runs() if self._writes_our_block(run)]
        for run in runs:
            ended = run.end_time
            if run.state_type in _BROKEN and ended is not None and ended >= self.attempt.asked_at:
                # Another caller's run, finished while this one waited for the lease: its
                # outcome is ours too. Starting another run here would retry in a loop.
                raise self._run_error(
                    run, "failed" if run.state_type == StateType.FAILED else "crashed"
                )
        for run in runs:
            if run.state_type not in _FINAL:
                current_logger().info(
                    "Waiting for the refresh run %r of deployment %r, started by another caller.",
                    run.name,
                    self.settings.refresh_deployment,
                )
                return run
        return None

    def _busy_run(self, exclude: FlowRun) -> FlowRun | None:
        """The run of the deployment that holds its concurrency slot (pending or running)."""
        for run in self._runs():
            if run.id != exclude.id and run.state_type in _BUSY:
                return run
        return None

    def _start_run(self) -> FlowRun:
        self.own_runs += 1
        run: FlowRun = _call(
            self.settings,
            self.client.create_flow_run_from_deployment,
            self.deployment.id,
            # Only a block name: flow-run parameters are stored in plain text. No
            # parent_task_run_id: a separate flow run, never a subflow of the caller's run.
            parameters={TOKEN_BLOCK_PARAMETER: self.block_name},
            # Prefect's client sends the POST again after a read time-out or a dropped
            # connection; on a busy server the first may have made the run already. The key
            # makes the second return that run instead of a duplicate that CANCEL_NEW cancels.
            idempotency_key=f"cm-tasks-refresh-{uuid4()}",
        )
        current_logger().info(
            "The STAC token in block %r is missing or about to expire: started run %r of "
            "deployment %r to renew it; waiting up to %.0f s.",
            self.block_name,
            run.name,
            self.settings.refresh_deployment,
            self.attempt.timeout,
        )
        return run

    def _wait_final(self, run: FlowRun) -> FlowRun:
        delay = _FIRST_POLL_SECONDS
        while True:
            run = _call(self.settings, self.client.read_flow_run, run.id)
            if run.state_type in _FINAL:
                return run
            remaining = self.attempt.remaining()
            if remaining <= 0:
                raise _timeout(run, self.deployment, self.block_name, self.settings, self.attempt)
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, _MAX_POLL_SECONDS)

    # -- errors ------------------------------------------------------------------------------

    def _run_error(self, run: FlowRun, what: str) -> RefreshRunError:
        message = (run.state.message if run.state else None) or "no message"
        return RefreshRunError(
            f"The refresh run {run.name!r} of deployment {self.settings.refresh_deployment!r} "
            f"{what}: {message.strip()} The token in block {self.block_name!r} was not renewed. "
            "See that run's logs in the Prefect UI, fix the cause on the refresh side "
            f"(its worker's credential blocks, `cm-tasks login`), then try again.{self._hint()}",
            flow_run_name=run.name,
            flow_run_id=str(run.id),
            state_type=_state_type(run),
        )

    def _hint(self) -> str:
        # A deployment made for another block (`cm-tasks deploy`/`serve` with CM_TOKEN_BLOCK
        # set) fails a run asked for the default block with ParameterConflictError, whose
        # advice is about the deployment; the setting to change is this process's.
        params = getattr(self.deployment, "parameters", None) or {}
        theirs = params.get(TOKEN_BLOCK_PARAMETER)
        if not isinstance(theirs, str) or theirs == self.block_name:
            return ""
        return (
            f" Note: the deployment itself renews block {theirs!r} (its {TOKEN_BLOCK_PARAMETER} "
            f"parameter), and this process asked for {self.block_name!r} (its CM_TOKEN_BLOCK): "
            f"if {theirs!r} is the block to use, set CM_TOKEN_BLOCK={theirs} here."
        )

    def _stale_after(self, run: FlowRun) -> RefreshRunError:
        return RefreshRunError(
            f"The refresh run {run.name!r} of deployment {self.settings.refresh_deployment!r} "
            f"completed, but block {self.block_name!r} still has no token valid long enough "
            "for this caller. The run may have saved a token with a short lifetime "
            "(CM_TOKEN_LIFETIME_DAYS where the worker runs, shorter than min_valid), or the "
            "API keeps rejecting the new token.",
            flow_run_name=run.name,
            flow_run_id=str(run.id),
            state_type=_state_type(run),
        )


def _state_type(run: FlowRun) -> str | None:
    return run.state_type.value if run.state_type is not None else None


def _read_deployment(client: SyncPrefectClient, settings: CarbonMapperSettings) -> Any:
    try:
        return client.read_deployment_by_name(settings.refresh_deployment)
    except ObjectNotFound:
        raise ConfigurationError(
            f"CM_REFRESH_MODE is deployment, but the refresh deployment "
            f"{settings.refresh_deployment!r} does not exist on the Prefect API at "
            f"{PREFECT_API_URL.value() or '(local)'}. Deploy it with `cm-tasks deploy`, or "
            "set CM_REFRESH_DEPLOYMENT to the FLOW_NAME/DEPLOYMENT_NAME of yours."
        ) from None


def _call(
    settings: CarbonMapperSettings, call: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """One Prefect API call; a failure of the API becomes a RefreshRunError saying which."""
    failure: RefreshRunError | None = None
    try:
        return call(*args, **kwargs)
    except (ConfigurationError, RefreshRunError):
        raise
    except Exception as exc:
        status = exc.response.status_code if isinstance(exc, PrefectHTTPStatusError) else None
        if status in (401, 403):
            failure = RefreshRunError(
                f"The Prefect API refused ({status}) to run or follow the refresh deployment "
                f"{settings.refresh_deployment!r}: the identity of this process must be allowed "
                "to read that deployment and to create and read its flow runs.",
            )
        else:
            failure = RefreshRunError(
                f"Could not run or follow the refresh deployment "
                f"{settings.refresh_deployment!r} ({type(exc).__name__}"
                f"{f' {status}' if status else ''} from the Prefect API). Check that the "
                "Prefect API is reachable (PREFECT_API_URL).",
                transient=status is None or status in (408, 429, 500, 502, 503, 504),
            )
    raise failure  # outside the except block: the Prefect error is not chained


def _timeout(
    run: FlowRun,
    deployment: Any,
    block_name: str,
    settings: CarbonMapperSettings,
    attempt: Attempt,
) -> RefreshTimeoutError:
    pool = deployment.work_pool_name
    if run.state_type == StateType.SCHEDULED:
        where = (
            f"work pool {pool!r}: start a worker there, with the credential blocks "
            f"(`prefect worker start --pool {pool}`)"
            if pool
            else "the process that serves the deployment (it has no work pool): start it"
        )
        what = (
            f"was scheduled but not picked up by any worker within {attempt.timeout:g} s. "
            f"It waits on {where}"
        )
        then = (
            "the run stays queued and the next caller waits for it. Raise CM_REFRESH_TIMEOUT "
            "to wait longer."
        )
    else:
        what = (
            f"is still {run.state_name or _state_type(run)} after {attempt.timeout:g} s "
            f"(work pool {pool!r}); see its logs in the Prefect UI"
        )
        # A run whose worker died stays Running; before Prefect 3.4 it also keeps the
        # deployment's concurrency slot for good, so that every later run is cancelled.
        then = (
            "if the run's worker is gone, free the deployment's concurrency slot "
            f"(`prefect gcl update deployment:{deployment.id} --active-slots 0`, needed on "
            "Prefect before 3.4); otherwise raise CM_REFRESH_TIMEOUT to wait longer."
        )
    return RefreshTimeoutError(
        f"The refresh run {run.name!r} of deployment {settings.refresh_deployment!r} {what}. "
        f"The token in block {block_name!r} was not renewed; {then}",
        flow_run_name=run.name,
        flow_run_id=str(run.id),
        state_type=_state_type(run),
        transient=True,
    )


def _lease_timeout(
    block_name: str, settings: CarbonMapperSettings, attempt: Attempt
) -> RefreshTimeoutError:
    """Why the lease did not come free in time: the run another caller waits for, if any."""
    try:
        with get_client(sync_client=True) as client:
            waiter = _Waiter(client, settings, block_name, attempt)
            waiter.deployment = _read_deployment(client, settings)
            for run in waiter._runs():
                if waiter._writes_our_block(run) and run.state_type not in _FINAL:
                    return _timeout(run, waiter.deployment, block_name, settings, attempt)
    except Exception:  # only a better message was at stake  # noqa: S110
        pass
    stuck = (
        ""
        if prefect_has_leases()
        else " This Prefect has no leases: if no caller is waiting any more, a killed one "
        f"kept the lease; free it with `prefect gcl update {lease_name(block_name)} "
        "--active-slots 0`."
    )
    return RefreshTimeoutError(
        f"Waited {attempt.timeout:g} s (CM_REFRESH_TIMEOUT) for another caller's refresh of "
        f"block {block_name!r} without the block being renewed. Check the latest run of the "
        f"deployment {settings.refresh_deployment!r} in the Prefect UI, and that a worker "
        f"serves its work pool.{stuck}",
        transient=True,
    )
