"""Request/response RPC between two VMs: typed calls, timeouts and cancellation.

    python examples/rpc.py                     # both VMs on this machine
    python examples/rpc.py server --peer 5     # in domain 0: serves domain 5
    python examples/rpc.py client --peer 0     # in domain 5: calls the server in domain 0

The protocol is one tagged union of msgspec Structs (Request | Cancel | Response), so
each side validates whatever arrives.  The client keeps many calls in flight on one
vchan and matches each response to its call by id.  A call has a timeout; when it times
out or its caller is cancelled, the client sends Cancel and the server cancels the work.
An exception in the server comes back as RemoteError.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys

import anyio
import msgspec

import gntipc

PATH = "data/gntipc-examples/rpc"
MAX_IN_FLIGHT = 256  # calls the server runs at once for its client (the peer is untrusted)


# -- the protocol ------------------------------------------------------------------------
class Hash(msgspec.Struct, tag=True):
    """Return the SHA-256 of ``data``."""

    data: bytes


class Sleep(msgspec.Struct, tag=True):
    """Wait ``seconds`` (0 to 60), then return them: a slow call."""

    seconds: float


class Stats(msgspec.Struct, tag=True):
    """Return the server's counters."""


Call = Hash | Sleep | Stats
Result = bytes | float | dict[str, int] | None


class Request(msgspec.Struct, tag=True):
    id: int
    call: Call


class Cancel(msgspec.Struct, tag=True):
    """The client no longer wants the result of request ``id``."""

    id: int


class Response(msgspec.Struct, tag=True):
    id: int
    result: Result = None
    error: str | None = None


Message = Request | Cancel | Response


# -- the server --------------------------------------------------------------------------
class RpcServer:
    """Runs each request in a task of its own; a Cancel cancels its task."""

    def __init__(self, queue: gntipc.MessageQueue[Message]) -> None:
        self.queue = queue
        self.send_lock = anyio.Lock()  # one put at a time (else BusyResourceError)
        self.running: dict[int, anyio.CancelScope] = {}
        self.stats = {"calls": 0, "cancelled": 0}

    async def run(self) -> None:
        """Serve until the client ends the stream (then wait for the calls running)."""
        async with anyio.create_task_group() as tg:
            async for message in self.queue:
                match message:
                    case Request(id=id) if len(self.running) >= MAX_IN_FLIGHT:
                        await self.reply(Response(id, error="busy: too many calls in flight"))
                    case Request(id=id):
                        # Registered before the task starts: a Cancel right behind the
                        # request finds it.
                        self.running[id] = scope = anyio.CancelScope()
                        tg.start_soon(self.answer, message, scope)
                    case Cancel(id=id) if id in self.running:
                        self.running.pop(id).cancel()
                        self.stats["cancelled"] += 1

    async def answer(self, request: Request, scope: anyio.CancelScope) -> None:
        with scope:
            try:
                response = Response(request.id, result=await self.execute(request.call))
            except Exception as exc:
                response = Response(request.id, error=f"{type(exc).__name__}: {exc}")
            self.running.pop(request.id, None)  # (gone if a Cancel came first)
            await self.reply(response)

    async def reply(self, response: Response) -> None:
        async with self.send_lock:
            await self.queue.put(response)

    async def execute(self, call: Call) -> Result:
        self.stats["calls"] += 1
        match call:
            case Hash(data):
                return hashlib.sha256(data).digest()
            case Sleep(seconds):
                if not 0 <= seconds <= 60:
                    raise ValueError(f"cannot sleep {seconds} s (0 to 60)")
                await anyio.sleep(seconds)
                return seconds
            case Stats():
                return dict(self.stats)


async def server(peer: int, args: argparse.Namespace) -> None:
    async with await gntipc.listen(peer, PATH) as listener:
        print(f"rpc server: listening at {PATH} for domain {peer}", flush=True)
        async with (
            await listener.accept() as stream,
            gntipc.MessageQueue(stream, Message) as queue,
        ):
            rpc = RpcServer(queue)
            await rpc.run()
    print(f"rpc server: the client left; {rpc.stats}", flush=True)


# -- the client --------------------------------------------------------------------------
class RemoteError(Exception):
    """The server failed to execute a call."""


class _Pending:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.response: Response | None = None


