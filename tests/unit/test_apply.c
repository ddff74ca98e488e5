/*
 * test_apply.c — the appliers (apply.c) without Kafka: batches of JSON
 * payloads applied by 1, 2 and 3 appliers leave exactly what a model
 * computed here says, item by item (verdict and event time) and entity by
 * entity (counts, sums, last, last_k in order), alone, spread by partition
 * and shared by entity. The stream mixes in what is rejected (bad JSON, a
 * missing key, a future time, a wrong type) or late for every feature,
 * strings written with JSON escapes (ids, `where` values and stored
 * values, decoded by the decoder into its scratch) and many events of one
 * entity at one time, so that only the order of applies decides last and
 * last_k. The store's counters (events applied, drops by reason) must not
 * depend on the number of appliers. A shared batch decodes each item once
 * (none again), unless its escaped strings overflow the room kept for
 * them: those items are decoded again by every applier and apply alike.
 * Pipelined batches (decoded by the caller, applied by the workers while
 * the caller goes on) leave the same.
 *
 * No librdkafka here, so ThreadSanitizer runs all of it (librdkafka's
 * threads crash TSan's runtime: see test_source.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/apply.h"
#include "tallyd/config.h"
#include "tallyd/feature.h"
#include "tallyd/rcu.h"
#include "tallyd/store.h"

#define SEC  INT64_C(1000)
#define MIN  (60 * SEC)
#define HOUR (60 * MIN)
/* the appliers' `now` and the reads' (a whole day in epoch ms) */
#define NOW (INT64_C(19675) * 24 * HOUR)

#define NUSERS 37
#define NPINS  23
#define K      16 /* last_k's k */

static const char *const actions[] = {"impression", "closeup", "click", "save", "hide"};

/* %s: more events.* keys */
static const char *const yaml_fmt =
    "events:\n"
    "  time: { field: ts, unit: ms }\n"
    "  max_future_skew: 1m\n"
    "%s"
    "store:\n"
    "  idle_ttl: 1h\n"
    "features:\n"
    "  - { name: n, entity: user, key: user_id, agg: count, windows: [1h] }\n"
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count, "
    "windows: [1h] }\n"
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h] }\n"
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 16, value: [seq, note] }\n"
    "  - { name: n, entity: pin, key: pin_id, agg: count, windows: [1h] }\n"
    "  - { name: recent, entity: pin, key: pin_id, agg: last_k, k: 16, value: [seq] }\n";

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_store_t *store;
    tly_apply_t *ap;
} fixture_t;

