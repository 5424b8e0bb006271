"""The connect loops: a client waits for a server's keys (:mod:`gntipc._keys`) and
builds its endpoint from them, blocking (:func:`connect_blocking`) or async
(:func:`connect_async`).

Keys of a server that is gone, or that another client took first, raise
:class:`~gntipc.StaleKeys` (:func:`try_connect`); the loops retry each time the keys
change (a store watch, never polling) until their deadline.  The async loop makes each
store access in a worker thread (:mod:`gntipc._astore`) and waits for the watch on the
event loop.
"""

from __future__ import annotations

import contextlib
import select
import time

import anyio
from anyio import ClosedResourceError, WouldBlock

from . import _astore
from ._endpoint import Endpoint
from ._exceptions import StaleKeys, XenError, XenStoreTimeout
from ._keys import read_keys, refusal, why_no_server
from .backends._abc import Backend, Watch

__all__ = ["connect_async", "connect_blocking", "try_connect", "wait_fd"]


def try_connect(backend: Backend, peer: int, path: str) -> Endpoint:
    """One connection attempt to the keys at the absolute store ``path``.

    Raises:
        WouldBlock: the server has not published its keys (yet).
        StaleKeys: the keys belong to a server that is gone or already taken.
        RemoteProtocolError: invalid keys or control page.
        XenError: the store failed.
    """
    ref, port = read_keys(backend.store, path)
    return Endpoint.client(backend, peer, path, ref, port)


def connect_blocking(backend: Backend, peer: int, path: str, timeout: float | None) -> Endpoint:
    """:func:`try_connect` until it succeeds, retrying when the keys change.

    Raises:
        TimeoutError: no connection within ``timeout`` seconds (None: wait forever).
        RemoteProtocolError: the server published invalid keys or control page.
        XenError: ECONNREFUSED: the listener says it offers no channel now (why).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last: BaseException | None = None
    with backend.store.watch(path, "gntipc-connect") as watch:
        while True:
            got = _attempt(watch, backend, peer, path)
            if isinstance(got, StaleKeys):
                last = got
            elif got is not None:
                return got
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                why = why_no_server(backend, path)
                raise TimeoutError(
                    f"no vchan server at {path} (domain {peer}) within {timeout} s"
                    + (f": {why}" if why else "")
                    + (f"; last attempt: {last}" if last else "")
                )
            wait_fd(watch.fileno(), remaining)


async def connect_async(
    backend: Backend,
    peer: int,
    path: str,
    errors: list[Exception],
    holder: _astore.Holder | None = None,
) -> Endpoint:
    """As :func:`connect_blocking` without a deadline (the caller cancels); the last
    stale-keys error is left in ``errors``.

    Every store access (setting the watch, each attempt, removing the watch) runs in a
    worker thread (:mod:`gntipc._astore`); waiting for the watch stays on the event loop.
    ``holder`` (the backend's owner) is held by every worker until it is done.

    Raises:
        XenStoreTimeout: the store did not answer one of these in time.
        RemoteProtocolError: the server published invalid keys or control page.
        XenError: ECONNREFUSED: the listener says it offers no channel now (why).

    Cancellation: an endpoint connected meanwhile is closed (see :func:`_astore.run`).
    """
    watch = await _astore.run(
        backend.store.watch,
        path,
        "gntipc-connect",
        what=f"watching {path} for a server's keys",
        discard=_close_watch,
        holder=holder,
    )
    try:
        while True:
            watch.read_events()  # never blocks: a watch is driven by its descriptor
            got = await _astore.run(
                _try,
                backend,
                peer,
                path,
                what=f"connecting to the keys at {path}",
                discard=_close_attempt,
                holder=holder,
            )
            if isinstance(got, StaleKeys):
                errors[:] = [got]
            elif got is not None:
                return got
            await anyio.wait_readable(watch.fileno())
    finally:
        # Best effort, like every release of a watch: a wedged store leaves it to the
        # worker (bounded), and the outcome above is what the caller needs.
        with contextlib.suppress(XenStoreTimeout, XenError, ClosedResourceError):
            await _astore.run_cleanup(watch.close, what=f"removing the watch on {path}")


def _close_watch(watch: Watch) -> None:
    watch.close()


def _close_attempt(got: Endpoint | StaleKeys | None) -> None:
    if got is not None and not isinstance(got, StaleKeys):
        got.close()


def _attempt(watch: Watch, backend: Backend, peer: int, path: str) -> Endpoint | StaleKeys | None:
    """One round of a connect loop: consume the watch's events, then :func:`_try`."""
    watch.read_events()
    return _try(backend, peer, path)


def _try(backend: Backend, peer: int, path: str) -> Endpoint | StaleKeys | None:
    """:func:`try_connect`, returning the endpoint, the stale-keys error (retried only
    after the store changes, so a permanent error costs no CPU), or None (no keys yet).

    Raises:
        XenError: ECONNREFUSED: the listener at ``path`` says it offers no channel now
            (:func:`gntipc._keys.refusal`: the message says why).
    """
    try:
        return try_connect(backend, peer, path)
    except (WouldBlock, StaleKeys) as exc:
        # No keys, or keys another client took: none yet, or a listener that says it
        # cannot offer any now (its last offer failed; the taken keys stay meanwhile).
        refused = refusal(backend, path)
        if refused is not None:
            raise refused from None
        return exc if isinstance(exc, StaleKeys) else None


def wait_fd(fd: int, timeout: float | None) -> bool:
    """Block until ``fd`` is readable; False on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))
