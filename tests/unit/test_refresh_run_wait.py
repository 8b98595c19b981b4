"""Deployment mode's wait for the refresh run: a metered read only when the run may be final."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from prefect.client.schemas.objects import StateType

from cm_tasks import _deployment_refresh
from cm_tasks._deployment_refresh import _Runs
from cm_tasks._token_events import Heard
from tests.support.streams import ScriptedStream


def _runs(reads: list[str], events: ScriptedStream | None = None) -> _Runs:
    """The runs of a deployment whose run is Completed once its last event was sent."""
    runs = _Runs.__new__(_Runs)  # no deployment read: only the wait is under test

    def read_flow_run(run_id: str) -> Any:
        reads.append(run_id)
        done = events is None or not events.heard
        return SimpleNamespace(
            id=run_id, state_type=StateType.COMPLETED if done else StateType.RUNNING
        )

    runs.client = SimpleNamespace(read_flow_run=read_flow_run)  # type: ignore[assignment]
    runs.call = lambda fn, *args, **kwargs: fn(*args, **kwargs)
    return runs


def test_the_run_is_read_once_on_its_final_event_not_on_its_way_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prefect 3.9's workers add Submitting (and InfrastructurePending) before Running: each
    # used to cost the process that started the run a read of it.
    names = ["Pending", "Submitting", "InfrastructurePending", "Running", "heartbeat"]
    now = datetime.now(timezone.utc)
    events = ScriptedStream([Heard(f"prefect.flow-run.{n}", now) for n in [*names, "Completed"]])
    monkeypatch.setattr(_deployment_refresh, "Listener", events)
    reads: list[str] = []
    started = SimpleNamespace(id="run-1", state_type=StateType.SCHEDULED)

    run = _runs(reads, events).wait_final(started, time.monotonic() + 60)  # type: ignore[arg-type]

    assert run.state_type == StateType.COMPLETED
    assert reads == ["run-1"]


def test_a_run_that_is_already_final_is_not_read_again() -> None:
    reads: list[str] = []
    failed = SimpleNamespace(id="run-2", state_type=StateType.FAILED)

    assert _runs(reads).wait_final(failed, time.monotonic() + 60) is failed  # type: ignore[arg-type]
    assert reads == []
