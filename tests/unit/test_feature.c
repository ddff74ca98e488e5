/*
 * test_feature.c — feature compilation, `where` matching, entity ids and
 * name resolution (feature.c).
 *
 * Configs are written as YAML and loaded with tly_config_load_string(), the
 * way users write them. Expected values (field ids, hops, bucket counts,
 * horizons, messages) are worked out by hand from DESIGN §3 and feature.h.
 */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tallyd/config.h"
#include "tallyd/feature.h"

#define HOUR_MS INT64_C(3600000)
#define DAY_MS  (24 * HOUR_MS)

/* The DESIGN §6 features plus a `last`, a hop and a composite key. */
static const char *const demo_yaml =
    "events:\n"                         /* 1 */
    "  time: { field: ts, unit: ms }\n" /* 2 */
    "  max_future_skew: 30s\n"          /* 3 */
    "  max_bytes: 4096\n"               /* 4 */
    "  max_string: 64\n"                /* 5 */
    "store: { idle_ttl: 2d }\n"         /* 6 */
    "features:\n"                       /* 7 */
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count, "
    "windows: [5m, 1h, 1d, 7d] }\n" /* 8 */
    "  - { name: engaged, entity: user, key: user_id, where: { action: [click, save] }, "
    "agg: count, windows: [1h] }\n" /* 9 */
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, "
    "windows: [1h, 1d] }\n" /* 10 */
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 100, "
    "value: [pin_id, action] }\n" /* 11 */
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression }, "
    "agg: count, windows: [1h, 1d], hop: 10m }\n"                                      /* 12 */
    "  - { name: last_viewer, entity: pin, key: pin_id, agg: last, value: user_id }\n" /* 13 */
    "  - { name: cat_clicks, entity: user_cat, key: [user_id, category], agg: count, "
    "windows: [1d] }\n"; /* 14 */

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
} loaded_t;

static tly_config_t *load_config(const char *yaml)
{
    char err[512] = "";
    tly_config_t *cfg = NULL;
    tly_err_t rc = tly_config_load_string(yaml, "test.yaml", &cfg, err, sizeof err);
    if (rc != TLY_OK)
        fail_msg("config did not load: %s", err);
    return cfg;
}

static loaded_t compile_ok(const char *yaml)
{
    char err[512] = "";
    loaded_t l = {load_config(yaml), NULL};
    tly_err_t rc = tly_featset_compile(l.cfg, &l.fs, err, sizeof err);
    if (rc != TLY_OK)
        fail_msg("featset did not compile: %s", err);
    return l;
}

static void unload(loaded_t *l)
{
    tly_featset_free(l->fs);
    tly_config_free(l->cfg);
}

/* Compiles yaml expecting TLY_E_CONFIG; asserts *out untouched and the message. */
static void compile_fails_with(const char *yaml, const char *message)
{
    char err[512] = "";
    tly_config_t *cfg = load_config(yaml);
    tly_featset_t *fs = (tly_featset_t *)(uintptr_t)0x1;
    assert_int_equal(tly_featset_compile(cfg, &fs, err, sizeof err), TLY_E_CONFIG);
    assert_ptr_equal(fs, (tly_featset_t *)(uintptr_t)0x1);
    assert_string_equal(err, message);
    tly_config_free(cfg);
}

static int field(const tly_featset_t *fs, const char *name)
{
    int id = tly_featset_field(fs, name, strlen(name));
    assert_true(id >= 0);
    return id;
}

static int entity(const tly_featset_t *fs, const char *name)
{
    int id = tly_featset_entity(fs, name, strlen(name));
    assert_true(id >= 0);
    return id;
}

/* An event with no fields set (all TLY_V_NIL). */
static tly_event_t empty_event(const tly_featset_t *fs)
{
    tly_event_t ev;
    memset(&ev, 0, sizeof ev);
    ev.nfields = (uint32_t)fs->nfields;
    return ev;
}

static tly_value_t str_value(const char *s)
{
    tly_value_t v = {.type = TLY_V_STR, .len = (uint32_t)strlen(s)};
    v.u.s = s;
    return v;
}

static tly_value_t int_value(int64_t i)
{
    tly_value_t v = {.type = TLY_V_INT};
    v.u.i = i;
    return v;
}

static tly_value_t double_value(double d)
{
    tly_value_t v = {.type = TLY_V_DOUBLE};
    v.u.d = d;
    return v;
}

static tly_value_t bool_value(bool b)
{
    tly_value_t v = {.type = TLY_V_BOOL};
    v.u.i = b;
    return v;
}

/* --- compilation --------------------------------------------------------- */

static void compile_assigns_field_ids_in_config_order_with_time_field_last(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    const tly_featset_t *fs = l.fs;
    /* clicks: user_id, action; dwell: dwell_ms; recent: pin_id; cat_clicks:
     * category; then the time field. */
    assert_int_equal(fs->nfields, 6);
    assert_string_equal(fs->fields[0], "user_id");
    assert_string_equal(fs->fields[1], "action");
    assert_string_equal(fs->fields[2], "dwell_ms");
    assert_string_equal(fs->fields[3], "pin_id");
    assert_string_equal(fs->fields[4], "category");
    assert_string_equal(fs->fields[5], "ts");
    assert_int_equal(fs->time_field, 5);
    assert_int_equal(fs->time_unit, TLY_TIME_MS);
    assert_int_equal(field(fs, "dwell_ms"), 2);
    assert_int_equal(tly_featset_field(fs, "nope", 4), -1);
    unload(&l);
}

static void compile_copies_event_settings(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    assert_int_equal(l.fs->max_future_skew_ms, 30000);
    assert_int_equal(l.fs->max_bytes, 4096);
    assert_int_equal(l.fs->max_string, 64);
    unload(&l);
}

static void compile_gives_each_topic_its_event_rules_and_time_field(void **state)
{
    (void)state;
    loaded_t l = compile_ok(
        "kafka:\n"
        "  topics:\n"
        "    - plain\n"
        "    - { name: ta, events: { time: { field: ts, unit: ms }, max_future_skew: 2m } }\n"
        "    - { name: tb, events: { time: { field: at, unit: iso8601 }, max_bytes: 100,"
        " max_string: 300 } }\n"
        "events: { max_future_skew: 30s, max_string: 16 }\n"
        "features:\n"
        "  - { name: n, entity: user, key: user_id, agg: count, windows: [1h] }\n"
        "  - { name: l, entity: user, key: user_id, agg: last, value: action }\n");
    const tly_featset_t *fs = l.fs;
    /* user_id, action, then the topics' time fields in kafka.topics order */
    assert_int_equal(fs->nfeat_fields, 2);
    assert_int_equal(fs->nfields, 4);
    assert_int_equal(fs->time_field, -1);
    assert_int_equal(fs->events.time_field, -1);
    assert_null(fs->events.topic);
    assert_int_equal(fs->ntopics, 3);
    assert_string_equal(fs->topics[0].topic, "plain");
    assert_int_equal(fs->topics[0].time_field, -1);
    assert_int_equal(fs->topics[0].time_unit, TLY_TIME_KAFKA);
    assert_int_equal(fs->topics[0].max_future_skew_ms, 30000);
    assert_int_equal(fs->topics[1].time_field, field(fs, "ts"));
    assert_int_equal(fs->topics[1].time_field, 2);
    assert_int_equal(fs->topics[1].time_unit, TLY_TIME_MS);
    assert_int_equal(fs->topics[1].max_future_skew_ms, 120000);
    assert_int_equal(fs->topics[1].max_string, 16);
    assert_int_equal(fs->topics[2].time_field, 3);
    assert_int_equal(fs->topics[2].time_unit, TLY_TIME_ISO8601);
    assert_int_equal(fs->topics[2].max_bytes, 100);
    assert_int_equal(fs->topics[2].max_string, 300);
    /* the store's backstops: the loosest of all */
    assert_int_equal(fs->max_future_skew_ms, 120000);
    assert_int_equal(fs->max_string, 300);
    assert_int_equal(fs->max_bytes, 65536);
    unload(&l);
}

