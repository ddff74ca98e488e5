/*
 * test_decode.c — JSON event decoding (decode.c): every rejection reason,
 * escapes and UTF-8, number typing, duplicate and nested keys, the three time
 * units and the Kafka timestamp fallback, and a replay of the fuzz corpus
 * (tests/fuzz/corpus/decode/, read relative to the repository root, where
 * `make test` runs).
 *
 * Expected epoch times are worked out by hand: days since 1970-01-01 count
 * 365 per year plus one per leap year passed, e.g. 2026-01-01 is
 * 56 × 365 + 14 = 20454 days, and 2026-11-22 is 304 + 21 days later.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "corpus.h"
#include <sys/mman.h>
#include <unistd.h>

#include "tallyd/config.h"
#include "tallyd/decode.h"
#include "tallyd/feature.h"

#define CORPUS_DIR "tests/fuzz/corpus/decode"

/* 2026-11-22T04:16:21Z: (20454 + 325) days × 86400 s + 4 h 16 min 21 s. */
#define T_2026_11_22_041621 INT64_C(1795320981000)
/* 2101-01-01T00:00:00Z: 131 × 365 + 32 days; the first time rejected. */
#define T_2101 INT64_C(4133980800000)

static const char *const ms_time = "  time: { field: ts, unit: ms }\n";
static const char *const s_time = "  time: { field: ts, unit: s }\n";
static const char *const iso_time = "  time: { field: ts, unit: iso8601 }\n";
static const char *const kafka_time = "";

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_decoder_t *dec;
    tly_event_t ev;
} fixture_t;

static fixture_t *fixture_new(const char *time_yaml)
{
    char yaml[1024], err[512] = "";
    snprintf(yaml, sizeof yaml,
             "events:\n"
             "%s"
             "  max_bytes: 4096\n"
             "  max_string: 32\n"
             "features:\n"
             "  - { name: clicks, entity: user, key: user_id, where: { action: click }, "
             "agg: count, windows: [1h] }\n"
             "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 10, "
             "value: [pin_id, action, dwell, score, flag, ctx] }\n",
             time_yaml);
    fixture_t *f = calloc(1, sizeof *f);
    assert_non_null(f);
    if (tly_config_load_string(yaml, "test.yaml", &f->cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    if (tly_featset_compile(f->cfg, &f->fs, err, sizeof err) != TLY_OK)
        fail_msg("featset: %s", err);
    f->dec = tly_decoder_new(f->fs);
    return f;
}

static void fixture_free(fixture_t *f)
{
    tly_decoder_free(f->dec);
    tly_featset_free(f->fs);
    tly_config_free(f->cfg);
    free(f);
}

static int setup_ms(void **state)
{
    *state = fixture_new(ms_time);
    return 0;
}

static int setup_s(void **state)
{
    *state = fixture_new(s_time);
    return 0;
}

static int setup_iso(void **state)
{
    *state = fixture_new(iso_time);
    return 0;
}

static int setup_kafka(void **state)
{
    *state = fixture_new(kafka_time);
    return 0;
}

static int teardown(void **state)
{
    fixture_free(*state);
    return 0;
}

static tly_err_t decode_n(fixture_t *f, const char *payload, size_t len)
{
    return tly_decode_json(f->dec, payload, len, -1, &f->ev);
}

static tly_err_t decode(fixture_t *f, const char *payload)
{
    return decode_n(f, payload, strlen(payload));
}

static const tly_value_t *val(fixture_t *f, const char *name)
{
    int id = tly_featset_field(f->fs, name, strlen(name));
    assert_true(id >= 0);
    return &f->ev.vals[id];
}

static void assert_str_n(const tly_value_t *v, const char *want, size_t len)
{
    assert_int_equal(v->type, TLY_V_STR);
    assert_int_equal(v->len, len);
    assert_memory_equal(v->u.s, want, len);
}

static void assert_str(const tly_value_t *v, const char *want)
{
    assert_str_n(v, want, strlen(want));
}

static void assert_int_value(const tly_value_t *v, int64_t want)
{
    assert_int_equal(v->type, TLY_V_INT);
    assert_int_equal(v->u.i, want);
}

static void assert_double_value(const tly_value_t *v, double want)
{
    assert_int_equal(v->type, TLY_V_DOUBLE);
    assert_true(v->u.d == want);
}

/* --- extraction ---------------------------------------------------------- */

static void decode_extracts_referenced_fields_and_time(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1700000000123,\"user_id\":\"u1\",\"action\":\"click\","
                               "\"pin_id\":987654321,\"dwell\":1500,\"score\":0.25,"
                               "\"flag\":true,\"ctx\":null,\"other\":\"ignored\"}"),
                     TLY_OK);
    assert_int_equal(f->ev.nfields, 8);
    assert_int_equal(f->ev.time_ms, INT64_C(1700000000123));
    assert_str(val(f, "user_id"), "u1");
    assert_str(val(f, "action"), "click");
    assert_int_value(val(f, "pin_id"), 987654321);
    assert_int_value(val(f, "dwell"), 1500);
    assert_double_value(val(f, "score"), 0.25);
    assert_int_equal(val(f, "flag")->type, TLY_V_BOOL);
    assert_int_equal(val(f, "flag")->u.i, 1);
    assert_int_equal(val(f, "ctx")->type, TLY_V_NIL);
    assert_int_value(val(f, "ts"), INT64_C(1700000000123));
}

static void decode_skips_a_leading_byte_order_mark_only(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "\xEF\xBB\xBF{\"ts\":7,\"action\":\"x\"}"), TLY_OK);
    assert_int_equal(f->ev.time_ms, 7);
    assert_str(val(f, "action"), "x");
    assert_int_equal(decode(f, "\xEF\xBB\xBF {\"ts\":7}"), TLY_OK);
    /* a mark after whitespace, a second one, or half of one is not JSON */
    assert_int_equal(decode(f, " \xEF\xBB\xBF{\"ts\":7}"), TLY_E_EV_BAD_JSON);
    assert_int_equal(decode(f, "\xEF\xBB\xBF\xEF\xBB\xBF{\"ts\":7}"), TLY_E_EV_BAD_JSON);
    assert_int_equal(decode(f, "\xEF\xBB{\"ts\":7}"), TLY_E_EV_BAD_JSON);
    assert_int_equal(decode(f, "\xEF\xBB\xBF"), TLY_E_EV_BAD_JSON);
    assert_int_equal(decode(f, "{\"ts\":7}\xEF\xBB\xBF"), TLY_E_EV_BAD_JSON);
}

static void decode_leaves_absent_fields_nil_across_calls(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":5,\"user_id\":\"u1\",\"flag\":false}"), TLY_OK);
    assert_int_equal(val(f, "flag")->u.i, 0);
    assert_int_equal(decode(f, "{\"ts\":7}"), TLY_OK);
    assert_int_equal(f->ev.time_ms, 7);
    for (uint32_t i = 0; i < f->ev.nfields; i++)
        if ((int)i != f->fs->time_field)
            assert_int_equal(f->ev.vals[i].type, TLY_V_NIL);
}

static void decode_borrows_unescaped_strings_from_the_payload(void **state)
{
    fixture_t *f = *state;
    const char *p = "{\"ts\":1,\"action\":\"click\"}";
    assert_int_equal(decode(f, p), TLY_OK);
    assert_ptr_equal(val(f, "action")->u.s, p + 18);
}

static void decode_accepts_whitespace_between_tokens(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, " \t\n{ \"ts\" :\r\n 1 , \"action\" :\"click\" ,\"m\": [ 1 , { } ,"
                               "[ ] ] } \n"),
                     TLY_OK);
    assert_str(val(f, "action"), "click");
    /* each separator in each spacing: none, one space, the others JSON
     * allows, several */
    static const char *const ok[] = {
        "{\"ts\":7,\"action\":\"x\"}",
        "{\"ts\": 7, \"action\": \"x\"}",
        "{\"ts\" :7 ,\"action\" :\"x\"}",
        "{\"ts\" : 7 , \"action\" : \"x\" }",
        "{\"ts\":\t7,\t\"action\":\n\"x\"}",
        "{\"ts\":\r\n7,\r\n\"action\":\"x\"}",
        "{\"ts\":  7,  \"action\":  \"x\"}",
        "{\"ts\":7\n,\"action\"\t:\"x\"\n}",
        "{ \"ts\":7,\"action\":\"x\",\"m\":[ 1,2 ,3 , 4 ]}",
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        if (decode(f, ok[i]) != TLY_OK)
            fail_msg("rejected %s", ok[i]);
        assert_int_equal(f->ev.time_ms, 7);
        assert_str(val(f, "action"), "x");
    }
    assert_int_equal(decode(f, "{}"), TLY_E_EV_MISSING_TIME); /* valid, but no time */
}

