/* Engine lifecycle, worker threads and the syscalls of the data plane.
 *
 * Threads (csrc/README.md explains the choices): queue 0's worker carries both
 * directions unless rx_thread asks for a separate RX worker; extra TUN queues get TX-only workers.
 * A TX round reads the TUN until EAGAIN (bounded by count and bytes) and sends the batch with one
 * sendmmsg grouped by destination, with UDP GSO for runs of same-size datagrams. An RX round is
 * one recvmmsg; UDP GRO buffers are split by their segment size and each packet is written to the
 * TUN (on a vnet_hdr TUN, runs of TCP segments of one flow as one GSO frame). With TSO on, a TUN
 * read returns up to 64 KiB of one TCP flow, split here into MTU-sized packets whose headers live
 * in an arena and whose payloads are iovecs into the frame: no payload copy in userspace.
 *
 * Every wire datagram is one plain IPv4 packet of at most the overlay MTU: GSO only lets one
 * syscall carry many of them.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine.h"

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

#define SLOT_SIZE (65536 + 64)
#define TX_READS 64       /* TUN reads per batch */
#define TX_MAX_DGRAMS 4096 /* datagrams queued before a flush */
#define GSO_MAX_SEGS 64    /* kernel limit (UDP_MAX_SEGMENTS) */
#define GSO_MAX_BYTES 65507
#define MMSG_MAX 1024
#define RX_MSGS 64
#define RX_PKTS (RX_MSGS * GSO_MAX_SEGS) /* packets held before they are written to the TUN */
/* With GRO (and TSO on the TX side) a batch is bounded by bytes, not datagrams: ~512 KiB stays
 * in L2 between the copy in, the checksum pass and the copy out. */
#define BATCH_BYTES (512 * 1024)
/* A full socket send buffer is waited out in slices, for at most FLUSH_WAIT_MAX_MS per flush;
 * what is still queued then is dropped (counted drop_tx_socket_full), as a full NIC queue
 * drops. Bounded so neither the other direction nor a stop waits behind a saturated egress. */
#define FLUSH_WAIT_SLICE_MS 5
#define FLUSH_WAIT_MAX_MS 100
/* After a failed UDP GSO send, GSO is off for GSO_RETRY_FIRST_MS, then tried again; each
 * further failure doubles the pause up to GSO_RETRY_MAX_MS, a success resets it. */
#define GSO_RETRY_FIRST_MS 1000
#define GSO_RETRY_MAX_MS 60000

static const char *const counter_names[C_COUNT] = {
    [C_NONE] = "none",
    [C_TX_PACKETS] = "tx_packets",
    [C_TX_BYTES] = "tx_bytes",
    [C_RX_PACKETS] = "rx_packets",
    [C_RX_BYTES] = "rx_bytes",
    [C_TX_BATCHES] = "tx_batches",
    [C_TX_BATCH_READS] = "tx_batch_reads",
    [C_TX_SENDMMSG] = "tx_sendmmsg_calls",
    [C_TX_MSGS] = "tx_msgs",
    [C_TX_GSO_MSGS] = "tx_gso_msgs",
    [C_TX_TSO_FRAMES] = "tx_tso_frames",
    [C_TX_TSO_SEGMENTS] = "tx_tso_segments",
    [C_RX_BATCHES] = "rx_batches",
    [C_RX_BATCH_MSGS] = "rx_batch_msgs",
    [C_RX_GRO_MSGS] = "rx_gro_msgs",
    [C_RX_TUN_WRITES] = "rx_tun_writes",
    [C_RX_COALESCED_FRAMES] = "rx_coalesced_frames",
    [C_RX_COALESCED_SEGMENTS] = "rx_coalesced_segments",
    [C_ICMP_SENT] = "icmp_sent",
    [C_ICMP_SUPPRESSED] = "icmp_suppressed",
    [C_ROUTE_UPDATES] = "route_updates",
    [C_TX_EAGAIN_WAITS] = "tx_eagain_waits",
    [C_TX_GSO_FALLBACKS] = "tx_gso_fallbacks",
    [C_TX_WAIT_RX_ROUNDS] = "tx_wait_rx_rounds",
    [C_IO_ERRORS] = "io_errors",
    [D_TX_NOT_IPV4] = "drop_tx_not_ipv4",
    [D_TX_MALFORMED] = "drop_tx_malformed",
    [D_TX_NO_ROUTE] = "drop_tx_no_route",
    [D_TX_TTL_EXPIRED] = "drop_tx_ttl_expired",
    [D_TX_TOO_BIG] = "drop_tx_too_big",
    [D_TX_OVERSIZE] = "drop_tx_oversize",
    [D_TX_BAD_VNET] = "drop_tx_bad_vnet",
    [D_TX_SEND_ERROR] = "drop_tx_send_error",
    [D_TX_SOCKET_FULL] = "drop_tx_socket_full",
    [D_RX_FOREIGN_SOURCE] = "drop_rx_foreign_source",
    [D_RX_SOURCE_PORT] = "drop_rx_source_port",
    [D_RX_INNER_SOURCE] = "drop_rx_inner_source",
    [D_RX_NOT_IPV4] = "drop_rx_not_ipv4",
    [D_RX_MALFORMED] = "drop_rx_malformed",
    [D_RX_BAD_CHECKSUM] = "drop_rx_bad_checksum",
    [D_RX_TRUNCATED] = "drop_rx_truncated",
    [D_RX_TUN_WRITE_ERROR] = "drop_rx_tun_write_error",
};