static void compile_shares_a_topic_time_field_that_a_feature_reads(void **state)
{
    (void)state;
    loaded_t l =
        compile_ok("kafka:\n  topics: [{ name: a, events: { time: { field: action } } }]\n"
                   "features:\n"
                   "  - { name: l, entity: user, key: user_id, agg: last, value: action }\n");
    assert_int_equal(l.fs->nfields, 2);
    assert_int_equal(l.fs->nfeat_fields, 2);
    assert_int_equal(l.fs->topics[0].time_field, field(l.fs, "action"));
    unload(&l);
}

static void compile_without_time_field_uses_kafka_timestamp(void **state)
{
    (void)state;
    loaded_t l = compile_ok("features:\n"
                            "  - { name: c, entity: user, key: uid, agg: count, windows: [1h] }\n");
    assert_int_equal(l.fs->time_field, -1);
    assert_int_equal(l.fs->time_unit, TLY_TIME_KAFKA);
    assert_int_equal(l.fs->nfields, 1);
    unload(&l);
}

static void compile_groups_features_by_entity_in_config_order(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    const tly_featset_t *fs = l.fs;
    assert_int_equal(fs->nfeats, 7);
    assert_int_equal(fs->nentities, 3);

    const tly_entity_t *user = &fs->entities[0];
    assert_string_equal(user->name, "user");
    assert_int_equal(user->nkeys, 1);
    assert_int_equal(user->keys[0], 0);
    assert_int_equal(user->nfeats, 4);
    for (uint32_t s = 0; s < 4; s++) {
        assert_int_equal(user->feats[s], s);
        assert_int_equal(fs->feats[s].entity, 0);
        assert_int_equal(fs->feats[s].slot, s);
        assert_int_equal(fs->feats[s].id, s);
    }

    const tly_entity_t *pin = &fs->entities[1];
    assert_string_equal(pin->name, "pin");
    assert_int_equal(pin->keys[0], 3);
    assert_int_equal(pin->nfeats, 2);
    assert_int_equal(pin->feats[0], 4);
    assert_int_equal(pin->feats[1], 5);
    assert_int_equal(fs->feats[5].slot, 1);

    const tly_entity_t *uc = &fs->entities[2];
    assert_string_equal(uc->name, "user_cat");
    assert_int_equal(uc->nkeys, 2);
    assert_int_equal(uc->keys[0], 0);
    assert_int_equal(uc->keys[1], 4);

    assert_int_equal(entity(fs, "pin"), 1);
    assert_int_equal(tly_featset_entity(fs, "userx", 4), 0); /* length-delimited */
    assert_int_equal(tly_featset_entity(fs, "use", 3), -1);
    assert_int_equal(tly_featset_entity(fs, "users", 5), -1);
    unload(&l);
}

static void compile_gives_default_hops_and_bucket_counts(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    const tly_feat_t *clicks = &l.fs->feats[0];
    /* 5m→10s (30 hops), 1h→1m (60), 1d→5m (288), 7d→1h (168); +1 bucket each. */
    static const struct {
        int64_t len, hop;
        uint32_t nbuckets;
        const char *label;
    } want[] = {
        {300000, 10000, 31, "5m"},
        {HOUR_MS, 60000, 61, "1h"},
        {DAY_MS, 300000, 289, "1d"},
        {7 * DAY_MS, HOUR_MS, 169, "7d"},
    };
    assert_int_equal(clicks->nwindows, 4);
    for (size_t w = 0; w < 4; w++) {
        assert_int_equal(clicks->windows[w].len_ms, want[w].len);
        assert_int_equal(clicks->windows[w].hop_ms, want[w].hop);
        assert_int_equal(clicks->windows[w].nbuckets, want[w].nbuckets);
        assert_string_equal(clicks->windows[w].label, want[w].label);
    }
    unload(&l);
}

static void compile_uses_configured_hop_for_every_window(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    const tly_feat_t *imp = &l.fs->feats[4];
    assert_string_equal(imp->name, "impressions");
    assert_int_equal(imp->nwindows, 2);
    assert_int_equal(imp->windows[0].hop_ms, 600000);
    assert_int_equal(imp->windows[0].nbuckets, 7); /* 1h / 10m + 1 */
    assert_int_equal(imp->windows[1].hop_ms, 600000);
    assert_int_equal(imp->windows[1].nbuckets, 145); /* 1d / 10m + 1 */
    unload(&l);
}

static void compile_sets_horizons_k_aggs_and_value_fields(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    const tly_featset_t *fs = l.fs;
    assert_int_equal(fs->feats[0].horizon_ms, 7 * DAY_MS); /* longest window */
    assert_int_equal(fs->feats[1].horizon_ms, HOUR_MS);
    assert_int_equal(fs->feats[2].horizon_ms, DAY_MS);
    assert_int_equal(fs->feats[3].horizon_ms, 2 * DAY_MS); /* store.idle_ttl */
    assert_int_equal(fs->feats[5].horizon_ms, 2 * DAY_MS);
    assert_int_equal(fs->entities[0].horizon_ms, 7 * DAY_MS);
    assert_int_equal(fs->entities[1].horizon_ms, 2 * DAY_MS); /* last beats 1d */
    assert_int_equal(fs->entities[2].horizon_ms, DAY_MS);

    assert_int_equal(fs->feats[0].agg, TLY_AGG_COUNT);
    assert_int_equal(fs->feats[0].k, 0);
    assert_int_equal(fs->feats[0].nvalues, 0);
    assert_int_equal(fs->feats[2].agg, TLY_AGG_SUM);
    assert_int_equal(fs->feats[2].nvalues, 1);
    assert_int_equal(fs->feats[2].values[0], 2);
    assert_int_equal(fs->feats[3].agg, TLY_AGG_LAST_K);
    assert_int_equal(fs->feats[3].k, 100);
    assert_int_equal(fs->feats[3].nwindows, 0);
    assert_int_equal(fs->feats[3].nvalues, 2);
    assert_int_equal(fs->feats[3].values[0], 3);
    assert_int_equal(fs->feats[3].values[1], 1);
    assert_int_equal(fs->feats[5].agg, TLY_AGG_LAST);
    assert_int_equal(fs->feats[5].k, 1);
    unload(&l);
}

static void compile_rejects_entity_keyed_differently(void **state)
{
    (void)state;
    compile_fails_with(
        "features:\n"
        "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n"
        "  - { name: saves, entity: user, key: uid, agg: count, windows: [1h] }\n",
        "test.yaml:3: features[1].key: entity \"user\" is keyed by [user_id] in features[0]; "
        "every feature of an entity must use the same key");
}

/* "features:", n count features of entity types e0, e1, ... (one line
 * each), then tail (malloc'd). */
static char *entities_yaml(int n, const char *tail)
{
    size_t cap = 16 + 80 * (size_t)n + strlen(tail);
    char *yaml = malloc(cap);
    assert_non_null(yaml);
    size_t at = (size_t)snprintf(yaml, cap, "features:\n");
    for (int i = 0; i < n; i++)
        at += (size_t)snprintf(yaml + at, cap - at,
                               "  - { name: c, entity: e%d, key: id, agg: count, windows: [1h] }\n",
                               i);
    snprintf(yaml + at, cap - at, "%s", tail);
    return yaml;
}

