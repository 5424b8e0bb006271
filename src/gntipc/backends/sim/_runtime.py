"""The sim runtime directory: shared state, process registry, reaping, clean-up.

Layout of ``<runtime dir>`` (mode 0700, owned by the user):

``state.db``
    sqlite3 database in WAL mode: the process registry (``procs``), per-domain counters
    (``domains``), grants, mappings, event-channel ports, unmap notifications, store
    nodes and watches.  Every mutation runs in one ``BEGIN IMMEDIATE`` transaction.  An
    sqlite error becomes a :class:`~gntipc.XenError` (``EBUSY`` for a database still locked
    after the busy timeout, ``EIO`` otherwise) in :class:`StateDb`, so none leaks through
    the backend API.
``restores``
    one native u64, mapped by every backend: bumped by each
    :func:`~gntipc.backends.sim.restore_domain` inside its transaction, so that a backend
    notices a restore with one memory read (no system call) on its fast paths, then reads
    its new domid from ``procs`` (see :class:`Runtime`).
``m/<bid>-<n>``
    sparse memory files holding granted pages (a grant ref names one page of one file).
``p/<bid>-<n>``, ``w/<bid>-<n>``
    bound unix datagram sockets of event-channel ports and of store watches.  A backend
    id (``bid``) is never reused, so neither is a file name: a peer's stale cached
    socket path can never reach a later port.

Every live backend holds a shared ``flock`` on the directory itself.  The backend that
closes last (it alone can turn its lock exclusive; a dead process's lock is released
by the kernel) removes the whole directory, so nothing is left behind.  The state of a
dead process (``kill -9``: its rows, and its files even those not yet recorded) is
reclaimed ("reaped") by whoever notices first: the event-channel peer (through a
pidfd), or any backend opening or closing, or :func:`assert_cleaned_up`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..._exceptions import XenError, raise_errno
from ..._process import datagram_sender, proc_alive

__all__ = [
    "Runtime",
    "follow_moves",
    "revoke_rows",
    "default_runtime_dir",
    "send_dgram",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS procs (bid INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER,
    start INTEGER, domid INTEGER);
CREATE TABLE IF NOT EXISTS domains (domid INTEGER PRIMARY KEY, next_ref INTEGER,
    dead INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS grants (domid INTEGER, ref INTEGER, grantee INTEGER,
    writable INTEGER, file TEXT, off INTEGER, bid INTEGER, PRIMARY KEY (domid, ref));
CREATE TABLE IF NOT EXISTS maps (id INTEGER PRIMARY KEY, bid INTEGER, file TEXT);
CREATE TABLE IF NOT EXISTS ports (domid INTEGER, port INTEGER, remote INTEGER,
    bid INTEGER, pid INTEGER, start INTEGER, sock TEXT, peer_port INTEGER,
    PRIMARY KEY (domid, port));
CREATE TABLE IF NOT EXISTS notifies (id INTEGER PRIMARY KEY, bid INTEGER, file TEXT,
    off INTEGER, clear INTEGER, pdomid INTEGER, port INTEGER);
CREATE TABLE IF NOT EXISTS nodes (path TEXT PRIMARY KEY, value BLOB, perms TEXT,
    gen INTEGER);
CREATE TABLE IF NOT EXISTS watches (id INTEGER PRIMARY KEY, bid INTEGER, path TEXT,
    token TEXT, sock TEXT);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
CREATE TABLE IF NOT EXISTS moves (pid INTEGER, start INTEGER, old INTEGER, new INTEGER,
    PRIMARY KEY (pid, start, old));
CREATE TABLE IF NOT EXISTS saving (bid INTEGER PRIMARY KEY, done INTEGER);
INSERT OR IGNORE INTO meta VALUES ('gen', 1);
INSERT OR IGNORE INTO nodes VALUES ('/', x'', 'n0', 1);
INSERT OR IGNORE INTO nodes VALUES ('/local', x'', 'n0', 1);
INSERT OR IGNORE INTO nodes VALUES ('/local/domain', x'', 'n0', 1);
"""

#: Unix socket paths are limited to 108 bytes, including the terminating NUL.
_SUN_PATH_MAX = 107


def default_runtime_dir() -> str:
    """``$GNTIPC_SIM_DIR``, else ``$XDG_RUNTIME_DIR/gntipc-sim``, else
    ``/tmp/gntipc-sim-<uid>``."""
    env = os.environ.get("GNTIPC_SIM_DIR")
    if env:
        return os.path.abspath(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "gntipc-sim")
    return f"/tmp/gntipc-sim-{os.getuid()}"


