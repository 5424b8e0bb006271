"""gntipc vs Debian's libxenvchan moving the same data, on real Xen (dom0 <-> dom0).

Run inside the VM (the numbers under QEMU's emulation are meaningless in absolute terms;
the ratio is the point)::

    tools/xen-vm/run-in-xen.sh "$PWD" '.venv/bin/python benchmarks/xen_vs_libxenvchan.py'

With ``--domu`` one side of every pair runs in a PV domU of one vCPU (started once, with
``_xen_domu.py``) and the other in dom0, in both directions (domU -> dom0 and dom0 ->
domU) in turn; the reader is the server in every pair, and each pair's ratio is to C -> C
in the same direction and round.

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
it slept; involuntary: it was preempted or yielded; ``getrusage``) and its events sent
and received (gntipc: ``statistics()``; C: counted on their way through libxenevtchn),
per MiB moved: the wake-ups each pair pays,
and (with one vCPU) whether the CPU sat idle: the two sides' CPU time against the wall
time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _xen_domu  # beside this script (the script's directory is on sys.path)
import anyio

import gntipc
from gntipc import Vchan

HERE = Path(__file__).resolve().parent
#: How long a client waits for its server's offer (a domU side takes seconds to start).
CONNECT_TIMEOUT = 120
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
    # -rdynamic: libxenvchan's calls of the executable's event counters (see the source)
    subprocess.run(
        [gcc, "-O2", "-rdynamic", "-o", str(exe), str(PEER_SRC), "-lxenvchan"], check=True
    )
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

    def line(self) -> str:
        """The line it was made from."""
        events = "" if self.events is None else f" {self.events[0]} {self.events[1]}"
        return f"CSW {self.vol} {self.invol} {self.cpu:.6f}{events}"

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


def gntipc_write(path: str, nbytes: int, api: str, peer: int = 0) -> None:
    """The gntipc writer of the benchmark (the client of server ``peer``): writes
    ``nbytes`` of the pattern, waits until the reader drained the ring (a plain
    libxenvchan reader stops at close), closes, and prints its counts."""
    block = memoryview(_pattern(BLOCK))
    if api == "async":
        asyncio.run(_async_write(path, nbytes, block, peer))
        return
    with (
        gntipc.get_backend("xen") as backend,
        Vchan.client(backend, peer, path, timeout=CONNECT_TIMEOUT) as v,
    ):
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


async def _async_write(path: str, nbytes: int, block: memoryview, peer: int) -> None:
    stream = await gntipc.connect(peer, path, timeout=CONNECT_TIMEOUT, backend="xen")
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
        spawned = _spawn_writer(path, nbytes, api)  # it waits for the offer
        seconds, reader = asyncio.run(_async_server_read(path, ring, nbytes, check))
        return seconds, reader, _writer_done(spawned)
    writer: subprocess.Popen[str] | None = None

    def offered() -> None:
        nonlocal writer
        writer = _spawn_writer(path, nbytes, api)

    seconds, reader = _sync_server_read(path, ring, nbytes, check, 0, offered)
    assert writer is not None
    return seconds, reader, _writer_done(writer)


def _sync_server_read(
    path: str, ring: int, nbytes: int, check: str, peer: int, offered: Callable[[], None]
) -> tuple[float, Side]:
    """:func:`_gntipc_read` as the server of client ``peer``; ``offered()`` once the path
    is offered."""
    with (
        gntipc.get_backend("xen") as backend,
        Vchan.server(backend, peer, path, read_size=ring, write_size=ring) as v,
    ):
        offered()
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while v.is_open() == 2:
            if time.monotonic() > deadline:
                sys.exit("the gntipc writer never connected")
            v.wait(1)
        return _gntipc_read(v, ring, nbytes, check)


async def _async_server_read(
    path: str,
    ring: int,
    nbytes: int,
    check: str,
    peer: int = 0,
    offered: Callable[[], None] = lambda: None,
) -> tuple[float, Side]:
    async with await gntipc.listen(
        peer, path, read_size=ring, write_size=ring, backend="xen"
    ) as listener:
        offered()
        with anyio.fail_after(CONNECT_TIMEOUT):
            stream = await listener.accept()
    async with stream:
        return await _async_read(stream, ring, nbytes, check)


def gntipc_read(path: str, ring: int, nbytes: int, check: str, api: str, peer: int) -> None:
    """The gntipc reader as a command (``--reader``, the server of client ``peer``): the
    C reader's output (LISTENING, CSW, RATE, ok)."""

    def offered() -> None:
        print("LISTENING", flush=True)

    if api == "async":
        seconds, side = asyncio.run(_async_server_read(path, ring, nbytes, check, peer, offered))
    else:
        seconds, side = _sync_server_read(path, ring, nbytes, check, peer, offered)
    print(f"{side.line()}\nRATE seconds={seconds:.6f}\nok", flush=True)


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
            Vchan.client(backend, 0, path, timeout=CONNECT_TIMEOUT) as v,
        ):
            seconds, reader = _gntipc_read(v, ring, nbytes, check)
    return seconds, reader, _c_side(c_done(writer))


