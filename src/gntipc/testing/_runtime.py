"""SimRuntime: a private simulated hypervisor for one test."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio

from .._domid import check_domid
from .._resource import Closeable
from ..backends.sim import SimBackend, kill_domain, restore_domain
from ..backends.sim._backend import _open_backends, find_leftovers
from ..streams import VchanStream
from ._pair import connect_pair
from ._process import DEFAULT_TIMEOUT, SimProcess

__all__ = ["ServerClient", "SimRuntime"]

#: A runtime dir longer than this leaves too little of the 107 bytes of an AF_UNIX path
#: for the sim's socket names (``<dir>/p/<backend>-<n>``).
_MAX_DIR = 80


def _short_tmp() -> str:
    base = tempfile.gettempdir()
    return base if len(base) <= _MAX_DIR - 30 else "/tmp"


@dataclass(frozen=True)
class ServerClient:
    """A server process and a client process of one channel (see
    :meth:`SimRuntime.server_client`)."""

    server: SimProcess
    client: SimProcess
    #: The channel path both were given.
    path: str


class SimRuntime(Closeable):
    """A simulated hypervisor of its own: a fresh runtime directory that nothing else
    uses, the processes started in it, and a check that nothing is left behind.

    The runtime does not change this process's environment: the pytest fixture
    ``gntipc_sim`` applies :meth:`env_vars` for the test (so that code calling
    ``gntipc.listen`` / ``gntipc.connect`` without a backend uses this runtime), and every
    process started with :meth:`spawn` gets them.

    As a context manager: ``close(check=True)`` on exit (leftovers fail), or ``close()``
    when the block raised.  Use after :meth:`close` raises
    :class:`anyio.ClosedResourceError`.

    Args:
        domid: the domain this process plays (``GNTIPC_SIM_DOMID`` in :meth:`env_vars`).
    """

    def __init__(self, domid: int = 0) -> None:
        self.domid = check_domid(domid)
        self._tmp = tempfile.mkdtemp(prefix="gntipc-", dir=_short_tmp())
        #: The runtime directory (``GNTIPC_SIM_DIR``); created by the first backend.
        self.path = os.path.join(self._tmp, "sim")
        self._processes: list[SimProcess] = []
        self._backends: list[SimBackend] = []
        self._names = itertools.count()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SimRuntime {self.path}{' closed' if self._closed else ''}>"

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError(f"{self!r} is closed")

    # -- what a process playing a domain needs ---------------------------------------
    def env_vars(self, domid: int | None = None) -> dict[str, str]:
        """The variables that make a process play ``domid`` (default :attr:`domid`) in
        this runtime: ``GNTIPC_BACKEND=sim``, ``GNTIPC_SIM_DIR``, ``GNTIPC_SIM_DOMID``.
        Add them to the environment of a process you start yourself."""
        domid = self.domid if domid is None else check_domid(domid)
        return {
            "GNTIPC_BACKEND": "sim",
            "GNTIPC_SIM_DIR": self.path,
            "GNTIPC_SIM_DOMID": str(domid),
        }

    def new_path(self) -> str:
        """A channel path not used before in this runtime (relative to the server's
        home, as :func:`gntipc.listen` and :func:`gntipc.connect` take it)."""
        return f"data/gntipc-testing/{next(self._names)}"

    def backend(self, domid: int | None = None, *, page_limit: int = 1024) -> SimBackend:
        """Open a sim backend playing ``domid`` (default :attr:`domid`) in this runtime,
        in this process (see :class:`~gntipc.backends.sim.SimBackend`).  The runtime
        closes it at its end if you did not."""
        self._check_open()
        domid = self.domid if domid is None else domid
        backend = SimBackend(domid, runtime_dir=self.path, page_limit=page_limit)
        self._backends.append(backend)
        return backend

    # -- connected streams in this process -------------------------------------------
    @contextlib.asynccontextmanager
    async def stream_pair(
        self,
        *,
        server_domid: int = 0,
        client_domid: int = 1,
        read_size: int = 65536,
        write_size: int = 65536,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> AsyncIterator[tuple[VchanStream, VchanStream]]:
        """``async with runtime.stream_pair() as (server, client):`` two connected
        :class:`gntipc.VchanStream` in this process, a server in domain ``server_domid``
        and its client in domain ``client_domid`` (each with a backend of its own);
        ``read_size`` / ``write_size`` are the server's ring sizes, as for
        :func:`gntipc.listen`.  Both streams and backends are closed on exit.

        Raises:
            TimeoutError: the two did not connect within ``timeout`` seconds.
            ValueError: bad domids or ring sizes.
        """
        self._check_open()
        path = self.new_path()
        async with contextlib.AsyncExitStack() as stack:
            server_backend = stack.enter_context(SimBackend(server_domid, runtime_dir=self.path))
            client_backend = (
                server_backend
                if client_domid == server_domid
                else stack.enter_context(SimBackend(client_domid, runtime_dir=self.path))
            )
            server, client = await connect_pair(
                server_backend,
                path,
                client_backend=client_backend,
                read_size=read_size,
                write_size=write_size,
                timeout=timeout,
            )
            stack.push_async_callback(client.aclose)
            stack.push_async_callback(server.aclose)
            yield server, client

    # -- other processes -------------------------------------------------------------
    def spawn(
        self,
        target: Callable[..., Any] | Sequence[str],
        *args: object,
        domid: int,
        loop: str = "asyncio",
    ) -> SimProcess:
        """Start a process playing ``domid`` in this runtime.

        ``target`` is a module-level function (sync, or async: then run by
        :func:`anyio.run` on ``loop``, ``"asyncio"`` or ``"trio"``), called there with
        ``args`` (pickled), or a command (a sequence of arguments, e.g.
        ``[sys.executable, "server.py"]``), run with :meth:`env_vars` added to this
        process's environment (and ``PYTHONUNBUFFERED=1``: every line printed can be
        read at once).  A function's process has this process's ``sys.path``, so a
        function defined in a test module works.

        Raises:
            TypeError: the function or its arguments cannot be pickled.
            ValueError: bad domid, loop or empty command.
        """
        self._check_open()
        check_domid(domid)
        out = os.path.join(self._tmp, f"out-{len(self._processes)}")
        env = {**os.environ, **self.env_vars(domid), "PYTHONUNBUFFERED": "1"}
        proc = SimProcess(target, args, domid=domid, loop=loop, env=env, output=out)
        self._processes.append(proc)
        return proc

    def server_client(
        self,
        server: Callable[[int, str], Any],
        client: Callable[[int, str], Any],
        *,
        server_domid: int = 0,
        client_domid: int = 1,
        loop: str = "asyncio",
    ) -> ServerClient:
        """Start ``server(client_domid, path)`` in a process playing ``server_domid`` and
        ``client(server_domid, path)`` in another playing ``client_domid``: each gets
        its peer's domid and a fresh channel path, the arguments of
        :func:`gntipc.listen` and :func:`gntipc.connect`.  See :meth:`spawn`.

        Raises:
            ValueError: the two domids are equal, or see :meth:`spawn`.
        """
        if check_domid(server_domid) == check_domid(client_domid):
            raise ValueError("the server and the client must play two different domains")
        path = self.new_path()
        server_proc = self.spawn(server, client_domid, path, domid=server_domid, loop=loop)
        client_proc = self.spawn(client, server_domid, path, domid=client_domid, loop=loop)
        return ServerClient(server_proc, client_proc, path)

    def kill_domain(self, domid: int, timeout: float = 10.0) -> list[int]:
        """Destroy simulated domain ``domid`` as ``xl destroy`` would (see
        :func:`gntipc.backends.sim.kill_domain`): its processes are SIGKILLed without
        their unmap notifications, its ports go silently unbound, its store home is
        removed and ``@releaseDomain`` fires.  Every process :meth:`spawn` started in
        that domain dies, even one that has not opened its backend yet.  This process
        is spared: its own backends of that domain stay open (play a domain you mean to
        kill in a spawned process).  Returns the pids killed.

        Raises:
            TimeoutError: a process survived SIGKILL for ``timeout`` seconds.
        """
        self._check_open()
        killed = set(kill_domain(check_domid(domid), self.path, timeout=timeout))
        for proc in self._processes:
            if proc.domid == domid and proc.returncode is None:
                proc.kill(timeout)
                killed.add(proc.pid)
        return sorted(killed)

    def restore_domain(self, domid: int, new_domid: int | None = None) -> int:
        """Do to simulated domain ``domid`` what ``xl save`` + ``xl restore`` (or a
        migration) does (see :func:`gntipc.backends.sim.restore_domain`): it dies for
        its peers, and its processes run on as domain ``new_domid`` (default: the next
        free domid), the same VM (its ``name`` and ``vm`` keys).  The processes
        :meth:`spawn` started in it are then counted in the new domain (a later
        :meth:`kill_domain` of it kills them).  Returns the new domid.

        Raises:
            ValueError: ``domid`` is 0 or out of range, or a bad ``new_domid``.
            gntipc.XenError: ESRCH: no process plays ``domid``; EEXIST: ``new_domid``
                is a domain already.
        """
        self._check_open()
        new = restore_domain(check_domid(domid), new_domid, self.path)
        for proc in self._processes:
            if proc.domid == domid:
                proc.domid = new
        return new

    # -- the end ---------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """What this process, or a dead one, left in this runtime: open backends (and
        their pages, ports and watches), rows of the shared state and stray files.
        Reaps dead processes first (that is the clean-up of a ``kill -9``).  Processes
        still running are not leftovers."""
        return find_leftovers(self.path)

    def assert_cleaned_up(self) -> None:
        """Fail if anything is left (see :meth:`leftovers`).

        Raises:
            AssertionError: with the list of leftovers.
        """
        problems = self.leftovers()
        if problems:
            raise AssertionError("gntipc sim leftovers:\n" + "\n".join(problems))

    def kill_processes(self, timeout: float = 10.0) -> None:
        """SIGKILL every process started by :meth:`spawn` that still runs, and wait for
        them.

        Raises:
            TimeoutError: one survived SIGKILL for ``timeout`` seconds (the others are
                killed all the same).
        """
        errors: list[TimeoutError] = []
        for proc in self._processes:
            try:
                proc.kill(timeout)
            except TimeoutError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self, *, check: bool = False) -> None:
        """End the runtime (idempotent): kill the processes still running, close the
        backends opened by :meth:`backend`, then any other backend of this process still
        open in this runtime (a leak: closed so that it cannot disturb later tests), and
        remove the directory.

        With ``check``, what was left once the processes are killed and the backends of
        :meth:`backend` closed is reported, after the clean-up.

        Raises:
            AssertionError: ``check`` and something was left (see :meth:`leftovers`).
            TimeoutError: a process survived SIGKILL (the rest is cleaned up).
        """
        if self._closed:
            return
        problems: list[str] = []
        try:
            self.kill_processes()
            backends, self._backends = self._backends, []
            for b in backends:
                b.close()
            if check:
                problems = self.leftovers()
        finally:
            self._closed = True
            for b in [*self._backends, *list(_open_backends)]:
                if b.runtime_dir == self.path:
                    with contextlib.suppress(Exception):
                        b.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
        if problems:
            raise AssertionError("gntipc sim leftovers:\n" + "\n".join(problems))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(check=exc_type is None)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
