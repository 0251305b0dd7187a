/* libFuzzer harness: the engine's pure per-packet functions, each checked against a property.
 *
 * Input: one op byte (op % OPS picks the function), then that op's fields (fuzz_common.h reader;
 * csrc/fuzz/make_corpus.py writes the seeds in the same layout). Every packet handed to the
 * code under test is a heap copy of exactly its length, so ASan sees any read past its end.
 * Each op calls the function the way the engine does (same preconditions as its caller).
 *
 *   0 checksum   align:u8, bytes        fl_checksum / fl_csum_partial vs the RFC 1071 reference
 *   1 ip_check   exact:u8, bytes        fl_ip_check vs the reference rules
 *   2 tx         bytes                  fl_tx_packet: verdict, TTL, checksums, route, ICMP reply
 *   3 rx         src:u32 port:u16, bytes  fl_rx_packet: accepted only if well formed
 *   4 vnet_csum  vnet_hdr:10, bytes     fl_vnet_finish_csum on a checked packet vs the reference
 *   5 split      vnet_hdr:10, bytes     fl_test_split (tx_handle + TSO split): every wire packet
 *                                       valid, at most the MTU, payload and seq conserved
 *   6 coalesce   fix:u8 n:u8, n x (len:u16, bytes)  fl_coalesce over separate heap packets: frames
 *                                       rebuild exactly the input packets' payloads, in order
 *   7 icmp       type:u8 code:u8 mtu:u16, bytes  fl_make_icmp on a checked packet: valid error
 *   8 routes     n:u8, n x (net:u32 len:u8 hop:u32 port:u16), probes x dst:u32
 *                                       fl_engine_set_routes + fl_lookup vs a reference LPM
 *
 * Build: make fuzz (links engine.c, packet.c, route.c of CSRC as they are).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "engine.h"
#include "engine_test_cdef.h"
#include "fuzz_common.h"

#define OPS 9
#define MTU 1400
#define ICMP_ROOM 96 /* fl_make_icmp: "room for 96 bytes" */

static struct fl_engine *eng;

static const struct fl_route base_routes[] = {
    {0x0a000000, 8, 0xc0000201, 8285},  /* 10/8 */
    {0x0a010000, 16, 0xc0000202, 8285}, /* 10.1/16 */
    {0x0a010200, 24, 0xc0000203, 9000}, /* 10.1.2/24 */
    {0x0a020304, 32, 0xc0000204, 8285}, /* 10.2.3.4/32 */
};
#define N_BASE (int)(sizeof(base_routes) / sizeof(base_routes[0]))

static void setup(void)
{
    if (eng)
        return;
    struct fl_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.n_tun = 0; /* no I/O: the pure functions only */
    cfg.udp_fd = -1;
    cfg.mtu = MTU;
    cfg.tun_addr = 0x0a000001;
    cfg.check_source = 1;
    cfg.network = 0x0a000000;
    cfg.network_len = 8;
    cfg.icmp_rate = 1000000000;
    char err[128];
    eng = fl_engine_new(&cfg, err, sizeof(err));
    FZ_CHECK(eng != NULL, "fl_engine_new: %s", err);
    FZ_CHECK(fl_engine_set_routes(eng, base_routes, N_BASE) == N_BASE, "base routes");
}

static int ref_ip_check(const uint8_t *p, int len, int exact)
{
    if (len < 1)
        return 2;
    if (p[0] >> 4 != 4)
        return 1;
    if (len < 20)
        return 2;
    int ihl = (p[0] & 15) * 4, tot = fz_be16(p + 2);
    if (ihl < 20 || ihl > len)
        return 2;
    if (tot < ihl || (exact ? tot != len : tot > len))
        return 2;
    return 0;
}

static int hdr_valid(const uint8_t *p) { return fz_ref_sum(p, (size_t)(p[0] & 15) * 4, 0) == 0xffff; }

static uint32_t pseudo(const uint8_t *ip, uint8_t proto, int l4len)
{
    return fz_ref_sum(ip + 12, 8, 0) + proto + (uint32_t)l4len;
}

