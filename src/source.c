/*
 * source.c — the Kafka consumer that feeds the store (source.h).
 *
 * One librdkafka high-level consumer per source and one poll thread:
 * rd_kafka_consumer_poll (100 ms at most, so a stop is prompt) collects a
 * batch — whatever the consumer queue holds, up to BATCH_MAX messages; in
 * replica mode the rest many at a call (collect_more) —
 * then decode → tly_store_apply for the whole batch, spread over
 * kafka.threads appliers (the poll thread and kafka.threads − 1 workers,
 * apply.h), so that every entity's events from one partition are applied
 * by one applier in offset order — the order Kafka itself guarantees — and
 * the poll thread waits for all of them (flush).
 * Only then does the bookkeeping run, in message order: counters, rejection
 * logs, rd_kafka_offset_store (once per partition) (settle).
 * With apply threads running, a batch of PIPELINE_MIN messages or more is
 * pipelined instead (dispatch): the poll thread decodes it, waits for the
 * batch before, hands this one to the apply threads, settles that one and
 * goes back to polling while they apply. A batch in flight is finished
 * (waited for and settled: finish) before anything reads the positions,
 * which collect already moved: the rebalance callback and publish flush
 * first, the checkpoint hook gets its turn every CHECKPOINT_EVERY_MS with a
 * flush, and an empty poll flushes at once. So at each flush the store is
 * as if every message had been applied one by one on the poll thread, and
 * the rebalance callback, publish and the checkpoint hook see a consistent
 * cut. Offsets are stored only once their
 * event was applied or rejected (enable.auto.offset.store=false) and
 * librdkafka commits the stored offsets in the background
 * (enable.auto.commit=true), on revocation and in tly_source_stop.
 *
 * Positions past what never becomes a message. A transactional producer's
 * commit or abort leaves a control record (a marker) in the log, and an
 * aborted transaction's records are skipped by the consumer
 * (isolation.level read_committed): neither reaches the application, so a
 * partition whose log ends with one would stay one (or more) offsets below
 * its high watermark forever if its position were only "last message + 1"
 * — lag never 0, never ready with kafka.ready_lag 0. tallyd therefore has
 * librdkafka emit end-of-partition events (enable.partition.eof=true, which
 * kafka.properties may not turn off): such an event comes when a fetch
 * finds the consumer at the partition's end (for read_committed, the end of
 * what is readable) and carries that offset, the next one it fetches;
 * reach_end moves the partition's position forward to it (never back). Every message before it was
 * queued before it, so nothing is skipped. The position is stored like a message's offset (after
 * the batch is applied) so committed offsets reach the end too.
 *
 * Where a partition starts. The store is in-process state: a fresh process
 * holds nothing, so the offsets a previous process committed describe state
 * that no longer exists. Committed offsets therefore serve lag monitoring
 * only; a partition this process has not consumed before starts where
 * kafka.start says — window: the first offset whose timestamp is at or after
 * now − the featset's longest horizon (rd_kafka_offsets_for_times; no such
 * offset: the end; the broker cannot answer: the beginning, since events
 * older than a horizon are dropped as late anyway); earliest: the beginning;
 * latest: the end — unless tly_source_resume_at() gave a position (a
 * snapshot's). A partition consumed before (revoked by a rebalance and
 * assigned again) resumes at the position this process reached, so nothing
 * is applied twice. With brokers "embedded", `window` starts at the
 * beginning: the mock cluster holds only this run's events and its
 * offsets-for-times answers "end" (librdkafka 2.0.2).
 *
 * Threads: new/start/stop/free/resume_at on the main thread. The poll thread
 * runs consumer_poll and with it the rebalance, error and offset callbacks;
 * the appliers' worker threads only decode and apply the batch items
 * handed to them (between the start and the end of a flush, or from a
 * pipelined batch's submit to its wait: apply.c);
 * tly_kafka_close in stop runs the final revocation on the main thread
 * after the poll thread was joined. The nudger thread only sends the
 * end-offset requests the poll thread hands it (see "fetch nudges") and
 * hands back the answers of those that look up an assignment's ends (see
 * "ends"); it is joined after the poll thread. The log callback runs on
 * librdkafka's own threads and only calls tly_log. tly_source_stats and
 * tly_source_fatal on any thread.
 *
 * Readiness: publish() (the consumer-queue thread) sets `ready` once every
 * partition of the current assignment caught up (kafka.ready_lag) to an end
 * offset learnt since the assignment; assign() clears it. The rebalance
 * callback waits for the brokers only for what the assignment itself needs
 * (shard mode's partition count, start offsets at the end or by time): the
 * other ends are looked up off it (see "ends"). Gaps: check_continuity()
 * compares each message's offset with the position expected (see
 * source.h).
 *
 * Invariants: the working partition table (src->parts) belongs to whoever
 * serves the consumer queue (the poll thread, then the main thread after the
 * join); readers see the published copy (src->pub) taken under src->mu at
 * most about once a second under load, on every assignment change and when
 * the consumer goes idle. Counters are relaxed atomics written by the poll
 * thread only.
 */
#include "tallyd/source.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "source_int.h"
#include "tallyd/apply.h"
#include "tallyd/log.h"
#include "tallyd/rcu.h"
#include "tallyd/shard.h"

#define POLL_TIMEOUT_MS     100
#define PUBLISH_EVERY_MS    1000
#define LOADING_PUBLISH_MS  200   /* publish (and judge readiness) this often while loading */
#define BROKER_TIMEOUT_MS   10000 /* longest wait for offsets-for-times */
#define REJECT_LOG_EVERY_MS 1000
#define ERROR_LOG_EVERY_MS  1000
#define MOCK_BROKERS        3
#define ASSIGN_LOG_CAP      1024
#define BATCH_MAX           TLY_APPLY_BATCH_MAX /* messages collected before they are applied */
#define PIPELINE_MIN        64  /* smaller batches are applied at once, on the poll thread */
#define CHECKPOINT_EVERY_MS 100 /* the hook's turn while batches are pipelined */
#define NUDGE_TIMEOUT_MS    500  /* longest wait for a nudge's answers */
#define ENDS_TIMEOUT_MS     1000 /* longest wait for an assignment's ends, off the callback */
#define RECOUNT_EVERY_MS    100  /* shard mode: partition counts looked up at most this often */
#define RECOUNT_TIMEOUT_MS  2000 /* ... each lookup waiting at most this long */
#define SEEK_TIMEOUT_MS     5000 /* longest wait for the fetcher to take a seek */
#define ENDS_RETRY_MS       100  /* first pause before looking up ends that were not found */
#define ENDS_RETRY_MAX      2000 /* longest pause: it doubles while lookups fail */
#define ENDS_UNKNOWN        INT64_MAX /* high_min: the end is not known yet, see publish */
#define STARVED_NUDGE_MS    100  /* first pause between nudges of an empty poll while behind */
#define STARVED_NUDGE_MAX   5000 /* longest pause: the pause doubles until a message arrives */

/* One partition this process has been assigned (or was told to resume). */
typedef struct {
    char *topic; /* owned */
    int32_t partition;
    int topic_index; /* in kafka.topics (and fs->topics), -1: not configured */
    bool assigned;
    bool from_end;         /* assigned at the logical end, no message since */
    int64_t position;      /* next offset to apply, -1 unknown */
    int64_t high;          /* cached high watermark, -1 unknown */
    int64_t high_min;      /* the end learn_ends found at the assignment, -1 none,
                              ENDS_UNKNOWN: not found yet (seek_ends looks it up) */
    int64_t low;           /* cached log start offset, -1 unknown */
    int64_t last_event_ms; /* newest event time applied, -1 none */
    int64_t catchup_until; /* > 0: below this offset, events are marked replayed */
    size_t batch_last;     /* settle(): index of this partition's last message in the batch */
    bool store_end;        /* reach_end moved position: store it once the batch is applied */
    /* A batch librdkafka cannot decode, while its end is probed (see
     * probe_next): its first offset (-1: none probed), the first offset to
     * skip, the last known in it, the first known past it (-1 unknown), the
     * offset of the probe under way, and how many probes were made. */
    int64_t bad_base, bad_from, bad_in, bad_out, bad_probe, bad_probes;
    /* a seek of that probing failed (it may still be carried out later):
     * offsets the consumer then jumps over are counted as skipped */
    bool bad_unsure;
    uint64_t seek_no; /* src->seeks when seek_part last moved it (collect_more) */
} part_t;

/* At most one log line per period; the rest are counted and reported in
 * the next line. */
typedef struct {
    int64_t last_ms;
    uint64_t suppressed;
} ratelimit_t;

struct tly_source {
    const tly_config_t *cfg;
    const tly_featset_t *fs;
    tly_store_t *store;
    tly_apply_t *apply; /* the appliers; workers run from start to halt */
    /* the batch: poll thread only, except that during a flush the
     * appliers read the items and write their err/time_ms (apply.h);
     * batch[i] is msgs[i]'s, its `part` the index in src->parts */
    tly_apply_item_t *batch;   /* [BATCH_MAX] */
    rd_kafka_message_t **msgs; /* [BATCH_MAX] */
    size_t nbatch;
    rd_kafka_message_t **more; /* [BATCH_MAX]: taken at once by collect_more */
    uint64_t seeks;            /* seek_part calls; poll thread only */
    int64_t batch_now_ms;
    /* a pipelined batch the workers are applying (tly_apply_submit) while
     * the poll thread collects the next; poll thread only, and the items
     * are the workers' until finish() waited for them. Its messages'
     * positions are counted in the partitions' positions already: finish()
     * runs before anything reads them (publish, the checkpoint hook, a
     * rebalance, the ends stored). */
    tly_apply_item_t *fly_batch; /* [BATCH_MAX] */
    rd_kafka_message_t **fly_msgs;
    size_t fly_n;
    int64_t fly_now_ms;
    uint64_t fly_gen;           /* shard mode: tly_shard_routes_gen when it was decoded */
    int64_t last_checkpoint_ms; /* monotonic */
    bool embedded;
    rd_kafka_t *mock_host; /* embedded: the handle the mock cluster lives in */
    rd_kafka_mock_cluster_t *mock;
    char *bootstrap;    /* owned */
    rd_kafka_t *rk;     /* the consumer; NULL once closed */
    tly_shard_t *shard; /* shard mode: ownership and owner addresses; else NULL */
    char advertise[TLY_SHARD_ADDR_MAX]; /* set before start */

    /* main thread only */
    pthread_t thread;
    bool started, halted, stopped;

    /* set before start: called by the poll thread between messages */
    tly_checkpoint_fn checkpoint;
    void *checkpoint_ctx;

    /* written by stop (main) or the fatal error callback; read by the poll
     * thread each iteration */
    atomic_bool stop;
    atomic_bool running; /* written by the poll thread at start and exit */
    /* fatal_msg is written once, before fatal_set is released */
    atomic_bool fatal_set;
    char fatal_msg[512];

    /* counters: written by the poll thread, read relaxed by stats */
    atomic_uint_fast64_t messages, applied, rejected, errors, rebalances;
    atomic_uint_fast64_t gaps, gap_messages; /* offset resets, messages they skipped */
    atomic_uint_fast64_t undecodable;        /* offsets skipped: see probe_next */
    atomic_uint_fast64_t dropped_entities;   /* shard mode: of partitions lost */
    atomic_uint_fast64_t rejected_by[TLY_E__COUNT];
    atomic_int_fast64_t watermark_ms;

    /* working table: consumer-queue thread only (see the file comment) */
    part_t *parts;
    size_t nparts, partcap;
    size_t hint;        /* index of the last partition a message came from */
    bool dirty;         /* applied something (or moved a position) since the last publish */
    bool ends_to_store; /* some partition's store_end is set */
    bool assigned_once; /* an assignment (possibly empty) was received and,
                           shard mode, not revoked since */
    /* shard mode: partition numbers held before the last revocation */
    uint64_t held[TLY_SHARD_MAX_PARTITIONS / 64];
    int64_t recount_next_ms; /* shard mode: the next look at the counts (shard_recheck) */
    int32_t first_count;     /* shard mode: the partition count at the first assignment */
    bool resubscribe;        /* shard mode: subscribe again, outside any callback */
    int64_t last_publish_ms;
    ratelimit_t reject_rl, error_rl, consumer_rl;

    /* written by the consumer-queue thread in publish (true once every
     * assigned partition caught up) and assign (false); read by any thread
     * with acquire, once per query */
    atomic_bool ready;

    /* Fetch nudges ("fetch nudges" below). qmin, qbytes: set in new; cq:
     * in start, destroyed in stop; msg_bytes16, polled, last_len,
     * queue_full, last_nudge_ms, starved_ms: poll thread only;
     * nudge_parts, nudge_quit: under nudge_mu. */
    rd_kafka_queue_t *cq; /* the consumer queue, for its length */
    int64_t parts_every_ms; /* replica mode: topic.metadata.refresh.interval.ms, how often
                             * the topics' partitions are listed again (< 0: never) */
    int64_t parts_next_ms;  /* monotonic: the next listing */
    uint64_t qmin;        /* queued.min.messages */
    uint64_t qbytes;      /* queued.max.messages.kbytes, in bytes */
    uint64_t msg_bytes16; /* running mean payload of the messages polled, x16 */
    uint64_t polled;      /* messages polled since the last nudge_check */
    uint64_t last_len;    /* the queue's length at the last nudge_check */
    bool queue_full;      /* librdkafka may have stopped fetching, not resumed */
    int64_t last_nudge_ms;
    int64_t starved_ms; /* pause before the next nudge of an empty poll */
    pthread_t nudger;
    bool nudger_started; /* main thread */
    pthread_mutex_t nudge_mu;
    pthread_cond_t nudge_cv;
    rd_kafka_topic_partition_list_t *nudge_parts; /* handed over, under nudge_mu */
    bool nudge_quit;                              /* under nudge_mu */
    atomic_uint_fast64_t nudges, idle_nudges;     /* all; those after an empty poll */

    /* An assignment's end offsets, looked up by the nudger ("ends" below).
     * assign_gen, ends_wanted, ends_asked, ends_next_ms, ends_backoff_ms:
     * consumer-queue thread only; nudge_gen and the answer: under
     * nudge_mu. */
    uint64_t assign_gen;  /* counts assignments and revocations */
    bool ends_wanted;     /* an assigned partition's high_min is ENDS_UNKNOWN */
    bool ends_asked;      /* a lookup was handed over and its answer not taken */
    int64_t ends_next_ms; /* no lookup before this time */
    int64_t ends_backoff_ms;
    uint64_t nudge_gen; /* 0: nudge_parts is a nudge; else the ends lookup of that assignment */
    rd_kafka_topic_partition_list_t *ends_answer; /* handed back; NULL: none */
    rd_kafka_resp_err_t ends_err;                 /* the lookup's own result */
    uint64_t ends_gen;                            /* the assignment it was made for */

