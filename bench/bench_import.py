"""Benchmark: `import cm_tasks` vs the Prefect imports any Prefect package pays anyway.

Each import runs in a fresh interpreter, alternating between the two, so the comparison is
side by side. Also checks that the package's top level pulls in nothing heavy.

    .venv/bin/python bench/bench_import.py [--runs 15]

Goal: cm_tasks / prefect <= 1.05, and no pystac_client, uvicorn or emulator module loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report

BASELINE = "from prefect import flow, task; from prefect.blocks.core import Block"
PACKAGE = "import cm_tasks"
HEAVY = ("pystac_client", "uvicorn", "cm_tasks.testing", "cm_tasks.stac")
_TIMER = (
    "import sys, time, json; t = time.perf_counter(); {stmt}; "
    "elapsed = time.perf_counter() - t; "
    "print(json.dumps([elapsed, [m for m in {heavy!r} if m in sys.modules]]))"
)


def _time(stmt: str) -> tuple[float, list[str]]:
    output = subprocess.run(
        [sys.executable, "-c", _TIMER.format(stmt=stmt, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
        env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PATH": "/usr/bin:/bin"},
    ).stdout
    elapsed, loaded = json.loads(output.strip().splitlines()[-1])
    return float(elapsed), list(loaded)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    _time(BASELINE)  # warm the file cache for both
    _time(PACKAGE)
    baseline, package, heavy = [], [], set()
    for _ in range(args.runs):
        baseline.append(_time(BASELINE)[0])
        elapsed, loaded = _time(PACKAGE)
        package.append(elapsed)
        heavy.update(loaded)
    ratio = statistics.median(package) / statistics.median(baseline)
    print(f"prefect imports: median {statistics.median(baseline):.3f} s")
    print(f"import cm_tasks: median {statistics.median(package):.3f} s")
    report("import cm_tasks / prefect's own imports (median)", f"{ratio:.3f}", "<= 1.05")
    report("heavy modules loaded by import cm_tasks", ", ".join(sorted(heavy)) or "none", "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
