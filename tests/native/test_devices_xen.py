"""The device wrappers on the real drivers (dom0 of the QEMU Xen kit; domid 0 shares to itself).

Run: /work/shared/xen-vm/run-in-xen.sh /work/main \
        '/work/main/.venv/bin/python -m pytest -m xen -q tests/native'
"""

from __future__ import annotations

import errno
import select
import signal
import subprocess
import sys
import textwrap

import pytest

from gntipc._exceptions import BackendUnavailable, XenError
from gntipc.backends._abc import CopySegment, ForeignRef, PortState
from gntipc.devices import Evtchn, Gntalloc, Gntdev, Privcmd

pytestmark = pytest.mark.xen  # skipped without Xen (tests/conftest.py)

SELF = 0  # these tests run in dom0, which may grant to and map from itself


def wait_port(ev: Evtchn, timeout: float = 10.0) -> list[int]:
    """Wait until the evtchn fd is readable, return the pending ports."""
    r, _, _ = select.select([ev.fileno()], [], [], timeout)
    assert r, "no event within the timeout"
    return ev.pending()


@pytest.fixture
def evpair():
    """An event channel looped back within dom0: (evtchn, unbound port, bound port)."""
    with Evtchn() as ev:
        a = ev.bind_unbound_port(SELF)
        b = ev.bind_interdomain(SELF, a)
        # Xen marks a freshly bound interdomain port pending (an event may have been sent
        # before the bind): consume it so that each test starts quiet.
        while select.select([ev.fileno()], [], [], 0.5)[0]:
            for port in ev.pending():
                assert port == b
                ev.unmask(port)
        yield ev, a, b


def test_share_and_map_both_ways() -> None:
    with Gntalloc() as ga, Gntdev() as gd, ga.share(SELF, 3) as share:
        assert len(share.refs) == 3 and len(set(share.refs)) == 3
        sv = share.mapping.view()
        assert bytes(sv) == bytes(3 * 4096)  # gntalloc pages are zeroed
        with gd.map_refs(SELF, share.refs) as m:
            mv = m.mapping.view()
            sv[0:5] = b"hello"
            sv[2 * 4096 + 7] = 0xAB
            assert bytes(mv[0:5]) == b"hello"
            assert mv[2 * 4096 + 7] == 0xAB
            mv[4096:4099] = b"xyz"
            assert bytes(sv[4096:4099]) == b"xyz"
            # get_offset_for_vaddr finds our map by its address.
            del mv
            assert gd.get_offset_for_vaddr(m.address) == (m.index, 3)
        with pytest.raises(XenError) as ei:
            gd.get_offset_for_vaddr(4096)  # not a gntdev mapping
        assert ei.value.errno == errno.EINVAL
        del sv


def test_read_only_map_and_grant() -> None:
    with Gntalloc() as ga, Gntdev() as gd, ga.share(SELF, 1, writable=False) as share:
        share.mapping.view()[0] = 7
        with pytest.raises(XenError):  # a read-only grant cannot be mapped writable
            gd.map_refs(SELF, share.refs, writable=True).close()
        with gd.map_refs(SELF, share.refs, writable=False) as m:
            v = m.mapping.view()
            assert v.readonly and v[0] == 7
            del v
            with pytest.raises(ValueError, match="read-only"):
                m.set_unmap_notify(0, clear_byte=True)


def test_set_max_grants_tolerates_enotty() -> None:
    with Gntdev() as gd:
        assert gd.set_max_grants(128) in (True, False)


def test_gntdev_unmap_notify_on_close(evpair) -> None:
    ev, a, b = evpair
    with Gntalloc() as ga, Gntdev() as gd, ga.share(SELF, 1) as share:
        share.mapping.view()[100] = 1
        m = gd.map_refs(SELF, share.refs)
        m.set_unmap_notify(100, clear_byte=True, port=b)
        assert share.mapping.view()[100] == 1
        m.close()
        assert a in wait_port(ev)
        assert share.mapping.view()[100] == 0


def test_gntalloc_unmap_notify_on_close(evpair) -> None:
    ev, a, b = evpair
    with Gntalloc() as ga, Gntdev() as gd:
        share = ga.share(SELF, 1)
        share.mapping.view()[9] = 1
        share.set_unmap_notify(9, clear_byte=True, port=b)
        with gd.map_refs(SELF, share.refs) as m:
            assert m.mapping.view()[9] == 1
            share.close()  # our last mapping goes: byte cleared, event sent
            assert a in wait_port(ev)
            assert m.mapping.view()[9] == 0


