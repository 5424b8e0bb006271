"""MessageQueue over anyio's own socket streams (TCP, unix; asyncio and trio): a put
hands its frame to the socket at once instead of awaiting the stream's ``send`` (which
yields to the event loop twice per call), and keeps what that send guaranteed: when the
put returns its frame is with the kernel, in order, and a producer waits while the
kernel's buffers are full.  Over any other stream (a TLSStream, whose raw socket lies
under the encryption) puts go through ``send``.

What every stream kind must do is in test_queue_conformance.py (which runs these kinds
too)."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import anyio
import pytest
from _pairs import Reading, stream_pair
from anyio import BrokenResourceError, EndOfStream
from anyio.abc import ByteStream

from gntipc import MalformedMessage, MessageQueue

pytestmark = pytest.mark.anyio


def count_sends(stream: ByteStream) -> list[int]:
    """Make ``stream.send`` note the size of each call; returns the notes."""
    calls: list[int] = []
    send = stream.send

    async def counted(item: bytes) -> None:
        calls.append(len(item))
        await send(item)

    stream.send = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
async def test_puts_go_to_the_socket_without_the_streams_send(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        calls = count_sends(b)
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        sent = [Reading(i, i / 2) for i in range(100)]
        with anyio.fail_after(10):
            # (a unix socket counts each small write as a buffer of its own, a few
            # hundred fill it: the reader takes them as they come)
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    assert [await rx.get() for _ in range(2 * len(sent))] == sent + sent

                tg.start_soon(consume)
                for m in sent:
                    await tx.put(m)
                await tx.put_many(sent)
        if kind == "tls":
            # a TLSStream's raw socket carries ciphertext: everything goes through send
            assert len(calls) == len(sent) + 1
        else:
            # the kernel took every frame at once (a few KiB, nobody else writing)
            assert calls == []


@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
async def test_a_put_returns_once_the_kernel_has_its_frame(kind: str) -> None:
    # Nobody reads: puts go on until the kernel's buffers are full, then wait (they do
    # not pile frames up in the process: a bounded amount was put when the wait is
    # cancelled), and every put that returned reaches the reader, in order, even
    # though the writer closes without waiting (asyncio's transport drops what it
    # still holds at close: a put must not return while it holds its frame).
    async with stream_pair(kind) as (a, b):
        rx = MessageQueue(a, bytes, max_message_size=1 << 20)
        tx = MessageQueue(b, bytes, max_message_size=1 << 20)
        size = 16384
        put = 0
        with anyio.fail_after(10):
            # (anyio's asyncio transport reads into the process until a receive has
            # waited for data: this one does)
            async with anyio.create_task_group() as tg:

                async def first() -> None:
                    assert await rx.get() == b"start"

                tg.start_soon(first)
                await anyio.wait_all_tasks_blocked()
                await tx.put(b"start")
        with anyio.move_on_after(1.0):
            while True:
                await tx.put(put.to_bytes(4, "little") * (size // 4))
                put += 1
        assert 0 < put * size < 64 << 20, put  # the kernel's buffers, a few MiB
        await anyio.aclose_forcefully(b)
        got: list[int] = []
        with anyio.fail_after(30):
            try:
                async for m in rx:
                    assert m == len(got).to_bytes(4, "little") * (size // 4), len(got)
                    got.append(len(got))
            except (MalformedMessage, BrokenResourceError):
                pass  # the cancelled put's frame, cut (TLS: cut without close_notify)
        assert len(got) >= put


async def test_a_producer_that_never_waits_lets_other_tasks_run() -> None:
    # Puts that never wait for the socket (a thread drains its peer) still yield to the
    # event loop, every FAIR_SLICE: a ticker task in the same loop keeps running.
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def drain() -> None:
            peer, _ = listener.accept()
            with peer:
                while peer.recv(1 << 20):
                    pass

        thread = threading.Thread(target=drain)
        thread.start()
        try:
            port = listener.getsockname()[1]
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                tx = MessageQueue(stream, Reading)
                gaps: list[float] = []
                done = False

                async def produce() -> None:
                    nonlocal done
                    for i in range(20_000):
                        await tx.put(Reading(i, 0.5))
                    done = True

                async def tick() -> None:
                    last = time.monotonic()
                    while not done:
                        await anyio.sleep(0)
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now

                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(produce)
                        tg.start_soon(tick)
        finally:
            thread.join(10)
    # functional bounds, not a benchmark: the ticker ran all along, in small steps
    assert len(gaps) > 100, len(gaps)
    assert statistics.median(gaps) < 0.01, (statistics.median(gaps), max(gaps))


async def test_put_after_the_peer_is_gone_raises_broken() -> None:
    # The direct write meets the socket's error: the stream's own send reports it.
    async with stream_pair("tcp") as (a, b):
        tx = MessageQueue(b, Reading)
        await a.aclose()
        with anyio.fail_after(10), pytest.raises((BrokenResourceError, EndOfStream)):
            while True:
                await tx.put(Reading(1, 1.0))
                await anyio.sleep(0.001)
