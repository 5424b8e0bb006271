"""The vchan endpoint: libxenvchan-compatible rings on grant pages, over any backend.

:class:`Vchan` is one end of a channel, synchronous, in libxenvchan's vocabulary
(read/write = stream, send/recv = packet).  Every operation has a non-waiting form
(``*_nowait``) that the async layer builds on, and a blocking form for scripts and threads.

Setup, byte-exact with libxenvchan (see ``protocol._layout``):

* server: allocate an unbound port for the client, share the control page with an unmap
  notification on ``srv_live``, write orders/grants/live/notify bytes, share the external
  ring pages, publish ``ring-ref`` and ``event-channel`` in one store transaction readable
  by the client;
* client: read the keys, bind the port (the bind is the atomic claim: a second client
  racing on the same keys fails there, cleanly), map the control page with an unmap
  notification on ``cli_live``, validate the geometry, map its read ring read-only and its
  write ring writable, set ``cli_live = 1`` and ``srv_notify = WRITE``, notify.

Liveness:

* clean close: the EOF bit (gntipc extension), then our live byte = 0, then an event;
* process crash: the kernel (or the simulator) fires the unmap notification: the live
  byte is cleared and an event sent;
* domain death sends nothing.  Each gntipc endpoint publishes a *presence node* in its own
  domain's store home, readable by the peer, and watches the peer's: the toolstack removes
  a dead domain's home, the watch fires, the node is gone while the live byte still says
  1: the peer domain died.  This works for both roles, in dom0 and in a domU.  A plain
  libxenvchan peer publishes no presence node; its domain's death is then not detected.

A reader always checks liveness first and drains second, so no byte written before a
close or a crash is lost.
"""

from __future__ import annotations

import contextlib
import errno
import select
import threading
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock

from ._exceptions import GntipcError, LocalProtocolError, RemoteProtocolError, XenError
from ._native import ffi
from .backends._abc import Backend, EventPort, Pages, Perm, Watch
from .protocol._layout import (
    CONTROL_PAGE_SIZE,
    LIVE_CONNECTED,
    LIVE_GONE,
    LIVE_WAITING,
    NOTIFY_WRITE,
    OFF_CLI_LIVE,
    OFF_CLI_NOTIFY,
    OFF_SRV_LIVE,
    Geometry,
    choose_orders,
)
from .protocol.ring import VchanRings

__all__ = ["DEFAULT_RING_SIZE", "Vchan"]

DEFAULT_RING_SIZE = 65536
_MAX_PORT = (1 << 17) - 1  # EVTCHN_FIFO_NR_CHANNELS - 1
_STORE_RETRIES = 16


def _parse_uint(raw: bytes, what: str, limit: int) -> int:
    """A decimal number published by the peer, validated."""
    text = raw.split(b"\0", 1)[0]
    if not text.isdigit() or len(text) > 10 or int(text) > limit:
        raise RemoteProtocolError(f"the server published an invalid {what}: {raw[:32]!r}")
    return int(text)


