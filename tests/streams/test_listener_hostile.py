"""One bad peer costs only its own connection (issue 10, defect 4): a hostile client,
or a store failure while accepting, must not kill ``Listener.serve()`` and with it the
handlers of the good clients."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from anyio import BrokenResourceError, EndOfStream
from conftest import fresh_path

import gntipc
from gntipc import _endpoint, _keys
from gntipc import protocol as L
from gntipc._exceptions import XenError
from gntipc.backends import Backend, EventPort, Pages

pytestmark = pytest.mark.anyio

LOGGER = "gntipc.streams"


async def echo(stream: gntipc.VchanStream) -> None:
    async for chunk in stream:
        await stream.send(chunk)


async def roundtrip(stream: gntipc.VchanStream, data: bytes) -> None:
    await stream.send(data)
    got = b""
    while len(got) < len(data):
        got += await stream.receive()
    assert got == data


async def logged(caplog: pytest.LogCaptureFixture, text: str, count: int = 1) -> None:
    with anyio.fail_after(10):
        while sum(text in r.getMessage() for r in caplog.records) < count:
            await anyio.sleep(0.01)


class HostileClient:
    """A client made of bare backend calls: it takes the listener's fresh keys and
    writes ``live`` instead of 1 (connected) into ``cli_live``."""

    def __init__(self, backend: Backend, path: str) -> None:
        self.backend = backend
        self.path = path
        self.port: EventPort | None = None
        self.pages: Pages | None = None

    async def handshake(self, live: int) -> None:
        store = self.backend.store
        with anyio.fail_after(10):
            while True:
                try:
                    ref = int(store.read(f"{self.path}/ring-ref"))
                    port = self.backend.bind_interdomain(
                        self.backend.domid, int(store.read(f"{self.path}/event-channel"))
                    )
                except XenError:  # not published yet, or the keys of a taken channel
                    await anyio.sleep(0.01)
                    continue
                pages = self.backend.map(self.backend.domid, [ref], writable=True)
                view = pages.mapping.view()
                try:
                    if view[L.OFF_CLI_LIVE] == L.LIVE_WAITING:
                        view[L.OFF_CLI_LIVE] = live
                        self.port, self.pages = port, pages
                        port.notify()
                        return
                finally:
                    view.release()
                pages.close()
                port.close()
                await anyio.sleep(0.01)

    def server_left(self) -> bool:
        assert self.pages is not None
        view = self.pages.mapping.view()
        try:
            return view[L.OFF_SRV_LIVE] == L.LIVE_GONE
        finally:
            view.release()

    def close(self) -> None:
        if self.pages is not None:
            self.pages.close()
        if self.port is not None:
            self.port.close()


@pytest.fixture
def hostile(backend: Backend) -> Iterator[list[HostileClient]]:
    made: list[HostileClient] = []
    yield made
    for h in made:
        h.close()


@pytest.mark.parametrize("live", [9, 255, L.LIVE_WAITING + 1])
async def test_a_hostile_live_byte_while_connecting_drops_only_that_client(
    backend: Backend, caplog: pytest.LogCaptureFixture, hostile: list[HostileClient], live: int
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    path = fresh_path()
    full = gntipc.Vchan.resolve_path(backend.domid, path)
    async with (
        await gntipc.listen(backend.domid, path, backend=backend) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, echo)
        async with await gntipc.connect(backend.domid, path, timeout=10, backend=backend) as good:
            await roundtrip(good, b"before")
            for round_ in range(3):  # the same bad client again and again
                bad = HostileClient(backend, full)
                hostile.append(bad)
                await bad.handshake(live)
                await logged(caplog, "dropped a client", round_ + 1)
                assert bad.server_left()  # the listener closed that channel
                await roundtrip(good, b"during %d" % round_)
            # the listener goes on: fresh keys, a new good client is served
            async with await gntipc.connect(
                backend.domid, path, timeout=10, backend=backend
            ) as good2:
                await roundtrip(good2, b"after")
                await roundtrip(good, b"still")
        listener.close()
    assert f"holds {live}" in caplog.text


async def test_a_client_scribbling_after_connecting_costs_only_its_handler(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    path = fresh_path()
    async with (
        await gntipc.listen(backend.domid, path, backend=backend) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, echo)
        async with await gntipc.connect(backend.domid, path, timeout=10, backend=backend) as good:
            await roundtrip(good, b"hello")
            async with await gntipc.connect(
                backend.domid, path, timeout=10, backend=backend
            ) as bad:
                await roundtrip(bad, b"i am nice")
                ep = bad.vchan.endpoint
                view = ep._pages[0].mapping.view()
                try:
                    view[L.OFF_CLI_LIVE] = 9
                finally:
                    view.release()
                assert ep._port is not None
                ep._port.notify()
                await logged(caplog, "dropped a connection: RemoteProtocolError")
                with pytest.raises((EndOfStream, BrokenResourceError)):
                    while True:
                        await bad.receive()
            await roundtrip(good, b"still served")
        listener.close()


@pytest.mark.parametrize("where", ["publishing", "connecting"])
async def test_a_store_error_while_accepting_is_logged_and_retried(
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    path = fresh_path()
    failures = [0]
    armed = [False]

    def fail() -> None:
        failures[0] += 1
        raise XenError(errno.EIO, "xenstore: injected failure")

    real_publish = _keys.publish_keys
    real_watch = _keys.Presence.watch_peer

    def publish(*args: Any) -> None:
        if armed[0] and where == "publishing" and failures[0] < 3:
            fail()
        real_publish(*args)

    def watch_peer(self: _keys.Presence, role: str) -> tuple[bool, bool]:
        if armed[0] and where == "connecting" and role == "client" and failures[0] < 1:
            fail()  # the server starting its watch on the client's presence node
        return real_watch(self, role)

    monkeypatch.setattr(_endpoint, "publish_keys", publish)
    monkeypatch.setattr(_keys.Presence, "watch_peer", watch_peer)
    async with (
        await gntipc.listen(backend.domid, path, backend=backend) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, echo)
        async with await gntipc.connect(backend.domid, path, timeout=10, backend=backend) as good:
            await roundtrip(good, b"hello")
            armed[0] = True
            # This client takes the keys the listener published before the failures
            # were armed.
            async with await gntipc.connect(
                backend.domid, path, timeout=10, backend=backend
            ) as second:
                if where == "connecting":
                    # the listener dropped this one as it connected: it sees the end
                    await logged(caplog, "dropped a client")
                    with pytest.raises(EndOfStream):
                        await second.receive()
                else:
                    await roundtrip(second, b"second")
                    # the next offer fails three times, then succeeds
                    await logged(caplog, "cannot offer a channel", 3)
                await roundtrip(good, b"still served")
                async with await gntipc.connect(
                    backend.domid, path, timeout=10, backend=backend
                ) as third:
                    await roundtrip(third, b"third")
                    await roundtrip(good, b"still served")
        listener.close()
    assert failures[0] == (3 if where == "publishing" else 1)
    assert "injected failure" in caplog.text
