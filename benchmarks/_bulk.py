"""Bulk: 4 MiB payloads filled in place by the sender and consumed in place by the
receiver, through a :class:`gntipc.bulk.BulkChannel` (loans from a granted pool: no copy
through the ring) vs through a 1 MiB-ring :class:`gntipc.VchanStream` doing the same work
(fill a buffer, ``send`` it, ``receive_into`` a buffer, consume it): issue #22's goal is
>= 3x.

The work per payload is the same on both paths: the sender fills 4 MiB (a copy from a
source block, as a file read from the page cache would be), the receiver checksums them
in place.  Two consumers: an XOR fold of the 64-bit words (numpy, ~20 GB/s: the cost of
the transport shows) and ``zlib.crc32`` (~2 GB/s: the consumer dominates both paths).
Each receiver's checksums are checked against the sender's source, so a row that moved
the wrong bytes fails instead of looking fast.

A second table, **typed messages**: a msgspec message (a sequence number, a name, a size)
with a 1 MiB attachment per message through a :class:`gntipc.bulk.BulkQueue` (a loan of a
4 x 1 MiB pool, filled in place, its descriptor inside the message frame) vs
:class:`gntipc.MessageQueue` carrying the same message with the 1 MiB as a ``bytes``
field on a 1 MiB ring; the receiver CRC-32s every byte of the payload on both paths (in
place, in the sender's pages, on the pool).  The MessageQueue sender encodes its source
block straight into the frame (msgspec's copy is its fill), the pool's sender copies it
into the loan: the same one copy each.

Figures: GB/s (payload bytes over the receiver's wall time, from the end of a warm-up of
4 payloads (:data:`WARMUP`) to the end) and the CPU seconds per GB of each side (user +
sys, all threads).  The pool is 4 buffers of 4 MiB (4096 pages): the sim's page limit is
raised for the section (``GNTIPC_SIM_PAGE_LIMIT``), as it would have to be on Xen
(gntalloc's ``limit``).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from _harness import (
    Meter,
    MiB,
    attempt,
    fmt,
    fresh_path,
    g_client,
    g_server,
    note,
    ratio,
    run_pair,
    table,
)

import gntipc
from gntipc.bulk import BulkChannel, BulkView, open_bulk, open_bulk_queue

PAYLOAD = 4 * MiB
POOL_BUFFERS = 4
RING = MiB
#: Payloads sent first and not timed (one pass over the pool): on sim, pool pages are
#: allocated when first touched (granted pages on Xen are resident from the start).
WARMUP = POOL_BUFFERS
#: Pages the section lets a sim domain share (the pool's 4096, the vchan's, slack).
PAGE_LIMIT = 8192

Result = dict[str, Any]


CONSUMERS: dict[str, Callable[[Any], int]] = {"crc32": zlib.crc32}
try:  # the bench extra has numpy (through matplotlib); without it, crc32 only
    import numpy as np
except ImportError:
    np = None
else:

    def _xor64(view: Any) -> int:
        return int(np.bitwise_xor.reduce(np.frombuffer(view, dtype=np.uint64)))

    CONSUMERS = {"xor64": _xor64, **CONSUMERS}


def _source() -> bytes:
    # Not all zeros (a checksum of zeros proves little); the same in both processes.
    return (bytes(range(256)) * (PAYLOAD // 256))[:PAYLOAD]


def _expected(consumer: str, count: int) -> int:
    one = CONSUMERS[consumer](_source())
    return one * count  # the receiver sums the payloads' checksums


# ------------------------------------------------------------------------- the pool ---
async def _consume_loans(receive: Callable[[], Awaitable[BulkView]], consume: Any) -> Result:
    """The receiving loop of the pool rows: ``receive()`` gives the next loan (a plain
    one, or a message's attachment) until EndOfStream; each is consumed in place."""
    total = check = k = 0
    meter: Meter | None = None
    while True:
        if k == WARMUP:
            meter = Meter()
        try:
            item = await receive()
        except anyio.EndOfStream:
            break
        with item as view:
            check += consume(view)
            total += len(view) if k >= WARMUP else 0
        k += 1
    assert meter is not None
    use = meter.stop()
    return {"bytes": total, "check": check, **use._asdict()}


async def _lend_all(
    channel: BulkChannel, send: Callable[[int, memoryview], Awaitable[None]], count: int
) -> Result:
    """The sending loop of the pool rows: ``count`` (and the warm-up's) loans filled in
    place from the source, each handed to ``send(k, buf)``; then EOF, and the wait for
    the receiver to be done with our pages."""
    src = _source()[: channel.buffer_size]
    meter = Meter()
    for k in range(count + WARMUP):
        if k == WARMUP:
            meter = Meter()
        async with channel.loan() as buf:
            buf[:] = src  # filled in place
            await send(k, buf)
    await channel.send_eof()
    use = meter.stop()
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        await channel.receive()  # ends when the receiver closes
    return use._asdict()


def bulk_parent(_: Any, path: str, consumer: str, count: int) -> Result:
    async def main() -> Result:
        async with (
            g_server(path, 65536) as stream,
            await open_bulk(stream, buffers=0, max_peer_pages=PAGE_LIMIT) as bulk,
        ):
            return await _consume_loans(bulk.receive, CONSUMERS[consumer])

    return anyio.run(main)


def bulk_child(_: Any, path: str, consumer: str, count: int) -> Result:
    async def main() -> Result:
        async with (
            g_client(path) as stream,
            await open_bulk(stream, buffers=POOL_BUFFERS, buffer_size=PAYLOAD) as bulk,
        ):
            return await _lend_all(bulk, lambda k, buf: bulk.send(buf), count)

    return anyio.run(main)


# ------------------------------------------------------------------------- the ring ---
def ring_parent(_: Any, path: str, consumer: str, count: int) -> Result:
    consume = CONSUMERS[consumer]

    async def main() -> Result:
        async with g_server(path, RING) as stream:
            buf = memoryview(bytearray(PAYLOAD))
            total = check = k = 0
            meter: Meter | None = None
            receive_into = stream.receive_into
            while True:
                if k == WARMUP:
                    meter = Meter()
                got = 0
                try:
                    while got < PAYLOAD:
                        got += await receive_into(buf[got:])
                except anyio.EndOfStream:
                    break
                check += consume(buf)
                total += got if k >= WARMUP else 0
                k += 1
            assert meter is not None and got == 0
            use = meter.stop()
        return {"bytes": total, "check": check, **use._asdict()}

    return anyio.run(main)


def ring_child(_: Any, path: str, consumer: str, count: int) -> Result:
    src = _source()

    async def main() -> Result:
        async with g_client(path) as stream:
            buf = memoryview(bytearray(PAYLOAD))
            meter = Meter()
            for k in range(count + WARMUP):
                if k == WARMUP:
                    meter = Meter()
                buf[:] = src  # the same fill as the pool's
                await stream.send(buf)
            await stream.send_eof()
            use = meter.stop()
        return use._asdict()

    return anyio.run(main)


# ------------------------------------------------------------- typed messages ---
#: The attachment (pool) or bytes field (MessageQueue) of each typed message.
MESSAGE_PAYLOAD = MiB
MESSAGE_BUFFERS = 4


class Frame(msgspec.Struct):
    """The typed message with its payload inline (MessageQueue)."""

    seq: int
    name: str
    data: bytes


class FrameMeta(msgspec.Struct):
    """The typed message whose payload is its attachment (BulkQueue)."""

    seq: int
    name: str
    size: int


def _message_source() -> bytes:
    return _source()[:MESSAGE_PAYLOAD]


def queue_parent(_: Any, path: str, consumer: str, count: int) -> Result:
    async def main() -> Result:
        async with (
            g_server(path, 65536) as stream,
            await open_bulk_queue(stream, FrameMeta, buffers=0, max_peer_pages=PAGE_LIMIT) as queue,
        ):

            async def receive() -> BulkView:
                message, attachment = await queue.get()  # (the message is decoded)
                assert attachment is not None and message.size == len(attachment)
                return attachment

            return await _consume_loans(receive, CONSUMERS[consumer])

    return anyio.run(main)


def queue_child(_: Any, path: str, consumer: str, count: int) -> Result:
    async def main() -> Result:
        async with (
            g_client(path) as stream,
            await open_bulk_queue(
                stream, FrameMeta, buffers=MESSAGE_BUFFERS, buffer_size=MESSAGE_PAYLOAD
            ) as queue,
        ):

            async def put(k: int, buf: memoryview) -> None:
                await queue.put(FrameMeta(k, "frame", len(buf)), attachment=buf)

            return await _lend_all(queue.channel, put, count)

    return anyio.run(main)


def mq_parent(_: Any, path: str, consumer: str, count: int) -> Result:
    consume = CONSUMERS[consumer]

    async def main() -> Result:
        async with g_server(path, RING) as stream:
            queue = gntipc.MessageQueue(stream, Frame, max_message_size=2 * MESSAGE_PAYLOAD)
            total = check = k = 0
            meter: Meter | None = None
            while True:
                if k == WARMUP:
                    meter = Meter()
                try:
                    message = await queue.get()
                except anyio.EndOfStream:
                    break
                check += consume(message.data)
                total += len(message.data) if k >= WARMUP else 0
                k += 1
            assert meter is not None
            use = meter.stop()
        return {"bytes": total, "check": check, **use._asdict()}

    return anyio.run(main)


def mq_child(_: Any, path: str, consumer: str, count: int) -> Result:
    src = _message_source()

    async def main() -> Result:
        async with g_client(path) as stream:
            queue = gntipc.MessageQueue(stream, Frame, max_message_size=2 * MESSAGE_PAYLOAD)
            meter = Meter()
            for k in range(count + WARMUP):
                if k == WARMUP:
                    meter = Meter()
                await queue.put(Frame(k, "frame", src))  # the encoding copies src in
            await stream.send_eof()
            use = meter.stop()
        return use._asdict()

    return anyio.run(main)


def _measure_messages(name: str, parent: Any, child: Any, count: int) -> Result | None:
    consumer = "crc32"
    pair = attempt(name, run_pair, parent, child, fresh_path(), consumer, count, budget=120)
    if pair is None:
        return None
    mine, theirs = pair
    one = zlib.crc32(_message_source())
    if mine["bytes"] != count * MESSAGE_PAYLOAD or mine["check"] != one * (count + WARMUP):
        raise AssertionError(f"{name}: the receiver got other bytes than were sent")
    gb = mine["bytes"] / 1e9
    return {
        "gb_per_s": gb / mine["seconds"],
        "messages_per_s": count / mine["seconds"],
        "receiver_cpu_s_per_gb": mine["cpu"] / gb,
        "sender_cpu_s_per_gb": theirs["cpu"] / gb,
        "receiver": mine,
        "sender": theirs,
    }


def messages_section(total: int, repeat: int) -> dict[str, Any]:
    """Run and print the typed-messages table (``total`` payload bytes per row, best of
    ``repeat``)."""
    count = max(1, total // MESSAGE_PAYLOAD)
    results: dict[str, Any] = {}
    best: dict[str, Result | None] = {}
    for kind, parent, child in (
        ("bulk queue", queue_parent, queue_child),
        ("message queue", mq_parent, mq_child),
    ):
        runs = [_measure_messages(kind, parent, child, count) for _ in range(repeat)]
        done = [r for r in runs if r is not None]
        best[kind] = max(done, key=lambda r: r["gb_per_s"]) if done else None
        results[kind] = {"best": best[kind], "runs": runs}
    pool_gbs = (best["bulk queue"] or {}).get("gb_per_s")
    rows = []
    for kind, label in (
        ("bulk queue", "BulkQueue, message + 1 MiB attachment (4 x 1 MiB pool)"),
        ("message queue", "MessageQueue, 1 MiB bytes field, 1 MiB ring"),
    ):
        b = best[kind] or {}
        rows.append(
            [
                label,
                fmt(b.get("gb_per_s"), ".2f"),
                fmt(b.get("messages_per_s"), ".0f"),
                fmt(b.get("receiver_cpu_s_per_gb"), ".3f"),
                fmt(b.get("sender_cpu_s_per_gb"), ".3f"),
                ratio(pool_gbs, b.get("gb_per_s")),
            ]
        )
    table(
        f"Bulk typed messages, {count} messages with 1 MiB each, crc32 of every byte by the"
        f" receiver (GB/s, best of {repeat}; CPU s/GB per side)",
        ["path", "GB/s", "msgs/s", "receiver CPU s/GB", "sender CPU s/GB", "bulk/this"],
        rows,
    )
    return {"payload": MESSAGE_PAYLOAD, "messages": count, "rows": results}


# ------------------------------------------------------------------------ the table ---
def _measure(name: str, parent: Any, child: Any, consumer: str, count: int) -> Result | None:
    pair = attempt(name, run_pair, parent, child, fresh_path(), consumer, count, budget=120)
    if pair is None:
        return None
    mine, theirs = pair
    expected = _expected(consumer, count + WARMUP)
    if mine["bytes"] != count * PAYLOAD or mine["check"] != expected:
        raise AssertionError(f"{name}: the receiver got other bytes than were sent")
    gb = mine["bytes"] / 1e9
    return {
        "gb_per_s": gb / mine["seconds"],
        "receiver_cpu_s_per_gb": mine["cpu"] / gb,
        "sender_cpu_s_per_gb": theirs["cpu"] / gb,
        "receiver": mine,
        "sender": theirs,
    }


def section(total: int, repeat: int) -> dict[str, Any]:
    """Run and print the bulk table (``total`` bytes per row, best of ``repeat``)."""
    os.environ["GNTIPC_SIM_PAGE_LIMIT"] = str(PAGE_LIMIT)
    count = max(1, total // PAYLOAD)
    if np is None:
        note("bulk: numpy is missing: no xor64 rows (pip install -e '.[bench]')")
    results: dict[str, Any] = {}
    rows = []
    for consumer in CONSUMERS:
        best: dict[str, Result | None] = {}
        for kind, parent, child in (
            ("pool", bulk_parent, bulk_child),
            ("ring", ring_parent, ring_child),
        ):
            name = f"{kind}, {consumer}"
            runs = [_measure(name, parent, child, consumer, count) for _ in range(repeat)]
            done = [r for r in runs if r is not None]
            best[kind] = max(done, key=lambda r: r["gb_per_s"]) if done else None
            results[name] = {"best": best[kind], "runs": runs}
        pool_gbs = (best["pool"] or {}).get("gb_per_s")
        for kind, label in (
            ("pool", "BulkChannel loans (4 x 4 MiB pool)"),
            ("ring", "VchanStream, 1 MiB ring"),
        ):
            b = best[kind] or {}
            rows.append(
                [
                    f"{label}, {consumer}",
                    fmt(b.get("gb_per_s"), ".2f"),
                    fmt(b.get("receiver_cpu_s_per_gb"), ".3f"),
                    fmt(b.get("sender_cpu_s_per_gb"), ".3f"),
                    ratio(pool_gbs, b.get("gb_per_s")),
                ]
            )
    table(
        f"Bulk, {count} payloads of 4 MiB ({count * PAYLOAD / 2**30:.2f} GiB) filled in place"
        f" and checksummed in place (GB/s, best of {repeat}; CPU s/GB per side)",
        ["path, consumer", "GB/s", "receiver CPU s/GB", "sender CPU s/GB", "pool/this"],
        rows,
    )
    return {
        "payload": PAYLOAD,
        "payloads": count,
        "pool_buffers": POOL_BUFFERS,
        "rows": results,
        "messages": messages_section(total, repeat),
    }


def main() -> None:
    """One row alone, for timing from outside (whole-process CPU and wall):
    ``python benchmarks/_bulk.py pool|ring|queue|mq xor64|crc32 [MiB]`` (queue and mq:
    the typed-message rows, crc32 whatever the consumer argument says)."""
    import shutil
    import sys
    import tempfile

    kind, consumer = sys.argv[1], sys.argv[2]
    total = int(sys.argv[3]) * MiB if len(sys.argv) > 3 else 2**30
    os.environ["GNTIPC_SIM_PAGE_LIMIT"] = str(PAGE_LIMIT)
    os.environ["GNTIPC_SIM_DIR"] = tempfile.mkdtemp(prefix="gntipc-bench-sim-")
    try:
        if kind in ("queue", "mq"):
            parent, child = (
                (queue_parent, queue_child) if kind == "queue" else (mq_parent, mq_child)
            )
            r = _measure_messages(kind, parent, child, max(1, total // MESSAGE_PAYLOAD))
            if r is None:
                raise SystemExit(1)
            print(f"{kind}: {r['gb_per_s']:.2f} GB/s, {r['messages_per_s']:.0f} msgs/s")
            return
        parent, child = (bulk_parent, bulk_child) if kind == "pool" else (ring_parent, ring_child)
        r = _measure(kind, parent, child, consumer, max(1, total // PAYLOAD))
        if r is None:
            raise SystemExit(1)
        print(
            f"{kind} {consumer}: {r['gb_per_s']:.2f} GB/s, CPU s/GB receiver "
            f"{r['receiver_cpu_s_per_gb']:.3f} sender {r['sender_cpu_s_per_gb']:.3f}"
        )
    finally:
        shutil.rmtree(os.environ["GNTIPC_SIM_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
