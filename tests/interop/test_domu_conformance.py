"""The conformance suites of :mod:`gntipc.testing` (byte stream, message queue,
session) across domains, on real Xen: every check runs here (asyncio and trio) over a
pair whose bytes go dom0 -> domU -> dom0 through real grants and event channels.

The suites need both ends of a stream in this process, so a relay runs in one PV domU
(``_domu_relay.py``, booted once for the module): our end A connects to the relay (the
domU is the *server* of that channel), the relay connects back to a listener of ours (the
domU is the *client* of that channel), and it forwards bytes, EOF and breakage both
ways.  The stream maker the suites get, ``relayed_pair``, makes (A, B): two
:class:`gntipc.VchanStream` that behave as the two ends of one byte stream.

Two tests of our own check what the relay cannot pass on by itself: each channel's
attributes (peers, homes, ring sizes: both domains' grants are in use) and that a closed
end breaks the far end's sends.

``tests/streams/test_stream_conformance.py`` is not run here: its tests are about one
channel's own mechanics with both of its ends in the test (ring capacity and
``send_progress`` when the ring is full, the all-or-nothing ``*_nowait`` twins,
``receive(2)`` returning exactly what one ``send`` wrote), which a relay in between does
not preserve; the cross-domain channels themselves are covered by ``test_domu.py``.

The same tests also run with the relay in a process playing domain 5 on the sim backend
(no Xen needed, a few seconds): that checks the relay itself wherever the suite runs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import gntipc
from gntipc.backends import Backend
from gntipc.testing import (
    BYTE_STREAM_CHECKS,
    MESSAGE_QUEUE_CHECKS,
    SESSION_CHECKS,
    check_byte_stream,
    check_message_queue,
    check_session,
)

from ._util import Proc
from .test_domu import XQ_DOMU, _is_dom0, _xl, shipped_files

HERE = Path(__file__).parent
RELAY = HERE / "_domu_relay.py"
#: Seconds for one relayed pair to be set up (a domU's python is slow under emulation).
SETUP_TIMEOUT = 120
#: The relay's ring sizes (A -> relay, relay -> A): a ring inside the control page (2 KiB:
#: the smallest beside a separate ring; it wraps every 2 KiB) and the largest (256 pages
#: granted by one domain, mapped by the other); the channel the relay connects to has the
#: default 64 KiB rings.  One ring configuration: under emulation each costs 1-2 minutes.
RELAY_RINGS = (2048, 1 << 20)
#: The simulated domain of the sim relay process.
SIM_RELAY_DOMID = 5
_pair_numbers = itertools.count()

pytestmark = pytest.mark.anyio

Pair = tuple[anyio.abc.ByteStream, anyio.abc.ByteStream]


@dataclass
class Relay:
    """A running relay: its domain, the path it listens at, how to open our backend."""

    domid: int
    path: str
    open_backend: Callable[[], Backend]
    #: The relay's output so far (printed when a test fails).
    output: Callable[[], str]
    #: Why a pair could not be set up: the later tests fail at once instead of waiting.
    broken: str | None = None


def _wait_for_line(output: Callable[[], str], line: str, timeout: float) -> None:
    """Return once ``line`` is in the output; AssertionError after ``timeout`` seconds or
    as soon as the output shows a Python traceback (the relay died)."""
    deadline = time.monotonic() + timeout
    while line not in (text := output()):
        if time.monotonic() > deadline or "Traceback (most recent call last)" in text:
            raise AssertionError(f"the relay did not print {line!r}:\n{text}")
        time.sleep(0.2)  # polling a console log file: nothing to wait on


@contextlib.contextmanager
def _domu_relay() -> Iterator[Relay]:
    """The relay in a PV domU (skips unless this is dom0 of a Xen host with xl)."""
    if not _is_dom0():  # without Xen at all, the "domU" parameter's mark skips
        pytest.skip("not dom0 on Xen: cannot start domUs")
    xl = _xl()
    name = f"gntipcrelay{os.getpid() % 100000}"
    path = f"data/vchan/gntipc-relay-{os.getpid()}"
    files, pythonpath = shipped_files()
    cmd = (
        f"PYTHONPATH={':'.join(pythonpath)} PYTHONDONTWRITEBYTECODE=1"
        f" python3 -X faulthandler {RELAY} 0 {path} {RELAY_RINGS[0]} {RELAY_RINGS[1]}"
    )
    argv = ["sh", str(XQ_DOMU), "start", name, "--python", "--mem", "320", "--file", str(RELAY)]
    for f in files:
        argv += ["--file", f]
    r = subprocess.run([*argv, "--", cmd], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"xq-domu.sh start failed:\n{r.stdout}\n{r.stderr}"
    log = Path(f"/var/log/xen/console/guest-{name}.log")

    def output() -> str:
        with contextlib.suppress(OSError):
            return log.read_text(errors="replace")
        return ""

    try:
        _wait_for_line(output, "RELAYING", 300)
        yield Relay(int(r.stdout.split()[-1]), path, lambda: gntipc.get_backend("xen"), output)
    finally:
        subprocess.run([xl, "destroy", name], capture_output=True, timeout=120)


@contextlib.contextmanager
def _sim_relay() -> Iterator[Relay]:
    """The relay in a process playing another domain on the sim backend."""
    env = dict(os.environ, GNTIPC_BACKEND="sim", GNTIPC_SIM_DOMID=str(SIM_RELAY_DOMID))
    src = str(Path(gntipc.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    path = f"data/gntipc-relay-{os.getpid()}"
    proc = Proc([sys.executable, str(RELAY), "0", path, *map(str, RELAY_RINGS)], env=env)
    try:
        proc.expect("RELAYING", timeout=60)
        yield Relay(SIM_RELAY_DOMID, path, lambda: gntipc.get_backend("sim", domid=0), proc.output)
    finally:
        proc.kill()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("domU", marks=pytest.mark.xen),
        pytest.param("sim-process"),
    ],
)
def relay(request: pytest.FixtureRequest) -> Iterator[Relay]:
    """One relay for the module (booting a domU costs tens of seconds under emulation)."""
    start = _domu_relay if request.param == "domU" else _sim_relay
    with start() as r:
        yield r


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _tell(relay: Relay) -> None:
    """Print the relay's last lines (its side of a failure; pytest shows them)."""
    print("the relay said (last lines):\n" + "\n".join(relay.output().splitlines()[-40:]))


