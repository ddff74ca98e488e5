/*
 * memory.c — bytes per active entity: tallyd's store next to redis-server
 * holding the same aggregates the way a team would write them.
 *
 * Workloads (user features of config/demo.yaml, in bench/memory-users.yaml):
 *  (a) sparse: 1,000,000 users with 1–3 events each in the last day;
 *  (b) heavy: users with events in every bucket of every window of every
 *      feature (each of click, save, hide at every 10 s of the last 5 min,
 *      every minute of the last hour, every 5 min of the last day and every
 *      hour of the last 7 days).
 *
 * tallyd: the events are applied to a tly_store_t; we report the store's own
 * count (malloc_usable_size of its allocations) and the growth of the
 * process's resident memory (which also holds the hash table's buckets and
 * allocator overhead) — the latter is the figure compared.
 *
 * Redis: one hash per user (`user:<id>`), one field per feature × window ×
 * bucket (`clicks:1h:<bucket>` → count), `last` features as one field
 * (`last_action` → "<ts>:<value>"), and each last_k as a list
 * (`user:<id>:<name>`, "<ts>:<v1>:<v2>", newest first, trimmed to k). The
 * loader folds the events into final field values first and writes them
 * with pipelined HSET/RPUSH: the memory is that of the same final state a
 * per-event HINCRBY loader would leave. We report the growth of Redis's
 * INFO memory used_memory. Redis gets the same users for (a); for (b) it
 * gets a slice of the users (--redis-heavy, default 10,000) because its
 * per-field cost would not fit this machine at 100,000: the figure compared
 * is per entity.
 *
 * Usage: memory [--port P] [--sparse N] [--heavy N] [--redis-heavy N]
 */
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tallyd/config.h"
#include "tallyd/feature.h"
#include "tallyd/rcu.h"
#include "tallyd/store.h"
#include "tallyd/window.h"

#define SEC  INT64_C(1000)
#define MIN  (60 * SEC)
#define HOUR (60 * MIN)
#define DAY  (24 * HOUR)

static const char *actions[] = {"impression", "closeup", "click", "save", "hide"};

typedef struct {
    int64_t t;
    int64_t pin;
    int32_t dwell; /* -1: absent */
    uint8_t action;
} bev_t;

static uint64_t rng = 0x12345678abcdefULL;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static long rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, res = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &res) != 2)
            res = 0;
        fclose(f);
    }
    return res * sysconf(_SC_PAGESIZE);
}

/* Events of user u for the workload. Returns the count written to out. */
static size_t sparse_events(uint64_t u, int64_t now, bev_t *out)
{
    size_t n = 1 + u % 3;
    for (size_t i = 0; i < n; i++) {
        int a = (int)(next_rand() % 100);
        out[i].action = a < 70 ? 0 : a < 85 ? 1 : a < 94 ? 2 : a < 98 ? 3 : 4;
        out[i].t = now - 1 - (int64_t)(next_rand() % (uint64_t)DAY);
        out[i].pin = 1 + (int64_t)(next_rand() % 1000000);
        out[i].dwell = next_rand() % 10 < 8 ? (int32_t)(next_rand() % 60000) : -1;
    }
    return n;
}

static size_t heavy_events(int64_t now, bev_t *out)
{
    static const int64_t span[] = {5 * MIN, HOUR, DAY, 7 * DAY};
    static const int64_t step[] = {10 * SEC, MIN, 5 * MIN, HOUR};
    size_t n = 0;
    int64_t base = now - now % (10 * SEC);
    for (int g = 0; g < 4; g++)
        for (int64_t t = base - span[g]; t <= base; t += step[g])
            for (int a = 2; a <= 4; a++) { /* click, save, hide */
                out[n].action = (uint8_t)a;
                out[n].t = t;
                out[n].pin = 1 + (int64_t)(next_rand() % 1000000);
                out[n].dwell = (int32_t)(next_rand() % 60000);
                n++;
            }
    return n;
}

typedef struct {
    tly_featset_t *fs;
    int f_user, f_pin, f_action, f_dwell, f_ts;
} ctx_t;

