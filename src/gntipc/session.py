"""Many logical byte streams over one byte stream: :class:`Session` and :class:`SessionStream`.

A gntalloc domain may share only ~1024 pages by default and XenStore quotas limit
connects, so a service that needs many conversations with one peer opens *one* vchan and
multiplexes it::

    async with Session(await gntipc.connect(0, "data/vchan/5/1")) as session:
        async with await session.open_stream() as stream:     # an anyio ByteStream
            await stream.send(b"hello")

    async with Session(await listener.accept()) as session:
        async with await session.accept_stream() as stream:
            print(await stream.receive())

Every logical stream has its own credit-based flow control: the receiver announces a
window (default 256 KiB) and grants credit back as the application consumes data, so a
stream whose reader never reads stalls only its own sender; the others keep flowing.  One
reader task per session dispatches incoming frames.  Frames go out in order through one
writer task (a send that finds room in the ring and nothing queued writes at once), so a
send can be cancelled at any point, even while the peer does not read at all, and the
framing stays intact.

The wire format (a 12-byte header per frame; HELLO, OPEN, DATA, WINDOW, EOF, RESET,
GOAWAY) is defined, encoded and decoded by the sans-I/O :mod:`gntipc.protocol.mux`; this
module does the I/O and keeps the per-stream state.

The underlying stream may be any :class:`anyio.abc.ByteStream`: a
:class:`gntipc.VchanStream` (the side that called :func:`gntipc.connect` is the
initiator, and frames that fit the ring are written without a task switch), or e.g.
anyio's TCP, unix or TLS streams (pass ``is_initiator``: one side True, the other False).

Everything the peer sends is validated; a violation (unknown stream id, oversize frame,
credit overflow, bad header, ...) raises :class:`gntipc.RemoteProtocolError` from every
operation of the session and its streams, and closes the session (and the underlying
stream).  Buffered memory is bounded by ``window * max_streams`` plus one frame.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import time
import warnings
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)
from anyio.abc import ByteStream
from anyio.lowlevel import checkpoint

from ._exceptions import LocalProtocolError, RemoteProtocolError
from ._soon import Deferred
from ._stats import SessionStatistics
from .protocol.mux import DEFAULT_MAX_STREAMS as DEFAULT_MAX_STREAMS
from .protocol.mux import DEFAULT_WINDOW as DEFAULT_WINDOW
from .protocol.mux import HEADER_SIZE as HEADER_SIZE
from .protocol.mux import MAX_FRAME as MAX_FRAME
from .protocol.mux import (
    MAX_STREAM_ID,
    MAX_STREAMS_LIMIT,
    MAX_WINDOW,
    MIN_WINDOW,
    Data,
    Eof,
    FrameType,
    GoAway,
    Hello,
    MuxEvent,
    Open,
    SessionDecoder,
    Window,
    encode_data,
    encode_frame,
    encode_hello,
)
from .streams import FAIR_SLICE, FLUSH_BYTES, VchanAttribute, VchanStream

__all__ = ["Session", "SessionStream"]

#: How long :meth:`Session.aclose` waits to flush pending control frames and GOAWAY.
_FLUSH_TIMEOUT = 2.0


class _Signal:
    """Wakes every task waiting at the moment :meth:`fire` is called."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def fire(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class _Outgoing:
    """DATA frames a sender handed to the session's writer task."""

    __slots__ = ("data", "done", "taken", "written")

    def __init__(self, data: bytes) -> None:
        self.data = data
        #: The writer started writing it: it goes out in full, or the session goes down.
        self.taken = False
        self.written = False
        #: Set once written, or once the writer stopped (the session is down).
        self.done = anyio.Event()


class _Down(enum.Enum):
    CLOSED = "closed"  # we closed the session
    EOF = "eof"  # the peer closed the session (or the underlying stream) cleanly
    BROKEN = "broken"  # the underlying stream broke (peer crashed, domain died)
    PROTOCOL = "protocol"  # the peer violated the protocol


