"""The conformance suites, as trio's ``trio.testing.check_two_way_stream``: the caller
passes a factory of connected pairs, every check runs on fresh pairs, and a failure is an
:class:`AssertionError` that names the check.

No pytest here: ``import gntipc.testing`` works without it, and the checks run under any
test runner (or none) on asyncio or trio.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import struct
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import msgspec
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)
from anyio.abc import AsyncResource, ByteReceiveStream, ByteStream

from .._exceptions import LocalProtocolError, RemoteProtocolError
from .._fastpath import held_writes, ring_stream
from ..messages import MalformedMessage, MessageQueue, MessageTooLarge
from ..protocol import BATCH_FLAG
from ..session import Session, SessionStream
from ..streams import FAIR_SLICE, VchanAttribute

__all__ = [
    "BYTE_STREAM_CHECKS",
    "MESSAGE_QUEUE_CHECKS",
    "SESSION_CHECKS",
    "StreamMaker",
    "check_byte_stream",
    "check_message_queue",
    "check_session",
]

#: Two connected byte streams: what one writes, the other reads.
StreamPair = tuple[ByteStream, ByteStream]
#: What the checks call for each fresh pair: an async function returning a connected
#: pair (as trio's ``stream_maker``), or a function returning an async context manager
#: that yields one (and cleans up what else it made when it exits).  The checks close
#: both streams of every pair they got (both at once) when done with it.
StreamMaker = Callable[[], Awaitable[StreamPair] | AbstractAsyncContextManager[StreamPair]]


# --------------------------------------------------------------------------- harness
class _Pairs:
    """Fresh pairs for one check, each closed when the check is done with it."""

    def __init__(self, maker: StreamMaker) -> None:
        self._maker = maker

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[StreamPair]:
        made = self._maker()
        if isinstance(made, AbstractAsyncContextManager):
            async with made as pair:
                try:
                    yield pair
                finally:
                    await _close_both(*pair)
        else:
            pair = await made
            try:
                yield pair
            finally:
                await _close_both(*pair)


async def _close_both(a: AsyncResource, b: AsyncResource) -> None:
    # Both at once: a graceful close (TLS's close_notify) may wait for a peer that is
    # not reading until it closes too.
    with anyio.fail_after(10, shield=True):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.aclose)
            tg.start_soon(b.aclose)


_Check = Callable[[_Pairs], Awaitable[None]]


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, of each one inside an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, AssertionError):
        return str(exc)
    if isinstance(exc, TimeoutError) and not str(exc):
        return "TimeoutError (a deadline of the check passed: what it waited for never came)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _selected(
    suite: str,
    registry: Mapping[str, _Check],
    checks: Collection[str] | None,
    needs: Mapping[str, tuple[bool, str]],
) -> list[str]:
    """The names to run: ``checks`` (in the suite's order) or every check the
    capabilities allow.  ``needs`` maps a check to (capability given?, its name)."""
    if checks is None:
        return [name for name in registry if needs.get(name, (True, ""))[0]]
    unknown = sorted(set(checks) - set(registry))
    if unknown:
        raise ValueError(f"{suite}: no check named {', '.join(map(repr, unknown))}")
    for name in checks:
        allowed, capability = needs.get(name, (True, ""))
        if not allowed:
            raise ValueError(f"{suite}: check {name!r} needs {capability}=True")
    return [name for name in registry if name in checks]


async def _run(
    suite: str, registry: Mapping[str, _Check], names: Sequence[str], maker: StreamMaker
) -> None:
    for name in names:
        try:
            await registry[name](_Pairs(maker))
        except Exception as exc:
            raise AssertionError(f"{suite}: check {name!r} failed: {_describe(exc)}") from exc


def _expect(condition: bool, message: str) -> None:
    # Not assert: the checks must hold under python -O too.
    if not condition:
        raise AssertionError(message)


def _expect_equal(got: object, expected: object, what: str) -> None:
    if got == expected:
        return
    if isinstance(got, (bytes, bytearray, list)) and isinstance(expected, (bytes, list)):
        first = next(
            (i for i, (x, y) in enumerate(zip(got, expected, strict=False)) if x != y),
            min(len(got), len(expected)),
        )
        raise AssertionError(
            f"{what}: got {len(got)} items/bytes, expected {len(expected)};"
            f" they differ first at index {first}"
        )
    raise AssertionError(f"{what}: got {_short(got)}, expected {_short(expected)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


@contextlib.contextmanager
def _raises(
    expected: type[BaseException] | tuple[type[BaseException], ...],
    what: str,
    match: str | None = None,
) -> Iterator[None]:
    """The block must raise ``expected`` (whose message matches ``match``)."""
    names = (
        " or ".join(e.__name__ for e in expected)
        if isinstance(expected, tuple)
        else expected.__name__
    )
    try:
        yield
    except expected as exc:
        if match is not None and not re.search(match, str(exc)):
            raise AssertionError(
                f"{what}: {type(exc).__name__}({str(exc)!r}) does not match {match!r}"
            ) from exc
        return
    except Exception as exc:
        raise AssertionError(f"{what}: expected {names}, got {_describe(exc)}") from exc
    raise AssertionError(f"{what}: expected {names}, nothing was raised")


async def _receive_all(stream: ByteReceiveStream, n: int, got: bytearray | None = None) -> bytes:
    """``n`` bytes, received into ``got`` (which tells the progress if this never ends)."""
    got = bytearray() if got is None else got
    while len(got) < n:
        got += await stream.receive()
    return bytes(got)


@contextlib.contextmanager
def _within(seconds: float, progress: Callable[[], str]) -> Iterator[None]:
    """As anyio.fail_after, but the failure says how far the block got."""
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise AssertionError(f"not done within {seconds:g} s: {progress()}")


async def _receive_exactly(stream: ByteReceiveStream, n: int) -> bytes:
    data = b""
    with anyio.fail_after(10):
        while len(data) < n:
            data += await stream.receive(n - len(data))
    return data


async def _drain(stream: ByteReceiveStream) -> bytes:
    out = bytearray()
    with contextlib.suppress(EndOfStream):
        while True:
            out += await stream.receive()
    return bytes(out)


async def send_receive(tx: ByteStream, rx: ByteStream) -> None:
    """The basic ByteStream contract both ways between ``tx`` and ``rx``: every buffer
    type, max_bytes honoured with the rest kept in order, max_bytes < 1 refused, an
    empty send a no-op."""
    await tx.send(b"hello")
    _expect_equal(await rx.receive(), b"hello", "receive after send(b'hello')")
    await rx.send(bytearray(b"world"))  # type: ignore[arg-type]  # any buffer works
    await rx.send(memoryview(b"!!"))  # type: ignore[arg-type]  # any buffer works
    got = b""
    while len(got) < 7:
        got += await tx.receive()
    _expect_equal(got, b"world!!", "a bytearray, then a memoryview sent")
    await tx.send(b"abcdef")
    _expect_equal(await rx.receive(2), b"ab", "receive(2) of b'abcdef'")
    _expect_equal(await rx.receive(100), b"cdef", "the rest after receive(2)")
    with _raises(ValueError, "receive(0)"):
        await rx.receive(0)
    await tx.send(b"")  # a no-op, not an error


# ------------------------------------------------------------------ byte stream checks
_BULK = 300_000


async def _bulk_both_ways_at_once(pairs: _Pairs) -> None:
    a_data, b_data = os.urandom(_BULK), os.urandom(_BULK // 3)
    async with pairs.open() as (a, b):
        received: dict[str, bytearray] = {"a": bytearray(), "b": bytearray()}

        async def side(name: str, me: ByteStream, data: bytes, n: int) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(me.send, data)
                await _receive_all(me, n, received[name])

        def progress() -> str:
            return (
                f"the first stream received {len(received['a'])} of {len(b_data)} bytes,"
                f" the second {len(received['b'])} of {len(a_data)}"
            )

        with _within(60, progress):
            async with anyio.create_task_group() as tg:
                tg.start_soon(side, "a", a, a_data, len(b_data))
                tg.start_soon(side, "b", b, b_data, len(a_data))
        _expect_equal(received["a"], b_data, "what the first stream received")
        _expect_equal(received["b"], a_data, "what the second stream received")


def _receive_at_most(max_bytes: int) -> _Check:
    async def check(pairs: _Pairs) -> None:
        data = os.urandom(20_000)
        async with pairs.open() as (a, b):
            got = bytearray()
            with _within(60, lambda: f"received {len(got)} of {len(data)} bytes"):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(a.send, data)
                    while len(got) < len(data):
                        chunk = await b.receive(max_bytes)
                        _expect(
                            1 <= len(chunk) <= max_bytes,
                            f"receive({max_bytes}) returned {len(chunk)} bytes",
                        )
                        got += chunk
            _expect_equal(got, data, f"the bytes received by receive({max_bytes})")

    return check


async def _send_eof_half_closes_one_direction(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        with anyio.fail_after(30):
            await a.send(b"last")
            await a.send_eof()
            _expect_equal(await _receive_all(b, 4), b"last", "the data before send_eof")
            with _raises(EndOfStream, "receive after the peer's send_eof"):
                await b.receive()
            # the other direction still works
            await b.send(b"reply")
            _expect_equal(await _receive_all(a, 5), b"reply", "the reply after send_eof")


async def _peer_close_is_end_of_stream_after_the_data(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        with anyio.fail_after(30):
            await a.send(b"everything before the close")
            await a.aclose()
            _expect_equal(
                await _receive_all(b, 27),
                b"everything before the close",
                "the data sent before the peer closed",
            )
            with _raises(EndOfStream, "receive after the peer closed"):
                await b.receive()


async def _use_after_own_close_is_closed_resource(pairs: _Pairs) -> None:
    async with pairs.open() as (a, _b):
        await a.aclose()
        with _raises(ClosedResourceError, "send after aclose"):
            await a.send(b"x")
        with _raises(ClosedResourceError, "receive after aclose"):
            await a.receive()


#: The names of :func:`check_byte_stream`'s checks, in the order they run.
BYTE_STREAM_CHECKS: tuple[str, ...] = (
    "bulk_both_ways_at_once",
    "receive_returns_at_most_max_bytes[1]",
    "receive_returns_at_most_max_bytes[7]",
    "receive_returns_at_most_max_bytes[4096]",
    "receive_returns_at_most_max_bytes[1048576]",
    "send_eof_half_closes_one_direction",
    "peer_close_is_end_of_stream_after_the_data",
    "use_after_own_close_is_closed_resource",
)
_BYTE_STREAM: dict[str, _Check] = dict(
    zip(
        BYTE_STREAM_CHECKS,
        (
            _bulk_both_ways_at_once,
            *(_receive_at_most(n) for n in (1, 7, 4096, 1 << 20)),
            _send_eof_half_closes_one_direction,
            _peer_close_is_end_of_stream_after_the_data,
            _use_after_own_close_is_closed_resource,
        ),
        strict=True,
    )
)


async def check_byte_stream(
    stream_maker: StreamMaker,
    *,
    half_close: bool = True,
    closed_resource_after_aclose: bool = True,
    checks: Collection[str] | None = None,
) -> None:
    """Check that a kind of stream keeps the :class:`anyio.abc.ByteStream` contract the
    typed layers (:class:`gntipc.MessageQueue`, :class:`gntipc.Session`) rely on.

    Every check makes its own pair with ``stream_maker``, uses the first stream as one
    end and the second as the other, and closes both afterwards.  The checks: 400 KB
    both ways at once; ``receive(max_bytes)`` returning 1 to ``max_bytes`` bytes, in
    order; ``send_eof`` ending one direction only; the data sent before a close read
    before ``EndOfStream``; ``ClosedResourceError`` after the stream's own ``aclose``.
    They stop at the first failure.  Cancelled, the running check stops and its pair is
    closed (as after a failure).

    Args:
        stream_maker: makes a connected pair (see :data:`StreamMaker`).
        half_close: the streams support ``send_eof``; anyio's ``TLSStream`` does not:
            pass False to leave that check out.
        closed_resource_after_aclose: a stream raises ``ClosedResourceError`` when used
            after its own ``aclose``; anyio's ``TLSStream`` raises
            ``BrokenResourceError``: pass False to leave that check out.
        checks: run only these (names of :data:`BYTE_STREAM_CHECKS`), e.g. one per
            test of your own; default: every check the capabilities allow.

    Raises:
        AssertionError: a check failed; the message names it and what went wrong (the
            original exception, if any, is its ``__cause__``).
        ValueError: ``checks`` names an unknown check, or one the capabilities leave
            out.
    """
    suite = "check_byte_stream"
    needs = {
        "send_eof_half_closes_one_direction": (half_close, "half_close"),
        "use_after_own_close_is_closed_resource": (
            closed_resource_after_aclose,
            "closed_resource_after_aclose",
        ),
    }
    names = _selected(suite, _BYTE_STREAM, checks, needs)
    await _run(suite, _BYTE_STREAM, names, stream_maker)


# ---------------------------------------------------------------- message queue checks
class Reading(msgspec.Struct):
    """The message type of the queue checks (gntipc's own tests use it too)."""

    sensor: int
    value: float
    label: str = ""


def frame(payload: bytes) -> bytes:
    """A message frame as it is on the wire: u32 length, then the payload."""
    return struct.pack("<I", len(payload)) + payload


def _put_nowait_works(stream: ByteStream) -> bool:
    """gntipc's rule: ``put_nowait`` needs a stream that declares the ``"ring"`` fast
    path (all or nothing at once), as a VchanStream does."""
    return ring_stream(stream) is not None


def _reports_send_progress(stream: ByteStream) -> bool:
    """gntipc's rule: a stream that declares a fast path (a VchanStream, a
    SessionStream) tells how much of a cancelled send went out (``send_progress``);
    other streams do not."""
    return held_writes(stream) is not None


async def _put_get_and_the_wire_format(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.fail_after(10):
            for i in range(50):
                await tx.put(Reading(i, i / 2, "x" * (i % 7)))
            for i in range(50):
                _expect_equal(await rx.get(), Reading(i, i / 2, "x" * (i % 7)), f"message {i}")
            # byte for byte the same frames on every stream: u32 length + msgpack, and
            # a batch frame (the length's top bit set) + one msgpack array
            await tx.put(Reading(1, 2.0))
            await tx.put_many([Reading(3, 4.0), Reading(5, 6.0)])
            await tx.put_many([Reading(7, 8.0)])
        batch = msgspec.msgpack.encode([Reading(3, 4.0), Reading(5, 6.0)])
        expected = (
            frame(msgspec.msgpack.encode(Reading(1, 2.0)))
            + struct.pack("<I", len(batch) | BATCH_FLAG)
            + batch
            + frame(msgspec.msgpack.encode(Reading(7, 8.0)))
        )
        _expect_equal(await _receive_exactly(a, len(expected)), expected, "the frames on the wire")


async def _batches_and_messages_larger_than_any_buffer(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx = MessageQueue(a, Reading, max_message_size=1 << 22)
        tx = MessageQueue(b, Reading, max_message_size=1 << 22)
        batch = [Reading(i, float(i), "pad" * (i % 50)) for i in range(3000)]
        big = Reading(-1, 0.0, "z" * 1_000_000)  # larger than the ring, the session
        # window, one TCP read and one TLS record
        got: list[Reading] = []

        async def consume() -> None:
            while len(got) < len(batch) + 1:
                many = await rx.get_many(max_items=97)
                _expect(1 <= len(many) <= 97, f"get_many(max_items=97) gave {len(many)}")
                got.extend(many)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await tx.put_many(batch[:1500])
                await tx.put(big)
                await tx.put_many(batch[1500:])
        _expect_equal(got, [*batch[:1500], big, *batch[1500:]], "the messages received")
        await tx.put_many([])  # nothing to do


async def _iteration_ends_with_the_stream(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.fail_after(10):
            await tx.put_many([Reading(i, 0.5) for i in range(20)])
            await tx.aclose()
            _expect(tx.closed, "the queue is not closed after aclose")
            _expect_equal([r.sensor async for r in rx], list(range(20)), "the messages iterated")
            with _raises(EndOfStream, "get after the iteration ended"):
                await rx.get()
        with _raises(ClosedResourceError, "put on a closed queue"):
            await tx.put(Reading(0, 0.0))


async def _nowait_methods(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with _raises(WouldBlock, "get_nowait with nothing received"):
            rx.get_nowait()
        with _raises(WouldBlock, "get_many_nowait with nothing received"):
            rx.get_many_nowait()
        if not _put_nowait_works(b):
            with _raises(NotImplementedError, "put_nowait off a vchan", match="put_nowait needs"):
                tx.put_nowait(Reading(0, 0.0))
            with _raises(
                NotImplementedError, "put_many_nowait off a vchan", match="put_many_nowait needs"
            ):
                tx.put_many_nowait([Reading(0, 0.0)])
            await tx.put_many([Reading(i, 0.0) for i in range(10)])
        else:
            tx.put_nowait(Reading(0, 0.0))
            tx.put_many_nowait([Reading(i, 0.0) for i in range(1, 10)])
        # after one get, whatever arrived with it is served without waiting; the rest
        # (a generic stream may deliver the batch in pieces) by get
        got = [await rx.get()]
        with anyio.fail_after(10):
            while len(got) < 10:
                try:
                    got += rx.get_many_nowait(max_items=3)
                except WouldBlock:
                    got.append(await rx.get())
        _expect_equal([r.sensor for r in got], list(range(10)), "the messages received")
        with _raises(WouldBlock, "get_nowait after everything was received"):
            rx.get_nowait()


async def _malformed_frames_are_skipped_without_desync(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx = MessageQueue(a, Reading)
        good = frame(msgspec.msgpack.encode(Reading(7, 7.0)))
        wrong_type = frame(msgspec.msgpack.encode({"sensor": "not an int", "value": 1.0}))
        garbage = frame(b"\xc1\xc1\xc1")
        await b.send(wrong_type + garbage + good)
        with anyio.fail_after(10):
            with _raises(MalformedMessage, "get of a message of the wrong type"):
                await rx.get()
            with _raises(MalformedMessage, "get of a frame that is not msgpack"):
                await rx.get()
            _expect_equal(await rx.get(), Reading(7, 7.0), "the good message after two bad")
            # in a batch: the good messages before the bad frame are delivered first
            await b.send(good + garbage + good)
            _expect_equal(await rx.get_many(), [Reading(7, 7.0)], "get_many before a bad frame")
            with _raises(MalformedMessage, "get_many of a frame that is not msgpack"):
                await rx.get_many()
            _expect_equal(await rx.get_many(), [Reading(7, 7.0)], "get_many after a bad frame")


async def _oversized_frame_from_the_peer_closes_the_queue(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx = MessageQueue(a, Reading, max_message_size=1000)
        good = frame(msgspec.msgpack.encode(Reading(1, 1.0)))
        await b.send(good + struct.pack("<I", 1001) + b"\0" * 50)
        with anyio.fail_after(10):
            _expect_equal(await rx.get(), Reading(1, 1.0), "the message before")
            with _raises(MessageTooLarge, "get of a 1001-byte frame", match="1001-byte"):
                await rx.get()
        _expect(rx.closed, "the queue is not closed after an oversized frame")
        with _raises(ClosedResourceError, "get after an oversized frame"):
            await rx.get()
        # the peer sees the end of the stream (a reset, if unread bytes were dropped)
        with (
            anyio.fail_after(10),
            _raises((EndOfStream, BrokenResourceError), "the peer's receive"),
        ):
            while True:
                await b.receive()


async def _stream_ending_inside_a_frame(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx = MessageQueue(a, Reading)
        await b.send(struct.pack("<I", 50) + b"\x01" * 10)
        await b.aclose()
        with anyio.fail_after(10):
            with _raises(MalformedMessage, "get of a cut frame", match="ended inside a frame"):
                await rx.get()
            with _raises(EndOfStream, "get after a cut frame"):
                await rx.get()


async def _cancelled_get_loses_nothing(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await rx.get()
        _expect(scope.cancelled_caught, "a get in a cancelled scope was not cancelled")
        wire = frame(msgspec.msgpack.encode(Reading(5, 5.0)))
        await b.send(wire[:3])  # half a header
        with anyio.move_on_after(0.05):
            await rx.get()  # buffers the 3 bytes, then is cancelled
        await b.send(wire[3:])
        await tx.put_many([Reading(6, 6.0), Reading(7, 7.0)])
        with anyio.fail_after(10):
            _expect_equal(await rx.get(), Reading(5, 5.0), "the message a get was cancelled in")
            _expect_equal(await rx.get(), Reading(6, 6.0), "the next message")
            # Gets yield at least every FAIR_SLICE (a cancellation lands there); this
            # one comes later than that after the last: a buffered message is not taken
            # by a cancelled get
            await anyio.sleep(2 * FAIR_SLICE)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await rx.get()
            _expect(scope.cancelled_caught, "a get in a cancelled scope was not cancelled")
            _expect_equal(await rx.get(), Reading(7, 7.0), "the message after a cancelled get")


async def _cancelled_put(pairs: _Pairs) -> None:
    # A put cancelled before anything is written leaves every queue usable: a put yields
    # (at least every FAIR_SLICE) before it writes, and the first put of a queue does.
    async with pairs.open() as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await tx.put(Reading(1, 1.0))
        _expect(scope.cancelled_caught, "a put in a cancelled scope was not cancelled")
        _expect(not tx.closed, "a put cancelled before writing closed the queue")
        await anyio.sleep(2 * FAIR_SLICE)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await tx.put_many([Reading(2, 2.0), Reading(3, 3.0)])
        _expect(scope.cancelled_caught, "a put_many in a cancelled scope was not cancelled")
        _expect(not tx.closed, "a put_many cancelled before writing closed the queue")
        await tx.put(Reading(4, 4.0))
        with anyio.fail_after(10):
            # nothing of the cancelled puts
            _expect_equal(await rx.get(), Reading(4, 4.0), "the message after cancelled puts")


async def _put_cancelled_while_sending(pairs: _Pairs) -> None:
    # Cancelled while a frame larger than any buffer goes out: a VchanStream and a
    # SessionStream tell how much went out (a partial frame closes the queue, none
    # keeps it); on other streams (sockets, TLS) it is not known: the queue is closed.
    async with pairs.open() as (_a, b):
        payload = bytes(64 << 20)  # more than loopback TCP's buffers take at once
        tx = MessageQueue(b, bytes, max_message_size=len(payload) + 8)
        with anyio.move_on_after(0.3) as scope:
            await tx.put(payload)  # nobody reads
        opaque = not _reports_send_progress(b)
        if not scope.cancelled_caught:
            # asyncio's socket transports sometimes take the whole frame into their
            # buffer at once: then it is sent, and the queue stays usable
            _expect(opaque, "a put of 64 MiB nobody reads was not cancelled")
            _expect(not tx.closed, "a put that completed closed the queue")
        elif opaque:
            _expect(tx.closed, "a put cancelled after an unknown part went out left the queue open")
            with _raises(ClosedResourceError, "put after a cancelled partial put"):
                await tx.put(b"x")
        else:
            progress: int = getattr(b, "send_progress")  # noqa: B009  # not on ByteStream
            frame_size = 4 + len(msgspec.msgpack.encode(payload))
            _expect_equal(
                tx.closed,
                0 < progress < frame_size,
                f"queue closed after a cancelled put that sent {progress} of {frame_size} bytes",
            )


async def _busy_getters(pairs: _Pairs) -> None:
    async with pairs.open() as (a, _b):
        rx = MessageQueue(a, Reading)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                started = anyio.Event()

                async def blocked_get() -> None:
                    started.set()
                    await rx.get()  # nothing comes

                tg.start_soon(blocked_get)
                await started.wait()
                await anyio.wait_all_tasks_blocked()
                with _raises(BusyResourceError, "a second get while one waits"):
                    await rx.get()
                with _raises(BusyResourceError, "get_nowait while a get waits"):
                    rx.get_nowait()
                tg.cancel_scope.cancel()


async def _a_put_goes_out_when_the_producer_stops_putting(pairs: _Pairs) -> None:
    # A vchan or session stream holds small frames back to send them with the next
    # ones; a producer that puts once and then waits for something else entirely still
    # gets its message through (the event loop runs the flush), on every kind of stream.
    async with pairs.open() as (a, b):
        rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
        done = anyio.Event()

        async def consume() -> None:
            _expect_equal(await rx.get(), Reading(1, 1.0), "the one message put")
            done.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await anyio.wait_all_tasks_blocked()
                await tx.put(Reading(1, 1.0))
                await done.wait()


def _held_back_puts_go_out_before(end: str) -> _Check:
    async def check(pairs: _Pairs) -> None:
        async with pairs.open() as (a, b):
            rx, tx = MessageQueue(a, Reading), MessageQueue(b, Reading)
            with anyio.fail_after(10):
                await tx.put(Reading(1, 1.0))
                await tx.put(Reading(2, 2.0))
                if end == "send_eof":
                    await b.send_eof()
                else:
                    await tx.aclose()
                _expect_equal(
                    [m async for m in rx],
                    [Reading(1, 1.0), Reading(2, 2.0)],
                    f"the messages put before {end}",
                )

    return check


#: The names of :func:`check_message_queue`'s checks, in the order they run.
MESSAGE_QUEUE_CHECKS: tuple[str, ...] = (
    "put_get_and_the_wire_format",
    "batches_and_messages_larger_than_any_buffer",
    "iteration_ends_with_the_stream",
    "nowait_methods",
    "malformed_frames_are_skipped_without_desync",
    "oversized_frame_from_the_peer_closes_the_queue",
    "stream_ending_inside_a_frame",
    "cancelled_get_loses_nothing",
    "cancelled_put",
    "put_cancelled_while_sending",
    "busy_getters",
    "a_put_goes_out_when_the_producer_stops_putting",
    "held_back_puts_go_out_before_send_eof",
    "held_back_puts_go_out_before_aclose",
)
_MESSAGE_QUEUE: dict[str, _Check] = dict(
    zip(
        MESSAGE_QUEUE_CHECKS,
        (
            _put_get_and_the_wire_format,
            _batches_and_messages_larger_than_any_buffer,
            _iteration_ends_with_the_stream,
            _nowait_methods,
            _malformed_frames_are_skipped_without_desync,
            _oversized_frame_from_the_peer_closes_the_queue,
            _stream_ending_inside_a_frame,
            _cancelled_get_loses_nothing,
            _cancelled_put,
            _put_cancelled_while_sending,
            _busy_getters,
            _a_put_goes_out_when_the_producer_stops_putting,
            _held_back_puts_go_out_before("send_eof"),
            _held_back_puts_go_out_before("aclose"),
        ),
        strict=True,
    )
)


async def check_message_queue(
    stream_maker: StreamMaker,
    *,
    half_close: bool = True,
    checks: Collection[str] | None = None,
) -> None:
    """Check :class:`gntipc.MessageQueue` over a kind of byte stream, as gntipc's own
    tests do over every stream it makes and over anyio's TCP, unix and TLS streams.

    Every check makes its own pair with ``stream_maker``, puts a queue on either end
    (messages go from the second to the first) and closes both streams afterwards.
    The checks: messages and batches arrive in order and byte for byte in the
    documented frames; iteration ends with the stream; the ``*_nowait`` methods
    (``put_nowait`` only on a stream with the ring fast path, as
    :class:`gntipc.VchanStream`); malformed and oversized frames; a stream cut inside a
    frame; cancelled gets and puts lose nothing (a put cancelled while sending closes
    the queue unless the stream declares a fast path and so reports its
    ``send_progress``, as VchanStream and SessionStream do); a second getter is
    ``BusyResourceError``; held-back small puts go out when the producer waits, and
    before ``send_eof`` or ``aclose``.

    Args:
        stream_maker: makes a connected pair (see :data:`StreamMaker`).
        half_close: the streams support ``send_eof``; anyio's ``TLSStream`` does not:
            pass False to leave that check out.
        checks: run only these (names of :data:`MESSAGE_QUEUE_CHECKS`); default:
            every check the capabilities allow.

    Raises:
        AssertionError: a check failed (named in the message, as by
            :func:`check_byte_stream`).
        ValueError: ``checks`` names an unknown check, or one ``half_close=False``
            leaves out.
    """
    suite = "check_message_queue"
    needs = {"held_back_puts_go_out_before_send_eof": (half_close, "half_close")}
    names = _selected(suite, _MESSAGE_QUEUE, checks, needs)
    await _run(suite, _MESSAGE_QUEUE, names, stream_maker)


# ---------------------------------------------------------------------- session checks
class _Ping(msgspec.Struct):
    n: int


@contextlib.asynccontextmanager
async def _sessions(pairs: _Pairs, **kwargs: Any) -> AsyncIterator[tuple[Session, Session]]:
    """(responder, initiator) sessions over one fresh pair."""
    async with (
        pairs.open() as (a, b),
        Session(a, is_initiator=False, **kwargs) as s,
        Session(b, is_initiator=True, **kwargs) as c,
    ):
        yield s, c


async def _is_initiator_is_required_off_a_vchan(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b):
        is_server = a.extra(VchanAttribute.is_server, None)
        if is_server is None:
            with _raises(
                LocalProtocolError,
                "Session() without is_initiator off a vchan",
                match="is_initiator is required",
            ):
                Session(a)
            return
        # on a vchan (or what has its attributes) the role follows the vchan's
        async with Session(a) as s, Session(b) as c:
            _expect(
                (s.is_initiator, c.is_initiator) == (not is_server, is_server),
                f"the roles inferred on a vchan whose first end is_server={is_server}",
            )


async def _open_accept_both_ways(pairs: _Pairs) -> None:
    async with _sessions(pairs) as (s, c):
        with anyio.fail_after(10):
            a = await c.open_stream()
            b = await s.accept_stream()
            async with a, b:
                _expect_equal((a.stream_id, b.stream_id), (1, 1), "the initiator's first id")
                await send_receive(a, b)
            d = await s.open_stream()
            e = await c.accept_stream()
            async with d, e:
                _expect_equal((d.stream_id, e.stream_id), (2, 2), "the responder's first id")
                await send_receive(d, e)


async def _many_streams_with_flow_control(pairs: _Pairs) -> None:
    # Each stream carries more than the window, concurrently: credit is granted back
    # as the reader consumes, and the data arrives intact on every stream.
    async with _sessions(pairs, window=16 * 1024) as (s, c):

        async def client(i: int) -> None:
            data = random.Random(i).randbytes(100_000 + 1000 * i)
            async with await c.open_stream() as st:
                await st.send(i.to_bytes(4, "little"))
                await st.send(data)
                await st.send_eof()
                _expect_equal(
                    await _drain(st), hashlib.sha256(data).digest(), f"stream {i}'s reply"
                )

        async def server() -> None:
            for _ in range(12):
                st = await s.accept_stream()
                tg.start_soon(serve, st)

        async def serve(st: SessionStream) -> None:
            async with st:
                body = await _drain(st)
                i = int.from_bytes(body[:4], "little")
                expected = random.Random(i).randbytes(100_000 + 1000 * i)
                _expect_equal(body[4:], expected, f"what stream {i} carried")
                await st.send(hashlib.sha256(body[4:]).digest())

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(server)
                async with anyio.create_task_group() as clients:
                    for i in range(12):
                        clients.start_soon(client, i)


async def _closing_the_session_ends_the_peer(pairs: _Pairs) -> None:
    async with pairs.open() as (a, b), Session(a, is_initiator=False) as s:
        with anyio.fail_after(10):
            async with Session(b, is_initiator=True) as c:
                st = await c.open_stream()
                peer = await s.accept_stream()
                await st.send(b"last words")
                await st.send_eof()
                await st.aclose()
            async with peer:
                _expect_equal(await _drain(peer), b"last words", "what was sent before the close")
            with _raises(EndOfStream, "accept_stream after the peer session closed"):
                await s.accept_stream()
            _expect(
                isinstance(s.error, EndOfStream),
                f"the session's error is {s.error!r}, not EndOfStream",
            )


async def _typed_queue_over_a_session_stream(pairs: _Pairs) -> None:
    # The layers compose: typed messages over one logical stream of a session.
    async with _sessions(pairs) as (s, c):
        with anyio.fail_after(10):
            tx = MessageQueue(await c.open_stream(), _Ping)
            rx = MessageQueue(await s.accept_stream(), _Ping)
            async with tx, rx:
                await tx.put_many([_Ping(i) for i in range(1000)])
                got: list[_Ping] = []
                while len(got) < 1000:
                    got += await rx.get_many()
                _expect_equal(got, [_Ping(i) for i in range(1000)], "the messages received")


async def _hostile_bytes_from_the_peer(pairs: _Pairs) -> None:
    async with pairs.open() as (a, raw), Session(a, is_initiator=False) as s:
        await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a session peer
        with anyio.fail_after(10):
            with _raises(RemoteProtocolError, "accept_stream from a peer that is no session"):
                await s.accept_stream()
        _expect(
            isinstance(s.error, RemoteProtocolError),
            f"the session's error is {s.error!r}, not RemoteProtocolError",
        )


#: The names of :func:`check_session`'s checks, in the order they run.
SESSION_CHECKS: tuple[str, ...] = (
    "is_initiator_is_required_off_a_vchan",
    "open_accept_both_ways",
    "many_streams_with_flow_control",
    "closing_the_session_ends_the_peer",
    "typed_queue_over_a_session_stream",
    "hostile_bytes_from_the_peer",
)
_SESSION: dict[str, _Check] = dict(
    zip(
        SESSION_CHECKS,
        (
            _is_initiator_is_required_off_a_vchan,
            _open_accept_both_ways,
            _many_streams_with_flow_control,
            _closing_the_session_ends_the_peer,
            _typed_queue_over_a_session_stream,
            _hostile_bytes_from_the_peer,
        ),
        strict=True,
    )
)


async def check_session(
    stream_maker: StreamMaker, *, checks: Collection[str] | None = None
) -> None:
    """Check :class:`gntipc.Session` over a kind of byte stream: gntipc's own tests run
    it over a vchan, a session stream, TCP, a unix socket and TLS.

    Every check makes its own pair with ``stream_maker``; the session on the first
    stream is the responder, the one on the second the initiator (``is_initiator`` is
    passed, so any byte stream works).  The checks: ``is_initiator`` is required off a
    vchan (and follows the vchan's roles on one); streams opened and accepted both ways,
    with their ids; twelve streams each carrying more than the window at once; closing a
    session ends the peer's after the data; a typed queue over a session stream; bytes
    that are no session protocol are a ``RemoteProtocolError``.

    Args:
        stream_maker: makes a connected pair (see :data:`StreamMaker`).
        checks: run only these (names of :data:`SESSION_CHECKS`); default: all.

    Raises:
        AssertionError: a check failed (named in the message, as by
            :func:`check_byte_stream`).
        ValueError: ``checks`` names an unknown check.
    """
    suite = "check_session"
    names = _selected(suite, _SESSION, checks, {})
    await _run(suite, _SESSION, names, stream_maker)
