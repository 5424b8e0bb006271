"""The sans-I/O resume protocol: the wire format pinned, every split of the input,
duplicates, acks out of order, lying resume points and other hostile frames, restarted
receivers, and a state machine against a model (records sent both ways across random
breaks and restarts: none lost, duplicated or reordered)."""

from __future__ import annotations

import contextlib
import itertools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gntipc import LocalProtocolError, RemoteProtocolError
from gntipc.protocol import resume
from gntipc.protocol.resume import (
    Acked,
    Record,
    Refused,
    ResumeEvent,
    ResumeState,
    Welcome,
    decode_hello,
    encode_refuse,
)

# Deterministic (the same examples every run) and no per-example time limit.
STABLE: dict[str, bool | None] = {"deadline": None, "derandomize": True}

H = struct.Struct("<BBHIQ")
SID = bytes(range(16))
SECRET = bytes(range(100, 132))


def raw(t: int, seq: int = 0, payload: bytes = b"", flags: int = 0, length: int = -1) -> bytes:
    return H.pack(t, flags, 0, len(payload) if length < 0 else length, seq) + payload


def handshake(epoch: int, records: int, nbytes: int, secret: bytes = SECRET) -> bytes:
    return b"GRSM" + struct.pack("<HHIII", 1, 0, epoch, records, nbytes) + SID + secret


def hello_bytes(
    seq: int = 0, flags: int = resume.FLAG_NEW, secret: bytes = SECRET, sid: bytes = SID
) -> bytes:
    payload = b"GRSM" + struct.pack("<HHIII", 1, 0, 0, 16, 65536) + sid + secret
    return raw(0, seq, payload, flags)


def welcome_bytes(epoch: int, seq: int = 0, records: int = 16) -> bytes:
    return raw(1, seq, handshake(epoch, records, 65536, bytes(32)))


def ack_bytes(seq: int, epoch: int) -> bytes:
    return raw(3, seq, struct.pack("<I", epoch))


def new_client(records: int = 16, nbytes: int = 65536) -> ResumeState:
    return ResumeState.client(
        window_records=records, window_bytes=nbytes, session_id=SID, secret=SECRET
    )


def start(client: ResumeState, **kw: int) -> ResumeState:
    """Connect ``client`` (new session or resume) to a new server state; return it."""
    client.connect()
    decoded = decode_hello(client.data_to_send())
    assert decoded is not None
    hello, rest = decoded
    assert rest == b""
    server = ResumeState.server(hello, **kw)
    events = client.receive_data(server.data_to_send())
    assert events == [Welcome(0, 0)]
    return server


def reconnect(client: ResumeState, server: ResumeState) -> list[ResumeEvent]:
    """Break the connection and resume it: the client's events from the WELCOME+replay."""
    client.connection_lost()
    server.connection_lost()
    client.connect()
    decoded = decode_hello(client.data_to_send())
    assert decoded is not None
    server.accept(decoded[0])
    return list(client.receive_data(server.data_to_send()))


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- the wire format --------------------------------------------------------------------


def test_wire_format_is_pinned() -> None:
    assert resume.HEADER_SIZE == 16
    assert resume.HANDSHAKE_SIZE == 68
    client = new_client()
    client.connect()
    hello = client.data_to_send()
    assert hello == hello_bytes()
    assert hello[:16].hex() == "0001000044000000" + "00" * 8
    server = ResumeState.server(decode_hello(hello)[0], window_records=8, window_bytes=8192)  # type: ignore[index]
    welcome = server.data_to_send()
    assert welcome == raw(1, 0, handshake(0, 8, 8192, bytes(32)))
    client.receive_data(welcome)
    assert client.send_record(b"abc") == 1
    assert client.send_record(b"", eof=True) == 2
    assert client.data_to_send() == raw(2, 1, b"abc") + raw(2, 2, flags=resume.FLAG_EOF)
    events = server.receive_data(raw(2, 1, b"abc") + raw(2, 2, flags=resume.FLAG_EOF))
    assert events == [Record(1, b"abc", False), Record(2, b"", True)]
    server.commit(2)
    server.ack()
    assert (
        server.data_to_send()
        == ack_bytes(2, 0)
        == bytes.fromhex("0300000004000000020000000000000000000000")
    )
    assert encode_refuse("no") == raw(4, 0, b"no")
    assert encode_refuse("x" * 1000) == raw(4, 0, b"x" * resume.MAX_REASON)


