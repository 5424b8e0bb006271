"""The ``gntipc`` command: a netcat and a socket bridge for vchans, a diagnosis, benchmarks.

    gntipc info                       which backend, which domain
    gntipc listen PEER PATH           serve one client; stdin -> peer, peer -> stdout
    gntipc connect PEER PATH          connect to a server; stdin -> peer, peer -> stdout
                                      (--progress: bytes and rates on stderr;
                                      --close-on-eof: exit when stdin ends;
                                      --resume on both sides: a pipe that survives the
                                      vchan breaking)
    gntipc proxy PEER PATH SOCKET     bridge a vchan and a unix/TCP socket (vchan-socket-proxy)
    gntipc doctor                     check the backend, devices, limits and store; advice
    gntipc bench                      run the benchmarks of a source checkout
    gntipc sim-kill-domain DOMID      make a simulated domain die (no unmap notifications)
    gntipc sim-restore-domain DOMID   save + restore a simulated domain: it dies for its
                                      peers, its processes go on as a new domid (--as)

listen and connect pass the end of stdin on to the peer as EOF (a half-close) and go on
copying the peer to stdout until the peer ends its side too; with ``--close-on-eof`` (as
netcat's ``-N``/``-q 0``) they exit when stdin ends, after sending EOF.  One listener
per path: a ``listen`` or ``proxy --mode server`` on a path that another one serves is
refused (``listen`` frees its path once its client is connected; with ``--resume`` it
keeps it for its client's reconnections).

With ``--resume`` (on both sides) the pipe is a :class:`gntipc.ResumableStream`: when the
vchan breaks (the channel closed under it, a peer's domain restored), the client connects
again and both sides replay what the other did not receive, so nothing is lost,
duplicated or reordered while both processes live; a peer that does not come back within
``--give-up`` seconds ends the pipe (exit 1).  When the store says which VM the peer
domain is (to dom0 it does), both follow that VM: restored or migrated under a new domid,
it is served there (``listen``: :func:`gntipc.listen_vm`) or found there (``connect``).

``--backend`` (or ``GNTIPC_BACKEND``) picks ``xen`` or ``sim``; ``GNTIPC_SIM_DOMID`` sets
the simulated domain of this process, ``--sim-page-limit`` (or ``GNTIPC_SIM_PAGE_LIMIT``)
how many pages it may share at once (gntalloc's limit on Xen).  ``gntipc COMMAND --help``
describes each command.

Exit status:
    0  success: a clean end of stream; proxy stopped by SIGINT/SIGTERM; doctor found
       nothing wrong
    1  failure at run time: the peer broke the channel, no server within the timeout, a
       Xen or store error, a benchmark failed
    2  bad usage (bad arguments)
    3  something needed is missing: the backend cannot run here, doctor found a
       problem, the benchmarks are not available
    130 interrupted (SIGINT) during listen/connect

Errors are reported on one line of standard error, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import BinaryIO

import anyio
import anyio.to_thread
from anyio.abc import ByteStream

from .._exceptions import BackendUnavailable, GntipcError, LocalProtocolError
from .._progress import Progress
from ..backends import Backend, get_backend, select_backend_name
from ..resume import ResumableListener, ResumableStream
from ..streams import Listener, VchanStream, connect, listen
from ..vm import VmListener, domain_of_vm, listen_vm, vm_of_domain
from . import _bench, _doctor, _proxy

__all__ = ["EXIT_FAILURE", "EXIT_MISSING", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MISSING = 3
EXIT_INTERRUPTED = 130

_CHUNK = 65536

_EPILOG = """\
exit status: 0 success (clean end of stream; proxy stopped by SIGINT/SIGTERM; doctor: all
well), 1 failure at run time (channel broken, timeout, Xen or store error, benchmark
failed), 2 bad usage, 3 something missing (backend unavailable, doctor found a problem,
benchmarks not available), 130 interrupted.  Environment: GNTIPC_BACKEND (xen|sim),
GNTIPC_SIM_DOMID (our simulated domain), GNTIPC_SIM_DIR (sim state directory)."""

_PROXY_EPILOG = (
    """\
