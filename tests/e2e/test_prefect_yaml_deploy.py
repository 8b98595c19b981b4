"""End to end: prefect.yaml on a real `prefect server start`, runs executed by a process worker.

What an operator does, in order: create the work pool, `prefect --no-prompt deploy --all`
from the checkout, click Quick run (`POST /deployments/{id}/create_flow_run` with no
parameters, as the UI does), and let `prefect worker start --pool carbon-mapper` run it. The
worker's flow-run subprocesses inherit its environment, which points them at the emulator.

One server, deployed once, per test process (`prefect_yaml_server`, tests/e2e/conftest.py): it
is the expensive part, shared with tests/e2e/test_run_form.py.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import prefect
import yaml

from cm_tasks import CarbonMapperStacToken
from cm_tasks.notify import EXPIRING_EVENT, REFRESHED_EVENT
from cm_tasks.testing import CarbonMapperEmulator
from tests.support import REPO_ROOT
from tests.support.deploy import (
    DAILY,
    POOL,
    WEEKLY,
    assert_no_secret,
    create_run,
    load_token,
    read_flow_run,
    read_logs,
    run_worker,
)
from tests.support.prefect_server import PrefectServer, prefect_executable
from tests.support.token_helpers import EMAIL_BLOCK, PASSWORD_BLOCK, TOKEN_BLOCK

EVENT_WAIT_SECONDS = 30.0
WATCHDOG_TOKEN = "not-a-real-token-value-0123456789"


def _artifacts(http: httpx.Client, flow_run_id: str) -> list[dict[str, Any]]:
    response = http.post(
        "artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    response.raise_for_status()
    return list(response.json())


def _all_events(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.post("events/filter", json={"limit": 50})
    response.raise_for_status()
    page = response.json()
    events = list(page["events"])
    while page.get("next_page"):
        page = http.get(page["next_page"]).json()
        events += page["events"]
    return events


def _run_events(http: httpx.Client, name: str, flow_run_id: str) -> list[dict[str, Any]]:
    """Events called name related to the flow run; polled, as the server persists in batches."""
    related_id = f"prefect.flow-run.{flow_run_id}"
    deadline = time.monotonic() + EVENT_WAIT_SECONDS
    while True:
        response = http.post(
            "events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50}
        )
        response.raise_for_status()
        found = [
            event
            for event in response.json()["events"]
            if any(r["prefect.resource.id"] == related_id for r in event["related"])
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_prefect_yaml_declares_what_the_readme_promises() -> None:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in config["deployments"]}

    weekly = by_name["weekly"]
    assert weekly["entrypoint"] == "cm_tasks.flows.refresh_stac_token"
    assert weekly["work_pool"]["name"] == POOL
    assert weekly["schedules"] == [{"cron": "0 6 * * 1", "timezone": "UTC", "active": True}]
    assert weekly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert weekly["description"]
    assert weekly["tags"]
    assert by_name["daily"]["entrypoint"] == "cm_tasks.flows.check_stac_token"
    # The package's deployments need no checkout: no build step, no path in the pull step.
    assert config["build"] is None
    assert config["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "."}}
    ]


def test_the_server_runs_the_same_prefect_as_this_process(
    prefect_yaml_server: PrefectServer,
) -> None:
    # `make compat` runs this suite in one venv per Prefect version: the server (and so every
    # worker and CLI call, same executable) must be that version too, never another install's.
    with prefect_yaml_server.http() as http:
        response = http.get("admin/version")
    response.raise_for_status()
    assert response.json() == prefect.__version__
    assert Path(prefect_executable()).parent == Path(sys.executable).parent


def test_deploy_creates_the_deployments_as_configured(deployments: dict[str, Any]) -> None:
    weekly = deployments[WEEKLY]
    assert weekly["work_pool_name"] == POOL
    assert weekly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert [s["schedule"]["cron"] for s in weekly["schedules"]] == ["0 6 * * 1"]
    assert weekly["schedules"][0]["schedule"]["timezone"] == "UTC"
    # Module-path entrypoint and no path of this checkout: the worker imports the package.
    assert weekly["entrypoint"] == "cm_tasks.flows.refresh_stac_token"
    assert weekly["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "."}}
    ]
    for deployment in deployments.values():
        schema = deployment["parameter_openapi_schema"]
        # Quick run opens no dialog: nothing required, and every field described in the form.
        assert not schema.get("required")
        assert all(p.get("description") for p in schema["properties"].values())
    properties = weekly["parameter_openapi_schema"]["properties"]
    lifetime = properties["lifetime_days"]
    assert (lifetime["minimum"], lifetime["maximum"]) == (1, 365)
    # Concrete defaults, no `X | None` switch: the run form shows what a run uses.
    assert {name: p["default"] for name, p in properties.items()} == {
        "token_name": "",
        "lifetime_days": 14,
        "email_block": EMAIL_BLOCK,
        "password_block": PASSWORD_BLOCK,
        "token_block": TOKEN_BLOCK,
        "base_url": "https://api.carbonmapper.org/api/v1/",
    }
    assert not any("anyOf" in p for p in properties.values())


def test_the_server_enforces_the_parameter_limits(
    prefect_yaml_server: PrefectServer, deployments: dict[str, Any]
) -> None:
    with prefect_yaml_server.http() as http:
        response = http.post(
            f"deployments/{deployments[WEEKLY]['id']}/create_flow_run",
            json={"parameters": {"lifetime_days": 0}},
        )
    assert response.status_code == 409, response.text
    assert "lifetime_days" in response.text


def test_quick_run_on_a_worker_refreshes_the_token(
    prefect_yaml_server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    before = len(emulator.issued_stac_tokens)
    with prefect_yaml_server.http() as http:
        flow_run_id = create_run(http, deployments[WEEKLY])

        worker_output = run_worker(prefect_yaml_server, emulator)

        flow_run = read_flow_run(http, flow_run_id)
        assert flow_run["state"]["type"] == "COMPLETED", worker_output
        assert flow_run["parameters"] == {}
        assert len(emulator.issued_stac_tokens) == before + 1
        token = load_token(prefect_yaml_server)
        assert token.get() == emulator.issued_stac_tokens[-1]
        assert token.base_url == emulator.base_url

        events = _run_events(http, REFRESHED_EVENT, flow_run_id)
        assert len(events) == 1
        event = events[0]
        assert event["resource"]["prefect.resource.id"] == f"carbon-mapper.stac-token.{TOKEN_BLOCK}"
        assert event["payload"]["token_name"] == token.name
        assert datetime.fromisoformat(event["payload"]["expires_at"]) == token.expires_at
        related = {r["prefect.resource.id"] for r in event["related"]}
        assert f"prefect.deployment.{deployments[WEEKLY]['id']}" in related

        artifacts = _artifacts(http, flow_run_id)
        assert [a["key"] for a in artifacts] == [TOKEN_BLOCK]
        assert artifacts[0]["type"] == "markdown"
        assert token.name in artifacts[0]["data"]
        assert "Days left" in artifacts[0]["data"]

        assert_no_secret(
            emulator,
            events=json.dumps(_all_events(http)),
            artifacts=json.dumps(artifacts),
            logs=json.dumps(read_logs(http, flow_run_id)),
            flow_run=json.dumps(flow_run),
            worker=worker_output,
        )


def test_a_second_run_at_once_is_cancelled_and_the_block_stays_consistent(
    prefect_yaml_server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    before = len(emulator.issued_stac_tokens)
    with prefect_yaml_server.http() as http:
        run_ids = [create_run(http, deployments[WEEKLY]) for _ in range(2)]

        worker_output = run_worker(prefect_yaml_server, emulator)

        runs = [read_flow_run(http, run_id) for run_id in run_ids]
        states = sorted(run["state"]["type"] for run in runs)
        assert states == ["CANCELLED", "COMPLETED"], worker_output
        cancelled = next(run for run in runs if run["state"]["type"] == "CANCELLED")
        assert "concurrency limit" in cancelled["state"]["message"]
    # Only the run that went ahead reached the API, and the block holds what it got.
    assert len(emulator.issued_stac_tokens) == before + 1
    token = load_token(prefect_yaml_server)
    assert token.get() == emulator.issued_stac_tokens[-1]
    assert token.name == emulator.stac_token_requests[-1]["name"]


def test_watchdog_deployment_fails_and_emits_expiring(
    prefect_yaml_server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    block_name = "expiring-token"
    expires_at = datetime.now(timezone.utc) + timedelta(days=1)
    with prefect_yaml_server.using():
        CarbonMapperStacToken(
            token=WATCHDOG_TOKEN,
            name="old-token",
            expires_at=expires_at,
            created_at=expires_at - timedelta(days=14),
            base_url=emulator.base_url,
        ).save(block_name, overwrite=True)
    requests_before = emulator.requests()
    with prefect_yaml_server.http() as http:
        flow_run_id = create_run(
            http, deployments[DAILY], {"parameters": {"token_block": block_name}}
        )

        worker_output = run_worker(prefect_yaml_server, emulator)

        flow_run = read_flow_run(http, flow_run_id)
        assert flow_run["state"]["type"] == "FAILED", worker_output
        assert "EXPIRING" in flow_run["state"]["message"]
        assert "prefect deployment run refresh-stac-token/weekly" in flow_run["state"]["message"]
        events = _run_events(http, EXPIRING_EVENT, flow_run_id)
        assert len(events) == 1
        assert events[0]["resource"]["prefect.resource.id"] == (
            f"carbon-mapper.stac-token.{block_name}"
        )
        assert events[0]["payload"]["state"] == "EXPIRING"
        assert events[0]["payload"]["token_name"] == "old-token"
        assert 0 < events[0]["payload"]["days_left"] <= 1
        # (A failed run also gets Prefect's own unkeyed result artifact: its exception.)
        artifacts = [a for a in _artifacts(http, flow_run_id) if a["type"] == "markdown"]
        assert [a["key"] for a in artifacts] == [f"{block_name}-check"]
        assert "Days left" in artifacts[0]["data"]
        assert "not-a-real-token-value" not in json.dumps(events) + json.dumps(artifacts)
    assert emulator.requests() == requests_before  # the watchdog never calls the API


def test_server_files_hold_no_plaintext_secret(
    prefect_yaml_server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    """After the runs above: the server's whole PREFECT_HOME (SQLite database, WAL, logs)."""
    from tests.support.leaks import collect_secrets, scan_prefect_home

    secrets = collect_secrets(emulator, extra={"watchdog test token": WATCHDOG_TOKEN})
    assert len(secrets) > 2  # the module's runs issued tokens: an empty list would prove nothing

    report = scan_prefect_home(prefect_yaml_server.home, secrets)

    assert any(path.endswith(".db") for path in report.scanned), report.scanned
    assert report.hits == []
