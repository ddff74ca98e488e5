/*
 * ingest.c — how fast tallyd turns event payloads into state, next to the
 * peer it has to keep up with: a bare librdkafka consumer.
 *
 * One run generates N JSON events shaped like the demo stream (config/
 * demo.yaml: Zipf-ish users and pins, impressions ≫ closeups > clicks >
 * saves > hides, dwell_ms on most events, epoch-ms ts within the last minute)
 * into memory, then measures, each row best of --reps runs (default 3):
 *
 *   a. jsmn_parse alone (a JSON tokeniser library: token boundaries only, no
 *      grammar check, no values), with decode's token cap, for reference;
 *   b. tly_decode_json (grammar check, extraction, event time);
 *   c. tly_decode_json + tly_store_apply_hinted on one RCU-registered writer
 *      thread, into a fresh store per run;
 *   d. the same on two writer threads sharing one store, events split by
 *      user_id parity as a user-keyed topic's partitions would split them;
 *      events/s = N / wall time of the slower thread;
 *   e. a bare consumer: librdkafka's mock cluster in-process, the same
 *      payloads produced keyed by user_id (not timed), then a consumer that
 *      only polls and destroys until it has seen every message;
 *   f, g. tly_apply_batch, the appliers of tallyd's Kafka source, with 1 and
 *      2 threads, on the stream in batches of 4096 from one partition (with 2
 *      threads each batch is shared by entity, apply.c);
 *   h. the same batches pipelined (tly_apply_stage/submit/wait) with 2
 *      threads: the benchmark's thread decodes a batch (and fills the
 *      next) while the worker applies the one before, as the source's
 *      poll thread does while it polls.
 *
 * and splits one writer's cost into parse (row b), lookup (tly_store_read
 * with no feature requests on each event's user and pin id, after apply,
 * hinted two events ahead as row c hints them: the table probe and seqlock,
 * plus any per-record work the store does before serving requests) and
 * update (row c − parse − lookup). The same lookups unhinted are printed
 * beside it for reference.
 *
 * Every apply row is checked against a ground truth counted while
 * generating (clicks:7d and dwell:1d of every user, impressions:1d of every
 * pin), so a faster number can never come from doing less work. Every run
 * also reports the CPUs other processes used meanwhile (/proc/stat), since
 * a shared machine makes numbers that only look like results.
 *
 * Apply uses one fixed `now` (max ts + 1 s): no event is late or future.
 * Threads: the main thread runs everything but row d's two writers and
 * librdkafka's own threads in row e; every thread that touches a store is
 * registered with RCU first.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

/* jsmn as decode.c built it before it scanned payloads itself: static, with
 * parent links. */
#define JSMN_STATIC
#define JSMN_PARENT_LINKS
#include <jsmn.h>

#include "tallyd/apply.h"
#include "tallyd/config.h"
#include "tallyd/decode.h"
#include "tallyd/feature.h"
#include "tallyd/rcu.h"
#include "tallyd/store.h"

#include "bench_gen.h"
#include "bench_proc.h"

#define DEFAULT_EVENTS 2000000u
#define QUICK_EVENTS   200000u
#define MAX_EVENTS     50000000u
#define DEFAULT_REPS   3
/* Row e's mock cluster: librdkafka keeps one fetch in flight per broker, so
 * a one-broker cluster caps the consumer near 1M msg/s on a 2-core machine;
 * with three brokers (a usual production minimum) it runs at full speed. */
#define DEFAULT_BROKERS 3

/* Zipf exponents of the generated stream: users are active at very
 * different rates, pins follow the heavy popularity tail of content. */
#define USER_ZIPF_S 0.7
#define PIN_ZIPF_S  1.0

/* The mock cluster keeps at most 5 MiB (and 100,000 batches) per partition
 * and silently drops the oldest batches beyond that; stay well under. */
#define MOCK_PART_BUDGET     (4u * 1024 * 1024)
#define MOCK_RECORD_OVERHEAD 24 /* record framing per message, generous */
#define MOCK_MAX_PARTS       256
#define KAFKA_TOPIC          "engagements"
#define KAFKA_DEADLINE_NS    (INT64_C(180) * 1000000000)

enum { ACT_IMPRESSION, ACT_CLOSEUP, ACT_CLICK, ACT_SAVE, ACT_HIDE, ACT__COUNT };
static const char *const action_names[ACT__COUNT] = {"impression", "closeup", "click", "save",
                                                     "hide"};
/* Cumulative percentages: 70 / 15 / 9 / 4 / 2. */
static const unsigned action_cum[ACT__COUNT] = {70, 85, 94, 98, 100};

typedef enum {
    ROW_JSMN,
    ROW_DECODE,
    ROW_APPLY1,
    ROW_APPLY2,
    ROW_KAFKA,
    ROW_BATCH1,
    ROW_BATCH2,
    ROW_PIPE2,
    ROW_STEADY1,
    ROW_STEADY2,
    ROW__COUNT
} row_id_t;

static const char *const row_names[ROW__COUNT] = {
    "a. jsmn parse only",
    "b. decode (tly_decode_json)",
    "c. decode+apply, 1 writer",
    "d. decode+apply, 2 writers",
    "e. bare librdkafka consumer",
    "f. tly_apply_batch, 1 thread",
    "g. tly_apply_batch, 2 threads",
    "h. pipelined, 2 threads",
    "i. steady state, 1 writer",
    "j. steady state, 2 writers",
};
static const char *const row_keys[ROW__COUNT] = {"jsmn",    "decode", "apply1", "apply2",
                                                 "kafka",   "batch1", "batch2", "pipe2",
                                                 "steady1", "steady2"};

typedef struct {
    size_t nevents;
    int reps;
    int brokers; /* mock cluster brokers of row e */
    const char *config;
    bool only[ROW__COUNT + 1]; /* [ROW__COUNT]: the cost split */
    bool any_only;
    bool verify;
    bool ordered;         /* ts rise in stream order instead of random in the minute */
    const char *perf_ctl; /* perf record --control fifo paths, or NULL */
    const char *perf_ack;
} opts_t;

/* A measured row: best wall time over the runs, and the N it used. */
typedef struct {
    bool done;
    size_t n;      /* events the row handled */
    size_t ntimed; /* events inside the timed interval (n, or n - 1 for row e) */
    int64_t best_ns;
    double others; /* CPUs other processes kept busy during the best run */
    char note[256];
} row_t;

/* The generated stream and what a correct store must hold after it. */
typedef struct {
    size_t n;
    char *arena; /* payloads back to back */
    size_t *off; /* payload i is arena[off[i] .. off[i] + len[i]) */
    uint32_t *len;
    uint32_t *user; /* user_id of event i */
    uint32_t *pin;  /* pin_id of event i */
    int64_t max_ts;
    int64_t gen_ms; /* wall clock at generation */
    uint64_t users, pins;
    uint32_t *gt_clicks; /* [users + 1]: click events per user */
    int64_t *gt_dwell;   /* [users + 1]: dwell_ms summed per user */
    uint32_t *gt_impr;   /* [pins + 1]: impression events per pin */
    size_t nactions[ACT__COUNT];
    size_t ndwell;
    size_t bytes;
} stream_t;

/* Entity ids rendered in advance for the lookup measurement. */
typedef struct {
    char user[12], pin[12];
    uint8_t ulen, plen;
} ids_t;

typedef struct {
    const tly_featset_t *fs;
    int user_ent, pin_ent;
    bool can_verify;
    tly_featwin_t clicks7d, dwell1d, impr1d;
} feats_t;

static volatile long sink; /* keeps row a's results alive */

/* ---- small helpers ------------------------------------------------------ */

