"""Domain ids: the one range check, and the constants it uses."""

from __future__ import annotations

from ._exceptions import LocalProtocolError

__all__ = ["DOMID_MAX", "DOMID_SELF", "check_domid"]

#: The largest domid of a real domain (DOMID_FIRST_RESERVED - 1).
DOMID_MAX = 0x7FEF
#: "This domain" in hypercalls.
DOMID_SELF = 0x7FF0


def check_domid(domid: object, *, allow_self: bool = False) -> int:
    """``domid`` if it is the id of a real domain (0..:data:`DOMID_MAX`), or
    :data:`DOMID_SELF` when ``allow_self``.

    Every layer (devices, backends, channel, streams) checks domids here, so they all
    raise the same errors.

    Raises:
        TypeError: ``domid`` is not an int (a bool is not a domid).
        LocalProtocolError: (a :class:`ValueError`) ``domid`` is outside 0..0x7FEF.
    """
    if isinstance(domid, bool) or not isinstance(domid, int):
        raise TypeError(f"domid must be an int, not {type(domid).__name__}")
    if allow_self and domid == DOMID_SELF:
        return domid
    if not 0 <= domid <= DOMID_MAX:
        raise LocalProtocolError(f"domid {domid} is outside 0..{DOMID_MAX:#x}")
    return domid
