"""The sans-I/O bulk (buffer pool) protocol: frames pinned to the wire format, the pool
state on both sides, every split of the input, hostile descriptors, a fuzzer; version 2's
MESSAGE frames (typed messages with an attachment) and their negotiation."""

from __future__ import annotations

import itertools
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gntipc import LocalProtocolError, RemoteProtocolError
from gntipc.protocol import MessageFramer
from gntipc.protocol.bulk import (
    HELLO_SIZE,
    MAX_POOL_PAGES,
    MESSAGE_HEAD_SIZE,
    BulkProtocol,
    Eof,
    Hello,
    Loan,
    Message,
    Release,
    descriptor_room,
    encode_eof,
    encode_hello,
    encode_loan,
    encode_message,
    encode_release,
    message_room,
)

STABLE: dict[str, bool | None] = {"deadline": None, "derandomize": True}

# A pool of 2 buffers of 8 KiB: 4 pages, refs 8..11.
HELLO2 = encode_hello(2, 8192, [8, 9, 10, 11])


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def pair() -> tuple[BulkProtocol, BulkProtocol]:
    """A (lender with 2 x 8 KiB) and B (no pool), each having read the other's HELLO."""
    a, b = BulkProtocol(2, 8192), BulkProtocol(0, 0)
    assert b.receive_data(HELLO2) == [Hello(8192, 2, (8, 9, 10, 11))]
    assert a.receive_data(encode_hello(0, 0, [])) == [Hello(0, 0, ())]
    return a, b


# -- the wire format, pinned ----------------------------------------------------------


def test_frames_pinned() -> None:
    pinned = bytes.fromhex(
        "01000000" + "47424c4b" + "0100" + "0000" + "00200000" + "02000000" + "04000000"
        "08000000" + "09000000" + "0a000000" + "0b000000"
    )
    assert pinned == HELLO2
    assert len(HELLO2) == HELLO_SIZE + 16
    assert encode_hello(0, 0, []) == bytes.fromhex("0100000047424c4b01000000" + "00" * 12)
    assert encode_loan(1, 16, 100) == bytes.fromhex("02000000010000001000000064000000")
    assert encode_release(7) == bytes.fromhex("0300000007000000")
    assert encode_eof() == bytes.fromhex("0400000000000000")


