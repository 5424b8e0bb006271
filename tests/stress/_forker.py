"""A fork server for the leak soak (run as a script): cheap peer processes to SIGKILL.

    python -m stress._forker

Reads commands on stdin, one per line, and answers ``pid PID`` for each:

* ``client PEER PATH NBYTES``: a child connects to the server of domain PEER at PATH;
* ``server PEER PATH NBYTES``: a child offers a channel to domain PEER at PATH (relative
  to its home) and waits for the client;

then the child writes NBYTES pattern bytes and waits until it is killed.  Children play
``$GNTIPC_SIM_DOMID`` and open their own backend after the fork (this process never opens
one), so forking is safe and costs a few milliseconds instead of a Python start-up.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from gntipc.backends import get_backend
from gntipc.channel import Vchan

from ._common import PATX, die_with_parent


def child(role: str, peer: int, path: str, nbytes: int) -> None:
    backend = get_backend("sim")
    if role == "client":
        ch = Vchan.client(backend, peer, path, timeout=30)
    else:
        ch = Vchan.server(backend, peer, path, read_size=4096, write_size=65536)
        while ch.is_open() == 2:
            ch.wait(1)
    sent = 0
    while sent < nbytes:
        n = min(nbytes - sent, 1 << 16)
        ch.write_all(memoryview(PATX)[sent % 65521 : sent % 65521 + n], timeout=30)
        sent += n
    while True:
        time.sleep(10)


def main() -> None:
    die_with_parent()
    for line in sys.stdin:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        role, peer, path, nbytes = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                die_with_parent()
                child(role, int(peer), path, int(nbytes))
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print("pid", pid, flush=True)


if __name__ == "__main__":
    main()
