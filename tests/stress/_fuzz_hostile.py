"""A hostile vchan peer (run as a script): it follows the protocol (publishes or connects,
writes and reads data, sends events) but, driven by a seed, rewrites fields of the shared
control page and the rings at random moments.

    python -m stress._fuzz_hostile ROLE PEER PATH SEED STOPFILE RESULT

ROLE ``server`` offers channels at PATH to the target's domain PEER, one episode after
the other (and sometimes corrupts the page *before* the target maps it: orders, grants,
live byte); ``client`` connects to the target's listener at PATH, again and again.
The backend is ``$GNTIPC_BACKEND`` (sim, or real Xen: the pages are then real grants,
shared with gntalloc or mapped with gntdev, written the same way).

Mutations: indices (its own and the target's) behind, ahead, a ring ahead and far past
the ring; orders; live and notify bytes (with and without the EOF bit); grants[]; bytes
of both rings; message frames with lying headers, undecodable payloads and truncations,
batch frames (good, lying about their count, array bombs, the wrong element type) and
frames larger than the target's receive chunk (whole, or announcing up to 1 MiB and cut
short);
bursts of events.  Stops when STOPFILE exists, and writes what it did to RESULT (JSON:
episodes, mutations by kind, frames by kind, traffic by outcome), so that the test can
tell a hostile peer from an inert one.  An unexpected exception ends the process (the
test reports a hostile peer that exits early, with its stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import msgspec
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from gntipc._exceptions import GntipcError
from gntipc.backends import Backend, get_backend
from gntipc.channel import Vchan
from gntipc.protocol._layout import (
    OFF_CLI_LIVE,
    OFF_CLI_NOTIFY,
    OFF_GRANTS,
    OFF_LEFT_CONS,
    OFF_LEFT_ORDER,
    OFF_LEFT_PROD,
    OFF_RIGHT_CONS,
    OFF_RIGHT_ORDER,
    OFF_RIGHT_PROD,
    OFF_SRV_LIVE,
    OFF_SRV_NOTIFY,
)

from ._common import die_with_parent, time_scale

P = TypeVar("P")

#: The domains the two sides play on the sim (on Xen both are processes of dom0).
TARGET_DOM = 3
HOSTILE_DOM = 4
#: Patience (and episode lengths) grow with the workers' slowness.
SCALE = time_scale()
SIZES = [1024, 2048, 4096, 8192, 65536]

U32 = struct.Struct("<I")
U16 = struct.Struct("<H")


class Msg(msgspec.Struct, array_like=True):
    """What the target's MessageQueue expects."""

    seq: int
    body: bytes


ENC = msgspec.msgpack.Encoder()

#: The kinds of :meth:`Hostile.mutate`, by its random pick (0-9).
MUTATIONS = (
    "own index",
    "own index",
    "target's index",
    "order",
    "live byte",
    "notify byte",
    "grants",
    "ring bytes",
    "event burst",
    "restore",
)
#: The kinds of :meth:`Hostile.frame`, by its random pick (0-13).
FRAMES = ("good",) * 3 + (
    "huge header",
    "undecodable",
    "wrong type",
    "lying header",
    "empty",
    "good batch",
    "lying batch count",
    "array bomb",
    "wrong element type",
    "large",
    "large, cut short",
)
#: What a vchan operation of a live peer may raise (the target misbehaves too: it may
#: close, send garbage or leave at any moment).
VCHAN_ERRORS = (GntipcError, BrokenResourceError, EndOfStream, ClosedResourceError)
#: What this process did, by kind (written to RESULT).
COUNTS: dict[str, Counter[str]] = {
    k: Counter() for k in ("episodes", "mutations", "frames", "traffic")
}