static void op_checksum(struct fz_in *in)
{
    int align = fz_u8(in) % 8;
    const uint8_t *d;
    size_t n = fz_take(in, 1 << 17, &d);
    uint8_t *buf = malloc(n + (size_t)align + 1);
    memcpy(buf + align, d, n);
    uint8_t *p = buf + align;
    uint16_t got = fl_checksum(p, (int)n), want = fz_ref_csum(p, n);
    FZ_CHECK(got == want, "fl_checksum %#x, reference %#x, len %zu align %d", got, want, n, align);
    /* a sum carried over an even split equals the sum in one go (mod 0xffff) */
    size_t k = n ? (d[0] * 2u) % (n + 1) & ~(size_t)1 : 0;
    uint32_t a = fl_csum_fold(fl_csum_partial(p + k, (int)(n - k), fl_csum_partial(p, (int)k, 0)));
    uint32_t b = fl_csum_fold(fl_csum_partial(p, (int)n, 0));
    FZ_CHECK(a % 0xffff == b % 0xffff, "split sum %#x vs %#x at %zu", a, b, k);
    free(buf);
}

static void op_ip_check(struct fz_in *in)
{
    int exact = fz_u8(in) & 1;
    const uint8_t *d;
    size_t n = fz_take(in, 70000, &d);
    uint8_t *p = fz_dup(d, n);
    int got = fl_ip_check(p, (int)n, exact), want = ref_ip_check(p, (int)n, exact);
    FZ_CHECK(got == want, "fl_ip_check %d, reference %d", got, want);
    free(p);
}

static void check_icmp(const uint8_t *icmp, int len, const uint8_t *orig)
{
    FZ_CHECK(len >= 28 && len <= ICMP_ROOM, "ICMP length %d", len);
    FZ_CHECK(ref_ip_check(icmp, len, 1) == 0 && hdr_valid(icmp), "ICMP's IP header");
    FZ_CHECK(icmp[9] == 1 && fz_ref_sum(icmp + 20, (size_t)len - 20, 0) == 0xffff, "ICMP checksum");
    FZ_CHECK(memcmp(icmp + 16, orig + 12, 4) == 0, "ICMP goes back to the source");
    FZ_CHECK(memcmp(icmp + 28, orig, (size_t)len - 28) == 0, "ICMP quotes the packet");
}

static void op_tx(struct fz_in *in)
{
    const uint8_t *d;
    size_t n = fz_take(in, 70000, &d);
    uint8_t *p = fz_dup(d, n);
    uint8_t *icmp = malloc(ICMP_ROOM);
    uint32_t hop = 0;
    uint16_t port = 0;
    int icmp_len = -1;
    int v = fl_tx_packet(eng, p, (int)n, &hop, &port, icmp, &icmp_len);
    FZ_CHECK(icmp_len >= 0, "icmp_len unset");
    if (v == 0) {
        FZ_CHECK(ref_ip_check(d, (int)n, 1) == 0, "forwarded a malformed packet");
        FZ_CHECK(n <= MTU, "forwarded %zu bytes over the MTU", n);
        FZ_CHECK(d[8] > 1 && p[8] == d[8] - 1, "TTL %d -> %d", d[8], p[8]);
        FZ_CHECK(hdr_valid(p) == hdr_valid(d), "header checksum validity changed");
        FZ_CHECK(memcmp(p, d, 8) == 0 && p[9] == d[9] && memcmp(p + 12, d + 12, n - 12) == 0,
                 "other bytes changed");
        uint32_t h2 = 0;
        uint16_t p2 = 0;
        FZ_CHECK(fl_lookup(eng, fz_be32(d + 16), &h2, &p2) && h2 == hop && p2 == port, "route");
        FZ_CHECK(icmp_len == 0, "ICMP for a forwarded packet");
    } else {
        FZ_CHECK(memcmp(p, d, n) == 0, "a dropped packet was modified");
        if (icmp_len > 0)
            check_icmp(icmp, icmp_len, d);
    }
    free(icmp);
    free(p);
}

static void op_rx(struct fz_in *in)
{
    uint32_t src = fz_u32(in);
    uint16_t sport = fz_u16(in);
    const uint8_t *d;
    size_t n = fz_take(in, 70000, &d);
    uint8_t *p = fz_dup(d, n);
    int v = fl_rx_packet(eng, p, (int)n, src, sport);
    if (v == 0)
        FZ_CHECK(ref_ip_check(p, (int)n, 1) == 0 && hdr_valid(p), "accepted a bad packet");
    FZ_CHECK(memcmp(p, d, n) == 0, "rx modified the packet");
    free(p);
}

