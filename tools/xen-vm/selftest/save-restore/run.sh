#!/bin/sh
# Run inside dom0 (issue #23), e.g. from the checkout:
#   tools/xen-vm/run-in-xen.sh --timeout 1200 "$PWD" \
#       'sh tools/xen-vm/selftest/save-restore/run.sh A N B R C'   (no argument: all)
# Scenarios (each starts its own PV domU, xl saves and restores it once):
#   A  dom0 grants a page (gntalloc), the domU maps it (gntdev, UNMAP_NOTIFY
#      clear byte) and keeps touching it; xl save + xl restore the domU.
#      (the reported oops)
#   B  the reverse: the domU grants its own page (gntalloc, UNMAP_NOTIFY clear
#      byte), dom0 maps it (gntdev); xl save + xl restore the domU; then dom0
#      tries a fresh map of the same ref under the new domid.
#   N  as A, but the mapper sets NO unmap notify (SR_NO_NOTIFY=1).
#   R  as B, but the domU process grants a new page when its domid changes
#      (SR_REGRANT_KEY) and dom0, after dropping its stale mapping, maps that.
#   C  as A, but before the save dom0 asks the mapper (a byte in the page) to
#      unmap, waits for the mapper's unmap notify, saves/restores, grants a new
#      page to the new domid and the mapper maps that one.
# Prints every program's lines, xl's output and timings, the domU consoles
# (kernel oopses included) and dom0's new kernel messages. Compiles into /tmp.
cd "$(dirname "$0")"
HERE=$PWD
XQD=${XQD:-${XQ_KIT:-$HERE/../..}/xq-domu.sh}
XL=$(ls -d /usr/lib/xen-4.*/bin | tail -n1)/xl
SR=/tmp/sr-bin/sr
t() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[t=$(t)] $*"; }
mkdir -p /tmp/sr-bin
gcc -O2 -Wall -o $SR sr.c || exit 1

# waitfor FILE PATTERN TIMEOUT: wait until grep -E PATTERN FILE matches
waitfor() {
    i=0
    while ! grep -qE "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt $(($3 * 5)) ] && { log "timeout waiting for /$2/ in $1"; return 1; }
        sleep 0.2
    done
}
waitfile() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1)); [ $i -gt $(($2 * 5)) ] && { log "timeout waiting for $1"; return 1; }
        sleep 0.2
    done
}
clean() { rm -f /tmp/sr-stop /tmp/sr-drop-request /tmp/sr-dropped /tmp/sr-*.log /tmp/sr.save; }
save_restore() {  # NAME: xl save + xl restore, sets D2
    log "xl save $1 /tmp/sr.save"
    s=$(t); $XL save "$1" /tmp/sr.save 2>&1 | sed 's/^/  xl: /'
    log "xl save done in $(echo "$(t) $s" | awk '{print $1-$2}') s; xl list:"; $XL list | sed 's/^/  /'
    s=$(t); $XL restore /tmp/sr.save 2>&1 | sed 's/^/  xl: /'
    D2=$($XL domid "$1")
    log "xl restore done in $(echo "$(t) $s" | awk '{print $1-$2}') s; $1 is now domid $D2; xl list:"
    $XL list | sed 's/^/  /'
}
dmesg_mark() { dmesg | wc -l > /tmp/sr-dmesg-mark; }
dmesg_new() { log "dom0 kernel messages since the scenario began:"; dmesg | tail -n +$(($(cat /tmp/sr-dmesg-mark) + 1)) | sed 's/^/  dom0: /'; }
show_domu() {  # NAME TIMEOUT
    log "waiting for $1 to finish (xq-domu.sh wait $1 $2)"
    sh $XQD wait "$1" "$2" > /tmp/sr-domu.log 2>&1; rc=$?
    sed 's/^/  domU: /' /tmp/sr-domu.log
    log "$1 exit status (xq-domu.sh wait): $rc"
    echo "  raw console tail (/var/log/xen/console/guest-$1.log):"
    tr -d '\r' < /var/log/xen/console/guest-$1.log | tail -n 80 | sed 's/^/  con: /'
}

scenario_A() {  # [NOTIFY-ENV]
    clean; dmesg_mark
    log "== A: dom0 grants (gntalloc), domU maps (gntdev + UNMAP_NOTIFY clear byte unless SR_NO_NOTIFY) $1; save/restore the domU"
    D=$(sh $XQD start sra --mem 128 --file $SR -- \
        "while ! R=\$(xenstore-read data/sr-ref 2>/dev/null); do sleep 0.2; done; $1 $SR map 0 \$R 40") || return 1
    log "domU sra is domid $D"
    $SR grant "$D" 400 /local/domain/$D/data/sr-ref > /tmp/sr-A-dom0.log 2>&1 & G=$!
    waitfor /tmp/sr-A-dom0.log 'cnt_m=[3-9]' 120 || { cat /tmp/sr-A-dom0.log; return 1; }
    log "dom0 sees the domU's counter moving:"; tail -n 2 /tmp/sr-A-dom0.log | sed 's/^/  dom0: /'
    save_restore sra
    sleep 15
    log "dom0 grant process after the restore:"; tail -n 3 /tmp/sr-A-dom0.log | sed 's/^/  dom0: /'
    show_domu sra 60
    touch /tmp/sr-stop; wait $G; log "dom0 grant process exit status $?"
    tail -n 3 /tmp/sr-A-dom0.log | sed 's/^/  dom0: /'
    dmesg_new
}

scenario_N() { scenario_A SR_NO_NOTIFY=1; }

