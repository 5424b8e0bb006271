"""SimBackend, kill_domain, restore_domain and the leak check (find_leftovers,
assert_cleaned_up)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import signal
import sqlite3
import time
import uuid
import warnings
import weakref
from collections.abc import Sequence
from typing import ClassVar

from anyio import ClosedResourceError

from ..._domid import DOMID_MAX, check_domid
from ..._exceptions import LocalProtocolError, raise_errno
from ..._process import proc_alive, self_start
from ..._resource import Closeable
from .._abc import Backend, CopySegment, check_import_args
from ._dmabuf import SimDmabufExport, SimDmabufImport, dmabuf_alloc, export_refs, import_fd
from ._domain import SimDomain
from ._events import SimEventPort, alloc_unbound, bind_interdomain
from ._grants import SimPages, grant_copy, map_refs, share_pages
from ._runtime import (
    Runtime,
    default_runtime_dir,
    follow_moves,
    leftovers,
    revoke_rows,
    send_dgram,
)
from ._store import SimStore, send_watch_events, watch_events

__all__ = [
    "SimBackend",
    "assert_cleaned_up",
    "domid_from_env",
    "find_leftovers",
    "kill_domain",
    "restore_domain",
]

_open_backends: weakref.WeakSet[SimBackend] = weakref.WeakSet()


def domid_from_env() -> int:
    """``$GNTIPC_SIM_DOMID`` (unset or empty: 0).

    Raises:
        LocalProtocolError: (a :class:`ValueError`) not a domid; the message names the
            variable.
    """
    raw = os.environ.get("GNTIPC_SIM_DOMID") or "0"
    try:
        return check_domid(int(raw))
    except ValueError:
        raise LocalProtocolError(
            f"GNTIPC_SIM_DOMID={raw!r} is not a domain id (a number, 0..{DOMID_MAX})"
        ) from None


def page_limit_from_env() -> int:
    """``$GNTIPC_SIM_PAGE_LIMIT`` (unset or empty: 1024, Xen's gntalloc default).

    Raises:
        LocalProtocolError: (a :class:`ValueError`) not a number >= 1; the message names
            the variable.
    """
    raw = os.environ.get("GNTIPC_SIM_PAGE_LIMIT") or "1024"
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise LocalProtocolError(
            f"GNTIPC_SIM_PAGE_LIMIT={raw!r} is not a page limit (a number >= 1)"
        ) from None
    return limit


#: The namespace of the UUIDs the sim derives for domains given none (uuid5 of the domid).
_VM_NAMESPACE = uuid.UUID("6e6f2b1c-9a3e-5c7d-8f20-67e7469706e3")


def _vm_identity_from(
    domid: int, vm_uuid: str | None, vm_name: str | None
) -> tuple[str | None, str | None]:
    """The identity asked for (arguments, else ``$GNTIPC_SIM_VM_UUID`` /
    ``$GNTIPC_SIM_VM_NAME`` for the domain ``$GNTIPC_SIM_DOMID`` names), checked: a
    canonical lower-case UUID and a name.

    Raises:
        LocalProtocolError: (a :class:`ValueError`) not a UUID, or a bad name; the
            message names the variable when it came from one.
    """
    env_domid = os.environ.get("GNTIPC_SIM_DOMID") or "0"
    from_env = env_domid.isdigit() and int(env_domid) == domid
    checked: list[str | None] = []
    for value, var, what in (
        (vm_uuid, "GNTIPC_SIM_VM_UUID", "vm_uuid"),
        (vm_name, "GNTIPC_SIM_VM_NAME", "vm_name"),
    ):
        source = what
        if value is None and from_env and os.environ.get(var):
            value, source = os.environ[var], var
        if value is None:
            checked.append(None)
            continue
        if what == "vm_uuid":
            try:
                checked.append(str(uuid.UUID(str(value))))
            except ValueError:
                raise LocalProtocolError(f"{source}={value!r} is not a UUID") from None
        elif not isinstance(value, str) or not value or len(value) > 255 or not value.isprintable():
            raise LocalProtocolError(
                f"{source}={value!r} is not a domain name (1..255 printable characters)"
            )
        else:
            checked.append(value)
    return checked[0], checked[1]


def _taken(db: sqlite3.Connection, key: str) -> set[bytes]:
    """The values of every domain's ``key`` node (``vm`` or ``name``)."""
    return {
        bytes(v)
        for (v,) in db.execute(
            "SELECT value FROM nodes WHERE path GLOB ?", (f"/local/domain/*/{key}",)
        )
    }


def _identity_nodes(
    db: sqlite3.Connection, domid: int, vm_uuid: str | None, vm_name: str | None
) -> list[tuple[str, bytes, str]]:
    """The toolstack's ``name`` and ``vm`` nodes of a new home of ``domid`` (path, value,
    perms): written by dom0, readable by the domain (as libxl makes them).  A UUID not
    given is derived from the domid (uuid5), a name is ``Domain-0`` or ``sim-<domid>``;
    each made unique among the domains of the store by a suffix if need be."""
    home = f"/local/domain/{domid}"
    perms = f"n0 r{domid}"
    if vm_uuid is None:
        taken = _taken(db, "vm")
        for k in range(DOMID_MAX + 2):
            vm_uuid = str(uuid.uuid5(_VM_NAMESPACE, f"{domid}.{k}" if k else str(domid)))
            if f"/vm/{vm_uuid}".encode() not in taken:
                break
    if vm_name is None:
        taken = _taken(db, "name")
        base = "Domain-0" if domid == 0 else f"sim-{domid}"
        vm_name = base
        for k in range(1, DOMID_MAX + 2):
            if vm_name.encode() not in taken:
                break
            vm_name = f"{base}.{k}"
    return [
        (f"{home}/name", vm_name.encode(), perms),
        (f"{home}/vm", f"/vm/{vm_uuid}".encode(), perms),
    ]


def _check_identity(
    db: sqlite3.Connection, domid: int, vm_uuid: str | None, vm_name: str | None
) -> None:
    """Raise LocalProtocolError if the existing domain ``domid`` is another VM than the
    one asked for."""
    home = f"/local/domain/{domid}"
    for key, want in (("vm", None if vm_uuid is None else f"/vm/{vm_uuid}"), ("name", vm_name)):
        if want is None:
            continue
        row = db.execute("SELECT value FROM nodes WHERE path=?", (f"{home}/{key}",)).fetchone()
        have = None if row is None else bytes(row[0]).decode(errors="replace")
        if have != want:
            raise LocalProtocolError(
                f"sim domain {domid} exists already with {key} {have!r}, not {want!r}"
                " (a domain's identity is set by its first backend)"
            )


class SimBackend(Backend):
    """A process playing domain ``domid`` of the simulated hypervisor.

    The first backend of a domain creates its store home, as the toolstack does: the
    ``domid`` key, and the toolstack's ``name`` and ``vm`` (``/vm/<uuid>``) keys, which
    stay with the VM across :func:`restore_domain`.

    A process that was part of a domain when :func:`restore_domain` moved it to a new
    domid is part of the new domain: a backend it opens for the old domid plays the new
    one (its old domid names no domain of its any more).

    Args:
        domid: our domain; default ``$GNTIPC_SIM_DOMID``, else 0.
        runtime_dir: the shared state directory; default ``$GNTIPC_SIM_DIR``, else
            ``$XDG_RUNTIME_DIR/gntipc-sim``, else ``/tmp/gntipc-sim-<uid>``.
        page_limit: the gntalloc limit of pages this domain may share at once; default
            ``$GNTIPC_SIM_PAGE_LIMIT``, else 1024 (Xen's default).
        vm_uuid: the VM's UUID, for a domain this backend creates; default
            ``$GNTIPC_SIM_VM_UUID`` (for the domain ``$GNTIPC_SIM_DOMID`` names), else one
            derived from the domid (uuid5, unique in the store).  For a domain that
            exists, an argument must match its UUID (the variable is then ignored).
        vm_name: the domain's name likewise (``$GNTIPC_SIM_VM_NAME``, else
            ``sim-<domid>``, ``Domain-0`` for dom0).

    Raises:
        ValueError: bad domid or page limit; ``vm_uuid`` not a UUID, a bad ``vm_name``
            (argument or variable), or an argument that differs from the identity of
            the existing domain.
        PermissionError: the runtime directory belongs to another user.
    """

    name: ClassVar[str] = "sim"

    def __init__(
        self,
        domid: int | None = None,
        *,
        runtime_dir: str | None = None,
        page_limit: int | None = None,
        vm_uuid: str | None = None,
        vm_name: str | None = None,
    ) -> None:
        domid = check_domid(domid) if domid is not None else domid_from_env()
        if page_limit is None:
            page_limit = page_limit_from_env()
        elif page_limit < 1:
            raise ValueError(f"page_limit must be >= 1, not {page_limit}")
        wanted = _vm_identity_from(domid, vm_uuid, vm_name)  # (with the environment's)
        asked = (
            wanted[0] if vm_uuid is not None else None,
            wanted[1] if vm_name is not None else None,
        )
        self._rt = Runtime(os.path.abspath(runtime_dir or default_runtime_dir()))
        try:
            self._rt.reap_dead()
            events: list[tuple[str, bytes]] = []
            me, start = os.getpid(), self_start()
            with self._rt.write() as db:
                self._rt.seen_restores = self._rt.restores()
                domid = follow_moves(db, me, start, domid)
                home = f"/local/domain/{domid}"
                cur = db.execute(
                    "INSERT INTO procs (pid, start, domid) VALUES (?, ?, ?)", (me, start, domid)
                )
                assert cur.lastrowid is not None
                bid = cur.lastrowid
                db.execute(
                    "INSERT INTO domains (domid, next_ref, dead) VALUES (?, NULL, 0) "
                    "ON CONFLICT(domid) DO UPDATE SET dead=0",
                    (domid,),
                )
                if db.execute("SELECT 1 FROM nodes WHERE path=?", (home,)).fetchone() is None:
                    db.executemany(
                        "INSERT INTO nodes VALUES (?, ?, ?, 1)",
                        [
                            (home, b"", f"n{domid}"),
                            (f"{home}/domid", str(domid).encode(), f"n{domid}"),
                            *_identity_nodes(db, domid, *wanted),
                        ],
                    )
                    events = watch_events(db, [home, "@introduceDomain"])
                else:
                    # (Inherited variables may name another VM: only arguments count.)
                    _check_identity(db, domid, *asked)
            send_watch_events(events)
        except BaseException:
            self._rt.close()
            raise
        # What our ports, pages, store and watches need of us (they never see self).
        self._domain = SimDomain(self._rt, bid, domid, page_limit)
        self.store = SimStore(self._domain)
        self._pid = os.getpid()
        _open_backends.add(self)

    @property
    def domid(self) -> int:
        """Our domain: after :func:`restore_domain` moved it, the new one."""
        domain = self._domain
        domain.sync()
        return domain.domid

    @domid.setter
    def domid(self, value: int) -> None:
        raise AttributeError("a sim backend's domid is set by the simulated hypervisor")

    @property
    def _children(self) -> set[Closeable]:
        """Our live resources (the leak check lists them)."""
        return self._domain.children

    def _check(self) -> None:
        if self._rt.closed:
            raise ClosedResourceError("the sim backend is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("a SimBackend cannot be used across fork(): open a new one")
        self._domain.sync()

    @property
    def page_limit(self) -> int:
        """The gntalloc limit: how many pages this domain may share at once."""
        return self._domain.page_limit

    @property
    def runtime_dir(self) -> str:
        """The shared state directory."""
        return self._rt.path

    def share(self, domid: int, count: int, *, writable: bool = True) -> SimPages:
        """See :meth:`Backend.share`.

        Raises:
            ValueError: ``count`` < 1 or ``domid`` out of range.
            XenError: ENOSPC past ``page_limit`` (the message names the knob).
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_domid(domid)
        if count < 1:
            raise ValueError(f"count must be >= 1, not {count}")
        return share_pages(self._domain, domid, count, writable)

    def map(self, domid: int, refs: Sequence[int], *, writable: bool = True) -> SimPages:
        """See :meth:`Backend.map`.

        Raises:
            ValueError: no refs, or ``domid`` out of range.
            XenError: EINVAL if a ref is not granted to us; EACCES if ``writable`` and a
                ref is granted read-only.
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_domid(domid)
        if not refs:
            raise ValueError("map needs at least one grant ref")
        return map_refs(self._domain, domid, [int(r) for r in refs], writable)

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """See :meth:`Backend.grant_copy`: GNTST_okay (0), GNTST_bad_domain (-2),
        GNTST_bad_gntref (-4), GNTST_permission_denied (-8), GNTST_bad_copy_arg (-10).

        Raises:
            LocalProtocolError: a segment has no (or two) foreign sides, or a bad local
                buffer.
            ClosedResourceError: the backend is closed.
        """
        self._check()
        return grant_copy(self._domain, segments)

    def dmabuf_alloc(self, count: int) -> int:
        """A new zeroed sim dma-buf of ``count`` pages, for :meth:`dmabuf_import` (the
        sim's stand-in for a driver's dma-buf, e.g. a vgem PRIME export).

        It is a descriptor of an unnamed memory file in the runtime directory, yours to
        close: the buffer lives while descriptors or mappings of it do (``mmap`` it to
        fill it; pass it to another process with ``socket.send_fds``).

        Raises:
            ValueError: ``count`` < 1.
            XenError: the runtime directory's file system has no ``O_TMPFILE``.
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_import_args(0, count)
        return dmabuf_alloc(self._domain, count)

    def dmabuf_export(self, domid: int, refs: Sequence[int]) -> SimDmabufExport:
        """See :meth:`Backend.dmabuf_export`.  The refs must be every page of one share
        of ``domid``, in order: the sim's dma-buf is one memory file (real PV Xen
        refuses every export; see :mod:`gntipc.backends.sim`).

        Raises:
            ValueError: no refs, or ``domid`` out of range.
            XenError: EINVAL if a ref is not granted to us, or the refs are not one whole
                share in order (the message says which); EACCES if one is read-only.
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_domid(domid)
        refs_t = tuple(int(r) for r in refs)
        if not refs_t:
            raise ValueError("dma-buf export needs at least one grant ref")
        return export_refs(self._domain, domid, refs_t)

    def dmabuf_import(self, fd: int, domid: int, count: int) -> SimDmabufImport:
        """See :meth:`Backend.dmabuf_import`.  ``fd`` must be a sim dma-buf: from
        :meth:`dmabuf_alloc` or an export's :meth:`~DmabufExport.fileno`.

        Raises:
            ValueError: ``count`` < 1, ``fd`` < 0, or ``domid`` out of range.
            XenError: EINVAL if ``fd`` is not a sim dma-buf or not ``count`` pages; EBADF
                if it is not open; ENOSPC past ``page_limit``.
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_domid(domid)
        check_import_args(fd, count)
        return import_fd(self._domain, fd, domid, count)

    def alloc_unbound(self, remote_domid: int) -> SimEventPort:
        """See :meth:`Backend.alloc_unbound`.  Raises ClosedResourceError if closed."""
        self._check()
        check_domid(remote_domid)
        return alloc_unbound(self._domain, remote_domid)

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> SimEventPort:
        """See :meth:`Backend.bind_interdomain`.

        Raises:
            XenError: EINVAL if the port is not unbound for us; ESRCH if its process
                died.
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_domid(remote_domid)
        return bind_interdomain(self._domain, remote_domid, remote_port)

    def close(self) -> None:
        """Close every resource still open (unmap notifications fire), unregister, and
        remove the runtime directory if we were the last.  Idempotent.

        Raises:
            MappingInUse: a mapping still has views; nothing was closed.
        """
        if self._rt.closed:
            return
        children = self._domain.children
        for p in [c for c in children if isinstance(c, SimPages)]:
            p.close()  # MappingInUse (views alive) leaves the rest open
        for c in list(children):
            c.close()
        self.store.close()
        with contextlib.suppress(Exception), self._rt.write() as db:
            self._rt.release(db, self._domain.bid, notify=False)
        self._rt.close()
        _open_backends.discard(self)

    @property
    def closed(self) -> bool:
        return self._rt.closed

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is not None and not rt.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        domain = getattr(self, "_domain", None)
        return f"<SimBackend domain {domain and domain.domid} in {self._rt.path}>"


def kill_domain(domid: int, runtime_dir: str | None = None, *, timeout: float = 5.0) -> list[int]:
    """Destroy simulated domain ``domid``, as ``xl destroy`` would.

    Every other process playing it (a process :func:`restore_domain` moved into it too,
    even with no backend open) is SIGKILLed *without* its unmap notifications; the
    ports connected to it silently revert to unbound (no event); its store home
    ``/local/domain/<domid>`` is removed and ``@releaseDomain`` fires.  The calling
    process is never killed (its own backends of that domain are left open).

    Returns:
        The pids killed.

    Raises:
        TimeoutError: a process did not exit within ``timeout`` seconds.
    """
    check_domid(domid)
    rt = Runtime(os.path.abspath(runtime_dir or default_runtime_dir()))
    try:
        me = os.getpid()
        with rt.write() as db:
            db.execute(
                "INSERT INTO domains (domid, next_ref, dead) VALUES (?, NULL, 1) "
                "ON CONFLICT(domid) DO UPDATE SET dead=1",
                (domid,),
            )
            victims = {
                (pid, start)
                for pid, start in db.execute(
                    "SELECT pid, start FROM procs WHERE domid=? "
                    "UNION SELECT pid, start FROM moves WHERE new=?",
                    (domid, domid),
                )
                if pid != me
            }
        pidfds = []
        for pid, start in victims:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if proc_alive(pid, start):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            pidfds.append(fd)
        deadline = time.monotonic() + timeout
        try:
            for fd in pidfds:
                left = max(0.0, deadline - time.monotonic())
                r, _, _ = select.select([fd], [], [], left)
                if not r:
                    raise TimeoutError(f"a process of domain {domid} survived SIGKILL")
        finally:
            for fd in pidfds:
                os.close(fd)
        with rt.write() as db:
            for (bid,) in db.execute(
                "SELECT bid FROM procs WHERE domid=? AND pid != ?", (domid, me)
            ).fetchall():
                rt.release(db, bid, notify=False)
            home = f"/local/domain/{domid}"
            db.execute(
                "DELETE FROM nodes WHERE path=? OR (path > ? AND path < ?)",
                (home, home + "/", home + "0"),
            )
            db.execute("UPDATE domains SET dead=0 WHERE domid=?", (domid,))
            events = watch_events(db, [home, "@releaseDomain"])
        send_watch_events(events)
        return sorted(p for p, _ in victims)
    finally:
        rt.close()


def _free_domid(db: sqlite3.Connection, domid: int) -> bool:
    """True if no process plays ``domid`` and it has no store home."""
    used = db.execute(
        "SELECT 1 FROM procs WHERE domid=? UNION ALL SELECT 1 FROM moves WHERE new=? "
        "UNION ALL SELECT 1 FROM nodes WHERE path=? LIMIT 1",
        (domid, domid, f"/local/domain/{domid}"),
    ).fetchone()
    return used is None


def _next_domid(db: sqlite3.Connection) -> int:
    """The domid after the highest one this runtime has known, as Xen's toolstack
    allocates them (wrapping around to the lowest free one)."""
    row = db.execute("SELECT MAX(domid) FROM domains").fetchone()
    top: int = 0 if row[0] is None else int(row[0])
    for candidate in itertools.chain(range(top + 1, DOMID_MAX + 1), range(1, top + 1)):
        if _free_domid(db, candidate):
            return candidate
    raise_errno(errno.ENOSPC, "sim: restore: every domid is in use")
    raise AssertionError  # unreachable


def restore_domain(
    domid: int,
    new_domid: int | None = None,
    runtime_dir: str | None = None,
    *,
    timeout: float = 5.0,
) -> int:
    """Do to simulated domain ``domid`` what ``xl save`` + ``xl restore`` (or a
    migration) does to a domain: the domain dies and the same VM comes back as domain
    ``new_domid``, its processes running on.

    For its peers, the domain dies as with :func:`kill_domain`: its ports are closed
    (theirs silently revert to unbound, no event), its grants are revoked (mappings of
    them stay valid, new maps fail), its home ``/local/domain/<domid>`` is removed and
    ``@releaseDomain`` fires.  No unmap notification is performed (a save performs
    none).  Then the new home is created with the same ``name`` and ``vm`` keys (the VM's
    identity) and ``@introduceDomain`` fires.

    Its processes are not stopped.  First comes the save: each backend of the domain,
    in any process (this one too), is woken (its ports and watches) and, at its next
    operation, takes its snapshot: its ports, grants and mappings of before are revoked
    (a notify raises ENOTCONN, a port's waiter sees one event then an unbound port) and
    its mappings are replaced in place by private copies (never unmapped under a call),
    so that nothing a peer writes after the save reaches it, as on Xen.  This waits for
    them, at most ``timeout`` seconds (a process that does not call its backend within
    it takes its snapshot later, and may see what its peers wrote meanwhile).  Then the
    restore: the peers see the death, and each backend, at its next operation, has the
    new ``domid``; its store watches stay and fire once, as when the guest's kernel
    registers them again.  A process of the domain that opens a backend for ``domid``
    later plays ``new_domid``.

    Args:
        domid: the domain to restore (not 0: dom0 is never saved).
        new_domid: its domid after the restore; default: the one after the highest
            domid this runtime has known (as Xen allocates them).
        runtime_dir: the runtime directory (default as for :class:`SimBackend`).
        timeout: how long the save waits for the domain's backends (seconds).

    Returns:
        The new domid.

    Raises:
        LocalProtocolError: (a :class:`ValueError`) ``domid`` is 0, ``new_domid`` is 0 or
            ``domid``, or either is out of range.
        XenError: ESRCH if no process plays ``domid``; EEXIST if ``new_domid`` is a
            domain already (a process plays it, or it has a store home).
    """
    check_domid(domid)
    if domid == 0:
        raise LocalProtocolError("sim: restore: domain 0 cannot be saved or restored")
    if new_domid is not None and check_domid(new_domid) in (0, domid):
        raise LocalProtocolError(
            f"sim: restore of domain {domid}: the new domid must be another domain's, "
            f"not {new_domid}"
        )
    rt = Runtime(os.path.abspath(runtime_dir or default_runtime_dir()))
    try:
        rt.reap_dead()
        # 1. The save: every backend of the domain takes its snapshot (detaches its
        #    pages) at its next call, before any peer can learn of the death.
        with rt.write() as db:
            bids, members = _domain_members(db, domid)
            if not members:
                raise_errno(errno.ESRCH, f"sim: restore: no process plays domain {domid}")
            if new_domid is not None:
                _check_free(db, domid, new_domid)
            db.executemany("INSERT OR REPLACE INTO saving VALUES (?, 0)", [(b,) for b in bids])
            wake, watches = _wake_ups(db, bids)
            rt.bump_restores()
        _send_wake_ups(wake, watches)  # (a spurious watch event: readers read again)
        for backend in list(_open_backends):  # ours cannot answer while we wait
            if backend.runtime_dir == rt.path and backend._domain.bid in bids:
                backend._domain.sync()
        _wait_saved(rt, bids, timeout)
        # 2. The restore: the domain dies for its peers, the VM is back as new_domid.
        with rt.write() as db:
            bids, members = _domain_members(db, domid)  # (maybe one more backend since)
            if new_domid is None:
                new_domid = _next_domid(db)
            else:
                _check_free(db, domid, new_domid)
            old_home, new_home = f"/local/domain/{domid}", f"/local/domain/{new_domid}"
            identity = {
                str(path).rsplit("/", 1)[1]: bytes(value)
                for path, value in db.execute(
                    "SELECT path, value FROM nodes WHERE path IN (?, ?)",
                    (f"{old_home}/name", f"{old_home}/vm"),
                )
            }
            wake, watches = _wake_ups(db, bids)  # (the kernel registers the watches again)
            for bid in bids:
                revoke_rows(db, bid, notify=False)  # a save performs no notification
            db.executemany("DELETE FROM saving WHERE bid=?", [(b,) for b in bids])
            db.executemany(
                "UPDATE procs SET domid=? WHERE bid=?", [(new_domid, bid) for bid in bids]
            )
            # Every domid a member played names its current domain: new_domid.
            db.execute("UPDATE moves SET new=? WHERE new=?", (new_domid, domid))
            db.executemany(
                "INSERT OR REPLACE INTO moves VALUES (?, ?, ?, ?)",
                [(pid, start, domid, new_domid) for pid, start in members],
            )
            db.execute("DELETE FROM moves WHERE old=new")  # (back to a domid it had)
            db.execute(
                "DELETE FROM nodes WHERE path=? OR (path > ? AND path < ?)",
                (old_home, old_home + "/", old_home + "0"),
            )
            db.execute(
                "INSERT INTO domains (domid, next_ref, dead) VALUES (?, NULL, 0) "
                "ON CONFLICT(domid) DO UPDATE SET dead=0",
                (new_domid,),
            )
            (gen,) = db.execute("UPDATE meta SET v = v + 1 WHERE k='gen' RETURNING v").fetchone()
            name = identity.get("name")
            vm = identity.get("vm")
            fresh = _identity_nodes(
                db,
                new_domid,
                None if vm is None else vm.decode(errors="replace").removeprefix("/vm/"),
                None if name is None else name.decode(errors="replace"),
            )
            db.executemany(
                "INSERT INTO nodes VALUES (?, ?, ?, ?)",
                [
                    (new_home, b"", f"n{new_domid}", gen),
                    (f"{new_home}/domid", str(new_domid).encode(), f"n{new_domid}", gen),
                    *[(path, value, perms, gen) for path, value, perms in fresh],
                ],
            )
            db.execute("UPDATE nodes SET gen=? WHERE path='/local/domain'", (gen,))
            watches += watch_events(db, [old_home, "@releaseDomain", new_home, "@introduceDomain"])
            rt.bump_restores()
        # Wake the revoked ports' waiters, then make the sockets unreachable: a peer's
        # notify through a cached name then fails and finds the port unbound.
        _send_wake_ups(wake, watches)
        for sock in wake:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)
        return new_domid
    finally:
        rt.close()


