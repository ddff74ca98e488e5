/*
 * test_commands.c — the command table and handlers, without sockets: a
 * store filled with hand-made events, commands executed through
 * tly_command_exec, replies compared byte for byte with RESP written out by
 * hand (values computed from the events and the window rule of DESIGN §3,
 * not by the code under test).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/commands.h"
#include "tallyd/decode.h"
#include "tallyd/rcu.h"

#define SEC  INT64_C(1000)
#define MIN  (60 * SEC)
#define HOUR (60 * MIN)
/* A time aligned to every hop used below (a whole day in epoch ms). */
#define T INT64_C(1699920000000)

static const char *yaml =
    "events:\n"
    "  time: { field: ts, unit: ms }\n"
    "features:\n"
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
    " windows: [1m, 1h] }\n"
    "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, windows: [1h] }\n"
    "  - { name: avg_dwell, entity: user, key: user_id, agg: avg, value: dwell_ms,"
    " windows: [1h] }\n"
    "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 3, value: [pin_id, action] }\n"
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
    " agg: count, windows: [1h] }\n";

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_daemon_t d;
    tly_session_t s;
    tly_cmd_scratch_t *scratch;
    tly_buf_t out;
} fx_t;

/* user 7's events (pin, action, dwell, age): e1 click 30 s ago, e2 impression
 * 2 min ago, e3 click 10 min ago, e4 save 2 h ago (outside every 1h window;
 * pushed out of last_k by the three newer ones). */
static const char *events[] = {
    "{\"user_id\":7,\"pin_id\":103,\"action\":\"save\",\"dwell_ms\":500,\"ts\":1699912800000}",
    "{\"user_id\":7,\"pin_id\":102,\"action\":\"click\",\"dwell_ms\":3000,\"ts\":1699919400000}",
    "{\"user_id\":7,\"pin_id\":101,\"action\":\"impression\",\"dwell_ms\":200,"
    "\"ts\":1699919880000}",
    "{\"user_id\":7,\"pin_id\":100,\"action\":\"click\",\"dwell_ms\":1000,\"ts\":1699919970000}",
};

