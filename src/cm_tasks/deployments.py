"""The cm-tasks deployments, in one place: `cm-tasks deploy`, `cm-tasks serve` and prefect.yaml.

Two deployments keep the STAC token fresh and watched:

- `refresh-stac-token/weekly`: a new token every Monday at 06:00 UTC;
- `check-stac-token/daily` (the watchdog): checks the saved token every day at 07:00 UTC.

They heal a missed refresh by themselves: the weekly refresh has a deployment trigger on the
event `carbon-mapper.stac-token.expiring`, which the daily check emits when the token will not
last until the next weekly run plus a day (see `cm_tasks.watchdog`). A weekly run that failed
(the platform down for the day, no worker) is made up at the next daily check, with no person
involved. One check emits one event and starts at most one refresh; the refresh's concurrency
limit (1, CANCEL_NEW) keeps two from running at once. `cm-tasks deploy --no-self-heal` leaves
the trigger out (and removes one an earlier deploy made).

`DEPLOYMENTS` holds their schedules, concurrency limits, descriptions and tags. `cm-tasks
deploy` and `cm-tasks serve` build their Prefect deployments from it, and a test compares
`prefect.yaml` with it, so that the three cannot drift apart.

The entrypoints are module paths (`cm_tasks.flows.refresh_stac_token`), not file paths: any
process with cm-tasks installed can load them - a worker on another host, in a container image
or on a managed pool - with no checkout and no pull step that names a local directory.

Example:
    ```python
    from cm_tasks.deployments import deploy

    for result in deploy(pool="carbon-mapper").deployments:
        print(result.full_name, result.action, result.next_run)
    ```
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from cm_tasks import _compat
from cm_tasks.errors import CarbonMapperError
from cm_tasks.schedules import (
    DAILY_CHECK_CRON,
    SCHEDULE_TIMEZONE,
    WEEKLY_REFRESH_CRON,
    next_fire,
)

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import WorkPool
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_POOL = "carbon-mapper"
# `cm-tasks deploy` creates the pool with this type when it does not exist: a process worker
# runs each flow run in a subprocess of its own environment, which has cm-tasks installed.
DEFAULT_POOL_TYPE = "process"
# Characters Prefect refuses in work pool names (prefect.utilities.names).
_BANNED_POOL_CHARACTERS = "/%&><"
_SYNC_ONLY = (
    "cm_tasks.deployments works from synchronous code only: in an event loop, run it in a "
    "thread (asyncio.to_thread)."
)


@dataclass(frozen=True)
class DeploymentSpec:
    """How one cm-tasks deployment runs: what, when, how many at once, and its UI texts.

    Attributes:
        flow_name: The flow's name (`@flow(name=...)`), the first half of the full name.
        name: The deployment's name, the second half: `flow_name/name`.
        entrypoint: Module path of the flow object, e.g. `cm_tasks.flows.refresh_stac_token`.
        cron: Cron schedule, evaluated in `timezone`.
        description: Shown on the deployment's page in the UI.
        tags: UI and filter tags.
        timezone: Time zone of the cron schedule.
        concurrency_limit: Runs of this deployment that may run at once.
        collision_strategy: What happens to a run beyond the limit: CANCEL_NEW cancels it.
        watchdog: True for the optional expiry check (`cm-tasks deploy --no-watchdog` skips it).
        triggered_by: An event that starts a run of this deployment when it is about the token
            block the deployment writes (self-healing; `--no-self-heal` leaves it out).
    """

    flow_name: str
    name: str
    entrypoint: str
    cron: str
    description: str
    tags: tuple[str, ...]
    timezone: str = SCHEDULE_TIMEZONE
    concurrency_limit: int = 1
    collision_strategy: Literal["CANCEL_NEW", "ENQUEUE"] = "CANCEL_NEW"
    watchdog: bool = False
    triggered_by: str | None = None

    @property
    def full_name(self) -> str:
        """`flow-name/deployment-name`, as `prefect deployment run` takes it."""
        return f"{self.flow_name}/{self.name}"

    def load_flow(self) -> Flow[..., Any]:
        """Import the flow object that `entrypoint` names (what a worker does to run it)."""
        module_name, _, attribute = self.entrypoint.rpartition(".")
        loaded: Flow[..., Any] = getattr(importlib.import_module(module_name), attribute)
        return loaded

    def to_deployment(
        self,
        work_pool_name: str | None = None,
        job_variables: Mapping[str, Any] | None = None,
        *,
        self_heal: bool = True,
    ) -> RunnerDeployment:
        """Build the Prefect `RunnerDeployment` of this spec, with a module-path entrypoint.

        Args:
            work_pool_name: The pool whose workers run it; None for `serve` (no pool).
            job_variables: Overrides of the pool's job template, e.g. `{"image": ...}` for a
                docker or kubernetes pool, `{"pip_packages": ["cm-tasks"]}` for a managed one.
            self_heal: Give the deployment its `triggered_by` trigger, if it has one. Without
                it, deploying removes a trigger an earlier deploy made (Prefect replaces a
                deployment's own triggers on every apply).
        """
        from prefect.client.schemas.objects import ConcurrencyLimitConfig
        from prefect.client.schemas.schedules import CronSchedule
        from prefect.types.entrypoint import EntrypointType

        flow = self.load_flow()
        parameters = self.parameters(flow)
        # Synchronous from synchronous code on every Prefect 3 (sync_compatible/async_dispatch).
        deployment = flow.to_deployment(
            name=self.name,
            schedules=[CronSchedule(cron=self.cron, timezone=self.timezone)],
            concurrency_limit=ConcurrencyLimitConfig(
                limit=self.concurrency_limit,
                collision_strategy=self.collision_strategy,
            ),
            description=self.description,
            tags=list(self.tags),
            work_pool_name=work_pool_name,
            job_variables=dict(job_variables or {}),
            entrypoint_type=EntrypointType.MODULE_PATH,
            parameters=parameters,
            triggers=self.triggers(parameters) if self_heal else [],
        )
        if inspect.isawaitable(deployment):
            raise RuntimeError(_SYNC_ONLY)
        if deployment.entrypoint != self.entrypoint:
            # Prefect derives it from the flow's module and function name: a renamed module
            # or flow function must be renamed here too, or prefect.yaml would disagree.
            raise RuntimeError(
                f"Deployment {self.full_name} got the entrypoint {deployment.entrypoint!r}, "
                f"not {self.entrypoint!r}: update cm_tasks.deployments."
            )
        return deployment

    @staticmethod
    def parameters(flow: Flow[..., Any]) -> dict[str, Any]:
        """The deployment parameters that carry this environment's `CM_*` API, blocks and lifetime.

        Empty where the settings are the package defaults. Otherwise the run form shows the
        values this environment uses, and a run started by `serve` (or by a worker with the
        same settings) writes and reads the same blocks as `get_stac_token()` here - see
        `cm_tasks.run_parameters` for the rule.
        """
        from cm_tasks.run_parameters import PAIRS, deployment_parameters
        from cm_tasks.settings import load_settings

        names = [name for name in flow.parameters.properties if name in PAIRS]
        return deployment_parameters(names, load_settings())

    def triggers(self, parameters: Mapping[str, Any]) -> list[Any]:
        """The deployment trigger of `triggered_by`, for the token block this deployment writes.

        Matched on the event's resource, `carbon-mapper.stac-token.<block>`: a check of another
        block does not start this refresh. Reactive, threshold 1: one event starts one run,
        with the deployment's own parameters.
        """
        if self.triggered_by is None:
            return []
        from prefect.events import DeploymentEventTrigger

        from cm_tasks.notify import token_resource
        from cm_tasks.settings import load_settings

        block = str(parameters.get("token_block") or load_settings().token_block)
        return [
            DeploymentEventTrigger(
                name=f"{self.full_name} on {self.triggered_by}",
                description=(
                    f"Start {self.full_name} when the daily check finds the token in block "
                    f"{block} missing, expired or expiring (cm-tasks self-healing)."
                ),
                expect={self.triggered_by},
                match={"prefect.resource.id": token_resource(block)["prefect.resource.id"]},
            )
        ]

    def next_run(self, after: datetime | None = None) -> datetime:
        """When the schedule fires next after `after` (default now), as the server computes it."""
        return next_fire(self.cron, after, self.timezone)


WEEKLY_REFRESH = DeploymentSpec(
    flow_name="refresh-stac-token",
    name="weekly",
    entrypoint="cm_tasks.flows.refresh_stac_token",
    cron=WEEKLY_REFRESH_CRON,
    description=(
        "Get a new Carbon Mapper STAC token every Monday at 06:00 UTC and save it to the "
        "CarbonMapperStacToken block (default carbon-mapper-stac-token) that ingest flows load. "
        "Credentials come from the Secret blocks carbon-mapper-email and carbon-mapper-password "
        "(`cm-tasks login`). No parameter is required: Quick run uses the defaults."
    ),
    tags=("carbon-mapper", "stac-token"),
    triggered_by="carbon-mapper.stac-token.expiring",  # cm_tasks.notify.EXPIRING_EVENT
)

DAILY_CHECK = DeploymentSpec(
    flow_name="check-stac-token",
    name="daily",
    entrypoint="cm_tasks.flows.check_stac_token",
    cron=DAILY_CHECK_CRON,
    description=(
        "Check every day at 07:00 UTC that the saved STAC token is not missing, expired or "
        "about to expire: it must outlast the next weekly refresh by a day, and have more "
        "than 3 days left. Fails and emits the event carbon-mapper.stac-token.expiring when "
        "it does not, which starts refresh-stac-token/weekly (self-healing). Reads the block "
        "only: no call to the Carbon Mapper API."
    ),
    tags=("carbon-mapper", "stac-token", "watchdog"),
    watchdog=True,
)

#: Every deployment that `cm-tasks deploy` and `cm-tasks serve` make, in order.
DEPLOYMENTS: tuple[DeploymentSpec, ...] = (WEEKLY_REFRESH, DAILY_CHECK)


def deployment_specs(watchdog: bool = True) -> tuple[DeploymentSpec, ...]:
    """The specs to deploy or serve: all of them, or all but the watchdog."""
    return tuple(spec for spec in DEPLOYMENTS if watchdog or not spec.watchdog)


def build_deployments(
    *, watchdog: bool = True, work_pool_name: str | None = None, self_heal: bool = True
) -> list[RunnerDeployment]:
    """The Prefect deployments of `deployment_specs(watchdog)`, for a pool or for `serve`."""
    return [
        spec.to_deployment(work_pool_name, self_heal=self_heal)
        for spec in deployment_specs(watchdog)
    ]


def validate_pool_name(value: str) -> str:
    """Return value if Prefect accepts it as a work pool name, else raise ValueError saying why."""
    name = value.strip()
    if not name:
        raise ValueError("a work pool name must not be empty")
    banned = sorted({c for c in name if c in _BANNED_POOL_CHARACTERS})
    if banned:
        raise ValueError(f"a work pool name may not contain {' '.join(banned)}")
    return name


@dataclass(frozen=True)
class DeployResult:
    """What `deploy` did for one deployment."""

    spec: DeploymentSpec
    deployment_id: UUID
    action: Literal["created", "updated"]
    pool: str
    next_run: datetime

    @property
    def full_name(self) -> str:
        """`flow-name/deployment-name`."""
        return self.spec.full_name


@dataclass(frozen=True)
class PoolResult:
    """The work pool `deploy` used: its name, type, and whether `deploy` created it."""

    name: str
    type: str
    created: bool


def ensure_work_pool(name: str = DEFAULT_POOL) -> PoolResult:
    """Return the work pool called name, creating it as a `process` pool if there is none.

    An existing pool is used as it is, whatever its type (docker, kubernetes, managed): its
    workers need only an environment with cm-tasks installed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool: WorkPool = client.read_work_pool(name)
        except ObjectNotFound:
            pass
        else:
            return PoolResult(name=pool.name, type=pool.type, created=False)
        try:
            pool = client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=DEFAULT_POOL_TYPE,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:  # created by someone else meanwhile: use theirs
            pool = client.read_work_pool(name)
            return PoolResult(name=pool.name, type=pool.type, created=False)
    return PoolResult(name=pool.name, type=pool.type, created=True)


class JobVariablesError(ValueError):
    """A job variable the work pool has no use for: its workers would silently ignore it."""


def check_job_variables(pool: str, job_variables: Mapping[str, Any] | None) -> None:
    """Raise JobVariablesError for a job variable the pool would not use, before any write.

    Prefect stores job variables its pool's template has no use for, and its workers ignore
    them: `--pool my-docker --job-variables '{"image": ...}'` with no such pool would create a
    process pool, and its worker would run the refresh on its own host, not in the image.
    """
    if not job_variables:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found: WorkPool | None = client.read_work_pool(pool)
        except ObjectNotFound:
            found = None
    if found is None:
        template = ProcessWorker.get_default_base_job_template()
    else:
        template = found.base_job_template
    properties = template.get("variables", {}).get("properties")
    if not isinstance(properties, dict):  # a template without a schema: nothing to check
        return
    unknown = sorted(set(job_variables) - set(properties))
    if not unknown:
        return
    names = ", ".join(unknown)
    if found is None:
        raise JobVariablesError(
            f"Work pool {pool!r} does not exist, and a missing pool is created as type "
            f"{DEFAULT_POOL_TYPE}, which has no job variable {names}. Create the pool with its "
            f"type first, e.g. `prefect work-pool create {pool} --type docker`, then deploy "
            "again."
        )
    raise JobVariablesError(
        f"Work pool {pool!r} ({found.type}) has no job variable {names}: its workers would "
        f"ignore it. Its job variables are: {', '.join(sorted(properties))}."
    )


def _existing_deployment_ids(names: Sequence[str]) -> dict[str, UUID]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found: dict[str, UUID] = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                found[name] = client.read_deployment_by_name(name).id
            except ObjectNotFound:
                continue
    return found


@dataclass(frozen=True)
class DeployReport:
    """What `deploy` did: the pool it used and one result per deployment."""

    pool: PoolResult
    deployments: list[DeployResult]


def deploy(
    pool: str = DEFAULT_POOL,
    *,
    watchdog: bool = True,
    job_variables: Mapping[str, Any] | None = None,
    self_heal: bool = True,
) -> DeployReport:
    """Create or update the cm-tasks deployments on a work pool; safe to run again.

    Creates the pool (type `process`) when there is none. Each deployment gets its schedule,
    concurrency limit, description and tags from `DEPLOYMENTS`, a module-path entrypoint and
    no pull step: a worker needs cm-tasks installed, nothing else. Running it again updates
    the deployments in place (same IDs, one schedule each).

    Args:
        pool: Work pool whose workers run the deployments.
        watchdog: Also deploy `check-stac-token/daily`.
        job_variables: Job variables of both deployments, e.g. `{"image": "you/cm-tasks:0.2.0"}`
            for a docker or kubernetes pool or `{"pip_packages": ["cm-tasks"]}` for a Prefect
            managed pool. Stored in plain text: never put a password here.
        self_heal: Start the weekly refresh when the daily check emits
            `carbon-mapper.stac-token.expiring` (a deployment trigger). False leaves the
            trigger out, and removes one an earlier deploy made.

    Returns:
        The pool (and whether it was created), and one result per deployment: created or
        updated, its ID, and its next scheduled run.

    Raises:
        ValueError: pool is not a valid work pool name (before any API call).
        JobVariablesError: a job variable is one the pool (or the process pool it would
            create) does not have (before anything is written).

    Example:
        ```python
        from cm_tasks.deployments import deploy

        report = deploy("carbon-mapper", watchdog=False)
        assert [r.full_name for r in report.deployments] == ["refresh-stac-token/weekly"]
        ```
    """
    pool = validate_pool_name(pool)
    check_job_variables(pool, job_variables)
    pool_result = ensure_work_pool(pool)
    specs = deployment_specs(watchdog)
    existing = _existing_deployment_ids([spec.full_name for spec in specs])
    results = []
    for spec in specs:
        deployment_id = spec.to_deployment(pool, job_variables, self_heal=self_heal).apply(
            work_pool_name=pool
        )
        if not isinstance(deployment_id, UUID):
            raise RuntimeError(_SYNC_ONLY)
        results.append(
            DeployResult(
                spec=spec,
                deployment_id=deployment_id,
                action="updated" if spec.full_name in existing else "created",
                pool=pool,
                next_run=spec.next_run(),
            )
        )
    return DeployReport(pool=pool_result, deployments=results)


def serve(*, watchdog: bool = True, self_heal: bool = True) -> list[str]:
    """Run the cm-tasks deployments from this process until Ctrl-C or SIGTERM (no pool, no worker).

    Prefect's `serve`: registers the deployments (the same names, schedules and limits as
    `deploy`), then polls for their scheduled runs and for runs started from the UI or with
    `prefect deployment run`, and executes them here. On shutdown it pauses the schedules it
    registered, as nothing runs them any more; `serve` or `deploy` again resumes them. A stop
    while Prefect registers a deployment or prepares its runner takes effect once that is done.

    Args:
        watchdog: Also serve `check-stac-token/daily`.
        self_heal: Give the weekly refresh its trigger on the expiring event (see `deploy`).

    Returns:
        Once stopped, the full names of the deployments it registered, whose schedules are
        now paused: none if it was stopped before it registered any.

    Raises:
        ServedNotPausedError: stopped, but the schedules could not be paused: the Prefect API
            did not answer (each call waits at most `PAUSE_TIMEOUT_SECONDS`), or a second
            stop cut the registration or the pause short. They may still be active.

    Example:
        ```python
        from cm_tasks.deployments import serve

        serve(watchdog=False)  # blocks until Ctrl-C
        ```
    """
    from prefect.exceptions import TerminationSignal

    registered: list[str] = []
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        # Until Prefect's runner takes the signals over, a stop is held (see _stops_held).
        with _stops_held() as stops:
            served = build_deployments(watchdog=watchdog, self_heal=self_heal)
            runner = _register(served, registered, stops)
        if not stops:
            _run_until_stopped(runner, served)
    except (KeyboardInterrupt, TerminationSignal):
        pass  # Ctrl-C, or SIGTERM outside Prefect's runner and the held steps (`cm-tasks serve`)
    except SystemExit as exc:  # Prefect's SIGTERM handler exits 0
        if exc.code not in (0, None):
            raise
    except RuntimeError as exc:
        if not _compat.stopped_before_start(exc):
            raise
    finally:
        # Prefect's runner leaves its SIGTERM handler behind (3.4's raises "Runner has not
        # yet started" then): a second stop during the pause meets the one from before.
        if on_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    _pause_served(registered)
    return registered


def _register(served: Sequence[RunnerDeployment], registered: list[str], stops: list[int]) -> Any:
    """Prefect's runner for served, with each deployment registered until a stop is noted.

    What `prefect.serve` does before it runs the runner. Prefect's runner registers each
    deployment from a thread of its own and waits for it here: a stop raised meanwhile left
    that registration running, to make the deployment active again after the pause (seen on
    Prefect 3.9); so this runs while stops are held. Its own pause on shutdown is off:
    `_pause_served` pauses, in bounded time (Prefect's retries an API that stopped with this
    process for over a minute, then fails with a traceback).

    Args:
        served: the deployments to register.
        registered: filled with the full name of each deployment once it is registered.
        stops: the stops noted so far (`_stops_held`); none is registered after one.
    """
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=False)
    for deployment in served:
        if stops:
            break
        runner.add_deployment(deployment)
        registered.append(f"{deployment.flow_name}/{deployment.name}")
    # What the runner imports before it takes SIGTERM over (Prefect 3.2-3.9: 1-2 s): raised
    # inside an import, a stop would come out as another error.
    importlib.import_module("prefect.runner.server")
    return runner


