"""Zero-copy bulk transfer (gntipc.bulk): loans, views, backpressure, cancellation,
lifetimes, hostile peers, and processes killed mid-loan; typed messages with attachments
(BulkQueue).  Most tests run on sim only (the Xen suite runs under emulation: it gets
the round trips)."""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from _bulk_peer import Meta
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import fresh_path

import gntipc
from gntipc import (
    LocalProtocolError,
    MalformedMessage,
    MappingInUse,
    MessageTooLarge,
    RemoteProtocolError,
    XenError,
)
from gntipc.backends import Backend
from gntipc.backends._abc import Pages
from gntipc.bulk import (
    BulkChannel,
    BulkQueue,
    SyncBulkChannel,
    SyncBulkQueue,
    open_bulk,
    open_bulk_queue,
    open_bulk_queue_sync,
    open_bulk_sync,
)
from gntipc.protocol.bulk import (
    HELLO_SIZE,
    MESSAGE_HEAD_SIZE,
    encode_hello,
    encode_loan,
    encode_message,
    encode_release,
)
from gntipc.testing import connect_pair

pytestmark = pytest.mark.anyio

PEER_SCRIPT = str(Path(__file__).with_name("_bulk_peer.py"))
PEER_DOMID = 5


@pytest.fixture
def sim() -> Iterator[Backend]:
    """This process as sim domain 0 (the tests that need no Xen run here only)."""
    with gntipc.get_backend("sim", domid=0) as b:
        yield b


async def open_pair(
    backend: Backend,
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    ring: int = 65536,
    opener: Any = open_bulk,
) -> tuple[Any, Any]:
    """Two bulk channels (or what ``opener`` makes: queues) over a fresh loopback stream
    pair (``a`` the server's)."""
    s, c = await connect_pair(backend, fresh_path(), read_size=ring, write_size=ring)
    got: dict[str, Any] = {}

    async def one(name: str, stream: gntipc.VchanStream, kw: dict[str, Any]) -> None:
        got[name] = await opener(stream, timeout=10, **kw)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "a", s, a)
            tg.start_soon(one, "b", c, b)
    except BaseException:
        for ch in got.values():
            await ch.aclose()
        await s.aclose()
        await c.aclose()
        raise
    return got["a"], got["b"]


@pytest.fixture
async def pairs(sim: Backend) -> AsyncIterator[Any]:
    """``await pairs(a_kwargs, b_kwargs)`` on sim; every channel is closed after."""
    made: list[BulkChannel] = []

    async def make(a: dict[str, Any], b: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
        pair = await open_pair(sim, a, b, **kw)
        made.extend(pair)
        return pair

    yield make
    for ch in made:
        await ch.aclose()


def open_pages(backend: Backend) -> list[Pages]:
    """The pages this backend still has shared or mapped (the sim backend's close would
    release them, so the leak check after the test cannot see a failed open's leak)."""
    return [c for c in backend._children if isinstance(c, Pages)]  # type: ignore[attr-defined]


def pattern(k: int, n: int) -> bytes:
    return bytes((k + i) % 251 for i in range(min(n, 251))) * (n // 251 + 1)


# -- the round trip (also on Xen) -----------------------------------------------------------


async def test_loans_arrive_in_place_and_come_back(backend: Backend) -> None:
    a, b = await open_pair(backend, {"buffers": 2, "buffer_size": 8192}, {"buffers": 0})
    async with a, b:
        assert (a.buffers, a.buffer_size, b.peer_buffers, b.peer_buffer_size) == (2, 8192, 2, 8192)
        received: list[bytes] = []

        async def lend() -> None:
            for k in range(12):
                async with a.loan() as buf:
                    n = 8192 - 100 * k
                    buf[:n] = pattern(k, 8192)[:n]
                    # a slice of the loan goes: offset 3, n - 3 bytes
                    await a.send(buf[3:n])
                    with pytest.raises(ValueError):
                        buf[0]  # sent: our view of it is released

        async def take() -> None:
            for _ in range(12):
                item = await b.receive()
                async with item as view:
                    assert view.readonly
                    assert (item.offset, len(item)) == (3, len(view))
                    received.append(bytes(view))
                with pytest.raises(ValueError):
                    view[0]  # released

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lend)
                tg.start_soon(take)
        assert received == [pattern(k, 8192)[3 : 8192 - 100 * k] for k in range(12)]
        # every buffer came back (releases read while lending waited, or now)
        with anyio.fail_after(10):
            async with a.loan(), a.loan():
                pass
        await a.send_eof()
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await b.receive()


# -- sim only from here ---------------------------------------------------------------------


async def test_both_directions_at_once(pairs: Any) -> None:
    a, b = await pairs({"buffers": 2, "buffer_size": 4096}, {"buffers": 3, "buffer_size": 8192})
    got: dict[str, list[int]] = {"a": [], "b": []}

    async def side(me: BulkChannel, name: str) -> None:
        async def lend() -> None:
            for k in range(30):
                async with me.loan(1) as buf:
                    buf[0] = k
                    await me.send(buf)
            await me.send_eof()

        async def take() -> None:
            while True:
                try:
                    async with await me.receive() as view:
                        got[name].append(view[0])
                except anyio.EndOfStream:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(lend)
            tg.start_soon(take)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(side, a, "a")
            tg.start_soon(side, b, "b")
    assert got == {"a": list(range(30)), "b": list(range(30))}


async def test_exhausted_pool_waits_cancellably_then_resumes(pairs: Any) -> None:
    a, b = await pairs({"buffers": 2, "buffer_size": 4096}, {"buffers": 0})
    for k in range(2):
        async with a.loan() as buf:
            buf[0] = k
            await a.send(buf)
    held = [await b.receive(), await b.receive()]
    # the pool is exhausted: a loan waits, and a cancelled wait lends nothing
    with anyio.move_on_after(0.3) as scope:
        async with a.loan():
            pytest.fail("lent a buffer the peer holds")
    assert scope.cancelled_caught
    assert a.free_buffers == 0
    with pytest.raises(anyio.WouldBlock), a.loan():
        pass

    async def release_soon() -> None:
        await anyio.sleep(0.1)
        held[1].release()
        held[1].release()  # idempotent

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_soon)
            async with a.loan() as buf:  # waits until the release arrives
                assert buf[0] == 1  # the buffer the peer gave back
    held[0].release()


