"""Message framing, sans-I/O: :class:`MessageFramer` turns typed messages into frames and
received bytes back into messages.  No I/O, no event loop: the caller moves the bytes.

Wire format: a stream of *frames*, each a little-endian u32 header followed by a payload
of MessagePack::

    u32 header | (header & 0x7FFFFFFF) bytes of MessagePack

* A **message frame** (the header's top bit clear; the only kind before version 1 of the
  format) holds one message: the header is the payload length.
* A **batch frame** (version 1: the top bit, :data:`BATCH_FLAG`, set) holds a MessagePack
  *array* of messages, encoded and decoded by one msgspec call each: what
  :meth:`MessageFramer.encode_many_into` writes for two or more messages (unless
  ``batch_frames=False``).  The messages are delivered in array order, one by one; an
  empty array delivers nothing.  A batch frame that does not decode as an array of the
  expected type is skipped whole (one :class:`~gntipc.MalformedMessage`).

A receiver of either version decodes message frames; a receiver older than version 1 sees
a batch frame's header as a length of 2 GiB or more and refuses it with
:class:`~gntipc.MessageTooLarge` (it fails loudly, it never misreads): a sender talking to
such a peer must use ``batch_frames=False``.  ``max_message_size`` bounds every frame's
payload, so a batch frame of small messages holds at most about that many bytes of them
(:meth:`~MessageFramer.encode_many_into` splits a larger batch into several frames).

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
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, final

import msgspec

if TYPE_CHECKING:
    # PEP 747, as msgspec's stubs use it: ``Request | Reply`` is a TypeForm, not a type.
    from typing_extensions import TypeForm

from .._exceptions import MalformedMessage, MessageTooLarge

__all__ = [
    "BATCH_FLAG",
    "DECODE_AHEAD",
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
#: The header bit that marks a batch frame (see the module documentation).
BATCH_FLAG: Final = 0x80000000
_LENGTH_MASK = BATCH_FLAG - 1
#: The largest ``max_message_size`` (the 31 low bits of the header).
MAX_MESSAGE_SIZE_LIMIT: Final = _LENGTH_MASK
#: The default ``max_message_size``: 1 MiB.
DEFAULT_MAX_MESSAGE_SIZE: Final = 1 << 20
_HEADER = FRAME_HEADER_SIZE
#: :meth:`MessageFramer.next_message` decodes up to this many buffered messages at once.
DECODE_AHEAD: Final = 256
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
        max_message_size: the largest frame payload, in bytes (an encoded message, or a
            batch of them), accepted in either direction (1 .. 2**31 - 1).
        enc_hook: passed to msgspec's encoder, for custom types.
        dec_hook: passed to msgspec's decoder, for custom types.
        batch_frames: :meth:`encode_many_into` writes two or more messages as batch
            frames (format version 1); False writes one message frame each, for peers
            older than version 1.  Decoding accepts both either way.

    Raises:
        ValueError: ``max_message_size`` out of range.
    """

    def __init__(
        self,
        type: TypeForm[T],
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        enc_hook: Callable[[Any], Any] | None = None,
        dec_hook: Callable[[type, Any], Any] | None = None,
        batch_frames: bool = True,
    ) -> None:
        if not 0 < max_message_size <= MAX_MESSAGE_SIZE_LIMIT:
            raise ValueError(f"max_message_size must be in 1..{MAX_MESSAGE_SIZE_LIMIT}")
        self.type = type
        self.max_message_size = max_message_size
        self._encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type, dec_hook=dec_hook)
        self._batch_decoder: msgspec.msgpack.Decoder[list[T]] = msgspec.msgpack.Decoder(
            list[type], dec_hook=dec_hook  # type: ignore[valid-type]
        )
        self.batch_frames = batch_frames
        # Messages of a decoded batch frame not returned yet: self._batch[self._batch_pos:].
        self._batch: list[T] = []
        self._batch_pos = 0
        # Received bytes (immutable: the caller's chunks, never copied unless a frame
        # straddles them), the view decoding slices from, and the next unread frame.
        self._rbuf: bytes | bytearray = b""
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        # A large frame received in place (receive_buffer): its bytes so far are
        # _big[:_big_fill]; once full it becomes _rbuf (nothing else is buffered then).
        self._big: bytearray | None = None
        self._big_fill = 0
        # The buffer of the last large frame, reused for the next one (see _frame_buffer).
        self._spare: bytearray | None = None
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

        It raises the errors of :meth:`encode`, for the first message that fails
        (nothing is returned then).
        """
        buf = bytearray()
        self.encode_many_into(messages, buf)
        return bytes(buf)

    def encode_into(self, message: T, buf: bytearray, start: int = 0) -> None:
        """Write the frame of ``message`` into ``buf`` at ``start``; ``buf`` ends with it
        (it is truncated or extended as needed).

        It raises the errors of :meth:`encode`; ``buf`` is then truncated at ``start``.
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
        """Write ``messages`` into ``buf`` from ``start``; ``buf`` ends with them.  Two or
        more are written as batch frames (one msgspec call per frame; several frames
        only if one would exceed ``max_message_size``), unless ``batch_frames`` is
        False: then one message frame each, in one loop.

        It raises the errors of :meth:`encode`; ``buf`` is then truncated at ``start``
        (all or nothing).
        """
        del buf[start:]
        if not isinstance(messages, list):
            messages = list(messages)
        try:
            if self.batch_frames and len(messages) > 1:
                self._encode_batch(messages, buf)
            else:
                self._encode_each(messages, buf)
        except BaseException:
            del buf[start:]
            raise

    def _encode_each(self, messages: Iterable[T], buf: bytearray) -> None:
        encode_into = self._encoder.encode_into
        pack_into = _U32.pack_into
        most = self.max_message_size
        for message in messages:
            pos = len(buf)
            encode_into(message, buf, pos + _HEADER)
            n = len(buf) - pos - _HEADER
            if n > most:
                raise MessageTooLarge(
                    f"message encodes to {n} bytes, more than max_message_size ({most})"
                )
            pack_into(buf, pos, n)

    def _encode_batch(self, messages: list[T], buf: bytearray) -> None:
        pos = len(buf)
        self._encoder.encode_into(messages, buf, pos + _HEADER)
        n = len(buf) - pos - _HEADER
        if n <= self.max_message_size:
            _U32.pack_into(buf, pos, n | BATCH_FLAG)
            return
        # Too large for one frame: halves, recursively (a single message too large is
        # reported by _encode_each).
        del buf[pos:]
        half = len(messages) // 2
        for part in (messages[:half], messages[half:]):
            if len(part) > 1:
                self._encode_batch(part, buf)
            else:
                self._encode_each(part, buf)

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
        big = self._big
        if big is not None:
            # A large frame is being received in place: its part of data goes there.
            fill = self._big_fill
            k = min(len(data), len(big) - fill)
            big[fill : fill + k] = data[:k]
            self.received(k)
            if k == len(data):
                return
            data = data[k:]
        if self._rpos == len(self._rbuf) and not self._parts:
            self._rbuf = data
            self._rview = memoryview(data)
            self._rpos = 0
        elif data:
            self._parts.append(data)
            self._parts_len += len(data)

    def receive_buffer(self, more_than: int) -> memoryview | None:
        """Where to receive the rest of a large frame in place: a writable view of the
        missing bytes of the frame at the read position, once its length is known, if
        more than ``more_than`` of them are missing; else None.  Receive into a prefix
        of it (e.g. ``await stream.receive_into(view)``) and report the count with
        :meth:`received`: the frame is then gathered without the copies of joining
        received pieces (:meth:`feed` may go on meanwhile: it fills the view first).
        The buffer is the last large frame's, reused once its message was decoded
        (unless the message refers to it, or a view of it is still held: release
        the view once :meth:`received` was called); the framer keeps it, so it holds
        up to ``max_message_size`` bytes between large frames.
        """
        big = self._big
        if big is None:
            have = self.buffered
            if have < _HEADER or self._broken is not None:
                return None
            pos, left = self._rpos, len(self._rbuf) - self._rpos
            header = _U32.unpack_from(self._rbuf, pos)[0] if left >= _HEADER else None
            n = (self._split_header() if header is None else header) & _LENGTH_MASK
            total = _HEADER + n
            if n > self.max_message_size or total - have <= more_than:
                return None  # (an oversized frame is reported by next_message)
            if left == 0 and self._rbuf is self._spare:
                # Our reference to the last large frame, all of it decoded: let it go
                # (it is the spare).
                self._rbuf = b""
                self._rview = memoryview(self._rbuf)
                pos = 0
            big = self._frame_buffer(total)
            big[:left] = self._rview[pos:]
            fill = left
            for part in self._parts:
                big[fill : fill + len(part)] = part
                fill += len(part)
            self._parts.clear()
            self._parts_len = 0
            self._rbuf = b""
            self._rview = memoryview(self._rbuf)
            self._rpos = 0
            self._big, self._big_fill = big, fill
        return memoryview(big)[self._big_fill :]

    def _frame_buffer(self, total: int) -> bytearray:
        """A ``total``-byte buffer for a large frame: the last one's, unless something
        still refers to its bytes.

        A fresh buffer per large frame costs more than its copy: it is zero-filled, and
        the allocator gives a freed 1 MiB back to the system and takes it again, a page
        fault per 4 KiB touched.  msgspec copies what it decodes (``bytes``, ``str``...)
        out of the frame, except ``memoryview`` and ``msgspec.Raw`` values, which refer
        to it; such a reference holds a buffer export, and a bytearray with exports
        cannot be resized: the resize below raises BufferError, and the frame gets a
        buffer of its own (what the message refers to is never overwritten).
        """
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                if len(spare) > total:
                    del spare[total:]
                else:
                    del spare[-1:]  # (raises BufferError if anything refers to it)
                    spare.extend(bytes(total - len(spare)))
            except BufferError:
                spare = None
        if spare is None:
            spare = bytearray(total)
        self._spare = spare
        return spare

    def received(self, n: int) -> None:
        """``n`` more bytes of the frame are in the view :meth:`receive_buffer`
        returned.

        Raises:
            ValueError: no such view, or more bytes than it holds.
        """
        big = self._big
        fill = self._big_fill + n
        if big is None or n < 0 or fill > len(big):
            raise ValueError(f"received({n}) without room for it in a receive_buffer() view")
        self._big_fill = fill
        if fill == len(big):
            self._big, self._big_fill = None, 0
            self._rbuf = big
            self._rview = memoryview(big)
            self._rpos = 0

    def _split_header(self) -> int:
        """The header of the frame at the read position, which is buffered but split
        across pieces (less than a header in ``_rbuf``)."""
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

    def _take_batch(self, max_items: int) -> list[T]:
        """Up to ``max_items`` messages of the decoded batch frame, in order."""
        batch, pos = self._batch, self._batch_pos
        end = pos + max_items
        if end >= len(batch):
            self._batch, self._batch_pos = [], 0
            return batch if pos == 0 else batch[pos:]
        self._batch_pos = end
        return batch[pos:end]

    def next_message(self) -> T | NeedData:
        """Decode and return the next complete message, or :data:`NEED_DATA`.

        Decodes ahead: the complete frames already buffered after it (up to
        :data:`DECODE_AHEAD` messages) are decoded in the same loop and returned by the
        next calls, so a message costs one loop step, not a call chain.  An error in a
        later frame is raised when that frame's turn comes, never earlier.

        Raises:
            MalformedMessage: the next frame does not decode as the expected type (or,
                a batch frame, as an array of it); it is skipped (the next call goes on
                after it).
            MessageTooLarge: the next frame announces more than ``max_message_size``
                bytes; the buffer is dropped and every later call raises this again.
        """
        batch = self._batch
        if not batch:
            if not self._parts and self._broken is None:
                # The common cases of a request/response exchange, without the
                # decode-ahead loop: nothing buffered, or exactly one message frame.
                buf, pos = self._rbuf, self._rpos
                left = len(buf) - pos
                if not left:
                    return NEED_DATA
                if left > _HEADER:
                    (n,) = _U32.unpack_from(buf, pos)
                    if left == _HEADER + n and n <= self.max_message_size:
                        try:
                            message: T = self._decoder.decode(self._rview[pos + _HEADER :])
                        except _DECODE_ERRORS:
                            pass  # reported (and skipped) by the general path below
                        else:
                            self._rpos = len(buf)
                            return message
            batch = self.next_messages(DECODE_AHEAD)
            if not batch:
                return NEED_DATA
            if self._batch:  # the rest of a large batch frame, after what we took
                batch += self._take_batch(len(self._batch))
            self._batch = batch
            self._batch_pos = 0
        pos = self._batch_pos
        message = batch[pos]
        pos += 1
        if pos == len(batch):
            self._batch, self._batch_pos = [], 0
        else:
            self._batch_pos = pos
        return message

    def _next_one(self) -> T | NeedData:
        """:meth:`next_message` without decoding ahead: one frame at most."""
        while True:
            if self._batch:
                return self._take_batch(1)[0]
            payload = self._next_frame()
            if payload is None:
                return NEED_DATA
            view, is_batch, n = payload
            try:
                if not is_batch:
                    return self._decoder.decode(view)
                self._batch = self._batch_decoder.decode(view)
            except _DECODE_ERRORS as exc:
                kind = "batch frame" if is_batch else "message"
                raise MalformedMessage(f"undecodable {n}-byte {kind} skipped: {exc}") from exc

    def _next_frame(self) -> tuple[memoryview, bool, int] | None:
        """The payload of the next complete frame, whether it is a batch, and its length
        (the read position moves past it), or None if it is not complete yet.

        Raises:
            MessageTooLarge: as :meth:`next_message`.
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
            (header,) = _U32.unpack_from(self._rbuf, pos)
        elif left + self._parts_len < _HEADER:
            if self._broken is not None:
                raise MessageTooLarge(self._broken)
            return None
        else:
            header = self._split_header()
        n = header & _LENGTH_MASK
        if n > self.max_message_size:
            self._fail_oversize(n)
        end = _HEADER + n
        if left < end:
            if left + self._parts_len < end:
                return None
            self._join()
            pos = 0
        end += pos
        self._rpos = end
        return self._rview[pos + _HEADER : end], header != n, n

    def next_messages(self, max_items: int) -> list[T]:
        """Decode and return up to ``max_items`` complete messages; an empty list means
        :data:`NEED_DATA`.

        An error met after some messages were decoded is not raised: the call returns
        those, and the next call raises it (so no message is lost or reordered).  A
        call may also stop early at a frame split across fed pieces (the next call
        joins it).

        Besides the error below, it raises those of :meth:`next_message`, for the
        first frame.

        Raises:
            ValueError: ``max_items`` is less than 1.
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        out: list[T] = self._take_batch(max_items) if self._batch else []
        most = self.max_message_size
        unpack = _U32.unpack_from
        decode = self._decoder.decode
        decode_batch = self._batch_decoder.decode
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
                    if n <= most:
                        end = pos + _HEADER + n
                        if end > size:
                            break
                        append(decode(view[pos + _HEADER : end]))
                        pos = end
                    else:
                        n &= _LENGTH_MASK
                        end = pos + _HEADER + n
                        if n > most or end > size:
                            break
                        # A batch frame: one msgspec call for the whole array.
                        self._batch = decode_batch(view[pos + _HEADER : end])
                        self._rpos = pos = end
                        if self._batch:
                            if out:
                                out += self._take_batch(max_items - len(out))
                            else:
                                out = self._take_batch(max_items)
                                append = out.append
            except _DECODE_ERRORS:
                pass  # left to next_message(), which skips the frame and reports it
            self._rpos = pos
            if out:
                # Full, or stopped at a frame split across pieces, a bad frame or the
                # end: what stopped us is left in place for the next call.
                return out
            message = self._next_one()  # joins a split frame, or raises for it
            if message is NEED_DATA:
                return out
            append(message)  # type: ignore[arg-type]
            if self._batch:
                out += self._take_batch(max_items - 1)

    def missing(self) -> int:
        """How many more bytes complete the frame being received, while
        :meth:`next_message` returns :data:`NEED_DATA` (the rest of the header while
        the length is not known yet); at least 1."""
        if self._big is not None:
            return len(self._big) - self._big_fill
        pos = self._rpos
        left = len(self._rbuf) - pos
        have = left + self._parts_len
        if have < _HEADER:
            return _HEADER - have
        n: int = _U32.unpack_from(self._rbuf, pos)[0] if left >= _HEADER else self._split_header()
        return max(1, _HEADER + (n & _LENGTH_MASK) - have)

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet decoded (or skipped); see also :attr:`pending`."""
        return len(self._rbuf) - self._rpos + self._parts_len + self._big_fill

    @property
    def pending(self) -> int:
        """Messages decoded from a batch frame and not returned yet."""
        return len(self._batch) - self._batch_pos

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
        self._batch, self._batch_pos = [], 0
        self._big, self._big_fill = None, 0
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
