"""Shared fixtures: an isolated sim runtime dir, the backend parametrisation, and the
sim leak check after every test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

HAVE_XEN = os.path.exists("/dev/xen/gntdev")

#: Use as ``@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)`` or through the
#: ``backend_name`` fixture below.
BACKEND_PARAMS = [
    pytest.param("sim", id="sim"),
    pytest.param(
        "xen",
        id="xen",
        marks=[
            pytest.mark.xen,
            pytest.mark.skipif(not HAVE_XEN, reason="no /dev/xen/gntdev: not running on Xen"),
        ],
    ),
]

# A short private runtime dir for the whole run (AF_UNIX paths are limited to 108
# bytes), inherited by every child process a test starts.
_SIM_PARENT = tempfile.mkdtemp(prefix="gntipc-t")
os.environ["GNTIPC_SIM_DIR"] = os.path.join(_SIM_PARENT, "sim")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SIM_PARENT, ignore_errors=True)


@pytest.fixture(params=BACKEND_PARAMS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """``"sim"`` and ``"xen"`` (skipped with a reason without /dev/xen/gntdev)."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _sim_leak_check() -> Iterator[None]:
    """Fail a test that leaves sim state behind (its own, or of processes it killed)."""
    yield
    from gntipc.backends.sim import assert_cleaned_up

    assert_cleaned_up()
