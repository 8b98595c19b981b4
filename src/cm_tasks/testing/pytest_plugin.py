"""Pytest fixtures for the Carbon Mapper API emulator (registered via the ``pytest11`` entry point).

One emulator serves the whole session; ``carbon_mapper_emulator`` resets it before each test.
The emulator is imported inside the fixture so that merely loading this plugin stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cm_tasks.testing import CarbonMapperEmulator


@pytest.fixture(scope="session")
def _carbon_mapper_emulator_session() -> Iterator[CarbonMapperEmulator]:
    from cm_tasks.testing import CarbonMapperEmulator

    with CarbonMapperEmulator() as emulator:
        yield emulator


@pytest.fixture
def carbon_mapper_emulator(
    _carbon_mapper_emulator_session: CarbonMapperEmulator,
) -> CarbonMapperEmulator:
    """A running Carbon Mapper API emulator, reset (no faults, counters, tokens) for this test.

    Example:
        ```python
        def test_login(carbon_mapper_emulator):
            emu = carbon_mapper_emulator
            r = httpx.post(emu.base_url + "token/pair",
                           json={"email": emu.email, "password": emu.password})
            assert r.status_code == 200
        ```
    """
    _carbon_mapper_emulator_session.reset()
    return _carbon_mapper_emulator_session