int fl_counter_count(void) { return C_COUNT; }

const char *fl_counter_name(int i)
{
    return i >= 0 && i < C_COUNT && counter_names[i] ? counter_names[i] : "";
}

/* ---- per-worker buffers ---- */

struct out_dgram {
    uint32_t hop;
    uint16_t port;
    int len;
    int iov0, n_iov;
};

struct tx_io {
    uint8_t *slots;  /* TX_READS * SLOT_SIZE */
    uint8_t *hdrs;   /* TX_MAX_DGRAMS * FL_SEG_HDR_MAX */
    struct iovec *iov; /* 2 * TX_MAX_DGRAMS */
    struct out_dgram *out;
    int n_out, n_iov, n_hdr;
    struct mmsghdr *msgs;
    struct sockaddr_in *addrs;
    uint8_t *cmsgs; /* MMSG_MAX * CMSG_SPACE(sizeof(uint16_t)) */
    int *msg_ndg;
    int seg_len[GSO_MAX_SEGS];
    /* test sink: when set, flush copies datagrams here instead of sending */
    uint8_t *sink;
    int sink_cap, sink_used, *sink_lens, sink_max, sink_n;
};

struct rx_io {
    uint8_t *slots; /* RX_MSGS * SLOT_SIZE */
    struct mmsghdr msgs[RX_MSGS];
    struct iovec iov[RX_MSGS];
    struct sockaddr_in addrs[RX_MSGS];
    uint8_t cmsgs[RX_MSGS][CMSG_SPACE(sizeof(int))];
    uint8_t *pkts[RX_PKTS];
    int lens[RX_PKTS];
    uint8_t scratch[256];
    struct iovec wiov[2 + 2 * GSO_MAX_SEGS + 8];
};

#define CMSG_GSO_SPACE CMSG_SPACE(sizeof(uint16_t))

static void tx_io_free(struct tx_io *io)
{
    if (!io)
        return;
    free(io->slots);
    free(io->hdrs);
    free(io->iov);
    free(io->out);
    free(io->msgs);
    free(io->addrs);
    free(io->cmsgs);
    free(io->msg_ndg);
    free(io);
}

static struct tx_io *tx_io_new(void)
{
    struct tx_io *io = calloc(1, sizeof(*io));
    if (!io)
        return NULL;
    io->slots = malloc((size_t)TX_READS * SLOT_SIZE);
    io->hdrs = malloc((size_t)TX_MAX_DGRAMS * FL_SEG_HDR_MAX);
    io->iov = malloc(sizeof(struct iovec) * 2 * TX_MAX_DGRAMS);
    io->out = malloc(sizeof(struct out_dgram) * TX_MAX_DGRAMS);
    io->msgs = calloc(MMSG_MAX, sizeof(struct mmsghdr));
    io->addrs = calloc(MMSG_MAX, sizeof(struct sockaddr_in));
    io->cmsgs = calloc(MMSG_MAX, CMSG_GSO_SPACE);
    io->msg_ndg = calloc(MMSG_MAX, sizeof(int));
    if (!io->slots || !io->hdrs || !io->iov || !io->out || !io->msgs || !io->addrs ||
        !io->cmsgs || !io->msg_ndg) {
        tx_io_free(io);
        return NULL;
    }
    return io;
}

/* ---- small helpers ---- */

static int wait_fd(struct fl_engine *e, int fd, short events, int timeout_ms)
{
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = e->stop_fd, .events = POLLIN}};
    int r = poll(p, 2, timeout_ms);
    if (r < 0)
        return errno == EINTR ? 0 : -1;
    if (p[1].revents)
        return -1; /* stopping */
    if (p[0].revents & POLLNVAL)
        return -2; /* the fd was closed under us: nothing more to do */
    return p[0].revents ? 1 : 0;
}

/* After an unexpected I/O error (a deleted TUN device polls as always-ready): wait a little,
 * unless stopping, so a broken fd never turns into a busy loop. Returns -1 when stopping. */
static int backoff(struct fl_engine *e, struct fl_worker *w)
{
    fl_rcu_offline(w);
    fl_cnt(w, C_IO_ERRORS, 1);
    struct pollfd p = {.fd = e->stop_fd, .events = POLLIN};
    return poll(&p, 1, 50) > 0 ? -1 : 0;
}

/* Writes an ICMP error back into the TUN (with a GSO_NONE vnet header when the TUN wants one). */
static void tun_write_icmp(struct fl_worker *w, int fd, uint8_t *icmp, int len)
{
    if (fd < 0 || len <= 0)
        return;
    uint8_t vh[FL_VNET_HDR_LEN] = {0};
    struct iovec iov[2] = {{vh, FL_VNET_HDR_LEN}, {icmp, (size_t)len}};
    int vnet = w->e->feat.vnet_hdr;
    if (writev(fd, iov + !vnet, 2 - !vnet) < 0)
        fl_cnt(w, D_RX_TUN_WRITE_ERROR, 1);
}

/* ---- TX: TUN -> UDP ---- */

static int gso_enabled(struct fl_engine *e)
{
    if (!e->feat.gso)
        return 0;
    uint64_t retry = atomic_load_explicit(&e->gso_retry_ns, memory_order_relaxed);
    return retry == 0 || fl_now_ns() >= retry;
}

/* A GSO send failed (the egress cannot segment or checksum): pause GSO, doubling the pause
 * while it keeps failing, so a route or device change that made it fail is re-probed later
 * instead of costing GSO for good. */
