"""gntipc vs Debian's libxenvchan moving the same data, on real Xen (dom0 <-> dom0).

Run inside the VM (the numbers under QEMU's emulation are meaningless in absolute terms;
the ratio is the point)::

    tools/xen-vm/run-in-xen.sh "$PWD" '.venv/bin/python benchmarks/xen_vs_libxenvchan.py'

Three transfers of the same bytes one way through rings of the same size, each measured
by the receiver from the connection to the last byte:

* C -> C: two ``tests/interop/vchan_peer.c`` processes (libxenvchan on both ends);
* gntipc -> gntipc: two processes on the synchronous :class:`gntipc.Vchan`;
* gntipc -> C: a gntipc client writing to the libxenvchan server;
* C -> gntipc: the libxenvchan server writing to a gntipc client (our reader alone).

gntipc uses its blocking API with the default wait policy (it does not spin on a single
CPU, the kit's default).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gntipc
from gntipc import Vchan

HERE = Path(__file__).resolve().parent
PEER_SRC = HERE.parent / "tests" / "interop" / "vchan_peer.c"
SEED_CLIENT = 0xA5


def _pattern_block() -> bytes:
    return bytes(((i & 0xFF) + 7 * ((i >> 8) & 0xFF) + SEED_CLIENT) & 0xFF for i in range(65536))


def build_peer(tmp: Path) -> Path:
    exe = tmp / "vchan_peer"
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/libxenvchan.h").exists():
        sys.exit("needs gcc and /usr/include/libxenvchan.h (apt-get install gcc libxen-dev)")
    subprocess.run([gcc, "-O2", "-o", str(exe), str(PEER_SRC), "-lxenvchan"], check=True)
    return exe


def c_server(exe: Path, path: str, ring: int, nbytes: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(exe), "server", "0", path, str(ring), str(ring), "0", str(nbytes)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LISTENING"):
        sys.exit(f"vchan_peer server did not start: {line!r}")
    return proc


def c_result(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0 or " ok" not in out:
        sys.exit(f"vchan_peer failed (rc={proc.returncode}):\n{out}")
    return float(out.split("RATE seconds=")[1].split()[0])


def run_c_to_c(exe: Path, ring: int, nbytes: int) -> float:
    path = f"/local/domain/0/data/vchan/bench-cc-{os.getpid()}"
    srv = c_server(exe, path, ring, nbytes)
    cli = subprocess.Popen(
        [str(exe), "client", "0", path, str(nbytes), "0"], stdout=subprocess.PIPE
    )
    seconds = c_result(srv)
    cli.communicate(timeout=60)
    return seconds


def gntipc_write(path: str, nbytes: int) -> None:
    """The gntipc client of the benchmark: writes ``nbytes`` of the pattern, closes."""
    block = memoryview(_pattern_block())
    with gntipc.get_backend("xen") as backend, Vchan.client(backend, 0, path, timeout=60) as v:
        left = nbytes
        while left:
            n = min(left, len(block))
            v.write_all(block[:n], timeout=120)
            left -= n
        # Let the reader finish before closing (a plain libxenvchan reader stops at close).
        deadline = time.monotonic() + 120
        while v.is_open() == 1 and v.buffer_space() < v.write_size:
            if time.monotonic() > deadline:
                raise TimeoutError("the reader did not drain the ring")
            v.prepare_wait_write()
            v.wait(1)


def _spawn_writer(path: str, nbytes: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--writer", path, str(nbytes)])


def run_gntipc_to_gntipc(ring: int, nbytes: int) -> float:
    path = f"/local/domain/0/data/vchan/bench-gg-{os.getpid()}"
    buf = bytearray(ring)
    with (
        gntipc.get_backend("xen") as backend,
        Vchan.server(backend, 0, path, read_size=ring, write_size=ring) as v,
    ):
        writer = _spawn_writer(path, nbytes)
        deadline = time.monotonic() + 120
        while v.is_open() == 2:
            if time.monotonic() > deadline:
                sys.exit("the gntipc writer never connected")
            v.wait(1)
        seconds = _gntipc_read(v, buf, nbytes)
    if writer.wait(60) != 0:
        sys.exit("the gntipc writer failed")
    return seconds


def _gntipc_read(v: Vchan, buf: bytearray, nbytes: int) -> float:
    """Read ``nbytes`` with the blocking API (default wait policy); the seconds taken."""
    t0 = time.monotonic()
    got = 0
    while got < nbytes:
        got += v.readinto(buf, timeout=120)
    return time.monotonic() - t0


def run_c_to_gntipc(exe: Path, ring: int, nbytes: int) -> float:
    path = f"/local/domain/0/data/vchan/bench-cg-{os.getpid()}"
    srv = subprocess.Popen(
        [str(exe), "server", "0", path, str(ring), str(ring), str(nbytes), "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert srv.stdout is not None
    if not srv.stdout.readline().startswith("LISTENING"):
        sys.exit("vchan_peer server did not start")
    buf = bytearray(ring)
    with gntipc.get_backend("xen") as backend, Vchan.client(backend, 0, path, timeout=60) as v:
        seconds = _gntipc_read(v, buf, nbytes)
    srv.communicate(timeout=60)
    return seconds


def run_gntipc_to_c(exe: Path, ring: int, nbytes: int) -> float:
    path = f"/local/domain/0/data/vchan/bench-gc-{os.getpid()}"
    srv = c_server(exe, path, ring, nbytes)
    writer = _spawn_writer(path, nbytes)
    seconds = c_result(srv)
    if writer.wait(60) != 0:
        sys.exit("the gntipc writer failed")
    return seconds


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--writer":
        gntipc_write(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=16, help="data moved per run (MiB)")
    parser.add_argument("--ring", type=int, default=65536, help="ring size (bytes)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (best is kept)")
    args = parser.parse_args()
    if not os.path.exists("/dev/xen/gntdev"):
        sys.exit("not on Xen: run it inside tools/xen-vm/run-in-xen.sh")
    nbytes = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_peer(Path(tmp))
        cases = {
            "libxenvchan C -> C": lambda: run_c_to_c(exe, args.ring, nbytes),
            "gntipc -> gntipc": lambda: run_gntipc_to_gntipc(args.ring, nbytes),
            "gntipc -> libxenvchan C": lambda: run_gntipc_to_c(exe, args.ring, nbytes),
            "libxenvchan C -> gntipc": lambda: run_c_to_gntipc(exe, args.ring, nbytes),
        }
        rates: dict[str, float] = {}
        for name, case in cases.items():
            best = min(case() for _ in range(args.repeat))
            rates[name] = nbytes / best / 1e6
            print(
                f"{name:26s} {rates[name]:9.1f} MB/s  ({args.mib} MiB, ring {args.ring})",
                flush=True,
            )
    base = rates["libxenvchan C -> C"]
    print(f"ratio gntipc->gntipc / C->C: {rates['gntipc -> gntipc'] / base:.2f}")
    print(f"ratio gntipc->C / C->C:      {rates['gntipc -> libxenvchan C'] / base:.2f}")
    print(f"ratio C->gntipc / C->C:      {rates['libxenvchan C -> gntipc'] / base:.2f}")


if __name__ == "__main__":
    main()