def test_session_ids_and_secrets_are_random() -> None:
    a, b = ResumeState.client(), ResumeState.client()
    assert len(a.session_id) == 16 and len(a.secret) == 32
    assert a.session_id != b.session_id and a.secret != b.secret


# -- splits, duplicates, acks -----------------------------------------------------------


def records_wire(n: int) -> tuple[ResumeState, ResumeState, bytes, list[bytes]]:
    client = new_client()
    server = start(client)
    payloads = [bytes([i]) * (i * 7 % 50) for i in range(n)]
    for p in payloads:
        client.send_record(p)
    return client, server, client.data_to_send(), payloads


def test_every_split_of_the_stream() -> None:
    _, _, wire, payloads = records_wire(6)
    for i, j in itertools.combinations(range(len(wire) + 1), 2):
        client = new_client()
        server = start(client)
        for p in payloads:
            client.send_record(p)
        assert client.data_to_send() == wire
        got = []
        for piece in (wire[:i], wire[i:j], wire[j:]):
            got += [e.data for e in server.receive_data(piece) if isinstance(e, Record)]
        assert got == payloads, (i, j)


def test_one_byte_at_a_time_including_the_handshake() -> None:
    client = new_client()
    client.connect()
    hello = client.data_to_send()
    for k in range(len(hello)):
        assert decode_hello(hello[:k]) is None
    decoded = decode_hello(hello + b"tail")
    assert decoded is not None and decoded[1] == b"tail"
    server = ResumeState.server(decoded[0])
    welcome = server.data_to_send()
    client.send_record(b"queued before the WELCOME")
    events: list[ResumeEvent] = []
    for k in range(len(welcome)):
        events += client.receive_data(welcome[k : k + 1])
    assert events == [Welcome(0, 0)]
    wire = client.data_to_send()
    got: list[ResumeEvent] = []
    for k in range(len(wire)):
        got += server.receive_data(wire[k : k + 1])
    assert got == [Record(1, b"queued before the WELCOME", False)]


def test_duplicates_are_dropped() -> None:
    _client, server, wire, payloads = records_wire(3)
    assert len(server.receive_data(wire)) == 3
    assert server.receive_data(wire) == []  # every record again: all dropped
    first = raw(2, 1, payloads[0])
    assert server.receive_data(first) == []
    assert server.received == 3


def test_a_gap_is_refused() -> None:
    _, server, _, _ = records_wire(0)
    with pytest.raises(RemoteProtocolError, match="missing"):
        server.receive_data(raw(2, 2, b"x"))
    with pytest.raises(RemoteProtocolError, match="missing"):
        server.receive_data(b"")  # dead for good


def test_acks_release_the_window_and_may_come_out_of_order() -> None:
    client = new_client(records=4, nbytes=4096)
    server = start(client)
    for i in range(4):
        client.send_record(bytes([i]))
    assert not client.can_send(0)
    with pytest.raises(LocalProtocolError, match="window is full"):
        client.send_record(b"x")
    server.receive_data(client.data_to_send())
    assert client.receive_data(ack_bytes(3, 0)) == [Acked(3)]
    assert client.retained == (1, 1)
    assert client.receive_data(ack_bytes(1, 0)) == []  # an older ack: nothing new
    assert client.receive_data(ack_bytes(3, 0)) == []
    assert client.can_send(1)
    assert client.receive_data(ack_bytes(4, 0)) == [Acked(4)]
    assert client.retained == (0, 0)


def test_window_bytes_and_record_size() -> None:
    client = new_client(records=100, nbytes=4096)
    start(client)
    assert client.max_record == 1024
    with pytest.raises(LocalProtocolError, match="at most 1024"):
        client.send_record(bytes(1025))
    for _ in range(4):
        client.send_record(bytes(1024))
    assert not client.can_send(1)
    assert client.can_send(0)


def test_ack_due_after_a_quarter_of_the_peer_window() -> None:
    client = new_client()
    server = start(client, window_records=8)  # the server announced 8 records
    for i in range(3):
        server.send_record(bytes([i]))
    for event in client.receive_data(server.data_to_send()):
        assert isinstance(event, Record)
        client.commit(event.seq)
        assert client.ack_due() == (event.seq >= 2)
    client.ack()
    assert client.data_to_send() == ack_bytes(3, 0)
    assert not client.ack_due()
    client.ack()  # nothing new
    assert client.data_to_send() == b""


