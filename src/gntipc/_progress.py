"""Progress of a long transfer on standard error (``gntipc connect/listen --progress``):
bytes each way and their rates, as two tqdm bars when tqdm is installed (the optional
``progress`` extra), else as one status line rewritten in place (one line every
half-second when standard error is not a terminal)."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any, TextIO

from ._resource import Closeable

__all__ = ["Progress"]

#: Seconds between two status lines (the tqdm bars pace themselves).
INTERVAL = 0.5


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress(Closeable):
    """Counts bytes sent and received and shows them with their rates (a context
    manager: the final totals are shown on exit).

    Args:
        out: where to write (standard error by default).
        bars: tqdm bars (True), a status line (False), or tqdm if it is installed (None).

    Raises:
        ModuleNotFoundError: ``bars=True`` without tqdm installed.
    """

    def __init__(self, out: TextIO | None = None, *, bars: bool | None = None) -> None:
        self.sent = 0
        self.received = 0
        self._out = sys.stderr if out is None else out
        self._t0 = time.monotonic()
        self._shown = 0.0
        self._tty = self._out.isatty()
        self._bars: tuple[Any, Any] | None = None
        if bars is None:
            bars = importlib.util.find_spec("tqdm") is not None
        if bars:
            from tqdm import tqdm  # type: ignore[import-untyped]

            opts = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "file": self._out}
            self._bars = (
                tqdm(desc="sent", position=0, **opts),
                tqdm(desc="received", position=1, **opts),
            )

    def add(self, sent: int = 0, received: int = 0) -> None:
        """Count bytes; show the totals at most every :data:`INTERVAL` seconds."""
        self.sent += sent
        self.received += received
        if self._bars is not None:
            if sent:
                self._bars[0].update(sent)
            if received:
                self._bars[1].update(received)
            return
        now = time.monotonic()
        if now - self._shown >= INTERVAL:
            self._shown = now
            self._show(now, final=False)

    def line(self, now: float | None = None) -> str:
        """The status: totals each way and average rates since the start."""
        seconds = max((time.monotonic() if now is None else now) - self._t0, 1e-9)
        return (
            f"sent {_size(self.sent)} ({self.sent / seconds / 1e6:.1f} MB/s), "
            f"received {_size(self.received)} ({self.received / seconds / 1e6:.1f} MB/s), "
            f"{seconds:.1f} s"
        )

    def _show(self, now: float, *, final: bool) -> None:
        if self._tty:
            self._out.write("\r" + self.line(now) + ("\n" if final else ""))
        else:
            self._out.write(self.line(now) + "\n")
        self._out.flush()

    def close(self) -> None:
        """Show the final totals (idempotent for the bars)."""
        if self._bars is not None:
            for bar in self._bars:
                bar.close()
            return
        self._show(time.monotonic(), final=True)