static void die(const char *what)
{
    fprintf(stderr, "ingest: %s\n", what);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        fprintf(stderr, "ingest: out of memory allocating %zu bytes\n", n);
        exit(2);
    }
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "ingest: out of memory allocating %zu x %zu bytes\n", n, size);
        exit(2);
    }
    return p;
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CPU time of the whole process, all threads. */
static int64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Formats v with thousands separators into buf. */
static const char *fmt_count(double v, char *buf, size_t cap)
{
    char digits[32];
    snprintf(digits, sizeof digits, "%.0f", v < 0 ? 0 : v);
    size_t n = strlen(digits), o = 0;
    for (size_t i = 0; i < n && o + 2 < cap; i++) {
        if (i > 0 && (n - i) % 3 == 0)
            buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o] = '\0';
    return buf;
}

/* ---- seeded generator ----------------------------------------------------- */

static void stream_generate(stream_t *sm, size_t n, bool ordered, const tly_config_t *cfg)
{
    rng_t r;
    zipf_t zu, zp;

    memset(sm, 0, sizeof *sm);
    sm->n = n;
    sm->users = (uint64_t)cfg->demo.users;
    sm->pins = (uint64_t)cfg->demo.pins;
    rng_seed(&r, (uint64_t)cfg->demo.seed);
    zipf_init(&zu, sm->users, USER_ZIPF_S);
    zipf_init(&zp, sm->pins, PIN_ZIPF_S);

    size_t cap = n * 112 + 256;
    sm->arena = xmalloc(cap);
    sm->off = xmalloc(n * sizeof *sm->off);
    sm->len = xmalloc(n * sizeof *sm->len);
    sm->user = xmalloc(n * sizeof *sm->user);
    sm->pin = xmalloc(n * sizeof *sm->pin);
    sm->gt_clicks = xcalloc(sm->users + 1, sizeof *sm->gt_clicks);
    sm->gt_dwell = xcalloc(sm->users + 1, sizeof *sm->gt_dwell);
    sm->gt_impr = xcalloc(sm->pins + 1, sizeof *sm->gt_impr);
    sm->gen_ms = wall_ms();
    sm->max_ts = 0;

    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t user = rank_to_id(zipf_draw(&zu, &r), sm->users);
        uint64_t pin = rank_to_id(zipf_draw(&zp, &r), sm->pins);
        unsigned roll = (unsigned)rng_below(&r, 100), act = 0;
        while (roll >= action_cum[act])
            act++;
        /* Hides carry no dwell; other events do, 92% of the time. */
        int64_t dwell = -1;
        if (act != ACT_HIDE && rng_below(&r, 100) < 92) {
            static const int64_t lo[ACT__COUNT] = {200, 1000, 500, 500, 0};
            static const int64_t span[ACT__COUNT] = {2800, 59000, 19500, 19500, 1};
            dwell = lo[act] + (int64_t)rng_below(&r, (uint64_t)span[act]);
        }
        /* Within the last minute: uniformly at random (each entity sees its
         * events out of order), or with --ordered rising through the minute
         * in stream order (a time-ordered topic). */
        int64_t ts = ordered ? sm->gen_ms - 60000 + (int64_t)((uint64_t)i * 60000 / n)
                             : sm->gen_ms - (int64_t)rng_below(&r, 60001);

        char *p = sm->arena + used;
        size_t room = cap - used;
        int w;
        if (dwell >= 0)
            w = snprintf(p, room,
                         "{\"user_id\": %" PRIu64 ", \"pin_id\": %" PRIu64
                         ", \"action\": \"%s\", \"dwell_ms\": %" PRId64 ", \"ts\": %" PRId64 "}",
                         user, pin, action_names[act], dwell, ts);
        else
            w = snprintf(p, room,
                         "{\"user_id\": %" PRIu64 ", \"pin_id\": %" PRIu64
                         ", \"action\": \"%s\", \"ts\": %" PRId64 "}",
                         user, pin, action_names[act], ts);
        if (w < 0 || (size_t)w >= room)
            die("payload arena too small (generator bug)");
        sm->off[i] = used;
        sm->len[i] = (uint32_t)w;
        used += (size_t)w;
        sm->user[i] = (uint32_t)user;
        sm->pin[i] = (uint32_t)pin;
        if (ts > sm->max_ts)
            sm->max_ts = ts;
        sm->nactions[act]++;
        if (act == ACT_CLICK)
            sm->gt_clicks[user]++;
        if (act == ACT_IMPRESSION)
            sm->gt_impr[pin]++;
        if (dwell >= 0) {
            sm->gt_dwell[user] += dwell;
            sm->ndwell++;
        }
    }
    sm->bytes = used;
    free(zu.cdf);
    free(zp.cdf);
}

static void stream_free(stream_t *sm)
{
    free(sm->arena);
    free(sm->off);
    free(sm->len);
    free(sm->user);
    free(sm->pin);
    free(sm->gt_clicks);
    free(sm->gt_dwell);
    free(sm->gt_impr);
}

/* ---- perf control --------------------------------------------------------- */

/* With --perf-ctl, `perf record --control fifo:CTL[,ACK] -D -1` samples only
 * between these calls: the timed loop of the selected rows. */
static void perf_ctl(const opts_t *o, const char *cmd)
{
    if (o->perf_ctl == NULL)
        return;
    FILE *f = fopen(o->perf_ctl, "w");
    if (f == NULL) {
        fprintf(stderr, "ingest: cannot open perf control fifo %s: %s\n", o->perf_ctl,
                strerror(errno));
        exit(2);
    }
    fprintf(f, "%s\n", cmd);
    fclose(f);
    if (o->perf_ack != NULL) {
        char ack[16];
        FILE *a = fopen(o->perf_ack, "r");
        if (a != NULL) {
            if (fgets(ack, sizeof ack, a) == NULL)
                ack[0] = '\0';
            fclose(a);
        }
    }
}

/* ---- rows a, b: parsing ------------------------------------------------------- */

static int64_t run_jsmn(const stream_t *sm)
{
    jsmntok_t toks[TLY_DECODE_MAX_TOKENS];
    long total = 0;
    int64_t t0 = mono_ns();
    for (size_t i = 0; i < sm->n; i++) {
        jsmn_parser p;
        jsmn_init(&p);
        total += jsmn_parse(&p, sm->arena + sm->off[i], sm->len[i], toks, TLY_DECODE_MAX_TOKENS);
    }
    int64_t dt = mono_ns() - t0;
    sink = total;
    return dt;
}

static int64_t run_decode(const stream_t *sm, const tly_featset_t *fs, size_t *errors)
{
    tly_decoder_t *dec = tly_decoder_new(fs);
    tly_event_t ev;
    size_t bad = 0;
    int64_t t0 = mono_ns();
    for (size_t i = 0; i < sm->n; i++)
        bad += tly_decode_json(dec, sm->arena + sm->off[i], sm->len[i], -1, &ev) != TLY_OK;
    int64_t dt = mono_ns() - t0;
    tly_decoder_free(dec);
    *errors = bad;
    return dt;
}

/* ---- rows c, d: decode + apply ------------------------------------------------ */

typedef struct {
    const stream_t *sm;
    const tly_featset_t *fs;
    tly_store_t *store;
    const uint32_t *idx; /* events of this writer, in stream order; NULL = all */
    size_t n;
    int32_t partition;
    int64_t now_ms;
    pthread_barrier_t *start;
    int passes;           /* runs of the loop over the same events; the last is timed */
    const opts_t *perf;   /* set: turns perf sampling on before the last pass */
    int64_t ns;           /* out: time of the loop */
    size_t decode_errors; /* out */
    size_t apply_errors;  /* out */
} writer_t;

/* Decodes two events ahead of the one it applies, as tallyd's source does:
 * the event two ahead gets its table slots prefetched, the next one its
 * records (tly_store_prefetch), so their cache misses overlap this apply.
 * Like the source's appliers, which hold one RCU read-side section per batch
 * list (at most 4096 messages), it holds one per BATCH events. */
#define AHEAD 2
#define BATCH 4096

