"""The vchan wire format: the one place that knows the control page's layout.

Shared control page, native little-endian (libxenvchan-compatible)::

    off size field
      0  4+4 left.cons, left.prod     ring client -> server
      8  4+4 right.cons, right.prod   ring server -> client
     16    2 left_order               log2 of the left ring's size
     18    2 right_order
     20    1 cli_live                 0 gone, 1 connected, 2 not yet connected
     21    1 srv_live                 0 gone, 1 live
     22    1 cli_notify               bits the client must honour (set by the server)
     23    1 srv_notify               bits the server must honour (set by the client)
     24  4*n grants[]                 refs of external ring pages: left's, then right's

Order 10 puts a ring inside the control page at 1024, order 11 at 2048; orders 12..20 use
``2**(order-12)`` separately granted pages.

Ring sizes, the one place for their rules: a ring is a power of two from 1 KiB to 1 MiB
(:func:`check_ring_size`, for callers that name exact sizes: ``gntipc.listen`` and the ring
state); a server that names minimum sizes gets them rounded up to libxenvchan's choice of
orders (:func:`order_for_size`, :func:`choose_orders`: ``Vchan.server``, as
``libxenvchan_server_init``).  :data:`DEFAULT_RING_SIZE` is the default of both.

gntipc extension (ignored by libxenvchan, which only ever touches bits 0x1 and 0x2 of the
notify bytes): bit 0x80 of the byte a side *sets bits in* (srv_notify for the client,
cli_notify for the server) means "I will write no more" (half-close).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .._exceptions import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CONTROL_PAGE_SIZE",
    "DEFAULT_RING_SIZE",
    "EOF_BIT",
    "Geometry",
    "LIVE_CONNECTED",
    "LIVE_GONE",
    "LIVE_WAITING",
    "MAX_ORDER",
    "MAX_RING_SIZE",
    "MIN_ORDER",
    "MIN_RING_SIZE",
    "NOTIFY_READ",
    "NOTIFY_WRITE",
    "OFF_CLI_LIVE",
    "OFF_CLI_NOTIFY",
    "OFF_GRANTS",
    "OFF_LEFT_CONS",
    "OFF_LEFT_ORDER",
    "OFF_LEFT_PROD",
    "OFF_RIGHT_CONS",
    "OFF_RIGHT_ORDER",
    "OFF_RIGHT_PROD",
    "OFF_SRV_LIVE",
    "OFF_SRV_NOTIFY",
    "VchanState",
    "channel_pages",
    "check_ring_size",
    "choose_orders",
    "fit_ring_sizes",
    "order_for_size",
]

CONTROL_PAGE_SIZE = 4096
PAGE_SHIFT = 12

OFF_LEFT_CONS = 0
OFF_LEFT_PROD = 4
OFF_RIGHT_CONS = 8
OFF_RIGHT_PROD = 12
OFF_LEFT_ORDER = 16
OFF_RIGHT_ORDER = 18
OFF_CLI_LIVE = 20
OFF_SRV_LIVE = 21
OFF_CLI_NOTIFY = 22
OFF_SRV_NOTIFY = 23
OFF_GRANTS = 24

LIVE_GONE = 0
LIVE_CONNECTED = 1
LIVE_WAITING = 2  # cli_live only: the server is waiting for a client


class VchanState(enum.IntEnum):
    """The state of a vchan as ``Vchan.is_open`` reports it; the members compare equal to
    the values ``libxenvchan_is_open`` returns (and to the live bytes they come from)."""

    #: Closed by us, or the peer is gone (crashed, closed or its domain died).
    CLOSED = LIVE_GONE
    #: Both sides are connected.
    CONNECTED = LIVE_CONNECTED
    #: A server waiting for its client.
    WAITING = LIVE_WAITING


NOTIFY_WRITE = 0x1  # "tell me when you write"
NOTIFY_READ = 0x2  # "tell me when you read"
EOF_BIT = 0x80  # gntipc: "I will write no more"

MIN_ORDER = 10
MAX_ORDER = 20  # 1 MiB per direction
SMALL_ORDER = 10  # in-page ring at offset 1024
LARGE_ORDER = 11  # in-page ring at offset 2048
MIN_RING_SIZE = 1 << MIN_ORDER
MAX_RING_SIZE = 1 << MAX_ORDER
#: The ring size of each direction when the caller names none (``listen``, ``Vchan.server``).
DEFAULT_RING_SIZE = 1 << 16

_ORDERS = struct.Struct("<HH")


def check_ring_size(size: int, name: str = "ring size") -> int:
    """``size`` if it is the exact size of a ring: a power of two from 1 KiB to 1 MiB.

    Raises:
        TypeError: ``size`` is not an int.
        LocalProtocolError: (a :class:`ValueError`) any other size.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name} must be an int, not {type(size).__name__}")
    if size & (size - 1) or not MIN_RING_SIZE <= size <= MAX_RING_SIZE:
        raise LocalProtocolError(
            f"{name} must be a power of two from {MIN_RING_SIZE} to {MAX_RING_SIZE}, not {size}"
        )
    return size


def order_for_size(size: int) -> int:
    """The smallest ring order whose ring holds ``size`` bytes (non-powers of two round
    up; at least the minimum order).

    Raises:
        LocalProtocolError: ``size`` is negative or above 1 MiB.
    """
    if size < 0 or size > MAX_RING_SIZE:
        raise LocalProtocolError(f"ring size {size} is outside 0..{MAX_RING_SIZE} bytes")
    return max(MIN_ORDER, (size - 1).bit_length()) if size > 1 else MIN_ORDER


