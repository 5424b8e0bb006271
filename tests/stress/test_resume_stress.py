"""Resumable sessions under fire (issue 23): a producer in dom0 streams typed messages to
a consumer VM whose domain is restored under a new domid again and again
(``restore_domain``: what ``xl save`` + ``xl restore`` do) and whose process is SIGKILLed
and started again from its persisted position; and bytes through ``gntipc connect
--resume`` / ``listen --resume`` while the sender's domain is restored.  Every message
exactly once, in order; the bytes' sha256 equal; memory of both sides bounded.  Real
processes, sim only."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gntipc.testing import SimRuntime
from gntipc.vm import vm_of_domain

from ._common import by_level, worker_env
from ._report import REPORT
from ._resume_worker import REPORT_EVERY, digest_of

#: The restored VM of both tests.
VM = "5e55e55e-0000-4000-8000-000000000023"
#: Peak resident memory either side may reach (KiB): a window of messages, not the stream.
MAX_RSS_KB = 150_000
CLI_PATH = "data/resume-cli"


def _start(sim: SimRuntime, domid: int, *args: str, vm: str | None = None) -> subprocess.Popen[str]:
    env = worker_env(domid)  # (the runtime: this process's GNTIPC_SIM_DIR)
    if vm is not None:
        env["GNTIPC_SIM_VM_UUID"] = vm
    return subprocess.Popen(
        [sys.executable, "-m", "stress._resume_worker", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"the {what} ended (status {proc.wait()}) instead of reporting")
    return line.strip()


@pytest.mark.parametrize("restored", ["consumer", "producer"])
def test_messages_exactly_once_through_restores_and_consumer_kills(
    gntipc_sim: SimRuntime, tmp_path: Path, restored: str
) -> None:
    """``restored``: whose VM is restored (the other side is in dom0); the consumer
    process is the one killed, either way."""
    count = by_level(20_000, 200_000, 1_000_000)
    restores = by_level(2, 8, 20)
    kills = by_level(2, 8, 20)
    rng = random.Random(23)
    # Events at random points (in messages received), restores and kills interleaved.
    points = sorted(
        rng.sample(range(REPORT_EVERY, count - REPORT_EVERY, REPORT_EVERY), restores + kills)
    )
    kinds = ["restore"] * restores + ["kill"] * kills
    rng.shuffle(kinds)
    events = list(zip(points, kinds, strict=True))
    state = tmp_path / "consumer.state"
    path = "data/resume-stress"
    domid = 5
    # The restored side plays the VM (domain 5, then each new domid), the other dom0.
    in_vm = {"producer": restored == "producer", "consumer": restored == "consumer"}

    def start(role: str, *args: str) -> subprocess.Popen[str]:
        if in_vm[role]:
            return _start(gntipc_sim, domid, role, restored, VM, *args, vm=VM)
        return _start(gntipc_sim, 0, role, restored, VM, *args)

    producer = start("producer", path, str(count))
    consumer = None
    max_rss = 0
    try:
        assert _line(producer, "producer") == "serving"
        consumer = start("consumer", path, str(state))
        done_restores = done_kills = 0
        deadline = time.monotonic() + by_level(240, 900, 3600)
        while True:
            line = _line(consumer, "consumer")
            if line.startswith("done"):
                break
            at = int(line.split()[1])
            while events and events[0][0] <= at:
                _, kind = events.pop(0)
                if kind == "restore":  # the VM's processes run on
                    domid = gntipc_sim.restore_domain(domid)
                    done_restores += 1
                else:
                    consumer.kill()
                    consumer.wait()
                    assert consumer.stdout is not None
                    consumer.stdout.close()
                    consumer = start("consumer", path, str(state))
                    done_kills += 1
            assert time.monotonic() < deadline, f"no end within the deadline (at {at})"
        _, received, digest, rss = line.split()
        max_rss = int(rss)
        end = _line(producer, "producer").split()
        assert end[0] == "done"
        resumes, max_rss = int(end[1]), max(max_rss, int(end[2]))
        assert consumer.wait(30) == 0 and producer.wait(30) == 0
    finally:
        for proc in (producer, consumer):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
    exact = int(received) == count and digest == digest_of(count)
    part = f"resume ({restored}'s VM restored)"
    REPORT.add(
        part, "messages received / sent", f"{received} / {count}", "equal", int(received) == count
    )
    REPORT.add(
        part, "each once, in order (digest)", "equal" if exact else "DIFFERENT", "equal", exact
    )
    REPORT.add(
        part,
        "domain restores / consumer kills / resumes",
        f"{done_restores} / {done_kills} / {resumes}",
        f"{restores} / {kills} / > 0",
        (done_restores, done_kills) == (restores, kills) and resumes > 0,
    )
    REPORT.add(
        part,
        "peak RSS of a side, MB",
        max_rss / 1000,
        f"<= {MAX_RSS_KB / 1000:g}",
        max_rss <= MAX_RSS_KB,
    )
    assert exact
    assert (done_restores, done_kills) == (restores, kills)
    assert resumes > 0  # (a kill while the session is down shares its resume)
    assert max_rss <= MAX_RSS_KB


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
