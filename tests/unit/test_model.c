/*
 * test_model.c — the store against a brute-force model.
 *
 * A seeded stream of events (1,000,000 over 60,000 entities of two entity
 * types, every aggregation; TLY_TEST_SCALE=small: 100,000 over 7,500, the
 * size run under ThreadSanitizer in `make test`) is applied by 2 writer
 * threads while 2 reader threads read continuously (checking invariants
 * that must hold at any moment) and one of them sweeps. Event times span 8
 * days, arrive out of order by up to 10 minutes, and include late events
 * (older than every window) and future ones (beyond max_future_skew).
 *
 * At the end every (entity, id, feature, window) at several `now` values is
 * compared with a model that keeps the plain list of events and, for each
 * question, filters and folds them naively: an event counts in a window of
 * length W and hop h at `now` when floor(t/h) lies in
 * [floor(now/h) − W/h, floor(now/h)] (DESIGN §3); a feature drops an event
 * that lies before all its windows at the writer's clock, or after
 * clock + max_future_skew; last/last_k answer the k newest applied events
 * at or before `now` (time, then arrival order) that are within idle_ttl
 * of it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/config.h"
#include "tallyd/feature.h"
#include "tallyd/rcu.h"
#include "tallyd/store.h"

#define SEC      INT64_C(1000)
#define MIN      (60 * SEC)
#define HOUR     (60 * MIN)
#define DAY      (24 * HOUR)
#define SKEW     MIN
#define IDLE_TTL (2 * DAY)
#define RECENT_K 20

static const char *model_yaml =
    "events:\n"
    "  time: { field: ts, unit: ms }\n"
    "  max_future_skew: 1m\n"
    "store:\n"
    "  idle_ttl: 2d\n"
    "features:\n"
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
    " windows: [5m, 1h, 1d, 7d] }\n"
    "  - { name: engaged, entity: user, key: user_id, where: { action: [click, save] },"
    " agg: count, windows: [1h] }\n"
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h, 1d] "
    "}\n"
    "  - { name: score, entity: user, key: user_id, agg: sum, value: score, windows: [1h] }\n"
    "  - { name: dwell_min, entity: user, key: user_id, agg: min, value: dwell_ms, windows: [1d] "
    "}\n"
    "  - { name: dwell_max, entity: user, key: user_id, agg: max, value: dwell_ms, windows: [1d] "
    "}\n"
    "  - { name: dwell_avg, entity: user, key: user_id, agg: avg, value: dwell_ms, windows: [1h] "
    "}\n"
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 20, value: [pin_id, action] "
    "}\n"
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
    " agg: count, windows: [1h, 1d] }\n"
    "  - { name: pin_clicks, entity: pin, key: pin_id, where: { action: click }, agg: count,"
    " windows: [1h] }\n"
    "  - { name: pin_score_max, entity: pin, key: pin_id, agg: max, value: score, windows: [1d],"
    " hop: 1h }\n";

/* ---- the model's own description of the features ------------------------ */

enum { A_IMPRESSION, A_CLOSEUP, A_CLICK, A_SAVE, A_HIDE };
static const char *action_names[] = {"impression", "closeup", "click", "save", "hide"};

enum { F_COUNT, F_SUM, F_MIN, F_MAX, F_AVG, F_LASTK, F_LAST };
enum { V_NONE, V_DWELL, V_SCORE };

typedef struct {
    const char *name;
    int pin;          /* 0: user entity, 1: pin entity */
    unsigned actions; /* bitmask of accepted actions; 0 = all */
    int kind, value;
    int nwin;
    int64_t win[4], hop[4];
} mfeat_t;