def send_dgram(path: str, data: bytes) -> bool:
    """Send one datagram to the unix socket ``path`` without blocking (one syscall).

    Returns False if nobody listens there any more.  A full receive queue counts as
    delivered: the receiver has events queued already, and events coalesce (every
    reader re-checks its state after any wake-up).

    EAGAIN from the process's shared sender does not say that, though: the kernel
    charges each datagram to its sending socket until it is read, so ~270 datagrams
    unread *anywhere* (watches nobody reads) make the shared socket refuse every send,
    even to an empty queue.  Taken for "delivered", that lost notifies (a client left
    asleep with data in its ring).  So the datagram then goes out through a fresh
    socket, charged nothing yet, whose EAGAIN can only mean a full receive queue.
    """
    sent = _sendto(datagram_sender(), path, data)
    if sent is None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as fresh:
            fresh.setblocking(False)
            sent = _sendto(fresh, path, data)
    return sent is not False


def _sendto(sock: socket.socket, path: str, data: bytes) -> bool | None:
    """One non-blocking ``sendto``: True if queued, False if nobody listens at
    ``path``, None on EAGAIN."""
    try:
        sock.sendto(data, path)
    except BlockingIOError:
        return None
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    return True


def bind_dgram(path: str) -> socket.socket:
    """A non-blocking unix datagram socket bound at ``path``."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(
            f"sim socket path too long for AF_UNIX ({path!r}): use a shorter runtime "
            "directory (GNTIPC_SIM_DIR)"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def drain_dgrams(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def clear_byte_in_file(path: str, off: int) -> None:
    """Zero one byte of a memory file (the page cache is shared with every mapping)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, b"\0", off)
        finally:
            os.close(fd)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _raise_sqlite(exc: sqlite3.Error, path: str = "") -> None:
    """Raise the :class:`XenError` for an sqlite error of the state database (at
    ``path``, named when given)."""
    text = str(exc)
    busy = "locked" in text or "busy" in text
    where = f" {path}" if path else ""
    raise_errno(errno.EBUSY if busy else errno.EIO, f"sim state database{where} ({text})")


