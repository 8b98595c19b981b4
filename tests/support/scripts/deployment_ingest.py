"""One ingest process of the refresh-mode tests: a flow of N mapped tasks, each needing the token.

    python deployment_ingest.py TASKS GO_FILE ASSET_URL

Runs with whatever CM_* settings it is given (the tests use CM_REFRESH_MODE=deployment and
credential block names that do not exist). Before anything else it records every HTTP request
this process sends (method and URL path, never headers or bodies), so the test can prove what
the process did NOT do: read a Secret block, or call token/pair or create-stac.

Waits for GO_FILE (so that all processes start together), then runs the flow. Each task calls
`get_stac_token()`, timing how long it waited, and downloads ASSET_URL with the token.
Prints one JSON line: per task, the SHA-256 of the token (never the token), the download's
status, the seconds spent in get_stac_token, and the error (type and message) if it raised;
plus every request this process sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

_sent: list[tuple[str, str]] = []
_sent_lock = threading.Lock()
_sync_send = httpx.HTTPTransport.handle_request
_async_send = httpx.AsyncHTTPTransport.handle_async_request


def _record(request: httpx.Request) -> None:
    with _sent_lock:
        _sent.append((request.method, f"{request.url.host}:{request.url.port}{request.url.path}"))


def _recording_send(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
    _record(request)
    return _sync_send(self, request)


async def _recording_async_send(
    self: httpx.AsyncHTTPTransport, request: httpx.Request
) -> httpx.Response:
    _record(request)
    return await _async_send(self, request)


# Installed before Prefect or cm_tasks is imported: every client they make goes through these.
httpx.HTTPTransport.handle_request = _recording_send  # type: ignore[method-assign]
httpx.AsyncHTTPTransport.handle_async_request = _recording_async_send  # type: ignore[method-assign]

from prefect import flow, task  # noqa: E402

from cm_tasks import get_stac_token  # noqa: E402


@task(persist_result=False)
def download(asset_url: str, n: int) -> dict[str, Any]:
    started = time.monotonic()
    try:
        token = get_stac_token()
    except Exception as exc:  # the test inspects each caller's error
        return {
            "n": n,
            "waited": time.monotonic() - started,
            "error_type": type(exc).__name__,
            "error": str(exc),
        }
    waited = time.monotonic() - started
    status = httpx.get(asset_url, headers={"Authorization": f"Bearer {token}"}).status_code
    return {
        "n": n,
        "waited": waited,
        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
        "status": status,
    }


@flow(name="refresh-mode-ingest", persist_result=False)
def ingest(asset_url: str, tasks: int) -> list[dict[str, Any]]:
    futures = download.map(asset_url, range(tasks))
    return [future.result() for future in futures]


def main() -> int:
    tasks, go_file, asset_url = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    (go_file.parent / f"ready-{os.getpid()}").touch()  # Prefect and cm_tasks are imported
    deadline = time.monotonic() + 600  # a process meant to come later waits for the others
    while not go_file.exists():
        if time.monotonic() > deadline:
            print(f"{go_file} did not appear", file=sys.stderr)
            return 1
        time.sleep(0.05)
    started = time.monotonic()
    results = ingest(asset_url, tasks)
    print(
        json.dumps({"results": results, "seconds": time.monotonic() - started, "sent": _sent}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