/* An error found when compiling names the line of the key it is about, not
 * the feature's first line (each key on a line of its own here). */
static void compile_errors_name_the_line_of_their_key(void **state)
{
    (void)state;
    compile_fails_with(
        "features:\n"
        "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n"
        "  - name: saves\n"
        "    entity: user\n"
        "    agg: count\n"
        "    key: uid\n"
        "    windows: [1h]\n",
        "test.yaml:6: features[1].key: entity \"user\" is keyed by [user_id] in "
        "features[0]; every feature of an entity must use the same key");
    compile_fails_with("features:\n"
                       "  - entity: user\n"
                       "    key: user_id\n"
                       "    agg: last\n"
                       "    value: action\n"
                       "    name: asof\n",
                       "test.yaml:6: features[0].name: \"asof\" is a query keyword (ASOF, META): a "
                       "last feature so named could not be asked for; rename it");
    compile_fails_with("features:\n"
                       "  - name: r\n"
                       "    entity: user\n"
                       "    key: uid\n"
                       "    agg: last_k\n"
                       "    k: 5\n"
                       "    value:\n"
                       "      - a\n"
                       "      - b\n"
                       "      - c\n"
                       "      - d\n"
                       "      - e\n"
                       "      - f\n"
                       "      - g\n"
                       "      - h\n"
                       "      - i\n",
                       "test.yaml:8: features[0].value: 9 value fields; last_k takes at most 8");
    char *yaml = entities_yaml(
        64, "  - name: c\n    key: id\n    agg: count\n    windows: [1h]\n    entity: e64\n");
    /* features[64] opens on line 66; its entity is four lines on */
    compile_fails_with(yaml, "test.yaml:70: features[64].entity: \"e64\" would be entity type 65; "
                             "at most 64 are supported");
    free(yaml);
}

static void compile_rejects_composite_key_in_another_order(void **state)
{
    (void)state;
    compile_fails_with(
        "features:\n"
        "  - { name: a, entity: uc, key: [user_id, category], agg: count, windows: [1h] }\n"
        "  - { name: b, entity: pin, key: pin_id, agg: count, windows: [1h] }\n"
        "  - { name: c, entity: uc, key: [category, user_id], agg: count, windows: [1h] }\n",
        "test.yaml:4: features[2].key: entity \"uc\" is keyed by [user_id, category] in "
        "features[0]; every feature of an entity must use the same key");
}

static void compile_rejects_composite_key_with_a_missing_part(void **state)
{
    (void)state;
    compile_fails_with(
        "features:\n"
        "  - { name: a, entity: uc, key: [user_id, category], agg: count, windows: [1h] }\n"
        "  - { name: b, entity: uc, key: user_id, agg: count, windows: [1h] }\n",
        "test.yaml:3: features[1].key: entity \"uc\" is keyed by [user_id, category] in "
        "features[0]; every feature of an entity must use the same key");
}

static void compile_rejects_an_unwindowed_feature_named_like_a_query_keyword(void **state)
{
    (void)state;
    compile_fails_with(
        "features:\n"
        "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n"
        "  - { name: Meta, entity: user, key: user_id, agg: last, value: action }\n",
        "test.yaml:3: features[1].name: \"Meta\" is a query keyword (ASOF, META): a last "
        "feature so named could not be asked for; rename it");
    compile_fails_with(
        "features:\n"
        "  - { name: asof, entity: user, key: user_id, agg: last_k, k: 5, value: action }\n",
        "test.yaml:2: features[0].name: \"asof\" is a query keyword (ASOF, META): a last_k "
        "feature so named could not be asked for; rename it");
}

static void compile_accepts_a_windowed_feature_named_like_a_query_keyword(void **state)
{
    (void)state;
    loaded_t l =
        compile_ok("features:\n"
                   "  - { name: meta, entity: user, key: user_id, agg: count, windows: [1h] }\n");
    uint32_t feat = 99;
    int window = 99;
    assert_int_equal(tly_featset_resolve(l.fs, 0, "meta:1h", 7, &feat, &window), TLY_OK);
    assert_int_equal(feat, 0);
    assert_int_equal(window, 0);
    unload(&l);
}

static void compile_accepts_the_same_name_under_different_entities(void **state)
{
    (void)state;
    loaded_t l =
        compile_ok("features:\n"
                   "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n"
                   "  - { name: clicks, entity: pin, key: pin_id, agg: count, windows: [1h] }\n");
    uint32_t feat = 99;
    int window = 99;
    assert_int_equal(tly_featset_resolve(l.fs, 1, "clicks", 6, &feat, &window), TLY_OK);
    assert_int_equal(feat, 1);
    unload(&l);
}

static void compile_rejects_more_than_max_windows(void **state)
{
    (void)state;
    char yaml[512];
    int n = snprintf(yaml, sizeof yaml,
                     "features:\n  - { name: w, entity: user, key: uid, "
                     "agg: count, windows: [");
    for (int i = 1; i <= TLY_MAX_WINDOWS + 1; i++)
        n += snprintf(yaml + n, sizeof yaml - (size_t)n, "%s%ds", i > 1 ? ", " : "", i);
    snprintf(yaml + n, sizeof yaml - (size_t)n, "] }\n");
    compile_fails_with(yaml, "test.yaml:2: features[0].windows: 17 windows; a feature may have "
                             "at most 16");
}

static void compile_accepts_max_windows(void **state)
{
    (void)state;
    char yaml[512];
    int n = snprintf(yaml, sizeof yaml,
                     "features:\n  - { name: w, entity: user, key: uid, "
                     "agg: count, windows: [");
    for (int i = 1; i <= TLY_MAX_WINDOWS; i++)
        n += snprintf(yaml + n, sizeof yaml - (size_t)n, "%s%ds", i > 1 ? ", " : "", i);
    snprintf(yaml + n, sizeof yaml - (size_t)n, "] }\n");
    loaded_t l = compile_ok(yaml);
    assert_int_equal(l.fs->feats[0].nwindows, 16);
    assert_int_equal(l.fs->feats[0].windows[15].len_ms, 16000);
    assert_int_equal(l.fs->feats[0].windows[15].hop_ms, 1000); /* under 30s: 1s */
    assert_int_equal(l.fs->feats[0].windows[15].nbuckets, 17);
    unload(&l);
}

/* A last_k feature keyed by uid whose values are v1..v<nvalues>. */
/* last_k features r0, r1, ... reading v1..v<nvalues>, eight each (a
 * feature's most), one feature a line. */
static char *many_fields_yaml(int nvalues, bool time)
{
    size_t cap = 64 + 8 * (size_t)nvalues + 80 * (size_t)(nvalues / 8 + 1);
    char *yaml = malloc(cap);
    assert_non_null(yaml);
    int n = snprintf(yaml, cap, "%sfeatures:\n", time ? "events: { time: { field: ts } }\n" : "");
    for (int i = 1; i <= nvalues; i++) {
        if (i % TLY_MAX_ITEM_VALUES == 1)
            n += snprintf(yaml + n, cap - (size_t)n,
                          "%s  - { name: r%d, entity: user, key: uid, agg: last_k, k: 5, value: [",
                          i > 1 ? "] }\n" : "", i / TLY_MAX_ITEM_VALUES);
        n += snprintf(yaml + n, cap - (size_t)n, "%sv%d", i % TLY_MAX_ITEM_VALUES == 1 ? "" : ", ",
                      i);
    }
    snprintf(yaml + n, cap - (size_t)n, "] }\n");
    return yaml;
}

