"""Our side of the bulk fuzzer (run as a script, possibly with the C core built with
AddressSanitizer): a real bulk channel (``gntipc.bulk``) over each connection to the
hostile bulk peer (``_fuzz_bulk``), lending and receiving at random.

    python -m stress._fuzz_bulk_target ROLE PEER PATH SEED OPS RESULT

Arguments, result file and leak checks are those of :mod:`stress._fuzz_target` (the
fuzz harness of ``test_fuzz`` runs both).  Each connection (an *episode*) opens the bulk
layer with a random pool (none, or 1 to 4 buffers of 4 or 8 KiB) and a random limit on
the peer's pool, through the async API (:class:`gntipc.bulk.BulkChannel`, or a
:class:`gntipc.bulk.BulkQueue` of messages on one) or the sync one
(:class:`gntipc.bulk.SyncBulkChannel` or :class:`gntipc.bulk.SyncBulkQueue`, over the
stream's vchan), then does random operations: loans filled and sent whole or in part
(or not sent), loans waiting for a buffer the peer may never release (cut short by a
deadline: backpressure, never a deadlock), receptions, releases (some twice), puts with
and without a loan, gets, views held across operations and across the close, a lend
and a receive at once, EOF.

Checked on every operation: only documented errors, within the deadline (a hang kills the
process with faulthandler's stacks); a received view lies inside the peer's buffer and
shows the bytes the hostile peer wrote there (when the pages are the pool it filled, see
:func:`genuine`), at reception and again at the close; a message is of the queue's type;
no loan stays with the application after its block ends; our pool's buffers are all free
or on loan to the peer between operations; the close unmaps both pools.  The result
also lists the connections on which we raised RemoteProtocolError (see ``_fuzz_bulk``).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._common import expected, time_scale
from ._fuzz_target import Msg, Target, main

SCALE = time_scale()
#: The pattern the hostile peer fills its pool with (byte ``p`` of the pool is byte
#: ``p`` of the pattern stream of this salt), and the one we fill our loans with (byte
#: ``j`` of a buffer).
POOL_SALT = 1009
LOAN_SALT = 2003
#: Bytes of the pool's start that tell the hostile peer's pool from other pages.
MARK = 64
#: Timeout given to each waiting operation.
OP_TIMEOUT = 0.01
#: How long opening the bulk layer may wait for the peer's HELLO.
OPEN_TIMEOUT = 0.3 * SCALE


def genuine(view: memoryview | None) -> bool:
    """True if the mapped peer pool starts with the hostile peer's pattern: then every
    received view must show the pattern too (a HELLO may name other pages that the
    peer may grant: a decoy pool, or pages that are not its pool; their bytes are
    anyone's)."""
    return (
        view is not None
        and len(view) >= MARK
        and bytes(view[:MARK]) == expected(POOL_SALT, 0, MARK)
    )


class BulkTarget(Target):
    EPISODE_OPS = (3, 30)

    def __init__(self, rnd: random.Random, backend: object) -> None:
        super().__init__(rnd, backend)
        gntipc = self.gntipc
        self.seq = 0
        #: The connections (their presence values) on which we raised RemoteProtocolError
        #: (not MalformedMessage): the test checks it against the lies the peer says we
        #: read.
        self.broken: list[str] = []
        self.raised = False
        self.allowed = (
            gntipc.MessageTooLarge,  # (a put of more than the queue's max_put_size)
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.WouldBlock,
            TimeoutError,
            gntipc.RemoteProtocolError,
        )

    # -- opening ------------------------------------------------------------------------
    async def open(self, stream: Any, mode: str) -> Any:
        """The bulk channel over ``stream``, or (``mode`` "... queue") the message queue
        on one (None: the open failed as documented; the stream is closed then)."""
        from gntipc.bulk import open_bulk, open_bulk_queue, open_bulk_queue_sync, open_bulk_sync

        rnd = self.rnd
        buffers = rnd.choice((0, 1, 2, 2, 4))
        kw = {
            "buffers": buffers,
            "buffer_size": rnd.choice((4096, 8192)) if buffers else 0,
            "max_peer_pages": rnd.choice((2, 8, 64, 16384)),
            "timeout": OPEN_TIMEOUT,
        }
        self.ops += 1
        most = rnd.choice((None, 64, 4096))
        try:
            if mode == "sync":
                bulk = open_bulk_sync(stream.vchan, **kw)
            elif mode == "async":
                bulk = await open_bulk(stream, **kw)
            elif mode == "sync queue":
                bulk = open_bulk_queue_sync(stream.vchan, Msg, max_message_size=most, **kw)
            else:
                bulk = await open_bulk_queue(stream, Msg, max_message_size=most, **kw)
        except self.allowed as exc:
            self.note(exc)
            self.outcomes[f"open: {type(exc).__name__}"] += 1
            return None
        except self.gntipc.LocalProtocolError as exc:
            if "too small" not in str(exc):  # the peer's pool can outgrow the rings
                self.fail(f"{mode} open", exc)
            self.outcomes["open: rings too small"] += 1
            return None
        except Exception as exc:
            self.fail(f"{mode} open", exc)
            return None
        self.outcomes["open: ok"] += 1
        return bulk

    # -- checks -----------------------------------------------------------------------
    def check_view(self, bulk: Any, item: Any) -> None:
        """A received view: inside the peer's buffer, read-only, every byte readable,
        and the pattern when the pages are the hostile peer's pool."""
        view = item.view
        size = bulk.peer_buffer_size
        where = f"view {item!r} of a pool of {bulk.peer_buffers} x {size}"
        if not (0 <= item.buffer < bulk.peer_buffers and item.offset + item.length <= size):
            self.fail("receive", f"{where}: outside the peer's pool")
            return
        if not view.readonly or len(view) != item.length:
            self.fail("receive", f"{where}: readonly {view.readonly}, {len(view)} bytes")
            return
        data = bytes(view)  # every byte: a view past the mapping would fault here
        if data == expected(POOL_SALT, item.buffer * size + item.offset, item.length):
            self.outcomes["view: pattern ok"] += 1
        elif genuine(bulk._peer_view):
            self.fail("receive", f"{where}: not the bytes the peer lent")
        else:
            self.outcomes["view: pages not the peer's pool"] += 1

    def check_pool(self, bulk: Any) -> None:
        """Between operations: no loan is left with the application, and each buffer of
        our pool is free or the peer's."""
        proto = bulk._proto
        if bulk._lent:
            self.fail("invariant", f"loans left with the application: {list(bulk._lent)}")
        if not bulk.closed and proto.free_count + proto.sent_count != proto.buffers:
            self.fail(
                "invariant",
                f"{proto.free_count} free + {proto.sent_count} sent of {proto.buffers} buffers",
            )

    # -- operations ---------------------------------------------------------------------
    def async_ops(self, bulk: Any, held: list[Any]) -> list[Callable[[], Awaitable[object]]]:
        rnd = self.rnd
        state = {"eof": False}

        async def fill_and_send(buf: memoryview) -> None:
            n = len(buf)
            buf[:] = expected(LOAN_SALT, 0, n)
            r = rnd.random()
            if r < 0.6:
                a = rnd.randrange(0, n + 1)
                b = rnd.randrange(a, n + 1)
                await bulk.send(buf[a:b])
                self.outcomes["lend: sent a slice"] += 1
            elif r < 0.85:
                await bulk.send(buf)
                self.outcomes["lend: sent"] += 1
            else:
                self.outcomes["lend: given back"] += 1

        async def lend() -> None:
            if not bulk.buffers or state["eof"]:
                return
            with anyio.move_on_after(OP_TIMEOUT) as scope:
                async with bulk.loan(rnd.randrange(0, bulk.buffer_size + 1)) as buf:
                    await fill_and_send(buf)
            if scope.cancelled_caught:
                self.outcomes["lend: deadline (backpressure)"] += 1

        async def lend_nowait() -> None:
            if not bulk.buffers or state["eof"]:
                return
            with bulk.loan(rnd.randrange(0, bulk.buffer_size + 1)) as buf:
                await fill_and_send(buf)

        async def take(item: Any) -> None:
            self.check_view(bulk, item)
            if rnd.random() < 0.5:
                held.append(item)
            else:
                item.release()

        async def receive() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                await take(await bulk.receive())

        async def receive_nowait() -> None:
            await take(bulk.receive_nowait())

        async def release() -> None:
            if held:
                item = held.pop(rnd.randrange(len(held)))
                item.release()
                if rnd.random() < 0.3:
                    item.release()  # idempotent

        async def both() -> None:
            """A lend and a receive at once: whichever waits reads for both."""

            async def one(op: Callable[[], Awaitable[None]]) -> None:
                try:
                    await op()
                except self.allowed as exc:  # (a failure goes up, in the task group's)
                    self.note(exc)
                    self.outcomes[f"both: {type(exc).__name__}"] += 1

            with anyio.move_on_after(OP_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, lend)
                    tg.start_soon(one, receive)

        async def send_eof() -> None:
            if rnd.random() < 0.1:
                state["eof"] = True
                with anyio.move_on_after(OP_TIMEOUT):
                    await bulk.send_eof()

        return [lend, lend, lend_nowait, receive, receive, receive_nowait, release, both, send_eof]

    def sync_ops(self, bulk: Any, held: list[Any]) -> list[Callable[[], Awaitable[object]]]:
        rnd = self.rnd
        t = OP_TIMEOUT / 2
        state = {"eof": False}

        def lend(timeout: float) -> None:
            if not bulk.buffers or state["eof"]:
                return
            with bulk.loan(rnd.randrange(0, bulk.buffer_size + 1), timeout=timeout) as buf:
                n = len(buf)
                buf[:] = expected(LOAN_SALT, 0, n)
                if rnd.random() < 0.85:
                    a = rnd.randrange(0, n + 1)
                    bulk.send(buf[a : rnd.randrange(a, n + 1)], timeout=t)
                    self.outcomes["lend: sent a slice"] += 1

        def take(item: Any) -> None:
            self.check_view(bulk, item)
            if rnd.random() < 0.5:
                held.append(item)
            else:
                item.release()

        def release() -> None:
            if held:
                item = held.pop(rnd.randrange(len(held)))
                item.release()
                item.release()

        def send_eof() -> None:
            if rnd.random() < 0.1:
                state["eof"] = True
                bulk.send_eof(timeout=t)

        calls: list[Callable[[], object]] = [
            lambda: lend(t),
            lambda: lend(0),
            lambda: take(bulk.receive(timeout=t)),
            lambda: take(bulk.receive(timeout=t)),
            lambda: take(bulk.receive_nowait()),
            release,
            send_eof,
        ]
        names = ["lend", "lend_nowait", "receive", "receive", "receive_nowait", "release", "eof"]

        def wrap(fn: Callable[[], object], name: str) -> Callable[[], Awaitable[object]]:
            async def op() -> object:
                return fn()

            op.__name__ = name
            return op

        return [wrap(c, n) for c, n in zip(calls, names, strict=True)]

    def message(self) -> Any:
        self.seq += 1
        return Msg(self.seq, self.rnd.randbytes(self.rnd.randrange(0, 100)))

    def take_message(self, bulk: Any, item: Any, held: list[Any]) -> None:
        """A message got: of the queue's type, its attachment checked as a view."""
        if not isinstance(item.message, Msg):
            self.fail("get", f"a message of type {type(item.message).__name__}")
        self.outcomes["get: message"] += 1
        if item.attachment is not None:
            self.check_view(bulk, item.attachment)
            if self.rnd.random() < 0.5:
                held.append(item.attachment)
            else:
                item.release()

    def async_queue_ops(self, q: Any, held: list[Any]) -> list[Callable[[], Awaitable[object]]]:
        rnd, bulk = self.rnd, q.channel

        async def put() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                if bulk.buffers and not bulk._proto.eof_sent and rnd.random() < 0.6:
                    async with q.loan(rnd.randrange(0, bulk.buffer_size + 1)) as buf:
                        n = len(buf)
                        buf[:] = expected(LOAN_SALT, 0, n)
                        a = rnd.randrange(0, n + 1)
                        await q.put(self.message(), attachment=buf[a : rnd.randrange(a, n + 1)])
                        self.outcomes["put: with a loan"] += 1
                elif not bulk._proto.eof_sent:
                    await q.put(self.message())

        async def get() -> None:
            with anyio.move_on_after(OP_TIMEOUT):
                self.take_message(bulk, await q.get(), held)

        async def get_nowait() -> None:
            self.take_message(bulk, q.get_nowait(), held)

        return [put, put, get, get, get_nowait]

    def sync_queue_ops(self, q: Any, held: list[Any]) -> list[Callable[[], Awaitable[object]]]:
        rnd, bulk = self.rnd, q.channel
        t = OP_TIMEOUT / 2

        async def put() -> None:
            if bulk.buffers and not bulk._proto.eof_sent and rnd.random() < 0.6:
                with q.loan(rnd.randrange(0, bulk.buffer_size + 1), timeout=t) as buf:
                    n = len(buf)
                    buf[:] = expected(LOAN_SALT, 0, n)
                    a = rnd.randrange(0, n + 1)
                    q.put(self.message(), buf[a : rnd.randrange(a, n + 1)], timeout=t)
                    self.outcomes["put: with a loan"] += 1
            elif not bulk._proto.eof_sent:
                q.put(self.message(), timeout=t)

        async def get() -> None:
            self.take_message(bulk, q.get(timeout=rnd.choice((0, t))), held)

        return [put, put, get, get]

    # -- episodes --------------------------------------------------------------------------
    def tolerated(self, mode: str, exc: Exception) -> bool:
        # The sync queue's documented refusal to wait while its own inbox is full.
        if (
            mode == "sync queue"
            and isinstance(exc, self.gntipc.LocalProtocolError)
            and "fill the inbox" in str(exc)
        ):
            self.outcomes["LocalProtocolError: inbox full"] += 1
            return True
        return False

    def note(self, exc: BaseException | type[BaseException]) -> None:
        """Count a RemoteProtocolError (not MalformedMessage) raised on this connection."""
        gntipc = self.gntipc
        cls = exc if isinstance(exc, type) else type(exc)
        if issubclass(cls, gntipc.RemoteProtocolError) and not issubclass(
            cls, gntipc.MalformedMessage
        ):
            self.raised = True

    async def episode(self, stream: Any, budget: int) -> None:
        presence = stream.vchan.endpoint._presence
        name = presence._value if presence is not None else None
        self.raised = False
        try:
            await self.bulk_episode(stream, budget)
        finally:
            if self.raised and name is not None:
                self.broken.append(name.decode())

    async def bulk_episode(self, stream: Any, budget: int) -> None:
        rnd = self.rnd
        mode = rnd.choice(("async", "sync", "async queue", "sync queue", "async queue"))
        queue = await self.open(stream, mode)
        if queue is None:
            return
        held: list[Any] = []
        if mode.endswith("queue"):
            bulk = queue.channel
            if mode == "async queue":
                ops = self.async_ops(bulk, held) + self.async_queue_ops(queue, held)
            else:
                ops = self.sync_ops(bulk, held) + self.sync_queue_ops(queue, held)
        else:
            bulk = queue
            ops = self.async_ops(bulk, held) if mode == "async" else self.sync_ops(bulk, held)
        # Both pools' pages: the close must unmap them (the process's leak check at exit
        # cannot tell: the backend's close would unmap them too).
        pages = [p for p in (bulk._pool, bulk._peer_pages) if p is not None]
        ended = 0
        try:
            for _ in range(budget):
                ok, exc = await self.run_op(mode, rnd.choice(ops))
                if exc is not None:
                    self.note(exc)
                if ok:
                    ended = 0
                elif exc is not None and not issubclass(
                    exc, anyio.WouldBlock | TimeoutError | self.gntipc.MessageTooLarge
                ):
                    ended += 1
                self.check_pool(bulk)
                if ended >= 4:
                    break
        finally:
            await self.close(bulk, held, mode)
            if not all(p.mapping.closed for p in pages):
                self.fail("close", f"{mode}: pool pages still mapped after the close")

    async def close(self, bulk: Any, held: list[Any], mode: str) -> None:
        """Close with views still held (the close releases them), sometimes with a view
        derived from one alive: then the close must say MappingInUse and keep those
        pages mapped (the derived view stays readable), and the close after dropping it
        unmaps."""
        for item in held:  # still mapped and the same bytes, even if the peer died
            self.check_view(bulk, item)
        kept = None
        if held and self.rnd.random() < 0.2:
            kept = held[0].view[:1]  # derived from our view: keeps the pages exported
        try:
            try:
                if mode.startswith("sync"):
                    bulk.close()
                else:
                    await bulk.aclose()
            except self.gntipc.MappingInUse:
                if kept is None:
                    raise
                self.outcomes["close: MappingInUse (a derived view)"] += 1
                kept.tobytes()  # still mapped: never a use-after-unmap
                kept.release()
                bulk.close()
            else:
                if kept is not None:
                    self.fail("close", "a derived view was alive, yet the close unmapped")
        except Exception as exc:
            self.fail(f"{mode} close", exc)
        for item in held:
            try:
                item.view.tobytes()
            except ValueError:
                continue  # released by the close
            self.fail("close", f"{item!r} still usable after the close")


if __name__ == "__main__":
    main(BulkTarget)
