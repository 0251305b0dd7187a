/* The socket side of the batch layers (batch.h): frames out as datagrams, datagrams in as
 * packets.
 *
 * Out: a TSO frame is cut here into MTU-sized segments, each a rebuilt header (in an arena) and
 * a slice of the frame (no payload copy). A flush groups consecutive datagrams to one peer into
 * one sendmmsg batch, runs of same-size datagrams into one UDP GSO message (at most 64 segments,
 * 65507 bytes, only the last one shorter). On the wire every datagram is still one plain IPv4
 * packet: GSO only lets one syscall carry many.
 *
 * In: one recvmmsg; a UDP GRO buffer is split back into its datagrams by the UDP_GRO cmsg's
 * segment size, lazily, so a batch's size never depends on how small the segments are.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/udp.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"

#define GSO_MAX_BYTES 65507
#define CMSG_GSO_SPACE CMSG_SPACE(sizeof(uint16_t))
/* A full socket send buffer is waited out in slices, for at most FLUSH_WAIT_MAX_MS per flush;
 * what is still queued then is dropped (counted drop_tx_socket_full), as a full NIC queue
 * drops. Bounded so neither the other direction nor a stop waits behind a saturated egress. */
#define FLUSH_WAIT_SLICE_MS 5
#define FLUSH_WAIT_MAX_MS 100
/* After a failed UDP GSO send, GSO is off for GSO_RETRY_FIRST_MS, then tried again; each
 * further failure doubles the pause up to GSO_RETRY_MAX_MS, a success resets it. */
#define GSO_RETRY_FIRST_MS 1000
#define GSO_RETRY_MAX_MS 60000

/* ---- UDP GSO: in use, paused, re-tried ---- */

int fl_gso_enabled(struct fl_engine *e)
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

/* ---- out ---- */

void fl_udpo_free(struct fl_udp_out *o)
{
    if (!o)
        return;
    free(o->hdrs);
    free(o->iov);
    free(o->out);
    free(o->msgs);
    free(o->addrs);
    free(o->cmsgs);
    free(o->msg_ndg);
    free(o);
}

struct fl_udp_out *fl_udpo_new(int fd, fl_wait_room_fn wait_room)
{
    struct fl_udp_out *o = calloc(1, sizeof(*o));
    if (!o)
        return NULL;
    o->fd = fd;
    o->wait_room = wait_room;
    o->hdrs = malloc((size_t)FL_OUT_MAX * FL_SEG_HDR_MAX);
    o->iov = malloc(sizeof(struct iovec) * 2 * FL_OUT_MAX);
    o->out = malloc(sizeof(struct fl_dgram) * FL_OUT_MAX);
    o->msgs = calloc(FL_MMSG_MAX, sizeof(struct mmsghdr));
    o->addrs = calloc(FL_MMSG_MAX, sizeof(struct sockaddr_in));
    o->cmsgs = calloc(FL_MMSG_MAX, CMSG_GSO_SPACE);
    o->msg_ndg = calloc(FL_MMSG_MAX, sizeof(int));
    if (!o->hdrs || !o->iov || !o->out || !o->msgs || !o->addrs || !o->cmsgs || !o->msg_ndg) {
        fl_udpo_free(o);
        return NULL;
    }
    return o;
}

void fl_udpo_reset(struct fl_udp_out *o) { o->n_out = o->n_iov = 0; }

static void queue(struct fl_udp_out *o, uint32_t hop, uint16_t port, int len, int n_iov)
{
    struct fl_dgram *d = &o->out[o->n_out++];
    d->hop = hop;
    d->port = port;
    d->len = len;
    d->iov0 = o->n_iov;
    d->n_iov = n_iov;
    o->n_iov += n_iov;
}

