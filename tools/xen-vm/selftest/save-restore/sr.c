/* sr.c - minimal reproducer for issue #23: a grant mapping across
 * `xl save` + `xl restore` of a PV domU, with UNMAP_NOTIFY_CLEAR_BYTE set.
 *
 * Written from the Linux UAPI headers <xen/sys/gntdev.h> and
 * <xen/sys/gntalloc.h> only (no libxenvchan, no libxengnttab).
 *
 *   sr grant PEER SECONDS KEY
 *       gntalloc: grant one writable page to domain PEER, set an unmap notify
 *       (clear byte 0), write the ref to XenStore KEY (xenstore-write), then
 *       once a second bump the counter at [8] and print the page.  If the file
 *       /tmp/sr-drop-request exists, set byte [2] = 1 (asks the mapper to
 *       unmap) and, once the mapper's live byte [1] is 0, create
 *       /tmp/sr-dropped.  With SR_REGRANT_KEY set: once a second read this
 *       domain's domid from XenStore; when it changes (a restore), grant a new
 *       page to PEER, copy the old page into it, release the old grant and
 *       write the new ref to XenStore SR_REGRANT_KEY.
 *   sr map PEER REF SECONDS [REKEY]
 *       gntdev: map ref REF of domain PEER, set an unmap notify (clear byte 1),
 *       set [1] = 1, then once a second bump the counter at [16] and print
 *       the page.  With REKEY: when [2] becomes 1, unmap (munmap + UNMAP ioctl,
 *       which fires the notify) and poll `xenstore-read REKEY` until a new ref
 *       appears there, then map that one (same PEER) and go on.
 *       With SR_NO_NOTIFY set in the environment, no unmap notify is set.
 *   Both stop early (cleanly: munmap, unmap, close) once /tmp/sr-stop exists.
 *
 * Page layout: [0] granter live byte, [1] mapper live byte, [2] drop request,
 * [8..16) granter counter, [16..24) mapper counter.
 * Every line goes to stdout, flushed (the domU's console log).
 * A SIGSEGV is reported (address, iteration) and then re-raised (default
 * action), so the process dies as it would without the handler.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <xen/sys/gntalloc.h>
#include <xen/sys/gntdev.h>

#define PAGE 4096
static volatile uint8_t *pg;
static volatile long iter;
static const char *role = "?";
static struct timespec t0;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9;
}

static void on_segv(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    char b[160];
    int n = snprintf(b, sizeof b, "SR %s: SIGSEGV at %p (page %p) iteration %ld\n",
                     role, si->si_addr, (void *)pg, iter);
    ssize_t w = write(1, b, n);
    (void)w;
    signal(sig, SIG_DFL);
    raise(sig);
}

static void show(const char *what)
{
    printf("SR %s t=%.1f it=%ld %s live_g=%u live_m=%u drop=%u cnt_g=%llu cnt_m=%llu\n",
           role, now(), iter, what, pg[0], pg[1], pg[2],
           (unsigned long long)*(volatile uint64_t *)(pg + 8),
           (unsigned long long)*(volatile uint64_t *)(pg + 16));
    fflush(stdout);
}

static int xs_domid(char *out, size_t n)  /* this domain's id, as XenStore says now */
{
    FILE *p = popen("xenstore-read domid 2>/dev/null", "r");
    if (!p) return -1;
    if (!fgets(out, n, p)) out[0] = 0;
    pclose(p);
    out[strcspn(out, "\n")] = 0;
    return out[0] ? 0 : -1;
}

static int do_grant(int peer, int secs, const char *key)
{
    int fd = open("/dev/xen/gntalloc", O_RDWR);
    if (fd < 0) { perror("open gntalloc"); return 1; }
    struct ioctl_gntalloc_alloc_gref a = { .domid = peer, .flags = GNTALLOC_FLAG_WRITABLE, .count = 1 };
    if (ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, &a)) { perror("ALLOC_GREF"); return 1; }
    pg = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, a.index);
    if (pg == MAP_FAILED) { perror("mmap gntalloc"); return 1; }
    struct ioctl_gntalloc_unmap_notify un = { .index = a.index + 0, .action = UNMAP_NOTIFY_CLEAR_BYTE };
    if (ioctl(fd, IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, &un)) { perror("GNTALLOC_SET_UNMAP_NOTIFY"); return 1; }
    pg[0] = 1;
    printf("SR grant: ref %u granted to domain %d, index %llu, notify clear byte 0 set\n",
           a.gref_ids[0], peer, (unsigned long long)a.index);
    fflush(stdout);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "xenstore-write %s %u", key, a.gref_ids[0]);
    if (system(cmd) != 0) { fprintf(stderr, "SR grant: %s failed\n", cmd); return 1; }
    int dropped = 0;
    const char *regrant = getenv("SR_REGRANT_KEY");
    char dom0[32] = "", dom[32];
    if (regrant) xs_domid(dom0, sizeof dom0);
    for (iter = 0; iter < secs && access("/tmp/sr-stop", F_OK) != 0; iter++) {
        if (regrant && xs_domid(dom, sizeof dom) == 0 && dom0[0] && strcmp(dom, dom0)) {
            /* restored under a new domid: the old ref is dead; grant a new page,
             * carry the old page's bytes over, publish the new ref */
            show("my domid changed: granting a new page");
            struct ioctl_gntalloc_alloc_gref b = { .domid = peer, .flags = GNTALLOC_FLAG_WRITABLE, .count = 1 };
            if (ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, &b)) { perror("ALLOC_GREF"); return 1; }
            volatile uint8_t *np = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, b.index);
            if (np == MAP_FAILED) { perror("mmap gntalloc"); return 1; }
            memcpy((void *)np, (void *)pg, PAGE);
            np[1] = 0;  /* no mapper on the new page yet */
            struct ioctl_gntalloc_unmap_notify un2 = { .index = b.index, .action = UNMAP_NOTIFY_CLEAR_BYTE };
            if (ioctl(fd, IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, &un2)) { perror("GNTALLOC_SET_UNMAP_NOTIFY"); return 1; }
            munmap((void *)pg, PAGE);
            struct ioctl_gntalloc_dealloc_gref d = { .index = a.index, .count = 1 };
            if (ioctl(fd, IOCTL_GNTALLOC_DEALLOC_GREF, &d)) perror("DEALLOC_GREF (old)");
            pg = np; a = b;
            printf("SR grant: domid %s -> %s: new ref %u granted to domain %d\n", dom0, dom, b.gref_ids[0], peer);
            fflush(stdout);
            snprintf(cmd, sizeof cmd, "xenstore-write %s %u", regrant, b.gref_ids[0]);
            if (system(cmd) != 0) { fprintf(stderr, "SR grant: %s failed\n", cmd); return 1; }
            strcpy(dom0, dom);
        }
        (*(volatile uint64_t *)(pg + 8))++;
        if (!dropped && access("/tmp/sr-drop-request", F_OK) == 0) {
            if (!pg[2]) { pg[2] = 1; show("drop requested"); }
            if (!pg[1]) {
                dropped = 1;
                show("mapper's live byte cleared: it unmapped");
                int f = open("/tmp/sr-dropped", O_CREAT | O_WRONLY, 0644);
                if (f >= 0) close(f);
            }
        }
        show("");
        sleep(1);
    }
    show("done, munmap + close");
    munmap((void *)pg, PAGE);
    close(fd);
    printf("SR grant: exit 0\n");
    return 0;
}

