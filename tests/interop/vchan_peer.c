/* vchan_peer: a libxenvchan peer for gntipc's interop tests and benchmark.
 *
 * Written for gntipc against the public <libxenvchan.h> API only (Debian's libxen-dev).
 * Build: gcc -O2 -o vchan_peer vchan_peer.c -lxenvchan
 *
 *   vchan_peer server DOMID PATH READ_MIN WRITE_MIN SEND RECV [--hold]
 *   vchan_peer client DOMID PATH SEND RECV [--hold]
 *
 * After connecting it prints one line "CTRL <hex>" with the control page's 24-byte header
 * and its grant refs, exactly as it sees them at that moment (before any traffic of its
 * own), then, at once in both directions, writes SEND bytes of its pattern and reads RECV
 * bytes, checking every byte against the peer's pattern:
 *
 *   pattern(seed, i) = (i & 0xff) + 7 * ((i >> 8) & 0xff) + seed      (mod 256)
 *
 * with seed 0x5a for what a server sends and 0xa5 for what a client sends (period 64 KiB,
 * so a lost, duplicated or reordered block shows as a mismatch).  It prints "SENT n",
 * "RECEIVED n fnv=<fnv-1a 64 of the bytes> ok|MISMATCH at <offset>", and a timing line
 * "RATE seconds=<s>" for the benchmark.
 *
 * Then, without --hold, it closes (libxenvchan_close) and exits 0 if the data matched;
 * with --hold it prints "HOLDING" and sleeps until killed (the tests SIGKILL it to
 * exercise the unmap notification).  A peer that goes away before the transfer is done
 * gives "PEER_GONE after <sent> <received>" and exit 3.  Every wait has a deadline:
 * it never hangs (exit 4 with "TIMEOUT ...").
 */
#include <libxenvchan.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

#define SEED_SERVER 0x5a
#define SEED_CLIENT 0xa5
#define CHUNK 65536
#define IDLE_TIMEOUT 60.0   /* seconds without progress before giving up */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned char pattern(unsigned seed, uint64_t i) {
    return (unsigned char)((i & 0xff) + 7 * ((i >> 8) & 0xff) + seed);
}

/* Wait at most `secs` for an event on the vchan, then consume it. */
static void wait_event(struct libxenvchan *c, double secs) {
    int fd = libxenvchan_fd_for_select(c);
    fd_set s;
    FD_ZERO(&s);
    FD_SET(fd, &s);
    struct timeval tv = {(time_t)secs, (suseconds_t)((secs - (time_t)secs) * 1e6)};
    if (select(fd + 1, &s, NULL, NULL, &tv) > 0)
        libxenvchan_wait(c);
}

static void print_ctrl(struct libxenvchan *c) {
    const unsigned char *p = (const unsigned char *)c->ring;
    uint16_t lo, ro;
    memcpy(&lo, p + 16, 2);
    memcpy(&ro, p + 18, 2);
    size_t grants = (lo >= 12 && lo <= 20 ? 1u << (lo - 12) : 0) +
                    (ro >= 12 && ro <= 20 ? 1u << (ro - 12) : 0);
    size_t n = 24 + 4 * grants;
    if (n > 4096) n = 4096;
    printf("CTRL ");
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
    printf("\n");
    fflush(stdout);
}

