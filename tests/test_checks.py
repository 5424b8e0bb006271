"""The argument checks every layer shares: one domid check, one ring-size rule."""

from __future__ import annotations

import uuid

import anyio
import pytest

import gntipc
from gntipc import LocalProtocolError
from gntipc._domid import DOMID_MAX, DOMID_SELF, check_domid
from gntipc.backends.sim import SimBackend
from gntipc.channel import Vchan
from gntipc.protocol import VchanState


def test_check_domid() -> None:
    assert check_domid(0) == 0
    assert check_domid(DOMID_MAX) == DOMID_MAX
    assert check_domid(DOMID_SELF, allow_self=True) == DOMID_SELF
    for bad in (-1, DOMID_MAX + 1, DOMID_SELF, 1 << 16):
        with pytest.raises(LocalProtocolError, match="domid"):
            check_domid(bad)
    for wrong in ("5", 5.0, None, True):
        with pytest.raises(TypeError, match="domid"):
            check_domid(wrong)


def test_every_layer_raises_the_same_domid_errors() -> None:
    # Before issue 12 the sim backend and the rendezvous raised a plain ValueError and the
    # rendezvous accepted a bool; LocalProtocolError is still a ValueError.
    path = f"data/vchan/test-{uuid.uuid4().hex}"
    with pytest.raises(LocalProtocolError, match="domid"):
        SimBackend(DOMID_SELF)
    with SimBackend(0) as b:
        for call in (
            lambda: b.share(-1, 1),
            lambda: b.map(DOMID_MAX + 1, [0]),
            lambda: b.alloc_unbound(0x8000),
            lambda: Vchan.server(b, -1, path),
            lambda: Vchan.client(b, DOMID_MAX + 1, path, timeout=0),
        ):
            with pytest.raises(LocalProtocolError, match="domid"):
                call()
        for call in (
            lambda: b.share(True, 1),  # type: ignore[arg-type]
            lambda: Vchan.server(b, True, path),
            lambda: Vchan.client(b, "0", path, timeout=0),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError, match="domid"):
                call()


def test_stream_api_domid_errors() -> None:
    async def main() -> None:
        with SimBackend(0) as b:
            with pytest.raises(LocalProtocolError, match="domid"):
                await gntipc.listen(-1, "data/vchan/x", backend=b)
            with pytest.raises(TypeError, match="domid"):
                await gntipc.connect("0", "data/vchan/x", timeout=0, backend=b)  # type: ignore[arg-type]

    anyio.run(main)


def test_ring_size_rules() -> None:
    from gntipc.channel import DEFAULT_RING_SIZE
    from gntipc.protocol import DEFAULT_RING_SIZE as protocol_default
    from gntipc.protocol import check_ring_size, order_for_size

    assert DEFAULT_RING_SIZE == protocol_default == 65536
    for size in (1024, 2048, 4096, 1 << 20):
        assert check_ring_size(size) == size
    for bad in (0, 512, 1000, 1025, 3 << 10, 2 << 20):
        with pytest.raises(LocalProtocolError, match="power of two"):
            check_ring_size(bad, "read_size")
    with pytest.raises(TypeError):
        check_ring_size(4096.0)  # type: ignore[arg-type]
    # Vchan.server takes minimum sizes and rounds up, as libxenvchan_server_init does.
    assert order_for_size(1000) == 10
    assert order_for_size(4097) == 13
    with SimBackend(0) as b, Vchan.server(
        b, 0, f"data/vchan/test-{uuid.uuid4().hex}", read_size=1000, write_size=5000
    ) as v:
        # an in-page ring takes the 2048 slot when the other ring has its own pages
        assert (v.read_size, v.write_size) == (2048, 8192)


def test_listen_takes_exact_ring_sizes() -> None:
    async def main() -> None:
        with SimBackend(0) as b:
            with pytest.raises(LocalProtocolError, match="read_size must be a power of two"):
                await gntipc.listen(0, "data/vchan/x", read_size=1000, backend=b)
            with pytest.raises(LocalProtocolError, match="write_size"):
                await gntipc.listen(0, "data/vchan/x", write_size=2 << 20, backend=b)

    anyio.run(main)


