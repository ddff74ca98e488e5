/*
 * test_resp.c — the RESP codec (resp.c): every reply writer in RESP2 and
 * RESP3 with its exact bytes; the request parser's happy paths (multibulk,
 * binary-safe bulks, pipelining, inline with quotes and escapes, mixed),
 * every protocol error with its exact message, the limits, incremental
 * delivery (byte by byte gives what whole delivery gives, and costs linear
 * work), and a replay of the fuzz corpus (tests/fuzz/corpus/resp/, read
 * relative to the repository root) through the fuzz target's own checks.
 *
 * Expected replies are written out by hand from the RESP specification.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "corpus.h"
#include <math.h>

#include "tallyd/resp.h"

/* The fuzz target's checks, failing the test instead of aborting. */
#define TLY_FUZZ_RESP_NO_ENTRY
#define RESP_CHECK_FAIL(what) fail_msg("fuzz check: %s", what)
#include "../fuzz/fuzz_resp.c"

#define CORPUS_DIR "tests/fuzz/corpus/resp"

static const tly_resp_limits_t default_limits = {
    .max_args = 65536, .max_bulk = 512u * 1024 * 1024, .max_inline = 65536};

/* ---- writer ------------------------------------------------------------- */

/* Asserts that b holds exactly want[0..n) and empties it. */
static void expect_bytes(tly_buf_t *b, const char *want, size_t n)
{
    if (b->len != n || memcmp(b->data, want, n) != 0)
        fail_msg("reply is \"%.*s\" (%zu bytes), want \"%.*s\" (%zu bytes)", (int)b->len,
                 b->data ? b->data : "", b->len, (int)n, want, n);
    b->len = 0;
}

#define EXPECT(b, lit) expect_bytes((b), (lit), sizeof(lit) - 1)

static void simple_writes_plus_line_and_replaces_cr_lf(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_simple(&b, "OK");
    EXPECT(&b, "+OK\r\n");
    tly_resp_simple(&b, "a\r\nb\nc\rd");
    EXPECT(&b, "+a  b c d\r\n");
    tly_resp_simple(&b, "");
    EXPECT(&b, "+\r\n");
    tly_buf_fini(&b);
}

static void error_writes_minus_line_and_replaces_cr_lf(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_error(&b, "ERR unknown command 'x'");
    EXPECT(&b, "-ERR unknown command 'x'\r\n");
    tly_resp_error(&b, "NOFEATURE no\r\nsuch");
    EXPECT(&b, "-NOFEATURE no  such\r\n");
    tly_resp_errorf(&b, "ERR %d things in %s", 42, "a\nb");
    EXPECT(&b, "-ERR 42 things in a b\r\n");
    tly_buf_fini(&b);
}

static void errorf_formats_messages_longer_than_its_stack_buffer(void **state)
{
    (void)state;
    char word[1001];
    memset(word, 'w', 1000);
    word[1000] = '\0';
    tly_buf_t b = {0};
    tly_resp_errorf(&b, "ERR %s!", word);
    assert_int_equal(b.len, 1 + 4 + 1000 + 1 + 2);
    assert_memory_equal(b.data, "-ERR www", 8);
    assert_memory_equal(b.data + b.len - 5, "ww!\r\n", 5);
    tly_buf_fini(&b);
}

static void int_writes_colon_line_across_the_int64_range(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_int(&b, 0);
    EXPECT(&b, ":0\r\n");
    tly_resp_int(&b, -1);
    EXPECT(&b, ":-1\r\n");
    tly_resp_int(&b, INT64_MAX);
    EXPECT(&b, ":9223372036854775807\r\n");
    tly_resp_int(&b, INT64_MIN);
    EXPECT(&b, ":-9223372036854775808\r\n");
    tly_buf_fini(&b);
}

static void bulk_writes_length_prefixed_binary_safe_strings(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_bulk(&b, "hello", 5);
    EXPECT(&b, "$5\r\nhello\r\n");
    tly_resp_bulk(&b, "", 0);
    EXPECT(&b, "$0\r\n\r\n");
    tly_resp_bulk(&b, "a\r\n\0b", 5);
    EXPECT(&b, "$5\r\na\r\n\0b\r\n");
    tly_resp_bulkstr(&b, "clicks:1h");
    EXPECT(&b, "$9\r\nclicks:1h\r\n");
    tly_buf_fini(&b);
}

static void null_is_dollar_minus_one_in_resp2_and_underscore_in_resp3(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_null(&b, 2);
    EXPECT(&b, "$-1\r\n");
    tly_resp_null(&b, 3);
    EXPECT(&b, "_\r\n");
    tly_buf_fini(&b);
}

static void aggregates_are_flat_arrays_in_resp2_and_typed_in_resp3(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_array(&b, 0);
    EXPECT(&b, "*0\r\n");
    tly_resp_array(&b, 3);
    EXPECT(&b, "*3\r\n");
    tly_resp_map(&b, 2, 3);
    EXPECT(&b, "*6\r\n");
    tly_resp_map(&b, 3, 3);
    EXPECT(&b, "%3\r\n");
    tly_resp_set(&b, 2, 4);
    EXPECT(&b, "*4\r\n");
    tly_resp_set(&b, 3, 4);
    EXPECT(&b, "~4\r\n");
    tly_buf_fini(&b);
}

static void bool_is_integer_in_resp2_and_hash_in_resp3(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_bool(&b, 2, true);
    EXPECT(&b, ":1\r\n");
    tly_resp_bool(&b, 2, false);
    EXPECT(&b, ":0\r\n");
    tly_resp_bool(&b, 3, true);
    EXPECT(&b, "#t\r\n");
    tly_resp_bool(&b, 3, false);
    EXPECT(&b, "#f\r\n");
    tly_buf_fini(&b);
}

