/*
 * window.c — bucket and window arithmetic (see window.h for the rule).
 * Pure; any thread.
 */
#include "tallyd/window.h"

static const int64_t default_hops[] = {
    TLY_MS_DAY, TLY_MS_HOUR, 5 * TLY_MS_MINUTE, TLY_MS_MINUTE, 10 * TLY_MS_SECOND, TLY_MS_SECOND,
};

int64_t tly_window_default_hop(int64_t window_ms)
{
    for (unsigned i = 0; i < sizeof default_hops / sizeof default_hops[0]; i++) {
        int64_t h = default_hops[i];
        if (window_ms % h == 0 && window_ms / h >= 30)
            return h;
    }
    return TLY_MS_SECOND;
}

int64_t tly_window_nbuckets(int64_t window_ms, int64_t hop_ms)
{
    return window_ms / hop_ms + 1;
}

void tly_window_range(int64_t now_ms, int64_t window_ms, int64_t hop_ms, int64_t *lo, int64_t *hi)
{
    int64_t b = tly_window_bucket(now_ms, hop_ms);
    *hi = b;
    *lo = b - window_ms / hop_ms;
}

bool tly_window_contains(int64_t now_ms, int64_t window_ms, int64_t hop_ms, int64_t t_ms)
{
    int64_t lo, hi, b = tly_window_bucket(t_ms, hop_ms);
    tly_window_range(now_ms, window_ms, hop_ms, &lo, &hi);
    return b >= lo && b <= hi;
}

int64_t tly_window_start(int64_t now_ms, int64_t window_ms, int64_t hop_ms)
{
    int64_t lo, hi;
    tly_window_range(now_ms, window_ms, hop_ms, &lo, &hi);
    return lo * hop_ms;
}
