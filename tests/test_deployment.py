"""End to end: prefect.yaml on a real `prefect server start`, runs executed by a process worker.

What an operator does, in order: create the work pool, `prefect --no-prompt deploy --all`
from the checkout, click Quick run (`POST /deployments/{id}/create_flow_run` with no
parameters, as the UI does), and let `prefect worker start --pool carbon-mapper` run it. The
worker's flow-run subprocesses inherit its environment, which points them at the emulator.

One server for the whole module: it is the expensive part (about 10 s to start).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import prefect
import pytest
import yaml
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks import CarbonMapperStacToken
from cm_tasks.notify import EXPIRING_EVENT, REFRESHED_EVENT
from cm_tasks.testing import CarbonMapperEmulator

from .conftest import EMAIL_BLOCK, PASSWORD_BLOCK, TOKEN_BLOCK
from .prefect_server import PrefectServer, prefect_executable, running_prefect_server

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL = "carbon-mapper"
WEEKLY = "refresh-stac-token/weekly"
DAILY = "check-stac-token/daily"
# The request body of the UI's Quick run (DeploymentQuickRunOverflowMenuItem).
QUICK_RUN = {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI with defaults"}}
EVENT_WAIT_SECONDS = 30.0
WATCHDOG_TOKEN = "not-a-real-token-value-0123456789"


@contextmanager
def using(server: PrefectServer) -> Iterator[None]:
    """Run Prefect client code of this process (blocks) against the test's server."""
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as running:
        yield running
    # The helper's promise to whoever reuses it: the server is gone once the block exits.
    assert running.process.poll() is not None


@pytest.fixture(scope="module")
def deployments(server: PrefectServer, emulator: CarbonMapperEmulator) -> dict[str, Any]:
    """The README's steps: a pool, the credentials in Secret blocks, `deploy --all`."""
    server.prefect("work-pool", "create", POOL, "--type", "process")
    with using(server):
        Secret(value=emulator.email).save(EMAIL_BLOCK, overwrite=True)
        Secret(value=emulator.password).save(PASSWORD_BLOCK, overwrite=True)
    deploy = server.prefect("--no-prompt", "deploy", "--all", cwd=REPO_ROOT)
    assert "refresh-stac-token/weekly" in deploy.stdout
    with server.http() as http:
        found = {}
        for name in (WEEKLY, DAILY):
            response = http.get(f"deployments/name/{name}")
            assert response.status_code == 200, response.text
            found[name] = response.json()
    return found


def _run_worker(server: PrefectServer, emulator: CarbonMapperEmulator) -> str:
    """`prefect worker start --pool carbon-mapper --run-once`; returns what it printed."""
    # Nothing of the developer's CM_* settings: the flow runs see the emulator only.
    env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
    env.update(CM_BASE_URL=emulator.base_url, CM_RETRY_BACKOFF="0", CM_TIMEOUT="5")
    started = server.prefect("worker", "start", "--pool", POOL, "--run-once", extra_env=env)
    return started.stdout + started.stderr


def _create_run(
    http: httpx.Client, deployment: dict[str, Any], body: dict[str, Any] | None = None
) -> str:
    response = http.post(f"deployments/{deployment['id']}/create_flow_run", json=body or QUICK_RUN)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _flow_run(http: httpx.Client, flow_run_id: str) -> dict[str, Any]:
    response = http.get(f"flow_runs/{flow_run_id}")
    response.raise_for_status()
    return dict(response.json())


