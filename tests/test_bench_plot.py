"""benchmarks/plot.py draws the committed benchmark report into a PNG."""

from __future__ import annotations

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
