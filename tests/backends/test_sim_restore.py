"""restore_domain: the sim's ``xl save`` + ``xl restore`` (or migration) of a domain.

The domain dies for its peers (ports unbound, grants revoked, home removed,
``@releaseDomain``), the VM comes back under a new domid with the same identity
(``/local/domain/<domid>/vm``), and its processes live on: their backends learn the new
domid, their blocked waits wake and report the break, and they connect again.  Peers are
real processes (:meth:`gntipc.testing.SimRuntime.spawn`).
"""

from __future__ import annotations

import errno
import hashlib
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream

import gntipc
from gntipc import LocalProtocolError, XenError
from gntipc.backends import Pages, PortState
from gntipc.backends.sim import SimBackend, kill_domain, restore_domain
from gntipc.resume import ResumableListener
from gntipc.testing import SimRuntime, connect_pair
from gntipc.vm import vm_of_domain

pytestmark = pytest.mark.anyio

RESUME_TESTS = str(Path(__file__).parent.parent / "streams" / "test_resume.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def vm_key(backend: SimBackend, domid: int) -> bytes:
    """The toolstack's ``vm`` key of ``domid``, as ``backend`` reads it."""
    return backend.store.read(f"/local/domain/{domid}/vm")


def peek(pages: Pages, n: int) -> bytes:
    with pages.mapping.view() as v:
        return bytes(v[:n])


def poke(pages: Pages, offset: int, data: bytes) -> None:
    with pages.mapping.view() as v:
        v[offset : offset + len(data)] = data


# -- the peer processes (module level: SimRuntime.spawn pickles them) --------------------


async def restored_client(server: int, path: str, again: str) -> None:
    """Domain 2: connect to ``server`` at ``path``, send, then wait in receive until the
    restore breaks the channel; then connect again (same backend, new domid) at
    ``again`` and echo one message.  Prints what it sees."""
    with SimBackend() as backend:
        print(f"vm {vm_key(backend, backend.domid).decode()} domid {backend.domid}", flush=True)
        async with await gntipc.connect(server, path, backend=backend, timeout=30) as stream:
            await stream.send(b"hello")
            try:
                with anyio.fail_after(30):
                    await stream.receive()  # blocked here when the domain is restored
                print("not broken", flush=True)
            except anyio.BrokenResourceError:
                print(f"broken; domid {backend.domid}", flush=True)
        print(f"vm {vm_key(backend, backend.domid).decode()} domid {backend.domid}", flush=True)
        with SimBackend() as second:  # $GNTIPC_SIM_DOMID still says 2: we are the new one
            print(f"second backend domid {second.domid}", flush=True)
        async with await gntipc.connect(server, again, backend=backend, timeout=30) as stream:
            await stream.send((await stream.receive()).upper())
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
    print("done", flush=True)


async def accept_unless(listener: gntipc.Listener, event: anyio.Event) -> ByteStream | None:
    """The next client of ``listener``, or None once ``event`` is set."""
    got: list[ByteStream] = []
    async with anyio.create_task_group() as tg:

        async def take() -> None:
            got.append(await listener.accept())
            tg.cancel_scope.cancel()

        async def give_up() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(take)
        tg.start_soon(give_up)
    return got[0] if got else None


def hold_a_mapping(server: int, ref: int) -> None:
    """Domain 2: map page ``ref`` of ``server``; call the backend every 0.3 s (slowly:
    a peer's writes may come first) until it has a new domid, then print what the page
    says."""
    with SimBackend() as backend, backend.map(server, [ref]) as pages:
        print("mapped", flush=True)
        deadline = time.monotonic() + 30
        while backend.domid == 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        print(peek(pages, 5).decode(), flush=True)


def wait_for_a_new_domid(then_idle: bool = False) -> None:
    """A process of domain 2 that prints its domid, then its next one (within 30 s);
    with ``then_idle``, it then closes its backend and idles (it is still part of the
    VM: killing the VM's domain kills it)."""
    with SimBackend() as backend:
        print(backend.domid, flush=True)
        deadline = time.monotonic() + 30
        while backend.domid == 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        print(backend.domid, flush=True)
    if then_idle:
        print("idle", flush=True)
        time.sleep(60)


# -- the tests ----------------------------------------------------------------------------


async def test_restore_breaks_the_vchan_and_the_client_comes_back_as_the_same_vm(
    gntipc_sim: SimRuntime,
) -> None:
    dom0 = gntipc_sim.backend(0)
    server = gntipc_sim.backend(1)
    path, again = gntipc_sim.new_path(), gntipc_sim.new_path()
    released = dom0.store.watch("@releaseDomain", "released")
    introduced = dom0.store.watch("@introduceDomain", "introduced")
    try:
        async with await gntipc.listen(2, path, backend=server) as listener:
            client = gntipc_sim.spawn(restored_client, 1, path, again, domid=2)
            first = await client.receive_line()
            vm = vm_key(dom0, 2).decode()
            assert first == f"vm {vm} domid 2"
            assert vm.startswith("/vm/")
            with anyio.fail_after(30):
                stream = await listener.accept()
            async with stream:
                assert await stream.receive() == b"hello"
                released.read_events()
                introduced.read_events()
                # Both sides are blocked in receive when the domain is saved and restored.
                new = restore_domain(2, runtime_dir=gntipc_sim.path)
                assert new not in (0, 1, 2)
                with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):
                    await stream.receive()
            assert await client.receive_line(10) == f"broken; domid {new}"
        assert await client.receive_line() == f"vm {vm} domid {new}"  # the same VM
        assert await client.receive_line() == f"second backend domid {new}"
        # For dom0, domain 2 died and domain `new` is the VM.
        assert not dom0.store.exists("/local/domain/2")
        assert vm_key(dom0, new).decode() == vm
        # gntipc.vm reads it so on sim as on Xen: dom0 may, another domU may not.
        assert vm_of_domain(dom0.store, new) == vm.removeprefix("/vm/")
        assert vm_of_domain(dom0.store, 2) is None
        assert vm_of_domain(server.store, new) is None
        assert dom0.store.read(f"/local/domain/{new}/name") == b"sim-2"
        assert dom0.store.read(f"/local/domain/{new}/domid") == str(new).encode()
        assert ("@releaseDomain", "released") in released.read_events()
        assert ("@introduceDomain", "introduced") in introduced.read_events()
        # The client process lived on: it connects again from its new domain.
        async with await gntipc.listen(new, again, backend=server) as listener:
            with anyio.fail_after(30):
                stream = await listener.accept()
            async with stream:
                assert stream.vchan.peer == new
                await stream.send(b"again")
                assert await stream.receive() == b"AGAIN"
        assert await client.receive_line() == "done"
        assert await client.wait() == 0
        # Nobody plays domain 2 any more (nor `new`, now that the client exited).
        for gone in (2, new):
            with pytest.raises(XenError) as info:
                restore_domain(gone, runtime_dir=gntipc_sim.path)
            assert info.value.errno == errno.ESRCH
    finally:
        released.close()
        introduced.close()


