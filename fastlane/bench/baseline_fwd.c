/*
 * baseline_fwd: the "what flanneld's udp backend does" reference for `fastlane bench`.
 *
 * Why it exists: fastlane's udp backend must be judged against the design it replaces, on the
 * same machine and traffic. This forwarder follows flanneld's proxy_amd64.c design (facts from
 * the flannel reference note; no code copied): one thread, poll() on the TUN fd and the UDP
 * socket, ONE packet per syscall (read/sendto from TUN to UDP, recv/write from UDP to TUN),
 * and after each wake-up it alternates both directions until both return EAGAIN.
 * Wire format: the raw IPv4 packet is the whole UDP payload (port 8285 by default).
 * TTL is decremented with an incremental checksum update, as flanneld does.
 *
 * Usage: baseline_fwd TUN_NAME BIND_IP PORT SUBNET/LEN=PEER_IP [...]
 * The caller configures the TUN (address, MTU, up, overlay route), like flanneld's Go side.
 * Prints "ready" on stdout once the TUN and socket exist.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_ROUTES 256

struct route {
    uint32_t net, mask; /* network byte order */
    struct sockaddr_in peer;
};

static struct route routes[MAX_ROUTES];
static int n_routes;
static unsigned long drops_noroute, drops_bad, drops_ttl;

static int die(const char *what) {
    fprintf(stderr, "baseline_fwd: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_tun(const char *name) {
    struct ifreq ifr;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
    if (fd < 0) die("open /dev/net/tun");
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    return fd;
}

static void parse_route(const char *arg, uint16_t port) {
    char buf[128], *eq, *slash;
    struct in_addr net, peer;
    int len;
    if (n_routes == MAX_ROUTES || strlen(arg) >= sizeof buf) goto bad;
    strcpy(buf, arg);
    eq = strchr(buf, '=');
    slash = strchr(buf, '/');
    if (!eq || !slash || slash > eq) goto bad;
    *eq = 0;
    *slash = 0;
    len = atoi(slash + 1);
    if (len < 0 || len > 32 || !inet_aton(buf, &net) || !inet_aton(eq + 1, &peer)) goto bad;
    routes[n_routes].mask = len ? htonl(~0u << (32 - len)) : 0;
    routes[n_routes].net = net.s_addr & routes[n_routes].mask;
    routes[n_routes].peer.sin_family = AF_INET;
    routes[n_routes].peer.sin_port = htons(port);
    routes[n_routes].peer.sin_addr = peer;
    n_routes++;
    return;
bad:
    fprintf(stderr, "baseline_fwd: bad route %s (want SUBNET/LEN=PEER_IP)\n", arg);
    exit(2);
}

static struct route *lookup(uint32_t dst) {
    for (int i = 0; i < n_routes; i++)
        if ((dst & routes[i].mask) == routes[i].net) return &routes[i];
    return NULL;
}

/* RFC 1624 incremental update for TTL-1; returns 0 when the packet must be dropped. */
static int decrement_ttl(uint8_t *pkt, ssize_t n) {
    if (n < 20 || (pkt[0] >> 4) != 4) { drops_bad++; return 0; }
    if (pkt[8] <= 1) { drops_ttl++; return 0; }
    uint16_t old = (uint16_t)((pkt[8] << 8) | pkt[9]);
    pkt[8]--;
    uint16_t new = (uint16_t)((pkt[8] << 8) | pkt[9]);
    uint32_t sum = (uint16_t)~((pkt[10] << 8) | pkt[11]);
    sum += (uint16_t)~old;
    sum += new;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    sum = ~sum & 0xffff;
    pkt[10] = sum >> 8;
    pkt[11] = sum & 0xff;
    return 1;
}

/* One TUN packet -> one sendto. Returns 0 on EAGAIN. */
static int tun_to_udp(int tun, int sock, uint8_t *buf) {
    ssize_t n = read(tun, buf, BUF_SIZE);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        die("read tun");
    }
    if (!decrement_ttl(buf, n)) return 1;
    uint32_t dst;
    memcpy(&dst, buf + 16, 4);
    struct route *r = lookup(dst);
    if (!r) { drops_noroute++; return 1; }
    if (sendto(sock, buf, (size_t)n, 0, (struct sockaddr *)&r->peer, sizeof r->peer) < 0 &&
        errno != EAGAIN && errno != ENOBUFS && errno != ECONNREFUSED && errno != EHOSTUNREACH)
        die("sendto");
    return 1;
}

/* One datagram -> one TUN write. Returns 0 on EAGAIN. */
static int udp_to_tun(int sock, int tun, uint8_t *buf) {
    ssize_t n = recv(sock, buf, BUF_SIZE, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR || errno == ECONNREFUSED) return 0;
        die("recv");
    }
    if (!decrement_ttl(buf, n)) return 1;
    if (write(tun, buf, (size_t)n) < 0 && errno != EAGAIN && errno != EINVAL) die("write tun");
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: baseline_fwd TUN_NAME BIND_IP PORT SUBNET/LEN=PEER_IP ...\n");
        return 2;
    }
    int port = atoi(argv[3]);
    struct sockaddr_in bind_addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (port <= 0 || port > 65535 || !inet_aton(argv[2], &bind_addr.sin_addr)) {
        fprintf(stderr, "baseline_fwd: bad address %s:%s\n", argv[2], argv[3]);
        return 2;
    }
    for (int i = 4; i < argc; i++) parse_route(argv[i], (uint16_t)port);

    int tun = open_tun(argv[1]);
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (sock < 0) die("socket");
    if (bind(sock, (struct sockaddr *)&bind_addr, sizeof bind_addr) < 0) die("bind");
    uint8_t *buf = malloc(BUF_SIZE);
    if (!buf) die("malloc");
    printf("ready\n");
    fflush(stdout);

    struct pollfd fds[2] = {{.fd = tun, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        int more;
        do {
            more = tun_to_udp(tun, sock, buf);
            more |= udp_to_tun(sock, tun, buf);
        } while (more);
    }
}
