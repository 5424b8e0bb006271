"""A vchan relay, run as a process of simulated domain 5 by the CLI tests: it serves one
client of domain 4 at ``argv[1]``, connects to the server in domain 0 at ``argv[2]`` and
copies both ways.  Killing it breaks both vchans (what ``--resume`` must survive).

    GNTIPC_BACKEND=sim GNTIPC_SIM_DOMID=5 python tests/_vchan_relay.py PATH_A PATH_B
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
from anyio.abc import ByteStream

import gntipc

#: The command that runs it (with the paths appended).
COMMAND = [sys.executable, str(Path(__file__).resolve())]


async def _pipe(src: ByteStream, dst: ByteStream) -> None:
    async for data in src:
        await dst.send(data)
    await dst.send_eof()


async def main(path_a: str, path_b: str) -> None:
    async with await gntipc.listen(4, path_a) as listener:
        print("READY", flush=True)
        a = await listener.accept()
    b = await gntipc.connect(0, path_b, timeout=30)
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(_pipe, a, b)
        tg.start_soon(_pipe, b, a)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
