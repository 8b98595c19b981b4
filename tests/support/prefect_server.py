"""A real `prefect server start` for tests that need one: deployments, workers, events.

`prefect_test_harness` runs the API inside the test process, which is enough for flows run in
process. A worker, `prefect deploy` or any other subprocess needs a server it can reach over
HTTP: `running_prefect_server()` starts one on a free 127.0.0.1 port with its own temporary
`PREFECT_HOME` (so its own SQLite database, unless `extra_env` says otherwise), waits until
`/api/health` answers, and stops it by PID.

Example:
    ```python
    from tests.support.prefect_server import running_prefect_server

    def test_something(tmp_path):
        with running_prefect_server(tmp_path) as server:
            server.prefect("work-pool", "create", "my-pool", "--type", "process")
            assert server.http().get("/work_pools/my-pool").status_code == 200
    ```

    A PostgreSQL-backed server takes the database URL as an extra variable:
    ```python
    with running_prefect_server(
        tmp_path,
        extra_env={"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://..."},
    ) as server:
        ...
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 240.0  # a fresh database runs every migration; slow on a loaded machine
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 180.0
UNAVAILABLE_ATTEMPTS = 5

# Settings of the developer's machine or of the test process that must not reach the server or
# the commands run against it: each server gets exactly the environment this module builds.
_INHERITED_PREFIXES_DROPPED = ("PREFECT_",)


def prefect_executable() -> str:
    """The `prefect` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else "prefect"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def base_environment(home: Path, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any `PREFECT_*`, plus a private home and no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES_DROPPED)}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # A test waits for what it asked for; nothing should prompt.
        PREFECT_CLI_PROMPT="false",
    )
    env.update(extra_env or {})
    return env


def seed_migrated_database(home: Path, executable: str | None = None) -> None:
    """Put a database with every migration applied into a new `PREFECT_HOME`.

    A fresh SQLite database runs all of Prefect's migrations when its server starts: about
    10 s of CPU on each of the suite's many servers. The database starts just as empty (no
    flows, runs or blocks); the server only finds nothing left to migrate. `make demo`'s test
    keeps a truly fresh home, as a new user's machine has.

    Args:
        home: the new, empty `PREFECT_HOME`.
        executable: the `prefect` console script whose version the database is for.
    """
    target = home / "prefect.db"
    if not target.exists():
        shutil.copyfile(_migrated_database(executable or prefect_executable()), target)


@contextlib.contextmanager
def migrated_harness_database() -> Iterator[None]:
    """`prefect_test_harness` entered meanwhile starts from a migrated database.

    The harness makes its database in a new temporary directory and migrates it as its server
    starts: about 3 s of CPU in each test process. Its `mkdtemp` is given that directory with
    the migrated database already in it (the harness's file name, `prefect-test.db`).
    """
    from prefect.testing import utilities

    database = _migrated_database(prefect_executable())
    fresh = utilities.mkdtemp

    def seeded() -> str:
        directory = fresh()
        shutil.copyfile(database, Path(directory) / "prefect-test.db")
        return directory

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utilities, "mkdtemp", seeded)
        yield


