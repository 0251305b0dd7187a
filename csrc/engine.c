/* Engine lifecycle, worker threads and their rounds.
 *
 * Threads (csrc/README.md explains the choices): queue 0's worker carries both directions
 * unless rx_thread asks for a separate RX worker; extra TUN queues get TX-only workers.
 * A TX round reads the TUN until EAGAIN (bounded by count and bytes), decides each frame's fate
 * (route, TTL, MTU, ICMP errors) and hands it to the socket layer, then flushes. An RX round is
 * one receive: each packet is checked and handed to the TUN layer, which writes them. How
 * frames and packets cross the two fds (virtio_net_hdr, TSO, GSO, GRO, coalescing, full send
 * buffers) is the batch layers' business (batch.h); the rounds never branch on an offload.
 *
 * Every wire datagram is one plain IPv4 packet of at most the overlay MTU.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "batch.h"

#define TX_READS 64 /* TUN reads per round */
/* With GRO (and TSO on the TX side) a round is bounded by bytes, not datagrams: ~512 KiB stays
 * in L2 between the copy in, the checksum pass and the copy out. */
#define BATCH_BYTES (512 * 1024)

/* A worker's TX state: the TUN read slots (frames live there until the flush) and the socket
 * layer's queue. */
struct fl_tx_state {
    uint8_t *slots; /* TX_READS * FL_SLOT_SIZE */
    struct fl_udp_out *out;
};

/* A worker's RX state: the socket layer's receive batch and the TUN layer's writer. */
struct fl_rx_state {
    struct fl_udp_in *in;
    struct fl_tun_writer tw;
};

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


static void tx_state_free(struct fl_tx_state *tx)
{
    if (!tx)
        return;
    free(tx->slots);
    fl_udpo_free(tx->out);
    free(tx);
}

static int tx_wait_room(struct fl_worker *w, int timeout_ms);

static struct fl_tx_state *tx_state_new(int udp_fd)
{
    struct fl_tx_state *tx = calloc(1, sizeof(*tx));
    if (!tx)
        return NULL;
    tx->slots = malloc((size_t)TX_READS * FL_SLOT_SIZE);
    tx->out = fl_udpo_new(udp_fd, tx_wait_room);
    if (!tx->slots || !tx->out) {
        tx_state_free(tx);
        return NULL;
    }
    return tx;
}

static void rx_state_free(struct fl_rx_state *rx)
{
    if (!rx)
        return;
    fl_udpi_free(rx->in);
    free(rx);
}

static struct fl_rx_state *rx_state_new(const struct fl_engine *e)
{
    struct fl_rx_state *rx = calloc(1, sizeof(*rx));
    if (!rx)
        return NULL;
    rx->in = fl_udpi_new();
    if (!rx->in) {
        free(rx);
        return NULL;
    }
    fl_tunw_init(&rx->tw, e->cfg.tun_fds[0], e->feat.vnet_hdr, e->feat.coalesce);
    return rx;
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

static int rx_round(struct fl_worker *w, struct fl_rx_state *rx, int ufd, int *failed);

/* The socket layer's wait for room in the send buffer (fl_wait_room_fn). The worker is offline
 * meanwhile (queued datagrams hold copies of their next hop, never a table pointer) and online
 * again, at a fresh grace period, before this returns: the caller may go on looking up routes.
 * The combined worker runs its RX rounds while it waits, so a saturated egress cannot starve
 * the other direction. Returns -1 when stopping, else 0. */
static int tx_wait_room(struct fl_worker *w, int timeout_ms)
{
    struct fl_engine *e = w->e;
    int ufd = e->cfg.udp_fd, serve_rx = w->kind == FL_W_BOTH && w->rx;
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
            rx_round(w, w->rx, ufd, &failed);
            timeout_ms = 0; /* the slice is spent: let the caller retry the send */
            if (!failed)
                continue;
        }
        break;
    }
    fl_rcu_online(w);
    return r;
}

/* ---- TX: TUN -> UDP ---- */

int fl_tx_frame(struct fl_worker *w, struct fl_udp_out *out, int vnet, uint8_t *buf, int n,
                uint8_t *icmp, int *icmp_len)
{
    struct fl_frame f;
    *icmp_len = 0;
    int v = fl_frame_parse(vnet, buf, n, &f);
    if (v)
        return v;
    uint32_t hop = 0;
    uint16_t port = 0;
    v = fl_tx_one(w, f.pkt, f.len, f.gso_size ? fl_frame_wire_len(&f) : 0, &hop, &port, icmp,
                  icmp_len);
    if (v)
        return v;
    return fl_udpo_add(w, out, hop, port, &f);
}

/* One TUN read of the TX round, with its ICMP error (if any) written back into the TUN. */
static int tx_frame(struct fl_worker *w, struct fl_tx_state *tx, int tun_fd, uint8_t *buf, int n)
{
    int vnet = w->e->feat.vnet_hdr;
    uint8_t icmp[128];
    int icmp_len;
    int v = fl_tx_frame(w, tx->out, vnet, buf, n, icmp, &icmp_len);
    if (v && icmp_len > 0)
        fl_tun_write_one(w, tun_fd, vnet, icmp, icmp_len);
    return v;
}