class StateDb(sqlite3.Connection):
    """The connection to ``state.db``: every statement raises :class:`XenError`, never an
    sqlite error (the one place they are translated)."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as exc:
            _raise_sqlite(exc)
            raise  # unreachable: for the type checker

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.Error as exc:
            _raise_sqlite(exc)
            raise

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        try:
            return super().executescript(sql_script)
        except sqlite3.Error as exc:
            _raise_sqlite(exc)
            raise


def _connect(path: str) -> StateDb:
    try:
        db = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False, factory=StateDb
        )
    except sqlite3.Error as exc:
        _raise_sqlite(exc, path)
        raise
    assert isinstance(db, StateDb)
    return db


def _enable_wal(db: StateDb, timeout: float = 10.0) -> None:
    """Switch the database to WAL (persistent in the file).

    Changing the journal mode needs an exclusive lock and does not wait on the busy
    timeout, so two processes creating the runtime at the same moment retry here.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            db.execute("PRAGMA journal_mode=WAL")
            return
        except XenError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class Runtime:
    """One backend's handle on the runtime directory: its lock, its db connection and
    the mapped ``restores`` counter.

    Attributes:
        on_restore: called as ``on_restore(db)`` at the start of a write transaction when
            the ``restores`` counter differs from :attr:`seen_restores` (the backend
            then learns its new domid; it sets :attr:`seen_restores`).
        seen_restores: the counter's value when the owner last looked.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._dirfd = _lock_dir_shared(path)
        self.lock = threading.RLock()
        self._restores_mm: mmap.mmap | None = None
        self._restores: memoryview | None = None
        self.on_restore: Callable[[sqlite3.Connection], None] | None = None
        self.seen_restores = 0
        try:
            self.db = _connect(os.path.join(path, "state.db"))
            _enable_wal(self.db)
            self.db.execute("PRAGMA synchronous=OFF")
            with self.lock:
                self.db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            for sub in ("m", "p", "w"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(path, sub), 0o700)
            self._map_restores()
        except BaseException:
            self._unlock_close()
            raise

    def _map_restores(self) -> None:
        path = os.path.join(self.path, "restores")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)  # zeroes; a concurrent creator's ftruncate is a no-op
            self._restores_mm = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        self._restores = memoryview(self._restores_mm).cast("Q")

    def restores(self) -> int:
        """The ``restores`` counter: how many domains were restored in this runtime (a
        torn read is possible while one is bumped; it only costs an extra look)."""
        counter = self._restores
        return 0 if counter is None else int(counter[0])

    def bump_restores(self) -> None:
        """Add one to the counter; call it inside the restore's write transaction."""
        assert self._restores is not None
        self._restores[0] = (self._restores[0] + 1) & 0xFFFF_FFFF_FFFF_FFFF

    # -- transactions ---------------------------------------------------------------
    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A serialised write transaction across every process of the runtime.

        If a domain was restored since the owner last looked, :attr:`on_restore` runs
        first, in the transaction: an operation never acts under a domid that a restore
        already took away."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                hook = self.on_restore
                if hook is not None and self.restores() != self.seen_restores:
                    hook(self.db)
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            else:
                self.db.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read-only view."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                yield self.db
            finally:
                self.db.execute("COMMIT")

    # -- reaping --------------------------------------------------------------------
    def reap_dead(self) -> list[int]:
        """Reclaim the state of every dead process; returns their pids."""
        with self.lock:
            rows = self.db.execute("SELECT bid, pid, start FROM procs").fetchall()
            dead = [r for r in rows if not proc_alive(r[1], r[2])]
            moved = self.db.execute("SELECT DISTINCT pid, start FROM moves").fetchall()
            gone = [(p, s) for p, s in moved if not proc_alive(p, s)]
            if gone:
                with self.write() as db:
                    db.executemany("DELETE FROM moves WHERE pid=? AND start=?", gone)
            if not dead:
                return []
            with self.write() as db:
                rows = db.execute("SELECT bid, pid, start, domid FROM procs").fetchall()
                dead = [r for r in rows if not proc_alive(r[1], r[2])]
                for bid, _pid, _start, domid in dead:
                    killed = db.execute(
                        "SELECT dead FROM domains WHERE domid=?", (domid,)
                    ).fetchone()
                    self.release(db, bid, notify=not (killed and killed[0]))
            return sorted({r[1] for r in dead})

    def release(self, db: sqlite3.Connection, bid: int, *, notify: bool) -> None:
        """Remove every resource and file of backend ``bid`` (in a write transaction).

        With ``notify``, first perform its unmap notifications (clear the byte through
        the memory file, send the event to the port's peer), as Xen does for a dying
        process.  Files of ``bid`` that no row names are removed too: a process creates
        a file first and records it second, so one killed in between leaves an orphan.
        (Backend ids are never reused, so no later backend could trip over one anyway.)
        """
        _release_rows(db, bid, notify=notify)
        prefix = f"{bid}-"
        for kind in ("m", "p", "w"):
            folder = os.path.join(self.path, kind)
            try:
                names = [n for n in os.listdir(folder) if n.startswith(prefix)]
            except FileNotFoundError:
                continue
            for name in names:
                # A memory file may outlive its granter while another backend maps it.
                drop_file_if_unused(db, os.path.join(folder, name))

    # -- closing --------------------------------------------------------------------
    def close(self) -> None:
        """Drop our lock; remove the directory if no live backend holds one."""
        if self._dirfd < 0:
            return
        self.reap_dead()
        self.db.close()
        fd = self._dirfd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            # Last one out: every remaining row belongs to a dead process.
            shutil.rmtree(self.path, ignore_errors=True)
        self._unlock_close()

    def _unlock_close(self) -> None:
        counter, self._restores = self._restores, None
        if counter is not None:
            counter.release()
        mm, self._restores_mm = self._restores_mm, None
        if mm is not None:
            mm.close()
        fd, self._dirfd = self._dirfd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._dirfd < 0


def _dir_label(path: str) -> str:
    """How errors name the runtime directory: its path, and the variable that chose it."""
    env = os.environ.get("GNTIPC_SIM_DIR")
    source = " (GNTIPC_SIM_DIR)" if env and os.path.abspath(env) == path else ""
    return f"sim runtime dir {path!r}{source}"


