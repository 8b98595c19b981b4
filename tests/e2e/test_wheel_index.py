"""The built wheel as a package index shows it: metadata and rendered description (make wheel-test).

No relative link or image in the rendered long description (they are dead on an index page),
no Project-URL the project cannot stand behind (it has no public home yet), the Python
support of the metadata the same as the README's, and the documentation inside the wheel.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from cm_tasks._version import __version__
from tests.support.links import relative_targets

pytestmark = pytest.mark.wheel
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (found,) = out.glob("cm_tasks-*.whl")
    return found


def _metadata(wheel: Path) -> tuple[dict[str, list[str]], str]:
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(f"cm_tasks-{__version__}.dist-info/METADATA").decode()
    message = Parser().parsestr(raw)
    fields: dict[str, list[str]] = {}
    for key, value in message.items():
        fields.setdefault(key, []).append(value)
    return fields, str(message.get_payload())


def test_the_rendered_description_has_no_relative_link(wheel: Path) -> None:
    fields, description = _metadata(wheel)
    assert fields["Description-Content-Type"] == ["text/markdown"]
    assert "cm-tasks docs" in description  # where the docs are, for an index reader
    assert relative_targets(description) == []


def test_the_metadata_names_nothing_we_cannot_stand_behind(wheel: Path) -> None:
    fields, _ = _metadata(wheel)
    urls = fields.get("Project-URL", []) + fields.get("Home-page", [])
    assert not [u for u in urls if "carbon-mapper" in u or "carbonmapper" in u], urls
    assert fields["Requires-Python"] == [">=3.11"]
    assert [
        c for c in fields["Classifier"] if c.startswith("Programming Language :: Python :: 3.")
    ] == [
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ]


def test_the_wheel_ships_the_documentation(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    data = f"cm_tasks-{__version__}.data/data/share/cm-tasks"
    expected = {f"{data}/README.md", f"{data}/CHANGELOG.md"} | {
        f"{data}/docs/{page.name}" for page in (REPO_ROOT / "docs").glob("*.md")
    }
    assert expected <= names
    # The images the pages show, so that a Markdown viewer shows them too.
    assert f"{data}/docs/img/run-form-v2.png" in names
    assert "cm_tasks/docs.py" in names