static int setup_yaml(void **state, const char *extra, const char *features,
                      const char *const *evs, size_t nevs)
{
    fx_t *fx = calloc(1, sizeof *fx);
    char err[256], text[4096];
    snprintf(text, sizeof text, "%s%s", extra, features);
    if (tly_config_load_string(text, "commands.yaml", &fx->cfg, err, sizeof err) != TLY_OK ||
        tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    tly_rcu_thread_online();
    fx->d.cfg = fx->cfg;
    fx->d.fs = fx->fs;
    fx->d.store = tly_store_new(fx->fs);
    fx->d.started_ms = T;
    atomic_init(&fx->d.server.next_client_id, 1);
    tly_decoder_t *dec = tly_decoder_new(fx->fs);
    for (size_t i = 0; i < nevs; i++) {
        tly_event_t ev;
        if (tly_decode_json(dec, evs[i], strlen(evs[i]), -1, &ev) != TLY_OK)
            return -1;
        tly_store_apply(fx->d.store, &ev, 0, (int64_t)i, T);
    }
    tly_decoder_free(dec);
    tly_session_init(&fx->s, &fx->d);
    fx->s.id = 42;
    fx->scratch = tly_cmd_scratch_new();
    *state = fx;
    return 0;
}

static int setup_with(void **state, const char *extra)
{
    return setup_yaml(state, extra, yaml, events, sizeof events / sizeof events[0]);
}

static int setup(void **state)
{
    return setup_with(state, "");
}

static int setup_auth(void **state)
{
    return setup_with(state, "server:\n  requirepass: s3cret\n");
}

/* A last_k over a float field, for WHERE on doubles. */
static int setup_scores(void **state)
{
    static const char *const evs[] = {
        "{\"user_id\":1,\"score\":0.1,\"ts\":1699919990000}",
        "{\"user_id\":1,\"score\":2.5,\"ts\":1699919995000}",
    };
    return setup_yaml(state, "server:\n  max_reply_values: 1000\n",
                      "events:\n  time: { field: ts, unit: ms }\nfeatures:\n"
                      "  - { name: scores, entity: user, key: user_id, agg: last_k, k: 2,"
                      " value: [score] }\n"
                      "  - { name: n, entity: user, key: user_id, agg: count,"
                      " windows: [1m, 1h] }\n",
                      evs, 2);
}

/* User 8: three events before T (pins 1..3 at T - 3m, - 2m, - 1m) and four
 * accepted ahead of it (pins 4..7 at T + 10, 20, 30, 40 s, within the 1m
 * skew), all applied at T. */
static int setup_ahead(void **state)
{
    static const char *const evs[] = {
        "{\"user_id\":8,\"pin_id\":1,\"action\":\"click\",\"ts\":1699919820000}",
        "{\"user_id\":8,\"pin_id\":2,\"action\":\"save\",\"ts\":1699919880000}",
        "{\"user_id\":8,\"pin_id\":3,\"action\":\"click\",\"ts\":1699919940000}",
        "{\"user_id\":8,\"pin_id\":4,\"action\":\"hide\",\"ts\":1699920010000}",
        "{\"user_id\":8,\"pin_id\":5,\"action\":\"click\",\"ts\":1699920020000}",
        "{\"user_id\":8,\"pin_id\":6,\"action\":\"save\",\"ts\":1699920030000}",
        "{\"user_id\":8,\"pin_id\":7,\"action\":\"click\",\"ts\":1699920040000}",
    };
    return setup_yaml(state, "", yaml, evs, sizeof evs / sizeof evs[0]);
}

static int teardown(void **state)
{
    fx_t *fx = *state;
    tly_cmd_scratch_free(fx->scratch);
    tly_buf_fini(&fx->out);
    tly_store_free(fx->d.store);
    tly_featset_free(fx->fs);
    tly_config_free(fx->cfg);
    tly_rcu_thread_offline();
    free(fx);
    return 0;
}

/* Splits `words` (modified) at spaces into argv; returns the count. */
static size_t split_words(char *words, tly_arg_t *argv, size_t cap)
{
    size_t argc = 0;
    for (char *save = NULL, *w = strtok_r(words, " ", &save); w != NULL;
         w = strtok_r(NULL, " ", &save)) {
        assert_true(argc < cap);
        argv[argc++] = (tly_arg_t){w, strlen(w)};
    }
    return argc;
}

/* Runs a command given as space-separated words at time now; returns the
 * reply (valid until the next call). */
static const char *run_at(fx_t *fx, int64_t now, const char *line)
{
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", line);
    tly_arg_t argv[600];
    size_t argc = split_words(copy, argv, 600);
    fx->out.len = 0;
    tly_command_exec(&fx->d, &fx->s, fx->scratch, argv, argc, &fx->out, now);
    tly_buf_append(&fx->out, "", 1);
    fx->out.len--;
    return fx->out.data;
}

static const char *run(fx_t *fx, const char *line)
{
    return run_at(fx, T, line);
}

/* tly_command_hint's pf for a command given as words (as run_at). */
static tly_prefetch_t hint(fx_t *fx, const char *line)
{
    char copy[256];
    snprintf(copy, sizeof copy, "%s", line);
    tly_arg_t argv[16];
    size_t argc = split_words(copy, argv, 16);
    tly_prefetch_t pf;
    pf.n = 99;
    tly_rcu_read_lock();
    tly_command_hint(&fx->d, &fx->s, argv, argc, &pf);
    tly_rcu_read_unlock();
    return pf;
}

/* The server hints the store about the entity a read names: the id after
 * the entity type for FEATURES and RECENT, the first id for MFEATURES (so
 * one user hints alike through all three, another user otherwise), and
 * nothing for other commands, an unknown entity type or too few
 * arguments. */
static void test_hint_names_the_entity_a_read_will_ask_for(void **state)
{
    fx_t *fx = *state;
    tly_prefetch_t f7 = hint(fx, "FEATURES user 7");
    assert_int_equal(f7.n, 1);
    tly_prefetch_t r7 = hint(fx, "recent user 7 clicks");
    assert_int_equal(r7.n, 1);
    assert_true(r7.h[0] == f7.h[0]);
    tly_prefetch_t m7 = hint(fx, "MFEATURES user 2 7 8 clicks:1h");
    assert_int_equal(m7.n, 1);
    assert_true(m7.h[0] == f7.h[0]);
    tly_prefetch_t f8 = hint(fx, "FEATURES user 8 clicks:1h");
    assert_int_equal(f8.n, 1);
    assert_true(f8.h[0] != f7.h[0]);
    assert_int_equal(hint(fx, "PING").n, 0);
    assert_int_equal(hint(fx, "ECHO user 7").n, 0);
    assert_int_equal(hint(fx, "FEATURES board 7").n, 0);
    assert_int_equal(hint(fx, "FEATURES user").n, 0);
    assert_int_equal(hint(fx, "MFEATURES user 1").n, 0);
}

/* Before AUTH nothing is hinted. */
static void test_hint_waits_for_auth(void **state)
{
    fx_t *fx = *state;
    assert_int_equal(hint(fx, "FEATURES user 7").n, 0);
    run(fx, "AUTH s3cret");
    assert_int_equal(hint(fx, "FEATURES user 7").n, 1);
}

static void test_recent_where_compares_doubles_as_numbers(void **state)
{
    fx_t *fx = *state;
    assert_string_equal(run(fx, "RECENT user 1 scores WHERE 0.1"),
                        "*1\r\n*2\r\n:1699919990000\r\n$3\r\n0.1\r\n");
    assert_string_equal(run(fx, "RECENT user 1 scores WHERE 2.50"),
                        "*1\r\n*2\r\n:1699919995000\r\n$3\r\n2.5\r\n");
    assert_string_equal(run(fx, "RECENT user 1 scores WHERE 0.2"), "*0\r\n");
    /* 2.5 in C's hexadecimal, infinity and NaN spellings: not numbers here */
    assert_string_equal(run(fx, "RECENT user 1 scores WHERE 0x1.4p+1"), "*0\r\n");
    assert_string_equal(run(fx, "RECENT user 1 scores WHERE 0X1.4P1"), "*0\r\n");
    assert_string_equal(run(fx, "RECENT user 1 scores WHERE 25e-1"),
                        "*1\r\n*2\r\n:1699919995000\r\n$3\r\n2.5\r\n");
}

/* user 1's two events lie in both windows of n. 2 windows × 500 names × 1
 * id = 1000 values fit; 1002 do not. */
static void test_reply_larger_than_max_reply_values_is_refused(void **state)
{
    fx_t *fx = *state;
    char line[8192];
    size_t used = (size_t)snprintf(line, sizeof line, "MFEATURES user 1 1");
    for (int i = 0; i < 500; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, " n");
    assert_memory_equal(run(fx, line), "*1\r\n*1000\r\n:2\r\n:2\r\n", 18);
    used = (size_t)snprintf(line, sizeof line, "MFEATURES user 3 1 2 3 n");
    assert_string_equal(run(fx, line), "*3\r\n*2\r\n:2\r\n:2\r\n*2\r\n:0\r\n:0\r\n"
                                       "*2\r\n:0\r\n:0\r\n");
    used = (size_t)snprintf(line, sizeof line, "MFEATURES user 501 1");
    for (int i = 0; i < 500; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, " %d", i);
    snprintf(line + used, sizeof line - used, " n");
    assert_string_equal(run(fx, line), "-ERR MFEATURES asks for 1002 values; at most 1000 "
                                       "(server.max_reply_values)\r\n");
    /* FEATURES takes each name once: 501 × n is n's two windows */
    used = (size_t)snprintf(line, sizeof line, "FEATURES user 1");
    for (int i = 0; i < 501; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, " n");
    assert_string_equal(run(fx, line), "*4\r\n$4\r\nn:1m\r\n:2\r\n$4\r\nn:1h\r\n:2\r\n");
}

/* What redis-benchmark and clients ask: glob patterns, as Redis takes. */
static void test_config_get_globs_and_arity(void **state)
{
    fx_t *fx = *state;
    assert_string_equal(run(fx, "CONFIG GET"),
                        "-ERR wrong number of arguments for 'config|get' command\r\n");
    assert_string_equal(run(fx, "CONFIG GET maxclients"),
                        "*2\r\n$10\r\nmaxclients\r\n$5\r\n10000\r\n");
    assert_string_equal(run(fx, "CONFIG GET MAX*"), "*2\r\n$10\r\nmaxclients\r\n$5\r\n10000\r\n");
    assert_string_equal(run(fx, "CONFIG GET *a?e* nosuch"),
                        "*4\r\n$4\r\nsave\r\n$0\r\n\r\n$9\r\ndatabases\r\n$1\r\n1\r\n");
    assert_memory_equal(run(fx, "CONFIG GET *"), "*10\r\n", 5);
    assert_string_equal(run(fx, "CONFIG GET nosuch"), "*0\r\n");
    assert_memory_equal(run(fx, "CONFIG SET timeout 0"), "-ERR tallyd is configured", 25);
}

/* COMMAND DOCS describes arguments as Redis 7 does, which redis-cli turns
 * into its hints ("RECENT entity id name [COUNT n] ..."). */
static void test_command_docs_describe_arguments(void **state)
{
    fx_t *fx = *state;
    const char *r = run(fx, "COMMAND DOCS recent");
    assert_memory_equal(r, "*2\r\n$6\r\nrecent\r\n*8\r\n$7\r\nsummary\r\n", 31);
    static const char *const want[] = {
        "$9\r\narguments\r\n*7\r\n*4\r\n$4\r\nname\r\n$6\r\nentity\r\n$4\r\ntype\r\n$"
        "6\r\nstring\r\n",
        "*8\r\n$4\r\nname\r\n$1\r\nn\r\n$4\r\ntype\r\n$7\r\ninteger\r\n$5\r\ntoken\r\n$"
        "5\r\nCOUNT\r\n"
        "$5\r\nflags\r\n*1\r\n+optional\r\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (strstr(r, want[i]) == NULL)
            fail_msg("COMMAND DOCS recent lacks \"%s\":\n%s", want[i], r);
    /* a block (HELLO's AUTH) nests its own arguments; no arguments, no key */
    assert_non_null(strstr(run(fx, "COMMAND DOCS hello"),
                           "$5\r\ntoken\r\n$4\r\nAUTH\r\n$5\r\nflags\r\n*1\r\n+optional\r\n"
                           "$9\r\narguments\r\n*2\r\n*4\r\n$4\r\nname\r\n$8\r\nusername\r\n"));
    assert_null(strstr(run(fx, "COMMAND DOCS catalog"), "arguments"));
}

static int setup_small_output(void **state)
{
    return setup_with(state, "server:\n  max_output_buffer: 65536\n  output_soft_limit: 4096\n");
}

/* MFEATURES stops building its reply once the client's queued output passes
 * server.max_output_buffer (the server then disconnects it), instead of
 * holding the whole reply first. */
static void test_mfeatures_stops_at_the_output_cap(void **state)
{
    fx_t *fx = *state;
    char line[4096];
    size_t used = (size_t)snprintf(line, sizeof line, "MFEATURES user 500");
    for (int i = 0; i < 500; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, " %d", 7 + i % 2);
    fx->s.obuf = 0;
    size_t whole = strlen(run(fx, line));
    assert_true(whole > 15000 && whole < 65536);
    fx->s.obuf = 65536 - 4000; /* already queued before the command */
    size_t cut = strlen(run(fx, line));
    assert_true(cut > 4000 && cut < 4000 + 200); /* one id's values past the cap at most */
}

static void test_ping_echo_and_unknown_command(void **state)
{
    fx_t *fx = *state;
    assert_string_equal(run(fx, "PING"), "+PONG\r\n");
    assert_string_equal(run(fx, "ping hello"), "$5\r\nhello\r\n");
    assert_string_equal(run(fx, "ECHO abc"), "$3\r\nabc\r\n");
    assert_string_equal(run(fx, "ECHO"), "-ERR wrong number of arguments for 'echo' command\r\n");
    assert_string_equal(run(fx, "SET a b"),
                        "-ERR unknown command 'SET', with args beginning with: 'a' 'b' \r\n");
    assert_string_equal(run(fx, "SELECT 0"), "+OK\r\n");
    assert_string_equal(run(fx, "SELECT 1"), "-ERR DB index is out of range\r\n");
    assert_string_equal(run(fx, "SELECT 00"), "-ERR value is not an integer or out of range\r\n");
}

static void test_features_all_resp2_flat_pairs(void **state)
{
    fx_t *fx = *state;
    /* clicks:1m = e1; clicks:1h = e1, e3; dwell:1h = 1000+200+3000; avg = 4200/3;
     * recent holds e1..e3 (k = 3); last_action = e1's action. */
    assert_string_equal(run(fx, "FEATURES user 7"),
                        "*12\r\n"
                        "$9\r\nclicks:1m\r\n:1\r\n"
                        "$9\r\nclicks:1h\r\n:2\r\n"
                        "$8\r\ndwell:1h\r\n:4200\r\n"
                        "$12\r\navg_dwell:1h\r\n$4\r\n1400\r\n"
                        "$6\r\nrecent\r\n:3\r\n"
                        "$11\r\nlast_action\r\n$5\r\nclick\r\n");
}

static void test_features_resp3_is_a_map_with_doubles(void **state)
{
    fx_t *fx = *state;
    assert_memory_equal(run(fx, "HELLO 3"), "%7\r\n$6\r\nserver\r\n$6\r\ntallyd\r\n", 27);
    assert_string_equal(run(fx, "FEATURES user 7 avg_dwell clicks:1h last_action"),
                        "%3\r\n"
                        "$12\r\navg_dwell:1h\r\n,1400\r\n"
                        "$9\r\nclicks:1h\r\n:2\r\n"
                        "$11\r\nlast_action\r\n$5\r\nclick\r\n");
    /* an unknown id: zeros and nulls, not an error */
    assert_string_equal(run(fx, "FEATURES user 999 clicks avg_dwell last_action"),
                        "%4\r\n$9\r\nclicks:1m\r\n:0\r\n$9\r\nclicks:1h\r\n:0\r\n"
                        "$12\r\navg_dwell:1h\r\n_\r\n$11\r\nlast_action\r\n_\r\n");
    /* a name asked twice is one key of the map, in its first place */
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1h clicks last_action clicks:1h"),
                        "%3\r\n$9\r\nclicks:1h\r\n:2\r\n$9\r\nclicks:1m\r\n:1\r\n"
                        "$11\r\nlast_action\r\n$5\r\nclick\r\n");
    /* and a request that failed after naming it leaves no trace */
    assert_memory_equal(run(fx, "FEATURES user 7 clicks:1h ASOF x"), "-ERR", 4);
    assert_memory_equal(run(fx, "FEATURES user 7 clicks:1h nosuch"), "-NOFEATURE", 10);
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1h"), "%1\r\n$9\r\nclicks:1h\r\n:2\r\n");
    /* MFEATURES answers values in the order asked, repeats included */
    assert_string_equal(run(fx, "MFEATURES user 2 7 999 clicks:1h clicks:1h"),
                        "*2\r\n*2\r\n:2\r\n:2\r\n*2\r\n:0\r\n:0\r\n");
}

static void test_features_asof_moves_the_windows(void **state)
{
    fx_t *fx = *state;
    /* 40 s later e1 (30 s old at T) is 70 s old: outside [now-60s, now+1s). */
    assert_string_equal(run_at(fx, T + 40 * SEC, "FEATURES user 7 clicks:1m"),
                        "*2\r\n$9\r\nclicks:1m\r\n:0\r\n");
    /* ASOF T (given explicitly) brings it back. */
    assert_string_equal(run_at(fx, T + 40 * SEC, "FEATURES user 7 clicks:1m ASOF 1699920000000"),
                        "*2\r\n$9\r\nclicks:1m\r\n:1\r\n");
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1m ASOF x"),
                        "-ERR syntax error: ASOF needs epoch milliseconds, got 'x'\r\n");
    /* integers in their one spelling only, as Redis takes them */
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1m ASOF 01699920000000"),
                        "-ERR syntax error: ASOF needs epoch milliseconds, got "
                        "'01699920000000'\r\n");
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1m ASOF -0"),
                        "-ERR syntax error: ASOF needs epoch milliseconds, got '-0'\r\n");
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1m ASOF +1"),
                        "-ERR syntax error: ASOF needs epoch milliseconds, got '+1'\r\n");
    assert_string_equal(run_at(fx, T + 40 * SEC, "FEATURES user 7 clicks:1m ASOF 0"),
                        "*2\r\n$9\r\nclicks:1m\r\n:0\r\n");
    assert_string_equal(run(fx, "FEATURES user 7 ASOF 1 clicks"),
                        "-ERR syntax error: feature names come before ASOF and META, got "
                        "'clicks'\r\n");
    assert_string_equal(run(fx, "FEATURES user 7 ASOF 1 ASOF 2"),
                        "-ERR syntax error: ASOF given twice\r\n");
    assert_string_equal(run(fx, "FEATURES user 7 META meta"),
                        "-ERR syntax error: META given twice\r\n");
}

