"""Leak soak: many connect / transfer / close cycles — clean closes (either side first),
peers SIGKILLed mid-stream (as client and as server), and channels closed from another
thread while a thread is blocked in them — then every resource of this process and of
the simulated hypervisor must be back where it started: file descriptors, memory
mappings, sim grants / ports / mappings / notifications / watches / processes, store
nodes (presence nodes and keys included) and files in the sim runtime directory.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import anyio
import pytest

import gntipc
from gntipc.backends.sim import SimBackend, kill_domain
from gntipc.channel import Vchan
from gntipc.testing import connect_pair

from ._common import LEVEL, by_level, expected, leftovers, sim_counts, store_nodes, worker_env
from ._report import REPORT

PEER_DOM = 7
_paths = itertools.count()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_kinds() -> Counter[str]:
    """Open descriptors by kind (``socket``, ``anon_inode:[eventpoll]``, a path...)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":[")[0] if target.startswith(("socket", "pipe")) else target] += 1
    return kinds


def maps(runtime: str) -> tuple[int, int]:
    """(all mappings, mappings of sim memory files) of this process."""
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    return len(lines), sum(runtime in line for line in lines)


def snapshot(backend: SimBackend) -> dict[str, int]:
    gc.collect()
    backend._rt.reap_dead()  # what the next backend opening would do
    snap = sim_counts(backend.runtime_dir)
    nodes = store_nodes(backend.runtime_dir)
    snap["nodes"] = len(nodes)
    snap["nodes_dom0"] = sum(p.startswith("/local/domain/0/") for p in nodes)
    snap[f"nodes_dom{PEER_DOM}"] = sum(p.startswith(f"/local/domain/{PEER_DOM}") for p in nodes)
    snap["fds"] = fds()
    snap["proc_maps"], snap["proc_maps_sim"] = maps(backend.runtime_dir)
    return snap


LABELS = {
    "fds": "fds before -> after",
    "proc_maps": "process mappings (malloc may keep 4 more)",
    "proc_maps_sim": "mappings of sim runtime files",
    "grants": "sim grants",
    "maps": "sim mapping records",
    "ports": "sim event ports",
    "notifies": "sim unmap notifications",
    "watches": "sim store watches",
    "procs": "sim registered processes",
    "nodes_dom0": "store nodes of our domain",
    "nodes": "store nodes in all (after the toolstack clean-up)",
    "files_m": "sim memory files",
    "files_p": "sim port sockets",
    "files_w": "sim watch sockets",
}


class Forker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stress._forker"],
            env=worker_env(PEER_DOM),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self, role: str, peer: int, path: str, nbytes: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{role} {peer} {path} {nbytes}\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        return int(pid)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


class Soak:
    def __init__(self, backend: SimBackend, forker: Forker, rnd: random.Random) -> None:
        self.backend = backend
        self.forker = forker
        self.rnd = rnd
        self.kinds: Counter[str] = Counter()
        self.detect: list[float] = []

    def path(self) -> str:
        return f"data/soak/{os.getpid()}/{next(_paths) % 8}"

    async def pair(self) -> tuple[gntipc.VchanStream, gntipc.VchanStream]:
        sizes = (1024, 4096, 65536)
        return await connect_pair(
            self.backend,
            self.path(),
            read_size=self.rnd.choice(sizes),
            write_size=self.rnd.choice(sizes),
            timeout=10,
        )

    async def clean(self) -> None:
        a, b = await self.pair()
        n = self.rnd.choice((0, 1, 5000, 200_000))
        data = self.rnd.randbytes(n)

        async def pump() -> None:
            await a.send(data)
            await a.send_eof()

        got = bytearray()
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            try:
                while True:
                    got += await b.receive()
            except anyio.EndOfStream:
                pass
        assert got == data
        first, second = (a, b) if self.rnd.random() < 0.5 else (b, a)
        await first.aclose()
        await second.aclose()
        self.kinds["clean"] += 1

    async def killed(self) -> None:
        # At least one byte: the peer writes it after its connect returned, so the kill
        # lands after its set-up (a kill inside set-up is the chaos test's job).
        n = self.rnd.choice((1, 100, 70_000))
        if self.rnd.random() < 0.5:
            # The peer is the client of our listener.
            path = self.path()
            async with await gntipc.listen(PEER_DOM, path, backend=self.backend) as listener:
                pid = self.forker.start("client", 0, path, n)
                with anyio.fail_after(30):
                    stream = await listener.accept()
            kind = "killed client"
        else:
            # The peer is a server (its keys stay behind in its home: a SIGKILL removes
            # nothing from the store).
            path = f"data/soak-srv/{next(_paths) % 4}"
            pid = self.forker.start("server", 0, path, n)
            stream = await gntipc.connect(PEER_DOM, path, timeout=30, backend=self.backend)
            kind = "killed server"
        async with stream:
            got = 0
            with anyio.fail_after(30):
                while got < n:
                    data = await stream.receive()
                    assert data == expected(0, got, len(data))
                    got += len(data)
            t = time.monotonic()
            os.kill(pid, 9)
            with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):
                await stream.receive()
            self.detect.append(time.monotonic() - t)
        self.kinds[kind] += 1

    def threaded(self) -> None:
        path = self.path()
        be = self.backend
        server = Vchan.server(be, 0, path, read_size=4096, write_size=4096)
        client = Vchan.client(be, 0, path, timeout=10)
        victim, other = (server, client) if self.rnd.random() < 0.5 else (client, server)
        reading = self.rnd.random() < 0.5
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                if reading:
                    victim.read(100, timeout=30)
                else:
                    victim.write_all(bytes(100_000), timeout=30)  # more than the ring
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(self.rnd.choice((0, 0.001, 0.01)))
        victim.close()  # bug 5 (fixed): a notify racing close() used to raise here
        t.join(10)
        assert not t.is_alive(), "a blocked call did not wake up on close()"
        assert len(errors) == 1 and isinstance(errors[0], anyio.ClosedResourceError), errors
        other.close()
        self.kinds["closed from a thread"] += 1

    async def cycle(self) -> None:
        x = self.rnd.random()
        if x < 0.6:
            await self.clean()
        elif x < 0.8:
            await self.killed()
        else:
            self.threaded()


