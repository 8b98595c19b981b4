"""`cm-tasks deploy` (and `serve`'s shutdown) against the session's real Prefect API.

What the API holds afterwards is compared with the specs of `cm_tasks.deployments`
(tests/unit/test_deployment_specs.py compares prefect.yaml and the built deployments with them).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from cm_tasks.cli import EXIT_USAGE, main
from cm_tasks.deployments import (
    DAILY_CHECK,
    DEFAULT_POOL,
    DEPLOYMENTS,
    WEEKLY_REFRESH,
    ServedNotPausedError,
    deploy,
    serve,
)
from tests.support.deploy import api_record, spec_as_api


def _read(full_name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(full_name)


def test_deploy_creates_the_pool_and_deployments_then_updates_them(no_deployments: None) -> None:
    pool = "cm-tasks-deploy-test"

    first = deploy(pool)
    second = deploy(pool)

    assert (first.pool.name, first.pool.type, first.pool.created) == (pool, "process", True)
    assert second.pool.created is False
    assert [r.action for r in first.deployments] == ["created", "created"]
    assert [r.action for r in second.deployments] == ["updated", "updated"]
    # Idempotent: the same deployments, each with its one schedule.
    assert [r.deployment_id for r in first.deployments] == [
        r.deployment_id for r in second.deployments
    ]
    for spec in DEPLOYMENTS:
        stored = _read(spec.full_name)
        assert api_record(stored) == spec_as_api(spec)
        assert stored.work_pool_name == pool
        assert not stored.pull_steps  # nothing that names a path of this machine
        assert stored.path is None


def test_deploy_command_prints_what_it_made_and_the_next_run(
    no_deployments: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--no-watchdog"])
    out = capsys.readouterr().out

    assert exited.value.code == 0, out
    assert f"Work pool {DEFAULT_POOL!r} (process)" in out
    assert "Created refresh-stac-token/weekly: cron '0 6 * * 1' (UTC)" in out
    assert "next run " in out
    assert "check-stac-token" not in out
    assert f"prefect worker start --pool {DEFAULT_POOL}" in out
    with pytest.raises(ObjectNotFound):
        _read(DAILY_CHECK.full_name)


def test_deploy_carries_this_environments_block_names_into_the_run_form(
    no_deployments: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CM_* block names and lifetime become parameters, so the form shows what runs use."""
    monkeypatch.setenv("CM_TOKEN_BLOCK", "team-a-stac-token")
    monkeypatch.setenv("CM_TOKEN_LIFETIME_DAYS", "21")

    with pytest.raises(SystemExit) as exited:
        main(["deploy"])
    out = capsys.readouterr().out

    assert exited.value.code == 0, out
    assert _read(WEEKLY_REFRESH.full_name).parameters == {
        "token_block": "team-a-stac-token",
        "lifetime_days": 21,
    }
    assert _read(DAILY_CHECK.full_name).parameters == {"token_block": "team-a-stac-token"}
    assert '{"lifetime_days": 21, "token_block": "team-a-stac-token"}' in out


def test_deploy_with_default_settings_sets_no_parameters(no_deployments: None) -> None:
    deploy("cm-tasks-deploy-test")

    assert _read(WEEKLY_REFRESH.full_name).parameters == {}
    assert _read(DAILY_CHECK.full_name).parameters == {}


