"""Exhaustion: the gntalloc page limit, a crowd of clients on one listener, a peer that
never reads, and a store that refuses writes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import anyio
import pytest

import gntipc
from gntipc.backends.sim import SimBackend
from gntipc.channel import Vchan
from gntipc.testing import connect_pair

from ._common import by_level, leftovers, reap, sim_counts, spawn
from ._report import REPORT

pytestmark = pytest.mark.anyio

CLIENT_DOM = 5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Pairs:
    """Loopback stream pairs (both ends in this process) on one backend."""

    def __init__(self, backend: SimBackend) -> None:
        self.backend = backend
        self.streams: list[gntipc.VchanStream] = []
        self.n = 0

    async def open(self, size: int = 65536) -> tuple[gntipc.VchanStream, gntipc.VchanStream]:
        self.n += 1
        path = f"data/exhaust/{os.getpid()}/{self.n}"
        pair = await connect_pair(self.backend, path, read_size=size, write_size=size, timeout=10)
        self.streams += pair
        return pair

    async def aclose(self) -> None:
        for s in self.streams:
            await s.aclose()


def grants_of(domid: int) -> int:
    import sqlite3

    from ._common import sim_dir

    if not os.path.exists(f"{sim_dir()}/state.db"):
        return 0  # the last backend closed: the runtime is gone
    db = sqlite3.connect(f"file:{sim_dir()}/state.db?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM grants WHERE domid=?", (domid,)).fetchone()[0])
    finally:
        db.close()


# -- the grant limit ---------------------------------------------------------------------
async def test_grant_limit_reached_reported_and_recovered() -> None:
    # 64 KiB each way: 1 control page + 16 + 16 ring pages = 33 pages per channel.
    limit = 100
    with SimBackend(0, page_limit=limit) as backend:
        pairs = Pairs(backend)
        try:
            for _ in range(3):
                await pairs.open()
            assert grants_of(0) == 99
            path = f"data/exhaust/{os.getpid()}/full"
            async with await gntipc.listen(0, path, backend=backend) as listener:
                with pytest.raises(gntipc.XenError) as info:
                    await listener.accept()
                # A failed set-up gives back what it had taken (the control page).
                assert grants_of(0) == 99
                exc = info.value
                assert exc.errno == errno.ENOSPC
                msg = str(exc)
                REPORT.add("exhaustion", "grant limit error", msg[:150] + "...")
                assert f"limit of {limit}" in msg, msg  # names the limit
                assert "raise the limit" in msg, msg  # and says it can be raised
                # Recovery: close one channel, and the same listener serves again.
                await pairs.streams[0].aclose()
                await pairs.streams[1].aclose()
                assert grants_of(0) == 66

                async def connect() -> gntipc.VchanStream:
                    return await gntipc.connect(0, path, timeout=10, backend=backend)

                # Not connect_pair: the point is that this same listener serves again.
                async with anyio.create_task_group() as tg:
                    out: list[gntipc.VchanStream] = []

                    async def accept() -> None:
                        out.append(await listener.accept())

                    tg.start_soon(accept)
                    out.append(await connect())
                pairs.streams += out
                await out[0].send(b"ok")
                assert await out[1].receive() == b"ok"
                REPORT.add("exhaustion", "grant limit: recovered after a close", "yes", "yes", True)
        finally:
            await pairs.aclose()
    assert grants_of(0) == 0


async def test_grant_limit_message_names_the_sim_knob() -> None:
    with SimBackend(0, page_limit=1) as backend:
        with pytest.raises(gntipc.XenError) as info:
            backend.share(0, 2)
        assert "page_limit" in str(info.value), str(info.value)


# -- a crowd of clients on one listener ------------------------------------------------------
#: Seconds without a client served that count as a hang, once one was accepted.
STALL = 8.0
#: Seconds allowed for the client processes to start and the first one to connect
#: (python start-up of many processes on a loaded machine).
STARTUP = 60.0


def describe(stream: gntipc.VchanStream) -> str:
    """The server side of a stuck channel; "lost wake-up" when the client has data to
    read and its request for a notification was consumed (an event was sent)."""
    import struct

    ep = stream.vchan.endpoint
    page = ep._pages[0].mapping.view()
    try:
        cons, prod = struct.unpack_from("<II", page, 8)  # the server -> client ring
        srv_notify = page[23]
    finally:
        page.release()
    unread = (prod - cons) & 0xFFFFFFFF
    what = "lost wake-up" if unread and not srv_notify & 1 else "stuck"
    return f"{what}: client has {unread} unread bytes, srv_notify={srv_notify:#x}"


def test_many_clients_wait_on_one_listener() -> None:
    clients = 100
    procs_n = by_level(4, 20, 100)
    per = [clients // procs_n + (i < clients % procs_n) for i in range(procs_n)]
    tmp = tempfile.mkdtemp(prefix="gntipc-crowd-")
    path = f"data/crowd/{os.getpid()}"
    served: list[float] = []
    procs: list[subprocess.Popen[bytes]] = []
    results: list[str] = []

    stalled: list[str] = []

    async def serve() -> None:
        with SimBackend(0) as backend:
            async with await gntipc.listen(
                CLIENT_DOM, path, read_size=1024, write_size=1024, backend=backend
            ) as listener:
                first = 0
                for i, n in enumerate(per):
                    result = os.path.join(tmp, f"{i}.txt")
                    results.append(result)
                    procs.append(
                        spawn("_clients", ["0", path, str(first), str(n), result], CLIENT_DOM)
                    )
                    first += n
                live: dict[int, gntipc.VchanStream] = {}

                async def handle(k: int, stream: gntipc.VchanStream) -> None:
                    live[k] = stream
                    async with stream:
                        data = await stream.receive_exactly(8)
                        await stream.send(data)
                        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                            await stream.receive()
                        served.append(time.monotonic())
                    del live[k]

                async def watchdog(scope: anyio.CancelScope) -> None:
                    # Clients are served in a few seconds; no progress for this long
                    # is a hang: describe the stuck channels, then give up.
                    last, count = time.monotonic(), 0
                    while True:
                        await anyio.sleep(0.5)
                        limit = STALL if live or served else STARTUP
                        if len(served) != count:
                            last, count = time.monotonic(), len(served)
                        elif time.monotonic() - last > limit:
                            stalled.extend(describe(s) for s in live.values())
                            stalled.append(f"{len(served)} served, {len(live)} open")
                            scope.cancel()
                            return

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watchdog, tg.cancel_scope)
                    for k in range(clients):
                        stream = await listener.accept()
                        tg.start_soon(handle, k, stream)
                    while len(served) < clients:
                        await anyio.sleep(0.05)
                    tg.cancel_scope.cancel()

    t0 = time.monotonic()
    try:
        anyio.run(serve)
        if not stalled:
            for p in procs:
                assert p.wait(60) == 0
    finally:
        for p in procs:
            reap(p)
    lines = []
    for r in results:
        if os.path.exists(r):  # a client process killed after a stall wrote none
            with open(r) as f:
                lines += [line.split(maxsplit=2) for line in f.read().splitlines()]
    shutil.rmtree(tmp, ignore_errors=True)
    if stalled:
        REPORT.add("exhaustion", "clients on one listener: STALLED", stalled[-1], "", False)
        pytest.fail("clients not served: " + "; ".join(stalled))
    seconds = time.monotonic() - t0
    errors = [" ".join(x) for x in lines if x[1] == "ERROR"]
    waits = sorted(float(x[1]) for x in lines if x[1] != "ERROR")
    REPORT.add(
        "exhaustion",
        f"clients on one listener ({procs_n} processes): served",
        len(waits),
        f"{clients}",
        len(waits) == clients and not errors,
    )
    REPORT.add(
        "exhaustion",
        "  time to be served s p50/max; whole run s",
        f"{waits[len(waits) // 2]:.2f} / {waits[-1]:.2f}; {seconds:.1f}" if waits else "-",
    )
    assert not errors, errors[:5]
    assert len(waits) == clients


# -- a peer that never reads ---------------------------------------------------------------
async def test_peer_that_never_reads() -> None:
    with SimBackend(0) as backend:
        pairs = Pairs(backend)
        try:
            writer, stalled = await pairs.open(4096)
            ping, pong = await pairs.open(4096)
            data = os.urandom(1 << 20)
            latencies: list[float] = []

            async def pinger() -> None:
                for _ in range(200):
                    t = time.monotonic()
                    await ping.send(b"p")
                    await pong.receive()
                    await pong.send(b"q")
                    await ping.receive()
                    latencies.append(time.monotonic() - t)

            # The send waits for room (the peer never reads) and is cancelled; the
            # other channel of the same event loop goes on meanwhile.
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(pinger)
                with anyio.move_on_after(0.5) as scope:
                    await writer.send(data)
            waited = time.monotonic() - t0
            assert scope.cancelled_caught
            sent = writer.send_progress
            assert 0 < sent < len(data)
            # A timeout instead of a cancellation.
            with pytest.raises(TimeoutError), anyio.fail_after(0.2):
                await writer.send(data[sent:])
            sent += writer.send_progress
            # The stream is still consistent: a late reader gets exactly the prefix sent.
            got = bytearray()
            while len(got) < sent:
                got += await stalled.receive()
            assert bytes(got) == data[:sent]
            with pytest.raises(anyio.WouldBlock):
                stalled.receive_nowait()
            REPORT.add(
                "exhaustion",
                "never-read peer: send cancelled after s / other channel max RTT ms",
                f"{waited:.2f} / {max(latencies) * 1000:.1f}",
                "cancellable; RTT < 100",
                max(latencies) < 0.1 and len(latencies) == 200,
            )
            assert len(latencies) == 200 and max(latencies) < 0.1, max(latencies)
        finally:
            await pairs.aclose()


def test_peer_that_never_reads_sync() -> None:
    with SimBackend(0) as backend:
        path = f"data/exhaust/{os.getpid()}/sync"
        server = Vchan.server(backend, 0, path, read_size=4096, write_size=4096)
        client = Vchan.client(backend, 0, path, timeout=10)
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                server.write_all(bytes(1 << 20), timeout=0.2)
            waited = time.monotonic() - t0
            assert 0.2 <= waited < 2.0
            # Reading still works both ways.
            client.write_all(b"still here", timeout=1)
            assert server.read(100, timeout=1) == b"still here"
            REPORT.add(
                "exhaustion",
                "never-read peer (sync): write_all timed out after s",
                f"{waited:.2f}",
                "~0.2",
                waited < 2.0,
            )
        finally:
            client.close()
            server.close()


# -- a store that refuses writes --------------------------------------------------------------
def got_hi(stream: gntipc.VchanStream) -> bool:
    try:
        return stream.receive_nowait() == b"hi"
    except (anyio.WouldBlock, anyio.EndOfStream, anyio.BrokenResourceError):
        return False


@pytest.fixture
def refusing_store() -> Iterator[list[int]]:
    """Make every store mutation of SimBackends in this process fail with ENOSPC (what
    xenstored returns past a quota) while the returned list is non-empty."""
    from gntipc._exceptions import raise_errno
    from gntipc.backends.sim import _store

    refusing: list[int] = []
    real_run = _store.SimStore._run
    real_commit = _store.SimTransaction.commit

    def run(self: _store.SimStore, op: str, *args: object) -> object:
        if refusing:
            raise_errno(errno.ENOSPC, f"xenstore: {op}: quota exceeded (test)")
        return real_run(self, op, *args)

    def commit(self: _store.SimTransaction) -> None:
        if refusing:
            self._done = True
            raise_errno(errno.ENOSPC, "xenstore: transaction: quota exceeded (test)")
        real_commit(self)

    _store.SimStore._run = run  # type: ignore[method-assign]
    _store.SimTransaction.commit = commit  # type: ignore[method-assign]
    try:
        yield refusing
    finally:
        _store.SimStore._run = real_run  # type: ignore[method-assign]
        _store.SimTransaction.commit = real_commit  # type: ignore[method-assign]


async def test_store_refuses_writes(refusing_store: list[int]) -> None:
    """The sim store has no quota knob (see the sim's docstring: "no quotas"), so the
    refusal is injected: every write, rm, set_perms and commit fails with ENOSPC."""
    keys = ("grants", "ports", "maps", "notifies", "watches", "files_m", "files_p", "files_w")
    with SimBackend(0) as backend:
        before = sim_counts()
        path = f"data/exhaust/{os.getpid()}/quota"
        accepted: list[gntipc.VchanStream] = []
        try:
            async with await gntipc.listen(0, path, backend=backend) as listener:
                # The server side: publishing the keys fails.
                refusing_store.append(1)
                with pytest.raises(gntipc.XenError) as info:
                    await listener.accept()
                assert info.value.errno == errno.ENOSPC
                # Nothing of the failed set-up is left (pages, ports, watches, files).
                after = sim_counts()
                assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
                refusing_store.clear()

                # The client side: the server published its keys while the store took
                # writes, then the client's writes are refused.
                refused: list[BaseException] = []

                async def accept() -> None:
                    # A client that fails after claiming the channel leaves the server
                    # with a stream whose peer is gone (it ends at once), and accepting
                    # while the store refuses fails: keep accepting.
                    while True:
                        try:
                            accepted.append(await listener.accept())
                        except gntipc.XenError as exc:
                            refused.append(exc)
                            await anyio.sleep(0.01)

                client_err: BaseException | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(accept)
                    with anyio.fail_after(10):
                        while True:  # until the keys are up
                            try:
                                backend.store.read(f"/local/domain/0/{path}/ring-ref")
                                break
                            except gntipc.XenError:
                                await anyio.sleep(0.01)
                    refusing_store.append(1)
                    try:
                        with anyio.fail_after(5):
                            (await gntipc.connect(0, path, timeout=2, backend=backend)).close()
                    except (gntipc.GntipcError, TimeoutError) as exc:
                        client_err = exc
                    refusing_store.clear()
                    # Recovery: the listener serves a client once writes are taken again.
                    with anyio.fail_after(10):
                        client = await gntipc.connect(0, path, timeout=10, backend=backend)
                    try:
                        await client.send(b"hi")
                        with anyio.fail_after(10):
                            while not any(got_hi(st) for st in accepted):
                                await anyio.sleep(0.01)
                    finally:
                        client.close()
                    tg.cancel_scope.cancel()
        finally:
            for st in accepted:
                st.close()
        # The client's writes were refused: it skipped the keys as stale until its
        # timeout (TimeoutError), and says why (StaleKeys from the store's ENOSPC).
        cause = client_err.__cause__ if client_err is not None else None
        root = cause.__cause__ if cause is not None else None
        client_ok = (
            isinstance(client_err, TimeoutError)
            and isinstance(cause, gntipc.StaleKeys)
            and isinstance(root, gntipc.XenError)
            and root.errno == errno.ENOSPC
        )
        # The server re-offered after the client left, and each offer was refused.
        server_ok = bool(refused) and all(
            isinstance(e, gntipc.XenError) and e.errno == errno.ENOSPC for e in refused
        )
        REPORT.add(
            "exhaustion",
            "store refusing writes: accept / connect raise",
            f"{type(info.value).__name__} ENOSPC / {type(client_err).__name__}"
            f" (cause: {type(cause).__name__} <- {root!r}); re-offers refused: {len(refused)}",
            "XenError ENOSPC / TimeoutError <- StaleKeys <- ENOSPC; > 0",
            client_ok and server_ok,
        )
        assert client_ok, repr((client_err, cause, root))
        assert server_ok, refused[:3]
        after = sim_counts()
        assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
    REPORT.add("exhaustion", "store quota knob in the sim", "none (injected ENOSPC instead)")
    assert not leftovers()


async def test_store_permission_refused() -> None:
    """A real refusal of the sim store: a listener at a path it may not write."""
    with SimBackend(3) as backend:
        async with await gntipc.listen(4, "/local/domain/4/data/not-mine", backend=backend) as lis:
            with pytest.raises(gntipc.XenError) as info:
                await lis.accept()
            assert info.value.errno == errno.EACCES
    assert not leftovers()
