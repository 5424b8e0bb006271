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
    SessionState,
    StreamState,
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


# -- SessionState: the session's state, sans-I/O ------------------------------------------


def events_of(state: SessionState, data: bytes) -> list[MuxEvent]:
    return list(state.receive_data(data))


def peers(window: int = 4096, max_streams: int = 4) -> tuple[SessionState, SessionState]:
    """An initiator and a responder that received each other's HELLO."""
    a = SessionState(is_initiator=True, window=window, max_streams=max_streams)
    b = SessionState(is_initiator=False, window=window, max_streams=max_streams)
    assert events_of(a, b.hello()) == [Hello(window, max_streams)]
    assert events_of(b, a.hello()) == [Hello(window, max_streams)]
    return a, b


def opened(window: int = 4096) -> tuple[SessionState, SessionState, StreamState, StreamState]:
    """Peers with stream 1 open: its state on the initiator's side and on the responder's."""
    a, b = peers(window)
    mine, frame = a.open_stream()
    assert events_of(b, frame) == [Open(1)]
    theirs = b.get(1)
    assert theirs is not None
    return a, b, mine, theirs


def test_state_arguments_are_checked() -> None:
    with pytest.raises(LocalProtocolError, match="window"):
        SessionState(is_initiator=True, window=mux.MIN_WINDOW - 1)
    with pytest.raises(LocalProtocolError, match="max_streams"):
        SessionState(is_initiator=True, max_streams=0)
    state = SessionState(is_initiator=False, window=65536, max_streams=16)
    assert state.hello() == HELLO
    assert "responder" in repr(state)


def test_state_hello_then_open_with_ids_of_each_side() -> None:
    a = SessionState(is_initiator=True, window=4096, max_streams=2)
    b = SessionState(is_initiator=False, window=8192, max_streams=3)
    assert not a.peer_hello and not a.can_open
    with pytest.raises(LocalProtocolError, match="accepts no stream"):
        a.open_stream()  # before the peer's HELLO
    events_of(a, b.hello())
    events_of(b, a.hello())
    assert (a.peer_hello, a.peer_window, a.peer_max_streams) == (True, 8192, 3)
    assert (b.peer_window, b.peer_max_streams) == (4096, 2)
    ids = []
    for side in (a, a, a, b, b):
        state, frame = side.open_stream()
        assert frame == mux.encode_frame(FrameType.OPEN, state.stream_id)
        ids.append(state.stream_id)
    assert ids == [1, 3, 5, 2, 4]  # the initiator's odd, the responder's even, rising
    assert a.ours_open == 3 and not a.can_open  # the peer accepts 3
    with pytest.raises(LocalProtocolError, match="accepts no stream"):
        a.open_stream()
    assert b.ours_open == 2 and not b.can_open
    mine = a.get(1)
    assert mine is not None
    assert (mine.send_credit, mine.recv_credit) == (8192, 4096)  # the peer's, ours
    assert len(a) == 3 and a.get(7) is None


def test_state_peer_open_is_checked() -> None:
    b = peers(max_streams=2)[1]
    with pytest.raises(RemoteProtocolError, match="parity"):
        events_of(SessionState(is_initiator=False), HELLO + raw(1, 2))
    assert events_of(b, raw(1, 3)) == [Open(3)]
    assert b.theirs_open == 1
    with pytest.raises(RemoteProtocolError, match="not above 3"):
        events_of(b, raw(1, 1))
    _, b = peers(max_streams=2)
    events_of(b, raw(1, 1) + raw(1, 3))
    with pytest.raises(RemoteProtocolError, match="more than 2 streams"):
        events_of(b, raw(1, 5))


def test_state_data_takes_credit_each_way() -> None:
    a, b, mine, theirs = opened(window=4096)
    frames = mine.send_data(b"x" * 1000)
    assert frames == mux.encode_data(1, b"x" * 1000)
    assert mine.send_credit == 3096
    assert events_of(b, frames) == [Data(1, b"x" * 1000)]
    assert theirs.recv_credit == 3096
    with pytest.raises(LocalProtocolError, match="credit"):
        mine.send_data(bytes(3097))  # more than the credit: nothing taken
    mine.refund(1000)  # not written after all
    assert mine.send_credit == 4096
    # the receiver grants credit back once a quarter of its window was consumed
    assert mux.GRANT_DIVISOR == 4
    assert theirs.consume(1000) is None
    assert theirs.consume(23) is None
    grant = theirs.consume(1)
    assert grant == mux.encode_frame(FrameType.WINDOW, 1, 1024)
    assert theirs.recv_credit == 3096 + 1024
    assert theirs.consume(1000) is None  # counted from the grant on
    assert theirs.consume(24) == mux.encode_frame(FrameType.WINDOW, 1, 1024)
    mine.send_data(bytes(2048))  # in flight
    assert events_of(a, grant) == [Window(1, 1024)]
    assert mine.send_credit == 3072


