"""The MessageQueue conformance suite (:func:`gntipc.testing.check_message_queue`), one
check per test, over every kind of byte stream: a VchanStream on sim and on Xen, a
SessionStream, loopback TCP, a unix socket and TLS (asyncio and trio).

What differs on a stream that is not a VchanStream (documented in gntipc.messages) is
checked there too: no put_nowait, get_nowait serves only what was received already, and a
put cancelled while sending closes the queue unless the stream reports its progress."""

from __future__ import annotations

import pytest
from _pairs import KINDS, capabilities, stream_pair

from gntipc.testing import MESSAGE_QUEUE_CHECKS, check_message_queue

pytestmark = pytest.mark.anyio


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("check", MESSAGE_QUEUE_CHECKS)
async def test_message_queue(kind: str, check: str) -> None:
    await check_message_queue(
        lambda: stream_pair(kind), checks=[check], **capabilities(kind, check, "half_close")
    )
