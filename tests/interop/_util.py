"""Helpers of the interop tests: child processes with collected output, the byte
pattern shared with ``vchan_peer.c`` and ``_domu_peer.py``, a both-ways exchange over a
synchronous :class:`gntipc.Vchan`."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from gntipc import Vchan

from ._domu_peer import SEED_CLIENT, SEED_SERVER, pattern

__all__ = ["SEED_CLIENT", "SEED_SERVER", "Proc", "exchange", "pattern"]


class Proc:
    """A child process whose output lines are collected by a thread, so a test can wait
    for a line with a deadline instead of blocking on a pipe."""

    def __init__(self, argv: list[str], **kwargs: object) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **kwargs,  # type: ignore[call-overload]
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n") if isinstance(raw, bytes) else raw
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def expect(self, prefix: str, timeout: float = 60) -> str:
        """The first output line starting with ``prefix`` (AssertionError after
        ``timeout`` seconds or when the process ends without printing it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                ended = not self._thread.is_alive()
                if left <= 0 or ended:
                    raise AssertionError(
                        f"{Path(self.argv[0]).name} did not print {prefix!r}"
                        f" (rc={self.proc.poll()}); output:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{Path(self.argv[0]).name} still running after {timeout}s; output:\n"
                + self.output()
            ) from None
        self._thread.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def exchange(v: Vchan, send: bytes, nrecv: int, timeout: float = 120) -> bytes:
    """Write all of ``send`` while reading ``nrecv`` bytes, at once (either may exceed
    the rings); the bytes read.  Raises TimeoutError, and what the vchan raises."""
    out = memoryview(send)
    got = bytearray()
    deadline = time.monotonic() + timeout
    while out or len(got) < nrecv:
        progress = False
        if out:
            n = v.write_nowait(out[:65536])
            out = out[n:]
            progress = n > 0
        if len(got) < nrecv:
            data = v.read_nowait(min(65536, nrecv - len(got)))
            got += data
            progress = progress or bool(data)
        if progress:
            continue
        # Ask for wake-ups first, then re-check: no lost wake-up between check and wait.
        if (len(got) < nrecv and v.prepare_wait_read() > 0) or (out and v.prepare_wait_write() > 0):
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"exchange stalled: {len(send) - len(out)} sent, {len(got)} read")
        v.wait(min(left, 5.0))
    return bytes(got)
