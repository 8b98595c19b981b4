"""Refresh modes end to end: ingest processes that never hold the account password.

A real `prefect server start` (one for the module), the refresh deployment from prefect.yaml on
its own work pool `carbon-mapper-credentials`, and a real process worker of that pool: the
only process whose environment names the credential blocks that exist. Ingest processes run
with `CM_REFRESH_MODE=deployment` and credential block names that do not exist, so an inline
refresh could only fail; they record every HTTP request they send, which proves they read no
Secret block and never called token/pair or create-stac.

Every test that handles a token or password scans what the ingest processes printed and what
the server holds for it (tests/support/leaks.py).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from cm_tasks import (
    CarbonMapperAuth,
    ConfigurationError,
    RefreshRunError,
    TokenBlockError,
    clear_token_cache,
    get_stac_token,
    load_settings,
    stac_http_client,
)
from cm_tasks.access import aget_stac_token
from cm_tasks.auth import async_stac_http_client
from cm_tasks.blocks import load_token_block
from cm_tasks.notify import REFRESHED_EVENT
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support import REPO_ROOT, SCRIPTS
from tests.support.deploy import pause_schedules
from tests.support.leaks import Secrets, assert_no_leak, collect_secrets, sentinel_credentials
from tests.support.prefect_server import (
    PrefectServer,
    prefect_executable,
    stop_process_group,
)
from tests.support.token_helpers import (
    CREATE_STAC,
    EMAIL_BLOCK,
    PASSWORD_BLOCK,
    TOKEN_BLOCK,
    mint,
    save_token,
    stored_token,
)

SCRIPT = SCRIPTS / "deployment_ingest.py"
CREDENTIALS_POOL = "carbon-mapper-credentials"
IDLE_POOL = "nobody-home"
WEEKLY = "refresh-stac-token/weekly"
IDLE = "refresh-stac-token/idle"
TOKEN_PAIR = "token/pair"
STALE = timedelta(minutes=20)  # within the default min_valid of 1 hour
PROCESS_TIMEOUT = 240.0
EVENT_WAIT_SECONDS = 30.0
# Ingest processes: deployment mode, and credential blocks that do not exist anywhere.
INGEST_ENV = {
    "CM_REFRESH_MODE": "deployment",
    "CM_EMAIL_BLOCK": "no-such-email",
    "CM_PASSWORD_BLOCK": "no-such-password",
    "CM_RETRY_BACKOFF": "0",
}


# -- module fixtures: one server, one worker, the deployments ---------------------------------


@pytest.fixture(scope="module")
def account(server: PrefectServer, emulator: CarbonMapperEmulator) -> Secrets:
    """A sentinel account in the credential blocks (on the server: only the worker uses them)."""
    with server.using():
        return sentinel_credentials(emulator, EMAIL_BLOCK, PASSWORD_BLOCK)


@pytest.fixture(scope="module")
def deployments(server: PrefectServer, account: Secrets) -> dict[str, str]:
    """The weekly refresh on its own pool (from prefect.yaml), its schedule paused; a copy on a
    pool nobody serves."""
    with server.using(), get_client(sync_client=True) as client:
        for pool in (CREDENTIALS_POOL, IDLE_POOL):  # as `prefect work-pool create`, faster
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    server.prefect(
        "--no-prompt", "deploy", "--name", "weekly", "--pool", CREDENTIALS_POOL, cwd=REPO_ROOT
    )
    with server.using(), get_client(sync_client=True) as client:
        weekly = client.read_deployment_by_name(WEEKLY)
        assert weekly.work_pool_name == CREDENTIALS_POOL
        idle_id = client.create_deployment(
            weekly.flow_id,
            "idle",
            work_pool_name=IDLE_POOL,
            entrypoint=weekly.entrypoint,
            path=weekly.path,
            pull_steps=weekly.pull_steps,
            concurrency_limit=1,
        )
    pause_schedules(server, str(weekly.id))
    return {WEEKLY: str(weekly.id), IDLE: str(idle_id)}


@pytest.fixture(scope="module")
def worker(
    server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """`prefect worker start --pool carbon-mapper-credentials`; its runs use the emulator."""
    env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
    env.update(
        CM_BASE_URL=emulator.base_url,
        CM_RETRY_BACKOFF="0",
        CM_TIMEOUT="20",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="0",
    )
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [prefect_executable(), "worker", "start", "--pool", CREDENTIALS_POOL],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        stop_process_group(process)


@pytest.fixture
def asset_url(emulator: CarbonMapperEmulator) -> str:
    item_id, _ = emulator.large_asset
    return f"{emulator.base_url}stac/assets/{item_id}/rgb.tif"


@pytest.fixture
def on_server(
    server: PrefectServer, emulator: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PrefectServer]:
    """This process as an ingest process of the module's server (no credentials of its own)."""
    for name, value in INGEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CM_BASE_URL", emulator.base_url)
    monkeypatch.setenv("CM_REFRESH_TIMEOUT", "120")
    clear_token_cache()
    with server.using():
        yield server
    clear_token_cache()