static void decode_last_duplicate_key_wins(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":5,\"action\":\"view\",\"dwell\":1,\"action\":\"click\","
                               "\"dwell\":\"x\",\"ts\":7}"),
                     TLY_OK);
    assert_str(val(f, "action"), "click");
    assert_str(val(f, "dwell"), "x");
    assert_int_equal(f->ev.time_ms, 7);
    assert_int_equal(decode(f, "{\"ts\":5,\"action\":\"view\",\"action\":null}"), TLY_OK);
    assert_int_equal(val(f, "action")->type, TLY_V_NIL);
}

/* A value that is wrong in itself (object or array, a string over
 * max_string = 32 bytes, a number beyond double range) rejects the event
 * even when a later duplicate of its key is fine; the time field's unit is
 * judged on the last duplicate only. */
static void decode_bad_value_of_a_repeated_key_rejects_even_if_the_last_is_fine(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\","
                               "\"action\":\"click\"}"),
                     TLY_E_EV_VALUE_TOO_LONG);
    assert_int_equal(decode(f, "{\"ts\":1,\"score\":1e999,\"score\":2.5}"), TLY_E_EV_WRONG_TYPE);
    assert_int_equal(decode(f, "{\"ts\":1,\"score\":[],\"score\":2.5}"), TLY_E_EV_WRONG_TYPE);
    assert_int_equal(decode(f, "{\"ts\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\",\"ts\":7}"),
                     TLY_E_EV_BAD_TIME);
    /* a string or a fraction is wrong only as a time in ms: the last wins */
    assert_int_equal(decode(f, "{\"ts\":\"x\",\"ts\":1.5,\"ts\":7}"), TLY_OK);
    assert_int_equal(f->ev.time_ms, 7);
    /* a string of exactly 32 bytes is fine, and the last one wins */
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\","
                               "\"action\":\"click\"}"),
                     TLY_OK);
    assert_str(val(f, "action"), "click");
}

static void decode_skips_nested_values_under_unreferenced_keys(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"meta\":{\"user_id\":\"x\",\"ts\":\"bad\",\"deep\":[{\"action\":"
                               "[1,{\"a\":null}]},\"\\u00e9\"]},\"user_id\":\"u\",\"list\":[[],"
                               "{}],\"ts\":1}"),
                     TLY_OK);
    assert_str(val(f, "user_id"), "u");
    assert_int_equal(val(f, "action")->type, TLY_V_NIL);
    assert_int_equal(f->ev.time_ms, 1);
}

/* --- numbers --------------------------------------------------------------- */

static void decode_types_integers_and_doubles(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *text;
        bool is_int;
        int64_t i;
        double d;
    } cases[] = {
        {"42", true, 42, 0},
        {"0", true, 0, 0},
        {"-0", true, 0, 0},
        {"-17", true, -17, 0},
        /* 18 digits are summed while the grammar is checked; 19 and more
         * take the overflow-checked path; 2^64 must not wrap to 0 */
        {"999999999999999999", true, INT64_C(999999999999999999), 0},
        {"-999999999999999999", true, -INT64_C(999999999999999999), 0},
        {"123456789012345678", true, INT64_C(123456789012345678), 0},
        {"1000000000000000000", true, INT64_C(1000000000000000000), 0},
        {"-1000000000000000000", true, -INT64_C(1000000000000000000), 0},
        {"9999999999999999999", false, 0, 9999999999999999999.0},
        {"18446744073709551616", false, 0, 18446744073709551616.0},
        {"1234567890123456789.5", false, 0, 1234567890123456789.5},
        {"9223372036854775807", true, INT64_MAX, 0},
        {"-9223372036854775808", true, INT64_MIN, 0},
        /* integers beyond int64 become doubles: 2^63 and -2^63 - 1 → -2^63 */
        {"9223372036854775808", false, 0, 9223372036854775808.0},
        {"-9223372036854775809", false, 0, -9223372036854775808.0},
        {"100000000000000000000000", false, 0, 1e23},
        {"1.5", false, 0, 1.5},
        {"0.1", false, 0, 0.1},
        {"1e3", false, 0, 1000.0},
        {"1E+3", false, 0, 1000.0},
        {"-2.5e-3", false, 0, -0.0025},
        {"1.0", false, 0, 1.0},
        {"1e-999", false, 0, 0.0}, /* underflows to zero: finite */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char p[128];
        snprintf(p, sizeof p, "{\"ts\":1,\"dwell\":%s}", cases[c].text);
        assert_int_equal(decode(f, p), TLY_OK);
        if (cases[c].is_int)
            assert_int_value(val(f, "dwell"), cases[c].i);
        else
            assert_double_value(val(f, "dwell"), cases[c].d);
    }
    assert_int_equal(decode(f, "{\"ts\":1,\"flag\":false,\"ctx\":true}"), TLY_OK);
    assert_int_equal(val(f, "flag")->type, TLY_V_BOOL);
    assert_int_equal(val(f, "flag")->u.i, 0);
    assert_int_equal(val(f, "ctx")->u.i, 1);
}

static void decode_rejects_number_beyond_double_range_as_wrong_type(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1,\"score\":1e999}"), TLY_E_EV_WRONG_TYPE);
    assert_int_equal(decode(f, "{\"ts\":1,\"score\":-1e309}"), TLY_E_EV_WRONG_TYPE);
    assert_int_equal(decode(f, "{\"ts\":1,\"unused\":1e999}"), TLY_OK); /* not extracted */
}

/* --- strings ---------------------------------------------------------------- */

static void decode_decodes_simple_escapes(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"a\\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti\"}"),
                     TLY_OK);
    assert_str(val(f, "action"), "a\"b\\c/d\be\ff\ng\rh\ti");
}

static void decode_decodes_unicode_escapes_to_utf8(void **state)
{
    fixture_t *f = *state;
    /* é U+00E9, € U+20AC, 😀 U+1F600 as the pair D83D DE00 */
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"\\u00e9\\u20AC\\uD83D\\ude00\"}"), TLY_OK);
    assert_str(val(f, "action"), "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"a\\u0000b\\u007f\\u0080\\uffff\"}"), TLY_OK);
    assert_str_n(val(f, "action"), "a\0b\x7f\xc2\x80\xef\xbf\xbf", 9);
}

/* Strings are checked eight bytes at a time, then byte by byte: every bad
 * byte must be caught at every position of strings of every length around
 * those steps, in values and in keys, and good bytes must come through. */
static void decode_checks_every_byte_position_of_strings(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *ins;
        tly_err_t want;
        const char *decoded; /* for TLY_OK: what the inserted text decodes to */
    } cases[] = {
        {"\x01", TLY_E_EV_BAD_JSON, NULL},
        {"\x1f", TLY_E_EV_BAD_JSON, NULL},
        {"\x80", TLY_E_EV_BAD_JSON, NULL},
        {"\xff", TLY_E_EV_BAD_JSON, NULL},
        {"\\x", TLY_E_EV_BAD_JSON, NULL},
        {"\\n", TLY_OK, "\n"},
        {"\xc3\xa9", TLY_OK, "\xc3\xa9"},
        {"\x7f", TLY_OK, "\x7f"},
        {" ", TLY_OK, " "},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        for (size_t len = 1; len <= 20; len++) {
            for (size_t pos = 0; pos < len; pos++) {
                char body[64], want[64], payload[160];
                size_t ins = strlen(cases[c].ins);
                memset(body, 'a', pos);
                memcpy(body + pos, cases[c].ins, ins);
                memset(body + pos + ins, 'a', len - pos - 1);
                body[len - 1 + ins] = '\0';
                snprintf(payload, sizeof payload, "{\"action\":\"%s\",\"ts\":1}", body);
                assert_int_equal(decode(f, payload), cases[c].want);
                if (cases[c].want == TLY_OK) {
                    size_t dn = strlen(cases[c].decoded);
                    memset(want, 'a', pos);
                    memcpy(want + pos, cases[c].decoded, dn);
                    memset(want + pos + dn, 'a', len - pos - 1);
                    assert_str_n(val(f, "action"), want, len - 1 + dn);
                }
                /* The same text as an unreferenced key. */
                snprintf(payload, sizeof payload, "{\"%s\":1,\"ts\":1}", body);
                assert_int_equal(decode(f, payload), cases[c].want);
            }
        }
    }
}

/* A copy of payload[0..n) that ends where an unreadable page begins, so
 * that reading a byte past it faults, with or without a sanitizer. */
