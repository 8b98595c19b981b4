"""A reusable secret-leak scanner for the test suite.

Collect the secrets a test handled (sentinel credentials plus every token the emulator issued),
then look for them, in plain text, wherever Prefect or the package could have written them:
files under `PREFECT_HOME` (the SQLite database and its WAL, result storage, logs), the Prefect
API (flow runs and their parameters, task runs and their state messages, logs, artifacts,
events, variables, block documents read without secrets, deployments), captured output, and
exceptions with their tracebacks.

A hit names the secret by label ("stac token #2"), never by value, so a failing assertion
does not itself print the secret.

Example:
    ```python
    from tests.support.leaks import assert_no_leak, collect_secrets

    def test_refresh_leaks_nothing(credentials, capfd):
        refresh_stac_token()
        out, err = capfd.readouterr()
        assert_no_leak(
            collect_secrets(credentials), texts={"stdout": out, "stderr": err}, api=True
        )
    ```
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from uuid import UUID, uuid4

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

    from cm_tasks.testing import CarbonMapperEmulator

# Parts of a secret at least this long are searched for on their own (truncated leaks).
_MIN_SEGMENT = 16
_PAGE = 200
# base64 in lines, separated by newlines or by JSON-escaped "\n"
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{24,}(?:(?:\s|\\n){1,2}[A-Za-z0-9+/]+)*={0,2}")
_EVENTS_PAGE = 50  # the API's maximum for events


@dataclass(frozen=True)
class Hit:
    """One plaintext occurrence of a secret: which secret (by label) and where."""

    secret: str
    where: str

    def __str__(self) -> str:
        return f"{self.secret} found in {self.where}"


@dataclass
class ScanReport:
    """What a scan looked at and what it found."""

    hits: list[Hit] = field(default_factory=list)
    scanned: list[str] = field(default_factory=list)

    def extend(self, other: ScanReport) -> ScanReport:
        self.hits.extend(other.hits)
        self.scanned.extend(other.scanned)
        return self


class Secrets:
    """Labelled secret values to look for; its repr shows the labels only."""

    def __init__(self, labelled: Mapping[str, str] | None = None) -> None:
        self._values: dict[str, str] = {}
        for label, value in (labelled or {}).items():
            self.add(label, value)

    def add(self, label: str, value: str) -> None:
        """Look for value too (ignored when empty), reported as label."""
        if value and value not in self._values.values():
            self._values[label] = value

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Secrets({sorted(self._values)})"

    def values(self) -> list[str]:
        """The secret values (for tests that pass them on, e.g. to a subprocess)."""
        return list(self._values.values())

    def as_dict(self) -> dict[str, str]:
        """Label -> value, e.g. to send to a subprocess that scans on the tests' behalf."""
        return dict(self._values)

    def needles(self) -> Iterator[tuple[str, str]]:
        """(label, text) pairs to search for: each secret, its encoded forms, and its parts.

        Parts catch truncated leaks (a pydantic error shows the head and tail of its input, a
        clipped message the head): the first and last 16 characters of a long secret or of a
        JWT's signature, and a JWT's whole payload.
        """
        for label, value in self._values.items():
            # A token with surrounding whitespace may leak stripped, or escaped (b'...\\n').
            core = value.strip()
            forms = {value, core, quote(value, safe=""), json.dumps(value)[1:-1], repr(value)[1:-1]}
            segments = core.split(".")
            if len(segments) == 3:
                # A JWT's header and the head and tail of its payload are the same in many
                # tokens; its whole payload (with a unique id) and its signature are not.
                payload, signature = segments[1], segments[2]
                forms.add(payload)
                pieces = [signature]
            else:
                pieces = [core]
            for piece in pieces:
                if len(piece) >= 2 * _MIN_SEGMENT:
                    forms.update((piece[:_MIN_SEGMENT], piece[-_MIN_SEGMENT:]))
                elif len(piece) >= _MIN_SEGMENT:
                    forms.add(piece)
            for form in forms:
                yield label, form


