"""The snapshots returned by the ``statistics()`` methods (trio's convention for
introspection): :class:`VchanStreamStatistics`, :class:`MessageQueueStatistics` and
:class:`SessionStatistics`.

Each is a frozen dataclass built on demand from plain integer counters that the hot
paths bump anyway (no lock, no system call, no native call of their own), so the
statistics are always on.  Counters start at zero when the object is made and only grow.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import VchanState

__all__ = [
    "EndpointCounters",
    "MessageQueueStatistics",
    "SessionStatistics",
    "VchanStreamStatistics",
]


class EndpointCounters:
    """The raw counters of one vchan endpoint, bumped on its hot paths.

    A separate slotted object, not attributes of the endpoint: an instance with more
    than about 30 attributes loses CPython's shared-key instance dict, which slows every
    attribute access on the hot path.
    """

    __slots__ = ("bytes_in", "bytes_out", "events_in", "events_out", "read_high", "write_high")

    def __init__(self) -> None:
        #: Events received and sent.
        self.events_in = 0
        self.events_out = 0
        #: Bytes read and written.
        self.bytes_in = 0
        self.bytes_out = 0
        #: The most bytes seen in use in the read and write rings (lower bounds, see
        #: :class:`VchanStreamStatistics`).
        self.read_high = 0
        self.write_high = 0


@dataclass(frozen=True, slots=True)
class VchanStreamStatistics:
    """What a :class:`gntipc.VchanStream` (its vchan endpoint) has done so far.

    The ring high-water marks are sampled from the counts that ring reads and writes
    return anyway (no extra look at the shared indices), so they are lower bounds of
    the true peaks: the receive ring's is the most bytes one read took (a read of ``n``
    bytes found at least ``n`` in the ring); the send ring's is the ring size once a
    write found the ring full, or the least fill that a refused all-or-nothing write
    (``send_nowait``, :class:`gntipc.MessageQueue`) proves, and stays 0 while every
    write fitted.
    """

    #: Bytes written to the ring we send on (accepted by the ring, not necessarily read
    #: by the peer yet).
    bytes_sent: int
    #: Bytes read from the ring we receive on.
    bytes_received: int
    #: Events (wake-ups) we sent the peer.
    events_sent: int
    #: Events (wake-ups) from the peer that we consumed.
    events_received: int
    #: Times a sender found the ring too full and had to wait for space (``send``, and
    #: ``wait_writable`` as used by :class:`gntipc.MessageQueue`).
    send_waits: int
    #: Times a receiver found the ring empty and had to wait for data.
    receive_waits: int
    #: Busy-waits on the send ring before sleeping, and how many found the space.
    send_spins: int
    send_spin_hits: int
    #: Busy-waits on the receive ring before sleeping, and how many found data.
    receive_spins: int
    receive_spin_hits: int
    #: Ring sizes in bytes.
    send_ring_size: int
    receive_ring_size: int
    #: The most bytes seen in use in each ring (at most its size; see above).
    send_ring_high_water: int
    receive_ring_high_water: int
    #: The peer's state now (``VchanState.CLOSED`` also once we closed the stream).
    peer_state: VchanState
    #: True once the peer is known to be gntipc (see ``VchanAttribute.peer_is_gntipc``).
    peer_is_gntipc: bool


@dataclass(frozen=True, slots=True)
class MessageQueueStatistics:
    """What a :class:`gntipc.MessageQueue` has done so far."""

    #: Messages written whole to the stream (a cancelled or failed put counts nothing).
    messages_sent: int
    #: Messages returned by ``get``/``get_many`` and their ``_nowait`` twins.
    messages_received: int
    #: Frame bytes (length headers included) written whole to the stream.
    bytes_sent: int
    #: Bytes received from the stream (complete frames or not).
    bytes_received: int
    #: :class:`gntipc.MalformedMessage` errors met: frames whose payload did not decode
    #: (skipped), and a frame cut off by the end of the stream.
    malformed: int
    #: The stream's own statistics (:class:`VchanStreamStatistics` for a
    #: :class:`gntipc.VchanStream`), or None for a stream without ``statistics()``.
    stream: VchanStreamStatistics | None


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """What a :class:`gntipc.Session` has done so far."""

    #: Bytes written to the underlying stream (frames, headers included).
    bytes_sent: int
    #: Bytes received from the underlying stream.
    bytes_received: int
    #: Writes to the underlying stream (the writer batches frames queued meanwhile).
    writes: int
    #: Frames received and decoded.
    frames_received: int
    #: Logical streams opened by us and by the peer since the start.
    streams_opened: int
    streams_accepted: int
    #: Logical streams open now (theirs still awaiting ``accept_stream`` included).
    streams_open: int
    #: Streams the peer opened that ``accept_stream`` has not returned yet.
    accept_backlog: int
    #: Frames queued for the writer task now.
    queued_frames: int
    #: "open", or how the session went down ("closed", "eof", "broken", "protocol").
    state: str
    #: The underlying stream's statistics (:class:`VchanStreamStatistics` for a
    #: :class:`gntipc.VchanStream`), or None for a stream without ``statistics()``.
    stream: VchanStreamStatistics | None