async def test_resumable_stream_survives_a_restore_of_the_client_domain(
    gntipc_sim: SimRuntime,
) -> None:
    """Server in dom0 (where such servers run: it may read the client VM's identity),
    client in domain 2, restored in the middle of the stream: every byte once."""
    # (A backend open all along, as a server's: when the last one closes, the sim's
    # state goes with its runtime directory, the VM's new domid too.)
    dom0 = gntipc_sim.backend(0)
    path = gntipc_sim.new_path()
    n = 1_000_000
    peer: dict[str, int] = {"domid": 2}
    moved = [anyio.Event()]
    offered = anyio.Event()

    class FollowTheClient:
        """An acceptor that listens for whatever domid the client has now (the test
        knows it: restore_domain returns it)."""

        async def accept(self) -> ByteStream:
            while True:
                async with await gntipc.listen(peer["domid"], path, backend=dom0) as listener:
                    offered.set()
                    stream = await accept_unless(listener, moved[-1])
                if stream is not None:
                    return stream

        async def aclose(self) -> None:
            pass

    async with ResumableListener(FollowTheClient(), give_up_after=60) as rl:
        with anyio.fail_after(30):
            await offered.wait()
        # tests/streams/test_resume.py's producer: a ResumableStream.client whose
        # transports come from plain gntipc.connect (a backend opened from the
        # environment each time: after the restore, the new domain's).
        producer = gntipc_sim.spawn(
            [sys.executable, RESUME_TESTS, "vchan-producer", path, str(n), "11"], domid=2
        )
        h = hashlib.sha256()
        total = 0
        restored = False
        with anyio.fail_after(120):  # (room for a loaded machine)
            async with await rl.accept() as s:
                while True:
                    try:
                        data = await s.receive()
                    except anyio.EndOfStream:
                        break
                    h.update(data)
                    total += len(data)
                    if not restored and total > n // 3:
                        peer["domid"] = restore_domain(2, runtime_dir=gntipc_sim.path)
                        moved[-1].set()
                        moved.append(anyio.Event())
                        restored = True
                await s.send_eof()
                line = await producer.receive_line()
                stats = s.statistics()
        assert await producer.wait() == 0
    assert total == n
    assert h.hexdigest() == hashlib.sha256(random.Random(11).randbytes(n)).hexdigest()
    assert stats.resumes >= 1
    assert line.startswith("done") and int(line.split()[1]) >= 1