static void writer_loop(writer_t *w)
{
    const stream_t *sm = w->sm;
    tly_decoder_t *dec[AHEAD + 1];
    tly_event_t ev[AHEAD + 1];
    tly_prefetch_t pf[AHEAD + 1];
    bool ok[AHEAD + 1];
    size_t at[AHEAD + 1];
    for (int d = 0; d <= AHEAD; d++)
        dec[d] = tly_decoder_new(w->fs);
    size_t bad_dec = 0, bad_apply = 0;
    int64_t t0 = mono_ns();
    for (size_t k = 0; k < w->n + AHEAD; k++) {
        if (k % BATCH == 0) {
            if (k > 0)
                tly_rcu_read_unlock();
            tly_rcu_read_lock();
        }
        if (k < w->n) { /* decode event k, hint its slots */
            int r = (int)(k % (AHEAD + 1));
            size_t i = w->idx ? w->idx[k] : k;
            at[r] = i;
            ok[r] =
                tly_decode_json(dec[r], sm->arena + sm->off[i], sm->len[i], -1, &ev[r]) == TLY_OK;
            if (ok[r])
                tly_store_prefetch(w->store, &ev[r], &pf[r]);
            else
                bad_dec++;
        }
        if (k >= 1 && k - 1 < w->n) { /* hint the records of event k - 1 */
            int r = (int)((k - 1) % (AHEAD + 1));
            if (ok[r])
                tly_store_prefetch_records(w->store, &pf[r]);
        }
        if (k >= AHEAD) { /* apply event k - AHEAD */
            int r = (int)((k - AHEAD) % (AHEAD + 1));
            size_t i = at[r];
            if (!ok[r])
                continue;
            int32_t part = w->partition >= 0 ? w->partition : (int32_t)(sm->user[i] & 1);
            bad_apply += tly_store_apply_hinted(w->store, &ev[r], &pf[r], part, (int64_t)i,
                                                w->now_ms) != TLY_OK;
        }
    }
    tly_rcu_read_unlock();
    w->ns = mono_ns() - t0;
    w->decode_errors = bad_dec;
    w->apply_errors = bad_apply;
    for (int d = 0; d <= AHEAD; d++)
        tly_decoder_free(dec[d]);
}

static void *writer_main(void *arg)
{
    writer_t *w = arg;
    tly_rcu_thread_online();
    for (int p = 0; p < w->passes; p++) {
        /* every pass starts together: the timed one meets a store both
         * writers filled */
        pthread_barrier_wait(w->start);
        if (p == w->passes - 1 && w->perf != NULL)
            perf_ctl(w->perf, "enable");
        writer_loop(w);
    }
    tly_rcu_thread_offline();
    return NULL;
}

/* Checks the store against the stream's ground truth. Returns the number of
 * mismatches (the first few are printed). Main thread, RCU-registered. */
static size_t verify_store(tly_store_t *store, const stream_t *sm, const feats_t *ft,
                           int64_t now_ms, int passes, const char *label)
{
    size_t bad = 0;
    char id[24];
    if (!ft->can_verify)
        return 0;
    for (uint64_t u = 1; u <= sm->users; u++) {
        tly_featwin_t req[2] = {ft->clicks7d, ft->dwell1d};
        tly_value_t out[2];
        int len = snprintf(id, sizeof id, "%" PRIu64, u);
        tly_err_t err = tly_store_read(store, (uint32_t)ft->user_ent, id, (size_t)len, req, 2,
                                       now_ms, out, NULL, NULL, 0);
        bool ok = err == TLY_OK && out[0].type == TLY_V_INT &&
                  out[0].u.i == passes * (int64_t)sm->gt_clicks[u] && out[1].type == TLY_V_INT &&
                  out[1].u.i == passes * sm->gt_dwell[u];
        if (!ok && bad++ < 5)
            fprintf(stderr,
                    "ingest: %s: user %s: clicks:7d %" PRId64 " (want %" PRId64
                    "), dwell:1d %" PRId64 " (want %" PRId64 "), err %s\n",
                    label, id, out[0].u.i, passes * (int64_t)sm->gt_clicks[u], out[1].u.i,
                    passes * sm->gt_dwell[u], tly_err_name(err));
    }
    for (uint64_t p = 1; p <= sm->pins; p++) {
        tly_value_t out;
        int len = snprintf(id, sizeof id, "%" PRIu64, p);
        tly_err_t err = tly_store_read(store, (uint32_t)ft->pin_ent, id, (size_t)len, &ft->impr1d,
                                       1, now_ms, &out, NULL, NULL, 0);
        int64_t want = passes * (int64_t)sm->gt_impr[p];
        if ((err != TLY_OK || out.type != TLY_V_INT || out.u.i != want) && bad++ < 5)
            fprintf(stderr, "ingest: %s: pin %s: impressions:1d %" PRId64 " (want %" PRId64 ")\n",
                    label, id, out.u.i, want);
    }
    return bad;
}

/* Rows c and i: `passes` runs of the stream into one fresh store, the last
 * timed (and sampled, with --perf-ctl); returns the store (caller frees). */
static tly_store_t *run_apply1(const stream_t *sm, const tly_featset_t *fs, int64_t now_ms,
                               int passes, const opts_t *o, int64_t *ns, size_t *errors)
{
    tly_store_t *store = tly_store_new(fs);
    writer_t w = {.sm = sm,
                  .fs = fs,
                  .store = store,
                  .idx = NULL,
                  .n = sm->n,
                  .partition = -1,
                  .now_ms = now_ms};
    *errors = 0;
    for (int p = 0; p < passes; p++) {
        if (p == passes - 1)
            perf_ctl(o, "enable");
        writer_loop(&w);
        *errors += w.decode_errors + w.apply_errors;
    }
    *ns = w.ns;
    return store;
}

/* Rows d and j: `passes` runs of two writers on one fresh store, the last
 * timed. */
static tly_store_t *run_apply2(const stream_t *sm, const tly_featset_t *fs, int64_t now_ms,
                               uint32_t *const idx[2], const size_t nidx[2], int passes,
                               const opts_t *o, int64_t *ns, size_t *errors, int64_t thread_ns[2])
{
    tly_store_t *store = tly_store_new(fs);
    pthread_barrier_t start;
    pthread_t th[2];
    writer_t w[2];

    pthread_barrier_init(&start, NULL, 2);
    for (int t = 0; t < 2; t++) {
        w[t] = (writer_t){.sm = sm,
                          .fs = fs,
                          .store = store,
                          .idx = idx[t],
                          .n = nidx[t],
                          .partition = t,
                          .now_ms = now_ms,
                          .start = &start,
                          .passes = passes,
                          .perf = t == 0 ? o : NULL};
        if (pthread_create(&th[t], NULL, writer_main, &w[t]) != 0)
            die("pthread_create failed");
    }
    for (int t = 0; t < 2; t++)
        pthread_join(th[t], NULL);
    pthread_barrier_destroy(&start);
    *ns = w[0].ns > w[1].ns ? w[0].ns : w[1].ns;
    *errors = w[0].decode_errors + w[0].apply_errors + w[1].decode_errors + w[1].apply_errors;
    thread_ns[0] = w[0].ns;
    thread_ns[1] = w[1].ns;
    return store;
}

/* Cost split: the store's find-only path on every event's two ids. hinted:
 * as the writer loop hints an event's entities, the ids two events ahead
 * get their table slots prefetched and those one ahead their records, so
 * the lookup costs what it costs inside row c; otherwise every probe
 * starts cold. */