static void gso_failed(struct fl_engine *e)
{
    uint64_t b = atomic_load(&e->gso_backoff_ns);
    if (b == 0)
        b = (uint64_t)GSO_RETRY_FIRST_MS * 1000000ULL;
    atomic_store(&e->gso_retry_ns, fl_now_ns() + b);
    b *= 2;
    if (b > (uint64_t)GSO_RETRY_MAX_MS * 1000000ULL)
        b = (uint64_t)GSO_RETRY_MAX_MS * 1000000ULL;
    atomic_store(&e->gso_backoff_ns, b);
}

static void gso_worked(struct fl_engine *e)
{
    if (atomic_load_explicit(&e->gso_backoff_ns, memory_order_relaxed) != 0) {
        atomic_store(&e->gso_backoff_ns, 0);
        atomic_store(&e->gso_retry_ns, 0);
    }
}

static int stopping(struct fl_engine *e)
{
    return atomic_load_explicit(&e->stopping, memory_order_relaxed);
}

static int rx_round(struct fl_worker *w, struct rx_io *io, int ufd, int tfd, int *failed);

/* Builds up to MMSG_MAX messages from io->out[pos..]; returns the message count. */
static int tx_build(struct fl_worker *w, struct tx_io *io, int pos, int use_gso)
{
    int nm = 0;
    while (pos < io->n_out && nm < MMSG_MAX) {
        struct out_dgram *d = &io->out[pos];
        int k = 1, total = d->len, n_iov = d->n_iov;
        if (use_gso) {
            while (pos + k < io->n_out && k < GSO_MAX_SEGS) {
                struct out_dgram *x = &io->out[pos + k];
                if (x->hop != d->hop || x->port != d->port || x->len > d->len ||
                    total + x->len > GSO_MAX_BYTES || io->out[pos + k - 1].len != d->len)
                    break;
                total += x->len;
                n_iov += x->n_iov;
                k++;
            }
        }
        struct mmsghdr *m = &io->msgs[nm];
        struct sockaddr_in *a = &io->addrs[nm];
        memset(m, 0, sizeof(*m));
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(d->hop);
        a->sin_port = htons(d->port);
        m->msg_hdr.msg_name = a;
        m->msg_hdr.msg_namelen = sizeof(*a);
        m->msg_hdr.msg_iov = &io->iov[d->iov0];
        m->msg_hdr.msg_iovlen = (size_t)n_iov;
        if (k > 1) {
            uint8_t *cb = io->cmsgs + (size_t)nm * CMSG_GSO_SPACE;
            memset(cb, 0, CMSG_GSO_SPACE);
            m->msg_hdr.msg_control = cb;
            m->msg_hdr.msg_controllen = CMSG_GSO_SPACE;
            struct cmsghdr *c = CMSG_FIRSTHDR(&m->msg_hdr);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t gs = (uint16_t)d->len;
            memcpy(CMSG_DATA(c), &gs, sizeof(gs));
        }
        io->msg_ndg[nm] = k;
        nm++;
        pos += k;
    }
    return nm;
}

static void tx_count_sent(struct fl_worker *w, struct tx_io *io, int pos, int k)
{
    uint64_t bytes = 0;
    for (int i = 0; i < k; i++)
        bytes += (uint64_t)io->out[pos + i].len;
    fl_cnt(w, C_TX_PACKETS, (uint64_t)k);
    fl_cnt(w, C_TX_BYTES, bytes);
    fl_cnt(w, C_TX_MSGS, 1);
    if (k > 1)
        fl_cnt(w, C_TX_GSO_MSGS, 1);
}

static void tx_sink(struct fl_worker *w, struct tx_io *io)
{
    for (int i = 0; i < io->n_out; i++) {
        struct out_dgram *d = &io->out[i];
        if (io->sink_n >= io->sink_max || io->sink_used + d->len > io->sink_cap)
            break;
        for (int v = 0; v < d->n_iov; v++) {
            memcpy(io->sink + io->sink_used, io->iov[d->iov0 + v].iov_base,
                   io->iov[d->iov0 + v].iov_len);
            io->sink_used += (int)io->iov[d->iov0 + v].iov_len;
        }
        io->sink_lens[io->sink_n++] = d->len;
    }
}

/* Waits up to timeout_ms for room in the socket's send buffer. The worker is offline meanwhile
 * (the queued datagrams hold copies of their next hop, never a table pointer) and online again,
 * at a fresh grace period, before this returns: the caller may go on looking up routes. The
 * combined worker runs its RX rounds while it waits, so a saturated egress cannot starve the
 * other direction. Returns -1 when stopping, else 0. */
static int tx_wait_room(struct fl_worker *w, int timeout_ms)
{
    struct fl_engine *e = w->e;
    int ufd = e->cfg.udp_fd, serve_rx = w->kind == FL_W_BOTH && w->io2;
    int r = 0;
    fl_rcu_offline(w);
    for (;;) {
        struct pollfd p[2] = {{.fd = ufd, .events = POLLOUT | (serve_rx ? POLLIN : 0)},
                              {.fd = e->stop_fd, .events = POLLIN}};
        int n = poll(p, 2, timeout_ms);
        if (n < 0 && errno != EINTR) {
            r = -1;
            break;
        }
        if (n > 0 && (p[1].revents || (p[0].revents & POLLNVAL))) {
            r = -1;
            break;
        }
        if (n > 0 && serve_rx && (p[0].revents & POLLIN) && !(p[0].revents & POLLOUT)) {
            int failed = 0;
            fl_cnt(w, C_TX_WAIT_RX_ROUNDS, 1);
            rx_round(w, w->io2, ufd, e->cfg.tun_fds[0], &failed);
            timeout_ms = 0; /* the slice is spent: let the caller retry the send */
            if (!failed)
                continue;
        }
        break;
    }
    fl_rcu_online(w);
    return r;
}