static void test_features_meta_without_source(void **state)
{
    fx_t *fx = *state;
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1h META"),
                        "*8\r\n$9\r\nclicks:1h\r\n:2\r\n"
                        "$18\r\nmeta:last_event_ms\r\n:1699919970000\r\n"
                        "$17\r\nmeta:watermark_ms\r\n:-1\r\n"
                        "$8\r\nmeta:lag\r\n:-1\r\n");
    assert_string_equal(run(fx, "FEATURES user 8 clicks:1h meta"),
                        "*8\r\n$9\r\nclicks:1h\r\n:0\r\n"
                        "$18\r\nmeta:last_event_ms\r\n:-1\r\n"
                        "$17\r\nmeta:watermark_ms\r\n:-1\r\n"
                        "$8\r\nmeta:lag\r\n:-1\r\n");
}

static void test_features_errors_name_entity_and_feature(void **state)
{
    fx_t *fx = *state;
    assert_string_equal(run(fx, "FEATURES board 1"),
                        "-NOENTITY unknown entity type 'board' (known: user, pin)\r\n");
    assert_string_equal(run(fx, "FEATURES user 7 clicks:2h"),
                        "-NOFEATURE user has no feature 'clicks:2h' (CATALOG lists them)\r\n");
    assert_string_equal(run(fx, "FEATURES pin 7 clicks"),
                        "-NOFEATURE pin has no feature 'clicks' (CATALOG lists them)\r\n");
    assert_string_equal(run(fx, "FEATURES user"),
                        "-ERR wrong number of arguments for 'features' command\r\n");
    assert_string_equal(run(fx, "FEATURES pin 101"), "*2\r\n$14\r\nimpressions:1h\r\n:1\r\n");
}

