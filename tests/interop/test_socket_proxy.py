"""``gntipc proxy`` (plain mode) against Debian's unmodified ``vchan-socket-proxy`` on real
Xen (dom0 <-> dom0), each in either role: socket clients -> one proxy -> vchan -> the
other proxy -> a socket echo server, data checked byte for byte, connection after
connection (``vchan-socket-proxy`` serves one vchan at a time and re-offers it).

A libxenvchan peer has no half-close, so the clients here read their whole echo before
closing (``exact``); the end of each connection then crosses as a close.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import test_cli_proxy
from test_cli_proxy import CLIENTS, ECHO_SERVER

from ._util import Proc
from .conftest import XEN_ONLY

pytestmark = XEN_ONLY

_paths = itertools.count()
#: A directory with a short path (for unix sockets), as in the sim tests.
short_tmp = test_cli_proxy.short_tmp


def _vchan_socket_proxy() -> str:
    for exe in ("/usr/lib/xen-4.17/bin/vchan-socket-proxy", shutil.which("vchan-socket-proxy")):
        if exe and os.path.exists(exe):
            return exe
    pytest.skip("no vchan-socket-proxy (Debian's xen-utils-4.17)")


def gntipc_proxy(*args: str) -> Proc:
    env = dict(os.environ, GNTIPC_BACKEND="xen")
    return Proc([sys.executable, "-m", "gntipc.cli", "proxy", "-v", *args], env=env)


def fresh_path() -> str:
    return f"/local/domain/0/data/vchan/sockproxy-{os.getpid()}-{next(_paths)}"


def echo_server(procs: list[Proc], sock: Path) -> None:
    server = Proc([sys.executable, "-c", ECHO_SERVER, str(sock)])
    procs.append(server)
    server.expect("READY", timeout=120)


def clients(sock: Path, n: int, size: int, *proxies: Proc) -> None:
    proc = Proc([sys.executable, "-c", CLIENTS, str(sock), str(n), str(size), "exact"])
    try:
        line = proc.expect("", timeout=600)
        logs = "\n".join(f"--- {Path(p.argv[0]).name}:\n{p.output()}" for p in proxies)
        assert line == f"OK {n}", f"{proc.output()}\n{logs}"
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def wait_for_socket(proc: Proc, sock: Path) -> None:
    """vchan-socket-proxy says nothing when its socket is ready (without -v): wait for
    the file, with a deadline."""
    import time

    deadline = time.monotonic() + 120
    while not sock.exists():
        assert proc.proc.poll() is None, proc.output()
        assert time.monotonic() < deadline, f"no {sock}; output:\n{proc.output()}"
        time.sleep(0.1)


def test_gntipc_client_proxy_to_vchan_socket_proxy_server(
    procs: list[Proc], short_tmp: Path
) -> None:
    """The first connection crosses byte for byte.  A second one cannot: Debian's
    ``vchan-socket-proxy -m server`` sets up its vchan server once and, after its client
    left, waits for a client on the *same* control page (a libxenvchan client reconnects
    to it as is); gntipc refuses a page whose client live byte is no longer "waiting" as
    stale keys.  Our proxy then ends that connection cleanly after ``--timeout``."""
    echo_sock, front = short_tmp / "echo.sock", short_tmp / "front.sock"
    echo_server(procs, echo_sock)
    path = fresh_path()
    theirs = Proc([_vchan_socket_proxy(), "-m", "server", "0", path, str(echo_sock)])
    procs.append(theirs)
    ours = gntipc_proxy("--timeout", "30", "0", path, str(front))
    procs.append(ours)
    ours.expect("gntipc proxy: ready: ", timeout=120)
    clients(front, 1, 200_000, ours, theirs)
    ours.expect("gntipc proxy: connection 1: closed", timeout=120)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(300)
        s.connect(str(front))
        assert s.recv(10) == b""  # closed, after our connect's timeout
    assert "no gntipc server at" in ours.expect("gntipc proxy: connection 2: no channel")
    ours.proc.terminate()
    assert ours.wait(60) == 0, ours.output()
    assert "Traceback" not in ours.output()


def test_vchan_socket_proxy_client_to_gntipc_server_proxy(
    procs: list[Proc], short_tmp: Path
) -> None:
    echo_sock, front = short_tmp / "echo.sock", short_tmp / "front.sock"
    echo_server(procs, echo_sock)
    path = fresh_path()
    ours = gntipc_proxy("--mode", "server", "0", path, str(echo_sock))
    procs.append(ours)
    ours.expect("gntipc proxy: ready: ", timeout=120)
    theirs = Proc([_vchan_socket_proxy(), "-m", "client", "0", path, str(front)])
    procs.append(theirs)
    wait_for_socket(theirs, front)
    for size in (200_000, 10):
        clients(front, 1, size, ours, theirs)
    ours.proc.terminate()
    assert ours.wait(60) == 0, ours.output()
    assert ours.output().count(": closed") == 2, ours.output()