static void tx_flush(struct fl_worker *w, struct tx_io *io)
{
    struct fl_engine *e = w->e;
    if (io->sink) {
        tx_sink(w, io);
        io->n_out = io->n_iov = io->n_hdr = 0;
        return;
    }
    int pos = 0;
    uint64_t deadline = 0; /* set at the first EAGAIN: the flush's whole wait budget */
    while (pos < io->n_out) {
        int use_gso = gso_enabled(e);
        int nm = tx_build(w, io, pos, use_gso);
        int done = 0;
        while (done < nm) {
            int r = sendmmsg(e->cfg.udp_fd, io->msgs + done, (unsigned)(nm - done), MSG_DONTWAIT);
            fl_cnt(w, C_TX_SENDMMSG, 1);
            if (r > 0) {
                for (int i = 0; i < r; i++) {
                    tx_count_sent(w, io, pos, io->msg_ndg[done + i]);
                    pos += io->msg_ndg[done + i];
                }
                if (use_gso)
                    gso_worked(e);
                done += r;
                continue;
            }
            int err = r < 0 ? errno : EAGAIN;
            if (err == EINTR)
                continue;
            if (err == EAGAIN || err == ENOBUFS) {
                /* socket buffer full: wait for room rather than drop a TCP window's worth */
                uint64_t now = fl_now_ns();
                if (!deadline)
                    deadline = now + (uint64_t)FLUSH_WAIT_MAX_MS * 1000000ULL;
                if (now < deadline && !stopping(e)) {
                    fl_cnt(w, C_TX_EAGAIN_WAITS, 1);
                    int left = (int)((deadline - now) / 1000000ULL) + 1;
                    if (tx_wait_room(w, left < FLUSH_WAIT_SLICE_MS ? left : FLUSH_WAIT_SLICE_MS) == 0)
                        continue;
                }
                /* out of budget, or stopping: the rest of the batch is dropped, and counted */
                fl_cnt(w, D_TX_SOCKET_FULL, (uint64_t)(io->n_out - pos));
                pos = io->n_out;
                break;
            }
            if ((err == EIO || err == EINVAL) && io->msg_ndg[done] > 1) {
                /* the egress cannot do UDP GSO now: send this batch's rest without it */
                gso_failed(e);
                fl_cnt(w, C_TX_GSO_FALLBACKS, 1); /* the daemon logs counter changes */
                break;
            }
            /* this message cannot go (unreachable, EPERM, EMSGSIZE...): drop it, go on */
            fl_cnt(w, D_TX_SEND_ERROR, (uint64_t)io->msg_ndg[done]);
            pos += io->msg_ndg[done];
            done++;
        }
    }
    io->n_out = io->n_iov = io->n_hdr = 0;
}

static void tx_queue(struct tx_io *io, uint32_t hop, uint16_t port, struct iovec *iov, int n_iov,
                     int len)
{
    struct out_dgram *d = &io->out[io->n_out++];
    d->hop = hop;
    d->port = port;
    d->len = len;
    d->iov0 = io->n_iov;
    d->n_iov = n_iov;
    for (int i = 0; i < n_iov; i++)
        io->iov[io->n_iov++] = iov[i];
}

/* One read from the TUN (with its vnet header when the TUN has one): verdict, ICMP, queueing.
 * Returns 0 or a drop reason. */
static int tx_handle(struct fl_worker *w, struct tx_io *io, int tun_fd, uint8_t *buf, int n)
{
    struct fl_engine *e = w->e;
    struct fl_vnet_hdr vh = {0};
    uint8_t *pkt = buf;
    int len = n;
    if (e->feat.vnet_hdr) {
        if (n < FL_VNET_HDR_LEN)
            return D_TX_BAD_VNET;
        memcpy(&vh, buf, FL_VNET_HDR_LEN);
        pkt += FL_VNET_HDR_LEN;
        len -= FL_VNET_HDR_LEN;
    }
    uint8_t icmp[128];
    int icmp_len = 0;
    uint32_t hop = 0;
    uint16_t port = 0;
    int gso = vh.gso_type & ~FL_VNET_GSO_ECN;
    if (gso == FL_VNET_GSO_NONE) {
        if (fl_ip_check(pkt, len, 1) == 0 && fl_vnet_finish_csum(pkt, len, &vh) < 0)
            return D_TX_BAD_VNET;
        int v = fl_tx_one(w, pkt, len, 0, &hop, &port, icmp, &icmp_len);
        if (v) {
            tun_write_icmp(w, tun_fd, icmp, icmp_len);
            return v;
        }
        if (io->n_out >= TX_MAX_DGRAMS)
            tx_flush(w, io);
        struct iovec one = {pkt, (size_t)len};
        tx_queue(io, hop, port, &one, 1, len);
        return 0;
    }
    if (gso != FL_VNET_GSO_TCPV4)
        return D_TX_BAD_VNET;
    /* A TSO frame: check the template with the size its wire packets will have. */
    int hdr = fl_tso_hdr_len(pkt, len, vh.gso_size);
    if (hdr < 0)
        return -hdr;
    int v = fl_tx_one(w, pkt, len, hdr + vh.gso_size, &hop, &port, icmp, &icmp_len);
    if (v) {
        tun_write_icmp(w, tun_fd, icmp, icmp_len);
        return v;
    }
    fl_cnt(w, C_TX_TSO_FRAMES, 1);
    int first = 0;
    for (;;) {
        int room = TX_MAX_DGRAMS - io->n_out;
        if (room > GSO_MAX_SEGS)
            room = GSO_MAX_SEGS;
        if (room <= 0) {
            tx_flush(w, io);
            continue;
        }
        struct iovec *iov = &io->iov[io->n_iov];
        uint8_t *hdrs = io->hdrs + (size_t)io->n_out * FL_SEG_HDR_MAX;
        int k = fl_tso_split(pkt, len, vh.gso_size, first, room, hdrs, iov, io->seg_len);
        if (k < 0)
            return -k;
        for (int i = 0; i < k; i++) {
            struct out_dgram *d = &io->out[io->n_out++];
            d->hop = hop;
            d->port = port;
            d->len = io->seg_len[i];
            d->iov0 = io->n_iov;
            d->n_iov = 2;
            io->n_iov += 2;
        }
        fl_cnt(w, C_TX_TSO_SEGMENTS, (uint64_t)k);
        first += k;
        int payload = len - hdr;
        int nseg = payload == 0 ? 1 : (payload + vh.gso_size - 1) / vh.gso_size;
        if (first >= nseg || k == 0)
            break;
    }
    return 0;
}

