"""How the examples play two VMs on one machine (the plumbing, not the lesson).

An example has two roles, the programs you would run in two VMs, e.g. for ``rpc.py``::

    python examples/rpc.py server --peer 5     # in domain 0: serves domain 5
    python examples/rpc.py client --peer 0     # in domain 5: uses the server in domain 0

Without a role, :func:`main` runs the whole scenario here: on the simulated hypervisor
(the default without Xen) the server is a process playing domain 0 and the client one
playing domain 1; on a Xen host both run in this domain.  The backend is chosen as
everywhere in gntipc: ``GNTIPC_BACKEND``, else ``xen`` when ``/dev/xen/gntdev`` exists,
else ``sim``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

import gntipc
from gntipc.backends import select_backend_name

#: A role: ``async def role(peer: int, args: argparse.Namespace) -> None``.
Role = Callable[[int, argparse.Namespace], Awaitable[None]]


def domains() -> tuple[str, int, int]:
    """The backend, and the domains that play the server and the client."""
    backend = select_backend_name()
    if backend == "sim":
        return backend, 0, 1
    with gntipc.get_backend(backend) as b:  # real Xen: both ends in this domain
        return backend, b.domid, b.domid


def vm_env(backend: str, domid: int) -> dict[str, str]:
    """The environment of a process playing ``domid`` (``GNTIPC_SIM_DOMID`` on sim)."""
    return dict(os.environ, GNTIPC_BACKEND=backend, GNTIPC_SIM_DOMID=str(domid))


def one_line(exc: BaseException) -> str:
    """``exc`` in one line (the exception inside a task group's group, if only one)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def main(
    doc: str,
    server: Role,
    client: Role,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    stop_server: bool = False,
    timeout: float = 300,
) -> None:
    """Parse the command line; run one role, or the whole scenario.

    ``stop_server``: the server runs until stopped; it gets SIGTERM once the client
    is done.  ``timeout``: the scenario's deadline, in seconds.
    """
    name = Path(sys.argv[0]).stem
    parser = argparse.ArgumentParser(
        prog=f"python examples/{name}.py",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "role",
        nargs="?",
        choices=["server", "client"],
        help="run one side only, in its VM (default: both, each in a process of its own domain)",
    )
    parser.add_argument("--peer", type=int, help="with a role: the other VM's domain id")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.role is not None and args.peer is None:
        parser.error("a role needs --peer")
    role = server if args.role == "server" else client
    try:
        if args.role is None:
            _play(name, sys.argv[1:], stop_server=stop_server, timeout=timeout)
        else:
            anyio.run(role, args.peer, args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        who = name if args.role is None else f"{name} {args.role}"
        raise SystemExit(f"{who}: {one_line(exc)}") from None


def _play(name: str, argv: list[str], *, stop_server: bool, timeout: float) -> None:
    backend, server_dom, client_dom = domains()
    print(
        f"{name}: on the {backend} backend, server in domain {server_dom}, "
        f"client in domain {client_dom}",
        flush=True,
    )

    def spawn(role: str, domid: int, peer: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, sys.argv[0], role, "--peer", str(peer), *argv]
        return subprocess.Popen(cmd, env=vm_env(backend, domid))

    procs = {"server": spawn("server", server_dom, client_dom)}
    try:
        procs["client"] = spawn("client", client_dom, server_dom)
        deadline = time.monotonic() + timeout
        # Wait for the client; a role that fails ends the scenario at once.
        while procs["client"].poll() != 0:
            for role, proc in procs.items():
                if proc.poll():
                    raise SystemExit(f"{name}: the {role} failed (exit status {proc.returncode})")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: no result within {timeout} s")
            time.sleep(0.05)
        if stop_server:
            procs["server"].send_signal(signal.SIGTERM)
        try:
            status = procs["server"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{name}: the server did not finish") from None
        if status:
            raise SystemExit(f"{name}: the server failed (exit status {status})")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"{name}: ok")
