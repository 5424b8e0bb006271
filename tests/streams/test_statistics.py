"""``statistics()`` of VchanStream, MessageQueue and Session: exact counts where they are
deterministic (bytes, messages, frames), sane relations otherwise (events, spins, waits,
high-water marks), on every backend, asyncio and trio."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import anyio
import msgspec
import pytest
from _pairs import stream_pair
from anyio import WouldBlock
from conftest import PairFactory

from gntipc import MalformedMessage, MessageQueue, Session, VchanState
from gntipc._stats import MessageQueueStatistics, SessionStatistics, VchanStreamStatistics
from gntipc.protocol.framing import MessageFramer
from gntipc.protocol.mux import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_WINDOW,
    HEADER_SIZE,
    FrameType,
    encode_frame,
    encode_hello,
)

pytestmark = pytest.mark.anyio


class Reading(msgspec.Struct):
    sensor: str
    value: float


def check_sane(st: VchanStreamStatistics) -> None:
    """The relations that hold whatever the scheduling."""
    for field in dataclasses.fields(st):
        value = getattr(st, field.name)
        if type(value) is int:
            assert value >= 0, field.name
    assert st.send_spin_hits <= st.send_spins
    assert st.receive_spin_hits <= st.receive_spins
    assert st.send_ring_high_water <= st.send_ring_size
    assert st.receive_ring_high_water <= st.receive_ring_size
    assert st.send_ring_high_water <= st.bytes_sent
    assert st.receive_ring_high_water <= st.bytes_received


async def test_fresh_stream(make_pair: PairFactory) -> None:
    srv, cli = await make_pair(read_size=2048, write_size=4096)
    st = cli.statistics()
    check_sane(st)
    assert (st.bytes_sent, st.bytes_received, st.send_waits, st.receive_waits) == (0, 0, 0, 0)
    assert (st.send_ring_high_water, st.receive_ring_high_water) == (0, 0)
    assert (st.send_ring_size, st.receive_ring_size) == (2048, 4096)
    assert st.peer_state is VchanState.CONNECTED
    assert st.peer_is_gntipc
    assert srv.statistics().peer_state is VchanState.CONNECTED
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.bytes_sent = 1  # type: ignore[misc]


async def test_bytes_counted_exactly(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    await cli.send(b"a" * 1000)
    await cli.send(memoryview(b"b" * 24))
    cli.send_nowait(bytearray(b"c" * 100))
    got = b""
    while len(got) < 1124:
        got += await srv.receive()
    await srv.send(b"x" * 10)
    assert await cli.receive_exactly(10) == b"x" * 10
    c, s = cli.statistics(), srv.statistics()
    check_sane(c)
    check_sane(s)
    assert (c.bytes_sent, c.bytes_received) == (1124, 10)
    assert (s.bytes_sent, s.bytes_received) == (10, 1124)
    # Every write fitted: no fill sampled on the send side.
    assert c.send_ring_high_water == 0
    assert 1 <= s.receive_ring_high_water <= 1124
    # Nothing waited for space in a 64 KiB ring.
    assert c.send_waits == s.send_waits == 0


async def test_writer_waits_for_space(make_pair: PairFactory) -> None:
    srv, cli = await make_pair(read_size=1024, write_size=1024)  # client -> server ring: 1 KiB
    total = 64 * 1024
    received = bytearray()

    async def reader() -> None:
        while len(received) < total:
            received.extend(await srv.receive())

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await cli.send(b"z" * total)
    assert bytes(received) == b"z" * total
    c, s = cli.statistics(), srv.statistics()
    check_sane(c)
    check_sane(s)
    assert c.bytes_sent == s.bytes_received == total
    # The first write filled the ring: the writer had to wait, and saw it full.
    assert c.send_waits >= 1
    assert c.send_ring_high_water == c.send_ring_size == 1024
    assert 1 <= s.receive_ring_high_water <= 1024


async def test_packet_write_that_does_not_fit(make_pair: PairFactory) -> None:
    srv, cli = await make_pair(read_size=1024, write_size=1024)
    assert cli.statistics().send_ring_size == 1024
    cli.send_nowait(b"a" * 600)
    with pytest.raises(WouldBlock):
        cli.send_nowait(b"b" * 600)
    st = cli.statistics()
    assert st.bytes_sent == 600
    # The refused packet proves at least 1024 - 600 + 1 bytes in use.
    assert st.send_ring_high_water == 1024 - 600 + 1
    assert srv.receive_nowait(1000) == b"a" * 600
    assert srv.statistics().bytes_received == 600


async def test_receive_waits_and_events(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    for i in range(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cli.send, bytes([i]) * 8)
            assert await srv.receive() == bytes([i]) * 8
    c, s = cli.statistics(), srv.statistics()
    check_sane(c)
    check_sane(s)
    assert s.bytes_received == c.bytes_sent == 160
    assert s.receive_ring_high_water == 8


async def test_peer_state_and_after_close(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    await cli.send(b"bye")
    await cli.aclose()
    st = cli.statistics()  # counters survive the close
    assert st.bytes_sent == 3
    assert st.peer_state is VchanState.CLOSED
    assert srv.statistics().peer_state is VchanState.CLOSED  # the peer left
    assert await srv.receive() == b"bye"
    with pytest.raises(anyio.EndOfStream):
        await srv.receive()
    assert srv.statistics().bytes_received == 3


# -- MessageQueue ---------------------------------------------------------------------


def readings(n: int, start: int = 0) -> Iterator[Reading]:
    return (Reading(f"s{i}", i / 2) for i in range(start, start + n))


async def test_queue_counts(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    tx, rx = MessageQueue(cli, Reading), MessageQueue(srv, Reading)
    framer = MessageFramer(Reading)
    sent = [*readings(3), *readings(5, 3), *readings(4, 8), Reading("last", 1.0)]
    # three message frames, two batch frames, one message frame
    parts = ([sent[0]], sent[1:2], sent[2:3], sent[3:8], sent[8:12], sent[12:])
    frame_bytes = sum(len(framer.encode_many(part)) for part in parts)
    for m in sent[:3]:
        await tx.put(m)
    await tx.put_many(readings(5, 3))  # a generator: counted too
    tx.put_many_nowait(sent[8:12])
    tx.put_nowait(sent[12])
    got = [await rx.get()]
    got += await rx.get_many(max_items=5)
    while len(got) < len(sent):
        try:
            got += rx.get_many_nowait()
        except WouldBlock:
            got.append(await rx.get())
    assert got == sent
    t, r = tx.statistics(), rx.statistics()
    assert isinstance(t, MessageQueueStatistics)
    assert (t.messages_sent, t.messages_received, t.malformed) == (13, 0, 0)
    assert (r.messages_sent, r.messages_received, r.malformed) == (0, 13, 0)
    assert t.bytes_sent == r.bytes_received == frame_bytes
    assert t.stream is not None and r.stream is not None
    check_sane(t.stream)
    assert t.stream.bytes_sent == r.stream.bytes_received == frame_bytes


async def test_queue_failed_put_counts_nothing(make_pair: PairFactory) -> None:
    _srv, cli = await make_pair(read_size=1024, write_size=1024)
    assert cli.statistics().send_ring_size == 1024
    tx = MessageQueue(cli, bytes)
    tx.put_nowait(b"x" * 900)
    with pytest.raises(WouldBlock):
        tx.put_nowait(b"y" * 900)
    with pytest.raises(WouldBlock):
        tx.put_many_nowait([b"y" * 100] * 2)
    st = tx.statistics()
    assert (st.messages_sent, st.bytes_sent) == (1, len(MessageFramer(bytes).encode(b"x" * 900)))


async def test_queue_malformed(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    rx = MessageQueue(srv, int)
    await cli.send(MessageFramer(str).encode("not an int") + MessageFramer(int).encode(7))
    with pytest.raises(MalformedMessage):
        await rx.get()
    assert await rx.get() == 7
    st = rx.statistics()
    assert (st.messages_received, st.malformed) == (1, 1)


async def test_queue_over_session_stream(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    async with Session(srv) as s, Session(cli) as c:
        a = await c.open_stream()
        b = await s.accept_stream()
        tx, rx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        async with tx, rx:
            await tx.put_many(list(readings(10)))
            got: list[Reading] = []
            while len(got) < 10:
                got += await rx.get_many()
            t, r = tx.statistics(), rx.statistics()
            assert (t.messages_sent, r.messages_received) == (10, 10)
            assert t.bytes_sent == r.bytes_received
            assert t.stream is None and r.stream is None  # a SessionStream has none


# -- Session --------------------------------------------------------------------------


async def test_session_counts(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    hello = len(encode_hello(DEFAULT_WINDOW, DEFAULT_MAX_STREAMS))
    async with Session(srv) as s, Session(cli) as c:
        fresh = c.statistics()
        assert isinstance(fresh, SessionStatistics)
        assert (fresh.streams_opened, fresh.streams_open, fresh.state) == (0, 0, "open")
        a = await c.open_stream()
        b = await s.accept_stream()
        await a.send(b"p" * 100)
        assert await b.receive() == b"p" * 100
        cs, ss = c.statistics(), s.statistics()
        # HELLO, OPEN and one DATA frame, all that the initiator wrote.
        sent = hello + len(encode_frame(FrameType.OPEN, 1)) + HEADER_SIZE + 100
        assert cs.bytes_sent == ss.bytes_received == sent
        assert ss.frames_received == 3
        assert cs.writes >= 1
        assert (cs.streams_opened, cs.streams_accepted, cs.streams_open) == (1, 0, 1)
        assert (ss.streams_opened, ss.streams_accepted, ss.streams_open) == (0, 1, 1)
        assert ss.accept_backlog == 0 and cs.queued_frames >= 0
        assert cs.stream is not None and ss.stream is not None
        check_sane(cs.stream)
        assert cs.stream.bytes_sent == sent
        assert ss.stream.bytes_received == sent
        await a.aclose()
        await b.aclose()
    assert c.statistics().state == "closed"
    assert c.statistics().stream is not None  # the vchan stream's counters survive


async def test_session_over_tcp_has_no_stream_statistics() -> None:
    async with (
        stream_pair("tcp") as (x, y),
        Session(x, is_initiator=False) as s,
        Session(y, is_initiator=True) as c,
    ):
        with anyio.fail_after(10):
            a = await c.open_stream()
            b = await s.accept_stream()
            async with a, b:
                await a.send(b"hi")
                assert await b.receive() == b"hi"
                cs, ss = c.statistics(), s.statistics()
                assert cs.stream is None and ss.stream is None
                assert cs.bytes_sent == ss.bytes_received > 2
                assert (cs.streams_opened, ss.streams_accepted) == (1, 1)