int fl_udpo_add(struct fl_worker *w, struct fl_udp_out *o, uint32_t hop, uint16_t port,
                const struct fl_frame *f)
{
    if (!f->gso_size) {
        if (o->n_out >= FL_OUT_MAX)
            fl_udpo_flush(w, o);
        o->iov[o->n_iov] = (struct iovec){f->pkt, (size_t)f->len};
        queue(o, hop, port, f->len, 1);
        return 0;
    }
    fl_cnt(w, C_TX_TSO_FRAMES, 1);
    int payload = f->len - f->hdr_len;
    int nseg = payload == 0 ? 1 : (payload + f->gso_size - 1) / f->gso_size;
    for (int first = 0; first < nseg;) {
        int room = FL_OUT_MAX - o->n_out;
        if (room > FL_GSO_MAX_SEGS)
            room = FL_GSO_MAX_SEGS;
        if (room <= 0) {
            fl_udpo_flush(w, o);
            continue;
        }
        uint8_t *hdrs = o->hdrs + (size_t)o->n_out * FL_SEG_HDR_MAX;
        int k = fl_tso_split(f->pkt, f->len, f->gso_size, first, room, hdrs, &o->iov[o->n_iov],
                             o->seg_len);
        if (k < 0)
            return -k;
        if (k == 0)
            break;
        for (int i = 0; i < k; i++)
            queue(o, hop, port, o->seg_len[i], 2);
        fl_cnt(w, C_TX_TSO_SEGMENTS, (uint64_t)k);
        first += k;
    }
    return 0;
}

/* Builds up to FL_MMSG_MAX messages from o->out[pos..]; returns the message count. */
static int build(struct fl_udp_out *o, int pos, int use_gso)
{
    int nm = 0;
    while (pos < o->n_out && nm < FL_MMSG_MAX) {
        struct fl_dgram *d = &o->out[pos];
        int k = 1, total = d->len, n_iov = d->n_iov;
        if (use_gso) {
            while (pos + k < o->n_out && k < FL_GSO_MAX_SEGS) {
                struct fl_dgram *x = &o->out[pos + k];
                if (x->hop != d->hop || x->port != d->port || x->len > d->len ||
                    total + x->len > GSO_MAX_BYTES || o->out[pos + k - 1].len != d->len)
                    break;
                total += x->len;
                n_iov += x->n_iov;
                k++;
            }
        }
        struct mmsghdr *m = &o->msgs[nm];
        struct sockaddr_in *a = &o->addrs[nm];
        memset(m, 0, sizeof(*m));
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(d->hop);
        a->sin_port = htons(d->port);
        m->msg_hdr.msg_name = a;
        m->msg_hdr.msg_namelen = sizeof(*a);
        m->msg_hdr.msg_iov = &o->iov[d->iov0];
        m->msg_hdr.msg_iovlen = (size_t)n_iov;
        if (k > 1) {
            uint8_t *cb = o->cmsgs + (size_t)nm * CMSG_GSO_SPACE;
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
        o->msg_ndg[nm] = k;
        nm++;
        pos += k;
    }
    return nm;
}

static void count_sent(struct fl_worker *w, struct fl_udp_out *o, int pos, int k)
{
    uint64_t bytes = 0;
    for (int i = 0; i < k; i++)
        bytes += (uint64_t)o->out[pos + i].len;
    fl_cnt(w, C_TX_PACKETS, (uint64_t)k);
    fl_cnt(w, C_TX_BYTES, bytes);
    fl_cnt(w, C_TX_MSGS, 1);
    if (k > 1)
        fl_cnt(w, C_TX_GSO_MSGS, 1);
}

void fl_udpo_flush(struct fl_worker *w, struct fl_udp_out *o)
{
    struct fl_engine *e = w->e;
    int pos = 0;
    uint64_t deadline = 0; /* set at the first EAGAIN: the flush's whole wait budget */
    while (pos < o->n_out) {
        int use_gso = fl_gso_enabled(e);
        int nm = build(o, pos, use_gso);
        int done = 0;
        while (done < nm) {
            int r = sendmmsg(o->fd, o->msgs + done, (unsigned)(nm - done), MSG_DONTWAIT);
            fl_cnt(w, C_TX_SENDMMSG, 1);
            if (r > 0) {
                for (int i = 0; i < r; i++) {
                    count_sent(w, o, pos, o->msg_ndg[done + i]);
                    pos += o->msg_ndg[done + i];
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
                if (now < deadline && !fl_stopping(e)) {
                    fl_cnt(w, C_TX_EAGAIN_WAITS, 1);
                    int left = (int)((deadline - now) / 1000000ULL) + 1;
                    int slice = left < FLUSH_WAIT_SLICE_MS ? left : FLUSH_WAIT_SLICE_MS;
                    if (o->wait_room(w, slice) == 0)
                        continue;
                }
                /* out of budget, or stopping: the rest of the batch is dropped, and counted */
                fl_cnt(w, D_TX_SOCKET_FULL, (uint64_t)(o->n_out - pos));
                pos = o->n_out;
                break;
            }
            if ((err == EIO || err == EINVAL) && o->msg_ndg[done] > 1) {
                /* the egress cannot do UDP GSO now: send this batch's rest without it */
                gso_failed(e);
                fl_cnt(w, C_TX_GSO_FALLBACKS, 1); /* the daemon logs counter changes */
                break;
            }
            /* this message cannot go (unreachable, EPERM, EMSGSIZE...): drop it, go on */
            fl_cnt(w, D_TX_SEND_ERROR, (uint64_t)o->msg_ndg[done]);
            pos += o->msg_ndg[done];
            done++;
        }
    }
    fl_udpo_reset(o);
}

/* ---- in ---- */

struct fl_udp_in *fl_udpi_new(void)
{
    struct fl_udp_in *in = calloc(1, sizeof(*in));
    if (!in)
        return NULL;
    in->slots = malloc((size_t)FL_RX_MSGS * FL_SLOT_SIZE);
    if (!in->slots) {
        free(in);
        return NULL;
    }
    for (int i = 0; i < FL_RX_MSGS; i++) {
        in->iov[i].iov_base = in->slots + (size_t)i * FL_SLOT_SIZE;
        in->iov[i].iov_len = FL_SLOT_SIZE;
    }
    return in;
}

void fl_udpi_free(struct fl_udp_in *in)
{
    if (!in)
        return;
    free(in->slots);
    free(in);
}

int fl_udpi_recv(struct fl_worker *w, struct fl_udp_in *in, int fd, int vlen, int *failed)
{
    in->r = in->msg = in->off = in->seg = 0;
    if (vlen > FL_RX_MSGS)
        vlen = FL_RX_MSGS;
    for (int i = 0; i < vlen; i++) {
        struct msghdr *h = &in->msgs[i].msg_hdr;
        h->msg_name = &in->addrs[i];
        h->msg_namelen = sizeof(in->addrs[i]);
        h->msg_iov = &in->iov[i];
        h->msg_iovlen = 1;
        h->msg_control = in->cmsgs[i];
        h->msg_controllen = sizeof(in->cmsgs[i]);
        h->msg_flags = 0;
    }
    int r = recvmmsg(fd, in->msgs, (unsigned)vlen, MSG_DONTWAIT, NULL);
    if (r < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            /* a pending socket error (e.g. from an ICMP): reading it clears it */
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || !soerr)
                *failed = 1;
        }
        return 0;
    }
    fl_cnt(w, C_RX_BATCHES, 1);
    fl_cnt(w, C_RX_BATCH_MSGS, (uint64_t)r);
    in->r = r;
    return r;
}

