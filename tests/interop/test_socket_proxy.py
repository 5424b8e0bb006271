"""``gntipc proxy`` (plain mode) against Debian's unmodified ``vchan-socket-proxy`` on real
Xen (dom0 <-> dom0), each in either role: socket clients -> one proxy -> vchan -> the
other proxy -> a socket echo server, data checked byte for byte, connection after
connection with no pause between them (``vchan-socket-proxy`` serves one vchan at a time:
as a server it offers the same control page again, as a client it connects again as soon
as its next socket client comes).

A libxenvchan peer has no half-close, so the clients here read their whole echo before
closing; the end of each connection then crosses as a close.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from pathlib import Path

import pytest
import test_cli_proxy
from test_cli_proxy import ECHO_SERVER, run_back_to_back

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


#: Connections one right after another, each echoing SIZE bytes through both proxies.
ROUNDS, SIZE = 5, 100_000


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
    """Debian's ``vchan-socket-proxy -m server`` sets up its vchan server once and, after
    each client left, waits for the next one on the *same* control page (same grant,
    same event channel, the store keys unchanged; its client's live byte says "gone"):
    our client takes such a page, offered again by a plain libxenvchan server, so every
    connection gets through, back to back."""
    echo_sock, front = short_tmp / "echo.sock", short_tmp / "front.sock"
    echo_server(procs, echo_sock)
    path = fresh_path()
    theirs = Proc([_vchan_socket_proxy(), "-m", "server", "0", path, str(echo_sock)])
    procs.append(theirs)
    ours = gntipc_proxy("--timeout", "60", "0", path, str(front))
    procs.append(ours)
    ours.expect("gntipc proxy: ready: ", timeout=120)
    run_back_to_back(str(front), ROUNDS, SIZE, ours, theirs)
    ours.expect(f"gntipc proxy: connection {ROUNDS}: closed", timeout=120)
    ours.proc.terminate()
    assert ours.wait(60) == 0, ours.output()
    assert "no channel" not in ours.output()
    assert "Traceback" not in ours.output()


def test_vchan_socket_proxy_client_to_gntipc_server_proxy(
    procs: list[Proc], short_tmp: Path
) -> None:
    """``vchan-socket-proxy -m client`` connects as soon as its next socket client
    comes; our listener withdraws the keys of each channel as soon as its client took
    it, so a client that comes while the path is offered again waits for the new keys
    (it was reset when it found the previous channel's keys, its client gone)."""
    echo_sock, front = short_tmp / "echo.sock", short_tmp / "front.sock"
    echo_server(procs, echo_sock)
    path = fresh_path()
    ours = gntipc_proxy("--mode", "server", "0", path, str(echo_sock))
    procs.append(ours)
    ours.expect("gntipc proxy: ready: ", timeout=120)
    theirs = Proc([_vchan_socket_proxy(), "-m", "client", "0", path, str(front)])
    procs.append(theirs)
    wait_for_socket(theirs, front)
    run_back_to_back(str(front), ROUNDS, SIZE, ours, theirs)
    ours.proc.terminate()
    assert ours.wait(60) == 0, ours.output()
    assert ours.output().count(": closed") == ROUNDS, ours.output()
    assert "dropped" not in ours.output()
