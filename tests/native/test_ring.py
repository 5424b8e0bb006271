"""The C ring primitives: against a model, hostile indices, notify bits, and two processes."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gntipc._native import ffi, lib

sys.path.insert(0, str(Path(__file__).parent))
from _ring_peer import DATA_OFFSET, make_ring

SIZES = [1 << k for k in range(10, 21)]
W, R = lib.GNT_NOTIFY_WRITE, lib.GNT_NOTIFY_READ


class Shared:
    """A shared region with a writer and a reader ring over it, starting at index ``start``."""

    def __init__(self, size: int, start: int) -> None:
        self.mm = mmap.mmap(-1, DATA_OFFSET + size)
        self.base = ffi.from_buffer(self.mm)
        self.size = size
        self.ctrl = ffi.cast("uint32_t *", self.base)
        self.ctrl[0] = self.ctrl[1] = start
        self.w = make_ring(self.base, size, start, writer=True)
        self.r = make_ring(self.base, size, start, writer=False)
        self.notify = ffi.new("int *")

    @property
    def writer_byte(self) -> int:
        return self.mm[8]

    @property
    def reader_byte(self) -> int:
        return self.mm[9]

    def write(self, data: bytes, aon: bool = False) -> tuple[int, int]:
        n = lib.gnt_ring_write(self.w, data, len(data), int(aon), self.notify)
        return n, self.notify[0]

    def read(self, n: int, aon: bool = False) -> tuple[bytes | int, int]:
        buf = bytearray(n)
        got = lib.gnt_ring_read(self.r, ffi.from_buffer(buf), n, int(aon), self.notify)
        return (bytes(buf[:got]) if got >= 0 else got), self.notify[0]

    def peek(self, n: int, skip: int) -> bytes | int:
        buf = bytearray(n)
        got = lib.gnt_ring_peek(self.r, ffi.from_buffer(buf), n, skip)
        return bytes(buf[:got]) if got >= 0 else got

    def ring_bytes(self) -> bytes:
        return self.mm[DATA_OFFSET:]

    def close(self) -> None:
        ffi.release(self.base)
        self.mm.close()


@pytest.fixture
def shared() -> Iterator[Any]:
    made: list[Shared] = []

    def make(size: int = 1024, start: int = 0) -> Shared:
        made.append(Shared(size, start))
        return made[-1]

    yield make
    for s in made:
        s.close()


starts = st.one_of(st.integers(2**32 - 3 * 2**20, 2**32 - 1), st.integers(0, 2**32 - 1), st.just(0))
op = st.tuples(
    st.sampled_from(["write", "read", "peek", "wait_read", "wait_write"]),
    st.integers(0, 1 << 21),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from(SIZES), start=starts, ops=st.lists(op, max_size=40), seed=st.integers())
def test_ring_against_model(size: int, start: int, ops: list[Any], seed: int) -> None:
    s = Shared(size, start)
    rng = random.Random(seed)
    model = bytearray()
    wbits = rbits = 0  # the model of the writer's and the reader's notify bytes
    try:
        for kind, raw, aon in ops:
            n = raw % (2 * size + 2)  # lengths around the ring size, 0 included
            if kind == "write":
                data = rng.randbytes(n)
                space = size - len(model)
                expect = 0 if (aon and n > space) else min(n, space)
                got, notify = s.write(data, aon)
                assert got == expect
                model += data[:expect]
                if expect:
                    assert notify == bool(wbits & W)
                    wbits &= ~W
                else:
                    assert notify == 0
            elif kind == "read":
                expect = 0 if (aon and n > len(model)) else min(n, len(model))
                got, notify = s.read(n, aon)
                assert got == bytes(model[:expect])
                del model[:expect]
                if expect:
                    assert notify == bool(rbits & R)
                    rbits &= ~R
                else:
                    assert notify == 0
            elif kind == "peek":
                skip = rng.randrange(size + 2)
                assert s.peek(n, skip) == bytes(model[skip : skip + n])
            elif kind == "wait_read":
                assert lib.gnt_ring_prepare_wait_read(s.r) == len(model)
                wbits |= W
            else:
                assert lib.gnt_ring_prepare_wait_write(s.w) == size - len(model)
                rbits |= R
            assert lib.gnt_ring_data_ready(s.r) == len(model)
            assert lib.gnt_ring_buffer_space(s.w) == size - len(model)
            assert (s.writer_byte, s.reader_byte) == (wbits, rbits)
            assert s.ctrl[1] == (start + s.w.priv - start) % 2**32 == s.w.priv
            assert s.ctrl[0] == s.r.priv
    finally:
        s.close()


@pytest.mark.parametrize("size", SIZES)
def test_exact_fill_off_by_one(shared: Any, size: int) -> None:
    # Start so that the ring position wraps in the middle and the u32 index wraps too.
    s = shared(size, start=2**32 - size // 3)
    rng = random.Random(size)
    data = rng.randbytes(size + 1)
    assert s.write(data[: size + 1], aon=True)[0] == 0  # one too many: nothing
    assert s.write(data[: size - 1])[0] == size - 1
    assert s.write(data[size - 1 : size + 1])[0] == 1  # only one byte fits
    assert lib.gnt_ring_buffer_space(s.w) == 0
    assert s.write(b"x")[0] == 0
    assert lib.gnt_ring_data_ready(s.r) == size
    assert s.peek(size + 5, 0) == data[:size]
    assert s.peek(10, size - 1) == data[size - 1 : size]
    assert s.peek(10, size) == b""
    assert s.read(size + 1, aon=True)[0] == b""  # one more than there is: nothing
    assert s.read(size - 1)[0] == data[: size - 1]
    assert s.read(5)[0] == data[size - 1 : size]
    assert s.w.priv == s.r.priv == (2**32 - size // 3 + size) % 2**32
    # Refill exactly, again across the wrap point.
    assert s.write(data[:size], aon=True)[0] == size
    assert s.read(size, aon=True)[0] == data[:size]


@pytest.mark.parametrize("size", [1024, 4096, 1 << 20])
def test_hostile_prod_rejected_without_copy(shared: Any, size: int) -> None:
    s = shared(size, start=2**32 - 7)
    s.write(b"abc")
    ring_before = s.ring_bytes()
    for bad in (s.r.priv + size + 1, s.r.priv - 1, s.r.priv + 2**31):
        s.ctrl[1] = bad % 2**32
        buf = bytearray(b"\xee" * 16)
        got = lib.gnt_ring_read(s.r, ffi.from_buffer(buf), 16, 0, s.notify)
        assert got == lib.GNT_RING_EPROTO == -1
        assert buf == b"\xee" * 16  # nothing copied
        assert s.ctrl[0] == s.r.priv == (2**32 - 7)  # cons not moved
        assert lib.gnt_ring_data_ready(s.r) == lib.GNT_RING_EPROTO
        assert lib.gnt_ring_peek(s.r, ffi.from_buffer(buf), 16, 0) == lib.GNT_RING_EPROTO
        assert lib.gnt_ring_prepare_wait_read(s.r) == lib.GNT_RING_EPROTO
    s.ctrl[1] = (s.r.priv + size) % 2**32  # exactly full is legal
    assert lib.gnt_ring_data_ready(s.r) == size
    assert s.ring_bytes() == ring_before


@pytest.mark.parametrize("size", [1024, 1 << 20])
def test_hostile_cons_rejected_without_copy(shared: Any, size: int) -> None:
    s = shared(size, start=5)
    s.write(b"hello")
    before = s.ring_bytes()
    for bad in (s.w.priv + 1, s.w.priv - size - 1, 2**31):
        s.ctrl[0] = bad % 2**32
        got, notify = s.write(b"Z" * 100)
        assert got == lib.GNT_RING_EPROTO and notify == 0
        assert s.ring_bytes() == before  # nothing copied
        assert s.ctrl[1] == s.w.priv == 10  # prod not moved
        assert lib.gnt_ring_buffer_space(s.w) == lib.GNT_RING_EPROTO
        assert lib.gnt_ring_prepare_wait_write(s.w) == lib.GNT_RING_EPROTO
    s.ctrl[0] = (s.w.priv - size) % 2**32  # a full ring is legal: no space
    assert lib.gnt_ring_buffer_space(s.w) == 0


def test_bad_size_is_einval(shared: Any) -> None:
    s = shared(4096)
    for bad in (0, 512, 3000, 1 << 21):
        s.w.size = s.r.size = bad
        assert s.write(b"x")[0] == lib.GNT_RING_EINVAL
        assert s.read(1)[0] == lib.GNT_RING_EINVAL
        assert lib.gnt_ring_data_ready(s.r) == lib.GNT_RING_EINVAL
        assert lib.gnt_ring_prepare_wait_write(s.w) == lib.GNT_RING_EINVAL


def test_notify_bits(shared: Any) -> None:
    s = shared(1024)
    # No request: moving an index does not ask for an event.
    assert s.write(b"a") == (1, 0)
    # The reader about to wait asks the writer (sets WRITE in the writer's byte) ...
    assert lib.gnt_ring_prepare_wait_read(s.r) == 1
    assert (s.writer_byte, s.reader_byte) == (W, 0)
    # ... a zero-length write neither notifies nor clears it ...
    assert s.write(b"") == (0, 0) and s.writer_byte == W
    # ... the next real write notifies once and clears it.
    assert s.write(b"b") == (1, 1) and s.writer_byte == 0
    assert s.write(b"c") == (1, 0)
    # Other bits in the byte survive the fetch-and-clear.
    s.mm[8] = W | R | 0x80
    assert s.write(b"d") == (1, 1) and s.writer_byte == R | 0x80
    s.mm[8] = 0
    # Symmetric for the reader: the writer waiting for space sets READ in the reader's byte.
    assert lib.gnt_ring_prepare_wait_write(s.w) == 1020
    assert s.reader_byte == R
    assert s.read(2) == (b"ab", 1) and s.reader_byte == 0
    assert s.read(2) == (b"cd", 0)
    assert s.read(2) == (b"", 0)


class Spinning:
    """The spin-then-transfer calls on a :class:`Shared` pair, with a live byte."""

    def __init__(self, s: Shared) -> None:
        self.s = s
        self.live = ffi.new("uint8_t *", 1)
        self.notify = ffi.new("int *")
        self.spun = ffi.new("int *")

    def write(self, data: bytes, ns: int) -> tuple[int, int, int]:
        n = lib.gnt_ring_write_spin(
            self.s.w, self.live, data, len(data), ns, self.notify, self.spun
        )
        return n, self.notify[0], self.spun[0]

    def read(self, n: int, ns: int) -> tuple[bytes | int, int, int]:
        buf = bytearray(n)
        dst = ffi.from_buffer(buf)
        got = lib.gnt_ring_read_spin(self.s.r, self.live, 4, dst, n, ns, self.notify, self.spun)
        return (bytes(buf[:got]) if got >= 0 else got), self.notify[0], self.spun[0]


def _later(delay: float, action: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        action()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_read_spin(shared: Any) -> None:
    sp = Spinning(shared(1024))
    assert sp.s.write(b"ready")[0] == 5
    assert sp.read(16, 10**9) == (b"ready", 0, 0)  # readable: no spin at all
    assert sp.read(16, 0) == (b"", 0, 0)  # empty, no budget: no spin
    assert sp.read(16, 50_000) == (b"", 0, 2)  # empty: the spin runs out
    # A write that lands during the spin is read in the same call (5 s: never runs out).
    t = _later(0.05, lambda: sp.s.write(b"late"))
    assert sp.read(16, 5 * 10**9) == (b"late", 0, 1)
    t.join()
    # The peer leaving, or its EOF bit, ends the spin at once, empty-handed (well
    # before its 30 s budget).
    sp.live[0] = 0
    t0 = time.monotonic()
    assert sp.read(16, 30 * 10**9) == (b"", 0, 2)
    sp.live[0] = 1
    sp.s.mm[9] |= 4  # EOF_BIT in the reader's own notify byte
    assert sp.read(16, 30 * 10**9) == (b"", 0, 2)
    assert time.monotonic() - t0 < 10
    # A hostile index is reported, not read.
    sp.s.ctrl[1] = sp.s.ctrl[0] + 5000
    assert sp.read(16, 10**6)[0] == lib.GNT_RING_EPROTO


def test_write_spin(shared: Any) -> None:
    sp = Spinning(shared(1024))
    data = random.Random(7).randbytes(64 * 1024)
    got = bytearray()

    def drain() -> None:  # the peer: reads until everything came
        while len(got) < len(data):
            chunk = sp.s.read(700)[0]
            assert isinstance(chunk, bytes)
            got.extend(chunk)

    t = _later(0.0, drain)
    # 64 KiB through a 1 KiB ring in one call: it spins for room and writes on (60 s:
    # never runs out), and no event is owed since the reader never asked for one.
    assert sp.write(data, 60 * 10**9) == (len(data), 0, 1)
    t.join()
    assert bytes(got) == data
    # The ring full: a short budget runs out, with what fitted written.
    assert sp.write(b"x" * 2000, 50_000) == (1024, 0, 2)
    # An event owed to the peer (it waits for data) goes first: no spin, back at once.
    assert sp.s.read(1024)[0] == b"x" * 1024
    assert lib.gnt_ring_prepare_wait_read(sp.s.r) == 0
    assert sp.write(b"y" * 2000, 60 * 10**9) == (1024, 1, 0)
    # The peer gone: nothing is written (the caller reports it).
    assert sp.s.read(1024)[0] == b"y" * 1024
    sp.live[0] = 0
    assert sp.write(b"z", 10**9) == (lib.GNT_RING_NOTLIVE, 0, 0)
    # The peer leaving during the spin ends it.
    sp.live[0] = 1
    assert sp.write(b"z" * 1024, 0)[0] == 1024
    t = _later(0.05, lambda: sp.live.__setitem__(0, 0))
    t0 = time.monotonic()
    assert sp.write(b"w", 30 * 10**9) == (0, 0, 2)
    assert time.monotonic() - t0 < 10  # well before the budget
    t.join()
    # A hostile index is reported.
    sp.live[0] = 1
    sp.s.ctrl[0] = sp.s.ctrl[1] + 5000
    assert sp.write(b"v", 10**6)[0] == lib.GNT_RING_EPROTO


def test_atomic_accessors() -> None:
    buf = bytearray(8)
    p8 = ffi.cast("uint8_t *", ffi.from_buffer(buf))
    p32 = ffi.cast("uint32_t *", p8) + 1
    lib.gnt_store_u8(p8, 0x41)
    assert lib.gnt_load_u8(p8) == 0x41 == buf[0]
    assert lib.gnt_fetch_or_u8(p8, 0x06) == 0x41 and buf[0] == 0x47
    assert lib.gnt_fetch_and_not_u8(p8, 0x03) == 0x47 and buf[0] == 0x44
    lib.gnt_store_u32(p32, 0xDEADBEEF)
    assert lib.gnt_load_u32(p32) == 0xDEADBEEF
    assert buf[4:8] == (0xDEADBEEF).to_bytes(4, "little")
    lib.gnt_full_fence()


def test_mmap_helpers() -> None:
    p = lib.gnt_mmap(
        ffi.NULL,
        8192,
        lib.PROT_READ | lib.PROT_WRITE,
        lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE,
        -1,
        0,
    )
    assert p != ffi.NULL
    ffi.cast("uint8_t *", p)[8191] = 7
    assert lib.gnt_munmap(p, 8192) == 0
    bad = lib.gnt_mmap(ffi.NULL, 4096, lib.PROT_READ, lib.MAP_SHARED, -1, 0)
    assert bad == ffi.NULL and ffi.errno == 9  # EBADF, MAP_FAILED became NULL


@pytest.mark.slow
@pytest.mark.parametrize(("size", "total_mib"), [(1 << 16, 256), (1024, 16), (1 << 20, 64)])
def test_two_process_stress(size: int, total_mib: int) -> None:
    """A producer and a consumer process move the stream through a shared memfd ring,
    waking each other only when the ring's notify bits say so; checksums must match."""
    total = total_mib << 20
    fd = os.memfd_create("gntipc-ring-test")
    wake_c, wait_c = os.pipe()[::-1]  # producer wakes consumer
    pipes_c = (wait_c, wake_c)
    pipes_p = os.pipe()  # consumer wakes producer: (read, write)
    try:
        os.ftruncate(fd, DATA_OFFSET + size)
        start = 2**32 - 12345
        os.pwrite(fd, start.to_bytes(4, "little") * 2, 0)
        peer = str(Path(__file__).parent / "_ring_peer.py")
        common = [str(fd), str(size), str(total), "42"]
        t0 = time.monotonic()
        prod = subprocess.Popen(
            [sys.executable, peer, "produce", *common, str(pipes_c[1]), str(pipes_p[0])],
            pass_fds=(fd, pipes_c[1], pipes_p[0]),
            stdout=subprocess.PIPE,
            text=True,
        )
        cons = subprocess.Popen(
            [sys.executable, peer, "consume", *common, str(pipes_p[1]), str(pipes_c[0])],
            pass_fds=(fd, pipes_p[1], pipes_c[0]),
            stdout=subprocess.PIPE,
            text=True,
        )
        out_p, _ = prod.communicate(timeout=120)
        out_c, _ = cons.communicate(timeout=120)
        elapsed = time.monotonic() - t0
        assert prod.returncode == 0 and cons.returncode == 0, (out_p, out_c)
        n_p, hash_p = out_p.split()
        n_c, hash_c = out_c.split()
        assert int(n_p) == int(n_c) == total
        assert hash_p == hash_c
        final = int.from_bytes(os.pread(fd, 8, 0)[:4], "little")
        assert final == (start + total) % 2**32  # cons advanced by exactly the stream
        print(f"ring {size}: {total_mib} MiB in {elapsed:.2f} s = {total_mib / elapsed:.0f} MiB/s")
    finally:
        for f in (fd, *pipes_c, *pipes_p):
            os.close(f)
