"""gntipc: async shared-memory IPC between Xen VMs (libxenvchan-compatible vchan rings),
with a simulated hypervisor for hosts without Xen.

The public surface, re-exported from private modules::

    listener = await gntipc.listen(peer, path)       # Listener
    stream = await listener.accept()                 # VchanStream (anyio ByteStream)
    stream = await gntipc.connect(peer, path, timeout=5)
    queue = gntipc.MessageQueue(stream, MyStruct)    # typed messages (msgspec)
    bulk = await gntipc.open_bulk(stream)            # zero-copy loans (BulkChannel)
    stream = gntipc.ResumableStream.client(connect)  # survives broken transports
"""

from __future__ import annotations

from ._exceptions import BackendUnavailable as BackendUnavailable
from ._exceptions import GntipcError as GntipcError
from ._exceptions import LocalProtocolError as LocalProtocolError
from ._exceptions import MalformedMessage as MalformedMessage
from ._exceptions import MappingInUse as MappingInUse
from ._exceptions import MessageTooLarge as MessageTooLarge
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RemoteProtocolError as RemoteProtocolError
from ._exceptions import StaleKeys as StaleKeys
from ._exceptions import XenError as XenError
from ._exceptions import XenStoreTimeout as XenStoreTimeout
from ._stats import MessageQueueStatistics as MessageQueueStatistics
from ._stats import SessionStatistics as SessionStatistics
from ._stats import VchanStreamStatistics as VchanStreamStatistics
from .backends import get_backend as get_backend
from .bulk import BulkChannel as BulkChannel
from .bulk import BulkLoan as BulkLoan
from .bulk import BulkMessage as BulkMessage
from .bulk import BulkQueue as BulkQueue
from .bulk import BulkView as BulkView
from .bulk import SyncBulkChannel as SyncBulkChannel
from .bulk import SyncBulkQueue as SyncBulkQueue
from .bulk import open_bulk as open_bulk
from .bulk import open_bulk_queue as open_bulk_queue
from .bulk import open_bulk_queue_sync as open_bulk_queue_sync
from .bulk import open_bulk_sync as open_bulk_sync
from .channel import Vchan as Vchan
from .messages import MessageQueue as MessageQueue
from .protocol import VchanState as VchanState
from .resume import ResumableListener as ResumableListener
from .resume import ResumableStream as ResumableStream
from .resume import ResumeStatistics as ResumeStatistics
from .resume import ResumeTicket as ResumeTicket
from .resume import SessionLost as SessionLost
from .resume import SessionRefused as SessionRefused
from .session import Session as Session
from .session import SessionStream as SessionStream
from .streams import Listener as Listener
from .streams import VchanAttribute as VchanAttribute
from .streams import VchanStream as VchanStream
from .streams import connect as connect
from .streams import listen as listen
from .vm import VmListener as VmListener
from .vm import listen_vm as listen_vm

__all__ = [
    "BackendUnavailable",
    "BulkChannel",
    "BulkLoan",
    "BulkMessage",
    "BulkQueue",
    "BulkView",
    "GntipcError",
    "Listener",
    "LocalProtocolError",
    "MalformedMessage",
    "MappingInUse",
    "MessageQueue",
    "MessageQueueStatistics",
    "MessageTooLarge",
    "ProtocolError",
    "RemoteProtocolError",
    "ResumableListener",
    "ResumableStream",
    "ResumeStatistics",
    "ResumeTicket",
    "Session",
    "SessionLost",
    "SessionRefused",
    "SessionStatistics",
    "SessionStream",
    "StaleKeys",
    "SyncBulkChannel",
    "SyncBulkQueue",
    "Vchan",
    "VchanAttribute",
    "VchanState",
    "VchanStream",
    "VchanStreamStatistics",
    "VmListener",
    "XenError",
    "XenStoreTimeout",
    "connect",
    "get_backend",
    "listen",
    "listen_vm",
    "open_bulk",
    "open_bulk_queue",
    "open_bulk_queue_sync",
    "open_bulk_sync",
]

__version__ = "0.1.0"
