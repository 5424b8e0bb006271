"""benchmarks/plot.py draws the committed benchmark report into a PNG."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the bench extra")

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "benchmarks" / "plot.py"
REPORT = ROOT / "benchmarks" / "results" / "20261201T024620Z.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_plot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PLOT), *args], capture_output=True, text=True, timeout=120
    )


def test_plot_writes_png(tmp_path: Path) -> None:
    res = run_plot(str(REPORT), "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "20261201T024620Z.png"
    assert res.stdout.strip() == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # three panels of bars and labels, not an empty canvas


def test_plot_section_subset_and_skipped_rows(tmp_path: Path) -> None:
    # a `--only latency` report with one skipped row (run.py saves it as null)
    report = json.loads(REPORT.read_text())
    latency = report["latency"]
    latency["rows"]["os.pipe"] = None
    subset = tmp_path / "latency-only.json"
    subset.write_text(json.dumps({"date": report["date"], "latency": latency}))
    res = run_plot(str(subset))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "latency-only.png").read_bytes().startswith(PNG_SIGNATURE)


AWAIT = "await put / async for, one at a time"
BATCHED = "put_many/get_many, 256 per batch"


def _rates(kind: str, mode: str, a: str, b: str, fa: float | None, fb: float) -> dict:
    rows = {
        a: None if fa is None else {"msgs_per_s": fa, "runs": [fa]},
        b: {"msgs_per_s": fb, "runs": [fb]},
    }
    label = AWAIT if mode == "await" else BATCHED
    return {"table": kind, "mode": mode, "label": label, "rows": rows}


# The comparison tables `_messages.section` appends to the message section (issue #18).
COMPARISONS = [
    _rates("session", "await", "over a SessionStream", "over the bare VchanStream", 4e4, 8e4),
    _rates("session", "batched", "over a SessionStream", "over the bare VchanStream", 9e5, 1e6),
    {
        "table": "rpc",
        "mode": "request/response",
        "label": "typed request, typed reply",
        "rows": {"rpc": {"p50_us": 30.0, "p99_us": 90.0}, "raw": {"p50_us": 15.0, "p99_us": 40.0}},
    },
    _rates("tcp", "await", "gntipc over anyio TCP", "pyzmq tcp://", None, 5e5),  # skipped
    _rates("tcp", "batched", "gntipc over anyio TCP", "pyzmq tcp://", 1e6, 3e6),
    {
        "table": "large",
        "mode": "await",
        "label": AWAIT,
        "rows": {"queue": {"mb_per_s": 3000.0}, "raw": {"mb_per_s": 9000.0}},
    },
]


def test_plot_draws_the_comparison_tables(tmp_path: Path) -> None:
    report = json.loads(REPORT.read_text())
    report["messages"] += COMPARISONS
    path = tmp_path / "comparisons.json"
    path.write_text(json.dumps(report))
    res = run_plot(str(path))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "comparisons.png").read_bytes().startswith(PNG_SIGNATURE)

    spec = importlib.util.spec_from_file_location("bench_plot", PLOT)
    assert spec is not None and spec.loader is not None
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    # the transport comparison keeps its own panel, without the new tables' rows
    names, series = plot.message_series(report)
    assert "over a SessionStream" not in names and len(series) == 2
    # one series per mode across the session and TCP tables; the skipped row is None
    names, series = plot.message_vs_series(report)
    assert names == [
        "over a SessionStream",
        "over the bare VchanStream",
        "gntipc over anyio TCP",
        "pyzmq tcp://",
    ]
    assert series == {AWAIT: [0.04, 0.08, None, 0.5], BATCHED: [0.9, 1.0, 1.0, 3.0]}
    assert plot.rpc_series(report) == (["rpc", "raw"], {"p50": [30.0, 15.0], "p99": [90.0, 40.0]})
    assert plot.large_message_series(report) == (["queue", "raw"], {AWAIT: [3000.0, 9000.0]})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "has no throughput, latency or message figures"),
        ("not json", "cannot read"),
        ("[1, 2]", "is not a benchmarks/run.py report"),
    ],
)
def test_plot_rejects_unusable_report(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = run_plot(str(bad))
    assert res.returncode == 1
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "bad.png").exists()


def test_plot_missing_report(tmp_path: Path) -> None:
    res = run_plot(str(tmp_path / "absent.json"))
    assert res.returncode == 1
    assert "cannot read" in res.stderr
