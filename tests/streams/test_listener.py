"""Listener and connect: timeouts, waiting for a server, stale keys, closing, ownership,
one listener per path, and what a client is told when the path serves another domain."""

from __future__ import annotations

import errno
import os
import time

import anyio
import pytest
from anyio import ClosedResourceError
from conftest import fresh_path

import gntipc
from gntipc._keys import LISTENER_NODE, PathHolder
from gntipc.backends import Backend

pytestmark = pytest.mark.anyio


async def connect_into(out: list[gntipc.VchanStream], backend: Backend, path: str) -> None:
    """Connect to ``path`` (10 s at most) and append the stream to ``out``."""
    out.append(await gntipc.connect(backend.domid, path, timeout=10, backend=backend))


async def test_connect_times_out(backend: Backend) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no gntipc server"):
        await gntipc.connect(backend.domid, fresh_path(), timeout=0.3, backend=backend)
    assert 0.25 <= time.monotonic() - start < 2


async def test_connect_waits_for_a_late_server(backend: Backend) -> None:
    path = fresh_path()
    streams: list[gntipc.VchanStream] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(connect_into, streams, backend, path)
            await anyio.sleep(0.2)  # the client is waiting on a store watch by now
            assert not streams
            async with (
                await gntipc.listen(backend.domid, path, backend=backend) as listener,
                await listener.accept() as srv,
            ):
                while not streams:
                    await anyio.sleep(0.01)
                async with streams[0] as cli:
                    await cli.send(b"late")
                    assert await srv.receive() == b"late"


async def test_one_client_per_accept_and_stale_keys_are_retried(backend: Backend) -> None:
    # After the first accept, its keys are withdrawn (it was taken): a second client
    # waits for the fresh keys of the next accept.
    path = fresh_path()
    async with await gntipc.listen(backend.domid, path, backend=backend) as listener:
        async with anyio.create_task_group() as tg:
            first: list[gntipc.VchanStream] = []

            async def accept_into(out: list[gntipc.VchanStream]) -> None:
                out.append(await listener.accept())

            tg.start_soon(accept_into, first)
            c1 = await gntipc.connect(backend.domid, path, timeout=10, backend=backend)
        second_client: list[gntipc.VchanStream] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(connect_into, second_client, backend, path)
                await anyio.sleep(0.2)
                assert not second_client  # stale keys: not connected
                second: list[gntipc.VchanStream] = []
                await accept_into(second)
        async with first[0] as s1, second[0] as s2, c1, second_client[0] as c2:
            await c1.send(b"one")
            await c2.send(b"two")
            assert await s1.receive() == b"one"
            assert await s2.receive() == b"two"


async def test_keys_are_withdrawn_once_taken_and_the_next_client_waits(
    backend: Backend,
) -> None:
    """A client that comes while the listener offers the path again waits for the new
    offer, even after the previous client left: the taken channel's keys are gone by
    the time accept() returns, so it never finds them with their port given back (a
    libxenvchan client would bind it and take a page about to close: reset)."""
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(backend.domid, path)
    async with await gntipc.listen(backend.domid, path, backend=backend) as listener:
        first: list[gntipc.VchanStream] = []

        async def accept_into(out: list[gntipc.VchanStream]) -> None:
            out.append(await listener.accept())

        async with anyio.create_task_group() as tg:
            tg.start_soon(accept_into, first)
            c1 = await gntipc.connect(backend.domid, path, timeout=10, backend=backend)
        async with first[0] as s1:
            async with c1:
                assert not backend.store.exists(f"{full}/ring-ref")
                assert not backend.store.exists(f"{full}/event-channel")
                await c1.send(b"first")
                assert await s1.receive() == b"first"
            # The first client left, its stream is still open: the next one waits.
            later: list[gntipc.VchanStream] = []
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(connect_into, later, backend, path)
                    await anyio.sleep(0.2)
                    assert not later
                    second: list[gntipc.VchanStream] = []
                    await accept_into(second)
            async with second[0] as s2, later[0] as c2:
                await c2.send(b"second")
                assert await s2.receive() == b"second"


async def test_closing_the_listener_stops_accept_and_withdraws_keys(backend: Backend) -> None:
    path = fresh_path()
    listener = await gntipc.listen(backend.domid, path, backend=backend)
    full = gntipc.Vchan.resolve_path(backend.domid, path)
    errors: list[BaseException] = []

    async def accept() -> None:
        try:
            await listener.accept()
        except ClosedResourceError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept)
            while not backend.store.exists(f"{full}/ring-ref"):
                await anyio.sleep(0.01)  # published by a worker thread (fail_after above)
            await listener.aclose()
    assert len(errors) == 1
    assert not backend.store.exists(f"{full}/ring-ref")
    await listener.aclose()  # idempotent
    with pytest.raises(ClosedResourceError):
        await listener.accept()


