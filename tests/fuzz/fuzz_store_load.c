/*
 * fuzz_store_load.c — libFuzzer target for restoring a snapshot's state: one
 * block of tly_store_dump output loaded into a fresh store (tly_store_load in
 * store.c, with the record checks of store_words.c and store_log.c), and
 * everything a store then does with the state that passed.
 *
 * The first input byte picks how the rest (the block) is loaded:
 *  0: under the definitions that wrote it (feat_hash NULL);
 *  1: with the writer's feature hashes (layouts that match ours);
 *  2: with two of them changed (records remapped, those features dropped);
 *  3: under redefined features (new, moved and changed features, other
 *     value fields, renumbered entity types): a partial restore.
 * The definitions cover every aggregation (count; sum of ints and of
 * doubles; min, max, avg; last; last_k of strings and of numbers) over two
 * entity types. Beyond the sanitizers, it checks and aborts when broken:
 *  - the load gives TLY_OK or TLY_E_INVAL, and TLY_E_INVAL comes with a
 *    sentence naming a byte inside the block; without feature hashes every
 *    feature counts as restored;
 *  - after TLY_OK, for every loaded entity (walked with tly_store_drop,
 *    which removes none): every window of every feature reads TLY_OK with a
 *    value of its aggregation's type (strings inside the caller's buffer,
 *    which is larger than the block), at a fixed now and at the entity's
 *    newest event; at the fixed now, tly_store_recent gives at most k
 *    items, newest first, inside [since, asof], each with the feature's
 *    values, and agrees with the read's last_k count and last value;
 *  - events applied to the first SL_APPLY_TO loaded entities are taken
 *    (TLY_OK), a count window afterwards holds at least the events applied
 *    to it, and the reads above hold again;
 *  - the store dumped again loads into a fresh store, which has the same
 *    entities answering every read the same; the sweeper runs over it.
 *
 * The seed corpus holds dumps of small stores — sparse entities (compact
 * logs), busy ones (word-encoded, every bucket of every window, full
 * last_k), sums past int64, long ids — each under every mode.
 * `make fuzz` builds it (build/fuzz/fuzz_store_load) and runs it on its
 * corpus. test_store includes this file (defining TLY_FUZZ_STORE_LOAD_NO_ENTRY
 * and STORE_LOAD_CHECK_FAIL) to replay the corpus through the same checks.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/config.h"
#include "tallyd/feature.h"
#include "tallyd/rcu.h"
#include "tallyd/store.h"
#include "store_int.h" /* mix64, to spread the seeds */

#ifndef STORE_LOAD_CHECK_FAIL
#define STORE_LOAD_CHECK_FAIL(what)                                                                \
    do {                                                                                           \
        fprintf(stderr, "fuzz_store_load: contract broken: %s\n", what);                           \
        abort();                                                                                   \
    } while (0)
#endif

#define SL_CHECK(ok, what)                                                                         \
    do {                                                                                           \
        if (!(ok))                                                                                 \
            STORE_LOAD_CHECK_FAIL(what);                                                           \
    } while (0)

#define SL_SEC INT64_C(1000)
#define SL_DAY (86400 * SL_SEC)
/* The wall time events are applied and values read at: a whole day, so
 * aligned to every hop. */
#define SL_NOW       (INT64_C(19675) * SL_DAY)
#define SL_MAX_REQ   64 /* feature windows of one entity type */
#define SL_MAX_K     8  /* the largest k of the definitions below */
#define SL_APPLY_TO  24 /* loaded entities that get events */
#define SL_NEVENTS   6  /* events each of them gets */
#define SL_MAX_FIELD 48 /* events.max_string */

#define SL_HEAD                                                                                    \
    "events:\n"                                                                                    \
    "  time: { field: ts, unit: ms }\n"                                                            \
    "  max_future_skew: 1m\n"                                                                      \
    "  max_string: 48\n"                                                                           \
    "store:\n"                                                                                     \
    "  idle_ttl: 1d\n"                                                                             \
    "features:\n"

