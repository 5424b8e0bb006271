"""The blocking waiter of the sync API: spin-then-block on one endpoint, from threads.

Any number of threads may wait on one endpoint at once (a reader and a writer, say), but
only one of them polls the endpoint's descriptor and handles its events; the others wait
on a condition that the poller signals after :meth:`Endpoint.handle_events`.  A waiter
takes the generation of handled events *before* its check (spin, then the endpoint's
check → prepare → re-check), so an event consumed by another thread between the check
and the wait still wakes it: no lost wake-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ._endpoint import Endpoint
from ._spin import Spinner

__all__ = ["BlockingWaiter"]


class BlockingWaiter:
    """Blocking waits for one endpoint, with one :class:`Spinner` per direction."""

    __slots__ = ("_cond", "_ep", "_gen", "_polling", "read_spinner", "write_spinner")

    def __init__(self, endpoint: Endpoint, spin: float) -> None:
        self._ep = endpoint
        self._cond = threading.Condition()
        self._polling = False
        self._gen = 0
        self.read_spinner = Spinner(spin)
        self.write_spinner = Spinner(spin)

    def wait_readable(self, want: int, deadline: float | None, *, spin: bool = True) -> None:
        """Return once ``want`` bytes are readable or there is an end to report (or
        maybe spuriously: the caller re-checks).  ``spin=False``: the caller spun
        already (``Endpoint.readinto_nowait(spinner=...)``), block at once.

        Raises:
            TimeoutError: ``deadline`` (a ``time.monotonic()`` value) passed.
            anyio.ClosedResourceError: the endpoint is (or gets) closed.
        """
        ep = self._ep
        self._wait(ep.poll_read, ep.spin_read, self.read_spinner, spin, want, deadline)

    def wait_writable(self, want: int, deadline: float | None, *, spin: bool = True) -> None:
        """Return once ``want`` bytes (capped at the ring size) are free or a write
        would fail at once (or maybe spuriously: the caller re-checks).  ``spin`` as
        for :meth:`wait_readable`.

        Raises: as :meth:`wait_readable`.
        """
        ep = self._ep
        self._wait(ep.poll_write, ep.spin_write, self.write_spinner, spin, want, deadline)

    def _wait(
        self,
        poll: Callable[[int], bool],
        spin: Callable[[int, int], bool],
        spinner: Spinner,
        spinning: bool,
        want: int,
        deadline: float | None,
    ) -> None:
        gen = self._gen  # before the check: see the module docstring
        ns = spinner.budget_ns() if spinning else 0
        if ns:
            if deadline is not None:
                ns = min(ns, max(0, int((deadline - time.monotonic()) * 1e9)))
            hit = spin(want, ns)
            spinner.spun(hit)
            if hit:
                return
        if poll(want):
            return
        if deadline is not None and deadline <= time.monotonic():
            raise TimeoutError("vchan operation timed out")
        self.await_news(gen, deadline)
        spinner.woke()

    def generation(self) -> int:
        """The count of event rounds handled so far (take it before a check)."""
        return self._gen

    def await_news(self, gen: int, deadline: float | None) -> bool:
        """Wait until events newer than generation ``gen`` were handled, or until
        ``deadline``; True if woken by news.

        Raises:
            anyio.ClosedResourceError: the endpoint is (or gets) closed.
        """
        with self._cond:
            while self._polling:
                if self._gen != gen:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._gen != gen:
                return True
            self._polling = True
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            woken = self._ep.wait_fd(remaining)
            self._ep.handle_events()
        finally:
            with self._cond:
                self._polling = False
                self._gen += 1
                self._cond.notify_all()
        return woken
