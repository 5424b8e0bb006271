"""Shared pieces of the stress tests: the run level, test data, worker processes and
their logs, and views of the sim state (read straight from the runtime db).

Worker processes append text lines to a log file, one ``os.write`` per line, so that
whatever a process logged before a SIGKILL is in the file (the page cache survives the
process).  The parent parses complete lines only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gntipc.backends import Store

HERE = Path(__file__).resolve().parent
#: The package source the worker processes import (override: ``$GNTIPC_STRESS_SRC``,
#: e.g. an exported older tree, to bisect a failure).
SRC = os.environ.get("GNTIPC_STRESS_SRC") or str(HERE.parents[1] / "src")

#: The run level: ``short`` (make test), ``medium`` or ``full`` (make stress).
LEVEL = os.environ.get("GNTIPC_STRESS", "short")
if LEVEL not in ("short", "medium", "full"):
    raise SystemExit(f"GNTIPC_STRESS must be short, medium or full, not {LEVEL!r}")


def by_level(short: int, medium: int, full: int) -> int:
    """The parameter for the current level (``$GNTIPC_STRESS_SCALE`` multiplies it)."""
    value = {"short": short, "medium": medium, "full": full}[LEVEL]
    scale = float(os.environ.get("GNTIPC_STRESS_SCALE", "1"))
    return max(1, int(value * scale))


# -- test data -------------------------------------------------------------------------
#: A prime period, so that the pattern never lines up with a power-of-two ring.
PERIOD = 65521
PAT = random.Random(0x6E7).randbytes(PERIOD)
#: The pattern repeated: any [start, start + MAX_CHUNK) with start < PERIOD is a slice.
MAX_CHUNK = 1 << 18
PATX = PAT * (MAX_CHUNK // PERIOD + 2)


def salt_for(conn: int, direction: str) -> int:
    """Where in the pattern the stream of ``direction`` ("s2c"/"c2s") of ``conn`` starts."""
    return zlib.crc32(f"{conn}/{direction}".encode()) % PERIOD


def expected(salt: int, offset: int, n: int) -> bytes:
    """The ``n`` bytes (n <= MAX_CHUNK) at ``offset`` of the stream with ``salt``."""
    start = (offset + salt) % PERIOD
    return PATX[start : start + n]


def count_diff(a: bytes, b: bytes) -> int:
    """How many positions of two equally long byte strings differ."""
    return sum(x != y for x, y in zip(a, b, strict=True))


# -- worker processes ------------------------------------------------------------------
def worker_env(domid: int, *, backend: str = "sim", **extra: str) -> dict[str, str]:
    """The environment of a worker playing domain ``domid`` of the sim, or (``backend``
    ``"xen"``) a process of this real Xen domain (``domid`` is then ours: ignored)."""
    if backend == "xen":
        env = dict(os.environ, GNTIPC_BACKEND="xen", **extra)
        env.pop("GNTIPC_SIM_DOMID", None)
    else:
        env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(domid), **extra)
    # The workers are modules of this package: ``python -m stress.<name>``.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [SRC, str(HERE.parent), env.get("PYTHONPATH")])
    )
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def spawn(
    module: str,
    args: list[str],
    domid: int,
    stderr_path: str | None = None,
    *,
    backend: str = "sim",
    **extra: str,
) -> subprocess.Popen[bytes]:
    """Start ``python -m stress.<module>`` playing domain ``domid`` (see
    :func:`worker_env`)."""
    err = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", f"stress.{module}", *args],
            env=worker_env(domid, backend=backend, **extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    finally:
        if stderr_path:
            err.close()  # type: ignore[union-attr]


def time_scale() -> float:
    """How much slower than natively a worker runs (``$GNTIPC_FUZZ_TIME_SCALE``, set by
    the parent: e.g. 10 under the emulated Xen of tools/xen-vm); its own deadlines and
    patience grow by this factor."""
    return float(os.environ.get("GNTIPC_FUZZ_TIME_SCALE", "1"))


def die_with_parent() -> None:
    """In a worker: be SIGKILLed when the process that started us exits (no orphans
    spinning on a 2-core machine after a failed run)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def reap(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGKILL ``proc`` (if it still runs) and wait for it."""
    if proc.poll() is None:
        proc.kill()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


class Log:
    """An append-only line log, one write per line (survives a SIGKILL)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __call__(self, *fields: object) -> None:
        os.write(self.fd, (" ".join(map(str, fields)) + "\n").encode())


class LogReader:
    """Reads the complete lines appended to a log since the last call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pos = 0
        self.lines: list[list[str]] = []

    def poll(self) -> list[list[str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.pos += end
        new = [line.split() for line in data[:end].decode(errors="replace").splitlines()]
        new = [x for x in new if x]
        self.lines.extend(new)
        return new


def now() -> float:
    """CLOCK_MONOTONIC: the same clock in every process of the machine."""
    return time.monotonic()


# -- sim state --------------------------------------------------------------------------
def sim_dir() -> str:
    from gntipc.backends.sim._runtime import default_runtime_dir

    return default_runtime_dir()


def sim_counts(path: str | None = None) -> dict[str, int]:
    """Rows per table of the sim state db, and files per runtime subdirectory (all zero
    when the runtime directory does not exist)."""
    path = path or sim_dir()
    out = {t: 0 for t in ("procs", "grants", "maps", "ports", "notifies", "watches", "nodes")}
    out.update({"files_m": 0, "files_p": 0, "files_w": 0})
    db_path = os.path.join(path, "state.db")
    if not os.path.exists(db_path):
        return out
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        for t in list(out):
            if not t.startswith("files_"):
                out[t] = int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
    finally:
        db.close()
    for sub in ("m", "p", "w"):
        with contextlib.suppress(FileNotFoundError):
            out[f"files_{sub}"] = len(os.listdir(os.path.join(path, sub)))
    return out


def store_nodes(path: str | None = None) -> dict[str, bytes]:
    """Every node of the sim store (path → value)."""
    path = path or sim_dir()
    db_path = os.path.join(path, "state.db")
    if not os.path.exists(db_path):
        return {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return {str(p): bytes(v) for p, v in db.execute("SELECT path, value FROM nodes")}
    finally:
        db.close()


def leftovers(runtime_dir: str | None = None) -> list[str]:
    """What :func:`gntipc.backends.sim.assert_cleaned_up` complains about (empty: clean)."""
    from gntipc.backends.sim import assert_cleaned_up

    try:
        assert_cleaned_up(runtime_dir)
    except AssertionError as exc:
        return str(exc).splitlines()[1:]
    return []


def residue(backend: object) -> tuple[list[str], list[str]]:
    """What the sim still holds once every other process exited, seen through
    ``backend`` (a SimBackend of ours, which pins the runtime directory: the last
    backend to close removes it, and with it the evidence).  Returns ``(rows, files)``:
    state-db rows beyond our own registration, and files in the runtime directory (we
    hold none: a file without a row is an orphan)."""
    rt = backend._rt  # type: ignore[attr-defined]
    rt.reap_dead()
    counts = sim_counts(rt.path)
    rows = [
        f"{k}: {counts[k]}" for k in ("grants", "maps", "ports", "notifies", "watches") if counts[k]
    ]
    if counts["procs"] != 1:
        rows.append(f"procs: {counts['procs']} (1 is ours)")
    files = [
        os.path.join(sub, f)
        for sub in ("m", "p", "w")
        if os.path.isdir(os.path.join(rt.path, sub))
        for f in os.listdir(os.path.join(rt.path, sub))
    ]
    return rows, files


def subtree(store: Store, root: str) -> dict[str, bytes]:
    """Every node at and below ``root`` of a store (path → value; empty when ``root``
    does not exist)."""
    from gntipc import XenError

    out: dict[str, bytes] = {}
    todo = [root]
    while todo:
        path = todo.pop()
        try:
            out[path] = bytes(store.read(path))
            children = store.directory(path)
        except XenError as exc:
            if exc.errno == errno.ENOENT:  # gone meanwhile (or never there)
                continue
            raise
        todo.extend(f"{path}/{name}" for name in children)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]