class Hostile:
    def __init__(self, role: str, ch: Vchan, rnd: random.Random) -> None:
        self.role = role
        self.ch = ch
        self.rnd = rnd
        ep = ch.endpoint
        pages = ep._pages
        self.views = [p.mapping.view() for p in pages]
        self.ctrl = self.views[0]
        left_order, right_order = struct.unpack_from("<HH", self.ctrl, OFF_LEFT_ORDER)
        self.orders = (left_order, right_order)
        # Ring memory (where writable): in-page rings live in the control page.
        rings: list[memoryview] = []
        ext = iter(self.views[1:])
        for order in (left_order, right_order):
            if order <= 11:
                off = 1024 if order == 10 else 2048
                rings.append(self.ctrl[off : off + (1 << order)])
            else:
                v = next(ext, None)
                if v is not None and not v.readonly:
                    rings.append(v)
        self.rings = rings
        server = role == "server"
        # (own index offset, target index offset) of the ring we write and the one we read.
        self.own = (OFF_RIGHT_PROD, OFF_LEFT_CONS) if server else (OFF_LEFT_PROD, OFF_RIGHT_CONS)
        self.theirs = (OFF_LEFT_PROD, OFF_RIGHT_CONS) if server else (OFF_RIGHT_PROD, OFF_LEFT_CONS)
        self.sizes = {
            OFF_LEFT_CONS: 1 << left_order,
            OFF_LEFT_PROD: 1 << left_order,
            OFF_RIGHT_CONS: 1 << right_order,
            OFF_RIGHT_PROD: 1 << right_order,
        }
        self.seq = 0
        # The rest of frames a write did not take, written first by the next write of
        # frames (half of the time: else it is dropped, a truncation): a frame larger
        # than the ring then arrives whole, over several writes.
        self.tail = b""
        self.ops = 0

    def close(self) -> None:
        for v in self.rings:
            v.release()
        for v in self.views:
            v.release()
        self.ch.close()

    # -- mutations ---------------------------------------------------------------------
    def index_value(self, off: int) -> int:
        cur: int = U32.unpack_from(self.ctrl, off)[0]
        size = self.sizes[off]
        delta = self.rnd.choice(
            (-size - 1, -size, -1, 1, 2, size - 1, size, size + 1, 2 * size, 1 << 31, None)
        )
        if delta is None:
            return self.rnd.getrandbits(32)
        return (cur + delta) & 0xFFFFFFFF

    def mutate(self) -> None:
        rnd, ctrl = self.rnd, self.ctrl
        what = rnd.randrange(10)
        if what != 7 or self.rings:  # (7 without a writable ring does nothing)
            COUNTS["mutations"][MUTATIONS[what]] += 1
        if what <= 1:  # our own indices: behind, ahead, far past the ring
            off = rnd.choice(self.own)
            U32.pack_into(ctrl, off, self.index_value(off))
        elif what == 2:  # the target's indices (it must trust only its private copies)
            off = rnd.choice(self.theirs)
            U32.pack_into(ctrl, off, self.index_value(off))
        elif what == 3:
            U16.pack_into(ctrl, rnd.choice((OFF_LEFT_ORDER, OFF_RIGHT_ORDER)), rnd.getrandbits(16))
        elif what == 4:
            off = rnd.choice((OFF_CLI_LIVE, OFF_SRV_LIVE))
            ctrl[off] = rnd.choice((0, 1, 1, 2, 3, 0x80, 0xFF))
        elif what == 5:
            off = rnd.choice((OFF_CLI_NOTIFY, OFF_SRV_NOTIFY))
            ctrl[off] = rnd.choice((0, 1, 2, 3, 0x80, 0x81, 0x83, 0xFF, rnd.getrandbits(8)))
        elif what == 6:
            n = rnd.randrange(1, 8)
            off = OFF_GRANTS + 4 * rnd.randrange(0, 16)
            if off + 4 * n <= 1024:
                ctrl[off : off + 4 * n] = rnd.randbytes(4 * n)
        elif what == 7 and self.rings:  # ring contents, published or not
            ring = rnd.choice(self.rings)
            if len(ring):  # a ring as short as a few bytes once crashed this peer
                n = rnd.randrange(1, min(64, len(ring)) + 1)
                pos = rnd.randrange(0, len(ring) - n + 1)
                ring[pos : pos + n] = rnd.randbytes(n)
        elif what == 8:  # a burst of events
            for _ in range(rnd.randrange(1, 20)):
                with contextlib.suppress(GntipcError):
                    self.ch.endpoint._port.notify()  # type: ignore[union-attr]
        else:  # put things back, so that an episode is not over at the first blow
            ctrl[OFF_SRV_LIVE if self.role == "server" else OFF_CLI_LIVE] = 1
            rings = self.ch.endpoint._rings
            if rings is not None:
                U32.pack_into(ctrl, self.own[0], rings._wr.priv)
                U32.pack_into(ctrl, self.own[1], rings._rd.priv)

    def frame(self) -> bytes:
        rnd = self.rnd
        self.seq += 1
        kind = rnd.randrange(len(FRAMES))
        COUNTS["frames"][FRAMES[kind]] += 1
        good = ENC.encode(Msg(self.seq, rnd.randbytes(rnd.randrange(0, 300))))
        if kind <= 2:
            return U32.pack(len(good)) + good
        if kind >= 12:
            return self.large_frame(cut=kind == 13)
        if kind >= 8:
            return self.batch_frame(kind)
        if kind == 3:  # a header larger than any limit
            return U32.pack(rnd.choice((1 << 20, (1 << 20) + 1, 0x7FFFFFFF, 0xFFFFFFFF))) + good
        if kind == 4:  # undecodable payload
            junk = rnd.randbytes(rnd.randrange(0, 64))
            return U32.pack(len(junk)) + junk
        if kind == 5:  # the wrong type
            other = ENC.encode({"seq": "x", "body": [1, 2, 3]})
            return U32.pack(len(other)) + other
        if kind == 6:  # a header that lies by a little
            return U32.pack(max(0, len(good) + rnd.choice((-3, -1, 1, 5)))) + good
        return U32.pack(0)  # an empty payload

    def large_frame(self, cut: bool) -> bytes:
        """A frame larger than the target's receive chunk (it is received in place, into
        the buffer of the previous large frame when it can be reused), whole or cut
        short: its header announces up to 1 MiB (the target's largest limit) and only
        a part follows (the next frames are then read as its bytes)."""
        rnd = self.rnd
        body = ENC.encode(Msg(self.seq, bytes(rnd.randrange(2_000, 100_000))))
        if not cut:
            return U32.pack(len(body)) + body
        announced = rnd.choice((len(body) + rnd.randrange(1, 5000), (1 << 20) - 1, 1 << 20))
        return U32.pack(announced) + body[: rnd.randrange(0, len(body))]

    def batch_frame(self, kind: int) -> bytes:
        """A batch frame (format version 1: the header's top bit, an array of messages):
        good, lying about its count, an array bomb, or the wrong element type."""
        rnd = self.rnd
        count = rnd.randrange(0, 40)
        items = [Msg(self.seq + i, rnd.randbytes(rnd.randrange(0, 40))) for i in range(count)]
        self.seq += len(items)
        body = ENC.encode(items)
        if kind == 9:  # the array header says more (or fewer) messages than follow
            count = max(0, len(items) + rnd.choice((-2, -1, 1, 3, 1000)))
            body = b"\xdd" + U32.pack(count)[::-1] + body[(1 if len(items) < 16 else 3) :]
        elif kind == 10:  # an array bomb: 2**32 - 1 items announced, a few bytes given
            body = b"\xdd\xff\xff\xff\xff" + rnd.randbytes(rnd.randrange(0, 16))
        elif kind == 11:  # the wrong element type, or nested arrays
            body = rnd.choice((ENC.encode([1, "x", None]), b"\x91" * rnd.randrange(1, 5000)))
        return U32.pack(len(body) | 0x80000000) + body

    def traffic(self) -> None:
        rnd, ch, count = self.rnd, self.ch, COUNTS["traffic"]
        try:
            if rnd.random() < 0.5:
                frames = rnd.random() < 0.5
                if frames:
                    data = b"".join(self.frame() for _ in range(rnd.randrange(1, 6)))
                    data, self.tail = self.tail + data, b""
                else:
                    data = rnd.randbytes(rnd.randrange(1, 5000))
                written = ch.write_nowait(data)
                count["bytes written"] += written
                if frames and rnd.random() < 0.5:
                    self.tail = data[written:]
            else:
                count["bytes read"] += len(ch.read_nowait(rnd.randrange(1, 70000)))
        except VCHAN_ERRORS as exc:
            count[type(exc).__name__] += 1

    def episode(self, seconds: float) -> None:
        rnd = self.rnd
        deadline = time.monotonic() + seconds
        calm = rnd.random() < 0.4  # some episodes mostly follow the protocol
        while time.monotonic() < deadline:
            self.ops += 1
            if rnd.random() < (0.05 if calm else 0.4):
                self.mutate()
            self.traffic()
            if self.ch.endpoint._rings is None:
                return
            ctrl = self.ctrl
            peer_live = ctrl[OFF_CLI_LIVE if self.role == "server" else OFF_SRV_LIVE]
            if peer_live == 0 and rnd.random() < 0.2:
                return  # the target (probably) left
            if rnd.random() < 0.3:
                time.sleep(rnd.choice((0, 0.0001, 0.001)))