    /* published table: written by the consumer-queue thread under mu */
    pthread_mutex_t mu;
    tly_partition_stat_t *pub;
    size_t npub, pubcap;
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    return memcpy(tly_xrealloc(NULL, n), s, n);
}

/* True when a line may be written now; *suppressed gets the lines held
 * back since the last one. */
static bool ratelimit_allow(ratelimit_t *rl, int64_t now_ms, int64_t every_ms, uint64_t *suppressed)
{
    if (rl->last_ms != 0 && now_ms - rl->last_ms < every_ms) {
        rl->suppressed++;
        return false;
    }
    *suppressed = rl->suppressed;
    rl->suppressed = 0;
    rl->last_ms = now_ms;
    return true;
}

/* " (N similar lines held back)" for a rate-limited line, or "". Returns a
 * thread-local buffer: one use per log call. */
static const char *held_note(uint64_t held)
{
    static _Thread_local char note[64];
    if (held == 0)
        return "";
    snprintf(note, sizeof note, " (%" PRIu64 " similar lines held back)", held);
    return note;
}

static void fmt_err(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fmt_err(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (errbuf == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

/* ---- librdkafka callbacks ---------------------------------------------------- */

/* librdkafka's own threads: tly_log only. Levels are syslog's. */
void tly_source_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    tly_log_level_t lvl = level <= 3   ? TLY_LOG_ERROR
                          : level == 4 ? TLY_LOG_WARN
                          : level <= 6 ? TLY_LOG_INFO
                                       : TLY_LOG_DEBUG;
    tly_log(lvl, "kafka: %s: %s: %s", rd_kafka_name(rk), fac, buf);
}

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    tly_source_t *src = opaque;
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char why[400];
        rd_kafka_resp_err_t orig = rd_kafka_fatal_error(rk, why, sizeof why);
        if (!atomic_load_explicit(&src->fatal_set, memory_order_acquire)) {
            snprintf(src->fatal_msg, sizeof src->fatal_msg, "kafka fatal error %s: %s",
                     rd_kafka_err2name(orig), why);
            atomic_store_explicit(&src->fatal_set, true, memory_order_release);
        }
        tly_error("source: %s; the source stops", src->fatal_msg);
        atomic_store(&src->stop, true);
        return;
    }
    atomic_fetch_add_explicit(&src->errors, 1, memory_order_relaxed);
    uint64_t held;
    if (ratelimit_allow(&src->error_rl, wall_ms(), ERROR_LOG_EVERY_MS, &held))
        tly_warn("source: kafka error %s: %s%s", rd_kafka_err2name((rd_kafka_resp_err_t)err),
                 reason, held_note(held));
}

/* ---- partition table --------------------------------------------------------- */

static part_t *part_find(tly_source_t *src, const char *topic, int32_t partition)
{
    if (src->hint < src->nparts) {
        part_t *p = &src->parts[src->hint];
        if (p->partition == partition && strcmp(p->topic, topic) == 0)
            return p;
    }
    for (size_t i = 0; i < src->nparts; i++) {
        part_t *p = &src->parts[i];
        if (p->partition == partition && strcmp(p->topic, topic) == 0) {
            src->hint = i;
            return p;
        }
    }
    return NULL;
}

static part_t *part_get(tly_source_t *src, const char *topic, int32_t partition)
{
    part_t *p = part_find(src, topic, partition);
    if (p != NULL)
        return p;
    if (src->nparts == src->partcap) {
        src->partcap = src->partcap ? 2 * src->partcap : 16;
        src->parts = tly_xrealloc(src->parts, src->partcap * sizeof *src->parts);
    }
    int index = -1;
    for (size_t t = 0; t < src->cfg->kafka.ntopics && index < 0; t++)
        if (strcmp(src->cfg->kafka.topics[t], topic) == 0)
            index = (int)t;
    p = &src->parts[src->nparts++];
    *p = (part_t){.topic = xstrdup(topic),
                  .partition = partition,
                  .topic_index = index,
                  .position = -1,
                  .high = -1,
                  .high_min = -1,
                  .low = -1,
                  .last_event_ms = -1,
                  .bad_base = -1};
    return p;
}

/* True when p needs nothing more to be caught up: its lag is known and at
 * most kafka.ready_lag, or it has no position yet but nothing to apply (an
 * empty or wholly deleted log, or a start at the end). */
static bool part_caught_up(const tly_source_t *src, const part_t *p)
{
    if (p->high < 0)
        return false;
    if (p->position > p->high)
        return false; /* out of range: auto.offset.reset is about to move it */
    if (p->position >= 0)
        return p->high - p->position <= src->cfg->kafka.ready_lag;
    return p->high == 0 || p->from_end || p->low == p->high;
}

/* Copies the assigned partitions into the published table, refreshing each
 * high watermark from librdkafka's cache (no network). The cache of a
 * partition assigned again still holds the end seen when it was last
 * consumed here, until the first fetch: until a message arrives, it is not
 * taken while below the end learn_ends found at the assignment (nor at all
 * while that end is not known: ENDS_UNKNOWN), or a partition away for a
 * while would look caught up at once. */
static void publish(tly_source_t *src, int64_t now_ms)
{
    size_t n = 0;
    for (size_t i = 0; i < src->nparts; i++) {
        part_t *p = &src->parts[i];
        if (!p->assigned)
            continue;
        int64_t lo = -1, hi = -1;
        if (src->rk != NULL && rd_kafka_get_watermark_offsets(src->rk, p->topic, p->partition, &lo,
                                                              &hi) == RD_KAFKA_RESP_ERR_NO_ERROR) {
            if (hi >= 0 && hi >= p->high_min)
                p->high = hi;
            if (lo >= 0)
                p->low = lo;
        }
        /* A partition that never held a message has nothing to apply. */
        if (p->position < 0 && p->high == 0)
            p->position = 0;
        n++;
    }
    /* Ready once every partition of the current assignment caught up; it
     * stays ready until the next assignment (a burst of traffic is not a
     * reason to refuse queries). */
    if (src->assigned_once && !atomic_load_explicit(&src->ready, memory_order_relaxed)) {
        bool all = true;
        int64_t lag = 0;
        for (size_t i = 0; i < src->nparts && all; i++) {
            const part_t *p = &src->parts[i];
            if (!p->assigned)
                continue;
            all = part_caught_up(src, p);
            if (p->position >= 0 && p->high > p->position)
                lag += p->high - p->position;
        }
        if (all) {
            atomic_store_explicit(&src->ready, true, memory_order_release);
            tly_info("source: caught up with Kafka (%zu partitions, lag %" PRId64
                     " messages); serving queries",
                     n, lag);
        }
    }
    pthread_mutex_lock(&src->mu);
    if (n > src->pubcap) {
        src->pubcap = n;
        src->pub = tly_xrealloc(src->pub, n * sizeof *src->pub);
    }
    size_t j = 0;
    for (size_t i = 0; i < src->nparts; i++) {
        const part_t *p = &src->parts[i];
        if (!p->assigned)
            continue;
        tly_partition_stat_t *ps = &src->pub[j++];
        snprintf(ps->topic, sizeof ps->topic, "%s", p->topic);
        ps->partition = p->partition;
        ps->position = p->position;
        ps->high = p->high;
        ps->lag = p->position >= 0 && p->high >= 0
                      ? (p->high > p->position ? p->high - p->position : 0)
                      : -1;
        ps->last_event_ms = p->last_event_ms;
    }
    src->npub = n;
    pthread_mutex_unlock(&src->mu);
    src->dirty = false;
    src->last_publish_ms = now_ms;
}

/* The end offset of every partition of parts whose offset is
 * RD_KAFKA_OFFSET_END, from one offsets-for-times lookup (a ListOffsets
 * request per leader, one timeout in all), as a new list, NULL when there
 * is none; *err is the lookup's own result. An element has no end where its
 * err is set or its offset is negative (a logical answer: the 2.0.2 mock
 * cluster answers "end", so an embedded source does not ask). */
static rd_kafka_topic_partition_list_t *lookup_ends(tly_source_t *src,
                                                    const rd_kafka_topic_partition_list_t *parts,
                                                    rd_kafka_resp_err_t *err)
{
    *err = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (src->embedded)
        return NULL;
    rd_kafka_topic_partition_list_t *ends = rd_kafka_topic_partition_list_new(parts->cnt);
    for (int i = 0; i < parts->cnt; i++)
        if (parts->elems[i].offset == RD_KAFKA_OFFSET_END)
            rd_kafka_topic_partition_list_add(ends, parts->elems[i].topic,
                                              parts->elems[i].partition)
                ->offset = RD_KAFKA_OFFSET_END; /* as a time: the latest offset */
    if (ends->cnt == 0) {
        rd_kafka_topic_partition_list_destroy(ends);
        return NULL;
    }
    *err = rd_kafka_offsets_for_times(src->rk, ends, BROKER_TIMEOUT_MS);
    return ends;
}

/* kafka.start: window's start at now: the earliest event time any feature
 * still counts (tly_feat_earliest). */
static int64_t window_since(const tly_featset_t *fs, int64_t now_ms)
{
    int64_t since = now_ms;
    for (size_t i = 0; i < fs->nfeats; i++) {
        int64_t s = tly_feat_earliest(&fs->feats[i], now_ms);
        if (s < since)
            since = s;
    }
    return since;
}

/* Replica mode: whether this process assigned, or restored from a
 * snapshot, some partition of topic, so that a partition of it it never
 * knew was added since. (In shard mode a partition new here is usually
 * one another instance read: kafka.start decides, unless it was added
 * since: shard_added.) */
static bool replica_known_topic(tly_source_t *src, const char *topic)
{
    if (src->cfg->kafka.mode != TLY_MODE_REPLICA)
        return false;
    for (size_t i = 0; i < src->nparts; i++)
        if (strcmp(src->parts[i].topic, topic) == 0)
            return true;
    return false;
}

/* Shard mode: whether partition number p was added to the topics since
 * this process's first assignment (their count then is first_count). */
static bool shard_added(const tly_source_t *src, int32_t p)
{
    return src->shard != NULL && src->first_count > 0 && p >= src->first_count;
}

/* Writes the start offset of every partition in parts: the position this
 * process reached (or was told to resume at), else kafka.start's; with
 * latest in replica mode, a partition this process never knew of a topic
 * it assigned or restored before (added to it since: all of its messages
 * came after tallyd started) starts at its beginning, as does in shard mode
 * a partition added since the first assignment (shard_added). A
 * partition partly restored (tly_source_catch_up) whose start is its
 * restored position has nothing to replay: it is at that position now.
 * Returns lookup_ends' answer for the partitions that start at the end
 * (caller frees; NULL: not asked), for learn_ends. */
static rd_kafka_topic_partition_list_t *choose_offsets(tly_source_t *src,
                                                       rd_kafka_topic_partition_list_t *parts)
{
    tly_kafka_start_t start = src->cfg->kafka.start;
    if (start == TLY_START_WINDOW && src->embedded)
        start = TLY_START_EARLIEST;
    rd_kafka_topic_partition_list_t *times = rd_kafka_topic_partition_list_new(parts->cnt);
    int64_t now = wall_ms(), since = window_since(src->fs, now);

    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        const part_t *p = part_find(src, tp->topic, tp->partition);
        if (p != NULL && p->position >= 0)
            tp->offset = p->position;
        else if (start == TLY_START_LATEST && p == NULL &&
                 (replica_known_topic(src, tp->topic) || shard_added(src, tp->partition)))
            tp->offset = RD_KAFKA_OFFSET_BEGINNING; /* a partition added since */
        else if (start == TLY_START_LATEST)
            tp->offset = RD_KAFKA_OFFSET_END;
        else if (start == TLY_START_EARLIEST)
            tp->offset = RD_KAFKA_OFFSET_BEGINNING;
        else
            rd_kafka_topic_partition_list_add(times, tp->topic, tp->partition)->offset = since;
    }
    if (times->cnt > 0) {
        rd_kafka_resp_err_t err = rd_kafka_offsets_for_times(src->rk, times, BROKER_TIMEOUT_MS);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
            tly_warn("source: looking up offsets at now - %" PRId64
                     " ms failed (%s); those partitions start at the beginning",
                     now - since, rd_kafka_err2str(err));
        for (int i = 0; i < times->cnt; i++) {
            const rd_kafka_topic_partition_t *t = &times->elems[i];
            int64_t off = RD_KAFKA_OFFSET_BEGINNING;
            if (err == RD_KAFKA_RESP_ERR_NO_ERROR && t->err == RD_KAFKA_RESP_ERR_NO_ERROR)
                off = t->offset >= 0 ? t->offset : RD_KAFKA_OFFSET_END;
            else if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
                tly_warn("source: %s[%" PRId32 "]: offset lookup by time failed (%s); "
                         "starting at the beginning",
                         t->topic, t->partition, rd_kafka_err2str(t->err));
            rd_kafka_topic_partition_t *tp =
                rd_kafka_topic_partition_list_find(parts, t->topic, t->partition);
            if (tp != NULL)
                tp->offset = off;
        }
    }
    rd_kafka_topic_partition_list_destroy(times);

    /* "The end" means the end now, as assignment is logged and published:
     * left logical, librdkafka would resolve it at its first fetch, and
     * events produced in between would be skipped. So the partitions that
     * start there, and only they (this runs inside the rebalance callback,
     * where every wait holds the group's rebalance: the others' ends are
     * looked up off it, see seek_ends), get their ends from one lookup
     * here (not a query and a timeout per partition); partition by
     * partition only where that lookup was not made or answered with a
     * logical offset. */
    rd_kafka_resp_err_t eerr;
    rd_kafka_topic_partition_list_t *ends = lookup_ends(src, parts, &eerr);
    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        if (tp->offset != RD_KAFKA_OFFSET_END)
            continue;
        const rd_kafka_topic_partition_t *e =
            ends ? rd_kafka_topic_partition_list_find(ends, tp->topic, tp->partition) : NULL;
        /* an answer that came counts even if another leader's did not */
        int64_t end = e != NULL && e->err == RD_KAFKA_RESP_ERR_NO_ERROR ? e->offset : -1;
        rd_kafka_resp_err_t err = end >= 0 || e == NULL                ? RD_KAFKA_RESP_ERR_NO_ERROR
                                  : eerr != RD_KAFKA_RESP_ERR_NO_ERROR ? eerr
                                                                       : e->err;
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR && end < 0) {
            int64_t lo = -1;
            err = rd_kafka_query_watermark_offsets(src->rk, tp->topic, tp->partition, &lo, &end,
                                                   BROKER_TIMEOUT_MS);
        }
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR && end >= 0)
            tp->offset = end;
        else
            tly_warn("source: %s[%" PRId32 "]: looking up the end offset failed (%s); "
                     "librdkafka resolves it at the first fetch",
                     tp->topic, tp->partition, rd_kafka_err2str(err));
    }

    /* A partition whose state is partly restored (tly_source_catch_up)
     * starts where the rebuilt features need it, but no later than the
     * restored position: the restored features need every event from there. */
    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        part_t *p = part_find(src, tp->topic, tp->partition);
        if (p == NULL || p->catchup_until <= 0 || p->position >= 0)
            continue;
        if (tp->offset == RD_KAFKA_OFFSET_END || tp->offset > p->catchup_until)
            tp->offset = p->catchup_until;
        if (tp->offset == p->catchup_until) { /* nothing to replay */
            p->position = p->catchup_until;
            p->catchup_until = 0;
        }
    }
    return ends;
}

