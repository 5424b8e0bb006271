"""The XenStore client against a misbehaving xenstored (a fake one on a unix socket, no
Xen needed): floods of foreign replies and watch events, a store that stops reading."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from anyio import ClosedResourceError

from gntipc._exceptions import RemoteProtocolError, XenStoreTimeout
from gntipc.backends.xen import _xenstore
from gntipc.backends.xen._xenstore import MAX_QUEUED_EVENTS, XenStore
from gntipc.backends.xen._xenstore_codec import HEADER, Message, MsgType, encode_message

#: How long a flood lasts at most: a client that does not give up fails instead of hanging.
FLOOD_SECONDS = 6.0

Handler = Callable[[socket.socket, Message], bool]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError
        out += data
    return out


def _recv_message(sock: socket.socket) -> Message:
    t, r, x, n = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    return Message(t, r, x, _recv_exactly(sock, n))


def _reply(sock: socket.socket, request: Message, payload: bytes) -> None:
    sock.sendall(encode_message(request.type, request.req_id, request.tx_id, payload))


def _event(path: str) -> bytes:
    return encode_message(MsgType.WATCH_EVENT, 0, 0, path.encode() + b"\0tok\0")


def _flood(sock: socket.socket, burst: bytes) -> None:
    """Send ``burst`` again and again for FLOOD_SECONDS, or until the client hangs up."""
    end = time.monotonic() + FLOOD_SECONDS
    while time.monotonic() < end:
        sock.sendall(burst)


class FakeXenstored:
    """A unix socket at ``path``; each connection is served in a thread: ``domid`` reads
    are answered (``5``), every other request goes to ``handler``, which returns False
    to stop serving that connection."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    msg = _recv_message(conn)
                    if msg.type == MsgType.READ and msg.payload == b"domid\0":
                        _reply(conn, msg, b"5")
                    elif not self.handler(conn, msg):
                        return
            except (EOFError, BrokenPipeError, ConnectionResetError):
                pass  # the client hung up
            except BaseException as exc:  # pragma: no cover - a bug in the test
                self.errors.append(exc)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepter.join(5)
        for thread in self.threads:
            thread.join(FLOOD_SECONDS + 5)
        assert not self.errors


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Handler], str]]:
    """``fake(handler)`` starts a fake xenstored and returns its socket path."""
    started: list[FakeXenstored] = []

    def start(handler: Handler) -> str:
        store = FakeXenstored(str(tmp_path / f"socket{len(started)}"), handler)
        started.append(store)
        return store.path

    yield start
    for store in started:
        store.close()


def test_request_times_out_while_the_store_keeps_talking(
    fake: Callable[[Handler], str],
) -> None:
    # Replies to other requests and watch events, without a pause: the client used to
    # read them for as long as they came, far past its deadline.
    def handler(sock: socket.socket, msg: Message) -> bool:
        other = encode_message(msg.type, msg.req_id + 1000, 0, b"not yours")
        _flood(sock, (other + _event("/flood")) * 2000)
        return False

    with XenStore(path=fake(handler), timeout=0.3) as store:
        assert store.domid == 5
        start = time.monotonic()
        with pytest.raises(XenStoreTimeout, match=r"no reply within 0\.3 s"):
            store.read("/local/domain/5/x")
        assert time.monotonic() - start < 1.5
        assert len(store._c().events) <= MAX_QUEUED_EVENTS


def test_watch_events_on_the_request_connection_are_bounded(
    fake: Callable[[Handler], str],
) -> None:
    def handler(sock: socket.socket, msg: Message) -> bool:
        sock.sendall(b"".join(_event(f"/e/{i}") for i in range(5 * MAX_QUEUED_EVENTS)))
        _reply(sock, msg, b"value")
        return True

    with XenStore(path=fake(handler), timeout=10) as store:
        assert store.read("/local/domain/5/x") == b"value"
        events = store._c().events
        assert len(events) == MAX_QUEUED_EVENTS
        assert events[-1] == (f"/e/{5 * MAX_QUEUED_EVENTS - 1}", "tok")  # the newest kept


