"""How a benchmark script hands a figure to `bench/run.py`: one tagged line per figure."""

from __future__ import annotations

import json

TAG = "BENCH-FIGURE "


def report(figure: str, value: str, goal: str) -> None:
    """Print one figure, its value and its goal, for people and for `bench/run.py`."""
    print(f"{figure}: {value} (goal {goal})")
    print(TAG + json.dumps({"figure": figure, "value": value, "goal": goal}), flush=True)
