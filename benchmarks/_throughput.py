"""Throughput: 64 KiB sends, one direction, for 64 KiB and 1 MiB rings; MB/s and the CPU
time both processes spent per GB moved.

The sender sends for a fixed time, then ends the stream; the receiver measures from its
first chunk to the end.  Each side meters its own CPU (user + sys, every thread) over its
transfer loop; the child reports it to the parent.  The same "ring" size is given to the
peers that have one: the pipe's capacity (F_SETPIPE_SZ) and the send and receive buffers
of the unix socket and of pyzmq's (ZMQ_SNDBUF/ZMQ_RCVBUF).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import inspect
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import anyio
import zmq
from _harness import (
    CTX,
    KiB,
    Meter,
    MiB,
    attempt,
    connect_unix,
    fmt,
    fresh_path,
    g_client,
    g_server,
    ratio,
    run_pair,
    serve_unix_once,
    table,
    tmp_sock,
    v_client,
    v_server,
    zmq_bind,
    zmq_close,
    zmq_connect,
    zmq_receiver_finish,
    zmq_sender_finish,
    zmq_silent,
)

from gntipc import VchanStream

BLOCK = 64 * KiB
#: The receive buffer of the ``receive_into`` and sync ``readinto`` rows: the largest
#: ring, so a read is never cut short by the buffer.
RECV_BUFFER = MiB
_F_SETPIPE_SZ = 1031
_DEFAULT_MAX = inspect.signature(VchanStream.receive).parameters["max_bytes"].default

Result = dict[str, Any]


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and not n % MiB else f"{n}"


# --------------------------------------------------------------------- gntipc async ---
def gntipc_async_parent(mode: str, _: Any, path: str, ring: int, secs: float) -> Result:
    """The receiver; ``mode``: "receive" (default max_bytes), "receive:<n>", "into"."""

    async def main() -> Result:
        async with g_server(path, ring) as stream:
            total = 0
            await stream.receive()  # the clock starts at the first chunk
            meter = Meter()
            try:
                if mode == "receive":
                    receive = stream.receive
                    while True:
                        total += len(await receive())
                elif mode == "into":
                    buf = memoryview(bytearray(RECV_BUFFER))
                    receive_into = stream.receive_into
                    while True:
                        total += await receive_into(buf)
                else:
                    max_bytes = int(mode.split(":")[1])
                    receive = stream.receive
                    while True:
                        total += len(await receive(max_bytes))
            except anyio.EndOfStream:
                pass
            use = meter.stop()
        return {"bytes": total, **use._asdict()}

    return anyio.run(main)


def gntipc_async_child(_: Any, path: str, ring: int, secs: float) -> Result:
    async def main() -> Result:
        async with g_client(path) as stream:
            block = bytes(BLOCK)
            meter = Meter()
            end = time.perf_counter() + secs
            while time.perf_counter() < end:
                for _ in range(16):
                    await stream.send(block)
            await stream.send_eof()
            use = meter.stop()
        return use._asdict()

    return anyio.run(main)


# ---------------------------------------------------------------------- gntipc sync ---
def gntipc_sync_parent(_: Any, path: str, ring: int, secs: float) -> Result:
    with v_server(path, ring) as v:
        buf = memoryview(bytearray(RECV_BUFFER))
        total = 0
        v.readinto(buf)
        meter = Meter()
        readinto = v.readinto
        try:
            while True:
                total += readinto(buf)
        except anyio.EndOfStream:
            pass
        use = meter.stop()
    return {"bytes": total, **use._asdict()}


def gntipc_sync_child(_: Any, path: str, ring: int, secs: float) -> Result:
    with v_client(path) as v:
        block = bytes(BLOCK)
        meter = Meter()
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            for _ in range(16):
                v.write_all(block)
        v.send_eof()
        use = meter.stop()
    return use._asdict()


# --------------------------------------------------------------- asyncio unix socket ---
def asyncio_parent(res: Any, path: str, ring: int, secs: float) -> Result:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Result:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ring)
        await reader.read(ring)
        total = 0
        meter = Meter()
        while data := await reader.read(ring):
            total += len(data)
        return {"bytes": total, **meter.stop()._asdict()}

    result: Result = serve_unix_once(res, handle, limit=ring)
    return result


def asyncio_child(res: Any, path: str, ring: int, secs: float) -> Result:
    async def run(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Result:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ring)
        block = bytes(BLOCK)
        meter = Meter()
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            for _ in range(16):
                writer.write(block)
                await writer.drain()
        writer.close()
        await writer.wait_closed()
        return meter.stop()._asdict()

    result: Result = connect_unix(res, run)
    return result


# --------------------------------------------------------------------------- os.pipe ---
def pipe_setup(ring: int) -> Callable[[], tuple[int, int]]:
    def setup() -> tuple[int, int]:
        r, w = os.pipe()
        fcntl.fcntl(w, _F_SETPIPE_SZ, ring)
        return r, w

    return setup


def pipe_parent(res: Any, path: str, ring: int, secs: float) -> Result:
    r, w = res
    os.close(w)
    buf = memoryview(bytearray(ring))
    os.readv(r, [buf])
    total = 0
    meter = Meter()
    while n := os.readv(r, [buf]):
        total += n
    use = meter.stop()
    os.close(r)
    return {"bytes": total, **use._asdict()}


def pipe_child(res: Any, path: str, ring: int, secs: float) -> Result:
    r, w = res
    os.close(r)
    block = memoryview(bytes(BLOCK))
    meter = Meter()
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(16):
            view = block
            while view:
                view = view[os.write(w, view) :]
    os.close(w)
    return meter.stop()._asdict()


# -------------------------------------------------------------- multiprocessing.Pipe ---
def mp_parent(res: Any, path: str, ring: int, secs: float) -> Result:
    a, b = res
    b.close()
    buf = bytearray(BLOCK + 64)
    a.recv_bytes_into(buf)
    total = 0
    meter = Meter()
    while n := a.recv_bytes_into(buf):
        total += n
    use = meter.stop()
    a.close()
    return {"bytes": total, **use._asdict()}


def mp_child(res: Any, path: str, ring: int, secs: float) -> Result:
    a, b = res
    a.close()
    block = bytes(BLOCK)
    meter = Meter()
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(16):
            b.send_bytes(block)
    b.send_bytes(b"")
    b.close()
    return meter.stop()._asdict()


# ----------------------------------------------------------------------------- pyzmq ---
def zmq_parent(res: Any, path: str, ring: int, secs: float) -> Result | None:
    ctx, sock = zmq_bind(res, ring)
    total = 0
    try:
        sock.recv(copy=False)
        meter = Meter()
        while n := len(sock.recv(copy=False)):
            total += n
        use = meter.stop()
        zmq_receiver_finish(sock)
    except zmq.Again:
        zmq_silent()
        return None
    finally:
        zmq_close(ctx, sock)
    return {"bytes": total, **use._asdict()}


def zmq_child(res: Any, path: str, ring: int, secs: float) -> Result:
    ctx, sock = zmq_connect(res, ring)
    block = bytes(BLOCK)
    meter = Meter()
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(16):
            sock.send(block, copy=False)
    zmq_sender_finish(sock)
    use = meter.stop()
    zmq_close(ctx, sock)
    return use._asdict()


# ---------------------------------------------------------------------------- section ---
ASYNC_DEFAULT = f"gntipc async, receive() = receive({_DEFAULT_MAX})"
SYNC = "gntipc sync, write_all/readinto"


def _cases(ring: int) -> list[tuple[str, Any, Any, Any]]:
    async_rows = [(ASYNC_DEFAULT, "receive")]
    if _DEFAULT_MAX != 65536:  # the library's default changed: both rows then
        async_rows.append(("gntipc async, receive(65536)", "receive:65536"))
    async_rows += [
        (f"gntipc async, receive({_size(MiB)})", f"receive:{MiB}"),
        (f"gntipc async, receive_into({_size(RECV_BUFFER)} buffer)", "into"),
    ]
    cases: list[tuple[str, Any, Any, Any]] = [
        (name, functools.partial(gntipc_async_parent, mode), gntipc_async_child, None)
        for name, mode in async_rows
    ]
    cases += [
        (SYNC, gntipc_sync_parent, gntipc_sync_child, None),
        ("asyncio unix socket", asyncio_parent, asyncio_child, tmp_sock),
        ("os.pipe", pipe_parent, pipe_child, pipe_setup(ring)),
        ("multiprocessing.Pipe", mp_parent, mp_child, lambda: CTX.Pipe()),
        ("pyzmq PAIR ipc://", zmq_parent, zmq_child, tmp_sock),
    ]
    return cases


def _measure(name: str, parent: Any, child: Any, setup: Any, ring: int, secs: float) -> Any:
    pair = attempt(
        name, run_pair, parent, child, fresh_path(), ring, secs, setup=setup, budget=secs
    )
    if pair is None:
        return None
    rx, tx = pair
    gb = rx["bytes"] / 1e9
    return {
        "mb_per_s": rx["bytes"] / rx["seconds"] / 1e6,
        "cpu_s_per_gb": (rx["cpu"] + tx["cpu"]) / gb if gb else None,
        "receiver_cpu_s_per_gb": rx["cpu"] / gb if gb else None,
        "sender_cpu_s_per_gb": tx["cpu"] / gb if gb else None,
        "bytes": rx["bytes"],
        "receiver": rx,
        "sender": tx,
    }


def section(secs: float, repeat: int) -> list[dict[str, Any]]:
    """Run and print the throughput tables; return their figures."""
    out = []
    for ring in (64 * KiB, MiB):
        results: dict[str, Any] = {}
        for name, parent, child, setup in _cases(ring):
            runs = [_measure(name, parent, child, setup, ring, secs) for _ in range(repeat)]
            done = [r for r in runs if r is not None]
            best = max(done, key=lambda r: r["mb_per_s"]) if done else None
            results[name] = {"best": best, "runs": runs}
        best_of = {name: (r["best"] or {}) for name, r in results.items()}
        g = best_of[ASYNC_DEFAULT].get("mb_per_s")
        gs = best_of[SYNC].get("mb_per_s")
        rows = []
        for name, b in best_of.items():
            v = b.get("mb_per_s")
            rows.append(
                [
                    name,
                    fmt(v, ",.0f"),
                    fmt(b.get("cpu_s_per_gb"), ".2f"),
                    f"{fmt(b.get('receiver_cpu_s_per_gb'), '.2f')}"
                    f" + {fmt(b.get('sender_cpu_s_per_gb'), '.2f')}",
                    ratio(g, v),
                    ratio(gs, v),
                ]
            )
        table(
            f"Throughput, 64 KiB sends, {ring // KiB} KiB ring (MB/s, best of {repeat};"
            " CPU s/GB = both processes' CPU seconds per GB moved)",
            ["transport", "MB/s", "CPU s/GB", "receiver + sender", "async/this", "sync/this"],
            rows,
        )
        out.append({"ring": ring, "block": BLOCK, "seconds": secs, "rows": results})
    return out
