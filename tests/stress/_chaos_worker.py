"""One end of a chaos lane (run as a script; the parent SIGKILLs it at random moments).

    python -m stress._chaos_worker ROLE PATH MODE SEED LOG STOPFILE

ROLE ``server`` (domain 1) listens at PATH and accepts clients one after the other;
``client`` (domain 2) connects, again and again.  Each connection ("session") is full
duplex: both sides send a random quota and receive until the end, then close.  MODE
``bytes`` streams a pattern (see ``_common.expected``) through the VchanStream; ``msgs``
sends checksummed ``Msg`` values through a MessageQueue.  A session's identity (``conn``)
is the grant ref of its control page, known to both sides.  The process stops after its
current session once STOPFILE exists.

Log lines (``_common.Log``; times are CLOCK_MONOTONIC):

``P phase t``            entering accept / connect / xfer / close
``S conn t``             session started
``q conn total``         units this side will send in the session
``w conn total``         total units (bytes or messages) sent so far: all in the ring
``e conn total``         EOF sent after ``total`` units
``r conn got bad why t`` receiving ended: units received, units corrupted, why (EOF,
                         BRK = BrokenResourceError, MAL = stream ended in a frame,
                         CLO = the stream was closed under the receiver)
``x conn why t``         sending ended early (BRK)
``C conn t``             closed
``X text``               an unexpected exception (then exit 1)
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import traceback
import zlib

import anyio
import msgspec

import gntipc

from ._common import PATX, PERIOD, Log, die_with_parent, expected, now, salt_for

SERVER_DOM = 1
CLIENT_DOM = 2
RING_SIZES = [1024, 2048, 4096, 16384, 65536, 262144]


class Msg(msgspec.Struct, array_like=True):
    seq: int
    salt: int
    blob: bytes
    check: int


def make_msg(seq: int, salt: int) -> Msg:
    n = (seq * 37 + salt) % 1500
    blob = expected(salt, seq * 101, n)
    return Msg(seq, salt, blob, zlib.crc32(blob, seq & 0xFFFFFFFF))


def msg_ok(m: Msg, seq: int, salt: int) -> bool:
    return m == make_msg(seq, salt)


def quota(rnd: random.Random, mode: str) -> int:
    """Units to send in one session: often none or few (so that kills land in connect,
    accept and close too), sometimes megabytes."""
    x = rnd.random()
    if x < 0.25:
        return 0
    if mode == "msgs":
        return rnd.randint(1, 200) if x < 0.7 else rnd.randint(200, 20000)
    if x < 0.6:
        return rnd.randint(1, 65536)
    if x < 0.9:
        return rnd.randint(65536, 2 << 20)
    return rnd.randint(2 << 20, 8 << 20)


class Session:
    def __init__(self, log: Log, conn: int, role: str, rnd: random.Random) -> None:
        self.log = log
        self.conn = conn
        self.rnd = rnd
        self.out_salt = salt_for(conn, "s2c" if role == "server" else "c2s")
        self.in_salt = salt_for(conn, "c2s" if role == "server" else "s2c")

    # -- bytes ---------------------------------------------------------------------
    async def send_bytes(self, stream: gntipc.VchanStream, total: int) -> None:
        log, rnd, sent = self.log, self.rnd, 0
        view = memoryview(PATX)
        try:
            while sent < total:
                n = min(total - sent, rnd.choice((1, 7, 100, 1000, 4096, 30000, 65536, 200000)))
                start = (sent + self.out_salt) % PERIOD
                await stream.send(view[start : start + n])
                sent += n
                log("w", self.conn, sent)
            await stream.send_eof()
            log("e", self.conn, sent)
        except anyio.BrokenResourceError:
            log("x", self.conn, "BRK", now())

    async def recv_bytes(self, stream: gntipc.VchanStream) -> None:
        got = bad = 0
        why = "?"
        try:
            while True:
                data = await stream.receive(self.rnd.choice((1, 100, 4096, 65536, 1 << 18)))
                want = expected(self.in_salt, got, len(data))
                if data != want:
                    bad += sum(a != b for a, b in zip(data, want, strict=True))
                got += len(data)
        except anyio.EndOfStream:
            why = "EOF"
        except anyio.BrokenResourceError:
            why = "BRK"
        except anyio.ClosedResourceError:
            why = "CLO"  # closed under us (see recv_msgs)
        self.log("r", self.conn, got, bad, why, now())

    # -- messages ------------------------------------------------------------------
    async def send_msgs(self, queue: gntipc.MessageQueue[Msg], total: int) -> None:
        log, rnd, sent = self.log, self.rnd, 0
        try:
            while sent < total:
                k = min(total - sent, rnd.choice((1, 1, 5, 50, 500)))
                batch = [make_msg(sent + i, self.out_salt) for i in range(k)]
                if k == 1:
                    await queue.put(batch[0])
                else:
                    await queue.put_many(batch)
                sent += k
                log("w", self.conn, sent)
            await queue.stream.send_eof()
            log("e", self.conn, sent)
        except anyio.BrokenResourceError:
            log("x", self.conn, "BRK", now())

    async def recv_msgs(self, queue: gntipc.MessageQueue[Msg]) -> None:
        got = bad = 0
        why = "?"
        truncated = False
        while True:
            try:
                if self.rnd.random() < 0.5:
                    msgs = await queue.get_many(self.rnd.choice((1, 10, 1000)))
                else:
                    msgs = [await queue.get()]
            except anyio.EndOfStream:
                why = "MAL" if truncated else "EOF"
                break
            except anyio.BrokenResourceError:
                why = "MAL" if truncated else "BRK"
                break
            except anyio.ClosedResourceError:
                # Known bug: a put_many larger than the ring that fails with
                # BrokenResourceError after a partial write closes the whole stream, so
                # the receive direction loses what the dead peer wrote
                # (test_found_bugs.py::test_failed_partial_put_keeps_receive_direction).
                why = "CLO"
                break
            except gntipc.MalformedMessage:
                # Documented for a stream that ends inside a frame (the writer died
                # mid-put); anything after it would be corruption.
                truncated = True
                continue
            if truncated:
                bad += len(msgs)
            for m in msgs:
                if not msg_ok(m, got, self.in_salt):
                    bad += 1
                got += 1
        self.log("r", self.conn, got, bad, why, now())


async def run(role: str, path: str, mode: str, seed: int, log: Log, stop: str) -> None:
    rnd = random.Random(seed)
    listener = None
    if role == "server":
        listener = await gntipc.listen(
            CLIENT_DOM,
            path,
            read_size=rnd.choice(RING_SIZES),
            write_size=rnd.choice(RING_SIZES),
        )

    async def until_stopped(scope: anyio.CancelScope) -> None:
        while not os.path.exists(stop):
            await anyio.sleep(0.05)
        scope.cancel()

    try:
        while not os.path.exists(stop):
            stream = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(until_stopped, tg.cancel_scope)
                if listener is not None:
                    log("P", "accept", now())
                    stream = await listener.accept()
                else:
                    log("P", "connect", now())
                    stream = await gntipc.connect(SERVER_DOM, path, timeout=300)
                tg.cancel_scope.cancel()
            if stream is None:
                break
            conn = stream.vchan.endpoint._pages[0].refs[0]
            log("S", conn, now())
            log("P", "xfer", now())
            s = Session(log, conn, role, rnd)
            n = quota(rnd, mode)
            log("q", conn, n)
            async with anyio.create_task_group() as tg:
                if mode == "bytes":
                    tg.start_soon(s.send_bytes, stream, n)
                    tg.start_soon(s.recv_bytes, stream)
                else:
                    queue = gntipc.MessageQueue(stream, Msg)
                    tg.start_soon(s.send_msgs, queue, n)
                    tg.start_soon(s.recv_msgs, queue)
            log("P", "close", now())
            await stream.aclose()
            log("C", conn, now())
    finally:
        if listener is not None:
            await listener.aclose()


def main() -> None:
    die_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks on a hang
    role, path, mode, seed, log_path, stop = sys.argv[1:]
    log = Log(log_path)
    try:
        anyio.run(run, role, path, mode, int(seed), log, stop)
    except BaseException:
        log("X", traceback.format_exc().replace("\n", " | "))
        raise


if __name__ == "__main__":
    main()
