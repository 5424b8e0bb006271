"""Zero-copy bulk transfer over a vchan: loans from a grant-mapped buffer pool.

Every byte through a vchan ring is copied twice (into the ring, out of it).  A
:class:`BulkChannel` moves large payloads without those copies: each side may grant a
*pool* of pages to the peer, which maps it read-only once for the channel's lifetime.  A
sender borrows a buffer of its own pool, fills it in place and sends a small descriptor
through the ring; the receiver reads the bytes in place, in the peer's pages, and its
release sends the buffer back::

    # both sides, over an established stream (gntipc.connect / listener.accept)
    async with await open_bulk(stream, buffers=4, buffer_size=1 << 20) as bulk:
        async with bulk.loan() as buf:          # a writable memoryview of our pool
            n = file.readinto(buf)
            await bulk.send(buf[:n])            # a 16-byte descriptor, no copy

    async with await open_bulk(stream, buffers=0) as bulk:    # receives only
        async with await bulk.receive() as view:   # read-only, in the sender's pages
            digest.update(view)                    # released on exit

The synchronous twin, :func:`open_bulk_sync` over a :class:`gntipc.Vchan`, gives a
:class:`SyncBulkChannel` with the same loans and views and blocking calls with timeouts
(``with bulk.loan(n, timeout=5) as buf``, ``bulk.send(buf)``, ``with bulk.receive() as
view``); the two interoperate (the wire is the same).

Both peers must open the bulk layer (it is an opt-in protocol on the stream's bytes, see
:mod:`gntipc.protocol.bulk`; a plain libxenvchan peer would just see bytes).  The bulk
channel owns the stream from then on: do not use the stream directly; closing the
channel closes the stream.  The vchan's wire format and store keys are unchanged.

**The peer is untrusted.**  A received view is the sender's memory: the sender can still
rewrite it while you read it.  Copy what you must validate before validating it (e.g.
``bytes(view[:header])``), and treat the rest as data that may change under you, as any
shared-memory protocol must.  Descriptors are checked (:mod:`gntipc.protocol.bulk`); a
bad one raises :class:`gntipc.RemoteProtocolError`.

**Backpressure**: :meth:`BulkChannel.loan` waits while every buffer is lent or held by
the peer; a peer that never releases stalls our loans, nothing else.

**Lifetimes**: a view handed out (a loan, a received view) is *released* when its block
ends, when it is sent, and when the channel closes: using it afterwards raises
:class:`ValueError`.  Views derived from it (slices, numpy arrays) keep the pages
mapped: Python's ``mmap`` refuses to unmap memory that is still exported, so a view can
never outlive its mapping; :meth:`BulkChannel.aclose` then raises
:class:`gntipc.MappingInUse` (everything else is released) and a later close unmaps.
A crash of either process frees its pages (the backend's unmap and death handling); the
peer's mapping of our pool stays valid until it unmaps it.

The pool is granted pages: mind the grant budget.  By default a domain may share 1024
pages at once (gntalloc's and the sim's limit; ``gntipc doctor`` shows it; sim:
``GNTIPC_SIM_PAGE_LIMIT``), and the vchan itself takes some (33 pages for 64 KiB rings,
513 for 1 MiB rings).  The default pool is 4 buffers of 256 KiB (256 pages).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from time import monotonic as _monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Self, TypeVar

import anyio
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)
from anyio.abc import AsyncResource

from ._exceptions import (
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
    XenError,
)
from ._native import ffi
from ._resource import Closeable
from ._soon import LoopCheckpoint
from .backends._abc import Buffer, Pages
from .channel import Vchan
from .protocol.bulk import (
    DEFAULT_MAX_PEER_PAGES,
    DESCRIPTOR_SIZE,
    MESSAGE_HEAD_SIZE,
    PAGE_SIZE,
    BulkEvent,
    BulkProtocol,
    Loan,
    Message,
    descriptor_room,
    encode_eof,
    encode_hello,
    message_room,
)
from .protocol.framing import NEED_DATA, MessageFramer
from .streams import FAIR_SLICE, VchanStream

if TYPE_CHECKING:
    from typing_extensions import TypeForm

__all__ = [
    "DEFAULT_BUFFERS",
    "DEFAULT_BUFFER_SIZE",
    "BulkChannel",
    "BulkLoan",
    "BulkMessage",
    "BulkQueue",
    "BulkView",
    "SyncBulkChannel",
    "SyncBulkQueue",
    "open_bulk",
    "open_bulk_queue",
    "open_bulk_queue_sync",
    "open_bulk_sync",
]

T = TypeVar("T")


#: Buffers in a pool unless asked otherwise.
DEFAULT_BUFFERS = 4
#: Bytes per buffer unless asked otherwise (with 4 buffers: 256 pages, a quarter of the
#: default grant budget).
DEFAULT_BUFFER_SIZE = 256 * 1024
#: How many bytes one read of descriptors takes from the ring.
_READ = 65536


async def open_bulk(
    stream: VchanStream,
    *,
    buffers: int = DEFAULT_BUFFERS,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    max_peer_pages: int = DEFAULT_MAX_PEER_PAGES,
    timeout: float = 30.0,
) -> BulkChannel:
    """Open the bulk layer over ``stream``; the peer must call it too (with its own
    pool geometry).  Grants our pool of ``buffers`` buffers of ``buffer_size`` bytes to
    the peer (``buffers=0``: this side only receives), exchanges the pools' HELLOs, and
    maps the peer's pool read-only.

    The channel owns ``stream`` from now on; if opening fails after the arguments were
    checked, the stream is closed (its bytes are no longer in a known state).

    Cancellation: the stream is closed and every page released.

    Raises:
        gntipc.LocalProtocolError: a bad geometry (``buffer_size`` not a multiple of
            4096, ...), or the rings are too small for both pools' descriptors.
        gntipc.XenError: ENOSPC when the grant budget cannot hold the pool.
        gntipc.RemoteProtocolError: the peer's HELLO is malformed, announces more than
            ``max_peer_pages`` pages, or names pages we cannot map.
        TimeoutError: the peer did not answer within ``timeout`` seconds.
        anyio.EndOfStream: the peer closed the stream instead.
        anyio.BrokenResourceError: the peer is gone.
        anyio.ClosedResourceError: the stream is closed.
    """
    return await _open(stream, buffers, buffer_size, max_peer_pages, timeout, 0)


def _early(events: list[BulkEvent]) -> list[Loan | Message]:
    """What opening must keep of the events read with the peer's HELLO."""
    return [e for e in events if isinstance(e, Loan | Message)]


async def _open(
    stream: VchanStream,
    buffers: int,
    buffer_size: int,
    max_peer_pages: int,
    timeout: float,
    max_message_size: int,
) -> BulkChannel:
    """:func:`open_bulk`, announcing version 2 (messages) if ``max_message_size``."""
    if buffers == 0:
        buffer_size = 0  # no pool: its buffer size means nothing
    proto = BulkProtocol(
        buffers, buffer_size, max_peer_pages=max_peer_pages, max_message_size=max_message_size
    )
    vchan = stream.vchan
    backend, peer = vchan.backend, vchan.peer
    pool: Pages | None = None
    peer_pages: Pages | None = None
    early: list[Loan | Message] = []
    ok = False
    try:
        pages = buffers * buffer_size // PAGE_SIZE
        if pages:
            pool = backend.share(peer, pages, writable=False)
        refs = pool.refs if pool is not None else ()
        hello = encode_hello(buffers, buffer_size, refs, version=proto.version)
        with anyio.fail_after(timeout):
            try:
                async with anyio.create_task_group() as tg:
                    # Both HELLOs may be larger than the rings: write ours while reading
                    # theirs.
                    tg.start_soon(stream.send, hello)
                    while proto.peer is None:
                        data = await stream.receive(_READ)
                        early += _early(proto.receive_data(data))
            except BaseExceptionGroup as group:
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        peer_pages = _map_peer_pool(vchan, proto)
        channel = BulkChannel(stream, proto, pool, peer_pages, early)
        ok = True
        return channel
    finally:
        if not ok:
            with anyio.CancelScope(shield=True):
                for p in (peer_pages, pool):
                    if p is not None:
                        with contextlib.suppress(Exception):
                            p.close()
                with contextlib.suppress(Exception):
                    await stream.aclose()


