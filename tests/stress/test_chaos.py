"""Chaos: producer/consumer process pairs streaming bytes and typed messages while a
random peer is SIGKILLed at random moments, beside steady sessions that are never killed
and must keep moving (see ``_chaos``)."""

from __future__ import annotations

import os
import shutil

import pytest

from ._chaos import Chaos
from ._common import LEVEL, by_level
from ._report import REPORT

#: The longest acceptable time from SIGKILL to the survivor's error.
MAX_DETECTION = 2.0
#: The longest a steady session may go without receiving anything (a stall: a hang).
PROGRESS_AFTER = 10.0


def test_chaos_kills() -> None:
    kills = by_level(60, 300, 1000)
    chaos = Chaos(
        kills=kills,
        lanes=by_level(3, 4, 4),
        msgs_lanes=1,
        steady_lanes=2,
        seed=len(LEVEL),
        progress_after=PROGRESS_AFTER,
        time_limit=by_level(60, 600, 2400),
    )
    res = chaos.run()
    part = "chaos"
    ok_det = res.detection_ms(100) <= MAX_DETECTION * 1000
    REPORT.add(
        part,
        "kills (by victim phase)",
        f"{res.kills} {dict(res.phases)}",
        f">= {kills}",
        res.kills >= kills,
    )
    REPORT.add(
        part,
        "sessions / MB / msgs moved",
        f"{res.sessions} / {res.bytes_moved / 1e6:.0f} / {res.msgs_moved}",
    )
    REPORT.add(part, "hangs", res.hangs, "0", res.hangs == 0)
    ok_steady = res.steady_sessions >= 4 and res.steady_max_gap <= PROGRESS_AFTER
    REPORT.add(
        part,
        "steady sessions (both ends) / units / longest stall s",
        f"{res.steady_sessions} / {res.steady_units} / {res.steady_max_gap:.2f}",
        f">= 4 / - / <= {PROGRESS_AFTER:g}",
        ok_steady,
    )
    REPORT.add(part, "bytes lost", res.lost_bytes, "0", res.lost_bytes == 0)
    REPORT.add(part, "messages lost", res.lost_msgs, "0", res.lost_msgs == 0)
    REPORT.add(part, "bytes corrupted", res.corrupted_bytes, "0", res.corrupted_bytes == 0)
    REPORT.add(part, "messages corrupted", res.corrupted_msgs, "0", res.corrupted_msgs == 0)
    REPORT.add(
        part,
        "detection ms p50/p99/max (n)",
        f"{res.detection_ms(50):.1f} / {res.detection_ms(99):.1f} / {res.detection_ms(100):.1f}"
        f" ({len(res.detection)})",
        f"max <= {MAX_DETECTION * 1000:.0f}",
        ok_det,
    )
    for t, note in sorted(res.slow_notes, reverse=True)[:3]:
        REPORT.add(part, f"  slow detection {t * 1000:.0f} ms", note)
    REPORT.add(
        part,
        "crashes (announced writer) seen as EndOfStream",
        res.crash_as_eof,
        "0",
        res.crash_as_eof == 0,
    )
    for note in res.crash_as_eof_notes[:2]:
        REPORT.add(part, "  e.g.", note)
    REPORT.add(
        part,
        "  writer killed before it announced itself, seen as EndOfStream",
        res.eof_before_announce,
        "documented",
    )
    REPORT.add(part, "worker errors", res.errors, "0", res.errors == 0)
    REPORT.add(part, "sessions never ended", res.unfinished, "0", res.unfinished == 0)
    REPORT.add(part, "receivers closed under them", res.closed_under, "0", res.closed_under == 0)
    # Orphan runtime files (bug 2 before 407cabd) are leftovers like any other.
    REPORT.add(part, "leftovers", len(res.leftovers), "0", not res.leftovers)
    for name in res.leftovers[:5]:
        REPORT.add(part, "  e.g.", name)
    REPORT.add(part, "seconds", res.seconds)
    problems = [
        *res.hang_notes,
        *res.loss_notes[:20],
        *res.error_notes[:20],
        *res.crash_as_eof_notes[:20],
        *res.closed_under_notes[:20],
        *res.leftovers[:20],
    ]
    assert res.kills >= kills, problems
    assert res.hangs == 0, problems
    assert res.lost_bytes == 0 and res.lost_msgs == 0, problems
    assert res.corrupted_bytes == 0 and res.corrupted_msgs == 0, problems
    assert res.errors == 0, problems
    assert res.unfinished == 0, problems
    assert res.crash_as_eof == 0, problems
    assert res.closed_under == 0, problems
    assert not res.leftovers, problems
    assert ok_steady, (res.steady_sessions, res.steady_max_gap, problems)
    assert res.detection and ok_det, sorted(res.detection)[-10:]
    if not os.environ.get("GNTIPC_STRESS_KEEP"):
        shutil.rmtree(chaos.dir, ignore_errors=True)  # the logs, kept when a check fails


pytestmark = pytest.mark.timeout(by_level(120, 900, 3600))
