"""The sans-I/O protocols: vchan wire layout and ring state, message framing, session
multiplexing.  No fds, no waits, no event loop: bytes in, messages or events out.

``_layout`` is the one source of the vchan wire format (offsets, live and notify values,
ring orders and sizes); ``ring`` keeps one endpoint's ring state; ``framing`` frames
typed messages (:class:`MessageFramer`, used by :class:`gntipc.MessageQueue`); ``mux``
encodes and decodes session frames (:class:`SessionDecoder`, used by
:class:`gntipc.Session`); ``bulk`` is the zero-copy pool's descriptor protocol
(:class:`BulkProtocol`, used by :class:`gntipc.BulkChannel`); ``resume`` numbers, acks
and replays records across broken transports (:class:`ResumeState`, used by
:class:`gntipc.ResumableStream`).  Code outside this package imports from here (or from
the public ``mux``, ``bulk`` and ``resume`` for their frame-level names), never from the
private modules.
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
from ._layout import channel_pages as channel_pages
from ._layout import check_ring_size as check_ring_size
from ._layout import choose_orders as choose_orders
from ._layout import fit_ring_sizes as fit_ring_sizes
from ._layout import order_for_size as order_for_size
from .bulk import BulkProtocol as BulkProtocol
from .framing import BATCH_FLAG as BATCH_FLAG
from .framing import DECODE_AHEAD as DECODE_AHEAD
from .framing import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
from .framing import FRAME_HEADER_SIZE as FRAME_HEADER_SIZE
from .framing import MAX_MESSAGE_SIZE_LIMIT as MAX_MESSAGE_SIZE_LIMIT
from .framing import NEED_DATA as NEED_DATA
from .framing import MessageFramer as MessageFramer
from .framing import NeedData as NeedData
from .mux import FrameType as FrameType
from .mux import MuxEvent as MuxEvent
from .mux import SessionDecoder as SessionDecoder
from .resume import ResumeState as ResumeState
from .ring import VchanRings as VchanRings

# The wire format's names (listed once, in _layout.__all__), the ring state, the message
# framing; the session codec's names (events, encoders, limits) are in .mux, the bulk
# pool's in .bulk, the resumable records' in .resume.
__all__ = [
    *_layout.__all__,
    "BATCH_FLAG",
    "DECODE_AHEAD",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FRAME_HEADER_SIZE",
    "MAX_MESSAGE_SIZE_LIMIT",
    "NEED_DATA",
    "BulkProtocol",
    "FrameType",
    "MessageFramer",
    "MuxEvent",
    "NeedData",
    "ResumeState",
    "SessionDecoder",
    "VchanRings",
]