static char *guarded_copy(const char *payload, size_t n, void **map, size_t *maplen)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    assert_true(n <= page);
    *maplen = 2 * page;
    *map = mmap(NULL, *maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(*map != MAP_FAILED);
    char *guard = (char *)*map + page;
    assert_int_equal(mprotect(guard, page, PROT_NONE), 0);
    memcpy(guard - n, payload, n);
    return guard - n;
}

/* A plain string is read a word or two at a time when that many bytes are
 * left in the payload, else byte by byte: every length from 0 to 20, as a
 * value and as a key, with 0 to 9 spaces before the closing brace, each
 * payload just before an unreadable page. */
static void decode_reads_plain_strings_of_every_length_near_the_end(void **state)
{
    fixture_t *f = *state;
    for (size_t len = 0; len <= 20; len++) {
        char body[32];
        for (size_t i = 0; i < len; i++)
            body[i] = (char)('b' + i % 24);
        body[len] = '\0';
        for (int pad = 0; pad <= 9; pad++) {
            char payload[96];
            void *map;
            size_t maplen;
            int n =
                snprintf(payload, sizeof payload, "{\"ts\":1,\"action\":\"%s\"%*s}", body, pad, "");
            const char *p = guarded_copy(payload, (size_t)n, &map, &maplen);
            assert_int_equal(decode_n(f, p, (size_t)n), TLY_OK);
            assert_str_n(val(f, "action"), body, len);
            munmap(map, maplen);

            n = snprintf(payload, sizeof payload, "{\"ts\":1,\"dwell\":%zu,\"%s\":\"x\"%*s}", len,
                         body, pad, "");
            p = guarded_copy(payload, (size_t)n, &map, &maplen);
            assert_int_equal(decode_n(f, p, (size_t)n), TLY_OK);
            assert_int_value(val(f, "dwell"), (int64_t)len);
            munmap(map, maplen);
        }
    }
}

/* Keys are looked up by their first eight bytes and length, then the rest:
 * names that share both must still be told apart, and a key near the end
 * of the payload (fewer than eight bytes left to read) must still match. */
static void decode_tells_apart_keys_sharing_their_first_eight_bytes(void **state)
{
    (void)state;
    static const char yaml[] =
        "events:\n  time: { field: ts, unit: ms }\n"
        "features:\n"
        "  - { name: r, entity: user, key: user_id, agg: last_k, k: 2, "
        "value: [abcdefgh_one, abcdefgh_two, abcdefgh, abcdefg, abcdefghi] }\n";
    char err[512] = "";
    tly_config_t *cfg;
    tly_featset_t *fs;
    if (tly_config_load_string(yaml, "test.yaml", &cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    if (tly_featset_compile(cfg, &fs, err, sizeof err) != TLY_OK)
        fail_msg("featset: %s", err);
    tly_decoder_t *dec = tly_decoder_new(fs);
    tly_event_t ev;
    const char *names[] = {"abcdefgh_one", "abcdefgh_two", "abcdefgh", "abcdefg", "abcdefghi"};
    /* each value is its name's index; the keys in two orders, so that each
     * one is also the last key, a few bytes before the end */
    const char *payloads[] = {
        "{\"ts\":1,\"abcdefgh_one\":0,\"abcdefgh_two\":1,\"abcdefgh\":2,\"abcdefg\":3,"
        "\"abcdefghi\":4,\"abcdefgh_\":9,\"abcdefgh_on\":9}",
        "{\"abcdefgh_on\":9,\"abcdefghi\":4,\"abcdefg\":3,\"abcdefgh\":2,\"abcdefgh_two\":1,"
        "\"abcdefgh_one\":0,\"ts\":1}",
        "{\"ts\":1,\"abcdefg\":3}",
        "{\"ts\":1,\"abcdefgh\":2}",
    };
    for (size_t p = 0; p < sizeof payloads / sizeof payloads[0]; p++) {
        assert_int_equal(tly_decode_json(dec, payloads[p], strlen(payloads[p]), -1, &ev), TLY_OK);
        for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
            int id = tly_featset_field(fs, names[k], strlen(names[k]));
            assert_true(id >= 0);
            const tly_value_t *v = &ev.vals[id];
            bool present = p < 2 || (p == 2 && k == 3) || (p == 3 && k == 2);
            if (present)
                assert_int_value(v, (int64_t)k);
            else
                assert_int_equal(v->type, TLY_V_NIL);
        }
    }
    tly_decoder_free(dec);
    tly_featset_free(fs);
    tly_config_free(cfg);
}

static void decode_passes_raw_utf8_through(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"
                               "\xef\xbf\xbf\xf4\x8f\xbf\xbf\x7f\"}"),
                     TLY_OK);
    assert_str(val(f, "action"), "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xef\xbf\xbf"
                                 "\xf4\x8f\xbf\xbf\x7f");
}

static void decode_matches_keys_written_with_escapes(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"\\u0074s\":1,\"us\\u0065r_id\":\"u1\",\"user\\u005fid2\":2}"),
                     TLY_OK);
    assert_int_equal(f->ev.time_ms, 1);
    assert_str(val(f, "user_id"), "u1");
}

static void decode_keeps_escaped_values_valid_until_the_next_call(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"\\u00e9a\",\"user_id\":\"x\\ty\","
                               "\"\\u0070in_id\":\"\\\"q\\\"\"}"),
                     TLY_OK);
    assert_str(val(f, "action"), "\xc3\xa9"
                                 "a");
    assert_str(val(f, "user_id"), "x\ty");
    assert_str(val(f, "pin_id"), "\"q\"");
}

/* --- rejections ---------------------------------------------------------- */

static void decode_rejects_payload_over_max_bytes(void **state)
{
    fixture_t *f = *state;
    char *p = malloc(4098);
    assert_non_null(p);
    /* {"ts":1,"pad":"…"} is 17 bytes around the padding. */
    memcpy(p, "{\"ts\":1,\"pad\":\"", 15);
    memset(p + 15, 'x', 4079);
    memcpy(p + 15 + 4079, "\"}", 2);
    assert_int_equal(decode_n(f, p, 4096), TLY_OK);
    memcpy(p + 15 + 4080, "\"}", 2);
    assert_int_equal(decode_n(f, p, 4097), TLY_E_EV_TOO_LARGE);
    free(p);
}

