"""A second process for cross-process backend tests: it opens a backend and runs
commands sent over a multiprocessing pipe (spawn context: a fresh interpreter)."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from gntipc.backends import CopySegment, ForeignRef, get_backend


def open_backend(name: str, domid: int, **kwargs: Any) -> Any:
    if name == "sim":
        return get_backend("sim", domid=domid, **kwargs)
    return get_backend(name)


def _serve(conn: Connection, name: str, domid: int, kwargs: dict[str, Any]) -> None:
    backend = open_backend(name, domid, **kwargs)
    objs: dict[int, Any] = {}
    ids = iter(range(1, 1 << 30))

    def keep(obj: Any) -> int:
        i = next(ids)
        objs[i] = obj
        return i

    def map_(domid: int, refs: list[int], writable: bool) -> tuple[int, bool]:
        pages = backend.map(domid, refs, writable=writable)
        with pages.mapping.view() as v:
            ro = v.readonly
        return keep(pages), ro

    def read(i: int, off: int, n: int) -> bytes:
        with objs[i].mapping.view() as v:
            return bytes(v[off : off + n])

    def write(i: int, off: int, data: bytes) -> None:
        with objs[i].mapping.view() as v:
            v[off : off + len(data)] = data

    def try_write(i: int) -> str:
        with objs[i].mapping.view() as v:
            try:
                v[0] = 1
            except TypeError as exc:
                return type(exc).__name__
        return "written"

    def wait_event(i: int, timeout: float) -> bool:
        port = objs[i]
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            select.select([port.fileno()], [], [], left)
            if port.pending():
                port.unmask()
                return True
        return False

    def notify(i: int, n: int = 1) -> None:
        for _ in range(n):
            objs[i].notify()

    def fork_sleeper() -> int:
        pid = os.fork()
        if pid == 0:  # holds every inherited fd, does nothing
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            time.sleep(60)
            os._exit(0)
        return pid

    def grant_copy(domid: int, ref: int, offset: int, data: bytes) -> tuple[list[int], bytes]:
        out = bytearray(len(data))
        st = backend.grant_copy(
            [
                CopySegment(data, ForeignRef(domid, ref, offset), len(data)),
                CopySegment(ForeignRef(domid, ref, offset), out, len(data)),
                CopySegment(ForeignRef(domid, ref + 100000, 0), bytearray(8), 8),
            ]
        )
        return st, bytes(out)

    handlers = {
        "map": map_,
        "read": read,
        "write": write,
        "try_write": try_write,
        "alloc": lambda remote: (lambda p: (keep(p), p.port))(backend.alloc_unbound(remote)),
        "bind": lambda d, port: keep(backend.bind_interdomain(d, port)),
        "notify": notify,
        "wait_event": wait_event,
        "set_notify": lambda i, off, port: objs[i].set_unmap_notify(
            off, port=None if port is None else objs[port]
        ),
        "close": lambda i: objs.pop(i).close(),
        "status": lambda i: int(objs[i].status()),
        "fork_sleeper": fork_sleeper,
        "grant_copy": grant_copy,
        "store_write": lambda path, value: backend.store.write(path, value),
        "store_read": lambda path: backend.store.read(path),
    }
    conn.send(("ready", backend.domid, os.getpid()))
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        if cmd == "exit":
            break
        try:
            conn.send(("ok", handlers[cmd](*args)))
        except Exception as exc:
            conn.send(("err", type(exc).__name__, getattr(exc, "errno", None), str(exc)))
    for obj in reversed(list(objs.values())):
        obj.close()
    backend.close()
    conn.send(("bye",))


class PeerError(Exception):
    def __init__(self, kind: str, errno: int | None, msg: str) -> None:
        super().__init__(f"{kind}: {msg}")
        self.kind = kind
        self.errno = errno


class Peer:
    """The other process.  ``call(cmd, *args)`` runs a command there."""

    def __init__(self, backend_name: str, domid: int, **kwargs: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, backend_name, domid, kwargs))
        self.proc.start()
        child.close()
        # A fresh interpreter importing gntipc: 13 s in the Xen kit's emulation, and it
        # once took over 30 s there with other emulators on the same cores.
        msg = self._recv(120)
        assert msg[0] == "ready", msg
        self.domid: int = msg[1]
        self.pid: int = msg[2]

    def _recv(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError("the peer process did not answer")
        return self._conn.recv()

    def call(self, cmd: str, *args: Any, timeout: float = 10) -> Any:
        self._conn.send((cmd, args))
        msg = self._recv(timeout)
        if msg[0] == "err":
            raise PeerError(msg[1], msg[2], msg[3])
        return msg[1]

    def kill(self) -> None:
        """SIGKILL the peer (``close()`` reaps it; joining now could wait on a forked
        child that inherited the process sentinel)."""
        os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self._conn.send(("exit", ()))
                self._recv(10)
            except (OSError, EOFError, TimeoutError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self._conn.close()
        self.proc.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