/* The writer's definitions (the corpus was dumped under them). */
static const char *const sl_yaml_writer = SL_HEAD
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
    " windows: [5m, 1h] }\n"
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h, 1d] "
    "}\n"
    "  - { name: score, entity: user, key: user_id, agg: sum, value: score, windows: [1h] }\n"
    "  - { name: dmin, entity: user, key: user_id, agg: min, value: dwell_ms, windows: [1h] }\n"
    "  - { name: smax, entity: user, key: user_id, agg: max, value: score, windows: [5m] }\n"
    "  - { name: davg, entity: user, key: user_id, agg: avg, value: dwell_ms, windows: [1h] }\n"
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 4,"
    " value: [pin_id, action, note] }\n"
    "  - { name: recent_n, entity: user, key: user_id, agg: last_k, k: 3,"
    " value: [dwell_ms, score] }\n"
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
    " agg: count, windows: [1h] }\n"
    "  - { name: pin_dwell, entity: pin, key: pin_id, agg: max, value: dwell_ms, windows: [1h] }\n"
    "  - { name: pin_last, entity: pin, key: pin_id, agg: last_k, k: 2, value: [user_id, score] "
    "}\n";

/* The same redefined: the pins come first (entity types renumbered),
 * `saves` is new and shifts the users' slots, `recent_n` moves first (the
 * value fields change order), `clicks` gets other windows (changed),
 * `dmin` and `pin_dwell` are gone, `tag` is a new entity type with a k of 8. */
static const char *const sl_yaml_redefined = SL_HEAD
    "  - { name: pin_last, entity: pin, key: pin_id, agg: last_k, k: 2, value: [user_id, score] }\n"
    "  - { name: saves, entity: user, key: user_id, where: { action: save }, agg: count,"
    " windows: [1h] }\n"
    "  - { name: recent_n, entity: user, key: user_id, agg: last_k, k: 3,"
    " value: [dwell_ms, score] }\n"
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
    " windows: [1h, 1d] }\n"
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h, 1d] "
    "}\n"
    "  - { name: score, entity: user, key: user_id, agg: sum, value: score, windows: [1h] }\n"
    "  - { name: smax, entity: user, key: user_id, agg: max, value: score, windows: [5m] }\n"
    "  - { name: davg, entity: user, key: user_id, agg: avg, value: dwell_ms, windows: [1h] }\n"
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 4,"
    " value: [pin_id, action, note] }\n"
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
    " agg: count, windows: [1h] }\n"
    "  - { name: tag_recent, entity: tag, key: note, agg: last_k, k: 8, value: [action] }\n";

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    uint64_t *hash; /* each feature's definition hash, by feature id */
    int f_ts, f_user, f_pin, f_action, f_dwell, f_score, f_note;
} sl_set_t;

static sl_set_t sl_writer, sl_redefined;
static uint64_t *sl_hash_changed; /* the writer's, `dwell` and `impressions` changed */

/* A definition's hash: its entity type and name, and a mark for the one
 * feature whose definition changed under the same name. */
static uint64_t sl_def_hash(const tly_featset_t *fs, uint32_t f, bool redefined)
{
    const tly_feat_t *feat = &fs->feats[f];
    uint64_t h = UINT64_C(1469598103934665603);
    for (const char *c = fs->entities[feat->entity].name; *c; c++)
        h = (h ^ (uint8_t)*c) * UINT64_C(1099511628211);
    h = (h ^ '/') * UINT64_C(1099511628211);
    for (const char *c = feat->name; *c; c++)
        h = (h ^ (uint8_t)*c) * UINT64_C(1099511628211);
    return redefined && strcmp(feat->name, "clicks") == 0 ? h + 1 : h;
}

static void sl_set_init(sl_set_t *set, const char *yaml, bool redefined)
{
    char err[512];
    if (tly_config_load_string(yaml, "fuzz_store_load.yaml", &set->cfg, err, sizeof err) !=
            TLY_OK ||
        tly_featset_compile(set->cfg, &set->fs, err, sizeof err) != TLY_OK) {
        fprintf(stderr, "fuzz_store_load: setup failed: %s\n", err);
        abort();
    }
    const tly_featset_t *fs = set->fs;
    set->hash = malloc(sizeof *set->hash * fs->nfeats);
    SL_CHECK(set->hash != NULL, "out of memory");
    for (uint32_t f = 0; f < fs->nfeats; f++)
        set->hash[f] = sl_def_hash(fs, f, redefined);
    set->f_ts = tly_featset_field(fs, "ts", 2);
    set->f_user = tly_featset_field(fs, "user_id", 7);
    set->f_pin = tly_featset_field(fs, "pin_id", 6);
    set->f_action = tly_featset_field(fs, "action", 6);
    set->f_dwell = tly_featset_field(fs, "dwell_ms", 8);
    set->f_score = tly_featset_field(fs, "score", 5);
    set->f_note = tly_featset_field(fs, "note", 4);
    SL_CHECK(set->f_ts >= 0 && set->f_user >= 0 && set->f_pin >= 0 && set->f_action >= 0 &&
                 set->f_dwell >= 0 && set->f_score >= 0 && set->f_note >= 0,
             "setup: a field is missing");
    for (uint32_t f = 0; f < fs->nfeats; f++)
        SL_CHECK(fs->feats[f].k <= SL_MAX_K, "setup: k above SL_MAX_K");
}

