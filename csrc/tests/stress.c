/* Stress program for the engine's threads under AddressSanitizer/UBSan or ThreadSanitizer.
 *
 * Route tables are replaced in a tight loop while traffic flows both ways, so a reader that
 * touches a table after the writer's grace period (QSBR) shows up as a use-after-free (ASan) or
 * a race on freed memory (TSan). Needs no namespaces and no TUN device:
 *
 * - each "TUN" queue is one end of an AF_UNIX SOCK_DGRAM socketpair; stress_hooks.h (force-included
 *   into engine.c only) makes it answer the TUN ioctls, so the engine uses its vnet_hdr/TSO path;
 * - the engine's UDP socket and one socket per simulated peer are real UDP sockets on 127.0.0.x;
 *   the peers have small receive buffers, and the send wrapper injects EAGAIN, ENOBUFS and short
 *   sends (loopback never fills a UDP send buffer), so tx_flush waits for room mid-round;
 * - feeder threads write TSO frames of thousands of small segments (more than the 4096 datagrams
 *   a round queues before flushing) plus every kind of small or bad packet into the fake TUN;
 * - the peers send datagrams (singles, UDP GSO batches of TCP runs, malformed) to the engine;
 * - one thread swaps two route tables in a loop, another calls the test entry points.
 *
 * Three phases: vnet_hdr+TSO with one combined worker; vnet_hdr with two queues and an RX thread;
 * no vnet_hdr and no offloads. Build: make asan / make tsan (CSRC=dir points it at other sources).
 * Usage: stress [seconds]. Exits non-zero on a sanitizer report (the sanitizers abort) or when a
 * phase moved no traffic (then the program tested nothing).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "engine_test_cdef.h"

/* Sanitizer defaults: stop at the first report, with a non-zero exit status. */
const char *__asan_default_options(void) { return "abort_on_error=0:halt_on_error=1:exitcode=23"; }
const char *__ubsan_default_options(void) { return "halt_on_error=1:print_stacktrace=1"; }
const char *__tsan_default_options(void) { return "halt_on_error=1:exitcode=66:second_deadlock_stack=1"; }

#define N_PEERS 4
#define MTU 1400

static void die(const char *what)
{
    perror(what);
    exit(3);
}

/* ---------------------------------------------------------------- hooks (see stress_hooks.h) */

static int fake_fds[FL_MAX_QUEUES];
static atomic_int n_fake;
static atomic_int fake_vnet = 1;
static atomic_uint send_calls;

static int is_fake(int fd)
{
    for (int i = 0; i < atomic_load(&n_fake); i++)
        if (fake_fds[i] == fd)
            return 1;
    return 0;
}

int fl_stress_ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!is_fake(fd))
        return ioctl(fd, req, arg);
    if (atomic_load(&fake_vnet)) {
        if (req == TUNGETIFF) {
            struct ifreq *ifr = arg;
            memset(ifr, 0, sizeof(*ifr));
            snprintf(ifr->ifr_name, sizeof(ifr->ifr_name), "fake%d", fd);
            ifr->ifr_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
            return 0;
        }
        if (req == TUNSETVNETHDRSZ || req == TUNSETOFFLOAD)
            return 0;
    }
    errno = ENOTTY;
    return -1;
}

static atomic_int stress_udp = -1;
static atomic_uint poll_calls;

/* Half the time the engine's socket is both readable and writable, poll says only readable:
 * the combined worker's wait for room in the send buffer then runs RX rounds meanwhile. */
int fl_stress_poll(struct pollfd *p, nfds_t n, int timeout)
{
    int r = poll(p, n, timeout);
    if (r > 0 && n >= 1 && p[0].fd == atomic_load(&stress_udp) && (p[0].events & POLLOUT) &&
        (p[0].revents & POLLOUT) && (p[0].revents & POLLIN) && atomic_fetch_add(&poll_calls, 1) % 2)
        p[0].revents &= (short)~POLLOUT;
    return r;
}

/* One call in three fails with EAGAIN (one in 64 with ENOBUFS), one in five sends only half. */
int fl_stress_sendmmsg(int fd, struct mmsghdr *m, unsigned n, int flags)
{
    unsigned c = atomic_fetch_add(&send_calls, 1);
    if (c % 3 == 1) {
        errno = c % 64 == 1 ? ENOBUFS : EAGAIN;
        return -1;
    }
    if (c % 5 == 2 && n > 1)
        n /= 2;
    return sendmmsg(fd, m, n, flags);
}

