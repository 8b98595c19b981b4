"""The pytest plugin's fixtures, used from a downstream project's test file via pytester."""

from __future__ import annotations

import pytest

from tests.support import REPO_ROOT

pytest_plugins = ["pytester"]

DOCS = REPO_ROOT / "docs" / "development.md"
MARKER = (
    "<!-- doc-test: skip - tests/integration/test_plugin.py"
    " runs the next code block with pytest -->"
)


def _documented_test_file() -> str:
    """The user's test file exactly as docs/development.md shows it."""
    text = DOCS.read_text(encoding="utf-8")
    block = text[text.index(MARKER) :].split("```python\n", 1)[1]
    return block.split("```", 1)[0]


def test_downstream_project_uses_the_fixtures(pytester: pytest.Pytester) -> None:
    """The documented test file, no conftest: the fixtures come from the pytest11 entry point."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_user_flows=_documented_test_file())

    # In-process: the session's Prefect test harness is the user's Prefect API here.
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")

    result.assert_outcomes(passed=2)


def test_plugin_registers_through_the_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_inprocess("--fixtures", "-p", "no:cacheprovider")
    # pytest lists a plugin's fixtures in an order of its own: look for each on its own.
    for fixture in (
        "carbon_mapper_emulator",
        "carbon_mapper_env",
        "carbon_mapper_credentials",
        "carbon_mapper_token_block",
    ):
        result.stdout.fnmatch_lines([f"{fixture} -- *pytest_plugin.py:*"])