def _domain_members(db: sqlite3.Connection, domid: int) -> tuple[list[int], set[tuple[int, int]]]:
    """The live backends of ``domid`` and its live processes (those with a backend of
    it, and those a restore moved into it)."""
    bids = [
        int(bid)
        for bid, pid, start in db.execute(
            "SELECT bid, pid, start FROM procs WHERE domid=?", (domid,)
        ).fetchall()
        if proc_alive(pid, start)
    ]
    members = {
        (int(pid), int(start))
        for pid, start in db.execute(
            "SELECT pid, start FROM procs WHERE domid=? "
            "UNION SELECT pid, start FROM moves WHERE new=?",
            (domid, domid),
        ).fetchall()
        if proc_alive(pid, start)
    }
    return bids, members


def _check_free(db: sqlite3.Connection, domid: int, new_domid: int) -> None:
    if not _free_domid(db, new_domid):
        raise_errno(
            errno.EEXIST,
            f"sim: restore of domain {domid} as {new_domid}: domain {new_domid} exists",
        )


def _wake_ups(db: sqlite3.Connection, bids: list[int]) -> tuple[list[str], list[tuple[str, bytes]]]:
    """The port sockets of backends ``bids``, and an event for each of their watches."""
    marks = ",".join("?" * len(bids))
    ports = [
        str(sock) for (sock,) in db.execute(f"SELECT sock FROM ports WHERE bid IN ({marks})", bids)
    ]
    watches = [
        (str(sock), f"{path}\0{token}".encode())
        for path, token, sock in db.execute(
            f"SELECT path, token, sock FROM watches WHERE bid IN ({marks})", bids
        )
    ]
    return ports, watches


