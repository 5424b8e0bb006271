"""The bulk (zero-copy buffer pool) protocol, sans-I/O: frame encoders and
:class:`BulkProtocol`, which keeps the state of both pools of one channel (ours, which we
lend from, and the peer's, which we receive loans of), validates every frame the peer
sends and returns the frames to send.  No I/O, no event loop: :mod:`gntipc.bulk` does the
granting, mapping, waiting and stream I/O around one :class:`BulkProtocol`.

Each side of a bulk channel may grant a *pool*: ``buffers`` buffers of ``buffer_size``
bytes (a multiple of the page size), ``buffers * buffer_size / 4096`` pages in one run,
buffer ``i`` at byte ``i * buffer_size``.  The other side maps the pool read-only.  A
side lends a buffer by sending a LOAN descriptor (buffer, offset, length); the borrower
reads the bytes in place and sends a RELEASE; the buffer is then free again for its
owner.  A side with no pool (``buffers = 0``) only receives.

Version 2 adds typed messages (:mod:`gntipc.bulk`'s :class:`~gntipc.bulk.BulkQueue`): a
MESSAGE frame carries an encoded message inline, optionally bound to one loan (its
*attachment*, released with an ordinary RELEASE).  A side announces version 2 in its
HELLO only when it opens a message queue (``max_message_size > 0``); a version-1 HELLO
is unchanged, so a version-1 peer of a plain bulk channel keeps working (and refuses a
version-2 HELLO, loudly).  A MESSAGE may be sent only to a peer whose HELLO said version
2, and is accepted only by a side that announced version 2: a version-1 peer never
receives one.

Wire format (little-endian), carried in order over a byte stream (the vchan)::

    u8 type | u8 flags (0) | u16 reserved (0) | body

=========  =====  ====================================================================
type       bytes  body
=========  =====  ====================================================================
HELLO 1    24+4n  ``b"GBLK"``, u16 version (1, or 2: messages), u16 0, u32 buffer_size,
                  u32 buffers, u32 n (pages), then n u32 grant refs.  First frame of
                  each side, once.
LOAN 2     16     u32 buffer, u32 offset, u32 length: bytes ``offset .. offset+length``
                  of the sender's buffer are the receiver's until it releases them
RELEASE 3  8      u32 buffer: the sender is done with its loan of that buffer of the
                  receiver's pool
EOF 4      8      u32 0: the sender lends nothing more (it still sends RELEASEs)
MESSAGE 5  20+m   (version 2) u32 buffer, u32 offset, u32 length, u32 m, then m bytes:
                  a msgspec MessagePack message; flags bit 0 (ATTACHED) set: bytes
                  ``offset .. offset+length`` of the sender's buffer are lent with it
                  (as a LOAN); clear: buffer, offset and length are 0
=========  =====  ====================================================================

Everything the peer sends is checked: known type, zero flags (but ATTACHED on a
MESSAGE) and reserved fields, HELLO
first and once with a consistent geometry (``n == buffers * buffer_size / 4096``, at most
the pages we accept), a LOAN inside a buffer of the peer's pool that we do not hold
already and not after the peer's EOF, a RELEASE of a buffer of ours that is on loan to
the peer, a MESSAGE only if both HELLOs said version 2, not after EOF, of at most
``max_message_size`` bytes (refused as soon as its head arrives), its attachment checked
as a LOAN.  A violation raises :class:`gntipc.RemoteProtocolError`; the protocol is then
dead and raises it again.  Buffered memory is at most one HELLO (``24 + 4 * n`` bytes,
``n`` bounded by ``max_peer_pages``) or one MESSAGE (``20 + max_message_size``) plus the
chunk being fed.  The MESSAGE's bytes are not decoded here: :class:`Message` carries
them as a :class:`~gntipc.protocol.MessageFramer` message frame (its u32 length and
payload), which the typed layer decodes.

Flow: a buffer is re-lent only after its RELEASE arrived, so at most ``buffers`` LOANs
of one side and ``peer buffers`` RELEASEs are ever unread in one direction:
:func:`descriptor_room` bytes.  When the ring of each direction holds that much, a
descriptor never waits for ring space once both HELLOs are read.  MESSAGE frames keep
that true by leaving that room free: a side writes one only when the ring then still
has :func:`descriptor_room` bytes free (:func:`message_room`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .._exceptions import LocalProtocolError, RemoteProtocolError
from .framing import MAX_MESSAGE_SIZE_LIMIT

if TYPE_CHECKING:
    from ..backends._abc import Buffer

__all__ = [
    "ATTACHED",
    "DEFAULT_MAX_PEER_PAGES",
    "DESCRIPTOR_SIZE",
    "HELLO_SIZE",
    "MAGIC",
    "MESSAGE_HEAD_SIZE",
    "MESSAGE_VERSION",
    "MAX_BUFFER_SIZE",
    "MAX_POOL_PAGES",
    "PAGE_SIZE",
    "VERSION",
    "BulkEvent",
    "BulkFrame",
    "BulkProtocol",
    "Eof",
    "Hello",
    "Loan",
    "Message",
    "Release",
    "check_geometry",
    "descriptor_room",
    "encode_eof",
    "encode_hello",
    "encode_loan",
    "encode_message",
    "encode_release",
    "message_room",
]

MAGIC: Final = b"GBLK"
#: The version a plain bulk channel announces (what every peer speaks).
VERSION: Final = 1
#: The version that adds MESSAGE frames, announced by a side that opens a queue.
MESSAGE_VERSION: Final = 2
PAGE_SIZE: Final = 4096
#: Largest buffer (1 GiB): offsets and lengths are u32.
MAX_BUFFER_SIZE: Final = 1 << 30
#: Largest pool anyone may announce or accept (4 GiB of pages).
MAX_POOL_PAGES: Final = 1 << 20
#: The largest peer pool accepted unless asked otherwise (64 MiB): the pages a side maps.
DEFAULT_MAX_PEER_PAGES: Final = 16384

_HELLO = struct.Struct("<BBH4sHHIII")
_LOAN = struct.Struct("<BBHIII")
_SHORT = struct.Struct("<BBHI")  # RELEASE and EOF
_MESSAGE = struct.Struct("<BBHIIII")
#: The MESSAGE flag: its buffer, offset and length are a loan bound to the message.
ATTACHED: Final = 0x01
#: Bytes of a MESSAGE before its payload; its last 4 (the payload length) and the
#: payload form a :class:`~gntipc.protocol.MessageFramer` message frame.
MESSAGE_HEAD_SIZE: Final = _MESSAGE.size
_FRAMER_HEAD = 4
_HEAD = struct.Struct("<BBH")
#: Bytes of a HELLO before its refs.
HELLO_SIZE: Final = _HELLO.size
#: The largest descriptor frame (a LOAN).
DESCRIPTOR_SIZE: Final = _LOAN.size


class BulkFrame(enum.IntEnum):
    """The frame types (the first byte of a frame)."""

    HELLO = 1
    LOAN = 2
    RELEASE = 3
    EOF = 4
    MESSAGE = 5


_HELLO_T: Final = int(BulkFrame.HELLO)
_LOAN_T: Final = int(BulkFrame.LOAN)
_RELEASE_T: Final = int(BulkFrame.RELEASE)
_EOF_T: Final = int(BulkFrame.EOF)
_MESSAGE_T: Final = int(BulkFrame.MESSAGE)
_SIZES: Final = {_LOAN_T: _LOAN.size, _RELEASE_T: _SHORT.size, _EOF_T: _SHORT.size}


# -- events (what the protocol returns) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The peer's pool: ``buffers`` buffers of ``buffer_size`` bytes on the pages
    ``refs`` (none when the peer lends nothing), and the protocol version it speaks."""

    buffer_size: int
    buffers: int
    refs: tuple[int, ...]
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Loan:
    """The peer lends bytes ``offset .. offset + length`` of its buffer ``buffer``."""

    buffer: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Release:
    """The peer is done with our buffer ``buffer`` (it is free again)."""

    buffer: int


