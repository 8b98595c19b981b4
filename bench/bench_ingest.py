"""Benchmark: the ingest-plumes flow vs the seed tutorial's sequential `requests` loop.

Both download the same 100 assets (50 items x 2) from the emulator (in its own process) at
50 ms latency per request, side by side, `--rounds` times; the figure is the ratio of the
median times. Each measurement runs in its own child process (PREFECT_API_URL must be set
before Prefect is imported):

- against the temporary Prefect API of `prefect_test_harness`; then the memory (tracemalloc
  peak) of downloading few small vs many assets (one of 6 MiB) with the flow's download code;
- against a running `prefect server start` (what users run).

    .venv/bin/python bench/bench_ingest.py [--items 50] [--latency 0.05] [--concurrency 8]
                                           [--rounds 3] [--no-server] [--map-variant]

Prints figures; targets: the flow >= 6x faster than the loop, memory flat.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402

RESULT_TAG = "CHILD-RESULT "


def naive_loop(base_url: str, token: str, items: int, out: Path) -> int:
    """The tutorial's style: plain `requests` calls one after the other, whole bodies in memory."""
    import requests

    headers = {"Authorization": f"Bearer {token}"}
    response = requests.post(
        f"{base_url}stac/search", json={"limit": items}, headers=headers, timeout=30
    )
    response.raise_for_status()
    count = 0
    for item in response.json()["features"]:
        for key, asset in item["assets"].items():
            r = requests.get(asset["href"], headers=headers, timeout=30)
            r.raise_for_status()
            path = out / item["id"] / f"{key}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(r.content)
            count += 1
    return count


