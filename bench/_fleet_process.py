"""One ingest process of `bench_fleet.py`: asks for the token CALLS times, when told to.

    python _fleet_process.py CALLS [--naive SECRET_BLOCK]

Imports Prefect and cm_tasks (no Prefect call yet), prints `READY`, waits for a `go` line on
stdin (so that every process starts together), then calls `get_stac_token()` CALLS times -
or, with `--naive`, `Secret.load(SECRET_BLOCK).get()`, the pattern of a task that loads a
token from a block itself. Prints one tagged JSON line: when each call returned (epoch
seconds) and a short SHA-256 of each token (never the token). The `CM_*` and `PREFECT_*`
settings come from the environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

RESULT_TAG = "FLEET-RESULT "


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("calls", type=int)
    parser.add_argument("--naive", metavar="SECRET_BLOCK")
    args = parser.parse_args()

    from prefect.blocks.system import Secret

    from cm_tasks import get_stac_token

    def naive() -> str:
        return str(Secret.load(args.naive).get())  # type: ignore[union-attr]

    get = naive if args.naive else get_stac_token
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1  # the bench gave up before starting
    started = time.time()
    returned, digests = [], []
    for _ in range(args.calls):
        token = get()
        returned.append(time.time())
        digests.append(hashlib.sha256(token.encode()).hexdigest()[:12])
    print(RESULT_TAG + json.dumps({"started": started, "returned": returned, "tokens": digests}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