async def test_unsent_loan_goes_back_and_its_view_is_released(pairs: Any) -> None:
    a, _ = await pairs({"buffers": 1, "buffer_size": 4096}, {"buffers": 0})
    async with a.loan(10) as buf:
        assert len(buf) == 10 and not buf.readonly and a.free_buffers == 0
    assert a.free_buffers == 1
    with pytest.raises(ValueError):
        buf[0] = 1
    with a.loan() as buf2:  # the sync form
        assert len(buf2) == 4096


async def test_send_takes_only_our_loans(pairs: Any) -> None:
    a, b = await pairs({"buffers": 2, "buffer_size": 4096}, {"buffers": 1, "buffer_size": 4096})
    async with a.loan(100) as buf:
        with pytest.raises(LocalProtocolError):
            await a.send(bytearray(10))  # not the pool
        with pytest.raises(LocalProtocolError):
            await a.send(buf.toreadonly())
        with pytest.raises(LocalProtocolError):
            await a.send(buf[::2])  # not contiguous
        whole = a._pool_view
        assert whole is not None
        with pytest.raises(LocalProtocolError, match="not on loan"):
            await a.send(whole[4096:4100])  # the other buffer: not lent
        with pytest.raises(LocalProtocolError, match="not on loan"):
            await a.send(whole[50:150])  # past the 100 bytes lent
        await a.send(buf[10:20])
    item = await b.receive()
    assert (item.offset, item.length) == (10, 10)
    item.release()
    with pytest.raises(LocalProtocolError):
        a.loan(4097)
    with pytest.raises(LocalProtocolError):
        a.loan(-1)


async def test_receiver_without_pool_cannot_lend(pairs: Any) -> None:
    _, b = await pairs({"buffers": 1, "buffer_size": 4096}, {"buffers": 0})
    with pytest.raises(LocalProtocolError, match="no pool"):
        b.loan()


async def test_eof_ends_receive_and_loans_after_it_fail(pairs: Any) -> None:
    a, b = await pairs({"buffers": 1, "buffer_size": 4096}, {"buffers": 0})
    await a.send_eof()
    await a.send_eof()  # idempotent
    with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
        await b.receive()
    with pytest.raises(LocalProtocolError, match="EOF"):
        async with a.loan():
            pass


async def test_close_wakes_waiters(pairs: Any) -> None:
    a, b = await pairs({"buffers": 1, "buffer_size": 4096}, {"buffers": 0})
    async with a.loan() as buf:
        await a.send(buf)  # the only buffer: the peer's now
    with anyio.fail_after(10):
        held = await b.receive()  # and held there, never released

    async def close_soon() -> None:
        await anyio.sleep(0.1)
        await b.aclose()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(close_soon)
            with pytest.raises(anyio.ClosedResourceError):
                await b.receive()
    await b.aclose()  # idempotent
    with pytest.raises(anyio.ClosedResourceError):
        b.receive_nowait()
    held.release()  # after the close: nothing to do
    # the peer closed: a loan that must wait will never get its buffer back
    with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):
        async with a.loan():
            pass


