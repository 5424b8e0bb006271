"""The session (stream multiplexer) wire format, sans-I/O: frame encoders and
:class:`SessionDecoder`, which turns received bytes into validated events.  No I/O, no
event loop; :class:`gntipc.Session` does the I/O and keeps the per-stream state
(stream ids in use, credit).

Wire format (little-endian).  Each frame is a 12-byte header, then a payload::

    u8 type | u8 flags (0) | u16 reserved (0) | u32 stream id | u32 value

=========  =========  ==================================================================
type       stream id  value / payload
=========  =========  ==================================================================
HELLO 0    0          payload length (16): ``b"GMUX"``, u16 version 1, u16 0,
                      u32 receive window per stream, u32 max streams the sender accepts
OPEN 1     new id     0.  The initiator's ids are odd, the responder's even; each side's
                      ids strictly increase.
DATA 2     open id    payload length, 1 .. 65536, at most the credit the receiver granted
WINDOW 3   open id    credit increment (>= 1); credit never exceeds the window
EOF 4      open id    0: the sender sends no more data on this stream
RESET 5    open id    0: the sender will not read (nor send) any more on this stream; it is
                      the last frame a side sends on a stream id.  An id is freed once
                      each side has sent and received a RESET.
GOAWAY 6   0          0: the sender closes the session (it opens no more streams)
=========  =========  ==================================================================

:class:`SessionDecoder` checks everything that a frame says on its own and in sequence
(known type, zero flags, HELLO first and once, payload sizes, stream id 0 only where
allowed, values, one GOAWAY, no OPEN after it) and raises
:class:`gntipc.RemoteProtocolError` otherwise.  What needs the session's state (is the
stream id open? of the right parity? is the credit respected?) the session checks.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .._exceptions import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_WINDOW",
    "HEADER_SIZE",
    "HELLO_SIZE",
    "MAX_FRAME",
    "MAX_STREAMS_LIMIT",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "MIN_WINDOW",
    "Data",
    "Eof",
    "FrameType",
    "GoAway",
    "Hello",
    "MuxEvent",
    "Open",
    "Reset",
    "SessionDecoder",
    "Window",
    "encode_data",
    "encode_frame",
    "encode_hello",
]

_HEADER = struct.Struct("<BBHII")
_HELLO = struct.Struct("<4sHHII")
_MAGIC = b"GMUX"
_VERSION = 1
#: Bytes of a frame header.
HEADER_SIZE: Final = _HEADER.size
#: Bytes of the HELLO payload.
HELLO_SIZE: Final = _HELLO.size
#: Largest DATA payload (a larger frame from the peer is a protocol error).
MAX_FRAME: Final = 65536
DEFAULT_WINDOW: Final = 256 * 1024
DEFAULT_MAX_STREAMS: Final = 256
MIN_WINDOW: Final = 1024
MAX_WINDOW: Final = 1 << 30
MAX_STREAMS_LIMIT: Final = 1 << 20
MAX_STREAM_ID: Final = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    """The frame types (the first header byte)."""

    HELLO = 0
    OPEN = 1
    DATA = 2
    WINDOW = 3
    EOF = 4
    RESET = 5
    GOAWAY = 6


# -- events (what the decoder returns) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The peer's HELLO: its receive window per stream and how many streams it accepts."""

    window: int
    max_streams: int


@dataclass(frozen=True, slots=True)
class Open:
    """The peer opened stream ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Data:
    """``data`` (1 .. :data:`MAX_FRAME` bytes) on stream ``stream_id``."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Window:
    """The peer granted ``increment`` (>= 1) bytes of credit on stream ``stream_id``."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class Eof:
    """The peer sends no more data on stream ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    """The peer will neither read nor send any more on stream ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer closes the session (it opens no more streams)."""


MuxEvent = Hello | Open | Data | Window | Eof | Reset | GoAway

# -- encoding -------------------------------------------------------------------------


def encode_frame(ftype: FrameType, stream_id: int = 0, value: int = 0) -> bytes:
    """A header-only frame (OPEN, WINDOW, EOF, RESET, GOAWAY)."""
    return _HEADER.pack(ftype, 0, 0, stream_id, value)


def encode_hello(window: int, max_streams: int) -> bytes:
    """The HELLO frame announcing our receive ``window`` and ``max_streams``.

    Raises:
        gntipc.LocalProtocolError: a value out of range.
    """
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise LocalProtocolError(f"window must be from {MIN_WINDOW} to {MAX_WINDOW}")
    if not 1 <= max_streams <= MAX_STREAMS_LIMIT:
        raise LocalProtocolError(f"max_streams must be from 1 to {MAX_STREAMS_LIMIT}")
    payload = _HELLO.pack(_MAGIC, _VERSION, 0, window, max_streams)
    return _HEADER.pack(FrameType.HELLO, 0, 0, 0, len(payload)) + payload


def encode_data(stream_id: int, data: bytes | bytearray | memoryview) -> bytes:
    """DATA frames carrying ``data`` (split every :data:`MAX_FRAME` bytes), joined into
    one buffer (one copy of the data)."""
    view = memoryview(data).cast("B")
    parts: list[bytes | memoryview] = []
    pack = _HEADER.pack
    offset = 0
    total = len(view)
    while offset < total:
        k = min(MAX_FRAME, total - offset)
        parts.append(pack(FrameType.DATA, 0, 0, stream_id, k))
        parts.append(view[offset : offset + k])
        offset += k
    return b"".join(parts)


# -- decoding -------------------------------------------------------------------------


