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
