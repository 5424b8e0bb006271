"""Presence nodes and published keys in the store (issue 10, defect 9).

* the server writes its presence node before it publishes the keys;
* a node names its channel instance, so the node a crashed process left behind is never
  taken for the node of a later plain libxenvchan peer on the same path and port (whose
  clean close would then be reported as a crash);
* stale nodes and empty ``data/gntipc/<server>/<port>`` directories do not pile up;
* a node or keys replaced by a later endpoint are never removed by the earlier one:
  read, compare and remove in one transaction, retried on EAGAIN;
* a listener's claim of its path (issue 20): a second claim is refused while the holder
  lives, every domain may read it, and a client of another domain is told whom the path
  serves.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import pytest
from anyio import EndOfStream

from gntipc import _endpoint, _keys
from gntipc import protocol as L
from gntipc._exceptions import XenError
from gntipc._process import self_start
from gntipc.backends import Backend, get_backend
from gntipc.backends._abc import Transaction
from gntipc.channel import Vchan
from gntipc.protocol import VchanState

from .test_channel import fresh_path, pair
from .test_crossproc import Peer, peers  # the fixture, used by name

__all__ = ["peers"]


def gntipc_dir(domid: int) -> str:
    return f"/local/domain/{domid}/data/gntipc"


def node(domid: int, server: int, port: int, role: str) -> str:
    return f"{gntipc_dir(domid)}/{server}/{port}/{role}"


def server_port(ch: Vchan) -> int:
    port = ch.endpoint._port
    assert port is not None
    return port.port


@pytest.fixture
def sim_only(backend: Backend) -> None:
    if backend.name != "sim":
        pytest.skip("plays a second domain in this process: needs the simulator")


@pytest.fixture
def other_domain(backend: Backend, sim_only: None) -> Iterator[Backend]:
    """This process also playing another simulated domain."""
    with get_backend("sim", domid=backend.domid + 3) as other:
        yield other


def reap(domid: int) -> None:
    """Have the simulator reclaim what killed processes held (on Xen the kernel does so
    at once): opening a backend reaps."""
    with get_backend("sim", domid=domid):
        pass


def close_like_libxenvchan(ch: Vchan) -> None:
    """A clean close as libxenvchan does it: live byte 0 and an event, no EOF bit."""
    ep = ch.endpoint
    assert ep._rings is not None and ep._port is not None
    ep._rings.set_own_live(L.LIVE_GONE)
    ep._port.notify()


def test_the_server_node_is_written_before_the_keys(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytes] = []
    real = _endpoint.publish_keys

    def publish(b: Backend, peer: int, path: str, ref: int, port: int) -> None:
        seen.append(b.store.read(node(b.domid, b.domid, port, "server")))
        real(b, peer, path, ref, port)

    monkeypatch.setattr(_endpoint, "publish_keys", publish)
    srv, cli = pair(backend, 4096, 4096)
    with srv, cli:
        ref = srv.endpoint._pages[0].refs[0]
        assert len(seen) == 1 and seen[0].startswith(f"{ref}:".encode())
        # the client's node names the same instance
        port = server_port(srv)
        assert backend.store.read(node(backend.domid, backend.domid, port, "client")) == seen[0]
        assert cli.endpoint._peer_gntipc
        srv.handle_events()
        assert srv.is_open() == VchanState.CONNECTED and srv.endpoint._peer_gntipc


def test_nodes_and_their_directories_go_on_close(backend: Backend) -> None:
    store = backend.store
    for _ in range(5):
        a_srv, a_cli = pair(backend, 4096, 4096)
        b_srv, b_cli = pair(backend, 4096, 4096)
        a_srv.handle_events()
        a_srv.is_open()
        a_port, b_port = server_port(a_srv), server_port(b_srv)
        me = backend.domid
        assert store.exists(node(me, me, a_port, "server"))
        assert store.exists(node(me, me, a_port, "client"))
        a_cli.close()
        assert not store.exists(node(me, me, a_port, "client"))
        a_srv.close()
        assert not store.exists(f"{gntipc_dir(me)}/{me}/{a_port}")  # the empty dir too
        # the other channel's nodes are untouched
        assert store.exists(node(me, me, b_port, "server"))
        assert store.exists(node(me, me, b_port, "client"))
        b_srv.close()
        b_cli.close()
        assert not store.exists(gntipc_dir(me)), store.directory(gntipc_dir(me))
    assert store.exists(f"/local/domain/{backend.domid}/data")  # not ours to remove


def test_close_leaves_a_node_a_later_endpoint_replaced(backend: Backend) -> None:
    srv, cli = pair(backend, 4096, 4096)
    me, port = backend.domid, server_port(srv)
    client_node = node(me, me, port, "client")
    with srv:
        backend.store.write(client_node, b"a later client's")
        cli.close()
        assert backend.store.read(client_node) == b"a later client's"
        backend.store.rm(client_node)


def test_a_crashed_servers_node_is_not_taken_for_a_plain_peers(
    backend: Backend,
    other_domain: Backend,
    peers: list[Peer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A gntipc server of the other domain is killed before any client came: nobody
    # removes its node.
    path = f"/local/domain/{other_domain.domid}/{fresh_path()}"
    crashed = Peer(backend, other_domain.domid, "server", str(backend.domid), path, "sink")
    peers.append(crashed)
    crashed.expect("ready")
    port = int(backend.store.read(f"{path}/event-channel"))
    stale = node(other_domain.domid, other_domain.domid, port, "server")
    crashed.kill()
    reap(other_domain.domid)
    assert backend.store.exists(stale)
    # A plain libxenvchan server (no presence node) now gets the same port and path.
    monkeypatch.setattr(_keys.Presence, "announce_server", lambda self: None)
    plain = Vchan.server(other_domain, backend.domid, path, read_size=4096, write_size=4096)
    monkeypatch.undo()
    with plain:
        assert server_port(plain) == port and other_domain.store.exists(stale)
        with Vchan.client(backend, other_domain.domid, path, timeout=10) as cli:
            assert not cli.endpoint._peer_gntipc  # the stale node was recognised
            plain.write_nowait(b"bye")
            close_like_libxenvchan(plain)
            assert cli.read(10, timeout=5) == b"bye"
            with pytest.raises(EndOfStream):  # a clean close, not "the peer crashed"
                cli.read(10, timeout=5)
    # A gntipc server that gets the port again removes what the crashed one left,
    # and its own node on close.
    with Vchan.server(other_domain, backend.domid, path) as again:
        assert server_port(again) == port
        assert other_domain.store.read(stale).startswith(
            f"{again.endpoint._pages[0].refs[0]}:".encode()
        )
    assert not other_domain.store.exists(gntipc_dir(other_domain.domid))


def test_a_crashed_clients_node_is_not_taken_for_a_plain_peers(
    backend: Backend,
    other_domain: Backend,
    peers: list[Peer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = fresh_path()
    full = Vchan.resolve_path(backend.domid, path)
    srv = Vchan.server(backend, other_domain.domid, path, read_size=4096, write_size=4096)
    with srv:
        port = server_port(srv)
        crashed = Peer(backend, other_domain.domid, "client", str(backend.domid), full, "sink")
        peers.append(crashed)
        crashed.expect("ready")
        while srv.is_open() == VchanState.WAITING:
            srv.wait(5)
        assert srv.endpoint._peer_gntipc
        crashed.kill()
        reap(other_domain.domid)
    stale = node(other_domain.domid, backend.domid, port, "client")
    assert other_domain.store.exists(stale)  # a crashed client's node stays
    # A new gntipc server gets the same port; a plain libxenvchan client connects.
    with Vchan.server(backend, other_domain.domid, path, read_size=4096) as srv2:
        assert server_port(srv2) == port
        monkeypatch.setattr(_keys.Presence, "announce_client", lambda self: None)
        plain = Vchan.client(other_domain, backend.domid, full, timeout=10)
        monkeypatch.undo()
        with plain:
            while srv2.is_open() == VchanState.WAITING:
                srv2.wait(5)
            assert not srv2.endpoint._peer_gntipc  # the stale node was recognised
            plain.write_nowait(b"bye")
            close_like_libxenvchan(plain)
            assert srv2.read(10, timeout=5) == b"bye"
            with pytest.raises(EndOfStream):
                srv2.read(10, timeout=5)
    # the same client path again, from a gntipc client: it replaces the stale node
    # and removes it on close
    with Vchan.server(backend, other_domain.domid, path) as srv3:
        assert server_port(srv3) == port
        with Vchan.client(other_domain, backend.domid, full, timeout=10):
            while srv3.is_open() == VchanState.WAITING:
                srv3.wait(5)
            assert srv3.endpoint._peer_gntipc
    assert not other_domain.store.exists(gntipc_dir(other_domain.domid))


class _Tx:
    """Wraps a transaction: ``on_read(path)`` runs after each read (once per path)."""

    def __init__(self, tx: Transaction, hooks: dict[str, Any]) -> None:
        self._tx, self._hooks = tx, hooks

    def read(self, path: str) -> bytes:
        value = self._tx.read(path)
        hook = self._hooks.pop("on_read", None)
        if hook is not None:
            hook(path)
        return value

    def commit(self) -> None:
        fail = self._hooks.pop("commit", None)
        if fail is not None:
            self._tx.abort()
            raise fail
        self._tx.commit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def __enter__(self) -> _Tx:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._tx.abort()


def _hook_transactions(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, hooks: dict[str, Any]
) -> None:
    real = backend.store.transaction
    monkeypatch.setattr(backend.store, "transaction", lambda: _Tx(real(), hooks))


def test_unpublish_retries_a_conflicting_transaction(
    backend: Backend, sim_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fresh_path()
    full = Vchan.resolve_path(backend.domid, path)
    srv = Vchan.server(backend, backend.domid, path)
    _hook_transactions(
        backend, monkeypatch, {"commit": XenError(errno.EAGAIN, "xenstore: conflict")}
    )
    srv.close()
    assert not backend.store.exists(f"{full}/ring-ref")
    assert not backend.store.exists(full)


def test_unpublish_never_removes_keys_published_meanwhile(
    backend: Backend, sim_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A newer server publishes between our read of ring-ref and our remove: the
    # transaction conflicts, the retry sees the newer keys and leaves them.
    path = fresh_path()
    full = Vchan.resolve_path(backend.domid, path)
    srv = Vchan.server(backend, backend.domid, path)
    newer: list[str] = []

    def publish_newer(read_path: str) -> None:
        assert read_path == f"{full}/ring-ref"
        backend.store.write(f"{full}/ring-ref", b"99999")
        newer.append(read_path)

    _hook_transactions(backend, monkeypatch, {"on_read": publish_newer})
    srv.close()
    assert newer
    assert backend.store.read(f"{full}/ring-ref") == b"99999"
    assert backend.store.exists(f"{full}/event-channel")
    backend.store.rm(full)


# ------------------------------------------------------------- listener claims ---
def test_a_second_claim_of_a_path_is_refused_while_the_holder_lives(
    backend: Backend, other_domain: Backend
) -> None:
    full = Vchan.resolve_path(backend.domid, fresh_path())
    claim = _keys.claim_path(backend, full, other_domain.domid)
    try:
        with pytest.raises(XenError) as refused:
            _keys.claim_path(backend, full, 7)
        assert refused.value.errno == errno.EADDRINUSE
        assert f"{full} is already served for domain {other_domain.domid}" in str(refused.value)
        # Every domain may read whom the path serves (not only the peer).
        raw = other_domain.store.read(f"{full}/{_keys.LISTENER_NODE}")
        assert _keys.PathHolder.decode(raw) == _keys.PathHolder(
            backend.domid, other_domain.domid, os.getpid(), self_start()
        )
    finally:
        claim.release()
    assert not backend.store.exists(full)
    claim.release()  # gone already: nothing to do
    _keys.claim_path(backend, full, 7).release()


def test_a_blocking_client_of_another_domain_is_told_whom_the_path_serves(
    backend: Backend, other_domain: Backend
) -> None:
    path = fresh_path()
    full = Vchan.resolve_path(backend.domid, path)
    serves = other_domain.domid + 1
    claim = _keys.claim_path(backend, full, serves)
    try:
        with Vchan.server(backend, serves, path), pytest.raises(TimeoutError) as timed_out:
            Vchan.client(other_domain, backend.domid, path, timeout=0.2)
    finally:
        claim.release()
    assert str(timed_out.value) == (
        f"no vchan server at {full} (domain {backend.domid}) within 0.2 s: it is served for"
        f" domain {serves}, not for us (domain {other_domain.domid})"
    )