def choose_orders(read_size: int, write_size: int) -> tuple[int, int]:
    """The server's ``(left_order, right_order)`` for its requested read/write sizes,
    exactly as libxenvchan 4.17 chooses them.

    ``left`` is the server's read ring.  An in-page ring always takes the 2048 slot unless
    both rings fit in the page; two in-page rings of order 11 cannot coexist, so then the
    write ring moves to its own page.
    """
    left = order_for_size(read_size)
    right = order_for_size(write_size)
    left_small = left <= LARGE_ORDER
    right_small = right <= LARGE_ORDER
    if left_small and right_small:
        if left == SMALL_ORDER:
            return SMALL_ORDER, LARGE_ORDER
        if right == SMALL_ORDER:
            return LARGE_ORDER, SMALL_ORDER
        return LARGE_ORDER, PAGE_SHIFT
    if left_small:
        return LARGE_ORDER, right
    if right_small:
        return left, LARGE_ORDER
    return left, right


def _pages(order: int) -> int:
    return 0 if order <= LARGE_ORDER else 1 << (order - PAGE_SHIFT)


def channel_pages(read_size: int, write_size: int) -> int:
    """How many pages a server shares for a channel with these ring sizes: the control
    page and each ring's own pages (an in-page ring costs none; the smallest channel,
    1 KiB and 2 KiB rings, is one page)."""
    left, right = choose_orders(read_size, write_size)
    return 1 + _pages(left) + _pages(right)


def fit_ring_sizes(read_size: int, write_size: int, pages: int) -> tuple[int, int]:
    """The largest ring sizes, at most ``read_size`` and ``write_size``, of a channel
    that takes at most ``pages`` pages (:func:`channel_pages`): the larger ring is
    halved first (the read ring on a tie).  At least the smallest channel
    (:data:`MIN_RING_SIZE` both ways, one page), even if ``pages`` is less.
    """
    read = 1 << order_for_size(read_size)
    write = 1 << order_for_size(write_size)
    while channel_pages(read, write) > pages and max(read, write) > MIN_RING_SIZE:
        if read >= write:
            read //= 2
        else:
            write //= 2
    return read, write


def _in_page_offset(order: int) -> int:
    return 1024 if order == SMALL_ORDER else 2048


@dataclass(frozen=True, slots=True)
class Geometry:
    """Validated ring geometry of one control page.

    ``left_pages``/``right_pages`` are the number of external grant refs of each ring;
    ``left_offset``/``right_offset`` the in-page offset of an in-page ring (or None).
    """

    left_order: int
    right_order: int

    @property
    def left_size(self) -> int:
        return 1 << self.left_order

    @property
    def right_size(self) -> int:
        return 1 << self.right_order

    @property
    def left_pages(self) -> int:
        return _pages(self.left_order)

    @property
    def right_pages(self) -> int:
        return _pages(self.right_order)

    @property
    def left_offset(self) -> int | None:
        return None if self.left_pages else _in_page_offset(self.left_order)

    @property
    def right_offset(self) -> int | None:
        return None if self.right_pages else _in_page_offset(self.right_order)

    @property
    def grant_count(self) -> int:
        return self.left_pages + self.right_pages

    @classmethod
    def from_orders(cls, left_order: int, right_order: int, *, remote: bool) -> Geometry:
        """Check a pair of orders (read from the page when ``remote``).

        Raises:
            RemoteProtocolError: ``remote`` and the orders are invalid: outside 10..20,
                two in-page rings in the same slot, or a grants[] array that overlaps an
                in-page ring or the end of the page.
            LocalProtocolError: not ``remote`` and the orders are invalid (as above).
        """
        error = RemoteProtocolError if remote else LocalProtocolError
        for name, order in (("left", left_order), ("right", right_order)):
            if not MIN_ORDER <= order <= MAX_ORDER:
                raise error(f"{name} ring order {order} is outside {MIN_ORDER}..{MAX_ORDER}")
        geometry = cls(left_order, right_order)
        offsets = [o for o in (geometry.left_offset, geometry.right_offset) if o is not None]
        if len(offsets) == 2 and offsets[0] == offsets[1]:
            raise error(f"both rings claim the in-page slot at {offsets[0]}")
        grants_end = OFF_GRANTS + 4 * geometry.grant_count
        limit = min(offsets, default=CONTROL_PAGE_SIZE)
        if grants_end > limit:
            raise error(
                f"{geometry.grant_count} ring grants end at byte {grants_end},"
                f" past {limit} (an in-page ring or the page end)"
            )
        return geometry

    @classmethod
    def read_from(cls, page: memoryview | bytes) -> Geometry:
        """Read (once) and validate the orders written by the server."""
        left, right = _ORDERS.unpack_from(page, OFF_LEFT_ORDER)
        return cls.from_orders(left, right, remote=True)

    def write_to(self, page: memoryview | bytearray) -> None:
        _ORDERS.pack_into(page, OFF_LEFT_ORDER, self.left_order, self.right_order)

    def read_grants(self, page: memoryview | bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The refs of the left and right rings' external pages (read once, as a copy)."""
        n = self.grant_count
        refs = struct.unpack_from(f"<{n}I", page, OFF_GRANTS)
        return refs[: self.left_pages], refs[self.left_pages :]

    def write_grants(
        self, page: memoryview | bytearray, left: tuple[int, ...], right: tuple[int, ...]
    ) -> None:
        if len(left) != self.left_pages or len(right) != self.right_pages:
            raise LocalProtocolError("grant count does not match the ring geometry")
        struct.pack_into(f"<{self.grant_count}I", page, OFF_GRANTS, *left, *right)
