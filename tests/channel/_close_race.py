"""Close a vchan from one thread while other threads use it (run as a child process, so
that a crash is a failed exit status rather than a dead test run).

    python _close_race.py MODE ITERATIONS [PEER]

Each iteration connects a pair (``PEER`` = ``loopback``: this process plays both ends;
``process``: the server is a ``_peer.py`` process in another domain that only reads
until our close), starts the threads of MODE on the client, lets them
run for a random moment, closes the client from the main thread, and joins them.

A thread may see its calls succeed; once the close is under way every call must raise
``anyio.ClosedResourceError`` and nothing else, a blocked call must wake up, and no
thread may outlive the close by more than a few seconds.  Exit status 0 and a line
``ok N`` when all iterations pass; otherwise a traceback, exit status 1 (or death by a
signal).

MODEs:

* ``busy-writer`` / ``busy-reader``: ``write_nowait`` / ``read_nowait`` in a tight loop
  (the loopback server drains / feeds the ring from another thread, so the rings move);
* ``blocked-reader``: ``read()`` with no timeout on an empty ring;
* ``blocked-writer``: ``write()`` with no timeout on a full ring;
* ``mixed``: a busy reader, a busy writer and a thread calling the status and
  wait-protocol methods, all at once.
"""

from __future__ import annotations

import faulthandler
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from gntipc.backends import get_backend
from gntipc.backends.sim import assert_cleaned_up
from gntipc.channel import Vchan

RING = 4096
JOIN = 10.0
_paths = itertools.count()


class Failure(Exception):
    pass


def run_thread(errors: list[BaseException], target: Callable[[], None]) -> threading.Thread:
    def body() -> None:
        try:
            target()
        except ClosedResourceError:
            pass  # the only way out of a loop below once the close began
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def client_threads(mode: str, cli: Vchan, started: threading.Event) -> list[Callable[[], None]]:
    def busy_writer() -> None:
        started.set()
        while True:
            cli.write_nowait(b"w" * random.randint(1, 3000))

    def busy_reader() -> None:
        started.set()
        while True:
            cli.read_nowait(random.randint(1, 5000))

    def blocked_reader() -> None:
        started.set()
        while True:  # the server never writes: this blocks until the close
            cli.read(100)

    def blocked_writer() -> None:
        started.set()
        while True:
            cli.write(b"x" * RING)

    def status() -> None:
        started.set()
        while True:
            cli.data_ready()
            cli.buffer_space()
            cli.readable()
            cli.is_open()
            cli.peek_nowait(10)
            cli.prepare_wait_read()
            cli.prepare_wait_write()
            cli.handle_events()
            cli.wait(0.001)

    return {
        "busy-writer": [busy_writer],
        "busy-reader": [busy_reader],
        "blocked-reader": [blocked_reader],
        "blocked-writer": [blocked_writer],
        "mixed": [busy_reader, busy_writer, status],
    }[mode]


def server_pump(srv: Vchan, stop: threading.Event) -> None:
    """Keep the loopback server's rings moving: drain what the client writes, feed what
    it reads (never when the mode wants an empty or full ring: see main())."""
    try:
        while not stop.is_set():
            srv.read_nowait(RING)
            srv.write_nowait(b"r" * random.randint(1, 2000))
            # Ask for wake-ups: the client's next read and write must then notify, so
            # its calls also race the close on the event port, after the ring lock.
            srv.prepare_wait_read()
            srv.prepare_wait_write()
    except (EndOfStream, BrokenResourceError, ClosedResourceError):
        pass


def start_process_server(domid: int, path: str) -> subprocess.Popen[str]:
    env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(domid + 1))
    peer = str(Path(__file__).with_name("_peer.py"))
    # "sink": the server reads until our close, so our busy writer's ring drains.
    proc = subprocess.Popen(
        [sys.executable, peer, "server", str(domid), path, "sink"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        raise Failure(f"peer said {line!r}")
    return proc


def iteration(backend_domid: int, mode: str, peer: str, rnd: random.Random) -> None:
    backend = get_backend("sim", domid=backend_domid)
    try:
        path = f"/local/domain/{backend_domid + (peer == 'process')}/data/close-race/" + (
            f"{os.getpid()}/{next(_paths)}"
        )
        proc = None
        srv = None
        if peer == "loopback":
            srv = Vchan.server(backend, backend_domid, path, read_size=RING, write_size=RING)
        else:
            proc = start_process_server(backend_domid, path)
        cli = Vchan.client(backend, backend_domid + (peer == "process"), path, timeout=30)
        stop = threading.Event()
        pump = None
        if srv is not None:
            srv.handle_events()
            if mode == "blocked-writer":
                pass  # nobody drains: the client's ring fills and its write blocks
            elif mode != "blocked-reader":
                pump = threading.Thread(target=server_pump, args=(srv, stop), daemon=True)
                pump.start()
        started = threading.Event()
        errors: list[BaseException] = []
        threads = [run_thread(errors, t) for t in client_threads(mode, cli, started)]
        if not started.wait(JOIN):
            raise Failure("the threads did not start")
        time.sleep(rnd.choice([0, 0, 0.0001, 0.001, 0.005, 0.02]))
        cli.close()
        deadline = time.monotonic() + JOIN
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                faulthandler.dump_traceback(sys.stderr)
                raise Failure(f"{mode}: a thread is still running {JOIN} s after close()")
        if errors:
            raise Failure(f"{mode}: a thread raised {errors[0]!r}") from errors[0]
        stop.set()
        if pump is not None:
            pump.join(JOIN)
        if srv is not None:
            srv.close()
        if proc is not None:
            out, _ = proc.communicate(timeout=30)
            if proc.returncode != 0 or "EndOfStream" not in out:
                raise Failure(f"the peer saw no clean close: {out!r}, exit {proc.returncode}")
    finally:
        backend.close()


def main() -> None:
    faulthandler.enable()
    mode, count, *rest = sys.argv[1:]
    peer = rest[0] if rest else "loopback"
    rnd = random.Random(os.getpid())
    domid = 40 + os.getpid() % 1000 * 2
    for _ in range(int(count)):
        iteration(domid, mode, peer, rnd)
    assert_cleaned_up()
    print(f"ok {count}", flush=True)


if __name__ == "__main__":
    main()
