"""The fast paths a byte stream may offer :class:`gntipc.MessageQueue` and
:class:`gntipc.Session`, and the one check that finds them.

Any :class:`anyio.abc.ByteStream` works with both; a stream that *declares* a fast path
gets it.  A stream declares one with a class attribute, ``gntipc_fast_path``:

* ``"held"`` (:class:`HeldWrites`): it gathers small writes (``_send_soon``, sent at the
  latest soon after the caller yields; ``_flush_before_wait`` sends them now), closes
  synchronously (``close()``, ``closed``), and its ``send_progress`` says how much of a
  cancelled ``send`` will be delivered.  :class:`gntipc.SessionStream` declares it.
* ``"ring"`` (:class:`RingStream`): all of the above, and ``send_nowait`` writes all or
  nothing without waiting, ``wait_writable(n)`` waits until ``n`` bytes fit,
  ``receive_into`` reads into a buffer, ``statistics()``.  :class:`gntipc.VchanStream`.

The declaration is read from the stream's class, so an object that forwards attribute
lookups (a wrapper's ``__getattr__``) is not mistaken for one: a wrapper of a
:class:`gntipc.VchanStream` opts in by declaring it, and must then honour the contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from ._stats import VchanStreamStatistics
    from .backends._abc import Buffer
    from .streams import VchanStream

__all__ = ["HeldWrites", "RingStream", "held_writes", "ring_stream"]

#: The class attribute that declares a stream's fast path.
FAST_PATH_ATTRIBUTE = "gntipc_fast_path"


class HeldWrites(Protocol):
    """A stream that gathers small writes and closes synchronously (``"held"``)."""

    send_progress: int

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...

    def _send_soon(self, item: Buffer) -> bool: ...

    def _flush_before_wait(self) -> None: ...


class RingStream(HeldWrites, Protocol):
    """A ring (``"ring"``): :class:`HeldWrites`, and writes that go out whole or not at all."""

    def send_nowait(self, item: Buffer) -> None: ...

    async def send(self, item: Buffer) -> None: ...

    async def wait_writable(self, nbytes: int = 1) -> None: ...

    async def receive_into(self, buffer: bytearray | memoryview) -> int: ...

    def statistics(self) -> VchanStreamStatistics: ...


def _declared(stream: object) -> str | None:
    kind = getattr(type(stream), FAST_PATH_ATTRIBUTE, None)
    return kind if isinstance(kind, str) else None


def held_writes(stream: object) -> HeldWrites | None:
    """``stream`` if it declares the ``"held"`` (or ``"ring"``) fast path, else None."""
    return cast("HeldWrites", stream) if _declared(stream) in ("held", "ring") else None


def ring_stream(stream: object) -> RingStream | None:
    """``stream`` if it declares the ``"ring"`` fast path, else None."""
    return cast("RingStream", stream) if _declared(stream) == "ring" else None


if TYPE_CHECKING:
    # mypy checks that VchanStream has the fast path it is taken to have (and
    # gntipc.session that SessionStream has its own).

    def _vchan_is_a_ring(stream: VchanStream) -> RingStream:
        return stream
