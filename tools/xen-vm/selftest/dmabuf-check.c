/*
 * dmabuf-check.c — exercise the four gntdev dma-buf ioctls on the real driver, in
 * one domain talking to itself (domid 0 by default), and report what each does.
 *
 *   cc -O2 -Wall -Wextra -o /tmp/dmabuf-check tools/xen-vm/selftest/dmabuf-check.c
 *   /tmp/dmabuf-check [--domid N] [--pages N]
 *   /tmp/dmabuf-check --serve PEER_DOMID [PAGES]   (dom0; prints "REFS ...", waits for EOF)
 *   /tmp/dmabuf-check --map OWNER_DOMID REF...     (the peer: map, check, write back)
 *
 * Export side: a page shared with gntalloc (to ourselves) is exported with
 * IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS; if the driver gives a dma-buf fd, it is
 * mmapped (the gntdev exporter has no mmap op: EINVAL expected), waited on with
 * IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED (a timeout while the fd is open, success
 * once closed), and fed back to IOCTL_GNTDEV_DMABUF_IMP_TO_REFS / _IMP_RELEASE.
 * Import side: a dma-buf from vgem (DRM "virtual GEM", `modprobe vgem` first) is
 * filled through its own mmap, granted with IMP_TO_REFS, the refs are mapped back
 * with gntdev and compared both ways, then IMP_RELEASE'd.
 *
 * Every step prints one line "STEP name: OK ..." or "STEP name: FAIL errno ...".
 * Expected outcomes are checked: on a PV guest (/sys/hypervisor/guest_type "PV",
 * the kit's dom0 and domUs) the driver refuses EXP_FROM_REFS with EINVAL
 * (use_ptemod: the granted pages are only mapped into user page tables, never into
 * the kernel, so there is nothing to hand to a dma-buf importer).  Exit status:
 * 0 all as expected, 1 an unexpected outcome, 2 cannot run (no device, no ioctl).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xen/sys/gntalloc.h>
#include <xen/sys/gntdev.h>
#include <linux/dma-buf.h>

/* DRM uapi (include/uapi/drm/drm.h, drm_mode.h): stable ABI, declared here so the
 * check needs no libdrm-dev. */
struct xq_drm_version {
    int version_major, version_minor, version_patchlevel;
    size_t name_len; char *name;
    size_t date_len; char *date;
    size_t desc_len; char *desc;
};
struct xq_drm_mode_create_dumb {
    uint32_t height, width, bpp, flags, handle, pitch;
    uint64_t size;
};
struct xq_drm_prime_handle { uint32_t handle, flags; int32_t fd; };
struct xq_drm_gem_close { uint32_t handle, pad; };
#define XQ_DRM_IOCTL_VERSION _IOWR('d', 0x00, struct xq_drm_version)
#define XQ_DRM_IOCTL_GEM_CLOSE _IOW('d', 0x09, struct xq_drm_gem_close)
#define XQ_DRM_IOCTL_PRIME_HANDLE_TO_FD _IOWR('d', 0x2d, struct xq_drm_prime_handle)
#define XQ_DRM_IOCTL_MODE_CREATE_DUMB _IOWR('d', 0xB2, struct xq_drm_mode_create_dumb)

static int unexpected;
static long pagesz;

static void step_ok(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void step_ok(const char *name, const char *fmt, ...)
{
    va_list ap;
    printf("STEP %s: OK", name);
    if (fmt && *fmt) {
        printf(" ");
        va_start(ap, fmt); vprintf(fmt, ap); va_end(ap);
    }
    printf("\n");
    fflush(stdout);
}

/* A failed call: expected_errno 0 means success was expected. */
static void step_fail(const char *name, int err, int expected_errno, const char *why)
{
    int as_expected = expected_errno != 0 && err == expected_errno;
    const char *en = strerrorname_np(err);
    printf("STEP %s: FAIL errno %d (%s) [%s%s%s]\n", name, err, en ? en : "?",
           as_expected ? "expected" : "UNEXPECTED", why && *why ? ": " : "", why ? why : "");
    fflush(stdout);
    if (!as_expected) unexpected = 1;
}

static void step_bad(const char *name, const char *what)
{
    printf("STEP %s: UNEXPECTED %s\n", name, what);
    fflush(stdout);
    unexpected = 1;
}

static int is_pv_guest(void)
{
    char buf[16] = {0};
    FILE *f = fopen("/sys/hypervisor/guest_type", "r");
    if (!f) return 0;
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    return strncmp(buf, "PV\n", 3) == 0 || strcmp(buf, "PV") == 0;
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed * 131u + i * 7u + (i >> 12));
}

