"""The XenStore wire codec, without Xen: header packing, replies, errors, perms, limits."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gntipc._exceptions import RemoteProtocolError, XenError
from gntipc.backends._abc import Perm
from gntipc.backends.xen._xenstore_codec import (
    HEADER,
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Message,
    MsgType,
    check_reply,
    encode_message,
    error_errno,
    format_perms,
    join_strings,
    parse_perms,
    parse_watch_event,
    split_strings,
)


def test_message_type_numbers_match_xs_wire_h() -> None:
    expected = {
        "DIRECTORY": 1, "READ": 2, "GET_PERMS": 3, "WATCH": 4, "UNWATCH": 5,
        "TRANSACTION_START": 6, "TRANSACTION_END": 7, "INTRODUCE": 8, "RELEASE": 9,
        "GET_DOMAIN_PATH": 10, "WRITE": 11, "MKDIR": 12, "RM": 13, "SET_PERMS": 14,
        "WATCH_EVENT": 15, "ERROR": 16, "IS_DOMAIN_INTRODUCED": 17, "RESET_WATCHES": 21,
    }  # fmt: skip
    assert {name: MsgType[name].value for name in expected} == expected


def test_header_is_four_native_u32() -> None:
    data = encode_message(MsgType.READ, 7, 3, b"domid\0")
    assert HEADER.size == 16
    assert data[:16] == struct.pack("=IIII", 2, 7, 3, 6)
    assert data[16:] == b"domid\0"


def test_payload_limit_is_enforced_exactly() -> None:
    assert len(encode_message(MsgType.WRITE, 1, 0, b"x" * XENSTORE_PAYLOAD_MAX)) == 16 + 4096
    with pytest.raises(ValueError, match="XENSTORE_PAYLOAD_MAX"):
        encode_message(MsgType.WRITE, 1, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1))


def test_header_fields_must_fit_u32() -> None:
    with pytest.raises(ValueError, match="req_id"):
        encode_message(MsgType.READ, 1 << 32, 0, b"")
    with pytest.raises(ValueError, match="tx_id"):
        encode_message(MsgType.READ, 1, -1, b"")


def test_strings() -> None:
    assert join_strings(["a", "b"]) == b"a\0b\0"
    assert join_strings(["a", b"v"], terminate=False) == b"a\0v"
    assert join_strings([]) == b""
    assert split_strings(b"a\0b\0") == ["a", "b"]
    assert split_strings(b"value") == ["value"]
    assert split_strings(b"") == []
    with pytest.raises(ValueError, match="NUL"):
        join_strings(["a\0b"])
    with pytest.raises(RemoteProtocolError):
        split_strings(b"\xff\0")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"ENOENT\0", errno.ENOENT),
        (b"EACCES\0", errno.EACCES),
        (b"EAGAIN\0", errno.EAGAIN),
        (b"E2BIG\0", errno.E2BIG),
        (b"EPERM\0", errno.EPERM),
        (b"EQUOTA\0", errno.EIO),  # unknown name
        (b"\0", errno.EIO),
        (b"import os\0", errno.EIO),  # never getattr() arbitrary names
    ],
)
def test_error_names_become_errnos(payload: bytes, code: int) -> None:
    assert error_errno(payload)[0] == code


def test_check_reply_raises_xen_error_with_errno() -> None:
    with pytest.raises(XenError) as info:
        check_reply(Message(MsgType.ERROR, 1, 0, b"ENOENT\0"), MsgType.READ, "read 'x'")
    assert info.value.errno == errno.ENOENT
    assert "read 'x'" in str(info.value)
    with pytest.raises(XenError, match="EWHAT") as info:
        check_reply(Message(MsgType.ERROR, 1, 0, b"EWHAT\0"), MsgType.READ, "read")
    assert info.value.errno == errno.EIO
    assert check_reply(Message(MsgType.READ, 1, 0, b"v"), MsgType.READ, "read") == b"v"
    with pytest.raises(RemoteProtocolError, match="type 11"):
        check_reply(Message(MsgType.WRITE, 1, 0, b"OK\0"), MsgType.READ, "read")


def test_perms_round_trip() -> None:
    perms = [Perm(0, "n"), Perm(5, "r"), Perm(7, "b"), Perm(3, "w")]
    assert format_perms(perms) == b"n0\0r5\0b7\0w3\0"
    assert parse_perms(b"n0\0r5\0b7\0w3\0") == perms
    assert parse_perms(b"b0") == [Perm(0, "b")]


@pytest.mark.parametrize("bad", [b"", b"x0\0", b"r\0", b"rfoo\0", b"n0\0\0"])
def test_bad_perms_from_the_store_are_remote_errors(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_perms(bad)


def test_bad_perms_from_the_caller_are_value_errors() -> None:
    with pytest.raises(ValueError, match="owner"):
        format_perms([])
    with pytest.raises(ValueError, match="out of range"):
        format_perms([Perm(70000, "n")])
    with pytest.raises(ValueError, match="access"):
        format_perms([Perm(0, "x")])  # type: ignore[arg-type]


def test_watch_event() -> None:
    assert parse_watch_event(b"/local/domain/0/a\0tok\0") == ("/local/domain/0/a", "tok")
    with pytest.raises(RemoteProtocolError, match="watch event"):
        parse_watch_event(b"/only-path\0")


def _stream() -> tuple[bytes, list[Message]]:
    msgs = [
        Message(MsgType.READ, 1, 0, b"value"),
        Message(MsgType.WATCH_EVENT, 0, 0, b"/a\0t\0"),
        Message(MsgType.WRITE, 2, 9, b"OK\0"),
        Message(MsgType.DIRECTORY, 3, 0, b""),  # empty payload
        Message(MsgType.READ, 4, 0, b"y" * XENSTORE_PAYLOAD_MAX),
    ]
    data = b"".join(encode_message(m.type, m.req_id, m.tx_id, m.payload) for m in msgs)
    return data, msgs


def test_decoder_at_every_split_point() -> None:
    data, msgs = _stream()
    for cut in range(len(data) + 1):
        dec = Decoder()
        got = dec.feed(data[:cut]) + dec.feed(data[cut:])
        assert got == msgs, cut
        assert not dec.partial


def test_decoder_byte_by_byte_and_needed() -> None:
    data, msgs = _stream()
    dec = Decoder()
    got: list[Message] = []
    pos = 0
    while pos < len(data):
        need = dec.needed()
        assert need > 0 or dec.partial  # an empty payload completes with the next feed
        got += dec.feed(data[pos : pos + 1])
        pos += 1
    assert got == msgs
    assert dec.needed() == HEADER.size


def test_decoder_reading_exactly_needed_never_overreads() -> None:
    data, msgs = _stream()
    dec = Decoder()
    pos = 0
    for expected in msgs:
        while True:
            n = dec.needed()
            chunk = data[pos : pos + max(n, 0)]
            pos += len(chunk)
            out = dec.feed(chunk)
            if out:
                assert out == [expected]
                break
    assert pos == len(data)


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=30))
def test_decoder_random_chunking(cuts: list[int]) -> None:
    data, msgs = _stream()
    dec = Decoder()
    got: list[Message] = []
    pos = 0
    for size in cuts:
        got += dec.feed(data[pos : pos + size])
        pos += size
    got += dec.feed(data[pos:])
    assert got == msgs


def test_decoder_rejects_oversized_payload() -> None:
    dec = Decoder()
    with pytest.raises(RemoteProtocolError, match="4097"):
        dec.feed(struct.pack("=IIII", 2, 1, 0, XENSTORE_PAYLOAD_MAX + 1))


def test_xenbus_payload_limit() -> None:
    from gntipc.backends.xen._xenstore_codec import XENBUS_PAYLOAD_MAX

    assert XENBUS_PAYLOAD_MAX == 4080
    data = encode_message(MsgType.WRITE, 1, 0, b"x" * 4080, payload_max=XENBUS_PAYLOAD_MAX)
    assert len(data) == 4096
    with pytest.raises(ValueError, match="xenbus"):
        encode_message(MsgType.WRITE, 1, 0, b"x" * 4081, payload_max=XENBUS_PAYLOAD_MAX)
