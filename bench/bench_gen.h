/*
 * bench_gen.h — the seeded random sources the benchmarks share: xoshiro256**
 * seeded through splitmix64 (the same seed gives the same stream on every
 * machine), Zipf(s) ranks by inverting the cumulative weights, and the
 * scattering of popularity ranks over ids. Header-only (static inline), so
 * each benchmark stays one translation unit.
 */
#ifndef TALLYD_BENCH_GEN_H
#define TALLYD_BENCH_GEN_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    uint64_t s[4];
} rng_t;

static inline uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static inline void rng_seed(rng_t *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t rng_next(rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* Uniform double in [0, 1). */
static inline double rng_unit(rng_t *r)
{
    return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

/* Uniform integer in [0, n). */
static inline uint64_t rng_below(rng_t *r, uint64_t n)
{
    return (uint64_t)(rng_unit(r) * (double)n);
}

/* Zipf(s) over ranks 0..n-1 by inverting the cumulative weights. */
typedef struct {
    uint64_t n;
    double *cdf;
} zipf_t;

static inline void zipf_init(zipf_t *z, uint64_t n, double s)
{
    z->n = n;
    z->cdf = malloc((n ? n : 1) * sizeof *z->cdf);
    if (z->cdf == NULL) {
        fputs("bench: out of memory\n", stderr);
        exit(1);
    }
    double acc = 0;
    for (uint64_t k = 0; k < n; k++) {
        acc += pow((double)(k + 1), -s);
        z->cdf[k] = acc;
    }
    for (uint64_t k = 0; k < n; k++)
        z->cdf[k] /= acc;
}

static inline uint64_t zipf_draw(const zipf_t *z, rng_t *r)
{
    double u = rng_unit(r);
    uint64_t lo = 0, hi = z->n - 1;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (z->cdf[mid] > u)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Maps a popularity rank to an id in 1..n: multiplying by a prime that does
 * not divide n permutes the ranks, so hot ids are scattered, not 1, 2, 3. */
static inline uint64_t rank_to_id(uint64_t rank, uint64_t n)
{
    return (rank * UINT64_C(2654435761)) % n + 1;
}

#endif
