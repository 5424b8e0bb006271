"""Sans-I/O vchan ring state for one endpoint.

:class:`VchanRings` owns the two directions of one endpoint over memory it is given (the
control page and the ring buffers, as cffi pointers); it never touches an fd and never
waits.  Every operation returns what the caller must do next, e.g.
``n, notify = rings.write(data); if notify: port.notify()``.

The peer's indices, live byte and notify bits are read once per operation by the native
primitives and validated there; our own indices are private copies, so a peer that
scribbles over them cannot move our position.
"""

from __future__ import annotations

from typing import Any

from .._exceptions import RemoteProtocolError
from .._native import ffi, lib
from ._layout import (
    EOF_BIT,
    LIVE_CONNECTED,
    LIVE_GONE,
    LIVE_WAITING,
    OFF_CLI_LIVE,
    OFF_CLI_NOTIFY,
    OFF_LEFT_CONS,
    OFF_LEFT_PROD,
    OFF_RIGHT_CONS,
    OFF_RIGHT_PROD,
    OFF_SRV_LIVE,
    OFF_SRV_NOTIFY,
    check_ring_size,
)

__all__ = ["VchanRings"]

CData = Any  # a cffi pointer


_NOTLIVE = lib.GNT_RING_NOTLIVE


def _check(n: int, what: str) -> int:
    if n < 0:
        raise _error(n, what)
    return n


def _error(n: int, what: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"the peer's {what} index is invalid (it claims more than the ring holds)"
    )


