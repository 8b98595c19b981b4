"""The `cm-tasks` command: log in, refresh the token, check it, serve the emulator.

    cm-tasks login      save the account e-mail and password to two Secret blocks (prompted)
    cm-tasks refresh    run the refresh-stac-token flow now and print the summary
    cm-tasks status     token name, expiry, days left; exit 0 OK, 1 EXPIRING, 2 EXPIRED,
                        3 MISSING, 4 could not check, 5 token for another API
    cm-tasks emulator   serve the Carbon Mapper API emulator on 127.0.0.1
    cm-tasks deploy     create or update the weekly refresh and daily check on a work pool
    cm-tasks serve      run the same two deployments from this process (no pool, no worker)
    cm-tasks docs       print the documentation installed with the package

The password is only ever read from a hidden prompt: there is no option for it, so it never
lands in shell history or a process list. Every command talks to the Prefect API that
`PREFECT_API_URL` names (or Prefect's local database when it is unset).

Errors are one `Error:` paragraph that says what to fix, with no traceback; `--debug` (or
`CM_DEBUG=1`) adds the traceback and the flow runs' own log lines.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Annotated, Any, NoReturn, cast

import httpx
import typer
from rich.console import Console
from rich.table import Table

from cm_tasks import deployments
from cm_tasks._version import __version__
from cm_tasks.errors import CarbonMapperError, ConfigurationError
from cm_tasks.notify import days_left
from cm_tasks.settings import (
    CarbonMapperSettings,
    api_identity,
    load_settings,
    prefect_api_at,
    validate_block_name,
)
from cm_tasks.watchdog import DEFAULT_THRESHOLD_DAYS, TokenState, TokenStatus, check_token

EXIT_FAILED = 1
EXIT_CHECK_ERROR = 4
EXIT_WRONG_API = 5  # status: the block holds a token for another API than CM_BASE_URL
EXIT_USAGE = 64  # BSD sysexits EX_USAGE: kept apart from status's 0-4
CLICK_USAGE_EXIT = 2  # what Click's usage errors exit with
# Loggers of the flow and task runs a command starts in this process: their lines (and
# tracebacks) go to the Prefect API as always, and to the terminal only with --debug.
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
STATUS_STYLES = {
    TokenState.OK: "green",
    TokenState.EXPIRING: "yellow",
    TokenState.EXPIRED: "red",
    TokenState.MISSING: "red",
}

app = typer.Typer(
    name="cm-tasks",
    help=(
        "Carbon Mapper STAC tokens with Prefect: log in once, refresh the token, check how "
        "long it has left. Uses the Prefect API in PREFECT_API_URL and the CM_* settings."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,  # a traceback must never print a secret local
)


def _out() -> Console:
    # Made per call: CliRunner and pytest swap sys.stdout between invocations.
    return Console(soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True)


class _Options:
    """Options of the whole command (`cm-tasks --debug ...`), set by the root callback."""

    debug = False
    command_process = False  # main() runs as the process's own command (not called by code)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err = _err()
    if _Options.debug and sys.exc_info()[0] is not None:
        err.print_exception(show_locals=False)  # locals could hold a secret
    err.print(f"[bold red]Error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@contextmanager
def _prefect_call(what: str, code: int = EXIT_FAILED, *, quiet: bool = True) -> Iterator[None]:
    """Turn the errors of talking to Prefect into one `Error: what: ...` paragraph and code.

    A Carbon Mapper error says what to fix itself; an unreachable Prefect API, or a URL that
    is not one, gets the fix for that. Anything else is a bug and keeps its traceback.
    quiet: keep the flow and task runs' log lines off the terminal (they still reach the API),
    unless --debug: the command prints its own summary or error.
    """
    quieted = _quiet_run_logs() if quiet and not _Options.debug else []
    try:
        yield
    except typer.Exit:
        raise
    except CarbonMapperError as exc:
        _fail(f"{what}: {exc}", code)
    except (httpx.HTTPError, OSError) as exc:
        _fail(f"{what}: {_prefect_error(exc)}", code)
    except json.JSONDecodeError as exc:  # Prefect 3.2-3.4's UI page at the server's root
        _fail(f"{what}: {_not_an_api(exc)}", code)
    except RuntimeError as exc:
        # Starting a flow run, Prefect raises RuntimeError("Failed to reach API") from the
        # connection error: an unreachable Prefect API, not a crash.
        cause = exc.__cause__
        if isinstance(cause, json.JSONDecodeError):
            _fail(f"{what}: {_not_an_api(cause)}", code)
        if not isinstance(cause, httpx.HTTPError | OSError):
            raise
        _fail(f"{what}: {_prefect_error(cause)}", code)
    finally:
        for handler, run_filter in quieted:
            handler.removeFilter(run_filter)


def _quiet_run_logs() -> list[tuple[logging.Handler, logging.Filter]]:
    """Filter the run loggers' records out of the terminal handlers; return what to undo."""
    run_filter = _DropRecords(lambda record: record.name.startswith(_RUN_LOGGERS))
    added: list[tuple[logging.Handler, logging.Filter]] = []
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.addFilter(run_filter)
                added.append((handler, run_filter))
    return added