async def test_cancelled_accept_withdraws_keys(backend: Backend) -> None:
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(backend.domid, path)
    async with await gntipc.listen(backend.domid, path, backend=backend) as listener:
        with anyio.move_on_after(0.1):
            await listener.accept()
        assert not backend.store.exists(f"{full}/ring-ref")


async def test_backend_by_name_is_owned_and_closed(backend_name: str) -> None:
    # listen()/connect() open the backend themselves; the last user closes it (the
    # autouse leak check fails the test otherwise).
    path = fresh_path()
    accepted: list[gntipc.VchanStream] = []
    async with (
        await gntipc.listen(0, path, backend=backend_name) as listener,
        anyio.create_task_group() as tg,
    ):

        async def accept() -> None:
            accepted.append(await listener.accept())

        tg.start_soon(accept)
        cli = await gntipc.connect(0, path, timeout=10, backend=backend_name)
    # the listener is closed; the stream it accepted still works (its backend stays open)
    async with accepted[0] as srv, cli:
        await cli.send(b"still here")
        assert await srv.receive() == b"still here"


async def test_bad_arguments(backend: Backend) -> None:
    with pytest.raises(ValueError):
        await gntipc.listen(backend.domid, fresh_path(), read_size=1000, backend=backend)
    with pytest.raises(ValueError):
        await gntipc.listen(backend.domid, fresh_path(), write_size=2 << 20, backend=backend)
    with pytest.raises(gntipc.LocalProtocolError):
        await gntipc.connect(backend.domid, fresh_path(), timeout=-1, backend=backend)
    with pytest.raises(TypeError):
        await gntipc.connect(backend.domid, fresh_path(), backend=42)  # type: ignore[arg-type]


# ------------------------------------------------------------ one listener per path ---
async def test_a_second_listener_on_a_path_is_refused_at_once(backend: Backend) -> None:
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(backend.domid, path)
    async with await gntipc.listen(5, path, backend=backend):
        with pytest.raises(OSError) as refused:
            await gntipc.listen(6, path, backend=backend)
        assert refused.value.errno == errno.EADDRINUSE
        message = str(refused.value)
        assert f"{full} is already served for domain 5" in message
        assert f"this process ({os.getpid()})" in message
        # An absolute path naming the same node is the same path.
        with pytest.raises(OSError, match="already served"):
            await gntipc.listen(5, full, backend=backend)
    # Closed: the path is free again, and the claim left nothing behind.
    assert not backend.store.exists(full)
    async with await gntipc.listen(6, path, backend=backend):
        pass


async def test_a_listener_made_without_listen_claims_at_its_first_accept(
    backend: Backend,
) -> None:
    path = fresh_path()
    async with await gntipc.listen(5, path, backend=backend):
        listener = gntipc.Listener(backend, 5, path)
        async with listener:
            with pytest.raises(OSError, match="already served for domain 5"):
                await listener.accept()


@pytest.mark.parametrize("how", ["gone", "pid reused"])
async def test_the_claim_of_a_dead_listener_is_taken_over(backend: Backend, how: str) -> None:
    # What a crashed listener leaves: its claim names a process that no longer runs (or
    # a pid that now belongs to another process, which started later).
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(backend.domid, path)
    pid, start = (2**22 + 1, 1) if how == "gone" else (os.getpid(), 1)
    backend.store.write(
        f"{full}/{LISTENER_NODE}", PathHolder(backend.domid, 5, pid, start).encode()
    )
    async with await gntipc.listen(5, path, backend=backend) as listener:
        holder = PathHolder.decode(backend.store.read(f"{full}/{LISTENER_NODE}"))
        assert holder is not None and holder.pid == os.getpid() and holder.start != 1
        assert listener.path == full
    assert not backend.store.exists(full)


async def test_a_client_of_another_domain_is_told_whom_the_path_serves(
    backend: Backend,
) -> None:
    if backend.name != "sim":
        pytest.skip("plays a second domain in this process: needs the simulator")
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(backend.domid, path)
    with gntipc.get_backend("sim", domid=backend.domid + 1) as us:
        async with (
            await gntipc.listen(backend.domid + 3, path, backend=backend) as listener,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(listener.accept)  # keys published, for the other domain
            with pytest.raises(TimeoutError) as timed_out:
                await gntipc.connect(backend.domid, path, timeout=0.3, backend=us)
            tg.cancel_scope.cancel()
        assert str(timed_out.value) == (
            f"no gntipc server at {full} within 0.3 s: it is served for domain"
            f" {backend.domid + 3}, not for us (domain {backend.domid + 1})"
        )
        # Nothing there: the message stays as it was.
        with pytest.raises(TimeoutError) as nothing:
            await gntipc.connect(backend.domid, path, timeout=0.1, backend=us)
        assert str(nothing.value) == f"no gntipc server at {full} within 0.1 s"
