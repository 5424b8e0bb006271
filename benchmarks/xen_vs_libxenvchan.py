"""gntipc vs Debian's libxenvchan moving the same data, on real Xen (dom0 <-> dom0).

Run inside the VM (the numbers under QEMU's emulation are meaningless in absolute terms;
the ratio is the point)::

    tools/xen-vm/run-in-xen.sh "$PWD" '.venv/bin/python benchmarks/xen_vs_libxenvchan.py'

Four transfers of the same bytes one way through rings of the same size, each measured
by the receiver from the connection to the last byte:

* C -> C: two ``vchan_bench_peer.c`` processes (libxenvchan on both ends);
* gntipc -> gntipc: two processes on the synchronous :class:`gntipc.Vchan`;
* gntipc -> C: a gntipc client writing to the libxenvchan server;
* C -> gntipc: the libxenvchan server writing to a gntipc client (our reader alone).

Both sides do the same work, call for call, whichever language: the writer sends one
precomputed 64 KiB block of the pattern, 64 KiB per call (``libxenvchan_write`` /
``Vchan.write_all``); the reader reads into one ring-sized buffer (``libxenvchan_read`` /
``Vchan.readinto``) and, in the **verify** pass, compares each chunk with the pattern at
its offset in one ``memcmp`` (``bytearray.startswith`` in Python, which is a memcmp), or,
in the **count** pass, only counts.  Both passes run because each answers its own
question: "count" is the transport alone, "verify" what a reader that checks its data
(the interop tests' reader) pays.  The C peer is ``benchmarks/vchan_bench_peer.c``, not
the interop tests' ``vchan_peer.c``, which builds its pattern byte by byte and hashes
every byte it reads (FNV-1a), work no Python reader could do at the same cost.

Both sides use their blocking API (libxenvchan ``blocking = 1``; gntipc's default wait
policy, which does not spin on a single CPU, the kit's default).
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
PEER_SRC = HERE / "vchan_bench_peer.c"
BLOCK = 65536
SEED = 0xA5
VERIFY, COUNT = "verify", "count"


def _pattern(span: int) -> bytes:
    """``span`` bytes of the pattern (period 64 KiB), the C peer's formula."""
    return bytes(((i & 0xFF) + 7 * ((i >> 8) & 0xFF) + SEED) & 0xFF for i in range(span))


def build_peer(tmp: Path) -> Path:
    exe = tmp / "vchan_bench_peer"
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/libxenvchan.h").exists():
        sys.exit("needs gcc and /usr/include/libxenvchan.h (apt-get install gcc libxen-dev)")
    subprocess.run([gcc, "-O2", "-o", str(exe), str(PEER_SRC), "-lxenvchan"], check=True)
    return exe