static void compile_accepts_exactly_max_fields(void **state)
{
    (void)state;
    char *yaml = many_fields_yaml(TLY_MAX_FIELDS - 1, false); /* + uid = 64 */
    loaded_t l = compile_ok(yaml);
    assert_int_equal(l.fs->nfields, 64);
    assert_int_equal(field(l.fs, "v63"), 63);
    unload(&l);
    free(yaml);
}

static void compile_rejects_more_than_max_fields(void **state)
{
    (void)state;
    char *yaml = many_fields_yaml(TLY_MAX_FIELDS, false);
    compile_fails_with(yaml, "test.yaml:9: features[7].value: more than 64 distinct event "
                             "fields are referenced; tallyd extracts at most 64");
    free(yaml);
}

static void compile_counts_the_time_field_against_max_fields(void **state)
{
    (void)state;
    char *yaml = many_fields_yaml(TLY_MAX_FIELDS - 1, true);
    compile_fails_with(yaml, "test.yaml: events.time.field: more than 64 distinct event fields "
                             "are referenced; tallyd extracts at most 64");
    free(yaml);
}

/* An item holds at most TLY_MAX_ITEM_VALUES values; a config may have at
 * most TLY_MAX_ENTITIES entity types. */
static void compile_rejects_too_many_item_values_and_entity_types(void **state)
{
    (void)state;
    compile_fails_with("features:\n"
                       "  - { name: r, entity: user, key: uid, agg: last_k, k: 5,\n"
                       "      value: [a, b, c, d, e, f, g, h, i] }\n",
                       "test.yaml:3: features[0].value: 9 value fields; last_k takes at most 8");
    char *yaml = entities_yaml(65, "");
    compile_fails_with(yaml, "test.yaml:66: features[64].entity: \"e64\" would be entity type 65; "
                             "at most 64 are supported");
    yaml[strlen(yaml) - 66] = '\0'; /* without the 65th: accepted */
    loaded_t l = compile_ok(yaml);
    assert_int_equal(l.fs->nentities, 64);
    unload(&l);
    free(yaml);
}

static void compile_rejects_more_than_max_features(void **state)
{
    (void)state;
    size_t cap = 16 + 80 * (size_t)(TLY_MAX_FEATURES + 1);
    char *yaml = malloc(cap);
    assert_non_null(yaml);
    int n = snprintf(yaml, cap, "features:\n");
    for (int i = 0; i <= TLY_MAX_FEATURES; i++)
        n += snprintf(yaml + n, cap - (size_t)n,
                      "  - { name: f%d, entity: user, key: uid, agg: count, windows: [1h] }\n", i);
    /* features[1024] is on line 1 + 1025. */
    compile_fails_with(yaml, "test.yaml:1026: features[1024]: 1025 features; tallyd supports "
                             "at most 1024");
    free(yaml);
}

static void compile_preparses_where_values(void **state)
{
    (void)state;
    loaded_t l = compile_ok(
        "features:\n"
        "  - { name: w, entity: user, key: uid, agg: count, windows: [1h], where: { x: [click, "
        "42, -7, 2.5, true, 1e3, 99999999999999999999, \" 5\", 0x10, False, \"\"] } }\n");
    const tly_where_t *wh = &l.fs->feats[0].where[0];
    assert_int_equal(l.fs->feats[0].nwhere, 1);
    assert_int_equal(wh->field, field(l.fs, "x"));
    assert_int_equal(wh->nvalues, 11);
    static const struct {
        const char *text;
        bool has_int, has_double, has_bool;
        int64_t i;
        double d;
        bool b;
    } want[] = {
        {"click", false, false, false, 0, 0, false},
        {"42", true, true, false, 42, 42.0, false},
        {"-7", true, true, false, -7, -7.0, false},
        {"2.5", false, true, false, 0, 2.5, false},
        {"true", false, false, true, 0, 0, true},
        {"1e3", false, true, false, 0, 1000.0, false},
        {"99999999999999999999", false, true, false, 0, 1e20, false},
        {" 5", false, false, false, 0, 0, false},
        {"0x10", false, false, false, 0, 0, false},
        {"False", false, false, true, 0, 0, false},
        {"", false, false, false, 0, 0, false},
    };
    for (size_t v = 0; v < 11; v++) {
        const tly_match_value_t *mv = &wh->values[v];
        assert_string_equal(mv->text, want[v].text);
        assert_int_equal(mv->len, strlen(want[v].text));
        assert_int_equal(mv->has_int, want[v].has_int);
        assert_int_equal(mv->has_double, want[v].has_double);
        assert_int_equal(mv->has_bool, want[v].has_bool);
        if (want[v].has_int)
            assert_int_equal(mv->i, want[v].i);
        if (want[v].has_double)
            assert_true(mv->d == want[v].d);
        if (want[v].has_bool)
            assert_int_equal(mv->b, want[v].b);
    }
    unload(&l);
}

/* --- resolve --------------------------------------------------------------- */

static void resolve(const tly_featset_t *fs, const char *ent, const char *spec, tly_err_t want_rc,
                    uint32_t want_feat, int want_window)
{
    uint32_t feat = 777;
    int window = 777;
    tly_err_t rc =
        tly_featset_resolve(fs, (uint32_t)entity(fs, ent), spec, strlen(spec), &feat, &window);
    assert_int_equal(rc, want_rc);
    if (rc == TLY_OK) {
        assert_int_equal(feat, want_feat);
        assert_int_equal(window, want_window);
    } else {
        assert_int_equal(feat, 777); /* untouched on error */
        assert_int_equal(window, 777);
    }
}

static void resolve_name_alone_means_all_windows(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    resolve(l.fs, "user", "clicks", TLY_OK, 0, -1);
    resolve(l.fs, "user", "recent", TLY_OK, 3, -1);
    resolve(l.fs, "pin", "last_viewer", TLY_OK, 5, -1);
    unload(&l);
}

static void resolve_name_with_window_label(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    resolve(l.fs, "user", "clicks:5m", TLY_OK, 0, 0);
    resolve(l.fs, "user", "clicks:1h", TLY_OK, 0, 1);
    resolve(l.fs, "user", "clicks:7d", TLY_OK, 0, 3);
    resolve(l.fs, "user", "dwell:1d", TLY_OK, 2, 1);
    resolve(l.fs, "pin", "impressions:1h", TLY_OK, 4, 0);
    unload(&l);
}

static void resolve_accepts_an_equal_duration_spelling(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    resolve(l.fs, "user", "clicks:60m", TLY_OK, 0, 1);
    resolve(l.fs, "user", "clicks:3600s", TLY_OK, 0, 1);
    resolve(l.fs, "user", "clicks:3600000ms", TLY_OK, 0, 1);
    resolve(l.fs, "user", "clicks:168h", TLY_OK, 0, 3);
    resolve(l.fs, "user", "clicks:24h", TLY_OK, 0, 2);
    unload(&l);
}

