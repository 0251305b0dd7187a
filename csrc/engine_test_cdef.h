/* The test entry points, cffi's view: built only into the tests' module (tests/_engine_test,
 * from the same sources plus csrc/testapi.c), never into fastlane._engine. They run the
 * workers' own per-packet code on one engine's test worker, with no I/O.
 * Read after engine_cdef.h (no preprocessor lines here). */

int fl_lookup(struct fl_engine *e, uint32_t dst, uint32_t *next_hop, uint16_t *port);
/* Encap side: pkt is modified in place (TTL). Returns 0 = forward to *next_hop:*port,
 * else a counter index (a drop reason); *icmp_len > 0 when an ICMP error was produced into icmp. */
int fl_tx_packet(struct fl_engine *e, uint8_t *pkt, int len, uint32_t *next_hop, uint16_t *port,
                 uint8_t *icmp, int *icmp_len);
/* Decap side: 0 = write to the TUN, else a counter index (drop reason). */
int fl_rx_packet(struct fl_engine *e, const uint8_t *pkt, int len, uint32_t src,
                 uint16_t src_port);
/* TSO split as the TX worker does it, for tests: frame = virtio_net_hdr + packet.
 * Writes the wire packets back to back into out; returns their count (or -reason). */
int fl_test_split(struct fl_engine *e, const uint8_t *frame, int len, uint8_t *out, int cap,
                  int *lens, int max);
/* RX coalescing as the RX worker does it, for tests: pkts back to back (lens[i]); writes the
 * frames the TUN would get (virtio_net_hdr + packet each) into out; returns their count. */
int fl_test_coalesce(const uint8_t *pkts, const int *lens, int n, uint8_t *out, int cap,
                     int *out_lens, int max);
uint16_t fl_checksum(const uint8_t *p, int len);
/* Flow steering of a multi-queue TUN (tun_batch.c), for the steering test: 0 or -errno. */
int fl_tun_steer(int tun_fd);