@pytest.mark.parametrize("restored", ["server", "client"])
async def test_restoring_a_domain_breaks_both_ends_in_this_process(
    gntipc_sim: SimRuntime, restored: str
) -> None:
    """Both ends in this process wait in receive, neither has anything to send, when
    the server's (or the client's) domain is restored: the restored side does not wait
    forever on a channel that died with its old domain, and its peer sees the death."""
    backends = {"server": gntipc_sim.backend(1), "client": gntipc_sim.backend(2)}
    server, client = await connect_pair(
        backends["server"], gntipc_sim.new_path(), client_backend=backends["client"]
    )
    async with server, client:
        broken: list[str] = []

        async def receive(name: str, stream: gntipc.VchanStream) -> None:
            with pytest.raises(anyio.BrokenResourceError):
                await stream.receive()
            broken.append(name)

        old = backends[restored].domid
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive, "server", server)
                tg.start_soon(receive, "client", client)
                await anyio.wait_all_tasks_blocked()  # both wait for data
                new = restore_domain(old, runtime_dir=gntipc_sim.path)
        assert sorted(broken) == ["client", "server"]
        assert backends[restored].domid == new


def test_the_backends_of_this_process_follow_the_restore(gntipc_sim: SimRuntime) -> None:
    peer = gntipc_sim.backend(1)
    me = gntipc_sim.backend(4)
    vm = vm_key(me, 4)
    assert me.store.get_perms("vm")[0].domid == 0  # written by the toolstack: dom0's
    with pytest.raises(XenError) as info:
        me.store.write("vm", b"/vm/forged")  # a guest cannot change its identity
    assert info.value.errno == errno.EACCES
    shared = me.share(1, 2)
    mapped = peer.map(4, shared.refs)
    port = me.alloc_unbound(1)
    peer_port = peer.bind_interdomain(4, port.port)
    poke(shared, 0, b"state")
    watch = me.store.watch("/local/domain/1/data", "t")
    try:
        for sender, receiver in ((peer_port, port), (port, peer_port)):  # both connected
            sender.notify()
            r, _, _ = select.select([receiver.fileno()], [], [], 10)
            assert r and receiver.pending()
            receiver.unmask()
        assert watch.read_events() == [("/local/domain/1/data", "t")]
        new = restore_domain(4, 9, gntipc_sim.path)
        assert new == 9
        assert me.domid == 9 and me.store.domid == 9
        assert me.store.read("domid") == b"9"  # relative paths: the new home
        assert me.store.read("vm") == vm and me.store.read("name") == b"sim-4"
        # Our port is closed: a notify reaches nobody; its waiter is woken, sees one
        # event, then an unbound port.
        with pytest.raises(XenError) as info:
            port.notify()
        assert info.value.errno == errno.ENOTCONN
        assert not peer_port.pending()
        r, _, _ = select.select([port.fileno()], [], [], 10)
        assert r
        assert port.pending()
        port.unmask()
        assert not port.pending()
        assert port.status() == PortState.UNBOUND
        with pytest.raises(XenError) as info:
            port.notify()
        assert info.value.errno == errno.ENOTCONN
        # The peer's: silently unbound, as when a domain dies.
        assert peer_port.status() == PortState.UNBOUND
        with pytest.raises(XenError) as info:
            peer_port.notify()
        assert info.value.errno == errno.ENOTCONN
        # Our grants are revoked: the peer's mapping stays (stale), a new map fails.
        # Our pages stay mapped here, detached: what we write no longer reaches the
        # peer (its mapping stays with the dead domain), nor what it writes us.
        assert peek(shared, 5) == b"state"
        poke(shared, 0, b"after")
        assert peek(mapped, 5) == b"state"
        poke(mapped, 5, b"!!")
        assert peek(shared, 7) == b"after\0\0"
        with pytest.raises(XenError) as info:
            peer.map(4, shared.refs)
        assert info.value.errno == errno.EINVAL
        # Our watches fired (woken for the save, then registered again).
        r, _, _ = select.select([watch.fileno()], [], [], 10)
        assert r and set(watch.read_events()) == {("/local/domain/1/data", "t")}
        # The new domain works as any: grants, ports.
        with me.share(1, 1) as fresh, peer.map(9, fresh.refs):
            pass
        with me.alloc_unbound(1) as p2, peer.bind_interdomain(9, p2.port) as q2:
            q2.notify()
            r, _, _ = select.select([p2.fileno()], [], [], 10)
            assert r and p2.pending()
        # This process is part of domain 9 now: a backend for domain 4 plays 9.
        with SimBackend(4, runtime_dir=gntipc_sim.path) as again:
            assert again.domid == 9
        with pytest.raises(XenError) as info:
            restore_domain(4, runtime_dir=gntipc_sim.path)
        assert info.value.errno == errno.ESRCH
        # Restored again, and back under its first domid: the identity stays, and a
        # backend for any domid the VM had plays the one it has now.
        assert restore_domain(9, runtime_dir=gntipc_sim.path) == 10
        assert me.domid == 10 and me.store.read("vm") == vm
        assert restore_domain(10, 4, gntipc_sim.path) == 4
        assert me.domid == 4 and me.store.read("vm") == vm
        for played in (4, 9, 10):
            with SimBackend(played, runtime_dir=gntipc_sim.path) as again:
                assert again.domid == 4
    finally:
        for resource in (watch, peer_port, port, mapped, shared):
            resource.close()