static void decode_rejects_invalid_json(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *p;
        size_t len; /* 0: strlen */
    } cases[] = {
        {"", 0},
        {"   ", 0},
        {"{", 0},
        {"{\"ts\":1", 0},
        {"{\"ts\":1}x", 0},
        {"{\"ts\":1}{}", 0},
        {"{\"ts\":1} 2", 0},
        {"{\"ts\":1}}", 0},
        {"{\"ts\":1]", 0},
        {"{\"ts\" 1}", 0},
        {"{\"ts\":1 \"a\":2}", 0},
        {"{\"ts\"::1}", 0},
        {"{\"ts\":1,}", 0},
        {"{,\"ts\":1}", 0},
        {"{\"ts\":1,,\"a\":2}", 0},
        {"{\"ts\"}", 0},
        {"{\"ts\":}", 0},
        {"{:1}", 0},
        {"{ts:1}", 0},
        {"{1:1}", 0},
        {"{{}:1}", 0},
        {"{\"ts\":1:2}", 0},
        {"{\"a\":[1,,2],\"ts\":1}", 0},
        {"{\"a\":[1,],\"ts\":1}", 0},
        {"{\"a\":[,1],\"ts\":1}", 0},
        {"{\"a\":[1 2],\"ts\":1}", 0},
        {"{\"a\":[\"k\":1],\"ts\":1}", 0},
        {"{\"a\":[}", 0},
        {"{\"a\":\"x}", 0},
        {"{\"a\":'x',\"ts\":1}", 0},
        {"{\"a\":tru,\"ts\":1}", 0},
        {"{\"a\":nul,\"ts\":1}", 0},
        {"{\"a\":TRUE,\"ts\":1}", 0},
        {"{\"a\":truex,\"ts\":1}", 0},
        {"{\"a\":01,\"ts\":1}", 0},
        {"{\"a\":1.,\"ts\":1}", 0},
        {"{\"a\":.5,\"ts\":1}", 0},
        {"{\"a\":+1,\"ts\":1}", 0},
        {"{\"a\":-,\"ts\":1}", 0},
        {"{\"a\":1e,\"ts\":1}", 0},
        {"{\"a\":1e+,\"ts\":1}", 0},
        {"{\"a\":0x10,\"ts\":1}", 0},
        {"{\"a\":NaN,\"ts\":1}", 0},
        {"{\"a\":Infinity,\"ts\":1}", 0},
        {"{\"a\":--1,\"ts\":1}", 0},
        {"{\"ts\":1}\0", 9},               /* NUL after the object */
        {"{\"a\":\"x\0y\",\"ts\":1}", 18}, /* NUL inside a string */
        {"\0{\"ts\":1}", 9},               /* NUL before the object */
        {" \0{\"ts\":1}", 10},
        {"{\"ts\":1\0}", 9}, /* in a number, at its end */
        {"{\"ts\":1\0 }", 10},
        {"{\"ts\":1\0,\"a\":2}", 15},
        {"{\"ts\":12\0"
         "3,\"a\":2}",
         17},                  /* in the middle of a number */
        {"{\"ts\":\0 1}", 10}, /* between tokens */
        {"{\"ts\"\0:1}", 9},
        {"{\"ts\":1,\0\"a\":2}", 15},
        {"{\"t\0s\":1}", 9},               /* in a key */
        {"{\"a\":tr\0ue,\"ts\":1}", 18},   /* in a literal */
        {"{\"a\":[1,\0 2],\"ts\":1}", 20}, /* in a skipped array */
        {"1\0", 2},                        /* after a top-level number */
        {"{\"ts\": :1}", 0},               /* separators: doubled, misplaced, wrong */
        {"{\"ts\":1, ,\"a\":2}", 0},
        {"{\"ts\":1 ,,\"a\":2}", 0},
        {"{\"ts\"; 1}", 0},
        {"{\"ts\":1 ; \"a\":2}", 0},
        {"{\"ts\":1,\"a\":2 ,}", 0},
        {"{\"ts\":1,\v\"a\":2}", 0}, /* not JSON whitespace */
        {"{\"ts\":1,\f\"a\":2}", 0},
        {"{\"ts\":\xc2\xa0"
         "1}",
         0},
        {"{\"ts\":1,x\"a\":2}", 0},
        {"{\"ts\":1,\"a\"x:2}", 0},
        {"{\"ts\":1,\"a\":x2}", 0},
        {"{\"ts\":1, x\"a\":2}", 0},
        {"{\"a\":\"x\ty\",\"ts\":1}", 0}, /* raw control character */
        {"{\"a\":\"x\x01y\",\"ts\":1}", 0},
        {"{\"a\":\"\\x\",\"ts\":1}", 0},   /* unknown escape */
        {"{\"a\":\"\\u12\",\"ts\":1}", 0}, /* short \u */
        {"{\"a\":\"\\u12g4\",\"ts\":1}", 0},
        {"{\"a\":\"\\ud800\",\"ts\":1}", 0}, /* lone high surrogate */
        {"{\"a\":\"\\udc00\",\"ts\":1}", 0}, /* lone low surrogate */
        {"{\"a\":\"\\ud800\\u0041\",\"ts\":1}", 0},
        {"{\"a\":\"\\ud800\\ud800\",\"ts\":1}", 0},
        {"{\"a\":\"\\ud800x\",\"ts\":1}", 0},
        {"{\"a\":\"\xc3\x28\",\"ts\":1}", 0},         /* bad continuation */
        {"{\"a\":\"\xc0\xaf\",\"ts\":1}", 0},         /* overlong '/' */
        {"{\"a\":\"\xe0\x80\xaf\",\"ts\":1}", 0},     /* overlong, 3 bytes */
        {"{\"a\":\"\xed\xa0\x80\",\"ts\":1}", 0},     /* UTF-8 surrogate */
        {"{\"a\":\"\xf4\x90\x80\x80\",\"ts\":1}", 0}, /* beyond U+10FFFF */
        {"{\"a\":\"\xf5\x80\x80\x80\",\"ts\":1}", 0},
        {"{\"a\":\"\x80\",\"ts\":1}", 0},              /* stray continuation */
        {"{\"a\":\"\xe2\x82\",\"ts\":1}", 0},          /* truncated */
        {"{\"\xff\":1,\"ts\":1}", 0},                  /* bad UTF-8 in a key */
        {"{\"m\":{\"x\":[\"\\ud800\"]},\"ts\":1}", 0}, /* deep inside a skipped value */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        size_t len = cases[c].len ? cases[c].len : strlen(cases[c].p);
        tly_err_t rc = decode_n(f, cases[c].p, len);
        if (rc != TLY_E_EV_BAD_JSON)
            fail_msg("case %zu (%s): got %s, want EV_BAD_JSON", c, cases[c].p, tly_err_name(rc));
    }
    assert_int_equal(tly_decode_json(f->dec, NULL, 0, 1, &f->ev), TLY_E_EV_BAD_JSON);
}

static void decode_rejects_top_level_non_objects(void **state)
{
    fixture_t *f = *state;
    static const char *const cases[] = {"[1,2]", "[]",  " [ {\"ts\":1} ] ", "\"str\"", "42", "-1.5",
                                        "null",  "true"};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        assert_int_equal(decode(f, cases[c]), TLY_E_EV_NOT_OBJECT);
    assert_int_equal(decode(f, "[1,2"), TLY_E_EV_BAD_JSON); /* invalid before non-object */
}

/* {"ts":1,"m":[0,…,0]} with n zeros: 5 + n tokens. */
static char *tokens_payload(int n)
{
    char *p = malloc(32 + 2 * (size_t)n);
    assert_non_null(p);
    size_t len = (size_t)sprintf(p, "{\"ts\":1,\"m\":[");
    for (int i = 0; i < n; i++)
        len += (size_t)sprintf(p + len, i ? ",0" : "0");
    sprintf(p + len, "]}");
    return p;
}

static void decode_rejects_more_tokens_than_the_cap(void **state)
{
    fixture_t *f = *state;
    char *p = tokens_payload(TLY_DECODE_MAX_TOKENS - 5);
    assert_int_equal(decode(f, p), TLY_OK);
    free(p);
    p = tokens_payload(TLY_DECODE_MAX_TOKENS - 4);
    assert_int_equal(decode(f, p), TLY_E_EV_TOO_COMPLEX);
    /* too complex wins over bad JSON (the documented precedence), here a
     * NUL after the closing brace; a NUL before the token cap is reached
     * stops jsmn there, and then it is bad JSON */
    size_t len = strlen(p);
    p[len - 1] = '\0';
    assert_int_equal(decode_n(f, p, len), TLY_E_EV_TOO_COMPLEX);
    p[len - 1] = '}';
    p[20] = '\0';
    assert_int_equal(decode_n(f, p, len), TLY_E_EV_BAD_JSON);
    free(p);
}

/* {"ts":1,"m":[0,…,0 (251 zeros: 256 tokens so far), then `tail`. */
static char *cap_payload(const char *tail)
{
    char *p = tokens_payload(TLY_DECODE_MAX_TOKENS - 5);
    size_t len = strlen(p) - 2; /* drop "]}" */
    char *q = malloc(len + strlen(tail) + 1);
    assert_non_null(q);
    memcpy(q, p, len);
    strcpy(q + len, tail);
    free(p);
    return q;
}

/* The first problem met reading left to right decides between a 257th
 * token and a grammar error; a malformed 257th token is still one. */
static void decode_tells_too_complex_from_bad_json_left_to_right(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *tail;
        tly_err_t want;
    } cases[] = {
        {"]}", TLY_OK},                         /* 256 tokens */
        {",0]}", TLY_E_EV_TOO_COMPLEX},         /* a 257th */
        {",\"\\uZZ\"]}", TLY_E_EV_TOO_COMPLEX}, /* a 257th, a bad escape in it */
        {",0\xb6]}", TLY_E_EV_TOO_COMPLEX},     /* a 257th, a stray byte after it */
        {",tru]}", TLY_E_EV_TOO_COMPLEX},       /* a 257th, a misspelt literal */
        {",]}", TLY_E_EV_BAD_JSON},             /* a trailing comma is no token */
        {",}", TLY_E_EV_BAD_JSON},
        {"],x:1}", TLY_E_EV_BAD_JSON},        /* a key must be a string */
        {"],\"k\":1}", TLY_E_EV_TOO_COMPLEX}, /* a key is a token */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char *p = cap_payload(cases[c].tail);
        if (decode(f, p) != cases[c].want)
            fail_msg("tail %s: got %d, want %d", cases[c].tail, decode(f, p), cases[c].want);
        free(p);
    }
    /* A grammar error before the 257th token wins, however many follow. */
    char *p = tokens_payload(300);
    p[14] = '0'; /* {"ts":1,"m":[0,0… → [00,0…: a leading zero */
    assert_int_equal(decode(f, p), TLY_E_EV_BAD_JSON);
    free(p);
}

/* Integers of 1 to 18 digits, read eight digits at a time where eight
 * bytes remain, against strtoll on the same text: each length, several
 * digit patterns, and what may follow a number in JSON. */
