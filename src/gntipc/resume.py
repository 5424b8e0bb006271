"""Resumable streams: a byte stream (and a record API for messages) that survives its
transport breaking, over any reconnectable :class:`anyio.abc.ByteStream` (a
:class:`gntipc.VchanStream`, TCP, TLS...).  The protocol is :mod:`gntipc.protocol.resume`;
this module does its I/O.

Client::

    async def dial() -> anyio.abc.ByteStream:
        return await gntipc.connect(peer=0, path="data/vchan/5/1", timeout=5)

    async with ResumableStream.client(dial, give_up_after=30) as stream:
        await stream.send(b"...")            # survives the vchan breaking

Server::

    async with ResumableListener(await gntipc.listen(peer=5, path="data/vchan/5/1")) as rl:
        async with await rl.accept() as stream:
            data = await stream.receive()

The client re-calls its ``connect()`` factory after a break (backoff from 50 ms to 1 s),
and the server matches the incoming resume to its session by the session id and the
secret chosen when the session started (a wrong secret is refused: the client raises
:class:`SessionRefused`).  Meanwhile the application sees a pause: ``send`` goes on until
the replay window is full, then waits (backpressure); ``receive`` waits for data.  Each
break counts in :meth:`ResumableStream.statistics` and calls the optional ``on_break``
callback.  A transport that goes silent without breaking (a half-open TCP connection, a
hung relay) is detected by keepalives (``keepalive``) and resumed too.  A peer that does
not come back within ``give_up_after`` seconds ends the session with :class:`SessionLost`
(an :class:`anyio.BrokenResourceError`), never an endless wait.  ``send`` returns once
its data is in the replay window: delivered later, unless the session is lost.

The guarantees:

* **The transport breaks, both processes live on** (a dropped TCP connection, a vchan
  closed or broken under it, a relay restarted; a VM restored or migrated under a new
  domid, served by :func:`gntipc.listen_vm`): exactly-once, in order.
  Each side retains what it sent until the peer acknowledges it, and replays the rest
  after a resume; the receiver drops what it already had.
* **The client process restarts** (its memory is gone) and resumes with the
  :attr:`ResumableStream.ticket` it persisted (``ResumableStream.client(...,
  ticket=..., position=...)``): records to it are at-least-once with ``position=None``
  (the server replays every record the client did not commit), exactly-once with the
  position the client persisted with its own data (the last record it processed; it
  commits with :meth:`ResumableStream.commit` only what it persisted, with
  ``auto_commit=False``).  Records *from* the dead process that the server had not
  received are lost (at-most-once in that direction).
* A restart of the server process is not resumable: its sessions are in its memory.

The secret travels in every resume: the transport must be private (a vchan is; use TLS
over a network).  Over a vchan, a session is also bound to the client's VM: the listener
notes the UUID XenStore gives the client's domain when the session starts
(:func:`gntipc.vm.vm_of_domain`) and refuses a resume from a domain that is another VM,
whatever id and secret it presents (see ``identify`` of :class:`ResumableListener`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import anyio
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
)
from anyio.abc import ByteStream, Listener, TaskGroup

from . import _astore
from ._exceptions import GntipcError, LocalProtocolError, RemoteProtocolError
from .protocol.resume import (
    DEFAULT_WINDOW_BYTES,
    DEFAULT_WINDOW_RECORDS,
    HANDSHAKE_SIZE,
    HEADER_SIZE,
    Acked,
    Hello,
    Record,
    Refused,
    ResumeState,
    Welcome,
    decode_hello,
    encode_refuse,
)
from .streams import VchanStream
from .vm import vm_of_domain

__all__ = [
    "ResumableListener",
    "ResumableStream",
    "ResumeStatistics",
    "ResumeTicket",
    "SessionLost",
    "SessionRefused",
]

#: What a transport raises when it breaks (the session then resumes on a new one).
_TRANSPORT_ERRORS = (BrokenResourceError, ClosedResourceError, EndOfStream, OSError)
#: What a client's ``connect()`` may raise and be retried for (GntipcError: e.g. stale
#: keys, a store timeout; TimeoutError is an OSError).
_CONNECT_ERRORS = (*_TRANSPORT_ERRORS, GntipcError)


class SessionLost(GntipcError, BrokenResourceError):
    """The peer did not come back within ``give_up_after`` seconds (or the session was
    refused or broken): the session is over.  Its ``__cause__`` is the last error."""


class SessionRefused(SessionLost, RemoteProtocolError):
    """The server refused to resume the session (wrong secret, unknown session...)."""


@dataclass(frozen=True, slots=True)
class ResumeTicket:
    """What a client persists to resume its session after a restart of its process."""

    session_id: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class ResumeStatistics:
    """What a :class:`ResumableStream` has done so far."""

    #: Transports that broke under the session, and resumes that succeeded.
    breaks: int
    resumes: int
    #: Whether a transport is up now, and its epoch (-1 before the first).
    connected: bool
    epoch: int
    #: Records queued / received, and their payload bytes.
    records_sent: int
    records_received: int
    bytes_sent: int
    bytes_received: int
    #: Records (and bytes) kept for replay: sent, not acknowledged yet.
    retained_records: int
    retained_bytes: int
    #: Times a sender found the replay window full and waited.
    window_waits: int


class _Acceptor(Protocol):
    async def accept(self) -> ByteStream: ...
    async def aclose(self) -> None: ...


class _Signal:
    """A level-triggered wake-up for tasks of one event loop."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()


