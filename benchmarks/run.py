"""gntipc vs the usual local IPC, between two processes, on the sim backend (``make bench``).

    .venv/bin/python benchmarks/run.py [--quick] [--only throughput,messages,latency,idle,bulk]
                                       [--no-save]

Four sections (see benchmarks/README.md), each printed as a table:

* **throughput** (``_throughput.py``): 64 KiB sends, 64 KiB and 1 MiB rings; MB/s, CPU
  seconds per GB moved (both processes), ratio gntipc/peer.
* **messages** (``_messages.py``): typed 64-byte msgspec messages, one at a time
  (``await put`` / ``async for``, ``await put`` / ``await get``, and
  ``put_nowait``/``get_nowait``) and batched (``put_many``/``get_many``); msgs/s, ratio
  gntipc/peer (asyncio unix socket, pyzmq), each peer making the same shape of calls
  (printed under each table) with kernel buffers as large as the ring.
  Then each against what a user would pick instead, with its goal (issue #18): the
  queue over one ``SessionStream`` vs over the bare ``VchanStream`` (session/bare >=
  0.7x); request/response, one typed call in flight, p50/p99 µs vs the raw 64-byte
  round trip (rpc/raw p50 <= 2x); the queue over anyio TCP on 127.0.0.1 vs pyzmq over
  tcp:// (gntipc/pyzmq >= 1x); 1 MiB messages one at a time, MB/s vs raw
  ``send(1 MiB)``/``receive`` (queue/raw >= 0.8x).
* **latency** (``_latency.py``): 64-byte round trips, p50/p99 µs, CPU µs per round trip.
* **idle** (``_idle.py``): CPU % of each process of a connected pair waiting after a burst.
* **bulk** (``_bulk.py``): 1 GiB (``--quick``: 128 MiB) in 4 MiB payloads filled and
  checksummed in place, through :class:`gntipc.bulk.BulkChannel` loans vs a 1 MiB-ring
  ``VchanStream`` doing the same work; GB/s, CPU s/GB per side, ratio pool/ring (goal >= 3x);
  plus typed messages: a message + 1 MiB attachment through a ``BulkQueue`` vs
  ``MessageQueue`` with a 1 MiB bytes field on a 1 MiB ring.
* **proxy** (``_proxy.py``): redis-benchmark through two ``gntipc proxy`` hops (plain and
  ``--mux``) vs two socat relays to redis-server; requests/s with 50 clients, GET p50 with
  one (skipped, with the reason, without redis-server, redis-benchmark or socat).

Each pair of processes is forked fresh for each row; nothing is shared but the sim
runtime directory (a private temporary one).  The parent is pinned to one CPU and the
child to another before any of their threads starts, for every transport; the report
ends with each row's threads, the CPUs they were allowed and the one each last ran on
(JSON ``threads``).  Every figure, with the machine's
description, is saved to ``benchmarks/results/<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import _bulk
import _harness
import _idle
import _latency
import _messages
import _proxy
import _throughput
import zmq

SECTIONS = ("throughput", "messages", "latency", "idle", "proxy", "bulk")
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    uname = platform.uname()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "kernel": f"{uname.system} {uname.release} {uname.version}",
        "machine": uname.machine,
        "load_average_at_start": list(os.getloadavg()),
    }


def software() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": sys.version,
        "python_implementation": platform.python_implementation(),
        "gntipc": version("gntipc"),
        "anyio": version("anyio"),
        "msgspec": version("msgspec"),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
    }


def _pinning() -> str:
    cpus = _harness.pair_cpus()
    if cpus is None:
        return "none (fewer than two CPUs)"
    return (
        f"every row: the parent process on CPU {cpus[0]}, the child on CPU {cpus[1]}, each"
        " pinned before any of its threads starts, every thread with its process (pyzmq's"
        " I/O threads share their process's CPU)"
    )


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def save(report: dict[str, Any], started: datetime.datetime) -> str:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    return os.path.relpath(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    ap.add_argument("--no-save", action="store_true", help="do not write the JSON report")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")

    sim_dir = os.environ["GNTIPC_SIM_DIR"] = tempfile.mkdtemp(prefix="gntipc-bench-sim-")
    if args.quick:
        secs, repeat, rounds, idle, burst = 0.2, 1, 3000, 2.0, 10_000
    else:
        secs, repeat, rounds, idle, burst = 0.6, 2, 20_000, 10.0, 10_000
    started = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "sections": only,
        "parameters": {
            "throughput_seconds": secs,
            "repeat": repeat,
            "latency_rounds": rounds,  # also the request/response table's
            "idle_seconds": idle,
            "idle_burst_round_trips": burst,
        },
        "pinning": _pinning(),
        "machine": machine(),
        "software": software(),
        "backend": "sim",
    }
    t0 = time.perf_counter()
    print(
        f"gntipc benchmarks: sim backend, two processes, Python {sys.version.split()[0]},"
        f" {os.cpu_count()} CPUs ({report['machine']['cpu_model']})\npinning: {report['pinning']}"
    )
    if "throughput" in only:
        report["throughput"] = _throughput.section(secs, repeat)
    if "messages" in only:
        report["messages"] = _messages.section(secs, repeat, rounds)
    if "latency" in only:
        report["latency"] = _latency.section(rounds)
    if "idle" in only:
        report["idle"] = _idle.section(idle, burst)
    if "proxy" in only:
        report["proxy"] = _proxy.section(args.quick, repeat)
    if "bulk" in only:
        report["bulk"] = _bulk.section(128 * 2**20 if args.quick else 2**30, repeat)
    report["total_seconds"] = time.perf_counter() - t0
    shutil.rmtree(sim_dir, ignore_errors=True)  # normally gone already (last one out)
    report["notes"] = _harness.NOTES
    report["threads"] = _harness.THREADS
    _harness.print_threads()
    print(f"\n(total {report['total_seconds']:.0f} s)")
    if not args.no_save:
        print(f"saved {save(report, started)}")


if __name__ == "__main__":
    main()
