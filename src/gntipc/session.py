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
window (by default 256 KiB, or the vchan's receive ring if larger) and grants credit back
as the application consumes data, so a stream whose reader never reads stalls only its
own sender; the others keep flowing.  One
reader task per session dispatches incoming frames.  Frames go out in order through one
writer task (a send that finds room in the ring and nothing queued writes at once), so a
send can be cancelled at any point, even while the peer does not read at all, and the
framing stays intact.

The wire format (a 12-byte header per frame; HELLO, OPEN, DATA, WINDOW, EOF, RESET,
GOAWAY) and the session's state (stream ids, credit, the peer's HELLO and GOAWAY) are the
sans-I/O :mod:`gntipc.protocol.mux`'s: its :class:`~gntipc.protocol.mux.SessionState`
checks and applies every frame and request and returns the frames to send; this module
does the I/O (the reader and writer tasks, waiting, the byte stream) around it.

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
from typing import TYPE_CHECKING, Any, ClassVar, Self

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
from ._fastpath import HeldWrites, ring_stream
from ._soon import Deferred, LoopCheckpoint
from ._stats import SessionStatistics
from .backends._abc import Buffer
from .protocol.mux import DEFAULT_MAX_STREAMS as DEFAULT_MAX_STREAMS
from .protocol.mux import DEFAULT_WINDOW as DEFAULT_WINDOW
from .protocol.mux import HEADER_SIZE as HEADER_SIZE
from .protocol.mux import MAX_FRAME as MAX_FRAME
from .protocol.mux import (
    MAX_WINDOW,
    Data,
    GoAway,
    Hello,
    MuxEvent,
    Open,
    SessionState,
    StreamState,
)
from .streams import FAIR_SLICE, FLUSH_BYTES, VchanAttribute

__all__ = ["Session", "SessionStream"]

#: The most the session's reader reads from the underlying stream at a time.
_READ_SIZE = 1 << 18
#: After delivering data, the session's reader looks at a VchanStream without waiting
#: on it (between the application's steps) as long as the application took some of what
#: was received less than this long ago (seconds); then it waits (spins, then sleeps).
_LOOK_FOR = 1e-3
#: How long :meth:`Session.aclose` waits to flush pending control frames and GOAWAY.
_FLUSH_TIMEOUT = 2.0
#: How long the writer, after the stream refused a write because the peer left, waits for
#: the reader to read how it left (its GOAWAY and end, or the break) before the session
#: goes down as broken anyway (a stream whose reading side never ends).
_LEFT_TIMEOUT = 2.0


