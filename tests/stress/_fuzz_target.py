"""Our side of the hostile-peer fuzzer (run as a script, possibly with the C core built
with AddressSanitizer): random operations of every API on channels to ``_fuzz_hostile``.

    python -m stress._fuzz_target ROLE PEER PATH SEED OPS RESULT

ROLE ``client`` connects to the hostile server (of domain PEER) at PATH, ``server``
listens there for the hostile client; each connection (an *episode*) runs a random
number of operations of one API (async stream, async MessageQueue, or the sync Vchan),
then closes.  Every operation must return or raise a documented error within its
deadline; a hang kills the process (faulthandler dumps the stacks), a crash or an
AddressSanitizer report ends it.

``$GNTIPC_STRESS_ASAN_LIB`` names a build of ``gntipc._native._lib`` to load instead of
the installed one.  The backend is ``$GNTIPC_BACKEND`` (sim or xen).  The result (JSON)
goes to RESULT, with what this process left behind once it closed everything: file
descriptors it opened, mappings of Xen devices or sim memory files, and (sim) the sim
state of this process.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable

import anyio
import msgspec

from ._common import die_with_parent, time_scale

SCALE = time_scale()
#: An operation slower than this is reported (its own timeout is much shorter).
SLOW = 1.0 * SCALE
#: The longest an operation may take: then the process dumps its stacks and exits.
HANG = 10.0 * SCALE
#: Timeout given to each waiting operation.
OP_TIMEOUT = 0.02


def load_asan_lib() -> None:
    import importlib.machinery
    import importlib.util

    path = os.environ.get("GNTIPC_STRESS_ASAN_LIB")
    if not path:
        return
    name = "gntipc._native._lib"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader, origin=path)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod


class Poisoner:
    """Under ASan: poison the bytes of each control page that no ring primitive may touch
    (everything but the header, the grants[] in use and the in-page rings), so that an
    out-of-bounds ring access *inside* the page is reported too (the page is one mapping:
    ASan would not see it otherwise).  Unpoisoned again before the page is unmapped."""

    def __init__(self) -> None:
        import ctypes

        from gntipc import _mapping

        asan = ctypes.CDLL(None)
        # getattr: a dunder name in a class body would be mangled
        self.poison = getattr(asan, "__asan_poison_memory_region")
        self.unpoison = getattr(asan, "__asan_unpoison_memory_region")
        for f in (self.poison, self.unpoison):
            f.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            f.restype = None
        self.regions: dict[int, tuple[int, int]] = {}
        self.pages = 0
        real_close = _mapping.Mapping.close
        regions = self.regions
        unpoison = self.unpoison

        def close(mapping: _mapping.Mapping) -> None:
            region = regions.pop(id(mapping), None)
            if region is not None:
                unpoison(region[0], region[1])
            real_close(mapping)

        _mapping.Mapping.close = close  # type: ignore[method-assign,assignment]

    def arm(self, stream: object) -> None:
        from gntipc._native import ffi

        ep = stream.vchan.endpoint  # type: ignore[attr-defined]
        mapping = ep._pages[0].mapping
        base = int(ffi.cast("uintptr_t", ep._ptrs[0]))
        sizes = (ep.read_size, ep.write_size)
        grants = sum(size // 4096 for size in sizes if size > 2048)
        used = [(0, 24 + 4 * grants)]
        for size in sizes:
            if size == 1024:
                used.append((1024, 2048))
            elif size == 2048:
                used.append((2048, 4096))
        used.sort()
        start = 0
        for lo, hi in [*used, (4096, 4096)]:
            a = (start + 7) & ~7  # ASan's granule: poison whole 8-byte granules only
            if lo > a:
                self.poison(base + a, lo - a)
            start = max(start, hi)
        self.regions[id(mapping)] = (base, 4096)
        self.pages += 1


class Msg(msgspec.Struct, array_like=True):
    seq: int
    body: bytes


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_probe() -> tuple[str, Callable[[], int]]:
    """What "memory in use" means for this process: under AddressSanitizer the bytes its
    allocator has handed out and not got back (``__sanitizer_get_current_allocated_bytes``:
    the live heap; with ``PYTHONMALLOC=malloc`` every Python object is in it), since there
    the RSS also holds the allocator's quarantine, free lists and shadow memory and keeps
    creeping with no leak (10^6 operations: +129 MiB RSS; the same run without ASan: +0.8
    MiB at 200k); without ASan the RSS."""
    if os.environ.get("GNTIPC_STRESS_ASAN_LIB"):
        import ctypes

        f = getattr(ctypes.CDLL(None), "__sanitizer_get_current_allocated_bytes", None)
        if f is not None:
            f.restype = ctypes.c_size_t
            f.argtypes = []
            return "live heap (ASan allocator)", lambda: int(f())
    return "RSS", rss


class Target:
    #: Operations per episode (a random number in this range).
    EPISODE_OPS = (10, 400)

    def __init__(self, rnd: random.Random, backend: object) -> None:
        import gntipc

        self.gntipc = gntipc
        self.backend = backend
        self.rnd = rnd
        self.allowed: tuple[type[BaseException], ...] = (
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.WouldBlock,
            anyio.IncompleteRead,
            TimeoutError,
            gntipc.RemoteProtocolError,  # MalformedMessage too
            gntipc.MessageTooLarge,
        )
        self.ops = 0
        self.episodes = 0
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.failure_count = 0
        self.slow: list[str] = []
        self.seq = 0
        self.poisoner = Poisoner() if os.environ.get("GNTIPC_STRESS_ASAN_LIB") else None

    def fail(self, what: str, exc: BaseException | str) -> None:
        """Count a failure (an unexpected exception, or a broken check saying why)."""
        self.failure_count += 1
        if len(self.failures) < 20:
            if isinstance(exc, str):
                self.failures.append(f"{what}: {exc}")
                return
            tb = "".join(traceback.format_exception(exc))[-3000:]
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}\n{tb}")

    # -- operations: each returns an awaitable factory --------------------------------
    def stream_ops(self, s: object) -> list[Callable[[], Awaitable[object]]]:
        rnd = self.rnd
        gs = s  # a VchanStream
        ws = gs.extra(self.gntipc.VchanAttribute.write_size)  # type: ignore[attr-defined]

        async def send() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gs.send(rnd.randbytes(rnd.randrange(1, 3 * ws)))  # type: ignore[attr-defined]

        async def send_nowait() -> None:
            gs.send_nowait(rnd.randbytes(rnd.randrange(0, ws + 1)))  # type: ignore[attr-defined]

        async def receive() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gs.receive(rnd.choice((1, 7, 4096, 65536, 1 << 20)))  # type: ignore[attr-defined]

        async def receive_nowait() -> None:
            gs.receive_nowait(rnd.choice((1, 100, 65536)))  # type: ignore[attr-defined]

        async def receive_into() -> None:
            buf = bytearray(rnd.choice((1, 13, 4096, 100000)))
            with anyio.move_on_after(OP_TIMEOUT):
                await gs.receive_into(buf)  # type: ignore[attr-defined]

        async def receive_exactly() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gs.receive_exactly(rnd.randrange(1, 3 * ws))  # type: ignore[attr-defined]

        async def wait_readable() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gs.wait_readable()  # type: ignore[attr-defined]

        async def wait_writable() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gs.wait_writable(rnd.randrange(1, 2 * ws))  # type: ignore[attr-defined]

        async def send_eof() -> None:
            if rnd.random() < 0.05:
                await gs.send_eof()  # type: ignore[attr-defined]

        return [
            send,
            send,
            send_nowait,
            receive,
            receive,
            receive_nowait,
            receive_into,
            receive_exactly,
            wait_readable,
            wait_writable,
            send_eof,
        ]

    def queue_ops(self, q: object) -> list[Callable[[], Awaitable[object]]]:
        rnd = self.rnd
        gq = q  # a MessageQueue[Msg]

        def msg() -> Msg:
            self.seq += 1
            return Msg(self.seq, rnd.randbytes(rnd.randrange(0, 200)))

        ring = gq.stream.extra(self.gntipc.VchanAttribute.write_size)  # type: ignore[attr-defined]

        async def put() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gq.put(msg())  # type: ignore[attr-defined]

        async def put_many() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gq.put_many([msg() for _ in range(rnd.randrange(0, 100))])  # type: ignore[attr-defined]

        async def put_nowait() -> None:
            gq.put_nowait(msg())  # type: ignore[attr-defined]

        async def put_many_nowait() -> None:
            # At most what the ring holds (a bigger batch is a LocalProtocolError).
            gq.put_many_nowait([msg() for _ in range(rnd.randrange(0, 1 + ring // 250))])  # type: ignore[attr-defined]

        async def get() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gq.get()  # type: ignore[attr-defined]

        async def get_many() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await gq.get_many(rnd.choice((1, 10, 4096)))  # type: ignore[attr-defined]

        async def get_nowait() -> None:
            gq.get_nowait()  # type: ignore[attr-defined]

        async def get_many_nowait() -> None:
            gq.get_many_nowait(rnd.choice((1, 50)))  # type: ignore[attr-defined]

        return [
            put,
            put_many,
            put_nowait,
            put_many_nowait,
            get,
            get,
            get_many,
            get_nowait,
            get_many_nowait,
        ]

    def sync_ops(self, v: object) -> list[Callable[[], Awaitable[object]]]:
        rnd = self.rnd
        ch = v  # a Vchan
        rs, ws = ch.read_size, ch.write_size  # type: ignore[attr-defined]
        t = OP_TIMEOUT / 4

        def wrap(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
            async def op() -> object:
                return fn()

            op.__name__ = getattr(fn, "__name__", "op")
            return op

        calls: list[Callable[[], object]] = [
            lambda: ch.write_nowait(rnd.randbytes(rnd.randrange(1, 2 * ws))),  # type: ignore[attr-defined]
            lambda: ch.send_nowait(rnd.randbytes(rnd.randrange(0, ws + 1))),  # type: ignore[attr-defined]
            lambda: ch.read_nowait(rnd.choice((1, 100, 1 << 20))),  # type: ignore[attr-defined]
            lambda: ch.readinto_nowait(bytearray(rnd.choice((1, 5000)))),  # type: ignore[attr-defined]
            lambda: ch.recv_nowait(rnd.randrange(0, rs + 1)),  # type: ignore[attr-defined]
            lambda: ch.peek_nowait(rnd.randrange(0, 2 * rs), rnd.randrange(0, 2 * rs)),  # type: ignore[attr-defined]
            lambda: ch.read(rnd.choice((1, 4096)), timeout=t),  # type: ignore[attr-defined]
            lambda: ch.readinto(bytearray(100), timeout=t),  # type: ignore[attr-defined]
            lambda: ch.recv(rnd.randrange(1, rs + 1), timeout=t),  # type: ignore[attr-defined]
            lambda: ch.write(rnd.randbytes(rnd.randrange(1, 3 * ws)), timeout=t),  # type: ignore[attr-defined]
            lambda: ch.write_all(rnd.randbytes(rnd.randrange(1, 3 * ws)), timeout=t),  # type: ignore[attr-defined]
            lambda: ch.send(rnd.randbytes(rnd.randrange(1, ws + 1)), timeout=t),  # type: ignore[attr-defined]
            lambda: ch.data_ready(),  # type: ignore[attr-defined]
            lambda: ch.buffer_space(),  # type: ignore[attr-defined]
            lambda: ch.readable(),  # type: ignore[attr-defined]
            lambda: ch.is_open(),  # type: ignore[attr-defined]
            lambda: ch.prepare_wait_read(),  # type: ignore[attr-defined]
            lambda: ch.prepare_wait_write(),  # type: ignore[attr-defined]
            lambda: ch.handle_events(),  # type: ignore[attr-defined]
            lambda: ch.wait(t),  # type: ignore[attr-defined]
        ]
        return [wrap(c) for c in calls]

    def status_ops(self, v: object) -> list[Callable[[], Awaitable[object]]]:
        async def status() -> object:
            ch = v
            return (ch.data_ready(), ch.buffer_space(), ch.readable(), ch.is_open())  # type: ignore[attr-defined]

        return [status]

    # -- episodes --------------------------------------------------------------------------
    async def episode(self, stream: object, budget: int) -> None:
        rnd = self.rnd
        gntipc = self.gntipc
        mode = rnd.choice(("stream", "queue", "sync"))
        vchan = stream.vchan  # type: ignore[attr-defined]
        if mode == "stream":
            ops = self.stream_ops(stream) + self.status_ops(vchan)
        elif mode == "queue":
            q = gntipc.MessageQueue(
                stream,
                Msg,
                max_message_size=rnd.choice((64, 4096, 1 << 20)),
            )
            ops = self.queue_ops(q) + self.status_ops(vchan)
        else:
            ops = self.sync_ops(vchan)
        ended = 0
        for _ in range(budget):
            ok, exc = await self.run_op(mode, rnd.choice(ops))
            if ok:
                ended = 0
            elif exc is not None and issubclass(
                exc, anyio.EndOfStream | anyio.BrokenResourceError | anyio.ClosedResourceError
            ):
                ended += 1
            if stream.closed or ended >= 5:  # type: ignore[attr-defined]
                break

    async def run_op(
        self, mode: str, op: Callable[[], Awaitable[object]]
    ) -> tuple[bool, type[BaseException] | None]:
        """Run one operation under the hang watchdog, and count its outcome: ``(True,
        None)`` if it returned, ``(False, the class)`` if it raised a documented error,
        ``(False, None)`` if it failed (anything else: counted as a failure unless
        :meth:`tolerated`).  A slow one is reported.  (The class, not the exception: its
        traceback would keep the operation's views, and their pages, alive.)"""
        self.ops += 1
        faulthandler.dump_traceback_later(HANG, exit=True)
        t0 = time.monotonic()
        result: tuple[bool, type[BaseException] | None] = (False, None)
        try:
            await op()
            self.outcomes["ok"] += 1
            result = (True, None)
        except self.allowed as exc:
            self.outcomes[type(exc).__name__] += 1
            result = (False, type(exc))
        except Exception as exc:
            if not self.tolerated(mode, exc):
                self.fail(f"{mode}.{op.__name__}", exc)
        dt = time.monotonic() - t0
        if dt > SLOW:
            self.slow.append(f"{mode}.{op.__name__} took {dt:.2f} s")
        return result

    def tolerated(self, mode: str, exc: Exception) -> bool:
        """True if ``exc`` (not one of :attr:`allowed`) is documented for this mode."""
        return False

    async def run(self, role: str, peer: int, path: str, budget: int) -> None:
        gntipc = self.gntipc
        rnd = self.rnd
        listener = None
        if role == "server":
            listener = await gntipc.listen(
                peer,
                path,
                read_size=rnd.choice((1024, 2048, 4096, 65536)),
                write_size=rnd.choice((1024, 2048, 4096, 65536)),
                backend=self.backend,
            )
        base_rss = 0
        self.max_growth = 0
        _what, in_use = memory_probe()
        try:
            while self.ops < budget:
                faulthandler.dump_traceback_later(HANG + 20 * SCALE, exit=True)
                try:
                    with anyio.fail_after(20 * SCALE):
                        if listener is not None:
                            stream = await listener.accept()
                        else:
                            stream = await gntipc.connect(
                                peer,
                                path,
                                timeout=15 * SCALE,
                                backend=self.backend,
                            )
                except self.allowed as exc:
                    self.outcomes[f"connect:{type(exc).__name__}"] += 1
                    # e.g. a page whose orders the hostile server scribbled: its keys stay
                    # up until it closes, so do not spin on them.
                    await anyio.sleep(0.01)
                    continue
                except Exception as exc:
                    self.fail("connect", exc)
                    continue
                self.episodes += 1
                if self.poisoner is not None:
                    self.poisoner.arm(stream)
                try:
                    await self.episode(stream, rnd.randrange(*self.EPISODE_OPS))
                finally:
                    try:
                        await stream.aclose()
                    except Exception as exc:
                        self.fail("close", exc)
                if self.episodes == 3:
                    base_rss = in_use()
                elif base_rss:
                    self.max_growth = max(self.max_growth, in_use() - base_rss)
        finally:
            faulthandler.cancel_dump_traceback_later()
            if listener is not None:
                await listener.aclose()


def own_fds() -> dict[int, str]:
    """This process's open descriptors (number → what it is)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
    return out


def process_leftovers(before: dict[int, str], backend_name: str) -> list[str]:
    """What this process still holds, once every channel and the backend are closed,
    that it did not hold ``before``: descriptors, mappings of the Xen devices (or of
    sim memory files) and, on the sim, the sim state of this process."""
    from gntipc import _process

    # The sim's one process-wide event sender socket stays until exit (by design).
    sender = _process._sender.fileno() if _process._sender is not None else None
    out = [
        f"fd {fd} -> {what}"
        for fd, what in own_fds().items()
        if before.get(fd) != what and fd != sender
    ]
    if backend_name == "sim":
        from gntipc.backends.sim import assert_cleaned_up
        from gntipc.backends.sim._runtime import default_runtime_dir

        marker = default_runtime_dir()
        try:
            assert_cleaned_up()
        except AssertionError as exc:
            out += str(exc).splitlines()[1:]
    else:
        marker = "/dev/xen/"
    with open("/proc/self/maps") as f:
        out += [f"mapping {line.strip()}" for line in f if marker in line]
    return out


def main(make: Callable[[random.Random, object], Target] | None = None) -> None:
    """Run a target (``make(rnd, backend)``, default :class:`Target`) as the command line
    says, and write its result."""
    die_with_parent()
    faulthandler.enable()
    load_asan_lib()
    role, peer, path, seed, budget, result = sys.argv[1:]
    import gntipc
    from gntipc import _astore

    rnd = random.Random(int(seed))
    t0 = time.monotonic()
    before = own_fds()
    with gntipc.get_backend() as backend:  # $GNTIPC_BACKEND
        name = backend.name
        target = (make or Target)(rnd, backend)
        anyio.run(target.run, role, int(peer), path, int(budget))
        # A connect cut short by its deadline leaves its store work to a worker thread,
        # which withdraws what it produced: wait for that before counting leftovers.
        settled = _astore.wait_background(HANG)
    leftover = "\n".join(process_leftovers(before, name))
    if not settled:
        # Name what is stuck, and where its threads are, for whoever reads the failure.
        with _astore._background_lock:
            stuck = sorted(call.what for call in _astore._background)
        stacks = [
            f"thread {t.name}:\n{''.join(traceback.format_stack(sys._current_frames()[t.ident]))}"
            for t in threading.enumerate()
            if t.ident in sys._current_frames() and t is not threading.current_thread()
        ]
        leftover += f"\nabandoned store work still running: {stuck}\n" + "\n".join(stacks)
    out = {
        "ops": target.ops,
        "episodes": target.episodes,
        "outcomes": dict(target.outcomes),
        "failure_count": target.failure_count,
        "failures": target.failures,
        "slow": target.slow[:20],
        "rss_growth": target.max_growth,
        "memory_measure": memory_probe()[0],
        "seconds": time.monotonic() - t0,
        "leftovers": leftover,
        "asan": bool(os.environ.get("GNTIPC_STRESS_ASAN_LIB")),
        "poisoned_pages": target.poisoner.pages if target.poisoner else 0,
        # (the bulk target: the connections on which it raised RemoteProtocolError)
        "broken": getattr(target, "broken", []),
    }
    with open(result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
