"""gntipc vs the usual local IPC, between two processes, on the sim backend (``make bench``).

    .venv/bin/python benchmarks/run.py [--quick] [--only throughput,messages,latency]

Three sections, each a table with MB/s (or messages/s, or µs) and the ratio gntipc/peer:

* **throughput**: 64 KiB sends, one direction, for 64 KiB and 1 MiB rings.  The same
  "ring" size is given to the peers that have one: the pipe's capacity (F_SETPIPE_SZ) and
  the unix socket's send and receive buffers.  The sender sends for a fixed time, then
  closes; the receiver measures from its first byte to the end.
* **messages**: typed ~64-byte msgspec Structs (a 64-byte frame on gntipc's wire), one
  at a time (``put_nowait``/``get_nowait``, waiting only when full/empty) and batched
  (``put_many``/``get_many``), vs the same frames over a unix socket (asyncio streams,
  u32 length prefix) and pyzmq PAIR over ipc://.  Every message is decoded and
  type-checked by the receiver.
* **latency**: 64-byte ping-pong round trips, p50/p99, vs a raw eventfd ping-pong (the
  floor for any blocking wake-up between two processes), a pipe, a unix socket and pyzmq.
  ``spin`` rows use gntipc's opt-in spin-then-block wait (``VchanStream.spin``).

Each pair of processes is forked fresh for each row; nothing is shared but the sim
runtime directory (a private temporary one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import multiprocessing as mp
import os
import socket
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import zmq

import gntipc
from gntipc import MessageQueue, Vchan, VchanStream

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
_F_SETPIPE_SZ = 1031
_U32 = struct.Struct("<I")
CTX = mp.get_context("fork")

SERVER_DOM, CLIENT_DOM = 0, 1
_paths = iter(range(1 << 30))


def sim_backend(domid: int) -> gntipc.backends.Backend:
    # Two processes creating the sim runtime at the same instant can meet sqlite's
    # "database is locked" (a sim start-up race, reported): retry briefly.
    for attempt in range(50):
        try:
            return gntipc.get_backend("sim", domid=domid)
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


def fresh_path() -> str:
    return f"data/bench/{os.getpid()}/{next(_paths)}"


# ----------------------------------------------------------------- the message type ---
class Sample(msgspec.Struct):
    """The benchmark's typed message: 60 bytes of MessagePack, a 64-byte frame."""

    seq: int
    sensor: int
    value: float
    tag: bytes


def make_samples(n: int) -> list[Sample]:
    # seq values of one encoded width (uint32) keep every frame exactly 64 bytes
    return [Sample(1 << 20 | i, i % 17, i * 0.25, b"x" * 21) for i in range(n)]


_ENC = msgspec.msgpack.Encoder()
assert len(_ENC.encode(make_samples(1)[0])) == 60, len(_ENC.encode(make_samples(1)[0]))


def frame(m: Sample) -> bytes:
    payload = _ENC.encode(m)
    return _U32.pack(len(payload)) + payload


# -------------------------------------------------------------------------- plumbing ---
def run_pair(
    parent: Callable[..., Any], child: Callable[..., Any], *args: Any, setup: Any = None
) -> Any:
    """Fork ``child(res, *args)``, run ``parent(res, *args)`` here; its result is returned.

    ``setup()`` (optional) makes shared resources before the fork (pipes, sockets...).
    """
    res = setup() if setup is not None else None
    proc = CTX.Process(target=_child_main, args=(child, res, args), daemon=True)
    proc.start()
    try:
        return parent(res, *args)
    finally:
        proc.join(30)
        if proc.exitcode != 0:
            proc.kill()
            raise RuntimeError(f"{child.__name__} exited with {proc.exitcode}")


def _child_main(child: Callable[..., Any], res: Any, args: tuple[Any, ...]) -> None:
    child(res, *args)


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


# ----------------------------------------------------- gntipc connection helpers ---
async def g_accept(path: str, ring: int) -> VchanStream:
    backend = sim_backend(SERVER_DOM)
    async with await gntipc.listen(
        CLIENT_DOM, path, read_size=ring, write_size=ring, backend=backend
    ) as listener:
        stream = await listener.accept()
    stream._bench_backend = backend  # type: ignore[attr-defined]
    return stream