static void describe_offset(int64_t off, char *buf, size_t cap)
{
    if (off == RD_KAFKA_OFFSET_BEGINNING)
        snprintf(buf, cap, "beginning");
    else if (off == RD_KAFKA_OFFSET_END)
        snprintf(buf, cap, "end");
    else
        snprintf(buf, cap, "%" PRId64, off);
}

/* The partition count of topic from the brokers' metadata (which also
 * refreshes librdkafka's), waiting at most timeout_ms; -1 with *errp set
 * when there is none. */
static int32_t topic_partition_count(tly_source_t *src, const char *topic, int timeout_ms,
                                     rd_kafka_resp_err_t *errp)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(src->rk, topic, NULL);
    rd_kafka_resp_err_t err =
        rkt ? rd_kafka_metadata(src->rk, 0, rkt, &md, timeout_ms) : rd_kafka_last_error();
    int32_t n = -1;
    if (md != NULL) {
        /* the topic's own error, if any, names the failure */
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
            err = md->topic_cnt == 1 ? md->topics[0].err : RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC;
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
            n = md->topics[0].partition_cnt;
        rd_kafka_metadata_destroy(md);
    }
    if (rkt != NULL)
        rd_kafka_topic_destroy(rkt);
    *errp = err;
    return n;
}

/* Shard mode: the partition count every configured topic shares, or -1
 * with a fatal error recorded (topics keyed by entities must be
 * co-partitioned: one partition number names one owner). */
static int32_t shard_partition_count(tly_source_t *src)
{
    const tly_config_t *cfg = src->cfg;
    int32_t common = 0;
    for (size_t t = 0; t < cfg->kafka.ntopics; t++) {
        rd_kafka_resp_err_t err;
        int32_t n = topic_partition_count(src, cfg->kafka.topics[t], BROKER_TIMEOUT_MS, &err);
        if (n < 0) {
            tly_warn("source: no metadata for topic %s (%s); owner routing waits for it",
                     cfg->kafka.topics[t], rd_kafka_err2str(err));
            return 0;
        }
        if (n > TLY_SHARD_MAX_PARTITIONS || (common != 0 && n != common)) {
            if (!atomic_load_explicit(&src->fatal_set, memory_order_acquire)) {
                if (n > TLY_SHARD_MAX_PARTITIONS)
                    snprintf(src->fatal_msg, sizeof src->fatal_msg,
                             "topic %s has %" PRId32 " partitions; shard mode supports at most %d",
                             cfg->kafka.topics[t], n, TLY_SHARD_MAX_PARTITIONS);
                else
                    snprintf(src->fatal_msg, sizeof src->fatal_msg,
                             "topic %s has %" PRId32 " partitions and %s has %" PRId32
                             "; in shard mode every topic must have the same count (one "
                             "partition number names one owner)",
                             cfg->kafka.topics[t], n, cfg->kafka.topics[0], common);
                atomic_store_explicit(&src->fatal_set, true, memory_order_release);
            }
            tly_error("source: %s; the source stops", src->fatal_msg);
            atomic_store(&src->stop, true);
            return -1;
        }
        common = n;
    }
    return common;
}

typedef struct {
    const tly_featset_t *fs;
    int32_t nparts;
    const uint64_t *lost; /* partition bitmap */
} lost_t;

static bool in_lost_partition(uint32_t type, const char *id, size_t len, void *ctx)
{
    const lost_t *l = ctx;
    (void)type;
    int32_t p = tly_partition_of(id, len, l->nparts);
    return l->lost[p / 64] >> (p % 64) & 1;
}

/* Shard mode, on assignment: drops the entities of the partitions this
 * process held before the rebalance and does not hold now, and forgets
 * those partitions' positions (assigned again later, they are rebuilt
 * from history). Returns false when the partition counts stop the source.
 * The new ownership is published once the assignment succeeded
 * (shard_owned). */
static bool shard_reassign(tly_source_t *src, const rd_kafka_topic_partition_list_t *parts)
{
    int32_t nparts = shard_partition_count(src);
    if (nparts < 0)
        return false; /* fatal: the source stops */
    int32_t before = tly_shard_partitions(src->shard);
    if (nparts > before && before > 0)
        tly_warn("source: the topics grew from %" PRId32 " to %" PRId32 " partitions: keys now "
                 "map to other partitions (murmur2 mod %" PRId32 "), and an id's events from "
                 "before stay in its old partition, where they are no longer its own; its "
                 "values lack them until they leave the windows",
                 before, nparts, nparts);
    /* Without metadata the router keeps the count it knew: a count of 0
     * would have every id answered here, those of the partitions just lost
     * too, from entities that stay held (below) but no longer follow their
     * partitions. (Counts only grow, and differing ones stop the source.) */
    if (nparts > 0)
        tly_shard_set_partitions(src->shard, nparts);
    if (src->first_count == 0 && nparts > 0)
        src->first_count = nparts;
    uint64_t now_held[TLY_SHARD_MAX_PARTITIONS / 64] = {0};
    for (int i = 0; i < parts->cnt; i++) {
        int32_t p = parts->elems[i].partition;
        if (p >= 0 && p < TLY_SHARD_MAX_PARTITIONS)
            now_held[p / 64] |= UINT64_C(1) << (p % 64);
    }
    uint64_t lost[TLY_SHARD_MAX_PARTITIONS / 64];
    bool any = false;
    for (size_t w = 0; w < TLY_SHARD_MAX_PARTITIONS / 64; w++) {
        lost[w] = src->held[w] & ~now_held[w];
        any = any || lost[w] != 0;
        /* Without the partition count (no metadata), entities cannot be
         * told apart by partition: the lost stay in `held`, to be dropped
         * at the next assignment that knows it, unless held again by then. */
        src->held[w] = nparts > 0 ? now_held[w] : now_held[w] | lost[w];
    }
    if (any && nparts > 0) {
        for (size_t i = 0; i < src->nparts; i++) {
            part_t *p = &src->parts[i];
            if (p->partition < TLY_SHARD_MAX_PARTITIONS && lost[p->partition / 64] >> (p->partition % 64) & 1) {
                p->position = -1;
                p->last_event_ms = -1;
                p->catchup_until = 0;
            }
        }
        lost_t l = {.fs = src->fs, .nparts = nparts, .lost = lost};
        size_t n = tly_store_drop(src->store, in_lost_partition, &l);
        atomic_fetch_add_explicit(&src->dropped_entities, n, memory_order_relaxed);
        tly_info("source: dropped %zu entities of the partitions this instance no longer owns", n);
    }
    return true;
}

/* Shard mode, once parts are assigned: this instance answers for them and
 * names itself their owner in the endpoints topic. */
static void shard_owned(tly_source_t *src, const rd_kafka_topic_partition_list_t *parts)
{
    int32_t *owned = tly_xrealloc(NULL, (size_t)(parts->cnt + 1) * sizeof *owned);
    for (int i = 0; i < parts->cnt; i++)
        owned[i] = parts->elems[i].partition;
    tly_shard_assigned(src->shard, owned, (size_t)parts->cnt);
    free(owned);
}

/* Records the end offsets an offsets-for-times lookup of "latest" found
 * (ends, NULL when it was not made) for the assigned partitions whose end
 * is not known yet, so readiness is known without waiting for a fetch
 * reply, which the broker may hold for fetch.wait.max.ms: a partition
 * resumed at its end (a restart from a snapshot) is caught up at once. An
 * answer that came counts even if another leader's did not (the lookup's
 * own result is an error then); a partition whose end a message brought
 * meanwhile (high_min -1) keeps that fresher one. */
static void learn_ends(tly_source_t *src, const rd_kafka_topic_partition_list_t *ends)
{
    if (ends == NULL)
        return;
    for (int i = 0; i < ends->cnt; i++) {
        const rd_kafka_topic_partition_t *e = &ends->elems[i];
        if (e->err != RD_KAFKA_RESP_ERR_NO_ERROR || e->offset < 0)
            continue;
        part_t *p = part_find(src, e->topic, e->partition);
        if (p != NULL && p->assigned && p->high_min == ENDS_UNKNOWN) {
            p->high = e->offset;
            p->high_min = e->offset;
        }
    }
}

/* Assigns parts (offsets chosen here) and records them in the table. */

static void assign(tly_source_t *src, rd_kafka_topic_partition_list_t *parts)
{
    bool owns = src->shard != NULL && shard_reassign(src, parts);
    rd_kafka_topic_partition_list_t *ends = choose_offsets(src, parts);
    char line[ASSIGN_LOG_CAP];
    size_t used = 0;
    line[0] = '\0';
    for (int i = 0; i < parts->cnt && used < sizeof line; i++) {
        const rd_kafka_topic_partition_t *tp = &parts->elems[i];
        char off[32];
        describe_offset(tp->offset, off, sizeof off);
        int w = snprintf(line + used, sizeof line - used, "%s%s[%" PRId32 "]@%s", i ? " " : "",
                         tp->topic, tp->partition, off);
        if (w < 0)
            break;
        used += (size_t)w;
    }
    rd_kafka_resp_err_t err = rd_kafka_assign(src->rk, parts);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        atomic_fetch_add_explicit(&src->errors, 1, memory_order_relaxed);
        tly_error("source: assigning %d partitions failed: %s", parts->cnt, rd_kafka_err2str(err));
        if (ends != NULL)
            rd_kafka_topic_partition_list_destroy(ends);
        return;
    }
    tly_info("source: assigned %d partitions: %s%s", parts->cnt, line,
             used >= sizeof line ? "..." : "");
    if (owns)
        shard_owned(src, parts);
    for (size_t i = 0; i < src->nparts; i++)
        src->parts[i].assigned = false;
    for (int i = 0; i < parts->cnt; i++) {
        const rd_kafka_topic_partition_t *tp = &parts->elems[i];
        part_t *p = part_get(src, tp->topic, tp->partition);
        p->assigned = true;
        p->bad_base = -1;
        p->bad_unsure = false;
        /* Not caught up before its end is known (learn_ends below, else
         * seek_ends, or the first message): the end cached when it was last
         * consumed here is not taken. An embedded source looks up no ends
         * and takes the cache. */
        p->high_min = src->embedded ? -1 : ENDS_UNKNOWN;
        if (!src->embedded)
            p->high = -1;
        p->from_end = tp->offset == RD_KAFKA_OFFSET_END && p->position < 0;
        if (tp->offset >= 0)
            p->position = tp->offset;
    }
    learn_ends(src, ends);
    if (ends != NULL)
        rd_kafka_topic_partition_list_destroy(ends);
    /* The others' ends: the nudger looks them up (seek_ends), at once.
     * Without a nudger (it could not start) they would wait for a message:
     * the cache is taken, as an embedded source does. */
    for (size_t i = 0; i < src->nparts && !src->nudger_started; i++)
        if (src->parts[i].assigned && src->parts[i].high_min == ENDS_UNKNOWN)
            src->parts[i].high_min = -1;
    src->assign_gen++;
    src->ends_wanted = !src->embedded && src->nudger_started;
    src->ends_next_ms = 0;
    src->ends_backoff_ms = ENDS_RETRY_MS;
    /* Queries wait (-LOADING) until the new partitions catch up. */
    if (atomic_exchange(&src->ready, false))
        tly_info("source: new assignment; queries get -LOADING until it caught up");
    src->assigned_once = true;
}

static void unassign(tly_source_t *src, int count)
{
    rd_kafka_resp_err_t err = rd_kafka_assign(src->rk, NULL);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
        tly_warn("source: unassigning failed: %s", rd_kafka_err2str(err));
    tly_info("source: %d partitions revoked", count);
    for (size_t i = 0; i < src->nparts; i++)
        src->parts[i].assigned = false;
    src->assign_gen++; /* a lookup's answer for the old assignment is dropped */
    src->ends_wanted = false;
    if (src->shard != NULL) {
        /* Until the next assignment nothing is owned, and queries wait:
         * no assignment to judge readiness by (publish would find the
         * empty one caught up at once). */
        tly_shard_revoked(src->shard);
        src->assigned_once = false;
        if (atomic_exchange(&src->ready, false))
            tly_info("source: rebalancing; queries get -LOADING until the new assignment "
                     "caught up");
    }
}

static void flush(tly_source_t *src);

/* Eager protocol only (partition.assignment.strategy range,roundrobin):
 * every rebalance revokes the whole assignment, then assigns anew. */
static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    tly_source_t *src = opaque;
    (void)rk;
    flush(src); /* the messages collected before it apply first */
    atomic_fetch_add_explicit(&src->rebalances, 1, memory_order_relaxed);
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        assign(src, parts);
    } else {
        if (err != RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS)
            tly_warn("source: rebalance error: %s", rd_kafka_err2str(err));
        unassign(src, parts->cnt);
    }
    publish(src, wall_ms());
}

/* ---- poll thread ------------------------------------------------------------- */

/* Records an offset reset of p: the consumer's next message is at offset
 * `to` where `from` was expected. `lost` messages are known to be gone
 * (deleted by retention before they were applied), or -1 when none are
 * (the expected offset lay beyond the log). */
