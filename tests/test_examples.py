"""Smoke tests of ``examples/``: each runs as a user runs it (``python examples/<name>.py``,
which starts the processes playing the VMs) on a simulated hypervisor of its own, and must
exit 0 and print its result line; nothing may be left behind in the runtime (checked by
the ``gntipc_sim`` fixture).  Functional deadlines only, never timing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gntipc.testing import SimRuntime

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(sim: SimRuntime, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]],
        env={**os.environ, **sim.env_vars()},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["rpc.py"], "rpc client: server stats {'calls': 133, 'cancelled': 2}, 2 cancels sent"),
        (["bulk_transfer.py", "--size", "8M"], "sent 8,388,608 bytes in"),
        (
            ["bulk_transfer.py", "--size", "3000001", "--zero-copy"],
            "zero-copy, checksum confirmed by the receiver",
        ),
        (["kv_store.py"], "16 clients at once, 50 keys each, all read back right; hits = 800"),
        (["socket_bridge.py"], "socket_bridge: ok: 4 HTTP downloads at once"),
        (["socket_bridge.py", "--mux"], "socket_bridge: ok: 4 HTTP downloads at once"),
        (["demo.py", "--count", "20000"], "consumer: 20000 readings from 16 sensors"),
        (
            ["resilient_sensor.py"],
            "6000 readings, each once, in order, through 2 restores and 2 restarts",
        ),
    ],
    ids=lambda v: "-".join(v).replace(".py", "") if isinstance(v, list) else "",
)
def test_example(gntipc_sim: SimRuntime, args: list[str], expected: str) -> None:
    proc = run(gntipc_sim, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expected in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr


def test_bulk_transfer_of_a_file(gntipc_sim: SimRuntime, tmp_path: Path) -> None:
    """A file of ours arrives whole, where we asked (--output passes to the receiver)."""
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 * 2**20 + 1))
    out = tmp_path / "out"
    out.mkdir()
    proc = run(gntipc_sim, "bulk_transfer.py", "--file", str(source), "--output", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checksum confirmed by the receiver" in proc.stdout
    assert (out / "source.bin").read_bytes() == source.read_bytes()
    # the progress: a tqdm bar when tqdm is installed (the test extra has it), else a line
    assert "3.0 of 3.0 MiB (100 %)" in proc.stderr or "100%|" in proc.stderr, proc.stderr


def test_failure_is_one_line_per_process(gntipc_sim: SimRuntime, tmp_path: Path) -> None:
    """The sender fails at once: its error in one line, the scenario's in another, and
    the receiver (still waiting for it) is stopped."""
    proc = run(gntipc_sim, "bulk_transfer.py", "--file", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"bulk_transfer client: FileNotFoundError: [Errno 2] No such file or directory: "
        f"'{tmp_path / 'missing'}'",
        "bulk_transfer: the client failed (exit status 1)",
    ]


def test_role_needs_peer(gntipc_sim: SimRuntime) -> None:
    proc = run(gntipc_sim, "rpc.py", "server")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith("error: a role needs --peer")


# The examples with a role per VM; socket_bridge runs gntipc proxy, its docstring says how.
ROLE_EXAMPLES = ["demo.py", "rpc.py", "bulk_transfer.py", "kv_store.py"]


def _undocumented(help_text: str) -> list[str]:
    """The arguments that ``--help`` lists without a help text."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(r"  [-{]", line) and not re.match(r"  \S.*?\s{2,}\S", line):
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if not re.match(r" {8,}\S", following):
                missing.append(line.strip())
    return missing


@pytest.mark.parametrize("name", ROLE_EXAMPLES)
def test_help_alone(tmp_path: Path, name: str) -> None:
    """A copy of the example alone (no _launch.py beside it) runs: the part a user copies
    into a VM is self-contained; its --help says how to run each side in a VM and what
    every option does."""
    copy = tmp_path / name
    shutil.copy(EXAMPLES / name, copy)
    proc = subprocess.run(
        [sys.executable, str(copy), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    sides = re.findall(rf"python examples/{name} (\w+) --peer \d+ .*# in domain \d+", proc.stdout)
    assert len(sides) == 2, proc.stdout
    assert _undocumented(proc.stdout) == [], proc.stdout


def test_socket_bridge_help() -> None:
    """socket_bridge runs gntipc proxy: its --help gives each VM's commands."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "socket_bridge.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "domain 0:  python -m http.server" in proc.stdout
    assert "domain 5:  gntipc proxy 0" in proc.stdout
    assert _undocumented(proc.stdout) == [], proc.stdout
