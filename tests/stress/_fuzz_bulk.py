"""A hostile bulk peer (run as a script): it speaks the bulk protocol
(:mod:`gntipc.protocol.bulk`, versions 1 and 2) to the target's bulk channel or queue
(``_fuzz_bulk_target``) over each vchan, lends from a pool of its own, sends messages,
holds the target's loans, and tells the lies below, each in turn.

    python -m stress._fuzz_bulk ROLE PEER PATH SEED STOPFILE RESULT
    python -m stress._fuzz_bulk crash ROLE PEER PATH SEED

ROLE, PEER, PATH and the loop over episodes are those of :mod:`stress._fuzz_hostile`
(its vchans, without the control-page corruption).  Each episode shares a pool (none, or
1 to 4 buffers of 4 to 12 KiB, filled with the pattern the target checks its views
against), sends a HELLO (of the target's version, mostly; good, or in one episode of
five one of :data:`HELLO_LIES`, the least told so far), then lends, releases and sends
messages at random and, in most episodes, tells the least told of :data:`LIES` that the
moment allows after a few honest frames.  Some episodes never release the target's
loans (its loans must wait, and end at their deadline: backpressure), some then go
silent, some end the vchan while both sides hold loans, some write a few bytes at a
time; in every 25th the peer is a child process (``crash``) that lends every buffer,
holds the target's loans, and is SIGKILLed (the target keeps reading its views; every
page must be freed).

This side checks the target too: every frame it sends must be valid
(:class:`gntipc.protocol.BulkProtocol` decodes them), every loan must show the bytes the
target wrote there, and once it has read a lie of :data:`FATAL` it must send nothing
more; what is not is a *violation* (counted; the test fails on any).  What it did goes
to RESULT (JSON): episodes, mutations (lies and behaviours), frames (the valid ones
sent), traffic, violations, and the connections (presence values) on which the target
read a fatal lie (the test checks that the target raised RemoteProtocolError on each).
"""

from __future__ import annotations

import contextlib
import json
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections import Counter

import msgspec

from gntipc import _keys
from gntipc._exceptions import GntipcError, RemoteProtocolError
from gntipc.backends import Backend, Pages, get_backend
from gntipc.channel import Vchan
from gntipc.protocol._layout import OFF_LEFT_CONS, OFF_LEFT_PROD, OFF_RIGHT_CONS, OFF_RIGHT_PROD
from gntipc.protocol.bulk import (
    MAGIC,
    MESSAGE_HEAD_SIZE,
    MESSAGE_VERSION,
    VERSION,
    BulkProtocol,
    Eof,
    Hello,
    Loan,
    Message,
    Release,
    encode_eof,
    encode_hello,
    encode_loan,
    encode_message,
    encode_release,
)

from ._common import die_with_parent, expected, time_scale
from ._fuzz_bulk_target import LOAN_SALT, OPEN_TIMEOUT, POOL_SALT, Msg
from ._fuzz_hostile import U32, VCHAN_ERRORS, connect, open_channel, serve, start

SCALE = time_scale()
_HELLO = struct.Struct("<BBH4sHHIII")
_LOAN = struct.Struct("<BBHIII")
_SHORT = struct.Struct("<BBHI")
_MESSAGE = struct.Struct("<BBHIIII")

