"""Typed message queues over a byte stream: :class:`MessageQueue`.

Wire format: each message is one *frame*, a little-endian u32 payload length followed by
the msgspec MessagePack encoding of the message.  Frames are written with as few ring
operations as possible (:meth:`MessageQueue.put_many` writes a whole batch with one ring
write and at most one notification) and read in large chunks that are copied out of
shared memory before anything is decoded (the peer can rewrite the ring at any time).

Bad input from the peer:

* A frame whose payload does not decode as the expected type raises
  :class:`MalformedMessage`.  Its boundaries were known, so it is skipped: the queue
  stays usable and the next :meth:`~MessageQueue.get` returns the next message.
* A length header larger than ``max_message_size`` raises :class:`MessageTooLarge` and
  **closes the queue and its stream**: the frame cannot be skipped without reading an
  untrusted amount of data, and nothing after it can be trusted to be in sync.
* The stream ending inside a frame raises :class:`MalformedMessage` (then the queue
  behaves as ended).

A peer that keeps the ring full cannot keep :meth:`MessageQueue.get_many` busy: one call
returns at most ``max_items`` messages (:data:`DEFAULT_MAX_ITEMS` by default) and stops
reading the ring once :data:`COLLECT_BYTES` were received; the rest stays for the next
call.  A frame arriving in many pieces is joined once, when it is complete (linear in
its size).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Generic, Self, TypeVar

import anyio
import msgspec
from anyio import BrokenResourceError, BusyResourceError, EndOfStream, WouldBlock
from anyio.abc import AsyncResource
from anyio.lowlevel import checkpoint

from ._exceptions import MalformedMessage as MalformedMessage
from ._exceptions import MessageTooLarge as MessageTooLarge
from .streams import VchanAttribute, VchanStream

__all__ = ["MalformedMessage", "MessageQueue", "MessageTooLarge"]

T = TypeVar("T")

_U32 = struct.Struct("<I")
_HEADER = _U32.size
_MAX_LIMIT = 0xFFFFFFFF
#: The default for ``max_message_size``.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
#: The default for ``max_items`` of :meth:`MessageQueue.get_many`.
DEFAULT_MAX_ITEMS = 4096
#: :meth:`MessageQueue.get_many` reads no more from the ring once it received this many
#: bytes in one call (it returns the messages they completed).
COLLECT_BYTES = 1 << 20


class _Nothing:
    pass


_NOTHING = _Nothing()


class MessageQueue(AsyncResource, Generic[T]):
    """Typed messages over a :class:`~gntipc.VchanStream` (msgspec MessagePack).

    ``MessageQueue(stream, Reading)`` sends and receives ``Reading`` values (any type
    msgspec can encode and validate: Structs, dataclasses, builtins, unions…).  Both
    directions may be used at once by two tasks; two concurrent putters (or getters)
    raise :class:`anyio.BusyResourceError`.  The queue owns the stream: closing one
    closes the other.  ``async for message in queue`` iterates until the peer ends the
    stream.

    Args:
        stream: a connected stream (the queue takes it over; do not read or write it
            directly any more).
        type: the message type, used to validate what arrives.
        max_message_size: the largest encoded message, in bytes, accepted in either
            direction (at most 2**32 - 1).
        enc_hook, dec_hook: passed to msgspec's encoder and decoder for custom types.
    """

    def __init__(
        self,
        stream: VchanStream,
        type: type[T],
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        enc_hook: Any = None,
        dec_hook: Any = None,
    ) -> None:
        if not 0 < max_message_size <= _MAX_LIMIT:
            raise ValueError(f"max_message_size must be in 1..{_MAX_LIMIT}")
        self.stream = stream
        self.type = type
        self.max_message_size = max_message_size
        self._encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type, dec_hook=dec_hook)
        self._chunk = stream.extra(VchanAttribute.read_size)
        self._ring = stream.extra(VchanAttribute.write_size)
        # Outgoing frames are encoded here, in place (no per-message allocation).
        self._wbuf = bytearray(256)
        self._putting = False
        self._getting = False
        # Received bytes (immutable, already copied out of shared memory), the view
        # decoding slices from, and the position of the next unread frame.
        self._rbuf = b""
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        # Chunks received after _rbuf while the frame at _rpos is incomplete: they are
        # joined once the frame is complete (re-joining on every chunk is quadratic).
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._ended = False
        self._deferred: BaseException | None = None

    # -- encoding --------------------------------------------------------------------

    def _encode_into(self, message: T, buf: bytearray, start: int) -> None:
        self._encoder.encode_into(message, buf, start + _HEADER)
        n = len(buf) - start - _HEADER
        if n > self.max_message_size:
            del buf[start:]
            raise MessageTooLarge(
                f"message encodes to {n} bytes, more than max_message_size"
                f" ({self.max_message_size})"
            )
        _U32.pack_into(buf, start, n)

    def _encode_batch(self, messages: Iterable[T]) -> bytearray:
        """Frame every message into the write buffer, in one loop (the batch path of
        :meth:`_encode_into`).  A too-large message empties the buffer and raises."""
        buf = self._wbuf
        del buf[:]
        encode_into = self._encoder.encode_into
        pack_into = _U32.pack_into
        most = self.max_message_size
        for message in messages:
            start = len(buf)
            encode_into(message, buf, start + _HEADER)
            n = len(buf) - start - _HEADER
            if n > most:
                del buf[:]
                raise MessageTooLarge(
                    f"message encodes to {n} bytes, more than max_message_size ({most})"
                )
            pack_into(buf, start, n)
        return buf

    def put_nowait(self, message: T) -> None:
        """Send ``message`` now, or not at all.

        Raises:
            anyio.WouldBlock: no room in the ring right now (nothing was written).
            MessageTooLarge: the message exceeds ``max_message_size`` (nothing written).
            gntipc.LocalProtocolError: the frame is larger than the whole ring (use
                :meth:`put`).
            anyio.BusyResourceError: another task is inside :meth:`put`/:meth:`put_many`.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
            TypeError: msgspec cannot encode ``message``.
        """
        if self._putting:
            raise BusyResourceError("sending to")
        buf = self._wbuf
        self._encode_into(message, buf, 0)
        self.stream.send_nowait(buf)

    def put_many_nowait(self, messages: Iterable[T]) -> None:
        """Send all ``messages`` now with one ring write, or none of them.

        Raises:
            anyio.WouldBlock: not enough room for the whole batch right now.
            Otherwise as :meth:`put_nowait`.
        """
        if self._putting:
            raise BusyResourceError("sending to")
        buf = self._encode_batch(messages)
        if buf:
            self.stream.send_nowait(buf)

    async def put(self, message: T) -> None:
        """Send ``message``, waiting for ring space.

        Cancellation: a cancelled put wrote nothing, or the whole frame (the message is
        sent).  A frame that fits the ring is written at once or not at all.  A larger
        one is written in pieces as ring space frees: cancelled after writing only part
        of it, the queue and stream are closed (the peer sees a truncated frame,
        :class:`MalformedMessage`), never a desynchronised stream.

        Raises:
            MessageTooLarge: the message exceeds ``max_message_size`` (nothing written).
            anyio.BusyResourceError: another task is putting.
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: the queue is closed.
            TypeError: msgspec cannot encode ``message``.
        """
        if self._putting:
            raise BusyResourceError("sending to")
        self._putting = True
        try:
            buf = self._wbuf
            self._encode_into(message, buf, 0)
            await self._send_frames(buf)
        finally:
            self._putting = False

    async def put_many(self, messages: Iterable[T]) -> None:
        """Send ``messages`` in order, encoded into one buffer and written with as few
        ring writes (and notifications) as the free space allows: one, if it fits.

        Cancellation: as for :meth:`put`, for the batch as a whole: it went out entirely
        or not at all, or else the queue and stream are closed.

        Raises:
            As :meth:`put` (a too-large message aborts the batch before anything is
            written).
        """
        if self._putting:
            raise BusyResourceError("sending to")
        self._putting = True
        try:
            buf = self._encode_batch(messages)
            if buf:
                await self._send_frames(buf)
        finally:
            self._putting = False

    async def _send_frames(self, buf: bytearray) -> None:
        stream = self.stream
        size = len(buf)
        if size <= self._ring:
            # Frames that fit the ring go out whole or not at all: a cancelled put
            # leaves the stream framed.
            while True:
                try:
                    stream.send_nowait(buf)
                except WouldBlock:
                    await stream.wait_writable(size)
                    continue
                await checkpoint()
                return
        try:
            await stream.send(buf)
        except BrokenResourceError:
            raise  # the peer is gone: no later send can go wrong, and what it wrote
            # before it left stays readable (closing here would lose it)
        except BaseException:
            if 0 < stream.send_progress < len(buf):
                # A partial frame went out: nothing we send later could be framed right.
                stream.close()
            raise

    # -- decoding --------------------------------------------------------------------

    def _next(self) -> T | _Nothing:
        """Decode the next complete buffered frame, if there is one."""
        buf = self._rbuf
        pos = self._rpos
        if len(buf) - pos < _HEADER:
            return _NOTHING
        (n,) = _U32.unpack_from(buf, pos)
        if n > self.max_message_size:
            self._fail_oversize(n)
        end = pos + _HEADER + n
        if end > len(buf):
            return _NOTHING
        self._rpos = end
        try:
            return self._decoder.decode(self._rview[pos + _HEADER : end])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MalformedMessage(f"undecodable {n}-byte message skipped: {exc}") from exc

    def _decode_ready(self, out: list[T], limit: int) -> None:
        """Append to ``out`` (up to ``limit``) every complete frame buffered in one piece:
        the batch path of :meth:`_next`, in one loop.  It stops before an oversized or
        undecodable frame, and before a frame split across received pieces, for
        :meth:`_next` to handle."""
        buf = self._rbuf
        view = self._rview
        pos = self._rpos
        size = len(buf)
        most = self.max_message_size
        unpack = _U32.unpack_from
        decode = self._decoder.decode
        append = out.append
        try:
            while len(out) < limit and size - pos >= _HEADER:
                (n,) = unpack(buf, pos)
                end = pos + _HEADER + n
                if n > most or end > size:
                    break
                append(decode(view[pos + _HEADER : end]))
                pos = end
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass  # left to _next(), which skips the frame and reports it
        self._rpos = pos

    def _needed(self) -> int:
        """How many more bytes complete the current frame (at least one chunk)."""
        buf = self._rbuf
        pos = self._rpos
        if len(buf) - pos >= _HEADER:
            n: int = _U32.unpack_from(buf, pos)[0]
            return max(self._chunk, pos + _HEADER + n - len(buf) - self._parts_len)
        return self._chunk

    def _append(self, data: bytes) -> None:
        """Buffer received bytes (called after :meth:`_next` found no complete frame, so
        a known length was checked against ``max_message_size``)."""
        buf = self._rbuf
        pos = self._rpos
        left = len(buf) - pos
        if left >= _HEADER:
            end: int = _HEADER + _U32.unpack_from(buf, pos)[0]
            if left + self._parts_len + len(data) < end:
                self._parts.append(data)
                self._parts_len += len(data)
                return
        if left:
            data = b"".join([self._rview[pos:], *self._parts, data])
            self._parts.clear()
            self._parts_len = 0
        self._rbuf = data
        self._rview = memoryview(data)
        self._rpos = 0

    def _buffered(self) -> int:
        return len(self._rbuf) - self._rpos + self._parts_len

    def _drop_buffered(self) -> None:
        self._rbuf = b""
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._parts.clear()
        self._parts_len = 0

    def _fail_oversize(self, n: int) -> None:
        # Drop the buffered rest: later gets then fail on the closed stream.
        self._drop_buffered()
        self.close()
        raise MessageTooLarge(
            f"the peer announced a {n}-byte message, more than max_message_size"
            f" ({self.max_message_size}); the queue is closed"
        )

    def _at_end(self) -> EndOfStream:
        self._ended = True
        left = self._buffered()
        if left:
            self._drop_buffered()
            raise MalformedMessage(f"the stream ended inside a frame ({left} bytes left)")
        return EndOfStream()

    def _check_get(self) -> None:
        if self._getting:
            raise BusyResourceError("receiving from")
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc
        if self._ended:
            raise EndOfStream

    def get_nowait(self) -> T:
        """Return the next message if one is available now.

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
        message = self._next()
        if message is not _NOTHING:
            return message  # type: ignore[return-value]
        try:
            data = self.stream.receive_nowait(self._needed())
        except EndOfStream:
            raise self._at_end() from None
        self._append(data)
        message = self._next()
        if message is _NOTHING:
            raise WouldBlock
        return message  # type: ignore[return-value]

    async def get(self) -> T:
        """Return the next message, waiting for it.

        Cancellation: nothing is lost; bytes already received stay buffered (also a
        message already decoded when the cancellation arrives).

        Raises:
            As :meth:`get_nowait`, except that it waits instead of raising WouldBlock.
        """
        self._check_get()
        # Cancelled before anything is taken, or not at all once a message is taken.
        await anyio.lowlevel.checkpoint_if_cancelled()
        message = self._next()
        if message is not _NOTHING:
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return message  # type: ignore[return-value]
        self._getting = True
        try:
            while True:
                try:
                    data = await self.stream.receive(self._needed())
                except EndOfStream:
                    raise self._at_end() from None
                self._append(data)
                message = self._next()
                if message is not _NOTHING:
                    return message  # type: ignore[return-value]
        finally:
            self._getting = False

    def get_many_nowait(self, max_items: int = DEFAULT_MAX_ITEMS) -> list[T]:
        """Return the messages available now: at least one, at most ``max_items``, and
        only those completed by at most about :data:`COLLECT_BYTES` read from the ring
        in this call (the rest stays buffered), so it returns in bounded time and
        memory even while the peer keeps writing.

        An error met after some messages were collected is raised by the next call, so
        no message is lost.

        Raises:
            anyio.WouldBlock: no complete message yet.
            ValueError: ``max_items`` is less than 1.
            Otherwise as :meth:`get_nowait`.
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

        Raises:
            ValueError: ``max_items`` is less than 1.
            As :meth:`get` (an error after the first message is deferred to the next call).
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        first = await self.get()
        return self._collect([first], max_items)

    def _collect(self, out: list[T], limit: int) -> list[T]:
        if limit < 1:
            raise ValueError("max_items must be at least 1")
        nxt = self._next
        received = 0
        try:
            while len(out) < limit:
                self._decode_ready(out, limit)
                if len(out) >= limit:
                    break
                message = nxt()
                if message is _NOTHING:
                    if self._ended or received >= COLLECT_BYTES:
                        break
                    try:
                        data = self.stream.receive_nowait(self._needed())
                    except WouldBlock:
                        break
                    except EndOfStream:
                        self._deferred = self._at_end()
                        break
                    received += len(data)
                    self._append(data)
                    continue
                out.append(message)  # type: ignore[arg-type]
        except Exception as exc:  # deliver what we have; raise the error next time
            self._deferred = exc
        return out

    # -- iteration and closing -------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.get()
        except EndOfStream:
            raise StopAsyncIteration from None

    @property
    def closed(self) -> bool:
        """True once the queue (or its stream) is closed."""
        return self.stream.closed

    def close(self) -> None:
        """Close the queue and its stream (idempotent)."""
        self.stream.close()

    async def aclose(self) -> None:
        """Close the queue and its stream (idempotent)."""
        await self.stream.aclose()

    def __repr__(self) -> str:
        return f"<MessageQueue[{getattr(self.type, '__name__', self.type)}] {self.stream!r}>"
