"""The sans-I/O message framing: every split of the input, hostile headers, garbage."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gntipc import MalformedMessage, MessageTooLarge
from gntipc.protocol import BATCH_FLAG, NEED_DATA, MessageFramer
from gntipc.testing._conformance import Reading, frame  # the conformance suites' own

# Deterministic (the same examples every run) and no per-example time limit: a loaded
# CI machine must not turn a slow example into a failure.
STABLE: dict[str, bool | None] = {"deadline": None, "derandomize": True}


def batch_frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload) | BATCH_FLAG) + payload


readings = st.builds(
    Reading, st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=300)
)


def drain(framer: MessageFramer[Reading]) -> list[Reading]:
    out: list[Reading] = []
    while (message := framer.next_message()) is not NEED_DATA:
        out.append(message)  # type: ignore[arg-type]
    return out


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- the wire format, pinned ------------------------------------------------------------


def test_wire_format_is_a_u32_length_and_msgpack() -> None:
    framer = MessageFramer(Reading)
    body = msgspec.msgpack.encode(Reading(1, 2.0, "x"))
    assert framer.encode(Reading(1, 2.0, "x")) == struct.pack("<I", len(body)) + body
    batch = [Reading(i, i / 3) for i in range(5)]
    # Version 1: two or more messages are one batch frame, an array behind a header
    # with the top bit set...
    expected = batch_frame(msgspec.msgpack.encode(batch))
    assert framer.encode_many(batch) == expected
    buf = bytearray(b"keep")
    framer.encode_many_into(batch, buf, 4)
    assert buf == b"keep" + expected
    framer.encode_into(batch[0], buf, 4)
    assert buf == b"keep" + framer.encode(batch[0])
    assert framer.encode_many([]) == b""
    # ...one message stays a message frame...
    assert framer.encode_many(batch[:1]) == framer.encode(batch[0])
    # ...and without batch frames, one message frame each (version 0, for older peers).
    old = MessageFramer(Reading, batch_frames=False)
    assert old.encode_many(batch) == b"".join(frame(msgspec.msgpack.encode(r)) for r in batch)


def test_wire_bytes_pinned() -> None:
    # The raw bytes of both frame kinds, as another implementation would write them.
    framer = MessageFramer(int)
    assert framer.encode(7) == bytes.fromhex("0100000007")
    assert framer.encode_many([1, 2, 300]) == bytes.fromhex("06000080930102cd012c")
    assert MessageFramer(int, batch_frames=False).encode_many([1, 2]) == bytes.fromhex(
        "01000000010100000002"
    )
    framer.feed(bytes.fromhex("01000000050300008092060701000080900100000008"))
    assert drain(framer) == [5, 6, 7, 8]  # both kinds, an empty batch delivers nothing


@settings(max_examples=50, **STABLE)
@given(st.lists(readings, min_size=2, max_size=40), st.integers(min_value=60, max_value=2000))
def test_a_batch_larger_than_max_message_size_is_split(messages: list[Reading], most: int) -> None:
    framer = MessageFramer(Reading, max_message_size=most)
    if any(len(msgspec.msgpack.encode(m)) > most for m in messages):
        with pytest.raises(MessageTooLarge):
            framer.encode_many(messages)
        return
    wire = framer.encode_many(messages)
    pos = 0
    while pos < len(wire):  # every frame within the limit
        (header,) = struct.unpack_from("<I", wire, pos)
        assert header & ~BATCH_FLAG <= most
        pos += 4 + (header & ~BATCH_FLAG)
    framer.feed(wire)
    assert drain(framer) == messages


def test_encoding_too_large_or_unencodable_writes_nothing() -> None:
    framer = MessageFramer(Reading, max_message_size=50)
    buf = bytearray(b"ab")
    with pytest.raises(MessageTooLarge, match="more than max_message_size"):
        framer.encode_into(Reading(1, 1.0, "x" * 100), buf, 2)
    assert buf == b"ab"
    with pytest.raises(MessageTooLarge):
        framer.encode_many_into([Reading(1, 1.0), Reading(2, 2.0, "y" * 60)], buf, 1)
    assert buf == b"a"
    with pytest.raises(TypeError):
        framer.encode_into(object(), buf)  # type: ignore[arg-type]
    assert buf == b""
    for bad in (0, 2**31, 2**32):
        with pytest.raises(ValueError):
            MessageFramer(Reading, max_message_size=bad)


def test_feed_takes_bytes_only() -> None:
    framer = MessageFramer(Reading)
    with pytest.raises(TypeError):
        framer.feed(bytearray(b"1234"))  # type: ignore[arg-type]
    framer.feed(b"")
    assert framer.next_message() is NEED_DATA
    assert framer.buffered == 0
    assert repr(NEED_DATA) == "NEED_DATA"


# -- every split of the input ------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], **STABLE)
@given(st.lists(readings, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_any_split_decodes_the_same_messages(messages: list[Reading], cuts: list[int]) -> None:
    framer = MessageFramer(Reading)
    # batch frames, message frames, and both mixed
    half = len(messages) // 2
    wire = (
        framer.encode_many(messages)
        + MessageFramer(Reading, batch_frames=False).encode_many(messages)
        + framer.encode_many(messages[:half])
        + b"".join(framer.encode(m) for m in messages[half:])
    )
    messages = messages * 2 + messages[:half] + messages[half:]
    got: list[Reading] = []
    for piece in cut(wire, cuts):
        framer.feed(piece)
        got += drain(framer)
    assert got == messages
    assert framer.buffered == 0
    framer.end_of_stream()  # ended on a frame boundary: no error


@settings(max_examples=100, **STABLE)
@given(st.lists(readings, min_size=1, max_size=10), st.integers(min_value=1, max_value=7))
def test_one_byte_at_a_time_and_missing(messages: list[Reading], batch: int) -> None:
    framer = MessageFramer(Reading)
    wire = framer.encode_many(messages)
    got: list[Reading] = []
    pos = 0
    while pos < len(wire):
        # missing() never overshoots: feeding exactly that much completes the frame
        # (or its header), and never asks for nothing
        need = framer.missing()
        assert need >= 1
        chunk = wire[pos : pos + need]
        for i in range(len(chunk)):
            framer.feed(chunk[i : i + 1])
        pos += len(chunk)
        got += framer.next_messages(batch)
    while rest := framer.next_messages(batch):
        got += rest
    assert got == messages


@settings(max_examples=100, **STABLE)
@given(
    st.lists(readings, min_size=1, max_size=30),
    st.lists(st.integers(min_value=0), max_size=10),
    st.integers(min_value=1, max_value=5),
)
def test_next_messages_is_bounded_and_ordered(
    messages: list[Reading], cuts: list[int], limit: int
) -> None:
    framer = MessageFramer(Reading)
    for piece in cut(framer.encode_many(messages), cuts):
        framer.feed(piece)  # fed without taking anything in between
    got: list[Reading] = []
    while batch := framer.next_messages(limit):
        assert 1 <= len(batch) <= limit
        got += batch
    assert got == messages
    with pytest.raises(ValueError):
        framer.next_messages(0)


# -- hostile input ---------------------------------------------------------------------


@settings(max_examples=300, **STABLE)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
def test_garbage_raises_only_the_documented_errors(garbage: bytes, cuts: list[int]) -> None:
    # Any bytes at all: each frame decodes, is skipped as malformed, or the length is
    # refused; nothing else escapes, and the framer never loops or loses sync.
    framer: MessageFramer[object] = MessageFramer(object, max_message_size=200)
    for piece in cut(garbage, cuts):
        framer.feed(piece)
        while True:
            try:
                if framer.next_message() is NEED_DATA:
                    break
            except MalformedMessage:
                continue
            except MessageTooLarge:
                with pytest.raises(MessageTooLarge):
                    framer.next_message()  # broken for good
                with pytest.raises(MessageTooLarge):
                    framer.feed(b"more")
                return
    try:
        framer.end_of_stream()
    except MalformedMessage:
        assert framer.buffered == 0


@settings(**STABLE)
@given(
    st.integers(min_value=101, max_value=2**31 - 1),
    st.integers(min_value=1, max_value=4),
    st.sampled_from([0, BATCH_FLAG]),
)
def test_oversized_header_is_refused_as_soon_as_it_is_complete(
    n: int, split: int, flag: int
) -> None:
    framer = MessageFramer(Reading, max_message_size=100)
    good = framer.encode(Reading(1, 1.0))
    header = struct.pack("<I", n | flag)
    framer.feed(good + header[:split])
    assert framer.next_message() == Reading(1, 1.0)
    if split < 4:
        assert framer.next_message() is NEED_DATA
        framer.feed(header[split:])
    with pytest.raises(MessageTooLarge, match=f"{n}-byte"):
        framer.next_message()  # before any of the announced payload arrived
    assert framer.buffered == 0


def test_malformed_frames_are_skipped_in_place() -> None:
    framer = MessageFramer(Reading)
    good = framer.encode(Reading(7, 7.0))
    wrong_type = frame(msgspec.msgpack.encode({"sensor": "x", "value": 1.0}))
    garbage = frame(b"\xc1\xc1")  # 0xc1 is never valid msgpack
    deep = frame(b"\x91" * 100_000)  # nesting past msgspec's recursion limit
    framer.feed(good + wrong_type + good + garbage + deep + good)
    # a batch stops before a bad frame; the next call reports it, then goes on
    assert framer.next_messages(10) == [Reading(7, 7.0)]
    with pytest.raises(MalformedMessage, match="skipped"):
        framer.next_messages(10)
    assert framer.next_messages(10) == [Reading(7, 7.0)]
    with pytest.raises(MalformedMessage):
        framer.next_message()
    with pytest.raises(MalformedMessage):
        framer.next_message()
    assert framer.next_message() == Reading(7, 7.0)


def test_hostile_batch_frames_are_skipped_whole() -> None:
    framer = MessageFramer(Reading)
    good = framer.encode(Reading(7, 7.0))
    two = msgspec.msgpack.encode([Reading(1, 1.0), Reading(2, 2.0)])
    lies = batch_frame(b"\x95" + two[1:])  # says 5 messages, holds 2
    bomb = batch_frame(b"\xdd\xff\xff\xff\xff")  # says 2**32 - 1, holds none
    huge = batch_frame(b"\xdd\x00\x10\x00\x00" + b"\xc0" * 100)  # 2**20 nils
    wrong = batch_frame(msgspec.msgpack.encode([Reading(1, 1.0), {"sensor": "x"}]))
    not_array = batch_frame(msgspec.msgpack.encode(Reading(3, 3.0)))
    deep = batch_frame(b"\x91" * 100_000)
    bad = [lies, bomb, huge, wrong, not_array, deep]
    framer.feed(good + b"".join(b + good for b in bad))
    assert framer.next_message() == Reading(7, 7.0)
    for _ in bad:
        with pytest.raises(MalformedMessage, match="batch frame skipped"):
            framer.next_message()
        assert framer.next_message() == Reading(7, 7.0)  # in sync after each
    assert framer.next_message() is NEED_DATA
    assert framer.buffered == 0 and framer.pending == 0


def test_decoding_ahead_reports_errors_in_their_place() -> None:
    framer = MessageFramer(int)
    framer.feed(
        framer.encode_many([1, 2, 3])
        + frame(b"\xc1")
        + framer.encode(4)
        + batch_frame(b"\x92\x05")
        + framer.encode(6)
    )
    assert framer.next_message() == 1
    assert framer.pending == 2  # 2 and 3, decoded with 1
    assert [framer.next_message(), framer.next_message()] == [2, 3]
    with pytest.raises(MalformedMessage, match="message skipped"):
        framer.next_message()
    assert framer.next_message() == 4
    with pytest.raises(MalformedMessage, match="batch frame skipped"):
        framer.next_messages(10)
    assert framer.next_messages(10) == [6]


def test_truncated_input_is_reported_at_end_of_stream() -> None:
    framer = MessageFramer(Reading)
    wire = framer.encode(Reading(1, 1.0, "abc"))
    framer.feed(wire[:-1])
    assert framer.next_message() is NEED_DATA
    assert framer.missing() == 1
    with pytest.raises(MalformedMessage, match="ended inside a frame"):
        framer.end_of_stream()
    assert framer.buffered == 0
    framer.end_of_stream()


def test_reassembly_is_linear() -> None:
    # Deterministic: pieces of an incomplete frame are kept as they are (no join, no
    # copy) until the frame is complete; then it is joined once.
    framer = MessageFramer(bytes, max_message_size=1 << 20)
    wire = framer.encode(bytes(500_000)) + framer.encode(b"next")
    pieces = [wire[i : i + 1000] for i in range(0, len(wire), 1000)]
    framer.feed(pieces[0])
    first = framer._rbuf
    for piece in pieces[1:-1]:
        framer.feed(piece)
        assert framer.next_message() is NEED_DATA
        assert framer._rbuf is first  # nothing was joined
    framer.feed(pieces[-1])
    assert framer.next_message() == bytes(500_000)
    assert framer.next_message() == b"next"


@settings(max_examples=60, **STABLE)
@given(
    st.lists(st.binary(max_size=3000), min_size=1, max_size=12),
    st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=5000)), max_size=60),
)
def test_receiving_large_frames_in_place_decodes_the_same_messages(
    payloads: list[bytes], steps: list[tuple[bool, int]]
) -> None:
    # Any mix of feed() and receive_buffer()/received(), in pieces of any size: the
    # same messages, in order, and nothing left over.
    framer = MessageFramer(bytes)
    wire = b"".join(framer.encode(p) for p in payloads)
    got: list[bytes] = []
    pos = 0
    moves = iter(steps)
    while pos < len(wire):
        in_place, size = next(moves, (False, len(wire)))
        view = framer.receive_buffer(100) if in_place else None
        if view is not None:
            k = min(size, len(view), len(wire) - pos)
            view[:k] = wire[pos : pos + k]
            framer.received(k)
        else:
            k = min(size, len(wire) - pos)
            framer.feed(wire[pos : pos + k])
        pos += k
        assert framer.buffered + sum(map(len, (framer.encode(g) for g in got))) == pos
        while (message := framer.next_message()) is not NEED_DATA:
            got.append(message)  # type: ignore[arg-type]
    assert got == payloads
    assert framer.buffered == 0
    framer.end_of_stream()


def test_receive_buffer_only_for_a_large_frame_of_known_length() -> None:
    framer = MessageFramer(bytes, max_message_size=1 << 20)
    wire = framer.encode(bytes(range(256)) * 1000)
    assert framer.receive_buffer(0) is None  # nothing buffered: no length yet
    framer.feed(wire[:3])
    assert framer.receive_buffer(0) is None  # a partial header
    framer.feed(wire[3:10])
    assert framer.receive_buffer(len(wire) - 10) is None  # not more than that missing
    view = framer.receive_buffer(1000)
    assert view is not None and len(view) == len(wire) - 10 == framer.missing()
    view[:5] = wire[10:15]
    framer.received(5)
    with pytest.raises(ValueError):
        framer.received(len(wire))  # more than the view holds
    framer.feed(wire[15:] + framer.encode(b"next"))  # fills the view first
    assert framer.next_message() == bytes(range(256)) * 1000
    assert framer.next_message() == b"next"
    with pytest.raises(ValueError):
        framer.received(1)  # no view any more


def _receive_in_place(framer: MessageFramer[Any], wire: bytes) -> object:
    """Feed ``wire``'s header, receive the rest in place; the buffer it was received
    into (the view is released: a view held would keep the buffer from being reused)."""
    framer.feed(wire[:8])
    with framer.receive_buffer(100) as view:  # type: ignore[union-attr]
        view[:] = wire[8:]
        framer.received(len(view))
        return view.obj


def test_a_large_frame_reuses_the_last_ones_buffer() -> None:
    # A fresh buffer per large frame is zero-filled and page-faulted in: the next
    # large frame is received into the last one's buffer, once its message is decoded.
    framer = MessageFramer(bytes, max_message_size=1 << 20)
    first = _receive_in_place(framer, framer.encode(b"a" * 50_000))
    assert framer.next_message() == b"a" * 50_000
    second = _receive_in_place(framer, framer.encode(b"b" * 40_000))
    assert second is first
    assert framer.next_message() == b"b" * 40_000
    third = _receive_in_place(framer, framer.encode(b"c" * 60_000))  # grows it
    assert third is first
    assert framer.next_message() == b"c" * 60_000


@pytest.mark.parametrize("kind", [memoryview, msgspec.Raw])
def test_a_large_frame_never_overwrites_what_a_message_refers_to(kind: Any) -> None:
    # msgspec decodes memoryview and msgspec.Raw values as references into the frame:
    # while a message holds one, the next large frame gets a buffer of its own.
    framer: MessageFramer[Any] = MessageFramer(kind, max_message_size=1 << 20)

    def wire(fill: bytes) -> bytes:
        value = fill * 50_000
        raw = msgspec.Raw(msgspec.msgpack.encode(value))
        return framer.encode(raw if kind is msgspec.Raw else value)

    first = _receive_in_place(framer, wire(b"a"))
    held = framer.next_message()
    before = bytes(held)
    second = _receive_in_place(framer, wire(b"b"))
    assert second is not first
    assert bytes(framer.next_message()) != before
    assert bytes(held) == before


def test_receive_buffer_never_allocates_for_an_oversized_header() -> None:
    # A hostile length: no buffer of that size, the usual MessageTooLarge instead.
    framer = MessageFramer(bytes, max_message_size=1000)
    framer.feed(struct.pack("<I", 1 << 30) + b"x")
    assert framer.receive_buffer(0) is None
    with pytest.raises(MessageTooLarge):
        framer.next_message()
    assert framer.receive_buffer(0) is None


def test_the_stream_may_end_inside_a_frame_received_in_place() -> None:
    framer = MessageFramer(bytes, max_message_size=1 << 20)
    wire = framer.encode(bytes(10_000))
    framer.feed(wire[:100])
    view = framer.receive_buffer(0)
    assert view is not None
    view[:50] = wire[100:150]
    framer.received(50)
    assert framer.buffered == 150
    with pytest.raises(MalformedMessage, match="150 bytes left"):
        framer.end_of_stream()
    assert framer.buffered == 0 and framer.receive_buffer(0) is None
