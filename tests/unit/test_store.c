/*
 * test_store.c — the entity store on small, hand-computed cases: window
 * edges at aligned and unaligned `now`, out-of-order and late and future
 * events, unknown ids, last/last_k ordering and limits, all-or-nothing
 * rejection, expiry and memory accounting, snapshot dump and load, and a
 * short concurrent run (the part ThreadSanitizer checks in `make test`);
 * and a replay of fuzz_store_load's corpus (tests/fuzz/corpus/store_load/,
 * read relative to the repository root) through the fuzz target's checks.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "corpus.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/config.h"
#include "tallyd/feature.h"
#include "tallyd/rcu.h"
#include "tallyd/store.h"

#include "store_int.h" /* store_read_hook */

/* The fuzz target's checks, failing the test instead of aborting. */
#define TLY_FUZZ_STORE_LOAD_NO_ENTRY
#define STORE_LOAD_CHECK_FAIL(what) fail_msg("fuzz check: %s", what)
#include "../fuzz/fuzz_store_load.c"

#define CORPUS_DIR "tests/fuzz/corpus/store_load"

#define SEC  INT64_C(1000)
#define MIN  (60 * SEC)
#define HOUR (60 * MIN)
#define DAY  (24 * HOUR)
/* A time aligned to every default hop (a whole day in epoch ms). */
#define T (INT64_C(19675) * DAY)

/* What both configs of these tests share before their features. */
#define YAML_HEAD                                                                                  \
    "events:\n"                                                                                    \
    "  time: { field: ts, unit: ms }\n"                                                            \
    "  max_future_skew: 1m\n"                                                                      \
    "  max_string: 16\n"                                                                           \
    "store:\n"                                                                                     \
    "  idle_ttl: 1d\n"                                                                             \
    "features:\n"

static const char *yaml = YAML_HEAD
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
    " windows: [5m, 1h] }\n"
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h] }\n"
    "  - { name: dmin, entity: user, key: user_id, agg: min, value: dwell_ms, windows: [1h] }\n"
    "  - { name: dmax, entity: user, key: user_id, agg: max, value: dwell_ms, windows: [1h] }\n"
    "  - { name: davg, entity: user, key: user_id, agg: avg, value: dwell_ms, windows: [1h] }\n"
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 3, value: [pin_id, action] }\n"
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
    " agg: count, windows: [1h] }\n";

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_store_t *store;
    int f_user, f_pin, f_action, f_dwell, f_ts;
    uint32_t user, pin;
} fx_t;

/* A last_k long enough for items to move several places. */
static const char *yaml_k20 = YAML_HEAD "  - { name: recent, entity: user, key: user_id, agg: "
                                        "last_k, k: 20, value: [pin_id, action] }\n";

static int setup_yaml(void **state, const char *text)
{
    fx_t *fx = calloc(1, sizeof *fx);
    char err[256];
    if (tly_config_load_string(text, "store.yaml", &fx->cfg, err, sizeof err) != TLY_OK ||
        tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    fx->f_user = tly_featset_field(fx->fs, "user_id", 7);
    fx->f_pin = tly_featset_field(fx->fs, "pin_id", 6);
    fx->f_action = tly_featset_field(fx->fs, "action", 6);
    fx->f_dwell = tly_featset_field(fx->fs, "dwell_ms", 8);
    fx->f_ts = tly_featset_field(fx->fs, "ts", 2);
    fx->user = (uint32_t)tly_featset_entity(fx->fs, "user", 4);
    fx->pin = (uint32_t)tly_featset_entity(fx->fs, "pin", 3);
    fx->store = tly_store_new(fx->fs);
    *state = fx;
    return 0;
}

static int setup(void **state)
{
    return setup_yaml(state, yaml);
}

static int setup_k20(void **state)
{
    return setup_yaml(state, yaml_k20);
}

/* last_k items holding a bool. */
static const char *yaml_flags = YAML_HEAD "  - { name: flags, entity: user, key: user_id, agg: "
                                          "last_k, k: 100, value: [flag, action] }\n";

static int setup_flags(void **state)
{
    return setup_yaml(state, yaml_flags);
}

static int teardown(void **state)
{
    fx_t *fx = *state;
    store_read_hook = NULL; /* a failed test may leave it set */
    store_read_hook_ctx = NULL;
    tly_store_free(fx->store);
    tly_featset_free(fx->fs);
    tly_config_free(fx->cfg);
    free(fx);
    return 0;
}

/* An event: user (int), pin (string or NULL), action, dwell (< 0: absent). */
static tly_event_t ev(const fx_t *fx, int64_t t, int64_t user, const char *pin, const char *action,
                      int64_t dwell)
{
    tly_event_t e;
    memset(&e, 0, sizeof e);
    e.nfields = (uint32_t)fx->fs->nfields;
    e.time_ms = t;
    e.vals[fx->f_ts] = (tly_value_t){.type = TLY_V_INT, .u.i = t};
    if (user >= 0)
        e.vals[fx->f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = user};
    if (pin)
        e.vals[fx->f_pin] =
            (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(pin), .u.s = pin};
    if (action)
        e.vals[fx->f_action] =
            (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(action), .u.s = action};
    if (dwell >= 0)
        e.vals[fx->f_dwell] = (tly_value_t){.type = TLY_V_INT, .u.i = dwell};
    return e;
}

static tly_err_t put(fx_t *fx, int64_t now, int64_t t, int64_t user, const char *pin,
                     const char *action, int64_t dwell)
{
    tly_event_t e = ev(fx, t, user, pin, action, dwell);
    return tly_store_apply(fx->store, &e, 0, 0, now);
}

/* Reads feature `name`, window w, of user/pin id at now. */
static tly_value_t get(fx_t *fx, uint32_t entity, const char *id, const char *name, uint32_t w,
                       int64_t now)
{
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, entity, name, strlen(name), &feat, &win), TLY_OK);
    tly_featwin_t req = {feat, w};
    tly_value_t out;
    static char sbuf[256];
    assert_int_equal(tly_store_read(fx->store, entity, id, strlen(id), &req, 1, now, &out, NULL,
                                    sbuf, sizeof sbuf),
                     TLY_OK);
    return out;
}

static int64_t count(fx_t *fx, const char *id, const char *name, uint32_t w, int64_t now)
{
    tly_value_t v = get(fx, fx->user, id, name, w, now);
    assert_int_equal(v.type, TLY_V_INT);
    return v.u.i;
}

static void test_window_edges_at_aligned_now(void **state)
{
    fx_t *fx = *state;
    /* clicks:5m at T holds [T-5m, T+10s): its first and last instants count */
    assert_int_equal(put(fx, T, T - 5 * MIN, 1, NULL, "click", -1), TLY_OK);
    assert_int_equal(put(fx, T, T + 10 * SEC - 1, 1, NULL, "click", -1), TLY_OK);
    /* one ms before the first bucket: outside 5m, inside 1h */
    assert_int_equal(put(fx, T, T - 5 * MIN - 1, 1, NULL, "click", -1), TLY_OK);
    /* a bucket past the last one (future but within the 1m skew) */
    assert_int_equal(put(fx, T, T + 10 * SEC, 1, NULL, "click", -1), TLY_OK);
    assert_int_equal(count(fx, "1", "clicks", 0, T), 2);
    assert_int_equal(count(fx, "1", "clicks", 1, T), 4); /* 1h holds [T-1h, T+1m): all four */
    /* ten seconds later the window has moved one bucket */
    assert_int_equal(count(fx, "1", "clicks", 0, T + 10 * SEC), 2);
    assert_int_equal(count(fx, "1", "clicks", 0, T + 10 * SEC - 1), 2);
}

/* Past the byte cap, an event's entities not held yet are not created
 * (counted per entity), those held keep taking events; without the cap
 * they are created again. */
static void test_max_bytes_stops_new_entities_not_held_ones(void **state)
{
    fx_t *fx = *state;
    assert_int_equal(put(fx, T, T, 1, NULL, "click", -1), TLY_OK);
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 1);
    assert_int_equal(st.dropped[TLY_E_EV_STORE_FULL], 0);

    tly_store_set_max_bytes(fx->store, (int64_t)st.bytes); /* at the cap: not past it */
    assert_int_equal(put(fx, T, T, 2, NULL, "click", -1), TLY_OK);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 2);

    tly_store_set_max_bytes(fx->store, 1);                         /* past it */
    assert_int_equal(put(fx, T, T, 3, NULL, "click", -1), TLY_OK); /* taken, not held */
    assert_int_equal(put(fx, T, T, 1, NULL, "click", -1), TLY_OK);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 2);
    assert_int_equal(st.dropped[TLY_E_EV_STORE_FULL], 1);
    assert_int_equal(count(fx, "3", "clicks", 0, T), 0);
    assert_int_equal(count(fx, "1", "clicks", 0, T), 2);

    tly_store_set_max_bytes(fx->store, 0); /* no cap */
    assert_int_equal(put(fx, T, T, 3, NULL, "click", -1), TLY_OK);
    assert_int_equal(count(fx, "3", "clicks", 0, T), 1);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 3);
    assert_int_equal(st.dropped[TLY_E_EV_STORE_FULL], 1);

    /* a cap the writer reaches: it sums the bytes every
     * TLY_STORE_CAP_EVERY applies, so new entities stop within that many
     * of passing it */
    tly_store_set_max_bytes(fx->store, (int64_t)st.bytes + 1);
    int64_t made = 0;
    for (int64_t u = 100; u < 100 + 3 * TLY_STORE_CAP_EVERY; u++)
        assert_int_equal(put(fx, T, T, u, NULL, "click", -1), TLY_OK);
    tly_store_stats(fx->store, &st);
    made = (int64_t)st.entities - 3;
    assert_true(made >= 1);                   /* the first fit under the cap */
    assert_true(made <= TLY_STORE_CAP_EVERY); /* stopped at the next sum */
    assert_int_equal(st.dropped[TLY_E_EV_STORE_FULL], 1 + 3 * TLY_STORE_CAP_EVERY - made);
}

/* A sweep that takes the store back under its cap lets new entities in
 * at once, not only at a writer's next sum of the bytes (every
 * TLY_STORE_CAP_EVERY applies). */
static void test_sweep_under_the_cap_lets_new_entities_in(void **state)
{
    fx_t *fx = *state;
    for (int64_t u = 1; u <= 10; u++)
        assert_int_equal(put(fx, T, T, u, NULL, "click", -1), TLY_OK);
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 10);
    tly_store_set_max_bytes(fx->store, (int64_t)st.bytes - 1); /* past it */
    assert_int_equal(put(fx, T, T, 99, NULL, "click", -1), TLY_OK);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 10);
    assert_int_equal(st.dropped[TLY_E_EV_STORE_FULL], 1);

    /* three days on every user has expired (idle_ttl 1d) */
    const int64_t later = T + 3 * DAY;
    assert_int_equal(tly_store_sweep(fx->store, later, 0), 10);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 0);
    assert_int_equal(put(fx, later, later, 99, NULL, "click", -1), TLY_OK);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 1);
    assert_int_equal(st.dropped[TLY_E_EV_STORE_FULL], 1);
    assert_int_equal(count(fx, "99", "clicks", 0, later), 1);
}

static void test_window_edges_at_unaligned_now(void **state)
{
    fx_t *fx = *state;
    int64_t now = T + 7 * SEC + 250; /* bucket of T; window [T-5m, T+10s) */
    assert_int_equal(put(fx, now, T - 5 * MIN, 2, NULL, "click", -1), TLY_OK);
    assert_int_equal(put(fx, now, T - 5 * MIN - 1, 2, NULL, "click", -1), TLY_OK);
    assert_int_equal(put(fx, now, T + 9 * SEC, 2, NULL, "click", -1), TLY_OK);
    assert_int_equal(count(fx, "2", "clicks", 0, now), 2);
    /* the whole earlier minute is in 1h: [T-1h, T+1m) */
    assert_int_equal(count(fx, "2", "clicks", 1, now), 3);
}

static void test_out_of_order_events_land_in_their_buckets(void **state)
{
    fx_t *fx = *state;
    int64_t times[] = {T - 2 * MIN, T - 50 * MIN, T - 10 * SEC, T - 30 * MIN, T - 4 * MIN};
    int64_t dwell[] = {10, 20, 30, 40, 50};
    for (int i = 0; i < 5; i++)
        assert_int_equal(put(fx, T, times[i], 3, NULL, "view", dwell[i]), TLY_OK);
    /* dwell's 1h window holds all five */
    assert_int_equal(count(fx, "3", "dwell", 0, T), 150);
    tly_value_t v = get(fx, fx->user, "3", "dmin", 0, T);
    assert_int_equal(v.type, TLY_V_INT);
    assert_int_equal(v.u.i, 10);
    v = get(fx, fx->user, "3", "dmax", 0, T);
    assert_int_equal(v.u.i, 50);
    v = get(fx, fx->user, "3", "davg", 0, T);
    assert_int_equal(v.type, TLY_V_DOUBLE);
    assert_true(v.u.d == 30.0);
    /* 1h at T+31m holds [T-29m, T+32m): T-30m and T-50m are out */
    assert_int_equal(count(fx, "3", "dwell", 0, T + 31 * MIN), 10 + 30 + 50);
}

static void test_late_and_future_events_are_dropped_and_counted(void **state)
{
    fx_t *fx = *state;
    tly_store_stats_t st;
    /* 1h is the longest window of clicks; recent/last keep 1d (idle_ttl):
     * an event 2h old still reaches recent and last_action, 2d old nothing */
    assert_int_equal(put(fx, T, T - 2 * DAY, 4, NULL, "click", -1), TLY_E_EV_LATE);
    assert_int_equal(put(fx, T, T + MIN + 1, 4, NULL, "click", -1), TLY_E_EV_FUTURE);
    assert_int_equal(put(fx, T, T + MIN, 4, NULL, "click", -1), TLY_OK); /* at the skew */
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.dropped[TLY_E_EV_FUTURE], 1);
    /* clicks, dwell-less sum/min/max/avg skip, recent, last_action: 3 late */
    assert_int_equal(st.dropped[TLY_E_EV_LATE], 3);
    assert_int_equal(st.entities, 1);
    assert_int_equal(count(fx, "4", "clicks", 1, T + MIN), 1);
}

static void test_late_means_before_the_oldest_bucket_not_the_horizon(void **state)
{
    fx_t *fx = *state;
    tly_store_stats_t st;
    /* impressions:1h (hop 1m) at now = T+30s holds the buckets from T-1h:
     * an event 20s older than now − 1h still lands in the oldest one, one
     * instant before T-1h is late for it (recent and last_action take both) */
    int64_t now = T + 30 * SEC;
    assert_int_equal(put(fx, now, T - HOUR + 10 * SEC, 5, "p5", "impression", -1), TLY_OK);
    assert_int_equal(put(fx, now, T - HOUR, 5, "p5", "impression", -1), TLY_OK);
    assert_int_equal(put(fx, now, T - HOUR - 1, 5, "p5", "impression", -1), TLY_OK);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.dropped[TLY_E_EV_LATE], 1);
    tly_value_t v = get(fx, fx->pin, "p5", "impressions", 0, now);
    assert_int_equal(v.type, TLY_V_INT);
    assert_int_equal(v.u.i, 2);
}

static void test_unknown_id_reads_empty_answers(void **state)
{
    fx_t *fx = *state;
    assert_int_equal(count(fx, "nobody", "clicks", 0, T), 0);
    assert_int_equal(count(fx, "nobody", "dwell", 0, T), 0);
    assert_int_equal(get(fx, fx->user, "nobody", "dmin", 0, T).type, TLY_V_NIL);
    assert_int_equal(get(fx, fx->user, "nobody", "davg", 0, T).type, TLY_V_NIL);
    assert_int_equal(get(fx, fx->user, "nobody", "last_action", 0, T).type, TLY_V_NIL);
    assert_int_equal(count(fx, "nobody", "recent", 0, T), 0);
    int64_t last = 0;
    tly_featwin_t req = {0, 0};
    tly_value_t out;
    char sbuf[16];
    tly_store_read(fx->store, fx->user, "nobody", 6, &req, 1, T, &out, &last, sbuf, sizeof sbuf);
    assert_int_equal(last, -1);
}

/* Whether user uid's record is word-encoded, from a dump of the store: the
 * premise of the tests that mean to test one encoding or the other. */
static bool user_words(fx_t *fx, const char *uid);

/* The item count FEATURES gives for last_k, on a word-encoded record: all
 * items in range, some newer than ASOF, some past the horizon (idle_ttl
 * 1d), and the items a pin string too long to intern makes wider. */
static void test_last_k_count_at_and_before_now_and_past_the_horizon(void **state)
{
    fx_t *fx = *state;
    /* 40 events of user 8 over the last 40 minutes: a word-encoded record
     * (the compact log holds far fewer); `recent` keeps the 3 newest,
     * at T - 2m, T - 1m, T */
    for (int i = 39; i >= 0; i--)
        assert_int_equal(put(fx, T, T - i * MIN, 8, "p", "click", i), TLY_OK);
    assert_true(user_words(fx, "8"));
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T).u.i, 3);
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T + 12 * HOUR).u.i, 3);
    /* ASOF before the newest: the newer ones are not counted */
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T - 30 * SEC).u.i, 2);
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T - 90 * SEC).u.i, 1);
    /* the horizon (1d) passes the oldest, then the next */
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T + DAY - 90 * SEC).u.i, 2);
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T + DAY - 30 * SEC).u.i, 1);
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T + DAY + 1).u.i, 0);
    /* an item of another width (a long pin string, not interned) */
    assert_int_equal(put(fx, T, T - 30 * SEC, 8, "a-pin-name-of-16", "click", 1), TLY_OK);
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T).u.i, 3);
    assert_int_equal(get(fx, fx->user, "8", "recent", 0, T - 45 * SEC).u.i, 1);
}

/* The same count from a compact log (4 events of user 88: T - 3m, T - 2m,
 * T - 1m, T; `recent` k = 3, horizon 1d), worked out by hand: the 3 newest
 * at or before the time read at (the clock or an ASOF), of them those
 * within the horizon. */
