"""The secret-leak suite: no password or token in plain text, anywhere Prefect or we write.

Sentinel credentials (unique strings) and every token the emulator issued are searched for in
the Prefect API (runs, parameters, task states, logs, artifacts, events, ...), in captured
output, in exceptions and tracebacks, in reprs and validation errors, and - in a subprocess
with its own PREFECT_HOME - in every file Prefect wrote (database, WAL, result storage).
Each scan also has a positive control, so a scanner that sees nothing cannot pass.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any
from uuid import uuid4

import httpx
import pytest
from prefect import flow, get_run_logger
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate
from pydantic import SecretStr, ValidationError

from cm_tasks import (
    CarbonMapperClient,
    CarbonMapperError,
    CarbonMapperStacToken,
    IssuedStacToken,
    RetryPolicy,
    TokenPair,
    load_settings,
    refresh_stac_token,
    resolve_request,
    run_refresh,
)
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support import REPO_ROOT
from tests.support.leaks import (
    Secrets,
    assert_no_leak,
    collect_secrets,
    scan_api,
    scan_exception,
    scan_prefect_home,
    sentinel_credentials,
    wait_for_events,
)
from tests.support.prefect_server import seed_migrated_database

REPO = REPO_ROOT
TOKEN_BLOCK = "carbon-mapper-stac-token"


@pytest.fixture
def sentinel(carbon_mapper_env: CarbonMapperEmulator) -> Secrets:
    return sentinel_credentials(carbon_mapper_env)


# --- the scanner itself ------------------------------------------------------------------


def test_scanner_finds_plain_encoded_and_truncated_secrets(tmp_path: Path) -> None:
    jwt = (
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzZW50aW5lbC0xMjMifQ"
        ".c2lnbmF0dXJlLW9mLXRoZS10b2tlbi1hYmNkZWZnaGlq"
    )
    secrets = Secrets({"password": "p@ss word/42", "token": jwt})
    (tmp_path / "a.db").write_bytes(b"\x00\x01p%40ss%20word%2F42\x00")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.log").write_text(
        "input_value={'t': 'eyJhbG...ZS10b2tlbi1hYmNkZWZnaGlq'}"
    )
    (tmp_path / "clean.txt").write_text("nothing here")
    pickled = base64.encodebytes(pickle.dumps({"result": "p@ss word/42", "pad": "x" * 80}))
    (tmp_path / "result").write_bytes(b'{"data": "' + pickled.replace(b"\n", b"\\n") + b'"}')

    report = scan_prefect_home(tmp_path, secrets)

    assert sorted((h.secret, Path(h.where).name) for h in report.hits) == [
        ("password", "a.db"),
        ("password", "result"),
        ("token", "b.log"),
    ]
    assert len(report.scanned) == 4
    assert "p@ss" not in repr(secrets)
    with pytest.raises(AssertionError, match="password found in stdout") as raised:
        assert_no_leak(secrets, texts={"stdout": 'x "p@ss word/42" y'})
    assert "p@ss" not in str(raised.value)


def test_scanner_looks_into_exception_chains() -> None:
    secrets = Secrets({"password": "hunter2-sentinel"})
    try:
        try:
            raise ValueError("body was {'password': 'hunter2-sentinel'}")
        except ValueError:
            raise RuntimeError("clean message") from None
    except RuntimeError as error:
        hits = scan_exception(error, secrets)
    # from None hides it from a printed traceback, but the object still holds it
    assert [h.secret for h in hits] == ["password"]


def _planted(secret: str, where: str) -> BaseException:
    """A clean error whose secret sits two links down, in an attached request or response."""
    url = "http://127.0.0.1:9/api/v1/token/pair"
    if where == "request body":
        request = httpx.Request("POST", url, json={"password": secret})
    elif where == "request header":
        request = httpx.Request("POST", url, headers={"Authorization": f"Bearer {secret}"})
    elif where == "request url":
        request = httpx.Request("GET", f"{url}?token={secret}")
    else:
        request = httpx.Request("GET", url)
    try:
        try:
            try:
                if where == "response body":
                    response = httpx.Response(500, request=request, json={"echo": secret})
                    raise httpx.HTTPStatusError("500", request=request, response=response)
                raise httpx.ReadTimeout("timed out", request=request)
            except httpx.HTTPError:
                raise KeyError("middle") from None
        except KeyError as middle:
            raise RuntimeError("clean message") from middle
    except RuntimeError as error:
        return error


@pytest.mark.parametrize(
    "where", ["request body", "request header", "request url", "response body"]
)
def test_scanner_walks_chains_into_attached_requests_and_responses(where: str) -> None:
    # positive control: a secret no message, repr or traceback shows is still found
    secret = f"planted-{uuid4().hex}"
    error = _planted(secret, where)
    assert secret not in "".join(traceback.format_exception(error))  # only the walk sees it

    assert [h.secret for h in scan_exception(error, Secrets({"planted": secret}))] == ["planted"]


def _emulator_client(emulator: CarbonMapperEmulator, **kwargs: Any) -> CarbonMapperClient:
    # 1.5 s: far above a normal answer on a busy machine, far below the delay faults' 4 s
    return CarbonMapperClient(emulator.base_url, timeout=1.5, sleep=lambda _: None, **kwargs)


@pytest.mark.parametrize("fault", ["drop", "timeout", "malformed"])
def test_token_call_errors_hold_no_request_with_a_secret(
    carbon_mapper_emulator: CarbonMapperEmulator, fault: str
) -> None:
    # Over real HTTP: a lost connection, a time-out and an unreadable answer on both calls.
    emulator = carbon_mapper_emulator
    # an answer cut short after the token: the JSON error quotes the whole body
    echoed = f"cut-token-{uuid4().hex}"
    cut = json.dumps({"access": echoed, "token_value": echoed, "refresh": "x"})[:-12]
    make = {
        "drop": lambda: Fault.drop(times=2),
        "timeout": lambda: Fault.delay(4.0, times=2),
        "malformed": lambda: Fault.status(200, cut, content_type="application/json"),
    }[fault]
    errors: list[BaseException] = []
    with _emulator_client(emulator, retry=RetryPolicy(max_attempts=2)) as client:
        emulator.fail("token/pair", make())
        with pytest.raises(CarbonMapperError) as pair_error:
            client.get_token_pair(SecretStr(emulator.email), SecretStr(emulator.password))
        errors.append(pair_error.value)
        access = client.get_token_pair(SecretStr(emulator.email), SecretStr(emulator.password))
        emulator.fail("account/tokens/create-stac", make())
        with pytest.raises(CarbonMapperError) as stac_error:
            client.create_stac_token(access.access, "leak", date.today() + timedelta(days=3))
        errors.append(stac_error.value)

    assert_no_leak(collect_secrets(emulator, extra={"cut token": echoed}), exceptions=errors)
    assert all(e.__context__ is None and e.__cause__ is None for e in errors)


# --- reprs, dumps and validation errors --------------------------------------------------

ACCESS = "sentinel-access-9f3b2c"
REFRESH = "sentinel-refresh-41aa07"
STAC = "sentinel-stac-77d0e1-4a1f-9b7c-2d6e8f0a1b3c"
PASSWORD = "sentinel-password-c0ffee"


def _block() -> CarbonMapperStacToken:
    now = datetime.now(timezone.utc)
    return CarbonMapperStacToken(
        token=SecretStr(STAC),
        name="n",
        expires_at=now + timedelta(days=14),
        created_at=now,
        scopes=["stac"],
        base_url="http://127.0.0.1/api/v1/",
    )


def test_every_object_holding_a_secret_masks_it() -> None:
    secrets = Secrets({"access": ACCESS, "refresh": REFRESH, "stac": STAC, "pw": PASSWORD})
    pair = TokenPair(access=SecretStr(ACCESS), refresh=SecretStr(REFRESH))
    issued = IssuedStacToken(
        token=SecretStr(STAC),
        name="n",
        expires_at=datetime.now(timezone.utc),
        created_at=datetime.now(timezone.utc),
    )
    block = _block()
    secret_block = Secret(value=PASSWORD)
    client = CarbonMapperClient("http://127.0.0.1:9/api/v1/")
    client.close()
    objects: list[Any] = [pair, issued, block, secret_block, client, SecretStr(PASSWORD)]
    texts = {}
    for number, obj in enumerate(objects):
        texts[f"repr {number}"] = repr(obj)
        texts[f"str {number}"] = str(obj)
        texts[f"format {number}"] = f"{obj!s} {obj!r}"
        if hasattr(obj, "model_dump_json"):
            texts[f"json {number}"] = obj.model_dump_json()
            texts[f"dump {number}"] = repr(obj.model_dump())
            texts[f"dump json {number}"] = repr(obj.model_dump(mode="json"))
    texts["block document"] = repr(
        block._to_block_document(name="x", block_schema_id=uuid4(), block_type_id=uuid4())
    )

    assert_no_leak(secrets, texts=texts)
    # positive control: the values are there, just masked
    assert block.get() == STAC
    assert pair.access.get_secret_value() == ACCESS


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (TokenPair, {"access": ACCESS, "refresh": 42}),
        (TokenPair, {"access": [ACCESS]}),
        (IssuedStacToken, {"token": STAC, "name": None, "expires_at": "x", "created_at": 1}),
        (CarbonMapperStacToken, {"token": STAC, "name": 1, "expires_at": "soon"}),
        (CarbonMapperStacToken, {"token": [STAC], "name": "n"}),
    ],
)
def test_validation_errors_do_not_echo_secrets(model: Any, data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as raised:
        model.model_validate(data)

    # str, repr and traceback: what a log line or a failed run's message would show
    assert_no_leak(Secrets({"access": ACCESS, "stac": STAC}), exceptions=[raised.value])
    assert "Input should be" in str(raised.value) or "Field required" in str(raised.value)


def test_loading_a_block_that_fails_validation_does_not_show_the_token() -> None:
    # A block document saved by an older schema lacks a field: Prefect's load error chains
    # the pydantic error, which would quote the whole decrypted data, token included.
    short = "stk-9f3b2c71"  # short enough that pydantic's clipped input would show it whole
    _block().model_copy(update={"token": SecretStr(short)}).save(
        "leak-incomplete-block", overwrite=True
    )
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            "leak-incomplete-block", "carbon-mapper-stac-token", include_secrets=True
        )
        data = {k: v for k, v in document.data.items() if k != "name"}
        client.update_block_document(
            document.id, BlockDocumentUpdate(data=data, merge_existing_data=False)
        )

    with pytest.raises(RuntimeError, match="failed validation") as raised:
        CarbonMapperStacToken.load("leak-incomplete-block")

    assert "name" in str(raised.value.__cause__)  # the field that is missing is named
    assert_no_leak(Secrets({"stac": short}), exceptions=[raised.value])


# --- runs in the test session's Prefect API ----------------------------------------------


def test_runs_leave_no_secret_in_the_prefect_api(
    carbon_mapper_env: CarbonMapperEmulator,
    sentinel: Secrets,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator = carbon_mapper_env
    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    caplog.set_level(logging.DEBUG)
    states = []
    # transient faults, then an API that echoes the password (the subprocess test below
    # covers more runs; this one proves the scan in the session's own Prefect API)
    emulator.fail("token/pair", Fault.status(503), Fault.drop())
    emulator.fail("account/tokens/create-stac", Fault.html(503), Fault.rate_limited(0))
    states.append(refresh_stac_token(return_state=True))
    echo = {"detail": f"password {sentinel.as_dict()['sentinel password']} is invalid"}
    emulator.fail("token/pair", Fault.status(400, echo))
    states.append(refresh_stac_token(return_state=True))

    assert [s.type.value for s in states] == ["COMPLETED", "FAILED"]
    errors = [states[1].result(raise_on_failure=False)]
    assert isinstance(errors[0], CarbonMapperError)
    assert "**********" in str(errors[0])  # the API's words kept, the password masked
    wait_for_events(states[-1].state_details.flow_run_id)  # events are persisted in order
    out, err = capfd.readouterr()
    secrets = collect_secrets(emulator, extra=sentinel)
    assert len(emulator.issued_stac_tokens) == 1
    report = assert_no_leak(
        secrets,
        texts={"stdout": out, "stderr": err, "caplog": caplog.text},
        exceptions=errors,
        api=True,
        since=start,
    )
    assert any(s.startswith("api events") and not s.endswith("(0)") for s in report.scanned)


def test_api_scan_has_a_positive_control(sentinel: Secrets) -> None:
    canary = "canary-" + sentinel.as_dict()["sentinel password"][-12:]

    @flow(name="leak-canary")
    def leaky() -> None:
        get_run_logger().info("oops %s", canary)

    leaky()
    report = scan_api(Secrets({"canary": canary}))
    assert [h.secret for h in report.hits] == ["canary"]
    assert "api logs" in report.hits[0].where


def test_refresh_outside_a_flow_leaks_nothing(
    carbon_mapper_env: CarbonMapperEmulator,
    sentinel: Secrets,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator = carbon_mapper_env
    settings = load_settings()
    emulator.fail("account/tokens/create-stac", Fault.status(503))

    token = run_refresh(resolve_request(settings, token_name="inline"), settings)

    assert token.get() == emulator.issued_stac_tokens[-1]
    out, err = capfd.readouterr()
    assert_no_leak(
        collect_secrets(emulator, extra=sentinel),
        texts={"stdout": out, "stderr": err, "caplog": caplog.text, "repr": repr(token)},
    )


# --- every file under PREFECT_HOME, in a process with its own Prefect ----------------------

_RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from prefect import flow, get_run_logger, task
    from prefect.blocks.system import Secret
    from cm_tasks import (
        create_stac_token, get_access_token, read_credentials, refresh_stac_token,
        save_stac_token,
    )
    from tests.support.leaks import Secrets, scan_api, wait_for_events

    @flow(name="composed-refresh")
    def composed() -> str:
        # how a user composes the tasks; this flow's own result is persisted by default
        email, password = read_credentials("carbon-mapper-email", "carbon-mapper-password")
        access = get_access_token(email, password)
        token = create_stac_token(access, "composed", __import__("datetime").date.today()
                                  + __import__("datetime").timedelta(days=14))
        save_stac_token(token, "carbon-mapper-stac-token")
        return token.name

    @task(persist_result=True)
    def canary_task(value: str) -> str:
        return value

    @flow(name="canary")
    def canary(value: str) -> None:
        get_run_logger().info("log %s", value)
        canary_task(value + "-result")

    def reply(payload):
        print("@@" + json.dumps(payload), flush=True)

    last_run = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "secret":
            Secret(value=command["value"]).save(command["block"], overwrite=True)
            reply({"ok": True})
        elif op in ("refresh", "composed", "canary"):
            if op == "refresh":
                state = refresh_stac_token(return_state=True, **command.get("params", {}))
            elif op == "composed":
                state = composed(return_state=True)
            else:
                state = canary(command["value"], return_state=True)
            last_run = state.state_details.flow_run_id
            reply({"state": state.type.value, "message": state.message})
        elif op == "scan_api":
            wait_for_events(last_run, timeout=30)
            report = scan_api(Secrets(command["secrets"]))
            reply({"hits": [str(h) for h in report.hits], "scanned": report.scanned})
        elif op == "exit":
            reply({"ok": True})
            break
    """
)