static int same(const unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(seed * 131u + i * 7u + (i >> 12))) return 0;
    return 1;
}

/* IMP_TO_REFS on fd; returns malloc'd refs or NULL (errno set). */
static uint32_t *imp_to_refs(int gntdev, int fd, uint32_t count, uint32_t domid)
{
    size_t sz = sizeof(struct ioctl_gntdev_dmabuf_imp_to_refs) + count * sizeof(uint32_t);
    struct ioctl_gntdev_dmabuf_imp_to_refs *op = calloc(1, sz);
    if (!op) return NULL;
    op->fd = (uint32_t)fd; op->count = count; op->domid = domid;
    if (ioctl(gntdev, IOCTL_GNTDEV_DMABUF_IMP_TO_REFS, op) < 0) {
        int e = errno; free(op); errno = e; return NULL;
    }
    uint32_t *refs = malloc(count * sizeof(uint32_t));
    if (refs) memcpy(refs, op->refs, count * sizeof(uint32_t));
    free(op);
    return refs;
}

static int imp_release(int gntdev, int fd)
{
    struct ioctl_gntdev_dmabuf_imp_release op = { .fd = (uint32_t)fd, .reserved = 0 };
    return ioctl(gntdev, IOCTL_GNTDEV_DMABUF_IMP_RELEASE, &op);
}

static int wait_released(int gntdev, int fd, uint32_t ms)
{
    struct ioctl_gntdev_dmabuf_exp_wait_released op = { .fd = (uint32_t)fd, .wait_to_ms = ms };
    return ioctl(gntdev, IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED, &op);
}

/* Map `count` grant refs of `domid` through gntdev; returns the mapping or NULL. */
static unsigned char *map_refs(int gntdev, const uint32_t *refs, uint32_t count, uint32_t domid, uint64_t *index)
{
    size_t sz = sizeof(struct ioctl_gntdev_map_grant_ref) + count * sizeof(struct ioctl_gntdev_grant_ref);
    struct ioctl_gntdev_map_grant_ref *op = calloc(1, sz);
    if (!op) return NULL;
    op->count = count;
    for (uint32_t i = 0; i < count; i++) { op->refs[i].domid = domid; op->refs[i].ref = refs[i]; }
    if (ioctl(gntdev, IOCTL_GNTDEV_MAP_GRANT_REF, op) < 0) { int e = errno; free(op); errno = e; return NULL; }
    *index = op->index;
    free(op);
    void *p = mmap(NULL, count * (size_t)pagesz, PROT_READ | PROT_WRITE, MAP_SHARED, gntdev, (off_t)*index);
    if (p == MAP_FAILED) {
        int e = errno;
        struct ioctl_gntdev_unmap_grant_ref un = { .index = *index, .count = count };
        ioctl(gntdev, IOCTL_GNTDEV_UNMAP_GRANT_REF, &un);
        errno = e;
        return NULL;
    }
    return p;
}

static void unmap_refs(int gntdev, unsigned char *p, uint32_t count, uint64_t index)
{
    munmap(p, count * (size_t)pagesz);
    struct ioctl_gntdev_unmap_grant_ref un = { .index = index, .count = count };
    if (ioctl(gntdev, IOCTL_GNTDEV_UNMAP_GRANT_REF, &un) < 0) step_fail("gntdev-unmap", errno, 0, "");
}

