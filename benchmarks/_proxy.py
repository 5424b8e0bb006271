"""An unmodified program through ``gntipc proxy``: redis-benchmark against redis-server
across two hops, the same two hops as two ``socat`` TCP relays, in the same run.

The chain: redis-benchmark → [client hop] → [server hop] → redis-server (TCP on
127.0.0.1); then the same hops in front of ``python -m http.server`` serving a 50 MB file,
fetched by 4 concurrent ``curl`` downloads (the time until all 4 are done, as MB/s of the
200 MB).  The hops are either two socat relays (``TCP-LISTEN,fork`` → ``TCP``), or a
client-side ``gntipc proxy`` (domain 1, listening on TCP) and a server-side one (domain 0,
connecting to redis), plain (a vchan per connection) or ``--mux`` (one vchan for all), on
the sim backend.  redis-benchmark runs its default 50 clients (SET and GET, requests per
second) and one client (GET p50 latency).  Needs redis-server, redis-benchmark and socat
(Debian: redis-server, redis-tools, socat); skipped with the reason when one is missing
(the downloads need curl too).
Nothing is pinned: the chain is five processes on the machine's CPUs, as a user runs it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from _harness import fmt, ratio, table

TOOLS = ("redis-server", "redis-benchmark", "socat")
#: The download row: DOWNLOADS concurrent curl fetches of one FILE_MB file.
DOWNLOADS, FILE_MB = 4, 50
HOPS = ("two socat relays", "gntipc proxy, plain", "gntipc proxy, --mux")
#: The issue's goal (#19): gntipc proxy >= 1.0x socat, SET and GET.
GOAL = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_redis(port: int, deadline: float) -> None:
    """Until a PING through ``port`` is answered (every hop is up)."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answers PING on 127.0.0.1:{port}")
        time.sleep(0.05)


def _wait_port(port: int, deadline: float) -> None:
    """Until something accepts a connection on ``port`` (127.0.0.1)."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _processes(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Terminate ``procs`` (last first) on exit."""
    try:
        yield
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def _hops(hops: str, target: int) -> Iterator[int]:
    """The two hops in front of 127.0.0.1:``target``; yields the port to connect to."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    middle, front = _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with _processes(procs):
        if hops == HOPS[0]:
            for listen, to in ((middle, target), (front, middle)):
                relay = f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=511"
                procs.append(subprocess.Popen(["socat", relay, f"TCP:127.0.0.1:{to}"], **quiet))
        else:
            mux = ["--mux"] if hops == HOPS[2] else []
            path = f"bench/proxy/{os.getpid()}-{front}"
            for domid, args in (
                (0, ["-m", "server", "1", path, f"tcp:{target}"]),
                (1, ["0", path, f"tcp:127.0.0.1:{front}"]),
            ):
                env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(domid))
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "gntipc.cli", "proxy", *mux, *args], env=env, **quiet
                    )
                )
        yield front


@contextlib.contextmanager
def _chain(hops: str) -> Iterator[int]:
    """redis-server and the two hops; yields the port redis-benchmark connects to."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    redis = _free_port()
    server = ["redis-server", "--port", str(redis), "--bind", "127.0.0.1"]
    procs = [subprocess.Popen([*server, "--save", "", "--appendonly", "no"], **quiet)]
    with _processes(procs), _hops(hops, redis) as front:
        _wait_redis(front, time.monotonic() + 60)
        yield front


