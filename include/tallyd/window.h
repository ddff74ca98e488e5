/*
 * window.h — the window rule of DESIGN §3 as pure functions of `now`.
 *
 * A window of length W has a hop h (h divides W). With b(t) = floor(t / h),
 * the window evaluated at `now` holds every event with b(t) in
 * [b(now) − W/h, b(now)]: W/h + 1 buckets. At a hop-aligned now that is
 * exactly the events in [now − W, now + h).
 *
 * Default hop: the largest of 1s, 10s, 1m, 5m, 1h, 1d that divides W and
 * gives W/h ≥ 30; 1s when none does (W under 30s). Windows and hops are whole
 * seconds (config enforces it), so bucket indexes of epoch-ms times fit in 32
 * bits until 2106.
 *
 * Pure: never reads a clock; any thread.
 */
#ifndef TALLYD_WINDOW_H
#define TALLYD_WINDOW_H

#include <stdbool.h>
#include <stdint.h>

#define TLY_MS_SECOND INT64_C(1000)
#define TLY_MS_MINUTE (60 * TLY_MS_SECOND)
#define TLY_MS_HOUR   (60 * TLY_MS_MINUTE)
#define TLY_MS_DAY    (24 * TLY_MS_HOUR)

/* Returns the default hop for a window of window_ms (> 0, whole seconds). */
int64_t tly_window_default_hop(int64_t window_ms);

/* Returns floor(t_ms / hop_ms) (floor, also for negative t). hop_ms > 0. */
static inline int64_t tly_window_bucket(int64_t t_ms, int64_t hop_ms)
{
    int64_t q = t_ms / hop_ms;
    if ((t_ms % hop_ms) != 0 && t_ms < 0)
        q--;
    return q;
}

/* Number of buckets a window spans: W/h + 1. */
int64_t tly_window_nbuckets(int64_t window_ms, int64_t hop_ms);

/* Writes the inclusive bucket range [*lo, *hi] of the window at now. */
void tly_window_range(int64_t now_ms, int64_t window_ms, int64_t hop_ms, int64_t *lo, int64_t *hi);

/* True when an event at t_ms is inside the window evaluated at now_ms. */
bool tly_window_contains(int64_t now_ms, int64_t window_ms, int64_t hop_ms, int64_t t_ms);

/* The earliest event time (ms) still inside the window at now_ms:
 * (b(now) − W/h) · h. */
int64_t tly_window_start(int64_t now_ms, int64_t window_ms, int64_t hop_ms);

#endif
