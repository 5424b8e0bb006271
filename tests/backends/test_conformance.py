"""The backend conformance suite: written once, run on every available backend.

On Xen the test process is dom0 talking to itself, so the peer domid is always the
one the peer process reports (``peer.domid``), never a constant.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Iterator

import pytest
from _peer import Peer, PeerError

from gntipc._exceptions import XenError
from gntipc.backends import Backend, EventPort, Pages, Perm, PortState

PAGE = 4096


@pytest.fixture
def peer(backend_name: str) -> Iterator[Peer]:
    with Peer(backend_name, 1) as p:
        yield p


def wait_event(port: EventPort, timeout: float = 2.0) -> bool:
    """Wait for one event following the wait protocol; True if it came in time."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        select.select([port.fileno()], [], [], left)
        if port.pending():
            return True
    return False


def connect_ports(backend: Backend, peer: Peer) -> tuple[EventPort, int]:
    """Our unbound port bound by the peer; returns (our port, peer's port handle)."""
    port = backend.alloc_unbound(peer.domid)
    assert port.status() == PortState.UNBOUND
    handle = peer.call("bind", backend.domid, port.port)
    assert port.status() == PortState.INTERDOMAIN
    return port, handle


def byte_at(pages: Pages, off: int) -> int:
    with pages.mapping.view() as v:
        return int(v[off])


def set_byte(pages: Pages, off: int, value: int) -> None:
    with pages.mapping.view() as v:
        v[off] = value


def test_page_limit_is_the_domains_budget(backend: Backend) -> None:
    # The sim's default, and the kit's gntalloc module (loaded with its default limit):
    # what listen(max_clients=...) sizes rings to.
    assert backend.page_limit == 1024
    with backend.share(backend.domid, 1):
        assert backend.page_limit == 1024  # the limit, not what is left of it


def test_share_map_read_write_across_processes(backend: Backend, peer: Peer) -> None:
    with backend.share(peer.domid, 3) as pages:
        assert len(pages.refs) == len(set(pages.refs)) == 3
        with pages.mapping.view() as v:
            assert v.tobytes() == bytes(3 * PAGE), "granted pages must be zeroed"
            for i in range(3):
                v[i * PAGE : i * PAGE + 5] = b"page%d" % i
        handle, readonly = peer.call("map", backend.domid, list(pages.refs), True)
        assert not readonly
        # Contiguous and in ref order, seen by the other process.
        for i in range(3):
            assert peer.call("read", handle, i * PAGE, 5) == b"page%d" % i
        peer.call("write", handle, 2 * PAGE + 100, b"reply")
        with pages.mapping.view() as v:
            assert v[2 * PAGE + 100 : 2 * PAGE + 105] == b"reply"
        # Mapping a subset, in another order.
        handle2, _ = peer.call("map", backend.domid, [pages.refs[2], pages.refs[0]], True)
        assert peer.call("read", handle2, 0, 5) == b"page2"
        assert peer.call("read", handle2, PAGE, 5) == b"page0"
        peer.call("close", handle2)
        peer.call("close", handle)


def test_readonly_grant_refuses_writes(backend: Backend, peer: Peer) -> None:
    with backend.share(peer.domid, 1, writable=False) as pages:
        set_byte(pages, 7, 42)
        with pytest.raises(PeerError) as info:
            peer.call("map", backend.domid, list(pages.refs), True)
        assert info.value.kind == "XenError"
        handle, readonly = peer.call("map", backend.domid, list(pages.refs), False)
        assert readonly
        assert peer.call("read", handle, 7, 1) == b"\x2a"
        assert peer.call("try_write", handle) == "TypeError"
        assert byte_at(pages, 0) == 0
        peer.call("close", handle)


def test_wrong_domid_cannot_map(backend_name: str, backend: Backend, peer: Peer) -> None:
    if backend_name != "sim":
        pytest.skip("dom0 talking to itself cannot be a wrong domain on xen")
    with backend.share(peer.domid + 1, 1) as pages:
        with pytest.raises(PeerError) as info:
            peer.call("map", backend.domid, list(pages.refs), False)
        assert info.value.kind == "XenError"
    # A ref nobody granted.
    with pytest.raises(PeerError) as info:
        peer.call("map", backend.domid, [123456], False)
    assert info.value.kind == "XenError"


def _notify_setup(backend: Backend, peer: Peer) -> tuple[Pages, EventPort, int]:
    pages = backend.share(peer.domid, 2)
    port, peer_port = connect_ports(backend, peer)
    handle, _ = peer.call("map", backend.domid, list(pages.refs), True)
    set_byte(pages, PAGE + 21, 1)
    peer.call("set_notify", handle, PAGE + 21, peer_port)
    peer.call("notify", peer_port)  # "I am connected": also teaches us who the peer is
    assert wait_event(port)
    port.unmask()
    assert byte_at(pages, PAGE + 21) == 1
    return pages, port, handle


def test_unmap_notify_on_clean_unmap(backend: Backend, peer: Peer) -> None:
    pages, port, handle = _notify_setup(backend, peer)
    with pages, port:
        peer.call("close", handle)
        assert wait_event(port, 2.0), "no event after the peer unmapped"
        assert byte_at(pages, PAGE + 21) == 0


