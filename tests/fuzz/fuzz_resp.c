/*
 * fuzz_resp.c — libFuzzer target for the RESP request parser (resp.c).
 *
 * The first input byte picks how the rest is delivered and the limits: its
 * low 4 bits give k (1..16), its high 2 bits one of four limit sets. The
 * rest is a client's byte stream. It is parsed twice, as requests are
 * dropped one after another:
 *  - whole: the stream passed at once;
 *  - split: delivered k bytes at a time, the unconsumed input copied to a
 *    new exact-size buffer before every call (the caller may move it);
 * and the checks abort when the parser's contract breaks:
 *  - both runs give the same sequence of results (status, consumed,
 *    arguments' bytes, error message) and end the same way;
 *  - consumed never exceeds the input; a request has 1..max_args
 *    arguments; spans lie within the request (multibulk) or the scratch
 *    (inline); a multibulk argument is at most max_bulk bytes;
 *  - after an error the parser keeps answering TLY_RESP_ERROR (nothing else
 *    is parsed) until reset; pending() is true exactly when an incomplete
 *    request is buffered;
 *  - the bytes examined (p->scanned) stay within 2 × input + 2, however
 *    the input is split: parsing is linear;
 *  - a request written back as multibulk with the reply writer parses to the
 *    same arguments.
 *
 * `make fuzz` builds it (build/fuzz/fuzz_resp) and runs it on its corpus.
 * test_resp includes this file (defining TLY_FUZZ_RESP_NO_ENTRY and
 * RESP_CHECK_FAIL) to replay the corpus through the same checks.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/resp.h"

#ifndef RESP_CHECK_FAIL
#define RESP_CHECK_FAIL(what)                                                                      \
    do {                                                                                           \
        fprintf(stderr, "fuzz_resp: contract broken: %s\n", what);                                 \
        abort();                                                                                   \
    } while (0)
#endif

#define RESP_CHECK(ok, what)                                                                       \
    do {                                                                                           \
        if (!(ok))                                                                                 \
            RESP_CHECK_FAIL(what);                                                                 \
    } while (0)

static const tly_resp_limits_t fuzz_limits[4] = {
    {.max_args = 8, .max_bulk = 32, .max_inline = 32},
    {.max_args = 65536, .max_bulk = 1 << 20, .max_inline = 65536},
    {.max_args = 1, .max_bulk = 0, .max_inline = 0},
    {.max_args = 3, .max_bulk = 5, .max_inline = 10},
};

/* One non-NEED result, with its arguments' bytes copied out. */
typedef struct {
    tly_resp_status_t st;
    size_t consumed;
    size_t argc;
    size_t *lens;
    char *bytes; /* the arguments concatenated */
    char err[128];
} fuzz_result_t;

typedef struct {
    fuzz_result_t *items;
    size_t n, cap;
    size_t leftover;    /* unconsumed bytes at the end (NEED) */
    bool errored;       /* ended in TLY_RESP_ERROR */
    uint64_t scanned;   /* p->scanned at the end */
    bool pending_right; /* pending() matched leftover at the end */
} fuzz_run_t;

static void run_fini(fuzz_run_t *r)
{
    for (size_t i = 0; i < r->n; i++) {
        free(r->items[i].lens);
        free(r->items[i].bytes);
    }
    free(r->items);
}

/* Writes the request back as multibulk and checks it parses to the same
 * arguments. */
static void check_roundtrip(size_t argc, const size_t *lens, const char *bytes)
{
    tly_buf_t b = {0};
    tly_resp_array(&b, argc);
    size_t at = 0;
    for (size_t i = 0; i < argc; i++) {
        tly_resp_bulk(&b, bytes + at, lens[i]);
        at += lens[i];
    }
    tly_resp_parser_t q;
    tly_resp_parser_init(&q, &fuzz_limits[1]);
    size_t consumed = 0;
    tly_resp_status_t st = tly_resp_parse(&q, b.data, b.len, &consumed);
    RESP_CHECK(st == TLY_RESP_REQUEST, "round trip: not a request");
    RESP_CHECK(consumed == b.len, "round trip: consumed");
    RESP_CHECK(q.argc == argc, "round trip: argc");
    at = 0;
    for (size_t i = 0; i < argc; i++) {
        size_t len = 0;
        const char *arg = tly_resp_arg(&q, b.data, i, &len);
        RESP_CHECK(len == lens[i] && memcmp(arg, bytes + at, len) == 0, "round trip: argument");
        at += len;
    }
    tly_resp_parser_fini(&q);
    tly_buf_fini(&b);
}

