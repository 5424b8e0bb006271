"""Run a plain callback on the current event loop, soon: after the calling task yields;
and :class:`Deferred`, the bytes a stream holds back for a write scheduled that way.

anyio has no ``call_soon``; deferred writes (:meth:`gntipc.VchanStream._send_soon`) need
one to guarantee that what they hold back reaches the ring even when the writing task
stops writing.  asyncio's ``loop.call_soon`` runs the callback in the loop's next
iteration; trio's ``TrioToken.run_sync_soon`` likewise (it also wakes the loop, so it
costs a syscall: callers schedule once per batch, not per item).  The callback must not
raise (trio would crash the run): callers catch everything.

Also :func:`loop_checkpoint`, the running loop's own checkpoint: anyio's
``checkpoint()`` finds the running library on every call (sniffio, then its backend
class), which cost 1.5-4x asyncio's ``sleep(0)`` here and 8x in the Xen kit (1.8 ms
against 0.2 ms per yield under emulation); the hot paths yield every
:data:`~gntipc.streams.FAIR_SLICE`, so they keep the loop's own, resolved once.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import anyio.lowlevel
import sniffio

__all__ = [
    "BURST_GAP",
    "Checkpoint",
    "Deferred",
    "LoopCheckpoint",
    "Scheduler",
    "loop_checkpoint",
    "scheduler",
]

#: Packets that come less than this far apart (seconds) are held back to be written
#: together (:meth:`Deferred.in_burst`).
BURST_GAP = 20e-6

#: Schedules a callback on one event loop (asyncio's ``loop.call_soon``, trio's
#: ``run_sync_soon``); its return value is ignored.
Scheduler = Callable[[Callable[[], None]], object]


def scheduler() -> Scheduler | None:
    """The running event loop's way to run a callback soon, or None if there is none
    (not in async context, or an unknown library): the caller then runs it itself.
    Resolving it costs microseconds: a caller keeps it for the loop it runs in."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if library == "asyncio":
        import asyncio

        try:
            return asyncio.get_running_loop().call_soon
        except RuntimeError:  # no running loop in this thread after all
            return None
    if library == "trio":
        trio = sys.modules["trio"]
        run_sync_soon: Scheduler = trio.lowlevel.current_trio_token().run_sync_soon
        return run_sync_soon
    return None


#: A checkpoint of one event loop: ``await checkpoint()``.
Checkpoint = Callable[[], Awaitable[None]]


def loop_checkpoint() -> Checkpoint:
    """The running event loop's checkpoint, as ``anyio.lowlevel.checkpoint`` (a
    cancellation point and a scheduling point) without its per-call lookup: asyncio's
    ``sleep(0)`` (what anyio's asyncio backend awaits), trio's ``checkpoint``; anyio's
    own for anything else or outside a loop.  A caller keeps it for the loop it runs in."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return anyio.lowlevel.checkpoint
    if library == "asyncio":
        import asyncio

        return functools.partial(asyncio.sleep, 0)
    if library == "trio":
        trio_checkpoint: Checkpoint = sys.modules["trio"].lowlevel.checkpoint
        return trio_checkpoint
    return anyio.lowlevel.checkpoint


class LoopCheckpoint:
    """``await cp()``: :func:`loop_checkpoint`, looked up on the first call and kept (an
    object bound to the event loop it is first awaited in: a stream, a queue)."""

    __slots__ = ("_checkpoint",)

    def __init__(self) -> None:
        self._checkpoint: Checkpoint | None = None

    def __call__(self) -> Awaitable[None]:
        cp = self._checkpoint
        if cp is None:
            cp = self._checkpoint = loop_checkpoint()
        return cp()


class Deferred:
    """Bytes a stream accepted without writing them yet (its ``_send_soon``), and the
    flush it scheduled for them on the event loop of the thread that wrote.

    The stream's ``flush`` writes ``buf`` (all, or what fits: it leaves the rest in
    ``buf``) and may raise; run from the event loop, its errors are dropped (the
    stream's next call reports the state that caused them).  It is held only while a
    flush is scheduled: no lasting reference cycle with the stream.
    """

    __slots__ = ("_flush", "_last", "_soon", "buf", "thread")

    def __init__(self) -> None:
        self._flush: Callable[[], object] | None = None  # while scheduled
        self._soon: Scheduler | None = None  # of the loop (and thread) that last wrote
        self._last = -1.0
        self.buf = bytearray()
        self.thread = 0

    def in_burst(self) -> bool:
        """True if the previous packet came less than :data:`BURST_GAP` ago: holding
        this one back pays (more follow).  A lone packet (a slow producer, or a machine
        so slow that every put yields to the loop, as under the Xen kit's emulation) is
        better written at once than held for a flush of its own."""
        now = time.monotonic()
        last, self._last = self._last, now
        return now - last < BURST_GAP

    def schedule(self, flush: Callable[[], object]) -> None:
        """Make sure ``flush()`` runs soon on the calling thread's event loop (now, if
        it has none)."""
        if self._flush is not None:
            return
        thread = threading.get_ident()
        if self._soon is None or thread != self.thread:
            self.thread = thread
            self._soon = scheduler()
        if self._soon is not None:
            try:
                self._soon(self._run)
            except RuntimeError:  # that loop is closed: find the running one next time
                self._soon = None
            else:
                self._flush = flush
                return
        flush()

    def _run(self) -> None:
        flush, self._flush = self._flush, None
        if flush is not None:
            with contextlib.suppress(Exception):
                flush()

    def writer_thread(self) -> bool:
        """True in the thread that wrote what is held back (or if nothing is)."""
        return not self.buf or threading.get_ident() == self.thread
