"""The built wheel, as a team that installs it from an index meets it (`make wheel-test`).

Builds the sdist and the wheel from this checkout, installs the wheel into a fresh venv outside
the checkout, and from empty directories, with nothing of the checkout on the path: prints the
version, starts the emulator and a real `prefect server start` of that venv, logs in,
`cm-tasks deploy`s, lets a worker started in another empty directory run both deployments to
Completed, then `cm-tasks serve`s, runs a Quick run in it and stops it with SIGINT.

The fresh venv's dependencies come from a wheelhouse kept between runs (`pip wheel` fills it
from the package index on the first run or when a requirement changes; later runs install
offline with `--no-index`). Set CM_TASKS_TEST_WHEELHOUSE to put it elsewhere than
`~/.cache/cm-tasks/test-wheelhouse`.

CM_TASKS_TEST_CONSTRAINTS names a constraints file (constraints/prefect-X.Y.txt): the wheel is
then installed with that team's environment on that Prefect. `.ci/compat` sets it in
each leg, whose python (that version's Prefect) builds the venv and runs the tests, so that the
fresh venv's client and server, and this test's own client, are all of that one version.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect import __version__ as prefect_version
from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks import CarbonMapperStacToken
from cm_tasks._version import __version__
from cm_tasks.deployments import DEPLOYMENTS
from tests.support import REPO_ROOT
from tests.support.leaks import Secrets, assert_no_leak
from tests.support.prefect_server import PrefectServer, running_prefect_server, stop_process_group

pytestmark = pytest.mark.wheel

WHEELHOUSE = Path(
    os.environ.get("CM_TASKS_TEST_WHEELHOUSE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "cm-tasks"
    / "test-wheelhouse"
)
CONSTRAINTS = os.environ.get("CM_TASKS_TEST_CONSTRAINTS")
POOL = "carbon-mapper"
QUICK_RUN = {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI with defaults"}}
INSTALL_TIMEOUT = 900.0
RUN_TIMEOUT = 120.0
# A JWT (header.payload.signature, base64url): no output of cm-tasks should ever hold one.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


@dataclass
class FreshVenv:
    """A venv with only the wheel (and its dependencies) installed, outside the checkout."""

    path: Path
    wheel: Path

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """A user's shell: this venv first on PATH; nothing of the checkout or of the tests."""
        dropped = ("PREFECT_", "CM_", "PYTHON", "VIRTUAL_ENV", "PYTEST")
        env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        env.update(
            PATH=f"{self.path / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(self.path),
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        env.update(extra)
        return env


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def _still_waiting(process: subprocess.Popen[bytes], deadline: float, log: Path) -> None:
    """Fail with the process's output if it exited or time ran out; else pause a little."""
    assert process.poll() is None, log.read_text()
    assert time.monotonic() < deadline, log.read_text()
    time.sleep(0.3)


def _empty_dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    return path


# --- building -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build`: the sdist, then the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend of this environment (the dev extra), no download.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)])
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("cm_tasks-*.whl")
    return found


def test_the_wheel_holds_what_a_user_needs(wheel: Path) -> None:
    assert wheel.name == f"cm_tasks-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"cm_tasks-{__version__}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
    for module in (
        "cm_tasks/py.typed",
        "cm_tasks/deployments.py",
        "cm_tasks/testing/__init__.py",
        "cm_tasks/testing/pytest_plugin.py",
    ):
        assert module in names
    assert not any(n.startswith(("tests/", "flows/")) for n in names)
    assert "cm-tasks = cm_tasks.cli:main" in entry_points
    assert "[prefect.collections]" in entry_points
    assert "cm_tasks = cm_tasks.testing.pytest_plugin" in entry_points
    assert "License-Expression: Apache-2.0" in metadata
    assert license_text == (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text


def test_the_sdist_holds_the_license_changelog_and_readme(dist: Path) -> None:
    (sdist,) = dist.glob("cm_tasks-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "prefect.yaml"} <= names
    assert "src/cm_tasks/_version.py" in names
    assert "tests/conftest.py" in names
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert f"## {__version__}" in changelog
    assert changelog.index("## Unreleased") < changelog.index(f"## {__version__}")


# --- installing ---------------------------------------------------------------------------------


def _constrained() -> list[str]:
    """pip's arguments for the team's environment of CM_TASKS_TEST_CONSTRAINTS, if it is set.

    The whole environment (-r), not only its pins: Prefect 3.2's CLI imports
    `importlib_metadata` without declaring it, which a team's environment holds.
    """
    return ["--requirement", str(Path(CONSTRAINTS).resolve())] if CONSTRAINTS else []


def _pip_env() -> dict[str, str]:
    """This environment without PYTHONPATH: a checkout's src/ on it (with the egg-info the
    build leaves there) would make pip see cm-tasks as installed and install nothing."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _pip_install_offline(venv: Path, wheel: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --no-compile: each module is compiled on first import instead, of fewer modules.
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
         "--no-index", "--find-links", str(WHEELHOUSE), *_constrained(), str(wheel)],
        capture_output=True, text=True, check=False, timeout=INSTALL_TIMEOUT, env=_pip_env(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> FreshVenv:
    path = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", str(path)])
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    if _pip_install_offline(path, wheel).returncode != 0:
        # First run, or a requirement changed: fetch the dependencies' wheels from the index.
        _run(
            [str(path / "bin" / "python"), "-m", "pip", "wheel", "--quiet",
             "--wheel-dir", str(WHEELHOUSE), *_constrained(), str(wheel)],
            timeout=INSTALL_TIMEOUT, env=_pip_env(),
        )  # fmt: skip
        # Never install a stale cm-tasks of the same version from the wheelhouse.
        for stale in WHEELHOUSE.glob("cm_tasks-*.whl"):
            stale.unlink()
        installed = _pip_install_offline(path, wheel)
        assert installed.returncode == 0, installed.stdout + installed.stderr
    return FreshVenv(path=path, wheel=wheel)


def test_the_installed_package_comes_from_the_fresh_venv(
    fresh_venv: FreshVenv, tmp_path: Path
) -> None:
    where = _empty_dir(tmp_path, "empty")
    env = fresh_venv.env(tmp_path / "prefect-home")

    version = _run(["cm-tasks", "--version"], cwd=where, env=env)
    located = _run(
        ["python", "-c", "import cm_tasks, sys; print(cm_tasks.__file__); print(sys.path)"],
        cwd=where,
        env=env,
    )

    prefect = _run(["prefect", "--version"], cwd=where, env=env)

    assert version.stdout.strip() == f"cm-tasks {__version__}"
    # The Prefect of the fresh venv (client and `prefect server start`) is the one under test:
    # that of this test's own client, which the constraints pin in a compat leg.
    assert prefect.stdout.strip() == prefect_version
    if CONSTRAINTS:
        assert f"prefect=={prefect_version}" in Path(CONSTRAINTS).read_text().splitlines()
    module_file, search_path = located.stdout.splitlines()
    assert module_file.startswith(str(fresh_venv.path))
    assert str(REPO_ROOT) not in search_path
    assert "PYTHONPATH" not in env


def test_the_docs_are_installed_and_readable_without_a_checkout(
    fresh_venv: FreshVenv, tmp_path: Path
) -> None:
    where = _empty_dir(tmp_path, "empty-docs")
    env = fresh_venv.env(tmp_path / "prefect-home")

    listed = _run(["cm-tasks", "docs"], cwd=where, env=env)
    page = _run(["cm-tasks", "docs", "operate"], cwd=where, env=env)

    assert f"operate      {fresh_venv.path}/share/cm-tasks/docs/operate.md" in listed.stdout
    assert page.stdout == (REPO_ROOT / "docs" / "operate.md").read_text()


# --- from empty directories: emulator, server, login, deploy, worker, serve -------------------


@contextmanager
def _emulator(venv: FreshVenv, where: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """`cm-tasks emulator --port 0`; yields its base URL and the banner it printed."""
    log = where / "emulator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [venv.bin("cm-tasks"), "emulator", "--port", "0"],
            cwd=where, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"serving at (\S+)", log.read_text())):
            _still_waiting(process, deadline, log)
        yield found.group(1), log.read_text()
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def stack(
    fresh_venv: FreshVenv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The fresh venv's emulator and `prefect server start`, each from an empty directory."""
    root = tmp_path_factory.mktemp("stack")
    user_home = root / "user-prefect-home"
    env = fresh_venv.env(user_home)
    with (
        _emulator(fresh_venv, _empty_dir(root, "emulator"), env) as (base_url, banner),
        running_prefect_server(
            _empty_dir(root, "server"),
            # Empty PYTHONPATH: ignored by Python, and it replaces any of the test runner's.
            extra_env={"PATH": env["PATH"], "VIRTUAL_ENV": env["VIRTUAL_ENV"], "PYTHONPATH": ""},
            executable=fresh_venv.bin("prefect"),
        ) as server,
    ):
        password = re.search(r"password:\s+(\S+)", banner)
        email = re.search(r"email:\s+(\S+)", banner)
        assert password, banner
        assert email, banner
        yield {
            "root": root,
            "user_home": user_home,
            "server": server,
            "user_env": fresh_venv.env(
                user_home,
                PREFECT_API_URL=server.api_url,
                CM_BASE_URL=base_url,
                CM_RETRY_BACKOFF="0",
            ),
            "email": email.group(1),
            "password": password.group(1),
            "outputs": {},
        }


def _flow_run_state(server: PrefectServer, flow_run_id: str) -> dict[str, Any]:
    with server.http() as http:
        response = http.get(f"flow_runs/{flow_run_id}")
        response.raise_for_status()
        return dict(response.json()["state"])


def _deployment_id(server: PrefectServer, full_name: str) -> str:
    with server.http() as http:
        response = http.get(f"deployments/name/{full_name}")
        response.raise_for_status()
        return str(response.json()["id"])


def _saved_token(server: PrefectServer) -> str:
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        block = CarbonMapperStacToken.load("carbon-mapper-stac-token", _sync=True)
        return str(block.get())


def test_login_and_deploy_from_an_empty_directory(
    fresh_venv: FreshVenv, stack: dict[str, Any]
) -> None:
    where = _empty_dir(stack["root"], "deploying")
    env = stack["user_env"]

    login = subprocess.run(
        [fresh_venv.bin("cm-tasks"), "login", "--email", stack["email"]],
        input=f"{stack['password']}\n{stack['password']}\n",
        capture_output=True, text=True, cwd=where, env=env, timeout=RUN_TIMEOUT,
        start_new_session=True,  # no terminal: the password prompt reads the piped input
    )  # fmt: skip
    deployed = _run([fresh_venv.bin("cm-tasks"), "deploy"], cwd=where, env=env)
    again = _run([fresh_venv.bin("cm-tasks"), "deploy"], cwd=where, env=env)

    assert login.returncode == 0, login.stdout + login.stderr
    assert "Saved the e-mail" in login.stdout
    assert f"Work pool '{POOL}' (process): created" in deployed.stdout
    for spec in DEPLOYMENTS:
        assert f"Created {spec.full_name}: cron '{spec.cron}' (UTC)" in deployed.stdout
        assert f"Updated {spec.full_name}" in again.stdout
    assert "next run" in deployed.stdout
    # The API this shell deploys against is carried into the refresh deployment (issue 17).
    assert f'"base_url": "{env["CM_BASE_URL"]}"' in deployed.stdout
    with stack["server"].http() as http:
        for spec in DEPLOYMENTS:
            record = http.get(f"deployments/name/{spec.full_name}").json()
            assert record["entrypoint"] == spec.entrypoint
            assert record["work_pool_name"] == POOL
            assert not record["pull_steps"]
            assert record["path"] is None
    stack["outputs"].update(
        login=login.stdout + login.stderr,
        deploy=deployed.stdout + deployed.stderr + again.stdout + again.stderr,
    )


def _wait_for_completed(
    server: PrefectServer, flow_run_id: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Wait until the flow run is Completed; fail at once when it ends otherwise."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while (state := _flow_run_state(server, flow_run_id))["type"] != "COMPLETED":
        assert state["type"] not in {"FAILED", "CRASHED", "CANCELLED"}, log.read_text()
        _still_waiting(process, deadline, log)


def _quick_run(server: PrefectServer, full_name: str) -> str:
    """The UI's Quick run: create_flow_run with no parameters; returns the flow run's ID."""
    with server.http() as http:
        response = http.post(
            f"deployments/{_deployment_id(server, full_name)}/create_flow_run", json=QUICK_RUN
        )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_worker_elsewhere_runs_both_deployments(
    fresh_venv: FreshVenv, stack: dict[str, Any]
) -> None:
    server: PrefectServer = stack["server"]
    where = _empty_dir(stack["root"], "worker")
    log = where / "worker.log"
    # A worker started as the README shows, without CM_BASE_URL: the deployment says which
    # API its runs serve (`cm-tasks deploy` ran with CM_BASE_URL set), not the worker.
    worker_env = {k: v for k, v in stack["user_env"].items() if k != "CM_BASE_URL"}
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [fresh_venv.bin("prefect"), "worker", "start", "--pool", POOL],
            cwd=where, env={**worker_env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        # The refresh first, as the UI's Quick run starts it; the check then finds the token.
        _wait_for_completed(server, _quick_run(server, "refresh-stac-token/weekly"), worker, log)
        stack["tokens"] = [_saved_token(server)]
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            saved = CarbonMapperStacToken.load("carbon-mapper-stac-token", _sync=True)
        assert saved.base_url == stack["user_env"]["CM_BASE_URL"]

        # The check as a user starts it from the shell.
        started = _run(
            [fresh_venv.bin("prefect"), "deployment", "run", "check-stac-token/daily"],
            cwd=_empty_dir(stack["root"], "run-daily"),
            env=stack["user_env"],
        )
        daily_run = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)
        assert daily_run, started.stdout
        _wait_for_completed(server, daily_run.group(1), worker, log)
    finally:
        stop_process_group(worker)
    stack["outputs"]["worker"] = started.stdout + started.stderr + log.read_text()


def test_serve_runs_a_quick_run_and_stops_on_sigint(
    fresh_venv: FreshVenv, stack: dict[str, Any]
) -> None:
    where = _empty_dir(stack["root"], "serving")
    log = where / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [fresh_venv.bin("cm-tasks"), "serve"],
            cwd=where, env=stack["user_env"], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            # As in a terminal, whatever this test runner ignores: Ctrl-C interrupts.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while "being served" not in log.read_text():
            _still_waiting(process, deadline, log)
        flow_run_id = _quick_run(stack["server"], "refresh-stac-token/weekly")
        _wait_for_completed(stack["server"], flow_run_id, process, log)

        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            stop_process_group(process)
    output = log.read_text()
    stack["outputs"]["serve"] = output
    stack.setdefault("tokens", []).append(_saved_token(stack["server"]))

    assert returncode == 0, output
    assert "Traceback" not in output
    assert "Stopped." in output


def test_no_secret_in_any_output_or_in_the_server(stack: dict[str, Any]) -> None:
    outputs: dict[str, str] = stack["outputs"]
    assert {"login", "deploy", "worker", "serve"} <= outputs.keys()  # the runs above happened
    secrets = Secrets({"demo password": stack["password"]})
    for number, token in enumerate(stack.get("tokens", []), 1):
        secrets.add(f"stac token #{number}", token)
    assert len(secrets) >= 3  # the password and a token from the worker and from serve

    # Access and refresh tokens never reach this process: any JWT in an output is a leak.
    assert {where: JWT.findall(text) for where, text in outputs.items()} == {
        where: [] for where in outputs
    }
    with temporary_settings(updates={PREFECT_API_URL: stack["server"].api_url}):
        assert_no_leak(secrets, texts=outputs, prefect_home=stack["server"].home, api=True)
    assert_no_leak(secrets, prefect_home=stack["user_home"])


def test_a_json_status_from_the_installed_cli(fresh_venv: FreshVenv, stack: dict[str, Any]) -> None:
    """The installed CLI reads the token the runs above saved (and no secret in it)."""
    status = subprocess.run(
        [fresh_venv.bin("cm-tasks"), "status", "--json"],
        capture_output=True, text=True, cwd=_empty_dir(stack["root"], "status"),
        env=stack["user_env"], timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    payload = json.loads(status.stdout)
    assert payload["state"] == "OK"
    assert not JWT.search(status.stdout)