# -- helpers ----------------------------------------------------------------------------------


def _stale_token(emulator: CarbonMapperEmulator) -> str:
    """Save a token that expires within min_valid; returns it."""
    token = mint(emulator)
    save_token(emulator, token, STALE)
    return token


def _expired_token(emulator: CarbonMapperEmulator, block: str = TOKEN_BLOCK) -> str:
    """Save a token that has expired (a valid one is served through a failed renewal)."""
    token = mint(emulator)
    save_token(emulator, token, -timedelta(minutes=1), block)
    return token


def _api(server: PrefectServer, method: str, path: str, body: Any = None) -> Any:
    """One REST call to the server, tried again on a 503 (SQLite busy on a loaded machine)."""
    with server.http() as http:
        for _ in range(10):
            response = http.request(method, path, json=body)
            if response.status_code != 503:
                break
            time.sleep(1)
        response.raise_for_status()
        return response.json()


def _runs(server: PrefectServer, deployment_id: str, since: datetime) -> list[dict[str, Any]]:
    """Runs of the deployment created since `since` (future schedules excluded), oldest first."""
    horizon = datetime.now(timezone.utc) + timedelta(minutes=5)
    found = _api(
        server,
        "POST",
        "flow_runs/filter",
        {
            "deployments": {"id": {"any_": [deployment_id]}},
            "flow_runs": {"expected_start_time": {"before_": horizon.isoformat()}},
            "limit": 200,
        },
    )
    runs = [r for r in found if datetime.fromisoformat(r["created"]) >= since]
    return sorted(runs, key=lambda r: r["created"])


