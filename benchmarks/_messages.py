"""Typed messages: ~64-byte msgspec Structs (a 64-byte frame on gntipc's wire), in four
shapes: one at a time as users write it (``await put(x)`` with ``async for x in queue``,
or with ``await queue.get()``), one at a time without waiting (``put_nowait``/
``get_nowait``, waiting only when full/empty) and batched (``put_many``/``get_many``, 256
per batch: one batch frame), vs the same typed work in the same shape of calls (see
:data:`CALLS`) over a unix socket (asyncio streams, u32 length prefix) and pyzmq PAIR over
ipc:// (``zmq.asyncio`` where gntipc awaits; batched: one msgpack array per zmq message or
socket frame, decoded by a ``list[T]`` decoder), their kernel buffers as large as the
ring.  Every message is decoded and type-checked by the receiver.

Then each of these against what a user would pick instead, in the same run:

* the same queue over one :class:`gntipc.SessionStream` of a :class:`gntipc.Session`
  (one logical stream multiplexed over the vchan) vs over the bare ``VchanStream``;
* request/response (``examples/rpc.py``: a typed request, a typed reply, one call in
  flight) vs the raw 64-byte ``VchanStream`` round trip of the latency section;
* the queue over anyio TCP on 127.0.0.1 vs pyzmq PAIR over tcp://127.0.0.1;
* 1 MiB messages one at a time (a Struct with a 1 MiB ``bytes`` field) vs the raw
  ``VchanStream`` moving the same bytes with ``send(1 MiB)``/``receive(1 MiB)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import _latency
import anyio
import msgspec
import zmq
import zmq.asyncio
from _harness import (
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
    zmq_close,
    zmq_pair,
    zmq_receiver_finish,
    zmq_sender_finish,
    zmq_silent,
)
from anyio.abc import ByteStream, SocketListener

from gntipc import MessageQueue, Session

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


class Blob(msgspec.Struct):
    """A large typed message: 1 MiB of payload."""

    name: str
    data: bytes


class Request(msgspec.Struct, tag=True):
    """A call of the request/response table (``examples/rpc.py``'s shape)."""

    id: int
    sample: Sample


class Reply(msgspec.Struct, tag=True):
    id: int
    value: float


Call = Request | Reply


# ------------------------------------------------------------------ what is moved ---
class Work(NamedTuple):
    """What a transfer moves: ``type`` None is the raw ``VchanStream`` (bytes)."""

    type: Any
    items: Callable[[], list[Any]]  # what the sender sends, over and over
    max_message_size: int = MiB


SMALL, LARGE, LARGE_RAW = "small", "large", "large-raw"
WORK = {
    SMALL: Work(Sample, lambda: make_samples(256)),
    # the frame (1 MiB and a few bytes) exceeds the queue's default maximum of 1 MiB
    LARGE: Work(Blob, lambda: [Blob("blob", bytes(MiB))] * 4, 2 * MiB),
    LARGE_RAW: Work(None, lambda: [bytes(MiB)] * 4),
}

# How the two processes are connected.
VCHAN, SESSION, TCP, IPC = "vchan", "session", "tcp", "ipc"
RING = MiB


def tcp_listener() -> socket.socket:
    """The setup of a TCP row: a socket listening on a free port of 127.0.0.1, made
    before the fork, so the child connects to it at once."""
    return socket.create_server(("127.0.0.1", 0))


@contextlib.asynccontextmanager
async def _stream(receiver: bool, res: Any, path: str, via: str) -> AsyncIterator[ByteStream]:
    """One side's stream: the receiver (the parent) listens, the sender connects.  Over
    a vchan (``VCHAN``), one logical stream of a Session over it (``SESSION``), or TCP
    (``res``: the listening socket)."""
    if via == TCP:
        if receiver:
            async with (
                await SocketListener.from_socket(res) as listener,
                await listener.accept() as stream,
            ):
                yield stream
        else:
            port = res.getsockname()[1]
            res.close()  # the parent's, inherited by fork
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                yield stream
        return
    async with g_server(path, RING) if receiver else g_client(path) as vchan:
        if via == SESSION:
            async with Session(vchan) as session:
                opened = session.accept_stream() if receiver else session.open_stream()
                async with await opened as stream:
                    yield stream
        else:
            yield vchan


# -------------------------------------------------------------------------- gntipc ---
AWAIT, AWAIT_GET, NOWAIT, BATCHED = "await", "await-get", "nowait", "batched"


def gntipc_parent(res: Any, path: str, mode: str, secs: float, via: str, work: str) -> float:
    """The receiver: messages per second from its first message to the end of the stream
    (for the raw ``LARGE_RAW``: 1 MiB blocks of bytes per second)."""
    spec = WORK[work]

    async def main() -> float:
        async with _stream(True, res, path, via) as stream:
            if spec.type is None:
                return await _receive_blocks(stream)
            queue = MessageQueue(stream, spec.type, max_message_size=spec.max_message_size)
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
            elif mode == AWAIT_GET:
                get = queue.get
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        await get()
                        count += 1
            else:
                get_nowait = queue.get_nowait
                while True:
                    try:
                        get_nowait()
                        count += 1
                    except anyio.WouldBlock:
                        await stream.wait_readable()  # type: ignore[attr-defined]
                    except anyio.EndOfStream:
                        break
            dt = time.perf_counter() - t0
        return count / dt

    return anyio.run(main)


async def _receive_blocks(stream: ByteStream) -> float:
    receive = stream.receive
    await receive(MiB)  # the clock starts at the first chunk
    t0 = time.perf_counter()
    total = 0
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            total += len(await receive(MiB))
    return total / MiB / (time.perf_counter() - t0)


def gntipc_child(res: Any, path: str, mode: str, secs: float, via: str, work: str) -> None:
    spec = WORK[work]

    async def main() -> None:
        async with _stream(False, res, path, via) as stream:
            items = spec.items()
            end = time.perf_counter() + secs
            if spec.type is None:  # raw bytes
                await _send_for(stream.send, items, end)
                await stream.send_eof()
                return
            queue = MessageQueue(stream, spec.type, max_message_size=spec.max_message_size)
            if mode == BATCHED:
                while time.perf_counter() < end:
                    for _ in range(16):
                        await queue.put_many(items)
            elif mode in (AWAIT, AWAIT_GET):
                await _send_for(queue.put, items, end)
            else:
                put_nowait = queue.put_nowait
                while time.perf_counter() < end:
                    for m in items:
                        try:
                            put_nowait(m)
                        except anyio.WouldBlock:
                            await stream.wait_writable(64)  # type: ignore[attr-defined]
                            await queue.put(m)
            await stream.send_eof()

    anyio.run(main)


async def _send_for(put: Callable[[Any], Any], items: list[Any], end: float) -> None:
    """``await put(item)`` for each of ``items``, over and over until ``end``."""
    while time.perf_counter() < end:
        for m in items:
            await put(m)


# ------------------------------------------------------------- asyncio unix socket ---
# The same typed work and the same shape of calls as the gntipc rows of each mode, with
# the ring's size as the socket's kernel buffers (SO_SNDBUF/SO_RCVBUF, both ends): one
# at a time, a frame is a u32 length and one message; batched, a u32 length and one
# msgpack array of the batch, decoded by one ``Decoder(list[Sample])`` call.
def _socket_buffers(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RING)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RING)


