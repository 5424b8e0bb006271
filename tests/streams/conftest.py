"""Fixtures for the async API tests: event loops (asyncio and trio) and
connected stream pairs over loopback (this process plays both ends)."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import gntipc
from gntipc.backends import Backend
from gntipc.testing import connect_pair
from gntipc.testing._conformance import send_receive

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


#: The basic ByteStream contract both ways between two streams (the check the session
#: suite of gntipc.testing uses, for the session and stream tests here).
check_send_receive = send_receive