/* One TX round: up to TX_READS reads, then one flush. Returns the reads done; a read error
 * other than EAGAIN sets *failed. */
static int tx_round(struct fl_worker *w, struct tx_io *io, int fd, int *failed)
{
    fl_rcu_online(w);
    int reads = 0, bytes = 0;
    while (reads < TX_READS && bytes < BATCH_BYTES) {
        uint8_t *buf = io->slots + (size_t)reads * SLOT_SIZE;
        ssize_t n = read(fd, buf, SLOT_SIZE);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                *failed = 1;
            break; /* EAGAIN: drained */
        }
        reads++;
        bytes += (int)n;
        int v = tx_handle(w, io, fd, buf, (int)n);
        if (v)
            fl_cnt(w, v, 1);
    }
    if (reads) {
        fl_cnt(w, C_TX_BATCHES, 1);
        fl_cnt(w, C_TX_BATCH_READS, (uint64_t)reads);
    }
    /* the queued datagrams hold no table pointer: the flush may wait offline */
    tx_flush(w, io);
    fl_rcu_offline(w);
    return reads;
}

static void *tx_main(void *arg)
{
    struct fl_worker *w = arg;
    struct fl_engine *e = w->e;
    struct tx_io *io = w->io;
    int fd = e->cfg.tun_fds[w->queue];
    char name[16]; /* a thread name's limit (TASK_COMM_LEN), terminator included */
    snprintf(name, sizeof(name), "fl-tx%d", w->queue);
    pthread_setname_np(pthread_self(), name); /* for top/perf */
    for (;;) {
        fl_rcu_offline(w);
        if (wait_fd(e, fd, POLLIN, -1) < 0)
            break;
        int failed = 0;
        while (!stopping(e) && tx_round(w, io, fd, &failed) > 0 && !failed)
            ;
        if (failed && backoff(e, w) < 0)
            break;
    }
    fl_rcu_offline(w);
    return NULL;
}

/* ---- RX: UDP -> TUN ---- */

struct rx_emit_ctx {
    struct fl_worker *w;
    int fd;
};

static int rx_emit(void *ctx, struct iovec *iov, int n_iov, int total)
{
    struct rx_emit_ctx *c = ctx;
    ssize_t r;
    do
        r = writev(c->fd, iov, n_iov);
    while (r < 0 && errno == EINTR);
    fl_cnt(c->w, C_RX_TUN_WRITES, 1);
    if (r < 0) {
        /* iov = [vnet header,] packet, or vnet header + merged header + one payload per
         * segment: a frame of n_iov > 2 carried n_iov - 2 packets, anything else one */
        fl_cnt(c->w, D_RX_TUN_WRITE_ERROR, (uint64_t)(n_iov > 2 ? n_iov - 2 : 1));
        return -1;
    }
    return 0;
}

static void rx_deliver(struct fl_worker *w, struct rx_io *io, int fd, int n)
{
    struct fl_engine *e = w->e;
    if (!n)
        return;
    struct rx_emit_ctx ctx = {w, fd};
    if (e->feat.coalesce) {
        uint64_t frames = 0, segs = 0;
        fl_coalesce(io->pkts, io->lens, n, io->scratch, io->wiov,
                    (int)(sizeof(io->wiov) / sizeof(io->wiov[0])), rx_emit, &ctx, &frames, &segs);
        fl_cnt(w, C_RX_COALESCED_FRAMES, frames);
        fl_cnt(w, C_RX_COALESCED_SEGMENTS, segs);
        return;
    }
    uint8_t vh[FL_VNET_HDR_LEN] = {0};
    int vnet = e->feat.vnet_hdr;
    for (int i = 0; i < n; i++) {
        struct iovec iov[2] = {{vh, FL_VNET_HDR_LEN}, {io->pkts[i], (size_t)io->lens[i]}};
        rx_emit(&ctx, iov + !vnet, 2 - !vnet, io->lens[i]);
    }
}

static void rx_setup(struct rx_io *io)
{
    for (int i = 0; i < RX_MSGS; i++) {
        io->iov[i].iov_base = io->slots + (size_t)i * SLOT_SIZE;
        io->iov[i].iov_len = SLOT_SIZE;
    }
}