def test_the_restored_domain_keeps_its_memory_as_it_was_when_saved(
    gntipc_sim: SimRuntime,
) -> None:
    """What a peer writes once restore_domain has returned does not reach the restored
    domain's processes, even one that calls its backend only now and then: the save
    waited for it to detach its mappings (on Xen they stay with the dead domain)."""
    server = gntipc_sim.backend(1)
    with server.share(2, 1) as pages:
        poke(pages, 0, b"saved")
        proc = gntipc_sim.spawn(hold_a_mapping, 1, pages.refs[0], domid=2)
        assert proc.readline() == "mapped"
        restore_domain(2, runtime_dir=gntipc_sim.path)
        poke(pages, 0, b"later")  # the peer goes on with its page
        assert proc.readline() == "saved"
        assert proc.join() == 0


def test_bad_restores_are_clear_errors(gntipc_sim: SimRuntime) -> None:
    gntipc_sim.backend(0)
    gntipc_sim.backend(3)
    gntipc_sim.backend(5)
    with pytest.raises(LocalProtocolError, match="domain 0"):
        restore_domain(0, runtime_dir=gntipc_sim.path)
    for bad in (0, 3):
        with pytest.raises(LocalProtocolError, match="new domid"):
            restore_domain(3, bad, gntipc_sim.path)
    with pytest.raises(XenError) as info:
        restore_domain(3, 5, gntipc_sim.path)  # domain 5 exists
    assert info.value.errno == errno.EEXIST
    with pytest.raises(XenError) as info:
        restore_domain(7, runtime_dir=gntipc_sim.path)  # nobody plays it
    assert info.value.errno == errno.ESRCH
    with pytest.raises(ValueError):
        restore_domain(3, 0x8000, gntipc_sim.path)