static int map_ref(int fd, int peer, unsigned ref, uint64_t *index)
{
    struct ioctl_gntdev_map_grant_ref m = { .count = 1 };
    m.refs[0].domid = peer;
    m.refs[0].ref = ref;
    if (ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, &m)) { perror("MAP_GRANT_REF"); return -1; }
    void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, m.index);
    if (p == MAP_FAILED) {
        printf("SR map: mmap of ref %u of domain %d failed: %s\n", ref, peer, strerror(errno));
        fflush(stdout);
        return -1;
    }
    pg = p;
    int notify = !getenv("SR_NO_NOTIFY");
    struct ioctl_gntdev_unmap_notify un = { .index = m.index + 1, .action = UNMAP_NOTIFY_CLEAR_BYTE };
    if (notify && ioctl(fd, IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &un)) { perror("GNTDEV_SET_UNMAP_NOTIFY"); return -1; }
    pg[1] = 1;
    *index = m.index;
    printf("SR map: mapped ref %u of domain %d at %p, %s\n", ref, peer, p,
           notify ? "notify clear byte 1 set" : "NO unmap notify (SR_NO_NOTIFY)");
    fflush(stdout);
    return 0;
}

static int unmap_ref(int fd, uint64_t index)
{
    munmap((void *)pg, PAGE);
    struct ioctl_gntdev_unmap_grant_ref u = { .index = index, .count = 1 };
    if (ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &u)) { perror("UNMAP_GRANT_REF"); return -1; }
    pg = NULL;
    return 0;
}

static int do_map(int peer, unsigned ref, int secs, const char *rekey)
{
    int fd = open("/dev/xen/gntdev", O_RDWR);
    if (fd < 0) { perror("open gntdev"); return 1; }
    uint64_t index;
    if (map_ref(fd, peer, ref, &index)) return 1;
    for (iter = 0; iter < secs && access("/tmp/sr-stop", F_OK) != 0; iter++) {
        if (pg) {
            (*(volatile uint64_t *)(pg + 16))++;
            show("");
            if (rekey && pg[2]) {
                show("drop requested: unmapping");
                if (unmap_ref(fd, index)) return 1;
                printf("SR map t=%.1f it=%ld unmapped; waiting for %s\n", now(), iter, rekey);
                fflush(stdout);
            }
        } else {
            char cmd[256], out[64] = "";
            snprintf(cmd, sizeof cmd, "xenstore-read %s 2>/dev/null", rekey);
            FILE *p = popen(cmd, "r");
            if (p) { if (!fgets(out, sizeof out, p)) out[0] = 0; pclose(p); }
            if (out[0]) {
                printf("SR map t=%.1f it=%ld new ref %s", now(), iter, out);
                if (map_ref(fd, peer, (unsigned)strtoul(out, NULL, 10), &index)) return 1;
                rekey = NULL;
            } else {
                printf("SR map t=%.1f it=%ld (unmapped, no new ref yet)\n", now(), iter);
                fflush(stdout);
            }
        }
        sleep(1);
    }
    if (pg) {
        show("done, munmap + UNMAP + close");
        if (unmap_ref(fd, index)) return 1;
    }
    close(fd);
    printf("SR map: exit 0\n");
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct sigaction sa = { .sa_sigaction = on_segv, .sa_flags = SA_SIGINFO };
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    if (argc == 5 && !strcmp(argv[1], "grant")) {
        role = "grant";
        return do_grant(atoi(argv[2]), atoi(argv[3]), argv[4]);
    }
    if ((argc == 5 || argc == 6) && !strcmp(argv[1], "map")) {
        role = "map";
        return do_map(atoi(argv[2]), (unsigned)strtoul(argv[3], NULL, 10), atoi(argv[4]),
                      argc == 6 ? argv[5] : NULL);
    }
    fprintf(stderr, "usage: sr grant PEER SECONDS KEY | sr map PEER REF SECONDS [REKEY]\n");
    return 2;
}
