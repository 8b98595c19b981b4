"""Prefect's own block standards (`BlockStandardTestSuite`) for every block cm-tasks defines.

The suite Prefect's integrations run against their blocks: a description, a documentation
URL, a description ending in a period on every field, and a code example that imports the
class and loads "BLOCK_NAME" - the placeholder that fits whichever block a user looks at.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from prefect.blocks.core import Block

import cm_tasks

try:
    from prefect.testing.standard_test_suites import BlockStandardTestSuite
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the Prefect version
    # Prefect 3.2's suite imports Pillow unconditionally (3.4 and later only for the logo
    # test); cm-tasks does not depend on Pillow.
    if missing.name != "PIL":
        raise
    pytest.skip("this Prefect's block suite needs Pillow", allow_module_level=True)


def _our_blocks() -> list[type[Block]]:
    """Every Block subclass defined in a cm_tasks module (not the testing helpers)."""
    for module in pkgutil.walk_packages(cm_tasks.__path__, "cm_tasks."):
        if ".testing" not in module.name and not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[Block]] = []
    pending = list(Block.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__.startswith("cm_tasks.") and cls not in found:
            found.append(cls)
    return found


BLOCKS = _our_blocks()


def test_the_package_defines_blocks() -> None:
    assert [cls.__name__ for cls in BLOCKS] == ["CarbonMapperStacToken"]


@pytest.mark.parametrize("block_class", BLOCKS, ids=lambda cls: cls.__name__)
class TestBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block_class: type[Block]) -> type[Block]:
        return block_class


@pytest.mark.parametrize("block_class", BLOCKS, ids=lambda cls: cls.__name__)
def test_no_url_suggests_a_home_the_project_does_not_have(block_class: type[Block]) -> None:
    # No public home yet, and nothing may suggest the platform publishes the package.
    url = str(block_class._documentation_url)
    assert "github.com" not in url
    assert "carbonmapper" not in url
    assert "carbon-mapper" not in url
    from prefect.blocks.system import Secret

    assert url == str(Secret._documentation_url)  # the page Prefect's own Secret block links