/* ---------------------------------------------------------------- packets */

static uint32_t rnd(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static uint16_t ref_csum(const uint8_t *p, int len, uint32_t sum)
{
    for (int i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        sum += (uint32_t)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}

static void ip_header(uint8_t *p, int tot, uint8_t proto, uint32_t src, uint32_t dst, uint8_t ttl,
                      uint16_t frag)
{
    memset(p, 0, 20);
    p[0] = 0x45;
    put16(p + 2, (uint16_t)tot);
    put16(p + 4, 77);
    put16(p + 6, frag);
    p[8] = ttl;
    p[9] = proto;
    put32(p + 12, src);
    put32(p + 16, dst);
    put16(p + 10, ref_csum(p, 20, 0));
}

static uint32_t tcp_pseudo(const uint8_t *ip, int l4len)
{
    uint32_t s = 0;
    for (int i = 12; i < 20; i += 2)
        s += (uint32_t)(ip[i] << 8 | ip[i + 1]);
    return s + 6 + (uint32_t)l4len;
}

/* IPv4 + TCP (20-byte header, ACK) + payload with valid checksums; returns the length. */
static int tcp_packet(uint8_t *p, uint32_t src, uint32_t dst, uint32_t seq, int plen, uint8_t flags)
{
    int tot = 40 + plen;
    ip_header(p, tot, 6, src, dst, 64, 0x4000);
    uint8_t *t = p + 20;
    memset(t, 0, 20);
    put16(t, 40000);
    put16(t + 2, 5201);
    put32(t + 4, seq);
    put32(t + 8, 1000);
    t[12] = 5 << 4;
    t[13] = flags;
    put16(t + 14, 512);
    for (int i = 0; i < plen; i++)
        t[20 + i] = (uint8_t)(seq + (uint32_t)i);
    put16(t + 16, ref_csum(t, 20 + plen, tcp_pseudo(p, 20 + plen)));
    return tot;
}

static int udp_packet(uint8_t *p, uint32_t src, uint32_t dst, int plen, uint8_t ttl, uint16_t frag)
{
    int tot = 28 + plen;
    ip_header(p, tot, 17, src, dst, ttl, frag);
    put16(p + 20, 1234);
    put16(p + 22, 5678);
    put16(p + 24, (uint16_t)(8 + plen));
    put16(p + 26, 0);
    memset(p + 28, 0xab, (size_t)plen);
    return tot;
}

/* ---------------------------------------------------------------- topology */

struct stress {
    struct fl_engine *e;
    int n_q;
    int tun[FL_MAX_QUEUES][2]; /* [0] the engine's end, [1] ours */
    int udp;                   /* the engine's socket */
    struct sockaddr_in eaddr;
    int peer[N_PEERS];
    int rogue[N_PEERS]; /* same address as the peer, another port */
    uint32_t peer_ip[N_PEERS];
    uint16_t peer_port[N_PEERS];
    struct fl_route ta[16], tb[16];
    int na, nb;
    int vnet;
    atomic_int stop;
    atomic_ulong swaps, fed, peer_sent, tun_out, lookups;
};

static uint32_t ip4(int a, int b, int c, int d) { return (uint32_t)(a << 24 | b << 16 | c << 8 | d); }

static void make_tables(struct stress *s)
{
    /* A routes to all four peers; B never to peer 0, so its datagrams are foreign half the time */
    int k = 0;
    s->ta[k++] = (struct fl_route){ip4(10, 1, 0, 0), 16, s->peer_ip[0], s->peer_port[0]};
    s->ta[k++] = (struct fl_route){ip4(10, 2, 0, 0), 16, s->peer_ip[1], s->peer_port[1]};
    s->ta[k++] = (struct fl_route){ip4(10, 3, 0, 0), 16, s->peer_ip[2], s->peer_port[2]};
    s->ta[k++] = (struct fl_route){ip4(10, 3, 7, 0), 24, s->peer_ip[3], s->peer_port[3]};
    s->na = k;
    k = 0;
    s->tb[k++] = (struct fl_route){ip4(10, 1, 0, 0), 16, s->peer_ip[1], s->peer_port[1]};
    s->tb[k++] = (struct fl_route){ip4(10, 2, 0, 0), 16, s->peer_ip[2], s->peer_port[2]};
    s->tb[k++] = (struct fl_route){ip4(10, 3, 0, 0), 16, s->peer_ip[3], s->peer_port[3]};
    for (int i = 0; i < 8; i++)
        s->tb[k++] = (struct fl_route){ip4(10, 1, (uint8_t)(5 + i), 0), 24, s->peer_ip[1 + i % 3],
                                       s->peer_port[1 + i % 3]};
    s->tb[k++] = (struct fl_route){ip4(10, 2, 9, 9), 32, s->peer_ip[3], s->peer_port[3]};
    s->nb = k;
}

static void set_buf(int fd, int opt, int force_opt, int size)
{
    if (setsockopt(fd, SOL_SOCKET, force_opt, &size, sizeof(size)) != 0 &&
        setsockopt(fd, SOL_SOCKET, opt, &size, sizeof(size)) != 0)
        die("setsockopt buf");
}

static int udp_bound(uint32_t ip, uint16_t *port)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(ip)};
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
        die("bind");
    socklen_t sl = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &sl);
    *port = ntohs(a.sin_port);
    return fd;
}

static void setup(struct stress *s, int n_q, int vnet, int offload, int rx_thread)
{
    memset(s, 0, sizeof(*s));
    s->n_q = n_q;
    s->vnet = vnet;
    atomic_store(&fake_vnet, vnet);
    for (int q = 0; q < n_q; q++) {
        if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, s->tun[q]) != 0)
            die("socketpair");
        set_buf(s->tun[q][1], SO_SNDBUF, SO_SNDBUFFORCE, 2 << 20);
        set_buf(s->tun[q][0], SO_SNDBUF, SO_SNDBUFFORCE, 1 << 20);
        fake_fds[q] = s->tun[q][0];
    }
    atomic_store(&n_fake, n_q);
    uint16_t port;
    s->udp = udp_bound(ip4(127, 0, 0, 1), &port);
    atomic_store(&stress_udp, s->udp);
    set_buf(s->udp, SO_SNDBUF, SO_SNDBUFFORCE, 4608);
    set_buf(s->udp, SO_RCVBUF, SO_RCVBUFFORCE, 256 << 10);
    s->eaddr = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(port),
                                    .sin_addr.s_addr = htonl(ip4(127, 0, 0, 1))};
    for (int i = 0; i < N_PEERS; i++) {
        s->peer_ip[i] = ip4(127, 0, 0, 2 + i);
        s->peer[i] = udp_bound(s->peer_ip[i], &s->peer_port[i]);
        set_buf(s->peer[i], SO_RCVBUF, SO_RCVBUFFORCE, 8192);
        uint16_t rport;
        s->rogue[i] = udp_bound(s->peer_ip[i], &rport);
    }
    make_tables(s);
    struct fl_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    for (int q = 0; q < n_q; q++)
        cfg.tun_fds[q] = s->tun[q][0];
    cfg.n_tun = n_q;
    cfg.udp_fd = s->udp;
    cfg.mtu = MTU;
    cfg.tun_addr = ip4(10, 0, 0, 1);
    cfg.check_source = 1;
#ifdef STRESS_INNER_CHECK /* sources that have fl_config.network (the Makefile looks) */
    cfg.network = ip4(10, 0, 0, 0);
    cfg.network_len = 8;
#endif
    cfg.offload = offload;
    cfg.icmp_rate = 1000000; /* let most ICMP errors through: more writes into the TUN */
    cfg.rx_thread = rx_thread;
    char err[256] = "";
    s->e = fl_engine_new(&cfg, err, sizeof(err));
    if (!s->e) {
        fprintf(stderr, "fl_engine_new: %s\n", err);
        exit(3);
    }
    if (fl_engine_set_routes(s->e, s->ta, s->na) < 0) {
        fprintf(stderr, "set_routes failed\n");
        exit(3);
    }
}

static void teardown(struct stress *s)
{
    fl_engine_free(s->e);
    atomic_store(&n_fake, 0);
    for (int q = 0; q < s->n_q; q++) {
        close(s->tun[q][0]);
        close(s->tun[q][1]);
    }
    atomic_store(&stress_udp, -1);
    close(s->udp);
    for (int i = 0; i < N_PEERS; i++) {
        close(s->peer[i]);
        close(s->rogue[i]);
    }
}

/* ---------------------------------------------------------------- threads */

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

struct feeder {
    struct stress *s;
    int q;
};

static void drain(int fd, atomic_ulong *count)
{
    static __thread uint8_t buf[70000];
    while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) >= 0)
        atomic_fetch_add(count, 1);
}

/* Sends one frame into the fake TUN; waits for room (draining what the engine wrote back). */
static void tun_send(struct stress *s, int q, const uint8_t *f, int len)
{
    int fd = s->tun[q][1];
    while (!atomic_load(&s->stop)) {
        if (send(fd, f, (size_t)len, MSG_DONTWAIT) >= 0) {
            atomic_fetch_add(&s->fed, 1);
            return;
        }
        if (errno != EAGAIN && errno != ENOBUFS && errno != EINTR)
            die("send to fake tun");
        drain(fd, &s->tun_out);
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        poll(&p, 1, 5);
    }
}

static void vnet(uint8_t *f, uint8_t flags, uint8_t gso_type, uint16_t hdr_len, uint16_t gso_size,
                 uint16_t csum_start, uint16_t csum_offset)
{
    struct fl_vnet_hdr h = {flags, gso_type, hdr_len, gso_size, csum_start, csum_offset};
    memcpy(f, &h, FL_VNET_HDR_LEN);
}

static uint32_t routed_dst(uint32_t *r)
{
    static const uint8_t nets[] = {1, 2, 3, 3, 9}; /* 10.9/16 has no route: ICMP errors */
    uint32_t x = rnd(r);
    return ip4(10, nets[x % 5], (uint8_t)(x >> 8) % 16, (uint8_t)(x >> 16));
}

static void *feeder_main(void *arg)
{
    struct feeder *fd = arg;
    struct stress *s = fd->s;
    int q = fd->q;
    uint32_t r = 0x9e3779b9u * (uint32_t)(q + 1);
    static __thread uint8_t f[65536 + 16];
    int hl = s->vnet ? FL_VNET_HDR_LEN : 0;
    uint8_t *p = f + hl;
    uint32_t src = ip4(10, 0, 0, 1);
    while (!atomic_load(&s->stop)) {
        if (s->vnet) {
            /* big TSO frames of tiny segments: thousands of datagrams, mid-round flushes */
            for (int i = 0; i < 6; i++) {
                uint16_t g = (uint16_t)(8 + 8 * (rnd(&r) % 8));
                int plen = 16000 + (int)(rnd(&r) % 16000);
                int len = tcp_packet(p, src, routed_dst(&r), rnd(&r), plen, 0x18);
                p[8] = i == 5 ? 1 : 64; /* one TTL-expired frame per burst */
                put16(p + 10, 0);
                put16(p + 10, ref_csum(p, 20, 0));
                vnet(f, FL_VNET_F_NEEDS_CSUM, FL_VNET_GSO_TCPV4 | (i == 3 ? FL_VNET_GSO_ECN : 0), 40,
                     g, 20, 16);
                tun_send(s, q, f, hl + len);
            }
        }
        /* small packets of every kind */
        for (int i = 0; i < 48; i++) {
            uint32_t x = rnd(&r);
            uint32_t dst = routed_dst(&r);
            int len;
            if (hl)
                vnet(f, 0, FL_VNET_GSO_NONE, 0, 0, 0, 0);
            switch (x % 10) {
            case 0: /* TTL 1: time exceeded */
                len = udp_packet(p, src, dst, 16, 1, 0);
                break;
            case 1: /* too big with DF: fragmentation needed */
                len = udp_packet(p, src, dst, MTU, 64, 0x4000);
                break;
            case 2: /* not IPv4 / truncated */
                len = 1 + (int)(x >> 8) % 24;
                memset(p, (int)(x >> 16), (size_t)len);
                break;
            case 3: /* NEEDS_CSUM UDP, sometimes with an offset past the end */
                len = udp_packet(p, src, dst, 40 + (int)(x >> 8) % 1200, 64, 0);
                if (hl)
                    vnet(f, FL_VNET_F_NEEDS_CSUM, FL_VNET_GSO_NONE, 0, 0, 20, (x >> 8) % 2 ? 6 : 60);
                break;
            case 4: /* unknown GSO type, or a TSO frame that is not TCP */
                len = udp_packet(p, src, dst, 64, 64, 0);
                if (hl)
                    vnet(f, 0, (x >> 8) % 2 ? 3 : FL_VNET_GSO_TCPV4, 28, 16, 20, 6);
                break;
            case 5: /* a small TSO frame */
                len = tcp_packet(p, src, dst, x, 100 + (int)(x >> 8) % 900, 0x10);
                if (hl)
                    vnet(f, FL_VNET_F_NEEDS_CSUM, FL_VNET_GSO_TCPV4, 40, 100, 20, 16);
                break;
            default:
                len = udp_packet(p, src, dst, 8 + (int)(x >> 8) % 64, 64, 0);
            }
            tun_send(s, q, f, hl + len);
        }
        drain(s->tun[q][1], &s->tun_out);
    }
    return NULL;
}

/* Peers: drain what the engine sent them, then send it datagrams of every kind. */
static void *peers_main(void *arg)
{
    struct stress *s = arg;
    uint32_t r = 777;
    static __thread uint8_t buf[65536];
    uint32_t seq = 1;
    while (!atomic_load(&s->stop)) {
        for (int i = 0; i < N_PEERS; i++) {
            drain(s->peer[i], &s->tun_out);
            uint32_t x = rnd(&r);
            int fd = s->peer[i], len;
            /* inner source: in the subnet table A routes to this peer (B moves most of them) */
            static const uint32_t inner[N_PEERS] = {0x0a010005, 0x0a020005, 0x0a030005, 0x0a030705};
            uint32_t dst = ip4(10, 0, 0, 1), src = inner[i];
            struct iovec iov = {buf, 0};
            struct msghdr m = {.msg_name = &s->eaddr, .msg_namelen = sizeof(s->eaddr),
                               .msg_iov = &iov, .msg_iovlen = 1};
            char cb[CMSG_SPACE(sizeof(uint16_t))];
            switch (x % 6) {
            case 0:
            case 1: { /* a GSO batch of one TCP flow's run: GRO on the engine side, coalescing */
                int big = (x >> 8) % 2, plen = big ? 1000 : 200, n = 2 + (int)(x >> 12) % (big ? 40 : 20);
                len = 0;
                for (int k = 0; k < n; k++, seq += (uint32_t)plen)
                    len += tcp_packet(buf + len, src, dst, seq, plen, 0x10);
                uint16_t gs = (uint16_t)(40 + plen); /* every packet of the run has this size */
                memset(cb, 0, sizeof(cb));
                m.msg_control = cb;
                m.msg_controllen = sizeof(cb);
                struct cmsghdr *c = CMSG_FIRSTHDR(&m);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(gs));
                memcpy(CMSG_DATA(c), &gs, sizeof(gs));
                break;
            }
            case 2: /* malformed: bad header checksum, short, or empty */
                len = udp_packet(buf, src, dst, 32, 64, 0);
                if ((x >> 8) % 3 == 0)
                    buf[10] ^= 1;
                else
                    len = (int)(x >> 8) % 3 == 1 ? 10 : 0;
                break;
            case 3: /* a single TCP segment (with PSH: never merged), sometimes from a wrong port */
                len = tcp_packet(buf, src, dst, seq, 100, 0x18);
                seq += 100;
                if ((x >> 8) % 4 == 0)
                    fd = s->rogue[i];
                break;
            default:
                len = udp_packet(buf, src, dst, 16 + (int)(x >> 8) % 300, 64, 0);
            }
            iov.iov_len = (size_t)len;
            if (sendmsg(fd, &m, MSG_DONTWAIT) >= 0)
                atomic_fetch_add(&s->peer_sent, 1);
        }
    }
    return NULL;
}

static void *routes_main(void *arg)
{
    struct stress *s = arg;
    uint64_t c[C_COUNT];
    for (unsigned long i = 0; !atomic_load(&s->stop); i++) {
        int odd = i & 1;
        if (fl_engine_set_routes(s->e, odd ? s->tb : s->ta, odd ? s->nb : s->na) < 0) {
            fprintf(stderr, "set_routes failed\n");
            exit(3);
        }
        atomic_fetch_add(&s->swaps, 1);
        if (i % 64 == 0) {
            struct fl_features f;
            fl_engine_counters(s->e, c, C_COUNT);
            fl_engine_features(s->e, &f);
        }
    }
    return NULL;
}

/* The test entry points run on the engine's test worker, also a QSBR reader. */
static void *lookups_main(void *arg)
{
    struct stress *s = arg;
    uint32_t r = 4242;
    uint8_t pkt[64];
    while (!atomic_load(&s->stop)) {
        uint32_t hop;
        uint16_t port;
        fl_lookup(s->e, routed_dst(&r), &hop, &port);
        uint8_t icmp[128];
        int icmp_len, len = udp_packet(pkt, ip4(10, 0, 0, 1), routed_dst(&r), 16, rnd(&r) % 8 ? 64 : 1, 0);
        fl_tx_packet(s->e, pkt, len, &hop, &port, icmp, &icmp_len);
        atomic_fetch_add(&s->lookups, 1);
    }
    return NULL;
}

static uint64_t counter(const uint64_t *c, const char *name)
{
    for (int i = 0; i < fl_counter_count(); i++)
        if (strcmp(fl_counter_name(i), name) == 0)
            return c[i];
    fprintf(stderr, "no counter %s\n", name);
    exit(3);
}

/* For counters that older sources lack (the program also builds against those). */
static long counter_or(const uint64_t *c, const char *name)
{
    for (int i = 0; i < fl_counter_count(); i++)
        if (strcmp(fl_counter_name(i), name) == 0)
            return (long)c[i];
    return -1;
}

static int run_phase(const char *name, long ms, int n_q, int vnet, int offload, int rx_thread)
{
    struct stress s;
    setup(&s, n_q, vnet, offload, rx_thread);
    struct fl_features feat;
    fl_engine_features(s.e, &feat);
    if (fl_engine_start(s.e) != 0)
        die("fl_engine_start");
    pthread_t th[FL_MAX_QUEUES + 3];
    struct feeder fd[FL_MAX_QUEUES];
    int nt = 0;
    for (int q = 0; q < n_q; q++) {
        fd[q] = (struct feeder){&s, q};
        pthread_create(&th[nt++], NULL, feeder_main, &fd[q]);
    }
    pthread_create(&th[nt++], NULL, peers_main, &s);
    pthread_create(&th[nt++], NULL, routes_main, &s);
    pthread_create(&th[nt++], NULL, lookups_main, &s);
    sleep_ms(ms / 2);
    /* stop and restart in the middle of the flood (a stop must not wait for the input to end) */
    fl_engine_stop(s.e);
    if (fl_engine_start(s.e) != 0)
        die("fl_engine_start (again)");
    sleep_ms(ms - ms / 2);
    atomic_store(&s.stop, 1);
    for (int i = 0; i < nt; i++)
        pthread_join(th[i], NULL);
    fl_engine_stop(s.e);
    uint64_t c[C_COUNT];
    fl_engine_counters(s.e, c, C_COUNT);
    printf("%-28s vnet=%d tso=%d gso=%d gro=%d coalesce=%d queues=%d | swaps=%lu fed=%lu "
           "peer_sent=%lu | tx_packets=%lu tx_tso_frames=%lu tx_sendmmsg=%lu eagain_waits=%lu "
           "rx_packets=%lu rx_gro_msgs=%lu rx_coalesced=%lu icmp=%lu foreign=%lu | wait_rx_rounds=%ld "
           "socket_full=%ld inner_source=%ld source_port=%ld\n",
           name, feat.vnet_hdr, feat.tso, feat.gso, feat.gro, feat.coalesce, feat.queues,
           atomic_load(&s.swaps), atomic_load(&s.fed), atomic_load(&s.peer_sent),
           (unsigned long)counter(c, "tx_packets"), (unsigned long)counter(c, "tx_tso_frames"),
           (unsigned long)counter(c, "tx_sendmmsg_calls"), (unsigned long)counter(c, "tx_eagain_waits"),
           (unsigned long)counter(c, "rx_packets"), (unsigned long)counter(c, "rx_gro_msgs"),
           (unsigned long)counter(c, "rx_coalesced_frames"), (unsigned long)counter(c, "icmp_sent"),
           (unsigned long)counter(c, "drop_rx_foreign_source"), counter_or(c, "tx_wait_rx_rounds"),
           counter_or(c, "drop_tx_socket_full"), counter_or(c, "drop_rx_inner_source"),
           counter_or(c, "drop_rx_source_port"));
    fflush(stdout);
    int ok = counter(c, "tx_packets") > 0 && counter(c, "rx_packets") > 0 &&
             counter(c, "tx_eagain_waits") > 0 && atomic_load(&s.swaps) > 10 &&
             (!vnet || counter(c, "tx_tso_frames") > 0);
    teardown(&s);
    if (!ok)
        fprintf(stderr, "stress: phase %s moved too little traffic to test anything\n", name);
    return ok;
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 6;
    long ms = (long)(secs * 1000 / 3);
    if (ms < 100)
        ms = 100;
    int ok = 1;
    /* the phase with the most threads first: a race on a lazily set global needs first uses in
     * two threads at once */
    ok &= run_phase("vnet, 2 queues, rx thread", ms, 2, 1, 1, 1);
    ok &= run_phase("vnet+tso, combined worker", ms, 1, 1, 1, 0);
    ok &= run_phase("plain tun, no offload", ms, 1, 0, 0, 0);
    puts(ok ? "stress: ok" : "stress: FAILED");
    return ok ? 0 : 2;
}
