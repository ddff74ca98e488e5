/*
 * test_demo.c — the demo generator (demo.c): reproducibility per seed, the
 * shape of the stream (the action funnel, Zipf-distributed users and pins,
 * id and dwell ranges) against expectations computed here from the
 * distributions' definitions, and that every event decodes under the demo's
 * own feature set (config/demo.yaml, read relative to the repository root,
 * where `make test` runs).
 *
 * Statistical checks allow five standard deviations of a binomial share
 * (sqrt(p(1 - p) / n)): a correct generator fails one of them about once in
 * a million runs, and the seed is fixed anyway.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <inttypes.h>
#include <math.h>

#include "tallyd/config.h"
#include "tallyd/decode.h"
#include "tallyd/demo.h"
#include "tallyd/feature.h"

#define DEMO_CONFIG "config/demo.yaml"
#define T0          INT64_C(1764300000000)
#define USERS       100000u
#define PINS        1000000u
#define ZIPF_S      1.0 /* the exponent demo.c documents for users and pins */

static const char *const actions[] = {"impression", "closeup", "click", "save", "hide"};
static const double action_share[] = {0.80, 0.10, 0.06, 0.03, 0.01};
/* dwell_ms bounds (inclusive) by action, as demo.c documents them. */
static const int64_t dwell_min[] = {0, 2000, 1000, 500, 0};
static const int64_t dwell_max[] = {3000, 60000, 30000, 10000, 2000};

typedef struct {
    uint64_t user, pin;
    int action; /* index in actions[] */
    int64_t dwell, ts;
} parsed_t;

/* Parses one event in the exact shape demo.h promises, or fails the test. */
static parsed_t parse_event(const char *json, size_t len)
{
    parsed_t p;
    char action[16];
    int used = 0;
    unsigned long long user, pin;
    long long dwell, ts;
    int n = sscanf(json,
                   "{\"user_id\":%llu,\"pin_id\":%llu,\"action\":\"%15[a-z]\",\"dwell_ms\":%lld,"
                   "\"ts\":%lld}%n",
                   &user, &pin, action, &dwell, &ts, &used);
    if (n != 5 || (size_t)used != len || strlen(json) != len)
        fail_msg("event not in the documented shape: %s", json);
    p.user = user;
    p.pin = pin;
    p.dwell = dwell;
    p.ts = ts;
    p.action = -1;
    for (int a = 0; a < 5; a++)
        if (strcmp(action, actions[a]) == 0)
            p.action = a;
    if (p.action < 0)
        fail_msg("unknown action in %s", json);
    return p;
}

/* Generalised harmonic number sum_{k=1..n} k^-s, summed smallest first. */
static double harmonic(uint64_t n, double s)
{
    double h = 0;
    for (uint64_t k = n; k >= 1; k--)
        h += pow((double)k, -s);
    return h;
}

static void assert_share(const char *what, uint64_t count, uint64_t n, double p)
{
    double got = (double)count / (double)n;
    double tol = 5.0 * sqrt(p * (1.0 - p) / (double)n);
    if (fabs(got - p) > tol)
        fail_msg("%s: share %.5f, expected %.5f ± %.5f", what, got, p, tol);
}

static void test_same_seed_gives_identical_stream(void **state)
{
    (void)state;
    tly_demo_gen_t *a = tly_demo_gen_new(42, USERS, PINS);
    tly_demo_gen_t *b = tly_demo_gen_new(42, USERS, PINS);
    char ba[192], bb[192];
    for (int i = 0; i < 10000; i++) {
        uint64_t ua, ub;
        size_t la = tly_demo_gen_next(a, T0 + i, ba, sizeof ba, &ua);
        size_t lb = tly_demo_gen_next(b, T0 + i, bb, sizeof bb, &ub);
        assert_int_equal(la, lb);
        assert_memory_equal(ba, bb, la + 1);
        assert_int_equal(ua, ub);
        assert_int_equal(parse_event(ba, la).user, ua);
    }
    tly_demo_gen_free(a);
    tly_demo_gen_free(b);
}

static void test_different_seed_gives_different_stream(void **state)
{
    (void)state;
    tly_demo_gen_t *a = tly_demo_gen_new(42, USERS, PINS);
    tly_demo_gen_t *b = tly_demo_gen_new(43, USERS, PINS);
    char ba[192], bb[192];
    int differ = 0;
    for (int i = 0; i < 1000; i++) {
        uint64_t ua, ub;
        size_t la = tly_demo_gen_next(a, T0, ba, sizeof ba, &ua);
        size_t lb = tly_demo_gen_next(b, T0, bb, sizeof bb, &ub);
        differ += la != lb || memcmp(ba, bb, la) != 0;
    }
    /* Two events of independent streams coincide only when user, pin,
     * action and dwell all do: a few per mille at most. */
    assert_true(differ >= 990);
    tly_demo_gen_free(a);
    tly_demo_gen_free(b);
}

