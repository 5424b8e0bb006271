"""Listeners across domid changes: gntipc.listen_vm, a listener for one VM (its UUID in
XenStore) that follows the VM to its next domid (the domain destroyed, the VM back under
another id, as after a restore, a migration or a reboot) and serves no other domain; a
plain listener whose own domain is restored.  Clients are real processes, each
playing a domain of the test's simulated hypervisor; this process plays domain 0."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import uuid
from collections.abc import Iterator

import anyio
import pytest

import gntipc
from gntipc.backends.sim import SimBackend
from gntipc.testing import SimRuntime
from gntipc.vm import domain_of_vm, vm_of_domain

pytestmark = pytest.mark.anyio

VM = str(uuid.UUID(int=0x5E45))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def client(server: int, path: str, vm: str, message: bytes, hold: bool) -> None:
    """A domain that is VM ``vm`` (the toolstack's ``vm`` key of its home says so):
    prints "ready", connects, sends ``message``, prints the reply; with ``hold`` it
    waits (for its domain's death) instead of connecting."""
    with SimBackend(int(os.environ["GNTIPC_SIM_DOMID"]), vm_uuid=vm) as backend:
        print("ready", flush=True)
        if hold:
            await anyio.sleep(3600)  # killed with its domain
        async with await gntipc.connect(server, path, timeout=30, backend=backend) as stream:
            await stream.send(message)
            print((await stream.receive()).decode(), flush=True)


@contextlib.contextmanager
def playing(vm: str) -> Iterator[None]:
    """Processes spawned in this block are VM ``vm`` (the sim's ``GNTIPC_SIM_VM_UUID``:
    the toolstack's ``vm`` key of their domain's home)."""
    os.environ["GNTIPC_SIM_VM_UUID"] = vm
    try:
        yield
    finally:
        del os.environ["GNTIPC_SIM_VM_UUID"]


async def resumable_producer(server: int, path: str, nbytes: int) -> None:
    """Send ``nbytes`` pseudo-random bytes over a resumable stream, which connects again
    (to domain ``server``) each time its vchan breaks; print "sent" and the resumes."""

    async def dial() -> anyio.abc.ByteStream:
        return await gntipc.connect(server, path, timeout=10)

    data = random.Random(nbytes).randbytes(nbytes)
    # (A small window paces us by the consumer: the restores come mid-stream.)
    async with gntipc.ResumableStream.client(
        dial, window_bytes=1 << 17, give_up_after=90
    ) as stream:
        for i in range(0, nbytes, 8192):
            await stream.send(data[i : i + 8192])
        await stream.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        print("sent", stream.statistics().resumes, os.environ["GNTIPC_SIM_DOMID"], flush=True)


async def echo_one(listener: gntipc.VmListener) -> int:
    """Accept one client, echo one message back upper-cased; the client's domid."""
    async with await listener.accept() as stream:
        await stream.send((await stream.receive()).upper())
        return stream.vchan.peer


async def test_identity_lookups(gntipc_sim: SimRuntime) -> None:
    b0 = gntipc_sim.backend(0)
    with SimBackend(3, runtime_dir=gntipc_sim.path, vm_uuid=VM):
        assert vm_of_domain(b0.store, 3) == VM
        assert vm_of_domain(b0.store, 4) is None  # no such domain
        assert domain_of_vm(b0.store, VM) == 3
        assert domain_of_vm(b0.store, f"/vm/{VM.upper()}") == 3  # the store's form, any case
        assert domain_of_vm(b0.store, str(uuid.UUID(int=1))) is None
        with SimBackend(4, runtime_dir=gntipc_sim.path, vm_uuid=VM):
            # (a migration: two domains are the VM for a while)
            assert domain_of_vm(b0.store, VM) == 4
            assert domain_of_vm(b0.store, VM, prefer=3) == 3
            b0.store.write("/local/domain/4/vm", b"/vm/\xff")  # (dom0: the toolstack)
            assert vm_of_domain(b0.store, 4) is None  # garbage is nobody
    for bad in ("", "/vm/", "a/b"):
        with pytest.raises(ValueError, match="not a VM identity"):
            domain_of_vm(b0.store, bad)


async def test_follows_the_vm_to_its_next_domid(gntipc_sim: SimRuntime) -> None:
    path = gntipc_sim.new_path()
    async with await gntipc.listen_vm(VM, path) as listener:
        first = gntipc_sim.spawn(client, 0, path, VM, b"one", False, domid=5)
        with anyio.fail_after(30):
            assert await echo_one(listener) == 5
        assert first.readline(30) == "ready"
        assert first.readline(30) == "ONE"
        assert first.join() == 0
        assert listener.domid == 5
        # The VM's domain is destroyed and the VM comes back as domain 7.
        gntipc_sim.kill_domain(5)
        again = gntipc_sim.spawn(client, 0, path, VM, b"two", False, domid=7)
        with anyio.fail_after(30):
            assert await echo_one(listener) == 7
        assert again.readline(30) == "ready"
        assert again.readline(30) == "TWO"
        assert again.join() == 0
        assert listener.domid == 7


async def test_a_waiting_accept_moves_with_the_vm(gntipc_sim: SimRuntime) -> None:
    # The accept is offering the path to domain 5 when domain 5 dies; the VM then shows
    # up as domain 8, whose client the same accept call takes.
    path = gntipc_sim.new_path()
    async with await gntipc.listen_vm(VM, path) as listener:
        idle = gntipc_sim.spawn(client, 0, path, VM, b"", True, domid=5)
        assert idle.readline(30) == "ready"
        async with anyio.create_task_group() as tg:
            got: list[int] = []

            async def serve() -> None:
                got.append(await echo_one(listener))

            tg.start_soon(serve)
            with anyio.fail_after(30):
                while listener.domid != 5:  # offering to domain 5 now
                    await anyio.sleep(0.02)
            gntipc_sim.kill_domain(5)
            moved = gntipc_sim.spawn(client, 0, path, VM, b"three", False, domid=8)
            with anyio.fail_after(30):
                while not got:
                    await anyio.sleep(0.02)
        assert got == [8]
        assert moved.readline(30) == "ready"
        assert moved.readline(30) == "THREE"
        assert moved.join() == 0


async def test_serves_no_other_vm(gntipc_sim: SimRuntime) -> None:
    path = gntipc_sim.new_path()
    other = str(uuid.UUID(int=0xBAD))
    async with await gntipc.listen_vm(VM, path) as listener:
        stranger = gntipc_sim.spawn(client, 0, path, other, b"let me in", False, domid=6)
        with anyio.move_on_after(3):
            await listener.accept()
            pytest.fail("accepted a domain that is not the VM")
        assert listener.domid is None  # the VM is not running
        stranger.kill()


async def test_close_ends_a_waiting_accept(gntipc_sim: SimRuntime) -> None:
    listener = await gntipc.listen_vm(VM, gntipc_sim.new_path())
    ended: list[BaseException] = []

    async def accept() -> None:
        try:
            await listener.accept()
        except anyio.ClosedResourceError as exc:
            ended.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept)
            await anyio.sleep(0.2)  # waiting for the VM to run
            await listener.aclose()
    assert len(ended) == 1
    await listener.aclose()  # idempotent
    with pytest.raises(anyio.ClosedResourceError):
        await listener.accept()


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not a VM identity"):
        await gntipc.listen_vm("", "data/x")
    with pytest.raises(TypeError, match="vm must be a str"):
        await gntipc.listen_vm(5, "data/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="read_size"):
        await gntipc.listen_vm(VM, "data/x", read_size=1000)  # (not a power of two)


async def test_a_session_survives_restores_of_its_vm(gntipc_sim: SimRuntime) -> None:
    # The client's VM is restored twice under new domids while it streams (its process
    # runs on, its vchan breaks each time): the resumable session, served by a
    # ResumableListener over listen_vm, goes on; every byte arrives once, in order.
    path = gntipc_sim.new_path()
    nbytes = 6 << 20
    got = bytearray()
    async with gntipc.ResumableListener(
        await gntipc.listen_vm(VM, path),
        give_up_after=90,  # (room for a loaded machine)
    ) as sessions:
        with playing(VM):
            producer = gntipc_sim.spawn(resumable_producer, 0, path, nbytes, domid=5)
        domid = 5
        with anyio.fail_after(200):
            async with await sessions.accept() as stream:
                for restore_at in (nbytes // 4, nbytes // 2, None):
                    while restore_at is None or len(got) < restore_at:
                        try:
                            got += await stream.receive()
                        except anyio.EndOfStream:
                            break
                    if restore_at is not None:
                        domid = gntipc_sim.restore_domain(domid)
                await stream.send_eof()
                resumes = stream.statistics().resumes
    assert (
        hashlib.sha256(got).digest()
        == hashlib.sha256(random.Random(nbytes).randbytes(nbytes)).digest()
    )
    assert resumes == 2
    assert producer.readline(30) == f"sent 2 {5}"  # (its environment still says 5)
    assert producer.join() == 0


async def echo_server(client: int, path: str) -> None:
    """Listen for domain ``client`` at ``path`` (relative to our home) and echo."""

    async def echo(stream: gntipc.VchanStream) -> None:
        async for chunk in stream:
            await stream.send(chunk)

    async with await gntipc.listen(client, path) as listener:
        print("listening", flush=True)
        await listener.serve(echo)


async def test_a_listener_follows_its_domain_restored_under_a_new_domid(
    gntipc_sim: SimRuntime,
) -> None:
    # The server's domain is saved and restored (or migrated): its process runs on as
    # another domid, whose home its relative path now names; clients find it there.
    path = "data/echo"
    server = gntipc_sim.spawn(echo_server, 0, path, domid=5)
    assert server.readline(30) == "listening"
    with anyio.fail_after(30):
        async with await gntipc.connect(5, path, timeout=20) as stream:
            await stream.send(b"before")
            assert await stream.receive() == b"before"
        new = gntipc_sim.restore_domain(5)
        async with await gntipc.connect(new, path, timeout=20) as stream:
            await stream.send(b"after")
            assert await stream.receive() == b"after"
