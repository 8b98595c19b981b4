"""`cm-tasks deploy` and `serve` carry the shell's CM_BASE_URL into the refresh (issue 17.4).

On the old code the block names reached the deployment's parameters but the API did not: a
worker started without CM_BASE_URL sent the run to the production API.
"""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client

from cm_tasks.cli import main
from cm_tasks.deployments import DAILY_CHECK, WEEKLY_REFRESH, build_deployments

STAGING = "https://staging.example.org/api/v1/"


def _parameters(full_name: str) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        return dict(client.read_deployment_by_name(full_name).parameters)


def test_deploy_carries_the_api_and_prints_it(
    no_deployments: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CM_BASE_URL", STAGING.rstrip("/"))

    with pytest.raises(SystemExit) as exited:
        main(["deploy"])
    out = capsys.readouterr().out

    assert exited.value.code == 0, out
    assert _parameters(WEEKLY_REFRESH.full_name) == {"base_url": STAGING}
    assert _parameters(DAILY_CHECK.full_name) == {}  # the check reads the block only
    assert f'{{"base_url": "{STAGING}"}}' in out


def test_serve_builds_its_deployments_with_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_BASE_URL", STAGING)

    weekly, daily = build_deployments(watchdog=True)

    assert weekly.parameters == {"base_url": STAGING}
    assert daily.parameters == {}


def test_the_default_api_is_not_written_as_a_parameter(no_deployments: None) -> None:
    weekly, _daily = build_deployments(watchdog=True)
    assert weekly.parameters == {}