def _send_wake_ups(ports: list[str], watches: list[tuple[str, bytes]]) -> None:
    for sock in ports:
        send_dgram(sock, b"r")
    send_watch_events(watches)


def _wait_saved(rt: Runtime, bids: list[int], timeout: float) -> None:
    """Wait until every live backend of ``bids`` has taken its snapshot, at most
    ``timeout`` seconds (one that does not call its backend meanwhile takes it later)."""
    deadline = time.monotonic() + timeout
    wanted = set(bids)
    while True:
        with rt.lock:
            rows = rt.db.execute(
                "SELECT s.bid, p.pid, p.start FROM saving AS s JOIN procs AS p "
                "ON p.bid = s.bid WHERE s.done=0"
            ).fetchall()
        if not any(bid in wanted and proc_alive(pid, start) for bid, pid, start in rows):
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.002)


def find_leftovers(runtime_dir: str, *, all_runtimes: bool = False) -> list[str]:
    """What this process, or a dead one, left in the runtime directory ``runtime_dir``
    (absolute): the sim backends of this process still open there (in any runtime
    directory with ``all_runtimes``) with their pages, ports and watches, every row of the
    shared state that belongs to this process or to a dead one, and, when that is all
    clean and no process of the runtime lives, stray files.  Reaps dead processes first
    (that is the clean-up of a ``kill -9``).  Processes still running are not leftovers.
    """
    problems: list[str] = []
    for b in list(_open_backends):
        if not b.closed and (all_runtimes or b.runtime_dir == runtime_dir):
            problems.append(f"open {b!r}")
            problems.extend(f"  open {c!r}" for c in b._children)
    if not os.path.isdir(runtime_dir):
        return problems
    rt = Runtime(runtime_dir)
    try:
        rt.reap_dead()
        problems.extend(leftovers(rt))
        live = rt.db.execute("SELECT pid, start FROM procs").fetchall()
        if not problems and not any(proc_alive(p, s) for p, s in live):
            problems.extend(
                f"stray file {os.path.join(sub, f)}"
                for sub in ("m", "p", "w")
                for f in os.listdir(os.path.join(runtime_dir, sub))
            )
    finally:
        rt.close()
    return problems


def assert_cleaned_up(runtime_dir: str | None = None) -> None:
    """Check that this process left nothing open, and that dead processes' state has
    been reclaimed.

    Reaps dead processes first (that is the clean-up of a ``kill -9``), then lists
    open sim backends, pages, ports and watches of this process and every row of the
    shared state that belongs to this process or to a dead one (see
    :func:`find_leftovers`).

    Raises:
        AssertionError: with the list of leftovers.
    """
    path = os.path.abspath(runtime_dir or default_runtime_dir())
    problems = find_leftovers(path, all_runtimes=True)
    if problems:
        raise AssertionError("sim leftovers:\n" + "\n".join(problems))
