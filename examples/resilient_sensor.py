"""A sensor that keeps streaming while its consumer VM is restored or restarted.

    python examples/resilient_sensor.py [--count N]                  # the scenario, here (sim)
    python examples/resilient_sensor.py producer --vm UUID [--count N]   # in dom0
    python examples/resilient_sensor.py consumer --peer 0 --state FILE   # in the consumer VM

The producer (a sensor, in dom0) sends ``N`` typed readings over a
``gntipc.ResumableStream``.  It listens with ``gntipc.listen_vm``: it serves the consumer's
*VM* (its UUID in XenStore), whatever domid the VM has now, and the session is bound to
that VM.  The consumer VM may be saved and restored or migrated (a new domid: its process
lives on, its vchan breaks) or its process may be killed and started again (its memory is
gone); either way every reading is processed exactly once, in order:

* after a restore, the consumer's stream connects again by itself and resumes;
* the consumer persists its resume ticket, the last reading it processed and its running
  total in ``--state`` (atomically) and only then commits the reading
  (``auto_commit=False``); started again, it resumes from that position and the producer
  replays what came after it.

Without a role (sim only) this file plays the whole story on one machine: the producer
in domain 0, the consumer in domain 1 (VM ``CONSUMER_VM``), and meanwhile it restores the
consumer's domain under a new domid (``gntipc.backends.sim.restore_domain``, what ``xl
save`` + ``xl restore`` do to a real domain) and SIGKILLs the consumer process, twice
each, then checks the consumer's total.  On Xen, run the roles in their VMs and ``xl
save``/``xl restore`` (or ``xl migrate``) the consumer's domain while they run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import msgspec

import gntipc

PATH = "data/gntipc-examples/resilient-sensor"
#: The consumer VM's identity in the scenario (a real VM's is its UUID: ``xl list -v``).
CONSUMER_VM = "6a1f0c3e-5b7d-4e2a-9c8f-1d2e3f405162"


class Reading(msgspec.Struct, array_like=True):
    seq: int
    value: float


def value_of(seq: int) -> float:
    """The reading ``seq`` (deterministic, so the consumer's total can be checked)."""
    return (seq * 7919) % 1000 / 8


def expected_total(count: int) -> float:
    return sum(value_of(seq) for seq in range(1, count + 1))


# -- the producer (dom0) ---------------------------------------------------------------------
async def produce(vm: str, count: int) -> None:
    encode = msgspec.msgpack.Encoder().encode
    listener = await gntipc.listen_vm(vm, PATH)
    async with gntipc.ResumableListener(listener, give_up_after=60) as sessions:
        print(f"producer: serving VM {vm}", flush=True)
        async with await sessions.accept() as stream:
            for seq in range(1, count + 1):
                await stream.send_record(encode(Reading(seq, value_of(seq))))
            await stream.send_eof()
            with anyio.fail_after(60):  # the consumer's end: it processed everything
                try:
                    await stream.receive()
                except anyio.EndOfStream:
                    pass
                else:
                    raise SystemExit("producer: the consumer sent data")
            stats = stream.statistics()
    print(f"producer: {count} readings sent; {stats.resumes} resumes", flush=True)


# -- the consumer (the VM that may be restored or restarted) --------------------------------
async def consume(server: int, state_file: Path) -> None:
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state is None:
        ticket, position, last, total = None, None, 0, 0.0
    else:
        ticket = gntipc.ResumeTicket(*map(bytes.fromhex, state["ticket"]))
        position, last, total = state["position"], state["last"], state["total"]

    async def dial() -> anyio.abc.ByteStream:
        return await gntipc.connect(server, PATH, timeout=10)

    decode = msgspec.msgpack.Decoder(Reading).decode
    stream = gntipc.ResumableStream.client(
        dial, ticket=ticket, position=position, auto_commit=False, give_up_after=60
    )

    def persist(position: int) -> None:
        t = stream.ticket
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "ticket": [t.session_id.hex(), t.secret.hex()],
                    "position": position,
                    "last": last,
                    "total": total,
                }
            )
        )
        os.replace(tmp, state_file)  # (atomic: a kill leaves the old state or the new)

    if state is None:
        persist(0)
    async with stream:
        while True:
            try:
                position, data = await stream.receive_record()
            except anyio.EndOfStream:
                break
            reading = decode(data)
            if reading.seq != last + 1:
                raise SystemExit(f"consumer: reading {reading.seq} after {last}")
            last, total = reading.seq, total + reading.value
            persist(position)  # our own data and the stream position, together...
            stream.commit(position)  # ...then the producer may forget the reading
            if last % 500 == 0:
                print(f"consumer: at {last}", flush=True)
        await stream.send_eof()
        print(f"consumer: done: {last} readings, total {total:.3f}", flush=True)


