"""Resumable streams over real transports: anyio TCP (the test aborts the socket; a relay
process in between is killed and restarted), and gntipc vchans on sim with the producer
in another process (the test closes the vchan under it); a consumer process killed and
restarted from its persisted position (exactly-once).  Nothing lost, duplicated or
reordered; refusals and give-up times are clear errors.

Run as a script, this file is the peer process of the cross-process tests::

    python test_resume.py relay TARGET_PORT
    python test_resume.py vchan-producer PATH NBYTES SEED
    python test_resume.py consumer PORT STATE_FILE
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
import pytest
from anyio.abc import ByteStream, Process, SocketAttribute, SocketListener, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import gntipc
from gntipc import RemoteProtocolError
from gntipc.backends.sim import SimBackend
from gntipc.protocol.resume import ResumeState
from gntipc.resume import (
    ResumableListener,
    ResumableStream,
    ResumeTicket,
    SessionLost,
    SessionRefused,
    vm_identity,
)
from gntipc.testing import SimRuntime, connect_pair
from gntipc.vm import vm_of_domain

pytestmark = pytest.mark.anyio

PEER_DOMID = 5
TRANSPORT_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


# -- helpers ----------------------------------------------------------------------------


async def tcp_listener() -> tuple[SocketListener, int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    inner = listener.listeners[0]
    assert isinstance(inner, SocketListener)
    return inner, inner.extra(SocketAttribute.local_port)


class Dialer:
    """A connect() factory to a TCP port that remembers the streams it made (so that
    the test can abort the current one)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.made: list[SocketStream] = []
        self.aborted = 0

    async def __call__(self) -> ByteStream:
        stream = await anyio.connect_tcp("127.0.0.1", self.port)
        self.made.append(stream)
        return stream

    async def abort(self) -> None:
        """Drop the current connection as a network would (RST, no FIN), once there is a
        connection we did not abort yet."""
        while len(self.made) <= self.aborted:
            await anyio.sleep(0.01)
        self.aborted += 1
        sock = self.made[-1].extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        await self.made[-1].aclose()


class Recorder:
    """An acceptor that remembers the transports it accepted."""

    def __init__(self, listener: gntipc.Listener) -> None:
        self.listener = listener
        self.accepted: list[ByteStream] = []

    async def accept(self) -> ByteStream:
        stream = await self.listener.accept()
        self.accepted.append(stream)
        return stream

    async def aclose(self) -> None:
        await self.listener.aclose()


async def receive_all(stream: ResumableStream) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await stream.receive()
        except anyio.EndOfStream:
            return bytes(out)


class Peer:
    def __init__(self, proc: Process) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self.out = BufferedByteReceiveStream(proc.stdout)

    async def line(self, timeout: float = 20) -> str:
        with anyio.fail_after(timeout):
            return (await self.out.receive_until(b"\n", 1 << 16)).decode()


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[..., Awaitable[Peer]]]:
    """``await spawn(mode, *args)`` runs this file as a peer process (domain 5 on sim);
    every one is killed and reaped after the test."""
    procs: list[Process] = []
    env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(PEER_DOMID))

    async def start(*args: object) -> Peer:
        proc = await anyio.open_process(
            [sys.executable, __file__, *map(str, args)], env=env, stderr=None
        )
        procs.append(proc)
        return Peer(proc)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        with anyio.move_on_after(10, shield=True):
            await proc.wait()
        await proc.aclose()


# -- over TCP, in one process -----------------------------------------------------------


