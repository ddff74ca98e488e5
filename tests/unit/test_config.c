/*
 * test_config.c — config loading, validation, defaults, durations and help.
 *
 * The example and demo configs in config/ are loaded and checked against
 * values read by hand from those files; every file in config/bad/ must fail
 * with the exact message written below (file, line, key path, sentence), and
 * a file there without an expected message fails the suite, so the examples
 * never rot. Runs from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/config.h"

#define ERR_CAP   512
#define NELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* One feature line that makes an otherwise minimal config valid. */
#define ONE_FEATURE                                                                                \
    "features:\n"                                                                                  \
    "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n"

static tly_config_t *load_ok(const char *path)
{
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    tly_err_t rc = tly_config_load(path, &cfg, err, sizeof err);
    if (rc != TLY_OK)
        print_error("%s\n", err);
    assert_int_equal(rc, TLY_OK);
    assert_non_null(cfg);
    return cfg;
}

static tly_config_t *load_string_ok(const char *yaml)
{
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    tly_err_t rc = tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err);
    if (rc != TLY_OK)
        print_error("%s\n", err);
    assert_int_equal(rc, TLY_OK);
    assert_non_null(cfg);
    return cfg;
}

/* Captures what fn prints into a heap string (caller frees). */
static char *capture_help(int markdown)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    assert_non_null(f);
    tly_config_help(f, markdown);
    fclose(f);
    return text;
}

static char *capture_summary(const tly_config_t *cfg)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    assert_non_null(f);
    tly_config_summary(cfg, f);
    fclose(f);
    return text;
}

static void assert_windows(const tly_feature_cfg_t *feat, const int64_t *want, size_t n)
{
    assert_int_equal(feat->nwindows, n);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(feat->windows_ms[i], want[i]);
}

/* ------------------------------------------------------------------------- */

static void test_example_yaml_loads_with_its_written_values(void **state)
{
    (void)state;
    tly_config_t *cfg = load_ok("config/example.yaml");

    assert_string_equal(cfg->path, "config/example.yaml");
    assert_string_equal(cfg->server.listen, "127.0.0.1:7379");
    assert_string_equal(cfg->server.admin, "127.0.0.1:9779");
    assert_string_equal(cfg->server.requirepass, "");
    assert_int_equal(cfg->server.max_clients, 10000);
    assert_int_equal(cfg->server.threads, 1);

    assert_string_equal(cfg->kafka.brokers, "localhost:9092");
    assert_string_equal(cfg->kafka.group, "tallyd");
    assert_int_equal(cfg->kafka.ntopics, 1);
    assert_string_equal(cfg->kafka.topics[0], "engagements");
    assert_int_equal(cfg->kafka.mode, TLY_MODE_REPLICA);
    assert_int_equal(cfg->kafka.start, TLY_START_WINDOW);
    assert_int_equal(cfg->kafka.nproperties, 0);

    assert_string_equal(cfg->events.format, "json");
    assert_string_equal(cfg->events.time_field, "ts");
    assert_int_equal(cfg->events.time_unit, TLY_TIME_MS);
    assert_int_equal(cfg->events.max_future_skew_ms, 60000);
    assert_int_equal(cfg->events.max_bytes, 65536);
    assert_int_equal(cfg->events.max_string, 256);

    assert_int_equal(cfg->store.idle_ttl_ms, 7 * 86400000LL);
    assert_int_equal(cfg->store.sweep_every_ms, 10000);
    assert_string_equal(cfg->snapshot.dir, "/var/lib/tallyd");
    assert_int_equal(cfg->snapshot.every_ms, 30000);
    assert_int_equal(cfg->snapshot.keep, 3);
    assert_int_equal(cfg->demo.events_per_sec, 20000);
    assert_int_equal(cfg->demo.users, 100000);
    assert_int_equal(cfg->demo.pins, 1000000);
    assert_int_equal(cfg->demo.seed, 42);
    assert_int_equal(cfg->demo.history, 200000);

    assert_int_equal(cfg->nfeatures, 5);
    const tly_feature_cfg_t *f = cfg->features;
    assert_string_equal(f[0].name, "clicks");
    assert_string_equal(f[0].entity, "user");
    assert_int_equal(f[0].nkeys, 1);
    assert_string_equal(f[0].keys[0], "user_id");
    assert_int_equal(f[0].agg, TLY_AGG_COUNT);
    assert_int_equal(f[0].nwhere, 1);
    assert_string_equal(f[0].where[0].field, "action");
    assert_int_equal(f[0].where[0].nvalues, 1);
    assert_string_equal(f[0].where[0].values[0], "click");
    assert_int_equal(f[0].where[0].line, 36);
    assert_int_equal(f[0].nvalues, 0);
    assert_windows(&f[0], (const int64_t[]){300000, 3600000, 86400000, 604800000}, 4);
    assert_int_equal(f[0].hop_ms, 0);
    assert_int_equal(f[0].k, 0);
    assert_int_equal(f[0].line, 36);

    assert_string_equal(f[1].name, "engaged");
    assert_int_equal(f[1].where[0].nvalues, 2);
    assert_string_equal(f[1].where[0].values[0], "click");
    assert_string_equal(f[1].where[0].values[1], "save");
    assert_windows(&f[1], (const int64_t[]){3600000}, 1);
    assert_int_equal(f[1].line, 38);

    assert_string_equal(f[2].name, "dwell");
    assert_int_equal(f[2].agg, TLY_AGG_SUM);
    assert_int_equal(f[2].nwhere, 0);
    assert_int_equal(f[2].nvalues, 1);
    assert_string_equal(f[2].values[0], "dwell_ms");
    assert_windows(&f[2], (const int64_t[]){3600000, 86400000}, 2);

    assert_string_equal(f[3].name, "recent");
    assert_int_equal(f[3].agg, TLY_AGG_LAST_K);
    assert_int_equal(f[3].k, 100);
    assert_int_equal(f[3].nvalues, 2);
    assert_string_equal(f[3].values[0], "pin_id");
    assert_string_equal(f[3].values[1], "action");
    assert_int_equal(f[3].nwindows, 0);
    assert_int_equal(f[3].line, 41);

    assert_string_equal(f[4].name, "impressions");
    assert_string_equal(f[4].entity, "pin");
    assert_string_equal(f[4].keys[0], "pin_id");
    assert_string_equal(f[4].where[0].values[0], "impression");
    assert_windows(&f[4], (const int64_t[]){3600000, 86400000}, 2);
    assert_int_equal(f[4].line, 42);
    tly_config_free(cfg);
}

static void test_demo_yaml_loads_twelve_features_over_user_and_pin(void **state)
{
    (void)state;
    static const int64_t main_windows[] = {300000, 3600000, 86400000, 604800000};
    static const int64_t pin_windows[] = {3600000, 86400000};
    static const struct {
        const char *name, *entity;
        tly_agg_kind_t agg;
        const char *where; /* the single where value, or NULL */
        int line;
    } want[] = {
        {"clicks", "user", TLY_AGG_COUNT, "click", 25},
        {"saves", "user", TLY_AGG_COUNT, "save", 31},
        {"hides", "user", TLY_AGG_COUNT, "hide", 37},
        {"engaged", "user", TLY_AGG_COUNT, NULL, 43},
        {"dwell", "user", TLY_AGG_SUM, NULL, 49},
        {"recent", "user", TLY_AGG_LAST_K, NULL, 55},
        {"last_action", "user", TLY_AGG_LAST, NULL, 61},
        {"impressions", "pin", TLY_AGG_COUNT, "impression", 68},
        {"closeups", "pin", TLY_AGG_COUNT, "closeup", 69},
        {"clicks", "pin", TLY_AGG_COUNT, "click", 70},
        {"saves", "pin", TLY_AGG_COUNT, "save", 71},
        {"avg_dwell", "pin", TLY_AGG_AVG, "closeup", 72},
    };
    tly_config_t *cfg = load_ok("config/demo.yaml");

    assert_string_equal(cfg->kafka.brokers, "embedded");
    assert_int_equal(cfg->kafka.ntopics, 1);
    assert_string_equal(cfg->kafka.topics[0], "engagements");
    assert_int_equal(cfg->kafka.mode, TLY_MODE_REPLICA);
    assert_string_equal(cfg->events.time_field, "ts");
    assert_int_equal(cfg->events.time_unit, TLY_TIME_MS);
    assert_string_equal(cfg->snapshot.dir, "build/demo/snapshots");
    assert_int_equal(cfg->demo.seed, 42);
    assert_int_equal(cfg->demo.history, 200000);

    assert_int_equal(cfg->nfeatures, NELEMS(want));
    for (size_t i = 0; i < NELEMS(want); i++) {
        const tly_feature_cfg_t *f = &cfg->features[i];
        assert_string_equal(f->name, want[i].name);
        assert_string_equal(f->entity, want[i].entity);
        assert_int_equal(f->agg, want[i].agg);
        assert_int_equal(f->line, want[i].line);
        assert_int_equal(f->nkeys, 1);
        assert_string_equal(f->keys[0], strcmp(want[i].entity, "user") == 0 ? "user_id" : "pin_id");
        if (want[i].where) {
            assert_int_equal(f->nwhere, 1);
            assert_string_equal(f->where[0].field, "action");
            assert_int_equal(f->where[0].nvalues, 1);
            assert_string_equal(f->where[0].values[0], want[i].where);
        }
    }
    const tly_feature_cfg_t *f = cfg->features;
    for (int i = 0; i < 3; i++)
        assert_windows(&f[i], main_windows, 4);
    assert_int_equal(f[3].where[0].nvalues, 2);
    assert_string_equal(f[3].where[0].values[1], "save");
    assert_int_equal(f[3].where[0].line, 46);
    assert_windows(&f[3], pin_windows, 2);
    assert_string_equal(f[4].values[0], "dwell_ms");
    assert_int_equal(f[5].k, 100);
    assert_int_equal(f[5].nvalues, 2);
    assert_string_equal(f[5].values[0], "pin_id");
    assert_string_equal(f[5].values[1], "action");
    assert_int_equal(f[6].k, 1); /* last keeps one item */
    assert_int_equal(f[6].nvalues, 1);
    assert_string_equal(f[6].values[0], "action");
    for (int i = 7; i < 11; i++)
        assert_windows(&f[i], pin_windows, 2);
    assert_windows(&f[11], (const int64_t[]){86400000}, 1);
    assert_string_equal(f[11].values[0], "dwell_ms");
    tly_config_free(cfg);
}

