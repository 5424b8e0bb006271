"""Resumable sessions, sans-I/O: :class:`ResumeState` numbers the records one side sends,
keeps those the peer has not acknowledged in a bounded replay window, acknowledges what it
received, and runs the resume handshake on each new connection, so that a session
survives its transport breaking: no record lost, duplicated or reordered.  No I/O, no
event loop: :mod:`gntipc.resume` moves the bytes over any reconnectable byte stream.

A session runs over a sequence of *connections* (transports); the client opens each one
(the first starts the session, the next ones resume it), the server assigns each an
*epoch* (0, 1, 2...).  Each side numbers the *records* it sends 1, 2, 3... (a record is a
message, or a piece of a byte stream) and retains each until the peer acknowledges it.

Wire format, version 1 (little-endian).  Each frame is a 16-byte header, then a payload::

    u8 type | u8 flags | u16 reserved (0) | u32 payload length | u64 seq

=========  ======================================================================
type       flags / seq / payload
=========  ======================================================================
HELLO 0    the client's first frame on each connection.  flags: NEW (0x1) starts a
           session, FROM_OLDEST (0x2: seq is 0) asks for every record the server
           still retains (a restarted receiver that kept no position).  seq: the
           last record the client committed (the resume point).  Payload
           (:data:`HANDSHAKE_SIZE` bytes): ``b"GRSM"``, u16 version 1, u16 0,
           u32 0, u32 window records, u32 window bytes, 16-byte session id,
           32-byte secret.
WELCOME 1  the server's answer.  flags 0.  seq: the last record the server
           committed.  Payload: ``b"GRSM"``, u16 version, u16 0, u32 epoch,
           u32 window records, u32 window bytes, 16-byte session id, 32 zero bytes.
DATA 2     a record.  flags: EOF (0x4: the sender's last record; empty payload).
           seq: its number.  Payload: 0 .. :data:`MAX_RECORD` bytes.
ACK 3      flags 0.  seq: every record up to it was received (cumulative).
           Payload: u32 epoch (the connection's: an ack from another epoch is
           ambiguous and refused).
REFUSE 4   the server refuses a HELLO.  flags 0, seq 0.  Payload: the reason
           (UTF-8, at most :data:`MAX_REASON` bytes); the connection then closes.
=========  ======================================================================

The handshake: the client sends HELLO (with the secret chosen when the session started,
and its resume point); the server checks the session id and secret, bumps the epoch, and
answers WELCOME (with its resume point).  A side's resume point is the last record it
*committed* (:meth:`ResumeState.commit`: delivered, or persisted, by the application),
which may be below the last it received.  Each side then sends the records after the
point the other named (a replay), then the new ones.  The resume points are also
cumulative acks.  A receiver drops a record numbered at or below the last it received (a
duplicate: the replay after a resume point below it) and refuses a gap.

The window: a side retains at most ``window_records`` records and ``window_bytes`` bytes
of them unacknowledged (:meth:`ResumeState.can_send` says when a record fits: the
sender's backpressure), and announces that window in its HELLO / WELCOME; a peer that has
more unacknowledged records in flight than it announced is refused.  A receiver
acknowledges once a quarter of the peer's window is committed (:meth:`ResumeState.ack_due`)
or when the caller flushes; records are at most a quarter of the window's bytes, so a
blocked sender always has an acknowledgement coming.

Hostile input raises :class:`gntipc.RemoteProtocolError` (and the state is dead: every
later call raises it again): a resume point or ack beyond what was sent, a resume point
before what the peer already acknowledged (records it needs are gone), an ack from
another epoch, a wrong session id or secret, a gap in the records, oversized or
malformed frames, unknown types or flags, a handshake out of place.

The session's secret travels in every HELLO: the transport must be private (a vchan is;
over a network use TLS).  Binding a session to the VM's identity in XenStore is the
caller's business (not in this module).
"""

from __future__ import annotations

