"""``gntipc doctor``: what gntipc needs here, checked one item at a time, with advice.

Reports the backend that would be used and why, our domain id, the devices and their
limits (xen: ``/dev/xen/{gntdev,gntalloc,evtchn,privcmd}``, the gntalloc page limit, an
event-channel port and a shared page actually allocated), whether XenStore answers, and
for sim the runtime directory and who else is in it.  Every problem comes with advice;
the exit status is 3 when there is any.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._exceptions import BackendUnavailable, GntipcError, XenError
from ..backends import Backend, select_backend_name
from ..protocol import DEFAULT_RING_SIZE as _DEFAULT_RING
from ..protocol import channel_pages

__all__ = ["Report", "add_arguments", "run"]

_SYS_MODULE = "/sys/module"
#: Seconds a XenStore request may take before doctor calls the store unresponsive.
_STORE_TIMEOUT = 5.0


@dataclass
class Report:
    """The findings: ``(status, text, advice)`` lines, status ``ok``, ``info`` or
    ``PROBLEM``."""

    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.lines.append(("ok", text, ""))

    def info(self, text: str) -> None:
        self.lines.append(("info", text, ""))

    def problem(self, text: str, advice: str) -> None:
        self.lines.append(("PROBLEM", text, advice))

    @property
    def problems(self) -> int:
        return sum(1 for status, _, _ in self.lines if status == "PROBLEM")

    def render(self) -> str:
        out = []
        for status, text, advice in self.lines:
            out.append(f"{status:8} {text}")
            if advice:
                out.append(f"{'':8} advice: {advice}")
        n = self.problems
        out.append(
            "all well" if n == 0 else f"{n} problem{'s' if n > 1 else ''} found (see advice)"
        )
        return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``gntipc doctor`` takes only the global ``--backend``."""


def _why(explicit: str | None) -> str:
    if explicit is not None:
        return "--backend"
    env = os.environ.get("GNTIPC_BACKEND")
    if env:
        return f"GNTIPC_BACKEND={env}"
    if os.path.exists("/dev/xen/gntdev"):
        return "/dev/xen/gntdev exists: a Xen domain"
    return "no /dev/xen/gntdev: not a Xen domain, so the simulated hypervisor"


def _attempt(report: Report, what: str, fn: Callable[[], str], advice: str) -> bool:
    """Run one check: ``ok`` with ``fn``'s text, or a problem naming the error."""
    try:
        text = fn()
    except (GntipcError, OSError, ValueError) as exc:
        report.problem(f"{what}: {exc}", advice)
        return False
    report.ok(f"{what}: {text}" if text else what)
    return True


