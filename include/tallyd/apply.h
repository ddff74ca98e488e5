/*
 * apply.h — a batch of Kafka messages decoded and applied to the store by
 * a set of appliers: the thread that hands over the batch (the source's
 * poll thread) and nthreads − 1 worker threads.
 *
 * Each entity's events from one partition are applied by one applier in
 * batch order, whatever keys the messages carry, so a reply for an entity
 * reflects a prefix of its events in partition order (DESIGN.md, §3).
 *
 * The appliers know nothing of Kafka: the caller hands over each message's
 * payload and position, and reads back what applying it gave.
 *
 * Threads: tly_apply_new/start/stop/free on one thread (the source's main
 * thread); tly_apply_batch on one thread at a time (the poll thread, or the
 * main thread once the workers were stopped), RCU-registered.
 */
#ifndef TALLYD_APPLY_H
#define TALLYD_APPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/error.h"
#include "tallyd/feature.h"
#include "tallyd/shard.h"
#include "tallyd/store.h"

#define TLY_APPLY_BATCH_MAX   4096 /* items of one batch */
#define TLY_APPLY_THREADS_MAX 64   /* appliers of one set (kafka.threads' upper bound) */

typedef struct tly_apply tly_apply_t;

/* How the batches were applied, counted since tly_apply_new. */
typedef struct {
    uint64_t alone;  /* by applier 0 alone (small, or no worker running) */
    uint64_t bypart; /* spread by partition */
    uint64_t shared; /* shared by entity */
    uint64_t pipelined; /* applied by the workers while the caller went on (tly_apply_submit) */
    /* items of shared batches decoded by every applier, not once: their
     * escaped strings and ids did not fit the room kept for them */
    uint64_t redecoded;
} tly_apply_stats_t;

/* One message of a batch, and what applying it gave. */
typedef struct {
    /* set by the caller */
    const char *payload; /* borrowed until tly_apply_batch returns; NULL: none */
    size_t len;
    int64_t offset;
    /* the message timestamp (-1: none); read only by the event rules
     * without a time field */
    int64_t kafka_ts_ms;
    int32_t partition;
    /* names the message's topic-partition (e.g. an index into the caller's
     * partition table): a batch spread by partition gives each one's items
     * to one applier */
    uint32_t part;
    int topic;     /* its event rules: fs->topics[topic]; -1: fs->events */
    bool replayed; /* already in restored state (tly_event_t.replayed) */
    /* written by tly_apply_batch */
    tly_err_t err;   /* TLY_OK: applied; else why it was rejected */
    int64_t time_ms; /* the event time; -1: rejected, or late for every feature */
} tly_apply_item_t;

/*
 * Returns a new set of nthreads appliers (clamped to [1,
 * TLY_APPLY_THREADS_MAX]) for events read by fs's rules into store. shard
 * (may be NULL) is shard mode's: an event must then arrive on its key
 * entity's partition (else TLY_E_EV_MISROUTED). fs, store and shard are
 * borrowed and must outlive the set. No thread starts yet. Aborts on OOM.
 */
tly_apply_t *tly_apply_new(const tly_featset_t *fs, tly_store_t *store, const tly_shard_t *shard,
                           size_t nthreads);

/*
 * Decodes and applies one item again, on the caller's thread, and sets its
 * verdict (err, time_ms) as tly_apply_batch would: for an item a batch
 * rejected as EV_MISROUTED before the shard router learnt a partition count
 * the topics grew to. The caller is the thread that calls tly_apply_batch
 * (it uses that applier's decoders), between batches or while a pipelined
 * batch is in flight (tly_apply_submit/wait). Returns the verdict.
 */
tly_err_t tly_apply_again(tly_apply_t *ap, tly_apply_item_t *it, int64_t now_ms);

/* Starts the worker threads (nthreads − 1); each registers with RCU. A
 * worker that cannot be started is logged and the set goes on with fewer.
 * Returns the number of appliers now running, the caller's thread
 * included. */
size_t tly_apply_start(tly_apply_t *ap);

/* Stops and joins the workers; tly_apply_batch then applies alone on the
 * caller's thread. Safe to call twice. */
void tly_apply_stop(tly_apply_t *ap);

/* Stops the workers and frees ap. NULL is allowed. */
void tly_apply_free(tly_apply_t *ap);

/*
 * Decodes items[0..n) (n ≤ TLY_APPLY_BATCH_MAX) and applies them to the
 * store at wall time now_ms, and returns when all are done: every item's
 * err and time_ms are written. Small batches, and every
 * batch while no worker runs, are applied on the calling thread alone.
 * Borrows items for the call. The calling thread takes part as applier 0.
 */
void tly_apply_batch(tly_apply_t *ap, tly_apply_item_t *items, size_t n, int64_t now_ms);

/*
 * Pipelined batches: the caller decodes a batch while the workers apply
 * the one before, and goes on (polls the next) while they apply it.
 *
 *   tly_apply_stage(ap, items, n, now)   decode items[0..n) on this thread
 *   tly_apply_wait(ap)                   the batch submitted before is done
 *   tly_apply_submit(ap)                 the workers apply the staged batch
 *
 * The workers share a submitted batch by entity (as tly_apply_batch shares
 * one), so each entity's events keep their batch order; batches apply one
 * after the other, in submission order. tly_apply_submit first waits for
 * the batch before; once tly_apply_wait returns, that batch's items carry
 * their err and time_ms, and the caller owns them again (items are
 * borrowed from stage until then). tly_apply_batch waits for a submitted
 * batch before it applies its own. With no worker running, stage decodes
 * nothing and submit applies the batch on the calling thread.
 *
 * tly_apply_stage returns false, and stages nothing, for a batch that
 * spreads over the appliers by partition: tly_apply_batch, where every
 * applier decodes and applies its partitions' items at once, does more.
 * tly_apply_pipelines: true while workers run (pipelining pays).
 *
 * The workers apply the entities of the store shards below a cut, the
 * caller those from it on (tly_store_shares), which it applies in
 * tly_apply_wait before it waits for the workers: so a caller with time to
 * spare (the poll thread, polling faster than one apply thread applies)
 * takes part of the apply. The cut starts at 64 (the workers own every
 * shard) and moves by one shard a batch towards the side that waited for
 * the other, between 16 and 64. tly_apply_cut: where it is now;
 * tly_apply_pin_cut fixes it (clamped to 16..64; tests, benchmarks).
 * tly_apply_wait returns whether a batch was in flight.
 */
bool tly_apply_pipelines(const tly_apply_t *ap);
bool tly_apply_stage(tly_apply_t *ap, tly_apply_item_t *items, size_t n, int64_t now_ms);
void tly_apply_submit(tly_apply_t *ap);
bool tly_apply_wait(tly_apply_t *ap);
uint32_t tly_apply_cut(const tly_apply_t *ap);
void tly_apply_pin_cut(tly_apply_t *ap, uint32_t cut);

/* Fills *st with the counters. Any thread (relaxed reads). */
void tly_apply_stats(const tly_apply_t *ap, tly_apply_stats_t *st);

#endif