static void resolve_rejects_unknown_features_and_windows(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    resolve(l.fs, "user", "nope", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", "click", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", "clicksx", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", "impressions", TLY_E_NOTFOUND, 0, 0); /* a pin feature */
    resolve(l.fs, "user", "clicks:2h", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", "clicks:", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", "clicks:1x", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", "clicks:1h:", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", "recent:1h", TLY_E_NOTFOUND, 0, 0); /* last_k has no windows */
    resolve(l.fs, "user", "", TLY_E_NOTFOUND, 0, 0);
    resolve(l.fs, "user", ":1h", TLY_E_NOTFOUND, 0, 0);
    uint32_t feat = 777;
    int window = 777;
    assert_int_equal(tly_featset_resolve(l.fs, 3, "clicks", 6, &feat, &window), TLY_E_NOTFOUND);
    unload(&l);
}

static void resolve_reads_only_len_bytes_of_spec(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    uint32_t feat = 777;
    int window = 777;
    assert_int_equal(tly_featset_resolve(l.fs, 0, "clicks:1hXYZ", 9, &feat, &window), TLY_OK);
    assert_int_equal(feat, 0);
    assert_int_equal(window, 1);
    assert_int_equal(tly_featset_resolve(l.fs, 0, "clicks:60mXYZ", 10, &feat, &window), TLY_OK);
    assert_int_equal(window, 1);
    assert_int_equal(tly_featset_resolve(l.fs, 0, "dwellXYZ", 5, &feat, &window), TLY_OK);
    assert_int_equal(feat, 2);
    assert_int_equal(window, -1);
    unload(&l);
}

/* --- where matching ------------------------------------------------------- */

static const char *const match_yaml =
    "features:\n"
    "  - { name: clicks, entity: user, key: uid, where: { action: click }, agg: count, "
    "windows: [1h] }\n"
    "  - { name: engaged, entity: user, key: uid, where: { action: [click, save] }, "
    "agg: count, windows: [1h] }\n"
    "  - { name: by_code, entity: user, key: uid, where: { code: 42 }, agg: count, "
    "windows: [1h] }\n"
    "  - { name: by_score, entity: user, key: uid, where: { score: 2.5 }, agg: count, "
    "windows: [1h] }\n"
    "  - { name: by_flag, entity: user, key: uid, where: { flag: true }, agg: count, "
    "windows: [1h] }\n"
    "  - { name: both, entity: user, key: uid, where: { action: click, code: 42 }, "
    "agg: count, windows: [1h] }\n"
    "  - { name: all, entity: user, key: uid, agg: count, windows: [1h] }\n";

enum { M_CLICKS, M_ENGAGED, M_CODE, M_SCORE, M_FLAG, M_BOTH, M_ALL };

/* tly_feat_match(), after checking that every feature gets the same answer
 * from the masks of tly_featset_match(). */
static bool feat_match(const tly_featset_t *fs, int feat, const tly_event_t *ev)
{
    assert_true(fs->match_masks);
    uint64_t held = tly_featset_match(fs, ev);
    for (size_t f = 0; f < fs->nfeats; f++)
        assert_int_equal((fs->feats[f].conds & ~held) == 0, tly_feat_match(&fs->feats[f], ev));
    return tly_feat_match(&fs->feats[feat], ev);
}

static bool match_one(const tly_featset_t *fs, int feat, const char *fname, tly_value_t v)
{
    tly_event_t ev = empty_event(fs);
    ev.vals[field(fs, fname)] = v;
    return feat_match(fs, feat, &ev);
}

static void match_string_field_compares_text(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    assert_true(match_one(l.fs, M_CLICKS, "action", str_value("click")));
    assert_false(match_one(l.fs, M_CLICKS, "action", str_value("clicks")));
    assert_false(match_one(l.fs, M_CLICKS, "action", str_value("clic")));
    assert_false(match_one(l.fs, M_CLICKS, "action", str_value("Click")));
    assert_false(match_one(l.fs, M_CLICKS, "action", str_value("save")));
    assert_true(match_one(l.fs, M_CODE, "code", str_value("42"))); /* "42" as text */
    assert_false(match_one(l.fs, M_CODE, "code", str_value("042")));
    assert_true(match_one(l.fs, M_SCORE, "score", str_value("2.5")));
    assert_true(match_one(l.fs, M_FLAG, "flag", str_value("true")));
    unload(&l);
}

static void match_list_holds_when_any_value_equals(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    assert_true(match_one(l.fs, M_ENGAGED, "action", str_value("click")));
    assert_true(match_one(l.fs, M_ENGAGED, "action", str_value("save")));
    assert_false(match_one(l.fs, M_ENGAGED, "action", str_value("hide")));
    unload(&l);
}

static void match_int_field_compares_as_int64(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    assert_true(match_one(l.fs, M_CODE, "code", int_value(42)));
    assert_false(match_one(l.fs, M_CODE, "code", int_value(43)));
    assert_false(match_one(l.fs, M_CODE, "code", int_value(-42)));
    assert_false(match_one(l.fs, M_CLICKS, "action", int_value(0)));
    assert_false(match_one(l.fs, M_SCORE, "score", int_value(2))); /* 2.5 is no int */
    unload(&l);
}

static void match_double_field_compares_as_double(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    assert_true(match_one(l.fs, M_SCORE, "score", double_value(2.5)));
    assert_false(match_one(l.fs, M_SCORE, "score", double_value(2.4)));
    assert_true(match_one(l.fs, M_CODE, "code", double_value(42.0))); /* "42" is 42.0 too */
    assert_false(match_one(l.fs, M_CODE, "code", double_value(42.5)));
    unload(&l);
}

/* A where value that underflows is the double strtod gives, as an event's
 * number is (decode ignores ERANGE): 4.9e-324 is 2^-1074, the least
 * subnormal, and 1e-400 rounds to 0. */
static void match_double_field_reads_underflowing_values_as_decode_does(void **state)
{
    (void)state;
    loaded_t l = compile_ok("features:\n"
                            "  - { name: tiny, entity: user, key: uid, where: { x: 4.9e-324 }, "
                            "agg: count, windows: [1h] }\n"
                            "  - { name: zero, entity: user, key: uid, where: { x: 1e-400 }, "
                            "agg: count, windows: [1h] }\n");
    assert_true(match_one(l.fs, 0, "x", double_value(0x1p-1074)));
    assert_false(match_one(l.fs, 0, "x", double_value(0x1p-1073)));
    assert_true(match_one(l.fs, 1, "x", double_value(0.0)));
    assert_false(match_one(l.fs, 1, "x", double_value(0x1p-1074)));
    unload(&l);
}

static void match_bool_field_compares_true_false(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    assert_true(match_one(l.fs, M_FLAG, "flag", bool_value(true)));
    assert_false(match_one(l.fs, M_FLAG, "flag", bool_value(false)));
    assert_false(match_one(l.fs, M_FLAG, "flag", int_value(1)));
    assert_false(match_one(l.fs, M_CODE, "code", bool_value(true)));
    unload(&l);
}

static void match_fails_on_missing_or_null_field(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    tly_event_t ev = empty_event(l.fs);
    assert_false(feat_match(l.fs, M_CLICKS, &ev));
    assert_false(feat_match(l.fs, M_CODE, &ev));
    assert_true(feat_match(l.fs, M_ALL, &ev)); /* no conditions */
    ev.vals[field(l.fs, "action")] = str_value("click");
    ev.nfields = 1; /* an event shorter than the field ids */
    assert_false(feat_match(l.fs, M_CLICKS, &ev));
    unload(&l);
}

static void match_requires_every_condition(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    tly_event_t ev = empty_event(l.fs);
    ev.vals[field(l.fs, "action")] = str_value("click");
    assert_false(feat_match(l.fs, M_BOTH, &ev));
    ev.vals[field(l.fs, "code")] = int_value(41);
    assert_false(feat_match(l.fs, M_BOTH, &ev));
    ev.vals[field(l.fs, "code")] = int_value(42);
    assert_true(feat_match(l.fs, M_BOTH, &ev));
    ev.vals[field(l.fs, "action")] = str_value("save");
    assert_false(feat_match(l.fs, M_BOTH, &ev));
    unload(&l);
}

static void match_masks_name_each_distinct_condition_once(void **state)
{
    (void)state;
    loaded_t l = compile_ok(match_yaml);
    const tly_featset_t *fs = l.fs;
    assert_true(fs->match_masks);
    /* action: click (clicks, both), action: [click, save], code: 42 (by_code,
     * both), score: 2.5, flag: true */
    assert_int_equal(fs->nconds, 5);
    assert_int_equal(__builtin_popcountll(fs->feats[M_CLICKS].conds), 1);
    assert_int_equal(__builtin_popcountll(fs->feats[M_BOTH].conds), 2);
    assert_int_equal(fs->feats[M_BOTH].conds, fs->feats[M_CLICKS].conds | fs->feats[M_CODE].conds);
    assert_int_equal(fs->feats[M_ALL].conds, 0);
    assert_int_equal(fs->ncond_fields, 4); /* action, code, score, flag */
    unload(&l);
}

static void match_masks_off_beyond_64_conditions(void **state)
{
    (void)state;
    size_t cap = 16 + 100 * 65;
    char *yaml = malloc(cap);
    assert_non_null(yaml);
    int n = snprintf(yaml, cap, "features:\n");
    for (int i = 0; i < 65; i++)
        n += snprintf(yaml + n, cap - (size_t)n,
                      "  - { name: f%d, entity: user, key: uid, where: { action: v%d }, agg: "
                      "count, windows: [1h] }\n",
                      i, i);
    loaded_t l = compile_ok(yaml);
    assert_false(l.fs->match_masks); /* tly_feat_match() serves */
    tly_event_t ev = empty_event(l.fs);
    ev.vals[field(l.fs, "action")] = str_value("v64");
    assert_true(tly_feat_match(&l.fs->feats[64], &ev));
    assert_false(tly_feat_match(&l.fs->feats[63], &ev));
    unload(&l);
    free(yaml);
}

/* Lists long enough to be indexed (more than TLY_MATCH_SCAN values) match
 * exactly the values they list, whatever their order, with duplicates, and
 * two lists on one field share their texts; a short list on the same field
 * is still scanned. Membership is computed here from how the lists were
 * written. */
static void match_long_lists_match_every_listed_value(void **state)
{
    (void)state;
    size_t cap = 1 << 16, n = 0;
    char *yaml = malloc(cap);
    assert_non_null(yaml);
#define PUT(...) (n += (size_t)snprintf(yaml + n, cap - n, __VA_ARGS__), assert_true(n < cap))
    PUT("features:\n  - { name: even, entity: user, key: uid, agg: count, windows: [1h], "
        "where: { tag: [");
    for (int i = 0; i < 2000; i++) /* t0, t2, ..., t3998 in a scrambled order */
        PUT("t%d, ", 2 * (int)((i * 7919L) % 2000));
    PUT("t0] } }\n  - { name: third, entity: user, key: uid, agg: count, windows: [1h], "
        "where: { tag: [");
    for (int i = 999; i >= 0; i--) /* t0, t3, ..., t2997, backwards */
        PUT("t%d%s", 3 * i, i ? ", " : "");
    PUT("] } }\n  - { name: few, entity: user, key: uid, agg: count, windows: [1h], "
        "where: { tag: [t1, t3] } }\n"
        "  - { name: num, entity: user, key: uid, agg: count, windows: [1h], where: { x: [");
    for (int i = 0; i <= 2000; i++) /* -5000, ..., 5000 by 5, scrambled */
        PUT("%ld, ", 5 * ((i * 7919L) % 2001) - 5000);
    for (int i = 999; i >= 0; i--) /* 0.25, 1.25, ..., 999.25 */
        PUT("%d.25, ", i);
    PUT("-5000] } }\n");
#undef PUT
    loaded_t l = compile_ok(yaml);
    free(yaml);
    const tly_featset_t *fs = l.fs;
    enum { EVEN, THIRD, FEW, NUM };

    int tag = field(fs, "tag");
    size_t texts = 0; /* distinct texts over the three lists on tag */
    for (int i = 0; i < 4000; i++)
        texts += (i % 2 == 0) || (i % 3 == 0 && i < 3000) || i == 1;
    size_t f = 0;
    while (f < fs->ncond_fields && fs->cond_fields[f].field != (uint32_t)tag)
        f++;
    assert_true(f < fs->ncond_fields);
    assert_int_equal(fs->cond_fields[f].nlits, texts);

    char text[32];
    for (int i = 0; i < 4200; i++) {
        snprintf(text, sizeof text, "t%d", i);
        tly_event_t ev = empty_event(fs);
        ev.vals[tag] = str_value(text);
        assert_int_equal(feat_match(fs, EVEN, &ev), i % 2 == 0 && i < 4000);
        assert_int_equal(feat_match(fs, THIRD, &ev), i % 3 == 0 && i < 3000);
        assert_int_equal(feat_match(fs, FEW, &ev), i == 1 || i == 3);
    }
    assert_false(match_one(fs, EVEN, "tag", str_value("t")));
    assert_false(match_one(fs, EVEN, "tag", str_value("t00")));
    assert_false(match_one(fs, EVEN, "tag", str_value("")));

    for (int x = -5100; x <= 5100; x++) {
        bool listed = x % 5 == 0 && x >= -5000 && x <= 5000;
        assert_int_equal(match_one(fs, NUM, "x", int_value(x)), listed);
        assert_int_equal(match_one(fs, NUM, "x", double_value(x)), listed);
        assert_int_equal(match_one(fs, NUM, "x", double_value(x + 0.25)), x >= 0 && x <= 999);
        snprintf(text, sizeof text, "%d", x); /* a string matches the text as written */
        assert_int_equal(match_one(fs, NUM, "x", str_value(text)), listed);
    }
    assert_false(match_one(fs, NUM, "x", str_value("0.250")));
    assert_true(match_one(fs, NUM, "x", str_value("0.25")));
    assert_true(match_one(fs, NUM, "x", double_value(-0.0))); /* 0 is listed */
    unload(&l);
}

/* The index of a long list spreads texts that differ only in their last
 * bytes: a lookup walks from the text's home slot to the end of the run of
 * full slots at worst, so the mean place of an entry within its run bounds
 * the probes of a hit: 3.3 here (a hit itself takes about 1.5 probes); a
 * hash whose low bits ignored the last bytes gave 38. */
static void match_index_spreads_similar_texts(void **state)
{
    (void)state;
    enum { N = 4000 };
    size_t cap = 32 + 10 * N, n = 0;
    char *yaml = malloc(cap);
    assert_non_null(yaml);
    n += (size_t)snprintf(yaml + n, cap - n,
                          "features:\n  - { name: p, entity: user, key: uid, "
                          "agg: count, windows: [1h], where: { pin: [");
    for (int i = 0; i < N; i++)
        n += (size_t)snprintf(yaml + n, cap - n, "%spin%04d", i ? ", " : "", i);
    snprintf(yaml + n, cap - n, "] } }\n");
    loaded_t l = compile_ok(yaml);
    free(yaml);
    const tly_str_index_t *ix = &l.fs->feats[0].where[0].strs;
    assert_non_null(ix->slots);
    size_t slots = ix->mask + 1, full = 0, places = 0;
    size_t start = 0; /* begin at an empty slot, so no run wraps unseen */
    while (ix->slots[start].text != NULL)
        start++;
    size_t run = 0;
    for (size_t k = 1; k <= slots; k++) {
        const tly_str_slot_t *sl = &ix->slots[(start + k) % slots];
        run = sl->text != NULL ? run + 1 : 0;
        places += run;
        full += sl->text != NULL;
    }
    assert_int_equal(full, N);
    double mean = (double)places / (double)full;
    if (mean > 6.0)
        fail_msg("entries sit %.1f places into their runs on average", mean);
    unload(&l);
}

/* --- entity ids ------------------------------------------------------------ */

static tly_err_t id_of(const tly_featset_t *fs, const char *ent, const tly_event_t *ev, char *buf,
                       size_t cap, size_t *len)
{
    return tly_entity_id(fs, (uint32_t)entity(fs, ent), ev, buf, cap, len);
}

static void assert_id(const tly_featset_t *fs, const char *ent, const tly_event_t *ev,
                      const char *want)
{
    char buf[TLY_MAX_ID];
    size_t len = 0;
    assert_int_equal(id_of(fs, ent, ev, buf, sizeof buf, &len), TLY_OK);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(buf, want, len);
}

static void entity_id_renders_integers_in_decimal(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    tly_event_t ev = empty_event(l.fs);
    int uid = field(l.fs, "user_id");
    ev.vals[uid] = int_value(123);
    assert_id(l.fs, "user", &ev, "123");
    ev.vals[uid] = int_value(0);
    assert_id(l.fs, "user", &ev, "0");
    ev.vals[uid] = int_value(-45);
    assert_id(l.fs, "user", &ev, "-45");
    ev.vals[uid] = int_value(INT64_MAX);
    assert_id(l.fs, "user", &ev, "9223372036854775807");
    ev.vals[uid] = int_value(INT64_MIN);
    assert_id(l.fs, "user", &ev, "-9223372036854775808");
    /* every digit count, at and around each power of ten, both signs,
     * against the C library's rendering */
    int64_t p10 = 1;
    for (int k = 0; k <= 18; k++, p10 = k <= 18 ? p10 * 10 : p10) /* no 10^19 */
        for (int64_t d = -1; d <= 1; d++)
            for (int sign = -1; sign <= 1; sign += 2) {
                int64_t v = sign * (p10 + d);
                char want[32];
                snprintf(want, sizeof want, "%" PRId64, v);
                ev.vals[uid] = int_value(v);
                assert_id(l.fs, "user", &ev, want);
            }
    /* digits are made eight at a time: every value below 10^5, and values
     * of every magnitude with every digit in every place (a fixed
     * xorshift sequence, shifted down to each length), both signs */
    uint64_t r = UINT64_C(88172645463325252);
    for (int64_t i = 0; i < 100000 + 64 * 40; i++) {
        int64_t v = i;
        if (i >= 100000) {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            v = (int64_t)(r >> (i % 64 | 1));
            v = i % 2 ? -v : v;
        }
        char want[32];
        snprintf(want, sizeof want, "%" PRId64, v);
        ev.vals[uid] = int_value(v);
        assert_id(l.fs, "user", &ev, want);
    }
    unload(&l);
}

static void entity_id_uses_strings_as_they_are(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    tly_event_t ev = empty_event(l.fs);
    ev.vals[field(l.fs, "user_id")] = str_value("u-9 x");
    assert_id(l.fs, "user", &ev, "u-9 x");
    ev.vals[field(l.fs, "pin_id")] = str_value("007");
    assert_id(l.fs, "pin", &ev, "007");
    unload(&l);
}

static void entity_id_joins_composite_keys_with_bar(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    tly_event_t ev = empty_event(l.fs);
    ev.vals[field(l.fs, "user_id")] = int_value(123);
    ev.vals[field(l.fs, "category")] = str_value("cats");
    assert_id(l.fs, "user_cat", &ev, "123|cats");
    /* a part's '|' and backslash get a backslash before them: the ids of
     * ("a|b", "c") and ("a", "b|c") differ */
    ev.vals[field(l.fs, "user_id")] = str_value("a|b");
    ev.vals[field(l.fs, "category")] = str_value("c");
    assert_id(l.fs, "user_cat", &ev, "a\\|b|c");
    ev.vals[field(l.fs, "user_id")] = str_value("a");
    ev.vals[field(l.fs, "category")] = str_value("b|c");
    assert_id(l.fs, "user_cat", &ev, "a|b\\|c");
    ev.vals[field(l.fs, "user_id")] = str_value("a\\");
    ev.vals[field(l.fs, "category")] = str_value("|");
    assert_id(l.fs, "user_cat", &ev, "a\\\\|\\|");
    /* an id of one key is the string as it is */
    ev.vals[field(l.fs, "user_id")] = str_value("a|b\\");
    assert_id(l.fs, "user", &ev, "a|b\\");
    /* the escapes count against the cap: a\|b|c is 6 bytes */
    ev.vals[field(l.fs, "user_id")] = str_value("a|b");
    ev.vals[field(l.fs, "category")] = str_value("c");
    char buf[8];
    size_t len = 0;
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 6, &len), TLY_OK);
    assert_int_equal(len, 6);
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 5, &len), TLY_E_EV_VALUE_TOO_LONG);
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 2, &len), TLY_E_EV_VALUE_TOO_LONG);
    unload(&l);
}