async def _async_client_read(path: str, ring: int, nbytes: int, check: str) -> tuple[float, Side]:
    stream = await gntipc.connect(0, path, timeout=CONNECT_TIMEOUT, backend="xen")
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
#: Each pair's (writer, reader) implementations.
IMPLS = {CC: ("C", "C"), GG: ("gntipc", "gntipc"), GC: ("gntipc", "C"), CG: ("C", "gntipc")}
TO_DOM0, TO_DOMU = "domU -> dom0", "dom0 -> domU"
_paths = iter(range(1 << 30))


def _side_args(
    impl: str, reader: bool, exe: Path, path: str, ring: int, nbytes: int, check: str,
    api: str, peer: int,
) -> list[str]:  # fmt: skip
    """One side's command line, after its program (the C peer, or python and this script):
    the reader is the server."""
    if impl == "C":
        role, way = ("server", "recv") if reader else ("client", "send")
        return [str(exe), role, path, str(ring), way, str(nbytes), check, str(peer)]
    if reader:
        return ["--reader", path, str(ring), str(nbytes), check, api, str(peer)]
    return ["--writer", path, str(nbytes), api, str(peer)]


def run_domu_pair(
    domu: _xen_domu.Domu, exe: Path, pair: str, direction: str, ring: int, nbytes: int,
    check: str, api: str,
) -> Result:  # fmt: skip
    """``pair`` between dom0 and ``domu``: its writer in the domU (TO_DOM0) or its reader
    (TO_DOMU); the reader is the server, in its own domain's XenStore home."""
    writer_impl, reader_impl = IMPLS[pair]
    remote_reads = direction == TO_DOMU
    server = domu.domid if remote_reads else 0
    path = f"/local/domain/{server}/data/vchan/bench-{os.getpid()}-{next(_paths)}"
    local_impl, remote_impl = (
        (writer_impl, reader_impl) if remote_reads else (reader_impl, writer_impl)
    )
    local = _side_args(
        local_impl, not remote_reads, exe, path, ring, nbytes, check, api, domu.domid
    )
    remote = _side_args(remote_impl, remote_reads, exe, path, ring, nbytes, check, api, 0)
    if local_impl == "gntipc":
        local = [sys.executable, __file__, *local]
    remote_cmd = (
        domu.python(Path(__file__).name, *remote) if remote_impl == "gntipc" else shlex.join(remote)
    )
    local_out, remote_out = domu.pair(local, remote_cmd, timeout=900)
    reader_out, writer_out = (remote_out, local_out) if remote_reads else (local_out, remote_out)
    return c_seconds(reader_out), _c_side(reader_out), _c_side(writer_out)


def _median_per_mib(values: list[float], nbytes: int) -> str:
    return f"{statistics.median(values) / (nbytes / (1 << 20)):.1f}"


