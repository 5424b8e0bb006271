"""A hostile bulk peer (run as a script): it speaks the bulk protocol
(:mod:`gntipc.protocol.bulk`) to the target's bulk channel (``_fuzz_bulk_target``) over
each vchan, lends from a pool of its own and holds the target's loans, and in turn tells
each of the lies below.

    python -m stress._fuzz_bulk ROLE PEER PATH SEED STOPFILE RESULT
    python -m stress._fuzz_bulk crash ROLE PEER PATH SEED

ROLE, PEER, PATH and the loop over episodes are those of :mod:`stress._fuzz_hostile`
(its vchans, without the control-page corruption).  Each episode shares a pool (none, or
1 to 4 buffers of 4 to 12 KiB, filled with the pattern the target checks its views
against), sends a HELLO (good, or one of :data:`HELLO_LIES` in turn), then lends and
releases at random and, in most episodes, tells the next of :data:`LIES` after a few
honest frames.  Some episodes never release the target's loans (its loans must wait, and
end at their deadline: backpressure), or end the vchan while both sides hold loans; in
some the peer is a child process (``crash``) that lends every buffer, holds the target's
loans, and is SIGKILLed (the target keeps reading its views; every page must be freed).

This side checks the target too: every frame it sends must be valid
(:class:`gntipc.protocol.BulkProtocol` decodes them), and every loan must show the bytes
the target wrote there; what is not is a *violation* (counted; the test fails on any).
What it did goes to RESULT (JSON): episodes, mutations (lies and behaviours), frames (the
valid ones sent), traffic, violations.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections import Counter

from gntipc import _keys
from gntipc._exceptions import GntipcError, RemoteProtocolError
from gntipc.backends import Backend, Pages, get_backend
from gntipc.channel import Vchan
from gntipc.protocol.bulk import (
    MAGIC,
    VERSION,
    BulkProtocol,
    Eof,
    Hello,
    Loan,
    Release,
    encode_eof,
    encode_hello,
    encode_loan,
    encode_release,
)

from ._common import die_with_parent, expected, time_scale
from ._fuzz_bulk_target import LOAN_SALT, OPEN_TIMEOUT, POOL_SALT
from ._fuzz_hostile import VCHAN_ERRORS, open_channel

SCALE = time_scale()
_HELLO = struct.Struct("<BBH4sHHIII")
_LOAN = struct.Struct("<BBHIII")
_SHORT = struct.Struct("<BBHI")

#: Lies in the HELLO, one per episode in turn (between good HELLOs).
HELLO_LIES = (
    "hello: lying page count",
    "hello: refs not granted",
    "hello: the target's own refs",
    "hello: decoy pages",
    "hello: pool over the limit",
    "hello: bad header",
    "hello: frame before it",
    "hello: truncated",
    "no hello",
)
#: Lies once the HELLOs are exchanged, one per episode in turn.
LIES = (
    "loan: buffer out of range",
    "loan: bytes past the buffer",
    "loan: buffer the target holds",
    "loan after eof",
    "release: never lent",
    "release: twice",
    "release: out of range",
    "unknown type",
    "flags or reserved",
    "second hello",
    "eof with a value",
    "second eof",
    "truncated frame",
    "garbage",
)
#: Lies the target may take for the truth, by timing: the target's RELEASE (or its
#: LOAN) of that buffer may be on its way, so that the frame was valid when the target
#: read it.  After one of them this side no longer takes the target's frames for
#: violations (its own view of the state may be wrong).
RACY = frozenset(("loan: buffer the target holds", "release: never lent", "release: twice"))
#: What this peer does besides lying (counted with the lies as mutations).
BEHAVIOURS = ("never releases", "closes holding loans", "dies mid-loan")
#: The valid frames it sends.
FRAMES = ("HELLO", "LOAN", "RELEASE", "EOF")
#: Traffic that must happen: loans of the target checked, and its releases of ours.
TRAFFIC = ("target's loans checked", "target's releases")
COUNTS: dict[str, Counter[str]] = {
    k: Counter() for k in ("episodes", "mutations", "frames", "traffic", "violations")
}


class Gone(Exception):
    """The vchan ended (the target left, or broke it)."""


class BulkHostile:
    """One episode: a bulk peer on ``ch``, telling ``hello`` (a HELLO kind) and then
    ``lie`` (None: honest)."""

    def __init__(
        self,
        ch: Vchan,
        rnd: random.Random,
        hello: str,
        lie: str | None,
        *,
        never_release: bool = False,
        crash: bool = False,
    ) -> None:
        self.ch = ch
        self.rnd = rnd
        self.backend: Backend = ch.backend
        self.hello_kind = hello
        self.lie = lie
        self.lie_at = rnd.randrange(0, 25)
        self.told = False
        self.never_release = never_release or crash
        self.crash = crash
        self.buffers = rnd.choice((1, 2, 4) if crash else (0, 1, 2, 3, 4))
        self.size = rnd.choice((4096, 8192, 12288)) if self.buffers else 0
        self.proto = BulkProtocol(self.buffers, self.size)
        self.pages: list[Pages] = []  # ours (the pool, a decoy) and the target's pool
        pages = self.buffers * self.size // 4096
        self.pool = self.share(pages, POOL_SALT) if pages else None
        self.target_view: memoryview | None = None
        self.held: list[int] = []  # the target's buffers we hold
        self.out = bytearray()
        self.mute = False  # after a truncated frame nothing more is queued
        self.holding = False
        # End the vchan as soon as both sides hold loans (else only when time is up).
        self.leave_holding = rnd.random() < 0.15
        self.steps = 0

    def share(self, count: int, salt: int) -> Pages:
        """``count`` pages granted to the target, read-only, filled with the pattern of
        ``salt``."""
        pages = self.backend.share(self.ch.peer, count, writable=False)
        self.pages.append(pages)
        with pages.mapping.view() as view:
            view[:] = expected(salt, 0, len(view))
        return pages

    def close(self) -> None:
        if self.target_view is not None:
            self.target_view.release()
        with contextlib.suppress(*VCHAN_ERRORS):
            self.ch.close()
        for p in self.pages:
            p.close()

    # -- frames ---------------------------------------------------------------------------
    def send(self, frame: bytes, kind: str | None = None) -> None:
        if not self.mute:
            self.out += frame
            if kind:
                COUNTS["frames"][kind] += 1

    def pump(self) -> bool:
        """Write what is queued (as much as fits), then read and check the target's
        frames; True if something moved.

        Raises:
            Gone: the vchan ended.
        """
        try:
            written = self.ch.write_nowait(self.out) if self.out else 0
            del self.out[:written]
            data = self.ch.read_nowait(65536)
        except VCHAN_ERRORS as exc:
            raise Gone from exc
        if not data:
            return written > 0
        try:
            events = self.proto.receive_data(data)
        except RemoteProtocolError as exc:
            if self.told and self.lie in RACY:
                COUNTS["traffic"]["target's frames unchecked after a racy lie"] += 1
            else:
                violation(f"the target sent an invalid frame: {exc}")
            raise Gone from exc
        for e in events:
            if isinstance(e, Hello):
                self.map_target_pool(e)
            elif isinstance(e, Loan):
                self.check_loan(e)
            elif isinstance(e, Release):
                COUNTS["traffic"]["target's releases"] += 1
            elif isinstance(e, Eof):
                COUNTS["traffic"]["target's EOF"] += 1
        return True

    def map_target_pool(self, hello: Hello) -> None:
        if not hello.refs:
            return
        try:
            pages = self.backend.map(self.ch.peer, hello.refs, writable=False)
        except GntipcError:  # the target closed (and ungranted it) meanwhile
            COUNTS["traffic"]["target's pool gone before mapped"] += 1
            return
        self.pages.append(pages)
        self.target_view = pages.mapping.view()

    def check_loan(self, loan: Loan) -> None:
        """A loan of the target's must show what the target wrote at those bytes."""
        view = self.target_view
        peer = self.proto.peer
        assert peer is not None
        if view is not None:
            start = loan.buffer * peer.buffer_size + loan.offset
            if bytes(view[start : start + loan.length]) != expected(
                LOAN_SALT, loan.offset, loan.length
            ):
                violation(f"the target's {loan} does not show what it wrote")
            else:
                COUNTS["traffic"]["target's loans checked"] += 1
        self.held.append(loan.buffer)

    # -- the HELLO ------------------------------------------------------------------------
    def hello(self) -> None:
        """Send our HELLO (or the lie of this episode instead).

        Raises:
            Gone: the vchan ended (while waiting for the target's HELLO).
        """
        rnd, kind = self.rnd, self.hello_kind
        refs = self.pool.refs if self.pool else ()
        good = encode_hello(self.buffers, self.size, refs)
        if kind == "good":
            self.send(good, "HELLO")
            return
        COUNTS["mutations"][kind] += 1
        buffers, size = max(1, self.buffers), self.size or 4096
        n = buffers * size // 4096
        if kind == "hello: lying page count":
            pages = rnd.choice((0, n - 1, n + 1, n * 2, 0xFFFFFFFF)) & 0xFFFFFFFF
            shown = min(pages, n + 2)
            head = _HELLO.pack(1, 0, 0, MAGIC, VERSION, 0, size, buffers, pages)
            self.send(head + struct.pack(f"<{shown}I", *range(shown)))
        elif kind == "hello: refs not granted":
            bad = [rnd.choice((0xFFFFFFFF, 0x7FFFFFFF, 1 << 20, 999_999)) for _ in range(n)]
            self.send(encode_hello(buffers, size, bad))
        elif kind == "hello: the target's own refs":
            deadline = time.monotonic() + OPEN_TIMEOUT
            while self.proto.peer is None and time.monotonic() < deadline:
                self.pump()
                time.sleep(0.001)
            theirs = self.proto.peer
            if theirs is not None and theirs.refs:
                self.send(encode_hello(theirs.buffers, theirs.buffer_size, theirs.refs))
            else:  # the target has no pool: refs of nothing
                self.send(encode_hello(1, 4096, [rnd.getrandbits(32)]))
        elif kind == "hello: decoy pages":
            # Pages granted to the target, but not the pool it lends from: legal (they are
            # ours), the target's views show other bytes.
            decoy = self.share(n, POOL_SALT + 1)
            self.send(encode_hello(buffers, size, decoy.refs), "HELLO")
        elif kind == "hello: pool over the limit":
            big = rnd.choice((100, 1000, 1 << 16))
            pages = big * 2
            head = _HELLO.pack(1, 0, 0, MAGIC, VERSION, 0, 8192, big, pages)
            self.send(head + rnd.randbytes(4 * min(pages, 300)))
        elif kind == "hello: bad header":
            fields = [1, 0, 0, MAGIC, VERSION, 0, self.size, self.buffers, len(refs)]
            which = rnd.randrange(5)
            fields[(1, 2, 3, 4, 5)[which]] = (1, 7, b"GBLX", VERSION + 1, 3)[which]
            self.send(_HELLO.pack(*fields) + struct.pack(f"<{len(refs)}I", *refs))
        elif kind == "hello: frame before it":
            self.send(rnd.choice((encode_loan(0, 0, 1), encode_release(0), encode_eof())) + good)
        elif kind == "hello: truncated":
            self.send(good[: rnd.randrange(1, len(good))])
            self.mute = True
        else:  # no hello: the target's open must time out
            self.mute = True

    # -- the episode ----------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        """Until ``seconds`` passed or the vchan ended."""
        rnd = self.rnd
        deadline = time.monotonic() + seconds
        announced = False
        try:
            self.hello()
            while time.monotonic() < deadline:
                if not self.pump():
                    time.sleep(0.001)  # nothing moved: do not spin on a shared CPU
                self.steps += 1
                if self.lie and not self.told and self.steps > self.lie_at:
                    self.tell(self.lie)
                else:
                    self.act()
                if self.leave_holding and self.held and self.proto.sent_count:
                    break
                if self.crash and not announced and self.all_lent():
                    print(json.dumps(self.store_trail()), flush=True)
                    announced = True
                if rnd.random() < 0.2:
                    time.sleep(rnd.choice((0, 0.0005, 0.002)))
        except Gone:
            return
        if self.held and self.proto.sent_count:
            COUNTS["mutations"]["closes holding loans"] += 1

    def store_trail(self) -> dict[str, object]:
        """What our vchan keeps in the store, which a SIGKILL leaves behind: our
        presence node (its value) and, as a server, the keys (and the ref they name)."""
        ep = self.ch.endpoint
        presence = ep._presence
        assert presence is not None and presence._value is not None
        return {
            "node": presence._node,
            "value": presence._value.decode(),
            "path": self.ch.path if self.ch.is_server else None,
            "ref": ep._published_ref,
        }

    def all_lent(self) -> bool:
        return self.proto.sent_count == self.buffers and not self.out

    def act(self) -> None:
        rnd, proto = self.rnd, self.proto
        r = rnd.random()
        if r < 0.45 or self.crash:
            if self.buffers and not proto.eof_sent:
                i = proto.take()
                if i is not None:
                    off = rnd.randrange(0, self.size + 1)
                    self.send(
                        proto.loan_frame(i, off, rnd.randrange(0, self.size - off + 1)), "LOAN"
                    )
        elif r < 0.9:
            if self.held and not self.never_release:
                b = self.held.pop(rnd.randrange(len(self.held)))
                self.send(proto.release_frame(b), "RELEASE")
        elif r < 0.92 and not proto.eof_sent:
            self.send(proto.eof_frame(), "EOF")
        if self.never_release and self.held and not self.holding:
            self.holding = True  # counted once per episode
            COUNTS["mutations"]["never releases"] += 1

    def tell(self, lie: str) -> None:
        """Tell ``lie`` if this moment allows it (else later)."""
        rnd, proto = self.rnd, self.proto
        peer = proto.peer
        if self.mute or peer is None:
            return
        frame = b""
        size = self.size
        if lie == "loan: buffer out of range":
            b = rnd.choice((self.buffers, self.buffers + 1, 1 << 31, 0xFFFFFFFF))
            frame = encode_loan(b, 0, 1)
        elif lie == "loan: bytes past the buffer":
            if self.buffers:
                off, n = rnd.choice(
                    ((size, 1), (0, size + 1), (size - 1, 2), (0xFFFFFFFF, 2), (1 << 31, 1 << 31))
                )
                frame = encode_loan(rnd.randrange(self.buffers), off, n)
        elif lie == "loan: buffer the target holds":
            sent = [i for i in range(self.buffers) if proto._states[i] == 2]
            if sent:
                frame = encode_loan(rnd.choice(sent), 0, 1)
        elif lie == "loan after eof":
            if self.buffers and not proto.eof_sent:
                frame = proto.eof_frame() + encode_loan(0, 0, 1)
        elif lie == "release: never lent":
            never = [i for i in range(peer.buffers) if not proto.holds(i)]
            if never or not peer.buffers:
                frame = encode_release(rnd.choice(never) if never else 0)
        elif lie == "release: twice":
            if self.held:
                b = self.held.pop()
                frame = proto.release_frame(b) + encode_release(b)
        elif lie == "release: out of range":
            frame = encode_release(rnd.choice((peer.buffers, peer.buffers + 7, 0xFFFFFFFF)))
        elif lie == "unknown type":
            frame = bytes([rnd.choice((0, 5, 6, 9, 0x80, 0xFF)), 0, 0, 0]) + bytes(12)
        elif lie == "flags or reserved":
            flags, reserved = rnd.choice(((1, 0), (0x80, 0), (0, 1), (0, 0x8000)))
            if self.held and rnd.random() < 0.5:
                frame = _SHORT.pack(3, flags, reserved, self.held[0])
            else:
                frame = _LOAN.pack(2, flags, reserved, 0, 0, 1)
        elif lie == "second hello":
            frame = encode_hello(self.buffers, size, self.pool.refs if self.pool else ())
        elif lie == "eof with a value":
            frame = _SHORT.pack(4, 0, 0, rnd.choice((1, 0xFFFFFFFF)))
        elif lie == "second eof":
            frame = encode_eof() * 2 if not proto.eof_sent else encode_eof()
        elif lie == "truncated frame":
            frame = encode_loan(0, 0, 1)[: rnd.randrange(1, 16)]
        elif lie == "garbage":
            frame = rnd.randbytes(rnd.randrange(1, 64))
        if not frame:
            return  # not now (e.g. nothing held yet): the next step tries again
        self.send(frame)
        self.told = True
        COUNTS["mutations"][lie] += 1
        if lie in ("truncated frame", "garbage"):
            self.mute = True