async def test_view_kept_after_close_keeps_the_pages_mapped(sim: Backend) -> None:
    a, b = await open_pair(sim, {"buffers": 1, "buffer_size": 4096}, {"buffers": 0})
    async with a.loan() as buf:
        buf[:5] = b"hello"
        await a.send(buf[:5])
    item = await b.receive()
    kept = item.view[1:3]  # derived from the view: keeps the mapping exported
    await a.aclose()
    with pytest.raises(MappingInUse):
        await b.aclose()
    with pytest.raises(ValueError):
        item.view[0]  # the view itself was released by the close
    assert bytes(kept) == b"el"  # still mapped: never a use-after-unmap
    assert len(open_pages(sim)) == 1  # the mapping of a's pool, kept for the view
    del kept
    b.close()  # now it unmaps
    b.close()
    assert open_pages(sim) == []


# -- resources -------------------------------------------------------------------------------


async def test_rings_too_small_for_the_pools(pairs: Any) -> None:
    with pytest.raises(ExceptionGroup) as info:
        await pairs(
            {"buffers": 40, "buffer_size": 4096}, {"buffers": 30, "buffer_size": 4096}, ring=1024
        )
    assert all(isinstance(e, LocalProtocolError) for e in info.value.exceptions)
    assert "too small" in str(info.value.exceptions[0])


async def test_pool_over_the_grant_budget_is_enospc(sim: Backend) -> None:
    s, c = await connect_pair(sim, fresh_path())
    with pytest.raises(XenError) as info:
        await open_bulk(s, buffers=1, buffer_size=(sim.page_limit or 1024) * 4096)
    assert info.value.errno == errno.ENOSPC
    assert s.closed  # a failed open closes the stream
    await c.aclose()


async def test_peer_pool_over_our_limit(pairs: Any) -> None:
    with pytest.raises(ExceptionGroup) as info:
        await pairs({"buffers": 2, "buffer_size": 8192}, {"buffers": 0, "max_peer_pages": 3})
    errors = info.value.exceptions  # (the test's own task group: one per side that failed)
    assert any(isinstance(e, RemoteProtocolError) and "at most 3" in str(e) for e in errors), errors


# -- hostile peers: the other end writes raw frames -------------------------------------------


async def test_hostile_hello_with_refs_not_granted(sim: Backend) -> None:
    s, c = await connect_pair(sim, fresh_path())
    async with c:
        await c.send(encode_hello(1, 4096, [999_999]))
        with anyio.fail_after(10), pytest.raises(RemoteProtocolError, match="cannot be mapped"):
            await open_bulk(s, buffers=1, buffer_size=4096)
        assert s.closed
    assert open_pages(sim) == []


async def test_hostile_loans(sim: Backend) -> None:
    s, c = await connect_pair(sim, fresh_path())
    with sim.share(sim.domid, 2, writable=False) as pool:
        pool.mapping.view()[:3] = b"abc"
        async with c:
            await c.send(encode_hello(1, 8192, pool.refs))
            bulk = await open_bulk(s, buffers=0)
            async with bulk:
                await c.send(encode_loan(0, 0, 3))
                async with await bulk.receive() as view:
                    assert bytes(view) == b"abc"
                    pool.mapping.view()[:3] = b"xyz"  # the lender can rewrite it meanwhile
                    assert bytes(view) == b"xyz"
                await c.send(encode_loan(0, 8190, 3))  # past the end of the buffer
                with anyio.fail_after(10), pytest.raises(RemoteProtocolError, match="8190"):
                    await bulk.receive()
                with pytest.raises(RemoteProtocolError):  # stays broken
                    await bulk.receive()


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(lambda: encode_release(1), id="release-never-loaned"),
        pytest.param(lambda: encode_release(0) + encode_release(0), id="double-release"),
        pytest.param(lambda: encode_release(9), id="release-out-of-range"),
        pytest.param(lambda: b"\x07\x00\x00\x00" * 4, id="unknown-frame"),
    ],
)
async def test_hostile_releases_break_our_waiting_loan(sim: Backend, frames: Any) -> None:
    s, c = await connect_pair(sim, fresh_path())
    async with c:
        await c.send(encode_hello(0, 0, []))
        async with await open_bulk(s, buffers=2, buffer_size=4096) as bulk:
            async with bulk.loan() as buf:
                await bulk.send(buf)  # buffer 0 is the peer's
            await c.send(frames())
            with anyio.fail_after(10), pytest.raises(RemoteProtocolError):
                async with bulk.loan(), bulk.loan():  # the second loan must wait: reads
                    pass


