/* gntipc native core: syscall helpers and the vchan ring primitives.
 *
 * All memory-ordering-sensitive code of gntipc lives here.  Shared memory is hostile
 * input: a peer index is loaded once, checked, and only then used; no address outside
 * [data, data + size) is ever computed from it.
 */
#include <errno.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

/* _build.py replaces the next line by the text of _cdefs.h (without its cffi-only part). */
#include "_cdefs.h"

/* ----------------------------------------------- layout self-checks (x86-64 / arm64) */
#define GNT_CHECK_IOC(name, type, nr, st) \
    _Static_assert((name) == _IOC(_IOC_NONE, (type), (nr), sizeof(st)), #name)

GNT_CHECK_IOC(IOCTL_GNTDEV_MAP_GRANT_REF, 'G', 0, struct ioctl_gntdev_map_grant_ref);
GNT_CHECK_IOC(IOCTL_GNTDEV_UNMAP_GRANT_REF, 'G', 1, struct ioctl_gntdev_unmap_grant_ref);
GNT_CHECK_IOC(IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, 'G', 2,
              struct ioctl_gntdev_get_offset_for_vaddr);
GNT_CHECK_IOC(IOCTL_GNTDEV_SET_MAX_GRANTS, 'G', 3, struct ioctl_gntdev_set_max_grants);
GNT_CHECK_IOC(IOCTL_GNTDEV_SET_UNMAP_NOTIFY, 'G', 7, struct ioctl_gntdev_unmap_notify);
GNT_CHECK_IOC(IOCTL_GNTDEV_GRANT_COPY, 'G', 8, struct ioctl_gntdev_grant_copy);
GNT_CHECK_IOC(IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS, 'G', 9,
              struct ioctl_gntdev_dmabuf_exp_from_refs);
GNT_CHECK_IOC(IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED, 'G', 10,
              struct ioctl_gntdev_dmabuf_exp_wait_released);
GNT_CHECK_IOC(IOCTL_GNTDEV_DMABUF_IMP_TO_REFS, 'G', 11,
              struct ioctl_gntdev_dmabuf_imp_to_refs);
GNT_CHECK_IOC(IOCTL_GNTDEV_DMABUF_IMP_RELEASE, 'G', 12,
              struct ioctl_gntdev_dmabuf_imp_release);
GNT_CHECK_IOC(IOCTL_GNTALLOC_ALLOC_GREF, 'G', 5, struct ioctl_gntalloc_alloc_gref);
GNT_CHECK_IOC(IOCTL_GNTALLOC_DEALLOC_GREF, 'G', 6, struct ioctl_gntalloc_dealloc_gref);
GNT_CHECK_IOC(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, 'G', 7, struct ioctl_gntalloc_unmap_notify);
GNT_CHECK_IOC(IOCTL_EVTCHN_BIND_VIRQ, 'E', 0, struct ioctl_evtchn_bind_virq);
GNT_CHECK_IOC(IOCTL_EVTCHN_BIND_INTERDOMAIN, 'E', 1, struct ioctl_evtchn_bind_interdomain);
GNT_CHECK_IOC(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 'E', 2, struct ioctl_evtchn_bind_unbound_port);
GNT_CHECK_IOC(IOCTL_EVTCHN_UNBIND, 'E', 3, struct ioctl_evtchn_unbind);
GNT_CHECK_IOC(IOCTL_EVTCHN_NOTIFY, 'E', 4, struct ioctl_evtchn_notify);
GNT_CHECK_IOC(IOCTL_EVTCHN_RESTRICT_DOMID, 'E', 6, struct ioctl_evtchn_restrict_domid);
GNT_CHECK_IOC(IOCTL_PRIVCMD_HYPERCALL, 'P', 0, struct privcmd_hypercall);
_Static_assert(IOCTL_EVTCHN_RESET == _IOC(_IOC_NONE, 'E', 5, 0), "IOCTL_EVTCHN_RESET");
_Static_assert(sizeof(struct evtchn_status) == 24, "struct evtchn_status");
_Static_assert(sizeof(struct gntdev_grant_copy_segment) == 24, "grant copy segment");

/* ------------------------------------------------------------ syscall helpers */
int gnt_ioctl(int fd, unsigned long req, void *arg)
{
    return ioctl(fd, req, arg);
}

void *gnt_mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off)
{
    void *p = mmap(addr, len, prot, flags, fd, (off_t)off);
    if (p == MAP_FAILED)
        return NULL;      /* errno is set by mmap */
    return p;
}

int gnt_munmap(void *addr, size_t len)
{
    return munmap(addr, len);
}