def _lock_dir_shared(path: str) -> int:
    """Create ``path`` (0700) if needed and hold a shared flock on it.

    Raises:
        OSError: the directory cannot be made or opened (the message names it).
    """
    uid = os.getuid()
    while True:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileExistsError:
            raise NotADirectoryError(f"{_dir_label(path)} is not a directory") from None
        except OSError as exc:
            raise type(exc)(exc.errno, f"{_dir_label(path)}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != uid:
                raise PermissionError(errno.EPERM, f"{_dir_label(path)} belongs to uid {st.st_uid}")
            try:
                if st.st_mode & 0o077:
                    os.fchmod(fd, 0o700)
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError as exc:
                raise type(exc)(exc.errno, f"{_dir_label(path)}: {exc.strerror}") from None
            try:
                same = os.stat(path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the last closer removed it while we waited: start over


def _release_rows(db: sqlite3.Connection, bid: int, *, notify: bool) -> None:
    """The rows part of :meth:`Runtime.release`: every row of backend ``bid`` and the
    files they name."""
    for sock in revoke_rows(db, bid, notify=notify):
        _unlink(sock)
    for (sock,) in db.execute("SELECT sock FROM watches WHERE bid=?", (bid,)).fetchall():
        _unlink(sock)
    db.execute("DELETE FROM watches WHERE bid=?", (bid,))
    db.execute("DELETE FROM saving WHERE bid=?", (bid,))
    db.execute("DELETE FROM procs WHERE bid=?", (bid,))


def revoke_rows(db: sqlite3.Connection, bid: int, *, notify: bool) -> list[str]:
    """What both a dying process and a restore of its domain lose (in a write
    transaction): the unmap notifications of backend ``bid`` (performed first with
    ``notify``: clear the byte through the memory file, send the event to the port's
    peer), its ports (their peers silently revert to unbound), its grants and the rows
    of its mappings (a memory file goes once nobody grants or maps it).  Returns the
    sockets of the ports, for the caller to unlink."""
    if notify:
        for file, off, clear, pdomid, port in db.execute(
            "SELECT file, off, clear, pdomid, port FROM notifies WHERE bid=?", (bid,)
        ).fetchall():
            if clear:
                clear_byte_in_file(file, off)
            if port is not None:
                peer = peer_sock(db, pdomid, port)
                if peer is not None:
                    send_dgram(peer, b"e")
    db.execute("DELETE FROM notifies WHERE bid=?", (bid,))
    socks = []
    for domid, port, sock in db.execute(
        "SELECT domid, port, sock FROM ports WHERE bid=?", (bid,)
    ).fetchall():
        unbind_port(db, domid, port)
        socks.append(str(sock))
    files = {
        r[0]
        for r in db.execute(
            "SELECT file FROM grants WHERE bid=? UNION SELECT file FROM maps WHERE bid=?",
            (bid, bid),
        )
    }
    db.execute("DELETE FROM grants WHERE bid=?", (bid,))
    db.execute("DELETE FROM maps WHERE bid=?", (bid,))
    for file in files:
        drop_file_if_unused(db, file)
    return socks


def drop_file_if_unused(db: sqlite3.Connection, file: str) -> None:
    used = db.execute(
        "SELECT 1 FROM grants WHERE file=? UNION ALL SELECT 1 FROM maps WHERE file=? LIMIT 1",
        (file, file),
    ).fetchone()
    if used is None:
        _unlink(file)


def peer_sock(db: sqlite3.Connection, domid: int, port: int) -> str | None:
    """The socket of the port bound to ``(domid, port)``, if connected."""
    row = db.execute(
        "SELECT remote, peer_port FROM ports WHERE domid=? AND port=?", (domid, port)
    ).fetchone()
    if row is None or row[1] is None:
        return None
    prow = db.execute(
        "SELECT sock FROM ports WHERE domid=? AND port=?", (row[0], row[1])
    ).fetchone()
    return None if prow is None else str(prow[0])


def unbind_port(db: sqlite3.Connection, domid: int, port: int) -> None:
    """Close ``(domid, port)``: its peer silently reverts to unbound (as on Xen)."""
    row = db.execute(
        "SELECT remote, peer_port FROM ports WHERE domid=? AND port=?", (domid, port)
    ).fetchone()
    if row is not None and row[1] is not None:
        db.execute("UPDATE ports SET peer_port=NULL WHERE domid=? AND port=?", (row[0], row[1]))
    db.execute("DELETE FROM ports WHERE domid=? AND port=?", (domid, port))


def follow_moves(db: sqlite3.Connection, pid: int, start: int, domid: int) -> int:
    """The domain that process ``(pid, start)`` plays now if it played ``domid``: a
    restore moves every process of the restored domain to the new domid, so a backend it
    opens for the old one plays the new one (as every process of a restored VM is in the
    new domain on Xen).  Each row names the process's current domain (a restore updates
    the rows of the processes it moves)."""
    row = db.execute(
        "SELECT new FROM moves WHERE pid=? AND start=? AND old=?", (pid, start, domid)
    ).fetchone()
    return domid if row is None else int(row[0])


def leftovers(rt: Runtime) -> list[str]:
    """Rows of the state db that belong to this process or to dead processes."""
    me = os.getpid()
    out: list[str] = []
    with rt.snapshot() as db:
        procs = db.execute("SELECT bid, pid, start, domid FROM procs").fetchall()
        live = {bid for bid, pid, start, _ in procs if pid != me and proc_alive(pid, start)}
        for bid, pid, _start, domid in procs:
            if bid not in live:
                out.append(f"backend #{bid} (pid {pid}, domain {domid}) is still open")
        known = {r[0] for r in procs}
        for table, what in (
            ("grants", "domid, ref, grantee"),
            ("maps", "file"),
            ("ports", "domid, port, remote"),
            ("notifies", "file, off"),
            ("watches", "path, token"),
        ):
            for row in db.execute(f"SELECT bid, {what} FROM {table}").fetchall():
                if row[0] not in live or row[0] not in known:
                    out.append(f"{table}: {row[1:]} of backend #{row[0]}")
    return out