async def test_tcp_bytes_both_ways_survive_aborted_connections() -> None:
    listener, port = await tcp_listener()
    dial = Dialer(port)
    up = random.Random(1).randbytes(1_500_000)
    down = random.Random(2).randbytes(700_000)
    breaks: list[BaseException | None] = []
    with anyio.fail_after(20):
        async with (
            ResumableListener(listener, window_bytes=256 * 1024) as rl,
            ResumableStream.client(dial, window_bytes=128 * 1024, on_break=breaks.append) as c,
        ):
            await c.send(b"hello")  # the session starts with the first connection
            async with await rl.accept() as s, anyio.create_task_group() as tg:

                async def send_all(stream: ResumableStream, data: bytes) -> None:
                    for i in range(0, len(data), 20_000):
                        await stream.send(data[i : i + 20_000])
                    await stream.send_eof()

                tg.start_soon(send_all, c, up)
                tg.start_soon(send_all, s, down)
                got = bytearray()
                while True:
                    try:
                        got += await s.receive()
                    except anyio.EndOfStream:
                        break
                    # (Once the last abort was resumed: the client has more to send.)
                    resumed = c.statistics().resumes == dial.aborted
                    if len(got) > (dial.aborted + 1) * 300_000 and dial.aborted < 4 and resumed:
                        await dial.abort()
                got_up = bytes(got)
                got_down = await receive_all(c)
            cs, ss = c.statistics(), s.statistics()
    assert got_up == b"hello" + up
    assert got_down == down
    assert cs.breaks == cs.resumes == len(breaks) == 4
    assert ss.breaks == ss.resumes == 4
    assert cs.window_waits > 0  # the sender paused on the window
    assert len(dial.made) == cs.resumes + 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_tcp_messages_through_a_relay_process_that_is_killed(
    spawn: Callable[..., Awaitable[Peer]],
) -> None:
    listener, port = await tcp_listener()
    relay = await spawn("relay", port)
    dial = Dialer(int(await relay.line()))
    n = 3000
    with anyio.fail_after(30):
        async with (
            ResumableListener(listener, window_records=64) as rl,
            ResumableStream.client(dial, window_records=32) as c,
            anyio.create_task_group() as tg,
        ):

            async def produce() -> None:
                for i in range(n):
                    assert await c.send_record(b"%d" % i) == i + 1
                await c.send_eof()

            tg.start_soon(produce)
            async with await rl.accept() as s:
                got = []
                kills = 0
                while True:
                    try:
                        seq, data = await s.receive_record()
                    except anyio.EndOfStream:
                        break
                    got.append(int(data))
                    assert seq == len(got)
                    if len(got) % 1000 == 500 and kills < 2:
                        relay.proc.send_signal(signal.SIGKILL)
                        await relay.proc.wait()
                        kills += 1
                        relay = await spawn("relay", port)
                        dial.port = int(await relay.line())
                stats = s.statistics()
    assert got == list(range(n))
    assert kills == 2 and stats.resumes >= 2


class Reading(msgspec.Struct):
    seq: int
    value: float


async def test_message_queue_over_a_resumable_stream_survives_aborts() -> None:
    # A typed gntipc.MessageQueue over the resumable stream: its frames are bytes of
    # the stream, so an in-flight resume delivers every message once, in order.
    listener, port = await tcp_listener()
    dial = Dialer(port)
    n = 20_000
    with anyio.fail_after(20):
        async with (
            ResumableListener(listener) as rl,
            ResumableStream.client(dial, window_bytes=64 * 1024) as c,
            gntipc.MessageQueue(c, Reading) as out,
            anyio.create_task_group() as tg,
        ):

            async def produce() -> None:
                for i in range(0, n, 100):
                    await out.put_many([Reading(j, j / 4) for j in range(i, i + 100)])
                await c.send_eof()

            tg.start_soon(produce)
            s = await rl.accept()
            with pytest.raises(RuntimeError, match="enter the ResumableStream first"):
                await s.receive()
            async with s, gntipc.MessageQueue(s, Reading) as inq:
                got: list[int] = []
                while len(got) < n:
                    got += [m.seq for m in await inq.get_many()]
                    resumed = c.statistics().resumes == dial.aborted
                    if len(got) > (dial.aborted + 1) * 4000 and dial.aborted < 3 and resumed:
                        await dial.abort()
                with pytest.raises(anyio.EndOfStream):
                    await inq.get()
    assert got == list(range(n))
    assert c.statistics().resumes == 3


