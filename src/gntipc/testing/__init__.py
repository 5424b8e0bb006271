"""Test your own gntipc service without Xen: a private simulated hypervisor per test.

The pytest plugin (registered as ``gntipc``, loaded automatically once gntipc is
installed; every fixture is opt-in by name) provides:

``gntipc_sim``
    a :class:`SimRuntime` of the test's own; this process plays domain 0 of it, and the
    test fails at teardown if anything was left behind;
``gntipc_stream_pair``
    two connected :class:`gntipc.VchanStream` (server in domain 0, client in domain 1),
    for tests run by anyio's pytest plugin (asyncio, trio) or by pytest-asyncio;
``gntipc_server_client``
    ``gntipc_server_client(server, client)`` runs a server function and a client function
    in two processes playing two domains (:meth:`SimRuntime.server_client`).

Processes are :class:`SimProcess` objects (``kill()`` one to crash it); a whole domain
dies with :meth:`SimRuntime.kill_domain`.  :class:`SimRuntime` works without pytest too,
as a context manager.  :func:`connect_pair` makes a connected server and client stream
on any backend (sim or Xen), e.g. for fixtures of your own.

The conformance suites gntipc runs on every stream it makes are yours too, for a stream
of your own (a wrapper around a gntipc stream, say): :func:`check_byte_stream`,
:func:`check_message_queue` and :func:`check_session` take a factory of connected pairs
and raise :class:`AssertionError` naming the check that failed.
"""

from __future__ import annotations

from ._conformance import BYTE_STREAM_CHECKS as BYTE_STREAM_CHECKS
from ._conformance import MESSAGE_QUEUE_CHECKS as MESSAGE_QUEUE_CHECKS
from ._conformance import SESSION_CHECKS as SESSION_CHECKS
from ._conformance import StreamMaker as StreamMaker
from ._conformance import check_byte_stream as check_byte_stream
from ._conformance import check_message_queue as check_message_queue
from ._conformance import check_session as check_session
from ._pair import connect_pair as connect_pair
from ._process import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from ._process import SimProcess as SimProcess
from ._runtime import ServerClient as ServerClient
from ._runtime import SimRuntime as SimRuntime

__all__ = [
    "BYTE_STREAM_CHECKS",
    "DEFAULT_TIMEOUT",
    "MESSAGE_QUEUE_CHECKS",
    "SESSION_CHECKS",
    "ServerClient",
    "SimProcess",
    "SimRuntime",
    "StreamMaker",
    "check_byte_stream",
    "check_message_queue",
    "check_session",
    "connect_pair",
]
