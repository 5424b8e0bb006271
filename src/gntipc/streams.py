"""Async byte streams over vchan endpoints: :class:`VchanStream`, :class:`Listener`,
:func:`connect` and :func:`listen`.

A :class:`VchanStream` is an :class:`anyio.abc.ByteStream`, so it works under asyncio and
trio and with every anyio helper (``anyio.streams.buffered``, ``TextStream``, …).  The
event-loop integration is one :class:`~gntipc._dispatch.Dispatcher` per endpoint, waiting
on the endpoint's single descriptor.

Backend ownership: :func:`connect` and :func:`listen` accept a
:class:`~gntipc.backends.Backend` instance (which stays yours: closing the stream or
listener never closes it), a backend name, or ``None`` (:func:`gntipc.get_backend`).  A
backend they opened themselves is closed when the last object using it closes: the stream
for :func:`connect`; for :func:`listen`, the listener *and* every stream it accepted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self

import anyio
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    TypedAttributeSet,
    WouldBlock,
    typed_attribute,
)
from anyio.abc import ByteStream
from anyio.lowlevel import checkpoint

from ._dispatch import Dispatcher
from ._exceptions import LocalProtocolError, RemoteProtocolError, XenError
from .backends import Backend, get_backend
from .channel import Vchan, _is_race

__all__ = [
    "Listener",
    "VchanAttribute",
    "VchanStream",
    "connect",
    "listen",
]

_DEFAULT_RING = 65536


class VchanAttribute(TypedAttributeSet):
    """Typed extra attributes of a :class:`VchanStream` (``stream.extra(VchanAttribute.x)``)."""

    #: The other side's domain id.
    peer_domid: int = typed_attribute()
    #: The absolute XenStore path of the channel.
    path: str = typed_attribute()
    #: Size in bytes of the ring we read from.
    read_size: int = typed_attribute()
    #: Size in bytes of the ring we write to.
    write_size: int = typed_attribute()
    #: The backend's name (``"xen"`` or ``"sim"``).
    backend: str = typed_attribute()
    #: True on the listening (server) side.
    is_server: bool = typed_attribute()


def _const(value: object) -> Callable[[], object]:
    return lambda: value


class _SharedBackend:
    """A backend opened by us, closed when its last user releases it."""

    __slots__ = ("backend", "users")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.users = 1

    def acquire(self) -> _SharedBackend:
        self.users += 1
        return self

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.backend.close()


def _open_backend(backend: Backend | str | None) -> tuple[Backend, _SharedBackend | None]:
    if isinstance(backend, Backend):
        return backend, None
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a Backend, a name or None, not {type(backend).__name__}")
    opened = get_backend(backend)
    return opened, _SharedBackend(opened)


class VchanStream(ByteStream):
    """A bidirectional byte stream over one vchan endpoint.

    Obtained from :func:`connect` or :meth:`Listener.accept` (or built around a connected
    :class:`~gntipc.Vchan`).  One task may send and another receive at the same time; two
    concurrent senders (or receivers) raise :class:`anyio.BusyResourceError` instead of
    interleaving bytes.

    Errors: :class:`anyio.EndOfStream` from :meth:`receive` after the peer closed cleanly
    (or sent EOF) and everything it wrote was received; :class:`anyio.BrokenResourceError`
    when the peer crashed or its domain died (again only after everything it wrote was
    received), and from :meth:`send` when the peer is gone;
    :class:`anyio.ClosedResourceError` after our own :meth:`aclose` (or, for sending,
    :meth:`send_eof`); :class:`gntipc.RemoteProtocolError` when the peer corrupted the
    shared page.
    """

    def __init__(
        self,
        vchan: Vchan,
        *,
        dispatcher: Dispatcher | None = None,
        _backend_ref: _SharedBackend | None = None,
    ) -> None:
        self._vchan: Vchan | None = vchan
        self._dispatcher = dispatcher if dispatcher is not None else Dispatcher(vchan)
        self._backend_ref = _backend_ref
        self._sending = False
        self._receiving = False
        self._eof_sent = False
        #: How many bytes of the item of the last (or current) :meth:`send` were written:
        #: after a cancelled send, the length of the prefix that will be delivered.
        self.send_progress = 0
        #: Spin-then-block policy for latency-critical users: when :meth:`receive` (and
        #: so :meth:`MessageQueue.get`) finds the ring empty, it first busy-waits up to
        #: ``spin`` seconds on the shared indices (no syscall, no event from the peer)
        #: before sleeping.  It blocks the event loop (and burns a CPU) for that long, so
        #: it is off (0.0) by default; a few tens of microseconds cut a round trip to a
        #: few microseconds when the peer answers quickly.
        self.spin = 0.0
        self._attrs: dict[Any, Callable[[], Any]] = {
            VchanAttribute.peer_domid: _const(vchan.peer),
            VchanAttribute.path: _const(vchan.path),
            VchanAttribute.read_size: _const(vchan.read_size),
            VchanAttribute.write_size: _const(vchan.write_size),
            VchanAttribute.backend: _const(vchan.backend.name),
            VchanAttribute.is_server: _const(vchan.is_server),
        }

    # -- introspection ---------------------------------------------------------------

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._attrs

    @property
    def vchan(self) -> Vchan:
        """The underlying channel endpoint.

        Raises:
            anyio.ClosedResourceError: the stream is closed.
        """
        if self._vchan is None:
            raise ClosedResourceError
        return self._vchan

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` (or :meth:`close`) ran."""
        return self._vchan is None

    def __repr__(self) -> str:
        if self._vchan is None:
            return f"<{type(self).__name__} closed>"
        return (
            f"<{type(self).__name__} peer={self._vchan.peer} path={self._vchan.path!r}"
            f" {'server' if self._vchan.is_server else 'client'}>"
        )

    # -- sending ---------------------------------------------------------------------

    def _send_vchan(self) -> Vchan:
        vchan = self._vchan
        if vchan is None or self._eof_sent:
            raise ClosedResourceError
        return vchan

    def send_nowait(self, item: bytes | bytearray | memoryview) -> None:
        """Write all of ``item`` now, or nothing.

        Raises:
            anyio.WouldBlock: the ring does not have room for all of ``item`` right now.
            gntipc.LocalProtocolError: ``item`` is larger than the ring (it can never fit
                at once; use :meth:`send`).
            anyio.BusyResourceError: another task is inside :meth:`send`.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: we closed the stream or sent EOF.
        """
        vchan = self._send_vchan()
        if self._sending:
            raise BusyResourceError("sending to")
        if not vchan.send_nowait(item):
            raise WouldBlock

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        """Send all of ``item``, waiting for ring space as needed.

        Cancellation: an ``item`` no larger than the ring (``write_size``) is written at
        once, when there is room for all of it, so a cancelled send has written nothing.
        A larger ``item`` is written in pieces; if cancelled, a *prefix* of it (possibly
        empty) has been written and will be delivered, the rest has not.  The stream stays
        consistent either way.

        Raises:
            anyio.BusyResourceError: another task is already sending.
            anyio.BrokenResourceError: the peer is gone (crashed, closed, domain died).
            anyio.ClosedResourceError: we closed the stream (also while waiting) or sent EOF.
        """
        vchan = self._send_vchan()
        if self._sending:
            raise BusyResourceError("sending to")
        self._sending = True
        self.send_progress = 0
        try:
            await checkpoint()
            total = item.nbytes if isinstance(item, memoryview) else len(item)
            if total == 0:
                return
            if total <= vchan.write_size:
                while not vchan.send_nowait(item):
                    if vchan.prepare_wait_write() >= total:
                        continue
                    await self._dispatcher.wait()
                    vchan = self._send_vchan()
                self.send_progress = total
                return
            # Released explicitly: a traceback keeping the frame alive must not keep the
            # caller's bytearray exported (it could not be resized any more).
            with memoryview(item) as raw, raw.cast("B") as view:
                offset = 0
                while offset < total:
                    n = vchan.write_nowait(view[offset:])
                    if n:
                        offset += n
                        self.send_progress = offset
                        continue
                    if vchan.prepare_wait_write() > 0:
                        continue
                    await self._dispatcher.wait()
                    vchan = self._send_vchan()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: the peer's :meth:`receive` raises EndOfStream once it has read
        everything we sent; our receive direction keeps working.  Idempotent.

        A plain libxenvchan peer sees nothing until we close.

        Raises:
            anyio.BusyResourceError: a send is in progress.
            anyio.ClosedResourceError: the stream is closed.
        """
        vchan = self.vchan
        if self._sending:
            raise BusyResourceError("sending to")
        if not self._eof_sent:
            self._eof_sent = True
            vchan.send_eof()
        await checkpoint()

    # -- receiving -------------------------------------------------------------------

    def _recv_vchan(self) -> Vchan:
        vchan = self._vchan
        if vchan is None:
            raise ClosedResourceError
        return vchan

    def receive_nowait(self, max_bytes: int = _DEFAULT_RING) -> bytes:
        """Return between 1 and ``max_bytes`` bytes that are available now.

        Raises:
            anyio.WouldBlock: nothing to read right now.
            anyio.EndOfStream: the peer closed (or sent EOF) and everything was read.
            anyio.BrokenResourceError: the peer crashed and everything it wrote was read.
            anyio.BusyResourceError: another task is inside :meth:`receive`.
            anyio.ClosedResourceError: we closed the stream.
            gntipc.RemoteProtocolError: the peer corrupted the shared page.
        """
        vchan = self._recv_vchan()
        if self._receiving:
            raise BusyResourceError("receiving from")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        data = vchan.read_nowait(max_bytes)
        if not data:
            raise WouldBlock
        return data

    async def receive(self, max_bytes: int = _DEFAULT_RING) -> bytes:
        """Return between 1 and ``max_bytes`` bytes, waiting for data if needed.

        Cancellation: nothing is consumed by a cancelled receive.

        Raises:
            anyio.EndOfStream: the peer closed (or sent EOF) and everything was read.
            anyio.BrokenResourceError: the peer crashed or its domain died, and everything
                it wrote was read.
            anyio.BusyResourceError: another task is already receiving.
            anyio.ClosedResourceError: we closed the stream (also while waiting).
            gntipc.RemoteProtocolError: the peer corrupted the shared page.
        """
        vchan = self._recv_vchan()
        if self._receiving:
            raise BusyResourceError("receiving from")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            await checkpoint()
            while True:
                data = vchan.read_nowait(max_bytes)
                if data:
                    return data
                # Spinning asks the peer for no event: it is cheaper for both sides.
                if self.spin > 0 and vchan._live_rings().spin_read(1, self.spin) > 0:
                    continue
                if vchan.prepare_wait_read() > 0:
                    continue
                await self._dispatcher.wait()
                vchan = self._recv_vchan()
        finally:
            self._receiving = False

    async def receive_exactly(self, nbytes: int) -> bytes:
        """Receive exactly ``nbytes`` bytes.

        Raises:
            anyio.IncompleteRead: the stream ended before ``nbytes`` arrived.
            The errors of :meth:`receive`.
        """
        chunks: list[bytes] = []
        remaining = nbytes
        while remaining > 0:
            try:
                chunk = await self.receive(remaining)
            except EndOfStream:
                raise anyio.IncompleteRead from None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    # -- waiting (for MessageQueue and other framers) --------------------------------

    async def wait_readable(self) -> None:
        """Wait until there may be data (or an end) to read; returns at once if there is.

        Raises:
            anyio.ClosedResourceError: the stream is (or gets) closed.
        """
        vchan = self._recv_vchan()
        if vchan.readable() or vchan.prepare_wait_read() or vchan.readable():
            return
        await self._dispatcher.wait()

    async def wait_writable(self, nbytes: int = 1) -> None:
        """Wait until at least ``min(nbytes, write_size)`` bytes of ring space are free.

        Raises:
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the stream is (or gets) closed or EOF was sent.
        """
        vchan = self._send_vchan()
        nbytes = min(nbytes, vchan.write_size)
        while vchan.buffer_space() < nbytes:
            if vchan.is_open() == 0:
                raise BrokenResourceError("the peer is gone")
            if vchan.prepare_wait_write() >= nbytes:
                return
            await self._dispatcher.wait()
            vchan = self._send_vchan()

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close now, without waiting (idempotent).  The peer drains what we wrote, then
        sees :class:`anyio.EndOfStream`.  Tasks blocked in :meth:`send` or
        :meth:`receive` get :class:`anyio.ClosedResourceError`."""
        vchan = self._vchan
        if vchan is None:
            return
        self._vchan = None
        self._dispatcher.close()
        try:
            vchan.close()
        finally:
            ref, self._backend_ref = self._backend_ref, None
            if ref is not None:
                ref.release()

    async def aclose(self) -> None:
        """Close the stream (idempotent; completes even when cancelled)."""
        self.close()
        await checkpoint()

    def __del__(self) -> None:
        if getattr(self, "_vchan", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)


