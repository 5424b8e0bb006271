"""Device wrappers without Xen: argument validation, lifecycle, and that each wrapper really
issues its ioctl (on /dev/null, which answers ENOTTY to every ioctl)."""

from __future__ import annotations

import errno
import gc
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from anyio import ClosedResourceError

from gntipc._exceptions import BackendUnavailable, LocalProtocolError, XenError
from gntipc.backends._abc import CopySegment, ForeignRef
from gntipc.devices import MAX_PAGES, Evtchn, Gntalloc, Gntdev, Privcmd

NULL = "/dev/null"


@pytest.mark.parametrize(
    ("cls", "device", "module"),
    [
        (Gntdev, "gntdev", "xen_gntdev"),
        (Gntalloc, "gntalloc", "xen_gntalloc"),
        (Evtchn, "evtchn", "xen_evtchn"),
        (Privcmd, "privcmd", "xen_privcmd"),
    ],
)
def test_missing_device_is_backend_unavailable(
    tmp_path: Any, cls: type, device: str, module: str
) -> None:
    missing = str(tmp_path / device)
    with pytest.raises(BackendUnavailable) as ei:
        cls(missing)
    msg = str(ei.value)
    assert f"{missing} is missing" in msg and "not running on Xen" in msg and module in msg
    if not os.path.exists(f"/dev/xen/{device}"):
        with pytest.raises(BackendUnavailable, match=f"/dev/xen/{device} is missing"):
            cls()


def enotty_calls() -> list[tuple[str, type, Callable[[Any], object], str]]:
    seg = CopySegment(ForeignRef(1, 2, 0), bytearray(16), 16)
    return [
        ("map", Gntdev, lambda d: d.map_refs(1, [2, 3]), "MAP_GRANT_REF"),
        ("vaddr", Gntdev, lambda d: d.get_offset_for_vaddr(0x1000), "GET_OFFSET_FOR_VADDR"),
        ("copy", Gntdev, lambda d: d.grant_copy([seg]), "GRANT_COPY"),
        ("exp", Gntdev, lambda d: d.dmabuf_export_from_refs(1, [2]), "DMABUF_EXP_FROM_REFS"),
        ("wait", Gntdev, lambda d: d.dmabuf_export_wait_released(3, 10), "EXP_WAIT_RELEASED"),
        ("imp", Gntdev, lambda d: d.dmabuf_import_to_refs(3, 1, 2), "DMABUF_IMP_TO_REFS"),
        ("rel", Gntdev, lambda d: d.dmabuf_import_release(3), "DMABUF_IMP_RELEASE"),
        ("alloc", Gntalloc, lambda d: d.share(1, 2), "ALLOC_GREF"),
        ("unbound", Evtchn, lambda d: d.bind_unbound_port(1), "BIND_UNBOUND_PORT"),
        ("inter", Evtchn, lambda d: d.bind_interdomain(1, 5), "BIND_INTERDOMAIN"),
        ("virq", Evtchn, lambda d: d.bind_virq(1), "BIND_VIRQ"),
        ("unbind", Evtchn, lambda d: d.unbind(5), "UNBIND"),
        ("notify", Evtchn, lambda d: d.notify(5), "NOTIFY"),
        ("reset", Evtchn, lambda d: d.reset(), "RESET"),
        ("restrict", Evtchn, lambda d: d.restrict_domid(1), "RESTRICT_DOMID"),
        ("status", Privcmd, lambda d: d.evtchn_status(5), "EVTCHNOP_status"),
    ]


@pytest.mark.parametrize(
    ("cls", "call", "name"), [c[1:] for c in enotty_calls()], ids=[c[0] for c in enotty_calls()]
)
def test_each_wrapper_issues_its_ioctl(cls: type, call: Callable[[Any], object], name: str) -> None:
    with cls(NULL) as dev:
        with pytest.raises(XenError) as ei:
            call(dev)
        assert ei.value.errno == errno.ENOTTY
        assert isinstance(ei.value, OSError)
        assert name in str(ei.value)


def test_dmabuf_enotty_says_why() -> None:
    with Gntdev(NULL) as dev, pytest.raises(XenError, match="dma-buf support"):
        dev.dmabuf_export_from_refs(1, [2])


def test_set_max_grants_tolerates_enotty() -> None:
    with Gntdev(NULL) as dev:
        assert dev.set_max_grants(64) is False


def test_evtchn_pending_and_unmask_use_the_fd() -> None:
    with Evtchn(NULL) as ev:
        assert ev.fileno() == ev.fd >= 0
        assert ev.pending() == []  # EOF on /dev/null: nothing pending
        ev.unmask(7)  # /dev/null swallows the 4-byte write