async def g_connect(path: str) -> VchanStream:
    backend = sim_backend(CLIENT_DOM)
    stream = await gntipc.connect(SERVER_DOM, path, timeout=30, backend=backend)
    stream._bench_backend = backend  # type: ignore[attr-defined]
    return stream


async def g_close(stream: VchanStream) -> None:
    backend = stream._bench_backend  # type: ignore[attr-defined]
    await stream.aclose()
    backend.close()


def v_server(path: str, ring: int) -> tuple[Vchan, Any]:
    backend = sim_backend(SERVER_DOM)
    v = Vchan.server(backend, CLIENT_DOM, path, read_size=ring, write_size=ring)
    while v.is_open() == 2:
        v.wait(1)
    return v, backend


def v_client(path: str) -> tuple[Vchan, Any]:
    backend = sim_backend(CLIENT_DOM)
    return Vchan.client(backend, SERVER_DOM, path, timeout=30), backend


def v_readinto(v: Vchan, buf: memoryview) -> int:
    """Blocking readinto on the sync API (0 at end of stream)."""
    while True:
        try:
            n = v.readinto_nowait(buf)
        except anyio.EndOfStream:
            return 0
        if n:
            return n
        if v.prepare_wait_read() == 0:
            v.wait()


# ========================================================================= throughput ===
def tp_gntipc_async_parent(_: Any, path: str, ring: int, secs: float) -> float:
    async def main() -> float:
        stream = await g_accept(path, ring)
        total = 0
        first = await stream.receive(ring)
        t0 = time.perf_counter()
        try:
            while True:
                total += len(await stream.receive(ring))
        except anyio.EndOfStream:
            pass
        dt = time.perf_counter() - t0
        await g_close(stream)
        del first
        return rate(total, dt)

    return anyio.run(main)


def tp_gntipc_async_child(_: Any, path: str, ring: int, secs: float) -> None:
    async def main() -> None:
        stream = await g_connect(path)
        block = bytes(BLOCK)
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            for _ in range(16):
                await stream.send(block)
        await stream.send_eof()
        await g_close(stream)

    anyio.run(main)


def tp_gntipc_sync_parent(_: Any, path: str, ring: int, secs: float) -> float:
    v, backend = v_server(path, ring)
    buf = memoryview(bytearray(ring))
    v_readinto(v, buf)
    total = 0
    t0 = time.perf_counter()
    while n := v_readinto(v, buf):
        total += n
    dt = time.perf_counter() - t0
    v.close()
    backend.close()
    return rate(total, dt)


def tp_gntipc_sync_child(_: Any, path: str, ring: int, secs: float) -> None:
    v, backend = v_client(path)
    block = bytes(BLOCK)
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(16):
            v.send(block)
    v.send_eof()
    v.close()
    backend.close()


def tp_asyncio_parent(res: Any, path: str, ring: int, secs: float) -> float:
    sock_path = res

    async def main() -> float:
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ring)
            await reader.read(ring)
            total = 0
            t0 = time.perf_counter()
            while data := await reader.read(ring):
                total += len(data)
            done.set_result(rate(total, time.perf_counter() - t0))
            writer.close()

        server = await asyncio.start_unix_server(handle, sock_path, limit=ring)
        _signal_ready(sock_path)
        result = await done
        server.close()
        await server.wait_closed()
        return result

    return asyncio.run(main())


def tp_asyncio_child(res: Any, path: str, ring: int, secs: float) -> None:
    sock_path = res

    async def main() -> None:
        _await_ready(sock_path)
        _, writer = await asyncio.open_unix_connection(sock_path)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ring)
        block = bytes(BLOCK)
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            for _ in range(16):
                writer.write(block)
                await writer.drain()
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())


def _signal_ready(path: str) -> None:
    with open(path + ".ready", "w"):
        pass


def _await_ready(path: str) -> None:
    while not os.path.exists(path + ".ready"):
        time.sleep(0.001)


def tmp_sock() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="gntipc-bench-"), "s")


def tp_pipe_setup(ring: int) -> Callable[[], tuple[int, int]]:
    def setup() -> tuple[int, int]:
        r, w = os.pipe()
        fcntl.fcntl(w, _F_SETPIPE_SZ, ring)
        return r, w

    return setup


def tp_pipe_parent(res: Any, path: str, ring: int, secs: float) -> float:
    r, w = res
    os.close(w)
    buf = memoryview(bytearray(ring))
    os.readv(r, [buf])
    total = 0
    t0 = time.perf_counter()
    while n := os.readv(r, [buf]):
        total += n
    dt = time.perf_counter() - t0
    os.close(r)
    return rate(total, dt)


