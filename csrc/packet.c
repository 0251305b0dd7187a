/* Pure per-packet work: header checks, TTL, ICMP errors, TSO splitting and TCP coalescing.
 *
 * Nothing here does I/O, so the tests can call every branch through cffi with crafted bytes
 * and check the verdicts exactly; the workers in engine.c call the same functions.
 *
 * Checksums are summed in "native load" order (RFC 1071 §2(B): the one's complement sum is
 * byte-order independent), so 16-bit fields are loaded and stored with memcpy, never swapped,
 * and host-order constants added to a sum go through htons first.
 *
 * Decisions:
 * - TTL is decremented on encapsulation only (flanneld also decrements on decapsulation). The
 *   receiving kernel decrements it again when it forwards out of the TUN, so one overlay crossing
 *   costs the hops a router path would, and decap never rewrites a packet.
 * - Decapsulated packets are written to the TUN whatever their inner destination, as flanneld
 *   does: the kernel's routing/rp_filter decides, and the source check below already limits
 *   senders to peers in the lease table.
 * - A packet from the TUN larger than the overlay MTU without DF is dropped and counted
 *   (tx_oversize) rather than fragmented: with the TUN MTU equal to the overlay MTU the kernel
 *   never hands one over unless someone raised the TUN MTU by hand.
 */
#include <arpa/inet.h>
#include <string.h>
#include <time.h>

#include "engine.h"

/* IPv4 header (RFC 791): byte offsets and flags. */
#define IPH_TOS 1
#define IPH_TOT_LEN 2
#define IPH_ID 4
#define IPH_FRAG 6 /* flags + fragment offset */
#define IPH_TTL 8
#define IPH_PROTO 9
#define IPH_CSUM 10
#define IPH_SRC 12
#define IPH_DST 16
#define IPH_MIN_HDR 20
#define IPH_F_DF 0x4000
#define IPH_F_MF 0x2000
#define IPH_OFFSET 0x1fff
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
/* TCP header (RFC 9293): byte offsets and flags. */
#define TCPH_SEQ 4
#define TCPH_ACK 8
#define TCPH_DOFF 12 /* data offset in the high nibble */
#define TCPH_FLAGS 13
#define TCPH_WIN 14
#define TCPH_CSUM 16
#define TCPH_URP 18
#define TCPH_MIN_HDR 20
#define TCPH_FIN 0x01
#define TCPH_PSH 0x08
#define TCPH_ACKF 0x10
#define TCPH_CWR 0x80
/* ICMP (RFC 792) */
#define ICMP_DEST_UNREACH 3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_REDIRECT 5
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMP_FRAG_NEEDED 4 /* code of ICMP_DEST_UNREACH */

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline uint32_t ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

#if defined(__x86_64__)
#include <immintrin.h>

/* The checksum is a tenth of the engine's CPU on the TSO path (perf): with AVX2 the 32-bit words
 * of 64 bytes are summed per step into eight 64-bit lanes (low and high halves apart), so no carry
 * handling is needed for any packet size (2^32 additions of 32-bit values fit in 64 bits).
 * A 32-bit word w = hi * 2^16 + lo is congruent to hi + lo mod 0xffff, so this sum folds to the same
 * one's complement result as the 16-bit one. */
__attribute__((target("avx2"))) static uint64_t sum64_avx2(const uint8_t *p, int len, int *done)
{
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
    const __m256i mask = _mm256_set1_epi64x(0xffffffffLL);
    int n = 0;
    while (len - n >= 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + n));
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + n + 32));
        lo = _mm256_add_epi64(lo, _mm256_and_si256(a, mask));
        hi = _mm256_add_epi64(hi, _mm256_srli_epi64(a, 32));
        lo = _mm256_add_epi64(lo, _mm256_and_si256(b, mask));
        hi = _mm256_add_epi64(hi, _mm256_srli_epi64(b, 32));
        n += 64;
    }
    __m256i t = _mm256_add_epi64(lo, hi);
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, t);
    *done = n;
    /* each lane < 2^49 for 64 KiB: the sum of four fits */
    return v[0] + v[1] + v[2] + v[3];
}

/* Decided once, before any worker runs (no lazily written shared flag). */
static int have_avx2;
__attribute__((constructor)) static void detect_avx2(void)
{
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
}
#endif

