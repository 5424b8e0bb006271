"""connect_pair: a server and a client stream of one channel, made in this process."""

from __future__ import annotations

import anyio

from ..backends import Backend
from ..streams import VchanStream, connect, listen
from ._process import DEFAULT_TIMEOUT

__all__ = ["connect_pair"]


async def connect_pair(
    server_backend: Backend,
    path: str,
    *,
    client_backend: Backend | None = None,
    read_size: int = 65536,
    write_size: int = 65536,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[VchanStream, VchanStream]:
    """Listen at ``path`` with ``server_backend``, accept in a task and connect to it with
    ``client_backend`` (default: the same backend, a loopback channel); returns
    ``(server, client)``, both yours to close.  Works on every backend (sim or Xen);
    ``read_size`` / ``write_size`` are the server's ring sizes, as for
    :func:`gntipc.listen`.  The listener is closed before this returns, and on any
    failure nothing is left open.

    Raises:
        TimeoutError: the two did not connect within ``timeout`` seconds.
        ValueError: bad path or ring sizes.
    """
    client_backend = client_backend or server_backend
    made: list[VchanStream] = []
    try:
        with anyio.fail_after(timeout):
            async with await listen(
                client_backend.domid,
                path,
                read_size=read_size,
                write_size=write_size,
                backend=server_backend,
            ) as listener:

                async def accept() -> None:
                    made.insert(0, await listener.accept())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(accept)
                    made.append(await connect(server_backend.domid, path, backend=client_backend))
    except BaseException:
        with anyio.CancelScope(shield=True):
            for stream in made:
                await stream.aclose()
        raise
    server, client = made
    return server, client
