"""Without Xen, the xen backend and the XenStore client fail clearly (no hang)."""

from __future__ import annotations

import os

import pytest

from gntipc._exceptions import BackendUnavailable
from gntipc.backends.xen._xenstore import XenStore

pytestmark = pytest.mark.no_xen  # skipped on Xen (tests/conftest.py)


def test_xen_backend_names_the_missing_device() -> None:
    from gntipc.backends.xen import XenBackend

    with pytest.raises(BackendUnavailable, match="/dev/xen/gntdev"):
        XenBackend()


def test_xenstore_unreachable(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(BackendUnavailable, match="xenstored"):
        XenStore()
    with pytest.raises(BackendUnavailable, match="nowhere"):
        XenStore(path=os.path.join(os.fspath(tmp_path), "nowhere"))


def test_silent_xenstored_times_out_instead_of_hanging(tmp_path: os.PathLike[str]) -> None:
    import socket
    import time

    from gntipc._exceptions import XenStoreTimeout

    path = os.path.join(os.fspath(tmp_path), "socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)  # accepts (in the backlog) but never answers
        start = time.monotonic()
        with pytest.raises(XenStoreTimeout, match=r"no reply within 0\.3 s") as info:
            XenStore(path=path, timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        assert 0.25 < time.monotonic() - start < 3
