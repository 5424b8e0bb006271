"""The native core: cffi's ``ffi`` and ``lib`` of ``gntipc._native._lib``, and :func:`check_rc`.

``lib`` keeps the kernel's names (``lib.IOCTL_GNTDEV_MAP_GRANT_REF``,
``ffi.sizeof("struct ioctl_gntdev_map_grant_ref")``) and adds the syscall helpers
(``gnt_ioctl``, ``gnt_mmap``, ...) and the ring primitives (``gnt_ring_*``).  Calls
release the GIL (cffi API mode).  errno becomes an exception here and nowhere else.
"""

from __future__ import annotations

import errno
from typing import Any

from .._exceptions import BackendUnavailable, raise_errno

try:
    from ._lib import ffi as _ffi
    from ._lib import lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise BackendUnavailable(
        "the gntipc native module is not built: reinstall the package "
        "(pip install -e .) with a C compiler available"
    ) from exc

__all__ = ["check_rc", "ffi", "lib"]

#: cffi's FFI instance of the module (typed loosely: cffi has no stubs).
ffi: Any = _ffi
#: The compiled library: constants, struct helpers, syscall helpers, ring primitives.
lib: Any = _lib


def check_rc(rc: int, what: str) -> int:
    """Return ``rc`` if it is >= 0; otherwise raise the error of the current errno.

    Call it right after the native call that produced ``rc`` (cffi saves errno per call
    in the calling thread, so nothing in between may clobber it).

    Raises:
        XenError: ``rc`` < 0; ``errno`` is the saved errno, the message says ``what``.
    """
    if rc < 0:
        err = ffi.errno
        raise_errno(err if err else errno.EIO, what)  # EIO: failed without an errno
    return rc
