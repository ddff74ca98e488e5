/*
 * snapshot.c — periodic and final snapshots, and recovery (snapshot.h).
 *
 * File contents (snapfile.h frames each block):
 *   block POSITIONS  u32 count, then per partition: u16 topic length, the
 *                    topic, i32 partition, i64 next offset, i64 newest event
 *                    time applied from it or -1 (little-endian)
 *   block STATE...   tly_store_dump's blocks, in order
 *
 * The writer of a periodic snapshot is a child forked by the poll thread
 * (see snapshot.h). The child asks to be killed when that thread ends
 * (PR_SET_PDEATHSIG), so a killed tallyd leaves no writer behind; its temp
 * file is removed by the next prune. Shared state: `mu` guards the stats,
 * which INFO reads from query threads; everything else belongs to the
 * poll thread while the source runs, and to the main thread otherwise.
 */
#include "tallyd/snapshot.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tallyd/log.h"
#include "tallyd/snapfile.h"

#define BLOCK_POSITIONS 1u
#define BLOCK_STATE     2u
#define BLOCK_ETYPES    3u
#define MAX_ETYPES      64
#define MAX_POSITIONS   65536
#define ERR_CAP         256
#define AHEAD_WARN_MS   1000 /* a newest name this far ahead of the clock is logged */

struct tly_snapshotter {
    const tly_config_t *cfg;
    uint64_t defs_hash;
    tly_store_t *store;
    /* entity types in featset order (first appearance in the config) and
     * the hash of each one's features */
    size_t ntypes;
    const char *type_name[MAX_ETYPES];
    uint64_t type_hash[MAX_ETYPES];

    /* each feature's definition hash, by feature id (the snapshot's layout
     * items name them: a restart with changed definitions restores the
     * features whose hash is unchanged) */
    uint64_t *feat_hash;
    bool partial; /* the snapshot restored was written for other definitions */

    /* restored positions, handed to the source by attach */
    tly_position_t *restored;
    size_t nrestored;

    /* poll thread (main thread once the source is halted) */
    pid_t child;
    int64_t child_started_ms, child_created_ms;
    tly_position_t *pending; /* positions the running child writes */
    size_t npending;
    int64_t next_due_ms;
    uint64_t last_messages;   /* source messages at the last snapshot */
    uint64_t last_rebalances; /* and assignment changes */
    uint64_t last_positions;  /* and positions (positions_hash) */
    bool warned_ahead;        /* next_name_ms has logged its warning */

    /* the writer child's error sentence: a shared anonymous mapping, read
     * by the parent after the child exited */
    char *child_err;

    pthread_mutex_t mu;
    tly_snapshot_stats_t st;
};

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        fputs("tallyd: out of memory\n", stderr);
        abort();
    }
    return p;
}

/* ---- the feature definitions' hash ------------------------------------------ */

typedef struct {
    uint64_t h;
} fnv_t;

static void fnv(fnv_t *f, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        f->h ^= b[i];
        f->h *= UINT64_C(0x100000001b3);
    }
    f->h ^= 0xff; /* field separator: "ab","c" differs from "a","bc" */
    f->h *= UINT64_C(0x100000001b3);
}

static void fnv_str(fnv_t *f, const char *s)
{
    fnv(f, s != NULL ? s : "", s != NULL ? strlen(s) : 0);
}

static void fnv_i64(fnv_t *f, int64_t v)
{
    fnv(f, &v, sizeof v);
}

static void fnv_feature(fnv_t *f, const tly_feature_cfg_t *fc)
{
    fnv_str(f, fc->name);
    fnv_str(f, fc->entity);
    fnv_i64(f, (int64_t)fc->nkeys);
    for (size_t k = 0; k < fc->nkeys; k++)
        fnv_str(f, fc->keys[k]);
    fnv_i64(f, (int64_t)fc->nwhere);
    for (size_t w = 0; w < fc->nwhere; w++) {
        fnv_str(f, fc->where[w].field);
        fnv_i64(f, (int64_t)fc->where[w].nvalues);
        for (size_t v = 0; v < fc->where[w].nvalues; v++)
            fnv_str(f, fc->where[w].values[v]);
    }
    fnv_i64(f, fc->agg);
    fnv_i64(f, (int64_t)fc->nvalues);
    for (size_t v = 0; v < fc->nvalues; v++)
        fnv_str(f, fc->values[v]);
    fnv_i64(f, (int64_t)fc->nwindows);
    for (size_t w = 0; w < fc->nwindows; w++)
        fnv_i64(f, fc->windows_ms[w]);
    fnv_i64(f, fc->hop_ms);
    fnv_i64(f, fc->k);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Appends one rule string to a growing list. */
static void rule_add(char ***rules, size_t *n, size_t *cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void rule_add(char ***rules, size_t *n, size_t *cap, const char *fmt, ...)
{
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 64;
        char **r = realloc(*rules, *cap * sizeof *r);
        if (r == NULL) {
            fputs("tallyd: out of memory\n", stderr);
            abort();
        }
        *rules = r;
    }
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&(*rules)[*n], fmt, ap) < 0) {
        fputs("tallyd: out of memory\n", stderr);
        abort();
    }
    va_end(ap);
    (*n)++;
}

