"""The ``xen`` backend: real grants, event channels and XenStore of a Xen domain.

One layer per private module, bottom up:

``_devices``
    Checked handles on ``/dev/xen/{gntdev,gntalloc,evtchn,privcmd}``: every ioctl of
    :mod:`gntipc._native`, errno turned into :class:`gntipc.XenError`.  Public as
    :mod:`gntipc.devices`.
``_xenstore_codec``
    The sans-I/O codec of the XenStore wire protocol (headers, payloads, replies,
    errors, permission lists, watch events, the payload limit).
``_xenstore``
    The XenStore client over it: a connection over the xenstored socket or
    ``/dev/xen/xenbus``, with transactions and watches.
``_backend``
    :class:`XenBackend`: the :class:`gntipc.backends.Backend` interface over the two
    (one evtchn handle per port, as libxenvchan; fork safety).
"""

from ._backend import XenBackend as XenBackend

__all__ = ["XenBackend"]