static void sl_set_fini(sl_set_t *set)
{
    free(set->hash);
    tly_featset_free(set->fs);
    tly_config_free(set->cfg);
    memset(set, 0, sizeof *set);
}

/* Builds both featsets; the caller's thread is registered with RCU. */
static void store_load_fuzz_init(void)
{
    sl_set_init(&sl_writer, sl_yaml_writer, false);
    sl_set_init(&sl_redefined, sl_yaml_redefined, true);
    const tly_featset_t *fs = sl_writer.fs;
    sl_hash_changed = malloc(sizeof *sl_hash_changed * fs->nfeats);
    SL_CHECK(sl_hash_changed != NULL, "out of memory");
    for (uint32_t f = 0; f < fs->nfeats; f++) {
        bool changed = strcmp(fs->feats[f].name, "dwell") == 0 ||
                       strcmp(fs->feats[f].name, "impressions") == 0;
        sl_hash_changed[f] = sl_writer.hash[f] + (changed ? 7 : 0);
    }
}

static void store_load_fuzz_fini(void)
{
    free(sl_hash_changed);
    sl_hash_changed = NULL;
    sl_set_fini(&sl_writer);
    sl_set_fini(&sl_redefined);
}

/* ---- the loaded entities ------------------------------------------------- */

typedef struct {
    uint32_t type;
    uint32_t len;
    char id[UINT8_MAX];
} sl_ent_t;

typedef struct {
    const tly_featset_t *fs;
    sl_ent_t *v;
    size_t n, cap;
} sl_ents_t;

/* tly_store_drop's predicate: records every entity, removes none. */
static bool sl_collect(uint32_t type, const char *id, size_t len, void *ctx)
{
    sl_ents_t *es = ctx;
    SL_CHECK(type < es->fs->nentities, "a record of an entity type we do not have");
    SL_CHECK(len <= UINT8_MAX, "an entity id longer than 255 bytes");
    if (es->n == es->cap) {
        es->cap = es->cap ? es->cap * 2 : 64;
        es->v = realloc(es->v, es->cap * sizeof *es->v);
        SL_CHECK(es->v != NULL, "out of memory");
    }
    sl_ent_t *e = &es->v[es->n++];
    e->type = type;
    e->len = (uint32_t)len;
    memcpy(e->id, id, len);
    return false;
}

static void sl_walk(tly_store_t *store, const tly_featset_t *fs, sl_ents_t *es)
{
    es->fs = fs;
    es->n = 0;
    SL_CHECK(tly_store_drop(store, sl_collect, es) == 0,
             "drop removed a record it was not asked to");
    tly_store_stats_t st;
    tly_store_stats(store, &st);
    SL_CHECK(st.entities == es->n, "stats count other entities than the table holds");
}

/* ---- reads --------------------------------------------------------------- */

/* A caller's string buffer: larger than the block, so any string of state
 * that passed the checks fits (TLY_E_FULL would mean a string longer than
 * its record). */
typedef struct {
    char *buf;
    size_t cap;
} sl_strbuf_t;

static void sl_touch(const tly_value_t *v, const sl_strbuf_t *sb)
{
    volatile unsigned char sink = 0;
    switch (v->type) {
    case TLY_V_NIL:
    case TLY_V_INT:
    case TLY_V_BOOL:
    case TLY_V_DOUBLE:
        break;
    case TLY_V_STR:
        SL_CHECK(v->len == 0 ||
                     (v->u.s >= sb->buf && v->len <= sb->cap - (size_t)(v->u.s - sb->buf)),
                 "a string outside the caller's buffer");
        for (uint32_t b = 0; b < v->len; b++) /* ASan checks every byte is live */
            sink ^= (unsigned char)v->u.s[b];
        break;
    default:
        SL_CHECK(0, "a value of an unknown type");
    }
    (void)sink;
}

