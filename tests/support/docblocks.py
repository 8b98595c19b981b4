"""The code blocks of README.md and docs/*.md, as the doc-block tests run them.

Every fenced block has a language. `python` and `bash` blocks are commands a user runs, and the
tests run them (tests/e2e/test_doc_blocks.py); other languages (`text`, `yaml`, `dockerfile`)
are output, configuration or a file to write, not run on their own. An HTML comment on the
line before a fence changes that:

    <!-- doc-test: skip - WHY -->       not run; WHY says what covers it, or why it cannot run
    <!-- doc-test: save FILE -->        written to FILE in the page's directory, for the
                                        blocks after it (e.g. a script, automation.yaml)

Placeholders a reader replaces (a server's address, an item, a block id) are filled in by the
runner from `placeholders()`: one table, so a new placeholder is a visible change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNABLE = ("python", "bash")
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!-- doc-test: (skip - (?P<why>.+)|save (?P<file>\S+)) -->$")


@dataclass(frozen=True)
class DocBlock:
    """One fenced code block: where it is, its language, its text and its marker."""

    page: str
    line: int
    language: str
    code: str
    skip: str | None = None
    save: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUNNABLE and self.skip is None and self.save is None


def doc_pages() -> list[Path]:
    """README.md and every page of docs/, in reading order."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def doc_blocks(page: Path) -> list[DocBlock]:
    """The fenced blocks of a page, in order."""
    lines = page.read_text().splitlines()
    name = str(page.relative_to(REPO_ROOT))
    blocks = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = index + 1
        while lines[end].strip() != "```":
            end += 1
        marker = _MARKER.match(lines[index - 1]) if index else None
        blocks.append(
            DocBlock(
                page=name,
                line=index + 1,
                language=fence.group(1),
                code="\n".join(lines[index + 1 : end]) + "\n",
                skip=marker.group("why") if marker else None,
                save=marker.group("file") if marker else None,
            )
        )
        index = end + 1
    return blocks


def all_blocks() -> list[DocBlock]:
    return [block for page in doc_pages() for block in doc_blocks(page)]


def markers_without_a_block() -> list[str]:
    """`doc-test` comments not directly above a fence (a marker that would do nothing)."""
    stray = []
    for page in doc_pages():
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if "doc-test:" in line and (
                not _MARKER.match(line) or number >= len(lines) or not _FENCE.match(lines[number])
            ):
                stray.append(f"{page.name}:{number}")
    return stray