static int64_t run_lookup(tly_store_t *store, const ids_t *ids, size_t n, const feats_t *ft,
                          int64_t now_ms, bool hinted, size_t *misses)
{
    size_t miss = 0;
    int64_t last;
    tly_prefetch_t pf[AHEAD + 1][2];
    int64_t t0 = mono_ns();
    size_t ahead = hinted ? AHEAD : 0;
    tly_rcu_read_lock(); /* the hints run inside one, renewed as the writer loop does */
    for (size_t k = 0; k < n + ahead; k++) {
        if (k % BATCH == BATCH - 1) {
            tly_rcu_read_unlock();
            tly_rcu_read_lock();
        }
        if (hinted && k < n) {
            int r = (int)(k % (AHEAD + 1));
            tly_store_prefetch_id(store, (uint32_t)ft->user_ent, ids[k].user, ids[k].ulen,
                                  &pf[r][0]);
            tly_store_prefetch_id(store, (uint32_t)ft->pin_ent, ids[k].pin, ids[k].plen, &pf[r][1]);
        }
        if (hinted && k >= 1 && k - 1 < n) {
            int r = (int)((k - 1) % (AHEAD + 1));
            tly_store_prefetch_records(store, &pf[r][0]);
            tly_store_prefetch_records(store, &pf[r][1]);
        }
        if (k < ahead)
            continue;
        size_t i = k - ahead;
        tly_store_read(store, (uint32_t)ft->user_ent, ids[i].user, ids[i].ulen, NULL, 0, now_ms,
                       NULL, &last, NULL, 0);
        miss += last < 0;
        tly_store_read(store, (uint32_t)ft->pin_ent, ids[i].pin, ids[i].plen, NULL, 0, now_ms, NULL,
                       &last, NULL, 0);
        miss += last < 0;
    }
    tly_rcu_read_unlock();
    int64_t dt = mono_ns() - t0;
    *misses = miss;
    return dt;
}

/* ---- row e: bare librdkafka consumer ----------------------------------------- */

static void conf_set(rd_kafka_conf_t *conf, const char *key, const char *value)
{
    char err[256];
    if (rd_kafka_conf_set(conf, key, value, err, sizeof err) != RD_KAFKA_CONF_OK) {
        fprintf(stderr, "ingest: librdkafka config %s=%s: %s\n", key, value, err);
        exit(2);
    }
}

static void delivery_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    if (m->err) {
        size_t *failed = opaque;
        if ((*failed)++ < 3)
            fprintf(stderr, "ingest: delivery failed: %s\n", rd_kafka_err2str(m->err));
    }
}

/* Chooses the partition count: the fewest (even, ≥ 2) partitions for which
 * partitioning by user_id mod P keeps every partition under the mock's
 * budget; when even MOCK_MAX_PARTS does not fit all N (one hot user is too
 * big), the longest prefix of the stream that fits. Writes *nparts, *nused. */
static void kafka_plan(const stream_t *sm, int *nparts, size_t *nused)
{
    uint64_t *load = xcalloc(MOCK_MAX_PARTS, sizeof *load);
    for (int p = 2; p <= MOCK_MAX_PARTS; p += 2) {
        memset(load, 0, MOCK_MAX_PARTS * sizeof *load);
        bool fits = true;
        for (size_t i = 0; i < sm->n && fits; i++) {
            uint64_t *l = &load[sm->user[i] % (uint32_t)p];
            *l += sm->len[i] + 7 + MOCK_RECORD_OVERHEAD;
            fits = *l <= MOCK_PART_BUDGET;
        }
        if (fits) {
            *nparts = p;
            *nused = sm->n;
            free(load);
            return;
        }
    }
    memset(load, 0, MOCK_MAX_PARTS * sizeof *load);
    size_t i = 0;
    for (; i < sm->n; i++) {
        uint64_t *l = &load[sm->user[i] % MOCK_MAX_PARTS];
        if (*l + sm->len[i] + 7 + MOCK_RECORD_OVERHEAD > MOCK_PART_BUDGET)
            break;
        *l += sm->len[i] + 7 + MOCK_RECORD_OVERHEAD;
    }
    *nparts = MOCK_MAX_PARTS;
    *nused = i;
    free(load);
}

/* Produces events [0, n) keyed by user_id into partition user_id mod nparts
 * and waits until all are delivered; then checks that the mock kept them
 * all (low watermark 0, high watermarks summing to n). */
static void kafka_produce(const stream_t *sm, const char *bootstraps, int nparts, size_t n)
{
    char err[256];
    size_t failed = 0;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", bootstraps);
    conf_set(conf, "linger.ms", "5");
    conf_set(conf, "batch.num.messages", "10000");
    conf_set(conf, "batch.size", "1000000");
    conf_set(conf, "queue.buffering.max.messages", "1000000");
    conf_set(conf, "queue.buffering.max.kbytes", "1048576");
    conf_set(conf, "acks", "1");
    conf_set(conf, "log.connection.close", "false");
    rd_kafka_conf_set_opaque(conf, &failed);
    rd_kafka_conf_set_dr_msg_cb(conf, delivery_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL) {
        fprintf(stderr, "ingest: cannot create producer: %s\n", err);
        exit(2);
    }
    for (size_t i = 0; i < n; i++) {
        char key[16];
        int klen = snprintf(key, sizeof key, "%" PRIu32, sm->user[i]);
        for (;;) {
            /* No copy: the payloads outlive the producer. */
            rd_kafka_resp_err_t e =
                rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(KAFKA_TOPIC),
                                  RD_KAFKA_V_PARTITION((int32_t)(sm->user[i] % (uint32_t)nparts)),
                                  RD_KAFKA_V_KEY(key, (size_t)klen),
                                  RD_KAFKA_V_VALUE(sm->arena + sm->off[i], sm->len[i]),
                                  RD_KAFKA_V_MSGFLAGS(0), RD_KAFKA_V_END);
            if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
                break;
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
                fprintf(stderr, "ingest: produce: %s\n", rd_kafka_err2str(e));
                exit(2);
            }
            rd_kafka_poll(rk, 10);
        }
        rd_kafka_poll(rk, 0);
    }
    if (rd_kafka_flush(rk, 120000) != RD_KAFKA_RESP_ERR_NO_ERROR || failed > 0) {
        fprintf(stderr, "ingest: producing to the mock cluster failed (%zu undelivered)\n", failed);
        exit(2);
    }
    int64_t total = 0;
    for (int p = 0; p < nparts; p++) {
        int64_t lo, hi;
        rd_kafka_resp_err_t e =
            rd_kafka_query_watermark_offsets(rk, KAFKA_TOPIC, p, &lo, &hi, 10000);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            fprintf(stderr, "ingest: watermarks of partition %d: %s\n", p, rd_kafka_err2str(e));
            exit(2);
        }
        if (lo != 0) {
            fprintf(stderr,
                    "ingest: the mock cluster dropped the first %" PRId64
                    " messages of partition %d (its retention is 5 MiB per partition)\n",
                    lo, p);
            exit(2);
        }
        total += hi;
    }
    if (total != (int64_t)n) {
        fprintf(stderr, "ingest: the mock holds %" PRId64 " messages, produced %zu\n", total, n);
        exit(2);
    }
    rd_kafka_destroy(rk);
}

/* One consumer run: assigns every partition at the beginning and polls
 * until n messages were seen. Returns the time from the first message to
 * the n-th (steady state: connection set-up and the first fetch round trip
 * are excluded and reported in *startup_ns). */
