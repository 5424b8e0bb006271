"""Our declarations against the system headers.

A probe is compiled with gcc against /usr/include/xen/{gntdev,gntalloc,evtchn,privcmd}.h
(Linux uapi, linux-libc-dev) and Xen's public headers (libxen-dev) for the
grant-copy/EVTCHNOP_status definitions.  It prints every ioctl number and constant, every
struct size, and the offset and size of every field (nested ones too) of every struct we
declare; each must equal what ``ffi``/``lib`` say.

The checks need gcc, linux-libc-dev and libxen-dev (``.ci/run`` installs them): without
them they fail, naming what is missing; they never skip.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gntipc._native
from gntipc._native import ffi, lib

UAPI = ["gntdev.h", "gntalloc.h", "evtchn.h", "privcmd.h"]
UAPI_STRUCTS = [
    "ioctl_gntdev_grant_ref",
    "ioctl_gntdev_map_grant_ref",
    "ioctl_gntdev_unmap_grant_ref",
    "ioctl_gntdev_get_offset_for_vaddr",
    "ioctl_gntdev_set_max_grants",
    "ioctl_gntdev_unmap_notify",
    "gntdev_grant_copy_segment",
    "ioctl_gntdev_grant_copy",
    "ioctl_gntdev_dmabuf_exp_from_refs",
    "ioctl_gntdev_dmabuf_exp_wait_released",
    "ioctl_gntdev_dmabuf_imp_to_refs",
    "ioctl_gntdev_dmabuf_imp_release",
    "ioctl_gntalloc_alloc_gref",
    "ioctl_gntalloc_dealloc_gref",
    "ioctl_gntalloc_unmap_notify",
    "ioctl_evtchn_bind_virq",
    "ioctl_evtchn_bind_interdomain",
    "ioctl_evtchn_bind_unbound_port",
    "ioctl_evtchn_unbind",
    "ioctl_evtchn_notify",
    "ioctl_evtchn_restrict_domid",
    "privcmd_hypercall",
]
UAPI_CONSTANTS = [
    "IOCTL_GNTDEV_MAP_GRANT_REF",
    "IOCTL_GNTDEV_UNMAP_GRANT_REF",
    "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR",
    "IOCTL_GNTDEV_SET_MAX_GRANTS",
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
    "IOCTL_GNTDEV_GRANT_COPY",
    "IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS",
    "IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED",
    "IOCTL_GNTDEV_DMABUF_IMP_TO_REFS",
    "IOCTL_GNTDEV_DMABUF_IMP_RELEASE",
    "UNMAP_NOTIFY_CLEAR_BYTE",
    "UNMAP_NOTIFY_SEND_EVENT",
    "GNTDEV_DMA_FLAG_WC",
    "GNTDEV_DMA_FLAG_COHERENT",
    "IOCTL_GNTALLOC_ALLOC_GREF",
    "IOCTL_GNTALLOC_DEALLOC_GREF",
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
    "GNTALLOC_FLAG_WRITABLE",
    "IOCTL_EVTCHN_BIND_VIRQ",
    "IOCTL_EVTCHN_BIND_INTERDOMAIN",
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
    "IOCTL_EVTCHN_UNBIND",
    "IOCTL_EVTCHN_NOTIFY",
    "IOCTL_EVTCHN_RESET",
    "IOCTL_EVTCHN_RESTRICT_DOMID",
    "IOCTL_PRIVCMD_HYPERCALL",
]
XEN_PUBLIC = ["xen.h", "event_channel.h", "grant_table.h"]
XEN_STRUCTS = ["evtchn_status"]
XEN_CONSTANTS = [
    "__HYPERVISOR_event_channel_op",
    "EVTCHNOP_status",
    "DOMID_SELF",
    "GNTCOPY_source_gref",
    "GNTCOPY_dest_gref",
    *[f"EVTCHNSTAT_{s}" for s in ("closed", "unbound", "interdomain", "pirq", "virq", "ipi")],
    *[
        f"GNTST_{s}"
        for s in [
            "okay",
            "general_error",
            "bad_domain",
            "bad_gntref",
            "bad_handle",
            "bad_virt_addr",
            "bad_dev_addr",
            "no_device_space",
            "permission_denied",
            "bad_page",
            "bad_copy_arg",
            "address_too_big",
            "eagain",
            "no_space",
        ]
    ],
]


def fields(ctype: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every field path of a struct/union, recursing into nested structs and unions."""
    for name, field in ctype.fields:
        sub = (*path, name)
        yield sub, field.type
        if field.type.kind in ("struct", "union"):
            yield from fields(field.type, sub)