class _DropRecords(logging.Filter):
    def __init__(self, drop: Any) -> None:
        super().__init__()
        self._drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._drop(record)


def _still_processing(record: logging.LogRecord) -> bool:
    return record.getMessage().startswith("Still processing items")


def _no_api_configured() -> str | None:
    """The fix, when neither PREFECT_API_URL nor a Prefect profile names an API."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    return (
        "no Prefect API configured: PREFECT_API_URL is not set, so there is no token block "
        "to check (Prefect would start a temporary, empty local database). Set "
        "PREFECT_API_URL to your server's API, e.g. http://127.0.0.1:4200/api, or run "
        "`prefect cloud login`."
    )


def _api_location() -> str:
    from prefect.settings import get_current_settings

    return prefect_api_at(get_current_settings().api.url)


def _prefect_error(exc: Exception) -> str:
    # Only the type and status: a Prefect API error body can quote the values sent.
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 404:  # a route the API lacks: the URL names no Prefect API (no /api?)
        return f"{type(exc).__name__} 404 from {_api_location()}: " + _CHECK_API_URL
    return (
        f"{type(exc).__name__}{f' {status}' if status else ''} from {_api_location()}. "
        "Start a server (`prefect server start`) or set PREFECT_API_URL, then try again."
    )


_CHECK_API_URL = "Check PREFECT_API_URL: it ends in /api, e.g. http://127.0.0.1:4200/api."


def _not_an_api(exc: Exception) -> str:
    return (
        f"{type(exc).__name__}: {_api_location()} does not answer as a Prefect API. "
        + _CHECK_API_URL
    )


def _block_option(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_block_name(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}, e.g. carbon-mapper-email.") from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cm-tasks {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show tracebacks and the flow runs' log lines (or set CM_DEBUG=1).",
        ),
    ] = False,
) -> None:
    """Carbon Mapper STAC tokens with Prefect."""
    del version  # handled by its eager callback
    _Options.debug = debug or os.environ.get("CM_DEBUG", "").strip().lower() in {"1", "true"}


@app.command()
def login(
    email: Annotated[
        str | None,
        typer.Option(help="Account e-mail; asked for when omitted.", show_default=False),
    ] = None,
    email_block: Annotated[
        str | None,
        typer.Option(
            help="Secret block for the e-mail. Default: CM_EMAIL_BLOCK (carbon-mapper-email).",
            callback=_block_option,
            show_default=False,
        ),
    ] = None,
    password_block: Annotated[
        str | None,
        typer.Option(
            help=(
                "Secret block for the password. Default: CM_PASSWORD_BLOCK "
                "(carbon-mapper-password)."
            ),
            callback=_block_option,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Save the Carbon Mapper account e-mail and password in two Prefect Secret blocks.

    The password is asked for at a hidden prompt, twice, and never echoed; there is no option
    to pass it, so it cannot end up in shell history. Run it again to change either value.
    """
    settings = _settings()
    email_name = email_block or settings.email_block
    password_name = password_block or settings.password_block
    address = (email or typer.prompt("Carbon Mapper e-mail")).strip()
    if "@" not in address or any(c.isspace() for c in address):
        _fail(f"{address!r} is not an e-mail address: give the account's e-mail, name@host.")
    password: str = typer.prompt(
        "Carbon Mapper password",
        hide_input=True,
        confirmation_prompt="Repeat the password",
    )
    if not password:  # used byte for byte: spaces are part of a password
        _fail("The password is empty; nothing was saved.")

    from prefect.blocks.system import Secret

    with _prefect_call("Could not save the Secret blocks"):
        Secret(value=address).save(email_name, overwrite=True)
        Secret(value=password).save(password_name, overwrite=True)
    _out().print(
        f"Saved the e-mail to Secret block {email_name!r} and the password to Secret block "
        f"{password_name!r} in {_api_location()}.\n"
        "Next: `cm-tasks refresh` (or run the refresh-stac-token deployment).",
        highlight=False,
    )


