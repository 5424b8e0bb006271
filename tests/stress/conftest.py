"""Stress tests (issue 10): chaos (``test_chaos``), a hostile-peer fuzzer
(``test_fuzz``), a leak soak (``test_soak``) and exhaustion (``test_exhaustion``);
``test_found_bugs`` pins what they found.  Every test adds its counts to one table,
printed at the end of the run.

Knobs (environment):

``GNTIPC_STRESS``        ``short`` (default: ``make test``), ``medium``, ``full`` (``make
                         stress``; ``make stress STRESS=medium``)
``GNTIPC_STRESS_SCALE``  multiplies every size of the level (kills, operations, cycles,
                         lanes, timeouts), e.g. 0.2 for a quick look
``GNTIPC_STRESS_ASAN``   ``0``: run the fuzzer's target without AddressSanitizer
``GNTIPC_STRESS_KEEP``   keep the chaos logs (``/tmp/gntipc-chaos-*``) of a passing run
``GNTIPC_STRESS_SRC``    the gntipc source tree the worker processes import
"""

from __future__ import annotations

import pytest

from ._common import LEVEL
from ._report import REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    table = REPORT.table()
    if table:
        terminalreporter.section(f"gntipc stress counts (level {LEVEL})")
        terminalreporter.write_line(table)
