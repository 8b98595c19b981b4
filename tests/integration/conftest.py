"""The integration tier: a real Prefect API in this process, the emulator over real HTTP.

One `prefect_test_harness` per test process (tests/conftest.py's `prefect_api`), shared by every
test of the tier.
"""

import pytest


@pytest.fixture(autouse=True)
def _prefect_api(prefect_api: None) -> None:
    """Every test of the tier runs against the session's Prefect API."""