static void test_mfeatures_aligns_ids_and_names(void **state)
{
    fx_t *fx = *state;
    assert_string_equal(run(fx, "MFEATURES user 2 7 999 clicks:1h last_action"),
                        "*2\r\n*2\r\n:2\r\n$5\r\nclick\r\n*2\r\n:0\r\n$-1\r\n");
    assert_string_equal(run(fx, "MFEATURES pin 3 100 101 102"),
                        "*3\r\n*1\r\n:0\r\n*1\r\n:1\r\n*1\r\n:0\r\n");
    assert_string_equal(run(fx, "MFEATURES pin 3 100 101"),
                        "-ERR syntax error: fewer ids than numids\r\n");
    assert_string_equal(run(fx, "MFEATURES pin 0 100"),
                        "-ERR syntax error: numids must be a positive integer, got '0'\r\n");
    /* META is FEATURES's: MFEATURES says so wherever it stands, rather
     * than looking for a feature called META or asking for it before ASOF */
    const char *no_meta = "-ERR syntax error: MFEATURES takes no META (FEATURES does), got "
                          "'META'\r\n";
    assert_string_equal(run(fx, "MFEATURES user 1 7 META"), no_meta);
    assert_string_equal(run(fx, "MFEATURES user 1 7 clicks:1h META"), no_meta);
    assert_string_equal(run(fx, "MFEATURES user 1 7 ASOF 5 META"), no_meta);
    /* 500 ids, as a ranker asks for its candidates */
    char line[4096];
    size_t used = (size_t)snprintf(line, sizeof line, "MFEATURES pin 500");
    for (int i = 0; i < 500; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, " %d", i < 250 ? 101 : 5);
    snprintf(line + used, sizeof line - used, " impressions:1h");
    const char *r = run(fx, line);
    char want[8192];
    used = (size_t)snprintf(want, sizeof want, "*500\r\n");
    for (int i = 0; i < 500; i++)
        used += (size_t)snprintf(want + used, sizeof want - used, "*1\r\n:%d\r\n", i < 250);
    assert_string_equal(r, want);
}