/* Sum of the bytes as native 16-bit words, not folded past 32 bits. */
uint32_t fl_csum_partial(const uint8_t *p, int len, uint32_t sum)
{
    uint64_t s = sum, c = 0;
#if defined(__x86_64__)
    if (len >= 256) {
        if (have_avx2) {
            int done;
            uint64_t v = sum64_avx2(p, len, &done);
            /* fold the 64-bit total to 32 bits before it meets the scalar sum */
            v = (v & 0xffffffffU) + (v >> 32);
            v = (v & 0xffffffffU) + (v >> 32);
            s += v;
            p += done;
            len -= done;
        }
    }
#endif
    while (len >= 32) {
        uint64_t a, b, d, e;
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        memcpy(&d, p + 16, 8);
        memcpy(&e, p + 24, 8);
        s += a;
        c += s < a;
        s += b;
        c += s < b;
        s += d;
        c += s < d;
        s += e;
        c += s < e;
        p += 32;
        len -= 32;
    }
    while (len >= 8) {
        uint64_t a;
        memcpy(&a, p, 8);
        s += a;
        c += s < a;
        p += 8;
        len -= 8;
    }
    while (len >= 2) {
        s += ld16(p);
        c += s < ld16(p);
        p += 2;
        len -= 2;
    }
    if (len) {
        uint8_t tmp[2] = {p[0], 0};
        s += ld16(tmp);
        c += s < ld16(tmp);
    }
    /* end-around carries: 2^64 = 1 (mod 0xffff) */
    uint64_t t = (s & 0xffffffffU) + (s >> 32) + c;
    t = (t & 0xffffffffU) + (t >> 32);
    t = (t & 0xffffffffU) + (t >> 32);
    return (uint32_t)t;
}

