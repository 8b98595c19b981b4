"""Benchmark: what a fleet of ingest processes costs the Prefect API, steady and during a renewal.

N ingest processes (`_fleet_process.py`) talk to a real `prefect server start` through a
counting proxy of our own (`_proxy.py`), one port per process, so every HTTP request, websocket
message and Prefect event is counted per process. They start together (each says READY once
Prefect and cm_tasks are imported; then all get `go`) and call `get_stac_token()`:

- **steady state**: the stored token is fresh; CALLS calls per process;
- **naive pattern**, for reference: each call is a `Secret.load(...)` of the token (what a task
  that loads a block itself costs);
- **renewal**: the stored token is about to expire (the block is first saved by the refresh
  flow, as a block in use is, then given an older token) and the emulator answers `token/pair`
  after S seconds, then 2S, so that a renewal takes at least S; in `inline` mode (the processes hold
  the credentials) and in `deployment` mode (`cm-tasks serve` runs refresh-stac-token/weekly;
  its own traffic, its flow runs included, goes through a port of its own and is reported
  apart).

For each renewal it reports requests and events per waiting process (the process that renewed
inline is not waiting and is shown apart), the growth from S to 2S, the create-stac calls (one
per renewal) and how long after the block was saved each process had the new token.

    .venv/bin/python bench/bench_fleet.py [--processes 12] [--renewal 15] [--calls 3]
                                          [--modes inline deployment] [--quick]

Any checkout: the processes import cm_tasks the way this interpreter does, so
`PYTHONPATH=/path/to/checkout/src .venv/bin/python bench/bench_fleet.py` measures that code
(`make bench VENV=/path/to/venv BENCH_ARGS="--only bench_fleet.py"` measures another venv's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT))
from _fleet_process import RESULT_TAG  # noqa: E402
from _proxy import CountingProxy, Counts  # noqa: E402
from _report import report  # noqa: E402

PROCESS = BENCH / "_fleet_process.py"
TOKEN_BLOCK = "carbon-mapper-stac-token"
NAIVE_BLOCK = "bench-naive-stac-token"
REFRESH_DEPLOYMENT = "refresh-stac-token/weekly"
CREATE_STAC = "account/tokens/create-stac"
TOKEN_PAIR = "token/pair"
STALE = timedelta(minutes=20)  # within get_stac_token's default min_valid (1 hour)
FRESH = timedelta(days=13)
READY_TIMEOUT = 240.0  # N processes importing Prefect at once on 2 cores
SERVE_TIMEOUT = 120.0
SEQUENCES = False  # --sequences
BLOCK_WRITE = ("POST /api/block_documents", "PATCH /api/block_documents", "PUT /api/block_doc")


@dataclass
class Process:
    """One ingest process's result and what it sent to Prefect."""

    label: str
    started: float
    returned: list[float]
    tokens: list[str]
    counts: Counts


@dataclass
class Outcome:
    """One scenario: every process, the refresher's traffic and what the platform saw."""

    name: str
    processes: list[Process]
    serve: Counts | None
    create_stac: int
    token_pair: int
    old_token: str
    saves: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "label: last line of its error"

    def renewer(self) -> Process | None:
        """The process that saved the block itself (inline mode), if any."""
        for p in self.processes:
            if any(key.startswith(BLOCK_WRITE) for _, key in p.counts.times):
                return p
        return None

    def waiting(self) -> list[Process]:
        renewer = self.renewer()
        return [p for p in self.processes if p is not renewer]

    def latencies(self) -> list[float]:
        """Seconds from the latest block save before each process's first token to that token."""
        out = []
        for p in self.waiting():
            before = [t for t in self.saves if t <= p.returned[0]]
            if before:
                out.append(p.returned[0] - max(before))
        return out

    def window(self) -> float:
        """Seconds from `go` to the last process's first token."""
        return max(p.returned[0] for p in self.processes) - min(p.started for p in self.processes)


# Requests a Prefect client sends to a self-hosted server only: to Prefect Cloud it sends no
# version check and no CSRF token request (prefect/client/orchestration: both are skipped when
# the server type is CLOUD), so Cloud never meters them.
NOT_SENT_TO_CLOUD = ("GET /api/admin/version", "GET /api/csrf-token")


def cloud_metered(counts: Counts) -> int:
    """The requests of counts that Prefect Cloud would receive, and meter."""
    return counts.total_requests - sum(counts.requests[key] for key in NOT_SENT_TO_CLOUD)