static void double_prints_the_shortest_text_that_reads_back_exactly(void **state)
{
    (void)state;
    static const struct {
        double v;
        const char *text;
    } cases[] = {
        {1.5, "1.5"},
        {0.1, "0.1"},
        {3.0, "3"},
        {0.0, "0"},
        {-0.0, "-0"},
        {-2.25, "-2.25"},
        {100.0, "100"}, /* not %g's shortest "1e+02" */
        {-100.0, "-100"},
        {1500.0, "1500"},
        {1e16, "10000000000000000"},
        {1e17, "1e+17"},
        {0.0001, "0.0001"},
        {1e-5, "1e-05"},
        {1e300, "1e+300"},
        {1e21, "1e+21"},
        {5e-324, "5e-324"},                 /* the smallest subnormal */
        {1.0 / 3.0, "0.3333333333333333"},  /* 16 digits suffice */
        {0.1 + 0.2, "0.30000000000000004"}, /* not 0.3 */
        {123456.789, "123456.789"},
        {9007199254740993.0, "9007199254740992"}, /* 2^53 + 1 rounds to 2^53 */
    };
    tly_buf_t b = {0};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char want[64];
        int n = snprintf(want, sizeof want, ",%s\r\n", cases[i].text);
        tly_resp_double(&b, 3, cases[i].v);
        expect_bytes(&b, want, (size_t)n);
        n = snprintf(want, sizeof want, "$%zu\r\n%s\r\n", strlen(cases[i].text), cases[i].text);
        tly_resp_double(&b, 2, cases[i].v);
        expect_bytes(&b, want, (size_t)n);
    }
    tly_buf_fini(&b);
}

static void double_text_reads_back_exactly_for_random_bit_patterns(void **state)
{
    (void)state;
    uint64_t x = 0x9E3779B97F4A7C15u; /* xorshift64, fixed seed */
    tly_buf_t b = {0};
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        double v;
        memcpy(&v, &x, sizeof v);
        if (!isfinite(v))
            continue;
        tly_resp_double(&b, 3, v);
        assert_true(b.len >= 4 && b.len < 40);
        assert_int_equal(b.data[0], ',');
        assert_memory_equal(b.data + b.len - 2, "\r\n", 2);
        char text[40];
        memcpy(text, b.data + 1, b.len - 3);
        text[b.len - 3] = '\0';
        if (strtod(text, NULL) != v)
            fail_msg("%s does not read back as %a", text, v);
        b.len = 0;
    }
    tly_buf_fini(&b);
}

static void double_writes_inf_and_nan_as_the_resp3_spec_spells_them(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_double(&b, 3, INFINITY);
    EXPECT(&b, ",inf\r\n");
    tly_resp_double(&b, 3, -INFINITY);
    EXPECT(&b, ",-inf\r\n");
    tly_resp_double(&b, 3, NAN);
    EXPECT(&b, ",nan\r\n");
    tly_resp_double(&b, 2, INFINITY);
    EXPECT(&b, "$3\r\ninf\r\n");
    tly_resp_double(&b, 2, -INFINITY);
    EXPECT(&b, "$4\r\n-inf\r\n");
    tly_resp_double(&b, 2, NAN);
    EXPECT(&b, "$3\r\nnan\r\n");
    tly_buf_fini(&b);
}

static void verbatim_is_txt_typed_in_resp3_and_bulk_in_resp2(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_verbatim(&b, 3, "# Server\r\nv:1\r\n", 15);
    EXPECT(&b, "=19\r\ntxt:# Server\r\nv:1\r\n\r\n");
    tly_resp_verbatim(&b, 2, "# Server\r\nv:1\r\n", 15);
    EXPECT(&b, "$15\r\n# Server\r\nv:1\r\n\r\n");
    tly_resp_verbatim(&b, 3, "", 0);
    EXPECT(&b, "=4\r\ntxt:\r\n");
    tly_buf_fini(&b);
}

static void value_writes_each_type_in_both_protocols(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_value_t v = {.type = TLY_V_NIL};
    tly_resp_value(&b, 2, &v);
    EXPECT(&b, "$-1\r\n");
    tly_resp_value(&b, 3, &v);
    EXPECT(&b, "_\r\n");

    v = (tly_value_t){.type = TLY_V_INT, .u.i = -42};
    tly_resp_value(&b, 2, &v);
    EXPECT(&b, ":-42\r\n");
    tly_resp_value(&b, 3, &v);
    EXPECT(&b, ":-42\r\n");

    v = (tly_value_t){.type = TLY_V_DOUBLE, .u.d = 0.25};
    tly_resp_value(&b, 2, &v);
    EXPECT(&b, "$4\r\n0.25\r\n");
    tly_resp_value(&b, 3, &v);
    EXPECT(&b, ",0.25\r\n");

    v = (tly_value_t){.type = TLY_V_STR, .len = 5, .u.s = "pin:7xyz"};
    tly_resp_value(&b, 2, &v);
    EXPECT(&b, "$5\r\npin:7\r\n");
    tly_resp_value(&b, 3, &v);
    EXPECT(&b, "$5\r\npin:7\r\n");

    v = (tly_value_t){.type = TLY_V_BOOL, .u.i = 1};
    tly_resp_value(&b, 2, &v);
    EXPECT(&b, ":1\r\n");
    tly_resp_value(&b, 3, &v);
    EXPECT(&b, "#t\r\n");
    v.u.i = 0;
    tly_resp_value(&b, 3, &v);
    EXPECT(&b, "#f\r\n");
    tly_buf_fini(&b);
}

static void replies_append_after_earlier_ones(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    tly_resp_map(&b, 3, 1);
    tly_resp_bulkstr(&b, "clicks:1h");
    tly_resp_int(&b, 7);
    EXPECT(&b, "%1\r\n$9\r\nclicks:1h\r\n:7\r\n");
    tly_buf_fini(&b);
}

