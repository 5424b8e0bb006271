"""``gntipc proxy``: bridge a vchan and a local socket (unix or TCP), so that unmodified
socket programs talk across VMs.

Two roles, as Xen's ``vchan-socket-proxy``:

* ``--mode client`` (the default): listen on the local socket; each accepted connection
  is carried to the proxy in domain PEER (the vchan server at PATH).
* ``--mode server``: be the vchan server at PATH for domain PEER; each connection that
  arrives over the vchan is connected to the local socket.

Plain mode carries each socket connection over a vchan of its own, as raw bytes both
ways, so the other side may be Debian's ``vchan-socket-proxy`` (or any libxenvchan
program) as well as ``gntipc proxy``.  ``--mux`` carries every connection over one vchan
as :class:`gntipc.Session` streams (``gntipc proxy --mux`` on both sides); with
``--resume`` too, over a :class:`gntipc.ResumableStream`, so that the session and the
connections it carries survive the vchan breaking (the client proxy connects again).

Connection after connection, back to back, with ``vchan-socket-proxy`` in either role:
as a server it sets up its vchan once and, after each client left, offers the same
control page again (same grant and event channel, its keys unchanged), which our client
takes as a libxenvchan client does (:mod:`gntipc._connect`); as a client it connects as
soon as its next socket client comes, and our listener withdraws each channel's keys as
soon as its client took them, so such a client waits for the next offer instead of
finding the previous channel's keys (:class:`gntipc.Listener`).

Ends of connections: with a gntipc peer (it announces itself in the store) and in
``--mux``, a half-close travels through (a socket's EOF becomes the vchan's EOF and the
other side's socket ``shutdown(SHUT_WR)``), and a connection ends when both directions
ended.  With a plain libxenvchan peer, which has no half-close, a socket's EOF closes the
vchan and the vchan's end closes the socket, as ``vchan-socket-proxy`` does; nothing
written before is lost in either case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import sniffio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import ByteStream

from .. import _astore
from .._domid import check_domid
from .._exceptions import GntipcError
from .._fastpath import HeldWrites, held_writes
from ..backends import Backend
from ..protocol import VchanState, channel_pages, check_ring_size
from ..resume import ResumableListener, ResumableStream
from ..session import Session
from ..streams import Listener, VchanAttribute, VchanStream, connect, listen

__all__ = ["SocketAddress", "add_arguments", "parse_socket_address", "run_proxy"]

_CHUNK = 65536
#: The listening socket's backlog (redis-benchmark opens its 50 connections at once).
_BACKLOG = 511
#: Errors that end one connection (logged, the proxy goes on): the peer or the socket
#: program went away or misbehaved.
_CONNECTION_ERRORS = (BrokenResourceError, ClosedResourceError, GntipcError, OSError)


class UsageError(ValueError):
    """A bad command-line value (exit status 2)."""


@dataclass(frozen=True)
class SocketAddress:
    """A local socket: ``kind`` is ``"unix"`` (``path``), ``"tcp"`` (``host``, ``port``)
    or ``"stdio"`` (standard input and output)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return "-"


#: ``scheme:`` at the start of a SOCKET (a unix socket path may hold a colon too:
#: ``./name:1``).
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_SOCKET_FORMS = "PATH, unix:PATH, tcp:HOST:PORT, tcp:PORT or -"


