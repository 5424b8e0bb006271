"""The cost of one wake-up, layer by layer (sim or xen), with spinning off.

    .venv/bin/python benchmarks/wakeups.py [--backend sim|xen] [--rounds N] [--strace]

Three ping-pongs of one byte between two processes, each round trip costing two
blocking wake-ups (no spinning, so every wait sleeps):

* ``port``: raw event ports (notify; poll the port's fd; pending; unmask);
* ``sync``: ``Vchan.send`` / ``Vchan.recv`` (the endpoint's wait protocol + the
  blocking waiter);
* ``async``: ``VchanStream.send`` / ``receive`` under asyncio (+ the dispatcher and the
  event loop).

With ``--strace`` each row is re-run under ``strace -f -c`` and the syscalls per round
trip are printed by name (both processes).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio

import gntipc
from gntipc import Vchan

SERVER, CLIENT = 0, 1


def _backend(name: str, domid: int) -> Any:
    return gntipc.get_backend(name, domid=domid) if name == "sim" else gntipc.get_backend(name)


def _peer_domid(name: str, be: Any, want: int) -> int:
    return want if name == "sim" else be.domid


# --------------------------------------------------------------------------- port ---
def _port_wait(port: Any) -> None:
    fd = port.fileno()
    while True:
        select.select([fd], [], [])
        if port.pending():
            port.unmask()
            return


def _port_child(name: str, q: Any, rounds: int) -> None:
    with _backend(name, CLIENT) as be:
        dom, port_no = q.get()
        with be.bind_interdomain(dom, port_no) as port:
            q.put("ready")
            for _ in range(rounds):
                _port_wait(port)
                port.notify()


def port_row(name: str, rounds: int) -> float:
    ctx = mp.get_context("fork")
    q: Any = ctx.Queue()
    with _backend(name, SERVER) as be:
        with be.alloc_unbound(_peer_domid(name, be, CLIENT)) as port:
            proc = ctx.Process(target=_port_child, args=(name, q, rounds))
            proc.start()
            q.put((be.domid, port.port))
            time.sleep(0.2)
            while q.get() != "ready":
                pass
            t = time.perf_counter()
            for _ in range(rounds):
                port.notify()
                _port_wait(port)
            dt = time.perf_counter() - t
        proc.join()
    return dt / rounds


# --------------------------------------------------------------------------- sync ---
def _sync_child(name: str, path: str, rounds: int) -> None:
    with _backend(name, CLIENT) as be:
        server = SERVER if name == "sim" else be.domid
        with Vchan.client(be, server, path, timeout=30) as v:
            v.spin = 0
            for _ in range(rounds):
                v.send(v.recv(1))
            v.recv(1)


def sync_row(name: str, rounds: int, path: str) -> float:
    ctx = mp.get_context("fork")
    with _backend(name, SERVER) as be:
        v = Vchan.server(be, _peer_domid(name, be, CLIENT), path)
        with v:
            v.spin = 0
            proc = ctx.Process(target=_sync_child, args=(name, path, rounds))
            proc.start()
            while v.is_open() == 2:
                v.wait(1)
            t = time.perf_counter()
            for _ in range(rounds):
                v.send(b"x")
                v.recv(1)
            dt = time.perf_counter() - t
            v.send(b"x")
        proc.join()
    return dt / rounds


# -------------------------------------------------------------------------- async ---
def _async_child(name: str, path: str, rounds: int) -> None:
    async def main() -> None:
        with _backend(name, CLIENT) as be:
            server = SERVER if name == "sim" else be.domid
            async with await gntipc.connect(server, path, timeout=30, backend=be) as s:
                s.spin = 0
                for _ in range(rounds):
                    await s.send(await s.receive(1))
                await s.receive(1)

    anyio.run(main)


def async_row(name: str, rounds: int, path: str) -> float:
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_async_child, args=(name, path, rounds))
    proc.start()  # before the event loop: the child waits for our keys

    async def main() -> float:
        with _backend(name, SERVER) as be:
            async with await gntipc.listen(
                _peer_domid(name, be, CLIENT), path, backend=be
            ) as listener, await listener.accept() as s:
                s.spin = 0
                t = time.perf_counter()
                for _ in range(rounds):
                    await s.send(b"x")
                    await s.receive(1)
                dt = time.perf_counter() - t
                await s.send(b"x")
        return dt / rounds

    try:
        return anyio.run(main)
    finally:
        proc.join()


ROWS = {"port": port_row, "sync": sync_row, "async": async_row}


def run_row(row: str, name: str, rounds: int) -> float:
    path = f"data/wakeups/{os.getpid()}/{row}"
    if row == "port":
        return port_row(name, rounds)
    return float(ROWS[row](name, rounds, path))  # type: ignore[call-arg]


def strace_counts(row: str, name: str, rounds: int) -> dict[str, float]:
    """Syscalls per round trip of ``row``, both processes, from ``strace -f -c``."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        cmd = ["strace", "-f", "-c", "-o", out.name, sys.executable, __file__]
        cmd += ["--backend", name, "--rounds", str(rounds), "--only", row]
        subprocess.run(cmd, check=True, capture_output=True)
        counts: dict[str, float] = {}
        for line in out.read().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3]) / rounds
        return {k: v for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="sim")
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--only", default="port,sync,async")
    ap.add_argument("--strace", action="store_true")
    args = ap.parse_args()
    if args.backend == "sim":
        os.environ.setdefault("GNTIPC_SIM_DIR", tempfile.mkdtemp(prefix="gntipc-w") + "/sim")
    for row in args.only.split(","):
        rtt = run_row(row, args.backend, args.rounds)
        line = f"{row:6} round trip {rtt * 1e6:7.1f} µs, one wake-up {rtt / 2 * 1e6:6.1f} µs"
        if args.strace:
            counts = strace_counts(row, args.backend, min(args.rounds, 5000))
            line += "; syscalls per round trip: " + ", ".join(
                f"{k} {v:.1f}" for k, v in counts.items()
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
