"""What a channel keeps in XenStore: its keys, the endpoints' presence nodes and the
listener's claim of its path.  Non-waiting store operations, used by the endpoint
(:mod:`gntipc._endpoint`) and the listener; the connect loops that wait for the keys and
build endpoints from them are in :mod:`gntipc._connect`.

* A server publishes ``ring-ref`` and ``event-channel`` under the channel path in one
  transaction (owner: the server, no access for others, read for the client), and
  removes them when it closes, unless a newer server replaced them; a listener removes
  them as soon as a client took them (:meth:`PathClaim.withdraw`).  A client reads them
  with :func:`read_keys`.
* Presence nodes: each gntipc endpoint writes ``data/gntipc/<server>/<port>/<role>`` in
  its own domain's home, readable by the peer, and watches the peer's.  The toolstack
  removes a dead domain's home, so a vanished node while the live byte still says
  "connected" means the peer's domain died (which sends no event).  A plain libxenvchan
  peer has no presence node; its domain's death is then not detected.

  A node names the channel instance it belongs to: the server writes
  ``<ring-ref>:<nonce>`` (its control page's grant and a random nonce, written before
  the keys), the client copies the server's value into its own node.  A node left by a
  crashed process (nobody removes it) therefore never passes for the node of a later
  peer on the same path and port, e.g. a plain libxenvchan one, whose clean close would
  otherwise be reported as a crash.  Such stale nodes do not pile up: a server removes
  whatever an earlier holder of its port left (ports are unique in a domain while bound,
  and reused), and every endpoint removes its node, and the directories it leaves empty,
  on close (read, compare and remove in one transaction).
* Listener claims: a listener writes ``<path>/gntipc-listener`` (readable by every
  domain) naming its domain, the domain it serves, and its process (pid and start
  time).  A second listener on the path is refused at once (EADDRINUSE) while that
  process lives; the claim of a process that is gone (a crash leaves it behind) is taken
  over.  A client that finds no keys for itself reads the claim to say whom the path
  serves instead (:func:`why_no_server`).  A listener whose offer of a channel failed
  (no grant pages left) says so in its claim (``refusing=ENOSPC``) until an offer
  succeeds again: its clients are refused at once with that reason (:func:`refusal`)
  instead of waiting for keys that will not come.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from anyio import WouldBlock

from ._exceptions import GntipcError, LocalProtocolError, RemoteProtocolError, XenError
from ._process import proc_alive, self_start
from .backends._abc import Backend, Perm, Store, Transaction, Watch

__all__ = [
    "LISTENER_NODE",
    "REFUSALS",
    "PathClaim",
    "PathHolder",
    "Presence",
    "claim_path",
    "in_transaction",
    "publish_keys",
    "read_keys",
    "refusal",
    "presence_node",
    "resolve_path",
    "server_announced",
    "unpublish_keys",
    "why_no_server",
]

MAX_PORT = (1 << 17) - 1  # EVTCHN_FIFO_NR_CHANNELS - 1
_STORE_RETRIES = 16


def resolve_path(server_domid: int, path: str) -> str:
    """An absolute store path: a relative ``path`` is relative to the server's home
    ``/local/domain/<server_domid>``.

    Raises:
        LocalProtocolError: an empty path or one with empty components.
    """
    if not path or "//" in path or path.endswith("/") or "\0" in path:
        raise LocalProtocolError(f"invalid store path {path!r}")
    if path.startswith("/"):
        return path
    return f"/local/domain/{server_domid}/{path}"


def parse_uint(raw: bytes, what: str, limit: int) -> int:
    """A decimal number published by the peer, validated.

    Raises:
        RemoteProtocolError: not a decimal number in ``0..limit``.
    """
    text = raw.split(b"\0", 1)[0]
    if not text.isdigit() or len(text) > 10 or int(text) > limit:
        raise RemoteProtocolError(f"the server published an invalid {what}: {raw[:32]!r}")
    return int(text)


def in_transaction(store: Store, body: Callable[[Transaction], None]) -> None:
    """Run ``body`` in a store transaction and commit, retrying on EAGAIN (a conflicting
    writer).

    Raises:
        XenError: the store refused (or EAGAIN after every retry).
    """
    for attempt in range(_STORE_RETRIES):
        try:
            with store.transaction() as tx:
                body(tx)
        except XenError as exc:
            if exc.errno == errno.EAGAIN and attempt < _STORE_RETRIES - 1:
                continue
            raise
        return


def publish_keys(backend: Backend, peer: int, path: str, ref: int, port: int) -> None:
    """Publish ``ring-ref`` and ``event-channel`` in one transaction (retried on EAGAIN).

    Raises:
        XenError: the store refused.
    """
    perms = [Perm(backend.domid, "n"), Perm(peer, "r")]

    def body(tx: Transaction) -> None:
        for key, value in (("ring-ref", ref), ("event-channel", port)):
            tx.write(f"{path}/{key}", str(value).encode())
            tx.set_perms(f"{path}/{key}", perms)

    in_transaction(backend.store, body)


def read_keys(store: Store, path: str) -> tuple[int, int]:
    """The ``(ring-ref, event-channel)`` a server published at the absolute store ``path``.

    Raises:
        WouldBlock: the server has not published its keys (yet).
        RemoteProtocolError: invalid keys.
        XenError: the store failed.
    """
    try:
        ref = parse_uint(store.read(f"{path}/ring-ref"), "ring-ref", 0xFFFFFFFF)
        port = parse_uint(store.read(f"{path}/event-channel"), "event-channel", MAX_PORT)
    except XenError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES):
            raise WouldBlock from None
        raise
    if port == 0:
        raise RemoteProtocolError("the server published event-channel 0 (not a port)")
    return ref, port


def unpublish_keys(store: Store, path: str, ref: int) -> None:
    """Remove our keys (and the path node, if that leaves it empty), unless a newer
    server already replaced them: read, compare and remove in one transaction, so that
    keys published meanwhile are never removed.

    Raises:
        XenError: the store failed.
    """
    ours = str(ref).encode()

    def body(tx: Transaction) -> None:
        try:
            current = tx.read(f"{path}/ring-ref")
        except XenError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                return  # gone already (or no longer ours to see)
            raise
        if current.split(b"\0", 1)[0] != ours:
            return
        tx.rm(f"{path}/ring-ref")
        tx.rm(f"{path}/event-channel")
        try:
            if not tx.directory(path):
                tx.rm(path)
        except XenError as exc:
            if exc.errno == errno.EAGAIN:
                raise
            # the path node itself may not be ours to list or remove

    in_transaction(store, body)


def _remove_own_node(store: Store, node: str, value: bytes, keep: str) -> None:
    """Remove ``node`` if it still holds ``value``, then its ancestors that this leaves
    empty, up to (not including) ``keep``; in one transaction."""

    def body(tx: Transaction) -> None:
        try:
            if tx.read(node) != value:
                return  # replaced by a later endpoint of the same name: not ours
        except XenError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        tx.rm(node)
        parent = node.rsplit("/", 1)[0]
        while parent != keep and not tx.directory(parent):
            tx.rm(parent)
            parent = parent.rsplit("/", 1)[0]

    in_transaction(store, body)


#: The node beside a listener's keys that names the listener (see the module docstring).
LISTENER_NODE = "gntipc-listener"


#: Why a listener may offer no channel, as its claim says (``refusing=<code>``), and what
#: its clients are told.
REFUSALS = {
    "ENOSPC": "no space left on its side (ENOSPC: its domain may share no more grant"
    " pages, gntalloc's limit, or its store quota is used up); it offers a channel again"
    " once one of its connections closes",
}


@dataclass(frozen=True)
class PathHolder:
    """Who listens at a path: the value of its :data:`LISTENER_NODE`; ``refusing``: a
    key of :data:`REFUSALS` while its last offer of a channel failed, else ``""``."""

    domid: int
    peer: int
    pid: int
    start: int
    refusing: str = ""

    def encode(self) -> bytes:
        text = f"domain={self.domid} peer={self.peer} pid={self.pid} start={self.start}"
        return (f"{text} refusing={self.refusing}" if self.refusing else text).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PathHolder | None:
        """The holder named by ``raw``, or None if it names none (not our format; an
        unknown ``refusing`` reads as none)."""
        try:
            fields = dict(item.split("=", 1) for item in raw.decode("ascii").split())
            refusing = fields.get("refusing", "")
            return cls(
                int(fields["domain"]),
                int(fields["peer"]),
                int(fields["pid"]),
                int(fields["start"]),
                refusing if refusing in REFUSALS else "",
            )
        except (ValueError, KeyError, UnicodeDecodeError):
            return None

    def alive(self, backend: Backend) -> bool:
        """Whether the holder may still listen.  A process of our domain is ours to
        see (pid and start time, so a reused pid does not count); of another domain we
        can only tell whether the domain lives (its home is there)."""
        if self.domid == backend.domid:
            return proc_alive(self.pid, self.start)
        try:
            backend.store.read(f"/local/domain/{self.domid}")
        except XenError as exc:
            return exc.errno != errno.ENOENT
        return True

    def describe(self, backend: Backend) -> str:
        """``process <pid>``, ``this process (<pid>)`` or ``process <pid> of domain <d>``."""
        if self.domid != backend.domid:
            return f"process {self.pid} of domain {self.domid}"
        return f"this process ({self.pid})" if self.pid == os.getpid() else f"process {self.pid}"


class PathClaim:
    """Our claim of a path (from :func:`claim_path`); :meth:`release` withdraws it."""

    __slots__ = ("_holder", "_value", "node", "store")

    def __init__(self, store: Store, node: str, holder: PathHolder) -> None:
        self.store = store
        self.node = node
        self._holder = holder
        self._value = holder.encode()

    def refuse(self, code: str) -> None:
        """Say in the claim why we offer no channel now (a key of :data:`REFUSALS`), or
        ``""``: we offer again.  No store I/O unless that changes; nothing if the claim is
        no longer ours.

        Raises:
            XenError: the store failed.
        """
        if code == self._holder.refusing:
            return
        holder = replace(self._holder, refusing=code)
        value = holder.encode()

        def body(tx: Transaction) -> None:
            try:
                if tx.read(self.node) != self._value:
                    return
            except XenError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            tx.write(self.node, value)

        in_transaction(self.store, body)
        self._holder, self._value = holder, value

    @property
    def path(self) -> str:
        """The absolute store path claimed."""
        return self.node.rsplit("/", 1)[0]

    def published_ref(self) -> int | None:
        """The ``ring-ref`` published at our path now (our offer's: the path is ours),
        or None (none, or unreadable; one store read, errors ignored)."""
        try:
            return read_keys(self.store, self.path)[0]
        except (WouldBlock, GntipcError):
            return None

    def withdraw(self, ref: int) -> None:
        """Remove the keys of our offer whose control page is ``ref``, once a client
        took it: until the next offer replaces them, a client that comes then waits for
        that offer instead of taking keys whose port its predecessor may already have
        given back (on its close the port is unbound again: a libxenvchan client binds it
        and maps the page, which is about to close).  Keys published meanwhile stay.

        Raises:
            XenError: the store failed.
        """
        unpublish_keys(self.store, self.path, ref)

    def release(self) -> None:
        """Remove our claim, if it is still ours, and the path node if that leaves it
        empty (one transaction).

        Raises:
            XenError: the store failed.
        """
        _remove_own_node(self.store, self.node, self._value, self.path.rsplit("/", 1)[0])


def claim_path(backend: Backend, path: str, peer: int) -> PathClaim:
    """Claim the absolute store ``path`` for a listener of this process serving domain
    ``peer``: refused while another listener that still lives holds it (a dead one's
    claim is taken over).  Read, check and write in one transaction.

    Raises:
        XenError: EADDRINUSE: a live listener holds the path (the message names it);
            or the store refused.
    """
    node = f"{path}/{LISTENER_NODE}"
    holder = PathHolder(backend.domid, peer, os.getpid(), self_start())
    value = holder.encode()
    # Readable by every domain: a client of another domain may learn whom we serve.
    perms = [Perm(backend.domid, "r")]

    def body(tx: Transaction) -> None:
        try:
            holder = PathHolder.decode(tx.read(node))
        except XenError as exc:
            if exc.errno != errno.ENOENT:
                raise
            holder = None
        if holder is not None and holder.alive(backend):
            raise XenError(
                errno.EADDRINUSE,
                f"{path} is already served for domain {holder.peer} by a gntipc listener"
                f" in {holder.describe(backend)}: one listener per path (close that one"
                " first, or choose another path)",
            )
        tx.write(node, value)
        tx.set_perms(node, perms)

    in_transaction(backend.store, body)
    return PathClaim(backend.store, node, holder)


def _holder(backend: Backend, path: str) -> PathHolder | None:
    try:
        return PathHolder.decode(backend.store.read(f"{path}/{LISTENER_NODE}"))
    except XenError:
        return None


def why_no_server(backend: Backend, path: str) -> str:
    """Why a client of ours may find no keys at ``path`` although a listener is there:
    ``"it is served for domain 3, not for us (domain 1)"``, or why the listener offers
    no channel now (:func:`refusal`), or ``""`` (nothing known; one store read, errors
    ignored)."""
    holder = _holder(backend, path)
    if holder is None:
        return ""
    if holder.peer != backend.domid:
        return f"it is served for domain {holder.peer}, not for us (domain {backend.domid})"
    return (
        f"the listener there offers no channel: {REFUSALS[holder.refusing]}"
        if holder.refusing
        else ""
    )


def refusal(backend: Backend, path: str) -> XenError | None:
    """The error for a client of ours that finds no keys at ``path`` because the
    listener there says it cannot offer a channel now (its claim's ``refusing``), or
    None (one store read, errors ignored)."""
    holder = _holder(backend, path)
    if holder is None or not holder.refusing or holder.peer != backend.domid:
        return None
    if not holder.alive(backend):
        return None  # a crashed listener's claim: nobody refuses, nobody serves either
    return XenError(
        errno.ECONNREFUSED,
        f"the gntipc listener at {path} (domain {holder.domid}) offers no channel now:"
        f" {REFUSALS[holder.refusing]}",
    )


def presence_node(domid: int, server: int, server_port: int, role: str) -> str:
    """The presence node of ``role`` (``server`` or ``client``) in domain ``domid``, for
    the channel of the server ``server`` whose event port is ``server_port``."""
    return f"/local/domain/{domid}/data/gntipc/{server}/{server_port}/{role}"


def server_announced(store: Store, server: int, server_port: int, ref: int) -> bool:
    """Whether a gntipc server announced the channel whose control page is ``ref`` and
    whose event port is ``server_port`` (its presence node names that page).  False for
    a plain libxenvchan server, and when the node left under that port is a crashed
    earlier holder's (it names another page).  True when we may not look (EACCES): we
    cannot tell, so the caller must assume it.

    Raises:
        XenError: the store failed.
    """
    try:
        value = store.read(presence_node(server, server, server_port, "server"))
    except XenError as exc:
        if exc.errno == errno.ENOENT:
            return False
        if exc.errno == errno.EACCES:
            return True
        raise
    page, sep, _ = value.partition(b":")
    return bool(sep) and page == str(ref).encode()


class Presence:
    """Our presence node and the watch on the peer's (see the module docstring).

    Args:
        backend: ours.
        peer: the peer's domid.
        server: the server's domid; ``server_port``: the server's event port, which
            names the channel in the store.
        ref: the grant ref of the control page, which (with the server's nonce) names
            the channel instance.
    """

    __slots__ = (
        "_backend",
        "_node",
        "_peer",
        "_peer_node",
        "_ref",
        "_server",
        "_server_port",
        "_value",
        "_watch",
    )

    def __init__(
        self, backend: Backend, peer: int, server: int, server_port: int, ref: int
    ) -> None:
        self._backend = backend
        self._peer = peer
        self._server = server
        self._server_port = server_port
        self._ref = ref
        self._node: str | None = None
        #: The value of the server's node: ours (server), or the one we found (client).
        self._value: bytes | None = None
        self._peer_node: str | None = None
        self._watch: Watch | None = None

    def _path(self, domid: int, role: str) -> str:
        return presence_node(domid, self._server, self._server_port, role)

    def _perms(self) -> list[Perm]:
        return [Perm(self._backend.domid, "n"), Perm(self._peer, "r")]

    def announce_server(self) -> None:
        """Write the server's node, naming this instance, after removing whatever an
        earlier holder of our port left there (one transaction).  Call it before the
        keys are published: a client that finds the keys also finds the node."""
        node = self._path(self._backend.domid, "server")
        value = f"{self._ref}:{secrets.token_hex(8)}".encode()
        perms = self._perms()

        def body(tx: Transaction) -> None:
            # We hold the port now, so every node under it is stale (a process that
            # crashed, or a server killed before its client noticed).
            tx.rm(node.rsplit("/", 1)[0])
            tx.write(node, value)
            tx.set_perms(node, perms)

        in_transaction(self._backend.store, body)
        self._node, self._value = node, value

    def announce_client(self) -> None:
        """Write the client's node: the server's value (after :meth:`watch_peer`), so
        that the server recognises it as this instance's."""
        node = self._path(self._backend.domid, "client")
        value = self._value if self._value is not None else f"{self._ref}:".encode()
        store = self._backend.store
        store.write(node, value)
        self._node, self._value = node, value
        store.set_perms(node, self._perms())

    def _matches(self, role: str, value: bytes) -> bool:
        if role == "client":  # we are the server: the client copied our value
            return value == self._value
        ref, sep, nonce = value.partition(b":")
        if sep and nonce and ref == str(self._ref).encode():
            self._value = value
            return True
        return False

    def watch_peer(self, role: str) -> tuple[bool, bool]:
        """Start watching the peer's node.  Returns ``(is_gntipc, dead)``: whether the
        peer has a node of this channel instance (a gntipc peer), and whether its domain
        is already gone.  A stale node (of a crashed process) counts as none."""
        store = self._backend.store
        node = self._path(self._peer, role)
        try:
            value: bytes | None = store.read(node)
        except XenError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES):
                raise
            value = None
        if value is None:
            # A plain libxenvchan peer, or a peer whose domain already died (its home is
            # gone: ENOENT; EACCES only says we may not look, as in a domU).
            try:
                store.read(f"/local/domain/{self._peer}")
            except XenError as exc:
                if exc.errno == errno.ENOENT:
                    return False, True
            return False, False
        if not self._matches(role, value):
            return False, False
        self._peer_node = node
        self._watch = store.watch(node, "gntipc-peer")
        return True, False

    def fileno(self) -> int | None:
        """The watch's descriptor (None before :meth:`watch_peer` found a node)."""
        return None if self._watch is None else self._watch.fileno()

    def watch_fired(self) -> bool:
        """Consume the watch's events without blocking (no store request); True if
        there were any: then :meth:`peer_gone` tells whether the node went away."""
        return self._watch is not None and bool(self._watch.read_events())

    def peer_gone(self) -> bool:
        """True if the peer's node (found by :meth:`watch_peer`) is gone: one store
        request, safe from any thread."""
        node = self._peer_node
        return node is not None and not self._backend.store.exists(node)

    def close(self) -> None:
        """Stop watching; remove our node, if it is still ours, and the directories that
        leaves empty (best effort: the store may be gone)."""
        watch, self._watch = self._watch, None
        node, self._node = self._node, None
        try:
            if node is not None and self._value is not None:
                keep = f"/local/domain/{self._backend.domid}/data"
                _remove_own_node(self._backend.store, node, self._value, keep)
        except (GntipcError, TimeoutError):
            pass
        finally:
            if watch is not None:
                watch.close()
