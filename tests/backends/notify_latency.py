"""Measure one notify -> wake-up between two processes (prints; not a test).

    .venv/bin/python tests/backends/notify_latency.py [sim|xen] [rounds]

A ping-pong over two bound event-channel ports; one-way cost = round trip / 2.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import sys
import tempfile
import time


def _wait(port: object) -> None:
    fd = port.fileno()  # type: ignore[attr-defined]
    while True:
        select.select([fd], [], [])
        if port.pending():  # type: ignore[attr-defined]
            port.unmask()  # type: ignore[attr-defined]
            return


def _pong(name: str, q: object, back: object, rounds: int) -> None:
    from _peer import open_backend

    with open_backend(name, 1) as b:
        dom, port_no = q.get()  # type: ignore[attr-defined]
        with b.bind_interdomain(dom, port_no) as port:
            back.put(b.domid)  # type: ignore[attr-defined]
            for _ in range(rounds):
                _wait(port)
                port.notify()


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "sim"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    os.environ.setdefault("GNTIPC_SIM_DIR", tempfile.mkdtemp(prefix="gntipc-l") + "/sim")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _peer import open_backend

    ctx = multiprocessing.get_context("spawn")
    q, back = ctx.Queue(), ctx.Queue()
    with open_backend(name, 0) as b:
        proc = ctx.Process(target=_pong, args=(name, q, back, rounds))
        proc.start()
        with b.alloc_unbound(1 if name == "sim" else b.domid) as port:
            q.put((b.domid, port.port))
            back.get()
            t = time.perf_counter()
            for _ in range(rounds):
                port.notify()
                _wait(port)
            dt = time.perf_counter() - t
        proc.join()
    print(
        f"{name}: round trip {dt / rounds * 1e6:.1f} us, one notify->wake-up "
        f"{dt / rounds / 2 * 1e6:.1f} us ({rounds} rounds)"
    )


if __name__ == "__main__":
    main()
