"""The gntipc error tree: every exception class gntipc defines, in one module.

Everything gntipc raises on its own account derives from :class:`GntipcError`.  Stream
conditions (end of stream, a broken or closed stream, two concurrent senders) reuse
anyio's exceptions so that gntipc streams behave like every other anyio stream::

    GntipcError
    ├── BackendUnavailable
    ├── XenError (also OSError: keeps errno)
    ├── XenStoreTimeout (also TimeoutError)
    ├── MappingInUse (also BufferError)
    ├── StaleKeys
    └── ProtocolError
        ├── LocalProtocolError (also ValueError: caller misuse)
        ├── RemoteProtocolError (the peer misbehaved)
        │   └── MalformedMessage
        └── MessageTooLarge
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "BackendUnavailable",
    "GntipcError",
    "LocalProtocolError",
    "MalformedMessage",
    "MappingInUse",
    "MessageTooLarge",
    "ProtocolError",
    "RemoteProtocolError",
    "StaleKeys",
    "XenError",
    "XenStoreTimeout",
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


class XenStoreTimeout(GntipcError, TimeoutError):
    """XenStore did not answer a request in time (is xenstored running?)."""


class MappingInUse(GntipcError, BufferError):
    """A mapping cannot be closed while memoryviews or pointers into it are alive."""


class StaleKeys(GntipcError):
    """The published keys belong to a server that is gone, or that another client took
    first: a later attempt, after the keys change, may succeed."""


class ProtocolError(GntipcError):
    """The vchan protocol was violated."""


class LocalProtocolError(ProtocolError, ValueError):
    """We were asked to do something the protocol does not allow (caller misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer wrote something invalid into shared memory or the store."""


class MessageTooLarge(ProtocolError):
    """A message (its encoded payload) exceeds the queue's ``max_message_size``.

    Raised by the put methods before anything is written (the queue stays usable), and by
    the get methods for an announced frame that is too large (the queue is then closed).
    """


class MalformedMessage(RemoteProtocolError):
    """The peer sent a frame that does not decode as the expected type (the frame is
    skipped), or the stream ended in the middle of a frame."""


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