def load_flow() -> Any:
    spec = importlib.util.spec_from_file_location("ingest_plumes", ROOT / "flows/ingest_plumes.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ingest_plumes


def map_variant(concurrency: int) -> Any:
    """The alternative design: one sync Prefect task per asset via .map (for comparison only)."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from cm_tasks import async_stac_http_client
    from cm_tasks.ingest import download_one as _download_one
    from cm_tasks.ingest import iter_search, plan_downloads, search_body

    async def _one(asset: Any) -> int:
        async with async_stac_http_client() as http:
            return (await _download_one(http, asset)).bytes

    async def _search(items: int) -> list[Any]:
        async with async_stac_http_client() as http:
            return [i async for i in iter_search(http, search_body(), items)]

    @task(persist_result=False)
    def download_one(asset: Any) -> int:
        return asyncio.run(_one(asset))

    @flow(persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=concurrency))
    def ingest_map(items: int, out: str) -> int:
        found = asyncio.run(_search(items))
        return sum(download_one.map(plan_downloads(found, Path(out))).result())

    return ingest_map


async def _download_traced(assets: list[Any], concurrency: int) -> tuple[int, int]:
    from cm_tasks import async_stac_http_client
    from cm_tasks.ingest import download_all

    async with async_stac_http_client() as http:
        tracemalloc.start()
        try:
            results = await download_all(http, assets, concurrency)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return peak, sum(r.bytes for r in results)


def peak_memory(assets: list[Any], concurrency: int) -> tuple[int, int]:
    """(tracemalloc peak in bytes, total bytes) of downloading assets into a fresh directory."""
    from dataclasses import replace

    with tempfile.TemporaryDirectory() as tmp:
        moved = [
            replace(a, path=Path(tmp) / a.path.name.replace(".", f"-{n}."))
            for n, a in enumerate(assets)
        ]
        return asyncio.run(_download_traced(moved, concurrency))


def memory_rows(concurrency: int, tmp: str) -> list[dict[str, Any]]:
    from cm_tasks import async_stac_http_client
    from cm_tasks.ingest import iter_search, plan_downloads, search_body

    async def everything() -> list[dict[str, Any]]:
        async with async_stac_http_client() as http:
            return [i async for i in iter_search(http, search_body(limit=100), None)]

    assets = plan_downloads(asyncio.run(everything()), Path(tmp))
    large = max(assets, key=lambda a: a.size or 0)
    small = [a for a in assets if a is not large][:10]
    rows = []
    for label, chosen in (
        ("10 small assets", small),
        (f"{len(assets)} assets incl. {(large.size or 0) / 2**20:.0f} MiB", assets),
        ("3 x all assets", assets * 3),
    ):
        peak, total = peak_memory(chosen, concurrency)
        rows.append({"label": label, "files": len(chosen), "bytes": total, "peak": peak})
    return rows


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One side-by-side measurement against the Prefect API of this process's environment."""
    from _setup import external_emulator_environment

    from cm_tasks import get_stac_token

    ingest_plumes = load_flow()
    naive: list[float] = []
    flow: list[float] = []
    with (
        external_emulator_environment(args.latency, harness=args.child != "server") as base_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        token = get_stac_token()
        # Warm up imports, connections and the API (a user's worker is warm after one run too).
        asyncio.run(ingest_plumes(max_items=2, output_dir=f"{tmp}/warm"))
        naive_loop(base_url, token, 1, Path(tmp, "warm-naive"))
        for n in range(args.rounds):
            started = time.perf_counter()
            count = naive_loop(base_url, token, args.items, Path(tmp, f"naive-{n}"))
            naive.append(time.perf_counter() - started)

            started = time.perf_counter()
            summary = asyncio.run(
                ingest_plumes(
                    max_items=args.items, output_dir=f"{tmp}/flow-{n}", concurrency=args.concurrency
                )
            )
            flow.append(time.perf_counter() - started)
            assert summary["downloaded"] == count, summary

        started = time.perf_counter()
        asyncio.run(
            ingest_plumes(
                max_items=args.items, output_dir=f"{tmp}/flow-0", concurrency=args.concurrency
            )
        )
        rerun = time.perf_counter() - started

        result: dict[str, Any] = {
            "files": count,
            "mib": summary["bytes_downloaded"] / 2**20,
            "naive": naive,
            "flow": flow,
            "rerun": rerun,
        }
        if args.map_variant:
            started = time.perf_counter()
            map_variant(args.concurrency)(args.items, f"{tmp}/map")
            result["map"] = time.perf_counter() - started
        if args.child == "harness":
            result["memory"] = memory_rows(args.concurrency, tmp)
    return result


def run_child(
    mode: str, args: argparse.Namespace, env: dict[str, str] | None = None, rounds: int = 0
) -> Any:
    command = [sys.executable, __file__, "--child", mode, *_passed_on(args)]
    if rounds:
        command.append(f"--rounds={rounds}")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"the {mode} run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _passed_on(args: argparse.Namespace) -> list[str]:
    passed = [f"--items={args.items}", f"--latency={args.latency}", f"--rounds={args.rounds}"]
    passed.append(f"--concurrency={args.concurrency}")
    return passed + (["--map-variant"] if args.map_variant else [])


def print_run(label: str, r: dict[str, Any], latency: float, concurrency: int) -> float:
    naive, flow = statistics.median(r["naive"]), statistics.median(r["flow"])
    print(f"{label}: {r['files']} assets ({r['mib']:.1f} MiB), {latency * 1000:.0f} ms per request")
    print(f"  sequential requests loop       {naive:6.2f} s   rounds: {_times(r['naive'])}")
    print(
        f"  ingest-plumes (concurrency {concurrency}) {flow:6.2f} s   rounds: {_times(r['flow'])}"
        f"   {naive / flow:4.1f}x faster"
    )
    print(f"  ingest-plumes re-run, all skip {r['rerun']:6.2f} s")
    if "map" in r:
        print(
            f"  variant: .map, 1 task/asset    {r['map']:6.2f} s   {naive / r['map']:4.1f}x faster"
        )
    return float(naive / flow)


def _times(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=50, help="items to fetch (2 assets each)")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="loop/flow pairs to time")
    parser.add_argument("--no-server", action="store_true", help="skip `prefect server start`")
    parser.add_argument("--map-variant", action="store_true", help="also time a .map design")
    parser.add_argument("--child", choices=["harness", "server"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(RESULT_TAG + json.dumps(child(args)), flush=True)
        return 0

    harness = run_child("harness", args)
    server = None
    if not args.no_server:
        sys.path.insert(0, str(ROOT))
        from tests.support.prefect_server import running_prefect_server

        with (
            tempfile.TemporaryDirectory() as tmp,
            running_prefect_server(Path(tmp)) as prefect_server,
        ):
            server = run_child("server", args, env=prefect_server.client_env())

    at = (args.latency, args.concurrency)
    speedup = print_run("Test-harness API", harness, *at)
    if server is not None:
        server_speedup = print_run("prefect server start", server, *at)
    print("Memory (tracemalloc peak while downloading, concurrency", f"{args.concurrency}):")
    rows = harness["memory"]
    for row in rows:
        print(
            f"  {row['label']:28s} {row['bytes'] / 2**20:7.1f} MiB downloaded"
            f"   peak {row['peak'] / 2**10:7.0f} KiB"
        )
    goal = f">= 6x faster than the sequential loop ({len(harness['naive'])}-round medians)"
    report(
        f"ingest-plumes speed-up at concurrency {args.concurrency}, test-harness API",
        f"{speedup:.1f}x",
        goal,
    )
    if server is not None:
        report(
            f"ingest-plumes speed-up at concurrency {args.concurrency}, prefect server start",
            f"{server_speedup:.1f}x",
            goal,
        )
    small, large = rows[0], rows[1]
    report(
        f"download peak memory, {small['label']} vs {large['label']}",
        f"{small['peak'] / 2**10:.0f} KiB vs {large['peak'] / 2**10:.0f} KiB"
        f" ({large['peak'] / small['peak']:.2f}x for {large['bytes'] / small['bytes']:.0f}x"
        " the bytes)",
        "flat",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