def unix_parent(res: Any, path: str, mode: str, secs: float, via: str, work: str) -> float:
    decode = msgspec.msgpack.Decoder(Sample).decode
    decode_many = msgspec.msgpack.Decoder(list[Sample]).decode

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        _socket_buffers(writer)
        readexactly = reader.readexactly

        async def get() -> Sample:  # the socket's ``await queue.get()``
            (n,) = _U32.unpack(await readexactly(4))
            return decode(await readexactly(n))

        async def messages() -> AsyncIterator[Sample]:  # its ``async for x in queue``
            with contextlib.suppress(asyncio.IncompleteReadError):
                while True:
                    (n,) = _U32.unpack(await readexactly(4))
                    yield decode(await readexactly(n))

        count = 0
        if mode in (NOWAIT, BATCHED):
            return await _parse_frames(reader, decode_many if mode == BATCHED else decode)
        await get()  # the clock starts at the first message
        t0 = time.perf_counter()
        if mode == AWAIT:
            async for _ in messages():
                count += 1
        else:
            with contextlib.suppress(asyncio.IncompleteReadError):
                while True:
                    await get()
                    count += 1
        return count / (time.perf_counter() - t0)

    rate: float = serve_unix_once(res, handle, limit=MiB)
    return rate


async def _parse_frames(reader: asyncio.StreamReader, decode: Callable[[Any], Any]) -> float:
    """The socket's ``get_nowait``/``get_many``: frames decoded one by one from what one
    read returned, waiting (``await read``) only when no whole frame is left; messages
    per second from the end of the first read.  A frame decoded as a list counts its
    items."""
    pending = b""
    count = 0
    t0 = 0.0
    while data := await reader.read(MiB):
        buf = pending + data if pending else data
        view = memoryview(buf)
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = _U32.unpack_from(buf, pos)
            if pos + 4 + n > end:
                break
            m = decode(view[pos + 4 : pos + 4 + n])
            count += len(m) if isinstance(m, list) else 1
            pos += 4 + n
        pending = buf[pos:]
        if not t0:  # what the first read brought is not counted
            t0, count = time.perf_counter(), 0
    return count / (time.perf_counter() - t0)


