"""An AddressSanitizer build of the native core, for the fuzzer's target process.

:func:`build` compiles ``src/gntipc/_native`` (the same cdefs and C source as the real
build, see ``_build.py``) with ``-fsanitize=address`` into a temporary directory.  The
target loads it in place of the installed module (``$GNTIPC_STRESS_ASAN_LIB``) and runs
with ``LD_PRELOAD=<libasan.so>`` (the runtime must come first in a python that is not
itself instrumented), ``PYTHONMALLOC=malloc`` (so that Python's own buffers get ASan's
redzones; pymalloc arenas would hide overflows of small objects) and
``ASAN_OPTIONS=detect_leaks=0`` (CPython keeps memory until exit on purpose).

``python -m stress._asan probe`` makes the instrumented ring copy overflow a heap buffer
on purpose: the run must abort with an ASan report, which proves the set-up is armed.

Without a C compiler or its libasan there is no ASan build (the callers skip or say so);
with both, a build that fails raises :class:`AsanBuildFailed`: it is never silently off.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from ._common import HERE

NATIVE = HERE.parents[1] / "src" / "gntipc" / "_native"

_built: tuple[str | None, str] | None = None


class AsanBuildFailed(RuntimeError):
    """gcc and libasan are there, but the instrumented module could not be built."""


def libasan() -> str | None:
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        return None
    out = subprocess.run(
        [cc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


def build() -> tuple[str | None, str]:
    """``(path of the instrumented module, "")``, or ``(None, why not)`` when there is
    no libasan to build with.

    Raises:
        AsanBuildFailed: the build failed (or produced no module) although the compiler
            and libasan are there.
    """
    global _built
    if _built is not None:
        if _built[0] is None and _built[1].startswith("the ASan build"):
            raise AsanBuildFailed(_built[1])
        return _built
    lib = libasan()
    if lib is None:
        _built = (None, "no libasan.so from the C compiler (gcc -print-file-name=libasan.so)")
        return _built
    spec = importlib.util.spec_from_file_location("_gntipc_build", NATIVE / "_build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import cffi  # type: ignore[import-untyped,unused-ignore]

    ffi = cffi.FFI()
    ffi.cdef(mod.CDEFS)
    ffi.set_source(
        "gntipc._native._lib",
        mod.SRC.replace(mod._INCLUDE, mod._CFFI_ONLY.sub("", mod.CDEFS) + "\n", 1),
        extra_compile_args=["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
        extra_link_args=["-fsanitize=address"],
    )
    out = tempfile.mkdtemp(prefix="gntipc-asan-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    try:
        ffi.compile(tmpdir=out, verbose=False)
    except Exception as exc:
        _built = (None, f"the ASan build failed: {exc}")
        raise AsanBuildFailed(_built[1]) from exc
    found = glob.glob(os.path.join(out, "gntipc", "_native", "_lib*.so"))
    if not found:
        _built = (None, "the ASan build produced no module")
        raise AsanBuildFailed(_built[1])
    _built = (found[0], "")
    return _built


def env(lib_path: str) -> dict[str, str]:
    """Environment additions that run a Python process on the instrumented module."""
    return {
        "GNTIPC_STRESS_ASAN_LIB": lib_path,
        "LD_PRELOAD": libasan() or "",
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": (
            "detect_leaks=0:abort_on_error=0:exitcode=86:verify_asan_link_order=0"
            # a small quarantine: the default (256 MiB) would read as a memory leak
            ":quarantine_size_mb=16"
        ),
    }


def probe() -> None:
    """Overflow a heap buffer through the ring copy (must be caught)."""
    from ._fuzz_target import load_asan_lib

    load_asan_lib()
    from gntipc._native import ffi, lib

    ctrl = ffi.new("uint8_t[4096]")
    data = ffi.new("uint8_t[1024]")
    r = ffi.new("struct gnt_ring *")
    r.cons = ffi.cast("uint32_t *", ctrl)
    r.prod = ffi.cast("uint32_t *", ctrl + 4)
    r.data = data
    r.size = 1024
    r.priv = 0
    r.own_notify = ctrl + 22
    r.peer_notify = ctrl + 23
    ffi.cast("uint32_t *", ctrl + 4)[0] = 500
    dst = bytearray(100)
    notify = ffi.new("int *")
    lib.gnt_ring_read(r, ffi.from_buffer(dst), 500, 0, notify)  # 500 bytes into 100
    print("not caught", flush=True)


def probe_in_page() -> None:
    """Write past an in-page ring into poisoned bytes of its page (must be caught)."""
    import ctypes
    import mmap

    from ._fuzz_target import load_asan_lib

    load_asan_lib()
    from gntipc._native import ffi, lib

    asan = ctypes.CDLL(None)
    asan.__asan_poison_memory_region.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.mmap(-1, 4096)
    ptr = ffi.from_buffer("uint8_t[]", page)
    base = int(ffi.cast("uintptr_t", ptr))
    asan.__asan_poison_memory_region(base + 2048, 2048)  # all but the header and ring
    r = ffi.new("struct gnt_ring *")
    r.cons = ffi.cast("uint32_t *", ptr)
    r.prod = ffi.cast("uint32_t *", ptr + 4)
    r.data = ptr + 1024
    r.size = 2048  # the real ring is 1024 bytes: a geometry bug
    r.priv = 0
    r.own_notify = ptr + 22
    r.peer_notify = ptr + 23
    notify = ffi.new("int *")
    lib.gnt_ring_write(r, ffi.from_buffer(bytes(1500)), 1500, 0, notify)
    print("not caught", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["probe"]:
        probe()
    elif sys.argv[1:] == ["probe-in-page"]:
        probe_in_page()