def _map_peer_pool(vchan: Vchan, proto: BulkProtocol) -> Pages | None:
    """After the peer's HELLO: check the rings' room for descriptors, map its pool.

    Raises:
        gntipc.LocalProtocolError: the rings are too small.
        gntipc.RemoteProtocolError: the peer's pages cannot be mapped.
    """
    proto.check_ring(vchan.write_size, vchan.read_size)
    theirs = proto.peer
    assert theirs is not None
    if proto.version > theirs.version:
        raise RemoteProtocolError(
            "bulk peer: it opened a plain bulk channel (version 1), not a message queue"
        )
    if not theirs.refs:
        return None
    try:
        return vchan.backend.map(vchan.peer, theirs.refs, writable=False)
    except XenError as exc:
        raise RemoteProtocolError(
            f"bulk peer: its pool's {len(theirs.refs)} pages cannot be mapped ({exc})"
        ) from exc


class BulkLoan:
    """A buffer of our pool, lent to the application (from :meth:`BulkChannel.loan`).

    ``async with bulk.loan(n) as buf:`` waits for a free buffer and gives ``buf``, a
    writable memoryview of ``n`` bytes of it; send it (or a slice of it) with
    :meth:`BulkChannel.send` inside the block.  A loan not sent by the end of the block
    goes back to the free list.  Either way ``buf`` is released then.
    """

    __slots__ = ("_channel", "_nbytes", "_timeout", "buffer", "view")

    def __init__(self, channel: _BulkBase, nbytes: int, timeout: float | None = None) -> None:
        self._channel = channel
        self._nbytes = nbytes
        self._timeout = timeout
        #: The buffer's index in our pool (-1 until acquired).
        self.buffer = -1
        #: The writable view (None until acquired).
        self.view: memoryview | None = None

    async def __aenter__(self) -> memoryview:
        """Wait for a free buffer.

        Cancellation: nothing is lent.

        Raises:
            anyio.BrokenResourceError: the peer is gone (lent buffers never come back).
            anyio.ClosedResourceError: the channel is (or gets) closed.
            anyio.BusyResourceError: this loan was entered already.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        if self.buffer >= 0:
            raise BusyResourceError("this loan is in use already")
        await self._channel._wait_free()
        return self._channel._lend(self)

    def __enter__(self) -> memoryview:
        """Take a free buffer: on a :class:`SyncBulkChannel`, waiting for one (at most
        the loan's ``timeout``); on a :class:`BulkChannel`, only one free now.  Otherwise
        it raises what :meth:`__aenter__` raises.

        Raises:
            anyio.WouldBlock: (:class:`BulkChannel`) no buffer is free right now.
            TimeoutError: (:class:`SyncBulkChannel`) none became free in time.
        """
        if self.buffer >= 0:
            raise BusyResourceError("this loan is in use already")
        return self._channel._enter_loan(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._channel._end_loan(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._channel._end_loan(self)


class BulkView:
    """A loan of the peer's buffer (from :meth:`BulkChannel.receive`): :attr:`view` is a
    read-only memoryview of the bytes in the peer's pages, valid until :meth:`release`.

    ``async with await bulk.receive() as view:`` (or ``with``) releases it on exit.  The
    peer can rewrite these bytes at any time: copy before validating.
    """

    __slots__ = ("_channel", "buffer", "length", "offset", "view")

    def __init__(
        self, channel: _BulkBase, buffer: int, offset: int, length: int, view: memoryview
    ) -> None:
        self._channel = channel
        #: The buffer's index in the peer's pool, and the byte range lent.
        self.buffer, self.offset, self.length = buffer, offset, length
        #: The bytes (read-only); released (raising ValueError on use) after release().
        self.view = view

    def __len__(self) -> int:
        return self.length

    def release(self) -> None:
        """Give the buffer back to the peer (idempotent; never waits).  The view is
        released: using it (not views derived from it) then raises ValueError."""
        self._channel._release_view(self)

    async def __aenter__(self) -> memoryview:
        return self.view

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<BulkView buffer {self.buffer} bytes {self.offset}..{self.offset + self.length}>"


def _release(view: memoryview | None) -> None:
    if view is not None:
        # BufferError: something still exports it (a numpy array...); it keeps the
        # pages mapped (the close then reports MappingInUse), nothing worse.
        with contextlib.suppress(BufferError):
            view.release()


class _BulkBase:
    """What the async and sync bulk channels share: both pools, the views handed out,
    and every non-waiting operation.  A subclass does the waiting and the transport's
    I/O (:meth:`_io`, :meth:`_write_nowait`, :meth:`_read_nowait`, :meth:`_detach`)."""

    def __init__(
        self,
        proto: BulkProtocol,
        pool: Pages | None,
        peer_pages: Pages | None,
        early: list[Loan | Message],
    ) -> None:
        self._proto = proto
        self._pool = pool
        self._peer_pages = peer_pages
        self._pool_view: memoryview | None = None
        self._base = 0
        if pool is not None:
            self._pool_view = pool.mapping.view()
            ptr = ffi.from_buffer(self._pool_view)
            self._base = int(ffi.cast("uintptr_t", ptr))
            ffi.release(ptr)
        self._peer_view = peer_pages.mapping.view() if peer_pages is not None else None
        self._inbox: list[Loan] = []
        self._inbox_pos = 0
        # Messages received and not taken yet, and their bytes (bounded: see _backlog).
        self._messages: deque[Message] = deque()
        self._message_bytes = 0
        self._taken: anyio.Event | None = None  # set when a message is taken
        self._route(early)
        # Loans out in the application: buffer -> loan; id(view) -> buffer.
        self._lent: dict[int, BulkLoan] = {}
        self._lent_ids: dict[int, int] = {}
        self._held: dict[int, BulkView] = {}
        self._pending = bytearray()  # RELEASE frames the ring had no room for yet
        self._pumping = False
        self._progress: anyio.Event | None = None
        self._ended: BaseException | None = None  # how the peer's stream ended
        self._failure: RemoteProtocolError | None = None
        self._sending = False
        self._closing = False
        self._closed = False
        self._kept: list[Pages] = []

    # -- introspection ------------------------------------------------------------------

    @property
    def buffers(self) -> int:
        """Buffers in our pool (0: this side only receives)."""
        return self._proto.buffers

    @property
    def buffer_size(self) -> int:
        """Bytes per buffer of our pool."""
        return self._proto.buffer_size

    @property
    def peer_buffers(self) -> int:
        """Buffers in the peer's pool."""
        peer = self._proto.peer
        return 0 if peer is None else peer.buffers

    @property
    def peer_buffer_size(self) -> int:
        """Bytes per buffer of the peer's pool."""
        peer = self._proto.peer
        return 0 if peer is None else peer.buffer_size

    @property
    def free_buffers(self) -> int:
        """Buffers of our pool a loan can take now (without reading new releases)."""
        return self._proto.free_count

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` (or :meth:`close`) ran."""
        return self._closing

    def __repr__(self) -> str:
        state = "closed" if self._closing else f"{self.free_buffers} free"
        return (
            f"<{type(self).__name__} {self.buffers}x{self.buffer_size} out, "
            f"{self.peer_buffers}x{self.peer_buffer_size} in, {state}>"
        )

    # -- state checks ---------------------------------------------------------------------

    def _check(self) -> None:
        if self._closing:
            raise ClosedResourceError("the bulk channel is closed")
        if self._failure is not None:
            raise RemoteProtocolError(str(self._failure)) from self._failure

    # -- the transport (a subclass's) ------------------------------------------------------

    def _write_nowait(self, frames: bytes | bytearray) -> bool:
        """Write all of ``frames`` (True) or nothing (False: no room now).

        Raises:
            anyio.BrokenResourceError: the peer is gone.
        """
        raise NotImplementedError

    def _read_nowait(self) -> bytes:
        """The bytes available now (b"" if none).

        Raises:
            anyio.EndOfStream: the peer closed.
            anyio.BrokenResourceError: the peer is gone.
        """
        raise NotImplementedError

    async def _wait_free(self) -> None:
        raise TypeError(f"a {type(self).__name__}'s loans are taken with `with`")

    def _enter_loan(self, loan: BulkLoan) -> memoryview:
        """``with bulk.loan()``: the async channel lends only what is free now."""
        return self._lend(loan)

    # -- waiting: whichever task waits reads the descriptors ------------------------------

    def _apply(self, data: bytes) -> None:
        try:
            events = self._proto.receive_data(data)
        except RemoteProtocolError as exc:
            self._failure = exc
            raise
        self._route(events)

    def _route(self, events: list[BulkEvent] | list[Loan | Message]) -> None:
        for e in events:
            if isinstance(e, Loan):
                self._inbox.append(e)
            elif isinstance(e, Message):
                self._messages.append(e)
                self._message_bytes += len(e.frame)

    def _backlog(self) -> bool:
        """True while the messages not taken yet hold a message's worth (or a read's):
        a waiter then reads no more until some are taken, so they never hold more than
        that and one more read, whatever the peer sends."""
        return self._message_bytes >= max(self._proto.max_message_size, _READ)

    def _read_available(self) -> None:
        """Apply the descriptors already in the ring, without waiting."""
        self._check()
        if self._ended is not None or self._pumping:
            return
        try:
            data = self._read_nowait()
        except (EndOfStream, BrokenResourceError) as exc:
            self._ended = exc
            return
        if data:
            self._apply(data)

    def _flush(self) -> None:
        """Write the RELEASE frames held back (all or nothing; they fit the ring by
        construction, so this fails only while the peer is still reading our HELLO)."""
        if self._pending and not self._closing and self._ended is None:
            try:
                if not self._write_nowait(self._pending):
                    return
            except BrokenResourceError:
                pass  # the peer is gone: nobody waits for these buffers any more
            self._pending.clear()

    def _gone(self) -> BrokenResourceError:
        exc = BrokenResourceError(
            "the bulk peer closed the channel or is gone: lent buffers will not come back"
        )
        exc.__cause__ = self._ended
        return exc

    # -- lending ----------------------------------------------------------------------------

    def loan(self, nbytes: int | None = None) -> BulkLoan:
        """A loan of ``nbytes`` (default: :attr:`buffer_size`) bytes of one buffer of our
        pool, to use as ``async with bulk.loan(n) as buf:`` (waits for a free buffer,
        cancellable) or ``with bulk.loan(n) as buf:`` (raises WouldBlock if none is free).

        Raises:
            gntipc.LocalProtocolError: ``nbytes`` is not from 0 to :attr:`buffer_size`, or
                this side has no pool.
        """
        size = self._proto.buffer_size
        if not self._proto.buffers:
            raise LocalProtocolError("this side has no pool to lend from (buffers=0)")
        n = size if nbytes is None else nbytes
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= size:
            raise LocalProtocolError(f"a loan is 0 to {size} bytes, not {nbytes!r}")
        return BulkLoan(self, n)

    def _lend(self, loan: BulkLoan) -> memoryview:
        self._check()
        proto = self._proto
        if not proto.free_count:
            self._read_available()
        i = proto.take()
        if i is None:
            if self._ended is not None:
                raise self._gone()
            raise WouldBlock
        assert self._pool_view is not None
        start = i * proto.buffer_size
        view = self._pool_view[start : start + loan._nbytes]
        loan.buffer, loan.view = i, view
        self._lent[i] = loan
        self._lent_ids[id(view)] = i
        return view

    def _end_loan(self, loan: BulkLoan) -> None:
        i = loan.buffer
        if i < 0 or self._lent.get(i) is not loan:
            return  # sent (or the channel closed)
        self._forget_loan(i)
        if not self._closing:
            self._proto.give_back(i)

    def _forget_loan(self, i: int) -> None:
        loan = self._lent.pop(i)
        view, loan.view = loan.view, None
        if view is not None:
            self._lent_ids.pop(id(view), None)
            _release(view)

    def _locate(self, buf: Buffer) -> tuple[int, int, int]:
        """(buffer, offset, length) of ``buf``: a loan's view or a slice of one."""
        i = self._lent_ids.get(id(buf))
        if i is not None:
            loan = self._lent[i]
            if loan.view is buf:
                return i, 0, loan._nbytes
        try:
            mv = memoryview(buf)
        except TypeError:
            raise LocalProtocolError("send() takes a loaned buffer (a memoryview)") from None
        with mv:
            if not mv.c_contiguous or mv.readonly:
                raise LocalProtocolError("send() takes a loaned buffer or a contiguous slice of it")
            n = mv.nbytes
            ptr = ffi.from_buffer(mv)
            rel = int(ffi.cast("uintptr_t", ptr)) - self._base
            ffi.release(ptr)
        size = self._proto.buffer_size
        if self._pool_view is None or not 0 <= rel < len(self._pool_view):
            raise LocalProtocolError("send() takes a buffer of this channel's pool")
        i, off = divmod(rel, size)
        if i not in self._lent or off + n > self._lent[i]._nbytes:
            raise LocalProtocolError(f"bytes {off}..{off + n} of buffer {i} are not on loan here")
        return i, off, n

    # -- receiving ------------------------------------------------------------------------

    def receive_nowait(self) -> BulkView:
        """The next loan from the peer if one arrived; otherwise it raises what
        :meth:`receive` raises.

        Raises:
            anyio.WouldBlock: none arrived yet.
        """
        self._check()
        if self._inbox_pos >= len(self._inbox):
            self._read_available()
        if self._inbox_pos >= len(self._inbox) and not self._proto.peer_eof and not self._ended:
            raise WouldBlock
        return self._take()

    def _take(self) -> BulkView:
        self._check()
        inbox = self._inbox
        if self._inbox_pos >= len(inbox):
            if self._proto.peer_eof or isinstance(self._ended, EndOfStream):
                raise EndOfStream
            raise BrokenResourceError("the bulk peer is gone") from self._ended
        e = inbox[self._inbox_pos]
        self._inbox_pos += 1
        if self._inbox_pos == len(inbox):
            inbox.clear()
            self._inbox_pos = 0
        assert self._peer_view is not None
        start = e.buffer * self.peer_buffer_size + e.offset
        bv = BulkView(self, e.buffer, e.offset, e.length, self._peer_view[start : start + e.length])
        self._held[e.buffer] = bv
        return bv

    def _release_view(self, bv: BulkView) -> None:
        if self._held.get(bv.buffer) is not bv:
            return
        del self._held[bv.buffer]
        _release(bv.view)
        if self._closing or self._failure is not None:
            return
        self._pending += self._proto.release_frame(bv.buffer)
        self._flush()

    # -- messages (a queue's) ---------------------------------------------------------------

    def _message_ready(self) -> bool:
        return bool(self._messages) or self._proto.peer_eof

    def _take_message(self) -> tuple[bytes, BulkView | None]:
        """The next message's frame and its attachment's view.

        Raises:
            anyio.EndOfStream: the peer sent EOF (or closed) and every message was taken.
            anyio.BrokenResourceError: the peer crashed, and every message was taken.
        """
        self._check()
        if not self._messages:
            if self._proto.peer_eof or isinstance(self._ended, EndOfStream):
                raise EndOfStream
            raise BrokenResourceError("the bulk peer is gone") from self._ended
        m = self._messages.popleft()
        self._message_bytes -= len(m.frame)
        event, self._taken = self._taken, None
        if event is not None:
            event.set()
        e = m.attachment
        if e is None:
            return m.frame, None
        assert self._peer_view is not None
        start = e.buffer * self.peer_buffer_size + e.offset
        bv = BulkView(self, e.buffer, e.offset, e.length, self._peer_view[start : start + e.length])
        self._held[e.buffer] = bv
        return m.frame, bv

    def _out_limit(self) -> int:
        """The largest message payload that fits our ring beside the descriptors."""
        return message_room(self._write_size(), self._proto.buffers, self.peer_buffers)

    def _write_size(self) -> int:
        raise NotImplementedError

    def _message_out(
        self, frame: bytearray, attachment: Buffer | None, most: int
    ) -> tuple[tuple[int, int, int] | None, int]:
        """Check a message frame before it is written: the attachment's location (None
        without) and the ring space to wait for (the frame, and the descriptors' room).

        Raises:
            MessageTooLarge: the payload is over ``most``.
            gntipc.LocalProtocolError: the attachment is not a loan of ours.
        """
        size = len(frame) - MESSAGE_HEAD_SIZE
        if size > most:
            raise MessageTooLarge(
                f"message encodes to {size} bytes: at most {most} are sent on this channel"
                f" (max_message_size, and a {self._write_size()}-byte ring that keeps room"
                " for the descriptors)"
            )
        loc = None if attachment is None else self._locate(attachment)
        room = descriptor_room(self._proto.buffers, self.peer_buffers)
        return loc, len(frame) + room

    # -- closing ----------------------------------------------------------------------------

    def _begin_close(self) -> bool:
        """Mark closed, wake the waiters, release every view we handed out; True the
        first time (the caller then closes the transport)."""
        if not self._closing:
            self._closing = True
            for name in ("_progress", "_taken"):
                event = getattr(self, name)
                setattr(self, name, None)
                if event is not None:
                    event.set()
            self._messages.clear()
            self._message_bytes = 0
            for i in list(self._lent):
                self._forget_loan(i)
            for bv in list(self._held.values()):
                _release(bv.view)
            self._held.clear()
            for attr in ("_pool_view", "_peer_view"):
                _release(getattr(self, attr))
                setattr(self, attr, None)
            self._kept = [p for p in (self._peer_pages, self._pool) if p is not None]
            self._peer_pages = self._pool = None
            return True
        return False

    def _unmap(self) -> None:
        """Unmap both pools; pages still exported are kept for a later close.

        Raises:
            gntipc.MappingInUse: a view derived from a loan or a received view is alive.
        """
        errors: list[BaseException] = []
        kept: list[Pages] = []
        for p in self._kept:
            try:
                p.close()
            except Exception as exc:
                errors.append(exc)
                kept.append(p)
        self._kept = kept
        self._closed = not kept
        if errors:
            raise errors[0]

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_closing", True) is False:
            _warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)


class BulkChannel(_BulkBase, AsyncResource):
    """Loans between two gntipc peers over one vchan stream (see the module docstring).
    Made by :func:`open_bulk`.

    One task may lend and send while another receives; the waits of both share the
    stream (whichever waits reads the descriptors for both).  Two tasks in :meth:`send`
    at once raise :class:`anyio.BusyResourceError`.
    """

    def __init__(
        self,
        stream: VchanStream,
        proto: BulkProtocol,
        pool: Pages | None,
        peer_pages: Pages | None,
        early: list[Loan | Message],
    ) -> None:
        """Use :func:`open_bulk`."""
        self._stream: VchanStream | None = stream
        super().__init__(proto, pool, peer_pages, early)

    @property
    def stream(self) -> VchanStream:
        """The underlying stream (for its attributes and statistics: do not read or
        write it).

        Raises:
            anyio.ClosedResourceError: the channel is closed.
        """
        if self._stream is None:
            raise ClosedResourceError
        return self._stream

    def _io(self) -> VchanStream:
        self._check()
        stream = self._stream
        if stream is None:
            raise ClosedResourceError("the bulk channel is closed")
        return stream

    def _write_nowait(self, frames: bytes | bytearray) -> bool:
        stream = self._stream
        if stream is None:
            return False
        try:
            stream.send_nowait(frames)
        except (WouldBlock, BusyResourceError):
            return False
        return True

    def _read_nowait(self) -> bytes:
        try:
            return self._io().receive_nowait(_READ)
        except WouldBlock:
            return b""

    def _write_size(self) -> int:
        return self._io().vchan.write_size

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        """Return once ``ready()`` or the peer's stream ended; read descriptors meanwhile.

        Cancellation: nothing is lost (a descriptor read is applied at once).
        """
        while True:
            stream = self._io()
            self._flush()
            if ready() or self._ended is not None:
                return
            if self._pumping:
                event = self._progress
                assert event is not None
                await event.wait()
                continue
            if self._backlog():
                # The messages read hold enough: wait for a get to take one.
                if self._taken is None:
                    self._taken = anyio.Event()
                await self._taken.wait()
                continue
            self._pumping = True
            self._progress = anyio.Event()
            try:
                data = await stream.receive(_READ)
            except (EndOfStream, BrokenResourceError) as exc:
                self._ended = exc
                continue
            finally:
                self._pumping = False
                event, self._progress = self._progress, None
                if event is not None:  # (None: a close woke everyone already)
                    event.set()
            self._apply(data)

    async def _wait_free(self) -> None:
        proto = self._proto
        if proto.eof_sent:
            raise LocalProtocolError("no loans after EOF")
        await self._wait_until(lambda: proto.free_count > 0)
        if not proto.free_count:
            raise self._gone()

    async def send(self, buf: Buffer) -> None:
        """Lend ``buf`` (a loan's view, or a contiguous slice of it) to the peer: a
        descriptor goes through the ring; the bytes stay where they are.  The loan's view
        is released (the buffer is the peer's until it releases it).

        Waits only while the peer has not yet read our HELLO (the rings hold every
        descriptor in flight otherwise).

        Cancellation: nothing was sent; the loan is still ours.

        Raises:
            gntipc.LocalProtocolError: ``buf`` is not (a slice of) a loan of this channel,
                or :meth:`send_eof` was called.
            anyio.BusyResourceError: another task is sending.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the channel is (or gets) closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        stream = self._io()
        if self._sending:
            raise BusyResourceError("sending to")
        i, off, n = self._locate(buf)
        self._sending = True
        try:
            proto = self._proto
            while True:
                self._flush()
                frame = proto.loan_frame(i, off, n)
                try:
                    stream.send_nowait(frame)
                    break
                except WouldBlock:
                    proto.unsend(i)
                except BaseException:
                    proto.unsend(i)  # not sent: the loan is still the application's
                    raise
                await stream.wait_writable(DESCRIPTOR_SIZE)
                stream = self._io()
                if i not in self._lent:
                    raise ClosedResourceError("the bulk channel is closed")
        finally:
            self._sending = False
        self._forget_loan(i)

    async def _send_message(self, frame: bytearray, attachment: Buffer | None, most: int) -> None:
        """Write the MESSAGE frame ``frame`` (head to fill in) whole, waiting for room for
        it and for the descriptors; lend ``attachment`` with it.  Cancellation: nothing
        was sent (the attachment is still the application's)."""
        stream = self._io()
        if self._sending:
            raise BusyResourceError("sending to")
        loc, need = self._message_out(frame, attachment, most)
        proto = self._proto
        self._sending = True
        try:
            while True:
                self._flush()
                proto.message_frame(frame, loc)
                try:
                    if stream.vchan.buffer_space() >= need:
                        stream.send_nowait(frame)
                        break
                except WouldBlock:
                    pass
                except BaseException:
                    if loc is not None:
                        proto.unsend(loc[0])  # not sent: the loan is still the application's
                    raise
                if loc is not None:
                    proto.unsend(loc[0])
                await stream.wait_writable(need)
                stream = self._io()
                if loc is not None and loc[0] not in self._lent:
                    raise ClosedResourceError("the bulk channel is closed")
        finally:
            self._sending = False
        if loc is not None:
            self._forget_loan(loc[0])

    async def send_eof(self) -> None:
        """Lend nothing more: the peer's :meth:`receive` raises EndOfStream once it has
        received every loan.  Releases keep flowing both ways.  Idempotent.

        Raises:
            anyio.BusyResourceError: another task is sending.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the channel is closed.
        """
        stream = self._io()
        if self._sending:
            raise BusyResourceError("sending to")
        if self._proto.eof_sent:
            return
        self._sending = True
        try:
            await stream.wait_writable(DESCRIPTOR_SIZE)
            self._io()
            stream.send_nowait(self._proto.eof_frame())
        finally:
            self._sending = False

    async def receive(self) -> BulkView:
        """The next loan from the peer, waiting for one: a :class:`BulkView` (use it as
        ``async with await bulk.receive() as view:``).  Release it soon: the peer's
        loans wait for its buffers.

        Cancellation: nothing is taken.

        Raises:
            anyio.EndOfStream: the peer sent EOF (or closed) and every loan was received.
            anyio.BrokenResourceError: the peer crashed, and every loan was received.
            anyio.ClosedResourceError: the channel is (or gets) closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        proto = self._proto
        await self._wait_until(lambda: self._inbox_pos < len(self._inbox) or proto.peer_eof)
        return self._take()

    async def aclose(self) -> None:
        """Close the channel and its stream, and unmap both pools (idempotent).  Views
        handed out are released; tasks waiting in :meth:`loan` or :meth:`receive` get
        ClosedResourceError.  The peer sees the stream end.

        Cancellation: the close completes anyway (as :meth:`VchanStream.aclose`).

        Raises:
            gntipc.MappingInUse: views derived from our views (slices, numpy arrays) are
                still alive: everything else is closed; close again after dropping them.
        """
        self._begin_close()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()
        self._unmap()

    def close(self) -> None:
        """:meth:`aclose` in the calling thread (the stream's close blocks on the store).

        Raises:
            gntipc.MappingInUse: as :meth:`aclose`.
        """
        self._begin_close()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        self._unmap()


class BulkMessage(NamedTuple, Generic[T]):
    """A message from a :class:`BulkQueue` and its attachment: unpack it
    (``message, attachment = await queue.get()``, then release the attachment), or use
    it as ``async with await queue.get() as (message, view):`` (or ``with``): ``view``
    is then the attachment's read-only memoryview (None without attachment), released
    on exit."""

    #: The decoded message.
    message: T
    #: The loan that came with it (read-only, in the sender's pages; release it), or None.
    attachment: BulkView | None

    def release(self) -> None:
        """Release the attachment, if any (idempotent)."""
        if self.attachment is not None:
            self.attachment.release()

    def _entered(self) -> tuple[T, memoryview | None]:
        return self.message, None if self.attachment is None else self.attachment.view

    async def __aenter__(self) -> tuple[T, memoryview | None]:
        return self._entered()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __enter__(self) -> tuple[T, memoryview | None]:
        return self._entered()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _QueueBase(Generic[T]):
    """What the async and sync bulk queues share: the framer (the encoding, the size
    bound and the decoding of :class:`gntipc.MessageQueue`) over a bulk channel."""

    def __init__(
        self,
        channel: _BulkBase,
        type: TypeForm[T],
        max_message_size: int,
        enc_hook: Callable[[Any], Any] | None,
        dec_hook: Callable[[type, Any], Any] | None,
    ) -> None:
        # batch_frames=False: one message per MESSAGE frame (an attachment is one loan).
        self._framer: MessageFramer[T] = MessageFramer(
            type,
            max_message_size=max_message_size,
            enc_hook=enc_hook,
            dec_hook=dec_hook,
            batch_frames=False,
        )
        self._base = channel
        self.type = type
        self._most = min(max_message_size, channel._out_limit())
        self._wbuf = bytearray(MESSAGE_HEAD_SIZE)
        self._getting = False

    @property
    def max_message_size(self) -> int:
        """The largest encoded message accepted from the peer, in bytes."""
        return self._framer.max_message_size

    @property
    def max_put_size(self) -> int:
        """The largest encoded message a put sends: ``max_message_size``, or less if the
        ring cannot hold more beside the descriptors (a put writes a message whole)."""
        return self._most

    def _encode(self, message: T) -> bytearray:
        """The MESSAGE frame of ``message``, its head to fill in.

        Raises:
            MessageTooLarge: over :attr:`max_put_size`.
            TypeError: msgspec cannot encode it.
        """
        buf = self._wbuf
        self._framer.encode_into(message, buf, MESSAGE_HEAD_SIZE - 4)
        return buf

    def _decode(self, frame: bytes, view: BulkView | None) -> BulkMessage[T]:
        framer = self._framer
        try:
            framer.feed(frame)
            message = framer.next_message()
        except BaseException:
            if view is not None:
                view.release()  # the peer gets its buffer back
            raise
        assert message is not NEED_DATA  # one whole frame, bounded by the protocol
        return BulkMessage(message, view)  # type: ignore[arg-type]

    def loan(self, nbytes: int | None = None) -> BulkLoan:
        """:meth:`BulkChannel.loan`: a buffer of our pool, to fill and attach to a put.

        Raises:
            gntipc.LocalProtocolError: as :meth:`BulkChannel.loan`.
        """
        return self._base.loan(nbytes)

    @property
    def closed(self) -> bool:
        """True once the queue (its channel) is closed."""
        return self._base.closed

    def __repr__(self) -> str:
        name = getattr(self.type, "__name__", self.type)
        return f"<{type(self).__name__}[{name}] {self._base!r}>"


class BulkQueue(_QueueBase[T], AsyncResource):
    """Typed messages with zero-copy attachments over a bulk channel: made by
    :func:`open_bulk_queue`.

    ``await queue.put(message, attachment=buf)`` sends ``message`` (msgspec MessagePack,
    as :class:`gntipc.MessageQueue`) inline through the ring together with a loan of our
    pool (``buf``: a loan's view or a contiguous slice of it, from :meth:`loan`), which
    is not copied: the receiver's ``message, view = await queue.get()`` gets a read-only
    view of those bytes in our pages, and releasing it (``async with`` on what get
    returns) gives the buffer back to our free list.  A message may also go without
    attachment.  ``async for message, view in queue`` iterates until the peer's EOF.

    The queue owns its channel (:attr:`channel`, for its loans, attributes and plain
    loans); closing one closes the other.  One task may put while another gets; two
    putters (or two getters) at once raise :class:`anyio.BusyResourceError`.

    Messages and plain loans (:meth:`BulkChannel.send`) travel in separate queues: the
    order between the two kinds is not kept.

    Bad input from the peer: an undecodable message raises :class:`MalformedMessage`
    (it is skipped, its attachment released: the queue stays usable); a message
    announcing more than ``max_message_size`` bytes, or a bad attachment descriptor,
    raises :class:`gntipc.RemoteProtocolError` and breaks the channel.

    Memory: a task waiting for a free buffer (or for a plain loan) reads the peer's
    frames to find its releases; it keeps at most ``max(max_message_size, 64 KiB)`` +
    64 KiB of messages not got yet, then waits for a get to take some.
    """

    def __init__(
        self,
        channel: BulkChannel,
        type: TypeForm[T],
        max_message_size: int,
        enc_hook: Callable[[Any], Any] | None = None,
        dec_hook: Callable[[type, Any], Any] | None = None,
    ) -> None:
        """Use :func:`open_bulk_queue`."""
        super().__init__(channel, type, max_message_size, enc_hook, dec_hook)
        self.channel = channel
        self._yielded = 0.0
        self._checkpoint = LoopCheckpoint()

    async def _fair_yield(self) -> None:
        # A put or get that need not wait yields only every FAIR_SLICE (as MessageQueue).
        now = _monotonic()
        if now - self._yielded >= FAIR_SLICE:
            self._yielded = now
            await self._checkpoint()

    async def put(self, message: T, attachment: Buffer | None = None) -> None:
        """Send ``message`` with ``attachment`` (None, or a loan's view of our pool or a
        contiguous slice of it: those bytes are lent, not copied; the loan's view is
        released, the buffer is the peer's until it releases it).

        The message is written whole: a put waits for room in the ring for it and for
        the descriptors that can be in flight.

        Cancellation: a cancelled put sent nothing (the loan is still ours: it goes back
        to the free list at the end of its ``async with`` block, or can be put again).

        Raises:
            MessageTooLarge: the message encodes to more than :attr:`max_put_size`
                bytes (nothing is sent; the queue stays usable).
            TypeError: msgspec cannot encode it.
            gntipc.LocalProtocolError: ``attachment`` is not (a slice of) a loan of this
                channel, or EOF was sent.
            anyio.BusyResourceError: another task is putting (or sending a loan).
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is (or gets) closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        await self._fair_yield()
        if self.channel._sending:  # (before the encoding: its buffer is the other's)
            raise BusyResourceError("sending to")
        frame = self._encode(message)
        await self.channel._send_message(frame, attachment, self._most)

    async def get(self) -> BulkMessage[T]:
        """The next message and its attachment (None if it came without), waiting for
        one: use it as ``async with await queue.get() as (message, view):``, or unpack
        it and release the view (:meth:`BulkView.release`) soon: the peer's loans wait
        for its buffers.

        Cancellation: nothing is lost (a cancelled get took nothing).

        Raises:
            anyio.EndOfStream: the peer sent EOF (or closed) and every message was got.
            anyio.BrokenResourceError: the peer crashed, and every message was got.
            MalformedMessage: the next message does not decode as the queue's type (it
                is skipped and its attachment released).
            anyio.BusyResourceError: another task is getting.
            anyio.ClosedResourceError: the queue is (or gets) closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        if self._getting:
            raise BusyResourceError("receiving from")
        channel = self.channel
        self._getting = True
        try:
            await self._fair_yield()
            await channel._wait_until(channel._message_ready)
            frame, view = channel._take_message()
        finally:
            self._getting = False
        return self._decode(frame, view)

    def get_nowait(self) -> BulkMessage[T]:
        """The next message if one arrived; otherwise it raises what :meth:`get` raises.

        Raises:
            anyio.WouldBlock: none arrived yet.
        """
        if self._getting:
            raise BusyResourceError("receiving from")
        channel = self.channel
        channel._check()
        if not channel._messages:
            channel._read_available()
        if not channel._message_ready() and channel._ended is None:
            raise WouldBlock
        frame, view = channel._take_message()
        return self._decode(frame, view)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> BulkMessage[T]:
        try:
            return await self.get()
        except EndOfStream:
            raise StopAsyncIteration from None

    async def send_eof(self) -> None:
        """Send nothing more (messages or loans): the peer's :meth:`get` raises
        EndOfStream once it got every message.  Releases keep flowing.  Idempotent.

        Raises:
            anyio.BusyResourceError: another task is putting.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
        """
        await self.channel.send_eof()

    async def aclose(self) -> None:
        """Close the queue and its channel (:meth:`BulkChannel.aclose`).

        Raises:
            gntipc.MappingInUse: as :meth:`BulkChannel.aclose`.
        """
        await self.channel.aclose()

    def close(self) -> None:
        """:meth:`aclose` in the calling thread.

        Raises:
            gntipc.MappingInUse: as :meth:`BulkChannel.aclose`.
        """
        self.channel.close()


def _max_message_size(max_message_size: int | None, read_size: int) -> int:
    """The bound on received messages: as given, else what the peer's ring can carry."""
    if max_message_size is None:
        return read_size
    if isinstance(max_message_size, bool) or not isinstance(max_message_size, int):
        raise LocalProtocolError(f"max_message_size must be an int, not {max_message_size!r}")
    if max_message_size < 1:
        raise LocalProtocolError(f"max_message_size must be >= 1, not {max_message_size}")
    return max_message_size


async def open_bulk_queue(
    stream: VchanStream,
    type: TypeForm[T],
    *,
    buffers: int = DEFAULT_BUFFERS,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    max_peer_pages: int = DEFAULT_MAX_PEER_PAGES,
    max_message_size: int | None = None,
    enc_hook: Callable[[Any], Any] | None = None,
    dec_hook: Callable[[type, Any], Any] | None = None,
    timeout: float = 30.0,
) -> BulkQueue[T]:
    """Open a bulk channel that also carries typed messages (bulk protocol version 2)
    over ``stream``, and the :class:`BulkQueue` of ``type`` on it.  The peer must call it
    too (a peer opening a plain :func:`open_bulk` fails to open: version-1 peers never
    receive a message).  The pool and the other arguments are :func:`open_bulk`'s.

    Args:
        stream: a connected stream (the queue owns it from now on).
        type: the message type (anything msgspec encodes and validates).
        buffers: buffers in our pool (0: we only receive attachments).
        buffer_size: bytes per buffer (a multiple of 4096).
        max_peer_pages: the largest peer pool we map, in pages.
        max_message_size: the largest encoded message accepted from the peer (and
            sent), in bytes; default: the peer's ring size (what it can carry).  A put
            is also bounded by our own ring (:attr:`BulkQueue.max_put_size`).
        enc_hook: passed to msgspec's encoder, for custom types.
        dec_hook: passed to msgspec's decoder, for custom types.
        timeout: seconds to wait for the peer's HELLO.

    Cancellation: the stream is closed and every page released.

    Raises:
        gntipc.LocalProtocolError: as :func:`open_bulk`, or ``max_message_size`` < 1.
        gntipc.XenError: as :func:`open_bulk`.
        gntipc.RemoteProtocolError: as :func:`open_bulk`, or the peer opened a plain
            bulk channel (no messages).
        TimeoutError: the peer did not answer within ``timeout`` seconds.
        anyio.EndOfStream: the peer closed the stream instead.
        anyio.BrokenResourceError: the peer is gone.
        anyio.ClosedResourceError: the stream is closed.
    """
    most = _max_message_size(max_message_size, stream.vchan.read_size)
    channel = await _open(stream, buffers, buffer_size, max_peer_pages, timeout, most)
    return BulkQueue(channel, type, most, enc_hook, dec_hook)


def _deadline(timeout: float | None) -> float:
    if timeout is None:
        return math.inf
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, not {timeout!r}")
    return time.monotonic() + timeout


def _left(deadline: float, what: str) -> float | None:
    """Seconds left before ``deadline`` (None: no deadline).

    Raises:
        TimeoutError: none left.
    """
    if deadline == math.inf:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out waiting for {what}")
    return left


def open_bulk_sync(
    vchan: Vchan,
    *,
    buffers: int = DEFAULT_BUFFERS,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    max_peer_pages: int = DEFAULT_MAX_PEER_PAGES,
    timeout: float = 30.0,
) -> SyncBulkChannel:
    """:func:`open_bulk` for the synchronous API: over a connected :class:`gntipc.Vchan`,
    blocking the calling thread (at most ``timeout`` seconds).  The peer may use either
    API.  The channel owns ``vchan`` from now on; if opening fails after the arguments
    were checked, the vchan is closed.

    Raises:
        gntipc.LocalProtocolError: as :func:`open_bulk`.
        gntipc.XenError: as :func:`open_bulk`.
        gntipc.RemoteProtocolError: as :func:`open_bulk`.
        TimeoutError: the peer did not answer within ``timeout`` seconds.
        anyio.EndOfStream: the peer closed the channel instead.
        anyio.BrokenResourceError: the peer is gone.
        anyio.ClosedResourceError: the vchan is closed.
    """
    return _open_sync(vchan, buffers, buffer_size, max_peer_pages, timeout, 0)


def _open_sync(
    vchan: Vchan,
    buffers: int,
    buffer_size: int,
    max_peer_pages: int,
    timeout: float,
    max_message_size: int,
) -> SyncBulkChannel:
    """:func:`open_bulk_sync`, announcing version 2 (messages) if ``max_message_size``."""
    if buffers == 0:
        buffer_size = 0
    proto = BulkProtocol(
        buffers, buffer_size, max_peer_pages=max_peer_pages, max_message_size=max_message_size
    )
    deadline = _deadline(timeout)
    backend, peer = vchan.backend, vchan.peer
    pool: Pages | None = None
    peer_pages: Pages | None = None
    early: list[Loan | Message] = []
    ok = False
    try:
        pages = buffers * buffer_size // PAGE_SIZE
        if pages:
            pool = backend.share(peer, pages, writable=False)
        refs = pool.refs if pool else ()
        hello = memoryview(encode_hello(buffers, buffer_size, refs, version=proto.version))
        sent = 0
        # Both HELLOs may be larger than the rings: write ours while reading theirs.
        while sent < len(hello) or proto.peer is None:
            moved = False
            if sent < len(hello):
                n = vchan.write_nowait(hello[sent:])
                sent += n
                moved = n > 0
            if proto.peer is None:
                data = vchan.read_nowait(_READ)
                if data:
                    early += _early(proto.receive_data(data))
                    moved = True
            if moved:
                continue
            left = _left(deadline, "the bulk peer's HELLO")
            ready = vchan.prepare_wait_read() if proto.peer is None else 0
            if not ready and sent < len(hello):
                ready = vchan.prepare_wait_write()
            if not ready:
                vchan.wait(left)
        peer_pages = _map_peer_pool(vchan, proto)
        channel = SyncBulkChannel(vchan, proto, pool, peer_pages, early)
        ok = True
        return channel
    finally:
        if not ok:
            for p in (peer_pages, pool):
                if p is not None:
                    with contextlib.suppress(Exception):
                        p.close()
            with contextlib.suppress(Exception):
                vchan.close()


class SyncBulkChannel(_BulkBase):
    """:class:`BulkChannel` for the synchronous API, over a :class:`gntipc.Vchan`: the
    same loans and views, with blocking calls that take a ``timeout`` (None: no limit).
    Made by :func:`open_bulk_sync`.

    Thread safety: one thread at a time (and :meth:`close` from that thread).
    """

    def __init__(
        self,
        vchan: Vchan,
        proto: BulkProtocol,
        pool: Pages | None,
        peer_pages: Pages | None,
        early: list[Loan | Message],
    ) -> None:
        """Use :func:`open_bulk_sync`."""
        self._vchan: Vchan | None = vchan
        super().__init__(proto, pool, peer_pages, early)

    @property
    def vchan(self) -> Vchan:
        """The underlying channel (for its attributes: do not read or write it).

        Raises:
            anyio.ClosedResourceError: the channel is closed.
        """
        if self._vchan is None:
            raise ClosedResourceError
        return self._vchan

    def _io(self) -> Vchan:
        self._check()
        vchan = self._vchan
        if vchan is None:
            raise ClosedResourceError("the bulk channel is closed")
        return vchan

    def _write_nowait(self, frames: bytes | bytearray) -> bool:
        vchan = self._vchan
        return vchan is not None and vchan.send_nowait(frames)

    def _read_nowait(self) -> bytes:
        return self._io().read_nowait(_READ)

    def _write_size(self) -> int:
        return self._io().write_size

    def _wait_until(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while True:
            vchan = self._io()
            self._flush()
            if ready() or self._ended is not None:
                return
            if self._backlog():
                # One thread: only its own gets could take the messages read.
                raise LocalProtocolError(
                    f"waiting for {what}, the peer's messages not got yet fill the inbox"
                    f" ({self._message_bytes} bytes): get them first"
                )
            try:
                data = vchan.read(_READ, timeout=_left(deadline, what))
            except (EndOfStream, BrokenResourceError) as exc:
                self._ended = exc
                continue
            self._apply(data)

    def loan(self, nbytes: int | None = None, *, timeout: float | None = None) -> BulkLoan:
        """A loan of ``nbytes`` (default: :attr:`buffer_size`) bytes of one buffer of our
        pool, as ``with bulk.loan(n) as buf:``, which waits for a free buffer at most
        ``timeout`` seconds (None: no limit).

        Raises:
            gntipc.LocalProtocolError: as :meth:`BulkChannel.loan`.
        """
        loan = super().loan(nbytes)
        loan._timeout = timeout
        return loan

    def _enter_loan(self, loan: BulkLoan) -> memoryview:
        proto = self._proto
        if proto.eof_sent:
            raise LocalProtocolError("no loans after EOF")
        deadline = _deadline(loan._timeout)
        self._wait_until(lambda: proto.free_count > 0, deadline, "a free buffer")
        if not proto.free_count:
            raise self._gone()
        return self._lend(loan)

    def send(self, buf: Buffer, *, timeout: float | None = None) -> None:
        """:meth:`BulkChannel.send`, waiting at most ``timeout`` seconds for ring space
        (only while the peer has not read our HELLO yet).

        Raises:
            gntipc.LocalProtocolError: as :meth:`BulkChannel.send`.
            TimeoutError: no room in time (nothing was sent).
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the channel is closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        vchan = self._io()
        i, off, n = self._locate(buf)
        self._flush()
        frame = self._proto.loan_frame(i, off, n)
        try:
            vchan.send(frame, timeout=timeout)
        except BaseException:
            self._proto.unsend(i)  # not sent: the loan is still the application's
            raise
        self._forget_loan(i)

    def _send_message(
        self, frame: bytearray, attachment: Buffer | None, most: int, timeout: float | None
    ) -> None:
        """:meth:`BulkChannel._send_message`, waiting at most ``timeout`` seconds."""
        vchan = self._io()
        loc, need = self._message_out(frame, attachment, most)
        deadline = _deadline(timeout)
        proto = self._proto
        while True:
            self._flush()
            proto.message_frame(frame, loc)
            try:
                if vchan.buffer_space() >= need and vchan.send_nowait(frame):
                    break
            except BaseException:
                if loc is not None:
                    proto.unsend(loc[0])  # not sent: the loan is still the application's
                raise
            if loc is not None:
                proto.unsend(loc[0])
            left = _left(deadline, "room in the ring for a message")
            wait_until = None if left is None else time.monotonic() + left
            if not vchan.is_open():  # (CLOSED: the peer is gone; we are not closed)
                raise BrokenResourceError("the bulk peer is gone")
            vchan._waiter.wait_writable(need, wait_until)
        if loc is not None:
            self._forget_loan(loc[0])

    def send_eof(self, *, timeout: float | None = None) -> None:
        """:meth:`BulkChannel.send_eof` (idempotent).

        Raises:
            TimeoutError: no room in time (nothing was sent).
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the channel is closed.
        """
        vchan = self._io()
        if not self._proto.eof_sent:
            vchan.send(encode_eof(), timeout=timeout)
            self._proto.eof_frame()

    def receive(self, *, timeout: float | None = None) -> BulkView:
        """:meth:`BulkChannel.receive`, waiting at most ``timeout`` seconds (None: no
        limit); use it as ``with bulk.receive() as view:``.

        Raises:
            TimeoutError: no loan arrived in time.
            anyio.EndOfStream: the peer sent EOF (or closed) and every loan was received.
            anyio.BrokenResourceError: the peer crashed, and every loan was received.
            anyio.ClosedResourceError: the channel is closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        proto = self._proto
        self._wait_until(
            lambda: self._inbox_pos < len(self._inbox) or proto.peer_eof,
            _deadline(timeout),
            "a loan from the bulk peer",
        )
        return self._take()

    def close(self) -> None:
        """Close the channel and its vchan, and unmap both pools (idempotent); views
        handed out are released.

        Raises:
            gntipc.MappingInUse: as :meth:`BulkChannel.aclose`.
        """
        self._begin_close()
        vchan, self._vchan = self._vchan, None
        if vchan is not None:
            vchan.close()
        self._unmap()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncBulkQueue(_QueueBase[T], Closeable):
    """:class:`BulkQueue` for the synchronous API, over a :class:`SyncBulkChannel`: the
    same messages and attachments, with blocking calls that take a ``timeout`` (None:
    no limit).  Made by :func:`open_bulk_queue_sync`; the peer may use either API.

    Thread safety: one thread at a time.  That thread's own gets are the only way to
    take messages: a loan waiting for a free buffer while the messages not got yet fill
    the inbox (``max(max_message_size, 64 KiB)``) raises
    :class:`gntipc.LocalProtocolError` instead of waiting forever.
    """

    def __init__(
        self,
        channel: SyncBulkChannel,
        type: TypeForm[T],
        max_message_size: int,
        enc_hook: Callable[[Any], Any] | None = None,
        dec_hook: Callable[[type, Any], Any] | None = None,
    ) -> None:
        """Use :func:`open_bulk_queue_sync`."""
        super().__init__(channel, type, max_message_size, enc_hook, dec_hook)
        self.channel = channel

    def loan(self, nbytes: int | None = None, *, timeout: float | None = None) -> BulkLoan:
        """:meth:`SyncBulkChannel.loan`: ``with queue.loan(n, timeout=5) as buf:``.

        Raises:
            gntipc.LocalProtocolError: as :meth:`BulkChannel.loan`.
        """
        return self.channel.loan(nbytes, timeout=timeout)

    def put(
        self, message: T, attachment: Buffer | None = None, *, timeout: float | None = None
    ) -> None:
        """:meth:`BulkQueue.put`, waiting at most ``timeout`` seconds for ring space.

        Raises:
            MessageTooLarge: as :meth:`BulkQueue.put`.
            TypeError: msgspec cannot encode it.
            gntipc.LocalProtocolError: as :meth:`BulkQueue.put`.
            TimeoutError: no room in time (nothing was sent).
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        frame = self._encode(message)
        self.channel._send_message(frame, attachment, self._most, timeout)

    def get(self, *, timeout: float | None = None) -> BulkMessage[T]:
        """:meth:`BulkQueue.get`, waiting at most ``timeout`` seconds: ``with
        queue.get() as (message, view):``.

        Raises:
            TimeoutError: no message arrived in time.
            anyio.EndOfStream: the peer sent EOF (or closed) and every message was got.
            anyio.BrokenResourceError: the peer crashed, and every message was got.
            MalformedMessage: as :meth:`BulkQueue.get`.
            anyio.ClosedResourceError: the queue is closed.
            gntipc.RemoteProtocolError: the peer broke the protocol.
        """
        channel = self.channel
        channel._wait_until(channel._message_ready, _deadline(timeout), "a message")
        frame, view = channel._take_message()
        return self._decode(frame, view)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> BulkMessage[T]:
        try:
            return self.get()
        except EndOfStream:
            raise StopIteration from None

    def send_eof(self, *, timeout: float | None = None) -> None:
        """:meth:`BulkQueue.send_eof`.

        Raises:
            TimeoutError: no room in time (nothing was sent).
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
        """
        self.channel.send_eof(timeout=timeout)

    def close(self) -> None:
        """Close the queue and its channel (idempotent).

        Raises:
            gntipc.MappingInUse: as :meth:`BulkChannel.aclose`.
        """
        self.channel.close()


def open_bulk_queue_sync(
    vchan: Vchan,
    type: TypeForm[T],
    *,
    buffers: int = DEFAULT_BUFFERS,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    max_peer_pages: int = DEFAULT_MAX_PEER_PAGES,
    max_message_size: int | None = None,
    enc_hook: Callable[[Any], Any] | None = None,
    dec_hook: Callable[[type, Any], Any] | None = None,
    timeout: float = 30.0,
) -> SyncBulkQueue[T]:
    """:func:`open_bulk_queue` for the synchronous API, over a connected
    :class:`gntipc.Vchan` (blocking at most ``timeout`` seconds); the arguments are
    :func:`open_bulk_queue`'s.

    Raises:
        gntipc.LocalProtocolError: as :func:`open_bulk_queue`.
        gntipc.XenError: as :func:`open_bulk_queue`.
        gntipc.RemoteProtocolError: as :func:`open_bulk_queue`.
        TimeoutError: the peer did not answer within ``timeout`` seconds.
        anyio.EndOfStream: the peer closed the channel instead.
        anyio.BrokenResourceError: the peer is gone.
        anyio.ClosedResourceError: the vchan is closed.
    """
    most = _max_message_size(max_message_size, vchan.read_size)
    channel = _open_sync(vchan, buffers, buffer_size, max_peer_pages, timeout, most)
    return SyncBulkQueue(channel, type, most, enc_hook, dec_hook)
