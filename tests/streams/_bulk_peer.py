"""A bulk-transfer peer process for the cross-process bulk tests (run as a script).

    python _bulk_peer.py MODE PEER PATH [ARGS...]

The backend comes from the environment (``GNTIPC_BACKEND``, ``GNTIPC_SIM_DOMID``,
``GNTIPC_SIM_DIR``).  Every mode connects as a client to domain PEER at PATH, opens the
bulk layer, prints ``ready``, then:

* ``send N BUFFERS SIZE``: lend from a pool of BUFFERS x SIZE bytes; payload k (N of
  them, SIZE - k bytes each) is filled with byte ``k % 251``; send EOF, print ``sent N``,
  then wait for the other side to close;
* ``lend BUFFERS SIZE``: lend every buffer at once (filled with 0xAB), print ``lent``,
  then sleep until killed (a test kills it mid-loan);
* ``hold``: no pool; receive loans and never release them, printing ``holding K`` after
  each, until killed;
* ``echo BUFFERS SIZE``: a bulk message queue of :class:`Meta` (``open_bulk_queue``,
  a pool of BUFFERS x SIZE bytes): every message is answered with ``Meta(k, n, crc32 of
  its attachment)`` and, if it had one, a loan of ours holding the attachment's bytes
  reversed; at the other side's EOF, send EOF, print ``echoed N``, wait for the close.

The event loop is ``$GNTIPC_TEST_LOOP`` (asyncio or trio).
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib

import anyio
import msgspec

import gntipc
from gntipc.bulk import open_bulk, open_bulk_queue


class Meta(msgspec.Struct):
    """The message of the ``echo`` mode (the tests send it too)."""

    k: int
    n: int
    crc: int = 0


async def echo(stream: gntipc.VchanStream, buffers: int, size: int) -> None:
    async with await open_bulk_queue(stream, Meta, buffers=buffers, buffer_size=size) as queue:
        print("ready", flush=True)
        count = 0
        async for message, attachment in queue:
            if attachment is None:
                await queue.put(Meta(message.k, -1))
                continue
            with attachment as view:
                crc = zlib.crc32(view)
                async with queue.loan(len(view)) as buf:
                    buf[:] = view[::-1]
                    attachment.release()  # (before the put: the peer may wait for it)
                    await queue.put(Meta(message.k, len(buf), crc), attachment=buf)
            count += 1
        await queue.send_eof()
        print(f"echoed {count}", flush=True)
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            await queue.get()  # ends when the other side closes


async def main() -> None:
    mode, peer, path, *args = sys.argv[1:]
    stream = await gntipc.connect(int(peer), path, timeout=30)
    if mode == "echo":
        await echo(stream, int(args[0]), int(args[1]))
        return
    if mode in ("send", "lend"):
        buffers, size = int(args[-2]), int(args[-1])
    else:
        buffers, size = 0, 0
    async with await open_bulk(stream, buffers=buffers, buffer_size=size) as bulk:
        print("ready", flush=True)
        if mode == "send":
            n = int(args[0])
            for k in range(n):
                async with bulk.loan(size - k) as buf:
                    buf[:] = bytes([k % 251]) * len(buf)
                    await bulk.send(buf)
            await bulk.send_eof()
            print(f"sent {n}", flush=True)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await bulk.receive()  # the other side lends nothing: ends when it closes
        elif mode == "lend":
            for _ in range(buffers):
                async with bulk.loan() as buf:
                    buf[:] = b"\xab" * len(buf)
                    await bulk.send(buf)
            print("lent", flush=True)
            await anyio.sleep_forever()
        elif mode == "hold":
            held = []
            while True:
                held.append(await bulk.receive())
                print(f"holding {len(held)}", flush=True)
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("GNTIPC_TEST_LOOP", "asyncio"))
