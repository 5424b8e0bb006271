"""Worker processes of ``test_resume_stress`` (``python -m stress._resume_worker ROLE ...``).

One of the two is in dom0, the other in VM ``VM``, whose domain is restored (its process
runs on as the new domid): ``RESTORED`` names which (``consumer`` or ``producer``).

``producer RESTORED VM PATH COUNT``
    Serves one resumable session at ``PATH`` and sends ``COUNT`` typed messages, then
    waits for the consumer's end: in dom0, to VM ``VM`` whatever its domid
    (``gntipc.listen_vm``); in the VM, to dom0 (its relative path follows its home to
    each new domid).  Prints ``serving``, then ``done RESUMES MAXRSS_KB``.
``consumer RESTORED VM PATH STATE``
    SIGKILLed and started again: connects to the producer (in the VM: dom0; in dom0: the
    domain that is VM ``VM`` now, looked up at every connection), receives the messages,
    checks that each is the next one, and every ``COMMIT_EVERY`` messages persists its
    position, the last message and a running digest in ``STATE`` (atomically), then
    commits: started again, it resumes from there (exactly-once).  Prints ``at N`` as it
    goes, then ``done N DIGEST MAXRSS_KB``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

import gntipc
from gntipc.vm import domain_of_vm

#: Messages between two persisted positions (the replay window must hold more).
COMMIT_EVERY = 256
WINDOW_RECORDS = 4 * COMMIT_EVERY
#: Progress lines: one per this many messages.
REPORT_EVERY = 2000


class Sample(msgspec.Struct, array_like=True):
    seq: int
    sensor: int
    value: float
    tag: bytes


def sample(seq: int) -> Sample:
    """Message ``seq`` (deterministic: the consumer's digest can be checked)."""
    return Sample(seq, seq % 16, (seq * 7919) % 1000 / 8, seq.to_bytes(8, "little") * 2)


class Chain:
    """The consumer's digest of what it processed, continued after a restart from the
    persisted value: ``update(x)`` makes it ``sha256(value || x)``."""

    def __init__(self, start: str = "") -> None:
        self.value = start

    def update(self, data: bytes) -> None:
        self.value = hashlib.sha256(self.value.encode() + data).hexdigest()


def digest_of(count: int) -> str:
    """The consumer's digest after every message of ``0 .. count - 1`` once, in order."""
    encode = msgspec.msgpack.Encoder().encode
    chain = Chain()
    for seq in range(count):
        chain.update(encode(sample(seq)))
    return chain.value


def max_rss_kb() -> int:
    """This process's peak resident memory, KiB: ``VmHWM`` of its address space (not
    ``ru_maxrss``, which keeps the high-water mark of the process before its exec: a
    large pytest that forked us)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


async def producer(restored: str, vm: str, path: str, count: int) -> None:
    encode = msgspec.msgpack.Encoder().encode
    listener: gntipc.Listener | gntipc.VmListener = (
        await gntipc.listen(0, path) if restored == "producer" else await gntipc.listen_vm(vm, path)
    )
    async with gntipc.ResumableListener(
        listener, give_up_after=120, window_records=WINDOW_RECORDS
    ) as sessions:
        print("serving", flush=True)
        async with await sessions.accept() as stream:
            for seq in range(count):
                await stream.send_record(encode(sample(seq)))
            await stream.send_eof()
            with contextlib.suppress(anyio.EndOfStream):  # the consumer's end
                await stream.receive()
            resumes = stream.statistics().resumes
    print(f"done {resumes} {max_rss_kb()}", flush=True)


async def consumer(restored: str, vm: str, path: str, state_file: Path) -> None:
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    ticket = None if state is None else gntipc.ResumeTicket(*map(bytes.fromhex, state["ticket"]))
    position = None if state is None else state["position"]
    last = -1 if state is None else state["last"]
    chain = Chain("" if state is None else state["digest"])

    backend = gntipc.get_backend()
    peer = 0

    async def dial() -> anyio.abc.ByteStream:
        nonlocal peer
        if restored == "producer":  # we are dom0: where is the VM now?
            found = await anyio.to_thread.run_sync(domain_of_vm, backend.store, vm, peer)
            if found is None:
                raise gntipc.StaleKeys(f"VM {vm} is not running")  # (retried)
            peer = found
        return await gntipc.connect(peer, path, timeout=5, backend=backend)

    decode = msgspec.msgpack.Decoder(Sample).decode
    stream = gntipc.ResumableStream.client(
        dial,
        ticket=ticket,
        position=position,
        auto_commit=False,
        give_up_after=120,
        window_records=WINDOW_RECORDS,
    )

    def persist(position: int) -> None:
        t = stream.ticket
        tmp = state_file.with_suffix(".tmp")
        record = {
            "ticket": [t.session_id.hex(), t.secret.hex()],
            "position": position,
            "last": last,
            "digest": chain.value,
        }
        tmp.write_text(json.dumps(record))
        os.replace(tmp, state_file)

    if state is None:
        persist(0)
    uncommitted = False
    async with stream:
        while True:
            try:
                seq, data = await stream.receive_record()
            except anyio.EndOfStream:
                break
            got = decode(data)
            if got.seq != last + 1:
                sys.exit(f"consumer: message {got.seq} after {last}")
            last, position, uncommitted = got.seq, seq, True
            chain.update(data)
            if (last + 1) % COMMIT_EVERY == 0:
                persist(seq)
                stream.commit(seq)
                uncommitted = False
            if (last + 1) % REPORT_EVERY == 0:
                print(f"at {last + 1}", flush=True)
        if uncommitted:
            persist(position)
            stream.commit(position)
        await stream.send_eof()
    backend.close()
    print(f"done {last + 1} {chain.value} {max_rss_kb()}", flush=True)


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "producer":
        anyio.run(producer, rest[0], rest[1], rest[2], int(rest[3]))
    else:
        anyio.run(consumer, rest[0], rest[1], rest[2], Path(rest[3]))
