"""``gntipc proxy`` end to end on sim: a Python socket echo server and socket clients in
their own processes, the two proxies as ``gntipc`` subprocesses of two simulated domains.

Every wait has a functional deadline (the step must happen), never a timing assertion."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from _vchan_relay import COMMAND as RELAY
from interop import conftest as interop_conftest
from interop._util import Proc

from gntipc import VchanStream, get_backend
from gntipc.cli import main
from gntipc.cli._proxy import SocketAddress, UsageError, parse_socket_address, relay
from gntipc.testing import connect_pair

_paths = itertools.count()
#: The fixture of the interop tests: the processes a test starts, killed after it.
procs = interop_conftest.procs

#: A socket echo server: echoes each connection until its EOF, then half-closes.
ECHO_SERVER = r"""
import socket, sys, threading
addr = sys.argv[1]
if addr == "tcp":
    srv = socket.create_server(("127.0.0.1", 0))
    print("READY tcp:127.0.0.1:%d" % srv.getsockname()[1], flush=True)
else:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(addr)
    srv.listen(128)
    print("READY " + addr, flush=True)
def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: N concurrent socket clients; each sends SIZE+i random bytes and checks the echo.
#: "halfclose": send everything, shutdown(SHUT_WR), read until EOF (the EOF must cross
#: both proxies and come back).  "exact": read exactly what was sent, then close.
CLIENTS = r"""
import os, socket, sys, threading
addr, n, size, how = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
failures = []
def connect():
    if addr.startswith("tcp:"):
        host, port = addr[4:].rsplit(":", 1)
        return socket.create_connection((host, int(port)), timeout=120)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(addr)
    return s
def one(i):
    try:
        data = os.urandom(size + i)
        with connect() as s:
            def send():
                s.sendall(data)
                if how == "halfclose":
                    s.shutdown(socket.SHUT_WR)
            sender = threading.Thread(target=send)
            sender.start()
            got = bytearray()
            while how == "halfclose" or len(got) < len(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            sender.join()
            if bytes(got) != data:
                failures.append("connection %d: %d of %d bytes, equal prefix: %s"
                                % (i, len(got), len(data), bytes(got) == data[:len(got)]))
    except Exception as exc:
        failures.append("connection %d: %r" % (i, exc))
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print("FAIL " + "; ".join(failures) if failures else "OK %d" % n, flush=True)
sys.exit(1 if failures else 0)
"""


#: ROUNDS socket connections one after another (no pause): each sends SIZE random bytes,
#: reads exactly that much back, checks it byte for byte and closes; prints one line per
#: failed connection, then "DONE <ok> of <rounds>".
BACK_TO_BACK = r"""
import os, socket, sys, threading
addr, rounds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for i in range(rounds):
    data = os.urandom(size)
    got = bytearray()
    try:
        if addr.startswith("tcp:"):
            host, port = addr[4:].rsplit(":", 1)
            s = socket.create_connection((host, int(port)), timeout=120)
        else:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(120)
            s.connect(addr[5:] if addr.startswith("unix:") else addr)
        with s:
            sender = threading.Thread(target=s.sendall, args=(data,))
            sender.start()
            while len(got) < len(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            sender.join()
    except Exception as exc:
        print("connection %d: %r" % (i + 1, exc), flush=True)
    if bytes(got) == data:
        ok += 1
    else:
        print("connection %d: %d of %d bytes back, equal prefix: %s"
              % (i + 1, len(got), len(data), bytes(got) == data[:len(got)]), flush=True)
print("DONE %d of %d" % (ok, rounds), flush=True)
sys.exit(0 if ok == rounds else 1)
"""


def _env(domid: int) -> dict[str, str]:
    return dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(domid))


def gntipc(domid: int, *args: str) -> Proc:
    return Proc([sys.executable, "-m", "gntipc.cli", *args], env=_env(domid))


def python(script: str, *args: str) -> Proc:
    return Proc([sys.executable, "-c", script, *args])