static void fixture_init(fixture_t *fx, size_t threads, const char *events_extra)
{
    char yaml[4096], err[512] = "";
    snprintf(yaml, sizeof yaml, yaml_fmt, events_extra);
    memset(fx, 0, sizeof *fx);
    if (tly_config_load_string(yaml, "apply.yaml", &fx->cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    if (tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK)
        fail_msg("featset: %s", err);
    fx->store = tly_store_new(fx->fs);
    fx->ap = tly_apply_new(fx->fs, fx->store, NULL, threads);
    assert_int_equal(tly_apply_start(fx->ap), threads);
}

static void fixture_fini(fixture_t *fx)
{
    tly_apply_free(fx->ap);
    tly_store_free(fx->store);
    tly_featset_free(fx->fs);
    tly_config_free(fx->cfg);
}

/* ---- the stream and its model -------------------------------------------- */

typedef enum { GOOD, BAD_JSON, NO_KEY, FUTURE, LATE, WRONG_TYPE } kind_t;

/* One last_k item as the model keeps it. */
typedef struct {
    int64_t ts;
    size_t order; /* index in the stream: equal times keep it, newest first */
    int64_t seq;
    char *note; /* decoded; owned */
} mitem_t;

typedef struct {
    int64_t n, clicks, dwell;
    int64_t last_ts;
    char last_action[16];
    size_t nitems, cap;
    mitem_t *items; /* every item taken, in stream order */
} mentity_t;

typedef struct {
    mentity_t users[NUSERS + 1], pins[NPINS + 1];
    uint64_t applied; /* events that updated a feature */
    uint64_t dropped[TLY_E__COUNT];
} model_t;

static void entity_fini(mentity_t *e)
{
    for (size_t i = 0; i < e->nitems; i++)
        free(e->items[i].note);
    free(e->items);
}

static void model_fini(model_t *m)
{
    for (size_t i = 0; i <= NUSERS; i++)
        entity_fini(&m->users[i]);
    for (size_t i = 0; i <= NPINS; i++)
        entity_fini(&m->pins[i]);
}

static void model_item(mentity_t *e, int64_t ts, size_t order, int64_t seq, const char *note)
{
    if (e->nitems == e->cap) {
        e->cap = e->cap ? 2 * e->cap : 64;
        e->items = realloc(e->items, e->cap * sizeof *e->items);
    }
    mitem_t *it = &e->items[e->nitems++];
    it->ts = ts;
    it->order = order;
    it->seq = seq;
    it->note = strdup(note);
}

/* The stream: payloads, items and what each item must give. */
typedef struct {
    size_t n;
    char **payloads;
    tly_apply_item_t *items;
    tly_err_t *want_err;
    int64_t *want_time;
} stream_t;

static void stream_fini(stream_t *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->payloads[i]);
    free(s->payloads);
    free(s->items);
    free(s->want_err);
    free(s->want_time);
}

/* What the stream's i-th event is. Every user has one time of its own, so
 * its last and last_k follow the order of applies alone. */
static kind_t kind_of(size_t i)
{
    if (i % 41 == 7)
        return BAD_JSON;
    if (i % 43 == 11)
        return NO_KEY;
    if (i % 47 == 13)
        return FUTURE;
    if (i % 53 == 17)
        return LATE;
    if (i % 59 == 19)
        return WRONG_TYPE;
    return GOOD;
}

/* Appends `reps` times `unit` to buf at *len (cap bytes). */
static void put_rep(char *buf, size_t cap, size_t *len, const char *unit, size_t reps)
{
    for (size_t r = 0; r < reps; r++)
        *len += (size_t)snprintf(buf + *len, cap - *len, "%s", unit);
    assert_true(*len < cap);
}

/*
 * Builds n events into s and the model m. Event i: user u = 1 + i %
 * NUSERS as the string "u<u>" (every fifth written "\u0075<u>"), pin 1 +
 * 7i % NPINS as an integer, seq i, action i % 5 ("click" every other time
 * as "cl\u0069ck"), dwell_ms i % 100, and a note: every third one written
 * with escapes (`n\"<i>\\\u00e9`, decoded `n"<i>\é`), plain "n<i>"
 * otherwise; with long_notes every seventh note has a tail of long_notes
 * "\u00e9" escapes (two bytes each decoded). Partition: 0 for all, or
 * with by_user u, as a producer keying by user places them: each user's
 * events in one partition, and so each pin's events of one time (one
 * user's), which must keep their order.
 */
static void build(stream_t *s, model_t *m, size_t n, bool by_user, size_t long_notes)
{
    memset(s, 0, sizeof *s);
    memset(m, 0, sizeof *m);
    s->n = n;
    s->payloads = calloc(n, sizeof *s->payloads);
    s->items = calloc(n, sizeof *s->items);
    s->want_err = calloc(n, sizeof *s->want_err);
    s->want_time = calloc(n, sizeof *s->want_time);
    for (size_t i = 0; i < n; i++) {
        kind_t kind = kind_of(i);
        uint64_t u = 1 + i % NUSERS, p = 1 + (i * 7) % NPINS;
        int action = (int)(i % 5);
        int64_t ts = NOW - 10 * SEC - (int64_t)u * 100;
        if (kind == FUTURE)
            ts = NOW + 5 * MIN;
        else if (kind == LATE)
            ts = NOW - 2 * HOUR;
        char user[32], act[32], dwell[16], note_raw[16384], note[4096];
        snprintf(user, sizeof user, i % 5 == 0 ? "\\u0075%" PRIu64 : "u%" PRIu64, u);
        snprintf(act, sizeof act, "%s",
                 action == 2 && i % 2 == 0 ? "cl\\u0069ck" : actions[action]);
        snprintf(dwell, sizeof dwell, kind == WRONG_TYPE ? "\"x\"" : "%d", (int)(i % 100));
        size_t rl, nl;
        if (i % 3 == 0) {
            rl = (size_t)snprintf(note_raw, sizeof note_raw, "n\\\"%zu\\\\\\u00e9", i);
            nl = (size_t)snprintf(note, sizeof note, "n\"%zu\\\xc3\xa9", i);
        } else {
            rl = (size_t)snprintf(note_raw, sizeof note_raw, "n%zu", i);
            nl = (size_t)snprintf(note, sizeof note, "n%zu", i);
        }
        if (long_notes > 0 && i % 7 == 0) {
            put_rep(note_raw, sizeof note_raw, &rl, "\\u00e9", long_notes);
            put_rep(note, sizeof note, &nl, "\xc3\xa9", long_notes);
        }
        static char json[20000];
        int len;
        if (kind == NO_KEY)
            len = snprintf(json, 20000,
                           "{\"pin_id\": %" PRIu64 ", \"seq\": %zu, \"action\": \"%s\", "
                           "\"dwell_ms\": %s, \"note\": \"%s\", \"ts\": %" PRId64 "}",
                           p, i, act, dwell, note_raw, ts);
        else
            len = snprintf(json, 20000,
                           "{\"user_id\": \"%s\", \"pin_id\": %" PRIu64 ", \"seq\": %zu, "
                           "\"action\": \"%s\", \"dwell_ms\": %s, \"note\": \"%s\", "
                           "\"ts\": %" PRId64 "}",
                           user, p, i, act, dwell, note_raw, ts);
        assert_true(len > 0 && len < 20000);
        if (kind == BAD_JSON)
            len -= 3; /* cut inside the last member */
        s->payloads[i] = malloc((size_t)len);
        memcpy(s->payloads[i], json, (size_t)len);
        s->items[i] = (tly_apply_item_t){.payload = s->payloads[i],
                                         .len = (size_t)len,
                                         .offset = (int64_t)i,
                                         .kafka_ts_ms = -1,
                                         .partition = by_user ? (int32_t)u : 0,
                                         .part = by_user ? (uint32_t)u : 0,
                                         .topic = -1,
                                         .err = TLY_E_INVAL,
                                         .time_ms = -2};
        s->want_time[i] = -1;
        switch (kind) {
        case BAD_JSON:
            s->want_err[i] = TLY_E_EV_BAD_JSON;
            continue;
        case NO_KEY:
            s->want_err[i] = TLY_E_EV_MISSING_KEY;
            m->dropped[TLY_E_EV_MISSING_KEY]++;
            continue;
        case FUTURE:
            s->want_err[i] = TLY_E_EV_FUTURE;
            m->dropped[TLY_E_EV_FUTURE]++;
            continue;
        case WRONG_TYPE:
            s->want_err[i] = TLY_E_EV_WRONG_TYPE;
            m->dropped[TLY_E_EV_WRONG_TYPE]++;
            continue;
        case LATE: /* taken, though late for every feature */
            s->want_err[i] = TLY_OK;
            continue;
        case GOOD:
            break;
        }
        s->want_err[i] = TLY_OK;
        s->want_time[i] = ts;
        m->applied++;
        mentity_t *mu = &m->users[u], *mp = &m->pins[p];
        mu->n++;
        mu->clicks += action == 2;
        mu->dwell += (int64_t)(i % 100);
        if (ts >= mu->last_ts) { /* equal times: the later event wins */
            mu->last_ts = ts;
            snprintf(mu->last_action, sizeof mu->last_action, "%s", actions[action]);
        }
        model_item(mu, ts, i, (int64_t)i, note);
        mp->n++;
        model_item(mp, ts, i, (int64_t)i, "");
    }
}

/* Newest first: the later time, or at equal times the later event. */
static int newest_first(const void *a, const void *b)
{
    const mitem_t *x = a, *y = b;
    if (x->ts != y->ts)
        return x->ts > y->ts ? -1 : 1;
    return x->order > y->order ? -1 : x->order < y->order;
}

/* ---- checks ------------------------------------------------------------------ */

static uint32_t feat_of(const fixture_t *fx, uint32_t ent, const char *name, int *win)
{
    uint32_t feat;
    assert_int_equal(tly_featset_resolve(fx->fs, ent, name, strlen(name), &feat, win), TLY_OK);
    return feat;
}

static tly_value_t read_one(const fixture_t *fx, uint32_t ent, const char *id, const char *name,
                            char *sbuf, size_t scap)
{
    int win;
    uint32_t feat = feat_of(fx, ent, name, &win);
    tly_featwin_t req = {feat, win < 0 ? 0 : (uint32_t)win};
    tly_value_t out;
    assert_int_equal(
        tly_store_read(fx->store, ent, id, strlen(id), &req, 1, NOW, &out, NULL, sbuf, scap),
        TLY_OK);
    return out;
}

static void check_int(const fixture_t *fx, uint32_t ent, const char *id, const char *name,
                      int64_t want)
{
    char sbuf[64];
    tly_value_t v = read_one(fx, ent, id, name, sbuf, sizeof sbuf);
    if (v.type != TLY_V_INT || v.u.i != want)
        fail_msg("%s %s: %" PRId64 " (type %d), want %" PRId64, id, name, v.u.i, (int)v.type, want);
}

static void check_recent(const fixture_t *fx, uint32_t ent, const char *id, mentity_t *me,
                         bool notes)
{
    static tly_item_t items[K];
    static char sbuf[1 << 16];
    int win;
    uint32_t feat = feat_of(fx, ent, "recent", &win);
    size_t n = 0;
    assert_int_equal(tly_store_recent(fx->store, ent, id, strlen(id), feat, INT64_MIN, NOW, items,
                                      K, &n, sbuf, sizeof sbuf),
                     TLY_OK);
    qsort(me->items, me->nitems, sizeof *me->items, newest_first);
    size_t want = me->nitems < K ? me->nitems : K;
    if (n != want)
        fail_msg("%s recent: %zu items, want %zu", id, n, want);
    for (size_t i = 0; i < n; i++) {
        const mitem_t *w = &me->items[i];
        if (items[i].time_ms != w->ts || items[i].vals[0].type != TLY_V_INT ||
            items[i].vals[0].u.i != w->seq)
            fail_msg("%s recent[%zu]: seq %" PRId64 " at %" PRId64 ", want seq %" PRId64
                     " at %" PRId64,
                     id, i, items[i].vals[0].u.i, items[i].time_ms, w->seq, w->ts);
        if (notes) {
            const tly_value_t *v = &items[i].vals[1];
            if (v->type != TLY_V_STR || v->len != strlen(w->note) ||
                memcmp(v->u.s, w->note, v->len) != 0)
                fail_msg("%s recent[%zu] (seq %" PRId64 "): note %.*s, want %s", id, i, w->seq,
                         (int)v->len, v->u.s, w->note);
        }
    }
}

/* Every item's verdict, every entity's state, the store's counters. */
static void check_all(const fixture_t *fx, const stream_t *s, model_t *m)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->items[i].err != s->want_err[i] || s->items[i].time_ms != s->want_time[i])
            fail_msg("item %zu: %s at %" PRId64 ", want %s at %" PRId64, i,
                     tly_err_name(s->items[i].err), s->items[i].time_ms,
                     tly_err_name(s->want_err[i]), s->want_time[i]);
    uint32_t user = (uint32_t)tly_featset_entity(fx->fs, "user", 4);
    uint32_t pin = (uint32_t)tly_featset_entity(fx->fs, "pin", 3);
    for (uint64_t u = 1; u <= NUSERS; u++) {
        mentity_t *mu = &m->users[u];
        char id[32], sbuf[64];
        snprintf(id, sizeof id, "u%" PRIu64, u);
        check_int(fx, user, id, "n:1h", mu->n);
        check_int(fx, user, id, "clicks:1h", mu->clicks);
        check_int(fx, user, id, "dwell:1h", mu->dwell);
        tly_value_t v = read_one(fx, user, id, "last_action", sbuf, sizeof sbuf);
        if (v.type != TLY_V_STR || v.len != strlen(mu->last_action) ||
            memcmp(v.u.s, mu->last_action, v.len) != 0)
            fail_msg("%s last_action: %.*s, want %s", id, (int)v.len,
                     v.type == TLY_V_STR ? v.u.s : "", mu->last_action);
        check_recent(fx, user, id, mu, true);
    }
    for (uint64_t p = 1; p <= NPINS; p++) {
        char id[32];
        snprintf(id, sizeof id, "%" PRIu64, p);
        check_int(fx, pin, id, "n:1h", m->pins[p].n);
        check_recent(fx, pin, id, &m->pins[p], false);
    }
    tly_store_stats_t st;
    tly_store_stats(fx->store, &st);
    assert_int_equal(st.events_applied, m->applied);
    assert_int_equal(st.entities, NUSERS + NPINS);
    for (int e = TLY_E_EV_MISSING_KEY; e <= TLY_E_EV_FUTURE; e++)
        if (e != TLY_E_EV_LATE && st.dropped[e] != m->dropped[e])
            fail_msg("dropped %s: %" PRIu64 ", want %" PRIu64, tly_err_name((tly_err_t)e),
                     st.dropped[e], m->dropped[e]);
}

