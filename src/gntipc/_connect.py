"""The connect loops: a client waits for a server's keys (:mod:`gntipc._keys`) and
builds its endpoint from them, blocking (:func:`connect_blocking`) or async
(:func:`connect_async`).

Keys of a server that is gone, or that another client took first, raise
:class:`~gntipc.StaleKeys` (:func:`try_connect`); the loops retry each time the keys
change (a store watch, never polling) until their deadline.

One page whose client live byte says "gone" is taken all the same: a plain libxenvchan
server's, offered again.  Such a server (Debian's ``vchan-socket-proxy -m server``) sets
up its channel once and, after each client left, waits for the next one on the same
control page, grant and event port, its keys unchanged (a libxenvchan client connects to
it as is).  What tells it from stale keys: the port binds (no client holds it, the server
still does), the server's live byte says "live", and no gntipc server announced the
channel (a gntipc server never offers a page twice; its page looks the same between its
client's close and its own).

Nothing in the store changes when such a page is offered again (the keys stay), so while
a plain server's page is not offered (its client holds it, or our own previous
connection to it is still closing), the loops also look again after a pause that grows
from :data:`PLAIN_POLL` to 0.5 s: the one case where they poll.  The async loop makes each
store access in a worker thread (:mod:`gntipc._astore`) and waits for the watch on the
event loop.
"""

from __future__ import annotations

import contextlib
import math
import select
import time

import anyio
from anyio import ClosedResourceError, WouldBlock

from . import _astore
from ._endpoint import Endpoint
from ._exceptions import StaleKeys, XenError, XenStoreTimeout
from ._keys import read_keys, refusal, server_announced, why_no_server
from .backends._abc import Backend, Watch
from .protocol import LIVE_CONNECTED, LIVE_GONE, LIVE_WAITING, OFF_CLI_LIVE, OFF_SRV_LIVE

__all__ = [
    "PLAIN_POLL",
    "REFUSAL_GRACE",
    "connect_async",
    "connect_blocking",
    "try_connect",
    "wait_fd",
]

#: Seconds a listener's refusal (its claim says it can offer no channel now) must last,
#: the store unchanged meanwhile, before a client gives up: a listener that is offering
#: again (a page came back) publishes fresh keys within that time.
REFUSAL_GRACE = 2.0


#: Seconds (first, most) between looks at a plain libxenvchan server's page that is not
#: offered now (see the module docstring).
PLAIN_POLL = (0.02, 0.5)


class _NotOfferedNow(StaleKeys):
    """Stale keys of a plain libxenvchan server whose page is not offered now: it may be
    offered again without any change in the store."""


class _Poll:
    """The pause before a connect loop looks again without a store change."""

    __slots__ = ("pause",)

    def __init__(self) -> None:
        self.pause = 0.0

    def after(self, got: object) -> float:
        """Seconds after the outcome ``got`` (inf: wait for the store only); the pause
        grows while the page stays not offered, and is reset by any other outcome."""
        if not isinstance(got, _NotOfferedNow):
            self.pause = 0.0
            return math.inf
        self.pause = min(max(2 * self.pause, PLAIN_POLL[0]), PLAIN_POLL[1])
        return self.pause


class _Refusal:
    """When a connect loop first met the listener's refusal (reset by any other outcome)."""

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since: float | None = None

    def check(
        self, got: Endpoint | StaleKeys | XenError | None, now: float
    ) -> Endpoint | StaleKeys | None:
        """``got``, with a refusal as None (no keys yet) until it lasted
        :data:`REFUSAL_GRACE`.

        Raises:
            XenError: the refusal, once it lasted that long.
        """
        if not isinstance(got, XenError):
            self.since = None
            return got
        if self.since is None:
            self.since = now
        elif now - self.since >= REFUSAL_GRACE:
            raise got
        return None

    def wait_limit(self, now: float) -> float:
        """Seconds a loop may wait for the store before it looks again (inf: no limit)."""
        return math.inf if self.since is None else self.since + REFUSAL_GRACE - now


def try_connect(backend: Backend, peer: int, path: str) -> Endpoint:
    """One connection attempt to the keys at the absolute store ``path``.

    Raises:
        WouldBlock: the server has not published its keys (yet).
        StaleKeys: the keys belong to a server that is gone or already taken (a plain
            libxenvchan server's page offered again is taken: see the module docstring).
        RemoteProtocolError: invalid keys or control page.
        XenError: the store failed.
    """
    ref, port = read_keys(backend.store, path)
    try:
        return Endpoint.client(backend, peer, path, ref, port)
    except StaleKeys as exc:
        offered = _offered_again(backend, peer, ref, port)
        if offered is None:
            raise
        if not offered:
            raise _NotOfferedNow(str(exc)) from exc
    return Endpoint.client(backend, peer, path, ref, port)