static const mfeat_t mfeats[] = {
    {"clicks",
     0,
     1u << A_CLICK,
     F_COUNT,
     V_NONE,
     4,
     {5 * MIN, HOUR, DAY, 7 * DAY},
     {10 * SEC, MIN, 5 * MIN, HOUR}},
    {"engaged", 0, 1u << A_CLICK | 1u << A_SAVE, F_COUNT, V_NONE, 1, {HOUR}, {MIN}},
    {"dwell", 0, 0, F_SUM, V_DWELL, 2, {HOUR, DAY}, {MIN, 5 * MIN}},
    {"score", 0, 0, F_SUM, V_SCORE, 1, {HOUR}, {MIN}},
    {"dwell_min", 0, 0, F_MIN, V_DWELL, 1, {DAY}, {5 * MIN}},
    {"dwell_max", 0, 0, F_MAX, V_DWELL, 1, {DAY}, {5 * MIN}},
    {"dwell_avg", 0, 0, F_AVG, V_DWELL, 1, {HOUR}, {MIN}},
    {"recent", 0, 0, F_LASTK, V_NONE, 0, {0}, {0}},
    {"last_action", 0, 0, F_LAST, V_NONE, 0, {0}, {0}},
    {"impressions", 1, 1u << A_IMPRESSION, F_COUNT, V_NONE, 2, {HOUR, DAY}, {MIN, 5 * MIN}},
    {"pin_clicks", 1, 1u << A_CLICK, F_COUNT, V_NONE, 1, {HOUR}, {MIN}},
    {"pin_score_max", 1, 0, F_MAX, V_SCORE, 1, {DAY}, {HOUR}},
};
#define NMFEATS (sizeof mfeats / sizeof mfeats[0])

/* ---- the stream ---------------------------------------------------------- */

typedef struct {
    int64_t t;     /* event time */
    int64_t clock; /* the writer's wall clock when it applies the event */
    uint32_t user, pin;
    int32_t dwell;   /* -1: field absent */
    int32_t score_q; /* -1: absent; score = score_q / 4.0 */
    uint8_t action;
} gev_t;

typedef struct {
    size_t nevents, nusers, npins;
    gev_t *ev;
    int64_t t_end;
} stream_t;

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) / 9007199254740992.0;
}

static bool small_scale(void)
{
    const char *s = getenv("TLY_TEST_SCALE");
    return s && strcmp(s, "small") == 0;
}

static void make_stream(stream_t *S, uint64_t seed)
{
    S->nevents = small_scale() ? 100000 : 1000000;
    S->nusers = small_scale() ? 5000 : 40000;
    S->npins = small_scale() ? 2500 : 20000;
    S->ev = calloc(S->nevents, sizeof *S->ev);
    assert_non_null(S->ev);
    int64_t t0 = INT64_C(1700000000000) + 12345; /* not aligned to any hop */
    int64_t span = 8 * DAY;
    S->t_end = t0 + span;
    uint64_t r = seed;
    for (size_t i = 0; i < S->nevents; i++) {
        gev_t *e = &S->ev[i];
        int64_t base = t0 + (int64_t)((double)span * (double)i / (double)S->nevents);
        e->clock = base;
        double u = rng_unit(&r);
        e->user = 1 + (uint32_t)(u * u * (double)S->nusers); /* skewed to low ids */
        u = rng_unit(&r);
        e->pin = 1 + (uint32_t)(u * u * (double)S->npins);
        int a = (int)(rng_next(&r) % 100);
        e->action = a < 60   ? A_IMPRESSION
                    : a < 75 ? A_CLOSEUP
                    : a < 90 ? A_CLICK
                    : a < 97 ? A_SAVE
                             : A_HIDE;
        e->dwell = rng_next(&r) % 10 < 7 ? (int32_t)(rng_next(&r) % 60001) : -1;
        e->score_q = rng_next(&r) % 2 ? (int32_t)(rng_next(&r) % 401) : -1;
        int kind = (int)(rng_next(&r) % 1000);
        if (kind < 3)
            e->t = base - 9 * DAY; /* late for every window and for idle_ttl */
        else if (kind < 6)
            e->t = base + SKEW + 1 + (int64_t)(rng_next(&r) % (4 * MIN)); /* beyond the skew */
        else if (kind < 9)
            e->t = base + SKEW; /* exactly at the skew: accepted */
        else
            e->t = base - (int64_t)(rng_next(&r) % (10 * MIN)) + (int64_t)(rng_next(&r) % MIN);
    }
}