@app.command()
def refresh(
    token_name: Annotated[
        str | None,
        typer.Option(
            # No angle brackets: the markdown help mode drops them as HTML tags.
            help="Name of the new token. Default: the UTC date and time, e.g. "
            "prefect-20261127T0600Z.",
            show_default=False,
        ),
    ] = None,
    lifetime_days: Annotated[
        int | None,
        typer.Option(
            help="Days the token stays valid, 1-365. Default: CM_TOKEN_LIFETIME_DAYS (14).",
            show_default=False,
        ),
    ] = None,
    email_block: Annotated[
        str | None,
        typer.Option(
            help="Secret block with the e-mail. Default: CM_EMAIL_BLOCK.", show_default=False
        ),
    ] = None,
    password_block: Annotated[
        str | None,
        typer.Option(
            help="Secret block with the password. Default: CM_PASSWORD_BLOCK.", show_default=False
        ),
    ] = None,
    token_block: Annotated[
        str | None,
        typer.Option(
            help="Block to save the token to. Default: CM_TOKEN_BLOCK.", show_default=False
        ),
    ] = None,
) -> None:
    """Run the refresh-stac-token flow now, in this process, and print what it saved.

    Prints the block, token name, expiry and scopes - never the token. Exits 1 with the
    flow's error message when the refresh fails; the stored token is then unchanged. A bad
    option or CM_* setting exits 64 before any flow run or API call.
    """
    from cm_tasks.refresh import resolve_request

    # The flow's own checks, run first: a bad value is a usage error with the flow's words,
    # not a failed flow run.
    settings = _settings(EXIT_USAGE)
    try:
        request = resolve_request(
            settings,
            token_name=token_name,
            lifetime_days=lifetime_days,
            email_block=email_block,
            password_block=password_block,
            token_block=token_block,
        )
    except ConfigurationError as exc:
        _fail(str(exc), EXIT_USAGE)

    from cm_tasks.flows import refresh_stac_token
    from cm_tasks.run_parameters import given_parameters

    parameters = request.model_dump()
    # Every value is an option or this shell's CM_* setting already: explicit, even one
    # equal to the package default, so the flow must not replace it with a setting.
    with _prefect_call("The refresh failed"), given_parameters(parameters):
        summary: dict[str, Any] = refresh_stac_token(**parameters)
    expires_at = datetime.fromisoformat(summary["expires_at"])
    table = Table(title="STAC token refreshed", show_header=False, title_justify="left")
    table.add_row("block", summary["token_block"])
    table.add_row("token name", summary["token_name"])
    table.add_row("expires", f"{expires_at:%Y-%m-%d %H:%M} UTC")
    table.add_row("days left", f"{days_left(expires_at):.1f}")
    table.add_row("scopes", ", ".join(summary["scopes"]) or "none listed")
    _out().print(table)


@app.command()
def status(
    token_block: Annotated[
        str | None,
        typer.Option(
            help="Token block to check. Default: CM_TOKEN_BLOCK (carbon-mapper-stac-token).",
            callback=_block_option,
            show_default=False,
        ),
    ] = None,
    threshold_days: Annotated[
        float,
        typer.Option(min=0, max=365, help="EXPIRING when this many days or fewer are left."),
    ] = DEFAULT_THRESHOLD_DAYS,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the status as JSON (for scripts).")
    ] = False,
) -> None:
    """Show the saved token's name, expiry and days left; the exit code says how it stands.

    Exit codes: 0 OK, 1 EXPIRING (within --threshold-days), 2 EXPIRED, 3 MISSING (a healthy
    Prefect API has no such block), 4 could not check (Prefect API unreachable or not a
    Prefect API, e.g. PREFECT_API_URL without /api; bad setting; unreadable block), 5 the
    token is for another API than CM_BASE_URL (get_stac_token() here would refuse it).
    Reads the block only: no call to the Carbon Mapper API.
    """
    settings = _settings(EXIT_CHECK_ERROR)
    block_name = token_block or settings.token_block
    no_api = _no_api_configured()
    if no_api:
        _fail(f"Could not check the token block {block_name!r}: {no_api}", EXIT_CHECK_ERROR)
    with _prefect_call("Could not read the token block", EXIT_CHECK_ERROR):
        try:
            result = check_token(block_name, threshold_days)
        except CarbonMapperError as exc:  # its message names the block and the fix
            _fail(str(exc), EXIT_CHECK_ERROR)
    api = _api_location()
    wrong_api = _wrong_api(result, settings.base_url)
    message = wrong_api or result.message
    if as_json:
        typer.echo(
            json.dumps(
                {
                    **result.model_dump(mode="json"),
                    "expected_base_url": settings.base_url,
                    "message": message,
                    "checked_in": api,
                }
            )
        )
    else:
        _print_status(result, api, wrong_api)
    raise typer.Exit(EXIT_WRONG_API if wrong_api else result.state.exit_code)


