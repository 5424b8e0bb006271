"""The entry point of a process started by :meth:`SimRuntime.spawn` (not a public module).

The parent runs ``python -c BOOT SYS_PATH SPEC``: ``BOOT`` gives this interpreter the
parent's ``sys.path`` (so the test module that defines the target imports here too) and
calls :func:`main`.  ``SPEC`` is the pickled ``(target, args, loop, parent pid)``; the
environment already names the runtime directory and the domain this process plays.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import inspect
import os
import pickle
import signal
import sys

__all__ = ["BOOT", "main"]

#: The ``-c`` program: adopt the parent's import path, then run :func:`main`.
BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from gntipc.testing._child import main; main(sys.argv[2])"
)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it exits: a test run that dies
    without its teardown (e.g. killed by a timeout) leaves no peer behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(137)


def main(spec: str) -> None:
    """Run the target of ``spec``; an exception prints its traceback and exits 1."""
    target, args, loop, parent = pickle.loads(base64.b64decode(spec))
    _die_with_parent(parent)
    if inspect.iscoroutinefunction(target):
        import anyio

        anyio.run(functools.partial(target, *args), backend=loop)
    else:
        target(*args)
    sys.stdout.flush()
