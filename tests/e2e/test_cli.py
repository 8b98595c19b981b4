"""The `cm-tasks` console script: login prompts, refresh, status exit codes, the emulator."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    temporary_settings,
)
from typer.testing import CliRunner

from cm_tasks import CarbonMapperStacToken
from cm_tasks.cli import EXIT_CHECK_ERROR, EXIT_USAGE, app, main
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.token_helpers import (
    EMAIL_BLOCK,
    PASSWORD_BLOCK,
    SENTINEL_TOKEN,
    TOKEN_BLOCK,
    delete_token_block,
    save_token_expiring_in,
)

SENTINEL_PASSWORD = "sentinel-Pa55word-never-shown"
CONSOLE_SCRIPT = Path(sys.executable).with_name("cm-tasks")
PTY_WAIT_SECONDS = 60.0


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def watchdog_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """CM_BASE_URL of the tokens test_watchdog.save_token writes: status checks the API too."""
    monkeypatch.setenv("CM_BASE_URL", "http://127.0.0.1:9/api/v1/")


def secret_value(block_name: str) -> Any:
    return Secret.load(block_name, _sync=True).get()  # type: ignore[attr-defined, call-arg]


def run_main(*argv: str) -> int:
    """Run the console script's entry point in-process; returns its exit code."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    return int(exited.value.code or 0)


# --- login -----------------------------------------------------------------------------------


def test_login_saves_both_blocks_and_never_shows_the_password(runner: CliRunner) -> None:
    answers = f"someone@example.org\n{SENTINEL_PASSWORD}\n{SENTINEL_PASSWORD}\n"

    result = runner.invoke(app, ["login"], input=answers)

    assert result.exit_code == 0, result.output
    assert secret_value(EMAIL_BLOCK) == "someone@example.org"
    assert secret_value(PASSWORD_BLOCK) == SENTINEL_PASSWORD
    assert "Carbon Mapper password" in result.output
    assert "Repeat the password" in result.output
    assert f"Secret block {PASSWORD_BLOCK!r}" in result.output
    assert SENTINEL_PASSWORD not in result.output


