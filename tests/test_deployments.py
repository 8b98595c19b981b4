"""One source of truth: prefect.yaml, `cm-tasks deploy` and `cm-tasks serve` against the specs.

`cm_tasks.deployments.DEPLOYMENTS` holds the schedules, concurrency limits, descriptions, tags
and entrypoints. prefect.yaml is compared with it field by field; `deploy` and `serve` are run
against the session's real Prefect API and what the API then holds is compared with it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from cm_tasks.cli import EXIT_USAGE, main
from cm_tasks.deployments import (
    DAILY_CHECK,
    DEFAULT_POOL,
    DEPLOYMENTS,
    WEEKLY_REFRESH,
    DeploymentSpec,
    build_deployments,
    deploy,
    deployment_specs,
    serve,
    validate_pool_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("cm-tasks")
SERVE_WAIT_SECONDS = 90.0


def _yaml_deployments() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in config["deployments"]}


def _spec_as_yaml(spec: DeploymentSpec) -> dict[str, Any]:
    """The prefect.yaml fields a spec decides, in prefect.yaml's shape."""
    return {
        "entrypoint": spec.entrypoint,
        "description": spec.description,
        "tags": list(spec.tags),
        "schedules": [{"cron": spec.cron, "timezone": spec.timezone, "active": True}],
        "concurrency_limit": {
            "limit": spec.concurrency_limit,
            "collision_strategy": spec.collision_strategy,
        },
        "work_pool": {"name": DEFAULT_POOL, "job_variables": {}},
    }


def _spec_as_api(spec: DeploymentSpec) -> dict[str, Any]:
    """The API's record of a deployment, as far as a spec decides it."""
    return {
        "name": spec.name,
        "entrypoint": spec.entrypoint,
        "description": spec.description,
        "tags": list(spec.tags),
        "schedules": [(spec.cron, spec.timezone, True)],
        "concurrency": (spec.concurrency_limit, spec.collision_strategy),
    }


def _api_record(deployment: Any) -> dict[str, Any]:
    limit = deployment.global_concurrency_limit or deployment.concurrency_limit
    return {
        "name": deployment.name,
        "entrypoint": deployment.entrypoint,
        "description": deployment.description,
        "tags": list(deployment.tags),
        "schedules": [
            (s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules
        ],
        "concurrency": (
            getattr(limit, "limit", limit),
            deployment.concurrency_options.collision_strategy.value,
        ),
    }


def _read(full_name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(full_name)


@pytest.fixture
def no_deployments() -> Iterator[None]:
    """Start and end without the cm-tasks deployments (the session's API is shared)."""

    def delete_all() -> None:
        with get_client(sync_client=True) as client:
            for spec in DEPLOYMENTS:
                try:
                    client.delete_deployment(client.read_deployment_by_name(spec.full_name).id)
                except ObjectNotFound:
                    continue

    delete_all()
    yield
    delete_all()


# --- the specs and prefect.yaml ----------------------------------------------------------------


def test_specs_name_the_deployments_users_rely_on() -> None:
    assert [s.full_name for s in DEPLOYMENTS] == [
        "refresh-stac-token/weekly",
        "check-stac-token/daily",
    ]
    assert (WEEKLY_REFRESH.cron, WEEKLY_REFRESH.timezone) == ("0 6 * * 1", "UTC")
    assert (DAILY_CHECK.cron, DAILY_CHECK.timezone) == ("0 7 * * *", "UTC")
    for spec in DEPLOYMENTS:
        assert (spec.concurrency_limit, spec.collision_strategy) == (1, "CANCEL_NEW")
        assert spec.description
        assert "carbon-mapper" in spec.tags
        # The entrypoint loads the flow whose name the full name starts with.
        assert spec.load_flow().name == spec.flow_name
    assert deployment_specs(watchdog=False) == (WEEKLY_REFRESH,)


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=lambda s: s.full_name)
def test_prefect_yaml_agrees_with_the_spec(spec: DeploymentSpec) -> None:
    declared = _yaml_deployments()[spec.name]

    assert {key: declared.get(key) for key in _spec_as_yaml(spec)} == _spec_as_yaml(spec)


def test_prefect_yaml_has_no_package_deployment_the_specs_lack() -> None:
    """Every deployment with a package entrypoint is a spec, but the shipped examples."""
    package_entrypoints = {
        d["name"]: d["entrypoint"]
        for d in _yaml_deployments().values()
        if d["entrypoint"].startswith("cm_tasks.")
        and not d["entrypoint"].startswith("cm_tasks.examples.")
    }
    assert package_entrypoints == {s.name: s.entrypoint for s in DEPLOYMENTS}
    assert not any(s.entrypoint.endswith(".py") or ":" in s.entrypoint for s in DEPLOYMENTS)


# --- what deploy and serve build ---------------------------------------------------------------


@pytest.mark.parametrize("pool", [DEFAULT_POOL, None], ids=["deploy", "serve"])
def test_deploy_and_serve_build_their_deployments_from_the_specs(pool: str | None) -> None:
    built = build_deployments(work_pool_name=pool)

    assert [d.name for d in built] == [s.name for s in DEPLOYMENTS]
    for deployment, spec in zip(built, DEPLOYMENTS, strict=True):
        assert deployment.flow_name == spec.flow_name
        assert deployment.entrypoint == spec.entrypoint
        assert deployment.work_pool_name == pool
        assert deployment.description == spec.description
        assert deployment.tags == list(spec.tags)
        assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [
            (spec.cron, spec.timezone)
        ]
        assert deployment.concurrency_limit == spec.concurrency_limit
        assert deployment.concurrency_options is not None
        assert deployment.concurrency_options.collision_strategy.value == spec.collision_strategy
    assert [d.name for d in build_deployments(watchdog=False)] == ["weekly"]


@pytest.mark.parametrize("bad", ["", "  ", "team/pool", "a%b", "x>y"])
def test_a_bad_pool_name_is_refused_before_any_api_call(bad: str) -> None:
    with pytest.raises(ValueError, match="work pool name"):
        validate_pool_name(bad)
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--pool", bad])
    assert exited.value.code == EXIT_USAGE


def test_next_run_follows_the_cron_in_utc() -> None:
    from datetime import datetime, timezone

    sunday_noon = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)

    assert WEEKLY_REFRESH.next_run(sunday_noon) == datetime(2026, 11, 30, 6, tzinfo=timezone.utc)
    assert DAILY_CHECK.next_run(sunday_noon) == datetime(2026, 11, 30, 7, tzinfo=timezone.utc)


