"""Ring helpers for the tests, and a producer/consumer process for the two-process stress test.

Layout of the shared region: page 0 holds cons (u32 at 0), prod (u32 at 4), the byte the
writer honours (8) and the byte the reader honours (9); the ring data starts at 4096.

    python _ring_peer.py produce|consume FD RING_SIZE TOTAL SEED WAKE_FD WAIT_FD
The producer writes TOTAL pseudo-random bytes in chunks of varying size, the consumer reads
them back in chunks of varying size; both print the blake2b of the stream.  Each signals
the other through a pipe (WAKE_FD) only when the ring says the peer asked to be notified,
and blocks on its own pipe (WAIT_FD) after prepare_wait: a lost wake-up is a timeout.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import select
import sys
from typing import Any

from gntipc._native import ffi, lib

DATA_OFFSET = 4096


def make_ring(base: Any, size: int, priv: int, *, writer: bool) -> Any:
    """A ``struct gnt_ring`` over the shared region at cdata pointer ``base``."""
    r = ffi.new("struct gnt_ring *")
    u8 = ffi.cast("uint8_t *", base)
    r.cons = ffi.cast("uint32_t *", base)
    r.prod = ffi.cast("uint32_t *", base) + 1
    r.data = u8 + DATA_OFFSET
    r.size = size
    r.priv = priv
    writer_byte, reader_byte = u8 + 8, u8 + 9
    r.own_notify, r.peer_notify = (
        (writer_byte, reader_byte) if writer else (reader_byte, writer_byte)
    )
    return r


def wait(fd: int) -> None:
    if not select.select([fd], [], [], 10)[0]:
        raise SystemExit("lost wake-up: no notification within 10 s")
    os.read(fd, 4096)


def main() -> None:
    role, fd, size, total, seed, wake_fd, wait_fd = sys.argv[1], *map(int, sys.argv[2:])
    mm = mmap.mmap(fd, DATA_OFFSET + size)
    base = ffi.from_buffer(mm)
    start = int.from_bytes(mm[0:4], "little")  # both indices start here
    ring = make_ring(base, size, start, writer=(role == "produce"))
    rng = random.Random(seed)
    block = random.Random(seed ^ 0x5EED).randbytes(1 << 20)
    h = hashlib.blake2b()
    notify = ffi.new("int *")
    done = 0
    if role == "produce":
        src = ffi.from_buffer(block)
        while done < total:
            off = rng.randrange(len(block) // 2)
            n = min(rng.randrange(1, len(block) // 2), total - done)
            got = lib.gnt_ring_write(ring, src + off, n, 0, notify)
            assert got >= 0, got
            if got:
                h.update(block[off : off + got])
                done += got
                if notify[0]:
                    os.write(wake_fd, b"w")
            elif lib.gnt_ring_prepare_wait_write(ring) == 0:
                wait(wait_fd)
        ffi.release(src)
    else:
        buf = bytearray(1 << 19)
        dst = ffi.from_buffer(buf)
        while done < total:
            n = rng.randrange(1, len(buf))
            got = lib.gnt_ring_read(ring, dst, n, 0, notify)
            assert got >= 0, got
            if got:
                h.update(memoryview(buf)[:got])
                done += got
                if notify[0]:
                    os.write(wake_fd, b"r")
            elif lib.gnt_ring_prepare_wait_read(ring) == 0:
                wait(wait_fd)
        ffi.release(dst)
    ffi.release(base)
    mm.close()
    print(done, h.hexdigest(), flush=True)


if __name__ == "__main__":
    main()
