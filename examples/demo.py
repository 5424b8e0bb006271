"""gntipc demo: a producer VM streams typed sensor readings to a consumer VM.

    python examples/demo.py [--count N] [--sensors K]

Starts two processes.  The consumer plays domain 0 and listens on the store path
``data/gntipc-demo``; the producer plays domain 1 (on the sim backend; on a real Xen host
both run in this domain) and connects to it.  The producer sends ``N`` readings
(msgspec Structs) through a :class:`gntipc.MessageQueue`, in batches; the consumer
aggregates them per sensor and prints a summary: messages, bytes, rate and latency.

The backend is chosen as everywhere in gntipc: ``GNTIPC_BACKEND``, else ``xen`` when
``/dev/xen/gntdev`` exists, else the simulated hypervisor.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import anyio
import msgspec

import gntipc
from gntipc.backends import select_backend_name

PATH = "data/gntipc-demo"
BATCH = 256


class Reading(msgspec.Struct, array_like=True):
    """One sensor sample."""

    sensor: int
    seq: int
    sent_ns: int  # CLOCK_MONOTONIC when produced, for the latency figure
    value: float


async def produce(server: int, count: int, sensors: int) -> None:
    async with (
        await gntipc.connect(server, PATH, timeout=30) as stream,
        gntipc.MessageQueue(stream, Reading) as queue,
    ):
        seq = 0
        while seq < count:
            n = min(BATCH, count - seq)
            now = time.monotonic_ns()
            await queue.put_many(
                Reading(s % sensors, s, now, 20.0 + (s % 97) * 0.25) for s in range(seq, seq + n)
            )
            seq += n
        await stream.send_eof()
        # wait for the consumer's acknowledgement before tearing the channel down
        await stream.receive(16)


async def consume(client: int, count: int) -> None:
    stats: dict[int, list[float]] = {}
    latencies: list[int] = []
    received = 0
    async with await gntipc.listen(client, PATH, read_size=1 << 16, write_size=4096) as listener:
        print(f"consumer: listening at {PATH} for domain {client}", flush=True)
        async with await listener.accept() as stream:
            t0 = time.perf_counter()
            queue = gntipc.MessageQueue(stream, Reading)
            try:
                while True:
                    batch = await queue.get_many()
                    now = time.monotonic_ns()
                    for r in batch:
                        agg = stats.setdefault(r.sensor, [0, 0.0, r.value, r.value])
                        agg[0] += 1
                        agg[1] += r.value
                        agg[2] = min(agg[2], r.value)
                        agg[3] = max(agg[3], r.value)
                    latencies.append(now - batch[-1].sent_ns)
                    received += len(batch)
            except anyio.EndOfStream:
                pass
            elapsed = time.perf_counter() - t0
            await stream.send(b"ok")
    typical = Reading(15, count, time.monotonic_ns(), 44.25)  # a frame: u32 length + msgpack
    nbytes = received * (4 + len(msgspec.msgpack.encode(typical)))
    latencies.sort()
    p50 = latencies[len(latencies) // 2] / 1000 if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] / 1000 if latencies else 0.0
    print(f"consumer: {received} readings from {len(stats)} sensors in {elapsed:.3f} s")
    print(
        f"  rate     {received / elapsed / 1e6:.2f} M messages/s, "
        f"~{nbytes / elapsed / 1e6:.0f} MB/s on the ring"
    )
    print(f"  latency  p50 {p50:.1f} us, p99 {p99:.1f} us (at full load, queueing included)")
    for sensor in sorted(stats)[:4]:
        n, total, lo, hi = stats[sensor]
        print(f"  sensor {sensor}: {int(n)} readings, mean {total / n:.3f}, min {lo}, max {hi}")
    if len(stats) > 4:
        print(f"  ... and {len(stats) - 4} more sensors")
    if received != count:
        raise SystemExit(f"consumer: expected {count} readings, got {received}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--sensors", type=int, default=16)
    parser.add_argument("--role", choices=["consumer", "producer"], help=argparse.SUPPRESS)
    parser.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "consumer":
        anyio.run(consume, args.peer, args.count)
        return
    if args.role == "producer":
        anyio.run(produce, args.peer, args.count, args.sensors)
        return

    backend = select_backend_name()
    if backend == "sim":
        consumer_dom, producer_dom = 0, 1
    else:
        with gntipc.get_backend(backend) as b:  # real Xen: both ends in this domain
            consumer_dom = producer_dom = b.domid
    print(f"gntipc demo on the {backend} backend: domain {producer_dom} -> domain {consumer_dom}")

    def spawn(role: str, domid: int, peer: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, GNTIPC_BACKEND=backend, GNTIPC_SIM_DOMID=str(domid))
        cmd = [
            sys.executable,
            __file__,
            "--role",
            role,
            "--peer",
            str(peer),
            "--count",
            str(args.count),
            "--sensors",
            str(args.sensors),
        ]
        return subprocess.Popen(cmd, env=env)

    consumer = spawn("consumer", consumer_dom, producer_dom)
    producer = spawn("producer", producer_dom, consumer_dom)
    try:
        rc_producer = producer.wait(timeout=300)
        rc_consumer = consumer.wait(timeout=60)
    finally:
        for p in (producer, consumer):
            if p.poll() is None:
                p.kill()
                p.wait()
    if rc_producer or rc_consumer:
        raise SystemExit(f"demo failed: producer exit {rc_producer}, consumer exit {rc_consumer}")
    print("demo: ok")


if __name__ == "__main__":
    main()
