/* vchan_bench_peer: the libxenvchan (C) side of benchmarks/xen_vs_libxenvchan.py.
 *
 *   vchan_bench_peer server|client PATH RING send|recv NBYTES verify|count [PEER]
 *
 * PEER is the other side's domid (default 0: dom0 <-> dom0; xen_vs_libxenvchan.py --domu
 * runs one side in a domU).  The server offers PATH with two rings of RING bytes; the
 * client connects to it.  One direction only, with libxenvchan's blocking API:
 *
 * - send: libxenvchan_write() of NBYTES, 64 KiB at a time, from one precomputed 64 KiB
 *   block of the pattern of tests/interop/vchan_peer.c (client seed 0xa5), then close;
 * - recv: libxenvchan_read() into a RING-byte buffer until NBYTES arrived; with "verify"
 *   every chunk is memcmp()'d against the pattern at its offset ("MISMATCH at <offset>",
 *   exit 1); with "count" the bytes are only counted.
 *
 * It does exactly what the gntipc side of the benchmark does, call for call (gntipc's
 * Vchan.write_all of the same block; Vchan.readinto, then bytearray.startswith, a memcmp,
 * against the same pattern): tests/interop/vchan_peer.c builds its pattern byte by byte
 * and hashes every byte it reads (FNV-1a), which no Python peer could match.
 *
 * The server prints "LISTENING" once the path is offered; the receiver prints
 * "RATE seconds=<s>" (connection to last byte) and "ok"; both print "CSW <voluntary>
 * <involuntary> <cpu seconds> <events in> <events out>", their context switches and CPU
 * time (user + system) over the transfer (getrusage) and the events libxenvchan received
 * and sent meanwhile (counted on their way through libxenevtchn, below), as gntipc's side
 * reports its own.  No wait lasts: the process
 * ends by SIGALRM DEADLINE seconds after it started.
 */
#define _GNU_SOURCE /* RTLD_NEXT */
#include <dlfcn.h>
#include <libxenvchan.h>
#include <poll.h>
#include <sys/resource.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 65536
#define SEED 0xa5
#define DEADLINE 600

/* libxenvchan sends and takes its events through libxenevtchn's xenevtchn_notify() and
 * xenevtchn_pending() (one port read = one event received, as gntipc counts them).  It
 * calls them through its PLT, so these definitions in the executable (exported: built
 * with -rdynamic) come first; each counts and calls libxenevtchn's own. */
static unsigned long events_in, events_out;

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port) {
    static int (*real)(xenevtchn_handle *, evtchn_port_t);
    if (!real) *(void **)&real = dlsym(RTLD_NEXT, "xenevtchn_notify");
    events_out++;
    return real(xce, port);
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce) {
    static xenevtchn_port_or_error_t (*real)(xenevtchn_handle *);
    if (!real) *(void **)&real = dlsym(RTLD_NEXT, "xenevtchn_pending");
    xenevtchn_port_or_error_t port = real(xce);
    if (port >= 0) events_in++;
    return port;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: vchan_bench_peer server|client PATH RING send|recv NBYTES"
                        " verify|count [PEER]\n");
        return 2;
    }
    int is_server = strcmp(argv[1], "server") == 0;
    const char *path = argv[2];
    size_t ring = strtoul(argv[3], NULL, 10);
    int sending = strcmp(argv[4], "send") == 0;
    uint64_t nbytes = strtoull(argv[5], NULL, 10);
    int verify = strcmp(argv[6], "verify") == 0;
    int peer = argc == 8 ? atoi(argv[7]) : 0;
    alarm(DEADLINE);

    /* The pattern twice over, so that any chunk of up to RING bytes at any offset of the
     * 64 KiB period is one contiguous slice of it. */
    size_t span = BLOCK + (ring + BLOCK - 1) / BLOCK * BLOCK;
    unsigned char *pattern = malloc(span), *buf = malloc(ring);
    if (!pattern || !buf) return 1;
    for (size_t i = 0; i < span; i++)
        pattern[i] = (unsigned char)((i & 0xff) + 7 * ((i >> 8) & 0xff) + SEED);

    struct libxenvchan *c;
    if (is_server) {
        c = libxenvchan_server_init(NULL, peer, path, ring, ring);
        if (!c) { perror("libxenvchan_server_init"); return 1; }
        printf("LISTENING\n");
        fflush(stdout);
        struct pollfd p = {libxenvchan_fd_for_select(c), POLLIN, 0};
        while (libxenvchan_is_open(c) == 2)
            if (poll(&p, 1, 100) > 0) libxenvchan_wait(c);
    } else {
        while (!(c = libxenvchan_client_init(NULL, peer, path))) usleep(50000);
    }
    c->blocking = 1;

    struct rusage r0, r1;
    unsigned long in0 = events_in, out0 = events_out;
    getrusage(RUSAGE_SELF, &r0);
    double t0 = now();
    uint64_t done = 0;
    while (done < nbytes) {
        size_t left = nbytes - done < ring ? (size_t)(nbytes - done) : ring;
        int n = sending ? libxenvchan_write(c, pattern, left < BLOCK ? left : BLOCK)
                        : libxenvchan_read(c, buf, left);
        if (n <= 0) {
            printf("PEER_GONE after %llu\n", (unsigned long long)done);
            return 3;
        }
        if (!sending && verify && memcmp(buf, pattern + done % BLOCK, (size_t)n) != 0) {
            printf("MISMATCH at %llu\n", (unsigned long long)done);
            return 1;
        }
        done += (uint64_t)n;
    }
    double t1 = now();
    getrusage(RUSAGE_SELF, &r1);
    double cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec)
                 + ((r1.ru_utime.tv_usec - r0.ru_utime.tv_usec)
                    + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec)) / 1e6;
    printf("CSW %ld %ld %.6f %lu %lu\n", r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw,
           cpu, events_in - in0, events_out - out0);
    if (!sending) printf("RATE seconds=%.6f\nok\n", t1 - t0);
    fflush(stdout);
    libxenvchan_close(c);
    free(pattern);
    free(buf);
    return 0;
}
