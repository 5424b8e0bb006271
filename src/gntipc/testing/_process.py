"""SimProcess: a process playing a simulated domain, started by :meth:`SimRuntime.spawn`."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from ._child import BOOT

__all__ = ["DEFAULT_TIMEOUT", "SimProcess"]

#: The default deadline, in seconds, of every wait in :mod:`gntipc.testing`: ten times
#: more than a loaded CI machine needs.
DEFAULT_TIMEOUT = 30.0

#: How often a wait looks again at the process and its output.
_POLL = 0.005

Target = Callable[..., Any] | Sequence[str]


def _child_argv(target: Target, args: tuple[object, ...], loop: str) -> list[str]:
    if isinstance(target, str | bytes):
        raise TypeError("a command is a sequence of arguments, not a string")
    if not callable(target):
        if args:
            raise TypeError("arguments go into the command itself, not after it")
        argv = [os.fspath(a) for a in target]
        if not argv:
            raise ValueError("empty command")
        return argv
    if loop not in ("asyncio", "trio"):
        raise ValueError(f"loop must be 'asyncio' or 'trio', not {loop!r}")
    try:
        spec = pickle.dumps((target, args, loop, os.getpid()))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            f"cannot send {target!r} and its arguments to another process ({exc}): the "
            "target must be a module-level function and the arguments picklable"
        ) from exc
    return [sys.executable, "-c", BOOT, json.dumps(sys.path), base64.b64encode(spec).decode()]


class SimProcess:
    """A child process playing simulated domain :attr:`domid`.

    Its standard output goes to a file, read with :attr:`stdout`, :meth:`readline` and
    :meth:`receive_line` (a process that prints a lot never blocks); its standard error
    is the test's (pytest shows it with a failing test).  The runtime that started it
    kills it at its end if it still runs.
    """

    def __init__(
        self,
        target: Target,
        args: tuple[object, ...],
        *,
        domid: int,
        loop: str,
        env: Mapping[str, str],
        output: str,
    ) -> None:
        self.domid = domid
        self.args = _child_argv(target, args, loop)
        self._output = output
        self._offset = 0
        with open(output, "wb") as out:
            self._popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.args, env=dict(env), stdin=subprocess.DEVNULL, stdout=out
            )

    @property
    def pid(self) -> int:
        """The process id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (``-9`` after :meth:`kill`), or None while it runs."""
        return self._popen.poll()

    @property
    def stdout(self) -> str:
        """Everything the process has printed so far (decoded as UTF-8)."""
        with open(self._output, "rb") as f:
            return f.read().decode(errors="replace")

    def __repr__(self) -> str:
        rc = self.returncode
        state = "running" if rc is None else f"exited {rc}"
        return f"<SimProcess pid {self.pid} domain {self.domid} {state}>"

    # -- waiting for exit ------------------------------------------------------------
    def join(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait (blocking) until the process exits; return its exit status.

        Raises:
            TimeoutError: it still runs after ``timeout`` seconds (it is not killed).
        """
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._timeout(timeout, "to exit") from None

    async def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait until the process exits; return its exit status.

        Cancellation: nothing happens to the process.

        Raises:
            TimeoutError: it still runs after ``timeout`` seconds (it is not killed).
        """
        check = self._deadline(timeout, "to exit")
        while (rc := self._popen.poll()) is None:
            check()
            await anyio.sleep(_POLL)
        return rc

    # -- reading its output ----------------------------------------------------------
    def _next_line(self) -> str | None:
        """The next complete line of output, or None if there is none yet.

        Raises:
            EOFError: the process has exited and printed no further line.
        """
        exited = self._popen.poll() is not None  # before reading: no line can be missed
        with open(self._output, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.find(b"\n")
        if end >= 0:
            self._offset += end + 1
            return data[:end].decode(errors="replace")
        if exited:
            rest = f" (and an unfinished line {data!r})" if data else ""
            raise EOFError(f"{self!r} printed no further line{rest}")
        return None

    def readline(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait (blocking) for the next line the process prints; return it without its
        newline.

        Raises:
            TimeoutError: no line within ``timeout`` seconds.
            EOFError: the process exited without printing another line.
        """
        check = self._deadline(timeout, "to print a line")
        while (line := self._next_line()) is None:
            check()
            time.sleep(_POLL)
        return line

    async def receive_line(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait for the next line the process prints; return it without its newline.

        Cancellation: no line is consumed.

        Raises:
            TimeoutError: no line within ``timeout`` seconds.
            EOFError: the process exited without printing another line.
        """
        check = self._deadline(timeout, "to print a line")
        while (line := self._next_line()) is None:
            check()
            await anyio.sleep(_POLL)
        return line

    def _deadline(self, timeout: float, what: str) -> Callable[[], None]:
        """A check to call between polls: raises TimeoutError once ``timeout`` has passed."""
        end = time.monotonic() + timeout

        def check() -> None:
            if time.monotonic() > end:
                raise self._timeout(timeout, what)

        return check

    def _timeout(self, timeout: float, what: str) -> TimeoutError:
        tail = self.stdout[-2000:]
        return TimeoutError(f"{self!r} took more than {timeout} s {what}; its output:\n{tail}")

    # -- ending it -------------------------------------------------------------------
    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the process (a crash: the simulated hypervisor then performs its unmap
        notifications, as Xen does) and wait until it is gone.  Does nothing if it has
        exited already.

        Raises:
            TimeoutError: it did not die within ``timeout`` seconds.
        """
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGKILL)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._timeout(timeout, "to die after SIGKILL") from None