def _offered_again(backend: Backend, peer: int, ref: int, port: int) -> bool | None:
    """Whether the control page ``ref`` is a plain libxenvchan server's, offered again
    after its client left (see the module docstring); if so, its client live byte is
    set back to "waiting", so that a connection attempt takes it.  False: a plain
    server's page that is not offered now (or whose server is gone: nothing tells);
    None: a gntipc server's page.

    We hold the port while we look and write: the bind is the claim every client makes
    first, so no other client connects meanwhile.

    Raises:
        XenError: the store failed.
    """
    if server_announced(backend.store, peer, port, ref):
        return None
    try:
        claim = backend.bind_interdomain(peer, port)
    except XenError:
        return False  # a client holds the port (or the server closed it)
    try:
        try:
            pages = backend.map(peer, [ref], writable=True)
        except XenError:
            return False  # the grant is gone
        with pages:
            page = pages.mapping.view()
            try:
                if page[OFF_SRV_LIVE] != LIVE_CONNECTED or page[OFF_CLI_LIVE] != LIVE_GONE:
                    return False
                page[OFF_CLI_LIVE] = LIVE_WAITING
            finally:
                page.release()
        return True
    finally:
        claim.close()


def connect_blocking(backend: Backend, peer: int, path: str, timeout: float | None) -> Endpoint:
    """:func:`try_connect` until it succeeds, retrying when the keys change.

    Raises:
        TimeoutError: no connection within ``timeout`` seconds (None: wait forever).
        RemoteProtocolError: the server published invalid keys or control page.
        XenError: ECONNREFUSED: the listener says it offers no channel now (why).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last: BaseException | None = None
    refusal = _Refusal()
    poll = _Poll()
    with backend.store.watch(path, "gntipc-connect") as watch:
        while True:
            got = _attempt(watch, backend, peer, path)
            now = time.monotonic()
            got = refusal.check(got, now)
            if isinstance(got, StaleKeys):
                last = got
            elif got is not None:
                return got
            remaining = None if deadline is None else deadline - now
            limit = min(refusal.wait_limit(now), poll.after(got))
            if limit != math.inf:
                remaining = limit if remaining is None else min(remaining, limit)
            if deadline is not None and deadline - now <= 0:
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
    refusal = _Refusal()
    poll = _Poll()
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
            now = time.monotonic()
            got = refusal.check(got, now)
            if isinstance(got, StaleKeys):
                errors[:] = [got]
            elif got is not None:
                return got
            with anyio.move_on_after(min(refusal.wait_limit(now), poll.after(got))):
                await anyio.wait_readable(watch.fileno())
    finally:
        # Best effort, like every release of a watch: a wedged store leaves it to the
        # worker (bounded), and the outcome above is what the caller needs.
        with contextlib.suppress(XenStoreTimeout, XenError, ClosedResourceError):
            await _astore.run_cleanup(watch.close, what=f"removing the watch on {path}")


def _close_watch(watch: Watch) -> None:
    watch.close()


def _close_attempt(got: Endpoint | StaleKeys | XenError | None) -> None:
    if isinstance(got, Endpoint):
        got.close()


def _attempt(
    watch: Watch, backend: Backend, peer: int, path: str
) -> Endpoint | StaleKeys | XenError | None:
    """One round of a connect loop: consume the watch's events, then :func:`_try`."""
    watch.read_events()
    return _try(backend, peer, path)


def _try(backend: Backend, peer: int, path: str) -> Endpoint | StaleKeys | XenError | None:
    """:func:`try_connect`, returning the endpoint, the stale-keys error (retried only
    after the store changes, so a permanent error costs no CPU), the refusal of a
    listener that says it offers no channel now (:func:`gntipc._keys.refusal`: ECONNREFUSED,
    the message says why; the loops raise it once it lasted :data:`REFUSAL_GRACE`), or
    None (no keys yet)."""
    try:
        return try_connect(backend, peer, path)
    except (WouldBlock, StaleKeys) as exc:
        # No keys, or keys another client took: none yet, or a listener that says it
        # cannot offer any now (its last offer failed; the taken keys stay meanwhile).
        refused = refusal(backend, path)
        if refused is not None:
            return refused
        return exc if isinstance(exc, StaleKeys) else None


def wait_fd(fd: int, timeout: float | None) -> bool:
    """Block until ``fd`` is readable; False on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))
