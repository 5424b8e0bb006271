"""Simulated gntdev dma-buf: a dma-buf imported as grant refs, granted pages exported as
a dma-buf, modelled on the driver's behaviour (``drivers/xen/gntdev-dmabuf.c``).

A sim dma-buf is a descriptor open on a memory file of the runtime directory's ``m/``
folder: one made by :meth:`SimBackend.dmabuf_alloc` (an unnamed ``O_TMPFILE`` file, so
that, like a dma-buf, it lives exactly while descriptors or mappings of it do) or one
returned by an export.  Any other descriptor is refused with EINVAL, as the driver
refuses a file that is not a dma-buf.

Import
    The file must be ``count`` pages (else EINVAL, as the driver's size check).  It is
    linked under a name of the importing backend (``m/<bid>-<n>``) and gets one
    ``grants`` row per page, counted against the domain's page limit, so the grantee
    maps the refs with the ordinary :meth:`~SimBackend.map` from any process.  The import
    keeps a duplicate of the descriptor, as the driver's attachment holds the buffer.
    Release deletes the rows (the name goes once nobody maps it); a dead importer's rows
    are reaped like its other grants.

Export
    The refs must be granted to us writable (the driver maps them writable) and be all
    the pages of one memory file, in order (one :meth:`~SimBackend.share`, whole): the
    sim cannot make one descriptor alias pages of several files, and refuses anything
    else with EINVAL saying so.  The export's descriptor is opened on that file; its open
    file description holds an OFD read lock on a byte of the file's lock space unique
    to the export (far beyond its end).  That lock lives while any descriptor of the
    description (passed on with SCM_RIGHTS, duplicated, inherited) or any mapping made
    through one exists, which is the lifetime of a dma-buf; the release test is a write
    lock on the same byte through a second description.  Unlike real PV Xen (every
    domain of the test kit), which refuses export with EINVAL, the sim exports: it is
    the one place the export path runs.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import stat
import struct
import time
import warnings

from ..._exceptions import raise_errno
from ..._mapping import PAGE_SIZE
from .._abc import DmabufExport, DmabufImport
from ._domain import SimDomain
from ._grants import granted_page, reserve_refs
from ._runtime import drop_file_if_unused

__all__ = ["SimDmabufExport", "SimDmabufImport", "dmabuf_alloc", "export_refs", "import_fd"]

# Each export locks its own byte: backend ids are never reused in a runtime directory,
# and the counter numbers the exports of this process.
_LOCK_BASE = 1 << 40
_lock_numbers = itertools.count()


def _flock(kind: int, offset: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0, as OFD locks require).
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


def _memory_dir(domain: SimDomain) -> str:
    return os.path.join(domain.rt.path, "m")


class SimDmabufExport(DmabufExport):
    """Granted pages exported as a sim dma-buf (see the module docstring)."""

    def __init__(
        self,
        domain: SimDomain,
        domid: int,
        refs: tuple[int, ...],
        fd: int,
        probe: int,
        lock_offset: int,
    ) -> None:
        super().__init__(domid, refs, fd)
        self._domain = domain
        self._probe = probe
        self._lock_offset = lock_offset
        domain.children.add(self)

    def _try_release_lock(self) -> bool:
        try:
            fcntl.fcntl(self._probe, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, self._lock_offset))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        fcntl.fcntl(self._probe, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, self._lock_offset))
        return True

    def _released_within(self, seconds: float) -> bool:
        # Locks give no wake-up on release that covers mappings too: poll, backing off.
        end = time.monotonic() + seconds
        delay = 0.001
        while not self._try_release_lock():
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return True

    def _close_resources(self) -> None:
        self._domain.children.discard(self)
        probe, self._probe = self._probe, -1
        if probe >= 0:
            os.close(probe)


class SimDmabufImport(DmabufImport):
    """A sim dma-buf's pages granted to another domain (see the module docstring)."""

    def __init__(
        self, domain: SimDomain, domid: int, refs: tuple[int, ...], name: str, hold: int
    ) -> None:
        self._domain = domain
        self._granter = domain.domid
        self._epoch = domain.epoch
        self.domid = domid
        self.refs = refs
        self._name = name
        self._hold = hold
        domain.children.add(self)

    @property
    def closed(self) -> bool:
        return self._hold < 0

    def close(self) -> None:
        """End the grants and drop our hold on the buffer (idempotent)."""
        hold, self._hold = self._hold, -1
        if hold < 0:
            return
        os.close(hold)
        self._domain.children.discard(self)
        if self._domain.closed:
            return
        with self._domain.rt.write() as db:
            if self._epoch == self._domain.epoch:  # (else a restore revoked the grants)
                db.executemany(
                    "DELETE FROM grants WHERE domid=? AND ref=?",
                    [(self._granter, r) for r in self.refs],
                )
            drop_file_if_unused(db, self._name)

    def __del__(self) -> None:
        if getattr(self, "_hold", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        state = "closed" if self._hold < 0 else f"{len(self.refs)} pages"
        return f"<SimDmabufImport granted to domain {self.domid} {state}>"


def dmabuf_alloc(domain: SimDomain, count: int) -> int:
    """A new zeroed sim dma-buf of ``count`` pages: an unnamed memory file."""
    try:
        fd = os.open(_memory_dir(domain), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise_errno(
            exc.errno or errno.EIO,
            f"sim dma-buf: an unnamed file (O_TMPFILE) in {_memory_dir(domain)}",
        )
        raise
    try:
        os.ftruncate(fd, count * PAGE_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_memory_file(domain: SimDomain, fd: int, count: int) -> None:
    """EBADF, or EINVAL unless ``fd`` is a sim dma-buf of ``count`` pages."""
    what = f"sim gntdev DMABUF_IMP_TO_REFS of fd {fd}"
    try:
        st = os.fstat(fd)
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise_errno(exc.errno or errno.EBADF, what)
        raise
    link = link.removesuffix(" (deleted)")
    mdir = os.path.realpath(_memory_dir(domain))
    if not stat.S_ISREG(st.st_mode) or os.path.dirname(link) != mdir:
        raise_errno(
            errno.EINVAL,
            f"{what}: not a sim dma-buf (a descriptor of a memory file in {mdir}, from "
            "SimBackend.dmabuf_alloc or dmabuf_export)",
        )
    if st.st_size != count * PAGE_SIZE:
        raise_errno(
            errno.EINVAL,
            f"{what}: the buffer is {st.st_size} bytes, not {count} pages",
        )


def _link_fd(fd: int, name: str) -> None:
    """Give the file of ``fd`` the name ``name`` (linkat of ``/proc/self/fd/<fd>`` with
    AT_SYMLINK_FOLLOW, which Python uses only when given a directory descriptor)."""
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), name, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


def import_fd(domain: SimDomain, fd: int, domid: int, count: int) -> SimDmabufImport:
    _check_memory_file(domain, fd, count)
    name = domain.new_name("m")
    hold = os.dup(fd)
    try:
        with domain.rt.write() as db:
            refs = reserve_refs(db, domain, count, "importing a dma-buf of")
            try:
                _link_fd(hold, name)
            except OSError as exc:
                raise_errno(
                    errno.EINVAL if exc.errno == errno.ENOENT else exc.errno or errno.EIO,
                    f"sim gntdev DMABUF_IMP_TO_REFS of fd {fd}: cannot link its memory file "
                    "(a deleted one is no longer a sim dma-buf)",
                )
            try:
                db.executemany(
                    "INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (domain.domid, r, domid, 1, name, i * PAGE_SIZE, domain.bid)
                        for i, r in enumerate(refs)
                    ],
                )
            except BaseException:
                os.unlink(name)
                raise
    except BaseException:
        os.close(hold)
        raise
    return SimDmabufImport(domain, domid, refs, name, hold)


def export_refs(domain: SimDomain, domid: int, refs: tuple[int, ...]) -> SimDmabufExport:
    what = "sim gntdev DMABUF_EXP_FROM_REFS:"
    with domain.rt.write() as db:
        files = set()
        for i, ref in enumerate(refs):
            file, off = granted_page(db, domain, domid, ref, True, what)
            files.add(file if off == i * PAGE_SIZE else "")  # "": out of order, refused
        file = files.pop()
        fd = -1
        if not files and file:
            fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
            if os.fstat(fd).st_size != len(refs) * PAGE_SIZE:
                os.close(fd)
                fd = -1
        if fd < 0:
            raise_errno(
                errno.EINVAL,
                f"{what} the sim exports only all the pages of one share, in order (one "
                "descriptor cannot alias pages of several memory files)",
            )
    try:
        lock_offset = _LOCK_BASE + (domain.bid << 20) + next(_lock_numbers)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, lock_offset))
        probe = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return SimDmabufExport(domain, domid, refs, fd, probe, lock_offset)