static void sl_check_value(const tly_feat_t *feat, const tly_value_t *v, const sl_strbuf_t *sb)
{
    switch (feat->agg) {
    case TLY_AGG_COUNT:
        SL_CHECK(v->type == TLY_V_INT && v->u.i >= 0 && v->u.i <= (int64_t)UINT32_MAX,
                 "a count that is not an int in 0..2^32-1");
        break;
    case TLY_AGG_SUM:
        SL_CHECK(v->type == TLY_V_INT || v->type == TLY_V_DOUBLE, "a sum that is not a number");
        break;
    case TLY_AGG_MIN:
    case TLY_AGG_MAX:
        SL_CHECK(v->type == TLY_V_NIL || v->type == TLY_V_INT || v->type == TLY_V_DOUBLE,
                 "a min or max that is neither nil nor a number");
        break;
    case TLY_AGG_AVG:
        SL_CHECK(v->type == TLY_V_NIL || v->type == TLY_V_DOUBLE,
                 "an avg that is neither nil nor a double");
        break;
    case TLY_AGG_LAST_K:
        SL_CHECK(v->type == TLY_V_INT && v->u.i >= 0 && v->u.i <= (int64_t)feat->k,
                 "a last_k count outside 0..k");
        break;
    default:
        sl_touch(v, sb);
        break;
    }
}

static bool sl_same_value(const tly_value_t *a, const tly_value_t *b)
{
    if (a->type != b->type)
        return false;
    switch (a->type) {
    case TLY_V_STR:
        return a->len == b->len && (a->len == 0 || memcmp(a->u.s, b->u.s, a->len) == 0);
    case TLY_V_DOUBLE:
        return memcmp(&a->u.d, &b->u.d, sizeof a->u.d) == 0;
    case TLY_V_NIL:
        return true;
    default:
        return a->u.i == b->u.i;
    }
}

/* Every window of every feature of the entity's type, in req. */
static size_t sl_requests(const tly_featset_t *fs, uint32_t type, tly_featwin_t *req)
{
    const tly_entity_t *et = &fs->entities[type];
    size_t n = 0;
    for (size_t i = 0; i < et->nfeats; i++) {
        const tly_feat_t *f = &fs->feats[et->feats[i]];
        for (uint32_t w = 0; w < (f->nwindows ? f->nwindows : 1); w++) {
            SL_CHECK(n < SL_MAX_REQ, "setup: too many feature windows");
            req[n++] = (tly_featwin_t){et->feats[i], w};
        }
    }
    return n;
}

/* Reads the items of last/last_k feature feat at asof and checks them;
 * returns how many. */
static size_t sl_recent(tly_store_t *store, const tly_feat_t *feat, const sl_ent_t *e,
                        int64_t since, int64_t asof, size_t cap, tly_item_t *items,
                        const sl_strbuf_t *sb)
{
    size_t got = SIZE_MAX;
    tly_err_t rc = tly_store_recent(store, e->type, e->id, e->len, feat->id, since, asof, items,
                                    cap, &got, sb->buf, sb->cap);
    SL_CHECK(rc != TLY_E_IO, "recent: a loaded record does not decode");
    SL_CHECK(rc != TLY_E_FULL, "recent: items longer than their record");
    SL_CHECK(rc == TLY_OK, "recent: result other than TLY_OK");
    SL_CHECK(got <= cap && got <= feat->k, "recent: more items than asked for or kept");
    int64_t lo = asof - feat->horizon_ms;
    lo = since > lo ? since : lo;
    for (size_t i = 0; i < got; i++) {
        const tly_item_t *it = &items[i];
        SL_CHECK(it->nvals == feat->nvalues, "recent: an item without the feature's values");
        SL_CHECK(it->time_ms >= lo && it->time_ms <= asof, "recent: an item outside the range");
        SL_CHECK(i == 0 || it->time_ms <= items[i - 1].time_ms, "recent: items not newest first");
        for (uint32_t v = 0; v < it->nvals; v++)
            sl_touch(&it->vals[v], sb);
    }
    return got;
}