def corrupt_before_connect(ch: Vchan, rnd: random.Random) -> None:
    """A server that publishes a bad control page: the client must refuse it cleanly."""
    page = ch.endpoint._pages[0].mapping.view()
    try:
        what = rnd.randrange(5)
        if what == 0:
            U16.pack_into(
                page,
                rnd.choice((OFF_LEFT_ORDER, OFF_RIGHT_ORDER)),
                rnd.choice((0, 9, 21, 31, 0xFFFF, 10, 11, 12, 20)),
            )
        elif what == 1:
            page[OFF_GRANTS : OFF_GRANTS + 8] = rnd.randbytes(8)
        elif what == 2:
            page[OFF_CLI_LIVE] = rnd.choice((0, 1, 3, 0xFF))
        elif what == 3:
            for off in (OFF_LEFT_CONS, OFF_LEFT_PROD, OFF_RIGHT_CONS, OFF_RIGHT_PROD):
                U32.pack_into(page, off, rnd.getrandbits(32))
        else:
            page[OFF_SRV_LIVE] = rnd.choice((0, 2, 0xFF))
    finally:
        page.release()


def serve(
    counts: dict[str, Counter[str]],
    episode: Callable[[Backend, str, int, str, random.Random], None],
) -> None:
    """A hostile peer's process: ``episode(backend, role, peer, path, rnd)`` again and
    again, as the command line says, until STOPFILE exists; then ``counts`` go to
    RESULT."""
    die_with_parent()
    role, peer, path, seed, stop, result = sys.argv[1:]
    rnd = random.Random(int(seed))
    backend = get_backend()  # $GNTIPC_BACKEND (and $GNTIPC_SIM_DOMID on the sim)
    try:
        while not os.path.exists(stop):
            episode(backend, role, int(peer), path, rnd)
    finally:
        backend.close()
    with open(result, "w") as f:
        json.dump({k: dict(v) for k, v in counts.items()}, f)