def collect_secrets(
    emulator: CarbonMapperEmulator | None = None,
    *,
    extra: Secrets | Mapping[str, str] | Iterable[str] = (),
    include_demo_password: bool = True,
) -> Secrets:
    """Every secret a test handled: the extra ones given, and all tokens the emulator issued.

    Call it at the end of a test: the emulator only knows the tokens issued so far.

    Args:
        emulator: the emulator the test used; its issued access, refresh and STAC tokens are
            added (and its demo password unless include_demo_password is False).
        extra: more secrets, e.g. from `sentinel_credentials`: Secrets, a mapping
            label -> value, or plain values.
        include_demo_password: add the emulator's demo password.
    """
    secrets = Secrets()
    if isinstance(extra, Secrets):
        extra = extra.as_dict()
    items = extra.items() if isinstance(extra, Mapping) else enumerate(extra, 1)
    for label, value in items:
        secrets.add(f"secret {label}" if isinstance(label, int) else str(label), value)
    if emulator is not None:
        if include_demo_password:
            secrets.add("demo password", emulator.password)
        for kind, tokens in (
            ("access token", emulator.issued_access_tokens),
            ("refresh token", emulator.issued_refresh_tokens),
            ("stac token", emulator.issued_stac_tokens),
        ):
            for number, token in enumerate(tokens, 1):
                secrets.add(f"{kind} #{number}", token)
    return secrets


def sentinel_credentials(
    emulator: CarbonMapperEmulator,
    email_block: str = "carbon-mapper-email",
    password_block: str = "carbon-mapper-password",
) -> Secrets:
    """Add a fresh sentinel account to the emulator and save it to the two Secret blocks.

    Returns the e-mail and password as Secrets ("sentinel e-mail", "sentinel password"):
    unique strings that appear nowhere else, so any plaintext hit is a real leak.
    """
    from prefect.blocks.system import Secret

    marker = uuid4().hex
    email = f"sentinel-{marker[:12]}@leak-check.example"
    password = f"Sentinel-Pw-{marker}"
    emulator.add_user(email, password)
    Secret(value=email).save(email_block, overwrite=True)
    Secret(value=password).save(password_block, overwrite=True)
    return Secrets({"sentinel e-mail": email, "sentinel password": password})


