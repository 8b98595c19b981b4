"""cm-tasks' documentation, which ships with the package: find a page, print it.

The README, the CHANGELOG and the pages of `docs/` are installed with the wheel under
`<environment>/share/cm-tasks/` (the same layout as a checkout, so the pages' links between
each other work there too). The project has no public web home yet: this is where a user who
installed from a package index reads them.

    cm-tasks docs            list the pages and where they are
    cm-tasks docs operate    print docs/operate.md (Markdown)
    python -m cm_tasks.docs operate

Example:
    ```python
    from cm_tasks.docs import page_path

    print(page_path("operate").read_text()[:200])
    ```
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

#: Page name -> path under the documentation root (a checkout's root, or share/cm-tasks).
PAGES: dict[str, str] = {
    "readme": "README.md",
    "usage": "docs/usage.md",
    "operate": "docs/operate.md",
    "reference": "docs/reference.md",
    "security": "docs/security.md",
    "scaling-out": "docs/scaling-out.md",
    "development": "docs/development.md",
    "changelog": "CHANGELOG.md",
}
_INSTALLED_README = "share/cm-tasks/README.md"


class DocsNotFoundError(LookupError):
    """The documentation is not where the package installs it (a broken or partial install)."""


def docs_root() -> Path:
    """The directory that holds README.md, CHANGELOG.md and docs/.

    Raises:
        DocsNotFoundError: neither the installed files nor a checkout's are there.
    """
    try:
        files = metadata.distribution("cm-tasks").files or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file).replace("\\", "/").endswith(_INSTALLED_README):
            located = Path(str(file.locate())).resolve()
            if located.is_file():
                return located.parent
    # An editable install or a checkout on sys.path: the repository root, two levels above
    # src/cm_tasks.
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / PAGES["usage"]).is_file():
        return checkout
    raise DocsNotFoundError(
        "The cm-tasks documentation is not installed next to the package (share/cm-tasks): "
        "reinstall it, e.g. `pip install --force-reinstall cm-tasks`."
    )


def page_path(name: str) -> Path:
    """The installed file of a page, by its name in `PAGES` (e.g. "operate").

    Raises:
        KeyError: no page of that name; the message lists them.
        DocsNotFoundError: the documentation is not installed.
    """
    if name not in PAGES:
        raise KeyError(f"no page {name!r}: the pages are {', '.join(PAGES)}")
    return docs_root() / PAGES[name]


def main(argv: list[str] | None = None) -> int:
    """`python -m cm_tasks.docs [PAGE]`: list the pages, or print one; exit 64 on a bad name."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if not args:
            root = docs_root()
            for name, relative in PAGES.items():
                print(f"{name:<12} {root / relative}")
            return 0
        print(page_path(args[0]).read_text(encoding="utf-8"), end="")
    except KeyError as exc:
        print(f"Error: {exc.args[0]}.", file=sys.stderr)
        return 64
    except DocsNotFoundError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