examples (domain 0 serves a unix socket program to domain 5; a client there uses it):
  in domain 0:  gntipc proxy --mode server 5 data/vchan/5/web tcp:127.0.0.1:8080
  in domain 5:  gntipc proxy 0 data/vchan/5/web /run/web.sock
Plain mode uses one vchan per connection and interoperates with Xen's vchan-socket-proxy
on the other side, in either role, connection after connection; the server side sizes
each vchan's rings to the domain's grant page budget so that --max-connections fit (gntipc
doctor reports the budget; the sim's: --sim-page-limit).  --mux carries every connection
over one vchan (gntipc proxy --mux on both sides); --mux --resume makes that session
survive the vchan breaking.  A half-close (shutdown SHUT_WR)
crosses over to a gntipc peer and in --mux; with a plain libxenvchan peer a socket's EOF
closes the vchan and the vchan's end closes the socket.  Runs until SIGINT/SIGTERM; --mux
in client mode also ends when the peer closes the session; SOCKET - serves one connection
on stdin/stdout.

"""
    + _EPILOG
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


async def _pump(
    stream: ByteStream,
    stdin: BinaryIO,
    stdout: BinaryIO,
    progress: Progress | None = None,
    *,
    close_on_eof: bool = False,
) -> None:
    """Copy ``stdin`` to the peer and the peer to ``stdout``.  The end of ``stdin`` is
    sent as EOF; then, with ``close_on_eof``, we stop (whatever the peer still sends is
    dropped), else we go on until the peer ends its side."""
    read: Callable[[int], bytes] = getattr(stdin, "read1", stdin.read)

    async def upstream() -> None:
        while True:
            # stdin may be a terminal or a pipe: read it in a worker thread so the
            # event loop keeps serving the other direction.
            data = await anyio.to_thread.run_sync(read, _CHUNK)
            if not data:
                await stream.send_eof()
                if close_on_eof:
                    tg.cancel_scope.cancel()
                return
            await stream.send(data)
            if progress is not None:
                progress.add(sent=len(data))

    async with anyio.create_task_group() as tg:
        tg.start_soon(upstream)
        try:
            async for data in stream:
                stdout.write(data)
                stdout.flush()
                if progress is not None:
                    progress.add(received=len(data))
        except BaseException:
            tg.cancel_scope.cancel()
            raise
        # the peer finished sending; finish ours (the task group waits for upstream)


async def _stdio_pump(
    stream: ByteStream, show_progress: bool = False, *, close_on_eof: bool = False
) -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if not show_progress:
        await _pump(stream, stdin, stdout, close_on_eof=close_on_eof)
        return
    with Progress() as progress:
        await _pump(stream, stdin, stdout, progress, close_on_eof=close_on_eof)


async def _netcat(args: argparse.Namespace, backend: Backend) -> None:
    if args.resume:
        await _resumable_netcat(args, backend)
    elif args.command == "listen":
        # One client: the path is free again once it is accepted (as netcat's listening
        # socket is closed), so another listener may take it while we copy.
        async with await listen(args.peer, args.path, backend=backend) as listener:
            stream = await listener.accept()
        async with stream:
            await _stdio_pump(stream, args.progress, close_on_eof=args.close_on_eof)
    else:
        async with await connect(args.peer, args.path, timeout=args.timeout, backend=backend) as s:
            await _stdio_pump(s, args.progress, close_on_eof=args.close_on_eof)


async def _resumable_netcat(args: argparse.Namespace, backend: Backend) -> None:
    """``--resume``: the pipe over a ResumableStream; the listener stays for the
    client's reconnections.  Both sides follow the peer's VM (when the store tells us
    which VM the peer domain is: to dom0, it does): restored or migrated under a new
    domid, it is served (listen) or found (connect) there."""
    vm = await anyio.to_thread.run_sync(vm_of_domain, backend.store, args.peer)
    if args.command == "listen":
        transport: Listener | VmListener = (
            await listen(args.peer, args.path, backend=backend)
            if vm is None
            else await listen_vm(vm, args.path, backend=backend)
        )
        async with (
            transport,
            ResumableListener(transport, give_up_after=args.give_up) as resumable,
            await resumable.accept() as stream,
        ):
            await _stdio_pump(stream, args.progress, close_on_eof=args.close_on_eof)
        return
    peer = args.peer

    async def dial() -> VchanStream:
        nonlocal peer
        if vm is not None:
            now = await anyio.to_thread.run_sync(domain_of_vm, backend.store, vm, peer)
            peer = peer if now is None else now
        return await connect(peer, args.path, timeout=args.timeout, backend=backend)

    async with ResumableStream.client(dial, give_up_after=args.give_up) as stream:
        await _stdio_pump(stream, args.progress, close_on_eof=args.close_on_eof)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gntipc",
        description=(
            "vchan tools: shared-memory channels between Xen domains (or the simulated"
            " hypervisor, sim)"
        ),
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--backend",
        choices=["xen", "sim"],
        default=None,
        help="the backend (default: $GNTIPC_BACKEND, else xen when /dev/xen/gntdev exists,"
        " else sim)",
    )
    parser.add_argument(
        "--sim-page-limit",
        type=int,
        metavar="PAGES",
        help="sim: how many pages this domain may share at once, as gntalloc's limit on Xen"
        " (default: $GNTIPC_SIM_PAGE_LIMIT, else 1024); a 64 KiB vchan takes 33",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, epilog: str = _EPILOG) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=_Formatter
        )

    command("info", "show the backend and our domain id")
    for name, what in (
        ("listen", "serve one client of domain PEER at PATH"),
        ("connect", "connect to the server in domain PEER at PATH"),
    ):
        p = command(name, f"{what}; copy stdin to the peer and the peer to stdout")
        p.add_argument("peer", type=int, help="the other side's domain id")
        p.add_argument(
            "path",
            help="store path (relative: under the server's home /local/domain/<server>/)",
        )
        p.add_argument(
            "--progress",
            action="store_true",
            help="show bytes each way and their rates on stderr (tqdm bars if tqdm is"
            " installed: pip install 'gntipc[progress]')",
        )
        p.add_argument(
            "-N",
            "--close-on-eof",
            action="store_true",
            help="exit when stdin ends, after sending EOF to the peer (as netcat -N);"
            " default: send EOF and go on copying the peer to stdout until the peer ends"
            " its side too",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="a pipe that survives the vchan breaking (give it to both sides): the"
            " client connects again and both sides replay what the other missed",
        )
        p.add_argument(
            "--give-up",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="with --resume: end the pipe (exit 1) when the peer has not come back"
            " within this long after a break (default 30)",
        )
        if name == "connect":
            p.add_argument(
                "--timeout",
                type=float,
                default=30.0,
                help="seconds to wait for the server (default 30)",
            )
    _proxy.add_arguments(
        command(
            "proxy",
            "bridge a vchan and a local unix or TCP socket (like Xen's vchan-socket-proxy)",
            _PROXY_EPILOG,
        )
    )
    _doctor.add_arguments(
        command(
            "doctor",
            "check what gntipc needs here (backend, domain, devices and limits, store, sim"
            " state) and advise on each problem",
        )
    )
    _bench.add_arguments(
        command(
            "bench",
            "run the benchmarks (benchmarks/run.py of a source checkout; they are not part"
            " of an installed wheel)",
            _bench.EPILOG + "\n\n" + _EPILOG,
        )
    )
    kill = command("sim-kill-domain", "kill a simulated domain (sim backend only)")
    kill.add_argument("domid", type=int, help="the simulated domain to kill")
    restore = command(
        "sim-restore-domain",
        "do to a simulated domain what xl save + xl restore (or a migration) does: it dies"
        " for its peers (ports, grants and home gone) and comes back as a new domid with"
        " the same name and UUID, its processes running on (sim backend only)",
    )
    restore.add_argument("domid", type=int, help="the simulated domain to restore")
    restore.add_argument(
        "--as",
        dest="new_domid",
        type=int,
        metavar="NEWID",
        help="its domid after the restore (default: the next free one, as Xen allocates)",
    )
    return parser


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        # (asyncio's CancelledError, trio's Cancelled: no event loop runs any more)
        inner = [e for e in exc.exceptions if "Cancel" not in type(e).__name__]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _about(exc: BaseException, args: argparse.Namespace) -> str:
    """The message of ``exc``, naming the proxy's SOCKET when an OS error does not say
    what it is about (anyio's bind errors: "[Errno 98] Address already in use")."""
    message = str(exc) or type(exc).__name__
    if (
        args.command == "proxy"
        and isinstance(exc, OSError)
        and not isinstance(exc, GntipcError | TimeoutError)
        and exc.filename is None
        and exc.strerror
        and args.socket != "-"
    ):
        # Vchan errors are GntipcError and per-connection socket errors are logged, so an
        # OS error that ends the proxy comes from its listening socket.
        address = _proxy.parse_socket_address(args.socket)
        where = address.path if address.kind == "unix" else str(address)
        if where not in exc.strerror:
            return f"{address}: {exc.strerror}"
    return message


def _fail(message: str, code: int) -> int:
    print(f"gntipc: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    if args.sim_page_limit is not None:
        if args.sim_page_limit < 1:
            raise _proxy.UsageError(
                f"--sim-page-limit must be at least 1, not {args.sim_page_limit}"
            )
        # The sim backend reads it when it opens (the doctor's report too).
        os.environ["GNTIPC_SIM_PAGE_LIMIT"] = str(args.sim_page_limit)
    if args.command == "sim-kill-domain":
        from ..backends.sim import kill_domain

        pids = kill_domain(args.domid)
        print(f"domain {args.domid}: killed {len(pids)} processes")
        return EXIT_OK
    if args.command == "sim-restore-domain":
        from ..backends.sim import restore_domain

        new = restore_domain(args.domid, args.new_domid)
        print(f"domain {args.domid}: restored as domain {new}")
        return EXIT_OK
    if args.command == "doctor":
        return _doctor.run(args)
    if args.command == "bench":
        return _bench.run(args)
    with get_backend(args.backend) as backend:
        if args.command == "info":
            print(f"backend {select_backend_name(args.backend)}, domain {backend.domid}")
        elif args.command == "proxy":
            anyio.run(_proxy.run_proxy, args, backend, _stdio_pump)
        else:
            anyio.run(_netcat, args, backend)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gntipc`` command; returns the exit status (see the module
    docstring).  Bad arguments exit with status 2 (argparse's SystemExit)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except BaseException as raised:
        exc = _leaf(raised)
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if isinstance(exc, _proxy.UsageError | LocalProtocolError):
            return _fail(f"{args.command}: {exc} (see gntipc {args.command} --help)", EXIT_USAGE)
        if isinstance(exc, BackendUnavailable):
            return _fail(f"{exc} (see: gntipc doctor)", EXIT_MISSING)
        if isinstance(exc, anyio.BrokenResourceError):
            return _fail(f"the channel broke: {exc or 'the peer is gone'}", EXIT_FAILURE)
        if isinstance(exc, GntipcError | TimeoutError | OSError | ValueError):
            return _fail(_about(exc, args), EXIT_FAILURE)
        if exc is not raised:
            raise exc from raised
        raise
