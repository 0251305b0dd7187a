/* fastlane data-plane engine: declarations shared by the csrc/ C files.
 *
 * Why the split: packet.c holds pure functions over bytes (checks, TTL, ICMP, TSO split, TCP
 * coalescing) so the tests can drive them through cffi without I/O; route.c holds the route
 * table and its RCU-like swap; tun_batch.c and udp_batch.c (batch.h) hold how packets cross
 * the TUN and the socket (offloads); engine.c holds the threads and their rounds; testapi.c
 * holds the test entry points, built only into the tests' module.
 *
 * Direction names: "tx" = TUN -> UDP (encapsulation), "rx" = UDP -> TUN (decapsulation).
 * Addresses are host order inside the engine except in packet bytes.
 */
#ifndef FASTLANE_ENGINE_H
#define FASTLANE_ENGINE_H

#include <pthread.h>
#include <stdint.h>
#include <stdatomic.h>
#include <sys/uio.h>

/* The public types and functions: one copy, also read by cffi (build.py). */
#include "engine_cdef.h"


/* Counters: one array per worker, summed on read. Drop reasons are counter indices too, so a
 * pure function can return "why" as the index it bumped. Keep in sync with counter_names in engine.c. */
enum {
    C_NONE = 0, /* 0 means "forward" in verdicts */
    C_TX_PACKETS,
    C_TX_BYTES,
    C_RX_PACKETS,
    C_RX_BYTES,
    C_TX_BATCHES,
    C_TX_BATCH_READS,
    C_TX_SENDMMSG,
    C_TX_MSGS,
    C_TX_GSO_MSGS,
    C_TX_TSO_FRAMES,
    C_TX_TSO_SEGMENTS,
    C_RX_BATCHES,
    C_RX_BATCH_MSGS,
    C_RX_GRO_MSGS,
    C_RX_TUN_WRITES,
    C_RX_COALESCED_FRAMES,
    C_RX_COALESCED_SEGMENTS,
    C_ICMP_SENT,
    C_ICMP_SUPPRESSED,
    C_ROUTE_UPDATES,
    C_TX_EAGAIN_WAITS,
    C_TX_GSO_FALLBACKS,
    C_TX_WAIT_RX_ROUNDS,
    C_IO_ERRORS,
    C_DROP_FIRST,
    D_TX_NOT_IPV4 = C_DROP_FIRST,
    D_TX_MALFORMED,
    D_TX_NO_ROUTE,
    D_TX_TTL_EXPIRED,
    D_TX_TOO_BIG,
    D_TX_OVERSIZE,
    D_TX_BAD_VNET,
    D_TX_SEND_ERROR,
    D_TX_SOCKET_FULL,
    D_RX_FOREIGN_SOURCE,
    D_RX_SOURCE_PORT,
    D_RX_INNER_SOURCE,
    D_RX_NOT_IPV4,
    D_RX_MALFORMED,
    D_RX_BAD_CHECKSUM,
    D_RX_TRUNCATED,
    D_RX_TUN_WRITE_ERROR,
    C_COUNT
};

/* virtio_net_hdr as the TUN speaks it with IFF_VNET_HDR (10 bytes, little endian host). */
struct fl_vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
} __attribute__((packed));
#define FL_VNET_HDR_LEN 10
#define FL_VNET_F_NEEDS_CSUM 1
#define FL_VNET_GSO_NONE 0
#define FL_VNET_GSO_TCPV4 1
#define FL_VNET_GSO_ECN 0x80

/* Route table: one hash per distinct prefix length, longest first. Immutable once published. */
struct fl_rt_entry {
    uint32_t net; /* masked, host order; net == 0 && len == 0 is the default route */
    uint32_t next_hop;
    uint16_t port;
    uint8_t used;
};
struct fl_rt_level {
    uint8_t len;
    uint32_t mask;
    uint32_t cap; /* power of two */
    struct fl_rt_entry *slots;
};
struct fl_rtable {
    int n_levels;
    struct fl_rt_level levels[33];
    uint32_t hop_cap;   /* power of two; a hash map next hop -> port for the source checks */
    uint32_t *hops;
    uint16_t *hop_port; /* the peer's Backend.Port, or FL_PORT_ANY when its routes disagree */
    uint8_t *hop_used;
    int n_routes;
};

#define FL_PORT_ANY 0
#define FL_QS_OFFLINE UINT64_MAX

/* ICMP error rate limiting: token buckets per (kind, hashed inner source), so one container
 * flooding unroutable packets cannot use up the budget of another, and "fragmentation needed"
 * (path MTU discovery) never competes with the other errors. */
enum { FL_ICMP_KIND_ERROR, FL_ICMP_KIND_FRAG, FL_ICMP_KINDS };
#define FL_ICMP_SLOTS 64
struct fl_icmp_bucket {
    double tokens;
    uint64_t last_ns; /* 0 = never used: starts full */
};
enum { FL_W_TX, FL_W_RX, FL_W_TEST, FL_W_BOTH };

struct fl_tx_state;
struct fl_rx_state;
struct fl_udp_out;