/* ------------------------------------------------------------- export side --- */
static void export_side(int gntdev, uint32_t domid, uint32_t count, int pv)
{
    int ga = open("/dev/xen/gntalloc", O_RDWR | O_CLOEXEC);
    if (ga < 0) { step_fail("open-gntalloc", errno, 0, "/dev/xen/gntalloc"); return; }
    size_t asz = sizeof(struct ioctl_gntalloc_alloc_gref) + count * sizeof(uint32_t);
    struct ioctl_gntalloc_alloc_gref *al = calloc(1, asz);
    al->domid = (uint16_t)domid; al->flags = GNTALLOC_FLAG_WRITABLE; al->count = count;
    if (ioctl(ga, IOCTL_GNTALLOC_ALLOC_GREF, al) < 0) {
        step_fail("gntalloc-alloc", errno, 0, ""); free(al); close(ga); return;
    }
    unsigned char *shared = mmap(NULL, count * (size_t)pagesz, PROT_READ | PROT_WRITE, MAP_SHARED, ga, (off_t)al->index);
    if (shared == MAP_FAILED) { step_fail("gntalloc-mmap", errno, 0, ""); shared = NULL; }
    else fill(shared, count * (size_t)pagesz, 1);
    step_ok("gntalloc-alloc", "%u page(s), first ref %u, shared with domid %u", count, al->gref_ids[0], domid);

    size_t esz = sizeof(struct ioctl_gntdev_dmabuf_exp_from_refs) + count * sizeof(uint32_t);
    struct ioctl_gntdev_dmabuf_exp_from_refs *ex = calloc(1, esz);
    ex->flags = 0; ex->count = count; ex->domid = domid;
    memcpy(ex->refs, al->gref_ids, count * sizeof(uint32_t));
    if (ioctl(gntdev, IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS, ex) < 0) {
        step_fail("exp-from-refs", errno, pv ? EINVAL : 0,
                  pv ? "PV guest: the driver refuses export when use_ptemod is set" : "");
    } else {
        int fd = (int)ex->fd;
        step_ok("exp-from-refs", "dma-buf fd %d", fd);
        if (pv) step_bad("exp-from-refs", "succeeded on a PV guest");
        void *p = mmap(NULL, count * (size_t)pagesz, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) step_fail("exp-mmap", errno, EINVAL, "the gntdev dma-buf exporter has no mmap op");
        else {
            step_ok("exp-mmap", "content %s", same(p, count * (size_t)pagesz, 1) ? "matches" : "DIFFERS");
            munmap(p, count * (size_t)pagesz);
        }
        /* While the fd is open the buffer is not released: a timeout. */
        if (wait_released(gntdev, fd, 200) < 0) step_fail("exp-wait-released(open)", errno, ETIMEDOUT, "fd still open");
        else step_bad("exp-wait-released(open)", "returned 0 while the fd is open");
        /* Import our own export: the driver's importer on the driver's exporter. */
        uint32_t *refs = imp_to_refs(gntdev, fd, count, domid);
        if (!refs) step_fail("imp-to-refs(own export)", errno, 0, "");
        else {
            step_ok("imp-to-refs(own export)", "first ref %u", refs[0]);
            free(refs);
            if (imp_release(gntdev, fd) < 0) step_fail("imp-release(own export)", errno, 0, "");
            else step_ok("imp-release(own export)", NULL);
        }
        close(fd);
        if (wait_released(gntdev, fd, 5000) < 0)
            /* ENOENT: already released and forgotten before the wait started. */
            step_fail("exp-wait-released(closed)", errno, ENOENT, "released before the wait began");
        else step_ok("exp-wait-released(closed)", "released after close");
    }
    /* An fd that was never exported: ENOENT. */
    if (wait_released(gntdev, 1000000, 10) < 0) step_fail("exp-wait-released(unknown fd)", errno, ENOENT, "");
    else step_bad("exp-wait-released(unknown fd)", "returned 0");
    free(ex);
    if (shared) munmap(shared, count * (size_t)pagesz);
    struct ioctl_gntalloc_dealloc_gref de = { .index = al->index, .count = count };
    if (ioctl(ga, IOCTL_GNTALLOC_DEALLOC_GREF, &de) < 0) step_fail("gntalloc-dealloc", errno, 0, "");
    free(al);
    close(ga);
}