def stop(proc: Proc, timeout: float = 60) -> int:
    """SIGTERM, then the exit status (the proxy must stop by itself)."""
    proc.proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def ready_address(proc: Proc) -> str:
    """The socket address in a proxy's ready line."""
    line = proc.expect("gntipc proxy: ready: ")
    return line.split("ready: ", 1)[1].split(",")[0]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path (unix socket paths are limited to 107 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpx") as d:
        yield Path(d)


def vchan_path() -> str:
    return f"data/cli-proxy/{os.getpid()}-{next(_paths)}"


def run_clients(address: str, n: int, size: int, how: str) -> None:
    clients = python(CLIENTS, address, str(n), str(size), how)
    try:
        line = clients.expect("", timeout=240)
        assert line == f"OK {n}", clients.output()
        assert clients.wait() == 0
    finally:
        clients.kill()


def run_back_to_back(address: str, rounds: int, size: int, *proxies: Proc) -> None:
    """``rounds`` connections one right after another (:data:`BACK_TO_BACK`) through the
    proxies; every one must get its echo, byte for byte (the proxies' output on failure)."""
    proc = python(BACK_TO_BACK, address, str(rounds), str(size))
    try:
        line = proc.expect("DONE ", timeout=900)
        logs = "\n".join(f"--- {' '.join(p.argv[-6:])}:\n{p.output()}" for p in proxies)
        assert line == f"DONE {rounds} of {rounds}", f"{proc.output()}\n{logs}"
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def start_pair(
    procs: list[Proc], client_socket: str, *, mux: bool, echo: str = "tcp", limit: int = 256
) -> tuple[Proc, Proc, str]:
    """Echo server, server proxy (domain 0) and client proxy (domain 4, carrying at most
    ``limit`` connections at once); returns the proxies and the clients' address."""
    server = python(ECHO_SERVER, echo)
    procs.append(server)
    backend_addr = server.expect("READY ").split()[1]
    path = vchan_path()
    extra = ["--mux"] if mux else []
    srv = gntipc(0, "proxy", "-v", *extra, "--mode", "server", "4", path, backend_addr)
    procs.append(srv)
    srv.expect("gntipc proxy: ready: ")
    cli = gntipc(4, "proxy", "-v", *extra, f"--max-connections={limit}", "0", path, client_socket)
    procs.append(cli)
    return srv, cli, ready_address(cli)


@pytest.mark.parametrize("how", ["halfclose", "exact"])
def test_plain_proxy_unix_client_tcp_server(procs: list[Proc], short_tmp: Path, how: str) -> None:
    """One vchan per connection: several at once, each checked byte for byte."""
    sock = str(short_tmp / "c.sock")
    srv, cli, address = start_pair(procs, sock, mux=False)
    assert address == f"unix:{sock}"
    run_clients(sock, 6, 150_000, how)
    run_clients(sock, 1, 10, how)  # the proxies serve connection after connection
    assert stop(cli) == 0, cli.output()
    assert stop(srv) == 0, srv.output()
    assert not os.path.exists(sock)  # our socket file is removed on exit
    assert "connection 7: closed" in srv.output()


def test_plain_proxy_connections_back_to_back(procs: list[Proc], short_tmp: Path) -> None:
    """Connections one right after another, each on a vchan of its own: each one that
    comes while the server proxy offers the path again waits for the new offer (the
    keys of the channel just taken are withdrawn at once), none is reset."""
    srv, cli, address = start_pair(procs, str(short_tmp / "c.sock"), mux=False, echo="tcp")
    run_back_to_back(address, 10, 100_000, srv, cli)
    assert stop(cli) == 0, cli.output()
    assert stop(srv) == 0, srv.output()
    assert srv.output().count(": closed") == 10, srv.output()


@pytest.mark.parametrize("how", ["halfclose", "exact"])
def test_mux_proxy_many_concurrent_connections(
    procs: list[Proc], short_tmp: Path, how: str
) -> None:
    """--mux: forty connections at once over one vchan, to a unix-socket echo server."""
    srv, cli, address = start_pair(procs, "tcp:0", mux=True, echo=str(short_tmp / "e.sock"))
    assert address.startswith("tcp:127.0.0.1:") and not address.endswith(":0")
    run_clients(address, 40, 60_000, how)
    assert stop(cli) == 0, cli.output()
    assert stop(srv) == 0, srv.output()
    assert srv.output().count("session 1: open") == 1  # one vchan for all of them


@pytest.mark.parametrize("mux", [False, True], ids=["plain", "mux"])
def test_connections_beyond_the_limit_wait_their_turn(procs: list[Proc], mux: bool) -> None:
    srv, cli, address = start_pair(procs, "tcp:0", mux=mux, limit=2)
    run_clients(address, 7, 20_000, "halfclose")
    # A socket client is done when it has its data; the proxy logs the connection's
    # close a moment later: wait for all seven before stopping it.
    deadline = time.monotonic() + 60
    while cli.output().count(": closed") < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stop(cli) == 0, cli.output()
    assert stop(srv) == 0, srv.output()
    # The client proxy logs from one event loop: its log order is the order of events.
    carried = peak = 0
    for line in cli.lines:
        carried += line.endswith(": open") - line.endswith(": closed")
        peak = max(peak, carried)
    assert peak <= 2 and carried == 0
    assert cli.output().count(": closed") == 7


def test_mux_client_ends_when_the_server_proxy_stops(procs: list[Proc]) -> None:
    srv, cli, address = start_pair(procs, "tcp:0", mux=True)
    run_clients(address, 2, 1000, "exact")
    assert stop(srv) == 0, srv.output()
    assert cli.wait(60) == 0, cli.output()
    assert "closed the session" in cli.output()


def test_server_proxy_without_socket_program(procs: list[Proc], short_tmp: Path) -> None:
    """Nobody listens on the server side's socket: each connection is refused (its
    socket closed at once), logged in one line, and the proxies go on."""
    path = vchan_path()
    missing = str(short_tmp / "nobody.sock")
    srv = gntipc(0, "proxy", "--mode", "server", "4", path, missing)
    procs.append(srv)
    cli = gntipc(4, "proxy", "-v", "0", path, str(short_tmp / "c.sock"))
    procs.append(cli)
    ready_address(cli)
    for _ in range(2):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(str(short_tmp / "c.sock"))
            # (nothing sent first: unread bytes would turn the close into a reset)
            assert s.recv(10) == b""  # closed: nothing to talk to
    line = srv.expect("gntipc proxy: connection 1: cannot connect")
    assert missing in line
    assert "Traceback" not in srv.output()
    assert stop(cli) == 0 and stop(srv) == 0


def test_mux_client_without_server_fails_in_one_line(short_tmp: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gntipc.cli", "proxy", "--mux", "--timeout", "0.3", "0",
         vchan_path(), str(short_tmp / "c.sock")],
        env=_env(4), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("gntipc: no gntipc server at /local/domain/0/data/cli-proxy/")
    assert len(proc.stderr.splitlines()) == 1
    assert not (short_tmp / "c.sock").exists()


def test_socket_in_use_is_refused(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = short_tmp / "busy.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(sock))
        other.listen(1)
        assert main(["--backend", "sim", "proxy", "0", "data/x", str(sock)]) == 1
    assert "another program listens there" in capsys.readouterr().err
    assert sock.exists()  # not stolen


def test_not_a_socket_is_refused(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = short_tmp / "file"
    plain.write_text("mine")
    assert main(["--backend", "sim", "proxy", "0", "data/x", str(plain)]) == 1
    assert "exists and is not a socket" in capsys.readouterr().err
    assert plain.read_text() == "mine"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/run/x.sock", SocketAddress("unix", path="/run/x.sock")),
        ("unix:rel.sock", SocketAddress("unix", path="rel.sock")),
        ("tcp:8080", SocketAddress("tcp", host="127.0.0.1", port=8080)),
        ("tcp:0.0.0.0:1", SocketAddress("tcp", host="0.0.0.0", port=1)),
        ("tcp:[::1]:22", SocketAddress("tcp", host="::1", port=22)),
        ("tcp:localhost:22", SocketAddress("tcp", host="localhost", port=22)),
        ("-", SocketAddress("stdio")),
    ],
)
def test_socket_addresses(text: str, expected: SocketAddress) -> None:
    assert parse_socket_address(text) == expected


@pytest.mark.parametrize(
    "text", ["tcp:", "tcp:x", "tcp:70000", "tcp::80", "unix:", "/" * 120, "udp:1234", "http://x"]
)
def test_bad_socket_addresses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_socket_address(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0", "p", "tcp:nope"], "bad TCP port"),
        (["--mux", "0", "p", "-"], "--mux needs a socket"),
        (["--resume", "0", "p", "x.sock"], "--resume needs --mux"),
        (["--mux", "--resume", "--give-up", "0", "0", "p", "x.sock"], "--give-up"),
        (["--max-connections", "0", "0", "p", "x.sock"], "--max-connections"),
        (["--mode", "server", "--ring-size", "1000", "0", "p", "x.sock"], "ring"),
        (["70000", "p", "x.sock"], "domid 70000"),
    ],
)
def test_proxy_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--backend", "sim", "proxy", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("gntipc: proxy: ") and message in err
    assert err.rstrip().endswith("(see gntipc proxy --help)")


