/* Shared by the libFuzzer harnesses: an input reader and reference arithmetic.
 *
 * A harness reads its input as a stream of small fields. Reading past the end yields zeros and
 * sets `end`, so every input is valid and a harness stops when end is set.
 */
#ifndef FASTLANE_FUZZ_COMMON_H
#define FASTLANE_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fz_in {
    const uint8_t *p;
    size_t n, off;
    int end;
};

static inline uint8_t fz_u8(struct fz_in *in)
{
    if (in->off >= in->n) {
        in->end = 1;
        return 0;
    }
    return in->p[in->off++];
}

static inline uint16_t fz_u16(struct fz_in *in) /* big endian, as the corpus script writes */
{
    uint16_t hi = fz_u8(in);
    return (uint16_t)(hi << 8 | fz_u8(in));
}

static inline uint32_t fz_u32(struct fz_in *in)
{
    uint32_t hi = fz_u16(in);
    return hi << 16 | fz_u16(in);
}

/* Up to want bytes (fewer at the end of the input); returns the count, *out points into it. */
static inline size_t fz_take(struct fz_in *in, size_t want, const uint8_t **out)
{
    size_t left = in->n - in->off;
    if (want > left) {
        want = left;
        in->end = 1;
    }
    *out = in->p + in->off;
    in->off += want;
    return want;
}

/* A heap copy of exactly len bytes, so ASan sees any read past the end. */
static inline uint8_t *fz_dup(const uint8_t *p, size_t len)
{
    uint8_t *d = malloc(len ? len : 1);
    if (!d)
        abort();
    if (len)
        memcpy(d, p, len);
    return d;
}

/* RFC 1071 reference: big-endian 16-bit words, one's complement sum, not folded to ~. */
static inline uint32_t fz_ref_sum(const uint8_t *p, size_t len, uint32_t sum)
{
    uint64_t s = sum;
    for (size_t i = 0; i + 1 < len; i += 2)
        s += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        s += (uint32_t)p[len - 1] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

static inline uint16_t fz_ref_csum(const uint8_t *p, size_t len)
{
    return (uint16_t)~fz_ref_sum(p, len, 0);
}

static inline uint16_t fz_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t fz_be32(const uint8_t *p) { return (uint32_t)fz_be16(p) << 16 | fz_be16(p + 2); }

/* A property failed: say which and crash, so libFuzzer keeps the input. */
#define FZ_CHECK(cond, ...)                                                                        \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz check failed at %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