@pytest.mark.parametrize("with_child", [False, True], ids=["plain", "forked-child"])
def test_unmap_notify_on_sigkill(backend: Backend, backend_name: str, with_child: bool) -> None:
    sleeper = 0
    with Peer(backend_name, 1) as peer:
        pages, port, _handle = _notify_setup(backend, peer)
        with pages, port:
            if with_child:
                # The child inherits every fd of the peer, but not its death.
                sleeper = peer.call("fork_sleeper")
            try:
                t0 = time.monotonic()
                peer.kill()
                assert wait_event(port, 2.0), "no event after the peer was SIGKILLed"
                assert byte_at(pages, PAGE + 21) == 0
                assert time.monotonic() - t0 < 2.0
                # (No status() check: on Xen a forked child holding the evtchn fd keeps
                # the port bound, and the unmap event precedes the fd release.)
            finally:
                if sleeper:
                    os.kill(sleeper, signal.SIGKILL)
                    _wait_gone(sleeper)


def _wait_gone(pid: int) -> None:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in (b"Z", b"X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} survived SIGKILL")


def test_event_delivery_and_coalescing(backend: Backend, peer: Peer) -> None:
    port, peer_port = connect_ports(backend, peer)
    with port:
        assert not port.pending()
        peer.call("notify", peer_port, 1)
        assert wait_event(port)  # delivered; the port is now masked
        peer.call("notify", peer_port, 3)  # three events while masked...
        time.sleep(0.05)
        port.unmask()
        assert wait_event(port)  # ...arrive as one
        port.unmask()
        assert not wait_event(port, 0.2)
        # And the other direction.
        port.notify()
        assert peer.call("wait_event", peer_port, 2.0)
        peer.call("close", peer_port)


def test_store_transactions_conflict(backend: Backend) -> None:
    store = backend.store
    base = f"/local/domain/{backend.domid}/data/gntipc-test"
    try:
        store.write(f"{base}/a", b"1")
        with store.transaction() as t:
            assert t.read(f"{base}/a") == b"1"
            t.write(f"{base}/b", b"2")
            assert not store.exists(f"{base}/b")  # not visible before commit
        assert store.read(f"{base}/b") == b"2"
        t = store.transaction()
        assert t.read(f"{base}/a") == b"1"
        store.write(f"{base}/a", b"changed")  # someone else writes meanwhile
        t.write(f"{base}/a", b"mine")
        with pytest.raises(XenError) as info:
            t.commit()
        assert info.value.errno == errno.EAGAIN
        assert store.read(f"{base}/a") == b"changed"
        assert sorted(store.directory(base)) == ["a", "b"]
    finally:
        store.rm(base)
    assert not store.exists(base)


def test_store_permissions_and_watches(backend: Backend, peer: Peer) -> None:
    store = backend.store
    base = f"/local/domain/{backend.domid}/data/gntipc-perm"
    try:
        store.write(base, b"")
        store.set_perms(base, [Perm(backend.domid, "n"), Perm(peer.domid, "r")])
        assert store.get_perms(base) == [Perm(backend.domid, "n"), Perm(peer.domid, "r")]
        store.write(f"{base}/key", b"v")
        # A new node inherits its parent's permissions.
        assert store.get_perms(f"{base}/key")[1:] == [Perm(peer.domid, "r")]
        assert peer.call("store_read", f"{base}/key") == b"v"
        with store.watch(base, "tok") as w:
            assert _events(w) == [(base, "tok")]  # fires once when set
            peer_base = f"{base}/key"
            store.write(peer_base, b"v2")
            assert (peer_base, "tok") in _events(w)
            store.rm(peer_base)
            assert (peer_base, "tok") in _events(w)
            assert w.read_events() == []
    finally:
        store.rm(base)


def _events(w: object) -> list[tuple[str, str]]:
    from gntipc.backends import Watch

    assert isinstance(w, Watch)
    end = time.monotonic() + 2.0
    events: list[tuple[str, str]] = []
    while (left := end - time.monotonic()) > 0:
        select.select([w.fileno()], [], [], left)
        events += w.read_events()
        if events:
            time.sleep(0.02)  # let a burst of events arrive
            return events + w.read_events()
    return events


def test_grant_copy(backend: Backend, peer: Peer) -> None:
    with backend.share(peer.domid, 1) as pages:
        set_byte(pages, 0, 9)
        statuses, back = peer.call("grant_copy", backend.domid, pages.refs[0], 100, b"hello")
        assert statuses[:2] == [0, 0]
        assert statuses[2] < 0  # an ungranted ref fails alone
        assert back == b"hello"
        with pages.mapping.view() as v:
            assert v[100:105] == b"hello"


def test_port_closed_by_peer_becomes_unbound(backend: Backend, peer: Peer) -> None:
    port, peer_port = connect_ports(backend, peer)
    with port:
        peer.call("close", peer_port)
        assert port.status() in (PortState.UNBOUND, PortState.CLOSED)
        assert not port.closed  # the peer's close does not close our end
    assert port.closed
    port.close()  # idempotent
    assert port.closed


def test_bind_to_wrong_domain_fails(backend: Backend, peer: Peer) -> None:
    with backend.alloc_unbound(peer.domid) as port:
        with pytest.raises(PeerError) as info:
            peer.call("bind", backend.domid + 7, port.port)
        assert info.value.kind == "XenError"
        assert port.status() == PortState.UNBOUND