/* Applies s in batches of `batch` items (the last one smaller), one
 * after the other, or pipelined: each batch staged while the one before is
 * applied, then submitted (tly_apply_stage/wait/submit, as the source's
 * poll thread does). */
static void apply_stream(fixture_t *fx, stream_t *s, size_t batch, bool pipelined)
{
    for (size_t at = 0; at < s->n; at += batch) {
        size_t n = s->n - at < batch ? s->n - at : batch;
        if (!pipelined) {
            tly_apply_batch(fx->ap, s->items + at, n, NOW);
            continue;
        }
        if (!tly_apply_stage(fx->ap, s->items + at, n, NOW)) {
            tly_apply_batch(fx->ap, s->items + at, n, NOW); /* spreads by partition */
            continue;
        }
        (void)tly_apply_wait(fx->ap);
        tly_apply_submit(fx->ap);
    }
    (void)tly_apply_wait(fx->ap);
}

/* The stream of n events (by_user: partitioned by user, else all in one
 * partition), in batches of `batch`, by `threads` appliers: checked
 * against the model. Returns the store's counters, for comparing runs with
 * other thread counts. */
/* pipelined runs: the cut pinned there (0: left to adapt) */
static uint32_t pinned_cut;

/* A set of `threads` appliers, a stream of n events and its model. */
typedef struct {
    fixture_t fx;
    stream_t s;
    model_t *m;
} case_t;

