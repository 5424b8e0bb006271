"""Behaviour specific to the sim backend: limits, domain death, reaping, leak checks."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from _peer import Peer
from anyio import ClosedResourceError

from gntipc._exceptions import LocalProtocolError, XenError
from gntipc._process import datagram_sender
from gntipc.backends import PortState
from gntipc.backends.sim import SimBackend, assert_cleaned_up, kill_domain

PAGE = 4096


def test_runtime_dir_private_and_removed_by_last_close() -> None:
    path = os.environ["GNTIPC_SIM_DIR"]
    with SimBackend(0) as a:
        assert a.runtime_dir == path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        with SimBackend(3):
            pass
        assert os.path.isdir(path)  # a is still open
    assert not os.path.exists(path)


def test_domid_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNTIPC_SIM_DOMID", "7")
    with SimBackend() as b:
        assert b.domid == 7
        assert b.store.read("domid") == b"7"
    with pytest.raises(ValueError):
        SimBackend(0x7FF0)


def test_page_limit_enospc() -> None:
    with SimBackend(0, page_limit=4) as b, b.share(1, 3) as p:
        with pytest.raises(XenError) as info:
            b.share(1, 2)
        assert info.value.errno == errno.ENOSPC
        assert "page_limit" in str(info.value)  # names the sim's knob
        with b.share(1, 1) as q:
            assert set(q.refs).isdisjoint(p.refs)
    with pytest.raises(ValueError):
        SimBackend(0, page_limit=0)


def test_limit_counts_every_process_of_the_domain() -> None:
    with SimBackend(0, page_limit=2) as b, b.share(1, 2):
        # Another backend playing domain 0 shares the same limit.
        b2 = SimBackend(0, page_limit=2)
        try:
            with pytest.raises(XenError):
                b2.share(1, 1)
        finally:
            b2.close()


def test_readonly_mapping_and_notify_checks() -> None:
    with (
        SimBackend(0) as a,
        SimBackend(1) as b,
        a.share(1, 1, writable=False) as p,
        b.map(0, p.refs, writable=False) as q,
    ):
        with pytest.raises(LocalProtocolError):
            q.set_unmap_notify(0)  # clear_byte on a read-only mapping
        with pytest.raises(LocalProtocolError):
            q.set_unmap_notify(PAGE, clear_byte=False)
        with q.mapping.view() as v:
            assert v.readonly
        with pytest.raises(TypeError):
            q.mapping.mmap[0] = 1


def test_masked_port_latches_and_notify_to_gone_peer_fails() -> None:
    with SimBackend(0) as a, SimBackend(1) as b:
        pa = a.alloc_unbound(1)
        with pytest.raises(XenError) as info:
            pa.notify()  # nobody bound yet
        assert info.value.errno == errno.ENOTCONN
        pb = b.bind_interdomain(0, pa.port)
        pb.notify()
        assert pa.pending()
        for _ in range(3):
            pb.notify()
        assert not pa.pending()  # masked: latched, not delivered
        pa.unmask()
        assert select.select([pa.fileno()], [], [], 1)[0]
        assert pa.pending()
        assert not pa.pending()
        pb.close()
        assert pa.status() == PortState.UNBOUND
        with pytest.raises(XenError):
            pa.notify()
        pa.close()
        pa.close()  # idempotent
        with pytest.raises(ClosedResourceError):
            pa.fileno()


def test_kill_domain_is_silent() -> None:
    with SimBackend(0) as a, Peer("sim", 5) as peer:
        home = "/local/domain/5"
        assert a.store.read(f"{home}/domid") == b"5"
        with a.store.watch("@releaseDomain", "rel") as w, a.share(5, 1) as pages:
            assert w.read_events() == [("@releaseDomain", "rel")]
            port = a.alloc_unbound(5)
            pp = peer.call("bind", 0, port.port)
            handle, _ = peer.call("map", 0, list(pages.refs), True)
            with pages.mapping.view() as v:
                v[20] = 1
            peer.call("set_notify", handle, 20, pp)
            peer.call("notify", pp)
            select.select([port.fileno()], [], [], 2)
            assert port.pending()
            port.unmask()
            assert kill_domain(5) == [peer.pid]
            assert not peer.proc.is_alive() or peer.proc.join(5) is None
            # No notification: the byte stays, no event; the port is just unbound.
            select.select([port.fileno()], [], [], 0.3)
            assert not port.pending()
            with pages.mapping.view() as v:
                assert v[20] == 1
            assert port.status() == PortState.UNBOUND
            assert not a.store.exists(home)
            select.select([w.fileno()], [], [], 2)
            assert ("@releaseDomain", "rel") in w.read_events()
            port.close()


def test_kill_domain_spares_the_caller() -> None:
    with SimBackend(4) as me:
        assert kill_domain(4) == []
        assert not me.closed


def test_stale_state_of_sigkilled_process_is_reclaimed() -> None:
    with Peer("sim", 2) as peer:
        with SimBackend(0) as a, a.share(2, 1) as p:
            peer.call("map", 0, list(p.refs), True)
            peer.call("alloc", 0)
            peer.call("store_write", "data/x", b"1")
            peer.kill()
            peer.proc.join(5)
        # The peer's rows and files are reaped: assert_cleaned_up would list them.
        assert_cleaned_up()
    assert not os.path.exists(os.environ["GNTIPC_SIM_DIR"])


def test_assert_cleaned_up_reports_leftovers() -> None:
    a = SimBackend(0)
    pages = a.share(1, 1)
    with pytest.raises(AssertionError, match="SimPages"):
        assert_cleaned_up()
    pages.close()
    pages.close()
    a.close()
    a.close()
    with pytest.raises(ClosedResourceError):
        a.share(1, 1)


def test_unclosed_resources_warn() -> None:
    import gc

    a = SimBackend(0)
    port = a.alloc_unbound(1)
    port_ref = port
    del port
    with pytest.warns(ResourceWarning):
        port_ref.__del__()
    a.close()
    gc.collect()


def test_store_permissions_keep_domains_out() -> None:
    with SimBackend(0) as d0, SimBackend(1) as d1, SimBackend(2) as d2:
        d1.store.write("data/secret", b"s")
        assert d1.store.get_perms("data/secret")[0].domid == 1
        with pytest.raises(XenError) as info:
            d2.store.read("/local/domain/1/data/secret")
        assert info.value.errno == errno.EACCES
        with pytest.raises(XenError):
            d2.store.write("/local/domain/1/data/x", b"")
        with pytest.raises(XenError):
            d2.store.directory("/local/domain/1")
        assert d0.store.read("/local/domain/1/data/secret") == b"s"  # dom0 privileged
        with pytest.raises(XenError) as info:
            d1.store.read("nope")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(XenError) as info:
            d1.store.read("bad//path")
        assert info.value.errno == errno.EINVAL


def test_store_write_is_fast() -> None:
    with SimBackend(0) as b:
        t = time.perf_counter()
        for i in range(200):
            b.store.write("data/k", b"%d" % i)
        per_write = (time.perf_counter() - t) / 200
        assert per_write < 0.01  # generous: the target is well under 1 ms


def test_watch_events_go_out_after_the_change_is_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A watcher woken before COMMIT would read the store, miss the change, and sleep
    # forever (a connect that never saw the server's keys).  Every watch event must find
    # the change visible to another process's connection.
    import sqlite3

    from gntipc.backends.sim import _store

    with SimBackend(domid=0) as b:
        base = f"/local/domain/0/data/gntipc-test/{os.getpid()}"
        db_path = os.path.join(b._rt.path, "state.db")
        seen: list[bool] = []
        real_send = _store.send_dgram

        def checking_send(path: str, msg: bytes) -> bool:
            other = sqlite3.connect(db_path)
            try:
                row = other.execute("SELECT 1 FROM nodes WHERE path=?", (base + "/k",))
                seen.append(row.fetchone() is not None)
            finally:
                other.close()
            return real_send(path, msg)

        monkeypatch.setattr(_store, "send_dgram", checking_send)
        with b.store.watch(base, "t"):
            b.store.write(base + "/k", b"1")
            with b.store.transaction() as tx:
                tx.write(base + "/k", b"2")
            b.store.rm(base)
        # the first event is the one every new watch gets at once
        assert seen[1:3] == [True, True]


def _sender_refuses() -> bool:
    """True if this process's shared datagram sender refuses to send to an empty queue."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        probe.bind(f"\0gntipc-probe-{os.getpid()}")  # abstract: no file to clean up
        try:
            datagram_sender().sendto(b"p", probe.getsockname())
        except BlockingIOError:
            return True
        return False


