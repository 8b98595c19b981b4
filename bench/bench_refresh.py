"""Benchmark: the refresh flow vs a naive hand-written flow doing the same work.

Both run against one `prefect server start` and the emulator, alternating after a warm-up,
so machine noise hits both alike. The naive flow is what a user would write from the seed
tutorial: two tasks with httpx, the Secret blocks read in, the token saved as a Secret block.
Also counts the API requests and TCP connections of one healthy refresh.

    .venv/bin/python bench/bench_refresh.py [--runs 12]

Goals: refresh / naive <= 1.05; 2 requests and 1 connection per refresh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from tests.support.prefect_server import running_prefect_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="timed runs of each flow")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, running_prefect_server(Path(tmp)) as server:
        # Point this process at the server before Prefect is imported.
        os.environ.update(
            PREFECT_API_URL=server.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        return _compare(args.runs)


def _compare(runs: int) -> int:
    import httpx
    from prefect import flow, task
    from prefect.blocks.system import Secret

    from cm_tasks import refresh_stac_token
    from cm_tasks.testing import run_emulator

    with run_emulator() as emulator:
        os.environ["CM_BASE_URL"] = emulator.base_url
        Secret(value=emulator.email).save("carbon-mapper-email", overwrite=True)
        Secret(value=emulator.password).save("carbon-mapper-password", overwrite=True)
        base = emulator.base_url

        @task(persist_result=False)
        def naive_access_token(email: str, password: str) -> str:
            response = httpx.post(f"{base}token/pair", json={"email": email, "password": password})
            response.raise_for_status()
            return str(response.json()["access"])

        @task(persist_result=False)
        def naive_stac_token(access: str, name: str, expiration: str) -> str:
            response = httpx.post(
                f"{base}account/tokens/create-stac",
                json={"name": name, "expiration_date": expiration},
                headers={"Authorization": f"Bearer {access}"},
            )
            response.raise_for_status()
            return str(response.json()["token_value"])

        @flow(name="naive-refresh", persist_result=False)
        def naive_refresh() -> None:
            email = Secret.load("carbon-mapper-email").get()
            password = Secret.load("carbon-mapper-password").get()
            access = naive_access_token(email, password)
            expiration = (date.today() + timedelta(days=14)).isoformat()
            token = naive_stac_token(access, "naive", expiration)
            Secret(value=token).save("naive-stac-token", overwrite=True)

        flows = {"cm-tasks": refresh_stac_token, "naive": naive_refresh}
        for run in flows.values():  # warm-up: imports, block types, first connections
            run()
            run()
        times: dict[str, list[float]] = {name: [] for name in flows}
        for _ in range(runs):
            for name, run in flows.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)

        emulator.reset()
        refresh_stac_token()
        requests, connections = emulator.requests(), emulator.connections()

    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["cm-tasks"] / median["naive"]
    print(f"refresh-stac-token: median {median['cm-tasks']:.3f} s over {runs} runs")
    print(f"naive flow:         median {median['naive']:.3f} s over {runs} runs")
    report("refresh flow / naive flow (median wall time)", f"{ratio:.3f}", "<= 1.05")
    report("API requests per healthy refresh", str(requests), "2")
    report("TCP connections per healthy refresh", str(connections), "1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