static void test_last_k_count_of_a_compact_log(void **state)
{
    fx_t *fx = *state;
    for (int i = 3; i >= 0; i--)
        assert_int_equal(put(fx, T, T - i * MIN, 88, "p", "click", i), TLY_OK);
    assert_false(user_words(fx, "88"));
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &feat, &win), TLY_OK);
    tly_featwin_t req = {feat, 0};
    static const struct {
        int64_t at;
        int64_t want;
    } cases[] = {
        {T, 3},
        {T - 30 * SEC, 3}, /* T - 1m, T - 2m, T - 3m */
        {T - 90 * SEC, 2},
        {T - 150 * SEC, 1},
        {T - 3 * MIN - 1, 0},
        {T + DAY - 90 * SEC, 2}, /* the horizon passed T - 3m and T - 2m */
        {T + DAY - 30 * SEC, 1},
        {T + DAY + 1, 0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tly_value_t out;
        char sbuf[64];
        assert_int_equal(tly_store_read(fx->store, fx->user, "88", 2, &req, 1, cases[c].at, &out,
                                        NULL, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(out.type, TLY_V_INT);
        if (out.u.i != cases[c].want)
            fail_msg("case %zu: %" PRId64 ", want %" PRId64, c, out.u.i, cases[c].want);
    }
}

/* Newest first, the times of `recent`'s items of user id at asof. */
static size_t recent_times(fx_t *fx, const char *id, int64_t asof, int64_t *times, size_t cap)
{
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &feat, &win), TLY_OK);
    tly_item_t it[8];
    char sbuf[512];
    size_t n = 0;
    assert_true(cap <= 8);
    assert_int_equal(tly_store_recent(fx->store, fx->user, id, strlen(id), feat, INT64_MIN, asof,
                                      it, cap, &n, sbuf, sizeof sbuf),
                     TLY_OK);
    for (size_t i = 0; i < n; i++)
        times[i] = it[i].time_ms;
    return n;
}

/* Events accepted ahead of now (within max_future_skew: a producer's clock
 * a little fast) are not yet visible at now, and they do not push out the
 * items before now: `last` keeps answering the newest event before now and
 * `recent` (k = 3) its three newest, in the compact log (user 5: a few
 * events) and in the word encoding (user 6: 40 earlier events first). */
static void test_items_after_now_leave_last_and_last_k_before_now_intact(void **state)
{
    fx_t *fx = *state;
    for (int i = 0; i < 40; i++) /* user 6: T - 50m .. T - 11m */
        assert_int_equal(put(fx, T, T - (50 - i) * MIN, 6, "p", "view", -1), TLY_OK);
    static const char *const ids[] = {"5", "6"};
    for (int u = 0; u < 2; u++) {
        int64_t user = u == 0 ? 5 : 6;
        const char *id = ids[u];
        /* user 6's clock starts past user 5's last one: a read is at the
         * clock when no apply was given a later now */
        const int64_t B = T + u * 10 * SEC;
        assert_int_equal(put(fx, B, B - 3 * MIN, user, "p", "view", -1), TLY_OK);
        assert_int_equal(put(fx, B, B - 2 * MIN, user, "p", "save", -1), TLY_OK);
        assert_int_equal(put(fx, B, B - 1 * MIN, user, "p", "click", -1), TLY_OK);
        /* ten events ahead of the writer's now B: at B + 100 and B + 200
         * ms, and eight more 2 to 9 s ahead */
        for (int j = 9; j >= 2; j--)
            assert_int_equal(put(fx, B, B + j * SEC, user, "p", "view", -1), TLY_OK);
        assert_int_equal(put(fx, B, B + 200, user, "p", "hide", -1), TLY_OK);
        assert_int_equal(put(fx, B, B + 100, user, "p", "closeup", -1), TLY_OK);
        assert_true(user_words(fx, id) == (u == 1)); /* user 5 compact, user 6 words */
        int64_t t[8];
        tly_value_t v = get(fx, fx->user, id, "last_action", 0, B);
        assert_int_equal(v.type, TLY_V_STR);
        assert_memory_equal(v.u.s, "click", 5);
        assert_int_equal(get(fx, fx->user, id, "recent", 0, B).u.i, 3);
        assert_int_equal(recent_times(fx, id, B, t, 8), 3);
        assert_true(t[0] == B - 1 * MIN && t[1] == B - 2 * MIN && t[2] == B - 3 * MIN);
        /* once their times come, they are the newest */
        v = get(fx, fx->user, id, "last_action", 0, B + 150);
        assert_int_equal(v.type, TLY_V_STR);
        assert_memory_equal(v.u.s, "closeup", 7);
        assert_int_equal(recent_times(fx, id, B + 150, t, 8), 3);
        assert_true(t[0] == B + 100 && t[1] == B - 1 * MIN && t[2] == B - 2 * MIN);
        v = get(fx, fx->user, id, "last_action", 0, B + 200);
        assert_int_equal(v.type, TLY_V_STR);
        assert_memory_equal(v.u.s, "hide", 4);
        assert_int_equal(recent_times(fx, id, B + 200, t, 8), 3);
        assert_true(t[0] == B + 200 && t[1] == B + 100 && t[2] == B - 1 * MIN);
        /* a later event, applied at B + 1s, trims to the k before its now */
        assert_int_equal(put(fx, B + SEC, B + 500, user, "p", "view", -1), TLY_OK);
        assert_int_equal(recent_times(fx, id, B + SEC, t, 8), 3);
        assert_true(t[0] == B + 500 && t[1] == B + 200 && t[2] == B + 100);
        v = get(fx, fx->user, id, "last_action", 0, B + SEC);
        assert_int_equal(v.type, TLY_V_STR);
        assert_memory_equal(v.u.s, "view", 4);
        /* A read before the writer's now (an ASOF in the past): the k
         * newest at or before B - 90 s are B - 2m, B - 3m and (user 6)
         * T - 11m. The compact log holds every event and answers them
         * all; the word list holds what the writer kept at its now B + 1 s
         * (the k newest before it, and the slack), so it answers the
         * newest of them, never an item out of place. */
        size_t n = recent_times(fx, id, B - 90 * SEC, t, 8);
        if (u == 0) {
            assert_int_equal(n, 2);
        } else {
            assert_true(n >= 1 && n <= 3);
        }
        const int64_t want[3] = {B - 2 * MIN, B - 3 * MIN, T - 11 * MIN};
        for (size_t i = 0; i < n; i++)
            assert_int_equal(t[i], want[i]);
    }
}

/* The indexes of the k greatest (time, then arrival) of events 0..last,
 * greatest first, into want; returns how many (at most k). */
static int newest_k(const int64_t *times, int last, int k, int *want)
{
    int nw = 0;
    for (int j = 0; j <= last; j++) {
        int at = nw;
        while (at > 0 && (times[want[at - 1]] < times[j] ||
                          (times[want[at - 1]] == times[j] && want[at - 1] < j)))
            at--;
        if (at >= k)
            continue;
        for (int q = (nw < k ? nw : k - 1); q > at; q--)
            want[q] = want[q - 1];
        want[at] = j;
        if (nw < k)
            nw++;
    }
    return nw;
}

/* The k newest items (time, then arrival) of a last_k of 20 after every
 * one of many events whose times arrive shuffled, with ties, against a
 * sort of all the events so far: a full list takes an item in its older
 * half by dropping the oldest and moving the older items down, in its
 * newer half by opening a place and trimming later. */
static void test_last_k_keeps_the_k_newest_under_shuffled_arrivals(void **state)
{
    fx_t *fx = *state;
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &feat, &win), TLY_OK);
    enum { NEV = 400, K = 20 }; /* k of `recent` in this fixture */
    static char pins[NEV][8];
    int64_t times[NEV];
    uint64_t r = 12345;
    for (int i = 0; i < NEV; i++) {
        r = r * 6364136223846793005u + 1442695040888963407u;
        times[i] = T - (int64_t)(r >> 33) % 200 * SEC; /* 200 distinct times: ties */
        snprintf(pins[i], sizeof pins[i], "q%d", i);
        assert_int_equal(put(fx, T, times[i], 9, pins[i], "click", -1), TLY_OK);
        /* expected: the K greatest of (time, arrival) among events 0..i */
        int want[K];
        int nw = newest_k(times, i, K, want);
        tly_item_t it[K + 4];
        char sbuf[2048];
        size_t n = 0;
        assert_int_equal(tly_store_recent(fx->store, fx->user, "9", 1, feat, INT64_MIN, T, it,
                                          K + 4, &n, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(n, (size_t)nw);
        for (int q = 0; q < nw; q++) {
            assert_int_equal(it[q].time_ms, times[want[q]]);
            assert_int_equal(it[q].vals[0].len, strlen(pins[want[q]]));
            assert_memory_equal(it[q].vals[0].u.s, pins[want[q]], strlen(pins[want[q]]));
        }
    }
    assert_true(user_words(fx, "9"));
}

/* A bool kept in an item reads back as a bool whether the entity's state is
 * its compact log or words, and after the log converts to words (it was
 * logged as an integer, and read back as one, before). */
static void test_last_k_keeps_bools_as_bools_in_every_encoding(void **state)
{
    fx_t *fx = *state;
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "flags", 5, &feat, &win), TLY_OK);
    int flag = tly_featset_field(fx->fs, "flag", 4);
    assert_true(flag >= 0);
    enum { NEV = 70 };
    for (int i = 0; i < NEV; i++) {
        tly_event_t e = ev(fx, T - (NEV - i) * SEC, 3, NULL, "click", -1);
        e.vals[flag] = (tly_value_t){.type = TLY_V_BOOL, .u.i = i % 3 == 0};
        assert_int_equal(tly_store_apply(fx->store, &e, 0, 0, T), TLY_OK);
        if (i != 2 && i != NEV - 1)
            continue;
        tly_item_t it[NEV];
        char sbuf[4096];
        size_t n = 0;
        assert_int_equal(tly_store_recent(fx->store, fx->user, "3", 1, feat, INT64_MIN, T, it, NEV,
                                          &n, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(n, (size_t)i + 1);
        for (size_t q = 0; q < n; q++) { /* newest first: event i - q */
            int j = i - (int)q;
            assert_int_equal(it[q].time_ms, T - (NEV - j) * SEC);
            assert_int_equal(it[q].vals[0].type, TLY_V_BOOL);
            assert_int_equal(it[q].vals[0].u.i, j % 3 == 0);
        }
        assert_int_equal(user_words(fx, "3"), i == NEV - 1);
    }
}

/* A word-encoded, full last_k (k 3) whose events came in time order takes
 * an event at the time of its oldest kept item: the later arrival is the
 * newer of the two, so it stays among the 3 and the earlier one goes. Users
 * with 57..60 events before it, so that the list holds k, and k + 1 (its
 * slack), items as it comes. */
static void test_last_k_full_keeps_a_tie_with_its_oldest_item(void **state)
{
    fx_t *fx = *state;
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &feat, &win), TLY_OK);
    for (int64_t n = 57; n <= 60; n++) {
        char id[8];
        int idlen = snprintf(id, sizeof id, "%d", (int)(100 + n));
        for (int64_t i = n; i >= 1; i--) /* T - n s .. T - 1 s, in order */
            assert_int_equal(put(fx, T, T - i * SEC, 100 + n, "old", "click", 1), TLY_OK);
        assert_true(user_words(fx, id));
        assert_int_equal(put(fx, T, T - 3 * SEC, 100 + n, "tie", "save", 1), TLY_OK);
        tly_item_t it[8];
        char sbuf[512];
        size_t got = 0;
        assert_int_equal(tly_store_recent(fx->store, fx->user, id, (size_t)idlen, feat, INT64_MIN,
                                          T, it, 8, &got, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(got, 3);
        const int64_t want_t[] = {T - 1 * SEC, T - 2 * SEC, T - 3 * SEC};
        const char *want_pin[] = {"old", "old", "tie"};
        for (int q = 0; q < 3; q++) {
            assert_int_equal(it[q].time_ms, want_t[q]);
            assert_int_equal(it[q].vals[0].len, 3);
            assert_memory_equal(it[q].vals[0].u.s, want_pin[q], 3);
        }
    }
}

static void test_last_k_orders_by_time_keeps_k_and_ties_keep_arrival(void **state)
{
    fx_t *fx = *state;
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &feat, &win), TLY_OK);
    assert_int_equal(put(fx, T, T - 5 * SEC, 5, "p1", "click", -1), TLY_OK);
    assert_int_equal(put(fx, T, T - 9 * SEC, 5, "p2", "save", -1), TLY_OK); /* out of order */
    assert_int_equal(put(fx, T, T - 5 * SEC, 5, "p3", "hide", -1), TLY_OK); /* tie with p1 */
    tly_item_t it[8];
    char sbuf[512];
    size_t n = 0;
    assert_int_equal(tly_store_recent(fx->store, fx->user, "5", 1, feat, INT64_MIN, T, it, 8, &n,
                                      sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(n, 3);
    const char *want_pin[] = {"p3", "p1", "p2"};
    int64_t want_t[] = {T - 5 * SEC, T - 5 * SEC, T - 9 * SEC};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(it[i].time_ms, want_t[i]);
        assert_int_equal(it[i].nvals, 2);
        assert_int_equal(it[i].vals[0].type, TLY_V_STR);
        assert_memory_equal(it[i].vals[0].u.s, want_pin[i], 2);
    }
    /* last_action is the newest: hide (arrived after click at the same time) */
    tly_value_t v = get(fx, fx->user, "5", "last_action", 0, T);
    assert_int_equal(v.type, TLY_V_STR);
    assert_int_equal(v.len, 4);
    assert_memory_equal(v.u.s, "hide", 4);
    /* more than k: only the 3 newest remain, whatever the arrival order;
     * enough events for the word encoding, whose list the reads below
     * describe */
    for (int i = 0; i < 40; i++)
        assert_int_equal(put(fx, T, T - 60 * SEC + (i * 7 % 20) * SEC, 5, "px", "view", -1),
                         TLY_OK);
    assert_true(user_words(fx, "5"));
    assert_int_equal(tly_store_recent(fx->store, fx->user, "5", 1, feat, INT64_MIN, T, it, 8, &n,
                                      sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(n, 3);
    assert_int_equal(it[0].time_ms, T - 5 * SEC);
    assert_int_equal(it[1].time_ms, T - 5 * SEC);
    assert_int_equal(it[2].time_ms, T - 9 * SEC);
    /* SINCE and ASOF bound the items returned */
    assert_int_equal(tly_store_recent(fx->store, fx->user, "5", 1, feat, T - 6 * SEC, T, it, 8, &n,
                                      sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(n, 2);
    assert_int_equal(tly_store_recent(fx->store, fx->user, "5", 1, feat, INT64_MIN, T - 6 * SEC, it,
                                      8, &n, sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(n, 1);
    assert_int_equal(it[0].time_ms, T - 9 * SEC);
    /* a string buffer too small is reported, not overrun */
    assert_int_equal(
        tly_store_recent(fx->store, fx->user, "5", 1, feat, INT64_MIN, T, it, 8, &n, sbuf, 3),
        TLY_E_FULL);
}

/* tly_store_apply, or with hinted, tly_store_prefetch then
 * tly_store_apply_hinted, as the Kafka source applies. */
static tly_err_t apply_as(fx_t *fx, const tly_event_t *e, int64_t now, bool hinted)
{
    if (!hinted)
        return tly_store_apply(fx->store, e, 0, 0, now);
    tly_prefetch_t pf;
    tly_rcu_read_lock();
    tly_store_prefetch(fx->store, e, &pf);
    tly_rcu_read_unlock();
    return tly_store_apply_hinted(fx->store, e, &pf, 0, 0, now);
}

static void test_rejected_event_changes_nothing(void **state)
{
    fx_t *fx = *state;
    for (int hinted = 0; hinted <= 1; hinted++) {
        /* a click with a string dwell: clicks would match, dwell cannot */
        tly_event_t e = ev(fx, T, 6, "p1", "click", -1);
        e.vals[fx->f_dwell] = (tly_value_t){.type = TLY_V_STR, .len = 3, .u.s = "abc"};
        assert_int_equal(apply_as(fx, &e, T, hinted), TLY_E_EV_WRONG_TYPE);
        /* an impression without pin_id: the pin's key is missing */
        e = ev(fx, T, 6, NULL, "impression", 5);
        assert_int_equal(apply_as(fx, &e, T, hinted), TLY_E_EV_MISSING_KEY);
        /* a last_k string longer than events.max_string (16) */
        e = ev(fx, T, 6, "p123456789012345678", "click", -1);
        assert_int_equal(apply_as(fx, &e, T, hinted), TLY_E_EV_VALUE_TOO_LONG);
        /* an impression, fed to the pin only (the user's last_k would
         * reject the string first), whose pin id is longer than an id may
         * be (255 bytes) */
        static char longpin[300];
        memset(longpin, 'q', sizeof longpin - 1);
        e = ev(fx, T, 6, longpin, "impression", 5);
        e.skip_entities = UINT64_C(1) << fx->user;
        assert_int_equal(apply_as(fx, &e, T, hinted), TLY_E_EV_VALUE_TOO_LONG);
        tly_store_stats_t st;
        tly_store_stats(fx->store, &st);
        assert_int_equal(st.entities, 0);
        assert_int_equal(st.events_applied, 0);
        assert_int_equal(st.dropped[TLY_E_EV_WRONG_TYPE], 1 + hinted);
        assert_int_equal(st.dropped[TLY_E_EV_MISSING_KEY], 1 + hinted);
        assert_int_equal(st.dropped[TLY_E_EV_VALUE_TOO_LONG], 2 * (1 + hinted));
        assert_int_equal(count(fx, "6", "clicks", 0, T), 0);
    }
}

/* tly_store_shares: the n shares of n appliers are disjoint and cover
 * every store shard; shard s falls to share s mod n. */
static void test_shares_split_every_shard_once(void **state)
{
    (void)state;
    for (uint32_t n = 1; n <= 7; n++) {
        uint64_t all = 0;
        for (uint32_t k = 0; k < n; k++) {
            uint64_t m = tly_store_shares(k, n);
            assert_int_equal(all & m, 0);
            all |= m;
            assert_true(m >> k & 1);
            if (n > 1)
                assert_int_equal(m >> (k + n) & 1, k + n < 64);
        }
        assert_true(all == TLY_STORE_ALL_SHARDS);
    }
}

/* Two appliers sharing the events (tly_store_prefetch_share): each applies
 * the entities that hash to the shards it owns, so together every entity
 * once; each decides alike whether an event is rejected, and only the one
 * that counts counts the event. As tly_apply splits shards: by their
 * number mod 2, and at a cut (the shards below 40, the rest). */
static void run_shares_apply_each_entity_once(fx_t *fx, const uint64_t sets[2], int base)
{
    enum { N = 200 };
    int users_after_share0 = 0, pins_after_share0 = 0;
    tly_store_stats_t st0;
    tly_store_stats(fx->store, &st0);
    for (int i = 0; i < N; i++) {
        char pin[16], user[16];
        snprintf(pin, sizeof pin, "p%d", base + i);
        snprintf(user, sizeof user, "%d", base + i);
        tly_event_t e = ev(fx, T - SEC, base + i, pin, "impression", 10);
        for (uint32_t k = 0; k < 2; k++) {
            tly_prefetch_t pf;
            tly_rcu_read_lock();
            tly_store_prefetch_share(fx->store, &e, sets[k], k == 0, &pf);
            tly_rcu_read_unlock();
            assert_int_equal(tly_store_apply_hinted(fx->store, &e, &pf, 0, 0, T), TLY_OK);
            if (k == 0) {
                users_after_share0 += count(fx, user, "dwell", 0, T) == 10;
                pins_after_share0 += get(fx, fx->pin, pin, "impressions", 0, T).u.i == 1;
            }
        }
        assert_int_equal(count(fx, user, "dwell", 0, T), 10);
        assert_int_equal(get(fx, fx->pin, pin, "impressions", 0, T).u.i, 1);
    }
    /* both shares own some of each type */
    assert_true(users_after_share0 > 0 && users_after_share0 < N);
    assert_true(pins_after_share0 > 0 && pins_after_share0 < N);
    /* an impression without pin_id: rejected by both, counted once */
    tly_event_t e = ev(fx, T, 6, NULL, "impression", 5);
    for (uint32_t k = 0; k < 2; k++) {
        tly_prefetch_t pf;
        tly_rcu_read_lock();
        tly_store_prefetch_share(fx->store, &e, sets[k], k == 0, &pf);
        tly_rcu_read_unlock();
        assert_int_equal(tly_store_apply_hinted(fx->store, &e, &pf, 0, 0, T), TLY_E_EV_MISSING_KEY);
    }
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.events_applied - st0.events_applied, N);
    assert_int_equal(st.entities - st0.entities, 2 * N);
    assert_int_equal(st.dropped[TLY_E_EV_MISSING_KEY] - st0.dropped[TLY_E_EV_MISSING_KEY], 1);
}

static void test_shares_apply_each_entity_once(void **state)
{
    fx_t *fx = *state;
    const uint64_t by_mod[2] = {tly_store_shares(0, 2), tly_store_shares(1, 2)};
    const uint64_t by_cut[2] = {(UINT64_C(1) << 40) - 1, ~((UINT64_C(1) << 40) - 1)};
    run_shares_apply_each_entity_once(fx, by_mod, 1000);
    run_shares_apply_each_entity_once(fx, by_cut, 5000);
}

/* One tly_store_hint per event, copied to each share and completed by
 * tly_store_prefetch_slots, is the hint tly_store_prefetch_share gives
 * that share (ids, hashes, share) and applies the same: every entity
 * once, a rejected event rejected by both and counted once. Each entity
 * falls to one share, as tly_store_prefetch_slots counts them. */
static void test_one_hint_serves_every_share(void **state)
{
    fx_t *fx = *state;
    enum { N = 100 };
    for (int i = 0; i <= N; i++) {
        char pin[16], user[16];
        snprintf(pin, sizeof pin, "p%d", i);
        snprintf(user, sizeof user, "%d", 2000 + i);
        /* the last one lacks its pin_id */
        tly_event_t e = ev(fx, T - SEC, 2000 + i, i < N ? pin : NULL, "impression", 7);
        tly_prefetch_t hint, pf, want;
        tly_store_hint(fx->store, &e, &hint);
        assert_int_equal(hint.n, i < N ? 2 : 1);
        uint32_t owned = 0; /* each entity falls to one share */
        for (uint32_t k = 0; k < 2; k++) {
            pf = hint;
            uint64_t set = tly_store_shares(k, 2);
            tly_rcu_read_lock();
            owned += tly_store_prefetch_slots(fx->store, &pf, set, k == 0);
            tly_store_prefetch_share(fx->store, &e, set, k == 0, &want);
            tly_rcu_read_unlock();
            assert_int_equal(pf.n, want.n);
            assert_true(pf.owned == set && pf.counts == (k == 0));
            assert_true(pf.ids && want.ids && want.owned == set && want.counts == (k == 0));
            for (uint32_t j = 0; j < pf.n; j++) {
                assert_int_equal(pf.entity[j], want.entity[j]);
                assert_int_equal(pf.h[j], want.h[j]);
                assert_int_equal(pf.idlen[j], want.idlen[j]);
                assert_memory_equal(pf.id[j], want.id[j], pf.idlen[j]);
            }
            assert_int_equal(tly_store_apply_hinted(fx->store, &e, &pf, 0, 0, T),
                             i < N ? TLY_OK : TLY_E_EV_MISSING_KEY);
        }
        assert_int_equal(owned, hint.n);
        if (i < N) {
            assert_int_equal(count(fx, user, "dwell", 0, T), 7);
            assert_int_equal(get(fx, fx->pin, pin, "impressions", 0, T).u.i, 1);
        }
    }
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.events_applied, N);
    assert_int_equal(st.entities, 2 * N);
    assert_int_equal(st.dropped[TLY_E_EV_MISSING_KEY], 1);
}

static void test_two_entity_types_from_one_event(void **state)
{
    fx_t *fx = *state;
    assert_int_equal(put(fx, T, T - SEC, 7, "p9", "impression", 100), TLY_OK);
    tly_event_t e = ev(fx, T - SEC, 8, "p9", "impression", 300);
    assert_int_equal(apply_as(fx, &e, T, true), TLY_OK);
    assert_int_equal(get(fx, fx->pin, "p9", "impressions", 0, T).u.i, 2);
    assert_int_equal(count(fx, "7", "dwell", 0, T), 100);
    assert_int_equal(count(fx, "8", "dwell", 0, T), 300);
    /* a user id is the decimal rendering of the integer */
    assert_int_equal(count(fx, "07", "dwell", 0, T), 0);
}

/* An event of a topic keyed by pin (skip_entities has the user bit) feeds
 * only the pin; tly_store_drop removes exactly the records it dooms. */
static bool doomed_odd_user(uint32_t type, const char *id, size_t len, void *ctx)
{
    const fx_t *fx = ctx;
    return type == fx->user && len > 0 && (id[len - 1] - '0') % 2 == 1;
}

/* For the drop below: the first time it is asked, a writer applies 30
 * events to user 42 (enough to regrow its record) and finishes; every user
 * is doomed. */
typedef struct {
    fx_t *fx;
    int calls;
} regrow_ctx_t;

static void *regrow_user_42(void *arg)
{
    fx_t *fx = arg;
    tly_rcu_thread_online();
    for (int i = 0; i < 30; i++)
        assert_int_equal(put(fx, T, T - SEC, 42, NULL, "click", 10), TLY_OK);
    tly_rcu_thread_offline();
    return NULL;
}

static bool doomed_after_a_regrow(uint32_t type, const char *id, size_t len, void *ctx)
{
    (void)id;
    (void)len;
    regrow_ctx_t *rc = ctx;
    if (rc->calls++ == 0) {
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, regrow_user_42, rc->fx), 0);
        assert_int_equal(pthread_join(th, NULL), 0);
    }
    return type == rc->fx->user;
}

/* A record a writer replaces (regrows) while tly_store_drop runs is still
 * dropped when doomed: the drop goes on to the record that replaced it. */
static void test_drop_removes_a_doomed_record_regrown_meanwhile(void **state)
{
    fx_t *fx = *state;
    assert_int_equal(put(fx, T, T - SEC, 42, NULL, "click", 10), TLY_OK);
    regrow_ctx_t rc = {fx, 0};
    assert_int_equal(tly_store_drop(fx->store, doomed_after_a_regrow, &rc), 1);
    assert_int_equal(count(fx, "42", "clicks", 0, T), 0);
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 0);
    assert_int_equal(st.dropped_entities, 1);
}

static void test_skipped_entity_types_are_not_fed_and_drop_removes_doomed(void **state)
{
    fx_t *fx = *state;
    tly_event_t e = ev(fx, T - SEC, 7, "p9", "impression", 100);
    e.skip_entities = UINT64_C(1) << fx->user;
    assert_int_equal(tly_store_apply(fx->store, &e, 0, 0, T), TLY_OK);
    assert_int_equal(get(fx, fx->pin, "p9", "impressions", 0, T).u.i, 1);
    assert_int_equal(count(fx, "7", "dwell", 0, T), 0);
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 1);

    for (int u = 0; u < 10; u++)
        assert_int_equal(put(fx, T, T - SEC, u, NULL, "click", 10), TLY_OK);
    assert_int_equal(tly_store_drop(fx->store, doomed_odd_user, fx), 5);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 6); /* users 0 2 4 6 8 and pin p9 */
    assert_int_equal(st.dropped_entities, 5);
    assert_int_equal(st.expired, 0);
    for (int u = 0; u < 10; u++) {
        char id[4];
        snprintf(id, sizeof id, "%d", u);
        assert_int_equal(count(fx, id, "dwell", 0, T), u % 2 ? 0 : 10);
    }
    assert_int_equal(get(fx, fx->pin, "p9", "impressions", 0, T).u.i, 1);
}

