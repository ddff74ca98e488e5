/*
 * feature.c — compiles the config's features into a tly_featset_t, and the
 * per-event feature logic: `where` matching and entity ids.
 *
 * Compilation runs once, on the thread that loads the config. The compiled
 * featset is immutable; tly_feat_match(), tly_featset_match() and
 * tly_entity_id() run on every source thread at once, only read it, never
 * allocate and never measure a config string (lengths are precomputed).
 * Lookups by name (entity, field, resolve) serve the query path and compare
 * without strlen() either.
 *
 * Invariants of a compiled featset:
 *  - field ids are dense, assigned in config order (for each feature: keys,
 *    where fields, value fields); the fields of features are ids
 *    [0, nfeat_fields); then come the top-level time field and each topic's
 *    time field in kafka.topics order, unless already taken; every id stored
 *    anywhere is < nfields ≤ TLY_MAX_FIELDS;
 *  - topics[i] holds kafka.topics[i]'s event rules; max_future_skew_ms and
 *    max_string of the featset are the loosest of the top level and every
 *    topic;
 *  - entities are numbered in order of first appearance; all features of an
 *    entity have the same key field ids (same fields, same order) and
 *    distinct names;
 *  - every window has len > 0 and hop > 0 in whole seconds, hop divides len,
 *    nbuckets = len/hop + 1, and windows are strictly increasing;
 *  - horizon_ms > 0 for every feature: its longest window, or for last and
 *    last_k store.idle_ttl; when idle_ttl is 0 ("longest window"), the
 *    longest window among its entity's features, else in the whole config.
 *
 * `where` conditions that are the same (field, values in order) are numbered
 * once (featset.conds, up to 64: match_masks) and each feature names its
 * conditions by bit (feat.conds); their string values are indexed by
 * field, each distinct text once with the conditions listing it, so that
 * tly_featset_match() tests one string field once per event. Lists longer
 * than TLY_MATCH_SCAN texts are hashed (config strings, not event data, so
 * a fixed hash is enough) and every list's numbers are kept sorted: a match
 * costs about the same for a list of 4 values as for one of 4,000.
 *
 * `where` values are pre-parsed once: has_int when the whole text is a base-10
 * int64 (strtoll), has_double when it is a finite decimal number (strtod, as
 * decode reads an event's number, so 4.9e-324 is the least subnormal and
 * 1e-400 is 0; hex, inf and nan are not numbers here), has_bool for the YAML 1.2 core
 * spellings true/True/TRUE and false/False/FALSE.
 */
#include "tallyd/feature.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "tallyd/window.h"

#include "bytes_int.h"

/* render_int's eight-digits-at-a-time path needs a little-endian host;
 * TLY_PORTABLE builds the portable one on any host (see decode.c). */
#define FEATURE_WORDS TLY_ID_WORDS

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "tallyd: out of memory compiling the features\n");
        abort();
    }
    return p;
}

static char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = xcalloc(n, 1);
    memcpy(p, s, n);
    return p;
}

/* True when the NUL-terminated z equals s[0..n) (s need not be terminated
 * and may hold NULs; never reads z past its terminator). */
static bool name_eq(const char *z, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (z[i] == '\0' || z[i] != s[i])
            return false;
    return z[n] == '\0';
}