static void read_vnet(struct fz_in *in, struct fl_vnet_hdr *vh)
{
    vh->flags = fz_u8(in);
    vh->gso_type = fz_u8(in);
    vh->hdr_len = fz_u16(in);
    vh->gso_size = fz_u16(in);
    vh->csum_start = fz_u16(in);
    vh->csum_offset = fz_u16(in);
}

static void op_vnet_csum(struct fz_in *in)
{
    struct fl_vnet_hdr vh;
    read_vnet(in, &vh);
    const uint8_t *d;
    size_t n = fz_take(in, 70000, &d);
    if (fl_ip_check(d, (int)n, 1) != 0)
        return; /* tx_handle only finishes checked packets */
    uint8_t *p = fz_dup(d, n);
    int r = fl_vnet_finish_csum(p, (int)n, &vh);
    size_t start = vh.csum_start, at = start + vh.csum_offset;
    if (!(vh.flags & FL_VNET_F_NEEDS_CSUM)) {
        FZ_CHECK(r == 0 && memcmp(p, d, n) == 0, "no NEEDS_CSUM, yet changed");
    } else if (r != 0) {
        FZ_CHECK(at + 2 > n || start < (size_t)((d[0] & 15) * 4),
                 "refused a field inside the packet's L4 part");
        FZ_CHECK(memcmp(p, d, n) == 0, "refused, yet changed");
    } else {
        FZ_CHECK(at + 2 <= n, "wrote past the packet");
        FZ_CHECK(start >= (size_t)((d[0] & 15) * 4), "wrote inside the IP header");
        if (vh.csum_offset % 2 == 0) {
            uint16_t want = (uint16_t)~fz_ref_sum(d + start, n - start, 0);
            if (d[9] == 17 && want == 0)
                want = 0xffff;
            FZ_CHECK(fz_be16(p + at) == want, "checksum %#x, reference %#x", fz_be16(p + at), want);
        }
        FZ_CHECK(memcmp(p, d, at) == 0 && memcmp(p + at + 2, d + at + 2, n - at - 2) == 0,
                 "bytes other than the checksum changed");
    }
    free(p);
}

static uint8_t split_out[8 << 20];
static int split_lens[1 << 17];

static void op_split(struct fz_in *in)
{
    struct fl_vnet_hdr vh;
    read_vnet(in, &vh);
    const uint8_t *d;
    size_t n = fz_take(in, 65535, &d);
    uint8_t *frame = malloc(FL_VNET_HDR_LEN + n);
    memcpy(frame, &vh, FL_VNET_HDR_LEN);
    memcpy(frame + FL_VNET_HDR_LEN, d, n);
    int max = (int)(sizeof(split_lens) / sizeof(split_lens[0]));
    int k = fl_test_split(eng, frame, FL_VNET_HDR_LEN + (int)n, split_out, sizeof(split_out),
                          split_lens, max);
    free(frame);
    if (k <= 0)
        return;
    int gso = (vh.gso_type & ~FL_VNET_GSO_ECN) == FL_VNET_GSO_TCPV4;
    if (!gso)
        FZ_CHECK(k == 1, "%d packets from a GSO_NONE frame", k);
    size_t off = 0, payload = 0;
    int ihl = (d[0] & 15) * 4, hdr = gso ? ihl + (d[ihl + 12] >> 4) * 4 : 0;
    uint32_t seq = gso ? fz_be32(d + ihl + 4) : 0;
    /* A NEEDS_CSUM field may point into the IP header: the engine (like the kernel's own
     * virtio_net_hdr_to_skb) only bounds it by the packet's end, so those bytes may change. */
    int csum_in_hdr = !gso && (vh.flags & FL_VNET_F_NEEDS_CSUM) && vh.csum_start + vh.csum_offset < ihl;
    for (int i = 0; i < k; i++) {
        const uint8_t *q = split_out + off;
        int len = split_lens[i];
        FZ_CHECK(len <= MTU, "wire packet of %d bytes", len);
        FZ_CHECK(ref_ip_check(q, len, 1) == 0, "wire packet %d malformed", i);
        /* TSO headers are rebuilt; a single packet's checksum is updated, not checked */
        FZ_CHECK(gso ? hdr_valid(q) : csum_in_hdr || hdr_valid(q) == hdr_valid(d),
                 "wire packet %d checksum", i);
        FZ_CHECK(csum_in_hdr || memcmp(q + 12, d + 12, 8) == 0, "addresses changed");
        if (gso) {
            FZ_CHECK(q[9] == 6 && fz_be32(q + ihl + 4) == seq, "segment %d: seq", i);
            uint32_t s = fz_ref_sum(q + ihl, (size_t)(len - ihl), pseudo(q, 6, len - ihl));
            FZ_CHECK(s == 0xffff, "segment %d: TCP checksum", i);
            FZ_CHECK(memcmp(q + hdr, d + hdr + payload, (size_t)(len - hdr)) == 0, "payload moved");
            seq += (uint32_t)(len - hdr);
            payload += (size_t)(len - hdr);
        }
        off += (size_t)len;
    }
    if (gso && off < sizeof(split_out) - 65536 && k < max)
        FZ_CHECK(payload == n - (size_t)hdr, "payload %zu of %zu", payload, n - (size_t)hdr);
}