uint16_t fl_csum_fold(uint32_t sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* The checksum to store (native order) for these bytes. */
static inline uint16_t csum_final(uint32_t sum) { return (uint16_t)~fl_csum_fold(sum); }


static inline uint32_t pseudo_sum(const uint8_t *ip, uint8_t proto, int l4_len)
{
    uint64_t s = (uint64_t)ld16(ip + IPH_SRC) + ld16(ip + IPH_SRC + 2) + ld16(ip + IPH_DST) + ld16(ip + IPH_DST + 2) +
                 htons(proto) + htons((uint16_t)l4_len);
    return (uint32_t)s;
}

static inline void ip_set_csum(uint8_t *ip, int ihl_bytes)
{
    st16(ip + IPH_CSUM, 0);
    st16(ip + IPH_CSUM, csum_final(fl_csum_partial(ip, ihl_bytes, 0)));
}

int fl_ip_check(const uint8_t *p, int len, int exact)
{
    if (len < 1)
        return 2;
    if ((p[0] >> 4) != 4)
        return 1;
    if (len < IPH_MIN_HDR)
        return 2;
    int ihl = (p[0] & 15) * 4;
    if (ihl < IPH_MIN_HDR || ihl > len)
        return 2;
    int tot = ntohs(ld16(p + IPH_TOT_LEN));
    if (tot < ihl || (exact ? tot != len : tot > len))
        return 2;
    return 0;
}

uint64_t fl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int icmp_allowed(const uint8_t *o, int len)
{
    uint32_t src = ntohl(ld32(o + IPH_SRC)), dst = ntohl(ld32(o + IPH_DST));
    if (ntohs(ld16(o + IPH_FRAG)) & IPH_OFFSET) /* non-first fragment */
        return 0;
    /* sources no error may go to: "this network" 0/8, loopback 127/8, multicast 224/4,
     * reserved 240/4 and the limited broadcast (RFC 1812 4.3.2.7) */
    if ((src >> 24) == 0 || (src >> 24) == 127 || (src >> 28) == 0xe || (src >> 28) == 0xf)
        return 0;
    if (dst == 0xffffffffU || (dst >> 28) == 0xe)
        return 0;
    int ihl = (o[0] & 15) * 4;
    if (o[IPH_PROTO] == PROTO_ICMP) { /* never answer an ICMP error (RFC 1122 3.2.2) */
        if (len < ihl + 1)
            return 0;
        uint8_t type = o[ihl];
        if (type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH || type == ICMP_REDIRECT ||
            type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB)
            return 0;
    }
    return 1;
}

/* Takes a token from the bucket of this kind of error and this (hashed) inner source. */
static int icmp_take_token(struct fl_worker *w, int kind, uint32_t src)
{
    const struct fl_config *cfg = &w->e->cfg;
    double rate = cfg->icmp_rate > 0 ? cfg->icmp_rate : 100;
    double burst = cfg->icmp_burst > 0 ? cfg->icmp_burst : rate;
    uint32_t h = src * 0x9e3779b1U;
    struct fl_icmp_bucket *b = &w->icmp[kind][h >> 26]; /* top 6 bits: FL_ICMP_SLOTS */
    uint64_t now = fl_now_ns();
    if (b->last_ns == 0) {
        b->tokens = burst;
    } else {
        b->tokens += (double)(now - b->last_ns) * 1e-9 * rate;
        if (b->tokens > burst)
            b->tokens = burst;
    }
    b->last_ns = now;
    if (b->tokens < 1.0)
        return 0;
    b->tokens -= 1.0;
    return 1;
}

/* Builds an ICMP error about `orig` (a checked IPv4 packet, before the TTL change) into out
 * (room for 96 bytes). Returns its length, or 0 when none may or need be sent. */
int fl_make_icmp(struct fl_worker *w, const uint8_t *orig, int orig_len, uint8_t type,
                 uint8_t code, uint16_t mtu, uint8_t *out)
{
    if (!icmp_allowed(orig, orig_len))
        return 0;
    int kind = type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED ? FL_ICMP_KIND_FRAG
                                                                     : FL_ICMP_KIND_ERROR;
    if (!icmp_take_token(w, kind, ntohl(ld32(orig + IPH_SRC)))) {
        fl_cnt(w, C_ICMP_SUPPRESSED, 1);
        return 0;
    }
    int ihl = (orig[0] & 15) * 4;
    int quote = ihl + 8 < orig_len ? ihl + 8 : orig_len;
    int tot = 20 + 8 + quote;
    uint8_t *ip = out, *ic = out + IPH_MIN_HDR;
    memset(out, 0, IPH_MIN_HDR + 8);
    ip[0] = 0x45; /* version 4, 5 words */
    ip[IPH_TOS] = 0xc0; /* internetwork control precedence, as Linux does for ICMP errors */
    st16(ip + IPH_TOT_LEN, htons((uint16_t)tot));
    ip[IPH_TTL] = 64;
    ip[IPH_PROTO] = PROTO_ICMP;
    st32(ip + IPH_SRC, htonl(w->e->cfg.tun_addr));
    memcpy(ip + IPH_DST, orig + IPH_SRC, 4);
    ip_set_csum(ip, IPH_MIN_HDR);
    ic[0] = type;
    ic[1] = code;
    if (type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED)
        st16(ic + 6, htons(mtu)); /* next-hop MTU (RFC 1191) */
    memcpy(ic + 8, orig, (size_t)quote);
    st16(ic + 2, csum_final(fl_csum_partial(ic, 8 + quote, 0)));
    fl_cnt(w, C_ICMP_SENT, 1);
    return tot;
}

static void ttl_decrement(uint8_t *ip)
{
    /* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), m the 16-bit word holding TTL and protocol */
    uint16_t m = ld16(ip + IPH_TTL);
    ip[IPH_TTL]--;
    uint16_t m2 = ld16(ip + IPH_TTL);
    uint32_t s = (uint16_t)~ld16(ip + IPH_CSUM);
    s += (uint16_t)~m;
    s += m2;
    st16(ip + IPH_CSUM, (uint16_t)~fl_csum_fold(s));
}

/* Encap verdict for one packet (or the template of a TSO frame, whose wire packets will be
 * wire_len bytes each; 0 = len). */
int fl_tx_one(struct fl_worker *w, uint8_t *pkt, int len, int wire_len, uint32_t *next_hop,
              uint16_t *port, uint8_t *icmp, int *icmp_len)
{
    *icmp_len = 0;
    int bad = fl_ip_check(pkt, len, 1);
    if (bad == 1)
        return D_TX_NOT_IPV4;
    if (bad)
        return D_TX_MALFORMED;
    const struct fl_rt_entry *r = fl_rt_lookup(fl_rcu_table(w), ntohl(ld32(pkt + IPH_DST)));
    if (!r) {
        *icmp_len = fl_make_icmp(w, pkt, len, ICMP_DEST_UNREACH, 0, 0, icmp); /* net */
        return D_TX_NO_ROUTE;
    }
    if (pkt[IPH_TTL] <= 1) {
        *icmp_len = fl_make_icmp(w, pkt, len, ICMP_TIME_EXCEEDED, 0, 0, icmp);
        return D_TX_TTL_EXPIRED;
    }
    int mtu = w->e->cfg.mtu;
    if ((wire_len ? wire_len : len) > mtu) {
        if (ntohs(ld16(pkt + IPH_FRAG)) & IPH_F_DF) {
            *icmp_len = fl_make_icmp(w, pkt, len, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED,
                                     (uint16_t)mtu, icmp);
            return D_TX_TOO_BIG;
        }
        return D_TX_OVERSIZE;
    }
    ttl_decrement(pkt);
    *next_hop = r->next_hop;
    *port = r->port;
    return 0;
}

/* Decap verdict. The source checks (cfg.check_source) bind what a datagram may carry to who
 * sent it: the outer source must be a peer's PublicIP, sending from that peer's port, and an
 * inner source inside the flannel Network must lie in a subnet routed to that same peer. So a
 * process on a peer (or a spoofer of its address) cannot impersonate another node's pods or
 * this node's own; inner sources outside the Network stay allowed (a node may route for
 * other networks). */
int fl_rx_one(struct fl_worker *w, const struct fl_rtable *t, const uint8_t *pkt, int len,
              uint32_t src, uint16_t src_port)
{
    const struct fl_config *cfg = &w->e->cfg;
    if (cfg->check_source) {
        int port = fl_rt_hop_port(t, src);
        if (port < 0)
            return D_RX_FOREIGN_SOURCE;
        if (port != FL_PORT_ANY && port != src_port)
            return D_RX_SOURCE_PORT;
    }
    int bad = fl_ip_check(pkt, len, 1);
    if (bad == 1)
        return D_RX_NOT_IPV4;
    if (bad)
        return D_RX_MALFORMED;
    if (fl_csum_fold(fl_csum_partial(pkt, (pkt[0] & 15) * 4, 0)) != 0xffff)
        return D_RX_BAD_CHECKSUM;
    if (cfg->check_source && cfg->network_len > 0) {
        uint32_t mask = cfg->network_len >= 32 ? 0xffffffffU : ~(0xffffffffU >> cfg->network_len);
        uint32_t inner = ntohl(ld32(pkt + IPH_SRC));
        if ((inner & mask) == (cfg->network & mask)) {
            const struct fl_rt_entry *r = fl_rt_lookup(t, inner);
            if (!r || r->next_hop != src)
                return D_RX_INNER_SOURCE;
        }
    }
    return 0;
}

/* A NEEDS_CSUM packet from the TUN carries only the pseudo-header sum in its L4 checksum
 * field: finish it, since the wire (and an old flanneld peer) needs complete packets. */
int fl_vnet_finish_csum(uint8_t *pkt, int len, const struct fl_vnet_hdr *vh)
{
    if (!(vh->flags & FL_VNET_F_NEEDS_CSUM))
        return 0;
    int start = vh->csum_start, off = vh->csum_offset;
    /* the checksummed part starts past the IP header (a checked packet's): a start inside it
     * would overwrite header bytes its own checksum covers */
    if (start < (pkt[0] & 15) * 4 || start > len || start + off + 2 > len)
        return -1;
    uint16_t c = csum_final(fl_csum_partial(pkt + start, len - start, 0));
    if (pkt[IPH_PROTO] == PROTO_UDP && c == 0)
        c = 0xffff; /* UDP: a computed zero is sent as all ones */
    st16(pkt + start + off, c);
    return 0;
}

int fl_tso_hdr_len(const uint8_t *pkt, int len, uint16_t gso_size)
{
    int bad = fl_ip_check(pkt, len, 1);
    if (bad)
        return bad == 1 ? -D_TX_NOT_IPV4 : -D_TX_MALFORMED;
    int ihl = (pkt[0] & 15) * 4;
    if (pkt[IPH_PROTO] != PROTO_TCP || len < ihl + TCPH_MIN_HDR || gso_size == 0)
        return -D_TX_BAD_VNET;
    return ihl + (pkt[ihl + TCPH_DOFF] >> 4) * 4;
}

int fl_tso_split(uint8_t *pkt, int len, uint16_t gso_size, int first_seg, int max_segs,
                 uint8_t *hdr_out, struct iovec *iov, int *seg_len)
{
    int ihl = (pkt[0] & 15) * 4;
    if (pkt[IPH_PROTO] != PROTO_TCP || len < ihl + TCPH_MIN_HDR || gso_size == 0)
        return -D_TX_BAD_VNET;
    uint8_t *tcp0 = pkt + ihl;
    int doff = (tcp0[TCPH_DOFF] >> 4) * 4;
    int hdr = ihl + doff;
    if (doff < TCPH_MIN_HDR || hdr > len || hdr > FL_SEG_HDR_MAX)
        return -D_TX_BAD_VNET;
    int payload = len - hdr;
    int nseg = payload == 0 ? 1 : (payload + gso_size - 1) / gso_size;
    uint16_t id0 = ntohs(ld16(pkt + IPH_ID));
    uint32_t seq0 = ntohl(ld32(tcp0 + TCPH_SEQ));
    uint8_t flags0 = tcp0[TCPH_FLAGS];
    int n = 0;
    for (int i = first_seg; i < nseg && n < max_segs; i++, n++) {
        int off = hdr + i * gso_size;
        int plen = len - off < gso_size ? len - off : gso_size;
        uint8_t *h = hdr_out + (size_t)n * FL_SEG_HDR_MAX;
        memcpy(h, pkt, (size_t)hdr);
        uint8_t *tcp = h + ihl;
        st16(h + IPH_TOT_LEN, htons((uint16_t)(hdr + plen)));
        st16(h + IPH_ID, htons((uint16_t)(id0 + i)));
        ip_set_csum(h, ihl);
        st32(tcp + TCPH_SEQ, htonl(seq0 + (uint32_t)i * gso_size));
        uint8_t f = flags0;
        if (i != nseg - 1)
            f &= (uint8_t)~(TCPH_FIN | TCPH_PSH); /* only on the last segment */
        if (i != 0)
            f &= (uint8_t)~TCPH_CWR; /* only on the first */
        tcp[TCPH_FLAGS] = f;
        st16(tcp + TCPH_CSUM, 0);
        uint32_t s = pseudo_sum(h, PROTO_TCP, doff + plen);
        s = fl_csum_partial(tcp, doff, s);
        s = fl_csum_partial(pkt + off, plen, s);
        st16(tcp + TCPH_CSUM, csum_final(s));
        iov[2 * n].iov_base = h;
        iov[2 * n].iov_len = (size_t)hdr;
        iov[2 * n + 1].iov_base = pkt + off;
        iov[2 * n + 1].iov_len = (size_t)plen;
        seg_len[n] = hdr + plen;
    }
    return n;
}

/* ---- RX coalescing ---- */

struct tcp_view {
    uint8_t *ip, *tcp;
    int len, hdr, doff, plen;
    uint32_t seq;
};

/* A segment that may join a coalesced frame: plain IPv4/TCP, no options in IP, not a fragment,
 * flags ACK or ACK|PSH, some payload, and a valid TCP checksum (merging would hide a bad one:
 * the kernel recomputes the checksum of a NEEDS_CSUM frame). */
static int tcp_mergeable(uint8_t *p, int len, struct tcp_view *v)
{
    if (len < IPH_MIN_HDR + TCPH_MIN_HDR || p[0] != 0x45 || p[IPH_PROTO] != PROTO_TCP ||
        (ntohs(ld16(p + IPH_FRAG)) & (IPH_F_MF | IPH_OFFSET)) || ntohs(ld16(p + IPH_TOT_LEN)) != len)
        return 0;
    uint8_t *t = p + IPH_MIN_HDR;
    int doff = (t[TCPH_DOFF] >> 4) * 4;
    if (doff < TCPH_MIN_HDR || IPH_MIN_HDR + doff >= len)
        return 0;
    if ((t[TCPH_FLAGS] & ~TCPH_PSH) != TCPH_ACKF)
        return 0;
    uint32_t s = pseudo_sum(p, PROTO_TCP, len - IPH_MIN_HDR);
    if (fl_csum_fold(fl_csum_partial(t, len - IPH_MIN_HDR, s)) != 0xffff)
        return 0;
    v->ip = p;
    v->tcp = t;
    v->len = len;
    v->doff = doff;
    v->hdr = IPH_MIN_HDR + doff;
    v->plen = len - v->hdr;
    v->seq = ntohl(ld32(t + TCPH_SEQ));
    return 1;
}

static int same_flow(const struct tcp_view *a, const struct tcp_view *b)
{
    /* IP: tos, DF, ttl, proto, addresses; TCP: ports, ack, doff, window, urg, options */
    if (a->ip[IPH_TOS] != b->ip[IPH_TOS] || ld16(a->ip + IPH_FRAG) != ld16(b->ip + IPH_FRAG) ||
        ld16(a->ip + IPH_TTL) != ld16(b->ip + IPH_TTL) || memcmp(a->ip + IPH_SRC, b->ip + IPH_SRC, 8))
        return 0;
    /* ports; ack and data offset (TCPH_ACK..TCPH_DOFF); window; urgent pointer; options */
    if (a->doff != b->doff || memcmp(a->tcp, b->tcp, TCPH_SEQ) ||
        memcmp(a->tcp + TCPH_ACK, b->tcp + TCPH_ACK, TCPH_DOFF - TCPH_ACK + 1) ||
        ld16(a->tcp + TCPH_WIN) != ld16(b->tcp + TCPH_WIN) ||
        ld16(a->tcp + TCPH_URP) != ld16(b->tcp + TCPH_URP))
        return 0;
    return memcmp(a->tcp + TCPH_MIN_HDR, b->tcp + TCPH_MIN_HDR, (size_t)(a->doff - TCPH_MIN_HDR)) == 0;
}

int fl_coalesce(uint8_t *const *pkts, const int *lens, int n, uint8_t *scratch, struct iovec *iov,
                int iov_cap, fl_emit_fn emit, void *ctx, uint64_t *frames, uint64_t *segs)
{
    struct fl_vnet_hdr *vh = (struct fl_vnet_hdr *)scratch;
    uint8_t *hdr = scratch + 16;
    int i = 0, errors = 0;
    while (i < n) {
        struct tcp_view head, cur;
        int j = i + 1;
        int total = 0;
        if (tcp_mergeable(pkts[i], lens[i], &head) && !(head.tcp[TCPH_FLAGS] & TCPH_PSH)) {
            total = head.len;
            int last_plen = head.plen;
            uint32_t next_seq = head.seq + (uint32_t)head.plen;
            int psh = 0;
            while (j < n && 2 + 2 * (j - i) < iov_cap && !psh) {
                if (last_plen != head.plen || !tcp_mergeable(pkts[j], lens[j], &cur))
                    break;
                if (cur.plen > head.plen || cur.seq != next_seq || !same_flow(&head, &cur) ||
                    total + cur.plen > 65535)
                    break;
                total += cur.plen;
                next_seq += (uint32_t)cur.plen;
                last_plen = cur.plen;
                psh = cur.tcp[TCPH_FLAGS] & TCPH_PSH;
                j++;
            }
        } else {
            j = i + 1;
        }
        memset(vh, 0, FL_VNET_HDR_LEN);
        iov[0].iov_base = vh;
        iov[0].iov_len = FL_VNET_HDR_LEN;
        int r;
        if (j - i == 1) {
            iov[1].iov_base = pkts[i];
            iov[1].iov_len = (size_t)lens[i];
            r = emit(ctx, iov, 2, lens[i]);
        } else {
            memcpy(hdr, head.ip, (size_t)head.hdr);
            uint8_t *t = hdr + IPH_MIN_HDR;
            st16(hdr + IPH_TOT_LEN, htons((uint16_t)total));
            ip_set_csum(hdr, IPH_MIN_HDR);
            if (pkts[j - 1][IPH_MIN_HDR + TCPH_FLAGS] & TCPH_PSH)
                t[TCPH_FLAGS] |= TCPH_PSH;
            st16(t + TCPH_CSUM, fl_csum_fold(pseudo_sum(hdr, PROTO_TCP, total - IPH_MIN_HDR)));
            vh->flags = FL_VNET_F_NEEDS_CSUM;
            vh->gso_type = FL_VNET_GSO_TCPV4;
            vh->hdr_len = (uint16_t)head.hdr;
            vh->gso_size = (uint16_t)head.plen;
            vh->csum_start = IPH_MIN_HDR;
            vh->csum_offset = TCPH_CSUM;
            iov[1].iov_base = hdr;
            iov[1].iov_len = (size_t)head.hdr;
            int k = 2;
            for (int m = i; m < j; m++) {
                int h = IPH_MIN_HDR + (pkts[m][IPH_MIN_HDR + TCPH_DOFF] >> 4) * 4;
                iov[k].iov_base = pkts[m] + h;
                iov[k].iov_len = (size_t)(lens[m] - h);
                k++;
            }
            r = emit(ctx, iov, k, total);
            (*frames)++;
            *segs += (uint64_t)(j - i);
        }
        if (r < 0)
            errors++;
        i = j;
    }
    return errors;
}
