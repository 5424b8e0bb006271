"""A XenStore client speaking the wire protocol directly: connections over the unix
socket of ``xenstored`` (``/var/run/xenstored/socket``, dom0 only) or the kernel's
``/dev/xen/xenbus`` (any domain), and the :class:`XenStore`, transaction and watch
objects implementing :mod:`gntipc.backends._abc`.  The wire format (packing, replies,
errors, permission lists, the payload limit) is the sans-I/O codec of
:mod:`gntipc.backends.xen._xenstore_codec`.

Every request waits for its reply at most ``timeout`` seconds (default 10) and then
raises :class:`XenStoreTimeout`, also while the store keeps sending other messages; a
late reply is recognised by its ``req_id`` and discarded.  A request cut off by the
timeout half-written would make the store misread everything after it, so the connection
is then closed.  A connection serves one request at a time (a lock held for the whole
request) and may be closed from any thread: the close wakes a request blocked in another
thread (it raises ClosedResourceError) before it closes the descriptors, so the async
API's worker threads never poll a descriptor number that was closed and reused under
them.  Watch events arriving on a connection are queued, at most
:data:`MAX_QUEUED_EVENTS` of them (then the oldest are dropped: a watcher re-reads the
store on any event, so coalescing them loses nothing).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence

from anyio import ClosedResourceError

from ..._exceptions import (
    BackendUnavailable,
    RemoteProtocolError,
    XenError,
    XenStoreTimeout,
    raise_errno,
)
from .._abc import Buffer, Perm, Store, Transaction, Watch
from ._xenstore_codec import (
    XENBUS_PAYLOAD_MAX,
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Message,
    MsgType,
    check_reply,
    encode_message,
    encode_path,
    encode_string,
    format_perms,
    join_strings,
    parse_perms,
    parse_watch_event,
    split_strings,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_QUEUED_EVENTS",
    "SOCKET_PATH",
    "XENBUS_PATH",
    "XenStore",
]

#: The unix socket of xenstored (dom0).
SOCKET_PATH = "/var/run/xenstored/socket"
#: The kernel's XenStore device (every domain).
XENBUS_PATH = "/dev/xen/xenbus"
#: Seconds a request waits for its reply.
DEFAULT_TIMEOUT = 10.0
#: Watch events a connection queues at most (the oldest are dropped beyond it); also the
#: most messages one :meth:`XenWatch.read_events` reads.
MAX_QUEUED_EVENTS = 1024

# Watch tokens must be non-empty on the wire; an empty user token is sent as this.
_EMPTY_TOKEN = "gntipc-watch"

# ---------------------------------------------------------------------- transport


class _Connection:
    """One connection to xenstored: requests, replies, queued watch events."""

    def __init__(self, timeout: float, path: str | None = None) -> None:
        self.timeout = timeout
        # Held for a whole request (and by close()): one thread at a time talks on it.
        # Reentrant: a request cut off half-written closes the connection under it.
        self._lock = threading.RLock()
        self._decoder = Decoder()
        self._next_req = 1
        self.events: deque[tuple[str, str]] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._sock: socket.socket | None = None
        self.fd = -1
        self._closed_why = "closed"
        self.transport = ""
        self.payload_max = XENSTORE_PAYLOAD_MAX
        # Every wait of a request also waits on this eventfd, so that close() from
        # another thread wakes a request blocked on a silent store (an async caller that
        # timed out leaves its worker thread there) instead of waiting for its timeout.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._open(path)
        except BaseException:
            os.close(self._wake)
            self._wake = -1
            raise

    def _open(self, path: str | None) -> None:
        candidates = [path] if path is not None else [SOCKET_PATH, XENBUS_PATH]
        problems = []
        for cand in candidates:
            try:
                st = os.stat(cand)
            except OSError as exc:
                problems.append(f"{cand}: {exc.strerror}")
                continue
            try:
                if cand.endswith("socket") or _is_socket(st.st_mode):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        sock.connect(cand)
                    except OSError:
                        sock.close()
                        raise
                    sock.setblocking(False)
                    self._sock = sock
                    self.fd = sock.fileno()
                else:
                    self.fd = os.open(cand, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                    self.payload_max = XENBUS_PAYLOAD_MAX
            except OSError as exc:
                problems.append(f"{cand}: {exc.strerror}")
                continue
            self.transport = cand
            return
        raise BackendUnavailable(
            "cannot connect to XenStore (" + "; ".join(problems) + ")"
            " — is this a Xen domain with xenstored running (and are we root in dom0)?"
        )

    def close(self, why: str = "closed") -> None:
        """Close (idempotent, from any thread).  A request blocked in another thread is
        woken and raises ClosedResourceError; the descriptors are closed only after it
        let go of them, so that it never touches a reused descriptor number."""
        if self._wake >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)
        with self._lock:
            if self.fd >= 0:
                self._closed_why = why
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            elif self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
            wake, self._wake = self._wake, -1
            if wake >= 0:
                os.close(wake)

    def _live_fd(self) -> int:
        if self.fd < 0:
            raise ClosedResourceError(f"the XenStore connection is {self._closed_why}")
        return self.fd

    def _wait(self, fd: int, events: int, deadline: float, what: str) -> None:
        """Wait until ``fd`` is ready for ``events``.

        Raises:
            XenStoreTimeout: past ``deadline``.
            ClosedResourceError: close() was called meanwhile (from another thread).
        """
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._wake, select.POLLIN)
        ready = poller.poll(self._remaining_ms(deadline, what))
        if any(rfd == self._wake for rfd, _ in ready):
            raise ClosedResourceError(f"the XenStore connection was closed during {what}")
        if not ready:
            self._timeout(what)

    def _write_all(self, data: bytes, deadline: float, what: str) -> None:
        """Write one whole request.

        Raises:
            XenStoreTimeout: not written in time.  If part of it was, the connection is
                closed: the store would take our next request for the rest of this one.
            XenError: the write failed (the connection is closed likewise).
        """
        fd = self._live_fd()
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    raise_errno(exc.errno or errno.EIO, f"XenStore {what}: writing the request")
                view = view[n:]
                if view:
                    self._wait(fd, select.POLLOUT, deadline, what)
        except BaseException:
            if len(view) < len(data):
                self.close(f"closed: a request ({what}) was cut off half-written")
            raise

    def _remaining_ms(self, deadline: float, what: str) -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            self._timeout(what)
        return max(1, int(left * 1000))

    def _timeout(self, what: str) -> None:
        raise XenStoreTimeout(
            f"XenStore {what}: no reply within {self.timeout:g} s via {self.transport}"
        )

    def read_some(self, block_until: float | None, what: str) -> list[Message] | None:
        """Read at most the rest of one message and return what it completed (maybe
        [] after a partial read).  Non-blocking when ``block_until`` is None: None if
        nothing was readable.  Raises XenStoreTimeout past the deadline."""
        fd = self._live_fd()
        while True:
            try:
                data = os.read(fd, self._decoder.needed())
            except BlockingIOError:
                data = None
            except OSError as exc:
                raise_errno(exc.errno or errno.EIO, f"XenStore {what}: reading the reply")
            if data is not None:
                if not data:
                    raise_errno(
                        errno.ECONNRESET, f"XenStore {what}: {self.transport} closed the connection"
                    )
                return self._decoder.feed(data)
            if block_until is None:
                return None
            self._wait(fd, select.POLLIN, block_until, what)

    def _absorb(self, msg: Message) -> None:
        """Queue a watch event (the queue is bounded); drop stale replies (of timed-out
        requests)."""
        if msg.type == MsgType.WATCH_EVENT:
            self.events.append(parse_watch_event(msg.payload))

    def request(self, msg_type: int, payload: bytes, tx_id: int = 0, *, what: str) -> bytes:
        """Send one request, wait for its reply, return the reply payload.

        Raises:
            ValueError: payload too long.
            XenError: xenstored answered with an error.
            XenStoreTimeout: no reply in time (even if the store keeps sending other
                messages); the connection is closed if the request was cut off.
            ClosedResourceError: the connection is closed.
        """
        with self._lock:
            req_id = self._next_req
            self._next_req = self._next_req % 0xFFFFFFFF + 1
            data = encode_message(msg_type, req_id, tx_id, payload, payload_max=self.payload_max)
            deadline = time.monotonic() + self.timeout
            self._write_all(data, deadline, what)
            while True:
                for msg in self.read_some(deadline, what) or ():
                    if msg.type != MsgType.WATCH_EVENT and msg.req_id == req_id:
                        return check_reply(msg, msg_type, what)
                    self._absorb(msg)
                # read_some times out only when it has to wait: a store that always has
                # something else to say must not keep us here.
                if time.monotonic() >= deadline:
                    self._timeout(what)

    def drain(self) -> None:
        """Queue the events readable now, without blocking: at most about
        :data:`MAX_QUEUED_EVENTS` messages, so that a store that never stops sending
        cannot keep us here (the descriptor stays readable for the rest)."""
        with self._lock:
            # Each read gets at most the rest of one message (a header or a payload).
            for _ in range(2 * MAX_QUEUED_EVENTS):
                msgs = self.read_some(None, "reading watch events")
                if msgs is None:
                    # nothing readable now (the rest of a partial message makes the fd
                    # readable again when it arrives)
                    return
                for msg in msgs:
                    self._absorb(msg)


def _is_socket(mode: int) -> bool:
    import stat

    return stat.S_ISSOCK(mode)


# --------------------------------------------------------------------- store API


class _Ops:
    """The store operations over a connection and a transaction id."""

    _tx_id: int

    def _c(self) -> _Connection:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        """The value of ``path``.

        Raises:
            XenError: ENOENT if absent, EACCES if denied.
            XenStoreTimeout: no reply in time.
        """
        return self._c().request(
            MsgType.READ, encode_path(path) + b"\0", self._tx_id, what=f"read {path!r}"
        )

    def write(self, path: str, value: bytes) -> None:
        """Create or replace ``path`` (missing parents are created).

        Raises:
            ValueError: path and value exceed the 4096-byte payload limit.
            XenError: EACCES if denied, EINVAL for a bad path.
        """
        if not isinstance(value, Buffer):
            raise TypeError(f"a XenStore value must be bytes, not {type(value).__name__}")
        self._c().request(
            MsgType.WRITE,
            encode_path(path) + b"\0" + bytes(value),
            self._tx_id,
            what=f"write {path!r}",
        )

    def rm(self, path: str) -> None:
        """Remove ``path`` and its children; absent is not an error.

        Raises:
            XenError: EACCES if denied.
        """
        try:
            self._c().request(
                MsgType.RM, encode_path(path) + b"\0", self._tx_id, what=f"rm {path!r}"
            )
        except XenError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def directory(self, path: str) -> list[str]:
        """The children of ``path``.

        Raises:
            XenError: ENOENT if absent, EACCES if denied.
        """
        reply = self._c().request(
            MsgType.DIRECTORY, encode_path(path) + b"\0", self._tx_id, what=f"directory {path!r}"
        )
        return [name for name in split_strings(reply) if name]

    def get_perms(self, path: str) -> list[Perm]:
        """The permission list of ``path``, owner first.

        Raises:
            XenError: ENOENT if absent, EACCES if denied.
        """
        reply = self._c().request(
            MsgType.GET_PERMS, encode_path(path) + b"\0", self._tx_id, what=f"get_perms {path!r}"
        )
        return parse_perms(reply)

    def set_perms(self, path: str, perms: Sequence[Perm]) -> None:
        """Replace the permission list of ``path``.

        Raises:
            ValueError: empty or malformed list.
            XenError: ENOENT if absent, EACCES/EPERM if not the owner (or dom0).
        """
        self._c().request(
            MsgType.SET_PERMS,
            encode_path(path) + b"\0" + format_perms(perms),
            self._tx_id,
            what=f"set_perms {path!r}",
        )


class XenTransaction(_Ops, Transaction):
    """A XenStore transaction on the store's connection (see :class:`Transaction`)."""

    def __init__(self, store: XenStore) -> None:
        conn = store._c()
        reply = conn.request(MsgType.TRANSACTION_START, b"\0", what="transaction start")
        try:
            self._tx_id = int(split_strings(reply)[0])
        except (IndexError, ValueError) as exc:
            raise RemoteProtocolError(f"XenStore sent a bad transaction id {reply!r}") from exc
        self._store: XenStore | None = store
        self._conn = conn

    def _c(self) -> _Connection:
        if self._store is None:
            raise ClosedResourceError("the XenStore transaction is finished")
        return self._store._c()

    def _end(self, commit: bool) -> None:
        conn = self._c()
        self._store = None
        conn.request(
            MsgType.TRANSACTION_END,
            b"T\0" if commit else b"F\0",
            self._tx_id,
            what="transaction commit" if commit else "transaction abort",
        )

    def commit(self) -> None:
        """Commit; afterwards the transaction is finished either way.

        Raises:
            XenError: EAGAIN when another writer conflicted (retry the transaction).
            ClosedResourceError: already committed or aborted.
        """
        self._end(True)

    def abort(self) -> None:
        """Discard the transaction (idempotent)."""
        if self._store is None or self._store._conn is None:
            self._store = None
            return
        with contextlib.suppress(XenError, XenStoreTimeout):
            self._end(False)  # the transaction is gone either way when this fails

    def __del__(self) -> None:
        if getattr(self, "_store", None) is not None:
            warnings.warn(f"unfinished {self!r}", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):
                self.abort()


