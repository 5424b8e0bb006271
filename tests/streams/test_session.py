"""Sessions: many logical streams over one vchan, each with its own flow control.

Both sessions live in this process over a loopback vchan pair (every backend, asyncio and
trio); test_session_crossproc-style tests at the end run the peer in another process.
Hostile-frame tests write raw frames into the vchan under a session."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio import BrokenResourceError, BusyResourceError, ClosedResourceError, EndOfStream
from anyio.abc import Process
from anyio.lowlevel import checkpoint
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.stapled import StapledByteStream
from conftest import PairFactory, check_send_receive, fresh_path

import gntipc
from gntipc import RemoteProtocolError, Session, SessionStream, VchanAttribute
from gntipc.backends import Backend

pytestmark = pytest.mark.anyio

WINDOW = 256 * 1024


@asynccontextmanager
async def sessions(make_pair: PairFactory, **kwargs: int) -> AsyncIterator[tuple[Session, Session]]:
    """(server session, client session) over one loopback vchan."""
    srv, cli = await make_pair()
    async with Session(srv, **kwargs) as s, Session(cli, **kwargs) as c:
        yield s, c


async def drain(stream: anyio.abc.ByteReceiveStream, max_bytes: int = 65536) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await stream.receive(max_bytes)
        except EndOfStream:
            return bytes(out)


async def test_open_accept_both_ways(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        assert c.is_initiator and not s.is_initiator
        a = await c.open_stream()
        b = await s.accept_stream()
        async with a, b:
            assert isinstance(a, anyio.abc.ByteStream)
            assert (a.stream_id, b.stream_id) == (1, 1)
            await check_send_receive(a, b)
            # the responder opens too, with even ids
            x = await s.open_stream()
            y = await c.accept_stream()
            async with x, y:
                assert x.stream_id == y.stream_id == 2
                await x.send(b"ping")
                assert await y.receive() == b"ping"
            # extra attributes are those of the vchan
            assert a.extra(VchanAttribute.is_server) is False
            assert b.extra(VchanAttribute.is_server) is True


async def test_fifty_streams_in_parallel_both_ways(make_pair: PairFactory) -> None:
    n = 50
    up = {i: random.Random(i).randbytes(20_000 + 997 * i) for i in range(n)}
    down = {i: random.Random(1000 + i).randbytes(30_000 - 311 * i) for i in range(n)}
    got_up: dict[int, bytes] = {}
    got_down: dict[int, bytes] = {}

    async def client_side(c: Session, i: int) -> None:
        async with await c.open_stream() as st:
            await st.send(i.to_bytes(4, "little"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all, st, up[i], 4099)
                got_down[i] = await drain(st, 3000)

    async def server_side(st: SessionStream) -> None:
        async with st:
            i = int.from_bytes(await receive_exactly(st, 4), "little")
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all, st, down[i], 65536 + 5)
                got_up[i] = await drain(st)

    with anyio.fail_after(60):
        async with sessions(make_pair) as (s, c), anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(client_side, c, i)
            for _ in range(n):
                tg.start_soon(server_side, await s.accept_stream())
    assert got_up == up
    assert got_down == down


async def send_all(stream: anyio.abc.ByteSendStream, data: bytes, piece: int) -> None:
    for pos in range(0, len(data), piece):
        await stream.send(data[pos : pos + piece])
    await stream.send_eof()


async def receive_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += await stream.receive(n - len(out))
    return out


async def test_a_stalled_stream_does_not_block_the_others(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        stalled_tx = await c.open_stream()
        stalled_rx = await s.accept_stream()
        async with stalled_tx, stalled_rx:
            blob = random.Random(7).randbytes(3 * WINDOW)
            stuck_done = anyio.Event()

            async def stuck_sender() -> None:
                await stalled_tx.send(blob)  # more than the window: blocks until read
                stuck_done.set()

            results: dict[int, bytes] = {}
            payload = random.Random(8).randbytes(2 * 1024 * 1024)

            async def flow(i: int) -> None:
                async with await c.open_stream() as tx:
                    await send_all(tx, payload, 65536)

            async def sink() -> None:
                async with await s.accept_stream() as rx:
                    results[rx.stream_id] = await drain(rx)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as outer:
                    outer.start_soon(stuck_sender)
                    await anyio.sleep(0.05)
                    async with anyio.create_task_group() as tg:
                        for i in range(4):
                            tg.start_soon(flow, i)
                            tg.start_soon(sink)
                    # the others delivered 8 MiB while the stalled one could not move
                    assert not stuck_done.is_set()
                    assert stalled_tx.send_progress == WINDOW
                    assert len(results) == 4
                    assert all(v == payload for v in results.values())
                    # now read the stalled stream: its sender completes, bytes intact
                    got = await receive_exactly(stalled_rx, len(blob))
                    await stuck_done.wait()
            assert got == blob


async def test_half_close_per_stream(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        other_a = await c.open_stream()
        other_b = await s.accept_stream()
        async with a, b, other_a, other_b:
            await a.send(b"request")
            await a.send_eof()
            await a.send_eof()  # idempotent
            with pytest.raises(ClosedResourceError):
                await a.send(b"more")
            assert await drain(b) == b"request"
            with pytest.raises(EndOfStream):
                await b.receive()
            # the other direction, and the other stream, keep flowing
            await b.send(b"reply")
            assert await a.receive() == b"reply"
            await other_a.send(b"unaffected")
            assert await other_b.receive() == b"unaffected"
            await b.send_eof()
            with pytest.raises(EndOfStream):
                await a.receive()


async def test_stream_close_semantics(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        async with b:
            await a.send(b"before close")
            await a.aclose()
            await a.aclose()  # idempotent
            assert a.closed
            for op in (a.send(b"x"), a.receive(), a.send_eof()):
                with pytest.raises(ClosedResourceError):
                    await op
            # the peer drains every byte sent before the close, then a clean end
            assert await drain(b) == b"before close"
            with anyio.fail_after(5):
                while True:  # the RESET arrives after the EOF
                    try:
                        await b.send(b"anyone there?")
                    except BrokenResourceError:
                        break
                    await anyio.sleep(0.01)
        # both sides forgot the stream: ids and slots are freed
        with anyio.fail_after(5):
            while c._streams or s._streams:
                await anyio.sleep(0.01)


async def test_close_wakes_blocked_tasks_and_busy(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        async with b:
            errors: list[type[BaseException]] = []

            async def blocked(op: object) -> None:
                try:
                    await op  # type: ignore[misc]
                except ClosedResourceError as exc:
                    errors.append(type(exc))

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(blocked, a.receive())
                    tg.start_soon(blocked, a.send(b"z" * (WINDOW + 10)))
                    await anyio.sleep(0.05)
                    with pytest.raises(BusyResourceError):
                        await a.receive()
                    with pytest.raises(BusyResourceError):
                        await a.send(b"y")
                    await a.aclose()
            assert errors == [ClosedResourceError, ClosedResourceError]


async def test_cancellation_never_corrupts_the_session(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        async with a, b:
            # a cancelled receive consumes nothing
            with anyio.move_on_after(0.05) as scope:
                await b.receive()
            assert scope.cancelled_caught
            # fill the window, then an item of at most half the window that does not fit
            # is cancelled having sent nothing
            await a.send(b"a" * (WINDOW - 100))
            with anyio.move_on_after(0.05) as scope:
                await a.send(b"b" * 1000)
            assert scope.cancelled_caught and a.send_progress == 0
            # a larger item sends a prefix, reported in send_progress
            assert await receive_exactly(b, WINDOW // 2) == b"a" * (WINDOW // 2)
            with anyio.move_on_after(0.1) as scope:
                await a.send(b"c" * (WINDOW + 1000))
            assert scope.cancelled_caught
            sent = a.send_progress
            assert 0 < sent < WINDOW + 1000
            got = bytearray()

            async def collect() -> None:
                got.extend(await drain(b))

            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                await a.send(b"tail")
                await a.send_eof()
            assert got == b"a" * (WINDOW - 100 - WINDOW // 2) + b"c" * sent + b"tail"
            # many cancelled sends/receives racing on other streams leave it consistent
            x = await c.open_stream()
            y = await s.accept_stream()
            async with x, y:
                # What was sent (each send's prefix, send_progress bytes) must arrive
                # exactly: nothing lost, duplicated or reordered.
                sent = bytearray()
                got = bytearray()
                for i in range(30):
                    with anyio.move_on_after(0.001 * (i % 3)):
                        await x.send(bytes([i]) * 50_000)
                    sent += bytes([i]) * x.send_progress
                    with anyio.move_on_after(0.001 * (i % 4)):
                        got += await y.receive()
                await x.send(b"end")
                await x.send_eof()
                got += await drain(y)
                assert len(got) == len(sent) + 3
                assert got == sent + b"end"


async def test_open_waits_for_a_free_slot(make_pair: PairFactory) -> None:
    async with sessions(make_pair, max_streams=2) as (s, c):
        a1, a2 = await c.open_stream(), await c.open_stream()
        b1, b2 = await s.accept_stream(), await s.accept_stream()
        async with a2, b1, b2:
            with anyio.move_on_after(0.1) as scope:
                await c.open_stream()
            assert scope.cancelled_caught  # the peer's limit is reached
            await a1.aclose()
            await b1.aclose()
            with anyio.fail_after(5):
                async with await c.open_stream() as a3, await s.accept_stream() as b3:
                    assert a3.stream_id == 5
                    await a3.send(b"third")
                    assert await b3.receive() == b"third"


async def test_session_close_fails_every_stream(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        a1, a2 = await c.open_stream(), await c.open_stream()
        b1, b2 = await s.accept_stream(), await s.accept_stream()
        await a1.send(b"last words")
        await a1.send_eof()
        await a2.send(b"cut off")
        errors: list[type[BaseException]] = []

        async def wait_receive(st: SessionStream) -> None:
            try:
                await st.receive()
            except Exception as exc:
                errors.append(type(exc))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_receive, a1)
                await anyio.sleep(0.02)
                await c.aclose()
        await c.aclose()  # idempotent
        assert errors == [ClosedResourceError]
        for op in (a2.send(b"x"), a2.receive(), c.open_stream(), c.accept_stream()):
            with pytest.raises(ClosedResourceError):
                await op
        # the peer reads everything sent before the close, then the right end
        assert await drain(b1) == b"last words"
        assert await b2.receive() == b"cut off"
        with pytest.raises(BrokenResourceError):
            await b2.receive()
        with pytest.raises(BrokenResourceError):
            await b2.send(b"x")
        with pytest.raises(EndOfStream):
            await s.accept_stream()
        assert isinstance(s.error, EndOfStream)
        for st in (a1, a2, b1, b2):
            await st.aclose()


async def test_both_initiators_is_a_protocol_error(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    async with Session(srv, is_initiator=True) as s, Session(cli) as c, await c.open_stream():
        with anyio.fail_after(5), pytest.raises(RemoteProtocolError, match="parity"):
            await s.accept_stream()


async def test_bad_arguments(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    with pytest.raises(gntipc.LocalProtocolError):
        Session(srv, window=100)
    with pytest.raises(gntipc.LocalProtocolError):
        Session(srv, max_streams=0)
    session = Session(cli)
    with pytest.raises(RuntimeError):
        await session.open_stream()
    await session.aclose()
    assert cli.closed  # the session owns its stream
    with pytest.raises(ClosedResourceError):
        async with session:
            pass


async def test_default_window_is_the_receive_ring_if_larger(make_pair: PairFactory) -> None:
    # One logical stream may keep the ring as full as the bare stream would: with the
    # 256 KiB default on a 1 MiB ring, a fast sender waited for credit once per grant and
    # left the receiver idle while the grant woke it (issue 18).
    srv, cli = await make_pair(read_size=1 << 20)  # the client reads a 64 KiB ring
    async with Session(srv) as s, Session(cli) as c:
        assert (s.window, c.window) == (1 << 20, WINDOW)
        assert Session(ScriptedStream(b"", 1), is_initiator=True).window == WINDOW
        a = await c.open_stream()
        b = await s.accept_stream()
        async with a, b:
            # the whole window goes out before the receiver reads anything (with a
            # 256 KiB window the send would wait for credit forever: the guard fails it)
            with anyio.fail_after(10):
                await a.send(b"w" * (1 << 20))
            assert await receive_exactly(b, 1 << 20) == b"w" * (1 << 20)


async def test_a_grant_is_written_by_the_receive_that_earns_it(make_pair: PairFactory) -> None:
    # A WINDOW frame goes out from the receive that consumed the quarter of the window,
    # not through the writer task: no task switch, and the sender waiting for it gets it
    # at once (issue 18).
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        async with a, b:
            quarter = s.window // 4
            await a.send(b"g" * quarter)
            assert await receive_exactly(b, quarter - 1) == b"g" * (quarter - 1)
            before = s.statistics()
            assert await b.receive(1) == b"g"  # the quarter: the grant
            after = s.statistics()
            assert (after.writes, after.queued_frames) == (before.writes + 1, 0)
            assert after.bytes_sent == before.bytes_sent + gntipc.session.HEADER_SIZE


# -- hostile frames -----------------------------------------------------------------------

H = struct.Struct("<BBHII")
HELLO_OK = b"GMUX" + struct.pack("<HHII", 1, 0, 65536, 16)
T_HELLO, T_OPEN, T_DATA, T_WINDOW, T_EOF, T_RESET, T_GOAWAY = range(7)


def frame(t: int, sid: int = 0, value: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return H.pack(t, flags, 0, sid, value) + payload


HELLO = frame(T_HELLO, 0, len(HELLO_OK), HELLO_OK)
OPEN_1 = HELLO + frame(T_OPEN, 1)

HOSTILE = {
    "no-hello": (frame(T_OPEN, 1), "before HELLO"),
    "bad-magic": (frame(T_HELLO, 0, 16, b"HTTP" + HELLO_OK[4:]), "magic"),
    "bad-version": (
        frame(T_HELLO, 0, 16, b"GMUX" + struct.pack("<HHII", 9, 0, 65536, 1)),
        "version",
    ),
    "unknown-type": (HELLO + frame(9, 1), "unknown frame type"),
    "flags": (HELLO + frame(T_OPEN, 1, flags=4), "nonzero flags"),
    "unknown-id": (OPEN_1 + frame(T_DATA, 3, 2, b"hi"), "unknown stream id 3"),
    "unknown-id-window": (HELLO + frame(T_WINDOW, 7, 100), "unknown stream id 7"),
    "oversize": (OPEN_1 + frame(T_DATA, 1, 0xFFFFFFF0), "oversize"),
    "empty-data": (OPEN_1 + frame(T_DATA, 1, 0), "empty DATA"),
    "credit-overflow": (OPEN_1 + frame(T_WINDOW, 1, 1), "credit overflow"),
    "credit-wrap": (OPEN_1 + frame(T_WINDOW, 1, 0xFFFFFFFF), "credit overflow"),
    "flow-control": (
        OPEN_1 + b"".join(frame(T_DATA, 1, 65536, b"x" * 65536) for _ in range(5)),
        "flow control violated",
    ),
    "our-parity": (HELLO + frame(T_OPEN, 2), "parity"),
    "id-reuse": (OPEN_1 + frame(T_OPEN, 3) + frame(T_OPEN, 1), "not above"),
    "data-after-eof": (OPEN_1 + frame(T_EOF, 1) + frame(T_DATA, 1, 1, b"x"), "after its EOF"),
    "after-reset": (OPEN_1 + frame(T_RESET, 1) + frame(T_EOF, 1), "after its RESET"),
    "stream-zero": (HELLO + frame(T_DATA, 0, 1, b"x"), "stream id 0"),
    "too-many": (
        HELLO + b"".join(frame(T_OPEN, 2 * i + 1) for i in range(5)),
        "more than 4 streams",
    ),
    "truncated": (OPEN_1 + frame(T_DATA, 1, 10, b"abc"), "inside a frame"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_frames_raise_remote_protocol_error(
    make_pair: PairFactory, case: str
) -> None:
    raw_data, message = HOSTILE[case]
    srv, raw = await make_pair(read_size=1 << 20)
    # the window the cases are written for (a 1 MiB ring would make it 1 MiB)
    async with Session(srv, max_streams=4, window=WINDOW) as s:
        await raw.send(raw_data)
        if case == "truncated":
            await raw.send_eof()
        with anyio.fail_after(5):
            with pytest.raises(RemoteProtocolError, match=message):
                while True:  # streams opened before the bad frame are accepted first
                    st = await s.accept_stream()
                    await st.aclose()
        assert isinstance(s.error, RemoteProtocolError)
        with pytest.raises(RemoteProtocolError):
            await s.open_stream()
        # the session closed the vchan: the raw peer sees the end (after our HELLO)
        with anyio.fail_after(5):
            await drain(raw)


async def test_protocol_error_fails_open_streams(make_pair: PairFactory) -> None:
    srv, raw = await make_pair()
    async with Session(srv) as s:
        await raw.send(OPEN_1 + frame(T_DATA, 1, 3, b"abc"))
        async with await s.accept_stream() as st:
            assert await st.receive() == b"abc"
            await raw.send(frame(T_WINDOW, 1, 1 << 20))
            with anyio.fail_after(5), pytest.raises(RemoteProtocolError, match="credit"):
                await st.receive()
            with pytest.raises(RemoteProtocolError):
                await st.send(b"x")


# -- a peer that stops reading, frames in tiny pieces (issue 10) ----------------------------


class PausableStream(anyio.abc.ByteStream):
    """The peer's side of the vchan; while paused, the peer's session reads nothing (a
    chunk it is receiving when paused is held back too)."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.running = anyio.Event()
        self.running.set()

    def pause(self) -> None:
        self.running = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await self.running.wait()
        data = await self.stream.receive(max_bytes)
        await self.running.wait()
        return data

    async def send(self, item: bytes) -> None:
        await self.stream.send(item)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _resume_after(stream: PausableStream, delay: float) -> None:
    await anyio.sleep(delay)
    stream.running.set()