static void decode_reads_integers_of_every_length(void **state)
{
    fixture_t *f = *state;
    static const char *const after[] = {"}", " }", ",\"flag\":true}", "\n}", "]}"};
    uint64_t r = 0x9E3779B97F4A7C15u;
    for (int nd = 1; nd <= 18; nd++) {
        for (int pat = 0; pat < 6; pat++) {
            char digits[32];
            for (int i = 0; i < nd; i++) {
                r = r * 6364136223846793005u + 1442695040888963407u;
                int d = pat == 0 ? 9 : pat == 1 ? (i == 0 ? 1 : 0) : (int)(r >> 60) % 10;
                digits[i] = (char)('0' + (i == 0 && d == 0 ? 7 : d));
            }
            digits[nd] = '\0';
            for (size_t a = 0; a < sizeof after / sizeof after[0]; a++) {
                for (int neg = 0; neg <= 1; neg++) {
                    char p[128], text[40];
                    snprintf(text, sizeof text, "%s%s", neg ? "-" : "", digits);
                    bool arr = after[a][0] == ']';
                    snprintf(p, sizeof p, "{\"ts\":1,\"dwell\":%s%s%s", arr ? "[" : "", text,
                             after[a]);
                    if (arr) {
                        assert_int_equal(decode(f, p), TLY_E_EV_WRONG_TYPE);
                        continue;
                    }
                    assert_int_equal(decode(f, p), TLY_OK);
                    assert_int_value(val(f, "dwell"), strtoll(text, NULL, 10));
                }
            }
            /* and with a fraction: a double, as strtod reads it */
            char p[128], text[40];
            snprintf(text, sizeof text, "%s.25", digits);
            snprintf(p, sizeof p, "{\"ts\":1,\"dwell\":%s}", text);
            assert_int_equal(decode(f, p), TLY_OK);
            assert_double_value(val(f, "dwell"), strtod(text, NULL));
        }
    }
    /* bytes next to the digits in ASCII, and bytes that carry when 6 is
     * added, end a number where they stand */
    static const char *const bad[] = {"12:3",
                                      "12/3",
                                      "1234567:",
                                      "12345678/9",
                                      "1\xfa"
                                      "2",
                                      "1234567\xff",
                                      "123456789\xfa"};
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
        char p[128];
        snprintf(p, sizeof p, "{\"ts\":1,\"dwell\":%s}", bad[b]);
        assert_int_equal(decode(f, p), TLY_E_EV_BAD_JSON);
    }
}

static void decode_rejects_object_or_array_under_a_referenced_key(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1,\"pin_id\":{\"a\":1}}"), TLY_E_EV_WRONG_TYPE);
    assert_int_equal(decode(f, "{\"ts\":1,\"pin_id\":[1]}"), TLY_E_EV_WRONG_TYPE);
    assert_int_equal(decode(f, "{\"ts\":1,\"user_id\":[],\"user_id\":\"u\"}"), TLY_E_EV_WRONG_TYPE);
    /* validity is checked first: a later syntax error wins */
    assert_int_equal(decode(f, "{\"ts\":1,\"pin_id\":[1],\"x\":tru}"), TLY_E_EV_BAD_JSON);
}

static void decode_rejects_strings_longer_than_max_string(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"0123456789abcdef0123456789abcdef\"}"),
                     TLY_OK);
    assert_int_equal(decode(f, "{\"ts\":1,\"action\":\"0123456789abcdef0123456789abcdefX\"}"),
                     TLY_E_EV_VALUE_TOO_LONG);
    /* max_string counts decoded bytes: 16 × é is 32 bytes, 17 × é is 34 */
    char p[256] = "{\"ts\":1,\"action\":\"";
    for (int i = 0; i < 16; i++)
        strcat(p, "\\u00e9");
    strcat(p, "\"}");
    assert_int_equal(decode(f, p), TLY_OK);
    assert_int_equal(val(f, "action")->len, 32);
    strcpy(p + strlen(p) - 2, "\\u00e9\"}");
    assert_int_equal(decode(f, p), TLY_E_EV_VALUE_TOO_LONG);
    /* unreferenced strings may be longer */
    assert_int_equal(decode(f, "{\"ts\":1,\"x\":\"0123456789abcdef0123456789abcdefX\"}"), TLY_OK);
}

/* --- time ----------------------------------------------------------------- */

static void decode_time_ms_accepts_integral_numbers_only(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *ts;
        tly_err_t rc;
        int64_t ms;
    } cases[] = {
        {"1700000000123", TLY_OK, INT64_C(1700000000123)},
        {"1700000000123.0", TLY_OK, INT64_C(1700000000123)},
        {"1.700000000123e12", TLY_OK, INT64_C(1700000000123)},
        {"17000000001230e-1", TLY_OK, INT64_C(1700000000123)},
        {"0", TLY_OK, 0},
        {"-0", TLY_OK, 0},
        {"4133980799999", TLY_OK, T_2101 - 1},
        {"4133980800000", TLY_E_EV_BAD_TIME, 0},
        {"1700000000123.5", TLY_E_EV_BAD_TIME, 0},
        {"1.5", TLY_E_EV_BAD_TIME, 0},
        {"-1", TLY_E_EV_BAD_TIME, 0},
        {"1e999", TLY_E_EV_BAD_TIME, 0},
        {"99999999999999999999999", TLY_E_EV_BAD_TIME, 0},
        {"\"1700000000123\"", TLY_E_EV_BAD_TIME, 0},
        {"true", TLY_E_EV_BAD_TIME, 0},
        {"{}", TLY_E_EV_BAD_TIME, 0},
        {"[1]", TLY_E_EV_BAD_TIME, 0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char p[128];
        snprintf(p, sizeof p, "{\"user_id\":\"u\",\"ts\":%s}", cases[c].ts);
        tly_err_t rc = decode(f, p);
        if (rc != cases[c].rc)
            fail_msg("ts %s: got %s, want %s", cases[c].ts, tly_err_name(rc),
                     tly_err_name(cases[c].rc));
        if (rc == TLY_OK)
            assert_int_equal(f->ev.time_ms, cases[c].ms);
    }
}

static void decode_time_missing_or_null_is_missing_time(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"user_id\":\"u\"}"), TLY_E_EV_MISSING_TIME);
    assert_int_equal(decode(f, "{\"user_id\":\"u\",\"ts\":null}"), TLY_E_EV_MISSING_TIME);
    assert_int_equal(decode(f, "{\"meta\":{\"ts\":1}}"), TLY_E_EV_MISSING_TIME);
    /* the Kafka timestamp is not a fallback when a time field is configured */
    assert_int_equal(tly_decode_json(f->dec, "{}", 2, 1700000000000, &f->ev),
                     TLY_E_EV_MISSING_TIME);
}

static void decode_time_seconds_convert_exactly_rounding_down(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *ts;
        tly_err_t rc;
        int64_t ms;
    } cases[] = {
        {"1700000000", TLY_OK, INT64_C(1700000000000)},
        {"1700000000.123", TLY_OK, INT64_C(1700000000123)},
        {"1700000000.1239", TLY_OK, INT64_C(1700000000123)},
        {"1700000000.9999", TLY_OK, INT64_C(1700000000999)},
        {"1700000000.1", TLY_OK, INT64_C(1700000000100)},
        {"1.7e9", TLY_OK, INT64_C(1700000000000)},
        {"17E8", TLY_OK, INT64_C(1700000000000)},
        {"1700000000123e-3", TLY_OK, INT64_C(1700000000123)},
        {"0.0015", TLY_OK, 1},
        {"-0", TLY_OK, 0},
        {"4133980799.999", TLY_OK, T_2101 - 1},
        {"4133980800", TLY_E_EV_BAD_TIME, 0},
        {"-1", TLY_E_EV_BAD_TIME, 0},
        {"-0.0001", TLY_E_EV_BAD_TIME, 0},
        {"1e999", TLY_E_EV_BAD_TIME, 0},
        {"\"1700000000\"", TLY_E_EV_BAD_TIME, 0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char p[128];
        snprintf(p, sizeof p, "{\"ts\":%s}", cases[c].ts);
        tly_err_t rc = decode(f, p);
        if (rc != cases[c].rc)
            fail_msg("ts %s: got %s, want %s", cases[c].ts, tly_err_name(rc),
                     tly_err_name(cases[c].rc));
        if (rc == TLY_OK)
            assert_int_equal(f->ev.time_ms, cases[c].ms);
    }
}

/* A payload of up to max_bytes = 16 MiB can hold ten million digits that
 * an exponent of over ten million offsets: 0.<10^7 zeros>17e10000010 s is
 * 17 × 10^-(10^7 + 2) × 10^(10^7 + 10) = 17 × 10^8 s, and
 * 1700000000000<10^7 zeros>e-10000000 ms is 1700000000000 ms. */
