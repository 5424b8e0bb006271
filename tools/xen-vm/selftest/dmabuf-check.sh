#!/bin/sh
# dmabuf-check.sh — run INSIDE the kit's dom0: replace xen_gntdev by the dma-buf build,
# then run dmabuf-check.c dom0<->dom0 (1 and 4 pages) and dom0->domU (a vgem dma-buf
# imported in dom0, granted to a PV domU, mapped/read/written there, checked in dom0).
#
#   KO=$(tools/xen-vm/build-gntdev-dmabuf.sh)
#   tools/xen-vm/run-in-xen.sh --timeout 900 /work/main "sh tools/xen-vm/selftest/dmabuf-check.sh $KO"
#
# Without KO, --load uses the cached build for the running kernel.  Compiles into
# dom0's /tmp (discarded).  Exit status 0 when every outcome is as expected.  ~70 s.
KIT=$(cd "$(dirname "$0")/.." && pwd)
T=$(mktemp -d /tmp/dmabuf-check.XXXXXX) || exit 1
rc=0
echo "== stock module: $(grep '^xen_gntdev ' /proc/modules)"
cc -O2 -Wall -o "$T/dmabuf-check" "$KIT/selftest/dmabuf-check.c" || exit 1
"$T/dmabuf-check"; echo "== stock module probe rc=$? (2 = ENOTTY, no dma-buf ioctls)"
"$KIT/build-gntdev-dmabuf.sh" --load ${1:+"$1"} || exit 1
echo "== loaded: $(grep '^xen_gntdev ' /proc/modules)"
modprobe vgem || { echo "modprobe vgem failed"; exit 1; }

echo "== dom0 <-> dom0, 1 page"; "$T/dmabuf-check" --pages 1 || rc=1
echo "== dom0 <-> dom0, 4 pages"; "$T/dmabuf-check" --pages 4 || rc=1
echo "== xen_gntdev refcnt after the checks: $(cat /sys/module/xen_gntdev/refcnt) (1 = xenstored only)"

echo "== dom0 -> domU, 4 pages"
D=$("$KIT/xq-domu.sh" start dmabuf --file "$T/dmabuf-check" -- \
    "i=0; while ! R=\$(xenstore-read data/refs 2>/dev/null); do i=\$((i+1)); [ \$i -gt 600 ] && exit 3; sleep 0.5; done; echo \"domU: refs \$R\"; $T/dmabuf-check --map 0 \$R") \
    || { echo "domU start failed"; exit 1; }
mkfifo "$T/ctl"
"$T/dmabuf-check" --serve "$D" 4 < "$T/ctl" > "$T/serve.out" 2>&1 &
SP=$!
exec 3>"$T/ctl"
i=0
until grep -q '^REFS' "$T/serve.out"; do
    i=$((i+1))
    if [ $i -gt 300 ] || ! kill -0 $SP 2>/dev/null; then cat "$T/serve.out"; echo "serve gave no refs"; exit 1; fi
    sleep 0.2
done
R=$(sed -n 's/^REFS //p' "$T/serve.out")
echo "dom0: granted refs $R to domid $D"
xenstore-write "/local/domain/$D/data/refs" "$R" && xenstore-chmod "/local/domain/$D/data/refs" n0 "r$D" || rc=1
"$KIT/xq-domu.sh" wait dmabuf 300 || { echo "domU failed"; rc=1; }
exec 3>&-
wait $SP || rc=1
cat "$T/serve.out"
echo "== dmesg"; dmesg | grep -E 'gntdev|dma.?buf|vgem|WARNING|BUG:|Oops' | tail -n 20
echo "== dmabuf-check.sh rc=$rc"
exit $rc
