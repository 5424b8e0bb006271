"""Sessions over streams that are not vchans: loopback TCP and TLS (asyncio and trio).

A service speaks the same multiplexed protocol to a VM over a vchan and to another host
over TCP; here both sessions live in this process, over a real loopback connection.  At the
end, how a session ends when its writes fail before its reader read how the peer left,
with a wrapper that fixes that order (#20)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import pytest
from _pairs import stream_pair
from anyio import BrokenResourceError, EndOfStream

import gntipc
import gntipc.session
from gntipc import MessageQueue, Session

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["tcp", "tls"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def sessions(kind: str, **kwargs: int) -> AsyncIterator[tuple[Session, Session]]:
    """(responder, initiator) sessions over one connection of ``kind``."""
    async with (
        stream_pair(kind) as (a, b),
        Session(a, is_initiator=False, **kwargs) as s,
        Session(b, is_initiator=True, **kwargs) as c,
    ):
        yield s, c


async def test_fast_paths_are_declared_not_guessed(kind: str) -> None:
    from gntipc._fastpath import held_writes, ring_stream

    class Ring:  # declares the ring fast path (as a wrapper of a VchanStream may)
        gntipc_fast_path = "ring"

    class Forwarding:  # forwards every attribute lookup, the declaration too
        def __getattr__(self, name: str) -> object:
            return getattr(Ring(), name)

    ring = Ring()
    assert ring_stream(ring) is ring and held_writes(ring) is ring
    assert ring_stream(Forwarding()) is None and held_writes(Forwarding()) is None
    async with sessions(kind) as (s, c):
        with anyio.fail_after(10):
            a = await c.open_stream()
            b = await s.accept_stream()
            async with a, b:
                # a session stream gathers writes but is no ring; TCP/TLS neither
                assert held_writes(a) is a and ring_stream(a) is None
    async with stream_pair(kind) as (x, _y):
        assert held_writes(x) is None and ring_stream(x) is None
        queue = MessageQueue(x, bytes)
        with pytest.raises(NotImplementedError, match="put_nowait needs"):
            queue.put_nowait(b"no ring")


# -- a write refused before the reader read how the peer left (#20) ----------------------


class HeldBack(anyio.abc.ByteStream):
    """A byte stream whose reading the test holds back and whose writes it refuses, so
    that a session's write fails before its reader read how the peer left (as a
    :class:`gntipc.SessionStream` refuses writes once its peer's RESET came, while the
    peer's last bytes and end still wait for the reader): an order that the scheduler
    picks otherwise (asyncio did, trio did not)."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner
        self.bytes_released = self.end_released = _set_event()
        self.refuse_writes = False
        self.refused = anyio.Event()  # a write was refused
        self.crashed = False
        self._reading = anyio.CancelScope()

    def hold(self, *, bytes_too: bool = True) -> None:
        """Hold back what the reader gets from now on: the end, and bytes too."""
        self.end_released = anyio.Event()
        if bytes_too:
            self.bytes_released = anyio.Event()

    def release(self) -> None:
        self.bytes_released.set()
        self.end_released.set()

    def crash(self) -> None:
        """The stream breaks: the reader gets BrokenResourceError, now or next."""
        self.crashed = True
        self._reading.cancel()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with anyio.CancelScope() as self._reading:
            if not self.crashed:
                try:
                    data = await self.inner.receive(max_bytes)
                except (EndOfStream, BrokenResourceError):
                    await self.end_released.wait()
                    raise
                await self.bytes_released.wait()
                return data
        raise BrokenResourceError("the peer crashed")

    async def send(self, item: bytes) -> None:
        if self.refuse_writes:
            self.refused.set()
            raise BrokenResourceError("the peer left")
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _set_event() -> anyio.Event:
    event = anyio.Event()
    event.set()
    return event


async def _send_expecting(stream: gntipc.SessionStream, message: str) -> None:
    with pytest.raises(BrokenResourceError, match=message):
        await stream.send(b"meets the refusal")


@pytest.mark.parametrize("kind", ["session", "tcp"])
@pytest.mark.parametrize("how", ["closed", "crashed"])
async def test_a_refused_write_waits_for_the_reader_to_tell_how_the_peer_left(
    kind: str, how: str
) -> None:
    # Our write fails (the peer left) before our reader read how: the session ends as the
    # peer left it, closed (its GOAWAY and end: EndOfStream), or crashed (the stream
    # breaks before its GOAWAY reached us: BrokenResourceError, as before).
    expected, message = {
        "closed": (EndOfStream, "the peer closed the session"),
        "crashed": (BrokenResourceError, "the session's stream broke"),
    }[how]
    async with stream_pair(kind) as (a, b):
        held = HeldBack(a)
        async with Session(held, is_initiator=False) as s:
            with anyio.fail_after(10):
                async with Session(b, is_initiator=True) as c:
                    st = await c.open_stream()
                    peer = await s.accept_stream()
                    held.hold()  # what the peer sends from now on waits unread
                    await st.aclose()
                held.refuse_writes = True
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_send_expecting, peer, message)
                    await held.refused.wait()
                    # the reader has not read how the peer left: nothing is decided yet
                    assert not s.closed and s.error is None
                    if how == "closed":
                        held.release()
                    else:
                        held.crash()
                with pytest.raises(expected):
                    await s.accept_stream()
                assert isinstance(s.error, expected)
                await peer.aclose()


@pytest.mark.parametrize("kind", ["tcp"])
async def test_a_refused_write_and_a_reader_that_never_tells_is_broken(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stream refuses writes but its reading side never ends: the session does not
    # wait for it forever (_LEFT_TIMEOUT), it is broken.
    monkeypatch.setattr(gntipc.session, "_LEFT_TIMEOUT", 0.05)
    async with stream_pair(kind) as (a, b):
        held = HeldBack(a)
        async with Session(held, is_initiator=False) as s, Session(b, is_initiator=True) as c:
            with anyio.fail_after(10):
                st = await c.open_stream()
                peer = await s.accept_stream()
                held.refuse_writes = True
                await _send_expecting(peer, "the session's stream broke")
                assert isinstance(s.error, BrokenResourceError)
                assert s.error.args == ("the peer left",)
                await st.aclose()
                await peer.aclose()


@pytest.mark.parametrize("kind", ["session", "tcp"])
async def test_the_peers_goaway_ends_the_session_before_its_stream_ends(kind: str) -> None:
    # accept_stream raises EndOfStream as soon as the peer's GOAWAY came; Session.error
    # says so from then on, before the end of the stream is read, and stays so when the
    # stream then breaks instead of ending.
    async with stream_pair(kind) as (a, b):
        held = HeldBack(a)
        async with Session(held, is_initiator=False) as s:
            with anyio.fail_after(10):
                async with Session(b, is_initiator=True) as c:
                    st = await c.open_stream()  # left open: the session's close ends it
                    peer = await s.accept_stream()
                    held.hold(bytes_too=False)  # the GOAWAY comes through, not the end
                with pytest.raises(EndOfStream):
                    await s.accept_stream()
                assert isinstance(s.error, EndOfStream)
                assert not s.closed  # the end of the stream is not read yet
                held.crash()
                # peer's receive waits until the reader took the session down
                with pytest.raises(BrokenResourceError, match="the peer closed the session"):
                    await peer.receive()
                assert s.closed and isinstance(s.error, EndOfStream)
                assert st.closed is False  # never closed: the session's close ended it
                await peer.aclose()