@pytest.mark.parametrize("proxy_mode", ["server", "client"])
def test_stdio_proxy_pairs_with_the_netcat(proxy_mode: str) -> None:
    """SOCKET ``-``: one connection on stdin/stdout, as vchan-socket-proxy's ``-``."""
    from concurrent.futures import ThreadPoolExecutor

    path = vchan_path()
    env0, env4 = _env(0), _env(4)
    if proxy_mode == "server":
        a = ["proxy", "--mode", "server", "4", path, "-"]
        b = ["connect", "0", path]
    else:
        a = ["listen", "4", path]
        b = ["proxy", "0", path, "-"]
    up, down = os.urandom(200_000), os.urandom(70_000)
    cmd = [sys.executable, "-m", "gntipc.cli"]
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    first = subprocess.Popen([*cmd, *a], env=env0, **pipes)  # type: ignore[call-overload]
    second = subprocess.Popen([*cmd, *b], env=env4, **pipes)  # type: ignore[call-overload]
    try:
        with ThreadPoolExecutor(2) as pool:
            got_first = pool.submit(first.communicate, down, 120)
            got_second = pool.submit(second.communicate, up, 120)
            assert got_first.result()[0] == up
            assert got_second.result()[0] == down
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
            p.wait()
    assert first.returncode == 0 and second.returncode == 0


