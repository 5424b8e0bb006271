"""Closing a vchan from one thread while others use it (issue 10, defect 1).

Before the endpoint refactor, a ``close()`` racing a thread's ``write_nowait`` /
``read_nowait`` unmapped the pages under the running call (SIGSEGV) or leaked a bare
AssertionError.  Now an in-flight call finishes or raises ClosedResourceError, a
blocked call wakes with it, and memory is unmapped only once nobody uses it.

The races run many times in a child process (``_close_race.py``), so that a crash is a
test failure and not the end of the test run; the exact interleavings that matter are
also forced deterministically, in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from anyio import ClosedResourceError

from gntipc.backends import Backend
from gntipc.channel import Vchan
from gntipc.protocol import VchanState

from .test_channel import pair

RACE = str(Path(__file__).with_name("_close_race.py"))
MODES = ["busy-writer", "busy-reader", "blocked-reader", "blocked-writer", "mixed"]


def _run_race(mode: str, iterations: int, peer: str) -> None:
    env = dict(os.environ)
    src = str(Path(__file__).parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, RACE, mode, str(iterations), peer],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"{mode} ({peer}) exited {proc.returncode}"
        + (" (killed by a signal: a crash)" if proc.returncode < 0 else "")
        + f"\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-6000:]}"
    )
    assert proc.stdout.strip() == f"ok {iterations}"


@pytest.mark.parametrize("mode", MODES)
def test_close_from_another_thread_loopback(mode: str) -> None:
    _run_race(mode, 50, "loopback")


@pytest.mark.parametrize("mode", ["busy-writer", "blocked-reader", "mixed"])
def test_close_from_another_thread_cross_process(mode: str) -> None:
    # A peer process per iteration: fewer iterations, the same checks.
    _run_race(mode, 8, "process")


def _close_in_thread(ch: Vchan) -> threading.Thread:
    t = threading.Thread(target=ch.close)
    t.start()
    return t


def test_close_waits_for_the_call_in_flight(backend: Backend) -> None:
    # The wait protocol's hook runs while the call holds its ring lock: close() from
    # another thread must wait for the call, and the pages must stay mapped meanwhile.
    srv, cli = pair(backend, 4096, 4096)
    with srv:
        ep = cli.endpoint
        seen: list[object] = []
        closer: list[threading.Thread] = []
        hook_done: list[float] = []
        close_done: list[float] = []

        def close() -> None:
            cli.close()
            close_done.append(time.monotonic())

        def hook(point: str, direction: str) -> None:
            if point != "checked" or closer:
                return
            closer.append(threading.Thread(target=close))
            closer[0].start()
            time.sleep(0.3)  # time enough for close() to reach its wait for us
            seen.append(closer[0].is_alive())  # close() is waiting, not done
            seen.append(ep.closed)
            seen.append(all(not p.mapping.closed for p in ep._pages))
            seen.append(ep._rings is not None and ep._rings.data_ready())
            hook_done.append(time.monotonic())

        ep.window_hook = hook
        assert ep.poll_read(1) is False  # the call finishes normally
        closer[0].join(10)
        assert not closer[0].is_alive()
        # close() returned only after the call (still in its hook) was done with the pages
        assert close_done[0] > hook_done[0]
        # close() had begun (the flag is set at once), but unmapped nothing under us
        assert seen == [True, True, True, 0]
        assert cli.closed and not ep._pages
        with pytest.raises(ClosedResourceError):
            cli.read_nowait(1)


@pytest.mark.parametrize("direction", ["write", "read"])
def test_a_notify_racing_close_is_no_error(backend: Backend, direction: str) -> None:
    # A call moves its index under the ring lock, releases the lock, then sends the
    # event the peer asked for: a close() in between (forced here) used to turn the
    # finished call into a bare AssertionError (the port was already gone).
    srv, cli = pair(backend, 4096, 4096)
    with srv, cli:
        ep = cli.endpoint
        if direction == "read":
            srv.write_nowait(b"r" * 4096)  # full: the server asks to be told of a read
            assert srv.prepare_wait_write() == 0
            inner_name, call = "_readinto", lambda: cli.readinto_nowait(bytearray(100))
        else:
            srv.handle_events()
            assert srv.prepare_wait_read() == 0  # the server asks to be told of a write
            inner_name, call = "_write", lambda: cli.write_nowait(b"w" * 100)
        inner = getattr(ep, inner_name)

        def then_close(*args: Any) -> tuple[int, bool]:
            n, notify = inner(*args)
            assert notify, "the server's request should make this call notify"
            t = _close_in_thread(cli)  # takes the locks we just released
            t.join(10)
            assert ep._port is None  # the teardown is complete
            return n, notify

        setattr(ep, inner_name, then_close)
        assert call() == 100  # the call finished: no error
        # the peer was told of the close, and reads what was written before it
        srv.handle_events()
        if direction == "write":
            assert srv.read_nowait(4096) == b"w" * 100
        assert srv.is_open() == VchanState.CLOSED


@pytest.mark.parametrize("blocked", ["read", "recv", "write", "send", "wait"])
def test_a_thread_blocked_without_timeout_wakes_on_close(backend: Backend, blocked: str) -> None:
    srv, cli = pair(backend, 1024, 1024)
    with srv:
        cli.spin = 0
        if blocked in ("write", "send"):
            cli.write_nowait(b"x" * 1024)  # full
        calls = {
            "read": lambda: cli.read(10),
            "recv": lambda: cli.recv(10),
            "write": lambda: cli.write(b"y"),
            "send": lambda: cli.send(b"y" * 10),
            "wait": lambda: [cli.wait() for _ in range(1000)],
        }
        result: list[BaseException] = []

        def body() -> None:
            try:
                calls[blocked]()
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=body)
        t.start()
        time.sleep(0.2)
        assert t.is_alive()
        cli.close()
        t.join(5)
        assert not t.is_alive(), "the blocked thread did not wake"
        assert len(result) == 1 and type(result[0]) is ClosedResourceError, result