/* Reads every value of entity e at now into out (n of req) and checks each;
 * with sb_items, each last/last_k feature's items too, against the read. */
static void sl_read(tly_store_t *store, const tly_featset_t *fs, const sl_ent_t *e, int64_t now,
                    const tly_featwin_t *req, size_t n, tly_value_t *out, int64_t *last,
                    const sl_strbuf_t *sb, const sl_strbuf_t *sb_items)
{
    tly_err_t rc =
        tly_store_read(store, e->type, e->id, e->len, req, n, now, out, last, sb->buf, sb->cap);
    SL_CHECK(rc != TLY_E_IO, "read: a loaded record does not decode");
    SL_CHECK(rc != TLY_E_FULL, "read: a string longer than its record");
    SL_CHECK(rc == TLY_OK, "read: result other than TLY_OK");
    for (size_t r = 0; r < n; r++) {
        const tly_feat_t *feat = &fs->feats[req[r].feat];
        sl_check_value(feat, &out[r], sb);
        if (tly_agg_windowed(feat->agg) || sb_items == NULL)
            continue;
        tly_item_t items[SL_MAX_K + 1];
        size_t got = sl_recent(store, feat, e, INT64_MIN, now, feat->k + 1, items, sb_items);
        if (feat->agg == TLY_AGG_LAST_K)
            SL_CHECK(out[r].u.i == (int64_t)got, "read's last_k count and recent's items differ");
        else if (got == 0)
            SL_CHECK(out[r].type == TLY_V_NIL, "read's last is not nil without items");
        else
            SL_CHECK(sl_same_value(&out[r], &items[0].vals[0]),
                     "read's last is not the newest item's first value");
        /* the newest item of a short range */
        sl_recent(store, feat, e, now - 60 * SL_SEC, now, 1, items, sb_items);
    }
}

/* ---- events -------------------------------------------------------------- */

static const char sl_text[] = "the quick brown fox jumps over the lazy dog, twice: the quick b";

/* Event j for entity e: its id as the key, the other keys and values picked
 * by seed (ints near the int64 limits, doubles, short and long strings,
 * absent ones), a few seconds before SL_NOW; it feeds only e's type. */
static void sl_event(const sl_set_t *set, const sl_ent_t *e, int j, uint64_t seed, tly_event_t *ev)
{
    static const char *const actions[] = {"click", "impression", "save",
                                          "an action far too long to intern"};
    const tly_featset_t *fs = set->fs;
    uint64_t r = mix64(seed + (uint64_t)j * UINT64_C(0x9e3779b97f4a7c15));
    memset(ev, 0, sizeof *ev);
    ev->nfields = (uint32_t)fs->nfields;
    ev->time_ms = SL_NOW - j * 10 * SL_SEC - (int64_t)(r % 7) * SL_SEC;
    ev->skip_entities = ~(UINT64_C(1) << e->type);
    ev->vals[set->f_ts] = (tly_value_t){.type = TLY_V_INT, .u.i = ev->time_ms};
    ev->vals[set->f_user] = (tly_value_t){.type = TLY_V_STR, .len = 2, .u.s = "u7"};
    ev->vals[set->f_pin] = (tly_value_t){.type = TLY_V_STR, .len = 3, .u.s = "p42"};
    const char *action = actions[(r >> 8) % 4];
    ev->vals[set->f_action] =
        (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(action), .u.s = action};
    switch ((r >> 12) % 5) {
    case 0:
        break; /* absent */
    case 1:
        ev->vals[set->f_dwell] = (tly_value_t){.type = TLY_V_DOUBLE, .u.d = (double)(r >> 40) / 3};
        break;
    case 2:
        ev->vals[set->f_dwell] = (tly_value_t){.type = TLY_V_INT, .u.i = INT64_MAX - (int64_t)j};
        break;
    default:
        ev->vals[set->f_dwell] =
            (tly_value_t){.type = TLY_V_INT, .u.i = (int64_t)(r >> 44) - (INT64_C(1) << 19)};
        break;
    }
    if ((r >> 16) % 4 != 0)
        ev->vals[set->f_score] =
            (tly_value_t){.type = TLY_V_DOUBLE, .u.d = (double)(int64_t)(r >> 20) * 0.125};
    if ((r >> 18) % 3 != 0) {
        uint32_t len = (uint32_t)((r >> 24) % (SL_MAX_FIELD + 1));
        ev->vals[set->f_note] = (tly_value_t){.type = TLY_V_STR, .len = len, .u.s = sl_text};
    }
    /* last: a key may be a value field too (tag's is note) */
    const tly_entity_t *et = &fs->entities[e->type];
    for (size_t k = 0; k < et->nkeys; k++)
        ev->vals[et->keys[k]] = (tly_value_t){.type = TLY_V_STR, .len = e->len, .u.s = e->id};
}

