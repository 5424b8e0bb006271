"""gntipc.testing used directly by tests of this suite: the fixtures under anyio's plugin
(asyncio and trio) and under pytest-asyncio, processes playing domains, kills of a process
and of a domain, and the leak check."""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable

import anyio
import pytest
import sniffio

import gntipc
from gntipc import VchanAttribute, VchanStream
from gntipc.testing import ServerClient, SimProcess, SimRuntime

# -- what the processes run (module level: a child imports this module to find them) ------


async def echo_server(peer: int, path: str) -> None:
    """Accept one client, echo until it sends EOF, print how much was echoed."""
    async with await gntipc.listen(peer, path) as listener:
        print("listening", flush=True)
        async with await listener.accept() as stream:
            total = 0
            while True:
                try:
                    data = await stream.receive()
                except anyio.EndOfStream:
                    break
                total += len(data)
                await stream.send(data)
            print(f"echoed {total}", flush=True)


async def ping_client(peer: int, path: str) -> None:
    """Send 1000 pings of 1000 bytes, check each echo, then EOF; print the loop's name."""
    async with await gntipc.connect(peer, path, timeout=30) as stream:
        for i in range(1000):
            msg = bytes([i % 256]) * 1000
            await stream.send(msg)
            assert await stream.receive_exactly(len(msg)) == msg
        await stream.send_eof()
        print(sniffio.current_async_library(), flush=True)


async def talker(peer: int, path: str) -> None:
    """Connect, say hello, then keep the channel open until killed."""
    async with await gntipc.connect(peer, path, timeout=30) as stream:
        await stream.send(b"hello")
        print("sent", flush=True)
        await anyio.sleep_forever()


def print_environment() -> None:
    print(os.environ["GNTIPC_SIM_DOMID"], os.environ["GNTIPC_SIM_DIR"], flush=True)


def print_then_sleep() -> None:
    print("awake")
    time.sleep(3600)


def fail_loudly(message: str) -> None:
    raise RuntimeError(message)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def check_pair(pair: tuple[VchanStream, VchanStream]) -> None:
    server, client = pair
    assert server.extra(VchanAttribute.is_server)
    assert server.extra(VchanAttribute.peer_domid) == 1
    assert client.extra(VchanAttribute.peer_domid) == 0
    await client.send(b"ping")
    assert await server.receive() == b"ping"
    await server.send(b"pong")
    await server.send_eof()
    assert await client.receive() == b"pong"
    with pytest.raises(anyio.EndOfStream):
        await client.receive()


@pytest.mark.anyio
async def test_stream_pair_under_anyio(
    gntipc_stream_pair: tuple[VchanStream, VchanStream],
) -> None:
    await check_pair(gntipc_stream_pair)


@pytest.mark.asyncio
async def test_stream_pair_under_pytest_asyncio(
    gntipc_stream_pair: tuple[VchanStream, VchanStream],
) -> None:
    await check_pair(gntipc_stream_pair)


@pytest.mark.anyio
async def test_stream_pair_with_options(gntipc_sim: SimRuntime) -> None:
    async with gntipc_sim.stream_pair(
        server_domid=3, client_domid=4, read_size=8192, write_size=16384
    ) as (server, client):
        assert server.extra(VchanAttribute.peer_domid) == 4
        assert client.extra(VchanAttribute.peer_domid) == 3
        assert server.extra(VchanAttribute.read_size) == 8192
        assert client.extra(VchanAttribute.read_size) == 16384
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, b"x" * 20000)  # more than the ring holds
                assert await server.receive_exactly(20000) == b"x" * 20000
    assert server.closed and client.closed
    gntipc_sim.assert_cleaned_up()


# -- the environment of this process and of children -------------------------------------


def test_runtime_is_private_and_in_the_environment(gntipc_sim: SimRuntime) -> None:
    assert os.environ["GNTIPC_SIM_DIR"] == gntipc_sim.path
    assert os.environ["GNTIPC_BACKEND"] == "sim"
    assert os.environ["GNTIPC_SIM_DOMID"] == "0"
    with gntipc.get_backend() as backend:  # what code under test opens by default
        assert backend.name == "sim"
        assert backend.domid == 0
        assert backend.runtime_dir == gntipc_sim.path  # type: ignore[attr-defined]
    proc = gntipc_sim.spawn(print_environment, domid=7)
    assert proc.join() == 0
    assert proc.readline() == f"7 {gntipc_sim.path}"
    with pytest.raises(EOFError):
        proc.readline()


@pytest.mark.parametrize("gntipc_sim", [3], indirect=True)
def test_this_process_plays_another_domain(gntipc_sim: SimRuntime) -> None:
    assert os.environ["GNTIPC_SIM_DOMID"] == "3"
    with gntipc.get_backend() as backend:
        assert backend.domid == 3


def test_output_is_unbuffered(gntipc_sim: SimRuntime) -> None:
    # no flush: the line can be read while the process still runs
    proc = gntipc_sim.spawn(print_then_sleep, domid=1)
    assert proc.readline() == "awake"
    assert proc.returncode is None


def test_spawn_a_command(gntipc_sim: SimRuntime) -> None:
    code = "import os; print(os.environ['GNTIPC_SIM_DOMID']); print('partial', end='')"
    proc = gntipc_sim.spawn([sys.executable, "-c", code], domid=9)
    assert proc.join() == 0
    assert proc.readline() == "9"
    with pytest.raises(EOFError, match="partial"):
        proc.readline()
    assert proc.stdout == "9\npartial"