static int rx_vlen(struct fl_engine *e)
{
    return e->feat.gro ? BATCH_BYTES / 65536 : RX_MSGS;
}

/* One RX round: one recvmmsg, checks, writes to the TUN. Returns the datagrams received; a
 * socket error that is not a pending SO_ERROR sets *failed. */
static int rx_round(struct fl_worker *w, struct rx_io *io, int ufd, int tfd, int *failed)
{
    for (int i = 0; i < RX_MSGS; i++) {
        struct msghdr *h = &io->msgs[i].msg_hdr;
        h->msg_name = &io->addrs[i];
        h->msg_namelen = sizeof(io->addrs[i]);
        h->msg_iov = &io->iov[i];
        h->msg_iovlen = 1;
        h->msg_control = io->cmsgs[i];
        h->msg_controllen = sizeof(io->cmsgs[i]);
        h->msg_flags = 0;
    }
    int r = recvmmsg(ufd, io->msgs, (unsigned)rx_vlen(w->e), MSG_DONTWAIT, NULL);
    if (r < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            /* a pending socket error (e.g. from an ICMP): reading it clears it */
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            if (getsockopt(ufd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || !soerr)
                *failed = 1;
        }
        return 0;
    }
    fl_rcu_online(w);
    const struct fl_rtable *t = fl_rcu_table(w);
    fl_cnt(w, C_RX_BATCHES, 1);
    fl_cnt(w, C_RX_BATCH_MSGS, (uint64_t)r);
    int n = 0;
    for (int i = 0; i < r; i++) {
        struct msghdr *h = &io->msgs[i].msg_hdr;
        int len = (int)io->msgs[i].msg_len;
        uint8_t *buf = io->iov[i].iov_base;
        if (h->msg_flags & MSG_TRUNC) {
            fl_cnt(w, D_RX_TRUNCATED, 1);
            continue;
        }
        if (len == 0) {
            fl_cnt(w, D_RX_MALFORMED, 1);
            continue;
        }
        int seg = len;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
                int gs;
                memcpy(&gs, CMSG_DATA(c), sizeof(gs));
                if (gs > 0 && gs < len)
                    seg = gs;
            }
        }
        if (seg < len)
            fl_cnt(w, C_RX_GRO_MSGS, 1);
        uint32_t src = ntohl(io->addrs[i].sin_addr.s_addr);
        uint16_t sport = ntohs(io->addrs[i].sin_port);
        for (int off = 0; off < len; off += seg) {
            int l = len - off < seg ? len - off : seg;
            int v = fl_rx_one(w, t, buf + off, l, src, sport);
            if (v) {
                fl_cnt(w, v, 1);
                continue;
            }
            fl_cnt(w, C_RX_PACKETS, 1);
            fl_cnt(w, C_RX_BYTES, (uint64_t)l);
            if (n == RX_PKTS) {
                /* GRO buffers of tiny segments: write what is held, then go on */
                rx_deliver(w, io, tfd, n);
                n = 0;
            }
            io->pkts[n] = buf + off;
            io->lens[n] = l;
            n++;
        }
    }
    fl_rcu_offline(w); /* packets are checked: no table needed to write them */
    rx_deliver(w, io, tfd, n);
    return r;
}

static void *rx_main(void *arg)
{
    struct fl_worker *w = arg;
    struct fl_engine *e = w->e;
    struct rx_io *io = w->io2;
    int ufd = e->cfg.udp_fd, tfd = e->cfg.tun_fds[0];
    pthread_setname_np(pthread_self(), "fl-rx");
    for (;;) {
        fl_rcu_offline(w);
        if (wait_fd(e, ufd, POLLIN, -1) < 0)
            break;
        int failed = 0;
        while (!stopping(e) && rx_round(w, io, ufd, tfd, &failed) > 0 && !failed)
            ;
        if (failed && backoff(e, w) < 0)
            break;
    }
    fl_rcu_offline(w);
    return NULL;
}

/* Queue 0's worker when RX has no thread of its own: one poll over the TUN and the socket, then
 * alternate both directions until both are drained (flanneld's loop, batched). On 2 vCPUs this
 * saves the wake-ups of a thread that would only carry the other direction's ACKs. */
static void *both_main(void *arg)
{
    struct fl_worker *w = arg;
    struct fl_engine *e = w->e;
    struct tx_io *tio = w->io;
    struct rx_io *rio = w->io2;
    int tfd = e->cfg.tun_fds[0], ufd = e->cfg.udp_fd;
    pthread_setname_np(pthread_self(), "fl-txrx0");
    for (;;) {
        fl_rcu_offline(w);
        struct pollfd p[3] = {{.fd = tfd, .events = POLLIN},
                              {.fd = ufd, .events = POLLIN},
                              {.fd = e->stop_fd, .events = POLLIN}};
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[2].revents || (p[0].revents & POLLNVAL) || (p[1].revents & POLLNVAL))
            break;
        int failed = 0, busy;
        do {
            int a = tx_round(w, tio, tfd, &failed);
            int b = rx_round(w, rio, ufd, tfd, &failed);
            busy = a || b;
        } while (busy && !failed && !stopping(e));
        if (failed && backoff(e, w) < 0)
            break;
    }
    fl_rcu_offline(w);
    return NULL;
}

/* ---- lifecycle ---- */