/* ---- dumps --------------------------------------------------------------- */

typedef struct {
    uint8_t **data;
    size_t *len;
    size_t n, cap;
} sl_blocks_t;

static bool sl_keep_block(void *ctx, const void *data, size_t len)
{
    sl_blocks_t *d = ctx;
    if (d->n == d->cap) {
        d->cap = d->cap ? d->cap * 2 : 4;
        d->data = realloc(d->data, d->cap * sizeof *d->data);
        d->len = realloc(d->len, d->cap * sizeof *d->len);
        SL_CHECK(d->data != NULL && d->len != NULL, "out of memory");
    }
    d->data[d->n] = malloc(len ? len : 1);
    SL_CHECK(d->data[d->n] != NULL, "out of memory");
    memcpy(d->data[d->n], data, len);
    d->len[d->n++] = len;
    return true;
}

static void sl_blocks_free(sl_blocks_t *d)
{
    for (size_t b = 0; b < d->n; b++)
        free(d->data[b]);
    free(d->data);
    free(d->len);
    memset(d, 0, sizeof *d);
}

/* ---- one input ----------------------------------------------------------- */

static void sl_check_error(const char *err, size_t errlen, size_t n)
{
    SL_CHECK(memchr(err, '\0', errlen) != NULL, "load: error message unterminated");
    SL_CHECK(err[0] != '\0', "load: TLY_E_INVAL without a sentence");
    const char *at = strstr(err, " at byte ");
    SL_CHECK(at != NULL && strstr(err, " of a state block") != NULL,
             "load: the sentence does not say where");
    size_t byte = (size_t)strtoull(at + 9, NULL, 10);
    SL_CHECK(byte < n, "load: the sentence names a byte outside the block");
}