CHILD = textwrap.dedent(
    """
    import sys, time
    from gntipc.devices import Evtchn, Gntdev
    ref, port = int(sys.argv[1]), int(sys.argv[2])
    ev = Evtchn(); gd = Gntdev()
    local = ev.bind_interdomain(0, port)
    m = gd.map_refs(0, [ref])
    m.mapping.view()[21] = 1
    m.set_unmap_notify(21, clear_byte=True, port=local)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_unmap_notify_on_sigkill() -> None:
    with Evtchn() as ev, Gntalloc() as ga, ga.share(SELF, 1) as share:
        port = ev.bind_unbound_port(SELF)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(share.refs[0]), str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            assert share.mapping.view()[21] == 1
            child.send_signal(signal.SIGKILL)
            assert child.wait(30) == -signal.SIGKILL
            assert port in wait_port(ev)
            assert share.mapping.view()[21] == 0
        finally:
            child.kill()
            child.wait()
            child.stdout.close()  # type: ignore[union-attr]


def test_grant_copy_per_segment_status() -> None:
    with Gntalloc() as ga, Gntdev() as gd, ga.share(SELF, 1) as share:
        v = share.mapping.view()
        v[0:4096] = bytes(range(256)) * 16
        out = bytearray(100)
        statuses = gd.grant_copy(
            [
                CopySegment(ForeignRef(SELF, share.refs[0], 10), out, 100),
                CopySegment(b"Z" * 50, ForeignRef(SELF, share.refs[0], 2000), 50),
                CopySegment(ForeignRef(SELF, 0xFFFFFF, 0), bytearray(10), 10),
            ]
        )
        assert statuses[0] == 0 and statuses[1] == 0
        assert statuses[2] < 0  # a bad ref fails alone, with its GNTST_* status
        assert bytes(out) == bytes(v[10:110])
        assert bytes(v[2000:2050]) == b"Z" * 50
        del v


def test_dmabuf_calls_fail_cleanly() -> None:
    """Every dma-buf call with bad arguments is a clear XenError: ENOTTY naming what is
    missing with Debian's module (no gntdev dma-buf), another errno with the kit's
    CONFIG_XEN_GNTDEV_DMABUF build (make test-xen-dmabuf runs this file with it)."""
    with Gntdev() as gd:
        # Which module this is, asked once: an unknown dma-buf fd is ENOENT to a module
        # with the ioctls, ENOTTY to one without (as test_dmabuf.xen_has_dmabuf).
        try:
            gd.dmabuf_export_wait_released(1 << 20, 0)
            has_dmabuf = True
        except XenError as exc:
            has_dmabuf = exc.errno != errno.ENOTTY
        calls = [
            lambda: gd.dmabuf_export_from_refs(SELF, [1]),
            lambda: gd.dmabuf_export_wait_released(0, 1),
            lambda: gd.dmabuf_import_to_refs(0, SELF, 1),
            lambda: gd.dmabuf_import_release(0),
        ]
        for call in calls:
            with pytest.raises(XenError) as ei:
                call()
            if has_dmabuf:
                assert ei.value.errno != errno.ENOTTY, ei.value
                continue
            assert ei.value.errno == errno.ENOTTY, ei.value
            msg = str(ei.value)
            assert "dma-buf" in msg and "CONFIG_XEN_GNTDEV_DMABUF" in msg, msg
            assert "build-gntdev-dmabuf.sh" in msg, msg  # how to get a module with it


def test_evtchn_notify_mask_unmask_reset(evpair) -> None:
    ev, a, b = evpair
    ev.notify(b)
    assert wait_port(ev) == [a]
    # While masked, events coalesce and nothing is delivered.
    ev.notify(b)
    ev.notify(b)
    assert select.select([ev.fileno()], [], [], 0.3)[0] == []
    ev.unmask(a)
    assert wait_port(ev) == [a]  # the coalesced event arrives on unmask
    ev.unmask(a)
    ev.notify(a)  # the other direction
    assert wait_port(ev) == [b]
    ev.unmask(b)
    ev.reset()
    assert ev.pending() == []
    ev.unbind(b)
    with pytest.raises(XenError):
        ev.notify(b)


def test_evtchn_restrict_domid() -> None:
    with Evtchn() as ev, Evtchn() as free:
        port = free.bind_unbound_port(SELF)
        with pytest.raises(XenError) as ei:
            ev.restrict_domid(0)  # dom0 is not a valid restriction target
        assert ei.value.errno == errno.EINVAL
        ev.restrict_domid(1)
        # Restricted: no unbound ports, and interdomain binds only to domain 1.
        for call in (
            lambda: ev.bind_unbound_port(1),
            lambda: ev.bind_interdomain(SELF, port),
            lambda: ev.restrict_domid(2),  # once only
        ):
            with pytest.raises(XenError) as ei:
                call()
            assert ei.value.errno == errno.EACCES
        assert free.bind_interdomain(SELF, port) > 0  # the unrestricted fd still can


def test_evtchn_bind_virq() -> None:
    with Evtchn() as ev:
        try:
            port = ev.bind_virq(1)  # VIRQ_DEBUG: free in dom0 unless someone holds it
        except XenError as exc:
            assert exc.errno in (errno.EINVAL, errno.EEXIST, errno.EBUSY)
        else:
            assert port > 0
            ev.unbind(port)


def test_evtchn_status(evpair) -> None:
    ev, a, b = evpair
    try:
        pc = Privcmd()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    with pc:
        try:
            sa = pc.evtchn_status(a)
        except BackendUnavailable as exc:  # a PV domU
            pytest.skip(str(exc))
        assert sa.status == PortState.INTERDOMAIN
        assert (sa.remote_domid, sa.remote_port) == (SELF, b)
        unbound = ev.bind_unbound_port(5)
        su = pc.evtchn_status(unbound)
        assert su.status == PortState.UNBOUND and su.remote_domid == 5
        ev.unbind(unbound)
        assert pc.evtchn_status(unbound).status == PortState.CLOSED
        ev.unbind(b)  # the peer end goes: ours becomes unbound, awaiting a new connection
        assert pc.evtchn_status(a).status == PortState.UNBOUND