static void note_gap(tly_source_t *src, const part_t *p, int64_t from, int64_t to, int64_t lost)
{
    atomic_fetch_add_explicit(&src->gaps, 1, memory_order_relaxed);
    if (lost > 0) {
        atomic_fetch_add_explicit(&src->gap_messages, (uint64_t)lost, memory_order_relaxed);
        tly_warn("source: %s[%" PRId32 "]: offset %" PRId64 " is no longer in Kafka (the log "
                 "starts at %" PRId64 "); auto.offset.reset moved consumption to %" PRId64
                 ": %" PRId64 " messages were never applied",
                 p->topic, p->partition, from, p->low, to, lost);
    } else {
        tly_warn("source: %s[%" PRId32 "]: offset %" PRId64 " is out of range (log %" PRId64
                 "..%" PRId64 "); auto.offset.reset moved consumption to %" PRId64
                 "; events from there on are applied%s",
                 p->topic, p->partition, from, p->low, p->high, to,
                 to < from ? " (a recreated topic, or a stale resume position?)" : "");
    }
}

/* Checks m's offset against the position p expected. Kafka moves a
 * consumer only forward one message at a time, except across compacted
 * or transaction-marker offsets (forward, within the log) and when
 * auto.offset.reset moves it because the expected offset left the log:
 * backwards, or forward past the log start. */
static void check_continuity(tly_source_t *src, part_t *p, const rd_kafka_message_t *m)
{
    int64_t expected = p->position;
    if (expected < 0 || m->offset == expected)
        return;
    if (m->offset > expected) {
        int64_t lo = -1, hi = -1;
        if (rd_kafka_get_watermark_offsets(src->rk, p->topic, p->partition, &lo, &hi) ==
                RD_KAFKA_RESP_ERR_NO_ERROR &&
            lo >= 0)
            p->low = lo;
        if (p->low <= expected)
            return; /* compaction or transaction markers: nothing lost */
        note_gap(src, p, expected, m->offset, (p->low < m->offset ? p->low : m->offset) - expected);
        return;
    }
    note_gap(src, p, expected, m->offset, -1);
}

/* ---- the batch: collect on the poll thread, apply on the appliers ---------- */

/* Moves p's position forward to `to` with no message at the offsets
 * passed (the end of the partition, or a batch skipped): a partly restored
 * partition whose replay reaches its restored position is caught up, and
 * with no checkpoint hook the position is stored (store_ends) once the
 * messages collected before are applied. */
static void advance(tly_source_t *src, part_t *p, int64_t to)
{
    p->position = to;
    p->from_end = false;
    if (p->catchup_until > 0 && p->position >= p->catchup_until)
        p->catchup_until = 0;
    if (src->checkpoint == NULL) {
        p->store_end = true;
        src->ends_to_store = true;
    }
    src->dirty = true; /* the next empty poll publishes the new lag */
}

/* Poll thread, for an end-of-partition event m: the consumer read all that
 * is readable of m's partition and fetches next at m->offset, which lies
 * past any transaction marker (or aborted transaction) that ended the log
 * (see "Positions past what never becomes a message"). Moves the position
 * there when that is ahead of it: never back, and only for a partition
 * assigned now (an event queued before a revocation names an old
 * assignment). A partly restored partition whose replay reaches its
 * restored position by this is caught up, as collect would find. With no
 * checkpoint hook the new position is stored (store_ends) once the
 * messages collected before it are applied; with one, snapshots carry it
 * and tly_source_commit commits it. */
static void reach_end(tly_source_t *src, const rd_kafka_message_t *m)
{
    if (m->rkt == NULL || m->offset < 0)
        return;
    part_t *p = part_find(src, rd_kafka_topic_name(m->rkt), m->partition);
    if (p == NULL || !p->assigned || m->offset <= p->position)
        return;
    p->high_min = -1; /* the fetch that found the end refreshed the cached one */
    advance(src, p, m->offset);
}

/*
 * A message batch librdkafka cannot decode (it cannot be decompressed, or
 * breaks the format): librdkafka 2.0.2 reports an error naming the batch's
 * first offset and fetches the same batch again and again, never past it,
 * so the partition would stop there for good. The poll thread skips the
 * batch, once a second fetch of the same offset failed the same way (an
 * error that does not come again costs no message). The error does not
 * say where the batch ends, so the poll thread finds out by
 * seeking (probe_next): a seek to an offset in the batch brings the same
 * error again; one past it brings a message (dropped: it is fetched again
 * once the batch is skipped), another batch's error or the end of the
 * partition. The probes double their distance from the first offset until
 * one lands past the batch, then halve the interval between the last
 * offset known inside and the first known past it: about 2·log2(n) probes
 * for a batch of n messages, each a fetch (after librdkafka's
 * fetch.error.backoff.ms when the batch answered). Every seek waits until
 * the fetcher took it, so no answer to an earlier probe comes after it
 * (librdkafka drops what was fetched before a seek). Probes go no further
 * than the partition's end offset, so none is out of range. No offset past the
 * batch is ever skipped; the offsets skipped are counted (INFO
 * messages_undecodable) and the position past them is stored (advance).
 */

/* Seeks p's consumer to `to` and waits until the fetcher took it. */
static bool seek_part(tly_source_t *src, part_t *p, int64_t to)
{
    p->seek_no = ++src->seeks;
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(list, p->topic, p->partition)->offset = to;
    rd_kafka_error_t *error = rd_kafka_seek_partitions(src->rk, list, SEEK_TIMEOUT_MS);
    rd_kafka_resp_err_t err = error != NULL ? rd_kafka_error_code(error) : list->elems[0].err;
    if (error != NULL)
        rd_kafka_error_destroy(error);
    rd_kafka_topic_partition_list_destroy(list);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
        tly_warn("source: %s[%" PRId32 "]: seeking to offset %" PRId64 " failed: %s", p->topic,
                 p->partition, to, rd_kafka_err2str(err));
    return err == RD_KAFKA_RESP_ERR_NO_ERROR;
}

/* Ends p's probing unfinished (a seek failed, the batch decoded when
 * fetched again, or the consumer moved on its own): what comes next is
 * taken as usual. A failed seek may yet be carried out (librdkafka queues
 * it before it gives up waiting), so the consumer may jump past offsets
 * never read: `unsure` has collect count and report such a jump. */
static void probe_abandon(part_t *p, const char *why, bool unsure)
{
    tly_warn("source: %s[%" PRId32 "]: the message batch at offset %" PRId64
             " could not be decoded; %s%s",
             p->topic, p->partition, p->bad_base, why,
             unsure ? "; offsets the consumer skips from here are reported" : ": nothing skipped");
    p->bad_base = -1;
    p->bad_unsure = unsure;
}

/* Seeks p to its next probe, or past the batch once its end is known. */
static void probe_next(tly_source_t *src, part_t *p)
{
    if (p->bad_out == p->bad_in + 1) {
        if (!seek_part(src, p, p->bad_out)) {
            probe_abandon(p, "seeking past it failed", true);
            return;
        }
        atomic_fetch_add_explicit(&src->undecodable, (uint64_t)(p->bad_out - p->bad_from),
                                  memory_order_relaxed);
        tly_info("source: %s[%" PRId32 "]: skipped offsets %" PRId64 "..%" PRId64
                 " of the batch that could not be decoded (probes: %" PRId64
                 "); consuming again from %" PRId64,
                 p->topic, p->partition, p->bad_from, p->bad_in, p->bad_probes, p->bad_out);
        p->bad_base = -1;
        advance(src, p, p->bad_out);
        return;
    }
    int64_t to;
    if (p->bad_out >= 0) {
        to = p->bad_in + (p->bad_out - p->bad_in) / 2;
    } else {
        int64_t lo = -1, hi = -1;
        (void)rd_kafka_get_watermark_offsets(src->rk, p->topic, p->partition, &lo, &hi);
        to = hi > p->bad_in ? p->bad_in + (p->bad_in - p->bad_from + 1) : p->bad_in + 1;
        if (hi > p->bad_in && to > hi)
            to = hi; /* the end: never out of range */
    }
    p->bad_probe = to;
    p->bad_probes++;
    if (!seek_part(src, p, to))
        probe_abandon(p, "seeking to find its end failed", true);
}

/* Poll thread, for a consumer error m that says librdkafka cannot decode
 * the batch at m->offset: starts or goes on probing m's partition. False
 * when m names no partition of the assignment. */
static bool undecodable(tly_source_t *src, const rd_kafka_message_t *m)
{
    if (m->rkt == NULL || m->offset < 0)
        return false;
    part_t *p = part_find(src, rd_kafka_topic_name(m->rkt), m->partition);
    if (p == NULL || !p->assigned)
        return false;
    if (p->bad_base >= 0 && p->bad_probes == 0 && m->offset != p->bad_base)
        p->bad_base = -1; /* not the batch fetched again: start over with this one */
    if (p->bad_base < 0) {
        /* The consumer fetched at its position, in this batch. The same
         * offset is fetched again first (probe 0), so that an error that
         * does not come again costs no message. */
        p->bad_base = m->offset;
        p->bad_from = p->position > m->offset ? p->position : m->offset;
        p->bad_in = p->bad_from;
        p->bad_out = -1;
        p->bad_probe = p->bad_from;
        p->bad_probes = 0;
        if (!seek_part(src, p, p->bad_from))
            probe_abandon(p, "seeking to fetch it again failed", true);
        return true;
    }
    if (m->offset == p->bad_base) {
        if (p->bad_probes == 0)
            tly_warn("source: %s[%" PRId32 "]: librdkafka cannot decode the message batch at "
                     "offset %" PRId64 ", fetched twice (%s); skipping it from offset %" PRId64
                     " (INFO messages_undecodable counts the offsets skipped)",
                     p->topic, p->partition, m->offset, rd_kafka_message_errstr(m), p->bad_from);
        if (p->bad_probe > p->bad_in)
            p->bad_in = p->bad_probe; /* the probe lies in the batch */
    } else if (p->bad_probe > p->bad_in && (p->bad_out < 0 || p->bad_probe < p->bad_out)) {
        p->bad_out = p->bad_probe; /* another batch that cannot be decoded: past ours */
    }
    probe_next(src, p);
    return true;
}

/* Poll thread, for a message or end-of-partition event m of partition p
 * while p is probed: true when m answered the probe (and was used up),
 * false when the consumer moved on its own (the probing ends; m is taken
 * as usual). */
static bool probe_answer(tly_source_t *src, part_t *p, const rd_kafka_message_t *m)
{
    if (p->bad_probes == 0 && m->offset == p->bad_probe) {
        probe_abandon(p, "fetched again, it decoded", false);
        return false;
    }
    if (m->offset < p->bad_probe || p->bad_probe <= p->bad_in) {
        probe_abandon(p, "the consumer moved elsewhere meanwhile", false);
        return false;
    }
    if (p->bad_out < 0 || p->bad_probe < p->bad_out)
        p->bad_out = p->bad_probe; /* the probe lies past the batch */
    probe_next(src, p);
    return true;
}

/* Poll thread, for the next message (or end) of p at offset `at`: after a
 * failed seek of a probing (bad_unsure), one that took effect after all
 * jumped over offsets never read; they are counted and reported. */
static void jumped_unsure(tly_source_t *src, part_t *p, int64_t at)
{
    if (!p->bad_unsure)
        return;
    p->bad_unsure = false;
    if (p->position < 0 || at <= p->position)
        return;
    atomic_fetch_add_explicit(&src->undecodable, (uint64_t)(at - p->position),
                              memory_order_relaxed);
    tly_warn("source: %s[%" PRId32 "]: consumption went on at offset %" PRId64
             " after a failed seek; offsets %" PRId64 "..%" PRId64
             " were skipped (counted in messages_undecodable)",
             p->topic, p->partition, at, p->position, at - 1);
}

/* Poll thread: takes m into the batch (or, for an error or end-of-partition
 * event, handles and frees it at once). The partition's position moves at
 * collection, so continuity is checked message by message; nothing reads
 * it before the batch is flushed. */
static void collect(tly_source_t *src, rd_kafka_message_t *m, int64_t now_ms)
{
    uint64_t held;
    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
        /* not a message: counted nowhere (messages_consumed, polled) */
        part_t *pp = m->rkt ? part_find(src, rd_kafka_topic_name(m->rkt), m->partition) : NULL;
        if (pp == NULL || !pp->assigned || pp->bad_base < 0 || !probe_answer(src, pp, m)) {
            if (pp != NULL && pp->assigned)
                jumped_unsure(src, pp, m->offset);
            reach_end(src, m);
        }
        rd_kafka_message_destroy(m);
        return;
    }
    src->polled++;
    if (m->err) {
        if (m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET) {
            /* auto.offset.reset=error (a kafka.properties choice): the
             * partition stops until restarted; nothing is skipped. */
            atomic_fetch_add_explicit(&src->gaps, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&src->errors, 1, memory_order_relaxed);
            tly_warn("source: %s[%" PRId32 "]: offset %" PRId64
                     " is out of range and auto.offset.reset is error; the partition stops: %s",
                     m->rkt ? rd_kafka_topic_name(m->rkt) : "-", m->partition, m->offset,
                     rd_kafka_message_errstr(m));
        } else if ((m->err == RD_KAFKA_RESP_ERR__BAD_COMPRESSION ||
                    m->err == RD_KAFKA_RESP_ERR__BAD_MSG) &&
                   undecodable(src, m)) {
            atomic_fetch_add_explicit(&src->errors, 1, memory_order_relaxed);
        } else {
            atomic_fetch_add_explicit(&src->errors, 1, memory_order_relaxed);
            if (ratelimit_allow(&src->consumer_rl, now_ms, ERROR_LOG_EVERY_MS, &held))
                tly_warn("source: consumer error on %s[%" PRId32 "]: %s%s",
                         m->rkt ? rd_kafka_topic_name(m->rkt) : "-", m->partition,
                         rd_kafka_message_errstr(m), held_note(held));
        }
        rd_kafka_message_destroy(m);
        return;
    }
    part_t *p = part_get(src, rd_kafka_topic_name(m->rkt), m->partition);
    if (p->bad_base >= 0 && p->assigned && probe_answer(src, p, m)) {
        rd_kafka_message_destroy(m); /* fetched again once the batch is skipped */
        return;
    }
    atomic_fetch_add_explicit(&src->messages, 1, memory_order_relaxed);
    src->msg_bytes16 = src->msg_bytes16 == 0 ? 16 * (uint64_t)m->len
                                             : src->msg_bytes16 - src->msg_bytes16 / 16 + m->len;
    if (p->bad_unsure)
        jumped_unsure(src, p, m->offset);
    check_continuity(src, p, m);
    p->from_end = false;
    p->high_min = -1; /* the fetch that brought m refreshed the cached end */
    /* below the restored position, it feeds only the features not restored */
    bool replayed = p->catchup_until > 0 && m->offset < p->catchup_until;
    p->position = m->offset + 1;
    if (p->catchup_until > 0 && p->position >= p->catchup_until)
        p->catchup_until = 0; /* the replay reached it, whether more comes or not */
    /* parts may move when part_get grows it: items name their partition by
     * index. The message timestamp is read only when it is the event time
     * (not free in librdkafka 2.0.2). */
    const tly_event_rules_t *rules =
        p->topic_index >= 0 ? &src->fs->topics[p->topic_index] : &src->fs->events;
    src->msgs[src->nbatch] = m;
    src->batch[src->nbatch++] = (tly_apply_item_t){
        .payload = m->payload,
        .len = m->payload ? m->len : 0,
        .offset = m->offset,
        .kafka_ts_ms = rules->time_field < 0 ? rd_kafka_message_timestamp(m, NULL) : -1,
        .partition = m->partition,
        .part = (uint32_t)(p - src->parts),
        .topic = p->topic_index,
        .replayed = replayed,
        .time_ms = -1};
}

