/*
 * commands.c — the command table and every handler.
 *
 * commands[] is data: {name, arity, flags, handler, group, summary, args}.
 * tly_command_exec() looks the name up, checks arity (Redis's convention:
 * n > 0 exactly n arguments with the name, n < 0 at least −n) and
 * authentication in one place, then calls the handler, which appends
 * exactly one reply. COMMAND, COMMAND DOCS and the unknown-command error
 * are generated from the same table.
 *
 * tallyd's verbs (DESIGN.md §5):
 *   FEATURES  <entity> <id> [<name>[:<window>] ...] [ASOF <ms>] [META]
 *   MFEATURES <entity> <numids> <id> ... [<name>[:<window>] ...] [ASOF <ms>]
 *   RECENT    <entity> <id> <name> [COUNT <n>] [SINCE <ms>] [ASOF <ms>] [WHERE <value>]
 *   CATALOG
 * ASOF and META are keywords wherever a feature name may stand (matched
 * case-insensitively), so a feature named "meta" must be asked for with
 * its window. A last/last_k feature in FEATURES gives its newest value
 * (last) or its item count (last_k); RECENT gives the items.
 *
 * Threads: the server's loop threads, each with its own scratch; handlers
 * read the store under RCU inside tly_store_read/recent and never wait for
 * a writer. The daemon context is read-only here except for atomics.
 */
#include "tallyd/commands.h"

#include <ctype.h>
#include <errno.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "tallyd/rcu.h"
#include "tallyd/server.h"
#include "tallyd/snapshot.h"
#include "tallyd/version.h"
#include "tallyd/log.h"

#define STRBUF_INITIAL (64u << 10)
#define ERRARG_MAX     128 /* bytes of an argument echoed in an error */

struct tly_cmd_scratch {
    tly_featwin_t *req; /* requested (feature, window) pairs */
    size_t reqcap;
    uint16_t *asked; /* per feature, the windows already in req (a bit each) */
    size_t askedcap;
    tly_value_t *vals;
    size_t valcap;
    char *strbuf; /* strings of `last` values and items */
    size_t strcap;
    tly_item_t *items;
    size_t itemcap;
    tly_buf_t text; /* INFO, CLIENT INFO */
};

typedef struct {
    tly_daemon_t *d;
    tly_session_t *s;
    tly_cmd_scratch_t *scratch;
    const tly_arg_t *argv;
    size_t argc;
    tly_buf_t *out;
    int64_t now_ms;
} cmd_ctx_t;

typedef void (*cmd_handler_fn)(cmd_ctx_t *c);

enum {
    CMD_NOAUTH = 1u << 0,   /* may run before AUTH */
    CMD_READONLY = 1u << 1, /* reads data */
    CMD_FAST = 1u << 2,     /* O(1)-ish */
    CMD_STALE = 1u << 3,    /* runs while the source is loading (others get -LOADING) */
};

/* One argument in COMMAND DOCS, as Redis 7 describes its own (redis-cli
 * builds its hints from these): a type of Redis's (string, integer,
 * pure-token, block), an optional token before it, flags. A block's
 * arguments are `sub`, ended by a NULL name. */
#define ARG_OPTIONAL 1u
#define ARG_MULTIPLE 2u
typedef struct cmd_arg {
    const char *name;
    const char *type;
    const char *token;
    unsigned flags;
    const struct cmd_arg *sub;
} cmd_arg_t;

typedef struct {
    const char *name; /* lower case */
    int arity;
    unsigned flags;
    cmd_handler_fn handler;
    const char *group;
    const char *summary;
    const cmd_arg_t *args; /* for COMMAND DOCS; NULL name ends them */
} command_t;

tly_cmd_scratch_t *tly_cmd_scratch_new(void)
{
    tly_cmd_scratch_t *sc = calloc(1, sizeof *sc);
    if (sc == NULL) {
        fputs("tallyd: out of memory\n", stderr);
        abort();
    }
    sc->strcap = STRBUF_INITIAL;
    sc->strbuf = tly_xrealloc(NULL, sc->strcap);
    return sc;
}

void tly_cmd_scratch_free(tly_cmd_scratch_t *sc)
{
    if (sc == NULL)
        return;
    free(sc->req);
    free(sc->asked);
    free(sc->vals);
    free(sc->strbuf);
    free(sc->items);
    tly_buf_fini(&sc->text);
    free(sc);
}

/* Returns arr (of elem-byte items, *cap of them) grown to hold at least n,
 * doubling from 64. */
static void *reserve(void *arr, size_t *cap, size_t n, size_t elem)
{
    if (n <= *cap)
        return arr;
    size_t c = *cap ? *cap : 64;
    while (c < n)
        c *= 2;
    *cap = c;
    return tly_xrealloc(arr, c * elem);
}

static void reserve_req(tly_cmd_scratch_t *sc, size_t n)
{
    sc->req = reserve(sc->req, &sc->reqcap, n, sizeof *sc->req);
}

static void reserve_vals(tly_cmd_scratch_t *sc, size_t n)
{
    sc->vals = reserve(sc->vals, &sc->valcap, n, sizeof *sc->vals);
}

static void grow_strbuf(tly_cmd_scratch_t *sc)
{
    sc->strcap *= 2;
    sc->strbuf = tly_xrealloc(sc->strbuf, sc->strcap);
}

void tly_session_init(tly_session_t *s, const tly_daemon_t *d)
{
    memset(s, 0, sizeof *s);
    s->fd = -1;
    s->proto = 2;
    s->authed = d->cfg->server.requirepass[0] == '\0';
}

/* --- argument helpers --- */

static bool arg_is(const tly_arg_t *a, const char *word)
{
    size_t n = strlen(word);
    return a->len == n && strncasecmp(a->ptr, word, n) == 0;
}

/* Strict decimal int64 in its one canonical spelling, as Redis takes
 * integer arguments: "-12" and "0", not "+12", " 12", "012", "00" or "-0". */
static bool arg_int(const tly_arg_t *a, int64_t *v)
{
    char buf[24];
    if (a->len == 0 || a->len >= sizeof buf)
        return false;
    memcpy(buf, a->ptr, a->len);
    buf[a->len] = '\0';
    const char *d = buf[0] == '-' ? buf + 1 : buf;
    if (!isdigit((unsigned char)d[0]) || (d[0] == '0' && (d[1] != '\0' || d != buf)))
        return false;
    errno = 0;
    char *end;
    long long x = strtoll(buf, &end, 10);
    if (errno != 0 || *end != '\0')
        return false;
    *v = x;
    return true;
}

/* Copies an argument for an error message: at most ERRARG_MAX bytes,
 * control characters and quotes replaced, NUL-terminated. */
static const char *err_arg(const tly_arg_t *a, char *buf, size_t cap)
{
    size_t n = a->len < cap - 1 ? a->len : cap - 1;
    if (n > ERRARG_MAX)
        n = ERRARG_MAX;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)a->ptr[i];
        buf[i] = (ch < 32 || ch == 127 || ch == '\'') ? '?' : (char)ch;
    }
    buf[n] = '\0';
    return buf;
}

static void syntax_error(cmd_ctx_t *c, const char *what, const tly_arg_t *a)
{
    char tmp[ERRARG_MAX + 1];
    if (a != NULL)
        tly_resp_errorf(c->out, "ERR syntax error: %s, got '%s'", what,
                        err_arg(a, tmp, sizeof tmp));
    else
        tly_resp_errorf(c->out, "ERR syntax error: %s", what);
}