def tp_pipe_child(res: Any, path: str, ring: int, secs: float) -> None:
    r, w = res
    os.close(r)
    block = memoryview(bytes(BLOCK))
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(16):
            view = block
            while view:
                view = view[os.write(w, view) :]
    os.close(w)


def tp_mp_parent(res: Any, path: str, ring: int, secs: float) -> float:
    a, b = res
    b.close()
    buf = bytearray(BLOCK + 64)
    a.recv_bytes_into(buf)
    total = 0
    t0 = time.perf_counter()
    while n := a.recv_bytes_into(buf):
        total += n
    dt = time.perf_counter() - t0
    a.close()
    return rate(total, dt)


def tp_mp_child(res: Any, path: str, ring: int, secs: float) -> None:
    a, b = res
    a.close()
    block = bytes(BLOCK)
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(16):
            b.send_bytes(block)
    b.send_bytes(b"")
    b.close()


def tp_zmq_parent(res: Any, path: str, ring: int, secs: float) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(f"ipc://{res}")
    _signal_ready(res)
    sock.recv(copy=False)
    total = 0
    t0 = time.perf_counter()
    while n := len(sock.recv(copy=False)):
        total += n
    dt = time.perf_counter() - t0
    sock.close(0)
    ctx.term()
    return rate(total, dt)


def tp_zmq_child(res: Any, path: str, ring: int, secs: float) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    _await_ready(res)  # connect after bind: no reliance on reconnection timers
    sock.connect(f"ipc://{res}")
    block = bytes(BLOCK)
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(16):
            sock.send(block, copy=False)
    sock.send(b"")
    sock.close(linger=-1)
    ctx.term()


# ========================================================================== messages ===
def msg_gntipc_parent(_: Any, path: str, batched: bool, secs: float) -> float:
    async def main() -> float:
        stream = await g_accept(path, 1 * MiB)
        queue = MessageQueue(stream, Sample)
        count = 0
        await queue.get()
        t0 = time.perf_counter()
        if batched:
            try:
                while True:
                    count += len(await queue.get_many())
            except anyio.EndOfStream:
                pass
        else:
            get_nowait = queue.get_nowait
            while True:
                try:
                    get_nowait()
                    count += 1
                except anyio.WouldBlock:
                    await stream.wait_readable()
                except anyio.EndOfStream:
                    break
        dt = time.perf_counter() - t0
        await g_close(stream)
        return count / dt

    return anyio.run(main)


def msg_gntipc_child(_: Any, path: str, batched: bool, secs: float) -> None:
    async def main() -> None:
        stream = await g_connect(path)
        queue = MessageQueue(stream, Sample)
        samples = make_samples(256)
        end = time.perf_counter() + secs
        if batched:
            while time.perf_counter() < end:
                for _ in range(16):
                    await queue.put_many(samples)
        else:
            put_nowait = queue.put_nowait
            while time.perf_counter() < end:
                for m in samples:
                    try:
                        put_nowait(m)
                    except anyio.WouldBlock:
                        await stream.wait_writable(64)
                        await queue.put(m)
        await stream.send_eof()
        await g_close(stream)

    anyio.run(main)


def msg_unix_parent(res: Any, path: str, batched: bool, secs: float) -> float:
    sock_path = res
    decode = msgspec.msgpack.Decoder(Sample).decode

    async def main() -> float:
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            count = 0
            t0 = 0.0
            if batched:
                pending = b""
                while data := await reader.read(MiB):
                    if not t0:
                        t0 = time.perf_counter()
                    buf = pending + data if pending else data
                    view = memoryview(buf)
                    pos, end = 0, len(buf)
                    while end - pos >= 4:
                        (n,) = _U32.unpack_from(buf, pos)
                        if pos + 4 + n > end:
                            break
                        decode(view[pos + 4 : pos + 4 + n])
                        pos += 4 + n
                        count += 1
                    pending = buf[pos:]
            else:
                readexactly = reader.readexactly
                try:
                    while True:
                        (n,) = _U32.unpack(await readexactly(4))
                        decode(await readexactly(n))
                        if not t0:
                            t0 = time.perf_counter()
                        count += 1
                except asyncio.IncompleteReadError:
                    pass
            done.set_result(count / (time.perf_counter() - t0))
            writer.close()

        server = await asyncio.start_unix_server(handle, sock_path, limit=MiB)
        _signal_ready(sock_path)
        result = await done
        server.close()
        await server.wait_closed()
        return result

    return asyncio.run(main())