def test_state_credit_overflow_and_flow_control() -> None:
    for increment in (1, 0xFFFFFFFF):  # credit would exceed the peer's window
        a = opened(window=4096)[0]
        message = f"credit overflow on stream 1: 4096 \\+ {increment}"
        with pytest.raises(RemoteProtocolError, match=message):
            events_of(a, raw(3, 1, increment))
    b = opened(window=4096)[1]
    events_of(b, raw(2, 1, 4096, b"y" * 4096))  # exactly the window: fine
    with pytest.raises(RemoteProtocolError, match="flow control violated on stream 1"):
        events_of(b, raw(2, 1, 1, b"z"))


def test_state_frame_for_an_unknown_stream() -> None:
    _, b = peers()
    for wire, name in [
        (raw(2, 3, 2, b"hi"), "DATA"),
        (raw(3, 7, 100), "WINDOW"),
        (raw(4, 9), "EOF"),
        (raw(5, 11), "RESET"),
    ]:
        _, b = peers()
        with pytest.raises(RemoteProtocolError, match=f"{name} frame for unknown stream id"):
            events_of(b, wire)


def test_state_eof_each_way() -> None:
    _, b, mine, theirs = opened()
    eof = mine.send_eof()
    assert eof == mux.encode_frame(FrameType.EOF, 1)
    assert mine.send_eof() is None  # once
    with pytest.raises(LocalProtocolError, match="after our EOF"):
        mine.send_data(b"x")
    assert events_of(b, eof) == [Eof(1)]
    assert theirs.remote_eof
    assert theirs.consume(4096) is None  # no credit for a stream that sends no more
    with pytest.raises(RemoteProtocolError, match="DATA on stream 1 after its EOF"):
        events_of(b, raw(2, 1, 1, b"x"))
    b = opened()[1]
    events_of(b, raw(4, 1))
    with pytest.raises(RemoteProtocolError, match="duplicate EOF on stream 1"):
        events_of(b, raw(4, 1))


def test_state_reset_frees_the_id_once_it_went_both_ways() -> None:
    a, b, mine, theirs = opened()
    reset = a.reset(mine)
    assert reset == mux.encode_frame(FrameType.RESET, 1)
    assert mine.reset_sent and not mine.freed and a.ours_open == 1
    # DATA in flight towards a stream we reset is still accounted for, then discarded
    assert events_of(a, theirs.send_data(b"late")) == [Data(1, b"late")]
    assert events_of(b, reset) == [Reset(1)]
    assert theirs.remote_reset and not theirs.freed
    assert theirs.send_eof() is None  # the peer reads nothing more: no EOF
    events_of(a, b.reset(theirs))  # the answer: both sides forget the id
    assert theirs.freed and b.theirs_open == 0 and b.get(1) is None
    assert mine.freed and a.ours_open == 0 and a.get(1) is None
    with pytest.raises(RemoteProtocolError, match="DATA frame for unknown stream id 1"):
        events_of(a, raw(2, 1, 1, b"x"))


def test_state_frame_after_the_peer_reset() -> None:
    _, b, _, theirs = opened()
    events_of(b, raw(5, 1))
    assert theirs.remote_reset
    with pytest.raises(RemoteProtocolError, match="EOF frame on stream 1 after its RESET"):
        events_of(b, raw(4, 1))
    # our RESET after the peer's frees the id at once
    _, b, _, theirs = opened()
    events_of(b, raw(5, 1))
    b.reset(theirs)
    assert theirs.freed and b.get(1) is None


def test_state_release_when_the_session_is_down() -> None:
    a, _, mine, _ = opened()
    a.release(mine)
    a.release(mine)  # idempotent
    assert mine.freed and a.ours_open == 0 and len(a) == 0


