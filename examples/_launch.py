"""How the examples play two VMs on one machine: the plumbing, not part of any example.

Each example is a program you run once in each of two VMs, with its role, e.g.::

    python examples/rpc.py server --peer 5     # in domain 0: serves domain 5
    python examples/rpc.py client --peer 0     # in domain 5: uses the server in domain 0

and those roles need nothing but the example's own file.  Without a role an example
calls :func:`play`, which runs the whole scenario here by starting the same file twice,
once per role: on the simulated hypervisor (the default without Xen) the server is a
process playing domain 0 and the client one playing domain 1; on a Xen host both run in
this domain.  The backend is chosen as everywhere in gntipc: ``GNTIPC_BACKEND``, else
``xen`` when ``/dev/xen/gntdev`` exists, else ``sim``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import gntipc
from gntipc.backends import select_backend_name


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


def play(
    name: str,
    argv: list[str],
    *,
    roles: tuple[str, str] = ("server", "client"),
    stop_server: bool = False,
    timeout: float = 300,
) -> None:
    """Run this script (``sys.argv[0]``) once per role, each with ``--peer`` and ``argv``;
    return once both succeeded, else raise SystemExit saying which failed.

    ``roles``: the server's role (it starts first, and listens) and the client's.
    ``stop_server``: the server runs until stopped; it gets SIGTERM once the client is
    done.  ``timeout``: the scenario's deadline, in seconds.
    """
    backend, server_dom, client_dom = domains()
    server_role, client_role = roles
    print(
        f"{name}: on the {backend} backend, {server_role} in domain {server_dom}, "
        f"{client_role} in domain {client_dom}",
        flush=True,
    )

    def spawn(role: str, domid: int, peer: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, sys.argv[0], role, "--peer", str(peer), *argv]
        return subprocess.Popen(cmd, env=vm_env(backend, domid))

    procs = {server_role: spawn(server_role, server_dom, client_dom)}
    try:
        procs[client_role] = spawn(client_role, client_dom, server_dom)
        deadline = time.monotonic() + timeout
        # Wait for the client; a role that fails ends the scenario at once.
        while procs[client_role].poll() != 0:
            for role, proc in procs.items():
                if proc.poll():
                    raise SystemExit(f"{name}: the {role} failed (exit status {proc.returncode})")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: no result within {timeout} s")
            time.sleep(0.05)
        if stop_server:
            procs[server_role].send_signal(signal.SIGTERM)
        try:
            status = procs[server_role].wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{name}: the {server_role} did not finish") from None
        if status:
            raise SystemExit(f"{name}: the {server_role} failed (exit status {status})")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"{name}: ok")