static int64_t kafka_consume(const char *bootstraps, int nparts, size_t n, int64_t *startup_ns)
{
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", bootstraps);
    conf_set(conf, "group.id", "tallyd-ingest-bench");
    conf_set(conf, "enable.auto.commit", "false");
    conf_set(conf, "enable.auto.offset.store", "false");
    conf_set(conf, "enable.partition.eof", "false");
    conf_set(conf, "fetch.max.bytes", "67108864");
    conf_set(conf, "max.partition.fetch.bytes", "8388608");
    conf_set(conf, "receive.message.max.bytes", "134217728");
    conf_set(conf, "queued.min.messages", "1000000");
    conf_set(conf, "queued.max.messages.kbytes", "1048576");
    conf_set(conf, "log.connection.close", "false");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (rk == NULL) {
        fprintf(stderr, "ingest: cannot create consumer: %s\n", err);
        exit(2);
    }
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(nparts);
    for (int p = 0; p < nparts; p++)
        rd_kafka_topic_partition_list_add(parts, KAFKA_TOPIC, p)->offset =
            RD_KAFKA_OFFSET_BEGINNING;

    int64_t t_assign = mono_ns(), t_first = 0, t_last = 0;
    if (rd_kafka_assign(rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
        die("rd_kafka_assign failed");
    rd_kafka_topic_partition_list_destroy(parts);

    size_t seen = 0, errors = 0;
    while (seen < n) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (m == NULL) {
            if (mono_ns() - t_assign > KAFKA_DEADLINE_NS) {
                fprintf(stderr, "ingest: consumer saw %zu of %zu messages before the deadline\n",
                        seen, n);
                exit(2);
            }
            continue;
        }
        if (m->err) {
            if (errors++ < 3)
                fprintf(stderr, "ingest: consumer: %s\n", rd_kafka_message_errstr(m));
        } else if (seen++ == 0) {
            t_first = mono_ns();
        }
        rd_kafka_message_destroy(m);
    }
    t_last = mono_ns();
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    *startup_ns = t_first - t_assign;
    return t_last - t_first;
}

/* ---- output ---------------------------------------------------------------- */

static void print_machine(void)
{
    char model[256];
    cpu_model(model, sizeof model);
    double load = load_average();
    printf("machine: nproc %ld, %s, librdkafka %s, liburcu memb flavour, load average %.2f%s\n",
           sysconf(_SC_NPROCESSORS_ONLN), model, rd_kafka_version_str(), load,
           load > 0.5 ? " (busy: other processes share the CPUs)" : "");
}

/* Events per second of a row (its own N over its best time). */
static double row_rate(const row_t *r)
{
    return r->best_ns > 0 ? (double)r->ntimed * 1e9 / (double)r->best_ns : 0;
}

static void print_table(const row_t rows[ROW__COUNT], int reps)
{
    char b1[32], b2[32];
    double peer = rows[ROW_KAFKA].done ? row_rate(&rows[ROW_KAFKA]) : 0;
    printf("\n%-30s %10s %12s %9s %8s %7s\n", "row", "N", "events/s", "ns/event", "vs e", "others");
    printf("%-30s %10s %12s %9s %8s %7s\n", "------------------------------", "----------",
           "------------", "---------", "--------", "-------");
    for (int i = 0; i < ROW__COUNT; i++) {
        const row_t *r = &rows[i];
        if (!r->done)
            continue;
        double rate = row_rate(r);
        char ratio[16];
        if (peer > 0)
            snprintf(ratio, sizeof ratio, "%.2fx", rate / peer);
        else
            snprintf(ratio, sizeof ratio, "n/a");
        char others[16];
        if (r->others < 0)
            snprintf(others, sizeof others, "n/a");
        else
            snprintf(others, sizeof others, "%.2f", r->others);
        printf("%-30s %10s %12s %9.1f %8s %7s\n", row_names[i],
               fmt_count((double)r->n, b1, sizeof b1), fmt_count(rate, b2, sizeof b2),
               (double)r->best_ns / (double)r->ntimed, ratio, others);
    }
    printf("each row: best of %d runs. d, j: N / wall time of the slower writer. i, j: the\n"
           "stream applied again to the store a first, untimed pass filled. vs e: events/s\n"
           "over row e's. others: CPUs other processes kept busy during that run (0 = quiet).\n",
           reps);
    for (int i = 0; i < ROW__COUNT; i++)
        if (rows[i].done && rows[i].note[0])
            printf("  %c: %s\n", row_names[i][0], rows[i].note);
    if (rows[ROW_APPLY2].done && peer > 0) {
        double ratio = row_rate(&rows[ROW_APPLY2]) / peer;
        printf("\ntarget: decode+apply with 2 writers >= 1.0x the bare consumer: %.2fx, %s\n",
               ratio, ratio >= 1.0 ? "MET" : "NOT MET");
    }
    if (rows[ROW_STEADY2].done && peer > 0) {
        double ratio = row_rate(&rows[ROW_STEADY2]) / peer;
        printf("the same in steady state (row j, every entity held, item lists full): %.2fx, %s\n",
               ratio, ratio >= 1.0 ? "MET" : "NOT MET");
    }
}

/* ---- main -------------------------------------------------------------------- */

static void usage(FILE *out)
{
    fprintf(
        out,
        "usage: ingest [--events N | --quick] [--reps R] [--config FILE] [--brokers B]\n"
        "              [--only ROW[,ROW...]] [--ordered] [--no-verify] [--perf-ctl FIFO[,ACK]]\n"
        "  --events N    events to generate (default %u)\n"
        "  --quick       N = %u, for a fast check\n"
        "  --reps R      runs per row; the best is reported (default %d)\n"
        "  --config FILE feature set (default config/demo.yaml)\n"
        "  --brokers B   brokers of row e's mock cluster (default %d)\n"
        "  --only ROWS   run only these: jsmn decode apply1 apply2 kafka batch1 batch2\n"
        "                pipe2 steady1 steady2 split\n"
        "  --ordered     event times rise in stream order (default: each event's ts is\n"
        "                the generation time minus U[0, 60 s], so out of order)\n"
        "  --no-verify   skip the ground-truth check of the apply rows\n"
        "  --perf-ctl    perf record --control fifo:CTL[,ACK] -D -1 paths: sampling\n"
        "                is enabled only around the timed loops\n",
        DEFAULT_EVENTS, QUICK_EVENTS, DEFAULT_REPS, DEFAULT_BROKERS);
}

static bool select_rows(opts_t *o, const char *list)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save)) {
        bool found = false;
        for (int i = 0; i < ROW__COUNT; i++)
            if (strcmp(tok, row_keys[i]) == 0)
                o->only[i] = found = true;
        if (strcmp(tok, "split") == 0)
            o->only[ROW__COUNT] = found = true;
        if (!found)
            return false;
    }
    o->any_only = true;
    return true;
}

static void parse_args(int argc, char **argv, opts_t *o)
{
    static char ctl[256];
    *o = (opts_t){.nevents = DEFAULT_EVENTS,
                  .reps = DEFAULT_REPS,
                  .brokers = DEFAULT_BROKERS,
                  .config = "config/demo.yaml",
                  .verify = true};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--quick") == 0) {
            o->nevents = QUICK_EVENTS;
        } else if (strcmp(a, "--ordered") == 0) {
            o->ordered = true;
        } else if (strcmp(a, "--no-verify") == 0) {
            o->verify = false;
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            exit(0);
        } else if (v != NULL && strcmp(a, "--events") == 0) {
            char *end;
            unsigned long long n = strtoull(v, &end, 10);
            if (*end != '\0' || n < 2 || n > MAX_EVENTS)
                die("--events wants an integer in [2, 50000000]");
            o->nevents = (size_t)n;
            i++;
        } else if (v != NULL && strcmp(a, "--reps") == 0) {
            o->reps = atoi(v);
            if (o->reps < 1 || o->reps > 100)
                die("--reps wants an integer in [1, 100]");
            i++;
        } else if (v != NULL && strcmp(a, "--brokers") == 0) {
            o->brokers = atoi(v);
            if (o->brokers < 1 || o->brokers > 16)
                die("--brokers wants an integer in [1, 16]");
            i++;
        } else if (v != NULL && strcmp(a, "--config") == 0) {
            o->config = v;
            i++;
        } else if (v != NULL && strcmp(a, "--only") == 0) {
            if (!select_rows(o, v))
                die("--only wants a comma-separated list of jsmn decode apply1 apply2 kafka "
                    "batch1 batch2 pipe2 steady1 steady2 split");
            i++;
        } else if (v != NULL && strcmp(a, "--perf-ctl") == 0) {
            snprintf(ctl, sizeof ctl, "%s", v);
            char *comma = strchr(ctl, ',');
            if (comma != NULL) {
                *comma = '\0';
                o->perf_ack = comma + 1;
            }
            o->perf_ctl = ctl;
            i++;
        } else {
            usage(stderr);
            exit(2);
        }
    }
    if (!o->any_only)
        for (int i = 0; i <= ROW__COUNT; i++)
            o->only[i] = true;
}

static bool resolve(const tly_featset_t *fs, int entity, const char *spec, tly_featwin_t *fw)
{
    uint32_t feat;
    int window;
    if (entity < 0 ||
        tly_featset_resolve(fs, (uint32_t)entity, spec, strlen(spec), &feat, &window) != TLY_OK ||
        window < 0)
        return false;
    fw->feat = feat;
    fw->window = (uint32_t)window;
    return true;
}

