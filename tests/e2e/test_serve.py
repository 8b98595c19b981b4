"""`cm-tasks serve` as a process of its own: registers the deployments, stops cleanly on SIGTERM.

Against the session's Prefect API; what it registered is compared with the specs of
`cm_tasks.deployments`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from cm_tasks.deployments import (
    DEPLOYMENTS,
)
from tests.support.deploy import api_record, spec_as_api

CONSOLE_SCRIPT = Path(sys.executable).with_name("cm-tasks")
SERVE_WAIT_SECONDS = 90.0
# What Prefect's runner prints once it serves the deployments (Prefect 3.2 to 3.9).
RUNNER_BANNER = "Your deployments are being served"


def _read(full_name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(full_name)


def test_serve_registers_the_same_deployments_and_stops_cleanly_on_sigterm(
    no_deployments: None, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CM_"))}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    banner = threading.Event()

    def read_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if RUNNER_BANNER in line:
                banner.set()
        banner.set()  # the process ended: stop waiting

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        # The runner prints its banner once every deployment is registered, just before it
        # starts polling: the moment a user could stop it.
        assert banner.wait(SERVE_WAIT_SECONDS), "".join(lines)
        assert process.poll() is None, "".join(lines)
        served = {spec.full_name: _read(spec.full_name) for spec in DEPLOYMENTS}
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=30)
    output = "".join(lines)

    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "Stopped." in output
    for spec in DEPLOYMENTS:
        stored = served[spec.full_name]
        assert api_record(stored) == spec_as_api(spec)
        assert stored.work_pool_name is None  # served: no pool, no worker
