"""A caller whose clock is off from the Prefect server's still reads the refresh runs right.

Run times (expected start, start, end) are stamped by the Prefect server. Each test sets this
process's clock, as `cm_tasks._deployment_refresh` sees it, minutes off from the session's
Prefect API (whose server runs in a subprocess, on the real clock), and failed on the code that
compared those times with the local clock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import datetime, timedelta, tzinfo
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import ObjectAlreadyExists
from prefect.states import Failed, Running

# What every caller of the module has loaded (cm_tasks.access imports prefect.flows): on
# Prefect 3.2 the state models sent to the API are not fully defined before.
import cm_tasks.access  # noqa: F401
from cm_tasks import (
    CarbonMapperSettings,
    RefreshRunError,
    RefreshTimeoutError,
    _deployment_refresh,
    load_settings,
)
from cm_tasks._deployment_refresh import refresh_through_deployment
from cm_tasks._refresh_lease import refresh_time_bound

WAIT_SECONDS = 2.0  # the deadline of a refresh whose run no worker picks up


def _skew_local_clock(monkeypatch: pytest.MonkeyPatch, skew: timedelta) -> None:
    """This process's clock, as the module reads it, `skew` ahead of the server's."""

    class Skewed(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + skew

    monkeypatch.setattr(_deployment_refresh, "datetime", Skewed)


def _deployment(monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[Any, CarbonMapperSettings]:
    """A refresh deployment of the test's own (no worker, no limit), and settings that use it."""
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name="clock-skew", type="process"))
        flow_id = client.create_flow_from_name("refresh-stac-token")
        deployment_id = client.create_deployment(flow_id, name, work_pool_name="clock-skew")
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", f"refresh-stac-token/{name}")
    return deployment_id, load_settings()


def _run_for(deployment_id: Any, block: str, state: State | None = None) -> FlowRun:
    """A run of the deployment for block, forced into state if one is given."""
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployment_id, parameters={"token_block": block}
        )
        if state is not None:
            client.set_flow_run_state(run.id, state, force=True)
    return run


def _refresh(block: str, settings: CarbonMapperSettings) -> Any:
    return refresh_through_deployment(
        block, settings.base_url, settings, time.monotonic() + WAIT_SECONDS
    )


def _run_ids(client: SyncPrefectClient, deployment_id: Any) -> list[str]:
    only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    return [str(run.id) for run in client.read_flow_runs(deployment_filter=only)]


def test_a_caller_behind_the_server_joins_the_run_just_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: runs were listed up to "now + 1 min" on the local clock; 5 min behind, a run the
    # server had just created was left out and the caller started a second one.
    deployment_id, settings = _deployment(monkeypatch, "skew-behind")
    live = _run_for(deployment_id, "skew-behind-token")
    _skew_local_clock(monkeypatch, -timedelta(minutes=5))

    with pytest.raises(RefreshTimeoutError) as caught:  # no worker: the joined run stays put
        _refresh("skew-behind-token", settings)

    assert caught.value.flow_run_id == str(live.id)
    with get_client(sync_client=True) as client:
        assert _run_ids(client, deployment_id) == [str(live.id)]  # no second run


def test_a_caller_ahead_of_the_server_does_not_crash_a_healthy_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: a run Running for "local now - start time" past the refresh's bound was crashed;
    # a clock that far ahead crashed a run that had just started.
    deployment_id, settings = _deployment(monkeypatch, "skew-ahead")
    healthy = _run_for(deployment_id, "skew-ahead-token", Running())
    bound = timedelta(seconds=refresh_time_bound(settings))
    _skew_local_clock(monkeypatch, bound + timedelta(minutes=5))

    with pytest.raises(RefreshTimeoutError) as caught:
        _refresh("skew-ahead-token", settings)

    assert caught.value.flow_run_id == str(healthy.id)  # joined, not crashed and replaced
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(healthy.id).state_type.value == "RUNNING"
        assert _run_ids(client, deployment_id) == [str(healthy.id)]


def test_a_caller_ahead_of_the_server_gets_the_failure_of_a_run_that_just_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the 60 s hold after a failed run was measured as "local now - end time"; a clock
    # 5 min ahead found every failure older than the hold and started a new run at once.
    deployment_id, settings = _deployment(monkeypatch, "skew-hold")
    failed = _run_for(deployment_id, "skew-hold-token", Failed(message="BadCredentialsError"))
    _skew_local_clock(monkeypatch, timedelta(minutes=5))
    sent: list[str] = []
    send, caller = httpx.Client.send, threading.get_ident()

    def counted(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        # This caller's requests only (not an earlier test's background renewal), and not a
        # new client's CSRF token (self-hosted servers only: Prefect Cloud has none).
        if threading.get_ident() == caller and not request.url.path.endswith("/csrf-token"):
            sent.append(f"{request.method} {request.url.path.split('/api/', 1)[-1]}")
        return send(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", counted)

    outcome = _refresh("skew-hold-token", settings)

    assert isinstance(outcome, RefreshRunError)
    assert outcome.flow_run_id == str(failed.id)
    # The server's time costs no request: the deployment, its runs, its runs again (the
    # failed run, just read with them, is not read once more).
    assert [line.split("/")[0] for line in sent] == [
        "GET deployments",
        "POST flow_runs",
        "POST flow_runs",
    ]
    with get_client(sync_client=True) as client:
        assert _run_ids(client, deployment_id) == [str(failed.id)]  # no new run
