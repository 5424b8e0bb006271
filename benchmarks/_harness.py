"""Plumbing shared by the benchmark sections: process pairs, CPU meters, connection
helpers for gntipc and pyzmq, tables.

A row runs as a *pair*: :func:`run_pair` forks a child, runs the parent side here, and
returns both sides' results (the child reports its own over a pipe).  A row that fails or
hangs is reported and skipped; it never stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import multiprocessing as mp
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import zmq
import zmq.asyncio

import gntipc
from gntipc import Vchan, VchanStream

KiB = 1024
MiB = 1024 * KiB
CTX = mp.get_context("fork")

SERVER_DOM, CLIENT_DOM = 0, 1
#: A pyzmq receiver that hears nothing for this long gives up on its row.
ZMQ_SILENCE_MS = 20_000
#: The most a row may take beyond its own planned duration.
ROW_SLACK = 60.0
#: gntipc clients connect in attempts of this many seconds (see _connect_timed_out).
CONNECT_ATTEMPT = 2.0
CONNECT_ATTEMPTS = 15

#: What went wrong or was worked around during the run (skipped rows, retries), in
#: order; a child's notes are sent to the parent with its result.
NOTES: list[str] = []

_paths = iter(range(1 << 30))


class RowSkipped(Exception):
    """A row could not be measured (the reason was printed)."""


def note(text: str) -> None:
    """Print ``text`` and keep it for the report."""
    NOTES.append(text)
    print(f"  ({text})", flush=True)


# ------------------------------------------------------------------------ metering ---
class Usage(NamedTuple):
    """What one process spent over an interval."""

    seconds: float  # wall clock
    cpu: float  # user + sys, all threads (pyzmq's I/O thread included)
    ctx_switches: int  # voluntary + involuntary: each sleep-and-wake is one


class Meter:
    """Measures this process's wall clock, CPU time and context switches from now."""

    __slots__ = ("_cpu", "_csw", "_wall")

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._csw = _ctx_switches()

    def stop(self) -> Usage:
        return Usage(
            time.perf_counter() - self._wall,
            time.process_time() - self._cpu,
            _ctx_switches() - self._csw,
        )


def _ctx_switches() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_nvcsw + ru.ru_nivcsw