class Session:
    """A multiplexer of many :class:`SessionStream` over one byte stream.

    Args:
        stream: any connected :class:`anyio.abc.ByteStream`: a
            :class:`gntipc.VchanStream`, or e.g. anyio's TCP, unix or TLS streams.  The
            session owns it from now on: closing the session closes it.
        is_initiator: which side this is (the two sides must differ).  ``None``: the
            client of a :class:`gntipc.VchanStream` (the side that called
            :func:`gntipc.connect`) is the initiator; required for any other stream
            (e.g. True on the side that connected a TCP socket).
        window: our receive window per logical stream, in bytes (1 KiB .. 1 GiB).
        max_streams: how many streams the peer may have open towards us at once
            (:meth:`accept_stream` backlog included); the peer's :meth:`open_stream`
            waits for a free slot.

    Use it as an async context manager (``async with Session(stream) as session:``): it
    runs its reader in a task group it owns for the duration of the block.

    Raises:
        gntipc.LocalProtocolError: bad arguments, or ``is_initiator`` cannot be inferred.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        is_initiator: bool | None = None,
        window: int = DEFAULT_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise LocalProtocolError(f"window must be from {MIN_WINDOW} to {MAX_WINDOW}")
        if not 1 <= max_streams <= MAX_STREAMS_LIMIT:
            raise LocalProtocolError(f"max_streams must be from 1 to {MAX_STREAMS_LIMIT}")
        if is_initiator is None:
            is_server = stream.extra(VchanAttribute.is_server, None)
            if is_server is None:
                raise LocalProtocolError(
                    "is_initiator is required unless the stream is a gntipc.VchanStream"
                    " (pass True on one side and False on the other)"
                )
            is_initiator = not is_server
        self._stream: ByteStream | None = stream
        self.is_initiator = is_initiator
        self.window = window
        self.max_streams = max_streams
        # Only a VchanStream's send_nowait is known to be all or nothing.
        self._vchan_stream: VchanStream | None = stream if isinstance(stream, VchanStream) else None
        self._streams: dict[int, SessionStream] = {}
        self._next_id = 1 if is_initiator else 2
        self._peer_last_id = 0
        self._peer_hello = False
        self._peer_window = 0
        self._peer_max_streams = 0
        self._peer_goaway = False
        self._decoder = SessionDecoder()
        self._ours_open = 0  # streams of our parity in _streams
        self._theirs_open = 0
        self._pending: collections.deque[SessionStream] = collections.deque()
        # Frames for the writer task, in order: control frames, and DATA of senders.
        self._out: collections.deque[bytes | _Outgoing] = collections.deque()
        self._writing = False  # the writer task is inside the stream's send
        self._control_signal = _Signal()
        self._state_signal = _Signal()  # hello, accept backlog, free slots, going down
        self._down: _Down | None = None
        self._cause: BaseException | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._scopes: list[anyio.CancelScope] = []
        self._control_done: anyio.Event | None = None
        self._entered = False
        # Statistics: plain counters, bumped where the work is done anyway.
        self._bytes_sent = 0
        self._bytes_received = 0
        self._writes = 0
        self._frames_received = 0
        self._streams_opened = 0
        self._streams_accepted = 0

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a Session can be entered only once")
        if self._stream is None:
            raise ClosedResourceError
        self._entered = True
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await self._send_raw(encode_hello(self.window, self.max_streams))
            self._control_done = anyio.Event()
            tg.start_soon(self._run_task, self._reader)
            tg.start_soon(self._run_task, self._writer)
        except BaseException:
            await self.aclose()
            await tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            tg, self._tg = self._tg, None
            if tg is not None:
                # Our tasks never raise (they record failures), and aclose() cancelled
                # them, so this only waits for them; the body's exception is not wrapped.
                await tg.__aexit__(None, None, None)

    async def _run_task(self, fn: Callable[[], Any]) -> None:
        with anyio.CancelScope() as scope:
            self._scopes.append(scope)
            if self._down is not None:
                scope.cancel()
            await fn()

    async def aclose(self) -> None:
        """Close the session (idempotent; completes even when cancelled).

        Pending control frames (EOF / RESET of streams closed before) and a GOAWAY are
        flushed (for at most 2 s), then the underlying stream is closed.  Every logical
        stream then raises :class:`anyio.ClosedResourceError`; the peer's streams drain
        what we sent, then see :class:`anyio.EndOfStream` (if we sent EOF on them) or
        :class:`anyio.BrokenResourceError`, and its :meth:`accept_stream` raises
        :class:`anyio.EndOfStream`.
        """
        if self._down is None:
            running = self._control_done is not None
            self._go_down(_Down.CLOSED, None)
            if running:
                self._control_signal.fire()
                with anyio.move_on_after(_FLUSH_TIMEOUT, shield=True):
                    assert self._control_done is not None
                    await self._control_done.wait()
        await self._close_stream()
        for scope in self._scopes:
            scope.cancel()
        await checkpoint()

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def _go_down(self, how: _Down, cause: BaseException | None) -> None:
        if self._down is not None:
            return
        self._down = how
        self._cause = cause
        self._state_signal.fire()
        self._control_signal.fire()  # the writer flushes what is queued, then stops
        for s in self._streams.values():
            s._wake()
        for s in self._pending:
            s._closed = True  # never handed out: nobody to warn
        self._pending.clear()

    @property
    def closed(self) -> bool:
        """True once the session is down (closed by us, by the peer, or broken)."""
        return self._down is not None

    @property
    def error(self) -> BaseException | None:
        """What ended the session, if not a close by us: a
        :class:`gntipc.RemoteProtocolError`, :class:`anyio.BrokenResourceError` or
        :class:`anyio.EndOfStream` (the peer closed it); ``None`` otherwise."""
        if self._down in (None, _Down.CLOSED):
            return None
        if self._down is _Down.EOF:
            return EndOfStream()
        return self._cause

    def statistics(self) -> SessionStatistics:
        """A snapshot of what this session has done so far (bytes, writes and frames,
        logical streams) and of its state, with the underlying stream's own statistics
        when it is a :class:`~gntipc.VchanStream`.  Works after close too."""
        vchan = self._vchan_stream
        return SessionStatistics(
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            writes=self._writes,
            frames_received=self._frames_received,
            streams_opened=self._streams_opened,
            streams_accepted=self._streams_accepted,
            streams_open=len(self._streams),
            accept_backlog=len(self._pending),
            queued_frames=len(self._out),
            state=self._down.value if self._down is not None else "open",
            stream=vchan.statistics() if vchan is not None else None,
        )

    def __repr__(self) -> str:
        state = self._down.value if self._down is not None else "open"
        role = "initiator" if self.is_initiator else "responder"
        return f"<Session {role} streams={len(self._streams)} {state}>"

    def __del__(self) -> None:
        if getattr(self, "_stream", None) is not None and getattr(self, "_entered", False):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)

    # -- errors ----------------------------------------------------------------------

    def _error(self) -> BaseException:
        """The exception a stream operation raises now that the session is down."""
        if self._down is _Down.CLOSED:
            return ClosedResourceError()
        if self._down is _Down.PROTOCOL:
            exc: BaseException = RemoteProtocolError(str(self._cause))
        elif self._down is _Down.EOF:
            exc = BrokenResourceError("the peer closed the session")
        else:
            exc = BrokenResourceError("the session's stream broke (the peer is gone)")
        exc.__cause__ = self._cause
        return exc

    def _check_running(self) -> None:
        if self._down is not None:
            raise self._error()
        if self._control_done is None:
            raise RuntimeError("use the session as `async with Session(stream) as session:`")

    # -- opening and accepting -------------------------------------------------------

    async def open_stream(self) -> SessionStream:
        """Open a new logical stream to the peer (whose :meth:`accept_stream` returns it).

        Waits until the peer's hello arrived and the peer accepts another stream (see
        ``max_streams``).  Cancellation: no stream is opened.

        Raises:
            anyio.ClosedResourceError: the session is (or gets) closed.
            anyio.BrokenResourceError: the peer closed the session, or the underlying
                stream broke.
            gntipc.RemoteProtocolError: the peer violated the protocol.
            gntipc.LocalProtocolError: stream ids are exhausted (2**31 per side).
        """
        self._check_running()
        await checkpoint()
        while True:
            self._check_running()
            if self._peer_goaway:
                raise BrokenResourceError("the peer is closing the session")
            if not self._peer_hello or self._ours_open >= self._peer_max_streams:
                await self._state_signal.wait()
                continue
            sid = self._next_id
            if sid > MAX_STREAM_ID:
                raise LocalProtocolError("stream ids are exhausted")
            self._next_id += 2
            stream = SessionStream(self, sid)
            stream._accepted = True
            self._streams[sid] = stream
            self._ours_open += 1
            self._streams_opened += 1
            self._queue_control(encode_frame(FrameType.OPEN, sid))  # queued before any DATA of it
            return stream

    async def accept_stream(self) -> SessionStream:
        """Wait for the peer to open a logical stream and return it.

        Cancellation: no stream is lost (it stays queued for the next call).

        Raises:
            anyio.EndOfStream: the peer closed the session (no more streams will come).
            anyio.ClosedResourceError: the session is (or gets) closed.
            anyio.BrokenResourceError: the underlying stream broke (peer crashed).
            gntipc.RemoteProtocolError: the peer violated the protocol.
        """
        if self._down is None and self._control_done is None:
            raise RuntimeError("use the session as `async with Session(stream) as session:`")
        await checkpoint()
        while True:
            if self._pending:
                stream = self._pending.popleft()
                stream._accepted = True
                self._streams_accepted += 1
                return stream
            if self._down is _Down.EOF or (self._peer_goaway and self._down is None):
                raise EndOfStream
            if self._down is not None:
                raise self._error()
            await self._state_signal.wait()

    # -- writing ---------------------------------------------------------------------

    def _write_failed(self, exc: Exception) -> BaseException:
        """Take the session down after the stream refused a write; the error to raise."""
        if isinstance(exc, RemoteProtocolError):
            self._go_down(_Down.PROTOCOL, exc)
        elif not isinstance(exc, ClosedResourceError) or self._down is None:
            self._go_down(_Down.BROKEN, exc)
        return self._error()

    async def _send_raw(self, data: bytes) -> None:
        """Write whole frames.  Only the writer task calls it (and ``__aenter__``, before
        the writer starts), so frames never interleave.  A write cancelled half-way
        happens only when the session goes down, and the stream is then closed."""
        stream = self._stream
        if stream is None:
            raise self._error()
        try:
            await stream.send(data)
        except (BrokenResourceError, ClosedResourceError, EndOfStream, RemoteProtocolError) as exc:
            raise self._write_failed(exc) from exc
        self._writes += 1
        self._bytes_sent += len(data)

    def _write_now(self, data: bytes) -> bool:
        """Write ``data`` at once if nothing is queued before it and the ring has room for
        all of it (all or nothing: never a partial frame); False if it must be queued.

        Raises:
            The session's error if the stream failed (the session is then down).
        """
        stream = self._vchan_stream
        if stream is None or self._out or self._writing or self._stream is None:
            return False
        try:
            stream.send_nowait(data)
        except (WouldBlock, LocalProtocolError):  # no room now, or larger than the ring
            return False
        except (BrokenResourceError, ClosedResourceError, EndOfStream, RemoteProtocolError) as exc:
            raise self._write_failed(exc) from exc
        self._writes += 1
        self._bytes_sent += len(data)
        return True

    def _queue_control(self, frame: bytes) -> None:
        self._out.append(frame)
        self._control_signal.fire()

    def _queue_data(self, data: bytes) -> _Outgoing:
        out = _Outgoing(data)
        self._out.append(out)
        self._control_signal.fire()
        return out

    def _withdraw(self, out: _Outgoing) -> None:
        """Remove DATA the writer has not started on (its sender gives up); its waiter
        wakes up."""
        with contextlib.suppress(ValueError):  # the writer stopped and dropped it already
            self._out.remove(out)
        out.done.set()

    async def _writer(self) -> None:
        """Write every queued frame, in order, batching what accumulated meanwhile."""
        taken: list[_Outgoing] = []
        try:
            while True:
                out = self._out
                if out:
                    parts: list[bytes] = []
                    for item in out:
                        if isinstance(item, _Outgoing):
                            item.taken = True
                            taken.append(item)
                            parts.append(item.data)
                        else:
                            parts.append(item)
                    out.clear()
                    self._writing = True
                    try:
                        await self._send_raw(parts[0] if len(parts) == 1 else b"".join(parts))
                    finally:
                        self._writing = False
                    for item in taken:
                        item.written = True
                        item.done.set()
                    taken.clear()
                    continue
                if self._down is not None:
                    if self._down is _Down.CLOSED:
                        await self._send_raw(encode_frame(FrameType.GOAWAY))
                    return
                await self._control_signal.wait()
        except Exception as exc:
            # _send_raw has taken the session down for the stream's own errors; anything
            # else (a bug, an unexpected error from the stream) is recorded here.  Either
            # way a frame may be half-written: close the stream, so that the peer sees the
            # end instead of waiting for the rest.
            self._go_down(_Down.BROKEN, exc)
            await self._close_stream()
        finally:
            if self._down is None:
                # Cancelled from outside the session (in the middle of a frame, maybe):
                # nothing more can be written in sync.
                self._go_down(_Down.BROKEN, BrokenResourceError("the session's writer stopped"))
                await self._close_stream()
            # Wake the senders still waiting: their frames will not be written.
            for item in taken:
                item.done.set()
            for item in self._out:
                if isinstance(item, _Outgoing):
                    item.done.set()
            self._out.clear()
            assert self._control_done is not None
            self._control_done.set()

    # -- reading ---------------------------------------------------------------------

    async def _reader(self) -> None:
        stream = self._stream
        assert stream is not None
        decoder = self._decoder
        try:
            while True:
                try:
                    chunk = await stream.receive(1 << 18)
                except EndOfStream:
                    decoder.end_of_stream()
                    self._go_down(_Down.EOF, None)
                    return
                self._bytes_received += len(chunk)
                for event in decoder.feed(chunk):
                    self._frames_received += 1
                    self._handle(event)
        except RemoteProtocolError as exc:
            self._go_down(_Down.PROTOCOL, exc)
            await self._close_stream()
        except ClosedResourceError as exc:
            self._go_down(_Down.CLOSED if self._stream is None else _Down.BROKEN, exc)
        except BrokenResourceError as exc:
            self._go_down(_Down.BROKEN, exc)
        except Exception as exc:
            # A bug or an unexpected error from the stream: fail the session loudly
            # (every operation raises BrokenResourceError from it) rather than hang.
            self._go_down(_Down.BROKEN, exc)
            await self._close_stream()

    def _handle(self, event: MuxEvent) -> None:
        """Apply one decoded frame (the decoder validated it on its own; what needs
        the session's state is checked here)."""
        if isinstance(event, Hello):
            self._peer_window = event.window
            self._peer_max_streams = event.max_streams
            self._peer_hello = True
            self._state_signal.fire()
            return
        if isinstance(event, GoAway):
            self._peer_goaway = True
            self._state_signal.fire()
            return
        if isinstance(event, Open):
            self._on_open(event.stream_id)
            return
        sid = event.stream_id
        stream = self._streams.get(sid)
        name = type(event).__name__.upper()
        if stream is None:
            raise RemoteProtocolError(f"{name} frame for unknown stream id {sid}")
        if stream._remote_reset:
            raise RemoteProtocolError(f"{name} frame on stream {sid} after its RESET")
        if isinstance(event, Data):
            stream._on_data(event.data)
        elif isinstance(event, Window):
            stream._on_window(event.increment)
        elif isinstance(event, Eof):
            if stream._remote_eof:
                raise RemoteProtocolError(f"duplicate EOF on stream {sid}")
            stream._remote_eof = True
            stream._wake()
        else:  # Reset
            stream._remote_reset = True
            stream._wake()
            if stream._reset_sent:
                self._forget(stream)

    def _on_open(self, sid: int) -> None:
        if (sid & 1) == (1 if self.is_initiator else 0):
            raise RemoteProtocolError(
                f"OPEN of stream id {sid} of our parity (are both sides initiators, or both "
                "responders?)"
            )
        if sid <= self._peer_last_id:
            raise RemoteProtocolError(f"OPEN of stream id {sid} not above {self._peer_last_id}")
        if self._theirs_open >= self.max_streams:
            raise RemoteProtocolError(f"the peer opened more than {self.max_streams} streams")
        self._peer_last_id = sid
        stream = SessionStream(self, sid)
        self._streams[sid] = stream
        self._theirs_open += 1
        if self._down is None:
            self._pending.append(stream)
            self._state_signal.fire()

    def _forget(self, stream: SessionStream) -> None:
        if self._streams.pop(stream.stream_id, None) is None:
            return
        if (stream.stream_id & 1) == (1 if self.is_initiator else 0):
            self._ours_open -= 1
        else:
            self._theirs_open -= 1
        self._state_signal.fire()


class SessionStream(ByteStream):
    """One logical stream of a :class:`Session`: an :class:`anyio.abc.ByteStream`.

    Obtained from :meth:`Session.open_stream` or :meth:`Session.accept_stream`.  One task
    may send while another receives; two concurrent senders (or receivers) raise
    :class:`anyio.BusyResourceError`.  Extra attributes are those of the session's
    underlying stream (e.g. :class:`gntipc.VchanAttribute`).

    Errors: :meth:`receive` raises :class:`anyio.EndOfStream` once the peer sent EOF
    (or closed the stream) and everything was read; :class:`anyio.BrokenResourceError`
    when the stream or session ended without an EOF (peer crashed, peer closed the
    session), again after everything received was read, and from :meth:`send` once the
    peer closed the stream or the session is gone; :class:`anyio.ClosedResourceError`
    after our own :meth:`aclose` (or, for sending, :meth:`send_eof`) or our close of the
    session; :class:`gntipc.RemoteProtocolError` when the peer violated the protocol.
    """

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # consumed bytes of _chunks[0]
        self._recv_credit = session.window  # what the peer may still send us
        self._consumed = 0  # consumed but not yet granted back
        self._send_credit = session._peer_window
        self._signal = _Signal()
        self._sending = False
        self._queued: _Outgoing | None = None  # DATA of our send waiting for the writer
        self._receiving = False
        self._eof_sent = False
        self._reset_sent = False
        self._remote_eof = False
        self._remote_reset = False
        self._closed = False
        self._accepted = False
        # Bytes accepted by _send_soon, not sent yet (see there), and when send/receive
        # last yielded to the event loop (FAIR_SLICE).
        self._later = Deferred()
        self._yielded = 0.0
        #: How many bytes of the item of the last (or current) :meth:`send` were written:
        #: after a cancelled send, the length of the prefix that will be delivered.
        self.send_progress = 0

    # -- introspection ---------------------------------------------------------------

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        stream = self._session._stream
        return stream.extra_attributes if stream is not None else {}

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._closed

    @property
    def session(self) -> Session:
        """The session this stream belongs to."""
        return self._session

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SessionStream id={self.stream_id} {state}>"

    def _wake(self) -> None:
        self._signal.fire()

    # -- incoming frames (called by the session's reader) ----------------------------

    def _on_data(self, payload: bytes) -> None:
        if self._remote_eof:
            raise RemoteProtocolError(f"DATA on stream {self.stream_id} after its EOF")
        n = len(payload)
        if n > self._recv_credit:
            raise RemoteProtocolError(
                f"flow control violated on stream {self.stream_id}: {n} bytes of DATA with"
                f" {self._recv_credit} bytes of credit"
            )
        self._recv_credit -= n
        if self._closed:
            return  # we sent RESET: discard what was in flight
        self._chunks.append(payload)
        self._signal.fire()

    def _on_window(self, increment: int) -> None:
        if increment < 1 or self._send_credit + increment > self._session._peer_window:
            raise RemoteProtocolError(
                f"credit overflow on stream {self.stream_id}: {self._send_credit} + {increment}"
                f" exceeds the window of {self._session._peer_window}"
            )
        self._send_credit += increment
        self._signal.fire()

    # -- sending ---------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed or self._eof_sent:
            raise ClosedResourceError
        session = self._session
        if session._down is not None:
            raise session._error()
        if self._remote_reset:
            raise BrokenResourceError(f"the peer closed stream {self.stream_id}")

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        """Send all of ``item``, waiting for credit (the peer's window) as needed.

        Cancellation works at any point, also while the underlying stream is full (the
        peer does not read).  An ``item`` of at most half the peer's window (128 KiB by
        default) goes out as one piece when there is credit for all of it; a larger one
        in pieces as credit arrives.  A piece is written whole: if the send is cancelled
        after the session's writer started on a piece, that piece is still delivered.
        So a cancelled send has sent a *prefix* of ``item`` (``send_progress`` bytes:
        for a small item, nothing or all of it), which the peer receives intact.  The
        session and its other streams stay consistent either way.

        Raises:
            anyio.BusyResourceError: another task is already sending.
            anyio.BrokenResourceError: the peer closed this stream or the session, or the
                underlying stream broke.
            anyio.ClosedResourceError: we closed the stream or the session (also while
                waiting), or sent EOF.
            gntipc.RemoteProtocolError: the peer violated the protocol.
        """
        self._check_send()
        if self._sending:
            raise BusyResourceError("sending to")
        self._sending = True
        self.send_progress = 0
        try:
            await self._fair_checkpoint()
            if self._later.buf:
                self._check_send()
                self._flush()
            with memoryview(item) as raw, raw.cast("B") as view:
                total = len(view)
                atomic = total <= self._session._peer_window // 2
                offset = 0
                while offset < total:
                    need = total - offset if atomic else 1
                    while True:
                        self._check_send()
                        if self._send_credit >= need:
                            break
                        await self._signal.wait()
                    n = min(self._send_credit, total - offset)
                    frames = encode_data(self.stream_id, view[offset : offset + n])
                    await self._send_piece(frames, n, offset)
                    offset += n
                    self.send_progress = offset
        finally:
            self._sending = False

    async def _fair_checkpoint(self) -> None:
        # A call that need not wait yields only if this stream did not for FAIR_SLICE:
        # a busy stream neither starves other tasks nor pays a loop iteration per call.
        now = time.monotonic()
        if now - self._yielded >= FAIR_SLICE:
            self._yielded = now
            await checkpoint()

    def _send_soon(self, item: bytes | bytearray | memoryview) -> bool:
        """Accept ``item`` without sending it yet: what gathers is sent as one DATA piece
        when :data:`~gntipc.streams.FLUSH_BYTES` gathered, before this stream sends
        anything else, waits to receive, sends EOF or closes, and at the latest when the
        event loop runs its callbacks after the calling task yields (as
        :meth:`gntipc.VchanStream._send_soon`).  False, accepting nothing, when it
        would exceed the peer's window now, or a send is in progress, or the stream
        cannot send (then :meth:`send` reports why)."""
        session = self._session
        if (
            self._sending
            or self._closed
            or self._eof_sent
            or self._remote_reset
            or session._down is not None
        ):
            return False
        later = self._later.buf
        if len(later) + len(item) > self._send_credit:
            return False
        later += item
        if len(later) >= FLUSH_BYTES or not self._later.in_burst():
            self._flush()
        else:
            self._later.schedule(self._flush)
        return True

    def _flush(self) -> None:
        """Send what :meth:`_send_soon` held back, as one DATA piece: now if the ring has
        room and nothing is queued before it, else through the session's writer.

        Raises:
            The session's error if the underlying stream failed.
        """
        later = self._later.buf
        if not later or self._closed or self._session._down is not None:
            later.clear()  # it can no longer be sent (our close reset the stream)
            return
        frames = encode_data(self.stream_id, later)
        self._send_credit -= len(later)
        later.clear()
        session = self._session
        if not session._write_now(frames):
            session._queue_data(frames)  # the writer writes it whole, in order

    def _flush_before_wait(self) -> None:
        if self._later.buf:
            with contextlib.suppress(Exception):  # the session's error: reported next
                self._flush()

    async def _send_piece(self, frames: bytes, n: int, offset: int) -> None:
        """Write the DATA ``frames`` of ``n`` bytes of the item (from ``offset``): now if
        the ring has room, else through the writer task."""
        session = self._session
        self._send_credit -= n
        try:
            if session._write_now(frames):
                return
        except BaseException:
            self._send_credit += n
            raise
        out = self._queued = session._queue_data(frames)
        try:
            await out.done.wait()
        except BaseException:
            if not out.taken:
                session._withdraw(out)  # nothing of it was written
                self._send_credit += n
            else:
                self.send_progress = offset + n  # the writer writes it whole
            raise
        finally:
            self._queued = None
        if not out.written:  # withdrawn by close(), or the session went down
            self._check_send()
            raise session._error()

    async def send_eof(self) -> None:
        """Half-close: the peer's :meth:`receive` raises EndOfStream once it has read
        everything we sent; our receive direction keeps working.  Idempotent.

        Raises:
            anyio.BusyResourceError: a send is in progress.
            anyio.ClosedResourceError: the stream (or the session) is closed.
        """
        if self._closed:
            raise ClosedResourceError
        if self._sending:
            raise BusyResourceError("sending to")
        if self._session._down is _Down.CLOSED:
            raise ClosedResourceError
        self._flush_before_wait()
        self._send_eof_frame()
        await checkpoint()

    def _send_eof_frame(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            if self._session._down is None and not self._remote_reset:
                self._session._queue_control(encode_frame(FrameType.EOF, self.stream_id))

    # -- receiving -------------------------------------------------------------------

    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        avail = len(first) - self._offset
        if avail > max_bytes:
            data = first[self._offset : self._offset + max_bytes]
            self._offset += max_bytes
        else:
            chunks.popleft()
            data = first[self._offset :] if self._offset else first
            self._offset = 0
            if chunks and len(data) + len(chunks[0]) <= max_bytes:
                parts = [data]
                size = len(data)
                while chunks and size + len(chunks[0]) <= max_bytes:
                    nxt = chunks.popleft()
                    parts.append(nxt)
                    size += len(nxt)
                data = b"".join(parts)
        self._consumed += len(data)
        session = self._session
        if self._consumed >= session.window // 2 and not self._remote_eof:
            grant, self._consumed = self._consumed, 0
            self._recv_credit += grant
            if session._down is None:
                session._queue_control(encode_frame(FrameType.WINDOW, self.stream_id, grant))
        return data

    def _end_of_data(self) -> BaseException:
        session = self._session
        if session._down in (_Down.CLOSED, _Down.PROTOCOL):
            return session._error()
        if self._remote_eof:
            return EndOfStream()
        if self._remote_reset:
            return BrokenResourceError(f"the peer reset stream {self.stream_id}")
        return session._error()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Return between 1 and ``max_bytes`` bytes, waiting for data if needed.

        Cancellation: nothing is consumed by a cancelled receive.

        Raises:
            anyio.EndOfStream: the peer sent EOF (or closed the stream) and everything
                was read.
            anyio.BrokenResourceError: the peer's side ended without EOF (it crashed,
                closed the session, or reset the stream), after everything was read.
            anyio.BusyResourceError: another task is already receiving.
            anyio.ClosedResourceError: we closed the stream or the session (also while
                waiting).
            gntipc.RemoteProtocolError: the peer violated the protocol.
        """
        if self._closed:
            raise ClosedResourceError
        if self._receiving:
            raise BusyResourceError("receiving from")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            await self._fair_checkpoint()
            while True:
                if self._closed:
                    raise ClosedResourceError
                down = self._session._down
                if self._chunks and down not in (_Down.CLOSED, _Down.PROTOCOL):
                    return self._take(max_bytes)
                if self._remote_eof or self._remote_reset or down is not None:
                    raise self._end_of_data()
                self._flush_before_wait()
                await self._signal.wait()
                self._yielded = time.monotonic()
        finally:
            self._receiving = False

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close now (idempotent): the peer reads what we sent, then EndOfStream; its
        sends then fail with BrokenResourceError.  Tasks blocked in :meth:`send` or
        :meth:`receive` get :class:`anyio.ClosedResourceError`."""
        if self._closed:
            return
        if self._later.writer_thread():
            self._flush_before_wait()  # the peer reads what we sent, then the end
        self._closed = True
        self._chunks.clear()
        session = self._session
        if self._queued is not None and not self._queued.taken:
            session._withdraw(self._queued)  # not sent: the blocked send raises
        if session._streams.get(self.stream_id) is self:
            self._send_eof_frame()
            self._reset_sent = True
            if session._down is None:
                session._queue_control(encode_frame(FrameType.RESET, self.stream_id))
            if self._remote_reset or session._down is not None:
                session._forget(self)
        self._wake()

    async def aclose(self) -> None:
        """Close the stream (see :meth:`close`; completes even when cancelled)."""
        self.close()
        await checkpoint()

    def __del__(self) -> None:
        if (
            getattr(self, "_accepted", True) is not False
            and getattr(self, "_closed", True) is False
            and self._session._down is None
        ):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