@pytest.mark.parametrize(
    ("buffers", "size", "refs"),
    [
        (1, 4095, [1]),  # not a page multiple
        (1, 0, []),  # buffers without size
        (0, 4096, []),  # size without buffers
        (1, 4096, []),  # refs missing
        (1, 4096, [1, 2]),  # one ref too many
        (1, 4096, [1 << 32]),  # not a u32
        (-1, 4096, []),
        (MAX_POOL_PAGES + 1, 4096, []),
    ],
)
def test_encode_hello_refuses_bad_geometry(buffers: int, size: int, refs: list[int]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_hello(buffers, size, refs)


# -- the pools, end to end ----------------------------------------------------------------


def test_lend_receive_release_cycle() -> None:
    a, b = pair()
    i = a.take()
    j = a.take()
    assert {i, j} == {0, 1} and a.take() is None and a.free_count == 0
    a.give_back(j)  # not sent: free again at once
    assert a.free_count == 1
    frame = a.loan_frame(i, 100, 8000)  # type: ignore[arg-type]
    assert b.receive_data(frame) == [Loan(i, 100, 8000)]  # type: ignore[arg-type]
    assert b.holds(i) and b.held_count == 1  # type: ignore[arg-type]
    rel = b.release_frame(i)  # type: ignore[arg-type]
    assert not b.holds(i)  # type: ignore[arg-type]
    assert a.receive_data(rel) == [Release(i)]  # type: ignore[arg-type]
    assert a.free_count == 2 and a.sent_count == 0
    assert b.receive_data(a.eof_frame()) == [Eof()]
    assert a.eof_frame() == b""  # idempotent
    assert b.peer_eof


def test_released_buffer_is_lent_first() -> None:
    a, b = pair()
    i = a.take()
    assert i is not None
    b.receive_data(a.loan_frame(i, 0, 1))
    a.receive_data(b.release_frame(i))
    assert a.take() == i  # warm in the caches


def test_local_misuse() -> None:
    a, b = pair()
    with pytest.raises(LocalProtocolError):
        a.loan_frame(0, 0, 1)  # not taken
    i = a.take()
    assert i is not None
    with pytest.raises(LocalProtocolError):
        a.loan_frame(i, 8000, 193)  # past the end
    with pytest.raises(LocalProtocolError):
        a.loan_frame(i, -1, 1)
    a.loan_frame(i, 0, 8192)
    with pytest.raises(LocalProtocolError):
        a.loan_frame(i, 0, 1)  # sent already
    with pytest.raises(LocalProtocolError):
        a.give_back(i)  # the peer's now
    a.unsend(i)  # the frame could not be written: ours again
    a.give_back(i)
    with pytest.raises(LocalProtocolError):
        b.release_frame(0)  # never held
    with pytest.raises(LocalProtocolError):
        b.take()  # no pool
    a.eof_frame()
    with pytest.raises(LocalProtocolError):
        a.take()


def test_ring_check() -> None:
    a, _ = pair()
    need = descriptor_room(2, 0)
    assert need == 3 * 16
    a.check_ring(need, descriptor_room(0, 2))
    with pytest.raises(LocalProtocolError, match="too small"):
        a.check_ring(need - 1, 1 << 20)


@given(st.lists(st.integers(0, 200), max_size=8))
@settings(max_examples=100, **STABLE)
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    a = BulkProtocol(2, 8192)
    i, j = a.take(), a.take()
    assert i is not None and j is not None
    wire = HELLO2 + a.loan_frame(i, 1, 2) + a.loan_frame(j, 0, 8192) + a.eof_frame()
    b = BulkProtocol(0, 0)
    got = [e for part in cut(wire, cuts) for e in b.receive_data(part)]
    assert got == [Hello(8192, 2, (8, 9, 10, 11)), Loan(i, 1, 2), Loan(j, 0, 8192), Eof()]
    assert b.buffered == 0


def test_one_byte_at_a_time() -> None:
    b = BulkProtocol(0, 0)
    events = []
    for k in range(len(HELLO2)):
        events += b.receive_data(HELLO2[k : k + 1])
        if k < len(HELLO2) - 1:
            assert events == [] and b.buffered == k + 1
    assert events == [Hello(8192, 2, (8, 9, 10, 11))]


# -- hostile peers ----------------------------------------------------------------------------

HOSTILE = {
    "loan before hello": encode_loan(0, 0, 1),
    "bad magic": HELLO2.replace(b"GBLK", b"GBLX"),
    "bad version": HELLO2[:8] + b"\x03\x00" + HELLO2[10:],
    "hello reserved": HELLO2[:10] + b"\x01\x00" + HELLO2[12:],
    "flags": b"\x01\x01" + HELLO2[2:],
    "reserved": b"\x01\x00\x01\x00" + HELLO2[4:],
    # lying counts: 4 pages announced for 2 x 8 KiB is right; 5 is not
    "lying page count": HELLO2[:20] + struct.pack("<I", 5) + HELLO2[24:] + b"\0" * 4,
    "size not a page multiple": struct.pack("<BBH4sHHIII", 1, 0, 0, b"GBLK", 1, 0, 100, 1, 1),
    "buffers without size": struct.pack("<BBH4sHHIII", 1, 0, 0, b"GBLK", 1, 0, 0, 1, 0),
    "too many pages": struct.pack("<BBH4sHHIII", 1, 0, 0, b"GBLK", 1, 0, 4096, 20000, 20000),
    "second hello": HELLO2 + HELLO2,
    "unknown type": HELLO2 + b"\x09\x00\x00\x00" + b"\0" * 12,
    "loan of buffer out of range": HELLO2 + encode_loan(2, 0, 1),
    "loan past the buffer end": HELLO2 + encode_loan(1, 8000, 193),
    "loan with offset overflow": HELLO2 + encode_loan(1, 0xFFFFFFFF, 2),
    "loan of a held buffer": HELLO2 + encode_loan(1, 0, 1) + encode_loan(1, 0, 1),
    "loan after eof": HELLO2 + encode_eof() + encode_loan(0, 0, 1),
    "second eof": HELLO2 + encode_eof() + encode_eof(),
    "eof with a value": HELLO2 + b"\x04\x00\x00\x00\x01\x00\x00\x00",
    "release of a buffer never loaned": HELLO2 + encode_release(0),
    "release out of range": HELLO2 + encode_release(7),
}


@pytest.mark.parametrize("wire", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_frames_raise_and_kill_the_protocol(wire: bytes) -> None:
    # The receiving side has a pool of 2 x 8 KiB too, so RELEASEs are meaningful.
    b = BulkProtocol(2, 8192, max_peer_pages=16384)
    with pytest.raises(RemoteProtocolError, match="bulk peer"):
        b.receive_data(wire)
    with pytest.raises(RemoteProtocolError):  # dead from now on
        b.receive_data(b"")
    assert b.buffered == 0


def test_double_release() -> None:
    a, b = pair()
    i = a.take()
    assert i is not None
    b.receive_data(a.loan_frame(i, 0, 1))
    rel = b.release_frame(i)
    a.receive_data(rel)
    with pytest.raises(RemoteProtocolError, match="not on loan"):
        a.receive_data(rel)


def test_release_of_a_lent_but_unsent_buffer() -> None:
    a, _ = pair()
    i = a.take()
    assert i is not None
    with pytest.raises(RemoteProtocolError, match="not on loan"):
        a.receive_data(encode_release(i))


def test_hello_over_our_limit_is_refused_before_its_refs_arrive() -> None:
    b = BulkProtocol(0, 0, max_peer_pages=4)
    head = encode_hello(1, 5 * 4096, list(range(5)))[:HELLO_SIZE]
    with pytest.raises(RemoteProtocolError, match="at most 4"):
        b.receive_data(head)


# -- version 2: MESSAGE frames ----------------------------------------------------------------

HELLO2_V2 = encode_hello(2, 8192, [8, 9, 10, 11], version=2)
PAYLOAD = msgspec.msgpack.encode([1, 2, 3])  # 93 01 02 03


def pair_v2(limit: int = 100) -> tuple[BulkProtocol, BulkProtocol]:
    """:func:`pair` with both sides taking messages of up to ``limit`` bytes."""
    a = BulkProtocol(2, 8192, max_message_size=limit)
    b = BulkProtocol(0, 0, max_message_size=limit)
    assert b.receive_data(HELLO2_V2) == [Hello(8192, 2, (8, 9, 10, 11), 2)]
    assert a.receive_data(encode_hello(0, 0, [], version=2)) == [Hello(0, 0, (), 2)]
    assert a.messages and b.messages
    return a, b


def framed(message: object, framer: MessageFramer[object] | None = None) -> bytearray:
    """A MESSAGE frame of ``message`` with its head left to fill (what the queue builds)."""
    buf = bytearray(MESSAGE_HEAD_SIZE)
    (framer or MessageFramer(object)).encode_into(message, buf, MESSAGE_HEAD_SIZE - 4)
    return buf


def test_message_frames_pinned() -> None:
    # HELLO version 2: only the version field differs from version 1's.
    assert encode_hello(0, 0, [], version=2) == bytes.fromhex(
        "0100000047424c4b02000000" + "00" * 12
    )
    assert HELLO2[:8] + b"\x02" + HELLO2[9:] == HELLO2_V2
    # type 5, flags ATTACHED, u16 0, buffer 1, offset 16, length 100, payload length 4
    assert encode_message(PAYLOAD, (1, 16, 100)) == bytes.fromhex(
        "05010000" + "01000000" + "10000000" + "64000000" + "04000000" + "93010203"
    )
    assert encode_message(b"\xc0") == bytes.fromhex("05000000" + "00" * 12 + "01000000c0")
    assert MESSAGE_HEAD_SIZE == 20
    # what the sending side builds in place is the same frame
    a, _ = pair_v2()
    i = a.take()
    assert i == 0
    assert a.message_frame(framed([1, 2, 3]), (0, 16, 100)) == encode_message(PAYLOAD, (0, 16, 100))
    assert a.message_frame(framed(None)) == encode_message(b"\xc0")


def test_message_with_and_without_attachment() -> None:
    a, b = pair_v2()
    i = a.take()
    assert i is not None
    wire = bytes(a.message_frame(framed([1, 2, 3]), (i, 10, 20)))
    wire += bytes(a.message_frame(framed("x")))
    events = b.receive_data(wire)
    assert events == [
        Message(b"\x04\x00\x00\x00" + PAYLOAD, Loan(i, 10, 20)),
        Message(b"\x02\x00\x00\x00\xa1x", None),
    ]
    assert b.holds(i) and b.held_count == 1 and a.sent_count == 1
    # the frame is a MessageFramer message frame: the typed layer decodes it as such
    framer: MessageFramer[list[int]] = MessageFramer(list[int])
    first = events[0]
    assert isinstance(first, Message)
    framer.feed(first.frame)
    assert framer.next_message() == [1, 2, 3]
    # the attachment is released like a loan: the buffer is free again
    assert a.receive_data(b.release_frame(i)) == [Release(i)]
    assert a.free_count == 2
    assert b.receive_data(a.eof_frame()) == [Eof()]
    with pytest.raises(LocalProtocolError, match="EOF"):
        a.message_frame(framed(1))


def test_message_local_misuse() -> None:
    a, _ = pair_v2()
    with pytest.raises(LocalProtocolError, match="not lent"):
        a.message_frame(framed(1), (0, 0, 1))  # not taken
    i = a.take()
    assert i is not None
    with pytest.raises(LocalProtocolError, match="outside"):
        a.message_frame(framed(1), (i, 8000, 193))
    with pytest.raises(LocalProtocolError, match="not a message frame"):
        a.message_frame(bytearray(MESSAGE_HEAD_SIZE + 3))  # length field says 0, not 3
    a.message_frame(framed(1), (i, 0, 1))
    with pytest.raises(LocalProtocolError, match="not lent"):
        a.message_frame(framed(1), (i, 0, 1))  # sent already
    a.unsend(i)
    a.give_back(i)
    assert a.free_count == 2


def test_negotiation_version_1_peers_never_get_messages() -> None:
    # A plain side (version 1) announces version 1, as before: a version-1 peer reads it.
    plain = BulkProtocol(2, 8192)
    assert plain.version == 1 and BulkProtocol(0, 0, max_message_size=1).version == 2
    # A queue side meeting a version-1 HELLO may not send messages to it...
    q = BulkProtocol(2, 8192, max_message_size=100)
    q.receive_data(encode_hello(0, 0, []))
    assert not q.messages
    with pytest.raises(LocalProtocolError, match="takes no messages"):
        q.message_frame(framed(1))
    # ... and takes none from it.
    with pytest.raises(RemoteProtocolError, match="version 1"):
        q.receive_data(encode_message(PAYLOAD))
    # A plain side accepts a version-2 HELLO (and the queue side's open then fails), but
    # never a MESSAGE: it announced version 1.
    plain.receive_data(encode_hello(0, 0, [], version=2))
    assert not plain.messages
    with pytest.raises(RemoteProtocolError, match="announced version 1"):
        plain.receive_data(encode_message(PAYLOAD))


def test_message_over_the_limit_is_refused_at_its_head() -> None:
    _, b = pair_v2(limit=100)
    # only the head of a 101-byte message: refused before its payload is buffered
    with pytest.raises(RemoteProtocolError, match="more than max_message_size"):
        b.receive_data(encode_message(bytes(101))[:MESSAGE_HEAD_SIZE])
    _, b = pair_v2(limit=100)
    assert b.receive_data(encode_message(bytes(100))) == [
        Message(b"\x64\x00\x00\x00" + bytes(100), None)
    ]


def test_message_lying_about_its_length_waits_then_misparses_loudly() -> None:
    _, b = pair_v2(limit=100)
    # says 50 bytes, carries 4: the next frame's bytes are taken as its payload; the
    # protocol waits for the rest (bounded by the limit), never reads past what it has
    head = bytearray(encode_message(PAYLOAD))
    head[16:20] = (50).to_bytes(4, "little")
    assert b.receive_data(bytes(head)) == []
    assert b.buffered == len(head)
    # says 1 byte, carries 4: the 3 left over are a frame head with a bad type or flags
    _, b = pair_v2(limit=100)
    head[16:20] = (1).to_bytes(4, "little")
    with pytest.raises(RemoteProtocolError):
        b.receive_data(bytes(head) + encode_message(PAYLOAD))


HOSTILE_V2 = {
    "attachment out of the pool": encode_message(PAYLOAD, (2, 0, 1)),
    "attachment past the buffer end": encode_message(PAYLOAD, (1, 8000, 193)),
    "attachment offset overflow": encode_message(PAYLOAD, (1, 0xFFFFFFFF, 2)),
    "attachment held already (double)": encode_message(PAYLOAD, (1, 0, 1)) * 2,
    "attachment of a buffer lent as a LOAN": encode_loan(0, 0, 1)
    + encode_message(PAYLOAD, (0, 0, 1)),
    "descriptor without the attached flag": encode_message(PAYLOAD)[:4]
    + struct.pack("<III", 1, 0, 1)
    + encode_message(PAYLOAD)[16:],
    "unknown message flag": b"\x05\x02" + encode_message(PAYLOAD)[2:],
    "message reserved field": b"\x05\x00\x01\x00" + encode_message(PAYLOAD)[4:],
    "message after eof": encode_eof() + encode_message(PAYLOAD),
    "attached message after eof": encode_eof() + encode_message(PAYLOAD, (0, 0, 1)),
    "over the limit": encode_message(bytes(101)),
    "length with the batch bit": encode_message(PAYLOAD)[:16]
    + struct.pack("<I", 0x80000004)
    + PAYLOAD,
}


@pytest.mark.parametrize("wire", HOSTILE_V2.values(), ids=HOSTILE_V2.keys())
def test_hostile_messages_raise_and_kill_the_protocol(wire: bytes) -> None:
    b = BulkProtocol(2, 8192, max_message_size=100)
    b.receive_data(HELLO2_V2)
    with pytest.raises(RemoteProtocolError, match="bulk peer"):
        b.receive_data(wire)
    with pytest.raises(RemoteProtocolError):
        b.receive_data(b"")
    assert b.buffered == 0


@given(st.lists(st.integers(0, 200), max_size=8))
@settings(max_examples=100, **STABLE)
def test_any_split_gives_the_same_messages(cuts: list[int]) -> None:
    a = BulkProtocol(2, 8192, max_message_size=100)
    a.receive_data(encode_hello(0, 0, [], version=2))
    i = a.take()
    assert i is not None
    wire = HELLO2_V2 + a.message_frame(framed([1, 2, 3]), (i, 1, 2)) + a.message_frame(framed(7))
    b = BulkProtocol(0, 0, max_message_size=100)
    got = [e for part in cut(bytes(wire), cuts) for e in b.receive_data(part)]
    assert got == [
        Hello(8192, 2, (8, 9, 10, 11), 2),
        Message(b"\x04\x00\x00\x00" + PAYLOAD, Loan(i, 1, 2)),
        Message(b"\x01\x00\x00\x00\x07", None),
    ]
    assert b.buffered == 0


def test_message_room() -> None:
    # what a put may write: the ring, less every descriptor in flight, less the head
    assert message_room(65536, 2, 0) == 65536 - descriptor_room(2, 0) - MESSAGE_HEAD_SIZE
    assert message_room(1024, 100, 0) < 0


# -- the fuzzer ------------------------------------------------------------------------------

_frames = st.one_of(
    st.builds(encode_loan, st.integers(0, 3), st.integers(0, 9000), st.integers(0, 9000)),
    st.builds(encode_release, st.integers(0, 3)),
    st.just(encode_eof()),
    st.binary(max_size=24),
    st.builds(
        encode_message,
        st.binary(max_size=80),
        st.none() | st.tuples(st.integers(0, 3), st.integers(0, 9000), st.integers(0, 9000)),
    ),
)


@given(
    st.lists(_frames, max_size=12),
    st.lists(st.integers(0, 400), max_size=6),
    st.binary(max_size=8),
    st.integers(0, 400),
)
@settings(max_examples=400, **STABLE)
def test_fuzz_only_remote_protocol_errors_and_bounded_memory(
    frames: list[bytes], cuts: list[int], noise: bytes, at: int
) -> None:
    a = BulkProtocol(2, 8192, max_peer_pages=64, max_message_size=64)
    i = a.take()
    assert i is not None
    a.loan_frame(i, 0, 1)  # one of ours on loan: a RELEASE of it is legal once
    wire = bytearray(HELLO2_V2 + b"".join(frames))
    at %= len(wire) + 1
    wire[at:at] = noise
    try:
        for part in cut(bytes(wire), cuts):
            for e in a.receive_data(part):
                assert isinstance(e, Hello | Loan | Release | Eof | Message)
                if isinstance(e, Message):
                    assert len(e.frame) <= 4 + 64
            # never more than one HELLO (24 + 4 * 64 bytes) or MESSAGE (20 + 64) waits
            # for its end
            assert a.buffered <= HELLO_SIZE + 4 * 64
    except RemoteProtocolError:
        pass
    assert 0 <= a.free_count + a.sent_count <= 2
    assert 0 <= a.held_count <= 2


@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
@settings(max_examples=300, **STABLE)
def test_fuzz_garbage(data: bytes, cuts: list[int]) -> None:
    b = BulkProtocol(0, 0, max_peer_pages=8)
    try:
        for part in cut(data, cuts):
            b.receive_data(part)
            assert b.buffered <= HELLO_SIZE + 4 * 8
    except RemoteProtocolError:
        pass


# -- both sides against a model ------------------------------------------------------------


class TwoSides(RuleBasedStateMachine):
    """Two protocols lending to each other through byte pipes delivered in random pieces,
    against a model of every buffer's state; no RemoteProtocolError ever (both honest)."""

    def __init__(self) -> None:
        super().__init__()
        self.sides = [BulkProtocol(3, 4096), BulkProtocol(2, 8192)]
        refs = [[10, 11, 12], [20, 21, 22, 23]]
        # pipes[k]: bytes side k sent, not yet delivered to the other
        self.pipes = [
            bytearray(encode_hello(3, 4096, refs[0])),
            bytearray(encode_hello(2, 8192, refs[1])),
        ]
        # the model: per side, buffer -> "free" | "lent" | "sent"; the loans each holds
        self.state = [dict.fromkeys(range(3), "free"), dict.fromkeys(range(2), "free")]
        self.held: list[set[int]] = [set(), set()]
        self.received: list[list[Loan]] = [[], []]
        self.expected: list[list[Loan]] = [[], []]

    def _can_take(self, k: int) -> bool:
        return self.sides[k].peer is not None and "free" in self.state[k].values()

    @precondition(lambda self: self._can_take(0) or self._can_take(1))
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from([k for k in (0, 1) if self._can_take(k)]))
        i = self.sides[k].take()
        assert i is not None and self.state[k][i] == "free"
        self.state[k][i] = "lent"

    @precondition(lambda self: any("lent" in m.values() for m in self.state))
    @rule(data=st.data())
    def give_back_or_send(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from([k for k in (0, 1) if "lent" in self.state[k].values()]))
        lent = sorted(b for b, s in self.state[k].items() if s == "lent")
        i = data.draw(st.sampled_from(lent))
        if data.draw(st.integers(0, 3)) == 0:
            self.sides[k].give_back(i)
            self.state[k][i] = "free"
        else:
            size = self.sides[k].buffer_size
            off = data.draw(st.integers(0, size))
            n = data.draw(st.integers(0, size - off))
            self.pipes[k] += self.sides[k].loan_frame(i, off, n)
            self.state[k][i] = "sent"
            self.expected[1 - k].append(Loan(i, off, n))

    @precondition(lambda self: any(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from([k for k in (0, 1) if self.held[k]]))
        i = data.draw(st.sampled_from(sorted(self.held[k])))
        self.pipes[k] += self.sides[k].release_frame(i)
        self.held[k].discard(i)

    @precondition(lambda self: any(self.pipes))
    @rule(data=st.data(), n=st.integers(1, 64))
    def deliver(self, data: st.DataObject, n: int) -> None:
        k = data.draw(st.sampled_from([k for k in (0, 1) if self.pipes[k]]))
        chunk = bytes(self.pipes[k][:n])
        del self.pipes[k][:n]
        other = 1 - k
        for e in self.sides[other].receive_data(chunk):
            if isinstance(e, Loan):
                assert e.buffer not in self.held[other]
                self.held[other].add(e.buffer)
                self.received[other].append(e)
            elif isinstance(e, Release):
                assert self.state[other][e.buffer] == "sent"
                self.state[other][e.buffer] = "free"

    @invariant()
    def agrees_with_the_model(self) -> None:
        for k in (0, 1):
            side = self.sides[k]
            states = self.state[k]
            assert side.free_count == sum(s == "free" for s in states.values())
            assert side.sent_count == sum(s == "sent" for s in states.values())
            assert side.held_count == len(self.held[k])
            assert all(side.holds(b) for b in self.held[k])
            assert self.received[k] == self.expected[k][: len(self.received[k])]
            # never more than descriptor_room bytes in flight once the HELLO is out
            hello = HELLO_SIZE + 4 * (3, 4)[k]
            assert len(self.pipes[k]) <= hello + descriptor_room(3, 2)


TwoSides.TestCase.settings = settings(max_examples=150, stateful_step_count=40, **STABLE)
test_two_sides_against_a_model = TwoSides.TestCase