static void entity_id_longer_than_cap_is_too_long(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    tly_event_t ev = empty_event(l.fs);
    ev.vals[field(l.fs, "user_id")] = int_value(123);
    ev.vals[field(l.fs, "category")] = str_value("cats");
    char buf[16];
    size_t len = 999;
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 8, &len), TLY_OK); /* exactly fits */
    assert_int_equal(len, 8);
    len = 999;
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 7, &len), TLY_E_EV_VALUE_TOO_LONG);
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 3, &len), TLY_E_EV_VALUE_TOO_LONG);
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 2, &len), TLY_E_EV_VALUE_TOO_LONG);
    assert_int_equal(len, 999); /* untouched on error */

    char big[TLY_MAX_ID + 1];
    memset(big, 'x', sizeof big - 1);
    big[TLY_MAX_ID] = '\0';
    char out[TLY_MAX_ID];
    ev.vals[field(l.fs, "user_id")] = str_value(big);
    assert_int_equal(id_of(l.fs, "user", &ev, out, sizeof out, &len), TLY_OK);
    assert_int_equal(len, TLY_MAX_ID);
    assert_int_equal(id_of(l.fs, "user_cat", &ev, out, sizeof out, &len), TLY_E_EV_VALUE_TOO_LONG);
    unload(&l);
}