/* The rules that decide whether an event is accepted at all. A rejected
 * event changes nothing, so every feature's state depends on them: an
 * event is rejected whole when a field some feature reads is malformed, a
 * matched feature's value has the wrong type or is too long, a matched
 * entity type's key is missing, or the payload breaks the events.* and
 * topic limits. Each rule is a string; the set is sorted and deduplicated,
 * so the features' order in the config does not matter. */
/* True when some feature of entity type `entity` takes every event: a
 * count or last/last_k feature without a filter. */
static bool takes_all(const tly_config_t *cfg, const char *entity)
{
    for (size_t i = 0; i < cfg->nfeatures; i++) {
        const tly_feature_cfg_t *fc = &cfg->features[i];
        if (strcmp(fc->entity, entity) == 0 && fc->nwhere == 0 && !tly_agg_numeric(fc->agg))
            return true;
    }
    return false;
}

static uint64_t acceptance_hash(const tly_config_t *cfg)
{
    fnv_t f = {UINT64_C(0xcbf29ce484222325)};
    char **rules = NULL;
    size_t n = 0, cap = 0;
    rule_add(&rules, &n, &cap, "events %s %d %" PRId64 " %" PRId64 " %" PRId64,
             cfg->events.time_field ? cfg->events.time_field : "", (int)cfg->events.time_unit,
             cfg->events.max_future_skew_ms, cfg->events.max_bytes, cfg->events.max_string);
    for (size_t t = 0; t < cfg->kafka.ntopics; t++) {
        const tly_topic_cfg_t *tc = &cfg->kafka.topic_cfgs[t];
        rule_add(&rules, &n, &cap, "topic %s %s %d %" PRId64 " %" PRId64 " %" PRId64 " %s",
                 tc->name, tc->time_field ? tc->time_field : "", (int)tc->time_unit,
                 tc->max_future_skew_ms, tc->max_bytes, tc->max_string,
                 tc->key_entity ? tc->key_entity : "");
    }
    for (size_t i = 0; i < cfg->nfeatures; i++) {
        const tly_feature_cfg_t *fc = &cfg->features[i];
        for (size_t k = 0; k < fc->nkeys; k++) {
            rule_add(&rules, &n, &cap, "field %s", fc->keys[k]);
            rule_add(&rules, &n, &cap, "key %s %zu %s", fc->entity, k, fc->keys[k]);
        }
        /* which events make the type's key checked: those some feature of
         * it takes — every event when a count or last/last_k feature has no
         * filter; otherwise the filters (and for sum/min/max/avg, events
         * carrying the value) */
        fnv_t w = {UINT64_C(0xcbf29ce484222325)};
        for (size_t c = 0; c < fc->nwhere; c++) {
            rule_add(&rules, &n, &cap, "field %s", fc->where[c].field);
            fnv_str(&w, fc->where[c].field);
            for (size_t v = 0; v < fc->where[c].nvalues; v++)
                fnv_str(&w, fc->where[c].values[v]);
        }
        if (tly_agg_numeric(fc->agg) && fc->nvalues > 0)
            fnv_str(&w, fc->values[0]);
        if (!takes_all(cfg, fc->entity))
            rule_add(&rules, &n, &cap, "match %s %016" PRIx64, fc->entity, w.h);
        else
            rule_add(&rules, &n, &cap, "match %s all", fc->entity);
        for (size_t v = 0; v < fc->nvalues; v++) {
            rule_add(&rules, &n, &cap, "field %s", fc->values[v]);
            if (tly_agg_numeric(fc->agg))
                rule_add(&rules, &n, &cap, "number %s", fc->values[v]);
            else if (!tly_agg_windowed(fc->agg))
                rule_add(&rules, &n, &cap, "kept %s", fc->values[v]);
        }
    }
    qsort(rules, n, sizeof *rules, cmp_str);
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || strcmp(rules[i], rules[i - 1]) != 0)
            fnv_str(&f, rules[i]);
    }
    for (size_t i = 0; i < n; i++)
        free(rules[i]);
    free(rules);
    return f.h;
}

