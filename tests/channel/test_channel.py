"""The vchan endpoint on every backend: geometry, data, wrap-around, close semantics."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock

from gntipc import protocol as L
from gntipc._exceptions import LocalProtocolError, RemoteProtocolError
from gntipc.backends import Backend
from gntipc.channel import Vchan
from gntipc.protocol import VchanState

SIZES = [1024, 2048, 4096, 8192, 65536, 1 << 20]
_paths = itertools.count()


def fresh_path() -> str:
    return f"data/gntipc-test/{os.getpid()}/{next(_paths)}"


def pair(backend: Backend, read_size: int, write_size: int, start: int = 0) -> tuple[Vchan, Vchan]:
    path = fresh_path()
    srv = Vchan.server(
        backend, backend.domid, path, read_size=read_size, write_size=write_size, start_index=start
    )
    try:
        cli = Vchan.client(backend, backend.domid, path, timeout=10)
    except BaseException:
        srv.close()
        raise
    return srv, cli


def test_server_publishes_then_client_connects(backend: Backend) -> None:
    path = fresh_path()
    with Vchan.server(backend, backend.domid, path) as srv:
        full = Vchan.resolve_path(backend.domid, path)
        assert srv.path == full
        assert srv.is_open() == VchanState.WAITING
        ref = int(backend.store.read(f"{full}/ring-ref"))
        assert ref == srv.endpoint._pages[0].refs[0]
        perms = [str(p) for p in backend.store.get_perms(f"{full}/ring-ref")]
        # as libxenvchan: owner the server with no access for others, read for the client
        assert perms == [f"n{backend.domid}", f"r{backend.domid}"]
        with Vchan.client(backend, backend.domid, path, timeout=10) as cli:
            srv.handle_events()
            assert srv.is_open() == VchanState.CONNECTED and cli.is_open() == VchanState.CONNECTED
            assert (srv.read_size, srv.write_size) == (65536, 65536)
            assert (cli.read_size, cli.write_size) == (65536, 65536)
        # the server removes its keys on close
    assert not backend.store.exists(f"{full}/ring-ref")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direction", ["s2c", "c2s"])
def test_ring_sizes_fill_exactly_and_wrap(backend: Backend, size: int, direction: str) -> None:
    # Start just below 2**32 so the free-running indices wrap during the test.
    srv, cli = pair(backend, size, size, start=(1 << 32) - size // 2 - 3)
    with srv, cli:
        tx, rx = (srv, cli) if direction == "s2c" else (cli, srv)
        assert tx.write_size == rx.read_size
        # libxenvchan's choice: e.g. (1024, 1024) gives the server's write ring 2048 bytes.
        left, right = L.choose_orders(size, size)
        assert tx.write_size == 1 << (right if direction == "s2c" else left)
        size = tx.write_size
        blob = os.urandom(size + 1)
        # off by one: one byte more than the ring holds is refused as a packet...
        with pytest.raises(LocalProtocolError):
            tx.send_nowait(blob)
        # ...and written partially as a stream: exactly the ring's size.
        assert tx.write_nowait(blob) == size
        assert tx.buffer_space() == 0 and rx.data_ready() == size
        assert tx.write_nowait(b"x") == 0
        # A stream read copies once, straight out of the ring: it stops at the ring's
        # end, and the next read returns the wrapped rest.
        first = rx.read_nowait(size + 100)
        assert 0 < len(first) <= size
        assert first + rx.read_nowait(size + 100) == blob[:size]
        assert rx.read_nowait(10) == b""
        # several laps across the index wrap with odd-sized chunks
        sent = bytearray()
        got = bytearray()
        for k in (size - 1, 1, size, 3, size // 2 + 1, size):
            chunk = os.urandom(k)
            assert tx.send_nowait(chunk)
            sent += chunk
            got += rx.recv_nowait(k) or b""
        assert got == sent


def test_packets_all_or_nothing(backend: Backend) -> None:
    srv, cli = pair(backend, 1024, 1024)
    with srv, cli:
        assert cli.send_nowait(b"a" * 1000)
        assert not cli.send_nowait(b"b" * 100)  # does not fit: nothing written
        assert srv.data_ready() == 1000
        assert srv.recv_nowait(1001) is None
        assert srv.recv_nowait(1000) == b"a" * 1000
        with pytest.raises(LocalProtocolError):
            srv.recv_nowait(1025)


def test_close_then_drain_then_end_of_stream(backend: Backend) -> None:
    srv, cli = pair(backend, 4096, 4096)
    with srv:
        cli.write_nowait(b"last words")
        cli.close()
        cli.close()  # idempotent
        srv.handle_events()
        assert srv.is_open() == VchanState.CLOSED
        # everything written before the close is still read
        assert srv.read_nowait(100) == b"last words"
        with pytest.raises(EndOfStream):
            srv.read_nowait(100)
        with pytest.raises(BrokenResourceError):
            srv.write_nowait(b"x")
    with pytest.raises(ClosedResourceError):
        cli.read_nowait(1)
    with pytest.raises(ClosedResourceError):
        srv.fileno()


def test_half_close_keeps_the_other_direction(backend: Backend) -> None:
    srv, cli = pair(backend, 4096, 4096)
    with srv, cli:
        cli.write_nowait(b"request")
        cli.send_eof()
        with pytest.raises(ClosedResourceError):
            cli.write_nowait(b"more")
        assert srv.read_nowait(100) == b"request"
        with pytest.raises(EndOfStream):
            srv.read_nowait(100)
        srv.write_nowait(b"reply")
        assert cli.read(100, timeout=5) == b"reply"


def test_blocking_read_waits_for_the_event(backend: Backend) -> None:
    import threading

    srv, cli = pair(backend, 65536, 65536)
    with srv, cli:
        srv.handle_events()
        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append(srv.recv(70000 // 2, timeout=10)))
        t.start()
        payload = os.urandom(35000)
        for i in range(0, len(payload), 1000):
            cli.write_all(payload[i : i + 1000], timeout=10)
        t.join(10)
        assert result == [payload]
        with pytest.raises(TimeoutError):
            srv.read(1, timeout=0.05)


def test_connect_times_out_without_a_server(backend: Backend) -> None:
    with pytest.raises(TimeoutError, match="no vchan server"):
        Vchan.client(backend, backend.domid, fresh_path(), timeout=0.3)
    with pytest.raises(WouldBlock):
        Vchan.client_nowait(backend, backend.domid, fresh_path())


def test_a_second_client_cannot_steal_a_connected_channel(backend: Backend) -> None:
    path = fresh_path()
    with (
        Vchan.server(backend, backend.domid, path) as srv,
        Vchan.client(backend, backend.domid, path, timeout=5) as cli,
    ):
        with pytest.raises(Exception) as info:
            Vchan.client_nowait(backend, backend.domid, path)
        assert not isinstance(info.value, WouldBlock)
        cli.write_nowait(b"still mine")
        assert srv.read(100, timeout=5) == b"still mine"


@pytest.mark.parametrize("value", [(1 << 20), 0xFFFFFFFF, 0x80000000, 65537])
def test_hostile_indices_raise_remote_protocol_error(backend: Backend, value: int) -> None:
    srv, cli = pair(backend, 65536, 65536)
    with srv, cli:
        page = srv.endpoint._pages[0].mapping.view()
        try:
            # the client (peer) claims to have produced `value` bytes in the left ring
            struct.pack_into("<I", page, L.OFF_LEFT_PROD, value)
            with pytest.raises(RemoteProtocolError):
                srv.read_nowait(100)
            with pytest.raises(RemoteProtocolError):
                srv.data_ready()
            # and to have consumed more than the server wrote (0xFFFFFFFF would be a
            # consumer one byte *behind*: bogus but within bounds, so accepted)
            struct.pack_into("<I", page, L.OFF_RIGHT_CONS, value)
            if (0 - value) & 0xFFFFFFFF > srv.write_size:
                with pytest.raises(RemoteProtocolError):
                    srv.write_nowait(b"x")
            else:
                assert srv.buffer_space() == srv.write_size - 1
        finally:
            page.release()


def test_hostile_live_byte(backend: Backend) -> None:
    srv, cli = pair(backend, 4096, 4096)
    with srv, cli:
        page = srv.endpoint._pages[0].mapping.view()
        try:
            page[L.OFF_SRV_LIVE] = 7
            with pytest.raises(RemoteProtocolError):
                cli.read_nowait(10)
        finally:
            page.release()


def test_bad_arguments(backend: Backend) -> None:
    with pytest.raises(ValueError):
        Vchan.server(backend, -1, fresh_path())
    with pytest.raises(LocalProtocolError):
        Vchan.server(backend, backend.domid, fresh_path(), write_size=(1 << 20) + 1)
    with pytest.raises(LocalProtocolError):
        Vchan.server(backend, backend.domid, "bad//path")


def test_lengths_are_bytes_for_any_buffer(backend: Backend) -> None:
    import array

    srv, cli = pair(backend, 4096, 4096)
    with srv, cli:
        words = array.array("I", range(100))  # 400 bytes, 100 items
        assert cli.write_nowait(memoryview(words)) == 400
        assert cli.send_nowait(memoryview(words))
        assert srv.read_nowait(1000) == words.tobytes() * 2
        into = array.array("I", bytes(400))
        cli.write_nowait(words)
        assert srv.readinto_nowait(memoryview(into)) == 400
        assert into == words