def test_login_block_names_from_options_and_settings(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_PASSWORD_BLOCK", "team-password")

    result = runner.invoke(
        app,
        ["login", "--email", "team@example.org", "--email-block", "team-email"],
        input=f"{SENTINEL_PASSWORD}\n{SENTINEL_PASSWORD}\n",
    )

    assert result.exit_code == 0, result.output
    assert "Carbon Mapper e-mail" not in result.output  # given as an option
    assert secret_value("team-email") == "team@example.org"
    assert secret_value("team-password") == SENTINEL_PASSWORD


def test_login_asks_again_when_the_confirmation_differs(runner: CliRunner) -> None:
    answers = f"a@example.org\nfirst-try-1\nfirst-try-2\n{SENTINEL_PASSWORD}\n{SENTINEL_PASSWORD}\n"

    result = runner.invoke(app, ["login", "--password-block", "retry-password"], input=answers)

    assert result.exit_code == 0, result.output
    assert "do not match" in result.output
    assert secret_value("retry-password") == SENTINEL_PASSWORD


def test_login_rejects_a_bad_email_before_saving(runner: CliRunner) -> None:
    result = runner.invoke(app, ["login", "--email-block", "never-written"], input="not an email\n")

    assert result.exit_code == 1
    assert "is not an e-mail address" in result.output
    with pytest.raises(ValueError, match="never-written"):
        Secret.load("never-written", _sync=True)  # type: ignore[call-arg]


def test_login_rejects_a_bad_block_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("login", "--email-block", "My Email") == EXIT_USAGE

    assert "lowercase letters, digits and dashes" in capsys.readouterr().err


def test_the_password_is_never_an_argument(runner: CliRunner) -> None:
    assert run_main("login", "--password", SENTINEL_PASSWORD) == EXIT_USAGE
    assert run_main("login", "someone@example.org", SENTINEL_PASSWORD) == EXIT_USAGE
    help_text = runner.invoke(app, ["login", "--help"]).output
    assert "hidden prompt" in help_text
    assert "--password " not in help_text.replace("--password-block", "")


def _read_until(fd: int, wanted: str, seen: bytearray) -> None:
    deadline = time.monotonic() + PTY_WAIT_SECONDS
    while wanted.encode() not in seen:
        if time.monotonic() > deadline:
            shown = seen.decode().replace(SENTINEL_PASSWORD, "<the password>")
            raise AssertionError(f"no {wanted!r} prompt; the terminal showed: {shown!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            seen += chunk


def test_login_on_a_terminal_hides_the_password() -> None:
    """A real pseudo-terminal: what the person sees, echo included, never shows the password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "login", "--password-block", "pty-password"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        # A session of its own with the pseudo-terminal as its controlling terminal, as in a
        # real shell: getpass turns echo off on that terminal.
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(terminal)
    seen = bytearray()
    try:
        _read_until(controller, "e-mail:", seen)
        os.write(controller, b"tty@example.org\n")
        # The prompt is printed, then getpass turns echo off and prints a space: type after it.
        _read_until(controller, "password: ", seen)
        os.write(controller, SENTINEL_PASSWORD.encode() + b"\n")
        _read_until(controller, "Repeat the password: ", seen)
        os.write(controller, SENTINEL_PASSWORD.encode() + b"\n")
        _read_until(controller, "Next:", seen)
        assert process.wait(timeout=PTY_WAIT_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)

    assert "tty@example.org" in seen.decode()  # the e-mail is echoed as typed
    assert SENTINEL_PASSWORD not in seen.decode()
    assert secret_value("pty-password") == SENTINEL_PASSWORD


# --- status ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "word", "code"),
    [
        (timedelta(days=10), "OK", 0),
        (timedelta(days=2), "EXPIRING", 1),
        (timedelta(hours=-2), "EXPIRED", 2),
        (None, "MISSING", 3),
    ],
)
@pytest.mark.usefixtures("watchdog_api")
def test_status_exit_codes(runner: CliRunner, left: timedelta | None, word: str, code: int) -> None:
    delete_token_block("status-token")
    if left is not None:
        save_token_expiring_in("status-token", left, name="status-name")

    result = runner.invoke(app, ["status", "--token-block", "status-token"])
    as_json = runner.invoke(app, ["status", "--token-block", "status-token", "--json"])

    assert result.exit_code == code, result.output
    assert word in result.output
    assert as_json.exit_code == code
    status = json.loads(as_json.output)
    assert status["state"] == word
    assert word in status["message"]
    if left is not None:
        assert "status-name" in result.output
        assert status["days_left"] == pytest.approx(left.total_seconds() / 86400, abs=0.01)
    assert SENTINEL_TOKEN not in result.output + as_json.output
    assert run_main("status", "--token-block", "status-token") == code


@pytest.mark.usefixtures("watchdog_api")
def test_status_threshold_option(runner: CliRunner) -> None:
    save_token_expiring_in("threshold-token", timedelta(days=5))

    assert runner.invoke(app, ["status", "--token-block", "threshold-token"]).exit_code == 0
    result = runner.invoke(
        app, ["status", "--token-block", "threshold-token", "--threshold-days", "7"]
    )
    assert result.exit_code == 1
    assert "threshold 7 days" in result.output


@pytest.mark.usefixtures("watchdog_api")
def test_status_uses_the_token_block_setting(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_token_expiring_in("from-settings", timedelta(days=9))
    monkeypatch.setenv("CM_TOKEN_BLOCK", "from-settings")

    result = runner.invoke(app, ["status"])

    assert result.exit_code == 0
    assert "from-settings" in result.output


def test_status_cannot_check_exits_4(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_TOKEN_BLOCK", "Not A Name")
    bad_setting = runner.invoke(app, ["status"])
    assert bad_setting.exit_code == EXIT_CHECK_ERROR
    assert "CM_TOKEN_BLOCK" in bad_setting.output

    monkeypatch.delenv("CM_TOKEN_BLOCK")
    closed_port = f"http://127.0.0.1:{_closed_port()}/api"
    with temporary_settings({PREFECT_API_URL: closed_port, PREFECT_CLIENT_MAX_RETRIES: 0}):
        unreachable = runner.invoke(app, ["status"])
    assert unreachable.exit_code == EXIT_CHECK_ERROR, unreachable.output
    assert "Could not read the token block" in unreachable.output
    assert closed_port in unreachable.output


def test_status_against_a_web_page_is_could_not_check_not_missing(runner: CliRunner) -> None:
    # PREFECT_API_URL at a proxy or web app that answers 200 with HTML to every path: Prefect's
    # client fails to parse the block, which is not "no such block" (exit 3, "refresh now").
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>Sign in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        with temporary_settings({PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}):
            result = runner.invoke(app, ["status"])
    finally:
        server.shutdown()
        server.server_close()

    assert result.exit_code == EXIT_CHECK_ERROR, result.output
    assert "not as a Prefect API" in result.output
    assert "MISSING" not in result.output


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_usage_errors_do_not_look_like_a_status() -> None:
    assert run_main("status", "--no-such-option") == EXIT_USAGE
    assert run_main("status", "--threshold-days", "-1") == EXIT_USAGE
    assert run_main("--version") == 0


# --- refresh ---------------------------------------------------------------------------------


def test_refresh_prints_the_summary_never_the_token(
    runner: CliRunner, carbon_mapper_credentials: CarbonMapperEmulator
) -> None:
    result = runner.invoke(app, ["refresh", "--token-name", "cli-token", "--lifetime-days", "20"])

    assert result.exit_code == 0, result.output
    block = CarbonMapperStacToken.load(TOKEN_BLOCK, _sync=True)  # type: ignore[call-arg]
    assert block.get() == carbon_mapper_credentials.issued_stac_tokens[-1]  # type: ignore[union-attr]
    assert "cli-token" in result.output
    assert TOKEN_BLOCK in result.output
    assert "stac, catalog:read" in result.output
    for secret in [
        carbon_mapper_credentials.password,
        *carbon_mapper_credentials.issued_stac_tokens,
    ]:
        assert secret not in result.output
    for secret in carbon_mapper_credentials.issued_access_tokens:
        assert secret not in result.output


def test_refresh_failure_says_what_to_do(
    runner: CliRunner, carbon_mapper_credentials: CarbonMapperEmulator
) -> None:
    Secret(value="wrong-password-xyz").save("wrong-password", overwrite=True)

    result = runner.invoke(app, ["refresh", "--password-block", "wrong-password"])

    assert result.exit_code == 1
    assert "The refresh failed" in result.output
    assert "cm-tasks login" in result.output
    assert "wrong-password-xyz" not in result.output
    assert carbon_mapper_credentials.issued_stac_tokens == []


def test_refresh_rejects_bad_parameters_before_any_call(
    runner: CliRunner, carbon_mapper_credentials: CarbonMapperEmulator
) -> None:
    result = runner.invoke(app, ["refresh", "--lifetime-days", "0"])

    assert result.exit_code == EXIT_USAGE  # a usage error, not a failed refresh
    assert "lifetime_days is 0" in result.output
    assert carbon_mapper_credentials.requests() == 0


def test_refresh_with_the_prefect_api_down_says_so_without_a_traceback(
    runner: CliRunner, carbon_mapper_credentials: CarbonMapperEmulator
) -> None:
    # Prefect wraps the connection error in a RuntimeError ("Failed to reach API") when the
    # flow run starts: it must read like status's "could not reach", not a crash.
    closed_port = f"http://127.0.0.1:{_closed_port()}/api"
    with temporary_settings({PREFECT_API_URL: closed_port, PREFECT_CLIENT_MAX_RETRIES: 0}):
        result = runner.invoke(app, ["refresh"])

    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert result.exit_code == 1
    assert "The refresh failed" in result.output
    assert closed_port in result.output
    assert "prefect server start" in result.output
    assert carbon_mapper_credentials.requests() == 0


# --- emulator and help -----------------------------------------------------------------------


def test_emulator_command_serves_and_prints_the_demo_account() -> None:
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        email = process.stdout.readline()
        assert "serving at http://127.0.0.1:" in first, first
        base_url = first.rsplit(" ", 1)[1].strip()
        assert "demo@carbonmapper.example" in email
        assert httpx.get(f"{base_url}stac/", timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["login", "refresh", "status", "emulator"]),
        (["login"], ["--email-block", "--password-block", "hidden prompt"]),
        (["refresh"], ["--token-name", "--lifetime-days", "never the token"]),
        (["status"], ["--threshold-days", "--json", "0 OK", "3 MISSING", "4 could not check"]),
        (["emulator"], ["--port", "--latency"]),
    ],
)
def test_help_is_there_for_every_command(
    runner: CliRunner, command: list[str], expected: list[str]
) -> None:
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)

    assert result.exit_code == 0
    for text in expected:
        assert text in result.output