class XenWatch(Watch):
    """A watch on its own XenStore connection.

    :meth:`fileno` is an epoll descriptor over the connection and an eventfd, so it is
    readable whenever events are queued — also the ones that arrived together with the
    reply to XS_WATCH (the kernel's xenbus device may deliver the initial event first).
    """

    def __init__(self, path: str, token: str, *, timeout: float, transport: str | None) -> None:
        self._token = token
        wire_token = token or _EMPTY_TOKEN
        payload = join_strings([encode_path(path), encode_string(wire_token, "watch token")])
        self._conn: _Connection | None = _Connection(timeout, transport)
        self._epoll: select.epoll | None = None
        self._efd = -1
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._epoll = select.epoll()
            self._epoll.register(self._conn.fd, select.EPOLLIN)
            self._epoll.register(self._efd, select.EPOLLIN)
            self._conn.request(MsgType.WATCH, payload, what=f"watch {path!r}")
            if self._conn.events:
                os.eventfd_write(self._efd, 1)
        except BaseException:
            self.close()
            raise
        self.path = path

    def fileno(self) -> int:
        """Readable when events are queued.

        Raises:
            ClosedResourceError: the watch is closed.
        """
        if self._epoll is None:
            raise ClosedResourceError("the XenStore watch is closed")
        return self._epoll.fileno()

    def read_events(self) -> list[tuple[str, str]]:
        """Queued ``(path, token)`` events, without blocking.

        Raises:
            ClosedResourceError: the watch is closed.
            XenError: the connection to xenstored broke.
        """
        conn = self._conn
        if conn is None:
            raise ClosedResourceError("the XenStore watch is closed")
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        conn.drain()
        out = []
        while conn.events:
            path, token = conn.events.popleft()
            out.append((path, self._token if token == _EMPTY_TOKEN and not self._token else token))
        return out

    def close(self) -> None:
        """Remove the watch (closing its connection); idempotent."""
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __del__(self) -> None:
        if getattr(self, "_conn", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


class XenStore(_Ops, Store):
    """A connection to this domain's XenStore.

    Args:
        path: the socket or device to use (default: ``/var/run/xenstored/socket`` when it
            can be opened, else ``/dev/xen/xenbus``).
        timeout: seconds each request waits for its reply.

    Raises:
        BackendUnavailable: neither transport can be opened, or our domid is unknown.
    """

    def __init__(self, *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self._tx_id = 0
        self._conn: _Connection | None = _Connection(timeout, path)
        self._transport_path = path
        self.timeout = timeout
        try:
            self.domid = self._read_domid()
        except BaseException:
            self.close()
            raise

    @property
    def transport(self) -> str:
        """The socket or device path this store talks through."""
        return self._c().transport

    def _read_domid(self) -> int:
        try:
            raw = self.read("domid")
        except XenError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES):
                raise
            if _is_dom0():
                return 0
            raise BackendUnavailable(
                "cannot tell our domid: the XenStore node 'domid' of this domain is absent"
            ) from exc
        try:
            return int(raw.rstrip(b"\0").decode("ascii"))
        except ValueError as exc:
            raise RemoteProtocolError(f"XenStore node 'domid' holds {raw!r}") from exc

    def _c(self) -> _Connection:
        conn = self._conn
        if conn is None:
            raise ClosedResourceError("the XenStore connection is closed")
        return conn

    def transaction(self) -> XenTransaction:
        """Start a transaction (commit raises XenError(EAGAIN) on conflict)."""
        return XenTransaction(self)

    def watch(self, path: str, token: str = "") -> XenWatch:
        """Watch ``path`` and below on a new connection; fires once at once.

        Raises:
            XenError: EACCES/ENOENT/EINVAL from xenstored.
        """
        self._c()
        return XenWatch(path, token, timeout=self.timeout, transport=self._transport_path)

    def get_domain_path(self, domid: int) -> str:
        """The XenStore home of ``domid`` (``/local/domain/<domid>``)."""
        reply = self._c().request(
            MsgType.GET_DOMAIN_PATH, join_strings([str(domid)]), what="get_domain_path"
        )
        return split_strings(reply)[0]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __del__(self) -> None:
        if getattr(self, "_conn", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


def _is_dom0() -> bool:
    try:
        with open("/proc/xen/capabilities") as f:
            return "control_d" in f.read()
    except OSError:
        return False
