/* The whole C boundary as cffi sees it (no preprocessor lines here).
 * Addresses are host-order uint32 (Python's int(IPv4Address)); ports host order. */

#define FL_MAX_QUEUES 16

struct fl_route {
    uint32_t net;
    uint8_t len;
    uint32_t next_hop;
    uint16_t port;
};

struct fl_config {
    int tun_fds[FL_MAX_QUEUES]; /* one fd per TUN queue (IFF_MULTI_QUEUE when more than one) */
    int n_tun;           /* 0 = no I/O (pure packet functions only, for tests) */
    int udp_fd;
    int mtu;             /* overlay MTU (TUN MTU) */
    uint32_t tun_addr;   /* source of the ICMP errors we write into the TUN */
    int check_source;    /* the receive source checks (0 turns all three off, for NAT):
                            the datagram's source is a next hop of the table, it comes from
                            that peer's port, and an inner source inside the Network lies in a
                            subnet routed to that same peer */
    uint32_t network;    /* the flannel Network (host order) for the inner source check */
    int network_len;     /* its prefix length; 0 = unknown, no inner source check */
    int offload;         /* try UDP GSO/GRO and, on a vnet_hdr TUN, TSO */
    int icmp_rate;       /* ICMP errors per second per worker (0 = 100) */
    int icmp_burst;      /* bucket size (0 = icmp_rate) */
    int rx_thread;       /* 1 = a thread of its own for UDP -> TUN; 0 = queue 0's worker does both */
};

struct fl_features {
    int vnet_hdr;        /* the TUN fds carry virtio_net_hdr */
    int tso;             /* TUNSETOFFLOAD(CSUM|TSO4) accepted: 64 KiB frames from the TUN */
    int gso;             /* UDP_SEGMENT on send */
    int gro;             /* UDP_GRO on receive */
    int coalesce;        /* TCP segments merged into GSO frames written to the TUN */
    int multiqueue;      /* more than one TUN queue, one worker each */
    int queues;
    int steer;           /* flows pinned to queues by a hash (eBPF), not by the kernel's learning */
};

struct fl_engine;

struct fl_engine *fl_engine_new(const struct fl_config *cfg, char *err, int errlen);
int fl_engine_set_routes(struct fl_engine *e, const struct fl_route *r, int n);
int fl_engine_start(struct fl_engine *e);
void fl_engine_stop(struct fl_engine *e);
void fl_engine_free(struct fl_engine *e);
void fl_engine_features(struct fl_engine *e, struct fl_features *out);

int fl_counter_count(void);
const char *fl_counter_name(int i);
void fl_engine_counters(struct fl_engine *e, uint64_t *out, int n);