def _artifacts(http: httpx.Client, flow_run_id: str) -> list[dict[str, Any]]:
    response = http.post(
        "artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    response.raise_for_status()
    return list(response.json())


def _logs(http: httpx.Client, flow_run_id: str) -> list[dict[str, Any]]:
    response = http.post(
        "logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
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


def _secrets(emulator: CarbonMapperEmulator) -> list[tuple[str, str]]:
    secrets = [("password", emulator.password)]
    for kind, tokens in (
        ("access token", emulator.issued_access_tokens),
        ("refresh token", emulator.issued_refresh_tokens),
        ("stac token", emulator.issued_stac_tokens),
    ):
        secrets += [(f"{kind} #{n}", token) for n, token in enumerate(tokens, 1)]
    return secrets


def _assert_no_secret(emulator: CarbonMapperEmulator, **texts: str) -> None:
    """No secret in any text; a failure names the secret by label, never by value."""
    secrets = _secrets(emulator)
    assert len(secrets) > 1  # the run did handle tokens: an empty list would prove nothing
    leaks = [
        f"{label} in {where}" for where, text in texts.items() for label, s in secrets if s in text
    ]
    assert leaks == []


def _load_token(server: PrefectServer, block_name: str = TOKEN_BLOCK) -> CarbonMapperStacToken:
    with using(server):
        return CarbonMapperStacToken.load(block_name, _sync=True)  # type: ignore[no-any-return, call-arg]


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
    assert by_name["daily"]["entrypoint"] == "cm_tasks.watchdog.check_stac_token"
    # The package's deployments need no checkout: no build step, no path in the pull step.
    assert config["build"] is None
    assert config["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "."}}
    ]


def test_the_server_runs_the_same_prefect_as_this_process(server: PrefectServer) -> None:
    # `make compat` runs this suite in one venv per Prefect version: the server (and so every
    # worker and CLI call, same executable) must be that version too, never another install's.
    with server.http() as http:
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
    server: PrefectServer, deployments: dict[str, Any]
) -> None:
    with server.http() as http:
        response = http.post(
            f"deployments/{deployments[WEEKLY]['id']}/create_flow_run",
            json={"parameters": {"lifetime_days": 0}},
        )
    assert response.status_code == 409, response.text
    assert "lifetime_days" in response.text


def test_quick_run_on_a_worker_refreshes_the_token(
    server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    before = len(emulator.issued_stac_tokens)
    with server.http() as http:
        flow_run_id = _create_run(http, deployments[WEEKLY])

        worker_output = _run_worker(server, emulator)

        flow_run = _flow_run(http, flow_run_id)
        assert flow_run["state"]["type"] == "COMPLETED", worker_output
        assert flow_run["parameters"] == {}
        assert len(emulator.issued_stac_tokens) == before + 1
        token = _load_token(server)
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

        _assert_no_secret(
            emulator,
            events=json.dumps(_all_events(http)),
            artifacts=json.dumps(artifacts),
            logs=json.dumps(_logs(http, flow_run_id)),
            flow_run=json.dumps(flow_run),
            worker=worker_output,
        )


def test_a_second_run_at_once_is_cancelled_and_the_block_stays_consistent(
    server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    before = len(emulator.issued_stac_tokens)
    with server.http() as http:
        run_ids = [_create_run(http, deployments[WEEKLY]) for _ in range(2)]

        worker_output = _run_worker(server, emulator)

        runs = [_flow_run(http, run_id) for run_id in run_ids]
        states = sorted(run["state"]["type"] for run in runs)
        assert states == ["CANCELLED", "COMPLETED"], worker_output
        cancelled = next(run for run in runs if run["state"]["type"] == "CANCELLED")
        assert "concurrency limit" in cancelled["state"]["message"]
    # Only the run that went ahead reached the API, and the block holds what it got.
    assert len(emulator.issued_stac_tokens) == before + 1
    token = _load_token(server)
    assert token.get() == emulator.issued_stac_tokens[-1]
    assert token.name == emulator.stac_token_requests[-1]["name"]


def test_watchdog_deployment_fails_and_emits_expiring(
    server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    block_name = "expiring-token"
    expires_at = datetime.now(timezone.utc) + timedelta(days=1)
    with using(server):
        CarbonMapperStacToken(
            token=WATCHDOG_TOKEN,
            name="old-token",
            expires_at=expires_at,
            created_at=expires_at - timedelta(days=14),
            base_url=emulator.base_url,
        ).save(block_name, overwrite=True)
    requests_before = emulator.requests()
    with server.http() as http:
        flow_run_id = _create_run(
            http, deployments[DAILY], {"parameters": {"token_block": block_name}}
        )

        worker_output = _run_worker(server, emulator)

        flow_run = _flow_run(http, flow_run_id)
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
    server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    """After the runs above: the server's whole PREFECT_HOME (SQLite database, WAL, logs)."""
    from .leaks import collect_secrets, scan_prefect_home

    secrets = collect_secrets(emulator, extra={"watchdog test token": WATCHDOG_TOKEN})
    assert len(secrets) > 2  # the module's runs issued tokens: an empty list would prove nothing

    report = scan_prefect_home(server.home, secrets)

    assert any(path.endswith(".db") for path in report.scanned), report.scanned
    assert report.hits == []
