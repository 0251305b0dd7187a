/* The test entry points (engine_test_cdef.h): the workers' own per-packet code, run on the
 * engine's test worker with no I/O, so the tests can drive every branch with crafted bytes.
 *
 * Built only into the tests' cffi module (build.py's test builder), never into the shipped
 * fastlane._engine: nothing here is part of the production ABI or runs in a production flush.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"
#include "engine_test_cdef.h"

uint16_t fl_checksum(const uint8_t *p, int len)
{
    return ntohs((uint16_t)~fl_csum_fold(fl_csum_partial(p, len, 0)));
}

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

static int never_wait(struct fl_worker *w, int timeout_ms) { return -1; }

/* What the TX worker does with one vnet_hdr TUN read (parse, verdict, cut into datagrams), with
 * the datagrams copied out instead of sent. */
int fl_test_split(struct fl_engine *e, const uint8_t *frame, int len, uint8_t *out, int cap,
                  int *lens, int max)
{
    struct fl_worker *w = &e->test_worker;
    if (len < 0 || len > FL_SLOT_SIZE)
        return -D_TX_MALFORMED;
    if (!w->test_out && !(w->test_out = fl_udpo_new(-1, never_wait)))
        return -1;
    struct fl_udp_out *o = w->test_out;
    uint8_t *buf = malloc(len ? (size_t)len : 1);
    if (!buf)
        return -1;
    memcpy(buf, frame, (size_t)len);
    uint8_t icmp[128];
    int icmp_len;
    fl_rcu_online(w);
    int v = fl_tx_frame(w, o, 1, buf, len, icmp, &icmp_len); /* never fills the queue */
    fl_rcu_offline(w);
    int n = 0, used = 0;
    for (int i = 0; !v && i < o->n_out && n < max; i++) {
        struct fl_dgram *d = &o->out[i];
        if (used + d->len > cap)
            break;
        for (int k = 0; k < d->n_iov; k++) {
            memcpy(out + used, o->iov[d->iov0 + k].iov_base, o->iov[d->iov0 + k].iov_len);
            used += (int)o->iov[d->iov0 + k].iov_len;
        }
        lens[n++] = d->len;
    }
    fl_udpo_reset(o);
    free(buf);
    if (v) {
        fl_cnt(w, v, 1);
        return -v;
    }
    return n;
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

/* What the RX worker's TUN writer does with these packets on a coalescing vnet_hdr TUN. */
int fl_test_coalesce(const uint8_t *pkts, const int *lens, int n, uint8_t *out, int cap,
                     int *out_lens, int max)
{
    if (n < 0 || n > FL_TUNW_PKTS)
        return -1;
    uint8_t **ptrs = malloc(sizeof(*ptrs) * (size_t)(n ? n : 1));
    if (!ptrs)
        return -1;
    uint8_t scratch[256];
    struct iovec iov[2 + 2 * FL_GSO_MAX_SEGS + 8];
    int off = 0;
    for (int i = 0; i < n; i++) {
        ptrs[i] = (uint8_t *)pkts + off;
        off += lens[i];
    }
    struct sink_ctx s = {out, cap, 0, out_lens, max, 0};
    uint64_t frames = 0, segs = 0;
    fl_coalesce(ptrs, lens, n, scratch, iov, (int)(sizeof(iov) / sizeof(iov[0])), sink_emit, &s,
                &frames, &segs);
    free(ptrs);
    return s.n;
}
