"""The XenStore client and the async store access against a store that stops answering
(a fake xenstored in another process, on a unix socket; no Xen needed).

* ``close()`` from another thread wakes a request blocked on the silent store at once
  (before, it slept until its own timeout, and meanwhile the descriptor it polled could
  be closed and reused under it): what lets an abandoned async request end promptly.
* An async store call gives up at its deadline with XenStoreTimeout naming the
  operation, while the event loop keeps running other tasks.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio import ClosedResourceError

from gntipc import XenStoreTimeout, _astore
from gntipc.backends.xen._xenstore import XenStore

# Answers the client's first request (our domid), then reads requests and answers none;
# reports each one on stdout ("request <type>").  Ends when its stdin closes.
_SILENT_STORE = r"""
import os, socket, struct, sys, threading
HEADER = struct.Struct("=IIII")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(4)

def recv_exactly(conn, n):
    data = conn.recv(n, socket.MSG_WAITALL) if n else b""
    if len(data) < n:
        raise EOFError
    return data

def serve(conn):
    answered = False
    try:
        while True:
            t, r, x, n = HEADER.unpack(recv_exactly(conn, HEADER.size))
            payload = recv_exactly(conn, n)
            if not answered and payload == b"domid\0":
                answered = True
                conn.sendall(HEADER.pack(t, r, x, 1) + b"5")
                continue
            print(f"request {t}", flush=True)
    except (EOFError, OSError):
        pass

def accept():
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


class SilentStore:
    """The fake store's process and socket path."""

    def __init__(self, proc: subprocess.Popen[str], path: str) -> None:
        self.proc = proc
        self.path = path

    def next_line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()


@pytest.fixture
def silent_store(tmp_path: Path) -> Iterator[SilentStore]:
    path = str(tmp_path / "xs")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SILENT_STORE, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        store = SilentStore(proc, path)
        assert store.next_line() == "ready"
        yield store
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_close_wakes_a_request_blocked_in_another_thread(silent_store: SilentStore) -> None:
    store = XenStore(path=silent_store.path, timeout=120)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            store.read("data/x")
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert silent_store.next_line() == "request 2"  # XS_READ sent, no answer coming
        store.close()
        reader.join(30)  # the request's own timeout is 120 s
        assert not reader.is_alive()
    finally:
        store.close()
        reader.join()
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedResourceError), outcome
    assert "closed during read" in str(outcome[0])


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_an_async_store_call_times_out_while_the_loop_runs(
    silent_store: SilentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_astore, "STORE_TIMEOUT", 0.5)
    store = XenStore(path=silent_store.path, timeout=120)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            with pytest.raises(XenStoreTimeout, match=r"reading data/x: .* within 0\.5 s"):
                await _astore.run(store.read, "data/x", what="reading data/x")
            tg.cancel_scope.cancel()
        assert ticks > 0  # the loop ran while the request waited
    finally:
        store.close()  # wakes the abandoned request
    assert await anyio.to_thread.run_sync(_astore.wait_background, 30)