def test_state_goaway_each_way() -> None:
    a, b, mine, _ = opened()
    goaway = a.goaway()
    assert goaway == mux.encode_frame(FrameType.GOAWAY)
    with pytest.raises(LocalProtocolError, match="after our GOAWAY"):
        a.open_stream()
    assert events_of(b, goaway) == [GoAway()]
    assert b.peer_goaway and not b.can_open
    # the streams open before it drain: their DATA still counts
    assert events_of(b, mine.send_data(b"tail")) == [Data(1, b"tail")]
    with pytest.raises(RemoteProtocolError, match="OPEN after GOAWAY"):
        events_of(b, raw(1, 3))


def test_state_hello_twice() -> None:
    _, b = peers()
    with pytest.raises(RemoteProtocolError, match="duplicate HELLO"):
        events_of(b, HELLO)


def test_state_events_before_a_bad_frame_are_yielded_and_the_state_stays_broken() -> None:
    _, b = peers()
    got: list[MuxEvent] = []
    with pytest.raises(RemoteProtocolError, match="unknown stream id 3"):
        for event in b.receive_data(raw(1, 1) + raw(2, 1, 2, b"ok") + raw(2, 3, 2, b"no")):
            got.append(event)
    assert got == [Open(1), Data(1, b"ok")]
    with pytest.raises(RemoteProtocolError, match="unknown stream id 3"):
        events_of(b, raw(4, 1))  # dead for good
    state = SessionState(is_initiator=True)
    state_events = events_of(state, HELLO + raw(2, 1, 10, b"abc"))
    assert state_events == [Hello(65536, 16)]
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        state.end_of_stream()


ops = st.lists(
    st.tuples(
        st.sampled_from(["open", "send", "consume", "eof", "close"]),
        st.booleans(),  # which side acts
        st.integers(min_value=0, max_value=7),  # which of its streams
        st.integers(min_value=1, max_value=5000),  # how many bytes
    ),
    max_size=60,
)


@settings(max_examples=200, **STABLE)
@given(ops)
def test_state_two_well_behaved_peers_stay_in_step(
    script: list[tuple[str, bool, int, int]],
) -> None:
    """Two SessionStates driven as two sessions would, every frame delivered at once: no
    protocol error, and each stream's credit agrees on both sides."""
    sides = peers(window=4096, max_streams=3)
    unread: dict[tuple[int, int], int] = {}  # (side, id) -> received, not consumed yet
    ids: list[int] = []  # every id opened
    for op, which, index, amount in script:
        me, peer = sides[which], sides[not which]

        def deliver(frames: bytes | None, peer: SessionState = peer) -> list[MuxEvent]:
            return [] if frames is None else list(peer.receive_data(frames))

        if op == "open":
            if me.can_open:
                state, frame = me.open_stream()
                assert deliver(frame) == [Open(state.stream_id)]
                ids.append(state.stream_id)
            continue
        live = [s for sid in ids if (s := me.get(sid)) is not None and not s.reset_sent]
        if not live:
            continue
        stream = live[index % len(live)]
        sid = stream.stream_id
        if op == "send" and not stream.eof_sent and not stream.remote_reset:
            n = min(amount, stream.send_credit)
            if n:
                deliver(stream.send_data(bytes(n)))
                key = (int(not which), sid)
                unread[key] = unread.get(key, 0) + n
        elif op == "consume":
            n = min(amount, unread.get((int(which), sid), 0))
            if n:
                unread[(int(which), sid)] -= n
                deliver(stream.consume(n))
        elif op == "eof":
            deliver(stream.send_eof())
        elif op == "close":
            deliver(stream.send_eof())
            deliver(me.reset(stream))
            unread.pop((int(which), sid), None)
        for sid in ids:
            mine, theirs = sides[0].get(sid), sides[1].get(sid)
            if mine is not None and theirs is not None:
                assert mine.send_credit == theirs.recv_credit
                assert theirs.send_credit == mine.recv_credit
                assert mine.send_credit <= 4096 and theirs.send_credit <= 4096
    for side in sides:
        odd = sum(1 for sid in ids if sid % 2 and side.get(sid) is not None)
        even = sum(1 for sid in ids if not sid % 2 and side.get(sid) is not None)
        assert (side.ours_open, side.theirs_open) == (
            (odd, even) if side.is_initiator else (even, odd)
        )
        assert len(side) == odd + even