/* ------------------------------------------------------------------------- */

typedef struct {
    const char *test; /* the behaviour, used as the test's name */
    const char *file;
    const char *message;
} bad_file_t;

static const bad_file_t bad_files[] = {
    {"test_bad_duration_names_the_list_item", "config/bad/bad_duration.yaml",
     "config/bad/bad_duration.yaml:7: features[0].windows[1]: \"90x\" is not a duration "
     "(use <n>ms|s|m|h|d)"},
    {"test_unknown_key_is_error_with_file_line", "config/bad/unknown_key.yaml",
     "config/bad/unknown_key.yaml:4: server.max_client: unknown key (known here: listen, admin, "
     "advertise, "
     "requirepass, max_clients, threads, unix, max_args, max_bulk, max_query_buffer, "
     "max_output_buffer, output_soft_limit, output_stall, max_clients_memory, idle_timeout, "
     "request_timeout, max_reply_values)"},
    {"test_list_where_a_value_is_expected_is_error", "config/bad/wrong_type.yaml",
     "config/bad/wrong_type.yaml:3: server.max_clients: expected a single value, found a list"},
    {"test_missing_required_feature_key_names_the_feature", "config/bad/missing_key.yaml",
     "config/bad/missing_key.yaml:4: features[1].entity: required key is missing"},
    {"test_int_out_of_range_shows_the_range", "config/bad/out_of_range.yaml",
     "config/bad/out_of_range.yaml:3: server.threads: 100 is out of range (1..64)"},
    {"test_hop_not_dividing_a_window_is_error", "config/bad/hop_not_dividing.yaml",
     "config/bad/hop_not_dividing.yaml:8: features[0].hop: 7m does not divide window 1h"},
    {"test_windows_not_increasing_is_error", "config/bad/windows_not_increasing.yaml",
     "config/bad/windows_not_increasing.yaml:7: features[0].windows[2]: 30m is not longer than "
     "the window before it (1h); list windows in increasing order"},
    {"test_count_with_value_is_error", "config/bad/value_with_count.yaml",
     "config/bad/value_with_count.yaml:7: features[0].value: count counts events and takes no "
     "value; remove value"},
    {"test_yaml_syntax_error_reports_libyaml_line", "config/bad/yaml_syntax.yaml",
     "config/bad/yaml_syntax.yaml:8: YAML syntax error: did not find expected ',' or ']' (while "
     "parsing a flow sequence at line 7)"},
    {"test_duplicate_key_names_both_lines", "config/bad/duplicate_key.yaml",
     "config/bad/duplicate_key.yaml:5: kafka.brokers: duplicate key (first given at line 3)"},
    {"test_bad_enum_lists_the_choices", "config/bad/bad_enum.yaml",
     "config/bad/bad_enum.yaml:3: kafka.mode: \"sharded\" is not one of shard|replica"},
    {"test_non_integer_is_error", "config/bad/not_an_int.yaml",
     "config/bad/not_an_int.yaml:3: snapshot.keep: \"2.5\" is not an integer"},
    {"test_subsecond_hop_is_error_saying_whole_seconds", "config/bad/subsecond_hop.yaml",
     "config/bad/subsecond_hop.yaml:8: features[0].hop: \"500ms\" is not a whole number of "
     "seconds (windows and hops are whole seconds, at least 1s)"},
    {"test_duplicate_feature_in_one_entity_is_error", "config/bad/duplicate_feature.yaml",
     "config/bad/duplicate_feature.yaml:5: features[2].name: \"clicks\" is already a feature of "
     "entity \"user\" (features[0], line 3)"},
    {"test_config_without_features_is_error", "config/bad/no_features.yaml",
     "config/bad/no_features.yaml:2: features: required key is missing"},
    {"test_last_k_without_k_is_error", "config/bad/last_k_without_k.yaml",
     "config/bad/last_k_without_k.yaml:3: features[0].k: last_k needs k, the number of items to "
     "keep (1..10000)"},
    {"test_public_listen_without_password_is_error", "config/bad/public_without_password.yaml",
     "config/bad/public_without_password.yaml:3: server.listen: 0.0.0.0:7379 accepts clients "
     "from other hosts; set server.requirepass, or listen on 127.0.0.1"},
    {"test_unknown_aggregation_lists_the_aggregations", "config/bad/bad_agg.yaml",
     "config/bad/bad_agg.yaml:3: features[0].agg: \"cnt\" is not an aggregation (use "
     "count|sum|min|max|avg|last|last_k)"},
};

