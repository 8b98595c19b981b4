"""`make demo`'s program end to end, in a fresh process with its own PREFECT_HOME."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from cm_tasks.testing import DEMO_PASSWORD


def test_demo_runs_and_prints_no_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CM_", "PREFECT_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # The demo's temporary server migrates a fresh database: Prefect's default 20 s wait is too
    # short for old Prefect (make compat) on a loaded 2-core machine.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"

    result = subprocess.run(
        [sys.executable, "-m", "cm_tasks.demo"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Downloaded STAC asset" in output
    assert "scopes   stac, catalog:read" in output
    assert DEMO_PASSWORD not in output
    # Every token the emulator issues is a JWT, whose base64 header starts with "eyJ".
    assert not re.search(r"eyJ[\w-]+\.[\w-]+", output)
