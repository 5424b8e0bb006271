"""A server notices its client's connection once, whichever threads notice it at the
same time (issue 10, defect 10).

The first look at ``cli_live == 1`` starts the watch on the client's presence node.  It
happens under whichever lock the noticing call holds: the read lock (``is_open``,
``read_nowait``), the write lock (``write_nowait``, ``poll_write``) or the event lock
(``handle_events``), so three threads can notice at once; a check-then-act there would
start two watches and leak one (a ResourceWarning, a leftover watch in the store)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from anyio import ClosedResourceError

from gntipc.backends import Backend
from gntipc.channel import Vchan
from gntipc.protocol import VchanState

from .test_channel import fresh_path

ROUNDS = 25


def _peer_watches(backend: Backend) -> int:
    from gntipc.backends.sim._store import SimWatch

    children = backend._children  # type: ignore[attr-defined]
    return sum(isinstance(c, SimWatch) for c in list(children))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_racing_threads_register_one_watch(backend: Backend, round_: int) -> None:
    if backend.name != "sim":
        pytest.skip("counts the simulator's watch objects")
    path = fresh_path()
    srv = Vchan.server(backend, backend.domid, path, read_size=4096, write_size=4096)
    stop = threading.Event()
    errors: list[BaseException] = []
    ep = srv.endpoint
    noticers: list[Callable[[], object]] = [
        srv.is_open,  # the read lock
        srv.is_open,
        lambda: ep.poll_write(1),  # the write lock
        lambda: srv.write_nowait(b""),
        srv.handle_events,  # the event lock
        srv.readable,
    ]
    start = threading.Barrier(len(noticers) + 1)

    def spin(notice: Callable[[], object]) -> None:
        try:
            start.wait()
            while not stop.is_set():
                notice()
        except ClosedResourceError:
            pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=spin, args=(n,)) for n in noticers]
    for t in threads:
        t.start()
    try:
        before = _peer_watches(backend)
        start.wait()
        cli = Vchan.client(backend, backend.domid, path, timeout=10)
        with cli:
            # The client watches the server's node (one); wait until the server saw it.
            while not ep._connected:
                srv.is_open()
            stop.set()
            for t in threads:
                t.join(10)
            assert not errors, errors
            assert srv.is_open() == VchanState.CONNECTED
            # one watch per side: the client's on the server's node, the server's on
            # the client's
            assert _peer_watches(backend) - before == 2
            fd = ep._presence.fileno() if ep._presence is not None else None
            assert fd is not None
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        srv.close()
    assert _peer_watches(backend) == before  # nothing leaked (also checked by the fixture)