def parse_socket_address(text: str) -> SocketAddress:
    """``PATH`` or ``unix:PATH``, ``tcp:HOST:PORT`` (``[V6]:PORT``), ``tcp:PORT``
    (127.0.0.1), or ``-`` (stdin/stdout).

    Raises:
        UsageError: the address cannot be parsed, or names an unknown scheme
            (``udp:1234`` is refused, not taken as a unix socket of that name).
    """
    if text == "-":
        return SocketAddress("stdio")
    match = _SCHEME.match(text)
    if match and match[1] not in ("unix", "tcp"):
        raise UsageError(
            f"unknown socket scheme {match[1]!r} in {text!r} (SOCKET is {_SOCKET_FORMS};"
            f" a unix socket of that name: ./{text})"
        )
    if text.startswith("tcp:"):
        rest = text[4:]
        host = "127.0.0.1"
        if ":" in rest:
            host, _, rest = rest.rpartition(":")
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            if not host:
                raise UsageError(f"no host in {text!r}")
        try:
            port = int(rest)
        except ValueError:
            raise UsageError(f"bad TCP port in {text!r} (expected tcp:HOST:PORT)") from None
        if not 0 <= port <= 65535:
            raise UsageError(f"TCP port out of range in {text!r}")
        with contextlib.suppress(ValueError):
            host = str(ipaddress.ip_address(host))
        return SocketAddress("tcp", host=host, port=port)
    path = text[5:] if text.startswith("unix:") else text
    if not path:
        raise UsageError("empty unix socket path")
    if len(os.fsencode(path)) > 107:
        raise UsageError(f"unix socket path longer than 107 bytes: {path!r}")
    return SocketAddress("unix", path=path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options and arguments of ``gntipc proxy``."""
    p.add_argument("peer", type=int, help="the other side's domain id")
    p.add_argument(
        "path",
        help="the vchan's store path (relative: under the vchan server's home,"
        " /local/domain/<server domid>/PATH)",
    )
    p.add_argument(
        "socket",
        metavar="SOCKET",
        help="PATH or unix:PATH, tcp:HOST:PORT, tcp:PORT (127.0.0.1), or - (stdin/stdout,"
        " one connection)",
    )
    p.add_argument(
        "-m",
        "--mode",
        choices=("client", "server"),
        default="client",
        help="client (default): listen on SOCKET, connect to the vchan server in PEER for"
        " each connection; server: serve the vchan at PATH, connect to SOCKET for each"
        " connection that arrives",
    )
    p.add_argument(
        "--mux",
        action="store_true",
        help="carry all connections over one vchan (gntipc proxy --mux on both sides)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --mux (on both sides): the session survives the vchan breaking (a"
        " gntipc.ResumableStream under it): the client proxy connects again and the"
        " bridged connections go on, nothing lost",
    )
    p.add_argument(
        "--give-up",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --resume: end the session when the peer has not come back within this"
        " long after a break (default 30)",
    )
    p.add_argument(
        "-s",
        "--state-path",
        metavar="STORE_PATH",
        help='write "running" to this store path once ready (as vchan-socket-proxy -s)',
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="client mode: seconds to wait for the vchan server (default 30)",
    )
    p.add_argument(
        "--ring-size",
        type=int,
        default=65536,
        help="server mode: size in bytes of each ring (a power of two, 1024..1048576;"
        " default 65536); plain mode: at most that, smaller as connections add up, so that"
        " --max-connections fit the domain's grant page budget",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="connections carried at once (more wait; default 256)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each connection on stderr")


# ---------------------------------------------------------------------- relaying ---


def _log(message: str) -> None:
    print(f"gntipc proxy: {message}", file=sys.stderr, flush=True)


def _peer_understands_eof(stream: VchanStream) -> bool:
    # Only a gntipc peer (which announces itself in the store) knows the EOF bit of a
    # half-close; a plain libxenvchan peer would see nothing until we close.
    return stream.extra(VchanAttribute.peer_is_gntipc)


def _peer_closed(stream: ByteStream) -> bool:
    """True if ``stream`` is a vchan whose peer closed it (not just sent EOF): nothing
    will read what the other direction would carry, so the connection is over."""
    return isinstance(stream, VchanStream) and stream.vchan.is_open() != VchanState.CONNECTED


async def relay(channel: ByteStream, sock: socket.socket, *, half_close: bool) -> None:
    """Copy bytes both ways between ``channel`` and the connected socket ``sock`` until
    the connection ends; then close both.

    ``half_close``: an end of one direction is passed on as a half-close and the
    connection ends when both directions ended; otherwise an end of either direction
    closes both (after everything written before it was delivered).  An error of
    either side (a broken peer, a reset socket) ends both at once.

    A :class:`VchanStream` under asyncio is relayed by :class:`_RingRelay` (event-loop
    callbacks straight on the ring and the socket, no task per direction); anything
    else (a :class:`gntipc.SessionStream`, trio) by :func:`_relay_tasks`.
    """
    sock.setblocking(False)
    if isinstance(channel, VchanStream) and sniffio.current_async_library() == "asyncio":
        await _RingRelay(channel, sock, half_close).run()
    else:
        await _relay_tasks(channel, sock, half_close=half_close)


async def _relay_tasks(channel: ByteStream, sock: socket.socket, *, half_close: bool) -> None:
    """:func:`relay` with a task per direction (any stream, any event loop)."""
    held = held_writes(channel)
    with sock:
        async with channel, anyio.create_task_group() as tg:

            async def up() -> None:  # socket -> channel
                try:
                    if held is not None and sniffio.current_async_library() == "asyncio":
                        await _up_by_callback(sock, channel, held)
                    else:
                        await _up_by_task(sock, channel)
                    if not half_close:
                        tg.cancel_scope.cancel()
                        return
                    await channel.send_eof()
                except _CONNECTION_ERRORS:
                    tg.cancel_scope.cancel()

            async def down() -> None:  # channel -> socket
                try:
                    while True:
                        try:
                            data = await channel.receive(_CHUNK)
                        except EndOfStream:
                            break
                        view = memoryview(data)
                        while view:
                            try:
                                view = view[sock.send(view) :]
                            except BlockingIOError:
                                await anyio.wait_writable(sock)
                    if not half_close or _peer_closed(channel):
                        tg.cancel_scope.cancel()
                        return
                    sock.shutdown(socket.SHUT_WR)
                except _CONNECTION_ERRORS:
                    tg.cancel_scope.cancel()

            tg.start_soon(up)
            tg.start_soon(down)


async def _up_by_task(sock: socket.socket, channel: ByteStream) -> None:
    """Socket to ``channel`` until the socket's EOF: wait, read, send."""
    while True:
        try:
            # A fresh bytes object each time: the channel may keep the item after
            # send() returned (a queued frame).
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not data:
            return
        await channel.send(data)


async def _up_by_callback(sock: socket.socket, channel: ByteStream, held: HeldWrites) -> None:
    """Socket to ``channel`` until the socket's EOF, asyncio: a reader callback stays
    registered on the socket and hands each chunk to the stream's gathered writes (a
    :class:`gntipc.SessionStream` writes it into the ring at once, or gathers a burst
    into one frame), so a request costs no task switch and no (un)registration of the
    socket; only a chunk the stream cannot take now (no credit) is sent by this task,
    the socket not read meanwhile (backpressure)."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    wake = anyio.Event()
    state: dict[str, Any] = {"data": None, "error": None, "eof": False}

    def on_readable() -> None:
        try:
            data = sock.recv(_CHUNK)
            if data and held._send_soon(data):
                return
        except BlockingIOError:
            return
        except _CONNECTION_ERRORS as exc:
            state["error"] = exc
        else:
            state["data"], state["eof"] = data, not data
        loop.remove_reader(fd)
        wake.set()

    try:
        while True:
            loop.add_reader(fd, on_readable)
            await wake.wait()
            wake = anyio.Event()
            if state["error"] is not None:
                raise state["error"]
            if state["eof"]:
                return
            data, state["data"] = state["data"], None
            await channel.send(data)
    finally:
        loop.remove_reader(fd)


class _RingRelay:
    """One connection between a :class:`VchanStream` and a socket, relayed by asyncio
    callbacks on the vchan's event descriptor and the socket's, with no task per
    direction and no await per chunk: a readable socket is read into a reused buffer and
    written into the ring in the same callback; an event from the peer (or a ring found
    non-empty) is read out of the ring into the other buffer and sent to the socket at
    once.  A chunk that does not fit (ring full, socket buffer full) stays in its buffer
    and that direction stops reading until it is gone: backpressure both ways.  Never
    spins: with many connections in one process, a spinning wait holds up every other
    connection.

    The vchan's descriptor stays registered for the connection's life (level-triggered:
    each callback consumes the events); before the ring side waits, the peer is asked
    for a notification and the ring checked again (the endpoint's ``poll_read`` /
    ``poll_write``), so no event is lost.  The store work a presence event calls for
    (the peer's domain died) runs in a worker thread from :meth:`run`'s task.
    """

    def __init__(self, stream: VchanStream, sock: socket.socket, half_close: bool) -> None:
        self.stream = stream
        self.ep = stream.vchan.endpoint
        self.sock = sock
        self.half_close = half_close
        self.loop = asyncio.get_running_loop()
        self.vfd = self.ep.fileno()
        self.sfd = sock.fileno()
        # socket -> vchan ("up"): the chunk not yet in the ring is up[up_off:up_end].
        self.up = bytearray(_CHUNK)
        self.up_view = memoryview(self.up)
        self.up_off = self.up_end = 0
        self.up_done = False  # the socket's EOF was passed on
        self.reading_sock = False
        # vchan -> socket ("down"): the chunk not yet sent is down[down_off:down_end].
        self.down = bytearray(_CHUNK)
        self.down_view = memoryview(self.down)
        self.down_off = self.down_end = 0
        self.down_done = False  # the ring's end was passed on
        self.writing_sock = False
        self.kick = anyio.Event()  # the task has work: the end, or a presence check
        self.error: BaseException | None = None
        self.finished = False

    async def run(self) -> None:
        loop, stream, sock = self.loop, self.stream, self.sock
        try:
            loop.add_reader(self.vfd, self._on_event)
            self._read_sock(True)
            self._guard(self._pump)
            while not self.finished:
                await self.kick.wait()
                self.kick = anyio.Event()
                if not self.finished and self.ep.presence_check_due():
                    try:
                        await _astore.run(
                            self.ep.check_presence, what="checking the peer's presence"
                        )
                    except _CONNECTION_ERRORS as exc:
                        self._finish(exc)
                    else:
                        self._guard(self._pump)
            if self.error is not None and not isinstance(self.error, _CONNECTION_ERRORS):
                # A bug, not the peer: said, and this connection ends (not the proxy).
                _log(f"connection ended by an internal error: {self.error!r}")
        finally:
            self.finished = True
            loop.remove_reader(self.vfd)
            self._read_sock(False)
            self._write_sock(False)
            sock.close()
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    # -- plumbing -----------------------------------------------------------------------

    def _read_sock(self, on: bool) -> None:
        if on != self.reading_sock and not (on and self.finished):
            self.reading_sock = on
            self._watch(self.loop.add_reader, self.loop.remove_reader, on, self._on_readable)

    def _write_sock(self, on: bool) -> None:
        if on != self.writing_sock and not (on and self.finished):
            self.writing_sock = on
            self._watch(self.loop.add_writer, self.loop.remove_writer, on, self._on_writable)

    def _watch(
        self, add: Callable[..., None], remove: Callable[[int], object], on: bool, step: Any
    ) -> None:
        if on:
            add(self.sfd, self._guard, step)
        else:
            remove(self.sfd)

    def _finish(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.error = error
            self._read_sock(False)
            self._write_sock(False)
        self.kick.set()

    def _guard(self, step: Callable[[], None]) -> None:
        """Run a callback's ``step``; an error of either side ends the connection."""
        if self.finished:
            return
        try:
            step()
        except Exception as exc:  # from a callback: the loop would only log it
            self._finish(exc)

    # -- callbacks ----------------------------------------------------------------------

    def _on_event(self) -> None:
        if self.finished:
            # The fd may still be readable until run() unregisters it: consume nothing.
            self.loop.remove_reader(self.vfd)
            return
        try:
            if self.ep.consume_events():
                self.kick.set()  # the store check runs in run()'s task
            self._pump()
        except Exception as exc:  # from a callback: the loop would only log it
            self._finish(exc)

    def _on_readable(self) -> None:
        try:
            n = self.sock.recv_into(self.up)
        except BlockingIOError:
            return
        if n == 0:
            self._read_sock(False)
            self._sock_ended()
            return
        self.up_off, self.up_end = 0, n
        self._flush_up()

    def _on_writable(self) -> None:
        if self._flush_down():
            self._write_sock(False)
            self._pump()

    # -- the two directions --------------------------------------------------------------

    def _flush_up(self) -> bool:
        """Write the pending socket chunk into the ring; True once it is all in (the
        socket is read again), else wait for ring space (the socket is not read)."""
        ep = self.ep
        while True:
            written, _ = ep.write_from(self.up_view[: self.up_end], self.up_off)
            self.up_off += written
            if self.up_off >= self.up_end:
                self.up_off = self.up_end = 0
                self._read_sock(True)
                return True
            self._read_sock(False)
            if not ep.poll_write(1):
                return False  # the peer's read notifies us

    def _flush_down(self) -> bool:
        """Send the pending ring chunk to the socket; True once it is all sent."""
        while self.down_off < self.down_end:
            try:
                sent = self.sock.send(self.down_view[self.down_off : self.down_end])
            except BlockingIOError:
                return False
            self.down_off += sent
        self.down_off = self.down_end = 0
        return True

    def _pump(self) -> None:
        """After an event (or a socket that became writable): go on in both directions."""
        if self.up_end:
            self._flush_up()
        ep = self.ep
        while not self.down_done and not self.down_end and not self.finished:
            # Before each read, not after an empty one: an empty ring then costs one
            # call (ask the peer to notify us, check again) instead of two.
            if not ep.poll_read(1):
                return  # the peer's next write notifies us
            try:
                n = ep.readinto_nowait(self.down)
            except EndOfStream:
                self._ring_ended()
                return
            self.down_off, self.down_end = 0, n
            if not self._flush_down():
                self._write_sock(True)
                return

    # -- ends ---------------------------------------------------------------------------

    def _sock_ended(self) -> None:
        """The socket program sent EOF (all it sent is in the ring: it was read only
        when the ring had taken the chunk before)."""
        if not self.half_close:
            self._finish()
            return
        self.ep.send_eof()
        self.up_done = True
        if self.down_done:
            self._finish()

    def _ring_ended(self) -> None:
        """The peer sent EOF or closed, and everything it wrote was sent on."""
        self.down_done = True
        if not self.half_close or _peer_closed(self.stream):
            self._finish()
            return
        self.sock.shutdown(socket.SHUT_WR)
        if self.up_done:
            self._finish()


async def _connect_socket(address: SocketAddress) -> socket.socket:
    """A connected, non-blocking socket to ``address``.

    Raises:
        OSError: the connection failed.
    """
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address.path
    else:
        infos = await anyio.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        family, _, _, _, target = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect(target)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
        if address.kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class _SocketListener:
    """The listening sockets of ``SOCKET`` (one per address of a TCP host name), served
    without anyio's streams: each accepted connection is a plain non-blocking socket."""

    def __init__(self, listener: anyio.abc.Listener[Any]) -> None:
        self.listener = listener
        listeners = getattr(listener, "listeners", [listener])
        self.socks: list[socket.socket] = [
            one.extra(anyio.abc.SocketAttribute.raw_socket) for one in listeners
        ]

    async def serve(self, handler: Callable[[socket.socket], Coroutine[Any, Any, None]]) -> None:
        """Accept connections for ever, each handled in a task of its own."""
        async with anyio.create_task_group() as tg:
            for lsock in self.socks:
                tg.start_soon(self._accept_loop, lsock, handler, tg)

    @staticmethod
    async def _accept_loop(
        lsock: socket.socket,
        handler: Callable[[socket.socket], Coroutine[Any, Any, None]],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        lsock.setblocking(False)
        tcp = lsock.family in (socket.AF_INET, socket.AF_INET6)
        while True:
            await anyio.wait_readable(lsock)
            while True:
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # EMFILE and the like: this connection only
                    _log(f"accept: {exc.strerror or exc}")
                    await anyio.sleep(0.1)
                    break
                conn.setblocking(False)
                if tcp:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tg.start_soon(handler, conn)


@contextlib.asynccontextmanager
async def _socket_listener(address: SocketAddress) -> AsyncIterator[_SocketListener]:
    """A listening socket at ``address``; a unix socket file we created is removed on exit.

    Raises:
        OSError: the address is in use (a live listener), or the bind failed.
    """
    if address.kind == "tcp":
        tcp = await anyio.create_tcp_listener(
            local_host=address.host, local_port=address.port, backlog=_BACKLOG
        )
        async with tcp:
            yield _SocketListener(tcp)
        return
    path = address.path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            pass  # a stale socket file (its listener is gone): replaced below
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: another program listens there")
        finally:
            probe.close()
    unix = await anyio.create_unix_listener(path, backlog=_BACKLOG)
    ino = os.stat(path).st_ino
    try:
        async with unix:
            yield _SocketListener(unix)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:
                os.unlink(path)


def _sockname(listener: _SocketListener, address: SocketAddress) -> str:
    if address.kind != "tcp":
        return str(address)
    local = listener.socks[0].getsockname()
    return str(SocketAddress("tcp", host=str(local[0]), port=int(local[1])))


# ------------------------------------------------------------------------ roles ---


class _Proxy:
    """One ``gntipc proxy`` run: the parsed arguments, the backend, the counters."""

    def __init__(self, args: argparse.Namespace, backend: Backend, address: SocketAddress) -> None:
        self.args = args
        self.backend = backend
        self.address = address
        self.limiter = anyio.CapacityLimiter(args.max_connections)
        self.count = 0

    def verbose(self, message: str) -> None:
        if self.args.verbose:
            _log(message)

    def ready(self, where: str) -> None:
        state_path = self.args.state_path
        if state_path:
            self.backend.store.write(state_path, b"running")
        self.verbose(f"ready: {where}")

    async def _connect(self) -> VchanStream:
        return await connect(
            self.args.peer, self.args.path, timeout=self.args.timeout, backend=self.backend
        )

    async def _listen(self) -> Listener:
        size = self.args.ring_size
        # Plain mode: a vchan per connection, each sized to the domain's page budget so
        # that --max-connections of them fit (--mux: one vchan per client proxy).
        listener = await listen(
            self.args.peer,
            self.args.path,
            read_size=size,
            write_size=size,
            max_clients=self.args.max_connections,
            backend=self.backend,
        )
        limit = self.backend.page_limit
        if limit is not None and not self.args.mux:
            fits = limit // channel_pages(size, size)
            if fits < self.args.max_connections:
                _log(
                    f"the domain may share {limit} pages (its gntalloc limit), {fits} vchans"
                    f" of {size}-byte rings: connections get smaller rings as they add up,"
                    f" so that --max-connections {self.args.max_connections} fit"
                )
        return listener

    async def _relay(self, n: str, channel: ByteStream, sock: socket.socket, half: bool) -> None:
        self.verbose(f"connection {n}: open")
        await relay(channel, sock, half_close=half)
        self.verbose(f"connection {n}: closed")

    async def carry(self, n: str, channel: ByteStream, *, half_close: bool) -> None:
        """Server side: connect ``channel`` (connection ``n``) to the local socket."""
        try:
            sock = await _connect_socket(self.address)
        except OSError as exc:
            _log(f"connection {n}: cannot connect to {self.address}: {exc.strerror or exc}")
            await channel.aclose()
            return
        await self._relay(n, channel, sock, half_close)

    # -- client mode: a local listener, vchans out ----------------------------------

    async def client(self) -> None:
        async with _socket_listener(self.address) as listener:
            if not self.args.mux:
                self.ready(_sockname(listener, self.address))
                await listener.serve(lambda sock: self._client_connection(sock, None))
                return
            async with contextlib.AsyncExitStack() as stack:
                if self.args.resume:
                    transport: ByteStream = await stack.enter_async_context(
                        ResumableStream.client(self._connect, give_up_after=self.args.give_up)
                    )
                else:
                    transport = await self._connect()
                session = await stack.enter_async_context(Session(transport, is_initiator=True))
                tg = await stack.enter_async_context(anyio.create_task_group())
                self.ready(f"{_sockname(listener, self.address)}, mux")
                tg.start_soon(listener.serve, lambda sock: self._client_connection(sock, session))
                await self._until_session_ends(session)
                tg.cancel_scope.cancel()

    async def _until_session_ends(self, session: Session) -> None:
        """Wait until the peer ends ``session`` (streams it opens are refused).

        Raises:
            anyio.BrokenResourceError: the session broke (the peer crashed).
            gntipc.RemoteProtocolError: the peer broke the session protocol.
        """
        while True:
            try:
                stream = await session.accept_stream()
            except EndOfStream:
                _log(f"the peer in domain {self.args.peer} closed the session")
                return
            await stream.aclose()  # connections are opened from this side only

    async def _client_connection(self, sock: socket.socket, session: Session | None) -> None:
        async with self.limiter:
            self.count += 1
            n = self.count
            try:
                channel: ByteStream
                if session is not None:
                    channel, half_close = await session.open_stream(), True
                else:
                    vchan = await self._connect()
                    channel, half_close = vchan, _peer_understands_eof(vchan)
            except (TimeoutError, EndOfStream, GntipcError, *_CONNECTION_ERRORS) as exc:
                _log(f"connection {n}: no channel to domain {self.args.peer}: {exc}")
                sock.close()
                return
            await self._relay(str(n), channel, sock, half_close)

    # -- server mode: a vchan listener, sockets out ----------------------------------

    async def server(self) -> None:
        async with await self._listen() as listener:
            self.ready(f"{listener.path}{', mux' if self.args.mux else ''}")
            if not self.args.resume:
                await listener.serve(self._server_channel)
                return
            # Each session on a resumable stream; a client proxy that connects again
            # after a break resumes its session (the resumable listener routes it).
            async with (
                ResumableListener(listener, give_up_after=self.args.give_up) as resumable,
                anyio.create_task_group() as tg,
            ):
                while True:
                    tg.start_soon(self._server_channel, await resumable.accept())

    async def _server_channel(self, stream: ByteStream) -> None:
        self.count += 1
        n = self.count
        if not self.args.mux:
            assert isinstance(stream, VchanStream)
            async with self.limiter:
                await self.carry(str(n), stream, half_close=_peer_understands_eof(stream))
            return
        self.verbose(f"session {n}: open")
        try:
            async with (
                stream,
                Session(stream, is_initiator=False) as session,
                anyio.create_task_group() as tg,
            ):
                k = 0
                while True:
                    try:
                        channel = await session.accept_stream()
                    except EndOfStream:
                        self.verbose(f"session {n}: closed by the peer")
                        break
                    except _CONNECTION_ERRORS as exc:
                        _log(f"session {n}: ended: {type(exc).__name__}: {exc}")
                        break
                    k += 1
                    tg.start_soon(self._carry_limited, f"{n}.{k}", channel)
                # The streams still carried end as the session's end reaches them.
        except _CONNECTION_ERRORS as exc:  # the session could not even start
            _log(f"session {n}: {type(exc).__name__}: {exc}")

    async def _carry_limited(self, n: str, channel: ByteStream) -> None:
        async with self.limiter:
            await self.carry(n, channel, half_close=True)

    # -- stdin/stdout ----------------------------------------------------------------

    async def stdio(self, pump: Callable[[VchanStream], Awaitable[None]]) -> None:
        if self.args.mode == "client":
            stream = await self._connect()
        else:
            async with await self._listen() as listener:
                self.ready(listener.path)
                stream = await listener.accept()
        async with stream:
            await pump(stream)


async def run_proxy(
    args: argparse.Namespace,
    backend: Backend,
    pump: Callable[[VchanStream], Awaitable[None]],
) -> None:
    """Run ``gntipc proxy`` until SIGINT/SIGTERM (then return), or until the channel of
    ``-`` or of a ``--mux`` client ends.

    Raises:
        UsageError: bad arguments.
        OSError: the local socket cannot be set up.
        TimeoutError: ``--mux`` client: no vchan server within ``--timeout``.
        anyio.BrokenResourceError: the session of a ``--mux`` client broke.
    """
    # Checked now, not at the first connection: a bad value is a usage error at once.
    check_domid(args.peer)
    check_ring_size(args.ring_size, "--ring-size")
    if not args.timeout >= 0:
        raise UsageError(f"--timeout must be >= 0, not {args.timeout}")
    address = parse_socket_address(args.socket)
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    if address.kind == "stdio" and args.mux:
        raise UsageError("--mux needs a socket, not - (stdin/stdout is one connection)")
    if args.resume and not args.mux:
        raise UsageError("--resume needs --mux (one session over the vchan to resume)")
    if not args.give_up > 0:
        raise UsageError(f"--give-up must be > 0, not {args.give_up}")
    proxy = _Proxy(args, backend, address)
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    proxy.verbose(f"{signal.Signals(signum).name}: stopping")
                    tg.cancel_scope.cancel()
                    return

        async def main() -> None:
            if address.kind == "stdio":
                await proxy.stdio(pump)
            elif args.mode == "client":
                await proxy.client()
            else:
                await proxy.server()
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        tg.start_soon(main)