static void test_stream_follows_funnel_and_zipf(void **state)
{
    (void)state;
    enum { N = 200000 };
    tly_demo_gen_t *gen = tly_demo_gen_new(7, USERS, PINS);
    uint64_t nact[5] = {0}, user_k[11] = {0}, pin_k[11] = {0}, user_tail = 0, pin_tail = 0;
    char buf[192];
    for (int i = 0; i < N; i++) {
        uint64_t uid;
        size_t len = tly_demo_gen_next(gen, T0 + i, buf, sizeof buf, &uid);
        parsed_t p = parse_event(buf, len);
        assert_int_equal(p.user, uid);
        assert_int_equal(p.ts, T0 + i);
        if (p.user < 1 || p.user > USERS || p.pin < 1 || p.pin > PINS)
            fail_msg("id out of range: %s", buf);
        if (p.dwell < dwell_min[p.action] || p.dwell > dwell_max[p.action])
            fail_msg("dwell out of its action's range: %s", buf);
        nact[p.action]++;
        if (p.user <= 10)
            user_k[p.user]++;
        if (p.pin <= 10)
            pin_k[p.pin]++;
        user_tail += p.user > 1000;
        pin_tail += p.pin > 1000;
    }
    tly_demo_gen_free(gen);

    for (int a = 0; a < 5; a++)
        assert_share(actions[a], nact[a], N, action_share[a]);

    /* Zipf pmf: P(k) = k^-s / H(n, s); the tail P(k > 1000) = 1 - H(1000) / H(n). */
    double hu = harmonic(USERS, ZIPF_S), hp = harmonic(PINS, ZIPF_S);
    const uint64_t ranks[] = {1, 2, 10};
    for (size_t i = 0; i < 3; i++) {
        uint64_t k = ranks[i];
        char what[32];
        snprintf(what, sizeof what, "user %" PRIu64, k);
        assert_share(what, user_k[k], N, pow((double)k, -ZIPF_S) / hu);
        snprintf(what, sizeof what, "pin %" PRIu64, k);
        assert_share(what, pin_k[k], N, pow((double)k, -ZIPF_S) / hp);
    }
    assert_share("users beyond rank 1000", user_tail, N, 1.0 - harmonic(1000, ZIPF_S) / hu);
    assert_share("pins beyond rank 1000", pin_tail, N, 1.0 - harmonic(1000, ZIPF_S) / hp);
}

static void test_single_user_and_pin_populations(void **state)
{
    (void)state;
    tly_demo_gen_t *gen = tly_demo_gen_new(1, 1, 1);
    char buf[192];
    for (int i = 0; i < 1000; i++) {
        uint64_t uid;
        size_t len = tly_demo_gen_next(gen, T0, buf, sizeof buf, &uid);
        parsed_t p = parse_event(buf, len);
        assert_int_equal(p.user, 1);
        assert_int_equal(p.pin, 1);
        assert_int_equal(uid, 1);
    }
    tly_demo_gen_free(gen);
}

static void test_every_event_decodes_under_the_demo_featset(void **state)
{
    (void)state;
    char err[512] = "";
    tly_config_t *cfg = NULL;
    tly_featset_t *fs = NULL;
    if (tly_config_load(DEMO_CONFIG, &cfg, err, sizeof err) != TLY_OK)
        fail_msg("%s (run from the repository root)", err);
    if (tly_featset_compile(cfg, &fs, err, sizeof err) != TLY_OK)
        fail_msg("%s", err);
    tly_decoder_t *dec = tly_decoder_new(fs);
    int f_user = tly_featset_field(fs, "user_id", 7), f_pin = tly_featset_field(fs, "pin_id", 6),
        f_action = tly_featset_field(fs, "action", 6),
        f_dwell = tly_featset_field(fs, "dwell_ms", 8);
    assert_true(f_user >= 0 && f_pin >= 0 && f_action >= 0 && f_dwell >= 0);

    tly_demo_gen_t *gen = tly_demo_gen_new((uint64_t)cfg->demo.seed, (uint64_t)cfg->demo.users,
                                           (uint64_t)cfg->demo.pins);
    char buf[192];
    tly_event_t ev;
    for (int i = 0; i < 10000; i++) {
        uint64_t uid;
        size_t len = tly_demo_gen_next(gen, T0 + i, buf, sizeof buf, &uid);
        parsed_t p = parse_event(buf, len);
        tly_err_t e = tly_decode_json(dec, buf, len, -1, &ev);
        if (e != TLY_OK)
            fail_msg("%s: %s", buf, tly_err_name(e));
        assert_int_equal(ev.time_ms, T0 + i);
        assert_int_equal(ev.vals[f_user].type, TLY_V_INT);
        assert_int_equal(ev.vals[f_user].u.i, (int64_t)p.user);
        assert_int_equal(ev.vals[f_pin].type, TLY_V_INT);
        assert_int_equal(ev.vals[f_pin].u.i, (int64_t)p.pin);
        assert_int_equal(ev.vals[f_dwell].type, TLY_V_INT);
        assert_int_equal(ev.vals[f_dwell].u.i, p.dwell);
        assert_int_equal(ev.vals[f_action].type, TLY_V_STR);
        assert_int_equal(ev.vals[f_action].len, strlen(actions[p.action]));
        assert_memory_equal(ev.vals[f_action].u.s, actions[p.action], ev.vals[f_action].len);
    }
    tly_demo_gen_free(gen);
    tly_decoder_free(dec);
    tly_featset_free(fs);
    tly_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_seed_gives_identical_stream),
        cmocka_unit_test(test_different_seed_gives_different_stream),
        cmocka_unit_test(test_stream_follows_funnel_and_zipf),
        cmocka_unit_test(test_single_user_and_pin_populations),
        cmocka_unit_test(test_every_event_decodes_under_the_demo_featset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
