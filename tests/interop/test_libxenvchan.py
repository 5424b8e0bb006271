"""Interop with Debian's unmodified libxenvchan 4.17 on real Xen (dom0 <-> dom0): our C
peer (``vchan_peer.c``) and Debian's ``vchan-socket-proxy``, each as server with gntipc as
client and as client with gntipc as server; data checked byte by byte both ways, the
control page compared with the recorded libxenvchan vectors, and a SIGKILLed C peer
detected by gntipc."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from anyio import BrokenResourceError, EndOfStream

from gntipc import Vchan
from gntipc.backends import Backend
from gntipc.protocol import VchanState, choose_orders

from ._util import SEED_CLIENT, SEED_SERVER, Proc, exchange, pattern
from .conftest import XEN_ONLY

pytestmark = XEN_ONLY

VECTORS = Path(__file__).parents[1] / "protocol" / "data" / "libxenvchan-4.17.json"
_paths = itertools.count()
NBYTES = 200_000  # per direction: several ring wraps, cheap under emulation


def fresh_path() -> str:
    return f"/local/domain/0/data/vchan/interop-{os.getpid()}-{next(_paths)}"


def vector(read_min: int, write_min: int, stage: str) -> dict[str, Any]:
    records = json.loads(VECTORS.read_text())["records"]
    for r in records:
        if (r["read_min"], r["write_min"], r["stage"]) == (read_min, write_min, stage):
            return dict(r)
    raise KeyError((read_min, write_min, stage))


def decode_ctrl(line: str) -> dict[str, Any]:
    """The ``CTRL <hex>`` line of vchan_peer: the header fields and the grant refs."""
    raw = bytes.fromhex(line.split()[1])
    lc, lp, rc, rp, lo, ro, cli_live, srv_live, cli_notify, srv_notify = struct.unpack_from(
        "<IIIIHHBBBB", raw
    )
    grants = list(struct.unpack_from(f"<{(len(raw) - 24) // 4}I", raw, 24))
    return dict(
        left_cons=lc, left_prod=lp, right_cons=rc, right_prod=rp, left_order=lo,
        right_order=ro, cli_live=cli_live, srv_live=srv_live, cli_notify=cli_notify,
        srv_notify=srv_notify, grants=grants, raw=raw,
    )  # fmt: skip


def own_page(v: Vchan) -> bytes:
    """Our endpoint's view of the control page (test-only peek at a private field)."""
    page = v.endpoint._pages[0].mapping.view()
    try:
        return bytes(page[:4096])
    finally:
        page.release()


def c_peer(exe: Path, *args: object) -> list[str]:
    return [str(exe), *map(str, args)]


# ----------------------------------------------------------------- gntipc client ---
@pytest.mark.parametrize(("read_min", "write_min"), [(1024, 2048), (65536, 4096)])
def test_gntipc_client_c_server(
    xen: Backend, vchan_peer: Path, procs: list[Proc], read_min: int, write_min: int
) -> None:
    path = fresh_path()
    srv = Proc(c_peer(vchan_peer, "server", 0, path, read_min, write_min, NBYTES, NBYTES))
    procs.append(srv)
    srv.expect("LISTENING")
    with Vchan.client(xen, 0, path, timeout=60) as v:
        ctrl = decode_ctrl(srv.expect("CTRL"))
        # What libxenvchan's server sees right after our connect, before any traffic.
        ref = vector(read_min, write_min, "after_server_init")
        assert (ctrl["left_order"], ctrl["right_order"]) == (ref["left_order"], ref["right_order"])
        assert (ctrl["left_order"], ctrl["right_order"]) == choose_orders(read_min, write_min)
        assert ctrl["cli_live"] == 1 and ctrl["srv_live"] == 1
        assert ctrl["srv_notify"] == 1  # the client asks for WRITE wake-ups, as libxenvchan's
        assert [ctrl[k] for k in ("left_cons", "left_prod", "right_cons", "right_prod")] == [0] * 4
        assert len(ctrl["grants"]) == ref["left_grants"] + ref["right_grants"]
        assert all(ctrl["grants"])
        # Our mapping shows the same geometry and grants.
        assert own_page(v)[16:22] == ctrl["raw"][16:22]
        assert own_page(v)[24 : len(ctrl["raw"])] == ctrl["raw"][24:]
        assert (v.read_size, v.write_size) == (1 << ctrl["right_order"], 1 << ctrl["left_order"])

        got = exchange(v, pattern(SEED_CLIENT, NBYTES), NBYTES)
        assert got == pattern(SEED_SERVER, NBYTES)
        received = srv.expect("RECEIVED")
        assert received.split()[1] == str(NBYTES) and received.endswith(" ok"), srv.output()
        # The C server closes after its transfer: we read a clean end of stream.
        with pytest.raises(EndOfStream):
            v.read(1, timeout=30)
    assert srv.wait() == 0, srv.output()