def connect(
    role: str,
    backend: Backend,
    peer: int,
    path: str,
    rnd: random.Random,
    episodes: Counter[str],
    corrupt: float = 0.15,
) -> Vchan | None:
    """:func:`open_channel`, counting an attempt that gave none in ``episodes``."""
    try:
        ch = open_channel(role, backend, peer, path, rnd, corrupt)
    except (TimeoutError, GntipcError):
        ch = None
    if ch is None:
        episodes["no channel"] += 1
    return ch


def start(
    ch: Vchan,
    episodes: Counter[str],
    make: Callable[[], P],
    errors: tuple[type[BaseException], ...],
) -> P | None:
    """The hostile peer of an episode on ``ch`` (``make()``), counted; None (and ``ch``
    closed) if ``make`` raised one of ``errors``."""
    try:
        h = make()
    except errors as exc:
        episodes[f"setup: {type(exc).__name__}"] += 1
        with contextlib.suppress(*VCHAN_ERRORS):
            ch.close()
        return None
    episodes["hostile"] += 1
    return h


def episode(backend: Backend, role: str, peer: int, path: str, rnd: random.Random) -> None:
    """One connection: scribble and talk until its time is up or the target left."""
    episodes = COUNTS["episodes"]
    ch = connect(role, backend, peer, path, rnd, episodes)
    if ch is None:
        return
    # (VCHAN_ERRORS: the target left, or unmapped, meanwhile)
    h = start(ch, episodes, lambda: Hostile(role, ch, rnd), VCHAN_ERRORS)
    if h is None:
        return
    try:
        h.episode(SCALE * rnd.choice((0.005, 0.05, 0.2, 0.5)))
    finally:
        with contextlib.suppress(*VCHAN_ERRORS):
            h.close()


def main() -> None:
    serve(COUNTS, episode)


def open_channel(
    role: str, backend: Backend, peer: int, path: str, rnd: random.Random, corrupt: float = 0.15
) -> Vchan | None:
    """A connected channel (None: nobody came), as a client or a server (with random
    ring sizes, whose control page is corrupted before the client maps it with
    probability ``corrupt``)."""
    if role == "client":
        return Vchan.client(backend, peer, path, timeout=0.5 * SCALE)
    ch = Vchan.server(
        backend,
        peer,
        path,
        read_size=rnd.choice(SIZES),
        write_size=rnd.choice(SIZES),
    )
    if rnd.random() < corrupt:
        corrupt_before_connect(ch, rnd)
    deadline = time.monotonic() + 0.3 * SCALE
    try:
        while ch.is_open() == 2 and time.monotonic() < deadline:
            ch.wait(0.02)
        if ch.is_open() != 2:
            return ch
    except GntipcError:
        return ch  # a client that wrote garbage: go on scribbling at it
    ch.close()  # nobody came (or our page was refused): offer a fresh one
    return None


if __name__ == "__main__":
    main()
