"""The ``gntipc`` command: a netcat for vchans, and a few backend tools.

    gntipc info                       which backend, which domain
    gntipc listen PEER PATH           serve one client; stdin -> peer, peer -> stdout
    gntipc connect PEER PATH          connect to a server; stdin -> peer, peer -> stdout
    gntipc sim-kill-domain DOMID      make a simulated domain die (no unmap notifications)

``--backend`` (or ``GNTIPC_BACKEND``) picks ``xen`` or ``sim``; ``GNTIPC_SIM_DOMID`` sets
the simulated domain of this process.  Exit status: 0 on a clean end of stream, 1 when
the peer broke the channel, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import BinaryIO

import anyio
import anyio.to_thread

from ._exceptions import GntipcError
from .backends import Backend, get_backend, select_backend_name
from .streams import VchanStream, connect, listen

__all__ = ["main"]

_CHUNK = 65536


async def _pump(stream: VchanStream, stdin: BinaryIO, stdout: BinaryIO) -> None:
    read: Callable[[int], bytes] = getattr(stdin, "read1", stdin.read)

    async def upstream() -> None:
        while True:
            # stdin may be a terminal or a pipe: read it in a worker thread so the
            # event loop keeps serving the other direction.
            data = await anyio.to_thread.run_sync(read, _CHUNK)
            if not data:
                await stream.send_eof()
                return
            await stream.send(data)

    async with anyio.create_task_group() as tg:
        tg.start_soon(upstream)
        try:
            async for data in stream:
                stdout.write(data)
                stdout.flush()
        except BaseException:
            tg.cancel_scope.cancel()
            raise
        # the peer finished sending; finish ours (the task group waits for upstream)


async def _run(args: argparse.Namespace, backend: Backend) -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if args.command == "listen":
        async with (
            await listen(args.peer, args.path, backend=backend) as listener,
            await listener.accept() as stream,
        ):
            await _pump(stream, stdin, stdout)
    else:
        async with await connect(args.peer, args.path, timeout=args.timeout, backend=backend) as s:
            await _pump(s, stdin, stdout)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gntipc`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gntipc", description="vchan tools (gntipc)")
    parser.add_argument("--backend", choices=["xen", "sim"], default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show the backend and our domain id")
    for name in ("listen", "connect"):
        p = sub.add_parser(name, help=f"{name} and copy stdin/stdout")
        p.add_argument("peer", type=int, help="the other side's domid")
        p.add_argument("path", help="store path (relative to the server's home)")
        if name == "connect":
            p.add_argument("--timeout", type=float, default=30.0)
    kill = sub.add_parser("sim-kill-domain", help="kill a simulated domain")
    kill.add_argument("domid", type=int)
    args = parser.parse_args(argv)

    try:
        if args.command == "sim-kill-domain":
            from .backends.sim import kill_domain

            pids = kill_domain(args.domid)
            print(f"domain {args.domid}: killed {len(pids)} processes")
            return 0
        with get_backend(args.backend) as backend:
            if args.command == "info":
                print(f"backend {select_backend_name(args.backend)}, domain {backend.domid}")
                return 0
            anyio.run(_run, args, backend)
    except anyio.BrokenResourceError as exc:
        print(f"gntipc: the channel broke: {exc}", file=sys.stderr)
        return 1
    except (GntipcError, TimeoutError) as exc:
        print(f"gntipc: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
