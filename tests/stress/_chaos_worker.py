"""One end of a chaos lane (run as a script; the parent SIGKILLs it at random moments).

    python -m stress._chaos_worker ROLE PATH MODE SEED LOG STOPFILE [steady]

ROLE ``server`` (domain 1) listens at PATH and accepts clients one after the other;
``client`` (domain 2) connects, again and again.  Each connection ("session") is full
duplex: both sides send a random quota and receive until the end, then close.  MODE
``bytes`` streams a pattern (see ``_common.expected``) through the VchanStream; ``msgs``
sends checksummed ``Msg`` values through a MessageQueue.  A session's identity (``conn``)
is the grant ref of its control page, known to both sides.  The process stops after its
current session once STOPFILE exists.

With ``steady`` the lane is never killed: it runs one session until STOPFILE exists,
both sides sending without end, with pauses (so that each side often waits for the
other: a lost wake-up there stalls the session, and the driver counts it as a hang).

Log lines (``_common.Log``; times are CLOCK_MONOTONIC):

``P phase t``            entering accept / connect / xfer / close
``A conn``               announced itself in the store (its presence node is written)
``S conn t``             session started
``q conn total``         units this side will send in the session
``w conn total``         total units (bytes or messages) sent so far: all in the ring
``f conn``               about to send EOF (a reader's EndOfStream needs this line)
``e conn total``         EOF sent after ``total`` units
``g conn got t``         units received so far (at most every 0.1 s: progress)
``r conn got bad why t`` receiving ended: units received, units corrupted, why (EOF,
                         BRK = BrokenResourceError, MAL = stream ended in a frame,
                         CLO = the stream was closed under the receiver: a failure)
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
from collections.abc import Callable

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
    def __init__(
        self, log: Log, conn: int, role: str, rnd: random.Random, stop: str | None = None
    ) -> None:
        self.log = log
        self.conn = conn
        self.rnd = rnd
        #: Steady: send until this file exists, pausing now and then (see the module).
        self.stop = stop
        self.progress_at = 0.0
        self.out_salt = salt_for(conn, "s2c" if role == "server" else "c2s")
        self.in_salt = salt_for(conn, "c2s" if role == "server" else "s2c")

    def more(self, sent: int, total: int) -> bool:
        if self.stop is None:
            return sent < total
        return not os.path.exists(self.stop)

    async def pause(self) -> None:
        """Steady sessions only: now and then, let the other side catch up (or wait)."""
        if self.stop is not None and self.rnd.random() < 0.5:
            await anyio.sleep(self.rnd.choice((0, 0.0005, 0.002, 0.005)))

    def progress(self, got: int) -> None:
        t = now()
        if t - self.progress_at >= 0.1:
            self.progress_at = t
            self.log("g", self.conn, got, t)

    # -- bytes ---------------------------------------------------------------------
    async def send_bytes(self, stream: gntipc.VchanStream, total: int) -> None:
        log, rnd, sent = self.log, self.rnd, 0
        view = memoryview(PATX)
        try:
            while self.more(sent, total):
                n = rnd.choice((1, 7, 100, 1000, 4096, 30000, 65536, 200000))
                if self.stop is None:
                    n = min(total - sent, n)
                start = (sent + self.out_salt) % PERIOD
                await stream.send(view[start : start + n])
                sent += n
                log("w", self.conn, sent)
                await self.pause()
            log("f", self.conn)
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
                self.progress(got)
                await self.pause()
        except anyio.EndOfStream:
            why = "EOF"
        except anyio.BrokenResourceError:
            why = "BRK"
        except anyio.ClosedResourceError:
            why = "CLO"  # closed under us: counted as a failure (see recv_msgs)
        self.log("r", self.conn, got, bad, why, now())

    # -- messages ------------------------------------------------------------------
    async def send_msgs(self, queue: gntipc.MessageQueue[Msg], total: int) -> None:
        log, rnd, sent = self.log, self.rnd, 0
        try:
            while self.more(sent, total):
                k = rnd.choice((1, 1, 5, 50, 500))
                if self.stop is None:
                    k = min(total - sent, k)
                batch = [make_msg(sent + i, self.out_salt) for i in range(k)]
                if k == 1:
                    await queue.put(batch[0])
                else:
                    await queue.put_many(batch)
                sent += k
                # A put in a burst may hold its frame back until the loop runs again
                # (documented: "accepted", not yet in the ring); "w" says "in the ring".
                await anyio.lowlevel.checkpoint()
                log("w", self.conn, sent)
                await self.pause()
            log("f", self.conn)
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
                # Must not happen (bug 1, fixed in 2955da5: a put_many that failed with
                # BrokenResourceError after a partial write closed the whole stream, and
                # the receive direction lost what the dead peer wrote); the driver counts
                # it as a failure
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
            self.progress(got)
            await self.pause()
        self.log("r", self.conn, got, bad, why, now())


def log_announcements(log: Log) -> None:
    """Log ``A conn`` once our presence node is written: from then on the peer must
    read our crash as one (BrokenResourceError, never EndOfStream)."""
    from gntipc._keys import Presence

    def logged(real: Callable[[Presence], None]) -> Callable[[Presence], None]:
        def announce(self: Presence) -> None:
            real(self)
            log("A", self._ref)

        return announce

    Presence.announce_client = logged(Presence.announce_client)  # type: ignore[method-assign]
    Presence.announce_server = logged(Presence.announce_server)  # type: ignore[method-assign]


async def run(
    role: str, path: str, mode: str, seed: int, log: Log, stop: str, steady: bool = False
) -> None:
    rnd = random.Random(seed)
    log_announcements(log)
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
            s = Session(log, conn, role, rnd, stop if steady else None)
            n = 0 if steady else quota(rnd, mode)
            if not steady:
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
    role, path, mode, seed, log_path, stop, *flags = sys.argv[1:]
    log = Log(log_path)
    try:
        anyio.run(run, role, path, mode, int(seed), log, stop, flags == ["steady"])
    except BaseException:
        log("X", traceback.format_exc().replace("\n", " | "))
        raise


if __name__ == "__main__":
    main()