/* initial state: one bad_file_t */
static void test_bad_file(void **state)
{
    const bad_file_t *bad = *state;
    char err[ERR_CAP] = "";
    tly_config_t *sentinel = (tly_config_t *)(uintptr_t)0x1, *cfg = sentinel;
    assert_int_equal(tly_config_load(bad->file, &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, bad->message);
    assert_ptr_equal(cfg, sentinel); /* *out untouched on failure */
}

static void test_every_bad_config_file_has_an_expected_message(void **state)
{
    (void)state;
    DIR *dir = opendir("config/bad");
    assert_non_null(dir);
    size_t seen = 0;
    for (struct dirent *de; (de = readdir(dir)) != NULL;) {
        if (de->d_name[0] == '.')
            continue;
        char path[512];
        snprintf(path, sizeof path, "config/bad/%s", de->d_name);
        size_t i = 0;
        while (i < NELEMS(bad_files) && strcmp(bad_files[i].file, path) != 0)
            i++;
        if (i == NELEMS(bad_files))
            fail_msg("%s has no expected message in test_config.c", path);
        seen++;
    }
    closedir(dir);
    assert_int_equal(seen, NELEMS(bad_files));
}

/* ------------------------------------------------------------------------- */

typedef struct {
    const char *test;
    const char *yaml;
    const char *message; /* file name is "t.yaml" */
} bad_string_t;

static const bad_string_t bad_strings[] = {
    {"test_empty_file_is_missing_features", "", "t.yaml:1: features: required key is missing"},
    {"test_top_level_list_is_error", "- a\n",
     "t.yaml:1: (top level): expected a mapping (key: value), found a list"},
    {"test_unknown_top_level_key_lists_the_sections", "sever: {}\n" ONE_FEATURE,
     "t.yaml:1: sever: unknown key (known here: server, kafka, events, store, snapshot, demo, "
     "features)"},
    {"test_unknown_feature_key_lists_the_feature_keys",
     "features:\n  - { nme: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n",
     "t.yaml:2: features[0].nme: unknown key (known here: name, entity, key, where, agg, value, "
     "windows, hop, k)"},
    {"test_dotted_key_is_unknown_not_a_shortcut", "server.listen: \"0.0.0.0:1\"\n" ONE_FEATURE,
     "t.yaml:1: server.listen: unknown key (write nested mappings, not dotted names; known here: "
     "server, kafka, events, store, snapshot, demo, features)"},
    {"test_feature_table_path_at_top_level_is_unknown", "features[].windows: [1h]\n" ONE_FEATURE,
     "t.yaml:1: features[].windows: unknown key (write nested mappings, not dotted names; known "
     "here: server, kafka, events, store, snapshot, demo, features)"},
    {"test_bracketed_key_in_feature_is_unknown",
     "features:\n  - name[]: c\n    entity: u\n    key: u\n    agg: count\n    windows: [1h]\n",
     "t.yaml:2: features[0].name[]: unknown key (known here: name, entity, key, where, agg, value, "
     "windows, hop, k)"},
    {"test_section_given_a_scalar_is_error", "server: 5\n" ONE_FEATURE,
     "t.yaml:1: server: expected a mapping (key: value), found a single value"},
    {"test_non_scalar_mapping_key_is_error", "? [a, b]\n: c\n" ONE_FEATURE,
     "t.yaml:1: (top level): a key must be a plain name, not a list"},
    {"test_empty_feature_list_is_error", "features: []\n",
     "t.yaml:1: features: needs at least one feature"},
    {"test_features_as_mapping_is_error", "features: { a: b }\n",
     "t.yaml:1: features: expected a list of features, found a mapping"},
    {"test_feature_as_scalar_is_error", "features:\n  - clicks\n",
     "t.yaml:2: features[0]: expected a feature mapping ({name: ..., agg: ...}), found a single "
     "value"},
    {"test_feature_name_with_dash_is_error",
     "features:\n  - { name: clicks-1h, entity: user, key: user_id, agg: count, windows: [1h] }\n",
     "t.yaml:2: features[0].name: \"clicks-1h\" may use only letters, digits and _"},
    {"test_nested_list_in_key_is_error",
     "features:\n  - { name: c, entity: user, key: [[a]], agg: count, windows: [1h] }\n",
     "t.yaml:2: features[0].key[0]: expected a single value, found a list"},
    {"test_sum_with_two_values_is_error",
     "features:\n  - { name: s, entity: user, key: u, agg: sum, value: [a, b], windows: [1h] }\n",
     "t.yaml:2: features[0].value: sum takes exactly one value field, not 2"},
    {"test_avg_without_value_is_error",
     "features:\n  - { name: s, entity: user, key: u, agg: avg, windows: [1h] }\n",
     "t.yaml:2: features[0].value: avg needs the numeric event field to aggregate"},
    {"test_last_without_value_is_error",
     "features:\n  - { name: l, entity: u, key: u, agg: last }\n",
     "t.yaml:2: features[0].value: last needs the event field(s) to keep"},
    {"test_count_without_windows_is_error",
     "features:\n  - { name: c, entity: user, key: u, agg: count }\n",
     "t.yaml:2: features[0].windows: count needs windows, e.g. [1h, 1d]"},
    {"test_count_with_empty_windows_is_error",
     "features:\n  - name: c\n    entity: user\n    key: u\n    agg: count\n    windows: []\n",
     "t.yaml:6: features[0].windows: count needs windows, e.g. [1h, 1d]"},
    {"test_last_k_with_windows_is_error",
     "features:\n  - { name: r, entity: u, key: u, agg: last_k, k: 5, value: a, windows: [1h] }\n",
     "t.yaml:2: features[0].windows: last_k keeps the newest items and takes no windows; remove "
     "windows"},
    {"test_last_with_hop_is_error",
     "features:\n  - { name: r, entity: u, key: u, agg: last, value: a, hop: 1m }\n",
     "t.yaml:2: features[0].hop: last has no windows and takes no hop; remove hop"},
    {"test_k_on_count_is_error",
     "features:\n  - { name: c, entity: u, key: u, agg: count, windows: [1h], k: 3 }\n",
     "t.yaml:2: features[0].k: k is only for last_k"},
    {"test_k_on_last_is_error",
     "features:\n  - { name: c, entity: u, key: u, agg: last, value: a, k: 3 }\n",
     "t.yaml:2: features[0].k: k is only for last_k (last keeps one item)"},
    {"test_k_out_of_range_is_error",
     "features:\n  - { name: r, entity: u, key: u, agg: last_k, value: a, k: 10001 }\n",
     "t.yaml:2: features[0].k: 10001 is out of range (1..10000)"},
    {"test_where_value_mapping_is_error",
     "features:\n  - { name: c, entity: u, key: u, where: { a: { b: c } }, agg: count, windows: "
     "[1h] }\n",
     "t.yaml:2: features[0].where.a: expected a value or a list of values, found a mapping"},
    {"test_where_empty_list_is_error",
     "features:\n  - { name: c, entity: u, key: u, where: { a: [] }, agg: count, windows: [1h] }\n",
     "t.yaml:2: features[0].where.a: needs at least one value"},
    {"test_where_null_value_is_error",
     "features:\n  - name: c\n    entity: u\n    key: u\n    where:\n      a:\n    agg: count\n"
     "    windows: [1h]\n",
     "t.yaml:6: features[0].where.a: needs a value or a list of values"},
    {"test_where_list_is_error",
     "features:\n  - { name: c, entity: u, key: u, where: [a], agg: count, windows: [1h] }\n",
     "t.yaml:2: features[0].where: expected a mapping of field: value, found a list"},
    {"test_duplicate_where_field_is_error",
     "features:\n  - name: c\n    entity: u\n    key: u\n    where:\n      a: 1\n      a: 2\n"
     "    agg: count\n    windows: [1h]\n",
     "t.yaml:7: features[0].where.a: duplicate key (first given at line 6)"},
    {"test_window_overflowing_int64_is_out_of_range",
     "features:\n  - { name: c, entity: u, key: u, agg: count, windows: [106751991168d] }\n",
     "t.yaml:2: features[0].windows[0]: 106751991168d is out of range (1s..365d)"},
    {"test_window_longer_than_a_year_is_out_of_range",
     "features:\n  - { name: c, entity: u, key: u, agg: count, windows: [1d, 366d] }\n",
     "t.yaml:2: features[0].windows[1]: 366d is out of range (1s..365d)"},
    {"test_zero_window_is_out_of_range",
     "features:\n  - { name: c, entity: u, key: u, agg: count, windows: [0s] }\n",
     "t.yaml:2: features[0].windows[0]: 0s is out of range (1s..365d)"},
    {"test_subsecond_window_is_error",
     "features:\n  - { name: c, entity: u, key: u, agg: count, windows: [1500ms] }\n",
     "t.yaml:2: features[0].windows[0]: \"1500ms\" is not a whole number of seconds (windows and "
     "hops are whole seconds, at least 1s)"},
    {"test_seed_overflowing_int64_is_error", "demo:\n  seed: 9223372036854775808\n" ONE_FEATURE,
     "t.yaml:2: demo.seed: 9223372036854775808 does not fit in a 64-bit integer"},
    {"test_int_with_plus_sign_is_error", "demo: { users: +5 }\n" ONE_FEATURE,
     "t.yaml:1: demo.users: \"+5\" is not an integer"},
    {"test_duration_above_max_is_out_of_range", "store: { sweep_every: 2h }\n" ONE_FEATURE,
     "t.yaml:1: store.sweep_every: 2h is out of range (1s..1h)"},
    {"test_empty_topic_list_is_error", "kafka: { topics: [] }\n" ONE_FEATURE,
     "t.yaml:1: kafka.topics: needs at least one item"},
    {"test_empty_topic_name_is_error", "kafka: { topics: [a, \"\"] }\n" ONE_FEATURE,
     "t.yaml:1: kafka.topics[1]: must not be empty"},
    {"test_topic_time_unit_error_names_the_topic_entry",
     "kafka:\n  topics:\n    - a\n    - name: b\n      events:\n        time: { field: at, unit: "
     "us }\n" ONE_FEATURE,
     "t.yaml:6: kafka.topics[1].events.time.unit: \"us\" is not one of ms|s|iso8601"},
    {"test_topic_mapping_without_name_is_error",
     "kafka:\n  topics:\n    - { events: { max_bytes: 100 } }\n" ONE_FEATURE,
     "t.yaml:3: kafka.topics[0].name: required key is missing"},
    {"test_topic_time_without_field_is_error",
     "kafka:\n  topics:\n    - { name: a, events: { time: { unit: s } } }\n" ONE_FEATURE,
     "t.yaml:3: kafka.topics[0].events.time.field: required key is missing"},
    {"test_unknown_topic_events_key_lists_the_known_ones",
     "kafka:\n  topics:\n    - { name: a, events: { format: json } }\n" ONE_FEATURE,
     "t.yaml:3: kafka.topics[0].events.format: unknown key (known here: time, max_future_skew, "
     "max_bytes, max_string)"},
    {"test_unknown_topic_key_lists_the_known_ones",
     "kafka:\n  topics:\n    - { name: a, partitions: 3 }\n" ONE_FEATURE,
     "t.yaml:3: kafka.topics[0].partitions: unknown key (known here: name, key, events)"},
    {"test_topic_max_bytes_out_of_range_is_error",
     "kafka:\n  topics:\n    - { name: a, events: { max_bytes: 10 } }\n" ONE_FEATURE,
     "t.yaml:3: kafka.topics[0].events.max_bytes: 10 is out of range (64..16777216)"},
    {"test_topic_listed_twice_is_error", "kafka:\n  topics: [a, { name: a }]\n" ONE_FEATURE,
     "t.yaml:2: kafka.topics[1]: topic \"a\" is listed twice (first at line 2)"},
    {"test_topic_given_as_a_list_is_error", "kafka:\n  topics: [[a, b]]\n" ONE_FEATURE,
     "t.yaml:2: kafka.topics[0]: expected a topic name or a mapping {name: ..., events: {...}}, "
     "found a list"},
    {"test_negative_ready_lag_is_error", "kafka: { ready_lag: -1 }\n" ONE_FEATURE,
     "t.yaml:1: kafka.ready_lag: -1 is out of range (0..1000000000)"},
    {"test_empty_brokers_is_error", "kafka: { brokers: \"\" }\n" ONE_FEATURE,
     "t.yaml:1: kafka.brokers: must not be empty"},
    {"test_reserved_kafka_property_points_to_its_key",
     "kafka:\n  properties:\n    group.id: other\n" ONE_FEATURE,
     "t.yaml:3: kafka.properties.group.id: set by tallyd; use kafka.group instead"},
    {"test_kafka_property_without_value_is_error",
     "kafka:\n  properties:\n    client.id:\n" ONE_FEATURE,
     "t.yaml:3: kafka.properties.client.id: needs a value"},
    {"test_time_without_field_is_error", "events:\n  time: { unit: s }\n" ONE_FEATURE,
     "t.yaml:2: events.time.field: required key is missing"},
    {"test_unknown_time_unit_is_error", "events:\n  time: { field: ts, unit: us }\n" ONE_FEATURE,
     "t.yaml:2: events.time.unit: \"us\" is not one of ms|s|iso8601"},
    {"test_format_other_than_json_is_error", "events: { format: avro }\n" ONE_FEATURE,
     "t.yaml:1: events.format: \"avro\" is not one of json"},
    {"test_listen_without_port_is_error", "server: { listen: localhost }\n" ONE_FEATURE,
     "t.yaml:1: server.listen: \"localhost\" is not host:port (e.g. 127.0.0.1:7379)"},
    {"test_listen_port_out_of_range_is_error",
     "server: { listen: \"127.0.0.1:65536\" }\n" ONE_FEATURE,
     "t.yaml:1: server.listen: \"127.0.0.1:65536\" is not host:port (e.g. 127.0.0.1:7379)"},
    {"test_bare_ipv6_listen_is_error", "server: { listen: \"::1:7379\" }\n" ONE_FEATURE,
     "t.yaml:1: server.listen: \"::1:7379\" is not host:port (e.g. 127.0.0.1:7379)"},
    {"test_second_yaml_document_is_error", ONE_FEATURE "---\nserver: {}\n",
     "t.yaml:4: a config file holds one YAML document; remove the second one"},
    {"test_nul_in_quoted_string_is_error", "kafka: { group: \"a\\0b\" }\n" ONE_FEATURE,
     "t.yaml:1: kafka.group: contains a NUL character"},
    {"test_tab_indentation_is_a_syntax_error", "server:\n\tlisten: x\n" ONE_FEATURE,
     "t.yaml:2: YAML syntax error: found character that cannot start any token (while scanning "
     "for the next token at line 2)"},
};

static void test_bad_string(void **state)
{
    const bad_string_t *bad = *state;
    char err[ERR_CAP] = "";
    tly_config_t *sentinel = (tly_config_t *)(uintptr_t)0x1, *cfg = sentinel;
    assert_int_equal(tly_config_load_string(bad->yaml, "t.yaml", &cfg, err, sizeof err),
                     TLY_E_CONFIG);
    assert_string_equal(err, bad->message);
    assert_ptr_equal(cfg, sentinel);
}

/* ------------------------------------------------------------------------- */

static void test_missing_file_is_io_error_naming_it(void **state)
{
    (void)state;
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    assert_int_equal(tly_config_load("config/no-such-file.yaml", &cfg, err, sizeof err), TLY_E_IO);
    assert_string_equal(err, "config/no-such-file.yaml: cannot open: No such file or directory");
    assert_null(cfg);
}

static void test_error_message_is_truncated_to_errlen(void **state)
{
    (void)state;
    char err[16];
    memset(err, 'x', sizeof err);
    tly_config_t *cfg = NULL;
    assert_int_equal(tly_config_load_string("server: 5\n", "t.yaml", &cfg, err, sizeof err),
                     TLY_E_CONFIG);
    assert_string_equal(err, "t.yaml:1: serve"); /* 15 characters and the NUL */
}

static void test_omitted_sections_take_documented_defaults(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok(ONE_FEATURE);
    assert_string_equal(cfg->path, "t.yaml");
    assert_string_equal(cfg->server.listen, "127.0.0.1:7379");
    assert_string_equal(cfg->server.admin, "127.0.0.1:9779");
    assert_string_equal(cfg->server.requirepass, "");
    assert_int_equal(cfg->server.max_clients, 10000);
    assert_int_equal(cfg->server.threads, 1);
    assert_string_equal(cfg->kafka.brokers, "localhost:9092");
    assert_string_equal(cfg->kafka.group, "tallyd");
    assert_int_equal(cfg->kafka.ntopics, 1);
    assert_string_equal(cfg->kafka.topics[0], "engagements");
    assert_int_equal(cfg->kafka.mode, TLY_MODE_REPLICA);
    assert_int_equal(cfg->kafka.start, TLY_START_WINDOW);
    assert_int_equal(cfg->kafka.nproperties, 0);
    assert_string_equal(cfg->events.format, "json");
    assert_null(cfg->events.time_field);
    assert_int_equal(cfg->events.time_unit, TLY_TIME_KAFKA);
    assert_int_equal(cfg->events.max_future_skew_ms, 60000);
    assert_int_equal(cfg->events.max_bytes, 65536);
    assert_int_equal(cfg->events.max_string, 256);
    assert_int_equal(cfg->store.idle_ttl_ms, 604800000);
    assert_int_equal(cfg->store.sweep_every_ms, 10000);
    assert_string_equal(cfg->snapshot.dir, "/var/lib/tallyd");
    assert_int_equal(cfg->snapshot.every_ms, 30000);
    assert_int_equal(cfg->snapshot.keep, 3);
    assert_int_equal(cfg->demo.events_per_sec, 20000);
    assert_int_equal(cfg->demo.users, 100000);
    assert_int_equal(cfg->demo.pins, 1000000);
    assert_int_equal(cfg->demo.seed, 42);
    assert_int_equal(cfg->demo.history, 200000);
    tly_config_free(cfg);
}

static void test_null_values_and_sections_keep_defaults(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok("server:\n  max_clients:\n  threads: ~\nstore:\n"
                                       "events:\n  time:\n" ONE_FEATURE);
    assert_int_equal(cfg->server.max_clients, 10000);
    assert_int_equal(cfg->server.threads, 1);
    assert_int_equal(cfg->store.sweep_every_ms, 10000);
    assert_int_equal(cfg->events.time_unit, TLY_TIME_KAFKA);
    tly_config_free(cfg);
}

static void test_every_key_can_be_set(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok(
        "server: { listen: \"0.0.0.0:6380\", admin: \"\", requirepass: s3cret, max_clients: 5,"
        " threads: 64 }\n"
        "kafka: { brokers: \"k1:9092,k2:9092\", group: g, topics: [a, b, c], mode: replica,"
        " start: earliest }\n"
        "events: { time: { field: when, unit: iso8601 }, max_future_skew: 30s, max_bytes: 64,"
        " max_string: 65536 }\n"
        "store: { idle_ttl: 1d, sweep_every: 1h }\n"
        "snapshot: { dir: /tmp/s, every: 1d, keep: 100 }\n"
        "demo: { events_per_sec: 1, users: 2, pins: 3, seed: -7 }\n" ONE_FEATURE);
    assert_string_equal(cfg->server.listen, "0.0.0.0:6380");
    assert_string_equal(cfg->server.admin, "");
    assert_string_equal(cfg->server.requirepass, "s3cret");
    assert_int_equal(cfg->server.max_clients, 5);
    assert_int_equal(cfg->server.threads, 64);
    assert_string_equal(cfg->kafka.brokers, "k1:9092,k2:9092");
    assert_string_equal(cfg->kafka.group, "g");
    assert_int_equal(cfg->kafka.ntopics, 3);
    assert_string_equal(cfg->kafka.topics[2], "c");
    assert_int_equal(cfg->kafka.mode, TLY_MODE_REPLICA);
    assert_int_equal(cfg->kafka.start, TLY_START_EARLIEST);
    assert_string_equal(cfg->events.time_field, "when");
    assert_int_equal(cfg->events.time_unit, TLY_TIME_ISO8601);
    assert_int_equal(cfg->events.max_future_skew_ms, 30000);
    assert_int_equal(cfg->events.max_bytes, 64);
    assert_int_equal(cfg->events.max_string, 65536);
    assert_int_equal(cfg->store.idle_ttl_ms, 86400000);
    assert_int_equal(cfg->store.sweep_every_ms, 3600000);
    assert_string_equal(cfg->snapshot.dir, "/tmp/s");
    assert_int_equal(cfg->snapshot.every_ms, 86400000);
    assert_int_equal(cfg->snapshot.keep, 100);
    assert_int_equal(cfg->demo.events_per_sec, 1);
    assert_int_equal(cfg->demo.users, 2);
    assert_int_equal(cfg->demo.pins, 3);
    assert_int_equal(cfg->demo.seed, -7);
    tly_config_free(cfg);
}

static void test_time_unit_defaults_to_ms_when_time_is_given(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok("events:\n  time: { field: ts }\n" ONE_FEATURE);
    assert_string_equal(cfg->events.time_field, "ts");
    assert_int_equal(cfg->events.time_unit, TLY_TIME_MS);
    tly_config_free(cfg);
    cfg = load_string_ok("events:\n  time: { field: t, unit: s }\n" ONE_FEATURE);
    assert_int_equal(cfg->events.time_unit, TLY_TIME_S);
    tly_config_free(cfg);
}

static void test_topics_inherit_top_level_events_settings(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok(
        "kafka: { topics: [a, b] }\n"
        "events: { time: { field: ts, unit: s }, max_future_skew: 30s, max_bytes: 100,"
        " max_string: 7 }\n" ONE_FEATURE);
    assert_int_equal(cfg->kafka.ntopics, 2);
    assert_int_equal(cfg->kafka.ready_lag, 1000);
    for (size_t i = 0; i < 2; i++) {
        const tly_topic_cfg_t *t = &cfg->kafka.topic_cfgs[i];
        assert_string_equal(t->name, i == 0 ? "a" : "b");
        assert_ptr_equal(cfg->kafka.topics[i], t->name);
        assert_string_equal(t->time_field, "ts");
        assert_int_equal(t->time_unit, TLY_TIME_S);
        assert_int_equal(t->max_future_skew_ms, 30000);
        assert_int_equal(t->max_bytes, 100);
        assert_int_equal(t->max_string, 7);
        assert_false(t->own_events);
    }
    tly_config_free(cfg);

    /* No events.time: topics without their own read the Kafka timestamp. */
    cfg = load_string_ok(ONE_FEATURE);
    assert_int_equal(cfg->kafka.ntopics, 1);
    assert_string_equal(cfg->kafka.topic_cfgs[0].name, "engagements");
    assert_null(cfg->kafka.topic_cfgs[0].time_field);
    assert_int_equal(cfg->kafka.topic_cfgs[0].time_unit, TLY_TIME_KAFKA);
    assert_int_equal(cfg->kafka.topic_cfgs[0].max_bytes, 65536);
    tly_config_free(cfg);
}

static void test_topic_mapping_overrides_events_settings(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok(
        "kafka:\n"
        "  ready_lag: 0\n"
        "  topics:\n"
        "    - clicks\n"
        "    - name: views\n"
        "      events:\n"
        "        time: { field: at, unit: iso8601 }\n"
        "        max_future_skew: 5s\n"
        "    - { name: saves, events: { time: { field: t }, max_bytes: 128, max_string: 9 } }\n"
        "    - { name: plain }\n"
        "events: { time: { field: ts }, max_string: 20 }\n" ONE_FEATURE);
    assert_int_equal(cfg->kafka.ready_lag, 0);
    assert_int_equal(cfg->kafka.ntopics, 4);
    const tly_topic_cfg_t *t = cfg->kafka.topic_cfgs;
    assert_string_equal(cfg->kafka.topics[1], "views");
    assert_string_equal(t[0].time_field, "ts");
    assert_int_equal(t[0].time_unit, TLY_TIME_MS);
    assert_false(t[0].own_events);
    assert_string_equal(t[1].name, "views");
    assert_string_equal(t[1].time_field, "at");
    assert_int_equal(t[1].time_unit, TLY_TIME_ISO8601);
    assert_int_equal(t[1].max_future_skew_ms, 5000);
    assert_int_equal(t[1].max_bytes, 65536);
    assert_int_equal(t[1].max_string, 20);
    assert_int_equal(t[1].line, 5);
    assert_true(t[1].own_events);
    assert_string_equal(t[2].time_field, "t");
    assert_int_equal(t[2].time_unit, TLY_TIME_MS); /* the unit's default, not the top level's */
    assert_int_equal(t[2].max_future_skew_ms, 60000);
    assert_int_equal(t[2].max_bytes, 128);
    assert_int_equal(t[2].max_string, 9);
    assert_string_equal(t[3].name, "plain");
    assert_string_equal(t[3].time_field, "ts");
    assert_false(t[3].own_events);
    tly_config_free(cfg);
}

static void test_properties_map_keeps_values_as_text_in_order(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok("kafka:\n"
                                       "  properties:\n"
                                       "    security.protocol: SASL_SSL\n"
                                       "    fetch.wait.max.ms: 10\n"
                                       "    enable.partition.eof: true\n"
                                       "    sasl.password: \"\"\n" ONE_FEATURE);
    assert_int_equal(cfg->kafka.nproperties, 4);
    assert_string_equal(cfg->kafka.properties[0].key, "security.protocol");
    assert_string_equal(cfg->kafka.properties[0].value, "SASL_SSL");
    assert_string_equal(cfg->kafka.properties[1].key, "fetch.wait.max.ms");
    assert_string_equal(cfg->kafka.properties[1].value, "10");
    assert_string_equal(cfg->kafka.properties[2].key, "enable.partition.eof");
    assert_string_equal(cfg->kafka.properties[2].value, "true");
    assert_string_equal(cfg->kafka.properties[3].key, "sasl.password");
    assert_string_equal(cfg->kafka.properties[3].value, "");
    tly_config_free(cfg);
}

static void test_single_value_stands_for_a_one_item_list(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok(
        "kafka: { topics: events }\n"
        "features:\n"
        "  - { name: c, entity: u, key: [user_id, category], agg: count, windows: 1h }\n"
        "  - { name: r, entity: u, key: [user_id, category], agg: last_k, k: 3, value: x }\n");
    assert_int_equal(cfg->kafka.ntopics, 1);
    assert_string_equal(cfg->kafka.topics[0], "events");
    assert_int_equal(cfg->features[0].nkeys, 2);
    assert_string_equal(cfg->features[0].keys[1], "category");
    assert_windows(&cfg->features[0], (const int64_t[]){3600000}, 1);
    assert_int_equal(cfg->features[1].nvalues, 1);
    assert_string_equal(cfg->features[1].values[0], "x");
    assert_int_equal(cfg->features[1].k, 3);
    tly_config_free(cfg);
}

static void test_explicit_hop_dividing_every_window_is_kept(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok(
        "features:\n"
        "  - { name: m, entity: u, key: u, agg: max, value: v, windows: [10m, 1h, 2h], hop: 10m }\n"
        "  - { name: n, entity: u, key: u, agg: min, value: v, windows: [30s], hop: 30s }\n");
    assert_int_equal(cfg->features[0].agg, TLY_AGG_MAX);
    assert_int_equal(cfg->features[0].hop_ms, 600000);
    assert_windows(&cfg->features[0], (const int64_t[]){600000, 3600000, 7200000}, 3);
    assert_int_equal(cfg->features[1].agg, TLY_AGG_MIN);
    assert_int_equal(cfg->features[1].hop_ms, 30000);
    tly_config_free(cfg);
}

static void test_where_keeps_fields_values_and_lines(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok("features:\n"
                                       "  - name: c\n"
                                       "    entity: u\n"
                                       "    key: u\n"
                                       "    where:\n"
                                       "      action: [click, \"save\", 3]\n"
                                       "      surface: home\n"
                                       "    agg: count\n"
                                       "    windows: [1h]\n");
    const tly_feature_cfg_t *f = &cfg->features[0];
    assert_int_equal(f->line, 2);
    assert_int_equal(f->nwhere, 2);
    assert_string_equal(f->where[0].field, "action");
    assert_int_equal(f->where[0].line, 6);
    assert_int_equal(f->where[0].nvalues, 3);
    assert_string_equal(f->where[0].values[0], "click");
    assert_string_equal(f->where[0].values[1], "save");
    assert_string_equal(f->where[0].values[2], "3");
    assert_string_equal(f->where[1].field, "surface");
    assert_int_equal(f->where[1].line, 7);
    assert_string_equal(f->where[1].values[0], "home");
    tly_config_free(cfg);
}

static void test_same_feature_name_in_two_entities_is_allowed(void **state)
{
    (void)state;
    tly_config_t *cfg = load_string_ok(
        "features:\n"
        "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n"
        "  - { name: clicks, entity: pin, key: pin_id, agg: count, windows: [1h] }\n");
    assert_int_equal(cfg->nfeatures, 2);
    tly_config_free(cfg);
}

/* A zero duration is a duration out of range, not "not a duration". */
static void test_zero_duration_is_out_of_range(void **state)
{
    (void)state;
    char yaml[512], err[512];
    tly_config_t *cfg = NULL;
    snprintf(yaml, sizeof yaml, "events: { max_future_skew: 0s }\n%s", ONE_FEATURE);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "t.yaml:1: events.max_future_skew: 0s is out of range (1ms..1d)");
    snprintf(yaml, sizeof yaml, "events: { max_future_skew: 0x }\n%s", ONE_FEATURE);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "t.yaml:1: events.max_future_skew: \"0x\" is not a duration (use "
                             "<n>ms|s|m|h|d)");
}

