"""Fixtures for the async API tests: event loops (asyncio and trio) and
connected stream pairs over loopback (this process plays both ends)."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import pytest

import gntipc
from gntipc.backends import Backend
from gntipc.testing import connect_pair

_paths = itertools.count()

Pair = tuple[gntipc.VchanStream, gntipc.VchanStream]
PairFactory = Callable[..., Awaitable[Pair]]


def fresh_path() -> str:
    return f"data/gntipc-streams/{os.getpid()}/{next(_paths)}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_pair(backend: Backend) -> AsyncIterator[PairFactory]:
    """``await make_pair(read_size=, write_size=)`` → (server stream, client stream);
    every stream is closed after the test."""
    made: list[gntipc.VchanStream] = []

    async def factory(read_size: int = 65536, write_size: int = 65536) -> Pair:
        pair = await connect_pair(backend, fresh_path(), read_size=read_size, write_size=write_size)
        made.extend(pair)
        return pair

    try:
        yield factory
    finally:
        for s in made:
            await s.aclose()


async def check_send_receive(tx: anyio.abc.ByteStream, rx: anyio.abc.ByteStream) -> None:
    """The basic ByteStream contract both ways between ``tx`` and ``rx``: every buffer
    type, max_bytes honoured with the rest kept in order, max_bytes < 1 refused, an empty
    send a no-op."""
    await tx.send(b"hello")
    assert await rx.receive() == b"hello"
    await rx.send(bytearray(b"world"))
    await rx.send(memoryview(b"!!"))
    got = b""
    while len(got) < 7:
        got += await tx.receive()
    assert got == b"world!!"
    await tx.send(b"abcdef")
    assert await rx.receive(2) == b"ab"
    assert await rx.receive(100) == b"cdef"
    with pytest.raises(ValueError):
        await rx.receive(0)
    await tx.send(b"")  # a no-op, not an error
