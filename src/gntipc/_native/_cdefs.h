/* gntipc native core: declarations shared by cffi's cdef and the C compiler.
 *
 * This text is both the cffi cdef (so every name here is reachable as ffi/lib.NAME) and
 * the start of the compiled module.  Layouts and numbers are written from the Linux uapi
 * headers <xen/gntdev.h>, <xen/gntalloc.h>, <xen/evtchn.h>, <xen/privcmd.h> (MIT) and
 * Xen's public headers (event_channel.h, grant_table.h); the module never includes them.
 * _src.c re-derives every ioctl number from _IOC() and the struct sizes with
 * _Static_assert, and tests/native/test_abi.py compares all of it with the system headers.
 * Only plain integer literals and declarations may appear here (cffi parses this text),
 * except the "cffi-only" section, which _build.py leaves out of the C source.
 */

/* ---------------------------------------------------------------- gntdev */
struct ioctl_gntdev_grant_ref {
    uint32_t domid;
    uint32_t ref;
};

struct ioctl_gntdev_map_grant_ref {
    uint32_t count;
    uint32_t pad;
    uint64_t index;                            /* OUT: mmap offset */
    struct ioctl_gntdev_grant_ref refs[1];     /* really refs[count] */
};

struct ioctl_gntdev_unmap_grant_ref {
    uint64_t index;
    uint32_t count;
    uint32_t pad;
};

struct ioctl_gntdev_get_offset_for_vaddr {
    uint64_t vaddr;
    uint64_t offset;                           /* OUT */
    uint32_t count;                            /* OUT */
    uint32_t pad;
};

struct ioctl_gntdev_set_max_grants {
    uint32_t count;
};

struct ioctl_gntdev_unmap_notify {
    uint64_t index;
    uint32_t action;
    uint32_t event_channel_port;
};

struct gntdev_grant_copy_segment {
    union {
        void *virt;
        struct {
            uint32_t ref;
            uint16_t offset;
            uint16_t domid;
        } foreign;
    } source, dest;
    uint16_t len;
    uint16_t flags;                            /* GNTCOPY_* */
    int16_t status;                            /* OUT: GNTST_* */
};

struct ioctl_gntdev_grant_copy {
    unsigned int count;
    struct gntdev_grant_copy_segment *segments;
};

struct ioctl_gntdev_dmabuf_exp_from_refs {
    uint32_t flags;
    uint32_t count;
    uint32_t fd;                               /* OUT */
    uint32_t domid;
    uint32_t refs[1];
};

struct ioctl_gntdev_dmabuf_exp_wait_released {
    uint32_t fd;
    uint32_t wait_to_ms;
};

struct ioctl_gntdev_dmabuf_imp_to_refs {
    uint32_t fd;
    uint32_t count;
    uint32_t domid;
    uint32_t reserved;
    uint32_t refs[1];                          /* OUT */
};

struct ioctl_gntdev_dmabuf_imp_release {
    uint32_t fd;
    uint32_t reserved;
};

#define IOCTL_GNTDEV_MAP_GRANT_REF            0x00184700
#define IOCTL_GNTDEV_UNMAP_GRANT_REF          0x00104701
#define IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR     0x00184702
#define IOCTL_GNTDEV_SET_MAX_GRANTS           0x00044703
#define IOCTL_GNTDEV_SET_UNMAP_NOTIFY         0x00104707
#define IOCTL_GNTDEV_GRANT_COPY               0x00104708
#define IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS     0x00144709
#define IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED 0x0008470a
#define IOCTL_GNTDEV_DMABUF_IMP_TO_REFS       0x0014470b
#define IOCTL_GNTDEV_DMABUF_IMP_RELEASE       0x0008470c

#define UNMAP_NOTIFY_CLEAR_BYTE   1
#define UNMAP_NOTIFY_SEND_EVENT   2
#define GNTDEV_DMA_FLAG_WC        1
#define GNTDEV_DMA_FLAG_COHERENT  2

/* Xen public grant_table.h: grant-copy flags and statuses. */
#define GNTCOPY_source_gref       1
#define GNTCOPY_dest_gref         2
#define GNTST_okay                0
#define GNTST_general_error       -1
#define GNTST_bad_domain          -2
#define GNTST_bad_gntref          -3
#define GNTST_bad_handle          -4
#define GNTST_bad_virt_addr       -5
#define GNTST_bad_dev_addr        -6
#define GNTST_no_device_space     -7
#define GNTST_permission_denied   -8
#define GNTST_bad_page            -9
#define GNTST_bad_copy_arg        -10
#define GNTST_address_too_big     -11
#define GNTST_eagain              -12
#define GNTST_no_space            -13

