"""SimDomain: what the resources of one sim backend need of it, and nothing more.

A :class:`~gntipc.backends.sim.SimBackend` owns one :class:`SimDomain` and hands it to
every port, set of pages, store and watch it creates; they use its public attributes
(the runtime, the backend's id and domain, the registry of live resources) and never
the backend itself.
"""

from __future__ import annotations

import itertools
import os

from ..._resource import Closeable
from ._runtime import Runtime

__all__ = ["SimDomain"]

#: Numbers the files a process creates; with the backend id (never reused in a runtime
#: directory) it makes every file name unique for the directory's whole life.
_names = itertools.count()


class SimDomain:
    """One backend's context, shared by the resources it creates.

    Attributes:
        rt: the runtime directory handle (state db, its lock, the path).
        bid: the backend's id in the process registry (``procs.bid``).
        domid: the domain the backend plays.
        page_limit: how many pages the domain may share at once (gntalloc's limit).
        children: the backend's live resources: each adds itself when created and
            removes itself when closed; the backend closes what is left.
    """

    __slots__ = ("bid", "children", "domid", "page_limit", "rt")

    def __init__(self, rt: Runtime, bid: int, domid: int, page_limit: int) -> None:
        self.rt = rt
        self.bid = bid
        self.domid = domid
        self.page_limit = page_limit
        self.children: set[Closeable] = set()

    @property
    def closed(self) -> bool:
        """True once the backend has closed its runtime handle."""
        return self.rt.closed

    def new_name(self, kind: str) -> str:
        """A new file path in the runtime directory's ``kind`` folder: ``m`` (memory
        files), ``p`` (port sockets) or ``w`` (watch sockets)."""
        return os.path.join(self.rt.path, kind, f"{self.bid}-{next(_names)}")

    def __repr__(self) -> str:
        return f"<SimDomain {self.domid}, backend #{self.bid}>"
