/*
 * source.h — the Kafka consumer that feeds the store.
 *
 * A source owns one librdkafka consumer and the thread that polls it:
 * poll → decode → tly_store_apply → store the message's offset (offsets are
 * stored only after the event is applied; librdkafka commits stored offsets
 * in the background). Decode rejections are counted per reason and the
 * offset is still stored: a malformed event is never retried.
 *
 * kafka.brokers "embedded" starts librdkafka's mock cluster in this process
 * (a real Kafka-protocol server on loopback, 3 brokers) with the configured
 * topics created (TLY_SOURCE_EMBEDDED_PARTITIONS partitions each), and the
 * consumer connects to it like to any cluster; tly_source_bootstrap() tells
 * a producer (the demo generator) where it is.
 *
 * Where a partition starts. Committed offsets serve lag monitoring only: the
 * store is in-process state, so what a previous process committed describes
 * state this process does not hold. A partition this process has not
 * consumed before starts at the position given by tly_source_resume_at (a
 * snapshot's), else where kafka.start says: window = the first offset whose
 * timestamp is at or after now − the longest feature horizon
 * (offsets-for-times; none: the end; lookup failed: the beginning — older
 * events are dropped as late anyway); earliest = the beginning; latest =
 * the end. A partition revoked by a rebalance and assigned again resumes
 * where this process left it, so no event is applied twice. With brokers
 * "embedded", window behaves like earliest (the mock holds only this run's
 * events and its offsets-for-times answers "end").
 *
 * The embedded cluster's group coordinator waits 3 s before the first
 * assignment of a group (as a broker's group.initial.rebalance.delay.ms
 * does); replica mode assigns at once.
 *
 * Topics: each kafka.topics entry has its own decoder, reading the topic's
 * time field and limits (kafka.topics[].events, else events.*); a topic's
 * max_future_skew tighter than the loosest is enforced here (rejected as
 * EV_FUTURE), the rest by the store.
 *
 * Readiness (-LOADING): see tly_source_ready. While not ready the partition
 * table is republished every 200 ms so catching up is seen promptly.
 *
 * Gaps: when a partition's position is out of range, auto.offset.reset
 * (earliest, or latest for kafka.start latest) moves it; librdkafka does
 * not tell the application (it only logs), so the source checks every
 * message's offset against the position it expects: a step backwards, or
 * forwards past the log start, is an offset reset — counted (stats gaps,
 * gap_messages: messages known deleted before they were applied) and
 * logged at WARN with the topic, partition and offsets. Forward steps within
 * the log (compaction, transaction markers) are not gaps. With
 * auto.offset.reset=error set in kafka.properties, librdkafka's
 * __AUTO_OFFSET_RESET error is counted the same way and that partition stops.
 *
 * Rebalances: the stats list the partitions of the current assignment only.
 *
 * Modes: shard subscribes with the consumer group (eager range,roundrobin
 * assignment); replica assigns every partition of every topic from the
 * metadata (partitions added later need a restart); both commit offsets
 * under kafka.group.
 *
 * Threads: tly_source_new/start/stop/free on the main thread; the poll thread
 * and the kafka.threads − 1 apply threads are private (the poll thread
 * collects a batch, all of them decode and apply it, one message key per
 * thread); tly_source_stats on any thread (counters are atomics, the
 * partition table is copied under a mutex the poll thread takes once per
 * stats refresh, never per message).
 */
#ifndef TALLYD_SOURCE_H
#define TALLYD_SOURCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/config.h"
#include "tallyd/error.h"
#include "tallyd/feature.h"
#include "tallyd/shard.h"
#include "tallyd/store.h"

#define TLY_SOURCE_EMBEDDED_PARTITIONS 8
/* Bytes of a topic name with its NUL: Kafka's names run to 249 bytes. */
#define TLY_SOURCE_TOPIC_MAX 250

typedef struct tly_source tly_source_t;