/* -------------------------------------------------------------- gntalloc */
struct ioctl_gntalloc_alloc_gref {
    uint16_t domid;
    uint16_t flags;
    uint32_t count;
    uint64_t index;                            /* OUT: mmap offset */
    uint32_t gref_ids[1];                      /* OUT: really gref_ids[count] */
};

struct ioctl_gntalloc_dealloc_gref {
    uint64_t index;
    uint32_t count;
};

struct ioctl_gntalloc_unmap_notify {
    uint64_t index;
    uint32_t action;
    uint32_t event_channel_port;
};

#define IOCTL_GNTALLOC_ALLOC_GREF        0x00184705
#define IOCTL_GNTALLOC_DEALLOC_GREF      0x00104706
#define IOCTL_GNTALLOC_SET_UNMAP_NOTIFY  0x00104707
#define GNTALLOC_FLAG_WRITABLE           1

/* ---------------------------------------------------------------- evtchn */
struct ioctl_evtchn_bind_virq {
    unsigned int virq;
};

struct ioctl_evtchn_bind_interdomain {
    unsigned int remote_domain;
    unsigned int remote_port;
};

struct ioctl_evtchn_bind_unbound_port {
    unsigned int remote_domain;
};

struct ioctl_evtchn_unbind {
    unsigned int port;
};

struct ioctl_evtchn_notify {
    unsigned int port;
};

struct ioctl_evtchn_restrict_domid {
    uint16_t domid;
};

#define IOCTL_EVTCHN_BIND_VIRQ          0x00044500
#define IOCTL_EVTCHN_BIND_INTERDOMAIN   0x00084501
#define IOCTL_EVTCHN_BIND_UNBOUND_PORT  0x00044502
#define IOCTL_EVTCHN_UNBIND             0x00044503
#define IOCTL_EVTCHN_NOTIFY             0x00044504
#define IOCTL_EVTCHN_RESET              0x00004505
#define IOCTL_EVTCHN_RESTRICT_DOMID     0x00024506

/* --------------------------------------------------------------- privcmd */
struct privcmd_hypercall {
    uint64_t op;
    uint64_t arg[5];
};

#define IOCTL_PRIVCMD_HYPERCALL         0x00305000

/* Xen public xen.h / event_channel.h: enough for EVTCHNOP_status. */
#define __HYPERVISOR_event_channel_op   32
#define EVTCHNOP_status                 5
#define DOMID_SELF                      0x7FF0

struct evtchn_status {
    uint16_t dom;                              /* IN: DOMID_SELF or a domid */
    uint32_t port;                             /* IN */
    uint32_t status;                           /* OUT: EVTCHNSTAT_* */
    uint32_t vcpu;                             /* OUT */
    union {
        struct {
            uint16_t dom;
        } unbound;
        struct {
            uint16_t dom;
            uint32_t port;
        } interdomain;
        uint32_t pirq;
        uint32_t virq;
    } u;
};

#define EVTCHNSTAT_closed       0
#define EVTCHNSTAT_unbound      1
#define EVTCHNSTAT_interdomain  2
#define EVTCHNSTAT_pirq         3
#define EVTCHNSTAT_virq         4
#define EVTCHNSTAT_ipi          5

/* ------------------------------------------------------- syscall helpers */
/* Each returns -1 (gnt_mmap: NULL) and leaves errno set on failure; Python reads errno
 * in one place (gntipc._native.check_rc). */
int gnt_ioctl(int fd, unsigned long req, void *arg);
void *gnt_mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off);
int gnt_munmap(void *addr, size_t len);
int gnt_mlock(const void *addr, size_t len);
int gnt_munlock(const void *addr, size_t len);

/* cffi-only: begin -- the C side takes these values from <sys/mman.h>. */
#define PROT_NONE ...
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_FIXED ...
#define MAP_ANONYMOUS ...
#define MAP_NORESERVE ...
/* cffi-only: end */

/* --------------------------------------------------------- ring primitives */
/* One direction of a vchan ring, as seen by one endpoint.  Pointers point into shared
 * memory; `priv` is our private copy of our own index (never re-read from the page). */