# -- the scenario (sim): restores and restarts while the readings flow ----------------------
def scenario(count: int, state_file: Path) -> None:
    from gntipc.backends import select_backend_name
    from gntipc.backends.sim import restore_domain

    if select_backend_name() != "sim":
        raise SystemExit(
            "resilient_sensor: the scenario restores a simulated domain: run it on sim"
        )
    state_file.unlink(missing_ok=True)
    env = dict(os.environ, GNTIPC_BACKEND="sim", PYTHONUNBUFFERED="1")

    def start(role: str, domid: int, *args: str) -> subprocess.Popen[str]:
        vm = {"GNTIPC_SIM_VM_UUID": CONSUMER_VM} if role == "consumer" else {}
        return subprocess.Popen(
            [sys.executable, __file__, role, *args],
            env={**env, "GNTIPC_SIM_DOMID": str(domid), **vm},
            stdout=subprocess.PIPE,
            text=True,
        )

    consumer_domid = 1
    producer = start("producer", 0, "--vm", CONSUMER_VM, "--count", str(count))
    assert producer.stdout is not None
    print(producer.stdout.readline(), end="")  # serving: the consumer may come
    consumer = start("consumer", consumer_domid, "--peer", "0", "--state", str(state_file))
    events = {count // 6: "restore", 2 * count // 6: "kill", 3 * count // 6: "restore"}
    events[4 * count // 6] = "kill"
    restores = restarts = 0
    deadline = time.monotonic() + 240
    try:
        while True:
            assert consumer.stdout is not None
            line = consumer.stdout.readline()
            if not line:  # the consumer ended (or was killed: see below)
                break
            print(line, end="")
            if line.startswith("consumer: done"):
                break
            at = int(line.split()[-1])
            due = [k for k in events if k <= at]
            for k in due:
                if events.pop(k) == "restore":
                    new = restore_domain(consumer_domid)
                    print(
                        f"resilient_sensor: consumer VM restored: domain {consumer_domid} -> {new}"
                    )
                    consumer_domid, restores = new, restores + 1
                else:
                    consumer.send_signal(signal.SIGKILL)
                    consumer.wait()
                    print(f"resilient_sensor: consumer process killed at {at}, started again")
                    consumer = start(
                        "consumer", consumer_domid, "--peer", "0", "--state", str(state_file)
                    )
                    restarts += 1
            if time.monotonic() > deadline:
                raise SystemExit("resilient_sensor: no end within 240 s")
        if consumer.wait(60) or producer.wait(60):
            raise SystemExit("resilient_sensor: a role failed")
        print(producer.stdout.read(), end="")
    finally:
        for proc in (producer, consumer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    total = json.loads(state_file.read_text())["total"]
    if abs(total - expected_total(count)) > 1e-6 * count:
        raise SystemExit(f"resilient_sensor: total {total}, expected {expected_total(count)}")
    print(
        f"resilient_sensor: {count} readings, each once, in order, through {restores}"
        f" restores and {restarts} restarts of the consumer"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", nargs="?", choices=["producer", "consumer"])
    parser.add_argument("--peer", type=int, help="consumer: the producer's domain id")
    parser.add_argument("--vm", help="producer: the consumer VM's UUID")
    parser.add_argument("--count", type=int, default=6000, help="readings sent")
    parser.add_argument(
        "--state",
        type=Path,
        help="consumer: where it persists its position (keep it across restarts;"
        " default: ./resilient-sensor.state)",
    )
    args = parser.parse_args()
    if args.role is None:
        with tempfile.TemporaryDirectory() as tmp:
            scenario(args.count, Path(tmp) / "consumer.state")
    elif args.role == "producer":
        if args.vm is None:
            parser.error("the producer needs --vm")
        anyio.run(produce, args.vm, args.count)
    else:
        if args.peer is None:
            parser.error("the consumer needs --peer")
        anyio.run(consume, args.peer, args.state or Path("resilient-sensor.state"))


if __name__ == "__main__":
    main()
