"""A simulated XenStore in the shared state db.

Nodes are rows (path, value, perms, gen); ``gen`` comes from one global counter bumped
per commit, and creating or removing a child bumps the parent too (its directory
changed).  Permission checks follow xenstored: dom0 may do anything, the owner (first
entry) may do anything, other domains get the access of their own entry or else the
default (the first entry's access); only the node itself is checked, not its
ancestors.  A new node inherits its parent's permissions with the writer as owner.

A transaction works on an in-memory snapshot of the tree and records the generation of
every node it touched; its commit fails with EAGAIN if any of them changed meanwhile.
Watches are rows (path, token, socket); a writer sends ``path\\0token`` to the socket
of every watch at or above a changed path (or below a removed one) after committing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sqlite3
import warnings
from collections.abc import Iterable, Sequence

from anyio import ClosedResourceError

from ..._exceptions import raise_errno
from .._abc import Perm, Store, Transaction, Watch
from ._domain import SimDomain
from ._runtime import bind_dgram, drain_dgrams, send_dgram

__all__ = ["SimStore", "SimTransaction", "SimWatch", "send_watch_events", "watch_events"]

_PATH_RE = re.compile(r"^(/|(/[A-Za-z0-9_\-.@:]+)+)$")
_MAX_PATH = 3072

Node = tuple[bytes, str, int]  # value, perms, gen


def _parse_perms(text: str) -> list[Perm]:
    return [Perm.parse(p) for p in text.split()]


def _allowed(perms: str, domid: int, need: str) -> bool:
    if domid == 0:
        return True
    entries = perms.split()
    if int(entries[0][1:]) == domid:
        return True
    access = entries[0][0]
    for e in entries[1:]:
        if int(e[1:]) == domid:
            access = e[0]
            break
    return access == "b" or access == need


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _below(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


class _Ops:
    """XenStore operations over an abstract node view (the db, or a snapshot)."""

    _domid: int
    _home: str

    def _get(self, path: str) -> Node | None:
        raise NotImplementedError

    def _put(self, path: str, value: bytes, perms: str) -> None:
        raise NotImplementedError

    def _delete_tree(self, path: str) -> None:
        raise NotImplementedError

    def _children(self, path: str) -> list[str]:
        raise NotImplementedError

    def _changed(self, path: str) -> None:
        raise NotImplementedError

    def _ensure_open(self) -> None:
        raise NotImplementedError

    def _abs(self, path: str) -> str:
        self._ensure_open()
        if not isinstance(path, str):
            raise TypeError(f"a store path is a str, not {type(path).__name__}")
        if path.startswith("@"):
            raise_errno(errno.EINVAL, f"xenstore: {path!r} is only valid for watches")
        full = path if path.startswith("/") else f"{self._home}/{path}"
        if len(full) > _MAX_PATH or not _PATH_RE.match(full) or "//" in full:
            raise_errno(errno.EINVAL, f"xenstore: invalid path {path!r}")
        return full

    def _need(self, path: str, node: Node, access: str, what: str) -> None:
        if not _allowed(node[1], self._domid, access):
            raise_errno(errno.EACCES, f"xenstore: {what} {path}")

    def _node(self, path: str, what: str) -> Node:
        node = self._get(path)
        if node is None:
            raise_errno(errno.ENOENT, f"xenstore: {what} {path}")
            raise AssertionError  # unreachable
        return node

    def read(self, path: str) -> bytes:
        full = self._abs(path)
        node = self._node(full, "read")
        self._need(full, node, "r", "read")
        return node[0]

    def write(self, path: str, value: bytes) -> None:
        full = self._abs(path)
        value = bytes(value)
        if len(value) > 4096:
            raise_errno(errno.E2BIG, f"xenstore: write {full}: value over 4096 bytes")
        node = self._get(full)
        if node is not None:
            self._need(full, node, "w", "write")
            self._put(full, value, node[1])
            self._changed(full)
            return
        missing = [full]
        anc = _parent(full)
        while (anode := self._get(anc)) is None:
            missing.append(anc)
            anc = _parent(anc)
        self._need(anc, anode, "w", f"write {full}: no write access to")
        entries = anode[1].split()
        entries[0] = f"{entries[0][0]}{self._domid}"
        perms = " ".join(entries)
        for p in reversed(missing):
            self._put(p, value if p == full else b"", perms)
            self._changed(p)

    def rm(self, path: str) -> None:
        full = self._abs(path)
        if full == "/":
            raise_errno(errno.EINVAL, "xenstore: rm /")
        node = self._get(full)
        if node is None:
            return
        self._need(full, node, "w", "rm")
        self._delete_tree(full)
        self._changed(full)

    def directory(self, path: str) -> list[str]:
        full = self._abs(path)
        node = self._node(full, "directory")
        self._need(full, node, "r", "directory")
        return self._children(full)

    def get_perms(self, path: str) -> list[Perm]:
        full = self._abs(path)
        node = self._node(full, "get_perms")
        self._need(full, node, "r", "get_perms")
        return _parse_perms(node[1])

    def set_perms(self, path: str, perms: Sequence[Perm]) -> None:
        full = self._abs(path)
        if not perms:
            raise_errno(errno.EINVAL, f"xenstore: set_perms {full}: empty permission list")
        text = " ".join(str(Perm(int(p.domid), p.access)) for p in perms)
        for p in perms:
            Perm.parse(str(p))
        node = self._node(full, "set_perms")
        owner = int(node[1].split()[0][1:])
        if self._domid not in (0, owner):
            raise_errno(errno.EACCES, f"xenstore: set_perms {full}")
        self._put(full, node[0], text)
        self._changed(full)


def _children_of(paths: Iterable[str], path: str) -> list[str]:
    prefix = "/" if path == "/" else path + "/"
    return sorted(
        p[len(prefix) :]
        for p in paths
        if p.startswith(prefix) and "/" not in p[len(prefix) :] and p != "/"
    )


def watch_events(db: sqlite3.Connection, changed: Iterable[str]) -> list[tuple[str, bytes]]:
    """The events (socket, message) for every watch affected by the ``changed`` paths.

    Computed inside the write transaction; send them with :func:`send_watch_events`
    only after it commits, or a watcher woken early reads the store before the change
    is visible, goes back to sleep and is never woken again.
    """
    changed = list(dict.fromkeys(changed))
    if not changed:
        return []
    out: list[tuple[str, bytes]] = []
    for wpath, token, sock in db.execute("SELECT path, token, sock FROM watches").fetchall():
        for path in changed:
            if path.startswith("@"):
                hit = wpath == path
                event = path
            elif wpath.startswith("@"):
                continue
            elif _below(path, wpath):
                hit, event = True, path
            elif _below(wpath, path):  # a removed (or rewritten) ancestor
                hit, event = True, wpath
            else:
                hit = False
            if hit:
                out.append((sock, f"{event}\0{token}".encode()))
    return out


def send_watch_events(events: list[tuple[str, bytes]]) -> None:
    """Deliver :func:`watch_events` (after the transaction committed)."""
    for sock, msg in events:
        send_dgram(sock, msg)


class SimStore(_Ops, Store):
    """The store of one simulated domain, shared by every process of the runtime."""

    def __init__(self, domain: SimDomain) -> None:
        self._domain = domain
        self._epoch = domain.epoch
        self._domid = domain.domid
        self._home = f"/local/domain/{domain.domid}"
        self._pending: list[str] = []
        self._closed = False

    @property
    def domid(self) -> int:
        """Our domain (after a restore: the new one)."""
        self._sync()
        return self._domid

    @domid.setter
    def domid(self, value: int) -> None:
        raise AttributeError("the store's domid is its backend's")

    def _sync(self) -> None:
        """Follow a restore of our domain: relative paths and permission checks are then
        the new domain's, as when the guest's kernel reconnects to xenstored."""
        domain = self._domain
        domain.sync()
        if self._epoch != domain.epoch:
            self._epoch = domain.epoch
            self._domid = domain.domid
            self._home = f"/local/domain/{domain.domid}"

    def _ensure_open(self) -> None:
        if self._closed or self._domain.closed:
            raise ClosedResourceError("the store is closed")

    def _get(self, path: str) -> Node | None:
        row = self._domain.rt.db.execute(
            "SELECT value, perms, gen FROM nodes WHERE path=?", (path,)
        ).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]), int(row[2]))

    def _gen(self) -> int:
        db = self._domain.rt.db
        db.execute("UPDATE meta SET v = v + 1 WHERE k='gen'")
        return int(db.execute("SELECT v FROM meta WHERE k='gen'").fetchone()[0])

    def _put(self, path: str, value: bytes, perms: str) -> None:
        db = self._domain.rt.db
        gen = self._gen()
        cur = db.execute(
            "UPDATE nodes SET value=?, perms=?, gen=? WHERE path=?", (value, perms, gen, path)
        )
        if cur.rowcount == 0:
            db.execute("INSERT INTO nodes VALUES (?, ?, ?, ?)", (path, value, perms, gen))
            db.execute("UPDATE nodes SET gen=? WHERE path=?", (gen, _parent(path)))

    def _delete_tree(self, path: str) -> None:
        db = self._domain.rt.db
        db.execute(
            "DELETE FROM nodes WHERE path=? OR (path > ? AND path < ?)",
            (path, path + "/", path + "0"),
        )
        db.execute("UPDATE nodes SET gen=? WHERE path=?", (self._gen(), _parent(path)))

    def _children(self, path: str) -> list[str]:
        lo = "/" if path == "/" else path + "/"
        hi = "0" if path == "/" else path + "0"
        rows = self._domain.rt.db.execute(
            "SELECT path FROM nodes WHERE path >= ? AND path < ?", (lo, hi)
        ).fetchall()
        return _children_of((r[0] for r in rows), path)

    def _changed(self, path: str) -> None:
        self._pending.append(path)

    def _run(self, op: str, *args: object) -> object:
        rt = self._domain.rt
        self._ensure_open()
        self._sync()
        with rt.lock:
            self._pending = []
            with rt.write() as db:
                result = getattr(_Ops, op)(self, *args)
                events = watch_events(db, self._pending)
            send_watch_events(events)
            return result

    # Reads need no write lock; mutations run in one write transaction each.
    def read(self, path: str) -> bytes:
        """See :meth:`Store.read`.  Raises XenError ENOENT/EACCES/EINVAL."""
        self._sync()
        with self._domain.rt.lock:
            return _Ops.read(self, path)

    def directory(self, path: str) -> list[str]:
        """See :meth:`Store.directory`.  Raises XenError ENOENT/EACCES/EINVAL."""
        self._sync()
        with self._domain.rt.snapshot():
            return _Ops.directory(self, path)

    def get_perms(self, path: str) -> list[Perm]:
        """See :meth:`Store.get_perms`.  Raises XenError ENOENT/EACCES/EINVAL."""
        self._sync()
        with self._domain.rt.lock:
            return _Ops.get_perms(self, path)

    def write(self, path: str, value: bytes) -> None:
        """See :meth:`Store.write`.  Raises XenError EACCES/EINVAL/E2BIG."""
        self._run("write", path, value)

    def rm(self, path: str) -> None:
        """See :meth:`Store.rm`.  Raises XenError EACCES/EINVAL."""
        self._run("rm", path)

    def set_perms(self, path: str, perms: Sequence[Perm]) -> None:
        """See :meth:`Store.set_perms`.  Raises XenError ENOENT/EACCES/EINVAL."""
        self._run("set_perms", path, perms)

    def transaction(self) -> SimTransaction:
        """Start a transaction on a snapshot of the whole store.

        Raises:
            ClosedResourceError: the store is closed.
        """
        self._ensure_open()
        self._sync()
        return SimTransaction(self)

    def watch(self, path: str, token: str = "") -> SimWatch:
        """Watch ``path`` and below; fires once at once.

        Raises:
            XenError: EINVAL for a bad path.
            ClosedResourceError: the store is closed.
        """
        if path.startswith("@"):
            if path not in ("@releaseDomain", "@introduceDomain"):
                raise_errno(errno.EINVAL, f"xenstore: watch {path!r}")
            full = path
        else:
            self._sync()
            full = self._abs(path)
        self._ensure_open()
        if "\0" in token:
            raise ValueError("a watch token cannot contain NUL")
        sock_path = self._domain.new_name("w")
        sock = bind_dgram(sock_path)
        try:
            with self._domain.rt.write() as db:
                cur = db.execute(
                    "INSERT INTO watches (bid, path, token, sock) VALUES (?, ?, ?, ?)",
                    (self._domain.bid, full, token, sock_path),
                )
                wid = cur.lastrowid
                assert wid is not None
        except BaseException:
            sock.close()
            os.unlink(sock_path)
            raise
        send_dgram(sock_path, f"{full}\0{token}".encode())
        return SimWatch(self._domain, wid, sock, sock_path)

    def close(self) -> None:
        """Idempotent; the store closes with its backend."""
        self._closed = True


class SimTransaction(_Ops, Transaction):
    """A snapshot of the store; commits all or nothing, EAGAIN on conflict."""

    def __init__(self, store: SimStore) -> None:
        self._store = store
        self._domid = store._domid
        self._home = store._home
        with store._domain.rt.snapshot() as db:
            self._nodes: dict[str, Node] = {
                str(p): (bytes(v), str(pe), int(g))
                for p, v, pe, g in db.execute("SELECT path, value, perms, gen FROM nodes")
            }
        self._seen: dict[str, int | None] = {}
        self._dirty: set[str] = set()
        self._changes: list[str] = []
        self._done = False

    def _ensure_open(self) -> None:
        if self._done:
            raise ClosedResourceError("the transaction is finished")
        self._store._ensure_open()

    def _touch(self, path: str) -> None:
        if path not in self._seen:
            node = self._nodes.get(path)
            self._seen[path] = None if node is None else node[2]

    def _get(self, path: str) -> Node | None:
        self._touch(path)
        return self._nodes.get(path)

    def _put(self, path: str, value: bytes, perms: str) -> None:
        self._touch(path)
        if path not in self._nodes:
            self._touch(_parent(path))
            self._dirty.add(_parent(path))
        self._nodes[path] = (value, perms, -1)
        self._dirty.add(path)

    def _delete_tree(self, path: str) -> None:
        for p in [p for p in self._nodes if _below(p, path)]:
            self._touch(p)
            del self._nodes[p]
            self._dirty.add(p)
        self._touch(_parent(path))
        self._dirty.add(_parent(path))

    def _children(self, path: str) -> list[str]:
        kids = _children_of(self._nodes, path)
        self._touch(path)
        return kids

    def _changed(self, path: str) -> None:
        self._changes.append(path)

    def commit(self) -> None:
        """Commit all changes at once.

        Raises:
            XenError: EAGAIN when a node this transaction read or wrote changed since it
                started (retry the whole transaction).
            ClosedResourceError: already committed or aborted.
        """
        self._ensure_open()
        self._done = True
        rt = self._store._domain.rt
        with rt.lock:
            with rt.write() as db:
                events = self._commit(db)
            send_watch_events(events)

    def _commit(self, db: sqlite3.Connection) -> list[tuple[str, bytes]]:
        for path, gen in self._seen.items():
            row = db.execute("SELECT gen FROM nodes WHERE path=?", (path,)).fetchone()
            if (None if row is None else int(row[0])) != gen:
                raise_errno(errno.EAGAIN, "xenstore: transaction conflict")
        if not self._dirty:
            return []
        db.execute("UPDATE meta SET v = v + 1 WHERE k='gen'")
        (gen,) = db.execute("SELECT v FROM meta WHERE k='gen'").fetchone()
        for path in sorted(self._dirty):
            node = self._nodes.get(path)
            if node is None:
                db.execute("DELETE FROM nodes WHERE path=?", (path,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?)",
                    (path, node[0], node[1], gen),
                )
        return watch_events(db, self._changes)

    def abort(self) -> None:
        """Discard (idempotent)."""
        self._done = True


class SimWatch(Watch):
    """A store watch with its own datagram socket."""

    def __init__(self, domain: SimDomain, wid: int, sock: socket.socket, path: str) -> None:
        self._domain = domain
        self._id = wid
        self._sock: socket.socket | None = sock
        self._path = path
        domain.children.add(self)

    def fileno(self) -> int:
        """Readable when events are queued.  Raises ClosedResourceError if closed."""
        if self._sock is None:
            raise ClosedResourceError("the watch is closed")
        return self._sock.fileno()

    def read_events(self) -> list[tuple[str, str]]:
        """Queued ``(path, token)`` events, without blocking.

        Raises:
            ClosedResourceError: the watch is closed.
        """
        if self._sock is None:
            raise ClosedResourceError("the watch is closed")
        out = []
        for msg in drain_dgrams(self._sock):
            path, _, token = msg.decode().partition("\0")
            out.append((path, token))
        return out

    def close(self) -> None:
        """Remove the watch (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._domain.children.discard(self)
        if not self._domain.closed:
            with self._domain.rt.write() as db:
                db.execute("DELETE FROM watches WHERE id=?", (self._id,))
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