/* Records a run's time into row r (keeping the best). */
static void row_record(row_t *r, size_t n, size_t ntimed, int64_t ns, double others)
{
    if (!r->done || ns < r->best_ns) {
        r->best_ns = ns;
        r->others = others;
    }
    r->done = true;
    r->n = n;
    r->ntimed = ntimed;
}

/* CPU time (ns) all processes spent busy since boot, from /proc/stat; -1
 * when unreadable. */
static int64_t system_busy_ns(void)
{
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (f == NULL)
        return -1;
    int got = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                     &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (got != 8)
        return -1;
    /* user nice system [idle iowait] irq softirq steal, in clock ticks */
    unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    return (int64_t)(busy * (1000000000ULL / (unsigned long long)sysconf(_SC_CLK_TCK)));
}

/* Start of a run: process CPU, machine-wide busy time and wall clock. */
typedef struct {
    int64_t cpu, busy, wall;
} clk_t;

static clk_t clk_start(void)
{
    return (clk_t){cpu_ns(), system_busy_ns(), mono_ns()};
}

/* Prints one run to stderr with two health figures: this process's CPU
 * time over the run's wall time (the row's busy threads, ideally), and the
 * CPUs other processes kept busy meanwhile (ideally 0; /proc/stat ticks are
 * 10 ms, so short runs read coarse). A run with others busy is not
 * representative: rerun on a quiet machine. */
static double progress(const char *row, int rep, int reps, size_t n, int64_t ns, clk_t c0)
{
    int64_t cpu = cpu_ns() - c0.cpu, wall = mono_ns() - c0.wall;
    int64_t busy = system_busy_ns();
    /* /proc/stat counts in clock ticks (10 ms): under ~0.2 s it cannot tell. */
    double others = -1;
    if (c0.busy >= 0 && busy >= 0 && wall >= 200000000) {
        others = (double)(busy - c0.busy - cpu) / (double)wall;
        others = others < 0 ? 0 : others;
    }
    char ob[16];
    if (others < 0)
        snprintf(ob, sizeof ob, "n/a");
    else
        snprintf(ob, sizeof ob, "%.2f", others);
    fprintf(stderr,
            "  %-30s run %d/%d: %7.1f ns/event (%.0f events/s), cpu/wall %.2f, others %s "
            "CPUs\n",
            row, rep + 1, reps, (double)ns / (double)n, (double)n * 1e9 / (double)ns,
            (double)cpu / (double)wall, ob);
    return others;
}

/* Everything one benchmark run shares. */
typedef struct {
    opts_t o;
    tly_config_t *cfg;
    tly_featset_t *fs;
    feats_t ft;
    stream_t sm;
    int64_t now_ms; /* apply's `now`: max ts + 1 s */
    row_t rows[ROW__COUNT];
    int64_t lookup_ns;      /* cost split: best hinted lookup time, -1 = not measured */
    int64_t lookup_cold_ns; /* the same without hints (for reference) */
    size_t lookup_misses;   /* ids with no record (see print_split) */
    double lookup_others;   /* CPUs other processes used during the best lookup run */
    int rc;                 /* exit status: 1 once a check failed */
} bench_t;

static void bench_jsmn(bench_t *b)
{
    row_t *row = &b->rows[ROW_JSMN];
    for (int rep = 0; rep < b->o.reps; rep++) {
        clk_t c0 = clk_start();
        perf_ctl(&b->o, "enable");
        int64_t ns = run_jsmn(&b->sm);
        perf_ctl(&b->o, "disable");
        double others = progress(row_names[ROW_JSMN], rep, b->o.reps, b->sm.n, ns, c0);
        row_record(row, b->sm.n, b->sm.n, ns, others);
    }
    snprintf(row->note, sizeof row->note,
             "jsmn 1.1.0 (JSMN_PARENT_LINKS), cap %d tokens: tokenising only, for reference",
             TLY_DECODE_MAX_TOKENS);
}

static void bench_decode(bench_t *b)
{
    for (int rep = 0; rep < b->o.reps; rep++) {
        size_t bad;
        clk_t c0 = clk_start();
        perf_ctl(&b->o, "enable");
        int64_t ns = run_decode(&b->sm, b->fs, &bad);
        perf_ctl(&b->o, "disable");
        if (bad) {
            fprintf(stderr, "ingest: %zu events failed to decode (generator bug?)\n", bad);
            exit(1);
        }
        double others = progress(row_names[ROW_DECODE], rep, b->o.reps, b->sm.n, ns, c0);
        row_record(&b->rows[ROW_DECODE], b->sm.n, b->sm.n, ns, others);
    }
}

/* The ground-truth verdict of an apply row's note; a mismatch fails the
 * run. */
static const char *truth_of(bench_t *b, size_t mism)
{
    if (mism)
        b->rc = 1;
    return !b->ft.can_verify ? "skipped" : mism ? "MISMATCH" : "ok";
}

/* Fills items[0..n) with the stream's events [i, i + n). */
static void batch_fill(const stream_t *sm, tly_apply_item_t *items, size_t i, size_t n)
{
    for (size_t k = 0; k < n; k++)
        items[k] = (tly_apply_item_t){.payload = sm->arena + sm->off[i + k],
                                      .len = sm->len[i + k],
                                      .offset = (int64_t)(i + k),
                                      .kafka_ts_ms = -1,
                                      .topic = -1};
}

static size_t batch_rejected(const tly_apply_item_t *items, size_t n)
{
    size_t bad = 0;
    for (size_t k = 0; k < n; k++)
        bad += items[k].err != TLY_OK;
    return bad;
}

/* Rows f, g and h: the appliers of tallyd's Kafka source, with 1 and 2
 * threads, on the stream cut into batches of TLY_APPLY_BATCH_MAX messages
 * all from one partition, as a fetch of a user-keyed topic mostly hands
 * them over: with 2 threads each batch is shared by entity (apply.c), or,
 * pipelined (row h), decoded by this thread and applied by the worker while
 * this thread fills and decodes the next. */
static void bench_batch(bench_t *b, row_id_t id, size_t nthreads, bool pipelined)
{
    const stream_t *sm = &b->sm;
    row_t *row = &b->rows[id];
    tly_apply_item_t *items[2] = {xmalloc(TLY_APPLY_BATCH_MAX * sizeof *items[0]),
                                  xmalloc(TLY_APPLY_BATCH_MAX * sizeof *items[1])};
    tly_store_t *store = NULL;
    tly_apply_stats_t st = {0};
    size_t bad = 0;
    uint32_t cut = 0;
    for (int rep = 0; rep < b->o.reps; rep++) {
        tly_store_free(store);
        store = tly_store_new(b->fs);
        tly_apply_t *ap = tly_apply_new(b->fs, store, NULL, nthreads);
        if (tly_apply_start(ap) != nthreads) {
            fprintf(stderr, "ingest: could not start %zu appliers\n", nthreads);
            exit(1);
        }
        clk_t c0 = clk_start();
        int64_t t0 = mono_ns();
        perf_ctl(&b->o, "enable");
        size_t cur = 0, fly_n = 0;
        for (size_t i = 0; i < sm->n; i += TLY_APPLY_BATCH_MAX) {
            size_t n = sm->n - i < TLY_APPLY_BATCH_MAX ? sm->n - i : TLY_APPLY_BATCH_MAX;
            batch_fill(sm, items[cur], i, n);
            if (!pipelined) {
                tly_apply_batch(ap, items[cur], n, b->now_ms);
                bad += batch_rejected(items[cur], n);
                continue;
            }
            if (!tly_apply_stage(ap, items[cur], n, b->now_ms)) {
                fprintf(stderr, "ingest: a batch from one partition was not staged\n");
                exit(1);
            }
            if (tly_apply_wait(ap))
                bad += batch_rejected(items[1 - cur], fly_n);
            tly_apply_submit(ap);
            fly_n = n;
            cur = 1 - cur;
        }
        if (pipelined && tly_apply_wait(ap))
            bad += batch_rejected(items[1 - cur], fly_n);
        perf_ctl(&b->o, "disable");
        int64_t ns = mono_ns() - t0;
        tly_apply_stats(ap, &st);
        cut = tly_apply_cut(ap);
        tly_apply_free(ap);
        if (bad) {
            fprintf(stderr, "ingest: %zu events were not applied\n", bad);
            exit(1);
        }
        double others = progress(row_names[id], rep, b->o.reps, sm->n, ns, c0);
        row_record(row, sm->n, sm->n, ns, others);
    }
    size_t mism = verify_store(store, sm, &b->ft, b->now_ms, 1, row_names[id]);
    int len = snprintf(row->note, sizeof row->note,
                       "batches alone %" PRIu64 ", shared by entity %" PRIu64
                       ", by partition %" PRIu64 ", pipelined %" PRIu64 "; ground truth: %s",
                       st.alone, st.shared, st.bypart, st.pipelined, truth_of(b, mism));
    if (pipelined)
        snprintf(row->note + len, sizeof row->note - (size_t)len,
                 "; at the end the worker applied %u of 64 store shards, this thread the rest",
                 cut);
    tly_store_free(store);
    free(items[0]);
    free(items[1]);
}

