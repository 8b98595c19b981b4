"""The deployment specs (`cm_tasks.deployments`), prefect.yaml, and what deploy and serve build.

`cm_tasks.deployments.DEPLOYMENTS` holds the schedules, concurrency limits, descriptions, tags
and entrypoints. prefect.yaml is compared with it field by field, and the deployments that
`cm-tasks deploy` and `cm-tasks serve` build are compared with it too, without a Prefect API;
bad input to both commands is refused before any API call. tests/integration/test_deploy.py
runs them against a Prefect API, tests/e2e/test_serve.py runs `cm-tasks serve` as a process.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cm_tasks.cli import EXIT_USAGE, main
from cm_tasks.deployments import (
    DAILY_CHECK,
    DEFAULT_POOL,
    DEPLOYMENTS,
    WEEKLY_REFRESH,
    DeploymentSpec,
    build_deployments,
    deployment_specs,
    validate_pool_name,
)
from tests.support import REPO_ROOT


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
    """Every deployment of a package flow is a spec; the examples (cm_tasks.examples) are not."""
    package_entrypoints = {
        d["name"]: d["entrypoint"]
        for d in _yaml_deployments().values()
        if d["entrypoint"].startswith("cm_tasks.")
        and not d["entrypoint"].startswith("cm_tasks.examples.")
    }
    assert package_entrypoints == {s.name: s.entrypoint for s in DEPLOYMENTS}
    assert not any(s.entrypoint.endswith(".py") or ":" in s.entrypoint for s in DEPLOYMENTS)


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