#: N socket clients that hold their connections open at once (as redis-benchmark's do):
#: all connect, then each echoes one message, then all close.
HOLDING_CLIENTS = r"""
import socket, sys
host, port = sys.argv[1][4:].rsplit(":", 1)
socks = [socket.create_connection((host, int(port)), timeout=120) for _ in range(int(sys.argv[2]))]
for i, s in enumerate(socks):
    s.sendall(b"ping %d\n" % i)
for i, s in enumerate(socks):
    want, got = b"ping %d\n" % i, b""
    while len(got) < len(want):
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    assert got == want, (i, got)
for s in socks:
    s.close()
print("OK", flush=True)
"""


def test_plain_proxy_fits_max_connections_in_the_page_budget(procs: list[Proc]) -> None:
    """Plain mode, the server's domain may share 100 pages (3 vchans of 64 KiB rings):
    --max-connections 20 connections held open at once all get a vchan (smaller rings
    as they add up), and the server proxy says so at start."""
    server = python(ECHO_SERVER, "tcp")
    procs.append(server)
    backend_addr = server.expect("READY ").split()[1]
    path = vchan_path()
    args = ["proxy", "-v", "--mode", "server", "--max-connections=20", "4", path, backend_addr]
    srv = Proc(
        [sys.executable, "-m", "gntipc.cli", *args],
        env=dict(_env(0), GNTIPC_SIM_PAGE_LIMIT="100"),
    )
    procs.append(srv)
    srv.expect("gntipc proxy: ready: ")
    assert "may share 100 pages" in srv.output() and "--max-connections 20" in srv.output()
    cli = gntipc(4, "proxy", "-v", "0", path, "tcp:0")
    procs.append(cli)
    clients = python(HOLDING_CLIENTS, ready_address(cli), "20")
    try:
        assert clients.expect("", timeout=240) == "OK", clients.output() + srv.output()
        assert clients.wait() == 0
    finally:
        clients.kill()
    assert stop(cli) == 0, cli.output()
    assert stop(srv) == 0, srv.output()


