"""One process of the load test: N flow runs at once, each reading the token and using it.

    python concurrent_readers.py RUNS GO_FILE

Runs a warm-up flow, writes `ready-<pid>` next to GO_FILE and waits for GO_FILE to exist (so
that every process starts together), then runs RUNS flow runs in threads. Prints one JSON line:
for each run, the SHA-256 of the token it got (never the token) and the status of an asset
download made with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prefect import flow

from cm_tasks import get_stac_token, token_cache_info


@flow(name="load-warm-up", persist_result=False)
def warm_up() -> None:
    """Nothing: builds Prefect's client models once, before the threads race to first use.

    pydantic before 2.13 is not thread-safe on a model's first (deferred) build
    (pydantic/pydantic#11849): on Prefect 3.4 with pydantic 2.12, ten flow runs started at once
    in a fresh process can fail with "9 validation errors for ActionBaseModel" before they
    start. That is Prefect's and pydantic's race, not what this test is about.
    """


@flow(name="load-reader", persist_result=False)
def reader(asset_url: str) -> tuple[str, int]:
    token = get_stac_token()
    status = httpx.get(asset_url, headers={"Authorization": f"Bearer {token}"}).status_code
    return hashlib.sha256(token.encode()).hexdigest(), status


def main() -> int:
    runs, go_file, asset_url = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    warm_up()  # before the go signal: reads no block and asks for no token
    (go_file.parent / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not go_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with ThreadPoolExecutor(max_workers=runs) as pool:
        results = list(pool.map(lambda _: reader(asset_url), range(runs)))
    info = token_cache_info()
    print(json.dumps({"results": results, "refreshes": info.refreshes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