/* ---- snapshots: dump and load ---- */

typedef struct {
    uint8_t *blocks[64];
    size_t lens[64];
    size_t n;
} dump_t;

static bool keep_block(void *ctx, const void *data, size_t len)
{
    dump_t *d = ctx;
    if (d->n == 64)
        return false;
    d->blocks[d->n] = malloc(len);
    memcpy(d->blocks[d->n], data, len);
    d->lens[d->n++] = len;
    return true;
}

/* Every value of every feature and the items of `recent` of one id. */
static void read_all(const fx_t *fx, tly_store_t *store, uint32_t type, const char *id,
                     tly_value_t *vals, size_t *nvals, char *sbuf, size_t scap)
{
    tly_featwin_t req[32];
    size_t n = 0;
    const tly_entity_t *et = &fx->fs->entities[type];
    for (size_t i = 0; i < et->nfeats; i++) {
        const tly_feat_t *f = &fx->fs->feats[et->feats[i]];
        for (uint32_t w = 0; w < (f->nwindows ? f->nwindows : 1); w++)
            req[n++] = (tly_featwin_t){et->feats[i], w};
    }
    int64_t last = 0;
    assert_int_equal(
        tly_store_read(store, type, id, strlen(id), req, n, T, vals, &last, sbuf, scap), TLY_OK);
    vals[n] = (tly_value_t){.type = TLY_V_INT, .u.i = last};
    *nvals = n + 1;
}

static void assert_same_value(const tly_value_t *a, const tly_value_t *b)
{
    assert_int_equal(a->type, b->type);
    if (a->type == TLY_V_STR) {
        assert_int_equal(a->len, b->len);
        assert_memory_equal(a->u.s, b->u.s, a->len);
    } else if (a->type == TLY_V_DOUBLE) {
        assert_memory_equal(&a->u.d, &b->u.d, sizeof a->u.d);
    } else if (a->type != TLY_V_NIL) {
        assert_int_equal(a->u.i, b->u.i);
    }
}

/* A store dumped and loaded into a fresh one answers every read the same,
 * for sparse (compact) and busy (word-encoded) entities with interned
 * strings; a damaged block is refused or loads without harm. */
static void test_dump_and_load_round_trip(void **state)
{
    fx_t *fx = *state;
    static const char *const actions[] = {"impression", "click", "save", "hide"};
    char pin[40];
    for (int i = 0; i < 3000; i++) {
        int64_t user = i % 7 == 0 ? 1 : 100 + i % 500; /* user 1 is busy */
        snprintf(pin, sizeof pin, "p%d", i % 90);
        assert_int_equal(
            put(fx, T, T - (i % 3000) * SEC, user, pin, actions[i % 4], i % 5 ? i : -1), TLY_OK);
    }
    dump_t d = {.n = 0};
    uint64_t hash[8] = {11, 12, 13, 14, 15, 16, 17, 18}; /* by feature id */
    assert_int_equal(tly_store_dump(fx->store, hash, keep_block, &d), TLY_OK);
    assert_true(d.n >= 1);

    tly_store_t *copy = tly_store_new(fx->fs);
    char err[256];
    for (size_t b = 0; b < d.n; b++)
        if (tly_store_load(copy, d.blocks[b], d.lens[b], NULL, err, sizeof err) != TLY_OK)
            fail_msg("load: %s", err);
    for (uint32_t f = 0; f < 8; f++)
        assert_true(tly_store_restored(copy, f));
    tly_store_stats_t a, c;
    tly_store_stats(fx->store, &a);
    tly_store_stats(copy, &c);
    assert_int_equal(c.entities, a.entities);
    assert_int_equal(c.interned, a.interned);

    static tly_value_t va[40], vb[40];
    static char sa[4096], sb[4096];
    size_t na, nb;
    char id[40];
    for (int u = 0; u < 700; u++) {
        snprintf(id, sizeof id, "%d", u);
        read_all(fx, fx->store, fx->user, id, va, &na, sa, sizeof sa);
        read_all(fx, copy, fx->user, id, vb, &nb, sb, sizeof sb);
        assert_int_equal(na, nb);
        for (size_t i = 0; i < na; i++)
            assert_same_value(&va[i], &vb[i]);
    }
    for (int p = 0; p < 90; p++) {
        snprintf(id, sizeof id, "p%d", p);
        read_all(fx, fx->store, fx->pin, id, va, &na, sa, sizeof sa);
        read_all(fx, copy, fx->pin, id, vb, &nb, sb, sizeof sb);
        for (size_t i = 0; i < na; i++)
            assert_same_value(&va[i], &vb[i]);
    }
    tly_store_free(copy);

    /* Only the users (the pin feature's hash differs, so no pin feature
     * is restored): the 45 pins that got impressions (i % 4 == 0 reaches
     * the even pins p0..p88 only) are missing, the users answer the same. */
    uint64_t hash2[8];
    memcpy(hash2, hash, sizeof hash);
    hash2[7] = 99;
    copy = tly_store_new(fx->fs);
    for (size_t b = 0; b < d.n; b++)
        if (tly_store_load(copy, d.blocks[b], d.lens[b], hash2, err, sizeof err) != TLY_OK)
            fail_msg("load users only: %s", err);
    for (uint32_t f = 0; f < 8; f++)
        assert_int_equal(tly_store_restored(copy, f), f != 7);
    tly_store_stats(copy, &c);
    assert_int_equal(c.entities, a.entities - 45);
    /* p0 got impressions at i = 0, 180, ..., 2880: 17 */
    assert_int_equal(get(fx, fx->pin, "p0", "impressions", 0, T).u.i, 17);
    tly_value_t none = {.type = TLY_V_INT};
    {
        uint32_t feat;
        int win;
        assert_int_equal(tly_featset_resolve(fx->fs, fx->pin, "impressions", 11, &feat, &win),
                         TLY_OK);
        tly_featwin_t req = {feat, 0};
        assert_int_equal(
            tly_store_read(copy, fx->pin, "p0", 2, &req, 1, T, &none, NULL, sa, sizeof sa), TLY_OK);
        assert_int_equal(none.u.i, 0);
    }
    for (int u = 0; u < 700; u += 7) {
        snprintf(id, sizeof id, "%d", u);
        read_all(fx, fx->store, fx->user, id, va, &na, sa, sizeof sa);
        read_all(fx, copy, fx->user, id, vb, &nb, sb, sizeof sb);
        for (size_t i = 0; i < na; i++)
            assert_same_value(&va[i], &vb[i]);
    }
    tly_store_free(copy);

    /* Damaged blocks: truncated and with flipped bytes. Either refused
     * with a reason or loaded without harm (the snapshot file's checksums
     * are what catch damage; this only must never crash or overrun). */
    uint64_t lcg = 99;
    for (int round = 0; round < 300; round++) {
        size_t len = d.lens[0];
        uint8_t *bad = malloc(len);
        memcpy(bad, d.blocks[0], len);
        lcg = lcg * 6364136223846793005u + 1442695040888963407u;
        if (round % 2)
            len = (size_t)(lcg >> 33) % len;
        else
            for (int k = 0; k < 4; k++) {
                lcg = lcg * 6364136223846793005u + 1442695040888963407u;
                bad[(lcg >> 33) % len] ^= (uint8_t)(1u << (lcg >> 61));
            }
        /* as written, as the same definitions, and as changed ones (one
         * user feature and the pin feature differ: records are remapped) */
        uint64_t hash3[8];
        memcpy(hash3, hash2, sizeof hash3);
        hash3[1] = 98;
        const uint64_t *as[3] = {NULL, hash, hash3};
        tly_store_t *s2 = tly_store_new(fx->fs);
        err[0] = '\0';
        if (tly_store_load(s2, bad, len, as[round % 3], err, sizeof err) != TLY_OK) {
            assert_true(strstr(err, "at byte") != NULL);
        } else { /* what loaded takes events and reads (ASan watches) */
            for (int i = 0; i < 40; i++) {
                snprintf(pin, sizeof pin, "p%d", i % 90);
                tly_event_t e = ev(fx, T - i * SEC, i % 2 ? 1 : 100 + i, pin, actions[i % 4], i);
                tly_store_apply(s2, &e, 0, 0, T);
            }
            for (int u = 0; u < 700; u += 13) {
                snprintf(id, sizeof id, "%d", u);
                read_all(fx, s2, fx->user, id, vb, &nb, sb, sizeof sb);
            }
        }
        tly_store_free(s2);
        free(bad);
    }
    for (size_t b = 0; b < d.n; b++)
        free(d.blocks[b]);
}

/* One entity item of a dump block (the layout tly_store_dump writes). */
typedef struct {
    uint32_t type, used;
    uint8_t mode, idlen;
    const char *id;
    uint8_t *words; /* the state: log bytes (mode 0) or words (mode & 2) */
} ditem_t;

/* Calls each(item, ctx) for the entity items of block p[0..n) in order,
 * skipping layout and intern items, until it returns true or an item of
 * an unknown kind comes. */
static void walk_block(uint8_t *p, size_t n, bool (*each)(const ditem_t *it, void *ctx), void *ctx)
{
    size_t at = 0;
    while (at < n) {
        uint8_t kind = p[at++];
        if (kind == 3) { /* layout */
            uint32_t nl = p[at + 2] | p[at + 3] << 8;
            at += 4 + nl;
            uint32_t nslots = p[at] | p[at + 1] << 8 | p[at + 2] << 16 | (uint32_t)p[at + 3] << 24;
            at += 4 + 8 * (size_t)nslots;
            uint8_t nvf = p[at++];
            for (uint32_t j = 0; j < nvf; j++)
                at += 2 + (size_t)(p[at] | p[at + 1] << 8);
        } else if (kind == 1) { /* intern */
            uint32_t len = p[at + 4] | p[at + 5] << 8 | p[at + 6] << 16 | (uint32_t)p[at + 7] << 24;
            at += 8 + len;
        } else if (kind == 2) {
            ditem_t it = {.type = p[at] | p[at + 1] << 8, .idlen = p[at + 2], .mode = p[at + 3]};
            it.used = p[at + 4] | p[at + 5] << 8 | p[at + 6] << 16 | (uint32_t)p[at + 7] << 24;
            uint32_t nwords =
                p[at + 8] | p[at + 9] << 8 | p[at + 10] << 16 | (uint32_t)p[at + 11] << 24;
            at += 12;
            it.id = (const char *)p + at;
            it.words = p + at + it.idlen;
            if (each(&it, ctx))
                return;
            at += it.idlen + 8 * (size_t)nwords;
        } else {
            return;
        }
    }
}