def _wait_for_state(
    server: PrefectServer, flow_run_id: str, states: set[str], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = _api(server, "GET", f"flow_runs/{flow_run_id}")
        if run["state_type"] in states or time.monotonic() > deadline:
            return dict(run)
        time.sleep(0.25)


def _refreshed_events(server: PrefectServer, flow_run_id: str) -> list[dict[str, Any]]:
    """`refreshed` events related to the flow run; polled (the server persists in batches)."""
    related = f"prefect.flow-run.{flow_run_id}"
    deadline = time.monotonic() + EVENT_WAIT_SECONDS
    body = {"filter": {"event": {"name": [REFRESHED_EVENT]}}, "limit": 50}
    while True:
        found = [
            e
            for e in _api(server, "POST", "events/filter", body)["events"]
            if any(r["prefect.resource.id"] == related for r in e["related"])
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


class _Ingest:
    """Ingest processes started (Prefect imported, seconds on a loaded machine), not yet run.

    `go` runs them all at once: a late starter would otherwise miss a refresh run that already
    ended, and processes meant to come later can be ready before the first ones end.
    """

    def __init__(
        self,
        server: PrefectServer,
        emulator: CarbonMapperEmulator,
        tmp_path: Path,
        asset_url: str,
        processes: int,
        tasks: int,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.tmp_path, self.processes = tmp_path, processes
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []
        for n in range(processes):
            home = tmp_path / f"ingest-{n}"
            home.mkdir()
            env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
            env.update(INGEST_ENV, PREFECT_HOME=str(home), CM_BASE_URL=emulator.base_url)
            env.update(extra_env or {})
            process = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(tasks), str(tmp_path / "go"), asset_url],
                cwd=home,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self.started.append((process, home))

    def go(self) -> list[dict[str, Any]]:
        """Wait until every process is ready, start them together; what each printed and sent."""
        deadline = time.monotonic() + 180
        while len(list(self.tmp_path.glob("ready-*"))) < self.processes:
            exited = [process for process, _ in self.started if process.poll() is not None]
            assert not exited, exited[0].communicate()[1].decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the ingest processes were not ready in 180 s"
            time.sleep(0.1)
        (self.tmp_path / "go").touch()
        outputs = []
        for process, home in self.started:
            out, err = process.communicate(timeout=PROCESS_TIMEOUT)
            assert process.returncode == 0, err.decode(errors="replace")[-3000:]
            report = json.loads(out.decode().strip().splitlines()[-1])
            report.update(stdout=out.decode(), stderr=err.decode(), home=str(home))
            outputs.append(report)
        return outputs

    def run(self) -> list[dict[str, Any]]:
        """`go`, then stop whatever is left of the processes."""
        try:
            return self.go()
        finally:
            self.stop()

    def stop(self) -> None:
        for process, _ in self.started:
            stop_process_group(process)  # type: ignore[arg-type]


def _sent(outputs: list[dict[str, Any]]) -> list[str]:
    return [path for report in outputs for _method, path in report["sent"]]


def _what_happened(outputs: list[dict[str, Any]]) -> str:
    """For a failure message: each process's waits, errors and the end of its log."""
    return "\n".join(
        f"process {n}: waited {[round(r['waited'], 1) for r in report['results']]} s, "
        f"errors {sorted({r.get('error_type') for r in report['results']} - {None})}, "
        f"{len(report['sent'])} requests; log:\n{report['stderr'][-2500:]}"
        for n, report in enumerate(outputs)
    )


def _assert_no_credential_access(
    outputs: list[dict[str, Any]], emulator: CarbonMapperEmulator
) -> None:
    """The ingest processes never read a Secret block nor called the account endpoints."""
    sent = _sent(outputs)
    assert sent, "the processes recorded no request: the recording proves nothing"
    secret_reads = [p for p in sent if "/block_types/slug/secret/" in p or "no-such-" in p]
    assert secret_reads == []
    emulator_host = f"127.0.0.1:{emulator.port}"
    account_calls = [
        p for p in sent if p.startswith(emulator_host) and ("token/" in p or "account/" in p)
    ]
    assert account_calls == []


def _leak_scan(
    outputs: list[dict[str, Any]],
    emulator: CarbonMapperEmulator,
    account: Secrets,
    server: PrefectServer,
) -> None:
    secrets = collect_secrets(emulator, extra=account)
    texts = {}
    for n, report in enumerate(outputs):
        texts[f"ingest {n} stdout"] = report["stdout"]
        texts[f"ingest {n} stderr"] = report["stderr"]
    assert_no_leak(secrets, texts=texts)
    for report in outputs:
        assert_no_leak(secrets, prefect_home=report["home"])
    with server.using():
        assert_no_leak(secrets, api=True)


# -- settings and keyword checks (no server needed) -------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CM_REFRESH_MODE", "sometimes", "CM_REFRESH_MODE: .*inline, deployment, off"),
        (
            "CM_REFRESH_DEPLOYMENT",
            "nightly-refresh",
            "CM_REFRESH_DEPLOYMENT: .*FLOW_NAME/DEPLOYMENT_NAME",
        ),
        ("CM_REFRESH_DEPLOYMENT", "flow/dep/extra", "CM_REFRESH_DEPLOYMENT"),
        ("CM_REFRESH_TIMEOUT", "-5", "CM_REFRESH_TIMEOUT: .*greater than 0"),
        ("CM_REFRESH_TIMEOUT", "soon", "CM_REFRESH_TIMEOUT"),
    ],
)
def test_bad_refresh_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=message) as caught:
        load_settings()
    assert value not in str(caught.value)


def test_refresh_settings_defaults_and_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert (defaults.refresh_mode, defaults.refresh_deployment, defaults.refresh_timeout) == (
        "inline",
        WEEKLY,
        300.0,
    )
    monkeypatch.setenv("CM_REFRESH_MODE", " Deployment ")
    assert load_settings().refresh_mode == "deployment"


