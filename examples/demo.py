"""gntipc demo: a producer VM streams typed sensor readings to a consumer VM.

    python examples/demo.py [--count N] [--sensors K]       # both VMs on this machine
    python examples/demo.py consumer --peer 5 [--count N]   # in domain 0: receives
    python examples/demo.py producer --peer 0 [--count N]   # in domain 5: sends

The consumer listens on the store path ``data/gntipc-demo`` for the producer's domain;
the producer connects to it and sends ``N`` readings (msgspec Structs) through a
``gntipc.MessageQueue``, in batches; the consumer aggregates them per sensor and prints a
summary: messages, bytes, rate and latency.  Give both the same ``--count``.

Without a role, both run here: on the simulated hypervisor (the default without Xen) the
consumer is a process playing domain 0 and the producer one playing domain 1; on a Xen
host both run in this domain.  The backend is chosen as everywhere in gntipc:
``GNTIPC_BACKEND``, else ``xen`` when ``/dev/xen/gntdev`` exists, else ``sim``.
"""

from __future__ import annotations

import argparse
import sys
import time

import anyio
import msgspec

import gntipc

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


# -- The command line ---------------------------------------------------------------------
# With a role, this file is all a VM needs.  Without one, examples/_launch.py (not part of
# the example) plays both VMs on this machine, running this file once per role.


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "role",
        nargs="?",
        choices=["consumer", "producer"],
        help="the side to run in this VM (default: both, on this machine)",
    )
    parser.add_argument("--peer", type=int, help="with a role: the other VM's domain id")
    parser.add_argument(
        "--count", type=int, default=1_000_000, help="readings sent (both sides need it)"
    )
    parser.add_argument("--sensors", type=int, default=16, help="producer: sensors simulated")
    args = parser.parse_args()
    if args.role is None:
        import _launch

        _launch.play("demo", sys.argv[1:], roles=("consumer", "producer"))
    elif args.peer is None:
        parser.error("a role needs --peer")
    elif args.role == "consumer":
        anyio.run(consume, args.peer, args.count)
    else:
        anyio.run(produce, args.peer, args.count, args.sensors)


if __name__ == "__main__":
    main()
