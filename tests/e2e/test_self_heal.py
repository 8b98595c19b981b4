"""Self-healing, end to end: a missed weekly refresh is made up at the next daily check.

What an operator has after `cm-tasks deploy` and one worker: the daily check finds a token
that will not outlast the next weekly run, emits `carbon-mapper.stac-token.expiring`, and the
weekly refresh's deployment trigger starts a refresh that renews the token - no person in the
loop. `--no-self-heal` leaves the trigger out. With the platform down, each check starts at
most one refresh run.

A real `prefect server start` (its triggers service turns the event into the run), the real
`cm-tasks` console script, and a real `prefect worker start` whose flow runs talk to the
emulator over HTTP.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks import CarbonMapperStacToken
from cm_tasks.deployments import DAILY_CHECK, WEEKLY_REFRESH
from cm_tasks.notify import EXPIRING_EVENT
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.prefect_server import PrefectServer, free_port, stop_process_group
from tests.support.token_helpers import EMAIL_BLOCK, PASSWORD_BLOCK, TOKEN_BLOCK

CM_TASKS = str(Path(sys.executable).with_name("cm-tasks"))
POOL = "carbon-mapper"
# The request body of the UI's Quick run (DeploymentQuickRunOverflowMenuItem).
QUICK_RUN = {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI with defaults"}}
RUN_WAIT_SECONDS = 240.0  # a worker subprocess imports Prefect twice per run on a busy machine
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@contextmanager
def using(server: PrefectServer) -> Iterator[None]:
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _cm_env(server: PrefectServer, base_url: str) -> dict[str, str]:
    """A client environment for the server, with no CM_* of the developer's but these."""
    env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
    env.update(CM_BASE_URL=base_url, CM_RETRY_BACKOFF="0", CM_TIMEOUT="5")
    return env