static void buf_grows_geometrically_and_consume_keeps_the_tail(void **state)
{
    (void)state;
    tly_buf_t b = {0};
    size_t reallocs = 0, last_cap = 0;
    for (int i = 0; i < 100000; i++) {
        char c = (char)('a' + i % 26);
        tly_buf_append(&b, &c, 1);
        if (b.cap != last_cap) {
            reallocs++;
            assert_true(last_cap == 0 || b.cap >= 2 * last_cap);
            last_cap = b.cap;
        }
    }
    assert_int_equal(b.len, 100000);
    assert_true(reallocs <= 20); /* 64 · 2^11 > 100000: 12 sizes */
    tly_buf_consume(&b, 99990);
    assert_int_equal(b.len, 10);
    /* byte 99990 is 'a' + 99990 % 26 = 'a' + 20 */
    assert_memory_equal(b.data, "uvwxyzabcd", 10);

    char *w = tly_buf_reserve(&b, 5);
    assert_ptr_equal(w, b.data + 10);
    assert_true(b.cap - b.len >= 5);
    memcpy(w, "12345", 5);
    b.len += 5;
    assert_memory_equal(b.data, "uvwxyzabcd12345", 15);
    tly_buf_consume(&b, 15);
    assert_int_equal(b.len, 0);
    tly_buf_append(&b, NULL, 0);
    assert_int_equal(b.len, 0);
    tly_buf_fini(&b);
    assert_null(b.data);
    assert_int_equal(b.cap, 0);
    tly_buf_append(&b, "x", 1); /* reusable after fini */
    assert_int_equal(b.len, 1);
    tly_buf_fini(&b);
}

/* ---- parser helpers ----------------------------------------------------- */

static tly_resp_parser_t *parser_new(size_t max_args, size_t max_bulk, size_t max_inline)
{
    tly_resp_parser_t *p = malloc(sizeof *p);
    assert_non_null(p);
    tly_resp_limits_t lim = {.max_args = max_args, .max_bulk = max_bulk, .max_inline = max_inline};
    tly_resp_parser_init(p, &lim);
    return p;
}

static tly_resp_parser_t *parser_default(void)
{
    return parser_new(default_limits.max_args, default_limits.max_bulk, default_limits.max_inline);
}

static void parser_free(tly_resp_parser_t *p)
{
    tly_resp_parser_fini(p);
    free(p);
}

/* Asserts argument i of the last request equals want[0..n). */
static void expect_arg_n(tly_resp_parser_t *p, const char *in, size_t i, const char *want, size_t n)
{
    size_t len = 0;
    const char *arg = tly_resp_arg(p, in, i, &len);
    if (len != n || memcmp(arg, want, n) != 0)
        fail_msg("arg %zu is \"%.*s\" (%zu bytes), want \"%.*s\" (%zu bytes)", i, (int)len, arg,
                 len, (int)n, want, n);
}

static void expect_arg(tly_resp_parser_t *p, const char *in, size_t i, const char *want)
{
    expect_arg_n(p, in, i, want, strlen(want));
}

/* Parses in[0..len) expecting a request of the given NULL-terminated
 * arguments, consuming `consumed` bytes. */
static void expect_request_n(tly_resp_parser_t *p, const char *in, size_t len, size_t consumed,
                             const char *const *args)
{
    size_t got = 0;
    tly_resp_status_t st = tly_resp_parse(p, in, len, &got);
    if (st != TLY_RESP_REQUEST)
        fail_msg("status %d (err \"%s\"), want a request", (int)st, p->err);
    assert_int_equal(got, consumed);
    size_t n = 0;
    while (args[n] != NULL) {
        expect_arg(p, in, n, args[n]);
        n++;
    }
    assert_int_equal(p->argc, n);
}

/* Parses the NUL-terminated in expecting an error with message msg. */
static void expect_error_n(tly_resp_parser_t *p, const char *in, size_t len, const char *msg)
{
    size_t got = 999;
    tly_resp_status_t st = tly_resp_parse(p, in, len, &got);
    if (st != TLY_RESP_ERROR)
        fail_msg("\"%.*s\": status %d, want error \"%s\"", (int)len, in, (int)st, msg);
    assert_string_equal(p->err, msg);
    assert_int_equal(got, 999);
    tly_resp_parser_reset(p);
}

static void expect_error(tly_resp_parser_t *p, const char *in, const char *msg)
{
    expect_error_n(p, in, strlen(in), msg);
}

static void expect_status(tly_resp_parser_t *p, const char *in, size_t len, tly_resp_status_t want,
                          size_t want_consumed)
{
    size_t got = 0;
    tly_resp_status_t st = tly_resp_parse(p, in, len, &got);
    if (st != want)
        fail_msg("\"%.*s\": status %d (err \"%s\"), want %d", (int)len, in, (int)st, p->err,
                 (int)want);
    if (want == TLY_RESP_REQUEST || want == TLY_RESP_EMPTY)
        assert_int_equal(got, want_consumed);
}

#define ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* ---- parser: happy paths ------------------------------------------------ */

static void multibulk_request_gives_offsets_into_the_input(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    const char *in = "*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n";
    expect_request_n(p, in, strlen(in), strlen(in), ARGS("ECHO", "hi"));
    assert_int_equal(p->args[0].off, 8);
    assert_int_equal(p->args[0].len, 4);
    assert_int_equal(p->args[1].off, 18);
    assert_int_equal(p->args[1].len, 2);
    const tly_arg_t *argv = tly_resp_argv(p, in);
    assert_ptr_equal(argv[0].ptr, in + 8);
    assert_int_equal(argv[0].len, 4);
    assert_ptr_equal(argv[1].ptr, in + 18);
    assert_false(tly_resp_parser_pending(p));
    parser_free(p);
}