/* Starts datagram in->msg: its segment size, or -1 when it is to be skipped (counted). */
static int start_msg(struct fl_worker *w, struct fl_udp_in *in)
{
    struct msghdr *h = &in->msgs[in->msg].msg_hdr;
    int len = (int)in->msgs[in->msg].msg_len;
    if (h->msg_flags & MSG_TRUNC) {
        fl_cnt(w, D_RX_TRUNCATED, 1);
        return -1;
    }
    if (len == 0) {
        fl_cnt(w, D_RX_MALFORMED, 1);
        return -1;
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
    return seg;
}

int fl_udpi_next(struct fl_worker *w, struct fl_udp_in *in, uint8_t **pkt, int *len,
                 uint32_t *src, uint16_t *sport)
{
    while (in->msg < in->r) {
        if (in->seg == 0) {
            int seg = start_msg(w, in);
            if (seg < 0) {
                in->msg++;
                continue;
            }
            in->seg = seg;
            in->off = 0;
        }
        int total = (int)in->msgs[in->msg].msg_len;
        if (in->off >= total) {
            in->msg++;
            in->seg = 0;
            continue;
        }
        int l = total - in->off < in->seg ? total - in->off : in->seg;
        *pkt = (uint8_t *)in->iov[in->msg].iov_base + in->off;
        *len = l;
        *src = ntohl(in->addrs[in->msg].sin_addr.s_addr);
        *sport = ntohs(in->addrs[in->msg].sin_port);
        in->off += l;
        return 1;
    }
    return 0;
}