/* Poll thread, replica mode: collects what else the consumer queue holds,
 * up to a full batch, taking many messages a call
 * (rd_kafka_consume_batch_queue: the clock and the poll bookkeeping once a
 * call instead of once a message; bench/README.md, "Kafka"). A seek
 * made while they are collected (probing a batch that cannot be decoded)
 * outdates the rest of that partition's messages in hand, which
 * rd_kafka_consumer_poll would have dropped as outdated: they are freed
 * unread, and the partition is fetched again from where the seek put it.
 * Shard mode polls message by message instead: a rebalance callback
 * served inside a batch call would flush before the messages already
 * taken were collected. */
static void collect_more(tly_source_t *src, int64_t now_ms)
{
    while (src->nbatch < BATCH_MAX) {
        /* only a seek made while this call's messages are collected
         * outdates them: what a call returns after a seek may be the
         * partition's new messages */
        const uint64_t seeks = src->seeks;
        ssize_t n = rd_kafka_consume_batch_queue(src->cq, 0, src->more, BATCH_MAX - src->nbatch);
        if (n <= 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            rd_kafka_message_t *m = src->more[i];
            if (src->seeks != seeks && m->rkt != NULL) {
                const part_t *p = part_find(src, rd_kafka_topic_name(m->rkt), m->partition);
                if (p != NULL && p->seek_no > seeks) {
                    rd_kafka_message_destroy(m);
                    continue;
                }
            }
            collect(src, m, now_ms);
        }
    }
}

/* After the batch was applied, in message order: counters, rejection
 * logs, offset store, and the messages are freed. The offset is stored once
 * per partition, from its last message in the batch: storing every offset
 * in turn leaves the same stored offset and takes librdkafka's partition
 * lock once per message. */