def test_ping_repeats_the_cumulative_ack_and_is_ignored() -> None:
    client, server, wire, _ = records_wire(2)
    server.receive_data(wire)
    server.ping()
    assert server.data_to_send() == ack_bytes(0, 0)
    server.commit(2)
    server.ack()
    server.ping()
    assert server.data_to_send() == ack_bytes(2, 0) * 2
    assert client.receive_data(ack_bytes(2, 0) * 2) == [Acked(2)]
    assert client.receive_data(ack_bytes(0, 0)) == []


def test_ack_of_unsent_data_is_refused() -> None:
    client, _, _, _ = records_wire(2)
    with pytest.raises(RemoteProtocolError, match="beyond the last sent"):
        client.receive_data(ack_bytes(3, 0))


def test_ack_from_an_old_epoch_is_refused() -> None:
    client, server, _wire, _ = records_wire(2)
    assert reconnect(client, server)[0] == Welcome(1, 0)
    with pytest.raises(RemoteProtocolError, match="epoch 0 in epoch 1"):
        client.receive_data(ack_bytes(1, 0))


def test_commit_beyond_received_is_caller_misuse() -> None:
    _, server, _, _ = records_wire(0)
    with pytest.raises(LocalProtocolError):
        server.commit(1)


# -- resuming ---------------------------------------------------------------------------