def test_is_open_returns_a_vchan_state() -> None:
    assert gntipc.VchanState is VchanState
    assert (VchanState.CLOSED, VchanState.CONNECTED, VchanState.WAITING) == (0, 1, 2)
    path = f"data/vchan/test-{uuid.uuid4().hex}"
    with SimBackend(0) as b:
        srv = Vchan.server(b, 0, path, read_size=4096, write_size=4096)
        assert srv.is_open() is VchanState.WAITING and srv.is_open() == 2
        with Vchan.client(b, 0, path, timeout=10) as cli:
            assert cli.is_open() is VchanState.CONNECTED
            assert srv.is_open() is VchanState.CONNECTED
        assert srv.is_open() is VchanState.CLOSED
        srv.close()
        assert srv.is_open() is VchanState.CLOSED == 0


def test_error_tree_in_one_module() -> None:
    from gntipc import messages
    from gntipc._exceptions import (
        MalformedMessage,
        MappingInUse,
        MessageTooLarge,
        StaleKeys,
        XenStoreTimeout,
    )

    for cls in (MappingInUse, StaleKeys, XenStoreTimeout, MalformedMessage, MessageTooLarge):
        assert cls.__module__ == "gntipc._exceptions"
        assert getattr(gntipc, cls.__name__) is cls
        assert issubclass(cls, gntipc.GntipcError)
    # the public module of messages names its errors too
    assert messages.MalformedMessage is MalformedMessage
    assert messages.MessageTooLarge is MessageTooLarge
    assert issubclass(XenStoreTimeout, TimeoutError)
    assert issubclass(MappingInUse, BufferError)
    assert issubclass(MalformedMessage, gntipc.RemoteProtocolError)


def test_sim_state_database_errors_are_xen_errors() -> None:
    import errno
    import sqlite3

    from gntipc.backends.sim._runtime import _raise_sqlite

    with pytest.raises(gntipc.XenError) as info:
        _raise_sqlite(sqlite3.OperationalError("database is locked"))
    assert info.value.errno == errno.EBUSY
    assert "database is locked" in str(info.value)
    with SimBackend(0) as b:
        with pytest.raises(gntipc.XenError) as info:
            b._rt.db.execute("SELECT * FROM no_such_table")
        assert info.value.errno == errno.EIO
        assert not isinstance(info.value, sqlite3.Error)


def test_protocol_package_exports_its_api() -> None:
    from gntipc import protocol
    from gntipc.protocol import _layout

    assert set(protocol.__all__) == {
        *_layout.__all__,
        "VchanRings",
        # the sans-I/O message framing and session codec (protocol.framing / protocol.mux)
        "BATCH_FLAG",
        "DECODE_AHEAD",
        "DEFAULT_MAX_MESSAGE_SIZE",
        "FRAME_HEADER_SIZE",
        "MAX_MESSAGE_SIZE_LIMIT",
        "NEED_DATA",
        "NeedData",
        "MessageFramer",
        "FrameType",
        "MuxEvent",
        "SessionDecoder",
        # the bulk pool's and the resumable records' state machines (protocol.bulk/.resume)
        "BulkProtocol",
        "ResumeState",
    }
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None


def test_process_state_is_created_on_first_use_not_at_import() -> None:
    import subprocess
    import sys

    code = (
        "import gntipc, gntipc.devices, gntipc.backends.xen, gntipc.backends.sim\n"
        "from gntipc import _process\n"
        "assert not _process._hooked and _process._sender is None\n"
        "with gntipc.backends.sim.SimBackend(0):\n"
        "    pass\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_drop_in_forked_child_runs_in_the_child_only() -> None:
    import os

    from gntipc._process import drop_in_forked_child

    class Thing:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def drop(self) -> None:
            os.write(self.fd, b"dropped")

    r, w = os.pipe()
    thing = Thing(w)
    drop_in_forked_child(thing, Thing.drop, stage=5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: the hook already ran
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(w)
        assert os.read(r, 100) == b"dropped"
    finally:
        os.close(r)
    del thing  # held weakly: nothing more to drop
