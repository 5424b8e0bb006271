"""griffe extension: show a default that is a private alias of a public constant by the
constant's public name.

``streams.py`` imports ``DEFAULT_RING_SIZE as _DEFAULT_RING`` (a private alias keeps the
module's namespace clean), and griffe shows a default as written:
``receive(max_bytes: int = _DEFAULT_RING)``, a name the reader cannot import.  This
shows ``DEFAULT_RING_SIZE``, the name under which the reader finds the value.
"""

from __future__ import annotations

from typing import Any

import griffe


def _public(expr: griffe.ExprName) -> griffe.ExprName | None:
    """The public name that the private ``expr`` aliases, or None."""
    scope = expr.parent
    while isinstance(scope, griffe.Class):
        scope = scope.parent
    if not isinstance(scope, griffe.Module):
        return None
    member = scope.members.get(expr.name)
    if member is None or not member.is_alias:
        return None
    target_path: str = member.target_path  # type: ignore[union-attr]
    parent, _, name = target_path.rpartition(".")
    if name.startswith("_"):
        return None
    return griffe.ExprName(name, parent=parent)


class PublicDefaults(griffe.Extension):
    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        for param in func.parameters:
            default = param.default
            if (
                isinstance(default, griffe.ExprName)
                and default.name.startswith("_")
                and not default.name.startswith("__")
            ):
                public = _public(default)
                if public is not None:
                    param.default = public