static fnv_t fnv_start(const tly_config_t *cfg, uint64_t acceptance)
{
    fnv_t f = {UINT64_C(0xcbf29ce484222325)};
    fnv_str(&f, "tallyd store format 1");
    fnv_i64(&f, cfg->store.idle_ttl_ms);
    fnv_i64(&f, (int64_t)acceptance);
    return f;
}

/* The hash of the features of entity type `entity` (all when NULL): a
 * record's layout depends only on its own type's features, in order. */
static uint64_t features_hash(const tly_config_t *cfg, const char *entity)
{
    fnv_t f = fnv_start(cfg, acceptance_hash(cfg));
    for (size_t i = 0; i < cfg->nfeatures; i++)
        if (entity == NULL || strcmp(cfg->features[i].entity, entity) == 0)
            fnv_feature(&f, &cfg->features[i]);
    return f.h;
}

static uint64_t feature_hash(const tly_config_t *cfg, uint64_t acceptance, size_t i)
{
    fnv_t f = fnv_start(cfg, acceptance);
    fnv_feature(&f, &cfg->features[i]);
    return f.h;
}

uint64_t tly_snapshot_feature_hash(const tly_config_t *cfg, size_t i)
{
    return feature_hash(cfg, acceptance_hash(cfg), i);
}

uint64_t tly_snapshot_defs_hash(const tly_config_t *cfg)
{
    return features_hash(cfg, NULL);
}

/* ---- writing ------------------------------------------------------------------ */

static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

typedef struct {
    tly_snapw_t *w;
    char *err;
    size_t errlen;
    uint64_t bytes;
} emit_t;

static bool emit_state(void *ctx, const void *data, size_t len)
{
    emit_t *e = ctx;
    e->bytes += len;
    return tly_snapw_block(e->w, BLOCK_STATE, data, len, e->err, e->errlen) == TLY_OK;
}

/* Writes one snapshot of store at pos[0..n). Runs in the forked child or on
 * the main thread at shutdown. */
static tly_err_t write_snapshot(const tly_snapshotter_t *sn, tly_store_t *store,
                                const tly_position_t *pos, size_t n, int64_t created_ms, char *path,
                                size_t pathcap, uint64_t *bytes, char *err, size_t errlen)
{
    tly_snapw_t *w = tly_snapw_open(sn->cfg->snapshot.dir, created_ms, sn->defs_hash, err, errlen);
    if (w == NULL)
        return TLY_E_IO;
    uint8_t types[4 + MAX_ETYPES * (2 + 256 + 8)];
    size_t ul = 4;
    put_le(types, sn->ntypes, 4);
    for (size_t i = 0; i < sn->ntypes; i++) {
        size_t nl = strlen(sn->type_name[i]);
        nl = nl > 255 ? 255 : nl;
        put_le(types + ul, nl, 2);
        memcpy(types + ul + 2, sn->type_name[i], nl);
        put_le(types + ul + 2 + nl, sn->type_hash[i], 8);
        ul += 2 + nl + 8;
    }
    if (tly_snapw_block(w, BLOCK_ETYPES, types, ul, err, errlen) != TLY_OK) {
        tly_snapw_abort(w);
        return TLY_E_IO;
    }
    size_t cap = 4, used = 0;
    for (size_t i = 0; i < n; i++)
        cap += 2 + strlen(pos[i].topic) + 20;
    uint8_t *buf = xmalloc(cap);
    put_le(buf, n, 4);
    used = 4;
    for (size_t i = 0; i < n; i++) {
        size_t tl = strlen(pos[i].topic);
        put_le(buf + used, tl, 2);
        memcpy(buf + used + 2, pos[i].topic, tl);
        used += 2 + tl;
        put_le(buf + used, (uint32_t)pos[i].partition, 4);
        put_le(buf + used + 4, (uint64_t)pos[i].offset, 8);
        put_le(buf + used + 12, (uint64_t)pos[i].last_event_ms, 8);
        used += 20;
    }
    tly_err_t rc = tly_snapw_block(w, BLOCK_POSITIONS, buf, used, err, errlen);
    free(buf);
    emit_t e = {.w = w, .err = err, .errlen = errlen, .bytes = used};
    if (rc == TLY_OK && tly_store_dump(store, sn->feat_hash, emit_state, &e) != TLY_OK) {
        if (err != NULL && errlen > 0 && err[0] == '\0')
            snprintf(err, errlen, "serialising the store failed (out of memory)");
        rc = TLY_E_IO;
    }
    if (rc != TLY_OK) {
        tly_snapw_abort(w);
        return rc;
    }
    *bytes = e.bytes;
    return tly_snapw_commit(w, path, pathcap, err, errlen);
}