class SessionDecoder:
    """Turns the bytes a session peer sent into :data:`MuxEvent` values.

    ``decoder.feed(chunk)`` takes any split of the byte stream and returns the events of
    the frames it completed, in order.  A frame arriving in pieces is joined once, when
    it is complete (linear in its size); every DATA payload is one slice of the received
    bytes.  Buffered memory is at most one frame (64 KiB of payload plus the header).
    """

    __slots__ = ("_broken", "_goaway", "_have", "_hello", "_need", "_parts")

    def __init__(self) -> None:
        # An incomplete frame, in the pieces received so far.
        self._parts: list[bytes] = []
        self._have = 0  # bytes in _parts
        self._need = HEADER_SIZE  # bytes that complete the frame begun in _parts
        self._hello = False
        self._goaway = False
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held until the rest arrives."""
        return self._have

    @property
    def peer_hello(self) -> bool:
        """True once the peer's HELLO was decoded."""
        return self._hello

    def feed(self, data: bytes) -> Sequence[MuxEvent]:
        """Decode the frames that ``data`` completes (maybe none).

        Raises:
            gntipc.RemoteProtocolError: the bytes break the protocol (the events of the
                same call before the bad frame are dropped); the decoder is then dead
                and every later call raises it again.
        """
        if self._broken is not None:
            raise RemoteProtocolError(self._broken)
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return ()
            data = b"".join(self._parts)
            self._parts.clear()
        events: list[MuxEvent] = []
        pos = 0
        end = len(data)
        need = HEADER_SIZE
        unpack = _HEADER.unpack_from
        try:
            while end - pos >= HEADER_SIZE:
                ftype, flags, reserved, sid, value = unpack(data, pos)
                size = self._check_header(ftype, flags, reserved, sid, value)
                if end - pos < HEADER_SIZE + size:
                    need = HEADER_SIZE + size
                    break
                start = pos + HEADER_SIZE
                pos = start + size
                if ftype == FrameType.DATA:
                    events.append(Data(sid, data[start:pos]))
                else:
                    events.append(self._event(ftype, sid, value, data, start))
        except RemoteProtocolError as exc:
            self._broken = str(exc)
            self._parts.clear()
            self._have = 0
            raise
        self._need = need
        if pos < end:
            self._parts.append(data[pos:])
            self._have = end - pos
        else:
            self._have = 0
        return events

    def end_of_stream(self) -> None:
        """The byte stream ended: check that it ended on a frame boundary.

        Raises:
            gntipc.RemoteProtocolError: it ended inside a frame.
        """
        if self._have:
            raise RemoteProtocolError(
                f"the session's stream ended inside a frame ({self._have} bytes)"
            )

    def _check_header(self, ftype: int, flags: int, reserved: int, sid: int, value: int) -> int:
        """Validate a header before its payload is awaited; return the payload size."""
        if ftype > FrameType.GOAWAY:
            raise RemoteProtocolError(f"unknown frame type {ftype}")
        name = FrameType(ftype).name
        if flags or reserved:
            raise RemoteProtocolError(
                f"{name} frame with nonzero flags/reserved bits ({flags}, {reserved})"
            )
        if ftype == FrameType.DATA:
            if not self._hello:
                raise RemoteProtocolError(f"{name} frame before HELLO (not a session peer?)")
            if sid == 0:
                raise RemoteProtocolError(f"{name} frame on stream id 0")
            if not 1 <= value <= MAX_FRAME:
                raise RemoteProtocolError(
                    f"oversize or empty DATA frame ({value} bytes; limit {MAX_FRAME})"
                )
            return value
        if ftype == FrameType.HELLO:
            if self._hello:
                raise RemoteProtocolError("duplicate HELLO")
            if value != HELLO_SIZE:
                raise RemoteProtocolError(f"HELLO frame of {value} bytes (expected {HELLO_SIZE})")
            return value
        if not self._hello:
            raise RemoteProtocolError(f"{name} frame before HELLO (not a session peer?)")
        return 0

    def _event(self, ftype: int, sid: int, value: int, data: bytes, start: int) -> MuxEvent:
        if ftype == FrameType.HELLO:
            magic, version, reserved, window, max_streams = _HELLO.unpack_from(data, start)
            if sid or magic != _MAGIC:
                raise RemoteProtocolError(f"bad HELLO (magic {magic!r}): the peer is not a session")
            if version != _VERSION or reserved:
                raise RemoteProtocolError(f"unsupported session version {version}")
            if not MIN_WINDOW <= window <= MAX_WINDOW or max_streams < 1:
                raise RemoteProtocolError(f"bad HELLO window {window} / max_streams {max_streams}")
            self._hello = True
            return Hello(window, max_streams)
        name = FrameType(ftype).name
        if ftype == FrameType.GOAWAY:
            if sid or value:
                raise RemoteProtocolError(f"GOAWAY with stream id {sid} and value {value}")
            if self._goaway:
                raise RemoteProtocolError("duplicate GOAWAY")
            self._goaway = True
            return GoAway()
        if sid == 0:
            raise RemoteProtocolError(f"{name} frame on stream id 0")
        if ftype == FrameType.WINDOW:
            if value < 1:
                raise RemoteProtocolError(f"credit overflow on stream {sid}: increment 0")
            return Window(sid, value)
        if value:
            raise RemoteProtocolError(f"{name} frame with value {value}")
        if ftype == FrameType.OPEN:
            if self._goaway:
                raise RemoteProtocolError("OPEN after GOAWAY")
            return Open(sid)
        if ftype == FrameType.EOF:
            return Eof(sid)
        return Reset(sid)

    def __repr__(self) -> str:
        state = "broken" if self._broken is not None else "ok"
        return f"<SessionDecoder buffered={self._have} {state}>"
