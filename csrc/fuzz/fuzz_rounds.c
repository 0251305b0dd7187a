/* libFuzzer harness: whole worker loops of engine.c (TX and RX rounds, flushes, waits, GSO
 * fallback, coalescing, back-off) with every syscall on the TUN and the UDP socket faked.
 *
 * The real engine.c and its batch layers (tun_batch.c, udp_batch.c) are #included after their
 * syscalls are renamed to the fz_* fakes below, so the code under test is exactly the engine's;
 * nothing in them is edited. The worker loops
 * (tx_main/rx_main/both_main) run in this thread, one after the other, each on its own slice of
 * the input, and end when their slice does (the fake poll then reports the stop eventfd).
 *
 * Input: config:u8 mtu:u8, then a stream the fakes consume as the engine calls them:
 *   poll      ev:u8          bit0 TUN readable, bit1 socket readable, bit2 socket writable,
 *                            0xfe = EINTR, 0xfd = POLLNVAL on the first fd
 *   read      kind:u8 [len:u16 bytes]   0 EAGAIN, 1 EINTR, 2 EIO, else one frame of len bytes
 *   recvmmsg  k:u8, per message: len:u16 bytes flags:u8 [gro:u16] src:u32 port:u16
 *             k: 0 EAGAIN, 1 EIO, else (k - 2) % vlen + 1 messages;
 *             flags bit0 MSG_TRUNC, bit1 a UDP_GRO cmsg with segment size gro
 *   sendmmsg  r:u8           0 EAGAIN, 1 ENOBUFS, 2 EIO, 3 EINVAL, 4 EMSGSIZE, 5 EINTR,
 *                            else min(vlen, r - 5) messages sent
 *   writev    r:u8           0 EAGAIN, 1 EIO, 2 EINTR, else all written
 *   getsockopt(SO_ERROR) e:u8 bit0: a pending error
 * At the end of the input every call succeeds with nothing to do, and poll reports stop.
 * config: bit0 vnet_hdr, bit1 TSO accepted, bit2 UDP_SEGMENT, bit3 UDP_GRO, bit4 offload,
 *         bit5 rx_thread, bit6 check_source, bit7 two TUN queues.
 *
 * The fakes also check what the engine hands the kernel: every UDP datagram (each GSO segment)
 * is one IPv4 packet of at most the MTU whose total length is its size; every TUN write is one
 * IPv4 packet (or a GSO_TCPV4 frame) whose total length is what was written; every byte of every
 * iovec is read, so ASan checks them all.
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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "fuzz_common.h"

/* fd numbers no process has open: a syscall the fakes do not cover fails with EBADF */
#define FZ_TUN (1 << 20)
#define FZ_UDP ((1 << 20) + 64)

static struct fz_in *cur;
static int fz_config, fz_mtu, fz_vnet;

static int is_tun(int fd) { return fd >= FZ_TUN && fd < FZ_TUN + FL_MAX_QUEUES; }
static int is_fake(int fd) { return is_tun(fd) || fd == FZ_UDP; }

static int fail(int err)
{
    errno = err;
    return -1;
}

static int fz_poll(struct pollfd *p, nfds_t n, int timeout)
{
    (void)timeout;
    int ev = cur->end ? -1 : fz_u8(cur);
    if (cur->end)
        ev = -1; /* input used up: stop */
    if (ev == 0xfe)
        return fail(EINTR);
    int ready = 0;
    for (nfds_t i = 0; i < n; i++) {
        short r = 0;
        if (ev < 0)
            r = is_fake(p[i].fd) ? 0 : POLLIN;
        else if (ev == 0xfd && i == 0)
            r = POLLNVAL;
        else if (is_tun(p[i].fd))
            r = ev & 1 ? POLLIN : 0;
        else if (p[i].fd == FZ_UDP)
            r = (short)((ev & 2 ? POLLIN : 0) | (ev & 4 ? POLLOUT : 0));
        p[i].revents = (short)(r & (p[i].events | POLLNVAL | POLLERR | POLLHUP));
        ready += p[i].revents != 0;
    }
    return ready;
}

static ssize_t fz_read(int fd, void *buf, size_t cnt)
{
    if (!is_tun(fd))
        return read(fd, buf, cnt);
    if (cur->end)
        return fail(EAGAIN);
    int kind = fz_u8(cur);
    if (kind == 0 || cur->end)
        return fail(EAGAIN);
    if (kind == 1)
        return fail(EINTR);
    if (kind == 2)
        return fail(EIO);
    size_t want = fz_u16(cur);
    const uint8_t *d;
    size_t n = fz_take(cur, want < cnt ? want : cnt, &d);
    memcpy(buf, d, n);
    return (ssize_t)n;
}

static int fz_recvmmsg(int fd, struct mmsghdr *m, unsigned vlen, int flags, struct timespec *t)
{
    if (fd != FZ_UDP)
        return recvmmsg(fd, m, vlen, flags, t);
    int k = cur->end ? 0 : fz_u8(cur);
    if (k == 0 || cur->end)
        return fail(EAGAIN);
    if (k == 1)
        return fail(EIO);
    unsigned n = (unsigned)(k - 2) % vlen + 1;
    for (unsigned i = 0; i < n; i++) {
        struct msghdr *h = &m[i].msg_hdr;
        FZ_CHECK(h->msg_iovlen == 1, "recvmmsg: one iovec per message");
        size_t want = fz_u16(cur);
        const uint8_t *d;
        size_t len = fz_take(cur, want < h->msg_iov[0].iov_len ? want : h->msg_iov[0].iov_len, &d);
        memcpy(h->msg_iov[0].iov_base, d, len);
        m[i].msg_len = (unsigned)len;
        int fl = fz_u8(cur);
        h->msg_flags = fl & 1 ? MSG_TRUNC : 0;
        size_t used = 0;
        if (fl & 2) {
            int gs = fz_u16(cur);
            FZ_CHECK(h->msg_controllen >= CMSG_SPACE(sizeof(int)), "room for the GRO cmsg");
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_GRO;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(c), &gs, sizeof(gs));
            used = CMSG_SPACE(sizeof(int));
        }
        h->msg_controllen = used;
        struct sockaddr_in a = {.sin_family = AF_INET};
        a.sin_addr.s_addr = htonl(fz_u32(cur));
        a.sin_port = htons(fz_u16(cur));
        if (h->msg_name && h->msg_namelen >= sizeof(a)) {
            memcpy(h->msg_name, &a, sizeof(a));
            h->msg_namelen = sizeof(a);
        }
    }
    return (int)n;
}

/* Every byte of the iovecs, gathered: ASan checks the reads, the caller checks the contents. */
static size_t gather(const struct iovec *iov, size_t n, uint8_t *out, size_t cap)
{
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        FZ_CHECK(len + iov[i].iov_len <= cap, "message larger than %zu bytes", cap);
        memcpy(out + len, iov[i].iov_base, iov[i].iov_len);
        len += iov[i].iov_len;
    }
    return len;
}

static void check_wire_packet(const uint8_t *p, size_t len)
{
    FZ_CHECK(len >= 20 && (int)len <= fz_mtu, "datagram of %zu bytes (MTU %d)", len, fz_mtu);
    FZ_CHECK(p[0] >> 4 == 4 && (p[0] & 15) >= 5 && fz_be16(p + 2) == len,
             "datagram is not one IPv4 packet of its size (%zu, total length %u)", len, fz_be16(p + 2));
}

static uint8_t msgbuf[1 << 17];

static int fz_sendmmsg(int fd, struct mmsghdr *m, unsigned vlen, int flags)
{
    if (fd != FZ_UDP)
        return sendmmsg(fd, m, vlen, flags);
    FZ_CHECK(vlen > 0, "sendmmsg of nothing");
    for (unsigned i = 0; i < vlen; i++) {
        struct msghdr *h = &m[i].msg_hdr;
        FZ_CHECK(h->msg_name && h->msg_namelen == sizeof(struct sockaddr_in), "destination");
        size_t len = gather(h->msg_iov, h->msg_iovlen, msgbuf, sizeof(msgbuf));
        size_t seg = len;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
            FZ_CHECK(c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_SEGMENT, "unknown cmsg");
            uint16_t gs;
            memcpy(&gs, CMSG_DATA(c), sizeof(gs));
            seg = gs;
        }
        FZ_CHECK(len <= 65507 && seg > 0, "message of %zu bytes, segments of %zu", len, seg);
        FZ_CHECK((len + seg - 1) / seg <= 64, "more than 64 GSO segments");
        for (size_t off = 0; off < len; off += seg)
            check_wire_packet(msgbuf + off, len - off < seg ? len - off : seg);
        m[i].msg_len = (unsigned)len;
    }
    if (cur->end)
        return (int)vlen;
    int r = fz_u8(cur);
    if (cur->end)
        return (int)vlen;
    static const int errs[] = {EAGAIN, ENOBUFS, EIO, EINVAL, EMSGSIZE, EINTR};
    if (r < 6)
        return fail(errs[r]);
    return (int)((unsigned)(r - 5) < vlen ? (unsigned)(r - 5) : vlen);
}

static ssize_t fz_writev(int fd, const struct iovec *iov, int n)
{
    if (!is_tun(fd))
        return writev(fd, iov, n);
    size_t len = gather(iov, (size_t)n, msgbuf, sizeof(msgbuf));
    const uint8_t *p = msgbuf;
    size_t plen = len;
    if (fz_vnet) {
        FZ_CHECK(len >= FL_VNET_HDR_LEN, "TUN write without its vnet header");
        struct fl_vnet_hdr vh;
        memcpy(&vh, p, FL_VNET_HDR_LEN);
        p += FL_VNET_HDR_LEN;
        plen -= FL_VNET_HDR_LEN;
        if (vh.gso_type != FL_VNET_GSO_NONE) {
            FZ_CHECK(vh.gso_type == FL_VNET_GSO_TCPV4 && vh.gso_size > 0 && vh.hdr_len <= plen,
                     "GSO frame header");
            FZ_CHECK((vh.flags & FL_VNET_F_NEEDS_CSUM) &&
                         (size_t)vh.csum_start + vh.csum_offset + 2 <= plen,
                     "GSO frame checksum offsets");
        }
    }
    FZ_CHECK(plen >= 20 && p[0] >> 4 == 4 && fz_be16(p + 2) == plen,
             "TUN write is not one IPv4 packet of its size (%zu, total length %u)", plen,
             plen >= 4 ? fz_be16(p + 2) : 0);
    if (!cur->end) {
        int r = fz_u8(cur);
        if (!cur->end && r < 3)
            return fail(r == 0 ? EAGAIN : r == 1 ? EIO : EINTR);
    }
    return (ssize_t)len;
}

static int fz_getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    if (fd != FZ_UDP)
        return getsockopt(fd, level, name, val, len);
    if (level == SOL_SOCKET && name == SO_ERROR) {
        int e = cur->end ? 0 : (fz_u8(cur) & 1 ? ECONNREFUSED : 0);
        memcpy(val, &e, sizeof(e));
        return 0;
    }
    if (level == SOL_UDP && name == UDP_SEGMENT) {
        if (!(fz_config & 4))
            return fail(ENOPROTOOPT);
        int v = 0;
        memcpy(val, &v, sizeof(v));
        return 0;
    }
    return fail(ENOPROTOOPT);
}

static int fz_setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    if (fd != FZ_UDP)
        return setsockopt(fd, level, name, val, len);
    if (level == SOL_UDP && name == UDP_GRO)
        return fz_config & 8 ? 0 : fail(ENOPROTOOPT);
    return 0;
}

