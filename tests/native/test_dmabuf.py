"""The dma-buf API (:meth:`Backend.dmabuf_import`, :meth:`Backend.dmabuf_export`) on both
backends, across processes: the buffers and grants cross real process boundaries (the
dma-buf descriptor goes over a unix socket with SCM_RIGHTS).

On Xen the dma-buf source is vgem (a DRM dumb buffer, PRIME-exported), as in
``tools/xen-vm/selftest/dmabuf-check.c``; on sim it is :meth:`SimBackend.dmabuf_alloc`.
Xen needs a xen_gntdev built with CONFIG_XEN_GNTDEV_DMABUF (Debian's is not):

    KO=$(tools/xen-vm/build-gntdev-dmabuf.sh) && tools/xen-vm/run-in-xen.sh --timeout 1200 \
        /work/main "tools/xen-vm/build-gntdev-dmabuf.sh --load $KO && GNTIPC_BACKEND=xen \
        /work/main/.venv/bin/python -m pytest -m xen -p no:cacheprovider -v \
        tests/native/test_dmabuf.py --timeout=600"

With the stock module the xen tests check the ENOTTY message and skip the rest.  The kit's
domains are all PV, where the driver refuses export (EINVAL): the export tests then check
that message and skip; export runs on sim (and would on an HVM/PVH domain).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from anyio import ClosedResourceError

from gntipc._exceptions import LocalProtocolError, XenError
from gntipc.backends import Backend, get_backend

PAGE = 4096

# ------------------------------------------------------------------------ the peer
# A peer process: opens a backend, runs JSON commands from a SOCK_SEQPACKET socket
# (a descriptor may ride along with SCM_RIGHTS) and answers each with one message.
PEER = textwrap.dedent(
    """
    import json, mmap, os, socket, sys
    from gntipc.backends import get_backend
    name, domid, sockfd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.socket(fileno=sockfd)
    b = get_backend(name, domid=domid) if name == "sim" else get_backend(name)
    objs = {}
    def view(h):
        o = objs[h]
        return memoryview(o) if isinstance(o, mmap.mmap) else o.mapping.view()
    def run(cmd, args, fds):
        if cmd == "map":
            p = b.map(args[0], args[1], writable=args[2]); objs[id(p)] = p; return id(p)
        if cmd == "share":
            p = b.share(args[0], args[1]); objs[id(p)] = p; return [id(p), list(p.refs)]
        if cmd == "read":
            with view(args[0]) as v:
                return bytes(v[args[1] : args[1] + args[2]]).hex()
        if cmd == "write":
            with view(args[0]) as v:
                data = bytes.fromhex(args[2]); v[args[1] : args[1] + len(data)] = data
            return None
        if cmd == "mmap":  # map the received dma-buf, keep only the mapping
            m = mmap.mmap(fds[0], args[0]); os.close(fds[0]); objs[id(m)] = m; return id(m)
        if cmd == "hold":  # keep the received descriptor
            objs[fds[0]] = fds[0]; return fds[0]
        if cmd == "import":  # import the received dma-buf, keep only the import
            i = b.dmabuf_import(fds[0], args[0], args[1]); os.close(fds[0])
            objs[id(i)] = i; return [id(i), list(i.refs)]
        if cmd == "close":
            o = objs.pop(args[0])
            os.close(o) if isinstance(o, int) else o.close(); return None
        raise ValueError(cmd)
    sock.send(json.dumps({"ok": b.domid}).encode())
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        if not msg:
            break
        cmd, args = json.loads(msg)
        if cmd == "exit":
            break
        try:
            reply = {"ok": run(cmd, args, fds)}
        except Exception as exc:
            reply = {"err": type(exc).__name__, "errno": getattr(exc, "errno", None),
                     "msg": str(exc)}
        sock.send(json.dumps(reply).encode())
    for o in reversed(list(objs.values())):
        os.close(o) if isinstance(o, int) else o.close()
    b.close()
    """
)


class PeerError(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply['err']}: {reply['msg']}")
        self.errno: int | None = reply["errno"]


class Peer:
    """Another process with a backend of its own (domain ``domid`` on sim)."""

    def __init__(self, backend_name: str, domid: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._sock.settimeout(120)  # the Xen kit runs 10-20x slower than hardware
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", PEER, backend_name, str(domid), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
            )
        self.domid: int = self._reply()

    def _reply(self) -> Any:
        data = self._sock.recv(1 << 16)
        if not data:
            raise EOFError("the peer process exited")
        reply = json.loads(data)
        if "err" in reply:
            raise PeerError(reply)
        return reply["ok"]

    def call(self, cmd: str, *args: Any, fd: int | None = None) -> Any:
        msg = json.dumps([cmd, args]).encode()
        socket.send_fds(self._sock, [msg], [] if fd is None else [fd])
        return self._reply()

    def read(self, h: int, off: int, n: int) -> bytes:
        return bytes.fromhex(self.call("read", h, off, n))

    def write(self, h: int, off: int, data: bytes) -> None:
        self.call("write", h, off, data.hex())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(60) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self._sock.send(json.dumps(["exit", []]).encode())
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sock.close()


@contextlib.contextmanager
def peer_process(backend_name: str, domid: int) -> Iterator[Peer]:
    p = Peer(backend_name, domid)
    try:
        yield p
    finally:
        p.close()


# -------------------------------------------------------------- dma-buf sources
def _ioc_rw(nr: int, size: int) -> int:
    """``_IOWR('d', nr, size)``: a DRM ioctl number."""
    return (3 << 30) | (size << 16) | (ord("d") << 8) | nr


class _DrmVersion(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_int),
        ("minor", ctypes.c_int),
        ("patch", ctypes.c_int),
        ("name_len", ctypes.c_size_t),
        ("name", ctypes.c_void_p),
        ("date_len", ctypes.c_size_t),
        ("date", ctypes.c_void_p),
        ("desc_len", ctypes.c_size_t),
        ("desc", ctypes.c_void_p),
    ]


class _CreateDumb(ctypes.Structure):
    _fields_ = [
        ("height", ctypes.c_uint32),
        ("width", ctypes.c_uint32),
        ("bpp", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("pitch", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
    ]


class _PrimeHandle(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("fd", ctypes.c_int32)]


DRM_IOCTL_VERSION = _ioc_rw(0x00, ctypes.sizeof(_DrmVersion))
DRM_IOCTL_PRIME_HANDLE_TO_FD = _ioc_rw(0x2D, ctypes.sizeof(_PrimeHandle))
DRM_IOCTL_MODE_CREATE_DUMB = _ioc_rw(0xB2, ctypes.sizeof(_CreateDumb))


def _open_vgem() -> int | None:
    for path in sorted(glob.glob("/dev/dri/card*")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        name = ctypes.create_string_buffer(32)
        v = _DrmVersion(name_len=31, name=ctypes.addressof(name))
        try:
            fcntl.ioctl(fd, DRM_IOCTL_VERSION, v)
        except OSError:
            pass
        else:
            if name.value == b"vgem":
                return fd
        os.close(fd)
    return None


def vgem_device() -> int:
    """A descriptor of the vgem DRM device (``modprobe vgem`` first if root), or skip."""
    fd = _open_vgem()
    if fd is None and os.geteuid() == 0:
        subprocess.run(["modprobe", "vgem"], check=False, timeout=120, capture_output=True)
        fd = _open_vgem()
    if fd is None:
        pytest.skip(
            "no dma-buf source: the vgem DRM module is not loaded and `modprobe vgem` failed"
        )
    return fd


def vgem_dmabuf(drm: int, pages: int) -> int:
    """A new vgem dumb buffer of ``pages`` pages, exported as a dma-buf descriptor."""
    dumb = _CreateDumb(height=pages, width=PAGE // 4, bpp=32)
    fcntl.ioctl(drm, DRM_IOCTL_MODE_CREATE_DUMB, dumb)
    assert dumb.size == pages * PAGE
    prime = _PrimeHandle(handle=dumb.handle, flags=os.O_CLOEXEC | os.O_RDWR)
    fcntl.ioctl(drm, DRM_IOCTL_PRIME_HANDLE_TO_FD, prime)
    return int(prime.fd)


def xen_has_dmabuf() -> bool:
    """True if this xen_gntdev has the dma-buf ioctls (an unknown fd gives ENOENT, a
    module without them ENOTTY)."""
    from gntipc.devices import Gntdev

    with Gntdev() as gd:
        try:
            gd.dmabuf_export_wait_released(1 << 20, 0)
        except XenError as exc:
            return exc.errno != errno.ENOTTY
    return True


def is_pv() -> bool:
    from gntipc.backends.xen._devices import guest_type

    return guest_type() == "PV"


NO_DMABUF = (
    "this xen_gntdev has no dma-buf ioctls (CONFIG_XEN_GNTDEV_DMABUF off): load the kit's "
    "build (tools/xen-vm/build-gntdev-dmabuf.sh --load); test_xen_enotty_names_what_is_missing "
    "covers this module"
)


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _xen_needs_dmabuf(request: pytest.FixtureRequest) -> None:
    """The suite's ``backend`` fixture, but a test on Xen skips (before it opens one)
    where xen_gntdev was built without dma-buf: that is all this module adds to it."""
    on_xen = (
        "backend_name" in request.fixturenames and request.getfixturevalue("backend_name") == "xen"
    )
    if on_xen and not xen_has_dmabuf():
        pytest.skip(NO_DMABUF)


@pytest.fixture
def peer(backend_name: str, backend: Backend) -> Iterator[Peer]:
    with peer_process(backend_name, 1) as p:
        yield p


@pytest.fixture
def new_dmabuf(backend_name: str, backend: Backend) -> Iterator[Callable[[int], int]]:
    """``new_dmabuf(pages)``: a fresh dma-buf descriptor (closed after the test)."""
    fds: list[int] = []
    drm = vgem_device() if backend_name == "xen" else -1

    def make(pages: int) -> int:
        sim: Any = backend
        fd = vgem_dmabuf(drm, pages) if backend_name == "xen" else sim.dmabuf_alloc(pages)
        fds.append(fd)
        return fd

    try:
        yield make
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if drm >= 0:
            os.close(drm)


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed * 131 + i * 7 + (i >> 12)) & 0xFF for i in range(n))


@pytest.fixture
def can_export(backend_name: str, backend: Backend) -> None:
    if backend_name == "xen" and is_pv():
        pytest.skip(
            "PV domain (every domain of the Xen kit): the gntdev driver refuses dma-buf "
            "export; test_xen_export_refused_on_pv checks the error"
        )


# ------------------------------------------------------------------------- import
def test_import_grants_the_buffer_to_another_process(
    backend: Backend, peer: Peer, new_dmabuf: Callable[[int], int]
) -> None:
    fd = new_dmabuf(3)
    with mmap.mmap(fd, 3 * PAGE) as buf:
        buf[:] = pattern(3 * PAGE, 2)
        with backend.dmabuf_import(fd, peer.domid, 3) as imp:
            assert imp.domid == peer.domid and len(set(imp.refs)) == 3 and not imp.closed
            h = peer.call("map", backend.domid, list(imp.refs), True)
            # The grantee sees the buffer's bytes, in page order, and writes back.
            assert peer.read(h, 0, 3 * PAGE) == pattern(3 * PAGE, 2)
            peer.write(h, PAGE + 100, b"from the grantee")
            assert buf[PAGE + 100 : PAGE + 116] == b"from the grantee"
            buf[2 * PAGE : 2 * PAGE + 4] = b"more"
            assert peer.read(h, 2 * PAGE, 4) == b"more"
            peer.call("close", h)
        assert imp.closed
        imp.close()  # idempotent
        # Released: the refs no longer map.
        with pytest.raises(PeerError):
            peer.call("map", backend.domid, list(imp.refs), True)


def test_import_rejects_bad_fds_and_counts(
    backend: Backend, peer: Peer, new_dmabuf: Callable[[int], int]
) -> None:
    fd = new_dmabuf(2)
    with pytest.raises(XenError) as ei:
        backend.dmabuf_import(fd, peer.domid, 3)  # the buffer has 2 pages
    assert ei.value.errno == errno.EINVAL
    r, w = os.pipe()
    try:
        with pytest.raises(XenError) as ei:
            backend.dmabuf_import(r, peer.domid, 1)  # not a dma-buf
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(XenError) as ei:
        backend.dmabuf_import(1_000_000, peer.domid, 1)  # not open
    assert ei.value.errno == errno.EBADF
    for bad_fd, count in ((-1, 1), (fd, 0), (fd, True)):
        with pytest.raises(ValueError):
            backend.dmabuf_import(bad_fd, peer.domid, count)
    with pytest.raises(LocalProtocolError):
        backend.dmabuf_import(fd, 0x7FF0, 2)
    # Nothing was granted by the failures: the right call still works.
    with backend.dmabuf_import(fd, peer.domid, 2) as imp:
        assert len(imp.refs) == 2


def test_import_ends_when_the_importer_dies(
    backend_name: str, backend: Backend, peer: Peer, new_dmabuf: Callable[[int], int]
) -> None:
    fd = new_dmabuf(2)
    with mmap.mmap(fd, 2 * PAGE) as buf:
        buf[:8] = b"imported"
    with peer_process(backend_name, 2) as importer:
        # The importer gets the buffer over SCM_RIGHTS and grants it to the peer.
        _, refs = importer.call("import", peer.domid, 2, fd=fd)
        h = peer.call("map", importer.domid, refs, True)
        assert peer.read(h, 0, 8) == b"imported"
        peer.call("close", h)
        importer.kill()  # no release: the driver (sim: the reaper) ends the grants
    with peer_process(backend_name, 1) as later, pytest.raises(PeerError):
        later.call("map", importer.domid, refs, True)


# ------------------------------------------------------------------------- export
@pytest.mark.usefixtures("can_export")
def test_export_to_another_process_and_wait_released(
    backend_name: str, backend: Backend, peer: Peer
) -> None:
    hs, refs = peer.call("share", backend.domid, 2)
    peer.write(hs, 0, pattern(2 * PAGE, 5))
    with backend.dmabuf_export(peer.domid, refs) as exp, peer_process(backend_name, 2) as user:
        assert exp.domid == peer.domid and exp.refs == tuple(refs) and exp.size == 2 * PAGE
        if backend_name == "sim":
            # The receiver maps the buffer: it aliases the granted pages both ways.
            hu = user.call("mmap", exp.size, fd=exp.fileno())
            assert user.read(hu, 0, 2 * PAGE) == pattern(2 * PAGE, 5)
            user.write(hu, PAGE + 9, b"via the dma-buf")
            assert peer.read(hs, PAGE + 9, 15) == b"via the dma-buf"
        else:
            hu = user.call("hold", fd=exp.fileno())  # the gntdev exporter has no mmap
        # Another process holds it: not released, the wait times out.
        assert exp.wait_released(0.05) is False
        with pytest.raises(ClosedResourceError):
            exp.fileno()  # the wait dropped our own descriptor
        user.call("close", hu)
        assert exp.wait_released(60) is True
    assert exp.closed
    peer.call("close", hs)


@pytest.mark.usefixtures("can_export")
def test_wait_released_ends_on_close_from_another_thread(backend: Backend, peer: Peer) -> None:
    hs, refs = peer.call("share", backend.domid, 1)
    exp = backend.dmabuf_export(peer.domid, refs)
    held = os.dup(exp.fileno())  # keeps the buffer alive
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(exp.wait_released(600))
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    try:
        while t.is_alive():  # until the waiter dropped our descriptor
            try:
                exp.fileno()
            except ClosedResourceError:
                break
            t.join(0.01)
        exp.close()
        t.join(60)
        assert not t.is_alive(), "close did not end the wait"
        assert len(outcome) == 1 and isinstance(outcome[0], ClosedResourceError)
    finally:
        exp.close()
        os.close(held)
        t.join(60)
        peer.call("close", hs)


@pytest.mark.usefixtures("can_export")
def test_wait_released_async_is_cancellable(backend: Backend, peer: Peer) -> None:
    hs, refs = peer.call("share", backend.domid, 1)
    exp = backend.dmabuf_export(peer.domid, refs)
    held = os.dup(exp.fileno())

    async def main() -> None:
        with anyio.fail_after(60):  # a functional deadline: the cancel must end the wait
            with anyio.move_on_after(0.05) as scope:
                await exp.wait_released_async(600)
        assert scope.cancelled_caught

    try:
        anyio.run(main)
    finally:
        exp.close()
        os.close(held)
        peer.call("close", hs)


@pytest.mark.usefixtures("can_export")
def test_an_import_of_an_export_holds_the_buffer(
    backend_name: str, backend: Backend, peer: Peer
) -> None:
    hs, refs = peer.call("share", backend.domid, 1)
    peer.write(hs, 0, b"chained")
    with backend.dmabuf_export(peer.domid, refs) as exp, peer_process(backend_name, 2) as other:
        # The exported buffer granted on to a third process (domain).
        imp = backend.dmabuf_import(exp.fileno(), other.domid, 1)
        h = other.call("map", backend.domid, list(imp.refs), True)
        assert other.read(h, 0, 7) == b"chained"
        other.call("close", h)
        assert exp.wait_released(0.05) is False  # the import holds the buffer
        imp.close()
        assert exp.wait_released(60) is True
    peer.call("close", hs)


def test_sim_import_counts_against_the_page_limit() -> None:
    with get_backend("sim", domid=0, page_limit=2) as backend:
        fd = backend.dmabuf_alloc(3)  # type: ignore[attr-defined]
        try:
            with pytest.raises(XenError) as ei:
                backend.dmabuf_import(fd, 1, 3)
            assert ei.value.errno == errno.ENOSPC and "page_limit" in str(ei.value)
        finally:
            os.close(fd)


def test_sim_export_refuses_what_it_cannot_alias() -> None:
    """The sim exports one whole share, in order, granted to us writable."""
    with get_backend("sim", domid=0) as backend, peer_process("sim", 1) as peer:
        hs, refs = peer.call("share", backend.domid, 3)
        for bad in (refs[:2], refs[::-1], [refs[0], 10**6]):
            with pytest.raises(XenError) as ei:
                backend.dmabuf_export(peer.domid, bad)
            assert ei.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            backend.dmabuf_export(peer.domid, [])
        peer.call("close", hs)


# -------------------------------------------------------- what Xen cannot do here
needs_xen = [pytest.mark.xen]


@pytest.mark.parametrize("_", [pytest.param(None, marks=needs_xen, id="xen")])
def test_xen_enotty_names_what_is_missing(_: None) -> None:
    if xen_has_dmabuf():
        pytest.skip("this xen_gntdev has dma-buf support (ENOTTY cannot happen)")
    r, w = os.pipe()
    try:
        with get_backend("xen") as backend:
            calls = [
                lambda: backend.dmabuf_import(r, backend.domid, 1),
                lambda: backend.dmabuf_export(backend.domid, [8]),
            ]
            for call in calls:
                with pytest.raises(XenError) as ei:
                    call()
                assert ei.value.errno == errno.ENOTTY
                msg = str(ei.value)
                assert "CONFIG_XEN_GNTDEV_DMABUF" in msg and "xen-gntdev.ko" in msg, msg
                assert "build-gntdev-dmabuf.sh" in msg, msg
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("_", [pytest.param(None, marks=needs_xen, id="xen")])
def test_xen_export_refused_on_pv(_: None) -> None:
    if not xen_has_dmabuf():
        pytest.skip(NO_DMABUF)
    if not is_pv():
        pytest.skip("not a PV domain: export is allowed here")
    with get_backend("xen") as backend, peer_process("xen", 1) as peer:
        hs, refs = peer.call("share", backend.domid, 1)
        with pytest.raises(XenError) as ei:
            backend.dmabuf_export(peer.domid, refs)
        assert ei.value.errno == errno.EINVAL
        assert "HVM or PVH" in str(ei.value) and "PV domain" in str(ei.value)
        peer.call("close", hs)


def test_device_refuses_dma_flags_and_names_missing_support() -> None:
    """On /dev/null (ENOTTY to every ioctl): the DMA flags never reach the kernel, and
    ENOTTY says which kernel option and module are missing."""
    from gntipc.devices import Gntdev

    with Gntdev("/dev/null") as gd:
        for flags in (1, 2, 3):  # GNTDEV_DMA_FLAG_WC, _COHERENT
            with pytest.raises(ValueError, match="CONFIG_XEN_GRANT_DMA_ALLOC") as ei:
                gd.dmabuf_export_from_refs(1, [8], flags=flags)
            assert "cannot be detected" in str(ei.value)
        with pytest.raises(ValueError, match="unknown"):
            gd.dmabuf_export_from_refs(1, [8], flags=4)
        with pytest.raises(XenError) as xi:
            gd.dmabuf_export_from_refs(1, [8])
        assert xi.value.errno == errno.ENOTTY
        assert "CONFIG_XEN_GNTDEV_DMABUF" in str(xi.value)
        assert "build-gntdev-dmabuf.sh" in str(xi.value)