def _read_sys(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# ----------------------------------------------------------------------------- xen ---

_DEVICES = {
    # device: (kernel module, its use, required)
    "/dev/xen/gntdev": ("xen_gntdev", "maps the peer's pages", True),
    "/dev/xen/gntalloc": ("xen_gntalloc", "shares our pages", True),
    "/dev/xen/evtchn": ("xen_evtchn", "event channels", True),
    "/dev/xen/privcmd": ("xen_privcmd", "dom0 checks a peer's port; optional", False),
}


def _check_devices(report: Report) -> bool:
    from .. import devices

    classes = {
        "/dev/xen/gntdev": devices.Gntdev,
        "/dev/xen/gntalloc": devices.Gntalloc,
        "/dev/xen/evtchn": devices.Evtchn,
        "/dev/xen/privcmd": devices.Privcmd,
    }
    usable = True
    for path, (module, role, required) in _DEVICES.items():
        try:
            with classes[path](path):
                pass
        except (BackendUnavailable, OSError) as exc:
            if os.path.exists(path):
                advice = "run as root, or grant access to the device with a udev rule"
            else:
                advice = f"modprobe {module.replace('_', '-')} (on a Xen domain)"
            if required:
                report.problem(str(exc), advice)
                usable = False
            else:
                report.info(f"{exc} ({role})")
            continue
        report.ok(f"{path} opens ({role})")
    return usable


def _check_limits(report: Report) -> None:
    limit = _read_sys(f"{_SYS_MODULE}/xen_gntalloc/parameters/limit")
    if limit is None:
        report.info("gntalloc page limit: unknown (no /sys/module/xen_gntalloc/parameters/limit)")
    else:
        pages = channel_pages(_DEFAULT_RING, _DEFAULT_RING)
        text = (
            f"gntalloc page limit: {limit} pages for the whole domain (a vchan with two"
            f" 64 KiB rings shares {pages}: about {int(limit) // pages} such vchans)"
            if limit.isdigit()
            else f"gntalloc page limit: {limit!r}"
        )
        if limit.isdigit() and int(limit) < pages:
            report.problem(
                text,
                "raise it (as root): echo 1024 > /sys/module/xen_gntalloc/parameters/limit",
            )
        else:
            report.ok(text)
    gntdev = _read_sys(f"{_SYS_MODULE}/xen_gntdev/parameters/limit")
    if gntdev is not None:
        report.info(f"gntdev mapping limit: {gntdev} pages per open of /dev/xen/gntdev")


def _check_xen(report: Report) -> None:
    hv = _read_sys("/sys/hypervisor/type")
    report.info(f"hypervisor: {hv}" if hv else "hypervisor: unknown (no /sys/hypervisor/type)")
    devices_ok = _check_devices(report)
    _check_limits(report)
    from ..backends.xen._xenstore import XenStore

    try:
        t0 = time.monotonic()
        store = XenStore(timeout=_STORE_TIMEOUT)
    except (GntipcError, OSError) as exc:
        report.problem(
            f"XenStore: {exc}",
            "dom0: start xenstored (systemctl start xenstored, or xencommons); a domU needs"
            " /dev/xen/xenbus (the xenfs/xenbus driver)",
        )
        return
    with store:
        elapsed = (time.monotonic() - t0) * 1000
        report.ok(f"XenStore answers via {store.transport} ({elapsed:.1f} ms)")
        report.ok(f"our domain id: {store.domid} (the store's 'domid' node)")
        home = f"/local/domain/{store.domid}"
        _attempt(
            report,
            f"our store home {home}",
            lambda: "readable" if store.exists(home) else "absent",
            "the toolstack creates a domain's home; check xenstored",
        )
        if not devices_ok:
            return
        _check_backend(report, lambda: _open_xen(store), store.domid)


def _open_xen(store: object) -> Backend:
    from ..backends.xen import XenBackend

    return XenBackend(store=store)  # type: ignore[arg-type]


def _check_backend(
    report: Report,
    opener: Callable[[], Backend],
    domid: int,
    state: Callable[[Report, Backend], None] | None = None,
) -> None:
    """Open the backend (then report ``state``); allocate one event-channel port and
    share one page, to ourselves."""
    try:
        backend = opener()
    except (GntipcError, OSError, ValueError) as exc:
        report.problem(f"the backend does not open: {exc}", "see the problems above")
        return
    with backend:
        report.ok(f"the {backend.name} backend opens")
        if state is not None:
            state(report, backend)

        def port() -> str:
            with backend.alloc_unbound(domid) as p:
                return f"port {p.port} allocated and freed" if hasattr(p, "port") else "ok"

        _attempt(
            report,
            "event channel",
            port,
            "the evtchn driver refused a port: too many open (ulimit -n), or a driver problem",
        )

        def share() -> str:
            with backend.share(domid, 1):
                return "one page granted and released"

        try:
            share_text = share()
        except XenError as exc:
            advice = (
                "the domain's gntalloc limit is reached: close other vchans, carry several"
                " streams over one (gntipc.Session, gntipc proxy --mux), or raise the limit"
                if exc.errno == errno.ENOSPC
                else "the gntalloc driver refused a page"
            )
            report.problem(f"grant sharing: {exc}", advice)
        except (GntipcError, OSError) as exc:
            report.problem(f"grant sharing: {exc}", "the gntalloc driver refused a page")
        else:
            report.ok(f"grant sharing: {share_text}")


# ----------------------------------------------------------------------------- sim ---


def _check_sim(report: Report) -> None:
    from ..backends.sim import SimBackend
    from ..backends.sim._runtime import default_runtime_dir

    if os.path.exists("/dev/xen/gntdev"):
        report.info("/dev/xen/gntdev exists: this is a Xen domain, yet sim was chosen")
    path = default_runtime_dir()
    source = (
        "GNTIPC_SIM_DIR"
        if os.environ.get("GNTIPC_SIM_DIR")
        else "XDG_RUNTIME_DIR"
        if path.endswith("/gntipc-sim")
        else "the /tmp default"
    )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        report.info(f"sim runtime directory {path} ({source}): absent (no sim process runs)")
    except OSError as exc:
        report.problem(f"sim runtime directory {path}: {exc}", "fix its permissions or remove it")
    else:
        if st.st_uid != os.getuid():
            report.problem(
                f"sim runtime directory {path} belongs to uid {st.st_uid}, not to us",
                "set GNTIPC_SIM_DIR to a directory of your own",
            )
        elif stat.S_IMODE(st.st_mode) != 0o700:
            report.problem(
                f"sim runtime directory {path} has mode {stat.S_IMODE(st.st_mode):o}",
                f"chmod 700 {path}",
            )
        else:
            report.ok(f"sim runtime directory {path} ({source}): present, mode 700")
    raw = os.environ.get("GNTIPC_SIM_DOMID")
    try:
        domid = int(raw) if raw else 0
    except ValueError:
        report.problem(
            f"GNTIPC_SIM_DOMID={raw!r} is not a domain id", "set it to a number, 0..32751"
        )
        return
    report.info(f"our domain id: {domid} ({'GNTIPC_SIM_DOMID' if raw else 'the default'})")

    _check_backend(report, lambda: SimBackend(domid), domid, _sim_state)


def _sim_state(report: Report, backend: Backend) -> None:
    """Whether the sim store answers, and who else runs in the runtime directory."""
    t0 = time.monotonic()
    value = backend.store.read(f"/local/domain/{backend.domid}/domid")
    report.ok(
        f"the sim store answers ({(time.monotonic() - t0) * 1000:.1f} ms; our home's domid"
        f" node holds {value.decode(errors='replace')!r})"
    )
    runtime = getattr(backend, "_rt", None)  # the process registry (private to the sim)
    if runtime is None:
        return
    with runtime.snapshot() as db:
        rows = db.execute("SELECT pid, domid FROM procs").fetchall()
        shared = dict(db.execute("SELECT domid, COUNT(*) FROM grants GROUP BY domid").fetchall())
    others = [(int(pid), int(domid)) for pid, domid in rows if pid != os.getpid()]
    domains = sorted({int(domid) for _, domid in rows})
    listed = ", ".join(f"pid {pid} (domain {d})" for pid, d in others) or "none"
    report.info(f"sim state: domains in use {domains}; other processes: {listed}")
    limit = getattr(backend, "page_limit", None)
    if limit is not None:
        source = "GNTIPC_SIM_PAGE_LIMIT" if os.environ.get("GNTIPC_SIM_PAGE_LIMIT") else "default"
        pages = channel_pages(_DEFAULT_RING, _DEFAULT_RING)
        report.info(
            f"sim gntalloc page limit: {limit} pages per domain ({source}; a vchan with two"
            f" 64 KiB rings shares {pages})"
        )
        used = int(shared.get(backend.domid, 0))
        free = max(0, limit - used)
        report.info(
            f"grant page budget of domain {backend.domid}: {used} of {limit} pages shared"
            f" now, {free} free: {free // pages} more vchans of 64 KiB rings, or {free} of"
            " one page each (gntipc proxy --mode server sizes its rings so that"
            " --max-connections fit)"
        )


def run(args: argparse.Namespace) -> int:
    """Check everything, print the report; 0 when all is well, 3 otherwise."""
    report = Report()
    try:
        name = select_backend_name(args.backend)
    except ValueError as exc:
        report.problem(str(exc), "set GNTIPC_BACKEND to xen or sim, or unset it")
        print(report.render())
        return 3
    report.info(f"backend: {name} ({_why(args.backend)})")
    if name == "xen":
        _check_xen(report)
    else:
        _check_sim(report)
    print(report.render())
    sys.stdout.flush()
    return 0 if report.problems == 0 else 3
