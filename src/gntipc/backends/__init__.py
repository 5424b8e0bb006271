"""Backends: the real Xen devices (``xen``) and a simulated hypervisor (``sim``)."""

from __future__ import annotations

import os

from .._exceptions import BackendUnavailable
from . import _abc
from ._abc import Backend as Backend
from ._abc import CopySegment as CopySegment
from ._abc import DmabufExport as DmabufExport
from ._abc import DmabufImport as DmabufImport
from ._abc import EventPort as EventPort
from ._abc import ForeignRef as ForeignRef
from ._abc import Pages as Pages
from ._abc import Perm as Perm
from ._abc import PortState as PortState
from ._abc import Store as Store
from ._abc import Transaction as Transaction
from ._abc import Watch as Watch

# The interfaces (listed once, in _abc.__all__) and backend selection.
__all__ = [*_abc.__all__, "get_backend", "select_backend_name"]

_NAMES = ("xen", "sim")


def select_backend_name(name: str | None = None) -> str:
    """Explicit ``name``, else ``$GNTIPC_BACKEND``, else ``xen`` when
    ``/dev/xen/gntdev`` exists, else ``sim``."""
    source = ""
    if name is None:
        name = os.environ.get("GNTIPC_BACKEND") or None
        source = " (GNTIPC_BACKEND)"
    if name is None:
        name = "xen" if os.path.exists("/dev/xen/gntdev") else "sim"
    if name not in _NAMES:
        raise ValueError(f"unknown backend {name!r}{source} (expected one of {', '.join(_NAMES)})")
    return name


def get_backend(name: str | None = None, **kwargs: object) -> Backend:
    """Open a backend, chosen by :func:`select_backend_name`.

    Keyword arguments go to the backend's constructor (e.g. ``domid=`` for sim).

    Raises:
        BackendUnavailable: the chosen backend cannot run here (says what is missing).
    """
    chosen = select_backend_name(name)
    if chosen == "xen":
        from .xen import XenBackend

        return XenBackend(**kwargs)  # type: ignore[arg-type]
    from .sim import SimBackend

    return SimBackend(**kwargs)  # type: ignore[arg-type]


del BackendUnavailable
