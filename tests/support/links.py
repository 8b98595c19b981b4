"""Links and images of rendered Markdown, as a package index renders a README."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from markdown_it import MarkdownIt


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.targets.append(value)


def relative_targets(markdown: str) -> list[str]:
    """Every link or image target of the rendered Markdown that is not an absolute URL.

    Rendered as CommonMark with tables, raw HTML kept (as an index renders a README; PyPI's
    renderer, cmarkgfm, is not a dependency here).
    """
    html = MarkdownIt("commonmark").enable("table").render(markdown)
    parser = _Links()
    parser.feed(html)
    return [t for t in parser.targets if not re.match(r"^(https?|mailto):", t)]