@contextlib.contextmanager
def _http_server() -> Iterator[int]:
    """``python -m http.server`` serving ``big`` (FILE_MB MB) from a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="gntipc-bench-http-") as root:
        with open(os.path.join(root, "big"), "wb") as f:
            f.write(os.urandom(FILE_MB * 1_000_000))
        port = _free_port()
        http = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
        procs = [
            subprocess.Popen(http, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ]
        with _processes(procs):
            _wait_port(port, time.monotonic() + 60)
            yield port


def _downloads(port: int) -> float:
    """Seconds until DOWNLOADS concurrent curl fetches of ``big`` through ``port`` are
    all done (each checked for its full size)."""
    url = f"http://127.0.0.1:{port}/big"
    fetch = ["curl", "-sS", "--max-time", "300", "-o", "/dev/null", "-w", "%{size_download}"]
    t0 = time.monotonic()
    curls = [
        subprocess.Popen([*fetch, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(DOWNLOADS)
    ]
    outs = [c.communicate(timeout=600) for c in curls]
    took = time.monotonic() - t0
    for c, (out, err) in zip(curls, outs, strict=True):
        if c.returncode != 0 or out.strip() != str(FILE_MB * 1_000_000):
            raise RuntimeError(f"curl: exit {c.returncode}, {out.strip()} bytes: {err.strip()}")
    return took


def _redis_benchmark(port: int, clients: int, requests: int) -> dict[str, dict[str, float]]:
    """``{"SET": {"rps": ..., "p50_ms": ...}, "GET": {...}}``."""
    load = ["-n", str(requests), "-c", str(clients)]
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "--csv", "-t", "set,get", *load],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    rows = {r["test"]: r for r in csv.DictReader(out.splitlines())}
    return {
        test: {"rps": float(rows[test]["rps"]), "p50_ms": float(rows[test]["p50_latency_ms"])}
        for test in ("SET", "GET")
    }


def section(quick: bool, repeat: int) -> dict[str, Any]:
    """Run and print the proxy table; return its figures (or why it was skipped)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        why = f"skipped: {', '.join(missing)} not installed (apt install redis-server socat)"
        print(f"\nredis-benchmark through two hops: {why}")
        return {"skipped": why}
    many, one = (20_000, 2_000) if quick else (100_000, 10_000)
    best: dict[str, dict[str, Any]] = {h: {} for h in HOPS}
    curl = shutil.which("curl") is not None
    for _ in range(repeat):  # the repeats take turns, so a slow spell hits all alike
        for hops in HOPS:
            with _chain(hops) as port:
                loaded = _redis_benchmark(port, 50, many)
                single = _redis_benchmark(port, 1, one)
            got = best[hops]
            for test in ("SET", "GET"):
                got[test] = max(got.get(test, 0.0), loaded[test]["rps"])
            got["p50_ms"] = min(got.get("p50_ms", float("inf")), single["GET"]["p50_ms"])
        if curl:
            with _http_server() as http:
                for hops in HOPS:
                    with _hops(hops, http) as port:
                        _wait_port(port, time.monotonic() + 60)
                        mb_s = DOWNLOADS * FILE_MB / _downloads(port)
                    best[hops]["download_MB_s"] = max(best[hops].get("download_MB_s", 0.0), mb_s)
    ref = best[HOPS[0]]
    rows = [
        [
            hops,
            fmt(r["SET"], ",.0f"),
            fmt(r["GET"], ",.0f"),
            fmt(r["p50_ms"], ".3f"),
            ratio(r["SET"], ref["SET"]),
            ratio(r["GET"], ref["GET"]),
            ratio(ref["p50_ms"], r["p50_ms"]),
        ]
        for hops, r in best.items()
    ]
    table(
        f"redis-benchmark (50 clients, {many} requests; 1 client, {one}) through two hops to"
        f" redis-server, best of {repeat} (requests/s; GET p50 ms with one client)",
        ["hops", "SET/s", "GET/s", "p50 ms", "SET/socat", "GET/socat", "socat p50/this"],
        rows,
    )
    worst = min(min(best[h]["SET"] / ref["SET"], best[h]["GET"] / ref["GET"]) for h in HOPS[1:])
    print(
        f"(gntipc proxy/socat, worst of SET and GET = {worst:.2f}x; goal >= {GOAL:g}x: "
        f"{'met' if worst >= GOAL else 'MISSED'})"
    )
    if not curl:
        print(f"\n{DOWNLOADS} concurrent downloads through two hops: skipped: curl not installed")
        return {"requests": many, "requests_one_client": one, "rows": best}
    table(
        f"{DOWNLOADS} concurrent curl downloads of a {FILE_MB} MB file from python -m"
        f" http.server through two hops, best of {repeat} (MB/s: {DOWNLOADS * FILE_MB} MB"
        " over the time until all are done)",
        ["hops", "MB/s", "this/socat"],
        [
            [h, fmt(r["download_MB_s"], ",.1f"), ratio(r["download_MB_s"], ref["download_MB_s"])]
            for h, r in best.items()
        ],
    )
    worst = min(best[h]["download_MB_s"] / ref["download_MB_s"] for h in HOPS[1:])
    print(
        f"(gntipc proxy/socat, downloads = {worst:.2f}x; goal >= {GOAL:g}x: "
        f"{'met' if worst >= GOAL else 'MISSED'})"
    )
    return {"requests": many, "requests_one_client": one, "rows": best}