/* ------------------------------------------------------------- import side --- */
static int open_vgem(void)
{
    char path[32], name[32];
    for (int i = 0; i < 16; i++) {
        snprintf(path, sizeof path, "/dev/dri/card%d", i);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) continue;
        struct xq_drm_version v = {0};
        memset(name, 0, sizeof name);
        v.name = name; v.name_len = sizeof name - 1;
        if (ioctl(fd, XQ_DRM_IOCTL_VERSION, &v) == 0 && strcmp(name, "vgem") == 0) return fd;
        close(fd);
    }
    return -1;
}

static void import_side(int gntdev, uint32_t domid, uint32_t count)
{
    int drm = open_vgem();
    if (drm < 0) { step_bad("open-vgem", "no vgem /dev/dri/card*: run `modprobe vgem` first"); return; }
    struct xq_drm_mode_create_dumb cd = { .height = count, .width = (uint32_t)pagesz / 4, .bpp = 32 };
    if (ioctl(drm, XQ_DRM_IOCTL_MODE_CREATE_DUMB, &cd) < 0) { step_fail("vgem-create-dumb", errno, 0, ""); close(drm); return; }
    struct xq_drm_prime_handle ph = { .handle = cd.handle, .flags = O_CLOEXEC | O_RDWR };
    if (ioctl(drm, XQ_DRM_IOCTL_PRIME_HANDLE_TO_FD, &ph) < 0) { step_fail("vgem-prime-export", errno, 0, ""); goto out_gem; }
    int fd = ph.fd;
    size_t len = count * (size_t)pagesz;
    step_ok("vgem-dma-buf", "fd %d, %llu bytes", fd, (unsigned long long)cd.size);
    unsigned char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (buf == MAP_FAILED) { step_fail("vgem-mmap", errno, 0, ""); close(fd); goto out_gem; }
    struct dma_buf_sync sy = { .flags = DMA_BUF_SYNC_START | DMA_BUF_SYNC_RW };
    ioctl(fd, DMA_BUF_IOCTL_SYNC, &sy);
    fill(buf, len, 2);
    sy.flags = DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW;
    ioctl(fd, DMA_BUF_IOCTL_SYNC, &sy);

    /* Wrong page count: the driver checks the size (EINVAL). */
    uint32_t *bad = imp_to_refs(gntdev, fd, count + 1, domid);
    if (bad) { step_bad("imp-to-refs(wrong count)", "succeeded"); free(bad); imp_release(gntdev, fd); }
    else step_fail("imp-to-refs(wrong count)", errno, EINVAL, "size mismatch");
    /* Not a dma-buf: EINVAL from dma_buf_get. */
    bad = imp_to_refs(gntdev, drm, 1, domid);
    if (bad) { step_bad("imp-to-refs(not a dma-buf)", "succeeded"); free(bad); imp_release(gntdev, drm); }
    else step_fail("imp-to-refs(not a dma-buf)", errno, EINVAL, "");

    uint32_t *refs = imp_to_refs(gntdev, fd, count, domid);
    if (!refs) { step_fail("imp-to-refs", errno, 0, ""); goto out_map; }
    step_ok("imp-to-refs", "%u ref(s), first %u, granted to domid %u", count, refs[0], domid);
    uint64_t index;
    unsigned char *g = map_refs(gntdev, refs, count, domid, &index);
    if (!g) step_fail("gntdev-map(imported refs)", errno, 0, "");
    else {
        if (same(g, len, 2)) step_ok("read-through-grant", "the grant mapping shows the dma-buf's bytes");
        else step_bad("read-through-grant", "the grant mapping does NOT show the dma-buf's bytes");
        fill(g, len, 3);
        sy.flags = DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ;
        ioctl(fd, DMA_BUF_IOCTL_SYNC, &sy);
        if (same(buf, len, 3)) step_ok("write-through-grant", "the dma-buf's mmap shows bytes written via the grant");
        else step_bad("write-through-grant", "the dma-buf's mmap does NOT show bytes written via the grant");
        sy.flags = DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ;
        ioctl(fd, DMA_BUF_IOCTL_SYNC, &sy);
        unmap_refs(gntdev, g, count, index);
    }
    free(refs);
    if (imp_release(gntdev, fd) < 0) step_fail("imp-release", errno, 0, "");
    else step_ok("imp-release", NULL);
    if (imp_release(gntdev, fd) < 0) step_fail("imp-release(again)", errno, ENOENT, "already released");
    else step_bad("imp-release(again)", "returned 0");
    /* Imported and left unreleased: closing gntdev must clean it up (checked by the
     * caller through dmesg / a clean module unload). */
    refs = imp_to_refs(gntdev, fd, count, domid);
    if (refs) { step_ok("imp-to-refs(left for close)", NULL); free(refs); }
    else step_fail("imp-to-refs(left for close)", errno, 0, "");
out_map:
    munmap(buf, len);
    close(fd);
out_gem:;
    struct xq_drm_gem_close gc = { .handle = cd.handle };
    ioctl(drm, XQ_DRM_IOCTL_GEM_CLOSE, &gc);
    close(drm);
}