static tly_err_t config_error(const tly_config_t *cfg, int line, char *errbuf, size_t errlen,
                              const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Writes "FILE:LINE: message" (or "FILE: message" without a line) to errbuf
 * and returns TLY_E_CONFIG. */
static tly_err_t config_error(const tly_config_t *cfg, int line, char *errbuf, size_t errlen,
                              const char *fmt, ...)
{
    if (errbuf == NULL || errlen == 0)
        return TLY_E_CONFIG;
    const char *path = cfg->path != NULL ? cfg->path : "<config>";
    int n = line > 0 ? snprintf(errbuf, errlen, "%s:%d: ", path, line)
                     : snprintf(errbuf, errlen, "%s: ", path);
    if (n >= 0 && (size_t)n < errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf + n, errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return TLY_E_CONFIG;
}

/* The line of a feature's key for an error: where the key was given, else
 * (absent, or a config built without a file) the feature's own line. */
static int key_line(const tly_feature_cfg_t *fc, int line)
{
    return line > 0 ? line : fc->line;
}

/* Returns the id of field name, adding it if new; -1 when all TLY_MAX_FIELDS
 * ids are taken. */
static int intern_field(tly_featset_t *fs, const char *name)
{
    for (size_t i = 0; i < fs->nfields; i++)
        if (strcmp(fs->fields[i], name) == 0)
            return (int)i;
    if (fs->nfields >= TLY_MAX_FIELDS)
        return -1;
    fs->fields[fs->nfields] = xstrdup(name);
    return (int)fs->nfields++;
}

/* True when text could be a decimal number: only digits, signs, '.', 'e'. */
static bool decimal_chars(const char *text)
{
    if (*text == '\0')
        return false;
    for (const char *p = text; *p != '\0'; p++)
        if (strchr("0123456789+-.eE", *p) == NULL)
            return false;
    return true;
}

static void parse_match_value(tly_match_value_t *mv, const char *text)
{
    memset(mv, 0, sizeof *mv);
    mv->text = text;
    mv->len = strlen(text);
    if (decimal_chars(text)) {
        char *end;
        errno = 0;
        long long ll = strtoll(text, &end, 10);
        if (errno == 0 && end != text && *end == '\0') {
            mv->has_int = true;
            mv->i = (int64_t)ll;
        }
        /* No errno test: an underflow (ERANGE) still gives the double an
         * event's number of the same text decodes to (decode.c ignores it
         * too), subnormal or zero; an overflow is not finite. */
        double d = strtod(text, &end);
        if (end != text && *end == '\0' && isfinite(d)) {
            mv->has_double = true;
            mv->d = d;
        }
    }
    if (strcmp(text, "true") == 0 || strcmp(text, "True") == 0 || strcmp(text, "TRUE") == 0) {
        mv->has_bool = true;
        mv->b = true;
    } else if (strcmp(text, "false") == 0 || strcmp(text, "False") == 0 ||
               strcmp(text, "FALSE") == 0) {
        mv->has_bool = true;
        mv->b = false;
    }
}

/* A hash of s[0..n), eight bytes at a time. */
static uint64_t str_hash(const char *s, size_t n)
{
    uint64_t h = UINT64_C(0x9e3779b97f4a7c15) ^ n;
    for (; n >= 8; s += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * UINT64_C(0xbf58476d1ce4e5b9);
        h ^= h >> 31;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    /* a full finish (splitmix64's): texts that differ in their last bytes
     * ("pin0001", "pin0002") must spread over the low bits the mask keeps */
    h ^= w;
    h = (h ^ (h >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    h = (h ^ (h >> 27)) * UINT64_C(0x94d049bb133111eb);
    return h ^ (h >> 31);
}

/* Readies ix for up to n strings (at most half its slots full). */
static void str_index_init(tly_str_index_t *ix, size_t n)
{
    size_t slots = 16;
    while (slots < 2 * n)
        slots *= 2;
    ix->slots = xcalloc(slots, sizeof *ix->slots);
    ix->mask = slots - 1;
}

/* The slot of s[0..n) in ix: its own, or the empty one it would take. */
static tly_str_slot_t *str_index_slot(const tly_str_index_t *ix, const char *s, size_t n)
{
    size_t i = (size_t)str_hash(s, n) & ix->mask;
    for (;; i = (i + 1) & ix->mask) {
        tly_str_slot_t *sl = &ix->slots[i];
        if (sl->text == NULL || (sl->len == n && memcmp(sl->text, s, n) == 0))
            return sl;
    }
}

/* The id of s[0..n) in ix, added as `id` if absent (room must exist). */
static uint32_t str_index_add(tly_str_index_t *ix, const char *s, size_t n, uint32_t id)
{
    tly_str_slot_t *sl = str_index_slot(ix, s, n);
    if (sl->text == NULL)
        *sl = (tly_str_slot_t){.text = s, .len = n, .id = id};
    return sl->id;
}

/* Drops the index of a list short enough to scan. */
static void str_index_fit(tly_str_index_t *ix, size_t n)
{
    if (n > TLY_MATCH_SCAN)
        return;
    free(ix->slots);
    *ix = (tly_str_index_t){0};
}

static int cmp_int64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Fills wh's typed copies of its values (strs, ints, doubles, bools). */
static void index_where(tly_where_t *wh)
{
    size_t n = wh->nvalues, ints = 0, doubles = 0;
    for (size_t v = 0; v < n; v++) {
        ints += wh->values[v].has_int;
        doubles += wh->values[v].has_double;
    }
    if (n > TLY_MATCH_SCAN) /* shorter lists are scanned */
        str_index_init(&wh->strs, n);
    wh->ints = ints > 0 ? xcalloc(ints, sizeof *wh->ints) : NULL;
    wh->doubles = doubles > 0 ? xcalloc(doubles, sizeof *wh->doubles) : NULL;
    for (size_t v = 0; v < n; v++) {
        const tly_match_value_t *mv = &wh->values[v];
        if (wh->strs.slots != NULL)
            str_index_add(&wh->strs, mv->text, mv->len, (uint32_t)v);
        if (mv->has_int)
            wh->ints[wh->nints++] = mv->i;
        if (mv->has_double)
            wh->doubles[wh->ndoubles++] = mv->d;
        if (mv->has_bool)
            wh->bools |= mv->b ? 2u : 1u;
    }
    if (wh->nints > 1)
        qsort(wh->ints, wh->nints, sizeof *wh->ints, cmp_int64);
    if (wh->ndoubles > 1)
        qsort(wh->doubles, wh->ndoubles, sizeof *wh->doubles, cmp_double);
}

/* Renders a key list as "user_id, category" into buf. */
static void format_keys(char *buf, size_t cap, char *const *keys, size_t nkeys)
{
    size_t n = 0;
    buf[0] = '\0';
    for (size_t k = 0; k < nkeys && n < cap; k++) {
        int w = snprintf(buf + n, cap - n, "%s%s", k > 0 ? ", " : "", keys[k]);
        if (w < 0)
            break;
        n += (size_t)w;
    }
}

/* Compile state shared by the per-feature steps. */
typedef struct {
    const tly_config_t *cfg;
    tly_featset_t *fs;
    uint32_t *entity_of; /* entity index of each feature */
    size_t *first_feat;  /* the feature that introduced each entity */
    char *errbuf;
    size_t errlen;
} compile_t;

static tly_err_t compile_entity(compile_t *c, size_t i)
{
    const tly_feature_cfg_t *fc = &c->cfg->features[i];
    tly_featset_t *fs = c->fs;
    size_t e;

    if (fc->nkeys == 0 || fc->keys == NULL)
        return config_error(c->cfg, key_line(fc, fc->lines.key), c->errbuf, c->errlen,
                            "features[%zu].key: feature \"%s\" needs a key field", i, fc->name);
    for (e = 0; e < fs->nentities; e++)
        if (strcmp(fs->entities[e].name, fc->entity) == 0)
            break;

    if (e == fs->nentities) {
        if (fs->nentities == TLY_MAX_ENTITIES)
            return config_error(c->cfg, key_line(fc, fc->lines.entity), c->errbuf, c->errlen,
                                "features[%zu].entity: \"%s\" would be entity type %d; at most "
                                "%d are supported",
                                i, fc->entity, TLY_MAX_ENTITIES + 1, TLY_MAX_ENTITIES);
        tly_entity_t *ent = &fs->entities[fs->nentities++];
        ent->name = fc->entity;
        ent->keys = xcalloc(fc->nkeys, sizeof *ent->keys);
        for (size_t k = 0; k < fc->nkeys; k++) {
            int id = intern_field(fs, fc->keys[k]);
            if (id < 0)
                return config_error(c->cfg, key_line(fc, fc->lines.key), c->errbuf, c->errlen,
                                    "features[%zu].key: more than %d distinct event fields are "
                                    "referenced; tallyd extracts at most %d",
                                    i, TLY_MAX_FIELDS, TLY_MAX_FIELDS);
            ent->keys[k] = (uint32_t)id;
            ent->nkeys++;
        }
        c->first_feat[e] = i;
    } else {
        const tly_feature_cfg_t *first = &c->cfg->features[c->first_feat[e]];
        bool same = first->nkeys == fc->nkeys;
        for (size_t k = 0; same && k < fc->nkeys; k++)
            same = strcmp(first->keys[k], fc->keys[k]) == 0;
        if (!same) {
            char keys[256];
            format_keys(keys, sizeof keys, first->keys, first->nkeys);
            return config_error(c->cfg, key_line(fc, fc->lines.key), c->errbuf, c->errlen,
                                "features[%zu].key: entity \"%s\" is keyed by [%s] in "
                                "features[%zu]; every feature of an entity must use the same key",
                                i, fc->entity, keys, c->first_feat[e]);
        }
        for (size_t j = 0; j < i; j++)
            if (c->entity_of[j] == e && strcmp(c->cfg->features[j].name, fc->name) == 0)
                return config_error(c->cfg, key_line(fc, fc->lines.name), c->errbuf, c->errlen,
                                    "features[%zu].name: entity \"%s\" already has a feature "
                                    "named \"%s\" (features[%zu]); names must be unique per entity",
                                    i, fc->entity, fc->name, j);
    }
    c->entity_of[i] = (uint32_t)e;
    fs->feats[i].entity = (uint32_t)e;
    fs->entities[e].nfeats++;
    return TLY_OK;
}

static tly_err_t compile_where(compile_t *c, size_t i)
{
    const tly_feature_cfg_t *fc = &c->cfg->features[i];
    tly_feat_t *feat = &c->fs->feats[i];

    if (fc->nwhere == 0)
        return TLY_OK;
    feat->where = xcalloc(fc->nwhere, sizeof *feat->where);
    for (size_t w = 0; w < fc->nwhere; w++) {
        const tly_where_cfg_t *wc = &fc->where[w];
        tly_where_t *wh = &feat->where[w];
        int line = wc->line > 0 ? wc->line : fc->line;
        if (wc->field == NULL || wc->nvalues == 0 || wc->values == NULL)
            return config_error(c->cfg, line, c->errbuf, c->errlen,
                                "features[%zu].where.%s: needs a value or a non-empty list of "
                                "values",
                                i, wc->field != NULL ? wc->field : "?");
        int id = intern_field(c->fs, wc->field);
        if (id < 0)
            return config_error(c->cfg, line, c->errbuf, c->errlen,
                                "features[%zu].where.%s: more than %d distinct event fields are "
                                "referenced; tallyd extracts at most %d",
                                i, wc->field, TLY_MAX_FIELDS, TLY_MAX_FIELDS);
        wh->field = (uint32_t)id;
        wh->values = xcalloc(wc->nvalues, sizeof *wh->values);
        for (size_t v = 0; v < wc->nvalues; v++)
            parse_match_value(&wh->values[v], wc->values[v]);
        wh->nvalues = wc->nvalues;
        index_where(wh);
        feat->nwhere++;
    }
    return TLY_OK;
}

static tly_err_t compile_values(compile_t *c, size_t i)
{
    const tly_feature_cfg_t *fc = &c->cfg->features[i];
    tly_feat_t *feat = &c->fs->feats[i];
    const char *agg = tly_agg_name(fc->agg);
    bool ok;

    if (fc->agg == TLY_AGG_COUNT)
        ok = fc->nvalues == 0;
    else if (tly_agg_numeric(fc->agg))
        ok = fc->nvalues == 1;
    else
        ok = fc->nvalues >= 1;
    if (!ok)
        return config_error(c->cfg, key_line(fc, fc->lines.value), c->errbuf, c->errlen,
                            "features[%zu].value: %s takes %s, not %zu value fields", i, agg,
                            fc->agg == TLY_AGG_COUNT   ? "no value field"
                            : tly_agg_numeric(fc->agg) ? "exactly one value field"
                                                       : "one or more value fields",
                            fc->nvalues);
    if (fc->nvalues > TLY_MAX_ITEM_VALUES)
        return config_error(c->cfg, key_line(fc, fc->lines.value), c->errbuf, c->errlen,
                            "features[%zu].value: %zu value fields; %s takes at most %d", i,
                            fc->nvalues, agg, TLY_MAX_ITEM_VALUES);
    if (fc->nvalues == 0)
        return TLY_OK;
    feat->values = xcalloc(fc->nvalues, sizeof *feat->values);
    for (size_t v = 0; v < fc->nvalues; v++) {
        int id = intern_field(c->fs, fc->values[v]);
        if (id < 0)
            return config_error(c->cfg, key_line(fc, fc->lines.value), c->errbuf, c->errlen,
                                "features[%zu].value: more than %d distinct event fields are "
                                "referenced; tallyd extracts at most %d",
                                i, TLY_MAX_FIELDS, TLY_MAX_FIELDS);
        feat->values[v] = (uint32_t)id;
        feat->nvalues++;
    }
    return TLY_OK;
}

static tly_err_t compile_windows(compile_t *c, size_t i)
{
    const tly_feature_cfg_t *fc = &c->cfg->features[i];
    tly_feat_t *feat = &c->fs->feats[i];
    const char *agg = tly_agg_name(fc->agg);

    if (!tly_agg_windowed(fc->agg)) {
        if (fc->nwindows != 0)
            return config_error(c->cfg, key_line(fc, fc->lines.windows), c->errbuf, c->errlen,
                                "features[%zu].windows: %s keeps items, not windows; remove "
                                "`windows`",
                                i, agg);
        return TLY_OK;
    }
    if (fc->nwindows == 0 || fc->windows_ms == NULL)
        return config_error(c->cfg, key_line(fc, fc->lines.windows), c->errbuf, c->errlen,
                            "features[%zu].windows: %s needs at least one window", i, agg);
    if (fc->nwindows > TLY_MAX_WINDOWS)
        return config_error(c->cfg, key_line(fc, fc->lines.windows), c->errbuf, c->errlen,
                            "features[%zu].windows: %zu windows; a feature may have at most %d", i,
                            fc->nwindows, TLY_MAX_WINDOWS);
    if (fc->hop_ms < 0 || fc->hop_ms % TLY_MS_SECOND != 0)
        return config_error(c->cfg, key_line(fc, fc->lines.hop), c->errbuf, c->errlen,
                            "features[%zu].hop: a hop must be a positive whole number of seconds",
                            i);

    feat->windows = xcalloc(fc->nwindows, sizeof *feat->windows);
    for (size_t w = 0; w < fc->nwindows; w++) {
        tly_window_t *win = &feat->windows[w];
        int64_t len = fc->windows_ms[w];
        if (len <= 0 || len % TLY_MS_SECOND != 0)
            return config_error(c->cfg, key_line(fc, fc->lines.windows), c->errbuf, c->errlen,
                                "features[%zu].windows[%zu]: a window must be a positive whole "
                                "number of seconds",
                                i, w);
        if (w > 0 && len <= fc->windows_ms[w - 1])
            return config_error(c->cfg, key_line(fc, fc->lines.windows), c->errbuf, c->errlen,
                                "features[%zu].windows[%zu]: windows must be listed shortest "
                                "first, each once",
                                i, w);
        int64_t hop = fc->hop_ms > 0 ? fc->hop_ms : tly_window_default_hop(len);
        tly_duration_format(len, win->label, sizeof win->label);
        if (hop <= 0 || len % hop != 0)
            return config_error(c->cfg, key_line(fc, fc->lines.windows), c->errbuf, c->errlen,
                                "features[%zu].windows[%zu]: window %s is not a multiple of the "
                                "hop",
                                i, w, win->label);
        if (len / hop + 1 > UINT32_MAX)
            return config_error(c->cfg, key_line(fc, fc->lines.windows), c->errbuf, c->errlen,
                                "features[%zu].windows[%zu]: window %s has too many buckets; use "
                                "a longer hop",
                                i, w, win->label);
        win->len_ms = len;
        win->hop_ms = hop;
        win->nbuckets = (uint32_t)tly_window_nbuckets(len, hop);
        feat->nwindows++;
        if (len > feat->horizon_ms)
            feat->horizon_ms = len;
    }
    return TLY_OK;
}

static tly_err_t compile_feature(compile_t *c, size_t i)
{
    const tly_feature_cfg_t *fc = &c->cfg->features[i];
    tly_feat_t *feat = &c->fs->feats[i];
    tly_err_t err;

    if (fc->name == NULL || fc->entity == NULL)
        return config_error(c->cfg, fc->line, c->errbuf, c->errlen,
                            "features[%zu]: a feature needs a name and an entity", i);
    if ((unsigned)fc->agg >= TLY_AGG__COUNT)
        return config_error(c->cfg, key_line(fc, fc->lines.agg), c->errbuf, c->errlen,
                            "features[%zu].agg: unknown aggregation", i);
    feat->id = (uint32_t)i;
    feat->name = fc->name;
    feat->agg = fc->agg;
    if ((err = compile_entity(c, i)) != TLY_OK || (err = compile_where(c, i)) != TLY_OK ||
        (err = compile_values(c, i)) != TLY_OK || (err = compile_windows(c, i)) != TLY_OK)
        return err;
    feat->name_len = strlen(feat->name);
    for (size_t w = 0; w < feat->nwindows; w++) {
        tly_window_t *win = &feat->windows[w];
        size_t llen = strlen(win->label);
        win->qname_len = feat->name_len + 1 + llen;
        win->qname = xcalloc(win->qname_len + 1, 1);
        memcpy(win->qname, feat->name, feat->name_len);
        win->qname[feat->name_len] = ':';
        memcpy(win->qname + feat->name_len + 1, win->label, llen);
    }
    /* ASOF and META are query keywords where a name may stand; a windowed
     * feature so named is asked for with its window, one without windows
     * could not be asked for at all */
    if (feat->nwindows == 0 &&
        (strcasecmp(feat->name, "asof") == 0 || strcasecmp(feat->name, "meta") == 0))
        return config_error(c->cfg, key_line(fc, fc->lines.name), c->errbuf, c->errlen,
                            "features[%zu].name: \"%s\" is a query keyword (ASOF, META): a "
                            "%s feature so named could not be asked for; rename it",
                            i, feat->name, tly_agg_name(feat->agg));
    if (fc->agg == TLY_AGG_LAST) {
        feat->k = 1;
    } else if (fc->agg == TLY_AGG_LAST_K) {
        if (fc->k == 0)
            return config_error(c->cfg, key_line(fc, fc->lines.k), c->errbuf, c->errlen,
                                "features[%zu].k: last_k needs k >= 1", i);
        feat->k = fc->k;
    }
    return TLY_OK;
}

/* Compiles one set of event rules (topic NULL: the top-level events.*),
 * interning its time field. Errors name the key the settings came from. */
static tly_err_t compile_rules(compile_t *c, tly_event_rules_t *rules, const tly_topic_cfg_t *topic,
                               const char *time_field, tly_time_unit_t unit, int64_t skew_ms,
                               int64_t max_bytes, int64_t max_string, size_t index)
{
    char key[64];
    if (topic != NULL)
        snprintf(key, sizeof key, "kafka.topics[%zu].events.time.field", index);
    else
        snprintf(key, sizeof key, "events.time.field");
    int line = topic != NULL ? topic->line : 0;
    *rules = (tly_event_rules_t){.topic = topic != NULL ? topic->name : NULL,
                                 .time_field = -1,
                                 .time_unit = unit,
                                 .max_future_skew_ms = skew_ms,
                                 .max_bytes = max_bytes,
                                 .max_string = max_string,
                                 .key_entity = -1};
    if (unit == TLY_TIME_KAFKA)
        return TLY_OK;
    if (time_field == NULL || *time_field == '\0')
        return config_error(c->cfg, line, c->errbuf, c->errlen,
                            "%s: a time unit is set but no time field", key);
    int id = intern_field(c->fs, time_field);
    if (id < 0)
        return config_error(c->cfg, line, c->errbuf, c->errlen,
                            "%s: more than %d distinct event fields are referenced; tallyd "
                            "extracts at most %d",
                            key, TLY_MAX_FIELDS, TLY_MAX_FIELDS);
    rules->time_field = id;
    return TLY_OK;
}

/* Fills entity feature lists, slots and the horizons of last/last_k. */
static tly_err_t finish_entities(compile_t *c)
{
    tly_featset_t *fs = c->fs;
    int64_t longest = 0;

    for (size_t e = 0; e < fs->nentities; e++) {
        fs->entities[e].feats = xcalloc(fs->entities[e].nfeats, sizeof(uint32_t));
        fs->entities[e].nfeats = 0;
    }
    for (size_t i = 0; i < fs->nfeats; i++) {
        tly_feat_t *feat = &fs->feats[i];
        tly_entity_t *ent = &fs->entities[feat->entity];
        feat->slot = (uint32_t)ent->nfeats;
        ent->feats[ent->nfeats++] = (uint32_t)i;
        if (feat->horizon_ms > ent->horizon_ms)
            ent->horizon_ms = feat->horizon_ms;
        if (feat->horizon_ms > longest)
            longest = feat->horizon_ms;
    }
    /* Only windowed features have a horizon so far. */
    for (size_t i = 0; i < fs->nfeats; i++) {
        tly_feat_t *feat = &fs->feats[i];
        tly_entity_t *ent = &fs->entities[feat->entity];
        if (tly_agg_windowed(feat->agg))
            continue;
        if (c->cfg->store.idle_ttl_ms > 0)
            feat->horizon_ms = c->cfg->store.idle_ttl_ms;
        else
            feat->horizon_ms = ent->horizon_ms > 0 ? ent->horizon_ms : longest;
        if (feat->horizon_ms <= 0)
            return config_error(c->cfg, c->cfg->features[i].line, c->errbuf, c->errlen,
                                "features[%zu]: %s feature \"%s\" needs store.idle_ttl when no "
                                "feature has windows",
                                i, tly_agg_name(feat->agg), feat->name);
    }
    for (size_t i = 0; i < fs->nfeats; i++) {
        tly_entity_t *ent = &fs->entities[fs->feats[i].entity];
        if (fs->feats[i].horizon_ms > ent->horizon_ms)
            ent->horizon_ms = fs->feats[i].horizon_ms;
    }
    return TLY_OK;
}

static bool where_same(const tly_where_t *a, const tly_where_t *b)
{
    if (a->field != b->field || a->nvalues != b->nvalues)
        return false;
    for (size_t v = 0; v < a->nvalues; v++)
        if (a->values[v].len != b->values[v].len ||
            memcmp(a->values[v].text, b->values[v].text, a->values[v].len) != 0)
            return false;
    return true;
}

/* Numbers the distinct `where` conditions, gives each feature its bits and
 * indexes the conditions' string values by field (tly_featset_match). With
 * more than 64 conditions, match_masks stays false. */
static void compile_conds(tly_featset_t *fs)
{
    const tly_where_t *conds[64];
    size_t n = 0;
    for (size_t i = 0; i < fs->nfeats; i++) {
        tly_feat_t *feat = &fs->feats[i];
        feat->conds = 0;
        for (size_t w = 0; w < feat->nwhere; w++) {
            size_t j = 0;
            while (j < n && !where_same(conds[j], &feat->where[w]))
                j++;
            if (j == n) {
                if (n == 64)
                    return;
                conds[n++] = &feat->where[w];
            }
            feat->conds |= UINT64_C(1) << j;
        }
    }
    fs->conds = xcalloc(n ? n : 1, sizeof *fs->conds);
    fs->cond_fields = xcalloc(n ? n : 1, sizeof *fs->cond_fields);
    size_t *field_values = xcalloc(n ? n : 1, sizeof *field_values); /* per cond_fields[] */
    for (size_t j = 0; j < n; j++) {
        const tly_where_t *wh = conds[j];
        fs->conds[j] = wh;
        size_t f = 0;
        while (f < fs->ncond_fields && fs->cond_fields[f].field != wh->field)
            f++;
        tly_cond_field_t *cf = &fs->cond_fields[f];
        if (f == fs->ncond_fields) {
            fs->ncond_fields++;
            cf->field = wh->field;
        }
        cf->conds |= UINT64_C(1) << j;
        field_values[f] += wh->nvalues;
    }
    for (size_t f = 0; f < fs->ncond_fields; f++) {
        tly_cond_field_t *cf = &fs->cond_fields[f];
        cf->lits = xcalloc(field_values[f], sizeof *cf->lits);
        str_index_init(&cf->index, field_values[f]);
        for (uint64_t m = cf->conds; m != 0; m &= m - 1) {
            const tly_where_t *wh = fs->conds[__builtin_ctzll(m)];
            for (size_t v = 0; v < wh->nvalues; v++) {
                const tly_match_value_t *mv = &wh->values[v];
                uint32_t l = str_index_add(&cf->index, mv->text, mv->len, (uint32_t)cf->nlits);
                if (l == cf->nlits) {
                    cf->lits[l].text = mv->text;
                    cf->lits[l].len = mv->len;
                    cf->nlits++;
                }
                cf->lits[l].conds |= m & -m;
            }
        }
        str_index_fit(&cf->index, cf->nlits);
    }
    free(field_values);
    fs->nconds = n;
    fs->match_masks = true;
}

/* Resolves kafka.topics[].key to entity types. In shard mode an entity's
 * events must all arrive on the partition of its own id, so with several
 * entity types every topic names its key entity and every entity type is
 * the key of some topic; with one, an unkeyed topic is keyed by it. */
static tly_err_t compile_topic_keys(compile_t *c)
{
    const tly_config_t *cfg = c->cfg;
    tly_featset_t *fs = c->fs;
    bool shard = cfg->kafka.mode == TLY_MODE_SHARD;
    for (size_t i = 0; i < fs->ntopics && cfg->kafka.topic_cfgs != NULL; i++) {
        const tly_topic_cfg_t *t = &cfg->kafka.topic_cfgs[i];
        if (t->key_entity == NULL) {
            if (shard && fs->nentities > 1)
                return config_error(cfg, t->line, c->errbuf, c->errlen,
                                    "kafka.topics[%zu].key: shard mode needs the entity type whose "
                                    "id is the message key of topic \"%s\" (the features have "
                                    "%zu entity types: %s, %s%s); or use kafka.mode replica",
                                    i, t->name, fs->nentities, fs->entities[0].name,
                                    fs->entities[1].name, fs->nentities > 2 ? ", ..." : "");
            if (shard && fs->nentities == 1)
                fs->topics[i].key_entity = 0;
            continue;
        }
        int e = tly_featset_entity(fs, t->key_entity, strlen(t->key_entity));
        if (e < 0)
            return config_error(cfg, t->line, c->errbuf, c->errlen,
                                "kafka.topics[%zu].key: no feature has entity \"%s\"", i,
                                t->key_entity);
        fs->topics[i].key_entity = e;
    }
    if (!shard)
        return TLY_OK;
    for (size_t e = 0; e < fs->nentities; e++) {
        bool keyed = false;
        for (size_t i = 0; i < fs->ntopics && !keyed; i++)
            keyed = fs->topics[i].key_entity == (int)e;
        if (!keyed)
            return config_error(cfg, cfg->kafka.topic_cfgs ? cfg->kafka.topic_cfgs[0].line : 0,
                                c->errbuf, c->errlen,
                                "kafka.topics: in shard mode every entity type needs a topic "
                                "keyed by its id, and no topic has key: %s (its features would "
                                "never be fed); add one, or use kafka.mode replica",
                                fs->entities[e].name);
    }
    return TLY_OK;
}

tly_err_t tly_featset_compile(const tly_config_t *cfg, tly_featset_t **out, char *errbuf,
                              size_t errlen)
{
    tly_err_t err = TLY_OK;
    tly_featset_t *fs = NULL;
    compile_t c = {.cfg = cfg, .errbuf = errbuf, .errlen = errlen};

    if (errbuf != NULL && errlen > 0)
        errbuf[0] = '\0';
    if (cfg == NULL || out == NULL || (cfg->nfeatures > 0 && cfg->features == NULL))
        return TLY_E_INVAL;
    if (cfg->nfeatures > TLY_MAX_FEATURES)
        return config_error(cfg, cfg->features[TLY_MAX_FEATURES].line, errbuf, errlen,
                            "features[%d]: %zu features; tallyd supports at most %d",
                            TLY_MAX_FEATURES, cfg->nfeatures, TLY_MAX_FEATURES);

    fs = xcalloc(1, sizeof *fs);
    fs->fields = xcalloc(TLY_MAX_FIELDS, sizeof *fs->fields);
    fs->time_field = -1;
    fs->time_unit = cfg->events.time_unit;
    fs->max_future_skew_ms = cfg->events.max_future_skew_ms;
    fs->max_string = cfg->events.max_string;
    fs->max_bytes = cfg->events.max_bytes;
    fs->nfeats = cfg->nfeatures;
    fs->feats = xcalloc(cfg->nfeatures, sizeof *fs->feats);
    fs->entities = xcalloc(cfg->nfeatures, sizeof *fs->entities);
    c.fs = fs;
    c.entity_of = xcalloc(cfg->nfeatures, sizeof *c.entity_of);
    c.first_feat = xcalloc(cfg->nfeatures, sizeof *c.first_feat);

    for (size_t i = 0; i < cfg->nfeatures; i++)
        if ((err = compile_feature(&c, i)) != TLY_OK)
            goto out;

    fs->nfeat_fields = fs->nfields;
    if ((err = compile_rules(&c, &fs->events, NULL, cfg->events.time_field, cfg->events.time_unit,
                             cfg->events.max_future_skew_ms, cfg->events.max_bytes,
                             cfg->events.max_string, 0)) != TLY_OK)
        goto out;
    fs->time_field = fs->events.time_field;
    fs->ntopics = cfg->kafka.ntopics;
    fs->topics = xcalloc(cfg->kafka.ntopics, sizeof *fs->topics);
    for (size_t i = 0; i < cfg->kafka.ntopics && cfg->kafka.topic_cfgs != NULL; i++) {
        const tly_topic_cfg_t *t = &cfg->kafka.topic_cfgs[i];
        if ((err = compile_rules(&c, &fs->topics[i], t, t->time_field, t->time_unit,
                                 t->max_future_skew_ms, t->max_bytes, t->max_string, i)) != TLY_OK)
            goto out;
        if (t->max_future_skew_ms > fs->max_future_skew_ms)
            fs->max_future_skew_ms = t->max_future_skew_ms;
        if (t->max_string > fs->max_string)
            fs->max_string = t->max_string;
    }
    if ((err = finish_entities(&c)) != TLY_OK)
        goto out;
    if ((err = compile_topic_keys(&c)) != TLY_OK)
        goto out;
    compile_conds(fs);

    *out = fs;
    fs = NULL;
out:
    free(c.entity_of);
    free(c.first_feat);
    tly_featset_free(fs);
    return err;
}

void tly_featset_free(tly_featset_t *fs)
{
    if (fs == NULL)
        return;
    for (size_t i = 0; i < TLY_MAX_FIELDS && fs->fields != NULL; i++)
        free(fs->fields[i]);
    free(fs->fields);
    if (fs->feats != NULL) {
        for (size_t i = 0; i < fs->nfeats; i++) {
            tly_feat_t *feat = &fs->feats[i];
            if (feat->where != NULL)
                for (size_t w = 0; w < feat->nwhere; w++) {
                    free(feat->where[w].values);
                    free(feat->where[w].strs.slots);
                    free(feat->where[w].ints);
                    free(feat->where[w].doubles);
                }
            free(feat->where);
            free(feat->values);
            for (size_t w = 0; feat->windows != NULL && w < feat->nwindows; w++)
                free(feat->windows[w].qname);
            free(feat->windows);
        }
    }
    free(fs->feats);
    if (fs->entities != NULL) {
        for (size_t e = 0; e < fs->nentities; e++) {
            free(fs->entities[e].keys);
            free(fs->entities[e].feats);
        }
    }
    free(fs->entities);
    free(fs->topics);
    for (size_t f = 0; fs->cond_fields != NULL && f < fs->ncond_fields; f++) {
        free(fs->cond_fields[f].lits);
        free(fs->cond_fields[f].index.slots);
    }
    free(fs->cond_fields);
    free(fs->conds);
    free(fs);
}

int tly_featset_entity(const tly_featset_t *fs, const char *name, size_t len)
{
    for (size_t e = 0; e < fs->nentities; e++)
        if (name_eq(fs->entities[e].name, name, len))
            return (int)e;
    return -1;
}

int tly_featset_field(const tly_featset_t *fs, const char *name, size_t len)
{
    for (size_t i = 0; i < fs->nfields; i++)
        if (name_eq(fs->fields[i], name, len))
            return (int)i;
    return -1;
}

/* Returns the index of feat's window spelled s[0..n) — its label or any
 * equal duration ("60m" for "1h") — or -1. */
static int find_window(const tly_feat_t *feat, const char *s, size_t n)
{
    for (size_t w = 0; w < feat->nwindows; w++)
        if (name_eq(feat->windows[w].label, s, n))
            return (int)w;
    char buf[32];
    int64_t ms;
    if (n == 0 || n >= sizeof buf || memchr(s, '\0', n) != NULL)
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (tly_duration_parse(buf, &ms) != TLY_OK)
        return -1;
    for (size_t w = 0; w < feat->nwindows; w++)
        if (feat->windows[w].len_ms == ms)
            return (int)w;
    return -1;
}

tly_err_t tly_featset_resolve(const tly_featset_t *fs, uint32_t entity, const char *spec,
                              size_t len, uint32_t *feat, int *window)
{
    if (fs == NULL || entity >= fs->nentities || (spec == NULL && len > 0))
        return TLY_E_NOTFOUND;
    const char *colon = len > 0 ? memchr(spec, ':', len) : NULL;
    size_t nlen = colon != NULL ? (size_t)(colon - spec) : len;
    const tly_entity_t *ent = &fs->entities[entity];

    for (size_t k = 0; k < ent->nfeats; k++) {
        const tly_feat_t *f = &fs->feats[ent->feats[k]];
        if (!name_eq(f->name, spec, nlen))
            continue;
        int w = -1;
        if (colon != NULL && (w = find_window(f, colon + 1, len - nlen - 1)) < 0)
            return TLY_E_NOTFOUND;
        *feat = f->id;
        *window = w;
        return TLY_OK;
    }
    return TLY_E_NOTFOUND;
}

/* The index of s[0..n) in the list ix indexes, or -1. */
static long str_index_get(const tly_str_index_t *ix, const char *s, size_t n)
{
    const tly_str_slot_t *sl = str_index_slot(ix, s, n);
    return sl->text != NULL ? (long)sl->id : -1;
}

static bool value_matches(const tly_where_t *wh, const tly_value_t *v)
{
    switch (v->type) {
    case TLY_V_STR:
        if (wh->strs.slots != NULL)
            return str_index_get(&wh->strs, v->u.s, v->len) >= 0;
        for (size_t i = 0; i < wh->nvalues; i++)
            if (wh->values[i].len == v->len && memcmp(wh->values[i].text, v->u.s, v->len) == 0)
                return true;
        return false;
    case TLY_V_INT: {
        size_t lo = 0, hi = wh->nints; /* the first listed >= v */
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (wh->ints[mid] < v->u.i)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo < wh->nints && wh->ints[lo] == v->u.i;
    }
    case TLY_V_DOUBLE: {
        size_t lo = 0, hi = wh->ndoubles;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (wh->doubles[mid] < v->u.d)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo < wh->ndoubles && wh->doubles[lo] == v->u.d;
    }
    case TLY_V_BOOL:
        return (wh->bools & (v->u.i != 0 ? 2u : 1u)) != 0;
    default: /* missing or null: the condition fails */
        return false;
    }
}

int64_t tly_feat_earliest(const tly_feat_t *feat, int64_t now_ms)
{
    if (feat->nwindows == 0)
        return now_ms - feat->horizon_ms;
    int64_t earliest = INT64_MAX;
    for (size_t w = 0; w < feat->nwindows; w++) {
        int64_t s = tly_window_start(now_ms, feat->windows[w].len_ms, feat->windows[w].hop_ms);
        if (s < earliest)
            earliest = s;
    }
    return earliest;
}

bool tly_feat_match(const tly_feat_t *feat, const tly_event_t *ev)
{
    for (size_t w = 0; w < feat->nwhere; w++) {
        const tly_where_t *wh = &feat->where[w];
        if (wh->field >= ev->nfields || !value_matches(wh, &ev->vals[wh->field]))
            return false;
    }
    return true;
}

uint64_t tly_featset_match(const tly_featset_t *fs, const tly_event_t *ev)
{
    uint64_t held = 0;
    for (size_t f = 0; f < fs->ncond_fields; f++) {
        const tly_cond_field_t *cf = &fs->cond_fields[f];
        if (cf->field >= ev->nfields)
            continue;
        const tly_value_t *v = &ev->vals[cf->field];
        if (v->type == TLY_V_STR) {
            /* a string equals at most one distinct text */
            if (cf->index.slots != NULL) {
                long l = str_index_get(&cf->index, v->u.s, v->len);
                if (l >= 0)
                    held |= cf->lits[l].conds;
                continue;
            }
            for (size_t l = 0; l < cf->nlits; l++)
                if (cf->lits[l].len == v->len && tly_bytes_eq(cf->lits[l].text, v->u.s, v->len)) {
                    held |= cf->lits[l].conds;
                    break;
                }
        } else if (v->type != TLY_V_NIL) {
            for (uint64_t m = cf->conds; m != 0; m &= m - 1)
                if (value_matches(fs->conds[__builtin_ctzll(m)], v))
                    held |= m & -m;
        }
    }
    return held;
}

/* The length of v in decimal, sign included. */
static size_t int_len(int64_t v)
{
    static const uint64_t p10[20] = {1,
                                     10,
                                     100,
                                     1000,
                                     10000,
                                     100000,
                                     1000000,
                                     10000000,
                                     100000000,
                                     1000000000,
                                     10000000000,
                                     100000000000,
                                     1000000000000,
                                     10000000000000,
                                     100000000000000,
                                     1000000000000000,
                                     10000000000000000,
                                     100000000000000000,
                                     1000000000000000000,
                                     10000000000000000000u};
    /* u | 1: zero has a digit too (p10[t] is even for t > 0, so the or
     * changes no other comparison) */
    uint64_t u = (v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v) | 1;
    /* bits * log10(2) (about 1233 / 4096) is the digit count or one less */
    unsigned bits = 64 - (unsigned)__builtin_clzll(u);
    unsigned t = bits * 1233 >> 12;
    return t + (u >= p10[t]) + (v < 0);
}

#if FEATURE_WORDS
#define digit_bytes8 tly_digit_bytes8
#endif

/* Writes v in decimal so that it ends just before `end` (int_len(v) bytes);
 * returns its start. */
static char *render_int(int64_t v, char *end)
{
    /* Work in unsigned so that INT64_MIN negates without overflow. */
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    char *p = end;
#if FEATURE_WORDS
    const uint64_t zeros = UINT64_C(0x3030303030303030);
    while (u >= 100000000) { /* eight digits at a time from the right */
        uint64_t x = digit_bytes8(u % 100000000) | zeros;
        p -= 8;
        memcpy(p, &x, 8);
        u /= 100000000;
    }
    uint64_t x = digit_bytes8(u);
    /* the leading zero bytes are not digits; 0 itself has one digit */
    size_t d = x == 0 ? 1 : 8 - (size_t)__builtin_ctzll(x) / 8;
    x |= zeros;
    p -= d;
    memcpy(p, (const char *)&x + (8 - d), d);
#else
    static const char pairs[] = "00010203040506070809101112131415161718192021222324"
                                "25262728293031323334353637383940414243444546474849"
                                "50515253545556575859606162636465666768697071727374"
                                "75767778798081828384858687888990919293949596979899";
    while (u >= 100) { /* two digits per division */
        unsigned d = (unsigned)(u % 100) * 2;
        u /= 100;
        *--p = pairs[d + 1];
        *--p = pairs[d];
    }
    if (u >= 10) {
        *--p = pairs[u * 2 + 1];
        *--p = pairs[u * 2];
    } else {
        *--p = (char)('0' + u);
    }
#endif
    if (v < 0)
        *--p = '-';
    return p;
}

tly_err_t tly_entity_id_any(const tly_featset_t *fs, uint32_t entity, const tly_event_t *ev,
                            char *buf, size_t cap, size_t *len)
{
    const tly_entity_t *ent = &fs->entities[entity];

    /* Type errors first, so that a too-long id never hides a missing key. */
    for (size_t k = 0; k < ent->nkeys; k++) {
        uint32_t f = ent->keys[k];
        if (f >= ev->nfields || ev->vals[f].type == TLY_V_NIL)
            return TLY_E_EV_MISSING_KEY;
        if (ev->vals[f].type != TLY_V_STR && ev->vals[f].type != TLY_V_INT)
            return TLY_E_EV_WRONG_TYPE;
    }

    size_t n = 0;
    for (size_t k = 0; k < ent->nkeys; k++) {
        const tly_value_t *v = &ev->vals[ent->keys[k]];
        if (k > 0) {
            if (n >= cap)
                return TLY_E_EV_VALUE_TOO_LONG;
            buf[n++] = '|';
        }
        if (v->type == TLY_V_STR && ent->nkeys > 1) {
            /* a composite key's string part: every '|' and backslash in
             * it gets a backslash before it, so that ("a|b", "c") and
             * ("a", "b|c") are two ids */
            for (size_t i = 0; i < v->len; i++) {
                char c = v->u.s[i];
                if (c == '|' || c == '\\') {
                    if (n >= cap)
                        return TLY_E_EV_VALUE_TOO_LONG;
                    buf[n++] = '\\';
                }
                if (n >= cap)
                    return TLY_E_EV_VALUE_TOO_LONG;
                buf[n++] = c;
            }
            continue;
        }
        /* an integer is rendered in place: no copy */
        size_t plen = v->type == TLY_V_STR ? v->len : int_len(v->u.i);
        if (plen > cap - n)
            return TLY_E_EV_VALUE_TOO_LONG;
        if (v->type == TLY_V_STR)
            memcpy(buf + n, v->u.s, plen);
        else
            render_int(v->u.i, buf + n + plen);
        n += plen;
    }
    *len = n;
    return TLY_OK;
}