def unix_child(res: Any, path: str, mode: str, secs: float, via: str, work: str) -> None:
    async def run(__: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _socket_buffers(writer)
        samples = make_samples(256)
        encode = msgspec.msgpack.Encoder().encode
        write, drain = writer.write, writer.drain
        transport = writer.transport
        _, high = transport.get_write_buffer_limits()
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            if mode == BATCHED:  # the socket's ``await put_many(batch)``
                for _ in range(16):
                    payload = encode(samples)
                    write(_U32.pack(len(payload)) + payload)
                    await drain()
            elif mode == NOWAIT:  # ``put_nowait``: wait only when the buffer is full
                for m in samples:
                    payload = encode(m)
                    write(_U32.pack(len(payload)) + payload)
                    if transport.get_write_buffer_size() > high:
                        await drain()
            else:  # the socket's ``await put(x)``
                for m in samples:
                    payload = encode(m)
                    write(_U32.pack(len(payload)) + payload)
                    await drain()

    connect_unix(res, run)


# --------------------------------------------------------------------------- pyzmq ---
# Over ipc:// with the ring's size as kernel buffers (over TCP with the defaults, as
# gntipc's TCP row).  One at a time with await: ``zmq.asyncio`` (``await send`` /
# ``await recv``, or ``async for`` over them); without: the blocking ``send``/``recv``,
# which return at once unless the queue is full or empty (the cost of ``*_nowait``);
# batched: one msgpack array per zmq message, the fastest way to use pyzmq.
def _zmq(res: str, via: str, bind: bool, ctx: zmq.Context[Any] | None = None) -> Any:
    return zmq_pair(res, bind, buffers=0 if via == TCP else RING, tcp=via == TCP, ctx=ctx)


def zmq_parent(res: Any, path: str, mode: str, secs: float, via: str, work: str) -> float | None:
    if mode in (AWAIT, AWAIT_GET):
        return asyncio.run(_zmq_async_parent(res, mode, via))
    decode = msgspec.msgpack.Decoder(Sample).decode
    decode_many = msgspec.msgpack.Decoder(list[Sample]).decode
    ctx, sock = _zmq(res, via, bind=True)
    count = 0
    try:
        sock.recv()
        t0 = time.perf_counter()
        while data := sock.recv():
            if mode == BATCHED:
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


async def _zmq_async_parent(res: str, mode: str, via: str) -> float:
    """The ``zmq.asyncio`` receiver (no RCVTIMEO, see zmq_pair: a silent peer is stopped
    by the row's deadline)."""
    decode = msgspec.msgpack.Decoder(Sample).decode
    ctx, sock = _zmq(res, via, bind=True, ctx=zmq.asyncio.Context())
    recv = sock.recv

    async def messages() -> AsyncIterator[Sample]:
        while data := await recv():
            yield decode(data)

    count = 0
    try:
        await recv()
        t0 = time.perf_counter()
        if mode == AWAIT:
            async for _ in messages():
                count += 1
        else:
            while data := await recv():
                decode(data)
                count += 1
        rate = count / (time.perf_counter() - t0)
        await sock.send(b"ack")  # zmq_receiver_finish
    finally:
        zmq_close(ctx, sock)
    return rate


def zmq_child(res: Any, path: str, mode: str, secs: float, via: str, work: str) -> None:
    if mode in (AWAIT, AWAIT_GET):
        asyncio.run(_zmq_async_child(res, via, secs))
        return
    ctx, sock = _zmq(res, via, bind=False)
    samples = make_samples(256)
    encode = msgspec.msgpack.Encoder().encode
    sock.send(encode(samples[0]))
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        if mode == BATCHED:
            for _ in range(16):
                sock.send(encode(samples))  # one msgpack array per zmq message
        else:
            for m in samples:
                sock.send(encode(m))
    zmq_sender_finish(sock)
    zmq_close(ctx, sock)


def zmq_sync_parent(res: Any, path: str, mode: str, *rest: Any) -> float | None:
    """pyzmq's blocking ``recv``, one at a time, in whatever table: its fastest way of
    taking messages one by one, shown beside the ``zmq.asyncio`` row of an await table."""
    return zmq_parent(res, path, NOWAIT, *rest)


def zmq_sync_child(res: Any, path: str, mode: str, *rest: Any) -> None:
    zmq_child(res, path, NOWAIT, *rest)


async def _zmq_async_child(res: str, via: str, secs: float) -> None:
    ctx, sock = _zmq(res, via, bind=False, ctx=zmq.asyncio.Context())
    try:
        samples = make_samples(256)
        encode = msgspec.msgpack.Encoder().encode
        send = sock.send
        await send(encode(samples[0]))
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            for m in samples:
                await send(encode(m))
        await send(b"")  # zmq_sender_finish
        await sock.recv()
    finally:
        zmq_close(ctx, sock)


# ---------------------------------------------------------------- request/response ---
# The same shape and ring (64 KiB) as the latency section's gntipc async row, which is
# the raw figure next to it: the parent times each call, the child answers.
def rpc_parent(_: Any, path: str, rounds: int, spin: float | None) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with g_server(path, 64 * KiB) as stream:
            queue = MessageQueue(stream, Call)
            sample = make_samples(1)[0]
            times = []
            clock = time.perf_counter
            meter = Meter()
            for i in range(rounds):
                t = clock()
                await queue.put(Request(i, sample))
                reply = await queue.get()
                times.append(clock() - t)
                assert isinstance(reply, Reply) and reply.id == i, reply
            return _latency._result(times, rounds, meter, stream.spin)

    return anyio.run(main)


def rpc_child(_: Any, path: str, rounds: int, spin: float | None) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with g_client(path) as stream:
            queue = MessageQueue(stream, Call)
            meter = Meter()
            for _ in range(rounds):
                request = await queue.get()
                assert isinstance(request, Request), request
                await queue.put(Reply(request.id, request.sample.value))
            return meter.stop()._asdict()

    return anyio.run(main)


# ------------------------------------------------------------------------- section ---
GNTIPC = "gntipc MessageQueue"
UNIX = "asyncio unix socket (u32 prefix)"
ZMQ_IPC = "pyzmq PAIR ipc://"
MODES = {
    AWAIT: "await put / async for, one at a time",
    AWAIT_GET: "await put / await get, one at a time",
    NOWAIT: "put_nowait/get_nowait, one at a time",
    BATCHED: "put_many/get_many, 256 per batch",
}
_FRAME = "write(u32 + msg)"
_READ2 = "readexactly(4), readexactly(n), decode"
#: What each side of each transport calls, per message (per batch when batched): the
#: same shape on every transport of a table (printed under it, and in the JSON).
CALLS: dict[str, dict[str, str]] = {
    AWAIT: {
        GNTIPC: "await queue.put(x) / async for x in queue",
        UNIX: f"{_FRAME}; await drain() / async for over a generator: await {_READ2}",
        ZMQ_IPC: "zmq.asyncio: await send(x) / async for over a generator: await recv(), decode",
    },
    AWAIT_GET: {
        GNTIPC: "await queue.put(x) / await queue.get()",
        UNIX: f"{_FRAME}; await drain() / await get(): await {_READ2}",
        ZMQ_IPC: "zmq.asyncio: await send(x) / await recv(), decode",
    },
    NOWAIT: {
        GNTIPC: "put_nowait(x), await wait_writable() only on WouldBlock"
        " / get_nowait(), await wait_readable() only on WouldBlock",
        UNIX: f"{_FRAME}, await drain() only above the high-water mark"
        " / decode frame by frame what one await read(1 MiB) brought",
        ZMQ_IPC: "send(x) / recv(), decode (sync; they block only when full or empty)",
    },
    BATCHED: {
        GNTIPC: "await put_many(256): one batch frame, one msgpack array, one encode"
        " / get_many(): one decode per batch frame",
        UNIX: "write(u32 + one msgpack array of 256, one encode); await drain()"
        " / one Decoder(list[Sample]) call per frame",
        ZMQ_IPC: "send(one msgpack array of 256, one encode) / recv(), one"
        " Decoder(list[Sample]) call (the fastest way to use pyzmq)",
    },
}


class Case(NamedTuple):
    name: str
    parent: Callable[..., Any]
    child: Callable[..., Any]
    setup: Callable[[], Any] | None = None
    via: str = VCHAN
    work: str = SMALL


def _rates(
    cases: list[Case], mode: str, secs: float, repeat: int, key: str, scale: float = 1.0
) -> dict[str, Any]:
    """Each case's best rate of ``repeat`` runs (times ``scale``, as ``key``) and every
    run (None: skipped); the repeats take turns, so a slow spell hits every case."""
    runs: dict[str, list[float | None]] = {case.name: [] for case in cases}
    for _ in range(repeat):
        for c in cases:
            pair = attempt(
                c.name,
                run_pair,
                c.parent,
                c.child,
                fresh_path(),
                mode,
                secs,
                c.via,
                c.work,
                setup=c.setup,
                budget=secs,
            )
            runs[c.name].append(None if pair is None else pair[0] * scale)
    return {
        name: {key: max((x for x in r if x is not None), default=None), "runs": r}
        for name, r in runs.items()
    }


def _print(
    title: str,
    results: dict[str, Any],
    columns: list[tuple[str, str, str]],
    short: str,
    calls: dict[str, str] | None = None,
) -> float | None:
    """Print ``results`` (name -> figures; the first row is gntipc's) as a table:
    ``columns`` are (header, key, format), then ``short``/this, the ratio of the first
    row's first figure to each row's.  Returns that ratio for the last row."""
    key = columns[0][1]
    figures = [r or {} for r in results.values()]
    mine = figures[0].get(key)
    rows = [
        [name, *(fmt(r.get(k), spec) for _, k, spec in columns), ratio(mine, r.get(key))]
        for name, r in zip(results, figures, strict=True)
    ]
    table(title, ["transport", *(h for h, _, _ in columns), f"{short}/this"], rows)
    for name, what in (calls or {}).items():
        print(f"  {name}: {what}")
    ref = figures[-1].get(key)
    return mine / ref if mine is not None and ref else None


def _goal(name: str, value: float | None, goal: float, higher: bool = True) -> dict[str, Any]:
    """The JSON of a table's headline ratio and its goal (issue #18)."""
    met = None if value is None else (value >= goal if higher else value <= goal)
    sign = ">=" if higher else "<="
    verdict = "n/a" if met is None else "met" if met else "MISSED"
    print(f"({name} = {fmt(value, '.2f')}x; goal {sign} {goal}x: {verdict})")
    return {"ratio_name": name, "ratio": value, "goal": f"{sign} {goal}x", "goal_met": met}


MSGS = [("msgs/s", "msgs_per_s", ",.0f")]
MBS = [("MB/s", "mb_per_s", ",.0f")]
RPC_ROW = "MessageQueue request/reply (rpc)"


def _versus(
    kind: str,
    mode: str,
    title: str,
    goal: tuple[str, float],
    cases: list[Case],
    secs: float,
    repeat: int,
    columns: list[tuple[str, str, str]] = MSGS,
    scale: float = 1.0,
    calls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A table of gntipc's way (the first case) against the alternative (the last);
    ``goal``: the name of their ratio and its least value; ``calls``: what each row
    calls (printed under the table).  Returns the table's JSON."""
    results = _rates(cases, mode, secs, repeat, columns[0][1], scale)
    name, least = goal
    title = f"{title}, {MODES[mode]} ({columns[0][0]}, best of {repeat})"
    value = _print(title, results, columns, name.split("/")[0], calls)
    return {
        "table": kind,
        "mode": mode,
        "label": MODES[mode],
        "rows": results,
        "calls": calls,
        **_goal(name, value, least),
    }


def _rpc(rounds: int) -> dict[str, Any]:
    """Request/response vs the raw round trip: p50/p99 µs, CPU µs per round trip."""
    results: dict[str, Any] = {}
    for name, parent, child in (
        (RPC_ROW, rpc_parent, rpc_child),
        (
            "VchanStream 64-byte round trip (raw)",
            _latency.gntipc_async_parent,
            _latency.gntipc_async_child,
        ),
    ):
        pair = attempt(
            name, run_pair, parent, child, fresh_path(), rounds, None, budget=rounds * 500e-6
        )
        # the parent's figures (p50_us, p99_us, its CPU...), the child's, and both CPUs
        results[name] = pair and {
            **pair[0],
            "child": pair[1],
            "cpu_us_per_round_trip": (pair[0]["cpu"] + pair[1]["cpu"]) / rounds * 1e6,
        }
    value = _print(
        "Request/response, one typed call in flight, MessageQueue on each side, 64 KiB ring,"
        f" vs the raw 64-byte round trip ({rounds} round trips, µs; CPU = both processes')",
        results,
        [
            ("p50 µs", "p50_us", ".1f"),
            ("p99 µs", "p99_us", ".1f"),
            ("CPU µs", "cpu_us_per_round_trip", ".1f"),
        ],
        "rpc",
    )
    return {
        "table": "rpc",
        "mode": "request/response",
        "label": "typed request, typed reply, one call in flight",
        "rounds": rounds,
        "rows": results,
        **_goal("rpc/raw p50", value, 2.0, higher=False),
    }


def section(secs: float, repeat: int, rounds: int) -> list[dict[str, Any]]:
    """Run and print the typed-message tables; return their figures (msgs/s, µs, MB/s)."""
    out = []
    for mode, label in MODES.items():
        cases = [
            Case(GNTIPC, gntipc_parent, gntipc_child),
            Case(UNIX, unix_parent, unix_child, tmp_sock),
            Case(ZMQ_IPC, zmq_parent, zmq_child, tmp_sock, IPC),
        ]
        results = _rates(cases, mode, secs, repeat, "msgs_per_s")
        title = (
            f"Typed 64-byte messages, {label} (msgs/s, best of {repeat}; 1 MiB ring, 1 MiB"
            " socket buffers)"
        )
        _print(title, results, MSGS, "gntipc", CALLS[mode])
        out.append(
            {
                "mode": mode,
                "batched": mode == BATCHED,
                "label": label,
                "rows": results,
                "calls": CALLS[mode],
            }
        )
    gp, gc = gntipc_parent, gntipc_child
    session = [
        Case("MessageQueue over a SessionStream", gp, gc, via=SESSION),
        Case("MessageQueue over the bare VchanStream", gp, gc),
    ]
    tcp = [
        Case("gntipc MessageQueue over anyio TCP", gp, gc, tcp_listener, TCP),
        Case("pyzmq PAIR tcp://127.0.0.1", zmq_parent, zmq_child, tmp_sock, TCP),
    ]
    large = [
        Case("MessageQueue, a Struct with 1 MiB of bytes", gp, gc, work=LARGE),
        Case("VchanStream send(1 MiB)/receive(1 MiB) (raw)", gp, gc, work=LARGE_RAW),
    ]
    for mode in (AWAIT, BATCHED):
        title = "Typed 64-byte messages, one Session stream vs the bare vchan, 1 MiB ring"
        out.append(_versus("session", mode, title, ("session/bare", 0.7), session, secs, repeat))
    out.append(_rpc(rounds))
    zmq_sync = Case(
        "pyzmq PAIR tcp://127.0.0.1, sync", zmq_sync_parent, zmq_sync_child, tmp_sock, TCP
    )
    for mode in (AWAIT, BATCHED):
        title = "Typed 64-byte messages across hosts (TCP, 127.0.0.1, default buffers)"
        # pyzmq's own fastest one-at-a-time way too, for reference (batched it is the row)
        cases = tcp if mode == BATCHED else [tcp[0], zmq_sync, tcp[1]]
        calls = {
            tcp[0].name: CALLS[mode][GNTIPC],
            zmq_sync.name: CALLS[NOWAIT][ZMQ_IPC],
            tcp[1].name: CALLS[mode][ZMQ_IPC],
        }
        calls = {c.name: calls[c.name] for c in cases}
        goal = ("gntipc/pyzmq", 1.0)
        out.append(_versus("tcp", mode, title, goal, cases, secs, repeat, calls=calls))
    title = "1 MiB messages (payload), 1 MiB ring"
    mbs = (MBS, MiB / 1e6)  # (1 MiB items per second) * MiB / 1e6
    out.append(_versus("large", AWAIT, title, ("queue/raw", 0.8), large, secs, repeat, *mbs))
    return out
