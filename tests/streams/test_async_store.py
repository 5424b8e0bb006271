"""The async API never waits for the store on the event loop (issue 12, "async all the
way down"): with the sim store's database locked by another process, accept, connect and
aclose wait in worker threads while the loop goes on serving other work, and a store that
stays locked past the deadline makes them raise XenStoreTimeout instead of hanging.

The lock is real: a separate process holds sqlite's write lock on the runtime's state
database (as a busy or wedged peer would), and answers pings from the test over pipes, so
a blocked event loop shows as an unanswered ping.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator

import anyio
import pytest
from anyio import EndOfStream
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import fresh_path

import gntipc
from gntipc import _astore
from gntipc.backends import Backend

pytestmark = pytest.mark.anyio

# Holds the write lock of the database given as argv[1] until told to release it.
_HOLDER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
for line in sys.stdin:
    if line.strip() == "ping":
        print("pong", flush=True)
    elif line.strip() == "release":
        db.execute("COMMIT")
        print("released", flush=True)
        break
"""


class StoreLock:
    """The other process holding the store's lock."""

    def __init__(self, proc: Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._out = BufferedByteReceiveStream(proc.stdout)
        self.held = True

    async def ask(self, line: str) -> str:
        """Send ``line``, return the answer (at most 10 s: ample for a live loop)."""
        assert self.proc.stdin is not None
        with anyio.fail_after(10):
            await self.proc.stdin.send(line.encode() + b"\n")
            return await self.line()

    async def line(self) -> str:
        return (await self._out.receive_until(b"\n", 100)).decode()

    async def release(self) -> None:
        if self.held:
            self.held = False
            assert await self.ask("release") == "released"


@contextlib.asynccontextmanager
async def store_locked(backend: Backend) -> AsyncIterator[StoreLock]:
    """The sim store's database write-locked by another process for the duration."""
    assert backend.name == "sim"
    db = os.path.join(os.environ["GNTIPC_SIM_DIR"], "state.db")
    async with await anyio.open_process([sys.executable, "-c", _HOLDER, db]) as proc:
        lock = StoreLock(proc)
        with anyio.fail_after(30):
            assert await lock.line() == "locked"
        try:
            yield lock
        finally:
            with anyio.CancelScope(shield=True):
                await lock.release()


@pytest.fixture
def sim(backend: Backend) -> Backend:
    if backend.name != "sim":
        pytest.skip("the store is locked through the sim backend's database")
    return backend


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """A store deadline short enough for a test (the default is for real stores)."""
    monkeypatch.setattr(_astore, "STORE_TIMEOUT", 0.5)
    return 0.5


async def wait_background() -> None:
    """Wait until the work abandoned by timeouts finished (so the leak check holds)."""
    assert await anyio.to_thread.run_sync(_astore.wait_background, 30)


async def test_accept_and_connect_leave_the_loop_free_while_the_store_is_locked(
    sim: Backend,
) -> None:
    path = fresh_path()
    streams: list[gntipc.VchanStream] = []

    async def accept(listener: gntipc.Listener) -> None:
        streams.append(await listener.accept())

    async def connect() -> None:
        streams.append(await gntipc.connect(sim.domid, path, timeout=30, backend=sim))

    async with (
        await gntipc.listen(sim.domid, path, backend=sim) as listener,
        store_locked(sim) as lock,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(accept, listener)
        # Answered only if the loop runs while accept waits for the store: on a blocked
        # loop the ping would wait for sqlite's busy timeout, after which accept fails
        # with EBUSY.
        assert await lock.ask("ping") == "pong"
        tg.start_soon(connect)
        assert await lock.ask("ping") == "pong"
        assert not streams  # both still wait for the store
        await lock.release()
    assert len(streams) == 2
    server = next(s for s in streams if s.extra(gntipc.VchanAttribute.is_server))
    client = next(s for s in streams if s is not server)
    async with server, client:
        await client.send(b"through")
        assert await server.receive() == b"through"


async def test_accept_times_out_on_a_wedged_store_and_withdraws_its_offer(
    sim: Backend, short_timeout: float
) -> None:
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(sim.domid, path)
    async with await gntipc.listen(sim.domid, path, backend=sim) as listener:
        async with store_locked(sim) as lock:
            with pytest.raises(gntipc.XenStoreTimeout, match=r"offering a channel at .* 0\.5 s"):
                await listener.accept()
            assert await lock.ask("ping") == "pong"
        # The abandoned offer completes once the store answers, and is withdrawn.
        await wait_background()
        assert not sim.store.exists(f"{full}/ring-ref")


async def test_connect_times_out_on_a_wedged_store(sim: Backend, short_timeout: float) -> None:
    path = fresh_path()
    async with store_locked(sim):
        with pytest.raises(gntipc.XenStoreTimeout, match=r"watching .* 0\.5 s"):
            await gntipc.connect(sim.domid, path, backend=sim)  # no deadline of its own
    await wait_background()


async def test_cancelled_accept_withdraws_its_keys_once_the_store_answers(
    sim: Backend,
) -> None:
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(sim.domid, path)
    returned = anyio.Event()
    scope = anyio.CancelScope()

    async def accept(listener: gntipc.Listener) -> None:
        with scope:
            await listener.accept()
        returned.set()

    async with (
        await gntipc.listen(sim.domid, path, backend=sim) as listener,
        store_locked(sim) as lock,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(accept, listener)
        assert await lock.ask("ping") == "pong"  # accept waits for the store now
        scope.cancel()
        assert await lock.ask("ping") == "pong"
        # The cancelled accept waits (bounded) for its offer, to withdraw it.
        assert not returned.is_set()
        await lock.release()
        with anyio.fail_after(30):
            await returned.wait()
        assert not sim.store.exists(f"{full}/ring-ref")


async def test_aclose_tells_the_peer_at_once_and_times_out_on_a_wedged_store(
    sim: Backend, make_pair: object, short_timeout: float
) -> None:
    server, client = await make_pair()  # type: ignore[operator]
    async with store_locked(sim):
        with pytest.raises(gntipc.XenStoreTimeout, match=r"closing the channel at .* 0\.5 s"):
            await client.aclose()
        assert client.closed
        # The live byte and the event went out before the store work.
        with pytest.raises(EndOfStream):
            await server.receive()
    await wait_background()