static void case_open(case_t *c, size_t threads, size_t n, bool by_user, size_t long_notes,
                      const char *events_extra)
{
    c->m = malloc(sizeof *c->m);
    fixture_init(&c->fx, threads, events_extra);
    build(&c->s, c->m, n, by_user, long_notes);
}

static void case_close(case_t *c)
{
    stream_fini(&c->s);
    model_fini(c->m);
    free(c->m);
    fixture_fini(&c->fx);
}

static void run_as(size_t threads, size_t n, bool by_user, size_t batch, size_t long_notes,
                   const char *events_extra, bool pipelined, tly_apply_stats_t *ast,
                   tly_store_stats_t *sst)
{
    case_t c;
    case_open(&c, threads, n, by_user, long_notes, events_extra);
    if (pinned_cut > 0)
        tly_apply_pin_cut(c.fx.ap, pinned_cut);
    apply_stream(&c.fx, &c.s, batch, pipelined);
    check_all(&c.fx, &c.s, c.m);
    tly_apply_stats(c.fx.ap, ast);
    tly_store_stats(c.fx.store, sst);
    case_close(&c);
}

static void run(size_t threads, size_t n, bool by_user, size_t batch, size_t long_notes,
                const char *events_extra, tly_apply_stats_t *ast, tly_store_stats_t *sst)
{
    run_as(threads, n, by_user, batch, long_notes, events_extra, false, ast, sst);
}