# -- other processes, killed mid-loan -----------------------------------------------------------


class Peer:
    def __init__(self, proc: Process) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self.out = BufferedByteReceiveStream(proc.stdout)

    async def line(self, timeout: float = 30) -> str:
        with anyio.fail_after(timeout):
            return (await self.out.receive_until(b"\n", 1 << 16)).decode()


@pytest.fixture
async def spawn(sim: Backend, anyio_backend: str) -> AsyncIterator[Any]:
    """``await spawn(mode, path, *args)`` starts a _bulk_peer.py client in domain 5."""
    procs: list[Process] = []
    env = dict(
        os.environ,
        GNTIPC_BACKEND="sim",
        GNTIPC_SIM_DOMID=str(PEER_DOMID),
        GNTIPC_TEST_LOOP=anyio_backend,
    )
    src = str(Path(__file__).parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))

    async def start(mode: str, path: str, *args: object) -> Peer:
        argv = [sys.executable, PEER_SCRIPT, mode, str(sim.domid), path, *map(str, args)]
        proc = await anyio.open_process(argv, env=env, stderr=None)
        procs.append(proc)
        return Peer(proc)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        with anyio.move_on_after(10, shield=True):
            await proc.wait()
        await proc.aclose()


async def test_from_another_process(sim: Backend, spawn: Any) -> None:
    path = fresh_path()
    size = 64 * 1024
    async with await gntipc.listen(PEER_DOMID, path, backend=sim) as listener:
        peer = await spawn("send", path, 40, 3, size)
        stream = await listener.accept()
    async with await open_bulk(stream, buffers=0) as bulk:
        assert await peer.line() == "ready"
        k = 0
        with anyio.fail_after(30):
            while True:
                try:
                    async with await bulk.receive() as view:
                        assert len(view) == size - k
                        assert view[0] == view[-1] == k % 251
                        k += 1
                except anyio.EndOfStream:
                    break
        assert k == 40
        assert await peer.line() == "sent 40"
    with anyio.fail_after(30):
        assert await peer.proc.wait() == 0


async def test_kill_9_of_the_lender_mid_loan(sim: Backend, spawn: Any) -> None:
    """The lender dies while we hold its buffers: our views stay readable (the pages stay
    mapped until we unmap them), receive() reports the crash, and the close frees every
    page (the leak check after the test)."""
    path = fresh_path()
    async with await gntipc.listen(PEER_DOMID, path, backend=sim) as listener:
        peer = await spawn("lend", path, 3, 8192)
        stream = await listener.accept()
    async with await open_bulk(stream, buffers=0) as bulk:
        assert await peer.line() == "ready"
        assert await peer.line() == "lent"
        held = [await bulk.receive() for _ in range(3)]
        peer.proc.send_signal(signal.SIGKILL)
        await peer.proc.wait()
        for item in held:
            assert bytes(item.view) == b"\xab" * 8192
        with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):
            await bulk.receive()
        for item in held:
            item.release()  # never fails: the RELEASE just goes nowhere
    assert open_pages(sim) == []


async def test_kill_9_of_a_holder_breaks_our_waiting_loan(sim: Backend, spawn: Any) -> None:
    path = fresh_path()
    async with await gntipc.listen(PEER_DOMID, path, backend=sim) as listener:
        peer = await spawn("hold", path)
        stream = await listener.accept()
    async with await open_bulk(stream, buffers=2, buffer_size=4096) as bulk:
        assert await peer.line() == "ready"
        for _ in range(2):
            async with bulk.loan() as buf:
                await bulk.send(buf)
        assert await peer.line() == "holding 1"
        assert await peer.line() == "holding 2"

        async def kill_soon() -> None:
            await anyio.sleep(0.2)
            peer.proc.send_signal(signal.SIGKILL)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_soon)
                with pytest.raises(anyio.BrokenResourceError):
                    async with bulk.loan():  # waits: both buffers are held
                        pass
    assert open_pages(sim) == []


# -- the synchronous twin ------------------------------------------------------------------