/* One TX round: up to TX_READS reads, then one flush. Returns the reads done; a read error
 * other than EAGAIN sets *failed. */
static int tx_round(struct fl_worker *w, struct fl_tx_state *tx, int fd, int *failed)
{
    fl_rcu_online(w);
    int reads = 0, bytes = 0;
    while (reads < TX_READS && bytes < BATCH_BYTES) {
        uint8_t *buf = tx->slots + (size_t)reads * FL_SLOT_SIZE;
        ssize_t n = read(fd, buf, FL_SLOT_SIZE);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                *failed = 1;
            break; /* EAGAIN: drained */
        }
        reads++;
        bytes += (int)n;
        int v = tx_frame(w, tx, fd, buf, (int)n);
        if (v)
            fl_cnt(w, v, 1);
    }
    if (reads) {
        fl_cnt(w, C_TX_BATCHES, 1);
        fl_cnt(w, C_TX_BATCH_READS, (uint64_t)reads);
    }
    fl_udpo_flush(w, tx->out);
    fl_rcu_offline(w);
    return reads;
}

static void *tx_main(void *arg)
{
    struct fl_worker *w = arg;
    struct fl_engine *e = w->e;
    int fd = e->cfg.tun_fds[w->queue];
    char name[16]; /* a thread name's limit (TASK_COMM_LEN), terminator included */
    snprintf(name, sizeof(name), "fl-tx%d", w->queue);
    pthread_setname_np(pthread_self(), name); /* for top/perf */
    for (;;) {
        fl_rcu_offline(w);
        if (wait_fd(e, fd, POLLIN, -1) < 0)
            break;
        int failed = 0;
        while (!fl_stopping(e) && tx_round(w, w->tx, fd, &failed) > 0 && !failed)
            ;
        if (failed && backoff(e, w) < 0)
            break;
    }
    fl_rcu_offline(w);
    return NULL;
}

/* ---- RX: UDP -> TUN ---- */

static int rx_vlen(struct fl_engine *e)
{
    return e->feat.gro ? BATCH_BYTES / 65536 : FL_RX_MSGS;
}

/* One RX round: one receive, checks, writes to the TUN. Returns the datagrams received; a
 * socket error that is not a pending SO_ERROR sets *failed. */
static int rx_round(struct fl_worker *w, struct fl_rx_state *rx, int ufd, int *failed)
{
    int r = fl_udpi_recv(w, rx->in, ufd, rx_vlen(w->e), failed);
    if (r <= 0)
        return 0;
    fl_rcu_online(w);
    const struct fl_rtable *t = fl_rcu_table(w);
    uint8_t *pkt;
    int len;
    uint32_t src;
    uint16_t sport;
    while (fl_udpi_next(w, rx->in, &pkt, &len, &src, &sport)) {
        int v = fl_rx_one(w, t, pkt, len, src, sport);
        if (v) {
            fl_cnt(w, v, 1);
            continue;
        }
        fl_cnt(w, C_RX_PACKETS, 1);
        fl_cnt(w, C_RX_BYTES, (uint64_t)len);
        fl_tunw_add(w, &rx->tw, pkt, len);
    }
    fl_rcu_offline(w); /* packets are checked: no table needed to write them */
    fl_tunw_flush(w, &rx->tw);
    return r;
}

static void *rx_main(void *arg)
{
    struct fl_worker *w = arg;
    struct fl_engine *e = w->e;
    int ufd = e->cfg.udp_fd;
    pthread_setname_np(pthread_self(), "fl-rx");
    for (;;) {
        fl_rcu_offline(w);
        if (wait_fd(e, ufd, POLLIN, -1) < 0)
            break;
        int failed = 0;
        while (!fl_stopping(e) && rx_round(w, w->rx, ufd, &failed) > 0 && !failed)
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
            int a = tx_round(w, w->tx, tfd, &failed);
            int b = rx_round(w, w->rx, ufd, &failed);
            busy = a || b;
        } while (busy && !failed && !fl_stopping(e));
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
    if (f->multiqueue)
        f->steer = fl_tun_steer(c->tun_fds[0]) == 0;
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
        if (!(w->tx = tx_state_new(cfg->udp_fd)))
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
        if (!(w->rx = rx_state_new(e)))
            FAIL("out of memory");
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
        tx_state_free(e->workers[i].tx);
        rx_state_free(e->workers[i].rx);
    }
    fl_udpo_free(e->test_worker.test_out);
    fl_rt_free(atomic_load(&e->table));
    if (e->stop_fd >= 0)
        close(e->stop_fd);
    pthread_mutex_destroy(&e->wlock);
    free(e);
}

void fl_engine_features(struct fl_engine *e, struct fl_features *out)
{
    *out = e->feat;
    out->gso = fl_gso_enabled(e); /* off while paused after a failed GSO send */
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
