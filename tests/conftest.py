"""Shared fixtures: an isolated sim runtime dir, the backend parametrisation (the one
``backend`` fixture of the suite), the one ``HAVE_XEN``, and the sim leak check after
every test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

import gntipc
from gntipc.backends import Backend

#: The only place that asks whether this is Xen: every test that needs it is marked
#: ``xen`` and skipped here without it (pytest_collection_modifyitems).
HAVE_XEN = os.path.exists("/dev/xen/gntdev")
NO_XEN = "no /dev/xen/gntdev: not running on Xen"

#: Use as ``@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)`` or through the
#: ``backend_name`` fixture below.
BACKEND_PARAMS = [
    pytest.param("sim", id="sim"),
    pytest.param("xen", id="xen", marks=pytest.mark.xen),
]

# A short private runtime dir for the whole run (AF_UNIX paths are limited to 108
# bytes), inherited by every child process a test starts.
_SIM_PARENT = tempfile.mkdtemp(prefix="gntipc-t")
os.environ["GNTIPC_SIM_DIR"] = os.path.join(_SIM_PARENT, "sim")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SIM_PARENT, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "no_xen: only where Xen is absent (what fails without it); skipped on Xen"
    )


#: On Xen, the async tests run under trio only in these modules: the ones about how an
#: event loop meets the real devices (the event channel's fd waking a task across
#: processes, the fast paths' spin-then-block, the async XenStore watch, the listener).
#: Elsewhere the code under test does the same under either loop, and trio runs it on sim
#: (the xen-only modules' checks too: dom0<->domU runs the published suites, which run on
#: sim under trio); this keeps the emulated Xen suite, most of CI's time, within budget.
#: ``GNTIPC_XEN_TRIO=all`` runs every trio test on Xen too.
TRIO_ON_XEN = frozenset(
    {
        "tests/streams/test_crossproc.py",
        "tests/streams/test_fast_paths.py",
        "tests/streams/test_async_store.py",
        "tests/streams/test_listener.py",
    }
)

TRIO_ON_XEN_SKIPPED = "trio on Xen runs in TRIO_ON_XEN's modules (GNTIPC_XEN_TRIO=all: all)"


def _trio_on_xen_skipped(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None or callspec.params.get("anyio_backend") != "trio":
        return False
    if item.get_closest_marker("xen") is None or os.environ.get("GNTIPC_XEN_TRIO") == "all":
        return False
    return item.nodeid.split("::", 1)[0] not in TRIO_ON_XEN


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``xen`` (the mark, a parameter's mark or a module's ``pytestmark``)
    is skipped, with the reason, where there is no Xen; one marked ``no_xen`` on Xen; a
    trio test on Xen outside :data:`TRIO_ON_XEN`, unless ``GNTIPC_XEN_TRIO=all``."""
    for item in items:
        if not HAVE_XEN and item.get_closest_marker("xen") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_XEN))
        if HAVE_XEN and item.get_closest_marker("no_xen") is not None:
            item.add_marker(pytest.mark.skip(reason="only meaningful where Xen is absent"))
        if HAVE_XEN and _trio_on_xen_skipped(item):
            item.add_marker(pytest.mark.skip(reason=TRIO_ON_XEN_SKIPPED))


@pytest.fixture(params=BACKEND_PARAMS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """``"sim"`` and ``"xen"`` (skipped with a reason without /dev/xen/gntdev)."""
    return str(request.param)


@pytest.fixture
def backend(backend_name: str) -> Iterator[Backend]:
    """This process's backend of ``backend_name``, closed after the test: domain 0 on
    sim (whatever ``GNTIPC_SIM_DOMID`` says), this domain on Xen."""
    opened = (
        gntipc.get_backend("sim", domid=0)
        if backend_name == "sim"
        else gntipc.get_backend(backend_name)
    )
    with opened as b:
        yield b


@pytest.fixture(autouse=True)
def _sim_leak_check() -> Iterator[None]:
    """Fail a test that leaves sim state behind (its own, or of processes it killed)."""
    yield
    from gntipc.backends.sim import assert_cleaned_up

    assert_cleaned_up()
