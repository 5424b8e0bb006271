"""SimBackend, kill_domain and the leak check (find_leftovers, assert_cleaned_up)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import ClassVar

from anyio import ClosedResourceError

from ..._domid import DOMID_MAX, check_domid
from ..._exceptions import LocalProtocolError
from ..._process import proc_alive, self_start
from ..._resource import Closeable
from .._abc import Backend, CopySegment, check_import_args
from ._dmabuf import SimDmabufExport, SimDmabufImport, dmabuf_alloc, export_refs, import_fd
from ._domain import SimDomain
from ._events import SimEventPort, alloc_unbound, bind_interdomain
from ._grants import SimPages, grant_copy, map_refs, share_pages
from ._runtime import Runtime, default_runtime_dir, leftovers
from ._store import SimStore, send_watch_events, watch_events

__all__ = ["SimBackend", "assert_cleaned_up", "domid_from_env", "find_leftovers", "kill_domain"]

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


class SimBackend(Backend):
    """A process playing domain ``domid`` of the simulated hypervisor.

    Args:
        domid: our domain; default ``$GNTIPC_SIM_DOMID``, else 0.
        runtime_dir: the shared state directory; default ``$GNTIPC_SIM_DIR``, else
            ``$XDG_RUNTIME_DIR/gntipc-sim``, else ``/tmp/gntipc-sim-<uid>``.
        page_limit: the gntalloc limit of pages this domain may share at once; default
            ``$GNTIPC_SIM_PAGE_LIMIT``, else 1024 (Xen's default).

    Raises:
        ValueError: bad domid or page limit.
        PermissionError: the runtime directory belongs to another user.
    """

    name: ClassVar[str] = "sim"

    def __init__(
        self,
        domid: int | None = None,
        *,
        runtime_dir: str | None = None,
        page_limit: int | None = None,
    ) -> None:
        self.domid = domid = check_domid(domid) if domid is not None else domid_from_env()
        if page_limit is None:
            page_limit = page_limit_from_env()
        elif page_limit < 1:
            raise ValueError(f"page_limit must be >= 1, not {page_limit}")
        self._rt = Runtime(os.path.abspath(runtime_dir or default_runtime_dir()))
        try:
            self._rt.reap_dead()
            home = f"/local/domain/{domid}"
            events: list[tuple[str, bytes]] = []
            with self._rt.write() as db:
                cur = db.execute(
                    "INSERT INTO procs (pid, start, domid) VALUES (?, ?, ?)",
                    (os.getpid(), self_start(), domid),
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
                        ],
                    )
                    events = watch_events(db, [home, "@introduceDomain"])
            send_watch_events(events)
        except BaseException:
            self._rt.close()
            raise
        # What our ports, pages, store and watches need of us (they never see self).
        self._domain = SimDomain(self._rt, bid, self.domid, page_limit)
        self.store = SimStore(self._domain)
        self._pid = os.getpid()
        _open_backends.add(self)

    @property
    def _children(self) -> set[Closeable]:
        """Our live resources (the leak check lists them)."""
        return self._domain.children

    def _check(self) -> None:
        if self._rt.closed:
            raise ClosedResourceError("the sim backend is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("a SimBackend cannot be used across fork(): open a new one")

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
        return f"<SimBackend domain {self.domid} in {self._rt.path}>"


def kill_domain(domid: int, runtime_dir: str | None = None, *, timeout: float = 5.0) -> list[int]:
    """Destroy simulated domain ``domid``, as ``xl destroy`` would.

    Every other process playing it is SIGKILLed *without* its unmap notifications; the
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
                for pid, start in db.execute("SELECT pid, start FROM procs WHERE domid=?", (domid,))
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