static void probe(struct fl_engine *e)
{
    struct fl_features *f = &e->feat;
    const struct fl_config *c = &e->cfg;
    f->queues = c->n_tun;
    f->multiqueue = c->n_tun > 1;
    if (c->n_tun > 0) {
        struct ifreq ifr;
        memset(&ifr, 0, sizeof(ifr));
        if (ioctl(c->tun_fds[0], TUNGETIFF, &ifr) == 0 && (ifr.ifr_flags & IFF_VNET_HDR)) {
            f->vnet_hdr = 1;
            int sz = FL_VNET_HDR_LEN;
            ioctl(c->tun_fds[0], TUNSETVNETHDRSZ, &sz);
        }
        if (f->vnet_hdr) {
            unsigned off = c->offload ? (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN) : 0;
            if (off && ioctl(c->tun_fds[0], TUNSETOFFLOAD, off) == 0)
                f->tso = 1;
            else
                ioctl(c->tun_fds[0], TUNSETOFFLOAD, 0);
            f->coalesce = c->offload;
        }
    }
    if (c->udp_fd >= 0) {
        int v = 0;
        socklen_t sl = sizeof(v);
        if (c->offload && getsockopt(c->udp_fd, SOL_UDP, UDP_SEGMENT, &v, &sl) == 0)
            f->gso = 1;
        v = c->offload ? 1 : 0;
        if (setsockopt(c->udp_fd, SOL_UDP, UDP_GRO, &v, sizeof(v)) == 0 && v)
            f->gro = 1;
    }
}

struct fl_engine *fl_engine_new(const struct fl_config *cfg, char *err, int errlen)
{
#define FAIL(...)                                                                                  \
    do {                                                                                           \
        if (err && errlen > 0)                                                                     \
            snprintf(err, (size_t)errlen, __VA_ARGS__);                                            \
        goto fail;                                                                                 \
    } while (0)
    struct fl_engine *e = calloc(1, sizeof(*e));
    if (!e) {
        if (err && errlen > 0)
            snprintf(err, (size_t)errlen, "out of memory");
        return NULL;
    }
    e->stop_fd = -1;
    e->cfg = *cfg;
    pthread_mutex_init(&e->wlock, NULL);
    atomic_store(&e->gen, 1);
    e->test_worker.e = e;
    e->test_worker.kind = FL_W_TEST;
    atomic_store(&e->test_worker.qs, FL_QS_OFFLINE);
    if (cfg->n_tun < 0 || cfg->n_tun > FL_MAX_QUEUES)
        FAIL("queue count %d out of range 0..%d", cfg->n_tun, FL_MAX_QUEUES);
    if (cfg->mtu < 68 || cfg->mtu > 65535 - 28)
        FAIL("overlay MTU %d out of range 68..65507", cfg->mtu);
    for (int i = 0; i < cfg->n_tun; i++)
        if (cfg->tun_fds[i] < 0)
            FAIL("TUN fd %d is invalid", cfg->tun_fds[i]);
    if (cfg->n_tun > 0 && cfg->udp_fd < 0)
        FAIL("UDP fd is invalid");
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->stop_fd < 0)
        FAIL("eventfd: %s", strerror(errno));
    probe(e);
    struct fl_rtable *t = fl_rt_build(NULL, 0);
    if (!t)
        FAIL("out of memory");
    atomic_store(&e->table, t);
    for (int q = 0; q < cfg->n_tun; q++) {
        struct fl_worker *w = &e->workers[e->n_workers++];
        w->e = e;
        w->kind = (q == 0 && !cfg->rx_thread) ? FL_W_BOTH : FL_W_TX;
        w->queue = q;
        atomic_store(&w->qs, FL_QS_OFFLINE);
        if (!(w->io = tx_io_new()))
            FAIL("out of memory");
    }
    if (cfg->n_tun > 0) {
        struct fl_worker *w = &e->workers[0];
        if (cfg->rx_thread) {
            w = &e->workers[e->n_workers++];
            w->e = e;
            w->kind = FL_W_RX;
            atomic_store(&w->qs, FL_QS_OFFLINE);
        }
        struct rx_io *io = calloc(1, sizeof(*io));
        if (io)
            io->slots = malloc((size_t)RX_MSGS * SLOT_SIZE);
        if (!io || !io->slots) {
            free(io);
            FAIL("out of memory");
        }
        rx_setup(io);
        w->io2 = io;
    }
    return e;
fail:
    fl_engine_free(e);
    return NULL;
#undef FAIL
}

int fl_engine_start(struct fl_engine *e)
{
    if (e->started)
        return 0;
    for (int i = 0; i < e->n_workers; i++) {
        struct fl_worker *w = &e->workers[i];
        void *(*fn)(void *) = w->kind == FL_W_TX ? tx_main : w->kind == FL_W_RX ? rx_main : both_main;
        int r = pthread_create(&w->thread, NULL, fn, w);
        if (r) {
            e->started = 1;
            fl_engine_stop(e);
            errno = r;
            return -1;
        }
        w->running = 1;
    }
    e->started = 1;
    return 0;
}

void fl_engine_stop(struct fl_engine *e)
{
    if (!e->started)
        return;
    atomic_store(&e->stopping, 1);
    uint64_t one = 1;
    if (write(e->stop_fd, &one, sizeof(one)) < 0) {
        /* eventfd write only fails on overflow: it is already signalled */
    }
    for (int i = 0; i < e->n_workers; i++) {
        if (e->workers[i].running) {
            pthread_join(e->workers[i].thread, NULL);
            e->workers[i].running = 0;
        }
    }
    /* re-arm so a later start works */
    uint64_t v;
    if (read(e->stop_fd, &v, sizeof(v)) < 0) {
    }
    atomic_store(&e->stopping, 0);
    e->started = 0;
}