def _deploy(server: PrefectServer, base_url: str, *options: str) -> str:
    result = subprocess.run(
        [CM_TASKS, "deploy", "--pool", POOL, *options],
        env=_cm_env(server, base_url),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@contextmanager
def worker(server: PrefectServer, base_url: str, tmp_path: Path) -> Iterator[None]:
    """`prefect worker start --pool carbon-mapper`, polling every second, until the block ends."""
    env = _cm_env(server, base_url)
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [server.executable, "worker", "start", "--pool", POOL],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield
    finally:
        stop_process_group(process)
        log.close()


def _deployment(http: httpx.Client, full_name: str) -> dict[str, Any]:
    response = http.get(f"deployments/name/{full_name}")
    response.raise_for_status()
    return dict(response.json())


def _runs(http: httpx.Client, deployment_id: str) -> list[dict[str, Any]]:
    """The deployment's runs, but those its schedule made for later."""
    response = http.post(
        "flow_runs/filter",
        json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC"},
    )
    response.raise_for_status()
    return [r for r in response.json() if not r["auto_scheduled"]]


def _wait_for(what: str, found: Any, timeout: float = RUN_WAIT_SECONDS) -> Any:
    """Poll found() until it returns something truthy (a state reached), or fail saying what."""
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _failed_refreshes(
    http: httpx.Client, weekly: dict[str, Any], before: set[str], count: int
) -> bool:
    """Whether count refresh runs, made after before, have ended."""
    return (
        len([r for r in _runs(http, weekly["id"]) if r["id"] not in before and _final(r)]) >= count
    )


def _final(run: dict[str, Any]) -> bool:
    return run["state_type"] in FINAL


def _quick_run(http: httpx.Client, deployment: dict[str, Any]) -> str:
    response = http.post(f"deployments/{deployment['id']}/create_flow_run", json=QUICK_RUN)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _run_state(http: httpx.Client, flow_run_id: str) -> dict[str, Any] | None:
    run = http.get(f"flow_runs/{flow_run_id}").json()
    return dict(run) if _final(run) else None


def _expiring_events(http: httpx.Client, flow_run_id: str) -> list[dict[str, Any]]:
    response = http.post(
        "events/filter", json={"filter": {"event": {"name": [EXPIRING_EVENT]}}, "limit": 50}
    )
    response.raise_for_status()
    related = f"prefect.flow-run.{flow_run_id}"
    return [
        e
        for e in response.json()["events"]
        if any(r["prefect.resource.id"] == related for r in e["related"])
    ]


def _owned_automations(http: httpx.Client, deployment_id: str) -> list[dict[str, Any]]:
    """The automations Prefect made from the deployment's triggers (owned by it)."""
    response = http.get(f"automations/related-to/prefect.deployment.{deployment_id}")
    response.raise_for_status()
    return list(response.json())


def _token_with_days_left(server: PrefectServer, base_url: str, days: float) -> datetime:
    expires_at = datetime.now(timezone.utc) + timedelta(days=days)
    with using(server):
        CarbonMapperStacToken(
            token="not-a-real-token-value-0123456789",  # type: ignore[arg-type]
            name="about-to-run-out",
            expires_at=expires_at,
            created_at=expires_at - timedelta(days=14),
            scopes=["stac"],
            base_url=base_url,
        ).save(TOKEN_BLOCK, overwrite=True)
    return expires_at


@pytest.fixture(scope="module")
def credentials(server: PrefectServer, emulator: CarbonMapperEmulator) -> CarbonMapperEmulator:
    with using(server):
        Secret(value=emulator.email).save(EMAIL_BLOCK, overwrite=True)
        Secret(value=emulator.password).save(PASSWORD_BLOCK, overwrite=True)
    return emulator


def test_a_check_that_finds_the_token_expiring_starts_a_refresh_that_renews_it(
    server: PrefectServer, credentials: CarbonMapperEmulator, tmp_path: Path
) -> None:
    base_url = credentials.base_url
    printed = _deploy(server, base_url)
    assert f"also started by the event {EXPIRING_EVENT}" in printed
    old_expiry = _token_with_days_left(server, base_url, 2)

    with server.http() as http, worker(server, base_url, tmp_path):
        weekly = _deployment(http, WEEKLY_REFRESH.full_name)
        assert _runs(http, weekly["id"]) == []
        check_id = _quick_run(http, _deployment(http, DAILY_CHECK.full_name))
        check = _wait_for("the daily check", lambda: _run_state(http, check_id))
        assert check["state_type"] == "FAILED", check["state"]  # it warns: 2 days left
        refresh = _wait_for(
            "the triggered refresh to finish",
            lambda: [r for r in _runs(http, weekly["id"]) if _final(r)],
        )

    assert len(refresh) == 1
    assert refresh[0]["state_type"] == "COMPLETED", refresh[0]["state"]
    with using(server):
        token = CarbonMapperStacToken.load(TOKEN_BLOCK)
    assert token.expires_at > old_expiry + timedelta(days=11)  # a new 14-day token
    assert token.name != "about-to-run-out"


def test_no_self_heal_leaves_the_trigger_out_and_nothing_starts(
    server: PrefectServer, credentials: CarbonMapperEmulator, tmp_path: Path
) -> None:
    base_url = credentials.base_url
    _deploy(server, base_url)  # with the trigger: --no-self-heal must remove it
    with server.http() as http:
        weekly = _deployment(http, WEEKLY_REFRESH.full_name)
        assert len(_owned_automations(http, weekly["id"])) == 1
    printed = _deploy(server, base_url, "--no-self-heal")
    assert EXPIRING_EVENT not in printed
    expiry = _token_with_days_left(server, base_url, 2)

    with server.http() as http:
        assert _owned_automations(http, weekly["id"]) == []
        before = {r["id"] for r in _runs(http, weekly["id"])}
        with worker(server, base_url, tmp_path):
            check_id = _quick_run(http, _deployment(http, DAILY_CHECK.full_name))
            check = _wait_for("the daily check", lambda: _run_state(http, check_id))
            assert check["state_type"] == "FAILED", check["state"]
            # The event reached the server, which had nothing to start with it.
            _wait_for("the expiring event", lambda: _expiring_events(http, check_id))
        assert {r["id"] for r in _runs(http, weekly["id"])} == before
    with using(server):
        assert CarbonMapperStacToken.load(TOKEN_BLOCK).expires_at == expiry


def test_with_the_platform_down_each_check_starts_at_most_one_refresh(
    server: PrefectServer, credentials: CarbonMapperEmulator, tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}/api/v1/"  # nothing listens there
    _deploy(server, down)
    expiry = _token_with_days_left(server, credentials.base_url, 2)

    with server.http() as http, worker(server, down, tmp_path):
        weekly = _deployment(http, WEEKLY_REFRESH.full_name)
        daily = _deployment(http, DAILY_CHECK.full_name)
        before = {r["id"] for r in _runs(http, weekly["id"])}
        for checks in (1, 2):
            check_id = _quick_run(http, daily)
            check = _wait_for("the check", partial(_run_state, http, check_id))
            assert check["state_type"] == "FAILED", check["state"]
            _wait_for(
                f"refresh run {checks} to fail",
                partial(_failed_refreshes, http, weekly, before, checks),
            )
        triggered = [r for r in _runs(http, weekly["id"]) if r["id"] not in before]

    assert len(triggered) == 2  # one per check, no flood
    assert {r["state_type"] for r in triggered} == {"FAILED"}
    with using(server):  # the stored token is untouched by the failed refreshes
        assert CarbonMapperStacToken.load(TOKEN_BLOCK).expires_at == expiry
