/*
 * test_agg.c — the aggregation kernels: each kind over a handful of cells,
 * with results worked out by hand, int→double promotion, overflow, empty
 * windows, and name parsing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "tallyd/agg.h"

static tly_value_t vi(int64_t i)
{
    return (tly_value_t){.type = TLY_V_INT, .u.i = i};
}

static tly_value_t vd(double d)
{
    return (tly_value_t){.type = TLY_V_DOUBLE, .u.d = d};
}

/* Folds values into two buckets (split at `split`), merges both, returns
 * the result. */
static tly_value_t run(tly_agg_kind_t kind, const tly_value_t *vals, int n, int split)
{
    tly_cell_t b1 = TLY_CELL_INIT, b2 = TLY_CELL_INIT, acc = TLY_CELL_INIT;
    for (int i = 0; i < n; i++)
        tly_agg_cell_add(kind, i < split ? &b1 : &b2, &vals[i]);
    tly_agg_cell_merge(kind, &acc, &b1);
    tly_agg_cell_merge(kind, &acc, &b2);
    return tly_agg_result(kind, &acc);
}

static void test_count_ignores_values(void **state)
{
    (void)state;
    tly_value_t v[] = {vi(5), vd(2.5), {.type = TLY_V_NIL}};
    tly_value_t r = run(TLY_AGG_COUNT, v, 3, 1);
    assert_int_equal(r.type, TLY_V_INT);
    assert_int_equal(r.u.i, 3);
}

static void test_int_sum_stays_int(void **state)
{
    (void)state;
    tly_value_t v[] = {vi(5), vi(-2), vi(100)};
    tly_value_t r = run(TLY_AGG_SUM, v, 3, 2);
    assert_int_equal(r.type, TLY_V_INT);
    assert_int_equal(r.u.i, 103);
}

static void test_sum_with_a_double_becomes_double(void **state)
{
    (void)state;
    tly_value_t v[] = {vi(5), vd(0.25), vi(1)};
    tly_value_t r = run(TLY_AGG_SUM, v, 3, 1);
    assert_int_equal(r.type, TLY_V_DOUBLE);
    assert_true(r.u.d == 6.25);
}

static void test_sum_overflow_promotes_to_double(void **state)
{
    (void)state;
    tly_value_t v[] = {vi(INT64_MAX), vi(INT64_MAX)};
    tly_value_t r = run(TLY_AGG_SUM, v, 2, 1);
    assert_int_equal(r.type, TLY_V_DOUBLE);
    assert_true(r.u.d == 2.0 * (double)INT64_MAX);
}

static void test_min_max_mix_int_and_double(void **state)
{
    (void)state;
    tly_value_t v[] = {vi(7), vd(-1.5), vi(3), vd(9.75)};
    tly_value_t mn = run(TLY_AGG_MIN, v, 4, 2);
    tly_value_t mx = run(TLY_AGG_MAX, v, 4, 2);
    assert_int_equal(mn.type, TLY_V_DOUBLE);
    assert_true(mn.u.d == -1.5);
    assert_int_equal(mx.type, TLY_V_DOUBLE);
    assert_true(mx.u.d == 9.75);
    tly_value_t w[] = {vi(7), vi(-4), vi(3)};
    mn = run(TLY_AGG_MIN, w, 3, 1);
    mx = run(TLY_AGG_MAX, w, 3, 1);
    assert_int_equal(mn.type, TLY_V_INT);
    assert_int_equal(mn.u.i, -4);
    assert_int_equal(mx.type, TLY_V_INT);
    assert_int_equal(mx.u.i, 7);
}

/* Past 2^53 an int64 and a double are compared as the numbers they are,
 * not after the int is rounded to a double: 2^53 + 1 rounds to 2^53, so
 * the double 2^53 looked as small as it (min kept 2^53 + 1) and the int
 * 2^53 + 1 no larger than it (max kept 2^53), whichever came first. */
