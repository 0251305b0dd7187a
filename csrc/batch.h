/* The batch layers between the worker loops (engine.c) and their two kinds of file descriptor.
 *
 * Why: the workers should only decide what happens to a packet (route, TTL, ICMP, checks);
 * how packets cross the TUN (virtio_net_hdr, TSO super-frames, coalescing into GSO frames)
 * and the socket (UDP GSO runs, GRO buffers, full send buffers, GSO failures) is each fd's
 * business. So a worker reads frames from the TUN layer and hands them to the socket layer,
 * or takes packets from the socket layer and hands them to the TUN layer, and never branches
 * on an offload itself.
 *
 * tun_batch.c: TUN reads -> frames; packets -> TUN writes (coalesced on a vnet_hdr TUN).
 * udp_batch.c: frames -> UDP datagrams (TSO segments, GSO runs, bounded waits);
 *              recvmmsg -> packets (GRO buffers split).
 */
#ifndef FASTLANE_BATCH_H
#define FASTLANE_BATCH_H

#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/socket.h>

#include "engine.h"

/* UDP GSO/GRO socket options (linux/udp.h), for C libraries whose headers predate them */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

#define FL_SLOT_SIZE (65536 + 64) /* one TUN read or one (GRO) datagram */
#define FL_GSO_MAX_SEGS 64        /* kernel limit (UDP_MAX_SEGMENTS) */

/* ---- TUN side ---- */

/* One TUN read, normalized: a plain IPv4 packet whose checksums are complete (gso_size 0), or
 * a TCP super-frame of one flow to be cut into gso_size-byte segments behind copies of its
 * hdr_len-byte IPv4+TCP header (TSO). */
struct fl_frame {
    uint8_t *pkt;
    int len;
    int hdr_len;
    uint16_t gso_size;
};

/* The size of the largest wire packet the frame becomes (what the MTU check compares). */
static inline int fl_frame_wire_len(const struct fl_frame *f)
{
    return f->gso_size ? f->hdr_len + f->gso_size : f->len;
}

/* Parses one TUN read (led by a virtio_net_hdr when vnet): 0, or the drop reason. */
int fl_frame_parse(int vnet, uint8_t *buf, int n, struct fl_frame *f);

/* Packets to the TUN. Held (pointers, no copy) until flush or until full, then written: on a
 * vnet_hdr TUN with coalescing, runs of one TCP flow as one GSO_TCPV4 frame, everything else
 * one write per packet. */
#define FL_TUNW_PKTS (64 * FL_GSO_MAX_SEGS)
struct fl_tun_writer {
    int fd, vnet, coalesce;
    int n;
    uint8_t *pkts[FL_TUNW_PKTS];
    int lens[FL_TUNW_PKTS];
    uint8_t scratch[256];
    struct iovec wiov[2 + 2 * FL_GSO_MAX_SEGS + 8];
};
void fl_tunw_init(struct fl_tun_writer *tw, int fd, int vnet, int coalesce);
void fl_tunw_add(struct fl_worker *w, struct fl_tun_writer *tw, uint8_t *pkt, int len);
void fl_tunw_flush(struct fl_worker *w, struct fl_tun_writer *tw);
/* One packet written at once (ICMP errors back to the sender). */
void fl_tun_write_one(struct fl_worker *w, int fd, int vnet, const uint8_t *pkt, int len);
/* Pins each flow to one queue of a multi-queue TUN by a fixed hash (an eBPF steering program),
 * instead of the kernel's learned steering. 0, or -errno (the kernel's steering stays). */
int fl_tun_steer(int tun_fd);

/* ---- socket side, out ---- */

struct fl_dgram {
    uint32_t hop;
    uint16_t port;
    int len;
    int iov0, n_iov;
};

/* Waits for room in the send buffer (the worker decides how; see engine.c). Returns 0 to try
 * again, -1 to give up (stopping). */
typedef int (*fl_wait_room_fn)(struct fl_worker *w, int timeout_ms);

/* Datagrams queued for one sendmmsg batch. Each holds iovecs into the frames it came from (and
 * a rebuilt header in hdrs for a TSO segment): the frames must live until the flush. */
#define FL_OUT_MAX 4096 /* datagrams queued before a flush */
#define FL_MMSG_MAX 1024
struct fl_udp_out {
    int fd;
    fl_wait_room_fn wait_room;
    uint8_t *hdrs; /* FL_OUT_MAX * FL_SEG_HDR_MAX */
    struct iovec *iov; /* 2 * FL_OUT_MAX */
    struct fl_dgram *out;
    int n_out, n_iov;
    struct mmsghdr *msgs;
    struct sockaddr_in *addrs;
    uint8_t *cmsgs;
    int *msg_ndg;
    int seg_len[FL_GSO_MAX_SEGS];
};
struct fl_udp_out *fl_udpo_new(int fd, fl_wait_room_fn wait_room);
void fl_udpo_free(struct fl_udp_out *o);
/* Queues a frame for hop:port as datagrams (a TSO frame as its segments), flushing first when
 * the queue is full. Returns 0, or the drop reason for a frame that cannot be cut. */
int fl_udpo_add(struct fl_worker *w, struct fl_udp_out *o, uint32_t hop, uint16_t port,
                const struct fl_frame *f);
/* Sends everything queued: one sendmmsg per FL_MMSG_MAX messages, runs of same-size datagrams
 * to one peer as one UDP GSO message while GSO works; a full send buffer is waited out for a
 * bounded time, then the rest is dropped and counted. */
void fl_udpo_flush(struct fl_worker *w, struct fl_udp_out *o);
/* Forgets what is queued without sending it. */
void fl_udpo_reset(struct fl_udp_out *o);
/* Whether UDP GSO is in use now (off while paused after a failed GSO send). */
int fl_gso_enabled(struct fl_engine *e);

/* One TUN read through the TX path (engine.c): parse, verdict (route, TTL, MTU), then to the
 * socket layer's queue. Returns 0 or the drop reason; *icmp_len > 0 when an ICMP error (in
 * icmp, 128 bytes) is to go back to the sender. The TX round and the test entry point both
 * run exactly this. */
int fl_tx_frame(struct fl_worker *w, struct fl_udp_out *out, int vnet, uint8_t *buf, int n,
                uint8_t *icmp, int *icmp_len);

/* ---- socket side, in ---- */

#define FL_RX_MSGS 64
struct fl_udp_in {
    uint8_t *slots; /* FL_RX_MSGS * FL_SLOT_SIZE */
    struct mmsghdr msgs[FL_RX_MSGS];
    struct iovec iov[FL_RX_MSGS];
    struct sockaddr_in addrs[FL_RX_MSGS];
    uint8_t cmsgs[FL_RX_MSGS][CMSG_SPACE(sizeof(int))];
    int r;            /* datagrams of the last receive */
    int msg, off, seg; /* the iterator's place: datagram, offset, segment size */
};
struct fl_udp_in *fl_udpi_new(void);
void fl_udpi_free(struct fl_udp_in *in);
/* One recvmmsg of up to vlen datagrams; returns how many. A socket error that is not a pending
 * SO_ERROR sets *failed. */
int fl_udpi_recv(struct fl_worker *w, struct fl_udp_in *in, int fd, int vlen, int *failed);
/* The next packet of the last receive (GRO buffers split by their segment size): 1 with the
 * packet and its sender, 0 at the end. Truncated and empty datagrams are counted and skipped. */
int fl_udpi_next(struct fl_worker *w, struct fl_udp_in *in, uint8_t **pkt, int *len,
                 uint32_t *src, uint16_t *sport);

#endif