def test_an_image_for_a_missing_pool_is_refused_not_given_a_process_pool(
    no_deployments: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--pool my-docker --job-variables '{"image": ...}'` must not create a process pool.

    A process worker ignores `image` and would run the refresh on its own host.
    """
    pool = "cm-tasks-missing-docker-pool"
    variables = json.dumps({"image": "registry.example/cm-tasks:0.2.0"})

    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--pool", pool, "--job-variables", variables])
    err = capsys.readouterr().err

    assert exited.value.code == EXIT_USAGE, err
    assert "image" in err
    assert f"prefect work-pool create {pool} --type docker" in err
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):
            client.read_work_pool(pool)
        for spec in DEPLOYMENTS:
            with pytest.raises(ObjectNotFound):
                client.read_deployment_by_name(spec.full_name)


def test_a_job_variable_an_existing_pool_lacks_is_refused(
    no_deployments: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing process pool has no `image` either; its own variables (env) still pass."""
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--no-watchdog", "--job-variables", json.dumps({"image": "x/y:1"})])
    err = capsys.readouterr().err
    assert exited.value.code == EXIT_USAGE, err
    assert f"Work pool {DEFAULT_POOL!r} (process) has no job variable image" in err
    with pytest.raises(ObjectNotFound):
        _read(WEEKLY_REFRESH.full_name)

    env = {"env": {"CM_TIMEOUT": "60"}}
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--no-watchdog", "--job-variables", json.dumps(env)])
    assert exited.value.code == 0, capsys.readouterr().err
    assert _read(WEEKLY_REFRESH.full_name).job_variables == env


def test_deploy_to_a_container_pool_sets_the_image(
    no_deployments: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A docker or kubernetes pool needs only an image with cm-tasks installed."""
    from prefect.client.schemas.actions import WorkPoolCreate

    pool, image = "cm-tasks-container-test", "registry.example/cm-tasks:0.2.0"
    template = {
        "job_configuration": {"image": "{{ image }}"},
        "variables": {"type": "object", "properties": {"image": {"type": "string"}}},
    }
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(
            WorkPoolCreate(name=pool, type="docker", base_job_template=template)
        )

    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--pool", pool, "--job-variables", json.dumps({"image": image})])
    out = capsys.readouterr().out

    assert exited.value.code == 0, out
    assert f"Work pool {pool!r} (docker): exists" in out
    for spec in DEPLOYMENTS:
        stored = _read(spec.full_name)
        assert stored.work_pool_name == pool
        assert stored.job_variables == {"image": image}


def test_serve_pauses_what_a_broken_prefect_shutdown_left_active(
    no_deployments: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect 3.4's runner, stopped by SIGTERM mid-run, paused only the first deployment.

    Scripted here: a Prefect `serve` that registers the deployments, then stops without
    pausing them, as that runner does after its failed cancel (and as it is asked to: the
    pause is ours, bounded in time).
    """
    from cm_tasks import deployments

    def broken_shutdown(*_args: Any) -> None:  # registered by Prefect's runner, then this
        raise KeyboardInterrupt

    monkeypatch.setattr(deployments, "_run_until_stopped", broken_shutdown)

    assert serve() == [spec.full_name for spec in DEPLOYMENTS]  # a return, once paused

    for spec in DEPLOYMENTS:
        assert _read(spec.full_name).paused is True, spec.full_name


def test_a_second_stop_during_the_pause_says_the_schedules_are_not_paused(
    no_deployments: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a reviewer: SIGTERM, then SIGINT 50 ms later (a second Ctrl-C, a service
    # manager's follow-up) cut the pause short, and `cm-tasks serve` said "paused" anyway.
    from prefect.client.orchestration import SyncPrefectClient

    from cm_tasks import deployments

    def stopped(*_args: Any) -> None:  # registered by Prefect's runner, then stopped
        raise KeyboardInterrupt

    def stopped_again(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(deployments, "_run_until_stopped", stopped)
    monkeypatch.setattr(SyncPrefectClient, "update_deployment", stopped_again)

    with pytest.raises(ServedNotPausedError, match="stopped again before the pause was done"):
        serve()

    assert not any(_read(spec.full_name).paused for spec in DEPLOYMENTS)


def test_a_second_sigterm_during_the_pause_meets_the_handler_from_before_prefects_runner(
    no_deployments: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a reviewer on Prefect 3.4: its runner leaves its SIGTERM handler behind, and
    # that one raises RuntimeError("Runner has not yet started"): a second SIGTERM during the
    # pause made `cm-tasks serve` fail with a traceback and exit 1, the schedules unpaused.
    import os
    import signal

    from prefect.client.orchestration import SyncPrefectClient

    from cm_tasks import deployments

    def runners_handler(*_args: Any) -> None:
        raise RuntimeError("Runner has not yet started")

    def serve_then_stop(*_args: Any) -> None:  # registered by Prefect's runner, then this
        signal.signal(signal.SIGTERM, runners_handler)
        raise KeyboardInterrupt

    def sigterm_again(*_args: Any, **_kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(deployments, "_run_until_stopped", serve_then_stop)
    monkeypatch.setattr(SyncPrefectClient, "update_deployment", sigterm_again)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as `cm-tasks serve`
    try:
        with pytest.raises(ServedNotPausedError, match="stopped again"):
            serve()
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
