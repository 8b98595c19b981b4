"""A renewal-lease holder killed mid-renewal frees the lease within about a minute (3.4+).

The lease used to be taken for the whole refresh bound (980 s with the defaults), and every
process waiting on that block gave up just before it lapsed. It is now 60 s, renewed while its
holder lives: a killed holder's lease lapses when the server next sweeps expired ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cm_tasks import _refresh_lease
from cm_tasks._refresh_lease import prefect_has_leases, try_lease
from tests.support.prefect_server import (
    PrefectServer,
    restart,
    running_prefect_server,
    stop_process_group,
)

pytestmark = pytest.mark.skipif(
    not prefect_has_leases(), reason="Prefect 3.2-3.3 has no leases: an operator frees the slot"
)

BOUND = 980.0  # the default refresh bound: what a killed holder used to keep the lease for
HOLD = """
import sys, threading
from cm_tasks._refresh_lease import try_lease
with try_lease(sys.argv[1], float(sys.argv[2])) as held:
    print("held" if held else "refused", flush=True)
    threading.Event().wait()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A server that sweeps expired leases every second (default: 15 s), to keep the test short."""
    env = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
    with running_prefect_server(tmp_path_factory.mktemp("lease-server"), env) as running:
        yield running


def test_a_killed_holders_lease_lapses_long_before_the_bound(
    server: PrefectServer, tmp_path: Path
) -> None:
    block = "killed-holder"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, block, str(BOUND)],
        env=server.client_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # no release, no last word
        holder.wait(30)
    killed = time.monotonic()

    with server.using():
        with try_lease(block, BOUND) as mine:
            assert not mine  # killed, not released: the lease is still held
        while True:  # one try every 2 s until the lease lapses (or the old bound is near)
            with try_lease(block, BOUND) as mine:
                if mine:
                    break
            assert time.monotonic() - killed < BOUND / 2, "the lease did not lapse"
            time.sleep(2)
    print(f"\nkilled holder's lease lapsed after {time.monotonic() - killed:.0f} s")


def test_a_holder_whose_server_restarted_gives_its_slot_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The server keeps leases in memory: a restart forgot the holder's lease but still counted
    # its slot, and giving back an unknown lease freed nothing. Every renewal of the block then
    # waited its whole bound and failed, until an operator ran `prefect gcl update`.
    # A lease of 5 minutes: a server start on a loaded machine fits within it.
    monkeypatch.setattr(_refresh_lease, "LEASE_SECONDS", 300.0)
    block = "restarted-server"
    with running_prefect_server(tmp_path) as restarting, restarting.using():
        with try_lease(block, BOUND) as held:
            assert held
            stop_process_group(restarting.process)
            restart(restarting)
            with try_lease(block, BOUND) as other:
                assert not other  # the slot is still counted, for nobody
        with try_lease(block, BOUND) as again:
            assert again
    assert "The slot is given back by name" in caplog.text