/* An ASOF answers as a read at the clock at that time would: last and
 * last_k take the k newest items at or before it, whether the clock is
 * before it, at it or after it; the items accepted ahead of the clock do
 * not push out those before. */
static void test_asof_last_and_last_k_answer_as_the_clock_would(void **state)
{
    fx_t *fx = *state;
    const char *p3 = "*3\r\n:1699919940000\r\n:3\r\n$5\r\nclick\r\n";
    const char *p2 = "*3\r\n:1699919880000\r\n:2\r\n$4\r\nsave\r\n";
    const char *p1 = "*3\r\n:1699919820000\r\n:1\r\n$5\r\nclick\r\n";
    const char *p5 = "*3\r\n:1699920020000\r\n:5\r\n$5\r\nclick\r\n";
    const char *p4 = "*3\r\n:1699920010000\r\n:4\r\n$4\r\nhide\r\n";
    char before[512], later[512];
    snprintf(before, sizeof before, "*3\r\n%s%s%s", p3, p2, p1);
    snprintf(later, sizeof later, "*3\r\n%s%s%s", p5, p4, p3);
    assert_string_equal(run_at(fx, T, "RECENT user 8 recent"), before);
    assert_string_equal(run_at(fx, T, "RECENT user 8 recent ASOF 1699920000000"), before);
    assert_string_equal(run_at(fx, T, "RECENT user 8 recent ASOF 1699920000001"), before);
    assert_string_equal(run_at(fx, T - MIN, "RECENT user 8 recent ASOF 1699920000001"), before);
    assert_string_equal(run_at(fx, T + HOUR, "RECENT user 8 recent ASOF 1699920000001"), before);
    /* at T + 25 s: pins 5 and 4, then 3 */
    assert_string_equal(run_at(fx, T + 25 * SEC, "RECENT user 8 recent"), later);
    assert_string_equal(run_at(fx, T, "RECENT user 8 recent ASOF 1699920025000"), later);
    /* FEATURES: the count and the newest action alike */
    const char *at_t = "*4\r\n$6\r\nrecent\r\n:3\r\n$11\r\nlast_action\r\n$5\r\nclick\r\n";
    assert_string_equal(run_at(fx, T, "FEATURES user 8 recent last_action"), at_t);
    assert_string_equal(run_at(fx, T, "FEATURES user 8 recent last_action ASOF 1699920000001"),
                        at_t);
    assert_string_equal(run_at(fx, T, "FEATURES user 8 recent last_action ASOF 1699920015000"),
                        "*4\r\n$6\r\nrecent\r\n:3\r\n$11\r\nlast_action\r\n$4\r\nhide\r\n");
    /* before them all: nothing */
    assert_string_equal(run_at(fx, T, "RECENT user 8 recent ASOF 1699919819999"), "*0\r\n");
}