class _Runner:
    """Drives the runner subprocess: one JSON command per line in, one `@@` reply out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.output: list[str] = []

    def send(self, **command: Any) -> dict[str, Any]:
        stdin: IO[str] = self.process.stdin  # type: ignore[assignment]
        stdout: IO[str] = self.process.stdout  # type: ignore[assignment]
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        while True:
            line = stdout.readline()
            if not line:
                raise AssertionError(f"runner exited; output: {self.output[-20:]}")
            if line.startswith("@@"):
                reply: dict[str, Any] = json.loads(line[2:])
                return reply
            self.output.append(line)


@pytest.fixture
def runner(carbon_mapper_env: CarbonMapperEmulator, tmp_path: Path) -> Iterator[_Runner]:
    home = tmp_path / "prefect-home"
    home.mkdir()
    seed_migrated_database(home)  # its temporary server then has nothing to migrate
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CM_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
        # Results go where the scan looks. Prefect 3.4 resolves the default result directory
        # from ~/.prefect, not from PREFECT_HOME, so name it (the default on 3.2 and 3.9).
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(home / "storage"),
        PREFECT_LOGGING_LEVEL="DEBUG",
        # Its temporary server can be slow to start on a loaded machine.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        CM_BASE_URL=carbon_mapper_env.base_url,
        CM_RETRY_BACKOFF="0",
        CM_TIMEOUT="5",
    )
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    stderr = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, str(script), str(REPO)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        yield _Runner(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        stderr.close()


def test_nothing_in_prefect_home_holds_a_secret(
    carbon_mapper_env: CarbonMapperEmulator, runner: _Runner, tmp_path: Path
) -> None:
    emulator = carbon_mapper_env
    sentinel = Secrets()
    marker = uuid4().hex
    email, password = f"home-{marker[:10]}@leak-check.example", f"Home-Pw-{marker}"
    wrong_password = f"Wrong-Pw-{uuid4().hex}"
    emulator.add_user(email, password)
    sentinel.add("sentinel e-mail", email)
    sentinel.add("sentinel password", password)
    sentinel.add("wrong password", wrong_password)
    runner.send(op="secret", block="carbon-mapper-email", value=email)
    runner.send(op="secret", block="carbon-mapper-password", value=password)
    outcomes = []

    # transient faults on both endpoints, retried to success
    emulator.fail("token/pair", Fault.status(503), Fault.drop())
    emulator.fail("account/tokens/create-stac", Fault.html(503), Fault.rate_limited(0))
    outcomes.append(runner.send(op="refresh", params={"token_name": "home-transient"}))
    outcomes.append(runner.send(op="composed"))  # the tasks composed in a user's flow
    # permanent failures: 403, an API that echoes the password, a wrong password
    emulator.fail("account/tokens/create-stac", Fault.status(403))
    outcomes.append(runner.send(op="refresh"))
    emulator.fail("token/pair", Fault.status(400, {"detail": f"bad password {password}"}))
    outcomes.append(runner.send(op="refresh"))
    runner.send(op="secret", block="carbon-mapper-password", value=wrong_password)
    outcomes.append(runner.send(op="refresh"))
    canary = f"canary-{uuid4().hex}"
    outcomes.append(runner.send(op="canary", value=canary))

    assert [o["state"] for o in outcomes] == ["COMPLETED"] * 2 + ["FAILED"] * 3 + ["COMPLETED"]
    assert "account may not do this" in outcomes[2]["message"]
    assert "cm-tasks login" in outcomes[4]["message"]
    assert len(emulator.issued_stac_tokens) == 2
    secrets = collect_secrets(emulator, extra=sentinel, include_demo_password=False)

    # the API, as the UI would read it (events included)
    api = runner.send(op="scan_api", secrets=secrets.as_dict())
    assert api["hits"] == []
    assert any(s.startswith("api events") and not s.endswith("(0)") for s in api["scanned"])
    api_canary = runner.send(op="scan_api", secrets={"canary": canary})
    assert any("api logs" in hit for hit in api_canary["hits"])

    # the files while the server runs (the WAL is there), then after a clean exit
    home = tmp_path / "prefect-home"
    live = scan_prefect_home(home, secrets)
    live_canary = scan_prefect_home(home, Secrets({"canary": canary}))
    runner.send(op="exit")
    runner.process.wait(timeout=60)
    after = scan_prefect_home(home, secrets)

    assert [str(h) for h in live.hits + after.hits] == []
    names = {Path(p).name for p in live.scanned}
    assert any(n.endswith(".db") for n in names)
    assert any(n.endswith("-wal") for n in names), names
    # positive controls: the scan sees logs in the database and persisted results
    canary_files = {Path(h.where).parent.name for h in live_canary.hits}
    assert "storage" in canary_files, live_canary.hits
    assert any(Path(h.where).name.endswith((".db", "-wal")) for h in live_canary.hits)
    assert_no_leak(
        secrets,
        texts={
            "stdout": "".join(runner.output) + json.dumps(outcomes),
            "stderr": (tmp_path / "stderr.txt").read_text(),
        },
    )
