"""mkdocs hook: fail the strict build on docstring markup that did not render.

mkdocstrings turns a docstring that its Google-style parser misreads into plausible HTML
instead of an error, so these survive a strict build unless checked in the output:

* a Sphinx role left as text (``:meth:`get```, or ``meth:<code>get</code>`` when a
  ``Raises:`` line such as ``As :meth:`get``` was split at its first colon); the
  ``sphinx_roles`` hook turns the well-formed ones into code before this runs;
* a ``Raises`` row whose exception is not a (dotted) name, such as ``Otherwise as``;
* a private name in a signature (``max_bytes: int = _DEFAULT_RING``).

Each finding is logged as a warning naming the page, which fails ``mkdocs build
--strict`` (``make docs``) after all pages are checked.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.html_check")

_PRE = re.compile(r"<pre\b.*?</pre>", re.S)
_ROLES = "attr|class|data|exc|func|meth|mod|obj"
_ROLE = re.compile(rf"(?<![\w-]):?(?:{_ROLES}):(?:<code>|`)[^<`]*")
_RAISES = re.compile(r'<span class="doc-section-title">Raises:</span>.*?<tbody>(.*?)</tbody>', re.S)
_FIRST_CELL = re.compile(r'<tr class="doc-section-item">\s*<td>(.*?)</td>', re.S)
_EXCEPTION = re.compile(r"[A-Za-z_][\w.]*")
_SIGNATURE = re.compile(r'<div class="doc-signature\b.*?</div>', re.S)
_PRIVATE = re.compile(r'<span class="n">(_(?!_)\w*)</span>')
_TAG = re.compile(r"<[^>]+>")


def _text(fragment: str) -> str:
    return html.unescape(_TAG.sub("", fragment)).strip()


def problems(page_html: str) -> list[str]:
    """What in ``page_html`` is docstring markup that did not render."""
    found: list[str] = []
    for signature in _SIGNATURE.findall(page_html):
        for name in _PRIVATE.findall(signature):
            found.append(f"private name {name!r} in a signature")
    prose = _PRE.sub("", page_html)
    for match in _ROLE.finditer(prose):
        found.append(f"Sphinx role left as text: {_text(match.group())!r}")
    for table in _RAISES.findall(prose):
        for cell in _FIRST_CELL.findall(table):
            name = _text(cell)
            if not _EXCEPTION.fullmatch(name):
                found.append(f"Raises row whose exception is not a name: {name!r}")
    return found


def on_post_page(output: str, *, page: Any, **kwargs: Any) -> str:
    for problem in problems(output):
        log.warning("%s: %s", page.file.src_uri, problem)
    return output
