"""For the queue and session tests: their message type, and connected pairs of byte
streams of every kind the typed layers run over: a vchan on sim, a session stream over a
vchan, loopback TCP, a unix socket, and TLS over loopback TCP (certificates made at test time with
trustme).

``async with stream_pair(kind) as (a, b):`` yields two connected
:class:`anyio.abc.ByteStream` and closes everything afterwards (both ends at once, so
that a graceful TLS close never waits for a peer that is not reading);
``lambda: stream_pair(kind)`` is a stream maker for the conformance suites of
:mod:`gntipc.testing`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
import trustme
from anyio.streams.tls import TLSStream

import gntipc
from gntipc.testing import connect_pair
from gntipc.testing._conformance import Reading as Reading  # the suites' message type
from gntipc.testing._conformance import frame as frame

#: The kinds, as pytest params: a vchan on sim and on real Xen (skipped without it).
KINDS = [
    pytest.param("vchan", id="vchan-sim"),
    pytest.param("vchan-xen", id="vchan-xen", marks=pytest.mark.xen),
    "session",
    "tcp",
    "unix",
    "tls",
]
#: What the conformance suites (gntipc.testing) are told a kind cannot do: anyio's
#: TLSStream has no half-close (its send_eof is not supported), and reports its own close
#: as broken (BrokenResourceError, not ClosedResourceError).
CAPABILITIES: dict[str, dict[str, bool]] = {
    "tls": {"half_close": False, "closed_resource_after_aclose": False},
}
#: The checks those capabilities leave out, and why (the tests skip them by name).
LEFT_OUT = {
    "send_eof_half_closes_one_direction": "half_close",
    "held_back_puts_go_out_before_send_eof": "half_close",
    "use_after_own_close_is_closed_resource": "closed_resource_after_aclose",
}


def capabilities(kind: str, check: str, *names: str) -> dict[str, bool]:
    """The capability arguments ``names`` (those a suite takes) for ``kind``; skips
    ``check`` if they leave it out."""
    given = CAPABILITIES.get(kind, {})
    if not given.get(LEFT_OUT.get(check, ""), True):
        pytest.skip(f"{kind}: {LEFT_OUT[check]}=False (anyio's TLSStream cannot do that)")
    return {name: value for name, value in given.items() if name in names}


_paths = itertools.count()

Pair = tuple[anyio.abc.ByteStream, anyio.abc.ByteStream]


@contextlib.asynccontextmanager
async def vchan_pair(
    ring: int = 65536, backend_name: str = "sim"
) -> AsyncIterator[tuple[gntipc.VchanStream, ...]]:
    """(server, client) VchanStreams over a loopback vchan (sim, or real Xen)."""
    if backend_name == "sim":
        backend = gntipc.get_backend("sim", domid=0)
    else:
        backend = gntipc.get_backend(backend_name)
    made: tuple[gntipc.VchanStream, ...] = ()
    try:
        path = f"data/gntipc-pairs/{os.getpid()}/{next(_paths)}"
        made = await connect_pair(backend, path, read_size=ring, write_size=ring)
        yield made
    finally:
        for s in made:
            await s.aclose()
        backend.close()


@contextlib.asynccontextmanager
async def tcp_pair() -> AsyncIterator[Pair]:
    """(server side, client side) of a loopback TCP connection."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as multi:
        listener = multi.listeners[0]  # one address: one listener
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        accepted: list[anyio.abc.SocketStream] = []
        async with anyio.create_task_group() as tg:

            async def accept() -> None:
                accepted.append(await listener.accept())

            tg.start_soon(accept)
            client = await anyio.connect_tcp("127.0.0.1", port)
    try:
        yield accepted[0], client
    finally:
        await close_both(accepted[0], client)


@contextlib.asynccontextmanager
async def unix_pair() -> AsyncIterator[Pair]:
    """(server side, client side) of a unix socket connection."""
    folder = tempfile.mkdtemp(prefix="gq")  # short: AF_UNIX paths are limited
    try:
        path = os.path.join(folder, "s")
        async with await anyio.create_unix_listener(path) as listener:
            accepted: list[anyio.abc.SocketStream] = []
            async with anyio.create_task_group() as tg:

                async def accept() -> None:
                    accepted.append(await listener.accept())

                tg.start_soon(accept)
                client = await anyio.connect_unix(path)
        try:
            yield accepted[0], client
        finally:
            await close_both(accepted[0], client)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: a fresh CA and a certificate for ``localhost``."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    # No TLS 1.3 session tickets: a client that never reads would leave them unread in
    # its socket, and closing a socket with unread data resets the connection (the
    # peer could lose what was sent before).
    server.num_tickets = 0
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@contextlib.asynccontextmanager
async def tls_pair() -> AsyncIterator[Pair]:
    """(server side, client side) of a TLS connection over loopback TCP; the client
    verifies the server's certificate against a CA made for the test.

    Not ``standard_compatible``: closing one side does not wait for the other's
    close_notify, and the peer sees EndOfStream (the framing above detects a stream
    truncated inside a frame, as HTTP does with a content length)."""
    server_ctx, client_ctx = tls_contexts()
    async with tcp_pair() as (raw_server, raw_client):
        wrapped: dict[str, TLSStream] = {}
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def server() -> None:
                    wrapped["server"] = await TLSStream.wrap(
                        raw_server,
                        server_side=True,
                        ssl_context=server_ctx,
                        standard_compatible=False,
                    )

                tg.start_soon(server)
                wrapped["client"] = await TLSStream.wrap(
                    raw_client,
                    hostname="localhost",
                    ssl_context=client_ctx,
                    standard_compatible=False,
                )
        try:
            yield wrapped["server"], wrapped["client"]
        finally:
            await close_both(wrapped["server"], wrapped["client"])


@contextlib.asynccontextmanager
async def session_pair() -> AsyncIterator[Pair]:
    """(accepted, opened) SessionStreams of two sessions over one loopback vchan."""
    async with vchan_pair() as (srv, cli), gntipc.Session(srv) as s, gntipc.Session(cli) as c:
        opened = await c.open_stream()
        accepted = await s.accept_stream()
        async with opened, accepted:
            yield accepted, opened


async def close_both(a: anyio.abc.AsyncResource, b: anyio.abc.AsyncResource) -> None:
    with anyio.fail_after(10, shield=True):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.aclose)
            tg.start_soon(b.aclose)


@contextlib.asynccontextmanager
async def stream_pair(kind: str) -> AsyncIterator[Pair]:
    """Two connected byte streams of ``kind`` (one of :data:`KINDS`)."""
    pairs = {
        "vchan": vchan_pair,
        "vchan-xen": functools.partial(vchan_pair, backend_name="xen"),
        "session": session_pair,
        "tcp": tcp_pair,
        "unix": unix_pair,
        "tls": tls_pair,
    }
    async with pairs[kind]() as pair:
        yield pair[0], pair[1]
