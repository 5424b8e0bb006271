"""The XenStore wire codec, sans I/O: message packing, reply and error parsing,
permission lists, the payload limit, and the stream :class:`Decoder`.  Pure functions,
unit-tested without Xen; the connections that use them are in
:mod:`gntipc.backends.xen._xenstore`.

Wire facts (``xen/io/xs_wire.h``, ``docs/misc/xenstore.txt``): every message is a header
of four native-endian u32 ``(type, req_id, tx_id, len)`` followed by ``len`` ≤
``XENSTORE_PAYLOAD_MAX`` (4096) bytes, usually NUL-terminated strings.  A reply echoes the
request's type and ``req_id``; a failure is an ``XS_ERROR`` reply whose payload is an
errno name (``"ENOENT\\0"``).  Watch events (``XS_WATCH_EVENT``, payload
``path\\0token\\0``) arrive unsolicited on the connection that set the watch.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..._exceptions import RemoteProtocolError, raise_errno
from .._abc import Perm

__all__ = [
    "HEADER",
    "XENBUS_PAYLOAD_MAX",
    "XENSTORE_PAYLOAD_MAX",
    "Decoder",
    "Message",
    "MsgType",
    "check_reply",
    "encode_message",
    "encode_path",
    "encode_string",
    "error_errno",
    "format_perms",
    "join_strings",
    "parse_perms",
    "parse_watch_event",
    "split_strings",
]

#: The largest payload of one message (both directions).
XENSTORE_PAYLOAD_MAX = 4096
#: ``struct xsd_sockmsg``: type, req_id, tx_id, len (native byte order, no padding).
HEADER = struct.Struct("=IIII")
#: The largest request payload through ``/dev/xen/xenbus``: Linux's xenbus device holds
#: header and payload in one 4096-byte buffer (a longer write fails with EINVAL).
XENBUS_PAYLOAD_MAX = XENSTORE_PAYLOAD_MAX - 16


class MsgType(enum.IntEnum):
    """``enum xsd_sockmsg_type``."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded XenStore message."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes


def _u32(name: str, value: int) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"XenStore {name} {value} does not fit in a u32")
    return value


def encode_message(
    msg_type: int,
    req_id: int,
    tx_id: int,
    payload: bytes,
    *,
    payload_max: int = XENSTORE_PAYLOAD_MAX,
) -> bytes:
    """Header plus payload of one message.

    ``payload_max`` is XENSTORE_PAYLOAD_MAX for xenstored's socket, and
    :data:`XENBUS_PAYLOAD_MAX` for ``/dev/xen/xenbus`` (Linux buffers header and payload
    together in 4096 bytes and refuses more with EINVAL).

    Raises:
        ValueError: the payload is longer than ``payload_max`` bytes, or a header field
            does not fit in a u32.
    """
    if len(payload) > payload_max:
        limit = (
            "XENSTORE_PAYLOAD_MAX"
            if payload_max == XENSTORE_PAYLOAD_MAX
            else "the limit of /dev/xen/xenbus"
        )
        raise ValueError(
            f"XenStore payload of {len(payload)} bytes exceeds {limit}"
            f" ({payload_max} bytes, path and value together)"
        )
    return (
        HEADER.pack(
            _u32("type", msg_type), _u32("req_id", req_id), _u32("tx_id", tx_id), len(payload)
        )
        + payload
    )


def encode_string(value: str | bytes, what: str) -> bytes:
    """One string of a payload: ``value`` as UTF-8 (bytes as they are).

    Raises:
        ValueError: it contains a NUL byte (``what`` names it in the message).
    """
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if b"\0" in data:
        raise ValueError(f"XenStore {what} {value!r} contains a NUL byte")
    return data