/* The same counters, whatever the number of appliers. */
static void assert_same_store_stats(const tly_store_stats_t *a, const tly_store_stats_t *b)
{
    assert_int_equal(a->entities, b->entities);
    assert_int_equal(a->events_applied, b->events_applied);
    assert_int_equal(a->updates, b->updates);
    for (int e = 0; e < TLY_E__COUNT; e++)
        assert_int_equal(a->dropped[e], b->dropped[e]);
}

/* ---- tests ------------------------------------------------------------------- */

static void test_one_applier_applies_every_batch_alone_as_the_model_says(void **state)
{
    (void)state;
    tly_apply_stats_t ast;
    tly_store_stats_t sst;
    run(1, 5000, false, TLY_APPLY_BATCH_MAX, 0, "", &ast, &sst);
    assert_int_equal(ast.alone, 2);
    assert_int_equal(ast.bypart + ast.shared, 0);
}

/* One partition: every batch of 64 or more is shared by entity, the rest
 * is applied by applier 0 alone. */
static void test_two_and_three_appliers_share_one_partitions_batch_by_entity(void **state)
{
    (void)state;
    tly_apply_stats_t ast;
    tly_store_stats_t one, sst;
    run(1, 9000, false, TLY_APPLY_BATCH_MAX, 0, "", &ast, &one);
    for (size_t threads = 2; threads <= 3; threads++) {
        /* two full batches and 808, then batches of 1000 and a last of 40 */
        run(threads, 9000, false, TLY_APPLY_BATCH_MAX, 0, "", &ast, &sst);
        assert_int_equal(ast.shared, 3);
        assert_int_equal(ast.alone + ast.bypart, 0);
        assert_int_equal(ast.redecoded, 0); /* each decoded once */
        assert_same_store_stats(&one, &sst);
        run(threads, 9040, false, 1000, 0, "", &ast, &sst);
        assert_int_equal(ast.shared, 9);
        assert_int_equal(ast.alone, 1);
        assert_int_equal(ast.bypart, 0);
    }
}

