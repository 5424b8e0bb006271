"""A session peer process for test_session.py (run as a script).

    python _session_peer.py PEER PATH N

Connects to domain PEER at PATH (backend from the environment), runs a
:class:`gntipc.Session` as the initiator and:

1. opens a stream, sends ``stalled`` on it and never reads it;
2. opens N streams at once; on stream i sends ``i`` (u32), then 10000 + 1000*i seeded
   bytes, then EOF, and checks the SHA-256 digest the other side sends back;
   prints ``verified N``;
3. opens one more stream, sends ``last``, prints ``waiting`` and sleeps (a test kills it).

The event loop is ``$GNTIPC_TEST_LOOP`` (asyncio or trio).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

import anyio

import gntipc


async def one(session: gntipc.Session, i: int) -> None:
    async with await session.open_stream() as st:
        data = random.Random(i).randbytes(10_000 + 1000 * i)
        await st.send(i.to_bytes(4, "little"))
        for pos in range(0, len(data), 3333):
            await st.send(data[pos : pos + 3333])
        await st.send_eof()
        digest = b""
        while True:
            try:
                digest += await st.receive()
            except anyio.EndOfStream:
                break
        if digest != hashlib.sha256(data).digest():
            raise SystemExit(f"stream {i}: bad digest")


async def main() -> None:
    peer, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    async with (
        await gntipc.connect(peer, path, timeout=30) as stream,
        gntipc.Session(stream) as session,
    ):
        stalled = await session.open_stream()
        await stalled.send(b"stalled")
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, session, i)
        print(f"verified {n}", flush=True)
        last = await session.open_stream()
        await last.send(b"last")
        print("waiting", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("GNTIPC_TEST_LOOP", "asyncio"))
