"""Latency: 64-byte ping-pong round trips, p50/p99, and the CPU both processes spent per
round trip.

gntipc with its default wait policy (spin briefly, then block) and with spinning off
(``spin = 0``: every wait sleeps on an event), async (``VchanStream.send``/``receive``)
and sync (``Vchan.send``/``recv``), vs a raw eventfd ping-pong (the floor for any
blocking wake-up between two processes), a pipe, a unix socket and pyzmq.  The first
tenth of the rounds is a warm-up, left out of the percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import anyio
import zmq
from _harness import (
    KiB,
    Meter,
    attempt,
    connect_unix,
    fmt,
    fresh_path,
    g_client,
    g_server,
    percentiles,
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
    zmq_silent,
)

PING = bytes(range(64))
Result = dict[str, Any]


def _result(times: list[float], rounds: int, meter: Meter, spin: float | None = None) -> Result:
    use = meter.stop()
    p50, p99 = percentiles(times[rounds // 10 :])
    return {"p50_us": p50, "p99_us": p99, "rounds": rounds, "spin_s": spin, **use._asdict()}


# -------------------------------------------------------------------------- gntipc ---
# ``spin``: None keeps the library's default policy, a number sets ``.spin``.
def gntipc_async_parent(_: Any, path: str, rounds: int, spin: float | None) -> Result:
    async def main() -> Result:
        async with g_server(path, 64 * KiB) as stream:
            if spin is not None:
                stream.spin = spin
            times = []
            clock = time.perf_counter
            meter = Meter()
            for _ in range(rounds):
                t = clock()
                await stream.send(PING)
                got = await stream.receive(64)
                times.append(clock() - t)
                assert len(got) == 64
            return _result(times, rounds, meter, stream.spin)

    return anyio.run(main)


def gntipc_async_child(_: Any, path: str, rounds: int, spin: float | None) -> Result:
    async def main() -> Result:
        async with g_client(path) as stream:
            if spin is not None:
                stream.spin = spin
            meter = Meter()
            for _ in range(rounds):
                await stream.send(await stream.receive(64))
            return meter.stop()._asdict()

    return anyio.run(main)


def gntipc_sync_parent(_: Any, path: str, rounds: int, spin: float | None) -> Result:
    with v_server(path, 64 * KiB) as v:
        if spin is not None:
            v.spin = spin
        times = []
        clock = time.perf_counter
        meter = Meter()
        for _ in range(rounds):
            t = clock()
            v.send(PING)
            got = v.recv(64)
            times.append(clock() - t)
            assert len(got) == 64
        return _result(times, rounds, meter, v.spin)


def gntipc_sync_child(_: Any, path: str, rounds: int, spin: float | None) -> Result:
    with v_client(path) as v:
        if spin is not None:
            v.spin = spin
        meter = Meter()
        for _ in range(rounds):
            v.send(v.recv(64))
        use = meter.stop()
        with contextlib.suppress(anyio.EndOfStream):
            v.recv(1)  # until the parent closes
    return use._asdict()


# ------------------------------------------------------------------------- eventfd ---
def eventfd_setup() -> tuple[int, int]:
    return os.eventfd(0), os.eventfd(0)


def eventfd_parent(res: Any, path: str, rounds: int, spin: float | None) -> Result:
    ping, pong = res
    times = []
    clock = time.perf_counter
    try:
        meter = Meter()
        for _ in range(rounds):
            t = clock()
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            times.append(clock() - t)
        return _result(times, rounds, meter)
    finally:
        os.close(ping)
        os.close(pong)


def eventfd_child(res: Any, path: str, rounds: int, spin: float | None) -> Result:
    ping, pong = res
    meter = Meter()
    for _ in range(rounds):
        os.eventfd_read(ping)
        os.eventfd_write(pong, 1)
    return meter.stop()._asdict()


# --------------------------------------------------------------------------- pipes ---
def pipe_setup() -> tuple[tuple[int, int], tuple[int, int]]:
    return os.pipe(), os.pipe()


def pipe_parent(res: Any, path: str, rounds: int, spin: float | None) -> Result:
    (r1, w1), (r2, w2) = res
    times = []
    clock = time.perf_counter
    try:
        meter = Meter()
        for _ in range(rounds):
            t = clock()
            os.write(w1, PING)
            got = os.read(r2, 64)
            times.append(clock() - t)
            assert len(got) == 64
        return _result(times, rounds, meter)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def pipe_child(res: Any, path: str, rounds: int, spin: float | None) -> Result:
    (r1, _), (_, w2) = res
    meter = Meter()
    for _ in range(rounds):
        os.write(w2, os.read(r1, 64))
    return meter.stop()._asdict()


# ------------------------------------------------------------- asyncio unix socket ---
def unix_parent(res: Any, path: str, rounds: int, spin: float | None) -> Result:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Result:
        times = []
        clock = time.perf_counter
        meter = Meter()
        for _ in range(rounds):
            t = clock()
            writer.write(PING)
            await reader.readexactly(64)
            times.append(clock() - t)
        return _result(times, rounds, meter)

    result: Result = serve_unix_once(res, handle)
    return result


def unix_child(res: Any, path: str, rounds: int, spin: float | None) -> Result:
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Result:
        meter = Meter()
        for _ in range(rounds):
            writer.write(await reader.readexactly(64))
        return meter.stop()._asdict()

    result: Result = connect_unix(res, run)
    return result


# --------------------------------------------------------------------------- pyzmq ---
def zmq_parent(res: Any, path: str, rounds: int, spin: float | None) -> Result | None:
    ctx, sock = zmq_bind(res)
    times = []
    clock = time.perf_counter
    try:
        sock.recv()
        meter = Meter()
        for _ in range(rounds):
            t = clock()
            sock.send(PING)
            sock.recv()
            times.append(clock() - t)
        return _result(times, rounds, meter)
    except zmq.Again:
        zmq_silent()
        return None
    finally:
        zmq_close(ctx, sock)


def zmq_child(res: Any, path: str, rounds: int, spin: float | None) -> Result:
    ctx, sock = zmq_connect(res)
    sock.send(b"hello")
    meter = Meter()
    for _ in range(rounds):
        sock.send(sock.recv())
    use = meter.stop()
    zmq_close(ctx, sock)
    return use._asdict()


# ------------------------------------------------------------------------- section ---
ASYNC = "gntipc async (default policy)"
SYNC = "gntipc sync (default policy)"


def section(rounds: int) -> dict[str, Any]:
    """Run and print the latency table; return its figures."""
    cases: list[tuple[str, Any, Any, Any, float | None]] = [
        (ASYNC, gntipc_async_parent, gntipc_async_child, None, None),
        ("gntipc async, spin off", gntipc_async_parent, gntipc_async_child, None, 0.0),
        (SYNC, gntipc_sync_parent, gntipc_sync_child, None, None),
        ("gntipc sync, spin off", gntipc_sync_parent, gntipc_sync_child, None, 0.0),
        ("eventfd ping-pong (floor)", eventfd_parent, eventfd_child, eventfd_setup, None),
        ("os.pipe", pipe_parent, pipe_child, pipe_setup, None),
        ("asyncio unix socket", unix_parent, unix_child, tmp_sock, None),
        ("pyzmq PAIR ipc://", zmq_parent, zmq_child, tmp_sock, None),
    ]
    results: dict[str, Any] = {}
    for name, parent, child, setup, spin in cases:
        # a budget for 500 µs round trips: far slower than any row has been
        pair = attempt(
            name,
            run_pair,
            parent,
            child,
            fresh_path(),
            rounds,
            spin,
            setup=setup,
            budget=rounds * 500e-6,
        )
        if pair is None:
            results[name] = None
            continue
        mine, theirs = pair
        results[name] = {
            "p50_us": mine["p50_us"],
            "p99_us": mine["p99_us"],
            "cpu_us_per_round_trip": (mine["cpu"] + theirs["cpu"]) / rounds * 1e6,
            "parent": mine,
            "child": theirs,
        }
    g = (results[ASYNC] or {}).get("p50_us")
    gs = (results[SYNC] or {}).get("p50_us")
    rows = []
    for name, r in results.items():
        r = r or {}
        p50 = r.get("p50_us")
        rows.append(
            [
                name,
                fmt(p50, ".1f"),
                fmt(r.get("p99_us"), ".1f"),
                fmt(r.get("cpu_us_per_round_trip"), ".1f"),
                ratio(g, p50),
                ratio(gs, p50),
            ]
        )
    table(
        f"Round trip of 64 bytes, {rounds} rounds (µs; CPU = both processes' CPU µs per"
        " round trip; ratio = gntipc p50 / this p50, lower is better)",
        ["transport", "p50 µs", "p99 µs", "CPU µs", "async/this", "sync/this"],
        rows,
    )
    spins = [
        f"{label} spin = {r['parent']['spin_s'] * 1e6:g} µs"
        for label, r in (("async", results[ASYNC]), ("sync", results[SYNC]))
        if r is not None
    ]
    if spins:
        print(f"(default policy: {', '.join(spins)}, the library's defaults)")
    return {"rounds": rounds, "rows": results}