/* A host name that merely starts like a loopback address resolves to
 * whatever its DNS says: it is not loopback. A password must fit the
 * request limits of clients not yet authenticated. */
static void test_loopback_lookalike_and_overlong_password_are_errors(void **state)
{
    (void)state;
    char yaml[2048], err[512];
    tly_config_t *cfg = NULL;
    snprintf(yaml, sizeof yaml, "server: { listen: \"127.example.com:7379\" }\n%s", ONE_FEATURE);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "t.yaml:1: server.listen: 127.example.com:7379 accepts clients from "
                             "other hosts; set server.requirepass, or listen on 127.0.0.1");
    char pw[600];
    memset(pw, 'p', 513);
    pw[513] = '\0';
    snprintf(yaml, sizeof yaml, "server: { requirepass: %s }\n%s", pw, ONE_FEATURE);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "t.yaml:1: server.requirepass: is 513 bytes long; at most 512 are "
                             "allowed");
    pw[512] = '\0';
    snprintf(yaml, sizeof yaml, "server: { requirepass: %s }\n%s", pw, ONE_FEATURE);
    tly_config_free(load_string_ok(yaml));
}

static void test_loopback_and_password_protected_listen_are_accepted(void **state)
{
    (void)state;
    static const char *const ok[] = {
        "server: { listen: \"localhost:7379\" }\n",
        "server: { listen: \"[::1]:7379\" }\n",
        "server: { listen: \"127.0.0.2:1\" }\n",
        "server: { listen: \"127.255.0.9:1\" }\n",
        "server: { listen: \"0.0.0.0:7379\", requirepass: pw }\n",
        "server: { listen: \"[::]:7379\", requirepass: pw }\n",
    };
    char yaml[512];
    for (size_t i = 0; i < NELEMS(ok); i++) {
        snprintf(yaml, sizeof yaml, "%s%s", ok[i], ONE_FEATURE);
        tly_config_free(load_string_ok(yaml));
    }
}