/* ---- the model ------------------------------------------------------------ */

static int64_t floordiv(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

static bool in_window(int64_t t, int64_t now, int64_t w, int64_t h)
{
    int64_t b = floordiv(t, h), bn = floordiv(now, h);
    return b >= bn - w / h && b <= bn;
}

/* Whether feature f takes event e at all (filter, value, late, future). */
static bool model_takes(const mfeat_t *f, const gev_t *e)
{
    if (e->t > e->clock + SKEW)
        return false;
    if (f->actions && !(f->actions & (1u << e->action)))
        return false;
    if (f->value == V_DWELL && e->dwell < 0)
        return false;
    if (f->value == V_SCORE && e->score_q < 0)
        return false;
    if (f->nwin == 0)
        return e->t >= e->clock - IDLE_TTL;
    for (int w = 0; w < f->nwin; w++)
        if (floordiv(e->t, f->hop[w]) >= floordiv(e->clock, f->hop[w]) - f->win[w] / f->hop[w])
            return true;
    return false;
}

/* Expected value of windowed feature f, window w, over the given events. */
static tly_value_t model_value(const stream_t *S, const mfeat_t *f, int w, const uint32_t *idx,
                               size_t n, int64_t now)
{
    int64_t cnt = 0, isum = 0;
    double dsum = 0, dmin = 0, dmax = 0;
    int64_t imin = 0, imax = 0;
    for (size_t j = 0; j < n; j++) {
        const gev_t *e = &S->ev[idx[j]];
        if (!model_takes(f, e) || !in_window(e->t, now, f->win[w], f->hop[w]))
            continue;
        if (f->value == V_DWELL) {
            int64_t v = e->dwell;
            imin = cnt == 0 || v < imin ? v : imin;
            imax = cnt == 0 || v > imax ? v : imax;
            isum += v;
        } else if (f->value == V_SCORE) {
            double v = e->score_q / 4.0;
            dmin = cnt == 0 || v < dmin ? v : dmin;
            dmax = cnt == 0 || v > dmax ? v : dmax;
            dsum += v;
        }
        cnt++;
    }
    tly_value_t r = {.type = TLY_V_NIL};
    switch (f->kind) {
    case F_COUNT:
        r.type = TLY_V_INT;
        r.u.i = cnt;
        break;
    case F_SUM:
        if (f->value == V_SCORE && cnt) {
            r.type = TLY_V_DOUBLE;
            r.u.d = dsum;
        } else {
            r.type = TLY_V_INT;
            r.u.i = isum;
        }
        break;
    case F_MIN:
    case F_MAX:
        if (!cnt)
            break;
        if (f->value == V_SCORE) {
            r.type = TLY_V_DOUBLE;
            r.u.d = f->kind == F_MIN ? dmin : dmax;
        } else {
            r.type = TLY_V_INT;
            r.u.i = f->kind == F_MIN ? imin : imax;
        }
        break;
    case F_AVG:
        if (cnt) {
            r.type = TLY_V_DOUBLE;
            r.u.d = (double)isum / (double)cnt;
        }
        break;
    }
    return r;
}

/* The model's last_k: indexes of the k newest taken events (time desc,
 * then arrival desc), then those within [now - idle_ttl, now]. */
static size_t model_recent(const stream_t *S, const mfeat_t *f, const uint32_t *idx, size_t n,
                           int k, int64_t now, uint32_t *out)
{
    uint32_t top[RECENT_K];
    int ntop = 0;
    for (size_t j = 0; j < n; j++) { /* idx is in arrival order */
        const gev_t *e = &S->ev[idx[j]];
        if (!model_takes(f, e) || e->t > now) /* after now: not yet one of the k */
            continue;
        /* insert keeping top sorted newest first; ties: later arrival first */
        int pos = ntop;
        while (pos > 0 && S->ev[top[pos - 1]].t <= e->t)
            pos--;
        if (pos >= k)
            continue;
        int end = ntop < k ? ntop : k - 1;
        for (int q = end; q > pos; q--)
            top[q] = top[q - 1];
        top[pos] = idx[j];
        if (ntop < k)
            ntop++;
    }
    size_t m = 0;
    for (int q = 0; q < ntop; q++) {
        int64_t t = S->ev[top[q]].t;
        if (t >= now - IDLE_TTL)
            out[m++] = top[q];
    }
    return m;
}

/* ---- driving the store ------------------------------------------------- */

typedef struct {
    tly_featset_t *fs;
    tly_store_t *store;
    stream_t *S;
    int f_user, f_pin, f_action, f_dwell, f_score, f_ts;
    _Atomic int64_t clock[2]; /* each writer's current clock */
    atomic_int writers_done;
    atomic_long reader_checks, reader_skipped;
    atomic_long sweeps;
    int fid[NMFEATS]; /* store feature id of mfeats[i] */
} ctx_t;

static void to_event(const ctx_t *c, const gev_t *e, tly_event_t *ev, char *pinbuf)
{
    memset(ev, 0, sizeof *ev);
    ev->nfields = (uint32_t)c->fs->nfields;
    ev->time_ms = e->t;
    ev->vals[c->f_ts] = (tly_value_t){.type = TLY_V_INT, .u.i = e->t};
    ev->vals[c->f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = e->user};
    int n = snprintf(pinbuf, 16, "p%u", e->pin);
    ev->vals[c->f_pin] = (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)n, .u.s = pinbuf};
    const char *an = action_names[e->action];
    ev->vals[c->f_action] =
        (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(an), .u.s = an};
    if (e->dwell >= 0)
        ev->vals[c->f_dwell] = (tly_value_t){.type = TLY_V_INT, .u.i = e->dwell};
    if (e->score_q >= 0)
        ev->vals[c->f_score] = (tly_value_t){.type = TLY_V_DOUBLE, .u.d = e->score_q / 4.0};
}