class VchanRings:
    """Both rings of one endpoint plus its live and notify bytes.

    Args:
        ctrl: pointer to the control page (``uint8_t *``, 4096 bytes).
        read_buf: pointer to our read ring's buffer.
        read_size: its size (a power of two).
        write_buf: pointer to our write ring's buffer.
        write_size: its size (a power of two).
        is_server: which side we are (the server reads the left ring).
    """

    __slots__ = (
        "_ctrl",
        "_own_live",
        "_own_notify",
        "_peer_live",
        "_peer_notify",
        "_rd",
        "_rd_data",
        "_rd_notify",
        "_rd_pos",
        "_rd_spun",
        "_wr",
        "_wr_notify",
        "_wr_spun",
        "is_server",
        "read_size",
        "write_size",
    )

    def __init__(
        self,
        ctrl: CData,
        read_buf: CData,
        read_size: int,
        write_buf: CData,
        write_size: int,
        *,
        is_server: bool,
    ) -> None:
        self.is_server = is_server
        self.read_size = read_size
        self.write_size = write_size
        self._ctrl = ctrl
        if is_server:
            rd_cons, rd_prod, wr_cons, wr_prod = (
                OFF_LEFT_CONS,
                OFF_LEFT_PROD,
                OFF_RIGHT_CONS,
                OFF_RIGHT_PROD,
            )
            own_notify, peer_notify = OFF_SRV_NOTIFY, OFF_CLI_NOTIFY
            own_live, peer_live = OFF_SRV_LIVE, OFF_CLI_LIVE
        else:
            rd_cons, rd_prod, wr_cons, wr_prod = (
                OFF_RIGHT_CONS,
                OFF_RIGHT_PROD,
                OFF_LEFT_CONS,
                OFF_LEFT_PROD,
            )
            own_notify, peer_notify = OFF_CLI_NOTIFY, OFF_SRV_NOTIFY
            own_live, peer_live = OFF_CLI_LIVE, OFF_SRV_LIVE
        self._own_notify = ctrl + own_notify
        self._peer_notify = ctrl + peer_notify
        self._own_live = ctrl + own_live
        self._peer_live = ctrl + peer_live
        self._rd = self._ring(ctrl, rd_cons, rd_prod, read_buf, read_size, reader=True)
        self._wr = self._ring(ctrl, wr_cons, wr_prod, write_buf, write_size, reader=False)
        # Out-parameters of the native calls, allocated once: one set per direction, as
        # one reader thread and one writer thread may use the endpoint at once.
        self._rd_notify = ffi.new("int *")
        self._wr_notify = ffi.new("int *")
        self._rd_spun = ffi.new("int *")
        self._wr_spun = ffi.new("int *")
        self._rd_pos = ffi.new("uint32_t *")
        self._rd_data = ffi.cast("uint8_t *", read_buf)

    def _ring(
        self, ctrl: CData, cons: int, prod: int, buf: CData, size: int, *, reader: bool
    ) -> CData:
        check_ring_size(size)
        r = ffi.new("struct gnt_ring *")
        r.cons = ffi.cast("uint32_t *", ctrl + cons)
        r.prod = ffi.cast("uint32_t *", ctrl + prod)
        r.data = ffi.cast("uint8_t *", buf)
        r.size = size
        # Our own index starts where the shared page says (zero after server setup, or
        # wherever the server started it); from now on only our private copy counts.
        r.priv = lib.gnt_load_u32(r.cons if reader else r.prod)
        r.own_notify = self._own_notify
        r.peer_notify = self._peer_notify
        return r

    # -- data ------------------------------------------------------------------------
    def write(self, data: CData, length: int, all_or_nothing: bool = False) -> tuple[int, bool]:
        """Copy up to ``length`` bytes from ``data`` (a cffi pointer) into the write ring,
        if the peer's live byte says connected (1).

        Returns ``(written, notify)``; with ``all_or_nothing`` nothing is written unless
        all fits.  Returns ``(-1, False)`` without writing when the peer is not connected:
        the caller then reports the peer's state.  One native call.  Raises
        RemoteProtocolError for a corrupt peer index.
        """
        notify = self._wr_notify
        n = lib.gnt_ring_write_live(self._wr, self._peer_live, data, length, all_or_nothing, notify)
        if n >= 0:
            return n, bool(notify[0])
        if n == _NOTLIVE:
            return -1, False
        raise _error(n, "read")

    def write_unchecked(
        self, data: CData, length: int, *, all_or_nothing: bool = False
    ) -> tuple[int, bool]:
        """As :meth:`write`, whatever the peer's live byte says (a server writing ahead
        of its client's connection)."""
        notify = self._wr_notify
        n = lib.gnt_ring_write(self._wr, data, length, all_or_nothing, notify)
        return _check(n, "read"), bool(notify[0])

    def read(self, dest: CData, length: int, *, all_or_nothing: bool = False) -> tuple[int, bool]:
        """Copy up to ``length`` readable bytes to ``dest``; ``(read, notify)``."""
        notify = self._rd_notify
        n = lib.gnt_ring_read(self._rd, dest, length, all_or_nothing, notify)
        return _check(n, "write"), bool(notify[0])

    def read_bytes(self, max_bytes: int) -> tuple[bytes, bool]:
        """Up to ``max_bytes`` readable bytes as a new :class:`bytes`, copied once, straight
        out of the ring (stopping at the ring's end: a wrapped remainder comes next time);
        ``(b"", False)`` if none.  Returns ``(data, notify)``."""
        pos = self._rd_pos
        n = lib.gnt_ring_read_begin(self._rd, max_bytes, pos)
        if n <= 0:
            return b"", bool(_check(n, "write"))
        # The one copy: from the ring into the bytes object (cffi's buffer slice).
        data = ffi.buffer(self._rd_data + pos[0], n)[:]
        notify = self._rd_notify
        lib.gnt_ring_read_commit(self._rd, n, notify)
        return data, bool(notify[0])

    def read_begin(self, max_bytes: int) -> tuple[int, int]:
        """``(n, offset)``: up to ``max_bytes`` readable bytes start at ``offset`` in the
        read ring's data (stopping at the ring's end), not consumed; ``(0, 0)`` if none.
        :meth:`read_commit` consumes them."""
        pos = self._rd_pos
        n = lib.gnt_ring_read_begin(self._rd, max_bytes, pos)
        if n <= 0:
            return _check(n, "write"), 0
        return n, pos[0]

    def read_commit(self, n: int) -> bool:
        """Consume ``n`` bytes that :meth:`read_begin` found readable; True if the
        writer asked to be told (notify it)."""
        notify = self._rd_notify
        _check(lib.gnt_ring_read_commit(self._rd, n, notify), "write")
        return bool(notify[0])

    def spin_read(self, want: int, ns: int) -> int:
        """Busy-wait (no syscall, no event asked of the peer, GIL released) up to ``ns``
        nanoseconds until ``want`` bytes are readable, or the peer leaves or sends EOF;
        the bytes readable then."""
        return _check(lib.gnt_ring_spin(self._rd, 0, want, ns, self._peer_live, EOF_BIT), "write")

    def spin_write(self, want: int, ns: int) -> int:
        """As :meth:`spin_read`, for ``want`` bytes of free space; the space then."""
        return _check(lib.gnt_ring_spin(self._wr, 1, want, ns, self._peer_live, 0), "read")

    def write_spin(self, data: CData, length: int, ns: int) -> tuple[int, bool, int]:
        """:meth:`write`, then, while some is left and no event is owed, spin up to
        ``ns`` nanoseconds in all for free space and write on (one native call, GIL
        released).  Returns ``(written, notify, spun)``: ``written`` is -1 as for
        :meth:`write` (nothing done, the peer is not connected); ``spun`` 0 if no spin
        ran, 1 if the spins found room, 2 if the last ran out (or the peer left)."""
        notify, spun = self._wr_notify, self._wr_spun
        n = lib.gnt_ring_write_spin(self._wr, self._peer_live, data, length, ns, notify, spun)
        if n >= 0:
            return n, bool(notify[0]), spun[0]
        if n == _NOTLIVE:
            return -1, False, 0
        raise _error(n, "read")

    def read_spin(self, dest: CData, length: int, ns: int) -> tuple[int, bool, int]:
        """:meth:`read`; if nothing was readable, spin up to ``ns`` nanoseconds for a
        byte (or the peer leaving or sending EOF), then read.  ``(read, notify, spun)``,
        ``spun`` as for :meth:`write_spin`."""
        notify, spun = self._rd_notify, self._rd_spun
        n = lib.gnt_ring_read_spin(
            self._rd, self._peer_live, EOF_BIT, dest, length, ns, notify, spun
        )
        return _check(n, "write"), bool(notify[0]), spun[0]

    def peek(self, dest: CData, length: int, skip: int = 0) -> int:
        """Copy up to ``length`` bytes starting ``skip`` bytes ahead, consuming nothing."""
        return _check(lib.gnt_ring_peek(self._rd, dest, length, skip), "write")

    def data_ready(self) -> int:
        """Bytes readable now (no side effects)."""
        return _check(lib.gnt_ring_data_ready(self._rd), "write")

    def buffer_space(self) -> int:
        """Bytes writable now (no side effects)."""
        return _check(lib.gnt_ring_buffer_space(self._wr), "read")

    def prepare_wait_read(self) -> int:
        """Ask the peer to notify us when it writes; the fresh ``data_ready()``.

        Wait for an event only if this returns 0.
        """
        return _check(lib.gnt_ring_prepare_wait_read(self._rd), "write")

    def prepare_wait_write(self) -> int:
        """Ask the peer to notify us when it reads; the fresh ``buffer_space()``."""
        return _check(lib.gnt_ring_prepare_wait_write(self._wr), "read")

    # -- state bytes -----------------------------------------------------------------
    def peer_live(self) -> int:
        """The peer's live byte, read once: LIVE_GONE, LIVE_CONNECTED or LIVE_WAITING.

        Raises RemoteProtocolError for any other value (or LIVE_WAITING from a client's
        view of the server, which the server never writes).
        """
        v: int = lib.gnt_load_u8(self._peer_live)
        if v in (LIVE_GONE, LIVE_CONNECTED) or (v == LIVE_WAITING and self.is_server):
            return v
        raise RemoteProtocolError(f"the peer's live byte holds {v}, not a vchan state")

    def own_live(self) -> int:
        return int(lib.gnt_load_u8(self._own_live))

    def set_own_live(self, value: int) -> None:
        lib.gnt_store_u8(self._own_live, value)

    def peer_eof(self) -> bool:
        """True once the peer (a gntipc peer) said it will write no more."""
        return bool(lib.gnt_load_u8(self._own_notify) & EOF_BIT)

    def send_eof(self) -> None:
        """Tell a gntipc peer we will write no more (libxenvchan ignores the bit)."""
        lib.gnt_fetch_or_u8(self._peer_notify, EOF_BIT)

    def set_peer_notify(self, bits: int) -> None:
        """OR ``bits`` into the byte the peer honours (setup only)."""
        lib.gnt_fetch_or_u8(self._peer_notify, bits)