def _run_until_stopped(runner: Any, served: Sequence[RunnerDeployment]) -> None:
    """Prefect's banner, then its runner polls and runs until stopped (as `prefect.serve`)."""
    _compat.show_serve_banner(served)
    asyncio.run(runner.start())


@contextmanager
def _stops_held() -> Iterator[list[int]]:
    """Note SIGINT and SIGTERM instead of acting on them; a second one gives up at once.

    Yields the signals noted. Only the main thread can handle signals: elsewhere, none is held.
    """
    stops: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return

    def note(signum: int, _frame: object) -> None:
        if stops:  # a second Ctrl-C: the registration in flight may still activate a schedule
            raise ServedNotPausedError("stopped again while a deployment was being registered")
        stops.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stops
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, left as it is
                signal.signal(signum, handler)


def _pause_served(full_names: Sequence[str]) -> None:
    """Pause the served deployments' schedules, giving up soon if the Prefect API is gone.

    The one pause on shutdown (Prefect's is turned off). Bounded: Prefect's client retries
    a lost connection 5 times (2 + 4 + 8 + 16 + 32 s), so a server stopped together with
    this process (both children of a killed shell) held the stop for 70-80 s. Also covers
    Prefect 3.4's runner, which, stopped while a run is in flight, pauses one deployment only.

    Raises:
        ServedNotPausedError: the Prefect API did not answer (or answered with an error).
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    bounded = {PREFECT_CLIENT_MAX_RETRIES: 1, PREFECT_API_REQUEST_TIMEOUT: PAUSE_TIMEOUT_SECONDS}
    try:
        with temporary_settings(updates=bounded), get_client(sync_client=True) as client:
            for full_name in full_names:
                try:
                    found = client.read_deployment_by_name(full_name)
                except ObjectNotFound:
                    continue
                if not found.paused:
                    client.update_deployment(found.id, DeploymentUpdate(paused=True))
    except (httpx.HTTPError, OSError) as exc:
        # Not chained: the error's request carries the Prefect API key in its headers.
        raise ServedNotPausedError(_no_answer(exc)) from None
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C, or SIGINT after SIGTERM
        raise ServedNotPausedError("stopped again before the pause was done") from None


def _no_answer(exc: Exception) -> str:
    from cm_tasks._prefect_calls import status_of

    # Only the type and status: an API error body can quote the values sent.
    status = status_of(exc)
    answer = f"answered {status}" if status else "did not answer"
    return f"the Prefect API {answer} ({type(exc).__name__})"


PAUSE_TIMEOUT_SECONDS = 5.0
"""How long `serve`'s pause on shutdown waits for each answer of the Prefect API."""


class ServedNotPausedError(CarbonMapperError):
    """`serve` stopped, but the pause of its schedules did not finish."""

    transient = True

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the served deployments' schedules could not be paused: {reason}. Nothing runs "
            "them now: pause them in the UI (once the Prefect API answers), or run "
            "`cm-tasks serve` again."
        )