typedef struct {
    ctx_t *c;
    int id;
} targ_t;

static void *writer_main(void *arg)
{
    targ_t *ta = arg;
    ctx_t *c = ta->c;
    tly_rcu_thread_online();
    tly_event_t ev;
    char pinbuf[16];
    for (size_t i = 0; i < c->S->nevents; i++) {
        const gev_t *e = &c->S->ev[i];
        if ((int)(e->user % 2) != ta->id)
            continue;
        atomic_store(&c->clock[ta->id], e->clock);
        to_event(c, e, &ev, pinbuf);
        if (i % 2) { /* every other event the way the Kafka source applies: hinted */
            tly_prefetch_t pf;
            tly_rcu_read_lock();
            tly_store_prefetch(c->store, &ev, &pf);
            tly_rcu_read_unlock();
            (void)tly_store_apply_hinted(c->store, &ev, &pf, (int32_t)ta->id, (int64_t)i, e->clock);
        } else {
            (void)tly_store_apply(c->store, &ev, (int32_t)ta->id, (int64_t)i, e->clock);
        }
    }
    atomic_fetch_add(&c->writers_done, 1);
    tly_rcu_thread_offline();
    return NULL;
}

static int64_t ival(const tly_value_t *v)
{
    return v->type == TLY_V_INT ? v->u.i : -1;
}

/* Readers check what must hold at any moment: nested windows are monotone,
 * engaged ⊇ clicks, min <= max, recent items newest first and at most k. */
