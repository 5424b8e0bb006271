#!/bin/bash
# build-gntdev-dmabuf.sh — build xen-gntdev.ko WITH the dma-buf extension
# (CONFIG_XEN_GNTDEV_DMABUF) for exactly the kernel run-in-xen.sh boots, cache it
# beside the kit's images and print the .ko path on stdout.
#
# Usage: build-gntdev-dmabuf.sh              build (or reuse) and print the .ko path;
#                                            root is needed only to apt-get install
#        build-gntdev-dmabuf.sh --load [KO]  INSIDE the kit's dom0, as root: replace the
#                                            stock xen_gntdev by KO (default: the cached
#                                            build for the running kernel; never builds)
# The stock module is loaded by the kit's stage 1 and held open by xenstored (seen
# with C xenstored; --oxenstored is handled the same way, untested), so --load stops xenstored,
# rmmods xen_gntdev, insmods KO, then restarts the same xenstored and reruns
# xen-init-dom0: use it FIRST in the command, before any domU or xenstore user:
#   KO=$(tools/xen-vm/build-gntdev-dmabuf.sh)
#   tools/xen-vm/run-in-xen.sh /work/main "tools/xen-vm/build-gntdev-dmabuf.sh --load $KO && COMMAND"
# See README.md, "dma-buf gntdev module".
#
# Why a patch and not just the option: Debian's 6.1 config has CONFIG_XEN_GNTDEV=m,
# CONFIG_DMA_SHARED_BUFFER=y and CONFIG_XEN_GRANT_DMA_ALLOC off, and Kconfig makes
# XEN_GNTDEV_DMABUF depend on XEN_GRANT_DMA_ALLOC only because gntdev-dmabuf.c uses
# gntdev_priv.dma_dev, a field that exists only with that option.  The grant-DMA
# allocator itself lives in the built-in kernel (grant-table.c, gnttab_dma_alloc_pages),
# so it cannot be added by a module.  This build therefore:
#   - defines CONFIG_XEN_GNTDEV_DMABUF alone (-D on the compiler command line),
#   - patches the copy of gntdev-common.h / gntdev.c so that gntdev_priv.dma_dev
#     exists and is set (to the misc device, 64-bit DMA mask) when DMABUF is on,
#     exactly as the XEN_GRANT_DMA_ALLOC build does,
#   - links gntdev.o + gntdev-dmabuf.o into one xen-gntdev.ko.
# The DMA-backed export (EXP_FROM_REFS flags GNTDEV_DMA_FLAG_WC/_COHERENT) stays
# unavailable: without XEN_GRANT_DMA_ALLOC gntdev_alloc_map() IGNORES those flags
# (ordinary ballooned pages, no error), so a caller must refuse them itself.
# The module is unsigned: CONFIG_MODULE_SIG=y without _FORCE, so it loads and taints
# the kernel ("module verification failed ... tainting kernel" in dmesg).
set -euo pipefail

CACHE=${XQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xen-vm}
log() { echo "build-gntdev-dmabuf: $*" >&2; }

MODE=build
KO_ARG=
case "${1:-}" in
    --load) MODE=load; KO_ARG=${2:-};;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0;;
    "") ;;
    *) log "unknown argument $1 (see --help)"; exit 2;;
esac

# The same kernel choice as run-in-xen.sh.
KVER=$(ls /lib/modules | grep -- '-amd64$' | sort -V | tail -n1)
[ -n "$KVER" ] || { log "no -amd64 kernel in /lib/modules"; exit 2; }
KBUILD=/lib/modules/$KVER/build
cache_key() { cat "$0" "$KBUILD/Module.symvers" "/boot/config-$KVER" | sha256sum | cut -c1-16; }