def _wrong_api(result: TokenStatus, expected: str) -> str | None:
    """What to do when the block holds a token for another API than this one; else None."""
    if result.base_url is None or api_identity(result.base_url) == api_identity(expected):
        return None
    return (
        f"WRONG API: block {result.token_block!r} holds a token for {result.base_url}, but "
        f"this environment uses {expected} (CM_BASE_URL): get_stac_token() here refuses it. "
        "Run `cm-tasks refresh` here to save a token for this API, or set CM_BASE_URL to the "
        "block's API; give each API its own block (--token-block, CM_TOKEN_BLOCK)."
    )


def _print_status(result: TokenStatus, api: str, wrong_api: str | None = None) -> None:
    style = STATUS_STYLES[result.state]
    table = Table(show_header=False, box=None)
    if wrong_api:
        table.add_row("status", "[bold red]WRONG API[/]")
    else:
        table.add_row("status", f"[bold {style}]{result.state.value}[/]")
    table.add_row("block", result.token_block)
    table.add_row("checked in", api)
    if result.base_url is not None:
        table.add_row("API", result.base_url)
    if result.expires_at is not None:
        table.add_row("token name", result.token_name or "")
        table.add_row("expires", f"{result.expires_at:%Y-%m-%d %H:%M} UTC")
        table.add_row("days left", f"{result.days_left:.1f}")
        table.add_row("scopes", ", ".join(result.scopes) or "none listed")
    out = _out()
    out.print(table)
    if wrong_api or not result.ok:
        out.print(wrong_api or result.message, highlight=False, markup=False)


@app.command()
def emulator(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port on 127.0.0.1; 0 picks a free one.")
    ] = 8787,
    latency: Annotated[
        float, typer.Option(min=0, help="Delay in seconds added to every request.")
    ] = 0.0,
) -> None:
    """Serve the Carbon Mapper API emulator on 127.0.0.1 until Ctrl-C.

    Prints its base URL and the demo account (a fake one). Point cm-tasks at it with
    CM_BASE_URL=http://127.0.0.1:PORT/api/v1/.
    """
    from cm_tasks.testing.__main__ import serve

    try:
        serve(port, latency)
    except OSError as exc:  # e.g. the port is taken
        _fail(
            f"Could not serve the emulator on 127.0.0.1:{port} ({exc.strerror or exc}). "
            "Pick another port with --port (0 picks a free one)."
        )