typedef struct {
    uint32_t user_type;
    const char *uid;
    bool (*pick)(const uint8_t *words, uint32_t used, uint32_t *at);
    uint8_t *found;
} dw_ctx_t;

static bool dw_each(const ditem_t *it, void *ctx)
{
    dw_ctx_t *c = ctx;
    uint32_t w;
    if (it->type == c->user_type && it->idlen == strlen(c->uid) &&
        memcmp(it->id, c->uid, it->idlen) == 0 && (it->mode & 2) &&
        c->pick(it->words, it->used, &w)) {
        c->found = it->words + 8 * (size_t)w;
        return true;
    }
    return false;
}

/* The word of a dumped words record at index `word` of the record of user
 * `uid`, or NULL: walks the block's items. */
static uint8_t *dumped_word(uint8_t *p, size_t n, uint32_t user_type, const char *uid,
                            bool (*pick)(const uint8_t *words, uint32_t used, uint32_t *at))
{
    dw_ctx_t c = {.user_type = user_type, .uid = uid, .pick = pick, .found = NULL};
    walk_block(p, n, dw_each, &c);
    return c.found;
}

static bool pick_first(const uint8_t *words, uint32_t used, uint32_t *at)
{
    (void)words;
    *at = 0;
    return used > 0;
}

static bool user_words(fx_t *fx, const char *uid)
{
    dump_t d = {.n = 0};
    uint64_t hash[8] = {0};
    assert_int_equal(tly_store_dump(fx->store, hash, keep_block, &d), TLY_OK);
    bool words = false;
    for (size_t b = 0; b < d.n; b++) {
        words = words || dumped_word(d.blocks[b], d.lens[b], fx->user, uid, pick_first) != NULL;
        free(d.blocks[b]);
    }
    return words;
}

static uint64_t word_at(const uint8_t *words, uint32_t i)
{
    uint64_t v;
    memcpy(&v, words + 8 * (size_t)i, 8);
    return v;
}

/* The count word of the first item list (segment ids 0x8000 and up). */
static bool pick_items_count(const uint8_t *words, uint32_t used, uint32_t *at)
{
    for (uint32_t off = 1; off < used; off += 1 + (uint32_t)(word_at(words, off) >> 16)) {
        if ((word_at(words, off) & 0xffff) >= 0x8000) {
            *at = off + 1;
            return true;
        }
    }
    return false;
}

/* The header of windowed segment pick_sid (set by the test). */
static uint32_t pick_sid;
static bool pick_segment(const uint8_t *words, uint32_t used, uint32_t *at)
{
    for (uint32_t off = 1; off < used; off += 1 + (uint32_t)(word_at(words, off) >> 16)) {
        if ((word_at(words, off) & 0xffff) == pick_sid) {
            *at = off;
            return true;
        }
    }
    return false;
}

/* A snapshot whose checksums hold but whose state the writer could not
 * take (an item list whose count disagrees with its items, a windowed
 * segment of a partial bucket) is refused at load, not left to corrupt
 * memory at the entity's next event. */
static void test_load_refuses_state_the_writer_cannot_take(void **state)
{
    fx_t *fx = *state;
    for (int i = 0; i < 60; i++) /* user 1: a words record with a full last_k */
        assert_int_equal(put(fx, T, T - i * SEC, 1, "p1", "click", 10 + i), TLY_OK);
    dump_t d = {.n = 0};
    uint64_t hash[8] = {11, 12, 13, 14, 15, 16, 17, 18};
    assert_int_equal(tly_store_dump(fx->store, hash, keep_block, &d), TLY_OK);
    assert_int_equal(d.n, 1);
    uint32_t dwell;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "dwell", 5, &dwell, &win), TLY_OK);
    pick_sid = fx->fs->feats[dwell].slot * TLY_MAX_WINDOWS; /* a sum: two words a bucket */
    bool (*picks[2])(const uint8_t *, uint32_t, uint32_t *) = {pick_items_count, pick_segment};
    for (int k = 0; k < 2; k++) {
        uint8_t *copy = malloc(d.lens[0]);
        memcpy(copy, d.blocks[0], d.lens[0]);
        uint8_t *w = dumped_word(copy, d.lens[0], fx->user, "1", picks[k]);
        assert_non_null(w);
        if (k == 0) {
            w[0] += 0x3b; /* the item count */
        } else {
            uint64_t h;
            memcpy(&h, w, 8);
            assert_true((h >> 16) >= 2);
            h -= (uint64_t)1 << 16; /* a segment one word shorter: half a bucket */
            memcpy(w, &h, 8);
        }
        char err[256] = "";
        tly_store_t *s2 = tly_store_new(fx->fs);
        tly_err_t rc = tly_store_load(s2, copy, d.lens[0], NULL, err, sizeof err);
        assert_int_equal(rc, TLY_E_INVAL);
        if (strstr(err, "malformed entity") == NULL)
            fail_msg("unexpected reason: %s", err);
        tly_store_free(s2);
        free(copy);
    }
    /* unharmed, it loads */
    tly_store_t *s2 = tly_store_new(fx->fs);
    char err[256];
    if (tly_store_load(s2, d.blocks[0], d.lens[0], NULL, err, sizeof err) != TLY_OK)
        fail_msg("load: %s", err);
    tly_store_free(s2);
    free(d.blocks[0]);
}

/* An intern id no intern item of the block (kind 1, they come first)
 * names. */
static uint64_t unused_intern_id(const uint8_t *p, size_t n)
{
    static bool used[65536];
    memset(used, 0, sizeof used);
    for (size_t at = 0; at + 9 <= n && p[at] == 1;) {
        uint32_t slot = p[at + 1] | p[at + 2] << 8 | p[at + 3] << 16 | (uint32_t)p[at + 4] << 24;
        uint32_t len = p[at + 5] | p[at + 6] << 8 | p[at + 7] << 16 | (uint32_t)p[at + 8] << 24;
        used[slot & 0xffff] = true;
        at += 9 + (size_t)len;
    }
    uint64_t id = 0;
    while (used[id])
        id++;
    return id;
}

/* A word-encoded item whose string is an intern id the snapshot's intern
 * table does not hold is refused at load; it loaded, and every read of the
 * entity then failed with TLY_E_IO (found by fuzz_store_load). */
static void test_load_refuses_an_item_naming_a_string_not_interned(void **state)
{
    fx_t *fx = *state;
    /* user 1: a words record whose `recent` is packed (every value of its
     * first item has a packed form); user 2: one whose first item has no
     * action, so the list is tagged, and whose later items name interned
     * strings */
    assert_int_equal(put(fx, T, T - 60 * SEC, 2, "p1", NULL, 9), TLY_OK);
    for (int i = 0; i < 60; i++) {
        assert_int_equal(put(fx, T, T - i * SEC, 1, "p1", "click", 10 + i), TLY_OK);
        assert_int_equal(put(fx, T, T - i * SEC, 2, "p1", "click", 10 + i), TLY_OK);
    }
    dump_t d = {.n = 0};
    assert_int_equal(tly_store_dump(fx->store, NULL, keep_block, &d), TLY_OK);
    assert_int_equal(d.n, 1);
    uint64_t id = unused_intern_id(d.blocks[0], d.lens[0]);
    for (int user = 1; user <= 2; user++) {
        uint8_t *copy = malloc(d.lens[0]);
        assert_non_null(copy);
        memcpy(copy, d.blocks[0], d.lens[0]);
        uint8_t *w =
            dumped_word(copy, d.lens[0], fx->user, user == 1 ? "1" : "2", pick_items_count);
        assert_non_null(w);
        uint8_t *pin;
        if (user == 1) {
            /* the count word, the schema (two values, both interned
             * strings), then the oldest item: the pin's intern id, the
             * action's, the time */
            assert_int_equal(word_at(w, 1), (UINT64_C(2) << 32) | 0x44);
            pin = w + 8 * 2;
        } else {
            /* tagged: the newest item, the segment's last seven words:
             * header, the pin's tag and its intern id, the action's,
             * time, width */
            uint64_t len = (word_at(w - 8, 0) >> 16) & 0xffffffffu;
            assert_int_equal(word_at(w, (uint32_t)len - 1), 7);
            assert_int_equal(word_at(w, (uint32_t)len - 6), 0x83); /* an interned string */
            pin = w + 8 * (len - 5);
        }
        memcpy(pin, &id, 8);
        char err[256] = "";
        tly_store_t *s2 = tly_store_new(fx->fs);
        assert_int_equal(tly_store_load(s2, copy, d.lens[0], NULL, err, sizeof err), TLY_E_INVAL);
        if (strstr(err, "malformed entity state") == NULL)
            fail_msg("unexpected reason: %s", err);
        tly_store_free(s2);
        free(copy);
    }
    /* unharmed, it loads */
    tly_store_t *s2 = tly_store_new(fx->fs);
    char err[256];
    if (tly_store_load(s2, d.blocks[0], d.lens[0], NULL, err, sizeof err) != TLY_OK)
        fail_msg("load: %s", err);
    tly_store_free(s2);
    free(d.blocks[0]);
}

/* Whether the `recent` list of user uid is packed (the count word's bit
 * 48), in a dump of the store: 1, 0, or -1 when the user has no word
 * record. */
static int recent_packed(fx_t *fx, const char *uid)
{
    dump_t d = {.n = 0};
    assert_int_equal(tly_store_dump(fx->store, NULL, keep_block, &d), TLY_OK);
    int packed = -1;
    for (size_t b = 0; b < d.n; b++) {
        uint8_t *w = dumped_word(d.blocks[b], d.lens[b], fx->user, uid, pick_items_count);
        if (w != NULL)
            packed = (int)(word_at(w, 0) >> 48 & 1);
        free(d.blocks[b]);
    }
    return packed;
}

/* A list packed while its items' values all have a packed form turns
 * tagged at the first item that does not (an action missing, then a pin
 * that is a number, not a string), and keeps the k newest (time, then
 * arrival) of everything with every value as it came. The expected items
 * are computed here from the events sent. */
static void test_last_k_turns_tagged_when_an_item_cannot_be_packed(void **state)
{
    fx_t *fx = *state;
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &feat, &win), TLY_OK);
    enum { NEV = 300, K = 20, NIL_AT = 150, INT_AT = 220 };
    static char pins[NEV][8];
    int64_t times[NEV];
    uint64_t r = 777;
    for (int i = 0; i < NEV; i++) {
        r = r * 6364136223846793005u + 1442695040888963407u;
        times[i] = T - (int64_t)(r >> 33) % 200 * SEC;
        snprintf(pins[i], sizeof pins[i], "q%d", i);
        tly_event_t e = ev(fx, times[i], 7, pins[i], i == NIL_AT ? NULL : "save", -1);
        if (i == INT_AT) /* the pin as a number */
            e.vals[fx->f_pin] = (tly_value_t){.type = TLY_V_INT, .u.i = 4242};
        assert_int_equal(tly_store_apply(fx->store, &e, 0, 0, T), TLY_OK);
        if (i == 100)
            assert_int_equal(recent_packed(fx, "7"), 1);
        if (i == NIL_AT)
            assert_int_equal(recent_packed(fx, "7"), 0);
        int want[K];
        int nw = newest_k(times, i, K, want);
        if (i < 60)
            continue; /* a compact log until then: not the lists these test */
        tly_item_t it[K + 4];
        char sbuf[2048];
        size_t n = 0;
        assert_int_equal(tly_store_recent(fx->store, fx->user, "7", 1, feat, INT64_MIN, T, it,
                                          K + 4, &n, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(n, (size_t)nw);
        for (int q = 0; q < nw; q++) {
            int j = want[q];
            assert_int_equal(it[q].time_ms, times[j]);
            assert_int_equal(it[q].nvals, 2);
            if (j == INT_AT) {
                assert_int_equal(it[q].vals[0].type, TLY_V_INT);
                assert_int_equal(it[q].vals[0].u.i, 4242);
            } else {
                assert_int_equal(it[q].vals[0].type, TLY_V_STR);
                assert_int_equal(it[q].vals[0].len, strlen(pins[j]));
                assert_memory_equal(it[q].vals[0].u.s, pins[j], strlen(pins[j]));
            }
            if (j == NIL_AT) {
                assert_int_equal(it[q].vals[1].type, TLY_V_NIL);
            } else {
                assert_int_equal(it[q].vals[1].type, TLY_V_STR);
                assert_memory_equal(it[q].vals[1].u.s, "save", 4);
            }
        }
    }
    assert_int_equal(recent_packed(fx, "7"), 0);
}

/* An event of another shape older than every item a full packed list
 * keeps is dropped without turning the list tagged (it would be trimmed at
 * once); a newer one of that shape turns it tagged and is kept. */
static void test_last_k_old_item_of_another_shape_keeps_the_list_packed(void **state)
{
    fx_t *fx = *state;
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &feat, &win), TLY_OK);
    enum { NEV = 100, K = 20 };
    static char pins[NEV][8];
    for (int i = 0; i < NEV; i++) {
        snprintf(pins[i], sizeof pins[i], "q%d", i);
        tly_event_t e = ev(fx, T - (NEV - i) * SEC, 8, pins[i], "save", -1);
        assert_int_equal(tly_store_apply(fx->store, &e, 0, 0, T), TLY_OK);
    }
    assert_int_equal(recent_packed(fx, "8"), 1);
    /* older than the oldest kept item (T - 21 s at the latest), no action */
    tly_event_t old = ev(fx, T - 500 * SEC, 8, "old", NULL, -1);
    assert_int_equal(tly_store_apply(fx->store, &old, 0, 0, T), TLY_OK);
    assert_int_equal(recent_packed(fx, "8"), 1);
    tly_item_t it[K + 4];
    char sbuf[2048];
    size_t n = 0;
    assert_int_equal(tly_store_recent(fx->store, fx->user, "8", 1, feat, INT64_MIN, T, it, K + 4,
                                      &n, sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(n, K);
    for (int q = 0; q < K; q++) { /* newest first: q99, q98, ... */
        assert_int_equal(it[q].time_ms, T - (q + 1) * SEC);
        assert_int_equal(it[q].vals[0].len, strlen(pins[NEV - 1 - q]));
        assert_memory_equal(it[q].vals[0].u.s, pins[NEV - 1 - q], strlen(pins[NEV - 1 - q]));
    }
    /* the same shape, newer than the newest: kept, and the list tagged */
    tly_event_t newer = ev(fx, T, 8, "new", NULL, -1);
    assert_int_equal(tly_store_apply(fx->store, &newer, 0, 0, T), TLY_OK);
    assert_int_equal(recent_packed(fx, "8"), 0);
    assert_int_equal(tly_store_recent(fx->store, fx->user, "8", 1, feat, INT64_MIN, T, it, K + 4,
                                      &n, sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(n, K);
    assert_int_equal(it[0].time_ms, T);
    assert_memory_equal(it[0].vals[0].u.s, "new", 3);
    assert_int_equal(it[0].vals[1].type, TLY_V_NIL);
    assert_int_equal(it[1].time_ms, T - SEC);
}

/* An entity item of a state block (the layout tly_store_dump writes):
 * type, id, mode (0: compact, 2: words), `used` (log bytes or words) and
 * the state, n bytes padded to whole words. Returns its length. */
static size_t entity_item(uint8_t *out, uint32_t type, const char *id, uint8_t mode, uint32_t used,
                          const void *state, size_t n)
{
    size_t idlen = strlen(id), nwords = (n + 7) / 8;
    out[0] = 2; /* an entity */
    out[1] = (uint8_t)type;
    out[2] = (uint8_t)(type >> 8);
    out[3] = (uint8_t)idlen;
    out[4] = mode;
    for (int b = 0; b < 4; b++) {
        out[5 + b] = (uint8_t)(used >> (8 * b));
        out[9 + b] = (uint8_t)(nwords >> (8 * b));
    }
    memcpy(out + 13, id, idlen);
    memset(out + 13 + idlen, 0, 8 * nwords);
    memcpy(out + 13 + idlen, state, n);
    return 13 + idlen + 8 * nwords;
}

/* A compact log whose times a writer cannot have logged — a negative
 * one, or one past INT64_MAX from the first record's — is refused at
 * load; it loaded, and computing with it overflowed (signed, UBSan) when
 * the log was read and when the entity's next event was logged. */
static void test_load_refuses_compact_logs_with_negative_or_overflowing_times(void **state)
{
    fx_t *fx = *state;
    /* fx's users log three value fields: one tag byte. Each record:
     * zigzag varint time (or delta), varint mask, tags (all nil). */
    static const uint8_t at_5[] = {0x0a, 0x01, 0x00};
    static const uint8_t negative[] = {0x01, 0x01, 0x00}; /* time -1 */
    static const uint8_t overflowing[] = {
        0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x01, 0x00, /* INT64_MAX */
        0x02, 0x01, 0x00,                                                       /* then +1 */
    };
    const struct {
        const uint8_t *log;
        size_t n;
        tly_err_t want;
    } cases[] = {
        {at_5, sizeof at_5, TLY_OK},
        {negative, sizeof negative, TLY_E_INVAL},
        {overflowing, sizeof overflowing, TLY_E_INVAL},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        uint8_t block[64];
        size_t n =
            entity_item(block, fx->user, "1", 0, (uint32_t)cases[c].n, cases[c].log, cases[c].n);
        char err[256] = "";
        tly_store_t *s2 = tly_store_new(fx->fs);
        tly_err_t rc = tly_store_load(s2, block, n, NULL, err, sizeof err);
        if (rc != cases[c].want)
            fail_msg("case %zu: %s, want %s (%s)", c, tly_strerror(rc), tly_strerror(cases[c].want),
                     err);
        if (rc != TLY_OK && strstr(err, "malformed entity state") == NULL)
            fail_msg("case %zu: unexpected reason: %s", c, err);
        if (rc == TLY_OK) { /* the loaded entity's last event time, and a new event */
            int64_t last = 0;
            tly_featwin_t req = {0, 0};
            tly_value_t v;
            char sbuf[64];
            assert_int_equal(
                tly_store_read(s2, fx->user, "1", 1, &req, 1, T, &v, &last, sbuf, sizeof sbuf),
                TLY_OK);
            assert_int_equal(last, 5);
            tly_event_t e = ev(fx, T - SEC, 1, "p1", "click", 3);
            assert_int_equal(tly_store_apply(s2, &e, 0, 0, T), TLY_OK);
        }
        tly_store_free(s2);
    }
}

/* A word-encoded item whose string claims more bytes than the item holds
 * is refused at load, also a length near 2^32 (it wrapped to no words at
 * all, loaded, and every read of the entity then failed with TLY_E_FULL
 * whatever the buffer); the same item with a string that fits loads. */
static void test_load_refuses_an_item_string_longer_than_its_item(void **state)
{
    fx_t *fx = *state;
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "last_action", 11, &feat, &win), TLY_OK);
    uint64_t sid = 0x8000u + fx->fs->feats[feat].slot; /* its item list */
    uint64_t hello = 0;
    memcpy(&hello, "hello", 5);
    const struct {
        uint64_t len;    /* the string's length as its tag says */
        uint32_t nbytes; /* the words of string the item holds */
        tly_err_t want;
    } cases[] = {
        {5, 1, TLY_OK},
        {9, 1, TLY_E_INVAL},
        {UINT32_MAX, 0, TLY_E_INVAL}, /* 2^32 - 1 + 7 wrapped to 6: no words */
        {UINT32_MAX - 6, 0, TLY_E_INVAL},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        /* newest time; header; count 1 and the items' width; the item:
         * header (width, 1 value), tag, the string's words, time, width */
        uint32_t iw = 4 + cases[c].nbytes, used = 0;
        uint64_t w[8];
        w[used++] = (uint64_t)T;
        w[used++] = sid | (uint64_t)(1 + iw) << 16;
        w[used++] = 1 | (uint64_t)iw << 32;
        w[used++] = iw | (uint64_t)1 << 32;
        w[used++] = TLY_V_STR | cases[c].len << 8;
        if (cases[c].nbytes)
            w[used++] = hello;
        w[used++] = (uint64_t)T;
        w[used++] = iw;
        uint8_t block[128];
        size_t n = entity_item(block, fx->user, "1", 2, used, w, 8 * (size_t)used);
        char err[256] = "";
        tly_store_t *s2 = tly_store_new(fx->fs);
        tly_err_t rc = tly_store_load(s2, block, n, NULL, err, sizeof err);
        if (rc != cases[c].want)
            fail_msg("case %zu: %s, want %s (%s)", c, tly_strerror(rc), tly_strerror(cases[c].want),
                     err);
        if (rc != TLY_OK && strstr(err, "malformed entity state") == NULL)
            fail_msg("case %zu: unexpected reason: %s", c, err);
        if (rc == TLY_OK) {
            tly_featwin_t req = {feat, 0};
            tly_value_t v;
            char sbuf[64];
            assert_int_equal(
                tly_store_read(s2, fx->user, "1", 1, &req, 1, T, &v, NULL, sbuf, sizeof sbuf),
                TLY_OK);
            assert_int_equal(v.type, TLY_V_STR);
            assert_int_equal(v.len, 5);
            assert_memory_equal(v.u.s, "hello", 5);
        }
        tly_store_free(s2);
    }
}

/* fx's features redefined: `saves` (new) comes first and shifts every
 * slot, `clicks` gets other windows (changed), `dmin` is gone, `recent`
 * moves before `dwell` (the value fields change order), the pins gain a
 * feature; dwell, dmax, davg, recent, last_action and impressions are
 * unchanged. */
static const char *yaml_redefined = YAML_HEAD
    "  - { name: saves, entity: user, key: user_id, where: { action: save }, agg: count,"
    " windows: [1h] }\n"
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 3, value: [pin_id, action] }\n"
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
    " windows: [1h, 1d] }\n"
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h] }\n"
    "  - { name: dmax, entity: user, key: user_id, agg: max, value: dwell_ms, windows: [1h] }\n"
    "  - { name: davg, entity: user, key: user_id, agg: avg, value: dwell_ms, windows: [1h] }\n"
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
    "  - { name: pin_clicks, entity: pin, key: pin_id, where: { action: click },"
    " agg: count, windows: [1h] }\n"
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
    " agg: count, windows: [1h] }\n";

