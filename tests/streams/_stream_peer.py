"""A gntipc peer process for the cross-process stream tests (run as a script).

    python _stream_peer.py MODE PEER PATH [ARGS...]

The backend comes from the environment (``GNTIPC_BACKEND``, ``GNTIPC_SIM_DOMID``,
``GNTIPC_SIM_DIR``).  Every mode connects as a client to domain PEER at PATH, prints
``ready``, then:

* ``echo``: send back everything received until end of stream; print ``echoed N``;
* ``bytes N SEED``: send N pseudo-random bytes, send EOF, print ``sent N``;
* ``msgs N BATCH``: send N ``Reading`` messages (``put`` one at a time if BATCH is 1,
  else ``put_many`` in batches), send EOF, print ``sent N``;
* ``source``: send a counter byte stream forever, printing ``sent TOTAL`` after every
  send (until killed);
* ``stall``: never read (until killed; a test kills it while our side is blocked
  sending).

The event loop is ``$GNTIPC_TEST_LOOP`` (asyncio or trio).
"""

from __future__ import annotations

import os
import random
import sys

import anyio
import msgspec

import gntipc


class Reading(msgspec.Struct):
    seq: int
    sensor: int
    value: float
    check: int


def reading(seq: int) -> Reading:
    return Reading(seq, seq % 17, seq * 0.25, (seq * 2654435761) & 0xFFFFFFFF)


async def main() -> None:
    mode, peer, path, *args = sys.argv[1:]
    async with await gntipc.connect(int(peer), path, timeout=30) as stream:
        print("ready", flush=True)
        if mode == "echo":
            n = 0
            while True:
                try:
                    data = await stream.receive()
                except anyio.EndOfStream:
                    break
                n += len(data)
                await stream.send(data)
            await stream.send_eof()
            print(f"echoed {n}", flush=True)
        elif mode == "bytes":
            n, seed = int(args[0]), int(args[1])
            data = random.Random(seed).randbytes(n)
            for i in range(0, n, 100_000):
                await stream.send(data[i : i + 100_000])
            await stream.send_eof()
            print(f"sent {n}", flush=True)
        elif mode == "msgs":
            n, batch = int(args[0]), int(args[1])
            queue = gntipc.MessageQueue(stream, Reading)
            if batch == 1:
                for i in range(n):
                    await queue.put(reading(i))
            else:
                for start in range(0, n, batch):
                    await queue.put_many([reading(i) for i in range(start, min(n, start + batch))])
            await stream.send_eof()
            print(f"sent {n}", flush=True)
        elif mode == "source":
            block = bytes(range(256)) * 256
            total = 0
            while True:
                await stream.send(block)
                total += len(block)
                print(f"sent {total}", flush=True)
        elif mode == "stall":
            await anyio.sleep_forever()
        else:
            raise SystemExit(f"unknown mode {mode}")
        # wait for the other side to finish before closing
        try:
            while True:
                await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("GNTIPC_TEST_LOOP", "asyncio"))