/* ---- coalescing ---- */

struct co_ctx {
    uint8_t *const *pkts;
    const int *lens;
    int n, next; /* the next input packet a frame must start with */
};

static int co_emit(void *ctx, struct iovec *iov, int n_iov, int total)
{
    struct co_ctx *c = ctx;
    FZ_CHECK(n_iov >= 2 && iov[0].iov_len == FL_VNET_HDR_LEN, "frame layout");
    struct fl_vnet_hdr vh;
    memcpy(&vh, iov[0].iov_base, FL_VNET_HDR_LEN);
    FZ_CHECK(c->next < c->n, "more frames than packets");
    if (vh.gso_type == FL_VNET_GSO_NONE) {
        FZ_CHECK(n_iov == 2 && (int)iov[1].iov_len == c->lens[c->next] &&
                     memcmp(iov[1].iov_base, c->pkts[c->next], iov[1].iov_len) == 0,
                 "a single frame is not packet %d as it came", c->next);
        FZ_CHECK(total == c->lens[c->next], "single frame total");
        c->next++;
        return 0;
    }
    FZ_CHECK(vh.gso_type == FL_VNET_GSO_TCPV4 && vh.flags == FL_VNET_F_NEEDS_CSUM &&
                 vh.csum_start == 20 && vh.csum_offset == 16,
             "merged frame's vnet header");
    const uint8_t *h = iov[1].iov_base;
    int hl = (int)iov[1].iov_len, segs = n_iov - 2, sum = hl;
    FZ_CHECK(segs >= 2 && vh.hdr_len == hl && hl >= 40, "merged frame of %d segments", segs);
    FZ_CHECK(h[0] == 0x45 && h[9] == 6 && hdr_valid(h), "merged IP header");
    for (int i = 0; i < segs; i++) {
        int m = c->next + i;
        FZ_CHECK(m < c->n, "frame runs past the input");
        const uint8_t *p = c->pkts[m];
        int ph = 20 + (p[32] >> 4) * 4, pl = c->lens[m] - ph;
        FZ_CHECK((int)iov[2 + i].iov_len == pl && memcmp(iov[2 + i].iov_base, p + ph, (size_t)pl) == 0,
                 "segment %d is not packet %d's payload", i, m);
        FZ_CHECK(pl <= vh.gso_size && (i == segs - 1 || pl == vh.gso_size), "segment sizes");
        FZ_CHECK(memcmp(p + 12, h + 12, 8) == 0, "segment of another flow");
        sum += pl;
    }
    FZ_CHECK(sum == total && total == fz_be16(h + 2) && total <= 65535, "merged length %d/%d", sum, total);
    c->next += segs;
    return 0;
}

/* Makes a packet that looks like IPv4/TCP consistent (lengths, checksums), so runs can merge. */
static void fix_tcp(uint8_t *p, int len)
{
    if (len < 40 || p[0] != 0x45 || p[9] != 6)
        return;
    p[2] = (uint8_t)(len >> 8);
    p[3] = (uint8_t)len;
    p[10] = p[11] = 0;
    uint16_t c = fz_ref_csum(p, 20);
    p[10] = (uint8_t)(c >> 8);
    p[11] = (uint8_t)c;
    p[36] = p[37] = 0;
    c = (uint16_t)~fz_ref_sum(p + 20, (size_t)len - 20, pseudo(p, 6, len - 20));
    p[36] = (uint8_t)(c >> 8);
    p[37] = (uint8_t)c;
}