static void note_written(tly_snapshotter_t *sn, int64_t created_ms, int64_t took_ms, uint64_t bytes,
                         const char *path, uint64_t rebalances)
{
    pthread_mutex_lock(&sn->mu);
    sn->st.written++;
    sn->st.last_rebalances = rebalances;
    sn->st.last_ms = created_ms;
    sn->st.last_write_ms = took_ms;
    sn->st.last_bytes = bytes;
    snprintf(sn->st.last_path, sizeof sn->st.last_path, "%s", path);
    sn->st.last_error[0] = '\0'; /* the newest attempt succeeded */
    pthread_mutex_unlock(&sn->mu);
}

/* Removes the temp files no writer is writing (tly_snap_clean_tmp); called
 * while no writer of this process runs. */
static void clean_tmp(tly_snapshotter_t *sn)
{
    size_t n = tly_snap_clean_tmp(sn->cfg->snapshot.dir);
    if (n > 0)
        tly_info("snapshot: removed %zu temp file%s a killed writer left in %s", n,
                 n == 1 ? "" : "s", sn->cfg->snapshot.dir);
}

/* The next snapshot's name: now, or after the newest in the directory when
 * the clock is behind that one (tly_snap_next_ms). */
static int64_t next_name_ms(tly_snapshotter_t *sn, int64_t now)
{
    int64_t ms = tly_snap_next_ms(sn->cfg->snapshot.dir, now);
    if (ms == now)
        sn->warned_ahead = false; /* the clock has passed the names: warn again next time */
    else if (ms - 1 - now >= AHEAD_WARN_MS && !sn->warned_ahead) {
        sn->warned_ahead = true;
        tly_warn("snapshot: the newest snapshot in %s is named %.1f s ahead of the clock (the "
                 "clock was stepped back?); snapshots are named after it, so that the newest "
                 "written is the one restored",
                 sn->cfg->snapshot.dir, (double)(ms - 1 - now) / 1000.0);
    }
    return ms;
}

static void note_failed(tly_snapshotter_t *sn, const char *why)
{
    pthread_mutex_lock(&sn->mu);
    sn->st.failed++;
    snprintf(sn->st.last_error, sizeof sn->st.last_error, "%s", why);
    pthread_mutex_unlock(&sn->mu);
    tly_error("snapshot: %s; the previous snapshot stays in place and offsets are not "
              "committed past it",
              why);
}

/* The child's work: write, then _exit with 0 on success. */
static void child_main(tly_snapshotter_t *sn, pid_t parent)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(3); /* the parent died before the request took effect */
    /* Drop the inherited sockets (clients, listeners, Kafka): a connection
     * the parent closes meanwhile must close now, not when this child ends.
     * The log stays. */
    int lfd = tly_log_fd();
    if (lfd > 3)
        close_range(3, (unsigned)lfd - 1, 0);
    close_range(lfd >= 3 ? (unsigned)lfd + 1 : 3, ~0u, 0);
    char err[ERR_CAP] = "", path[512];
    uint64_t bytes = 0;
    tly_err_t rc = write_snapshot(sn, sn->store, sn->pending, sn->npending, sn->child_created_ms,
                                  path, sizeof path, &bytes, err, sizeof err);
    if (rc != TLY_OK) {
        tly_error("snapshot: writer: %s", err);
        if (sn->child_err != NULL)
            snprintf(sn->child_err, ERR_CAP, "%s", err);
        _exit(1);
    }
    _exit(0);
}

/* Collects a finished child: on success the positions it covered are
 * committed and old files pruned. Blocks when `wait` is true. */