# ------------------------------------------------------------- --load mode ---
gntdev_holders() {  # "pid:comm" of every process with /dev/xen/gntdev open
    local p
    for p in /proc/[0-9]*; do
        if ls -l "$p/fd" 2>/dev/null | grep -q ' -> /dev/xen/gntdev$'; then
            echo "${p#/proc/}:$(cat "$p/comm" 2>/dev/null)"
        fi
    done
}
load_module() {
    local ko=$KO_ARG xs_pid= xs_cmd= holders others i
    if [ -z "$ko" ]; then
        [ -f "$KBUILD/Module.symvers" ] || { log "no $KBUILD/Module.symvers: pass the .ko path"; exit 2; }
        ko=$CACHE/gntdev-dmabuf-$KVER-$(cache_key)/xen-gntdev.ko
    fi
    [ -f "$ko" ] || { log "no $ko: run $0 on the host first (it builds; --load never does)"; exit 2; }
    [ "$(id -u)" = 0 ] || { log "--load needs root"; exit 2; }
    [ -e /sys/hypervisor/type ] && [ "$(cat /sys/hypervisor/type)" = xen ] || { log "--load: not running under Xen"; exit 2; }
    local vm
    vm=$(modinfo -F vermagic "$ko" | cut -d' ' -f1)
    [ "$vm" = "$(uname -r)" ] || { log "$ko is for $vm, this kernel is $(uname -r)"; exit 2; }
    if grep -q '^xen_gntdev ' /proc/modules; then
        holders=$(gntdev_holders | tr '\n' ' ')
        log "stock xen_gntdev loaded, refcnt $(cat /sys/module/xen_gntdev/refcnt), /dev/xen/gntdev held by: ${holders:-nobody}"
        others=$(echo "$holders" | tr ' ' '\n' | grep -v -e '^$' -e ':xenstored$' -e ':oxenstored$' || true)
        [ -z "$others" ] || { log "cannot unload xen_gntdev: held by $others"; exit 1; }
        if [ -f /var/run/xenstored.pid ] && kill -0 "$(cat /var/run/xenstored.pid)" 2>/dev/null; then
            xs_pid=$(cat /var/run/xenstored.pid)
            xs_cmd=$(tr '\0' ' ' < "/proc/$xs_pid/cmdline")
            log "stopping xenstored ($xs_cmd) to release /dev/xen/gntdev"
            kill "$xs_pid"
            i=0
            while kill -0 "$xs_pid" 2>/dev/null; do
                i=$((i+1)); [ $i -gt 100 ] && { log "xenstored $xs_pid did not exit"; exit 1; }; sleep 0.1
            done
        fi
        rmmod xen_gntdev || { log "rmmod xen_gntdev failed (refcnt $(cat /sys/module/xen_gntdev/refcnt 2>/dev/null))"; exit 1; }
    fi
    if ! insmod "$ko"; then
        dmesg | tail -n 5 >&2
        log "insmod $ko failed (dmesg above)"; exit 1
    fi
    i=0
    until [ -c /dev/xen/gntdev ]; do
        i=$((i+1)); [ $i -gt 50 ] && { log "/dev/xen/gntdev did not appear"; exit 1; }; sleep 0.1
    done
    if [ -n "$xs_cmd" ]; then
        rm -f /var/run/xenstored.pid
        $xs_cmd || { log "restarting xenstored failed: $xs_cmd"; exit 1; }
        i=0
        until xenstore-read -s / >/dev/null 2>&1 || xenstore-ls / >/dev/null 2>&1; do
            i=$((i+1)); [ $i -gt 100 ] && { log "xenstored not answering after restart"; exit 1; }; sleep 0.2
        done
        local init
        init=$(ls -d /usr/lib/xen-4.*/bin/xen-init-dom0 2>/dev/null | tail -n1)
        [ -z "$init" ] || "$init" >/dev/null 2>&1 || { log "xen-init-dom0 failed after the xenstored restart"; exit 1; }
        log "xenstored restarted"
    fi
    log "loaded $ko ($(dmesg | grep -c 'xen_gntdev: module verification failed' || true) signature warning(s); kernel taint $(cat /proc/sys/kernel/tainted))"
}
if [ "$MODE" = load ]; then load_module; exit 0; fi

SERIES=$(echo "$KVER" | cut -d. -f1-2)          # 6.1
SRCPKG=linux-source-$SERIES
HDRPKG=linux-headers-$KVER

mkdir -p "$CACHE"
[ -f "$CACHE/.gitignore" ] || printf '*\n!.gitignore\n' > "$CACHE/.gitignore"

# ---------------------------------------------------------------- packages ---
# The headers and the source must be the same Debian upload as the image the kit boots.
# The headers' package name carries the ABI but several uploads can share it, and the
# source package is named by series only: installed unpinned, apt picks the newest upload
# its lists name, which drifts from the image whenever the distribution publishes a kernel
# between the image's install and this one.  So both are pinned to the image's version
# (downgraded if a newer one is installed), whatever the package lists held before.
APTLOG=$CACHE/apt-dmabuf.log
IMGV=$(dpkg-query -W -f='${Version}' "linux-image-$KVER" 2>/dev/null) \
    || { log "kernel $KVER is not from an installed linux-image-$KVER package"; exit 2; }
log "the kit boots linux-image-$KVER $IMGV: building against $HDRPKG and $SRCPKG $IMGV"
installed_version() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ] \
        && dpkg-query -W -f='${Version}' "$1"
}
need_pkgs=$(for p in $HDRPKG $SRCPKG; do
    [ "$(installed_version "$p" || true)" = "$IMGV" ] || printf ' %s=%s' "$p" "$IMGV"
done; for p in make gcc xz-utils; do
    installed_version "$p" >/dev/null || printf ' %s' "$p"
done)
if [ -n "$need_pkgs" ]; then
    log "installing Debian packages:$need_pkgs"
    [ "$(id -u)" = 0 ] || { log "need root to apt-get install$need_pkgs"; exit 2; }
    : > "$APTLOG"
    for try in 1 2; do   # the second time after refreshing the package lists
        [ $try = 1 ] || apt-get update -q >>"$APTLOG" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            --allow-downgrades $need_pkgs >>"$APTLOG" 2>&1 && break
        if [ $try = 2 ]; then
            for p in $HDRPKG $SRCPKG; do
                apt-cache madison "$p" 2>/dev/null | awk -v v="$IMGV" '$3 == v {f = 1} END {exit !f}' \
                    || log "the archive has no $p $IMGV (it has: $(apt-cache madison "$p" 2>/dev/null | awk '{printf "%s ", $3}'))"
            done
            log "apt-get install$need_pkgs failed, see $APTLOG"; exit 2
        fi
    done