class Listener:
    """Accepts clients on one channel path, one client per :meth:`accept`.

    Each :meth:`accept` publishes fresh keys at the path and waits for one client; the
    next :meth:`accept` publishes new keys (between accepts, a client's :func:`connect`
    waits for them).  Concurrent :meth:`accept` calls are served one after the other.
    """

    def __init__(
        self,
        backend: Backend,
        peer: int,
        path: str,
        *,
        read_size: int = _DEFAULT_RING,
        write_size: int = _DEFAULT_RING,
        _backend_ref: _SharedBackend | None = None,
    ) -> None:
        self.backend = backend
        self.peer = peer
        self.path = Vchan.resolve_path(backend.domid, path)
        self.read_size = read_size
        self.write_size = write_size
        self._backend_ref = _backend_ref
        self._closed = False
        self._lock = anyio.Lock()
        self._pending: tuple[Vchan, Dispatcher] | None = None

    async def accept(self) -> VchanStream:
        """Publish keys, wait for one client and return its stream.

        Cancellation: the keys are withdrawn; no client is lost (a client that connected
        meanwhile sees the stream closed).

        Raises:
            anyio.ClosedResourceError: the listener is (or gets) closed.
            gntipc.XenError: the backend refused (e.g. gntalloc limit reached: ENOSPC).
        """
        if self._closed:
            raise ClosedResourceError
        async with self._lock:
            if self._closed:
                raise ClosedResourceError
            vchan = Vchan.server(
                self.backend,
                self.peer,
                self.path,
                read_size=self.read_size,
                write_size=self.write_size,
            )
            dispatcher = Dispatcher(vchan)
            self._pending = (vchan, dispatcher)
            try:
                while vchan.is_open() == 2:
                    await dispatcher.wait()
                    if self._closed:
                        raise ClosedResourceError
            except BaseException:
                dispatcher.close()
                vchan.close()
                raise
            finally:
                self._pending = None
            ref = self._backend_ref.acquire() if self._backend_ref is not None else None
            return VchanStream(vchan, dispatcher=dispatcher, _backend_ref=ref)

    async def serve(
        self,
        handler: Callable[[VchanStream], Awaitable[Any]],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Accept clients forever, running ``handler(stream)`` for each in a task group.

        The stream is closed when its handler returns.  Runs until cancelled or the
        listener is closed (then returns after the running handlers end).  An exception
        from a handler propagates (cancelling the others), as usual in a task group.
        """

        async def run(stream: VchanStream) -> None:
            async with stream:
                await handler(stream)

        async def loop(tg: anyio.abc.TaskGroup) -> None:
            while True:
                try:
                    stream = await self.accept()
                except ClosedResourceError:
                    return
                tg.start_soon(run, stream)

        if task_group is not None:
            await loop(task_group)
        else:
            async with anyio.create_task_group() as tg:
                await loop(tg)

    def close(self) -> None:
        """Stop listening (idempotent): withdraws published keys; a waiting
        :meth:`accept` raises ClosedResourceError.  Accepted streams stay open."""
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].close()
            pending[0].close()
        ref, self._backend_ref = self._backend_ref, None
        if ref is not None:
            ref.release()

    async def aclose(self) -> None:
        """Stop listening (see :meth:`close`)."""
        self.close()
        await checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Listener peer={self.peer} path={self.path!r} {state}>"

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)


async def listen(
    peer: int,
    path: str,
    *,
    read_size: int = _DEFAULT_RING,
    write_size: int = _DEFAULT_RING,
    backend: Backend | str | None = None,
) -> Listener:
    """Listen for clients from domain ``peer`` at ``path``.

    A relative ``path`` is relative to our own XenStore home (we are the server):
    ``/local/domain/<our domid>/<path>``.  ``read_size`` / ``write_size`` are the ring
    sizes (powers of two from 1024 to 1 MiB) of the direction client→server and
    server→client.

    Raises:
        ValueError: bad ring sizes or domid.
        gntipc.BackendUnavailable: the chosen backend cannot run here.
    """
    for name, size in (("read_size", read_size), ("write_size", write_size)):
        if size < 1024 or size > 1 << 20 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two from 1024 to 1048576, not {size}")
    be, ref = _open_backend(backend)
    try:
        listener = Listener(
            be, peer, path, read_size=read_size, write_size=write_size, _backend_ref=ref
        )
    except BaseException:
        if ref is not None:
            ref.release()
        raise
    await checkpoint()
    return listener


# Errors that mean "these keys belong to a server that is gone or already taken":
# another attempt, after the keys change, may succeed.
_STALE_ERRORS = (XenError, RemoteProtocolError, WouldBlock)


async def connect(
    peer: int,
    path: str,
    *,
    timeout: float | None = None,
    backend: Backend | str | None = None,
) -> VchanStream:
    """Connect to the server in domain ``peer`` at ``path``.

    A relative ``path`` is relative to the *server's* home,
    ``/local/domain/<peer>/<path>``.  Waits (on a store watch, not by polling) until a
    server publishes keys there; keys that turn out stale (a server that is gone, or
    that another client took first) are retried when the keys change.

    Raises:
        TimeoutError: no connection within ``timeout`` seconds (``None``: wait forever);
            its ``__cause__`` is the last failed attempt, if any.
        gntipc.RemoteProtocolError: the server published invalid keys or control page.
        gntipc.LocalProtocolError: bad arguments.
        gntipc.BackendUnavailable: the chosen backend cannot run here.
    """
    if timeout is not None and (math.isnan(timeout) or timeout < 0):
        raise LocalProtocolError(f"timeout must be >= 0 or None, not {timeout}")
    be, ref = _open_backend(backend)
    try:
        full = Vchan.resolve_path(peer, path)
        errors: list[Exception] = []
        try:
            with anyio.fail_after(timeout):
                vchan = await _connect_loop(be, peer, full, errors)
        except TimeoutError:
            cause = errors[0] if errors else None
            raise TimeoutError(f"no gntipc server at {full} within {timeout} s") from cause
    except BaseException:
        if ref is not None:
            ref.release()
        raise
    return VchanStream(vchan, _backend_ref=ref)


async def _connect_loop(backend: Backend, peer: int, path: str, errors: list[Exception]) -> Vchan:
    watch = backend.store.watch(path)
    try:
        while True:
            watch.read_events()
            try:
                return Vchan.client_nowait(backend, peer, path)
            except _STALE_ERRORS as exc:
                if isinstance(exc, RemoteProtocolError) and not _is_race(exc):
                    raise  # invalid keys or control page: a clear error, not a hang
                # Retried only after the store changes, so a permanent error costs no CPU;
                # it becomes the cause of the TimeoutError.
                errors[:] = [exc]
            await anyio.wait_readable(watch.fileno())
    finally:
        watch.close()
