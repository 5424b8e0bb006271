"""One side of the Xen benchmarks in a PV domU (``--domu``): dom0 <-> domU on real Xen.

Used by ``xen_vs_libxenvchan.py`` and ``xen_bulk.py`` inside dom0 of the QEMU kit
(``tools/xen-vm/run-in-xen.sh``).  :class:`Domu` starts one domU with the kit's
``xq-domu.sh`` (one vCPU, Debian's python3 3.11 with gntipc, its compiled module and its
dependencies shipped in, as ``tests/interop/test_domu.py`` ships them) for the whole run;
the domU runs an *agent*: a busybox shell loop that takes commands from XenStore, runs
each to its end and writes back its output and exit status.  A benchmark then runs each
transfer as a pair of commands, one in dom0 and one in the domU (:meth:`Domu.pair`), so
one boot serves every method, direction and round, and neither domain has anything but
the benchmark to run during a transfer: the agent waits for its command, and dom0 looks
for the domU's answer only after its own side has ended.

The agent's XenStore nodes live in the domU's home, ``<home>/data/gntipc-bench``: dom0
writes ``cmd/<n>`` (a shell command, or ``exit``), the agent writes ``out/<n>`` (the last
:data:`OUT_LIMIT` bytes of its output, stdout and stderr) then ``rc/<n>``; all raw
(``-R``: the xenstore tools escape newlines and backslashes otherwise).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
XQ_DOMU = REPO / "tools" / "xen-vm" / "xq-domu.sh"
#: The benchmark scripts a domU side runs (each imports nothing else of benchmarks/).
SCRIPTS = ("xen_vs_libxenvchan.py", "xen_bulk.py", "_xen_domu.py")
BASE = "data/gntipc-bench"
OUT_LIMIT = 1800  # xenstored takes up to 2048 bytes per node from an unprivileged domain
BOOT_TIMEOUT = 300.0

#: The agent (busybox sh in the domU).  It polls only between commands: a command runs
#: in the foreground, so during a transfer the agent is asleep in wait().
AGENT = f"""
B={BASE}
xenstore-write $B/ready 1
n=0
while :; do
  if ! c=$(xenstore-read -R $B/cmd/$n 2>/dev/null); then sleep 0.2; continue; fi
  [ "$c" = exit ] && break
  out=$(sh -c "$c" 2>&1); rc=$?
  xenstore-write -R $B/out/$n "$(printf '%s' "$out" | tail -c {OUT_LIMIT})"
  xenstore-write $B/rc/$n $rc
  n=$((n+1))
