"""The synchronous vchan API: :class:`Vchan`, libxenvchan-compatible rings on grant pages,
over any backend.

:class:`Vchan` is one end of a channel in libxenvchan's vocabulary (read/write = stream,
send/recv = packet), a thin facade over three parts: the rendezvous
(:mod:`gntipc._keys`: store keys and presence nodes; :mod:`gntipc._connect`: the connect
loops), the endpoint (:mod:`gntipc._endpoint`: pages, rings, liveness, events and the
wait protocol) and the blocking waiter (:mod:`gntipc._waiter`: spin-then-block for
threads).  Every operation has a non-waiting form (``*_nowait``) and a blocking form for
scripts and threads.

Setup, byte-exact with libxenvchan (see :mod:`gntipc.protocol`):

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
import time
import warnings

from anyio import ClosedResourceError

from ._connect import connect_blocking, try_connect
from ._domid import check_domid
from ._endpoint import Endpoint
from ._exceptions import LocalProtocolError
from ._keys import resolve_path
from ._resource import Closeable
from ._spin import DEFAULT_SPIN
from ._waiter import BlockingWaiter
from .backends._abc import Backend, Buffer
from .protocol import DEFAULT_RING_SIZE as DEFAULT_RING_SIZE
from .protocol import VchanState

__all__ = ["DEFAULT_RING_SIZE", "Vchan"]


class Vchan(Closeable):
    """One end of a vchan.  Use :meth:`server` or :meth:`client` to make one.

    Thread-safety: one reader thread and one writer thread may use it at once, and
    :meth:`close` may be called from any thread (in-flight calls finish or raise
    :class:`anyio.ClosedResourceError`; blocked calls wake and raise it).

    The blocking calls spin briefly before they sleep (see :attr:`spin`).
    """

    __slots__ = ("__weakref__", "_waiter", "endpoint")

    endpoint: Endpoint
    _waiter: BlockingWaiter

    def __init__(self, endpoint: Endpoint, *, spin: float = DEFAULT_SPIN) -> None:
        """Wrap a connected (or offered) :class:`~gntipc._endpoint.Endpoint`; most
        users call :meth:`server` or :meth:`client` instead."""
        self.endpoint = endpoint
        self._waiter = BlockingWaiter(endpoint, spin)

    # ------------------------------------------------------------------ setup ---
    @staticmethod
    def resolve_path(server_domid: int, path: str) -> str:
        """An absolute store path: a relative ``path`` is relative to the server's home
        ``/local/domain/<server_domid>``.

        Raises:
            LocalProtocolError: an empty path or one with empty components.
        """
        return resolve_path(server_domid, path)

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

        :meth:`is_open` is ``WAITING`` until a client connects.  ``read_size`` and
        ``write_size`` are minimum sizes, rounded up to libxenvchan's choice of orders (up
        to 1 MiB each way) as ``libxenvchan_server_init`` does (the rules:
        :mod:`gntipc.protocol`).  ``start_index`` sets the
        initial ring indices (tests use it to cross the u32 wrap).

        Raises:
            LocalProtocolError: a bad path or a ring size above 1 MiB.
            XenError: the backend refused (e.g. ENOSPC: the gntalloc page limit).
        """
        return cls(
            Endpoint.server(
                backend,
                peer,
                path,
                read_size=read_size,
                write_size=write_size,
                start_index=start_index,
            )
        )

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
            XenError: ECONNREFUSED: the gntipc listener at ``path`` says it can offer no
                channel now (the message says why), for 2 s in a row.
        """
        check_domid(peer)
        return cls(connect_blocking(backend, peer, resolve_path(peer, path), timeout))

    @classmethod
    def client_nowait(cls, backend: Backend, peer: int, path: str) -> Vchan:
        """One connection attempt.

        Raises:
            WouldBlock: the server has not published its keys (yet).
            StaleKeys: the keys are stale (the port was already taken, the grant gone).
            RemoteProtocolError: invalid keys or control page.
        """
        check_domid(peer)
        return cls(try_connect(backend, peer, resolve_path(peer, path)))

    # ------------------------------------------------------------- attributes ---
    @property
    def backend(self) -> Backend:
        return self.endpoint.backend

    @property
    def peer(self) -> int:
        """The other side's domid."""
        return self.endpoint.peer

    @property
    def path(self) -> str:
        """The absolute store path of the channel."""
        return self.endpoint.path

    @property
    def is_server(self) -> bool:
        return self.endpoint.is_server

    @property
    def read_size(self) -> int:
        """Size in bytes of the ring we read from."""
        return self.endpoint.read_size

    @property
    def write_size(self) -> int:
        """Size in bytes of the ring we write to."""
        return self.endpoint.write_size

    @property
    def spin(self) -> float:
        """How long (seconds) a blocking call may busy-wait on the ring before it sleeps,
        while the channel is busy (0 disables).  Default: about one wake-up's cost."""
        return self._waiter.read_spinner.limit

    @spin.setter
    def spin(self, seconds: float) -> None:
        self._waiter.read_spinner.limit = seconds
        self._waiter.write_spinner.limit = seconds

    # ------------------------------------------------------------ non-waiting I/O ---
    def write_nowait(self, data: Buffer) -> int:
        """Stream write: as many bytes as fit now (0 if the ring is full).

        Raises:
            BrokenResourceError: the peer is gone.
            ClosedResourceError: after close() or send_eof().
            RemoteProtocolError: the peer corrupted its index.
        """
        return self.endpoint.write_nowait(data)

    def send_nowait(self, data: Buffer) -> bool:
        """Packet write: all of ``data`` (True) or nothing (False) if it does not fit now.

        Besides the error below, it raises those of :meth:`write_nowait`.

        Raises:
            LocalProtocolError: ``data`` is larger than the ring: it can never fit.
        """
        return self.endpoint.send_nowait(data)

    def readinto_nowait(self, buf: bytearray | memoryview) -> int:
        """Stream read into ``buf``: the bytes available now (0 if none yet).

        Raises:
            EndOfStream: the peer closed cleanly (or sent EOF) and all it wrote was read.
            BrokenResourceError: the peer crashed or its domain died, all it wrote was read.
            ClosedResourceError: after our own close().
            RemoteProtocolError: the peer corrupted its index.
        """
        return self.endpoint.readinto_nowait(buf)

    def read_nowait(self, max_bytes: int) -> bytes:
        """Stream read: up to ``max_bytes`` available now (``b""`` if none yet), copied
        once, straight from the ring into the returned bytes.

        Raises: as :meth:`readinto_nowait`.
        """
        return self.endpoint.read_nowait(max_bytes)

    def recv_nowait(self, n: int) -> bytes | None:
        """Packet read: exactly ``n`` bytes, or None if fewer are available now.

        Raises:
            LocalProtocolError: ``n`` is larger than the ring.
            EndOfStream: as :meth:`readinto_nowait`, also when the peer finished with fewer
                than ``n`` bytes left.
            BrokenResourceError: as :meth:`readinto_nowait`, also when the peer is gone
                with fewer than ``n`` bytes left.
        """
        if n > self.read_size:
            raise LocalProtocolError(
                f"a {n}-byte packet can never fit a {self.read_size}-byte ring"
            )
        buf = bytearray(n)
        if self.endpoint.readinto_nowait(buf, all_or_nothing=True) or not n:
            return bytes(buf)
        return None

    def peek_nowait(self, n: int, skip: int = 0) -> bytes:
        """Up to ``n`` readable bytes, ``skip`` bytes ahead, without consuming them."""
        return self.endpoint.peek_nowait(n, skip)

    def send_eof(self) -> None:
        """Half-close: we write no more.  A gntipc peer reads EndOfStream after draining;
        a plain libxenvchan peer sees the stream go quiet until we close.  Idempotent."""
        self.endpoint.send_eof()

    # ----------------------------------------------------------- status ---
    def data_ready(self) -> int:
        """Bytes that can be read now (no side effects)."""
        return self.endpoint.data_ready()

    def buffer_space(self) -> int:
        """Bytes that can be written now (no side effects)."""
        return self.endpoint.buffer_space()

    def readable(self) -> bool:
        """True if a read would not come back empty-handed: data is ready, or there is an
        end to report (the peer sent EOF, closed, crashed or died)."""
        return self.endpoint.readable()

    def is_open(self) -> VchanState:
        """``CLOSED`` (0: closed by us, or the peer is gone), ``CONNECTED`` (1) or
        ``WAITING`` (2: a server awaiting its client), as ``libxenvchan_is_open``."""
        if self.endpoint.closed:
            return VchanState.CLOSED
        try:
            return VchanState(self.endpoint.peer_state())
        except ClosedResourceError:
            return VchanState.CLOSED

    def prepare_wait_read(self) -> int:
        """Ask the peer to notify us when it writes; the fresh :meth:`data_ready` (at least
        1 when there is an end to report), 0 if the caller should :meth:`wait`."""
        if self.endpoint.poll_read(1):
            try:
                return max(1, self.endpoint.data_ready())
            except ClosedResourceError:
                return 1
        return 0

    def prepare_wait_write(self) -> int:
        """Ask the peer to notify us when it reads; the fresh :meth:`buffer_space` (0: the
        caller should :meth:`wait`)."""
        if self.endpoint.poll_write(1):
            try:
                return max(1, self.endpoint.buffer_space())
            except ClosedResourceError:
                return 1
        return 0

    def fileno(self) -> int:
        """A descriptor that is readable when there may be news (an event, or a change of
        the peer's presence); then call :meth:`handle_events`."""
        return self.endpoint.fileno()

    def handle_events(self) -> None:
        """Consume pending events and store notifications.  Never blocks."""
        self.endpoint.handle_events()

    # ------------------------------------------------------------- blocking I/O ---
    def wait(self, timeout: float | None = None) -> bool:
        """Block until there may be news (or ``timeout``); handle it.  True if woken."""
        waiter = self._waiter
        return waiter.await_news(waiter.generation(), _deadline(timeout))

    def read(self, max_bytes: int, *, timeout: float | None = None) -> bytes:
        """Stream read: wait for at least one byte, return up to ``max_bytes``.

        Raises: as :meth:`readinto_nowait`, and TimeoutError.
        """
        deadline = _deadline(timeout)
        while True:
            data = self.endpoint.read_nowait(max_bytes)
            if data:
                return data
            self._waiter.wait_readable(1, deadline)

    def readinto(self, buf: bytearray | memoryview, *, timeout: float | None = None) -> int:
        """Stream read into ``buf``: wait for at least one byte (``buf`` not empty).

        Raises: as :meth:`read`.
        """
        deadline = _deadline(timeout)
        waiter = self._waiter
        while True:
            # With the channel busy, spinning for data and reading it are one native call.
            n = self.endpoint.readinto_nowait(buf, spinner=waiter.read_spinner)
            if n or not memoryview(buf).nbytes:
                return n
            waiter.wait_readable(1, deadline, spin=False)

    def recv(self, n: int, *, timeout: float | None = None) -> bytes:
        """Packet read: wait until ``n`` bytes are available and return exactly them."""
        deadline = _deadline(timeout)
        while True:
            data = self.recv_nowait(n)
            if data is not None:
                return data
            self._waiter.wait_readable(n, deadline)

    def write(self, data: Buffer, *, timeout: float | None = None) -> int:
        """Stream write: wait for space, then write as much as fits (at least one byte)."""
        deadline = _deadline(timeout)
        if not memoryview(data).nbytes:
            return 0
        while True:
            n = self.endpoint.write_nowait(data)
            if n:
                return n
            self._waiter.wait_writable(1, deadline)

    def write_all(self, data: Buffer, *, timeout: float | None = None) -> None:
        """Write every byte of ``data``, waiting for space as needed (the writer fills
        whatever is free and goes on as the reader frees more)."""
        deadline = _deadline(timeout)
        waiter = self._waiter
        with memoryview(data) as raw, raw.cast("B") as view:
            offset, total = 0, len(view)
            while offset < total:
                # With the channel busy, writing, spinning for room and writing on are one
                # native call.
                n = self.endpoint.write_nowait(view[offset:], spinner=waiter.write_spinner)
                if n:
                    offset += n
                    continue
                waiter.wait_writable(1, deadline, spin=False)

    def send(self, data: Buffer, *, timeout: float | None = None) -> None:
        """Packet write: wait until all of ``data`` fits, then write it at once."""
        deadline = _deadline(timeout)
        size = memoryview(data).nbytes
        while not self.send_nowait(data):
            self._waiter.wait_writable(size, deadline)

    # ------------------------------------------------------------------ close ---
    def close(self) -> None:
        """Close our end (idempotent, from any thread): EOF bit, live byte 0, an event
        to the peer, then unmap, unshare, unbind; a server also removes its published
        keys."""
        self.endpoint.close()

    @property
    def closed(self) -> bool:
        return self.endpoint.closed

    def __del__(self) -> None:
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None and not endpoint.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):  # a finaliser must not raise
                endpoint.close()

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        return f"<gntipc.Vchan {role} peer={self.peer} path={self.path!r}>"


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout
