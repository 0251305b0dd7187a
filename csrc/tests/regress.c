/* Regression scenarios for the engine's worker code, with its syscalls faked.
 *
 * Why this shape: the findings these guard against (a worker offline while it reads routes, a
 * stop that waits for a flood to end, an RX batch overflowing its arrays, a miscounted TUN
 * write error, UDP GSO lost for good after one failure, a saturated egress starving RX, a
 * route writer reading a table another writer freed) live in code paths that real sockets
 * reach only by timing. Here engine.c and the batch layers (tun_batch.c, udp_batch.c) are
 * compiled with read/sendmmsg/recvmmsg/writev/poll renamed to fakes that script exactly the case, and each scenario checks the outcome. Built
 * with ASan+UBSan by tests/test_engine_regress.py, so memory errors fail the scenario too.
 *
 * Usage: regress <scenario>; exit 0 = pass, anything else = fail (message on stderr).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"

/* ---- the scripted world ---- */

static int g_tfd = -1, g_ufd = -1;      /* the engine's TUN and UDP fds (real fds, faked I/O) */
static struct fl_engine *g_e;
static struct fl_worker *g_w;           /* the worker whose state the fakes check */

/* TUN reads */
enum { READ_NONE, READ_PLAIN, READ_TSO };
static int g_read_kind = READ_NONE;
static long g_reads_left;               /* -1 = forever */
static int g_tso_payload = 60000, g_tso_mss = 16;
static long g_offline_reads;            /* reads done while the worker was marked offline */

/* UDP sends */
static int g_send_eagain_first;         /* fail the next N sendmmsg calls with EAGAIN */
static int g_send_always_eagain;
static int g_gso_broken;                /* messages carrying UDP_SEGMENT fail with EIO */
static long g_sent_dgrams, g_sent_gso_msgs;

/* UDP receives */
enum { RECV_NONE, RECV_ONE, RECV_GRO_TINY };
static int g_recv_kind = RECV_NONE;
static long g_recv_left;

/* TUN writes */
static int g_write_fail;
static long g_written;

/* poll: when set, the UDP fd is writable only if g_room and readable while g_recv_left > 0 */
static int g_fake_udp_poll, g_room;

static void fail(const char *what)
{
    fprintf(stderr, "FAIL: %s\n", what);
    exit(1);
}

static uint16_t csum16(const uint8_t *p, int len)
{
    uint32_t s = 0;
    for (int i = 0; i + 1 < len; i += 2)
        s += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        s += (uint32_t)(p[len - 1] << 8);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

/* An IPv4 header of total length tot (payload zeroed), with a valid header checksum. */
static void ip_hdr(uint8_t *p, int tot, uint8_t proto, const char *src, const char *dst, int df)
{
    memset(p, 0, 20);
    p[0] = 0x45;
    p[2] = (uint8_t)(tot >> 8);
    p[3] = (uint8_t)tot;
    p[6] = df ? 0x40 : 0;
    p[8] = 64;
    p[9] = proto;
    inet_pton(AF_INET, src, p + 12);
    inet_pton(AF_INET, dst, p + 16);
    uint16_t c = csum16(p, 20);
    p[10] = (uint8_t)(c >> 8);
    p[11] = (uint8_t)c;
}

static ssize_t fz_read(int fd, void *buf, size_t n)
{
    if (fd != g_tfd)
        return read(fd, buf, n);
    if (g_w && atomic_load(&g_w->qs) == FL_QS_OFFLINE)
        g_offline_reads++;
    if (g_reads_left == 0 || g_read_kind == READ_NONE) {
        errno = EAGAIN;
        return -1;
    }
    if (g_reads_left > 0)
        g_reads_left--;
    uint8_t *p = buf;
    if (g_read_kind == READ_PLAIN) {
        int len = 100;
        ip_hdr(p, len, 17, "10.1.1.5", "10.1.2.7", 0);
        return len;
    }
    /* a TSO frame: vnet header + IPv4/TCP template + payload, cut into g_tso_mss segments */
    struct fl_vnet_hdr vh = {.flags = 0, .gso_type = FL_VNET_GSO_TCPV4, .hdr_len = 40,
                             .gso_size = (uint16_t)g_tso_mss};
    memcpy(p, &vh, FL_VNET_HDR_LEN);
    uint8_t *ip = p + FL_VNET_HDR_LEN;
    int tot = 40 + g_tso_payload;
    if ((size_t)(FL_VNET_HDR_LEN + tot) > n)
        fail("TSO frame larger than the read buffer");
    ip_hdr(ip, tot, 6, "10.1.1.5", "10.1.2.7", 1);
    memset(ip + 20, 0, 20 + (size_t)g_tso_payload);
    ip[20 + 12] = 5 << 4; /* data offset */
    ip[20 + 13] = 0x10;   /* ACK */
    return FL_VNET_HDR_LEN + tot;
}

static size_t msg_bytes(const struct msghdr *h)
{
    size_t b = 0;
    for (size_t i = 0; i < h->msg_iovlen; i++)
        b += h->msg_iov[i].iov_len;
    return b;
}

static int msg_gso_size(const struct msghdr *h)
{
    if (!h->msg_control)
        return 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR((struct msghdr *)h); c;
         c = CMSG_NXTHDR((struct msghdr *)h, c))
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_SEGMENT) {
            uint16_t gs;
            memcpy(&gs, CMSG_DATA(c), sizeof(gs));
            return gs;
        }
    return 0;
}

static int fz_sendmmsg(int fd, struct mmsghdr *m, unsigned n, int flags)
{
    if (fd != g_ufd)
        return sendmmsg(fd, m, n, flags);
    if (g_send_always_eagain || g_send_eagain_first > 0) {
        if (g_send_eagain_first > 0)
            g_send_eagain_first--;
        errno = EAGAIN;
        return -1;
    }
    for (unsigned i = 0; i < n; i++) {
        int gs = msg_gso_size(&m[i].msg_hdr);
        if (gs && g_gso_broken) {
            if (i == 0) {
                errno = EIO;
                return -1;
            }
            return (int)i;
        }
        size_t b = msg_bytes(&m[i].msg_hdr);
        g_sent_dgrams += gs ? (long)((b + (size_t)gs - 1) / (size_t)gs) : 1;
        g_sent_gso_msgs += gs ? 1 : 0;
        m[i].msg_len = (unsigned)b;
    }
    return (int)n;
}

static void fill_from_peer(struct msghdr *h)
{
    struct sockaddr_in *a = h->msg_name;
    memset(a, 0, sizeof(*a));
    a->sin_family = AF_INET;
    a->sin_port = htons(8285);
    inet_pton(AF_INET, "127.0.0.2", &a->sin_addr);
    h->msg_namelen = sizeof(*a);
    h->msg_flags = 0;
}

static int fz_recvmmsg(int fd, struct mmsghdr *m, unsigned n, int flags, struct timespec *t)
{
    if (fd != g_ufd)
        return recvmmsg(fd, m, n, flags, t);
    if (g_recv_kind == RECV_NONE || g_recv_left == 0) {
        errno = EAGAIN;
        return -1;
    }
    unsigned got = 0;
    for (; got < n && g_recv_left != 0; got++) {
        if (g_recv_left > 0)
            g_recv_left--;
        struct msghdr *h = &m[got].msg_hdr;
        fill_from_peer(h);
        uint8_t *buf = h->msg_iov[0].iov_base;
        if (g_recv_kind == RECV_ONE) {
            ip_hdr(buf, 60, 17, "10.1.2.9", "10.1.1.5", 0);
            m[got].msg_len = 60;
            h->msg_controllen = 0;
            continue;
        }
        /* a GRO buffer of 20-byte packets: far more packets than a batch's arrays hold */
        int seg = 20, len = 65000;
        for (int off = 0; off + seg <= len; off += seg)
            ip_hdr(buf + off, seg, 17, "10.1.2.9", "10.1.1.5", 0);
        m[got].msg_len = (unsigned)len;
        struct cmsghdr *c = CMSG_FIRSTHDR(h);
        if (!c || h->msg_controllen < CMSG_SPACE(sizeof(int)))
            fail("no room for the UDP_GRO cmsg");
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_GRO;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &seg, sizeof(seg));
        h->msg_controllen = CMSG_SPACE(sizeof(int));
    }
    return (int)got;
}

static ssize_t fz_writev(int fd, const struct iovec *iov, int n)
{
    if (fd != g_tfd)
        return writev(fd, iov, n);
    if (g_write_fail) {
        errno = EIO;
        return -1;
    }
    g_written++;
    ssize_t b = 0;
    for (int i = 0; i < n; i++)
        b += (ssize_t)iov[i].iov_len;
    return b;
}

static int fz_poll(struct pollfd *p, nfds_t n, int timeout)
{
    if (!g_fake_udp_poll)
        return poll(p, n, timeout);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        int ready = 0;
        for (nfds_t i = 0; i < n; i++) {
            p[i].revents = 0;
            if (p[i].fd == g_ufd) {
                if ((p[i].events & POLLOUT) && g_room)
                    p[i].revents |= POLLOUT;
                if ((p[i].events & POLLIN) && g_recv_left != 0)
                    p[i].revents |= POLLIN;
            } else {
                struct pollfd one = p[i];
                if (poll(&one, 1, 0) > 0)
                    p[i].revents = one.revents;
            }
            ready += p[i].revents != 0;
        }
        if (ready)
            return ready;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (timeout >= 0 && ms >= timeout)
            return 0;
        usleep(500);
    }
}

/* route.c is built from csrc/tests/regress_route.c with its unlock renamed to this hook. */
static int g_race_writers;
static __thread int t_in_hook;

static void *second_writer(void *arg)
{
    struct fl_route r = {.net = 0x0a010300, .len = 24, .next_hop = 0x7f000003, .port = 8285};
    fl_engine_set_routes(arg, &r, 1);
    return NULL;
}

int fz_mutex_unlock(pthread_mutex_t *m)
{
    int r = pthread_mutex_unlock(m);
    if (g_race_writers && g_e && m == &g_e->wlock && !t_in_hook) {
        /* another writer replaces (and frees) the table this writer just published, before
         * this one returns: exactly the interleaving the writers' lock used to allow */
        t_in_hook = 1;
        g_race_writers = 0;
        pthread_t t;
        pthread_create(&t, NULL, second_writer, g_e);
        pthread_join(t, NULL);
        t_in_hook = 0;
    }
    return r;
}

#define read fz_read
#define sendmmsg fz_sendmmsg
#define recvmmsg fz_recvmmsg
#define writev fz_writev
#define poll fz_poll
#include "engine.c"
#include "tun_batch.c"
#include "udp_batch.c"
#undef read
#undef sendmmsg
#undef recvmmsg
#undef writev
#undef poll

/* ---- scenarios ---- */

static uint64_t counter(const char *name)
{
    uint64_t c[C_COUNT];
    fl_engine_counters(g_e, c, C_COUNT);
    for (int i = 0; i < C_COUNT; i++)
        if (!strcmp(counter_names[i] ? counter_names[i] : "", name))
            return c[i];
    fprintf(stderr, "no counter %s\n", name);
    exit(2);
}

static void setup(void)
{
    g_tfd = eventfd(1, EFD_NONBLOCK); /* always readable: the TUN "has packets" */
    g_ufd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (g_tfd < 0 || g_ufd < 0 || bind(g_ufd, (struct sockaddr *)&a, sizeof(a)) != 0)
        fail("fds");
    struct fl_config cfg = {.n_tun = 1, .udp_fd = g_ufd, .mtu = 1400, .check_source = 1,
                            .offload = 1, .network = 0x0a010000, .network_len = 16};
    cfg.tun_fds[0] = g_tfd;
    inet_pton(AF_INET, "10.1.1.0", &cfg.tun_addr);
    cfg.tun_addr = ntohl(cfg.tun_addr);
    char err[256];
    g_e = fl_engine_new(&cfg, err, sizeof(err));
    if (!g_e)
        fail(err);
    struct fl_route routes[] = {
        {.net = 0x0a010200, .len = 24, .next_hop = 0x7f000002, .port = 8285},
    };
    if (fl_engine_set_routes(g_e, routes, 1) != 1)
        fail("set_routes");
    g_w = &g_e->workers[0];
    /* plain packets, no offloads, unless a scenario turns them on */
    g_e->feat.vnet_hdr = g_e->feat.tso = g_e->feat.coalesce = 0;
    g_e->feat.gso = g_e->feat.gro = 0;
}

/* Finding 1: a flush that waited for socket room mid-round must hand back an online worker,
 * since the round goes on reading packets and looking up their routes. */
static void sc_online_after_wait(void)
{
    g_e->feat.vnet_hdr = 1;
    g_read_kind = READ_TSO;
    g_reads_left = 3; /* three frames of thousands of segments: a flush mid-round */
    g_send_eagain_first = 1;
    int failed = 0;
    tx_round(g_w, g_w->tx, g_tfd, &failed);
    long segs = 3L * ((g_tso_payload + g_tso_mss - 1) / g_tso_mss);
    printf("offline reads %ld, waits %llu, sent %ld of %ld\n", g_offline_reads,
           (unsigned long long)counter("tx_eagain_waits"), g_sent_dgrams, segs);
    if (counter("tx_eagain_waits") < 1)
        fail("the scenario did not wait for room mid-round");
    if (g_offline_reads)
        fail("the worker read (and routed) packets while marked offline");
    if (g_sent_dgrams != segs || (long)counter("tx_packets") != segs)
        fail("segments lost");
}

/* Finding 3: stop returns while a flood goes on (the TUN always has another packet). */
static void sc_stop_under_flood(void)
{
    g_read_kind = READ_PLAIN;
    g_reads_left = -1;
    g_w = NULL;
    if (fl_engine_start(g_e) != 0)
        fail("start");
    usleep(100 * 1000);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    fl_engine_stop(g_e); /* the watchdog (alarm) fails the scenario if this never returns */
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
    printf("stop under flood took %.3f ms after %llu packets\n", ms,
           (unsigned long long)counter("tx_packets"));
    if (counter("tx_packets") == 0)
        fail("no flood");
}

/* Finding 5: GRO buffers of tiny segments hold more packets than a batch's arrays; all are
 * delivered, none written past the arrays (ASan would say so). */
static void sc_rx_tiny_gro_segments(void)
{
    g_e->feat.gro = 1;
    g_recv_kind = RECV_GRO_TINY;
    g_recv_left = 8;
    int failed = 0;
    int r = rx_round(g_w, g_w->rx, g_ufd, &failed);
    long want = 8L * (65000 / 20);
    printf("datagrams %d, packets %llu, written %ld (want %ld)\n", r,
           (unsigned long long)counter("rx_packets"), g_written, want);
    if ((long)counter("rx_packets") != want || g_written != want)
        fail("packets lost or miscounted");
}

/* Finding 6: a failed TUN write of one plain packet counts one drop. */
static void sc_tun_write_error_counts_one(void)
{
    g_recv_kind = RECV_ONE;
    g_recv_left = 1;
    g_write_fail = 1;
    int failed = 0;
    rx_round(g_w, g_w->rx, g_ufd, &failed);
    printf("drop_rx_tun_write_error = %llu\n",
           (unsigned long long)counter("drop_rx_tun_write_error"));
    if (counter("drop_rx_tun_write_error") != 1)
        fail("a failed write of one packet must count one drop");
}

/* Finding 8: a failed GSO send falls back to plain sends for that batch and GSO is tried
 * again later, not lost for good. */