/* 37 partitions (one per user) spread evenly enough: each applier takes
 * its partitions' items whole. */
static void test_appliers_spread_a_many_partition_batch_by_partition(void **state)
{
    (void)state;
    tly_apply_stats_t ast;
    tly_store_stats_t one, sst;
    run(1, 8192, true, TLY_APPLY_BATCH_MAX, 0, "", &ast, &one);
    for (size_t threads = 2; threads <= 3; threads++) {
        run(threads, 8192, true, TLY_APPLY_BATCH_MAX, 0, "", &ast, &sst);
        assert_int_equal(ast.bypart, 2);
        assert_int_equal(ast.alone + ast.shared, 0);
        assert_same_store_stats(&one, &sst);
    }
}

/* Every seventh note 3,000 decoded bytes longer, all written with escapes:
 * more than a shared batch keeps room for, so that some items are decoded
 * again by every applier, and must apply as the others do. */
static void test_long_escaped_strings_apply_alike_by_any_number_of_appliers(void **state)
{
    (void)state;
    tly_apply_stats_t ast;
    tly_store_stats_t one, sst;
    const char *extra = "  max_string: 4096\n";
    run(1, 4500, false, TLY_APPLY_BATCH_MAX, 1500, extra, &ast, &one);
    for (size_t threads = 2; threads <= 3; threads++) {
        run(threads, 4500, false, TLY_APPLY_BATCH_MAX, 1500, extra, &ast, &sst);
        assert_int_equal(ast.shared, 2);
        /* some of the 643 long notes (the rest fit) */
        assert_true(ast.redecoded > 0 && ast.redecoded < 643);
        assert_same_store_stats(&one, &sst);
    }
}

/* Pipelined: the caller decodes each batch while the workers (1 or 2)
 * apply the one before, by entity, with items decoded again whose escaped
 * strings overflow: every item and entity as the model says, the store's
 * counters as one applier leaves them. A batch that spreads by partition
 * is not staged (the caller applies it with tly_apply_batch). With no
 * worker, a submitted batch is applied on the caller's thread. */