#: Lies in the HELLO, one per episode (the least told so far).
HELLO_LIES = (
    "hello: lying page count",
    "hello: refs not granted",
    "hello: refs granted to another domain",
    "hello: the target's own refs",
    "hello: decoy pages",
    "hello: pool over the limit",
    "hello: bad header",
    "hello: frame before it",
    "hello: truncated",
    "no hello",
)
#: Lies once the HELLOs are exchanged, one per lying episode: the least told so far of
#: those the moment allows (a lie about the target's loans needs one held...).
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
    # MESSAGE frames (version 2: the target opened a BulkQueue)
    "message: to a side that takes none",
    "message: over the size limit",
    "message: attachment out of range",
    "message: attachment the target holds",
    "message: unattached naming bytes",
    "message: bad flags",
    "message: undecodable",
    "message: wrong type",
    "message: after eof",
    "message: truncated",
)
#: Lies the target may take for the truth, by timing: the target's RELEASE (or its
#: LOAN) of that buffer may be on its way, so that the frame was valid when the target
#: read it.  After one of them this side no longer takes the target's frames for
#: violations (its own view of the state may be wrong).
RACY: frozenset[str] = frozenset(
    (
        "loan: buffer the target holds",
        "message: attachment the target holds",
        "release: never lent",
        "release: twice",
    )
)
#: Lies after which the target must say nothing more: once it has read one (its consumer
#: index is past the lie), it broke the channel (RemoteProtocolError), so any byte it
#: writes after that moment is a violation: a lie taken silently.  (Not the racy ones,
#: the valid-but-undecodable messages, nor the truncations and garbage, which may be
#: the valid start of a frame.)
FATAL = (
    frozenset(LIES)
    - RACY
    - {
        "message: undecodable",
        "message: wrong type",
        "truncated frame",
        "message: truncated",
        "garbage",
    }
) | {
    # HELLOs the target's open must refuse (RemoteProtocolError): it sends nothing after
    # its own HELLO then (not the pool over the limit: that may be the rings too small,
    # or a wait for refs that never come)
    "hello: lying page count",
    "hello: refs not granted",
    "hello: refs granted to another domain",
    "hello: bad header",
    "hello: frame before it",
}
#: What this peer does besides lying (counted with the lies as mutations).
BEHAVIOURS = (
    "never releases",
    "stalls holding loans",
    "closes holding loans",
    "dies mid-loan",
    "frames in pieces",
)
#: The longest a stalling peer stays silent: longer than an operation may take (the
#: target's SLOW), so that a wait without its deadline shows.
STALL = 2.0 * SCALE
#: The valid frames it sends.
FRAMES = ("HELLO", "LOAN", "RELEASE", "EOF", "MESSAGE", "MESSAGE with a loan")
#: Traffic that must happen: loans of the target checked, its releases of ours, its
#: messages, and fatal lies it read (after which it must say nothing).
TRAFFIC = (
    "target's loans checked",
    "target's releases",
    "target's messages checked",
    "fatal lies read by the target",
)
ENC = msgspec.msgpack.Encoder()
DEC = msgspec.msgpack.Decoder(Msg)
COUNTS: dict[str, Counter[str]] = {
    k: Counter()
    for k in ("episodes", "mutations", "frames", "traffic", "violations", "fatal lie read")
}


class Gone(Exception):
    """The vchan ended (the target left, or broke it)."""