class _Signal:
    """Wakes every task waiting at the moment :meth:`fire` is called."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    @property
    def waiting(self) -> bool:
        """True if a task waits (or is about to wait) for the next :meth:`fire`."""
        return self._event is not None

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
    EOF = "eof"  # the peer closed the session (its GOAWAY came, or the stream ended) cleanly
    BROKEN = "broken"  # the underlying stream broke (peer crashed, domain died)
    PROTOCOL = "protocol"  # the peer violated the protocol


class _Channel:
    """What the session's reader and the tasks of one logical stream share: the data
    received and not read yet, and the signal that wakes those tasks.  The stream's
    protocol state (credit, EOF, RESET) is its :class:`~gntipc.protocol.mux.StreamState`."""

    __slots__ = ("chunks", "signal", "state")

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.chunks: collections.deque[bytes] = collections.deque()
        self.signal = _Signal()


class _Link:
    """What a session shares with its logical streams: the protocol state, the streams'
    channels, the underlying stream and the queue of frames for the writer task, and
    whether (and why) the session is down.  The I/O is here and in :class:`Session`;
    the protocol's decisions are :class:`~gntipc.protocol.mux.SessionState`'s."""

    __slots__ = (
        "bytes_sent",
        "cause",
        "channels",
        "control_signal",
        "delivered_to",
        "down",
        "mux",
        "out",
        "peer_closed",
        "pending",
        "ring",
        "state_signal",
        "stream",
        "taken",
        "write_error",
        "writes",
        "writing",
    )

    def __init__(self, stream: ByteStream, mux: SessionState) -> None:
        self.mux = mux
        self.stream: ByteStream | None = stream
        # The ring's send_nowait writes all or nothing (a frame is never split).
        self.ring = ring_stream(stream)
        self.channels: dict[int, _Channel] = {}  # the streams whose ids are in use
        self.pending: collections.deque[_Channel] = collections.deque()  # to accept
        # Frames for the writer task, in order: control frames, and DATA of senders.
        self.out: collections.deque[bytes | _Outgoing] = collections.deque()
        self.writing = False  # the writer task is inside the stream's send
        self.control_signal = _Signal()
        # What the tasks of the stream the reader last delivered data to wait on (None
        # while it dispatches a chunk that has no data for any).
        self.delivered_to: _Signal | None = None
        self.state_signal = _Signal()  # hello, accept backlog, free slots, going down
        self.down: _Down | None = None
        self.cause: BaseException | None = None
        # The peer's GOAWAY arrived while the session was up: the peer closed it, cleanly,
        # whatever happens to the stream after that (see Session.error).
        self.peer_closed = False
        # The stream refused a write because the peer left: how it left (closed, or gone)
        # is for the reader to read; the writer writes no more and waits (write_failed).
        self.write_error: BaseException | None = None
        # Statistics: plain counters, bumped where the work is done anyway.
        self.writes = 0
        self.bytes_sent = 0
        # Bytes the logical streams' readers took so far: the session's reader tells by
        # it whether the application is working through what was received.
        self.taken = 0

    def go_down(self, how: _Down, cause: BaseException | None) -> None:
        if self.down is not None:
            return
        self.down = how
        self.cause = cause
        self.state_signal.fire()
        self.control_signal.fire()  # the writer flushes what is queued, then stops
        for channel in self.channels.values():
            channel.signal.fire()
        self.pending.clear()  # never handed out: nobody to tell

    def error(self) -> BaseException:
        """The exception a stream operation raises now that the session is down."""
        if self.down is _Down.CLOSED:
            return ClosedResourceError()
        if self.down is _Down.PROTOCOL:
            exc: BaseException = RemoteProtocolError(str(self.cause))
        elif self.down is _Down.EOF:
            exc = BrokenResourceError("the peer closed the session")
        else:
            exc = BrokenResourceError("the session's stream broke (the peer is gone)")
        exc.__cause__ = self.cause
        return exc

    def forget(self, state: StreamState) -> None:
        """Free the id of a stream whose RESET went both ways (or the session is down)."""
        self.mux.release(state)
        if self.channels.pop(state.stream_id, None) is not None:
            self.state_signal.fire()

    # -- writing ---------------------------------------------------------------------

    def write_failed(self, exc: Exception) -> BaseException:
        """Record that the stream refused a write; the error to raise.

        A protocol error, or our stream closed under us, takes the session down at once.
        A stream that is broken or at its end (the peer left) does not: a peer that
        closed the session cleanly makes our writes fail as soon as it is gone, while its
        GOAWAY and the end of its stream may still wait unread in the stream (a
        :class:`SessionStream` refuses writes once its peer's RESET arrived, before its
        reader is handed the end).  So only the reader tells a clean close (EOF) from a
        crash (BROKEN); meanwhile ``write_error`` is set, and nothing more is written.
        """
        if isinstance(exc, RemoteProtocolError):
            self.go_down(_Down.PROTOCOL, exc)
        elif isinstance(exc, ClosedResourceError):
            if self.down is None:
                self.go_down(_Down.BROKEN, exc)
        elif self.down is None and self.write_error is None:
            self.write_error = exc
            self.control_signal.fire()  # the writer stops writing and waits for the reader
        if self.down is None:  # the writer waits for the reader; __aenter__ (HELLO) raises it
            error = BrokenResourceError("the session's stream broke (the peer is gone)")
            error.__cause__ = exc
            return error
        return self.error()

    def write_now(self, data: bytes) -> bool:
        """Write ``data`` at once if nothing is queued before it and the ring has room for
        all of it (all or nothing: never a partial frame); False if it must be queued
        (also when the peer left: the writer then holds it until the reader read how).

        Raises:
            The session's error if the stream failed and the session is down.
        """
        ring = self.ring
        if (
            ring is None
            or self.out
            or self.writing
            or self.stream is None
            or self.write_error is not None
        ):
            return False
        try:
            ring.send_nowait(data)
        except (WouldBlock, LocalProtocolError):  # no room now, or larger than the ring
            return False
        except (BrokenResourceError, ClosedResourceError, EndOfStream, RemoteProtocolError) as exc:
            error = self.write_failed(exc)
            if self.down is not None:
                raise error from exc
            return False  # queued: the writer holds it until the reader knows the outcome
        self.writes += 1
        self.bytes_sent += len(data)
        return True

    def send_control(self, frame: bytes | None) -> None:
        """Write a control frame now if nothing is queued before it and the ring has
        room (no task switch, and the peer has it at once: a WINDOW grant it may be
        waiting for), else queue it for the writer.  Never raises (its caller, a
        receive, has taken the data it returns): a session that went down sends
        nothing more, and its next operation reports why."""
        if frame is None or self.down is not None:
            return
        try:
            if self.write_now(frame):
                return
        except Exception as exc:
            # The stream's own errors took the session down already (write_now); an
            # unexpected one does here, as it would in the writer (the frame may be
            # half-written: nothing more can be written in sync).
            self.go_down(_Down.BROKEN, exc)
            return
        self.queue_control(frame)

    def queue_control(self, frame: bytes | None) -> None:
        """Queue a control frame for the writer (none if the session is down)."""
        if frame is not None and self.down is None:
            self.out.append(frame)
            self.control_signal.fire()

    def queue_data(self, data: bytes) -> _Outgoing:
        out = _Outgoing(data)
        self.out.append(out)
        self.control_signal.fire()
        return out

    def withdraw(self, out: _Outgoing) -> None:
        """Remove DATA the writer has not started on (its sender gives up); its waiter
        wakes up."""
        with contextlib.suppress(ValueError):  # the writer stopped and dropped it already
            self.out.remove(out)
        out.done.set()


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
            ``None``: the larger of :data:`DEFAULT_WINDOW` (256 KiB) and the receive
            ring of a :class:`gntipc.VchanStream` (so that one stream can keep the ring
            as full as the bare stream would: a smaller window leaves a fast sender
            waiting for credit, and the receiver idle while the grant wakes it).
            Buffered memory is bounded by ``window * max_streams``.
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
        window: int | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if is_initiator is None:
            is_server = stream.extra(VchanAttribute.is_server, None)
            if is_server is None:
                raise LocalProtocolError(
                    "is_initiator is required unless the stream is a gntipc.VchanStream"
                    " (pass True on one side and False on the other)"
                )
            is_initiator = not is_server
        if window is None:
            ring = stream.extra(VchanAttribute.read_size, 0)
            window = min(max(DEFAULT_WINDOW, ring), MAX_WINDOW)
        # The protocol's state (it checks window and max_streams).
        self._mux = SessionState(is_initiator=is_initiator, window=window, max_streams=max_streams)
        self._link = _Link(stream, self._mux)
        self.is_initiator = is_initiator
        self.window = window
        self.max_streams = max_streams
        self._streams = self._link.channels  # the logical streams whose ids are in use
        self._tg: anyio.abc.TaskGroup | None = None
        self._scopes: list[anyio.CancelScope] = []
        self._control_done: anyio.Event | None = None
        self._entered = False
        # Statistics: plain counters, bumped where the work is done anyway.
        self._bytes_received = 0
        self._frames_received = 0
        self._streams_opened = 0
        self._streams_accepted = 0

    @property
    def _stream(self) -> ByteStream | None:
        # The underlying stream (None once closed).
        return self._link.stream

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a Session can be entered only once")
        if self._link.stream is None:
            raise ClosedResourceError
        self._entered = True
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await self._send_raw(self._mux.hello())
            self._control_done = anyio.Event()
            tg.start_soon(self._run_task, self._reader)
            tg.start_soon(self._run_task, self._writer)
        except BaseException:
            link = self._link
            if link.down is None and link.write_error is not None:
                # The HELLO was refused and no reader runs to tell why: the peer is gone.
                link.go_down(_Down.BROKEN, link.write_error)
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
            if self._link.down is not None:
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
        link = self._link
        if link.down is None:
            running = self._control_done is not None
            link.go_down(_Down.CLOSED, None)
            if running:
                link.control_signal.fire()
                with anyio.move_on_after(_FLUSH_TIMEOUT, shield=True):
                    assert self._control_done is not None
                    await self._control_done.wait()
        await self._close_stream()
        for scope in self._scopes:
            scope.cancel()
        await checkpoint()

    async def _close_stream(self) -> None:
        link = self._link
        stream, link.stream = link.stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    @property
    def closed(self) -> bool:
        """True once the session is down (closed by us, by the peer, or broken)."""
        return self._link.down is not None

    @property
    def error(self) -> BaseException | None:
        """What ended the session, if not a close by us.

        :class:`anyio.EndOfStream`: the peer closed the session, from the moment its
        GOAWAY arrived (when :meth:`accept_stream` starts raising EndOfStream, while the
        rest of its stream may still be read: :attr:`closed` may be False yet) or its
        stream ended cleanly; it stays so, also if the stream then breaks or we close.
        :class:`anyio.BrokenResourceError` (or another error of the stream, e.g.
        :class:`OSError`): the stream broke before the peer closed the session (it
        crashed, its domain died).  :class:`gntipc.RemoteProtocolError`: the peer violated
        the protocol (also after its GOAWAY).  ``None`` while the session runs and the
        peer has not closed it, and once we closed it first."""
        link = self._link
        down = link.down
        if down in (None, _Down.CLOSED):
            return EndOfStream() if link.peer_closed else None
        if down is _Down.EOF:
            return EndOfStream()
        return link.cause

    def statistics(self) -> SessionStatistics:
        """A snapshot of what this session has done so far (bytes, writes and frames,
        logical streams) and of its state, with the underlying stream's own statistics
        when it is a :class:`~gntipc.VchanStream`.  Works after close too."""
        link = self._link
        ring = link.ring
        return SessionStatistics(
            bytes_sent=link.bytes_sent,
            bytes_received=self._bytes_received,
            writes=link.writes,
            frames_received=self._frames_received,
            streams_opened=self._streams_opened,
            streams_accepted=self._streams_accepted,
            streams_open=len(link.channels),
            accept_backlog=len(link.pending),
            queued_frames=len(link.out),
            state=link.down.value if link.down is not None else "open",
            stream=ring.statistics() if ring is not None else None,
        )

    def __repr__(self) -> str:
        link = self._link
        state = link.down.value if link.down is not None else "open"
        role = "initiator" if self.is_initiator else "responder"
        return f"<Session {role} streams={len(link.channels)} {state}>"

    def __del__(self) -> None:
        link = getattr(self, "_link", None)
        if link is not None and link.stream is not None and getattr(self, "_entered", False):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)

    # -- errors ----------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._link.down is not None:
            raise self._link.error()
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
        link = self._link
        mux = self._mux
        while True:
            self._check_running()
            if mux.peer_goaway:
                raise BrokenResourceError("the peer is closing the session")
            if not mux.can_open:
                await link.state_signal.wait()
                continue
            state, frame = mux.open_stream()
            channel = link.channels[state.stream_id] = _Channel(state)
            self._streams_opened += 1
            link.queue_control(frame)  # queued before any DATA of it
            return SessionStream(self, link, channel)

    async def accept_stream(self) -> SessionStream:
        """Wait for the peer to open a logical stream and return it.

        Cancellation: no stream is lost (it stays queued for the next call).

        Raises:
            anyio.EndOfStream: the peer closed the session (no more streams will come):
                as soon as its GOAWAY arrived, even if the rest of its stream is not read
                yet; :attr:`error` is EndOfStream from then on.
            anyio.ClosedResourceError: the session is (or gets) closed.
            anyio.BrokenResourceError: the underlying stream broke (peer crashed).
            gntipc.RemoteProtocolError: the peer violated the protocol.
        """
        link = self._link
        if link.down is None and self._control_done is None:
            raise RuntimeError("use the session as `async with Session(stream) as session:`")
        await checkpoint()
        while True:
            if link.pending:
                channel = link.pending.popleft()
                self._streams_accepted += 1
                return SessionStream(self, link, channel)
            if link.down is _Down.EOF or (link.peer_closed and link.down is None):
                raise EndOfStream  # Session.error is EndOfStream from now on
            if link.down is not None:
                raise link.error()
            await link.state_signal.wait()

    # -- writing ---------------------------------------------------------------------

    async def _send_raw(self, data: bytes) -> None:
        """Write whole frames.  Only the writer task calls it (and ``__aenter__``, before
        the writer starts), so frames never interleave.  A write cancelled half-way
        happens only when the session goes down, and the stream is then closed.

        Raises:
            What :meth:`_Link.write_failed` returns: the session's error, or
            BrokenResourceError while the reader is left to tell how the peer left.
        """
        link = self._link
        stream = link.stream
        if stream is None:
            raise link.error()
        try:
            await stream.send(data)
        except (BrokenResourceError, ClosedResourceError, EndOfStream, RemoteProtocolError) as exc:
            raise link.write_failed(exc) from exc
        link.writes += 1
        link.bytes_sent += len(data)

    async def _writer(self) -> None:
        """Write every queued frame, in order, batching what accumulated meanwhile."""
        link = self._link
        taken: list[_Outgoing] = []
        try:
            while True:
                if link.write_error is not None and link.down is None:
                    await self._wait_for_reader()
                    return
                out = link.out
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
                    link.writing = True
                    try:
                        await self._send_raw(parts[0] if len(parts) == 1 else b"".join(parts))
                    except BrokenResourceError:
                        if link.write_error is None or link.down is not None:
                            raise
                        # The peer left: what we took is not written; the reader tells how.
                        await self._wait_for_reader()
                        return
                    finally:
                        link.writing = False
                    for item in taken:
                        item.written = True
                        item.done.set()
                    taken.clear()
                    continue
                if link.down is not None:
                    if link.down is _Down.CLOSED:
                        await self._send_raw(self._mux.goaway())
                    return
                await link.control_signal.wait()
        except Exception as exc:
            # _send_raw has taken the session down for the stream's own errors; anything
            # else (a bug, an unexpected error from the stream) is recorded here.  Either
            # way a frame may be half-written: close the stream, so that the peer sees the
            # end instead of waiting for the rest.
            link.go_down(_Down.BROKEN, exc)
            await self._close_stream()
        finally:
            if link.down is None:
                # Cancelled from outside the session (in the middle of a frame, maybe):
                # nothing more can be written in sync.
                link.go_down(_Down.BROKEN, BrokenResourceError("the session's writer stopped"))
                await self._close_stream()
            # Wake the senders still waiting: their frames will not be written.
            for item in taken:
                item.done.set()
            for item in link.out:
                if isinstance(item, _Outgoing):
                    item.done.set()
            link.out.clear()
            assert self._control_done is not None
            self._control_done.set()

    async def _wait_for_reader(self) -> None:
        """After the stream refused a write because the peer left (``write_error``):
        wait for the reader to take the session down, as the peer left it: closed
        (its GOAWAY, or the end of the stream: EOF) or gone (the stream broke: BROKEN).
        If the reader cannot tell within :data:`_LEFT_TIMEOUT`, the session is broken."""
        link = self._link
        with anyio.move_on_after(_LEFT_TIMEOUT):
            while link.down is None:
                await link.state_signal.wait()
        if link.down is None:
            link.go_down(_Down.BROKEN, link.write_error)
            await self._close_stream()

    # -- reading ---------------------------------------------------------------------

    async def _reader(self) -> None:
        link = self._link
        stream = link.stream
        assert stream is not None
        mux = self._mux
        yield_ = LoopCheckpoint()  # the loop's own checkpoint, looked up once
        # A VchanStream's: what the ring holds now, without waiting (nor spinning).
        receive_nowait: Callable[[int], bytes] | None = getattr(stream, "receive_nowait", None)
        # While the application works through what we delivered (it took some less than
        # _LOOK_FOR ago, and does not wait for more), look at the stream between its
        # steps instead of waiting on it: a wait spins first, taking the loop from it for
        # a slice at each of its yields.
        look_until = 0.0
        taken = link.taken
        consumer: _Signal | None = None  # that of the stream we last delivered data to
        try:
            while True:
                if look_until:
                    now = time.monotonic()
                    if link.taken != taken:
                        taken = link.taken
                        look_until = now + _LOOK_FOR
                    if now >= look_until or consumer is None or consumer.waiting:
                        look_until = 0.0  # idle, or waiting for data: wait the usual way
                try:
                    if look_until and receive_nowait is not None:
                        try:
                            chunk = receive_nowait(_READ_SIZE)
                        except WouldBlock:
                            await yield_()
                            continue
                    else:
                        chunk = await stream.receive(_READ_SIZE)
                except EndOfStream:
                    mux.end_of_stream()
                    link.go_down(_Down.EOF, None)
                    return
                self._bytes_received += len(chunk)
                link.delivered_to = None
                for event in mux.receive_data(chunk):
                    self._frames_received += 1
                    self._handle(event)
                # Only after data (not after control frames alone), and not where spinning
                # is off (a VchanStream's spin is 0 on one CPU: the peer needs the CPU
                # that looking would keep).
                spin: float = getattr(stream, "spin", 1.0)
                if link.delivered_to is not None and receive_nowait is not None and spin > 0:
                    consumer = link.delivered_to
                    taken = link.taken
                    look_until = time.monotonic() + _LOOK_FOR
        except RemoteProtocolError as exc:
            link.go_down(_Down.PROTOCOL, exc)
            await self._close_stream()
        except ClosedResourceError as exc:
            link.go_down(_Down.CLOSED if link.stream is None else _Down.BROKEN, exc)
        except BrokenResourceError as exc:
            # After the peer's GOAWAY (its last word), a broken stream is how it closed
            # (e.g. a TCP reset), not a crash.
            link.go_down(_Down.EOF if link.peer_closed else _Down.BROKEN, exc)
        except Exception as exc:
            # A bug or an unexpected error from the stream: fail the session loudly
            # (every operation raises BrokenResourceError from it) rather than hang.
            link.go_down(_Down.BROKEN, exc)
            await self._close_stream()

    def _handle(self, event: MuxEvent) -> None:
        """Do the I/O side of one frame that the protocol state checked and applied:
        deliver data, wake the tasks it concerns."""
        link = self._link
        if type(event) is Data:  # the common case first
            channel = link.channels[event.stream_id]
            if channel.state.reset_sent:
                return  # we closed the stream: discard what was in flight
            channel.chunks.append(event.data)
            link.delivered_to = signal = channel.signal
            signal.fire()
            return
        if isinstance(event, (Hello, GoAway)):
            if isinstance(event, GoAway) and link.down is None:
                link.peer_closed = True
            link.state_signal.fire()
            return
        sid = event.stream_id
        if isinstance(event, Open):
            state = self._mux.get(sid)
            assert state is not None
            channel = link.channels[sid] = _Channel(state)
            if link.down is None:
                link.pending.append(channel)
                link.state_signal.fire()
            return
        channel = link.channels[sid]
        channel.signal.fire()
        if channel.state.freed:  # its RESET went both ways
            link.forget(channel.state)


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

    #: Declares the fast path :class:`gntipc.MessageQueue` uses (see gntipc._fastpath).
    gntipc_fast_path: ClassVar[str] = "held"

    def __init__(self, session: Session, link: _Link, channel: _Channel) -> None:
        self._session = session
        self._link = link
        self._state = channel.state  # credit, EOF and RESET each way
        self.stream_id = channel.state.stream_id
        self._chunks = channel.chunks
        self._signal = channel.signal
        self._offset = 0  # consumed bytes of _chunks[0]
        self._sending = False
        self._queued: _Outgoing | None = None  # DATA of our send waiting for the writer
        self._receiving = False
        self._closed = False
        # Bytes accepted by _send_soon, not sent yet (see there), and when send/receive
        # last yielded to the event loop (FAIR_SLICE).
        self._later = Deferred()
        self._yielded = 0.0
        self._checkpoint = LoopCheckpoint()  # anyio's, without its per-call lookup
        #: How many bytes of the item of the last (or current) :meth:`send` were written:
        #: after a cancelled send, the length of the prefix that will be delivered.
        self.send_progress = 0

    # -- introspection ---------------------------------------------------------------

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        stream = self._link.stream
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

    # -- sending ---------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed or self._state.eof_sent:
            raise ClosedResourceError
        link = self._link
        if link.down is not None:
            raise link.error()
        if self._state.remote_reset:
            raise BrokenResourceError(f"the peer closed stream {self.stream_id}")

    async def send(self, item: Buffer) -> None:
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
            state = self._state
            if type(item) is bytes and 0 < len(item) <= state.send_credit:
                # The common case (a MessageQueue's frames, credit for all of it): one
                # piece, without a view of it.
                self._check_send()
                total = len(item)
                await self._send_piece(state.send_data(item), total, 0)
                self.send_progress = total
                return
            with memoryview(item) as raw, raw.cast("B") as view:
                total = len(view)
                atomic = total <= self._link.mux.peer_window // 2
                offset = 0
                while offset < total:
                    need = total - offset if atomic else 1
                    while True:
                        self._check_send()
                        if state.send_credit >= need:
                            break
                        await self._signal.wait()
                    n = min(state.send_credit, total - offset)
                    frames = state.send_data(view[offset : offset + n])
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
            await self._checkpoint()

    def _send_soon(self, item: Buffer) -> bool:
        """Accept ``item`` without sending it yet: what gathers is sent as one DATA piece
        when :data:`~gntipc.streams.FLUSH_BYTES` gathered, before this stream sends
        anything else, waits to receive, sends EOF or closes, and at the latest when the
        event loop runs its callbacks after the calling task yields (as
        :meth:`gntipc.VchanStream._send_soon`).  False, accepting nothing, when it
        would exceed the peer's window now, or a send is in progress, or the stream
        cannot send (then :meth:`send` reports why)."""
        state = self._state
        if (
            self._sending
            or self._closed
            or state.eof_sent
            or state.remote_reset
            or self._link.down is not None
        ):
            return False
        later = self._later.buf
        if len(later) + len(item) > state.send_credit:
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
        link = self._link
        if not later or self._closed or link.down is not None:
            later.clear()  # it can no longer be sent (our close reset the stream)
            return
        frames = self._state.send_data(later)
        later.clear()
        if not link.write_now(frames):
            link.queue_data(frames)  # the writer writes it whole, in order

    def _flush_before_wait(self) -> None:
        if self._later.buf:
            with contextlib.suppress(Exception):  # the session's error: reported next
                self._flush()

    async def _send_piece(self, frames: bytes, n: int, offset: int) -> None:
        """Write the DATA ``frames`` of ``n`` bytes of the item (from ``offset``), whose
        credit was taken: now if the ring has room, else through the writer task."""
        link = self._link
        try:
            if link.write_now(frames):
                return
        except BaseException:
            self._state.refund(n)
            raise
        out = self._queued = link.queue_data(frames)
        try:
            await out.done.wait()
        except BaseException:
            if not out.taken:
                link.withdraw(out)  # nothing of it was written
                self._state.refund(n)
            else:
                self.send_progress = offset + n  # the writer writes it whole
            raise
        finally:
            self._queued = None
        if not out.written:  # withdrawn by close(), or the session went down
            self._check_send()
            raise link.error()

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
        if self._link.down is _Down.CLOSED:
            raise ClosedResourceError
        self._flush_before_wait()
        self._link.queue_control(self._state.send_eof())
        await checkpoint()

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
        link = self._link
        link.taken += len(data)
        grant = self._state.consume(len(data))
        if grant is not None:
            link.send_control(grant)
        return data

    def _end_of_data(self) -> BaseException:
        link = self._link
        if link.down in (_Down.CLOSED, _Down.PROTOCOL):
            return link.error()
        if self._state.remote_eof:
            return EndOfStream()
        if self._state.remote_reset:
            return BrokenResourceError(f"the peer reset stream {self.stream_id}")
        return link.error()

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
        self._check_receive(max_bytes)
        self._receiving = True
        try:
            await self._fair_checkpoint()
            while True:
                data = self._take_now(max_bytes)
                if data is not None:
                    return data
                self._flush_before_wait()
                await self._signal.wait()
                self._yielded = time.monotonic()
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        """Return between 1 and ``max_bytes`` bytes received already, without waiting
        (what :class:`gntipc.MessageQueue`'s ``get_many`` and ``get_nowait`` use to
        collect more messages without yielding).

        Raises:
            anyio.WouldBlock: nothing was received yet.
            anyio.BusyResourceError: another task is inside :meth:`receive`.
            anyio.EndOfStream: as :meth:`receive` (so are ``anyio.BrokenResourceError``,
                ``anyio.ClosedResourceError`` and ``gntipc.RemoteProtocolError``).
        """
        self._check_receive(max_bytes)
        data = self._take_now(max_bytes)
        if data is None:
            raise WouldBlock
        return data

    def _check_receive(self, max_bytes: int) -> None:
        if self._closed:
            raise ClosedResourceError
        if self._receiving:
            raise BusyResourceError("receiving from")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")

    def _take_now(self, max_bytes: int) -> bytes | None:
        """What :meth:`receive` returns without waiting, or None if it must wait.

        Raises:
            The end of the data, or the session's error (see :meth:`receive`).
        """
        if self._closed:
            raise ClosedResourceError
        down = self._link.down
        if self._chunks and down not in (_Down.CLOSED, _Down.PROTOCOL):
            return self._take(max_bytes)
        state = self._state
        if state.remote_eof or state.remote_reset or down is not None:
            raise self._end_of_data()
        return None

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
        link = self._link
        if self._queued is not None and not self._queued.taken:
            link.withdraw(self._queued)  # not sent: the blocked send raises
        state = self._state
        if not state.freed:
            link.queue_control(state.send_eof())
            link.queue_control(link.mux.reset(state))
            if state.freed or link.down is not None:
                link.forget(state)
        self._signal.fire()

    async def aclose(self) -> None:
        """Close the stream (see :meth:`close`; completes even when cancelled)."""
        self.close()
        await checkpoint()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False and self._link.down is None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)


if TYPE_CHECKING:
    # mypy checks that SessionStream has the fast path it declares.

    def _session_stream_holds_writes(stream: SessionStream) -> HeldWrites:
        return stream
