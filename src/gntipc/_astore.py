"""Store access for the async API: blocking store work runs in a worker thread, awaited
with a deadline, so that a slow or wedged store never blocks the event loop.

A XenStore request (xen) or a state-database transaction (sim) blocks its thread for as
long as the store takes, up to the XenStore client's timeout or sqlite's busy timeout.
:func:`run` runs such work (a store call, or a channel setup or teardown around store
calls) with ``anyio.to_thread.run_sync(..., abandon_on_cancel=True)`` and waits at most
:data:`STORE_TIMEOUT` seconds, then raises :class:`~gntipc.XenStoreTimeout` naming the
operation.  Only connect, accept, close and the peer-presence check come here: ring reads
and writes and event wake-ups never hop threads.

**Abandoned work is finished, not lost.**  A timeout or a cancellation abandons the
worker, which goes on until the store answers; a result it produces after its caller
left (an offered channel, a connected endpoint, a watch) is handed to the call's
``discard`` (which closes it: keys and presence nodes are withdrawn) in that worker.  A
cancelled caller waits for this, shielded but never past the call's deadline: a cancelled
accept has withdrawn its keys when it returns, unless the store is wedged, in which case
the worker withdraws them once the store answers.  :func:`wait_background` waits for
abandoned work (tests, orderly shutdown).

Thread safety: the stores serialise their users themselves (XenStore: a lock per
connection held for a whole request, and a close that wakes a request blocked in
another thread; sim: the runtime's lock around every database access), and an endpoint
may be closed from any thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from ._exceptions import XenStoreTimeout

__all__ = ["STORE_TIMEOUT", "Holder", "run", "run_cleanup", "wait_background"]

#: The longest (seconds) the async API waits for one store operation (a connection
#: attempt, an offer of a channel, a close, a peer-presence check) before it raises
#: :class:`~gntipc.XenStoreTimeout`.  Longer than the XenStore client's own timeout per
#: request (10 s): one operation is several requests, and the Xen test kit runs under
#: emulation, 10-20 times slower than real hardware.
STORE_TIMEOUT = 30.0

logger = logging.getLogger("gntipc")

_T = TypeVar("_T")

# The life of a _Call: RUNNING (the caller waits) → RETURNED (the caller takes the
# outcome) → DONE; the caller leaving makes RUNNING (or an untaken RETURNED) ABANDONED.
_RUNNING, _RETURNED, _DONE, _ABANDONED = range(4)


class Holder(Protocol):
    """Something a worker keeps alive while it runs (a shared backend)."""

    def acquire(self) -> object: ...

    def release(self) -> None: ...


_background: set[_Call[Any]] = set()
_background_lock = threading.Lock()


class _Call(Generic[_T]):
    """One piece of work run by a thread of its own (always started, so a close always
    happens), the eventfd that tells the event loop it is over, and who owns the result.
    """

    __slots__ = (
        "_discard",
        "_exc",
        "_fd",
        "_fn",
        "_holder",
        "_lock",
        "_result",
        "_state",
        "done",
        "what",
    )

    def __init__(
        self,
        fn: Callable[[], _T],
        what: str,
        discard: Callable[[_T], object] | None = None,
        holder: Holder | None = None,
    ) -> None:
        self._fn = fn
        self.what = what
        self._discard = discard
        self._lock = threading.Lock()
        self._state = _RUNNING
        self._result: _T | None = None
        self._exc: BaseException | None = None
        #: Set when the call is over: outcome taken, or result dropped.
        self.done = threading.Event()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._holder: Holder | None = None
        try:
            if holder is not None:
                holder.acquire()
                self._holder = holder
            threading.Thread(target=self._work, name="gntipc-store", daemon=True).start()
        except BaseException:
            self._release_holder()
            self.close()
            raise

    # -- the worker's side ---------------------------------------------------------
    def _work(self) -> None:
        result: _T | None = None
        exc: BaseException | None = None
        try:
            result = self._fn()
        except BaseException as error:
            exc = error
        with self._lock:
            abandoned = self._state == _ABANDONED
            if not abandoned:
                self._state, self._result, self._exc = _RETURNED, result, exc
        if abandoned:
            self._dispose(result, exc)
        # The caller holds its own reference while it uses the result.
        self._release_holder()
        if abandoned:
            self._over()
        self._signal()

    def _dispose(self, result: _T | None, exc: BaseException | None) -> None:
        """Discard the outcome of an abandoned call (nobody else will see it)."""
        if exc is not None:
            if isinstance(exc, Exception):
                logger.warning("gntipc: an abandoned %s failed: %s", self.what, exc)
            return
        try:
            if self._discard is not None:
                self._discard(result)  # type: ignore[arg-type]  # fn returned it
        except Exception as error:
            logger.warning("gntipc: cleaning up after an abandoned %s: %s", self.what, error)

    def _dispose_late(self, result: _T | None, exc: BaseException | None) -> None:
        self._dispose(result, exc)
        self._over()
        self._signal()

    def _release_holder(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.release()

    def _over(self) -> None:
        self.done.set()
        with _background_lock:
            _background.discard(self)

    def _signal(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    # -- the caller's side ---------------------------------------------------------
    async def wait(self) -> None:
        """Until the worker returned (or, after :meth:`abandon`, until the call is
        over)."""
        fd = self._fd
        while not self.done.is_set() and self._state in (_RUNNING, _ABANDONED):
            await anyio.wait_readable(fd)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)

    def take(self) -> _T:
        """The outcome, once the worker returned: the result, or its exception raised."""
        with self._lock:
            assert self._state == _RETURNED
            result, exc = self._result, self._exc
            self._state, self._result, self._exc = _DONE, None, None
        self._over()
        if exc is not None:
            raise exc
        return result  # type: ignore[return-value]  # fn returned it

    def abandon(self) -> None:
        """The caller leaves: the worker (or, for an outcome nobody took, a thread
        started here) disposes of the result; :attr:`done` tells when that is over."""
        with self._lock:
            state, result, exc = self._state, self._result, self._exc
            if state in (_RUNNING, _RETURNED):
                self._state, self._result, self._exc = _ABANDONED, None, None
        if state not in (_RUNNING, _RETURNED):
            return
        with _background_lock:
            _background.add(self)
        if state == _RETURNED:
            threading.Thread(
                target=self._dispose_late, args=(result, exc), name="gntipc-drop", daemon=True
            ).start()

    def close(self) -> None:
        """Release the eventfd (the worker then signals nobody)."""
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _timeout_error(what: str, limit: float) -> XenStoreTimeout:
    return XenStoreTimeout(
        f"{what}: the store did not answer within {limit:g} s (is it wedged or overloaded?)"
    )


async def run(
    fn: Callable[..., _T],
    *args: Any,
    what: str,
    discard: Callable[[_T], object] | None = None,
    holder: Holder | None = None,
) -> _T:
    """``fn(*args)`` in a worker thread, waited for at most :data:`STORE_TIMEOUT`.

    ``what`` names the operation in errors.  ``discard(result)`` disposes of a result
    that arrives after the caller left (timed out or cancelled).  ``holder`` is acquired
    now and released by the worker when it is done, even if abandoned.

    Raises:
        XenStoreTimeout: no result in time (the work goes on in the background and its
            result, if any, is discarded).
        Whatever ``fn`` raises.

    Cancellation: waits, shielded, until the worker is done and its result discarded,
    but never past the deadline; then the cancellation propagates.
    """
    limit = STORE_TIMEOUT
    deadline = anyio.current_time() + limit
    call = _Call(functools.partial(fn, *args), what, discard, holder)
    try:
        with anyio.CancelScope(deadline=deadline) as scope:
            await call.wait()
            return call.take()
        call.abandon()
    except BaseException:
        call.abandon()
        with anyio.CancelScope(shield=True, deadline=deadline):
            await call.wait()
        raise
    finally:
        call.close()
    assert scope.cancelled_caught
    await checkpoint_if_cancelled()  # a cancellation of the caller wins over the timeout
    raise _timeout_error(what, limit)


async def run_cleanup(fn: Callable[..., object], *args: Any, what: str) -> None:
    """``fn(*args)`` (a close) in a worker thread: shielded from cancellation, waited
    for at most :data:`STORE_TIMEOUT`.

    Raises:
        XenStoreTimeout: not done in time (it completes in the background), unless the
            caller was cancelled meanwhile: then the cancellation.
        Whatever ``fn`` raises.
    """
    limit = STORE_TIMEOUT
    call = _Call(functools.partial(fn, *args), what)
    try:
        with anyio.CancelScope(shield=True), anyio.move_on_after(limit):
            await call.wait()
            call.take()
            return
        call.abandon()
    finally:
        call.close()
    await checkpoint_if_cancelled()
    raise _timeout_error(what, limit)


def wait_background(timeout: float) -> bool:
    """Block until every abandoned store operation is over (its result discarded), at
    most ``timeout`` seconds; True if none is left.  For tests and orderly shutdown."""
    deadline = time.monotonic() + timeout
    while True:
        with _background_lock:
            pending = next(iter(_background), None)
        if pending is None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not pending.done.wait(remaining):
            return False
