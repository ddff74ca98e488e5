/*
 * fuzz_decode.c — libFuzzer target for the JSON event decoder (decode.c) and
 * the per-event feature logic that consumes its output (feature.c).
 *
 * Every input is decoded under four featsets — time in ms, in s, as ISO 8601,
 * and the Kafka timestamp — and also parsed as an ISO 8601 time. Beyond the
 * sanitizers, it checks decode's contract and aborts when it breaks:
 *  - the result is OK or one of the EV_* reasons decode.h lists;
 *  - on OK: nfields matches the featset, strings are no longer than
 *    events.max_string and readable, doubles are finite, the event time lies
 *    in [1970, 2101); entity ids and where-matching run on the event;
 *  - a decoder reading by the shapes it learnt from earlier inputs gives
 *    the result and values of one that walks the grammar only.
 *
 * `make fuzz` builds it (build/fuzz/fuzz_decode) and runs it on its corpus.
 * The corpus also replays in test_decode (make test).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/config.h"
#include "tallyd/decode.h"
#include "tallyd/feature.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NSETS       4
#define TIME_MAX_MS INT64_C(4133980800000) /* 2101-01-01T00:00:00Z */

static const char *const time_yaml[NSETS] = {
    "  time: { field: ts, unit: ms }\n",
    "  time: { field: ts, unit: s }\n",
    "  time: { field: ts, unit: iso8601 }\n",
    "",
};

static struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_decoder_t *dec;
    tly_decoder_t *walk; /* shapes off: the oracle of dec's shapes */
} sets[NSETS];

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_decode: contract broken: %s\n", what);
        abort();
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    for (int k = 0; k < NSETS; k++) {
        char yaml[1024], err[512];
        snprintf(yaml, sizeof yaml,
                 "events:\n"
                 "%s"
                 "  max_bytes: 4096\n"
                 "  max_string: 64\n"
                 "features:\n"
                 "  - { name: clicks, entity: user, key: user_id, where: { action: [click, "
                 "save, 42, 2.5, true] }, agg: count, windows: [5m, 1h] }\n"
                 "  - { name: dwell, entity: user, key: user_id, agg: sum, value: dwell_ms, "
                 "windows: [1h] }\n"
                 "  - { name: recent, entity: user, key: user_id, agg: last_k, k: 10, "
                 "value: [pin_id, action, score, flag] }\n"
                 "  - { name: cat, entity: user_cat, key: [user_id, category], agg: count, "
                 "where: { flag: true, score: 2.5 }, windows: [1d] }\n",
                 time_yaml[k]);
        if (tly_config_load_string(yaml, "fuzz.yaml", &sets[k].cfg, err, sizeof err) != TLY_OK ||
            tly_featset_compile(sets[k].cfg, &sets[k].fs, err, sizeof err) != TLY_OK) {
            fprintf(stderr, "fuzz_decode: setup failed: %s\n", err);
            abort();
        }
        sets[k].dec = tly_decoder_new(sets[k].fs);
        sets[k].walk = tly_decoder_new(sets[k].fs);
        tly_decoder_set_shapes(sets[k].walk, false);
    }
    return 0;
}

static int is_decode_result(tly_err_t rc)
{
    return rc == TLY_OK || rc == TLY_E_EV_TOO_LARGE || rc == TLY_E_EV_BAD_JSON ||
           rc == TLY_E_EV_NOT_OBJECT || rc == TLY_E_EV_TOO_COMPLEX || rc == TLY_E_EV_WRONG_TYPE ||
           rc == TLY_E_EV_VALUE_TOO_LONG || rc == TLY_E_EV_MISSING_TIME || rc == TLY_E_EV_BAD_TIME;
}

/* Whether two decoded events hold the same values. */
static int same_event(const tly_featset_t *fs, const tly_event_t *a, const tly_event_t *b)
{
    if (a->nfields != b->nfields || a->time_ms != b->time_ms)
        return 0;
    for (size_t i = 0; i < fs->nfields; i++) {
        const tly_value_t *x = &a->vals[i], *y = &b->vals[i];
        if (x->type != y->type ||
            (x->type == TLY_V_STR && (x->len != y->len || memcmp(x->u.s, y->u.s, x->len) != 0)) ||
            ((x->type == TLY_V_INT || x->type == TLY_V_BOOL) && x->u.i != y->u.i) ||
            (x->type == TLY_V_DOUBLE && memcmp(&x->u.d, &y->u.d, sizeof x->u.d) != 0))
            return 0;
    }
    return 1;
}

static void check_event(const tly_featset_t *fs, const tly_event_t *ev)
{
    volatile unsigned char sink = 0;
    check(ev->nfields == fs->nfields, "nfields");
    for (uint32_t i = 0; i < ev->nfields; i++) {
        const tly_value_t *v = &ev->vals[i];
        switch (v->type) {
        case TLY_V_STR:
            check(v->len <= (uint64_t)fs->max_string, "string longer than max_string");
            for (uint32_t b = 0; b < v->len; b++) /* ASan checks every byte is live */
                sink ^= (unsigned char)v->u.s[b];
            break;
        case TLY_V_DOUBLE:
            check(isfinite(v->u.d), "non-finite double");
            break;
        case TLY_V_BOOL:
            check(v->u.i == 0 || v->u.i == 1, "bool not 0/1");
            break;
        case TLY_V_NIL:
        case TLY_V_INT:
            break;
        default:
            check(0, "unknown value type");
        }
    }
    (void)sink;
    if (fs->time_field >= 0)
        check(ev->time_ms >= 0 && ev->time_ms < TIME_MAX_MS, "event time out of range");
    for (size_t e = 0; e < fs->nentities; e++) {
        char id[TLY_MAX_ID];
        size_t len = 0;
        tly_err_t rc = tly_entity_id(fs, (uint32_t)e, ev, id, sizeof id, &len);
        check(rc == TLY_OK || rc == TLY_E_EV_MISSING_KEY || rc == TLY_E_EV_WRONG_TYPE ||
                  rc == TLY_E_EV_VALUE_TOO_LONG,
              "entity id result");
        check(rc != TLY_OK || len <= sizeof id, "entity id length");
    }
    for (size_t i = 0; i < fs->nfeats; i++)
        (void)tly_feat_match(&fs->feats[i], ev);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A copy of exactly size bytes, so ASan catches any read past the end. */
    char *buf = malloc(size ? size : 1);
    if (buf == NULL)
        abort();
    memcpy(buf, data, size);

    for (int k = 0; k < NSETS; k++) {
        tly_event_t ev, wev;
        tly_err_t rc = tly_decode_json(sets[k].dec, buf, size, 1700000000000, &ev);
        check(is_decode_result(rc), "decode result");
        if (rc == TLY_OK)
            check_event(sets[k].fs, &ev);
        tly_err_t wrc = tly_decode_json(sets[k].walk, buf, size, 1700000000000, &wev);
        check(wrc == rc, "shape and walk results differ");
        check(rc != TLY_OK || same_event(sets[k].fs, &ev, &wev), "shape and walk values differ");
    }

    int64_t ms = -1;
    if (tly_decode_iso8601(buf, size, &ms) == TLY_OK)
        check(ms >= 0 && ms < TIME_MAX_MS, "iso8601 out of range");
    free(buf);
    return 0;
}
