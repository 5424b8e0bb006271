"""A gntipc peer for the cross-domain tests: runs in a domU (Debian's python3 with only
the stdlib, gntipc and its dependencies shipped in) or in dom0.

    python3 _domu_peer.py server|client PEER PATH NBYTES NMSG [--hold | --die]

1. connects (client) or accepts one client (server) over the async API, prints CONNECTED;
2. both ways at once: sends NBYTES of its pattern while receiving NBYTES of the peer's,
   checking every byte (prints ``BYTES ok N``);
3. with ``--hold``: prints HOLDING and sleeps until its domain is destroyed; with
   ``--die``: prints DYING, sends a few more bytes and SIGKILLs its own process (the
   domain lives on: its kernel performs the unmap notifications); otherwise
   NMSG typed messages: the client puts them, the server checks each and answers with a
   transformed copy, the client checks the answers (``MESSAGES ok N``);
4. the client closes; the server must then read EndOfStream; prints DONE, exits 0.

The byte pattern is the one ``vchan_peer.c`` uses.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import anyio
import msgspec
from anyio import EndOfStream

import gntipc

SEED_SERVER = 0x5A
SEED_CLIENT = 0xA5
_PERIOD = 65536


@functools.lru_cache(maxsize=4)
def _block(seed: int) -> bytes:
    return bytes(((i & 0xFF) + 7 * ((i >> 8) & 0xFF) + seed) & 0xFF for i in range(_PERIOD))


def pattern(seed: int, n: int, start: int = 0) -> bytes:
    """Bytes ``start .. start+n`` of ``(i & 0xff) + 7 * ((i >> 8) & 0xff) + seed`` (mod 256)."""
    block = _block(seed)
    first = start % _PERIOD
    reps = (first + n) // _PERIOD + 1
    return (block * reps)[first : first + n]


class Reading(msgspec.Struct):
    """A typed message of the tests."""

    seq: int
    value: float
    tag: str


def reading(i: int) -> Reading:
    return Reading(seq=i, value=i * 0.5, tag=f"sensor-{i}")


def answer(r: Reading) -> Reading:
    return Reading(seq=r.seq, value=r.value * 2, tag=r.tag.upper())


async def exchange_bytes(stream: gntipc.VchanStream, send: bytes, nrecv: int) -> bytes:
    """Send all of ``send`` while receiving ``nrecv`` bytes; the bytes received."""
    got = bytearray()

    async def sender() -> None:
        view = memoryview(send)
        while view:
            chunk = view[:32768]
            await stream.send(chunk)
            view = view[len(chunk) :]

    async def receiver() -> None:
        while len(got) < nrecv:
            got.extend(await stream.receive(nrecv - len(got)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        tg.start_soon(receiver)
    return bytes(got)


async def run(
    role: str, peer: int, path: str, nbytes: int, nmsg: int, hold: bool, die: bool = False
) -> None:
    if role == "server":
        async with await gntipc.listen(peer, path) as listener:
            stream = await listener.accept()
    else:
        stream = await gntipc.connect(peer, path, timeout=120)
    mine, theirs = (SEED_SERVER, SEED_CLIENT) if role == "server" else (SEED_CLIENT, SEED_SERVER)
    async with stream:
        print("CONNECTED", flush=True)
        got = await exchange_bytes(stream, pattern(mine, nbytes), nbytes)
        expected = pattern(theirs, nbytes)
        if got != expected:
            bad = next(
                (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), len(got)
            )
            raise AssertionError(f"byte {bad} of {nbytes} differs ({len(got)} received)")
        print(f"BYTES ok {nbytes}", flush=True)
        if hold:
            print("HOLDING", flush=True)
            await anyio.sleep_forever()
        if die:
            print("DYING", flush=True)
            await stream.send(b"last words")
            os.kill(os.getpid(), signal.SIGKILL)
        queue = gntipc.MessageQueue(stream, Reading)
        if role == "client":
            await queue.put_many([reading(i) for i in range(nmsg)])
            for i in range(nmsg):
                r = await queue.get()
                assert r == answer(reading(i)), (i, r)
            print(f"MESSAGES ok {nmsg}", flush=True)
        else:
            for i in range(nmsg):
                r = await queue.get()
                assert r == reading(i), (i, r)
                await queue.put(answer(r))
            print(f"MESSAGES ok {nmsg}", flush=True)
            try:
                extra = await queue.get()
            except EndOfStream:
                print("EOF ok", flush=True)
            else:
                raise AssertionError(f"unexpected message {extra!r}")
        await queue.aclose()
    print("DONE", flush=True)


def main(argv: list[str]) -> int:
    hold, die = "--hold" in argv, "--die" in argv
    args = [a for a in argv if a not in ("--hold", "--die")]
    if len(args) != 5 or args[0] not in ("server", "client"):
        print(__doc__, file=sys.stderr)
        return 2
    role, peer, path, nbytes, nmsg = args
    anyio.run(run, role, int(peer), path, int(nbytes), int(nmsg), hold, die)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