class RpcClient:
    """Calls over one queue; run :meth:`receive_responses` in a task alongside."""

    def __init__(self, queue: gntipc.MessageQueue[Message]) -> None:
        self.queue = queue
        self.send_lock = anyio.Lock()
        self.ids = itertools.count()
        self.pending: dict[int, _Pending] = {}
        self.cancels_sent = 0

    async def receive_responses(self) -> None:
        """Hand each response to its caller, until the server ends the stream."""
        try:
            async for message in self.queue:
                if isinstance(message, Response) and (call := self.pending.get(message.id)):
                    call.response = message
                    call.done.set()
        finally:  # the calls still waiting fail (their response is None)
            for call in self.pending.values():
                call.done.set()

    async def call(self, call: Call, *, timeout: float = 30) -> Result:
        """Execute ``call`` in the server.

        Raises:
            TimeoutError: no response within ``timeout`` seconds (the server was told
                to cancel the call).
            RemoteError: the call failed in the server.
            anyio.BrokenResourceError: the connection ended before the response.

        Cancellation: the server is told to cancel the call (if the request went out).
        """
        id = next(self.ids)
        self.pending[id] = pending = _Pending()
        sent = False
        try:
            with anyio.fail_after(timeout):
                async with self.send_lock:
                    await self.queue.put(Request(id, call))  # all or nothing: fits the ring
                sent = True
                await pending.done.wait()
        except (TimeoutError, anyio.get_cancelled_exc_class()):
            if sent:
                await self._cancel(id)
            raise
        finally:
            del self.pending[id]
        if pending.response is None:
            raise anyio.BrokenResourceError("the connection ended before the response")
        if pending.response.error is not None:
            raise RemoteError(pending.response.error)
        return pending.response.result

    async def _cancel(self, id: int) -> None:
        # Shielded: we are being cancelled, yet the server must hear of it.
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                async with self.send_lock:
                    await self.queue.put(Cancel(id))
                self.cancels_sent += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the connection is gone, and the call with it


async def client(peer: int, args: argparse.Namespace) -> None:
    async with (
        await gntipc.connect(peer, PATH, timeout=30) as stream,
        gntipc.MessageQueue(stream, Message) as queue,
        anyio.create_task_group() as tg,
    ):
        rpc = RpcClient(queue)
        tg.start_soon(rpc.receive_responses)

        # Many calls in flight at once on one channel, each answer matched to its call.
        blobs = [os.urandom(size) for size in range(0, 65536, 512)]
        wrong: list[int] = []

        async def check_hash(blob: bytes) -> None:
            if await rpc.call(Hash(blob)) != hashlib.sha256(blob).digest():
                wrong.append(len(blob))

        async with anyio.create_task_group() as calls:
            for blob in blobs:
                calls.start_soon(check_hash, blob)
        if wrong:
            raise RuntimeError(f"wrong hashes for the blobs of sizes {wrong}")
        print(f"rpc client: {len(blobs)} concurrent calls, every answer right", flush=True)

        # An exception in the server.
        try:
            await rpc.call(Sleep(-1))
        except RemoteError as exc:
            print(f"rpc client: remote error: {exc}", flush=True)
        else:
            raise RuntimeError("Sleep(-1) did not fail")

        # A timeout: the client gives up and the server cancels the call.
        try:
            await rpc.call(Sleep(60), timeout=0.5)
        except TimeoutError:
            print("rpc client: Sleep(60) timed out after 0.5 s", flush=True)
        else:
            raise RuntimeError("Sleep(60) did not time out")

        # Cancellation: race two calls; the winner cancels the loser.
        async with anyio.create_task_group() as race:

            async def first(call: Call) -> None:
                winner = await rpc.call(call)
                print(f"rpc client: the race was won by {call!r} ({winner})", flush=True)
                race.cancel_scope.cancel()

            race.start_soon(first, Sleep(60))
            race.start_soon(first, Sleep(0.1))

        stats = await rpc.call(Stats())
        print(f"rpc client: server stats {stats}, {rpc.cancels_sent} cancels sent", flush=True)
        if not isinstance(stats, dict) or stats["cancelled"] != rpc.cancels_sent:
            raise RuntimeError("the server did not cancel every call the client gave up")
        tg.cancel_scope.cancel()  # stop receiving; closing the queue ends the server's loop
    print("rpc client: ok", flush=True)


# -- The command line ---------------------------------------------------------------------
# With a role, this file is all a VM needs.  Without one, examples/_launch.py (not part of
# the example) plays both VMs on this machine, running this file once per role.


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "role",
        nargs="?",
        choices=["server", "client"],
        help="the side to run in this VM (default: both, on this machine)",
    )
    parser.add_argument("--peer", type=int, help="with a role: the other VM's domain id")
    args = parser.parse_args()
    if args.role is None:
        import _launch

        _launch.play("rpc", sys.argv[1:])
    elif args.peer is None:
        parser.error("a role needs --peer")
    else:
        try:
            anyio.run(server if args.role == "server" else client, args.peer, args)
        except Exception as exc:  # one line, not a traceback
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            raise SystemExit(f"rpc {args.role}: {type(exc).__name__}: {exc}") from None


if __name__ == "__main__":
    main()