def _mean_max(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} (max {max(values):.0f})"


# -- set-up --------------------------------------------------------------------------------------


def save_token_block(emulator: Any, expires_in: timedelta, block: str = TOKEN_BLOCK) -> str:
    """A token from the emulator saved to the token block, expiring in `expires_in`.

    Returns the token's short SHA-256 (as `_fleet_process.py` reports tokens).
    """
    import hashlib

    from cm_tasks import CarbonMapperStacToken

    token = str(emulator.issue_stac_token("bench-fleet")["token_value"])
    now = datetime.now(timezone.utc)
    CarbonMapperStacToken(
        token=token,
        name="bench-fleet",
        expires_at=now + expires_in,
        created_at=now - max(timedelta(days=14) - expires_in, timedelta(days=1)),
        scopes=["stac", "catalog:read"],
        base_url=emulator.base_url,
    ).save(block, overwrite=True)
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@contextmanager
def serving(server: Any, proxy: CountingProxy, base_env: dict[str, str]) -> Iterator[None]:
    """`cm-tasks serve --no-watchdog` through the proxy's `serve` port, once it has deployed."""
    from tests.support.prefect_server import stop_process_group

    port = proxy.listen("serve")
    env = server.client_env(base_env)
    env.update(
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        # Pick a run up within a second, as the tests' workers do: the figures are about
        # how callers wait for a renewal, not about how often the runner polls.
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    log = open(server.home / "serve.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("cm-tasks")), "serve", "--no-watchdog"],
        cwd=server.home,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT
        with server.http() as http:
            while http.get(f"deployments/name/{REFRESH_DEPLOYMENT}").status_code != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "cm-tasks serve did not register its deployment:\n"
                        + (server.home / "serve.log").read_text(errors="replace")[-3000:]
                    )
                time.sleep(0.2)
        yield
    finally:
        stop_process_group(process)
        proxy.close("serve")
        log.close()


# -- one scenario --------------------------------------------------------------------------------


def run_fleet(
    name: str,
    server: Any,
    proxy: CountingProxy,
    emulator: Any,
    env: dict[str, str],
    processes: int,
    calls: int,
    timeout: float,
    naive: bool = False,
    serve: bool = False,
) -> Outcome:
    """Start `processes` ingest processes, let them go at once, and collect their counts."""
    create_stac, token_pair = emulator.requests(CREATE_STAC), emulator.requests(TOKEN_PAIR)
    args = [sys.executable, str(PROCESS), str(calls)]
    # The naive processes run beside the others (their own ports): one start-up for both.
    naive_args = ["--naive", NAIVE_BLOCK]
    children: list[tuple[str, subprocess.Popen[str], Path]] = []
    with ExitStack() as cleanup:
        for n in range(processes * (2 if naive else 1)):
            label = f"{name}/{n}" if n < processes else f"naive/{n - processes}"
            port = proxy.listen(label)
            cleanup.callback(proxy.close, label)
            child_env = server.client_env(env)
            child_env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
            log = server.home / f"{name.replace(' ', '-')}-{n}.log"
            with log.open("wb") as err:
                child = subprocess.Popen(
                    args + (naive_args if label.startswith("naive/") else []),
                    cwd=server.home,
                    env=child_env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            cleanup.callback(_stop, child)
            children.append((label, child, log))
        spawned = time.monotonic()
        _wait_ready(children, READY_TIMEOUT)
        ready = time.monotonic()
        if serve:
            proxy.reset("serve")  # the refresher's traffic from go on
        for _, child, _ in children:  # go: all at once
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = _collect(children, timeout)
        print(
            f"[{name}: ready in {ready - spawned:.1f} s,"
            f" all exited {time.monotonic() - ready:.1f} s after go]",
            flush=True,
        )
    outcome = Outcome(
        name=name,
        processes=[],
        serve=proxy.counts("serve") if serve else None,
        create_stac=emulator.requests(CREATE_STAC) - create_stac,
        token_pair=emulator.requests(TOKEN_PAIR) - token_pair,
        old_token="",
    )
    for label, result in results.items():
        if "error" in result:
            outcome.failures.append(f"{label}: {result['error']}")
            continue
        outcome.processes.append(
            Process(
                label, result["started"], result["returned"], result["tokens"], proxy.counts(label)
            )
        )
    everyone = [p.counts for p in outcome.processes] + ([outcome.serve] if outcome.serve else [])
    outcome.saves = sorted(t for c in everyone for t, key in c.times if key.startswith(BLOCK_WRITE))
    return outcome


def _wait_ready(children: list[tuple[str, subprocess.Popen[str], Path]], timeout: float) -> None:
    """Read each child's READY line; a child that does not print it within `timeout` fails."""
    ready: dict[str, str] = {}

    def read(label: str, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        ready[label] = child.stdout.readline().strip()

    threads = [
        threading.Thread(target=read, args=(label, child), daemon=True)
        for label, child, _ in children
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for label, _, log in children:
        if ready.get(label) != "READY":
            raise RuntimeError(f"{label} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def _collect(
    children: list[tuple[str, subprocess.Popen[str], Path]], timeout: float
) -> dict[str, dict[str, Any]]:
    """Each child's result line, once every child has exited (so its events are counted)."""
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    for label, child, log in children:
        try:
            out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{label} did not finish within {timeout:.0f} s") from None
        lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
        if child.returncode != 0 or not lines:
            # A failed get_stac_token() is a result too: counted, shown, and the run goes on.
            text = log.read_text(errors="replace").strip()
            print(f"{label} exited {child.returncode}:\n{text[-3000:]}", flush=True)
            last = text.splitlines()[-1] if text else f"exit {child.returncode}"
            results[label] = {"error": last[:300]}
            continue
        results[label] = json.loads(lines[-1][len(RESULT_TAG) :])
    return results


def _stop(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait(timeout=10)


# -- reporting -----------------------------------------------------------------------------------


def print_breakdown(title: str, counts: list[Counts]) -> None:
    """Requests per process by endpoint, most frequent first; events by name."""
    requests: Counter[str] = Counter()
    events: Counter[str] = Counter()
    websockets: Counter[str] = Counter()
    for c in counts:
        requests.update(c.requests)
        events.update(c.events)
        websockets.update(c.ws_connections)
    n = max(1, len(counts))
    print(f"  {title}:")
    for key, value in requests.most_common(12):
        print(f"    {value / n:7.1f}  {key}")
    for key, value in websockets.items():
        print(f"    {value / n:7.1f}  websocket connections to {key}")
    for key, value in events.most_common(6):
        print(f"    {value / n:7.1f}  event {key}")


def report_plain(name: str, processes: list[Process], calls: int, goal: str) -> None:
    """Print and report requests and events per process of a fleet that renews nothing."""
    requests = [float(p.counts.total_requests) for p in processes]
    events = [float(p.counts.total_events) for p in processes]
    print(f"\n{name}: {len(processes)} processes x {calls} calls")
    print_breakdown("per process", [p.counts for p in processes])
    report(
        f"{name}, {len(processes)} processes x {calls} calls: Prefect requests / events"
        " per process, mean (max)",
        f"{_mean_max(requests)} / {_mean_max(events)}",
        goal,
    )


def print_timeline(outcome: Outcome) -> None:
    """When the block was saved, the refreshed event sent and delivered, and tokens returned."""
    save = outcome.saves[-1]
    everyone = [p.counts for p in outcome.processes] + ([outcome.serve] if outcome.serve else [])
    sent = [t for c in everyone for t, name in c.event_times if name.endswith("refreshed")]
    delivered = sorted(
        t for p in outcome.waiting() for t, name in p.counts.delivered if name.endswith("refreshed")
    )
    tokens = sorted(p.returned[0] for p in outcome.waiting())

    def at(times: list[float]) -> str:
        if not times:
            return "never"
        return f"{min(times) - save:+.2f} s .. {max(times) - save:+.2f} s"

    # Prefect's events stream may also deliver older `refreshed` events (a backfill of recent
    # events on subscribing): shown apart, as they are not this renewal's.
    older = [t for t in delivered if t < save]
    delivered = [t for t in delivered if t >= save]
    print(
        f"  after the last block save: refreshed event sent {at(sent)}; delivered to waiting"
        f" processes ({len(delivered)} deliveries) {at(delivered)}; their tokens {at(tokens)}"
        + (f"; {len(older)} deliveries of an older refreshed event before it" if older else "")
    )


def print_sequences(outcome: Outcome) -> None:
    """Each process's requests in order, seconds after `go` (`--sequences`)."""
    go = min(p.started for p in outcome.processes)
    for p in outcome.processes:
        steps = ", ".join(f"{t - go:.1f} {key}" for t, key in sorted(p.counts.times))
        print(f"  {p.label}: {steps}")


def report_renewal(outcome: Outcome, seconds: float, base: float | None) -> float:
    """Print and report one renewal; returns the mean requests per waiting process."""
    if len(outcome.processes) < 2:
        report(f"{outcome.name}: processes that got a token", str(len(outcome.processes)), "all")
        for failure in outcome.failures:
            print(f"  {failure}")
        return base or float("nan")
    waiting = outcome.waiting()
    renewer = outcome.renewer()
    requests = [float(p.counts.total_requests) for p in waiting]
    events = [float(p.counts.total_events) for p in waiting]
    first_tokens = {p.tokens[0] for p in outcome.processes}
    latencies = outcome.latencies()
    window = outcome.window()
    rate = sum(requests) / window * 60 if window > 0 else float("nan")
    print(
        f"\n{outcome.name}: {len(outcome.processes)} processes, token/pair answers after "
        f"{seconds:g} s; last process had its token {window:.1f} s after go"
    )
    print_breakdown(f"per waiting process ({len(waiting)})", [p.counts for p in waiting])
    busiest = max(waiting, key=lambda p: p.counts.total_requests)
    if busiest.counts.total_requests > 1.5 * statistics.mean(requests):
        print_breakdown(f"the busiest waiting process ({busiest.label})", [busiest.counts])
    if renewer is not None:
        print_breakdown("the process that renewed inline", [renewer.counts])
    if outcome.serve is not None:
        print_breakdown("cm-tasks serve and its flow run (the refresher)", [outcome.serve])
    if outcome.saves:
        print_timeline(outcome)
    if SEQUENCES:
        print_sequences(outcome)
    print(
        f"  tokens: {len(first_tokens)} distinct first token(s), "
        f"{'none is' if outcome.old_token not in first_tokens else 'one is'} the old one; "
        f"block saves seen: {len(outcome.saves)}; token/pair calls: {outcome.token_pair}"
    )
    label = f"{outcome.name}"
    report(
        f"{label}: processes whose get_stac_token() raised",
        f"{len(outcome.failures)}" + (f" ({outcome.failures[0]})" if outcome.failures else ""),
        "0",
    )
    report(
        f"{label}: Prefect requests per waiting process, mean (max)",
        _mean_max(requests),
        "<= 8" if base is None else "<= 1.3x the S figure",
    )
    if base is not None:
        report(
            f"{label}: growth of requests per waiting process from S to 2S",
            f"{statistics.mean(requests) / base:.2f}x",
            "<= 1.3x",
        )
    report(
        f"{label}: of those, metered on Prefect Cloud (no version check, no CSRF), mean (max)",
        _mean_max([float(cloud_metered(p.counts)) for p in waiting]),
        "<= 8",
    )
    report(f"{label}: events per waiting process, mean (max)", _mean_max(events), "-")
    report(
        f"{label}: create-stac calls; distinct tokens the processes got",
        f"{outcome.create_stac}; {len(first_tokens)}",
        "1; 1 (new)",
    )
    report(
        f"{label}: seconds from the block save to each waiting process's token, mean (max)",
        f"{statistics.mean(latencies):.2f} (max {max(latencies):.2f})" if latencies else "no save",
        "<= 2 s",
    )
    report(
        f"{label}: API requests per minute from the {len(waiting)} waiting processes",
        f"{rate:.0f}",
        "-",
    )
    if outcome.serve is not None:
        report(
            f"{label}: requests / events of cm-tasks serve and its flow run",
            f"{outcome.serve.total_requests} / {outcome.serve.total_events}",
            "-",
        )
    return statistics.mean(requests)


def checkout() -> str:
    """Which cm_tasks the processes run: its directory, git commit and whether it is edited."""
    import cm_tasks

    where = Path(cm_tasks.__file__).resolve().parent
    git = ["git", "-C", str(where)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"cm_tasks in {where}"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True)
    edited = " + uncommitted changes" if dirty.stdout.strip() else ""
    return f"cm_tasks in {where}, commit {head.stdout.strip()}{edited}"


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, default=12, help="ingest processes (N)")
    parser.add_argument("--renewal", type=float, default=15.0, help="S: seconds token/pair takes")
    parser.add_argument("--calls", type=int, default=3, help="token calls per process")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["inline", "deployment"],
        choices=["inline", "deployment"],
        help="refresh modes to measure a renewal in",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip steady and naive runs")
    parser.add_argument("--quick", action="store_true", help="3 processes, S = 1 s")
    parser.add_argument(
        "--sequences", action="store_true", help="print each process's requests in order"
    )
    args = parser.parse_args()
    global SEQUENCES
    SEQUENCES = args.sequences
    if args.quick:
        args.processes, args.renewal = 3, 1.0

    from tests.support.prefect_server import running_prefect_server

    with tempfile.TemporaryDirectory() as tmp, running_prefect_server(Path(tmp)) as server:
        os.environ["PREFECT_API_URL"] = server.api_url  # this process: set-up, straight to the API
        from prefect.blocks.system import Secret

        from cm_tasks import refresh_stac_token
        from cm_tasks.testing import DEMO_EMAIL, DEMO_PASSWORD, Fault, run_emulator

        upstream = urlsplit(server.api_url)
        assert upstream.hostname is not None
        assert upstream.port is not None
        with (
            run_emulator() as emulator,
            CountingProxy(upstream.hostname, upstream.port) as proxy,
        ):
            Secret(value=DEMO_EMAIL).save("carbon-mapper-email", overwrite=True)
            Secret(value=DEMO_PASSWORD).save("carbon-mapper-password", overwrite=True)
            print(
                f"Prefect {server.api_url} (proxied), emulator {emulator.base_url}, "
                f"{args.processes} processes, S = {args.renewal:g} s\nMeasuring {checkout()}"
            )
            common = {"CM_BASE_URL": emulator.base_url}

            def fleet(
                name: str, env: dict[str, str], timeout: float, naive: bool = False
            ) -> Outcome:
                serve = env.get("CM_REFRESH_MODE") == "deployment"
                merged = {**common, **env}
                return run_fleet(
                    name,
                    server,
                    proxy,
                    emulator,
                    merged,
                    args.processes,
                    args.calls,
                    timeout,
                    naive,
                    serve,
                )

            if not args.no_reference:
                save_token_block(emulator, FRESH)
                Secret(value="not-a-real-token").save(NAIVE_BLOCK, overwrite=True)
                reference = fleet("steady", {}, 240, naive=True)
                both = reference.processes
                if reference.failures:
                    report("steady state: processes that failed", str(reference.failures), "0")
                report_plain(
                    "steady state (fresh token), get_stac_token()",
                    [p for p in both if not p.label.startswith("naive/")],
                    args.calls,
                    "3 / 1",
                )
                report_plain(
                    "naive pattern: Secret.load() of the token per call",
                    [p for p in both if p.label.startswith("naive/")],
                    args.calls,
                    "reference",
                )

            for mode in args.modes:
                context = serving(server, proxy, common) if mode == "deployment" else ExitStack()
                with context:
                    base: float | None = None
                    for seconds in (args.renewal, 2 * args.renewal):
                        # A block of its own per renewal: Prefect's events stream replays
                        # recent events to a new subscriber, and the previous renewal's
                        # `refreshed` event (minutes old here, days in real use) must not
                        # count against this one.
                        block = f"bench-fleet-{mode}-{seconds:g}s".replace(".", "-")
                        emulator.clear_faults()
                        # Saved first by the refresh flow, as a block in use is (its first
                        # save makes the renewal lease's limit), then two weeks older.
                        refresh_stac_token(token_block=block, base_url=emulator.base_url)
                        old = save_token_block(emulator, STALE, block)
                        emulator.fail(TOKEN_PAIR, Fault.delay(seconds))
                        env = {
                            "CM_REFRESH_MODE": mode,
                            "CM_TOKEN_BLOCK": block,
                            "CM_TIMEOUT": str(seconds + 60),
                            "CM_REFRESH_TIMEOUT": str(4 * seconds + 120),
                        }
                        if mode == "deployment":  # no credentials: only the refresher has them
                            env.update(
                                CM_EMAIL_BLOCK="no-such-email", CM_PASSWORD_BLOCK="no-such-password"
                            )
                        outcome = fleet(f"{mode} mode, S = {seconds:g} s", env, 6 * seconds + 240)
                        outcome.old_token = old
                        mean = report_renewal(outcome, seconds, base)
                        base = base or mean
                    emulator.clear_faults()
    return 0


if __name__ == "__main__":
    sys.exit(main())
