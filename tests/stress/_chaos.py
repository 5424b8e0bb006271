"""The chaos driver: lanes of server/client worker processes (``_chaos_worker``), one of
them SIGKILLed at a random moment, again and again; then the logs are checked.

A lane is one store path with one server process (domain 1) and one client process
(domain 2).  The driver kills one of the two (the *victim*) at a random moment after the
pair connected, or while a freshly started process is still starting, connecting or
accepting; starts a replacement at once; and waits until the replacement and the
*survivor* are connected to each other again (the survivor had to notice the kill,
close, and accept or connect again; a client had to skip the dead server's stale keys).

*Steady* lanes run beside them and are never killed: one session each, both sides
sending until the end of the run, with pauses (so that each often waits for the
other).  Each of their receivers must log progress at least every ``progress_after``
seconds: a lost wake-up mid-transfer stalls a session, and counts as a hang.

Counted, from the logs (see ``_chaos_worker``):

* hangs: a lane that does not pair again within ``hang_after`` seconds of a kill, a
  steady session that makes no progress for ``progress_after`` seconds, or a process
  that does not stop within ``hang_after`` at the end;
* lost: for each session, units the writer had sent (logged after ``send`` returned,
  i.e. in the ring) that its surviving reader did not receive before its end of stream;
* corrupted: units received that differ from what was sent;
* closed under: a receiver that saw ClosedResourceError (nobody closed its stream);
* crash read as a clean close: a reader's EndOfStream from a writer killed before it
  sent EOF.  The one documented exception: a writer killed before it announced itself
  (no presence node: it cannot be told from a plain libxenvchan peer that closed),
  counted apart as ``eof_before_announce``;
* detection: from the SIGKILL to the survivor's receive (or send) raising;
* errors: a worker that died on its own (an unexpected exception);
* leftovers: ``assert_cleaned_up()`` of the sim after every process exited, and any
  file left in its runtime directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gntipc

from ._chaos_worker import CLIENT_DOM, SERVER_DOM
from ._common import LogReader, leftovers, now, percentile, reap, residue, spawn


@dataclass
class Proc:
    lane: int
    role: str
    popen: subprocess.Popen[bytes]
    log: LogReader
    err: str
    killed_at: float | None = None  # by the driver (a chaos kill or a clean-up)
    sigkilled: bool = False  # by the driver (else it exited on its own: an error)
    started: set[int] = field(default_factory=set)
    progress_at: float = 0.0  # when we last read a progress line of it

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> list[list[str]]:
        new = self.log.poll()
        for f in new:
            if f[0] == "S":
                self.started.add(int(f[1]))
            elif f[0] == "g":
                self.progress_at = now()
        return new

    def phase(self) -> str:
        for f in reversed(self.log.lines):
            if f[0] == "P":
                return f[1]
        return "start"


@dataclass
class Kill:
    lane: int
    victim: Proc
    survivor: Proc
    t: float
    phase: str


@dataclass
class Lane:
    idx: int
    path: str
    mode: str
    steady: bool = False  # never killed, must keep moving
    server: Proc | None = None
    client: Proc | None = None
    pairing_since: float = 0.0
    paired: bool = False
    next_kill: float = 0.0
    victim: Proc | None = None
    target_phase: str | None = None  # kill the victim as soon as it enters this phase
    early_kill: float | None = None  # kill a process still connecting, at this time


@dataclass
class ChaosResult:
    kills: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    hangs: int = 0
    hang_notes: list[str] = field(default_factory=list)
    lost_bytes: int = 0
    lost_msgs: int = 0
    corrupted_bytes: int = 0
    corrupted_msgs: int = 0
    loss_notes: list[str] = field(default_factory=list)
    detection: list[float] = field(default_factory=list)
    slow_notes: list[tuple[float, str]] = field(default_factory=list)
    errors: int = 0
    error_notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    sessions: int = 0
    bytes_moved: int = 0
    msgs_moved: int = 0
    unfinished: int = 0
    #: Sessions whose writer was killed before it sent EOF, after it announced itself,
    #: but whose reader got EndOfStream instead of BrokenResourceError (a failure).
    crash_as_eof: int = 0
    crash_as_eof_notes: list[str] = field(default_factory=list)
    #: The documented exception: the same, from a writer killed before it announced
    #: itself (to its reader it may be a plain libxenvchan peer that closed).
    eof_before_announce: int = 0
    #: Sessions whose receiver saw ClosedResourceError (the stream closed under it, as
    #: bug 1 did before 2955da5: a failure), and the units it did not get.
    closed_under: int = 0
    closed_under_notes: list[str] = field(default_factory=list)
    #: Steady sessions: how many, units they moved, the longest gap between two of
    #: their progress lines (seconds).
    steady_sessions: int = 0
    steady_units: int = 0
    steady_max_gap: float = 0.0
    seconds: float = 0.0

    def detection_ms(self, q: float) -> float:
        return percentile(self.detection, q) * 1000 if self.detection else 0.0


class Chaos:
    def __init__(
        self,
        *,
        kills: int,
        lanes: int = 3,
        msgs_lanes: int = 1,
        steady_lanes: int = 2,
        seed: int = 1,
        hang_after: float = 15.0,
        progress_after: float = 5.0,
        max_delay: float = 0.4,
        time_limit: float = 3600.0,
    ) -> None:
        self.target = kills
        self.rnd = random.Random(seed)
        self.hang_after = hang_after
        self.progress_after = progress_after
        self.max_delay = max_delay
        self.time_limit = time_limit
        self.dir = tempfile.mkdtemp(prefix="gntipc-chaos-")
        self.stop = os.path.join(self.dir, "stop")
        # A runtime of our own: whatever a kill leaves behind stays out of the suite's.
        self.sim = os.path.join(self.dir, "sim")
        tag = f"{os.getpid()}-{seed}"
        self.lanes = [
            Lane(i, f"data/chaos/{tag}/{i}", "msgs" if i < msgs_lanes else "bytes")
            for i in range(lanes)
        ]
        # Steady lanes: bytes and messages in turn.
        self.lanes += [
            Lane(i, f"data/chaos/{tag}/{i}", ("bytes", "msgs")[(i - lanes) % 2], steady=True)
            for i in range(lanes, lanes + steady_lanes)
        ]
        self.procs: list[Proc] = []
        self.kill_log: list[Kill] = []
        self.res = ChaosResult()
        self._n = 0
        self.t_stop = float("inf")

    # -- processes -----------------------------------------------------------------
    def _start(self, lane: Lane, role: str) -> Proc:
        self._n += 1
        base = os.path.join(self.dir, f"{lane.idx}-{role}-{self._n}")
        popen = spawn(
            "_chaos_worker",
            [
                role,
                lane.path,
                lane.mode,
                str(self.rnd.getrandbits(32)),
                base + ".log",
                self.stop,
                *(["steady"] if lane.steady else []),
            ],
            SERVER_DOM if role == "server" else CLIENT_DOM,
            stderr_path=base + ".err",
            GNTIPC_SIM_DIR=self.sim,
        )
        proc = Proc(lane.idx, role, popen, LogReader(base + ".log"), base + ".err")
        self.procs.append(proc)
        setattr(lane, role, proc)
        lane.paired = False
        lane.pairing_since = now()
        lane.early_kill = None
        if not lane.steady and self.rnd.random() < 0.25:
            # Kill the newcomer before it is connected: during its start-up, connect
            # or accept.
            lane.early_kill = now() + self.rnd.uniform(0.05, 1.0)
        return proc

    def _kill(self, proc: Proc) -> float:
        t = now()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.killed_at = t
        proc.sigkilled = True
        proc.popen.wait(10)
        return t

    def _chaos_kill(self, lane: Lane, victim: Proc) -> None:
        survivor = lane.client if victim is lane.server else lane.server
        assert survivor is not None
        victim.poll()
        phase = victim.phase()
        t = self._kill(victim)
        self.kill_log.append(Kill(lane.idx, victim, survivor, t, phase))
        self.res.kills += 1
        self.res.phases[phase] += 1
        self._start(lane, victim.role)

    def _hang(self, lane: Lane, why: str) -> None:
        self.res.hangs += 1
        notes = [f"lane {lane.idx}: {why}"]
        for p in (lane.server, lane.client):
            if p is None:
                continue
            p.poll()
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGUSR1)  # faulthandler: stacks to its .err file
            notes.append(f"  {p.role} pid {p.pid} last log: {p.log.lines[-4:]} err: {p.err}")
        time.sleep(0.3)
        self.res.hang_notes.extend(notes)
        for p in (lane.server, lane.client):
            if p is not None and p.popen.poll() is None:
                self._kill(p)
        self._start(lane, "server")
        self._start(lane, "client")

    def _error(self, proc: Proc, when: str) -> None:
        proc.poll()
        tail = [" ".join(f) for f in proc.log.lines if f[0] == "X"][-1:]
        self.res.errors += 1
        self.res.error_notes.append(
            f"lane {proc.lane} {proc.role} pid {proc.pid} exited {proc.popen.returncode}"
            f"{when}: {tail} (stderr: {proc.err})"
        )

    def _check_exit(self, lane: Lane, proc: Proc | None) -> None:
        if proc is None or proc.killed_at is not None or proc.popen.poll() is None:
            return
        self._error(proc, "")
        proc.killed_at = now()  # treat as dead from here on
        self._start(lane, proc.role)

    # -- the run --------------------------------------------------------------------
    def run(self) -> ChaosResult:
        t0 = now()
        # Our own backend pins the runtime directory for the whole run.
        backend = gntipc.get_backend("sim", domid=0, runtime_dir=self.sim)
        try:
            for lane in self.lanes:
                self._start(lane, "server")
                self._start(lane, "client")
            while self.res.kills < self.target and now() - t0 < self.time_limit:
                for lane in self.lanes:
                    self._step(lane)
                time.sleep(0.005)
            self._finish()
            for p in self.procs:
                reap(p.popen)
            rows, files = residue(backend)
            self.res.leftovers = rows + [f"stray file {f}" for f in files]
        finally:
            for p in self.procs:
                reap(p.popen)
            backend.close()
        self.res.leftovers += leftovers(self.sim)
        shutil.rmtree(self.sim, ignore_errors=True)
        self._analyse()
        self.res.seconds = now() - t0
        return self.res

    def _step(self, lane: Lane) -> None:
        self._check_exit(lane, lane.server)
        self._check_exit(lane, lane.client)
        server, client = lane.server, lane.client
        assert server is not None and client is not None
        t = now()
        if not lane.paired:
            server.poll()
            client.poll()
            if server.started & client.started:
                lane.paired = True
                server.progress_at = client.progress_at = t
                if lane.steady:
                    return
                lane.victim = self.rnd.choice((server, client))
                lane.target_phase = None
                if self.rnd.random() < 0.5:
                    # Aim at the short phases: connect/accept and close.
                    lane.target_phase = self.rnd.choice(
                        ("close", "accept" if lane.victim.role == "server" else "connect")
                    )
                    lane.next_kill = t + 3.0  # unless it gets there first
                else:
                    lane.next_kill = t + self.rnd.choice(
                        (self.rnd.uniform(0, 0.005), self.rnd.uniform(0, self.max_delay))
                    )
            elif lane.early_kill is not None and t >= lane.early_kill:
                # The newest of the two is the one still coming up.
                young = server if server.popen.pid > client.popen.pid else client
                self._chaos_kill(lane, young)
            elif t - lane.pairing_since > self.hang_after:
                self._hang(lane, f"no new connection {self.hang_after} s after a kill")
        elif lane.steady:
            server.poll()
            client.poll()
            for p in (server, client):
                if t - p.progress_at > self.progress_after:
                    self._hang(
                        lane,
                        f"steady session: the {p.role} received nothing for "
                        f"{self.progress_after} s",
                    )
                    return
        elif self.res.kills < self.target:
            victim = lane.victim
            assert victim is not None
            if lane.target_phase is not None:
                new = victim.poll()
                if any(f[0] == "P" and f[1] == lane.target_phase for f in new):
                    time.sleep(self.rnd.uniform(0, 0.002))
                    self._chaos_kill(lane, victim)
                    return
            if t >= lane.next_kill:
                self._chaos_kill(lane, victim)

    def _finish(self) -> None:
        self.t_stop = now()
        with open(self.stop, "w"):
            pass
        deadline = now() + self.hang_after + 10
        live = [p for p in self.procs if p.killed_at is None]
        for p in live:
            try:
                p.popen.wait(max(0.1, deadline - now()))
            except subprocess.TimeoutExpired:
                p.poll()
                os.kill(p.pid, signal.SIGUSR1)
                time.sleep(0.3)
                self.res.hangs += 1
                self.res.hang_notes.append(
                    f"lane {p.lane} {p.role} pid {p.pid} did not stop: {p.log.lines[-4:]}"
                    f" (stderr: {p.err})"
                )
                self._kill(p)
                continue
            if p.popen.returncode != 0:
                self._error(p, " at the end")

    # -- analysis -----------------------------------------------------------------------
    def _analyse(self) -> None:
        res = self.res
        # conn -> {proc index: record}
        recs: dict[int, dict[int, dict[str, Any]]] = {}
        for i, p in enumerate(self.procs):
            p.poll()
            for f in p.log.lines:
                kind = f[0]
                if kind not in "ASqwferxgC" or len(f) < 2:
                    continue
                rec = recs.setdefault(int(f[1]), {}).setdefault(i, {"sent": 0})
                if kind == "A":
                    rec["announced"] = True
                elif kind == "S":
                    rec["start"] = float(f[2])
                elif kind == "q":
                    rec["quota"] = int(f[2])
                elif kind == "f":
                    rec["finishing"] = True
                elif kind in "we":
                    rec["sent"] = max(int(rec["sent"]), int(f[2]))
                    if kind == "e":
                        rec["eof"] = True
                elif kind == "g":
                    t = float(f[3])
                    gap = t - float(rec.get("g_t", rec.get("start", t)))
                    rec["max_gap"] = max(float(rec.get("max_gap", 0.0)), gap)
                    rec["g_t"] = t
                elif kind == "r":
                    rec["got"], rec["bad"], rec["why"], rec["r_t"] = (
                        int(f[2]),
                        int(f[3]),
                        f[4],
                        float(f[5]),
                    )
                elif kind == "x":
                    rec["x_t"] = float(f[3])
                elif kind == "C":
                    rec["closed"] = True
        res.sessions = len([c for c in recs.values() if any("start" in r for r in c.values())])
        for conn, sides in recs.items():
            for i, rec in sides.items():
                p = self.procs[i]
                lane = self.lanes[p.lane]
                mode = lane.mode
                others = [j for j in sides if j != i]
                if "got" in rec:
                    if mode == "bytes":
                        res.bytes_moved += int(rec["got"])
                        res.corrupted_bytes += int(rec["bad"])
                    else:
                        res.msgs_moved += int(rec["got"])
                        res.corrupted_msgs += int(rec["bad"])
                    if rec["why"] == "CLO":
                        res.closed_under += 1
                        res.closed_under_notes.append(
                            f"conn {conn} ({mode}): {p.role} pid {p.pid} saw its stream "
                            f"closed under it after {rec['got']} units"
                        )
                    if lane.steady:
                        res.steady_sessions += 1
                        res.steady_units += int(rec["got"])
                        end = float(rec["r_t"])
                        tail = end - float(rec.get("g_t", rec.get("start", end)))
                        gap = max(float(rec.get("max_gap", 0.0)), tail)
                        res.steady_max_gap = max(res.steady_max_gap, gap)
                elif p.killed_at is None and "start" in rec:
                    res.unfinished += 1  # a live process that never ended a session
                if not others:
                    # No line of the partner names this session: it was SIGKILLed inside
                    # connect/accept before it announced itself (an announced one logs
                    # ``A``), or it is a listener that withdrew its keys at the end.
                    if rec.get("why") == "EOF" and float(rec["r_t"]) < self.t_stop:
                        res.eof_before_announce += 1
                    continue
                reader = others[0]
                rrec = sides[reader]
                if "got" not in rrec:
                    continue  # the reader was killed during the session
                lost = int(rec["sent"]) - int(rrec["got"])
                if rrec["why"] == "EOF" and p.sigkilled and "finishing" not in rec:
                    # Killed before it sent EOF: its reader must see a crash.  (One that
                    # exited on its own may have closed on its way out: an error anyway.)
                    if "announced" not in rec:
                        res.eof_before_announce += 1
                    else:
                        res.crash_as_eof += 1
                        res.crash_as_eof_notes.append(
                            f"conn {conn}: {p.role} pid {p.pid} (announced) killed after"
                            f" {rec['sent']} of {rec.get('quota', '?')} units, before EOF;"
                            f" {self.procs[reader].role} pid {self.procs[reader].pid} got"
                            " EndOfStream"
                        )
                if lost > 0:
                    if mode == "bytes":
                        res.lost_bytes += lost
                    else:
                        res.lost_msgs += lost
                    res.loss_notes.append(
                        f"conn {conn} ({mode}): {p.role} pid {p.pid} sent {rec['sent']}, "
                        f"{self.procs[reader].role} pid {self.procs[reader].pid} got "
                        f"{rrec['got']} ({rrec['why']}); writer killed at {p.killed_at}"
                    )
        # Detection: from each kill to the survivor's first error in its session with
        # the victim.  A session that only the survivor logged belongs to a victim killed
        # inside connect or accept, after the channel was made: the first kill of the
        # survivor's partner at or after the session's start.
        index = {id(p): i for i, p in enumerate(self.procs)}
        samples: dict[int, list[tuple[float, int]]] = {}
        by_victim = {index[id(k.victim)]: n for n, k in enumerate(self.kill_log)}
        for conn, sides in recs.items():
            for u, rec in sides.items():
                ends = [float(rec[key]) for key in ("r_t", "x_t") if key in rec]
                if not ends:
                    continue
                others = [j for j in sides if j != u]
                if others:
                    n = by_victim.get(others[0])
                    if n is None or self.kill_log[n].survivor is not self.procs[u]:
                        continue
                else:
                    start = float(rec.get("start", 0.0)) - 0.1
                    cands = [
                        n
                        for n, k in enumerate(self.kill_log)
                        if k.survivor is self.procs[u] and start <= k.t <= max(ends)
                    ]
                    if not cands:
                        continue
                    n = cands[0]
                after = [t for t in ends if t >= self.kill_log[n].t]
                if after:
                    samples.setdefault(n, []).append((min(after) - self.kill_log[n].t, conn))
        for n, got in sorted(samples.items()):
            k = self.kill_log[n]
            t, conn = min(got)
            res.detection.append(t)
            if t > 0.2:
                res.slow_notes.append(
                    (
                        t,
                        f"{k.victim.role} killed in {k.phase} (lane {k.lane}, "
                        f"{self.lanes[k.lane].mode}) at {k.t:.3f}; survivor pid "
                        f"{k.survivor.pid}, conn {conn}",
                    )
                )