static void multibulk_bulks_are_binary_safe(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    static const char in[] = "*3\r\n$3\r\nSET\r\n$0\r\n\r\n$6\r\na\r\n\0b\n\r\n";
    size_t len = sizeof in - 1;
    size_t got = 0;
    assert_int_equal(tly_resp_parse(p, in, len, &got), TLY_RESP_REQUEST);
    assert_int_equal(got, len);
    assert_int_equal(p->argc, 3);
    expect_arg(p, in, 0, "SET");
    expect_arg_n(p, in, 1, "", 0);
    expect_arg_n(p, in, 2, "a\r\n\0b\n", 6);
    parser_free(p);
}

static void pipelined_requests_parse_one_after_another(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    const char *in = "*1\r\n$4\r\nPING\r\n"              /* 14 bytes */
                     "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"    /* 20 bytes */
                     "*0\r\n"                            /* 4 bytes, empty */
                     "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1"; /* incomplete */
    size_t len = strlen(in), off = 0;
    expect_request_n(p, in + off, len - off, 14, ARGS("PING"));
    off += 14;
    expect_request_n(p, in + off, len - off, 20, ARGS("GET", "k"));
    off += 20;
    expect_status(p, in + off, len - off, TLY_RESP_EMPTY, 4);
    off += 4;
    expect_status(p, in + off, len - off, TLY_RESP_NEED, 0);
    assert_true(tly_resp_parser_pending(p));
    /* The rest arrives in a moved buffer with the tail appended. */
    char moved[64];
    size_t rest = len - off;
    memcpy(moved, in + off, rest);
    memcpy(moved + rest, "\r\nv\r\n", 5);
    expect_request_n(p, moved, rest + 5, rest + 5, ARGS("SET", "k", "v"));
    assert_false(tly_resp_parser_pending(p));
    parser_free(p);
}

static void inline_requests_split_on_white_space(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    expect_request_n(p, "PING\r\n", 6, 6, ARGS("PING"));
    assert_true(p->inline_req);
    expect_request_n(p, "ECHO hi\n", 8, 8, ARGS("ECHO", "hi"));
    const char *in = "  SET\tk \t v  \r\nPING\r\n";
    expect_request_n(p, in, strlen(in), 15, ARGS("SET", "k", "v"));
    expect_request_n(p, in + 15, strlen(in) - 15, 6, ARGS("PING"));
    /* A CR inside the line separates, as sdssplitargs treats it. */
    expect_request_n(p, "a\rb\r\n", 5, 5, ARGS("a", "b"));
    /* A NUL byte is data. */
    expect_status(p, "a\0b c\n", 6, TLY_RESP_REQUEST, 6);
    assert_int_equal(p->argc, 2);
    expect_arg_n(p, "a\0b c\n", 0, "a\0b", 3);
    expect_arg(p, "a\0b c\n", 1, "c");
    parser_free(p);
}

static void inline_double_quotes_undo_escapes(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    const char *in = "SET \"a b\\x41\\n\" \"\\r\\t\\b\\a\\\\\\\"\\q\" \"\" x\r\n";
    expect_request_n(p, in, strlen(in), strlen(in),
                     ARGS("SET", "a bA\n", "\r\t\b\a\\\"q", "", "x"));
    /* Arguments point into the parser's scratch, not the input. */
    size_t len = 0;
    const char *arg = tly_resp_arg(p, in, 1, &len);
    assert_true(arg < in || arg >= in + strlen(in));
    /* \x with fewer than two hex digits is not a hex escape: "\x4" → "x4" */
    const char *in2 = "ECHO \"\\x4\" \"\\xzz\" \"\\x00\"\n";
    size_t got = 0;
    assert_int_equal(tly_resp_parse(p, in2, strlen(in2), &got), TLY_RESP_REQUEST);
    expect_arg(p, in2, 1, "x4");
    expect_arg(p, in2, 2, "xzz");
    expect_arg_n(p, in2, 3, "\0", 1);
    parser_free(p);
}

static void inline_single_quotes_undo_only_escaped_quotes(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    const char *in = "ECHO 'it\\'s' 'a\\nb \"c\"' ab\"cd\" x'y'\n";
    expect_request_n(p, in, strlen(in), strlen(in),
                     ARGS("ECHO", "it's", "a\\nb \"c\"", "abcd", "xy"));
    parser_free(p);
}

static void mixed_inline_and_multibulk_requests_pipeline(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    const char *in = "PING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\nECHO 'x y'\n\r\n*1\r\n$4\r\nPING\r\n";
    size_t len = strlen(in), off = 0;
    expect_request_n(p, in + off, len - off, 6, ARGS("PING"));
    off += 6;
    expect_request_n(p, in + off, len - off, 22, ARGS("ECHO", "hi"));
    assert_false(p->inline_req);
    off += 22;
    expect_request_n(p, in + off, len - off, 11, ARGS("ECHO", "x y"));
    assert_true(p->inline_req);
    off += 11;
    expect_status(p, in + off, len - off, TLY_RESP_EMPTY, 2);
    off += 2;
    expect_request_n(p, in + off, len - off, 14, ARGS("PING"));
    off += 14;
    assert_int_equal(off, len);
    expect_status(p, in + off, 0, TLY_RESP_NEED, 0);
    assert_false(tly_resp_parser_pending(p));
    parser_free(p);
}