static void test_pipelined_batches_apply_as_the_model_says(void **state)
{
    (void)state;
    tly_apply_stats_t ast;
    tly_store_stats_t one, sst;
    run(1, 9040, false, 1000, 0, "", &ast, &one);
    run_as(1, 9040, false, 1000, 0, "", true, &ast, &sst);
    assert_int_equal(ast.alone, 10);
    assert_int_equal(ast.pipelined + ast.shared + ast.bypart, 0);
    assert_same_store_stats(&one, &sst);
    /* the workers' and the caller's shards split at 16, 40 and 64 (the
     * caller then applies nothing), and as the cut adapts */
    const uint32_t cuts[] = {16, 40, 64, 0};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        pinned_cut = cuts[c];
        for (size_t threads = 2; threads <= 3; threads++) {
            run_as(threads, 9040, false, 1000, 0, "", true, &ast, &sst);
            assert_int_equal(ast.pipelined, 10); /* the last, of 40, too */
            assert_int_equal(ast.alone + ast.shared + ast.bypart, 0);
            assert_int_equal(ast.redecoded, 0);
            assert_same_store_stats(&one, &sst);
        }
    }
    pinned_cut = 16;
    /* 37 partitions: not staged, spread by partition (the stage says so) */
    run(1, 8192, true, TLY_APPLY_BATCH_MAX, 0, "", &ast, &one);
    for (size_t threads = 2; threads <= 3; threads++) {
        run_as(threads, 8192, true, TLY_APPLY_BATCH_MAX, 0, "", true, &ast, &sst);
        assert_int_equal(ast.bypart, 2);
        assert_int_equal(ast.pipelined, 0);
        assert_same_store_stats(&one, &sst);
    }
    const char *extra = "  max_string: 4096\n";
    run(1, 4500, false, TLY_APPLY_BATCH_MAX, 1500, extra, &ast, &one);
    for (size_t threads = 2; threads <= 3; threads++) {
        run_as(threads, 4500, false, TLY_APPLY_BATCH_MAX, 1500, extra, true, &ast, &sst);
        assert_int_equal(ast.pipelined, 2);
        assert_true(ast.redecoded > 0 && ast.redecoded < 643);
        assert_same_store_stats(&one, &sst);
    }
    pinned_cut = 0;
}

/* tly_apply_batch, and a stop, right after a submit: each waits for the
 * submitted batch first, so batches still apply in order. */
static void test_a_batch_after_a_submitted_one_waits_for_it(void **state)
{
    (void)state;
    case_t c;
    case_open(&c, 2, 7000, false, 0, "");
    tly_apply_t *ap = c.fx.ap;
    tly_apply_item_t *items = c.s.items;
    assert_true(tly_apply_stage(ap, items, 3000, NOW));
    tly_apply_submit(ap);
    tly_apply_batch(ap, items + 3000, 2000, NOW); /* shared */
    assert_true(tly_apply_stage(ap, items + 5000, 1500, NOW));
    tly_apply_submit(ap);
    tly_apply_stop(ap);
    assert_false(tly_apply_wait(ap)); /* stop waited */
    assert_true(tly_apply_stage(ap, items + 6500, 500, NOW));
    tly_apply_submit(ap); /* no worker: applied here */
    assert_false(tly_apply_wait(ap));
    check_all(&c.fx, &c.s, c.m);
    tly_apply_stats_t ast;
    tly_apply_stats(ap, &ast);
    assert_int_equal(ast.pipelined, 2);
    assert_int_equal(ast.shared, 1);
    assert_int_equal(ast.alone, 1);
    case_close(&c);
}

/* A set stopped and started again applies the next batches as before. */
static void test_appliers_stopped_and_started_again_go_on(void **state)
{
    (void)state;
    case_t c;
    case_open(&c, 3, 6000, false, 0, "");
    tly_apply_t *ap = c.fx.ap;
    tly_apply_batch(ap, c.s.items, 3000, NOW);
    tly_apply_stop(ap);
    tly_apply_batch(ap, c.s.items + 3000, 1000, NOW); /* alone */
    assert_int_equal(tly_apply_start(ap), 3);
    tly_apply_batch(ap, c.s.items + 4000, 2000, NOW);
    check_all(&c.fx, &c.s, c.m);
    tly_apply_stats_t ast;
    tly_apply_stats(ap, &ast);
    assert_int_equal(ast.shared, 2);
    assert_int_equal(ast.alone, 1);
    case_close(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_applier_applies_every_batch_alone_as_the_model_says),
        cmocka_unit_test(test_two_and_three_appliers_share_one_partitions_batch_by_entity),
        cmocka_unit_test(test_appliers_spread_a_many_partition_batch_by_partition),
        cmocka_unit_test(test_long_escaped_strings_apply_alike_by_any_number_of_appliers),
        cmocka_unit_test(test_appliers_stopped_and_started_again_go_on),
        cmocka_unit_test(test_pipelined_batches_apply_as_the_model_says),
        cmocka_unit_test(test_a_batch_after_a_submitted_one_waits_for_it),
    };
    tly_rcu_thread_online();
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tly_rcu_thread_offline();
    return rc;
}
