"""The XenStore client against the real xenstored (run in dom0 of the QEMU Xen kit)."""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Iterator

import pytest
from anyio import ClosedResourceError

from gntipc._exceptions import LocalProtocolError, XenError
from gntipc.backends._abc import EventPort, Perm, PortState
from gntipc.backends.xen import XenBackend
from gntipc.backends.xen._xenstore import SOCKET_PATH, XENBUS_PATH, XenStore

pytestmark = pytest.mark.xen  # skipped without Xen (tests/conftest.py)

TRANSPORTS = [SOCKET_PATH, XENBUS_PATH]


@pytest.fixture(params=TRANSPORTS, ids=["socket", "xenbus"])
def store(request: pytest.FixtureRequest) -> Iterator[XenStore]:
    path = request.param
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    with XenStore(path=path, timeout=10) as s:
        base = f"/local/domain/{s.domid}/data/gntipc-test-{os.getpid()}"
        s.rm(base)
        s.base = base  # type: ignore[attr-defined]
        yield s
        s.rm(base)
        with pytest.raises(XenError):
            s.read(base)


def _base(s: XenStore) -> str:
    return s.base  # type: ignore[attr-defined,no-any-return]


def test_domid_and_transport(store: XenStore) -> None:
    assert store.domid == 0  # the kit runs us in dom0
    assert store.get_domain_path(store.domid) == "/local/domain/0"
    assert store.transport in TRANSPORTS


def test_read_write_rm_directory(store: XenStore) -> None:
    b = _base(store)
    store.write(f"{b}/a/x", b"1")
    store.write(f"{b}/a/y", b"\x00binary\xff")
    store.write(f"{b}/empty", b"")
    assert store.read(f"{b}/a/x") == b"1"
    assert store.read(f"{b}/a/y") == b"\x00binary\xff"
    assert store.read(f"{b}/empty") == b""
    assert store.read(f"{b}/a") == b""  # parents are created empty
    assert sorted(store.directory(b)) == ["a", "empty"]
    assert sorted(store.directory(f"{b}/a")) == ["x", "y"]
    assert store.directory(f"{b}/a/x") == []
    assert store.exists(f"{b}/a/x")
    store.rm(f"{b}/a")
    assert not store.exists(f"{b}/a/x")
    with pytest.raises(XenError) as info:
        store.read(f"{b}/a/x")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(XenError) as info:
        store.directory(f"{b}/a")
    assert info.value.errno == errno.ENOENT
    store.rm(f"{b}/a")  # absent: not an error


def test_relative_paths_are_relative_to_our_home(store: XenStore) -> None:
    rel = _base(store).removeprefix(f"/local/domain/{store.domid}/")
    store.write(f"{rel}/rel", b"r")
    assert store.read(f"{_base(store)}/rel") == b"r"


def test_perms(store: XenStore) -> None:
    b = _base(store)
    store.write(f"{b}/p", b"v")
    store.set_perms(f"{b}/p", [Perm(0, "n"), Perm(5, "r")])
    assert store.get_perms(f"{b}/p") == [Perm(0, "n"), Perm(5, "r")]
    store.set_perms(f"{b}/p", [Perm(0, "b")])
    assert store.get_perms(f"{b}/p") == [Perm(0, "b")]
    with pytest.raises(XenError) as info:
        store.set_perms(f"{b}/absent", [Perm(0, "n")])
    assert info.value.errno == errno.ENOENT


def test_payload_limit(store: XenStore) -> None:
    b = _base(store)
    path = f"{b}/big"
    limit = 4096 if store.transport == SOCKET_PATH else 4096 - 16
    assert store._c().payload_max == limit
    room = limit - len(path.encode()) - 1
    store.write(path, b"z" * room)  # exactly the limit of the transport
    assert store.read(path) == b"z" * room
    with pytest.raises(ValueError, match="exceeds"):
        store.write(path, b"z" * (room + 1))
    assert store.read(path) == b"z" * room  # the connection is still in sync


