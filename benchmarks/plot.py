"""Draw a PNG chart from a ``benchmarks/run.py`` JSON report (``make bench`` calls it).

    .venv/bin/python benchmarks/plot.py [REPORT.json] [--out-dir DIR]

Without REPORT, the newest ``benchmarks/results/*.json``.  The chart is written beside the
report as ``<same name>.png`` (or into ``--out-dir``) and its path printed.  One panel per
section present in the report: throughput (MB/s) by transport and ring size, round-trip
latency (p50 and p99, µs) by transport, typed-message rates (msgs/s) by transport, one at a
time and batched; then the message section's comparison tables (issue #18), when present:
the queue over a SessionStream and over TCP vs the bare vchan and pyzmq (msgs/s, per
mode), request/response vs the raw round trip (p50 and p99, µs), and 1 MiB messages vs
raw sends (MB/s).  A row that the run skipped (no figure) is left out of its panel.

Needs matplotlib (the ``bench`` extra).  Exit status: 0 written, 1 no usable report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
KiB = 1024


class ReportError(Exception):
    """The report is missing or has nothing to draw."""


def newest_report(results: Path = RESULTS) -> Path:
    """The newest ``*.json`` in ``results`` (the names are UTC timestamps, so by name)."""
    reports = sorted(results.glob("*.json"))
    if not reports:
        raise ReportError(f"no *.json report in {results}: run `make bench` first")
    return reports[-1]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mega(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else number / 1e6


def _ring_label(ring: int) -> str:
    return f"{ring // (KiB * KiB)} MiB ring" if ring >= KiB * KiB else f"{ring // KiB} KiB ring"


def _per_section(
    sections: list[dict[str, Any]],
    series_label: Callable[[dict[str, Any]], str],
    figure: Callable[[Any], float | None],
) -> tuple[list[str], dict[str, list[float | None]]]:
    """Transports in report order (every section's rows) and one series per distinct
    ``series_label(section)`` (sections with the same label share one): ``figure(row)``
    for each transport (None where no such section has it or it was skipped)."""
    names: list[str] = []
    for section in sections:
        names += [n for n in section.get("rows", {}) if n not in names]
    series: dict[str, list[float | None]] = {}
    for section in sections:
        rows = section.get("rows", {})
        values = series.setdefault(series_label(section), [None] * len(names))
        for i, name in enumerate(names):
            if name in rows:
                values[i] = figure(rows[name] or {})
    return names, series


def throughput_series(report: dict[str, Any]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Transports (in report order) and, per ring size, each one's best MB/s (None: skipped)."""
    return _per_section(
        report.get("throughput") or [],
        lambda section: _ring_label(int(section["ring"])),
        lambda row: _number((row.get("best") or {}).get("mb_per_s")),
    )


def _percentiles(rows: dict[str, Any]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Transports and their p50 and p99 round-trip times in µs (None: skipped)."""
    names = list(rows)
    series = {
        label: [_number((rows[n] or {}).get(key)) for n in names]
        for label, key in (("p50", "p50_us"), ("p99", "p99_us"))
    }
    return names, series


def latency_series(report: dict[str, Any]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Transports and their p50 and p99 round-trip times in µs (None: skipped)."""
    return _percentiles((report.get("latency") or {}).get("rows") or {})


def _message_tables(report: dict[str, Any], *kinds: str | None) -> list[dict[str, Any]]:
    """The message section's tables of these kinds (their ``table`` key): None is the
    transport comparison (one table per mode, no ``table`` key, as in every report)."""
    tables = report.get("messages") or []
    return [t for t in tables if isinstance(t, dict) and t.get("table") in kinds]


def _label(section: dict[str, Any]) -> str:
    return str(section.get("label", ""))


def message_series(report: dict[str, Any]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Transports and, per message mode (one at a time, batched), their millions of msgs/s."""
    return _per_section(
        _message_tables(report, None), _label, lambda row: _mega(row.get("msgs_per_s"))
    )


def message_vs_series(report: dict[str, Any]) -> tuple[list[str], dict[str, list[float | None]]]:
    """The queue over a SessionStream vs the bare vchan, and over TCP vs pyzmq: millions
    of msgs/s per mode."""
    return _per_section(
        _message_tables(report, "session", "tcp"),
        _label,
        lambda row: _mega(row.get("msgs_per_s")),
    )


def rpc_series(report: dict[str, Any]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Request/response vs the raw round trip: p50 and p99 in µs."""
    tables = _message_tables(report, "rpc")
    return _percentiles((tables[-1].get("rows") or {}) if tables else {})


def large_message_series(
    report: dict[str, Any],
) -> tuple[list[str], dict[str, list[float | None]]]:
    """1 MiB messages through the queue vs raw sends: MB/s of payload."""
    return _per_section(
        _message_tables(report, "large"), _label, lambda row: _number(row.get("mb_per_s"))
    )


def _drop_empty(
    names: list[str], series: dict[str, list[float | None]]
) -> tuple[list[str], dict[str, list[float | None]]]:
    """Leave out transports with no figure in any series (skipped rows)."""
    keep = [i for i in range(len(names)) if any(v[i] is not None for v in series.values())]
    return [names[i] for i in keep], {k: [v[i] for i in keep] for k, v in series.items()}


def _bars(
    ax: Any,
    title: str,
    unit: str,
    names: Sequence[str],
    series: dict[str, list[float | None]],
    fmt: str,
) -> None:
    """Grouped horizontal bars: one group per transport, one bar per series, values printed."""
    height = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(len(names))]
        xs = [0.0 if v is None else v for v in values]
        bars = ax.barh(ys, xs, height=height, label=label)
        ax.bar_label(bars, labels=["" if v is None else format(v, fmt) for v in values],
                     padding=2, fontsize=7)
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.xaxis.set_major_formatter("{x:,.0f}" if fmt.endswith("0f") else "{x:g}")
    ax.legend(fontsize=8, loc="best")


def plot(report_path: Path, out_dir: Path | None = None) -> Path:
    """Draw the chart of ``report_path``; return the PNG's path."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {report_path}: {exc}") from None
    if not isinstance(report, dict):
        raise ReportError(f"{report_path} is not a benchmarks/run.py report")

    panels = []
    for title, unit, fmt, (names, series) in (
        ("Throughput, 64 KiB sends (best of the runs)", "MB/s", ",.0f",
         throughput_series(report)),
        ("Round trip of 64 bytes", "µs (lower is better)", ".1f", latency_series(report)),
        ("Typed 64-byte messages", "million messages/s", ".2f", message_series(report)),
        ("Typed 64-byte messages: a Session stream vs the bare vchan; TCP, gntipc vs pyzmq",
         "million messages/s", ".2f", message_vs_series(report)),
        ("Typed request/response vs the raw 64-byte round trip", "µs (lower is better)",
         ".1f", rpc_series(report)),
        ("1 MiB typed messages vs raw 1 MiB sends", "MB/s of payload", ",.0f",
         large_message_series(report)),
    ):
        names, series = _drop_empty(names, series)
        if names:
            panels.append((title, unit, fmt, names, series))
    if not panels:
        raise ReportError(f"{report_path} has no throughput, latency or message figures")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    heights = [1.0 + 0.22 * len(p[3]) * max(len(p[4]), 1) for p in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, sum(heights) + 0.8),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )
    for ax, (title, unit, fmt, names, series) in zip(axes[:, 0], panels, strict=True):
        _bars(ax, title, unit, names, series, fmt)
    machine = report.get("machine") or {}
    fig.suptitle(
        f"gntipc benchmarks, {report.get('date', '?')}: {report.get('backend', '?')} backend,"
        f" {machine.get('cpu_count', '?')} x {machine.get('cpu_model', '?')}"
        + (" (--quick)" if report.get("quick") else ""),
        fontsize=10,
    )
    # Leave the top half inch to the title: tight_layout alone lets it overlap the
    # first panel's title.
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.5 / (sum(heights) + 0.8)))
    out = (out_dir if out_dir is not None else report_path.parent) / f"{report_path.stem}.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc}") from None
    finally:
        plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", nargs="?", type=Path,
                    help="a JSON report (default: the newest in benchmarks/results/)")
    ap.add_argument("--out-dir", type=Path, help="where to write the PNG (default: beside it)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot.py: matplotlib is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    try:
        out = plot(args.report if args.report is not None else newest_report(), args.out_dir)
    except ReportError as exc:
        print(f"plot.py: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