static void decode_time_offsets_exponents_beyond_a_million_exactly(void **state)
{
    (void)state;
    static const struct {
        const char *unit, *head, *tail;
    } cases[] = {
        {"s", "0.", "17e10000010"},
        {"ms", "1700000000000", "e-10000000"},
    };
    const size_t nzeros = 10000000;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char yaml[512], err[512] = "";
        snprintf(yaml, sizeof yaml,
                 "events:\n"
                 "  time: { field: ts, unit: %s }\n"
                 "  max_bytes: 16777216\n"
                 "features:\n"
                 "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1h] }\n",
                 cases[c].unit);
        tly_config_t *cfg = NULL;
        tly_featset_t *fs = NULL;
        if (tly_config_load_string(yaml, "test.yaml", &cfg, err, sizeof err) != TLY_OK ||
            tly_featset_compile(cfg, &fs, err, sizeof err) != TLY_OK)
            fail_msg("config: %s", err);
        tly_decoder_t *dec = tly_decoder_new(fs);
        size_t cap = nzeros + 64, n = 0;
        char *p = malloc(cap);
        assert_non_null(p);
        n += (size_t)snprintf(p, cap, "{\"ts\":%s", cases[c].head);
        memset(p + n, '0', nzeros);
        n += nzeros;
        n += (size_t)snprintf(p + n, cap - n, "%s}", cases[c].tail);
        tly_event_t ev;
        assert_int_equal(tly_decode_json(dec, p, n, -1, &ev), TLY_OK);
        assert_int_equal(ev.time_ms, INT64_C(1700000000000));
        free(p);
        tly_decoder_free(dec);
        tly_featset_free(fs);
        tly_config_free(cfg);
    }
}

static void decode_time_iso8601_field_reads_strings(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(decode(f, "{\"ts\":\"2026-11-22T04:16:21.123Z\",\"user_id\":\"u\"}"), TLY_OK);
    assert_int_equal(f->ev.time_ms, T_2026_11_22_041621 + 123);
    assert_str(val(f, "ts"), "2026-11-22T04:16:21.123Z");
    assert_int_equal(decode(f, "{\"ts\":\"2026-11-22T04:16:21\\u002b00:00\"}"), TLY_OK);
    assert_int_equal(f->ev.time_ms, T_2026_11_22_041621);
    assert_int_equal(decode(f, "{\"ts\":1795320981000}"), TLY_E_EV_BAD_TIME);
    assert_int_equal(decode(f, "{\"ts\":\"2026-02-30T00:00:00Z\"}"), TLY_E_EV_BAD_TIME);
    assert_int_equal(decode(f, "{\"ts\":\"\"}"), TLY_E_EV_BAD_TIME);
    assert_int_equal(decode(f, "{\"ts\":\"2026-11-22T04:16:21.1234567890123456789012345Z\"}"),
                     TLY_E_EV_BAD_TIME); /* over max_string: still a time error */
    assert_int_equal(decode(f, "{\"ts\":null}"), TLY_E_EV_MISSING_TIME);
}

static void assert_iso(const char *s, tly_err_t want_rc, int64_t want_ms)
{
    int64_t ms = -12345;
    tly_err_t rc = tly_decode_iso8601(s, strlen(s), &ms);
    if (rc != want_rc)
        fail_msg("%s: got %s, want %s", s, tly_err_name(rc), tly_err_name(want_rc));
    assert_int_equal(ms, rc == TLY_OK ? want_ms : -12345);
}

static void iso8601_parses_zulu_offsets_and_fractions(void **state)
{
    (void)state;
    const int64_t t = T_2026_11_22_041621;
    assert_iso("2026-11-22T04:16:21Z", TLY_OK, t);
    assert_iso("2026-11-22t04:16:21z", TLY_OK, t);
    assert_iso("2026-11-22T04:16:21.123Z", TLY_OK, t + 123);
    assert_iso("2026-11-22T04:16:21.1Z", TLY_OK, t + 100);
    assert_iso("2026-11-22T04:16:21.05Z", TLY_OK, t + 50);
    assert_iso("2026-11-22T04:16:21.123456789Z", TLY_OK, t + 123); /* rounds down */
    assert_iso("2026-11-22T04:16:21.9999Z", TLY_OK, t + 999);
    assert_iso("2026-11-22T06:16:21+02:00", TLY_OK, t);
    assert_iso("2026-11-21T22:46:21-05:30", TLY_OK, t);
    assert_iso("2026-11-22T04:16:21+00:00", TLY_OK, t);
    assert_iso("2026-11-22T04:16:21-00:00", TLY_OK, t);
    assert_iso("2026-11-23T04:15:21+23:59", TLY_OK, t);
    assert_iso("2026-11-22T06:16:21.5+02:00", TLY_OK, t + 500);
}

static void iso8601_validates_calendar_dates_and_leap_years(void **state)
{
    (void)state;
    /* 2024-02-29: 54 × 365 + 13 leap days to 2024-01-01, + 31 + 28 = day 19782. */
    assert_iso("2024-02-29T00:00:00Z", TLY_OK, INT64_C(19782) * 86400000);
    /* 2000 is a leap year (divisible by 400): day 30 × 365 + 7 + 59 = 11016. */
    assert_iso("2000-02-29T00:00:00Z", TLY_OK, INT64_C(11016) * 86400000);
    assert_iso("2023-02-29T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2100-02-29T00:00:00Z", TLY_E_EV_BAD_TIME, 0); /* not leap: divisible by 100 */
    assert_iso("2026-02-30T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-04-31T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-12-31T23:59:59Z", TLY_OK, INT64_C(1798761599000));
    assert_iso("2026-13-01T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-00-10T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-01-00T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-01-32T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-01-01T24:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-01-01T23:60:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2026-01-01T23:59:60Z", TLY_E_EV_BAD_TIME, 0);
}

