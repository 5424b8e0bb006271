"""A VM by its identity, whatever its domid: :func:`listen_vm` serves one VM across its
save/restore, migration and reboots.

A domid names a domain only for its lifetime: ``xl save`` + ``xl restore``, a live
migration or a reboot gives the same VM a new one.  What stays is the identity the
toolstack writes in XenStore, ``/local/domain/<domid>/vm = /vm/<uuid>``:
:func:`domain_of_vm` finds the domain that is a VM now, and a :class:`VmListener`
offers its path to whichever domain that is, following the VM when it comes back
under another domid (store watches on ``@introduceDomain`` and ``@releaseDomain``)::

    async with await gntipc.listen_vm(uuid, "data/sensor") as listener:
        async with await listener.accept() as stream:   # the VM, under its domid of now
            ...

With :class:`gntipc.ResumableListener` over it, a session survives the VM's restore:
the client, restored under a new domid, connects again and the session resumes::

    async with gntipc.ResumableListener(await gntipc.listen_vm(uuid, path)) as server:
        ...

On real Xen (PV guests, Linux 6.1 drivers) a VM must not hold grant mappings when it is
saved: with :func:`listen_vm` in dom0 the VM is the vchan client and maps dom0's ring
pages, so it must close its channels before ``xl save`` (else its process aborts, and
its kernel may oops in gntdev); a VM that may be saved unannounced should rather be the
server (see ``tools/xen-vm/selftest/save-restore/README.md``).  The simulator models the
restore itself, not that driver limitation.

Reading another domain's ``/local/domain/<domid>/vm`` needs the right to: dom0 has it
(the toolstack's domain, where such servers run); an unprivileged domain usually does
not, and then sees no VM at all (:func:`vm_of_domain` returns None).
"""

from __future__ import annotations

import contextlib
import select
from types import TracebackType

import anyio
from anyio import ClosedResourceError
from anyio.abc import AsyncResource

from . import _astore
from ._domid import check_domid
from ._exceptions import XenError, XenStoreTimeout
from .backends import Backend
from .backends._abc import Store, Watch
from .protocol import DEFAULT_RING_SIZE, check_ring_size
from .streams import Listener, VchanStream, _open_backend, _SharedBackend

__all__ = ["VmListener", "domain_of_vm", "listen_vm", "vm_of_domain"]

#: The store's special paths that fire when a domain appears and when one is gone.
_DOMAIN_EVENTS = ("@introduceDomain", "@releaseDomain")


def _uuid(vm: str) -> str:
    """``vm`` (a UUID, or the store's ``/vm/<uuid>``) as a lower-case UUID string.

    Raises:
        ValueError: not a VM identity.
    """
    if not isinstance(vm, str):
        raise TypeError(f"vm must be a str (a VM's UUID), not {type(vm).__name__}")
    text = vm.removeprefix("/vm/").strip().lower()
    if not text or "/" in text or len(text) > 64 or not text.isprintable():
        raise ValueError(f"not a VM identity (a UUID, or /vm/<uuid>): {vm!r}")
    return text


