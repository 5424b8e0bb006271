"""The session (stream multiplexer) protocol, sans-I/O: frame encoders,
:class:`SessionDecoder`, which turns received bytes into validated events, and
:class:`SessionState`, the session's state (stream ids in use, credit, the peer's HELLO
and GOAWAY), which takes the peer's bytes and the application's requests and returns the
events and the frames to send.  No I/O, no event loop: :class:`gntipc.Session` does the
I/O (tasks, waiting, the byte stream) around one :class:`SessionState`.

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
stream id open? of the right parity? is the credit respected?) :class:`SessionState`
checks, raising the same error.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .._exceptions import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    # For annotations only: the protocol layer imports nothing of the backends at run time.
    from ..backends._abc import Buffer

__all__ = [
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_WINDOW",
    "GRANT_DIVISOR",
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
    "SessionState",
    "StreamState",
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
#: A receiver grants credit back (a WINDOW frame) once the application consumed this
#: fraction of the window (1/4): when the sender runs out of credit, three quarters of a
#: window are still in flight for the receiver to work through while the grant travels
#: and wakes the sender (with half, a sender that sleeps on an event left the receiver
#: idle once per grant on a loaded machine).  Only the receiver decides: no wire change.
GRANT_DIVISOR: Final = 4
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


#: DATA's type as a plain int, for the decoder's per-frame tests.
_DATA: Final = int(FrameType.DATA)


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


def encode_data(stream_id: int, data: Buffer) -> bytes:
    """DATA frames carrying ``data`` (split every :data:`MAX_FRAME` bytes), joined into
    one buffer (one copy of the data)."""
    if type(data) in (bytes, bytearray) and 0 < len(data) <= MAX_FRAME:
        # One frame (a session's gathered small writes): header + payload, one copy.
        return _HEADER.pack(_DATA, 0, 0, stream_id, len(data)) + data
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

    @property
    def peer_goaway(self) -> bool:
        """True once the peer's GOAWAY was decoded."""
        return self._goaway

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
                if ftype == _DATA:
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
        if (
            ftype == _DATA
            and self._hello
            and sid
            and 1 <= value <= MAX_FRAME
            and not flags | reserved
        ):
            return value  # a good DATA header: the common case, in one test
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
        if ftype == FrameType.GOAWAY:
            if sid or value:
                raise RemoteProtocolError(f"GOAWAY with stream id {sid} and value {value}")
            if self._goaway:
                raise RemoteProtocolError("duplicate GOAWAY")
            self._goaway = True
            return GoAway()
        if sid == 0:
            raise RemoteProtocolError(f"{FrameType(ftype).name} frame on stream id 0")
        if ftype == FrameType.WINDOW:
            if value < 1:
                raise RemoteProtocolError(f"credit overflow on stream {sid}: increment 0")
            return Window(sid, value)
        if value:
            raise RemoteProtocolError(f"{FrameType(ftype).name} frame with value {value}")
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


# -- the session's state ----------------------------------------------------------------


class StreamState:
    """The protocol state of one logical stream, kept by :class:`SessionState`: the
    credit each way and which side sent EOF and RESET.  The caller reads the attributes;
    the methods change them and return the frames to send (the caller sends them)."""

    __slots__ = (
        "consumed",
        "eof_sent",
        "freed",
        "recv_credit",
        "remote_eof",
        "remote_reset",
        "reset_sent",
        "send_credit",
        "stream_id",
        "window",
    )

    def __init__(self, stream_id: int, window: int, peer_window: int) -> None:
        self.stream_id = stream_id
        #: Our receive window (the most the peer may have in flight on this stream).
        self.window = window
        #: What the peer may still send us.
        self.recv_credit = window
        #: Received bytes the application consumed, not granted back yet.
        self.consumed = 0
        #: What we may still send (the peer's window at most).
        self.send_credit = peer_window
        self.eof_sent = False
        self.reset_sent = False
        self.remote_eof = False
        self.remote_reset = False
        #: The id is free again (each side sent and received a RESET, or the session
        #: released it): no frame may name it any more.
        self.freed = False

    def send_data(self, data: Buffer) -> bytes:
        """The DATA frames carrying ``data``, whose length is taken from the credit.

        Raises:
            gntipc.LocalProtocolError: more than the credit, or after our EOF or RESET.
        """
        n = len(data)
        if n > self.send_credit:
            raise LocalProtocolError(
                f"{n} bytes of DATA on stream {self.stream_id} with {self.send_credit} of credit"
            )
        if self.eof_sent or self.reset_sent:
            raise LocalProtocolError(f"DATA on stream {self.stream_id} after our EOF or RESET")
        self.send_credit -= n
        return encode_data(self.stream_id, data)

    def refund(self, n: int) -> None:
        """``n`` bytes of DATA returned by :meth:`send_data` were not sent after all
        (nothing of them was written): their credit comes back."""
        self.send_credit += n

    def consume(self, n: int) -> bytes | None:
        """The application consumed ``n`` received bytes; the WINDOW frame that grants
        credit back once a quarter of the window (:data:`GRANT_DIVISOR`) was consumed
        (``None`` until then, or once the peer sent EOF)."""
        self.consumed += n
        if self.consumed >= self.window // GRANT_DIVISOR and not self.remote_eof:
            grant, self.consumed = self.consumed, 0
            self.recv_credit += grant
            return encode_frame(FrameType.WINDOW, self.stream_id, grant)
        return None

    def send_eof(self) -> bytes | None:
        """Half-close: the EOF frame to send, or ``None`` if it was sent already (or the
        peer reset the stream: it reads nothing more)."""
        if self.eof_sent:
            return None
        self.eof_sent = True
        return None if self.remote_reset else encode_frame(FrameType.EOF, self.stream_id)

    def __repr__(self) -> str:
        return (
            f"<StreamState id={self.stream_id} send_credit={self.send_credit}"
            f" recv_credit={self.recv_credit}>"
        )