/* ------------------------------------------------------------------------- */

static void test_duration_parse_accepts_every_unit(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        int64_t ms;
    } cases[] = {
        {"1ms", 1},
        {"1500ms", 1500},
        {"1s", 1000},
        {"90s", 90000},
        {"5m", 300000},
        {"1h", 3600000},
        {"25h", 90000000},
        {"1d", 86400000},
        {"7d", 604800000},
        {"007s", 7000},
        {"9223372036854775807ms", INT64_MAX},
        {"106751991167d", 106751991167LL * 86400000},
    };
    for (size_t i = 0; i < NELEMS(cases); i++) {
        int64_t ms = -1;
        assert_int_equal(tly_duration_parse(cases[i].text, &ms), TLY_OK);
        assert_int_equal(ms, cases[i].ms);
    }
}

static void test_duration_parse_rejects_malformed_text_without_writing(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",     "5",  "m",   "-5m", "+5m",  "5 m", " 5m",  "5m ",   "5mm", "5M",
        "5ms2", "0s", "0ms", "00d", "1.5h", "5x",  "1e3s", "0x10s", "s5",
    };
    for (size_t i = 0; i < NELEMS(bad); i++) {
        int64_t ms = 12345;
        if (tly_duration_parse(bad[i], &ms) != TLY_E_INVAL)
            fail_msg("\"%s\" was not rejected as malformed", bad[i]);
        assert_int_equal(ms, 12345);
    }
    int64_t ms = 12345;
    assert_int_equal(tly_duration_parse(NULL, &ms), TLY_E_INVAL);
    assert_int_equal(ms, 12345);
}