static void entity_id_rejects_missing_and_null_keys(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    tly_event_t ev = empty_event(l.fs);
    char buf[TLY_MAX_ID];
    size_t len = 999;
    assert_int_equal(id_of(l.fs, "user", &ev, buf, sizeof buf, &len), TLY_E_EV_MISSING_KEY);
    ev.vals[field(l.fs, "user_id")] = int_value(123);
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, sizeof buf, &len), TLY_E_EV_MISSING_KEY);
    /* A missing part wins over an id that would not fit. */
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, 1, &len), TLY_E_EV_MISSING_KEY);
    assert_int_equal(len, 999);
    unload(&l);
}

static void entity_id_rejects_float_and_bool_keys(void **state)
{
    (void)state;
    loaded_t l = compile_ok(demo_yaml);
    tly_event_t ev = empty_event(l.fs);
    char buf[TLY_MAX_ID];
    size_t len = 999;
    ev.vals[field(l.fs, "user_id")] = double_value(123.0);
    assert_int_equal(id_of(l.fs, "user", &ev, buf, sizeof buf, &len), TLY_E_EV_WRONG_TYPE);
    ev.vals[field(l.fs, "user_id")] = bool_value(true);
    assert_int_equal(id_of(l.fs, "user", &ev, buf, sizeof buf, &len), TLY_E_EV_WRONG_TYPE);
    ev.vals[field(l.fs, "user_id")] = int_value(1);
    ev.vals[field(l.fs, "category")] = double_value(0.5);
    assert_int_equal(id_of(l.fs, "user_cat", &ev, buf, sizeof buf, &len), TLY_E_EV_WRONG_TYPE);
    assert_int_equal(len, 999);
    unload(&l);
}