def test_bad_path_is_einval(store: XenStore) -> None:
    with pytest.raises(XenError) as info:
        store.write(f"{_base(store)}/bad path!", b"x")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="NUL"):
        store.read("a\0b")


def test_transaction_commit_and_abort(store: XenStore) -> None:
    b = _base(store)
    with store.transaction() as t:
        t.write(f"{b}/t/ring-ref", b"8")
        t.write(f"{b}/t/event-channel", b"9")
        assert t.read(f"{b}/t/ring-ref") == b"8"
        assert not store.exists(f"{b}/t/ring-ref")  # not visible outside yet
    assert store.read(f"{b}/t/event-channel") == b"9"
    with pytest.raises(RuntimeError), store.transaction() as t:
        t.write(f"{b}/t/aborted", b"1")
        raise RuntimeError("abort it")
    assert not store.exists(f"{b}/t/aborted")
    t = store.transaction()
    t.abort()
    t.abort()  # idempotent
    with pytest.raises(ClosedResourceError):
        t.read(f"{b}/t/ring-ref")


def test_transaction_conflict_is_eagain(store: XenStore) -> None:
    b = _base(store)
    store.write(f"{b}/c", b"0")
    with XenStore(path=store.transport) as other:
        t = store.transaction()
        assert t.read(f"{b}/c") == b"0"
        t.write(f"{b}/c", b"from-t")
        other.write(f"{b}/c", b"from-other")
        with pytest.raises(XenError) as info:
            t.commit()
        assert info.value.errno == errno.EAGAIN
        t.abort()  # finished already: a no-op
    assert store.read(f"{b}/c") == b"from-other"


def _wait_events(w: object, want: int, timeout: float = 10.0) -> list[tuple[str, str]]:
    from gntipc.backends.xen._xenstore import XenWatch

    assert isinstance(w, XenWatch)
    got: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        r, _, _ = select.select([w.fileno()], [], [], max(0.0, deadline - time.monotonic()))
        if r:
            got += w.read_events()
    return got


def test_watch_fires_once_when_set_then_on_changes(store: XenStore) -> None:
    b = _base(store)
    store.write(f"{b}/w", b"")
    with store.watch(f"{b}/w", "tok") as w:
        assert _wait_events(w, 1) == [(f"{b}/w", "tok")]
        assert w.read_events() == []
        r, _, _ = select.select([w.fileno()], [], [], 0.2)
        assert r == []  # nothing queued: not readable
        store.write(f"{b}/w/child", b"1")
        assert _wait_events(w, 1) == [(f"{b}/w/child", "tok")]
        store.rm(f"{b}/w")
        assert (f"{b}/w", "tok") in _wait_events(w, 1)
    with pytest.raises(ClosedResourceError):
        w.fileno()
    with pytest.raises(ClosedResourceError):
        w.read_events()
    w.close()


def test_watch_empty_token_and_special_paths(store: XenStore) -> None:
    with store.watch(_base(store), "") as w:
        assert _wait_events(w, 1) == [(_base(store), "")]
    with store.watch("@releaseDomain", "rel") as w:
        assert _wait_events(w, 1) == [("@releaseDomain", "rel")]


def test_events_on_the_request_connection_do_not_confuse_replies(store: XenStore) -> None:
    # a watch set on a plain Store connection (as a raw request) queues its events
    from gntipc.backends.xen._xenstore_codec import MsgType, join_strings

    b = _base(store)
    store.write(f"{b}/raw", b"1")
    conn = store._c()
    conn.request(MsgType.WATCH, join_strings([f"{b}/raw", "raw"]), what="raw watch")
    for i in range(5):
        store.write(f"{b}/raw", str(i).encode())
        assert store.read(f"{b}/raw") == str(i).encode()
    time.sleep(0.2)
    conn.drain()
    assert (f"{b}/raw", "raw") in list(conn.events)
    conn.request(MsgType.UNWATCH, join_strings([f"{b}/raw", "raw"]), what="raw unwatch")


