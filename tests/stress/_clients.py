"""Many clients of one listener (run as a script), for the exhaustion test.

    python -m stress._clients PEER PATH FIRST COUNT RESULT

Starts COUNT client tasks (ids FIRST..FIRST+COUNT-1) at once; each connects to domain
PEER at PATH, sends its id, expects it echoed, and closes.  Half of them share one
backend, the others open their own.  Writes ``id seconds`` lines (time to be served) or
``id ERROR text`` to RESULT.
"""

from __future__ import annotations

import sys
import time

import anyio

import gntipc

from ._common import die_with_parent


async def main() -> None:
    peer, path, first, count, result = sys.argv[1:]
    lines: list[str] = []
    shared = gntipc.get_backend("sim")

    async def client(i: int) -> None:
        t0 = time.monotonic()
        try:
            backend = shared if i % 2 else None
            async with await gntipc.connect(int(peer), path, timeout=120, backend=backend) as s:
                await s.send(i.to_bytes(8, "little"))
                echo = await s.receive_exactly(8)
                assert int.from_bytes(echo, "little") == i, echo
            lines.append(f"{i} {time.monotonic() - t0:.4f}")
        except Exception as exc:
            lines.append(f"{i} ERROR {type(exc).__name__}: {exc}".replace("\n", " "))

    try:
        async with anyio.create_task_group() as tg:
            for i in range(int(first), int(first) + int(count)):
                tg.start_soon(client, i)
    finally:
        shared.close()
        with open(result, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    die_with_parent()
    anyio.run(main)
