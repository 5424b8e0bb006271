"""The backend interface: what the vchan channel needs from a hypervisor.

A backend is four small things: grant sharing and grant mapping (:meth:`Backend.share`,
:meth:`Backend.map`, :meth:`Backend.grant_copy`), event channels
(:meth:`Backend.alloc_unbound`, :meth:`Backend.bind_interdomain` → :class:`EventPort`),
and a XenStore (:class:`Store`).  ``xen`` implements it over ``/dev/xen/*``; ``sim``
implements it with separate processes and shared memory.  Everything above this module
is written once against these classes.  Beside them, a backend shares grants with
dma-buf (:meth:`Backend.dmabuf_import` → :class:`DmabufImport`,
:meth:`Backend.dmabuf_export` → :class:`DmabufExport`), which the channel does not use.

Store operations are short request/response exchanges (bounded by a timeout); the only
unbounded wait, a watch, is exposed as a file descriptor so async code waits on it with
``anyio.wait_readable`` and never blocks the event loop.
"""

from __future__ import annotations

import enum
import math
import os
import select
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Literal

import anyio.to_thread
from anyio import ClosedResourceError

from .._mapping import PAGE_SIZE, Mapping
from .._resource import Closeable

#: What a local grant-copy endpoint may be (mmap objects too).
Buffer = bytes | bytearray | memoryview

__all__ = [
    "Backend",
    "CopySegment",
    "DmabufExport",
    "DmabufImport",
    "EventPort",
    "ForeignRef",
    "Pages",
    "Perm",
    "PortState",
    "Store",
    "Transaction",
    "Watch",
]


class Pages(Closeable):
    """Pages shared with a domain (by :meth:`Backend.share`) or mapped from one (by
    :meth:`Backend.map`), contiguous in :attr:`mapping`.

    ``close()`` unmaps them (firing the unmap notification, if set) and, for shared
    pages, ends the grants.
    """

    #: The other domain: the grantee of shared pages, the granter of mapped ones.
    domid: int
    #: Grant references, one per page, in mapping order.
    refs: tuple[int, ...]
    #: The local mapping (writable for shared pages; as requested for mapped ones).
    mapping: Mapping

    @abstractmethod
    def set_unmap_notify(
        self, offset: int, *, clear_byte: bool = True, port: EventPort | None = None
    ) -> None:
        """When these pages are unmapped here, or this process dies (even by SIGKILL),
        set the byte at ``offset`` (from the start of the mapping) to 0 if ``clear_byte``,
        then send an event on ``port`` if given.  One notification per :class:`Pages`;
        a later call replaces it.

        Raises:
            LocalProtocolError: ``offset`` is outside the mapping, or ``clear_byte`` on a
                read-only mapping.
        """


@dataclass(frozen=True, slots=True)
class ForeignRef:
    """A byte offset in a page granted by another domain (a grant-copy endpoint)."""

    domid: int
    ref: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class CopySegment:
    """One grant-copy segment: ``length`` bytes from ``source`` to ``dest``.

    One side is a :class:`ForeignRef`, the other a local buffer (writable for ``dest``).
    A segment must not cross a page boundary of the foreign side.
    """

    source: ForeignRef | Buffer
    dest: ForeignRef | Buffer
    length: int


class PortState(enum.IntEnum):
    """EVTCHNOP_status answers (``EVTCHNSTAT_*``)."""

    CLOSED = 0
    UNBOUND = 1
    INTERDOMAIN = 2
    PIRQ = 3
    VIRQ = 4
    IPI = 5


