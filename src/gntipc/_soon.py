"""Run a plain callback on the current event loop, soon: after the calling task yields.

anyio has no ``call_soon``; deferred writes (:meth:`gntipc.VchanStream._send_soon`) need
one to guarantee that what they hold back reaches the ring even when the writing task
stops writing.  asyncio's ``loop.call_soon`` runs the callback in the loop's next
iteration; trio's ``TrioToken.run_sync_soon`` likewise (it also wakes the loop, so it
costs a syscall: callers schedule once per batch, not per item).  The callback must not
raise (trio would crash the run): callers catch everything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import sniffio

__all__ = ["Scheduler", "scheduler"]

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