@contextlib.asynccontextmanager
async def relayed_pair(relay: Relay) -> AsyncIterator[Pair]:
    """(A, B): our client end of a channel served by the relay, and our server end of
    the channel the relay connected to; closed afterwards."""
    if relay.broken is not None:
        pytest.fail(f"an earlier pair could not be set up: {relay.broken}")
    backend = relay.open_backend()
    made: list[gntipc.VchanStream] = []
    try:
        target = f"{relay.path}-{next(_pair_numbers)}"
        header = target.encode()
        try:
            with anyio.fail_after(SETUP_TIMEOUT):
                async with await gntipc.listen(relay.domid, target, backend=backend) as listener:
                    made.append(
                        await gntipc.connect(
                            relay.domid, relay.path, timeout=SETUP_TIMEOUT, backend=backend
                        )
                    )
                    await made[0].send(len(header).to_bytes(2, "big") + header)
                    made.append(await listener.accept())
        except Exception as exc:
            relay.broken = f"{type(exc).__name__}: {exc}"
            _tell(relay)
            raise
        try:
            yield made[0], made[1]
        except BaseException:
            _tell(relay)
            raise
    finally:
        for stream in made:
            await stream.aclose()
        backend.close()


async def test_each_channel_crosses_the_domain_boundary(relay: Relay) -> None:
    """What each end knows of its own channel: the relay's domain is the peer of both,
    the server end of A is in the relay's home, B's in ours; the relay's rings."""
    async with relayed_pair(relay) as (a, b):
        with anyio.fail_after(60):
            await a.send(b"ping")
            assert await b.receive() == b"ping"
            await b.send(b"pong")
            assert await a.receive() == b"pong"
        attr = gntipc.VchanAttribute
        for end, server in ((a, relay.domid), (b, 0)):  # we are dom0 (sim: domain 0)
            assert end.extra(attr.peer_domid) == relay.domid
            assert end.extra(attr.path).startswith(f"/local/domain/{server}/")
            assert end.extra(attr.peer_is_gntipc)
        assert not a.extra(attr.is_server) and b.extra(attr.is_server)
        assert (a.extra(attr.write_size), a.extra(attr.read_size)) == RELAY_RINGS


@pytest.mark.parametrize("closing", ["A", "B"])
async def test_a_closed_end_breaks_the_far_ends_sends(relay: Relay, closing: str) -> None:
    """One end closes: the other reads the end of the stream, and its sends then fail
    (BrokenResourceError), as on one channel: the relay's send to the closed end fails
    in the other domain, and it closes the channel of the end that is left."""
    async with relayed_pair(relay) as (a, b):
        gone, left = (a, b) if closing == "A" else (b, a)
        await gone.send(b"bye")
        await gone.aclose()
        with anyio.fail_after(60):
            assert await BufferedByteReceiveStream(left).receive_exactly(3) == b"bye"
            with pytest.raises(anyio.EndOfStream):
                await left.receive()
            with pytest.raises(anyio.BrokenResourceError):
                while True:
                    await left.send(b"anyone there?")


def _skip_slow(relay: Relay, check: str) -> None:
    if relay.domid != SIM_RELAY_DOMID and check == "receive_returns_at_most_max_bytes[1]":
        pytest.skip(
            "20000 receive(1) calls take 10-30 s in dom0 under emulation, too close to the"
            " check's 60 s deadline; max_bytes is the receiver's own rule, run with 7 and up"
        )


# The suites, one check per test (both ends are VchanStreams: put_nowait works, and a
# cancelled put reports its progress).
@pytest.mark.parametrize("check", BYTE_STREAM_CHECKS)
async def test_byte_stream(relay: Relay, check: str) -> None:
    _skip_slow(relay, check)
    await check_byte_stream(lambda: relayed_pair(relay), checks=[check])


@pytest.mark.parametrize("check", MESSAGE_QUEUE_CHECKS)
async def test_message_queue(relay: Relay, check: str) -> None:
    await check_message_queue(lambda: relayed_pair(relay), checks=[check])


@pytest.mark.parametrize("check", SESSION_CHECKS)
async def test_session(relay: Relay, check: str) -> None:
    await check_session(lambda: relayed_pair(relay), checks=[check])
