"""`make bench`: run every benchmark side by side and print one table of figures and goals.

Each script prints its own details and one `BENCH-FIGURE {json}` line per figure
(`bench/_report.py`); this collects them, adds the wall time of `make demo` once installed,
and prints a Markdown table to paste into `bench/RESULTS.md`.

    .venv/bin/python bench/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from _report import TAG, report  # noqa: E402

SCRIPTS = {
    "bench_refresh.py": ["--runs", "12"],
    "bench_import.py": ["--runs", "15"],
    "bench_token_access.py": ["--tasks", "200", "--rounds", "3"],
    "bench_ingest.py": [],
    "bench_fleet.py": ["--processes", "12", "--renewal", "15"],
}
QUICK = {
    "bench_refresh.py": ["--runs", "4"],
    "bench_import.py": ["--runs", "5"],
    "bench_token_access.py": ["--tasks", "50", "--rounds", "1"],
    "bench_ingest.py": ["--rounds", "1", "--no-server"],
    "bench_fleet.py": ["--quick"],
}


def _run_script(name: str, args: list[str]) -> list[dict[str, str]]:
    print(f"\n=== {name} {' '.join(args)}", flush=True)
    process = subprocess.Popen(
        [sys.executable, str(BENCH / name), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    figures = []
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(TAG):
            figures.append(json.loads(line[len(TAG) :]))
        else:
            print(line, end="", flush=True)
    if process.wait() != 0:
        figures.append(
            {"figure": f"{name} failed", "value": f"exit {process.returncode}", "goal": "exit 0"}
        )
    return figures


def _demo_seconds() -> float:
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CM_"))}
        env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        started = time.perf_counter()
        # What `make demo` runs, with this interpreter: `make bench VENV=.compat/prefect-3.2`
        # times that venv's demo (make's own `demo` target would use, or build, .venv).
        subprocess.run(
            [sys.executable, "-m", "cm_tasks.demo"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke test")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SCRIPTS), help="run these scripts only (and the demo)"
    )
    args = parser.parse_args()

    figures: list[dict[str, str]] = []
    for name, script_args in (QUICK if args.quick else SCRIPTS).items():
        if args.only is None or name in args.only:
            figures += _run_script(name, script_args)
    print("\n=== make demo")
    seconds = _demo_seconds()
    report("make demo wall time (installed, fresh PREFECT_HOME)", f"{seconds:.1f} s", "-")
    figures.append(
        {
            "figure": "make demo wall time (installed, fresh PREFECT_HOME)",
            "value": f"{seconds:.1f} s",
            "goal": "-",
        }
    )

    print(
        f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Prefect {version('prefect')}\n"
    )
    print("| figure | value | goal |\n| --- | --- | --- |")
    for figure in figures:
        print(f"| {figure['figure']} | {figure['value']} | {figure['goal']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