static void *reader_main(void *arg)
{
    targ_t *ta = arg;
    ctx_t *c = ta->c;
    tly_rcu_thread_online();
    uint64_t r = 0x9e3779b97f4a7c15ull + (uint64_t)ta->id;
    int ue = tly_featset_entity(c->fs, "user", 4), pe = tly_featset_entity(c->fs, "pin", 3);
    tly_featwin_t ureq[] = {{(uint32_t)c->fid[0], 0}, {(uint32_t)c->fid[0], 1},
                            {(uint32_t)c->fid[0], 2}, {(uint32_t)c->fid[0], 3},
                            {(uint32_t)c->fid[1], 0}, {(uint32_t)c->fid[4], 0},
                            {(uint32_t)c->fid[5], 0}};
    tly_featwin_t preq[] = {{(uint32_t)c->fid[9], 0}, {(uint32_t)c->fid[9], 1}};
    tly_value_t out[8];
    tly_item_t items[RECENT_K + 1];
    char sbuf[4096], id[32];
    long checks = 0, skipped = 0, bad = 0;
    while (atomic_load(&c->writers_done) < 2) {
        /* Writers prune state at their own clock, so the invariants hold for
         * a read at `now` only if no writer's clock passed `now` before the
         * read finished: read a little ahead, and skip the check when a
         * clock overtook it. */
        int64_t c0 = atomic_load(&c->clock[0]), c1 = atomic_load(&c->clock[1]);
        if (c0 == 0 || c1 == 0)
            continue;
        int64_t now = (c0 > c1 ? c0 : c1) + 10 * MIN;
        long bad_before = bad;
        int n = snprintf(id, sizeof id, "%u", 1 + (unsigned)(rng_next(&r) % c->S->nusers));
        tly_store_read(c->store, (uint32_t)ue, id, (size_t)n, ureq, 7, now, out, NULL, sbuf,
                       sizeof sbuf);
        if (!(ival(&out[0]) <= ival(&out[1]) && ival(&out[1]) <= ival(&out[2]) &&
              ival(&out[2]) <= ival(&out[3]) && ival(&out[4]) >= ival(&out[1])))
            bad++;
        if (out[5].type == TLY_V_INT && out[6].type == TLY_V_INT && out[5].u.i > out[6].u.i)
            bad++;
        size_t got = 0;
        tly_store_recent(c->store, (uint32_t)ue, id, (size_t)n, (uint32_t)c->fid[7], INT64_MIN,
                         now + SKEW, items, RECENT_K + 1, &got, sbuf, sizeof sbuf);
        if (got > RECENT_K)
            bad++;
        for (size_t q = 1; q < got; q++)
            if (items[q].time_ms > items[q - 1].time_ms)
                bad++;
        n = snprintf(id, sizeof id, "p%u", 1 + (unsigned)(rng_next(&r) % c->S->npins));
        tly_store_read(c->store, (uint32_t)pe, id, (size_t)n, preq, 2, now, out, NULL, sbuf,
                       sizeof sbuf);
        if (ival(&out[0]) > ival(&out[1]))
            bad++;
        if (atomic_load(&c->clock[0]) > now || atomic_load(&c->clock[1]) > now) {
            bad = bad_before; /* a writer overtook the read: no verdict */
            skipped++;
        } else {
            checks++;
        }
        if (ta->id == 0 && (checks + skipped) % 20000 == 0) {
            tly_store_sweep(c->store, c0 < c1 ? c0 : c1, 0);
            atomic_fetch_add(&c->sweeps, 1);
        }
    }
    atomic_fetch_add(&c->reader_checks, checks);
    atomic_fetch_add(&c->reader_skipped, skipped);
    tly_rcu_thread_offline();
    return (void *)(intptr_t)bad;
}

