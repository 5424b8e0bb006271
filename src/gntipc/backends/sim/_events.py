"""Simulated event channels.

Each port has a bound unix datagram socket ``p/<bid>-<n>``; a notify is one
``sendto`` of one byte to the peer port's socket (one syscall + the receiver's
wake-up; a full queue counts as delivered, since events coalesce anyway).  The
``ports`` table records (domid, port) → remote domid, owner process, socket and the
peer port once bound; port numbers are per domain, smallest free first, like Xen's.

:meth:`SimEventPort.fileno` is an epoll fd holding the socket and, once the port is
connected, a pidfd of the peer process (:meth:`SimEventPort.add_to` registers those two
directly in a caller's epoll instead, one level less).  It becomes readable on an event
*and* when the peer process dies (even by SIGKILL, even if a forked child still holds
the peer's sockets): :meth:`SimEventPort.pending`, finding no event queued, then reaps
the dead process, which performs its registered unmap notifications (clears the byte
through the memory file, sends the event to this port), so the survivor sees the event
and the cleared byte.  Consuming an event is one ``recv`` (plus one that finds the
queue empty, so that events sent meanwhile coalesce).  A killed *domain*
(:func:`kill_domain`) performs none: the port just reverts to unbound, as on Xen.

A restore of our domain (:func:`~gntipc.backends.sim.restore_domain`) closes the port:
its row goes (the peer reverts to unbound, silently), its socket name is unlinked and it
gets a ``b"r"`` datagram, which wakes a waiter; :meth:`SimEventPort.pending` then
reports one event (so the waiter looks again), :meth:`~SimEventPort.status` says
``UNBOUND`` and :meth:`~SimEventPort.notify` raises ENOTCONN, as for a peer that is gone.

Masking follows the evtchn device: :meth:`pending` reporting an event masks the port;
events arriving while masked are latched (``pending`` says False) and redelivered, as
one, by :meth:`unmask`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import sqlite3
import threading
import warnings

from anyio import ClosedResourceError

from ..._exceptions import raise_errno
from ..._process import proc_alive, self_start
from .._abc import EventPort, PortState
from ._domain import SimDomain
from ._runtime import bind_dgram, send_dgram, unbind_port

__all__ = ["SimEventPort", "alloc_unbound", "bind_interdomain", "is_port_of"]


class SimEventPort(EventPort):
    """One end of a simulated event channel."""

    def __init__(
        self,
        domain: SimDomain,
        port: int,
        remote_domid: int,
        sock: socket.socket,
        path: str,
    ) -> None:
        self._domain = domain
        self._domid = domain.domid  # ours when bound (a restore changes the domain's)
        self._epoch = domain.epoch
        self._revoke_seen = False
        self.port = port
        self.remote_domid = remote_domid
        self._sock: socket.socket | None = sock
        self._path = path
        self._ep: select.epoll | None = select.epoll()
        self._ep.register(sock.fileno(), select.EPOLLIN)
        # Every epoll our descriptors are registered in (ours, and add_to()'s).
        self._eps: list[select.epoll] = [self._ep]
        self._peer_sock: str | None = None
        self._peer_pid = 0
        self._pidfd = -1
        self._masked = False
        self._latched = False
        self._lock = threading.Lock()  # guards the peer tracking against close()
        domain.children.add(self)

    # -- peer tracking ----------------------------------------------------------------
    def _set_peer(self, sock: str, pid: int, start: int) -> None:
        self._drop_pidfd()
        self._peer_sock = sock
        self._peer_pid = pid
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = -1
        if fd >= 0 and not proc_alive(pid, start):
            os.close(fd)
            fd = -1
        if fd < 0:
            # Gone already: an always-readable stand-in makes the loop call pending().
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            fd = r
        self._pidfd = fd
        for ep in self._eps:
            ep.register(fd, select.EPOLLIN)

    def _drop_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, -1
        if fd >= 0:
            for ep in self._eps:
                ep.unregister(fd)
            os.close(fd)
        self._peer_sock = None

    def _refresh(self) -> None:
        """Learn from the shared table whom we are connected to (peer may change).

        Under the port's lock: a notify from one thread may refresh while another closes
        the port (a pidfd opened after close() would leak)."""
        with self._lock:
            if self._sock is None:
                return
            if self._domain.revoked(self._epoch):
                self._drop_pidfd()
                return
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        rt = self._domain.rt
        with rt.lock:
            row = rt.db.execute(
                "SELECT p.sock, p.pid, p.start FROM ports AS me JOIN ports AS p "
                "ON p.domid = me.remote AND p.port = me.peer_port "
                "WHERE me.domid=? AND me.port=?",
                (self._domid, self.port),
            ).fetchone()
        if row is None:
            if self._peer_sock is not None:
                self._drop_pidfd()
        elif row[0] != self._peer_sock:
            self._set_peer(str(row[0]), int(row[1]), int(row[2]))

    def _peer_dead(self) -> bool:
        if self._pidfd < 0:
            return False
        r, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(r)

    def _reap_peer(self) -> None:
        self._domain.rt.reap_dead()
        self._refresh()

    # -- EventPort ----------------------------------------------------------------------
    def _live_sock(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise ClosedResourceError("the event port is closed")
        return sock

    def _revoked_now(self) -> bool:
        """True if a restore of our domain closed the port (then the peer pidfd goes)."""
        if not self._domain.revoked(self._epoch):
            return False
        with self._lock:
            if self._sock is not None:
                self._drop_pidfd()
        return True

    def fileno(self) -> int:
        """The epoll fd: readable on an event or when the peer process has died.

        Raises:
            ClosedResourceError: the port is closed.
        """
        self._live_sock()
        assert self._ep is not None
        return self._ep.fileno()

    def notify(self) -> None:
        """Send an event to the peer port (one datagram).

        Raises:
            XenError: ENOTCONN when the port is not connected (not yet bound, or the
                peer closed its end or died).
            ClosedResourceError: the port is closed.
        """
        self._live_sock()
        if self._domain.revoked(self._epoch):
            self._raise_revoked()
        peer = self._peer_sock
        if peer is None:
            self._refresh()
            peer = self._peer_sock
        if peer is not None and send_dgram(peer, b"e"):
            return
        # The cached peer is gone: it may have been replaced (a peer that unbound, then
        # another that bound, before we read the bind message).  Look again, and send to
        # the current peer if there is one: an event is never dropped for a stale cache.
        self._refresh()
        peer = self._peer_sock
        if peer is None or not send_dgram(peer, b"e"):
            raise_errno(
                errno.ENOTCONN,
                f"evtchn: notify port {self.port}: not connected to domain {self.remote_domid}",
            )

    def _raise_revoked(self) -> None:
        raise_errno(
            errno.ENOTCONN,
            f"evtchn: notify port {self.port}: closed by the restore of domain {self._domid}"
            f" (now domain {self._domain.domid})",
        )

    def pending(self) -> bool:
        """Consume a queued event; True if one is delivered (the port is then masked).

        One ``recv`` when an event is queued.  Only when none is, the peer's death is
        checked: a dead peer process is reaped first (its unmap notifications fire).

        Raises:
            ClosedResourceError: the port is closed.
        """
        sock = self._live_sock()
        if self._revoked_now():
            # The wake-up the restore sent, reported once as an event: the caller looks
            # again and finds the port unbound.
            self._drain(sock)
            if self._revoke_seen:
                return False
            self._revoke_seen = True
            self._masked = True
            return True
        got = self._latched
        for _ in range(8):  # bounded: each round consumes a datagram or reaps the peer
            try:
                msg = sock.recv(64)
            except BlockingIOError:
                if not self._peer_dead():
                    break
                self._reap_peer()  # sends us the unmap event, if one was registered
                continue
            if msg == b"e":
                # Events sent before this one was consumed are the same pending event
                # (they coalesce, as on Xen): drain them, one more recv when none are.
                got = True
                if self._drain(sock):
                    self._refresh()
                break
            self._refresh()  # b"b" / b"u": a peer bound or unbound
        if not got:
            return False
        if self._masked:
            self._latched = True
            return False
        self._latched = False
        self._masked = True
        return True

    @staticmethod
    def _drain(sock: socket.socket) -> bool:
        """Consume queued datagrams; True if a bind/unbind message was among them."""
        changed = False
        while True:
            try:
                msg = sock.recv(64)
            except BlockingIOError:
                return changed
            changed = changed or msg != b"e"

    def add_to(self, epoll: select.epoll) -> None:
        """Register the socket and the peer's pidfd directly in ``epoll``."""
        sock = self._live_sock()
        epoll.register(sock.fileno(), select.EPOLLIN)
        if self._pidfd >= 0:
            epoll.register(self._pidfd, select.EPOLLIN)
        self._eps.append(epoll)

    def remove_from(self, epoll: select.epoll) -> None:
        """Undo :meth:`add_to`."""
        if epoll not in self._eps:
            return
        self._eps.remove(epoll)
        if self._sock is not None:
            epoll.unregister(self._sock.fileno())
        if self._pidfd >= 0:
            epoll.unregister(self._pidfd)

    def unmask(self) -> None:
        """Unmask; an event latched while masked is delivered again (fd readable).

        Raises:
            ClosedResourceError: the port is closed.
        """
        sock = self._live_sock()
        self._masked = False
        if self._latched:
            send_dgram(self._path, b"e")
            self._latched = False
            del sock

    def status(self) -> PortState:
        """``INTERDOMAIN`` while connected to a live peer, else ``UNBOUND``.

        Raises:
            ClosedResourceError: the port is closed.
        """
        self._live_sock()
        if self._revoked_now():
            return PortState.UNBOUND
        self._refresh()
        if self._peer_dead():
            self._reap_peer()
        return PortState.INTERDOMAIN if self._peer_sock is not None else PortState.UNBOUND

    def close(self) -> None:
        """Unbind (idempotent): the peer port silently reverts to unbound."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is None:
            return
        self._domain.children.discard(self)
        # The socket goes first, the table row second: a peer still sending to its cached
        # copy of our socket then fails and looks the table up again, never delivering
        # an event to a port that is on its way out while its new peer waits.
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        if not self._domain.closed and not self._domain.revoked(self._epoch):
            with self._domain.rt.write() as db:
                if self._epoch == self._domain.epoch:  # (a restore just now took the row)
                    unbind_port(db, self._domid, self.port)
        with self._lock:
            self._drop_pidfd()
        ep, self._ep = self._ep, None
        self._eps.clear()
        if ep is not None:
            ep.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"<SimEventPort {self._domid}:{self.port} -> domain {self.remote_domid}>"


def is_port_of(port: EventPort, domain: SimDomain) -> bool:
    """True if ``port`` is a sim port created by the backend of ``domain``."""
    return isinstance(port, SimEventPort) and port._domain is domain


def _free_port(db: sqlite3.Connection, domid: int) -> int:
    used = {r[0] for r in db.execute("SELECT port FROM ports WHERE domid=?", (domid,))}
    port = 1
    while port in used:
        port += 1
    return port


def alloc_unbound(domain: SimDomain, remote_domid: int) -> SimEventPort:
    path = domain.new_name("p")
    sock = bind_dgram(path)
    try:
        with domain.rt.write() as db:
            port = _free_port(db, domain.domid)
            db.execute(
                "INSERT INTO ports VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (domain.domid, port, remote_domid, domain.bid, os.getpid(), self_start(), path),
            )
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    return SimEventPort(domain, port, remote_domid, sock, path)


def bind_interdomain(domain: SimDomain, remote_domid: int, remote_port: int) -> SimEventPort:
    path = domain.new_name("p")
    sock = bind_dgram(path)
    try:
        with domain.rt.write() as db:
            row = db.execute(
                "SELECT remote, peer_port, pid, start, sock FROM ports WHERE domid=? AND port=?",
                (remote_domid, remote_port),
            ).fetchone()
            if row is None or row[0] != domain.domid or row[1] is not None:
                raise_errno(
                    errno.EINVAL,
                    f"evtchn: bind to port {remote_port} of domain {remote_domid}: not an "
                    f"unbound port for domain {domain.domid}",
                )
            if not proc_alive(row[2], row[3]):
                raise_errno(
                    errno.ESRCH,
                    f"evtchn: bind to port {remote_port} of domain {remote_domid}: its "
                    "process is gone",
                )
            port = _free_port(db, domain.domid)
            db.execute(
                "INSERT INTO ports VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    domain.domid,
                    port,
                    remote_domid,
                    domain.bid,
                    os.getpid(),
                    self_start(),
                    path,
                    remote_port,
                ),
            )
            db.execute(
                "UPDATE ports SET peer_port=? WHERE domid=? AND port=?",
                (port, remote_domid, remote_port),
            )
            peer_sock, peer_pid, peer_start = str(row[4]), int(row[2]), int(row[3])
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    ev = SimEventPort(domain, port, remote_domid, sock, path)
    ev._set_peer(peer_sock, peer_pid, peer_start)
    send_dgram(peer_sock, b"b")  # wake the allocator so that it starts watching us
    return ev
