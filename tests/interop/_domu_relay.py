"""A byte relay between two vchans, for running the generic stream conformance suites
across domains: it runs in a domU (Debian's python3, the stdlib, gntipc and its
dependencies shipped in) or, on the sim backend, in a process playing another domain.

    python3 _domu_relay.py PEER PATH [READ_SIZE WRITE_SIZE]

It listens at PATH (relative to its own XenStore home) for clients of domain PEER (with
these ring sizes: client to relay, relay to client; 65536 each by default), and
serves any number of them, one after the other or at once.  A client first sends a
header: the length of a path (u16, big-endian) and the path (UTF-8, relative to PEER's
home).  The relay connects to the server of PEER at that path, and from then on forwards
the bytes both ways, so the client's stream and the stream PEER accepted there behave as
the two ends of one byte stream.  The relay is a server (first channel) and a client
(second channel) for every pair: both roles cross the domain boundary.

What the ends see, as on one stream:

* bytes, in order, each direction independently;
* the end of a direction: when one end sends EOF or closes, the relay reads EndOfStream
  after the last byte and sends EOF on the other channel;
* a peer that is gone: when the relay cannot deliver to one end (BrokenResourceError),
  it stops reading that direction; once the other direction has ended too, both channels
  are closed, so the other end's sends fail.  An end that breaks (its process or domain
  died) makes the relay close the other channel at once.

Prints ``RELAYING`` once the listener is up, and ``ERROR ...`` (then goes on) for a
pair the relay could not set up or forward.  Runs until killed (its domain destroyed).
"""

from __future__ import annotations

import contextlib
import sys

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

import gntipc

#: The most bytes forwarded per receive (one default ring).
CHUNK = 65536
#: Seconds a new client gets to send its header and for the relay to reach its target.
SETUP_TIMEOUT = 120


async def _pump(src: gntipc.VchanStream, dst: gntipc.VchanStream) -> None:
    """Forward ``src`` to ``dst`` until ``src`` ends or ``dst`` cannot take more."""
    while True:
        try:
            data = await src.receive(CHUNK)
        except EndOfStream:
            # An end that is gone already needs no telling.
            with contextlib.suppress(BrokenResourceError, ClosedResourceError):
                await dst.send_eof()
            return
        except BrokenResourceError:
            await dst.aclose()  # the other end must learn at once that this one is gone
            return
        except ClosedResourceError:
            return  # the other pump closed it (its source broke)
        try:
            await dst.send(data)
        except (BrokenResourceError, ClosedResourceError):
            return  # nobody reads this direction any more


async def _relay(peer: int, client: gntipc.VchanStream) -> None:
    """Serve one client: read its header, connect to its target, forward both ways."""
    try:
        with anyio.fail_after(SETUP_TIMEOUT):
            size = int.from_bytes(await client.receive_exactly(2), "big")
            target = (await client.receive_exactly(size)).decode()
            onward = await gntipc.connect(peer, target, timeout=SETUP_TIMEOUT)
    except Exception as exc:  # one bad pair must not end the relay: report, go on
        print(f"ERROR setting up a pair: {type(exc).__name__}: {exc}", flush=True)
        return
    try:
        async with onward, anyio.create_task_group() as tg:
            tg.start_soon(_pump, client, onward)
            tg.start_soon(_pump, onward, client)
    except Exception as exc:
        print(f"ERROR forwarding to {target}: {type(exc).__name__}: {exc}", flush=True)


async def run(peer: int, path: str, read_size: int = CHUNK, write_size: int = CHUNK) -> None:
    async with await gntipc.listen(
        peer, path, read_size=read_size, write_size=write_size
    ) as listener:
        print("RELAYING", flush=True)
        await listener.serve(lambda stream: _relay(peer, stream))


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4):
        print(__doc__, file=sys.stderr)
        return 2
    peer, path, *sizes = argv
    read_size, write_size = (int(sizes[0]), int(sizes[1])) if sizes else (CHUNK, CHUNK)
    anyio.run(run, int(peer), path, read_size, write_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