def test_gntipc_server_c_client(xen: Backend, vchan_peer: Path, procs: list[Proc]) -> None:
    path = fresh_path()
    read_min, write_min = 8192, 65536
    with Vchan.server(xen, 0, path, read_size=read_min, write_size=write_min) as v:
        before = own_page(v)
        cli = Proc(c_peer(vchan_peer, "client", 0, path, NBYTES, NBYTES))
        procs.append(cli)
        ctrl = decode_ctrl(cli.expect("CTRL"))
        # The page as the C client left it after its connect: our layout, its live byte.
        ref = vector(read_min, write_min, "after_server_init")
        for key in ("left_order", "right_order"):
            assert ctrl[key] == ref[key]
        assert (ctrl["cli_live"], ctrl["srv_live"]) == (1, 1)
        assert ctrl["srv_notify"] == 1 and ctrl["cli_notify"] == ref["cli_notify"]
        assert len(ctrl["grants"]) == ref["left_grants"] + ref["right_grants"]
        assert ctrl["raw"][16:20] == before[16:20]
        assert ctrl["raw"][24:] == before[24 : len(ctrl["raw"])]
        # libxenvchan's server_init writes the same header bytes we wrote (before connect).
        assert before[20:24] == bytes(
            [ref["cli_live"], ref["srv_live"], ref["cli_notify"], ref["srv_notify"]]
        )

        deadline = time.monotonic() + 30
        while v.is_open() == VchanState.WAITING and time.monotonic() < deadline:
            v.wait(1)
        assert v.is_open() == VchanState.CONNECTED
        got = exchange(v, pattern(SEED_SERVER, NBYTES), NBYTES)
        assert got == pattern(SEED_CLIENT, NBYTES)
        received = cli.expect("RECEIVED")
        assert received.split()[1] == str(NBYTES) and received.endswith(" ok"), cli.output()
        with pytest.raises(EndOfStream):
            v.read(1, timeout=30)
        assert v.is_open() == VchanState.CLOSED
    assert cli.wait() == 0, cli.output()


# ------------------------------------------------------------------- crash ---
@pytest.mark.parametrize("c_role", ["client", "server"])
def test_killed_c_peer_detected(
    xen: Backend, vchan_peer: Path, procs: list[Proc], c_role: str
) -> None:
    path = fresh_path()
    n = 5000
    if c_role == "client":
        v = Vchan.server(xen, 0, path, read_size=4096, write_size=4096)
        peer = Proc(c_peer(vchan_peer, "client", 0, path, n, 0, "--hold"))
    else:
        peer = Proc(c_peer(vchan_peer, "server", 0, path, 4096, 4096, n, 0, "--hold"))
        peer.expect("LISTENING")
        v = Vchan.client(xen, 0, path, timeout=60)
    procs.append(peer)
    with v:
        seed = SEED_CLIENT if c_role == "client" else SEED_SERVER
        assert exchange(v, b"", n) == pattern(seed, n)
        peer.expect("HOLDING")
        assert v.is_open() == VchanState.CONNECTED
        t0 = time.monotonic()
        os.kill(peer.proc.pid, signal.SIGKILL)
        # The kernel's unmap notification clears the C peer's live byte and sends the event:
        # the read ends at once, long before its (generous) timeout would have.  5 s is
        # the kit's bound for a domain's death too (test_domu.py).
        with pytest.raises((EndOfStream, BrokenResourceError)):
            v.read(1, timeout=60)
        elapsed = time.monotonic() - t0
        assert elapsed < 5, f"the kill was seen only after {elapsed:.1f} s"
        assert v.is_open() == VchanState.CLOSED
        live = own_page(v)[20 if c_role == "client" else 21]
        assert live == 0
    assert peer.proc.wait(10) == -signal.SIGKILL


