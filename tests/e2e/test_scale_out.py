"""Scale-out end to end: a Prefect server on PostgreSQL 15, two process workers, 30 ingest runs.

What a team does when one machine is not enough: the same `prefect.yaml`, deployed to a server
backed by PostgreSQL, with several workers taking runs. The weekly refresh runs once; then 30
ingest runs created at once each call `get_stac_token()` and download an asset from the
emulator. All must complete, with exactly one token issued, and both workers must have taken
runs. Every process started here is stopped by its PID.

Run with `make e2e` (CI runs it after `make test`).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks.testing import CarbonMapperEmulator
from tests.support import REPO_ROOT
from tests.support.postgres import postgres_server
from tests.support.prefect_server import (
    PrefectServer,
    prefect_executable,
    running_prefect_server,
    stop_process_group,
)
from tests.support.token_helpers import EMAIL_BLOCK, PASSWORD_BLOCK

pytestmark = pytest.mark.scale_out

POOL = "carbon-mapper"
INGEST_RUNS = 30
WORKER_LIMIT = 20  # below INGEST_RUNS, so one worker alone cannot take every run
RUN_TIMEOUT = 420.0


@contextlib.contextmanager
def worker(
    server: PrefectServer, name: str, emulator: CarbonMapperEmulator, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`prefect worker start` in the background, its flow runs pointed at the emulator."""
    env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
    env.update(
        CM_BASE_URL=emulator.base_url,
        CM_RETRY_BACKOFF="0",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="0",
    )
    args = [prefect_executable(), "worker", "start", "--pool", POOL, "--name", name]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*args, "--limit", str(WORKER_LIMIT)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_process_group(process)


def _deployment_id(http: httpx.Client, name: str) -> str:
    response = http.get(f"deployments/name/{name}")
    response.raise_for_status()
    return str(response.json()["id"])


def _create_run(http: httpx.Client, deployment_id: str, parameters: dict[str, Any]) -> str:
    response = http.post(
        f"deployments/{deployment_id}/create_flow_run", json={"parameters": parameters}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _wait_final(http: httpx.Client, flow_run_ids: list[str]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        response = http.post(
            "flow_runs/filter", json={"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200}
        )
        response.raise_for_status()
        runs = {run["id"]: run for run in response.json()}
        final = [run for run in runs.values() if run["state_type"] in _FINAL]
        if len(final) == len(flow_run_ids) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_refresh_then_thirty_ingest_runs_on_postgres_with_two_workers(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(postgres_server())
        server = stack.enter_context(
            running_prefect_server(
                tmp_path / "server",
                extra_env={"PREFECT_API_DATABASE_CONNECTION_URL": database_url},
            )
        )
        emulator = stack.enter_context(CarbonMapperEmulator())
        server.prefect("work-pool", "create", POOL, "--type", "process")
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            Secret(value=emulator.email).save(EMAIL_BLOCK, overwrite=True)
            Secret(value=emulator.password).save(PASSWORD_BLOCK, overwrite=True)
        server.prefect("--no-prompt", "deploy", "--all", cwd=REPO_ROOT)
        logs = {name: tmp_path / f"{name}.log" for name in ("worker-a", "worker-b")}
        for name, log in logs.items():
            stack.enter_context(worker(server, name, emulator, log))

        with server.http() as http:
            weekly = _create_run(http, _deployment_id(http, "refresh-stac-token/weekly"), {})
            refreshed = _wait_final(http, [weekly])[weekly]
            assert refreshed["state_type"] == "COMPLETED", refreshed["state"]
            assert len(emulator.issued_stac_tokens) == 1

            ingest = _deployment_id(http, "ingest-plumes/ingest-plumes")
            run_ids = [
                _create_run(
                    http,
                    ingest,
                    {"max_items": 1, "output_dir": str(tmp_path / f"data-{n}"), "concurrency": 2},
                )
                for n in range(INGEST_RUNS)
            ]
            runs = _wait_final(http, run_ids)

        states = sorted(run["state_type"] for run in runs.values())
        assert states == ["COMPLETED"] * INGEST_RUNS, [
            (run["name"], run["state"]["message"]) for run in runs.values()
        ]
        # One token for everyone: the ingest runs read the block and never refreshed.
        assert len(emulator.issued_stac_tokens) == 1
        assert emulator.requests("token/pair") == 1
        downloaded = [p for n in range(INGEST_RUNS) for p in (tmp_path / f"data-{n}").rglob("*")]
        assert sum(1 for p in downloaded if p.is_file()) >= INGEST_RUNS
        # Both workers ran some: a flow run's own log lines appear in its worker's output.
        started = "for flow 'ingest-plumes'"
        took = {name: log.read_text().count(started) for name, log in logs.items()}
        assert sum(took.values()) == INGEST_RUNS, took
        assert all(count > 0 for count in took.values()), took