static void to_event(const ctx_t *c, uint64_t user, const bev_t *b, tly_event_t *ev)
{
    memset(ev->vals, 0, sizeof(ev->vals[0]) * c->fs->nfields);
    ev->skip_entities = 0;
    ev->replayed = false;
    ev->nfields = (uint32_t)c->fs->nfields;
    ev->time_ms = b->t;
    ev->vals[c->f_ts] = (tly_value_t){.type = TLY_V_INT, .u.i = b->t};
    ev->vals[c->f_user] = (tly_value_t){.type = TLY_V_INT, .u.i = (int64_t)user};
    ev->vals[c->f_pin] = (tly_value_t){.type = TLY_V_INT, .u.i = b->pin};
    const char *an = actions[b->action];
    ev->vals[c->f_action] =
        (tly_value_t){.type = TLY_V_STR, .len = (uint32_t)strlen(an), .u.s = an};
    if (b->dwell >= 0)
        ev->vals[c->f_dwell] = (tly_value_t){.type = TLY_V_INT, .u.i = b->dwell};
}

/* ---- Redis peer ---------------------------------------------------------- */

typedef struct {
    char field[64];
    long long v;
} field_t;

typedef struct {
    int64_t t;
    char s[64];
} item_t;

/* Folds user u's events into Redis commands and appends them to the
 * pipeline. Returns the number of replies to read. */
static int redis_user(redisContext *rc, const ctx_t *c, uint64_t u, const bev_t *evs, size_t n,
                      int64_t now)
{
    static field_t fields[8192];
    static item_t items[TLY_MAX_FEATURES][128];
    static size_t nitems[TLY_MAX_FEATURES];
    size_t nfields = 0;
    int replies = 0;
    tly_event_t ev;
    memset(nitems, 0, sizeof nitems);
    for (size_t i = 0; i < n; i++) {
        to_event(c, u, &evs[i], &ev);
        for (size_t f = 0; f < c->fs->nfeats; f++) {
            const tly_feat_t *feat = &c->fs->feats[f];
            if (!tly_feat_match(feat, &ev))
                continue;
            if (!tly_agg_windowed(feat->agg)) {
                item_t *it = items[f];
                char buf[64];
                int len = snprintf(buf, sizeof buf, "%lld", (long long)evs[i].t);
                for (size_t v = 0; v < feat->nvalues; v++) {
                    const tly_value_t *val = &ev.vals[feat->values[v]];
                    if (val->type == TLY_V_INT)
                        len += snprintf(buf + len, sizeof buf - (size_t)len, ":%lld",
                                        (long long)val->u.i);
                    else if (val->type == TLY_V_STR)
                        len += snprintf(buf + len, sizeof buf - (size_t)len, ":%.*s", (int)val->len,
                                        val->u.s);
                }
                /* keep newest first, at most k */
                size_t k = feat->k, m = nitems[f], pos = m;
                while (pos > 0 && it[pos - 1].t < evs[i].t)
                    pos--;
                if (pos >= k)
                    continue;
                size_t end = m < k ? m : k - 1;
                for (size_t q = end; q > pos; q--)
                    it[q] = it[q - 1];
                it[pos].t = evs[i].t;
                memcpy(it[pos].s, buf, sizeof buf);
                if (m < k)
                    nitems[f] = m + 1;
                continue;
            }
            const tly_value_t *val = feat->nvalues ? &ev.vals[feat->values[0]] : NULL;
            if (tly_agg_numeric(feat->agg) && (!val || val->type != TLY_V_INT))
                continue;
            for (size_t w = 0; w < feat->nwindows; w++) {
                const tly_window_t *win = &feat->windows[w];
                if (evs[i].t < tly_window_start(now, win->len_ms, win->hop_ms))
                    continue; /* outside this window, as tallyd keeps it */
                char name[64];
                snprintf(name, sizeof name, "%s:%s:%lld", feat->name, win->label,
                         (long long)tly_window_bucket(evs[i].t, win->hop_ms));
                size_t q = 0;
                while (q < nfields && strcmp(fields[q].field, name) != 0)
                    q++;
                if (q == nfields) {
                    if (nfields == sizeof fields / sizeof fields[0])
                        continue;
                    memcpy(fields[q].field, name, sizeof name);
                    fields[q].v = 0;
                    nfields++;
                }
                fields[q].v += feat->agg == TLY_AGG_COUNT ? 1 : val->u.i;
            }
        }
    }
    char key[64];
    snprintf(key, sizeof key, "user:%llu", (unsigned long long)u);
    /* HSET in chunks of 256 fields */
    for (size_t s = 0; s < nfields; s += 256) {
        size_t cnt = nfields - s < 256 ? nfields - s : 256;
        const char *argv[2 + 2 * 256];
        size_t argl[2 + 2 * 256];
        char vals[256][24];
        argv[0] = "HSET";
        argl[0] = 4;
        argv[1] = key;
        argl[1] = strlen(key);
        for (size_t q = 0; q < cnt; q++) {
            argv[2 + 2 * q] = fields[s + q].field;
            argl[2 + 2 * q] = strlen(fields[s + q].field);
            argl[3 + 2 * q] = (size_t)snprintf(vals[q], sizeof vals[q], "%lld", fields[s + q].v);
            argv[3 + 2 * q] = vals[q];
        }
        redisAppendCommandArgv(rc, (int)(2 + 2 * cnt), argv, argl);
        replies++;
    }
    for (size_t f = 0; f < c->fs->nfeats; f++) {
        const tly_feat_t *feat = &c->fs->feats[f];
        if (tly_agg_windowed(feat->agg) || nitems[f] == 0)
            continue;
        if (feat->agg == TLY_AGG_LAST) {
            redisAppendCommand(rc, "HSET %s %s %s", key, feat->name, items[f][0].s);
            replies++;
            continue;
        }
        const char *argv[2 + 128];
        size_t argl[2 + 128];
        char lkey[96];
        snprintf(lkey, sizeof lkey, "%s:%s", key, feat->name);
        argv[0] = "RPUSH";
        argl[0] = 5;
        argv[1] = lkey;
        argl[1] = strlen(lkey);
        for (size_t q = 0; q < nitems[f]; q++) {
            argv[2 + q] = items[f][q].s;
            argl[2 + q] = strlen(items[f][q].s);
        }
        redisAppendCommandArgv(rc, (int)(2 + nitems[f]), argv, argl);
        replies++;
    }
    return replies;
}