struct gnt_ring {
    uint32_t *cons;        /* shared consumer index (u32, in the control page) */
    uint32_t *prod;        /* shared producer index */
    uint8_t *data;         /* ring buffer, `size` bytes */
    uint32_t size;         /* power of two, 1024..1<<20 */
    uint32_t priv;         /* prod if we write this ring, cons if we read it */
    uint8_t *own_notify;   /* the notify byte WE honour (the peer sets bits in it) */
    uint8_t *peer_notify;  /* the notify byte the PEER honours (we set bits in it) */
};

#define GNT_NOTIFY_WRITE 1
#define GNT_NOTIFY_READ 2
#define GNT_RING_EPROTO -1     /* peer index invalid: gap larger than the ring */
#define GNT_RING_EINVAL -2     /* our own misuse: size not a power of two in range */
#define GNT_RING_NOTLIVE -3    /* the peer's live byte is not 1: nothing done */
#define GNT_RING_MIN_SIZE 1024
#define GNT_RING_MAX_SIZE 1048576

int64_t gnt_ring_write(struct gnt_ring *r, const void *src, size_t len, int all_or_nothing,
                       int *notify);
int64_t gnt_ring_read(struct gnt_ring *r, void *dst, size_t len, int all_or_nothing,
                      int *notify);
int64_t gnt_ring_data_ready(struct gnt_ring *r);
int64_t gnt_ring_buffer_space(struct gnt_ring *r);
int64_t gnt_ring_prepare_wait_read(struct gnt_ring *r);
int64_t gnt_ring_prepare_wait_write(struct gnt_ring *r);
int64_t gnt_ring_peek(struct gnt_ring *r, void *dst, size_t len, size_t skip);
/* Fast paths (one C call per operation): a write preceded by the liveness check. */
int64_t gnt_ring_write_live(struct gnt_ring *r, const uint8_t *peer_live, const void *src,
                            size_t len, int all_or_nothing, int *notify);
/* One-copy read, in two steps around the caller's own copy out of the ring:
 * begin: the bytes readable now from our position up to `max` and the ring's end (no
 * wrap), their offset in `data` in *pos; nothing is consumed.
 * commit: consume `n` of them (n <= what begin returned) and publish cons. */
int64_t gnt_ring_read_begin(struct gnt_ring *r, size_t max, uint32_t *pos);
int64_t gnt_ring_read_commit(struct gnt_ring *r, uint32_t n, int *notify);
/* Spin (without sleeping, asking the peer for no event) up to `ns` nanoseconds until at
 * least `want` bytes are readable (writer == 0) or writable (writer == 1), or the peer's
 * live byte stops saying "connected", or (reading) the peer set the EOF bit `eof_bit` in
 * our notify byte.  Returns the bytes readable / writable then. */
int64_t gnt_ring_spin(struct gnt_ring *r, int writer, uint32_t want, uint64_t ns,
                      const uint8_t *peer_live, uint8_t eof_bit);

/* Spin-then-transfer in one call (the blocking API's common case on a busy channel: no
 * return to Python between a spin that found room or data and the copy it waited for).
 * write_spin: as gnt_ring_write_live (not all-or-nothing), then, while some of `src` is
 * left, no event is owed to the peer (*notify 0) and the peer stays connected, spin as
 * gnt_ring_spin for free space, `ns` nanoseconds in all, and write on.
 * read_spin: as gnt_ring_read; if nothing was readable, spin as gnt_ring_spin (up to `ns`)
 * for one byte, then read.
 * Both: *spun is 0 if no spin ran, 1 if every spin found what it waited for, 2 if the
 * last one ran out (or the peer left, or sent EOF); the caller's slow path takes it
 * from there.  Errors as the calls they combine. */
int64_t gnt_ring_write_spin(struct gnt_ring *r, const uint8_t *peer_live, const void *src,
                            size_t len, uint64_t ns, int *notify, int *spun);
int64_t gnt_ring_read_spin(struct gnt_ring *r, const uint8_t *peer_live, uint8_t eof_bit,
                           void *dst, size_t len, uint64_t ns, int *notify, int *spun);

uint8_t gnt_load_u8(const uint8_t *p);
void gnt_store_u8(uint8_t *p, uint8_t v);
uint32_t gnt_load_u32(const uint32_t *p);
void gnt_store_u32(uint32_t *p, uint32_t v);
uint8_t gnt_fetch_or_u8(uint8_t *p, uint8_t bits);
uint8_t gnt_fetch_and_not_u8(uint8_t *p, uint8_t bits);
void gnt_full_fence(void);
