"""Resumable pipes under fire (issue 23): bytes through ``gntipc connect --resume`` /
``listen --resume`` while the sender's domain is restored under a new domid again and
again (``restore_domain``: what ``xl save`` + ``xl restore`` do); the bytes' sha256
equal.  Real processes, sim only."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

from gntipc.testing import SimRuntime
from gntipc.vm import vm_of_domain

from ._common import by_level, worker_env
from ._report import REPORT

#: The VM of the sender (restored under new domids).
VM = "5e55e55e-0000-4000-8000-000000000023"
CLI_PATH = "data/resume-cli"


def _wait_for(path: Path, size: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while path.stat().st_size < size:
        assert proc.poll() is None, f"the sender ended (status {proc.returncode})"
        assert time.monotonic() < deadline, f"stuck at {path.stat().st_size} of {size} bytes"
        time.sleep(0.01)


def test_bytes_through_the_cli_survive_restores_of_the_sender(
    gntipc_sim: SimRuntime, tmp_path: Path
) -> None:
    size = by_level(16, 64, 200) << 20
    restores = by_level(2, 8, 20)
    chunk = 1 << 18
    data = random.Random(size).randbytes(size)
    out = tmp_path / "out"
    gntipc = [sys.executable, "-m", "gntipc.cli"]
    domid = 5
    sender = subprocess.Popen(
        [*gntipc, "connect", "--resume", "--give-up", "120", "--close-on-eof", "0", CLI_PATH],
        env=worker_env(domid, GNTIPC_SIM_VM_UUID=VM),
        stdin=subprocess.PIPE,
    )
    assert sender.stdin is not None
    listener = None
    try:
        # The listener follows the sender's VM once it knows it: start it when the
        # sender's domain is up (the sender waits for the listener's keys meanwhile).
        dom0 = gntipc_sim.backend(0)
        deadline = time.monotonic() + by_level(240, 900, 3600)
        while vm_of_domain(dom0.store, domid) != VM:
            assert time.monotonic() < deadline and sender.poll() is None, "no sender"
            time.sleep(0.05)
        with open(out, "wb") as sink:
            listener = subprocess.Popen(
                [*gntipc, "listen", "--resume", "--give-up", "120", str(domid), CLI_PATH],
                env=worker_env(0),
                stdin=subprocess.DEVNULL,
                stdout=sink,
            )
        # Restores at random points of the stream, each while the chunk before it is in
        # flight, once the pipe has moved on since the last (the sender resumed).
        points = set(random.Random(23).sample(range(2, size // chunk - 1), restores))
        done = 0
        for k in range(size // chunk):
            sender.stdin.write(data[k * chunk : (k + 1) * chunk])
            sender.stdin.flush()
            if k in points:
                _wait_for(out, (k - 1) * chunk, sender, deadline)
                domid = gntipc_sim.restore_domain(domid)
                done += 1
        sender.stdin.close()
        assert sender.wait(60) == 0
        assert listener.wait(60) == 0
    finally:
        for proc in (listener, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    same = hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    REPORT.add(
        "resume",
        "CLI MB / restores of the sender",
        f"{size >> 20} / {done}",
        f"- / {restores}",
        done == restores,
    )
    REPORT.add("resume", "CLI sha256", "equal" if same else "DIFFERENT", "equal", same)
    assert done == restores
    assert same