static void reap(tly_snapshotter_t *sn, tly_source_t *src, bool wait)
{
    if (sn->child <= 0)
        return;
    int status = 0;
    pid_t r;
    do
        r = waitpid(sn->child, &status, wait ? 0 : WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r == 0)
        return;
    sn->child = 0;
    pthread_mutex_lock(&sn->mu);
    sn->st.in_progress = false;
    pthread_mutex_unlock(&sn->mu);
    if (r > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        char path[600];
        snprintf(path, sizeof path, "%s/snapshot-%013" PRId64 ".tly", sn->cfg->snapshot.dir,
                 sn->child_created_ms);
        struct stat sb;
        note_written(sn, sn->child_created_ms, wall_ms() - sn->child_started_ms,
                     stat(path, &sb) == 0 ? (uint64_t)sb.st_size : 0, path, sn->last_rebalances);
        tly_source_commit(src, sn->pending, sn->npending);
        tly_snap_prune(sn->cfg->snapshot.dir, (size_t)sn->cfg->snapshot.keep, sn->child_created_ms);
        return;
    }
    char why[ERR_CAP + 32];
    if (r < 0)
        snprintf(why, sizeof why, "waiting for the writer failed: %s", strerror(errno));
    else if (WIFSIGNALED(status))
        snprintf(why, sizeof why, "the writer was killed by signal %d", WTERMSIG(status));
    else if (sn->child_err != NULL && sn->child_err[0] != '\0')
        snprintf(why, sizeof why, "%.*s", ERR_CAP, sn->child_err);
    else
        snprintf(why, sizeof why, "the writer failed (exit %d)", WEXITSTATUS(status));
    note_failed(sn, why);
    sn->last_messages = UINT64_MAX; /* the next period tries again, new messages or not */
}

/* FNV-1a over the positions' topics, partitions and offsets: tells
 * whether any moved since the last snapshot. */
static uint64_t positions_hash(const tly_position_t *pos, size_t n)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < n; i++) {
        int64_t nums[2] = {pos[i].partition, pos[i].offset};
        const unsigned char *b = (const unsigned char *)nums;
        for (const char *t = pos[i].topic; *t != '\0'; t++)
            h = (h ^ (unsigned char)*t) * UINT64_C(0x100000001b3);
        h = (h ^ 0xff) * UINT64_C(0x100000001b3); /* the topic's end */
        for (size_t k = 0; k < sizeof nums; k++)
            h = (h ^ b[k]) * UINT64_C(0x100000001b3);
    }
    return h;
}

/* The poll thread's hook: reaps a finished writer, starts a due one. */
static void checkpoint(void *ctx, tly_source_t *src)
{
    tly_snapshotter_t *sn = ctx;
    reap(sn, src, false);
    int64_t now = wall_ms();
    if (sn->child > 0 || now < sn->next_due_ms)
        return;
    sn->next_due_ms = now + sn->cfg->snapshot.every_ms;
    if (tly_source_catching_up(src))
        return; /* rebuilt features still below the restored position */
    tly_source_stats_t st;
    tly_source_stats(src, &st, NULL, 0);
    size_t n = tly_source_positions(src, NULL, 0);
    if (n > MAX_POSITIONS)
        n = MAX_POSITIONS;
    tly_position_t *pos = xmalloc((n ? n : 1) * sizeof *pos);
    size_t npos = tly_source_positions(src, pos, n);
    if (npos > n)
        npos = n;
    uint64_t ph = positions_hash(pos, npos);
    /* Nothing new since the last one: no message, no assignment change (the
     * partitions lost are gone from the state and the positions), and no
     * position moved without a message (past transaction markers or an
     * aborted transaction: the state is the same, but only a snapshot
     * commits the new position, and lag tools would show the old one). */
    if (st.messages == sn->last_messages && st.rebalances == sn->last_rebalances &&
        ph == sn->last_positions && sn->st.written > 0) {
        free(pos);
        return;
    }
    free(sn->pending);
    sn->pending = pos;
    sn->npending = npos;
    sn->child_created_ms = next_name_ms(sn, now);
    sn->child_started_ms = now;
    if (sn->child_err != NULL)
        sn->child_err[0] = '\0';
    /* no writer of ours is running: a temp file left by one that was
     * killed goes before this one needs the room */
    clean_tmp(sn);
    pid_t parent = getpid();
    int64_t t0 = mono_us();
    pid_t pid = fork();
    if (pid == 0)
        child_main(sn, parent);
    int64_t pause = mono_us() - t0;
    if (pid < 0) {
        char why[96];
        snprintf(why, sizeof why, "cannot start the writer: fork: %s", strerror(errno));
        note_failed(sn, why);
        return;
    }
    sn->child = pid;
    sn->last_messages = st.messages;
    sn->last_rebalances = st.rebalances;
    sn->last_positions = ph;
    pthread_mutex_lock(&sn->mu);
    sn->st.in_progress = true;
    sn->st.last_pause_us = pause;
    if (pause > sn->st.max_pause_us)
        sn->st.max_pause_us = pause;
    pthread_mutex_unlock(&sn->mu);
}

