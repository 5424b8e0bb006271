"""The curated public surface: a test fails if ``gntipc.__all__`` drifts."""

from __future__ import annotations

import anyio.abc

import gntipc

EXPECTED = {
    "BackendUnavailable",
    "BulkChannel",
    "BulkLoan",
    "BulkMessage",
    "BulkQueue",
    "BulkView",
    "GntipcError",
    "Listener",
    "LocalProtocolError",
    "MalformedMessage",
    "MappingInUse",
    "MessageQueue",
    "MessageQueueStatistics",
    "MessageTooLarge",
    "ProtocolError",
    "RemoteProtocolError",
    "ResumableListener",
    "ResumableStream",
    "ResumeStatistics",
    "ResumeTicket",
    "Session",
    "SessionLost",
    "SessionRefused",
    "SessionStatistics",
    "SessionStream",
    "StaleKeys",
    "SyncBulkChannel",
    "SyncBulkQueue",
    "Vchan",
    "VchanAttribute",
    "VchanState",
    "VchanStream",
    "VchanStreamStatistics",
    "VmListener",
    "XenError",
    "XenStoreTimeout",
    "connect",
    "get_backend",
    "listen",
    "listen_vm",
    "open_bulk",
    "open_bulk_queue",
    "open_bulk_queue_sync",
    "open_bulk_sync",
}


def test_all_is_the_expected_list() -> None:
    assert set(gntipc.__all__) == EXPECTED
    assert len(gntipc.__all__) == len(EXPECTED)
    for name in gntipc.__all__:
        assert getattr(gntipc, name) is not None


def test_error_tree() -> None:
    for name in (
        "BackendUnavailable",
        "XenError",
        "XenStoreTimeout",
        "ProtocolError",
        "LocalProtocolError",
        "RemoteProtocolError",
        "MessageTooLarge",
        "MalformedMessage",
        "MappingInUse",
    ):
        assert issubclass(getattr(gntipc, name), gntipc.GntipcError), name
    assert issubclass(gntipc.MalformedMessage, gntipc.RemoteProtocolError)
    assert issubclass(gntipc.XenError, OSError)


def test_stream_is_an_anyio_byte_stream() -> None:
    assert issubclass(gntipc.VchanStream, anyio.abc.ByteStream)
    assert issubclass(gntipc.SessionStream, anyio.abc.ByteStream)
