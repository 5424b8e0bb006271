"""gntipc vs Debian's libxenvchan moving the same data, on real Xen (dom0 <-> dom0).

Run inside the VM (the numbers under QEMU's emulation are meaningless in absolute terms;
the ratio is the point)::

    tools/xen-vm/run-in-xen.sh "$PWD" '.venv/bin/python benchmarks/xen_vs_libxenvchan.py'

Four transfers of the same bytes one way through rings of the same size, each measured
by the receiver from the connection to the last byte:

* C -> C: two ``vchan_bench_peer.c`` processes (libxenvchan on both ends);
* gntipc -> gntipc: two gntipc processes;
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
policy: spin briefly, yielding the CPU to the peer, then block).  gntipc runs twice
(``--api``): its synchronous :class:`gntipc.Vchan` (the calls above) and its public async
API (``await stream.send(block)`` / ``await stream.receive_into(buf)`` on a
:class:`gntipc.VchanStream`, asyncio).

Every side also reports its CPU time and context switches over the transfer (voluntary:
it slept; involuntary: it was preempted or yielded; ``getrusage``) and a gntipc side its
events sent and received (``statistics()``), per MiB moved: the wake-ups each pair pays,
and (with one vCPU) whether the CPU sat idle: the two sides' CPU time against the wall
time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

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


def c_seconds(out: str) -> float:
    """The seconds a C reader took (it checked the data, if asked, or failed), from its
    output."""
    if "\nok" not in out:
        sys.exit(f"vchan_bench_peer: no result:\n{out}")
    return float(out.split("RATE seconds=")[1].split()[0])


def _path(tag: str) -> str:
    return f"/local/domain/0/data/vchan/bench-{tag}-{os.getpid()}"


class Side:
    """What one side reported: context switches (voluntary, involuntary) and CPU
    seconds over its transfer and, for gntipc, events (received, sent; None for C)."""

    def __init__(self, line: str) -> None:
        fields = line.split()  # "CSW <vol> <invol> <cpu s> [<events in> <events out>]"
        self.vol, self.invol, self.cpu = int(fields[1]), int(fields[2]), float(fields[3])
        self.events = (int(fields[4]), int(fields[5])) if len(fields) == 6 else None

    def per_mib(self, nbytes: int) -> str:
        mib = nbytes / (1 << 20)
        text = (
            f"cpu {self.cpu * 1e3 / mib:5.1f} ms csw {self.vol / mib:5.1f}+{self.invol / mib:<5.1f}"
        )
        if self.events is not None:
            text += f" ev in/out {self.events[0] / mib:5.1f}/{self.events[1] / mib:<5.1f}"
        return text


class _Counts:
    """The context switches (and events of ``stats``) since it was made."""

    def __init__(self) -> None:
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)

    def line(self, events_in: int, events_out: int) -> str:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        vol, invol = r1.ru_nvcsw - self.r0.ru_nvcsw, r1.ru_nivcsw - self.r0.ru_nivcsw
        cpu = r1.ru_utime - self.r0.ru_utime + r1.ru_stime - self.r0.ru_stime
        return f"CSW {vol} {invol} {cpu:.6f} {events_in} {events_out}"


def _c_side(out: str) -> Side:
    return Side(next(line for line in out.splitlines() if line.startswith("CSW ")))


def gntipc_write(path: str, nbytes: int, api: str) -> None:
    """The gntipc writer of the benchmark: writes ``nbytes`` of the pattern, waits until
    the reader drained the ring (a plain libxenvchan reader stops at close), closes, and
    prints its counts."""
    block = memoryview(_pattern(BLOCK))
    if api == "async":
        asyncio.run(_async_write(path, nbytes, block))
        return
    with gntipc.get_backend("xen") as backend, Vchan.client(backend, 0, path, timeout=60) as v:
        counts = _Counts()
        left = nbytes
        while left:
            n = min(left, BLOCK)
            v.write_all(block[:n], timeout=120)
            left -= n
        deadline = time.monotonic() + 120
        while v.is_open() == 1 and v.buffer_space() < v.write_size:
            if time.monotonic() > deadline:
                raise TimeoutError("the reader did not drain the ring")
            v.prepare_wait_write()
            v.wait(1)
        c = v.endpoint.counters
        print(counts.line(c.events_in, c.events_out), flush=True)


async def _async_write(path: str, nbytes: int, block: memoryview) -> None:
    stream = await gntipc.connect(0, path, timeout=60, backend="xen")
    async with stream:
        counts = _Counts()
        left = nbytes
        while left:
            n = min(left, BLOCK)
            await stream.send(block[:n])
            left -= n
        with anyio.fail_after(120):
            await stream.wait_writable(stream.vchan.write_size)
        st = stream.statistics()
        print(counts.line(st.events_received, st.events_sent), flush=True)


def _spawn_writer(path: str, nbytes: int, api: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--writer", path, str(nbytes), api],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _writer_done(writer: subprocess.Popen[str]) -> Side:
    out, _ = writer.communicate(timeout=120)
    if writer.returncode != 0:
        sys.exit("the gntipc writer failed")
    return _c_side(out)


Result = tuple[float, Side, Side]  # seconds, reader, writer


def run_c_to_c(exe: Path, ring: int, nbytes: int, check: str, api: str) -> Result:
    path = _path("cc")
    reader = c_peer(exe, "server", path, ring, "recv", nbytes, check)
    writer = c_peer(exe, "client", path, ring, "send", nbytes, check)
    out = c_done(reader)
    seconds = c_seconds(out)
    return seconds, _c_side(out), _c_side(c_done(writer))


def run_gntipc_to_gntipc(exe: Path, ring: int, nbytes: int, check: str, api: str) -> Result:
    path = _path("gg")
    if api == "async":
        writer = _spawn_writer(path, nbytes, api)  # it waits for the offer
        seconds, reader = asyncio.run(_async_server_read(path, ring, nbytes, check))
        return seconds, reader, _writer_done(writer)
    with (
        gntipc.get_backend("xen") as backend,
        Vchan.server(backend, 0, path, read_size=ring, write_size=ring) as v,
    ):
        writer = _spawn_writer(path, nbytes, api)
        deadline = time.monotonic() + 120
        while v.is_open() == 2:
            if time.monotonic() > deadline:
                sys.exit("the gntipc writer never connected")
            v.wait(1)
        seconds, reader = _gntipc_read(v, ring, nbytes, check)
    return seconds, reader, _writer_done(writer)


async def _async_server_read(path: str, ring: int, nbytes: int, check: str) -> tuple[float, Side]:
    async with await gntipc.listen(
        0, path, read_size=ring, write_size=ring, backend="xen"
    ) as listener:
        with anyio.fail_after(120):
            stream = await listener.accept()
    async with stream:
        return await _async_read(stream, ring, nbytes, check)


def _reader_state(ring: int, check: str) -> tuple[bytearray, memoryview, bool]:
    # the pattern twice over, as the C peer has it: any chunk is one slice of it
    expected = memoryview(_pattern(BLOCK + -(-ring // BLOCK) * BLOCK))
    return bytearray(ring), expected, check == VERIFY


async def _async_read(
    stream: gntipc.VchanStream, ring: int, nbytes: int, check: str
) -> tuple[float, Side]:
    """:func:`_gntipc_read` with ``await stream.receive_into(buf)``."""
    buf, expected, verify = _reader_state(ring, check)
    receive_into = stream.receive_into
    counts = _Counts()
    t0 = time.monotonic()
    got = 0
    with anyio.fail_after(120):
        while got < nbytes:
            n = await receive_into(buf)
            if verify and not buf.startswith(expected[got % BLOCK : got % BLOCK + n]):
                raise ValueError(f"gntipc reader: the chunk at offset {got} does not match")
            got += n
    seconds = time.monotonic() - t0
    st = stream.statistics()
    return seconds, Side(counts.line(st.events_received, st.events_sent))


def _gntipc_read(v: Vchan, ring: int, nbytes: int, check: str) -> tuple[float, Side]:
    """Read ``nbytes`` with the blocking API (default wait policy), checking each chunk
    against the pattern if ``check`` is VERIFY; the seconds taken and the counts."""
    buf, expected, verify = _reader_state(ring, check)
    readinto = v.readinto
    counts = _Counts()
    t0 = time.monotonic()
    got = 0
    while got < nbytes:
        n = readinto(buf, timeout=120)
        if verify and not buf.startswith(expected[got % BLOCK : got % BLOCK + n]):
            raise ValueError(f"gntipc reader: the chunk at offset {got} does not match")
        got += n
    seconds = time.monotonic() - t0
    c = v.endpoint.counters
    return seconds, Side(counts.line(c.events_in, c.events_out))


def run_c_to_gntipc(exe: Path, ring: int, nbytes: int, check: str, api: str) -> Result:
    path = _path("cg")
    writer = c_peer(exe, "server", path, ring, "send", nbytes, check)
    if api == "async":
        seconds, reader = asyncio.run(_async_client_read(path, ring, nbytes, check))
    else:
        with (
            gntipc.get_backend("xen") as backend,
            Vchan.client(backend, 0, path, timeout=60) as v,
        ):
            seconds, reader = _gntipc_read(v, ring, nbytes, check)
    return seconds, reader, _c_side(c_done(writer))


async def _async_client_read(path: str, ring: int, nbytes: int, check: str) -> tuple[float, Side]:
    stream = await gntipc.connect(0, path, timeout=60, backend="xen")
    async with stream:
        return await _async_read(stream, ring, nbytes, check)


def run_gntipc_to_c(exe: Path, ring: int, nbytes: int, check: str, api: str) -> Result:
    path = _path("gc")
    reader = c_peer(exe, "server", path, ring, "recv", nbytes, check)
    writer = _spawn_writer(path, nbytes, api)
    out = c_done(reader)
    return c_seconds(out), _c_side(out), _writer_done(writer)


CC, GG, GC, CG = (
    "libxenvchan C -> C",
    "gntipc -> gntipc",
    "gntipc -> libxenvchan C",
    "libxenvchan C -> gntipc",
)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--writer":
        gntipc_write(sys.argv[2], int(sys.argv[3]), sys.argv[4])
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
    parser.add_argument(
        "--api", choices=("sync", "async", "both"), default="both",
        help="gntipc's API: the blocking Vchan, the async VchanStream, or each (default)",
    )  # fmt: skip
    args = parser.parse_args()
    if not os.path.exists("/dev/xen/gntdev"):
        sys.exit("not on Xen: run it inside tools/xen-vm/run-in-xen.sh")
    nbytes = args.mib << 20
    checks = (VERIFY, COUNT) if args.check == "both" else (args.check,)
    apis = ("sync", "async") if args.api == "both" else (args.api,)
    ring = args.ring
    print(
        f"{args.mib} MiB one way, ring {ring}, best of {args.repeat}, {os.cpu_count()} CPU(s);"
        " writers: one precomputed 64 KiB block per call; readers: a ring-sized buffer per"
        " call, then verify = one memcmp per chunk against the pattern, count = nothing;"
        " per MiB: CPU time, context switches (voluntary+involuntary), gntipc's events in/out",
        flush=True,
    )
    cases = {CC: run_c_to_c, GG: run_gntipc_to_gntipc, GC: run_gntipc_to_c, CG: run_c_to_gntipc}
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_peer(Path(tmp))
        for _ in range(args.repeat):  # the repeats take turns: a slow spell hits every case
            for check in checks:
                for api in apis:
                    for name, case in cases.items():
                        if name == CC and api != apis[0]:
                            continue  # no gntipc in it: once per pass
                        seconds, reader, writer = case(exe, ring, nbytes, check, api)
                        label = name if name == CC else f"{name} ({api})"
                        runs.setdefault((label, check), []).append(seconds)
                        print(
                            f"{check:6s}  {label:32s} {nbytes / seconds / 1e6:8.1f} MB/s"
                            f"  reader {reader.per_mib(nbytes)}  writer {writer.per_mib(nbytes)}",
                            flush=True,
                        )
    rates = {key: nbytes / min(seconds) / 1e6 for key, seconds in runs.items()}
    header = "".join(f"{c:>10s}" for c in checks) + "".join(f"{c + ' /C->C':>14s}" for c in checks)
    print(f"\n{'MB/s':32s}{header}")
    for label in dict.fromkeys(label for label, _ in runs):
        figures = "".join(f"{rates[label, c]:10.1f}" for c in checks)
        ratios = "".join(f"{rates[label, c] / rates[CC, c]:14.2f}" for c in checks)
        print(f"{label:32s}{figures}{ratios}")


if __name__ == "__main__":
    main()
