"""The vchan endpoint between separate processes: bulk streams, kill -9, domain death,
and a hostile peer scribbling the control page."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio import BrokenResourceError, EndOfStream

from gntipc._exceptions import RemoteProtocolError
from gntipc.backends import Backend
from gntipc.channel import Vchan

from .test_channel import fresh_path

PEER = str(Path(__file__).with_name("_peer.py"))


class Peer:
    """A `_peer.py` process playing domain `domid`."""

    def __init__(self, backend: Backend, domid: int, *args: str) -> None:
        env = dict(os.environ, GNTIPC_BACKEND=backend.name, GNTIPC_SIM_DOMID=str(domid))
        src = str(Path(__file__).parents[2] / "src")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, PEER, *args], stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout

    def expect(self, word: str, timeout: float = 30) -> str:
        line = self.stdout.readline()
        assert line.startswith(word), f"peer said {line!r}, expected {word!r}"
        return line.strip()

    def finish(self, timeout: float = 120) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"peer exited {self.proc.returncode}"
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.stdout.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.kill()


def other_domid(backend: Backend) -> int:
    # On sim the peer plays another domain; on Xen this is dom0 talking to itself.
    return backend.domid if backend.name == "xen" else backend.domid + 1


def expected_digest(seed: int, n: int) -> str:
    block = random.Random(seed).randbytes(1 << 16)
    h = hashlib.blake2b()
    sent = 0
    while sent < n:
        k = min(1 << 16, n - sent)
        h.update(block[:k])
        sent += k
    return h.hexdigest()


@pytest.mark.slow
def test_two_processes_stream_256_mib_each_way(backend: Backend, peers: list[Peer]) -> None:
    n = 256 << 20 if backend.name == "sim" else 4 << 20
    path = f"/local/domain/{backend.domid}/{fresh_path()}"
    peer_dom = other_domid(backend)
    server = Peer(backend, backend.domid, "server", str(peer_dom), path, "stream", str(n), "1")
    peers.append(server)
    server.expect("ready")
    client = Peer(backend, peer_dom, "client", str(backend.domid), path, "stream", str(n), "2")
    peers.append(client)
    # each side reads what the other wrote
    assert server.finish().split()[-1] == expected_digest(2, n)
    assert client.finish().split()[-1] == expected_digest(1, n)


def _counter_ok(data: bytes, start: int) -> bool:
    expect = bytes((start + i) & 0xFF for i in range(len(data)))
    return data == expect


@pytest.mark.parametrize("victim", ["client", "server"])
def test_kill_9_mid_stream_loses_nothing_and_is_seen(
    backend: Backend, peers: list[Peer], victim: str
) -> None:
    path = fresh_path()
    peer_dom = other_domid(backend)
    if victim == "client":
        ch = Vchan.server(backend, peer_dom, path)
        peer = Peer(
            backend,
            peer_dom,
            "client",
            str(backend.domid),
            f"/local/domain/{backend.domid}/{path}",
            "source",
        )
    else:
        full = f"/local/domain/{peer_dom}/{path}"
        peer = Peer(backend, peer_dom, "server", str(backend.domid), full, "source")
    peers.append(peer)
    peer.expect("ready")
    if victim == "server":
        ch = Vchan.client(backend, peer_dom, f"/local/domain/{peer_dom}/{path}", timeout=30)
    with ch:
        received = bytearray()
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end or len(received) < 100_000:
            received += ch.read(1 << 16, timeout=30)
        os.kill(peer.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        peer.proc.wait(10)
        reported = [int(line.split()[1]) for line in peer.stdout.read().split("\n") if line]
        with pytest.raises((BrokenResourceError, EndOfStream)) as info:
            while True:
                received += ch.read(1 << 16, timeout=5)
        seen_after = time.monotonic() - killed_at
        assert isinstance(info.value, BrokenResourceError)  # a crash, not a clean close
        assert seen_after < 2.0, f"the crash was seen only after {seen_after:.2f} s"
        assert len(received) >= max(reported, default=0)
        assert _counter_ok(bytes(received), 0), "corrupted or lost bytes"


def test_domain_death_is_detected(backend: Backend, peers: list[Peer]) -> None:
    if backend.name != "sim":
        pytest.skip("killing a domain needs the simulator (real Xen: tests/interop)")
    from gntipc.backends.sim import kill_domain

    path = fresh_path()
    peer_dom = backend.domid + 7
    with Vchan.server(backend, peer_dom, path) as ch:
        peer = Peer(
            backend,
            peer_dom,
            "client",
            str(backend.domid),
            f"/local/domain/{backend.domid}/{path}",
            "source",
        )
        peers.append(peer)
        peer.expect("ready")
        got = ch.read(1 << 16, timeout=30)
        assert got
        kill_domain(peer_dom)
        died_at = time.monotonic()
        with pytest.raises(BrokenResourceError, match="died"):
            while True:
                got += ch.read(1 << 16, timeout=10)
        assert time.monotonic() - died_at < 5.0
        assert _counter_ok(got, 0)


def test_hostile_peer_scribbling_the_control_page(backend: Backend, peers: list[Peer]) -> None:
    path = fresh_path()
    peer_dom = other_domid(backend)
    full = f"/local/domain/{peer_dom}/{path}"
    peer = Peer(backend, peer_dom, "server", str(backend.domid), full, "scribble", "3")
    peers.append(peer)
    peer.expect("ready")
    errors: Counter[str] = Counter()
    slowest = (0.0, "")  # the largest overrun of an operation's own timeout
    ch = Vchan.client(backend, peer_dom, full, timeout=30)
    deadline = time.monotonic() + 20
    ops = 0
    with ch:
        # Hammer every operation while the peer scribbles (3 s); each must return or
        # raise a clear error (anything else fails the test), never crash, never block
        # past its timeout.
        while time.monotonic() < deadline and (peer.proc.poll() is None or ops < 50):
            for name, timeout, op in (
                ("is_open", 0.0, ch.is_open),
                ("write_nowait", 0.0, lambda: ch.write_nowait(b"x" * random.randint(1, 5000))),
                ("read_nowait", 0.0, lambda: ch.read_nowait(random.randint(1, 70000))),
                ("data_ready", 0.0, ch.data_ready),
                ("buffer_space", 0.0, ch.buffer_space),
                ("read", 0.01, lambda: ch.read(100, timeout=0.01)),
            ):
                ops += 1
                t0 = time.monotonic()
                try:
                    op()
                except TimeoutError:
                    pass
                except (RemoteProtocolError, BrokenResourceError, EndOfStream) as exc:
                    errors[type(exc).__name__] += 1
                over = time.monotonic() - t0 - timeout
                slowest = max(slowest, (over, name))
    # The scribbles were seen: a corrupted index is a RemoteProtocolError.
    assert errors["RemoteProtocolError"] > 0, (ops, errors)
    # 1 s of slack for a loaded machine: a wait that ignores its timeout takes longer.
    assert slowest[0] < 1.0, f"{slowest[1]} took {slowest[0]:.2f} s past its timeout"
    assert peer.finish(30).strip().endswith("done")