/* Everything after a load that returned TLY_OK (see the opening comment). */
static void sl_exercise(const sl_set_t *set, tly_store_t *store, const uint64_t *hash,
                        const uint8_t *data, size_t n)
{
    const tly_featset_t *fs = set->fs;
    sl_ents_t es = {0};
    sl_walk(store, fs, &es);
    sl_strbuf_t sb = {.cap = 2 * n + 65536}, sb2 = sb, sbi = sb;
    sb.buf = malloc(sb.cap);
    sb2.buf = malloc(sb2.cap);
    sbi.buf = malloc(sbi.cap);
    SL_CHECK(sb.buf != NULL && sb2.buf != NULL && sbi.buf != NULL, "out of memory");
    static tly_featwin_t req[SL_MAX_REQ];
    static tly_value_t out[SL_MAX_REQ], out2[SL_MAX_REQ];
    uint64_t seed = 0;
    for (size_t i = 0; i < n; i++)
        seed = seed * 31 + data[i];

    /* the loaded state, at now and at each entity's newest event */
    for (size_t i = 0; i < es.n; i++) {
        const sl_ent_t *e = &es.v[i];
        size_t nreq = sl_requests(fs, e->type, req);
        int64_t last = 0;
        sl_read(store, fs, e, SL_NOW, req, nreq, out, &last, &sb, &sbi);
        if (last >= 0 && last <= SL_NOW + 3650 * SL_DAY && last != SL_NOW)
            sl_read(store, fs, e, last, req, nreq, out, NULL, &sb, NULL);
    }

    /* events on loaded entities; each count then holds at least its own */
    for (size_t i = 0; i < es.n && i < SL_APPLY_TO; i++) {
        const sl_ent_t *e = &es.v[i];
        size_t nreq = sl_requests(fs, e->type, req);
        int64_t matched[SL_MAX_REQ] = {0};
        for (int j = 0; j < SL_NEVENTS; j++) {
            tly_event_t ev;
            sl_event(set, e, j, seed + i, &ev);
            SL_CHECK(tly_store_apply(store, &ev, 0, j, SL_NOW) == TLY_OK,
                     "apply: an event for a loaded entity was not taken");
            for (size_t r = 0; r < nreq; r++)
                matched[r] += tly_feat_match(&fs->feats[req[r].feat], &ev);
        }
        sl_read(store, fs, e, SL_NOW, req, nreq, out, NULL, &sb, &sbi);
        for (size_t r = 0; r < nreq; r++)
            if (fs->feats[req[r].feat].agg == TLY_AGG_COUNT)
                SL_CHECK(out[r].u.i >= matched[r] || out[r].u.i == (int64_t)UINT32_MAX,
                         "a count window lost events applied after the load");
    }

    /* dumped again, it loads, and the copy answers the same */
    sl_blocks_t d = {0};
    SL_CHECK(tly_store_dump(store, hash, sl_keep_block, &d) == TLY_OK, "dump failed");
    tly_store_t *copy = tly_store_new(fs);
    char err[256];
    for (size_t b = 0; b < d.n; b++) {
        err[0] = '\0';
        if (tly_store_load(copy, d.data[b], d.len[b], hash, err, sizeof err) != TLY_OK) {
            static char msg[512];
            snprintf(msg, sizeof msg, "the store's own dump does not load: %s", err);
            STORE_LOAD_CHECK_FAIL(msg);
        }
    }
    sl_ents_t es2 = {0};
    sl_walk(copy, fs, &es2);
    SL_CHECK(es2.n == es.n, "the reloaded dump has other entities");
    for (size_t i = 0; i < es.n; i++) {
        const sl_ent_t *e = &es.v[i];
        size_t nreq = sl_requests(fs, e->type, req);
        int64_t last = 0, last2 = 0;
        sl_read(store, fs, e, SL_NOW, req, nreq, out, &last, &sb, NULL);
        sl_read(copy, fs, e, SL_NOW, req, nreq, out2, &last2, &sb2, NULL);
        SL_CHECK(last == last2, "the reloaded dump has another newest event");
        for (size_t r = 0; r < nreq; r++)
            SL_CHECK(sl_same_value(&out[r], &out2[r]), "the reloaded dump answers differently");
    }
    tly_store_free(copy);
    sl_blocks_free(&d);

    /* the sweeper, in steps and whole */
    for (int k = 0; k < 3; k++)
        tly_store_sweep(store, SL_NOW + 2 * SL_DAY, 5);
    tly_store_sweep(store, SL_NOW + 2 * SL_DAY, 0);

    free(es.v);
    free(es2.v);
    free(sb.buf);
    free(sb2.buf);
    free(sbi.buf);
}

/* Loads data[1..size) as data[0] says; checks everything the opening
 * comment lists. */
static void store_load_check_input(const uint8_t *data, size_t size)
{
    if (size == 0)
        return;
    unsigned mode = data[0] & 3;
    const sl_set_t *set = mode == 3 ? &sl_redefined : &sl_writer;
    const uint64_t *hash = mode == 0 ? NULL : mode == 2 ? sl_hash_changed : set->hash;
    size_t n = size - 1;
    /* A copy of exactly n bytes, so ASan catches any read past the end. */
    uint8_t *buf = malloc(n ? n : 1);
    SL_CHECK(buf != NULL, "out of memory");
    memcpy(buf, data + 1, n);

    tly_store_t *store = tly_store_new(set->fs);
    char err[256];
    memset(err, 0, sizeof err);
    tly_err_t rc = tly_store_load(store, buf, n, hash, err, sizeof err);
    SL_CHECK(rc == TLY_OK || rc == TLY_E_INVAL, "load: result other than TLY_OK or TLY_E_INVAL");
    if (rc != TLY_OK) {
        sl_check_error(err, sizeof err, n);
    } else {
        for (uint32_t f = 0; hash == NULL && f < set->fs->nfeats; f++)
            SL_CHECK(tly_store_restored(store, f), "load without hashes: a feature not restored");
        sl_exercise(set, store, hash, buf, n);
    }
    tly_store_free(store);
    free(buf);
}

#ifndef TLY_FUZZ_STORE_LOAD_NO_ENTRY
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    tly_rcu_thread_online();
    store_load_fuzz_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    store_load_check_input(data, size);
    return 0;
}
#endif