@pytest.mark.parametrize("mux", [False, True], ids=["plain", "mux"])
def test_a_crashed_server_proxy_ends_the_open_connections(procs: list[Proc], mux: bool) -> None:
    """SIGKILL of the server proxy while connections are open: the client proxy sees
    the channels break (the sim's unmap notification) and closes the socket clients'
    connections at once (they read an end, not a hang); plain mode logs each close and
    goes on, a --mux client exits (its session is gone), saying so in one line."""
    srv, cli, address = start_pair(procs, "tcp:0", mux=mux)
    host, port = address[4:].rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=60) for _ in range(3)]
    try:
        for i, s in enumerate(socks):  # each connection carries a round trip first
            s.sendall(b"ping %d" % i)
            assert s.recv(100) == b"ping %d" % i
        srv.proc.kill()
        srv.wait(60)
        for s in socks:
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
    finally:
        for s in socks:
            s.close()
    if mux:
        assert cli.wait(60) == 1, cli.output()
        assert (
            cli.lines[-1]
            == "gntipc: the channel broke: the session's stream broke (the peer is gone)"
        )
        return
    deadline = time.monotonic() + 60
    while cli.output().count(": closed") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cli.output().count(": closed") == 3, cli.output()
    assert "Traceback" not in cli.output()
    assert stop(cli) == 0, cli.output()


def test_plain_proxy_without_pages_refuses_on_both_sides(procs: list[Proc]) -> None:
    """The server proxy's domain has no grant page left (another server proxy offers a
    channel of 64 KiB rings: all 33 pages of its budget): the server proxy says why it
    cannot offer a channel, and the client proxy refuses the socket connection with
    that reason (the listener's refusal), not after its --timeout with "no gntipc
    server"."""
    limit = dict(GNTIPC_SIM_PAGE_LIMIT="33")
    hog_args = ["-v", "-m", "server", "--max-connections=1", "4", vchan_path(), "tcp:1"]
    hog = Proc([sys.executable, "-m", "gntipc.cli", "proxy", *hog_args], env=dict(_env(0), **limit))
    procs.append(hog)
    hog.expect("gntipc proxy: ready: ")
    path = vchan_path()
    srv = Proc(
        [sys.executable, "-m", "gntipc.cli", "proxy", "-m", "server", "4", path, "tcp:1"],
        env=dict(_env(0), **limit),
    )
    procs.append(srv)
    line = srv.expect("gntipc listener at ")
    assert "cannot offer a channel" in line and "limit of 33" in line, srv.output()
    cli = gntipc(4, "proxy", "-v", "--timeout", "100", "0", path, "tcp:0")
    procs.append(cli)
    host, port = ready_address(cli)[4:].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        assert s.recv(10) == b""  # refused: closed
    line = cli.expect("gntipc proxy: connection 1: no channel")
    assert "ENOSPC" in line and "no gntipc server" not in line, cli.output()
    assert stop(cli) == 0, cli.output()
    assert stop(srv) == 0, srv.output()


def test_doctor_reports_the_page_budget_in_use(procs: list[Proc]) -> None:
    """gntipc doctor counts the pages its domain shares now: a server proxy offering a
    channel of 64 KiB rings holds 33 of the domain's 100."""
    env = dict(_env(0), GNTIPC_SIM_PAGE_LIMIT="100")

    def doctor() -> str:
        cmd = [sys.executable, "-m", "gntipc.cli", "doctor"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120).stdout

    assert "domain 0: 0 of 100 pages shared now, 100 free: 3 more vchans" in doctor()
    args = ["-v", "-m", "server", "--max-connections=1", "4", vchan_path(), "tcp:1"]
    srv = Proc([sys.executable, "-m", "gntipc.cli", "proxy", *args], env=env)
    procs.append(srv)
    srv.expect("gntipc proxy: ready: ")
    assert "domain 0: 33 of 100 pages shared now, 67 free: 2 more vchans" in doctor()
    assert stop(srv) == 0, srv.output()