/* A worker's private state. The test entry points (testapi.c) use e->test_worker. */
struct fl_worker {
    struct fl_engine *e;
    pthread_t thread;
    int kind; /* FL_W_* */
    int queue;
    int running;
    _Atomic uint64_t qs; /* last grace-period generation seen, or FL_QS_OFFLINE */
    _Atomic uint64_t c[C_COUNT];
    struct fl_icmp_bucket icmp[FL_ICMP_KINDS][FL_ICMP_SLOTS];
    struct fl_tx_state *tx;        /* TUN -> UDP (engine.c), when this worker carries TX */
    struct fl_rx_state *rx;        /* UDP -> TUN (engine.c), when this worker carries RX */
    struct fl_udp_out *test_out;   /* the test worker's datagram queue (testapi.c) */
};

#define FL_MAX_WORKERS (FL_MAX_QUEUES + 2)

struct fl_engine {
    struct fl_config cfg;
    struct fl_features feat;
    int stop_fd; /* eventfd: wakes the workers for stop */
    _Atomic int stopping; /* checked between rounds, so a flood cannot hold a worker */
    int started;
    /* UDP GSO after a failed GSO send: off until this time (CLOCK_MONOTONIC ns), then re-tried
     * with a doubling back-off (gso_backoff_ns) while it keeps failing. */
    _Atomic uint64_t gso_retry_ns;
    _Atomic uint64_t gso_backoff_ns;
    _Atomic(struct fl_rtable *) table;
    _Atomic uint64_t gen;
    pthread_mutex_t wlock; /* serialises writers of the table only */
    int n_workers;
    struct fl_worker workers[FL_MAX_WORKERS];
    struct fl_worker test_worker;
    _Atomic uint64_t c_engine[C_COUNT]; /* counters bumped outside workers */
};

static inline int fl_stopping(struct fl_engine *e)
{
    return atomic_load_explicit(&e->stopping, memory_order_relaxed);
}

static inline void fl_cnt(struct fl_worker *w, int i, uint64_t v)
{
    /* single writer per array: a relaxed load+store is an atomic counter for readers */
    atomic_store_explicit(&w->c[i], atomic_load_explicit(&w->c[i], memory_order_relaxed) + v,
                          memory_order_relaxed);
}

/* route.c */
struct fl_rtable *fl_rt_build(const struct fl_route *r, int n);
void fl_rt_free(struct fl_rtable *t);
const struct fl_rt_entry *fl_rt_lookup(const struct fl_rtable *t, uint32_t dst);
/* The port a next hop sends from (FL_PORT_ANY = any), or -1 when hop is no next hop. */
int fl_rt_hop_port(const struct fl_rtable *t, uint32_t hop);
void fl_rcu_online(struct fl_worker *w);
void fl_rcu_offline(struct fl_worker *w);
struct fl_rtable *fl_rcu_table(struct fl_worker *w);

/* packet.c */
uint32_t fl_csum_partial(const uint8_t *p, int len, uint32_t sum);
uint16_t fl_csum_fold(uint32_t sum);
int fl_ip_check(const uint8_t *p, int len, int exact); /* 0 ok, else 1 = not v4, 2 = malformed */
int fl_make_icmp(struct fl_worker *w, const uint8_t *orig, int orig_len, uint8_t type, uint8_t code,
                 uint16_t mtu, uint8_t *out);
int fl_tx_one(struct fl_worker *w, uint8_t *pkt, int len, int wire_len, uint32_t *next_hop,
              uint16_t *port, uint8_t *icmp, int *icmp_len);
int fl_rx_one(struct fl_worker *w, const struct fl_rtable *t, const uint8_t *pkt, int len,
              uint32_t src, uint16_t src_port);
uint64_t fl_now_ns(void);
int fl_vnet_finish_csum(uint8_t *pkt, int len, const struct fl_vnet_hdr *vh);

/* The IPv4+TCP header length of a TSO frame's template (checked), or -reason. */
int fl_tso_hdr_len(const uint8_t *pkt, int len, uint16_t gso_size);
/* TSO split: fills per-segment headers (hdr_out, stride FL_SEG_HDR_MAX) and iovecs
 * (2 per segment: header, payload slice of pkt). Returns the segment count or -reason. */
#define FL_SEG_HDR_MAX 128
int fl_tso_split(uint8_t *pkt, int len, uint16_t gso_size, int first_seg, int max_segs,
                 uint8_t *hdr_out, struct iovec *iov, int *seg_len);

/* RX coalescing: given packets (iov of one packet each), groups runs; for each output frame
 * calls emit(ctx, iov, n_iov, total_len) with iov[0] = vnet header. */
typedef int (*fl_emit_fn)(void *ctx, struct iovec *iov, int n_iov, int total);
int fl_coalesce(uint8_t *const *pkts, const int *lens, int n, uint8_t *scratch, struct iovec *iov,
                int iov_cap, fl_emit_fn emit, void *ctx, uint64_t *frames, uint64_t *segs);

#endif