class FreezingRelay:
    """A TCP relay in this process whose current connections can be frozen: they stay
    open but carry nothing more (a half-open connection, a hung middlebox)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.frozen: set[int] = set()
        self.connections = 0

    async def serve(self, listener: SocketListener) -> None:
        async def pipe(a: ByteStream, b: ByteStream, conn: int) -> None:
            with contextlib.suppress(*TRANSPORT_ERRORS):
                async for chunk in a:
                    if conn in self.frozen:
                        await anyio.sleep_forever()
                    await b.send(chunk)
            await b.aclose()

        async def handle(client: ByteStream) -> None:
            self.connections += 1
            conn = self.connections
            async with (
                client,
                await anyio.connect_tcp("127.0.0.1", self.target) as server,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(pipe, client, server, conn)
                tg.start_soon(pipe, server, client, conn)

        await listener.serve(handle)

    def freeze(self) -> None:
        self.frozen.add(self.connections)


async def test_keepalive_breaks_a_connection_that_went_silent() -> None:
    listener, port = await tcp_listener()
    relay_listener, relay_port = await tcp_listener()
    relay = FreezingRelay(port)
    breaks: list[BaseException | None] = []
    with anyio.fail_after(10):
        async with (
            relay_listener,
            anyio.create_task_group() as tg,
            ResumableListener(listener, keepalive=0.1) as rl,
            ResumableStream.client(Dialer(relay_port), keepalive=0.1, on_break=breaks.append) as c,
        ):
            tg.start_soon(relay.serve, relay_listener)
            await c.send(b"before")
            async with await rl.accept() as s:
                assert await s.receive() == b"before"
                relay.freeze()
                await c.send(b"after")  # stuck in the frozen relay until the resume
                start = anyio.current_time()
                assert await s.receive() == b"after"
                assert 0.3 <= anyio.current_time() - start < 3
                assert isinstance(breaks[0], TimeoutError)
                assert relay.connections == 2
            tg.cancel_scope.cancel()


# -- refusals and giving up -------------------------------------------------------------


async def test_wrong_secret_and_unknown_session_are_refused() -> None:
    listener, port = await tcp_listener()
    dial = Dialer(port)
    async with ResumableListener(listener) as rl, ResumableStream.client(dial) as c:
        await c.send(b"x")
        async with await rl.accept() as s:
            assert await s.receive() == b"x"
            forged = ResumeTicket(c.ticket.session_id, bytes(32))
            unknown = ResumeTicket(bytes(16), c.ticket.secret)
            for ticket, reason in ((forged, "wrong secret"), (unknown, "unknown session")):
                with anyio.fail_after(5):
                    async with ResumableStream.client(dial, ticket=ticket, position=0) as bad:
                        with pytest.raises(SessionRefused, match=reason):
                            await bad.receive()
            assert rl.refused == 2
            # The real session goes on.
            await c.send(b"y")
            assert await s.receive() == b"y"
            await c.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await s.receive()


async def test_a_resume_from_another_identity_is_refused() -> None:
    # ``identify`` names who is at the other end of each transport (by default the VM of
    # a vchan's peer domain): a resume with the session's id and secret but from
    # somebody else is refused; from the session's owner it goes on.
    listener, port = await tcp_listener()
    dial = Dialer(port)
    who = ["vm-a"]

    async def identify(transport: ByteStream) -> object:
        return who[0]

    async with (
        ResumableListener(listener, identify=identify) as rl,
        ResumableStream.client(dial) as c,
    ):
        await c.send(b"x")
        async with await rl.accept() as s:
            assert await s.receive() == b"x"
            who[0] = "vm-b"
            with anyio.fail_after(5):
                async with ResumableStream.client(
                    Dialer(port), ticket=c.ticket, position=0
                ) as thief:
                    with pytest.raises(SessionRefused, match=r"belongs to VM vm-a.* VM vm-b"):
                        await thief.receive()
            assert rl.refused == 1
            who[0] = "vm-a"  # the owner, e.g. its VM restored under another domid
            await dial.abort()
            await c.send(b"y")
            with anyio.fail_after(10):
                assert await s.receive() == b"y"
            assert c.statistics().resumes == 1


async def test_a_transport_that_cannot_be_identified_is_dropped_not_refused() -> None:
    # ``identify`` failing (the store did not answer), or saying None for a session bound
    # to an identity (a domain dying in a restore: its home is gone), is no verdict on
    # the client: its transport is dropped without a refusal, and it comes back.
    listener, port = await tcp_listener()
    dial = Dialer(port)
    who: list[object] = ["vm-a"]

    async def identify(transport: ByteStream) -> object:
        if who[0] == "fail":
            raise gntipc.XenStoreTimeout("the store is wedged")
        return who[0]

    async with (
        ResumableListener(listener, identify=identify) as rl,
        ResumableStream.client(dial, backoff=(0.05, 0.1)) as c,
    ):
        await c.send(b"x")
        async with await rl.accept() as s:
            assert await s.receive() == b"x"
            for nobody in ("fail", None):
                who[0] = nobody
                dropped = rl.dropped
                await dial.abort()
                await c.send(b"y")
                with anyio.fail_after(10):
                    while rl.dropped < dropped + 2:  # (it keeps trying)
                        await anyio.sleep(0.01)
                who[0] = "vm-a"  # identified again: the session resumes
                with anyio.fail_after(10):
                    assert await s.receive() == b"y"
            assert rl.refused == 0
            assert c.statistics().resumes == 2


async def test_default_identity_is_the_vm_of_a_vchan_peer(gntipc_sim: SimRuntime) -> None:
    server = gntipc_sim.backend(0)
    vm = "00000000-0000-0000-0000-00000000005e"
    with SimBackend(5, runtime_dir=gntipc_sim.path, vm_uuid=vm) as client:
        s, c = await connect_pair(server, gntipc_sim.new_path(), client_backend=client)
        async with s, c:
            assert await vm_identity(s) == vm  # the client's VM
            assert vm_of_domain(server.store, 0) is not None  # dom0 is a VM too, but
            assert await vm_identity(c) is None  # a domU may not read its home
            server.store.rm("/local/domain/5/vm")  # (dom0: the toolstack)
            assert await vm_identity(s) is None  # the store does not say
    listener, port = await tcp_listener()
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as tcp:
        assert await vm_identity(tcp) is None  # not a vchan: the secret alone


async def test_a_resume_point_that_frees_the_window_wakes_the_sender() -> None:
    # The server's window is full; the client commits while it is disconnected (its ack
    # never travels on a connection): the resume HELLO is what acknowledges those
    # records, and it must wake the server's waiting send (it stalled forever, both
    # sides waiting: found by restoring a sim domain under a consumer).
    listener, port = await tcp_listener()
    dial = Dialer(port)
    async with (
        ResumableListener(listener, window_records=4) as rl,
        ResumableStream.client(dial, auto_commit=False) as c,
    ):
        await c.send(b"hi")
        async with await rl.accept() as s, anyio.create_task_group() as tg:
            assert await s.receive() == b"hi"
            sent: list[int] = []

            async def produce() -> None:
                for i in range(8):
                    sent.append(await s.send_record(b"%d" % i))

            tg.start_soon(produce)
            got = [await c.receive_record() for _ in range(4)]
            assert [data for _, data in got] == [b"0", b"1", b"2", b"3"]
            with anyio.fail_after(5):
                while len(sent) < 4:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.2)
            assert len(sent) == 4  # the window (4 records) is full: the 5th waits
            await dial.abort()
            c.commit(got[-1][0])  # while the connection is down
            with anyio.fail_after(10):
                got += [await c.receive_record() for _ in range(4)]
            assert [data for _, data in got[4:]] == [b"4", b"5", b"6", b"7"]


async def test_garbage_instead_of_a_hello_is_refused() -> None:
    listener, port = await tcp_listener()
    async with ResumableListener(listener) as rl:
        async with await anyio.connect_tcp("127.0.0.1", port) as raw:
            await raw.send(b"GET / HTTP/1.1\r\n\r\n" + bytes(100))
            with anyio.fail_after(5):
                reply = await raw.receive()
        assert reply[0] == 4 and b"unknown resume frame type" in reply  # REFUSE
        assert rl.refused == 1


async def test_a_peer_breaking_the_protocol_ends_the_session_with_a_clear_error() -> None:
    listener, port = await tcp_listener()
    async with (
        ResumableListener(listener) as rl,
        await anyio.connect_tcp("127.0.0.1", port) as raw,
    ):
        client = ResumeState.client()
        client.connect()
        await raw.send(client.data_to_send())  # a good HELLO: a new session
        async with await rl.accept() as s:
            # Record 2 before record 1: a gap (records went missing).
            await raw.send(b"\2\0\0\0\1\0\0\0\2\0\0\0\0\0\0\0x")
            with anyio.fail_after(5), pytest.raises(RemoteProtocolError, match="missing"):
                await s.receive()
            with pytest.raises(RemoteProtocolError):
                await s.send(b"x")  # the session is over for good


async def test_client_gives_up_when_the_server_never_comes() -> None:
    listener, port = await tcp_listener()
    await listener.aclose()  # nothing listens there any more
    dial = Dialer(port)
    start = anyio.current_time()
    with anyio.fail_after(5):
        async with ResumableStream.client(dial, give_up_after=0.5) as c:
            await c.send(b"queued")  # fits in the window: no wait
            with pytest.raises(SessionLost, match="no transport") as info:
                await c.receive()
    assert isinstance(info.value, anyio.BrokenResourceError)
    assert isinstance(info.value.__cause__, OSError)
    assert 0.5 <= anyio.current_time() - start < 3


async def test_server_gives_up_on_a_client_that_does_not_come_back() -> None:
    listener, port = await tcp_listener()
    dial = Dialer(port)
    async with (
        ResumableListener(listener, give_up_after=0.5) as rl,
        ResumableStream.client(dial, linger=0) as c,
    ):
        await c.send(b"x")
        async with await rl.accept() as s:
            assert await s.receive() == b"x"
            # The client goes (closed without EOF): the server waits 0.5 s, gives up.
            await c.aclose()
            start = anyio.current_time()
            with anyio.fail_after(5), pytest.raises(SessionLost, match="did not resume"):
                await s.receive()
            assert 0.5 <= anyio.current_time() - start < 3
            assert s.statistics().breaks == 1
            # Too late: the session is over, its resume is refused.
            late = ResumableStream.client(dial, ticket=c.ticket, position=0)
            async with late:
                with anyio.fail_after(5), pytest.raises(SessionRefused, match="session over"):
                    await late.receive()


async def test_closed_stream_raises_closed() -> None:
    listener, port = await tcp_listener()
    async with ResumableListener(listener), ResumableStream.client(Dialer(port)) as c:
        pass
    with pytest.raises(anyio.ClosedResourceError):
        await c.send(b"x")
    with pytest.raises(anyio.ClosedResourceError):
        await c.receive()


async def test_an_accepted_stream_never_closed_warns() -> None:
    listener, port = await tcp_listener()
    async with ResumableStream.client(Dialer(port), linger=0) as c:
        rl = ResumableListener(listener)
        async with rl:
            await c.send(b"x")
            s = await rl.accept()
            with anyio.fail_after(5):
                while s._offer is None:
                    await anyio.sleep(0.01)
            await s._offer[0].aclose()  # (its transport: only the stream's leak is left)
        with pytest.warns(ResourceWarning, match="unclosed <ResumableStream"):
            del s, rl
            gc.collect()


# -- over vchans on sim, across processes -----------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("backend_name", ["sim"])
async def test_vchan_bytes_from_another_process_survive_closing_the_vchan(
    backend: gntipc.backends.Backend, spawn: Callable[..., Awaitable[Peer]]
) -> None:
    path = f"data/gntipc-resume/{os.getpid()}/{random.randrange(1 << 30)}"
    n = 1_000_000
    async with await gntipc.listen(PEER_DOMID, path, backend=backend) as vl:
        recorder = Recorder(vl)
        async with ResumableListener(recorder, give_up_after=10) as rl:
            peer = await spawn("vchan-producer", path, n, 7)
            with anyio.fail_after(30):
                async with await rl.accept() as s:
                    h = hashlib.sha256()
                    total = 0
                    closed = 0
                    while True:
                        try:
                            data = await s.receive()
                        except anyio.EndOfStream:
                            break
                        h.update(data)
                        total += len(data)
                        fresh = s.statistics().resumes == closed  # (resumed since the last)
                        if total > (closed + 1) * n // 5 and closed < 3 and fresh:
                            await recorder.accepted[-1].aclose()  # break the vchan
                            closed += 1
                    await s.send_eof()
                    line = await peer.line()
                    stats = s.statistics()
            assert await peer.proc.wait() == 0
    assert total == n
    assert h.hexdigest() == hashlib.sha256(random.Random(7).randbytes(n)).hexdigest()
    assert closed == 3 and stats.resumes == 3
    assert line.startswith("done") and int(line.split()[1]) >= 3  # its resumes


# -- a consumer process killed and restarted --------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_consumer_process_restarted_from_its_position_gets_every_message_once(
    spawn: Callable[..., Awaitable[Peer]], tmp_path: Path
) -> None:
    listener, port = await tcp_listener()
    state_file = tmp_path / "consumer.json"
    n = 2000
    async with ResumableListener(listener, window_records=64, give_up_after=10) as rl:
        consumer = await spawn("consumer", port, state_file)
        with anyio.fail_after(40):
            async with await rl.accept() as s:
                async with anyio.create_task_group() as tg:

                    async def produce() -> None:
                        for i in range(n):
                            await s.send_record(b"%d" % i)
                        await s.send_eof()

                    tg.start_soon(produce)
                    for kill_at in (500, 1300):
                        while True:
                            line = await consumer.line()
                            if line.startswith("done") or int(line.split()[1]) >= kill_at:
                                break
                        assert not line.startswith("done")
                        consumer.proc.send_signal(signal.SIGKILL)
                        await consumer.proc.wait()
                        consumer = await spawn("consumer", port, state_file)
                    while not (line := await consumer.line()).startswith("done"):
                        pass
                with pytest.raises(anyio.EndOfStream):
                    await s.receive_record()
                stats = s.statistics()
    assert line == f"done {n}"
    assert stats.resumes >= 2
    assert json.loads(state_file.read_text())["last"] == n - 1


# -- the peer processes ---------------------------------------------------------------------


async def _relay(target: int) -> None:
    """Forward every connection to port ``target`` (until killed)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    print(listener.extra(SocketAttribute.local_port), flush=True)

    async def pipe(a: ByteStream, b: ByteStream) -> None:
        try:
            async for chunk in a:
                await b.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        await b.aclose()
        await a.aclose()

    async def handle(client: ByteStream) -> None:
        server = await anyio.connect_tcp("127.0.0.1", target)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipe, client, server)
            tg.start_soon(pipe, server, client)

    await listener.serve(handle)