def encode_path(path: str) -> bytes:
    """A store path as sent (without its terminating NUL).

    Raises:
        ValueError: not a non-empty str, or it contains a NUL byte.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"a XenStore path must be a non-empty str, not {path!r}")
    return encode_string(path, "path")


def join_strings(parts: Iterable[str | bytes], *, terminate: bool = True) -> bytes:
    """``a\\0b\\0`` (``a\\0b`` when not ``terminate``, as for a write's value).

    Raises:
        ValueError: a part contains a NUL byte.
    """
    encoded = [encode_string(p, "string") for p in parts]
    out = b"\0".join(encoded)
    return out + b"\0" if terminate and encoded else out


def split_strings(payload: bytes) -> list[str]:
    """The NUL-separated strings of a payload (a trailing NUL ends the last one).

    Raises:
        RemoteProtocolError: not valid UTF-8.
    """
    if not payload:
        return []
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    try:
        return payload.decode("utf-8").split("\0")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"XenStore sent a non-UTF-8 string: {payload!r}") from exc


def error_errno(payload: bytes) -> tuple[int, str]:
    """``(errno, name)`` of an ``XS_ERROR`` payload such as ``b"ENOENT\\0"``.

    An unknown name maps to EIO; the name is kept for the message.
    """
    name = payload.split(b"\0", 1)[0].decode("ascii", "replace")
    value = getattr(errno, name, None) if name.isidentifier() and name.startswith("E") else None
    return (value if isinstance(value, int) else errno.EIO), name


def check_reply(msg: Message, expected: int, what: str) -> bytes:
    """The payload of a successful reply of type ``expected``.

    Raises:
        XenError: an ``XS_ERROR`` reply (errno from its name).
        RemoteProtocolError: a reply of another type.
    """
    if msg.type == MsgType.ERROR:
        err, name = error_errno(msg.payload)
        if err == errno.EIO and name != "EIO":
            what = f"{what} (xenstored said {name!r})"
        raise_errno(err, what)
    if msg.type != expected:
        raise RemoteProtocolError(
            f"{what}: XenStore replied with message type {msg.type}, expected {expected}"
        )
    return msg.payload


def parse_perms(payload: bytes) -> list[Perm]:
    """``b"n0\\0r5\\0"`` → ``[Perm(0, "n"), Perm(5, "r")]``.

    Raises:
        RemoteProtocolError: an entry is malformed or the list is empty.
    """
    out = []
    for text in split_strings(payload):
        try:
            out.append(Perm.parse(text))
        except (ValueError, IndexError) as exc:
            raise RemoteProtocolError(f"XenStore sent a bad permission {text!r}") from exc
    if not out:
        raise RemoteProtocolError("XenStore sent an empty permission list")
    return out


def format_perms(perms: Sequence[Perm]) -> bytes:
    """``[Perm(0, "n"), Perm(5, "r")]`` → ``b"n0\\0r5\\0"``.

    Raises:
        ValueError: empty list, bad access letter or domid out of range.
    """
    if not perms:
        raise ValueError("a XenStore permission list needs at least the owner entry")
    parts = []
    for p in perms:
        if p.access not in ("n", "r", "w", "b"):
            raise ValueError(f"bad XenStore access {p.access!r} (expected n, r, w or b)")
        if not 0 <= p.domid <= 0xFFFF:
            raise ValueError(f"domid {p.domid} out of range in a XenStore permission")
        parts.append(str(p))
    return join_strings(parts)


def parse_watch_event(payload: bytes) -> tuple[str, str]:
    """``(path, token)`` of an ``XS_WATCH_EVENT`` payload.

    Raises:
        RemoteProtocolError: fewer than two strings.
    """
    parts = split_strings(payload)
    if len(parts) < 2:
        raise RemoteProtocolError(f"XenStore sent a malformed watch event {payload!r}")
    return parts[0], parts[1]


class Decoder:
    """Reassembles messages from a byte stream split anywhere.

    :meth:`needed` says how many bytes complete the current message, so a reader can
    read exactly that and never consume the next message early.
    """

    __slots__ = ("_buf", "_header")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, int, int] | None = None

    def needed(self) -> int:
        """Bytes still missing for the current message (header or payload)."""
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[3] - len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes; return the messages they complete.

        Raises:
            RemoteProtocolError: a header announces a payload over 4096 bytes.
        """
        out: list[Message] = []
        view = memoryview(data)
        while True:
            need = self.needed()
            if need > 0:
                if not view:
                    break
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < (HEADER.size if self._header is None else self._header[3]):
                    break
            if self._header is None:
                header = HEADER.unpack(bytes(self._buf))
                if header[3] > XENSTORE_PAYLOAD_MAX:
                    raise RemoteProtocolError(
                        f"XenStore announced a {header[3]}-byte payload"
                        f" (more than {XENSTORE_PAYLOAD_MAX})"
                    )
                self._header = header
                self._buf.clear()
            else:
                t, r, x, _n = self._header
                out.append(Message(t, r, x, bytes(self._buf)))
                self._header = None
                self._buf.clear()
        return out

    @property
    def partial(self) -> bool:
        """True while part of a message has been fed."""
        return self._header is not None or bool(self._buf)
