/*
 * test_window.c — the window rule of DESIGN §3, with values worked out by
 * hand: default hops, floor buckets (negative times too), the inclusive
 * bucket range, and the edges of a window at aligned and unaligned `now`.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "tallyd/window.h"

#define S INT64_C(1000)
#define M (60 * S)
#define H (60 * M)
#define D (24 * H)

static void test_default_hops_match_design_table(void **state)
{
    (void)state;
    assert_int_equal(tly_window_default_hop(5 * M), 10 * S);
    assert_int_equal(tly_window_default_hop(1 * H), 1 * M);
    assert_int_equal(tly_window_default_hop(1 * D), 5 * M);
    assert_int_equal(tly_window_default_hop(7 * D), 1 * H);
    /* 30 days / 1d = 30 buckets: the largest hop that gives >= 30 */
    assert_int_equal(tly_window_default_hop(30 * D), 1 * D);
    /* 90m: 5m gives 18 < 30, 1m gives 90 */
    assert_int_equal(tly_window_default_hop(90 * M), 1 * M);
    /* under 30s nothing gives 30 buckets: 1s */
    assert_int_equal(tly_window_default_hop(10 * S), 1 * S);
    /* 45s: 1s is the only listed hop that divides and gives >= 30 */
    assert_int_equal(tly_window_default_hop(45 * S), 1 * S);
    /* 5m30s = 330s: 10s divides (33 buckets) */
    assert_int_equal(tly_window_default_hop(330 * S), 10 * S);
    /* 305s: 10s does not divide, 1s does */
    assert_int_equal(tly_window_default_hop(305 * S), 1 * S);
}

static void test_bucket_is_floor_division(void **state)
{
    (void)state;
    assert_int_equal(tly_window_bucket(0, 10 * S), 0);
    assert_int_equal(tly_window_bucket(9999, 10 * S), 0);
    assert_int_equal(tly_window_bucket(10000, 10 * S), 1);
    assert_int_equal(tly_window_bucket(-1, 10 * S), -1);
    assert_int_equal(tly_window_bucket(-10000, 10 * S), -1);
    assert_int_equal(tly_window_bucket(-10001, 10 * S), -2);
    assert_int_equal(tly_window_nbuckets(5 * M, 10 * S), 31);
    assert_int_equal(tly_window_nbuckets(7 * D, 1 * H), 169);
}

static void test_range_at_aligned_now_is_exactly_now_minus_w_to_now_plus_h(void **state)
{
    (void)state;
    int64_t now = 1700000000000; /* divisible by 10s */
    int64_t lo, hi;
    tly_window_range(now, 5 * M, 10 * S, &lo, &hi);
    assert_int_equal(hi, 170000000);
    assert_int_equal(lo, 170000000 - 30);
    /* first instant in the window: now - W; last: now + h - 1 */
    assert_true(tly_window_contains(now, 5 * M, 10 * S, now - 5 * M));
    assert_false(tly_window_contains(now, 5 * M, 10 * S, now - 5 * M - 1));
    assert_true(tly_window_contains(now, 5 * M, 10 * S, now + 10 * S - 1));
    assert_false(tly_window_contains(now, 5 * M, 10 * S, now + 10 * S));
    assert_int_equal(tly_window_start(now, 5 * M, 10 * S), now - 5 * M);
}

static void test_range_at_unaligned_now_starts_at_bucket_boundary(void **state)
{
    (void)state;
    int64_t now = 1700000000000 + 7 * S + 123; /* 7.123 s past a 10s boundary */
    int64_t base = 1700000000000;
    /* the window holds [base - 5m, base + 10s): 31 buckets */
    assert_true(tly_window_contains(now, 5 * M, 10 * S, base - 5 * M));
    assert_false(tly_window_contains(now, 5 * M, 10 * S, base - 5 * M - 1));
    assert_true(tly_window_contains(now, 5 * M, 10 * S, base + 10 * S - 1));
    assert_false(tly_window_contains(now, 5 * M, 10 * S, base + 10 * S));
    assert_int_equal(tly_window_start(now, 5 * M, 10 * S), base - 5 * M);
    /* one bucket outside either end */
    assert_false(tly_window_contains(now, 5 * M, 10 * S, base - 5 * M - 10 * S));
    assert_false(tly_window_contains(now, 5 * M, 10 * S, base + 20 * S - 1));
}

static void test_hop_override_changes_range(void **state)
{
    (void)state;
    int64_t now = 3 * H + 30 * M; /* 03:30 on day 0 */
    /* 1h window with a 30m hop: buckets [7 - 2, 7] = [02:30, 04:00) */
    int64_t lo, hi;
    tly_window_range(now, 1 * H, 30 * M, &lo, &hi);
    assert_int_equal(lo, 5);
    assert_int_equal(hi, 7);
    assert_true(tly_window_contains(now, 1 * H, 30 * M, 2 * H + 30 * M));
    assert_false(tly_window_contains(now, 1 * H, 30 * M, 2 * H + 30 * M - 1));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_hops_match_design_table),
        cmocka_unit_test(test_bucket_is_floor_division),
        cmocka_unit_test(test_range_at_aligned_now_is_exactly_now_minus_w_to_now_plus_h),
        cmocka_unit_test(test_range_at_unaligned_now_starts_at_bucket_boundary),
        cmocka_unit_test(test_hop_override_changes_range),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
