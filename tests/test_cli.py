"""The gntipc command, as a user runs it: two processes of different (simulated) domains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


# ------------------------------------------------------------ help and errors ---
COMMANDS = ["info", "listen", "connect", "proxy", "doctor", "bench", "sim-kill-domain"]


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


def test_missing_backend_exits_3_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    if os.path.exists("/dev/xen/gntdev"):
        pytest.skip("the xen backend is available here")
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


def test_doctor_xen_without_xen() -> None:
    if os.path.exists("/dev/xen/gntdev"):
        pytest.skip("running on Xen")
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
    from gntipc import _cli_bench

    site = tmp_path / "lib" / "python3" / "site-packages" / "gntipc"
    site.mkdir(parents=True)
    monkeypatch.setattr(_cli_bench, "_PACKAGE", site)
    monkeypatch.delenv("GNTIPC_BENCHMARKS", raising=False)
    assert main(["bench", "--quick"]) == 3
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "the benchmarks are not available" in err and "not part of the wheel" in err
    assert "--dir" in err


def test_bench_dir_without_benchmarks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dir", str(tmp_path)]) == 3
    assert f"no run.py in {tmp_path}" in capsys.readouterr().err


def test_bench_found_in_this_checkout() -> None:
    from gntipc._cli_bench import find_benchmarks

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
