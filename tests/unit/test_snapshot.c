/*
 * test_snapshot.c — which feature state a snapshot may restore under a
 * changed config: tly_snapshot_feature_hash must change exactly for the
 * features whose state could differ from a rebuild under the new config —
 * the feature's own definition, and for every feature the rules that
 * decide whether an event is accepted at all (a rejected event changes
 * nothing, so those rules shape every feature's state).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/config.h"
#include "tallyd/snapshot.h"

#define HEAD                                                                                       \
    "events:\n"                                                                                    \
    "  time: { field: ts, unit: ms }\n"                                                            \
    "  max_string: 64\n"                                                                           \
    "features:\n"

#define F_CLICKS                                                                                   \
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"        \
    " windows: [5m, 1h] }\n"
#define F_DWELL                                                                                    \
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h] }\n"
#define F_RECENT                                                                                   \
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 5, value: [pin_id] }\n"
#define F_IMPR                                                                                     \
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"            \
    " agg: count, windows: [1h] }\n"

static const char *base = HEAD F_CLICKS F_DWELL F_RECENT F_IMPR;

typedef struct {
    size_t n;
    char name[16][48]; /* entity.name */
    uint64_t hash[16];
    uint64_t defs;
} hashes_t;

static hashes_t hashes_of(const char *yaml)
{
    tly_config_t *cfg;
    char err[256];
    if (tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    hashes_t h = {.n = cfg->nfeatures};
    assert_true(h.n <= 16);
    for (size_t i = 0; i < h.n; i++) {
        snprintf(h.name[i], sizeof h.name[i], "%s.%s", cfg->features[i].entity,
                 cfg->features[i].name);
        h.hash[i] = tly_snapshot_feature_hash(cfg, i);
    }
    h.defs = tly_snapshot_defs_hash(cfg);
    tly_config_free(cfg);
    return h;
}

/* The names of base's features whose hash is the same under `yaml`
 * (matched by entity and name), comma-separated. */
static void kept(const char *yaml, char *out, size_t cap)
{
    hashes_t a = hashes_of(base), b = hashes_of(yaml);
    out[0] = '\0';
    for (size_t i = 0; i < a.n; i++)
        for (size_t j = 0; j < b.n; j++)
            if (strcmp(a.name[i], b.name[j]) == 0 && a.hash[i] == b.hash[j]) {
                size_t l = strlen(out);
                snprintf(out + l, cap - l, "%s%s", l ? "," : "", a.name[i]);
            }
}

#define ALL "user.clicks,user.dwell,user.recent,pin.impressions"

static void assert_kept(const char *yaml, const char *want)
{
    char got[256];
    kept(yaml, got, sizeof got);
    if (strcmp(got, want) != 0)
        fail_msg("restored: got \"%s\", want \"%s\"", got, want);
}

static void test_same_config_keeps_every_feature(void **state)
{
    (void)state;
    assert_kept(base, ALL);
    assert_int_equal(hashes_of(base).defs, hashes_of(base).defs);
}

static void test_changed_windows_change_only_that_feature(void **state)
{
    (void)state;
    const char *y = HEAD "  - { name: clicks, entity: user, key: user_id, where: { action: click },"
                         " agg: count, windows: [1h, 1d] }\n" F_DWELL F_RECENT F_IMPR;
    assert_kept(y, "user.dwell,user.recent,pin.impressions");
    assert_true(hashes_of(y).defs != hashes_of(base).defs);
}

static void test_reordered_renamed_and_removed(void **state)
{
    (void)state;
    /* order does not matter */
    assert_kept(HEAD F_IMPR F_RECENT F_DWELL F_CLICKS, ALL);
    /* a renamed feature is a new one */
    assert_kept(HEAD F_CLICKS
                "  - { name: dwell_sum, entity: user, key: user_id, agg: sum, value: dwell_ms,"
                " windows: [1h] }\n" F_RECENT F_IMPR,
                "user.clicks,user.recent,pin.impressions");
    /* removing a count whose filter no other user feature has would change
     * which events need a user_id, but `recent` (last_k, no filter) takes
     * every event, so nothing changes */
    assert_kept(HEAD F_DWELL F_RECENT F_IMPR, "user.dwell,user.recent,pin.impressions");
}

/* Without `recent`, removing `clicks` changes which events need a user_id
 * (`dwell` takes only events carrying dwell_ms), so no user or pin feature
 * keeps its state; with `recent` it changes nothing (see above). */
static void test_removed_filter_changes_key_checks(void **state)
{
    (void)state;
    hashes_t a = hashes_of(HEAD F_CLICKS F_DWELL F_IMPR), b = hashes_of(HEAD F_DWELL F_IMPR);
    assert_string_equal(a.name[1], "user.dwell");
    assert_string_equal(b.name[0], "user.dwell");
    assert_true(a.hash[1] != b.hash[0]);
    assert_true(a.hash[2] != b.hash[1]);
    /* another numeric feature taking the same events (same value, no
     * filter) adds no rule: dwell and impressions keep their state */
    hashes_t c =
        hashes_of(HEAD F_DWELL F_IMPR "  - { name: dmax, entity: user, key: user_id, agg: max,"
                                      " value: dwell_ms, windows: [1h] }\n");
    assert_true(c.hash[0] == b.hash[0]);
    assert_true(c.hash[1] == b.hash[1]);
}

static void test_added_feature_with_known_rules_keeps_the_others(void **state)
{
    (void)state;
    /* same filter, same entity type, no value: no new rejection */
    assert_kept(HEAD F_CLICKS F_DWELL F_RECENT F_IMPR
                "  - { name: clicks_1d, entity: user, key: user_id, where: { action: click },"
                " agg: count, windows: [1d] }\n",
                ALL);
}

static void test_new_acceptance_rules_change_every_feature(void **state)
{
    (void)state;
    /* a new numeric value check on a new field: events with a string there
     * are rejected now */
    assert_kept(HEAD F_CLICKS F_DWELL F_RECENT F_IMPR
                "  - { name: price, entity: pin, key: pin_id, agg: sum, value: price,"
                " windows: [1h] }\n",
                "");
    /* a new filter on the pin type: events it matches now need a pin_id */
    assert_kept(HEAD F_CLICKS F_DWELL F_RECENT F_IMPR
                "  - { name: saves, entity: pin, key: pin_id, where: { action: save },"
                " agg: count, windows: [1h] }\n",
                "");
    /* a longer string limit accepts events that were rejected */
    assert_kept(
        "events:\n  time: { field: ts, unit: ms }\n  max_string: 65\nfeatures:\n" F_CLICKS F_DWELL
            F_RECENT F_IMPR,
        "");
    /* another time field gives every event another time */
    assert_kept(
        "events:\n  time: { field: when, unit: ms }\n  max_string: 64\nfeatures:\n" F_CLICKS F_DWELL
            F_RECENT F_IMPR,
        "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_config_keeps_every_feature),
        cmocka_unit_test(test_changed_windows_change_only_that_feature),
        cmocka_unit_test(test_reordered_renamed_and_removed),
        cmocka_unit_test(test_removed_filter_changes_key_checks),
        cmocka_unit_test(test_added_feature_with_known_rules_keeps_the_others),
        cmocka_unit_test(test_new_acceptance_rules_change_every_feature),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