/* A definition's hash as the test sees it: the name, plus a mark for the
 * one feature whose definition changed under the same name. */
static uint64_t def_hash(const tly_featset_t *fs, uint32_t f, bool redefined)
{
    const tly_feat_t *feat = &fs->feats[f];
    uint64_t h = 1469598103934665603u;
    for (const char *c = feat->name; *c; c++)
        h = (h ^ (uint8_t)*c) * 1099511628211u;
    h = (h ^ feat->entity) * 1099511628211u;
    return redefined && strcmp(feat->name, "clicks") == 0 ? h + 1 : h;
}

/* Every window of every feature of one id (featset fs), as strings. */
static void read_feats(const tly_featset_t *fs, tly_store_t *store, uint32_t type, const char *id,
                       char out[][64], size_t *n)
{
    const tly_entity_t *et = &fs->entities[type];
    char sbuf[512];
    *n = 0;
    for (size_t i = 0; i < et->nfeats; i++) {
        const tly_feat_t *f = &fs->feats[et->feats[i]];
        for (uint32_t w = 0; w < (f->nwindows ? f->nwindows : 1); w++) {
            tly_featwin_t req = {et->feats[i], w};
            tly_value_t v;
            assert_int_equal(tly_store_read(store, type, id, strlen(id), &req, 1, T, &v, NULL, sbuf,
                                            sizeof sbuf),
                             TLY_OK);
            char *o = out[(*n)++];
            if (v.type == TLY_V_STR)
                snprintf(o, 64, "%s=s:%.*s", f->name, (int)v.len, v.u.s);
            else if (v.type == TLY_V_DOUBLE)
                snprintf(o, 64, "%s=d:%.17g", f->name, v.u.d);
            else if (v.type == TLY_V_NIL)
                snprintf(o, 64, "%s=nil", f->name);
            else
                snprintf(o, 64, "%s=i:%lld", f->name, (long long)v.u.i);
        }
    }
}

/* A snapshot written under one set of definitions loads into a store with
 * changed ones: the unchanged features come back exactly (renumbered
 * slots, reordered value fields, sparse and busy records), the new and
 * changed ones start empty, and replaying the same events marked
 * `replayed` completes exactly the state a store fed them directly holds. */
static void test_load_restores_unchanged_features_under_new_definitions(void **state)
{
    fx_t *fx = *state;
    tly_config_t *cfg2;
    tly_featset_t *fs2;
    char err[256];
    if (tly_config_load_string(yaml_redefined, "redefined.yaml", &cfg2, err, sizeof err) !=
            TLY_OK ||
        tly_featset_compile(cfg2, &fs2, err, sizeof err) != TLY_OK)
        fail_msg("%s", err);
    static const char *const actions[] = {"impression", "click", "save", "closeup", "hide"};
    enum { NEV = 4000 };
    static tly_event_t evs[NEV];
    static char pins[NEV][16];
    for (int i = 0; i < NEV; i++) {
        int64_t user = i % 5 == 0 ? 1 : i % 11 == 0 ? 2 : 100 + i % 600; /* 1, 2 busy */
        snprintf(pins[i], sizeof pins[i], "p%d", i % 70);
        evs[i] = ev(fx, T - (int64_t)((i * 7919) % 3000) * SEC, user, pins[i], actions[i % 5],
                    i % 3 ? i : -1);
        assert_int_equal(tly_store_apply(fx->store, &evs[i], 0, i, T), TLY_OK);
    }
    uint64_t h1[16], h2[16];
    for (uint32_t f = 0; f < fx->fs->nfeats; f++)
        h1[f] = def_hash(fx->fs, f, false);
    for (uint32_t f = 0; f < fs2->nfeats; f++)
        h2[f] = def_hash(fs2, f, true);
    dump_t d = {.n = 0};
    assert_int_equal(tly_store_dump(fx->store, h1, keep_block, &d), TLY_OK);

    /* the reference: the new definitions fed every event (their field ids
     * differ, so each event is rebuilt for fs2) */
    tly_store_t *ref = tly_store_new(fs2), *got = tly_store_new(fs2);
    int f2[5] = {tly_featset_field(fs2, "ts", 2), tly_featset_field(fs2, "user_id", 7),
                 tly_featset_field(fs2, "pin_id", 6), tly_featset_field(fs2, "action", 6),
                 tly_featset_field(fs2, "dwell_ms", 8)};
    int f1[5] = {fx->f_ts, fx->f_user, fx->f_pin, fx->f_action, fx->f_dwell};
    static tly_event_t evs2[NEV];
    for (int i = 0; i < NEV; i++) {
        memset(&evs2[i], 0, sizeof evs2[i]);
        evs2[i].nfields = (uint32_t)fs2->nfields;
        evs2[i].time_ms = evs[i].time_ms;
        for (int k = 0; k < 5; k++)
            evs2[i].vals[f2[k]] = evs[i].vals[f1[k]];
        assert_int_equal(tly_store_apply(ref, &evs2[i], 0, i, T), TLY_OK);
    }
    for (size_t b = 0; b < d.n; b++)
        if (tly_store_load(got, d.blocks[b], d.lens[b], h2, err, sizeof err) != TLY_OK)
            fail_msg("load: %s", err);
    const char *rebuilt[] = {"saves", "clicks", "pin_clicks"};
    for (uint32_t f = 0; f < fs2->nfeats; f++) {
        bool want = true;
        for (size_t k = 0; k < 3; k++)
            want = want && strcmp(fs2->feats[f].name, rebuilt[k]) != 0;
        if (tly_store_restored(got, f) != want)
            fail_msg("feature %s: restored %d, want %d", fs2->feats[f].name,
                     tly_store_restored(got, f), want);
    }

    static char a[32][64], b[32][64];
    size_t na, nb;
    char id[16];
    uint32_t user = (uint32_t)tly_featset_entity(fs2, "user", 4);
    uint32_t pin = (uint32_t)tly_featset_entity(fs2, "pin", 3);
    for (int pass = 0; pass < 2; pass++) {
        for (int u = 0; u < 700 + 70; u++) {
            uint32_t type = u < 700 ? user : pin;
            snprintf(id, sizeof id, u < 700 ? "%d" : "p%d", u < 700 ? u : u - 700);
            read_feats(fs2, ref, type, id, a, &na);
            read_feats(fs2, got, type, id, b, &nb);
            assert_int_equal(na, nb);
            for (size_t i = 0; i < na; i++) {
                const char *name = a[i];
                bool fresh = false;
                for (size_t k = 0; k < 3; k++)
                    fresh = fresh || (strncmp(name, rebuilt[k], strlen(rebuilt[k])) == 0 &&
                                      name[strlen(rebuilt[k])] == '=');
                if (pass == 0 && fresh) {
                    /* not restored: empty until the replay */
                    if (strstr(b[i], "=i:0") == NULL && strstr(b[i], "=nil") == NULL)
                        fail_msg("%s %s: %s before the replay, want empty", id, name, b[i]);
                } else if (strcmp(a[i], b[i]) != 0) {
                    fail_msg("%s pass %d: %s, want %s", id, pass, b[i], a[i]);
                }
            }
            if (pass == 1) { /* and the items of `recent`, in order */
                uint32_t fr;
                int win;
                assert_int_equal(tly_featset_resolve(fs2, user, "recent", 6, &fr, &win), TLY_OK);
                tly_item_t ia[3], ib[3];
                char sa[256], sb[256];
                size_t nia = 0, nib = 0;
                if (type == user) {
                    assert_int_equal(tly_store_recent(ref, user, id, strlen(id), fr, 0, T, ia, 3,
                                                      &nia, sa, sizeof sa),
                                     TLY_OK);
                    assert_int_equal(tly_store_recent(got, user, id, strlen(id), fr, 0, T, ib, 3,
                                                      &nib, sb, sizeof sb),
                                     TLY_OK);
                    assert_int_equal(nia, nib);
                    for (size_t k = 0; k < nia; k++) {
                        assert_int_equal(ia[k].time_ms, ib[k].time_ms);
                        assert_int_equal(ia[k].nvals, ib[k].nvals);
                        for (uint32_t v = 0; v < ia[k].nvals; v++)
                            assert_same_value(&ia[k].vals[v], &ib[k].vals[v]);
                    }
                }
            }
        }
        if (pass == 0) /* the same events again, marked as already restored */
            for (int i = 0; i < NEV; i++) {
                evs2[i].replayed = true;
                assert_int_equal(tly_store_apply(got, &evs2[i], 0, i, T), TLY_OK);
            }
    }
    tly_store_stats_t sr, sg;
    tly_store_stats(ref, &sr);
    tly_store_stats(got, &sg);
    assert_int_equal(sg.entities, sr.entities);
    tly_store_free(ref);
    tly_store_free(got);
    for (size_t k = 0; k < d.n; k++)
        free(d.blocks[k]);
    tly_featset_free(fs2);
    tly_config_free(cfg2);
}

/* Drives the pacer as tallyd's main loop does (each call after the wait
 * the previous one asked for) for `ms` milliseconds; returns the records
 * visited and checks every step against max_step and every wait against
 * the bounds. */
static uint64_t pace_for(tly_sweep_pace_t *p, uint64_t entities, int64_t every, int64_t ms,
                         size_t max_step)
{
    uint64_t total = 0;
    int64_t wait = 0;
    for (int64_t t = 0; t <= ms; t += wait) {
        size_t visit = tly_sweep_pace(p, entities, every, wait, &wait);
        assert_true(visit <= max_step);
        assert_true(wait >= 1 && wait <= 250);
        total += visit;
    }
    return total;
}

static void test_sweep_pace_spreads_a_pass_in_small_steps(void **state)
{
    (void)state;
    /* 60,000 records every 10 s: 6 a millisecond, so a step of 256 every
     * 42-43 ms (256 / 6 = 42.7), not one of 1,500 every 250 ms */
    tly_sweep_pace_t p = {0};
    int64_t wait;
    assert_int_equal(tly_sweep_pace(&p, 60000, 10000, 0, &wait), 64); /* nothing owed: the floor */
    assert_int_equal(wait, 43);
    assert_int_equal(tly_sweep_pace(&p, 60000, 10000, 43, &wait), 256); /* 258 owed */
    assert_int_equal(wait, 43); /* 2 left: (256 - 2) / 6 = 42.3 */
    assert_int_equal(tly_sweep_pace(&p, 60000, 10000, 43, &wait), 256); /* 4 left */
    assert_int_equal(wait, 42);
    /* a whole pass within the period (and one wait), not much more */
    tly_sweep_pace_t q = {0};
    uint64_t total = pace_for(&q, 60000, 10000, 10000 + 43, 256);
    assert_true(total >= 60000 && total <= 60000 + 2 * 256 + 64);

    /* 10,000,000 every 10 s: 1,000 a millisecond, more than 256 steps a
     * millisecond apart could visit: steps grow to 1,000 to keep the
     * period */
    tly_sweep_pace_t big = {0};
    assert_int_equal(tly_sweep_pace(&big, 10000000, 10000, 0, &wait), 64);
    assert_int_equal(wait, 1);
    assert_int_equal(tly_sweep_pace(&big, 10000000, 10000, 1, &wait), 1000);
    assert_int_equal(wait, 1);
    tly_sweep_pace_t big2 = {0};
    assert_true(pace_for(&big2, 10000000, 10000, 10000 + 1, 1000) >= 10000000);

    /* a small store: the floor, which covers it, every 250 ms */
    tly_sweep_pace_t small = {0};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(tly_sweep_pace(&small, 10, 10000, i ? 250 : 0, &wait), 64);
        assert_int_equal(wait, 250);
    }
    assert_int_equal(tly_sweep_pace(&small, 0, 10000, 250, &wait), 64);
    assert_int_equal(wait, 250);
    /* a clock running backwards owes nothing */
    tly_sweep_pace_t back = {0};
    assert_int_equal(tly_sweep_pace(&back, 60000, 10000, -5000, &wait), 64);
    assert_int_equal(wait, 43);
}

static void test_sweep_pace_owes_at_most_one_pass(void **state)
{
    (void)state;
    /* an hour without a step (a suspended process) owes one pass of
     * 60,000 records, not 360, and so do three: steps of 256 a millisecond
     * apart until it is visited, then the usual pace */
    tly_sweep_pace_t p = {0};
    int64_t wait;
    for (int i = 0; i < 3; i++) { /* three such hours, one pass owed */
        assert_int_equal(tly_sweep_pace(&p, 60000, 10000, 3600000, &wait), 256);
        assert_int_equal(wait, 1);
    }
    int steps = 1;
    while (wait == 1) {
        assert_int_equal(tly_sweep_pace(&p, 60000, 10000, 1, &wait), 256);
        steps++;
        assert_true(steps < 300);
    }
    /* the first step leaves 59,744 owed; each step a millisecond later
     * adds 6 and visits 256, 250 fewer; the wait stays 1 ms while a step
     * is owed within 1 ms (owed >= 250): after 238 more steps 244 are
     * owed, and (256 - 244) / 6 = 2 ms */
    assert_int_equal(steps, 1 + 238);
    assert_int_equal(wait, 2);
}

static void test_budgeted_sweeps_expire_in_steps(void **state)
{
    fx_t *fx = *state;
    /* the users of the test below: at T + 1d - 20m, those whose only event
     * is at T - m for m in 21..49 expire: 29 of every 50, 580 of 1000 */
    for (int u = 0; u < 1000; u++)
        assert_int_equal(put(fx, T, T - (u % 50) * MIN, 100 + u, NULL, "click", u), TLY_OK);
    int64_t now = T + DAY - 20 * MIN;
    size_t total = 0, calls = 0, first = tly_store_sweep(fx->store, now, 100);
    assert_true(first <= 100); /* a step, not a pass */
    total = first;
    /* 1,000 records at 100 a step: ten steps make a pass; a few more find
     * nothing new */
    for (calls = 1; calls < 14; calls++) {
        size_t gone = tly_store_sweep(fx->store, now, 100);
        assert_true(gone <= 100);
        total += gone;
    }
    assert_int_equal(total, 580);
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 420);
    assert_int_equal(st.expired, 580);
    /* the survivors are exactly the users with u % 50 <= 20 */
    for (int u = 0; u < 1000; u++) {
        char id[16];
        int n = snprintf(id, sizeof id, "%d", 100 + u);
        int64_t last = 0;
        tly_featwin_t req = {0, 0};
        tly_value_t out;
        tly_store_read(fx->store, fx->user, id, (size_t)n, &req, 1, now, &out, &last, NULL, 0);
        if (u % 50 <= 20)
            assert_int_equal(last, T - (u % 50) * MIN);
        else
            assert_int_equal(last, -1);
    }
    /* a full pass afterwards finds nothing left to expire */
    assert_int_equal(tly_store_sweep(fx->store, now, 0), 0);
}