static void op_coalesce(struct fz_in *in)
{
    int fix = fz_u8(in) & 1, n = fz_u8(in) % 129;
    uint8_t *pkts[128];
    int lens[128], k = 0;
    while (k < n && !in->end) {
        const uint8_t *d;
        size_t len = fz_take(in, fz_u16(in) % 1600, &d);
        pkts[k] = fz_dup(d, len);
        lens[k] = (int)len;
        if (fix)
            fix_tcp(pkts[k], lens[k]);
        k++;
    }
    uint8_t scratch[256];
    struct iovec iov[2 + 2 * 64 + 8]; /* the RX worker's iovec room */
    struct co_ctx ctx = {pkts, lens, k, 0};
    uint64_t frames = 0, segs = 0;
    int errors = fl_coalesce(pkts, lens, k, scratch, iov, (int)(sizeof(iov) / sizeof(iov[0])), co_emit,
                             &ctx, &frames, &segs);
    FZ_CHECK(errors == 0 && ctx.next == k, "%d of %d packets written", ctx.next, k);
    for (int i = 0; i < k; i++)
        free(pkts[i]);
}

static void op_icmp(struct fz_in *in)
{
    uint8_t type = fz_u8(in), code = fz_u8(in);
    uint16_t mtu = fz_u16(in);
    const uint8_t *d;
    size_t n = fz_take(in, 70000, &d);
    if (fl_ip_check(d, (int)n, 1) != 0)
        return; /* fl_tx_one only answers checked packets */
    uint8_t *p = fz_dup(d, n);
    uint8_t *out = malloc(ICMP_ROOM);
    int len = fl_make_icmp(&eng->test_worker, p, (int)n, type, code, mtu, out);
    if (len > 0) {
        check_icmp(out, len, d);
        FZ_CHECK(out[20] == type && out[21] == code, "type/code");
    }
    free(out);
    free(p);
}

/* ---- routes ---- */

static uint32_t mask_of(int len) { return len == 0 ? 0 : 0xffffffffU << (32 - len); }

static void op_routes(struct fz_in *in)
{
    int n = fz_u8(in) % 24;
    struct fl_route r[24];
    int bad = 0;
    for (int i = 0; i < n; i++) {
        r[i].net = fz_u32(in);
        r[i].len = fz_u8(in);
        if (r[i].len > 32 && (r[i].len & 0x80) == 0)
            r[i].len %= 33; /* mostly valid lengths, some invalid ones */
        r[i].next_hop = fz_u32(in);
        r[i].port = fz_u16(in);
        bad |= r[i].len > 32;
    }
    int got = fl_engine_set_routes(eng, r, n);
    if (bad) {
        FZ_CHECK(got < 0, "accepted a prefix longer than 32");
    } else {
        /* reference: distinct (masked net, len) pairs, the last duplicate wins */
        int distinct = 0;
        for (int i = 0; i < n; i++) {
            int later = 0;
            for (int j = i + 1; j < n; j++)
                later |= r[j].len == r[i].len && (r[j].net & mask_of(r[j].len)) == (r[i].net & mask_of(r[i].len));
            distinct += !later;
        }
        FZ_CHECK(got == distinct, "%d routes, reference %d", got, distinct);
        for (int probe = 0; probe < 32 && !in->end; probe++) {
            uint32_t dst = probe < n ? r[probe].net ^ fz_u8(in) : fz_u32(in);
            int best = -1;
            for (int i = 0; i < n; i++)
                if ((dst & mask_of(r[i].len)) == (r[i].net & mask_of(r[i].len)) &&
                    (best < 0 || r[i].len >= r[best].len))
                    best = i; /* >=: the later duplicate wins */
            uint32_t hop = 0;
            uint16_t port = 0;
            int found = fl_lookup(eng, dst, &hop, &port);
            FZ_CHECK(found == (best >= 0), "lookup %#x found=%d reference %d", dst, found, best);
            if (found)
                FZ_CHECK(hop == r[best].next_hop && port == r[best].port, "lookup %#x", dst);
        }
    }
    FZ_CHECK(fl_engine_set_routes(eng, base_routes, N_BASE) == N_BASE, "base routes");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    struct fz_in in = {data, size, 0, 0};
    switch (fz_u8(&in) % OPS) {
    case 0: op_checksum(&in); break;
    case 1: op_ip_check(&in); break;
    case 2: op_tx(&in); break;
    case 3: op_rx(&in); break;
    case 4: op_vnet_csum(&in); break;
    case 5: op_split(&in); break;
    case 6: op_coalesce(&in); break;
    case 7: op_icmp(&in); break;
    case 8: op_routes(&in); break;
    }
    return 0;
}
