"""The backend interface: what the vchan channel needs from a hypervisor.

A backend is four small things: grant sharing and grant mapping (:meth:`Backend.share`,
:meth:`Backend.map`, :meth:`Backend.grant_copy`), event channels
(:meth:`Backend.alloc_unbound`, :meth:`Backend.bind_interdomain` → :class:`EventPort`),
and a XenStore (:class:`Store`).  ``xen`` implements it over ``/dev/xen/*``; ``sim``
implements it with separate processes and shared memory.  Everything above this module
is written once against these classes.

Store operations are short request/response exchanges (bounded by a timeout); the only
unbounded wait, a watch, is exposed as a file descriptor so async code waits on it with
``anyio.wait_readable`` and never blocks the event loop.
"""

from __future__ import annotations

import enum
import select
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Literal

from .._domid import DOMID_MAX as DOMID_MAX
from .._mapping import Mapping
from .._resource import Closeable

#: What a local grant-copy endpoint may be (mmap objects too).
Buffer = bytes | bytearray | memoryview

__all__ = [
    "Backend",
    "CopySegment",
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


class Backend(Closeable):
    """A hypervisor: grants, event channels and a store, as seen by one process."""

    #: ``"xen"`` or ``"sim"``.
    name: ClassVar[str]
    #: The domain this process belongs to.
    domid: int
    #: The XenStore connection.
    store: Store

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
