"""A region of pages mapped into this process (granted, or mapped from a grant).

Every backend hands out its memory as a :class:`Mapping`: a thin owner of a Python
:class:`mmap.mmap`.  ``mmap`` refuses to unmap while buffer exports (memoryviews, cffi
pointers from ``ffi.from_buffer``) are alive, so a closed mapping can never leave a
dangling view: :meth:`Mapping.close` raises :class:`MappingInUse` instead.
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from collections.abc import Callable

from anyio import ClosedResourceError

from ._exceptions import LocalProtocolError, MappingInUse
from ._resource import Closeable

__all__ = ["PAGE_SIZE", "Mapping"]

PAGE_SIZE = 4096


class Mapping(Closeable):
    """Pages mapped into this process.

    ``view()`` gives a memoryview (read-only when the mapping is).  ``close()`` unmaps,
    then runs the backend's release step (e.g. the gntdev unmap ioctl); it is idempotent,
    and raises :class:`MappingInUse` (leaving the mapping intact) while views exist.
    """

    __slots__ = ("__weakref__", "_mm", "_release", "size", "writable")

    def __init__(
        self,
        mm: mmap.mmap,
        size: int,
        *,
        writable: bool,
        release: Callable[[], None] | None = None,
    ) -> None:
        self._mm: mmap.mmap | None = mm
        self.size = size
        self.writable = writable
        self._release = release

    @property
    def closed(self) -> bool:
        return self._mm is None

    def _live(self) -> mmap.mmap:
        mm = self._mm
        if mm is None:
            raise ClosedResourceError("the mapping is closed")
        return mm

    def view(self) -> memoryview:
        """A memoryview of the whole mapping (``readonly`` unless writable).

        Raises:
            ClosedResourceError: the mapping is closed.
        """
        mv = memoryview(self._live())
        return mv if self.writable else mv.toreadonly()

    @property
    def mmap(self) -> mmap.mmap:
        """The underlying mmap object (for ``ffi.from_buffer``)."""
        return self._live()

    def check_unmap_notify(self, offset: object, *, clear_byte: bool) -> int:
        """``offset`` if an unmap notification may be set there (every backend's
        ``set_unmap_notify`` checks its arguments here).

        Raises:
            TypeError: ``offset`` is not an int.
            LocalProtocolError: ``offset`` is outside the mapping, or ``clear_byte`` on a
                read-only mapping (the kernel refuses it for a read-only gntdev map).
        """
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"unmap-notify offset must be an int, not {type(offset).__name__}")
        if not 0 <= offset < self.size:
            raise LocalProtocolError(
                f"unmap-notify offset {offset} is outside the {self.size}-byte mapping"
            )
        if clear_byte and not self.writable:
            raise LocalProtocolError("clear_byte unmap notification on a read-only mapping")
        return offset

    def close(self) -> None:
        """Unmap the pages (idempotent).

        Raises:
            MappingInUse: memoryviews or pointers into the mapping are still alive;
                release them first.  The mapping stays usable.
        """
        mm = self._mm
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            raise MappingInUse(
                "cannot unmap: memoryviews or pointers into this mapping are still alive"
            ) from None
        self._mm = None
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        if getattr(self, "_mm", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else ("rw" if self.writable else "ro")
        return f"<gntipc.Mapping {self.size} bytes {state}>"
