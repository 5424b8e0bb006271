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
"""

from __future__ import annotations

from ._pair import connect_pair as connect_pair
from ._process import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from ._process import SimProcess as SimProcess
from ._runtime import ServerClient as ServerClient
from ._runtime import SimRuntime as SimRuntime

__all__ = ["DEFAULT_TIMEOUT", "ServerClient", "SimProcess", "SimRuntime", "connect_pair"]