static void test_duration_parse_reports_overflow_as_range(void **state)
{
    (void)state;
    static const char *const big[] = {
        "9223372036854775808ms",
        "106751991168d",
        "9223372036854776s",
        "99999999999999999999999999h",
    };
    for (size_t i = 0; i < NELEMS(big); i++) {
        int64_t ms = 12345;
        if (tly_duration_parse(big[i], &ms) != TLY_E_RANGE)
            fail_msg("\"%s\" was not reported as out of range", big[i]);
        assert_int_equal(ms, 12345);
    }
    /* malformed beats overflow: the text is wrong whatever the number */
    int64_t ms;
    assert_int_equal(tly_duration_parse("99999999999999999999999x", &ms), TLY_E_INVAL);
}

static void test_duration_format_uses_shortest_exact_unit(void **state)
{
    (void)state;
    static const struct {
        int64_t ms;
        const char *text;
    } cases[] = {
        {0, "0s"},
        {1, "1ms"},
        {999, "999ms"},
        {1000, "1s"},
        {1500, "1500ms"},
        {90000, "90s"},
        {300000, "5m"},
        {5400000, "90m"},
        {3600000, "1h"},
        {90000000, "25h"},
        {86400000, "1d"},
        {604800000, "7d"},
        {INT64_MAX, "9223372036854775807ms"},
    };
    char buf[32];
    for (size_t i = 0; i < NELEMS(cases); i++)
        assert_string_equal(tly_duration_format(cases[i].ms, buf, sizeof buf), cases[i].text);
}

static void test_duration_format_round_trips_through_parse(void **state)
{
    (void)state;
    char buf[32];
    for (int64_t ms = 1; ms < 100 * 86400000LL; ms = ms * 3 + 1000) {
        int64_t back = 0;
        assert_int_equal(tly_duration_parse(tly_duration_format(ms, buf, sizeof buf), &back),
                         TLY_OK);
        assert_int_equal(back, ms);
    }
}

static void test_duration_format_truncates_to_cap(void **state)
{
    (void)state;
    char buf[3];
    assert_string_equal(tly_duration_format(1500, buf, sizeof buf), "15");
}

/* ------------------------------------------------------------------------- */

static const char *const all_keys[] = {
    "server.listen",
    "server.admin",
    "server.advertise",
    "server.requirepass",
    "server.max_clients",
    "server.threads",
    "server.unix",
    "server.max_args",
    "server.max_bulk",
    "server.max_query_buffer",
    "server.max_output_buffer",
    "server.output_soft_limit",
    "server.output_stall",
    "server.max_clients_memory",
    "server.idle_timeout",
    "server.request_timeout",
    "server.max_reply_values",
    "kafka.brokers",
    "kafka.group",
    "kafka.topics",
    "kafka.topics[].name",
    "kafka.topics[].key",
    "kafka.topics[].events.time.field",
    "kafka.topics[].events.time.unit",
    "kafka.topics[].events.max_future_skew",
    "kafka.topics[].events.max_bytes",
    "kafka.topics[].events.max_string",
    "kafka.mode",
    "kafka.start",
    "kafka.properties",
    "kafka.endpoints_topic",
    "kafka.threads",
    "kafka.ready_lag",
    "events.format",
    "events.time.field",
    "events.time.unit",
    "events.max_future_skew",
    "events.max_bytes",
    "events.max_string",
    "store.max_memory",
    "store.idle_ttl",
    "store.sweep_every",
    "snapshot.dir",
    "snapshot.every",
    "snapshot.keep",
    "demo.events_per_sec",
    "demo.users",
    "demo.pins",
    "demo.seed",
    "demo.history",
    "features",
    "features[].name",
    "features[].entity",
    "features[].key",
    "features[].where",
    "features[].agg",
    "features[].value",
    "features[].windows",
    "features[].hop",
    "features[].k",
};

static void test_help_mentions_every_key_with_type_and_default(void **state)
{
    (void)state;
    char *text = capture_help(0);
    for (size_t i = 0; i < NELEMS(all_keys); i++) {
        char line[128];
        snprintf(line, sizeof line, "\n%s (", all_keys[i]);
        if (strstr(text, line) == NULL)
            fail_msg("--help-config does not describe %s", all_keys[i]);
    }
    assert_non_null(strstr(text, "\nserver.threads (int: 1..64; default 1)\n"));
    assert_non_null(strstr(text, "\nkafka.mode (enum: shard|replica; default replica)\n"));
    assert_non_null(strstr(text, "\nevents.max_future_skew (duration: 1ms..1d; default 1m)\n"));
    assert_non_null(strstr(text, "\nkafka.topics (topic list; default [engagements])\n"));
    assert_non_null(strstr(text, "\nkafka.ready_lag (int: 0..1000000000; default 1000)\n"));
    assert_non_null(strstr(text, "\nkafka.topics[].events.max_bytes (int: 64..16777216; "
                                 "default events.max_bytes)\n"));
    assert_non_null(strstr(text, "\nfeatures[].agg (enum: count|sum|min|max|avg|last|last_k; "
                                 "required)\n"));
    free(text);
}