scenario_B() {
    clean; dmesg_mark
    log "== B: domU grants (gntalloc + UNMAP_NOTIFY clear byte), dom0 maps (gntdev); save/restore the domU"
    D=$(sh $XQD start srb --mem 128 --file $SR -- "$SR grant 0 45 data/sr-ref") || return 1
    log "domU srb is domid $D"
    i=0; while ! R=$(xenstore-read /local/domain/$D/data/sr-ref 2>/dev/null); do
        i=$((i + 1)); [ $i -gt 600 ] && { log "no ref from srb"; return 1; }; sleep 0.2; done
    log "srb granted ref $R"
    $SR map "$D" "$R" 400 > /tmp/sr-B-dom0.log 2>&1 & M=$!
    waitfor /tmp/sr-B-dom0.log 'cnt_m=[3-9]' 120 || { cat /tmp/sr-B-dom0.log; return 1; }
    log "dom0 mapping:"; tail -n 2 /tmp/sr-B-dom0.log | sed 's/^/  dom0: /'
    save_restore srb
    sleep 15
    log "dom0's mapping (of the old domain $D) after the restore:"; tail -n 4 /tmp/sr-B-dom0.log | sed 's/^/  dom0: /'
    log "a fresh map of ref $R of the new domid $D2 by dom0:"
    timeout 60 $SR map "$D2" "$R" 3 2>&1 | sed 's/^/  dom0 fresh: /'
    log "(fresh map exit status: see above; xl list:)"; $XL list | sed 's/^/  /'
    show_domu srb 150
    log "dom0's old mapping after the domU exited:"; tail -n 3 /tmp/sr-B-dom0.log | sed 's/^/  dom0: /'
    touch /tmp/sr-stop; wait $M; log "dom0 map process exit status $?"
    tail -n 3 /tmp/sr-B-dom0.log | sed 's/^/  dom0: /'
    sleep 1; log "xl list after dom0 unmapped:"; $XL list | sed 's/^/  /'
    dmesg_new
}

scenario_R() {
    clean; dmesg_mark
    log "== R: as B, but the domU process grants a new page when its domid changes (SR_REGRANT_KEY) and dom0 maps that"
    D=$(sh $XQD start srr --mem 128 --file $SR -- "SR_REGRANT_KEY=data/sr-ref2 $SR grant 0 60 data/sr-ref") || return 1
    log "domU srr is domid $D"
    i=0; while ! R=$(xenstore-read /local/domain/$D/data/sr-ref 2>/dev/null); do
        i=$((i + 1)); [ $i -gt 600 ] && { log "no ref from srr"; return 1; }; sleep 0.2; done
    log "srr granted ref $R"
    $SR map "$D" "$R" 400 > /tmp/sr-R-dom0.log 2>&1 & M=$!
    waitfor /tmp/sr-R-dom0.log 'cnt_m=[3-9]' 120 || { cat /tmp/sr-R-dom0.log; return 1; }
    save_restore srr
    i=0; while ! R2=$(xenstore-read /local/domain/$D2/data/sr-ref2 2>/dev/null); do
        i=$((i + 1)); [ $i -gt 300 ] && { log "no new ref from srr"; break; }; sleep 0.2; done
    log "restored srr (domid $D2) published new ref ${R2:-NONE}; dom0 drops its old mapping:"
    touch /tmp/sr-stop; wait $M; log "dom0 old map process exit status $?"; rm -f /tmp/sr-stop
    tail -n 3 /tmp/sr-R-dom0.log | sed 's/^/  dom0: /'
    log "xl list:"; $XL list | sed 's/^/  /'
    if [ -n "${R2:-}" ]; then
        log "dom0 maps the new ref $R2 of domid $D2 for 8 steps:"
        timeout 60 $SR map "$D2" "$R2" 8 2>&1 | sed 's/^/  dom0 new: /'
    fi
    show_domu srr 120
    dmesg_new
}

scenario_C() {
    clean; dmesg_mark
    log "== C: as A, but the mapper unmaps before the save (asked through the page) and maps a new grant after"
    D=$(sh $XQD start src --mem 128 --file $SR -- \
        "while ! R=\$(xenstore-read data/sr-ref 2>/dev/null); do sleep 0.2; done; $SR map 0 \$R 60 data/sr-ref2") || return 1
    log "domU src is domid $D"
    $SR grant "$D" 400 /local/domain/$D/data/sr-ref > /tmp/sr-C-dom0.log 2>&1 & G=$!
    waitfor /tmp/sr-C-dom0.log 'cnt_m=[3-9]' 120 || { cat /tmp/sr-C-dom0.log; return 1; }
    touch /tmp/sr-drop-request; log "drop requested"
    waitfile /tmp/sr-dropped 60 || return 1
    log "the mapper's unmap notify cleared its live byte:"; grep -E 'drop|unmapped' /tmp/sr-C-dom0.log | sed 's/^/  dom0: /'
    save_restore src
    $SR grant "$D2" 400 /local/domain/$D2/data/sr-ref2 > /tmp/sr-C2-dom0.log 2>&1 & G2=$!
    waitfor /tmp/sr-C2-dom0.log 'cnt_m=[3-9]' 120 && {
        log "dom0's new grant to $D2 sees the restored mapper:"; tail -n 2 /tmp/sr-C2-dom0.log | sed 's/^/  dom0: /'; }
    show_domu src 120
    touch /tmp/sr-stop; wait $G; log "dom0 first grant process exit status $?"
    wait $G2; log "dom0 second grant process exit status $?"
    tail -n 3 /tmp/sr-C2-dom0.log | sed 's/^/  dom0: /'
    dmesg_new
}

[ $# -eq 0 ] && set -- A N B R C
for sc in "$@"; do scenario_$sc; log "scenario $sc returned $?"; done
