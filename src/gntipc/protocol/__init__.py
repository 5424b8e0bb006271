"""The sans-I/O vchan protocol: wire layout and ring state.  No fds, no waits.

``_layout`` is the one source of the wire format (offsets, live and notify values, ring
orders and sizes); ``ring`` keeps one endpoint's ring state.  Code outside this package
imports from here, never from the private modules.
"""

from __future__ import annotations

from . import _layout
from ._layout import CONTROL_PAGE_SIZE as CONTROL_PAGE_SIZE
from ._layout import DEFAULT_RING_SIZE as DEFAULT_RING_SIZE
from ._layout import EOF_BIT as EOF_BIT
from ._layout import LIVE_CONNECTED as LIVE_CONNECTED
from ._layout import LIVE_GONE as LIVE_GONE
from ._layout import LIVE_WAITING as LIVE_WAITING
from ._layout import MAX_ORDER as MAX_ORDER
from ._layout import MAX_RING_SIZE as MAX_RING_SIZE
from ._layout import MIN_ORDER as MIN_ORDER
from ._layout import MIN_RING_SIZE as MIN_RING_SIZE
from ._layout import NOTIFY_READ as NOTIFY_READ
from ._layout import NOTIFY_WRITE as NOTIFY_WRITE
from ._layout import OFF_CLI_LIVE as OFF_CLI_LIVE
from ._layout import OFF_CLI_NOTIFY as OFF_CLI_NOTIFY
from ._layout import OFF_GRANTS as OFF_GRANTS
from ._layout import OFF_LEFT_CONS as OFF_LEFT_CONS
from ._layout import OFF_LEFT_ORDER as OFF_LEFT_ORDER
from ._layout import OFF_LEFT_PROD as OFF_LEFT_PROD
from ._layout import OFF_RIGHT_CONS as OFF_RIGHT_CONS
from ._layout import OFF_RIGHT_ORDER as OFF_RIGHT_ORDER
from ._layout import OFF_RIGHT_PROD as OFF_RIGHT_PROD
from ._layout import OFF_SRV_LIVE as OFF_SRV_LIVE
from ._layout import OFF_SRV_NOTIFY as OFF_SRV_NOTIFY
from ._layout import Geometry as Geometry
from ._layout import VchanState as VchanState
from ._layout import check_ring_size as check_ring_size
from ._layout import choose_orders as choose_orders
from ._layout import order_for_size as order_for_size
from .ring import VchanRings as VchanRings

# The wire format's names (listed once, in _layout.__all__) and the ring state.
__all__ = [*_layout.__all__, "VchanRings"]
