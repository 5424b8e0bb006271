"""One end of a vchan: its pages, rings, event port and liveness, and the wait protocol.

An :class:`Endpoint` is made by the rendezvous (:mod:`gntipc._connect`) and used by
the sync facade (:class:`gntipc.Vchan`) and the async streams.  Everything here is
non-waiting; the waiting is done by whoever owns the endpoint's descriptor
(:meth:`Endpoint.fileno`): the blocking waiter of the sync API or the async dispatcher.

**The wait protocol**, written once, in :meth:`Endpoint.poll_read` and
:meth:`Endpoint.poll_write`: check the ring; if the condition does not hold, ask the peer
for a notification (set the bit in its notify byte, full fence), then re-check the ring
*and* the peer's liveness and EOF.  Only if that re-check fails may the caller wait for
an event; the event cannot be lost, because the peer tests the bit after moving its
index (and closes always notify), and an event masks the port until
:meth:`handle_events` consumes it.

**Closing from any thread**: every operation runs under its direction's lock (one for
reading, one for writing, one for event handling) and checks :attr:`closed` under it.
:meth:`close` marks the endpoint closed, wakes every waiter (an eventfd in the
endpoint's epoll), waits for threads blocked in :meth:`wait_fd` to leave, then takes all
three locks, so in-flight operations finish first, and only then unmaps the memory.  (An
event a call sends after releasing its lock finds the port gone and is skipped: the
close told the peer.)  The teardown releases everything it can even when one release
fails, and keeps what it could not release for a later :meth:`close`.

Liveness: a reader checks the peer's live byte and EOF bit **first**, then drains, so no
byte written before a close or a crash is lost.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from ._domid import check_domid
from ._exceptions import LocalProtocolError, StaleKeys, XenError
from ._keys import Presence, publish_keys, resolve_path, unpublish_keys
from ._native import ffi
from ._spin import Spinner
from ._stats import EndpointCounters
from .backends._abc import Backend, EventPort, Pages
from .protocol import (
    CONTROL_PAGE_SIZE,
    LIVE_CONNECTED,
    LIVE_GONE,
    LIVE_WAITING,
    NOTIFY_WRITE,
    OFF_CLI_LIVE,
    OFF_CLI_NOTIFY,
    OFF_SRV_LIVE,
    Geometry,
    VchanRings,
    choose_orders,
)

__all__ = ["Endpoint"]

# How long close() waits for threads blocked in wait_fd() to notice the wake-up.
_CLOSE_GRACE = 5.0

# The control pages this process's servers offer, by (pid, our domid, grant ref): a
# client that maps one of them is in the same process as its server (the pid: a forked
# child inherits this table, not the servers).
_OFFERED: weakref.WeakValueDictionary[tuple[int, int, int], Endpoint] = (
    weakref.WeakValueDictionary()
)


class Endpoint:
    """One end of a vchan (see the module docstring).  Made by :meth:`server` or
    :meth:`client`.

    Thread-safety: one reader and one writer (threads or tasks) at a time, plus
    :meth:`close` from anywhere.
    """

    backend: Backend
    peer: int
    path: str
    is_server: bool
    read_size: int
    write_size: int
    #: Tests only: called as ``hook(point, direction)`` at each point of the wait
    #: protocol's window ("checked", "prepared", "waiting"; "read" or "write"), so that
    #: a test can make the peer act exactly there.
    window_hook: Callable[[str, str], None] | None = None

    def __init__(self, backend: Backend, peer: int, path: str, *, is_server: bool) -> None:
        self.backend = backend
        self.peer = peer
        self.path = path
        self.is_server = is_server
        self.read_size = self.write_size = 0
        self.closed = False
        self.eof_sent = False
        self._peer_dead = False
        self._connected = not is_server
        self._peer_gntipc = False
        #: True when the peer endpoint is in this process (both ends of a loopback pair,
        #: found when the client maps its server's control page; see _OFFERED): it runs
        #: only when we return to the event loop or release the GIL, never while we spin.
        self.peer_in_process = False
        self._offered: tuple[int, int, int] | None = None
        # Where the ring we read lies: its pages and its offset in them (read_view).
        self._read_pages: Pages | None = None
        self._read_offset = 0
        # Store work found due by consume_events(), done by check_presence().
        self._vanish_due = False
        self._connect_due = False
        self._port: EventPort | None = None
        self._pages: list[Pages] = []
        self._ptrs: list[Any] = []
        self._rings: VchanRings | None = None
        self._presence: Presence | None = None
        self._published_ref: int | None = None
        self._torn_down = False  # everything released (a close() may still be retried)
        self._epoll: select.epoll | None = None
        self._wake_fd = -1
        self._rlock = threading.Lock()
        self._wlock = threading.Lock()
        self._evlock = threading.Lock()
        self._state = threading.Condition()  # guards _pollers, _connected's transition
        self._pollers = 0
        #: Events, bytes and ring high-water marks (statistics).
        self.counters = EndpointCounters()

    # ------------------------------------------------------------------ setup ---
    @classmethod
    def server(
        cls,
        backend: Backend,
        peer: int,
        path: str,
        *,
        read_size: int,
        write_size: int,
        start_index: int = 0,
    ) -> Endpoint:
        """Offer a channel to domain ``peer`` at store ``path`` (relative to our home).

        Raises:
            LocalProtocolError: a bad path or a ring size above 1 MiB.
            XenError: the backend refused (e.g. ENOSPC: the gntalloc page limit).
        """
        check_domid(peer)
        left, right = choose_orders(read_size, write_size)
        geometry = Geometry.from_orders(left, right, remote=False)
        self = cls(backend, peer, resolve_path(backend.domid, path), is_server=True)
        try:
            self._setup_server(geometry, start_index & 0xFFFFFFFF)
        except BaseException:
            self._teardown()
            raise
        return self

    def _setup_server(self, geometry: Geometry, start: int) -> None:
        backend, peer = self.backend, self.peer
        port = self._port = backend.alloc_unbound(peer)
        ctrl = backend.share(peer, 1)
        self._pages.append(ctrl)
        ctrl.set_unmap_notify(OFF_SRV_LIVE, clear_byte=True, port=port)
        self._offered = (os.getpid(), backend.domid, ctrl.refs[0])
        _OFFERED[self._offered] = self
        left = right = None
        if geometry.left_pages:
            left = backend.share(peer, geometry.left_pages)
            self._pages.append(left)
        if geometry.right_pages:
            right = backend.share(peer, geometry.right_pages)
            self._pages.append(right)
        page = ctrl.mapping.view()
        try:
            page[:CONTROL_PAGE_SIZE] = bytes(CONTROL_PAGE_SIZE)
            if start:
                for off in (0, 4, 8, 12):
                    page[off : off + 4] = start.to_bytes(4, "little")
            geometry.write_to(page)
            geometry.write_grants(page, left.refs if left else (), right.refs if right else ())
            page[OFF_CLI_LIVE] = LIVE_WAITING
            page[OFF_SRV_LIVE] = LIVE_CONNECTED
            page[OFF_CLI_NOTIFY] = NOTIFY_WRITE
        finally:
            page.release()
        ctrl_ptr = self._pointer(ctrl)
        read_ptr = self._pointer(left) if left else ctrl_ptr + geometry.left_offset
        self._read_pages, self._read_offset = (
            (left, 0) if left else (ctrl, geometry.left_offset or 0)
        )
        write_ptr = self._pointer(right) if right else ctrl_ptr + geometry.right_offset
        self.read_size, self.write_size = geometry.left_size, geometry.right_size
        self._rings = VchanRings(
            ctrl_ptr, read_ptr, self.read_size, write_ptr, self.write_size, is_server=True
        )
        self._make_epoll()
        # Presence first, keys second: a client that finds the keys also finds our node.
        self._presence = Presence(backend, peer, backend.domid, port.port, ctrl.refs[0])
        self._presence.announce_server()
        publish_keys(backend, peer, self.path, ctrl.refs[0], port.port)
        self._published_ref = ctrl.refs[0]

    @classmethod
    def client(cls, backend: Backend, peer: int, path: str, ref: int, port: int) -> Endpoint:
        """Connect to the keys ``ref`` / ``port`` a server in ``peer`` published at the
        absolute store ``path``.

        Raises:
            StaleKeys: the port or grant is gone, or another client took the server.
            RemoteProtocolError: an invalid control page.
        """
        check_domid(peer)
        self = cls(backend, peer, path, is_server=False)
        try:
            self._setup_client(ref, port)
        except XenError as exc:
            self._teardown()
            raise StaleKeys(f"the keys at {path} are stale: {exc}") from exc
        except BaseException:
            self._teardown()
            raise
        return self

    def _setup_client(self, ref: int, remote_port: int) -> None:
        backend, peer = self.backend, self.peer
        port = self._port = backend.bind_interdomain(peer, remote_port)
        ctrl = backend.map(peer, [ref], writable=True)
        self._pages.append(ctrl)
        server = _OFFERED.get((os.getpid(), peer, ref))
        if server is not None:
            # Set before our live byte says "connected": the server's owner reads it
            # once it sees that (under the GIL, so in that order).
            server.peer_in_process = self.peer_in_process = True
        page = ctrl.mapping.view()
        try:
            # One private copy: everything below is validated from it, never re-read.
            snapshot = bytes(page[:CONTROL_PAGE_SIZE])
        finally:
            page.release()
        geometry = Geometry.read_from(snapshot)
        if snapshot[OFF_CLI_LIVE] != LIVE_WAITING:
            raise StaleKeys(
                f"the control page at {self.path} is not waiting for a client"
                f" (cli_live={snapshot[OFF_CLI_LIVE]}): stale keys or another client won"
            )
        ctrl.set_unmap_notify(OFF_CLI_LIVE, clear_byte=True, port=port)
        left_refs, right_refs = geometry.read_grants(snapshot)
        ctrl_ptr = self._pointer(ctrl)
        # The client writes the left ring and reads the right one.
        if left_refs:
            left = backend.map(peer, left_refs, writable=True)
            self._pages.append(left)
            write_ptr = self._pointer(left)
        else:
            write_ptr = ctrl_ptr + geometry.left_offset
        if right_refs:
            right = backend.map(peer, right_refs, writable=False)
            self._pages.append(right)
            read_ptr = self._pointer(right)
            self._read_pages = right
        else:
            read_ptr = ctrl_ptr + geometry.right_offset
            self._read_pages, self._read_offset = ctrl, geometry.right_offset or 0
        self.read_size, self.write_size = geometry.right_size, geometry.left_size
        rings = self._rings = VchanRings(
            ctrl_ptr, read_ptr, self.read_size, write_ptr, self.write_size, is_server=False
        )
        self._make_epoll()
        presence = self._presence = Presence(backend, peer, peer, remote_port, ref)
        # The server's node first: ours copies its value (see Presence).
        self._watch_peer("server")
        presence.announce_client()
        rings.set_own_live(LIVE_CONNECTED)
        rings.set_peer_notify(NOTIFY_WRITE)
        port.notify()

    def _pointer(self, pages: Pages) -> Any:
        ptr = ffi.from_buffer("uint8_t[]", pages.mapping.mmap, require_writable=False)
        self._ptrs.append(ptr)
        return ptr

    def _make_epoll(self) -> None:
        assert self._port is not None
        ep = self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ep.register(self._wake_fd, select.EPOLLIN)
        self._port.add_to(ep)

    def _watch_peer(self, role: str) -> None:
        assert self._presence is not None and self._epoll is not None
        gntipc_peer, dead = self._presence.watch_peer(role)
        self._peer_gntipc = gntipc_peer
        self._peer_dead = self._peer_dead or dead
        fd = self._presence.fileno()
        if fd is not None:
            self._epoll.register(fd, select.EPOLLIN)

    # -------------------------------------------------------------- liveness ---
    def _live(self) -> VchanRings:
        """The rings, or ClosedResourceError; call with a direction lock held."""
        rings = self._rings
        if self.closed or rings is None:
            raise ClosedResourceError("this vchan is closed")
        return rings

    def _notify(self) -> None:
        # Called after the direction lock is released, so a close() from another thread
        # may have torn the port down since: the call's work is done and the close sent
        # the peer its own event, so there is nothing left to report.
        port = self._port
        if port is None:
            return
        self.counters.events_out += 1
        try:  # noqa: SIM105 - the hot path: contextlib.suppress costs more
            port.notify()
        except (XenError, ClosedResourceError):
            pass  # a peer that is gone is reported by the liveness checks

    def _peer_state(self, rings: VchanRings) -> int:
        """LIVE_* of the peer, folding in domain death; notices a client's connection."""
        if self._peer_dead:
            return LIVE_GONE
        live = rings.peer_live()
        if not self._connected and live != LIVE_WAITING:
            # A client that left before we saw it connected may still be a gntipc one
            # that crashed (it announced itself first): its node decides, as for one
            # that connected.
            self._on_connected()
        return live

    def _on_connected(self) -> None:
        # Once, whichever thread notices first (the other waits, then sees it done).
        with self._state:
            if self._connected or self.closed:
                return
            self._watch_peer("client")
            self._connected = True

    def _read_ended(self, rings: VchanRings) -> bool:
        """True if the peer will write no more (EOF bit, closed, crashed or dead)."""
        return rings.peer_eof() or self._peer_state(rings) == LIVE_GONE

    def _end_of_stream(self, rings: VchanRings) -> BaseException:
        """The exception for a drained ring whose peer is gone or finished."""
        if self._peer_dead:
            return BrokenResourceError(f"the peer domain {self.peer} died")
        if rings.peer_eof():
            return EndOfStream()
        if self._peer_gntipc:
            # A gntipc peer always sets the EOF bit before a clean close.
            return BrokenResourceError("the peer crashed (its live byte was cleared)")
        return EndOfStream()

    # ---------------------------------------------------------------- writing ---
    def write_nowait(
        self, data: Any, *, all_or_nothing: bool = False, spinner: Spinner | None = None
    ) -> int:
        """Write as many bytes of ``data`` (any buffer) as fit now; with
        ``all_or_nothing``, all of them or none.  Returns the count (0 if none).

        With a ``spinner`` (not all or nothing), when the ring fills before all of
        ``data`` is written, spin for room up to its budget (telling it how the spin
        went) and write on, in the same native call: on a busy channel, no return to
        Python between the spin and the copy it waited for.

        Raises:
            BrokenResourceError: the peer is gone.  ClosedResourceError: after close()
            or send_eof().  RemoteProtocolError: the peer corrupted its index.
            LocalProtocolError: an ``all_or_nothing`` write larger than the ring.
        """
        src = ffi.from_buffer(data)  # len(src) is in bytes, whatever the item size
        try:
            n, notify = self._write(src, all_or_nothing, len(src), spinner)
        except BaseException:
            # Released at once: a traceback keeping this frame alive must not keep the
            # caller's buffer exported.  (On return, `src` dies with the frame.)
            ffi.release(src)
            raise
        if notify:
            self._notify()
        return n

    def send_nowait(self, data: Any) -> bool:
        """Packet write: all of ``data`` (True) or nothing (False) if it does not fit now.

        Raises: as :meth:`write_nowait` with ``all_or_nothing``.
        """
        src = ffi.from_buffer(data)
        size = len(src)
        try:
            n, notify = self._write(src, True, size)
        except BaseException:
            ffi.release(src)
            raise
        if notify:
            self._notify()
        return n == size

    def write_from(self, data: Any, offset: int, spinner: Spinner | None = None) -> tuple[int, int]:
        """Stream write of ``data[offset:]`` (``data`` any C-contiguous buffer, offsets in
        bytes): as much as fits now (with a ``spinner``: and spinning for room to write
        on, as :meth:`write_nowait`).  Returns ``(written, total bytes of data)``.

        Raises: as :meth:`write_nowait`; BufferError for a non-contiguous buffer.
        """
        src = ffi.from_buffer(data)
        total = len(src)
        try:
            n, notify = self._write(src + offset if offset else src, False, total - offset, spinner)
        except BaseException:
            ffi.release(src)
            raise
        if notify:
            self._notify()
        return n, total

    def _write(
        self, src: Any, all_or_nothing: bool, size: int, spinner: Spinner | None = None
    ) -> tuple[int, bool]:
        ns = 0 if spinner is None else spinner.budget_ns()
        with self._wlock:
            rings = self._rings
            if self.closed or rings is None:
                raise ClosedResourceError("this vchan is closed")
            if self.eof_sent:
                raise ClosedResourceError("send_eof() was called: this side writes no more")
            if all_or_nothing and size > self.write_size:
                raise LocalProtocolError(
                    f"a {size}-byte packet can never fit a {self.write_size}-byte ring"
                )
            n = -1
            if self._peer_dead:
                pass
            elif spinner is not None and ns and not all_or_nothing:
                # The liveness check, the write, and spinning for room to write the rest.
                n, notify, spun = rings.write_spin(src, size, ns)
                if spun:
                    spinner.spun(spun == 1)
            else:
                # The liveness check and the write in one native call.
                n, notify = rings.write(src, size, all_or_nothing)
            if n < 0:
                # Not connected: gone (report it), or a server still awaiting its client
                # (writing ahead is allowed, as in libxenvchan).
                if self._peer_state(rings) == LIVE_GONE:
                    raise BrokenResourceError(f"the peer (domain {self.peer}) is gone")
                n, notify = rings.write_unchecked(src, size, all_or_nothing=all_or_nothing)
            counters = self.counters
            counters.bytes_out += n
            if n < size:
                # Stopped short: the ring was full, or (all or nothing) had less than
                # `size` bytes free.  (Only then: a compare per write is not free.)
                used = self.write_size - size + 1 if all_or_nothing else self.write_size
                if used > counters.write_high:
                    counters.write_high = used
        return n, notify

    def send_eof(self) -> None:
        """Half-close: we write no more (idempotent).

        Raises:
            ClosedResourceError: the endpoint is closed.
        """
        with self._wlock:
            rings = self._live()
            if self.eof_sent:
                return
            self.eof_sent = True
            rings.send_eof()
        self._notify()

    # ---------------------------------------------------------------- reading ---
    def read_nowait(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes available now, copied once out of the ring into the
        returned bytes (``b""`` if none yet).

        Raises:
            EndOfStream: the peer closed cleanly (or sent EOF) and all it wrote was read.
            BrokenResourceError: the peer crashed or its domain died, all it wrote was read.
            ClosedResourceError: after our own close().
            RemoteProtocolError: the peer corrupted its index.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        with self._rlock:
            rings = self._live()
            if not self._connected:
                self._peer_state(rings)
            data, notify = rings.read_bytes(max_bytes)
            if not data:
                # Liveness first, then drain: data written before a close is never lost.
                if not self._read_ended(rings):
                    return b""
                data, notify = rings.read_bytes(max_bytes)
                if not data:
                    raise self._end_of_stream(rings)
            n = len(data)
            counters = self.counters
            counters.bytes_in += n
            if n > counters.read_high:
                counters.read_high = n
        if notify:
            self._notify()
        return data

    def readinto_nowait(
        self, buf: Any, *, all_or_nothing: bool = False, spinner: Spinner | None = None
    ) -> int:
        """Copy the bytes available now into ``buf`` (a writable buffer); with
        ``all_or_nothing``, exactly ``len(buf)`` bytes or none.  Returns the count.
        With a ``spinner`` (not all or nothing), when nothing is readable, spin for a
        byte up to its budget (telling it how the spin went) and read, in one native call.

        Raises: as :meth:`read_nowait`.
        """
        dst = ffi.from_buffer(buf, require_writable=True)
        try:
            n, notify = self._readinto(dst, all_or_nothing, spinner)
        finally:
            ffi.release(dst)
        if notify:
            self._notify()
        return n

    def _readinto(
        self, dst: Any, all_or_nothing: bool, spinner: Spinner | None = None
    ) -> tuple[int, bool]:
        size = len(dst)
        ns = 0 if spinner is None else spinner.budget_ns()
        with self._rlock:
            rings = self._live()
            if not self._connected:
                self._peer_state(rings)
            if spinner is not None and ns and not all_or_nothing:
                n, notify, spun = rings.read_spin(dst, size, ns)
                if spun:
                    spinner.spun(spun == 1)
            else:
                n, notify = rings.read(dst, size, all_or_nothing=all_or_nothing)
            if not n and size:
                if not self._read_ended(rings):
                    return 0, False
                n, notify = rings.read(dst, size, all_or_nothing=all_or_nothing)
                if not n:
                    raise self._end_of_stream(rings)
            counters = self.counters
            counters.bytes_in += n
            if n > counters.read_high:
                counters.read_high = n
        return n, notify

    def read_view(self, max_bytes: int) -> memoryview | None:
        """A read-only view of up to ``max_bytes`` readable bytes in the ring itself (no
        copy; stopping at the ring's end), not consumed: :meth:`consume` takes them out
        of the ring.  None if nothing is readable now.  The caller sees to it that
        nothing else reads until it consumed (one view at a time).

        The view keeps the mapping alive (the pages cannot be unmapped while it, or a
        view derived from it, exists: close() raises MappingInUse then).  The peer can
        still write into that part of the ring while the view is out.

        Raises: as :meth:`read_nowait`.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        with self._rlock:
            rings = self._live()
            if not self._connected:
                self._peer_state(rings)
            n, pos = rings.read_begin(max_bytes)
            if not n:
                # Liveness first, then drain: data written before a close is never lost.
                if not self._read_ended(rings):
                    return None
                n, pos = rings.read_begin(max_bytes)
                if not n:
                    raise self._end_of_stream(rings)
            assert self._read_pages is not None
            whole = self._read_pages.mapping.view()
            try:
                start = self._read_offset + pos
                return whole[start : start + n].toreadonly()
            finally:
                whole.release()  # the slice keeps the mapping exported on its own

    def consume(self, n: int) -> None:
        """Take ``n`` bytes out of the ring: at most what the last :meth:`read_view`
        showed.

        Raises:
            ClosedResourceError: the endpoint is closed.
            RemoteProtocolError: the peer corrupted its index.
        """
        with self._rlock:
            rings = self._live()
            notify = rings.read_commit(n)
            counters = self.counters
            counters.bytes_in += n
            if n > counters.read_high:
                counters.read_high = n
        if notify:
            self._notify()

    def peek_nowait(self, n: int, skip: int = 0) -> bytes:
        """Up to ``n`` readable bytes, ``skip`` bytes ahead, without consuming them."""
        buf = bytearray(n)
        with self._rlock:
            got = self._live().peek(ffi.from_buffer(buf, require_writable=True), n, skip)
        del buf[got:]
        return bytes(buf)

    # ------------------------------------------------------------- status ---
    def data_ready(self) -> int:
        """Bytes that can be read now (no side effects)."""
        with self._rlock:
            return self._live().data_ready()

    def buffer_space(self) -> int:
        """Bytes that can be written now (no side effects)."""
        with self._wlock:
            return self._live().buffer_space()

    def readable(self) -> bool:
        """True if a read would not come back empty-handed: data is ready, or there is an
        end to report.  No side effects beyond noticing the connection."""
        with self._rlock:
            rings = self._live()
            return rings.data_ready() > 0 or self._read_ended(rings)

    def peer_state(self) -> int:
        """The peer's LIVE_* state (domain death folded in).

        Raises:
            ClosedResourceError: the endpoint is closed.
        """
        with self._rlock:
            return self._peer_state(self._live())

    # -------------------------------------------------------- the wait protocol ---
    def poll_read(self, want: int = 1) -> bool:
        """True if a read need not wait: ``want`` bytes are readable (capped at the
        ring size), or there is an end to report.  Otherwise ask the peer to notify us
        of its next write, re-check, and return False only if the caller must now wait
        for an event (:meth:`fileno`).

        Raises:
            ClosedResourceError: the endpoint is closed.
            RemoteProtocolError: the peer corrupted its index.
        """
        want = min(want, self.read_size)
        hook = self.window_hook
        with self._rlock:
            rings = self._live()
            if rings.data_ready() >= want or self._read_ended(rings):
                return True
            if hook is not None:
                hook("checked", "read")
            if rings.prepare_wait_read() >= want:
                return True
            if hook is not None:
                hook("prepared", "read")
            # Re-check liveness and EOF too: a close that landed before our request
            # was seen sends its event anyway, but checking costs nothing.
            if self._read_ended(rings):
                return True
        if hook is not None:
            hook("waiting", "read")
        return False

    def poll_write(self, want: int = 1) -> bool:
        """True if a write need not wait: ``want`` bytes (capped at the ring size) are
        free, or the write would fail at once (peer gone, EOF sent).  Otherwise ask the
        peer to notify us of its next read, re-check, and return False only if the
        caller must now wait for an event.

        Raises:
            ClosedResourceError: the endpoint is closed.
            RemoteProtocolError: the peer corrupted its index.
        """
        want = min(want, self.write_size)
        hook = self.window_hook
        with self._wlock:
            rings = self._live()
            if self.eof_sent or self._peer_state(rings) == LIVE_GONE:
                return True
            if rings.buffer_space() >= want:
                return True
            if hook is not None:
                hook("checked", "write")
            if rings.prepare_wait_write() >= want:
                return True
            if hook is not None:
                hook("prepared", "write")
            if self._peer_state(rings) == LIVE_GONE:
                return True
        if hook is not None:
            hook("waiting", "write")
        return False

    def spin_read(self, want: int, ns: int) -> bool:
        """Busy-wait up to ``ns`` nanoseconds (asking the peer for no event) until
        ``want`` bytes are readable; True if they are."""
        want = min(want, self.read_size)
        with self._rlock:
            return self._live().spin_read(want, ns) >= want

    def spin_write(self, want: int, ns: int) -> bool:
        """Busy-wait up to ``ns`` nanoseconds until ``want`` bytes are free."""
        want = min(want, self.write_size)
        with self._wlock:
            return self._live().spin_write(want, ns) >= want

    # ----------------------------------------------------------------- events ---
    def fileno(self) -> int:
        """A descriptor that is readable when there may be news (an event, a change of
        the peer's presence, or our own close); then call :meth:`handle_events`.

        Raises:
            ClosedResourceError: the endpoint is closed.
        """
        ep = self._epoll
        if self.closed or ep is None:
            raise ClosedResourceError("this vchan is closed")
        try:
            return ep.fileno()
        except ValueError:  # closed by a close() from another thread since the check
            raise ClosedResourceError("this vchan is closed") from None

    def handle_events(self) -> None:
        """Consume a pending event (one read and one unmask on Xen) and, when there was
        none, the peer-presence watch; then do the store work that calls for (see
        :meth:`check_presence`).  A no-op once closed."""
        if self.consume_events():
            self.check_presence()

    def consume_events(self) -> bool:
        """The part of :meth:`handle_events` without store I/O (the async API runs
        :meth:`check_presence` in a worker thread).  Never blocks.  Returns
        :meth:`presence_check_due`."""
        with self._evlock:
            if self.closed:
                return False
            port, rings = self._port, self._rings
            assert port is not None and rings is not None
            if port.pending():
                self.counters.events_in += 1
                port.unmask()
            elif self._presence is not None and self._presence.watch_fired():
                self._vanish_due = True
            if not self._connected and rings.peer_live() == LIVE_CONNECTED:
                self._connect_due = True
            return self._vanish_due or self._connect_due

    def presence_check_due(self) -> bool:
        """True if :meth:`check_presence` has work to do (also after a failed one)."""
        return self._vanish_due or self._connect_due

    def check_presence(self) -> None:
        """The store half of :meth:`handle_events`: whether the peer's presence node
        vanished (its domain died: no unmap event comes), and a server's start of its
        watch on a client that connected.  Blocking store I/O, from any thread, with no
        lock held that the event loop's calls take.  A no-op once closed.

        Raises:
            XenError, XenStoreTimeout: the store failed (the check stays due).
        """
        if self._connect_due or not self._connected:
            with self._evlock:
                rings = self._rings
                live = LIVE_GONE if self.closed or rings is None else rings.peer_live()
            if live != LIVE_WAITING:  # connected, or gone already (see _peer_state)
                self._on_connected()
            self._connect_due = False
        presence = self._presence
        if not self._vanish_due or presence is None:
            return
        self._vanish_due = False  # before the check: an event during it makes it due again
        try:
            gone = presence.peer_gone()
        except BaseException:
            self._vanish_due = True
            raise
        if gone:
            with self._evlock:
                rings = self._rings
                # The node is removed after a clean close has cleared the live byte, so a
                # live byte still at 1 means the domain died without an unmap event.
                if not self.closed and rings is not None and rings.peer_live() != LIVE_GONE:
                    self._peer_dead = True

    @property
    def peer_is_gntipc(self) -> bool:
        """True once the peer is known to be gntipc (it announced itself in the store):
        it understands the EOF bit of a half-close and clears its live byte only after
        setting it.  False for a plain libxenvchan peer, and for a server's client until
        its live byte leaves "waiting" (it connected, or left: one killed before it
        announced itself reads as a plain peer that closed, EndOfStream)."""
        return self._peer_gntipc

    def peer_live(self) -> int:
        """The peer's LIVE_* state now, domain death folded in; unlike
        :meth:`peer_state`, it never starts a server's watch on its client (no store
        I/O: the async API does that in :meth:`check_presence`).

        Raises:
            ClosedResourceError: the endpoint is closed.
        """
        with self._rlock:
            rings = self._live()
            return LIVE_GONE if self._peer_dead else rings.peer_live()

    def wait_fd(self, timeout: float | None) -> bool:
        """Block the calling thread until :meth:`fileno` is readable (or ``timeout``);
        True if it is.  :meth:`close` from another thread wakes it.

        Raises:
            ClosedResourceError: the endpoint is (or gets) closed.
        """
        with self._state:
            self.fileno()
            ep = self._epoll
            assert ep is not None
            self._pollers += 1
        try:
            # One epoll_wait on our own epoll (close() waits for us before closing it).
            woken = bool(ep.poll(-1 if timeout is None else max(0.0, timeout), 4))
        finally:
            with self._state:
                self._pollers -= 1
                self._state.notify_all()
        if self.closed:
            raise ClosedResourceError("this vchan is closed")
        return woken

    # ------------------------------------------------------------------ close ---
    def close(self) -> None:
        """Close our end (idempotent, from any thread): EOF bit, live byte 0, an event
        to the peer, then unmap, unshare, unbind; a server also removes its keys.

        Operations in flight in other threads finish first; later ones, and threads
        blocked waiting, raise ClosedResourceError.  A close() racing another one
        returns once the endpoint is torn down.

        Every resource is released even if releasing one fails; the first such error is
        raised at the end.  Pages that could not be released (MappingInUse: a memoryview
        of them is still alive) are kept, and a later close() releases them.

        Raises:
            MappingInUse: views of a mapping are alive (everything else was released).
            XenError: the backend failed to release something.
        """
        with self._state:
            if self._torn_down:
                return
            if not self.closed:
                self.closed = True
                if self._wake_fd >= 0:
                    os.eventfd_write(self._wake_fd, 1)  # wakes every waiter on fileno()
            deadline = time.monotonic() + _CLOSE_GRACE
            while self._pollers and time.monotonic() < deadline:
                self._state.wait(deadline - time.monotonic())
        with self._rlock, self._wlock, self._evlock:
            rings = self._rings
            if rings is not None:
                # Whichever close() gets the locks first tells the peer, once.
                if not self.eof_sent:
                    rings.send_eof()
                rings.set_own_live(LIVE_GONE)
                self._notify()
            self._teardown()

    def _teardown(self) -> None:
        """Release everything still held.  Called with all three locks held, or before
        the endpoint was handed out.  Each step runs even if an earlier one failed;
        pages whose release failed stay in ``_pages`` for a later attempt; the first
        error is raised at the end."""
        self.closed = True
        errors: list[BaseException] = []

        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                errors.append(exc)

        offered, self._offered = self._offered, None
        if offered is not None and _OFFERED.get(offered) is self:
            del _OFFERED[offered]
        store = self.backend.store
        ref, self._published_ref = self._published_ref, None
        if ref is not None:
            # Best effort: a store that fails or times out must not keep the pages,
            # ports and fds below from being released.
            with contextlib.suppress(XenError, TimeoutError, OSError):
                unpublish_keys(store, self.path, ref)
        presence, self._presence = self._presence, None
        if presence is not None:
            attempt(presence.close)
        ep, self._epoll = self._epoll, None
        if ep is not None:
            if self._port is not None:
                attempt(self._port.remove_from, ep)
            attempt(ep.close)
        wake, self._wake_fd = self._wake_fd, -1
        if wake >= 0:
            attempt(os.close, wake)
        self._rings = None
        for ptr in self._ptrs:
            attempt(ffi.release, ptr)
        self._ptrs.clear()
        kept: list[Pages] = []
        for pages in reversed(self._pages):
            try:
                pages.close()
            except Exception as exc:
                errors.append(exc)
                kept.append(pages)
        self._pages[:] = reversed(kept)
        port, self._port = self._port, None
        if port is not None:
            attempt(port.close)
        self._torn_down = not self._pages
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        return f"<gntipc endpoint {role} peer={self.peer} path={self.path!r}>"