static void test_recent_items_newest_first_with_options(void **state)
{
    fx_t *fx = *state;
    const char *e1 = "*3\r\n:1699919970000\r\n:100\r\n$5\r\nclick\r\n";
    const char *e2 = "*3\r\n:1699919880000\r\n:101\r\n$10\r\nimpression\r\n";
    const char *e3 = "*3\r\n:1699919400000\r\n:102\r\n$5\r\nclick\r\n";
    char want[512];
    snprintf(want, sizeof want, "*3\r\n%s%s%s", e1, e2, e3);
    assert_string_equal(run(fx, "RECENT user 7 recent"), want);
    snprintf(want, sizeof want, "*2\r\n%s%s", e1, e2);
    assert_string_equal(run(fx, "RECENT user 7 recent COUNT 2"), want);
    snprintf(want, sizeof want, "*2\r\n%s%s", e1, e3);
    assert_string_equal(run(fx, "RECENT user 7 recent WHERE click"), want);
    snprintf(want, sizeof want, "*1\r\n%s", e2);
    assert_string_equal(run(fx, "RECENT user 7 recent where 101"), want);
    snprintf(want, sizeof want, "*2\r\n%s%s", e1, e2);
    assert_string_equal(run(fx, "RECENT user 7 recent SINCE 1699919880000"), want);
    /* the 3 newest at or before the ASOF: e4 (2 h ago) is back */
    const char *e4 = "*3\r\n:1699912800000\r\n:103\r\n$4\r\nsave\r\n";
    snprintf(want, sizeof want, "*3\r\n%s%s%s", e2, e3, e4);
    assert_string_equal(run(fx, "RECENT user 7 recent ASOF 1699919900000"), want);
    assert_string_equal(run(fx, "RECENT user 7 last_action"),
                        "*1\r\n*2\r\n:1699919970000\r\n$5\r\nclick\r\n");
    assert_string_equal(run(fx, "RECENT user 999 recent"), "*0\r\n");
    assert_string_equal(run(fx, "RECENT user 7 clicks"),
                        "-NOFEATURE user feature 'clicks' is not a last or last_k feature\r\n");
    assert_string_equal(run(fx, "RECENT user 7 nosuch"),
                        "-NOFEATURE user has no feature 'nosuch' (CATALOG lists them)\r\n");
    assert_string_equal(run(fx, "RECENT user 7 recent COUNT 1 COUNT 2"),
                        "-ERR syntax error: count given twice\r\n");
    assert_string_equal(run(fx, "RECENT user 7 recent LIMIT 2"),
                        "-ERR syntax error: RECENT takes COUNT, SINCE, ASOF or WHERE, got "
                        "'LIMIT'\r\n");
}

