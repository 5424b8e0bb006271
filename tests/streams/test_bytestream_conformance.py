"""One conformance suite for byte streams: the :class:`anyio.abc.ByteStream` contract the
typed layers rely on, run over every stream type gntipc makes (a vchan, a session
stream over a vchan) and, as the reference, over anyio's own TCP, unix and TLS streams
(TLS cannot half-close, and reports its own close as broken: those tests skip it)."""

from __future__ import annotations

import os

import anyio
import anyio.abc
import pytest
from _pairs import KINDS, stream_pair
from anyio import ClosedResourceError, EndOfStream

pytestmark = pytest.mark.anyio

SIZE = 300_000


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def receive_all(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await stream.receive()
    return bytes(got)


async def test_bulk_both_ways_at_once(kind: str) -> None:
    a_data, b_data = os.urandom(SIZE), os.urandom(SIZE // 3)
    async with stream_pair(kind) as (a, b):
        received: dict[str, bytes] = {}

        async def side(name: str, me: anyio.abc.ByteStream, data: bytes, n: int) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(me.send, data)
                received[name] = await receive_all(me, n)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(side, "a", a, a_data, len(b_data))
                tg.start_soon(side, "b", b, b_data, len(a_data))
        assert received == {"a": b_data, "b": a_data}


@pytest.mark.parametrize("max_bytes", [1, 7, 4096, 1 << 20])
async def test_receive_returns_at_most_max_bytes(kind: str, max_bytes: int) -> None:
    data = os.urandom(20_000)
    async with stream_pair(kind) as (a, b):
        got = bytearray()
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, data)
                while len(got) < len(data):
                    chunk = await b.receive(max_bytes)
                    assert 1 <= len(chunk) <= max_bytes
                    got += chunk
        assert got == data


async def test_send_eof_half_closes_one_direction(kind: str) -> None:
    if kind == "tls":
        pytest.skip("TLS has no half-close (anyio's TLSStream.send_eof is not supported)")
    async with stream_pair(kind) as (a, b):
        with anyio.fail_after(30):
            await a.send(b"last")
            await a.send_eof()
            assert await receive_all(b, 4) == b"last"
            with pytest.raises(EndOfStream):
                await b.receive()
            # the other direction still works
            await b.send(b"reply")
            assert await receive_all(a, 5) == b"reply"


async def test_peer_close_is_end_of_stream_after_the_data(kind: str) -> None:
    async with stream_pair(kind) as (a, b):
        with anyio.fail_after(30):
            await a.send(b"everything before the close")
            await a.aclose()
            assert await receive_all(b, 27) == b"everything before the close"
            with pytest.raises(EndOfStream):
                await b.receive()


async def test_use_after_own_close_is_closed_resource(kind: str) -> None:
    if kind == "tls":
        pytest.skip("anyio's TLSStream reports BrokenResourceError after its own close")
    async with stream_pair(kind) as (a, _b):
        await a.aclose()
        with pytest.raises(ClosedResourceError):
            await a.send(b"x")
        with pytest.raises(ClosedResourceError):
            await a.receive()
