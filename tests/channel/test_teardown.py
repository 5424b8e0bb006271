"""An endpoint's teardown is exception-safe (issue 10, defect 6): when releasing one
resource fails (MappingInUse: the caller still holds a view of a mapping; a XenError
from the backend), every other page, the event port and the fds are still released, the
first error is raised after that, and the pages kept are released by a later close()."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from anyio import ClosedResourceError, EndOfStream

from gntipc._exceptions import XenError
from gntipc._mapping import MappingInUse
from gntipc.backends import Backend
from gntipc.backends.sim import assert_cleaned_up
from gntipc.channel import Vchan
from gntipc.protocol import VchanState

from .test_channel import pair


def _sim_leftovers() -> list[str]:
    """What assert_cleaned_up() reports, minus the (still open) test backend itself."""
    try:
        assert_cleaned_up()
    except AssertionError as exc:
        lines = str(exc).splitlines()[1:]
    else:
        return []
    return [
        line
        for line in lines
        if not line.startswith("open <SimBackend") and "is still open" not in line
    ]


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_viewed_mapping_keeps_only_itself(backend: Backend, side: str) -> None:
    srv, cli = pair(backend, 4096, 8192)  # three pages each: control + two rings
    mine, other = (cli, srv) if side == "client" else (srv, cli)
    ep = mine.endpoint
    cli.write_nowait(b"before the close")
    ctrl, *rings = ep._pages
    assert len(rings) == 2
    port = ep._port
    assert port is not None
    view = ctrl.mapping.view()  # the user still holds a view of the control page
    try:
        with pytest.raises(MappingInUse):
            mine.close()
        # everything else went: the ring pages, the port, the fds; the peer was told
        assert all(p.mapping.closed for p in rings)
        assert port.closed and ep._port is None and ep._epoll is None and ep._wake_fd < 0
        assert ep._pages == [ctrl] and not ctrl.mapping.closed
        assert mine.closed and mine.is_open() == VchanState.CLOSED
        with pytest.raises(ClosedResourceError):
            mine.read_nowait(1)
        if side == "server":
            assert not backend.store.exists(f"{srv.path}/ring-ref")  # keys withdrawn
            with pytest.raises(EndOfStream):
                other.read_nowait(100)
        else:
            other.handle_events()
            assert other.read_nowait(100) == b"before the close"
            with pytest.raises(EndOfStream):
                other.read_nowait(100)
        other.close()
        if backend.name == "sim":
            # only the viewed page is left: its mapping and its unmap notification
            left = _sim_leftovers()
            assert [x for x in left if x.startswith("  open")] == [f"  open {ctrl!r}"]
            assert sorted(x.split(":")[0] for x in left if not x.startswith(" ")) == (
                ["maps", "notifies"] if side == "client" else ["grants", "maps", "notifies"]
            ), left
        # a repeated close() still reports the page in use...
        with pytest.raises(MappingInUse):
            mine.close()
    finally:
        view.release()
    # ...and releases it once the view is gone
    mine.close()
    assert ep._pages == [] and ctrl.mapping.closed
    mine.close()  # idempotent
    if backend.name == "sim":
        assert _sim_leftovers() == []


def test_a_backend_error_releases_the_rest_then_raises(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, cli = pair(backend, 4096, 4096)
    with srv:
        ep = cli.endpoint
        ctrl, left, right = ep._pages
        port = ep._port
        assert port is not None
        real_close = left.close
        calls: list[int] = []

        def failing_close(*args: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise XenError(errno.EIO, "gntdev UNMAP_GRANT_REF: injected failure")
            real_close()

        monkeypatch.setattr(left, "close", failing_close)
        with pytest.raises(XenError, match="injected"):
            cli.close()
        assert ctrl.mapping.closed and right.mapping.closed
        assert port.closed and ep._port is None
        assert ep._pages == [left]
        cli.close()  # the retry releases the page
        assert ep._pages == [] and left.mapping.closed and len(calls) == 2


def test_errors_in_two_steps_raise_the_first(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, cli = pair(backend, 4096, 4096)
    with srv:
        ep = cli.endpoint
        ctrl, left, right = ep._pages
        port = ep._port
        assert port is not None
        view = ctrl.mapping.view()
        real_port_close = port.close

        def port_close() -> None:
            real_port_close()
            raise XenError(errno.EIO, "evtchn UNBIND: injected failure")

        monkeypatch.setattr(port, "close", port_close)
        try:
            # pages are released in reverse: right, left, then ctrl fails; then the port
            with pytest.raises(MappingInUse):
                cli.close()
            assert port.closed and right.mapping.closed and left.mapping.closed
        finally:
            view.release()
        cli.close()
        assert ctrl.mapping.closed


def test_close_racing_close_returns_after_the_teardown(backend: Backend) -> None:
    # A second close() while the first one waits for a call in flight: it returns
    # only once everything is released (it does not just see the flag and leave).
    import threading
    import time

    srv, cli = pair(backend, 4096, 4096)
    with srv:
        ep = cli.endpoint
        order: list[str] = []
        closers: list[threading.Thread] = []

        def close(name: str) -> None:
            cli.close()
            order.append(f"{name} {len(ep._pages)}")

        def hook(point: str, direction: str) -> None:
            if point != "checked" or closers:
                return
            for name in ("first", "second"):
                t = threading.Thread(target=close, args=(name,))
                closers.append(t)
                t.start()
                time.sleep(0.1)
            time.sleep(0.2)
            order.append("call done")

        ep.window_hook = hook
        ep.poll_read(1)
        for t in closers:
            t.join(10)
        assert order[0] == "call done" and sorted(order[1:]) == ["first 0", "second 0"]


def test_vchan_context_exit_propagates_the_error(backend: Backend) -> None:
    srv, cli = pair(backend, 4096, 4096)
    with srv:
        view = cli.endpoint._pages[0].mapping.view()
        try:
            with pytest.raises(MappingInUse), cli:
                pass
        finally:
            view.release()
        Vchan.close(cli)
