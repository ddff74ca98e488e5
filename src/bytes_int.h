/*
 * bytes_int.h — equality of short byte strings without a memcmp call, for
 * the per-event paths (decode's shapes, `where` texts, interned strings):
 * a call costs more than the compare for the few bytes these hold.
 */
#ifndef TALLYD_BYTES_INT_H
#define TALLYD_BYTES_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

/* Whether a[0..n) equals b[0..n). Reads only those bytes of each: up to 16
 * by two overlapping loads of four or eight bytes (little-endian hosts,
 * unless built with TLY_PORTABLE; the result is the same on any host).
 * The eight- and four-byte cases are written out each with its own type:
 * one helper for both widths (zero-extended into 64 bits) cost decode
 * about 50 instructions an event more on the ingest benchmark. */
static inline bool tly_bytes_eq(const char *a, const char *b, size_t n)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && !defined(TLY_PORTABLE)
    if (n >= 8 && n <= 16) {
        uint64_t a0, a1, b0, b1;
        memcpy(&a0, a, 8);
        memcpy(&b0, b, 8);
        memcpy(&a1, a + n - 8, 8);
        memcpy(&b1, b + n - 8, 8);
        return ((a0 ^ b0) | (a1 ^ b1)) == 0;
    }
    if (n >= 4 && n < 8) {
        uint32_t a0, a1, b0, b1;
        memcpy(&a0, a, 4);
        memcpy(&b0, b, 4);
        memcpy(&a1, a + n - 4, 4);
        memcpy(&b1, b + n - 4, 4);
        return ((a0 ^ b0) | (a1 ^ b1)) == 0;
    }
    if (n < 4) {
        for (size_t i = 0; i < n; i++)
            if (a[i] != b[i])
                return false;
        return true;
    }
#endif
    return memcmp(a, b, n) == 0;
}

#endif