def test_resume_replays_what_the_peer_did_not_commit() -> None:
    client, server, wire, payloads = records_wire(5)
    events = server.receive_data(wire[: len(wire) // 2])
    got = [e.data for e in events if isinstance(e, Record)]
    server.commit(len(got))
    for i in range(3):
        server.send_record(b"s%d" % i)
    server.data_to_send()  # lost with the connection
    events = reconnect(client, server)
    assert events == [
        Welcome(1, len(got)),
        *(Record(i + 1, b"s%d" % i, False) for i in range(3)),
    ]
    got += [e.data for e in server.receive_data(client.data_to_send()) if isinstance(e, Record)]
    assert got == payloads
    n = len(payloads) - server.committed  # the WELCOME released what the server committed
    assert client.retained == (n, sum(map(len, payloads[-n:])))


def test_replay_of_received_but_uncommitted_records_is_deduplicated() -> None:
    client, server, wire, payloads = records_wire(4)
    assert len(server.receive_data(wire)) == 4
    server.commit(1)  # the application holds record 1 only
    reconnect(client, server)
    replay = client.data_to_send()
    assert replay == b"".join(raw(2, i + 1, p) for i, p in enumerate(payloads) if i >= 1)
    assert server.receive_data(replay) == []  # records 2..4 again: dropped
    server.commit(4)
    server.ack()
    assert client.receive_data(server.data_to_send()) == [Acked(4)]


def test_many_breaks_before_the_welcome() -> None:
    client, server, _, _ = records_wire(1)
    for _ in range(3):
        client.connection_lost()
        client.connect()
        client.data_to_send()
    events = reconnect(client, server)
    assert events[0] == Welcome(1, 0)


def test_a_valid_resume_replaces_a_connection_the_server_thinks_is_up() -> None:
    client, server, _, _ = records_wire(2)
    client.connection_lost()  # only the client saw the break (a half-open TCP)
    client.connect()
    decoded = decode_hello(client.data_to_send())
    assert decoded is not None and server.connected
    server.accept(decoded[0])
    assert client.receive_data(server.data_to_send()) == [Welcome(1, 0)]


def test_lying_resume_point_in_hello_is_refused() -> None:
    client, server, _, _ = records_wire(0)
    server.send_record(b"x")
    server.connection_lost()
    hello = decode_hello(hello_bytes(seq=2, flags=0))
    assert hello is not None
    with pytest.raises(RemoteProtocolError, match="resume point 2 beyond the last record sent"):
        server.accept(hello[0])
    # The session survives a refused HELLO: the honest client resumes.
    assert reconnect(client, server)[:2] == [Welcome(1, 0), Record(1, b"x", False)]


def test_resume_point_below_what_was_acknowledged_is_refused() -> None:
    client, server, wire, _ = records_wire(3)
    server.receive_data(wire)
    server.commit(3)
    server.ack()
    client.receive_data(server.data_to_send())
    assert client.acked == 3
    client.connection_lost()
    client.connect()
    client.data_to_send()
    with pytest.raises(RemoteProtocolError, match="before what the peer acknowledged"):
        client.receive_data(welcome_bytes(epoch=1, seq=1))


def test_lying_resume_point_in_welcome_is_refused() -> None:
    client, _, _, _ = records_wire(2)
    client.connection_lost()
    client.connect()
    with pytest.raises(RemoteProtocolError, match="beyond the last record sent"):
        client.receive_data(welcome_bytes(epoch=1, seq=3))


def test_welcome_epoch_must_grow() -> None:
    client, _, _, _ = records_wire(0)
    client.connection_lost()
    client.connect()
    with pytest.raises(RemoteProtocolError, match="epoch 0, not above 0"):
        client.receive_data(welcome_bytes(epoch=0))


@pytest.mark.parametrize(
    ("hello", "error"),
    [
        (hello_bytes(flags=0, secret=bytes(32)), "wrong secret"),
        (hello_bytes(flags=0, sid=bytes(16)), "another session"),
    ],
)
def test_wrong_secret_or_session_is_refused(hello: bytes, error: str) -> None:
    _client, server, _, _ = records_wire(0)
    decoded = decode_hello(hello)
    assert decoded is not None
    with pytest.raises(RemoteProtocolError, match=error):
        server.accept(decoded[0])
    assert server.connected  # the current connection goes on


def test_server_refuses_a_resume_of_an_unknown_session() -> None:
    decoded = decode_hello(hello_bytes(flags=0))
    assert decoded is not None
    with pytest.raises(RemoteProtocolError, match="unknown to this server"):
        ResumeState.server(decoded[0])


def test_refuse_ends_the_handshake() -> None:
    client = new_client()
    client.connect()
    client.data_to_send()
    assert client.receive_data(encode_refuse("wrong secret") + b"junk") == [Refused("wrong secret")]
    assert not client.connected
    client.connect()  # may try again


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (raw(9), "unknown resume frame type 9"),
        (H.pack(2, 0, 1, 0, 1), "reserved"),
        (raw(2, 1, flags=0x8), "unknown flags"),
        (raw(3, 1, b"\0" * 4, flags=resume.FLAG_EOF), "unknown flags"),
        (raw(2, 1, b"x", flags=resume.FLAG_EOF), "DATA frame of 1 bytes"),
        (raw(2, 1, length=resume.MAX_RECORD + 1), "at most 65536"),
        (raw(3, 1, b"\0" * 8), "ACK frame of 8 bytes"),
        (raw(4, 0, length=resume.MAX_REASON + 1), "REFUSE frame of 257"),
        (raw(1, 0, length=2**32 - 1), "WELCOME frame of 4294967295"),
        (raw(2, 2**63), "above 2\\*\\*63"),
        (hello_bytes(flags=0), "HELLO after the handshake"),
        (welcome_bytes(1), "WELCOME out of the handshake"),
        (encode_refuse("x"), "REFUSE out of the handshake"),
    ],
)
def test_hostile_frames(data: bytes, error: str) -> None:
    client, _server, _, _ = records_wire(0)
    with pytest.raises(RemoteProtocolError, match=error):
        client.receive_data(data[:20])  # the header suffices for most
        client.receive_data(data[20:])
    with pytest.raises(RemoteProtocolError):
        client.send_record(b"")  # the state is dead


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (raw(2, 1, b"x"), "DATA frame before HELLO"),
        (hello_bytes()[:16] + b"XXXX" + hello_bytes()[20:], "magic"),
        (
            raw(0, 0, handshake(0, 16, 65536)[:4] + b"\2\0" + handshake(0, 16, 65536)[6:], 1),
            "version",
        ),
        (raw(0, 0, handshake(0, 0, 65536), 1), "window of 0 records"),
        (raw(0, 0, handshake(0, 16, 100), 1), "window of 100 bytes"),
        (raw(0, 0, handshake(7, 16, 65536), 1), "epoch field 7"),
        (hello_bytes(seq=5), "resume point 5"),
        (hello_bytes(flags=3), "both NEW and FROM_OLDEST"),
        (raw(0, 0, b"x" * 67, 1), "HELLO frame of 67 bytes"),
    ],
)
def test_hostile_hello(data: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        decode_hello(data)


def test_peer_beyond_its_announced_window_is_refused() -> None:
    client = new_client()
    start(client, window_records=2)  # the server announced 2 records
    with pytest.raises(RemoteProtocolError, match="beyond the window"):
        client.receive_data(b"".join(raw(2, i, b"x") for i in (1, 2, 3)))


def test_data_after_eof_is_refused() -> None:
    client = new_client()
    start(client)
    with pytest.raises(RemoteProtocolError, match="after the peer's EOF"):
        client.receive_data(raw(2, 1, flags=resume.FLAG_EOF) + raw(2, 2, b"x"))


def test_eof_and_finished() -> None:
    client = new_client()
    server = start(client)
    client.send_record(b"", eof=True)
    server.send_record(b"", eof=True)
    with pytest.raises(LocalProtocolError, match="after our EOF"):
        client.send_record(b"x")
    assert [e for e in server.receive_data(client.data_to_send())] == [Record(1, b"", True)]
    assert [e for e in client.receive_data(server.data_to_send())] == [Record(1, b"", True)]
    for a, b in ((client, server), (server, client)):
        a.commit(1)
        a.ack()
        b.receive_data(a.data_to_send())
    assert client.finished and server.finished


def test_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        ResumeState(is_client=True, session_id=b"x", secret=SECRET)
    with pytest.raises(LocalProtocolError):
        new_client(records=0)
    with pytest.raises(LocalProtocolError):
        new_client(nbytes=1 << 31)
    client = new_client()
    start(client)
    with pytest.raises(LocalProtocolError, match="connection is up"):
        client.connect()
    with pytest.raises(LocalProtocolError, match="without a connection"):
        new_client().receive_data(b"")


# -- restarted receivers ----------------------------------------------------------------


def restart_scenario(position: int | None) -> tuple[list[bytes], list[bytes]]:
    """The server sends 6 records; the client process commits (persists) 2 of the 4 it
    received, then dies and restarts from ``position``: what the restarted client gets,
    and what the server gets from it."""
    client = new_client()
    server = start(client)
    for i in range(6):
        server.send_record(b"m%d" % i)
    wire = server.data_to_send()
    events = client.receive_data(wire[: len(wire) * 4 // 6])
    assert len(events) == 4
    client.commit(2)
    client.ack()
    server.receive_data(client.data_to_send())
    client.send_record(b"lost with the process")
    assert server.acked == 2
    # The client process dies: the server sees the connection break.
    server.connection_lost()
    new = ResumeState.restarted(SID, SECRET, position)
    new.send_record(b"after restart")
    new.connect()
    decoded = decode_hello(new.data_to_send())
    assert decoded is not None
    server.accept(decoded[0])
    got = [e.data for e in new.receive_data(server.data_to_send()) if isinstance(e, Record)]
    sent = [e.data for e in server.receive_data(new.data_to_send()) if isinstance(e, Record)]
    return got, sent


def test_restarted_receiver_with_its_position_gets_exactly_the_rest() -> None:
    got, sent = restart_scenario(2)
    assert got == [b"m2", b"m3", b"m4", b"m5"]
    assert sent == [b"after restart"]


def test_restarted_receiver_without_position_gets_every_unacked_record() -> None:
    got, _ = restart_scenario(None)
    assert got == [b"m2", b"m3", b"m4", b"m5"]


def test_restarted_receiver_claiming_less_than_it_acked_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="before what the peer acknowledged"):
        restart_scenario(1)


# -- a state machine against a model ----------------------------------------------------


@dataclass
class Side:
    state: ResumeState | None
    sent: list[bytes] = field(default_factory=list)  # what the model says it sent
    got: list[bytes] = field(default_factory=list)  # what it delivered


class ResumeMachine(RuleBasedStateMachine):
    """A client and a server exchange records over a link that breaks at random points
    (the bytes in flight are lost; either side may not notice before the resume), and
    whose client process may restart from its persisted (committed) position.  The
    server commits what it receives; the client commits at random times.  Each side's
    deliveries are always a prefix of what the other sent, and everything arrives once
    the link settles."""

    def __init__(self) -> None:
        super().__init__()
        self.client = Side(new_client(records=6, nbytes=4096))
        self.server = Side(None)
        self.c2s = bytearray()
        self.s2c = bytearray()
        self.hello_buf: bytes | None = b""  # bytes of the HELLO the server awaits
        self.counter = itertools.count()
        self.connect()

    def connect(self) -> None:
        assert self.client.state is not None
        self.client.state.connect()
        self.c2s.clear()
        self.s2c.clear()
        self.hello_buf = b""

    def on_events(self, side: Side, events: list[ResumeEvent]) -> None:
        for event in events:
            if isinstance(event, Record):
                side.got.append(event.data)
            assert not isinstance(event, Refused)
        if side is self.server and side.state is not None and side.state.received:
            side.state.commit(side.state.received)
        if side.state is not None and side.state.ack_due():
            side.state.ack()

    @rule(
        side=st.sampled_from(["client", "server"]),
        sizes=st.lists(st.integers(0, 1024), min_size=1, max_size=6),
    )
    def send(self, side: str, sizes: list[int]) -> None:
        s = getattr(self, side)
        for size in sizes:
            if s.state is None or not s.state.can_send(size):
                return
            # Unique payloads (a lost or repeated record is always visible).
            data = (b"%s%d." % (side[0].encode(), next(self.counter))).ljust(size, b"-")
            s.state.send_record(data)
            s.sent.append(data)

    @rule(n=st.integers(1, 3000))
    def to_server(self, n: int) -> None:
        assert self.client.state is not None
        self.c2s += self.client.state.data_to_send(max_bytes=n)
        chunk = bytes(self.c2s[:n])
        del self.c2s[:n]
        if self.hello_buf is not None:
            decoded = decode_hello(self.hello_buf + chunk)
            if decoded is None:
                self.hello_buf += chunk
                return
            hello, chunk = decoded
            self.hello_buf = None
            if self.server.state is None:
                self.server.state = ResumeState.server(hello, window_records=5, window_bytes=8192)
            else:
                self.server.state.accept(hello)
        assert self.server.state is not None
        self.on_events(self.server, list(self.server.state.receive_data(chunk)))

    @precondition(lambda self: self.hello_buf is None)
    @rule(n=st.integers(1, 3000))
    def to_client(self, n: int) -> None:
        assert self.server.state is not None and self.client.state is not None
        self.s2c += self.server.state.data_to_send(max_bytes=n)
        chunk = bytes(self.s2c[:n])
        del self.s2c[:n]
        self.on_events(self.client, list(self.client.state.receive_data(chunk)))

    @rule()
    def client_commits(self) -> None:
        state = self.client.state
        assert state is not None
        if state.received:
            state.commit(state.received)
            if state.ack_due():
                state.ack()

    @rule(server_notices=st.booleans(), dice=st.integers(0, 2))
    def break_link(self, server_notices: bool, dice: int) -> None:
        if dice:
            return  # (breaks a third as often as other rules run: records get through)
        assert self.client.state is not None
        self.client.state.connection_lost()
        if server_notices and self.server.state is not None:
            self.server.state.connection_lost()
        self.connect()

    @precondition(lambda self: self.server.state is not None)
    @rule(dice=st.integers(0, 2))
    def restart_client(self, dice: int) -> None:
        """The client process dies and restarts from what it committed (persisted)."""
        if dice:
            return
        old, server = self.client.state, self.server.state
        assert old is not None and server is not None
        position = old.committed
        del self.client.got[position:]
        # What the dead process queued and the server did not receive is lost with it.
        del self.client.sent[server.received or 0 :]
        new = ResumeState.restarted(
            old.session_id, old.secret, position, window_records=6, window_bytes=4096
        )
        self.client.state = new
        server.connection_lost()
        self.connect()

    @invariant()
    def byte_accounting_is_consistent(self) -> None:
        for side in (self.client.state, self.server.state):
            if side is not None:
                unacked = side._unacked
                assert side._unacked_bytes == sum(size for _, size in unacked)
                committed = sum(size for seq, size in unacked if seq <= side.committed)
                assert side._committed_bytes == committed

    @invariant()
    def nothing_lost_duplicated_or_reordered(self) -> None:
        for a, b in ((self.client, self.server), (self.server, self.client)):
            assert b.got == a.sent[: len(b.got)]

    def teardown(self) -> None:
        """Settle: the link stays up until every record was delivered."""
        for _ in range(200):
            self.to_server(100_000)
            if self.hello_buf is None:
                self.to_client(100_000)
                self.client_commits()
                assert self.client.state is not None and self.server.state is not None
                for side in (self.client.state, self.server.state):
                    side.ack()
            if (
                self.server.got == self.client.sent
                and self.client.got == self.server.sent
                and not self.c2s
                and not self.s2c
            ):
                break
        assert self.server.got == self.client.sent
        assert self.client.got == self.server.sent


ResumeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, **STABLE)
TestResumeMachine = ResumeMachine.TestCase


@settings(max_examples=100, **STABLE)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    client, _, _, _ = records_wire(0)
    with contextlib.suppress(RemoteProtocolError):
        client.receive_data(data)
    with contextlib.suppress(RemoteProtocolError):
        decode_hello(data)