class Vchan:
    """One end of a vchan.  Use :meth:`server` or :meth:`client` to make one.

    Thread-safety: one reader thread and one writer thread may use it at once.
    """

    backend: Backend
    peer: int
    path: str
    is_server: bool
    read_size: int
    write_size: int
    _closed: bool
    _eof_sent: bool
    _peer_dead: bool
    _connected: bool
    _peer_gntipc: bool
    _port: EventPort | None
    _pages: list[Pages]
    _ptrs: list[Any]
    _rings: VchanRings | None
    _watch: Watch | None
    _peer_presence: str | None
    _presence: str | None
    _published_ref: int | None
    _epoll: select.epoll | None
    _cond: threading.Condition
    _polling: bool
    _gen: int

    def __init__(self) -> None:  # pragma: no cover - use server()/client()
        raise TypeError("use Vchan.server() or Vchan.client()")

    # ------------------------------------------------------------------ setup ---
    @staticmethod
    def resolve_path(server_domid: int, path: str) -> str:
        """An absolute store path: a relative ``path`` is relative to the server's home
        ``/local/domain/<server_domid>``.

        Raises:
            LocalProtocolError: an empty path or one with empty components.
        """
        if not path or "//" in path or path.endswith("/") or "\0" in path:
            raise LocalProtocolError(f"invalid store path {path!r}")
        if path.startswith("/"):
            return path
        return f"/local/domain/{server_domid}/{path}"

    @classmethod
    def _blank(cls, backend: Backend, peer: int, path: str, *, is_server: bool) -> Vchan:
        self = object.__new__(cls)
        self.backend = backend
        self.peer = peer
        self.path = path
        self.is_server = is_server
        self._closed = False
        self._eof_sent = False
        self._peer_dead = False
        self._connected = not is_server
        self._peer_gntipc = False
        self._port = None
        self._pages = []
        self._ptrs = []
        self._rings = None
        self._watch = None
        self._peer_presence = None
        self._presence = None
        self._published_ref = None
        self._epoll = None
        self._cond = threading.Condition()
        self._polling = False
        self._gen = 0
        return self

    @classmethod
    def server(
        cls,
        backend: Backend,
        peer: int,
        path: str,
        *,
        read_size: int = DEFAULT_RING_SIZE,
        write_size: int = DEFAULT_RING_SIZE,
        start_index: int = 0,
    ) -> Vchan:
        """Offer a channel to domain ``peer`` at store ``path`` and return at once.

        :meth:`is_open` is 2 until a client connects.  Ring sizes are rounded up to
        libxenvchan's choice of orders (up to 1 MiB each way).  ``start_index`` sets the
        initial ring indices (tests use it to cross the u32 wrap).

        Raises:
            LocalProtocolError: a bad path or a ring size above 1 MiB.
            XenError: the backend refused (e.g. ENOSPC: the gntalloc page limit).
        """
        _check_domid(peer)
        left, right = choose_orders(read_size, write_size)
        geometry = Geometry.from_orders(left, right, remote=False)
        self = cls._blank(backend, peer, cls.resolve_path(backend.domid, path), is_server=True)
        try:
            self._setup_server(geometry, start_index & 0xFFFFFFFF)
        except BaseException:
            self._teardown()
            raise
        return self

    def _setup_server(self, geometry: Geometry, start: int) -> None:
        backend, peer = self.backend, self.peer
        port = self._port = backend.alloc_unbound(peer)
        ctrl = backend.share(peer, 1)
        self._pages.append(ctrl)
        ctrl.set_unmap_notify(OFF_SRV_LIVE, clear_byte=True, port=port)
        left = right = None
        if geometry.left_pages:
            left = backend.share(peer, geometry.left_pages)
            self._pages.append(left)
        if geometry.right_pages:
            right = backend.share(peer, geometry.right_pages)
            self._pages.append(right)
        page = ctrl.mapping.view()
        try:
            page[:CONTROL_PAGE_SIZE] = bytes(CONTROL_PAGE_SIZE)
            if start:
                for off in (0, 4, 8, 12):
                    page[off : off + 4] = start.to_bytes(4, "little")
            geometry.write_to(page)
            geometry.write_grants(page, left.refs if left else (), right.refs if right else ())
            page[OFF_CLI_LIVE] = LIVE_WAITING
            page[OFF_SRV_LIVE] = LIVE_CONNECTED
            page[OFF_CLI_NOTIFY] = NOTIFY_WRITE
        finally:
            page.release()
        ctrl_ptr = self._pointer(ctrl)
        read_ptr = self._pointer(left) if left else ctrl_ptr + geometry.left_offset
        write_ptr = self._pointer(right) if right else ctrl_ptr + geometry.right_offset
        self.read_size, self.write_size = geometry.left_size, geometry.right_size
        self._rings = VchanRings(
            ctrl_ptr, read_ptr, self.read_size, write_ptr, self.write_size, is_server=True
        )
        self._make_epoll()
        self._publish(ctrl.refs[0], port.port)

    def _publish(self, ref: int, port: int) -> None:
        store, path = self.backend.store, self.path
        perms = [Perm(self.backend.domid, "n"), Perm(self.peer, "r")]
        for attempt in range(_STORE_RETRIES):
            try:
                with store.transaction() as tx:
                    for key, value in (("ring-ref", ref), ("event-channel", port)):
                        tx.write(f"{path}/{key}", str(value).encode())
                        tx.set_perms(f"{path}/{key}", perms)
            except XenError as exc:
                if exc.errno == errno.EAGAIN and attempt < _STORE_RETRIES - 1:
                    continue
                raise
            break
        self._published_ref = ref
        self._presence = self._presence_path(self.backend.domid, "server")
        self._write_presence()

    @classmethod
    def client(
        cls, backend: Backend, peer: int, path: str, *, timeout: float | None = None
    ) -> Vchan:
        """Connect to the server in domain ``peer`` at store ``path``.

        Waits (on a store watch, not by polling) until the server has published its
        keys, retrying when an attempt lost a race or read stale keys.

        Raises:
            TimeoutError: no connection within ``timeout`` seconds (None: wait forever).
            RemoteProtocolError: the server published an invalid control page.
        """
        _check_domid(peer)
        full = cls.resolve_path(peer, path)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: BaseException | None = None
        with backend.store.watch(full, "gntipc-connect") as watch:
            while True:
                watch.read_events()
                try:
                    return cls.client_nowait(backend, peer, full)
                except WouldBlock:
                    pass
                except (XenError, RemoteProtocolError) as exc:
                    if isinstance(exc, RemoteProtocolError) and not _is_race(exc):
                        raise
                    last = exc
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"no vchan server at {full} (domain {peer}) within {timeout} s"
                        + (f"; last attempt: {last}" if last else "")
                    )
                _wait_fd(watch.fileno(), remaining)

    @classmethod
    def client_nowait(cls, backend: Backend, peer: int, path: str) -> Vchan:
        """One connection attempt.

        Raises:
            WouldBlock: the server has not published its keys (yet).
            XenError: the keys are stale (the port was already taken, the grant gone).
            RemoteProtocolError: invalid keys or control page.
        """
        _check_domid(peer)
        full = cls.resolve_path(peer, path)
        store = backend.store
        try:
            ref = _parse_uint(store.read(f"{full}/ring-ref"), "ring-ref", 0xFFFFFFFF)
            port = _parse_uint(store.read(f"{full}/event-channel"), "event-channel", _MAX_PORT)
        except XenError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                raise WouldBlock from None
            raise
        self = cls._blank(backend, peer, full, is_server=False)
        try:
            self._setup_client(ref, port)
        except BaseException:
            self._teardown()
            raise
        return self

    def _setup_client(self, ref: int, remote_port: int) -> None:
        backend, peer = self.backend, self.peer
        port = self._port = backend.bind_interdomain(peer, remote_port)
        ctrl = backend.map(peer, [ref], writable=True)
        self._pages.append(ctrl)
        page = ctrl.mapping.view()
        try:
            # One private copy: everything below is validated from it, never re-read.
            snapshot = bytes(page[:CONTROL_PAGE_SIZE])
        finally:
            page.release()
        geometry = Geometry.read_from(snapshot)
        if snapshot[OFF_CLI_LIVE] != LIVE_WAITING:
            raise RemoteProtocolError(
                f"the control page at {self.path} is not waiting for a client"
                f" (cli_live={snapshot[OFF_CLI_LIVE]}): stale keys or another client won"
            )
        ctrl.set_unmap_notify(OFF_CLI_LIVE, clear_byte=True, port=port)
        left_refs, right_refs = geometry.read_grants(snapshot)
        ctrl_ptr = self._pointer(ctrl)
        # The client writes the left ring and reads the right one.
        if left_refs:
            left = backend.map(peer, left_refs, writable=True)
            self._pages.append(left)
            write_ptr = self._pointer(left)
        else:
            write_ptr = ctrl_ptr + geometry.left_offset
        if right_refs:
            right = backend.map(peer, right_refs, writable=False)
            self._pages.append(right)
            read_ptr = self._pointer(right)
        else:
            read_ptr = ctrl_ptr + geometry.right_offset
        self.read_size, self.write_size = geometry.right_size, geometry.left_size
        rings = self._rings = VchanRings(
            ctrl_ptr, read_ptr, self.read_size, write_ptr, self.write_size, is_server=False
        )
        self._make_epoll()
        self._presence = self._presence_path(self.backend.domid, "client", remote_port)
        self._write_presence()
        self._watch_peer(self._presence_path(peer, "server", remote_port))
        rings.set_own_live(LIVE_CONNECTED)
        rings.set_peer_notify(NOTIFY_WRITE)
        port.notify()

    # --------------------------------------------------------------- presence ---
    def _presence_path(self, domid: int, role: str, server_port: int | None = None) -> str:
        server = self.backend.domid if self.is_server else self.peer
        if server_port is None:
            assert self._port is not None
            server_port = self._port.port
        return f"/local/domain/{domid}/data/gntipc/{server}/{server_port}/{role}"

    def _write_presence(self) -> None:
        assert self._presence is not None
        store = self.backend.store
        store.write(self._presence, b"1")
        store.set_perms(self._presence, [Perm(self.backend.domid, "n"), Perm(self.peer, "r")])

    def _watch_peer(self, path: str) -> None:
        """Watch the peer's presence node, if it has one (a gntipc peer)."""
        store = self.backend.store
        if not store.exists(path):
            # A plain libxenvchan peer, or a peer whose domain already died (its home is
            # gone: ENOENT; EACCES only says we may not look, as in a domU).
            try:
                store.read(f"/local/domain/{self.peer}")
            except XenError as exc:
                if exc.errno == errno.ENOENT:
                    self._peer_dead = True
            return
        self._peer_gntipc = True
        self._peer_presence = path
        watch = self._watch = self.backend.store.watch(path, "gntipc-peer")
        assert self._epoll is not None
        self._epoll.register(watch.fileno(), select.EPOLLIN)

    # ------------------------------------------------------------- internals ---
    def _pointer(self, pages: Pages) -> Any:
        ptr = ffi.from_buffer("uint8_t[]", pages.mapping.mmap, require_writable=False)
        self._ptrs.append(ptr)
        return ptr

    def _make_epoll(self) -> None:
        assert self._port is not None
        self._epoll = select.epoll()
        self._epoll.register(self._port.fileno(), select.EPOLLIN)

    def _live_rings(self) -> VchanRings:
        if self._closed:
            raise ClosedResourceError("this vchan is closed")
        assert self._rings is not None
        return self._rings

    def _notify(self) -> None:
        assert self._port is not None
        with contextlib.suppress(XenError):
            self._port.notify()

    def _peer_state(self, rings: VchanRings) -> int:
        """LIVE_* of the peer, folding in domain death."""
        if self._peer_dead:
            return LIVE_GONE
        live = rings.peer_live()
        if self.is_server and not self._connected and live == LIVE_CONNECTED:
            self._on_connected()
        return live

    def _on_connected(self) -> None:
        self._connected = True
        assert self._port is not None
        self._watch_peer(self._presence_path(self.peer, "client"))

    def _end_of_stream(self, rings: VchanRings) -> BaseException:
        """The exception for a drained ring whose peer is gone or finished."""
        if self._peer_dead:
            return BrokenResourceError(f"the peer domain {self.peer} died")
        if rings.peer_eof():
            return EndOfStream()
        if self._peer_gntipc:
            # A gntipc peer always sets the EOF bit before a clean close.
            return BrokenResourceError("the peer crashed (its live byte was cleared)")
        return EndOfStream()

    # ----------------------------------------------------------- status ---
    def data_ready(self) -> int:
        """Bytes that can be read now (no side effects)."""
        return self._live_rings().data_ready()

    def buffer_space(self) -> int:
        """Bytes that can be written now (no side effects)."""
        return self._live_rings().buffer_space()

    def readable(self) -> bool:
        """True if a read would not come back empty-handed: data is ready, or there is an
        end to report (the peer sent EOF, closed, crashed or died).  No side effects
        beyond noticing the connection."""
        rings = self._live_rings()
        return rings.data_ready() > 0 or rings.peer_eof() or self._peer_state(rings) == LIVE_GONE

    def is_open(self) -> int:
        """0: closed (by us, or the peer is gone), 1: open, 2: server awaiting a client."""
        if self._closed:
            return 0
        assert self._rings is not None
        live = self._peer_state(self._rings)
        if live == LIVE_WAITING:
            return 2
        return 0 if live == LIVE_GONE else 1

    def fileno(self) -> int:
        """A descriptor that is readable when there may be news (an event, or a change of
        the peer's presence); then call :meth:`handle_events`."""
        if self._closed or self._epoll is None:
            raise ClosedResourceError("this vchan is closed")
        return self._epoll.fileno()

    def handle_events(self) -> None:
        """Consume pending events and store notifications.  Never blocks."""
        if self._closed:
            return
        assert self._port is not None and self._rings is not None
        if self._port.pending():
            self._port.unmask()
        if self._watch is not None and self._watch.read_events():
            self._check_peer_presence()
        self._peer_state(self._rings)

    def _check_peer_presence(self) -> None:
        assert self._peer_presence is not None and self._rings is not None
        if self.backend.store.exists(self._peer_presence):
            return
        # The node is removed after a clean close has cleared the live byte, so a live
        # byte still at 1 here means the domain died without an unmap notification.
        if self._rings.peer_live() != LIVE_GONE:
            self._peer_dead = True

    def prepare_wait_read(self) -> int:
        """Ask the peer to notify us when it writes; the fresh :meth:`data_ready`."""
        return self._live_rings().prepare_wait_read()

    def prepare_wait_write(self) -> int:
        """Ask the peer to notify us when it reads; the fresh :meth:`buffer_space`."""
        return self._live_rings().prepare_wait_write()

    # ------------------------------------------------------------ non-waiting I/O ---
    def _writable(self) -> VchanRings:
        rings = self._live_rings()
        if self._eof_sent:
            raise ClosedResourceError("send_eof() was called: this side writes no more")
        if self._peer_state(rings) == LIVE_GONE:
            raise BrokenResourceError(f"the peer (domain {self.peer}) is gone")
        return rings

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Stream write: as many bytes as fit now (0 if the ring is full).

        Raises:
            BrokenResourceError: the peer is gone.  ClosedResourceError: after close()
            or send_eof().  RemoteProtocolError: the peer corrupted its index.
        """
        rings = self._rings
        src = ffi.from_buffer(data)  # len(src) is in bytes, whatever the item size
        if (
            rings is not None
            and self._connected
            and not (self._closed or self._eof_sent or self._peer_dead)
        ):
            # Fast path: the liveness check and the write in one native call.
            n, notify = rings.write_live(src, len(src), all_or_nothing=False)
            if n >= 0:
                if notify:
                    self._notify()
                return n
        rings = self._writable()
        n, notify = rings.write(src, len(src))
        if notify:
            self._notify()
        return n

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Packet write: all of ``data`` (True) or nothing (False) if it does not fit now.

        Raises:
            LocalProtocolError: ``data`` is larger than the ring: it can never fit.
            (and as :meth:`write_nowait`)
        """
        rings = self._rings
        src = ffi.from_buffer(data)
        size = len(src)  # bytes, whatever the item size
        if (
            rings is not None
            and self._connected
            and size <= self.write_size
            and not (self._closed or self._eof_sent or self._peer_dead)
        ):
            # Fast path: the liveness check and the write in one native call.
            n, notify = rings.write_live(src, size, all_or_nothing=True)
            if n >= 0:
                if notify:
                    self._notify()
                return n == size or not size
        rings = self._writable()
        if size > self.write_size:
            raise LocalProtocolError(
                f"a {size}-byte packet can never fit a {self.write_size}-byte ring"
            )
        n, notify = rings.write(src, size, all_or_nothing=True)
        if notify:
            self._notify()
        return n == size

    def readinto_nowait(self, buf: bytearray | memoryview) -> int:
        """Stream read into ``buf``: the bytes available now (0 if none yet).

        Raises:
            EndOfStream: the peer closed cleanly (or sent EOF) and all it wrote was read.
            BrokenResourceError: the peer crashed or its domain died, all it wrote was read.
            ClosedResourceError: after our own close().
            RemoteProtocolError: the peer corrupted its index.
        """
        rings = self._live_rings()
        if not self._connected:
            self._peer_state(rings)
        dst = ffi.from_buffer(buf, require_writable=True)
        n, notify = rings.read(dst, len(dst))
        if n:
            if notify:
                self._notify()
            return n
        return self._read_empty(rings, buf, all_or_nothing=False)

    def _read_empty(
        self, rings: VchanRings, buf: bytearray | memoryview, *, all_or_nothing: bool
    ) -> int:
        # Liveness first, then drain: data written before a close is never lost.
        if self._peer_state(rings) != LIVE_GONE and not rings.peer_eof():
            return 0
        dst = ffi.from_buffer(buf, require_writable=True)
        n, notify = rings.read(dst, len(dst), all_or_nothing=all_or_nothing)
        if n:
            if notify:
                self._notify()
            return n
        if not len(dst):
            return 0
        raise self._end_of_stream(rings)

    def read_nowait(self, max_bytes: int) -> bytes:
        """Stream read: up to ``max_bytes`` available now (``b""`` if none yet).

        Raises: as :meth:`readinto_nowait`.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        rings = self._live_rings()
        if not self._connected:
            self._peer_state(rings)
        ready = rings.data_ready()
        buf = bytearray(min(max_bytes, ready) if ready else min(max_bytes, self.read_size))
        n = self.readinto_nowait(buf)
        del buf[n:]
        return bytes(buf)

    def recv_nowait(self, n: int) -> bytes | None:
        """Packet read: exactly ``n`` bytes, or None if fewer are available now.

        Raises:
            LocalProtocolError: ``n`` is larger than the ring.
            (and as :meth:`readinto_nowait`; EndOfStream/BrokenResourceError also when the
            peer is gone with fewer than ``n`` bytes left)
        """
        if n > self.read_size:
            raise LocalProtocolError(
                f"a {n}-byte packet can never fit a {self.read_size}-byte ring"
            )
        rings = self._live_rings()
        buf = bytearray(n)
        got, notify = rings.read(
            ffi.from_buffer(buf, require_writable=True), n, all_or_nothing=True
        )
        if got or not n:
            if notify:
                self._notify()
            return bytes(buf)
        if self._read_empty(rings, buf, all_or_nothing=True):
            return bytes(buf)
        return None

    def peek_nowait(self, n: int, skip: int = 0) -> bytes:
        """Up to ``n`` readable bytes, ``skip`` bytes ahead, without consuming them."""
        rings = self._live_rings()
        buf = bytearray(n)
        got = rings.peek(ffi.from_buffer(buf, require_writable=True), n, skip)
        del buf[got:]
        return bytes(buf)

    def send_eof(self) -> None:
        """Half-close: we write no more.  A gntipc peer reads EndOfStream after draining;
        a plain libxenvchan peer sees the stream go quiet until we close.  Idempotent."""
        rings = self._live_rings()
        if not self._eof_sent:
            self._eof_sent = True
            rings.send_eof()
            self._notify()

    # ------------------------------------------------------------- blocking I/O ---
    def wait(self, timeout: float | None = None) -> bool:
        """Block until there may be news (or ``timeout``); handle it.  True if woken."""
        return self._await_news(self._gen, _deadline(timeout))

    def _await_news(self, gen: int, deadline: float | None) -> bool:
        """Wait until events newer than generation ``gen`` were handled.

        Only one thread polls the fd; the others wait on a condition that the poller
        signals after :meth:`handle_events`, so one thread consuming an event can never
        strand another (the generation is taken *before* the caller's re-check).
        """
        fd = self.fileno()
        with self._cond:
            while self._polling:
                if self._gen != gen:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._gen != gen:
                return True
            self._polling = True
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            woken = _wait_fd(fd, remaining)
            self.handle_events()
        finally:
            with self._cond:
                self._polling = False
                self._gen += 1
                self._cond.notify_all()
        return woken

    def _block(self, prepare: Callable[[], bool], deadline: float | None) -> None:
        """Wait for news unless ``prepare()`` (a prepare_wait_* check) says ready."""
        gen = self._gen
        if prepare():
            return
        if deadline is not None and deadline <= time.monotonic():
            raise TimeoutError("vchan operation timed out")
        self._await_news(gen, deadline)

    def read(self, max_bytes: int, *, timeout: float | None = None) -> bytes:
        """Stream read: wait for at least one byte, return up to ``max_bytes``.

        Raises: as :meth:`readinto_nowait`, and TimeoutError.
        """
        deadline = _deadline(timeout)
        while True:
            data = self.read_nowait(max_bytes)
            if data:
                return data
            self._block(lambda: self.prepare_wait_read() > 0, deadline)

    def recv(self, n: int, *, timeout: float | None = None) -> bytes:
        """Packet read: wait until ``n`` bytes are available and return exactly them."""
        deadline = _deadline(timeout)
        while True:
            data = self.recv_nowait(n)
            if data is not None:
                return data
            self._block(lambda: self.prepare_wait_read() >= n, deadline)

    def write(self, data: bytes | bytearray | memoryview, *, timeout: float | None = None) -> int:
        """Stream write: wait for space, then write as much as fits (at least one byte)."""
        deadline = _deadline(timeout)
        if not data:
            return 0
        while True:
            n = self.write_nowait(data)
            if n:
                return n
            self._block(lambda: self.prepare_wait_write() > 0, deadline)

    def write_all(
        self, data: bytes | bytearray | memoryview, *, timeout: float | None = None
    ) -> None:
        """Write every byte of ``data``, waiting for space as needed."""
        view = memoryview(data).cast("B")
        deadline = _deadline(timeout)
        while view:
            n = self.write_nowait(view)
            if n:
                view = view[n:]
                continue
            self._block(lambda: self.prepare_wait_write() > 0, deadline)

    def send(self, data: bytes | bytearray | memoryview, *, timeout: float | None = None) -> None:
        """Packet write: wait until all of ``data`` fits, then write it at once."""
        deadline = _deadline(timeout)
        while not self.send_nowait(data):
            self._block(lambda: self.prepare_wait_write() >= memoryview(data).nbytes, deadline)

    # ------------------------------------------------------------------ close ---
    def close(self) -> None:
        """Close our end (idempotent): EOF bit, live byte 0, an event to the peer, then
        unmap, unshare, unbind; a server also removes its published keys."""
        if self._closed:
            return
        rings = self._rings
        if rings is not None:
            if not self._eof_sent:
                rings.send_eof()
            rings.set_own_live(LIVE_GONE)
            self._notify()
        self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        store = self.backend.store
        # Best effort: a store that fails or times out (GntipcError, TimeoutError) must
        # not keep the pages, ports and fds below from being released.
        with contextlib.suppress(GntipcError, TimeoutError):
            if self._published_ref is not None:
                self._unpublish(self._published_ref)
        with contextlib.suppress(GntipcError, TimeoutError):
            if self._presence is not None:
                store.rm(self._presence)
        self._published_ref = self._presence = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._rings = None
        for ptr in self._ptrs:
            ffi.release(ptr)
        self._ptrs.clear()
        for pages in reversed(self._pages):
            pages.close()
        self._pages.clear()
        if self._port is not None:
            self._port.close()
            self._port = None

    def _unpublish(self, ref: int) -> None:
        """Remove our keys, unless a newer server already replaced them."""
        store, path = self.backend.store, self.path
        try:
            current = store.read(f"{path}/ring-ref")
        except XenError:
            return
        if current.split(b"\0", 1)[0] == str(ref).encode():
            store.rm(f"{path}/ring-ref")
            store.rm(f"{path}/event-channel")
            with contextlib.suppress(XenError):
                if not store.directory(path):
                    store.rm(path)

    def __enter__(self) -> Vchan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        return f"<gntipc.Vchan {role} peer={self.peer} path={self.path!r}>"


def _check_domid(domid: int) -> None:
    if not isinstance(domid, int) or not 0 <= domid <= 0x7FEF:
        raise ValueError(f"domid {domid!r} is outside 0..32751")


def _is_race(exc: RemoteProtocolError) -> bool:
    return "not waiting for a client" in str(exc)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _wait_fd(fd: int, timeout: float | None) -> bool:
    """Block until ``fd`` is readable; False on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
    while True:
        try:
            return bool(poller.poll(ms))
        except InterruptedError:  # pragma: no cover - PEP 475 retries already
            continue
