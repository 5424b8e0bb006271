"""Hostile-peer fuzzer: a peer that rewrites the shared control page and the rings at
random moments (``_fuzz_hostile``) against our side doing random operations of every
API (``_fuzz_target``), with the native core built with AddressSanitizer.

Our side may only raise documented errors (or see a closed channel): no crash, no
out-of-bounds access, no operation past its deadline, no unbounded memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from gntipc.backends.sim import SimBackend

from . import _asan
from ._common import LEVEL, by_level, leftovers, reap, residue, spawn, worker_env
from ._fuzz_hostile import HOSTILE_DOM, TARGET_DOM
from ._report import REPORT

#: RSS growth of a target process that counts as unbounded memory.
MAX_RSS_GROWTH = 128 << 20


def asan_lib() -> tuple[str | None, str]:
    if os.environ.get("GNTIPC_STRESS_ASAN", "1") == "0":
        return None, "disabled by GNTIPC_STRESS_ASAN=0"
    return _asan.build()


def test_asan_is_armed() -> None:
    """The instrumented ring copy reports a deliberate heap overflow (else a clean fuzz
    run under ASan would prove nothing)."""
    lib, why = asan_lib()
    if lib is None:
        REPORT.add("fuzz", "AddressSanitizer", f"not used: {why}", "armed", LEVEL == "short")
        if LEVEL != "short":
            pytest.fail(f"AddressSanitizer not available: {why}")
        pytest.skip(why)
    for probe, report in (
        ("probe", "heap-buffer-overflow"),  # past a Python buffer
        ("probe-in-page", "use-after-poison"),  # past an in-page ring (poisoned bytes)
    ):
        r = subprocess.run(
            [sys.executable, "-m", "stress._asan", probe],
            env=worker_env(TARGET_DOM, **_asan.env(lib)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        armed = f"ERROR: AddressSanitizer: {report}" in r.stderr
        REPORT.add(
            "fuzz", f"ASan probe: {report}", "caught" if armed else "MISSED", "caught", armed
        )
        assert armed, (r.returncode, r.stdout, r.stderr[-2000:])


@dataclass
class FuzzResult:
    ops: int = 0
    episodes: int = 0
    poisoned_pages: int = 0
    failure_count: int = 0
    failures: list[str] = field(default_factory=list)
    hangs: int = 0
    crashes: int = 0
    asan_reports: int = 0
    rss_growth: int = 0
    slow: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    tmp: str = ""


def run_fuzz(total_ops: int, lib: str | None, seed: int) -> FuzzResult:
    """Two pairs (our side as client and as server), each a hostile peer and a target
    doing ``total_ops / 2`` operations."""
    out = FuzzResult(tmp=tempfile.mkdtemp(prefix="gntipc-fuzz-"))
    stop = os.path.join(out.tmp, "stop")
    sim = os.path.join(out.tmp, "sim")  # a runtime of our own
    extra = dict(_asan.env(lib) if lib else {}, GNTIPC_SIM_DIR=sim)
    pin = SimBackend(0, runtime_dir=sim)  # keeps the runtime (and its evidence) alive
    pairs = []
    for i, target_role in enumerate(("client", "server")):
        hostile_role = "server" if target_role == "client" else "client"
        home = HOSTILE_DOM if hostile_role == "server" else TARGET_DOM
        path = f"/local/domain/{home}/data/fuzz/{os.getpid()}-{seed}/{i}"
        hostile = spawn(
            "_fuzz_hostile",
            [hostile_role, path, str(seed * 100 + i), stop],
            HOSTILE_DOM,
            stderr_path=os.path.join(out.tmp, f"hostile{i}.err"),
            GNTIPC_SIM_DIR=sim,
        )
        result = os.path.join(out.tmp, f"target{i}.json")
        err = os.path.join(out.tmp, f"target{i}.err")
        target = spawn(
            "_fuzz_target",
            [target_role, path, str(seed * 100 + 50 + i), str(total_ops // 2), result],
            TARGET_DOM,
            stderr_path=err,
            **extra,
        )
        pairs.append((target_role, hostile, target, result, err))
    # Generous: a target that stops making progress kills itself (faulthandler) first.
    deadline = time.monotonic() + 120 + total_ops / (50 if lib else 200)
    try:
        for role, _h, target, result, err in pairs:
            try:
                target.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out.hangs += 1
                reap(target)
            with open(err, errors="replace") as f:
                stderr = f.read()
            n_asan = stderr.count("ERROR: AddressSanitizer")
            out.asan_reports += n_asan
            if target.returncode != 0:
                if "Timeout (0:" in stderr:  # faulthandler's dump_traceback_later
                    out.hangs += 1
                elif not n_asan:
                    out.crashes += 1
                out.failures.append(f"target ({role}) exited {target.returncode}: {stderr[-4000:]}")
                continue
            with open(result) as f:
                res = json.load(f)
            out.ops += res["ops"]
            out.episodes += res["episodes"]
            out.poisoned_pages += res["poisoned_pages"]
            out.failure_count += res["failure_count"]
            out.failures += res["failures"]
            out.slow += res["slow"]
            out.rss_growth = max(out.rss_growth, res["rss_growth"])
            out.outcomes.update(res["outcomes"])
            if res["leftovers"]:
                out.leftovers.append(res["leftovers"])
    finally:
        with open(stop, "w"):
            pass
        for _r, hostile, target, _res, _err in pairs:
            try:
                hostile.wait(15)
            except subprocess.TimeoutExpired:
                reap(hostile)
            reap(target)
    try:
        rows, files = residue(pin)
        out.leftovers += rows + [f"stray file {f}" for f in files]
    finally:
        pin.close()
    out.leftovers += leftovers(sim)
    return out


def test_hostile_peer_fuzz() -> None:
    lib, _why = asan_lib()
    total = by_level(12_000, 200_000, 1_000_000)
    t0 = time.monotonic()
    res = run_fuzz(total, lib, seed=len(LEVEL))
    seconds = time.monotonic() - t0
    part = "fuzz"
    REPORT.add(part, "fuzzed operations", res.ops, f">= {total}", res.ops >= total)
    REPORT.add(part, "episodes (connections)", res.episodes)
    REPORT.add(
        part,
        "C core built with ASan (control pages poisoned)",
        f"yes ({res.poisoned_pages})" if lib else "no",
        "yes",
    )
    top = ", ".join(f"{k} {v}" for k, v in res.outcomes.most_common(5))
    REPORT.add(part, "outcomes", top + ", ...")
    for name, value in (
        ("undocumented errors", res.failure_count),
        ("crashes", res.crashes),
        ("ASan reports", res.asan_reports),
        ("hangs (op past deadline)", res.hangs),
        ("operations over 1 s", len(res.slow)),
        ("leftovers", len(res.leftovers)),
    ):
        REPORT.add(part, name, value, "0", value == 0)
    growth = res.rss_growth
    REPORT.add(part, "max RSS growth MiB", growth / 2**20, "< 128", growth < MAX_RSS_GROWTH)
    REPORT.add(part, "seconds", seconds)
    assert not res.failures and res.failure_count == 0, "\n\n".join(res.failures[:5])
    assert res.hangs == 0 and res.crashes == 0 and res.asan_reports == 0
    assert not res.slow, res.slow
    assert growth < MAX_RSS_GROWTH
    assert not res.leftovers, res.leftovers
    assert res.ops >= total
    shutil.rmtree(res.tmp, ignore_errors=True)


# The run's own deadline allows 50 operations/s under ASan (run_fuzz): the full level's
# 10^6 operations may take hours on a small machine, so pytest's limit follows it.
pytestmark = pytest.mark.timeout(by_level(180, 1800, 21600))
