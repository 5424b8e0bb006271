"""The gntipc error tree.

Everything gntipc raises on its own account derives from :class:`GntipcError`.  Stream
conditions (end of stream, a broken or closed stream, two concurrent senders) reuse
anyio's exceptions so that gntipc streams behave like every other anyio stream.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "BackendUnavailable",
    "GntipcError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "XenError",
    "raise_errno",
]


class GntipcError(Exception):
    """Base class of every error gntipc raises itself."""


class BackendUnavailable(GntipcError):
    """The requested backend cannot be used here (e.g. a ``/dev/xen/*`` device is missing).

    The message says exactly what is missing.
    """


class XenError(GntipcError, OSError):
    """A device, hypercall or store operation failed with an errno.

    It is an :class:`OSError`, so ``exc.errno`` and ``exc.strerror`` are set and
    ``except OSError`` catches it.
    """


class ProtocolError(GntipcError):
    """The vchan protocol was violated."""


class LocalProtocolError(ProtocolError, ValueError):
    """We were asked to do something the protocol does not allow (caller misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer wrote something invalid into shared memory or the store."""


def raise_errno(err: int, what: str) -> None:
    """Raise the :class:`XenError` for ``err`` while doing ``what``.

    The one place where an errno becomes an exception.
    """
    if err == _errno.ENOSPC and "gntalloc" in what:
        hint = (
            " (the gntalloc page limit of this domain is exhausted: close channels or raise"
            " the limit, /sys/module/xen_gntalloc/parameters/limit)"
        )
    else:
        hint = ""
    raise XenError(err, f"{what}: {os.strerror(err)}{hint}")