def _relay_through_a_pair(check: Callable[..., Awaitable[None]]) -> None:
    """Run ``check(relay_done, relayed, client, sock)`` against :func:`relay` (under
    asyncio: the callback relay) between one end of a sim vchan pair with 1 KiB rings
    (every chunk fills the ring: backpressure) and one end of a socket pair."""

    async def main() -> None:
        with get_backend("sim", domid=0) as backend:
            server, client = await connect_pair(
                backend, vchan_path(), read_size=1024, write_size=1024
            )
            ours, theirs = socket.socketpair()
            done = anyio.Event()

            async def run() -> None:
                try:
                    await relay(server, ours, half_close=True)
                finally:
                    done.set()

            theirs.settimeout(60)
            try:
                async with client, anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    with anyio.fail_after(60):
                        await check(done, server, client, theirs)
            finally:
                theirs.close()

    anyio.run(main, backend="asyncio")


def test_ring_relay_passes_both_half_closes_byte_for_byte() -> None:
    """The callback relay: 100 KB vchan -> socket, then its EOF as the socket's
    shutdown(SHUT_WR) while the other direction stays open; then 200 KB socket -> vchan
    and the socket's EOF as the vchan's; 1 KiB rings, byte for byte.  The relay ends
    (and closes both) once both directions ended."""
    up, down = os.urandom(200_000), os.urandom(100_000)

    async def check(
        done: anyio.Event, relayed: VchanStream, client: VchanStream, sock: socket.socket
    ) -> None:
        def socket_side() -> bytes:
            got = bytearray()
            while chunk := sock.recv(65536):  # the EOF must come while we still send
                got += chunk
            sock.sendall(up)
            sock.shutdown(socket.SHUT_WR)
            return bytes(got)

        async with anyio.create_task_group() as tg:
            result: list[bytes] = []

            async def in_thread() -> None:
                result.append(await anyio.to_thread.run_sync(socket_side))

            tg.start_soon(in_thread)
            await client.send(down)
            await client.send_eof()
            got = bytearray()
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    got += await client.receive()
            assert bytes(got) == up
        assert result == [down]
        await done.wait()

    _relay_through_a_pair(check)


def test_ring_relay_ends_the_connection_on_an_internal_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unexpected error inside a relay callback (here: the ring read fails) ends that
    connection, said in one line, instead of leaving it hanging."""

    async def check(
        done: anyio.Event, relayed: VchanStream, client: VchanStream, sock: socket.socket
    ) -> None:
        def boom(*args: object) -> int:
            raise RuntimeError("boom")

        relayed.vchan.endpoint.readinto_nowait = boom  # type: ignore[method-assign,assignment]
        await client.send(b"request")
        await done.wait()
        assert sock.recv(10) == b""  # the socket was closed

    _relay_through_a_pair(check)
    assert "connection ended by an internal error: RuntimeError('boom')" in capsys.readouterr().err


def test_mux_resume_carries_connections_across_a_broken_vchan(procs: list[Proc]) -> None:
    # --mux --resume on both proxies, a vchan relay between them: a socket connection is
    # open through the proxies when the relay is killed (both vchans break); a new relay
    # comes, the client proxy connects again, and the same connection goes on: what was
    # sent before and after arrives once, in order (the echo server returns it).
    echo = python(ECHO_SERVER, "tcp")
    procs.append(echo)
    backend_addr = echo.expect("READY ").split()[1]
    path_a, path_b = vchan_path(), vchan_path()
    srv = gntipc(
        0, "proxy", "-v", "--mux", "--resume", "--mode", "server", "5", path_b, backend_addr
    )
    procs.append(srv)
    srv.expect("gntipc proxy: ready: ")

    def relay() -> Proc:
        proc = Proc([*RELAY, path_a, path_b], env=_env(5))
        procs.append(proc)
        proc.expect("READY")
        return proc

    first = relay()
    cli = gntipc(4, "proxy", "-v", "--mux", "--resume", "5", path_a, "tcp:0")
    procs.append(cli)
    address = ready_address(cli)
    host, port = address.removeprefix("tcp:").rsplit(":", 1)
    before, after = os.urandom(200_000), os.urandom(200_000)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(before)
        got = bytearray()
        while len(got) < len(before):
            got += s.recv(65536)
        first.kill()
        relay()
        s.sendall(after)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            got += chunk
    assert bytes(got) == before + after
    assert stop(cli) == 0, cli.output()
    assert stop(srv) == 0, srv.output()