static int fz_ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!is_fake(fd))
        return ioctl(fd, req, arg);
    if (!is_tun(fd))
        return fail(ENOTTY);
    if (req == TUNGETIFF) {
        struct ifreq *ifr = arg;
        memset(ifr, 0, sizeof(*ifr));
        ifr->ifr_flags = (short)(IFF_TUN | IFF_NO_PI | (fz_config & 1 ? IFF_VNET_HDR : 0));
        return 0;
    }
    if (req == TUNSETVNETHDRSZ)
        return 0;
    if (req == TUNSETOFFLOAD)
        return arg == 0 || (fz_config & 2) ? 0 : fail(EINVAL);
    return fail(ENOTTY);
}

#define poll fz_poll
#define read fz_read
#define recvmmsg fz_recvmmsg
#define sendmmsg fz_sendmmsg
#define writev fz_writev
#define getsockopt fz_getsockopt
#define setsockopt fz_setsockopt
#define ioctl fz_ioctl
#define pthread_setname_np(t, name) ((void)(t), (void)(name), 0)

#include "engine.c"
#include "tun_batch.c"
#include "udp_batch.c"

#undef poll
#undef read
#undef recvmmsg
#undef sendmmsg
#undef writev
#undef getsockopt
#undef setsockopt
#undef ioctl

static const struct fl_route routes[] = {
    {0x0a000000, 8, 0x7f000002, 8285},  /* 10/8 */
    {0x0a010000, 16, 0x7f000003, 8285}, /* 10.1/16 */
    {0x0a010200, 24, 0x7f000004, 9000}, /* 10.1.2/24 */
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    static const int mtus[] = {1400, 576, 9000, 68};
    fz_config = data[0];
    fz_mtu = mtus[data[1] % 4];
    struct fl_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.n_tun = fz_config & 0x80 ? 2 : 1;
    for (int q = 0; q < cfg.n_tun; q++)
        cfg.tun_fds[q] = FZ_TUN + q;
    cfg.udp_fd = FZ_UDP;
    cfg.mtu = fz_mtu;
    cfg.tun_addr = 0x0a000001;
    cfg.check_source = (fz_config >> 6) & 1;
    cfg.network = 0x0a000000;
    cfg.network_len = 8;
    cfg.offload = (fz_config >> 4) & 1;
    cfg.rx_thread = (fz_config >> 5) & 1;
    cfg.icmp_rate = 1000000000;
    struct fz_in none = {data, 0, 0, 1};
    cur = &none;
    char err[128];
    struct fl_engine *e = fl_engine_new(&cfg, err, sizeof(err));
    FZ_CHECK(e != NULL, "fl_engine_new: %s", err);
    fz_vnet = e->feat.vnet_hdr;
    FZ_CHECK(fl_engine_set_routes(e, routes, 3) == 3, "routes");
    /* each worker loop runs on its own slice of the stream */
    size_t off = 2, left = size - 2;
    for (int i = 0; i < e->n_workers; i++) {
        struct fl_worker *w = &e->workers[i];
        size_t take = i == e->n_workers - 1 ? left : left / (size_t)(e->n_workers - i);
        struct fz_in in = {data + off, take, 0, 0};
        cur = &in;
        if (w->kind == FL_W_TX)
            tx_main(w);
        else if (w->kind == FL_W_RX)
            rx_main(w);
        else
            both_main(w);
        off += take;
        left -= take;
    }
    cur = &none;
    uint64_t c[C_COUNT];
    fl_engine_counters(e, c, C_COUNT);
    static int trace = -1; /* FUZZ_TRACE=1: the counters each input moved (seed maintenance) */
    if (trace < 0)
        trace = getenv("FUZZ_TRACE") != NULL;
    if (trace) {
        fprintf(stderr, "features vnet=%d tso=%d gso=%d gro=%d coalesce=%d |", e->feat.vnet_hdr,
                e->feat.tso, e->feat.gso, e->feat.gro, e->feat.coalesce);
        for (int i = 1; i < C_COUNT; i++)
            if (c[i])
                fprintf(stderr, " %s=%llu", fl_counter_name(i), (unsigned long long)c[i]);
        fputc('\n', stderr);
    }
    fl_engine_free(e);
    return 0;
}
