"""Message framing, sans-I/O: :class:`MessageFramer` turns typed messages into frames and
received bytes back into messages.  No I/O, no event loop: the caller moves the bytes.

Wire format: each message is one *frame*, a little-endian u32 payload length followed by
the msgspec MessagePack encoding of the message::

    u32 length | length bytes of MessagePack

Receiving, in the style of h11::

    framer = MessageFramer(Reading)
    framer.feed(chunk)                       # any split of the byte stream
    while (msg := framer.next_message()) is not NEED_DATA:
        handle(msg)

:meth:`MessageFramer.feed` only buffers (constant time); decoding happens in
:meth:`~MessageFramer.next_message` / :meth:`~MessageFramer.next_messages`, so the caller
decides how many messages to take at a time (a bounded batch), and an undecodable frame
is reported in its place in the sequence, then skipped.

Hostile input:

* a frame whose payload does not decode as the expected type raises
  :class:`~gntipc.MalformedMessage` (its boundaries are known: it is skipped, the next
  call returns the next message);
* a length header above ``max_message_size`` raises :class:`~gntipc.MessageTooLarge`:
  the buffered bytes are dropped and every later call raises it again (nothing after it
  can be trusted to be in sync);
* :meth:`~MessageFramer.end_of_stream` raises :class:`~gntipc.MalformedMessage` when the
  input ended inside a frame.

A frame arriving in many pieces is joined once, when it is complete (linear in its size).
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, TypeVar, final

import msgspec

from .._exceptions import MalformedMessage, MessageTooLarge

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FRAME_HEADER_SIZE",
    "MAX_MESSAGE_SIZE_LIMIT",
    "NEED_DATA",
    "MessageFramer",
    "NeedData",
]

T = TypeVar("T")

_U32 = struct.Struct("<I")
#: Bytes of the length prefix of a frame.
FRAME_HEADER_SIZE: Final = _U32.size
#: The largest ``max_message_size`` (the length prefix is a u32).
MAX_MESSAGE_SIZE_LIMIT: Final = 0xFFFFFFFF
#: The default ``max_message_size``: 1 MiB.
DEFAULT_MAX_MESSAGE_SIZE: Final = 1 << 20
_HEADER = FRAME_HEADER_SIZE
# What a hostile payload can make msgspec raise (deep nesting hits the recursion limit).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


@final
class NeedData:
    """The type of :data:`NEED_DATA`: no complete message is buffered."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`MessageFramer.next_message` when more bytes must be fed first.
NEED_DATA: Final = NeedData()