# --------------------------------------------------------- vchan-socket-proxy ---
def _proxy() -> str:
    exe = shutil.which("vchan-socket-proxy")
    if exe is None:
        pytest.skip("no vchan-socket-proxy (Debian's xen-utils-common/libxen-dev)")
    return exe


def test_socket_proxy_client_gntipc_server(xen: Backend, procs: list[Proc]) -> None:
    """``vchan-socket-proxy -m client DOM PATH -`` pipes its stdin/stdout over the vchan."""
    proxy_exe = _proxy()
    path = fresh_path()
    request, reply = pattern(SEED_CLIENT, NBYTES), pattern(SEED_SERVER, NBYTES // 2)
    with Vchan.server(xen, 0, path, read_size=16384, write_size=16384) as v:
        proxy = subprocess.Popen(
            [proxy_exe, "-m", "client", "0", path, "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proxy.stdin is not None and proxy.stdout is not None
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(proxy.stdout.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        writer = threading.Thread(target=proxy.stdin.write, args=(request,), daemon=True)
        writer.start()
        try:
            deadline = time.monotonic() + 60
            while v.is_open() == VchanState.WAITING and time.monotonic() < deadline:
                v.wait(1)
            got = exchange(v, b"", len(request))
            assert got == request
            v.write_all(reply, timeout=60)
            # Wait until the proxy drained the ring before closing (it stops reading on close).
            deadline = time.monotonic() + 60
            while v.buffer_space() < v.write_size and time.monotonic() < deadline:
                v.prepare_wait_write()
                v.wait(1)
        finally:
            v.close()
            reader.join(60)
            writer.join(5)
            proxy.stdin.close()
            try:
                proxy.wait(30)
            finally:
                if proxy.poll() is None:
                    proxy.kill()
                    proxy.wait()
                proxy.stdout.close()
                assert proxy.stderr is not None
                proxy.stderr.close()
    assert out and out[0] == reply


def test_socket_proxy_server_gntipc_client(xen: Backend, procs: list[Proc], tmp_path: Path) -> None:
    """``vchan-socket-proxy -m server DOM PATH SOCKET`` connects each vchan client to a
    unix socket: gntipc client -> vchan -> proxy -> our socket, and back."""
    proxy_exe = _proxy()
    path = fresh_path()
    sock_path = str(tmp_path / "backend.sock")
    request, reply = pattern(SEED_CLIENT, NBYTES), pattern(SEED_SERVER, NBYTES)
    seen: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lsock:
        lsock.bind(sock_path)
        lsock.listen(1)
        lsock.settimeout(90)

        def backend_side() -> None:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(60)
                buf = bytearray()
                while len(buf) < len(request):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                seen.append(bytes(buf))
                conn.sendall(reply)
                # Our vchan close must reach here as the proxy closing its socket.
                seen.append(conn.recv(1))

        sock_thread = threading.Thread(target=backend_side, daemon=True)
        sock_thread.start()
        proxy = Proc([proxy_exe, "-m", "server", "0", path, sock_path])
        procs.append(proxy)
        with Vchan.client(xen, 0, path, timeout=60) as v:
            got = exchange(v, request, len(reply))
            assert got == reply
        sock_thread.join(60)
    assert seen == [request, b""]
