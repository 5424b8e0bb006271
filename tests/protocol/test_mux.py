"""The sans-I/O session codec: encoders pinned to the wire format, every split of the
input, hostile headers, garbage."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gntipc import LocalProtocolError, RemoteProtocolError
from gntipc.protocol import mux
from gntipc.protocol.mux import (
    Data,
    Eof,
    FrameType,
    GoAway,
    Hello,
    MuxEvent,
    Open,
    Reset,
    SessionDecoder,
    Window,
)

# Deterministic (the same examples every run) and no per-example time limit: a loaded
# CI machine must not turn a slow example into a failure.
STABLE: dict[str, bool | None] = {"deadline": None, "derandomize": True}

H = struct.Struct("<BBHII")


def raw(t: int, sid: int = 0, value: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return H.pack(t, flags, 0, sid, value) + payload


HELLO = mux.encode_hello(65536, 16)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def encode(event: MuxEvent) -> bytes:
    if isinstance(event, Hello):
        return mux.encode_hello(event.window, event.max_streams)
    if isinstance(event, Data):
        return mux.encode_data(event.stream_id, event.data)
    if isinstance(event, Window):
        return mux.encode_frame(FrameType.WINDOW, event.stream_id, event.increment)
    if isinstance(event, GoAway):
        return mux.encode_frame(FrameType.GOAWAY)
    kind = {Open: FrameType.OPEN, Eof: FrameType.EOF, Reset: FrameType.RESET}[type(event)]
    return mux.encode_frame(kind, event.stream_id)


sids = st.integers(min_value=1, max_value=2**32 - 1)
events = st.one_of(
    st.builds(Open, sids),
    st.builds(Data, sids, st.binary(min_size=1, max_size=mux.MAX_FRAME)),
    st.builds(Window, sids, st.integers(min_value=1, max_value=2**32 - 1)),
    st.builds(Eof, sids),
    st.builds(Reset, sids),
)


def test_wire_format_is_pinned() -> None:
    assert mux.HEADER_SIZE == 12
    assert raw(0, 0, 16, b"GMUX" + struct.pack("<HHII", 1, 0, 65536, 16)) == HELLO
    assert mux.encode_frame(FrameType.WINDOW, 3, 77) == raw(3, 3, 77)
    big = bytes(range(256)) * 300  # more than one DATA frame
    wire = mux.encode_data(5, big)
    first = mux.MAX_FRAME
    assert wire == raw(2, 5, first, big[:first]) + raw(2, 5, len(big) - first, big[first:])
    assert mux.encode_data(5, b"") == b""
    with pytest.raises(LocalProtocolError):
        mux.encode_hello(10, 16)
    with pytest.raises(LocalProtocolError):
        mux.encode_hello(65536, 0)


@settings(max_examples=150, **STABLE)
@given(
    st.lists(events, max_size=12),
    st.booleans(),
    st.lists(st.integers(min_value=0), max_size=20),
)
def test_any_split_decodes_the_same_events(
    body: list[MuxEvent], goaway: bool, cuts: list[int]
) -> None:
    sent: list[MuxEvent] = [Hello(4096, 3), *body]
    if goaway:
        sent.append(GoAway())
    wire = b"".join(encode(e) for e in sent)
    decoder = SessionDecoder()
    got: list[MuxEvent] = []
    for piece in cut(wire, cuts):
        got += decoder.feed(piece)
        assert decoder.buffered <= mux.HEADER_SIZE + mux.MAX_FRAME
    # DATA of more than MAX_FRAME would be split; the strategy stays within one frame
    assert got == sent
    assert decoder.peer_hello
    decoder.end_of_stream()


HOSTILE = {
    "no-hello": (raw(1, 1), "before HELLO"),
    "data-before-hello": (raw(2, 1, 1, b"x"), "before HELLO"),
    "bad-magic": (raw(0, 0, 16, b"HTTP" + HELLO[16:]), "magic"),
    "hello-on-a-stream": (raw(0, 3, 16, HELLO[12:]), "magic"),
    "bad-version": (raw(0, 0, 16, b"GMUX" + struct.pack("<HHII", 9, 0, 65536, 1)), "version"),
    "bad-window": (raw(0, 0, 16, b"GMUX" + struct.pack("<HHII", 1, 0, 5, 1)), "window"),
    "no-streams": (raw(0, 0, 16, b"GMUX" + struct.pack("<HHII", 1, 0, 65536, 0)), "max_streams"),
    "hello-size": (raw(0, 0, 17, HELLO[12:] + b"x"), "HELLO frame of 17 bytes"),
    "duplicate-hello": (HELLO + HELLO, "duplicate HELLO"),
    "unknown-type": (HELLO + raw(9, 1), "unknown frame type"),
    "flags": (HELLO + raw(1, 1, flags=4), "nonzero flags"),
    "reserved": (HELLO + H.pack(1, 0, 1, 1, 0), "nonzero flags"),
    "oversize": (HELLO + raw(2, 1, 0xFFFFFFF0), "oversize"),
    "just-oversize": (HELLO + raw(2, 1, mux.MAX_FRAME + 1), "oversize"),
    "empty-data": (HELLO + raw(2, 1, 0), "empty DATA"),
    "data-stream-zero": (HELLO + raw(2, 0, 1, b"x"), "stream id 0"),
    "open-stream-zero": (HELLO + raw(1, 0), "stream id 0"),
    "open-value": (HELLO + raw(1, 1, 5), "OPEN frame with value 5"),
    "eof-value": (HELLO + raw(4, 1, 1), "EOF frame with value"),
    "reset-value": (HELLO + raw(5, 1, 1), "RESET frame with value"),
    "zero-credit": (HELLO + raw(3, 1, 0), "credit"),
    "goaway-value": (HELLO + raw(6, 0, 1), "GOAWAY with"),
    "goaway-stream": (HELLO + raw(6, 1), "GOAWAY with"),
    "duplicate-goaway": (HELLO + raw(6) + raw(6), "duplicate GOAWAY"),
    "open-after-goaway": (HELLO + raw(6) + raw(1, 1), "OPEN after GOAWAY"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("piece", [1, 5, 1 << 20])
def test_hostile_frames(case: str, piece: int) -> None:
    wire, message = HOSTILE[case]
    decoder = SessionDecoder()
    with pytest.raises(RemoteProtocolError, match=message):
        for i in range(0, len(wire), piece):
            decoder.feed(wire[i : i + piece])
    # dead for good: the peer cannot be trusted to be in sync any more
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.feed(HELLO)
    assert "broken" in repr(decoder)


def test_a_bad_header_is_refused_before_its_payload_arrives() -> None:
    decoder = SessionDecoder()
    assert decoder.feed(HELLO) == [Hello(65536, 16)]
    with pytest.raises(RemoteProtocolError, match="oversize"):
        decoder.feed(raw(2, 1, 1 << 30))  # no payload needed to refuse it


def test_truncated_stream() -> None:
    decoder = SessionDecoder()
    decoder.feed(HELLO + raw(2, 1, 10, b"abc"))
    assert decoder.buffered == 15
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        decoder.end_of_stream()


@settings(max_examples=300, **STABLE)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=8), st.booleans())
def test_garbage_raises_only_remote_protocol_error(
    garbage: bytes, cuts: list[int], hello_first: bool
) -> None:
    decoder = SessionDecoder()
    wire = (HELLO if hello_first else b"") + garbage
    try:
        for piece in cut(wire, cuts):
            for event in decoder.feed(piece):
                assert isinstance(event, Hello | Open | Data | Window | Eof | Reset | GoAway)
        decoder.end_of_stream()
    except RemoteProtocolError:
        pass