def test_spawn_refuses_bad_targets(gntipc_sim: SimRuntime) -> None:
    with pytest.raises(TypeError, match="module-level function"):
        gntipc_sim.spawn(lambda: None, domid=1)
    with pytest.raises(ValueError, match="loop"):
        gntipc_sim.spawn(echo_server, 1, "p", domid=0, loop="curio")
    with pytest.raises(TypeError, match="sequence"):
        gntipc_sim.spawn("python server.py", domid=1)
    with pytest.raises(TypeError, match="command"):
        gntipc_sim.spawn([sys.executable], "arg", domid=1)
    with pytest.raises(ValueError, match="empty"):
        gntipc_sim.spawn([], domid=1)
    with pytest.raises(ValueError):
        gntipc_sim.spawn(print_environment, domid=0x7FF0)
    with pytest.raises(ValueError, match="two different domains"):
        gntipc_sim.server_client(echo_server, ping_client, server_domid=2, client_domid=2)


def test_failing_target_exits_1_with_its_traceback(
    gntipc_sim: SimRuntime, capfd: pytest.CaptureFixture[str]
) -> None:
    proc = gntipc_sim.spawn(fail_loudly, "boom", domid=1)
    assert proc.join() == 1
    assert "RuntimeError: boom" in capfd.readouterr().err


def test_timeouts_name_the_process(gntipc_sim: SimRuntime) -> None:
    proc = gntipc_sim.spawn(time.sleep, 3600, domid=1)
    with pytest.raises(TimeoutError, match=f"pid {proc.pid} domain 1 running"):
        proc.join(timeout=0.05)
    with pytest.raises(TimeoutError, match="to print a line"):
        proc.readline(timeout=0.05)
    proc.kill()
    assert proc.returncode == -9
    proc.kill()  # idempotent


# -- a server and a client in two processes playing two domains ---------------------------


def test_server_and_client_processes(
    gntipc_server_client: Callable[..., ServerClient], anyio_backend: str
) -> None:
    pair: ServerClient = gntipc_server_client(echo_server, ping_client, loop=anyio_backend)
    assert (pair.server.domid, pair.client.domid) == (0, 1)
    assert pair.client.join() == 0, pair.client.stdout
    assert pair.client.readline() == anyio_backend
    assert pair.server.join() == 0
    assert pair.server.stdout == f"listening\nechoed {1000 * 1000}\n"


@pytest.mark.anyio
async def test_async_waits(gntipc_sim: SimRuntime) -> None:
    pair = gntipc_sim.server_client(echo_server, ping_client, server_domid=4, client_domid=6)
    assert await pair.server.receive_line() == "listening"
    assert await pair.client.wait() == 0
    assert await pair.server.wait() == 0
    assert await pair.server.receive_line() == f"echoed {1000 * 1000}"
    with pytest.raises(EOFError):
        await pair.server.receive_line()


# -- kills ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_kill_a_peer_process(gntipc_sim: SimRuntime, anyio_backend: str) -> None:
    path = gntipc_sim.new_path()
    async with await gntipc.listen(5, path) as listener:
        peer = gntipc_sim.spawn(talker, 0, path, domid=5, loop=anyio_backend)
        async with await listener.accept() as stream:
            assert await stream.receive() == b"hello"
            assert await peer.receive_line() == "sent"
            peer.kill()
            assert peer.returncode == -9
            with anyio.fail_after(30), pytest.raises(anyio.BrokenResourceError):
                await stream.receive()


@pytest.mark.anyio
async def test_kill_a_domain(gntipc_sim: SimRuntime, anyio_backend: str) -> None:
    path = gntipc_sim.new_path()
    async with await gntipc.listen(5, path) as listener:
        peers: list[SimProcess] = [
            gntipc_sim.spawn(talker, 0, path, domid=5, loop=anyio_backend),
            gntipc_sim.spawn(time.sleep, 3600, domid=5),  # another process of domain 5
        ]
        async with await listener.accept() as stream:
            assert await stream.receive() == b"hello"
            assert await peers[0].receive_line() == "sent"
            spare = gntipc_sim.spawn(time.sleep, 3600, domid=6)
            assert gntipc_sim.kill_domain(5) == sorted(p.pid for p in peers)
            assert [p.returncode for p in peers] == [-9, -9]
            with anyio.fail_after(30), pytest.raises(anyio.BrokenResourceError):
                await stream.receive()
            assert spare.returncode is None  # another domain: untouched


# -- the leak check ---------------------------------------------------------------------


def test_runtime_reports_leftovers_then_cleans_up() -> None:
    runtime = SimRuntime()
    with pytest.raises(AssertionError, match=r"open <SimBackend domain 2"), runtime:
        backend = gntipc.get_backend("sim", domid=2, runtime_dir=runtime.path)
        backend.share(3, 1)  # a grant too
        proc = runtime.spawn(time.sleep, 3600, domid=4)
    assert backend.closed  # closed by the runtime after the report
    assert proc.returncode == -9
    assert not os.path.exists(runtime.path)
    runtime.close()  # idempotent


def test_runtime_context_manager_checks_nothing_after_an_error() -> None:
    with pytest.raises(KeyError), SimRuntime() as runtime:
        backend = runtime.backend(3)
        raise KeyError("the test's own error")
    assert backend.closed
    with pytest.raises(anyio.ClosedResourceError, match="closed"):
        runtime.backend()


def test_runtimes_share_nothing() -> None:
    with SimRuntime() as one, SimRuntime() as two:
        assert one.path != two.path
        with two.backend(0) as b:
            with one.backend(0) as a:
                a.store.write("data/mark", b"one")
                with pytest.raises(gntipc.XenError) as info:
                    b.store.read("data/mark")
                assert info.value.errno == errno.ENOENT
                assert f"open {a!r}" in one.leftovers()
            # a backend open in another runtime is not a leftover of this one
            assert one.leftovers() == []
