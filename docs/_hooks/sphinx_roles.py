"""mkdocs hook: show the docstrings' Sphinx roles (``:class:`~gntipc.X```) as plain code.

The docstrings cross-reference in Sphinx's syntax, which Markdown renders as the role's
name followed by code (``:class:<code>~gntipc.X</code>``).  This keeps the code and drops
the role; a leading ``~`` keeps only the last component, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_plain, html)