/* Row c (passes 1) or i (2: the stream applied again to the store the first
 * pass filled, the second pass timed). Returns the last run's store, which
 * the cost split reads after row c (caller frees). */
static tly_store_t *bench_apply1(bench_t *b, row_id_t id, int passes)
{
    row_t *row = &b->rows[id];
    tly_store_t *store = NULL;
    for (int rep = 0; rep < b->o.reps; rep++) {
        int64_t ns;
        size_t bad;
        tly_store_free(store);
        clk_t c0 = clk_start();
        store = run_apply1(&b->sm, b->fs, b->now_ms, passes, &b->o, &ns, &bad);
        perf_ctl(&b->o, "disable");
        if (bad) {
            fprintf(stderr, "ingest: %zu events were not applied\n", bad);
            exit(1);
        }
        double others = progress(row_names[id], rep, b->o.reps, b->sm.n, ns, c0);
        row_record(row, b->sm.n, b->sm.n, ns, others);
    }
    tly_store_stats_t st;
    tly_store_stats(store, &st);
    size_t mism = verify_store(store, &b->sm, &b->ft, b->now_ms, passes, row_names[id]);
    snprintf(row->note, sizeof row->note,
             "%" PRIu64 " entities, %.0f MiB of state, %" PRIu64
             " feature updates; ground truth: %s",
             st.entities, (double)st.bytes / 1048576.0, st.updates, truth_of(b, mism));
    return store;
}

/* Row d (passes 1) or j (2, as row i). */
static void bench_apply2(bench_t *b, row_id_t id, int passes)
{
    const stream_t *sm = &b->sm;
    row_t *row = &b->rows[id];
    uint32_t *idx[2];
    size_t nidx[2] = {0, 0};
    for (int t = 0; t < 2; t++)
        idx[t] = xmalloc(sm->n * sizeof *idx[t]);
    for (size_t i = 0; i < sm->n; i++) {
        unsigned t = sm->user[i] & 1;
        idx[t][nidx[t]++] = (uint32_t)i;
    }
    tly_store_t *store = NULL;
    int64_t best_th[2] = {0, 0}, best = INT64_MAX;
    for (int rep = 0; rep < b->o.reps; rep++) {
        int64_t ns, th_ns[2];
        size_t bad;
        tly_store_free(store);
        clk_t c0 = clk_start();
        store = run_apply2(sm, b->fs, b->now_ms, idx, nidx, passes, &b->o, &ns, &bad, th_ns);
        perf_ctl(&b->o, "disable");
        if (bad) {
            fprintf(stderr, "ingest: %zu events were not applied\n", bad);
            exit(1);
        }
        if (ns < best) {
            best = ns;
            best_th[0] = th_ns[0];
            best_th[1] = th_ns[1];
        }
        double others = progress(row_names[id], rep, b->o.reps, sm->n, ns, c0);
        row_record(row, sm->n, sm->n, ns, others);
    }
    size_t mism = verify_store(store, sm, &b->ft, b->now_ms, passes, row_names[id]);
    snprintf(row->note, sizeof row->note,
             "even users: %zu events in %.3f s, odd users: %zu events in %.3f s; "
             "ground truth: %s",
             nidx[0], (double)best_th[0] / 1e9, nidx[1], (double)best_th[1] / 1e9,
             truth_of(b, mism));
    tly_store_free(store);
    free(idx[0]);
    free(idx[1]);
}

/* Cost split: times the find-only path on the store row c left behind. */
static void bench_lookup(bench_t *b, tly_store_t *store)
{
    const stream_t *sm = &b->sm;
    ids_t *ids = xmalloc(sm->n * sizeof *ids);
    for (size_t i = 0; i < sm->n; i++) {
        ids[i].ulen = (uint8_t)snprintf(ids[i].user, sizeof ids[i].user, "%" PRIu32, sm->user[i]);
        ids[i].plen = (uint8_t)snprintf(ids[i].pin, sizeof ids[i].pin, "%" PRIu32, sm->pin[i]);
    }
    for (int rep = 0; rep < b->o.reps; rep++) {
        clk_t c0 = clk_start();
        perf_ctl(&b->o, "enable");
        int64_t ns = run_lookup(store, ids, sm->n, &b->ft, b->now_ms, true, &b->lookup_misses);
        perf_ctl(&b->o, "disable");
        double others = progress("   lookup, hinted (read n=0, x2)", rep, b->o.reps, sm->n, ns, c0);
        if (b->lookup_ns < 0 || ns < b->lookup_ns) {
            b->lookup_ns = ns;
            b->lookup_others = others;
        }
        c0 = clk_start();
        ns = run_lookup(store, ids, sm->n, &b->ft, b->now_ms, false, &b->lookup_misses);
        progress("   lookup, cold (read n=0, x2)", rep, b->o.reps, sm->n, ns, c0);
        if (b->lookup_cold_ns < 0 || ns < b->lookup_cold_ns)
            b->lookup_cold_ns = ns;
    }
    free(ids);
}

static void bench_kafka(bench_t *b)
{
    row_t *row = &b->rows[ROW_KAFKA];
    char err[256];
    int nparts;
    size_t nk;

    kafka_plan(&b->sm, &nparts, &nk);
    rd_kafka_conf_t *hconf = rd_kafka_conf_new();
    conf_set(hconf, "log_level", "3"); /* the mock's host has no brokers of its own */
    rd_kafka_t *host = rd_kafka_new(RD_KAFKA_PRODUCER, hconf, err, sizeof err);
    if (host == NULL) {
        fprintf(stderr, "ingest: cannot create the mock cluster's host: %s\n", err);
        exit(2);
    }
    rd_kafka_mock_cluster_t *mc = rd_kafka_mock_cluster_new(host, b->o.brokers);
    if (mc == NULL)
        die("cannot start librdkafka's mock cluster");
    const char *bootstraps = rd_kafka_mock_cluster_bootstraps(mc);
    if (rd_kafka_mock_topic_create(mc, KAFKA_TOPIC, nparts, 1) != RD_KAFKA_RESP_ERR_NO_ERROR)
        die("cannot create the mock topic");
    int64_t tp = mono_ns();
    kafka_produce(&b->sm, bootstraps, nparts, nk);
    fprintf(stderr, "  produced %zu messages into %d partitions in %.2f s\n", nk, nparts,
            (double)(mono_ns() - tp) / 1e9);

    int64_t best_startup = 0;
    for (int rep = 0; rep < b->o.reps; rep++) {
        int64_t startup;
        clk_t c0 = clk_start();
        perf_ctl(&b->o, "enable");
        int64_t ns = kafka_consume(bootstraps, nparts, nk, &startup);
        perf_ctl(&b->o, "disable");
        if (!row->done || ns < row->best_ns)
            best_startup = startup;
        /* The clock starts at the first message: nk - 1 messages follow. */
        double others = progress(row_names[ROW_KAFKA], rep, b->o.reps, nk - 1, ns, c0);
        row_record(row, nk, nk - 1, ns, others);
    }
    snprintf(row->note, sizeof row->note,
             "mock cluster (%d brokers, in-process), %d partitions (user_id mod %d)%s; timed from "
             "the first message to the last (start-up %.0f ms excluded)",
             b->o.brokers, nparts, nparts,
             nk < b->sm.n ? ", N reduced: the mock keeps 5 MiB per partition" : "",
             (double)best_startup / 1e6);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(host);
}

