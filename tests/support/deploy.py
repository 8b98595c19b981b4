"""An operator's steps on a real `prefect server start`: pool, credentials, deploy, worker, runs.

Shared by the end-to-end tests that deploy prefect.yaml (tests/e2e/test_prefect_yaml_deploy.py,
tests/e2e/test_run_form.py).
"""

from __future__ import annotations

from typing import Any

import httpx
from prefect.blocks.system import Secret

from cm_tasks import CarbonMapperStacToken
from cm_tasks.deployments import DeploymentSpec
from cm_tasks.testing import CarbonMapperEmulator

from . import REPO_ROOT
from .prefect_server import PrefectServer
from .token_helpers import EMAIL_BLOCK, PASSWORD_BLOCK, TOKEN_BLOCK

POOL = "carbon-mapper"
WEEKLY = "refresh-stac-token/weekly"
DAILY = "check-stac-token/daily"
# The request body of the UI's Quick run (DeploymentQuickRunOverflowMenuItem).
QUICK_RUN = {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI with defaults"}}


def deploy_prefect_yaml(server: PrefectServer) -> dict[str, Any]:
    """The README's steps: a pool, the emulator's demo account in Secret blocks, `deploy --all`.

    Their schedules are then paused: a test creates the runs it wants, and a scheduled run
    (the weekly refresh on Monday 06:00 UTC, the daily check at 07:00) must not start beside
    them. Returns the two deployments as the API showed them right after the deploy, by name.
    """
    server.prefect("work-pool", "create", POOL, "--type", "process")
    demo = CarbonMapperEmulator()  # not started: every emulator has the same demo account
    # `_sync=True`: a test may hold an event loop in this thread (pytest-asyncio, Playwright),
    # which would make Prefect's dual sync/async methods return coroutines.
    with server.using():
        Secret(value=demo.email).save(EMAIL_BLOCK, overwrite=True, _sync=True)  # type: ignore[call-arg]
        Secret(value=demo.password).save(PASSWORD_BLOCK, overwrite=True, _sync=True)  # type: ignore[call-arg]
    deploy = server.prefect("--no-prompt", "deploy", "--all", cwd=REPO_ROOT)
    assert WEEKLY in deploy.stdout
    found = {}
    with server.http() as http:
        for name in (WEEKLY, DAILY):
            response = http.get(f"deployments/name/{name}")
            assert response.status_code == 200, response.text
            found[name] = response.json()
    for deployment in found.values():
        pause_schedules(server, deployment["id"])
    return found


def pause_schedules(server: PrefectServer, deployment_id: str) -> None:
    """Pause a deployment's schedules: its runs then come from the test, never from the clock.

    A scheduled run that falls due during the tests (the weekly refresh on Monday 06:00 UTC)
    would otherwise be taken by the module's worker beside the run a test created.
    """
    with server.http() as http:
        response = http.get(f"deployments/{deployment_id}")
        response.raise_for_status()
        for schedule in response.json()["schedules"]:
            paused = http.patch(
                f"deployments/{deployment_id}/schedules/{schedule['id']}", json={"active": False}
            )
            assert paused.status_code == 204, paused.text


def run_worker(server: PrefectServer, emulator: CarbonMapperEmulator, **settings: str) -> str:
    """`prefect worker start --pool carbon-mapper --run-once` with the emulator and these CM_*
    settings only (nothing of the developer's); returns what it printed."""
    env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
    env.update(CM_BASE_URL=emulator.base_url, CM_RETRY_BACKOFF="0", CM_TIMEOUT="5", **settings)
    started = server.prefect("worker", "start", "--pool", POOL, "--run-once", extra_env=env)
    return started.stdout + started.stderr


def create_run(
    http: httpx.Client, deployment: dict[str, Any], body: dict[str, Any] | None = None
) -> str:
    """A flow run of the deployment, as the UI's Quick run (no body) or Custom run creates it."""
    response = http.post(f"deployments/{deployment['id']}/create_flow_run", json=body or QUICK_RUN)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def read_flow_run(http: httpx.Client, flow_run_id: str) -> dict[str, Any]:
    response = http.get(f"flow_runs/{flow_run_id}")
    response.raise_for_status()
    return dict(response.json())


def read_logs(http: httpx.Client, flow_run_id: str) -> list[dict[str, Any]]:
    response = http.post(
        "logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    )
    response.raise_for_status()
    return list(response.json())


def _secrets(emulator: CarbonMapperEmulator) -> list[tuple[str, str]]:
    secrets = [("password", emulator.password)]
    for kind, tokens in (
        ("access token", emulator.issued_access_tokens),
        ("refresh token", emulator.issued_refresh_tokens),
        ("stac token", emulator.issued_stac_tokens),
    ):
        secrets += [(f"{kind} #{n}", token) for n, token in enumerate(tokens, 1)]
    return secrets


def assert_no_secret(emulator: CarbonMapperEmulator, **texts: str) -> None:
    """No secret in any text; a failure names the secret by label, never by value."""
    secrets = _secrets(emulator)
    assert len(secrets) > 1  # the run did handle tokens: an empty list would prove nothing
    leaks = [
        f"{label} in {where}" for where, text in texts.items() for label, s in secrets if s in text
    ]
    assert leaks == []


def load_token(server: PrefectServer, block_name: str = TOKEN_BLOCK) -> CarbonMapperStacToken:
    with server.using():
        return CarbonMapperStacToken.load(block_name, _sync=True)  # type: ignore[no-any-return, call-arg]


def api_record(deployment: Any) -> dict[str, Any]:
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


def spec_as_api(spec: DeploymentSpec) -> dict[str, Any]:
    """The API's record of a deployment, as far as a spec decides it."""
    return {
        "name": spec.name,
        "entrypoint": spec.entrypoint,
        "description": spec.description,
        "tags": list(spec.tags),
        "schedules": [(spec.cron, spec.timezone, True)],
        "concurrency": (spec.concurrency_limit, spec.collision_strategy),
    }