def violation(what: str) -> None:
    COUNTS["violations"][what[:300]] += 1


class Schedule:
    """Which HELLO and which lie the next episode tells (each in turn, so that every
    kind happens in a short run; a lie not told in its episode is tried again)."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.hello_i = rnd.randrange(len(HELLO_LIES))
        self.lie_i = rnd.randrange(len(LIES))

    def next(self) -> tuple[str, str | None]:
        rnd = self.rnd
        if rnd.random() < 0.3:
            hello = HELLO_LIES[self.hello_i % len(HELLO_LIES)]
            self.hello_i += 1
            return hello, None
        if rnd.random() < 0.3:
            return "good", None  # an honest episode
        return "good", LIES[self.lie_i % len(LIES)]

    def told(self, lie: str | None) -> None:
        if lie is not None:
            self.lie_i += 1


def crash_episode(backend: Backend, role: str, peer: str, path: str, rnd: random.Random) -> None:
    """A child process plays the peer, lends every buffer, holds the target's loans and
    is SIGKILLed (once it said so, after a random moment).  Then this process removes
    what the child's vchan kept in the store, as the next holder of its port would
    (:mod:`gntipc._keys`: nobody removes a crashed process's nodes), so that the run's
    store check sees what the target leaves."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stress._fuzz_bulk",
            "crash",
            role,
            peer,
            path,
            str(rnd.getrandbits(32)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    trail = None
    try:
        ready, _, _ = select.select([child.stdout], [], [], 10 * SCALE)
        line = child.stdout.readline() if ready else b""
        trail = json.loads(line) if line.strip() else None
        if trail is not None:
            time.sleep(rnd.choice((0, 0.005, 0.05, 0.2)) * SCALE)
            COUNTS["mutations"]["dies mid-loan"] += 1
        else:
            COUNTS["episodes"]["crash child: no loan"] += 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    if trail is not None:
        store = backend.store
        _keys._remove_own_node(
            store, trail["node"], trail["value"].encode(), f"/local/domain/{backend.domid}/data"
        )
        if trail["path"] is not None:
            _keys.unpublish_keys(store, trail["path"], trail["ref"])


def crash_child(role: str, peer: str, path: str, seed: str) -> None:
    die_with_parent()
    rnd = random.Random(int(seed))
    backend = get_backend()
    deadline = time.monotonic() + 5 * SCALE
    while time.monotonic() < deadline:
        try:
            ch = open_channel(role, backend, int(peer), path, rnd, corrupt=0)
        except (TimeoutError, GntipcError):
            continue
        if ch is None:
            continue
        h = BulkHostile(ch, rnd, "good", None, crash=True)
        try:
            h.run(30 * SCALE)  # killed long before, unless the target left
        finally:
            h.close()
        return


def main() -> None:
    if sys.argv[1] == "crash":
        crash_child(*sys.argv[2:])
        return
    die_with_parent()
    role, peer, path, seed, stop, result = sys.argv[1:]
    rnd = random.Random(int(seed))
    episodes = COUNTS["episodes"]
    schedule = Schedule(rnd)
    backend = get_backend()
    try:
        while not os.path.exists(stop):
            if rnd.random() < 0.06:
                crash_episode(backend, role, peer, path, rnd)
                continue
            try:
                ch = open_channel(role, backend, int(peer), path, rnd, corrupt=0)
            except (TimeoutError, GntipcError):
                episodes["no channel"] += 1
                continue
            if ch is None:
                episodes["no channel"] += 1
                continue
            hello, lie = schedule.next()
            try:
                h = BulkHostile(ch, rnd, hello, lie, never_release=rnd.random() < 0.25)
            except GntipcError as exc:  # e.g. the pool over the grant budget
                episodes[f"setup: {type(exc).__name__}"] += 1
                with contextlib.suppress(*VCHAN_ERRORS):
                    ch.close()
                continue
            episodes["hostile"] += 1
            try:
                h.run(SCALE * rnd.choice((0.05, 0.2, 0.5)))
                if h.told:
                    schedule.told(lie)
            finally:
                h.close()
    finally:
        backend.close()
    with open(result, "w") as f:
        json.dump({k: dict(v) for k, v in COUNTS.items()}, f)


if __name__ == "__main__":
    main()
