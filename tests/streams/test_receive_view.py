"""VchanStream.receive_view: received bytes handed out in place, a view of the ring
itself, consumed when released (#22: receive views for stream users)."""

from __future__ import annotations

import os

import anyio
import pytest
from conftest import PairFactory

import gntipc
from gntipc.streams import READ_AHEAD

pytestmark = pytest.mark.anyio


async def _send_then_eof(tx: gntipc.VchanStream, data: bytes) -> None:
    await tx.send(data)
    await tx.send_eof()


async def _collect_views(rx: gntipc.VchanStream, sizes: list[int]) -> bytes:
    got = bytearray()
    i = 0
    while True:
        max_bytes = sizes[i % len(sizes)]
        i += 1
        try:
            view = await rx.receive_view(max_bytes)
        except anyio.EndOfStream:
            return bytes(got)
        with view as data:
            assert data.readonly
            assert 1 <= len(data) <= max_bytes
            got += data
        with pytest.raises(ValueError):
            data.tobytes()  # released with the block


# In-page rings of both orders (the server reads the 1 KiB one at 1024 in the control
# page, the client the 2 KiB one at 2048) and rings of their own pages.
@pytest.mark.parametrize(("srv_read", "cli_read"), [(1024, 2048), (65536, 4096)])
async def test_views_carry_the_stream_both_ways(
    make_pair: PairFactory, srv_read: int, cli_read: int
) -> None:
    srv, cli = await make_pair(read_size=srv_read, write_size=cli_read)
    up, down = os.urandom(3 * srv_read + 13), os.urandom(3 * cli_read + 7)
    sizes = [1, 7, 1000, 65536]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_send_then_eof, cli, up)
            tg.start_soon(_send_then_eof, srv, down)
            got_up = await _collect_views(srv, sizes)
            got_down = await _collect_views(cli, sizes)
    assert got_up == up
    assert got_down == down
    assert srv.statistics().bytes_received == len(up)


async def test_partial_release_leaves_the_rest(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    await cli.send(b"hello world")
    with anyio.fail_after(10):
        view = await srv.receive_view()
    assert bytes(view.data) == b"hello world"
    view.release(5)
    view.release()  # idempotent: the first release counted
    assert await srv.receive() == b" world"


async def test_one_view_at_a_time(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    await cli.send(b"abcdef")
    with anyio.fail_after(10):
        view = await srv.receive_view(4)
    assert len(view) == 4
    with pytest.raises(anyio.BusyResourceError):
        await srv.receive()
    with pytest.raises(anyio.BusyResourceError):
        await srv.receive_view()
    with pytest.raises(ValueError):
        view.release(5)  # more than it shows: nothing consumed, the view stays
    assert bytes(view.data) == b"abcd"
    view.release()
    with pytest.raises(ValueError):
        view.data  # noqa: B018
    assert await srv.receive() == b"ef"


async def test_release_gives_the_writer_room(make_pair: PairFactory) -> None:
    srv, cli = await make_pair(read_size=1024, write_size=1024)
    data = os.urandom(3000)
    done = anyio.Event()

    async def send() -> None:
        await cli.send(data)
        done.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            got = bytearray()
            view = await srv.receive_view()
            held = bytes(view.data)
            for _ in range(20):  # the writer fills the ring and waits: the view holds it
                await anyio.sleep(0)
            assert not done.is_set()
            view.release()
            got += held
            while len(got) < len(data):
                async with await srv.receive_view() as part:
                    got += part
            await done.wait()
    assert bytes(got) == data


async def test_read_ahead_comes_first(make_pair: PairFactory) -> None:
    srv, cli = await make_pair(read_size=65536)
    data = os.urandom(READ_AHEAD + 100)
    await cli.send(data)
    with anyio.fail_after(10):
        first = await srv.receive(7)  # takes READ_AHEAD bytes out of the ring, hands out 7
        async with await srv.receive_view() as ahead:
            assert bytes(ahead) == data[7:READ_AHEAD]  # the rest of the read-ahead
        rest = b""
        while len(first) + READ_AHEAD - 7 + len(rest) < len(data):
            async with await srv.receive_view() as part:
                rest += part
    assert first + data[7:READ_AHEAD] + rest == data


async def test_cancelled_receive_view_consumes_nothing(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    with anyio.move_on_after(0.05):
        await srv.receive_view()
    await cli.send(b"after")
    with anyio.fail_after(10):
        async with await srv.receive_view() as data:
            assert bytes(data) == b"after"


async def test_a_view_alive_at_close_keeps_the_pages_mapped(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    await cli.send(b"still here")
    with anyio.fail_after(10):
        view = await srv.receive_view()
    kept = view.data[:5]  # a view derived from it
    view.release()
    endpoint = srv.vchan.endpoint
    with pytest.raises(gntipc.MappingInUse):
        await srv.aclose()
    assert bytes(kept) == b"still"  # the ring is still mapped: no use after unmap
    kept.release()
    endpoint.close()  # now the pages go


async def test_close_ends_a_view_not_released(make_pair: PairFactory) -> None:
    srv, cli = await make_pair()
    await cli.send(b"data")
    with anyio.fail_after(10):
        view = await srv.receive_view()
    await srv.aclose()  # the view is ended, so the pages can go
    with pytest.raises(ValueError):
        view.data  # noqa: B018
    view.release()  # nothing left to do
