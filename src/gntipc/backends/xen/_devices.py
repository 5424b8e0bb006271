"""Pythonic handles on the Xen devices: ``/dev/xen/{gntdev,gntalloc,evtchn,privcmd}``.

Thin, checked wrappers over the ioctls of :mod:`gntipc._native`: every argument is
validated before it reaches the kernel, every failing call raises :class:`XenError`
(an :class:`OSError` keeping ``errno``) and every handle is a context manager with an
idempotent ``close()``.  A missing device raises :class:`BackendUnavailable` naming it.

Mapped memory is handed out as :class:`gntipc._mapping.Mapping`, which refuses to unmap
while memoryviews into it are alive, so no view ever dangles.

Closing a device while mappings made through it are still open is allowed: each mapping
keeps the device file alive (the kernel holds it for the mmap), so the pages stay valid
until the mapping itself is closed, and the kernel then frees the grants.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

from anyio import ClosedResourceError

from ..._domid import DOMID_SELF, check_domid
from ..._exceptions import BackendUnavailable, LocalProtocolError, XenError, raise_errno
from ..._mapping import PAGE_SIZE, Mapping
from ..._native import check_rc, ffi, lib
from ..._resource import Closeable
from .._abc import CopySegment, ForeignRef, PortState

__all__ = [
    "MAX_PAGES",
    "Evtchn",
    "EvtchnStatus",
    "Gntalloc",
    "GntallocShare",
    "Gntdev",
    "GntdevMap",
    "Privcmd",
]

#: Most pages one map/share call accepts: 65536 pages = 256 MiB.  A vchan needs at most
#: 513 (a control page and two 1 MiB rings); the cap turns a runaway count into a clear
#: error instead of a huge kernel allocation.
MAX_PAGES = 1 << 16

_U32 = 0xFFFFFFFF
# Outside any class: a dunder-prefixed attribute name would be mangled inside one.
_HYPERVISOR_EVENT_CHANNEL_OP: int = lib.__HYPERVISOR_event_channel_op


# ----------------------------------------------------------------- validation helpers
def _check_int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise LocalProtocolError(f"{name} {value} is outside {lo}..{hi:#x}")
    return value


def _check_port(port: object) -> int:
    return _check_int(port, "port", 0, _U32)


def _check_refs(refs: Iterable[int]) -> tuple[int, ...]:
    refs = tuple(refs)
    if not refs:
        raise LocalProtocolError("at least one grant ref is needed (count 0)")
    if len(refs) > MAX_PAGES:
        raise LocalProtocolError(f"{len(refs)} grant refs is more than the maximum {MAX_PAGES}")
    for ref in refs:
        _check_int(ref, "grant ref", 0, _U32)
    return refs


def _check_count(count: object) -> int:
    if isinstance(count, int) and not isinstance(count, bool) and count == 0:
        raise LocalProtocolError("count must be at least 1 (count 0)")
    return _check_int(count, "count", 1, MAX_PAGES)


def _tail(array: Any) -> Any:
    """A pointer to the variable-length ``x[1]`` array that ends a kernel struct (cffi
    bounds-checks the array type; the buffer behind it was allocated for ``count``)."""
    return ffi.cast(ffi.typeof(array).item.cname + " *", array)


def _address_of(mm: mmap.mmap) -> int:
    """The virtual address of an mmap (the temporary buffer export is released at once)."""
    p = ffi.from_buffer(mm)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


def _mmap(fd: int, size: int, writable: bool, offset: int, what: str) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
    except OSError as exc:
        raise_errno(exc.errno or errno.EIO, what)
        raise  # unreachable: raise_errno always raises


# ------------------------------------------------------------------------- base class
class _Device(Closeable):
    """An open ``/dev/xen/*`` device."""

    _DEVICE: ClassVar[str]
    _MODULE: ClassVar[str]
    _OPEN_FLAGS: ClassVar[int] = os.O_RDWR | os.O_CLOEXEC

    def __init__(self, path: str | None = None) -> None:
        self._fd = -1
        self.path = path if path is not None else self._DEVICE
        try:
            self._fd = os.open(self.path, self._OPEN_FLAGS)
        except FileNotFoundError:
            raise BackendUnavailable(
                f"cannot open {self.path}: {self.path} is missing: not running on Xen "
                f"(or the {self._MODULE} module is not loaded)"
            ) from None
        except PermissionError:
            raise BackendUnavailable(
                f"cannot open {self.path}: permission denied (the Xen devices need root "
                "or a udev rule granting access)"
            ) from None

    @property
    def fd(self) -> int:
        """The file descriptor, or -1 once closed."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _live_fd(self) -> int:
        fd = self._fd
        if fd < 0:
            raise ClosedResourceError(f"{type(self).__name__} is closed")
        return fd

    def _ioctl(self, req: int, arg: Any, what: str, *, enotty_hint: str = "") -> int:
        fd = self._live_fd()
        try:
            rc: int = lib.gnt_ioctl(fd, req, arg)
            return check_rc(rc, what)
        except XenError as exc:
            if exc.errno == errno.ENOTTY and enotty_hint:
                raise XenError(errno.ENOTTY, f"{exc.strerror} ({enotty_hint})") from None
            raise

    def close(self) -> None:
        """Close the device (idempotent).  Mappings made through it stay valid."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"<gntipc.{type(self).__name__} {self.path} fd={self._fd}>"


class _PagesBase(Closeable):
    """Pages mapped through a device at mmap offset ``index``; ``close()`` unmaps them,
    then :meth:`_release` frees them in the kernel."""

    #: The device's ioctls (argument struct, number, name) that free the pages, and
    #: that set the unmap notification.
    _RELEASE: ClassVar[tuple[str, int, str]]
    _NOTIFY: ClassVar[tuple[str, int, str]]

    def __init__(
        self,
        dev: Gntdev | Gntalloc,
        domid: int,
        refs: tuple[int, ...],
        index: int,
        *,
        writable: bool,
        what: str,
    ) -> None:
        self._closed = False
        self._dev = dev
        self.domid = domid
        self.refs = refs
        self.index = index
        size = len(refs) * PAGE_SIZE
        try:
            mm = _mmap(dev._live_fd(), size, writable, index, what)
        except BaseException:
            self._closed = True
            self._release()
            raise
        self.mapping = Mapping(mm, size, writable=writable, release=self._release)

    def _release(self) -> None:
        """Free the pages in the kernel (after the munmap)."""
        if self._dev.closed:
            return  # the kernel frees them with the last reference to the file
        struct_name, request, what = self._RELEASE
        arg = ffi.new(f"struct {struct_name} *", {"index": self.index})
        arg.count = len(self.refs)
        self._dev._ioctl(request, arg, what)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_notify(self, offset: int, clear_byte: bool, port: int | None) -> int:
        if self._closed:
            raise ClosedResourceError(f"{type(self).__name__} is closed")
        self.mapping.check_unmap_notify(offset, clear_byte=clear_byte)
        action = 0
        if clear_byte:
            action |= lib.UNMAP_NOTIFY_CLEAR_BYTE
        if port is not None:
            _check_port(port)
            action |= lib.UNMAP_NOTIFY_SEND_EVENT
        return action

    def set_unmap_notify(
        self, offset: int, *, clear_byte: bool = True, port: int | None = None
    ) -> None:
        """On unmap or death of this process: zero the byte at ``offset`` (from the start
        of the mapping) if ``clear_byte``, then notify local evtchn ``port`` if given.

        Raises:
            TypeError: ``offset`` is not an int.
            LocalProtocolError: ``offset`` outside the mapping, or ``clear_byte`` on a
                read-only mapping.
            ClosedResourceError: these pages or their device are closed.
            XenError: the ioctl failed.
        """
        action = self._check_notify(offset, clear_byte, port)
        struct_name, request, what = self._NOTIFY
        arg = ffi.new(f"struct {struct_name} *")
        arg.index = self.index + offset
        arg.action = action
        arg.event_channel_port = port if port is not None else 0
        self._dev._ioctl(request, arg, what)

    def close(self) -> None:
        """Unmap the pages and release the grants (idempotent).

        Raises:
            MappingInUse: memoryviews into the mapping are alive; nothing was released.
            XenError: the kernel refused the release ioctl (the memory is unmapped anyway).
        """
        if self._closed:
            return
        self.mapping.close()  # munmap, then the release ioctl
        self._closed = True

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.refs)} pages"
        return f"<gntipc.{type(self).__name__} domid={self.domid} {state}>"


# ----------------------------------------------------------------------------- gntdev
class GntdevMap(_PagesBase):
    """Grant refs of ``domid`` mapped contiguously by :meth:`Gntdev.map_refs`."""

    _RELEASE = (
        "ioctl_gntdev_unmap_grant_ref",
        lib.IOCTL_GNTDEV_UNMAP_GRANT_REF,
        "gntdev UNMAP_GRANT_REF",
    )
    _NOTIFY = (
        "ioctl_gntdev_unmap_notify",
        lib.IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
        "gntdev SET_UNMAP_NOTIFY",
    )

    def __init__(
        self, dev: Gntdev, domid: int, refs: tuple[int, ...], index: int, writable: bool
    ) -> None:
        super().__init__(
            dev, domid, refs, index, writable=writable, what="mmap of a gntdev grant map"
        )

    @property
    def address(self) -> int:
        """The virtual address of the mapping in this process."""
        return _address_of(self.mapping.mmap)


_DMABUF_HINT = (
    "this xen_gntdev module has no dma-buf support: it was built without "
    "CONFIG_XEN_GNTDEV_DMABUF, as Debian's kernels are; load a xen-gntdev.ko built with "
    "it (gntipc's Xen kit builds one: tools/xen-vm/build-gntdev-dmabuf.sh)"
)

#: The export flags that ask for DMA-able memory (``GNTDEV_DMA_FLAG_WC``/``_COHERENT``).
DMA_FLAGS = lib.GNTDEV_DMA_FLAG_WC | lib.GNTDEV_DMA_FLAG_COHERENT


def guest_type() -> str:
    """This domain's type from ``/sys/hypervisor/guest_type`` (``PV``, ``HVM``,
    ``PVH``), or ``""`` when unknown."""
    try:
        with open("/sys/hypervisor/guest_type") as f:
            return f.read().strip()
    except OSError:
        return ""


class Gntdev(_Device):
    """``/dev/xen/gntdev``: map pages other domains granted to us."""

    _DEVICE = "/dev/xen/gntdev"
    _MODULE = "xen_gntdev"

    def map_refs(self, domid: int, refs: Sequence[int], *, writable: bool = True) -> GntdevMap:
        """Map ``refs`` granted by ``domid`` contiguously (MAP_GRANT_REF + mmap).

        Raises:
            LocalProtocolError: no refs, more than :data:`MAX_PAGES`, a ref not a u32, or a
                domid outside 0..0x7FEF.
            ClosedResourceError: the device is closed.
            XenError: the kernel refused (e.g. EINVAL/EFAULT for a bad ref or domid).
        """
        domid = check_domid(domid)
        refs_t = _check_refs(refs)
        n = len(refs_t)
        size = ffi.sizeof("struct ioctl_gntdev_map_grant_ref") + (n - 1) * ffi.sizeof(
            "struct ioctl_gntdev_grant_ref"
        )
        buf = ffi.new("char[]", size)
        arg = ffi.cast("struct ioctl_gntdev_map_grant_ref *", buf)
        arg.count = n
        out = _tail(arg.refs)
        for i, ref in enumerate(refs_t):
            out[i].domid = domid
            out[i].ref = ref
        self._ioctl(lib.IOCTL_GNTDEV_MAP_GRANT_REF, arg, "gntdev MAP_GRANT_REF")
        return GntdevMap(self, domid, refs_t, int(arg.index), writable)

    def get_offset_for_vaddr(self, vaddr: int) -> tuple[int, int]:
        """The mmap offset and page count of the gntdev mapping that starts at ``vaddr``.

        Raises:
            XenError: ``vaddr`` is not the start of a gntdev mapping (EINVAL).
        """
        _check_int(vaddr, "vaddr", 0, 2**64 - 1)
        arg = ffi.new("struct ioctl_gntdev_get_offset_for_vaddr *", {"vaddr": vaddr})
        self._ioctl(lib.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, arg, "gntdev GET_OFFSET_FOR_VADDR")
        return int(arg.offset), int(arg.count)

    def set_max_grants(self, count: int) -> bool:
        """Set the per-fd limit of mapped grants.  Returns False if the kernel no longer
        has this ioctl (ENOTTY on Linux >= 4.x, where there is no limit to set).

        Raises:
            XenError: any other failure.
        """
        _check_int(count, "count", 1, _U32)
        arg = ffi.new("struct ioctl_gntdev_set_max_grants *", {"count": count})
        try:
            self._ioctl(lib.IOCTL_GNTDEV_SET_MAX_GRANTS, arg, "gntdev SET_MAX_GRANTS")
        except XenError as exc:
            if exc.errno == errno.ENOTTY:
                return False
            raise
        return True

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy between local buffers and foreign grant refs (GRANT_COPY).

        Returns one ``GNTST_*`` status per segment (0 = ``GNTST_okay``).  A foreign side
        must stay within its page (``offset + length <= 4096``).

        Raises:
            LocalProtocolError: a segment with no foreign side, a length outside 1..4096,
                a local buffer shorter than ``length``, a read-only ``dest`` buffer.
            XenError: the ioctl itself failed (per-segment failures are statuses).
        """
        segs = list(segments)
        if not segs:
            return []
        if len(segs) > MAX_PAGES:
            raise LocalProtocolError(f"more than {MAX_PAGES} grant-copy segments")
        arr = ffi.new("struct gntdev_grant_copy_segment[]", len(segs))
        keep: list[Any] = []
        try:
            for i, seg in enumerate(segs):
                length = _check_int(seg.length, "segment length", 1, PAGE_SIZE)
                flags = 0
                c = arr[i]
                c.len = length
                for side, end, flag in (
                    ("source", seg.source, lib.GNTCOPY_source_gref),
                    ("dest", seg.dest, lib.GNTCOPY_dest_gref),
                ):
                    u = getattr(c, side)
                    if isinstance(end, ForeignRef):
                        check_domid(end.domid)
                        _check_int(end.ref, "grant ref", 0, _U32)
                        _check_int(end.offset, "foreign offset", 0, PAGE_SIZE - length)
                        u.foreign.ref = end.ref
                        u.foreign.offset = end.offset
                        u.foreign.domid = end.domid
                        flags |= flag
                    else:
                        try:
                            p = ffi.from_buffer(end, require_writable=(side == "dest"))
                        except (TypeError, BufferError) as exc:
                            raise LocalProtocolError(
                                f"grant-copy segment {i}: unusable {side} buffer ({exc})"
                            ) from None
                        keep.append(p)
                        if len(p) < length:
                            raise LocalProtocolError(
                                f"grant-copy segment {i}: {side} buffer of {len(p)} bytes is "
                                f"shorter than length {length}"
                            )
                        u.virt = p
                if not flags:
                    raise LocalProtocolError(
                        f"grant-copy segment {i}: neither side is a ForeignRef"
                    )
                c.flags = flags
            arg = ffi.new("struct ioctl_gntdev_grant_copy *")
            arg.count = len(segs)
            arg.segments = arr
            self._ioctl(lib.IOCTL_GNTDEV_GRANT_COPY, arg, "gntdev GRANT_COPY")
            return [int(arr[i].status) for i in range(len(segs))]
        finally:
            for p in keep:
                ffi.release(p)

    # ---- dma-buf
    def dmabuf_export_from_refs(self, domid: int, refs: Sequence[int], *, flags: int = 0) -> int:
        """Export foreign ``refs`` of ``domid`` as a dma-buf; returns its fd (yours to close).

        ``flags`` must be 0: the DMA-able variants (``GNTDEV_DMA_FLAG_WC`` and
        ``_COHERENT``) need a kernel with CONFIG_XEN_GRANT_DMA_ALLOC, and a driver
        without it silently ignores them (ordinary pages, no error), which gntipc cannot
        tell from userspace: so they are refused rather than silently not honoured.

        Raises:
            LocalProtocolError: ``flags`` is not 0 (a :class:`ValueError`), no refs, a
                ref not a u32, a domid out of range.
            XenError: ENOTTY when the kernel lacks gntdev dma-buf support; EINVAL in a PV
                domain, where the driver refuses every export (the message says so).
        """
        domid = check_domid(domid)
        refs_t = _check_refs(refs)
        _check_int(flags, "flags", 0, _U32)
        if flags & DMA_FLAGS:
            raise LocalProtocolError(
                f"dma-buf export flags {flags:#x}: GNTDEV_DMA_FLAG_WC/_COHERENT (DMA-able "
                "memory) are unavailable: they need a kernel built with "
                "CONFIG_XEN_GRANT_DMA_ALLOC, and a driver without it ignores them silently, "
                "which cannot be detected from userspace"
            )
        if flags:
            raise LocalProtocolError(f"unknown dma-buf export flags {flags:#x}")
        n = len(refs_t)
        st = "struct ioctl_gntdev_dmabuf_exp_from_refs"
        buf = ffi.new("char[]", ffi.sizeof(st) + (n - 1) * 4)
        arg = ffi.cast(st + " *", buf)
        arg.flags = flags
        arg.count = n
        arg.domid = domid
        out = _tail(arg.refs)
        for i, ref in enumerate(refs_t):
            out[i] = ref
        try:
            self._ioctl(
                lib.IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS,
                arg,
                "gntdev DMABUF_EXP_FROM_REFS",
                enotty_hint=_DMABUF_HINT,
            )
        except XenError as exc:
            if exc.errno == errno.EINVAL and guest_type() == "PV":
                raise XenError(
                    errno.EINVAL,
                    f"{exc.strerror} (dma-buf export needs an HVM or PVH domain: in a PV "
                    "domain the gntdev driver refuses every export, because it maps grants "
                    "only into user page tables)",
                ) from None
            raise
        return int(arg.fd)

    def dmabuf_export_wait_released(self, fd: int, timeout_ms: int) -> None:
        """Wait until the dma-buf ``fd`` exported here is released by its importers.

        Raises:
            XenError: ETIMEDOUT, or ENOTTY without kernel dma-buf support.
        """
        arg = ffi.new("struct ioctl_gntdev_dmabuf_exp_wait_released *")
        arg.fd = _check_int(fd, "fd", 0, _U32)
        arg.wait_to_ms = _check_int(timeout_ms, "timeout_ms", 0, _U32)
        self._ioctl(
            lib.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED,
            arg,
            "gntdev DMABUF_EXP_WAIT_RELEASED",
            enotty_hint=_DMABUF_HINT,
        )

    def dmabuf_import_to_refs(self, fd: int, domid: int, count: int) -> list[int]:
        """Grant the ``count`` pages of dma-buf ``fd`` to ``domid``; returns the refs.

        Raises:
            XenError: ENOTTY without kernel dma-buf support.
        """
        domid = check_domid(domid)
        count = _check_count(count)
        st = "struct ioctl_gntdev_dmabuf_imp_to_refs"
        buf = ffi.new("char[]", ffi.sizeof(st) + (count - 1) * 4)
        arg = ffi.cast(st + " *", buf)
        arg.fd = _check_int(fd, "fd", 0, _U32)
        arg.count = count
        arg.domid = domid
        self._ioctl(
            lib.IOCTL_GNTDEV_DMABUF_IMP_TO_REFS,
            arg,
            "gntdev DMABUF_IMP_TO_REFS",
            enotty_hint=_DMABUF_HINT,
        )
        out = _tail(arg.refs)
        return [int(out[i]) for i in range(count)]

    def dmabuf_import_release(self, fd: int) -> None:
        """End the grants made by :meth:`dmabuf_import_to_refs` for ``fd``.

        Raises:
            XenError: ENOTTY without kernel dma-buf support.
        """
        arg = ffi.new("struct ioctl_gntdev_dmabuf_imp_release *")
        arg.fd = _check_int(fd, "fd", 0, _U32)
        self._ioctl(
            lib.IOCTL_GNTDEV_DMABUF_IMP_RELEASE,
            arg,
            "gntdev DMABUF_IMP_RELEASE",
            enotty_hint=_DMABUF_HINT,
        )


# --------------------------------------------------------------------------- gntalloc
class GntallocShare(_PagesBase):
    """Pages allocated and granted to ``domid`` by :meth:`Gntalloc.share`.

    :attr:`mapping` is always writable locally (the grant itself may be read-only).
    """

    _RELEASE = (
        "ioctl_gntalloc_dealloc_gref",
        lib.IOCTL_GNTALLOC_DEALLOC_GREF,
        "gntalloc DEALLOC_GREF",
    )
    _NOTIFY = (
        "ioctl_gntalloc_unmap_notify",
        lib.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
        "gntalloc SET_UNMAP_NOTIFY",
    )

    def __init__(
        self, dev: Gntalloc, domid: int, refs: tuple[int, ...], index: int, writable: bool
    ) -> None:
        self.grant_writable = writable
        super().__init__(dev, domid, refs, index, writable=True, what="mmap of gntalloc pages")


class Gntalloc(_Device):
    """``/dev/xen/gntalloc``: allocate pages and grant them to another domain."""

    _DEVICE = "/dev/xen/gntalloc"
    _MODULE = "xen_gntalloc"

    def share(self, domid: int, count: int, *, writable: bool = True) -> GntallocShare:
        """Allocate ``count`` zeroed pages granted to ``domid`` and map them here.

        Raises:
            LocalProtocolError: count outside 1..:data:`MAX_PAGES`, domid outside 0..0x7FEF.
            ClosedResourceError: the device is closed.
            XenError: ENOSPC when the domain's gntalloc page limit is exhausted (the
                message says so), or another kernel failure.
        """
        domid = check_domid(domid)
        count = _check_count(count)
        st = "struct ioctl_gntalloc_alloc_gref"
        buf = ffi.new("char[]", ffi.sizeof(st) + (count - 1) * 4)
        arg = ffi.cast(st + " *", buf)
        arg.domid = domid
        arg.flags = lib.GNTALLOC_FLAG_WRITABLE if writable else 0
        arg.count = count
        self._ioctl(lib.IOCTL_GNTALLOC_ALLOC_GREF, arg, f"gntalloc ALLOC_GREF of {count} pages")
        out = _tail(arg.gref_ids)
        refs = tuple(int(out[i]) for i in range(count))
        return GntallocShare(self, domid, refs, int(arg.index), writable)


# ----------------------------------------------------------------------------- evtchn
class Evtchn(_Device):
    """``/dev/xen/evtchn``: event-channel ports bound to this descriptor.

    Protocol: wait until :meth:`fileno` is readable, :meth:`pending` returns the ports that
    fired (each now masked), :meth:`unmask` each, then re-check the shared state (events
    that arrive while masked coalesce).  Closing the descriptor unbinds its ports.
    """

    _DEVICE = "/dev/xen/evtchn"
    _MODULE = "xen_evtchn"
    _OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK

    def fileno(self) -> int:
        """The descriptor the event loop waits on (readable when a port fired).

        Raises:
            ClosedResourceError: closed.
        """
        return self._live_fd()

    def bind_unbound_port(self, remote_domid: int) -> int:
        """Allocate a port that ``remote_domid`` may bind to; returns our local port."""
        arg = ffi.new("struct ioctl_evtchn_bind_unbound_port *")
        arg.remote_domain = check_domid(remote_domid, allow_self=True)
        return self._ioctl(lib.IOCTL_EVTCHN_BIND_UNBOUND_PORT, arg, "evtchn BIND_UNBOUND_PORT")

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Connect to ``remote_port`` of ``remote_domid``; returns our local port."""
        arg = ffi.new("struct ioctl_evtchn_bind_interdomain *")
        arg.remote_domain = check_domid(remote_domid, allow_self=True)
        arg.remote_port = _check_port(remote_port)
        return self._ioctl(lib.IOCTL_EVTCHN_BIND_INTERDOMAIN, arg, "evtchn BIND_INTERDOMAIN")

    def bind_virq(self, virq: int) -> int:
        """Bind a virtual IRQ; returns the local port."""
        arg = ffi.new("struct ioctl_evtchn_bind_virq *")
        arg.virq = _check_int(virq, "virq", 0, _U32)
        return self._ioctl(lib.IOCTL_EVTCHN_BIND_VIRQ, arg, "evtchn BIND_VIRQ")

    def unbind(self, port: int) -> None:
        """Unbind a local port of this descriptor."""
        arg = ffi.new("struct ioctl_evtchn_unbind *", {"port": _check_port(port)})
        self._ioctl(lib.IOCTL_EVTCHN_UNBIND, arg, "evtchn UNBIND")

    def notify(self, port: int) -> None:
        """Send an event through local ``port`` to its remote end.  Never blocks."""
        self.notify_prepared(self.notify_arg(port))

    @staticmethod
    def notify_arg(port: int) -> Any:
        """The argument of :meth:`notify_prepared` for ``port``, built once."""
        return ffi.new("struct ioctl_evtchn_notify *", {"port": _check_port(port)})

    def notify_prepared(self, arg: Any) -> None:
        """:meth:`notify` with an argument from :meth:`notify_arg` (the hot path)."""
        self._ioctl(lib.IOCTL_EVTCHN_NOTIFY, arg, "evtchn NOTIFY")

    def reset(self) -> None:
        """Clear the pending-event queue and its overflow error."""
        self._ioctl(lib.IOCTL_EVTCHN_RESET, ffi.NULL, "evtchn RESET")

    def restrict_domid(self, domid: int) -> None:
        """From now on, only allow binds to ``domid`` on this descriptor (irreversible)."""
        arg = ffi.new("struct ioctl_evtchn_restrict_domid *", {"domid": check_domid(domid)})
        self._ioctl(lib.IOCTL_EVTCHN_RESTRICT_DOMID, arg, "evtchn RESTRICT_DOMID")

    def pending(self) -> list[int]:
        """The ports that fired since the last call, without blocking ([] if none).

        Each returned port stays masked until :meth:`unmask`.

        Raises:
            XenError: EFBIG when the kernel's event queue overflowed (events were lost:
                call :meth:`reset`, then re-check every ring).
            ClosedResourceError: closed.
        """
        fd = self._live_fd()
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise XenError(
                    errno.EFBIG,
                    "evtchn read: the event queue overflowed and events were lost; call "
                    "reset() and re-check all shared state",
                ) from None
            raise_errno(exc.errno or errno.EIO, "evtchn read")
            raise
        usable = len(data) - len(data) % 4
        return [p for (p,) in struct.iter_unpack("=I", data[:usable])]

    def unmask(self, port: int) -> None:
        """Let ``port`` deliver its next event (write the port to the descriptor).

        Raises:
            XenError: the port is not bound here (EINVAL), or another failure.
        """
        fd = self._live_fd()
        try:
            os.write(fd, struct.pack("=I", _check_port(port)))
        except OSError as exc:
            raise_errno(exc.errno or errno.EIO, f"evtchn unmask of port {port}")
            raise


# ---------------------------------------------------------------------------- privcmd
class EvtchnStatus(NamedTuple):
    """The answer of EVTCHNOP_status for one port."""

    status: PortState
    vcpu: int
    #: The remote domain (UNBOUND: who may bind; INTERDOMAIN: the peer), else None.
    remote_domid: int | None
    #: The remote port (INTERDOMAIN only), else None.
    remote_port: int | None
    #: The VIRQ or PIRQ number for those states, else None.
    irq: int | None


class Privcmd(_Device):
    """``/dev/xen/privcmd``: the one hypercall gntipc needs, EVTCHNOP_status."""

    _DEVICE = "/dev/xen/privcmd"
    _MODULE = "xen_privcmd"

    def __init__(self, path: str | None = None) -> None:
        self._page: Any = ffi.NULL
        super().__init__(path)
        try:
            # Hypercall arguments must not fault while Xen reads them: one locked page.
            page = lib.gnt_mmap(
                ffi.NULL,
                PAGE_SIZE,
                lib.PROT_READ | lib.PROT_WRITE,
                lib.MAP_PRIVATE | lib.MAP_ANONYMOUS,
                -1,
                0,
            )
            if page == ffi.NULL:
                check_rc(-1, "mmap of the privcmd argument page")
            self._page = page
            check_rc(lib.gnt_mlock(page, PAGE_SIZE), "mlock of the privcmd argument page")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the device and free the argument page (idempotent)."""
        page, self._page = getattr(self, "_page", ffi.NULL), ffi.NULL
        if page != ffi.NULL:
            lib.gnt_munmap(page, PAGE_SIZE)  # also unlocks
        super().close()

    def evtchn_status(self, port: int, dom: int = DOMID_SELF) -> EvtchnStatus:
        """EVTCHNOP_status of ``port`` of domain ``dom`` (default: our own).

        Raises:
            BackendUnavailable: the hypervisor refused (EPERM, e.g. in a PV domU).
            XenError: another failure (e.g. EINVAL for a port out of range).
            ClosedResourceError: closed.
        """
        self._live_fd()
        _check_port(port)
        dom = check_domid(dom, allow_self=True)
        st = ffi.cast("struct evtchn_status *", self._page)
        size = ffi.sizeof("struct evtchn_status")
        ffi.memmove(st, bytes(size), size)
        st.dom = dom
        st.port = port
        call = ffi.new("struct privcmd_hypercall *")
        call.op = _HYPERVISOR_EVENT_CHANNEL_OP
        call.arg[0] = lib.EVTCHNOP_status
        call.arg[1] = int(ffi.cast("uintptr_t", st))
        try:
            self._ioctl(lib.IOCTL_PRIVCMD_HYPERCALL, call, "privcmd hypercall EVTCHNOP_status")
        except XenError as exc:
            if exc.errno == errno.EPERM:
                raise BackendUnavailable(
                    "EVTCHNOP_status refused (EPERM): this domain may not query event "
                    "channel status (expected in a PV domU; only dom0 may)"
                ) from None
            raise
        status = PortState(int(st.status))
        remote_domid = remote_port = irq = None
        if status == PortState.UNBOUND:
            remote_domid = int(st.u.unbound.dom)
        elif status == PortState.INTERDOMAIN:
            remote_domid = int(st.u.interdomain.dom)
            remote_port = int(st.u.interdomain.port)
        elif status == PortState.VIRQ:
            irq = int(st.u.virq)
        elif status == PortState.PIRQ:
            irq = int(st.u.pirq)
        return EvtchnStatus(status, int(st.vcpu), remote_domid, remote_port, irq)
