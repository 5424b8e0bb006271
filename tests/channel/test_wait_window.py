"""The wait protocol has no lost wake-up: a reader and a writer wait at the same time
(two threads on the sync API; two tasks in one event loop on the async API) while the
peer process delivers data, an EOF, a clean close or dies by SIGKILL exactly at each
point of the check -> prepare -> re-check -> wait window (the endpoint's test hook pauses
there until the peer has acted).  Spinning is off, so every wait takes that path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from gntipc import VchanStream
from gntipc.backends import Backend
from gntipc.channel import Vchan
from gntipc.protocol import VchanState

from .test_channel import fresh_path
from .test_crossproc import other_domid

PEER = str(Path(__file__).with_name("_window_peer.py"))
POINTS = ["checked", "prepared", "waiting"]
EVENTS = ["data", "eof", "close", "kill"]
RING = 1024
DEADLINE = 6.0


class WindowPeer:
    """A `_window_peer.py` client process."""

    def __init__(self, backend: Backend, domid: int, server: int, path: str) -> None:
        env = dict(os.environ, GNTIPC_BACKEND=backend.name, GNTIPC_SIM_DOMID=str(domid))
        src = str(Path(__file__).parents[2] / "src")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, PEER, str(server), path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def expect(self, word: str) -> None:
        line = self.stdout.readline()
        assert line.strip() == word, f"peer said {line!r}, expected {word!r}"

    def act(self, event: str) -> None:
        """Deliver ``event`` and return once it is done (the peer process is dead for
        ``kill``)."""
        if event == "kill":
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            return
        self.stdin.write(event + "\n")
        self.stdin.flush()
        self.expect("done")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.stdin.close()
        self.stdout.close()


@pytest.fixture
def window(backend: Backend) -> Iterator[tuple[Vchan, WindowPeer]]:
    path = fresh_path()
    peer_dom = other_domid(backend)
    srv = Vchan.server(backend, peer_dom, path, read_size=RING, write_size=RING)
    srv.spin = 0
    peer = WindowPeer(backend, peer_dom, backend.domid, path)
    try:
        peer.expect("ready")
        deadline = time.monotonic() + 30
        while srv.is_open() == VchanState.WAITING:
            assert time.monotonic() < deadline, "the peer never connected"
            srv.wait(1)
        # One exchange first: the peer's first write takes the WRITE request the client
        # sets at connection, so that no leftover request bit can hide a lost wake-up.
        peer.act("data")
        assert srv.read(4096, timeout=DEADLINE) == b"d" * 100
        # ...and consume the event of that write: no stale event may wake a waiter.
        srv.wait(0.5)
        srv.handle_events()
        yield srv, peer
    finally:
        srv.endpoint.window_hook = None
        srv.close()
        peer.stop()


def _install(srv: Vchan, peer: WindowPeer, point: str, direction: str, event: str) -> list[str]:
    fired: list[str] = []
    lock = threading.Lock()

    def hook(at: str, which: str) -> None:
        with lock:
            if fired or at != point or which != direction:
                return
            fired.append(at)
        peer.act(event)

    srv.endpoint.window_hook = hook
    return fired


def _expected(event: str) -> tuple[object, object]:
    """What the reader and the writer end with, for each event."""
    return {
        "data": (b"d" * 100, "all"),
        "eof": (EndOfStream, ClosedResourceError),  # the writer: woken by our close
        "close": (EndOfStream, BrokenResourceError),
        "kill": (BrokenResourceError, BrokenResourceError),
    }[event]


def _outcome(result: object) -> object:
    return type(result) if isinstance(result, BaseException) else result


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("direction", ["read", "write"])
def test_sync_reader_and_writer_threads(
    window: tuple[Vchan, WindowPeer], point: str, event: str, direction: str
) -> None:
    srv, peer = window
    results: dict[str, object] = {}
    blob = b"w" * (srv.write_size + 100)  # fills the ring, then waits for the peer

    def reader() -> None:
        try:
            results["read"] = srv.read(4096, timeout=DEADLINE)
        except BaseException as exc:
            results["read"] = exc

    def writer() -> None:
        try:
            srv.write_all(blob, timeout=DEADLINE)
            results["write"] = "all"
        except BaseException as exc:
            results["write"] = exc

    fired = _install(srv, peer, point, direction, event)
    threads = {"read": threading.Thread(target=reader), "write": threading.Thread(target=writer)}
    # The other side starts first and is already asleep when the hooked side reaches
    # the point where the peer acts.
    other = "write" if direction == "read" else "read"
    threads[other].start()
    time.sleep(0.2)
    start = time.monotonic()
    threads[direction].start()
    want_read, want_write = _expected(event)
    threads["read"].join(DEADLINE)
    assert fired == [point]
    assert not threads["read"].is_alive(), "lost wake-up: the reader is still blocked"
    assert time.monotonic() - start < DEADLINE / 2, "lost wake-up: woken by the timeout"
    assert _outcome(results["read"]) == want_read
    if event == "eof":
        srv.close()  # from this thread: the blocked writer must wake
    threads["write"].join(DEADLINE)
    assert not threads["write"].is_alive(), "lost wake-up: the writer is still blocked"
    assert time.monotonic() - start < DEADLINE / 2, "lost wake-up: woken by the timeout"
    assert _outcome(results["write"]) == want_write


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("direction", ["read", "write"])
async def test_async_reader_and_writer_tasks(
    window: tuple[Vchan, WindowPeer], point: str, event: str, direction: str
) -> None:
    srv, peer = window
    stream = VchanStream(srv)
    stream.spin = 0
    results: dict[str, object] = {}
    blob = b"w" * (srv.write_size + 100)

    async def reader() -> None:
        try:
            results["read"] = await stream.receive(4096)
        except BaseException as exc:
            results["read"] = exc

    async def writer() -> None:
        try:
            await stream.send(blob)
            results["write"] = "all"
        except BaseException as exc:
            results["write"] = exc

    fired = _install(srv, peer, point, direction, event)
    want_read, want_write = _expected(event)
    other = writer if direction == "read" else reader
    hooked = reader if direction == "read" else writer
    try:
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(other)
                await anyio.sleep(0.2)
                tg.start_soon(hooked)
                while "read" not in results:
                    await anyio.sleep(0.01)
                if event == "eof":
                    await stream.aclose()  # the blocked writer must wake
    finally:
        stream.close()
    assert fired == [point]
    assert _outcome(results["read"]) == want_read
    assert _outcome(results["write"]) == want_write


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("direction", ["read", "write"])
def test_sync_lone_waiter_sees_data_or_space(
    window: tuple[Vchan, WindowPeer], point: str, direction: str
) -> None:
    # Alone, no other waiter's request can produce a wake-up by chance.
    srv, peer = window
    fired = _install(srv, peer, point, direction, "data")
    start = time.monotonic()
    if direction == "read":
        assert srv.read(4096, timeout=DEADLINE) == b"d" * 100
    else:
        srv.write_all(b"w" * (srv.write_size + 100), timeout=DEADLINE)
    # Woken by the event, not by the timeout's last look at the ring.
    assert time.monotonic() - start < DEADLINE / 2, "lost wake-up"
    assert fired == [point]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("direction", ["read", "write"])
async def test_async_lone_waiter_sees_data_or_space(
    window: tuple[Vchan, WindowPeer], point: str, direction: str
) -> None:
    srv, peer = window
    stream = VchanStream(srv)
    stream.spin = 0
    fired = _install(srv, peer, point, direction, "data")
    try:
        with anyio.fail_after(DEADLINE):
            if direction == "read":
                assert await stream.receive(4096) == b"d" * 100
            else:
                await stream.send(b"w" * (srv.write_size + 100))
    finally:
        stream.close()
    assert fired == [point]
