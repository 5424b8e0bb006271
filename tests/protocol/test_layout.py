"""The wire layout and libxenvchan's order choice, checked against what the real
libxenvchan 4.17 wrote on real Xen (tests/protocol/data/libxenvchan-4.17.json)."""

from __future__ import annotations

import json
import pathlib
import struct

import pytest

from gntipc import protocol as L
from gntipc._exceptions import LocalProtocolError, RemoteProtocolError

VECTORS = json.loads((pathlib.Path(__file__).parent / "data" / "libxenvchan-4.17.json").read_text())
INIT = [r for r in VECTORS["records"] if r["stage"] == "after_server_init"]


def test_vectors_cover_the_grid() -> None:
    assert len(INIT) >= 49


@pytest.mark.parametrize("rec", INIT, ids=lambda r: f"r{r['read_min']}-w{r['write_min']}")
def test_orders_and_geometry_match_libxenvchan(rec: dict[str, int]) -> None:
    left, right = L.choose_orders(rec["read_min"], rec["write_min"])
    assert (left, right) == (rec["left_order"], rec["right_order"])
    geo = L.Geometry.from_orders(left, right, remote=True)
    assert geo.left_pages == rec["left_grants"]
    assert geo.right_pages == rec["right_grants"]
    assert (geo.left_offset or -1) == rec["server_read_ring_offset_in_page"]
    assert (geo.right_offset or -1) == rec["server_write_ring_offset_in_page"]


def test_field_offsets_are_the_wire_format() -> None:
    assert (L.OFF_LEFT_CONS, L.OFF_LEFT_PROD, L.OFF_RIGHT_CONS, L.OFF_RIGHT_PROD) == (0, 4, 8, 12)
    assert (L.OFF_LEFT_ORDER, L.OFF_RIGHT_ORDER) == (16, 18)
    assert (L.OFF_CLI_LIVE, L.OFF_SRV_LIVE, L.OFF_CLI_NOTIFY, L.OFF_SRV_NOTIFY) == (20, 21, 22, 23)
    assert L.OFF_GRANTS == 24


@pytest.mark.parametrize(
    ("size", "order"),
    [
        (0, 10),
        (1, 10),
        (1024, 10),
        (1025, 11),
        (2048, 11),
        (3000, 12),
        (4096, 12),
        (65535, 16),
        (65536, 16),
        (1 << 20, 20),
    ],
)
def test_non_powers_of_two_round_up(size: int, order: int) -> None:
    assert L.order_for_size(size) == order


@pytest.mark.parametrize("size", [-1, (1 << 20) + 1, 1 << 30])
def test_sizes_out_of_range_are_refused(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        L.order_for_size(size)


@pytest.mark.parametrize(
    ("left", "right"),
    [(9, 12), (12, 21), (0, 0), (65535, 12), (10, 10), (11, 11)],
)
def test_hostile_orders_are_rejected(left: int, right: int) -> None:
    page = bytearray(4096)
    struct.pack_into("<HH", page, L.OFF_LEFT_ORDER, left, right)
    with pytest.raises(RemoteProtocolError):
        L.Geometry.read_from(page)


def test_grants_overlapping_an_in_page_ring_are_rejected() -> None:
    # 256 grants end at 24 + 1024 = 1048 > 1024: overlaps an order-10 in-page ring.
    with pytest.raises(RemoteProtocolError, match="grants"):
        L.Geometry.from_orders(20, 10, remote=True)
    # ...but fit below the 2048 slot.
    assert L.Geometry.from_orders(20, 11, remote=True).grant_count == 256


def test_grants_round_trip_in_order_left_first() -> None:
    geo = L.Geometry.from_orders(13, 12, remote=False)
    page = bytearray(4096)
    geo.write_grants(page, (7, 8), (9,))
    assert struct.unpack_from("<3I", page, 24) == (7, 8, 9)
    assert geo.read_grants(bytes(page)) == ((7, 8), (9,))
    with pytest.raises(LocalProtocolError):
        geo.write_grants(page, (1,), (2,))
