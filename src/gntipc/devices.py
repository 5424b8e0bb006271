"""Pythonic handles on the Xen devices: ``/dev/xen/{gntdev,gntalloc,evtchn,privcmd}``.

The public name of the bottom half of the xen backend
(:mod:`gntipc.backends.xen._devices`, where the documentation of each class lives):
thin, checked wrappers over the ioctls, every failing call raising
:class:`gntipc.XenError`, every handle a context manager with an idempotent ``close()``.
"""

from __future__ import annotations

from ._domid import DOMID_MAX as DOMID_MAX
from ._domid import DOMID_SELF as DOMID_SELF
from .backends.xen import _devices
from .backends.xen._devices import MAX_PAGES as MAX_PAGES
from .backends.xen._devices import Evtchn as Evtchn
from .backends.xen._devices import EvtchnStatus as EvtchnStatus
from .backends.xen._devices import Gntalloc as Gntalloc
from .backends.xen._devices import GntallocShare as GntallocShare
from .backends.xen._devices import Gntdev as Gntdev
from .backends.xen._devices import GntdevMap as GntdevMap
from .backends.xen._devices import Privcmd as Privcmd

__all__ = ["DOMID_MAX", "DOMID_SELF", *_devices.__all__]
