"""Shared fixtures: one Prefect test harness per session, the emulator, and credentials.

The `carbon_mapper_emulator` fixture comes from the package's own pytest plugin
(`cm_tasks.testing.pytest_plugin`), the same one downstream users get.
"""

from __future__ import annotations

import os

# Before Prefect is imported anywhere: no telemetry calls from an offline machine.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Under pytest-xdist (`make test` runs two workers), each worker gets its own PREFECT_HOME:
# result storage, logs and profiles of one test process are not another's.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] += f"-{os.environ['PYTEST_XDIST_WORKER']}"

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from prefect.blocks.system import Secret
from prefect.testing.utilities import prefect_test_harness

from .prefect_server import PrefectServer, running_prefect_server

if TYPE_CHECKING:
    from cm_tasks.testing import CarbonMapperEmulator

EMAIL_BLOCK = "carbon-mapper-email"
PASSWORD_BLOCK = "carbon-mapper-password"
TOKEN_BLOCK = "carbon-mapper-stac-token"


@pytest.fixture(autouse=True, scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (temporary SQLite database) for the whole test session."""
    # Usually 10-20 s, but a fresh database runs every migration (slower on old Prefect) and a
    # shared 2-core machine can take minutes: a time-out here errors every test at once.
    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No CM_* variable or .env file of the developer's machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith("CM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cm_env(
    monkeypatch: pytest.MonkeyPatch, carbon_mapper_emulator: CarbonMapperEmulator
) -> CarbonMapperEmulator:
    """Point cm-tasks at the emulator, with retries that do not wait."""
    monkeypatch.setenv("CM_BASE_URL", carbon_mapper_emulator.base_url)
    monkeypatch.setenv("CM_RETRY_BACKOFF", "0")
    monkeypatch.setenv("CM_TIMEOUT", "5")
    return carbon_mapper_emulator


@pytest.fixture
def credentials(cm_env: CarbonMapperEmulator) -> CarbonMapperEmulator:
    """The emulator's demo account saved in the two default Secret blocks."""
    Secret(value=cm_env.email).save(EMAIL_BLOCK, overwrite=True)
    Secret(value=cm_env.password).save(PASSWORD_BLOCK, overwrite=True)
    return cm_env


@pytest.fixture(scope="module")
def emulator() -> Iterator[CarbonMapperEmulator]:
    """One emulator shared by a module's tests (its counters add up across them)."""
    from cm_tasks.testing import CarbonMapperEmulator

    with CarbonMapperEmulator() as emu:
        yield emu


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real `prefect server start` shared by a module's tests (deployments, workers)."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as running:
        yield running