# ------------------------------------------------------------------------ the pair ---
def run_pair(
    parent: Callable[..., Any],
    child: Callable[..., Any],
    *args: Any,
    setup: Callable[[], Any] | None = None,
    budget: float = 0.0,
) -> tuple[Any, Any]:
    """Fork ``child(res, *args)``, run ``parent(res, *args)`` here, return both results.

    ``setup()`` (optional) makes shared resources before the fork (pipes, sockets...);
    the parent closes them (a :func:`tmp_sock` directory is removed here).
    The child's return value comes back over a pipe.  A parent that returns None skipped
    its row (it printed why): the child is killed and :class:`RowSkipped` raised.  The
    whole row must finish within ``budget + ROW_SLACK`` seconds (SIGALRM), so a stuck
    peer costs a row, never the run.  Each process is pinned to its CPU (:func:`pair_cpus`)
    before any of its threads starts, and notes where its threads ran (for attempt() to
    keep in :data:`THREADS`).
    """
    cpus = pair_cpus()
    before = os.sched_getaffinity(0)
    if cpus is not None:
        # before the fork and before any thread of the row starts: every thread the
        # parent starts (pyzmq's I/O threads...) inherits its CPU; the child moves to its
        # own first thing (_child_main)
        _pin_process({cpus[0]})
    res = setup() if setup is not None else None
    rx, tx = CTX.Pipe(duplex=False)
    child_cpu = None if cpus is None else cpus[1]
    proc = CTX.Process(target=_child_main, args=(child, res, args, tx, child_cpu), daemon=True)
    proc.start()
    tx.close()  # else rx never sees EOF when the child dies
    clean = False
    try:
        with _deadline(budget + ROW_SLACK):
            _row_starts()
            mine = parent(res, *args)
            look_at_threads()
            if mine is None:
                raise RowSkipped
            try:
                theirs, notes, their_threads = rx.recv()
                NOTES.extend(notes)  # already printed by the child
            except EOFError:
                proc.join(5)
                name = getattr(child, "__name__", repr(child))
                raise RuntimeError(f"{name} died (exit code {proc.exitcode})") from None
        clean = True
        _last_threads[:] = [
            {"parent": sorted(_threads.values(), key=_main_first), "child": their_threads}
        ]
        return mine, theirs
    finally:
        if cpus is not None:
            _pin_process(before)
        rx.close()
        proc.join(10 if clean else 0.5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if isinstance(res, str):  # a tmp_sock() path: its private directory goes
            shutil.rmtree(os.path.dirname(res), ignore_errors=True)


def pair_cpus() -> tuple[int, int] | None:
    """The CPUs of a pair, the same for every transport: the parent process (every thread
    of it) on the first CPU we may use, the child (every thread) on the second.  The
    figures are for "processes on different cores", not for wherever the scheduler
    happens to put them; a transport's helper threads (pyzmq's I/O thread) share their
    process's CPU, as the helpers of the others (the kernel's socket work) do.  None with
    fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def _pin_process(cpus: set[int]) -> None:
    """Allow every thread of this process only ``cpus`` (a thread started later inherits
    its creator's)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


# ------------------------------------------------------------ where threads ran ---
#: This side's threads seen during the row, by thread id (see look_at_threads), and the
#: CPU seconds of those that ran before it (the parent's main thread...).
_threads: dict[int, dict[str, Any]] = {}
_cpu_before: dict[int, float] = {}
#: The threads of both sides of the last pair that finished (taken by attempt()).
_last_threads: list[dict[str, Any]] = []
#: Per row that ran, in order: its name and the threads of each side (the JSON's).
THREADS: list[dict[str, Any]] = []
_TICK = os.sysconf("SC_CLK_TCK")


def _main_first(thread: dict[str, Any]) -> tuple[bool, int]:
    return thread["name"] != "main", int(thread["tid"])


def _row_starts() -> None:
    """Forget the threads of earlier rows: CPU seconds count from now."""
    _cpu_before.clear()
    _threads.clear()
    look_at_threads()
    _cpu_before.update((tid, t["cpu_s"]) for tid, t in _threads.items())
    _threads.clear()


def look_at_threads() -> None:
    """Note where each thread of this process may run (its affinity) and last ran (field
    39 of /proc/self/task/<tid>/stat), with its CPU seconds so far.  Each side looks at
    the end of its row, and a pyzmq side also just before it ends its context (its I/O
    threads end with it)."""
    pid = os.getpid()
    # Python's own names where it knows the thread (the kernel's is the process's name)
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            allowed = sorted(os.sched_getaffinity(tid))
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        _threads[tid] = {
            "tid": tid,
            "name": "main" if tid == pid else python_names.get(tid) or _kernel_name(stat),
            "allowed_cpus": allowed,
            "last_cpu": int(fields[39 - 3]),
            "cpu_s": (int(fields[14 - 3]) + int(fields[15 - 3])) / _TICK
            - _cpu_before.get(tid, 0.0),
        }


def _kernel_name(stat: str) -> str:
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    with open("/proc/self/comm") as f:  # a thread nobody named has the process's name
        return "unnamed" if name == f.read().strip() else name


def _side_cpus(threads: list[dict[str, Any]], seconds: bool) -> str:
    """``main 0 (0) 0.61s, ZMQbg/IO/0 0 (0) 0.20s``: each thread, its allowed CPUs, (the
    last it ran on), and its CPU seconds if ``seconds``."""
    return ", ".join(
        f"{t['name']} {','.join(map(str, t['allowed_cpus']))} ({t['last_cpu']})"
        + (f" {t['cpu_s']:.2f}s" if seconds else "")
        for t in threads
    )


def print_threads() -> None:
    """Per row, each side's threads, the CPUs they may use, (the last they ran on) and
    CPU seconds, from the row's first run and from each run placed differently."""
    print(
        "\nThreads of each row: name, allowed CPUs (the CPU it last ran on) CPU seconds;"
        " runs placed differently from the row's first are shown too"
    )
    seen: dict[str, dict[str, str]] = {}
    for run in THREADS:
        sides = [(side, run[side]) for side in ("parent", "child")]
        placement = "; ".join(f"{side}: {_side_cpus(t, False)}" for side, t in sides)
        seen.setdefault(run["row"], {}).setdefault(
            placement, "; ".join(f"{side}: {_side_cpus(t, True)}" for side, t in sides)
        )
    width = max(map(len, seen), default=0)
    for row, lines in seen.items():
        for i, line in enumerate(lines.values()):
            print(f"  {(row if not i else '').ljust(width)}  {line}")


def _child_main(
    child: Callable[..., Any],
    res: Any,
    args: tuple[Any, ...],
    report: Connection,
    cpu: int | None,
) -> None:
    if cpu is not None:
        _pin_process({cpu})  # first: no thread of the row has started yet
    NOTES.clear()  # the parent's, inherited by fork
    _row_starts()
    result = child(res, *args)
    look_at_threads()
    report.send((result, NOTES, sorted(_threads.values(), key=_main_first)))
    report.close()


class _RowTimeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise _RowTimeout(f"no result within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(name: str, fn: Callable[..., tuple[Any, Any]], *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``, or None (and a printed note) when the row failed or skipped."""
    _last_threads.clear()
    try:
        pair = fn(*args, **kw)
        if _last_threads:
            THREADS.append({"row": name, **_last_threads.pop()})
        return pair
    except RowSkipped:
        return None
    except Exception as exc:  # one broken row must not lose the others
        note(f"{name}: {type(exc).__name__}: {exc}; row skipped")
        return None


# ------------------------------------------------------------------------- gntipc ---
def sim_backend(domid: int) -> gntipc.backends.Backend:
    # Two processes creating the sim runtime at the same instant can meet a state database
    # still locked (a sim start-up race, reported; XenError EBUSY): retry briefly.
    for attempt_no in range(50):
        try:
            return gntipc.get_backend("sim", domid=domid)
        except gntipc.XenError as exc:
            if exc.errno != errno.EBUSY or attempt_no == 49:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


def fresh_path() -> str:
    return f"data/bench/{os.getpid()}/{next(_paths)}"


# Each side of a gntipc row owns its sim backend: these context managers close the
# stream (or channel) and then the backend, also when the row is cut short (a timeout
# raised in the event loop cancels the task, so the ``finally`` still runs).  A backend
# left open in the main process would be inherited by every later fork.
@contextlib.asynccontextmanager
async def g_server(path: str, ring: int) -> AsyncIterator[VchanStream]:
    """Listen at ``path`` and accept one client: the parent's side of an async row."""
    backend = sim_backend(SERVER_DOM)
    try:
        async with await gntipc.listen(
            CLIENT_DOM, path, read_size=ring, write_size=ring, backend=backend
        ) as listener:
            stream = await listener.accept()
        async with stream:
            yield stream
    finally:
        backend.close()


@contextlib.asynccontextmanager
async def g_client(path: str) -> AsyncIterator[VchanStream]:
    """Connect to ``path``: the child's side of an async row."""
    backend = sim_backend(CLIENT_DOM)
    try:
        for attempt_no in range(CONNECT_ATTEMPTS):
            try:
                stream = await gntipc.connect(
                    SERVER_DOM, path, timeout=CONNECT_ATTEMPT, backend=backend
                )
                break
            except TimeoutError:
                if attempt_no == CONNECT_ATTEMPTS - 1:
                    raise
                _connect_timed_out(backend, path)
        async with stream:
            yield stream
    finally:
        backend.close()


@contextlib.contextmanager
def v_server(path: str, ring: int) -> Iterator[Vchan]:
    """Offer a channel at ``path`` and wait for the client: the parent's side of a sync
    row."""
    backend = sim_backend(SERVER_DOM)
    try:
        with Vchan.server(backend, CLIENT_DOM, path, read_size=ring, write_size=ring) as v:
            while v.is_open() == 2:
                v.wait(1)
            yield v
    finally:
        backend.close()


@contextlib.contextmanager
def v_client(path: str) -> Iterator[Vchan]:
    """Connect to ``path``: the child's side of a sync row."""
    backend = sim_backend(CLIENT_DOM)
    try:
        for attempt_no in range(CONNECT_ATTEMPTS):
            try:
                v = Vchan.client(backend, SERVER_DOM, path, timeout=CONNECT_ATTEMPT)
                break
            except TimeoutError:
                if attempt_no == CONNECT_ATTEMPTS - 1:
                    raise
                _connect_timed_out(backend, path)
        with v:
            yield v
    finally:
        backend.close()


# The sim store used to send a watch's event before the writing transaction committed: a
# client woken in that window missed the keys and slept forever (fixed in the sim store,
# with a regression test).  Connecting in short attempts stays as a guard: a retry would
# show a regression, and it is noted (printed, and in the JSON), never hidden.
def _connect_timed_out(backend: Any, path: str) -> None:
    keys = f"{Vchan.resolve_path(SERVER_DOM, path)}/ring-ref"
    try:
        backend.store.read(keys)
    except Exception:
        note(f"gntipc connect: no server at {path} after {CONNECT_ATTEMPT:g} s; retrying")
    else:
        note(
            f"gntipc connect: the keys at {path} were published but the store watch never"
            f" woke the client within {CONNECT_ATTEMPT:g} s (a lost store watch event);"
            " retrying"
        )


# ------------------------------------------------------------ sockets and readiness ---
def tmp_sock() -> str:
    """A fresh path for a unix socket (or ipc:// endpoint) in a private directory."""
    return os.path.join(tempfile.mkdtemp(prefix="gntipc-bench-"), "s")


def signal_ready(path: str) -> None:
    with open(path + ".ready", "w"):
        pass


def await_ready(path: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path + ".ready"):
        if time.monotonic() > end:
            raise TimeoutError(f"the peer never bound {path}")
        time.sleep(0.001)


StreamPair = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]]


def serve_unix_once(sock_path: str, handle: StreamPair, limit: int = 1 << 16) -> Any:
    """The parent of an asyncio unix-socket pair: in a fresh event loop, accept one
    connection at ``sock_path``, run ``handle(reader, writer)`` on it, close it, and
    return what ``handle`` returned."""

    async def main() -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                done.set_result(await handle(reader, writer))
            except Exception as exc:
                done.set_exception(exc)
            finally:
                writer.close()

        server = await asyncio.start_unix_server(on_connect, sock_path, limit=limit)
        signal_ready(sock_path)
        try:
            return await done
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def connect_unix(sock_path: str, run: StreamPair, limit: int = 1 << 16) -> Any:
    """The child of an asyncio unix-socket pair: in a fresh event loop, connect to
    ``sock_path`` once the parent listens, run ``run(reader, writer)``, close the
    connection, and return what ``run`` returned."""

    async def main() -> Any:
        await_ready(sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path, limit=limit)
        try:
            return await run(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()

    return asyncio.run(main())


# --------------------------------------------------------------------------- pyzmq ---
# Every pyzmq pair is set up the same way: the parent binds, then the child connects
# (no reliance on reconnection timers).  A one-way transfer ends with a handshake: the
# sender sends b"" and waits for the receiver's b"ack" before it closes.  Without it the
# receiver would sometimes lose the tail (and the b"" end marker) and wait forever:
# when the receiver is at its RCVHWM and the sender closes, libzmq drops what it had not
# yet read, linger or not (zeromq/libzmq#4660, pyzmq#1934).  Reproduced here about one
# run in three after an asyncio row: the "peer went silent" of earlier versions.
def zmq_pair(
    res: str,
    bind: bool,
    *,
    buffers: int = 0,
    tcp: bool = False,
    ctx: zmq.Context[Any] | None = None,
) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    """One side of a PAIR: over ipc://``res`` or, with ``tcp``, over a free port of
    127.0.0.1 that the binder writes into the file ``res``.  ``buffers``: the kernel
    socket buffers (SO_SNDBUF/SO_RCVBUF, both ways), the same size as the ring of the
    rows compared; ``ctx``: a ``zmq.asyncio.Context`` for the async API."""
    ctx = zmq.Context() if ctx is None else ctx
    sock = ctx.socket(zmq.PAIR)
    if not isinstance(ctx, zmq.asyncio.Context):
        # never hang the bench on a stuck peer (zmq.asyncio would arm a loop timer per
        # call for these, halving its rate: there the row's deadline does it)
        sock.setsockopt(zmq.RCVTIMEO, ZMQ_SILENCE_MS)
        sock.setsockopt(zmq.SNDTIMEO, ZMQ_SILENCE_MS)
    if buffers:
        sock.setsockopt(zmq.SNDBUF, buffers)
        sock.setsockopt(zmq.RCVBUF, buffers)
    if bind:
        sock.bind("tcp://127.0.0.1:*" if tcp else f"ipc://{res}")
        if tcp:
            Path(res).write_text(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        signal_ready(res)
    else:
        await_ready(res)
        sock.connect(Path(res).read_text() if tcp else f"ipc://{res}")
    return ctx, sock


def zmq_bind(res: str, buffers: int = 0) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    return zmq_pair(res, True, buffers=buffers)


def zmq_connect(res: str, buffers: int = 0) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    return zmq_pair(res, False, buffers=buffers)


def zmq_sender_finish(sock: zmq.Socket[Any]) -> None:
    """Send the end marker and wait until the receiver has read everything."""
    sock.send(b"")
    sock.recv()


def zmq_receiver_finish(sock: zmq.Socket[Any]) -> None:
    """Acknowledge the end marker: the sender may close now."""
    sock.send(b"ack")


def zmq_close(ctx: zmq.Context[Any], sock: zmq.Socket[Any]) -> None:
    look_at_threads()  # the context's I/O threads end with it
    sock.close(linger=2000)  # long enough for a final ack to leave
    ctx.term()


def zmq_silent() -> None:
    note("pyzmq PAIR: the peer went silent; row skipped")


# ---------------------------------------------------------------------- statistics ---
def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in microseconds of ``samples`` in seconds."""
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return p50 * 1e6, p99 * 1e6


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


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