static void test_idle_entities_expire_and_memory_returns(void **state)
{
    fx_t *fx = *state;
    for (int u = 0; u < 1000; u++)
        assert_int_equal(put(fx, T, T - (u % 50) * MIN, 100 + u, NULL, "click", u), TLY_OK);
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 1000);
    assert_true(st.bytes > 0);
    /* at T + 30m nothing expires: recent/last keep a user for 1d */
    assert_int_equal(tly_store_sweep(fx->store, T + 30 * MIN, 0), 0);
    /* at T + 1d - 20m a user can still matter if its newest event is at or
     * after T - 20m (recent/last keep 1d; the 1h windows reach less far):
     * users with events at T - m for m in 21..49 go, 29 of every 50 */
    size_t gone = tly_store_sweep(fx->store, T + DAY - 20 * MIN, 0);
    assert_int_equal(gone, 580);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 420);
    assert_int_equal(st.expired, 580);
    assert_int_equal(tly_store_sweep(fx->store, T + 3 * DAY, 0), 420);
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 0);
    /* only the intern table and an empty store's slot arrays are left */
    tly_store_t *empty = tly_store_new(fx->fs);
    tly_store_stats_t est;
    tly_store_stats(empty, &est);
    tly_store_free(empty);
    assert_int_equal(st.table_bytes, est.table_bytes);
    assert_int_equal(st.bytes, st.interned_bytes + st.table_bytes);
    /* a swept user starts afresh */
    assert_int_equal(put(fx, T + 3 * DAY, T + 3 * DAY, 100, NULL, "click", -1), TLY_OK);
    assert_int_equal(count(fx, "100", "clicks", 1, T + 3 * DAY), 1);
}

/* An event for the ordering test's featset: user 1, action a, dwell (< 0:
 * absent). */
static tly_event_t order_event(const tly_featset_t *fs, int64_t t, const char *a, int64_t dwell)
{
    tly_event_t e;
    memset(&e, 0, sizeof e);
    e.nfields = (uint32_t)fs->nfields;
    e.time_ms = t;
    e.vals[tly_featset_field(fs, "ts", 2)] = (tly_value_t){.type = TLY_V_INT, .u.i = t};
    e.vals[tly_featset_field(fs, "user_id", 7)] = (tly_value_t){.type = TLY_V_INT, .u.i = 1};
    e.vals[tly_featset_field(fs, "action", 6)] =
        (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(a), .u.s = a};
    if (dwell >= 0)
        e.vals[tly_featset_field(fs, "dwell_ms", 8)] =
            (tly_value_t){.type = TLY_V_INT, .u.i = dwell};
    return e;
}

/* Item lists come first in this config's slot order: a busy user (word
 * encoding) must still answer every feature exactly. Expected values are
 * counted by hand from the loop below. */
/* Windowed sums of a word-encoded record whose integers pass INT64_MAX turn
 * into doubles, as tly_agg_cell_merge's rule says; below it they stay
 * integers. 2^62 is exact in a double, and so are its small multiples. */
static void test_word_encoded_sum_past_int64_turns_double(void **state)
{
    fx_t *fx = *state;
    /* 60 events with dwell 0 over the last 30 minutes: past the compact
     * log's size, so the record is in the word encoding */
    for (int i = 0; i < 60; i++)
        assert_int_equal(put(fx, T, T - (60 - i) * 30 * SEC, 7, "p", "view", 0), TLY_OK);
    assert_true(user_words(fx, "7"));
    tly_value_t v = get(fx, fx->user, "7", "dwell", 0, T);
    assert_int_equal(v.type, TLY_V_INT);
    assert_int_equal(v.u.i, 0);
    const int64_t big = INT64_C(1) << 62;
    assert_int_equal(put(fx, T, T - 5 * MIN, 7, "p", "view", big), TLY_OK);
    v = get(fx, fx->user, "7", "dwell", 0, T);
    assert_int_equal(v.type, TLY_V_INT);
    assert_int_equal(v.u.i, big);
    assert_int_equal(put(fx, T, T - 3 * MIN, 7, "p", "view", big), TLY_OK);
    assert_int_equal(put(fx, T, T - 1 * MIN, 7, "p", "view", big), TLY_OK);
    v = get(fx, fx->user, "7", "dwell", 0, T);
    assert_int_equal(v.type, TLY_V_DOUBLE);
    assert_true(v.u.d == 3.0 * 0x1p62);
    v = get(fx, fx->user, "7", "davg", 0, T);
    assert_int_equal(v.type, TLY_V_DOUBLE);
    assert_true(v.u.d == 3.0 * 0x1p62 / 63);
    v = get(fx, fx->user, "7", "dmax", 0, T);
    assert_int_equal(v.type, TLY_V_INT);
    assert_int_equal(v.u.i, big);
    /* at T + 58m the window [T-2m, ...) holds only the last one */
    v = get(fx, fx->user, "7", "dwell", 0, T + 58 * MIN);
    assert_int_equal(v.type, TLY_V_INT);
    assert_int_equal(v.u.i, big);
}

/* Items of eight 65,536-byte strings are 65,547 words wide, more than the
 * 16 bits the list's count word keeps for a width: the list is stored as
 * one of mixed widths, reads every item back, and a snapshot of it loads
 * (it was refused as malformed). */
static void test_items_wider_than_the_width_field_read_and_round_trip(void **state)
{
    (void)state;
    static const char *cfg_yaml = "events:\n"
                                  "  time: { field: ts, unit: ms }\n"
                                  "  max_string: 65536\n"
                                  "features:\n"
                                  "  - { name: wide, entity: user, key: user_id, agg: last_k, k: 2,"
                                  " value: [a, b, c, d, e, f, g, h] }\n";
    void *fxp = NULL;
    assert_int_equal(setup_yaml(&fxp, cfg_yaml), 0);
    fx_t *fx = fxp;
    const tly_featset_t *fs = fx->fs;
    tly_store_t *store = fx->store;
    char err[256];
    enum { LEN = 65536, NV = 8 };
    char *text = malloc(3 * NV * (size_t)LEN);
    size_t scap = 2 * NV * (size_t)LEN + 64;
    char *sbuf = malloc(scap);
    assert_true(text != NULL && sbuf != NULL);
    static const char *const names[NV] = {"a", "b", "c", "d", "e", "f", "g", "h"};
    /* event n: eight strings of n's own bytes, LEN long (the third: 1) */
    for (int n = 0; n < 3; n++)
        for (int v = 0; v < NV; v++)
            memset(text + ((size_t)n * NV + (size_t)v) * LEN, 'a' + n * NV + v, LEN);
    tly_store_t *copy = NULL;
    for (int n = 0; n < 3; n++) {
        tly_event_t e;
        memset(&e, 0, sizeof e);
        e.nfields = (uint32_t)fs->nfields;
        e.time_ms = T - (3 - n) * SEC;
        e.vals[tly_featset_field(fs, "user_id", 7)] = (tly_value_t){.type = TLY_V_INT, .u.i = 1};
        for (int v = 0; v < NV; v++)
            e.vals[tly_featset_field(fs, names[v], 1)] =
                (tly_value_t){.type = TLY_V_STR,
                              .len = n < 2 ? LEN : 1,
                              .u.s = text + ((size_t)n * NV + (size_t)v) * LEN};
        assert_int_equal(tly_store_apply(store, &e, 0, n, T), TLY_OK);
        if (n == 0) { /* one wide item: a snapshot of it loads */
            dump_t d = {.n = 0};
            assert_int_equal(tly_store_dump(store, NULL, keep_block, &d), TLY_OK);
            copy = tly_store_new(fs);
            for (size_t b = 0; b < d.n; b++) {
                if (tly_store_load(copy, d.blocks[b], d.lens[b], NULL, err, sizeof err) != TLY_OK)
                    fail_msg("load: %s", err);
                free(d.blocks[b]);
            }
        }
    }
    /* the copy holds the first wide item, the store the second and the
     * narrow one (k = 2), newest first */
    tly_store_t *both[2] = {copy, store};
    for (int s = 0; s < 2; s++) {
        tly_item_t it[4];
        size_t n = 0;
        assert_int_equal(
            tly_store_recent(both[s], 0, "1", 1, 0, INT64_MIN, T, it, 4, &n, sbuf, scap), TLY_OK);
        assert_int_equal(n, s == 0 ? 1 : 2);
        for (size_t i = 0; i < n; i++) {
            int ev = s == 0 ? 0 : 2 - (int)i;
            assert_int_equal(it[i].time_ms, T - (3 - ev) * SEC);
            assert_int_equal(it[i].nvals, NV);
            for (int v = 0; v < NV; v++) {
                assert_int_equal(it[i].vals[v].len, ev < 2 ? LEN : 1);
                assert_memory_equal(it[i].vals[v].u.s, text + ((size_t)ev * NV + (size_t)v) * LEN,
                                    it[i].vals[v].len);
            }
        }
    }
    free(sbuf);
    free(text);
    tly_store_free(copy);
    teardown(&fxp);
}

/* A sum and a min whose answers depend on the order values are folded in:
 * the compact log folds as the word encoding does (each bucket's values in
 * arrival order, then the buckets oldest first), so a record answers the
 * same before and after it is replayed into words. */
