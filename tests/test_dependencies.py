"""Every third-party module the package imports at run time is a declared dependency.

A fresh install gets only what ``pyproject.toml`` declares: a module that the development
venv happens to have (pulled in by a test tool, or by an older version of a dependency)
but the package does not declare fails at import on a user's machine.  sniffio was one:
anyio stopped depending on it in 4.12, and ``import gntipc`` failed in a fresh venv.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "gntipc"

#: Imported only where they are optional, each for a reason the code checks.
OPTIONAL = {
    "pytest": "gntipc.testing's pytest plugin, loaded by pytest itself",
    "pytest_asyncio": "the plugin's support of pytest-asyncio, if installed",
    "tqdm": "progress bars of the CLI, if installed (a status line otherwise)",
    "trio": "taken from sys.modules once trio runs the event loop",
}
#: Import names that differ from their distribution's name.
DISTRIBUTION = {"_cffi_backend": "cffi"}


def _declared() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower().replace("-", "_") for dep in deps}


def _runtime_imports(tree: ast.Module) -> set[str]:
    """Top-level module names imported outside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_runtime_import_is_declared_or_optional() -> None:
    declared = _declared()
    undeclared: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if name in sys.stdlib_module_names or name == "gntipc" or name in OPTIONAL:
                continue
            if DISTRIBUTION.get(name, name).lower() not in declared:
                undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def test_the_scan_sees_imports_and_skips_type_checking_blocks() -> None:
    tree = ast.parse(
        "import sniffio\nfrom msgspec import Struct\nfrom . import _soon\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import typing_extensions\n"
        "def f():\n    import tqdm\n"
    )
    assert _runtime_imports(tree) == {"sniffio", "msgspec", "typing", "tqdm"}