/* ------------------------------------------------ cross-domain (dom0 <-> domU) --- */
/* --serve DOMID: import a vgem dma-buf (pattern 2), grant it to DOMID, print
 * "REFS r0 r1 ...", wait for EOF on stdin (at most 600 s), then check through the
 * dma-buf's own mapping that the peer wrote pattern 3, and release. */
static int serve(int gntdev, uint32_t peer, uint32_t count)
{
    int drm = open_vgem();
    if (drm < 0) { step_bad("open-vgem", "no vgem /dev/dri/card*: run `modprobe vgem` first"); return 1; }
    struct xq_drm_mode_create_dumb cd = { .height = count, .width = (uint32_t)pagesz / 4, .bpp = 32 };
    struct xq_drm_prime_handle ph = { .flags = O_CLOEXEC | O_RDWR };
    if (ioctl(drm, XQ_DRM_IOCTL_MODE_CREATE_DUMB, &cd) < 0) { step_fail("vgem-create-dumb", errno, 0, ""); return 1; }
    ph.handle = cd.handle;
    if (ioctl(drm, XQ_DRM_IOCTL_PRIME_HANDLE_TO_FD, &ph) < 0) { step_fail("vgem-prime-export", errno, 0, ""); return 1; }
    size_t len = count * (size_t)pagesz;
    unsigned char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, ph.fd, 0);
    if (buf == MAP_FAILED) { step_fail("vgem-mmap", errno, 0, ""); return 1; }
    fill(buf, len, 2);
    uint32_t *refs = imp_to_refs(gntdev, ph.fd, count, peer);
    if (!refs) { step_fail("imp-to-refs(peer)", errno, 0, ""); return 1; }
    printf("REFS");
    for (uint32_t i = 0; i < count; i++) printf(" %u", refs[i]);
    printf("\n");
    fflush(stdout);
    alarm(600);
    char tmp[64];
    while (read(0, tmp, sizeof tmp) > 0) {}
    alarm(0);
    struct dma_buf_sync sy = { .flags = DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ };
    ioctl(ph.fd, DMA_BUF_IOCTL_SYNC, &sy);
    if (same(buf, len, 3)) step_ok("peer-wrote", "the dma-buf shows the bytes domid %u wrote through the grants", peer);
    else step_bad("peer-wrote", "the dma-buf does NOT show the peer's bytes");
    sy.flags = DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ;
    ioctl(ph.fd, DMA_BUF_IOCTL_SYNC, &sy);
    if (imp_release(gntdev, ph.fd) < 0) step_fail("imp-release(peer)", errno, 0, "");
    else step_ok("imp-release(peer)", NULL);
    free(refs);
    return unexpected;
}

