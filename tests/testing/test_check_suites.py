"""The conformance suites of gntipc.testing as a user runs them (the how-to's example: a
wrapper stream of their own around gntipc's), and what they say about broken streams:
each fails with an AssertionError that names the check and what went wrong."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import pytest

from gntipc.testing import (
    BYTE_STREAM_CHECKS,
    SESSION_CHECKS,
    SimRuntime,
    StreamMaker,
    check_byte_stream,
    check_message_queue,
    check_session,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class MyStream(anyio.abc.ByteStream):
    """A user's wrapper around a gntipc stream (here it only passes everything on)."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes


class FlipsLastByte(MyStream):
    """Broken: the last byte of every send arrives changed."""

    async def send(self, item: bytes) -> None:
        data = bytearray(item)
        if data:
            data[-1] ^= 0xFF
        await self.inner.send(bytes(data))


class SwapsSends(MyStream):
    """Broken: every other send goes out after the one that follows it."""

    held: bytes | None = None

    async def send(self, item: bytes) -> None:
        if self.held is None:
            self.held = bytes(item)
            return
        held, self.held = self.held, None
        await self.inner.send(bytes(item))
        await self.inner.send(held)


def wrapped(sim: SimRuntime, wrapper: type[MyStream]) -> StreamMaker:
    @contextlib.asynccontextmanager
    async def make_pair() -> AsyncIterator[tuple[MyStream, MyStream]]:
        async with sim.stream_pair() as (server, client):
            yield wrapper(server), wrapper(client)

    return make_pair


async def test_the_how_tos_example(gntipc_sim: SimRuntime) -> None:
    make_pair = wrapped(gntipc_sim, MyStream)
    await check_byte_stream(make_pair)
    await check_message_queue(make_pair)
    await check_session(make_pair)


async def test_gntipc_streams_directly(gntipc_sim: SimRuntime) -> None:
    await check_byte_stream(gntipc_sim.stream_pair)


async def test_a_stream_that_changes_a_byte(gntipc_sim: SimRuntime) -> None:
    with pytest.raises(
        AssertionError,
        match=r"^check_byte_stream: check 'bulk_both_ways_at_once' failed: what the first"
        r" stream received: got 100000 items/bytes, expected 100000; they differ first at"
        r" index 99999$",
    ):
        await check_byte_stream(wrapped(gntipc_sim, FlipsLastByte))


async def test_a_stream_that_reorders(gntipc_sim: SimRuntime) -> None:
    with pytest.raises(
        AssertionError,
        match=r"^check_message_queue: check 'put_get_and_the_wire_format' failed: message 0:"
        r" got Reading\(sensor=1, value=0.5, label='x'\), expected Reading\(sensor=0,",
    ):
        await check_message_queue(wrapped(gntipc_sim, SwapsSends))


async def test_a_session_over_a_stream_that_changes_bytes(gntipc_sim: SimRuntime) -> None:
    with pytest.raises(
        AssertionError,
        match=r"^check_session: check 'open_accept_both_ways' failed: RemoteProtocolError: ",
    ):
        await check_session(wrapped(gntipc_sim, FlipsLastByte), checks=SESSION_CHECKS[1:])


async def test_check_names_are_checked() -> None:
    async def never() -> tuple[MyStream, MyStream]:
        raise AssertionError("no pair is made for a wrong name")

    with pytest.raises(ValueError, match="no check named 'nonesuch'"):
        await check_byte_stream(never, checks=["nonesuch"])
    with pytest.raises(ValueError, match="needs half_close=True"):
        await check_byte_stream(
            never, half_close=False, checks=["send_eof_half_closes_one_direction"]
        )
    assert "bulk_both_ways_at_once" in BYTE_STREAM_CHECKS