async def test_send_to_a_peer_that_stopped_reading_can_be_cancelled(
    make_pair: PairFactory,
) -> None:
    # The peer's session stops reading the vchan altogether.  A send used to block in a
    # shielded write holding the session's write lock: no timeout could get it (or any
    # other sender, or the control frames) out until the session was closed.
    srv, cli = await make_pair()
    peer_stream = PausableStream(srv)
    async with (
        Session(cli) as c,
        Session(peer_stream, is_initiator=False, window=1 << 20) as s,
        anyio.create_task_group() as watchdog,
    ):
        # never hang, even if cancellation does not work
        watchdog.start_soon(_resume_after, peer_stream, 6.0)
        a, x_peer = await c.open_stream(), await s.open_stream()
        a_peer, x = await s.accept_stream(), await c.accept_stream()
        await a.send(b"before|")
        assert await receive_exactly(a_peer, 7) == b"before|"
        peer_stream.pause()
        blob = random.Random(3).randbytes(400_000)  # one piece, far more than the ring
        start = anyio.current_time()
        with anyio.move_on_after(1) as scope:
            await a.send(blob)
        assert scope.cancelled_caught
        # returned at the timeout, not when the watchdog resumes the peer (6 s)
        assert anyio.current_time() - start < 5.0
        # the piece the writer had started on goes out whole
        assert a.send_progress == len(blob)
        # other senders queue behind it and can give up too, having sent nothing
        for st in (a, x):
            with anyio.move_on_after(0.2) as scope:
                await st.send(b"never sent")
            assert scope.cancelled_caught and st.send_progress == 0
        # receiving keeps working, on every stream
        await x_peer.send(b"down")
        with anyio.fail_after(5):
            assert await receive_exactly(x, 4) == b"down"
        # the peer reads again: everything arrives in order, the framing intact
        peer_stream.running.set()
        with anyio.fail_after(10):
            await a.send(b"|after")
            await x.send(b"up")
            assert await receive_exactly(a_peer, len(blob) + 6) == blob + b"|after"
            assert await receive_exactly(x_peer, 2) == b"up"
        assert c.error is None and s.error is None
        watchdog.cancel_scope.cancel()
        for st in (a, a_peer, x, x_peer):
            await st.aclose()