class SessionState:
    """The state of one side of a session, sans-I/O (as h11's ``Connection``).

    It takes what the peer sent (:meth:`receive_data`) and what the application asks
    (:meth:`open_stream`, :meth:`reset`, and the :class:`StreamState` methods), checks
    them against the state, updates it, and returns the events and the frames to send.
    It does no I/O and never waits: :class:`gntipc.Session` writes the frames, reads the
    bytes and wakes the tasks the events concern.

    Args:
        is_initiator: which side this is (its stream ids are odd; the other side's even).
        window: our receive window per stream (:data:`MIN_WINDOW` .. :data:`MAX_WINDOW`).
        max_streams: how many streams the peer may have open towards us at once.

    Raises:
        gntipc.LocalProtocolError: a value out of range.
    """

    __slots__ = (
        "_broken",
        "_decoder",
        "_goaway_sent",
        "_next_id",
        "_peer_last_id",
        "_streams",
        "is_initiator",
        "max_streams",
        "ours_open",
        "peer_max_streams",
        "peer_window",
        "theirs_open",
        "window",
    )

    def __init__(
        self,
        *,
        is_initiator: bool,
        window: int = DEFAULT_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise LocalProtocolError(f"window must be from {MIN_WINDOW} to {MAX_WINDOW}")
        if not 1 <= max_streams <= MAX_STREAMS_LIMIT:
            raise LocalProtocolError(f"max_streams must be from 1 to {MAX_STREAMS_LIMIT}")
        self.is_initiator = is_initiator
        self.window = window
        self.max_streams = max_streams
        #: The peer's HELLO: its window per stream and how many streams it accepts (0
        #: until it arrived).
        self.peer_window = 0
        self.peer_max_streams = 0
        #: Open streams of our parity (opened by us), and of the peer's.
        self.ours_open = 0
        self.theirs_open = 0
        self._decoder = SessionDecoder()
        self._streams: dict[int, StreamState] = {}
        self._next_id = 1 if is_initiator else 2
        self._peer_last_id = 0
        self._goaway_sent = False
        self._broken: RemoteProtocolError | None = None

    # -- what the caller reads --------------------------------------------------------

    @property
    def peer_hello(self) -> bool:
        """True once the peer's HELLO arrived."""
        return self._decoder.peer_hello

    @property
    def peer_goaway(self) -> bool:
        """True once the peer's GOAWAY arrived (it opens no more streams, nor accepts)."""
        return self._decoder.peer_goaway

    @property
    def can_open(self) -> bool:
        """True if :meth:`open_stream` may be called now: the peer's HELLO arrived, no
        GOAWAY, and the peer accepts another stream."""
        return (
            self._decoder.peer_hello
            and not self._decoder.peer_goaway
            and self.ours_open < self.peer_max_streams
        )

    def get(self, stream_id: int) -> StreamState | None:
        """The state of open stream ``stream_id`` (``None``: not open, or freed)."""
        return self._streams.get(stream_id)

    def __len__(self) -> int:
        """How many stream ids are in use (open, or waiting for the peer's RESET)."""
        return len(self._streams)

    # -- the application's requests ---------------------------------------------------

    def hello(self) -> bytes:
        """Our HELLO frame (the first frame we send)."""
        return encode_hello(self.window, self.max_streams)

    def open_stream(self) -> tuple[StreamState, bytes]:
        """Open a stream: its state and the OPEN frame to send (before any DATA of it).

        Raises:
            gntipc.LocalProtocolError: not :attr:`can_open` (no HELLO from the peer yet,
                its GOAWAY, or its ``max_streams`` reached), we sent GOAWAY, or the
                stream ids are exhausted (2**31 per side).
        """
        if self._goaway_sent:
            raise LocalProtocolError("OPEN after our GOAWAY")
        if not self.can_open:
            raise LocalProtocolError("the peer accepts no stream now (no HELLO, GOAWAY or full)")
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids are exhausted")
        self._next_id += 2
        state = self._streams[sid] = StreamState(sid, self.window, self.peer_window)
        self.ours_open += 1
        return state, encode_frame(FrameType.OPEN, sid)

    def reset(self, stream: StreamState) -> bytes:
        """We will neither read nor send on ``stream`` any more: the RESET frame to send
        (after the EOF of :meth:`StreamState.send_eof`).  The id is freed at once if the
        peer reset it already, else when its RESET arrives."""
        stream.reset_sent = True
        if stream.remote_reset:
            self.release(stream)
        return encode_frame(FrameType.RESET, stream.stream_id)

    def release(self, stream: StreamState) -> None:
        """Free the id of ``stream`` now, whatever its state (idempotent): the session is
        down, no more frame of it will be sent or received."""
        if stream.freed or self._streams.get(stream.stream_id) is not stream:
            return
        del self._streams[stream.stream_id]
        stream.freed = True
        if (stream.stream_id & 1) == (1 if self.is_initiator else 0):
            self.ours_open -= 1
        else:
            self.theirs_open -= 1

    def goaway(self) -> bytes:
        """The GOAWAY frame: we close the session (and open no more streams)."""
        self._goaway_sent = True
        return encode_frame(FrameType.GOAWAY)

    # -- what the peer sent -----------------------------------------------------------

    def receive_data(self, data: bytes) -> Iterator[MuxEvent]:
        """Decode ``data`` (any split of the peer's bytes), check each frame against the
        state, apply it and yield its event: :class:`Hello`, :class:`GoAway`,
        :class:`Open` (a new stream, see :meth:`get`), :class:`Data` (to deliver, unless
        we reset the stream: its ``reset_sent``), :class:`Window`, :class:`Eof`,
        :class:`Reset` (the stream's ``freed`` says whether its id is free now).
        Iterate to the end (or until it raises): each frame is applied when its event is
        yielded, and the bytes are consumed at the first step.

        Raises:
            gntipc.RemoteProtocolError: the peer broke the protocol, at the event of the
                bad frame (the events before it were yielded; those after are dropped);
                every later call raises it again.
        """
        if self._broken is not None:
            raise RemoteProtocolError(str(self._broken))
        try:
            for event in self._decoder.feed(data):
                self._apply(event)
                yield event
        except RemoteProtocolError as exc:
            self._broken = exc
            raise

    def end_of_stream(self) -> None:
        """The peer's byte stream ended (cleanly).

        Raises:
            gntipc.RemoteProtocolError: it ended inside a frame.
        """
        self._decoder.end_of_stream()

    def _apply(self, event: MuxEvent) -> None:
        if type(event) is Data:  # the common case first
            stream = self._open_stream(event)
            sid = event.stream_id
            if stream.remote_eof:
                raise RemoteProtocolError(f"DATA on stream {sid} after its EOF")
            n = len(event.data)
            if n > stream.recv_credit:
                raise RemoteProtocolError(
                    f"flow control violated on stream {sid}: {n} bytes of DATA with"
                    f" {stream.recv_credit} bytes of credit"
                )
            stream.recv_credit -= n
            return
        if isinstance(event, Hello):
            self.peer_window = event.window
            self.peer_max_streams = event.max_streams
            return
        if isinstance(event, GoAway):
            return
        if isinstance(event, Open):
            self._on_open(event.stream_id)
            return
        stream = self._open_stream(event)
        if isinstance(event, Window):
            increment = event.increment
            if increment < 1 or stream.send_credit + increment > self.peer_window:
                raise RemoteProtocolError(
                    f"credit overflow on stream {event.stream_id}: {stream.send_credit} +"
                    f" {increment} exceeds the window of {self.peer_window}"
                )
            stream.send_credit += increment
        elif isinstance(event, Eof):
            if stream.remote_eof:
                raise RemoteProtocolError(f"duplicate EOF on stream {event.stream_id}")
            stream.remote_eof = True
        else:  # Reset
            stream.remote_reset = True
            if stream.reset_sent:
                self.release(stream)

    def _open_stream(self, event: Data | Window | Eof | Reset) -> StreamState:
        """The state of the stream a frame names: open, and not reset by the peer."""
        sid = event.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            name = type(event).__name__.upper()
            raise RemoteProtocolError(f"{name} frame for unknown stream id {sid}")
        if stream.remote_reset:
            name = type(event).__name__.upper()
            raise RemoteProtocolError(f"{name} frame on stream {sid} after its RESET")
        return stream

    def _on_open(self, sid: int) -> None:
        if (sid & 1) == (1 if self.is_initiator else 0):
            raise RemoteProtocolError(
                f"OPEN of stream id {sid} of our parity (are both sides initiators, or both "
                "responders?)"
            )
        if sid <= self._peer_last_id:
            raise RemoteProtocolError(f"OPEN of stream id {sid} not above {self._peer_last_id}")
        if self.theirs_open >= self.max_streams:
            raise RemoteProtocolError(f"the peer opened more than {self.max_streams} streams")
        self._peer_last_id = sid
        self._streams[sid] = StreamState(sid, self.window, self.peer_window)
        self.theirs_open += 1

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return f"<SessionState {role} streams={len(self._streams)}>"