/* Records a non-NEED result of parsing in[0..len) and checks it. */
static void record(fuzz_run_t *r, tly_resp_parser_t *p, tly_resp_status_t st, const char *in,
                   size_t len, size_t consumed)
{
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 8;
        r->items = realloc(r->items, r->cap * sizeof *r->items);
        RESP_CHECK(r->items != NULL, "out of memory");
    }
    fuzz_result_t *it = &r->items[r->n++];
    memset(it, 0, sizeof *it);
    it->st = st;
    RESP_CHECK(st == TLY_RESP_REQUEST || st == TLY_RESP_EMPTY || st == TLY_RESP_ERROR,
               "unknown status");
    RESP_CHECK(!tly_resp_parser_pending(p), "pending after a result");
    if (st == TLY_RESP_ERROR) {
        RESP_CHECK(p->err[0] != '\0', "error without a message");
        RESP_CHECK(memchr(p->err, '\0', sizeof p->err) != NULL, "error message unterminated");
        memcpy(it->err, p->err, sizeof it->err);
        return;
    }
    it->consumed = consumed;
    RESP_CHECK(consumed >= 1 && consumed <= len, "consumed outside the input");
    if (st == TLY_RESP_EMPTY)
        return;
    RESP_CHECK(p->argc >= 1 && p->argc <= p->lim.max_args, "argc outside 1..max_args");
    it->argc = p->argc;
    it->lens = calloc(p->argc, sizeof *it->lens);
    it->bytes = malloc(consumed);
    RESP_CHECK(it->lens != NULL && it->bytes != NULL, "out of memory");
    const tly_arg_t *argv = tly_resp_argv(p, in);
    size_t total = 0;
    for (size_t i = 0; i < p->argc; i++) {
        const tly_resp_span_t *sp = &p->args[i];
        if (p->inline_req) {
            RESP_CHECK(sp->off <= p->scratch_cap && sp->len <= p->scratch_cap - sp->off,
                       "inline span outside the scratch");
        } else {
            RESP_CHECK(sp->off < consumed && sp->len <= consumed - sp->off,
                       "span outside the request");
            RESP_CHECK(sp->len <= p->lim.max_bulk, "bulk longer than max_bulk");
        }
        size_t alen = 0;
        const char *arg = tly_resp_arg(p, in, i, &alen);
        RESP_CHECK(alen == sp->len && argv[i].ptr == arg && argv[i].len == alen,
                   "tly_resp_arg and tly_resp_argv disagree");
        RESP_CHECK(total + alen <= consumed, "arguments longer than the request");
        if (alen)
            memcpy(it->bytes + total, arg, alen); /* ASan checks the bytes are live */
        it->lens[i] = alen;
        total += alen;
    }
    check_roundtrip(it->argc, it->lens, it->bytes);
}

/* The parser after an error: sticky until reset. */
static void check_sticky_error(tly_resp_parser_t *p, const char *in, size_t len)
{
    size_t consumed = 12345;
    RESP_CHECK(tly_resp_parse(p, in, len, &consumed) == TLY_RESP_ERROR, "parsed after an error");
    RESP_CHECK(consumed == 12345, "consumed written after an error");
}

static void run_whole(fuzz_run_t *r, const tly_resp_limits_t *lim, const char *buf, size_t n)
{
    tly_resp_parser_t p;
    tly_resp_parser_init(&p, lim);
    size_t off = 0;
    for (;;) {
        size_t consumed = 0;
        tly_resp_status_t st = tly_resp_parse(&p, buf + off, n - off, &consumed);
        if (st == TLY_RESP_NEED)
            break;
        record(r, &p, st, buf + off, n - off, consumed);
        if (st == TLY_RESP_ERROR) {
            r->errored = true;
            check_sticky_error(&p, buf + off, n - off);
            break;
        }
        off += consumed;
    }
    r->leftover = r->errored ? 0 : n - off;
    r->pending_right = r->errored || tly_resp_parser_pending(&p) == (r->leftover > 0);
    r->scanned = p.scanned;
    tly_resp_parser_fini(&p);
}