def _summary(
    runs: dict[tuple[str, str], list[Result]], checks: tuple[str, ...], nbytes: int,
    reference: Callable[[str], str],
) -> None:  # fmt: skip
    """The best rate of each case and check, its ratio to ``reference(label)``'s (C -> C
    of the same direction), then the wake-ups per MiB (medians over the runs)."""
    rates = {key: nbytes / min(r[0] for r in results) / 1e6 for key, results in runs.items()}
    labels = list(dict.fromkeys(label for label, _ in runs))
    width = max(32, *(len(label) + 1 for label in labels))
    header = "".join(f"{c:>10s}" for c in checks) + "".join(f"{c + ' /C->C':>14s}" for c in checks)
    print(f"\n{'MB/s, best run':{width}s}{header}")
    for label in labels:
        figures = "".join(f"{rates[label, c]:10.1f}" for c in checks)
        ratios = "".join(f"{rates[label, c] / rates[reference(label), c]:14.2f}" for c in checks)
        print(f"{label:{width}s}{figures}{ratios}")
    print(
        f"\n{'per MiB, medians':{width}s}{'check':>7s}  {'reader ev in/out':>16s}"
        f"  {'writer ev in/out':>16s}  {'reader csw':>10s}  {'writer csw':>10s}"
        f"  {'CPU ms r/w':>12s}"
    )
    for (label, check), results in runs.items():
        cols = []
        for side in (1, 2):
            ev = [r[side].events for r in results]  # type: ignore[index]
            cols.append(
                "-" if None in ev else
                f"{_median_per_mib([e[0] for e in ev], nbytes)}"  # type: ignore[index]
                f"/{_median_per_mib([e[1] for e in ev], nbytes)}"  # type: ignore[index]
            )  # fmt: skip
        csw = [
            _median_per_mib([r[side].vol + r[side].invol for r in results], nbytes)  # type: ignore[union-attr]
            for side in (1, 2)
        ]
        cpu = [
            _median_per_mib([r[side].cpu * 1e3 for r in results], nbytes)  # type: ignore[union-attr]
            for side in (1, 2)
        ]
        print(
            f"{label:{width}s}{check:>7s}  {cols[0]:>16s}  {cols[1]:>16s}  {csw[0]:>10s}"
            f"  {csw[1]:>10s}  {cpu[0] + '/' + cpu[1]:>12s}"
        )


def main() -> None:
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--writer":
        gntipc_write(sys.argv[2], int(sys.argv[3]), sys.argv[4], int((sys.argv[5:] or ["0"])[0]))
        return
    if len(sys.argv) == 8 and sys.argv[1] == "--reader":
        a = sys.argv[2:]
        gntipc_read(a[0], int(a[1]), int(a[2]), a[3], a[4], int(a[5]))
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
    parser.add_argument(
        "--domu", action="store_true",
        help="dom0 <-> domU: one side of each pair in a PV domU, both directions in turn",
    )  # fmt: skip
    parser.add_argument("--domu-mem", type=int, default=384, help="the domU's memory (MiB)")
    args = parser.parse_args()
    if not os.path.exists("/dev/xen/gntdev"):
        sys.exit("not on Xen: run it inside tools/xen-vm/run-in-xen.sh")
    nbytes = args.mib << 20
    checks = (VERIFY, COUNT) if args.check == "both" else (args.check,)
    apis = ("sync", "async") if args.api == "both" else (args.api,)
    ring = args.ring
    directions = (TO_DOM0, TO_DOMU) if args.domu else ("",)
    print(
        f"{args.mib} MiB one way, ring {ring}, best of {args.repeat}, {os.cpu_count()} CPU(s)"
        f"{' in dom0, one side in a domU of one vCPU' if args.domu else ''};"
        " writers: one precomputed 64 KiB block per call; readers: a ring-sized buffer per"
        " call, then verify = one memcmp per chunk against the pattern, count = nothing;"
        " per MiB: CPU time, context switches (voluntary+involuntary), events in/out",
        flush=True,
    )
    cases = {CC: run_c_to_c, GG: run_gntipc_to_gntipc, GC: run_gntipc_to_c, CG: run_c_to_gntipc}
    runs: dict[tuple[str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        exe = build_peer(Path(tmp))
        domu = stack.enter_context(_xen_domu.Domu([str(exe)], args.domu_mem)) if args.domu else None
        for _ in range(args.repeat):  # the repeats take turns: a slow spell hits every case
            for check in checks:
                for api in apis:
                    for direction in directions:
                        for name, case in cases.items():
                            if name == CC and api != apis[0]:
                                continue  # no gntipc in it: once per pass
                            if domu is None:
                                result = case(exe, ring, nbytes, check, api)
                            else:
                                result = run_domu_pair(
                                    domu, exe, name, direction, ring, nbytes, check, api
                                )
                            seconds, reader, writer = result
                            label = name if name == CC else f"{name} ({api})"
                            label = f"{direction}: {label}" if direction else label
                            runs.setdefault((label, check), []).append(result)
                            print(
                                f"{check:6s}  {label:48s} {nbytes / seconds / 1e6:8.1f} MB/s"
                                f"  reader {reader.per_mib(nbytes)}"
                                f"  writer {writer.per_mib(nbytes)}",
                                flush=True,
                            )

    def reference(label: str) -> str:
        direction = label.split(": ")[0] if ": " in label else ""
        return f"{direction}: {CC}" if direction else CC

    _summary(runs, checks, nbytes, reference)


if __name__ == "__main__":
    main()