static long long redis_used(redisContext *rc)
{
    redisReply *r = redisCommand(rc, "INFO memory");
    long long used = -1;
    if (r && r->type == REDIS_REPLY_STRING) {
        const char *p = strstr(r->str, "used_memory:");
        if (p)
            used = atoll(p + strlen("used_memory:"));
    }
    freeReplyObject(r);
    return used;
}

static void drain(redisContext *rc, int *pending)
{
    while (*pending > 0) {
        redisReply *r;
        if (redisGetReply(rc, (void **)&r) != REDIS_OK) {
            fprintf(stderr, "memory: redis error: %s\n", rc->errstr);
            exit(1);
        }
        if (r->type == REDIS_REPLY_ERROR) {
            fprintf(stderr, "memory: redis replied %s\n", r->str);
            exit(1);
        }
        freeReplyObject(r);
        (*pending)--;
    }
}

typedef struct {
    double tally_rss, tally_store, redis;
    size_t tally_n, redis_n;
} result_t;

static void run(const char *label, ctx_t *c, redisContext *rc, size_t nusers, size_t nredis,
                int heavy, int64_t now, result_t *res)
{
    static bev_t evs[4096];
    tly_event_t ev;
    uint64_t seed = rng;

    /* tallyd, in a child process so that neither run's freed memory
     * hides the other's growth */
    int fd[2];
    if (pipe(fd) != 0) {
        perror("pipe");
        exit(1);
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        tly_rcu_thread_online(); /* only the child touches RCU: no state crosses fork */
        long rss0 = rss_bytes();
        tly_store_t *store = tly_store_new(c->fs);
        for (uint64_t u = 1; u <= nusers; u++) {
            size_t n = heavy ? heavy_events(now, evs) : sparse_events(u, now, evs);
            for (size_t i = 0; i < n; i++) {
                to_event(c, u, &evs[i], &ev);
                tly_store_apply(store, &ev, 0, 0, now);
            }
        }
        tly_store_stats_t st;
        tly_store_stats(store, &st);
        long rss1 = rss_bytes();
        double out[3] = {(double)st.entities, (double)st.bytes, (double)(rss1 - rss0)};
        if (write(fd[1], out, sizeof out) != (ssize_t)sizeof out)
            _exit(1);
        _exit(0);
    }
    close(fd[1]);
    double in[3];
    if (read(fd[0], in, sizeof in) != (ssize_t)sizeof in) {
        fprintf(stderr, "memory: the tallyd run failed\n");
        exit(1);
    }
    close(fd[0]);
    waitpid(pid, NULL, 0);
    res->tally_n = (size_t)in[0];
    res->tally_store = in[1] / in[0];
    res->tally_rss = in[2] / in[0];

    /* Redis: same generator, same seed, so the same events */
    rng = seed;
    redisReply *r = redisCommand(rc, "FLUSHALL");
    freeReplyObject(r);
    long long used0 = redis_used(rc);
    int pending = 0;
    for (uint64_t u = 1; u <= nredis; u++) {
        size_t n = heavy ? heavy_events(now, evs) : sparse_events(u, now, evs);
        pending += redis_user(rc, c, u, evs, n, now);
        if (pending > 2000)
            drain(rc, &pending);
    }
    drain(rc, &pending);
    long long used1 = redis_used(rc);
    res->redis_n = nredis;
    res->redis = (double)(used1 - used0) / (double)nredis;
    r = redisCommand(rc, "FLUSHALL");
    freeReplyObject(r);

    printf("%-34s %9zu %12.0f %12.0f %9zu %12.0f %7.2fx\n", label, res->tally_n, res->tally_rss,
           res->tally_store, res->redis_n, res->redis, res->tally_rss / res->redis);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    int port = 6379;
    size_t nsparse = 1000000, nheavy = 100000, nredis_heavy = 10000;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc)
            port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sparse") && i + 1 < argc)
            nsparse = (size_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "--heavy") && i + 1 < argc)
            nheavy = (size_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "--redis-heavy") && i + 1 < argc)
            nredis_heavy = (size_t)atol(argv[++i]);
        else {
            fprintf(stderr,
                    "usage: memory [--port P] [--sparse N] [--heavy N] [--redis-heavy N]\n");
            return 2;
        }
    }
    if (nredis_heavy > nheavy)
        nredis_heavy = nheavy;

    char err[512];
    tly_config_t *cfg = NULL;
    ctx_t c;
    if (tly_config_load("bench/memory-users.yaml", &cfg, err, sizeof err) != TLY_OK ||
        tly_featset_compile(cfg, &c.fs, err, sizeof err) != TLY_OK) {
        fprintf(stderr, "memory: %s\n", err);
        return 1;
    }
    c.f_user = tly_featset_field(c.fs, "user_id", 7);
    c.f_pin = tly_featset_field(c.fs, "pin_id", 6);
    c.f_action = tly_featset_field(c.fs, "action", 6);
    c.f_dwell = tly_featset_field(c.fs, "dwell_ms", 8);
    c.f_ts = tly_featset_field(c.fs, "ts", 2);
    if (c.f_user < 0 || c.f_pin < 0 || c.f_action < 0 || c.f_dwell < 0 || c.f_ts < 0) {
        fprintf(stderr, "memory: bench/memory-users.yaml lacks a field the generator sets\n");
        return 1;
    }
    redisContext *rc = redisConnect("127.0.0.1", port);
    if (!rc || rc->err) {
        fprintf(stderr, "memory: cannot connect to redis-server on port %d: %s\n", port,
                rc ? rc->errstr : "no memory");
        return 1;
    }
    redisReply *r = redisCommand(rc, "INFO server");
    const char *ver = r && r->type == REDIS_REPLY_STRING ? strstr(r->str, "redis_version:") : NULL;
    printf("memory: bytes per active entity (user features of config/demo.yaml); redis %.*s\n",
           ver ? (int)strcspn(ver + 14, "\r\n") : 1, ver ? ver + 14 : "?");
    freeReplyObject(r);

    int64_t now = INT64_C(1763800000000);
    printf("%-34s %9s %12s %12s %9s %12s %8s\n", "workload", "entities", "tallyd RSS/e",
           "tallyd store", "redis n", "redis B/e", "ratio");
    result_t a, b;
    run("(a) sparse users, 1-3 events", &c, rc, nsparse, nsparse, 0, now, &a);
    run("(b) heavy users, every bucket", &c, rc, nheavy, nredis_heavy, 1, now, &b);
    printf("ratio = tallyd RSS growth per entity / redis used_memory growth per entity\n");
    printf("target (a): <= 0.25x: %s (%.2fx)\n", a.tally_rss <= 0.25 * a.redis ? "MET" : "NOT MET",
           a.tally_rss / a.redis);
    printf("target (b): <= 1.00x: %s (%.2fx)\n", b.tally_rss <= b.redis ? "MET" : "NOT MET",
           b.tally_rss / b.redis);
    redisFree(rc);
    tly_featset_free(c.fs);
    tly_config_free(cfg);
    return 0;
}
