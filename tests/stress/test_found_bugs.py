"""Bugs the stress tests found, each pinned by a small deterministic reproducer.  All
are fixed: each is a plain test that fails if its bug comes back (an open bug would be
marked ``xfail(strict=True)``, and the mark dropped with the fix)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import msgspec
import pytest

import gntipc
from gntipc.backends.sim import SimBackend, SimEventPort
from gntipc.testing import connect_pair

from ._common import worker_env

pytestmark = pytest.mark.anyio


class Msg(msgspec.Struct):
    seq: int
    body: bytes


async def _pair(backend: SimBackend, size: int) -> tuple[gntipc.VchanStream, gntipc.VchanStream]:
    path = f"data/found-bugs/{os.getpid()}"
    return await connect_pair(backend, path, read_size=size, write_size=size, timeout=10)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_failed_partial_put_keeps_receive_direction() -> None:
    with SimBackend(0) as backend:
        a, b = await _pair(backend, 4096)
        qa, qb = gntipc.MessageQueue(a, Msg), gntipc.MessageQueue(b, Msg)
        try:
            await qb.put_many([Msg(i, b"x") for i in range(3)])  # b -> a, then b leaves

            async def leave() -> None:
                await anyio.sleep(0.1)
                await qb.aclose()

            async with anyio.create_task_group() as tg:
                tg.start_soon(leave)
                with pytest.raises(anyio.BrokenResourceError):
                    # More than the 4 KiB ring, and b never reads: a partial write.
                    await qa.put_many([Msg(i, bytes(100)) for i in range(100)])
            # Everything b sent before it left must still be delivered.
            assert [m.seq for m in await qa.get_many()] == [0, 1, 2]
        finally:
            await qa.aclose()
            await qb.aclose()


_DIE_AFTER_ANNOUNCE = """
import os, signal, sys
import anyio
import gntipc
from gntipc._keys import Presence

real = Presence.announce_client

def announce_then_die(self):
    real(self)
    os.kill(os.getpid(), signal.SIGKILL)  # announced, live byte still 2 (not connected)

Presence.announce_client = announce_then_die
anyio.run(lambda: gntipc.connect(0, sys.argv[1], timeout=30))
"""


# A gntipc client that crashed after it announced itself in the store but before its
# live byte said "connected" read as a clean close (EndOfStream) on the server: the
# server learns that its client is gntipc only when it sees the live byte at 1, and
# the unmap notification had already cleared it.
async def test_client_killed_after_announcing_itself_reads_as_a_crash(tmp_path: Path) -> None:
    sim = f"/tmp/gntipc-announce-{os.getpid()}"
    path = f"data/found-bugs/announce/{os.getpid()}"
    env = worker_env(1, GNTIPC_SIM_DIR=sim)
    try:
        with SimBackend(0, runtime_dir=sim) as backend:
            async with await gntipc.listen(1, path, backend=backend) as listener:
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        result: list[gntipc.VchanStream] = []

                        async def accept() -> None:
                            result.append(await listener.accept())

                        tg.start_soon(accept)
                        client = await anyio.run_process(
                            [sys.executable, "-c", textwrap.dedent(_DIE_AFTER_ANNOUNCE), path],
                            env=env,
                            check=False,
                        )
                assert client.returncode == -9, client.stderr[-1500:]
                async with result[0] as stream:
                    with pytest.raises(anyio.BrokenResourceError):
                        await stream.receive()
    finally:
        import shutil

        shutil.rmtree(sim, ignore_errors=True)


_DIE_AFTER_BIND = """
import os, signal
import gntipc.backends.sim._store as store
from gntipc.backends.sim import SimBackend, SimEventPort

real = store.bind_dgram

def bind_then_die(path):
    real(path)
    os.kill(os.getpid(), signal.SIGKILL)  # killed between bind and the watches row

store.bind_dgram = bind_then_die
SimBackend(9).store.watch("/local/domain/9/x")
"""

_WATCH = """
from gntipc.backends.sim import SimBackend, SimEventPort
with SimBackend(9) as b:
    b.store.watch("/local/domain/9/x").close()
print("ok")
"""


# Bug 2 (fixed): a process SIGKILLed between creating a runtime file (socket of a watch
# or port, memory file) and recording it in the db left an orphan file, and backend ids
# were reused after reaping, so a later process got the same file name and failed with
# EADDRINUSE.  Now ids are never reused and reaping removes a dead backend's files.
def test_killed_mid_setup_leaves_no_file_that_breaks_a_later_process(tmp_path: Path) -> None:
    # A private runtime dir (short: AF_UNIX paths), so the orphan cannot trip the
    # suite's leak check after this test.
    sim = f"/tmp/gntipc-bug2-{os.getpid()}"
    env = worker_env(9, GNTIPC_SIM_DIR=sim)
    watches = os.path.join(sim, "w")
    # Our backend keeps the runtime directory (the last one to close removes it, and
    # with it the evidence) from before the first process to the last check.
    pin = SimBackend(0, runtime_dir=sim)
    try:
        a = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_DIE_AFTER_BIND)],
            env=env,
            timeout=60,
            check=False,
        )
        assert a.returncode == -9
        assert os.listdir(watches), "the killed process left no orphan: nothing was tested"
        b = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_WATCH)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert b.stdout.strip() == "ok", b.stderr[-1500:]
        # The second process reaped the dead one, orphan included.
        assert os.listdir(watches) == []
    finally:
        import shutil

        pin.close()
        shutil.rmtree(sim, ignore_errors=True)


def test_notify_reaches_a_peer_that_bound_after_another_unbound() -> None:
    with SimBackend(0) as server, SimBackend(5) as clients:
        port = server.alloc_unbound(5)
        first = clients.bind_interdomain(0, port.port)
        assert not port.pending()  # consumes the bind message: the peer is cached
        first.close()  # unbinds silently, as on Xen
        second = clients.bind_interdomain(0, port.port)
        try:
            port.notify()  # connected (to the second port): must be delivered
            assert second.pending()
        finally:
            second.close()
            port.close()


def _pidfds() -> set[int]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "pidfd" in os.readlink(f"/proc/self/fd/{fd}"):
                fds.add(int(fd))
    return fds


def test_notify_racing_close_leaks_no_pidfd() -> None:
    import sys
    import threading
    import time

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the two threads interleave finely
    try:
        with SimBackend(0) as server, SimBackend(5) as clients:
            before = _pidfds()
            errors: list[BaseException] = []
            for i in range(400):
                port = server.alloc_unbound(5)
                peer = clients.bind_interdomain(0, port.port)  # not yet seen by `port`
                barrier = threading.Barrier(2)
                delay = (i % 6) * 20e-6  # 0-100 us: where the two calls overlap

                def notify(port: SimEventPort, barrier: threading.Barrier) -> None:
                    barrier.wait()
                    with contextlib.suppress(gntipc.XenError, anyio.ClosedResourceError):
                        port.notify()

                def close(port: SimEventPort, barrier: threading.Barrier, delay: float) -> None:
                    barrier.wait()
                    time.sleep(delay)
                    try:
                        port.close()
                    except Exception as exc:
                        errors.append(exc)

                threads = [
                    threading.Thread(target=notify, args=(port, barrier)),
                    threading.Thread(target=close, args=(port, barrier, delay)),
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if not port.closed:  # its close() failed: try again
                    with contextlib.suppress(Exception):
                        port.close()
                peer.close()
            leaked = _pidfds() - before
    finally:
        sys.setswitchinterval(interval)
    for fd in leaked:  # every port is closed: nobody else holds them
        os.close(fd)
    assert (len(leaked), errors) == (0, [])