void fl_engine_free(struct fl_engine *e)
{
    if (!e)
        return;
    fl_engine_stop(e);
    for (int i = 0; i < e->n_workers; i++) {
        tx_io_free(e->workers[i].io);
        struct rx_io *rio = e->workers[i].io2;
        if (rio) {
            free(rio->slots);
            free(rio);
        }
    }
    tx_io_free(e->test_worker.io);
    fl_rt_free(atomic_load(&e->table));
    if (e->stop_fd >= 0)
        close(e->stop_fd);
    pthread_mutex_destroy(&e->wlock);
    free(e);
}

void fl_engine_features(struct fl_engine *e, struct fl_features *out)
{
    *out = e->feat;
    out->gso = gso_enabled(e); /* off while paused after a failed GSO send */
}

void fl_engine_counters(struct fl_engine *e, uint64_t *out, int n)
{
    if (n > C_COUNT)
        n = C_COUNT;
    for (int i = 0; i < n; i++) {
        uint64_t s = atomic_load_explicit(&e->c_engine[i], memory_order_relaxed);
        for (int k = 0; k < e->n_workers; k++)
            s += atomic_load_explicit(&e->workers[k].c[i], memory_order_relaxed);
        s += atomic_load_explicit(&e->test_worker.c[i], memory_order_relaxed);
        out[i] = s;
    }
}

/* ---- pure entry points for the tests ---- */

int fl_lookup(struct fl_engine *e, uint32_t dst, uint32_t *next_hop, uint16_t *port)
{
    struct fl_worker *w = &e->test_worker;
    fl_rcu_online(w);
    const struct fl_rt_entry *r = fl_rt_lookup(fl_rcu_table(w), dst);
    if (r) {
        *next_hop = r->next_hop;
        *port = r->port;
    }
    fl_rcu_offline(w);
    return r != NULL;
}

int fl_tx_packet(struct fl_engine *e, uint8_t *pkt, int len, uint32_t *next_hop, uint16_t *port,
                 uint8_t *icmp, int *icmp_len)
{
    struct fl_worker *w = &e->test_worker;
    fl_rcu_online(w);
    int v = fl_tx_one(w, pkt, len, 0, next_hop, port, icmp, icmp_len);
    fl_rcu_offline(w);
    if (v)
        fl_cnt(w, v, 1);
    return v;
}

int fl_rx_packet(struct fl_engine *e, const uint8_t *pkt, int len, uint32_t src,
                 uint16_t src_port)
{
    struct fl_worker *w = &e->test_worker;
    fl_rcu_online(w);
    int v = fl_rx_one(w, fl_rcu_table(w), pkt, len, src, src_port);
    fl_rcu_offline(w);
    if (v)
        fl_cnt(w, v, 1);
    return v;
}

int fl_test_split(struct fl_engine *e, const uint8_t *frame, int len, uint8_t *out, int cap,
                  int *lens, int max)
{
    struct fl_worker *w = &e->test_worker;
    if (len < 0 || len > SLOT_SIZE)
        return -D_TX_MALFORMED;
    if (!w->io && !(w->io = tx_io_new()))
        return -1;
    struct tx_io *io = w->io;
    int saved = e->feat.vnet_hdr;
    e->feat.vnet_hdr = 1;
    memcpy(io->slots, frame, (size_t)len);
    io->sink = out;
    io->sink_cap = cap;
    io->sink_used = 0;
    io->sink_lens = lens;
    io->sink_max = max;
    io->sink_n = 0;
    fl_rcu_online(w);
    int v = tx_handle(w, io, -1, io->slots, len);
    fl_rcu_offline(w);
    tx_flush(w, io);
    io->sink = NULL;
    e->feat.vnet_hdr = saved;
    if (v) {
        fl_cnt(w, v, 1);
        return -v;
    }
    return io->sink_n;
}

struct sink_ctx {
    uint8_t *out;
    int cap, used, *lens, max, n;
};

static int sink_emit(void *ctx, struct iovec *iov, int n_iov, int total)
{
    struct sink_ctx *s = ctx;
    int need = 0;
    for (int i = 0; i < n_iov; i++)
        need += (int)iov[i].iov_len;
    if (s->n >= s->max || s->used + need > s->cap)
        return -1;
    for (int i = 0; i < n_iov; i++) {
        memcpy(s->out + s->used, iov[i].iov_base, iov[i].iov_len);
        s->used += (int)iov[i].iov_len;
    }
    s->lens[s->n++] = need;
    return 0;
}

int fl_test_coalesce(const uint8_t *pkts, const int *lens, int n, uint8_t *out, int cap,
                     int *out_lens, int max)
{
    if (n < 0 || n > RX_MSGS * GSO_MAX_SEGS)
        return -1;
    static __thread uint8_t *ptrs[RX_MSGS * GSO_MAX_SEGS];
    uint8_t scratch[256];
    struct iovec iov[2 + 2 * GSO_MAX_SEGS + 8];
    int off = 0;
    for (int i = 0; i < n; i++) {
        ptrs[i] = (uint8_t *)pkts + off;
        off += lens[i];
    }
    struct sink_ctx s = {out, cap, 0, out_lens, max, 0};
    uint64_t frames = 0, segs = 0;
    fl_coalesce(ptrs, lens, n, scratch, iov, (int)(sizeof(iov) / sizeof(iov[0])), sink_emit, &s,
                &frames, &segs);
    return s.n;
}
