"""SimDomain: what the resources of one sim backend need of it, and nothing more.

A :class:`~gntipc.backends.sim.SimBackend` owns one :class:`SimDomain` and hands it to
every port, set of pages, store and watch it creates; they use its public attributes
(the runtime, the backend's id and domain, the registry of live resources) and never
the backend itself.

A restore (:func:`~gntipc.backends.sim.restore_domain`) moves the backend to a new
domid while its process lives on.  The domain learns it at its next operation
(:meth:`SimDomain.sync`, one memory read when nothing happened) and counts it in
:attr:`SimDomain.epoch`; each resource remembers the epoch it was made in, and one made
before the restore is *revoked*: its rows are gone from the shared state (the restore
removed them), so it does no more than release what this process holds.  Resources with
an ``_on_restore()`` method are told when the domain learns the restore (pages detach
from their peers: see :mod:`._grants`; memory stays mapped until its owner closes it,
nothing is pulled from under a call in flight).
"""

from __future__ import annotations

import itertools
import os
import sqlite3

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
        domid: the domain the backend plays (a restore changes it).
        epoch: how many restores of its domain the backend has gone through.
        page_limit: how many pages the domain may share at once (gntalloc's limit).
        children: the backend's live resources: each adds itself when created and
            removes itself when closed; the backend closes what is left.
    """

    __slots__ = ("bid", "children", "domid", "epoch", "page_limit", "rt")

    def __init__(self, rt: Runtime, bid: int, domid: int, page_limit: int) -> None:
        self.rt = rt
        self.bid = bid
        self.domid = domid
        self.epoch = 0
        self.page_limit = page_limit
        self.children: set[Closeable] = set()
        rt.on_restore = self._restored

    def _restored(self, db: sqlite3.Connection) -> None:
        # In a write transaction (Runtime.write).  A restore has two steps (see
        # restore_domain): "saving" asks us to take our snapshot (detach) before any
        # peer learns of the death; then procs gives our new domid.  Each step starts a
        # new epoch, so that a resource made between the two is revoked by the second.
        self.rt.seen_restores = self.rt.restores()
        row = db.execute("SELECT domid FROM procs WHERE bid=?", (self.bid,)).fetchone()
        saving = db.execute("SELECT 1 FROM saving WHERE bid=? AND done=0", (self.bid,)).fetchone()
        moved = row is not None and int(row[0]) != self.domid
        if saving or moved:
            self.epoch += 1
            # In the order they were made ("_order"): a snapshot of a vchan's indices
            # taken before that of its rings never claims bytes the rings lack.
            for child in sorted(self.children, key=lambda c: getattr(c, "_order", 0)):
                hook = getattr(child, "_on_restore", None)
                if hook is not None:
                    hook()  # pages: detach (replaced in place by a private copy), once
        if saving:
            db.execute("UPDATE saving SET done=1 WHERE bid=?", (self.bid,))
        if moved:
            self.domid = int(row[0])

    def sync(self) -> None:
        """Learn a restore of our domain, if one happened since we last looked: one
        memory read when none did, a write transaction when any domain was restored."""
        rt = self.rt
        if rt.restores() != rt.seen_restores and not rt.closed:
            with rt.write():
                pass  # Runtime.write runs _restored

    def revoked(self, epoch: int) -> bool:
        """True if a resource made in ``epoch`` was revoked by a restore since (on the
        notify path: one memory read and two compares when nothing happened)."""
        rt = self.rt
        if rt.restores() != rt.seen_restores:
            self.sync()
        return epoch != self.epoch

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