/* ---- kafka.topics[].key and shard mode ---- */

#define SHARD_FEATURES                                                                             \
    "features:\n"                                                                                \
    "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n"                \
    "  - { name: views, entity: pin, key: pin_id, agg: count, windows: [1h] }\n"

static void shard_mode_with_two_entities_needs_a_key_per_topic(void **state)
{
    (void)state;
    compile_fails_with("kafka: { mode: shard, topics: [engagements] }\n" SHARD_FEATURES,
                       "test.yaml:1: kafka.topics[0].key: shard mode needs the entity type "
                       "whose id is the message key of topic \"engagements\" (the features "
                       "have 2 entity types: user, pin); or use kafka.mode replica");
    /* the default topic: the error points at kafka.mode */
    compile_fails_with("kafka:\n  group: g\n  mode: shard\n" SHARD_FEATURES,
                       "test.yaml:3: kafka.topics[0].key: shard mode needs the entity type "
                       "whose id is the message key of topic \"engagements\" (the features "
                       "have 2 entity types: user, pin); or use kafka.mode replica");
}

static void shard_mode_needs_a_topic_keyed_by_every_entity(void **state)
{
    (void)state;
    compile_fails_with("kafka: { mode: shard, topics: [{name: a, key: user}] }\n" SHARD_FEATURES,
                       "test.yaml:1: kafka.topics: in shard mode every entity type needs a "
                       "topic keyed by its id, and no topic has key: pin (its features would "
                       "never be fed); add one, or use kafka.mode replica");
}

static void topic_key_must_name_an_entity(void **state)
{
    (void)state;
    compile_fails_with("kafka: { topics: [{name: a, key: users}] }\n" SHARD_FEATURES,
                       "test.yaml:1: kafka.topics[0].key: no feature has entity \"users\"");
}

static void topic_keys_resolve_and_one_entity_keys_unkeyed_topics(void **state)
{
    (void)state;
    loaded_t l = compile_ok("kafka:\n"
                            "  mode: shard\n"
                            "  topics: [{name: a, key: pin}, {name: b, key: user}]\n" SHARD_FEATURES);
    assert_int_equal(l.fs->ntopics, 2);
    assert_int_equal(l.fs->topics[0].key_entity, entity(l.fs, "pin"));
    assert_int_equal(l.fs->topics[1].key_entity, entity(l.fs, "user"));
    unload(&l);
    /* replica mode: an unkeyed topic feeds every entity type */
    l = compile_ok("kafka: { topics: [a] }\n" SHARD_FEATURES);
    assert_int_equal(l.fs->topics[0].key_entity, -1);
    unload(&l);
    /* shard mode with one entity type: that type is the key */
    l = compile_ok("kafka: { mode: shard, topics: [a] }\n"
                   "features:\n"
                   "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n");
    assert_int_equal(l.fs->topics[0].key_entity, 0);
    unload(&l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(compile_assigns_field_ids_in_config_order_with_time_field_last),
        cmocka_unit_test(compile_copies_event_settings),
        cmocka_unit_test(compile_without_time_field_uses_kafka_timestamp),
        cmocka_unit_test(compile_gives_each_topic_its_event_rules_and_time_field),
        cmocka_unit_test(compile_shares_a_topic_time_field_that_a_feature_reads),
        cmocka_unit_test(compile_groups_features_by_entity_in_config_order),
        cmocka_unit_test(compile_gives_default_hops_and_bucket_counts),
        cmocka_unit_test(compile_uses_configured_hop_for_every_window),
        cmocka_unit_test(compile_sets_horizons_k_aggs_and_value_fields),
        cmocka_unit_test(compile_rejects_entity_keyed_differently),
        cmocka_unit_test(compile_errors_name_the_line_of_their_key),
        cmocka_unit_test(compile_rejects_composite_key_in_another_order),
        cmocka_unit_test(compile_rejects_composite_key_with_a_missing_part),
        cmocka_unit_test(compile_rejects_an_unwindowed_feature_named_like_a_query_keyword),
        cmocka_unit_test(compile_accepts_a_windowed_feature_named_like_a_query_keyword),
        cmocka_unit_test(compile_accepts_the_same_name_under_different_entities),
        cmocka_unit_test(compile_rejects_more_than_max_windows),
        cmocka_unit_test(compile_accepts_max_windows),
        cmocka_unit_test(compile_accepts_exactly_max_fields),
        cmocka_unit_test(compile_rejects_more_than_max_fields),
        cmocka_unit_test(compile_counts_the_time_field_against_max_fields),
        cmocka_unit_test(compile_rejects_more_than_max_features),
        cmocka_unit_test(compile_rejects_too_many_item_values_and_entity_types),
        cmocka_unit_test(compile_preparses_where_values),
        cmocka_unit_test(resolve_name_alone_means_all_windows),
        cmocka_unit_test(resolve_name_with_window_label),
        cmocka_unit_test(resolve_accepts_an_equal_duration_spelling),
        cmocka_unit_test(resolve_rejects_unknown_features_and_windows),
        cmocka_unit_test(resolve_reads_only_len_bytes_of_spec),
        cmocka_unit_test(match_string_field_compares_text),
        cmocka_unit_test(match_list_holds_when_any_value_equals),
        cmocka_unit_test(match_int_field_compares_as_int64),
        cmocka_unit_test(match_double_field_compares_as_double),
        cmocka_unit_test(match_double_field_reads_underflowing_values_as_decode_does),
        cmocka_unit_test(match_bool_field_compares_true_false),
        cmocka_unit_test(match_fails_on_missing_or_null_field),
        cmocka_unit_test(match_masks_name_each_distinct_condition_once),
        cmocka_unit_test(match_masks_off_beyond_64_conditions),
        cmocka_unit_test(match_long_lists_match_every_listed_value),
        cmocka_unit_test(match_index_spreads_similar_texts),
        cmocka_unit_test(match_requires_every_condition),
        cmocka_unit_test(entity_id_renders_integers_in_decimal),
        cmocka_unit_test(entity_id_uses_strings_as_they_are),
        cmocka_unit_test(entity_id_joins_composite_keys_with_bar),
        cmocka_unit_test(entity_id_longer_than_cap_is_too_long),
        cmocka_unit_test(entity_id_rejects_missing_and_null_keys),
        cmocka_unit_test(entity_id_rejects_float_and_bool_keys),
        cmocka_unit_test(shard_mode_with_two_entities_needs_a_key_per_topic),
        cmocka_unit_test(shard_mode_needs_a_topic_keyed_by_every_entity),
        cmocka_unit_test(topic_key_must_name_an_entity),
        cmocka_unit_test(topic_keys_resolve_and_one_entity_keys_unkeyed_topics),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