/* Limits that could never be satisfied together are refused. */
static void test_client_limits_larger_than_all_clients_memory_are_errors(void **state)
{
    (void)state;
    static const char features[] = "features:\n  - { name: c, entity: u, key: u, agg: count, "
                                   "windows: [1m] }\n";
    char err[ERR_CAP] = "", yaml[512];
    tly_config_t *cfg = NULL;
    /* the cap set alone: the defaults it clashes with are named */
    snprintf(yaml, sizeof yaml, "server:\n  max_clients_memory: 8388608\n%s", features);
    assert_int_equal(tly_config_load_string(yaml, "mem.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "mem.yaml:2: server.max_clients_memory: 8388608 is smaller than "
                             "server.max_query_buffer (16777216, its default); raise it or "
                             "lower server.max_query_buffer");
    snprintf(yaml, sizeof yaml,
             "server:\n  max_clients_memory: 8388608\n  max_query_buffer: 8388608\n%s", features);
    assert_int_equal(tly_config_load_string(yaml, "mem.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "mem.yaml:2: server.max_clients_memory: 8388608 is smaller than "
                             "server.max_output_buffer (67108864, its default); raise it or "
                             "lower server.max_output_buffer");
    snprintf(yaml, sizeof yaml,
             "server:\n  max_clients_memory: 8388608\n  max_query_buffer: 8388608\n"
             "  max_output_buffer: 9000000\n%s",
             features);
    assert_int_equal(tly_config_load_string(yaml, "mem.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "mem.yaml:4: server.max_output_buffer: 9000000 is larger than "
                             "server.max_clients_memory (8388608); a client with that much to "
                             "read would be closed");
    snprintf(yaml, sizeof yaml,
             "server:\n  max_clients_memory: 8388608\n  max_query_buffer: 8388608\n"
             "  max_output_buffer: 8388608\n%s",
             features);
    assert_int_equal(tly_config_load_string(yaml, "mem.yaml", &cfg, err, sizeof err), TLY_OK);
    tly_config_free(cfg);
}

static void test_null_list_items_and_nul_in_keys_are_errors(void **state)
{
    (void)state;
    static const struct {
        const char *yaml; /* "\\0" in YAML double quotes is a NUL escape */
        const char *want;
    } cases[] = {
#define CASE(y, w) {y, w}
        CASE("kafka: { topics: [~] }\nfeatures: [ { name: c, entity: u, key: u, agg: count, "
             "windows: [1h] } ]\n",
             "nul.yaml:1: kafka.topics[0]: needs a value (a list item may not be empty or null)"),
        CASE("features: [ { name: c, entity: u, key: [u, null], agg: count, windows: [1h] } ]\n",
             "nul.yaml:1: features[0].key[1]: needs a value (a list item may not be empty or "
             "null)"),
        CASE("features: [ { name: c, entity: u, key: u, agg: count, windows: [1h, ~] } ]\n",
             "nul.yaml:1: features[0].windows[1]: needs a value (a list item may not be empty or "
             "null)"),
        CASE("features: [ { name: c, entity: u, key: u, agg: count, windows: [1h], "
             "where: {a: [~]} } ]\n",
             "nul.yaml:1: features[0].where.a[0]: needs a value (a list item may not be empty or "
             "null)"),
        CASE("server:\n  \"threads\\0junk\": 4\nfeatures: [ { name: c, entity: u, key: u, "
             "agg: count, windows: [1h] } ]\n",
             "nul.yaml:2: server: a key contains a NUL character"),
        CASE("features: [ { name: c, entity: u, key: u, agg: count, windows: [1h], "
             "where: {\"a\\0b\": x} } ]\n",
             "nul.yaml:1: features[0].where: a key contains a NUL character"),
#undef CASE
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char err[ERR_CAP] = "";
        tly_config_t *cfg = NULL;
        if (tly_config_load_string(cases[i].yaml, "nul.yaml", &cfg, err, sizeof err) !=
            TLY_E_CONFIG)
            fail_msg("case %zu loaded: %s", i, cases[i].yaml);
        if (strcmp(err, cases[i].want) != 0)
            fail_msg("case %zu: got \"%s\", want \"%s\"", i, err, cases[i].want);
    }
}

static void test_bulk_larger_than_query_buffer_is_error(void **state)
{
    (void)state;
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    assert_int_equal(tly_config_load_string("server:\n  max_bulk: 2000000\n"
                                            "  max_query_buffer: 1000000\n"
                                            "features:\n  - { name: c, entity: u, key: u, "
                                            "agg: count, windows: [1m] }\n",
                                            "limits.yaml", &cfg, err, sizeof err),
                     TLY_E_CONFIG);
    assert_string_equal(err, "limits.yaml:2: server.max_bulk: 2000000 is larger than "
                             "server.max_query_buffer (1000000); a request holding it could "
                             "never be read");
    assert_null(cfg);
    /* only the larger limit set: named, against the other's default */
    assert_int_equal(tly_config_load_string("server:\n  max_output_buffer: 65536\n"
                                            "features:\n  - { name: c, entity: u, key: u, "
                                            "agg: count, windows: [1m] }\n",
                                            "limits.yaml", &cfg, err, sizeof err),
                     TLY_E_CONFIG);
    assert_string_equal(err, "limits.yaml:2: server.max_output_buffer: 65536 is smaller than "
                             "server.output_soft_limit (1048576, its default); raise it or lower "
                             "server.output_soft_limit");
    assert_null(cfg);
    /* both set: the one that must be the smaller is named */
    assert_int_equal(tly_config_load_string("server:\n  max_output_buffer: 65536\n"
                                            "  output_soft_limit: 100000\n"
                                            "features:\n  - { name: c, entity: u, key: u, "
                                            "agg: count, windows: [1m] }\n",
                                            "limits.yaml", &cfg, err, sizeof err),
                     TLY_E_CONFIG);
    assert_string_equal(err, "limits.yaml:3: server.output_soft_limit: 100000 is larger than "
                             "server.max_output_buffer (65536)");
    assert_null(cfg);
}

static void test_help_markdown_is_one_table_row_per_key(void **state)
{
    (void)state;
    char *text = capture_help(1);
    assert_memory_equal(text,
                        "| key | type | default | accepts | description |\n"
                        "| --- | --- | --- | --- | --- |\n",
                        60);
    size_t rows = 0;
    for (const char *p = text; (p = strchr(p, '\n')) != NULL; p++)
        rows++;
    assert_int_equal(rows, 2 + NELEMS(all_keys));
    for (size_t i = 0; i < NELEMS(all_keys); i++) {
        char cell[128];
        snprintf(cell, sizeof cell, "\n| `%s` | ", all_keys[i]);
        if (strstr(text, cell) == NULL)
            fail_msg("--help-config --markdown has no row for %s", all_keys[i]);
    }
    /* a | inside a cell is escaped so the table keeps its columns */
    assert_non_null(strstr(text, "| `kafka.mode` | enum | replica | shard\\|replica | "));
    free(text);
}

static void test_summary_lists_source_time_and_features_with_hops(void **state)
{
    (void)state;
    tly_config_t *cfg = load_ok("config/example.yaml");
    char *text = capture_summary(cfg);
    static const char want[] =
        "config/example.yaml: ok, 5 features over 2 entities\n"
        "source  kafka localhost:9092, topics engagements, mode replica, start window\n"
        "time    event field ts (ms), max future skew 1m\n"
        "serve   RESP 127.0.0.1:7379, admin 127.0.0.1:9779\n"
        "\n"
        "entity user, key user_id\n"
        "  clicks           count   where action = click\n"
        "    windows 5m (hop 10s, 31 buckets), 1h (hop 1m, 61 buckets), 1d (hop 5m, 289 buckets), "
        "7d (hop 1h, 169 buckets)\n"
        "  engaged          count   where action in click|save\n"
        "    windows 1h (hop 1m, 61 buckets)\n"
        "  dwell            sum     value dwell_ms\n"
        "    windows 1h (hop 1m, 61 buckets), 1d (hop 5m, 289 buckets)\n"
        "  recent           last_k  values pin_id, action  k 100\n"
        "\n"
        "entity pin, key pin_id\n"
        "  impressions      count   where action = impression\n"
        "    windows 1h (hop 1m, 61 buckets), 1d (hop 5m, 289 buckets)\n";
    assert_string_equal(text, want);
    free(text);
    tly_config_free(cfg);
}

static void test_summary_shows_explicit_hop_and_kafka_time(void **state)
{
    (void)state;
    tly_config_t *cfg =
        load_string_ok("server: { listen: \"0.0.0.0:7379\", requirepass: pw, admin: \"\" }\n"
                       "features:\n"
                       "  - { name: m, entity: u, key: [a, b], agg: max, value: v, windows: [10m, "
                       "1h], hop: 10m }\n");
    char *text = capture_summary(cfg);
    static const char want[] =
        "t.yaml: ok, 1 feature over 1 entity\n"
        "source  kafka localhost:9092, topics engagements, mode replica, start window\n"
        "time    Kafka message timestamp, max future skew 1m\n"
        "serve   RESP 0.0.0.0:7379 (AUTH required), admin off\n"
        "\n"
        "entity u, key a, b\n"
        "  m                max     value v\n"
        "    windows 10m (hop 10m, 2 buckets), 1h (hop 10m, 7 buckets)\n";
    assert_string_equal(text, want);
    free(text);
    tly_config_free(cfg);
}

/* "features:\n  - { ..., key: " then `depth` '[' (unclosed): the root
 * mapping, the feature list and the feature's mapping nest three deep
 * before the first '['. Caller frees. */
static char *nested_key(size_t depth)
{
    const char *head = "features:\n  - { name: c, entity: user, agg: count, windows: [1h], key: ";
    size_t hl = strlen(head);
    char *yaml = malloc(hl + depth + 2);
    assert_non_null(yaml);
    memcpy(yaml, head, hl);
    memset(yaml + hl, '[', depth);
    memcpy(yaml + hl + depth, "\n", 2);
    return yaml;
}

/* n top-level keys k0..k(n-1), or with list, "kafka:\n  topics:" and n items */
static char *many_entries(size_t n, bool list)
{
    size_t cap = 64 + 16 * n;
    char *yaml = malloc(cap);
    assert_non_null(yaml);
    size_t used = (size_t)snprintf(yaml, cap, "%s", list ? "kafka:\n  topics:\n" : "");
    for (size_t i = 0; i < n; i++)
        used += (size_t)snprintf(yaml + used, cap - used, list ? "    - t%zu\n" : "k%zu: 1\n", i);
    return yaml;
}

/* A long value is quoted by its first 60 bytes and "...", so the reason
 * after it survives (the whole message is cut at ERR_CAP). */
/* Aliases count as what they repeat: a few to one large mapping are
 * refused at once (the loader would walk it again at each); a small one
 * reused is fine. */
static void test_aliases_count_as_the_nodes_they_repeat(void **state)
{
    (void)state;
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    size_t cap = 200000, n = 0;
    char *yaml = malloc(cap);
    assert_non_null(yaml);
    n += (size_t)snprintf(yaml + n, cap - n,
                          "features:\n  - name: f0\n    entity: u\n    key: u\n    agg: count\n"
                          "    windows: [1h]\n    where: &w\n");
    for (int i = 0; i < 4000; i++) /* 8,001 nodes: the mapping, 4,000 keys and values */
        n += (size_t)snprintf(yaml + n, cap - n, "      k%d: x\n", i);
    for (int i = 1; i <= 8; i++) /* each alias repeats those 8,001 */
        n += (size_t)snprintf(yaml + n, cap - n,
                              "  - {name: f%d, entity: u, key: u, agg: count, windows: [1h], "
                              "where: *w}\n",
                              i);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_null(cfg);
    /* 8,018 nodes before the aliases (the 8,001 and 17 around them); each
     * feature line 8,014 more (13 of its own and the 8,001 its alias
     * repeats): 8,018 + 8 * 8,014 passes 65,536 on the 8th, line 4015 */
    assert_string_equal(err, "t.yaml:4015: the file stands for more than 65536 YAML nodes (an "
                             "alias counts as what it repeats); tallyd's configs need far fewer");
    free(yaml);
    static const char reused[] =
        "features:\n"
        "  - {name: a, entity: u, key: u, agg: count, windows: [1h], where: &w {k: x}}\n"
        "  - {name: b, entity: u, key: u, agg: count, windows: [1d], where: *w}\n";
    assert_int_equal(tly_config_load_string(reused, "t.yaml", &cfg, err, sizeof err), TLY_OK);
    tly_config_free(cfg);
}

static void test_a_long_value_is_quoted_short_in_its_error(void **state)
{
    (void)state;
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    char yaml[5100], want[256];
    size_t n = (size_t)snprintf(yaml, sizeof yaml, "server:\n  max_clients: ");
    memset(yaml + n, '9', 5000);
    yaml[n + 5000] = '\0';
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    char nines[61];
    memset(nines, '9', 60);
    nines[60] = '\0';
    snprintf(want, sizeof want, "t.yaml:2: server.max_clients: %s... is out of range (1..1000000)",
             nines);
    assert_string_equal(err, want);
    /* never half a UTF-8 character: after "x", "é" (two bytes) fills bytes
     * 1..60 in pairs, so byte 60 is the second of the 30th: 29 are kept */
    n = (size_t)snprintf(yaml, sizeof yaml, "kafka:\n  mode: \"x");
    for (int i = 0; i < 100; i++)
        n += (size_t)snprintf(yaml + n, sizeof yaml - n, "\xc3\xa9");
    snprintf(yaml + n, sizeof yaml - n, "\"\n");
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    char *q = strstr(err, "kafka.mode: \"");
    assert_non_null(q);
    q += strlen("kafka.mode: \"x");
    size_t e = 0;
    while (strncmp(q + e, "\xc3\xa9", 2) == 0)
        e += 2;
    assert_int_equal(e, 58);
    assert_memory_equal(q + e, "...\" is not one of", 18);
}

static void test_a_list_or_mapping_of_more_than_4096_entries_is_refused(void **state)
{
    (void)state;
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    char *yaml = many_entries(4097, false);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_null(cfg);
    assert_string_equal(err, "t.yaml:4097: the mapping from line 1 holds more than 4096 entries; "
                             "tallyd's longest lists hold its features, at most 1024");
    free(yaml);
    yaml = many_entries(100000, true);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_string_equal(err, "t.yaml:4099: the list from line 3 holds more than 4096 entries; "
                             "tallyd's longest lists hold its features, at most 1024");
    free(yaml);
    /* 4096 pass that check and meet the ordinary ones */
    yaml = many_entries(4096, false);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_non_null(strstr(err, "t.yaml:1: k0: unknown key"));
    free(yaml);
}

static void test_collections_nested_past_32_levels_are_refused_at_once(void **state)
{
    (void)state;
    char err[ERR_CAP] = "";
    tly_config_t *cfg = NULL;
    /* 100,000 levels: libyaml alone would scan them for about half a
     * minute; the refusal comes from the 33rd */
    for (size_t depth = 30; depth <= 100000; depth = depth == 30 ? 100000 : depth + 1) {
        char *yaml = nested_key(depth);
        assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err),
                         TLY_E_CONFIG);
        assert_null(cfg);
        assert_string_equal(err, "t.yaml:2: lists and mappings nest deeper than 32 levels; "
                                 "tallyd's keys nest at most six");
        free(yaml);
    }
    /* 29 + 3 = 32 levels pass the depth check and meet the YAML error of
     * the unclosed lists */
    char *yaml = nested_key(29);
    assert_int_equal(tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err), TLY_E_CONFIG);
    assert_non_null(strstr(err, "YAML syntax error"));
    free(yaml);
}

