"""The public API's static types: mypy --strict over the files beside this one.

Each ``reveal_type(...)  # Expected`` line must reveal ``Expected`` (module prefixes
dropped), and mypy must report no error: e.g. ``MessageQueue(stream, Request | Reply)``
is a ``MessageQueue[Request | Reply]``, as the documentation says unions are supported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
CHECKED = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("test_"))

_REVEALED = re.compile(r'^(?P<file>[^:]+):(?P<line>\d+): note: Revealed type is "(?P<type>.*)"$')
_EXPECTED = re.compile(r"reveal_type\(.*\)\s*#\s*(?P<type>.+)$")
_QUALIFIED = re.compile(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)")


def _short(type_: str) -> str:
    """``gntipc.messages.MessageQueue[mod.Request]`` -> ``MessageQueue[Request]``."""
    return _QUALIFIED.sub(r"\1", type_).strip()


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_revealed_types(path: Path) -> None:
    expected = {
        number: _short(match["type"])
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (match := _EXPECTED.search(line))
    }
    assert expected, f"{path.name} reveals nothing"
    # The repository's config (mypy --strict, the src layout) from the repository's root;
    # its cache too, so that a run after `make lint` checks only this file.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MYPY_FORCE_COLOR": "0"},
        timeout=240,
        check=False,
    )
    revealed: dict[int, str] = {}
    errors: list[str] = []
    for line in proc.stdout.splitlines():
        if match := _REVEALED.match(line):
            revealed[int(match["line"])] = _short(match["type"])
        elif line.strip():
            errors.append(line)
    assert not errors, "mypy --strict:\n" + "\n".join(errors) + proc.stderr
    assert revealed == expected