def scan_text(text: str | bytes, secrets: Secrets, where: str) -> list[Hit]:
    """Hits of secrets in text (str or bytes, decoded as UTF-8 with replacement)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    found: dict[str, Hit] = {}
    for label, needle in secrets.needles():
        if label not in found and needle in text:
            found[label] = Hit(label, where)
    return list(found.values())


def _http_parts(obj: Any) -> list[str]:
    """The URL, headers and body of an httpx or requests request or response (as read)."""
    import httpx

    if _is_requests_object(obj):
        return _requests_parts(obj)
    if not isinstance(obj, httpx.Request | httpx.Response):
        return []
    parts = [repr(obj)]
    with contextlib.suppress(Exception):
        parts.append(str(obj.url))
    # raw: httpx masks Authorization in a Headers repr, not in the values sent
    parts.extend(f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in obj.headers.raw)
    with contextlib.suppress(httpx.RequestNotRead, httpx.ResponseNotRead):
        parts.append(obj.content.decode("utf-8", errors="replace"))
    if isinstance(obj, httpx.Request):
        with contextlib.suppress(httpx.RequestNotRead):
            parts.append(obj.read().decode("utf-8", errors="replace"))
    return parts


def _is_requests_object(obj: Any) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with the [stac] extra
        return False
    return isinstance(obj, requests.PreparedRequest | requests.Request | requests.Response)


def _requests_parts(obj: Any) -> list[str]:
    """The URL, headers and body of a requests request or response (pystac-client's errors)."""
    parts = [repr(obj), str(getattr(obj, "url", ""))]
    parts.extend(f"{k}: {v}" for k, v in (obj.headers or {}).items())
    body = getattr(obj, "body", None)
    if body is None:
        with contextlib.suppress(Exception):
            body = obj.content  # a Response
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        parts.append(body)
    return parts


def _linked(error: BaseException) -> Iterator[BaseException]:
    """error and every exception reachable through __cause__ and __context__, depth first."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _exception_parts(error: BaseException) -> list[str]:
    parts = [
        str(error),
        repr(error),
        *map(repr, error.args),
        "".join(traceback.format_exception(error)),
        *(repr(value) for value in vars(error).values()),
    ]
    # The request and response an error carries are not in its text, but any handler can
    # read them: httpx errors have them as properties (raising when unset), others as attrs.
    for name in ("request", "response", "_request", "_response"):
        try:
            value = getattr(error, name, None)
        except Exception:  # httpx: "The .request property has not been set."
            continue
        parts.extend(_http_parts(value))
        parts.extend(_http_parts(getattr(value, "request", None)))
    for value in vars(error).values():
        parts.extend(_http_parts(value))
    return parts


def scan_exception(error: BaseException, secrets: Secrets, where: str = "exception") -> list[Hit]:
    """Hits in an exception and everything linked to it.

    Walks `__cause__` and `__context__` recursively (a `raise ... from None` only hides the
    context from a printed traceback; the object still holds it), and looks at each one's
    str, repr, args, attributes and traceback, and at the URL, headers and body of any
    request or response it carries (an httpx error's `request` holds what was sent).
    """
    parts: list[str] = []
    for linked in _linked(error):
        parts.extend(_exception_parts(linked))
    return scan_text("\n".join(parts), secrets, where)


def _with_base64_decoded(data: bytes) -> bytes:
    """data, followed by every base64 run in it decoded.

    Prefect writes persisted results as base64 pickles (in a JSON record or bare, in lines of
    76 characters): a plain search would miss a token inside one.
    """
    decoded = [data]
    for run in _BASE64_RUN.findall(data):
        compact = re.sub(rb"\s+|\\n", b"", run)
        compact = compact[: len(compact) - len(compact) % 4]
        with contextlib.suppress(binascii.Error, ValueError):
            decoded.append(base64.b64decode(compact))
    return b"\n".join(decoded)


def scan_prefect_home(path: str | Path, secrets: Secrets) -> ScanReport:
    """Scan every file under a PREFECT_HOME (database, WAL, storage, logs) as raw bytes.

    Base64 runs are decoded and searched too (persisted results are base64 pickles).
    """
    report = ScanReport()
    needles = [(label, needle.encode()) for label, needle in secrets.needles()]
    for file in sorted(Path(path).rglob("*")):
        if not file.is_file():
            continue
        try:
            data = _with_base64_decoded(file.read_bytes())
        except OSError:  # removed while scanning, e.g. a WAL checkpointed away
            continue
        report.scanned.append(str(file))
        seen: set[str] = set()
        for label, needle in needles:
            if label not in seen and needle in data:
                seen.add(label)
                report.hits.append(Hit(label, str(file)))
    return report


def _paged(client: SyncPrefectClient, route: str, body: dict[str, Any]) -> Iterator[Any]:
    offset = 0
    while True:
        response = client.request(
            "POST",
            route,  # type: ignore[arg-type]
            json={**body, "limit": _PAGE, "offset": offset},
        )
        page = response.json()
        yield from page
        if len(page) < _PAGE:
            return
        offset += _PAGE


def read_events(
    client: SyncPrefectClient, since: datetime | None = None, prefix: str | None = None
) -> list[dict[str, Any]]:
    """Every event the API has persisted since `since` (default: a day ago), as JSON dicts."""
    now = datetime.now(timezone.utc)
    event_filter: dict[str, Any] = {
        "occurred": {
            "since": (since or now - timedelta(days=1)).isoformat(),
            "until": (now + timedelta(hours=1)).isoformat(),
        }
    }
    if prefix:
        event_filter["event"] = {"prefix": [prefix]}
    response = client.request(
        "POST", "/events/filter", json={"filter": event_filter, "limit": _EVENTS_PAGE}
    )
    page = response.json()
    events: list[dict[str, Any]] = list(page.get("events", []))
    while page.get("next_page"):
        next_response = client._client.get(str(page["next_page"]))
        next_response.raise_for_status()
        page = next_response.json()
        events.extend(page.get("events", []))
    return events


def wait_for_events(flow_run_id: UUID | str, *, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Poll until the API has persisted the terminal state event of a flow run.

    Events are written in batches: a scan right after a run may not see them yet.
    """
    from prefect.client.orchestration import get_client

    resource = f"prefect.flow-run.{flow_run_id}"
    terminal = {"Completed", "Failed", "Crashed", "Cancelled"}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = [
                e
                for e in read_events(client, prefix="prefect.flow-run.")
                if e.get("resource", {}).get("prefect.resource.id") == resource
            ]
            if any(e["event"].rsplit(".", 1)[-1] in terminal for e in events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"no terminal event for flow run {flow_run_id} yet")
            time.sleep(0.2)


def scan_api(secrets: Secrets, *, since: datetime | None = None) -> ScanReport:
    """Scan what the current Prefect API holds: runs, logs, artifacts, events and more.

    This process's pending run logs are flushed first; for events, call `wait_for_events`
    before. Everything is read as the API's raw JSON, so every field is searched: flow-run names and
    parameters, task-run names, inputs and state messages, log messages, artifact data and
    descriptions, event payloads and resources, variables, block documents (read without
    secrets, as the UI does), deployment parameters and job variables.

    Args:
        secrets: what to look for.
        since: only events since then (default: the last day); everything else is scanned
            in full, so give the test's secrets only.
    """
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    # Run logs reach the API in batches: send what this process still holds first.
    APILogHandler().flush()
    report = ScanReport()
    sources: dict[str, Iterable[Any]] = {}
    with get_client(sync_client=True) as client:
        sources = {
            "flow runs": list(_paged(client, "/flow_runs/filter", {})),
            "task runs": list(_paged(client, "/task_runs/filter", {})),
            "logs": list(_paged(client, "/logs/filter", {})),
            "artifacts": list(_paged(client, "/artifacts/filter", {})),
            "block documents": list(
                _paged(client, "/block_documents/filter", {"include_secrets": False})
            ),
            "deployments": list(_paged(client, "/deployments/filter", {})),
            "variables": list(_paged(client, "/variables/filter", {})),
            "events": read_events(client, since),
        }
    for name, records in sources.items():
        records = list(records)
        report.scanned.append(f"api {name} ({len(records)})")
        for record in records:
            text = json.dumps(record)
            report.hits.extend(scan_text(text, secrets, f"api {name}: {_describe(record)}"))
    return report


def _describe(record: Any) -> str:
    if isinstance(record, dict):
        for key in ("event", "name", "key", "message", "id"):
            if isinstance(record.get(key), str):
                return f"{key}={record[key][:60]!r}"
    return "record"


def assert_no_leak(
    secrets: Secrets,
    *,
    texts: Mapping[str, str | bytes] | None = None,
    exceptions: Iterable[BaseException] = (),
    prefect_home: str | Path | None = None,
    api: bool = False,
    since: datetime | None = None,
) -> ScanReport:
    """Fail if any secret appears in plain text in what is given; return what was scanned.

    Args:
        secrets: from `collect_secrets`; must not be empty (an empty scan proves nothing).
        texts: named texts, e.g. {"stdout": out, "caplog": caplog.text}.
        exceptions: errors to check with their tracebacks and chains.
        prefect_home: a PREFECT_HOME directory to scan file by file.
        api: also scan the current Prefect API (see `scan_api`).
        since: for the API's events, see `scan_api`.
    """
    assert len(secrets) > 0, "no secrets to look for: the scan would prove nothing"
    report = ScanReport()
    for where, text in (texts or {}).items():
        report.scanned.append(where)
        report.hits.extend(scan_text(text, secrets, where))
    for number, error in enumerate(exceptions, 1):
        where = f"exception #{number} ({type(error).__name__})"
        report.scanned.append(where)
        report.hits.extend(scan_exception(error, secrets, where))
    if prefect_home is not None:
        report.extend(scan_prefect_home(prefect_home, secrets))
    if api:
        report.extend(scan_api(secrets, since=since))
    assert not report.hits, "secret(s) in plain text: " + "; ".join(map(str, report.hits))
    return report
