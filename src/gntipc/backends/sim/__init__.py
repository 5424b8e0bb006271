"""The ``sim`` backend: a simulated Xen hypervisor across real processes.

A process plays a domain (``SimBackend(domid)`` or ``$GNTIPC_SIM_DOMID``); several
processes may play the same one.  There is no daemon and no root: all state lives in
a per-user runtime directory (``$GNTIPC_SIM_DIR``, else ``$XDG_RUNTIME_DIR/gntipc-sim``,
else ``/tmp/gntipc-sim-<uid>``, mode 0700) — an sqlite3 db in WAL mode plus memory files
and unix sockets — and the last backend to close removes the directory.

Design, one concept per private module:

``_domain``
    :class:`SimDomain`, what a backend hands its resources (runtime, backend id, domid,
    the registry of live resources, new file names) so that they never see the backend;
    it follows a restore of the domain (:meth:`SimDomain.sync`: one memory read of the
    runtime's ``restores`` counter when nothing happened) and counts restores in an
    *epoch*: a resource of an older epoch is revoked.
``_runtime``
    The directory, the process registry ``(pid, start time)`` (immune to pid reuse),
    and *reaping*: the state of a dead process is reclaimed by whoever notices first —
    its event-channel peer (a pidfd of the peer is part of every connected port's fd),
    any backend opening or closing, or :func:`assert_cleaned_up`.  Reaping a process
    performs its registered unmap notifications (unless its domain was killed).
``_grants``
    A grant ref is one page of a sparse memory file; mapping N refs reserves a range
    and maps each page ``MAP_FIXED`` over it; read-only grants are mapped
    ``PROT_READ`` (the memoryview is read-only and the page unwritable).
``_events``
    A port is a bound unix datagram socket; notify is one ``sendto``; ``fileno()`` is
    an epoll fd over the socket and a pidfd of the peer process, so the death of the
    peer (SIGKILL, even with forked children holding its fds) wakes the survivor, whose
    ``pending()`` then performs the dead process's notifications (clear the byte in the
    shared page, deliver the event) before reporting the event.
``_dmabuf``
    gntdev dma-buf: a sim dma-buf is a descriptor of a memory file
    (:meth:`SimBackend.dmabuf_alloc` makes an unnamed one).  Import links the file
    under the importer's name and grants its pages (rows like a share's, so ``map``
    works from any process); export needs the refs of one whole share in order and
    hands out a descriptor of that memory file, whose release (every descriptor and
    mapping gone, in any process) an OFD lock tracks.
``_store``
    XenStore in the db: nodes with generation numbers, xenstored's permission rules,
    snapshot transactions failing with EAGAIN on conflict, watches delivered to
    per-watch datagram sockets.  Each backend creates its domain's home
    ``/local/domain/<domid>`` (owned by the domain, no access for others, with a
    ``domid`` key) if it is absent — the toolstack's job on Xen — and fires
    ``@introduceDomain`` when it does, with the toolstack's keys ``name`` and ``vm``
    (``/vm/<uuid>``; owned by dom0, readable by the domain, as libxl writes them; set by
    ``SimBackend(vm_uuid=..., vm_name=...)`` or ``$GNTIPC_SIM_VM_UUID`` /
    ``$GNTIPC_SIM_VM_NAME``, else derived from the domid, unique in the store);
    :func:`kill_domain` removes it and fires ``@releaseDomain``.

Save/restore and migration: :func:`restore_domain` (``gntipc sim-restore-domain``)
makes the domain die for its peers exactly as :func:`kill_domain` does (ports silently
unbound, grants revoked, home removed, ``@releaseDomain``, no unmap notification) and
brings the VM back under a new domid, its ``name`` and ``vm`` keys kept, while its
processes run on.  It takes two steps.  The save: each backend of the domain, in any
process, is woken (ports, watches) and at its next operation takes its snapshot: its
mappings are replaced in place by private copies (never unmapped under a call), so
nothing the peers write afterwards reaches it, and its old ports and grants are revoked
(a port reports one event, is unbound and refuses notifies with ENOTCONN);
:func:`restore_domain` waits for that (``timeout``).  The restore: the peers see the
death, old grants are gone (peers' mappings of them stay, new maps fail), and each
backend, at its next operation, has the new ``domid``; its watches fire (registered
again); a backend the process opens later for the old domid plays the new one.

Xen behaviours that are **not** modelled:

- dma-buf: the sim exports from any domain (real Xen refuses export in a PV domain, as
  every domain of the test kit is), only whole shares in order; only sim dma-bufs (memory
  files) can be imported; no DMA-able memory (neither has gntipc on Xen); import
  grants count against ``page_limit``;
- grant-table v2, transitive grants, grant-copy between two foreign refs, and
  ``GNTST_*`` codes beyond okay/bad_domain/bad_gntref/permission_denied/bad_copy_arg;
- the page limit is per domain as given to the sharing backend's ``page_limit``
  (Xen's is the gntalloc module parameter); there is no gntdev mapping limit;
- isolation: every process of the user can read the memory files (the sim trusts
  the user, it only enforces the grant rules through its API);
- event channels: only interdomain ports (no VIRQ, IPI, PIRQ), no evtchn queue
  overflow (EFBIG), ``restrict_domid`` or reset; notify on a port whose peer is gone
  raises ENOTCONN (Xen silently drops it); a peer that dies while a forked child
  still holds its socket swallows notifies until the death is noticed;
- unmap notifications of a dead process that name *no* port are performed at the next
  reap (a backend opening/closing, a peer port noticing), not at once;
- the store: no quotas, no transaction limits, no watch permission filtering, no
  ``@``-paths besides ``@releaseDomain``/``@introduceDomain``, no introduce/release
  of domains other than by :func:`kill_domain` and the home creation above;
- domains have no lifecycle beyond their processes: a killed domid may be played
  again at once; a domain's identity and a restore's moves live in the runtime
  directory, which goes when its last backend closes; the home is owned by the domain
  (on Xen, by dom0 with read access for the domain; its ``data`` is the domain's);
- a restore does not pause the domain (Xen suspends it before saving): the save waits
  for each process of the domain to call its backend (a notify, a wait, a map, a store
  access) and until then what it writes through a mapping still reaches the peer's
  page; one that does not call within ``timeout`` takes its snapshot later and may then
  see what the peers wrote meanwhile; after it, the process still reads its pages
  (private copies, as they were) where on Xen its foreign mappings are gone; a process
  is part of the domain only while it has a backend of it open (or was moved into it
  by a restore), not merely through ``$GNTIPC_SIM_DOMID``; watches keep the absolute
  paths they were registered with and also fire for the save (a spurious event); no
  ``/vm/<uuid>`` subtree, no save image, no downtime.
"""

from ._backend import SimBackend as SimBackend
from ._backend import assert_cleaned_up as assert_cleaned_up
from ._backend import kill_domain as kill_domain
from ._backend import restore_domain as restore_domain
from ._dmabuf import SimDmabufExport as SimDmabufExport
from ._dmabuf import SimDmabufImport as SimDmabufImport
from ._events import SimEventPort as SimEventPort
from ._grants import SimPages as SimPages

__all__ = [
    "SimBackend",
    "SimDmabufExport",
    "SimDmabufImport",
    "SimEventPort",
    "SimPages",
    "assert_cleaned_up",
    "kill_domain",
    "restore_domain",
]