done
"""


def _store(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _xl() -> str:
    found = sorted(Path("/usr/lib").glob("xen-4.*/bin/xl"))
    if not found:
        sys.exit("no xl toolstack: run it in dom0 of tools/xen-vm/run-in-xen.sh")
    return str(found[-1])


class DomuError(RuntimeError):
    """The domU, its agent or a command run there failed."""


class Job:
    """A command running in the domU."""

    def __init__(self, domu: Domu, n: int, command: str) -> None:
        self.domu, self.n, self.command = domu, n, command

    def result(self, timeout: float) -> tuple[int, str]:
        """(its exit status, the tail of its output), waiting up to ``timeout`` seconds.

        Raises:
            DomuError: it did not end in time, or the domU is gone.
        """
        base = f"{self.domu.home}/{BASE}"
        deadline = time.monotonic() + timeout
        while True:
            rc = _store("xenstore-read", f"{base}/rc/{self.n}")
            if rc.returncode == 0:
                out = _store("xenstore-read", "-R", f"{base}/out/{self.n}").stdout
                return int(rc.stdout), out.rstrip("\n")
            if time.monotonic() > deadline:
                raise DomuError(f"domU command still running after {timeout}s: {self.command}")
            if not self.domu.alive():
                raise DomuError(f"the domU died running {self.command}:\n{self.domu.console()}")
            time.sleep(0.2)


class Domu(contextlib.AbstractContextManager["Domu"]):
    """A PV domU (one vCPU) running the agent, for the benchmark's remote sides.

    Args:
        files: more paths to ship (the C peer, numpy...), besides gntipc, its
            dependencies and :data:`SCRIPTS`.
        mem: the domU's memory (MiB): the shipped files live in its initramfs.
    """

    def __init__(self, files: Iterable[str] = (), mem: int = 512) -> None:
        sys.path.insert(0, str(REPO))
        from tests.interop.test_domu import shipped_files

        shipped, self.pythonpath = shipped_files()
        shipped += [str(HERE / s) for s in SCRIPTS] + list(files)
        self.name = f"gntipc-bench-{os.getpid()}"
        self._jobs = itertools.count()
        argv = ["sh", str(XQ_DOMU), "start", self.name, "--python", "--mem", str(mem)]
        for f in shipped:
            argv += ["--file", f]
        r = subprocess.run([*argv, "--", AGENT], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise DomuError(f"xq-domu.sh start failed:\n{r.stdout}\n{r.stderr}")
        t0 = time.monotonic()
        self.domid = int(r.stdout.split()[-1])
        self.home = f"/local/domain/{self.domid}"
        self._closed = False
        deadline = time.monotonic() + BOOT_TIMEOUT
        while _store("xenstore-read", f"{self.home}/{BASE}/ready").returncode != 0:
            if time.monotonic() > deadline or not self.alive():
                self.destroy()
                raise DomuError(f"the domU's agent did not start:\n{self.console()}")
            time.sleep(0.5)
        print(
            f"domU {self.name} (domid {self.domid}, {mem} MiB, one vCPU): agent ready"
            f" {time.monotonic() - t0:.0f}s after xl create",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    def python(self, script: str, *args: object) -> str:
        """The domU's command line running benchmark ``script`` with ``args``."""
        return (
            f"PYTHONPATH={':'.join(self.pythonpath)} PYTHONDONTWRITEBYTECODE=1"
            f" python3 {HERE / script} {shlex.join(str(a) for a in args)}"
        )

    def run(self, command: str) -> Job:
        """Start ``command`` (shell) in the domU; the agent runs one at a time."""
        n = next(self._jobs)
        r = _store("xenstore-write", "-R", f"{self.home}/{BASE}/cmd/{n}", command)
        if r.returncode != 0:
            raise DomuError(f"xenstore-write failed: {r.stderr}")
        return Job(self, n, command)

    def pair(self, local: Sequence[str], remote: str, timeout: float) -> tuple[str, str]:
        """Run ``remote`` in the domU and ``local`` (argv) in dom0 at once; the output of
        each, once both ended (the local side first: nothing polls during a transfer).

        Raises:
            DomuError: a side failed or ran past ``timeout`` seconds.
        """
        job = self.run(remote)
        proc = subprocess.Popen(local, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise DomuError(f"dom0 side still running after {timeout}s: {local}\n{out}") from None
        rc, remote_out = job.result(timeout)
        if proc.returncode != 0 or rc != 0:
            raise DomuError(
                f"dom0 side (rc={proc.returncode}) {shlex.join(local)}:\n{out}\n"
                f"domU side (rc={rc}) {remote}:\n{remote_out}"
            )
        return out, remote_out

    def alive(self) -> bool:
        return subprocess.run([_xl(), "domid", self.name], capture_output=True).returncode == 0

    def console(self) -> str:
        with contextlib.suppress(OSError):
            log = Path(f"/var/log/xen/console/guest-{self.name}.log")
            return log.read_text(errors="replace")[-4000:]
        return ""

    def destroy(self) -> None:
        subprocess.run([_xl(), "destroy", self.name], capture_output=True, timeout=120)

    def close(self, failed: bool = False) -> None:
        """Stop the agent (the domU powers off); destroy it if that fails or ``failed``."""
        if self._closed:
            return
        self._closed = True
        if not failed:
            self.run("exit")
            r = subprocess.run(
                ["sh", str(XQ_DOMU), "wait", self.name, "60"],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            if r.returncode == 0:
                return
            print(f"domU {self.name}:\n{r.stdout}{r.stderr}", file=sys.stderr)
        else:
            print(f"domU {self.name} console:\n{self.console()}", file=sys.stderr)
        self.destroy()