/* Groups event indexes by entity (counting sort, arrival order kept). */
static void group_by(const stream_t *S, int pin, size_t nent, size_t **start, uint32_t **idx)
{
    size_t *st = calloc(nent + 2, sizeof *st);
    uint32_t *ix = malloc(S->nevents * sizeof *ix);
    assert_non_null(st);
    assert_non_null(ix);
    for (size_t i = 0; i < S->nevents; i++)
        st[(pin ? S->ev[i].pin : S->ev[i].user) + 1]++;
    for (size_t e = 1; e <= nent + 1; e++)
        st[e] += st[e - 1];
    size_t *fill = malloc((nent + 1) * sizeof *fill);
    assert_non_null(fill);
    memcpy(fill, st, (nent + 1) * sizeof *fill);
    for (size_t i = 0; i < S->nevents; i++)
        ix[fill[pin ? S->ev[i].pin : S->ev[i].user]++] = (uint32_t)i;
    free(fill);
    *start = st;
    *idx = ix;
}

static bool same_value(const tly_value_t *a, const tly_value_t *b)
{
    if (a->type != b->type)
        return false;
    switch (a->type) {
    case TLY_V_INT:
        return a->u.i == b->u.i;
    case TLY_V_DOUBLE:
        return a->u.d == b->u.d;
    case TLY_V_STR:
        return a->len == b->len && memcmp(a->u.s, b->u.s, a->len) == 0;
    default:
        return true;
    }
}

/* Compares every value of every entity at now; returns mismatches. */
static long check_all(ctx_t *c, int64_t now, size_t *ust, uint32_t *uix, size_t *pst, uint32_t *pix,
                      long *compared)
{
    const stream_t *S = c->S;
    long mismatches = 0;
    char id[32], sbuf[8192];
    tly_featwin_t req[32];
    int reqf[32];
    tly_value_t out[32];
    tly_item_t items[RECENT_K + 1];
    uint32_t want[RECENT_K];
    for (int pin = 0; pin <= 1; pin++) {
        size_t nent = pin ? S->npins : S->nusers;
        size_t *st = pin ? pst : ust;
        uint32_t *ix = pin ? pix : uix;
        int ent = tly_featset_entity(c->fs, pin ? "pin" : "user", pin ? 3 : 4);
        size_t nreq = 0;
        for (size_t f = 0; f < NMFEATS; f++) {
            if (mfeats[f].pin != pin || mfeats[f].kind == F_LASTK)
                continue;
            int nw = mfeats[f].nwin ? mfeats[f].nwin : 1;
            for (int w = 0; w < nw; w++) {
                req[nreq] = (tly_featwin_t){(uint32_t)c->fid[f], (uint32_t)w};
                reqf[nreq++] = (int)f;
            }
        }
        for (size_t e = 1; e <= nent; e++) {
            int n = snprintf(id, sizeof id, pin ? "p%zu" : "%zu", e);
            const uint32_t *evs = ix + st[e];
            size_t nev = st[e + 1] - st[e];
            assert_int_equal(tly_store_read(c->store, (uint32_t)ent, id, (size_t)n, req, nreq, now,
                                            out, NULL, sbuf, sizeof sbuf),
                             TLY_OK);
            for (size_t q = 0; q < nreq; q++) {
                const mfeat_t *f = &mfeats[reqf[q]];
                tly_value_t exp;
                if (f->kind == F_LAST) {
                    uint32_t one[RECENT_K];
                    exp.type = TLY_V_NIL;
                    if (model_recent(S, f, evs, nev, 1, now, one) == 1) {
                        const char *an = action_names[S->ev[one[0]].action];
                        exp = (tly_value_t){
                            .type = TLY_V_STR, .len = (uint32_t)strlen(an), .u.s = an};
                    }
                } else {
                    exp = model_value(S, f, (int)req[q].window, evs, nev, now);
                }
                (*compared)++;
                if (!same_value(&exp, &out[q])) {
                    if (mismatches < 10)
                        fprintf(stderr,
                                "mismatch: %s %s %s window %u at %lld: want type %d %lld/%g, "
                                "got type %d %lld/%g\n",
                                pin ? "pin" : "user", id, f->name, req[q].window, (long long)now,
                                exp.type, (long long)exp.u.i,
                                exp.type == TLY_V_DOUBLE ? exp.u.d : 0, out[q].type,
                                (long long)out[q].u.i,
                                out[q].type == TLY_V_DOUBLE ? out[q].u.d : 0);
                    mismatches++;
                }
            }
            if (pin)
                continue;
            /* recent: every item, newest first */
            size_t got = 0;
            assert_int_equal(tly_store_recent(c->store, (uint32_t)ent, id, (size_t)n,
                                              (uint32_t)c->fid[7], INT64_MIN, now, items,
                                              RECENT_K + 1, &got, sbuf, sizeof sbuf),
                             TLY_OK);
            size_t m = model_recent(S, &mfeats[7], evs, nev, RECENT_K, now, want);
            (*compared)++;
            bool ok = got == m;
            for (size_t q = 0; ok && q < m; q++) {
                const gev_t *ge = &S->ev[want[q]];
                char pb[16];
                int pl = snprintf(pb, sizeof pb, "p%u", ge->pin);
                const char *an = action_names[ge->action];
                ok = items[q].time_ms == ge->t && items[q].nvals == 2 &&
                     items[q].vals[0].type == TLY_V_STR && items[q].vals[0].len == (uint32_t)pl &&
                     memcmp(items[q].vals[0].u.s, pb, (size_t)pl) == 0 &&
                     items[q].vals[1].type == TLY_V_STR && items[q].vals[1].len == strlen(an) &&
                     memcmp(items[q].vals[1].u.s, an, strlen(an)) == 0;
            }
            if (!ok) {
                if (mismatches < 10)
                    fprintf(stderr, "mismatch: user %s recent at %lld: want %zu items, got %zu\n",
                            id, (long long)now, m, got);
                mismatches++;
            }
        }
    }
    return mismatches;
}

