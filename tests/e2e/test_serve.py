"""`cm-tasks serve` as a process of its own: registers the deployments, stops cleanly on SIGTERM.

Against the session's Prefect API; what it registered is compared with the specs of
`cm_tasks.deployments`. And against a server of its own that stops first: the stop does not
wait for an API that is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import DeploymentStatus
from prefect.settings import PREFECT_API_URL

from cm_tasks.deployments import (
    DEPLOYMENTS,
)
from tests.support.deploy import api_record, spec_as_api
from tests.support.prefect_server import running_prefect_server, stop_process_group

CONSOLE_SCRIPT = Path(sys.executable).with_name("cm-tasks")
SERVE_WAIT_SECONDS = 90.0
# What Prefect's runner prints once it serves the deployments (Prefect 3.2 to 3.9).
RUNNER_BANNER = "Your deployments are being served"
# A stop with the Prefect API gone: Prefect's client alone retried for 62 s (2 + 4 + ... + 32).
STOP_WITHOUT_API_SECONDS = 30.0


def _read(full_name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(full_name)


@contextmanager
def _serving(env: dict[str, str], cwd: Path, lines: list[str]) -> Iterator[subprocess.Popen[str]]:
    """`cm-tasks serve` once its runner polls: its deployments are READY. Killed on the way out.

    Not just its banner: Prefect prints it before its runner takes SIGTERM over, and a stop in
    between raises KeyboardInterrupt in whatever Prefect runs then (a race of its own, which
    can fail with a traceback: not what these tests are about).
    """
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "serve"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner = threading.Event()

    def read_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if RUNNER_BANNER in line:
                banner.set()
        banner.set()  # the process ended: stop waiting

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        # The runner prints its banner once every deployment is registered, just before it
        # starts polling: the moment a user could stop it.
        assert banner.wait(SERVE_WAIT_SECONDS), "".join(lines)
        deadline = time.monotonic() + SERVE_WAIT_SECONDS
        while not all(_read(s.full_name).status == DeploymentStatus.READY for s in DEPLOYMENTS):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "never polled:\n" + "".join(lines)
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=30)


def test_serve_registers_the_same_deployments_and_stops_cleanly_on_sigterm(
    no_deployments: None, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CM_"))}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    lines: list[str] = []
    with _serving(env, tmp_path, lines) as process:
        served = {spec.full_name: _read(spec.full_name) for spec in DEPLOYMENTS}
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    output = "".join(lines)

    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    assert "Stopped. The served deployments' schedules are paused" in output
    for spec in DEPLOYMENTS:
        stored = served[spec.full_name]
        assert api_record(stored) == spec_as_api(spec)
        assert stored.work_pool_name is None  # served: no pool, no worker
        assert _read(spec.full_name).paused  # nothing runs the schedules any more


def test_a_stop_after_the_prefect_api_has_gone_is_quick_and_says_nothing_was_paused(
    tmp_path: Path,
) -> None:
    # Seen by a reviewer: serve and its Prefect server stopped together (both children of a
    # killed shell): serve hung 76 s on "Pausing all deployments", then exited 1.
    lines: list[str] = []
    with running_prefect_server(tmp_path) as server, server.using():
        env = server.client_env({"PREFECT_HOME": str(tmp_path / "serve-home")})
        with _serving(env, tmp_path, lines) as process:
            stop_process_group(server.process)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_WITHOUT_API_SECONDS)
            except subprocess.TimeoutExpired:
                raise AssertionError("still stopping:\n" + "".join(lines)) from None
    output = "".join(lines)

    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    assert "schedules could not be paused: the Prefect API did not answer" in output, output


def _script_env() -> dict[str, str]:
    """The environment of a script that runs `cm-tasks serve` against the session's API."""
    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


def _run_script(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """A script run to its end (`cm_tasks.cli.main()` as the console script calls it)."""
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# serve returns at once (stopped, schedules paused); then Prefect's exit handlers take long.
_SLOW_EXIT = """
import atexit, sys, time
atexit.register(time.sleep, 60)  # as Prefect's exit handlers with its API gone
from cm_tasks import cli, deployments
deployments.serve = lambda **options: ["refresh-stac-token/weekly"]  # stopped, paused
sys.argv = ["cm-tasks", "serve", "--no-watchdog"]
cli.main()  # as the console script calls it
"""


def test_a_stop_after_serves_last_line_ends_it_at_once_with_0(tmp_path: Path) -> None:
    # Found by reviewers: a stop during Prefect's exit handlers (its last logs and events,
    # 1-2 s; longer with its API gone) killed serve by the signal: exit -15 or -2 (143 in a
    # container) after it had said the schedules were paused.
    stop_at = "Stopped."
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_EXIT],
        cwd=tmp_path,
        env=_script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        output = ""
        for line in process.stdout:
            output += line
            if stop_at in line:
                break
        assert stop_at in output, output
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


_STOP_AT_FIRST_LINE = """
import os, signal, sys
from cm_tasks import cli
where = cli._api_location
def stopped_as_it_prints():  # the stop lands as serve says its first line
    os.kill(os.getpid(), signal.SIGTERM)
    return where()
cli._api_location = stopped_as_it_prints
sys.argv = ["cm-tasks", "serve", "--no-watchdog"]
cli.main()
"""


def test_a_stop_as_serve_prints_its_first_line_ends_it_with_0(tmp_path: Path) -> None:
    # Found by a reviewer: "Serving from" was printed before the stop was noted; a SIGTERM
    # right after it (2 runs in 5) killed serve by the signal, with no word.
    done = _run_script(_STOP_AT_FIRST_LINE, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Stopped before registering any deployment" in done.stdout


_NOT_PAUSED = """
import atexit, sys, time
atexit.register(time.sleep, 60)  # as Prefect's exit handlers with its API gone
from cm_tasks import cli, deployments
def stopped_twice(**options):
    raise deployments.ServedNotPausedError("stopped again while a deployment was being registered")
deployments.serve = stopped_twice
sys.argv = ["cm-tasks", "serve", "--no-watchdog"]
cli.main()
"""


def test_serve_that_could_not_pause_exits_at_once_with_0(tmp_path: Path) -> None:
    # Found by a reviewer: after a second stop cut a registration short, the interpreter's
    # exit with Prefect's registration abandoned in its thread sometimes aborted (exit -6).
    # Nothing is left to wait for once serve has said the schedules may be active.
    done = _run_script(_NOT_PAUSED, tmp_path, timeout=45)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "could not be paused: stopped again while" in done.stderr
