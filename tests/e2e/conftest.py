"""The end-to-end tier: real `prefect server start`, workers, subprocesses, browsers, PostgreSQL.

Tests still get the session's in-process Prefect API (`prefect_api`) for code that runs in the
test process itself; `server` is a real `prefect server start` of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.deploy import deploy_prefect_yaml
from tests.support.prefect_server import PrefectServer, running_prefect_server


@pytest.fixture(autouse=True)
def _prefect_api(prefect_api: None) -> None:
    """Every test of the tier also has the session's in-process Prefect API."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real `prefect server start` shared by a module's tests (deployments, workers)."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as running:
        yield running
    # The helper's promise to whoever reuses it: the server is gone once the block exits.
    assert running.process.poll() is not None


@pytest.fixture(scope="session")
def prefect_yaml_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real `prefect server start` with prefect.yaml deployed, once per test process.

    The modules that run the operator's deployments (test_prefect_yaml_deploy, test_run_form)
    share it: one server start and one `prefect deploy --all` where they run in one process.
    """
    with running_prefect_server(tmp_path_factory.mktemp("prefect-yaml-server")) as running:
        yield running
    assert running.process.poll() is not None


@pytest.fixture(scope="session")
def deployments(prefect_yaml_server: PrefectServer) -> dict[str, Any]:
    """prefect.yaml deployed on `prefect_yaml_server` as the README says (pool, the demo
    account's Secret blocks, `prefect deploy --all`), the schedules paused; the two
    deployments by name. Each test's worker points the runs at its own emulator."""
    return deploy_prefect_yaml(prefect_yaml_server)