/* Shard mode: subscribes to the topics (again: the group rebalances). */
static rd_kafka_resp_err_t subscribe(tly_source_t *src)
{
    const tly_config_t *cfg = src->cfg;
    rd_kafka_topic_partition_list_t *topics =
        rd_kafka_topic_partition_list_new((int)cfg->kafka.ntopics);
    for (size_t t = 0; t < cfg->kafka.ntopics; t++)
        rd_kafka_topic_partition_list_add(topics, cfg->kafka.topics[t], RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t err = rd_kafka_subscribe(src->rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    return err;
}

/* Shard mode, a batch with events rejected as misrouted (before settle
 * counts them and stores their offsets): the topics may have grown, and
 * the producer learnt the new count before this instance, whose group
 * rebalances only at librdkafka's next metadata refresh
 * (topic.metadata.refresh.interval.ms, 5 minutes by default). Looks the
 * topics' partition counts up (at most once per RECOUNT_EVERY_MS); when
 * one grew past every count the router knows, the router learns it
 * (tly_shard_note_count: batches made from then on take events placed by
 * either count) and the consumer is to subscribe again (poll_main, outside
 * the rebalance callback that may have called this through flush), so that
 * the group rebalances now and the new partitions get their owners
 * (librdkafka 2.0.2 rebalances on its own only at a refresh of the group's
 * metadata). Whenever the counts changed since the batch was decoded
 * (routes_gen: this lookup, or one made while the batch was in flight), its
 * events rejected as misrouted are judged again by the counts known now
 * and applied if they pass (none of them was applied: every applier of a
 * batch judges by the same counts). */
static void shard_recheck(tly_source_t *src, tly_apply_item_t *items, size_t n, int64_t now_ms,
                          uint64_t routes_gen)
{
    size_t first = 0;
    while (first < n && items[first].err != TLY_E_EV_MISROUTED)
        first++;
    if (first == n)
        return;
    if (now_ms >= src->recount_next_ms) {
        uint64_t held;
        src->recount_next_ms = now_ms + RECOUNT_EVERY_MS;
        const tly_config_t *cfg = src->cfg;
        int32_t known = tly_shard_max_count(src->shard), grown = 0;
        for (size_t t = 0; t < cfg->kafka.ntopics; t++) {
            rd_kafka_resp_err_t err;
            int32_t c = topic_partition_count(src, cfg->kafka.topics[t], RECOUNT_TIMEOUT_MS, &err);
            if (c < 0 && ratelimit_allow(&src->error_rl, now_ms, ERROR_LOG_EVERY_MS, &held))
                tly_warn("source: events look misrouted and the partition count of %s is not "
                         "known (%s); they are rejected%s",
                         cfg->kafka.topics[t], rd_kafka_err2str(err), held_note(held));
            if (c > known && c > grown && c <= TLY_SHARD_MAX_PARTITIONS)
                grown = c;
        }
        if (grown > 0) {
            tly_shard_note_count(src->shard, grown);
            src->resubscribe = true;
            tly_warn("source: the topics have %" PRId32 " partitions now, %" PRId32
                     " when the group last rebalanced: events placed by either count are "
                     "taken until it rebalances, which it does now",
                     grown, known);
        }
    }
    if (tly_shard_routes_gen(src->shard) == routes_gen)
        return;
    size_t again = 0, rejected = 0;
    for (size_t i = first; i < n; i++) {
        if (items[i].err != TLY_E_EV_MISROUTED)
            continue;
        rejected++;
        again += tly_apply_again(src->apply, &items[i], now_ms) == TLY_OK;
    }
    if (again > 0)
        tly_info("source: %zu of %zu events rejected as misrouted were applied after all: the "
                 "partition counts changed since their batch was decoded",
                 again, rejected);
}

/* Shard mode: the generation of the partition counts a batch made now is
 * judged by (0 in replica mode). */
static uint64_t routes_gen(const tly_source_t *src)
{
    return src->shard != NULL ? tly_shard_routes_gen(src->shard) : 0;
}

static void settle(tly_source_t *src, tly_apply_item_t *items, rd_kafka_message_t **msgs, size_t n,
                   int64_t now_ms, uint64_t gen)
{
    if (src->shard != NULL)
        shard_recheck(src, items, n, now_ms, gen);
    uint64_t applied = 0, rejected = 0, held;
    int64_t newest = atomic_load_explicit(&src->watermark_ms, memory_order_relaxed);
    for (size_t i = 0; i < n; i++)
        src->parts[items[i].part].batch_last = i;
    for (size_t i = 0; i < n; i++) {
        const tly_apply_item_t *it = &items[i];
        rd_kafka_message_t *m = msgs[i];
        part_t *p = &src->parts[it->part];
        if (it->err == TLY_OK) {
            applied++;
            if (it->time_ms > newest)
                newest = it->time_ms;
            if (it->time_ms > p->last_event_ms)
                p->last_event_ms = it->time_ms;
        } else {
            rejected++;
            if ((unsigned)it->err < TLY_E__COUNT)
                atomic_fetch_add_explicit(&src->rejected_by[it->err], 1, memory_order_relaxed);
            if (ratelimit_allow(&src->reject_rl, now_ms, REJECT_LOG_EVERY_MS, &held))
                tly_warn("source: rejected %s[%" PRId32 "]@%" PRId64 ": %s: %s%s", p->topic,
                         m->partition, m->offset, tly_err_name(it->err), tly_strerror(it->err),
                         held_note(held));
        }
        /* Stores offset + 1. Fails with __STATE only for a partition
         * revoked meanwhile, whose new owner starts from the last commit.
         * With snapshots, only offsets a durable snapshot covers are
         * committed (tly_source_commit). */
        if (src->checkpoint == NULL && p->batch_last == i)
            (void)rd_kafka_offset_store(m->rkt, m->partition, m->offset);
        rd_kafka_message_destroy(m);
    }
    atomic_store_explicit(&src->watermark_ms, newest, memory_order_relaxed);
    atomic_fetch_add_explicit(&src->applied, applied, memory_order_relaxed);
    atomic_fetch_add_explicit(&src->rejected, rejected, memory_order_relaxed);
    src->dirty = true;
}

/* Poll thread, after settle (or with an empty batch): stores the positions
 * reach_end moved. After settle, so a message's offset stored for the same
 * batch does not overwrite the later end; p->position is then the next
 * offset after everything collected, all of it applied. Fails with __STATE
 * only for a partition revoked meanwhile, as in settle. */
static void store_ends(tly_source_t *src)
{
    if (!src->ends_to_store)
        return;
    src->ends_to_store = false;
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(4);
    for (size_t i = 0; i < src->nparts; i++) {
        part_t *p = &src->parts[i];
        if (!p->store_end)
            continue;
        p->store_end = false;
        if (p->assigned && p->position >= 0)
            rd_kafka_topic_partition_list_add(list, p->topic, p->partition)->offset = p->position;
    }
    if (list->cnt > 0)
        (void)rd_kafka_offsets_store(src->rk, list);
    rd_kafka_topic_partition_list_destroy(list);
}

/* Poll thread: waits for the pipelined batch in flight, if any, and
 * settles it. */
static void finish(tly_source_t *src)
{
    if (src->fly_n == 0)
        return;
    (void)tly_apply_wait(src->apply);
    settle(src, src->fly_batch, src->fly_msgs, src->fly_n, src->fly_now_ms, src->fly_gen);
    src->fly_n = 0;
}

/* Poll thread (the main thread in stop, once the workers were stopped):
 * finishes the batch in flight, applies the collected batch and waits for
 * it, then settles it: afterwards the store holds every message collected. */
static void flush(tly_source_t *src)
{
    finish(src);
    if (src->nbatch == 0) {
        store_ends(src);
        return;
    }
    uint64_t gen = routes_gen(src);
    tly_apply_batch(src->apply, src->batch, src->nbatch, src->batch_now_ms);
    settle(src, src->batch, src->msgs, src->nbatch, src->batch_now_ms, gen);
    src->nbatch = 0;
    store_ends(src);
}

/* Poll thread, a batch collected: a large one, while workers run, is
 * decoded here and handed to them (tly_apply_stage/submit) as soon as the
 * one before is applied; that one is settled while they apply this one,
 * and the poll thread goes on polling. Ends are stored at the next flush.
 * Others, and a batch that spreads by partition (apply.h), are flushed. */
static void dispatch(tly_source_t *src)
{
    uint64_t gen = routes_gen(src);
    if (src->nbatch < PIPELINE_MIN || !tly_apply_pipelines(src->apply) ||
        !tly_apply_stage(src->apply, src->batch, src->nbatch, src->batch_now_ms)) {
        flush(src);
        return;
    }
    /* once the batch before is done the workers take this one, and the
     * poll thread settles that one while they apply */
    (void)tly_apply_wait(src->apply);
    tly_apply_submit(src->apply);
    if (src->fly_n > 0)
        settle(src, src->fly_batch, src->fly_msgs, src->fly_n, src->fly_now_ms, src->fly_gen);
    tly_apply_item_t *items = src->fly_batch;
    rd_kafka_message_t **msgs = src->fly_msgs;
    src->fly_batch = src->batch;
    src->fly_msgs = src->msgs;
    src->fly_n = src->nbatch;
    src->fly_now_ms = src->batch_now_ms;
    src->fly_gen = gen;
    src->batch = items;
    src->msgs = msgs;
    src->nbatch = 0;
}

/* Replica mode: every partition of every configured topic, from the
 * brokers' metadata (waiting up to wait_ms for each topic's); NULL when
 * some topic's is missing (the first topic missing is named in *why, its
 * error in *err). */
static rd_kafka_topic_partition_list_t *
replica_partitions(tly_source_t *src, int wait_ms, const char **why, rd_kafka_resp_err_t *err)
{
    const tly_config_t *cfg = src->cfg;
    rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(16);
    for (size_t t = 0; t < cfg->kafka.ntopics; t++) {
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_topic_t *rkt = rd_kafka_topic_new(src->rk, cfg->kafka.topics[t], NULL);
        *err = rkt ? rd_kafka_metadata(src->rk, 0, rkt, &md, wait_ms) : rd_kafka_last_error();
        if (*err == RD_KAFKA_RESP_ERR_NO_ERROR && md->topic_cnt == 1 && md->topics[0].err)
            *err = md->topics[0].err;
        bool ok = *err == RD_KAFKA_RESP_ERR_NO_ERROR && md->topic_cnt == 1 &&
                  md->topics[0].partition_cnt > 0;
        for (int i = 0; ok && i < md->topics[0].partition_cnt; i++)
            rd_kafka_topic_partition_list_add(parts, cfg->kafka.topics[t],
                                              md->topics[0].partitions[i].id);
        if (md != NULL)
            rd_kafka_metadata_destroy(md);
        if (rkt != NULL)
            rd_kafka_topic_destroy(rkt);
        if (!ok) {
            *why = cfg->kafka.topics[t];
            rd_kafka_topic_partition_list_destroy(parts);
            return NULL;
        }
    }
    return parts;
}

/* Replica mode: every partition of every topic, no group membership.
 * Retries the metadata until it arrives or the source stops; false when
 * stopped first. Partitions added to a topic later are assigned by
 * replica_grow. */
static bool assign_all(tly_source_t *src)
{
    unsigned attempt = 0;
    while (!atomic_load(&src->stop)) {
        const char *topic = NULL;
        rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
        rd_kafka_topic_partition_list_t *parts = replica_partitions(src, 1000, &topic, &err);
        if (parts != NULL) {
            atomic_fetch_add_explicit(&src->rebalances, 1, memory_order_relaxed);
            assign(src, parts);
            rd_kafka_topic_partition_list_destroy(parts);
            publish(src, wall_ms());
            src->parts_next_ms = mono_ms() + src->parts_every_ms;
            return true;
        }
        if (attempt % 10 == 0)
            tly_warn("source: no metadata for topic %s yet (%s); retrying", topic,
                     err ? rd_kafka_err2str(err) : "no partitions");
        attempt++;
        /* rd_kafka_metadata waited up to a second already; serve callbacks */
        rd_kafka_message_t *m = rd_kafka_consumer_poll(src->rk, POLL_TIMEOUT_MS);
        if (m != NULL) {
            src->batch_now_ms = wall_ms();
            collect(src, m, src->batch_now_ms);
            flush(src);
        }
    }
    return false;
}

/* Replica mode, every parts_every_ms: lists the topics' partitions again
 * and, when a topic has grown, assigns the whole list anew, the partitions
 * held at their positions and the new ones from their beginning (every
 * message of a partition that appeared while tallyd ran is new to it;
 * choose_offsets). Without metadata now, it tries at the next turn. */
static void replica_grow(tly_source_t *src)
{
    if (src->parts_every_ms < 0 || mono_ms() < src->parts_next_ms)
        return;
    src->parts_next_ms = mono_ms() + src->parts_every_ms;
    const char *topic = NULL;
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
    rd_kafka_topic_partition_list_t *parts = replica_partitions(src, 500, &topic, &err);
    if (parts == NULL) {
        tly_debug("source: listing the partitions of %s failed (%s); trying again in %" PRId64
                  " ms",
                  topic, err ? rd_kafka_err2str(err) : "no partitions", src->parts_every_ms);
        return;
    }
    int fresh = 0;
    for (int i = 0; i < parts->cnt; i++) {
        const part_t *p = part_find(src, parts->elems[i].topic, parts->elems[i].partition);
        fresh += p == NULL || !p->assigned;
    }
    if (fresh > 0) {
        tly_info("source: %d new partitions (%d in all); assigning them from their beginning",
                 fresh, parts->cnt);
        flush(src); /* what was collected applies first, at the positions kept */
        atomic_fetch_add_explicit(&src->rebalances, 1, memory_order_relaxed);
        assign(src, parts);
        publish(src, wall_ms());
    }
    rd_kafka_topic_partition_list_destroy(parts);
}

/* ---- fetch nudges -------------------------------------------------------------
 *
 * librdkafka 2.0.2 stops fetching a partition while the consumer queue holds
 * queued.min.messages messages or queued.max.messages.kbytes of them, and its
 * broker thread decides again only when something wakes it: a request to
 * send, an answer on its connection, or its one-second wait running out
 * (librdkafka issue #2879; later releases bound that wait with
 * fetch.queue.backoff.ms). Taking messages off the queue wakes nothing, so a
 * consumer slower than its fetcher (tallyd catching up) would idle for most
 * of each second once its queue had filled. So after each batch the poll
 * thread reads the queue's length, and once the queue may have reached the
 * cap, each batch that finds it below the cap has the nudger thread ask the
 * leaders of the assigned partitions for their end offsets
 * (rd_kafka_offsets_for_times with "latest": one small ListOffsets request
 * per leader), until the queue is seen to grow again; the answer wakes each
 * leader's broker thread, which finds its partitions fetchable again. The
 * byte cap is judged from the mean payload polled (librdkafka 2.0.2 counts
 * queued.max.messages.kbytes in thousands of bytes). An empty poll while a
 * partition is known to be behind (whatever stopped the fetcher) nudges too
 * (an idle nudge): STARVED_NUDGE_MS after the last nudge,
 * twice that after a nudge that brought nothing, and so on up to
 * STARVED_NUDGE_MAX (a high watermark that no message reaches, such as a
 * transaction marker's until its end-of-partition event arrives, is not
 * worth more). */

/* The messages the queue holds when librdkafka stops fetching. */
static uint64_t queue_cap(const tly_source_t *src)
{
    uint64_t cap = src->qmin;
    if (src->msg_bytes16 > 0 && 16 * src->qbytes / src->msg_bytes16 < cap)
        cap = 16 * src->qbytes / src->msg_bytes16;
    return cap > 0 ? cap : 1;
}

/* Poll thread: hands the nudger the assigned partitions, unless it still has
 * a list to send (nudges coalesce). */
static void nudge(tly_source_t *src, int64_t now_ms, bool idle)
{
    src->last_nudge_ms = now_ms;
    if (!src->nudger_started)
        return;
    pthread_mutex_lock(&src->nudge_mu);
    bool pending = src->nudge_parts != NULL;
    pthread_mutex_unlock(&src->nudge_mu);
    if (pending)
        return;
    rd_kafka_topic_partition_list_t *list =
        rd_kafka_topic_partition_list_new((int)(src->nparts > 0 ? src->nparts : 1));
    for (size_t i = 0; i < src->nparts; i++)
        if (src->parts[i].assigned) /* the offset field carries the time: latest */
            rd_kafka_topic_partition_list_add(list, src->parts[i].topic, src->parts[i].partition)
                ->offset = RD_KAFKA_OFFSET_END;
    if (list->cnt == 0) {
        rd_kafka_topic_partition_list_destroy(list);
        return;
    }
    pthread_mutex_lock(&src->nudge_mu);
    if (src->nudge_parts == NULL) {
        src->nudge_parts = list;
        src->nudge_gen = 0;
        list = NULL;
        pthread_cond_signal(&src->nudge_cv);
    }
    pthread_mutex_unlock(&src->nudge_mu);
    if (list != NULL) {
        rd_kafka_topic_partition_list_destroy(list);
        return;
    }
    atomic_fetch_add_explicit(&src->nudges, 1, memory_order_relaxed);
    if (idle)
        atomic_fetch_add_explicit(&src->idle_nudges, 1, memory_order_relaxed);
}

/* Poll thread, after each batch. The fetcher decides on the queue's length
 * at moments this thread does not see, but in between the length only drops
 * by what this thread took: so if it reached the cap since the last look,
 * the length now plus what was taken since is at least the cap. What was
 * taken is counted twice over, as the queue also holds items that never
 * become messages here (transaction markers, callbacks). Growth beyond
 * what was taken means something was fetched while below the cap: the
 * fetcher runs again. */
static void nudge_check(tly_source_t *src, int64_t now_ms)
{
    if (src->cq == NULL)
        return;
    src->starved_ms = STARVED_NUDGE_MS; /* messages arrived */
    uint64_t len = (uint64_t)rd_kafka_queue_length(src->cq);
    uint64_t cap = queue_cap(src);
    if (len + 2 * src->polled >= cap)
        src->queue_full = true;
    else if (len + src->polled > src->last_len)
        src->queue_full = false;
    src->polled = 0;
    src->last_len = len;
    if (src->queue_full && len < cap)
        nudge(src, now_ms, false);
}

/* Poll thread, after a poll that found nothing: nudges when a partition is
 * known to hold messages past its position. */
static void nudge_if_starved(tly_source_t *src, int64_t now_ms)
{
    src->polled = 0;
    if (src->cq == NULL || now_ms - src->last_nudge_ms < src->starved_ms)
        return;
    for (size_t i = 0; i < src->nparts; i++) {
        const part_t *p = &src->parts[i];
        if (p->assigned && p->position >= 0 && p->high > p->position) {
            nudge(src, now_ms, true);
            src->starved_ms =
                src->starved_ms * 2 < STARVED_NUDGE_MAX ? src->starved_ms * 2 : STARVED_NUDGE_MAX;
            return;
        }
    }
}

static void *nudger_main(void *arg)
{
    tly_source_t *src = arg;
    (void)pthread_setname_np(pthread_self(), "tly-nudge");
    pthread_mutex_lock(&src->nudge_mu);
    for (;;) {
        while (src->nudge_parts == NULL && !src->nudge_quit)
            pthread_cond_wait(&src->nudge_cv, &src->nudge_mu);
        if (src->nudge_quit)
            break;
        rd_kafka_topic_partition_list_t *list = src->nudge_parts;
        uint64_t gen = src->nudge_gen;
        pthread_mutex_unlock(&src->nudge_mu);
        /* A nudge: only the asking matters, the answer (or its error) is
         * not used. An ends lookup: the answer goes back to seek_ends. */
        rd_kafka_resp_err_t err =
            rd_kafka_offsets_for_times(src->rk, list, gen ? ENDS_TIMEOUT_MS : NUDGE_TIMEOUT_MS);
        pthread_mutex_lock(&src->nudge_mu);
        src->nudge_parts = NULL;
        if (gen != 0) {
            if (src->ends_answer != NULL) /* not taken: this one is newer */
                rd_kafka_topic_partition_list_destroy(src->ends_answer);
            src->ends_answer = list;
            src->ends_err = err;
            src->ends_gen = gen;
            list = NULL;
            rd_kafka_queue_yield(src->cq); /* the poll thread takes it now */
        }
        if (list != NULL)
            rd_kafka_topic_partition_list_destroy(list);
    }
    pthread_mutex_unlock(&src->nudge_mu);
    return NULL;
}

static void stop_nudger(tly_source_t *src)
{
    if (!src->nudger_started)
        return;
    pthread_mutex_lock(&src->nudge_mu);
    src->nudge_quit = true;
    pthread_cond_signal(&src->nudge_cv);
    pthread_mutex_unlock(&src->nudge_mu);
    pthread_join(src->nudger, NULL);
    src->nudger_started = false;
    if (src->nudge_parts != NULL)
        rd_kafka_topic_partition_list_destroy(src->nudge_parts);
    src->nudge_parts = NULL;
    if (src->ends_answer != NULL)
        rd_kafka_topic_partition_list_destroy(src->ends_answer);
    src->ends_answer = NULL;
    src->ends_asked = false;
}

/* ---- ends ---------------------------------------------------------------------
 *
 * A new assignment's partitions are not caught up before their end offsets
 * are known (high_min ENDS_UNKNOWN, see publish). Those of the partitions
 * that start at the end are looked up in the rebalance callback, which
 * needs them as start offsets (choose_offsets); the others' are looked up
 * off it. While the callback runs the member cannot join the group again:
 * a rebalance started meanwhile (a member joining or leaving) waits for it
 * (a real broker, up to max.poll.interval.ms) or drops it (librdkafka's
 * mock cluster, after session.timeout.ms without a heartbeat it accepts),
 * and when the leaders are unknown (a broker down, the topic's metadata
 * failing) a lookup waits its whole timeout, 10 s. So after an assignment
 * the poll thread hands the nudger one offsets-for-times lookup of the
 * partitions whose end is not known (one ListOffsets request per leader, a
 * nudge too), takes the answer on a later turn, and asks again for those
 * still unknown ENDS_RETRY_MS later, twice that after another failure, and
 * so on up to ENDS_RETRY_MAX. A message of the partition ends its wait too
 * (the fetch that brought it refreshed librdkafka's cached end). An answer
 * made for an earlier assignment is dropped. */

/* Consumer-queue thread: takes the nudger's answer to the last ends lookup
 * (publishing what it taught) and hands it the next one when one is due. */
static void seek_ends(tly_source_t *src, int64_t now_ms)
{
    if (src->ends_asked) {
        pthread_mutex_lock(&src->nudge_mu);
        rd_kafka_topic_partition_list_t *answer = src->ends_answer;
        uint64_t gen = src->ends_gen;
        rd_kafka_resp_err_t err = src->ends_err;
        src->ends_answer = NULL;
        pthread_mutex_unlock(&src->nudge_mu);
        if (answer == NULL)
            return; /* not answered yet */
        src->ends_asked = false;
        if (gen == src->assign_gen) {
            learn_ends(src, answer);
            flush(src);
            publish(src, now_ms);
            size_t unknown = 0;
            for (size_t i = 0; i < src->nparts; i++)
                unknown += src->parts[i].assigned && src->parts[i].high_min == ENDS_UNKNOWN;
            if (unknown > 0 && src->ends_backoff_ms == ENDS_RETRY_MS) /* once an assignment */
                tly_warn("source: the end offsets of %zu partitions are not known (%s); "
                         "they are not caught up until they are, and are looked up again",
                         unknown,
                         err != RD_KAFKA_RESP_ERR_NO_ERROR ? rd_kafka_err2str(err) : "no answer");
            /* those still unknown: again after a pause */
            src->ends_next_ms = now_ms + src->ends_backoff_ms;
            src->ends_backoff_ms = src->ends_backoff_ms * 2 < ENDS_RETRY_MAX
                                       ? src->ends_backoff_ms * 2
                                       : ENDS_RETRY_MAX;
        }
        rd_kafka_topic_partition_list_destroy(answer);
    }
    if (!src->ends_wanted || now_ms < src->ends_next_ms || !src->nudger_started)
        return;
    rd_kafka_topic_partition_list_t *list =
        rd_kafka_topic_partition_list_new((int)(src->nparts > 0 ? src->nparts : 1));
    for (size_t i = 0; i < src->nparts; i++) {
        const part_t *p = &src->parts[i];
        if (p->assigned && p->high_min == ENDS_UNKNOWN) /* the time: latest */
            rd_kafka_topic_partition_list_add(list, p->topic, p->partition)->offset =
                RD_KAFKA_OFFSET_END;
    }
    if (list->cnt == 0) {
        src->ends_wanted = false; /* all known */
        rd_kafka_topic_partition_list_destroy(list);
        return;
    }
    pthread_mutex_lock(&src->nudge_mu);
    if (src->nudge_parts == NULL) {
        src->nudge_parts = list;
        src->nudge_gen = src->assign_gen;
        list = NULL;
        pthread_cond_signal(&src->nudge_cv);
    }
    pthread_mutex_unlock(&src->nudge_mu);
    if (list != NULL) /* a nudge is being sent: the next turn */
        rd_kafka_topic_partition_list_destroy(list);
    else
        src->ends_asked = true;
}

static void *poll_main(void *arg)
{
    tly_source_t *src = arg;
    (void)pthread_setname_np(pthread_self(), "tly-poll");
    tly_rcu_thread_online();
    if (src->cfg->kafka.mode == TLY_MODE_REPLICA && !assign_all(src))
        goto out;
    while (!atomic_load_explicit(&src->stop, memory_order_relaxed)) {
        /* While loading, publish often so readiness is seen promptly. */
        int64_t every = atomic_load_explicit(&src->ready, memory_order_relaxed)
                            ? PUBLISH_EVERY_MS
                            : LOADING_PUBLISH_MS;
        /* The hook sees no batch in flight: while batches are
         * pipelined, its turn comes every CHECKPOINT_EVERY_MS. */
        if (src->checkpoint != NULL &&
            (src->fly_n == 0 || mono_ms() - src->last_checkpoint_ms >= CHECKPOINT_EVERY_MS)) {
            flush(src);
            src->last_checkpoint_ms = mono_ms();
            src->checkpoint(src->checkpoint_ctx, src);
        }
        /* before a message is taken: a new assignment resumes every
         * partition at its position, which a message taken but not yet
         * collected has not moved past */
        if (src->cfg->kafka.mode == TLY_MODE_REPLICA)
            replica_grow(src);
        if (src->resubscribe) {
            /* shard_recheck saw the topics grow: the group rebalances */
            src->resubscribe = false;
            rd_kafka_resp_err_t err = subscribe(src);
            if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
                tly_warn("source: subscribing again failed (%s); the group rebalances at "
                         "librdkafka's next metadata refresh",
                         rd_kafka_err2str(err));
        }
        /* with a batch in flight, an empty queue finishes it at once */
        rd_kafka_message_t *m =
            rd_kafka_consumer_poll(src->rk, src->fly_n > 0 ? 0 : POLL_TIMEOUT_MS);
        int64_t now = wall_ms();
        seek_ends(src, now);
        if (m == NULL) {
            flush(src);
            if (src->dirty || now - src->last_publish_ms >= every)
                publish(src, now);
            nudge_if_starved(src, now);
            continue;
        }
        /* The batch: whatever else the consumer queue holds right now. A
         * rebalance callback served meanwhile flushes it first. */
        src->batch_now_ms = now;
        collect(src, m, now);
        if (src->cfg->kafka.mode == TLY_MODE_REPLICA && src->cq != NULL) {
            collect_more(src, now);
        } else {
            while (src->nbatch < BATCH_MAX && (m = rd_kafka_consumer_poll(src->rk, 0)) != NULL)
                collect(src, m, now);
        }
        dispatch(src);
        nudge_check(src, now);
        if (now - src->last_publish_ms >= every) {
            flush(src);
            publish(src, now);
        }
    }
    flush(src);
    publish(src, wall_ms());
out:
    tly_rcu_thread_offline();
    atomic_store(&src->running, false);
    return NULL;
}

/* ---- life cycle -------------------------------------------------------------- */

static bool conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, bool user,
                     char *errbuf, size_t errlen)
{
    char why[256];
    if (rd_kafka_conf_set(conf, name, value, why, sizeof why) == RD_KAFKA_CONF_OK)
        return true;
    if (user)
        fmt_err(errbuf, errlen, "kafka.properties.%s: %s", name, why);
    else
        fmt_err(errbuf, errlen, "librdkafka rejected %s=%s: %s", name, value, why);
    return false;
}

/* Properties tallyd must own for its offset and rebalance semantics. */
static bool property_allowed(const char *name, const char *value, bool shard, char *errbuf,
                             size_t errlen)
{
    if (strcmp(name, "enable.auto.offset.store") == 0) {
        fmt_err(errbuf, errlen,
                "kafka.properties.%s: tallyd stores each offset itself once its event is "
                "applied; remove this property",
                name);
        return false;
    }
    if (strcmp(name, "enable.partition.eof") == 0 && strcmp(value, "true") != 0) {
        fmt_err(errbuf, errlen,
                "kafka.properties.%s: tallyd needs end-of-partition events (they move a "
                "partition's position past transaction markers, so its lag reaches 0) and "
                "turns them on itself; remove this property",
                name);
        return false;
    }
    if (strcmp(name, "partition.assignment.strategy") == 0 && shard && strcmp(value, "range") != 0) {
        fmt_err(errbuf, errlen,
                "kafka.properties.%s: shard mode needs the range assignor (it gives one "
                "instance the same partition number of every topic); remove this property",
                name);
        return false;
    }
    if (strcmp(name, "partition.assignment.strategy") == 0 && strstr(value, "cooperative")) {
        fmt_err(errbuf, errlen,
                "kafka.properties.%s: tallyd handles eager rebalances only; use range "
                "and/or roundrobin",
                name);
        return false;
    }
    return true;
}

tly_err_t tly_source_check_properties(const tly_config_t *cfg, char *errbuf, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    tly_err_t rc = TLY_OK;
    for (size_t i = 0; i < cfg->kafka.nproperties && rc == TLY_OK; i++) {
        const tly_kv_t *kv = &cfg->kafka.properties[i];
        char why[512] = "";
        if (!property_allowed(kv->key, kv->value, cfg->kafka.mode == TLY_MODE_SHARD, why,
                              sizeof why) ||
            !conf_set(conf, kv->key, kv->value, true, why, sizeof why)) {
            snprintf(errbuf, errlen, "%s:%d: %s", cfg->path ? cfg->path : "<config>", kv->line,
                     why);
            rc = TLY_E_CONFIG;
        }
    }
    rd_kafka_conf_destroy(conf);
    return rc;
}

static bool start_mock(tly_source_t *src, char *errbuf, size_t errlen)
{
    char why[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, tly_source_log_cb);
    /* The host handle has no brokers of its own; keep it quiet about that. */
    if (!conf_set(conf, "log_level", "3", false, errbuf, errlen) ||
        !conf_set(conf, "client.id", "tallyd-embedded", false, errbuf, errlen)) {
        rd_kafka_conf_destroy(conf);
        return false;
    }
    src->mock_host = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof why);
    if (src->mock_host == NULL) {
        rd_kafka_conf_destroy(conf);
        fmt_err(errbuf, errlen, "embedded cluster: cannot create its host handle: %s", why);
        return false;
    }
    src->mock = rd_kafka_mock_cluster_new(src->mock_host, MOCK_BROKERS);
    if (src->mock == NULL) {
        fmt_err(errbuf, errlen, "embedded cluster: librdkafka's mock cluster did not start");
        return false;
    }
    for (size_t t = 0; t < src->cfg->kafka.ntopics; t++) {
        rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(src->mock, src->cfg->kafka.topics[t],
                                                             TLY_SOURCE_EMBEDDED_PARTITIONS, 1);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            fmt_err(errbuf, errlen, "embedded cluster: cannot create topic %s: %s",
                    src->cfg->kafka.topics[t], rd_kafka_err2str(err));
            return false;
        }
    }
    if (src->cfg->kafka.mode == TLY_MODE_SHARD) {
        rd_kafka_resp_err_t err =
            rd_kafka_mock_topic_create(src->mock, src->cfg->kafka.endpoints_topic, 1, 1);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            fmt_err(errbuf, errlen, "embedded cluster: cannot create topic %s: %s",
                    src->cfg->kafka.endpoints_topic, rd_kafka_err2str(err));
            return false;
        }
    }
    src->bootstrap = xstrdup(rd_kafka_mock_cluster_bootstraps(src->mock));
    tly_info("source: embedded Kafka cluster (%d brokers) at %s, %zu topics of %d partitions",
             MOCK_BROKERS, src->bootstrap, src->cfg->kafka.ntopics, TLY_SOURCE_EMBEDDED_PARTITIONS);
    return true;
}