def vm_of_domain(store: Store, domid: int) -> str | None:
    """The UUID of the VM that domain ``domid`` is (its ``/local/domain/<domid>/vm``
    node), or None: no such domain, no ``vm`` node, or not readable by us.  Blocking
    (one store read).

    Raises:
        gntipc.XenStoreTimeout: the store did not answer.
    """
    check_domid(domid)
    try:
        value = store.read(f"/local/domain/{domid}/vm")
    except XenError:
        return None
    try:
        return _uuid(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def domain_of_vm(store: Store, vm: str, prefer: int | None = None) -> int | None:
    """The domid of VM ``vm`` now (a UUID or ``/vm/<uuid>``), or None if no domain we can
    see is that VM.  While a migration runs, two domains may be the VM: ``prefer`` if it is
    one of them, else the newest (highest domid).  Blocking (a store directory and one
    read per domain).

    Raises:
        ValueError: ``vm`` is not a VM identity.
        gntipc.XenStoreTimeout: the store did not answer.
    """
    uuid = _uuid(vm)
    try:
        names = store.directory("/local/domain")
    except XenError:
        return None
    found = []
    for name in names:
        if not name.isdigit() or int(name) > 0x7FEF:
            continue
        if vm_of_domain(store, int(name)) == uuid:
            found.append(int(name))
    if not found:
        return None
    return prefer if prefer in found else max(found)


class VmListener(AsyncResource):
    """Accepts clients of one VM at one path, under whatever domid the VM has now.

    Each :meth:`accept` finds the VM's domain (waiting, on store watches, while there is
    none), offers the path to it as a :class:`gntipc.Listener` does, and, should the VM
    leave that domain meanwhile (restored or migrated under a new domid, rebooted),
    withdraws the offer and offers the path to the new domain.  Accepted streams are the
    caller's to close; a stream of the VM's old domain breaks with the domain, as any.

    Made by :func:`listen_vm`; an async context manager.  Concurrent :meth:`accept` calls
    are served one after the other.

    Attributes:
        vm: the VM's UUID.
        path: the path, as given.
        domid: the VM's domain when last seen (None before the first :meth:`accept`, or
            while the VM is not running).
    """

    def __init__(
        self,
        backend: Backend,
        vm: str,
        path: str,
        *,
        read_size: int = DEFAULT_RING_SIZE,
        write_size: int = DEFAULT_RING_SIZE,
        max_clients: int | None = None,
        _backend_ref: _SharedBackend | None = None,
    ) -> None:
        self.backend = backend
        self.vm = _uuid(vm)
        self.path = path
        self.domid: int | None = None
        self._sizes = (read_size, write_size, max_clients)
        self._ref = _backend_ref
        self._listener: Listener | None = None
        self._watches: list[Watch] = []
        self._epoll: select.epoll | None = None
        self._lock = anyio.Lock()
        self._closed = False
        #: The scope of the running accept (closing cancels it).
        self._scope: anyio.CancelScope | None = None

    async def _watch(self) -> select.epoll:
        """One descriptor readable when a domain appeared or went (set up once)."""
        if self._epoll is None:
            epoll = select.epoll()
            try:
                for path in _DOMAIN_EVENTS:
                    watch = await _astore.run(
                        self.backend.store.watch,
                        path,
                        "gntipc-vm",
                        what=f"watching {path} for VM {self.vm}",
                        discard=Watch.close,
                        holder=self._ref,
                    )
                    self._watches.append(watch)
                    epoll.register(watch.fileno(), select.EPOLLIN)
            except BaseException:
                epoll.close()
                raise
            self._epoll = epoll
        return self._epoll

    def _drain(self) -> None:
        for watch in self._watches:
            watch.read_events()

    async def _find(self) -> int | None:
        return await _astore.run(
            domain_of_vm,
            self.backend.store,
            self.vm,
            self.domid,
            what=f"looking for the domain of VM {self.vm}",
            holder=self._ref,
        )

    async def _domain_changes(self, domid: int, epoll: select.epoll) -> None:
        """Return once VM is no longer (only) domain ``domid``."""
        while True:
            await anyio.wait_readable(epoll.fileno())
            self._drain()
            if await self._find() != domid:
                return

    async def _listener_for(self, domid: int) -> Listener:
        listener = self._listener
        if listener is not None and listener.peer == domid:
            return listener
        self._listener = None
        if listener is not None:
            await listener.aclose()
        read, write, max_clients = self._sizes
        hold = self._ref.acquire() if self._ref is not None else None
        self._listener = Listener(
            self.backend,
            domid,
            self.path,
            read_size=read,
            write_size=write,
            max_clients=max_clients,
            _backend_ref=hold,
        )
        return self._listener

    async def accept(self) -> VchanStream:
        """Wait for the VM's next client (see the class); its stream.

        Raises:
            anyio.ClosedResourceError: the listener is (or gets) closed.
            gntipc.XenError: as :meth:`gntipc.Listener.accept` (e.g. EADDRINUSE:
                another listener serves the path).
            gntipc.XenStoreTimeout: the store did not answer in time.
        """
        async with self._lock:
            with anyio.CancelScope() as scope:
                self._scope = scope
                try:
                    if not self._closed:
                        return await self._accept_loop()
                finally:
                    self._scope = None
            raise ClosedResourceError

    async def _accept_loop(self) -> VchanStream:
        while True:
            epoll = await self._watch()
            self._drain()
            domid = await self._find()
            self.domid = domid
            if domid is None:  # not running now: wait for a domain to appear
                await anyio.wait_readable(epoll.fileno())
                continue
            listener = await self._listener_for(domid)
            stream = await self._accept_from(listener, domid, epoll)
            if stream is not None:
                return stream

    async def _accept_from(
        self, listener: Listener, domid: int, epoll: select.epoll
    ) -> VchanStream | None:
        """``listener.accept()``, or None once the VM left domain ``domid``."""
        with anyio.CancelScope() as scope:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._cancel_on_change, domid, epoll, scope)
                    stream = await listener.accept()
                    tg.cancel_scope.cancel()
                    return stream
            except BaseExceptionGroup as group:  # (one task failed: say what it said)
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        return None

    async def _cancel_on_change(
        self, domid: int, epoll: select.epoll, scope: anyio.CancelScope
    ) -> None:
        await self._domain_changes(domid, epoll)
        scope.cancel()

    async def aclose(self) -> None:
        """Stop listening (idempotent): withdraw the offer, remove the watches; a waiting
        :meth:`accept` raises ClosedResourceError.  Accepted streams stay open.

        Raises:
            gntipc.XenStoreTimeout: the store did not answer in time (the rest is done
                in the background).
        """
        if self._closed:
            return
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        with anyio.CancelScope(shield=True):
            async with self._lock:  # (the accept is out: nothing waits on what we close)
                listener, self._listener = self._listener, None
                watches, self._watches = self._watches, []
                epoll, self._epoll = self._epoll, None
                ref, self._ref = self._ref, None
                try:
                    if listener is not None:
                        await listener.aclose()
                finally:
                    if epoll is not None:
                        epoll.close()
                    for watch in watches:
                        with contextlib.suppress(XenError, XenStoreTimeout, ClosedResourceError):
                            await _astore.run_cleanup(
                                watch.close, what=f"removing a watch of VM {self.vm}"
                            )
                    if ref is not None:
                        ref.release()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"domid {self.domid}"
        return f"<VmListener vm={self.vm} path={self.path!r} {state}>"


async def listen_vm(
    vm: str,
    path: str,
    *,
    read_size: int = DEFAULT_RING_SIZE,
    write_size: int = DEFAULT_RING_SIZE,
    max_clients: int | None = None,
    backend: Backend | str | None = None,
) -> VmListener:
    """Listen for clients of VM ``vm`` (its UUID, or ``/vm/<uuid>``) at ``path``, under
    whatever domid it has (see :class:`VmListener`); the other arguments as for
    :func:`gntipc.listen`.

    Raises:
        ValueError: ``vm`` is not a VM identity, or bad ring sizes.
        TypeError: ``vm`` is not a str.
        gntipc.BackendUnavailable: the chosen backend cannot run here.
    """
    check_ring_size(read_size, "read_size")
    check_ring_size(write_size, "write_size")
    _uuid(vm)
    be, ref = await _open_backend(backend)
    return VmListener(
        be,
        vm,
        path,
        read_size=read_size,
        write_size=write_size,
        max_clients=max_clients,
        _backend_ref=ref,
    )