static void test_compact_and_word_folds_agree_where_order_matters(void **state)
{
    (void)state;
    static const char *cfg_yaml =
        "events:\n"
        "  time: { field: ts, unit: ms }\n"
        "features:\n"
        "  - { name: s, entity: user, key: user_id, where: { action: x }, agg: sum, value: v,"
        " windows: [1h] }\n"
        "  - { name: mn, entity: user, key: user_id, where: { action: x }, agg: min, value: v,"
        " windows: [1h] }\n"
        "  - { name: pad, entity: user, key: user_id, where: { action: pad }, agg: count,"
        " windows: [1h] }\n";
    void *fxp = NULL;
    assert_int_equal(setup_yaml(&fxp, cfg_yaml), 0);
    fx_t *fx = fxp;
    const tly_featset_t *fs = fx->fs;
    tly_store_t *store = fx->store;
    int f_user = tly_featset_field(fs, "user_id", 7), f_action = tly_featset_field(fs, "action", 6),
        f_v = tly_featset_field(fs, "v", 1);
    /* per user: (minutes before T, value); the 1h window's hop is 1m, so
     * T - 10m and T - 20m are two buckets, the newer one first to arrive */
    static const struct {
        int user, ago;
        tly_value_t v;
    } evs[] = {
        {1, 10, {.type = TLY_V_DOUBLE, .u.d = 1e16}},
        {1, 20, {.type = TLY_V_DOUBLE, .u.d = 1.0}},
        {1, 10, {.type = TLY_V_DOUBLE, .u.d = -1e16}},
        {2, 10, {.type = TLY_V_INT, .u.i = INT64_MAX}},
        {2, 20, {.type = TLY_V_INT, .u.i = 1}},
        {2, 10, {.type = TLY_V_INT, .u.i = -1}},
        {3, 10, {.type = TLY_V_DOUBLE, .u.d = 1.0}},
        {3, 20, {.type = TLY_V_INT, .u.i = 1}},
        {4, 10, {.type = TLY_V_INT, .u.i = INT64_MAX - 1}},
        {4, 20, {.type = TLY_V_INT, .u.i = 2}},
        {4, 10, {.type = TLY_V_INT, .u.i = -1}},
    };
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++) {
        tly_event_t e;
        memset(&e, 0, sizeof e);
        e.nfields = (uint32_t)fs->nfields;
        e.time_ms = T - evs[i].ago * MIN;
        e.vals[f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = evs[i].user};
        e.vals[f_action] = (tly_value_t){.type = TLY_V_STR, .len = 1, .u.s = "x"};
        e.vals[f_v] = evs[i].v;
        assert_int_equal(tly_store_apply(store, &e, 0, (int64_t)i, T), TLY_OK);
    }
    uint32_t sum, mn;
    int win;
    assert_int_equal(tly_featset_resolve(fs, 0, "s", 1, &sum, &win), TLY_OK);
    assert_int_equal(tly_featset_resolve(fs, 0, "mn", 2, &mn, &win), TLY_OK);
    for (int pass = 0; pass < 2; pass++) { /* the compact log, then words */
        for (int u = 1; u <= 4; u++) {
            char uid[2] = {(char)('0' + u), 0};
            assert_true(user_words(fx, uid) == (pass == 1));
        }
        tly_featwin_t req[2] = {{sum, 0}, {mn, 0}};
        tly_value_t out[2];
        char sbuf[64];
        /* user 1: 1.0 + (1e16 + -1e16) = 1.0; summed in arrival order the
         * 1.0 is lost in 1e16's rounding and the answer is 0 */
        assert_int_equal(tly_store_read(store, 0, "1", 1, req, 1, T, out, NULL, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(out[0].type, TLY_V_DOUBLE);
        assert_true(out[0].u.d == 1.0);
        /* user 2: 1 + (INT64_MAX - 1) = INT64_MAX, an integer; in arrival
         * order INT64_MAX + 1 overflows into a double */
        assert_int_equal(tly_store_read(store, 0, "2", 1, req, 1, T, out, NULL, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(out[0].type, TLY_V_INT);
        assert_true(out[0].u.i == INT64_MAX);
        /* user 3: min of the integer 1 (the older bucket) and the double 1.0:
         * the tie keeps the value folded first, the integer */
        assert_int_equal(tly_store_read(store, 0, "3", 1, req, 2, T, out, NULL, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(out[1].type, TLY_V_INT);
        assert_int_equal(out[1].u.i, 1);
        /* user 4: 2 + ((INT64_MAX - 1) + -1) = INT64_MAX, an integer; in
         * arrival order INT64_MAX - 1 + 2 overflows into a double */
        assert_int_equal(tly_store_read(store, 0, "4", 1, req, 1, T, out, NULL, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(out[0].type, TLY_V_INT);
        assert_true(out[0].u.i == INT64_MAX);
        /* 80 more events each (another feature's): past the compact log's
         * size, into the word encoding */
        for (int u = 1; pass == 0 && u <= 4; u++)
            for (int i = 0; i < 80; i++) {
                tly_event_t e;
                memset(&e, 0, sizeof e);
                e.nfields = (uint32_t)fs->nfields;
                e.time_ms = T - 5 * MIN;
                e.vals[f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = u};
                e.vals[f_action] = (tly_value_t){.type = TLY_V_STR, .len = 3, .u.s = "pad"};
                assert_int_equal(tly_store_apply(store, &e, 0, 100 + i, T), TLY_OK);
            }
    }
    teardown(&fxp);
}

/* One record of a dump, for comparing two stores record by record (their
 * tables are seeded apart, so their dumps list records in other orders). */
typedef struct {
    uint32_t type, used;
    uint8_t mode, idlen;
    char id[64];
    const uint8_t *words;
} drec_t;

static int drec_cmp(const void *a, const void *b)
{
    const drec_t *x = a, *y = b;
    if (x->type != y->type)
        return x->type < y->type ? -1 : 1;
    if (x->idlen != y->idlen)
        return x->idlen < y->idlen ? -1 : 1;
    return memcmp(x->id, y->id, x->idlen);
}

typedef struct {
    drec_t *out;
    size_t n, cap;
} dr_ctx_t;

static bool dr_each(const ditem_t *it, void *ctx)
{
    dr_ctx_t *c = ctx;
    assert_true(c->n < c->cap);
    drec_t *r = &c->out[c->n++];
    r->type = it->type;
    r->idlen = it->idlen;
    r->mode = it->mode;
    r->used = it->used;
    assert_true(r->idlen < sizeof r->id);
    memcpy(r->id, it->id, r->idlen);
    r->words = it->words;
    return false;
}

/* The entity items of a dump's blocks, sorted by type and id. */
static size_t dump_records(const dump_t *d, drec_t *out, size_t cap)
{
    dr_ctx_t c = {.out = out, .n = 0, .cap = cap};
    for (size_t b = 0; b < d->n; b++)
        walk_block(d->blocks[b], d->lens[b], dr_each, &c);
    qsort(out, c.n, sizeof *out, drec_cmp);
    return c.n;
}

/* A compact log turns into the word encoding by building each segment at
 * once (store_words_build), not by replaying its records one by one; the
 * replay (the path every live event takes, kept for tests) is the oracle:
 * two stores take the same random stream, one converting each way, and
 * every record must come out word for word the same. The stream mixes
 * every aggregation, buckets in and out of their windows, times after the
 * writer's now, `last` and short and long `last_k` lists, items that
 * cannot be packed (a long string, a missing value) or change schema
 * (a number, then a bool). */
static void test_compact_conversion_builds_what_replay_writes(void **state)
{
    (void)state;
    static const char *cfg_yaml =
        "events:\n"
        "  time: { field: ts, unit: ms }\n"
        "  max_future_skew: 10m\n"
        "features:\n"
        "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
        " windows: [5m, 1h, 1d, 7d] }\n"
        "  - { name: s, entity: user, key: user_id, agg: sum, value: v, windows: [5m, 1h] }\n"
        "  - { name: mn, entity: user, key: user_id, agg: min, value: v, windows: [1h] }\n"
        "  - { name: mx, entity: user, key: user_id, where: { action: [click, save] }, agg: max,"
        " value: v, windows: [1h, 1d] }\n"
        "  - { name: av, entity: user, key: user_id, agg: avg, value: v, windows: [1d] }\n"
        "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
        "  - { name: last_label, entity: user, key: user_id, agg: last, value: label }\n"
        "  - { name: few, entity: user, key: user_id, agg: last_k, k: 3, value: [action, v] }\n"
        "  - { name: many, entity: user, key: user_id, agg: last_k, k: 100,"
        " value: [pin_id, action] }\n"
        "  - { name: labels, entity: user, key: user_id, agg: last_k, k: 40, value: [label] }\n"
        "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
        " agg: count, windows: [1h, 1d] }\n";
    void *fxp = NULL;
    assert_int_equal(setup_yaml(&fxp, cfg_yaml), 0);
    fx_t *fx = fxp;
    const tly_featset_t *fs = fx->fs;
    tly_store_t *built = fx->store, *replayed = tly_store_new(fs);
    replayed->replay_conversions = true;
    int f_v = tly_featset_field(fs, "v", 1), f_label = tly_featset_field(fs, "label", 5);
    static const char *const actions[] = {"click", "save", "impression", "hide"};
    static const char long_label[] = "a label too long to be interned, so never packed";
    uint64_t r = 0x9e3779b97f4a7c15;
    int64_t now = T;
    char pins[100][12];
    for (int i = 0; i < 100; i++)
        snprintf(pins[i], sizeof pins[i], "%d", i);
    for (int i = 0; i < 30000; i++) {
        r = r * 6364136223846793005u + 1442695040888963407u;
        uint32_t x = (uint32_t)(r >> 33);
        now += x % 3 == 0 ? SEC : 0; /* the writer's clock moves on */
        int user = (int)(x % 500), pin = (int)((x >> 9) % 100);
        tly_event_t e;
        memset(&e, 0, sizeof e);
        e.nfields = (uint32_t)fs->nfields;
        /* mostly the last hour, some of the last two days (past the short
         * windows), a few after now (within the skew) and of a sparse
         * user's own minute, for equal times */
        uint32_t y = (uint32_t)(r >> 13);
        e.time_ms = y % 10 == 0   ? now - (int64_t)(y % (2 * 24 * 60)) * MIN
                    : y % 10 == 1 ? now + (int64_t)(y % 300) * SEC
                    : y % 10 == 2 ? now - (now % MIN) - user * SEC
                                  : now - (int64_t)(y % 3600) * SEC;
        const char *action = actions[(x >> 17) % 4];
        e.vals[fx->f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = user};
        e.vals[fx->f_pin] =
            (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(pins[pin]), .u.s = pins[pin]};
        e.vals[fx->f_action] =
            (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(action), .u.s = action};
        switch ((x >> 20) % 8) { /* v: mostly integers, some doubles, some missing */
        case 0:
            e.vals[f_v] = (tly_value_t){.type = TLY_V_DOUBLE, .u.d = (double)(x % 1000) / 7.0};
            break;
        case 1:
            break;
        default:
            e.vals[f_v] = (tly_value_t){.type = TLY_V_INT, .u.i = (int64_t)(x % 5000) - 100};
            break;
        }
        /* label: a short string for most users; users divisible by 7 also
         * get long ones, by 11 missing ones, by 13 numbers and bools */
        if (user % 7 == 0 && x % 5 == 0)
            e.vals[f_label] =
                (tly_value_t){.type = TLY_V_STR, .len = sizeof long_label - 1, .u.s = long_label};
        else if (user % 11 == 0 && x % 4 == 0)
            ;
        else if (user % 13 == 0)
            e.vals[f_label] = x % 2 ? (tly_value_t){.type = TLY_V_INT, .u.i = x % 9}
                                    : (tly_value_t){.type = TLY_V_BOOL, .u.i = x % 3 == 0};
        else
            e.vals[f_label] =
                (tly_value_t){.type = TLY_V_STR, .len = 2, .u.s = x % 3 ? "ab" : "cd"};
        tly_err_t a = tly_store_apply(built, &e, 0, i, now);
        tly_err_t b = tly_store_apply(replayed, &e, 0, i, now);
        assert_int_equal(a, b);
    }
    dump_t da = {.n = 0}, db = {.n = 0};
    assert_int_equal(tly_store_dump(built, NULL, keep_block, &da), TLY_OK);
    assert_int_equal(tly_store_dump(replayed, NULL, keep_block, &db), TLY_OK);
    static drec_t ra[2000], rb[2000];
    size_t na = dump_records(&da, ra, 2000), nb = dump_records(&db, rb, 2000);
    assert_int_equal(na, nb);
    assert_int_equal(na, 600); /* 500 users and 100 pins */
    size_t words = 0;
    for (size_t i = 0; i < na; i++) {
        assert_int_equal(drec_cmp(&ra[i], &rb[i]), 0);
        assert_int_equal(ra[i].mode, rb[i].mode);
        assert_int_equal(ra[i].used, rb[i].used);
        size_t bytes = ra[i].mode & 2 ? 8 * (size_t)ra[i].used : ra[i].used;
        if (memcmp(ra[i].words, rb[i].words, bytes) != 0)
            fail_msg("type %u id %.*s: the built record differs from the replayed one", ra[i].type,
                     (int)ra[i].idlen, ra[i].id);
        words += (ra[i].mode & 2) != 0;
    }
    assert_true(words >= 590); /* nearly all of them converted */
    for (size_t b = 0; b < da.n; b++)
        free(da.blocks[b]);
    for (size_t b = 0; b < db.n; b++)
        free(db.blocks[b]);
    tly_store_free(replayed);
    teardown(&fxp);
}

/* A record is found again by its id whatever the id's length: the empty
 * id, ids shorter than a word, of one or two words, and longer (the key
 * compare reads them by words up to sixteen bytes). Each id takes three
 * events; each must read a count of 3, and there must be one record each. */
static void test_ids_of_every_length_are_found_again(void **state)
{
    fx_t *fx = *state;
    char ids[25][32];
    for (int len = 0; len <= 24; len++) {
        for (int i = 0; i < len; i++)
            ids[len][i] = (char)('a' + (len + i) % 26);
        ids[len][len] = '\0';
        for (int k = 0; k < 3; k++) {
            tly_event_t e;
            memset(&e, 0, sizeof e);
            e.nfields = (uint32_t)fx->fs->nfields;
            e.time_ms = T - (len * 3 + k) * SEC;
            e.vals[fx->f_user] =
                (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)len, .u.s = ids[len]};
            e.vals[fx->f_pin] = (tly_value_t){.type = TLY_V_STR, .len = 1, .u.s = "p"};
            e.vals[fx->f_action] = (tly_value_t){.type = TLY_V_STR, .len = 5, .u.s = "click"};
            assert_int_equal(tly_store_apply(fx->store, &e, 0, len * 3 + k, T), TLY_OK);
        }
    }
    for (int len = 0; len <= 24; len++)
        if (get(fx, fx->user, ids[len], "clicks", 0, T).u.i != 3)
            fail_msg("id of %d bytes: %" PRId64 " clicks, want 3", len,
                     get(fx, fx->user, ids[len], "clicks", 0, T).u.i);
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.entities, 25); /* no pin feature counts clicks */
}

/* Events alike in their `where` outcome and in the kinds of their numeric
 * values share phase 1's verdict (a per-thread memo); each must still be
 * judged on what the memo does not hold: a value absent or of another
 * kind, a feature the event is too old for, an item string too long, a
 * missing key. Every event of user 1 clicks pin 9; before each variant
 * the clean event that makes the memo it would use. The expected values
 * and counters are worked out by hand from the rules of DESIGN.md. */
static void test_alike_events_are_still_judged_each_on_its_own(void **state)
{
    (void)state;
    static const char *cfg_yaml =
        "events:\n"
        "  time: { field: ts, unit: ms }\n"
        "  max_string: 8\n"
        "features:\n"
        "  - { name: c5, entity: user, key: user_id, where: { action: click }, agg: count,"
        " windows: [5m] }\n"
        "  - { name: c1d, entity: user, key: user_id, where: { action: click }, agg: count,"
        " windows: [1d] }\n"
        "  - { name: s, entity: user, key: user_id, where: { action: click }, agg: sum, value: v,"
        " windows: [1d] }\n"
        "  - { name: tags, entity: user, key: user_id, where: { action: click }, agg: last_k,"
        " k: 5, value: [tag] }\n"
        "  - { name: pc, entity: pin, key: pin_id, where: { action: click }, agg: count,"
        " windows: [1d] }\n";
    for (int hinted = 0; hinted < 2; hinted++) {
        void *fxp = NULL;
        assert_int_equal(setup_yaml(&fxp, cfg_yaml), 0);
        fx_t *fx = fxp;
        const tly_featset_t *fs = fx->fs;
        int f_v = tly_featset_field(fs, "v", 1), f_tag = tly_featset_field(fs, "tag", 3);
        /* kind of variant: 0 clean, 1 no v, 2 v a string, 3 an hour old,
         * 4 tag too long, 5 no user_id */
        static const struct {
            int kind;
            tly_err_t want;
        } seq[] = {{0, TLY_OK}, {1, TLY_OK},
                   {0, TLY_OK}, {2, TLY_E_EV_WRONG_TYPE},
                   {0, TLY_OK}, {3, TLY_OK},
                   {0, TLY_OK}, {4, TLY_E_EV_VALUE_TOO_LONG},
                   {0, TLY_OK}, {5, TLY_E_EV_MISSING_KEY},
                   {1, TLY_OK}, {0, TLY_OK}};
        for (size_t i = 0; i < sizeof seq / sizeof seq[0]; i++) {
            tly_event_t e;
            memset(&e, 0, sizeof e);
            e.nfields = (uint32_t)fs->nfields;
            e.time_ms = seq[i].kind == 3 ? T - HOUR : T - (int64_t)i * SEC;
            e.vals[fx->f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = 1};
            e.vals[fx->f_pin] = (tly_value_t){.type = TLY_V_INT, .u.i = 9};
            e.vals[fx->f_action] = (tly_value_t){.type = TLY_V_STR, .len = 5, .u.s = "click"};
            e.vals[f_v] = (tly_value_t){.type = TLY_V_INT, .u.i = 5};
            e.vals[f_tag] = (tly_value_t){.type = TLY_V_STR, .len = 2, .u.s = "ab"};
            if (seq[i].kind == 1)
                e.vals[f_v] = (tly_value_t){.type = TLY_V_NIL};
            if (seq[i].kind == 2)
                e.vals[f_v] = (tly_value_t){.type = TLY_V_STR, .len = 1, .u.s = "5"};
            if (seq[i].kind == 4)
                e.vals[f_tag] = (tly_value_t){.type = TLY_V_STR, .len = 9, .u.s = "toolongxx"};
            if (seq[i].kind == 5)
                e.vals[fx->f_user] = (tly_value_t){.type = TLY_V_NIL};
            tly_err_t rc;
            if (hinted) {
                tly_prefetch_t pf;
                tly_store_prefetch(fx->store, &e, &pf);
                rc = tly_store_apply_hinted(fx->store, &e, &pf, 0, (int64_t)i, T);
            } else {
                rc = tly_store_apply(fx->store, &e, 0, (int64_t)i, T);
            }
            if (rc != seq[i].want)
                fail_msg("event %zu (kind %d): %d, want %d", i, seq[i].kind, (int)rc,
                         (int)seq[i].want);
        }
        /* taken: the 6 clean events, the 2 without v, the hour-old one
         * (all but c5, whose 5m window it is too old for) */
        assert_int_equal(get(fx, fx->user, "1", "c5", 0, T).u.i, 8);
        assert_int_equal(get(fx, fx->user, "1", "c1d", 0, T).u.i, 9);
        assert_int_equal(get(fx, fx->user, "1", "s", 0, T).u.i, 7 * 5);
        assert_int_equal(get(fx, fx->user, "1", "tags", 0, T).u.i, 5);
        assert_int_equal(get(fx, fx->pin, "9", "pc", 0, T).u.i, 9);
        tly_store_stats_t st;
        tly_store_stats(fx->store, &st);
        assert_int_equal(st.dropped[TLY_E_EV_WRONG_TYPE], 1);
        assert_int_equal(st.dropped[TLY_E_EV_VALUE_TOO_LONG], 1);
        assert_int_equal(st.dropped[TLY_E_EV_MISSING_KEY], 1);
        assert_int_equal(st.dropped[TLY_E_EV_LATE], 1);
        assert_int_equal(st.events_applied, 9);
        teardown(&fxp);
    }
}

static void test_item_feature_before_windowed_ones_in_word_encoding(void **state)
{
    (void)state;
    static const char *cfg_yaml =
        "events:\n"
        "  time: { field: ts, unit: ms }\n"
        "features:\n"
        "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 4, value: [action] }\n"
        "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
        " windows: [5m, 1h] }\n"
        "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
        "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h] "
        "}\n";
    char err[256];
    tly_config_t *cfg = NULL;
    tly_featset_t *fs = NULL;
    assert_int_equal(tly_config_load_string(cfg_yaml, "order.yaml", &cfg, err, sizeof err), TLY_OK);
    assert_int_equal(tly_featset_compile(cfg, &fs, err, sizeof err), TLY_OK);
    tly_store_t *store = tly_store_new(fs);
    uint32_t user = (uint32_t)tly_featset_entity(fs, "user", 4);
    /* 60 events, one every 30 s ending at T - 30 s; every third is a click;
     * dwell = i */
    for (int i = 0; i < 60; i++) {
        int64_t t = T - (60 - i) * 30 * SEC;
        const char *a = i % 3 == 0 ? "click" : "view";
        tly_event_t e = order_event(fs, t, a, i);
        assert_int_equal(tly_store_apply(store, &e, 0, i, T), TLY_OK);
    }
    uint32_t fr, fc, fl, fd;
    int w;
    assert_int_equal(tly_featset_resolve(fs, user, "recent", 6, &fr, &w), TLY_OK);
    assert_int_equal(tly_featset_resolve(fs, user, "clicks", 6, &fc, &w), TLY_OK);
    assert_int_equal(tly_featset_resolve(fs, user, "last_action", 11, &fl, &w), TLY_OK);
    assert_int_equal(tly_featset_resolve(fs, user, "dwell", 5, &fd, &w), TLY_OK);
    tly_featwin_t req[] = {{fc, 0}, {fc, 1}, {fl, 0}, {fd, 0}, {fr, 0}};
    tly_value_t out[5];
    char sbuf[256];
    assert_int_equal(tly_store_read(store, user, "1", 1, req, 5, T, out, NULL, sbuf, sizeof sbuf),
                     TLY_OK);
    /* 5m at T holds [T-5m, T+10s): events i = 50..59, clicks i = 51, 54, 57 */
    assert_int_equal(out[0].u.i, 3);
    /* 1h holds all 60 (the first at T - 30m): clicks i = 0, 3, ..., 57 */
    assert_int_equal(out[1].u.i, 20);
    assert_int_equal(out[2].type, TLY_V_STR); /* newest: i = 59, view */
    assert_memory_equal(out[2].u.s, "view", 4);
    assert_int_equal(out[3].u.i, 59 * 60 / 2); /* sum of 0..59 */
    assert_int_equal(out[4].u.i, 4);           /* recent holds k = 4 items */
    tly_item_t it[4];
    size_t n = 0;
    assert_int_equal(
        tly_store_recent(store, user, "1", 1, fr, INT64_MIN, T, it, 4, &n, sbuf, sizeof sbuf),
        TLY_OK);
    assert_int_equal(n, 4);
    assert_int_equal(it[0].time_ms, T - 30 * SEC);
    assert_int_equal(it[3].time_ms, T - 4 * 30 * SEC);
    assert_memory_equal(it[1].vals[0].u.s, "view", 4);  /* i = 58 */
    assert_memory_equal(it[2].vals[0].u.s, "click", 5); /* i = 57 */
    /* ties keep arrival order (newest first means the later arrival first),
     * both while all items have one width and after a long (not interned)
     * string makes widths differ */
    const char *longa = "a-string-longer-than-the-intern-limit-0123456789";
    const char *acts[] = {"save", "hide", longa, "like", "pin"};
    int64_t times[] = {T - 15 * SEC, T - 15 * SEC, T - 10 * SEC, T - 10 * SEC, T - 45 * SEC};
    for (int i = 0; i < 5; i++) {
        tly_event_t e = order_event(fs, times[i], acts[i], -1);
        assert_int_equal(tly_store_apply(store, &e, 0, 100 + i, T), TLY_OK);
    }
    assert_int_equal(
        tly_store_recent(store, user, "1", 1, fr, INT64_MIN, T, it, 4, &n, sbuf, sizeof sbuf),
        TLY_OK);
    /* newest first: like (T-10s, after the long one), long, hide, save (T-15s) */
    const char *want[] = {"like", longa, "hide", "save"};
    assert_int_equal(n, 4);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(it[i].vals[0].len, strlen(want[i]));
        assert_memory_equal(it[i].vals[0].u.s, want[i], strlen(want[i]));
    }
    tly_store_free(store);
    tly_featset_free(fs);
    tly_config_free(cfg);
}

static void test_buckets_outside_every_window_are_pruned(void **state)
{
    fx_t *fx = *state;
    /* one user clicking every 10 s for 2 days: state stays bounded */
    tly_store_stats_t st;
    uint64_t peak = 0;
    for (int64_t t = T; t < T + 2 * DAY; t += 10 * SEC) {
        assert_int_equal(put(fx, t, t, 9, NULL, "click", 1), TLY_OK);
        if ((t - T) % HOUR == 0 && t > T + 2 * HOUR) {
            tly_store_stats(fx->store, &st);
            uint64_t held = st.bytes - st.table_bytes; /* the user's record */
            peak = held > peak ? held : peak;
        }
    }
    int64_t now = T + 2 * DAY;
    assert_int_equal(count(fx, "9", "clicks", 0, now), 30); /* [now-5m, now) + empty last */
    assert_int_equal(count(fx, "9", "clicks", 1, now), 360);
    assert_int_equal(count(fx, "9", "dwell", 0, now), 360);
    tly_store_stats(fx->store, &st);
    /* live state: 31 + 61 one-word count buckets, 4 x 61 two-word buckets,
     * a few items: about 5 KiB, plus block growth slack; it must not grow
     * with the 17,280 events */
    printf("# one busy user holds %llu bytes (peak %llu)\n",
           (unsigned long long)(st.bytes - st.table_bytes), (unsigned long long)peak);
    assert_true(peak < 16384);
}

/* ---- a short concurrent run: writers on shared entities, readers, sweeper */

typedef struct {
    fx_t *fx;
    int id;
    atomic_int *done;
} carg_t;

#define CONC_EVENTS 40000

static void *conc_writer(void *arg)
{
    carg_t *a = arg;
    tly_rcu_thread_online();
    char pin[16];
    for (int i = 0; i < CONC_EVENTS; i++) {
        snprintf(pin, sizeof pin, "p%d", i % 37);
        tly_event_t e = ev(a->fx, T + i, i % 101, pin, i % 3 ? "impression" : "click", i % 1000);
        tly_store_apply(a->fx->store, &e, a->id, i, T + i);
    }
    atomic_fetch_add(a->done, 1);
    tly_rcu_thread_offline();
    return NULL;
}

static void *conc_reader(void *arg)
{
    carg_t *a = arg;
    tly_rcu_thread_online();
    uint32_t feat;
    int win;
    tly_featset_resolve(a->fx->fs, a->fx->user, "recent", 6, &feat, &win);
    tly_item_t it[4];
    char sbuf[256], id[16];
    long bad = 0;
    tly_featwin_t req[2] = {{0, 0}, {0, 1}};
    tly_value_t out[2];
    for (int i = 0; atomic_load(a->done) < 2; i++) {
        int n = snprintf(id, sizeof id, "%d", i % 101);
        tly_store_read(a->fx->store, a->fx->user, id, (size_t)n, req, 2, T + CONC_EVENTS, out, NULL,
                       sbuf, sizeof sbuf);
        if (out[0].u.i > out[1].u.i)
            bad++;
        size_t got;
        tly_store_recent(a->fx->store, a->fx->user, id, (size_t)n, feat, INT64_MIN, T + CONC_EVENTS,
                         it, 4, &got, sbuf, sizeof sbuf);
        if (got > 3)
            bad++;
        if (a->id == 0 && i % 1000 == 0) /* the budgeted sweeper, while writers insert */
            tly_store_sweep(a->fx->store, T, 64);
    }
    tly_rcu_thread_offline();
    return (void *)(intptr_t)bad;
}

static void test_concurrent_writers_on_shared_entities_lose_nothing(void **state)
{
    fx_t *fx = *state;
    atomic_int done = 0;
    carg_t w[2] = {{fx, 0, &done}, {fx, 1, &done}}, r[2] = {{fx, 0, &done}, {fx, 1, &done}};
    pthread_t tw[2], tr[2];
    for (int i = 0; i < 2; i++) {
        pthread_create(&tr[i], NULL, conc_reader, &r[i]);
        pthread_create(&tw[i], NULL, conc_writer, &w[i]);
    }
    long bad = 0;
    for (int i = 0; i < 2; i++) {
        void *rv;
        pthread_join(tw[i], NULL);
        pthread_join(tr[i], &rv);
        bad += (long)(intptr_t)rv;
    }
    assert_int_equal(bad, 0);
    /* both writers wrote the same 40000 events: every count doubles */
    int64_t now = T + CONC_EVENTS;
    int64_t clicks = 0, impressions = 0;
    for (int u = 0; u < 101; u++) {
        char id[16];
        snprintf(id, sizeof id, "%d", u);
        clicks += count(fx, id, "clicks", 1, now);
    }
    for (int p = 0; p < 37; p++) {
        char id[16];
        snprintf(id, sizeof id, "p%d", p);
        impressions += get(fx, fx->pin, id, "impressions", 0, now).u.i;
    }
    /* i % 3 == 0 → click: 13334 of 40000 */
    assert_int_equal(clicks, 2 * 13334);
    assert_int_equal(impressions, 2 * (CONC_EVENTS - 13334));
}

/* ---- reads of an entity written meanwhile ------------------------------ */

/* The read hook writes one event of the user being read while a read is
 * under way, in every attempt up to HOOK_WRITES: every attempt that reads
 * the live record in place sees a write land before it checks its values. */
#define HOOK_WRITES 50

typedef struct {
    fx_t *fx;
    int64_t user;
    int calls;
} hook_t;

static void write_during_read(void *ctx)
{
    hook_t *h = ctx;
    if (++h->calls <= HOOK_WRITES)
        assert_int_equal(put(h->fx, T + 1000, T + 500, h->user, "p1", "click", 5), TLY_OK);
}

/* A read that lost a race reads a consistent copy the next time, so it
 * ends after two attempts however often the entity is written: a read of
 * thousands of values of a hot entity otherwise starts over for as long as
 * the writes go on (the server thread with it). Compact records are checked
 * once copied and never start over for a write after that. */
static void test_read_of_an_entity_written_meanwhile_ends_after_one_retry(void **state)
{
    fx_t *fx = *state;
    enum { WORD_EVENTS = 100, COMPACT_EVENTS = 3, NREQ = 1000 };
    for (int i = 0; i < WORD_EVENTS; i++) /* word-encoded: far past the compact log */
        assert_int_equal(put(fx, T + 1000, T + i, 7, "p1", "click", 5), TLY_OK);
    for (int i = 0; i < COMPACT_EVENTS; i++)
        assert_int_equal(put(fx, T + 1000, T + i, 8, "p1", "click", 5), TLY_OK);
    uint32_t feat, recent;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "clicks:1h", 9, &feat, &win), TLY_OK);
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "recent", 6, &recent, &(int){0}),
                     TLY_OK);
    static tly_featwin_t req[NREQ];
    static tly_value_t out[NREQ];
    for (size_t r = 0; r < NREQ; r++)
        req[r] = (tly_featwin_t){feat, (uint32_t)win};
    char sbuf[256];
    hook_t h = {.fx = fx, .user = 7};
    store_read_hook = write_during_read;
    store_read_hook_ctx = &h;

    /* in place, written meanwhile; then a copy, with the first write */
    assert_int_equal(tly_store_read(fx->store, fx->user, "7", 1, req, NREQ, T + 1000, out, NULL,
                                    sbuf, sizeof sbuf),
                     TLY_OK);
    int read_calls = h.calls;
    for (size_t r = 0; r < NREQ; r++) {
        assert_int_equal(out[r].type, TLY_V_INT);
        assert_int_equal(out[r].u.i, WORD_EVENTS + 1);
    }
    /* the same for the items of RECENT (k = 3: the newest three) */
    h.calls = 0;
    tly_item_t it[4];
    size_t got = 0;
    assert_int_equal(tly_store_recent(fx->store, fx->user, "7", 1, recent, INT64_MIN, T + 1000, it,
                                      4, &got, sbuf, sizeof sbuf),
                     TLY_OK);
    int recent_calls = h.calls;
    assert_int_equal(got, 3);
    /* a compact record: one attempt, its copy checked before the write */
    h.calls = 0;
    h.user = 8;
    assert_int_equal(tly_store_read(fx->store, fx->user, "8", 1, req, NREQ, T + 1000, out, NULL,
                                    sbuf, sizeof sbuf),
                     TLY_OK);
    int compact_calls = h.calls;
    store_read_hook = NULL;
    store_read_hook_ctx = NULL;
    assert_int_equal(read_calls, 2);
    assert_int_equal(recent_calls, 2);
    assert_int_equal(compact_calls, 1);
    for (size_t r = 0; r < NREQ; r++)
        assert_int_equal(out[r].u.i, COMPACT_EVENTS);
    /* and every write of the hook landed: two in each read of user 7 */
    assert_int_equal(get(fx, fx->user, "7", "clicks", 1, T + 1000).u.i, WORD_EVENTS + 2 + 2);
    assert_int_equal(get(fx, fx->user, "8", "clicks", 1, T + 1000).u.i, COMPACT_EVENTS + 1);
}

