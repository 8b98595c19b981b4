"""The `cm-tasks` command as a terminal shows it: quiet on success, one paragraph on failure.

Real processes (the console script) against a real `prefect server start` and the emulator:
what a person sees on stdout and stderr is the product here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cm_tasks.testing import CarbonMapperEmulator
from tests.support.prefect_server import PrefectServer

CM_TASKS = str(Path(sys.executable).with_name("cm-tasks"))
NOISE = ("Still processing items", "Traceback", "WARNING", "EventsWorker")


def _cm_tasks(
    server: PrefectServer | None,
    emulator: CarbonMapperEmulator,
    *args: str,
    answers: str = "",
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    if server is None:  # no Prefect API at all, and a home of its own
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CM_", "PREFECT_"))}
        env["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cm-tasks-no-api-")
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    else:
        env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
    env.update(CM_BASE_URL=emulator.base_url, CM_RETRY_BACKOFF="0", CM_TIMEOUT="5")
    env.update(extra_env or {})
    return subprocess.run(
        [CM_TASKS, *args],
        env=env,
        input=answers,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # no terminal: the hidden prompt reads stdin
        check=False,
    )


def _login(server: PrefectServer, emulator: CarbonMapperEmulator, password: str) -> None:
    answers = f"{emulator.email}\n{password}\n{password}\n"
    result = _cm_tasks(server, emulator, "login", answers=answers)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [n for n in NOISE if n in result.stderr], result.stderr


def test_login_refresh_and_status_print_no_prefect_noise(
    server: PrefectServer, emulator: CarbonMapperEmulator
) -> None:
    _login(server, emulator, emulator.password)

    for command in (["refresh"], ["status"]):
        result = _cm_tasks(server, emulator, *command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert not [n for n in NOISE if n in result.stderr], result.stderr
        assert emulator.password not in result.stdout + result.stderr

    status = _cm_tasks(server, emulator, "status")
    assert f"the Prefect API at {server.api_url}" in status.stdout  # which API it checked
    as_json = _cm_tasks(server, emulator, "status", "--json")
    assert server.api_url in as_json.stdout


@pytest.fixture
def wrong_password(server: PrefectServer, emulator: CarbonMapperEmulator) -> None:
    _login(server, emulator, "not-the-password")


def test_a_wrong_password_is_one_clean_paragraph(
    wrong_password: None, server: PrefectServer, emulator: CarbonMapperEmulator
) -> None:
    result = _cm_tasks(server, emulator, "refresh")

    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert output.startswith("Error: The refresh failed:"), output
    assert "Traceback" not in output
    assert "\n\n" not in output
    assert len(output.splitlines()) <= 3, output  # one paragraph (a long one may wrap)
    assert "cm-tasks login" in output  # what to do


@pytest.mark.parametrize("debug", [["--debug"], ["CM_DEBUG=1"]], ids=["option", "variable"])
def test_debug_shows_the_traceback(
    debug: list[str], wrong_password: None, server: PrefectServer, emulator: CarbonMapperEmulator
) -> None:
    if debug == ["--debug"]:
        result = _cm_tasks(server, emulator, "--debug", "refresh")
    else:
        result = _cm_tasks(server, emulator, "refresh", extra_env={"CM_DEBUG": "1"})

    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "Error: The refresh failed:" in result.stderr
    assert "not-the-password" not in result.stdout + result.stderr


def test_status_without_a_prefect_api_says_so(emulator: CarbonMapperEmulator) -> None:
    result = _cm_tasks(None, emulator, "status")

    assert result.returncode == 4
    assert "no Prefect API configured" in result.stderr
    assert "MISSING" not in result.stdout + result.stderr
    assert "Starting temporary server" not in result.stderr  # answered before any Prefect call