def test_closed_store(store: XenStore) -> None:
    s = XenStore(path=store.transport)
    s.close()
    s.close()
    with pytest.raises(ClosedResourceError):
        s.read("domid")
    with pytest.raises(ClosedResourceError):
        s.watch("domid")


# ------------------------------------------------------------------ XenBackend in dom0


@pytest.fixture
def backend_name() -> str:
    """Only Xen here: the suite's ``backend`` fixture then opens a XenBackend."""
    return "xen"


def _wait_port(port: EventPort, timeout: float = 5.0) -> bool:
    r, _, _ = select.select([port.fileno()], [], [], timeout)
    return bool(r) and port.pending()


def test_backend_share_map_read_write(backend: XenBackend) -> None:
    assert backend.name == "xen"
    assert backend.domid == backend.store.domid == 0
    with backend.share(backend.domid, 2) as shared:
        assert len(shared.refs) == 2
        assert shared.mapping.size == 8192
        view = shared.mapping.view()
        assert bytes(view[:16]) == bytes(16)  # zeroed
        view[4090:4100] = b"0123456789"  # across the page boundary
        with backend.map(backend.domid, shared.refs) as mapped:
            mv = mapped.mapping.view()
            assert bytes(mv[4090:4100]) == b"0123456789"
            mv[0:5] = b"hello"
            assert bytes(view[0:5]) == b"hello"
            del mv
        with backend.map(backend.domid, shared.refs[1:], writable=False) as ro:
            rv = ro.mapping.view()
            assert rv.readonly
            assert bytes(rv[:4]) == b"6789"
            del rv
            with pytest.raises(LocalProtocolError):
                ro.set_unmap_notify(0, clear_byte=True)
        del view


def test_backend_read_only_grant_refuses_writable_map(backend: XenBackend) -> None:
    with backend.share(backend.domid, 1, writable=False) as shared:
        with pytest.raises(XenError):
            backend.map(backend.domid, shared.refs, writable=True)
        with backend.map(backend.domid, shared.refs, writable=False) as ro:
            assert ro.mapping.view().readonly


def test_backend_events_round_trip_and_status(backend: XenBackend) -> None:
    with backend.alloc_unbound(backend.domid) as a:
        assert a.status() == PortState.UNBOUND
        with backend.bind_interdomain(backend.domid, a.port) as b:
            assert a.fileno() != b.fileno()  # one evtchn handle per port
            assert a.status() == PortState.INTERDOMAIN
            assert not a.pending()
            # Xen marks the binding end pending at EVTCHNOP_bind_interdomain (so that it
            # re-checks shared state it may have missed): one event on b, none on a.
            assert _wait_port(b)
            b.unmask()
            b.notify()
            assert _wait_port(a)
            assert not b.pending()  # only a's fd fired
            b.notify()
            b.notify()  # masked: coalesces
            a.unmask()
            assert _wait_port(a)
            assert not a.pending()
            a.unmask()
            a.notify()
            assert _wait_port(b)
            b.unmask()
        # b closed: a is unbound again, as after a peer's death
        assert a.status() in (PortState.UNBOUND, PortState.CLOSED)
    with pytest.raises(ClosedResourceError):
        a.notify()


def test_backend_unmap_notify_clears_byte_and_sends_event(backend: XenBackend) -> None:
    with (
        backend.alloc_unbound(backend.domid) as a,
        backend.bind_interdomain(backend.domid, a.port) as b,
        backend.share(backend.domid, 1) as shared,
    ):
        view = shared.mapping.view()
        view[21] = 1
        mapped = backend.map(backend.domid, shared.refs)
        mapped.set_unmap_notify(21, clear_byte=True, port=b)
        mapped.close()
        assert _wait_port(a)
        assert view[21] == 0
        del view


def test_backend_closed(backend: XenBackend) -> None:
    b = XenBackend(store=backend.store)
    b.close()
    b.close()
    with pytest.raises(ClosedResourceError):
        b.share(0, 1)
    assert "0" in backend.store.directory("/local/domain")  # a given store stays open