static void test_catalog_lists_entities_and_features(void **state)
{
    fx_t *fx = *state;
    const char *r = run(fx, "CATALOG");
    const char *want_start = "*2\r\n*6\r\n$6\r\nentity\r\n$4\r\nuser\r\n$3\r\nkey\r\n*1\r\n$7\r\n"
                             "user_id\r\n$8\r\nfeatures\r\n*5\r\n*12\r\n$4\r\nname\r\n$6\r\n"
                             "clicks\r\n$3\r\nagg\r\n$5\r\ncount\r\n$5\r\nvalue\r\n*0\r\n$7\r\n"
                             "windows\r\n*2\r\n$2\r\n1m\r\n$2\r\n1h\r\n$4\r\nhops\r\n*2\r\n$2\r\n"
                             "1s\r\n$2\r\n1m\r\n$1\r\nk\r\n:0\r\n";
    assert_memory_equal(r, want_start, strlen(want_start));
    assert_non_null(strstr(r, "$4\r\nname\r\n$6\r\nrecent\r\n$3\r\nagg\r\n$6\r\nlast_k\r\n"
                              "$5\r\nvalue\r\n*2\r\n$6\r\npin_id\r\n$6\r\naction\r\n$7\r\n"
                              "windows\r\n*0\r\n$4\r\nhops\r\n*0\r\n$1\r\nk\r\n:3\r\n"));
}

