"""The gntipc command, as a user runs it: two processes of different (simulated) domains."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _vchan_relay import COMMAND as RELAY
from interop._util import Proc

from gntipc.backends import get_backend
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


# ------------------------------------------------------------ help and errors ---
COMMANDS = [
    "info",
    "listen",
    "connect",
    "proxy",
    "doctor",
    "bench",
    "sim-kill-domain",
    "sim-restore-domain",
]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help_with_exit_statuses(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gntipc")
    assert "exit status: 0 success" in " ".join(out.split())
    if command is None:
        for name in COMMANDS:
            assert name in out


def test_module_docstring_documents_exit_statuses() -> None:
    import gntipc.cli

    doc = gntipc.cli.__doc__ or ""
    for code in ("0", "1", "2", "3", "130"):
        assert f"\n    {code} " in doc


def test_bad_usage_exits_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["connect", "zero", "data/x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("gntipc connect: error:")


@pytest.mark.no_xen
def test_missing_backend_exits_3_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backend", "xen", "info"]) == 3
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "/dev/xen/gntdev" in err and "gntipc doctor" in err


# ------------------------------------------------------------------- doctor ---
def doctor(domid: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("GNTIPC_SIM_DOMID", None)
    if domid is not None:
        env["GNTIPC_SIM_DOMID"] = domid
    return subprocess.run(
        [sys.executable, "-m", "gntipc.cli", *args, "doctor"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_doctor_on_sim_all_well() -> None:
    proc = doctor("7", "--backend", "sim")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "backend: sim (--backend)" in out
    assert "our domain id: 7 (GNTIPC_SIM_DOMID)" in out
    assert f"sim runtime directory {os.environ['GNTIPC_SIM_DIR']} (GNTIPC_SIM_DIR)" in out
    assert "ok       the sim backend opens" in out
    assert "ok       event channel: port" in out
    assert "ok       grant sharing: one page granted and released" in out
    assert out.rstrip().endswith("all well")
    assert proc.stderr == ""


def test_doctor_sees_other_sim_processes() -> None:
    path = f"data/cli-doctor/{os.getpid()}"
    server = gntipc(3, "listen", "4", path)
    try:
        # The listener's keys appear in the store once its backend is up.
        deadline_proc = subprocess.run(
            [sys.executable, "-c",
             "import gntipc, time\n"
             "b = gntipc.get_backend('sim', domid=4)\n"
             "end = time.monotonic() + 60\n"
             f"while not b.store.exists('/local/domain/3/{path}/ring-ref'):\n"
             "    assert time.monotonic() < end\n"
             "    time.sleep(0.05)\n"
             "b.close()\n"],
            env=dict(os.environ, GNTIPC_BACKEND="sim"), timeout=120,
        )  # fmt: skip
        assert deadline_proc.returncode == 0
        proc = doctor("0", "--backend", "sim")
        assert proc.returncode == 0, proc.stdout
        assert f"pid {server.pid} (domain 3)" in proc.stdout
        assert "domains in use [0, 3" in proc.stdout
    finally:
        server.kill()
        server.communicate()


def test_doctor_reports_a_bad_domid_with_advice() -> None:
    proc = doctor("seven", "--backend", "sim")
    assert proc.returncode == 3
    assert "PROBLEM  GNTIPC_SIM_DOMID='seven' is not a domain id" in proc.stdout
    assert "advice: set it to a number" in proc.stdout
    assert proc.stdout.rstrip().endswith("1 problem found (see advice)")


@pytest.mark.no_xen
def test_doctor_xen_without_xen() -> None:
    proc = doctor(None, "--backend", "xen")
    assert proc.returncode == 3
    assert "PROBLEM  cannot open /dev/xen/gntdev" in proc.stdout
    assert "advice: modprobe xen-gntdev" in proc.stdout
    assert "PROBLEM  XenStore:" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


# -------------------------------------------------------------------- bench ---
def test_bench_not_available_outside_a_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed from a wheel: the package sits in site-packages, no benchmarks beside."""
    from gntipc.cli import _bench as _cli_bench

    site = tmp_path / "lib" / "python3" / "site-packages" / "gntipc"
    site.mkdir(parents=True)
    monkeypatch.setattr(_cli_bench, "_PACKAGE", site)
    monkeypatch.delenv("GNTIPC_BENCHMARKS", raising=False)
    assert main(["bench", "--quick"]) == 3
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "the benchmarks are not available" in err and "not part of the wheel" in err
    assert "--dir" in err


