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

import contextlib
import errno
import logging
import math
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, TypeVar

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
from anyio.abc import AsyncResource, ByteStream
from anyio.lowlevel import checkpoint

from . import _astore
from ._connect import connect_async
from ._dispatch import Dispatcher
from ._domid import check_domid
from ._endpoint import Endpoint
from ._exceptions import (
    LocalProtocolError,
    RemoteProtocolError,
    XenError,
    XenStoreTimeout,
    raise_errno,
)
from ._keys import PathClaim, claim_path, resolve_path, why_no_server
from ._soon import Deferred
from ._spin import DEFAULT_SPIN_ASYNC, Spinner, can_spin_async
from ._stats import VchanStreamStatistics
from .backends import Backend, get_backend
from .backends._abc import Buffer
from .channel import Vchan
from .protocol import DEFAULT_RING_SIZE as _DEFAULT_RING
from .protocol import (
    LIVE_GONE,
    LIVE_WAITING,
    VchanState,
    channel_pages,
    check_ring_size,
    fit_ring_sizes,
)

_A = TypeVar("_A")
_R = TypeVar("_R")

__all__ = [
    "Listener",
    "ReceiveView",
    "VchanAttribute",
    "VchanStream",
    "connect",
    "listen",
]

#: Where :class:`Listener` reports the clients it dropped and the channels it could not offer.
logger = logging.getLogger(__name__)
#: :meth:`Listener.serve` retries a failed offer of a channel after a pause that doubles
#: from the first to the second value (seconds).
SERVE_RETRY = (0.05, 5.0)
#: A stream call that need not wait still yields to the event loop when it has not done so
#: for this long (seconds): other tasks wait at most about this long for a busy stream.
FAIR_SLICE = 100e-6

#: A receive (or receive_into) of fewer bytes than this reads up to this many out of the
#: ring and hands out the rest on the next calls, as a socket's buffer does: the writer
#: then gets ring space in blocks, not a wake-up per small read.
READ_AHEAD = 4096

#: Writes held back by :meth:`VchanStream._send_soon` go to the ring at once when this
#: many bytes (or a quarter of the ring) are waiting, else before the stream waits for
#: anything or when the event loop runs after the writing task yields.
FLUSH_BYTES = 16384


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
    #: True once the peer is known to be gntipc (it understands :meth:`VchanStream.send_eof`;
    #: a plain libxenvchan peer sees nothing of a half-close until we close).
    peer_is_gntipc: bool = typed_attribute()


def _const(value: object) -> Callable[[], object]:
    return lambda: value


class _SharedBackend:
    """A backend opened by us, closed when its last user releases it.

    Thread-safe: a close or an abandoned store operation finishing in a worker thread
    (:mod:`gntipc._astore`) holds a reference until it is done, and releases it there.
    """

    __slots__ = ("_lock", "backend", "users")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.users = 1
        self._lock = threading.Lock()

    def acquire(self) -> _SharedBackend:
        with self._lock:
            if self.users == 0:
                raise ClosedResourceError("the backend is closed")
            self.users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.backend.close()


async def _open_backend(backend: Backend | str | None) -> tuple[Backend, _SharedBackend | None]:
    if isinstance(backend, Backend):
        return backend, None
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a Backend, a name or None, not {type(backend).__name__}")
    # Opening one talks to the store (xen: our domid) or the state database (sim).
    opened = await _astore.run(
        get_backend, backend, what="opening the backend", discard=_close_backend
    )
    return opened, _SharedBackend(opened)


def _close_backend(backend: Backend) -> None:
    backend.close()


def _close_vchan(vchan: Vchan) -> None:
    vchan.close()


def _close_all(
    vchan: Vchan | None, ref: _SharedBackend | None, claim: PathClaim | None = None
) -> None:
    """Close ``vchan``, then withdraw a listener's ``claim`` of its path, then release
    ``ref`` (each even if the one before failed)."""
    try:
        try:
            if vchan is not None:
                vchan.close()
        finally:
            if claim is not None:
                claim.release()
    finally:
        if ref is not None:
            ref.release()


async def _aclose_all(
    vchan: Vchan | None, ref: _SharedBackend | None, path: str, claim: PathClaim | None = None
) -> None:
    """:func:`_close_all` in a worker thread (it removes store nodes), shielded, bounded
    by :data:`gntipc._astore.STORE_TIMEOUT`.

    Raises:
        XenStoreTimeout: not done in time (the close completes in the background).
        Whatever the close raises (MappingInUse, XenError).
    """
    if vchan is None and ref is None and claim is None:
        return
    await _astore.run_cleanup(
        _close_all,
        vchan,
        ref,
        claim,
        what=f"closing the channel at {path} (removing its store nodes)",
    )


class ReceiveView:
    """Received bytes in place: a read-only view of the ring itself, no copy (from
    :meth:`VchanStream.receive_view`).  The bytes stay in the ring, and the stream
    receives nothing else, until the view is released; then they are consumed (all, or
    the count given to :meth:`release`) and the writer gets their room.

    Use it as a context manager (``with`` or ``async with``), which gives the
    memoryview and releases it on exit; after the release the memoryview raises
    ValueError.  A view derived from it (a slice, a numpy array) keeps the ring's pages
    mapped but not the bytes: once released, the writer may overwrite them.

    **The peer is untrusted**: it can still write into that part of the ring while you
    look at it.  Copy what you must validate before validating it.
    """

    __slots__ = ("_done", "_view")

    def __init__(self, view: memoryview, done: Callable[[int], None]) -> None:
        self._view: memoryview | None = view
        self._done = done

    @property
    def data(self) -> memoryview:
        """The bytes (read-only).

        Raises:
            ValueError: the view was released.
        """
        if self._view is None:
            raise ValueError("this receive view was released")
        return self._view

    def __len__(self) -> int:
        return 0 if self._view is None else self._view.nbytes

    def __bool__(self) -> bool:
        return self._view is not None

    def release(self, consumed: int | None = None) -> None:
        """Consume ``consumed`` bytes (default: all of them; fewer leaves the rest for
        the next receive) and end the view.  Idempotent: a later call does nothing.

        Raises:
            ValueError: ``consumed`` is not from 0 to the view's length (nothing is
                consumed then and the view stays).
        """
        view = self._view
        if view is None:
            return
        n = view.nbytes if consumed is None else consumed
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= view.nbytes:
            raise ValueError(f"consumed must be 0 to {view.nbytes}, not {consumed!r}")
        self._view = None
        # An export of the view itself (e.g. a numpy array made from it) keeps it; the
        # mapping stays, the bytes are handed back all the same.
        with contextlib.suppress(BufferError):
            view.release()
        self._done(n)

    def __enter__(self) -> memoryview:
        return self.data

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> memoryview:
        return self.data

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _abandon(self) -> None:
        """End the view without consuming anything (its stream is closing)."""
        view, self._view = self._view, None
        if view is not None:
            with contextlib.suppress(BufferError):
                view.release()

    def __repr__(self) -> str:
        state = "released" if self._view is None else f"{len(self)} bytes"
        return f"<gntipc.ReceiveView {state}>"