/* One assigned partition as the source last saw it. */
typedef struct {
    char topic[TLY_SOURCE_TOPIC_MAX];
    int32_t partition;
    int64_t position;      /* offset of the next message to apply, -1 unknown */
    int64_t high;          /* high watermark (end offset), -1 unknown */
    int64_t lag;           /* high - position when both known, else -1 */
    int64_t last_event_ms; /* event time of the newest message applied, -1 none */
} tly_partition_stat_t;

typedef struct {
    uint64_t messages;                  /* messages consumed */
    uint64_t applied;                   /* decoded and passed to the store */
    uint64_t rejected;                  /* decode rejections, all reasons */
    uint64_t rejected_by[TLY_E__COUNT]; /* decode rejections by reason */
    uint64_t errors;                    /* consumer errors reported by librdkafka */
    uint64_t rebalances;                /* assignment changes */
    uint64_t gaps;                      /* offset resets: a partition's position out of range */
    uint64_t gap_messages;              /* messages those resets skipped that Kafka had deleted */
    uint64_t undecodable;               /* offsets skipped: their batch could not be decoded */
    uint64_t fetch_nudges;              /* fetch nudges sent (source.c) */
    uint64_t fetch_idle_nudges;         /* of those, sent after an empty poll */
    /* batches applied (apply.h): by the poll thread alone, shared by the
     * appliers by entity, spread by partition, pipelined */
    uint64_t batches_alone, batches_shared, batches_by_partition, batches_pipelined;
    uint64_t dropped_entities;          /* shard mode: entities of partitions lost to others */
    int64_t watermark_ms;               /* newest event time applied, -1 none */
    int64_t lag;                        /* sum of partition lags; -1 while any is unknown */
    size_t npartitions;                 /* partitions assigned */
    bool running;                       /* poll thread alive */
    bool ready;                         /* tly_source_ready() */
} tly_source_stats_t;

/*
 * Creates a source for cfg's kafka section feeding store (all borrowed; they
 * must outlive the source). With brokers "embedded" this starts the mock
 * cluster. Returns NULL with a sentence in errbuf on failure (bad
 * kafka.properties, mock cluster failure). Main thread.
 */
/* A partition's position: the offset of the next message to apply. */
typedef struct {
    char topic[TLY_SOURCE_TOPIC_MAX];
    int32_t partition;
    int64_t offset;
    int64_t last_event_ms; /* newest event time applied from it, -1 none */
} tly_position_t;

/* Called by the poll thread between batches (no apply thread is working),
 * where the store holds exactly the messages before tly_source_positions(). */
typedef void (*tly_checkpoint_fn)(void *ctx, tly_source_t *src);

/* Checks cfg's kafka.properties as tly_source_new would take them (the ones
 * tallyd sets or cannot work with, and librdkafka's own checks of name and
 * value): TLY_OK, or TLY_E_CONFIG with "FILE:LINE: kafka.properties.X: why"
 * in errbuf. Any thread. */
tly_err_t tly_source_check_properties(const tly_config_t *cfg, char *errbuf, size_t errlen);

tly_source_t *tly_source_new(const tly_config_t *cfg, const tly_featset_t *fs, tly_store_t *store,
                             char *errbuf, size_t errlen);
/* Starts the poll thread (subscribe and consume). Returns TLY_OK, TLY_E_IO
 * with errbuf filled, or TLY_E_INVAL when called a second time (a source
 * runs once). Main thread. */
tly_err_t tly_source_start(tly_source_t *src, char *errbuf, size_t errlen);
/* Before start: makes topic/partition, when assigned, start at offset (the
 * next offset to apply, e.g. from a snapshot) instead of kafka.start's;
 * last_event_ms (-1: none) is the newest event time the state holds from
 * it (the partition's and the source's watermark start there). Returns
 * TLY_OK, or TLY_E_INVAL (bad arguments, or already started). Main
 * thread. */
