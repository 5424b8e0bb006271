"""Simulated grant tables: pages are pages of sparse memory files in the runtime dir.

A share creates one memory file ``m/<bid>-<n>`` of ``count`` pages (ftruncate: sparse,
hence zeroed) and one ``grants`` row per page: (granting domid, ref) → (grantee,
writable, file, page offset).  Mapping N refs reserves an N-page range with an
anonymous mmap and maps each page over it with ``MAP_FIXED`` (``gnt_mmap`` of the
native core), read-only (``PROT_READ``) unless asked otherwise.  A memory file lives
while a grant or a mapping (``maps`` rows) refers to it; after the granter ends its
grants the mapper's pages stay valid, as foreign-mapped pages do on Xen.

A restore of our domain revokes our grants and forgets our mappings and their unmap
notifications (their rows go; a save performs no notification).  When this process
learns it, each of its mappings is *detached*: a private copy of its pages replaces it
in place (one ``MAP_FIXED`` mmap of a memfd over the range, atomic for other threads),
so the pages stay mapped until :meth:`SimPages.close` (a reader in flight keeps reading
the stale page, it never faults) while what the restored domain writes no longer
reaches its former peers, whose pages stay with the dead domain as on Xen.  Closing
such pages then unmaps them and does nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import sqlite3
import warnings
from collections.abc import Sequence

from anyio import ClosedResourceError

from ..._domid import DOMID_MAX
from ..._exceptions import LocalProtocolError, raise_errno
from ..._mapping import PAGE_SIZE, Mapping
from ..._native import ffi, lib
from .._abc import CopySegment, EventPort, ForeignRef, Pages
from ._domain import SimDomain
from ._events import is_port_of
from ._runtime import clear_byte_in_file, drop_file_if_unused

__all__ = [
    "SimPages",
    "grant_copy",
    "granted_page",
    "map_refs",
    "reserve_refs",
    "share_pages",
]

#: Numbers SimPages in the order they are made: a restore detaches them in that order
#: (a vchan's control page, whose indices say what its rings hold, before its rings).
_order = itertools.count()

#: The first ref handed out (Xen reserves refs 0..7 of every grant table).
FIRST_REF = 8

# The grant-copy statuses the sim reports (Xen's GNTST_* values).
GNTST_OKAY = 0
GNTST_BAD_DOMAIN = -2
GNTST_BAD_GNTREF = -4
GNTST_PERMISSION_DENIED = -8
GNTST_BAD_COPY_ARG = -10


class SimPages(Pages):
    """Pages shared with, or mapped from, another simulated domain."""

    def __init__(
        self,
        domain: SimDomain,
        domid: int,
        refs: tuple[int, ...],
        mm: mmap.mmap,
        pages: list[tuple[str, int]],
        *,
        writable: bool,
        shared: bool,
        map_ids: list[int],
    ) -> None:
        self._domain = domain
        self._granter = domain.domid  # for a share: the domain whose grants these are
        self._epoch = domain.epoch
        self._order = next(_order)
        self._detached = False
        self.domid = domid
        self.refs = refs
        self._pages = pages  # (memory file, file offset) per page
        self._shared = shared
        self._map_ids = map_ids
        self._notify_id: int | None = None
        self._notify: tuple[int, bool, EventPort | None] | None = None
        self._closed = False
        self.mapping = Mapping(mm, len(refs) * PAGE_SIZE, writable=writable, release=self._released)
        domain.children.add(self)

    def set_unmap_notify(
        self, offset: int, *, clear_byte: bool = True, port: EventPort | None = None
    ) -> None:
        """See :meth:`Pages.set_unmap_notify`.  The notification is recorded in the
        shared registry so that another process performs it if this one dies.

        Raises:
            LocalProtocolError: ``offset`` outside the mapping, ``clear_byte`` on a
                read-only mapping, or ``port`` not a port of this backend.
            XenError: EINVAL if a restore of our domain revoked the pages.
            ClosedResourceError: the pages are closed.
        """
        if self._closed:
            raise ClosedResourceError("the pages are closed")
        if self._domain.revoked(self._epoch):
            raise_errno(
                errno.EINVAL,
                f"sim: set unmap notify: {self!r} were revoked by the restore of domain "
                f"{self._granter}",
            )
        self.mapping.check_unmap_notify(offset, clear_byte=clear_byte)
        if port is not None and not is_port_of(port, self._domain):
            raise LocalProtocolError("the unmap-notify port must be a port of this backend")
        file, off = self._pages[offset // PAGE_SIZE]
        with self._domain.rt.write() as db:
            if self._epoch != self._domain.epoch:  # (a restore just now took the rows)
                raise_errno(errno.EINVAL, f"sim: set unmap notify: {self!r} were revoked")
            if self._notify_id is not None:
                db.execute("DELETE FROM notifies WHERE id=?", (self._notify_id,))
            cur = db.execute(
                "INSERT INTO notifies (bid, file, off, clear, pdomid, port) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    self._domain.bid,
                    file,
                    off + offset % PAGE_SIZE,
                    int(clear_byte),
                    None if port is None else self._domain.domid,
                    None if port is None else port.port,
                ),
            )
            self._notify_id = cur.lastrowid
        self._notify = (offset, clear_byte, port)

    def _on_restore(self) -> None:
        """Detach (see the module docstring): our domain was restored.  Best effort:
        pages that cannot be copied (no memory) stay shared."""
        if self._closed or self._detached:
            return
        self._detached = True
        try:
            ptr = ffi.from_buffer(self.mapping.mmap)  # an export: close() waits for us
        except (ClosedResourceError, ValueError):
            return
        try:
            size = len(self.refs) * PAGE_SIZE
            snapshot = bytes(ffi.buffer(ptr, size))
            fd = os.memfd_create("gntipc-sim-restored", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.pwrite(fd, snapshot, 0)
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.mapping.writable else 0)
                lib.gnt_mmap(
                    ffi.cast("void *", ptr), size, prot, lib.MAP_SHARED | lib.MAP_FIXED, fd, 0
                )
            finally:
                os.close(fd)
        except OSError:
            pass
        finally:
            ffi.release(ptr)

    def close(self) -> None:
        """Unmap (firing the unmap notification) and end our grants.  Idempotent.

        Raises:
            MappingInUse: views into the mapping are alive; nothing was closed.
        """
        self.mapping.close()

    def _released(self) -> None:
        # Called by Mapping.close() after the munmap succeeded.
        if self._closed:
            return
        self._closed = True
        self._domain.children.discard(self)
        if self._domain.closed or self._domain.revoked(self._epoch):
            return  # revoked: the restore removed our rows and performed no notification
        note = self._notify
        if note is not None:
            offset, clear, port = note
            if clear:
                file, off = self._pages[offset // PAGE_SIZE]
                clear_byte_in_file(file, off + offset % PAGE_SIZE)
            if port is not None:
                with contextlib.suppress(Exception):
                    port.notify()
        files = {f for f, _ in self._pages}
        with self._domain.rt.write() as db:
            if self._epoch != self._domain.epoch:
                return  # a restore took the rows between our check and now
            if self._notify_id is not None:
                db.execute("DELETE FROM notifies WHERE id=?", (self._notify_id,))
            db.executemany("DELETE FROM maps WHERE id=?", [(i,) for i in self._map_ids])
            if self._shared:
                db.executemany(
                    "DELETE FROM grants WHERE domid=? AND ref=?",
                    [(self._granter, r) for r in self.refs],
                )
            for f in files:
                drop_file_if_unused(db, f)

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        kind = "shared with" if self._shared else "mapped from"
        return f"<SimPages {len(self.refs)} pages {kind} domain {self.domid}>"


def reserve_refs(
    db: sqlite3.Connection, domain: SimDomain, count: int, what: str
) -> tuple[int, ...]:
    """``count`` fresh grant refs of our domain (in a write transaction), within its page
    limit.

    Raises:
        XenError: ENOSPC past the limit (the message names the knob).
    """
    (used,) = db.execute("SELECT COUNT(*) FROM grants WHERE domid=?", (domain.domid,)).fetchone()
    if used + count > domain.page_limit:
        raise_errno(
            errno.ENOSPC,
            f"sim grants: {what} {count} pages: domain {domain.domid} already shares "
            f"{used} of its limit of {domain.page_limit} (close channels, or raise the "
            "limit: SimBackend(page_limit=...) or GNTIPC_SIM_PAGE_LIMIT)",
        )
    row = db.execute("SELECT next_ref FROM domains WHERE domid=?", (domain.domid,)).fetchone()
    first = FIRST_REF if row is None or row[0] is None else int(row[0])
    db.execute(
        "INSERT INTO domains (domid, next_ref) VALUES (?, ?) "
        "ON CONFLICT(domid) DO UPDATE SET next_ref=excluded.next_ref",
        (domain.domid, first + count),
    )
    return tuple(range(first, first + count))


def share_pages(domain: SimDomain, domid: int, count: int, writable: bool) -> SimPages:
    name = domain.new_name("m")
    with domain.rt.write() as db:
        refs = reserve_refs(db, domain, count, "sharing")
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, count * PAGE_SIZE)
            mm = mmap.mmap(
                fd, count * PAGE_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        os.close(fd)
        db.executemany(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (domain.domid, r, domid, int(writable), name, i * PAGE_SIZE, domain.bid)
                for i, r in enumerate(refs)
            ],
        )
        cur = db.execute("INSERT INTO maps (bid, file) VALUES (?, ?)", (domain.bid, name))
        map_id = cur.lastrowid
        assert map_id is not None
    pages = [(name, i * PAGE_SIZE) for i in range(count)]
    return SimPages(domain, domid, refs, mm, pages, writable=True, shared=True, map_ids=[map_id])


def granted_page(
    db: sqlite3.Connection, domain: SimDomain, domid: int, ref: int, writable: bool, what: str
) -> tuple[str, int]:
    """The (memory file, offset) of grant ``ref`` of ``domid``, checked to be granted to
    our domain (writable, if asked).

    Raises:
        XenError: EINVAL if it is not granted to us, EACCES if read-only but ``writable``.
    """
    row = db.execute(
        "SELECT grantee, writable, file, off FROM grants WHERE domid=? AND ref=?",
        (domid, ref),
    ).fetchone()
    if row is None or row[0] != domain.domid:
        raise_errno(
            errno.EINVAL,
            f"{what} grant ref {ref} of domain {domid}: not granted to domain {domain.domid}",
        )
    if writable and not row[1]:
        raise_errno(
            errno.EACCES,
            f"{what} grant ref {ref} of domain {domid} writable: it is granted read-only",
        )
    return str(row[2]), int(row[3])


def map_refs(domain: SimDomain, domid: int, refs: Sequence[int], writable: bool) -> SimPages:
    n = len(refs)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    with domain.rt.write() as db:
        pages = [granted_page(db, domain, domid, ref, writable, "gntdev: map") for ref in refs]
        mm = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, prot=prot)
        try:
            ptr = ffi.from_buffer(mm)
            addr = int(ffi.cast("uintptr_t", ptr))
            ffi.release(ptr)
            fds: dict[str, int] = {}
            try:
                for i, (file, off) in enumerate(pages):
                    fd = fds.get(file)
                    if fd is None:
                        flags = os.O_RDWR if writable else os.O_RDONLY
                        fd = fds[file] = os.open(file, flags | os.O_CLOEXEC)
                    got = lib.gnt_mmap(
                        ffi.cast("void *", addr + i * PAGE_SIZE),
                        PAGE_SIZE,
                        prot,
                        lib.MAP_SHARED | lib.MAP_FIXED,
                        fd,
                        off,
                    )
                    if got == ffi.NULL:
                        raise_errno(ffi.errno, "sim: mmap of a granted page")
            finally:
                for fd in fds.values():
                    os.close(fd)
        except BaseException:
            mm.close()
            raise
        map_ids = []
        for file in {f for f, _ in pages}:
            cur = db.execute("INSERT INTO maps (bid, file) VALUES (?, ?)", (domain.bid, file))
            assert cur.lastrowid is not None
            map_ids.append(cur.lastrowid)
    return SimPages(
        domain, domid, tuple(refs), mm, pages, writable=writable, shared=False, map_ids=map_ids
    )


def grant_copy(domain: SimDomain, segments: Sequence[object]) -> list[int]:
    """Per-segment GNTST_* statuses, copying through the memory files."""
    statuses: list[int] = []
    with domain.rt.snapshot() as db:
        for seg in segments:
            if not isinstance(seg, CopySegment):
                raise TypeError(f"expected CopySegment, got {type(seg).__name__}")
            src, dst, length = seg.source, seg.dest, seg.length
            if isinstance(src, ForeignRef) == isinstance(dst, ForeignRef):
                raise LocalProtocolError("a copy segment needs exactly one foreign side")
            foreign = src if isinstance(src, ForeignRef) else dst
            assert isinstance(foreign, ForeignRef)
            if length < 0 or foreign.offset < 0 or foreign.offset + length > PAGE_SIZE:
                statuses.append(GNTST_BAD_COPY_ARG)
                continue
            if not 0 <= foreign.domid <= DOMID_MAX:
                statuses.append(GNTST_BAD_DOMAIN)
                continue
            row = db.execute(
                "SELECT grantee, writable, file, off FROM grants WHERE domid=? AND ref=?",
                (foreign.domid, foreign.ref),
            ).fetchone()
            if row is None:
                alive = db.execute(
                    "SELECT 1 FROM procs WHERE domid=? LIMIT 1", (foreign.domid,)
                ).fetchone()
                statuses.append(GNTST_BAD_GNTREF if alive else GNTST_BAD_DOMAIN)
                continue
            if row[0] != domain.domid or (foreign is dst and not row[1]):
                statuses.append(GNTST_PERMISSION_DENIED)
                continue
            pos = int(row[3]) + foreign.offset
            try:
                if foreign is src:
                    local = memoryview(dst).cast("B")  # type: ignore[arg-type]
                    if local.readonly or len(local) < length:
                        raise LocalProtocolError(
                            "grant-copy destination buffer is read-only or too short"
                        )
                    fd = os.open(row[2], os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        data = os.pread(fd, length, pos)
                    finally:
                        os.close(fd)
                    local[:length] = data.ljust(length, b"\0")
                else:
                    local = memoryview(src).cast("B")  # type: ignore[arg-type]
                    if len(local) < length:
                        raise LocalProtocolError("grant-copy source buffer is too short")
                    fd = os.open(row[2], os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.pwrite(fd, local[:length], pos)
                    finally:
                        os.close(fd)
            except FileNotFoundError:
                statuses.append(GNTST_BAD_GNTREF)
                continue
            statuses.append(GNTST_OKAY)
    return statuses