class VchanStream(ByteStream):
    """A bidirectional byte stream over one vchan endpoint.

    Obtained from :func:`connect` or :meth:`Listener.accept` (or built around a connected
    :class:`~gntipc.Vchan`).  One task may send and another receive at the same time; two
    concurrent senders (or receivers) raise :class:`anyio.BusyResourceError` instead of
    interleaving bytes.

    Waiting: when the ring is empty (receiving) or full (sending), the stream first
    spins on the shared indices for up to :attr:`spin` seconds, in slices that yield to
    the event loop, and only then sleeps on an event from the peer.  It spins only while
    the channel has been busy recently, so an idle stream costs no CPU.

    Scheduling: a call that must wait yields to the event loop (and is where a
    cancellation lands); a call that need not wait yields only if this stream has not
    yielded for :data:`FAIR_SLICE` (100 µs), so a busy stream neither starves other tasks
    nor pays a full loop iteration per call.

    Errors: :class:`anyio.EndOfStream` from :meth:`receive` after the peer closed cleanly
    (or sent EOF) and everything it wrote was received; :class:`anyio.BrokenResourceError`
    when the peer crashed or its domain died (again only after everything it wrote was
    received), and from :meth:`send` when the peer is gone;
    :class:`anyio.ClosedResourceError` after our own :meth:`aclose` (or, for sending,
    :meth:`send_eof`); :class:`gntipc.RemoteProtocolError` when the peer corrupted the
    shared page.
    """

    #: The fast path :class:`gntipc.MessageQueue` and :class:`gntipc.Session` take on
    #: this stream (see :mod:`gntipc._fastpath`): a ring.
    gntipc_fast_path: ClassVar[str] = "ring"

    def __init__(
        self,
        vchan: Vchan,
        *,
        dispatcher: Dispatcher | None = None,
        _backend_ref: _SharedBackend | None = None,
    ) -> None:
        self._vchan: Vchan | None = vchan
        self._ep = vchan.endpoint
        self._dispatcher = dispatcher if dispatcher is not None else Dispatcher(vchan.endpoint)
        self._backend_ref = _backend_ref
        self._sending = False
        self._receiving = False
        # The receive_view handed out and not released yet (ended by a close).
        self._view_out: ReceiveView | None = None
        # Bytes taken out of the ring by a small receive and not handed out yet
        # (READ_AHEAD): self._ahead[self._ahead_pos:].
        self._ahead = b""
        self._ahead_pos = 0
        # Deferred writes (_send_soon): bytes accepted for the ring, not written yet; they
        # are written before anything else this stream writes, waits for or closes, and
        # at the latest when the event loop runs the scheduled flush.  _later_room is
        # ring space known to be free beyond them (free space only grows while nothing
        # else writes, so what was accepted always fits when it is flushed).
        self._later = Deferred()
        self._later_room = 0
        self._flush_at = min(FLUSH_BYTES, vchan.write_size // 4)
        # On a machine with one CPU, a peer in another process (or VM) runs when we
        # yield the CPU to it: the spinners spin there too, and the copies are made by
        # the native spin-and-copy calls, which hand the CPU over and copy on without
        # returning to Python (see gntipc._spin).  A peer in this process (both ends of
        # a loopback pair in one event loop) runs only when we return to the loop: no
        # spinning for it.
        alone = not vchan.endpoint.peer_in_process
        self._read_spinner = Spinner(DEFAULT_SPIN_ASYNC, one_cpu=alone)
        self._yielded = 0.0
        self._write_spinner = Spinner(DEFAULT_SPIN_ASYNC, one_cpu=alone)
        hand_over = alone and not can_spin_async()
        self._copy_read_spinner = self._read_spinner if hand_over else None
        self._copy_write_spinner = self._write_spinner if hand_over else None
        self._send_waits = 0
        self._receive_waits = 0
        #: How many bytes of the item of the last (or current) :meth:`send` were written:
        #: after a cancelled send, the length of the prefix that will be delivered.
        self.send_progress = 0
        self._attrs: dict[Any, Callable[[], Any]] = {
            VchanAttribute.peer_domid: _const(vchan.peer),
            VchanAttribute.path: _const(vchan.path),
            VchanAttribute.read_size: _const(vchan.read_size),
            VchanAttribute.write_size: _const(vchan.write_size),
            VchanAttribute.backend: _const(vchan.backend.name),
            VchanAttribute.is_server: _const(vchan.is_server),
            VchanAttribute.peer_is_gntipc: lambda: vchan.endpoint.peer_is_gntipc,
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

    @property
    def spin(self) -> float:
        """The wait policy: how long (seconds) :meth:`send` and :meth:`receive` may
        busy-wait on the ring before sleeping on an event, while the channel is busy.

        Spinning trades a CPU for latency: a round trip costs a few microseconds instead
        of a wake-up (tens of microseconds), and a bulk transfer needs no events at all
        while both sides keep up.  The default (about one wake-up's cost) is never worse
        than twice the optimum; 0 disables spinning (every wait sleeps at once).
        """
        return self._read_spinner.limit

    @spin.setter
    def spin(self, seconds: float) -> None:
        self._read_spinner.limit = seconds
        self._write_spinner.limit = seconds

    def statistics(self) -> VchanStreamStatistics:
        """A snapshot of what this stream has done so far (bytes, events, waits,
        spins, ring high-water marks) and of the peer's state; also after close.

        Cheap (no system call, no store access): call it as often as you like.

        Raises:
            gntipc.RemoteProtocolError: the peer corrupted its live byte (the shared
                page), as any other operation on the stream would then report.
        """
        ep = self._ep
        state = VchanState.CLOSED
        if self._vchan is not None:
            # Closed from another thread since the check: CLOSED it is.
            with contextlib.suppress(ClosedResourceError):
                state = VchanState(ep.peer_live())
        rs, ws, c = self._read_spinner, self._write_spinner, ep.counters
        return VchanStreamStatistics(
            bytes_sent=c.bytes_out,
            bytes_received=c.bytes_in - (len(self._ahead) - self._ahead_pos),
            events_sent=c.events_out,
            events_received=c.events_in,
            send_waits=self._send_waits,
            receive_waits=self._receive_waits,
            send_spins=ws.spins,
            send_spin_hits=ws.spin_hits,
            receive_spins=rs.spins,
            receive_spin_hits=rs.spin_hits,
            send_ring_size=ep.write_size,
            receive_ring_size=ep.read_size,
            send_ring_high_water=c.write_high,
            receive_ring_high_water=c.read_high,
            peer_state=state,
            peer_is_gntipc=ep.peer_is_gntipc,
        )

    def __repr__(self) -> str:
        if self._vchan is None:
            return f"<{type(self).__name__} closed>"
        return (
            f"<{type(self).__name__} peer={self._vchan.peer} path={self._vchan.path!r}"
            f" {'server' if self._vchan.is_server else 'client'}>"
        )

    # -- sending ---------------------------------------------------------------------

    def _check_send(self) -> Endpoint:
        if self._vchan is None or self._ep.eof_sent:
            raise ClosedResourceError
        if self._sending:
            raise BusyResourceError("sending to")
        return self._ep

    def send_nowait(self, item: Buffer) -> None:
        """Write all of ``item`` now, or nothing.

        Raises:
            anyio.WouldBlock: the ring does not have room for all of ``item`` right now.
            gntipc.LocalProtocolError: ``item`` is larger than the ring (it can never fit
                at once; use :meth:`send`).
            anyio.BusyResourceError: another task is inside :meth:`send`.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: we closed the stream or sent EOF.
        """
        ep = self._check_send()
        if self._later.buf and not self._flush():
            raise WouldBlock
        if not ep.send_nowait(item):
            raise WouldBlock

    def _send_soon(self, item: Buffer) -> bool:
        """Accept ``item`` (a packet: a ``B``-format buffer) for the ring without writing
        it yet: it is written, after what was accepted before and before anything else
        this stream writes, when :data:`FLUSH_BYTES` have gathered, before this stream
        waits for anything, when it closes, and at the latest when the event loop runs
        its callbacks after the calling task yields (asyncio: in its next iteration;
        trio: with its next batch of ``run_sync_soon`` callbacks).  Many small packets
        then cost one ring write and at most one notification; a packet that does not
        follow another closely (:data:`gntipc._soon.BURST_GAP`) is written at once.
        Returns False, accepting nothing, when ``item`` does not fit the ring's free
        space now (write it with :meth:`send_nowait` or :meth:`send`).

        Raises: as :meth:`send_nowait`.
        """
        if self._vchan is None or self._sending or self._ep.eof_sent:
            self._check_send()  # raises
        n = len(item)
        later = self._later.buf
        if n > self._later_room:
            self._later_room = self._ep.buffer_space() - len(later)
            if n > self._later_room:
                return False
        later += item
        self._later_room -= n
        if len(later) >= self._flush_at or not self._later.in_burst():
            self._flush()
        else:
            self._later.schedule(self._flush)
        return True

    def _flush(self) -> bool:
        """Write what :meth:`_send_soon` held back, as much as fits (the rest stays, in
        order); True once nothing is left.

        Raises: as :meth:`send_nowait` (nothing is written then).
        """
        later = self._later.buf
        if not later:
            return True
        if self._vchan is None:
            raise ClosedResourceError
        written, _ = self._ep.write_from(later, 0)
        del later[:written]
        if later:
            self._later_room = 0
            return False
        return True

    async def _drain_later(self) -> None:
        """Write what :meth:`_send_soon` held back, waiting for ring space if needed."""
        ep = self._ep
        while not self._flush():
            self._send_waits += 1
            await self._dispatcher.wait_for(ep.poll_write, ep.spin_write, self._write_spinner, 1)
            self._yielded = time.monotonic()

    def _flush_before_wait(self) -> None:
        """Before this stream waits for the peer: what was held back goes out first (the
        peer may be waiting for it to answer)."""
        if self._later.buf:
            with contextlib.suppress(Exception):  # reported by the next send
                self._flush()

    async def send(self, item: Buffer) -> None:
        """Send all of ``item`` (any buffer: bytes, bytearray, memoryview, numpy array),
        waiting for ring space as needed.

        The writer fills whatever space is free and goes on as the reader frees more, so
        writer and reader overlap on the ring.  A buffer that is not C-contiguous is
        copied first.

        Cancellation: a *prefix* of ``item`` (possibly empty, possibly all of it) has been
        written and will be delivered; :attr:`send_progress` says how long it is.  The
        stream stays consistent.

        Raises:
            anyio.BusyResourceError: another task is already sending.
            anyio.BrokenResourceError: the peer is gone (crashed, closed, domain died).
            anyio.ClosedResourceError: we closed the stream (also while waiting) or sent EOF.
        """
        ep = self._check_send()
        self._sending = True
        self.send_progress = 0
        try:
            now = time.monotonic()
            if now - self._yielded >= FAIR_SLICE:
                self._yielded = now
                await self._dispatcher.checkpoint()
            if self._later.buf:
                await self._drain_later()
            spinner = self._copy_write_spinner
            try:
                offset, total = ep.write_from(item, 0, spinner)
            except BufferError:
                # Not C-contiguous (a strided view): copied once, then sent.
                item = memoryview(item).tobytes()
                offset, total = ep.write_from(item, 0, spinner)
            self.send_progress = offset
            while offset < total:
                self._send_waits += 1
                await self._dispatcher.wait_for(
                    ep.poll_write, ep.spin_write, self._write_spinner, 1
                )
                self._yielded = time.monotonic()
                if self._vchan is None:
                    raise ClosedResourceError
                offset += ep.write_from(item, offset, spinner)[0]
                self.send_progress = offset
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
        if self._vchan is None:
            raise ClosedResourceError
        if self._sending:
            raise BusyResourceError("sending to")
        if self._later.buf:
            self._sending = True
            try:
                await self._drain_later()
            finally:
                self._sending = False
        self._ep.send_eof()
        await checkpoint()

    # -- receiving -------------------------------------------------------------------

    def _check_receive(self, max_bytes: int) -> Endpoint:
        if self._vchan is None:
            raise ClosedResourceError
        if self._receiving:
            raise BusyResourceError("receiving from")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        return self._ep

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
        self._check_receive(max_bytes)
        data = self._read_some(max_bytes)
        if not data:
            raise WouldBlock
        return data

    async def receive(self, max_bytes: int = _DEFAULT_RING) -> bytes:
        """Return between 1 and ``max_bytes`` bytes, waiting for data if needed.

        The bytes are copied once, from the ring straight into the returned object (a
        read that reaches the ring's end stops there; the rest comes next).  A receive
        of fewer than :data:`READ_AHEAD` bytes takes up to that many out of the ring and
        returns the rest from the next calls (as a socket's buffer would), so that a
        writer waiting for space gets it in blocks, not one wake-up per small receive.

        Cancellation: nothing is consumed by a cancelled receive.

        Raises:
            anyio.EndOfStream: the peer closed (or sent EOF) and everything was read.
            anyio.BrokenResourceError: the peer crashed or its domain died, and everything
                it wrote was read.
            anyio.BusyResourceError: another task is already receiving.
            anyio.ClosedResourceError: we closed the stream (also while waiting).
            gntipc.RemoteProtocolError: the peer corrupted the shared page.
        """
        self._check_receive(max_bytes)
        return await self._receive_with(self._read_some, max_bytes)

    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Receive between 1 and ``len(buffer)`` bytes into ``buffer`` (a writable,
        C-contiguous buffer), waiting if needed; returns the count.  No allocation:
        one copy from the ring into ``buffer`` (a buffer smaller than :data:`READ_AHEAD`
        reads ahead, as :meth:`receive` does).

        Cancellation: nothing is consumed by a cancelled receive.

        Raises: as :meth:`receive`, ValueError for an empty ``buffer`` and TypeError for a
        read-only one.
        """
        self._check_receive(memoryview(buffer).nbytes)
        return await self._receive_with(self._readinto_some, buffer)

    # A receive of fewer than READ_AHEAD bytes takes up to READ_AHEAD out of the ring and
    # keeps the rest for the next calls: consuming a few bytes per call would wake a
    # writer waiting for ring space once per call (in the Xen kit, 7-byte receives over a
    # 1 KiB ring cost ~8,500 wake-ups per 120 KB, ~3 ms each on one vCPU).
    def _read_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes: the read-ahead first, else from the ring (``b""``
        if none yet; the endpoint's errors once the ring has ended)."""
        ahead, pos = self._ahead, self._ahead_pos
        if ahead:
            end = min(pos + max_bytes, len(ahead))
            self._take_ahead(end)
            return ahead[pos:end]
        if max_bytes >= READ_AHEAD:
            return self._ep.read_nowait(max_bytes)
        data = self._ep.read_nowait(READ_AHEAD)
        if len(data) <= max_bytes:
            return data
        self._ahead, self._ahead_pos = data, max_bytes
        return data[:max_bytes]

    def _readinto_some(self, buffer: bytearray | memoryview) -> int:
        """As :meth:`_read_some`, into ``buffer``; returns the count."""
        view = memoryview(buffer)
        if view.readonly:  # before anything is taken out of the ring
            raise TypeError("receive_into needs a writable buffer")
        if not self._ahead and view.nbytes >= READ_AHEAD:
            return self._ep.readinto_nowait(buffer, spinner=self._copy_read_spinner)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        data = self._read_some(view.nbytes)
        view[: len(data)] = data
        return len(data)

    def _take_ahead(self, end: int) -> None:
        if end >= len(self._ahead):
            self._ahead, self._ahead_pos = b"", 0
        else:
            self._ahead_pos = end

    async def _receive_with(self, read: Callable[[_A], _R], arg: _A) -> _R:
        """``read(arg)`` (a non-waiting endpoint read) until it returns something, waiting
        between attempts: the body of :meth:`receive` and :meth:`receive_into`."""
        ep = self._ep
        self._receiving = True
        try:
            now = time.monotonic()
            if now - self._yielded >= FAIR_SLICE:
                self._yielded = now
                await self._dispatcher.checkpoint()
            while True:
                if self._vchan is None:
                    raise ClosedResourceError
                got = read(arg)
                if got:
                    return got
                self._receive_waits += 1
                self._flush_before_wait()
                await self._dispatcher.wait_for(ep.poll_read, ep.spin_read, self._read_spinner, 1)
                self._yielded = time.monotonic()
        finally:
            self._receiving = False

    async def receive_view(self, max_bytes: int = _DEFAULT_RING) -> ReceiveView:
        """Wait for data, then hand out up to ``max_bytes`` of it in place: a
        :class:`ReceiveView` of the ring itself, no copy (for parsers that work in
        place).  The bytes are consumed when the view is released (all, or as many as
        :meth:`ReceiveView.release` is told); until then the stream receives nothing
        else (:class:`anyio.BusyResourceError`).  A view stops at the ring's end (the
        rest, wrapped to its start, comes with the next one), so it may be shorter than
        what is readable.

        The bytes stay the peer's to overwrite until consumed, and a hostile peer can:
        copy what you must validate first.  Closing the stream ends a view not released
        yet (it raises ValueError from then on); a view derived from it (a slice, a
        numpy array) keeps the ring's pages mapped, and the close raises
        :class:`gntipc.MappingInUse`: release those first.

        Cancellation: nothing is consumed by a cancelled receive_view.

        Raises: as :meth:`receive`.
        """
        self._check_receive(max_bytes)
        view = await self._receive_with(self._view_some, max_bytes)
        assert view is not None  # _receive_with returns what is there
        self._receiving = True  # until the view is released
        self._view_out = view
        return view

    def _view_some(self, max_bytes: int) -> ReceiveView | None:
        """A view of up to ``max_bytes`` bytes: the read-ahead first, else the ring
        (None if none yet; the endpoint's errors once the ring has ended)."""
        ahead, pos = self._ahead, self._ahead_pos
        if ahead:
            end = min(pos + max_bytes, len(ahead))

            def done_ahead(n: int) -> None:
                self._receiving = False
                self._view_out = None
                if self._ahead is ahead:
                    self._take_ahead(pos + n)

            return ReceiveView(memoryview(ahead)[pos:end], done_ahead)
        view = self._ep.read_view(max_bytes)
        return None if view is None else ReceiveView(view, self._consume_view)

    def _consume_view(self, n: int) -> None:
        self._receiving = False
        self._view_out = None
        if n and self._vchan is not None:
            # Closed meanwhile (from another thread): nothing left to consume.
            with contextlib.suppress(ClosedResourceError):
                self._ep.consume(n)

    async def receive_exactly(self, nbytes: int) -> bytes:
        """Receive exactly ``nbytes`` bytes.

        Besides the error below, it raises those of :meth:`receive`.

        Raises:
            anyio.IncompleteRead: the stream ended before ``nbytes`` arrived.
        """
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nbytes:
                try:
                    got += await self.receive_into(view[got:])
                except EndOfStream:
                    raise anyio.IncompleteRead from None
        finally:
            view.release()
        return bytes(buf)

    # -- waiting ---------------------------------------------------------------------

    async def wait_readable(self) -> None:
        """Wait until there may be data (or an end) to read; returns at once if there is.

        For callers that read with :meth:`receive_nowait` (or parse in place) and want to
        wait without taking any bytes out of the ring.  Cancellation leaves the stream as
        it was.

        Raises:
            anyio.ClosedResourceError: the stream is (or gets) closed.
        """
        if self._vchan is None:
            raise ClosedResourceError
        ep = self._ep
        while not self._ahead and not ep.readable():
            self._receive_waits += 1
            self._flush_before_wait()
            await self._dispatcher.wait_for(ep.poll_read, ep.spin_read, self._read_spinner, 1)

    async def wait_writable(self, nbytes: int = 1) -> None:
        """Wait until at least ``min(nbytes, write_size)`` bytes of ring space are free.

        For callers that write all or nothing with :meth:`send_nowait`:
        :class:`gntipc.MessageQueue` waits here for room for a whole frame, so that a
        cancelled put never leaves half a frame in the ring.  Cancellation leaves the
        stream as it was.

        Raises:
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the stream is (or gets) closed or EOF was sent.
        """
        ep = self._ep
        if self._vchan is None or ep.eof_sent:
            raise ClosedResourceError
        nbytes = min(nbytes, ep.write_size)
        if self._later.buf:
            await self._drain_later()
        while ep.buffer_space() < nbytes:
            if ep.peer_state() == LIVE_GONE:
                raise BrokenResourceError("the peer is gone")
            self._send_waits += 1
            await self._dispatcher.wait_for(
                ep.poll_write, ep.spin_write, self._write_spinner, nbytes
            )

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close now, in the calling thread (idempotent): this blocks on the store
        (removing our store nodes); in async code, use :meth:`aclose`.  The peer drains
        what we wrote, then sees :class:`anyio.EndOfStream`.  Tasks blocked in
        :meth:`send` or :meth:`receive` get :class:`anyio.ClosedResourceError`.

        Called from another thread than the one that wrote, a close does not write what
        a :class:`~gntipc.MessageQueue` put in the last moment (before the event loop
        ran again) and did not write yet: a close racing a put loses that put."""
        if self._vchan is not None:
            if self._later.writer_thread():
                self._flush_before_wait()
            _close_all(*self._stop())

    async def aclose(self) -> None:
        """Close the stream (idempotent).  The peer is told at once; the store work
        (removing our store nodes) runs in a worker thread, so a slow store never blocks
        the event loop.

        Cancellation: the close completes anyway (shielded, at most 30 seconds, the
        store timeout).

        Raises:
            gntipc.XenStoreTimeout: the store did not answer in time; the close completes
                in the background.
        """
        if self._vchan is not None:
            self._flush_before_wait()
            path = self._vchan.path
            await _aclose_all(*self._stop(), path)
        await checkpoint()

    def _stop(self) -> tuple[Vchan, _SharedBackend | None]:
        """Mark the stream closed and wake its waiting tasks; returns what is left to
        close: the channel, and our hold on the backend."""
        vchan, self._vchan = self._vchan, None
        assert vchan is not None
        self._dispatcher.close()
        view, self._view_out = self._view_out, None
        if view is not None:
            # It raises from now on: the ring may be unmapped (unless a view derived
            # from it keeps the pages: then the close says MappingInUse).
            view._abandon()
        ref, self._backend_ref = self._backend_ref, None
        return vchan, ref

    def __del__(self) -> None:
        if getattr(self, "_vchan", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)


class Listener(AsyncResource):
    """Accepts clients on one channel path, one client per :meth:`accept`.

    Each :meth:`accept` publishes fresh keys at the path and waits for one client; they
    are withdrawn as soon as that client took them, and the next :meth:`accept`
    publishes new keys (between accepts, a client's :func:`connect` waits for them: a
    client that comes while the path is offered again never finds the keys of the
    previous channel, whose port its client gives back when it leaves).  Concurrent
    :meth:`accept` calls are served one after the other.

    One listener per path: a listener claims its path (:func:`listen` does, else the
    first :meth:`accept`) until it is closed, and a second listener on the path is
    refused with EADDRINUSE while the first one's process lives.

    ``max_clients`` sizes each client's rings to the domain's page budget (see
    :func:`listen`).

    A relative path is relative to our home, and follows it: should our domain be
    restored or migrated under a new domid (our process running on), the next offer is
    made in the new home (:attr:`path` says where).  Clients of the old domid see their
    channel break, as with any death of the domain.
    """

    def __init__(
        self,
        backend: Backend,
        peer: int,
        path: str,
        *,
        read_size: int = _DEFAULT_RING,
        write_size: int = _DEFAULT_RING,
        max_clients: int | None = None,
        _backend_ref: _SharedBackend | None = None,
    ) -> None:
        self.backend = backend
        self.peer = check_domid(peer)
        self.path = resolve_path(backend.domid, path)
        #: The path as given (a relative one follows our home: see :meth:`_offer`).
        self._given_path = path
        self.read_size = read_size
        self.write_size = write_size
        if max_clients is not None and (
            isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1
        ):
            raise ValueError(f"max_clients must be an int >= 1 or None, not {max_clients!r}")
        self.max_clients = max_clients
        #: The channels handed out (while open, they hold their pages) and their size;
        #: weak references: this list must not keep a dropped stream alive.
        self._carried: list[tuple[weakref.ref[VchanStream], int]] = []
        self._sizes_logged: tuple[int, int] | None = None
        self._backend_ref = _backend_ref
        self._closed = False
        self._lock = anyio.Lock()
        self._pending: tuple[Vchan, Dispatcher] | None = None
        self._claim: PathClaim | None = None
        #: The control page's grant of the channel on offer (its keys' ``ring-ref``).
        self._offered_ref: int | None = None

    async def accept(self) -> VchanStream:
        """Publish keys, wait for one client and return its stream.

        The store work (publishing the keys, watching the client's presence node) runs
        in worker threads, each waited for at most 30 seconds (the store timeout), so a
        slow store never blocks the event loop.

        A client that breaks the protocol while connecting (e.g. an invalid live byte in
        the control page), or a store failure while its connection is set up, costs only
        that client: it is logged (:data:`logger`) and dropped, and fresh keys are
        published for the next one.

        Cancellation: the keys are withdrawn (waiting for the store at most until the
        deadline above); no client is lost (a client that connected meanwhile sees the
        stream closed).

        Raises:
            anyio.ClosedResourceError: the listener is (or gets) closed.
            gntipc.XenError: the backend refused to offer a channel (e.g. gntalloc limit
                reached: ENOSPC; the store failed while publishing the keys); EADDRINUSE:
                another listener serves the path (the first accept claims the path if
                :func:`listen` did not: a listener made without it, or a store failure
                then).
            gntipc.XenStoreTimeout: the store did not answer in time while the keys were
                published (the offer is withdrawn in the background).
        """
        if self._closed:
            raise ClosedResourceError
        async with self._lock:
            while True:
                if self._closed:
                    raise ClosedResourceError
                # Held until the channel is handed over or closed: closing the listener
                # meanwhile must not close a backend we still use.
                hold = self._backend_ref.acquire() if self._backend_ref is not None else None
                try:
                    vchan = await _astore.run(
                        self._offer,
                        what=f"offering a channel at {self.path} (publishing its keys)",
                        discard=_close_vchan,
                        holder=hold,
                    )
                except BaseException:
                    await _aclose_all(None, hold, self.path)
                    raise
                stream = await self._await_client(vchan, hold)
                if stream is not None:
                    return stream

    def _claim_path(self) -> PathClaim:
        return claim_path(self.backend, self.path, self.peer)

    def _offer(self) -> Vchan:
        path = resolve_path(self.backend.domid, self._given_path)
        if path != self.path:
            # Our domain is another domid now (restored or migrated: its home moved, and
            # the claim went with the old home): the path follows the home.
            claim, self._claim = self._claim, None
            if claim is not None:
                with contextlib.suppress(XenError):
                    claim.release()
            self.path = path
        if self._claim is None:
            self._claim = self._claim_path()
        claim = self._claim
        try:
            vchan = self._offer_sized()
        except XenError as exc:
            if exc.errno == errno.ENOSPC:
                # Our clients are told at once, instead of waiting for keys.
                with contextlib.suppress(XenError):
                    claim.refuse("ENOSPC")
            raise
        try:
            claim.refuse("")  # no store I/O unless we were refusing
            self._offered_ref = claim.published_ref()
        except BaseException:
            vchan.close()
            raise
        return vchan

    def _taken(self, ep: Endpoint) -> None:
        """A client took the channel on offer: withdraw its keys (best effort: else
        the next offer replaces them), then start watching the client's presence node.
        Store I/O, in a worker thread."""
        ref, self._offered_ref = self._offered_ref, None
        if ref is not None and self._claim is not None:
            with contextlib.suppress(XenError, TimeoutError):
                self._claim.withdraw(ref)
        ep.check_presence()  # a no-op if the dispatcher did it

    def _offer_sized(self) -> Vchan:
        """Offer the path with the listener's ring sizes, or, with ``max_clients``, the
        sizes the page budget allows (smaller on ENOSPC: others share the budget)."""
        budgeted = self.max_clients is not None
        read, write = self._budget_sizes() if budgeted else (self.read_size, self.write_size)
        while True:
            try:
                vchan = Vchan.server(
                    self.backend, self.peer, self.path, read_size=read, write_size=write
                )
            except XenError as exc:
                # Down to one page; without max_clients the sizes asked are kept.
                if not budgeted or exc.errno != errno.ENOSPC or channel_pages(read, write) == 1:
                    raise
                read, write = fit_ring_sizes(read, write, channel_pages(read, write) - 1)
                continue
            if budgeted and (read, write) != self._sizes_logged:
                self._sizes_logged = (read, write)
                logger.info(
                    "gntipc listener at %s: offering %d/%d-byte rings (asked %d/%d; %d of"
                    " at most %d clients carried, page budget %s)",
                    self.path,
                    read,
                    write,
                    self.read_size,
                    self.write_size,
                    len(self._carried),
                    self.max_clients,
                    self.backend.page_limit,
                )
            return vchan

    def _budget_sizes(self) -> tuple[int, int]:
        """Ring sizes (at most the listener's) for the next client, such that the
        domain's page budget still holds the smallest channel (one page) for each client
        that may come after it, up to ``max_clients`` at once."""
        assert self.max_clients is not None
        limit = self.backend.page_limit
        self._carried = [
            (ref, pages)
            for ref, pages in self._carried
            if (stream := ref()) is not None and not stream.closed
        ]
        if limit is None:
            return self.read_size, self.write_size
        held = sum(pages for _, pages in self._carried)
        after = max(0, self.max_clients - len(self._carried) - 1)
        return fit_ring_sizes(self.read_size, self.write_size, limit - held - after)

    async def _await_client(self, vchan: Vchan, hold: _SharedBackend | None) -> VchanStream | None:
        """Wait for the client of the channel just offered; its stream, or None if the
        client was dropped (logged).  Closes ``vchan`` and releases ``hold`` unless it
        hands them to the stream."""
        try:
            if self._closed:
                raise ClosedResourceError
            ep = vchan.endpoint
            dispatcher = Dispatcher(ep)
        except BaseException:
            await _aclose_all(vchan, hold, self.path)
            raise
        self._pending = (vchan, dispatcher)
        try:
            while ep.peer_live() == LIVE_WAITING:
                await dispatcher.wait()
                if self._closed:
                    raise ClosedResourceError
                if resolve_path(self.backend.domid, self._given_path) != self.path:
                    # Restored or migrated under a new domid: the offer (its grants, its
                    # port, its keys in the old home) is gone; the next one follows us.
                    raise_errno(errno.ENOTCONN, f"offering {self.path}: we are another domid now")
            await _astore.run(self._taken, ep, what=f"taking the client at {self.path}")
        except (RemoteProtocolError, XenError, XenStoreTimeout) as exc:
            dispatcher.close()
            try:
                await _aclose_all(vchan, hold, self.path)
            except Exception as close_exc:  # the channel is gone either way: report, go on
                logger.warning(
                    "gntipc listener at %s: closing a dropped channel: %s", self.path, close_exc
                )
            # Logged once the channel is closed: the client can see it when we say so.
            logger.warning(
                "gntipc listener at %s: dropped a client of domain %d while it connected: %s",
                self.path,
                self.peer,
                exc,
            )
            return None
        except BaseException:
            dispatcher.close()
            await _aclose_all(vchan, hold, self.path)
            raise
        finally:
            self._pending = None
        # The stream takes over our hold on the backend.
        stream = VchanStream(vchan, dispatcher=dispatcher, _backend_ref=hold)
        if self.max_clients is not None:
            pages = channel_pages(vchan.read_size, vchan.write_size)
            self._carried.append((weakref.ref(stream), pages))
        return stream

    async def serve(
        self,
        handler: Callable[[VchanStream], Awaitable[Any]],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Accept clients forever, running ``handler(stream)`` for each in a task group.

        The stream is closed when its handler returns.  Runs until cancelled or the
        listener is closed (then returns after the running handlers end).

        One bad peer costs only its own connection, logged (:data:`logger`) and
        dropped: a client that breaks the protocol while connecting (see
        :meth:`accept`), and a handler that fails with
        :class:`gntipc.RemoteProtocolError` (the peer corrupted the shared page) or
        :class:`anyio.BrokenResourceError` (the peer crashed or its domain died).  A
        failure to offer a channel (:class:`gntipc.XenError`: the store failed, the
        gntalloc limit was reached; :class:`gntipc.XenStoreTimeout`: the store did not
        answer in time) is logged and retried after a pause that grows up to
        :data:`SERVE_RETRY`.  Any other exception from a handler propagates (cancelling
        the others), as usual in a task group.
        """

        async def run(stream: VchanStream) -> None:
            async with stream:
                try:
                    await handler(stream)
                except (RemoteProtocolError, BrokenResourceError) as exc:
                    logger.warning(
                        "gntipc listener at %s: dropped a connection: %s: %s",
                        self.path,
                        type(exc).__name__,
                        exc,
                    )

        async def loop(tg: anyio.abc.TaskGroup) -> None:
            pause = 0.0
            while True:
                try:
                    stream = await self.accept()
                except ClosedResourceError:
                    return
                except (XenError, XenStoreTimeout) as exc:
                    pause = min(max(2 * pause, SERVE_RETRY[0]), SERVE_RETRY[1])
                    logger.error(
                        "gntipc listener at %s: cannot offer a channel (retrying in %.2g s): %s",
                        self.path,
                        pause,
                        exc,
                    )
                    # In slices, so that closing the listener ends serve() promptly.
                    deadline = time.monotonic() + pause
                    while not self._closed and (left := deadline - time.monotonic()) > 0:
                        await anyio.sleep(min(0.05, left))
                    continue
                pause = 0.0
                tg.start_soon(run, stream)

        if task_group is not None:
            await loop(task_group)
        else:
            async with anyio.create_task_group() as tg:
                await loop(tg)

    def close(self) -> None:
        """Stop listening (idempotent), in the calling thread: withdraws published
        keys (blocking on the store; in async code, use :meth:`aclose`); a waiting
        :meth:`accept` raises ClosedResourceError.  Accepted streams stay open."""
        if not self._closed:
            vchan, ref = self._stop()
            _close_all(vchan, ref, self._take_claim())

    async def aclose(self) -> None:
        """Stop listening (see :meth:`close`); the store work runs in a worker thread.

        Cancellation: the close completes anyway (shielded, bounded as
        :meth:`VchanStream.aclose`).

        Raises:
            gntipc.XenStoreTimeout: the store did not answer in time; the keys are
                withdrawn in the background.
        """
        if not self._closed:
            vchan, ref = self._stop()
            await _aclose_all(vchan, ref, self.path, self._take_claim())
        await checkpoint()

    def _stop(self) -> tuple[Vchan | None, _SharedBackend | None]:
        """Mark the listener closed and wake a waiting :meth:`accept`; returns what is
        left to close: the channel on offer, and our hold on the backend."""
        self._closed = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].close()
        ref, self._backend_ref = self._backend_ref, None
        return (None if pending is None else pending[0]), ref

    def _take_claim(self) -> PathClaim | None:
        claim, self._claim = self._claim, None
        return claim

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
    max_clients: int | None = None,
    backend: Backend | str | None = None,
) -> Listener:
    """Listen for clients from domain ``peer`` at ``path``.

    A relative ``path`` is relative to our own XenStore home (we are the server):
    ``/local/domain/<our domid>/<path>``.  ``read_size`` / ``write_size`` are the ring
    sizes (powers of two from 1024 to 1 MiB) of the direction client→server and
    server→client.

    ``max_clients``: how many clients the listener is to carry at once.  A domain may
    share only so many pages (:attr:`gntipc.backends.Backend.page_limit`: gntalloc's
    limit, 1024 by default; a 64 KiB channel takes 33): with ``max_clients``, each
    client's rings are the largest (at most ``read_size`` / ``write_size``) that leave
    the budget room for the smallest channel (one page: 1 and 2 KiB rings) of every
    client that may come after it, and smaller still when other programs of the domain
    share the budget (the sizes offered are logged at INFO).  Without it, every client
    gets the sizes asked or none (ENOSPC past the limit).

    One listener per path, as one socket per address: the listener claims the path
    (a node beside its keys, ``<path>/gntipc-listener``, naming its process) until it is
    closed.  A listener whose process is gone (it crashed) holds nothing: its claim is
    taken over.

    Raises:
        gntipc.XenError: EADDRINUSE (also an :class:`OSError`): another listener, whose
            process still runs, serves ``path``; the message names the path and that
            process.  (Other store failures show at :meth:`Listener.accept`.)
        ValueError: bad ring sizes or domid (a :class:`gntipc.LocalProtocolError`), or
            ``max_clients`` < 1.
        TypeError: ``peer`` is not an int.
        gntipc.BackendUnavailable: the chosen backend cannot run here.
    """
    check_ring_size(read_size, "read_size")
    check_ring_size(write_size, "write_size")
    be, ref = await _open_backend(backend)
    try:
        listener = Listener(
            be,
            peer,
            path,
            read_size=read_size,
            write_size=write_size,
            max_clients=max_clients,
            _backend_ref=ref,
        )
    except BaseException:
        await _aclose_all(None, ref, path)
        raise
    try:
        listener._claim = await _astore.run(
            listener._claim_path,
            what=f"claiming {listener.path} for a listener",
            discard=PathClaim.release,
            holder=ref,
        )
    except (XenError, XenStoreTimeout) as exc:
        if isinstance(exc, XenError) and exc.errno == errno.EADDRINUSE:
            await listener.aclose()
            raise
        # Any other store failure shows where it always did: the first accept claims
        # again, then publishes the keys (both fail alike, e.g. EACCES on the path).
    except BaseException:
        await listener.aclose()
        raise
    await checkpoint()
    return listener


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

    The store work (the watch, each attempt) runs in worker threads, each waited for at
    most 30 seconds (the store timeout), so a slow store never blocks the event loop.

    Raises:
        TimeoutError: no connection within ``timeout`` seconds (``None``: wait forever);
            its ``__cause__`` is the last failed attempt, if any.
        gntipc.XenStoreTimeout: the store did not answer one operation in time (also
            with ``timeout=None``).
        gntipc.RemoteProtocolError: the server published invalid keys or control page.
        gntipc.XenError: ECONNREFUSED (also a :class:`ConnectionRefusedError`-like
            :class:`OSError`): the gntipc listener at ``path`` says it can offer no
            channel now (e.g. its domain shares no more grant pages); the message says
            why.  Raised once the refusal lasted 2 s (``REFUSAL_GRACE``: a listener that
            is offering again publishes fresh keys within that), not after ``timeout``.
        gntipc.LocalProtocolError: bad arguments.
        TypeError: ``peer`` is not an int.
        gntipc.BackendUnavailable: the chosen backend cannot run here.
    """
    check_domid(peer)
    if timeout is not None and (math.isnan(timeout) or timeout < 0):
        raise LocalProtocolError(f"timeout must be >= 0 or None, not {timeout}")
    full = resolve_path(peer, path)
    be, ref = await _open_backend(backend)
    try:
        errors: list[Exception] = []
        with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
            endpoint = await connect_async(be, peer, full, errors, ref)
        if scope.cancelled_caught:
            cause = errors[0] if errors else None
            why = await _why_no_server(be, full, ref)
            raise TimeoutError(
                f"no gntipc server at {full} within {timeout} s" + (f": {why}" if why else "")
            ) from cause
    except BaseException:
        await _aclose_all(None, ref, full)
        raise
    return VchanStream(Vchan(endpoint), _backend_ref=ref)


async def _why_no_server(backend: Backend, path: str, hold: _SharedBackend | None) -> str:
    """:func:`gntipc._keys.why_no_server` in a worker thread ("" if the store
    does not answer in time)."""
    try:
        return await _astore.run(
            why_no_server, backend, path, what=f"reading who listens at {path}", holder=hold
        )
    except XenStoreTimeout:
        return ""