static int usage(void) {
    fprintf(stderr,
            "usage: vchan_peer server DOMID PATH READ_MIN WRITE_MIN SEND RECV [--hold]\n"
            "       vchan_peer client DOMID PATH SEND RECV [--hold]\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    int is_server = strcmp(argv[1], "server") == 0;
    if (!is_server && strcmp(argv[1], "client") != 0) return usage();
    int nargs = is_server ? 8 : 6;
    if (argc != nargs && !(argc == nargs + 1 && strcmp(argv[nargs], "--hold") == 0))
        return usage();
    int hold = argc == nargs + 1;
    int domid = atoi(argv[2]);
    const char *path = argv[3];
    uint64_t total_send = strtoull(argv[is_server ? 6 : 4], NULL, 10);
    uint64_t total_recv = strtoull(argv[is_server ? 7 : 5], NULL, 10);
    unsigned my_seed = is_server ? SEED_SERVER : SEED_CLIENT;
    unsigned peer_seed = is_server ? SEED_CLIENT : SEED_SERVER;
    signal(SIGPIPE, SIG_IGN);

    struct libxenvchan *c = NULL;
    double t_start = now();
    if (is_server) {
        c = libxenvchan_server_init(NULL, domid, path, strtoul(argv[4], NULL, 10),
                                    strtoul(argv[5], NULL, 10));
        if (!c) { perror("libxenvchan_server_init"); return 1; }
        printf("LISTENING\n");
        fflush(stdout);
        while (libxenvchan_is_open(c) == 2) {
            if (now() - t_start > IDLE_TIMEOUT) {
                printf("TIMEOUT waiting for a client\n");
                return 4;
            }
            wait_event(c, 0.5);
        }
    } else {
        while (!(c = libxenvchan_client_init(NULL, domid, path))) {
            if (now() - t_start > IDLE_TIMEOUT) {
                perror("libxenvchan_client_init");
                printf("TIMEOUT waiting for a server\n");
                return 4;
            }
            usleep(50000);
        }
    }
    print_ctrl(c);
    c->blocking = 0;

    unsigned char *out = malloc(CHUNK), *in = malloc(CHUNK);
    if (!out || !in) return 1;
    uint64_t sent = 0, got = 0, bad_at = UINT64_MAX;
    uint64_t h = 14695981039346656037ULL;
    double t0 = now(), last_progress = t0;
    while (sent < total_send || got < total_recv) {
        int progress = 0;
        if (sent < total_send) {
            size_t n = total_send - sent < CHUNK ? (size_t)(total_send - sent) : CHUNK;
            for (size_t i = 0; i < n; i++) out[i] = pattern(my_seed, sent + i);
            int w = libxenvchan_write(c, out, n);
            if (w < 0) break;
            sent += (uint64_t)w;
            progress |= w > 0;
        }
        if (got < total_recv) {
            size_t n = total_recv - got < CHUNK ? (size_t)(total_recv - got) : CHUNK;
            int r = libxenvchan_read(c, in, n);
            if (r < 0) break;
            for (int i = 0; i < r; i++) {
                if (bad_at == UINT64_MAX && in[i] != pattern(peer_seed, got + i))
                    bad_at = got + i;
                h ^= in[i];
                h *= 1099511628211ULL;
            }
            got += (uint64_t)r;
            progress |= r > 0;
        }
        if (progress) {
            last_progress = now();
            continue;
        }
        if (!libxenvchan_is_open(c) && libxenvchan_data_ready(c) == 0) break;
        if (now() - last_progress > IDLE_TIMEOUT) {
            printf("TIMEOUT after %llu %llu\n", (unsigned long long)sent, (unsigned long long)got);
            return 4;
        }
        wait_event(c, 1.0);
    }
    double dt = now() - t0;
    printf("SENT %llu\n", (unsigned long long)sent);
    if (bad_at == UINT64_MAX)
        printf("RECEIVED %llu fnv=%016llx ok\n", (unsigned long long)got, (unsigned long long)h);
    else
        printf("RECEIVED %llu fnv=%016llx MISMATCH at %llu\n", (unsigned long long)got,
               (unsigned long long)h, (unsigned long long)bad_at);
    printf("RATE seconds=%.6f\n", dt);
    fflush(stdout);
    if (sent < total_send || got < total_recv) {
        printf("PEER_GONE after %llu %llu\n", (unsigned long long)sent, (unsigned long long)got);
        fflush(stdout);
        return 3;
    }
    if (hold) {
        printf("HOLDING\n");
        fflush(stdout);
        for (;;) pause();
    }
    libxenvchan_close(c);
    free(out);
    free(in);
    return bad_at == UINT64_MAX ? 0 : 1;
}