def sync_pair(
    backend: Backend, a: dict[str, Any], b: dict[str, Any]
) -> tuple[SyncBulkChannel, SyncBulkChannel]:
    """Two sync bulk channels over a loopback Vchan pair, opened in two threads."""
    path = fresh_path()
    server = gntipc.Vchan.server(backend, backend.domid, path)
    client = gntipc.Vchan.client(backend, backend.domid, path, timeout=10)
    got: dict[str, Any] = {}

    def one(name: str, vchan: gntipc.Vchan, kw: dict[str, Any]) -> None:
        try:
            got[name] = open_bulk_sync(vchan, timeout=10, **kw)
        except BaseException as exc:
            got[name] = exc

    threads = [
        threading.Thread(target=one, args=("a", server, a)),
        threading.Thread(target=one, args=("b", client, b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for v in got.values():
        if isinstance(v, BaseException):
            for ch in got.values():
                if isinstance(ch, SyncBulkChannel):
                    ch.close()
            server.close()
            client.close()
            raise v
    return got["a"], got["b"]


def test_sync_loans_between_threads(sim: Backend) -> None:
    a, b = sync_pair(sim, {"buffers": 2, "buffer_size": 8192}, {"buffers": 0})
    with a, b:
        received: list[bytes] = []

        def take() -> None:
            while True:
                try:
                    with b.receive(timeout=10) as view:
                        received.append(bytes(view))
                except anyio.EndOfStream:
                    return

        t = threading.Thread(target=take)
        t.start()
        for k in range(20):
            with a.loan(100 + k, timeout=10) as buf:
                buf[:] = bytes([k]) * len(buf)
                a.send(buf)
        a.send_eof()
        t.join(30)
        assert received == [bytes([k]) * (100 + k) for k in range(20)]
    assert open_pages(sim) == []


def test_sync_timeouts(sim: Backend) -> None:
    a, b = sync_pair(sim, {"buffers": 1, "buffer_size": 4096}, {"buffers": 0})
    with a, b:
        with pytest.raises(TimeoutError):
            b.receive(timeout=0.1)  # nothing lent yet
        with a.loan() as buf:
            a.send(buf)
        item = b.receive(timeout=10)
        with pytest.raises(TimeoutError), a.loan(timeout=0.1):
            pass  # the only buffer is held
        item.release()
        with a.loan(timeout=10):  # back after the release
            pass
        with pytest.raises(TypeError):  # the async form is the async channel's
            anyio.run(a.loan().__aenter__)


async def test_our_pool_is_granted_read_only(sim: Backend) -> None:
    """The peer can map our pool only read-only: it cannot scribble on our buffers."""
    s, c = await connect_pair(sim, fresh_path())
    async with c:
        await c.send(encode_hello(0, 0, []))
        async with await open_bulk(s, buffers=1, buffer_size=8192):
            with anyio.fail_after(10):
                head = await c.receive_exactly(HELLO_SIZE + 8)
            refs = list(struct.unpack_from("<2I", head, HELLO_SIZE))
            with pytest.raises(XenError) as info:
                sim.map(sim.domid, refs, writable=True)
            assert info.value.errno == errno.EACCES
            with sim.map(sim.domid, refs, writable=False) as pages:
                assert pages.mapping.view().readonly


async def test_open_times_out_when_the_peer_does_not_open(sim: Backend) -> None:
    """A peer that never opens the bulk layer: TimeoutError, the stream closed, our pool
    ungranted (the leak check); a cancelled open cleans up the same way."""
    s, c = await connect_pair(sim, fresh_path())
    async with c:
        with pytest.raises(TimeoutError):
            await open_bulk(s, buffers=2, buffer_size=4096, timeout=0.3)
        assert s.closed
    assert open_pages(sim) == []
    s, c = await connect_pair(sim, fresh_path())
    async with c:
        with anyio.move_on_after(0.3) as scope:
            await open_bulk(s, buffers=2, buffer_size=4096)
        assert scope.cancelled_caught and s.closed
    assert open_pages(sim) == []


# -- typed messages with attachments (BulkQueue) ------------------------------------------


def queues(type: Any = Meta) -> Any:
    """An ``opener`` for :func:`open_pair`: bulk queues of ``type``."""

    async def opener(stream: gntipc.VchanStream, **kw: Any) -> BulkQueue[Any]:
        return await open_bulk_queue(stream, type, **kw)

    return opener


async def test_queue_messages_with_attachments_both_ways(backend: Backend) -> None:
    a, b = await open_pair(
        backend,
        {"buffers": 2, "buffer_size": 8192},
        {"buffers": 1, "buffer_size": 4096},
        opener=queues(),
    )
    async with a, b:
        replies: list[tuple[Meta, bytes | None]] = []

        async def put_a() -> None:
            for k in range(12):
                if k % 3 == 2:
                    await a.put(Meta(k, 0))  # no attachment
                    continue
                n = 8192 - 300 * k
                async with a.loan() as buf:
                    buf[:n] = pattern(k, n)[:n]
                    await a.put(Meta(k, n), attachment=buf[:n])
                    with pytest.raises(ValueError):
                        buf[0]  # sent: our view of it is released
            await a.send_eof()

        async def echo_b() -> None:
            async for message, attachment in b:
                if attachment is None:
                    assert message == Meta(message.k, 0)
                    await b.put(Meta(message.k, -1))
                    continue
                async with attachment as view:
                    assert view.readonly and len(view) == message.n
                    assert bytes(view) == pattern(message.k, message.n)[: message.n]
                    crc = zlib.crc32(view)
                async with b.loan(4) as buf:  # b's only buffer: comes back every time
                    buf[:] = crc.to_bytes(4, "little")
                    await b.put(Meta(message.k, 4, crc), attachment=buf)
            await b.send_eof()

        async def get_a() -> None:
            while True:
                try:
                    got = await a.get()
                except anyio.EndOfStream:
                    return
                async with got as (message, view):
                    replies.append((message, None if view is None else bytes(view)))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(put_a)
                tg.start_soon(echo_b)
                tg.start_soon(get_a)
        expected: list[tuple[Meta, bytes | None]] = []
        for k in range(12):
            if k % 3 == 2:
                expected.append((Meta(k, -1), None))
                continue
            crc = zlib.crc32(pattern(k, 8192 - 300 * k)[: 8192 - 300 * k])
            expected.append((Meta(k, 4, crc), crc.to_bytes(4, "little")))
        assert replies == expected
        # every buffer came back (b released a's before each reply: a has read those
        # releases; b reads a's last ones now)
        assert a.channel.free_buffers == 2
        with anyio.fail_after(10):
            while b.channel.free_buffers < 1:
                b.channel._read_available()
                await anyio.sleep(0.01)


async def test_queue_from_another_process(sim: Backend, spawn: Any) -> None:
    path = fresh_path()
    async with await gntipc.listen(PEER_DOMID, path, backend=sim) as listener:
        peer = await spawn("echo", path, 2, 65536)
        stream = await listener.accept()
    sizes = [65536 - 1000 * k if k % 5 else 0 for k in range(40)]  # 0: no attachment
    async with await open_bulk_queue(stream, Meta, buffers=3, buffer_size=65536) as queue:
        assert await peer.line() == "ready"
        got: list[Meta] = []

        async def put_all() -> None:
            for k, n in enumerate(sizes):
                if not n:
                    await queue.put(Meta(k, 0))
                    continue
                async with queue.loan(n) as buf:
                    buf[:] = pattern(k, n)[:n]
                    await queue.put(Meta(k, n), attachment=buf)
            await queue.send_eof()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(put_all)
                async for message, attachment in queue:
                    k = message.k
                    if not sizes[k]:
                        assert attachment is None and message.n == -1
                    else:
                        assert attachment is not None
                        with attachment as view:
                            sent = pattern(k, sizes[k])[: sizes[k]]
                            assert message == Meta(k, sizes[k], zlib.crc32(sent))
                            assert bytes(view) == sent[::-1]  # in the peer's pages
                    got.append(message)
        assert [m.k for m in got] == list(range(40))
        assert await peer.line() == "echoed 32"
        assert queue.channel.free_buffers == 3
    with anyio.fail_after(30):
        assert await peer.proc.wait() == 0


async def test_queue_cancelled_get_loses_nothing(pairs: Any) -> None:
    a, b = await pairs({"buffers": 2, "buffer_size": 4096}, {"buffers": 0}, opener=queues())

    async def put_soon() -> None:
        await anyio.sleep(0.2)  # the first gets are cancelled waiting
        for k in range(20):
            async with a.loan(10) as buf:
                buf[:] = bytes([k]) * 10
                await a.put(Meta(k, 10), attachment=buf)

    # gets cancelled at any point, while the messages arrive: a get either returns a
    # message or is cancelled having taken nothing
    got: list[tuple[int, bytes]] = []
    cancelled = 0
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(put_soon)
            while len(got) < 20:
                with anyio.move_on_after(0.001) as scope:
                    item = await b.get()
                if scope.cancelled_caught:
                    cancelled += 1
                    continue
                async with item as (message, view):
                    assert view is not None
                    got.append((message.k, bytes(view)))
    assert cancelled > 0
    assert got == [(k, bytes([k]) * 10) for k in range(20)]


async def test_queue_cancelled_put_sends_nothing(pairs: Any) -> None:
    """A put waits for room for the whole message (and the descriptors' room); cancelled,
    it sent nothing and the loan is still ours."""
    a, b = await pairs({"buffers": 2, "buffer_size": 4096}, {"buffers": 0}, opener=queues(bytes))
    big = bytes(30000)
    await a.put(big)
    await a.put(big)  # the ring (64 KiB) now holds two: a third does not fit
    with anyio.move_on_after(0.3) as scope:
        async with a.loan(5) as buf:
            buf[:] = b"hello"
            await a.put(big, attachment=buf)
            pytest.fail("a third message fit the ring")
    assert scope.cancelled_caught
    assert a.channel.free_buffers == 2  # the loan went back: it was never sent
    for _ in range(2):
        with anyio.fail_after(10):
            message, view = await b.get()
        assert message == big and view is None
    with pytest.raises(anyio.WouldBlock):
        b.get_nowait()  # the cancelled put sent nothing
    async with a.loan(5) as buf:
        buf[:] = b"again"
        await a.put(b"x", attachment=buf)
    with anyio.fail_after(10):
        async with await b.get() as (message, view):
            assert (message, bytes(view)) == (b"x", b"again")


async def test_queue_message_too_large_sends_nothing(pairs: Any) -> None:
    a, b = await pairs({"buffers": 1, "buffer_size": 4096}, {"buffers": 0}, opener=queues(bytes))
    # the 64 KiB ring holds less than max_message_size (its peer's ring, 64 KiB) beside
    # the descriptors: a put is bounded by the smaller
    assert a.max_message_size == 65536 and a.max_put_size < 65536 - MESSAGE_HEAD_SIZE
    async with a.loan(1) as buf:
        with pytest.raises(MessageTooLarge, match="encodes to"):
            await a.put(bytes(a.max_put_size), attachment=buf)
        assert a.channel.free_buffers == 0  # still ours, not sent
        await a.put(bytes(a.max_put_size - 5), attachment=buf)  # 5: the bin 32 header
    with anyio.fail_after(10):
        message, view = await b.get()
    assert len(message) == a.max_put_size - 5 and view is not None
    view.release()
    with pytest.raises(TypeError):
        await a.put(object())  # type: ignore[arg-type]


async def test_queue_close_with_a_view_outstanding(sim: Backend) -> None:
    a, b = await open_pair(
        sim, {"buffers": 2, "buffer_size": 4096}, {"buffers": 0}, opener=queues(bytes)
    )
    for word in (b"hello", b"world"):
        async with a.loan(5) as buf:
            buf[:] = word
            await a.put(word, attachment=buf)
    with anyio.fail_after(10):
        first = await b.get()
        second = await b.get()
    assert first.attachment is not None and second.attachment is not None
    kept = first.attachment.view[1:3]  # derived: keeps the mapping
    await a.aclose()
    with pytest.raises(MappingInUse):
        await b.aclose()
    with pytest.raises(ValueError):
        second.attachment.view[0]  # released by the close
    second.release()  # after the close: nothing to do
    assert bytes(kept) == b"el"
    del kept
    b.close()
    assert b.closed and open_pages(sim) == []
    with pytest.raises(anyio.ClosedResourceError):
        await b.get()


async def test_queue_refuses_a_plain_bulk_peer(sim: Backend) -> None:
    s, c = await connect_pair(sim, fresh_path())
    plain: list[BulkChannel] = []

    async def open_plain() -> None:
        plain.append(await open_bulk(c, buffers=0, timeout=10))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_plain)
            with pytest.raises(RemoteProtocolError, match="plain bulk channel"):
                await open_bulk_queue(s, Meta, buffers=0, timeout=10)
    assert s.closed
    async with plain[0] as bulk:  # the plain side opened; it sees the stream end
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await bulk.receive()


async def test_queue_hostile_peer(sim: Backend) -> None:
    """A raw peer: an undecodable message is skipped and its attachment released (the
    RELEASE arrives); then a lying attachment breaks the channel."""
    s, c = await connect_pair(sim, fresh_path())
    with sim.share(sim.domid, 2, writable=False) as pool:
        pool.mapping.view()[:3] = b"abc"
        async with c:
            await c.send(encode_hello(1, 8192, pool.refs, version=2))
            queue = await open_bulk_queue(s, Meta, buffers=0, max_message_size=100)
            async with queue:
                with anyio.fail_after(10):
                    await c.receive_exactly(HELLO_SIZE)  # its HELLO (version 2, no pool)
                await c.send(encode_message(b"\xc1", (0, 0, 3)))  # not MessagePack
                with anyio.fail_after(10), pytest.raises(MalformedMessage):
                    await queue.get()
                with anyio.fail_after(10):
                    assert await c.receive_exactly(8) == encode_release(0)
                payload = msgspec.msgpack.encode(Meta(1, 3))
                await c.send(encode_message(payload, (0, 0, 3)))
                with anyio.fail_after(10):
                    async with await queue.get() as (message, view):
                        assert (message, bytes(view)) == (Meta(1, 3), b"abc")
                await c.send(encode_message(payload, (0, 8190, 3)))  # past the buffer
                with anyio.fail_after(10), pytest.raises(RemoteProtocolError, match="8190"):
                    await queue.get()
                with pytest.raises(RemoteProtocolError):  # stays broken
                    await queue.get()


async def test_queue_hostile_message_over_the_limit(sim: Backend) -> None:
    s, c = await connect_pair(sim, fresh_path())
    async with c:
        await c.send(encode_hello(0, 0, [], version=2))
        async with await open_bulk_queue(s, bytes, buffers=0, max_message_size=100) as queue:
            # only the head of a 10 MB message: refused at once, nothing more is read
            await c.send(encode_message(b"")[:16] + (10**7).to_bytes(4, "little"))
            with anyio.fail_after(10), pytest.raises(RemoteProtocolError, match="10000000"):
                await queue.get()


async def test_queue_memory_bounded_while_a_loan_waits(pairs: Any) -> None:
    """A loan waiting for a free buffer reads the peer's frames to find its release, but
    keeps at most max(max_message_size, 64 KiB) + 64 KiB of messages: then it waits for
    gets."""
    a, b = await pairs({"buffers": 1, "buffer_size": 4096}, {"buffers": 0}, opener=queues(bytes))
    async with a.loan(1) as buf:
        await a.put(b"", attachment=buf)
    with anyio.fail_after(10):
        held = await b.get()  # a's only buffer, held
    bound = max(a.max_message_size, 65536) + 65536
    count = 400

    async def flood() -> None:
        for k in range(count):
            await b.put(k.to_bytes(2, "little") * 500)  # 1000 bytes each
        assert held.attachment is not None
        held.attachment.release()  # the RELEASE comes after every message

    lent = anyio.Event()

    async def lend() -> None:
        async with a.loan():
            lent.set()

    got: list[int] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            tg.start_soon(lend)
            while a.channel._message_bytes < 65536:
                await anyio.sleep(0.01)
            for _ in range(50):  # the flood goes on; the waiting loan reads only so much
                assert a.channel._message_bytes <= bound
                assert not lent.is_set()
                await anyio.sleep(0.01)
            while len(got) < count:
                message, _ = await a.get()
                got.append(int.from_bytes(message[:2], "little"))
                assert a.channel._message_bytes <= bound
            await lent.wait()
    assert got == list(range(count))


def test_sync_queue_between_threads(sim: Backend) -> None:
    path = fresh_path()
    server = gntipc.Vchan.server(sim, sim.domid, path)
    client = gntipc.Vchan.client(sim, sim.domid, path, timeout=10)
    got: dict[str, Any] = {}

    def one(name: str, vchan: gntipc.Vchan, kw: dict[str, Any]) -> None:
        try:
            got[name] = open_bulk_queue_sync(vchan, Meta, timeout=10, **kw)
        except BaseException as exc:
            got[name] = exc

    threads = [
        threading.Thread(target=one, args=("a", server, {"buffers": 2, "buffer_size": 8192})),
        threading.Thread(target=one, args=("b", client, {"buffers": 0})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    a, b = got["a"], got["b"]
    assert isinstance(a, SyncBulkQueue) and isinstance(b, SyncBulkQueue)
    with a, b:
        received: list[tuple[Meta, bytes | None]] = []

        def take() -> None:
            for message, attachment in b:
                if attachment is None:
                    received.append((message, None))
                    continue
                with attachment as view:
                    received.append((message, bytes(view)))

        t = threading.Thread(target=take)
        t.start()
        for k in range(20):
            if k % 4 == 3:
                a.put(Meta(k, 0), timeout=10)
                continue
            with a.loan(100 + k, timeout=10) as buf:
                buf[:] = bytes([k]) * len(buf)
                a.put(Meta(k, len(buf)), attachment=buf, timeout=10)
        a.send_eof()
        t.join(30)
        assert received == [
            (Meta(k, 0), None) if k % 4 == 3 else (Meta(k, 100 + k), bytes([k]) * (100 + k))
            for k in range(20)
        ]
        with pytest.raises(TimeoutError):
            a.get(timeout=0.1)  # b sends nothing
    assert open_pages(sim) == []
