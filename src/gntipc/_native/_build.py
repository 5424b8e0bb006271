"""cffi (API mode) builder of ``gntipc._native._lib``.

setup.py names ``ffibuilder`` in ``cffi_modules``; ``python _build.py`` builds in place.
The module is compiled from our own C: ``_cdefs.h`` (declarations, also the cdef) and
``_src.c`` (helpers and ring primitives); no Xen header is included.
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped,unused-ignore]

_HERE = Path(__file__).resolve().parent
CDEFS = (_HERE / "_cdefs.h").read_text()
SRC = (_HERE / "_src.c").read_text()

# The cffi-only section holds `#define NAME ...` lines whose values cffi takes from the
# system headers; it is not C, so the compiled copy of the header leaves it out.
_CFFI_ONLY = re.compile(r"/\* cffi-only: begin.*?/\* cffi-only: end \*/", re.S)
_INCLUDE = '#include "_cdefs.h"\n'

if _INCLUDE not in SRC:  # pragma: no cover - a broken source tree
    raise RuntimeError("_src.c must contain the line: " + _INCLUDE.strip())

ffibuilder = FFI()
ffibuilder.cdef(CDEFS)
ffibuilder.set_source(
    "gntipc._native._lib",
    SRC.replace(_INCLUDE, _CFFI_ONLY.sub("", CDEFS) + "\n", 1),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(_HERE.parent.parent), verbose=True)
