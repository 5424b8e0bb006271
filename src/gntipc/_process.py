"""Process-wide state, in one place: what gntipc keeps per process rather than per object.

Each piece is created on first use, under one lock, and may be used from any thread:

- :func:`drop_in_forked_child`: the objects a forked child must close at once (the xen
  backend's devices, ports and pages: a child must not keep the parent's grants and ports
  alive, or a crash of the parent would go unnoticed).
- :func:`datagram_sender`: the unbound unix datagram socket the sim backend delivers its
  events with (closed at exit).
- :func:`self_start`: this process's start time, which with its pid names it
  (:func:`proc_alive` tells whether a process so named still runs; both only read
  ``/proc``).  Listener claims and the sim's process registry name processes this way.

The first use registers the one ``os.register_at_fork`` hook; nothing happens at import.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["datagram_sender", "drop_in_forked_child", "proc_alive", "proc_start", "self_start"]

_T = TypeVar("_T")

_lock = threading.Lock()
_hooked = False
# stage -> {object: what a forked child calls on it}
_fork_drops: dict[int, weakref.WeakKeyDictionary[Any, Callable[[Any], object]]] = {}
_sender: socket.socket | None = None
# pid -> its start time (keyed by pid: a forked child has another)
_self_start: dict[int, int] = {}


def _first_use() -> None:
    """Register the fork hook (call with ``_lock`` held)."""
    global _hooked
    if not _hooked:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked = True


def drop_in_forked_child(obj: _T, drop: Callable[[_T], object], *, stage: int) -> None:
    """In a forked child of this process, call ``drop(obj)`` if ``obj`` is still alive then.

    Lower stages are dropped first; errors are ignored.  ``obj`` is held weakly, and
    ``drop`` must not refer to it (pass an unbound method such as ``Port.close``).
    """
    with _lock:
        _first_use()
        _fork_drops.setdefault(stage, weakref.WeakKeyDictionary())[obj] = drop


def _after_fork_in_child() -> None:
    # The child has one thread, but another thread of the parent may have held the lock at
    # the fork: the child's copy would never be released.
    global _lock
    _lock = threading.Lock()
    for stage in sorted(_fork_drops):
        for obj, drop in list(_fork_drops[stage].items()):
            with contextlib.suppress(Exception):
                drop(obj)


def datagram_sender() -> socket.socket:
    """The process's unbound, non-blocking unix datagram socket.

    Unbound and stateless, so a forked child may share it safely.
    """
    sock = _sender
    if sock is not None:
        return sock
    return _make_sender()


def _make_sender() -> socket.socket:
    global _sender
    with _lock:
        _first_use()
        if _sender is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            atexit.register(_close_sender)
            _sender = sock
        return _sender


def _close_sender() -> None:
    global _sender
    sock, _sender = _sender, None
    if sock is not None:
        sock.close()


def proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it is gone or a
    zombie.  (pid, start) names a process without the pid-reuse ambiguity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def proc_alive(pid: int, start: int) -> bool:
    """True if the process ``pid`` that started at ``start`` still runs."""
    return proc_start(pid) == start


def self_start() -> int:
    """This process's start time (see :func:`proc_start`)."""
    pid = os.getpid()
    start = _self_start.get(pid)
    if start is None:
        start = proc_start(pid)
        assert start is not None
        _self_start[pid] = start
    return start