def test_identity_given_derived_and_checked(
    gntipc_sim: SimRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = "0b5e0c2a-1d5e-4f4a-9c3b-2f6b8e9d7a10"
    with SimBackend(6, runtime_dir=gntipc_sim.path, vm_uuid=vm.upper(), vm_name="db") as b:
        assert vm_key(b, 6) == f"/vm/{vm}".encode()
        assert b.store.read("name") == b"db"
        with pytest.raises(ValueError, match="exists already with vm"):
            SimBackend(6, runtime_dir=gntipc_sim.path, vm_uuid=str(vm).replace("0b", "0c"))
        monkeypatch.setenv("GNTIPC_SIM_DOMID", "7")
        monkeypatch.setenv("GNTIPC_SIM_VM_NAME", "web")
        with SimBackend(runtime_dir=gntipc_sim.path) as web:
            assert web.store.read("name") == b"web"
            derived = vm_key(web, 7)
        monkeypatch.setenv("GNTIPC_SIM_VM_UUID", vm.replace("0b", "0d"))
        with SimBackend(runtime_dir=gntipc_sim.path) as web_too:  # (inherited: ignored)
            assert vm_key(web_too, 7) == derived
        monkeypatch.setenv("GNTIPC_SIM_VM_UUID", "not-a-uuid")
        with pytest.raises(ValueError, match="GNTIPC_SIM_VM_UUID"):
            SimBackend(runtime_dir=gntipc_sim.path)
    dom0 = gntipc_sim.backend(0)
    assert dom0.store.read("name") == b"Domain-0"
    # Derived UUIDs differ between domains (and are the same for a domid in any run).
    assert derived != vm_key(dom0, 0) and derived != f"/vm/{vm}".encode()


def test_the_command(gntipc_sim: SimRuntime) -> None:
    gntipc_sim.backend(0)
    proc = gntipc_sim.spawn(wait_for_a_new_domid, domid=2)
    assert proc.readline() == "2"
    command = [sys.executable, "-c", "from gntipc.cli import main; raise SystemExit(main())"]
    done = subprocess.run(
        [*command, "sim-restore-domain", "2", "--as", "12"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "domain 2: restored as domain 12\n")
    assert proc.readline() == "12"
    assert proc.join() == 0
    again = subprocess.run(
        [*command, "sim-restore-domain", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 1
    assert "no process plays domain 2" in again.stderr


def test_killing_the_new_domain_kills_the_processes_it_took_over(
    gntipc_sim: SimRuntime,
) -> None:
    gntipc_sim.backend(0)
    proc = gntipc_sim.spawn(wait_for_a_new_domid, True, domid=2)
    assert proc.readline() == "2"
    new = restore_domain(2, runtime_dir=gntipc_sim.path)
    assert proc.readline() == str(new)
    assert proc.readline() == "idle"  # no backend open any more
    assert kill_domain(new, gntipc_sim.path) == [proc.pid]
    assert proc.join() == -9