@dataclass(frozen=True, slots=True)
class Eof:
    """The peer lends nothing more (nor sends messages)."""


@dataclass(frozen=True, slots=True)
class Message:
    """A message from the peer (version 2): ``frame`` is a
    :class:`~gntipc.protocol.MessageFramer` message frame (a u32 length, then that many
    bytes of MessagePack, not decoded yet: feed it to a framer), ``attachment`` the loan
    bound to it (now held, as a :class:`Loan` is), or None."""

    frame: bytes
    attachment: Loan | None


BulkEvent = Hello | Loan | Release | Eof | Message


# -- encoding ---------------------------------------------------------------------------


def check_geometry(buffers: int, buffer_size: int) -> int:
    """The page count of a pool of ``buffers`` buffers of ``buffer_size`` bytes.

    Raises:
        LocalProtocolError: a negative count, a size that is not a positive multiple of
            the page size (or not 0 with no buffers), or more than
            :data:`MAX_POOL_PAGES` pages.
    """
    for name, value in (("buffers", buffers), ("buffer_size", buffer_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LocalProtocolError(f"{name} must be an int >= 0, not {value!r}")
    if buffers == 0:
        if buffer_size:
            raise LocalProtocolError("a pool of no buffers has buffer_size 0")
        return 0
    if not 0 < buffer_size <= MAX_BUFFER_SIZE or buffer_size % PAGE_SIZE:
        raise LocalProtocolError(
            f"buffer_size must be a multiple of {PAGE_SIZE} from {PAGE_SIZE} to "
            f"{MAX_BUFFER_SIZE}, not {buffer_size}"
        )
    pages = buffers * (buffer_size // PAGE_SIZE)
    if pages > MAX_POOL_PAGES:
        raise LocalProtocolError(f"a pool of {pages} pages: at most {MAX_POOL_PAGES}")
    return pages


def encode_hello(
    buffers: int, buffer_size: int, refs: Sequence[int], *, version: int = VERSION
) -> bytes:
    """The HELLO frame announcing our pool (and ``version``: 2 when we take messages).

    Raises:
        LocalProtocolError: a bad geometry (:func:`check_geometry`), or not one ref per
            page, or a ref that is not a u32, or an unknown version.
    """
    if version not in (VERSION, MESSAGE_VERSION):
        raise LocalProtocolError(f"bulk protocol version {version!r}: 1 or 2")
    pages = check_geometry(buffers, buffer_size)
    if len(refs) != pages:
        raise LocalProtocolError(f"a pool of {pages} pages needs {pages} refs, not {len(refs)}")
    try:
        tail = struct.pack(f"<{pages}I", *refs)
    except struct.error:
        raise LocalProtocolError("a grant ref must be a u32") from None
    return _HELLO.pack(_HELLO_T, 0, 0, MAGIC, version, 0, buffer_size, buffers, pages) + tail


def encode_loan(buffer: int, offset: int, length: int) -> bytes:
    """A LOAN frame (no checks: :meth:`BulkProtocol.loan_frame` makes them)."""
    return _LOAN.pack(_LOAN_T, 0, 0, buffer, offset, length)


def encode_release(buffer: int) -> bytes:
    """A RELEASE frame (no checks: :meth:`BulkProtocol.release_frame` makes them)."""
    return _SHORT.pack(_RELEASE_T, 0, 0, buffer)


def encode_eof() -> bytes:
    """The EOF frame."""
    return _SHORT.pack(_EOF_T, 0, 0, 0)


def encode_message(payload: bytes, attachment: tuple[int, int, int] | None = None) -> bytes:
    """A MESSAGE frame carrying ``payload`` (encoded MessagePack) and, if given, the loan
    ``attachment`` = (buffer, offset, length) (no checks: :meth:`BulkProtocol.message_frame`
    makes them)."""
    flags, (b, off, n) = (0, (0, 0, 0)) if attachment is None else (ATTACHED, attachment)
    return _MESSAGE.pack(_MESSAGE_T, flags, 0, b, off, n, len(payload)) + payload


def message_room(ring: int, buffers: int, peer_buffers: int) -> int:
    """The largest MESSAGE payload a side with ``buffers`` buffers can write into a
    ``ring``-byte ring to a peer with ``peer_buffers``: what leaves the ring room for
    every descriptor that can be in flight (:func:`descriptor_room`) once it is written
    (0 or less: none fits)."""
    return ring - descriptor_room(buffers, peer_buffers) - MESSAGE_HEAD_SIZE


def descriptor_room(buffers: int, peer_buffers: int) -> int:
    """The most descriptor bytes one side can have sent and the other not yet read:
    a LOAN per buffer of its own pool, a RELEASE per buffer of the peer's, and an EOF
    (each counted as a LOAN, the largest)."""
    return (buffers + peer_buffers + 1) * DESCRIPTOR_SIZE


# -- the state --------------------------------------------------------------------------

# Our buffers' states.
_FREE, _LENT, _SENT = 0, 1, 2


class BulkProtocol:
    """Both pools of one side of a bulk channel, and the decoder of the peer's frames.

    Our pool: :meth:`take` a free buffer (it is then *lent* to the application),
    :meth:`loan_frame` to send (part of) it (*sent*: the peer holds it), or
    :meth:`give_back` an unsent one; the peer's RELEASE makes it free again.  The peer's
    pool: a LOAN from the peer is returned by :meth:`receive_data` (we *hold* it until
    :meth:`release_frame`).

    Thread safety: none; one owner calls it (under its own lock if needed).
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_eof_sent",
        "_free",
        "_held",
        "_max_peer_pages",
        "_states",
        "buffer_size",
        "buffers",
        "held_count",
        "max_message_size",
        "peer",
        "peer_eof",
        "sent_count",
        "version",
    )

    def __init__(
        self,
        buffers: int,
        buffer_size: int,
        *,
        max_peer_pages: int = DEFAULT_MAX_PEER_PAGES,
        max_message_size: int = 0,
    ) -> None:
        """Our pool's geometry, the largest peer pool we accept (in pages), and the
        largest MESSAGE payload we accept (0: none; more: we speak version 2, which
        :attr:`version` tells for our HELLO).

        Raises:
            LocalProtocolError: a bad geometry (:func:`check_geometry`),
                ``max_peer_pages`` outside 0 .. :data:`MAX_POOL_PAGES`, or
                ``max_message_size`` outside 0 .. 2**31 - 1.
        """
        check_geometry(buffers, buffer_size)
        if isinstance(max_peer_pages, bool) or not 0 <= max_peer_pages <= MAX_POOL_PAGES:
            raise LocalProtocolError(f"max_peer_pages must be from 0 to {MAX_POOL_PAGES}")
        if (
            isinstance(max_message_size, bool)
            or not isinstance(max_message_size, int)
            or not 0 <= max_message_size <= MAX_MESSAGE_SIZE_LIMIT
        ):
            raise LocalProtocolError(
                f"max_message_size must be from 0 to {MAX_MESSAGE_SIZE_LIMIT},"
                f" not {max_message_size!r}"
            )
        #: The largest MESSAGE payload accepted (0: this side takes no messages).
        self.max_message_size = max_message_size
        #: The version our HELLO announces.
        self.version = MESSAGE_VERSION if max_message_size else VERSION
        self.buffers = buffers
        self.buffer_size = buffer_size
        self._max_peer_pages = max_peer_pages
        self._states = bytearray(buffers)
        # A stack: the buffer released last is lent first (still warm in the caches).
        self._free = list(range(buffers - 1, -1, -1))
        self.sent_count = 0
        #: The peer's HELLO, once received.
        self.peer: Hello | None = None
        #: True once the peer's EOF arrived.
        self.peer_eof = False
        self._held = bytearray()
        self.held_count = 0
        self._eof_sent = False
        self._buf = bytearray()
        self._broken: str | None = None

    # -- our pool -----------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        """Buffers of our pool that :meth:`take` can hand out now."""
        return len(self._free)

    @property
    def eof_sent(self) -> bool:
        """True once :meth:`eof_frame` was called."""
        return self._eof_sent

    def take(self) -> int | None:
        """A free buffer of our pool, now lent to the application; None if none is free.

        Raises:
            LocalProtocolError: we have no pool, or sent EOF.
        """
        if not self.buffers:
            raise LocalProtocolError("this side has no pool to lend from (buffers=0)")
        if self._eof_sent:
            raise LocalProtocolError("no loans after EOF")
        if not self._free:
            return None
        i = self._free.pop()
        self._states[i] = _LENT
        return i

    def give_back(self, buffer: int) -> None:
        """Return a lent buffer that was not sent to the free list.

        Raises:
            LocalProtocolError: ``buffer`` is not lent to the application.
        """
        if not 0 <= buffer < self.buffers or self._states[buffer] != _LENT:
            raise LocalProtocolError(f"buffer {buffer} is not lent to the application")
        self._states[buffer] = _FREE
        self._free.append(buffer)

    def loan_frame(self, buffer: int, offset: int, length: int) -> bytes:
        """Send bytes ``offset .. offset + length`` of lent ``buffer`` to the peer: the
        LOAN frame to write (the buffer counts as the peer's from now on).

        Raises:
            LocalProtocolError: ``buffer`` is not lent to the application, the range is
                outside it, or EOF was sent.
        """
        self._send_lent(buffer, offset, length)
        return _LOAN.pack(_LOAN_T, 0, 0, buffer, offset, length)

    def _send_lent(self, buffer: int, offset: int, length: int) -> None:
        """Check that bytes ``offset .. offset + length`` of ``buffer`` can be lent to the
        peer now, and mark the buffer sent.

        Raises:
            LocalProtocolError: as :meth:`loan_frame`.
        """
        if self._eof_sent:
            raise LocalProtocolError("no loans after EOF")
        if not 0 <= buffer < self.buffers or self._states[buffer] != _LENT:
            raise LocalProtocolError(f"buffer {buffer} is not lent to the application")
        if offset < 0 or length < 0 or offset + length > self.buffer_size:
            raise LocalProtocolError(
                f"bytes {offset}..{offset + length} are outside a {self.buffer_size}-byte buffer"
            )
        self._states[buffer] = _SENT
        self.sent_count += 1

    @property
    def messages(self) -> bool:
        """True once both HELLOs said version 2: MESSAGE frames may flow both ways."""
        peer = self.peer
        return self.version >= MESSAGE_VERSION and peer is not None and peer.version >= 2

    def message_frame(
        self, frame: bytearray, attachment: tuple[int, int, int] | None = None
    ) -> bytearray:
        """Complete the MESSAGE frame ``frame``, whose bytes from
        :data:`MESSAGE_HEAD_SIZE` - 4 on are a :class:`~gntipc.protocol.MessageFramer`
        message frame (what ``framer.encode_into(message, frame, 16)`` writes): its head
        is written in place, and returned.  ``attachment`` = (buffer, offset, length) of a
        lent buffer of ours goes with it, as :meth:`loan_frame` (undo with
        :meth:`unsend` if the frame cannot be written).

        Raises:
            LocalProtocolError: the peer does not take messages (its HELLO said version
                1, or has not arrived), EOF was sent, ``frame`` is not a message frame
                (its length field disagrees with its size), or the attachment is not
                lendable (as :meth:`loan_frame`).
        """
        if not self.messages:
            raise LocalProtocolError(
                "the bulk peer takes no messages (both sides must open a message queue)"
            )
        if self._eof_sent:
            raise LocalProtocolError("no messages after EOF")
        start = MESSAGE_HEAD_SIZE - _FRAMER_HEAD
        size = len(frame) - MESSAGE_HEAD_SIZE
        if size < 0 or struct.unpack_from("<I", frame, start)[0] != size:
            raise LocalProtocolError("not a message frame after the MESSAGE head")
        if attachment is None:
            _MESSAGE.pack_into(frame, 0, _MESSAGE_T, 0, 0, 0, 0, 0, size)
            return frame
        buffer, offset, length = attachment
        self._send_lent(buffer, offset, length)
        _MESSAGE.pack_into(frame, 0, _MESSAGE_T, ATTACHED, 0, buffer, offset, length, size)
        return frame

    def unsend(self, buffer: int) -> None:
        """Undo :meth:`loan_frame` of ``buffer`` (its frame could not be written): it is
        lent to the application again.

        Raises:
            LocalProtocolError: ``buffer`` is not sent.
        """
        if not 0 <= buffer < self.buffers or self._states[buffer] != _SENT:
            raise LocalProtocolError(f"buffer {buffer} is not sent")
        self._states[buffer] = _LENT
        self.sent_count -= 1

    def eof_frame(self) -> bytes:
        """We lend nothing more: the EOF frame to write (idempotent: b"" the second time)."""
        if self._eof_sent:
            return b""
        self._eof_sent = True
        return encode_eof()

    # -- the peer's pool ----------------------------------------------------------------

    def holds(self, buffer: int) -> bool:
        """True if we hold a loan of the peer's ``buffer``."""
        return 0 <= buffer < len(self._held) and bool(self._held[buffer])

    def release_frame(self, buffer: int) -> bytes:
        """Give the peer's ``buffer`` back: the RELEASE frame to write.

        Raises:
            LocalProtocolError: we do not hold ``buffer``.
        """
        if not self.holds(buffer):
            raise LocalProtocolError(f"buffer {buffer} of the peer is not held here")
        self._held[buffer] = 0
        self.held_count -= 1
        return _SHORT.pack(_RELEASE_T, 0, 0, buffer)

    def check_ring(self, to_peer: int, from_peer: int) -> None:
        """Check (after the peer's HELLO) that each ring holds every descriptor that can
        be in flight, so that descriptors never wait for each other.

        Raises:
            LocalProtocolError: a ring is too small for the two pools' buffers.
        """
        assert self.peer is not None
        need_out = descriptor_room(self.buffers, self.peer.buffers)
        need_in = descriptor_room(self.peer.buffers, self.buffers)
        if to_peer < need_out or from_peer < need_in:
            raise LocalProtocolError(
                f"the rings ({to_peer} bytes out, {from_peer} in) are too small for "
                f"{self.buffers} + {self.peer.buffers} buffers (need {need_out} out, "
                f"{need_in} in): use fewer, larger buffers or larger rings"
            )

    # -- decoding -----------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held until the rest arrives."""
        return len(self._buf)

    def _fail(self, why: str) -> RemoteProtocolError:
        self._broken = why
        self._buf = bytearray()
        return RemoteProtocolError(f"bulk peer: {why}")

    def receive_data(self, data: Buffer) -> list[BulkEvent]:
        """Apply the frames ``data`` completes (any split of the byte stream) and return
        their events in order: the peer's :class:`Hello` (also kept as :attr:`peer`),
        :class:`Loan` (now held), :class:`Release` (that buffer of ours is free again),
        :class:`Eof`.

        Raises:
            gntipc.RemoteProtocolError: the bytes break the protocol (events of the same
                call before the bad frame are applied but dropped); the protocol is then
                dead and every later call raises it again.
        """
        if self._broken is not None:
            raise RemoteProtocolError(f"bulk peer: {self._broken}")
        buf = self._buf
        buf += data
        events: list[BulkEvent] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 4:
                ftype, flags, reserved = _HEAD.unpack_from(buf, pos)
                if reserved or (flags and not (ftype == _MESSAGE_T and flags == ATTACHED)):
                    raise self._fail(f"frame type {ftype} with flags {flags}, reserved {reserved}")
                if self.peer is None:
                    if ftype != _HELLO_T:
                        raise self._fail(f"frame type {ftype} before HELLO")
                    if end - pos < HELLO_SIZE:
                        break
                    hello, hsize = self._hello(buf, pos, end)
                    if hello is None:
                        break
                    events.append(hello)
                    pos += hsize
                    continue
                if ftype == _MESSAGE_T:
                    if end - pos < MESSAGE_HEAD_SIZE:
                        break
                    size = self._message(buf, pos, end)
                    if not size:
                        break
                    message = Message(
                        bytes(buf[pos + MESSAGE_HEAD_SIZE - _FRAMER_HEAD : pos + size]), None
                    )
                    if flags:
                        _, _, _, b, off, n, _ = _MESSAGE.unpack_from(buf, pos)
                        message = Message(message.frame, self._loan(b, off, n, "MESSAGE"))
                    events.append(message)
                    pos += size
                    continue
                fsize = _SIZES.get(ftype)
                if fsize is None:
                    raise self._fail(
                        "a second HELLO" if ftype == _HELLO_T else f"unknown frame type {ftype}"
                    )
                size = fsize
                if end - pos < size:
                    break
                if ftype == _LOAN_T:
                    _, _, _, b, off, n = _LOAN.unpack_from(buf, pos)
                    events.append(self._loan(b, off, n))
                else:
                    _, _, _, value = _SHORT.unpack_from(buf, pos)
                    if ftype == _RELEASE_T:
                        events.append(self._release(value))
                    else:
                        if value:
                            raise self._fail(f"EOF with value {value}")
                        if self.peer_eof:
                            raise self._fail("a second EOF")
                        self.peer_eof = True
                        events.append(Eof())
                pos += size
        finally:
            if self._broken is None:
                del buf[:pos]
        return events

    def _hello(self, buf: bytearray, pos: int, end: int) -> tuple[Hello | None, int]:
        _, _, _, magic, version, zero, size, buffers, pages = _HELLO.unpack_from(buf, pos)
        if magic != MAGIC:
            raise self._fail(f"HELLO magic {bytes(magic)!r}, not {MAGIC!r}")
        if version not in (VERSION, MESSAGE_VERSION):
            raise self._fail(f"protocol version {version} (this side speaks 1 and 2)")
        if zero:
            raise self._fail(f"HELLO reserved field {zero}")
        try:
            expected = check_geometry(buffers, size)
        except LocalProtocolError as exc:
            raise self._fail(f"HELLO geometry: {exc}") from None
        if pages != expected:
            raise self._fail(f"HELLO says {pages} pages for {buffers} buffers of {size} bytes")
        if pages > self._max_peer_pages:
            raise self._fail(
                f"a pool of {pages} pages (this side maps at most {self._max_peer_pages})"
            )
        total = HELLO_SIZE + 4 * pages
        if end - pos < total:
            return None, 0
        refs = struct.unpack_from(f"<{pages}I", buf, pos + HELLO_SIZE)
        hello = Hello(size, buffers, refs, version)
        self.peer = hello
        self._held = bytearray(buffers)
        return hello, total

    def _message(self, buf: bytearray, pos: int, end: int) -> int:
        """The size of the MESSAGE frame at ``pos`` once all of it is buffered (0: not
        yet); its head is checked as soon as it arrives."""
        _, flags, _, b, off, n, size = _MESSAGE.unpack_from(buf, pos)
        if self.version < MESSAGE_VERSION:
            raise self._fail("a MESSAGE frame, but this side announced version 1 (no messages)")
        peer = self.peer
        assert peer is not None
        if peer.version < MESSAGE_VERSION:
            raise self._fail("a MESSAGE frame from a peer whose HELLO said version 1")
        if self.peer_eof:
            raise self._fail("a MESSAGE after EOF")
        if size > self.max_message_size:
            raise self._fail(
                f"a MESSAGE of {size} bytes, more than max_message_size ({self.max_message_size})"
            )
        if not flags and (b or off or n):
            raise self._fail(f"a MESSAGE without attachment names bytes {off}+{n} of buffer {b}")
        total = MESSAGE_HEAD_SIZE + size
        return total if end - pos >= total else 0

    def _loan(self, buffer: int, offset: int, length: int, what: str = "LOAN") -> Loan:
        peer = self.peer
        assert peer is not None
        if self.peer_eof:
            raise self._fail(f"{what} of buffer {buffer} after EOF")
        if buffer >= peer.buffers:
            raise self._fail(f"{what} of buffer {buffer} of a pool of {peer.buffers}")
        if offset + length > peer.buffer_size:
            raise self._fail(
                f"{what} of bytes {offset}..{offset + length} of a {peer.buffer_size}-byte buffer"
            )
        held = self._held
        if held[buffer]:
            raise self._fail(f"{what} of buffer {buffer}, which this side holds already")
        held[buffer] = 1
        self.held_count += 1
        return Loan(buffer, offset, length)

    def _release(self, buffer: int) -> Release:
        if buffer >= self.buffers or self._states[buffer] != _SENT:
            what = "not on loan to the peer" if buffer < self.buffers else "not in the pool"
            raise self._fail(f"RELEASE of buffer {buffer}, which is {what}")
        self._states[buffer] = _FREE
        self.sent_count -= 1
        self._free.append(buffer)
        return Release(buffer)
