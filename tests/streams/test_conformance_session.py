"""The Session conformance suite (:func:`gntipc.testing.check_session`), one check per
test, over every kind of byte stream: a vchan on sim and on Xen, a session stream (a
session inside a session), loopback TCP, a unix socket and TLS (asyncio and trio)."""

from __future__ import annotations

import pytest
from _pairs import KINDS, stream_pair

from gntipc.testing import SESSION_CHECKS, check_session

pytestmark = pytest.mark.anyio


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("check", SESSION_CHECKS)
async def test_session(kind: str, check: str) -> None:
    await check_session(lambda: stream_pair(kind), checks=[check])
