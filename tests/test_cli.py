"""The gntipc command, as a user runs it: two processes of different (simulated) domains."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from gntipc.cli import main


def gntipc(domid: int, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(domid))
    return subprocess.Popen(
        [sys.executable, "-m", "gntipc.cli", *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        **kw,  # type: ignore[arg-type]
    )


def test_listen_and_connect_copy_both_ways() -> None:
    path = f"data/cli-test/{os.getpid()}"
    up, down = os.urandom(300_000), os.urandom(100_000)
    server = gntipc(0, "listen", "4", path)
    client = gntipc(4, "connect", "0", path, "--timeout", "30")
    try:
        with ThreadPoolExecutor(2) as pool:
            on_server = pool.submit(server.communicate, down, 60)
            on_client = pool.submit(client.communicate, up, 60)
            got_by_server, got_by_client = on_server.result()[0], on_client.result()[0]
    finally:
        for p in (server, client):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert got_by_server == up
    assert got_by_client == down
    assert server.returncode == 0 and client.returncode == 0


def test_connect_without_server_times_out_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backend", "sim", "connect", "0", "data/nobody-here", "--timeout", "0.2"]) == 1
    assert "server at /local/domain/0/data/nobody-here" in capsys.readouterr().err


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backend", "sim", "info"]) == 0
    assert capsys.readouterr().out.startswith("backend sim, domain ")
