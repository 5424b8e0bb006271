"""Typed message queues over any byte stream: :class:`MessageQueue`.

The framing is the sans-I/O :class:`gntipc.protocol.MessageFramer` (a little-endian u32
payload length, then the msgspec MessagePack encoding of the message;
:meth:`MessageQueue.put_many` sends two or more messages as one batch frame, see
:mod:`gntipc.protocol.framing`); this module does the I/O.  The stream may be any
:class:`anyio.abc.ByteStream`: a :class:`~gntipc.VchanStream`, a
:class:`~gntipc.SessionStream`, anyio's TCP, unix or TLS streams...  The same typed
protocol then runs to a VM on this host over a vchan and to a process on another host
over TCP.

On a :class:`~gntipc.VchanStream` the queue uses the ring directly: frames are written
with as few ring operations as possible (:meth:`MessageQueue.put_many` writes a whole
batch with one ring write and at most one notification; single puts gather their frames
into shared ring writes, see :meth:`MessageQueue.put`), a frame that fits the ring is
written whole or not at all, and every method works, the ``*_nowait`` ones included.  On
any other stream:

* :meth:`~MessageQueue.put_nowait` and :meth:`~MessageQueue.put_many_nowait` raise
  :class:`NotImplementedError` (a generic stream cannot send without waiting: use
  :meth:`~MessageQueue.put`);
* :meth:`~MessageQueue.get_nowait` and :meth:`~MessageQueue.get_many_nowait` return only
  messages already received (by an earlier ``get``/``get_many``), else raise
  :class:`anyio.WouldBlock`, unless the stream has a ``receive_nowait(max_bytes)``
  raising :class:`anyio.WouldBlock` as :class:`~gntipc.VchanStream` does, which they use;
* a cancelled :meth:`~MessageQueue.put` closes the queue unless the stream tells how much
  of the frame went out (a :class:`~gntipc.SessionStream` does: it sends a small frame
  whole or not at all), because a partial frame would desynchronise the peer;
* :meth:`~MessageQueue.close` (synchronous) closes only a :class:`~gntipc.VchanStream` or
  :class:`~gntipc.SessionStream` at once; other streams are closed by
  :meth:`~MessageQueue.aclose` (the queue is marked closed at once either way).

Over anyio's own TCP and unix socket streams (what ``anyio.connect_tcp``,
``anyio.connect_unix`` and their listeners return, asyncio or trio; not a wrapper of them
such as a ``TLSStream``), a put writes its frame to the socket at once, without the two
event-loop round trips of the stream's ``send``, and yields only as on a ring (every
:data:`~gntipc.streams.FAIR_SLICE`); when the socket cannot take all of it, it finishes
with the stream's ``send``.  As with ``send``, when a put returns its frame is with the
kernel.

Bad input from the peer:

* A frame whose payload does not decode as the expected type raises
  :class:`MalformedMessage`.  Its boundaries were known, so it is skipped: the queue
  stays usable and the next :meth:`~MessageQueue.get` returns the next message.
* A length header larger than ``max_message_size`` raises :class:`MessageTooLarge` and
  **closes the queue and its stream**: the frame cannot be skipped without reading an
  untrusted amount of data, and nothing after it can be trusted to be in sync.
* The stream ending inside a frame raises :class:`MalformedMessage` (then the queue
  behaves as ended).

A peer that keeps the stream full cannot keep :meth:`MessageQueue.get_many` busy: one
call returns at most ``max_items`` messages (:data:`DEFAULT_MAX_ITEMS` by default) and
stops reading once :data:`COLLECT_BYTES` were received; the rest stays for the next call.
A frame arriving in many pieces is joined once, when it is complete (linear in its size).

Copies: on a :class:`~gntipc.VchanStream`, a frame larger than a receive chunk (64 KiB)
is received straight from the ring into a buffer of its size, the last large frame's
buffer reused (no allocation, no page faults from frame to frame; the queue keeps it, up
to ``max_message_size`` bytes), then msgspec copies what it decodes out of it; a
``memoryview`` or :class:`msgspec.Raw` value of a message refers to the buffer instead,
and the next large frame then gets a buffer of its own.  Sending, the frame is encoded
into a buffer the queue reuses, then written into the ring.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterable
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import anyio
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)
from anyio.abc import AsyncResource, ByteStream, SocketAttribute

from ._exceptions import MalformedMessage as MalformedMessage
from ._exceptions import MessageTooLarge as MessageTooLarge
from ._fastpath import held_writes, ring_stream
from ._soon import LoopCheckpoint
from ._stats import MessageQueueStatistics, VchanStreamStatistics
from .protocol.framing import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
from .protocol.framing import NEED_DATA, MessageFramer
from .streams import FAIR_SLICE, VchanAttribute

if TYPE_CHECKING:
    # PEP 747, as msgspec's own stubs use it: a union such as ``Request | Reply`` is a
    # TypeForm[Request | Reply] but not a type[...]; only type checkers need the name.
    from typing_extensions import TypeForm

__all__ = ["MalformedMessage", "MessageQueue", "MessageTooLarge"]

T = TypeVar("T")

#: The default for ``max_items`` of :meth:`MessageQueue.get_many`.
DEFAULT_MAX_ITEMS = 4096
#: :meth:`MessageQueue.get_many` reads no more from the stream once it received this
#: many bytes in one call (it returns the messages they completed).
COLLECT_BYTES = 1 << 20
# Receive sizes on a generic stream: at least a chunk, at most what completes the frame
# being received up to a cap (trio's socket receive allocates max_bytes up front).
_GENERIC_CHUNK = 65536
_GENERIC_MAX_READ = 1 << 20


def _socket_writer(stream: ByteStream) -> Callable[[bytearray], bytes | None] | None:
    """For anyio's own TCP and unix socket streams (those classes exactly: never a
    wrapper such as a ``TLSStream``, whose raw socket lies under the encryption), a
    function that hands bytes to the kernel without waiting, and returns None if it took
    them all, else what ``await stream.send()`` must still send: all of them (it could
    not write now: anyio's send waits, or raises the stream's error), the part a socket
    did not take at once, or ``b""`` (asyncio's transport took them all but holds some:
    anyio's send of nothing waits until it handed them to the kernel).

    Why: anyio's send yields to the event loop twice per call (a cancellation check
    before, a loop iteration after), 17-30 µs a 64-byte frame here against 2-4 µs for
    the send itself.  A put writes at once instead and keeps the queue's own fair yield
    (every FAIR_SLICE); when it returns, its frame is with the kernel, as after anyio's
    send.
    """
    cls = type(stream)
    aio = sys.modules.get("anyio._backends._asyncio")
    if aio is not None and cls is getattr(aio, "SocketStream", None):
        transport: Any = getattr(stream, "_transport", None)
        protocol: Any = getattr(stream, "_protocol", None)
        if transport is None or not hasattr(protocol, "write_event"):
            return None  # not the anyio this was written for: its own send, then

        def transport_write(buf: bytearray) -> bytes | None:
            data = bytes(buf)  # the transport may keep what it is given
            # What anyio's send checks before it writes.  Its transports' write buffer
            # limit is 0, so the event is set only while the transport holds nothing:
            # the write goes to the socket at once, in order.
            if (
                not protocol.write_event.is_set()
                or protocol.exception is not None
                or getattr(stream, "_closed", True)
            ):
                return data
            transport.write(data)
            return None if protocol.write_event.is_set() else b""

        return transport_write
    raw_classes = (
        getattr(aio, "UNIXSocketStream", None),
        getattr(sys.modules.get("anyio._backends._trio"), "SocketStream", None),
        getattr(sys.modules.get("anyio._backends._trio"), "UNIXSocketStream", None),
    )
    if cls not in raw_classes:
        return None
    # These streams write straight to their socket (no buffer of their own that a
    # direct write could overtake).
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if not isinstance(sock, socket.socket):
        return None
    flags = getattr(socket, "MSG_DONTWAIT", 0)
    if not flags and sock.gettimeout() != 0.0:
        return None  # a blocking socket would block the event loop
    send = sock.send

    def socket_write(buf: bytearray) -> bytes | None:
        try:
            n = send(buf, flags)
        except OSError:  # would block, or an error anyio's send reports its own way
            return bytes(buf)
        if n == len(buf):
            return None
        return bytes(memoryview(buf)[n:])

    return socket_write


class MessageQueue(AsyncResource, Generic[T]):
    """Typed messages over a byte stream (msgspec MessagePack, length-prefixed).

    ``MessageQueue(stream, Reading)`` sends and receives ``Reading`` values (any type
    msgspec can encode and validate: Structs, dataclasses, builtins, unions…).  Both
    directions may be used at once by two tasks; two concurrent putters (or getters)
    raise :class:`anyio.BusyResourceError`.  The queue owns the stream: closing one
    closes the other.  ``async for message in queue`` iterates until the peer ends the
    stream.

    Any :class:`anyio.abc.ByteStream` works; a :class:`~gntipc.VchanStream` gets the fast
    paths and the non-waiting methods (see the module documentation for what differs on
    other streams).

    Args:
        stream: a connected stream (the queue takes it over; do not read or write it
            directly any more).
        type: the message type, used to validate what arrives.
        max_message_size: the largest frame payload (an encoded message, or a batch of
            them), in bytes, accepted in either direction (at most 2**31 - 1).
        enc_hook: passed to msgspec's encoder, for custom types.
        dec_hook: passed to msgspec's decoder, for custom types.
        batch_frames: :meth:`put_many` sends two or more messages as batch frames (one
            msgspec call encodes them, one decodes them: the wire format's version 1,
            see :mod:`gntipc.protocol.framing`); False sends one frame per message, for
            a peer older than version 1 (it would refuse a batch frame as too large).
            Received batch frames are decoded either way.

    Raises:
        ValueError: ``max_message_size`` out of range.
    """

    def __init__(
        self,
        stream: ByteStream,
        type: TypeForm[T],
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        enc_hook: Callable[[Any], Any] | None = None,
        dec_hook: Callable[[type, Any], Any] | None = None,
        batch_frames: bool = True,
    ) -> None:
        self._framer: MessageFramer[T] = MessageFramer(
            type,
            max_message_size=max_message_size,
            enc_hook=enc_hook,
            dec_hook=dec_hook,
            batch_frames=batch_frames,
        )
        self.stream = stream
        self.type = type
        # The fast paths the stream declares (gntipc._fastpath): a ring (a VchanStream)
        # sends all or nothing without waiting; a stream that gathers small writes (a
        # ring, a SessionStream) takes a frame without sending it yet (see put) and
        # closes synchronously.  A stream with receive_nowait can be drained without
        # waiting.
        self._vchan = ring_stream(stream)
        self._held = held = held_writes(stream)
        self._send_soon: Callable[[bytearray], bool] | None = None
        self._send_held: Callable[[], None] | None = None
        if held is not None:
            self._send_soon = held._send_soon
            self._send_held = held._flush_before_wait
        self._receive_nowait: Callable[[int], bytes] | None = getattr(
            stream, "receive_nowait", None
        )
        self._socket_write = _socket_writer(stream) if held is None else None
        # Read at most a chunk at a time (unless a frame needs more): a fresh 1 MiB bytes
        # per read makes the allocator trim and regrow its heap, a page fault per 4 KiB
        # (-15% of batched messages/s on 1 MiB rings).
        ring: int = stream.extra(VchanAttribute.read_size, _GENERIC_CHUNK)
        self._chunk = min(ring, _GENERIC_CHUNK)
        self._ring: int = stream.extra(VchanAttribute.write_size, 0)
        # Outgoing frames are encoded here, in place (no per-message allocation).
        self._wbuf = bytearray(256)
        self._putting = False
        self._getting = False
        # When this queue last yielded to the event loop (FAIR_SLICE): a fair yield of
        # put or get, or a call of the stream (which yields at least that often itself,
        # and when it waits).  One clock for both directions: a get that waited for an
        # answer makes the next put's yield needless (a request/response loop then pays
        # no loop iteration per call).
        self._yielded = 0.0
        self._checkpoint = LoopCheckpoint()  # anyio's, without its per-call lookup
        self._ended = False
        self._closed = False
        self._deferred: BaseException | None = None
        # Statistics: plain counters, bumped where the work is done anyway.
        self._messages_sent = 0
        self._messages_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._malformed = 0

    def statistics(self) -> MessageQueueStatistics:
        """A snapshot of what this queue has done so far (messages and bytes each way,
        malformed frames), with its stream's own statistics when the stream has a
        ``statistics()`` method returning :class:`VchanStreamStatistics` (a
        :class:`~gntipc.VchanStream`).  Works after close too."""
        stats = getattr(self.stream, "statistics", None)
        inner = stats() if stats is not None else None
        return MessageQueueStatistics(
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            malformed=self._malformed,
            stream=inner if isinstance(inner, VchanStreamStatistics) else None,
        )

    def _sent(self, messages: int, nbytes: int) -> None:
        self._messages_sent += messages
        self._bytes_sent += nbytes

    @property
    def max_message_size(self) -> int:
        """The largest encoded message, in bytes, accepted in either direction."""
        return self._framer.max_message_size

    # -- sending ---------------------------------------------------------------------

    async def _fair_yield(self, *, getting: bool) -> None:
        """Yield to the event loop before taking or writing anything (a cancellation
        lands here, with nothing lost), the direction marked busy meanwhile."""
        if getting:
            self._getting = True
        else:
            self._putting = True
        try:
            await self._checkpoint()
        finally:
            if getting:
                self._getting = False
            else:
                self._putting = False

    def _no_nowait(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{what} needs a gntipc.VchanStream (a ring that takes a frame without"
            f" waiting); over a {type(self.stream).__name__}, use the async method"
        )

    def put_nowait(self, message: T) -> None:
        """Send ``message`` without waiting, or not at all (a :class:`~gntipc.VchanStream`
        only).  As for :meth:`put`, the frame may go out with the next ones, at the latest
        soon after the calling task yields to the event loop.

        Raises:
            anyio.WouldBlock: no room in the ring right now (nothing was written).
            MessageTooLarge: the message exceeds ``max_message_size`` (nothing written).
            gntipc.LocalProtocolError: the frame is larger than the whole ring (use
                :meth:`put`).
            NotImplementedError: the stream is not a :class:`~gntipc.VchanStream`.
            anyio.BusyResourceError: another task is inside :meth:`put`/:meth:`put_many`.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
            TypeError: msgspec cannot encode ``message``.
        """
        if self._putting:
            raise BusyResourceError("sending to")
        vchan = self._vchan
        send_soon = self._send_soon  # the ring's
        if vchan is None or send_soon is None:
            raise self._no_nowait("put_nowait")
        buf = self._wbuf
        self._framer.encode_into(message, buf)
        if not send_soon(buf):
            vchan.send_nowait(buf)  # no room (WouldBlock), or larger than the ring
        self._messages_sent += 1
        self._bytes_sent += len(buf)

    def put_many_nowait(self, messages: Iterable[T]) -> None:
        """Send all ``messages`` now with one ring write, or none of them (a
        :class:`~gntipc.VchanStream` only).

        Besides the errors below, it raises those of :meth:`put_nowait`.

        Raises:
            anyio.WouldBlock: not enough room for the whole batch right now.
        """
        if self._putting:
            raise BusyResourceError("sending to")
        vchan = self._vchan
        if vchan is None:
            raise self._no_nowait("put_many_nowait")
        if not isinstance(messages, (list, tuple)):
            messages = list(messages)  # counted below
        buf = self._wbuf
        self._framer.encode_many_into(messages, buf)
        if buf:
            vchan.send_nowait(buf)
            self._sent(len(messages), len(buf))

    async def put(self, message: T) -> None:
        """Send ``message``, waiting for room.

        Scheduling: a put that need not wait for room yields to the event loop only if
        this queue's puts have not yielded for :data:`~gntipc.streams.FAIR_SLICE`
        (100 µs), before it writes anything: a producer that never waits neither starves
        other tasks nor pays a loop iteration per message.  On a
        :class:`~gntipc.VchanStream`, a frame that fits the ring's free space is taken at
        once and written with the frames of the following puts (one ring write and at
        most one wake-up of the peer for many messages): when
        :data:`~gntipc.streams.FLUSH_BYTES` have gathered, before the stream waits for
        anything (a :meth:`get` waiting for the answer sends the request first), when it
        closes or sends EOF, and at the latest soon after the calling task yields to the
        event loop (when the loop runs its callbacks).

        Cancellation: a cancelled put wrote nothing, or the whole frame (the message is
        sent), or else the queue and its stream are closed (the peer sees a truncated
        frame, :class:`MalformedMessage`), never a desynchronised stream.  On a
        :class:`~gntipc.VchanStream`, a frame that fits the ring is written at once or
        not at all, and a larger one is written in pieces as ring space frees; on a
        :class:`~gntipc.SessionStream`, a frame of at most half the peer's window goes
        out whole or not at all; on other streams, how much of a frame went out is not
        known, so a put cancelled while sending closes the queue.

        Raises:
            MessageTooLarge: the message exceeds ``max_message_size`` (nothing written).
            anyio.BusyResourceError: another task is putting.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
            TypeError: msgspec cannot encode ``message``.
        """
        if self._putting:
            raise BusyResourceError("sending to")
        now = _monotonic()
        if now - self._yielded >= FAIR_SLICE:
            self._yielded = now
            await self._fair_yield(getting=False)  # a cancellation lands here
        # No await from here to the end of the common case: no other task can put.
        buf = self._wbuf
        self._framer.encode_into(message, buf)
        send_soon = self._send_soon
        if send_soon is not None and send_soon(buf):
            # The common case: the frame fits the ring (or the session's window) now; it
            # goes out with the frames of the next puts, one write for many.
            self._messages_sent += 1
            self._bytes_sent += len(buf)
            return
        self._putting = True
        try:
            await self._send_frames(buf, 1)
        finally:
            self._putting = False

    async def put_many(self, messages: Iterable[T]) -> None:
        """Send ``messages`` in order, encoded into one buffer (as batch frames: see
        ``batch_frames``) and written with as few writes as possible: on a
        :class:`~gntipc.VchanStream`, as few ring writes (and notifications) as the free
        space allows, one if it fits.

        Scheduling and cancellation: as for :meth:`put`, for the batch as a whole: it
        went out entirely or not at all, or else the queue and stream are closed.

        Raises:
            MessageTooLarge: a message exceeds ``max_message_size``: the batch is
                aborted before anything is written.
            anyio.BusyResourceError: another task is putting.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
            TypeError: msgspec cannot encode a message.
        """
        if self._putting:
            raise BusyResourceError("sending to")
        self._putting = True
        try:
            now = _monotonic()
            if now - self._yielded >= FAIR_SLICE:
                self._yielded = now
                await self._checkpoint()
            if not isinstance(messages, (list, tuple)):
                messages = list(messages)  # counted in the statistics
            buf = self._wbuf
            self._framer.encode_many_into(messages, buf)
            if buf:
                await self._send_frames(buf, len(messages))
        finally:
            self._putting = False

    async def _send_frames(self, buf: bytearray, count: int) -> None:
        """Write ``buf`` (``count`` whole frames) to the stream."""
        stream = self._vchan
        if stream is None:
            if self._closed:
                raise ClosedResourceError
            write = self._socket_write
            # The stream may keep a reference to what it is given after send returns
            # (asyncio's transports do): give it bytes, not our reused buffer.
            rest = bytes(buf) if write is None else write(buf)
            if rest is not None:
                await self._send_generic(rest)
            self._sent(count, len(buf))
            return
        size = len(buf)
        if size <= self._ring:
            # Frames that fit the ring go out whole or not at all: a cancelled put
            # leaves the stream framed.
            while True:
                try:
                    stream.send_nowait(buf)
                except WouldBlock:
                    await stream.wait_writable(size)
                    self._yielded = _monotonic()
                    continue
                self._sent(count, size)
                return
        try:
            await stream.send(buf)
            self._sent(count, size)
        except BrokenResourceError:
            raise  # the peer is gone: no later send can go wrong, and what it wrote
            # before it left stays readable (closing here would lose it)
        except BaseException:
            if 0 < stream.send_progress < len(buf):
                # A partial frame went out: nothing we send later could be framed right.
                self.close()
            raise

    async def _send_generic(self, data: bytes) -> None:
        stream = self.stream
        try:
            await stream.send(data)
        except (BrokenResourceError, BusyResourceError):
            raise  # the peer is gone (see above), or nothing was sent
        except BaseException:
            held = self._held
            # Without send_progress, how much went out is unknown: assume the worst
            # (the same after a socket took a part of the frame at once, or while
            # asyncio's transport holds it: a close drops what it holds).
            partial = held is None or 0 < held.send_progress < len(data)
            if partial:
                await self._abort()
            raise

    # -- receiving -------------------------------------------------------------------

    def _receive_size(self) -> int:
        missing = self._framer.missing()
        if self._vchan is None:
            missing = min(missing, _GENERIC_MAX_READ)
        return max(self._chunk, missing)

    def _at_end(self) -> EndOfStream:
        self._ended = True
        self._framer.end_of_stream()  # raises MalformedMessage inside a frame
        return EndOfStream()

    def _check_get(self) -> None:
        if self._getting:
            raise BusyResourceError("receiving from")
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc
        if self._closed:
            raise ClosedResourceError
        if self._ended:
            raise EndOfStream

    def get_nowait(self) -> T:
        """Return the next message if one is available now (on a stream without
        ``receive_nowait``, only a message already received; see the module docs).

        Raises:
            anyio.WouldBlock: no complete message yet.
            anyio.EndOfStream: the peer ended the stream and every message was returned.
            anyio.BrokenResourceError: the peer crashed (after every complete message it
                sent was returned).
            MalformedMessage: the next frame did not decode (it is skipped) or the stream
                ended inside a frame.
            MessageTooLarge: the next frame announces more than ``max_message_size``
                bytes (the queue is closed).
            anyio.ClosedResourceError: the queue is closed.
        """
        self._check_get()
        framer = self._framer
        try:
            message = framer.next_message()
            if message is not NEED_DATA:
                self._messages_received += 1
                return message  # type: ignore[return-value]
            receive_nowait = self._receive_nowait
            if receive_nowait is None:
                raise WouldBlock
            try:
                data = receive_nowait(self._receive_size())
            except EndOfStream:
                raise self._at_end() from None
            self._bytes_received += len(data)
            framer.feed(data)
            message = framer.next_message()
        except MessageTooLarge:
            self.close()
            raise
        except MalformedMessage:
            self._malformed += 1
            raise
        if message is NEED_DATA:
            raise WouldBlock
        self._messages_received += 1
        return message  # type: ignore[return-value]

    async def get(self) -> T:
        """Return the next message, waiting for it.

        Scheduling: a get that need not wait (the message is already buffered, or in
        the ring) yields to the event loop only if this queue's gets have not yielded
        for :data:`~gntipc.streams.FAIR_SLICE` (100 µs), before it takes anything: a
        consumer of a queue that never runs dry neither starves other tasks nor pays a
        loop iteration per message.

        Cancellation: nothing is lost; a cancelled get took nothing, and bytes already
        received stay buffered.

        It raises the errors of :meth:`get_nowait`, except that it waits instead of
        raising WouldBlock.
        """
        self._check_get()
        if self._send_held is not None:
            # What our puts held back goes out first: a get after a put is most often
            # a request waiting for its answer (the answer comes sooner, and the peer
            # keeps spinning instead of falling asleep).
            self._send_held()
        now = _monotonic()
        if now - self._yielded >= FAIR_SLICE:
            self._yielded = now
            await self._fair_yield(getting=True)  # a cancellation lands here
            self._check_get()  # closed meanwhile?
        framer = self._framer
        try:
            message = framer.next_message()
            if message is not NEED_DATA:
                self._messages_received += 1
                return message  # type: ignore[return-value]
            self._getting = True
            try:
                receive = self.stream.receive
                vchan = self._vchan
                chunk = self._chunk
                while True:
                    # A large frame is received straight into a buffer of its size (one
                    # copy out of the ring, none to gather the pieces).
                    view = framer.receive_buffer(chunk) if vchan is not None else None
                    try:
                        if vchan is None:
                            data = await receive(self._receive_size())
                        elif view is None:
                            # (a ring's receive returns what it holds, up to a chunk:
                            # without a view, what the frame misses fits in one)
                            data = await receive(chunk)
                        else:
                            n = await vchan.receive_into(view)
                    except EndOfStream:
                        raise self._at_end() from None
                    self._yielded = _monotonic()
                    if view is None:
                        self._bytes_received += len(data)
                        framer.feed(data if type(data) is bytes else bytes(data))
                    else:
                        self._bytes_received += n
                        framer.received(n)
                    message = framer.next_message()
                    if message is not NEED_DATA:
                        self._messages_received += 1
                        return message  # type: ignore[return-value]
            finally:
                self._getting = False
        except MessageTooLarge:
            await self._abort()
            raise
        except MalformedMessage:
            self._malformed += 1
            raise

    def get_many_nowait(self, max_items: int = DEFAULT_MAX_ITEMS) -> list[T]:
        """Return the messages available now: at least one, at most ``max_items``, and
        only those completed by at most about :data:`COLLECT_BYTES` read from the
        stream in this call (the rest stays buffered), so it returns in bounded time
        and memory even while the peer keeps writing.  On a stream without
        ``receive_nowait``, only messages already received.

        An error met after some messages were collected is raised by the next call, so
        no message is lost.

        Besides the errors below, it raises those of :meth:`get_nowait`.

        Raises:
            anyio.WouldBlock: no complete message yet.
            ValueError: ``max_items`` is less than 1.
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        first = self.get_nowait()
        return self._collect([first], max_items)

    async def get_many(self, max_items: int = DEFAULT_MAX_ITEMS) -> list[T]:
        """Wait for at least one message, then return the messages available without
        waiting further, bounded as in :meth:`get_many_nowait` (at most ``max_items``).

        Cancellation: as :meth:`get` (nothing is lost).  Each call yields to the event
        loop as :meth:`get` does, then collects without waiting, within the bounds
        above: a loop of ``get_many`` calls does not starve other tasks.

        Besides the errors below, it raises those of :meth:`get` (an error met after the
        first message is deferred to the next call).

        Raises:
            ValueError: ``max_items`` is less than 1.
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        first = await self.get()
        return self._collect([first], max_items)

    def _collect(self, out: list[T], limit: int) -> list[T]:
        if limit < 1:
            raise ValueError("max_items must be at least 1")
        framer = self._framer
        receive_nowait = self._receive_nowait
        received = 0
        try:
            while len(out) < limit:
                got = framer.next_messages(limit - len(out))
                if got:
                    out += got
                    self._messages_received += len(got)
                    continue
                # Every complete message was taken: read more, within the bounds.
                if receive_nowait is None or self._ended or received >= COLLECT_BYTES:
                    break
                try:
                    data = receive_nowait(self._receive_size())
                except WouldBlock:
                    break
                except EndOfStream:
                    self._deferred = self._at_end()
                    break
                received += len(data)
                self._bytes_received += len(data)
                framer.feed(data)
        except MessageTooLarge as exc:
            self.close()
            self._deferred = exc
        except Exception as exc:  # deliver what we have; raise the error next time
            if isinstance(exc, MalformedMessage):
                self._malformed += 1
            self._deferred = exc
        return out

    # -- iteration and closing -------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        framer = self._framer
        if (
            framer.pending
            and not self._getting
            and self._deferred is None
            and not self._closed
            and _monotonic() - self._yielded < FAIR_SLICE
        ):
            # get()'s fast path, without its call: a message decoded already and no
            # yield due (the loop over a busy queue is one call per message).
            self._messages_received += 1
            return framer.next_message()  # type: ignore[return-value]
        try:
            return await self.get()
        except EndOfStream:
            raise StopAsyncIteration from None

    @property
    def closed(self) -> bool:
        """True once the queue (or its :class:`~gntipc.VchanStream` or
        :class:`~gntipc.SessionStream`) is closed."""
        if self._closed:
            return True
        held = self._held
        return held is not None and held.closed

    def close(self) -> None:
        """Close the queue (idempotent).  A :class:`~gntipc.VchanStream` or
        :class:`~gntipc.SessionStream` is closed at once; any other stream (it has no
        synchronous close) when :meth:`aclose` is called."""
        self._closed = True
        if self._held is not None:
            self._held.close()

    async def aclose(self) -> None:
        """Close the queue and its stream (idempotent)."""
        self._closed = True
        await self.stream.aclose()

    async def _abort(self) -> None:
        """Close the queue and its stream at once, after the framing broke (a partial
        frame went out, or the peer announced an oversized one)."""
        self.close()
        if self._held is None:
            # Forcefully: a TLS stream's graceful close would wait for the peer.
            with contextlib.suppress(BrokenResourceError, ClosedResourceError, OSError):
                await anyio.aclose_forcefully(self.stream)

    def __repr__(self) -> str:
        return f"<MessageQueue[{getattr(self.type, '__name__', self.type)}] {self.stream!r}>"