static void test_client_and_hello_commands(void **state)
{
    fx_t *fx = *state;
    assert_string_equal(run(fx, "CLIENT ID"), ":42\r\n");
    assert_string_equal(run(fx, "CLIENT GETNAME"), "$-1\r\n");
    assert_string_equal(run(fx, "CLIENT SETNAME ranker-1"), "+OK\r\n");
    assert_string_equal(run(fx, "CLIENT GETNAME"), "$8\r\nranker-1\r\n");
    assert_string_equal(run(fx, "CLIENT SETINFO LIB-NAME redis-py"), "+OK\r\n");
    assert_non_null(strstr(run(fx, "CLIENT INFO"), "id=42 addr="));
    assert_non_null(strstr(run(fx, "CLIENT INFO"), " name=ranker-1 "));
    assert_non_null(strstr(run(fx, "CLIENT INFO"), " cmd=client "));
    /* without a server (this fixture) CLIENT LIST and KILL see this session */
    assert_non_null(strstr(run(fx, "CLIENT LIST"), "id=42 addr="));
    assert_non_null(strstr(run(fx, "CLIENT LIST ID 42"), " name=ranker-1 "));
    assert_string_equal(run(fx, "CLIENT LIST ID 43"), "$0\r\n\r\n");
    assert_string_equal(run(fx, "CLIENT LIST TYPE pubsub"), "$0\r\n\r\n");
    assert_string_equal(run(fx, "CLIENT LIST ID x"), "-ERR Invalid client ID\r\n");
    assert_string_equal(run(fx, "CLIENT LIST FOO"), "-ERR syntax error\r\n");
    assert_string_equal(run(fx, "CLIENT KILL ID 42"), ":0\r\n"); /* SKIPME yes */
    assert_string_equal(run(fx, "CLIENT KILL ID 0"), "-ERR client-id should be greater than 0\r\n");
    assert_string_equal(run(fx, "CLIENT KILL MAXAGE 5"), "-ERR syntax error\r\n");
    assert_string_equal(run(fx, "CLIENT KILL ID 42 SKIPME"), "-ERR syntax error\r\n");
    assert_string_equal(run(fx, "CLIENT KILL 10.0.0.1:5"), "-ERR No such client\r\n");
    assert_false(fx->s.close_after);
    assert_string_equal(run(fx, "CLIENT KILL ID 42 SKIPME no"), ":1\r\n");
    assert_true(fx->s.close_after); /* closed once the reply is written */
    fx->s.close_after = false;
    assert_string_equal(run(fx, "HELLO 4"), "-NOPROTO unsupported protocol version\r\n");
    assert_string_equal(run(fx, "HELLO 2 SETNAME x"),
                        "*14\r\n$6\r\nserver\r\n$6\r\ntallyd\r\n$7\r\nversion\r\n$5\r\n0.1.0\r\n"
                        "$5\r\nproto\r\n:2\r\n$2\r\nid\r\n:42\r\n$4\r\nmode\r\n$10\r\n"
                        "standalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n");
    assert_string_equal(run(fx, "CLIENT GETNAME"), "$1\r\nx\r\n");
    assert_string_equal(run(fx, "AUTH pw"),
                        "-ERR AUTH <password> called without any password configured for the "
                        "default user. Are you sure your configuration is correct?\r\n");
    /* as Redis's passwordless default user: any password, user default only */
    assert_string_equal(run(fx, "AUTH default pw"), "+OK\r\n");
    assert_string_equal(run(fx, "AUTH other pw"),
                        "-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_string_equal(run(fx, "HELLO 2 AUTH other pw"),
                        "-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_non_null(strstr(run(fx, "HELLO 2 AUTH default pw"), "$6\r\nserver\r\n$6\r\ntallyd"));
    assert_string_equal(run(fx, "COMMAND COUNT"), ":15\r\n");
    assert_string_equal(run(fx, "QUIT"), "+OK\r\n");
    assert_true(fx->s.close_after);
}

static void test_noauth_until_auth(void **state)
{
    fx_t *fx = *state;
    assert_false(fx->s.authed);
    assert_string_equal(run(fx, "FEATURES user 7"), "-NOAUTH Authentication required.\r\n");
    assert_string_equal(run(fx, "GET x"), "-NOAUTH Authentication required.\r\n");
    assert_string_equal(run(fx, "PING"), "+PONG\r\n");
    assert_string_equal(run(fx, "HELLO 3"),
                        "-NOAUTH HELLO must be called with the client already authenticated, "
                        "otherwise the HELLO <proto> AUTH <user> <pass> option can be used to "
                        "authenticate the client and select the RESP protocol version at the "
                        "same time\r\n");
    assert_string_equal(run(fx, "AUTH wrong"),
                        "-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_string_equal(run(fx, "AUTH s3cret!"),
                        "-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_string_equal(run(fx, "AUTH other s3cret"),
                        "-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_false(fx->s.authed);
    /* a HELLO whose SETNAME is refused changes nothing, AUTH included */
    assert_string_equal(run(fx, "HELLO 3 AUTH default s3cret SETNAME na\xc3\xafve"),
                        "-ERR Client names cannot contain spaces, newlines or special "
                        "characters.\r\n");
    assert_false(fx->s.authed);
    assert_int_equal(fx->s.proto, 2);
    assert_string_equal(fx->s.name, "");
    assert_string_equal(run(fx, "FEATURES user 7"), "-NOAUTH Authentication required.\r\n");
    assert_memory_equal(run(fx, "HELLO 3 AUTH default s3cret"), "%7\r\n", 4);
    assert_true(fx->s.authed);
    assert_string_equal(run(fx, "FEATURES user 7 clicks:1h"), "%1\r\n$9\r\nclicks:1h\r\n:2\r\n");
}

static void test_info_has_every_section(void **state)
{
    fx_t *fx = *state;
    const char *r = run(fx, "INFO");
    assert_int_equal(r[0], '$');
    static const char *const want[] = {
        "# Server\r\ntallyd_version:0.1.0\r\n", "# Clients\r\nconnected_clients:0\r\n",
        "# Stats\r\n", "# Memory\r\nused_memory:", "\r\nentities:2\r\n",
        "# Source\r\nbrokers:localhost:9092\r\ntopics:engagements\r\nrunning:0\r\n",
        "# Features\r\n", "\r\ndropped_ev_late:2\r\n", "\r\nentity_pin:features=1\r\n",
        /* what redis-cli --stat reads: keys and blocked clients */
        "\r\nblocked_clients:0\r\n", "# Keyspace\r\ndb0:keys=2,expires=2,avg_ttl=0\r\n"};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (strstr(r, want[i]) == NULL)
            fail_msg("INFO lacks \"%s\":\n%s", want[i], r);
    r = run(fx, "INFO clients");
    assert_non_null(strstr(r, "# Clients\r\n"));
    assert_null(strstr(r, "# Server"));
    assert_string_equal(run(fx, "INFO nosuchsection"), "$0\r\n\r\n");
    assert_string_equal(run(fx, "DBSIZE"), ":2\r\n");
}

/* 40 brokers: a 1,300-byte line of INFO source. */
static char long_brokers[2048];
static int setup_long_brokers(void **state)
{
    size_t n = 0;
    for (int i = 0; i < 40; i++)
        n += (size_t)snprintf(long_brokers + n, sizeof long_brokers - n,
                              "%sbroker-%02d.example.internal:9092", i ? "," : "", i);
    static char extra[2200];
    snprintf(extra, sizeof extra, "kafka:\n  brokers: \"%s\"\n", long_brokers);
    return setup_with(state, extra);
}

static void test_info_long_line_is_whole(void **state)
{
    fx_t *fx = *state;
    assert_true(strlen(long_brokers) > 1000);
    char want[2200];
    snprintf(want, sizeof want, "\r\nbrokers:%s\r\ntopics:", long_brokers);
    const char *r = run(fx, "INFO source");
    if (strstr(r, want) == NULL)
        fail_msg("INFO source lacks the whole brokers line:\n%s", r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ping_echo_and_unknown_command, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mfeatures_stops_at_the_output_cap, setup_small_output,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_command_docs_describe_arguments, setup, teardown),
        cmocka_unit_test_setup_teardown(test_config_get_globs_and_arity, setup, teardown),
        cmocka_unit_test_setup_teardown(test_info_long_line_is_whole, setup_long_brokers, teardown),
        cmocka_unit_test_setup_teardown(test_features_all_resp2_flat_pairs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_features_resp3_is_a_map_with_doubles, setup, teardown),
        cmocka_unit_test_setup_teardown(test_features_asof_moves_the_windows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_features_meta_without_source, setup, teardown),
        cmocka_unit_test_setup_teardown(test_features_errors_name_entity_and_feature, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_mfeatures_aligns_ids_and_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_asof_last_and_last_k_answer_as_the_clock_would,
                                        setup_ahead, teardown),
        cmocka_unit_test_setup_teardown(test_recent_items_newest_first_with_options, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_catalog_lists_entities_and_features, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_and_hello_commands, setup, teardown),
        cmocka_unit_test_setup_teardown(test_noauth_until_auth, setup_auth, teardown),
        cmocka_unit_test_setup_teardown(test_hint_names_the_entity_a_read_will_ask_for, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_hint_waits_for_auth, setup_auth, teardown),
        cmocka_unit_test_setup_teardown(test_info_has_every_section, setup, teardown),
        cmocka_unit_test_setup_teardown(test_recent_where_compares_doubles_as_numbers, setup_scores,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_reply_larger_than_max_reply_values_is_refused,
                                        setup_scores, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
