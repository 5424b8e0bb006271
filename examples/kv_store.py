"""Many clients on one listener: a small key-value service.

    python examples/kv_store.py [--clients 16]    # both VMs on this machine
    python examples/kv_store.py server --peer 5   # in domain 0; stop it with Ctrl-C or SIGTERM
    python examples/kv_store.py client --peer 0   # in domain 5

The server listens at one path and serves every client that connects, each on a vchan of
its own, with Listener.serve (one task per connection); the data is shared.  Requests
and replies are msgspec Structs in one tagged union.  The client role opens --clients
connections at once; each sets its own keys, reads them back and increments a shared
counter, then the counter is read: it must be clients x requests.
"""

from __future__ import annotations

import argparse
import signal
import sys

import anyio
import msgspec

import gntipc

PATH = "data/gntipc-examples/kv"
RING = 4096  # small messages: small rings (one page each way)
MAX_KEYS = 100_000  # the clients are untrusted: bound what they can store


class Get(msgspec.Struct, tag=True):
    key: str


class Set(msgspec.Struct, tag=True):
    key: str
    value: str | int


class Incr(msgspec.Struct, tag=True):
    key: str
    by: int = 1


class Reply(msgspec.Struct, tag=True):
    value: str | int | None = None
    error: str | None = None


Message = Get | Set | Incr | Reply


class KeyValueStore:
    def __init__(self) -> None:
        self.data: dict[str, str | int] = {}
        self.connections = self.requests = 0

    def apply(self, request: Message) -> Reply:
        """One request; no await inside, so each is atomic for the other clients."""
        self.requests += 1
        match request:
            case Get(key):
                return Reply(self.data.get(key))
            case Set(key, value) if key in self.data or len(self.data) < MAX_KEYS:
                self.data[key] = value
                return Reply()
            case Set():
                return Reply(error="the store is full")
            case Incr(key, by):
                value = self.data.get(key, 0)
                if not isinstance(value, int):
                    return Reply(error=f"{key!r} holds a string")
                if key not in self.data and len(self.data) >= MAX_KEYS:
                    return Reply(error="the store is full")
                self.data[key] = value + by
                return Reply(value + by)
            case _:
                return Reply(error=f"not a request: {type(request).__name__}")

    async def handle(self, stream: gntipc.VchanStream) -> None:
        """One client's connection, until it closes."""
        self.connections += 1
        async with gntipc.MessageQueue(stream, Message) as queue:
            async for request in queue:
                await queue.put(self.apply(request))


async def server(peer: int, args: argparse.Namespace) -> None:
    kv = KeyValueStore()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            await gntipc.listen(peer, PATH, read_size=RING, write_size=RING) as listener,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(listener.serve, kv.handle)
            print(f"kv server: serving domain {peer} at {PATH}", flush=True)
            async for signum in signals:
                print(f"kv server: {signal.Signals(signum).name}: stopping", flush=True)
                tg.cancel_scope.cancel()  # every connection is closed on the way out
                break
    print(f"kv server: {kv.connections} connections, {kv.requests} requests", flush=True)


async def client(peer: int, args: argparse.Namespace) -> None:
    async def ask(kv: gntipc.MessageQueue[Message], request: Message) -> str | int | None:
        await kv.put(request)
        reply = await kv.get()
        if not isinstance(reply, Reply) or reply.error is not None:
            raise RuntimeError(f"{request!r}: {reply!r}")
        return reply.value

    async def one_client(i: int) -> None:
        async with (
            await gntipc.connect(peer, PATH, timeout=30) as stream,
            gntipc.MessageQueue(stream, Message) as kv,
        ):
            for j in range(args.requests):
                await ask(kv, Set(f"client-{i}/{j}", f"value {i}.{j}"))
            for j in range(args.requests):
                if (got := await ask(kv, Get(f"client-{i}/{j}"))) != f"value {i}.{j}":
                    raise RuntimeError(f"client {i}: key {j} reads {got!r}")
                await ask(kv, Incr("hits"))

    async with anyio.create_task_group() as tg:
        for i in range(args.clients):
            tg.start_soon(one_client, i)

    async with (
        await gntipc.connect(peer, PATH, timeout=30) as stream,
        gntipc.MessageQueue(stream, Message) as kv,
    ):
        hits = await ask(kv, Get("hits"))
    if hits != args.clients * args.requests:
        raise RuntimeError(f"hits = {hits}, expected {args.clients * args.requests}")
    print(
        f"kv client: {args.clients} clients at once, {args.requests} keys each, "
        f"all read back right; hits = {hits}",
        flush=True,
    )


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
    parser.add_argument("--clients", type=int, default=16, help="client: connections at once")
    parser.add_argument("--requests", type=int, default=50, help="client: keys each one sets")
    args = parser.parse_args()
    if args.role is None:
        import _launch

        _launch.play("kv_store", sys.argv[1:], stop_server=True)
    elif args.peer is None:
        parser.error("a role needs --peer")
    else:
        try:
            anyio.run(server if args.role == "server" else client, args.peer, args)
        except Exception as exc:  # one line, not a traceback
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            raise SystemExit(f"kv_store {args.role}: {type(exc).__name__}: {exc}") from None


if __name__ == "__main__":
    main()