def probe_source(headers: list[str], structs: list[str], constants: list[str]) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <sys/ioctl.h>",
        "typedef uint32_t grant_ref_t;",
        "typedef uint16_t domid_t;",
        # The current hypercall interface, as the Xen tools see it (without this xen.h
        # gives the pre-3.2 compat numbers, e.g. event_channel_op 16 instead of 32).
        "#define __XEN_TOOLS__ 1",
        *[f"#include <xen/{h}>" for h in headers],
        "int main(void) {",
    ]
    for name in constants:
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    for s in structs:
        ct = ffi.typeof(f"struct {s}")
        lines.append(f'printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
        for path, _ in fields(ct):
            dotted = ".".join(path)
            lines.append(f'printf("offsetof {s}.{dotted} %zu\\n", offsetof(struct {s}, {dotted}));')
            lines.append(
                f'printf("fieldsize {s}.{dotted} %zu\\n", sizeof(((struct {s} *)0)->{dotted}));'
            )
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


def expected(structs: list[str], constants: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in constants:
        out[f"const {name}"] = getattr(lib, name)
    for s in structs:
        ct = ffi.typeof(f"struct {s}")
        out[f"sizeof {s}"] = ffi.sizeof(ct)
        for path, ftype in fields(ct):
            dotted = ".".join(path)
            out[f"offsetof {s}.{dotted}"] = ffi.offsetof(ct, *path)
            out[f"fieldsize {s}.{dotted}"] = ffi.sizeof(ftype)
    return out


def run_probe(
    tmp_path: Path,
    headers: list[str],
    structs: list[str],
    consts: list[str],
    *,
    required: str | None = None,
) -> dict[str, int]:
    """Compile and run the probe.  Without gcc or ``headers``: fail, naming the package
    that provides them (``required``), or skip when ``required`` is None."""
    missing = [f"/usr/include/xen/{h}" for h in headers if not Path("/usr/include/xen", h).exists()]
    if shutil.which("gcc") is None:
        missing.insert(0, "gcc")
    if missing:
        if required is not None:
            pytest.fail(f"the ABI check needs {', '.join(missing)} (install gcc and {required})")
        pytest.skip(f"missing: {', '.join(missing)}")
    # privcmd.h includes the kernel-internal <xen/interface/xen.h>: give it only xen_pfn_t.
    stub = tmp_path / "inc/xen/interface/xen.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("typedef unsigned long xen_pfn_t;\n")
    src = tmp_path / "probe.c"
    src.write_text(probe_source(headers, structs, consts))
    exe = tmp_path / "probe"
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-I", str(tmp_path / "inc"), "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
    )
    assert cc.returncode == 0, f"the probe does not compile:\n{cc.stderr}"
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        key, value = line.rsplit(" ", 1)
        result[key] = int(value)
    return result


def test_uapi_ioctls_structs_and_fields_match(tmp_path: Path) -> None:
    got = run_probe(tmp_path, UAPI, UAPI_STRUCTS, UAPI_CONSTANTS, required="linux-libc-dev")
    want = expected(UAPI_STRUCTS, UAPI_CONSTANTS)
    assert got == want
    # The comparison covered every ioctl, every struct and every (nested) field.
    assert sum(k.startswith("const IOCTL_") for k in got) == 10 + 3 + 7 + 1
    assert len(got) > 150


def test_xen_public_definitions_match(tmp_path: Path) -> None:
    got = run_probe(tmp_path, XEN_PUBLIC, XEN_STRUCTS, XEN_CONSTANTS, required="libxen-dev")
    assert got == expected(XEN_STRUCTS, XEN_CONSTANTS)


def test_design_doc_numbers() -> None:
    """The numbers DESIGN.md §2 records (x86-64), independent of any header."""
    assert lib.IOCTL_GNTDEV_MAP_GRANT_REF == 0x00184700
    assert lib.IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x00104701
    assert lib.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR == 0x00184702
    assert lib.IOCTL_GNTDEV_SET_UNMAP_NOTIFY == 0x00104707
    assert lib.IOCTL_GNTDEV_GRANT_COPY == 0x00104708
    assert lib.IOCTL_GNTALLOC_ALLOC_GREF == 0x00184705
    assert lib.IOCTL_GNTALLOC_DEALLOC_GREF == 0x00104706
    assert lib.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY == 0x00104707
    assert lib.IOCTL_EVTCHN_BIND_VIRQ == 0x00044500
    assert lib.IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x00084501
    assert lib.IOCTL_EVTCHN_BIND_UNBOUND_PORT == 0x00044502
    assert lib.IOCTL_EVTCHN_UNBIND == 0x00044503
    assert lib.IOCTL_EVTCHN_NOTIFY == 0x00044504
    assert lib.IOCTL_EVTCHN_RESET == 0x00004505
    assert lib.IOCTL_EVTCHN_RESTRICT_DOMID == 0x00024506
    assert ffi.sizeof("struct gnt_ring") == 48


def test_module_does_not_include_xen_headers() -> None:
    native = Path(gntipc._native.__file__).parent
    text = (native / "_src.c").read_text() + (native / "_cdefs.h").read_text()
    assert "#include <xen/" not in text and "#include <linux/" not in text