fi
SRCV=$(installed_version "$SRCPKG" || true)
HDRV=$(installed_version "$HDRPKG" || true)
if [ "$SRCV" != "$IMGV" ] || [ "$HDRV" != "$IMGV" ]; then
    log "version mismatch after install: linux-image-$KVER $IMGV, $SRCPKG ${SRCV:-none}, $HDRPKG ${HDRV:-none}"
    exit 2
fi
TARBALL=/usr/src/$SRCPKG.tar.xz
[ -f "$TARBALL" ] || { log "no $TARBALL"; exit 2; }
[ -f "$KBUILD/Module.symvers" ] || { log "no $KBUILD/Module.symvers"; exit 2; }

# ------------------------------------------------------------------- build ---
KEY=$(cache_key)
OUT=$CACHE/gntdev-dmabuf-$KVER-$KEY
exec 9>"$CACHE/.lock-gntdev-dmabuf"
flock 9
if [ ! -f "$OUT/xen-gntdev.ko" ]; then
    log "building xen-gntdev.ko (CONFIG_XEN_GNTDEV_DMABUF) for $KVER in $OUT"
    rm -rf "$OUT" "$OUT.tmp"; mkdir -p "$OUT.tmp/src"
    tar -xJf "$TARBALL" -C "$OUT.tmp" --strip-components=3 \
        "$SRCPKG/drivers/xen/gntdev.c" "$SRCPKG/drivers/xen/gntdev-common.h" \
        "$SRCPKG/drivers/xen/gntdev-dmabuf.c" "$SRCPKG/drivers/xen/gntdev-dmabuf.h"
    mv "$OUT.tmp"/gntdev* "$OUT.tmp/src/"
    S=$OUT.tmp/src
    # gntdev_priv.dma_dev: declared and set with DMABUF too (see header comment).
    # Each substitution must hit exactly once, or the source changed: stop.
    DMA_IF='#if defined(CONFIG_XEN_GRANT_DMA_ALLOC) || defined(CONFIG_XEN_GNTDEV_DMABUF)'
    patch_once() {  # FILE REGEX: the first GRANT_DMA_ALLOC #ifdef after a line matching REGEX
        local f=$1 start=$2
        awk -v a="$start" -v r="$DMA_IF" '
            $0 ~ a {armed = 1}
            armed && $0 == "#ifdef CONFIG_XEN_GRANT_DMA_ALLOC" {$0 = r; armed = 0; done = 1}
            {print}
            END {exit done ? 0 : 1}' "$f" > "$f.new" \
            || { log "no '#ifdef CONFIG_XEN_GRANT_DMA_ALLOC' after /$start/ in $(basename "$f"): source changed?"; exit 1; }
        mv "$f.new" "$f"
    }
    patch_once "$S/gntdev-common.h" '^struct gntdev_priv [{]$'
    patch_once "$S/gntdev.c" '^	flip->private_data = priv;$'
    [ "$(grep -c "^$DMA_IF\$" "$S/gntdev-common.h")" = 1 ] && [ "$(grep -c "^$DMA_IF\$" "$S/gntdev.c")" = 1 ] \
        || { log "patch did not apply"; exit 1; }
    cat > "$S/Kbuild" <<'EOF'
# Out-of-tree xen-gntdev with the dma-buf extension (see build-gntdev-dmabuf.sh).
ccflags-y += -DCONFIG_XEN_GNTDEV_DMABUF
obj-m := xen-gntdev.o
xen-gntdev-y := gntdev.o gntdev-dmabuf.o
EOF
    if ! make -C "$KBUILD" M="$S" modules >"$OUT.tmp/build.log" 2>&1; then
        cat "$OUT.tmp/build.log" >&2
        log "build failed (log above)"; exit 1
    fi
    # Every undefined symbol must be exported by the kernel the kit boots.
    missing=$(modprobe --dump-modversions "$S/xen-gntdev.ko" 2>/dev/null | awk '{print $2}' | while read -r sym; do
        grep -q "	$sym	" "$KBUILD/Module.symvers" || echo "$sym"
    done)
    [ -z "$missing" ] || { log "symbols not exported by $KVER: $missing"; exit 1; }
    cp "$S/xen-gntdev.ko" "$OUT.tmp/xen-gntdev.ko"
    mv "$OUT.tmp" "$OUT"
fi
# Prune this script's older builds (other keys) for the same cache.
for d in "$CACHE"/gntdev-dmabuf-*; do
    [ "$d" = "$OUT" ] || [ ! -d "$d" ] || rm -rf "$d"
done
echo "$OUT/xen-gntdev.ko"
