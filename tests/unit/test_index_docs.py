"""What a package index shows: a README without relative links, the docs one command away.

The README is the wheel's long description; on an index page every relative link or image is
dead. The pages themselves ship with the package (`cm-tasks docs`). The wheel as built is
checked in tests/e2e/test_wheel_index.py (`make wheel-test`).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cm_tasks import docs
from cm_tasks.cli import app
from tests.support.links import relative_targets

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_helper_sees_relative_links_and_images() -> None:
    found = relative_targets('[a](docs/a.md) [b](#b) <img src="x.png"> [c](https://x.org/)')
    assert found == ["docs/a.md", "#b", "x.png"]


def test_the_readme_has_no_relative_link_or_image() -> None:
    assert relative_targets((REPO_ROOT / "README.md").read_text()) == []


def test_python_support_is_stated_the_same_everywhere() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    listed = sorted(
        c.rsplit(" ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert listed == ["3.11", "3.12", "3.13"]
    readme = (REPO_ROOT / "README.md").read_text()
    assert "Python 3.11 or newer" in readme
    assert "3.11-3.13" not in readme  # the old, narrower claim
    assert "CI tests 3.11, 3.12 and 3.13" in readme


@pytest.mark.parametrize("name", list(docs.PAGES))
def test_every_page_is_found(name: str) -> None:
    assert docs.page_path(name).is_file()


def test_the_docs_command_lists_and_prints_pages() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["docs"])
    assert listed.exit_code == 0
    assert str(docs.page_path("operate")) in listed.output

    page = runner.invoke(app, ["docs", "operate"])
    assert page.exit_code == 0
    assert page.output.startswith("# Operate it")

    unknown = runner.invoke(app, ["docs", "nope"])
    assert unknown.exit_code == 64
    assert "the pages are readme, usage, operate" in unknown.output