async def test_a_bad_refresh_keyword_fails_before_any_call(
    carbon_mapper_token_block: Any, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    from cm_tasks import token_cache_info

    before = token_cache_info().block_reads
    for call in (
        lambda: get_stac_token(refresh="never"),  # type: ignore[arg-type]
        lambda: CarbonMapperAuth(refresh="never"),  # type: ignore[arg-type]
        lambda: stac_http_client(refresh="never"),  # type: ignore[arg-type]
        lambda: async_stac_http_client(refresh="never"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ConfigurationError, match=r"refresh='never'.*inline, deployment, off"):
            call()
    with pytest.raises(ConfigurationError, match="refresh='never'"):
        await aget_stac_token(refresh="never")  # type: ignore[arg-type]
    pytest.importorskip("pystac_client")
    from cm_tasks.stac import open_catalog

    with pytest.raises(ConfigurationError, match="refresh='never'"):
        open_catalog(refresh="never")  # type: ignore[arg-type]
    assert token_cache_info().block_reads == before
    assert carbon_mapper_emulator.requests() == 0


# -- off ------------------------------------------------------------------------------------


def test_off_fails_at_once_on_a_stale_or_missing_token_and_returns_a_fresh_one(
    carbon_mapper_token_block: Any,
    carbon_mapper_emulator: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emu = carbon_mapper_emulator
    monkeypatch.setenv("CM_REFRESH_MODE", "off")
    fresh = carbon_mapper_token_block.get()
    assert get_stac_token() == fresh

    stale = _stale_token(emu)
    clear_token_cache()
    before = emu.requests()
    with pytest.raises(TokenBlockError) as caught:
        get_stac_token()
    with pytest.raises(TokenBlockError):
        get_stac_token()  # the stale token, cached by the read, is not served either
    message = str(caught.value)
    assert f"block '{TOKEN_BLOCK}'" in message
    assert "expires at 20" in message  # the ISO expiry
    assert "refresh-stac-token/weekly" in message
    assert "cm-tasks refresh" in message
    assert emu.requests() == before  # no call to the platform API
    assert stored_token() == stale
    # The keyword says the same, whatever the setting.
    monkeypatch.setenv("CM_REFRESH_MODE", "inline")
    with pytest.raises(TokenBlockError, match="refresh mode off"):
        get_stac_token(refresh="off")
    with pytest.raises(TokenBlockError, match="does not exist"):
        get_stac_token("no-token-here", refresh="off")
    assert emu.requests() == before
    assert_no_leak(collect_secrets(emu), exceptions=[caught.value])


# -- deployment mode, end to end ------------------------------------------------------------


def test_three_ingest_processes_share_one_refresh_run_and_never_read_a_secret(
    server: PrefectServer,
    emulator: CarbonMapperEmulator,
    account: Secrets,
    deployments: dict[str, str],
    worker: Path,
    asset_url: str,
    tmp_path: Path,
) -> None:
    with server.using():
        # Expired, so that no caller is served it while the renewal runs: a valid one is, after
        # 10 s, and a loaded machine made the run outlast that (a second token in the results).
        old = _expired_token(emulator)
    pairs, creates = emulator.requests(TOKEN_PAIR), emulator.requests(CREATE_STAC)
    since = datetime.now(timezone.utc)
    # A slow token/pair keeps the run going while all three processes start asking.
    emulator.fail(TOKEN_PAIR, Fault.delay(8))

    outputs = _Ingest(
        server, emulator, tmp_path, asset_url, 3, 8, {"CM_REFRESH_TIMEOUT": "180"}
    ).run()

    results = [r for report in outputs for r in report["results"]]
    assert [r.get("error") for r in results] == [None] * 24, _what_happened(outputs)
    assert [r["status"] for r in results] == [200] * 24
    new = emulator.issued_stac_tokens[-1]
    assert new != old
    assert {r["token_sha256"] for r in results} == {hashlib.sha256(new.encode()).hexdigest()}
    with server.using():
        assert stored_token() == new
    # One refresh for all three processes, made by the worker's run.
    assert emulator.requests(TOKEN_PAIR) - pairs == 1
    assert emulator.requests(CREATE_STAC) - creates == 1
    runs = _runs(server, deployments[WEEKLY], since)
    # One run did the refresh. Once in CI on Prefect 3.2.15 under load, a second run of the
    # same block appeared and was cancelled by the deployment's limit (CANCEL_NEW), which the
    # callers then waited past as designed: still one token. Such a run may only be a
    # cancelled duplicate (the run creation now carries an idempotency key against the one
    # known cause, Prefect's client sending the POST again).
    completed = [r for r in runs if r["state_type"] == "COMPLETED"]
    assert [(r["state_type"], r["parameters"]) for r in completed] == [
        ("COMPLETED", {"token_block": TOKEN_BLOCK, "base_url": emulator.base_url})
    ]
    assert {(r["state_type"], r["parameters"]["token_block"]) for r in runs} <= {
        ("COMPLETED", TOKEN_BLOCK),
        ("CANCELLED", TOKEN_BLOCK),
    }
    # A separate flow run, not a subflow of an ingest run.
    assert completed[0]["parent_task_run_id"] is None
    assert len(_refreshed_events(server, completed[0]["id"])) == 1
    _assert_no_credential_access(outputs, emulator)
    _leak_scan(outputs, emulator, account, server)

    waits = sorted(r["waited"] for r in results)
    per_process = [f"{max(r['waited'] for r in report['results']):.1f}" for report in outputs]
    print(
        "\n3-process deployment refresh: "
        f"refresh runs={len(runs)} ({len(completed)} completed), "
        f"token/pair={emulator.requests(TOKEN_PAIR) - pairs}, "
        f"create-stac={emulator.requests(CREATE_STAC) - creates} (token/pair held 8 s), "
        f"HTTP requests per ingest process={[len(r['sent']) for r in outputs]} "
        f"(Prefect API + 8 downloads), caller waits: min {waits[0]:.1f} s, median "
        f"{statistics.median(waits):.1f} s, max {waits[-1]:.1f} s, longest per process "
        f"{per_process} s; flow times {[round(r['seconds'], 1) for r in outputs]} s"
    )


def test_a_failed_refresh_run_is_every_callers_error_and_the_token_stays(
    server: PrefectServer,
    emulator: CarbonMapperEmulator,
    account: Secrets,
    deployments: dict[str, str],
    worker: Path,
    asset_url: str,
    tmp_path: Path,
) -> None:
    # A block of its own: a run that failed it holds every caller of that block for a minute.
    block = "failed-run-token"
    with server.using():
        old = _expired_token(emulator, block)
        Secret(value="Wrong-Password-for-the-test").save(PASSWORD_BLOCK, overwrite=True)
    pairs, creates = emulator.requests(TOKEN_PAIR), emulator.requests(CREATE_STAC)
    since = datetime.now(timezone.utc)
    env = {"CM_REFRESH_TIMEOUT": "120", "CM_TOKEN_BLOCK": block}
    (tmp_path / "first").mkdir()
    (tmp_path / "late").mkdir()
    # A caller that comes after the run failed gets its failure too: no second run. It comes
    # right after the first ones end, well within the failure's hold (FAILED_RUN_HOLD): its
    # interpreter starts beside theirs, so that a loaded machine's import time is not the gap.
    later = _Ingest(server, emulator, tmp_path / "late", asset_url, 1, 1, env)
    try:
        outputs = _Ingest(server, emulator, tmp_path / "first", asset_url, 2, 4, env).run()
        late = later.go()
    finally:
        later.stop()
        with server.using():
            Secret(value=account.as_dict()["sentinel password"]).save(
                PASSWORD_BLOCK, overwrite=True
            )

    runs = _runs(server, deployments[WEEKLY], since)
    results = [r for report in outputs + late for r in report["results"]]
    errors = [r.get("error") for r in results]
    # On failure, say when each run was made and ended, and how long each caller waited.
    seen = [(r["name"], r["created"], r["end_time"], r["parameters"]) for r in runs] + [
        (r["n"], round(r["waited"], 1), r.get("error", "")[:60]) for r in results
    ]
    assert [r["state_type"] for r in runs] == ["FAILED"], seen  # one run, not one per caller
    name = runs[0]["name"]
    assert [r.get("error_type") for r in results] == ["RefreshRunError"] * 9, errors
    for result in results:
        assert f"refresh run '{name}'" in result["error"]
        assert "BadCredentialsError" in result["error"]
        assert "until 60 s after this run failed, callers get its failure" in result["error"]
    with server.using():
        assert stored_token(block) == old
    assert emulator.requests(TOKEN_PAIR) - pairs == 1  # a wrong password is not retried
    assert emulator.requests(CREATE_STAC) - creates == 0
    _assert_no_credential_access(outputs + late, emulator)
    secrets = collect_secrets(
        emulator, extra={**account.as_dict(), "wrong": "Wrong-Password-for-the-test"}
    )
    assert_no_leak(
        secrets,
        texts={f"ingest {n}": r["stdout"] + r["stderr"] for n, r in enumerate(outputs + late)},
    )
    waits = sorted(r["waited"] for r in results)
    print(f"\nfailed refresh run: callers got the error after {waits[0]:.1f}-{waits[-1]:.1f} s")


def test_no_worker_times_out_saying_scheduled_but_not_picked_up(
    on_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = _expired_token(emulator)
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", IDLE)
    monkeypatch.setenv("CM_REFRESH_TIMEOUT", "5")
    since = datetime.now(timezone.utc)

    def call() -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            get_stac_token()
        except BaseException as exc:  # each caller's error is its result
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    # Three callers at once, each in a copy of this context (it points Prefect at the server).
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(contextvars.copy_context().run, call) for _ in range(3)]
        outcomes = [future.result() for future in futures]

    runs = _runs(on_server, deployments[IDLE], since)
    assert [r["state_type"] for r in runs] == ["SCHEDULED"]  # one run, joined by every caller
    errors = [error for _, error in outcomes]
    assert [type(error).__name__ for error in errors] == ["RefreshTimeoutError"] * 3
    for error in errors:
        assert "scheduled but not picked up" in str(error)
        assert f"work pool '{IDLE_POOL}'" in str(error)
        assert f"'{runs[0]['name']}'" in str(error)
    assert stored_token() == old
    assert_no_leak(collect_secrets(emulator), exceptions=[e for e in errors if e is not None])
    print(f"\nno worker: callers gave up after {[round(t, 1) for t, _ in outcomes]} s")


def test_a_401_renews_through_the_deployment_once(
    on_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    account: Secrets,
    deployments: dict[str, str],
    worker: Path,
) -> None:
    rejected = mint(emulator)
    save_token(emulator, rejected, timedelta(days=10))  # fresh, but the API turns it down
    item_id, _ = emulator.large_asset
    path = f"stac/assets/{item_id}/rgb.tif"
    emulator.fail(path, Fault.status(401, times=1))
    creates = emulator.requests(CREATE_STAC)
    since = datetime.now(timezone.utc)

    with stac_http_client(refresh="deployment") as http:
        first = http.get(path)
        second = http.get(path)

    assert first.status_code == second.status_code == 200
    runs = _runs(on_server, deployments[WEEKLY], since)
    assert [(r["state_type"], r["parameters"]) for r in runs] == [
        ("COMPLETED", {"token_block": TOKEN_BLOCK, "base_url": emulator.base_url})
    ]
    assert emulator.requests(CREATE_STAC) - creates == 1
    assert stored_token() not in (rejected,)
    assert get_stac_token() == stored_token()
    assert_no_leak(collect_secrets(emulator, extra=account), api=True)


def test_a_quick_run_already_running_is_joined_not_doubled(
    on_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, str],
    worker: Path,
) -> None:
    _stale_token(emulator)
    creates = emulator.requests(CREATE_STAC)
    since = datetime.now(timezone.utc)
    # The weekly schedule (or a Quick run) is busy: its token/pair answer takes a while, long
    # enough on a loaded machine for our run to reach the worker before it ends.
    emulator.fail(TOKEN_PAIR, Fault.delay(15))
    scheduled = _api(on_server, "POST", f"deployments/{deployments[WEEKLY]}/create_flow_run", {})
    running = _wait_for_state(on_server, scheduled["id"], {"RUNNING"})
    assert running["state_type"] == "RUNNING"

    token = get_stac_token(refresh="deployment")

    runs = {r["id"]: r for r in _runs(on_server, deployments[WEEKLY], since)}
    assert runs[scheduled["id"]]["state_type"] == "COMPLETED"
    # Issue 16 case 9: the Quick run's defaults renew this block, so it is joined; before,
    # a run of our own was started (and cancelled by the deployment's limit).
    ours = [r for i, r in runs.items() if i != scheduled["id"]]
    assert ours == []
    assert emulator.requests(CREATE_STAC) - creates == 1
    assert token == stored_token() == emulator.issued_stac_tokens[-1]


def test_a_cancelled_run_whose_running_one_already_finished_uses_its_token(
    on_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The run holding the deployment's slot (the weekly schedule) ends between two polls of the
    # caller: by the time it sees its own run CANCELLED, nothing is running any more, and the
    # block already holds the new token. States are set by hand on a pool nobody serves, so the
    # order (theirs completed, then ours cancelled) is certain.
    with get_client(sync_client=True) as client:
        weekly = client.read_deployment_by_name(WEEKLY)
        race_id = client.create_deployment(
            weekly.flow_id,
            "cancel-race",
            work_pool_name=IDLE_POOL,
            entrypoint=weekly.entrypoint,
            path=weekly.path,
            concurrency_limit=1,
        )
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "refresh-stac-token/cancel-race")
    _stale_token(emulator)
    fresh = mint(emulator)
    # A run for another block holds the slot (one for this block would be joined instead).
    other_block = {"parameters": {"token_block": "another-stac-token"}}
    scheduled = _api(on_server, "POST", f"deployments/{race_id}/create_flow_run", other_block)
    _api(on_server, "POST", f"flow_runs/{scheduled['id']}/set_state", _state("RUNNING"))
    since = datetime.now(timezone.utc)

    def the_schedule_finishes_then_the_limit_cancels_ours() -> None:
        deadline = time.monotonic() + 60
        while not (
            ours := [
                r
                for r in _runs(on_server, str(race_id), since)
                if r["parameters"].get("token_block") == TOKEN_BLOCK
            ]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        save_token(emulator, fresh, timedelta(days=13))
        _api(on_server, "POST", f"flow_runs/{scheduled['id']}/set_state", _state("COMPLETED"))
        _api(on_server, "POST", f"flow_runs/{ours[0]['id']}/set_state", _state("CANCELLED"))

    with ThreadPoolExecutor(max_workers=1) as pool:
        other = pool.submit(
            contextvars.copy_context().run, the_schedule_finishes_then_the_limit_cancels_ours
        )
        token = get_stac_token(refresh="deployment")
        other.result()

    assert token == fresh == stored_token()


def test_a_deployment_for_another_block_renews_the_block_its_caller_names(
    on_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, str],
    worker: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As `cm-tasks deploy` makes it where CM_TOKEN_BLOCK=team-token: the parameter and the
    # worker's setting agree. This ingest process left CM_TOKEN_BLOCK unset, so its run names
    # the default block: an explicit run parameter, which beats the deployment's parameter
    # and the worker's setting (one precedence rule), so the caller gets its own block renewed.
    with get_client(sync_client=True) as client:
        weekly = client.read_deployment_by_name(WEEKLY)
        client.create_deployment(
            weekly.flow_id,
            "team",
            work_pool_name=CREDENTIALS_POOL,
            entrypoint=weekly.entrypoint,
            path=weekly.path,
            parameters={"token_block": "team-token"},
            job_variables={"env": {"CM_TOKEN_BLOCK": "team-token"}},
        )
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "refresh-stac-token/team")
    old = _stale_token(emulator)

    token = get_stac_token()

    assert token == stored_token() != old
    assert load_token_block("team-token") is None


def _state(state_type: str) -> dict[str, Any]:
    return {"state": {"type": state_type, "message": "set by the test"}, "force": True}


def test_the_refresh_deployment_must_exist(
    on_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _stale_token(emulator)
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "refresh-stac-token/nowhere")
    before = emulator.requests()
    with pytest.raises(ConfigurationError, match="'refresh-stac-token/nowhere' does not exist"):
        get_stac_token()
    assert emulator.requests() == before


def test_refresh_timeout_errors_are_refresh_run_errors() -> None:
    from cm_tasks import RefreshTimeoutError

    assert issubclass(RefreshTimeoutError, RefreshRunError)
    error = RefreshTimeoutError("x", flow_run_name="a-run", flow_run_id="1", transient=True)
    assert (error.flow_run_name, error.transient) == ("a-run", True)


def test_prefect_api_failures_while_following_the_run_say_what_to_fix() -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    from cm_tasks._prefect_calls import call_prefect

    def _call(_settings: object, fn: Any, *args: Any) -> None:
        call_prefect("run the refresh deployment", fn, *args)

    settings = load_settings()

    def refused(status: int) -> None:
        request = httpx.Request("POST", "http://prefect.example/api/deployments/x/create_flow_run")
        response = httpx.Response(status, request=request)
        error = httpx.HTTPStatusError("refused", request=request, response=response)
        raise PrefectHTTPStatusError.from_httpx_error(error)

    def unreachable() -> None:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(TokenBlockError, match=r"403 from the Prefect API.*may use it") as forbidden:
        _call(settings, refused, 403)
    assert not forbidden.value.transient
    assert forbidden.value.__context__ is None  # the Prefect error (its request) is not kept
    with pytest.raises(TokenBlockError, match="503 from the Prefect API") as busy:
        _call(settings, refused, 503)
    assert busy.value.transient
    with pytest.raises(TokenBlockError, match="ConnectError from the Prefect API") as down:
        _call(settings, unreachable)
    assert down.value.transient
    assert down.value.__context__ is None
