"""The ``xen`` backend: real grants, event channels and XenStore of a Xen domain.

Over the device wrappers of :mod:`gntipc.devices` (``/dev/xen/gntalloc`` to share pages,
``/dev/xen/gntdev`` to map and grant-copy, ``/dev/xen/evtchn`` for event channels,
``/dev/xen/privcmd`` for EVTCHNOP_status) and the XenStore client of
:mod:`gntipc.backends.xen._xenstore`.

As libxenvchan does, every :class:`EventPort` has its own ``/dev/xen/evtchn`` handle, so
its :meth:`~EventPort.fileno` becomes readable only for its own events.

Fork: a child process must not keep this process's grants and ports alive, or a crash
of the parent would go unnoticed (on real Xen, a map's unmap event is sent only when the
last reference to the gntdev file goes, a gntalloc page's notification only when its last
mapping goes, and a port stays bound while any process holds its evtchn descriptor).  So
every mapping is ``MADV_DONTFORK`` (not present in a child) and, in a forked child, every
backend, port and pages object of the parent is closed at once (using one there raises
``ClosedResourceError``).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import ClassVar

from anyio import ClosedResourceError

from ..._domid import check_domid
from ..._exceptions import BackendUnavailable, LocalProtocolError, XenError
from ..._mapping import Mapping
from ..._process import drop_in_forked_child
from .._abc import (
    Backend,
    CopySegment,
    DmabufExport,
    DmabufImport,
    EventPort,
    Pages,
    PortState,
    Store,
    check_import_args,
)
from ._devices import Evtchn, Gntalloc, GntallocShare, Gntdev, GntdevMap, Privcmd
from ._xenstore import XenStore

__all__ = ["XenBackend"]

#: The devices every xen backend needs (privcmd is needed only for :meth:`status`).
REQUIRED_DEVICES = ("/dev/xen/gntdev", "/dev/xen/gntalloc", "/dev/xen/evtchn")
#: gntalloc's page limit for the whole domain (``modprobe xen-gntalloc limit=N``).
GNTALLOC_LIMIT = "/sys/module/xen_gntalloc/parameters/limit"


# What a forked child drops (see the module docstring), in stages: devices first, so that
# closing pages then only unmaps (their release ioctls see the closed device and leave
# the grants to the parent).
_DROP_BACKENDS, _DROP_PORTS, _DROP_PAGES = 0, 1, 2


class _XenPages(Pages):
    """Shared (gntalloc) or mapped (gntdev) pages."""

    def __init__(self, inner: GntdevMap | GntallocShare, domid: int) -> None:
        self._inner: GntdevMap | GntallocShare | None = inner
        self.domid = domid
        self.refs = tuple(inner.refs)
        self.mapping: Mapping = inner.mapping
        with contextlib.suppress(OSError, ValueError):
            inner.mapping.mmap.madvise(mmap.MADV_DONTFORK)
        drop_in_forked_child(self, _XenPages._drop_in_child, stage=_DROP_PAGES)

    def _drop_in_child(self) -> None:
        inner = self._inner
        if inner is not None:
            self._inner = None
            # The memory is not mapped in the child (MADV_DONTFORK): just forget it.
            dev = inner._dev
            dev.close()  # the child's copy of the parent's descriptor, if still open
            with contextlib.suppress(Exception):
                inner.close()

    def set_unmap_notify(
        self, offset: int, *, clear_byte: bool = True, port: EventPort | None = None
    ) -> None:
        """See :meth:`Pages.set_unmap_notify`.

        Raises:
            LocalProtocolError: ``offset`` outside the mapping, or ``clear_byte`` on a
                read-only mapping.
            ClosedResourceError: the pages are closed.
            XenError: the driver refused (e.g. ``port`` is not bound here).
        """
        inner = self._inner
        if inner is None:
            raise ClosedResourceError("the pages are closed")
        self.mapping.check_unmap_notify(offset, clear_byte=clear_byte)
        port_number: int | None = None
        if port is not None:
            if not isinstance(port, _XenPort):
                raise LocalProtocolError(f"{port!r} is not an event port of the xen backend")
            port_number = port.port
        inner.set_unmap_notify(offset, clear_byte=clear_byte, port=port_number)

    def close(self) -> None:
        """Unmap (firing the notification) and, for shared pages, end the grants."""
        inner = self._inner
        if inner is not None:
            inner.close()
            self._inner = None

    def __repr__(self) -> str:
        state = "closed" if self._inner is None else f"{len(self.refs)} pages"
        return f"<{type(self).__name__} domid={self.domid} {state}>"


class _XenPort(EventPort):
    """One port on its own ``/dev/xen/evtchn`` handle."""

    def __init__(self, backend: XenBackend, evtchn: Evtchn, port: int, remote_domid: int) -> None:
        self._backend = backend
        self._evtchn: Evtchn | None = evtchn
        self.port = port
        self.remote_domid = remote_domid
        # The NOTIFY ioctl's argument, built once (notify is the hot path).
        self._notify_arg = evtchn.notify_arg(port)
        drop_in_forked_child(self, _XenPort.close, stage=_DROP_PORTS)

    def _live(self) -> Evtchn:
        ev = self._evtchn
        if ev is None:
            raise ClosedResourceError(f"event port {self.port} is closed")
        return ev

    def fileno(self) -> int:
        """Readable when an event is pending on this port."""
        return self._live().fileno()

    def notify(self) -> None:
        """Send an event to the other end (never blocks): one ioctl.

        Raises:
            XenError: the port is not connected.
        """
        self._live().notify_prepared(self._notify_arg)

    def pending(self) -> bool:
        """Consume pending events without blocking; True if one arrived."""
        return bool(self._live().pending())

    def unmask(self) -> None:
        """Allow the next event to be delivered."""
        self._live().unmask(self.port)

    def status(self) -> PortState:
        """EVTCHNOP_status of this port, through ``/dev/xen/privcmd``.

        Raises:
            BackendUnavailable: privcmd is missing or the hypercall is refused (EPERM, as
                in a PV domU).
        """
        self._live()
        return PortState(self._backend._evtchn_status(self.port))

    def close(self) -> None:
        """Unbind the port and close its handle (idempotent)."""
        ev = self._evtchn
        if ev is not None:
            self._evtchn = None
            ev.close()  # closing the handle unbinds its ports

    @property
    def closed(self) -> bool:
        return self._evtchn is None

    def __del__(self) -> None:
        if getattr(self, "_evtchn", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._evtchn is None else "open"
        return f"<{type(self).__name__} port={self.port} remote={self.remote_domid} {state}>"


@contextlib.contextmanager
def _closed_on_error(gntdev: Gntdev) -> Iterator[None]:
    """Close the handle if the block fails (a dma-buf object takes it over otherwise)."""
    try:
        yield
    except BaseException:
        gntdev.close()
        raise


class _XenDmabufExport(DmabufExport):
    """A dma-buf exported through a gntdev handle of its own: the driver finds an export
    by the number its fd had, so with one export per handle a later buffer that reuses
    the number can never be mistaken for ours."""

    def __init__(self, gntdev: Gntdev, fd: int, domid: int, refs: tuple[int, ...]) -> None:
        super().__init__(domid, refs, fd)
        self._gntdev = gntdev
        self._fd_number = fd
        drop_in_forked_child(self, _XenDmabufExport._drop_in_child, stage=_DROP_PAGES)

    def _drop_in_child(self) -> None:
        # Only the child's copies go: the buffer and the handle stay the parent's.
        self._closed = True
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        self._gntdev.close()

    def _released_within(self, seconds: float) -> bool:
        try:
            self._gntdev.dmabuf_export_wait_released(self._fd_number, round(seconds * 1000))
        except XenError as exc:
            if exc.errno == errno.ETIMEDOUT:
                return False
            if exc.errno == errno.ENOENT:
                return True  # released (and forgotten by the driver) before this step
            raise
        return True

    def _close_resources(self) -> None:
        # The driver keeps the handle's file open while the buffer lives.
        self._gntdev.close()


class _XenDmabufImport(DmabufImport):
    """A dma-buf imported through a gntdev handle of its own (the driver finds an import
    by its fd number: one import per handle keeps the number unambiguous, and closing
    the handle releases the import even if the release ioctl failed)."""

    def __init__(self, gntdev: Gntdev, fd: int, domid: int, refs: tuple[int, ...]) -> None:
        self._gntdev: Gntdev | None = gntdev
        self._fd_number = fd
        self.domid = domid
        self.refs = refs
        drop_in_forked_child(self, _XenDmabufImport._drop_in_child, stage=_DROP_PAGES)

    def _drop_in_child(self) -> None:
        gntdev, self._gntdev = self._gntdev, None
        if gntdev is not None:
            gntdev.close()  # the child's copy only: no release ioctl on the parent's file

    @property
    def closed(self) -> bool:
        return self._gntdev is None

    def close(self) -> None:
        """End the grants (DMABUF_IMP_RELEASE) and drop the buffer; idempotent.

        Raises:
            XenError: the driver refused the release (the handle is closed anyway, which
                releases the import too).
        """
        gntdev, self._gntdev = self._gntdev, None
        if gntdev is not None:
            try:
                gntdev.dmabuf_import_release(self._fd_number)
            finally:
                gntdev.close()

    def __del__(self) -> None:
        if getattr(self, "_gntdev", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._gntdev is None else f"{len(self.refs)} pages"
        return f"<{type(self).__name__} granted to domain {self.domid} {state}>"


class XenBackend(Backend):
    """The real Xen devices and XenStore of this domain.

    Args:
        store: a XenStore connection to use (default: a new :class:`XenStore`, closed with
            the backend; a given one is left open).

    Raises:
        BackendUnavailable: a ``/dev/xen`` device is missing (the message names it) or
            XenStore cannot be reached.
    """

    name: ClassVar[str] = "xen"

    def __init__(self, *, store: Store | None = None) -> None:
        missing = [dev for dev in REQUIRED_DEVICES if not os.path.exists(dev)]
        if missing:
            raise BackendUnavailable(
                f"the xen backend needs {', '.join(missing)}"
                " (not a Xen domain, or the xen-gntdev/xen-gntalloc/xen-evtchn modules are"
                " not loaded)"
            )
        self._lock = threading.Lock()
        self._privcmd: Privcmd | None = None
        self._gntdev: Gntdev | None = None
        self._gntalloc: Gntalloc | None = None
        self._own_store = store is None
        self._closed = False
        try:
            self._gntdev = Gntdev()
            self._gntalloc = Gntalloc()
            if store is None:
                store = XenStore()
        except BaseException:
            self._close_devices()
            raise
        self.store = store
        self.domid = store.domid
        drop_in_forked_child(self, XenBackend.close, stage=_DROP_BACKENDS)

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("the xen backend is closed")

    def _devs(self) -> tuple[Gntdev, Gntalloc]:
        gntdev, gntalloc = self._gntdev, self._gntalloc
        if self._closed or gntdev is None or gntalloc is None:
            raise ClosedResourceError("the xen backend is closed")
        return gntdev, gntalloc

    @property
    def page_limit(self) -> int | None:
        """gntalloc's page limit (its module parameter ``limit``, shared by every
        process of this domain), or None if ``/sys`` does not show it."""
        try:
            with open(GNTALLOC_LIMIT, "rb") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def share(self, domid: int, count: int, *, writable: bool = True) -> Pages:
        """Grant ``count`` zeroed pages to ``domid`` (see :meth:`Backend.share`).

        Raises:
            ValueError: ``count`` < 1 or ``domid`` out of range.
            XenError: ENOSPC at the gntalloc page limit.
        """
        _, gntalloc = self._devs()
        check_domid(domid)
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, not {count!r}")
        return _XenPages(gntalloc.share(domid, count, writable=writable), domid)

    def map(self, domid: int, refs: Sequence[int], *, writable: bool = True) -> Pages:
        """Map ``refs`` granted by ``domid`` contiguously (see :meth:`Backend.map`).

        Raises:
            ValueError: no refs, or ``domid`` out of range.
            XenError: a ref is not granted to us (or not writable when ``writable``).
        """
        gntdev, _ = self._devs()
        check_domid(domid)
        refs = tuple(refs)
        if not refs:
            raise ValueError("map needs at least one grant ref")
        return _XenPages(gntdev.map_refs(domid, refs, writable=writable), domid)

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy between local buffers and foreign grants (GNTDEV_GRANT_COPY).

        Raises:
            XenError: the whole call failed.
        """
        gntdev, _ = self._devs()
        return gntdev.grant_copy(segments)

    def dmabuf_export(self, domid: int, refs: Sequence[int]) -> DmabufExport:
        """Export ``refs`` granted by ``domid`` as a dma-buf (DMABUF_EXP_FROM_REFS; see
        :meth:`Backend.dmabuf_export`).

        Raises:
            ValueError: no refs, or ``domid`` out of range.
            XenError: ENOTTY without CONFIG_XEN_GNTDEV_DMABUF (the message says how to
                get a module with it); EINVAL in a PV domain (the driver exports only
                from HVM/PVH domains; the message says so).
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_domid(domid)
        refs = tuple(refs)
        if not refs:
            raise ValueError("dma-buf export needs at least one grant ref")
        gntdev = Gntdev()
        with _closed_on_error(gntdev):
            fd = gntdev.dmabuf_export_from_refs(domid, refs)
        return _XenDmabufExport(gntdev, fd, domid, refs)

    def dmabuf_import(self, fd: int, domid: int, count: int) -> DmabufImport:
        """Grant the ``count`` pages of dma-buf ``fd`` to ``domid`` (DMABUF_IMP_TO_REFS;
        see :meth:`Backend.dmabuf_import`).

        Raises:
            ValueError: ``count`` < 1, ``fd`` < 0, or ``domid`` out of range.
            XenError: EINVAL (not a dma-buf, or not ``count`` pages), EBADF, or ENOTTY
                without CONFIG_XEN_GNTDEV_DMABUF (the message says how to get it).
            ClosedResourceError: the backend is closed.
        """
        self._check()
        check_domid(domid)
        check_import_args(fd, count)
        gntdev = Gntdev()
        with _closed_on_error(gntdev):
            refs = tuple(gntdev.dmabuf_import_to_refs(fd, domid, count))
        return _XenDmabufImport(gntdev, fd, domid, refs)

    def alloc_unbound(self, remote_domid: int) -> EventPort:
        """A fresh port on its own evtchn handle that ``remote_domid`` may bind to."""
        check_domid(remote_domid)
        self._check()
        evtchn = Evtchn()
        try:
            port = evtchn.bind_unbound_port(remote_domid)
        except BaseException:
            evtchn.close()
            raise
        return _XenPort(self, evtchn, port, remote_domid)

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> EventPort:
        """Bind to ``remote_port`` of ``remote_domid``.

        Raises:
            XenError: EINVAL when the port is not unbound for us, ESRCH/EINVAL when the
                domain is gone.
        """
        if not isinstance(remote_port, int) or remote_port <= 0:
            raise ValueError(f"bad event-channel port {remote_port!r}")
        check_domid(remote_domid)
        self._check()
        evtchn = Evtchn()
        try:
            port = evtchn.bind_interdomain(remote_domid, remote_port)
        except BaseException:
            evtchn.close()
            raise
        return _XenPort(self, evtchn, port, remote_domid)

    def _evtchn_status(self, port: int) -> int:
        with self._lock:
            self._check()
            if self._privcmd is None:
                self._privcmd = Privcmd()
            privcmd = self._privcmd
        try:
            return int(privcmd.evtchn_status(port).status)
        except XenError as exc:  # devices already maps EPERM; keep the rule here too
            if exc.errno == errno.EPERM:
                raise BackendUnavailable(
                    "EVTCHNOP_status is refused in this domain (EPERM; a PV domU may not ask)"
                ) from exc
            raise

    def _close_devices(self) -> None:
        for name in ("_privcmd", "_gntdev", "_gntalloc"):
            dev = getattr(self, name, None)
            if dev is not None:
                setattr(self, name, None)
                dev.close()

    def close(self) -> None:
        """Close the device handles (and the store if we opened it); idempotent.

        Pages and ports opened through the backend stay usable until closed themselves.
        """
        if self._closed:
            return
        self._closed = True
        self._close_devices()
        if self._own_store:
            self.store.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"<XenBackend domid={getattr(self, 'domid', '?')}>"
