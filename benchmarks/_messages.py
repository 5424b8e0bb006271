"""Typed messages: ~64-byte msgspec Structs (a 64-byte frame on gntipc's wire), in three
shapes: one at a time as users write it (``await put(x)`` / ``async for x in queue``),
one at a time without waiting (``put_nowait``/``get_nowait``, waiting only when
full/empty) and batched (``put_many``/``get_many``, 256 per batch), vs the same typed work
over a unix socket (asyncio streams, u32 length prefix) and pyzmq PAIR over ipc:// (one
message per zmq message; batched: one msgpack array per zmq message, decoded by a
``list[T]`` decoder).  Every message is decoded and type-checked by the receiver.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import anyio
import msgspec
import zmq
from _harness import (
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
    zmq_bind,
    zmq_close,
    zmq_connect,
    zmq_receiver_finish,
    zmq_sender_finish,
    zmq_silent,
)

from gntipc import MessageQueue

_U32 = struct.Struct("<I")


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


# -------------------------------------------------------------------------- gntipc ---
AWAIT, NOWAIT, BATCHED = "await", "nowait", "batched"


def gntipc_parent(_: Any, path: str, mode: str, secs: float) -> float:
    async def main() -> float:
        async with g_server(path, 1 * MiB) as stream:
            queue = MessageQueue(stream, Sample)
            count = 0
            await queue.get()
            t0 = time.perf_counter()
            if mode == BATCHED:
                try:
                    while True:
                        count += len(await queue.get_many())
                except anyio.EndOfStream:
                    pass
            elif mode == AWAIT:
                async for _ in queue:
                    count += 1
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
        return count / dt

    return anyio.run(main)


def gntipc_child(_: Any, path: str, mode: str, secs: float) -> None:
    async def main() -> None:
        async with g_client(path) as stream:
            queue = MessageQueue(stream, Sample)
            samples = make_samples(256)
            end = time.perf_counter() + secs
            if mode == BATCHED:
                while time.perf_counter() < end:
                    for _ in range(16):
                        await queue.put_many(samples)
            elif mode == AWAIT:
                put = queue.put
                while time.perf_counter() < end:
                    for m in samples:
                        await put(m)
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

    anyio.run(main)


# ------------------------------------------------------------- asyncio unix socket ---
def unix_parent(res: Any, path: str, mode: str, secs: float) -> float:
    batched = mode == BATCHED
    decode = msgspec.msgpack.Decoder(Sample).decode

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
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
        return count / (time.perf_counter() - t0)

    rate: float = serve_unix_once(res, handle, limit=MiB)
    return rate


def unix_child(res: Any, path: str, mode: str, secs: float) -> None:
    batched = mode == BATCHED
    async def run(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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

    connect_unix(res, run)


# --------------------------------------------------------------------------- pyzmq ---
def zmq_parent(res: Any, path: str, mode: str, secs: float) -> float | None:
    batched = mode == BATCHED
    decode = msgspec.msgpack.Decoder(Sample).decode
    decode_many = msgspec.msgpack.Decoder(list[Sample]).decode
    ctx, sock = zmq_bind(res)
    count = 0
    try:
        sock.recv()
        t0 = time.perf_counter()
        while data := sock.recv():
            if batched:
                count += len(decode_many(data))
            else:
                decode(data)
                count += 1
        dt = time.perf_counter() - t0
        zmq_receiver_finish(sock)
    except zmq.Again:
        zmq_silent()
        return None
    finally:
        zmq_close(ctx, sock)
    return count / dt


def zmq_child(res: Any, path: str, mode: str, secs: float) -> None:
    batched = mode == BATCHED
    ctx, sock = zmq_connect(res)
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
    zmq_sender_finish(sock)
    zmq_close(ctx, sock)


# ------------------------------------------------------------------------- section ---
GNTIPC = "gntipc MessageQueue"
MODES = {
    AWAIT: "await put / async for, one at a time",
    NOWAIT: "put_nowait/get_nowait, one at a time",
    BATCHED: "put_many/get_many, 256 per batch",
}


def section(secs: float, repeat: int) -> list[dict[str, Any]]:
    """Run and print the typed-message tables; return their figures (msgs/s)."""
    out = []
    for mode, label in MODES.items():
        cases: list[tuple[str, Any, Any, Any]] = [
            (GNTIPC, gntipc_parent, gntipc_child, None),
            ("asyncio unix socket (u32 prefix)", unix_parent, unix_child, tmp_sock),
            ("pyzmq PAIR ipc://", zmq_parent, zmq_child, tmp_sock),
        ]
        results: dict[str, Any] = {}
        for name, parent, child, setup in cases:
            runs = []
            for _ in range(repeat):
                pair = attempt(
                    name,
                    run_pair,
                    parent,
                    child,
                    fresh_path(),
                    mode,
                    secs,
                    setup=setup,
                    budget=secs,
                )
                runs.append(None if pair is None else pair[0])
            done = [r for r in runs if r is not None]
            results[name] = {"msgs_per_s": max(done) if done else None, "runs": runs}
        g = results[GNTIPC]["msgs_per_s"]
        rows = [
            [name, fmt(r["msgs_per_s"], ",.0f"), ratio(g, r["msgs_per_s"])]
            for name, r in results.items()
        ]
        table(
            f"Typed 64-byte messages, {label} (msgs/s, 1 MiB ring, best of {repeat})",
            ["transport", "msgs/s", "gntipc/this"],
            rows,
        )
        out.append({"mode": mode, "batched": mode == BATCHED, "label": label, "rows": results})
    return out