tly_err_t tly_source_resume_at(tly_source_t *src, const char *topic, int32_t partition,
                               int64_t offset, int64_t last_event_ms);
/* Before start, for a snapshot that restored some features only (the
 * others are new or changed): topic/partition starts where kafka.start
 * says, but no later than offset; its events below offset are marked
 * `replayed`, so they feed only the features the store did not restore
 * (tly_store_restored), whose state is rebuilt. A topic not in
 * kafka.topics (never consumed, so never replayed) is taken as by
 * resume_at. last_event_ms as for resume_at. Main thread. */
tly_err_t tly_source_catch_up(tly_source_t *src, const char *topic, int32_t partition,
                              int64_t offset, int64_t last_event_ms);
/* True while some partition is still below the offset given to
 * tly_source_catch_up (a snapshot now would pair the restored features'
 * state with an earlier position). Poll thread, or main after halt. */
bool tly_source_catching_up(const tly_source_t *src);
/* Stops the poll thread, commits stored offsets and closes the consumer.
 * Idempotent. Main thread. */
void tly_source_stop(tly_source_t *src);
/* Stops the poll thread only (idempotent; stop does it too): afterwards the
 * store changes no more and tly_source_positions is exact. Main thread. */
void tly_source_halt(tly_source_t *src);
/* Installs the checkpoint hook (before start). With a hook, offsets are
 * committed only through tly_source_commit (snapshot mode). */
void tly_source_set_checkpoint(tly_source_t *src, tly_checkpoint_fn fn, void *ctx);
/* The positions of every partition whose events the store holds (assigned,
 * or restored and not assigned yet) into out (at most cap); returns how
 * many there are. Poll thread (from the hook), or main after halt. */
size_t tly_source_positions(const tly_source_t *src, tly_position_t *out, size_t cap);
/* Commits to the group, asynchronously, the positions in pos of the
 * partitions assigned here now. Same threads as positions. */
void tly_source_commit(tly_source_t *src, const tly_position_t *pos, size_t n);
/* Stops if needed and frees everything (and the mock cluster: librdkafka
 * 2.0.2 takes about a second to stop its thread). NULL ok. Main thread. */
void tly_source_free(tly_source_t *src);
/* Shard mode: the address ("host:port") this instance publishes as the
 * owner of its partitions and names in -MOVED replies of others. Before
 * start. Main thread. */
tly_err_t tly_source_set_advertise(tly_source_t *src, const char *addr);
/* Shard mode: the ownership router (borrowed; valid until tly_source_free);
 * NULL in replica mode. */
tly_shard_t *tly_source_shard(tly_source_t *src);
/* Bootstrap servers of the cluster ("127.0.0.1:port,..." for embedded; the
 * configured brokers otherwise). Borrowed; valid until tly_source_free. */
const char *tly_source_bootstrap(const tly_source_t *src);
/* NULL while the source is healthy; after librdkafka raised a fatal error
 * (the poll thread then stops by itself), a sentence describing it, valid
 * until tly_source_free. The daemon should exit non-zero. Any thread. */
const char *tly_source_fatal(tly_source_t *src);
/* True once the source caught up: after its first assignment, every
 * assigned partition has a known position and high watermark and at most
 * kafka.ready_lag messages of lag (a partition with nothing to apply — an
 * empty log, a start at the end — counts as caught up). A new assignment
 * (rebalance) makes it false until its partitions catch up; otherwise it
 * stays true. NULL: true (no source, nothing to wait for). One atomic
 * load; any thread. */
bool tly_source_ready(tly_source_t *src);
/* Copies counters into *st and up to cap partitions into parts (may be NULL
 * when cap is 0); st->npartitions says how many are assigned. Any thread. */
void tly_source_stats(tly_source_t *src, tly_source_stats_t *st, tly_partition_stat_t *parts,
                      size_t cap);

#endif
