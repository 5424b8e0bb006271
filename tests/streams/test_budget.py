"""A listener that expects many clients sizes their rings to the domain's page budget
(``max_clients``): every client up to ``max_clients`` gets a channel, however small,
instead of ENOSPC once the first few took the budget (on sim, whose budget we set)."""

from __future__ import annotations

import contextlib
import errno
import os

import anyio
import pytest
from conftest import fresh_path

import gntipc
from gntipc import _process
from gntipc.protocol import channel_pages, fit_ring_sizes

pytestmark = pytest.mark.anyio

KIB64 = 65536


def test_fit_ring_sizes_halves_the_larger_ring_down_to_one_page() -> None:
    assert channel_pages(KIB64, KIB64) == 33
    assert channel_pages(1024, 2048) == channel_pages(1024, 1024) == 1
    assert fit_ring_sizes(KIB64, KIB64, 33) == (KIB64, KIB64)
    assert fit_ring_sizes(KIB64, KIB64, 32) == (32768, KIB64)
    assert fit_ring_sizes(KIB64, 1024, 5) == (16384, 1024)
    for pages in range(0, 40):
        read, write = fit_ring_sizes(KIB64, KIB64, pages)
        assert channel_pages(read, write) <= max(pages, 1)
    assert fit_ring_sizes(KIB64, KIB64, 0) == (1024, 1024)


async def _carry(
    backend: gntipc.backends.Backend, clients: int, max_clients: int | None
) -> list[gntipc.VchanStream]:
    """Connect ``clients`` clients at once to one listener; every stream (server's and
    client's) is returned open, in pairs."""
    path = fresh_path()
    streams: list[gntipc.VchanStream] = []
    async with await gntipc.listen(
        0, path, read_size=KIB64, write_size=KIB64, max_clients=max_clients, backend=backend
    ) as listener:
        try:
            with anyio.fail_after(60):
                for _ in range(clients):
                    async with anyio.create_task_group() as tg:

                        async def accept() -> None:
                            streams.append(await listener.accept())

                        tg.start_soon(accept)
                        streams.append(await gntipc.connect(0, path, backend=backend))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
    return streams


async def test_max_clients_get_a_channel_each_within_the_page_budget() -> None:
    with gntipc.get_backend("sim", domid=0, page_limit=100) as backend:
        streams = await _carry(backend, 5, max_clients=5)
        try:
            servers = [s for s in streams if s.vchan.is_server]
            sizes = [(s.vchan.read_size, s.vchan.write_size) for s in servers]
            assert sizes[0] == (KIB64, KIB64)  # room for all: the first ones get what we asked
            assert sizes[-1] < sizes[0]  # the last ones shrank to what was left
            assert sum(channel_pages(r, w) for r, w in sizes) <= 100
            # Every channel works both ways, small ones included.
            for a, b in zip(streams[0::2], streams[1::2], strict=True):
                block = bytes(range(256)) * 40  # larger than the smallest ring
                async with anyio.create_task_group() as tg:
                    tg.start_soon(a.send, block)
                    got = b""
                    while len(got) < len(block):
                        got += await b.receive()
                assert got == block
        finally:
            for s in streams:
                await s.aclose()
        # The pages of closed channels return: the budget holds 64 KiB rings again.
        again = await _carry(backend, 2, max_clients=2)
        try:
            assert {(s.vchan.read_size, s.vchan.write_size) for s in again} == {(KIB64, KIB64)}
        finally:
            for s in again:
                await s.aclose()


async def test_without_max_clients_the_budget_runs_out() -> None:
    # The same five clients, rings as asked: the fourth finds no pages left.
    with gntipc.get_backend("sim", domid=0, page_limit=100) as backend:
        with pytest.raises(BaseExceptionGroup) as info:
            await _carry(backend, 5, max_clients=None)
        # The accept of the fourth client failed, and its connect may have been told so
        # before the task group cancelled it.
        errnos = sorted(getattr(exc, "errno", None) for exc in info.value.exceptions)
        assert errnos in ([errno.ENOSPC], sorted([errno.ENOSPC, errno.ECONNREFUSED]))


async def test_pages_shared_by_others_shrink_the_rings_further() -> None:
    # Another user of the domain's budget holds 90 of its 100 pages: the listener does
    # not know, its offer of 64 KiB rings fails, and it retries smaller ones.
    with (
        gntipc.get_backend("sim", domid=0, page_limit=100) as backend,
        backend.share(0, 90),
    ):
        streams = await _carry(backend, 2, max_clients=2)
        try:
            pages = sum(
                channel_pages(s.vchan.read_size, s.vchan.write_size)
                for s in streams
                if s.vchan.is_server
            )
            assert pages <= 10
        finally:
            for s in streams:
                await s.aclose()


async def test_a_listener_out_of_pages_refuses_its_clients_at_once() -> None:
    # The domain may share 33 pages: one 64 KiB channel.  While it is carried, the
    # listener cannot offer another: a client is told so at once (not after its
    # timeout), and gets a channel again once the first one closed.
    with gntipc.get_backend("sim", domid=0, page_limit=33) as backend:
        path = fresh_path()
        async with (
            await gntipc.listen(0, path, backend=backend) as listener,
            anyio.create_task_group() as tg,
        ):

            async def keep(stream: gntipc.VchanStream) -> None:
                # Until the client closes (then serve() closes our end: its pages return).
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    await stream.receive()

            tg.start_soon(listener.serve, keep)
            first = await gntipc.connect(0, path, timeout=30, backend=backend)
            with anyio.fail_after(20):  # far less than the client's timeout
                while True:
                    try:
                        extra = await gntipc.connect(0, path, timeout=60, backend=backend)
                    except gntipc.XenError as exc:
                        refused = exc
                        break
                    await extra.aclose()  # the listener had not tried to offer yet
            assert refused.errno == errno.ECONNREFUSED
            assert "offers no channel now" in str(refused) and "grant pages" in str(refused)
            # The blocking client is told the same, well before its timeout.
            with anyio.fail_after(20), pytest.raises(gntipc.XenError) as blocking:
                await anyio.to_thread.run_sync(
                    lambda: gntipc.Vchan.client(backend, 0, path, timeout=60)
                )
            assert blocking.value.errno == errno.ECONNREFUSED
            await first.aclose()
            with anyio.fail_after(30):  # the listener's retry (SERVE_RETRY at most)
                while True:
                    try:
                        second = await gntipc.connect(0, path, timeout=60, backend=backend)
                        break
                    except gntipc.XenError:
                        await anyio.sleep(0.05)
            await second.aclose()
            tg.cancel_scope.cancel()


def test_the_refusal_of_a_dead_listener_is_not_reported() -> None:
    # A claim that says "refusing" but whose process is gone (a crash left it): its
    # clients wait for a server as usual instead of being refused by nobody.
    from gntipc._keys import LISTENER_NODE, PathHolder, refusal

    with gntipc.get_backend("sim", domid=0) as backend:
        path = "/local/domain/0/" + fresh_path()
        node = f"{path}/{LISTENER_NODE}"
        alive = PathHolder(0, 0, os.getpid(), _process.self_start(), "ENOSPC")
        backend.store.write(node, alive.encode())
        try:
            assert refusal(backend, path) is not None
            dead = PathHolder(0, 0, os.getpid(), alive.start + 1, "ENOSPC")  # pid reused
            backend.store.write(node, dead.encode())
            assert refusal(backend, path) is None
        finally:
            backend.store.rm(path)