def c_peer(
    exe: Path, role: str, path: str, ring: int, way: str, nbytes: int, check: str
) -> subprocess.Popen[str]:
    """Start a C peer; a server is returned once it offers ``path``."""
    proc = subprocess.Popen(
        [str(exe), role, path, str(ring), way, str(nbytes), check],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    if role == "server":
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING"):
            sys.exit(f"vchan_bench_peer server did not start: {line!r}")
    return proc


def c_done(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        sys.exit(f"vchan_bench_peer failed (rc={proc.returncode}):\n{out}")
    return out


def c_seconds(proc: subprocess.Popen[str]) -> float:
    """The seconds a C reader took (it checked the data, if asked, or failed)."""
    out = c_done(proc)
    if "\nok" not in out:
        sys.exit(f"vchan_bench_peer: no result:\n{out}")
    return float(out.split("RATE seconds=")[1].split()[0])


def _path(tag: str) -> str:
    return f"/local/domain/0/data/vchan/bench-{tag}-{os.getpid()}"


def run_c_to_c(exe: Path, ring: int, nbytes: int, check: str) -> float:
    path = _path("cc")
    reader = c_peer(exe, "server", path, ring, "recv", nbytes, check)
    writer = c_peer(exe, "client", path, ring, "send", nbytes, check)
    seconds = c_seconds(reader)
    c_done(writer)
    return seconds


def gntipc_write(path: str, nbytes: int) -> None:
    """The gntipc client of the benchmark: writes ``nbytes`` of the pattern, closes."""
    block = memoryview(_pattern(BLOCK))
    with gntipc.get_backend("xen") as backend, Vchan.client(backend, 0, path, timeout=60) as v:
        left = nbytes
        while left:
            n = min(left, BLOCK)
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


def run_gntipc_to_gntipc(exe: Path, ring: int, nbytes: int, check: str) -> float:
    path = _path("gg")
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
        seconds = _gntipc_read(v, ring, nbytes, check)
    if writer.wait(60) != 0:
        sys.exit("the gntipc writer failed")
    return seconds


def _gntipc_read(v: Vchan, ring: int, nbytes: int, check: str) -> float:
    """Read ``nbytes`` with the blocking API (default wait policy), checking each chunk
    against the pattern if ``check`` is VERIFY; the seconds taken."""
    buf = bytearray(ring)
    # the pattern twice over, as the C peer has it: any chunk is one slice of it
    expected = memoryview(_pattern(BLOCK + -(-ring // BLOCK) * BLOCK))
    verify = check == VERIFY
    readinto = v.readinto
    t0 = time.monotonic()
    got = 0
    while got < nbytes:
        n = readinto(buf, timeout=120)
        if verify and not buf.startswith(expected[got % BLOCK : got % BLOCK + n]):
            raise ValueError(f"gntipc reader: the chunk at offset {got} does not match")
        got += n
    return time.monotonic() - t0


def run_c_to_gntipc(exe: Path, ring: int, nbytes: int, check: str) -> float:
    path = _path("cg")
    writer = c_peer(exe, "server", path, ring, "send", nbytes, check)
    with gntipc.get_backend("xen") as backend, Vchan.client(backend, 0, path, timeout=60) as v:
        seconds = _gntipc_read(v, ring, nbytes, check)
    c_done(writer)
    return seconds


def run_gntipc_to_c(exe: Path, ring: int, nbytes: int, check: str) -> float:
    path = _path("gc")
    reader = c_peer(exe, "server", path, ring, "recv", nbytes, check)
    writer = _spawn_writer(path, nbytes)
    seconds = c_seconds(reader)
    if writer.wait(60) != 0:
        sys.exit("the gntipc writer failed")
    return seconds


CC, GG, GC, CG = (
    "libxenvchan C -> C",
    "gntipc -> gntipc",
    "gntipc -> libxenvchan C",
    "libxenvchan C -> gntipc",
)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--writer":
        gntipc_write(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=16, help="data moved per run (MiB)")
    parser.add_argument("--ring", type=int, default=65536, help="ring size (bytes)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (best is kept)")
    parser.add_argument(
        "--check", choices=(VERIFY, COUNT, "both"), default="both",
        help="what both readers do with the data: compare it with the pattern, only count"
        " it, or a pass of each (default)",
    )  # fmt: skip
    args = parser.parse_args()
    if not os.path.exists("/dev/xen/gntdev"):
        sys.exit("not on Xen: run it inside tools/xen-vm/run-in-xen.sh")
    nbytes = args.mib << 20
    checks = (VERIFY, COUNT) if args.check == "both" else (args.check,)
    ring = args.ring
    print(
        f"{args.mib} MiB one way, ring {ring}, best of {args.repeat}; writers: one"
        " precomputed 64 KiB block per call; readers: a ring-sized buffer per call, then"
        " verify = one memcmp per chunk against the pattern, count = nothing",
        flush=True,
    )
    cases = {CC: run_c_to_c, GG: run_gntipc_to_gntipc, GC: run_gntipc_to_c, CG: run_c_to_gntipc}
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_peer(Path(tmp))
        for _ in range(args.repeat):  # the repeats take turns: a slow spell hits every case
            for check in checks:
                for name, case in cases.items():
                    seconds = case(exe, ring, nbytes, check)
                    runs.setdefault((name, check), []).append(seconds)
                    print(f"{check:6s}  {name:24s} {nbytes / seconds / 1e6:9.1f} MB/s", flush=True)
    rates = {key: nbytes / min(seconds) / 1e6 for key, seconds in runs.items()}
    header = "".join(f"{c:>10s}" for c in checks) + "".join(f"{c + ' /C->C':>14s}" for c in checks)
    print(f"\n{'MB/s':24s}{header}")
    for name in cases:
        figures = "".join(f"{rates[name, c]:10.1f}" for c in checks)
        ratios = "".join(f"{rates[name, c] / rates[CC, c]:14.2f}" for c in checks)
        print(f"{name:24s}{figures}{ratios}")


if __name__ == "__main__":
    main()