def test_notify_is_delivered_while_unread_watch_events_pile_up() -> None:
    # The kernel charges a unix datagram to the socket that sent it until it is read,
    # and a process sends every sim event through one shared socket: a few hundred watch
    # events nobody reads (here 64 watches, ~11 queued each) make that socket refuse
    # every send with EAGAIN.  That was taken for "the receiver's queue is full", and the
    # notify dropped: the crowd test (tests/stress/test_exhaustion.py) left clients asleep
    # with data in their ring.  The peer runs in another process, as those clients did.
    with SimBackend(0) as a, Peer("sim", 1) as peer, contextlib.ExitStack() as stack:
        handle, remote_port = peer.call("alloc", 0)
        port = stack.enter_context(a.bind_interdomain(1, remote_port))
        for _ in range(64):
            stack.enter_context(a.store.watch("data/clog"))
        for k in range(12):
            a.store.write("data/clog", b"%d" % k)
        if not _sender_refuses():
            pytest.skip("the shared sender did not fill up (a larger net.core.wmem_default)")
        port.notify()
        assert peer.call("wait_event", handle, 10.0, timeout=30)
        # And the other way (the peer's sender is not clogged): still one event each.
        peer.call("notify", handle)
        select.select([port.fileno()], [], [], 10)
        assert port.pending()
        port.unmask()


_DIE_BETWEEN_FILE_AND_ROW = """
import os, signal
from gntipc.backends.sim import SimBackend, _store

real = _store.bind_dgram

def bind_then_die(path):
    real(path)
    print(os.path.basename(path), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the socket exists, its watches row never will

_store.bind_dgram = bind_then_die
SimBackend(9).store.watch("/local/domain/9/x")
"""


def test_files_of_a_process_killed_mid_setup_are_reaped() -> None:
    # A file comes first, its row second: a process killed in between leaves a file no
    # row names.  Reaping removes it, and the next backend gets a new id (ids were
    # reused once, and a reused id meant the same file name: EADDRINUSE).
    with SimBackend(0) as a:  # keeps the runtime directory (and the orphan) alive
        run = subprocess.run(
            [sys.executable, "-c", _DIE_BETWEEN_FILE_AND_ROW],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == -signal.SIGKILL, run.stderr[-1500:]
        name = run.stdout.strip()
        orphan = os.path.join(a.runtime_dir, "w", name)
        assert os.path.exists(orphan)
        with SimBackend(9) as b:  # opening reaps the dead process
            assert not os.path.exists(orphan)
            assert b._domain.bid > int(name.split("-")[0])
            with b.store.watch("x"):
                pass