static void sc_gso_fallback_and_reprobe(void)
{
    g_e->feat.gso = 1;
    g_read_kind = READ_PLAIN;
    g_gso_broken = 1;
    g_reads_left = 10;
    int failed = 0;
    tx_round(g_w, g_w->tx, g_tfd, &failed);
    printf("round 1: sent %ld, gso msgs %ld, gso now %d\n", g_sent_dgrams, g_sent_gso_msgs,
           fl_gso_enabled(g_e));
    if (g_sent_dgrams != 10 || counter("drop_tx_send_error") != 0)
        fail("the batch must go out without GSO");
    if (fl_gso_enabled(g_e))
        fail("GSO must pause after a failure");
    g_gso_broken = 0;
    usleep((GSO_RETRY_FIRST_MS + 100) * 1000);
    g_reads_left = 10;
    tx_round(g_w, g_w->tx, g_tfd, &failed);
    printf("round 2: sent %ld, gso msgs %ld, gso now %d\n", g_sent_dgrams, g_sent_gso_msgs,
           fl_gso_enabled(g_e));
    if (g_sent_gso_msgs < 1 || !fl_gso_enabled(g_e) || g_sent_dgrams != 20)
        fail("GSO must be tried again after the pause");
    if (counter("tx_gso_fallbacks") != 1)
        fail("the fallback must be counted");
}

/* Finding 9: a socket that never has room bounds the flush's wait, drops and counts the rest,
 * and the combined worker serves RX while it waits. */
static void sc_saturated_egress(void)
{
    g_fake_udp_poll = 1;
    g_room = 0;
    g_send_always_eagain = 1;
    g_read_kind = READ_PLAIN;
    g_reads_left = 64;
    g_recv_kind = RECV_ONE;
    g_recv_left = 20;
    int failed = 0;
    tx_round(g_w, g_w->tx, g_tfd, &failed);
    printf("rx packets while TX waited: %llu\n", (unsigned long long)counter("rx_packets"));
    if (counter("rx_packets") != 20)
        fail("RX was starved while TX waited");
    printf("socket_full drops %llu, rx rounds in waits %llu\n",
           (unsigned long long)counter("drop_tx_socket_full"),
           (unsigned long long)counter("tx_wait_rx_rounds"));
    if (counter("drop_tx_socket_full") != 64)
        fail("the unsent batch must be dropped and counted");
}

/* Finding 4: a route writer must not touch its table after releasing the writers' lock. */
static void sc_route_writers_race(void)
{
    struct fl_route r = {.net = 0x0a010400, .len = 24, .next_hop = 0x7f000004, .port = 8285};
    g_race_writers = 1;
    int n = fl_engine_set_routes(g_e, &r, 1);
    printf("first writer saw %d routes\n", n);
    if (n != 1)
        fail("wrong route count");
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "FAIL: timed out (hang)\n";
    if (write(2, msg, sizeof(msg) - 1) < 0) {
    }
    _exit(3);
}

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        void (*fn)(void);
    } sc[] = {
        {"online_after_wait", sc_online_after_wait},
        {"stop_under_flood", sc_stop_under_flood},
        {"rx_tiny_gro_segments", sc_rx_tiny_gro_segments},
        {"tun_write_error_counts_one", sc_tun_write_error_counts_one},
        {"gso_fallback_and_reprobe", sc_gso_fallback_and_reprobe},
        {"saturated_egress", sc_saturated_egress},
        {"route_writers_race", sc_route_writers_race},
    };
    if (argc != 2) {
        for (size_t i = 0; i < sizeof(sc) / sizeof(sc[0]); i++)
            printf("%s\n", sc[i].name);
        return 0;
    }
    signal(SIGALRM, on_alarm);
    alarm(20);
    setup();
    for (size_t i = 0; i < sizeof(sc) / sizeof(sc[0]); i++)
        if (!strcmp(argv[1], sc[i].name)) {
            sc[i].fn();
            fl_engine_free(g_e);
            close(g_tfd);
            close(g_ufd);
            printf("PASS %s\n", argv[1]);
            return 0;
        }
    fprintf(stderr, "unknown scenario %s\n", argv[1]);
    return 2;
}
