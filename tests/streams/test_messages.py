"""MessageQueue on a VchanStream: ring batching, limits, cancellation, bounded batches.

What every stream kind must do (hostile frames, end of stream, cancelled gets, the wire
format) is in test_queue_conformance.py, which runs on vchans too."""

from __future__ import annotations

import contextlib
import statistics
import time

import anyio
import msgspec
import pytest
from _pairs import Reading, frame
from anyio import BusyResourceError, EndOfStream, WouldBlock
from conftest import PairFactory

import gntipc
import gntipc._soon
from gntipc import MalformedMessage, MessageQueue, MessageTooLarge
from gntipc._soon import BURST_GAP
from gntipc.streams import FLUSH_BYTES

pytestmark = pytest.mark.anyio


async def queues(
    make_pair: PairFactory, size: int = 65536, **kw: int
) -> tuple[MessageQueue[Reading], MessageQueue[Reading]]:
    srv, cli = await make_pair(read_size=size, write_size=size)
    return MessageQueue(srv, Reading, **kw), MessageQueue(cli, Reading, **kw)


@pytest.mark.parametrize("batch_frames", [True, False])
async def test_put_many_is_one_ring_write(make_pair: PairFactory, batch_frames: bool) -> None:
    srv, cli = await make_pair(read_size=65536, write_size=65536)
    rx = MessageQueue(srv, Reading)
    tx = MessageQueue(cli, Reading, batch_frames=batch_frames)
    batch = [Reading(i, float(i)) for i in range(1000)]
    await tx.put_many(batch)
    # all 1000 messages are in the ring at once: one write, not 1000; one batch frame
    # (version 1), or 1000 message frames
    if batch_frames:
        size = 4 + len(msgspec.msgpack.encode(batch))
    else:
        size = sum(4 + len(msgspec.msgpack.encode(r)) for r in batch)
    assert rx.stream.vchan.data_ready() == size
    got: list[Reading] = []
    while len(got) < 1000:
        got += await rx.get_many()
    assert got == batch
    await tx.put_many([])  # nothing to do


async def test_batches_larger_than_the_ring(make_pair: PairFactory) -> None:
    rx, tx = await queues(make_pair, size=1024)
    batch = [Reading(i, float(i), "pad" * 20) for i in range(2000)]
    got: list[Reading] = []

    async def consume() -> None:
        while len(got) < len(batch):
            got.extend(await rx.get_many(max_items=37))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await tx.put_many(batch)
    assert got == batch


async def test_nowait_and_iteration(make_pair: PairFactory) -> None:
    rx, tx = await queues(make_pair, size=1024)
    with pytest.raises(WouldBlock):
        rx.get_nowait()
    with pytest.raises(WouldBlock):
        rx.get_many_nowait()
    sent = 0
    with pytest.raises(WouldBlock):
        while True:
            tx.put_nowait(Reading(sent, 0.5))
            sent += 1
    assert sent > 10
    with pytest.raises(WouldBlock):
        tx.put_many_nowait([Reading(0, 0.0)] * 20)  # all or nothing
    got = [rx.get_nowait() for _ in range(3)] + rx.get_many_nowait(max_items=5)
    assert [r.sensor for r in got] == list(range(8))
    await tx.aclose()
    rest = [r.sensor async for r in rx]
    assert rest == list(range(8, sent))
    with pytest.raises(EndOfStream):
        await rx.get()


async def test_oversized_put_writes_nothing_and_keeps_the_queue(make_pair: PairFactory) -> None:
    rx, tx = await queues(make_pair, max_message_size=100)
    with pytest.raises(MessageTooLarge):
        await tx.put(Reading(1, 1.0, "x" * 200))
    with pytest.raises(MessageTooLarge):
        tx.put_nowait(Reading(1, 1.0, "x" * 200))
    with pytest.raises(MessageTooLarge):
        await tx.put_many([Reading(1, 1.0), Reading(2, 2.0, "x" * 200)])
    assert rx.stream.vchan.data_ready() == 0
    await tx.put(Reading(3, 3.0))
    assert await rx.get() == Reading(3, 3.0)


