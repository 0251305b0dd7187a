/* The TUN side of the batch layers (batch.h): what a read means, and how packets are written.
 *
 * With IFF_VNET_HDR every read starts with a virtio_net_hdr: GSO_NONE packets may carry only
 * the pseudo-header sum in their L4 checksum (NEEDS_CSUM) and are completed here, since the
 * wire and an old flanneld peer need complete packets; GSO_TCPV4 frames (TSO) are checked as
 * a template here and cut into segments by the socket layer. Writes go back the same way:
 * with coalescing on, runs of TCP segments of one flow become one GSO_TCPV4 frame.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "batch.h"

int fl_frame_parse(int vnet, uint8_t *buf, int n, struct fl_frame *f)
{
    struct fl_vnet_hdr vh = {0};
    f->pkt = buf;
    f->len = n;
    f->hdr_len = 0;
    f->gso_size = 0;
    if (vnet) {
        if (n < FL_VNET_HDR_LEN)
            return D_TX_BAD_VNET;
        memcpy(&vh, buf, FL_VNET_HDR_LEN);
        f->pkt += FL_VNET_HDR_LEN;
        f->len -= FL_VNET_HDR_LEN;
    }
    int gso = vh.gso_type & ~FL_VNET_GSO_ECN;
    if (gso == FL_VNET_GSO_NONE) {
        /* only a checked packet's checksum is finished; the verdict reports the rest */
        if (fl_ip_check(f->pkt, f->len, 1) == 0 && fl_vnet_finish_csum(f->pkt, f->len, &vh) < 0)
            return D_TX_BAD_VNET;
        return 0;
    }
    if (gso != FL_VNET_GSO_TCPV4)
        return D_TX_BAD_VNET;
    int hdr = fl_tso_hdr_len(f->pkt, f->len, vh.gso_size);
    if (hdr < 0)
        return -hdr;
    f->hdr_len = hdr;
    f->gso_size = vh.gso_size;
    return 0;
}

void fl_tun_write_one(struct fl_worker *w, int fd, int vnet, const uint8_t *pkt, int len)
{
    if (fd < 0 || len <= 0)
        return;
    uint8_t vh[FL_VNET_HDR_LEN] = {0}; /* GSO_NONE, checksums complete */
    struct iovec iov[2] = {{vh, FL_VNET_HDR_LEN}, {(void *)pkt, (size_t)len}};
    if (writev(fd, iov + !vnet, 2 - !vnet) < 0)
        fl_cnt(w, D_RX_TUN_WRITE_ERROR, 1);
}

void fl_tunw_init(struct fl_tun_writer *tw, int fd, int vnet, int coalesce)
{
    tw->fd = fd;
    tw->vnet = vnet;
    tw->coalesce = coalesce && vnet;
    tw->n = 0;
}

struct emit_ctx {
    struct fl_worker *w;
    int fd;
};

