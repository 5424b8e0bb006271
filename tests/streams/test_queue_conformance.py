"""One conformance suite for MessageQueue, run over every kind of byte stream: a
VchanStream on sim, a SessionStream, loopback TCP, a unix socket and TLS (asyncio and
trio).

What differs on a stream that is not a VchanStream (documented in gntipc.messages) is
tested here too: no put_nowait, get_nowait serves only what was received already, and a
put cancelled while sending closes the queue unless the stream reports its progress."""

from __future__ import annotations

import struct

import anyio
import msgspec
import pytest
from _pairs import GENERIC, KINDS, OPAQUE, Reading, frame, stream_pair
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)

from gntipc import MalformedMessage, MessageQueue, MessageTooLarge
from gntipc.protocol import BATCH_FLAG
from gntipc.streams import FAIR_SLICE

pytestmark = pytest.mark.anyio


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def receive_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    data = b""
    with anyio.fail_after(10):
        while len(data) < n:
            data += await stream.receive(n - len(data))
    return data


async def test_put_get_and_the_wire_format(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.fail_after(10):
            for i in range(50):
                await tx.put(Reading(i, i / 2, "x" * (i % 7)))
            for i in range(50):
                assert await rx.get() == Reading(i, i / 2, "x" * (i % 7))
            # byte for byte the same frames on every stream: u32 length + msgpack, and
            # a batch frame (the length's top bit set) + one msgpack array
            await tx.put(Reading(1, 2.0))
            await tx.put_many([Reading(3, 4.0), Reading(5, 6.0)])
            await tx.put_many([Reading(7, 8.0)])
        batch = msgspec.msgpack.encode([Reading(3, 4.0), Reading(5, 6.0)])
        expected = (
            frame(msgspec.msgpack.encode(Reading(1, 2.0)))
            + struct.pack("<I", len(batch) | BATCH_FLAG)
            + batch
            + frame(msgspec.msgpack.encode(Reading(7, 8.0)))
        )
        assert await receive_exactly(a, len(expected)) == expected


async def test_batches_and_messages_larger_than_any_buffer(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx = MessageQueue(a, Reading, max_message_size=1 << 22)
        tx = MessageQueue(b, Reading, max_message_size=1 << 22)
        batch = [Reading(i, float(i), "pad" * (i % 50)) for i in range(3000)]
        big = Reading(-1, 0.0, "z" * 1_000_000)  # larger than the ring, the session
        # window, one TCP read and one TLS record
        got: list[Reading] = []

        async def consume() -> None:
            while len(got) < len(batch) + 1:
                many = await rx.get_many(max_items=97)
                assert 1 <= len(many) <= 97
                got.extend(many)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await tx.put_many(batch[:1500])
                await tx.put(big)
                await tx.put_many(batch[1500:])
        assert got == [*batch[:1500], big, *batch[1500:]]
        await tx.put_many([])  # nothing to do


async def test_iteration_ends_with_the_stream(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.fail_after(10):
            await tx.put_many([Reading(i, 0.5) for i in range(20)])
            await tx.aclose()
            assert tx.closed
            assert [r.sensor async for r in rx] == list(range(20))
            with pytest.raises(EndOfStream):
                await rx.get()
        with pytest.raises(ClosedResourceError):
            await tx.put(Reading(0, 0.0))


async def test_nowait_methods(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with pytest.raises(WouldBlock):
            rx.get_nowait()
        with pytest.raises(WouldBlock):
            rx.get_many_nowait()
        if kind in GENERIC:
            with pytest.raises(NotImplementedError, match="put_nowait needs"):
                tx.put_nowait(Reading(0, 0.0))
            with pytest.raises(NotImplementedError, match="put_many_nowait needs"):
                tx.put_many_nowait([Reading(0, 0.0)])
            await tx.put_many([Reading(i, 0.0) for i in range(10)])
        else:
            tx.put_nowait(Reading(0, 0.0))
            tx.put_many_nowait([Reading(i, 0.0) for i in range(1, 10)])
        # after one get, whatever arrived with it is served without waiting; the rest
        # (a generic stream may deliver the batch in pieces) by get
        got = [await rx.get()]
        with anyio.fail_after(10):
            while len(got) < 10:
                try:
                    got += rx.get_many_nowait(max_items=3)
                except WouldBlock:
                    got.append(await rx.get())
        assert [r.sensor for r in got] == list(range(10))
        with pytest.raises(WouldBlock):
            rx.get_nowait()


async def test_malformed_frames_are_skipped_without_desync(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx = MessageQueue(a, Reading)
        good = frame(msgspec.msgpack.encode(Reading(7, 7.0)))
        wrong_type = frame(msgspec.msgpack.encode({"sensor": "not an int", "value": 1.0}))
        garbage = frame(b"\xc1\xc1\xc1")
        await b.send(wrong_type + garbage + good)
        with anyio.fail_after(10):
            with pytest.raises(MalformedMessage):
                await rx.get()
            with pytest.raises(MalformedMessage):
                await rx.get()
            assert await rx.get() == Reading(7, 7.0)
            # in a batch: the good messages before the bad frame are delivered first
            await b.send(good + garbage + good)
            assert await rx.get_many() == [Reading(7, 7.0)]
            with pytest.raises(MalformedMessage):
                await rx.get_many()
            assert await rx.get_many() == [Reading(7, 7.0)]


async def test_oversized_frame_from_the_peer_closes_the_queue(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx = MessageQueue(a, Reading, max_message_size=1000)
        good = frame(msgspec.msgpack.encode(Reading(1, 1.0)))
        await b.send(good + struct.pack("<I", 1001) + b"\0" * 50)
        with anyio.fail_after(10):
            assert await rx.get() == Reading(1, 1.0)
            with pytest.raises(MessageTooLarge, match="1001-byte"):
                await rx.get()
        assert rx.closed
        with pytest.raises(ClosedResourceError):
            await rx.get()
        # the peer sees the end of the stream (a reset, if unread bytes were dropped)
        with anyio.fail_after(10), pytest.raises((EndOfStream, BrokenResourceError)):
            while True:
                await b.receive()


async def test_stream_ending_inside_a_frame(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx = MessageQueue(a, Reading)
        await b.send(struct.pack("<I", 50) + b"\x01" * 10)
        await b.aclose()
        with anyio.fail_after(10):
            with pytest.raises(MalformedMessage, match="ended inside a frame"):
                await rx.get()
            with pytest.raises(EndOfStream):
                await rx.get()


async def test_cancelled_get_loses_nothing(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await rx.get()
        assert scope.cancelled_caught
        wire = frame(msgspec.msgpack.encode(Reading(5, 5.0)))
        await b.send(wire[:3])  # half a header
        with anyio.move_on_after(0.05):
            await rx.get()  # buffers the 3 bytes, then is cancelled
        await b.send(wire[3:])
        await tx.put_many([Reading(6, 6.0), Reading(7, 7.0)])
        with anyio.fail_after(10):
            assert await rx.get() == Reading(5, 5.0)
            assert await rx.get() == Reading(6, 6.0)
            # Gets yield at least every FAIR_SLICE (a cancellation lands there); this
            # one comes later than that after the last: a buffered message is not taken
            # by a cancelled get
            await anyio.sleep(2 * FAIR_SLICE)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await rx.get()
            assert scope.cancelled_caught
            assert await rx.get() == Reading(7, 7.0)


async def test_cancelled_put(kind: str) -> None:
    # A put cancelled before anything is written leaves every queue usable: a put yields
    # (at least every FAIR_SLICE) before it writes, and the first put of a queue does.
    async with stream_pair(kind) as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await tx.put(Reading(1, 1.0))
        assert scope.cancelled_caught
        assert not tx.closed
        await anyio.sleep(2 * FAIR_SLICE)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await tx.put_many([Reading(2, 2.0), Reading(3, 3.0)])
        assert scope.cancelled_caught
        assert not tx.closed
        await tx.put(Reading(4, 4.0))
        with anyio.fail_after(10):
            assert await rx.get() == Reading(4, 4.0)  # nothing of the cancelled puts


async def test_put_cancelled_while_sending(kind: str) -> None:
    # Cancelled while a frame larger than any buffer goes out: a VchanStream and a
    # SessionStream tell how much went out (a partial frame closes the queue, none
    # keeps it); on sockets and TLS it is not known: the queue is closed.
    async with stream_pair(kind) as (_a, b):
        payload = bytes(64 << 20)  # more than loopback TCP's buffers take at once
        tx = MessageQueue(b, bytes, max_message_size=len(payload) + 8)
        with anyio.move_on_after(0.3) as scope:
            await tx.put(payload)  # nobody reads
        if not scope.cancelled_caught:
            # asyncio's socket transports sometimes take the whole frame into their
            # buffer at once: then it is sent, and the queue stays usable
            assert kind in OPAQUE and not tx.closed
        elif kind in OPAQUE:
            assert tx.closed
            with pytest.raises(ClosedResourceError):
                await tx.put(b"x")
        else:
            progress = b.send_progress  # type: ignore[attr-defined]
            assert tx.closed == (0 < progress < len(tx._framer.encode(payload)))


async def test_busy_getters(kind: str) -> None:
    async with stream_pair(kind) as (a, _b):
        rx = MessageQueue(a, Reading)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                started = anyio.Event()

                async def blocked_get() -> None:
                    started.set()
                    await rx.get()  # nothing comes

                tg.start_soon(blocked_get)
                await started.wait()
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(BusyResourceError):
                    await rx.get()
                with pytest.raises(BusyResourceError):
                    rx.get_nowait()
                tg.cancel_scope.cancel()


async def test_a_put_goes_out_when_the_producer_stops_putting(kind: str) -> None:
    # A vchan or session stream holds small frames back to send them with the next
    # ones; a producer that puts once and then waits for something else entirely still
    # gets its message through (the event loop runs the flush), on every kind of stream.
    async with stream_pair(kind) as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        done = anyio.Event()

        async def consume() -> None:
            assert await rx.get() == Reading(1, 1.0)
            done.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await anyio.wait_all_tasks_blocked()
                await tx.put(Reading(1, 1.0))
                await done.wait()


async def test_held_back_puts_go_out_before_eof_and_close(kind: str) -> None:
    for end in ("send_eof", "aclose"):
        if end == "send_eof" and kind == "tls":
            continue  # TLS has no half-close
        async with stream_pair(kind) as (a, b):
            rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
            with anyio.fail_after(10):
                await tx.put(Reading(1, 1.0))
                await tx.put(Reading(2, 2.0))
                if end == "send_eof":
                    await b.send_eof()
                else:
                    await tx.aclose()
                assert [m async for m in rx] == [Reading(1, 1.0), Reading(2, 2.0)], end