# --- deploy against the session's Prefect API --------------------------------------------------


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
        assert _api_record(stored) == _spec_as_api(spec)
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


@pytest.mark.parametrize("command", ["deploy", "serve"])
def test_a_bad_setting_is_a_usage_error_before_any_api_call(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CM_TOKEN_BLOCK", "Bad_Name")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there

    with pytest.raises(SystemExit) as exited:
        main([command])

    assert exited.value.code == EXIT_USAGE
    assert "CM_TOKEN_BLOCK" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "why"),
    [("{not json", "not valid JSON"), ('["image"]', "give a JSON object")],
)
def test_bad_job_variables_are_refused_before_any_api_call(
    value: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--job-variables", value])

    assert exited.value.code == EXIT_USAGE
    assert why in capsys.readouterr().err


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


# --- serve, as a process of its own -------------------------------------------------------------


def test_serve_pauses_what_a_broken_prefect_shutdown_left_active(
    no_deployments: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect 3.4's runner, stopped by SIGTERM mid-run, paused only the first deployment.

    Scripted here: a Prefect `serve` that registers the deployments, then stops without
    pausing them, as that runner does after its failed cancel.
    """
    import prefect

    def serve_then_break(*served: Any) -> None:
        for runner_deployment in served:
            runner_deployment.apply()
        raise KeyboardInterrupt

    monkeypatch.setattr(prefect, "serve", serve_then_break)

    with pytest.raises(KeyboardInterrupt):
        serve()

    for spec in DEPLOYMENTS:
        assert _read(spec.full_name).paused is True, spec.full_name


def test_serve_registers_the_same_deployments_and_stops_cleanly_on_sigterm(
    no_deployments: None, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CM_"))}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + SERVE_WAIT_SECONDS
        served: dict[str, Any] = {}
        while len(served) < len(DEPLOYMENTS) and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            for spec in DEPLOYMENTS:
                try:
                    served[spec.full_name] = _read(spec.full_name)
                except ObjectNotFound:
                    time.sleep(0.5)
        assert len(served) == len(DEPLOYMENTS)
        # Polling has begun once the runner prints its banner; stop it then.
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "Stopped." in output
    for spec in DEPLOYMENTS:
        stored = served[spec.full_name]
        assert _api_record(stored) == _spec_as_api(spec)
        assert stored.work_pool_name is None  # served: no pool, no worker
