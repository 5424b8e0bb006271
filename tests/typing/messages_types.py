# Checked by mypy from test_typing.py (never imported): each reveal_type is compared with
# the comment at the end of its line, as msgspec does in its typing tests.
from __future__ import annotations

from typing import Any, reveal_type

import msgspec
from anyio.abc import ByteStream

from gntipc import MessageQueue
from gntipc.protocol import MessageFramer


class Request(msgspec.Struct):
    x: int


class Reply(msgspec.Struct):
    y: str


async def check(stream: ByteStream) -> None:
    reveal_type(MessageQueue(stream, Request))  # MessageQueue[Request]
    union = MessageQueue(stream, Request | Reply)
    reveal_type(union)  # MessageQueue[Request | Reply]
    reveal_type(await union.get())  # Request | Reply
    reveal_type(MessageQueue(stream, list[Request]))  # MessageQueue[list[Request]]
    reveal_type(MessageQueue(stream, int | None))  # MessageQueue[int | None]
    reveal_type(MessageQueue(stream, Any))  # MessageQueue[Any]
    reveal_type(MessageFramer(Request | Reply))  # MessageFramer[Request | Reply]
    queue: MessageQueue[Request | Reply] = MessageQueue(stream, Request | Reply)
    await queue.put(Reply(y="ok"))
    await queue.put_many([Request(x=1), Reply(y="two")])
