"""Adaptive spin-then-block: how long to busy-wait on a ring before sleeping on an event.

A blocking wait costs a notify from the peer, a kernel wake-up and (async) an event-loop
iteration: tens of microseconds.  Busy-waiting on the shared index costs nothing but a
CPU, and asks the peer for no event at all.  The classic competitive rule: spin for up to
the cost of one block-and-wake, then block; that is never worse than twice the optimum.

A :class:`Spinner` keeps that rule cheap when it does not pay:

* a spin yields the CPU between its checks of the index (``sched_yield``), so a peer
  that shares our CPU (two processes pinned to one core, a one-vCPU VM) runs right away
  and the wait ends without an event;
* on a machine with one CPU a spin pays only if the peer it waits for is another thread
  or process, which the yield lets run (in the Xen kit, one vCPU, gntipc to gntipc:
  under one event per MiB instead of ~13, and with the spin-and-copy calls 2.3-3.7x the
  bytes; ``benchmarks/README.md``).  The blocking API's peer always is; an async
  stream's may be a task of the same event loop (both ends of a loopback pair in one
  process), which cannot run while we spin (a loopback pair moving data both ways over
  2 KiB rings took 25-30 s there instead of 3-4 s).  So a stream whose peer is in this
  process passes ``one_cpu=False`` (the endpoint knows: ``peer_in_process``).  A peer
  that cannot run on our CPU (another VM) makes a spin an ordinary one, which the rules
  below fade out when it does not pay;
* it spins only while the channel has been busy recently (a wait ended less than
  :data:`IDLE_AFTER` seconds ago), so an idle channel burns no CPU: after a burst, each
  side spins at most once, then sleeps;
* a spin that came back empty-handed halves the next budget, down to nothing; a spin
  that found what it waited for doubles it, up to the limit.  With the budget at
  nothing, one wait in :data:`PROBE_EVERY` still spins (the whole limit) to find out
  whether spinning pays again.  So when the machine is oversubscribed (the peer cannot
  run while we spin, and only runs once we sleep), spinning fades out on its own instead
  of adding its budget to every wait, and comes back once it pays.

One :class:`Spinner` per direction of an endpoint; not thread-safe (each direction has
one user at a time).
"""

from __future__ import annotations

import os
import time

__all__ = [
    "DEFAULT_SPIN",
    "DEFAULT_SPIN_ASYNC",
    "IDLE_AFTER",
    "PROBE_EVERY",
    "Spinner",
    "can_spin_async",
]

#: Default spin limits in seconds: about one block-and-wake between two processes on
#: different cores of this kind of machine (``benchmarks/wakeups.py``: ~60 µs for a
#: thread blocked in poll, ~100 µs for an asyncio task), so that spinning costs at most
#: about twice the optimum.
DEFAULT_SPIN = 60e-6
DEFAULT_SPIN_ASYNC = 100e-6
#: A channel whose last wait ended longer ago than this is idle: no spinning.
IDLE_AFTER = 0.01
#: With spinning faded out, one wait in this many still probes with a short spin.
PROBE_EVERY = 16
#: Below this budget (ns) a spin is not worth its call: block at once.
_MIN_NS = 2_000


class Spinner:
    """The spin budget of one direction of one endpoint.

    Args:
        limit: the most to spin per wait, in seconds (0 disables spinning).
        one_cpu: spin on a machine with one CPU too (the peer is another thread or
            process); False: never there (the peer may be a task of our event loop).
    """

    __slots__ = ("_budget", "_last", "_limit_ns", "_one_cpu", "_skipped", "spin_hits", "spins")

    def __init__(self, limit: float = DEFAULT_SPIN, *, one_cpu: bool = True) -> None:
        self._one_cpu = one_cpu
        self._limit_ns = 0
        self._budget = 0
        self._last = -1.0
        self._skipped = 0
        self.limit = limit
        #: Spins tried and spins that found what they waited for (statistics).
        self.spins = 0
        self.spin_hits = 0

    @property
    def limit(self) -> float:
        """The spin limit in seconds (0: never spin, also on a one-CPU machine unless
        ``one_cpu``)."""
        return self._limit_ns / 1e9

    @limit.setter
    def limit(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"spin limit must be >= 0 seconds, not {seconds!r}")
        spins = self._one_cpu or can_spin_async()
        self._limit_ns = self._budget = int(seconds * 1e9) if spins else 0

    def budget_ns(self) -> int:
        """How long to spin now, in nanoseconds (0: block at once)."""
        if not self._limit_ns or time.monotonic() - self._last > IDLE_AFTER:
            return 0
        if self._budget >= _MIN_NS:
            return self._budget
        self._skipped += 1
        if self._skipped < PROBE_EVERY:
            return 0
        self._skipped = 0
        # A probe spins the whole limit: when both sides have faded out, each wait is
        # the peer's wake-up plus ours, and what a spin must cover is the peer's
        # wake-up (a shorter probe misses and the pair stays blocking, 5-10x slower
        # round trips, though spinning would pay).
        return self._limit_ns

    def spun(self, hit: bool) -> None:
        """Record a spin's outcome: ``hit`` if it found what it waited for."""
        self.spins += 1
        if hit:
            self.spin_hits += 1
            self._budget = min(self._limit_ns, max(2 * self._budget, self._limit_ns // 2))
            self._last = time.monotonic()
        else:
            self._budget //= 2

    def woke(self) -> None:
        """Record the end of a blocking wait: the channel is busy now."""
        if self._limit_ns:
            self._last = time.monotonic()


def can_spin_async() -> bool:
    """True if the async API spins here whatever its peer: the machine has more than one
    CPU (with one, only for a peer in another process).  A process pinned to one core of
    several may still spin: its peer may well be pinned to another (and if it shares our
    core, the yield hands it the CPU)."""
    return (os.cpu_count() or 1) > 1