/* Resolves argv[i] as an entity type; on failure writes -NOENTITY. */
static int resolve_entity(cmd_ctx_t *c, size_t i)
{
    const tly_featset_t *fs = c->d->fs;
    int e = tly_featset_entity(fs, c->argv[i].ptr, c->argv[i].len);
    if (e >= 0)
        return e;
    char tmp[ERRARG_MAX + 1], known[512] = "";
    size_t used = 0;
    for (size_t k = 0; k < fs->nentities && used < sizeof known - 1; k++) {
        int n = snprintf(known + used, sizeof known - used, "%s%s", k ? ", " : "",
                         fs->entities[k].name);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    tly_resp_errorf(c->out, "NOENTITY unknown entity type '%s' (known: %s)",
                    err_arg(&c->argv[i], tmp, sizeof tmp), known);
    return -1;
}

/* Appends the (feature, window) pairs named by spec to sc->req at *n;
 * with once, each pair once per request (FEATURES: a RESP3 reply is a map,
 * where a repeated name would be a repeated key; MFEATURES replies values
 * in the order asked, repeats included), and parse_names clears sc->asked
 * after, whatever the outcome. Returns false (and
 * writes -NOFEATURE) when the spec names nothing. */
static bool add_spec(cmd_ctx_t *c, uint32_t entity, const tly_arg_t *spec, bool once, size_t *n)
{
    const tly_featset_t *fs = c->d->fs;
    uint32_t feat;
    int window;
    if (tly_featset_resolve(fs, entity, spec->ptr, spec->len, &feat, &window) != TLY_OK) {
        char tmp[ERRARG_MAX + 1];
        tly_resp_errorf(c->out, "NOFEATURE %s has no feature '%s' (CATALOG lists them)",
                        fs->entities[entity].name, err_arg(spec, tmp, sizeof tmp));
        return false;
    }
    const tly_feat_t *f = &fs->feats[feat];
    size_t nw = f->nwindows == 0 ? 1 : (window >= 0 ? 1 : f->nwindows);
    tly_cmd_scratch_t *sc = c->scratch;
    reserve_req(sc, *n + nw);
    if (sc->askedcap < fs->nfeats) {
        sc->asked = tly_xrealloc(sc->asked, fs->nfeats * sizeof *sc->asked);
        memset(sc->asked, 0, fs->nfeats * sizeof *sc->asked);
        sc->askedcap = fs->nfeats;
    }
    _Static_assert(TLY_MAX_WINDOWS <= 16, "a window is a bit of asked[]");
    size_t w0 = f->nwindows == 0 ? 0 : window >= 0 ? (size_t)window : 0;
    for (size_t w = w0; w < w0 + nw; w++) {
        uint16_t bit = (uint16_t)(1u << w);
        if (once && sc->asked[feat] & bit)
            continue;
        sc->asked[feat] |= bit;
        sc->req[(*n)++] = (tly_featwin_t){feat, (uint32_t)w};
    }
    return true;
}

/* Every feature and window of entity, in config order. */
static size_t add_all(cmd_ctx_t *c, uint32_t entity)
{
    const tly_featset_t *fs = c->d->fs;
    const tly_entity_t *ent = &fs->entities[entity];
    size_t n = 0;
    for (size_t i = 0; i < ent->nfeats; i++) {
        const tly_feat_t *f = &fs->feats[ent->feats[i]];
        size_t nw = f->nwindows == 0 ? 1 : f->nwindows;
        reserve_req(c->scratch, n + nw);
        for (size_t w = 0; w < nw; w++)
            c->scratch->req[n++] = (tly_featwin_t){f->id, (uint32_t)w};
    }
    return n;
}

/* The reply name of one request: "name:window" or "name". */
static void put_name(cmd_ctx_t *c, const tly_featwin_t *r)
{
    const tly_feat_t *f = &c->d->fs->feats[r->feat];
    if (f->nwindows == 0)
        tly_resp_bulk(c->out, f->name, f->name_len);
    else /* "name:label", made once at start-up (tly_window_t.qname) */
        tly_resp_bulk(c->out, f->windows[r->window].qname, f->windows[r->window].qname_len);
}

/* Parses the trailing options of FEATURES/MFEATURES from argv[i..): names
 * up to the first keyword, then ASOF <ms> / META (allow_meta: FEATURES,
 * whose names are each taken once). Fills sc->req (*n pairs; all features
 * when no names). Returns false after writing an error. */
static bool parse_names_once(cmd_ctx_t *c, uint32_t entity, size_t i, bool allow_meta,
                             int64_t *asof, bool *meta, size_t *n)
{
    bool seen_asof = false;
    *n = 0;
    *asof = c->now_ms;
    *meta = false;
    bool named = false;
    for (; i < c->argc; i++) {
        const tly_arg_t *a = &c->argv[i];
        if (arg_is(a, "asof")) {
            if (seen_asof || i + 1 >= c->argc) {
                syntax_error(c, seen_asof ? "ASOF given twice" : "ASOF needs epoch milliseconds",
                             NULL);
                return false;
            }
            if (!arg_int(&c->argv[i + 1], asof) || *asof < 0) {
                syntax_error(c, "ASOF needs epoch milliseconds", &c->argv[i + 1]);
                return false;
            }
            seen_asof = true;
            i++;
        } else if (allow_meta && arg_is(a, "meta")) {
            if (*meta) {
                syntax_error(c, "META given twice", NULL);
                return false;
            }
            *meta = true;
        } else if (!allow_meta && arg_is(a, "meta") &&
                   tly_featset_resolve(c->d->fs, entity, a->ptr, a->len, &(uint32_t){0},
                                       &(int){0}) != TLY_OK) {
            /* not a feature called meta: the FEATURES keyword, asked of MFEATURES */
            syntax_error(c, "MFEATURES takes no META (FEATURES does)", a);
            return false;
        } else if (seen_asof || *meta) {
            syntax_error(c, "feature names come before ASOF and META", a);
            return false;
        } else {
            if (!add_spec(c, entity, a, allow_meta, n))
                return false;
            named = true;
        }
    }
    if (!named)
        *n = add_all(c, entity);
    return true;
}

static bool parse_names(cmd_ctx_t *c, uint32_t entity, size_t i, bool allow_meta, int64_t *asof,
                        bool *meta, size_t *n)
{
    bool ok = parse_names_once(c, entity, i, allow_meta, asof, meta, n);
    if (c->scratch->asked != NULL) /* add_spec's marks, ready for the next request */
        for (size_t k = 0; k < *n; k++)
            c->scratch->asked[c->scratch->req[k].feat] = 0;
    return ok;
}

/* Reads n requested values of one id into sc->vals, growing the string
 * buffer as needed. */
static void read_values(cmd_ctx_t *c, uint32_t entity, const tly_arg_t *id, size_t n,
                        int64_t asof, int64_t *last_ms)
{
    tly_cmd_scratch_t *sc = c->scratch;
    reserve_vals(sc, n);
    for (;;) {
        tly_err_t rc = tly_store_read(c->d->store, entity, id->ptr, id->len, sc->req, n, asof,
                                      sc->vals, last_ms, sc->strbuf, sc->strcap);
        if (rc != TLY_E_FULL)
            return;
        grow_strbuf(sc);
    }
}

static void source_meta(cmd_ctx_t *c, int64_t *watermark, int64_t *lag)
{
    *watermark = -1;
    *lag = -1;
    if (c->d->source == NULL)
        return;
    tly_source_stats_t st;
    tly_source_stats(c->d->source, &st, NULL, 0);
    *watermark = st.watermark_ms;
    *lag = st.lag;
}

/* --- tallyd verbs --- */

/* Shard mode: when another instance owns id's partition, writes
 * -MOVED <partition> [<host:port>] and returns true. */
static bool moved(cmd_ctx_t *c, const tly_arg_t *id)
{
    tly_shard_t *sh = c->d->source != NULL ? tly_source_shard(c->d->source) : NULL;
    if (sh == NULL)
        return false;
    char owner[TLY_SHARD_ADDR_MAX];
    int32_t p = tly_shard_route(sh, id->ptr, id->len, owner, sizeof owner);
    if (p < 0)
        return false;
    if (owner[0] != '\0')
        tly_resp_errorf(c->out, "MOVED %" PRId32 " %s", p, owner);
    else
        tly_resp_errorf(c->out, "MOVED %" PRId32, p);
    return true;
}

/* A reply's size is ids × names × windows, which a request of a few KB can
 * make gigabytes: refuse before reading anything (the output-buffer limit
 * is checked only after a command has run). */
static bool reply_fits(cmd_ctx_t *c, const char *verb, uint64_t values)
{
    int64_t cap = c->d->cfg->server.max_reply_values;
    if (values <= (uint64_t)cap)
        return true;
    tly_resp_errorf(c->out,
                    "ERR %s asks for %" PRIu64 " values; at most %" PRId64
                    " (server.max_reply_values)",
                    verb, values, cap);
    return false;
}

static void cmd_features(cmd_ctx_t *c)
{
    int entity = resolve_entity(c, 1);
    if (entity < 0)
        return;
    int64_t asof;
    bool meta;
    size_t n;
    if (!parse_names(c, (uint32_t)entity, 3, true, &asof, &meta, &n))
        return;
    if (!reply_fits(c, "FEATURES", n) || moved(c, &c->argv[2]))
        return;
    int64_t last_ms = -1;
    read_values(c, (uint32_t)entity, &c->argv[2], n, asof, &last_ms);
    tly_resp_map(c->out, c->s->proto, n + (meta ? 3 : 0));
    for (size_t i = 0; i < n; i++) {
        put_name(c, &c->scratch->req[i]);
        tly_resp_value(c->out, c->s->proto, &c->scratch->vals[i]);
    }
    if (meta) {
        int64_t watermark, lag;
        source_meta(c, &watermark, &lag);
        tly_resp_bulkstr(c->out, "meta:last_event_ms");
        tly_resp_int(c->out, last_ms);
        tly_resp_bulkstr(c->out, "meta:watermark_ms");
        tly_resp_int(c->out, watermark);
        tly_resp_bulkstr(c->out, "meta:lag");
        tly_resp_int(c->out, lag);
    }
}

static void cmd_mfeatures(cmd_ctx_t *c)
{
    int entity = resolve_entity(c, 1);
    if (entity < 0)
        return;
    int64_t numids;
    if (!arg_int(&c->argv[2], &numids) || numids < 1) {
        syntax_error(c, "numids must be a positive integer", &c->argv[2]);
        return;
    }
    if ((uint64_t)numids > c->argc - 3) {
        syntax_error(c, "fewer ids than numids", NULL);
        return;
    }
    int64_t asof;
    bool meta;
    size_t n;
    if (!parse_names(c, (uint32_t)entity, 3 + (size_t)numids, false, &asof, &meta, &n))
        return;
    if (!reply_fits(c, "MFEATURES", (uint64_t)numids * n))
        return;
    tly_resp_array(c->out, (size_t)numids);
    /* hint the store two ids ahead (their table slots) and one ahead (their
     * records), so the cache misses of finding them overlap this read */
    const tly_arg_t *ids = &c->argv[3];
    tly_prefetch_t pf[3];
    /* One read-side section around every id's read: each read's own lock
     * and unlock then nest, which skips their memory barriers. */
    /* Past the output-buffer cap the server disconnects this client once
     * the command returns: stop building the reply there instead of holding
     * all of it (string values can make one reply hundreds of MB). */
    const size_t start = c->out->len;
    const uint64_t cap = (uint64_t)c->d->cfg->server.max_output_buffer;
    tly_rcu_read_lock();
    for (size_t k = 0; k < 2 && k < (size_t)numids; k++)
        tly_store_prefetch_id(c->d->store, (uint32_t)entity, ids[k].ptr, ids[k].len, &pf[k]);
    for (size_t k = 0; k < (size_t)numids; k++) {
        if ((uint64_t)c->s->obuf + (c->out->len - start) > cap)
            break;
        if (k + 2 < (size_t)numids)
            tly_store_prefetch_id(c->d->store, (uint32_t)entity, ids[k + 2].ptr, ids[k + 2].len,
                                  &pf[(k + 2) % 3]);
        if (k + 1 < (size_t)numids)
            tly_store_prefetch_records(c->d->store, &pf[(k + 1) % 3]);
        if (moved(c, &c->argv[3 + k]))
            continue;
        read_values(c, (uint32_t)entity, &c->argv[3 + k], n, asof, NULL);
        tly_resp_array(c->out, n);
        for (size_t i = 0; i < n; i++)
            tly_resp_value(c->out, c->s->proto, &c->scratch->vals[i]);
    }
    tly_rcu_read_unlock();
}

/* An item's value equals the WHERE text (an integer compared by its decimal
 * rendering, a bool as true/false). */
static bool item_matches(const tly_item_t *it, const tly_arg_t *where)
{
    for (uint32_t v = 0; v < it->nvals; v++) {
        const tly_value_t *val = &it->vals[v];
        char buf[32];
        const char *s = buf;
        size_t len = 0;
        switch (val->type) {
        case TLY_V_STR:
            s = val->u.s;
            len = val->len;
            break;
        case TLY_V_INT:
            len = (size_t)snprintf(buf, sizeof buf, "%" PRId64, val->u.i);
            break;
        case TLY_V_BOOL:
            len = (size_t)snprintf(buf, sizeof buf, "%s", val->u.i ? "true" : "false");
            break;
        case TLY_V_DOUBLE: {
            /* compared as numbers: the reply prints the shortest form; only
             * decimal text is a number here, as in events (not "0x10",
             * "inf" or "nan", which strtod also reads) */
            char tmp[64], *end;
            if (where->len == 0 || where->len >= sizeof tmp)
                continue;
            memcpy(tmp, where->ptr, where->len);
            tmp[where->len] = '\0';
            if (strspn(tmp, "0123456789+-.eE") < where->len)
                continue;
            double w = strtod(tmp, &end);
            if (*end == '\0' && w == val->u.d)
                return true;
            continue;
        }
        case TLY_V_NIL:
            continue;
        }
        if (len == where->len && memcmp(s, where->ptr, len) == 0)
            return true;
    }
    return false;
}

static void cmd_recent(cmd_ctx_t *c)
{
    int entity = resolve_entity(c, 1);
    if (entity < 0)
        return;
    const tly_featset_t *fs = c->d->fs;
    uint32_t feat;
    int window;
    const tly_arg_t *name = &c->argv[3];
    char tmp[ERRARG_MAX + 1];
    if (tly_featset_resolve(fs, (uint32_t)entity, name->ptr, name->len, &feat, &window) !=
        TLY_OK) {
        tly_resp_errorf(c->out, "NOFEATURE %s has no feature '%s' (CATALOG lists them)",
                        fs->entities[entity].name, err_arg(name, tmp, sizeof tmp));
        return;
    }
    if (fs->feats[feat].nwindows != 0) {
        tly_resp_errorf(c->out, "NOFEATURE %s feature '%s' is not a last or last_k feature",
                        fs->entities[entity].name, err_arg(name, tmp, sizeof tmp));
        return;
    }
    const tly_feat_t *f = &fs->feats[feat];
    int64_t count = f->k, since = INT64_MIN, asof = c->now_ms;
    const tly_arg_t *where = NULL;
    bool seen[4] = {false, false, false, false};
    static const char *const opts[] = {"count", "since", "asof", "where"};
    for (size_t i = 4; i < c->argc; i += 2) {
        int o = -1;
        for (int k = 0; k < 4; k++)
            if (arg_is(&c->argv[i], opts[k]))
                o = k;
        if (o < 0) {
            syntax_error(c, "RECENT takes COUNT, SINCE, ASOF or WHERE", &c->argv[i]);
            return;
        }
        if (seen[o] || i + 1 >= c->argc) {
            char what[64];
            snprintf(what, sizeof what, "%s %s", opts[o], seen[o] ? "given twice" : "needs a value");
            syntax_error(c, what, NULL);
            return;
        }
        seen[o] = true;
        const tly_arg_t *v = &c->argv[i + 1];
        int64_t x = 0;
        if (o == 3) {
            where = v;
        } else if (!arg_int(v, &x) || x < 0) {
            syntax_error(c,
                         o == 0 ? "COUNT needs a non-negative integer"
                                : "SINCE and ASOF need epoch milliseconds",
                         v);
            return;
        } else if (o == 0) {
            count = x < f->k ? x : f->k;
        } else if (o == 1) {
            since = x;
        } else {
            asof = x;
        }
    }
    if (moved(c, &c->argv[2]))
        return;
    tly_cmd_scratch_t *sc = c->scratch;
    if (sc->itemcap < f->k) {
        sc->items = tly_xrealloc(sc->items, f->k * sizeof *sc->items);
        sc->itemcap = f->k;
    }
    size_t n = 0;
    for (;;) {
        tly_err_t rc =
            tly_store_recent(c->d->store, (uint32_t)entity, c->argv[2].ptr, c->argv[2].len, feat,
                             since, asof, sc->items, f->k, &n, sc->strbuf, sc->strcap);
        if (rc != TLY_E_FULL)
            break;
        grow_strbuf(sc);
    }
    size_t keep = 0;
    for (size_t i = 0; i < n && keep < (size_t)count; i++)
        if (where == NULL || item_matches(&sc->items[i], where))
            sc->items[keep++] = sc->items[i];
    tly_resp_array(c->out, keep);
    for (size_t i = 0; i < keep; i++) {
        const tly_item_t *it = &sc->items[i];
        tly_resp_array(c->out, 1 + it->nvals);
        tly_resp_int(c->out, it->time_ms);
        for (uint32_t v = 0; v < it->nvals; v++)
            tly_resp_value(c->out, c->s->proto, &it->vals[v]);
    }
}

static void cmd_catalog(cmd_ctx_t *c)
{
    const tly_featset_t *fs = c->d->fs;
    int proto = c->s->proto;
    tly_resp_array(c->out, fs->nentities);
    for (size_t e = 0; e < fs->nentities; e++) {
        const tly_entity_t *ent = &fs->entities[e];
        tly_resp_map(c->out, proto, 3);
        tly_resp_bulkstr(c->out, "entity");
        tly_resp_bulkstr(c->out, ent->name);
        tly_resp_bulkstr(c->out, "key");
        tly_resp_array(c->out, ent->nkeys);
        for (size_t k = 0; k < ent->nkeys; k++)
            tly_resp_bulkstr(c->out, fs->fields[ent->keys[k]]);
        tly_resp_bulkstr(c->out, "features");
        tly_resp_array(c->out, ent->nfeats);
        for (size_t i = 0; i < ent->nfeats; i++) {
            const tly_feat_t *f = &fs->feats[ent->feats[i]];
            tly_resp_map(c->out, proto, 6);
            tly_resp_bulkstr(c->out, "name");
            tly_resp_bulkstr(c->out, f->name);
            tly_resp_bulkstr(c->out, "agg");
            tly_resp_bulkstr(c->out, tly_agg_name(f->agg));
            tly_resp_bulkstr(c->out, "value");
            tly_resp_array(c->out, f->nvalues);
            for (size_t v = 0; v < f->nvalues; v++)
                tly_resp_bulkstr(c->out, fs->fields[f->values[v]]);
            tly_resp_bulkstr(c->out, "windows");
            tly_resp_array(c->out, f->nwindows);
            for (size_t w = 0; w < f->nwindows; w++)
                tly_resp_bulkstr(c->out, f->windows[w].label);
            tly_resp_bulkstr(c->out, "hops");
            tly_resp_array(c->out, f->nwindows);
            for (size_t w = 0; w < f->nwindows; w++) {
                char hop[32];
                tly_resp_bulkstr(c->out, tly_duration_format(f->windows[w].hop_ms, hop,
                                                             sizeof hop));
            }
            tly_resp_bulkstr(c->out, "k");
            tly_resp_int(c->out, f->nwindows == 0 ? f->k : 0);
        }
    }
}

/* --- connection commands --- */

static void cmd_ping(cmd_ctx_t *c)
{
    if (c->argc > 2) {
        tly_resp_error(c->out, "ERR wrong number of arguments for 'ping' command");
        return;
    }
    if (c->argc == 2)
        tly_resp_bulk(c->out, c->argv[1].ptr, c->argv[1].len);
    else
        tly_resp_simple(c->out, "PONG");
}

static void cmd_echo(cmd_ctx_t *c)
{
    tly_resp_bulk(c->out, c->argv[1].ptr, c->argv[1].len);
}

static void cmd_quit(cmd_ctx_t *c)
{
    c->s->close_after = true;
    tly_resp_simple(c->out, "OK");
}

/* The entities held (what Redis tools read as the number of keys). */
static void cmd_dbsize(cmd_ctx_t *c)
{
    tly_store_stats_t st;
    tly_store_stats(c->d->store, &st);
    tly_resp_int(c->out, (int64_t)st.entities);
}

static void cmd_select(cmd_ctx_t *c)
{
    int64_t db;
    if (!arg_int(&c->argv[1], &db)) {
        tly_resp_error(c->out, "ERR value is not an integer or out of range");
        return;
    }
    if (db != 0) {
        tly_resp_error(c->out, "ERR DB index is out of range");
        return;
    }
    tly_resp_simple(c->out, "OK");
}

/* Compares in time independent of where the first difference is. */
static bool password_ok(const tly_daemon_t *d, const tly_arg_t *user, const tly_arg_t *pass)
{
    if (user != NULL && !(user->len == 7 && memcmp(user->ptr, "default", 7) == 0))
        return false;
    const char *want = d->cfg->server.requirepass;
    size_t wlen = strlen(want);
    unsigned char diff = (unsigned char)(wlen != pass->len);
    for (size_t i = 0; i < pass->len; i++)
        diff |= (unsigned char)(pass->ptr[i] ^ (wlen ? want[i % wlen] : 0));
    return diff == 0;
}

/* Returns true on success, else writes the error. */
static bool do_auth(cmd_ctx_t *c, const tly_arg_t *user, const tly_arg_t *pass)
{
    bool open = c->d->cfg->server.requirepass[0] == '\0';
    if (open && user == NULL) {
        tly_resp_error(c->out, "ERR AUTH <password> called without any password configured for "
                               "the default user. Are you sure your configuration is correct?");
        return false;
    }
    /* Without a password, as in Redis, user "default" takes any password
     * (clients configured with credentials still connect). */
    bool ok = open ? user->len == 7 && memcmp(user->ptr, "default", 7) == 0
                   : password_ok(c->d, user, pass);
    if (!ok) {
        atomic_fetch_add_explicit(&c->d->server.auth_failures, 1, memory_order_relaxed);
        tly_resp_error(c->out, "WRONGPASS invalid username-password pair or user is disabled.");
        return false;
    }
    c->s->authed = true;
    return true;
}

static void cmd_auth(cmd_ctx_t *c)
{
    if (c->argc > 3) {
        tly_resp_error(c->out, "ERR syntax error");
        return;
    }
    if (do_auth(c, c->argc == 3 ? &c->argv[1] : NULL, &c->argv[c->argc - 1]))
        tly_resp_simple(c->out, "OK");
}

/* Redis's rule for client names: printable ASCII, no spaces. Replies the
 * error and returns false for a name that breaks it. */
static bool name_ok(cmd_ctx_t *c, const tly_arg_t *name)
{
    if (name->len > TLY_CLIENT_NAME_MAX) {
        tly_resp_error(c->out, "ERR Client name too long");
        return false;
    }
    for (size_t i = 0; i < name->len; i++) {
        unsigned char ch = (unsigned char)name->ptr[i];
        if (ch < '!' || ch > '~') {
            tly_resp_error(c->out,
                           "ERR Client names cannot contain spaces, newlines or special "
                           "characters.");
            return false;
        }
    }
    return true;
}

static bool set_name(cmd_ctx_t *c, const tly_arg_t *name)
{
    if (!name_ok(c, name))
        return false;
    if (c->d->srv != NULL) {
        tly_server_set_client_name(c->d->srv, c->s, name->ptr, name->len);
    } else {
        memcpy(c->s->name, name->ptr, name->len);
        c->s->name[name->len] = '\0';
    }
    return true;
}

static void cmd_hello(cmd_ctx_t *c)
{
    int64_t proto = c->s->proto;
    size_t i = 1;
    if (c->argc >= 2) {
        if (!arg_int(&c->argv[1], &proto)) {
            tly_resp_error(c->out, "ERR Protocol version is not an integer or out of range");
            return;
        }
        if (proto != 2 && proto != 3) {
            tly_resp_error(c->out, "NOPROTO unsupported protocol version");
            return;
        }
        i = 2;
    }
    const tly_arg_t *user = NULL, *pass = NULL, *name = NULL;
    for (; i < c->argc; i++) {
        if (arg_is(&c->argv[i], "auth") && i + 2 < c->argc) {
            user = &c->argv[i + 1];
            pass = &c->argv[i + 2];
            i += 2;
        } else if (arg_is(&c->argv[i], "setname") && i + 1 < c->argc) {
            name = &c->argv[i + 1];
            i++;
        } else {
            char tmp[ERRARG_MAX + 1];
            tly_resp_errorf(c->out, "ERR Syntax error in HELLO option '%s'",
                            err_arg(&c->argv[i], tmp, sizeof tmp));
            return;
        }
    }
    /* a HELLO that fails changes nothing: the name is checked before AUTH
     * can authenticate the client */
    if (name != NULL && !name_ok(c, name))
        return;
    if (pass != NULL && !do_auth(c, user, pass))
        return;
    if (!c->s->authed) {
        tly_resp_error(c->out, "NOAUTH HELLO must be called with the client already "
                               "authenticated, otherwise the HELLO <proto> AUTH <user> <pass> "
                               "option can be used to authenticate the client and select the "
                               "RESP protocol version at the same time");
        return;
    }
    if (name != NULL && !set_name(c, name))
        return;
    __atomic_store_n(&c->s->proto, (int)proto, __ATOMIC_RELAXED); /* CLIENT LIST reads it */
    tly_buf_t *o = c->out;
    tly_resp_map(o, c->s->proto, 7);
    tly_resp_bulkstr(o, "server");
    tly_resp_bulkstr(o, "tallyd");
    tly_resp_bulkstr(o, "version");
    tly_resp_bulkstr(o, TALLYD_VERSION);
    tly_resp_bulkstr(o, "proto");
    tly_resp_int(o, c->s->proto);
    tly_resp_bulkstr(o, "id");
    tly_resp_int(o, (int64_t)c->s->id);
    tly_resp_bulkstr(o, "mode");
    tly_resp_bulkstr(o, "standalone");
    tly_resp_bulkstr(o, "role");
    tly_resp_bulkstr(o, "master");
    tly_resp_bulkstr(o, "modules");
    tly_resp_array(o, 0);
}

/* One CLIENT INFO / CLIENT LIST line for session s, which may be another
 * loop's (commands.h: its changing fields are read atomically; its name
 * under the directory lock, which CLIENT LIST holds). */
static void client_line(const cmd_ctx_t *c, const tly_session_t *s, tly_buf_t *t)
{
    int64_t last_ms = __atomic_load_n(&s->last_ms, __ATOMIC_RELAXED);
    size_t qbuf = __atomic_load_n(&s->qbuf, __ATOMIC_RELAXED);
    size_t obuf = __atomic_load_n(&s->obuf, __ATOMIC_RELAXED);
    const char *last_cmd = __atomic_load_n(&s->last_cmd, __ATOMIC_RELAXED);
    int proto = __atomic_load_n(&s->proto, __ATOMIC_RELAXED);
    char line[640];
    int n = snprintf(line, sizeof line,
                     "id=%" PRIu64 " addr=%s laddr=%s fd=%d name=%s age=%" PRId64 " idle=%" PRId64
                     " flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=%zu "
                     "qbuf-free=0 argv-mem=0 multi-mem=0 obl=0 oll=0 omem=%zu tot-mem=%zu "
                     "events=r cmd=%s user=default redir=-1 resp=%d io-thread=%d\n",
                     s->id, s->addr, s->laddr, s->fd, s->name, (c->now_ms - s->created_ms) / 1000,
                     (c->now_ms - last_ms) / 1000, qbuf, obuf, qbuf + obuf,
                     last_cmd != NULL ? last_cmd : "NULL", proto, s->loop);
    if (n > 0)
        tly_buf_append(t, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* CLIENT LIST [TYPE normal] [ID id ...]: the lines of the clients asked
 * for, every loop's. */
typedef struct {
    const cmd_ctx_t *c;
    tly_buf_t *t;
    const uint64_t *ids; /* NULL: every client */
    size_t nids;
} list_ctx_t;

static void list_one(void *ctx, tly_session_t *s)
{
    list_ctx_t *l = ctx;
    bool want = l->ids == NULL;
    for (size_t i = 0; i < l->nids && !want; i++)
        want = l->ids[i] == s->id;
    if (want)
        client_line(l->c, s, l->t);
}

static void client_list(cmd_ctx_t *c)
{
    uint64_t ids[64];
    list_ctx_t l = {.c = c, .t = &c->scratch->text};
    for (size_t i = 2; i < c->argc; i++) {
        if (arg_is(&c->argv[i], "type") && i + 1 < c->argc) {
            if (!arg_is(&c->argv[i + 1], "normal")) { /* tallyd has no replicas or pubsub */
                tly_resp_verbatim(c->out, c->s->proto, "", 0);
                return;
            }
            i++;
        } else if (arg_is(&c->argv[i], "id") && i + 1 < c->argc && l.ids == NULL) {
            for (i++; i < c->argc && l.nids < sizeof ids / sizeof ids[0]; i++) {
                int64_t id;
                if (!arg_int(&c->argv[i], &id) || id <= 0) {
                    tly_resp_error(c->out, "ERR Invalid client ID");
                    return;
                }
                ids[l.nids++] = (uint64_t)id;
            }
            if (i < c->argc) {
                tly_resp_error(c->out, "ERR syntax error (at most 64 IDs)");
                return;
            }
            l.ids = ids;
        } else {
            tly_resp_error(c->out, "ERR syntax error");
            return;
        }
    }
    l.t->len = 0;
    if (c->d->srv != NULL)
        tly_server_each_client(c->d->srv, list_one, &l);
    else
        list_one(&l, c->s); /* no server (tests): this session only */
    tly_resp_verbatim(c->out, c->s->proto, l.t->data ? l.t->data : "", l.t->len);
}

/* CLIENT KILL addr:port, or CLIENT KILL [ID id] [ADDR ip:port]
 * [LADDR ip:port] [USER name] [SKIPME yes|no]: the clients matching every
 * filter given are closed by their loops; the caller itself only when
 * SKIPME no, after this reply (as QUIT). */
typedef struct {
    const tly_session_t *self;
    bool skipme, has_id, self_hit;
    uint64_t id;
    const tly_arg_t *addr, *laddr;
    tly_server_t *srv;
    int64_t killed;
} kill_ctx_t;

static bool arg_eq_str(const tly_arg_t *a, const char *s)
{
    return a->len == strlen(s) && memcmp(a->ptr, s, a->len) == 0;
}

static void kill_one(void *ctx, tly_session_t *s)
{
    kill_ctx_t *k = ctx;
    if ((k->has_id && s->id != k->id) || (k->addr != NULL && !arg_eq_str(k->addr, s->addr)) ||
        (k->laddr != NULL && !arg_eq_str(k->laddr, s->laddr)))
        return;
    if (s == k->self) {
        if (k->skipme)
            return;
        k->self_hit = true;
    } else if (k->srv != NULL) {
        tly_server_kill_client(k->srv, s);
    }
    k->killed++;
}

static void client_kill(cmd_ctx_t *c)
{
    kill_ctx_t k = {.self = c->s, .skipme = true, .srv = c->d->srv};
    bool old_form = c->argc == 3;
    if (old_form) {
        k.addr = &c->argv[2];
        k.skipme = false; /* the old form kills the caller too, as Redis's does */
    } else {
        if (c->argc % 2 != 0) {
            tly_resp_error(c->out, "ERR syntax error");
            return;
        }
        for (size_t i = 2; i + 1 < c->argc; i += 2) {
            const tly_arg_t *f = &c->argv[i], *v = &c->argv[i + 1];
            int64_t id;
            if (arg_is(f, "id")) {
                if (!arg_int(v, &id) || id <= 0) {
                    tly_resp_error(c->out, "ERR client-id should be greater than 0");
                    return;
                }
                k.has_id = true;
                k.id = (uint64_t)id;
            } else if (arg_is(f, "addr")) {
                k.addr = v;
            } else if (arg_is(f, "laddr")) {
                k.laddr = v;
            } else if (arg_is(f, "user")) {
                if (!arg_eq_str(v, "default")) {
                    tly_resp_error(c->out, "ERR No such user 'user'");
                    return;
                }
            } else if (arg_is(f, "skipme") && (arg_is(v, "yes") || arg_is(v, "no"))) {
                k.skipme = arg_is(v, "yes");
            } else {
                tly_resp_error(c->out, "ERR syntax error");
                return;
            }
        }
    }
    if (c->d->srv != NULL)
        tly_server_each_client(c->d->srv, kill_one, &k);
    else
        kill_one(&k, c->s); /* no server (tests): this session only */
    if (k.self_hit)
        c->s->close_after = true;
    if (!old_form)
        tly_resp_int(c->out, k.killed);
    else if (k.killed > 0)
        tly_resp_simple(c->out, "OK");
    else
        tly_resp_error(c->out, "ERR No such client");
}

static void cmd_client(cmd_ctx_t *c)
{
    const tly_arg_t *sub = &c->argv[1];
    if (arg_is(sub, "setname") && c->argc == 3) {
        if (set_name(c, &c->argv[2]))
            tly_resp_simple(c->out, "OK");
    } else if (arg_is(sub, "getname") && c->argc == 2) {
        if (c->s->name[0])
            tly_resp_bulkstr(c->out, c->s->name);
        else
            tly_resp_null(c->out, c->s->proto);
    } else if (arg_is(sub, "id") && c->argc == 2) {
        tly_resp_int(c->out, (int64_t)c->s->id);
    } else if (arg_is(sub, "info") && c->argc == 2) {
        tly_buf_t *t = &c->scratch->text;
        t->len = 0;
        client_line(c, c->s, t);
        tly_resp_verbatim(c->out, c->s->proto, t->data, t->len);
    } else if (arg_is(sub, "list")) {
        client_list(c);
    } else if (arg_is(sub, "kill") && c->argc >= 3) {
        client_kill(c);
    } else if (arg_is(sub, "stale") && c->argc == 3 &&
               (arg_is(&c->argv[2], "on") || arg_is(&c->argv[2], "off"))) {
        c->s->stale_ok = arg_is(&c->argv[2], "on");
        tly_resp_simple(c->out, "OK");
    } else if (arg_is(sub, "setinfo") && c->argc == 4) {
        /* lib-name / lib-ver, sent by recent clients; accepted, not kept */
        tly_resp_simple(c->out, "OK");
    } else if (arg_is(sub, "help") && c->argc == 2) {
        static const char *const lines[] = {
            "CLIENT <subcommand> [<arg> ...]. Subcommands are:",
            "GETNAME",
            "    Return the name of the current connection.",
            "ID",
            "    Return the ID of the current connection.",
            "INFO",
            "    Return information about the current client connection.",
            "KILL <ip:port>",
            "    Kill connection made from <ip:port>.",
            "KILL <option> <value> [<option> <value> [...]]",
            "    Kill connections. Options are: ID <client-id>, ADDR <ip:port>,",
            "    LADDR <ip:port>, USER default, SKIPME yes|no (default yes).",
            "LIST [TYPE normal] [ID <client-id> [<client-id> ...]]",
            "    Return information about client connections, every event loop's.",
            "SETNAME <name>",
            "    Assign the name <name> to the current connection.",
            "STALE ON|OFF",
            "    ON: answer FEATURES, MFEATURES and RECENT while tallyd is",
            "    still catching up with Kafka (default OFF: they reply -LOADING).",
            "SETINFO <lib-name|lib-ver> <value>",
            "    Accepted for client libraries; ignored.",
            "HELP",
            "    Print this help."};
        size_t n = sizeof lines / sizeof lines[0];
        tly_resp_array(c->out, n);
        for (size_t i = 0; i < n; i++)
            tly_resp_simple(c->out, lines[i]);
    } else {
        char tmp[ERRARG_MAX + 1];
        tly_resp_errorf(c->out, "ERR unknown subcommand or wrong number of arguments for '%s'. "
                                "Try CLIENT HELP.",
                        err_arg(sub, tmp, sizeof tmp));
    }
}

/* CONFIG GET answers the few settings that load clients (redis-benchmark)
 * ask for, with tallyd's equivalents; CONFIG SET is refused. */
static void cmd_config(cmd_ctx_t *c)
{
    if (!arg_is(&c->argv[1], "get")) {
        tly_resp_error(c->out, "ERR tallyd is configured by its YAML file; only CONFIG GET is "
                               "supported");
        return;
    }
    if (c->argc < 3) {
        tly_resp_error(c->out, "ERR wrong number of arguments for 'config|get' command");
        return;
    }
    const tly_config_t *cfg = c->d->cfg;
    char maxclients[24], timeout[24];
    snprintf(maxclients, sizeof maxclients, "%" PRId64, cfg->server.max_clients);
    snprintf(timeout, sizeof timeout, "%" PRId64, cfg->server.idle_timeout_ms / 1000);
    const char *pairs[][2] = {{"save", ""},
                              {"appendonly", "no"},
                              {"maxclients", maxclients},
                              {"timeout", timeout},
                              {"databases", "1"}};
    size_t np = sizeof pairs / sizeof pairs[0];
    bool match[sizeof pairs / sizeof pairs[0]] = {false};
    size_t nmatch = 0;
    for (size_t i = 2; i < c->argc; i++) {
        char pat[128]; /* longer patterns match none of these names */
        if (c->argv[i].len >= sizeof pat || memchr(c->argv[i].ptr, '\0', c->argv[i].len))
            continue;
        memcpy(pat, c->argv[i].ptr, c->argv[i].len);
        pat[c->argv[i].len] = '\0';
        for (size_t k = 0; k < np; k++) { /* glob patterns, as Redis takes them */
            if (!match[k] && fnmatch(pat, pairs[k][0], FNM_CASEFOLD) == 0) {
                match[k] = true;
                nmatch++;
            }
        }
    }
    tly_resp_map(c->out, c->s->proto, nmatch);
    for (size_t k = 0; k < np; k++) {
        if (match[k]) {
            tly_resp_bulkstr(c->out, pairs[k][0]);
            tly_resp_bulkstr(c->out, pairs[k][1]);
        }
    }
}

/* --- INFO --- */

static void textf(tly_buf_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void textf(tly_buf_t *t, const char *fmt, ...)
{
    char line[512];
    va_list ap, again;
    va_start(ap, fmt);
    va_copy(again, ap);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof line) {
        tly_buf_append(t, line, (size_t)n);
    } else if (n > 0) { /* a long path or broker list: the whole line, CRLF included */
        char *big = malloc((size_t)n + 1);
        if (big != NULL) {
            vsnprintf(big, (size_t)n + 1, fmt, again);
            tly_buf_append(t, big, (size_t)n);
            free(big);
        }
    }
    va_end(again);
}

static uint64_t load(atomic_uint_fast64_t *v)
{
    return atomic_load_explicit(v, memory_order_relaxed);
}

static void lower(char *dst, const char *src, size_t cap)
{
    size_t i = 0;
    for (; src[i] && i + 1 < cap; i++)
        dst[i] = (char)tolower((unsigned char)src[i]);
    dst[i] = '\0';
}

static void info_server(cmd_ctx_t *c, tly_buf_t *t)
{
    tly_daemon_t *d = c->d;
    textf(t, "# Server\r\n");
    textf(t, "tallyd_version:%s\r\n", TALLYD_VERSION);
    textf(t, "redis_version:7.0.0\r\n"); /* what clients gate features on */
    textf(t, "redis_mode:standalone\r\n");
    textf(t, "process_id:%ld\r\n", (long)getpid());
    textf(t, "tcp_port:%d\r\n", d->tcp_port);
    textf(t, "uptime_in_seconds:%" PRId64 "\r\n", (c->now_ms - d->started_ms) / 1000);
    textf(t, "config_file:%s\r\n", d->cfg->path ? d->cfg->path : "");
}

static void info_clients(cmd_ctx_t *c, tly_buf_t *t)
{
    tly_daemon_t *d = c->d;
    textf(t, "# Clients\r\n");
    textf(t, "connected_clients:%" PRIu64 "\r\n", load(&d->server.connected));
    textf(t, "maxclients:%" PRId64 "\r\n", d->cfg->server.max_clients);
    textf(t, "blocked_clients:0\r\n"); /* no command blocks */
    textf(t, "clients_memory:%" PRIu64 "\r\n", load(&d->server.clients_memory));
    textf(t, "maxclients_memory:%" PRId64 "\r\n", d->cfg->server.max_clients_memory);
}

static void info_stats(cmd_ctx_t *c, tly_buf_t *t)
{
    tly_server_stats_t *st = &c->d->server;
    textf(t, "# Stats\r\n");
    textf(t, "total_connections_received:%" PRIu64 "\r\n", load(&st->connections_total));
    textf(t, "total_commands_processed:%" PRIu64 "\r\n", load(&st->commands));
    textf(t, "rejected_connections:%" PRIu64 "\r\n", load(&st->rejected_maxclients));
    textf(t, "protocol_errors:%" PRIu64 "\r\n", load(&st->protocol_errors));
    textf(t, "output_buffer_disconnects:%" PRIu64 "\r\n", load(&st->output_overflows));
    textf(t, "evicted_clients:%" PRIu64 "\r\n", load(&st->evicted_clients));
    textf(t, "timeout_disconnects:%" PRIu64 "\r\n", load(&st->timeouts));
    textf(t, "auth_failures:%" PRIu64 "\r\n", load(&st->auth_failures));
    textf(t, "read_yields:%" PRIu64 "\r\n", load(&st->read_yields));
    textf(t, "hinted_requests:%" PRIu64 "\r\n", load(&st->hinted_requests));
    textf(t, "output_stalls:%" PRIu64 "\r\n", load(&st->output_stalls));
    textf(t, "total_net_input_bytes:%" PRIu64 "\r\n", load(&st->bytes_in));
    textf(t, "total_net_output_bytes:%" PRIu64 "\r\n", load(&st->bytes_out));
}

static void info_memory(cmd_ctx_t *c, tly_buf_t *t)
{
    tly_store_stats_t st;
    tly_store_stats(c->d->store, &st);
    textf(t, "# Memory\r\n");
    textf(t, "used_memory:%" PRIu64 "\r\n", st.bytes);
    textf(t, "entities:%" PRIu64 "\r\n", st.entities);
    textf(t, "interned_strings:%" PRIu64 "\r\n", st.interned);
    textf(t, "interned_bytes:%" PRIu64 "\r\n", st.interned_bytes);
    textf(t, "table_bytes:%" PRIu64 "\r\n", st.table_bytes);
    char alloc[32];
    tly_store_allocator(alloc, sizeof alloc);
    textf(t, "mem_allocator:%s\r\n", alloc);
}

#define INFO_PARTITIONS 1024

static void info_source(cmd_ctx_t *c, tly_buf_t *t)
{
    const tly_config_t *cfg = c->d->cfg;
    textf(t, "# Source\r\n");
    textf(t, "brokers:%s\r\n",
          c->d->source ? tly_source_bootstrap(c->d->source) : cfg->kafka.brokers);
    textf(t, "topics:");
    for (size_t i = 0; i < cfg->kafka.ntopics; i++)
        textf(t, "%s%s", i ? "," : "", cfg->kafka.topics[i]);
    textf(t, "\r\n");
    if (c->d->source == NULL) {
        textf(t, "running:0\r\n");
        textf(t, "loading:0\r\n");
        return;
    }
    tly_source_stats_t st;
    tly_partition_stat_t *parts = malloc(INFO_PARTITIONS * sizeof *parts);
    if (parts == NULL) {
        fputs("tallyd: out of memory\n", stderr);
        abort();
    }
    tly_source_stats(c->d->source, &st, parts, INFO_PARTITIONS);
    textf(t, "running:%d\r\n", st.running ? 1 : 0);
    textf(t, "loading:%d\r\n", st.ready ? 0 : 1);
    textf(t, "mode:%s\r\n", cfg->kafka.mode == TLY_MODE_SHARD ? "shard" : "replica");
    tly_shard_t *sh = tly_source_shard(c->d->source);
    if (sh != NULL) {
        tly_shard_stats_t ss;
        tly_shard_stats(sh, &ss);
        int32_t owned[TLY_SHARD_MAX_PARTITIONS];
        size_t no = tly_shard_owned(sh, owned, TLY_SHARD_MAX_PARTITIONS);
        textf(t, "owned:");
        for (size_t i = 0; i < no; i++)
            textf(t, "%s%" PRId32, i ? "," : "", owned[i]);
        textf(t, "\r\n");
        textf(t, "topic_partitions:%" PRId32 "\r\n", ss.nparts);
        textf(t, "endpoint:%s\r\n", tly_shard_advertise(sh));
        textf(t, "endpoints_known:%zu\r\n", ss.known);
        textf(t, "endpoints_published:%" PRIu64 "\r\n", ss.published);
        textf(t, "endpoint_errors:%" PRIu64 "\r\n", ss.endpoint_errors);
        textf(t, "moved_replies:%" PRIu64 "\r\n", ss.moved);
        textf(t, "dropped_entities:%" PRIu64 "\r\n", st.dropped_entities);
    }
    textf(t, "partitions:%zu\r\n", st.npartitions);
    textf(t, "messages_consumed:%" PRIu64 "\r\n", st.messages);
    textf(t, "events_applied:%" PRIu64 "\r\n", st.applied);
    textf(t, "events_rejected:%" PRIu64 "\r\n", st.rejected);
    for (int e = 0; e < TLY_E__COUNT; e++) {
        if (st.rejected_by[e] == 0)
            continue;
        char name[40];
        lower(name, tly_err_name((tly_err_t)e), sizeof name);
        textf(t, "rejected_%s:%" PRIu64 "\r\n", name, st.rejected_by[e]);
    }
    textf(t, "consumer_errors:%" PRIu64 "\r\n", st.errors);
    textf(t, "rebalances:%" PRIu64 "\r\n", st.rebalances);
    textf(t, "offset_resets:%" PRIu64 "\r\n", st.gaps);
    textf(t, "offset_reset_skipped_messages:%" PRIu64 "\r\n", st.gap_messages);
    textf(t, "messages_undecodable:%" PRIu64 "\r\n", st.undecodable);
    textf(t, "fetch_nudges:%" PRIu64 "\r\n", st.fetch_nudges);
    textf(t, "fetch_idle_nudges:%" PRIu64 "\r\n", st.fetch_idle_nudges);
    textf(t, "batches_alone:%" PRIu64 "\r\n", st.batches_alone);
    textf(t, "batches_shared:%" PRIu64 "\r\n", st.batches_shared);
    textf(t, "batches_by_partition:%" PRIu64 "\r\n", st.batches_by_partition);
    textf(t, "batches_pipelined:%" PRIu64 "\r\n", st.batches_pipelined);
    textf(t, "watermark_ms:%" PRId64 "\r\n", st.watermark_ms);
    textf(t, "lag:%" PRId64 "\r\n", st.lag);
    size_t np = st.npartitions < INFO_PARTITIONS ? st.npartitions : INFO_PARTITIONS;
    for (size_t i = 0; i < np; i++)
        textf(t, "partition_%s_%d:position=%" PRId64 ",high=%" PRId64 ",lag=%" PRId64 "\r\n",
              parts[i].topic, (int)parts[i].partition, parts[i].position, parts[i].high,
              parts[i].lag);
    free(parts);
}

static void info_persistence(cmd_ctx_t *c, tly_buf_t *t)
{
    textf(t, "# Persistence\r\n");
    tly_snapshotter_t *sn = c->d->snapshot;
    textf(t, "snapshots_enabled:%d\r\n", sn != NULL ? 1 : 0);
    if (sn == NULL)
        return;
    tly_snapshot_stats_t st;
    tly_snapshot_stats(sn, &st);
    textf(t, "snapshot_dir:%s\r\n", c->d->cfg->snapshot.dir);
    textf(t, "snapshot_in_progress:%d\r\n", st.in_progress ? 1 : 0);
    textf(t, "snapshots_written:%" PRIu64 "\r\n", st.written);
    textf(t, "snapshots_failed:%" PRIu64 "\r\n", st.failed);
    textf(t, "last_snapshot_ms:%" PRId64 "\r\n", st.last_ms);
    textf(t, "last_snapshot_path:%s\r\n", st.last_path);
    textf(t, "last_snapshot_bytes:%" PRIu64 "\r\n", st.last_bytes);
    textf(t, "last_snapshot_rebalances:%" PRIu64 "\r\n", st.last_rebalances);
    textf(t, "last_snapshot_write_ms:%" PRId64 "\r\n", st.last_write_ms);
    textf(t, "last_snapshot_pause_us:%" PRId64 "\r\n", st.last_pause_us);
    textf(t, "max_snapshot_pause_us:%" PRId64 "\r\n", st.max_pause_us);
    textf(t, "last_snapshot_error:%s\r\n", st.last_error);
    textf(t, "restored_snapshot_ms:%" PRId64 "\r\n", st.loaded_ms);
    textf(t, "restored_entities:%" PRIu64 "\r\n", st.loaded_entities);
    const tly_featset_t *fs = c->d->fs;
    for (int pass = 0; pass < 2; pass++) {
        uint64_t mask = pass == 0 ? st.restored_types : st.rebuilt_types;
        textf(t, "%s:", pass == 0 ? "restored_entity_types" : "rebuilt_entity_types");
        bool first = true;
        for (size_t e = 0; e < fs->nentities && e < 64; e++)
            if (mask >> e & 1) {
                textf(t, "%s%s", first ? "" : ",", fs->entities[e].name);
                first = false;
            }
        textf(t, "\r\n");
    }
    textf(t, "rebuilt_features:");
    bool first = true;
    for (size_t f = 0; f < fs->nfeats && f < TLY_MAX_FEATURES; f++)
        if (st.rebuilt_feats[f / 64] >> (f % 64) & 1) {
            textf(t, "%s%s.%s", first ? "" : ",", fs->entities[fs->feats[f].entity].name,
                  fs->feats[f].name);
            first = false;
        }
    textf(t, "\r\n");
    textf(t, "snapshots_rejected:%" PRIu64 "\r\n", st.rejected);
    textf(t, "snapshots_outdated:%" PRIu64 "\r\n", st.outdated);
}

static void info_features(cmd_ctx_t *c, tly_buf_t *t)
{
    const tly_featset_t *fs = c->d->fs;
    tly_store_stats_t st;
    tly_store_stats(c->d->store, &st);
    textf(t, "# Features\r\n");
    textf(t, "events_updated:%" PRIu64 "\r\n", st.events_applied);
    textf(t, "updates:%" PRIu64 "\r\n", st.updates);
    textf(t, "expired_entities:%" PRIu64 "\r\n", st.expired);
    for (int e = 0; e < TLY_E__COUNT; e++) {
        if (st.dropped[e] == 0)
            continue;
        char name[40];
        lower(name, tly_err_name((tly_err_t)e), sizeof name);
        textf(t, "dropped_%s:%" PRIu64 "\r\n", name, st.dropped[e]);
    }
    for (size_t e = 0; e < fs->nentities; e++)
        textf(t, "entity_%s:features=%zu\r\n", fs->entities[e].name, fs->entities[e].nfeats);
}

/* Entities as Redis tools count keys (redis-cli --stat). Every entity
 * expires after store.idle_ttl without events, so all count as expiring;
 * avg_ttl 0 is Redis's "not known". */
static void info_keyspace(cmd_ctx_t *c, tly_buf_t *t)
{
    tly_store_stats_t st;
    tly_store_stats(c->d->store, &st);
    textf(t, "# Keyspace\r\n");
    textf(t, "db0:keys=%" PRIu64 ",expires=%" PRIu64 ",avg_ttl=0\r\n", st.entities,
          st.entities);
}

static const struct {
    const char *name;
    void (*fn)(cmd_ctx_t *c, tly_buf_t *t);
} info_sections[] = {
    {"server", info_server}, {"clients", info_clients}, {"stats", info_stats},
    {"memory", info_memory}, {"source", info_source},   {"features", info_features},
    {"persistence", info_persistence}, {"keyspace", info_keyspace},
};

static void cmd_info(cmd_ctx_t *c)
{
    size_t ns = sizeof info_sections / sizeof info_sections[0];
    bool want[sizeof info_sections / sizeof info_sections[0]] = {false};
    bool any = c->argc == 1;
    for (size_t i = 1; i < c->argc; i++) {
        const tly_arg_t *a = &c->argv[i];
        if (arg_is(a, "all") || arg_is(a, "everything") || arg_is(a, "default"))
            any = true;
        for (size_t k = 0; k < ns; k++)
            if (arg_is(a, info_sections[k].name))
                want[k] = true;
    }
    tly_buf_t *t = &c->scratch->text;
    t->len = 0;
    for (size_t k = 0; k < ns; k++) {
        if (!any && !want[k])
            continue;
        if (t->len)
            textf(t, "\r\n");
        info_sections[k].fn(c, t);
    }
    tly_resp_verbatim(c->out, c->s->proto, t->data ? t->data : "", t->len);
}

/* --- COMMAND --- */

static void cmd_command(cmd_ctx_t *c);

/* The arguments of each command, for COMMAND DOCS. */
#define ARGS_END                                                                                   \
    {                                                                                              \
        NULL, NULL, NULL, 0, NULL                                                                  \
    }
static const cmd_arg_t args_features[] = {
    {"entity", "string", NULL, 0, NULL},
    {"id", "string", NULL, 0, NULL},
    {"name[:window]", "string", NULL, ARG_OPTIONAL | ARG_MULTIPLE, NULL},
    {"ms", "integer", "ASOF", ARG_OPTIONAL, NULL},
    {"meta", "pure-token", "META", ARG_OPTIONAL, NULL},
    ARGS_END};
static const cmd_arg_t args_mfeatures[] = {
    {"entity", "string", NULL, 0, NULL},
    {"numids", "integer", NULL, 0, NULL},
    {"id", "string", NULL, ARG_MULTIPLE, NULL},
    {"name[:window]", "string", NULL, ARG_OPTIONAL | ARG_MULTIPLE, NULL},
    {"ms", "integer", "ASOF", ARG_OPTIONAL, NULL},
    ARGS_END};
static const cmd_arg_t args_recent[] = {{"entity", "string", NULL, 0, NULL},
                                        {"id", "string", NULL, 0, NULL},
                                        {"name", "string", NULL, 0, NULL},
                                        {"n", "integer", "COUNT", ARG_OPTIONAL, NULL},
                                        {"since-ms", "integer", "SINCE", ARG_OPTIONAL, NULL},
                                        {"asof-ms", "integer", "ASOF", ARG_OPTIONAL, NULL},
                                        {"value", "string", "WHERE", ARG_OPTIONAL, NULL},
                                        ARGS_END};
static const cmd_arg_t args_none[] = {ARGS_END};
static const cmd_arg_t args_ping[] = {{"message", "string", NULL, ARG_OPTIONAL, NULL}, ARGS_END};
static const cmd_arg_t args_echo[] = {{"message", "string", NULL, 0, NULL}, ARGS_END};
static const cmd_arg_t args_hello_auth[] = {
    {"username", "string", NULL, 0, NULL}, {"password", "string", NULL, 0, NULL}, ARGS_END};
static const cmd_arg_t args_hello_opts[] = {
    {"protover", "integer", NULL, 0, NULL},
    {"auth", "block", "AUTH", ARG_OPTIONAL, args_hello_auth},
    {"clientname", "string", "SETNAME", ARG_OPTIONAL, NULL},
    ARGS_END};
static const cmd_arg_t args_hello[] = {{"arguments", "block", NULL, ARG_OPTIONAL, args_hello_opts},
                                       ARGS_END};
static const cmd_arg_t args_auth[] = {{"username", "string", NULL, ARG_OPTIONAL, NULL},
                                      {"password", "string", NULL, 0, NULL},
                                      ARGS_END};
static const cmd_arg_t args_client[] = {{"subcommand", "string", NULL, 0, NULL},
                                        {"arg", "string", NULL, ARG_OPTIONAL | ARG_MULTIPLE, NULL},
                                        ARGS_END};
static const cmd_arg_t args_select[] = {{"index", "integer", NULL, 0, NULL}, ARGS_END};
static const cmd_arg_t args_info[] = {
    {"section", "string", NULL, ARG_OPTIONAL | ARG_MULTIPLE, NULL}, ARGS_END};
static const cmd_arg_t args_command[] = {
    {"subcommand", "string", NULL, ARG_OPTIONAL, NULL},
    {"name", "string", NULL, ARG_OPTIONAL | ARG_MULTIPLE, NULL},
    ARGS_END};
static const cmd_arg_t args_config[] = {{"get", "pure-token", "GET", 0, NULL},
                                        {"parameter", "string", NULL, ARG_MULTIPLE, NULL},
                                        ARGS_END};

/* The table. Most frequent first: lookup is a linear scan. */
static const command_t commands[] = {
    {"features", -3, CMD_READONLY | CMD_FAST, cmd_features, "tallyd",
     "Windowed feature values of one entity.", args_features},
    {"mfeatures", -4, CMD_READONLY, cmd_mfeatures, "tallyd",
     "Feature values of many entities of one type.", args_mfeatures},
    {"recent", -4, CMD_READONLY, cmd_recent, "tallyd",
     "The newest items of a last/last_k feature, newest first.", args_recent},
    {"catalog", 1, CMD_READONLY | CMD_STALE, cmd_catalog, "tallyd",
     "Entities, features, aggregations, windows and hops.", args_none},
    {"ping", -1, CMD_NOAUTH | CMD_FAST | CMD_STALE, cmd_ping, "connection", "Ping the server.",
     args_ping},
    {"echo", 2, CMD_FAST | CMD_STALE, cmd_echo, "connection", "Echo the given string.", args_echo},
    {"hello", -1, CMD_NOAUTH | CMD_FAST | CMD_STALE, cmd_hello, "connection",
     "Handshake: protocol version, authentication, client name.", args_hello},
    {"auth", -2, CMD_NOAUTH | CMD_FAST | CMD_STALE, cmd_auth, "connection",
     "Authenticate to the server.", args_auth},
    {"client", -2, CMD_STALE, cmd_client, "connection",
     "Connections: name, id, information, list, kill.", args_client},
    {"dbsize", 1, CMD_READONLY | CMD_FAST | CMD_STALE, cmd_dbsize, "server",
     "The number of entities held.", args_none},
    {"select", 2, CMD_FAST | CMD_STALE, cmd_select, "connection",
     "Select database 0 (the only one).", args_select},
    {"quit", -1, CMD_NOAUTH | CMD_FAST | CMD_STALE, cmd_quit, "connection", "Close the connection.",
     args_none},
    {"info", -1, CMD_STALE, cmd_info, "server", "Information and statistics about tallyd.",
     args_info},
    {"command", -1, CMD_STALE, cmd_command, "server", "Details about the commands.", args_command},
    {"config", -2, CMD_STALE, cmd_config, "server",
     "Read a few settings (CONFIG GET); tallyd is configured by its file.", args_config},
};

#define NCOMMANDS (sizeof commands / sizeof commands[0])

static const command_t *lookup(const char *name, size_t len)
{
    for (size_t i = 0; i < NCOMMANDS; i++)
        if (strlen(commands[i].name) == len && strncasecmp(commands[i].name, name, len) == 0)
            return &commands[i];
    return NULL;
}

void tly_command_hint(tly_daemon_t *d, const tly_session_t *s, const tly_arg_t *argv, size_t argc,
                      tly_prefetch_t *pf)
{
    pf->n = 0;
    if (!s->authed || argc < 3)
        return;
    const command_t *cmd = lookup(argv[0].ptr, argv[0].len);
    size_t id;
    if (cmd == NULL)
        return;
    else if (cmd->handler == cmd_features || cmd->handler == cmd_recent)
        id = 2;
    else if (cmd->handler == cmd_mfeatures && argc > 3)
        id = 3;
    else
        return;
    int entity = tly_featset_entity(d->fs, argv[1].ptr, argv[1].len);
    if (entity >= 0)
        tly_store_prefetch_id(d->store, (uint32_t)entity, argv[id].ptr, argv[id].len, pf);
}

static void command_flags(cmd_ctx_t *c, const command_t *cmd)
{
    const char *flags[4];
    size_t n = 0;
    if (cmd->flags & CMD_READONLY)
        flags[n++] = "readonly";
    if (cmd->flags & CMD_FAST)
        flags[n++] = "fast";
    if (cmd->flags & CMD_NOAUTH)
        flags[n++] = "no_auth";
    if (cmd->flags & CMD_STALE)
        flags[n++] = "stale";
    tly_resp_set(c->out, c->s->proto, n);
    for (size_t i = 0; i < n; i++)
        tly_resp_simple(c->out, flags[i]);
}

/* One COMMAND INFO entry, Redis 7's ten fields (no keys: tallyd's ids are
 * not Redis keys, so cluster-aware clients route nothing). */
static void command_info(cmd_ctx_t *c, const command_t *cmd)
{
    tly_resp_array(c->out, 10);
    tly_resp_bulkstr(c->out, cmd->name);
    tly_resp_int(c->out, cmd->arity);
    command_flags(c, cmd);
    tly_resp_int(c->out, 0);
    tly_resp_int(c->out, 0);
    tly_resp_int(c->out, 0);
    tly_resp_set(c->out, c->s->proto, 0);
    tly_resp_array(c->out, 0);
    tly_resp_array(c->out, 0);
    tly_resp_array(c->out, 0);
}

static size_t count_args(const cmd_arg_t *args)
{
    size_t n = 0;
    while (args[n].name != NULL)
        n++;
    return n;
}

/* The "arguments" array of COMMAND DOCS: a map per argument. */
static void docs_args(cmd_ctx_t *c, const cmd_arg_t *args)
{
    size_t n = count_args(args);
    tly_resp_array(c->out, n);
    for (size_t i = 0; i < n; i++) {
        const cmd_arg_t *a = &args[i];
        size_t nflags = !!(a->flags & ARG_OPTIONAL) + !!(a->flags & ARG_MULTIPLE);
        tly_resp_map(c->out, c->s->proto, 2 + (a->token != NULL) + (nflags > 0) + (a->sub != NULL));
        tly_resp_bulkstr(c->out, "name");
        tly_resp_bulkstr(c->out, a->name);
        tly_resp_bulkstr(c->out, "type");
        tly_resp_bulkstr(c->out, a->type);
        if (a->token != NULL) {
            tly_resp_bulkstr(c->out, "token");
            tly_resp_bulkstr(c->out, a->token);
        }
        if (nflags > 0) {
            tly_resp_bulkstr(c->out, "flags");
            tly_resp_set(c->out, c->s->proto, nflags);
            if (a->flags & ARG_OPTIONAL)
                tly_resp_simple(c->out, "optional");
            if (a->flags & ARG_MULTIPLE)
                tly_resp_simple(c->out, "multiple");
        }
        if (a->sub != NULL) {
            tly_resp_bulkstr(c->out, "arguments");
            docs_args(c, a->sub);
        }
    }
}

static void command_docs(cmd_ctx_t *c, const command_t *cmd)
{
    bool any = count_args(cmd->args) > 0;
    tly_resp_bulkstr(c->out, cmd->name);
    tly_resp_map(c->out, c->s->proto, 3 + any);
    tly_resp_bulkstr(c->out, "summary");
    tly_resp_bulkstr(c->out, cmd->summary);
    tly_resp_bulkstr(c->out, "since");
    tly_resp_bulkstr(c->out, "0.1.0");
    tly_resp_bulkstr(c->out, "group");
    tly_resp_bulkstr(c->out, cmd->group);
    if (any) {
        tly_resp_bulkstr(c->out, "arguments");
        docs_args(c, cmd->args);
    }
}

static void cmd_command(cmd_ctx_t *c)
{
    if (c->argc == 1) {
        tly_resp_array(c->out, NCOMMANDS);
        for (size_t i = 0; i < NCOMMANDS; i++)
            command_info(c, &commands[i]);
        return;
    }
    const tly_arg_t *sub = &c->argv[1];
    if (arg_is(sub, "count") && c->argc == 2) {
        tly_resp_int(c->out, (int64_t)NCOMMANDS);
    } else if (arg_is(sub, "list") && c->argc == 2) {
        tly_resp_array(c->out, NCOMMANDS);
        for (size_t i = 0; i < NCOMMANDS; i++)
            tly_resp_bulkstr(c->out, commands[i].name);
    } else if (arg_is(sub, "info")) {
        if (c->argc == 2) {
            tly_resp_array(c->out, NCOMMANDS);
            for (size_t i = 0; i < NCOMMANDS; i++)
                command_info(c, &commands[i]);
            return;
        }
        tly_resp_array(c->out, c->argc - 2);
        for (size_t i = 2; i < c->argc; i++) {
            const command_t *cmd = lookup(c->argv[i].ptr, c->argv[i].len);
            if (cmd != NULL)
                command_info(c, cmd);
            else
                tly_resp_null(c->out, c->s->proto);
        }
    } else if (arg_is(sub, "docs")) {
        if (c->argc == 2) {
            tly_resp_map(c->out, c->s->proto, NCOMMANDS);
            for (size_t i = 0; i < NCOMMANDS; i++)
                command_docs(c, &commands[i]);
            return;
        }
        size_t found = 0;
        for (size_t i = 2; i < c->argc; i++)
            found += lookup(c->argv[i].ptr, c->argv[i].len) != NULL;
        tly_resp_map(c->out, c->s->proto, found);
        for (size_t i = 2; i < c->argc; i++) {
            const command_t *cmd = lookup(c->argv[i].ptr, c->argv[i].len);
            if (cmd != NULL)
                command_docs(c, cmd);
        }
    } else {
        char tmp[ERRARG_MAX + 1];
        tly_resp_errorf(c->out, "ERR unknown subcommand or wrong number of arguments for '%s'. "
                                "Try COMMAND DOCS.",
                        err_arg(sub, tmp, sizeof tmp));
    }
}

/* --- dispatch --- */

bool tly_command_allowed_unauth(const char *name, size_t len)
{
    const command_t *cmd = lookup(name, len);
    return cmd != NULL && (cmd->flags & CMD_NOAUTH);
}

static void unknown_command(tly_buf_t *out, const tly_arg_t *argv, size_t argc)
{
    char msg[1024], tmp[ERRARG_MAX + 1];
    size_t used = (size_t)snprintf(msg, sizeof msg,
                                   "ERR unknown command '%s', with args beginning with: ",
                                   err_arg(&argv[0], tmp, sizeof tmp));
    for (size_t i = 1; i < argc && used < sizeof msg - ERRARG_MAX - 4; i++) {
        int n = snprintf(msg + used, sizeof msg - used, "'%s' ",
                         err_arg(&argv[i], tmp, sizeof tmp));
        if (n < 0)
            break;
        used += (size_t)n;
    }
    tly_resp_error(out, msg);
}

void tly_command_exec(tly_daemon_t *d, tly_session_t *s, tly_cmd_scratch_t *scratch,
                      const tly_arg_t *argv, size_t argc, tly_buf_t *out, int64_t now_ms)
{
    const command_t *cmd = lookup(argv[0].ptr, argv[0].len);
    atomic_fetch_add_explicit(&d->server.commands, 1, memory_order_relaxed);
    if (cmd == NULL) {
        if (!s->authed)
            tly_resp_error(out, "NOAUTH Authentication required.");
        else
            unknown_command(out, argv, argc);
        return;
    }
    __atomic_store_n(&s->last_cmd, cmd->name, __ATOMIC_RELAXED); /* CLIENT LIST reads it */
    if (!s->authed && !(cmd->flags & CMD_NOAUTH)) {
        tly_resp_error(out, "NOAUTH Authentication required.");
        return;
    }
    if ((cmd->arity > 0 && argc != (size_t)cmd->arity) ||
        (cmd->arity < 0 && argc < (size_t)-cmd->arity)) {
        tly_resp_errorf(out, "ERR wrong number of arguments for '%s' command", cmd->name);
        return;
    }
    /* Data commands wait for the source to catch up (as Redis answers
     * -LOADING while it loads), unless the client opted into stale reads. */
    if (!(cmd->flags & CMD_STALE) && !s->stale_ok && !tly_source_ready(d->source)) {
        tly_source_stats_t st;
        tly_source_stats(d->source, &st, NULL, 0);
        if (st.lag >= 0)
            tly_resp_errorf(out,
                            "LOADING tallyd is catching up with Kafka (lag %" PRId64
                            " messages); retry, or CLIENT STALE ON to read anyway",
                            st.lag);
        else if (st.npartitions == 0)
            tly_resp_error(out, "LOADING tallyd is catching up with Kafka (lag not known yet: "
                                "no partitions assigned); retry, or CLIENT STALE ON to read "
                                "anyway");
        else
            tly_resp_errorf(out,
                            "LOADING tallyd is catching up with Kafka (lag not known yet: "
                            "%zu partitions assigned, their end offsets not looked up yet); "
                            "retry, or CLIENT STALE ON to read anyway",
                            st.npartitions);
        return;
    }
    cmd_ctx_t c = {d, s, scratch, argv, argc, out, now_ms};
    cmd->handler(&c);
}