def _migrated_database(executable: str) -> Path:
    """One migrated database per Prefect installation, built once and shared by test processes."""
    script = Path(executable).resolve()
    stamp = f"{script}:{script.stat().st_mtime_ns if script.exists() else 0}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"cm-tasks-prefect-db-{key}"
    cache.mkdir(exist_ok=True)
    database = cache / "prefect.db"
    # pytest-xdist workers may all want it at once: one builds it, the others wait.
    with (cache / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            with tempfile.TemporaryDirectory(dir=cache) as build:
                subprocess.run(
                    [executable, "server", "database", "upgrade", "-y"],
                    env=base_environment(Path(build)),
                    capture_output=True,
                    check=True,
                    timeout=COMMAND_TIMEOUT,
                )
                os.replace(Path(build) / "prefect.db", database)
    return database


@dataclass
class PrefectServer:
    """A running `prefect server start` and how to talk to it."""

    api_url: str
    home: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path
    commands: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    executable: str = field(default_factory=prefect_executable)
    argv: list[str] = field(default_factory=list)  # how it was started (see `restart`)

    def client_env(self, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a client process (CLI, worker) of this server."""
        env = dict(self.env)
        env["PREFECT_API_URL"] = self.api_url
        env.update(extra_env or {})
        return env

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Run Prefect client code of this process (blocks, get_client) against this server.

        On the way out, the process's events worker is drained while the server is still up:
        it binds to the API it first sent to, and would otherwise keep sending later tests'
        events to this server after it has stopped.
        """
        from prefect.settings import PREFECT_API_URL, temporary_settings

        try:
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                yield
        finally:
            _drain_events_workers(at_exit=True)

    def prefect(
        self,
        *args: str,
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `prefect ARGS...` against this server and return its output.

        Raises:
            AssertionError: check is true and the command failed; shows its output.
        """
        result = subprocess.run(
            [self.executable, *args],
            cwd=cwd or self.home,
            env=self.client_env(extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.commands.append(result)
        if check and result.returncode != 0:
            raise AssertionError(
                f"`prefect {' '.join(args)}` exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def http(self) -> httpx.Client:
        """An HTTP client for the REST API (`/api` is the base path); retries a 503."""
        return httpx.Client(
            base_url=self.api_url.rstrip("/") + "/", timeout=30, transport=_RetryUnavailable()
        )

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")


class _RetryUnavailable(httpx.HTTPTransport):
    """Send a request again after a 503, as Prefect's own client does.

    The server answers 503 to errors a client may retry, such as a busy SQLite database on a
    loaded machine.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, UNAVAILABLE_ATTEMPTS + 1):
            response = super().handle_request(request)
            if response.status_code != 503 or attempt == UNAVAILABLE_ATTEMPTS:
                return response
            response.close()
            time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")


def _wait_until_healthy(server: PrefectServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"prefect server start exited {server.process.returncode}:\n{server.log()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{server.api_url}/health").status_code == 200:
                    return
            time.sleep(0.25)
    raise RuntimeError(
        f"prefect server start did not answer /api/health within {timeout:.0f} s:\n{server.log()}"
    )


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started with `start_new_session=True`, and its children, by its PID."""
    if process.poll() is not None:
        return
    # The server runs in its own session: signal its process group, by the PID we started,
    # so that any helper process it spawned goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def running_prefect_server(
    directory: Path,
    extra_env: Mapping[str, str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
    services: bool = True,
    executable: str | None = None,
) -> Iterator[PrefectServer]:
    """Start `prefect server start` on a free 127.0.0.1 port; stop it on exit.

    Args:
        directory: where the server's `PREFECT_HOME` (database, logs) goes.
        extra_env: more variables for the server and its clients, e.g.
            `PREFECT_API_DATABASE_CONNECTION_URL` for PostgreSQL.
        startup_timeout: seconds to wait for `/api/health`.
        services: run the background services (event persister, triggers, ...); without
            them only the API and UI run.
        executable: the `prefect` console script to run, for the server and `prefect()`
            commands; default: the one of this interpreter's environment.

    Raises:
        RuntimeError: the server exited or did not become healthy in time; shows its output.
    """
    home = directory / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # The UI asks the API at this URL; left unset, it would default to port 4200.
    env = base_environment(home, {"PREFECT_UI_API_URL": f"http://{HOST}:{port}/api"})
    env.update(extra_env or {})
    log_path = home / "server.log"
    executable = executable or prefect_executable()
    if "PREFECT_API_DATABASE_CONNECTION_URL" not in env:
        seed_migrated_database(home, executable)
    args = [executable, "server", "start", "--host", HOST, "--port", str(port)]
    if not services:
        args.append("--no-services")
    server = PrefectServer(
        api_url=f"http://{HOST}:{port}/api",
        home=home,
        env=env,
        process=_spawn(args, home, env, log_path),
        log_path=log_path,
        executable=executable,
        argv=args,
    )
    try:
        _wait_until_healthy(server, startup_timeout)
        yield server
    finally:
        _drain_events_workers()
        stop_process_group(server.process)


def restart(server: PrefectServer, startup_timeout: float = STARTUP_TIMEOUT) -> None:
    """Start a stopped server again: same port, home and database (what an outage ends with)."""
    assert server.process.poll() is not None, "stop it first (stop_process_group)"
    server.process = _spawn(server.argv, server.home, server.env, server.log_path, "ab")
    _wait_until_healthy(server, startup_timeout)


def _spawn(
    args: list[str], home: Path, env: dict[str, str], log_path: Path, mode: str = "wb"
) -> subprocess.Popen[bytes]:
    with log_path.open(mode) as log:
        return subprocess.Popen(
            args,
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _drain_events_workers(at_exit: bool = False) -> None:
    """Send this process's pending events and stop its events workers, before a server stops.

    Prefect 3.2 to 3.4 keep one events worker per process for any running server: its key
    lacks the API URL. A worker made while a test pointed PREFECT_API_URL at a temporary
    server would otherwise keep sending every later event there, and they would be lost once
    it stops. The next event makes a new worker for the API current then.

    In an async test (or Playwright's sync API) an event loop runs in this thread, where
    `drain_all` cannot wait: it waits in another thread, else a worker still connecting
    meets a stopped server and logs into a closed stream at exit.
    """
    from prefect.events.worker import EventsWorker

    def drain() -> None:
        waiting = EventsWorker.drain_all(timeout=10, at_exit=at_exit)
        assert not inspect.iscoroutine(waiting)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        drain()
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(drain).result()