/* ---- life cycle ----------------------------------------------------------------- */

tly_snapshotter_t *tly_snapshot_new(const tly_config_t *cfg)
{
    if (cfg->snapshot.dir == NULL || cfg->snapshot.dir[0] == '\0')
        return NULL;
    if (strcmp(cfg->kafka.brokers, "embedded") == 0) {
        tly_info("snapshot: off with the embedded cluster (it holds only this run's events)");
        return NULL;
    }
    tly_snapshotter_t *sn = calloc(1, sizeof *sn);
    if (sn == NULL) {
        fputs("tallyd: out of memory\n", stderr);
        abort();
    }
    sn->cfg = cfg;
    sn->defs_hash = tly_snapshot_defs_hash(cfg);
    sn->feat_hash = xmalloc(sizeof *sn->feat_hash * cfg->nfeatures);
    uint64_t acceptance = acceptance_hash(cfg);
    for (size_t i = 0; i < cfg->nfeatures; i++)
        sn->feat_hash[i] = feature_hash(cfg, acceptance, i);
    for (size_t i = 0; i < cfg->nfeatures; i++) {
        const char *e = cfg->features[i].entity;
        size_t t = 0;
        while (t < sn->ntypes && strcmp(sn->type_name[t], e) != 0)
            t++;
        if (t == sn->ntypes && t < MAX_ETYPES) {
            sn->type_name[t] = e;
            sn->type_hash[t] = features_hash(cfg, e);
            sn->ntypes++;
        }
    }
    sn->st.last_ms = -1;
    sn->st.loaded_ms = -1;
    sn->next_due_ms = wall_ms() + cfg->snapshot.every_ms;
    void *m = mmap(NULL, ERR_CAP, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    sn->child_err = m != MAP_FAILED ? m : NULL;
    pthread_mutex_init(&sn->mu, NULL);
    return sn;
}

/* Reads the positions block. */
static bool read_positions(tly_snapshotter_t *sn, const uint8_t *p, size_t len)
{
    if (len < 4)
        return false;
    uint64_t n = get_le(p, 4);
    if (n > MAX_POSITIONS)
        return false;
    tly_position_t *pos = xmalloc((size_t)n * sizeof *pos);
    size_t at = 4;
    for (uint64_t i = 0; i < n; i++) {
        if (len - at < 2) {
            free(pos);
            return false;
        }
        size_t tl = (size_t)get_le(p + at, 2);
        if (tl == 0 || tl >= sizeof pos[i].topic || len - at - 2 < tl + 20) {
            free(pos);
            return false;
        }
        memcpy(pos[i].topic, p + at + 2, tl);
        pos[i].topic[tl] = '\0';
        at += 2 + tl;
        pos[i].partition = (int32_t)(uint32_t)get_le(p + at, 4);
        pos[i].offset = (int64_t)get_le(p + at + 4, 8);
        pos[i].last_event_ms = (int64_t)get_le(p + at + 12, 8);
        at += 20;
        if (pos[i].partition < 0 || pos[i].offset < 0 || pos[i].last_event_ms < -1) {
            free(pos);
            return false;
        }
    }
    free(sn->restored);
    sn->restored = pos;
    sn->nrestored = (size_t)n;
    return at == len;
}

/* Checks the entity types block (the writer's type names and the hash of
 * each one's features; the state's layout items say which features load). */
static bool read_types(const uint8_t *p, size_t len)
{
    if (len < 4)
        return false;
    uint64_t n = get_le(p, 4);
    if (n > MAX_ETYPES)
        return false;
    size_t at = 4;
    for (uint64_t i = 0; i < n; i++) {
        if (len - at < 2)
            return false;
        size_t nl = (size_t)get_le(p + at, 2);
        if (len - at - 2 < nl + 8)
            return false;
        at += 2 + nl + 8;
    }
    return at == len;
}

/* Loads one file into a new store; NULL with err filled when unusable. */
/* Loads path into a new store. NULL with err set when the file is unusable,
 * and *outdated set when that is because it was written for other
 * definitions of every feature (not damage). */
static tly_store_t *load_file(tly_snapshotter_t *sn, const tly_featset_t *fs, const char *path,
                              bool *outdated, char *err, size_t errlen)
{
    *outdated = false;
    tly_snapr_t *r = tly_snapr_open(path, err, errlen);
    if (r == NULL)
        return NULL;
    sn->partial = tly_snapr_defs_hash(r) != sn->defs_hash;
    tly_store_t *store = tly_store_new(fs);
    bool positions = false, types = false;
    for (;;) {
        uint32_t type = 0; /* set when rc > 0 */
        const void *data = NULL;
        size_t len = 0;
        int rc = tly_snapr_next(r, &type, &data, &len, err, errlen);
        if (rc == 0 && positions)
            break;
        if (rc == 0) {
            snprintf(err, errlen, "%s: no positions block", path);
            goto bad;
        }
        if (rc < 0)
            goto bad;
        if (type == BLOCK_ETYPES) {
            if (types || !read_types(data, len)) {
                snprintf(err, errlen, "%s: malformed entity types block", path);
                goto bad;
            }
            types = true;
        } else if (!types) {
            snprintf(err, errlen, "%s: no entity types block first", path);
            goto bad;
        } else if (type == BLOCK_POSITIONS) {
            if (positions || !read_positions(sn, data, len)) {
                snprintf(err, errlen, "%s: malformed positions block", path);
                goto bad;
            }
            positions = true;
        } else if (type == BLOCK_STATE) {
            char why[ERR_CAP];
            if (tly_store_load(store, data, len, sn->partial ? sn->feat_hash : NULL, why,
                               sizeof why) != TLY_OK) {
                snprintf(err, errlen, "%s: %s", path, why);
                goto bad;
            }
        } else {
            snprintf(err, errlen, "%s: unknown block type %" PRIu32, path, type);
            goto bad;
        }
    }
    size_t restored = 0;
    for (size_t f = 0; f < fs->nfeats; f++)
        restored += tly_store_restored(store, (uint32_t)f);
    if (restored == 0) {
        snprintf(err, errlen, "%s: written for other definitions of every feature", path);
        *outdated = true;
        goto bad;
    }
    pthread_mutex_lock(&sn->mu);
    sn->st.loaded_ms = tly_snapr_created(r);
    pthread_mutex_unlock(&sn->mu);
    tly_snapr_close(r);
    return store;
bad:
    tly_snapr_close(r);
    tly_store_free(store);
    free(sn->restored);
    sn->restored = NULL;
    sn->nrestored = 0;
    return NULL;
}

tly_store_t *tly_snapshot_restore(tly_snapshotter_t *sn, const tly_featset_t *fs)
{
    char **paths = NULL;
    size_t n = tly_snap_list(sn->cfg->snapshot.dir, &paths);
    tly_store_t *store = NULL;
    for (size_t i = 0; i < n && store == NULL; i++) {
        char err[768] = "";
        int64_t t0 = mono_us();
        bool outdated;
        store = load_file(sn, fs, paths[i], &outdated, err, sizeof err);
        if (store == NULL) {
            pthread_mutex_lock(&sn->mu);
            if (outdated)
                sn->st.outdated++;
            else
                sn->st.rejected++;
            pthread_mutex_unlock(&sn->mu);
            tly_log(outdated ? TLY_LOG_INFO : TLY_LOG_WARN, "snapshot: %s; %s", err,
                    i + 1 < n ? "trying the next older one" : "rebuilding from Kafka history");
            continue;
        }
        tly_store_stats_t st;
        tly_store_stats(store, &st);
        pthread_mutex_lock(&sn->mu);
        sn->st.loaded_entities = st.entities;
        for (size_t e = 0; e < fs->nentities && e < 64; e++) {
            const tly_entity_t *et = &fs->entities[e];
            size_t kept = 0;
            for (size_t k = 0; k < et->nfeats; k++) {
                if (tly_store_restored(store, et->feats[k]))
                    kept++;
                else
                    sn->st.rebuilt_feats[et->feats[k] / 64] |= UINT64_C(1) << (et->feats[k] % 64);
            }
            if (kept == et->nfeats)
                sn->st.restored_types |= UINT64_C(1) << e;
            else if (kept == 0)
                sn->st.rebuilt_types |= UINT64_C(1) << e;
        }
        pthread_mutex_unlock(&sn->mu);
        tly_info("snapshot: restored %" PRIu64 " entities and %zu partition positions from %s "
                 "in %.1f ms",
                 st.entities, sn->nrestored, paths[i], (double)(mono_us() - t0) / 1000.0);
        for (size_t f = 0; sn->partial && f < fs->nfeats; f++)
            if (!tly_store_restored(store, (uint32_t)f))
                tly_info("snapshot: feature %s.%s rebuilt from Kafka history (new or changed "
                         "since the snapshot)",
                         fs->entities[fs->feats[f].entity].name, fs->feats[f].name);
    }
    if (n == 0)
        tly_info("snapshot: none in %s; rebuilding from Kafka history", sn->cfg->snapshot.dir);
    tly_snap_list_free(paths);
    return store;
}

void tly_snapshot_attach(tly_snapshotter_t *sn, tly_store_t *store, tly_source_t *src)
{
    sn->store = store;
    /* With every feature restored (features only removed or reordered)
     * nothing needs history: resume as after an unchanged restart. */
    bool rebuild = false;
    for (size_t f = 0; sn->partial && f < sn->cfg->nfeatures; f++)
        rebuild = rebuild || !tly_store_restored(store, (uint32_t)f);
    for (size_t i = 0; i < sn->nrestored; i++)
        if ((rebuild ? tly_source_catch_up(src, sn->restored[i].topic, sn->restored[i].partition,
                                           sn->restored[i].offset, sn->restored[i].last_event_ms)
                     : tly_source_resume_at(src, sn->restored[i].topic, sn->restored[i].partition,
                                            sn->restored[i].offset,
                                            sn->restored[i].last_event_ms)) != TLY_OK)
            tly_warn("snapshot: cannot resume %s[%" PRId32 "] at %" PRId64, sn->restored[i].topic,
                     sn->restored[i].partition, sn->restored[i].offset);
    tly_source_set_checkpoint(src, checkpoint, sn);
}

tly_err_t tly_snapshot_final(tly_snapshotter_t *sn, tly_source_t *src)
{
    if (sn->child > 0) {
        /* The poll thread has ended, and with it (PR_SET_PDEATHSIG) a
         * periodic writer still running: the final snapshot replaces it. */
        int status;
        while (waitpid(sn->child, &status, 0) < 0 && errno == EINTR)
            ;
        sn->child = 0;
        pthread_mutex_lock(&sn->mu);
        sn->st.in_progress = false;
        pthread_mutex_unlock(&sn->mu);
    }
    if (tly_source_catching_up(src)) {
        tly_warn("snapshot: no final snapshot: the changed features were still being rebuilt "
                 "from history; the previous snapshot stays and is used again next time");
        return TLY_OK;
    }
    size_t n = tly_source_positions(src, NULL, 0);
    if (n > MAX_POSITIONS)
        n = MAX_POSITIONS;
    tly_position_t *pos = xmalloc(n * sizeof *pos);
    size_t got = tly_source_positions(src, pos, n);
    n = got < n ? got : n;
    char err[ERR_CAP] = "", path[512] = "";
    uint64_t bytes = 0;
    clean_tmp(sn);
    int64_t created = next_name_ms(sn, wall_ms()), t0 = mono_us();
    tly_err_t rc =
        write_snapshot(sn, sn->store, pos, n, created, path, sizeof path, &bytes, err, sizeof err);
    if (rc == TLY_OK) {
        int64_t took = (mono_us() - t0) / 1000;
        tly_source_stats_t sst;
        tly_source_stats(src, &sst, NULL, 0);
        note_written(sn, created, took, bytes, path, sst.rebalances);
        tly_info("snapshot: final snapshot %s (%zu partitions, %.1f MB before compression) "
                 "in %" PRId64 " ms",
                 path, n, (double)bytes / 1e6, took);
        tly_source_commit(src, pos, n);
        tly_snap_prune(sn->cfg->snapshot.dir, (size_t)sn->cfg->snapshot.keep, created);
    } else {
        note_failed(sn, err);
    }
    free(pos);
    return rc;
}

void tly_snapshot_free(tly_snapshotter_t *sn)
{
    if (sn == NULL)
        return;
    if (sn->child > 0) {
        int status;
        while (waitpid(sn->child, &status, 0) < 0 && errno == EINTR)
            ;
    }
    free(sn->pending);
    free(sn->restored);
    free(sn->feat_hash);
    if (sn->child_err != NULL)
        munmap(sn->child_err, ERR_CAP);
    pthread_mutex_destroy(&sn->mu);
    free(sn);
}

void tly_snapshot_stats(tly_snapshotter_t *sn, tly_snapshot_stats_t *st)
{
    pthread_mutex_lock(&sn->mu);
    *st = sn->st;
    pthread_mutex_unlock(&sn->mu);
}
