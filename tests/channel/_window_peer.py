"""The peer of the wait-window tests: a vchan client that acts on command.

    python _window_peer.py SERVER_DOMID PATH

Connects, prints ``ready``, then reads commands from stdin, one per line, and prints
``done`` after each:

* ``data``: write 100 bytes of ``d`` and read (drain) what the ring holds now;
* ``eof``: send EOF (half-close);
* ``close``: close the channel cleanly and exit.

The test kills it with SIGKILL for the fourth event.
"""

from __future__ import annotations

import sys

from gntipc.backends import get_backend
from gntipc.channel import Vchan


def main() -> None:
    server, path = int(sys.argv[1]), sys.argv[2]
    with get_backend() as backend, Vchan.client(backend, server, path, timeout=30) as ch:
        print("ready", flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "data":
                ch.write_all(b"d" * 100, timeout=10)
                ch.read_nowait(1 << 20)
            elif cmd == "eof":
                ch.send_eof()
            elif cmd == "close":
                ch.close()
                print("done", flush=True)
                return
            print("done", flush=True)


if __name__ == "__main__":
    main()