static void print_split(const bench_t *b)
{
    const row_t *rows = b->rows;
    if (b->lookup_ns < 0 || !rows[ROW_DECODE].done || !rows[ROW_APPLY1].done)
        return;
    double n = (double)b->sm.n;
    double parse = (double)rows[ROW_DECODE].best_ns / n;
    double lookup = (double)b->lookup_ns / n;
    double apply = (double)rows[ROW_APPLY1].best_ns / n;
    double update = apply - parse - lookup;
    char lo[16];
    if (b->lookup_others < 0)
        snprintf(lo, sizeof lo, "n/a");
    else
        snprintf(lo, sizeof lo, "%.2f", b->lookup_others);
    printf("\ncost split, 1 writer (ns/event; %.1f total = row c):\n", apply);
    printf("  %-7s %7.1f  %5.1f %%  = row b: tly_decode_json (one pass: JSON grammar check,\n"
           "                           field extraction), then the event time\n",
           "parse", parse, 100 * parse / apply);
    if (rows[ROW_JSMN].done) {
        double jsmn = (double)rows[ROW_JSMN].best_ns / n;
        printf("  %-7s %7.1f  %5.1f %%    (for reference: jsmn_parse alone, row a)\n", "", jsmn,
               100 * jsmn / apply);
    }
    printf("  %-7s %7.1f  %5.1f %%  = tly_store_read with 0 requests on the event's user id and\n"
           "                           pin id after apply, in stream order, hinted two events\n"
           "                           ahead as row c hints them: RCU read lock, hash, table\n"
           "                           probe, seqlock check, and whatever per-record work the\n"
           "                           store does before serving requests; 2 per event, best\n"
           "                           of %d (others %s CPUs); %zu of %zu ids have no record\n"
           "                           (pins seen only in hides, which no pin feature counts)\n",
           "lookup", lookup, 100 * lookup / apply, b->o.reps, lo, b->lookup_misses, 2 * b->sm.n);
    if (b->lookup_cold_ns >= 0)
        printf("  %-7s %7.1f            the same lookups unhinted, every probe cold (not part\n"
               "                           of the split: row c hints its events)\n",
               "", (double)b->lookup_cold_ns / n);
    printf("  %-7s %7.1f  %5.1f %%  = row c - parse - lookup (feature match, id render, entity\n"
           "                           insert, seqlock, state updates, record growth, deferred\n"
           "                           frees, counters)\n",
           "update", update, 100 * update / apply);
}

static void print_stream(const bench_t *b, int64_t gen_ns)
{
    const stream_t *sm = &b->sm;
    double n = (double)sm->n;
    printf("config: %s: %zu features over %zu entity types, %zu event fields\n", b->o.config,
           b->fs->nfeats, b->fs->nentities, b->fs->nfields);
    printf("stream: %zu JSON events (%.1f B mean), seed %" PRId64 ", users 1..%" PRIu64
           " (Zipf s=%.1f), pins 1..%" PRIu64 " (Zipf s=%.1f),\n"
           "        impression/closeup/click/save/hide %.1f/%.1f/%.1f/%.1f/%.1f %%, "
           "dwell_ms on %.1f %%,\n"
           "        ts = %s; apply's now = max ts + 1 s\n"
           "        (generated in %.2f s)\n",
           sm->n, (double)sm->bytes / n, b->cfg->demo.seed, sm->users, USER_ZIPF_S, sm->pins,
           PIN_ZIPF_S, 100.0 * (double)sm->nactions[0] / n, 100.0 * (double)sm->nactions[1] / n,
           100.0 * (double)sm->nactions[2] / n, 100.0 * (double)sm->nactions[3] / n,
           100.0 * (double)sm->nactions[4] / n, 100.0 * (double)sm->ndwell / n,
           b->o.ordered ? "rising through the minute before generation, in stream order (--ordered)"
                        : "wall clock at generation - U[0, 60 s]",
           (double)gen_ns / 1e9);
}

int main(int argc, char **argv)
{
    static bench_t b; /* large; zeroed */
    char err[512];

    parse_args(argc, argv, &b.o);
    b.lookup_ns = -1;
    b.lookup_cold_ns = -1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    if (tly_config_load(b.o.config, &b.cfg, err, sizeof err) != TLY_OK) {
        fprintf(stderr, "ingest: %s (run from the repository root, or pass --config)\n", err);
        return 2;
    }
    if (tly_featset_compile(b.cfg, &b.fs, err, sizeof err) != TLY_OK) {
        fprintf(stderr, "ingest: %s\n", err);
        return 2;
    }
    feats_t *ft = &b.ft;
    ft->fs = b.fs;
    ft->user_ent = tly_featset_entity(b.fs, "user", 4);
    ft->pin_ent = tly_featset_entity(b.fs, "pin", 3);
    if (ft->user_ent < 0 || ft->pin_ent < 0)
        die("the feature set needs entity types user and pin");
    ft->can_verify = b.o.verify && resolve(b.fs, ft->user_ent, "clicks:7d", &ft->clicks7d) &&
                     resolve(b.fs, ft->user_ent, "dwell:1d", &ft->dwell1d) &&
                     resolve(b.fs, ft->pin_ent, "impressions:1d", &ft->impr1d);

    tly_rcu_thread_online();

    printf("tallyd ingest benchmark\n");
    print_machine();
    int64_t t_gen = mono_ns();
    stream_generate(&b.sm, b.o.nevents, b.o.ordered, b.cfg);
    b.now_ms = b.sm.max_ts + 1000;
    print_stream(&b, mono_ns() - t_gen);
    fprintf(stderr, "running (progress on stderr, results on stdout):\n");

    if (b.o.only[ROW_JSMN])
        bench_jsmn(&b);
    if (b.o.only[ROW_DECODE] || b.o.only[ROW__COUNT])
        bench_decode(&b);
    tly_store_t *kept = NULL;
    if (b.o.only[ROW_APPLY1] || b.o.only[ROW__COUNT])
        kept = bench_apply1(&b, ROW_APPLY1, 1);
    if (b.o.only[ROW_APPLY2])
        bench_apply2(&b, ROW_APPLY2, 1);
    if (b.o.only[ROW_BATCH1])
        bench_batch(&b, ROW_BATCH1, 1, false);
    if (b.o.only[ROW_BATCH2])
        bench_batch(&b, ROW_BATCH2, 2, false);
    if (b.o.only[ROW_PIPE2])
        bench_batch(&b, ROW_PIPE2, 2, true);
    if (b.o.only[ROW__COUNT])
        bench_lookup(&b, kept);
    tly_store_free(kept);
    if (b.o.only[ROW_STEADY1])
        tly_store_free(bench_apply1(&b, ROW_STEADY1, 2));
    if (b.o.only[ROW_STEADY2])
        bench_apply2(&b, ROW_STEADY2, 2);
    if (b.o.only[ROW_KAFKA])
        bench_kafka(&b);

    print_table(b.rows, b.o.reps);
    print_split(&b);
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        printf("\npeak RSS of the whole run: %.0f MiB (stream, stores, mock cluster)\n",
               (double)ru.ru_maxrss / 1024.0);

    stream_free(&b.sm);
    tly_rcu_thread_offline();
    tly_featset_free(b.fs);
    tly_config_free(b.cfg);
    return b.rc;
}