async def _vchan_producer(path: str, n: int, seed: int) -> None:
    """Stream ``n`` pseudo-random bytes to domain 0 at ``path`` over a resumable vchan."""

    async def dial() -> ByteStream:
        return await gntipc.connect(0, path, timeout=5)

    data = random.Random(seed).randbytes(n)
    # (A small window paces the producer by the consumer, so the closes come at the
    # points the test chose, not after everything is buffered.)
    # (give_up_after: room for a loaded machine; the server gives up after its own.)
    async with ResumableStream.client(dial, give_up_after=60, window_bytes=64 * 1024) as stream:
        for i in range(0, n, 50_000):
            await stream.send(data[i : i + 50_000])
        await stream.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        print(f"done {stream.statistics().resumes}", flush=True)


async def _consumer(port: int, state_file: str) -> None:
    """Receive numbered messages, checking each is the next one, and persist the last
    one with the record position, then commit it: a restart resumes from there."""
    path = Path(state_file)
    state = json.loads(path.read_text()) if path.exists() else None

    async def dial() -> ByteStream:
        return await anyio.connect_tcp("127.0.0.1", port)

    ticket = None if state is None else ResumeTicket(*map(bytes.fromhex, state["ticket"]))
    position = None if state is None else state["position"]
    last = -1 if state is None else state["last"]
    stream = ResumableStream.client(
        dial, ticket=ticket, position=position, auto_commit=False, window_records=64
    )

    def persist(position: int) -> None:
        t = stream.ticket
        record = {"ticket": [t.session_id.hex(), t.secret.hex()], "position": position}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**record, "last": last}))
        os.replace(tmp, path)

    if state is None:
        persist(0)
    async with stream:
        while True:
            try:
                seq, data = await stream.receive_record()
            except anyio.EndOfStream:
                break
            if int(data) != last + 1:
                sys.exit(f"message {int(data)} after {last}")
            last = int(data)
            persist(seq)
            stream.commit(seq)
            if last % 100 == 0:
                print(f"got {last}", flush=True)
        await stream.send_eof()
        print(f"done {last + 1}", flush=True)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "relay":
        anyio.run(_relay, int(rest[0]))
    elif mode == "vchan-producer":
        anyio.run(_vchan_producer, rest[0], int(rest[1]), int(rest[2]))
    elif mode == "consumer":
        anyio.run(_consumer, int(rest[0]), rest[1])