def msg_unix_child(res: Any, path: str, batched: bool, secs: float) -> None:
    sock_path = res

    async def main() -> None:
        _await_ready(sock_path)
        _, writer = await asyncio.open_unix_connection(sock_path)
        samples = make_samples(256)
        encode = msgspec.msgpack.Encoder().encode
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            if batched:
                for _ in range(16):
                    parts = []
                    for m in samples:
                        payload = encode(m)
                        parts.append(_U32.pack(len(payload)))
                        parts.append(payload)
                    writer.write(b"".join(parts))
                    await writer.drain()
            else:
                for m in samples:
                    payload = encode(m)
                    writer.write(_U32.pack(len(payload)) + payload)
                    await writer.drain()
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())


def msg_zmq_parent(res: Any, path: str, batched: bool, secs: float) -> float:
    decode = msgspec.msgpack.Decoder(Sample).decode
    decode_many = msgspec.msgpack.Decoder(list[Sample]).decode
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(f"ipc://{res}")
    _signal_ready(res)
    count = 0
    # never hang the whole bench on a stuck peer: give up after 20 s of silence
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    try:
        sock.recv()
        t0 = time.perf_counter()
        while data := sock.recv():
            if batched:
                count += len(decode_many(data))
            else:
                decode(data)
                count += 1
    except zmq.Again:
        print("  (pyzmq PAIR: the peer went silent; row skipped)", flush=True)
        return float("nan")
    finally:
        sock.close(0)
        ctx.term()
    return count / (time.perf_counter() - t0)


def msg_zmq_child(res: Any, path: str, batched: bool, secs: float) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    _await_ready(res)  # connect after bind: no reliance on reconnection timers
    sock.connect(f"ipc://{res}")
    samples = make_samples(256)
    encode = msgspec.msgpack.Encoder().encode
    sock.send(encode(samples[0]))
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        if batched:
            for _ in range(16):
                sock.send(encode(samples))  # one msgpack array per zmq message
        else:
            for m in samples:
                sock.send(encode(m))
    sock.send(b"")
    sock.close(linger=-1)
    ctx.term()


# =========================================================================== latency ===
PING = bytes(range(64))


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return p50 * 1e6, p99 * 1e6


