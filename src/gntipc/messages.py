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
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
import msgspec
from anyio import BusyResourceError, EndOfStream, WouldBlock

from ._exceptions import ProtocolError, RemoteProtocolError
from .streams import VchanAttribute, VchanStream

__all__ = ["MalformedMessage", "MessageQueue", "MessageTooLarge"]

T = TypeVar("T")

_U32 = struct.Struct("<I")
_HEADER = _U32.size
_MAX_LIMIT = 0xFFFFFFFF
#: The default for ``max_message_size``.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20


class MessageTooLarge(ProtocolError):
    """A message (its encoded payload) exceeds the queue's ``max_message_size``.

    Raised by the put methods before anything is written (the queue stays usable), and by
    the get methods for an announced frame that is too large (the queue is then closed).
    """


class MalformedMessage(RemoteProtocolError):
    """The peer sent a frame that does not decode as the expected type (the frame is
    skipped), or the stream ended in the middle of a frame."""


class _Nothing:
    pass


_NOTHING = _Nothing()


class MessageQueue(Generic[T]):
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
        self._write_size = stream.extra(VchanAttribute.write_size)
        self._chunk = stream.extra(VchanAttribute.read_size)
        # Outgoing frames are encoded here, in place (no per-message allocation).
        self._wbuf = bytearray(256)
        self._putting = False
        self._getting = False
        # Received bytes (immutable, already copied out of shared memory), the view
        # decoding slices from, and the position of the next unread frame.
        self._rbuf = b""
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
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
        buf = self._wbuf
        del buf[:]
        encode = self._encode_into
        for message in messages:
            encode(message, buf, len(buf))
        if buf:
            self.stream.send_nowait(buf)

    async def put(self, message: T) -> None:
        """Send ``message``, waiting for ring space.

        Cancellation: a frame no larger than the ring is written at once, so a cancelled
        put wrote nothing.  A larger frame is written in pieces; if cancelled after the
        first piece, the queue and stream are closed (the peer sees a truncated frame,
        :class:`MalformedMessage`, never a desynchronised stream).

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

        Cancellation: as for :meth:`put`; a batch no larger than the ring is all or
        nothing.

        Raises:
            As :meth:`put` (a too-large message aborts the batch before anything is
            written).
        """
        if self._putting:
            raise BusyResourceError("sending to")
        self._putting = True
        try:
            buf = self._wbuf
            del buf[:]
            encode = self._encode_into
            for message in messages:
                encode(message, buf, len(buf))
            if buf:
                await self._send_frames(buf)
        finally:
            self._putting = False

    async def _send_frames(self, buf: bytearray) -> None:
        stream = self.stream
        try:
            await stream.send(buf)
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

    def _needed(self) -> int:
        """How many more bytes complete the current frame (at least one chunk)."""
        buf = self._rbuf
        pos = self._rpos
        if len(buf) - pos >= _HEADER:
            n: int = _U32.unpack_from(buf, pos)[0]
            return max(self._chunk, pos + _HEADER + n - len(buf))
        return self._chunk

    def _append(self, data: bytes) -> None:
        pos = self._rpos
        if pos < len(self._rbuf):
            data = self._rbuf[pos:] + data
        self._rbuf = data
        self._rview = memoryview(data)
        self._rpos = 0

    def _fail_oversize(self, n: int) -> None:
        # Drop the buffered rest: later gets then fail on the closed stream.
        self._rbuf = b""
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self.close()
        raise MessageTooLarge(
            f"the peer announced a {n}-byte message, more than max_message_size"
            f" ({self.max_message_size}); the queue is closed"
        )

    def _at_end(self) -> EndOfStream:
        self._ended = True
        if self._rpos < len(self._rbuf):
            left = len(self._rbuf) - self._rpos
            self._rpos = len(self._rbuf)
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

        Cancellation: nothing is lost; bytes already received stay buffered.

        Raises:
            As :meth:`get_nowait`, except that it waits instead of raising WouldBlock.
        """
        self._check_get()
        message = self._next()
        if message is not _NOTHING:
            await anyio.lowlevel.checkpoint()
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

    def get_many_nowait(self, max_items: int | None = None) -> list[T]:
        """Return the messages available now (at least one, at most ``max_items``).

        An error met after some messages were collected is raised by the next call, so
        no message is lost.

        Raises:
            anyio.WouldBlock: no complete message yet.
            Otherwise as :meth:`get_nowait`.
        """
        first = self.get_nowait()
        return self._collect([first], max_items)

    async def get_many(self, max_items: int | None = None) -> list[T]:
        """Wait for at least one message, then return every message available without
        waiting further (at most ``max_items``).

        Raises:
            As :meth:`get` (an error after the first message is deferred to the next call).
        """
        first = await self.get()
        return self._collect([first], max_items)

    def _collect(self, out: list[T], max_items: int | None) -> list[T]:
        limit = max_items if max_items is not None else 1 << 62
        if limit < 1:
            raise ValueError("max_items must be at least 1")
        nxt = self._next
        try:
            while len(out) < limit:
                message = nxt()
                if message is _NOTHING:
                    if self._ended:
                        break
                    try:
                        data = self.stream.receive_nowait(self._needed())
                    except WouldBlock:
                        break
                    except EndOfStream:
                        self._deferred = self._at_end()
                        break
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
        return f"<MessageQueue[{getattr(self.type, '__name__', self.type)}] {self.stream!r}>"
