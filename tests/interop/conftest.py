"""Fixtures for the interop tests against Debian's libxenvchan and for dom0<->domU tests.

They run only on real Xen (``make test-xen``): every test here is marked ``xen``.  The C
peer (``vchan_peer.c``, our own code against ``<libxenvchan.h>``) is compiled once per
session into a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import gntipc
from gntipc.backends import Backend

from ._util import Proc

HERE = Path(__file__).parent
HAVE_LIBXENVCHAN = os.path.exists("/usr/include/libxenvchan.h")

#: ``pytestmark`` of every test module here: real Xen only (skipped without it by
#: tests/conftest.py).
XEN_ONLY = [pytest.mark.xen]


@pytest.fixture(scope="session")
def vchan_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled C peer (skips when libxenvchan's header or gcc is missing)."""
    if not HAVE_LIBXENVCHAN:
        pytest.skip("no /usr/include/libxenvchan.h (apt-get install libxen-dev)")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc to build the libxenvchan peer")
    exe = tmp_path_factory.mktemp("vchan_peer") / "vchan_peer"
    subprocess.run(
        [gcc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(HERE / "vchan_peer.c"), "-lxenvchan"],
        check=True,
    )
    return exe


@pytest.fixture
def xen() -> Iterator[Backend]:
    """The xen backend of this domain (dom0 in ``make test-xen``)."""
    backend = gntipc.get_backend("xen")
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; killed after it (whatever happened)."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()