static void test_store_equals_brute_force_model_under_concurrency(void **state)
{
    (void)state;
    char err[512];
    tly_config_t *cfg = NULL;
    assert_int_equal(tly_config_load_string(model_yaml, "model.yaml", &cfg, err, sizeof err),
                     TLY_OK);
    ctx_t c;
    memset(&c, 0, sizeof c);
    assert_int_equal(tly_featset_compile(cfg, &c.fs, err, sizeof err), TLY_OK);
    c.f_user = tly_featset_field(c.fs, "user_id", 7);
    c.f_pin = tly_featset_field(c.fs, "pin_id", 6);
    c.f_action = tly_featset_field(c.fs, "action", 6);
    c.f_dwell = tly_featset_field(c.fs, "dwell_ms", 8);
    c.f_score = tly_featset_field(c.fs, "score", 5);
    c.f_ts = tly_featset_field(c.fs, "ts", 2);
    assert_true(c.f_user >= 0 && c.f_pin >= 0 && c.f_action >= 0 && c.f_dwell >= 0 &&
                c.f_score >= 0 && c.f_ts >= 0);
    for (size_t f = 0; f < NMFEATS; f++) {
        int ent = tly_featset_entity(c.fs, mfeats[f].pin ? "pin" : "user", mfeats[f].pin ? 3 : 4);
        uint32_t fid;
        int win;
        assert_int_equal(tly_featset_resolve(c.fs, (uint32_t)ent, mfeats[f].name,
                                             strlen(mfeats[f].name), &fid, &win),
                         TLY_OK);
        c.fid[f] = (int)fid;
        for (int w = 0; w < mfeats[f].nwin; w++) {
            assert_int_equal(c.fs->feats[fid].windows[w].len_ms, mfeats[f].win[w]);
            assert_int_equal(c.fs->feats[fid].windows[w].hop_ms, mfeats[f].hop[w]);
        }
    }

    stream_t S;
    make_stream(&S, 0x5eed1234abcdULL);
    c.S = &S;
    c.store = tly_store_new(c.fs);

    pthread_t w[2], r[2];
    targ_t wa[2] = {{&c, 0}, {&c, 1}}, ra[2] = {{&c, 0}, {&c, 1}};
    for (int i = 0; i < 2; i++) {
        assert_int_equal(pthread_create(&r[i], NULL, reader_main, &ra[i]), 0);
        assert_int_equal(pthread_create(&w[i], NULL, writer_main, &wa[i]), 0);
    }
    long bad = 0;
    for (int i = 0; i < 2; i++) {
        void *rv;
        pthread_join(w[i], NULL);
        pthread_join(r[i], &rv);
        bad += (long)(intptr_t)rv;
    }
    printf("# %zu events, %zu users, %zu pins; readers made %ld checks (%ld overtaken), "
           "%ld sweeps\n",
           S.nevents, S.nusers, S.npins, atomic_load(&c.reader_checks),
           atomic_load(&c.reader_skipped), atomic_load(&c.sweeps));
    assert_int_equal(bad, 0);
    assert_true(atomic_load(&c.reader_checks) > 0);

    size_t *ust, *pst;
    uint32_t *uix, *pix;
    group_by(&S, 0, S.nusers, &ust, &uix);
    group_by(&S, 1, S.npins, &pst, &pix);

    tly_rcu_thread_online();
    long compared = 0, mism = 0;
    int64_t last_clock = S.ev[S.nevents - 1].clock;
    /* at the writers' last clock (future items beyond it are held back) */
    mism += check_all(&c, last_clock, ust, uix, pst, pix, &compared);
    int64_t r1 = S.t_end + SKEW + 1000;
    tly_store_sweep(c.store, r1, 0);
    mism += check_all(&c, r1, ust, uix, pst, pix, &compared);
    mism += check_all(&c, r1 + 37 * MIN + 13 * SEC, ust, uix, pst, pix, &compared);
    int64_t r3 = r1 + DAY + 3 * HOUR + 7;
    tly_store_sweep(c.store, r3, 0);
    mism += check_all(&c, r3, ust, uix, pst, pix, &compared);
    printf("# compared %ld values at 4 times, %ld mismatches\n", compared, mism);
    assert_int_equal(mism, 0);

    /* counters: every drop has a reason */
    tly_store_stats_t st;
    tly_store_stats(c.store, &st);
    long want_future = 0;
    for (size_t i = 0; i < S.nevents; i++)
        want_future += S.ev[i].t > S.ev[i].clock + SKEW;
    assert_int_equal(st.dropped[TLY_E_EV_FUTURE], want_future);
    assert_true(st.dropped[TLY_E_EV_LATE] > 0);
    printf("# dropped: %llu future, %llu late feature updates; %llu entities, %llu bytes\n",
           (unsigned long long)st.dropped[TLY_E_EV_FUTURE],
           (unsigned long long)st.dropped[TLY_E_EV_LATE], (unsigned long long)st.entities,
           (unsigned long long)st.bytes);

    /* far in the future everything expires and all memory is returned */
    tly_store_sweep(c.store, r3 + 30 * DAY, 0);
    tly_store_stats(c.store, &st);
    assert_int_equal(st.entities, 0);
    /* only the intern table and an empty store's slot arrays are left */
    tly_store_t *empty = tly_store_new(c.fs);
    tly_store_stats_t est;
    tly_store_stats(empty, &est);
    tly_store_free(empty);
    assert_int_equal(st.table_bytes, est.table_bytes);
    assert_int_equal(st.bytes, st.interned_bytes + st.table_bytes);

    tly_store_free(c.store);
    tly_rcu_thread_offline();
    tly_featset_free(c.fs);
    tly_config_free(cfg);
    free(S.ev);
    free(ust);
    free(uix);
    free(pst);
    free(pix);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_store_equals_brute_force_model_under_concurrency),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