def lat_gntipc_async_parent(_: Any, path: str, rounds: int, spin: float) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        stream = await g_accept(path, 64 * KiB)
        stream.spin = spin
        times = []
        clock = time.perf_counter
        for _ in range(rounds):
            t = clock()
            await stream.send(PING)
            got = await stream.receive(64)
            times.append(clock() - t)
            assert len(got) == 64
        await g_close(stream)
        return percentiles(times[rounds // 10 :])

    return anyio.run(main)


def lat_gntipc_async_child(_: Any, path: str, rounds: int, spin: float) -> None:
    async def main() -> None:
        stream = await g_connect(path)
        stream.spin = spin
        for _ in range(rounds):
            await stream.send(await stream.receive(64))
        await g_close(stream)

    anyio.run(main)


def spin_recv(v: Vchan, n: int, spin: float) -> bytes:
    """``v.recv(n)``, spinning up to ``spin`` seconds on ``data_ready()`` before blocking
    (the sync API has no spin option yet: the same policy as ``VchanStream.spin``)."""
    if spin:
        data = v.recv_nowait(n)
        if data is not None:
            return data
        clock = time.perf_counter
        end = clock() + spin
        while v.data_ready() < n and clock() < end:
            pass
    return v.recv(n)


def lat_gntipc_sync_parent(_: Any, path: str, rounds: int, spin: float) -> tuple[float, float]:
    v, backend = v_server(path, 64 * KiB)
    times = []
    clock = time.perf_counter
    for _ in range(rounds):
        t = clock()
        v.send(PING)
        got = spin_recv(v, 64, spin)
        times.append(clock() - t)
        assert len(got) == 64
    v.close()
    backend.close()
    return percentiles(times[rounds // 10 :])


def lat_gntipc_sync_child(_: Any, path: str, rounds: int, spin: float) -> None:
    v, backend = v_client(path)
    for _ in range(rounds):
        v.send(spin_recv(v, 64, spin))
    with contextlib.suppress(anyio.EndOfStream):
        v.recv(1)
    v.close()
    backend.close()


def lat_eventfd_setup() -> tuple[int, int]:
    return os.eventfd(0), os.eventfd(0)


def lat_eventfd_parent(res: Any, path: str, rounds: int, spin: float) -> tuple[float, float]:
    ping, pong = res
    times = []
    clock = time.perf_counter
    for _ in range(rounds):
        t = clock()
        os.eventfd_write(ping, 1)
        os.eventfd_read(pong)
        times.append(clock() - t)
    return percentiles(times[rounds // 10 :])


def lat_eventfd_child(res: Any, path: str, rounds: int, spin: float) -> None:
    ping, pong = res
    for _ in range(rounds):
        os.eventfd_read(ping)
        os.eventfd_write(pong, 1)


def lat_pipe_setup() -> tuple[tuple[int, int], tuple[int, int]]:
    return os.pipe(), os.pipe()


def lat_pipe_parent(res: Any, path: str, rounds: int, spin: float) -> tuple[float, float]:
    (_, w1), (r2, _) = res
    times = []
    clock = time.perf_counter
    for _ in range(rounds):
        t = clock()
        os.write(w1, PING)
        got = os.read(r2, 64)
        times.append(clock() - t)
        assert len(got) == 64
    return percentiles(times[rounds // 10 :])


def lat_pipe_child(res: Any, path: str, rounds: int, spin: float) -> None:
    (r1, _), (_, w2) = res
    for _ in range(rounds):
        os.write(w2, os.read(r1, 64))


def lat_unix_parent(res: Any, path: str, rounds: int, spin: float) -> tuple[float, float]:
    sock_path = res

    async def main() -> tuple[float, float]:
        done: asyncio.Future[tuple[float, float]] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            times = []
            clock = time.perf_counter
            for _ in range(rounds):
                t = clock()
                writer.write(PING)
                await reader.readexactly(64)
                times.append(clock() - t)
            done.set_result(percentiles(times[rounds // 10 :]))
            writer.close()

        server = await asyncio.start_unix_server(handle, sock_path)
        _signal_ready(sock_path)
        result = await done
        server.close()
        await server.wait_closed()
        return result

    return asyncio.run(main())


def lat_unix_child(res: Any, path: str, rounds: int, spin: float) -> None:
    sock_path = res

    async def main() -> None:
        _await_ready(sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path)
        for _ in range(rounds):
            writer.write(await reader.readexactly(64))
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())


def lat_zmq_parent(res: Any, path: str, rounds: int, spin: float) -> tuple[float, float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(f"ipc://{res}")
    _signal_ready(res)
    sock.recv()
    times = []
    clock = time.perf_counter
    for _ in range(rounds):
        t = clock()
        sock.send(PING)
        sock.recv()
        times.append(clock() - t)
    sock.close(0)
    ctx.term()
    return percentiles(times[rounds // 10 :])


def lat_zmq_child(res: Any, path: str, rounds: int, spin: float) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    _await_ready(res)  # connect after bind: no reliance on reconnection timers
    sock.connect(f"ipc://{res}")
    sock.send(b"hello")
    for _ in range(rounds):
        sock.send(sock.recv())
    sock.close(linger=-1)
    ctx.term()


# ============================================================================= main ===
def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    sys.stdout.flush()


def section_throughput(secs: float, repeat: int) -> None:
    for ring in (64 * KiB, MiB):
        results: dict[str, float] = {}
        cases: list[tuple[str, Any, Any, Any]] = [
            ("gntipc async (VchanStream)", tp_gntipc_async_parent, tp_gntipc_async_child, None),
            ("gntipc sync (Vchan)", tp_gntipc_sync_parent, tp_gntipc_sync_child, None),
            ("asyncio unix socket", tp_asyncio_parent, tp_asyncio_child, tmp_sock),
            ("os.pipe", tp_pipe_parent, tp_pipe_child, tp_pipe_setup(ring)),
            ("multiprocessing.Pipe", tp_mp_parent, tp_mp_child, lambda: CTX.Pipe()),
            ("pyzmq PAIR ipc://", tp_zmq_parent, tp_zmq_child, tmp_sock),
        ]
        for name, parent, child, setup in cases:
            results[name] = max(
                run_pair(parent, child, fresh_path(), ring, secs, setup=setup)
                for _ in range(repeat)
            )
        g = results["gntipc async (VchanStream)"]
        gs = results["gntipc sync (Vchan)"]
        rows = [
            [name, f"{v:,.0f}", f"{g / v:.2f}x", f"{gs / v:.2f}x"] for name, v in results.items()
        ]
        table(
            f"Throughput, 64 KiB sends, {ring // KiB} KiB ring (MB/s, best of {repeat})",
            ["transport", "MB/s", "async/this", "sync/this"],
            rows,
        )


def section_messages(secs: float, repeat: int) -> None:
    for batched in (False, True):
        results: dict[str, float] = {}
        label = (
            "put_many/get_many, 256 per batch"
            if batched
            else "put_nowait/get_nowait, one at a time"
        )
        cases: list[tuple[str, Any, Any, Any]] = [
            ("gntipc MessageQueue", msg_gntipc_parent, msg_gntipc_child, None),
            ("asyncio unix socket (u32 prefix)", msg_unix_parent, msg_unix_child, tmp_sock),
            ("pyzmq PAIR ipc://", msg_zmq_parent, msg_zmq_child, tmp_sock),
        ]
        for name, parent, child, setup in cases:
            results[name] = max(
                run_pair(parent, child, fresh_path(), batched, secs, setup=setup)
                for _ in range(repeat)
            )
        g = results["gntipc MessageQueue"]
        rows = [[name, f"{v:,.0f}", f"{g / v:.2f}x"] for name, v in results.items()]
        table(
            f"Typed 64-byte messages, {label} (msgs/s, 1 MiB ring, best of {repeat})",
            ["transport", "msgs/s", "gntipc/this"],
            rows,
        )


def section_latency(rounds: int) -> None:
    cases: list[tuple[str, Any, Any, Any, float]] = [
        ("gntipc async (VchanStream)", lat_gntipc_async_parent, lat_gntipc_async_child, None, 0.0),
        ("gntipc async, spin 50 µs", lat_gntipc_async_parent, lat_gntipc_async_child, None, 50e-6),
        ("gntipc sync (Vchan)", lat_gntipc_sync_parent, lat_gntipc_sync_child, None, 0.0),
        ("gntipc sync, spin 50 µs", lat_gntipc_sync_parent, lat_gntipc_sync_child, None, 50e-6),
        (
            "eventfd ping-pong (floor)",
            lat_eventfd_parent,
            lat_eventfd_child,
            lat_eventfd_setup,
            0.0,
        ),
        ("os.pipe", lat_pipe_parent, lat_pipe_child, lat_pipe_setup, 0.0),
        ("asyncio unix socket", lat_unix_parent, lat_unix_child, tmp_sock, 0.0),
        ("pyzmq PAIR ipc://", lat_zmq_parent, lat_zmq_child, tmp_sock, 0.0),
    ]
    results: dict[str, tuple[float, float]] = {}
    for name, parent, child, setup, spin in cases:
        results[name] = run_pair(parent, child, fresh_path(), rounds, spin, setup=setup)
    g = results["gntipc async (VchanStream)"][0]
    gs = results["gntipc sync (Vchan)"][0]
    rows = [
        [name, f"{p50:.1f}", f"{p99:.1f}", f"{g / p50:.2f}x", f"{gs / p50:.2f}x"]
        for name, (p50, p99) in results.items()
    ]
    table(
        f"Round trip of 64 bytes, {rounds} rounds"
        " (µs; ratio = gntipc p50 / this p50, lower is better)",
        ["transport", "p50 µs", "p99 µs", "async/this", "sync/this"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    ap.add_argument("--only", default="throughput,messages,latency")
    args = ap.parse_args()
    os.environ["GNTIPC_SIM_DIR"] = tempfile.mkdtemp(prefix="gntipc-bench-sim-")
    secs, repeat, rounds = (0.2, 1, 3000) if args.quick else (0.6, 2, 20000)
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    print(
        f"gntipc benchmarks: sim backend, two processes, Python {sys.version.split()[0]},"
        f" {os.cpu_count()} CPUs"
    )
    if "throughput" in only:
        section_throughput(secs, repeat)
    if "messages" in only:
        section_messages(secs, repeat)
    if "latency" in only:
        section_latency(rounds)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