static void iso8601_rejects_malformed_text(void **state)
{
    (void)state;
    static const char *const cases[] = {
        "",
        "2026-11-22",
        "2026-11-22T04:16:21",
        "2026-11-22 04:16:21Z",
        "2026-11-22T04:16Z",
        "2026/11/22T04:16:21Z",
        "26-11-22T04:16:21Z",
        "2026-1-22T04:16:21Z",
        "2026-11-22T04:16:21.Z",
        "2026-11-22T04:16:21,5Z",
        "2026-11-22T04:16:21+0200",
        "2026-11-22T04:16:21+02",
        "2026-11-22T04:16:21+02:0",
        "2026-11-22T04:16:21+24:00",
        "2026-11-22T04:16:21+02:60",
        "2026-11-22T04:16:21Zjunk",
        "2026-11-22T04:16:21Z ",
        " 2026-11-22T04:16:21Z",
        "+2026-11-22T04:16:21Z",
        "2026-11-22T04:16:2aZ",
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        assert_iso(cases[c], TLY_E_EV_BAD_TIME, 0);
    int64_t ms = -1;
    /* only len bytes are read */
    assert_int_equal(tly_decode_iso8601("2026-11-22T04:16:21Zjunk", 20, &ms), TLY_OK);
    assert_int_equal(ms, T_2026_11_22_041621);
    assert_int_equal(tly_decode_iso8601("2026-11-22T04:16:21Z", 19, &ms), TLY_E_EV_BAD_TIME);
}

static void iso8601_rejects_times_outside_1970_to_2100(void **state)
{
    (void)state;
    assert_iso("1970-01-01T00:00:00Z", TLY_OK, 0);
    assert_iso("1970-01-01T01:00:00+01:00", TLY_OK, 0);
    assert_iso("1969-12-31T23:59:59.999Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("1970-01-01T00:30:00+01:00", TLY_E_EV_BAD_TIME, 0);
    assert_iso("0000-01-01T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2100-12-31T23:59:59.999Z", TLY_OK, T_2101 - 1);
    assert_iso("2101-01-01T00:00:00Z", TLY_E_EV_BAD_TIME, 0);
    assert_iso("2100-12-31T23:00:00-01:00", TLY_E_EV_BAD_TIME, 0);
    assert_iso("9999-12-31T23:59:59Z", TLY_E_EV_BAD_TIME, 0);
}

static void decode_uses_kafka_timestamp_without_time_field(void **state)
{
    fixture_t *f = *state;
    const char *p = "{\"user_id\":\"u\",\"ts\":5}";
    assert_int_equal(f->fs->time_field, -1);
    assert_int_equal(f->ev.nfields, 0);
    assert_int_equal(tly_decode_json(f->dec, p, strlen(p), INT64_C(1700000000123), &f->ev), TLY_OK);
    assert_int_equal(f->ev.time_ms, INT64_C(1700000000123));
    assert_int_equal(f->ev.nfields, 7); /* no ts field */
    assert_int_equal(tly_featset_field(f->fs, "ts", 2), -1);
    assert_int_equal(tly_decode_json(f->dec, p, strlen(p), 0, &f->ev), TLY_OK);
    assert_int_equal(f->ev.time_ms, 0);
    assert_int_equal(tly_decode_json(f->dec, p, strlen(p), -1, &f->ev), TLY_E_EV_MISSING_TIME);
}

/* One decoder per topic: each reads its own time field and limits and
 * ignores the other topics' time fields. */
static void decode_with_topic_rules_reads_that_topics_time_and_limits(void **state)
{
    (void)state;
    char err[512] = "";
    tly_config_t *cfg = NULL;
    tly_featset_t *fs = NULL;
    if (tly_config_load_string(
            "kafka:\n"
            "  topics:\n"
            "    - plain\n"
            "    - { name: ta, events: { time: { field: ts, unit: ms }, max_future_skew: 2m } }\n"
            "    - { name: tb, events: { time: { field: at, unit: iso8601 }, max_bytes: 100,"
            " max_string: 300 } }\n"
            "events: { max_future_skew: 30s, max_string: 16 }\n"
            "features:\n"
            "  - { name: n, entity: user, key: user_id, agg: count, windows: [1h] }\n"
            "  - { name: l, entity: user, key: user_id, agg: last, value: action }\n",
            "t.yaml", &cfg, err, sizeof err) != TLY_OK ||
        tly_featset_compile(cfg, &fs, err, sizeof err) != TLY_OK)
        fail_msg("%s", err);
    tly_decoder_t *plain = tly_decoder_new_rules(fs, &fs->topics[0]);
    tly_decoder_t *ta = tly_decoder_new_rules(fs, &fs->topics[1]);
    tly_decoder_t *tb = tly_decoder_new_rules(fs, &fs->topics[2]);
    tly_event_t ev;
    const char *both = "{\"user_id\":\"u\",\"ts\":1700000000123,\"at\":\"2026-11-22T04:16:21.5Z\"}";
    assert_int_equal(tly_decode_json(plain, both, strlen(both), 42, &ev), TLY_OK);
    assert_int_equal(ev.time_ms, 42);
    assert_int_equal(ev.vals[2].type, TLY_V_NIL); /* not this topic's business */
    assert_int_equal(ev.vals[3].type, TLY_V_NIL);
    assert_int_equal(tly_decode_json(ta, both, strlen(both), 42, &ev), TLY_OK);
    assert_int_equal(ev.time_ms, INT64_C(1700000000123));
    assert_int_equal(ev.vals[3].type, TLY_V_NIL);
    assert_int_equal(tly_decode_json(tb, both, strlen(both), 42, &ev), TLY_OK);
    /* 2026-11-22: 20779 days after 1970-01-01 */
    assert_int_equal(ev.time_ms, INT64_C(20779) * 86400000 + 4 * 3600000 + 16 * 60000 + 21500);
    assert_int_equal(ev.vals[2].type, TLY_V_NIL);

    /* a bad "at" is a time error for tb only; ta does not read it */
    const char *bad_at = "{\"user_id\":\"u\",\"ts\":1700000000123,\"at\":[1]}";
    assert_int_equal(tly_decode_json(ta, bad_at, strlen(bad_at), 42, &ev), TLY_OK);
    assert_int_equal(tly_decode_json(tb, bad_at, strlen(bad_at), 42, &ev), TLY_E_EV_BAD_TIME);
    assert_int_equal(tly_decode_json(ta, "{\"user_id\":\"u\"}", 15, 42, &ev),
                     TLY_E_EV_MISSING_TIME);

    /* limits: tb takes 100 bytes and 300-byte strings; ta the top level's 16 */
    char big[200];
    int n = snprintf(big, sizeof big,
                     "{\"user_id\":\"u\",\"ts\":1,\"at\":\"2026-11-22T04:16:21Z\","
                     "\"action\":\"%070d\"}",
                     0);
    assert_true(n > 100 && n < 200);
    assert_int_equal(tly_decode_json(tb, big, (size_t)n, 42, &ev), TLY_E_EV_TOO_LARGE);
    assert_int_equal(tly_decode_json(ta, big, (size_t)n, 42, &ev), TLY_E_EV_VALUE_TOO_LONG);
    const char *str20 = "{\"user_id\":\"u\",\"at\":\"2026-11-22T04:16:21Z\",\"action\":"
                        "\"aaaaaaaaaaaaaaaaaaaa\"}";
    assert_int_equal(tly_decode_json(tb, str20, strlen(str20), 42, &ev), TLY_OK);
    assert_int_equal(ev.vals[1].len, 20);

    tly_decoder_free(plain);
    tly_decoder_free(ta);
    tly_decoder_free(tb);
    tly_featset_free(fs);
    tly_config_free(cfg);
}

/* --- shapes ------------------------------------------------------------------ */

/* A copy of payload[0..n) that starts where an unreadable page ends, so
 * that reading a byte before it faults. */
static char *front_guarded_copy(const char *payload, size_t n, void **map, size_t *maplen)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    assert_true(n <= page);
    *maplen = 2 * page;
    *map = mmap(NULL, *maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(*map != MAP_FAILED);
    assert_int_equal(mprotect(*map, page, PROT_NONE), 0);
    char *start = (char *)*map + page;
    memcpy(start, payload, n);
    return start;
}

/* Whether two decoded events hold the same values (strings by their bytes,
 * doubles by their bits). */
static bool same_event(const tly_featset_t *fs, const tly_event_t *a, const tly_event_t *b)
{
    if (a->nfields != b->nfields || a->time_ms != b->time_ms)
        return false;
    for (size_t i = 0; i < fs->nfields; i++) {
        const tly_value_t *x = &a->vals[i], *y = &b->vals[i];
        if (x->type != y->type)
            return false;
        switch (x->type) {
        case TLY_V_STR:
            if (x->len != y->len || memcmp(x->u.s, y->u.s, x->len) != 0)
                return false;
            break;
        case TLY_V_INT:
        case TLY_V_BOOL:
            if (x->u.i != y->u.i)
                return false;
            break;
        case TLY_V_DOUBLE:
            if (memcmp(&x->u.d, &y->u.d, sizeof x->u.d) != 0)
                return false;
            break;
        default:
            break;
        }
    }
    return true;
}

/* A decoder reads payloads of a shape it learnt (the bytes between the
 * values of an accepted event) by comparing those bytes and scanning the
 * values alone. The grammar walk is the oracle: a decoder with shapes off
 * must give the same result and, when it accepts, the same values, for
 * the payloads that taught the shapes and for thousands of variants of
 * them (a byte replaced, inserted or deleted, the payload cut short), each
 * placed against an unreadable page on one side or the other. */
/* Decodes with a Kafka timestamp, for the config without a time field. */
static tly_err_t shape_dec(fixture_t *f, const char *payload, size_t len)
{
    return tly_decode_json(f->dec, payload, len, 1764300000000, &f->ev);
}

static void decode_by_shapes_equals_the_grammar_walk(void **state)
{
    (void)state;
    static const char *const bases[] = {
        "{\"user_id\": 17, \"pin_id\": 90210, \"action\": \"click\", \"dwell\": 5400, "
        "\"ts\": 1764300000123}",
        "{\"user_id\": 17, \"pin_id\": 90210, \"action\": \"hide\", \"ts\": 1764300000123}",
        "{\"ts\":1764300000123,\"action\":\"a much longer action text\",\"score\":-2.5e3,"
        "\"pin_id\":\"p-\\u00e9\\n\"}",
        "  {\"user_id\":-5 , \"unref\": \"zzz\", \"ctx\": \"1234567\", \"ts\": 1764300000999 }  ",
        "\xEF\xBB\xBF{\"ts\": 1764300000000, \"action\": \"save\"}",
        "{\"us\\u0065r_id\": 3, \"ts\": 1764300000001, \"action\": \"save\", \"flag\": 12}",
        "{\"ts\": 1764300000002, \"pin_id\": 123456789012345678901234, \"dwell\": 0, "
        "\"action\": \"\xC3\xA9\"}",
        "{\"ts\": 1764300000003, \"meta\": {\"a\": [1, 2]}, \"action\": \"x\", \"flag\": true}",
        "{\"action\":\"click\",\"ts\":1764300000004}",
        "{\"ts\":1764300000005,\"dwell\":7}",
        "{\"ts\":1764300000006,\"action\":\"click\",\"action\":\"save\",\"dwell\":1e2}",
        "{}",
    };
    static const char interesting[] = "0123456789-+.eE\"\\,:{}[] \t\n\rax\x00\x1f\x7f\x80\xC3\xFF";
    const char *const times[] = {ms_time, kafka_time};
    uint64_t r = 0x2545F4914F6CDD1D;
    size_t shaped_variants = 0, variants = 0, accepted = 0;
    for (int tm = 0; tm < 2; tm++) {
        fixture_t *a = fixture_new(times[tm]), *b = fixture_new(times[tm]);
        tly_decoder_set_shapes(b->dec, false);
        const size_t nb = sizeof bases / sizeof bases[0];
        for (size_t k = 0; k < nb; k++) {
            /* the base, enough times that it teaches a shape (one event in
             * SHAPE_LEARN_RATE that no shape reads does) */
            for (int i = 0; i < 20; i++) {
                size_t n = strlen(bases[k]);
                tly_err_t ra = shape_dec(a, bases[k], n), rb = shape_dec(b, bases[k], n);
                assert_int_equal(ra, rb);
                if (ra == TLY_OK && !same_event(a->fs, &a->ev, &b->ev))
                    fail_msg("base %zu decoded apart", k);
            }
            for (int m = 0; m < 700; m++) {
                char v[256];
                size_t n = strlen(bases[k]);
                memcpy(v, bases[k], n);
                r ^= r << 13, r ^= r >> 7, r ^= r << 17;
                size_t pos = (size_t)(r >> 8) % (n + 1);
                char c = interesting[(r >> 40) % (sizeof interesting - 1)];
                switch (r % 4) {
                case 0: /* replace */
                    if (pos < n)
                        v[pos] = c;
                    break;
                case 1: /* insert */
                    memmove(v + pos + 1, v + pos, n - pos);
                    v[pos] = c;
                    n++;
                    break;
                case 2: /* delete */
                    if (pos < n) {
                        memmove(v + pos, v + pos + 1, n - pos - 1);
                        n--;
                    }
                    break;
                default: /* cut short */
                    n = pos;
                    break;
                }
                /* the base first, so that its shape is the one tried first */
                assert_int_equal(shape_dec(a, bases[k], strlen(bases[k])),
                                 shape_dec(b, bases[k], strlen(bases[k])));
                void *map;
                size_t maplen;
                const char *p = (m & 1) ? guarded_copy(v, n, &map, &maplen)
                                        : front_guarded_copy(v, n, &map, &maplen);
                uint64_t before = tly_decoder_shaped(a->dec);
                tly_err_t ra = shape_dec(a, p, n), rb = shape_dec(b, p, n);
                if (ra != rb)
                    fail_msg("base %zu, variant %d (%.*s): %d by shape, %d by the walk", k, m,
                             (int)n, v, (int)ra, (int)rb);
                if (ra == TLY_OK && !same_event(a->fs, &a->ev, &b->ev))
                    fail_msg("base %zu, variant %d (%.*s): values differ", k, m, (int)n, v);
                shaped_variants += tly_decoder_shaped(a->dec) > before;
                accepted += ra == TLY_OK;
                variants++;
                munmap(map, maplen);
            }
        }
        assert_int_equal(tly_decoder_shaped(b->dec), 0);
        fixture_free(a);
        fixture_free(b);
    }
    /* not vacuous: shapes read a good part of the variants (most of the
     * rest lost their shape to the mutation), and the walk accepted some
     * and rejected others */
    assert_true(variants == 2 * 12 * 700);
    assert_true(shaped_variants > variants / 8);
    assert_true(accepted > variants / 4 && accepted < variants);
}

/* --- fuzz corpus ------------------------------------------------------------ */

static bool is_decode_result(tly_err_t rc)
{
    switch (rc) {
    case TLY_OK:
    case TLY_E_EV_TOO_LARGE:
    case TLY_E_EV_BAD_JSON:
    case TLY_E_EV_NOT_OBJECT:
    case TLY_E_EV_TOO_COMPLEX:
    case TLY_E_EV_WRONG_TYPE:
    case TLY_E_EV_VALUE_TOO_LONG:
    case TLY_E_EV_MISSING_TIME:
    case TLY_E_EV_BAD_TIME:
        return true;
    default:
        return false;
    }
}

/* Each corpus file decoded under the four time rules (ctx: the fixtures). */
static void decode_corpus_check(void *ctx, const char *path, const uint8_t *buf, size_t len)
{
    fixture_t **fx = ctx;
    for (int k = 0; k < 4; k++) {
        tly_err_t rc =
            tly_decode_json(fx[k]->dec, (const char *)buf, len, 1700000000000, &fx[k]->ev);
        if (!is_decode_result(rc))
            fail_msg("%s: unexpected result %d", path, (int)rc);
    }
}

static void decode_replays_fuzz_corpus_without_crashing(void **state)
{
    (void)state;
    fixture_t *fx[4] = {fixture_new(ms_time), fixture_new(s_time), fixture_new(iso_time),
                        fixture_new(kafka_time)};
    assert_true(corpus_replay(CORPUS_DIR, decode_corpus_check, fx) >= 10);
    for (int k = 0; k < 4; k++)
        fixture_free(fx[k]);
}

#define FIXTURE_TEST(fn, setup) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        FIXTURE_TEST(decode_extracts_referenced_fields_and_time, setup_ms),
        FIXTURE_TEST(decode_skips_a_leading_byte_order_mark_only, setup_ms),
        FIXTURE_TEST(decode_leaves_absent_fields_nil_across_calls, setup_ms),
        FIXTURE_TEST(decode_borrows_unescaped_strings_from_the_payload, setup_ms),
        FIXTURE_TEST(decode_accepts_whitespace_between_tokens, setup_ms),
        FIXTURE_TEST(decode_last_duplicate_key_wins, setup_ms),
        FIXTURE_TEST(decode_bad_value_of_a_repeated_key_rejects_even_if_the_last_is_fine, setup_ms),
        FIXTURE_TEST(decode_skips_nested_values_under_unreferenced_keys, setup_ms),
        FIXTURE_TEST(decode_types_integers_and_doubles, setup_ms),
        FIXTURE_TEST(decode_reads_integers_of_every_length, setup_ms),
        FIXTURE_TEST(decode_rejects_number_beyond_double_range_as_wrong_type, setup_ms),
        FIXTURE_TEST(decode_decodes_simple_escapes, setup_ms),
        FIXTURE_TEST(decode_decodes_unicode_escapes_to_utf8, setup_ms),
        FIXTURE_TEST(decode_checks_every_byte_position_of_strings, setup_ms),
        FIXTURE_TEST(decode_reads_plain_strings_of_every_length_near_the_end, setup_ms),
        cmocka_unit_test(decode_tells_apart_keys_sharing_their_first_eight_bytes),
        FIXTURE_TEST(decode_passes_raw_utf8_through, setup_ms),
        FIXTURE_TEST(decode_matches_keys_written_with_escapes, setup_ms),
        FIXTURE_TEST(decode_keeps_escaped_values_valid_until_the_next_call, setup_ms),
        FIXTURE_TEST(decode_rejects_payload_over_max_bytes, setup_ms),
        FIXTURE_TEST(decode_rejects_invalid_json, setup_ms),
        FIXTURE_TEST(decode_rejects_top_level_non_objects, setup_ms),
        FIXTURE_TEST(decode_rejects_more_tokens_than_the_cap, setup_ms),
        FIXTURE_TEST(decode_tells_too_complex_from_bad_json_left_to_right, setup_ms),
        FIXTURE_TEST(decode_rejects_object_or_array_under_a_referenced_key, setup_ms),
        FIXTURE_TEST(decode_rejects_strings_longer_than_max_string, setup_ms),
        FIXTURE_TEST(decode_time_ms_accepts_integral_numbers_only, setup_ms),
        FIXTURE_TEST(decode_time_missing_or_null_is_missing_time, setup_ms),
        FIXTURE_TEST(decode_time_seconds_convert_exactly_rounding_down, setup_s),
        cmocka_unit_test(decode_time_offsets_exponents_beyond_a_million_exactly),
        FIXTURE_TEST(decode_time_iso8601_field_reads_strings, setup_iso),
        cmocka_unit_test(iso8601_parses_zulu_offsets_and_fractions),
        cmocka_unit_test(iso8601_validates_calendar_dates_and_leap_years),
        cmocka_unit_test(iso8601_rejects_malformed_text),
        cmocka_unit_test(iso8601_rejects_times_outside_1970_to_2100),
        FIXTURE_TEST(decode_uses_kafka_timestamp_without_time_field, setup_kafka),
        cmocka_unit_test(decode_with_topic_rules_reads_that_topics_time_and_limits),
        cmocka_unit_test(decode_by_shapes_equals_the_grammar_walk),
        cmocka_unit_test(decode_replays_fuzz_corpus_without_crashing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