static void empty_lines_and_nonpositive_counts_are_skipped(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    expect_status(p, "*0\r\n", 4, TLY_RESP_EMPTY, 4);
    expect_status(p, "*-1\r\n", 5, TLY_RESP_EMPTY, 5);
    expect_status(p, "*-10\r\nPING\r\n", 12, TLY_RESP_EMPTY, 6); /* as Redis: skipped */
    expect_status(p, "\r\n", 2, TLY_RESP_EMPTY, 2);
    expect_status(p, "\n", 1, TLY_RESP_EMPTY, 1);
    expect_status(p, " \t \r\n", 5, TLY_RESP_EMPTY, 5);
    assert_int_equal(p->argc, 0);
    parser_free(p);
}

static void incomplete_requests_need_more_and_are_pending(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    assert_false(tly_resp_parser_pending(p));
    expect_status(p, "", 0, TLY_RESP_NEED, 0);
    assert_false(tly_resp_parser_pending(p));
    static const char *const partial[] = {"*",
                                          "*2",
                                          "*2\r",
                                          "*2\r\n",
                                          "*2\r\n$",
                                          "*2\r\n$4\r\nEC",
                                          "*2\r\n$4\r\nECHO",
                                          "*2\r\n$4\r\nECHO\r",
                                          "PIN",
                                          "PING\r",
                                          "ECHO \"a b"};
    for (size_t i = 0; i < sizeof partial / sizeof partial[0]; i++) {
        expect_status(p, partial[i], strlen(partial[i]), TLY_RESP_NEED, 0);
        assert_true(tly_resp_parser_pending(p));
        tly_resp_parser_reset(p);
        assert_false(tly_resp_parser_pending(p));
    }
    parser_free(p);
}

/* ---- parser: errors ----------------------------------------------------- */