async def test_frames_split_one_byte_at_a_time(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    rx = MessageQueue(srv, Reading)
    wire = b"".join(frame(msgspec.msgpack.encode(Reading(i, i * 1.5))) for i in range(20))
    got: list[Reading] = []
    for b in wire:
        await cli.send(bytes([b]))
        with contextlib.suppress(WouldBlock):
            got.append(rx.get_nowait())
    assert got == [Reading(i, i * 1.5) for i in range(20)]


async def test_a_malformed_frame_arriving_alone_is_skipped(make_pair: PairFactory) -> None:
    # One frame alone in what a receive returned is decoded without the decode-ahead
    # loop (request/response traffic); a bad one there is reported and skipped the same.
    srv, cli = await make_pair()
    rx = MessageQueue(srv, Reading)
    good = frame(msgspec.msgpack.encode(Reading(1, 1.0)))
    for bad in (b"\xc1", msgspec.msgpack.encode("no Reading"), msgspec.msgpack.encode([1])):
        await cli.send(frame(bad))
        with anyio.fail_after(10), pytest.raises(MalformedMessage):
            await rx.get()
        await cli.send(good)
        with anyio.fail_after(10):
            assert await rx.get() == Reading(1, 1.0)
    await cli.send(frame(b"\xc1"))
    with anyio.fail_after(10):
        await rx.stream.wait_readable()
    with pytest.raises(MalformedMessage):
        rx.get_nowait()
    await cli.send(good)
    with anyio.fail_after(10):
        await rx.stream.wait_readable()
    assert rx.get_nowait() == Reading(1, 1.0)
    assert rx.statistics().malformed == 4


async def test_messages_larger_than_the_ring(make_pair: PairFactory) -> None:
    rx, tx = await queues(make_pair, size=1024)
    big = Reading(1, 1.0, "z" * 50_000)
    with pytest.raises(gntipc.LocalProtocolError):
        tx.put_nowait(big)  # can never fit at once
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tx.put, big)
            assert await rx.get() == big


async def test_cancelled_put_of_a_large_frame_closes_the_queue(make_pair: PairFactory) -> None:
    rx, tx = await queues(make_pair, size=1024)
    with anyio.move_on_after(0.1) as scope:
        await tx.put(Reading(1, 1.0, "z" * 5000))  # nobody reads: a prefix goes out
    assert scope.cancelled_caught
    assert tx.closed  # no later frame could be framed right
    with pytest.raises(MalformedMessage, match="ended inside a frame"):
        while True:
            await rx.get()


async def test_cancelled_put_of_a_frame_that_fits_writes_nothing(make_pair: PairFactory) -> None:
    rx, tx = await queues(make_pair, size=1024)
    first = Reading(1, 1.0, "a" * 900)
    await tx.put(first)  # most of the ring: the next frame does not fit yet
    with anyio.move_on_after(0.1) as scope:
        await tx.put(Reading(2, 2.0, "b" * 200))
    assert scope.cancelled_caught
    assert not tx.closed  # nothing of the second frame went out: still framed
    assert await rx.get() == first
    await tx.put(Reading(3, 3.0, "c"))
    assert await rx.get() == Reading(3, 3.0, "c")


async def test_busy_getters_and_putters(make_pair: PairFactory) -> None:
    rx, _tx = await queues(make_pair, size=1024)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rx.get)  # nothing comes: blocks
            tg.start_soon(rx.put, Reading(0, 0.0, "y" * 3000))  # nobody reads: blocks
            await anyio.sleep(0.05)
            with pytest.raises(BusyResourceError):
                await rx.get()
            with pytest.raises(BusyResourceError):
                rx.get_nowait()
            with pytest.raises(BusyResourceError):
                await rx.put(Reading(0, 0.0))
            with pytest.raises(BusyResourceError):
                rx.put_nowait(Reading(0, 0.0))
            with pytest.raises(BusyResourceError):
                await rx.put_many([Reading(0, 0.0)])
            tg.cancel_scope.cancel()


