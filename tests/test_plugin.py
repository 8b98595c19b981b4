"""The pytest plugin's fixtures, used from a downstream project's test file via pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TEST = """
import httpx
from prefect import flow, task

from cm_tasks import get_stac_token


@task
def fetch(href: str) -> int:
    response = httpx.get(href, headers={"Authorization": f"Bearer {get_stac_token()}"})
    response.raise_for_status()
    return len(response.content)


@flow
def my_ingest(hrefs: list[str]) -> int:
    return sum(fetch.map(hrefs).result())


def test_my_ingest_offline(carbon_mapper_emulator, carbon_mapper_token_block):
    emu = carbon_mapper_emulator
    item_id, _ = emu.large_asset
    href = f"{emu.base_url}stac/assets/{item_id}/rgb.tif"

    assert my_ingest([href, href]) == 2 * emu.asset_size(item_id, "rgb")
    assert get_stac_token() == carbon_mapper_token_block.get() == emu.issued_stac_tokens[-1]
    assert emu.requests("account/tokens/create-stac") == 0
    assert emu.requests(f"stac/assets/{item_id}/rgb.tif") == 2


def test_faults_are_scriptable(carbon_mapper_emulator, carbon_mapper_token_block):
    from cm_tasks.testing import Fault

    emu = carbon_mapper_emulator
    emu.fail("stac/search", Fault.status(503))
    assert httpx.get(emu.base_url + "stac/search").status_code == 503
    assert httpx.get(emu.base_url + "stac/search").status_code == 200
"""


def test_downstream_project_uses_the_fixtures(pytester: pytest.Pytester) -> None:
    """A user's test file, with no conftest: the fixtures come from the pytest11 entry point."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_user_flows=USER_TEST)

    # In-process: the session's Prefect test harness is the user's Prefect API here.
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")

    result.assert_outcomes(passed=2)


def test_plugin_registers_through_the_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_inprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        ["*carbon_mapper_emulator*", "*carbon_mapper_token_block*"], consecutive=False
    )
