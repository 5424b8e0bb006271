"""The event loop's own checkpoint (gntipc._soon.loop_checkpoint): what the hot paths
await instead of anyio's per-call lookup, with the same semantics."""

from __future__ import annotations

import anyio
import pytest

from gntipc._soon import LoopCheckpoint, loop_checkpoint

pytestmark = pytest.mark.anyio


async def test_is_a_cancellation_point() -> None:
    cp = LoopCheckpoint()
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        await cp()
        reached = True
    assert not reached and scope.cancelled_caught


async def test_is_a_scheduling_point() -> None:
    cp = LoopCheckpoint()
    ran: list[int] = []

    async def other() -> None:
        ran.append(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        for _ in range(3):  # the other task runs while this one only checkpoints
            await cp()
        assert ran == [1]


async def test_is_the_loops_own(anyio_backend: str) -> None:
    cp = loop_checkpoint()
    if anyio_backend == "trio":
        import trio

        assert cp is trio.lowlevel.checkpoint
    else:
        assert cp is not anyio.lowlevel.checkpoint  # asyncio: sleep(0), no lookup


def test_outside_a_loop_is_anyios() -> None:
    assert loop_checkpoint() is anyio.lowlevel.checkpoint