static int emit(void *ctx, struct iovec *iov, int n_iov, int total)
{
    struct emit_ctx *c = ctx;
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

void fl_tunw_flush(struct fl_worker *w, struct fl_tun_writer *tw)
{
    int n = tw->n;
    tw->n = 0;
    if (!n)
        return;
    struct emit_ctx ctx = {w, tw->fd};
    if (tw->coalesce) {
        uint64_t frames = 0, segs = 0;
        fl_coalesce(tw->pkts, tw->lens, n, tw->scratch, tw->wiov,
                    (int)(sizeof(tw->wiov) / sizeof(tw->wiov[0])), emit, &ctx, &frames, &segs);
        fl_cnt(w, C_RX_COALESCED_FRAMES, frames);
        fl_cnt(w, C_RX_COALESCED_SEGMENTS, segs);
        return;
    }
    uint8_t vh[FL_VNET_HDR_LEN] = {0};
    for (int i = 0; i < n; i++) {
        struct iovec iov[2] = {{vh, FL_VNET_HDR_LEN}, {tw->pkts[i], (size_t)tw->lens[i]}};
        emit(&ctx, iov + !tw->vnet, 2 - !tw->vnet, tw->lens[i]);
    }
}

void fl_tunw_add(struct fl_worker *w, struct fl_tun_writer *tw, uint8_t *pkt, int len)
{
    if (tw->n == FL_TUNW_PKTS)
        fl_tunw_flush(w, tw); /* e.g. GRO buffers of tiny segments: write what is held */
    tw->pkts[tw->n] = pkt;
    tw->lens[tw->n] = len;
    tw->n++;
}

/* ---- queue steering ----
 *
 * Why: on a multi-queue TUN the kernel's automatic steering (tun_automq) sends a flow to the
 * queue its packets were last *written* on. Every decapsulated packet is written on queue 0 (the
 * RX path), so the ACKs of each TCP flow pull its data onto queue 0 and the other queues'
 * workers idle. A steering program (TUNSETSTEERINGEBPF) replaces that learned table with a fixed
 * hash of the addresses and, for unfragmented TCP and UDP, the ports: each flow stays on one
 * queue (no reordering) and flows spread over the workers. The program is a socket filter the
 * kernel runs per packet; its result modulo the number of queues is the queue.
 */
#include <linux/bpf.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

#define INSN(c, d, s, o, i) ((struct bpf_insn){.code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i)})
#define LD_ABS(size, off) INSN(BPF_LD | BPF_ABS | (size), 0, 0, 0, off)
#define LD_IND(size, reg, off) INSN(BPF_LD | BPF_IND | (size), 0, reg, 0, off)
#define ALU32_IMM(op, d, i) INSN(BPF_ALU | BPF_K | (op), d, 0, 0, i)
#define ALU32_REG(op, d, s) INSN(BPF_ALU | BPF_X | (op), d, s, 0, 0)
#define JEQ_IMM(d, i, o) INSN(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, i)
#define JNE_IMM(d, i, o) INSN(BPF_JMP | BPF_JNE | BPF_K, d, 0, o, i)
#define JA(o) INSN(BPF_JMP | BPF_JA, 0, 0, o, 0)

/* r6 = the packet (LD_ABS/LD_IND read it, in network order turned into host order);
 * r7 = hash; r8 = IP header length. A load past the end ends the program with 0 (queue 0). */
static const struct bpf_insn steer_prog[] = {
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0), /* r6 = ctx */
    LD_ABS(BPF_B, 0),                               /* version/IHL */
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 8, 0, 0, 0),
    ALU32_IMM(BPF_AND, 8, 0x0f),
    ALU32_IMM(BPF_LSH, 8, 2),                       /* r8 = IHL * 4 */
    LD_ABS(BPF_W, 12),                              /* source address */
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 7, 0, 0, 0),
    LD_ABS(BPF_W, 16),                              /* destination address */
    ALU32_REG(BPF_XOR, 7, 0),
    LD_ABS(BPF_H, 6),                               /* flags + fragment offset */
    ALU32_IMM(BPF_AND, 0, 0x3fff),
    JNE_IMM(0, 0, 8),                               /* a fragment: all of them by addresses */
    LD_ABS(BPF_B, 9),                               /* protocol */
    JEQ_IMM(0, 6, 1),
    JNE_IMM(0, 17, 5),                              /* neither TCP nor UDP: mix */
    LD_IND(BPF_W, 8, 0),                            /* source port << 16 | destination port */
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 1, 0, 0, 0),
    ALU32_IMM(BPF_RSH, 1, 16),
    ALU32_REG(BPF_XOR, 0, 1),
    ALU32_REG(BPF_XOR, 7, 0),
    /* mix: the kernel takes the result modulo the queue count, so use the product's high bits */
    ALU32_IMM(BPF_MUL, 7, (int32_t)0x9e3779b1u),
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 0, 7, 0, 0),
    ALU32_IMM(BPF_RSH, 0, 16),
    INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
};

int fl_tun_steer(int tun_fd)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insn_cnt = sizeof(steer_prog) / sizeof(steer_prog[0]);
    attr.insns = (uint64_t)(uintptr_t)steer_prog;
    attr.license = (uint64_t)(uintptr_t) "GPL";
    int prog = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    if (prog < 0)
        return -errno;
    int r = ioctl(tun_fd, TUNSETSTEERINGEBPF, &prog) < 0 ? -errno : 0;
    close(prog); /* the device holds its own reference */
    return r;
}