async def test_close_while_the_peer_stopped_reading(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    peer_stream = PausableStream(srv)
    errors: list[type[BaseException]] = []

    async def blocked(st: SessionStream) -> None:
        try:
            await st.send(b"b" * 400_000)
        except ClosedResourceError as exc:
            errors.append(type(exc))

    async with (
        Session(peer_stream, is_initiator=False, window=1 << 20) as s,
        anyio.create_task_group() as watchdog,
    ):
        watchdog.start_soon(_resume_after, peer_stream, 6.0)  # never hang
        async with Session(cli) as c:
            a, b = await c.open_stream(), await c.open_stream()
            peer_stream.pause()
            with anyio.fail_after(5):  # close flushes for at most 2 s
                async with anyio.create_task_group() as tg:
                    tg.start_soon(blocked, a)  # the writer gets stuck writing this
                    await anyio.sleep(0.1)
                    tg.start_soon(blocked, b)  # queued behind it
                    await anyio.sleep(0.1)
                    await b.aclose()  # a sender waiting in the queue is let go
                    while not errors:
                        await anyio.sleep(0.01)
                    assert errors == [ClosedResourceError]
                    await c.aclose()
        assert errors == [ClosedResourceError, ClosedResourceError]
        watchdog.cancel_scope.cancel()
        peer_stream.running.set()
        with anyio.fail_after(5):  # the peer sees the cut (a truncated frame, maybe)
            with pytest.raises((RemoteProtocolError, EndOfStream, BrokenResourceError)):
                while True:
                    await (await s.accept_stream()).aclose()
        for st in (a, b):
            await st.aclose()


class CountingChunk(bytes):
    """Received data that counts the bytes copied by concatenating onto it."""

    copied = 0

    def __radd__(self, other: bytes) -> bytes:
        CountingChunk.copied += len(other) + len(self)
        return bytes(other) + bytes(self)


class ScriptedStream(anyio.abc.ByteStream):
    """A peer whose bytes arrive ``piece`` bytes at a time; then it ends (no EOF frame)."""

    def __init__(self, wire: bytes, piece: int) -> None:
        self.chunks = [CountingChunk(wire[i : i + piece]) for i in range(0, len(wire), piece)]
        self.chunks.reverse()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await checkpoint()
        if not self.chunks:
            raise EndOfStream
        return self.chunks.pop()

    async def send(self, item: bytes) -> None:
        await checkpoint()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_reader_joins_a_frame_in_many_pieces_once() -> None:
    # 64 KiB DATA frames arriving 64 bytes at a time: the reader used to re-copy the
    # partial frame with every piece (rest + chunk: 32 MiB of copying per frame).
    size = gntipc.session.MAX_FRAME
    payload = random.Random(5).randbytes(8 * size)
    wire = HELLO + frame(T_OPEN, 1)
    wire += b"".join(
        frame(T_DATA, 1, size, payload[i : i + size]) for i in range(0, 8 * size, size)
    )
    CountingChunk.copied = 0
    async with Session(ScriptedStream(wire, 64), is_initiator=False, window=1 << 20) as s:
        with anyio.fail_after(20):
            async with await s.accept_stream() as st:
                assert await receive_exactly(st, len(payload)) == payload
                with pytest.raises(BrokenResourceError):
                    await st.receive()  # the scripted peer ended without EOF
    assert CountingChunk.copied <= len(wire)


# -- cross-process ------------------------------------------------------------------------

PEER_SCRIPT = str(Path(__file__).with_name("_session_peer.py"))
PEER_DOMID = 5


async def _start_peer(backend: Backend, loop: str, *args: object) -> tuple[Process, int]:
    peer_domid = backend.domid if backend.name == "xen" else PEER_DOMID
    env = dict(
        os.environ,
        GNTIPC_BACKEND=backend.name,
        GNTIPC_SIM_DOMID=str(peer_domid),
        GNTIPC_TEST_LOOP=loop,
    )
    src = str(Path(__file__).parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = await anyio.open_process(
        [sys.executable, PEER_SCRIPT, str(backend.domid), *map(str, args)],
        env=env,
        stderr=None,
    )
    return proc, peer_domid


async def _line(out: BufferedByteReceiveStream) -> str:
    with anyio.fail_after(30):
        return (await out.receive_until(b"\n", 1 << 16)).decode()


@pytest.mark.parametrize("backend_name", ["sim"])
async def test_peer_process_opens_many_streams_one_stalled_then_dies(
    backend: Backend, anyio_backend: str
) -> None:
    """A peer process opens 40 streams and a stalled one (it never reads it); each stream
    carries its own seeded payload up, and its digest comes back down.  Then kill -9: every
    remaining stream breaks."""
    n = 40
    path = fresh_path()
    peer_domid = backend.domid if backend.name == "xen" else PEER_DOMID
    async with await gntipc.listen(peer_domid, path, backend=backend) as listener:
        proc, _ = await _start_peer(backend, anyio_backend, path, n)
        try:
            assert proc.stdout is not None
            out = BufferedByteReceiveStream(proc.stdout)
            async with Session(await listener.accept()) as session:
                stalled = await session.accept_stream()
                assert await receive_exactly(stalled, 7) == b"stalled"
                stuck = anyio.Event()

                async def fill_stalled() -> None:
                    # the peer never reads: this blocks after the window, and breaks
                    # when the peer dies
                    try:
                        while True:
                            await stalled.send(b"s" * 65536)
                    except BrokenResourceError:
                        stuck.set()

                async def serve(st: SessionStream) -> None:
                    i = int.from_bytes(await receive_exactly(st, 4), "little")
                    data = await drain(st)
                    assert data == random.Random(i).randbytes(10_000 + 1000 * i)
                    await st.send(hashlib.sha256(data).digest())
                    await st.send_eof()
                    await st.aclose()

                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(fill_stalled)
                        async with anyio.create_task_group() as served:
                            for _ in range(n):
                                served.start_soon(serve, await session.accept_stream())
                        assert await _line(out) == f"verified {n}"
                        # one more stream, left open across the kill
                        last = await session.accept_stream()
                        assert await receive_exactly(last, 4) == b"last"
                        assert await _line(out) == "waiting"
                        assert not stuck.is_set()
                        proc.send_signal(signal.SIGKILL)
                        with anyio.fail_after(5):
                            await stuck.wait()
                            with pytest.raises(BrokenResourceError):
                                await last.receive()
                            with pytest.raises(BrokenResourceError):
                                await session.accept_stream()
                    assert isinstance(session.error, BrokenResourceError)
                await stalled.aclose()
                await last.aclose()
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.move_on_after(10, shield=True):
                await proc.wait()
            await proc.aclose()


async def test_unexpected_writer_error_is_recorded_and_ends_the_peer(
    make_pair: PairFactory,
) -> None:
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        boom = RuntimeError("an unexpected error from the stream")

        async def failing_send(data: bytes) -> None:
            raise boom

        stream = c._stream
        assert stream is not None
        stream.send = failing_send  # type: ignore[method-assign]
        with pytest.raises(BrokenResourceError) as info:
            await a.send(bytes(200_000))  # larger than the ring: goes through the writer
        assert info.value.__cause__ is boom
        assert c.closed and c.error is boom
        # the peer is not left waiting for the rest of a frame: it sees the end
        with anyio.fail_after(10), pytest.raises((BrokenResourceError, EndOfStream)):
            await drain(b)
        with anyio.fail_after(10):
            while not s.closed:
                await anyio.sleep(0.01)


# -- receiving without waiting (issue 18) ---------------------------------------------------


async def test_receive_nowait(make_pair: PairFactory) -> None:
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        async with a, b:
            with pytest.raises(anyio.WouldBlock):
                b.receive_nowait()
            with pytest.raises(ValueError):
                b.receive_nowait(0)
            await a.send(b"one")
            await a.send(b"two")
            assert await b.receive(2) == b"on"  # waits for the first piece
            got = b""
            with anyio.fail_after(10):
                while len(got) < 4:  # the rest, as it arrives, without waiting
                    with contextlib.suppress(anyio.WouldBlock):
                        got += b.receive_nowait(100)
                    await checkpoint()
            assert got == b"etwo"
            with pytest.raises(anyio.WouldBlock):
                b.receive_nowait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.receive)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(BusyResourceError):
                    b.receive_nowait()
                await a.send(b"x")
            await a.send_eof()
            with anyio.fail_after(10):
                while True:
                    try:
                        b.receive_nowait()
                    except anyio.WouldBlock:
                        await checkpoint()
                    except EndOfStream:
                        break
        with pytest.raises(ClosedResourceError):
            b.receive_nowait()


async def test_get_many_collects_what_arrived_in_many_pieces(make_pair: PairFactory) -> None:
    # MessageQueue.get_many takes every message already received, across DATA pieces
    # too large to be joined by one receive, with the stream's receive_nowait (without
    # it, a call returned the messages of one piece).
    async with sessions(make_pair) as (s, c):
        a = await c.open_stream()
        b = await s.accept_stream()
        tx, rx = gntipc.MessageQueue(a, bytes), gntipc.MessageQueue(b, bytes)
        async with tx, rx:
            batches = [[bytes([i]) * 1000] * 40 for i in range(3)]  # ~40 KB pieces
            for batch in batches:
                await tx.put_many(batch)
            with anyio.fail_after(10):
                while s.statistics().bytes_received < c.statistics().bytes_sent:
                    await anyio.sleep(0.001)
            assert await rx.get_many() == [m for batch in batches for m in batch]


class NowaitStream(anyio.abc.ByteStream):
    """A peer's bytes, all there at once, then nothing more (until closed); with a
    counted ``receive_nowait`` as a VchanStream has, which the session's reader uses
    while the application works through what was received."""

    def __init__(self, wire: bytes) -> None:
        self.wire = wire
        self.nowait_calls = 0
        self.closed = anyio.Event()

    def _take(self, max_bytes: int) -> bytes:
        data, self.wire = self.wire[:max_bytes], self.wire[max_bytes:]
        return data

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        self.nowait_calls += 1
        if not self.wire:
            raise anyio.WouldBlock
        return self._take(max_bytes)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await checkpoint()
        if not self.wire:
            await self.closed.wait()
            raise EndOfStream
        return self._take(max_bytes)

    async def send(self, item: bytes) -> None:
        await checkpoint()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed.set()


async def test_data_nobody_reads_does_not_keep_the_reader_looking() -> None:
    # The reader looks at the ring between the application's steps only while the
    # application takes what was received; data nobody reads must not make it poll for
    # longer than _LOOK_FOR (a busy loop in an idle process): then it waits in receive.
    stream = NowaitStream(OPEN_1 + frame(T_DATA, 1, 5, b"hello"))
    async with Session(stream, is_initiator=False) as s:
        st = await s.accept_stream()  # never read
        await anyio.sleep(10 * gntipc.session._LOOK_FOR)
        calls = stream.nowait_calls
        for _ in range(1000):
            await checkpoint()
        assert stream.nowait_calls == calls
        await st.aclose()


async def test_the_reader_looks_without_waiting_while_the_application_reads() -> None:
    # 64 DATA pieces of 1 KiB arrive in one chunk: while the application reads them one
    # by one (yielding between), the reader looks at the stream without waiting on it.
    wire = OPEN_1 + b"".join(frame(T_DATA, 1, 1024, bytes([i]) * 1024) for i in range(64))
    stream = NowaitStream(wire)
    async with Session(stream, is_initiator=False) as s:
        st = await s.accept_stream()
        got = bytearray()
        while len(got) < 64 * 1024:
            got += await st.receive(1024)
            await checkpoint()
        assert got == b"".join(bytes([i]) * 1024 for i in range(64))
        assert stream.nowait_calls >= 32
        await st.aclose()


class WindowsFail(StapledByteStream):
    """A VchanStream (both halves of the stapled stream) whose ``send_nowait`` fails
    unexpectedly on WINDOW frames (as a failing notification might), declaring the ring
    fast path as a wrapper may."""

    gntipc_fast_path = "ring"

    def send_nowait(self, item: bytes) -> None:
        if bytes(item[:1]) == bytes([T_WINDOW]):
            raise OSError("the notification failed")
        self.inner.send_nowait(item)

    def statistics(self) -> gntipc.VchanStreamStatistics:
        return self.inner.statistics()

    @property
    def inner(self) -> gntipc.VchanStream:
        assert isinstance(self.send_stream, gntipc.VchanStream)
        return self.send_stream


async def test_a_grant_that_fails_to_be_written_breaks_the_session(
    make_pair: PairFactory,
) -> None:
    # The receive that earned the grant returns its data; the unexpected error of the
    # grant's write takes the session down (as in the writer), never silently dropping
    # the credit (the peer would wait for it forever).
    srv, cli = await make_pair()
    async with Session(WindowsFail(srv, srv)) as s, Session(cli) as c:
        a = await c.open_stream()
        b = await s.accept_stream()
        async with a, b:
            quarter = s.window // 4
            await a.send(b"q" * quarter)
            assert await receive_exactly(b, quarter) == b"q" * quarter
            assert s.closed and isinstance(s.error, OSError)
            with pytest.raises(BrokenResourceError):
                await b.receive()
