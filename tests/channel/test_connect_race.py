"""Connect races.

A server notices its client's connection once, whichever threads notice it at the same
time (issue 10, defect 10).  The first look at ``cli_live == 1`` starts the watch on the
client's presence node.  It happens under whichever lock the noticing call holds: the
read lock (``is_open``, ``read_nowait``), the write lock (``write_nowait``,
``poll_write``) or the event lock (``handle_events``), so three threads can notice at
once; a check-then-act there would start two watches and leak one (a ResourceWarning, a
leftover watch in the store).

A client after another on the same keys (issue 19): a plain libxenvchan server offers
its control page again after its client left (Debian's ``vchan-socket-proxy -m
server``: same page, grant and port, the keys unchanged, ``cli_live`` 0); a client takes
it, as a libxenvchan client does.  A gntipc server's page, or one whose server is gone,
stays stale keys.  A "plain server" here is a gntipc one whose presence node is removed:
that is all a client can tell them apart by.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from anyio import ClosedResourceError

from gntipc import protocol as L
from gntipc._exceptions import StaleKeys
from gntipc._keys import presence_node
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


def _page_byte(vchan: Vchan, offset: int, value: int | None = None) -> int:
    """A byte of the control page of ``vchan`` (a server); written first if ``value``."""
    page = vchan.endpoint._pages[0].mapping.view()
    try:
        if value is not None:
            page[offset] = value
        return int(page[offset])
    finally:
        page.release()


def _plain_server(backend: Backend, path: str) -> Vchan:
    """A server that passes for a plain libxenvchan one: no presence node."""
    srv = Vchan.server(backend, backend.domid, path, read_size=4096, write_size=4096)
    port = srv.endpoint._port
    assert port is not None
    backend.store.rm(presence_node(backend.domid, backend.domid, port.port, "server"))
    return srv


def test_a_plain_servers_page_offered_again_is_taken(backend: Backend) -> None:
    path = fresh_path()
    with _plain_server(backend, path) as srv:
        for i in range(3):
            with Vchan.client(backend, backend.domid, path, timeout=5) as cli:
                assert _page_byte(srv, L.OFF_CLI_LIVE) == L.LIVE_CONNECTED
                assert not cli.endpoint.peer_is_gntipc
                cli.write_nowait(b"to the server %d" % i)
                assert srv.read(100, timeout=5) == b"to the server %d" % i
                srv.write_nowait(b"to the client %d" % i)
                assert cli.read(100, timeout=5) == b"to the client %d" % i
            # Left: the page says so, and stays offered (same keys).
            assert _page_byte(srv, L.OFF_CLI_LIVE) == L.LIVE_GONE


def test_a_gntipc_servers_page_is_not_taken_twice(backend: Backend) -> None:
    path = fresh_path()
    with Vchan.server(backend, backend.domid, path, read_size=4096, write_size=4096) as srv:
        with Vchan.client(backend, backend.domid, path, timeout=5) as cli:
            cli.write_nowait(b"once")
            assert srv.read(100, timeout=5) == b"once"
        # The client left; the keys stay until the server closes: stale, never re-armed.
        with pytest.raises(StaleKeys, match="not waiting"):
            Vchan.client_nowait(backend, backend.domid, path)
        assert _page_byte(srv, L.OFF_CLI_LIVE) == L.LIVE_GONE


def test_a_plain_servers_page_is_stale_once_the_server_left(backend: Backend) -> None:
    path = fresh_path()
    with _plain_server(backend, path) as srv:
        with Vchan.client(backend, backend.domid, path, timeout=5):
            pass
        # The server's live byte says "gone" (closing; a crash clears it too), while its
        # port is still bound and the keys still there.
        _page_byte(srv, L.OFF_SRV_LIVE, L.LIVE_GONE)
        with pytest.raises(StaleKeys, match="not waiting"):
            Vchan.client_nowait(backend, backend.domid, path)
        assert _page_byte(srv, L.OFF_CLI_LIVE) == L.LIVE_GONE


def test_a_plain_servers_page_held_by_a_client_is_not_taken(backend: Backend) -> None:
    path = fresh_path()
    with _plain_server(backend, path) as srv, Vchan.client(backend, backend.domid, path, timeout=5):
        # cli_live says "gone" (a hostile or confused client), but the client holds the
        # port: the page is not offered again.
        _page_byte(srv, L.OFF_CLI_LIVE, L.LIVE_GONE)
        with pytest.raises(StaleKeys):
            Vchan.client_nowait(backend, backend.domid, path)
        assert _page_byte(srv, L.OFF_CLI_LIVE) == L.LIVE_GONE


def test_a_client_waiting_for_a_plain_servers_page_takes_it_once_offered_again(
    backend: Backend,
) -> None:
    # Nothing in the store changes when the first client leaves: the waiting client
    # must look again by itself (PLAIN_POLL, at most 0.5 s apart), long before its
    # timeout (at which a last attempt would take the page anyway).
    path = fresh_path()
    with _plain_server(backend, path) as srv:
        first = Vchan.client(backend, backend.domid, path, timeout=5)
        got: list[Vchan] = []
        errors: list[BaseException] = []

        def second() -> None:
            try:
                got.append(Vchan.client(backend, backend.domid, path, timeout=60))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        try:
            time.sleep(0.3)
            assert not got and not errors  # the first client holds the page
            first.close()
            thread.join(10)
            late = thread.is_alive()
        finally:
            first.close()
            thread.join(70)
        try:
            assert not late, "the waiting client did not look again before its timeout"
            assert not errors, errors
            cli = got[0]
            cli.write_nowait(b"second")
            assert srv.read(100, timeout=5) == b"second"
        finally:
            for vchan in got:
                vchan.close()