static void bad_multibulk_counts_are_invalid_multibulk_length(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    static const char *const bad[] = {"*abc\r\n",
                                      "*01\r\n",
                                      "*+1\r\n",
                                      "*-0\r\n",
                                      "* 1\r\n",
                                      "*1 \r\n",
                                      "*\r\n",
                                      "*-\r\n",
                                      "*1\rX",
                                      "*1\r\r\n",
                                      "*99999999999999999999\r\n",
                                      "*65537\r\n",
                                      "*9223372036854775808\r\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_error(p, bad[i], "invalid multibulk length");
    parser_free(p);
}

static void count_above_max_args_fails_at_once_without_allocating(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    expect_error(p, "*1000000\r\n", "invalid multibulk length");
    /* The largest allowed count is accepted, but spans grow only as bulks
     * arrive. */
    const char *in = "*65536\r\n$1\r\na\r\n";
    expect_status(p, in, strlen(in), TLY_RESP_NEED, 0);
    assert_true(p->cap <= 8);
    parser_free(p);

    p = parser_new(3, 100, 100);
    const char *three = "*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n";
    expect_request_n(p, three, strlen(three), strlen(three), ARGS("a", "b", "c"));
    expect_error(p, "*4\r\n", "invalid multibulk length");
    parser_free(p);
}

static void a_non_dollar_bulk_header_is_named_in_the_error(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    expect_error(p, "*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n", "expected '$', got 'f'");
    /* Decided on the first byte, without waiting for a line end. */
    expect_error(p, "*1\r\n:", "expected '$', got ':'");
    expect_error_n(p, "*1\r\n\x01", 5, "expected '$', got '\\x01'");
    expect_error_n(p, "*1\r\n\0", 5, "expected '$', got '\\x00'");
    expect_error(p, "*1\r\n\r\n", "expected '$', got '\\x0d'");
    parser_free(p);
}

static void bad_bulk_lengths_are_invalid_bulk_length(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_new(16, 100, 100);
    static const char *const bad[] = {
        "*1\r\n$-5\r\n",  "*1\r\n$-1\r\n", "*1\r\n$x\r\n",
        "*1\r\n$\r\n",    "*1\r\n$01\r\n", "*1\r\n$99999999999999999999\r\n",
        "*1\r\n$101\r\n", "*1\r\n$1\rx",   "*2\r\n$1\r\na\r\n$-0\r\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_error(p, bad[i], "invalid bulk length");
    /* exactly max_bulk is fine */
    char in[128];
    int n = snprintf(in, sizeof in, "*1\r\n$100\r\n%0100d\r\n", 0);
    expect_status(p, in, (size_t)n, TLY_RESP_REQUEST, (size_t)n);
    assert_int_equal(p->args[0].len, 100);
    parser_free(p);
}

static void a_bulk_not_followed_by_crlf_is_an_error(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    expect_error(p, "*1\r\n$3\r\nabcX", "expected CRLF after bulk string");
    expect_error(p, "*1\r\n$3\r\nabc\rX", "expected CRLF after bulk string");
    expect_error(p, "*1\r\n$3\r\nabc\n\r", "expected CRLF after bulk string");
    expect_error(p, "*1\r\n$0\r\nX", "expected CRLF after bulk string");
    /* while the CRLF has not arrived it is only incomplete */
    expect_status(p, "*1\r\n$3\r\nabc", 11, TLY_RESP_NEED, 0);
    expect_status(p, "*1\r\n$3\r\nabc\r", 12, TLY_RESP_NEED, 0);
    expect_status(p, "*1\r\n$3\r\nabc\r\n", 13, TLY_RESP_REQUEST, 13);
    parser_free(p);
}

static void header_lines_without_cr_in_64_bytes_are_too_big(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    char in[256];
    /* "*" and 62 digits (63 bytes) could still end in "\r\n": need more */
    in[0] = '*';
    memset(in + 1, '1', 100);
    expect_status(p, in, 63, TLY_RESP_NEED, 0);
    expect_status(p, in, 64, TLY_RESP_ERROR, 0); /* resumed: 64 bytes, no CR */
    assert_string_equal(p->err, "too big mbulk count string");
    tly_resp_parser_reset(p);
    expect_error_n(p, in, 101, "too big mbulk count string");
    /* A CR at byte 64 (index 63) is still within the limit. */
    memcpy(in + 63, "\r\n", 2);
    expect_error_n(p, in, 65, "invalid multibulk length"); /* 62 digits overflow */

    memcpy(in, "*1\r\n$", 5);
    memset(in + 5, '9', 100);
    expect_status(p, in, 4 + 63, TLY_RESP_NEED, 0);
    expect_status(p, in, 4 + 64, TLY_RESP_ERROR, 0);
    assert_string_equal(p->err, "too big bulk count string");
    tly_resp_parser_reset(p);
    parser_free(p);
}

static void inline_lines_longer_than_max_inline_are_too_big(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_new(16, 100, 16);
    char in[64];
    memset(in, 'x', sizeof in);
    /* 16 bytes + CRLF: fits */
    memcpy(in + 16, "\r\n", 2);
    expect_status(p, in, 18, TLY_RESP_REQUEST, 18);
    /* 16 bytes + LF: fits */
    in[16] = '\n';
    expect_status(p, in, 17, TLY_RESP_REQUEST, 17);
    /* 17 bytes + LF: too big */
    in[16] = 'x';
    in[17] = '\n';
    expect_error_n(p, in, 18, "too big inline request");
    /* 17 bytes without a newline may still be 16 + CR: need more */
    in[17] = 'x';
    expect_status(p, in, 17, TLY_RESP_NEED, 0);
    /* 18 bytes without a newline cannot fit: error, even resumed */
    expect_status(p, in, 18, TLY_RESP_ERROR, 0);
    assert_string_equal(p->err, "too big inline request");
    tly_resp_parser_reset(p);
    expect_error_n(p, in, 64, "too big inline request");
    parser_free(p);
}

static void unbalanced_quotes_are_an_error(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    static const char *const bad[] = {"ECHO \"abc\r\n", "ECHO 'abc\n",      "ECHO \"a\"b\n",
                                      "ECHO 'a'b\n",    "ECHO \"abc\\\"\n", "ECHO \"abc\\\n",
                                      "\"\n",           "ECHO 'a\\'\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_error(p, bad[i], "unbalanced quotes in request");
    /* a closing quote followed by white space or the end is fine */
    expect_request_n(p, "ECHO \"a\"\tb\n", 11, 11, ARGS("ECHO", "a", "b"));
    expect_request_n(p, "ECHO 'a'\r\n", 10, 10, ARGS("ECHO", "a"));
    parser_free(p);
}

static void inline_requests_are_limited_to_max_args(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_new(3, 100, 100);
    expect_request_n(p, "a b c\n", 6, 6, ARGS("a", "b", "c"));
    expect_error(p, "a b c d\n", "too many arguments in inline request");
    expect_request_n(p, "a b c   \n", 9, 9, ARGS("a", "b", "c"));
    parser_free(p);
}

static void set_limits_applies_to_the_next_request(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    const char *in = "*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n";
    tly_resp_limits_t tight = {.max_args = 1, .max_bulk = 4, .max_inline = 8};
    tly_resp_parser_set_limits(p, &tight);
    expect_error(p, in, "invalid multibulk length");
    expect_error(p, "*1\r\n$6\r\nsecret\r\n", "invalid bulk length");
    expect_error(p, "AUTH secret\r\n", "too big inline request");
    tly_resp_parser_set_limits(p, &default_limits);
    expect_request_n(p, in, strlen(in), strlen(in), ARGS("AUTH", "secret"));
    parser_free(p);
}

static void errors_stick_until_reset(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    size_t got = 77;
    assert_int_equal(tly_resp_parse(p, "*x\r\n", 4, &got), TLY_RESP_ERROR);
    assert_false(tly_resp_parser_pending(p));
    assert_int_equal(tly_resp_parse(p, "PING\r\n", 6, &got), TLY_RESP_ERROR);
    assert_int_equal(got, 77);
    assert_string_equal(p->err, "invalid multibulk length");
    tly_resp_parser_reset(p);
    assert_string_equal(p->err, "");
    expect_request_n(p, "PING\r\n", 6, 6, ARGS("PING"));
    parser_free(p);
}

/* ---- parser: incremental delivery --------------------------------------- */

/* One result of a run: status, consumed and the arguments joined by '|'. */
typedef struct {
    tly_resp_status_t st;
    size_t consumed;
    char text[256];
} step_t;

/* Parses in[0..len), delivered `chunk` bytes at a time (0: whole), as a
 * server does: appends to an input buffer, parses until NEED, drops what was
 * consumed. Returns the number of non-NEED results written to steps. */
static size_t run_chunks(const char *in, size_t len, size_t chunk, step_t *steps, size_t max)
{
    tly_resp_parser_t *p = parser_new(8, 64, 64);
    tly_buf_t ib = {0};
    size_t n = 0, fed = 0;
    bool failed = false;
    while (!failed && fed < len) {
        size_t add = chunk == 0 || len - fed < chunk ? len - fed : chunk;
        tly_buf_append(&ib, in + fed, add);
        fed += add;
        for (;;) {
            size_t consumed = 0;
            tly_resp_status_t st = tly_resp_parse(p, ib.data, ib.len, &consumed);
            if (st == TLY_RESP_NEED)
                break;
            assert_true(n < max);
            step_t *s = &steps[n++];
            memset(s, 0, sizeof *s);
            s->st = st;
            if (st == TLY_RESP_ERROR) {
                snprintf(s->text, sizeof s->text, "%s", p->err);
                failed = true;
                break;
            }
            s->consumed = consumed;
            size_t at = 0;
            for (size_t i = 0; i < p->argc; i++) {
                size_t alen = 0;
                const char *arg = tly_resp_arg(p, ib.data, i, &alen);
                assert_true(at + alen + 1 < sizeof s->text);
                memcpy(s->text + at, arg, alen);
                at += alen;
                s->text[at++] = '|';
            }
            tly_buf_consume(&ib, consumed);
        }
    }
    tly_buf_fini(&ib);
    parser_free(p);
    return n;
}

static void byte_by_byte_delivery_gives_the_same_results_as_whole(void **state)
{
    (void)state;
    static const char *const inputs[] = {
        "*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$5\r\na\r\nbc\r\n",
        "PING\r\nECHO \"x\\ty\" 'z\\'' \r\n\r\n*0\r\n*-1\r\nGET k\n",
        "*2\r\n$3\r\nGET\r\n$1\r\nk\r\nSET \"a\" b\r\n*1\r\n$2\r\nhi\r\nxx",
        "*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n",
        "*1\r\n$65\r\n",
        "*9\r\n",
        "ECHO \"abc\r\n",
        "PING\r\n*1\r\n$3\r\nabcX",
        "PING\r\n*1111111111111111111111111111111111111111111111111111111111111111111\r\n",
        "ECHO xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n",
        "*1\r\n$2\r\nhi\r\n*1\rX",
        "a b c d e f g h i\r\n",
    };
    for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
        step_t whole[16], split[16];
        size_t len = strlen(inputs[i]);
        size_t nw = run_chunks(inputs[i], len, 0, whole, 16);
        assert_true(nw >= 1);
        for (size_t chunk = 1; chunk <= 7; chunk++) {
            size_t ns = run_chunks(inputs[i], len, chunk, split, 16);
            assert_int_equal(ns, nw);
            for (size_t k = 0; k < nw; k++) {
                assert_int_equal(split[k].st, whole[k].st);
                assert_int_equal(split[k].consumed, whole[k].consumed);
                assert_string_equal(split[k].text, whole[k].text);
            }
        }
    }
    /* And the whole-delivery results are the expected ones. */
    step_t s[16];
    size_t n = run_chunks(inputs[1], strlen(inputs[1]), 1, s, 16);
    assert_int_equal(n, 6);
    assert_string_equal(s[0].text, "PING|");
    assert_string_equal(s[1].text, "ECHO|x\ty|z'|");
    assert_int_equal(s[2].st, TLY_RESP_EMPTY); /* "\r\n" */
    assert_int_equal(s[3].st, TLY_RESP_EMPTY); /* "*0" */
    assert_int_equal(s[4].st, TLY_RESP_EMPTY); /* "*-1" */
    assert_string_equal(s[5].text, "GET|k|");
    n = run_chunks(inputs[11], strlen(inputs[11]), 1, s, 16);
    assert_int_equal(n, 1);
    assert_int_equal(s[0].st, TLY_RESP_ERROR);
    assert_string_equal(s[0].text, "too many arguments in inline request");
}

static void byte_by_byte_1mb_bulk_examines_each_byte_at_most_once(void **state)
{
    (void)state;
    const size_t body = 1u << 20;
    char head[64];
    int hn = snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%zu\r\n", body);
    size_t len = (size_t)hn + body + 2;
    char *in = malloc(len);
    assert_non_null(in);
    memcpy(in, head, (size_t)hn);
    for (size_t i = 0; i < body; i++)
        in[(size_t)hn + i] = (char)('a' + i % 26);
    memcpy(in + hn + body, "\r\n", 2);

    tly_resp_parser_t *p = parser_default();
    size_t consumed = 0, calls = 0;
    tly_resp_status_t st = TLY_RESP_NEED;
    for (size_t avail = 1; avail <= len; avail++) {
        st = tly_resp_parse(p, in, avail, &consumed);
        calls++;
        if (st != TLY_RESP_NEED)
            break;
        assert_true(p->pos <= avail && p->scan <= avail);
    }
    assert_int_equal(st, TLY_RESP_REQUEST);
    assert_int_equal(calls, len);
    assert_int_equal(consumed, len);
    size_t alen = 0;
    const char *arg = tly_resp_arg(p, in, 1, &alen);
    assert_int_equal(alen, body);
    assert_ptr_equal(arg, in + hn);
    /* The headers are examined once each and the body never: a rescanning
     * parser would examine ~len²/2 bytes here. */
    assert_true(p->scanned <= (uint64_t)hn + 4);
    parser_free(p);
    free(in);
}

static void byte_by_byte_long_inline_line_examines_each_byte_once(void **state)
{
    (void)state;
    const size_t n = 60000;
    char *in = malloc(n + 2);
    assert_non_null(in);
    memcpy(in, "ECHO ", 5);
    memset(in + 5, 'y', n - 5);
    memcpy(in + n, "\r\n", 2);
    tly_resp_parser_t *p = parser_default();
    size_t consumed = 0;
    tly_resp_status_t st = TLY_RESP_NEED;
    for (size_t avail = 1; avail <= n + 2 && st == TLY_RESP_NEED; avail++)
        st = tly_resp_parse(p, in, avail, &consumed);
    assert_int_equal(st, TLY_RESP_REQUEST);
    assert_int_equal(consumed, n + 2);
    assert_int_equal(p->argc, 2);
    assert_int_equal(p->args[1].len, n - 5);
    assert_true(p->scanned <= (uint64_t)n + 3);
    parser_free(p);
    free(in);
}

static void memory_of_a_huge_request_is_given_back_afterwards(void **state)
{
    (void)state;
    tly_resp_parser_t *p = parser_default();
    tly_buf_t b = {0};
    tly_resp_array(&b, 5000);
    for (int i = 0; i < 5000; i++)
        tly_resp_bulk(&b, "a", 1);
    size_t consumed = 0;
    assert_int_equal(tly_resp_parse(p, b.data, b.len, &consumed), TLY_RESP_REQUEST);
    assert_int_equal(p->argc, 5000);
    assert_true(p->cap >= 5000 && p->cap <= 8192);
    expect_request_n(p, "PING\r\n", 6, 6, ARGS("PING"));
    assert_true(p->cap <= 8);

    /* A 30000-byte inline line needs a 30000-byte scratch, once. */
    b.len = 0;
    tly_buf_append(&b, "ECHO ", 5);
    for (int i = 0; i < 30000 - 5; i++)
        tly_buf_append(&b, "z", 1);
    tly_buf_append(&b, "\n", 1);
    assert_int_equal(tly_resp_parse(p, b.data, b.len, &consumed), TLY_RESP_REQUEST);
    assert_int_equal(p->scratch_cap, 30000);
    expect_request_n(p, "PING\r\n", 6, 6, ARGS("PING"));
    assert_true(p->scratch_cap <= 6);
    tly_buf_fini(&b);
    parser_free(p);
}

/* ---- fuzz corpus and fuzz checks ---------------------------------------- */

static void fuzz_checks_hold_for_every_split_and_limit_set(void **state)
{
    (void)state;
    static const char *const inputs[] = {
        "*2\r\n$4\r\nECHO\r\n$5\r\na\r\nbc\r\nPING\r\n*0\r\n",
        "SET \"a\\x41\" 'b\\'c' d\r\n\n*1\r\n$1\r\nx\r\n",
        "*1\r\n$-5\r\n",
        "*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n",
        "ECHO \"ab\r\n",
        "*1\r\n$3\r\nabcX",
    };
    uint8_t buf[256];
    for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
        size_t len = strlen(inputs[i]);
        memcpy(buf + 1, inputs[i], len);
        for (unsigned ctl = 0; ctl < 64; ctl++) { /* every k and limit set */
            buf[0] = (uint8_t)ctl;
            resp_check_input(buf, len + 1);
        }
    }
}

static void resp_corpus_check(void *ctx, const char *path, const uint8_t *buf, size_t len)
{
    (void)ctx;
    (void)path;
    resp_check_input(buf, len);
}

static void parser_replays_fuzz_corpus_through_the_fuzz_checks(void **state)
{
    (void)state;
    assert_true(corpus_replay(CORPUS_DIR, resp_corpus_check, NULL) >= 20);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(simple_writes_plus_line_and_replaces_cr_lf),
        cmocka_unit_test(error_writes_minus_line_and_replaces_cr_lf),
        cmocka_unit_test(errorf_formats_messages_longer_than_its_stack_buffer),
        cmocka_unit_test(int_writes_colon_line_across_the_int64_range),
        cmocka_unit_test(bulk_writes_length_prefixed_binary_safe_strings),
        cmocka_unit_test(null_is_dollar_minus_one_in_resp2_and_underscore_in_resp3),
        cmocka_unit_test(aggregates_are_flat_arrays_in_resp2_and_typed_in_resp3),
        cmocka_unit_test(bool_is_integer_in_resp2_and_hash_in_resp3),
        cmocka_unit_test(double_prints_the_shortest_text_that_reads_back_exactly),
        cmocka_unit_test(double_text_reads_back_exactly_for_random_bit_patterns),
        cmocka_unit_test(double_writes_inf_and_nan_as_the_resp3_spec_spells_them),
        cmocka_unit_test(verbatim_is_txt_typed_in_resp3_and_bulk_in_resp2),
        cmocka_unit_test(value_writes_each_type_in_both_protocols),
        cmocka_unit_test(replies_append_after_earlier_ones),
        cmocka_unit_test(buf_grows_geometrically_and_consume_keeps_the_tail),
        cmocka_unit_test(multibulk_request_gives_offsets_into_the_input),
        cmocka_unit_test(multibulk_bulks_are_binary_safe),
        cmocka_unit_test(pipelined_requests_parse_one_after_another),
        cmocka_unit_test(inline_requests_split_on_white_space),
        cmocka_unit_test(inline_double_quotes_undo_escapes),
        cmocka_unit_test(inline_single_quotes_undo_only_escaped_quotes),
        cmocka_unit_test(mixed_inline_and_multibulk_requests_pipeline),
        cmocka_unit_test(empty_lines_and_nonpositive_counts_are_skipped),
        cmocka_unit_test(incomplete_requests_need_more_and_are_pending),
        cmocka_unit_test(bad_multibulk_counts_are_invalid_multibulk_length),
        cmocka_unit_test(count_above_max_args_fails_at_once_without_allocating),
        cmocka_unit_test(a_non_dollar_bulk_header_is_named_in_the_error),
        cmocka_unit_test(bad_bulk_lengths_are_invalid_bulk_length),
        cmocka_unit_test(a_bulk_not_followed_by_crlf_is_an_error),
        cmocka_unit_test(header_lines_without_cr_in_64_bytes_are_too_big),
        cmocka_unit_test(inline_lines_longer_than_max_inline_are_too_big),
        cmocka_unit_test(unbalanced_quotes_are_an_error),
        cmocka_unit_test(inline_requests_are_limited_to_max_args),
        cmocka_unit_test(set_limits_applies_to_the_next_request),
        cmocka_unit_test(errors_stick_until_reset),
        cmocka_unit_test(byte_by_byte_delivery_gives_the_same_results_as_whole),
        cmocka_unit_test(byte_by_byte_1mb_bulk_examines_each_byte_at_most_once),
        cmocka_unit_test(byte_by_byte_long_inline_line_examines_each_byte_once),
        cmocka_unit_test(memory_of_a_huge_request_is_given_back_afterwards),
        cmocka_unit_test(fuzz_checks_hold_for_every_split_and_limit_set),
        cmocka_unit_test(parser_replays_fuzz_corpus_through_the_fuzz_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
