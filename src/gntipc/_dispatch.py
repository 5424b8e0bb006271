"""One wake-up dispatcher per vchan endpoint.

An endpoint has a single file descriptor (``Vchan.fileno()``) that becomes readable when
there may be news: an event from the peer, or a change of its liveness.  Event loops allow
only one task to wait on a descriptor at a time (trio raises ``BusyResourceError``,
asyncio silently replaces the reader), yet a sender waiting for space and a receiver
waiting for data may both need to sleep.  So the first task that needs to wait becomes
the *leader*: it waits on the descriptor, consumes the events (``consume_events()``) and
wakes every other waiting task (the *followers*, each parked on an :class:`anyio.Event`).
Each woken task re-checks its own condition and, if it still has to wait, waits again (one
of them becomes the next leader).

No polling loops, no sleeps, and no threads on the way of an event: only when the
peer-presence watch fired (or a server's client just connected) does the leader run the
endpoint's store check (``check_presence()``), in a worker thread with a deadline
(:mod:`gntipc._astore`), so that a slow store never blocks the event loop.

:meth:`Dispatcher.wait_for` is the async wait
protocol: spin briefly on the ring (slices of :data:`SPIN_SLICE`, yielding to the loop
between them; see :mod:`gntipc._spin`), then the endpoint's check → prepare → re-check
(``poll``), and only then :meth:`Dispatcher.wait`, with no await in between.  Because
events mask the port until ``handle_events()`` unmasks it, an event that arrives between
the re-check and the wait keeps the descriptor readable, so it is never lost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import anyio

from . import _astore
from ._soon import LoopCheckpoint
from ._spin import Spinner

__all__ = ["SPIN_SLICE", "Dispatcher", "Endpoint"]

#: The longest an async spin holds the event loop before it yields (nanoseconds).
SPIN_SLICE = 20_000


class Endpoint(Protocol):
    """What the dispatcher needs from a vchan endpoint."""

    def fileno(self) -> int: ...

    def consume_events(self) -> bool: ...

    def presence_check_due(self) -> bool: ...

    def check_presence(self) -> None: ...


class Dispatcher:
    """Shares one endpoint descriptor between all tasks that wait on it.

    Not thread-safe: every task using it must run in the same event loop.
    """

    __slots__ = ("_closed", "_endpoint", "_fd", "_followers", "_leading", "checkpoint")

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._fd = endpoint.fileno()
        self._leading = False
        self._followers: list[anyio.Event] = []
        self._closed = False
        #: ``await dispatcher.checkpoint()``: the event loop's checkpoint (a cancellation
        #: and scheduling point, as ``anyio.lowlevel.checkpoint``), looked up once.
        self.checkpoint = LoopCheckpoint()

    async def wait(self) -> None:
        """Wait until there may be news on the endpoint (spurious wake-ups happen).

        Call it only after asking the peer for a notification and re-checking the ring.

        Raises:
            anyio.ClosedResourceError: the dispatcher was closed (before or while waiting).
            XenStoreTimeout, XenError: the store failed the peer-presence check (nothing
                is lost: the next wait checks again).

        Cancellation: nothing is consumed; a cancelled leader wakes the followers so that
        one of them takes over the descriptor.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._leading:
            event = anyio.Event()
            self._followers.append(event)
            try:
                await event.wait()
            finally:
                # A cancelled follower must not stay on the list (it would be set later,
                # harmlessly, but the list would grow without bound under churn).
                if not event.is_set():
                    with contextlib.suppress(ValueError):
                        self._followers.remove(event)
            if self._closed:
                raise anyio.ClosedResourceError
            return
        self._leading = True
        endpoint = self._endpoint
        try:
            # A check left due (it failed, or was cancelled) runs before any sleep: the
            # watch event that called for it was consumed already.
            if not endpoint.presence_check_due():
                await anyio.wait_readable(self._fd)
                if self._closed:
                    raise anyio.ClosedResourceError
                if not endpoint.consume_events():
                    return
            await _astore.run(endpoint.check_presence, what="checking the peer's presence")
            if self._closed:
                raise anyio.ClosedResourceError
        finally:
            self._leading = False
            self._wake_all()

    async def wait_for(
        self,
        poll: Callable[[int], bool],
        spin: Callable[[int, int], bool],
        spinner: Spinner,
        want: int,
    ) -> None:
        """Return once ``poll(want)`` says the caller need not wait (or spuriously: the
        caller re-checks): spin up to ``spinner``'s budget, in slices with a checkpoint
        between them, then poll, then :meth:`wait`.

        Cancellation: at any await; nothing is consumed.

        Raises:
            anyio.ClosedResourceError: the dispatcher was closed.
        """
        budget = spinner.budget_ns()
        if budget:
            end = time.monotonic_ns() + budget
            while True:
                if spin(want, min(budget, SPIN_SLICE)):
                    spinner.spun(True)
                    return
                budget = end - time.monotonic_ns()
                if budget <= 0:
                    break
                try:
                    await self.checkpoint()
                except BaseException:
                    spinner.spun(False)  # cancelled mid-spin: a miss
                    raise
            spinner.spun(False)
        if poll(want):
            return
        await self.wait()
        spinner.woke()

    def _wake_all(self) -> None:
        followers, self._followers = self._followers, []
        for event in followers:
            event.set()

    def close(self) -> None:
        """Wake every waiter with :class:`anyio.ClosedResourceError` (idempotent).

        Call it *before* closing the endpoint's descriptor: the event loop is told the
        descriptor is going away, so a task blocked on it is woken instead of waiting on
        a number the kernel may reuse.
        """
        if self._closed:
            return
        self._closed = True
        if self._leading and self._fd >= 0:
            # RuntimeError: not inside an event loop (closing from a finaliser), so
            # nobody can be waiting.
            with contextlib.suppress(RuntimeError):
                anyio.notify_closing(self._fd)
        self._wake_all()
        self._fd = -1