/* --map DOMID REF...: map the refs (a plain gntdev map, no dma-buf ioctl), check
 * pattern 2, write pattern 3. */
static int map_peer(int gntdev, uint32_t peer, const uint32_t *refs, uint32_t count)
{
    uint64_t index;
    unsigned char *g = map_refs(gntdev, refs, count, peer, &index);
    if (!g) { step_fail("gntdev-map(peer refs)", errno, 0, ""); return 1; }
    size_t len = count * (size_t)pagesz;
    if (same(g, len, 2)) step_ok("peer-read", "the mapped grants show the dma-buf's bytes");
    else step_bad("peer-read", "the mapped grants do NOT show the dma-buf's bytes");
    fill(g, len, 3);
    unmap_refs(gntdev, g, count, index);
    return unexpected;
}

int main(int argc, char **argv)
{
    uint32_t domid = 0, count = 1;
    if (argc >= 3 && (!strcmp(argv[1], "--serve") || !strcmp(argv[1], "--map"))) {
        pagesz = sysconf(_SC_PAGESIZE);
        int gntdev = open("/dev/xen/gntdev", O_RDWR | O_CLOEXEC);
        if (gntdev < 0) { perror("dmabuf-check: /dev/xen/gntdev"); return 2; }
        uint32_t peer = (uint32_t)strtoul(argv[2], NULL, 0);
        if (!strcmp(argv[1], "--serve"))
            return serve(gntdev, peer, argc >= 4 ? (uint32_t)strtoul(argv[3], NULL, 0) : 1);
        uint32_t n = (uint32_t)(argc - 3), refs[256];
        if (n < 1 || n > 256) { fprintf(stderr, "--map DOMID REF...: 1..256 refs\n"); return 2; }
        for (uint32_t i = 0; i < n; i++) refs[i] = (uint32_t)strtoul(argv[3 + i], NULL, 0);
        return map_peer(gntdev, peer, refs, n);
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--domid") && i + 1 < argc) domid = (uint32_t)strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--pages") && i + 1 < argc) count = (uint32_t)strtoul(argv[++i], NULL, 0);
        else { fprintf(stderr, "usage: %s [--domid N] [--pages N] | --serve PEER [PAGES] | --map OWNER REF...\n", argv[0]); return 2; }
    }
    if (count < 1 || count > 256) { fprintf(stderr, "--pages: 1..256\n"); return 2; }
    pagesz = sysconf(_SC_PAGESIZE);
    int pv = is_pv_guest();
    printf("dmabuf-check: domid %u, %u page(s), guest type %s\n", domid, count, pv ? "PV" : "not PV");
    int gntdev = open("/dev/xen/gntdev", O_RDWR | O_CLOEXEC);
    if (gntdev < 0) { perror("dmabuf-check: /dev/xen/gntdev"); return 2; }
    /* Probe: an unknown fd makes a dma-buf-capable driver answer ENOENT, a driver
     * built without CONFIG_XEN_GNTDEV_DMABUF answers ENOTTY. */
    if (wait_released(gntdev, 1000000, 0) < 0 && errno == ENOTTY) {
        printf("dmabuf-check: ENOTTY: this gntdev has no dma-buf ioctls (built without CONFIG_XEN_GNTDEV_DMABUF)\n");
        return 2;
    }
    export_side(gntdev, domid, count, pv);
    import_side(gntdev, domid, count);
    close(gntdev);
    printf("dmabuf-check: %s\n", unexpected ? "UNEXPECTED outcomes (see above)" : "all outcomes as expected");
    return unexpected ? 1 : 0;
}