class BulkHostile:
    """One episode: a bulk peer on ``ch``, telling ``hello`` (a HELLO kind) and then,
    if ``lying``, one of :data:`LIES`."""

    def __init__(
        self,
        ch: Vchan,
        rnd: random.Random,
        hello: str,
        lying: bool,
        *,
        never_release: bool = False,
        crash: bool = False,
    ) -> None:
        self.ch = ch
        self.rnd = rnd
        self.backend: Backend = ch.backend
        self.hello_kind = hello
        self.lying = lying
        self.lie_at = rnd.randrange(0, 12)
        self.told: str | None = None  # the lie told
        self.never_release = never_release or crash
        self.crash = crash
        # (a crashing lender's pool fits every target's limit: at most 2 pages)
        self.buffers = rnd.choice((1, 2) if crash else (0, 1, 2, 3, 4))
        self.size = (4096 if crash else rnd.choice((4096, 8192, 12288))) if self.buffers else 0
        self.proto = BulkProtocol(self.buffers, self.size)  # (replaced at the HELLO)
        self.seq = 0
        self.pages: list[Pages] = []  # ours (the pool, a decoy) and the target's pool
        pages = self.buffers * self.size // 4096
        self.pool = self.share(pages, POOL_SALT) if pages else None
        self.target_view: memoryview | None = None
        self.held: list[int] = []  # the target's buffers we hold
        self.out = bytearray()
        # Bytes queued and read so far; where the fatal lie told ends in our stream; the
        # target's producer index when it had read that far (see FATAL).
        self.queued = 0
        self.received = 0
        self.lie_end: int | None = None
        self.silent_after: int | None = None
        self.mute = False  # after a truncated frame nothing more is queued
        self.holding = False
        # End the vchan as soon as both sides hold loans (else only when time is up);
        # always until this peer did once (the run requires every kind: at 15 % alone a
        # short run missed it once in 3.12's suite).
        self.leave_holding = rnd.random() < 0.15 or not COUNTS["mutations"]["closes holding loans"]
        # Write at most this many bytes at a time (0: as many as fit).
        self.dribble = rnd.randrange(1, 8) if rnd.random() < 0.1 else 0
        if self.dribble:
            COUNTS["mutations"]["frames in pieces"] += 1
        # Once holding a loan of the target's, say nothing more until it leaves.
        # (Always until this peer did once, as leave_holding.)
        self.stall = (
            self.never_release
            and not crash
            and (rnd.random() < 0.5 or not COUNTS["mutations"]["stalls holding loans"])
        )
        self.steps = 0
        self.ctrl = ch.endpoint._pages[0].mapping.view()
        # The connection's name, which the target knows too: the server's presence value
        # (its control page's ref and a random nonce), which the client copies.
        presence = ch.endpoint._presence
        assert presence is not None and presence._value is not None
        self.nonce = presence._value.decode()
        server = ch.is_server
        # (the target's consumer index of the ring we write, producer of the one we read)
        self.their_cons = OFF_RIGHT_CONS if server else OFF_LEFT_CONS
        self.their_prod = OFF_LEFT_PROD if server else OFF_RIGHT_PROD

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
        self.ctrl.release()
        with contextlib.suppress(*VCHAN_ERRORS):
            self.ch.close()
        for p in self.pages:
            p.close()

    # -- frames ---------------------------------------------------------------------------
    def send(self, frame: bytes, kind: str | None = None) -> None:
        if not self.mute:
            self.out += frame
            self.queued += len(frame)
            if kind:
                COUNTS["frames"][kind] += 1

    def pump(self) -> bool:
        """Write what is queued (as much as fits), then read and check the target's
        frames; True if something moved.

        Raises:
            Gone: the vchan ended.
        """
        # (the consumer index first, then the producer's: x86 keeps loads in order)
        if (
            self.lie_end is not None
            and self.silent_after is None
            and U32.unpack_from(self.ctrl, self.their_cons)[0] >= self.lie_end
        ):
            self.silent_after = U32.unpack_from(self.ctrl, self.their_prod)[0]
            COUNTS["traffic"]["fatal lies read by the target"] += 1
            COUNTS["fatal lie read"][self.nonce] += 1
        try:
            # (dribbling: a few bytes per write, so that frames arrive in pieces)
            out = self.out[: self.dribble] if self.dribble else self.out
            written = self.ch.write_nowait(out) if out else 0
            del self.out[:written]
            data = self.ch.read_nowait(65536)
        except VCHAN_ERRORS as exc:
            raise Gone from exc
        if not data:
            return written > 0
        self.received += len(data)
        if self.silent_after is not None and self.received > self.silent_after:
            violation(f"the target went on after reading the lie {self.told!r}")
            raise Gone
        try:
            events = self.proto.receive_data(data)
        except RemoteProtocolError as exc:
            if self.told in RACY:
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
            elif isinstance(e, Message):
                try:
                    DEC.decode(e.frame[4:])
                    COUNTS["traffic"]["target's messages checked"] += 1
                except msgspec.ValidationError as exc:
                    violation(f"the target's message does not decode: {exc}")
                if e.attachment is not None:
                    self.check_loan(e.attachment)
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
        # The target's HELLO first (it sends it at once): the same version as its, mostly
        # (a queue opened against a plain channel fails, as documented).
        deadline = time.monotonic() + OPEN_TIMEOUT
        while self.proto.peer is None and time.monotonic() < deadline:
            if not self.pump():
                time.sleep(0.001)
        theirs = self.proto.peer
        v2 = theirs is not None and theirs.version == MESSAGE_VERSION
        if rnd.random() < 0.1 and not self.crash:
            v2 = not v2
        if v2:  # a fresh state that takes messages, fed the target's HELLO again
            self.proto = BulkProtocol(self.buffers, self.size, max_message_size=1 << 16)
            if theirs is not None:
                self.proto.receive_data(
                    encode_hello(
                        theirs.buffers, theirs.buffer_size, theirs.refs, version=theirs.version
                    )
                )
        version = self.proto.version
        refs = self.pool.refs if self.pool else ()
        good = encode_hello(self.buffers, self.size, refs, version=version)
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
        elif kind == "hello: refs granted to another domain":
            try:  # (granted, but not to the target: its map must fail)
                other = self.backend.share((self.ch.peer + 1) & 0x7FFF, n, writable=False)
            except GntipcError:
                refs = tuple(rnd.getrandbits(32) for _ in range(n))
            else:
                self.pages.append(other)
                refs = other.refs
            self.send(encode_hello(buffers, size, refs, version=version))
        elif kind == "hello: the target's own refs":
            if theirs is not None and theirs.refs:
                self.send(
                    encode_hello(theirs.buffers, theirs.buffer_size, theirs.refs, version=version)
                )
            else:  # the target has no pool: refs of nothing
                self.send(encode_hello(1, 4096, [rnd.getrandbits(32)]))
        elif kind == "hello: decoy pages":
            # Pages granted to the target, but not the pool it lends from: legal (they are
            # ours), the target's views show other bytes.
            decoy = self.share(n, POOL_SALT + 1)
            self.send(encode_hello(buffers, size, decoy.refs, version=version), "HELLO")
        elif kind == "hello: pool over the limit":
            big = rnd.choice((100, 1000, 1 << 16))
            pages = big * 2
            head = _HELLO.pack(1, 0, 0, MAGIC, VERSION, 0, 8192, big, pages)
            self.send(head + rnd.randbytes(4 * min(pages, 300)))
        elif kind == "hello: bad header":
            fields = [1, 0, 0, MAGIC, VERSION, 0, self.size, self.buffers, len(refs)]
            which = rnd.randrange(5)
            bad_version = rnd.choice((0, 3, 0xFFFF))
            fields[(1, 2, 3, 4, 5)[which]] = (1, 7, b"GBLX", bad_version, 3)[which]
            self.send(_HELLO.pack(*fields) + struct.pack(f"<{len(refs)}I", *refs))
        elif kind == "hello: frame before it":
            self.send(rnd.choice((encode_loan(0, 0, 1), encode_release(0), encode_eof())) + good)
        elif kind == "hello: truncated":
            self.send(good[: rnd.randrange(1, len(good))])
            self.mute = True
        else:  # no hello: the target's open must time out
            self.mute = True
        if kind in FATAL:
            self.told, self.lie_end = kind, self.queued

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
                if self.lying and not self.told and self.steps > self.lie_at:
                    self.tell()
                else:
                    self.act()
                if self.leave_holding and self.held and self.proto.sent_count:
                    break
                if self.stall and self.held and not self.out:
                    self.quiet()
                    return
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

    def quiet(self) -> None:
        """Hold the target's loans and say nothing (but read) until the target leaves,
        at most :data:`STALL` seconds: its loans and receptions must end at their own
        deadlines meanwhile (an operation that waits longer is reported as slow).

        Raises:
            Gone: the vchan ended (the target left).
        """
        COUNTS["mutations"]["stalls holding loans"] += 1
        deadline = time.monotonic() + STALL
        while time.monotonic() < deadline:
            if not self.pump():
                time.sleep(0.002)

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
        if proto.messages and not proto.eof_sent and rnd.random() < 0.3:
            attach = None
            if self.buffers and rnd.random() < 0.5:
                i = proto.take()
                if i is not None:
                    off = rnd.randrange(0, self.size + 1)
                    attach = (i, off, rnd.randrange(0, self.size - off + 1))
            frame = self.message_head(self.payload())
            self.send(
                proto.message_frame(frame, attach), "MESSAGE with a loan" if attach else "MESSAGE"
            )
        if self.never_release and self.held and not self.holding:
            self.holding = True  # counted once per episode
            COUNTS["mutations"]["never releases"] += 1

    def payload(self) -> bytes:
        self.seq += 1
        return ENC.encode(Msg(self.seq, self.rnd.randbytes(self.rnd.randrange(0, 100))))

    @staticmethod
    def message_head(payload: bytes) -> bytearray:
        """A MESSAGE frame of ``payload``, its head (but the framer's length) to fill."""
        frame = bytearray(MESSAGE_HEAD_SIZE) + payload
        struct.pack_into("<I", frame, MESSAGE_HEAD_SIZE - 4, len(payload))
        return frame

    def tell(self) -> None:
        """Tell the least told lie that this moment allows (none: later)."""
        if self.mute or self.proto.peer is None:
            return
        told = COUNTS["mutations"]
        for lie in sorted(LIES, key=lambda k: (told[k], ORDER[0] * LIES.index(k))):
            frame = self.lie_frame(lie)
            if frame:
                self.send(frame)
                self.told = lie
                told[lie] += 1
                if lie in FATAL:
                    self.lie_end = self.queued
                if lie in ("truncated frame", "garbage", "message: truncated"):
                    self.mute = True
                return

    def lie_frame(self, lie: str) -> bytes:
        """The frames of ``lie``, or b"" if this moment does not allow it (a lie that
        changes our state, e.g. sends a valid EOF first, always returns frames)."""
        rnd, proto = self.rnd, self.proto
        peer = proto.peer
        assert peer is not None
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
            # (not 5: a MESSAGE head, valid in version 2)
            frame = bytes([rnd.choice((0, 6, 9, 0x80, 0xFF)), 0, 0, 0]) + bytes(12)
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
        elif lie == "message: to a side that takes none":
            if peer.version < MESSAGE_VERSION:
                frame = encode_message(self.payload())
        elif proto.messages:  # the target takes messages: lie in them
            frame = self.message_lie(lie)
        return bytes(frame)

    def message_lie(self, lie: str) -> bytes:
        rnd, proto = self.rnd, self.proto
        payload = self.payload()
        if lie == "message: over the size limit":
            big = rnd.choice((1 << 16 | 1, 1 << 24, 0x7FFFFFFF, 0xFFFFFFFF))
            return _MESSAGE.pack(5, 0, 0, 0, 0, 0, big) + payload
        if lie == "message: attachment out of range":
            b, off, n = rnd.choice(
                ((self.buffers, 0, 1), (0xFFFFFFFF, 0, 0), (0, self.size, 1), (0, 1, 0xFFFFFFFF))
            )
            return encode_message(payload, (b, off, n))  # (each is outside the pool)
        if lie == "message: attachment the target holds":
            sent = [i for i in range(self.buffers) if proto._states[i] == 2]
            if sent:
                return encode_message(payload, (rnd.choice(sent), 0, 1))
        elif lie == "message: unattached naming bytes":
            return _MESSAGE.pack(5, 0, 0, 0, rnd.randrange(1, 9), 1, len(payload)) + payload
        elif lie == "message: bad flags":
            flags = rnd.choice((2, 3, 0x80, 0xFF))
            return _MESSAGE.pack(5, flags, 0, 0, 0, 0, len(payload)) + payload
        elif lie == "message: undecodable":  # a valid frame: MalformedMessage at its get
            junk = rnd.choice((b"", b"\xc1", rnd.randbytes(rnd.randrange(1, 40))))
            return encode_message(junk)
        elif lie == "message: wrong type":
            return encode_message(ENC.encode({"seq": "x", "body": [1, 2]}))
        elif lie == "message: after eof":
            if not proto.eof_sent:
                return proto.eof_frame() + encode_message(payload)
        elif lie == "message: truncated":
            whole = encode_message(payload)
            return whole[: rnd.randrange(1, len(whole))]
        return b""