import collections
import enum
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .._exceptions import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_WINDOW_BYTES",
    "DEFAULT_WINDOW_RECORDS",
    "FLAG_EOF",
    "FLAG_FROM_OLDEST",
    "FLAG_NEW",
    "HANDSHAKE_SIZE",
    "HEADER_SIZE",
    "MAX_REASON",
    "MAX_RECORD",
    "MAX_WINDOW_BYTES",
    "MAX_WINDOW_RECORDS",
    "MIN_WINDOW_BYTES",
    "SECRET_SIZE",
    "SESSION_ID_SIZE",
    "VERSION",
    "Acked",
    "FrameType",
    "Hello",
    "Record",
    "Refused",
    "ResumeEvent",
    "ResumeState",
    "Welcome",
    "decode_hello",
    "encode_refuse",
]

_HEADER = struct.Struct("<BBHIQ")
_HANDSHAKE = struct.Struct("<4sHHIII16s32s")
_EPOCH = struct.Struct("<I")
_MAGIC = b"GRSM"
#: The format version in HELLO and WELCOME.
VERSION: Final = 1
#: Bytes of a frame header.
HEADER_SIZE: Final = _HEADER.size
#: Bytes of the HELLO and WELCOME payloads.
HANDSHAKE_SIZE: Final = _HANDSHAKE.size
#: Largest record payload (a DATA frame): a larger one from the peer is refused.
MAX_RECORD: Final = 65536
#: Largest REFUSE reason.
MAX_REASON: Final = 256
SESSION_ID_SIZE: Final = 16
SECRET_SIZE: Final = 32
DEFAULT_WINDOW_RECORDS: Final = 1024
DEFAULT_WINDOW_BYTES: Final = 1 << 20
MAX_WINDOW_RECORDS: Final = 1 << 20
MIN_WINDOW_BYTES: Final = 4096
MAX_WINDOW_BYTES: Final = 1 << 30
_MAX_SEQ: Final = (1 << 63) - 1

FLAG_NEW: Final = 0x1
FLAG_FROM_OLDEST: Final = 0x2
FLAG_EOF: Final = 0x4
_HELLO_FLAGS = FLAG_NEW | FLAG_FROM_OLDEST
_ZEROS = bytes(SECRET_SIZE)


class FrameType(enum.IntEnum):
    """The frame types (the first header byte)."""

    HELLO = 0
    WELCOME = 1
    DATA = 2
    ACK = 3
    REFUSE = 4


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """A client's HELLO, decoded by :func:`decode_hello` (not yet checked against a
    session: :meth:`ResumeState.accept` and :meth:`ResumeState.server` do that)."""

    session_id: bytes
    secret: bytes
    #: The last record the client received (its resume point; 0 with ``from_oldest``).
    received: int
    new: bool
    from_oldest: bool
    window_records: int
    window_bytes: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server accepted our HELLO: the connection's ``epoch`` and the last record the
    server had received (we replay after it)."""

    epoch: int
    received: int


@dataclass(frozen=True, slots=True)
class Record:
    """A new record from the peer, numbered ``seq`` (never a duplicate; in order).
    ``eof``: the peer's last record (``data`` is empty)."""

    seq: int
    data: bytes
    eof: bool


