"""`cm-tasks` against a real `prefect server start`: usage errors and "could not check".

A bad option or `CM_*` setting of `cm-tasks refresh` is a usage error (exit 64) found before
anything reaches Prefect or the Carbon Mapper API: no flow run, no request. `cm-tasks status`
says MISSING (exit 3) only when a healthy Prefect API has no such block; a PREFECT_API_URL
that reaches the server without its `/api` is "could not check" (exit 4).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from cm_tasks import refresh_stac_token
from cm_tasks.cli import EXIT_CHECK_ERROR, EXIT_USAGE, app
from cm_tasks.testing import CarbonMapperEmulator
from cm_tasks.watchdog import TokenState
from tests.support.prefect_server import PrefectServer


def _flow_runs(server: PrefectServer) -> int:
    with server.http() as http:
        response = http.post("flow_runs/filter", json={})
        response.raise_for_status()
        return len(response.json())


def _invoke(
    server: PrefectServer, args: list[str], api_url: str | None = None, stdin: str | None = None
) -> tuple[int, str]:
    with temporary_settings({PREFECT_API_URL: api_url or server.api_url}):
        result = CliRunner().invoke(app, args, input=stdin, terminal_width=200)
    return result.exit_code, result.output


def test_flow_run_count_sees_new_runs(server: PrefectServer) -> None:
    # positive control for the "no flow run" checks below: a run created over REST is counted
    before = _flow_runs(server)
    with server.http() as http:
        flow = http.post("flows/", json={"name": "count-control"}).json()
        http.post("flow_runs/", json={"flow_id": flow["id"], "name": "control"}).raise_for_status()
    assert _flow_runs(server) == before + 1


# --- Bad options are usage errors ----------------------------------------------------------------

BAD_REFRESH = {
    "lifetime-0": (["--lifetime-days", "0"], {}, "lifetime_days is 0"),
    "lifetime-366": (["--lifetime-days", "366"], {}, "from 1 to 365"),
    "token-block": (["--token-block", "Bad_Name"], {}, "token_block is 'Bad_Name'"),
    "email-block": (["--email-block", "my email"], {}, "email_block is 'my email'"),
    "token-name": (["--token-name", "  "], {}, "token_name is blank"),
    "cm-setting": ([], {"CM_TIMEOUT": "soon"}, "CM_TIMEOUT"),
    "cm-lifetime": ([], {"CM_TOKEN_LIFETIME_DAYS": "0"}, "CM_TOKEN_LIFETIME_DAYS"),
}


@pytest.mark.parametrize("case", sorted(BAD_REFRESH))
def test_bad_refresh_options_exit_64_before_any_flow_run_or_request(
    server: PrefectServer,
    carbon_mapper_env: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    args, env, words = BAD_REFRESH[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runs = _flow_runs(server)

    code, output = _invoke(server, ["refresh", *args])

    assert code == EXIT_USAGE, output
    assert words in output
    assert "Traceback" not in output
    assert _flow_runs(server) == runs  # nothing reached Prefect
    assert carbon_mapper_env.requests() == 0  # nor the Carbon Mapper API


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"lifetime_days": 0}, "lifetime_days is 0"),
        ({"token_block": "Bad_Name"}, "token_block is 'Bad_Name'"),
    ],
)
def test_the_flow_says_what_the_cli_says(
    server: PrefectServer,
    carbon_mapper_env: CarbonMapperEmulator,
    params: dict[str, object],
    words: str,
) -> None:
    # As run from the UI: the flow's own check, in the same words as the CLI's usage error.
    state = refresh_stac_token(return_state=True, **params)  # type: ignore[arg-type]
    option = "--" + next(iter(params)).replace("_", "-")
    code, output = _invoke(server, ["refresh", option, str(next(iter(params.values())))])

    assert state.is_failed()
    message = str(state.message)
    assert words in message
    cli_sentence = output.removeprefix("Error: ").strip()
    assert code == EXIT_USAGE
    assert " ".join(cli_sentence.split()) in " ".join(message.split())
    assert carbon_mapper_env.requests() == 0


def test_token_name_help_shows_the_default(server: PrefectServer) -> None:
    code, output = _invoke(server, ["refresh", "--help"])
    assert code == 0
    assert "prefect-20261127T0600Z" in output
    assert "Default: prefect-." not in output


# --- Status says MISSING only when it could check ------------------------------------------------


def test_status_is_missing_only_on_a_healthy_api(server: PrefectServer) -> None:
    code, output = _invoke(server, ["status"])
    assert code == TokenState.MISSING.exit_code, output
    assert "MISSING" in output


@pytest.mark.parametrize("suffix", ["", "/", "/api/v1"])
def test_status_with_a_wrong_prefect_api_url_could_not_check(
    server: PrefectServer, suffix: str
) -> None:
    wrong = server.api_url.removesuffix("/api") + suffix

    code, output = _invoke(server, ["status"], api_url=wrong)

    assert code == EXIT_CHECK_ERROR, output
    assert "MISSING" not in output
    assert "PREFECT_API_URL" in output
    assert "/api" in output
    assert "Run the refresh" not in output


def test_status_json_with_a_wrong_url_prints_no_status(
    server: PrefectServer, tmp_path: Path
) -> None:
    code, output = _invoke(
        server, ["status", "--json"], api_url=server.api_url.removesuffix("/api")
    )
    assert code == EXIT_CHECK_ERROR
    assert '"state"' not in output


@pytest.fixture(scope="module")
def ui_page_everywhere() -> Iterator[str]:
    """A server's root as Prefect 3.2-3.4 serve it: the UI's HTML page, 200, on every GET."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!DOCTYPE html><html><title>Prefect Server</title></html>"
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = b'{"detail":"Method Not Allowed"}'
            self.send_response(405)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


SECRET_TYPED = "typed-password-42"


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["status"], None),
        (["deploy"], None),
        (["login", "--email", "team@example.com"], f"{SECRET_TYPED}\n{SECRET_TYPED}\n"),
        (["refresh"], None),
    ],
    ids=["status", "deploy", "login", "refresh"],
)
def test_a_server_root_that_answers_html_is_not_a_prefect_api(
    server: PrefectServer, ui_page_everywhere: str, args: list[str], stdin: str | None
) -> None:
    """PREFECT_API_URL without /api on Prefect 3.2-3.4: status said MISSING, deploy, login and
    refresh crashed with a traceback."""
    code, output = _invoke(server, args, api_url=ui_page_everywhere, stdin=stdin)

    assert code == (EXIT_CHECK_ERROR if args == ["status"] else 1), output
    # A message, not an uncaught error. status stops at the block read (blocks.load_token_block
    # finds no JSON), the others at their first API call: all say it is not a Prefect API.
    assert "as a Prefect API" in output
    assert SECRET_TYPED not in output.replace("Repeat the password", "")
    assert "Traceback" not in output
    assert "MISSING" not in output
    assert "PREFECT_API_URL" in output
    assert "/api" in output