static void stop_mock(tly_source_t *src)
{
    if (src->mock != NULL)
        rd_kafka_mock_cluster_destroy(src->mock);
    src->mock = NULL;
    if (src->mock_host != NULL)
        rd_kafka_destroy(src->mock_host);
    src->mock_host = NULL;
}

/* Builds the consumer's configuration, kafka.properties included, so a
 * bad property fails before anything is started. Returns NULL with errbuf
 * filled on failure. bootstrap.servers is set later (the embedded
 * cluster's address is known only once it runs). */
static rd_kafka_conf_t *consumer_conf(tly_source_t *src, char *errbuf, size_t errlen)
{
    const tly_config_t *cfg = src->cfg;
    const char *reset = cfg->kafka.start == TLY_START_LATEST ? "latest" : "earliest";
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_opaque(conf, src);
    rd_kafka_conf_set_log_cb(conf, tly_source_log_cb);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    if (cfg->kafka.mode == TLY_MODE_SHARD)
        rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    /* auto.offset.reset matters only when a chosen offset is out of range
     * (retention deleted it): `window` and `earliest` then take what is
     * left. enable.partition.eof: see reach_end. */
    if (!conf_set(conf, "group.id", cfg->kafka.group, false, errbuf, errlen) ||
        !conf_set(conf, "client.id", "tallyd", false, errbuf, errlen) ||
        !conf_set(conf, "enable.auto.offset.store", "false", false, errbuf, errlen) ||
        !conf_set(conf, "enable.auto.commit", "true", false, errbuf, errlen) ||
        !conf_set(conf, "enable.partition.eof", "true", false, errbuf, errlen) ||
        !conf_set(conf, "partition.assignment.strategy",
                  cfg->kafka.mode == TLY_MODE_SHARD ? "range" : "range,roundrobin", false, errbuf,
                  errlen) ||
        !conf_set(conf, "auto.offset.reset", reset, false, errbuf, errlen))
        goto fail;
    /* The mock cluster holds an empty fetch for the whole fetch.wait.max.ms
     * (500 ms by default) even when messages arrive meanwhile, where a real
     * broker answers at once; in-process, short polls cost nothing. */
    if (src->embedded && !conf_set(conf, "fetch.wait.max.ms", "5", false, errbuf, errlen))
        goto fail;
    /* Prefetch deeper than librdkafka's default (100,000 messages): with the
     * fetch nudges below both catch up as fast from a real broker, but from
     * the mock cluster (the demo, the tests) 100,000 made catching up
     * 1.5x-2x slower (bench/README.md, "Kafka").
     * queued.max.messages.kbytes (65,536,000 bytes) still bounds the memory
     * it takes.
     * kafka.properties may set either. */
    if (!conf_set(conf, "queued.min.messages", "1000000", false, errbuf, errlen))
        goto fail;
    for (size_t i = 0; i < cfg->kafka.nproperties; i++) {
        const tly_kv_t *kv = &cfg->kafka.properties[i];
        if (!property_allowed(kv->key, kv->value, cfg->kafka.mode == TLY_MODE_SHARD, errbuf,
                              errlen) ||
            !conf_set(conf, kv->key, kv->value, true, errbuf, errlen))
            goto fail;
    }
    /* The caps the fetch nudges watch (librdkafka's defaults unless
     * kafka.properties set them). */
    char val[32];
    size_t vlen = sizeof val;
    if (rd_kafka_conf_get(conf, "queued.min.messages", val, &vlen) == RD_KAFKA_CONF_OK)
        src->qmin = strtoull(val, NULL, 10);
    vlen = sizeof val;
    if (rd_kafka_conf_get(conf, "queued.max.messages.kbytes", val, &vlen) == RD_KAFKA_CONF_OK)
        src->qbytes = strtoull(val, NULL, 10) * 1000; /* as librdkafka 2.0.2 counts it */
    /* Replica mode lists its topics' partitions as often as librdkafka
     * refreshes their metadata (5 minutes by default), as a Kafka consumer
     * notices new partitions at metadata.max.age.ms. */
    src->parts_every_ms = 300000;
    vlen = sizeof val;
    if (rd_kafka_conf_get(conf, "topic.metadata.refresh.interval.ms", val, &vlen) ==
        RD_KAFKA_CONF_OK)
        src->parts_every_ms = strtoll(val, NULL, 10);
    if (src->parts_every_ms >= 0 && src->parts_every_ms < 1000)
        src->parts_every_ms = 1000; /* a listing may wait 500 ms: not more often */
    return conf;
fail:
    rd_kafka_conf_destroy(conf);
    return NULL;
}

/* Creates the consumer from conf (taken, also on failure). */
static bool make_consumer(tly_source_t *src, rd_kafka_conf_t *conf, char *errbuf, size_t errlen)
{
    char why[512];
    if (!conf_set(conf, "bootstrap.servers", src->bootstrap, false, errbuf, errlen)) {
        rd_kafka_conf_destroy(conf);
        return false;
    }
    src->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, why, sizeof why);
    if (src->rk == NULL) {
        rd_kafka_conf_destroy(conf);
        fmt_err(errbuf, errlen, "cannot create the Kafka consumer: %s", why);
        return false;
    }
    /* rd_kafka_new owns conf now. Callbacks (rebalance, error) are served
     * by consumer_poll. */
    rd_kafka_poll_set_consumer(src->rk);
    return true;
}

tly_source_t *tly_source_new(const tly_config_t *cfg, const tly_featset_t *fs, tly_store_t *store,
                             char *errbuf, size_t errlen)
{
    tly_source_t *src = tly_xrealloc(NULL, sizeof *src);
    memset(src, 0, sizeof *src);
    src->cfg = cfg;
    src->fs = fs;
    src->store = store;
    atomic_init(&src->stop, false);
    atomic_init(&src->running, false);
    atomic_init(&src->fatal_set, false);
    atomic_init(&src->watermark_ms, -1);
    atomic_init(&src->ready, false);
    pthread_mutex_init(&src->mu, NULL);
    pthread_mutex_init(&src->nudge_mu, NULL);
    pthread_cond_init(&src->nudge_cv, NULL);
    atomic_init(&src->nudges, 0);
    atomic_init(&src->idle_nudges, 0);
    src->starved_ms = STARVED_NUDGE_MS;
    src->embedded = strcmp(cfg->kafka.brokers, "embedded") == 0;
    rd_kafka_conf_t *conf = consumer_conf(src, errbuf, errlen);
    if (conf == NULL)
        goto fail;
    if (src->embedded) {
        if (!start_mock(src, errbuf, errlen)) {
            rd_kafka_conf_destroy(conf);
            goto fail;
        }
        if (cfg->kafka.start == TLY_START_WINDOW)
            tly_info("source: kafka.start window with the embedded cluster starts at the "
                     "earliest offset (it holds only this run's events)");
    } else {
        src->bootstrap = xstrdup(cfg->kafka.brokers);
    }
    if (!make_consumer(src, conf, errbuf, errlen))
        goto fail;
    src->batch = tly_xrealloc(NULL, BATCH_MAX * sizeof *src->batch);
    src->msgs = tly_xrealloc(NULL, BATCH_MAX * sizeof *src->msgs);
    src->fly_batch = tly_xrealloc(NULL, BATCH_MAX * sizeof *src->fly_batch);
    src->fly_msgs = tly_xrealloc(NULL, BATCH_MAX * sizeof *src->fly_msgs);
    src->more = tly_xrealloc(NULL, BATCH_MAX * sizeof *src->more);
    src->shard = tly_shard_new(cfg, fs);
    src->apply = tly_apply_new(fs, store, src->shard,
                               cfg->kafka.threads < 1 ? 1 : (size_t)cfg->kafka.threads);
    return src;
fail:
    stop_mock(src);
    free(src->bootstrap);
    pthread_mutex_destroy(&src->mu);
    pthread_mutex_destroy(&src->nudge_mu);
    pthread_cond_destroy(&src->nudge_cv);
    free(src);
    return NULL;
}

/* What resume_at and catch_up share: the partition's restored newest event
 * time and the watermark; in shard mode the partition's state is held
 * (from a snapshot), and the first assignment drops it unless the
 * partition comes back here. NULL on bad arguments. */