int gnt_mlock(const void *addr, size_t len)
{
    return mlock(addr, len);
}

int gnt_munlock(const void *addr, size_t len)
{
    return munlock(addr, len);
}

/* ------------------------------------------------------------- atomic accessors */
uint8_t gnt_load_u8(const uint8_t *p)
{
    /* Acquire: whatever the peer wrote before storing this byte is visible after it. */
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

void gnt_store_u8(uint8_t *p, uint8_t v)
{
    /* Release: our earlier writes are visible to a peer that sees this byte. */
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

uint32_t gnt_load_u32(const uint32_t *p)
{
    /* Acquire: ring bytes the peer wrote before publishing this index are visible. */
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

void gnt_store_u32(uint32_t *p, uint32_t v)
{
    /* Release: our ring copies complete before the peer can see the new index. */
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

uint8_t gnt_fetch_or_u8(uint8_t *p, uint8_t bits)
{
    /* seq_cst: totally ordered with the peer's fetch-and-clear and both sides' fences. */
    return __atomic_fetch_or(p, bits, __ATOMIC_SEQ_CST);
}

uint8_t gnt_fetch_and_not_u8(uint8_t *p, uint8_t bits)
{
    /* seq_cst: see gnt_fetch_or_u8. */
    return __atomic_fetch_and(p, (uint8_t)~bits, __ATOMIC_SEQ_CST);
}

void gnt_full_fence(void)
{
    /* Orders all earlier loads and stores before all later ones (the caller says why). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* --------------------------------------------------------------- ring primitives */
static int gnt_ring_ok(const struct gnt_ring *r)
{
    uint32_t s = r->size;
    return s >= GNT_RING_MIN_SIZE && s <= GNT_RING_MAX_SIZE && (s & (s - 1)) == 0;
}

/* Bytes the writer has published and the reader not yet consumed, from the reader's
 * private cons and one acquire load of the peer's prod; -1 if the gap is impossible. */
static int64_t gnt_ring_readable(const struct gnt_ring *r)
{
    /* Acquire, read once: the ring bytes below prod are visible before we copy them. */
    uint32_t prod = __atomic_load_n(r->prod, __ATOMIC_ACQUIRE);
    uint32_t avail = prod - r->priv;     /* u32 arithmetic: wraps at 2^32 */
    if (avail > r->size)
        return GNT_RING_EPROTO;
    return avail;
}

/* Free space for the writer, from its private prod and one acquire load of cons. */
static int64_t gnt_ring_writable(const struct gnt_ring *r)
{
    /* Acquire, read once: the reader finished copying bytes below cons before we overwrite. */
    uint32_t cons = __atomic_load_n(r->cons, __ATOMIC_ACQUIRE);
    uint32_t used = r->priv - cons;
    if (used > r->size)
        return GNT_RING_EPROTO;
    return (int64_t)r->size - used;
}

/* Copy n <= size bytes into the ring at index idx, wrapping once at most. */
static void gnt_copy_in(const struct gnt_ring *r, uint32_t idx, const uint8_t *src, uint32_t n)
{
    uint32_t pos = idx & (r->size - 1);
    uint32_t first = r->size - pos;
    if (first > n)
        first = n;
    memcpy(r->data + pos, src, first);
    if (n > first)
        memcpy(r->data, src + first, n - first);
}

static void gnt_copy_out(const struct gnt_ring *r, uint32_t idx, uint8_t *dst, uint32_t n)
{
    uint32_t pos = idx & (r->size - 1);
    uint32_t first = r->size - pos;
    if (first > n)
        first = n;
    memcpy(dst, r->data + pos, first);
    if (n > first)
        memcpy(dst + first, r->data, n - first);
}

/* How many bytes to copy between two index publications: a quarter of the ring, so that
 * the two sides overlap on a ring that one large copy would fill (a writer that fills
 * the whole ring in one publication leaves the reader idle until it ends, then waits
 * itself for the whole drain). */
static uint32_t gnt_publish_step(const struct gnt_ring *r)
{
    return r->size / 4;
}

/* After moving our index: did the peer ask to hear about it? */
static int gnt_ring_take_notify(struct gnt_ring *r, uint8_t bit)
{
    /* Full fence: our index store must be globally visible before we test the peer's
     * request bit, or a peer that set the bit and then re-read the old index would sleep
     * while we skip the event (the lost wake-up). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return (__atomic_fetch_and(r->own_notify, (uint8_t)~bit, __ATOMIC_SEQ_CST) & bit) != 0;
}

int64_t gnt_ring_write(struct gnt_ring *r, const void *src, size_t len, int all_or_nothing,
                       int *notify)
{
    int64_t space;
    uint32_t n, step, done, piece;

    *notify = 0;
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    space = gnt_ring_writable(r);
    if (space < 0)
        return space;
    if ((uint64_t)len > (uint64_t)space) {
        if (all_or_nothing)
            return 0;
        n = (uint32_t)space;
    } else {
        n = (uint32_t)len;
    }
    if (n == 0)
        return 0;
    step = gnt_publish_step(r);
    for (done = 0; done < n; done += piece) {
        piece = n - done < step ? n - done : step;
        gnt_copy_in(r, r->priv, (const uint8_t *)src + done, piece);
        r->priv += piece;
        /* Release: the bytes copied above are visible before the reader can see the new
         * prod.  Published piece by piece, so that a reader spinning on the other core
         * starts copying out while we still copy in. */
        __atomic_store_n(r->prod, r->priv, __ATOMIC_RELEASE);
    }
    *notify = gnt_ring_take_notify(r, GNT_NOTIFY_WRITE);
    return n;
}

int64_t gnt_ring_read(struct gnt_ring *r, void *dst, size_t len, int all_or_nothing,
                      int *notify)
{
    int64_t avail;
    uint32_t n, step, done, piece;

    *notify = 0;
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    avail = gnt_ring_readable(r);
    if (avail < 0)
        return avail;
    if ((uint64_t)len > (uint64_t)avail) {
        if (all_or_nothing)
            return 0;
        n = (uint32_t)avail;
    } else {
        n = (uint32_t)len;
    }
    if (n == 0)
        return 0;
    step = gnt_publish_step(r);
    for (done = 0; done < n; done += piece) {
        piece = n - done < step ? n - done : step;
        gnt_copy_out(r, r->priv, (uint8_t *)dst + done, piece);
        r->priv += piece;
        /* Release: our copies out of the ring complete before the writer may reuse the
         * space.  Piece by piece, so that a waiting writer refills while we copy. */
        __atomic_store_n(r->cons, r->priv, __ATOMIC_RELEASE);
    }
    *notify = gnt_ring_take_notify(r, GNT_NOTIFY_READ);
    return n;
}

int64_t gnt_ring_data_ready(struct gnt_ring *r)
{
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    return gnt_ring_readable(r);
}

int64_t gnt_ring_buffer_space(struct gnt_ring *r)
{
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    return gnt_ring_writable(r);
}

int64_t gnt_ring_prepare_wait_read(struct gnt_ring *r)
{
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    __atomic_fetch_or(r->peer_notify, GNT_NOTIFY_WRITE, __ATOMIC_SEQ_CST);
    /* Full fence: the request bit is visible before we re-read prod, pairing with the
     * writer's fence between its prod store and its test of the bit. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return gnt_ring_readable(r);
}

int64_t gnt_ring_prepare_wait_write(struct gnt_ring *r)
{
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    __atomic_fetch_or(r->peer_notify, GNT_NOTIFY_READ, __ATOMIC_SEQ_CST);
    /* Full fence: the request bit is visible before we re-read cons, pairing with the
     * reader's fence between its cons store and its test of the bit. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return gnt_ring_writable(r);
}

int64_t gnt_ring_peek(struct gnt_ring *r, void *dst, size_t len, size_t skip)
{
    int64_t avail;
    uint32_t n;

    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    avail = gnt_ring_readable(r);
    if (avail < 0)
        return avail;
    if ((uint64_t)skip >= (uint64_t)avail)
        return 0;
    n = (uint32_t)(avail - (int64_t)skip);
    if ((uint64_t)len < n)
        n = (uint32_t)len;
    if (n == 0)
        return 0;
    gnt_copy_out(r, r->priv + (uint32_t)skip, (uint8_t *)dst, n);
    return n;
}

/* ------------------------------------------------------------------ fast paths */
int64_t gnt_ring_write_live(struct gnt_ring *r, const uint8_t *peer_live, const void *src,
                            size_t len, int all_or_nothing, int *notify)
{
    /* Acquire, as gnt_load_u8: liveness is checked before the write, as the slow path
     * does; anything but "connected" sends the caller to its slow path. */
    if (__atomic_load_n(peer_live, __ATOMIC_ACQUIRE) != 1) {
        *notify = 0;
        return GNT_RING_NOTLIVE;
    }
    return gnt_ring_write(r, src, len, all_or_nothing, notify);
}

static uint64_t gnt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t gnt_ring_spin(struct gnt_ring *r, int writer, uint32_t want, uint64_t ns,
                      const uint8_t *peer_live, uint8_t eof_bit)
{
    uint64_t deadline = 0;
    unsigned i;
    int64_t avail;

    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    for (;;) {
        for (i = 0; i < 64; i++) {
            avail = writer ? gnt_ring_writable(r) : gnt_ring_readable(r);
            if (avail < 0 || (uint64_t)avail >= want)
                return avail;
            /* Acquire, as gnt_load_u8: a peer that left (or said EOF) will not move the
             * index any more, so stop spinning and let the caller report it. */
            if (__atomic_load_n(peer_live, __ATOMIC_ACQUIRE) != 1)
                return avail;
            if (!writer && (__atomic_load_n(r->own_notify, __ATOMIC_ACQUIRE) & eof_bit))
                return avail;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#elif defined(__aarch64__)
            __asm__ __volatile__("yield");
#endif
        }
        if (deadline == 0)
            deadline = gnt_now_ns() + ns;
        else if (gnt_now_ns() >= deadline)
            return writer ? gnt_ring_writable(r) : gnt_ring_readable(r);
        /* Let a peer that shares our CPU run (two processes pinned to one core, two
         * processes of a one-vCPU VM): it is what we wait for, and it cannot move the
         * index while we hold the CPU.  With a CPU of its own it runs anyway, and the
         * call returns at once (nothing else to run here). */
        sched_yield();
    }
}

int64_t gnt_ring_write_spin(struct gnt_ring *r, const uint8_t *peer_live, const void *src,
                            size_t len, uint64_t ns, int *notify, int *spun)
{
    uint64_t deadline = 0, now;
    int64_t n, avail;
    size_t done;

    *spun = 0;
    n = gnt_ring_write_live(r, peer_live, src, len, 0, notify);
    if (n < 0)
        return n;
    done = (size_t)n;
    /* A notify owed to the peer goes first (the peer sleeps until it comes): back to the
     * caller, which sends it and calls again. */
    while (done < len && ns && !*notify) {
        now = gnt_now_ns();
        if (deadline == 0)
            deadline = now + ns;
        else if (now >= deadline)
            break;
        avail = gnt_ring_spin(r, 1, 1, deadline - now, peer_live, 0);
        if (avail < 0)
            return avail;
        if (avail == 0) {
            *spun = 2;
            return (int64_t)done;
        }
        *spun = 1;
        n = gnt_ring_write_live(r, peer_live, (const uint8_t *)src + done, len - done, 0, notify);
        if (n == GNT_RING_NOTLIVE) {
            *spun = 2;
            break;
        }
        if (n < 0)
            return n;
        done += (size_t)n;
    }
    return (int64_t)done;
}

int64_t gnt_ring_read_spin(struct gnt_ring *r, const uint8_t *peer_live, uint8_t eof_bit,
                           void *dst, size_t len, uint64_t ns, int *notify, int *spun)
{
    int64_t n, avail;

    *spun = 0;
    n = gnt_ring_read(r, dst, len, 0, notify);
    if (n != 0 || ns == 0 || len == 0)
        return n;
    avail = gnt_ring_spin(r, 0, 1, ns, peer_live, eof_bit);
    if (avail <= 0) {
        *spun = 2;
        return avail;
    }
    *spun = 1;
    return gnt_ring_read(r, dst, len, 0, notify);
}

int64_t gnt_ring_read_begin(struct gnt_ring *r, size_t max, uint32_t *pos)
{
    int64_t avail;
    uint32_t first;

    *pos = 0;
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    /* Acquire (inside gnt_ring_readable): the bytes below prod are visible before the
     * caller copies them, which it does after this call returns. */
    avail = gnt_ring_readable(r);
    if (avail <= 0)
        return avail;
    *pos = r->priv & (r->size - 1);
    first = r->size - *pos;
    if ((uint64_t)avail > first)
        avail = first;
    if ((uint64_t)avail > (uint64_t)max)
        avail = (int64_t)max;
    return avail;
}

int64_t gnt_ring_read_commit(struct gnt_ring *r, uint32_t n, int *notify)
{
    *notify = 0;
    if (!gnt_ring_ok(r))
        return GNT_RING_EINVAL;
    if (n > r->size)
        return GNT_RING_EINVAL;
    if (n == 0)
        return 0;
    r->priv += n;
    /* Release: the caller's copy out of the ring (done before this call) completes
     * before the writer can see the new cons and reuse the space. */
    __atomic_store_n(r->cons, r->priv, __ATOMIC_RELEASE);
    *notify = gnt_ring_take_notify(r, GNT_NOTIFY_READ);
    return n;
}
