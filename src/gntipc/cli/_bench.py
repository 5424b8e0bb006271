"""``gntipc bench``: run the benchmarks of a source checkout (``benchmarks/run.py``).

The benchmarks are a directory of the repository, not a part of the package: an install
from a wheel has none, and says so.  They are found next to the package's source
(``<checkout>/src/gntipc`` -> ``<checkout>/benchmarks``), or where ``--dir`` or
``$GNTIPC_BENCHMARKS`` says.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["EPILOG", "add_arguments", "find_benchmarks", "run"]

EPILOG = """\
The benchmarks compare gntipc with unix sockets, pipes, multiprocessing and pyzmq (the
"bench" extra: pip install 'gntipc[bench]') between two processes on the sim backend; a
full run takes about a minute and wants two idle CPUs.  Every run also saves its figures
to <benchmarks>/results/<UTC time>.json.  They ship with the source (git checkout), not
with the wheel: in an installed package, pass --dir or set GNTIPC_BENCHMARKS."""

_PACKAGE = Path(__file__).resolve().parent.parent


class BenchmarksMissing(Exception):
    """The benchmarks directory is not available (exit status 3)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``gntipc bench``."""
    p.add_argument("--quick", action="store_true", help="shorter runs: a smoke test")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the JSON report on stdout (the tables go to stderr)",
    )
    p.add_argument(
        "--only",
        metavar="SECTIONS",
        help="comma-separated subset of throughput,messages,latency,idle",
    )
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="the benchmarks directory (default: $GNTIPC_BENCHMARKS, else benchmarks/ of"
        " the source checkout gntipc runs from)",
    )


def find_benchmarks(explicit: str | None = None) -> Path:
    """The benchmarks directory (holding ``run.py``).

    Raises:
        BenchmarksMissing: none found; the message says where it looked and what to do.
    """
    given = explicit or os.environ.get("GNTIPC_BENCHMARKS") or None
    if given is not None:
        where = Path(given)
        if (where / "run.py").is_file():
            return where
        source = "--dir" if explicit else "GNTIPC_BENCHMARKS"
        raise BenchmarksMissing(
            f"no run.py in {where} ({source}): not a gntipc benchmarks directory"
        )
    # An editable install or a checkout on sys.path: <checkout>/src/gntipc.
    checkout = _PACKAGE.parent.parent
    where = checkout / "benchmarks"
    if (where / "run.py").is_file() and (checkout / "pyproject.toml").is_file():
        return where
    raise BenchmarksMissing(
        f"the benchmarks are not available: gntipc runs from {_PACKAGE}, not from a source"
        " checkout (they are not part of the wheel); clone the repository and run"
        " 'gntipc bench' from its .venv, or pass --dir CHECKOUT/benchmarks"
    )


def _command(args: argparse.Namespace, where: Path) -> list[str]:
    argv = [sys.executable, str(where / "run.py")]
    if args.quick:
        argv.append("--quick")
    if args.only:
        argv += ["--only", args.only]
    return argv


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks; the exit status (0, 1 when they failed, 3 when missing)."""
    try:
        where = find_benchmarks(args.dir)
    except BenchmarksMissing as exc:
        print(f"gntipc: {exc}", file=sys.stderr)
        return 3
    if importlib.util.find_spec("zmq") is None:
        print(
            "gntipc: the benchmarks need pyzmq (the bench extra: pip install 'gntipc[bench]')",
            file=sys.stderr,
        )
        return 3
    argv = _command(args, where)
    if not args.json:
        return _status(subprocess.run(argv, check=False).returncode)
    # The tables go to our stderr; the saved report's path comes on its last line.
    proc = subprocess.run(argv, check=False, stdout=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        return _status(proc.returncode)
    saved = [line[6:].strip() for line in proc.stdout.splitlines() if line.startswith("saved ")]
    if not saved:
        print("gntipc: the benchmarks printed no report path", file=sys.stderr)
        return 1
    report = Path(saved[-1])
    if not report.is_absolute():
        report = Path.cwd() / report
    sys.stdout.write(report.read_text())
    return 0


def _status(returncode: int) -> int:
    if returncode == 0:
        return 0
    print(f"gntipc: the benchmarks failed (status {returncode})", file=sys.stderr)
    return 1