@dataclass(frozen=True, slots=True)
class Acked:
    """The peer acknowledged every record up to ``seq``: the window has room again."""

    seq: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The server refused our HELLO (wrong secret, unknown session...): ``reason``."""

    reason: str


ResumeEvent = Welcome | Record | Acked | Refused


# -- encoding --------------------------------------------------------------------------


def _frame(ftype: int, flags: int, seq: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(ftype, flags, 0, len(payload), seq) + payload


def encode_refuse(reason: str) -> bytes:
    """The REFUSE frame for ``reason`` (cut to :data:`MAX_REASON` bytes)."""
    data = reason.encode("utf-8", "replace")[:MAX_REASON]
    return _frame(FrameType.REFUSE, 0, 0, data)


def _check_window(records: int, nbytes: int, who: str, error: type[Exception]) -> None:
    if not 1 <= records <= MAX_WINDOW_RECORDS:
        raise error(f"{who} window of {records} records (1 .. {MAX_WINDOW_RECORDS})")
    if not MIN_WINDOW_BYTES <= nbytes <= MAX_WINDOW_BYTES:
        raise error(f"{who} window of {nbytes} bytes ({MIN_WINDOW_BYTES} .. {MAX_WINDOW_BYTES})")


# -- decoding --------------------------------------------------------------------------


class _Decoder:
    """Splits one connection's bytes into frames (type, flags, seq, payload), checking
    what a header says on its own.  Buffers at most one frame."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        buf = self._buf
        buf += data
        frames = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            ftype, flags, reserved, length, seq = _HEADER.unpack_from(buf, pos)
            _check_header(ftype, flags, reserved, length, seq)
            if end - pos < HEADER_SIZE + length:
                break
            start = pos + HEADER_SIZE
            pos = start + length
            frames.append((ftype, flags, seq, bytes(buf[start:pos])))
        del buf[:pos]
        return frames


def _check_header(ftype: int, flags: int, reserved: int, length: int, seq: int) -> None:
    if ftype > FrameType.REFUSE:
        raise RemoteProtocolError(f"unknown resume frame type {ftype}")
    name = FrameType(ftype).name
    if reserved:
        raise RemoteProtocolError(f"{name} frame with nonzero reserved bits ({reserved})")
    if seq > _MAX_SEQ:
        raise RemoteProtocolError(f"{name} frame with sequence number {seq} (above 2**63 - 1)")
    allowed = {FrameType.HELLO: _HELLO_FLAGS, FrameType.DATA: FLAG_EOF}.get(FrameType(ftype), 0)
    if flags & ~allowed:
        raise RemoteProtocolError(f"{name} frame with unknown flags {flags:#x}")
    limit = {
        FrameType.HELLO: HANDSHAKE_SIZE,
        FrameType.WELCOME: HANDSHAKE_SIZE,
        FrameType.DATA: 0 if flags & FLAG_EOF else MAX_RECORD,
        FrameType.ACK: _EPOCH.size,
        FrameType.REFUSE: MAX_REASON,
    }[FrameType(ftype)]
    exact = ftype in (FrameType.HELLO, FrameType.WELCOME, FrameType.ACK)
    if length > limit or (exact and length != limit):
        raise RemoteProtocolError(
            f"{name} frame of {length} bytes ({'expected' if exact else 'at most'} {limit})"
        )


def _unpack_handshake(payload: bytes, name: str) -> tuple[int, int, int, bytes, bytes]:
    magic, version, reserved, epoch, records, nbytes, sid, secret = _HANDSHAKE.unpack(payload)
    if magic != _MAGIC:
        raise RemoteProtocolError(f"bad {name} (magic {magic!r}): the peer is not resumable")
    if version != VERSION or reserved:
        raise RemoteProtocolError(f"unsupported resume format version {version}")
    _check_window(records, nbytes, f"{name} announces a", RemoteProtocolError)
    return epoch, records, nbytes, sid, secret


def decode_hello(data: bytes) -> tuple[Hello, bytes] | None:
    """The HELLO at the start of a new connection's bytes ``data``, and the bytes after
    it; None if ``data`` does not hold all of it yet (feed more: at most
    :data:`HEADER_SIZE` + :data:`HANDSHAKE_SIZE` bytes are ever needed).

    Raises:
        gntipc.RemoteProtocolError: not a valid HELLO (another frame, bad magic,
            version, flags, window or resume point).
    """
    if len(data) < HEADER_SIZE:
        return None
    ftype, flags, reserved, length, seq = _HEADER.unpack_from(data)
    _check_header(ftype, flags, reserved, length, seq)
    if ftype != FrameType.HELLO:
        raise RemoteProtocolError(f"{FrameType(ftype).name} frame before HELLO")
    end = HEADER_SIZE + length
    if len(data) < end:
        return None
    epoch, records, nbytes, sid, secret = _unpack_handshake(data[HEADER_SIZE:end], "HELLO")
    new = bool(flags & FLAG_NEW)
    oldest = bool(flags & FLAG_FROM_OLDEST)
    if epoch:
        raise RemoteProtocolError(f"HELLO with epoch field {epoch} (must be 0)")
    if (new or oldest) and seq:
        raise RemoteProtocolError(
            f"HELLO starting a session or FROM_OLDEST with resume point {seq}"
        )
    if new and oldest:
        raise RemoteProtocolError("HELLO with both NEW and FROM_OLDEST")
    hello = Hello(sid, secret, seq, new, oldest, records, nbytes)
    return hello, data[end:]


