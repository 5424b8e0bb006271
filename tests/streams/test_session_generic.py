"""Sessions over streams that are not vchans: loopback TCP and TLS (asyncio and trio).

A service speaks the same multiplexed protocol to a VM over a vchan and to another host
over TCP; here both sessions live in this process, over a real loopback connection."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest
from _pairs import stream_pair
from anyio import EndOfStream
from conftest import check_send_receive

import gntipc
from gntipc import LocalProtocolError, MessageQueue, RemoteProtocolError, Session

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["tcp", "tls"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def sessions(kind: str, **kwargs: int) -> AsyncIterator[tuple[Session, Session]]:
    """(responder, initiator) sessions over one connection of ``kind``."""
    async with (
        stream_pair(kind) as (a, b),
        Session(a, is_initiator=False, **kwargs) as s,
        Session(b, is_initiator=True, **kwargs) as c,
    ):
        yield s, c


async def drain(stream: anyio.abc.ByteReceiveStream) -> bytes:
    out = bytearray()
    with contextlib.suppress(EndOfStream):
        while True:
            out += await stream.receive()
    return bytes(out)


async def test_is_initiator_is_required_off_a_vchan(kind: str) -> None:
    async with stream_pair(kind) as (a, _b):
        with pytest.raises(LocalProtocolError, match="is_initiator is required"):
            Session(a)


async def test_open_accept_both_ways(kind: str) -> None:
    async with sessions(kind) as (s, c):
        with anyio.fail_after(10):
            a = await c.open_stream()
            b = await s.accept_stream()
            async with a, b:
                assert (a.stream_id, b.stream_id) == (1, 1)
                await check_send_receive(a, b)
            d = await s.open_stream()
            e = await c.accept_stream()
            async with d, e:
                assert (d.stream_id, e.stream_id) == (2, 2)
                await check_send_receive(d, e)


async def test_many_streams_with_flow_control(kind: str) -> None:
    # Each stream carries more than the window, concurrently: credit is granted back
    # as the reader consumes, and the data arrives intact on every stream.
    async with sessions(kind, window=16 * 1024) as (s, c):

        async def client(i: int) -> None:
            data = random.Random(i).randbytes(100_000 + 1000 * i)
            async with await c.open_stream() as st:
                await st.send(i.to_bytes(4, "little"))
                await st.send(data)
                await st.send_eof()
                assert await drain(st) == hashlib.sha256(data).digest()

        async def server() -> None:
            for _ in range(12):
                st = await s.accept_stream()
                tg.start_soon(serve, st)

        async def serve(st: gntipc.SessionStream) -> None:
            async with st:
                body = await drain(st)
                i = int.from_bytes(body[:4], "little")
                assert body[4:] == random.Random(i).randbytes(100_000 + 1000 * i)
                await st.send(hashlib.sha256(body[4:]).digest())

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(server)
                async with anyio.create_task_group() as clients:
                    for i in range(12):
                        clients.start_soon(client, i)


async def test_closing_the_session_ends_the_peer(kind: str) -> None:
    async with stream_pair(kind) as (a, b), Session(a, is_initiator=False) as s:
        with anyio.fail_after(10):
            async with Session(b, is_initiator=True) as c:
                st = await c.open_stream()
                peer = await s.accept_stream()
                await st.send(b"last words")
                await st.send_eof()
                await st.aclose()
            async with peer:
                assert await drain(peer) == b"last words"
            with pytest.raises(EndOfStream):
                await s.accept_stream()
            assert isinstance(s.error, EndOfStream)


async def test_typed_queue_over_a_session_stream(kind: str) -> None:
    # The layers compose: typed messages over one logical stream of a session over TCP.
    class Ping(msgspec.Struct):
        n: int

    async with sessions(kind) as (s, c):
        with anyio.fail_after(10):
            tx = MessageQueue(await c.open_stream(), Ping)
            rx = MessageQueue(await s.accept_stream(), Ping)
            async with tx, rx:
                await tx.put_many([Ping(i) for i in range(1000)])
                got: list[Ping] = []
                while len(got) < 1000:
                    got += await rx.get_many()
                assert got == [Ping(i) for i in range(1000)]


async def test_hostile_bytes_from_a_socket_peer(kind: str) -> None:
    async with stream_pair(kind) as (a, raw), Session(a, is_initiator=False) as s:
        await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a session peer
        with anyio.fail_after(10):
            with pytest.raises(RemoteProtocolError):
                await s.accept_stream()
        assert isinstance(s.error, RemoteProtocolError)


async def test_fast_paths_are_declared_not_guessed(kind: str) -> None:
    from gntipc._fastpath import held_writes, ring_stream

    class Ring:  # declares the ring fast path (as a wrapper of a VchanStream may)
        gntipc_fast_path = "ring"

    class Forwarding:  # forwards every attribute lookup, the declaration too
        def __getattr__(self, name: str) -> object:
            return getattr(Ring(), name)

    ring = Ring()
    assert ring_stream(ring) is ring and held_writes(ring) is ring
    assert ring_stream(Forwarding()) is None and held_writes(Forwarding()) is None
    async with sessions(kind) as (s, c):
        with anyio.fail_after(10):
            a = await c.open_stream()
            b = await s.accept_stream()
            async with a, b:
                # a session stream gathers writes but is no ring; TCP/TLS neither
                assert held_writes(a) is a and ring_stream(a) is None
    async with stream_pair(kind) as (x, _y):
        assert held_writes(x) is None and ring_stream(x) is None
        queue = MessageQueue(x, bytes)
        with pytest.raises(NotImplementedError, match="put_nowait needs"):
            queue.put_nowait(b"no ring")