class ResumableStream(ByteStream):
    """A byte stream that survives its transport breaking (see the module documentation
    for the guarantees).  Make one with :meth:`client`, or accept one from a
    :class:`ResumableListener`; use it as an async context manager (it runs its
    connection in a task group it owns for the duration of the block).

    Besides the :class:`~anyio.abc.ByteStream` methods, a record API for messages:
    :meth:`send_record` / :meth:`receive_record` keep message boundaries and number the
    records, and :meth:`commit` (with ``auto_commit=False``) says which were safely
    processed.  Do not mix it with :meth:`receive` on one stream.

    Guarantees: while both processes live, every byte and record is delivered exactly
    once and in order across any number of breaks.  A client process that restarts
    with its :attr:`ticket` gets the records to it at least once (``position=None``)
    or exactly once (the ``position`` it persisted and committed, ``auto_commit=False``);
    what the dead process had sent and the server had not received is lost.

    One task may send and one receive at a time (else :class:`anyio.BusyResourceError`).
    Every method raises :class:`SessionLost` once the session is over (the peer did
    not come back in time, or refused us), :class:`gntipc.RemoteProtocolError` if the
    peer broke the protocol, and RuntimeError before the stream was entered.

    ``on_break`` is called in the stream's own task, at each break, with the error
    that broke the transport (or None): it must not block or raise (an exception it
    raises ends the session).
    """

    def __init__(
        self,
        state: ResumeState,
        *,
        connect: Callable[[], Awaitable[ByteStream]] | None = None,
        give_up_after: float = 30.0,
        backoff: tuple[float, float] = (0.05, 1.0),
        handshake_timeout: float = 5.0,
        keepalive: float | None = 10.0,
        linger: float = 5.0,
        auto_commit: bool = True,
        on_break: Callable[[BaseException | None], object] | None = None,
        _listener: ResumableListener | None = None,
    ) -> None:
        if give_up_after <= 0 or handshake_timeout <= 0 or not 0 < backoff[0] <= backoff[1]:
            raise LocalProtocolError("give_up_after, handshake_timeout and backoff must be > 0")
        if keepalive is not None and keepalive <= 0:
            raise LocalProtocolError("keepalive must be > 0 (or None)")
        self.keepalive = keepalive
        self._last_heard = 0.0
        self._state = state
        self._connect = connect
        self.give_up_after = give_up_after
        self.backoff = backoff
        self.handshake_timeout = handshake_timeout
        self.linger = linger
        self.auto_commit = auto_commit
        self.on_break = on_break
        self._listener = _listener
        self._tg: TaskGroup | None = None
        self._scope = anyio.CancelScope()  # the supervisor task's
        self._entered = False
        self._closed = False
        self._error: BaseException | None = None
        # Received records not yet returned to the application, and the read offset in
        # the first one (receive() may return part of a record).
        self._inbox: deque[Record] = deque()
        self._offset = 0
        self._eof = False
        self._data = _Signal()  # records (or an error) arrived
        self._window = _Signal()  # the window has room (or an error)
        self._write = _Signal()  # the writer has something to write
        self._up = _Signal()  # a transport is up (or an error)
        self._transport: ByteStream | None = None
        self._conn_scope: anyio.CancelScope | None = None
        # Server: the next transport, its HELLO and the bytes after it (the listener's).
        self._offer: tuple[ByteStream, Hello, bytes] | None = None
        self._offered = _Signal()
        self._sending = False
        self._receiving = False
        self._welcomed = False
        self._closing = False  # aclose() waits for the writer to flush (_flushed)
        self._flushed = anyio.Event()
        self._breaks = 0
        self._resumes = 0
        self._records_sent = 0
        self._records_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._window_waits = 0

    @classmethod
    def client(
        cls,
        connect: Callable[[], Awaitable[ByteStream]],
        *,
        window_records: int = DEFAULT_WINDOW_RECORDS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        give_up_after: float = 30.0,
        backoff: tuple[float, float] = (0.05, 1.0),
        handshake_timeout: float = 5.0,
        keepalive: float | None = 10.0,
        linger: float = 5.0,
        auto_commit: bool = True,
        on_break: Callable[[BaseException | None], object] | None = None,
        ticket: ResumeTicket | None = None,
        position: int | None = None,
    ) -> ResumableStream:
        """The client of a resumable session (it connects once entered).

        Args:
            connect: makes a new transport (awaited at the start and after each break;
                what it raises is retried, with backoff, until ``give_up_after``).
            window_records: the most records sent and not acknowledged.
            window_bytes: the most bytes sent and not acknowledged (records, and the
                pieces ``send`` cuts, are at most a quarter of it).
            give_up_after: seconds without a transport (from the start, or from a break)
                after which the session is lost.
            backoff: the first and the longest pause between two attempts, in seconds.
            handshake_timeout: seconds a new transport may take to complete the resume
                handshake (else it counts as broken).
            keepalive: each side sends a keepalive (a repeated ack, 20 bytes) every
                ``keepalive`` seconds, and a transport that brought nothing for three
                of them counts as broken (a half-open TCP connection, a frozen relay);
                None: rely on the transport to report breaks (a vchan does).  Both
                sides should use the same value.
            linger: ``aclose`` waits at most this long for what we sent to be
                acknowledged.
            auto_commit: commit each record as it is returned to the application; False:
                the application commits with :meth:`commit`.
            on_break: called (with the transport's error, or None) at each break.
            ticket: resume the session of this ticket (a restarted client process);
                ``position``: the last record it had processed (``None``: every record
                the server retains is replayed: at-least-once).

        Raises:
            gntipc.LocalProtocolError: a value out of range.
        """
        if ticket is None:
            state = ResumeState.client(window_records=window_records, window_bytes=window_bytes)
        else:
            state = ResumeState.restarted(
                ticket.session_id,
                ticket.secret,
                position,
                window_records=window_records,
                window_bytes=window_bytes,
            )
        return cls(
            state,
            connect=connect,
            give_up_after=give_up_after,
            backoff=backoff,
            handshake_timeout=handshake_timeout,
            keepalive=keepalive,
            linger=linger,
            auto_commit=auto_commit,
            on_break=on_break,
        )

    # -- what the application reads ---------------------------------------------------

    @property
    def ticket(self) -> ResumeTicket:
        """The session's id and secret: what a client persists to resume after a restart."""
        return ResumeTicket(self._state.session_id, self._state.secret)

    @property
    def max_record(self) -> int:
        """The largest record :meth:`send_record` takes (a quarter of the window's bytes,
        64 KiB at most)."""
        return self._state.max_record

    def statistics(self) -> ResumeStatistics:
        """A snapshot of the counters."""
        state = self._state
        records, nbytes = state.retained
        return ResumeStatistics(
            breaks=self._breaks,
            resumes=self._resumes,
            connected=state.connected,
            epoch=state.epoch,
            records_sent=self._records_sent,
            records_received=self._records_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            retained_records=records,
            retained_bytes=nbytes,
            window_waits=self._window_waits,
        )

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a ResumableStream can be entered only once")
        if self._closed:
            raise ClosedResourceError
        self._entered = True
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._supervise)
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
                await tg.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close the session (idempotent; completes even when cancelled).

        Waits at most ``linger`` seconds for what we sent to be acknowledged (the session
        keeps resuming meanwhile), then closes the transport; records still
        unacknowledged then are lost, and the peer sees the transport break and, after
        its ``give_up_after``, :class:`SessionLost`.  Send :meth:`send_eof` first for a
        clean end (the peer's ``receive`` then raises :class:`anyio.EndOfStream`).
        """
        if self._closed:
            return
        if self._error is None and self._state.retained[0] and self._tg is not None:
            with anyio.move_on_after(self.linger, shield=True):
                while self._error is None and self._state.retained[0]:
                    await self._window.wait()
                    self._window.clear()
        if self._error is None and self._state.connected and self._tg is not None:
            # Let the writer send what is queued (the ack of the peer's last records,
            # its EOF's included: else the peer lingers, waiting for it).
            self._closing = True
            self._write.set()
            with anyio.move_on_after(min(self.linger, 1.0), shield=True):
                await self._flushed.wait()
        self._closed = True
        self._fail(ClosedResourceError())
        self._error = ClosedResourceError()  # (whatever ended the session before)
        if self._listener is not None:
            self._listener._forget(self)
        # (Our task's scope: the task group's own encloses the application's block.)
        self._scope.cancel()
        transport, self._transport = self._transport, None
        if transport is not None:
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        offer, self._offer = self._offer, None
        if offer is not None:
            with anyio.CancelScope(shield=True):
                await offer[0].aclose()

    def __del__(self) -> None:
        # An accepted stream never closed holds its transport (and its session id).
        if not self._closed and (self._entered or self._offer is not None):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)

    def __repr__(self) -> str:
        return f"<ResumableStream {self._state!r}>"

    def _fail(self, exc: BaseException) -> None:
        """The session is over: every waiter wakes and raises ``exc``."""
        if self._error is None:
            self._error = exc
        for signal in (self._data, self._window, self._up, self._offered, self._write):
            signal.set()
        if self._conn_scope is not None:
            self._conn_scope.cancel()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._entered:
            # (Else the call would wait for a connection that nothing makes.)
            raise RuntimeError(
                "enter the ResumableStream first (async with stream: ...): it runs its"
                " connection in a task of its own"
            )

    # -- sending ----------------------------------------------------------------------

    async def _room(self, size: int) -> None:
        state = self._state
        while True:
            self._check()
            if state.can_send(size):
                return
            self._window_waits += 1
            self._window.clear()
            await self._window.wait()

    async def send(self, item: bytes) -> None:
        """Send ``item``: it is queued in the replay window (cut in records of at most
        :attr:`max_record` bytes) and written when a transport is up.  Waits while the
        window is full.  If cancelled while waiting, the records queued before stay
        queued (a prefix of ``item`` may be delivered).

        Raises:
            SessionLost: the session is over.
            anyio.ClosedResourceError: we closed the stream.
            anyio.BusyResourceError: another task is sending.
            gntipc.RemoteProtocolError: the peer broke the protocol.
            gntipc.LocalProtocolError: after :meth:`send_eof`.
        """
        if self._sending:
            raise BusyResourceError("sending")
        self._sending = True
        try:
            view = memoryview(item)
            step = self._state.max_record
            for start in range(0, len(view), step):
                chunk = view[start : start + step]
                await self._room(len(chunk))
                self._queue(bytes(chunk))
            await anyio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def send_record(self, data: bytes) -> int:
        """Send ``data`` as one record (a message: it is received whole, by
        :meth:`receive_record`); return its number.  Waits while the window is full;
        cancelled while waiting, nothing was queued.

        Raises:
            gntipc.LocalProtocolError: larger than :attr:`max_record`, or after
                :meth:`send_eof`.
            SessionLost: the session is over.
            anyio.ClosedResourceError: we closed the stream.
            anyio.BusyResourceError: another task is sending.
        """
        if len(data) > self._state.max_record:
            raise LocalProtocolError(
                f"a record of {len(data)} bytes (at most {self._state.max_record})"
            )
        if self._sending:
            raise BusyResourceError("sending")
        self._sending = True
        try:
            await self._room(len(data))
            return self._queue(bytes(data))
        finally:
            self._sending = False

    def _queue(self, data: bytes, eof: bool = False) -> int:
        seq = self._state.send_record(data, eof=eof)
        self._records_sent += 1
        self._bytes_sent += len(data)
        self._write.set()
        return seq

    async def send_eof(self) -> None:
        """Send no more: the peer's ``receive`` raises :class:`anyio.EndOfStream` after
        what we sent (idempotent).

        Raises:
            SessionLost: the session is over.
            anyio.ClosedResourceError: we closed the stream.
        """
        if self._state.eof_sent:
            return
        await self._room(0)
        self._queue(b"", eof=True)

    # -- receiving --------------------------------------------------------------------

    async def _next(self) -> Record:
        """The first record of the inbox (waits for one)."""
        while not self._inbox:
            if self._eof:
                raise EndOfStream
            self._check()
            # Idle: acknowledge what was committed (the sender may be waiting for it).
            self._flush_ack()
            self._data.clear()
            await self._data.wait()
        return self._inbox[0]

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Receive up to ``max_bytes`` bytes (at least 1); waits for data.  Cancelled
        while waiting, nothing is lost.

        Raises:
            anyio.EndOfStream: the peer sent EOF, and everything before it was received.
            SessionLost: the session is over.
            anyio.ClosedResourceError: we closed the stream.
            anyio.BusyResourceError: another task is receiving.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise BusyResourceError("receiving")
        self._receiving = True
        try:
            while True:
                record = await self._next()
                if record.eof:
                    self._take(record)
                    raise EndOfStream
                start = self._offset
                end = min(len(record.data), start + max_bytes)
                if end == len(record.data):
                    self._take(record)
                    data = record.data if start == 0 else record.data[start:]
                else:
                    self._offset = end
                    data = record.data[start:end]
                if data:
                    await anyio.lowlevel.checkpoint()
                    return data
        finally:
            self._receiving = False

    async def receive_record(self) -> tuple[int, bytes]:
        """The next record (sent by :meth:`send_record`, or a piece of a ``send``) and
        its number; waits for one.  Cancelled while waiting, nothing is lost.

        Raises:
            anyio.EndOfStream: the peer sent EOF, and every record before it was received.
            SessionLost: the session is over.
            anyio.ClosedResourceError: we closed the stream.
            anyio.BusyResourceError: another task is receiving.
        """
        if self._receiving:
            raise BusyResourceError("receiving")
        self._receiving = True
        try:
            record = await self._next()
            self._take(record)
            if record.eof:
                raise EndOfStream
            await anyio.lowlevel.checkpoint()
            return record.seq, record.data
        finally:
            self._receiving = False

    def _take(self, record: Record) -> None:
        self._inbox.popleft()
        self._offset = 0
        if record.eof:
            self._eof = True
        if self.auto_commit:
            self.commit(record.seq)

    def commit(self, seq: int) -> None:
        """Every record up to ``seq`` was processed (and persisted, if the application
        restarts from a position): the peer may forget them.  Automatic with
        ``auto_commit`` (the default).  With ``auto_commit=False`` the peer's window
        fills until the application commits.

        Raises:
            gntipc.LocalProtocolError: ``seq`` was not received yet.
        """
        state = self._state
        state.commit(seq)
        if state.ack_due() or not self._inbox:
            self._flush_ack()

    def _flush_ack(self) -> None:
        state = self._state
        if state.connected:
            state.ack()
            self._write.set()

    # -- the connection ---------------------------------------------------------------

    async def _supervise(self) -> None:
        # Failures end the session and are raised by the stream's methods, not by the
        # task group (they would escape the application's ``async with`` block).
        with self._scope:
            try:
                if self._connect is not None:
                    await self._client_loop()
                else:
                    await self._server_loop()
            except Exception as exc:
                self._fail(exc)

    def _broke(self, cause: BaseException | None) -> None:
        self._state.connection_lost()
        self._breaks += 1
        if self.on_break is not None:
            self.on_break(cause)

    async def _client_loop(self) -> None:
        assert self._connect is not None
        delay = self.backoff[0]
        deadline = time.monotonic() + self.give_up_after
        cause: BaseException | None = None
        while self._error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionLost(
                    f"no transport for {self.give_up_after} s (last error: {cause!r})"
                ) from cause
            try:
                with anyio.fail_after(left):
                    transport = await self._connect()
            except _CONNECT_ERRORS as exc:
                cause = exc
                await anyio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, self.backoff[1])
                continue
            self._state.connect()
            was_up, cause = await self._run(transport, b"")
            if self._error is not None or self._state.finished:
                return  # (both sides sent EOF and have everything: nothing to resume)
            if was_up:
                delay = self.backoff[0]
                deadline = time.monotonic() + self.give_up_after
            self._broke(cause)

    async def _server_loop(self) -> None:
        deadline = time.monotonic() + self.give_up_after
        while self._error is None:
            offer = self._offer
            if offer is None:
                self._offered.clear()
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    await self._offered.wait()
                if self._offer is None and self._error is None:
                    raise SessionLost(f"the client did not resume within {self.give_up_after} s")
                continue
            self._offer = None
            transport, hello, rest = offer
            try:
                self._state.accept(hello)
            except RemoteProtocolError as exc:
                # (Checked by the listener, but the state moved since: e.g. an ack.)
                await _refuse(transport, str(exc))
                continue
            self._resumes += self._state.epoch > 0
            # The HELLO's resume point acknowledged records (whose own ack may have been
            # lost with the old connection): a send waiting for the window may go on.
            self._window.set()
            _, cause = await self._run(transport, rest)
            if self._error is not None or self._state.finished:
                return
            self._broke(cause)
            deadline = time.monotonic() + self.give_up_after

    async def _run(self, transport: ByteStream, rest: bytes) -> tuple[bool, BaseException | None]:
        """Serve one transport until it breaks (or the stream closes): whether the
        handshake completed, and what broke it.  Nothing but cancellation escapes."""
        self._transport = transport
        self._welcomed = self._state.connected  # (the server's handshake is done)
        outcome: list[BaseException | None] = []
        fatal: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._conn_scope = tg.cancel_scope
                if self._error is not None:
                    tg.cancel_scope.cancel()
                tg.start_soon(self._writer, transport, outcome)
                if not self._welcomed:
                    tg.start_soon(self._handshake_watchdog, tg.cancel_scope, outcome)
                if self.keepalive is not None:
                    self._last_heard = anyio.current_time()
                    tg.start_soon(self._keepalive, self.keepalive, tg.cancel_scope, outcome)
                try:
                    if rest:
                        self._feed(rest)
                    while True:
                        self._feed(await transport.receive())
                except RemoteProtocolError as exc:
                    # (First: SessionRefused is also a BrokenResourceError.)
                    fatal = exc
                except _TRANSPORT_ERRORS as exc:
                    outcome.append(exc)
                tg.cancel_scope.cancel()
        finally:
            self._conn_scope = None
            self._transport = None
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        if fatal is not None:
            self._fail(fatal)
        return self._welcomed, outcome[0] if outcome else None

    async def _keepalive(
        self, interval: float, scope: anyio.CancelScope, outcome: list[BaseException | None]
    ) -> None:
        while True:
            await anyio.sleep(interval)
            silent = anyio.current_time() - self._last_heard
            if silent >= 3 * interval:
                outcome.append(TimeoutError(f"nothing received for {silent:.1f} s"))
                scope.cancel()
                return
            self._state.ping()
            self._write.set()

    async def _handshake_watchdog(
        self, scope: anyio.CancelScope, outcome: list[BaseException | None]
    ) -> None:
        await anyio.sleep(self.handshake_timeout)
        if not self._state.connected:
            outcome.append(TimeoutError("the resume handshake took too long"))
            scope.cancel()

    async def _writer(self, transport: ByteStream, outcome: list[BaseException | None]) -> None:
        state = self._state
        try:
            while True:
                self._write.clear()
                data = state.data_to_send()
                if data:
                    await transport.send(data)
                else:
                    if self._closing:
                        self._flushed.set()
                    await self._write.wait()
                    if self._error is not None:
                        return
        except _TRANSPORT_ERRORS as exc:
            outcome.append(exc)
            # Wake the reader: the transport is gone both ways.
            if self._conn_scope is not None:
                self._conn_scope.cancel()

    def _feed(self, data: bytes) -> None:
        state = self._state
        if self.keepalive is not None:
            self._last_heard = anyio.current_time()
        for event in state.receive_data(data):
            if type(event) is Record:
                self._inbox.append(event)
                self._records_received += 1
                self._bytes_received += len(event.data)
                self._data.set()
            elif type(event) is Acked:
                self._window.set()
            elif type(event) is Welcome:
                if event.epoch > 0:
                    self._resumes += 1
                self._welcomed = True
                self._window.set()  # (the WELCOME acknowledged records)
                self._up.set()
            elif type(event) is Refused:
                raise SessionRefused(f"the server refused the session: {event.reason}")
        self._write.set()  # (the handshake and replay, or acks due)
        if state.ack_due():
            state.ack()


async def _refuse(transport: ByteStream, reason: str) -> None:
    with anyio.move_on_after(1, shield=True):
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            await transport.send(encode_refuse(reason))
    with anyio.CancelScope(shield=True):
        await transport.aclose()


class ResumableListener:
    """Accepts resumable sessions over ``listener`` (an :class:`anyio.abc.Listener`, e.g.
    of :func:`anyio.create_tcp_listener`, or anything with ``accept()`` returning a byte
    stream and ``aclose()``: a :class:`gntipc.Listener`...),
    and routes each resume to its session: by the session id, checked against the
    session's secret (a wrong secret or an unknown session is refused: the client
    raises :class:`SessionRefused`).

    Use it as an async context manager (it accepts in a task group it owns); closing it
    closes ``listener``, and the sessions not accepted yet.  The streams accepted are
    the caller's to close.

    Args:
        listener: the transport listener (the resumable listener owns it).
        window_records: each session's replay window, in records (see
            :meth:`ResumableStream.client`).
        window_bytes: each session's replay window, in bytes.
        give_up_after: seconds a session waits for its client to resume after a break.
        handshake_timeout: seconds a new transport may take to send its HELLO.
        keepalive: as for :meth:`ResumableStream.client`.
        linger: as for :meth:`ResumableStream.client`.
        auto_commit: as for :meth:`ResumableStream.client`.
        on_break: as for :meth:`ResumableStream.client`, for every session.
        backlog: sessions started and not accepted yet, at most (more are refused).
        identify: ``await identify(transport)``: who is at the other end of a new
            transport (any comparable value; None: nobody in particular).  A session
            is bound to the identity its first transport had: a resume over a
            transport whose identity differs is refused.  The default: over a
            :class:`gntipc.VchanStream`, the UUID of the client's VM in XenStore
            (:func:`gntipc.vm.vm_of_domain`; None if the store does not say, e.g. to an
            unprivileged server), so a session survives its VM's restore or migration
            under a new domid and no other domain can take it over; None over other
            transports (the secret alone).  A transport that cannot be identified (the
            call fails, or says None for a session bound to an identity: a domain
            dying in a restore) is dropped without refusing the session: the client
            tries again (the listener's ``dropped`` counts them).
    """

    def __init__(
        self,
        listener: _Acceptor | Listener[ByteStream],
        *,
        window_records: int = DEFAULT_WINDOW_RECORDS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        give_up_after: float = 30.0,
        handshake_timeout: float = 5.0,
        keepalive: float | None = 10.0,
        linger: float = 5.0,
        auto_commit: bool = True,
        on_break: Callable[[BaseException | None], object] | None = None,
        backlog: int = 16,
        identify: Callable[[ByteStream], Awaitable[object]] | None = None,
    ) -> None:
        self._listener = listener
        self._identify = identify if identify is not None else vm_identity
        #: The identity of each session's client (see ``identify``).
        self._identities: dict[bytes, object] = {}
        self._window = (window_records, window_bytes)
        self._give_up_after = give_up_after
        self._handshake_timeout = handshake_timeout
        self._keepalive = keepalive
        self._linger = linger
        self._accept_error: BaseException | None = None
        self.auto_commit = auto_commit
        self.on_break = on_break
        self._sessions: dict[bytes, ResumableStream] = {}
        self._send, self._accepted = anyio.create_memory_object_stream[ResumableStream](backlog)
        self._tg: TaskGroup | None = None
        # Our tasks' scopes (the task group's own encloses the application's block).
        self._scopes: set[anyio.CancelScope] = set()
        self._closed = False
        #: Transports refused (wrong secret, unknown session, bad HELLO, another VM...).
        self.refused = 0
        #: Transports dropped without a refusal: whom they came from could not be told
        #: (``identify`` failed, or said None for a session bound to an identity).
        self.dropped = 0

    async def __aenter__(self) -> Self:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._accept_loop, tg)  # (the handshakes run in tg too)
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
                await tg.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Stop accepting (idempotent); close the transport listener and the sessions
        not accepted yet."""
        if self._closed:
            return
        self._closed = True
        for scope in self._scopes:
            scope.cancel()
        self._send.close()
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    stream = self._accepted.receive_nowait()
                except (anyio.WouldBlock, EndOfStream, ClosedResourceError):
                    break
                await stream.aclose()
            self._accepted.close()
            await self._listener.aclose()

    async def accept(self) -> ResumableStream:
        """The next new session (enter it with ``async with``); waits for one.

        If the transport listener failed, its error is raised (once the sessions
        accepted before it were returned).

        Raises:
            anyio.ClosedResourceError: the listener is closed.
        """
        try:
            return await self._accepted.receive()
        except EndOfStream:
            if self._accept_error is not None:
                raise self._accept_error from None
            raise ClosedResourceError from None

    def _forget(self, stream: ResumableStream) -> None:
        if self._sessions.get(stream._state.session_id) is stream:
            del self._sessions[stream._state.session_id]
            self._identities.pop(stream._state.session_id, None)

    async def _accept_loop(self, tg: TaskGroup) -> None:
        listener = self._listener
        with self._task_scope():
            try:
                if isinstance(listener, Listener):
                    await listener.serve(self._handshake, tg)
                else:
                    while True:
                        tg.start_soon(self._handshake, await listener.accept())
            except Exception as exc:
                # (Raised by accept(), not by the task group.)
                self._accept_error = exc
                self._send.close()

    @contextlib.contextmanager
    def _task_scope(self) -> Iterator[None]:
        with anyio.CancelScope() as scope:
            if self._closed:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield
            finally:
                self._scopes.discard(scope)

    async def _handshake(self, transport: ByteStream) -> None:
        handed = False
        try:
            with self._task_scope():
                handed = await self._handshake_in_scope(transport)
        finally:
            if not handed:  # (refused, failed or cancelled: the transport is ours)
                with anyio.CancelScope(shield=True):
                    await transport.aclose()

    async def _handshake_in_scope(self, transport: ByteStream) -> bool:
        """Read the HELLO, route it; whether ``transport`` was handed to a session."""
        buf = b""
        try:
            with anyio.fail_after(self._handshake_timeout):
                while (decoded := decode_hello(buf)) is None:
                    buf += await transport.receive(HEADER_SIZE + HANDSHAKE_SIZE)
        except (*_TRANSPORT_ERRORS, TimeoutError):
            return False
        except RemoteProtocolError as exc:
            self.refused += 1
            await _refuse(transport, str(exc))
            return False
        hello, rest = decoded
        try:
            identity = await self._identify(transport)
        except (*_TRANSPORT_ERRORS, GntipcError):
            # Not a verdict on the client (e.g. the store did not answer): drop this
            # transport without refusing the session; the client tries again.
            self.dropped += 1
            return False
        stream = self._sessions.get(hello.session_id)
        try:
            if stream is None:
                if not hello.new:
                    raise RemoteProtocolError("unknown session (expired, or another server)")
                # (The stream's loop accepts the HELLO once the application enters it.)
                state = ResumeState(
                    is_client=False,
                    session_id=hello.session_id,
                    secret=hello.secret,
                    window_records=self._window[0],
                    window_bytes=self._window[1],
                )
                state.check_hello(hello)
                stream = ResumableStream(
                    state,
                    give_up_after=self._give_up_after,
                    handshake_timeout=self._handshake_timeout,
                    keepalive=self._keepalive,
                    linger=self._linger,
                    auto_commit=self.auto_commit,
                    on_break=self.on_break,
                    _listener=self,
                )
                try:
                    self._send.send_nowait(stream)
                except anyio.WouldBlock:
                    raise RemoteProtocolError("too many sessions waiting to be accepted") from None
                except (ClosedResourceError, BrokenResourceError):
                    raise RemoteProtocolError("the listener is closing") from None
                self._sessions[hello.session_id] = stream
                self._identities[hello.session_id] = identity
            else:
                stream._state.check_hello(hello)
                owner = self._identities.get(hello.session_id)
                if identity is None and owner is not None:
                    # We cannot tell who this is now (e.g. a domain dying in a restore:
                    # its home is gone): drop the transport, refuse nothing; the client
                    # comes back from where it is now.
                    self.dropped += 1
                    return False
                if identity != owner:
                    raise RemoteProtocolError(
                        f"the session belongs to {_who(owner)}; this connection comes"
                        f" from {_who(identity)}"
                    )
                if stream._error is not None:
                    # (Its server side gave up or was closed: the client must know.)
                    raise RemoteProtocolError(f"session over ({stream._error!r})")
        except RemoteProtocolError as exc:
            self.refused += 1
            await _refuse(transport, str(exc))
            return False
        old = stream._offer
        stream._offer = (transport, hello, rest)
        stream._offered.set()
        if stream._conn_scope is not None:
            stream._conn_scope.cancel()  # (a newer transport replaces it)
        if old is not None:
            with anyio.CancelScope(shield=True):
                await old[0].aclose()
        if stream._closed:
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        return True


def _who(identity: object) -> str:
    return "nobody in particular" if identity is None else f"VM {identity}"


async def vm_identity(transport: ByteStream) -> str | None:
    """The default ``identify`` of :class:`ResumableListener`: over a
    :class:`gntipc.VchanStream`, the UUID of the peer domain's VM in XenStore (None if the
    store does not say); None over any other transport.

    Raises:
        gntipc.XenStoreTimeout: the store did not answer in time.
    """
    if not isinstance(transport, VchanStream):
        return None
    vchan = transport.vchan
    return await _astore.run(
        vm_of_domain,
        vchan.backend.store,
        vchan.peer,
        what=f"reading the VM of domain {vchan.peer}",
    )