@app.command()
def docs(
    page: Annotated[
        str | None,
        typer.Argument(
            help="Page to print: readme, usage, operate, reference, security, scaling-out, "
            "development or changelog. Without it: the list of pages and their files.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print cm-tasks' documentation, which is installed with the package (Markdown).

    Without a page, lists the pages and where their files are (open them in any Markdown
    viewer: the links between them work there).
    """
    from cm_tasks import docs as documentation

    code = documentation.main([page] if page else [])
    if code:
        raise typer.Exit(code)


def _pool_option(value: str) -> str:
    try:
        return deployments.validate_pool_name(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}, e.g. {deployments.DEFAULT_POOL}.") from None


_WATCHDOG_HELP = "Include the daily expiry check check-stac-token/daily (--no-watchdog: skip it)."
_SELF_HEAL_HELP = (
    "Start the weekly refresh when the daily check finds the token missing, expired or "
    "expiring (a trigger on carbon-mapper.stac-token.expiring; --no-self-heal: leave it out)."
)


def _job_variables_option(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter('give a JSON object, e.g. \'{"image": "you/cm-tasks:0.2.0"}\'.')
    return parsed


@app.command()
def deploy(
    pool: Annotated[
        str,
        typer.Option(
            help="Work pool whose workers run the deployments; created (type process) if missing.",
            callback=_pool_option,
        ),
    ] = deployments.DEFAULT_POOL,
    watchdog: Annotated[bool, typer.Option(help=_WATCHDOG_HELP)] = True,
    self_heal: Annotated[bool, typer.Option(help=_SELF_HEAL_HELP)] = True,
    job_variables: Annotated[
        str | None,
        typer.Option(
            help=(
                "JSON object of job variables for both deployments, e.g. "
                '\'{"image": "you/cm-tasks:0.2.0"}\' (docker, kubernetes) or '
                '\'{"pip_packages": ["cm-tasks"]}\' (Prefect managed). Stored in plain text.'
            ),
            callback=_job_variables_option,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Create or update the deployments refresh-stac-token/weekly and check-stac-token/daily.

    Safe to run again: it updates them in place. Their entrypoints are module paths of the
    installed package, with no pull step, so any worker on the pool that has cm-tasks
    installed runs them: no checkout needed. Start one with
    `prefect worker start --pool carbon-mapper`. The API (CM_BASE_URL), block names and
    token lifetime set by CM_* settings here become the deployments' parameters, so the run
    form shows them and a worker's own settings cannot redirect the runs.
    """
    _settings(EXIT_USAGE)  # a bad CM_* setting is a usage error, before any Prefect call
    with _prefect_call("Could not deploy"):
        try:
            report = deployments.deploy(
                pool,
                watchdog=watchdog,
                job_variables=cast("dict[str, Any] | None", job_variables),
                self_heal=self_heal,
            )
        except deployments.JobVariablesError as exc:  # the pool would ignore them: no write
            _fail(f"Could not deploy: {exc}", EXIT_USAGE)
    out = _out()
    pool_state = "created" if report.pool.created else "exists"
    out.print(
        f"Work pool {report.pool.name!r} ({report.pool.type}): {pool_state}, in {_api_location()}.",
        highlight=False,
    )
    if job_variables:
        out.print(f"Job variables: {json.dumps(job_variables)}", highlight=False, markup=False)
    for result in report.deployments:
        spec = result.spec
        out.print(
            f"{result.action.capitalize()} {result.full_name}: cron {spec.cron!r} "
            f"({spec.timezone}), at most {spec.concurrency_limit} run at a time "
            f"({spec.collision_strategy}); next run {result.next_run:%Y-%m-%d %H:%M} UTC.",
            highlight=False,
        )
        parameters = spec.parameters(spec.load_flow())
        if parameters:
            out.print(
                f"  parameters from this environment's CM_* settings: {json.dumps(parameters)}",
                highlight=False,
                markup=False,
            )
        if self_heal and spec.triggered_by:
            out.print(
                f"  also started by the event {spec.triggered_by} (self-healing; "
                "--no-self-heal leaves it out).",
                highlight=False,
                markup=False,
            )
    out.print(
        f"Next: start a worker where cm-tasks is installed: "
        f"`prefect worker start --pool {report.pool.name}`.",
        highlight=False,
    )


@app.command()
def serve(
    watchdog: Annotated[bool, typer.Option(help=_WATCHDOG_HELP)] = True,
    self_heal: Annotated[bool, typer.Option(help=_SELF_HEAL_HELP)] = True,
) -> None:
    """Run the same deployments from this process until Ctrl-C or SIGTERM: no pool, no worker.

    Registers refresh-stac-token/weekly and check-stac-token/daily (the schedules of `deploy`)
    and runs their scheduled runs, and runs started from the UI or with
    `prefect deployment run`, in this process. When it stops, it pauses their schedules
    until `cm-tasks serve` or `cm-tasks deploy` runs again; it says so when the Prefect API
    does not answer (within seconds), and exits 0 either way.
    """
    _settings(EXIT_USAGE)  # a bad CM_* setting is a usage error, before any Prefect call
    # From its first line, and while Prefect loads, a stop signal is only noted: raised inside
    # Prefect's import, a KeyboardInterrupt surfaces wrapped in another error (pydantic's), as
    # a failure with a traceback.
    stop_asked: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, _frame: stop_asked.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    _out().print(f"Serving from this process, with {_api_location()}.", highlight=False)
    registering = False
    paused: list[str] = []  # what serve registered, then paused
    not_paused: deployments.ServedNotPausedError | None = None
    no_traceback = _NoTraceback()
    if not _Options.debug:
        for name in _RUNNER_LOGGERS:
            logging.getLogger(name).addFilter(no_traceback)
    try:
        with _prefect_call("Could not serve", quiet=False):  # the runner's lines are its output
            from prefect import serve as _load_prefects_runner  # noqa: F401

            # Then a stop raises KeyboardInterrupt: Ctrl-C as before Prefect loaded, and
            # SIGTERM likewise until Prefect's runner installs its own handler.
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            if stop_asked:
                raise KeyboardInterrupt
            registering = True
            try:
                paused = deployments.serve(watchdog=watchdog, self_heal=self_heal)
                registering = bool(paused)
            except deployments.ServedNotPausedError as exc:
                not_paused = exc
    except KeyboardInterrupt:  # before serve, or (seldom) between its steps: not known paused
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for name in _RUNNER_LOGGERS:
            logging.getLogger(name).removeFilter(no_traceback)
        if _Options.command_process:
            _exit_at_once_on_a_stop()
    if paused:
        _out().print(
            "Stopped. The served deployments' schedules are paused until `cm-tasks serve` or "
            "`cm-tasks deploy` runs again.",
            highlight=False,
        )
    elif not registering:
        _out().print("Stopped before registering any deployment: nothing to pause.")
    else:
        not_paused = not_paused or deployments.ServedNotPausedError("stopped again at once")
        _err().print(f"Stopped, but {not_paused}", highlight=False, markup=False)
        if _Options.command_process:
            # Stopped twice, or its Prefect API gone: nothing left to wait for. An interpreter
            # exit with Prefect's registration abandoned in its thread could abort (exit -6).
            _exit_now()


def _exit_now(_signum: int | None = None, _frame: object = None) -> NoReturn:
    """End this process at once, with exit 0, once what it printed is out."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(0)


def _exit_at_once_on_a_stop() -> None:
    """From here on, Ctrl-C or SIGTERM ends this process at once, with exit 0.

    Once serve has stopped, all that is left is its last lines and Prefect's exit handlers,
    which send its last logs and events (1-2 s, longer with its API gone): a stop then used
    to kill the process by the signal (exit -15, or 143 in a container).
    """
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _exit_now)


# Where Prefect's runner reports its own troubles with tracebacks: its observer when the
# Prefect API goes away (the server stopped or restarts), the runner when it cancels a run in
# flight at shutdown (Prefect 3.4: "attached to a different loop"), and asyncio for callbacks
# failing in its event loop at shutdown (Prefect 3.4's observer task, 3.2's anyio scopes).
# The message says what happened; the traceback shows only with --debug.
_RUNNER_LOGGERS = ("prefect.FlowRunCancellingObserver", "prefect.runner", "asyncio")


class _NoTraceback(logging.Filter):
    """Keeps a record's message, drops its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


def _settings(code: int = EXIT_FAILED) -> CarbonMapperSettings:
    try:
        return load_settings()
    except CarbonMapperError as exc:
        _fail(str(exc), code)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the `cm-tasks` console script.

    Like Typer's own, except that usage errors exit 64 (EX_USAGE) rather than 2, which
    `cm-tasks status` uses for EXPIRED.

    Example:
        ```python
        from cm_tasks.cli import main

        main(["status", "--json"])  # exits with the status code
        ```
    """
    # Prefect's events worker warns "Still processing items" while it sends a command's
    # events at exit; it sends them all the same. Not a thing a user can act on.
    logging.getLogger("EventsWorker").addFilter(_DropRecords(_still_processing))
    _Options.debug = False
    _Options.command_process = argv is None
    try:
        result = app(args=argv, prog_name="cm-tasks", standalone_mode=False)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(EXIT_FAILED)
    except Exception as exc:
        # Click's own errors (Typer ships its own copy of Click since 0.2x, so they are found
        # by what they do) show themselves; usage errors exit 64, not Click's 2, which
        # `cm-tasks status` uses for EXPIRED.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if show is None or not isinstance(code, int):
            raise
        show()
        sys.exit(EXIT_USAGE if code == CLICK_USAGE_EXIT else code)
    sys.exit(result if isinstance(result, int) else 0)