def test_evtchn_pending_decodes_u32_ports() -> None:
    ours, kernel = socket.socketpair()
    with ours, kernel, Evtchn(NULL) as ev:
        ours.setblocking(False)
        os.dup2(ours.fileno(), ev.fd)  # a socket stands in for the device: the decoding
        assert ev.pending() == []  # EAGAIN: nothing pending
        kernel.send(struct.pack("=II", 5, 70000))
        assert ev.pending() == [5, 70000]
        ev.unmask(70000)
        assert kernel.recv(16) == struct.pack("=I", 70000)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda d: d.map_refs(1, []), LocalProtocolError, "count 0"),
        (lambda d: d.map_refs(1, [0] * (MAX_PAGES + 1)), LocalProtocolError, "maximum"),
        (lambda d: d.map_refs(-1, [1]), LocalProtocolError, "domid"),
        (lambda d: d.map_refs(0x7FF0, [1]), LocalProtocolError, "domid"),
        (lambda d: d.map_refs(1, [2**32]), LocalProtocolError, "grant ref"),
        (lambda d: d.map_refs(1, [-1]), LocalProtocolError, "grant ref"),
        (lambda d: d.map_refs(1, ["7"]), TypeError, "grant ref"),
        (lambda d: d.map_refs(True, [1]), TypeError, "domid"),
        (lambda d: d.set_max_grants(0), LocalProtocolError, "count"),
        (
            lambda d: d.grant_copy([CopySegment(b"x", bytearray(1), 1)]),
            LocalProtocolError,
            "neither side",
        ),
        (
            lambda d: d.grant_copy([CopySegment(ForeignRef(1, 2), bytearray(1), 0)]),
            LocalProtocolError,
            "length",
        ),
        (
            lambda d: d.grant_copy([CopySegment(ForeignRef(1, 2, 4000), bytearray(200), 200)]),
            LocalProtocolError,
            "foreign offset",
        ),
        (
            lambda d: d.grant_copy([CopySegment(ForeignRef(1, 2), bytearray(3), 10)]),
            LocalProtocolError,
            "shorter",
        ),
        (
            lambda d: d.grant_copy([CopySegment(ForeignRef(1, 2), b"immutable", 4)]),
            LocalProtocolError,
            "dest buffer",
        ),
        (lambda d: d.dmabuf_import_to_refs(3, 1, 0), LocalProtocolError, "count 0"),
    ],
)
def test_gntdev_validation(call: Callable[[Gntdev], object], exc: type, match: str) -> None:
    with Gntdev(NULL) as dev, pytest.raises(exc, match=match):
        call(dev)


def test_gntalloc_evtchn_privcmd_validation() -> None:
    with Gntalloc(NULL) as ga:
        with pytest.raises(LocalProtocolError, match="count 0"):
            ga.share(1, 0)
        with pytest.raises(LocalProtocolError, match="count"):
            ga.share(1, MAX_PAGES + 1)
        with pytest.raises(LocalProtocolError, match="domid"):
            ga.share(0x8000, 1)
    with Evtchn(NULL) as ev:
        with pytest.raises(LocalProtocolError, match="port"):
            ev.notify(2**32)
        with pytest.raises(LocalProtocolError, match="domid"):
            ev.bind_unbound_port(70000)
        with pytest.raises(LocalProtocolError, match="port"):
            ev.unmask(-1)
    with Privcmd(NULL) as pc, pytest.raises(LocalProtocolError, match="port"):
        pc.evtchn_status(-3)


@pytest.mark.parametrize("cls", [Gntdev, Gntalloc, Evtchn, Privcmd])
def test_lifecycle(cls: type) -> None:
    dev = cls(NULL)
    fd = dev.fd
    assert fd >= 0 and not dev.closed
    dev.close()
    dev.close()  # idempotent
    assert dev.fd == -1 and dev.closed
    with pytest.raises(OSError):
        os.fstat(fd)  # really closed
    with cls(NULL) as d2:
        pass
    assert d2.fd == -1


def test_use_after_close_raises_closed_resource() -> None:
    gd = Gntdev(NULL)
    gd.close()
    with pytest.raises(ClosedResourceError):
        gd.map_refs(1, [2])
    ev = Evtchn(NULL)
    ev.close()
    for call in (ev.fileno, ev.pending, lambda: ev.unmask(1), lambda: ev.notify(1)):
        with pytest.raises(ClosedResourceError):
            call()
    pc = Privcmd(NULL)
    pc.close()
    with pytest.raises(ClosedResourceError):
        pc.evtchn_status(1)


@pytest.mark.parametrize("cls", [Gntdev, Evtchn, Privcmd])
def test_unclosed_device_warns(cls: type) -> None:
    dev = cls(NULL)
    fd = dev.fd
    with pytest.warns(ResourceWarning, match="unclosed"):
        del dev
        gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)  # the finaliser closed it anyway
