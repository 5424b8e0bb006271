"""dom0 <-> domU on real Xen: a gntipc peer in a PV domU (Debian's python3 with only its
stdlib, plus gntipc, its compiled module and its dependencies shipped in) and one in dom0
(this process), in both roles; bytes and typed messages; then ``xl destroy`` of the domU
while connected: dom0 must see BrokenResourceError within a few seconds (a dying domain
sends no event: the presence-node watch is what tells)."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from anyio import BrokenResourceError

import gntipc

from . import _domu_peer as peer
from .conftest import XEN_ONLY

pytestmark = XEN_ONLY

HERE = Path(__file__).parent
REPO = HERE.parents[1]
XQ_DOMU = REPO / "tools" / "xen-vm" / "xq-domu.sh"
NBYTES = 100_000
NMSG = 50
_names = itertools.count()
#: Imported by gntipc in the domU: shipped from this interpreter's site-packages.
DEPENDENCIES = ("anyio", "sniffio", "idna", "msgspec", "cffi", "_cffi_backend", "typing_extensions")


def _xl() -> str:
    found = sorted(glob.glob("/usr/lib/xen-4.*/bin/xl"))
    if not found:
        pytest.skip("no xl toolstack")
    return found[-1]


def _is_dom0() -> bool:
    try:
        return "control_d" in Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False


def shipped_files() -> tuple[list[str], list[str]]:
    """(paths to copy into the domU, its PYTHONPATH): gntipc's package directory (with
    the compiled ``_lib.abi3.so``), the peer script and each dependency."""
    files = [str(Path(gntipc.__file__).parent), str(HERE / "_domu_peer.py")]
    pythonpath = [str(Path(gntipc.__file__).parents[1])]
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue  # not needed by this version of the dependencies
        origin = Path(spec.origin)
        path = origin.parent if origin.name == "__init__.py" else origin
        files.append(str(path))
        if str(path.parent) not in pythonpath:
            pythonpath.append(str(path.parent))
    return files, pythonpath


class Domu:
    """A PV domU started with the kit's ``xq-domu.sh``, running ``_domu_peer.py``."""

    def __init__(self, *args: str) -> None:
        self.name = f"gntipc{os.getpid() % 10000}x{next(_names)}"
        files, pythonpath = shipped_files()
        cmd = (
            f"PYTHONPATH={':'.join(pythonpath)} PYTHONDONTWRITEBYTECODE=1"
            f" python3 -X faulthandler {HERE / '_domu_peer.py'} {' '.join(args)}"
        )
        argv = ["sh", str(XQ_DOMU), "start", self.name, "--python", "--mem", "320"]
        for f in files:
            argv += ["--file", f]
        r = subprocess.run([*argv, "--", cmd], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"xq-domu.sh start failed:\n{r.stdout}\n{r.stderr}"
        self.domid = int(r.stdout.split()[-1])
        self.finished: tuple[int, str] | None = None

    def wait(self, timeout: float = 180) -> tuple[int, str]:
        """(exit status of the domU's command, its console output)."""
        if self.finished is None:
            r = subprocess.run(
                ["sh", str(XQ_DOMU), "wait", self.name, str(int(timeout))],
                capture_output=True, text=True, timeout=timeout + 60,
            )  # fmt: skip
            self.finished = (r.returncode, r.stdout + r.stderr)
        return self.finished

    @contextlib.contextmanager
    def told_on_failure(self) -> Iterator[None]:
        """Print the domU's console (its side of the story) if the block raises."""
        try:
            yield
        except BaseException:
            print(f"domU {self.name} said:\n" + self.wait(60)[1])
            raise

    def destroy(self) -> None:
        subprocess.run([_xl(), "destroy", self.name], capture_output=True, timeout=120)

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return Path(f"/var/log/xen/console/guest-{self.name}.log").read_text(errors="replace")
        return ""


@pytest.fixture
def domus() -> Iterator[list[Domu]]:
    if not _is_dom0():
        pytest.skip("not dom0: cannot start domUs")
    _xl()
    started: list[Domu] = []
    yield started
    for d in started:
        d.destroy()


def test_dom0_server_domu_client(domus: list[Domu]) -> None:
    path = f"data/vchan/gntipc-domu-{os.getpid()}-{next(_names)}"
    d = Domu("client", "0", path, str(NBYTES), str(NMSG))
    domus.append(d)
    with d.told_on_failure():
        anyio.run(peer.run, "server", d.domid, path, NBYTES, NMSG, False)
    rc, out = d.wait()
    assert rc == 0, out
    for line in ("CONNECTED", f"BYTES ok {NBYTES}", f"MESSAGES ok {NMSG}", "DONE"):
        assert line in out, out


def test_domu_server_dom0_client(domus: list[Domu]) -> None:
    path = f"data/vchan/gntipc-domu-{next(_names)}"
    d = Domu("server", "0", path, str(NBYTES), str(NMSG))
    domus.append(d)
    with d.told_on_failure():
        anyio.run(peer.run, "client", d.domid, path, NBYTES, NMSG, False)
    rc, out = d.wait()
    assert rc == 0, out
    for line in ("CONNECTED", f"BYTES ok {NBYTES}", f"MESSAGES ok {NMSG}", "EOF ok", "DONE"):
        assert line in out, out


def _check(got: bytes, expected: bytes) -> None:
    """Equal, or an AssertionError that says where and how the bytes differ."""
    if got == expected:
        return
    bad = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    bad = min(len(got), len(expected)) if bad is None else bad
    found = expected.find(got[bad : bad + 64])
    raise AssertionError(
        f"{len(got)} bytes received, {len(expected)} expected; first difference at {bad}:"
        f" got {got[bad : bad + 32].hex()} expected {expected[bad : bad + 32].hex()};"
        f" the received bytes from there are expected at offset {found}"
    )


@contextlib.asynccontextmanager
async def _exchanged(d: Domu, role: str, path: str) -> AsyncIterator[gntipc.VchanStream]:
    """Our end in ``role``, connected to the domU's, after NBYTES each way (checked)."""
    with anyio.fail_after(240):
        if role == "server":
            async with await gntipc.listen(d.domid, path) as listener:
                stream = await listener.accept()
        else:
            stream = await gntipc.connect(d.domid, path, timeout=200)
    async with stream:
        mine, theirs = (
            (peer.SEED_SERVER, peer.SEED_CLIENT) if role == "server"
            else (peer.SEED_CLIENT, peer.SEED_SERVER)
        )  # fmt: skip
        with anyio.fail_after(120):
            got = await peer.exchange_bytes(stream, peer.pattern(mine, NBYTES), NBYTES)
        _check(got, peer.pattern(theirs, NBYTES))
        yield stream


async def _connected_then_destroyed(d: Domu, role: str, path: str) -> tuple[float, float]:
    """Our end in ``role``; bytes both ways; then destroy the domU while connected.
    (seconds ``xl destroy`` took, seconds from its start to BrokenResourceError)."""
    async with _exchanged(d, role, path) as stream:
        # Let the domU reach its sleep (it prints HOLDING), then kill its domain.
        deadline = time.monotonic() + 60
        while "HOLDING" not in d.console() and time.monotonic() < deadline:
            await anyio.sleep(0.2)
        assert "HOLDING" in d.console(), d.console()
        t0 = time.monotonic()
        await anyio.to_thread.run_sync(d.destroy)
        t_destroy = time.monotonic() - t0
        with anyio.fail_after(30), pytest.raises(BrokenResourceError):
            await stream.receive()
        return t_destroy, time.monotonic() - t0


@pytest.mark.parametrize("domu_role", ["client", "server"])
def test_domu_destroyed_while_connected(domus: list[Domu], domu_role: str) -> None:
    path = f"data/vchan/gntipc-destroy-{os.getpid()}-{next(_names)}"
    d = Domu(domu_role, "0", path, str(NBYTES), "0", "--hold")
    domus.append(d)
    our_role = "server" if domu_role == "client" else "client"
    t_destroy, t_detect = anyio.run(_connected_then_destroyed, d, our_role, path)
    print(
        f"xl destroy took {t_destroy:.2f}s; BrokenResourceError {t_detect:.2f}s after it began",
        file=sys.stderr,
    )
    assert t_detect - t_destroy < 5, (t_destroy, t_detect)


async def _connected_then_peer_killed(d: Domu, role: str, path: str) -> None:
    """Our end in ``role``; bytes both ways; the domU's process then SIGKILLs itself
    (its domain lives on): we read all it sent before dying, then BrokenResourceError."""
    async with _exchanged(d, role, path) as stream:
        tail = bytearray()
        with anyio.fail_after(120), pytest.raises(BrokenResourceError):
            while True:
                tail += await stream.receive()
        assert bytes(tail) == b"last words"
        # The console is written asynchronously: its DYING line comes before the kill.
        assert "DYING" in d.console() or "DYING" in d.wait(60)[1]


@pytest.mark.parametrize("domu_role", ["client", "server"])
def test_kill_9_of_the_domu_process(domus: list[Domu], domu_role: str) -> None:
    path = f"data/vchan/gntipc-kill-{os.getpid()}-{next(_names)}"
    d = Domu(domu_role, "0", path, str(NBYTES), "0", "--die")
    domus.append(d)
    our_role = "server" if domu_role == "client" else "client"
    with d.told_on_failure():
        anyio.run(_connected_then_peer_killed, d, our_role, path)