class EventPort(Closeable):
    """One event-channel port with its own file descriptor.

    Xen semantics: an event masks the port until :meth:`unmask`; events sent while it is
    masked coalesce into one.  The wait protocol is: wait until :meth:`fileno` is
    readable, call :meth:`pending`, call :meth:`unmask`, then re-check the shared state.
    """

    #: Our local port number.
    port: int
    #: The domain at the other end.
    remote_domid: int

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` was called."""

    @abstractmethod
    def fileno(self) -> int:
        """A descriptor that becomes readable when an event is pending."""

    def add_to(self, epoll: select.epoll) -> None:
        """Register this port's wake-up descriptors in ``epoll`` (level-triggered,
        readable), so that a caller waiting on many things nests no deeper than needed.
        The default registers :meth:`fileno`; a backend whose port is itself a set of
        descriptors registers them directly."""
        epoll.register(self.fileno(), select.EPOLLIN)

    def remove_from(self, epoll: select.epoll) -> None:
        """Undo :meth:`add_to` (before ``epoll`` or this port is closed)."""
        epoll.unregister(self.fileno())

    @abstractmethod
    def notify(self) -> None:
        """Send an event to the other end.  Never blocks.

        Raises:
            XenError: the port is not connected (e.g. the other end is gone).
        """

    @abstractmethod
    def pending(self) -> bool:
        """Consume pending events without blocking; True if at least one arrived.

        The port stays masked until :meth:`unmask`.
        """

    @abstractmethod
    def unmask(self) -> None:
        """Allow the next event to be delivered."""

    @abstractmethod
    def status(self) -> PortState:
        """Ask the hypervisor for this port's state (EVTCHNOP_status).

        ``UNBOUND`` or ``CLOSED`` after the remote domain died or closed its end.

        Raises:
            BackendUnavailable: this domain may not ask (EPERM in a PV domU).
        """


@dataclass(frozen=True, slots=True)
class Perm:
    """One XenStore permission entry; the first of a list names the owner and the
    access of every domain not listed."""

    domid: int
    access: Literal["n", "r", "w", "b"]

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        access, domid = text[0], int(text[1:])
        if access not in "nrwb":
            raise ValueError(f"bad XenStore permission {text!r}")
        return cls(domid, access)  # type: ignore[arg-type]


class _StoreOps(ABC):
    """The XenStore operations, inside or outside a transaction."""

    @abstractmethod
    def read(self, path: str) -> bytes:
        """The value of ``path``.  Raises XenError(ENOENT) if absent, EACCES if denied."""

    @abstractmethod
    def write(self, path: str, value: bytes) -> None:
        """Create or replace ``path`` (and missing parents, owned like the new node)."""

    @abstractmethod
    def rm(self, path: str) -> None:
        """Remove ``path`` and everything below it.  Absent is not an error."""

    @abstractmethod
    def directory(self, path: str) -> list[str]:
        """The names of the children of ``path``."""

    @abstractmethod
    def get_perms(self, path: str) -> list[Perm]:
        """The permission list of ``path`` (owner first)."""

    @abstractmethod
    def set_perms(self, path: str, perms: Sequence[Perm]) -> None:
        """Replace the permission list of ``path``."""

    def exists(self, path: str) -> bool:
        """True if ``path`` exists and is readable."""
        import errno

        from .._exceptions import XenError

        try:
            self.read(path)
        except XenError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                return False
            raise
        return True


class Transaction(_StoreOps, Closeable):
    """A XenStore transaction: a consistent snapshot, committed all or nothing.

    Used as a context manager it commits on a clean exit and aborts on an exception.
    """

    @abstractmethod
    def commit(self) -> None:
        """Commit.  Raises XenError(EAGAIN) when another writer conflicted: retry."""

    @abstractmethod
    def abort(self) -> None:
        """Discard the transaction (idempotent)."""

    def close(self) -> None:
        self.abort()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Watch(Closeable):
    """A XenStore watch on a path (and everything below it).

    Like XenStore, it fires once right after it is set, then on every change.
    """

    @abstractmethod
    def fileno(self) -> int:
        """Readable when events are queued."""

    @abstractmethod
    def read_events(self) -> list[tuple[str, str]]:
        """Queued ``(path, token)`` events, without blocking (maybe an empty list)."""


class Store(_StoreOps, Closeable):
    """A connection to the XenStore of this domain.

    Thread safety: the async API calls a store from worker threads (its operations
    block: :mod:`gntipc._astore`), several at once and beside the caller's own threads,
    so every operation must be safe to call concurrently, and :meth:`close` must make an
    operation blocked in another thread end promptly (it may raise
    :class:`anyio.ClosedResourceError`) rather than leave it on a closed descriptor.
    A :class:`Watch` is used from one thread at a time.
    """

    #: Our own domain id.
    domid: int

    @abstractmethod
    def transaction(self) -> Transaction:
        """Start a transaction."""

    @abstractmethod
    def watch(self, path: str, token: str = "") -> Watch:
        """Watch ``path`` (``@releaseDomain`` and ``@introduceDomain`` allowed)."""


class DmabufExport(Closeable):
    """Pages another domain granted us, exported as one dma-buf (by
    :meth:`Backend.dmabuf_export`).

    :meth:`fileno` is the dma-buf: hand it to another process (``socket.send_fds``) or
    to a driver.  The buffer lives while any descriptor or mapping of it does, in any
    process; :meth:`wait_released` waits until they are all gone, after which the grants
    are unmapped here.  ``close()`` drops our descriptor without waiting (idempotent);
    holders elsewhere keep the buffer alive.

    Thread safety: :meth:`wait_released` may run in a worker thread while another thread
    calls :meth:`close`, which makes the wait end within :data:`WAIT_SLICE` seconds.
    """

    #: The granting domain.
    domid: int
    #: The exported grant refs, in buffer order.
    refs: tuple[int, ...]
    #: The longest (seconds) one blocking step of a wait lasts: how late a wait notices
    #: :meth:`close` or a cancellation (the Xen ioctl cannot be interrupted).
    WAIT_SLICE: ClassVar[float] = 0.25

    def __init__(self, domid: int, refs: tuple[int, ...], fd: int) -> None:
        self.domid = domid
        self.refs = refs
        self._fd = fd
        self._closed = False
        # Held by every wait step and by close, so that close never frees a descriptor
        # that a step in another thread is about to use.
        self._io_lock = threading.Lock()

    @property
    def size(self) -> int:
        """The buffer's size in bytes (one page per ref)."""
        return len(self.refs) * PAGE_SIZE

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def fileno(self) -> int:
        """Our descriptor of the dma-buf (still ours: duplicate it to keep a copy).

        Raises:
            ClosedResourceError: closed, or dropped by :meth:`wait_released`.
        """
        fd = self._fd
        if fd < 0 or self._closed:
            raise ClosedResourceError("the dma-buf descriptor is closed (or was dropped)")
        return fd

    def wait_released(self, timeout: float) -> bool:
        """Drop our own descriptor (the buffer cannot be released while we hold it),
        then wait at most ``timeout`` seconds until every other descriptor and mapping
        of the buffer is gone.

        Returns:
            True once released; False if the timeout expired first (the buffer stays
            exported: wait again, or :meth:`close`).

        Raises:
            ValueError: ``timeout`` is negative or NaN.
            ClosedResourceError: closed before or during the wait.
        """
        return self._wait(timeout, None)

    async def wait_released_async(self, timeout: float) -> bool:
        """:meth:`wait_released` in a worker thread, without blocking the event loop.

        Cancellation: the call returns at once; the worker notices within
        :data:`WAIT_SLICE` seconds and stops (the buffer stays exported, our descriptor
        dropped).
        """
        stop = threading.Event()
        try:
            return await anyio.to_thread.run_sync(self._wait, timeout, stop, abandon_on_cancel=True)
        finally:
            stop.set()

    def _wait(self, timeout: float, stop: threading.Event | None) -> bool:
        if math.isnan(timeout) or timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, not {timeout!r}")
        deadline = time.monotonic() + timeout
        self._drop_fd()
        while True:
            with self._io_lock:
                if self._closed:
                    raise ClosedResourceError("the dma-buf export was closed")
                left = deadline - time.monotonic()
                if self._released_within(min(max(left, 0.0), self.WAIT_SLICE)):
                    return True
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return False

    @abstractmethod
    def _released_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` (called with the I/O lock held, our fd dropped); True
        once the buffer is released."""

    def _drop_fd(self) -> None:
        with self._io_lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    def _close_resources(self) -> None:
        """Free what the backend holds for the export (called once, by close)."""

    def close(self) -> None:
        """Drop our descriptor and stop tracking the buffer, without waiting for its
        release (idempotent).  A :meth:`wait_released` in another thread ends with
        :class:`~anyio.ClosedResourceError`."""
        if self._closed:
            return
        self._closed = True
        self._drop_fd()
        with self._io_lock:
            self._close_resources()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {len(self.refs)} pages of domain {self.domid} {state}>"


class DmabufImport(Closeable):
    """A dma-buf's pages granted to another domain (by :meth:`Backend.dmabuf_import`).

    The grants are ours (the granting domain is this backend's); the grantee maps them
    with :meth:`Backend.map`.  ``close()`` ends the grants (idempotent): a grantee that
    mapped them keeps its mapping, new maps fail.  If this process dies the grants end
    as well.  The dma-buf descriptor given to the import may be closed at once: the
    import holds its own reference to the buffer.
    """

    #: The grantee.
    domid: int
    #: The grant refs, one per page of the buffer, in order.
    refs: tuple[int, ...]

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` was called."""


def check_import_args(fd: object, count: object) -> None:
    """The checks every :meth:`Backend.dmabuf_import` makes of ``fd`` and ``count``.

    Raises:
        ValueError: ``fd`` is not an int >= 0, or ``count`` not an int >= 1.
    """
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise ValueError(f"fd must be a file descriptor (an int >= 0), not {fd!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, not {count!r}")


class Backend(Closeable):
    """A hypervisor: grants, event channels and a store, as seen by one process."""

    #: ``"xen"`` or ``"sim"``.
    name: ClassVar[str]
    #: The domain this process belongs to.
    domid: int
    #: The XenStore connection.
    store: Store

    @property
    def page_limit(self) -> int | None:
        """How many pages this domain may share at once (gntalloc's limit), or None if
        it is not known.  A listener that expects many clients sizes their rings to it
        (``max_clients`` of :func:`gntipc.listen`)."""
        return None

    @abstractmethod
    def share(self, domid: int, count: int, *, writable: bool = True) -> Pages:
        """Grant ``count`` fresh zeroed pages to ``domid`` (read-only for it unless
        ``writable``); our own mapping is always writable.

        Raises:
            ValueError: ``count`` < 1 or ``domid`` out of range.
            XenError: ENOSPC when the domain's gntalloc page limit is reached.
        """

    @abstractmethod
    def map(self, domid: int, refs: Sequence[int], *, writable: bool = True) -> Pages:
        """Map the pages ``refs`` granted by ``domid``, contiguously, in order.

        Raises:
            ValueError: no refs, or ``domid`` out of range.
            XenError: a ref is not granted to us (or not writable when ``writable``).
        """

    @abstractmethod
    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy between local buffers and foreign grants; one GNTST_* status per segment
        (0 = okay).  Raises XenError only when the whole call fails."""

    @abstractmethod
    def alloc_unbound(self, remote_domid: int) -> EventPort:
        """A fresh port that ``remote_domid`` may bind to."""

    @abstractmethod
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> EventPort:
        """Bind to ``remote_port`` of ``remote_domid`` (which allocated it unbound for us).

        Raises:
            XenError: the port is not unbound for us (EINVAL), or the domain is gone.
        """

    @abstractmethod
    def dmabuf_export(self, domid: int, refs: Sequence[int]) -> DmabufExport:
        """Map the pages ``refs`` that ``domid`` granted us (writable) and export them as
        one dma-buf, in order.

        Raises:
            ValueError: no refs, or ``domid`` out of range.
            XenError: ENOTTY when the driver has no dma-buf support (the message names
                the kernel option and the module); EINVAL when the domain cannot export
                (the message says why: on Xen, a PV domain); another errno when a ref is
                not granted to us writable.
            ClosedResourceError: the backend is closed.
        """

    @abstractmethod
    def dmabuf_import(self, fd: int, domid: int, count: int) -> DmabufImport:
        """Grant the ``count`` pages of the dma-buf ``fd`` to ``domid``.

        Raises:
            ValueError: ``count`` < 1, ``fd`` < 0, or ``domid`` out of range.
            XenError: EINVAL when ``fd`` is not a dma-buf or its size is not ``count``
                pages; EBADF for a closed ``fd``; ENOTTY without dma-buf support (the
                message says what is missing); ENOSPC at the grant limit.
            ClosedResourceError: the backend is closed.
        """
