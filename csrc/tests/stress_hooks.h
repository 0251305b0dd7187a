/* Force-included (clang -include) into engine.c when it is built for csrc/tests/stress.c, and
 * into nothing else. It only renames two calls, so engine.c itself stays untouched:
 *
 * - ioctl: the stress program's "TUN" is one end of an AF_UNIX datagram socketpair. Its ioctl
 *   answers TUNGETIFF with IFF_VNET_HDR and accepts TUNSETVNETHDRSZ/TUNSETOFFLOAD, so the engine
 *   takes its vnet_hdr/TSO path (64 KiB frames split into thousands of datagrams per round).
 *   A plain socketpair fd would only give the no-vnet path (at most 64 datagrams per round).
 * - sendmmsg: on loopback a UDP send never returns EAGAIN (loopback_xmit orphans the skb, so the
 *   socket's send buffer empties inside the syscall), so the wrapper injects EAGAIN/ENOBUFS and
 *   short sends around the real sendmmsg. That is the path where tx_flush goes offline (QSBR).
 * - poll: sometimes reports the socket readable but not writable while the TX side waits for
 *   room, so the combined worker serves RX rounds in the middle of a flush.
 *
 * No system header may be included here: engine.c defines _GNU_SOURCE before its own includes.
 */
#define ioctl fl_stress_ioctl
#define sendmmsg fl_stress_sendmmsg
#define poll fl_stress_poll
