"""Fixtures of every tier: a clean environment, the emulator, and (on request) a Prefect API.

The tiers (tests/unit, tests/integration, tests/e2e) each have a conftest of their own;
tests/integration and tests/e2e turn the session's `prefect_api` on for each of their tests,
tests/unit never does. The emulator fixtures (`carbon_mapper_emulator`, `carbon_mapper_env`,
`carbon_mapper_credentials`, `carbon_mapper_token_block`) come from the package's own pytest
plugin (`cm_tasks.testing.pytest_plugin`), the one downstream users get.
"""

from __future__ import annotations

import os

# Before Prefect is imported anywhere: no telemetry calls from an offline machine.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Under pytest-xdist (`make test` runs four workers), each worker gets its own PREFECT_HOME:
# result storage, logs and profiles of one test process are not another's.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] += f"-{os.environ['PYTEST_XDIST_WORKER']}"

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cm_tasks.testing import CarbonMapperEmulator


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (temporary SQLite database), started once per test process."""
    from prefect.testing.utilities import prefect_test_harness

    from tests.support.prefect_server import migrated_harness_database

    # Usually 5-10 s, but a shared 2-core machine can take minutes: a time-out here errors
    # every test at once.
    with migrated_harness_database(), prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No CM_* variable or .env file of the developer's machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith("CM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def emulator() -> Iterator[CarbonMapperEmulator]:
    """One emulator shared by a module's tests (its counters add up across them).

    For module-scoped servers, workers and processes that keep its URL; a test of its own uses
    the plugin's `carbon_mapper_emulator`, reset before each test.
    """
    from cm_tasks.testing import CarbonMapperEmulator

    with CarbonMapperEmulator() as emu:
        yield emu


@pytest.fixture
def no_deployments() -> Iterator[None]:
    """Start and end without the cm-tasks deployments (the session's API is shared)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from cm_tasks.deployments import DEPLOYMENTS

    def delete_all() -> None:
        with get_client(sync_client=True) as client:
            for spec in DEPLOYMENTS:
                try:
                    client.delete_deployment(client.read_deployment_by_name(spec.full_name).id)
                except ObjectNotFound:
                    continue

    delete_all()
    yield
    delete_all()
