"""The byte-stream conformance suite (:func:`gntipc.testing.check_byte_stream`: the
:class:`anyio.abc.ByteStream` contract the typed layers rely on), one check per test, over
every stream type gntipc makes (a vchan on sim and on Xen, a session stream over a vchan)
and, as the reference, over anyio's own TCP, unix and TLS streams (TLS cannot half-close,
and reports its own close as broken: its capabilities say so, and those checks skip)."""

from __future__ import annotations

import pytest
from _pairs import KINDS, capabilities, stream_pair

from gntipc.testing import BYTE_STREAM_CHECKS, check_byte_stream

pytestmark = pytest.mark.anyio


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("check", BYTE_STREAM_CHECKS)
async def test_byte_stream(kind: str, check: str) -> None:
    given = capabilities(kind, check, "half_close", "closed_resource_after_aclose")
    await check_byte_stream(lambda: stream_pair(kind), checks=[check], **given)