static part_t *part_restored(tly_source_t *src, const char *topic, int32_t partition,
                             int64_t offset, int64_t last_event_ms)
{
    if (src == NULL || topic == NULL || partition < 0 || offset < 0 || src->started)
        return NULL;
    part_t *p = part_get(src, topic, partition);
    p->last_event_ms = last_event_ms >= 0 ? last_event_ms : -1;
    if (last_event_ms > atomic_load_explicit(&src->watermark_ms, memory_order_relaxed))
        atomic_store_explicit(&src->watermark_ms, last_event_ms, memory_order_relaxed);
    if (src->shard != NULL && partition < TLY_SHARD_MAX_PARTITIONS)
        src->held[partition / 64] |= UINT64_C(1) << (partition % 64);
    return p;
}

tly_err_t tly_source_resume_at(tly_source_t *src, const char *topic, int32_t partition,
                               int64_t offset, int64_t last_event_ms)
{
    part_t *p = part_restored(src, topic, partition, offset, last_event_ms);
    if (p == NULL)
        return TLY_E_INVAL;
    p->position = offset;
    return TLY_OK;
}

tly_err_t tly_source_start(tly_source_t *src, char *errbuf, size_t errlen)
{
    if (src->started || src->stopped) {
        fmt_err(errbuf, errlen, "the Kafka source was started before; make a new one");
        return TLY_E_INVAL;
    }
    const tly_config_t *cfg = src->cfg;
    if (src->shard != NULL &&
        !tly_shard_start(src->shard, src->bootstrap, src->embedded, src->advertise, errbuf, errlen))
        return TLY_E_IO;
    if (cfg->kafka.mode == TLY_MODE_SHARD) {
        rd_kafka_resp_err_t err = subscribe(src);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            fmt_err(errbuf, errlen, "cannot subscribe to the Kafka topics: %s",
                    rd_kafka_err2str(err));
            return TLY_E_IO;
        }
    }
    (void)tly_apply_start(src->apply);
    src->cq = rd_kafka_queue_get_consumer(src->rk);
    if (src->cq != NULL) {
        int rc = pthread_create(&src->nudger, NULL, nudger_main, src);
        if (rc == 0)
            src->nudger_started = true;
        else
            tly_warn("source: cannot start the fetch nudge thread (%s); a full fetch queue "
                     "will wait up to a second for librdkafka to fetch again",
                     strerror(rc));
    }
    atomic_store(&src->running, true);
    int rc = pthread_create(&src->thread, NULL, poll_main, src);
    if (rc != 0) {
        atomic_store(&src->running, false);
        tly_apply_stop(src->apply);
        stop_nudger(src);
        fmt_err(errbuf, errlen, "cannot start the Kafka poll thread: %s", strerror(rc));
        return TLY_E_IO;
    }
    src->started = true;
    tly_info("source: consuming %zu topics from %s as group %s (%s mode)", cfg->kafka.ntopics,
             src->bootstrap, cfg->kafka.group,
             cfg->kafka.mode == TLY_MODE_SHARD ? "shard" : "replica");
    return TLY_OK;
}

void tly_source_halt(tly_source_t *src)
{
    if (src == NULL || src->halted)
        return;
    src->halted = true;
    if (src->started) {
        atomic_store(&src->stop, true);
        pthread_join(src->thread, NULL);
        tly_apply_stop(src->apply);
        stop_nudger(src);
    }
}

tly_err_t tly_source_catch_up(tly_source_t *src, const char *topic, int32_t partition,
                              int64_t offset, int64_t last_event_ms)
{
    part_t *p = part_restored(src, topic, partition, offset, last_event_ms);
    if (p == NULL)
        return TLY_E_INVAL;
    /* A topic kafka.topics no longer lists is never consumed, so nothing
     * of it would ever be replayed and the source would stay "catching
     * up" (no snapshot) for good: it resumes at its position instead, as
     * its events are in the restored features. At offset 0 there is
     * nothing to replay either, and "no later than 0" is 0 (catchup_until
     * 0 means none: kafka.start alone would decide, latest skipping what
     * arrived since the snapshot). */
    if (p->topic_index < 0 || offset == 0)
        p->position = offset;
    else
        p->catchup_until = offset;
    return TLY_OK;
}

bool tly_source_catching_up(const tly_source_t *src)
{
    for (size_t i = 0; i < src->nparts; i++)
        if (src->parts[i].catchup_until > 0)
            return true;
    return false;
}

void tly_source_set_checkpoint(tly_source_t *src, tly_checkpoint_fn fn, void *ctx)
{
    if (src->started)
        return;
    src->checkpoint = fn;
    src->checkpoint_ctx = ctx;
}

size_t tly_source_positions(const tly_source_t *src, tly_position_t *out, size_t cap)
{
    /* Every partition with a position, assigned or not: one restored from
     * a snapshot and not assigned yet, or (shard mode) revoked and not yet
     * known to be lost, still has its events in the store. A partition
     * lost to another instance has its entities dropped and its position
     * forgotten at the assignment (shard_reassign). */
    size_t n = 0;
    for (size_t i = 0; i < src->nparts; i++) {
        const part_t *p = &src->parts[i];
        if (p->position < 0)
            continue;
        if (n < cap) {
            snprintf(out[n].topic, sizeof out[n].topic, "%s", p->topic);
            out[n].partition = p->partition;
            out[n].offset = p->position;
            out[n].last_event_ms = p->last_event_ms;
        }
        n++;
    }
    return n;
}

void tly_source_commit(tly_source_t *src, const tly_position_t *pos, size_t n)
{
    if (src->rk == NULL || n == 0)
        return;
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new((int)n);
    for (size_t i = 0; i < n; i++) {
        /* Only partitions assigned here now: one revoked since the snapshot
         * was taken belongs to another member, whose commits must not be
         * moved back. */
        const part_t *p = part_find(src, pos[i].topic, pos[i].partition);
        if (p != NULL && p->assigned)
            rd_kafka_topic_partition_list_add(list, pos[i].topic, pos[i].partition)->offset =
                pos[i].offset;
    }
    if (list->cnt == 0) {
        rd_kafka_topic_partition_list_destroy(list);
        return;
    }
    /* Asynchronous: errors (a partition revoked meanwhile) reach the log
     * through the consumer's callbacks; the snapshot stays the truth. */
    rd_kafka_resp_err_t err = rd_kafka_commit(src->rk, list, 1);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
        tly_warn("source: committing the offsets of a snapshot failed: %s",
                 rd_kafka_err2str(err));
    rd_kafka_topic_partition_list_destroy(list);
}

typedef struct {
    bool done;
    rd_kafka_resp_err_t err;
} commit_wait_t;

static void commit_done(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                        rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    (void)rk;
    (void)offsets;
    commit_wait_t *cw = opaque;
    cw->err = err;
    cw->done = true;
}

/* Until *done (the commit's reply) or, with done NULL, until rk's close
 * finished; false at the deadline. Before the close only the commit's
 * reply reaches q: its callbacks are served. After it the consumer queue
 * is forwarded to q and holds the messages fetched ahead (thousands while
 * catching up), which a callback poll cannot take (librdkafka 2.0.2
 * asserts): consumer_poll serves the rebalance and error callbacks and
 * hands the messages over, to be dropped. */
static bool serve_until(rd_kafka_t *rk, rd_kafka_queue_t *q, const bool *done, int64_t deadline)
{
    for (;;) {
        if (done != NULL ? *done : rd_kafka_consumer_closed(rk))
            return true;
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return false;
        int wait = left < 100 ? (int)left : 100;
        if (done != NULL) {
            rd_kafka_queue_poll_callback(q, wait);
        } else {
            rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, wait);
            if (m != NULL)
                rd_kafka_message_destroy(m);
        }
    }
}

bool tly_kafka_close(rd_kafka_t *rk, bool commit, int timeout_ms, const char *who)
{
    /* rd_kafka_consumer_close() waits as long as the group coordinator
     * takes to answer, for as long as the cluster stays away: close
     * through a queue of our own instead, with a deadline. */
    int64_t deadline = mono_ms() + timeout_ms;
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    bool answered = true;
    if (commit) {
        commit_wait_t cw = {false, RD_KAFKA_RESP_ERR_NO_ERROR};
        rd_kafka_resp_err_t err = rd_kafka_commit_queue(rk, NULL, q, commit_done, &cw);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            answered = serve_until(rk, q, &cw.done, deadline);
            err = cw.err;
        }
        if (answered && err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
            tly_warn("%s: committing offsets on stop failed: %s", who, rd_kafka_err2str(err));
    }
    if (answered) {
        rd_kafka_error_t *error = rd_kafka_consumer_close_queue(rk, q);
        if (error != NULL) {
            tly_warn("%s: closing the consumer: %s", who, rd_kafka_error_string(error));
            rd_kafka_error_destroy(error);
        } else {
            answered = serve_until(rk, q, NULL, deadline);
        }
    }
    rd_kafka_queue_destroy(q);
    if (answered) {
        rd_kafka_destroy(rk);
        return true;
    }
    /* Not destroyed either: librdkafka 2.0.2's destroy, even with
     * RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE, joins a main thread that waits
     * for the group's pending requests, as long as the brokers stay away.
     * The handle and its threads end with the process, which is exiting. */
    tly_warn("%s: the brokers did not answer within %d ms; leaving without closing the consumer "
             "(the group drops this member after session.timeout.ms)%s",
             who, timeout_ms, commit ? "; offsets not committed" : "");
    return false;
}

void tly_source_stop(tly_source_t *src)
{
    if (src == NULL || src->stopped)
        return;
    src->stopped = true;
    tly_source_halt(src);
    if (src->cq != NULL)
        rd_kafka_queue_destroy(src->cq);
    src->cq = NULL;
    /* From here the main thread serves the consumer queue (close runs the
     * final revocation). */
    tly_kafka_close(src->rk, src->started && src->checkpoint == NULL, TLY_KAFKA_CLOSE_TIMEOUT_MS,
                    "source");
    src->rk = NULL;
    for (size_t i = 0; i < src->nparts; i++)
        src->parts[i].assigned = false;
    publish(src, wall_ms());
    tly_info("source: stopped after %" PRIu64 " messages (%" PRIu64 " applied, %" PRIu64
             " rejected)",
             (uint64_t)atomic_load(&src->messages), (uint64_t)atomic_load(&src->applied),
             (uint64_t)atomic_load(&src->rejected));
}

void tly_source_free(tly_source_t *src)
{
    if (src == NULL)
        return;
    tly_source_stop(src);
    tly_apply_free(src->apply); /* before the shard it borrows */
    tly_shard_free(src->shard);
    stop_mock(src);
    free(src->batch);
    free(src->msgs);
    free(src->fly_batch);
    free(src->fly_msgs);
    free(src->more);
    for (size_t i = 0; i < src->nparts; i++)
        free(src->parts[i].topic);
    free(src->parts);
    free(src->pub);
    free(src->bootstrap);
    pthread_mutex_destroy(&src->mu);
    pthread_mutex_destroy(&src->nudge_mu);
    pthread_cond_destroy(&src->nudge_cv);
    free(src);
}

tly_err_t tly_source_set_advertise(tly_source_t *src, const char *addr)
{
    if (src == NULL || addr == NULL || src->started || strlen(addr) >= sizeof src->advertise)
        return TLY_E_INVAL;
    snprintf(src->advertise, sizeof src->advertise, "%s", addr);
    return TLY_OK;
}

tly_shard_t *tly_source_shard(tly_source_t *src)
{
    return src != NULL ? src->shard : NULL;
}

const char *tly_source_bootstrap(const tly_source_t *src)
{
    return src->bootstrap;
}

bool tly_source_ready(tly_source_t *src)
{
    return src == NULL || atomic_load_explicit(&src->ready, memory_order_acquire);
}

const char *tly_source_fatal(tly_source_t *src)
{
    if (src == NULL || !atomic_load_explicit(&src->fatal_set, memory_order_acquire))
        return NULL;
    return src->fatal_msg;
}

void tly_source_stats(tly_source_t *src, tly_source_stats_t *st, tly_partition_stat_t *parts,
                      size_t cap)
{
    memset(st, 0, sizeof *st);
    st->messages = atomic_load_explicit(&src->messages, memory_order_relaxed);
    st->applied = atomic_load_explicit(&src->applied, memory_order_relaxed);
    st->rejected = atomic_load_explicit(&src->rejected, memory_order_relaxed);
    for (size_t i = 0; i < TLY_E__COUNT; i++)
        st->rejected_by[i] = atomic_load_explicit(&src->rejected_by[i], memory_order_relaxed);
    st->errors = atomic_load_explicit(&src->errors, memory_order_relaxed);
    st->rebalances = atomic_load_explicit(&src->rebalances, memory_order_relaxed);
    st->gaps = atomic_load_explicit(&src->gaps, memory_order_relaxed);
    st->gap_messages = atomic_load_explicit(&src->gap_messages, memory_order_relaxed);
    st->undecodable = atomic_load_explicit(&src->undecodable, memory_order_relaxed);
    st->fetch_nudges = atomic_load_explicit(&src->nudges, memory_order_relaxed);
    st->fetch_idle_nudges = atomic_load_explicit(&src->idle_nudges, memory_order_relaxed);
    tly_apply_stats_t ast;
    tly_apply_stats(src->apply, &ast);
    st->batches_alone = ast.alone;
    st->batches_shared = ast.shared;
    st->batches_by_partition = ast.bypart;
    st->batches_pipelined = ast.pipelined;
    st->dropped_entities = atomic_load_explicit(&src->dropped_entities, memory_order_relaxed);
    st->ready = atomic_load_explicit(&src->ready, memory_order_acquire);
    st->watermark_ms = atomic_load_explicit(&src->watermark_ms, memory_order_relaxed);
    st->running = atomic_load(&src->running);
    st->lag = -1;
    pthread_mutex_lock(&src->mu);
    st->npartitions = src->npub;
    /* a partition whose lag is not known yet (no position: it is being
     * read from where kafka.start says) makes the sum unknown, not smaller */
    bool unknown = false;
    for (size_t i = 0; i < src->npub; i++) {
        const tly_partition_stat_t *ps = &src->pub[i];
        if (ps->lag >= 0)
            st->lag = (st->lag < 0 ? 0 : st->lag) + ps->lag;
        else
            unknown = true;
        if (parts != NULL && i < cap)
            parts[i] = *ps;
    }
    pthread_mutex_unlock(&src->mu);
    if (unknown)
        st->lag = -1;
}
