"""Idle cost: what a connected pair burns while nothing happens, right after being busy.

A burst of 64-byte round trips (which warms the spin-then-block policy up), then both
sides wait to receive for a fixed window: the server with a timeout, the client until the
server's "bye" at the end of the window.  Each process meters its own CPU time and
context switches (each sleep-and-wake is at least one) over its window.  The target is at
most 1 % of a core per process.
"""

from __future__ import annotations

from typing import Any

import anyio
from _harness import (
    KiB,
    Meter,
    attempt,
    fmt,
    fresh_path,
    g_client,
    g_server,
    run_pair,
    table,
    v_client,
    v_server,
)

PING = bytes(range(64))
BYE = b"bye"
#: Most CPU a process may spend idling: 1 % of a core.
TARGET_PERCENT = 1.0

Result = dict[str, Any]


def _report(meter: Meter) -> Result:
    use = meter.stop()
    return {
        **use._asdict(),
        "cpu_percent": 100 * use.cpu / use.seconds,
        "ctx_switches_per_s": use.ctx_switches / use.seconds,
    }


def async_parent(_: Any, path: str, burst: int, idle: float) -> Result:
    async def main() -> Result:
        async with g_server(path, 64 * KiB) as stream:
            for _ in range(burst):
                await stream.send(PING)
                await stream.receive(64)
            meter = Meter()
            with anyio.move_on_after(idle):
                data = await stream.receive()
                raise RuntimeError(f"unexpected data while idle: {data[:16]!r}")
            result = _report(meter)
            await stream.send(BYE)
        return result

    return anyio.run(main)


def async_child(_: Any, path: str, burst: int, idle: float) -> Result:
    async def main() -> Result:
        async with g_client(path) as stream:
            for _ in range(burst):
                await stream.send(await stream.receive(64))
            meter = Meter()
            data = await stream.receive()
            result = _report(meter)
            if data != BYE:
                raise RuntimeError(f"expected {BYE!r}, got {data[:16]!r}")
        return result

    return anyio.run(main)


def sync_parent(_: Any, path: str, burst: int, idle: float) -> Result:
    with v_server(path, 64 * KiB) as v:
        for _ in range(burst):
            v.send(PING)
            v.recv(64)
        meter = Meter()
        try:
            data = v.read(64, timeout=idle)
        except TimeoutError:
            pass
        else:
            raise RuntimeError(f"unexpected data while idle: {data[:16]!r}")
        result = _report(meter)
        v.send(BYE)
    return result


def sync_child(_: Any, path: str, burst: int, idle: float) -> Result:
    with v_client(path) as v:
        for _ in range(burst):
            v.send(v.recv(64))
        meter = Meter()
        data = v.read(64)
        result = _report(meter)
        if data != BYE:
            raise RuntimeError(f"expected {BYE!r}, got {data[:16]!r}")
    return result


def section(idle: float, burst: int) -> dict[str, Any]:
    """Run and print the idle table; return its figures."""
    cases = [
        ("gntipc async (VchanStream), default policy", async_parent, async_child),
        ("gntipc sync (Vchan), default policy", sync_parent, sync_child),
    ]
    results: dict[str, Any] = {}
    rows = []
    for name, parent, child in cases:
        pair = attempt(
            name, run_pair, parent, child, fresh_path(), burst, idle, budget=idle + burst * 1e-3
        )
        server, client = pair if pair is not None else ({}, {})
        results[name] = None if pair is None else {"server": server, "client": client}
        worst = max(server.get("cpu_percent", -1.0), client.get("cpu_percent", -1.0))
        rows.append(
            [
                name,
                fmt(server.get("seconds"), ".1f"),
                fmt(server.get("cpu_percent"), ".2f"),
                fmt(client.get("cpu_percent"), ".2f"),
                fmt(server.get("ctx_switches_per_s"), ".1f"),
                fmt(client.get("ctx_switches_per_s"), ".1f"),
                "n/a" if pair is None else ("ok" if worst <= TARGET_PERCENT else "OVER"),
            ]
        )
    table(
        f"Idle after a burst of {burst} round trips ({idle:g} s window; CPU % of one core;"
        f" target <= {TARGET_PERCENT:g} %)",
        [
            "pair",
            "window s",
            "server CPU %",
            "client CPU %",
            "server ctx sw/s",
            "client ctx sw/s",
            "target",
        ],
        rows,
    )
    return {"idle_seconds": idle, "burst_round_trips": burst, "rows": results}