def violation(what: str) -> None:
    COUNTS["violations"][what[:300]] += 1


#: Among the lies told least, which first: the list's order (1), as the peer of a
#: target server does, or the reverse (-1), as the peer of a target client: the two
#: peers of a run start from opposite ends, so that a short run tells every kind.
ORDER = [1]


def next_hello(k: int) -> tuple[str, bool]:
    """Episode ``k``'s HELLO kind and whether it lies after the HELLOs: of every five
    episodes, one lies in its HELLO (the least told HELLO lie so far), one is honest,
    three lie later (so that a short run tells every lie)."""
    if k % 5 == 0:
        told = COUNTS["mutations"]
        return min(HELLO_LIES, key=lambda h: (told[h], ORDER[0] * HELLO_LIES.index(h))), False
    return "good", k % 5 != 1


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
        h = BulkHostile(ch, rnd, "good", False, crash=True)
        try:
            h.run(30 * SCALE)  # killed long before, unless the target left
        finally:
            h.close()
        return


#: Episodes (tries) so far: every 25th is a lender killed mid-loan.
TRIES = Counter[str]()


def episode(backend: Backend, role: str, peer: int, path: str, rnd: random.Random) -> None:
    """One connection: a HELLO and loans, lies or not (see the module docstring), until
    its time is up or the target left; or a lender killed mid-loan."""
    episodes = COUNTS["episodes"]
    ORDER[0] = 1 if role == "client" else -1
    TRIES["all"] += 1
    if TRIES["all"] % 25 == 3:  # (a few in every run, even a short one)
        crash_episode(backend, role, str(peer), path, rnd)
        return
    ch = connect(role, backend, peer, path, rnd, episodes, corrupt=0)
    if ch is None:
        return
    hello, lying = next_hello(episodes["hostile"])
    never = rnd.random() < 0.25
    # (GntipcError: e.g. the pool over the grant budget)
    h = start(
        ch,
        episodes,
        lambda: BulkHostile(ch, rnd, hello, lying, never_release=never),
        (GntipcError,),
    )
    if h is None:
        return
    try:
        h.run(SCALE * rnd.choice((0.05, 0.15, 0.3)))
    finally:
        h.close()


def main() -> None:
    if sys.argv[1] == "crash":
        crash_child(*sys.argv[2:])
    else:
        serve(COUNTS, episode)


if __name__ == "__main__":
    main()