def test_leak_soak() -> None:
    cycles = by_level(200, 2000, 10_000)
    rnd = random.Random(len(LEVEL))
    forker = Forker()
    backend = SimBackend(0)
    t0 = time.monotonic()
    try:
        soak = Soak(backend, forker, rnd)

        async def run(n: int) -> None:
            for _ in range(n):
                await soak.cycle()

        # Warm up (imports, caches, the peer domain's home), then take the baseline.
        for kind in (soak.clean, soak.killed, soak.killed):
            anyio.run(kind)
        soak.threaded()
        anyio.run(run, 20)
        kill_domain(PEER_DOM)  # the toolstack's clean-up of the peer domain
        soak.kinds.clear()
        before = snapshot(backend)
        kinds_before = fd_kinds()
        anyio.run(run, cycles)
        stale_peer_nodes = snapshot(backend)[f"nodes_dom{PEER_DOM}"]
        kill_domain(PEER_DOM)
        after = snapshot(backend)
        fd_diff = fd_kinds()
        fd_diff.subtract(kinds_before)
        leaked_fds = {k: v for k, v in fd_diff.items() if v}
    finally:
        backend.close()
        forker.close()
    left = leftovers()
    seconds = time.monotonic() - t0
    part = "soak"
    REPORT.add(part, "cycles", f"{sum(soak.kinds.values())} {dict(soak.kinds)}", f">= {cycles}")
    diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    # Malloc may keep an extra arena mapped; sim memory files must all be unmapped.
    tolerated = {"proc_maps"} if after["proc_maps"] - before["proc_maps"] <= 4 else set()
    leaks = {k: v for k, v in diff.items() if k not in tolerated and k != f"nodes_dom{PEER_DOM}"}
    for key, label in LABELS.items():
        ok = before[key] == after[key] or key in tolerated
        value = f"{before[key]} -> {after[key]}"
        REPORT.add(part, label, value, "equal", ok)
    REPORT.add(
        part,
        f"store nodes of killed peers (domain {PEER_DOM}) before the toolstack clean-up",
        stale_peer_nodes,
        "bounded",
    )
    det = sorted(soak.detect)
    if det:
        REPORT.add(
            part,
            "kill detection ms p50/max",
            f"{det[len(det) // 2] * 1000:.1f} / {det[-1] * 1000:.1f}",
        )
    REPORT.add(part, "leftovers", len(left), "0", not left)
    REPORT.add(part, "seconds", seconds)
    if leaked_fds:
        REPORT.add(part, "leaked descriptors by kind", leaked_fds, "none", False)
    assert not leaks, (leaks, leaked_fds)
    assert not left, left
    # Stale keys/presence nodes of SIGKILLed peers are replaced, not accumulated.
    assert stale_peer_nodes <= 40, stale_peer_nodes


pytestmark = pytest.mark.timeout(by_level(120, 1200, 5400))