class MessageFramer(Generic[T]):
    """Frames ``T`` values (msgspec MessagePack behind a u32 length) and unframes them.

    Args:
        type: the message type, used to validate what is decoded (anything msgspec can
            decode: Structs, dataclasses, builtins, unions...).
        max_message_size: the largest encoded message, in bytes, accepted in either
            direction (1 .. 2**32 - 1).
        enc_hook: passed to msgspec's encoder, for custom types.
        dec_hook: passed to msgspec's decoder, for custom types.

    Raises:
        ValueError: ``max_message_size`` out of range.
    """

    def __init__(
        self,
        type: type[T],
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        enc_hook: Callable[[Any], Any] | None = None,
        dec_hook: Callable[[type, Any], Any] | None = None,
    ) -> None:
        if not 0 < max_message_size <= MAX_MESSAGE_SIZE_LIMIT:
            raise ValueError(f"max_message_size must be in 1..{MAX_MESSAGE_SIZE_LIMIT}")
        self.type = type
        self.max_message_size = max_message_size
        self._encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type, dec_hook=dec_hook)
        # Received bytes (immutable: the caller's chunks, never copied unless a frame
        # straddles them), the view decoding slices from, and the next unread frame.
        self._rbuf = b""
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        # Chunks fed after _rbuf while the frame at _rpos is incomplete: joined once the
        # frame is complete (re-joining on every chunk would be quadratic).
        self._parts: collections.deque[bytes] = collections.deque()
        self._parts_len = 0
        self._broken: str | None = None

    # -- encoding --------------------------------------------------------------------

    def encode(self, message: T) -> bytes:
        """Return the frame of ``message``.

        Raises:
            MessageTooLarge: it encodes to more than ``max_message_size`` bytes.
            TypeError: msgspec cannot encode it.
        """
        buf = bytearray()
        self.encode_into(message, buf)
        return bytes(buf)

    def encode_many(self, messages: Iterable[T]) -> bytes:
        """Return the frames of ``messages``, concatenated.

        Raises:
            As :meth:`encode` (for the first message that fails; nothing is returned).
        """
        buf = bytearray()
        self.encode_many_into(messages, buf)
        return bytes(buf)

    def encode_into(self, message: T, buf: bytearray, start: int = 0) -> None:
        """Write the frame of ``message`` into ``buf`` at ``start``; ``buf`` ends with it
        (it is truncated or extended as needed).

        Raises:
            As :meth:`encode`; ``buf`` is then truncated at ``start``.
        """
        try:
            self._encoder.encode_into(message, buf, start + _HEADER)
        except BaseException:
            del buf[start:]
            raise
        n = len(buf) - start - _HEADER
        if n > self.max_message_size:
            del buf[start:]
            raise MessageTooLarge(
                f"message encodes to {n} bytes, more than max_message_size"
                f" ({self.max_message_size})"
            )
        _U32.pack_into(buf, start, n)

    def encode_many_into(self, messages: Iterable[T], buf: bytearray, start: int = 0) -> None:
        """Write the frames of ``messages`` into ``buf`` from ``start``, in one loop;
        ``buf`` ends with the last one.

        Raises:
            As :meth:`encode`; ``buf`` is then truncated at ``start`` (all or nothing).
        """
        del buf[start:]
        encode_into = self._encoder.encode_into
        pack_into = _U32.pack_into
        most = self.max_message_size
        try:
            for message in messages:
                pos = len(buf)
                encode_into(message, buf, pos + _HEADER)
                n = len(buf) - pos - _HEADER
                if n > most:
                    raise MessageTooLarge(
                        f"message encodes to {n} bytes, more than max_message_size ({most})"
                    )
                pack_into(buf, pos, n)
        except BaseException:
            del buf[start:]
            raise

    # -- decoding --------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Buffer received bytes (any split of the stream: one byte, many frames...).

        ``data`` is kept, not copied: it must be ``bytes`` (immutable), e.g. what a
        stream's ``receive`` returned.  Constant time; decoding happens in
        :meth:`next_message` / :meth:`next_messages`.

        Raises:
            MessageTooLarge: an earlier call reported an oversized frame.
            TypeError: ``data`` is not ``bytes``.
        """
        if self._broken is not None:
            raise MessageTooLarge(self._broken)
        if type(data) is not bytes:
            raise TypeError(f"feed() takes bytes, not {type(data).__name__}")
        if self._rpos == len(self._rbuf) and not self._parts:
            self._rbuf = data
            self._rview = memoryview(data)
            self._rpos = 0
        elif data:
            self._parts.append(data)
            self._parts_len += len(data)

    def _split_header(self) -> int:
        """The length of the frame at the read position, whose header is buffered but
        split across pieces (less than a header in ``_rbuf``)."""
        head = bytes(self._rview[self._rpos :])
        for part in self._parts:
            head += part[: _HEADER - len(head)]
            if len(head) == _HEADER:
                break
        n: int = _U32.unpack(head)[0]
        return n

    def _join(self) -> None:
        # Called once the frame at the read position is complete: each byte is copied
        # at most twice (here, and again if it is in an incomplete frame at the end).
        data = b"".join([self._rview[self._rpos :], *self._parts])
        self._parts.clear()
        self._parts_len = 0
        self._rbuf = data
        self._rview = memoryview(data)
        self._rpos = 0

    def next_message(self) -> T | NeedData:
        """Decode and return the next complete message, or :data:`NEED_DATA`.

        Raises:
            MalformedMessage: the next frame does not decode as the expected type; it
                is skipped (the next call goes on after it).
            MessageTooLarge: the next frame announces more than ``max_message_size``
                bytes; the buffer is dropped and every later call raises this again.
        """
        pos = self._rpos
        left = len(self._rbuf) - pos
        if not left and self._parts:
            # The buffer is used up: the next piece becomes the buffer (no copy).
            data = self._rbuf = self._parts.popleft()
            self._rview = memoryview(data)
            self._rpos = pos = 0
            self._parts_len -= len(data)
            left = len(data)
        if left >= _HEADER:
            (n,) = _U32.unpack_from(self._rbuf, pos)
        elif left + self._parts_len < _HEADER:
            if self._broken is not None:
                raise MessageTooLarge(self._broken)
            return NEED_DATA
        else:
            n = self._split_header()
        if n > self.max_message_size:
            self._fail_oversize(n)
        end = _HEADER + n
        if left < end:
            if left + self._parts_len < end:
                return NEED_DATA
            self._join()
            pos = 0
        end += pos
        self._rpos = end
        try:
            return self._decoder.decode(self._rview[pos + _HEADER : end])
        except _DECODE_ERRORS as exc:
            raise MalformedMessage(f"undecodable {n}-byte message skipped: {exc}") from exc

    def next_messages(self, max_items: int) -> list[T]:
        """Decode and return up to ``max_items`` complete messages; an empty list means
        :data:`NEED_DATA`.

        An error met after some messages were decoded is not raised: the call returns
        those, and the next call raises it (so no message is lost or reordered).  A
        call may also stop early at a frame split across fed pieces (the next call
        joins it).

        Raises:
            ValueError: ``max_items`` is less than 1.
            As :meth:`next_message`, for the first frame.
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        out: list[T] = []
        most = self.max_message_size
        unpack = _U32.unpack_from
        decode = self._decoder.decode
        append = out.append
        while True:
            # The batch path of next_message, in one loop, over the frames in _rbuf.
            buf = self._rbuf
            view = self._rview
            pos = self._rpos
            size = len(buf)
            try:
                while len(out) < max_items and size - pos >= _HEADER:
                    (n,) = unpack(buf, pos)
                    end = pos + _HEADER + n
                    if n > most or end > size:
                        break
                    append(decode(view[pos + _HEADER : end]))
                    pos = end
            except _DECODE_ERRORS:
                pass  # left to next_message(), which skips the frame and reports it
            self._rpos = pos
            if out:
                # Full, or stopped at a frame split across pieces, a bad frame or the
                # end: what stopped us is left in place for the next call.
                return out
            message = self.next_message()  # joins a split frame, or raises for it
            if message is NEED_DATA:
                return out
            append(message)  # type: ignore[arg-type]

    def missing(self) -> int:
        """How many more bytes complete the frame being received, while
        :meth:`next_message` returns :data:`NEED_DATA` (the rest of the header while
        the length is not known yet); at least 1."""
        pos = self._rpos
        left = len(self._rbuf) - pos
        have = left + self._parts_len
        if have < _HEADER:
            return _HEADER - have
        n: int = _U32.unpack_from(self._rbuf, pos)[0] if left >= _HEADER else self._split_header()
        return max(1, _HEADER + n - have)

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned as messages (or skipped)."""
        return len(self._rbuf) - self._rpos + self._parts_len

    def end_of_stream(self) -> None:
        """The input ended: check that it ended on a frame boundary (call it once every
        complete message was taken).

        Raises:
            MalformedMessage: the input ended inside a frame (its bytes are dropped).
        """
        left = self.buffered
        if left:
            self._drop()
            raise MalformedMessage(f"the stream ended inside a frame ({left} bytes left)")

    def _drop(self) -> None:
        self._rbuf = b""
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._parts.clear()
        self._parts_len = 0

    def _fail_oversize(self, n: int) -> None:
        self._drop()
        self._broken = (
            f"the peer announced a {n}-byte message, more than max_message_size"
            f" ({self.max_message_size})"
        )
        raise MessageTooLarge(self._broken)

    def __repr__(self) -> str:
        name = getattr(self.type, "__name__", self.type)
        return f"<MessageFramer[{name}] buffered={self.buffered}>"