static void run_split(fuzz_run_t *r, const tly_resp_limits_t *lim, const char *data, size_t n,
                      size_t k)
{
    tly_resp_parser_t p;
    tly_resp_parser_init(&p, lim);
    size_t start = 0, fed = 0; /* data[start..fed) is the unconsumed input */
    while (!r->errored && fed < n) {
        fed = n - fed < k ? n : fed + k;
        for (;;) {
            size_t len = fed - start;
            char *in = malloc(len ? len : 1); /* exact size: ASan sees overreads */
            RESP_CHECK(in != NULL, "out of memory");
            memcpy(in, data + start, len);
            size_t consumed = 0;
            tly_resp_status_t st = tly_resp_parse(&p, in, len, &consumed);
            if (st != TLY_RESP_NEED)
                record(r, &p, st, in, len, consumed);
            if (st == TLY_RESP_ERROR) {
                r->errored = true;
                check_sticky_error(&p, in, len);
            }
            free(in);
            if (st == TLY_RESP_NEED || st == TLY_RESP_ERROR)
                break;
            start += consumed;
        }
    }
    if (n == 0) { /* still ask once, as the whole run does */
        size_t consumed = 0;
        RESP_CHECK(tly_resp_parse(&p, "", 0, &consumed) == TLY_RESP_NEED, "empty input");
    }
    r->leftover = r->errored ? 0 : n - start;
    r->pending_right = r->errored || tly_resp_parser_pending(&p) == (r->leftover > 0);
    r->scanned = p.scanned;
    tly_resp_parser_fini(&p);
}

/* Parses data[1..size) whole and split as data[0] says; checks everything
 * the header comment lists. */
static void resp_check_input(const uint8_t *data, size_t size)
{
    if (size == 0)
        return;
    size_t k = (size_t)(data[0] & 15) + 1;
    const tly_resp_limits_t *lim = &fuzz_limits[(data[0] >> 4) & 3];
    size_t n = size - 1;
    /* A copy of exactly n bytes, so ASan catches any read past the end. */
    char *buf = malloc(n ? n : 1);
    RESP_CHECK(buf != NULL, "out of memory");
    memcpy(buf, data + 1, n);

    fuzz_run_t whole = {0}, split = {0};
    run_whole(&whole, lim, buf, n);
    run_split(&split, lim, buf, n, k);

    RESP_CHECK(whole.pending_right && split.pending_right, "pending() wrong at the end");
    RESP_CHECK(whole.scanned <= 2 * (uint64_t)n + 2, "whole parse examined too many bytes");
    RESP_CHECK(split.scanned <= 2 * (uint64_t)n + 2, "split parse examined too many bytes");
    RESP_CHECK(whole.n == split.n, "whole and split give different numbers of results");
    RESP_CHECK(whole.errored == split.errored && whole.leftover == split.leftover,
               "whole and split end differently");
    for (size_t i = 0; i < whole.n; i++) {
        const fuzz_result_t *a = &whole.items[i], *b = &split.items[i];
        RESP_CHECK(a->st == b->st, "whole and split: status");
        RESP_CHECK(a->consumed == b->consumed, "whole and split: consumed");
        RESP_CHECK(strcmp(a->err, b->err) == 0, "whole and split: error message");
        RESP_CHECK(a->argc == b->argc, "whole and split: argc");
        size_t total = 0;
        for (size_t j = 0; j < a->argc; j++) {
            RESP_CHECK(a->lens[j] == b->lens[j], "whole and split: argument length");
            total += a->lens[j];
        }
        RESP_CHECK(total == 0 || memcmp(a->bytes, b->bytes, total) == 0,
                   "whole and split: argument bytes");
    }
    run_fini(&whole);
    run_fini(&split);
    free(buf);
}

#ifndef TLY_FUZZ_RESP_NO_ENTRY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    resp_check_input(data, size);
    return 0;
}
#endif