async def test_bad_arguments(make_pair: PairFactory) -> None:
    srv, _ = await make_pair()
    with pytest.raises(ValueError):
        MessageQueue(srv, Reading, max_message_size=0)
    q = MessageQueue(srv, Reading)
    with pytest.raises(TypeError):
        q.put_nowait(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q._collect([], 0)


# -- bounded batches, linear reassembly (issue 10) ------------------------------------------


class FakeSource:
    """Stands in for the queue's stream: a peer that keeps the ring full.

    Every receive returns up to ``piece`` bytes (and at most ``max_bytes``) of ``wire``
    repeated forever (``wire`` holds whole frames, so the repetition stays framed), or,
    with ``repeat=False``, of ``wire`` once.  ``handed_out`` counts the bytes returned.
    After ``limit`` bytes it acts as if the peer had paused (WouldBlock), so that a
    queue that never stops reading fails the test instead of hanging it.
    """

    def __init__(
        self, wire: bytes, piece: int, *, repeat: bool = True, limit: int = 8 << 20
    ) -> None:
        self.wire = wire
        self.piece = piece
        self.repeat = repeat
        self.limit = limit
        self.pos = 0
        self.handed_out = 0
        self.closed = False
        self.ended = False  # set: the peer ended the stream (what is left is not delivered)

    def extra(self, attribute: object, default: object = None) -> object:
        return 65536 if attribute is gntipc.VchanAttribute.read_size else default

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        assert max_bytes >= 1
        if self.handed_out >= self.limit:
            raise WouldBlock
        if self.ended:
            raise EndOfStream
        if self.pos == len(self.wire):
            if not self.repeat:
                raise WouldBlock
            self.pos = 0
        data = self.wire[self.pos : self.pos + min(max_bytes, self.piece)]
        self.pos += len(data)
        self.handed_out += len(data)
        return data

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        try:
            return self.receive_nowait(max_bytes)
        except WouldBlock:
            await anyio.sleep_forever()
            raise

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.close()


def numbered_wire(count: int, label: str = "") -> bytes:
    return b"".join(
        frame(msgspec.msgpack.encode(Reading(i, float(i), label))) for i in range(count)
    )


@pytest.mark.parametrize("label", ["", "x" * 5000], ids=["small", "5k"])
async def test_get_many_is_bounded_while_the_peer_keeps_writing(label: str) -> None:
    # The peer refills the ring as fast as we read: get_many used to read (and return)
    # for as long as it found data, up to millions of messages and hundreds of MiB.
    from gntipc.messages import COLLECT_BYTES, DEFAULT_MAX_ITEMS

    period = 1000
    source = FakeSource(numbered_wire(period, label), piece=65536)
    rx: MessageQueue[Reading] = MessageQueue(source, Reading)  # type: ignore[arg-type]
    got: list[Reading] = []
    for nowait in (False, True, False):
        before = source.handed_out
        with anyio.fail_after(10):
            batch = rx.get_many_nowait() if nowait else await rx.get_many()
        assert 1 <= len(batch) <= DEFAULT_MAX_ITEMS
        # bounded memory: one call reads about COLLECT_BYTES (plus the piece that
        # crossed it, and the first piece)
        assert source.handed_out - before <= COLLECT_BYTES + 2 * 65536
        got += batch
    # nothing lost or reordered between the calls: the rest stayed buffered
    assert [r.sensor for r in got] == [i % period for i in range(len(got))]
    assert len(rx.get_many_nowait(max_items=3)) == 3
    with pytest.raises(ValueError):
        await rx.get_many(max_items=0)
    with pytest.raises(ValueError):
        rx.get_many_nowait(max_items=0)


async def test_reassembling_a_large_message_is_linear() -> None:
    # A 16 MiB message arriving 1 KiB at a time: each piece used to re-copy the whole
    # partial frame (quadratic: 128 GiB of copying, minutes); joined once, it takes a
    # tenth of a second.  (tests/protocol/test_framing.py checks deterministically that
    # nothing is joined before the frame is complete; the deadline here is functional.)
    payload = bytes(range(256)) * (16 << 12)
    wire = frame(msgspec.msgpack.encode(payload)) + numbered_wire(1)
    source = FakeSource(wire, piece=1024, repeat=False, limit=len(wire))
    rx = MessageQueue(source, bytes | Reading, max_message_size=32 << 20)  # type: ignore[arg-type]
    with anyio.fail_after(60):
        got = await rx.get()
    assert got == payload
    # the bytes after the frame were kept
    assert rx.get_nowait() == Reading(0, 0.0)
    with pytest.raises(WouldBlock):
        rx.get_nowait()


async def test_a_frame_split_anywhere_reassembles() -> None:
    # header split, payload split over many pieces, several frames in a piece
    wire = numbered_wire(3, "y" * 3000) + numbered_wire(5)
    for piece in (1, 3, 7, 1000, 2999, 4096):
        source = FakeSource(wire, piece=piece, repeat=False)
        rx: MessageQueue[Reading] = MessageQueue(source, Reading)  # type: ignore[arg-type]
        got: list[Reading] = []
        with anyio.fail_after(10):
            while len(got) < 8:
                got += await rx.get_many()
        assert [(r.sensor, len(r.label)) for r in got] == [
            (0, 3000), (1, 3000), (2, 3000), (0, 0), (1, 0), (2, 0), (3, 0), (4, 0)
        ], piece  # fmt: skip
        # a stream ending inside a frame is still reported (counting unjoined pieces)
        source = FakeSource(wire[:5000], piece=piece, repeat=False)
        rx = MessageQueue(source, Reading)  # type: ignore[arg-type]
        assert (await rx.get()).sensor == 0
        with pytest.raises(WouldBlock):
            rx.get_nowait()
        source.ended = True
        with pytest.raises(MalformedMessage, match="ended inside a frame"):
            rx.get_nowait()


# -- puts held back for the next ones (VchanStream._send_soon) -----------------------------


# (A put goes out when the producer stops putting: test_queue_conformance.py, every kind.)


async def test_many_puts_are_few_ring_writes(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Puts that need not wait and come in a burst (less than BURST_GAP apart) gather
    # their frames and write them in blocks: nothing of the burst reaches the ring until
    # FLUSH_BYTES gathered or the task yields to the loop.  A lone put is written at once.
    rx, tx = await queues(make_pair)
    ring = rx.stream.vchan
    frame_size = len(tx._framer.encode(Reading(0, 0.5)))
    await anyio.sleep(2 * BURST_GAP)
    tx.put_nowait(Reading(0, 0.5))  # nothing came just before: written at once
    assert ring.data_ready() == frame_size
    # A burst, whatever this machine's speed (a preempted put would end it).
    monkeypatch.setattr(gntipc._soon, "BURST_GAP", 60.0)
    for i in range(1, 11):
        tx.put_nowait(Reading(i, 0.5))
    assert ring.data_ready() == frame_size  # the burst is held back, no write yet
    with anyio.fail_after(5):
        while ring.data_ready() == frame_size:  # the task yields: the loop writes them
            await anyio.sleep(0)  # (trio: in one of its next rounds), in one block
    assert ring.data_ready() == 11 * frame_size
    count = 11
    while ring.data_ready() == 11 * frame_size:  # without yielding again
        tx.put_nowait(Reading(count, 0.5))
        count += 1
    assert ring.data_ready() >= FLUSH_BYTES  # a full block went out at once
    got: list[Reading] = []
    with anyio.fail_after(5):
        while len(got) < count:
            got += await rx.get_many()
    assert got == [Reading(i, 0.5) for i in range(count)]


async def test_held_back_puts_go_out_before_a_sync_close(make_pair: PairFactory) -> None:
    # EOF and aclose on every transport: test_queue_conformance; the sync close of a
    # vchan stream (from any thread) sends what the puts held back too.
    rx, tx = await queues(make_pair)
    await tx.put(Reading(1, 1.0))
    tx.put_nowait(Reading(2, 2.0))
    tx.close()
    with anyio.fail_after(5):
        assert [m async for m in rx] == [Reading(1, 1.0), Reading(2, 2.0)]
    await rx.aclose()


async def test_a_busy_consumer_lets_other_tasks_run(make_pair: PairFactory) -> None:
    # A producer that never pauses and a consumer of a queue that never runs dry (both
    # in this loop): puts and gets yield at least every FAIR_SLICE, so a ticker task
    # still runs every few milliseconds, and the consumer stays cancellable.
    rx, tx = await queues(make_pair, size=1 << 20)
    batch = [Reading(i, 0.5) for i in range(256)]
    gaps: list[float] = []

    async def produce() -> None:
        while True:
            for m in batch:
                await tx.put(m)

    async def consume() -> None:
        async for _ in rx:
            pass

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        tg.start_soon(consume)
        tg.start_soon(tick)
        with anyio.fail_after(120):  # all three run (on a slow machine, slowly)
            while rx.statistics().messages_received < 5000 or len(gaps) < 100:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()  # and the consumer is cancellable
    # The loop went round in small steps: functional bound, not a benchmark (a loaded
    # CI machine preempts us now and then: the median, not the maximum).
    assert statistics.median(gaps) < 0.01, (statistics.median(gaps), max(gaps))


async def test_large_messages_are_received_in_place_and_survive_cancellation(
    make_pair: PairFactory,
) -> None:
    # Messages of several rings' size: get() receives each into a buffer of its size
    # (MessageFramer.receive_buffer); a get cancelled half-way through one loses
    # nothing, and the next get (or get_nowait) finishes it.
    srv, cli = await make_pair(read_size=65536, write_size=65536)
    into = 0
    receive_into = srv.receive_into

    async def counted(buffer: bytearray | memoryview) -> int:
        nonlocal into
        into += 1
        return await receive_into(buffer)

    srv.receive_into = counted  # type: ignore[method-assign]
    rx = MessageQueue(srv, bytes, max_message_size=1 << 20)
    tx = MessageQueue(cli, bytes, max_message_size=1 << 20)
    sent = [bytes([i]) * (300_000 + i) for i in range(3)]
    left = list(sent)  # what the consumer has still to get (the producer iterates `sent`)
    async with anyio.create_task_group() as tg:

        async def produce() -> None:
            for m in sent:
                await tx.put(m)
            await tx.aclose()

        tg.start_soon(produce)
        with anyio.move_on_after(0.001):
            while left:
                assert await rx.get() == left[0]
                left.pop(0)
        with anyio.fail_after(30):
            got = [m async for m in rx]
    assert got == left
    assert into >= 3  # each message was received in place (in several pieces)
    await rx.aclose()