static void test_free_accepts_null(void **state)
{
    (void)state;
    tly_config_free(NULL);
}

/* ------------------------------------------------------------------------- */

int main(void)
{
    static const struct CMUnitTest fixed[] = {
        cmocka_unit_test(test_example_yaml_loads_with_its_written_values),
        cmocka_unit_test(test_demo_yaml_loads_twelve_features_over_user_and_pin),
        cmocka_unit_test(test_every_bad_config_file_has_an_expected_message),
        cmocka_unit_test(test_missing_file_is_io_error_naming_it),
        cmocka_unit_test(test_error_message_is_truncated_to_errlen),
        cmocka_unit_test(test_omitted_sections_take_documented_defaults),
        cmocka_unit_test(test_null_values_and_sections_keep_defaults),
        cmocka_unit_test(test_every_key_can_be_set),
        cmocka_unit_test(test_time_unit_defaults_to_ms_when_time_is_given),
        cmocka_unit_test(test_topics_inherit_top_level_events_settings),
        cmocka_unit_test(test_topic_mapping_overrides_events_settings),
        cmocka_unit_test(test_properties_map_keeps_values_as_text_in_order),
        cmocka_unit_test(test_single_value_stands_for_a_one_item_list),
        cmocka_unit_test(test_explicit_hop_dividing_every_window_is_kept),
        cmocka_unit_test(test_where_keeps_fields_values_and_lines),
        cmocka_unit_test(test_same_feature_name_in_two_entities_is_allowed),
        cmocka_unit_test(test_loopback_and_password_protected_listen_are_accepted),
        cmocka_unit_test(test_loopback_lookalike_and_overlong_password_are_errors),
        cmocka_unit_test(test_zero_duration_is_out_of_range),
        cmocka_unit_test(test_duration_parse_accepts_every_unit),
        cmocka_unit_test(test_duration_parse_rejects_malformed_text_without_writing),
        cmocka_unit_test(test_duration_parse_reports_overflow_as_range),
        cmocka_unit_test(test_duration_format_uses_shortest_exact_unit),
        cmocka_unit_test(test_duration_format_round_trips_through_parse),
        cmocka_unit_test(test_duration_format_truncates_to_cap),
        cmocka_unit_test(test_help_mentions_every_key_with_type_and_default),
        cmocka_unit_test(test_help_markdown_is_one_table_row_per_key),
        cmocka_unit_test(test_bulk_larger_than_query_buffer_is_error),
        cmocka_unit_test(test_null_list_items_and_nul_in_keys_are_errors),
        cmocka_unit_test(test_client_limits_larger_than_all_clients_memory_are_errors),
        cmocka_unit_test(test_summary_lists_source_time_and_features_with_hops),
        cmocka_unit_test(test_summary_shows_explicit_hop_and_kafka_time),
        cmocka_unit_test(test_collections_nested_past_32_levels_are_refused_at_once),
        cmocka_unit_test(test_a_list_or_mapping_of_more_than_4096_entries_is_refused),
        cmocka_unit_test(test_a_long_value_is_quoted_short_in_its_error),
        cmocka_unit_test(test_aliases_count_as_the_nodes_they_repeat),
        cmocka_unit_test(test_free_accepts_null),
    };
    /* The table-driven error cases become one named test each. */
    static struct CMUnitTest tests[NELEMS(fixed) + NELEMS(bad_files) + NELEMS(bad_strings)];
    size_t n = 0;
    for (size_t i = 0; i < NELEMS(fixed); i++)
        tests[n++] = fixed[i];
    for (size_t i = 0; i < NELEMS(bad_files); i++)
        tests[n++] = (struct CMUnitTest){.name = bad_files[i].test,
                                         .test_func = test_bad_file,
                                         .initial_state = (void *)&bad_files[i]};
    for (size_t i = 0; i < NELEMS(bad_strings); i++)
        tests[n++] = (struct CMUnitTest){.name = bad_strings[i].test,
                                         .test_func = test_bad_string,
                                         .initial_state = (void *)&bad_strings[i]};
    assert_true(n == NELEMS(tests));
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