/* A word-encoded count bucket at UINT32_MAX - 1 (restored from a state
 * block: four billion events are too many for a test) reaches UINT32_MAX
 * with one more event and stays there, its bucket untouched. */
static void test_word_encoded_count_bucket_saturates(void **state)
{
    fx_t *fx = *state;
    uint32_t f;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, fx->user, "clicks", 6, &f, &win), TLY_OK);
    int64_t t = T - SEC;
    uint64_t words[3] = {
        (uint64_t)t,                                                  /* newest event time */
        (uint64_t)fx->fs->feats[f].slot * TLY_MAX_WINDOWS | 1u << 16, /* clicks:5m, one word */
        (uint64_t)(t / (10 * SEC)) << 32 | (UINT32_MAX - 1),          /* its 10 s bucket */
    };
    uint8_t item[1 + 4 + 8 + 1 + sizeof words] = {
        2,  (uint8_t)fx->user, (uint8_t)(fx->user >> 8), 1, 2 /* words */, 3, 0, 0, 0, 3, 0, 0, 0,
        '9'};
    for (size_t i = 0; i < 3 * 8; i++)
        item[14 + i] = (uint8_t)(words[i / 8] >> (8 * (i % 8)));
    char err[128];
    assert_int_equal(tly_store_load(fx->store, item, sizeof item, NULL, err, sizeof err), TLY_OK);
    assert_int_equal(count(fx, "9", "clicks", 0, T), UINT32_MAX - 1);
    assert_int_equal(put(fx, T, t, 9, NULL, "click", -1), TLY_OK);
    assert_int_equal(count(fx, "9", "clicks", 0, T), UINT32_MAX);
    assert_int_equal(put(fx, T, t, 9, NULL, "click", -1), TLY_OK);
    assert_int_equal(count(fx, "9", "clicks", 0, T), UINT32_MAX);
    assert_int_equal(count(fx, "9", "clicks", 1, T), 2); /* 1h: a new segment */
}

/* Expects user id's last_action to be the string want. */
static void assert_last_action(fx_t *fx, const char *id, const char *want)
{
    tly_value_t v = get(fx, fx->user, id, "last_action", 0, T);
    assert_int_equal(v.type, TLY_V_STR);
    assert_int_equal(v.len, strlen(want));
    assert_memory_equal(v.u.s, want, v.len);
}

/* A thread remembers the strings it interned last: strings of one length
 * and first letter ("save", "sale") keep their own ids, and a second store
 * on the same thread interns a string the first one already had instead of
 * taking the first store's id for it. */
static void test_interned_strings_keep_their_own_ids_per_store(void **state)
{
    fx_t *fx = *state;
    static const char *const acts[] = {"save", "sale", "save", "sale", "save"};
    for (int i = 0; i < 5; i++)
        assert_int_equal(put(fx, T, T - (10 - i) * SEC, 1 + i % 2, "p", acts[i], -1), TLY_OK);
    assert_last_action(fx, "1", "save");
    assert_last_action(fx, "2", "sale");

    tly_store_t *first = fx->store;
    fx->store = tly_store_new(fx->fs);
    assert_int_equal(put(fx, T, T - 3 * SEC, 3, "p", "sale", -1), TLY_OK);
    assert_int_equal(put(fx, T, T - 2 * SEC, 4, "p", "save", -1), TLY_OK);
    assert_last_action(fx, "3", "sale");
    assert_last_action(fx, "4", "save");
    tly_store_free(fx->store);
    fx->store = first;
    assert_last_action(fx, "1", "save");
}

/* A compact record whose events carry values of every encoding — strings
 * too long to intern (stored in the log), doubles, absent values — read
 * with counts only (the read then decodes times and masks and skips the
 * values) and with the values. */
static void test_counts_over_a_log_with_inline_strings_and_doubles(void **state)
{
    (void)state;
    static const char *const cfg_yaml =
        "events:\n  time: { field: ts, unit: ms }\n  max_string: 100\n"
        "features:\n"
        "  - { name: n, entity: user, key: user_id, agg: count, windows: [1h, 1d] }\n"
        "  - { name: note, entity: user, key: user_id, agg: last, value: note }\n"
        "  - { name: score, entity: user, key: user_id, agg: sum, value: score, windows: [1d] }\n";
    tly_config_t *cfg;
    tly_featset_t *fs;
    char err[256];
    assert_int_equal(tly_config_load_string(cfg_yaml, "log.yaml", &cfg, err, sizeof err), TLY_OK);
    assert_int_equal(tly_featset_compile(cfg, &fs, err, sizeof err), TLY_OK);
    tly_store_t *store = tly_store_new(fs);
    int f_user = tly_featset_field(fs, "user_id", 7), f_note = tly_featset_field(fs, "note", 4),
        f_score = tly_featset_field(fs, "score", 5), f_ts = tly_featset_field(fs, "ts", 2);
    uint32_t user = (uint32_t)tly_featset_entity(fs, "user", 4);
    static const char long1[] = "a note of forty bytes, too long to share";
    static const char long2[] = "another note, fifty bytes long, stored in the log!";
    struct {
        int64_t t;
        const char *note;
        double score; /* < 0: absent */
    } evs[] = {{T - 2 * HOUR, long1, 1.5}, {T - 30 * MIN, NULL, -1}, {T - 10 * MIN, long2, 2.25}};
    for (size_t i = 0; i < 3; i++) {
        tly_event_t e;
        memset(&e, 0, sizeof e);
        e.nfields = (uint32_t)fs->nfields;
        e.time_ms = evs[i].t;
        e.vals[f_ts] = (tly_value_t){.type = TLY_V_INT, .u.i = evs[i].t};
        e.vals[f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = 7};
        if (evs[i].note)
            e.vals[f_note] = (tly_value_t){
                .type = TLY_V_STR, .len = (uint32_t)strlen(evs[i].note), .u.s = evs[i].note};
        if (evs[i].score >= 0)
            e.vals[f_score] = (tly_value_t){.type = TLY_V_DOUBLE, .u.d = evs[i].score};
        assert_int_equal(tly_store_apply(store, &e, 0, (int64_t)i, T), TLY_OK);
    }
    uint32_t fn, fnote, fscore;
    int win;
    assert_int_equal(tly_featset_resolve(fs, user, "n", 1, &fn, &win), TLY_OK);
    assert_int_equal(tly_featset_resolve(fs, user, "note", 4, &fnote, &win), TLY_OK);
    assert_int_equal(tly_featset_resolve(fs, user, "score", 5, &fscore, &win), TLY_OK);
    char sbuf[256];
    /* counts alone, then with a value feature in the same read */
    tly_featwin_t counts[] = {{fn, 0}, {fn, 1}};
    tly_value_t out[3];
    int64_t last_ms = 0;
    assert_int_equal(tly_store_read(store, user, "7", 1, counts, 2, T, out, &last_ms, sbuf,
                                    sizeof sbuf),
                     TLY_OK);
    assert_int_equal(out[0].u.i, 2); /* 1h: the two newer events */
    assert_int_equal(out[1].u.i, 3);
    assert_int_equal(last_ms, T - 10 * MIN);
    tly_featwin_t mixed[] = {{fn, 0}, {fnote, 0}, {fscore, 0}};
    assert_int_equal(tly_store_read(store, user, "7", 1, mixed, 3, T, out, NULL, sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(out[0].u.i, 2);
    assert_int_equal(out[1].type, TLY_V_STR);
    assert_int_equal(out[1].len, strlen(long2));
    assert_memory_equal(out[1].u.s, long2, out[1].len);
    assert_int_equal(out[2].type, TLY_V_DOUBLE);
    assert_true(out[2].u.d == 3.75);
    tly_store_free(store);
    tly_featset_free(fs);
    tly_config_free(cfg);
}

/* Every input of fuzz_store_load's corpus passes the fuzz target's checks:
 * refused with a sentence, or loaded into state that reads, takes events,
 * dumps and loads again the same. */
static void store_corpus_check(void *ctx, const char *path, const uint8_t *buf, size_t len)
{
    (void)ctx;
    (void)path;
    store_load_check_input(buf, len);
}

static void test_load_replays_fuzz_corpus_through_the_fuzz_checks(void **state)
{
    (void)state;
    store_load_fuzz_init();
    int files = corpus_replay(CORPUS_DIR, store_corpus_check, NULL);
    store_load_fuzz_fini();
    assert_true(files >= 18);
}

int main(void)
{
    tly_rcu_thread_online();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_window_edges_at_aligned_now, setup, teardown),
        cmocka_unit_test(test_counts_over_a_log_with_inline_strings_and_doubles),
        cmocka_unit_test_setup_teardown(test_word_encoded_count_bucket_saturates, setup, teardown),
        cmocka_unit_test_setup_teardown(test_interned_strings_keep_their_own_ids_per_store, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_window_edges_at_unaligned_now, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_bytes_stops_new_entities_not_held_ones, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_sweep_under_the_cap_lets_new_entities_in, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_out_of_order_events_land_in_their_buckets, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_late_and_future_events_are_dropped_and_counted, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_late_means_before_the_oldest_bucket_not_the_horizon,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_id_reads_empty_answers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_last_k_count_of_a_compact_log, setup, teardown),
        cmocka_unit_test_setup_teardown(test_last_k_count_at_and_before_now_and_past_the_horizon,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(
            test_items_after_now_leave_last_and_last_k_before_now_intact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_last_k_keeps_the_k_newest_under_shuffled_arrivals,
                                        setup_k20, teardown),
        cmocka_unit_test_setup_teardown(test_last_k_turns_tagged_when_an_item_cannot_be_packed,
                                        setup_k20, teardown),
        cmocka_unit_test_setup_teardown(test_last_k_old_item_of_another_shape_keeps_the_list_packed,
                                        setup_k20, teardown),
        cmocka_unit_test_setup_teardown(test_last_k_keeps_bools_as_bools_in_every_encoding,
                                        setup_flags, teardown),
        cmocka_unit_test_setup_teardown(test_last_k_full_keeps_a_tie_with_its_oldest_item, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_last_k_orders_by_time_keeps_k_and_ties_keep_arrival,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_rejected_event_changes_nothing, setup, teardown),
        cmocka_unit_test(test_shares_split_every_shard_once),
        cmocka_unit_test_setup_teardown(test_shares_apply_each_entity_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_one_hint_serves_every_share, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_refuses_state_the_writer_cannot_take, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_load_refuses_an_item_naming_a_string_not_interned,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(
            test_load_refuses_compact_logs_with_negative_or_overflowing_times, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_refuses_an_item_string_longer_than_its_item,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_entity_types_from_one_event, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dump_and_load_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(
            test_skipped_entity_types_are_not_fed_and_drop_removes_doomed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drop_removes_a_doomed_record_regrown_meanwhile, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_load_restores_unchanged_features_under_new_definitions,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_budgeted_sweeps_expire_in_steps, setup, teardown),
        cmocka_unit_test(test_sweep_pace_spreads_a_pass_in_small_steps),
        cmocka_unit_test(test_sweep_pace_owes_at_most_one_pass),
        cmocka_unit_test_setup_teardown(test_idle_entities_expire_and_memory_returns, setup,
                                        teardown),
        cmocka_unit_test(test_items_wider_than_the_width_field_read_and_round_trip),
        cmocka_unit_test(test_compact_and_word_folds_agree_where_order_matters),
        cmocka_unit_test(test_compact_conversion_builds_what_replay_writes),
        cmocka_unit_test(test_alike_events_are_still_judged_each_on_its_own),
        cmocka_unit_test_setup_teardown(test_ids_of_every_length_are_found_again, setup, teardown),
        cmocka_unit_test(test_item_feature_before_windowed_ones_in_word_encoding),
        cmocka_unit_test_setup_teardown(test_word_encoded_sum_past_int64_turns_double, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_buckets_outside_every_window_are_pruned, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(
            test_read_of_an_entity_written_meanwhile_ends_after_one_retry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_writers_on_shared_entities_lose_nothing,
                                        setup, teardown),
        cmocka_unit_test(test_load_replays_fuzz_corpus_through_the_fuzz_checks),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tly_rcu_thread_offline();
    return rc;
}