# -- the state -------------------------------------------------------------------------


class ResumeState:
    """One side of a resumable session, sans-I/O (as h11's ``Connection``).

    The caller does the I/O: it writes what :meth:`data_to_send` returns, feeds what it
    reads to :meth:`receive_data` and acts on the events, tells :meth:`connection_lost`
    when a transport breaks, and opens the next one (client: :meth:`connect`; server:
    :func:`decode_hello`, then :meth:`accept`).  Records are queued with
    :meth:`send_record` whether or not a connection is up: they are written (or
    replayed) when one is.

    Make one with :meth:`client` (a new session: random id and secret), :meth:`restarted`
    (a client process that lost its memory, resuming a session whose id and secret it
    persisted) or :meth:`server` (from a NEW HELLO).

    Args:
        is_client: which side this is.
        session_id: :data:`SESSION_ID_SIZE` bytes.
        secret: :data:`SECRET_SIZE` bytes.
        window_records: the most records retained unacknowledged.
        window_bytes: the most record bytes retained unacknowledged (records are at most
            a quarter of it, and :data:`MAX_RECORD`).
        received: the last record received (a restarted receiver's persisted position),
            or None: unknown (a restarted receiver that asks for every record retained).

    Raises:
        gntipc.LocalProtocolError: a value out of range.
    """

    def __init__(
        self,
        *,
        is_client: bool,
        session_id: bytes,
        secret: bytes,
        window_records: int = DEFAULT_WINDOW_RECORDS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        received: int | None = 0,
    ) -> None:
        if len(session_id) != SESSION_ID_SIZE or len(secret) != SECRET_SIZE:
            raise LocalProtocolError(
                f"session id and secret must be {SESSION_ID_SIZE} and {SECRET_SIZE} bytes"
            )
        _check_window(window_records, window_bytes, "a", LocalProtocolError)
        if received is not None and not 0 <= received <= _MAX_SEQ:
            raise LocalProtocolError(f"received must be in 0 .. 2**63 - 1, not {received}")
        self.is_client = is_client
        self.session_id = bytes(session_id)
        self.secret = bytes(secret)
        self.window_records = window_records
        self.window_bytes = window_bytes
        #: The largest record :meth:`send_record` takes.
        self.max_record = min(MAX_RECORD, window_bytes // 4)
        #: The current connection's epoch (-1 before the first).
        self.epoch = -1
        #: Whether a connection is up (handshake done) / being set up.
        self.connected = False
        self._handshaking = False
        self._started = False  # a connection was ever up (a client sends NEW before)
        # Sending: the records not acknowledged, numbered acked+1, acked+2...
        self._retained: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._retained_bytes = 0
        #: Every record up to this one was acknowledged by the peer.
        self.acked = 0
        # A restarted client numbers its records after what the server received (the
        # WELCOME says): until then its numbering is unknown.
        self._renumber = False
        self._eof_queued = False
        # The next record to write on this connection (None: not connected).
        self._cursor: int | None = None
        self._control: list[bytes] = []
        # Receiving.
        #: The last record received (None: unknown until the first arrives).
        self.received = received
        #: Every record up to this one may be acknowledged (see :meth:`commit`).
        self.committed = received or 0
        self._ack_sent = self.committed
        # Sizes of records received and not acknowledged: (seq, size).
        self._unacked: collections.deque[tuple[int, int]] = collections.deque()
        self._unacked_bytes = 0
        self._committed_bytes = 0  # of the records in _unacked up to committed
        self.peer_eof = False
        self.peer_window_records = 0
        self.peer_window_bytes = 0
        self._decoder = _Decoder()
        self._broken: str | None = None

    @classmethod
    def client(
        cls,
        *,
        window_records: int = DEFAULT_WINDOW_RECORDS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        session_id: bytes | None = None,
        secret: bytes | None = None,
    ) -> ResumeState:
        """A client starting a new session (a random id and secret unless given)."""
        return cls(
            is_client=True,
            session_id=os.urandom(SESSION_ID_SIZE) if session_id is None else session_id,
            secret=os.urandom(SECRET_SIZE) if secret is None else secret,
            window_records=window_records,
            window_bytes=window_bytes,
        )

    @classmethod
    def restarted(
        cls,
        session_id: bytes,
        secret: bytes,
        received: int | None,
        *,
        window_records: int = DEFAULT_WINDOW_RECORDS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> ResumeState:
        """A client process that restarted, resuming session ``session_id``.

        ``received``: the last record it had processed and persisted (the server replays
        after it: exactly-once), or None (the server replays every record it retains:
        at-least-once).  The records the dead process had queued and the server had not
        received are gone; the new records are numbered after what the server received.
        """
        state = cls(
            is_client=True,
            session_id=session_id,
            secret=secret,
            window_records=window_records,
            window_bytes=window_bytes,
            received=received,
        )
        state._started = True
        state._renumber = True
        return state

    @classmethod
    def server(
        cls,
        hello: Hello,
        *,
        window_records: int = DEFAULT_WINDOW_RECORDS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> ResumeState:
        """The server's side of the new session ``hello`` starts; it is accepted at once
        (call :meth:`data_to_send` for the WELCOME).

        Raises:
            gntipc.RemoteProtocolError: ``hello`` does not start a session.
        """
        if not hello.new:
            raise RemoteProtocolError("HELLO resuming a session unknown to this server")
        state = cls(
            is_client=False,
            session_id=hello.session_id,
            secret=hello.secret,
            window_records=window_records,
            window_bytes=window_bytes,
        )
        state.accept(hello)
        return state

    # -- what the caller reads ------------------------------------------------------

    @property
    def sent(self) -> int:
        """The number of the last record queued by :meth:`send_record`."""
        return self.acked + len(self._retained)

    @property
    def retained(self) -> tuple[int, int]:
        """Records and bytes retained for replay (not acknowledged yet)."""
        return len(self._retained), self._retained_bytes

    @property
    def eof_sent(self) -> bool:
        """True once our EOF record was queued."""
        return self._eof_queued

    @property
    def finished(self) -> bool:
        """True once both sides' EOF records were received and ours acknowledged."""
        return self.peer_eof and self._eof_queued and not self._retained

    def can_send(self, size: int) -> bool:
        """Whether a record of ``size`` bytes fits in the replay window now."""
        if len(self._retained) >= self.window_records:
            return False
        return not self._retained or self._retained_bytes + size <= self.window_bytes

    # -- the application's requests -------------------------------------------------

    def send_record(self, data: bytes, *, eof: bool = False) -> int:
        """Queue a record (retained until acknowledged); return its number (a restarted
        client's records are renumbered by the first WELCOME).

        Raises:
            gntipc.LocalProtocolError: larger than :attr:`max_record`, no room in the
                window (see :meth:`can_send`), after our EOF, or ``eof`` with data.
        """
        self._check_alive()
        n = len(data)
        if n > self.max_record:
            raise LocalProtocolError(f"a record of {n} bytes (at most {self.max_record})")
        if self._eof_queued:
            raise LocalProtocolError("a record after our EOF")
        if eof and n:
            raise LocalProtocolError("the EOF record carries no data")
        if not self.can_send(n):
            raise LocalProtocolError("the replay window is full (wait for acknowledgements)")
        self._retained.append((bytes(data), eof))
        self._retained_bytes += n
        self._eof_queued = eof
        return self.sent

    def commit(self, seq: int) -> None:
        """Every received record up to ``seq`` is safe with the application (delivered,
        or persisted): it may be acknowledged, and the peer forgets it.

        Raises:
            gntipc.LocalProtocolError: ``seq`` above what was received.
        """
        if self.received is None or seq > self.received:
            raise LocalProtocolError(f"commit({seq}) beyond the last record received")
        if seq > self.committed:
            # _unacked holds records _ack_sent + 1, + 2... (contiguous): add the sizes
            # of those committed now (each record once: constant time per record).
            unacked, base = self._unacked, self._ack_sent + 1
            self._committed_bytes += sum(
                unacked[s - base][1] for s in range(max(self.committed + 1, base), seq + 1)
            )
            self.committed = seq

    def ack_due(self) -> bool:
        """Whether an ACK should go now: a quarter of the peer's window is committed and
        unacknowledged."""
        if self.committed <= self._ack_sent or not self.connected:
            return False
        records = self.committed - self._ack_sent
        nbytes = self._committed_bytes
        return records * 4 >= self.peer_window_records or nbytes * 4 >= self.peer_window_bytes

    def ack(self) -> None:
        """Queue an ACK of every committed record (if any is unacknowledged and a
        connection is up); :meth:`data_to_send` returns it."""
        if not self.connected or self.committed <= self._ack_sent:
            return
        self._control.append(_frame(FrameType.ACK, 0, self.committed, _EPOCH.pack(self.epoch)))
        self._acked_upto(self.committed)

    def ping(self) -> None:
        """Queue an ACK even if nothing new was committed (the same cumulative ack
        again: the peer ignores it), as a keepalive on an idle connection, which tells
        the peer the connection still works.  Nothing without a connection."""
        if self.connected:
            self._control.append(_frame(FrameType.ACK, 0, self._ack_sent, _EPOCH.pack(self.epoch)))

    def _acked_upto(self, seq: int) -> None:
        self._ack_sent = seq
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            size = unacked.popleft()[1]
            self._unacked_bytes -= size
            self._committed_bytes -= size  # (only committed records are acknowledged)

    def data_to_send(self, max_bytes: int = 1 << 20) -> bytes:
        """The bytes to write on the current connection now (handshake, acks, records
        not written on it yet): about ``max_bytes`` at most (at least one frame).  Empty
        when there is nothing (or no connection)."""
        out = self._control
        self._control = []
        size = sum(map(len, out))
        cursor = self._cursor
        if cursor is not None and self.connected:
            first = self.acked + 1
            cursor = max(cursor, first)  # (acked meanwhile: no need to write them)
            retained = self._retained
            while cursor - first < len(retained) and (size < max_bytes or not out):
                data, eof = retained[cursor - first]
                frame = _frame(FrameType.DATA, FLAG_EOF if eof else 0, cursor, data)
                out.append(frame)
                size += len(frame)
                cursor += 1
            self._cursor = cursor
        return b"".join(out)

    # -- connections ------------------------------------------------------------------

    def connect(self) -> None:
        """(Client) A new connection is up: queue the HELLO (:meth:`data_to_send`).

        Raises:
            gntipc.LocalProtocolError: not a client, or a connection is up.
        """
        self._check_alive()
        if not self.is_client:
            raise LocalProtocolError("connect() on the server side")
        if self.connected or self._handshaking:
            raise LocalProtocolError("connect() while a connection is up (connection_lost first)")
        flags = 0 if self._started else FLAG_NEW
        # The resume point is what we committed: the peer replays from there and we
        # drop what we had received after it (a restarted process never lies about it).
        received = self.committed
        if self.received is None:
            flags |= FLAG_FROM_OLDEST
            received = 0
        payload = _HANDSHAKE.pack(
            _MAGIC, VERSION, 0, 0, self.window_records, self.window_bytes,
            self.session_id, self.secret,
        )  # fmt: skip
        self._control = [_frame(FrameType.HELLO, flags, received, payload)]
        self._decoder = _Decoder()
        self._handshaking = True

    def accept(self, hello: Hello) -> None:
        """(Server) A new connection brought ``hello`` (from :func:`decode_hello`): check
        it against this session, start the next epoch, queue the WELCOME and the replay.
        Feed the bytes after the HELLO to :meth:`receive_data` next.  A connection that
        was up is replaced (it is considered lost).

        Raises:
            gntipc.RemoteProtocolError: a wrong session id or secret, a resume point
                beyond what we sent or before what the client acknowledged (the state
                stays usable: refuse this connection with :func:`encode_refuse`).
        """
        start = self.check_hello(hello)
        self.connection_lost()
        self.epoch += 1
        self.peer_window_records = hello.window_records
        self.peer_window_bytes = hello.window_bytes
        payload = _HANDSHAKE.pack(
            _MAGIC, VERSION, 0, self.epoch, self.window_records, self.window_bytes,
            self.session_id, _ZEROS,
        )  # fmt: skip
        self._control = [_frame(FrameType.WELCOME, 0, self.committed, payload)]
        self._up(start)

    def check_hello(self, hello: Hello) -> int:
        """(Server) What :meth:`accept` checks, without changing anything: the first
        record the client will get.

        Raises:
            gntipc.RemoteProtocolError: as :meth:`accept`.
        """
        self._check_alive()
        if self.is_client:
            raise LocalProtocolError("a HELLO on the client side")
        if hello.session_id != self.session_id:
            raise RemoteProtocolError("HELLO for another session")
        if not hmac.compare_digest(hello.secret, self.secret):
            raise RemoteProtocolError("HELLO with a wrong secret for this session")
        # (A NEW HELLO for a session that exists, with its secret: our WELCOME was lost
        # and the client tries again.  It received nothing: its resume point is 0.)
        if not hello.new and not self._started:
            raise RemoteProtocolError("HELLO resuming a session that never started")
        return self._resume_point(hello.received, hello.from_oldest, "HELLO")

    def _resume_point(self, received: int, from_oldest: bool, name: str) -> int:
        """The first record to replay for a peer that received up to ``received``."""
        if from_oldest:
            return self.acked + 1
        if received > self.sent:
            raise RemoteProtocolError(
                f"{name} resume point {received} beyond the last record sent ({self.sent})"
            )
        if received < self.acked:
            raise RemoteProtocolError(
                f"{name} resume point {received} before what the peer acknowledged"
                f" ({self.acked}): those records are gone"
            )
        return received + 1

    def _up(self, start: int) -> None:
        self._release(start - 1)
        self._cursor = start
        self.connected = True
        self._handshaking = False
        self._started = True
        # Our resume point acknowledged every committed record.
        self._acked_upto(self.committed)

    def connection_lost(self) -> None:
        """The current connection broke or closed: forget its partial frames and unsent
        control frames (the next connection resumes).  Idempotent."""
        self.connected = False
        self._handshaking = False
        self._cursor = None
        self._control = []
        self._decoder = _Decoder()

    # -- what the peer sent -----------------------------------------------------------

    def receive_data(self, data: bytes) -> Sequence[ResumeEvent]:
        """Take bytes read from the current connection (any split): the events of the
        frames they complete, in order.  Acks release retained records.

        Raises:
            gntipc.RemoteProtocolError: the peer broke the protocol; the state is dead
                and every later call raises it again.
            gntipc.LocalProtocolError: no connection is being set up or up.
        """
        self._check_alive()
        if not (self.connected or self._handshaking):
            raise LocalProtocolError("receive_data() without a connection")
        try:
            events: list[ResumeEvent] = []
            for ftype, flags, seq, payload in self._decoder.feed(data):
                event = self._apply(ftype, flags, seq, payload)
                if event is not None:
                    events.append(event)
                    if type(event) is Refused:
                        break
            return events
        except RemoteProtocolError as exc:
            self._broken = str(exc)
            self.connection_lost()
            raise

    def _apply(self, ftype: int, flags: int, seq: int, payload: bytes) -> ResumeEvent | None:
        if ftype == FrameType.DATA:
            return self._on_data(flags, seq, payload)
        if ftype == FrameType.ACK:
            return self._on_ack(seq, payload)
        if ftype == FrameType.WELCOME:
            return self._on_welcome(seq, payload)
        if ftype == FrameType.REFUSE:
            if not (self.is_client and self._handshaking):
                raise RemoteProtocolError("REFUSE out of the handshake")
            self.connection_lost()
            return Refused(payload.decode("utf-8", "replace"))
        raise RemoteProtocolError("HELLO after the handshake")

    def _on_data(self, flags: int, seq: int, payload: bytes) -> Record | None:
        if not self.connected:
            raise RemoteProtocolError("DATA before the handshake")
        received = self.received
        if received is not None and seq <= received:
            return None  # a duplicate (e.g. replayed from before our resume point)
        if received is not None and seq != received + 1:
            raise RemoteProtocolError(f"record {seq} after {received}: records are missing")
        if self.peer_eof:
            raise RemoteProtocolError(f"record {seq} after the peer's EOF")
        if len(self._unacked) >= self.peer_window_records or (
            self._unacked and self._unacked_bytes + len(payload) > self.peer_window_bytes
        ):
            raise RemoteProtocolError(
                f"record {seq} beyond the window the peer announced ({self.peer_window_records}"
                f" records, {self.peer_window_bytes} bytes unacknowledged)"
            )
        if received is None:
            self.committed = self._ack_sent = seq - 1
        self.received = seq
        self._unacked.append((seq, len(payload)))
        self._unacked_bytes += len(payload)
        eof = bool(flags & FLAG_EOF)
        self.peer_eof = eof
        return Record(seq, payload, eof)

    def _on_ack(self, seq: int, payload: bytes) -> Acked | None:
        if not self.connected:
            raise RemoteProtocolError("ACK before the handshake")
        (epoch,) = _EPOCH.unpack(payload)
        if epoch != self.epoch:
            raise RemoteProtocolError(f"ACK from epoch {epoch} in epoch {self.epoch}")
        if seq > self.sent:
            raise RemoteProtocolError(f"ACK of record {seq}, beyond the last sent ({self.sent})")
        # (An ack beyond what this connection carried is fine: the peer may commit
        # records it received on an earlier one, ahead of our replay.)
        if seq <= self.acked:
            return None  # an older cumulative ack: nothing new
        self._release(seq)
        return Acked(seq)

    def _on_welcome(self, seq: int, payload: bytes) -> Welcome:
        if not (self.is_client and self._handshaking):
            raise RemoteProtocolError("WELCOME out of the handshake")
        epoch, records, nbytes, sid, zeros = _unpack_handshake(payload, "WELCOME")
        if sid != self.session_id:
            raise RemoteProtocolError("WELCOME for another session")
        if zeros != _ZEROS:
            raise RemoteProtocolError("WELCOME with nonzero reserved bytes")
        if epoch <= self.epoch:
            raise RemoteProtocolError(f"WELCOME with epoch {epoch}, not above {self.epoch}")
        if self._renumber:
            # A restarted client: its records come after what the server received.
            self._renumber = False
            self.acked = seq
        start = self._resume_point(seq, False, "WELCOME")
        self.epoch = epoch
        self.peer_window_records = records
        self.peer_window_bytes = nbytes
        self._up(start)
        return Welcome(epoch, seq)

    def _release(self, seq: int) -> None:
        """The peer holds every record up to ``seq``: stop retaining them."""
        retained = self._retained
        while self.acked < seq:
            data, _ = retained.popleft()
            self._retained_bytes -= len(data)
            self.acked += 1

    def _check_alive(self) -> None:
        if self._broken is not None:
            raise RemoteProtocolError(self._broken)

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        state = "up" if self.connected else "broken" if self._broken else "down"
        return (
            f"<ResumeState {role} {state} epoch={self.epoch} sent={self.sent}"
            f" acked={self.acked} received={self.received}>"
        )