def test_read_events_returns_while_the_store_floods_the_watch(
    fake: Callable[[Handler], str],
) -> None:
    def handler(sock: socket.socket, msg: Message) -> bool:
        assert msg.type == MsgType.WATCH
        _reply(sock, msg, b"OK\0")
        _flood(sock, _event("/flood") * 2000)
        return False

    with XenStore(path=fake(handler), timeout=10) as store, store.watch("/flood", "t") as w:
        for _ in range(3):
            assert select.select([w.fileno()], [], [], 5)[0]
            start = time.monotonic()
            events = w.read_events()
            assert time.monotonic() - start < 1.5
            assert 0 < len(events) <= MAX_QUEUED_EVENTS
            assert events[0] == ("/flood", "tok")


class _OsWithFullSocket:
    """``os`` for the client module, whose socket accepts the first ``room`` bytes of a
    write and then no more (as when xenstored stops reading)."""

    def __init__(self, fd: int, room: int) -> None:
        self.fd = fd
        self.room = room

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: memoryview) -> int:
        if fd != self.fd:
            return os.write(fd, data)
        if not self.room:
            raise BlockingIOError
        n = os.write(fd, data[: self.room])
        self.room -= n
        return n


def test_timeout_in_the_middle_of_a_request_closes_the_connection(
    fake: Callable[[Handler], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def handler(sock: socket.socket, msg: Message) -> bool:
        _reply(sock, msg, b"OK\0")
        return True

    with XenStore(path=fake(handler), timeout=0.2) as store:
        conn = store._c()
        monkeypatch.setattr(_xenstore, "os", _OsWithFullSocket(conn.fd, room=0))
        # nothing written: the connection stays in sync and usable
        with pytest.raises(XenStoreTimeout):
            store.write("/local/domain/5/x", b"v")
        monkeypatch.setattr(_xenstore, "os", os)
        store.write("/local/domain/5/x", b"v")
        # cut off half-way: the store would read our next request as the rest of it
        monkeypatch.setattr(_xenstore, "os", _OsWithFullSocket(conn.fd, room=10))
        with pytest.raises(XenStoreTimeout):
            store.write("/local/domain/5/x", b"v" * 100)
        monkeypatch.setattr(_xenstore, "os", os)
        assert conn.fd == -1
        with pytest.raises(ClosedResourceError, match="cut off"):
            store.read("/local/domain/5/x")


def test_a_timed_out_reply_arriving_late_is_discarded(fake: Callable[[Handler], str]) -> None:
    def handler(sock: socket.socket, msg: Message) -> bool:
        if msg.payload.startswith(b"/slow\0"):
            time.sleep(0.5)
        _reply(sock, msg, msg.payload.split(b"\0")[0])
        return True

    with XenStore(path=fake(handler), timeout=0.2) as store:
        with pytest.raises(XenStoreTimeout):
            store.read("/slow")
        time.sleep(0.5)  # its reply is waiting in the socket now
        assert store.read("/fast") == b"/fast"


def test_event_channel_zero_is_a_protocol_error() -> None:
    # Port 0 is never a valid event channel: the client reports the server's keys as
    # invalid instead of failing (ValueError) when it binds.
    import anyio

    import gntipc

    async def main() -> None:
        with gntipc.get_backend("sim", domid=0) as backend:
            path = f"/local/domain/0/data/gntipc-test-evtchn0/{os.getpid()}"
            backend.store.write(f"{path}/ring-ref", b"8")
            backend.store.write(f"{path}/event-channel", b"0")
            try:
                with pytest.raises(RemoteProtocolError, match="event-channel"):
                    await gntipc.connect(0, path, timeout=5, backend=backend)
            finally:
                backend.store.rm(path)

    anyio.run(main)