def test_bench_dir_without_benchmarks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["bench", "--dir", str(tmp_path)]) == 3
    assert f"no run.py in {tmp_path} (--dir)" in capsys.readouterr().err
    monkeypatch.setenv("GNTIPC_BENCHMARKS", str(tmp_path))
    assert main(["bench"]) == 3
    assert f"no run.py in {tmp_path} (GNTIPC_BENCHMARKS)" in capsys.readouterr().err


def test_a_bad_backend_in_the_environment_is_named() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gntipc.cli", "info"],
        env=dict(os.environ, GNTIPC_BACKEND="foo"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "unknown backend 'foo' (GNTIPC_BACKEND) (expected one of xen, sim)" in proc.stderr


def test_bench_found_in_this_checkout() -> None:
    from gntipc.cli._bench import find_benchmarks

    found = find_benchmarks()
    assert found == Path(__file__).resolve().parents[1] / "benchmarks"
    assert (found / "run.py").is_file()


def test_bench_json_prints_the_saved_report(tmp_path: Path) -> None:
    """The plumbing of --json and the options, with a stand-in run.py that records its
    arguments (the real benchmarks need two idle CPUs for a minute)."""
    (tmp_path / "run.py").write_text(
        "import json, pathlib, sys\n"
        "print('table for', sys.argv[1:])\n"
        "out = pathlib.Path(__file__).parent / 'report.json'\n"
        "out.write_text(json.dumps({'argv': sys.argv[1:]}))\n"
        "print('saved', out)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gntipc.cli", "bench", "--quick", "--only", "latency", "--json",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"argv": ["--quick", "--only", "latency"]}
    assert "table for" in proc.stderr


def test_bench_failure_exits_1(tmp_path: Path) -> None:
    (tmp_path / "run.py").write_text("raise SystemExit(4)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gntipc.cli", "bench", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == "gntipc: the benchmarks failed (status 4)"


def test_listen_and_connect_with_progress() -> None:
    path = f"data/cli-progress/{os.getpid()}"
    up, down = os.urandom(200_000), os.urandom(50_000)
    server = gntipc(0, "listen", "4", path, stderr=subprocess.PIPE)
    client = gntipc(4, "connect", "0", path, "--progress", stderr=subprocess.PIPE)
    try:
        with ThreadPoolExecutor(2) as pool:
            on_server = pool.submit(server.communicate, down, 60)
            on_client = pool.submit(client.communicate, up, 60)
            (got_by_server, _), (got_by_client, err) = on_server.result(), on_client.result()
    finally:
        for p in (server, client):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert (got_by_server, got_by_client) == (up, down)
    assert client.returncode == 0, err
    text = err.decode()
    assert "sent" in text and "received" in text, text  # tqdm's bars (the test extra has it)


def test_progress_line_without_tqdm() -> None:
    import io

    from gntipc._progress import Progress

    out = io.StringIO()
    with Progress(out, bars=False) as progress:
        progress.add(sent=3 * 2**20)
        progress.add(received=1536)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sent 3.0 MiB (")  # the first add shows at once
    assert lines[-1].startswith("sent 3.0 MiB (") and "received 1.5 KiB (" in lines[-1]
    assert (progress.sent, progress.received) == (3 * 2**20, 1536)


def test_progress_bars_with_tqdm() -> None:
    import io

    pytest.importorskip("tqdm")
    from gntipc._progress import Progress

    out = io.StringIO()
    with Progress(out, bars=True) as progress:
        progress.add(sent=2**20, received=2**10)
    text = out.getvalue()
    assert "sent" in text and "received" in text and "1.00MB" in text, text


# ------------------------------------------------------ silent misconfiguration (#20) ---
def run(domid: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(domid))
    return subprocess.run(
        [sys.executable, "-m", "gntipc.cli", *args],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def end(*procs: subprocess.Popen[bytes]) -> None:
    """Kill what still runs; reap each process and close its pipes."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


def wait_until(done: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """A functional deadline: ``done()`` must become true (polled), whatever the speed."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def claimed(path: str) -> Callable[[], bool]:
    """Whether a listener of domain 0 holds ``path`` (its claim is readable by all)."""

    def check() -> bool:
        with get_backend("sim", domid=0) as b:
            return b.store.exists(f"/local/domain/0/{path}/gntipc-listener")

    return check


def test_listen_refuses_a_served_path_and_takes_over_from_a_crashed_listener() -> None:
    path = f"data/cli-twice/{os.getpid()}"
    started = [gntipc(0, "listen", "4", path)]
    try:
        first = started[0]
        wait_until(claimed(path), "the first listener claims its path")
        second = run(0, "listen", "4", path)
        assert second.returncode == 1
        assert second.stderr == (
            f"gntipc: [Errno 98] /local/domain/0/{path} is already served for domain 4 by a"
            f" gntipc listener in process {first.pid}: one listener per path (close that"
            " one first, or choose another path)\n"
        )
        end(first)  # a crash (SIGKILL): its claim (and keys) stay in the store
        third = gntipc(0, "listen", "4", path)
        started.append(third)
        client = gntipc(4, "connect", "0", path, "--timeout", "60")
        started.append(client)
        with ThreadPoolExecutor(2) as pool:
            on_server = pool.submit(third.communicate, b"", 60)
            on_client = pool.submit(client.communicate, b"after the crash", 60)
            assert on_server.result()[0] == b"after the crash"
            on_client.result()
        assert (third.returncode, client.returncode) == (0, 0)
    finally:
        end(*started)


def test_a_second_proxy_server_on_a_path_is_refused() -> None:
    path = f"data/cli-proxy-twice/{os.getpid()}"
    argv = [sys.executable, "-m", "gntipc.cli", "proxy", "-v", "--mode", "server", "4", path]
    env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID="0")
    first = Proc([*argv, "tcp:127.0.0.1:9"], env=env)
    try:
        first.expect("gntipc proxy: ready: ")
        second = Proc([*argv, "tcp:127.0.0.1:9"], env=env)
        try:
            assert second.wait() == 1
            assert second.output() == (
                f"gntipc: [Errno 98] /local/domain/0/{path} is already served for domain 4 by"
                f" a gntipc listener in process {first.proc.pid}: one listener per path"
                " (close that one first, or choose another path)"
            )
        finally:
            second.kill()
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait() == 0
    finally:
        first.kill()


def test_connect_to_a_path_served_for_another_domain_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = f"data/cli-other/{os.getpid()}"
    server = gntipc(0, "listen", "3", path)
    try:
        wait_until(claimed(path), "the listener claims its path")
        env = {"GNTIPC_SIM_DOMID": "1"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            code = main(["--backend", "sim", "connect", "0", path, "--timeout", "0.5"])
        assert code == 1
        assert capsys.readouterr().err == (
            f"gntipc: no gntipc server at /local/domain/0/{path} within 0.5 s: it is served"
            " for domain 3, not for us (domain 1)\n"
        )
    finally:
        end(server)


def test_connect_close_on_eof_exits_when_stdin_ends() -> None:
    # The server keeps its side open (its stdin stays open): by default the client would
    # wait for it; with --close-on-eof it sends EOF and exits.
    path = f"data/cli-eof/{os.getpid()}"
    server = gntipc(0, "listen", "4", path)
    try:
        client = gntipc(4, "connect", "--close-on-eof", "0", path, "--timeout", "60")
        client.communicate(b"bye", timeout=60)
        assert client.returncode == 0
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.read(3) == b"bye"
        server.stdin.close()
        assert server.wait(60) == 0
        assert server.stdout.read() == b""  # the client's EOF, then its close
    finally:
        end(server)


def test_connect_by_default_goes_on_after_its_stdin_ended() -> None:
    path = f"data/cli-no-eof/{os.getpid()}"
    server = gntipc(0, "listen", "4", path)
    client = gntipc(4, "connect", "0", path, "--timeout", "60")
    try:
        assert server.stdin is not None and server.stdout is not None
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"ping")
        client.stdin.close()  # our stdin ends; the server's side stays open
        assert server.stdout.read(4) == b"ping"
        server.stdin.write(b"pong")
        server.stdin.close()
        assert client.stdout.read() == b"pong"  # still copied after our stdin ended
        assert client.wait(60) == 0 and server.wait(60) == 0
    finally:
        end(server, client)


@pytest.mark.parametrize("command", ["listen", "connect"])
def test_close_on_eof_is_documented(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "-N, --close-on-eof exit when stdin ends, after sending EOF to the peer" in help_text
    assert "default: send EOF and go on copying the peer to stdout" in help_text


@pytest.mark.parametrize("socket_arg", ["udp:1234", "http://x", "TCP:80"])
def test_proxy_refuses_an_unknown_socket_scheme(
    socket_arg: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--backend", "sim", "proxy", "0", "data/x", socket_arg]) == 2
    scheme = socket_arg.split(":")[0]
    assert capsys.readouterr().err == (
        f"gntipc: proxy: unknown socket scheme {scheme!r} in {socket_arg!r} (SOCKET is PATH,"
        f" unix:PATH, tcp:HOST:PORT, tcp:PORT or -; a unix socket of that name:"
        f" ./{socket_arg}) (see gntipc proxy --help)\n"
    )
    assert list(tmp_path.iterdir()) == []  # no file named after it


def test_proxy_socket_errors_name_the_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["--backend", "sim", "proxy", "0", "data/x", f"tcp:{port}"]) == 1
    assert capsys.readouterr().err == (f"gntipc: tcp:127.0.0.1:{port}: Address already in use\n")
    missing = tmp_path / "no-such-dir" / "s.sock"
    assert main(["--backend", "sim", "proxy", "0", "data/x", str(missing)]) == 1
    assert capsys.readouterr().err == f"gntipc: unix:{missing}: No such file or directory\n"


@pytest.mark.parametrize("value", ["abc", "99999", "-1"])
def test_a_bad_sim_domid_in_the_environment_is_named(value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gntipc.cli", "--backend", "sim", "info"],
        env=dict(os.environ, GNTIPC_SIM_DOMID=value), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (
        f"gntipc: info: GNTIPC_SIM_DOMID={value!r} is not a domain id (a number, 0..32751)"
        " (see gntipc info --help)\n"
    )


def test_a_bad_sim_dir_in_the_environment_is_named(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for where, error in (
        (not_a_dir, "is not a directory"),
        (not_a_dir / "sub", ": Not a directory"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "gntipc.cli", "--backend", "sim", "info"],
            env=dict(os.environ, GNTIPC_SIM_DIR=str(where)), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1
        assert f"sim runtime dir '{where}' (GNTIPC_SIM_DIR)" in proc.stderr
        assert error in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_sim_page_limit_from_the_command_line() -> None:
    def doctor(*options: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "GNTIPC_SIM_PAGE_LIMIT"}
        return subprocess.run(
            [sys.executable, "-m", "gntipc.cli", "--backend", "sim", *options, "doctor"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    assert "page limit: 1024 pages per domain" in doctor().stdout
    assert "page limit: 77 pages per domain" in doctor("--sim-page-limit", "77").stdout
    bad = doctor("--sim-page-limit", "0")
    assert bad.returncode == 2 and "--sim-page-limit must be at least 1" in bad.stderr


def test_listen_and_connect_resume_across_a_killed_relay() -> None:
    # --resume on both sides: the relay between them is killed mid-transfer (both vchans
    # break), a new one starts, the client connects again and both sides replay what the
    # other missed: every byte arrives once, in order.
    path_a, path_b = f"data/cli-resume/{os.getpid()}/a", f"data/cli-resume/{os.getpid()}/b"
    env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID="5")

    def relay() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*RELAY, path_a, path_b], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"READY\n"
        return proc

    up, down = os.urandom(600_000), os.urandom(300_000)
    server = gntipc(0, "listen", "--resume", "5", path_b)
    relays = [relay()]
    client = gntipc(4, "connect", "--resume", "5", path_a, "--timeout", "30")
    assert server.stdin and server.stdout and client.stdin and client.stdout
    try:
        # A failure kills the processes first (the stack, left before the pool): the
        # reading threads then see EOF, and the pool's exit does not wait forever.
        with ThreadPoolExecutor(3) as pool, contextlib.ExitStack() as stack:

            def kill_all() -> None:
                for p in (server, client, *relays):
                    p.kill()

            stack.callback(kill_all)

            def read_all(f: object) -> bytes:
                return f.read()  # type: ignore[attr-defined,no-any-return]

            got_by_server = pool.submit(read_all, server.stdout)
            got_by_client = pool.submit(read_all, client.stdout)

            def feed_server() -> None:
                server.stdin.write(down)  # type: ignore[union-attr]
                server.stdin.close()  # type: ignore[union-attr]

            fed = pool.submit(feed_server)
            client.stdin.write(up[:300_000])
            client.stdin.flush()
            time.sleep(0.5)  # on its way through the relay
            relays[0].kill()
            relays[0].wait()
            relays.append(relay())
            client.stdin.write(up[300_000:])
            client.stdin.close()
            fed.result(60)
            assert got_by_server.result(60) == up
            assert got_by_client.result(60) == down
            stack.pop_all()  # all went well: let them exit on their own
        assert server.wait(60) == 0 and client.wait(60) == 0
    finally:
        for p in (server, client, *relays):
            end(p)