static void test_min_max_compare_int_and_double_exactly_past_2_53(void **state)
{
    (void)state;
    const int64_t big = INT64_C(9007199254740993); /* 2^53 + 1 */
    const double d = 9007199254740992.0;           /* 2^53 */
    tly_value_t v[] = {vi(big), vd(d)};
    tly_value_t w[] = {vd(d), vi(big)};
    for (int split = 0; split <= 2; split++) {
        tly_value_t mn = run(TLY_AGG_MIN, v, 2, split);
        assert_int_equal(mn.type, TLY_V_DOUBLE);
        assert_true(mn.u.d == d);
        mn = run(TLY_AGG_MIN, w, 2, split);
        assert_int_equal(mn.type, TLY_V_DOUBLE);
        assert_true(mn.u.d == d);
        tly_value_t mx = run(TLY_AGG_MAX, v, 2, split);
        assert_int_equal(mx.type, TLY_V_INT);
        assert_int_equal(mx.u.i, big);
        mx = run(TLY_AGG_MAX, w, 2, split);
        assert_int_equal(mx.type, TLY_V_INT);
        assert_int_equal(mx.u.i, big);
    }
    /* at the ends of int64: 2^63 (a double) is above INT64_MAX, whose
     * double rounds to 2^63; -2^63 is INT64_MIN exactly (a tie keeps the
     * first); a fraction decides against the int it truncates to */
    tly_value_t e[] = {vi(INT64_MAX), vd(9223372036854775808.0), vi(INT64_MIN),
                       vd(-9223372036854775808.0)};
    tly_value_t mx = run(TLY_AGG_MAX, e, 4, 2);
    assert_int_equal(mx.type, TLY_V_DOUBLE);
    assert_true(mx.u.d == 9223372036854775808.0);
    tly_value_t mn = run(TLY_AGG_MIN, e, 4, 2);
    assert_int_equal(mn.type, TLY_V_INT);
    assert_int_equal(mn.u.i, INT64_MIN);
    tly_value_t f[] = {vi(-3), vd(-3.5), vi(4), vd(4.25)};
    mn = run(TLY_AGG_MIN, f, 4, 1);
    assert_int_equal(mn.type, TLY_V_DOUBLE);
    assert_true(mn.u.d == -3.5);
    mx = run(TLY_AGG_MAX, f, 4, 3);
    assert_int_equal(mx.type, TLY_V_DOUBLE);
    assert_true(mx.u.d == 4.25);
}

static void test_avg_is_total_over_count(void **state)
{
    (void)state;
    tly_value_t v[] = {vi(1), vi(2), vi(4)};
    tly_value_t r = run(TLY_AGG_AVG, v, 3, 1);
    assert_int_equal(r.type, TLY_V_DOUBLE);
    assert_true(r.u.d == 7.0 / 3.0);
}

static void test_empty_window_results(void **state)
{
    (void)state;
    tly_cell_t e = TLY_CELL_INIT;
    tly_value_t r = tly_agg_result(TLY_AGG_COUNT, &e);
    assert_int_equal(r.type, TLY_V_INT);
    assert_int_equal(r.u.i, 0);
    r = tly_agg_result(TLY_AGG_SUM, &e);
    assert_int_equal(r.type, TLY_V_INT);
    assert_int_equal(r.u.i, 0);
    assert_int_equal(tly_agg_result(TLY_AGG_MIN, &e).type, TLY_V_NIL);
    assert_int_equal(tly_agg_result(TLY_AGG_MAX, &e).type, TLY_V_NIL);
    assert_int_equal(tly_agg_result(TLY_AGG_AVG, &e).type, TLY_V_NIL);
}

static void test_count_saturates(void **state)
{
    (void)state;
    tly_cell_t c = {UINT32_MAX - 1, 0, 0}, acc = {UINT32_MAX - 1, 0, 0};
    tly_value_t v = vi(1);
    tly_agg_cell_add(TLY_AGG_COUNT, &c, &v);
    tly_agg_cell_add(TLY_AGG_COUNT, &c, &v);
    assert_int_equal(c.n, UINT32_MAX);
    tly_agg_cell_merge(TLY_AGG_COUNT, &acc, &c);
    assert_int_equal(acc.n, UINT32_MAX);
}

static void test_names_round_trip(void **state)
{
    (void)state;
    const char *names[] = {"count", "sum", "min", "max", "avg", "last", "last_k"};
    for (int i = 0; i < TLY_AGG__COUNT; i++) {
        tly_agg_kind_t k;
        assert_int_equal(tly_agg_parse(names[i], &k), TLY_OK);
        assert_int_equal(k, i);
        assert_string_equal(tly_agg_name(k), names[i]);
    }
    tly_agg_kind_t k = TLY_AGG_SUM;
    assert_int_equal(tly_agg_parse("median", &k), TLY_E_INVAL);
    assert_int_equal(k, TLY_AGG_SUM); /* untouched on error */
    assert_true(tly_agg_windowed(TLY_AGG_AVG));
    assert_false(tly_agg_windowed(TLY_AGG_LAST));
    assert_true(tly_agg_numeric(TLY_AGG_MIN));
    assert_false(tly_agg_numeric(TLY_AGG_COUNT));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_count_ignores_values),
        cmocka_unit_test(test_int_sum_stays_int),
        cmocka_unit_test(test_sum_with_a_double_becomes_double),
        cmocka_unit_test(test_sum_overflow_promotes_to_double),
        cmocka_unit_test(test_min_max_mix_int_and_double),
        cmocka_unit_test(test_min_max_compare_int_and_double_exactly_past_2_53),
        cmocka_unit_test(test_avg_is_total_over_count),
        cmocka_unit_test(test_empty_window_results),
        cmocka_unit_test(test_count_saturates),
        cmocka_unit_test(test_names_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
