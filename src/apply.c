/*
 * apply.c — a batch decoded and applied by several appliers (apply.h).
 *
 * A batch is applied by up to nthreads appliers: applier 0 is the thread
 * that calls tly_apply_batch (the source's poll thread), the others are
 * workers woken through mu/go for each batch. A batch that spans enough
 * partitions is spread by partition (spread_by_partition): each applier
 * applies the items of its partitions whole, in batch order. Otherwise
 * (librdkafka queues a fetch's messages partition by partition, so a batch
 * mostly comes from one partition) the appliers share it by entity: each
 * decodes every item and applies the entities whose ids hash to it
 * (tly_store_prefetch_share). Either way every entity's events from one
 * partition are applied by one applier in batch order, the order Kafka
 * gives them. Small batches, and all of them while no worker runs, are
 * applied by applier 0 alone: waking a worker costs more than it saves.
 *
 * Threads: the workers only decode and apply (RCU-registered); between the
 * start and the end of a batch they read the items and each writes the
 * verdicts (err, time_ms) of its own items; tly_apply_batch waits for all
 * of them before it returns, so the caller owns the items again.
 *
 * Invariants: a worker touches a batch only between the gen bump that
 * hands it out and its own decrement of busy; the verdict of each item is
 * written by exactly one applier.
 */
#include "tallyd/apply.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/decode.h"
#include "tallyd/log.h"
#include "tallyd/rcu.h"

#define SPREAD_MIN 64 /* smaller batches are applied by applier 0 alone */
#define AHEAD      2  /* items an applier decodes ahead of the one it applies */

/* One applier: its own decoders (they keep scratch state) and what it
 * applies of the batch (apply_list), set by tly_apply_batch: the items
 * idx[0..nidx) whole (bypart), or its share of the entities of every item. */
typedef struct {
    tly_apply_t *ap;
    pthread_t thread;     /* workers only (applier 0 is the caller's thread) */
    uint64_t gen0;        /* workers: ap->gen when started (earlier batches are not theirs) */
    tly_decoder_t **decs; /* [(AHEAD + 1) * ap->ndecs], see tly_apply.ndecs */
    bool bypart;
    uint32_t *idx; /* [TLY_APPLY_BATCH_MAX] */
    size_t nidx;
    uint32_t share, nshares;
} applier_t;

struct tly_apply {
    const tly_featset_t *fs;
    tly_store_t *store;
    const tly_shard_t *shard;
    /* appliers[0] is the caller's thread, the others are workers; each
     * applier's decs[r * ndecs + i] reads fs->topics[i]'s events by its
     * rules, decs[r * ndecs + ntopics] the top-level rules, r < AHEAD + 1 */
    applier_t *appliers;
    size_t nappliers;
    size_t ndecs;
    size_t nworkers; /* running; written by start and stop, while no batch runs */
    /* the batch being applied: set by tly_apply_batch before it hands it
     * out, read by the workers until they are done with it */
    tly_apply_item_t *items;
    size_t nitems;
    int64_t now_ms;
    uint8_t *by_part; /* [TLY_APPLY_BATCH_MAX] spread_by_partition's choice */
    /* handshake: tly_apply_batch bumps gen to hand out a batch; each worker
     * applies its part and decrements busy */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    uint64_t gen; /* under mu */
    size_t busy;  /* under mu */
    bool quit;    /* under mu */
    /* counters: written by the tly_apply_batch thread, read relaxed */
    atomic_uint_fast64_t alone, bypart, shared;
};

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (q == NULL) {
        tly_error("apply: out of memory (%zu bytes)", n);
        abort();
    }
    return q;
}

/* Shard mode: an event must arrive on the partition of its key entity's
 * id, or its owner would never see it (EV_MISROUTED: the producer did not
 * key by the id, or used another partitioner). An event without that id is
 * left to the store, which counts it as EV_MISSING_KEY. */
static tly_err_t check_route(const tly_apply_t *ap, const tly_event_rules_t *rules,
                             const tly_event_t *ev, int32_t partition)
{
    int32_t nparts = tly_shard_partitions(ap->shard);
    if (nparts <= 0 || rules->key_entity < 0)
        return TLY_OK;
    char id[TLY_MAX_ID];
    size_t len = 0;
    if (tly_entity_id(ap->fs, (uint32_t)rules->key_entity, ev, id, sizeof id, &len) != TLY_OK)
        return TLY_OK;
    return tly_partition_of(id, len, nparts) == partition ? TLY_OK : TLY_E_EV_MISROUTED;
}

/* Decodes one item into *ev with the applier's decoder set r (of
 * AHEAD + 1): TLY_OK, or why the event is rejected. Writes nothing shared. */
static tly_err_t decode_item(const tly_apply_t *ap, const applier_t *a, size_t r,
                             const tly_apply_item_t *it, tly_event_t *ev)
{
    size_t di = it->topic >= 0 ? (size_t)it->topic : ap->ndecs - 1;
    const tly_event_rules_t *rules = it->topic >= 0 ? &ap->fs->topics[it->topic] : &ap->fs->events;
    tly_err_t err = tly_decode_json(a->decs[r * ap->ndecs + di], it->payload,
                                    it->payload ? it->len : 0, it->kafka_ts_ms, ev);
    /* The store drops events beyond the loosest max_future_skew of all
     * topics; a topic with a tighter one is held to it here. */
    if (err == TLY_OK && rules->max_future_skew_ms < ap->fs->max_future_skew_ms &&
        ev->time_ms > ap->now_ms + rules->max_future_skew_ms)
        err = TLY_E_EV_FUTURE;
    if (err == TLY_OK && ap->shard != NULL)
        err = check_route(ap, rules, ev, it->partition);
    if (err == TLY_OK && it->replayed)
        ev->replayed = true;
    return err;
}

/*
 * An applier. With bypart, it applies the items of its partitions whole,
 * in batch order. Otherwise it is share `a->share` of `a->nshares`: it
 * decodes every item of the batch, in order, and applies the entities of
 * each event that fall to it (tly_store_prefetch_share). Either way every
 * entity's events from one partition are applied by one applier in offset
 * order, whatever keys the messages carry. Sharing, each applier decides
 * alike whether an event is rejected; share 0 alone writes the items'
 * verdicts. It decodes AHEAD
 * items ahead of the one it applies and hints the store about them (the
 * item two ahead its table slots, the next one its records), so that the
 * cache misses of finding their entities overlap the apply before.
 * Decoding does not depend on the store, so the order of applies is
 * unchanged.
 */
static void apply_list(tly_apply_t *ap, applier_t *a)
{
    tly_event_t ev[AHEAD + 1];
    tly_prefetch_t pf[AHEAD + 1];
    tly_err_t err[AHEAD + 1];
    for (size_t r = 0; r <= AHEAD; r++)
        err[r] = TLY_E_EV_BAD_JSON; /* each is set before it is read */
    size_t n = a->bypart ? a->nidx : ap->nitems;
    const uint32_t *idx = a->bypart ? a->idx : NULL;
    const uint32_t share = a->bypart ? 0 : a->share, nshares = a->bypart ? 1 : a->nshares;
    const bool verdicts = share == 0;
    /* One read-side section for the whole list (at most
     * TLY_APPLY_BATCH_MAX items, a few ms): the store's own lock and unlock
     * for each hint and apply then nest, which skips their memory
     * barriers. Nothing here waits for a grace period. */
    tly_rcu_read_lock();
    for (size_t k = 0; k < n + AHEAD; k++) {
        if (k < n) {
            size_t r = k % (AHEAD + 1);
            err[r] = decode_item(ap, a, r, &ap->items[idx ? idx[k] : k], &ev[r]);
            if (err[r] == TLY_OK)
                tly_store_prefetch_share(ap->store, &ev[r], share, nshares, &pf[r]);
        }
        if (k >= 1 && k - 1 < n && err[(k - 1) % (AHEAD + 1)] == TLY_OK)
            tly_store_prefetch_records(ap->store, &pf[(k - 1) % (AHEAD + 1)]);
        if (k >= AHEAD) {
            size_t r = (k - AHEAD) % (AHEAD + 1);
            tly_apply_item_t *it = &ap->items[idx ? idx[k - AHEAD] : k - AHEAD];
            int64_t time_ms = -1;
            if (err[r] == TLY_OK) {
                /* the store's verdict: rejected whole (a future time, a
                 * missing key, ...), or taken, though maybe late for every
                 * feature (counted by the store per feature) */
                tly_err_t aerr = tly_store_apply_hinted(ap->store, &ev[r], &pf[r], it->partition,
                                                        it->offset, ap->now_ms);
                if (aerr == TLY_OK)
                    time_ms = ev[r].time_ms;
                else if (aerr != TLY_E_EV_LATE)
                    err[r] = aerr;
            }
            if (verdicts) {
                it->err = err[r];
                it->time_ms = time_ms;
            }
        }
    }
    tly_rcu_read_unlock();
}

static void *worker_main(void *arg)
{
    applier_t *a = arg;
    tly_apply_t *ap = a->ap;
    char name[16];
    snprintf(name, sizeof name, "tly-apply%u", (unsigned)(a - ap->appliers));
    (void)pthread_setname_np(pthread_self(), name);
    tly_rcu_thread_online();
    uint64_t seen = a->gen0;
    pthread_mutex_lock(&ap->mu);
    for (;;) {
        while (!ap->quit && ap->gen == seen)
            pthread_cond_wait(&ap->go, &ap->mu);
        if (ap->quit)
            break;
        seen = ap->gen;
        pthread_mutex_unlock(&ap->mu);
        apply_list(ap, a);
        pthread_mutex_lock(&ap->mu);
        if (--ap->busy == 0)
            pthread_cond_signal(&ap->done);
    }
    pthread_mutex_unlock(&ap->mu);
    tly_rcu_thread_offline();
    return NULL;
}

/* Lists each applier's items by partition, in batch order, when that
 * spreads them evenly enough (no applier more than a quarter over its
 * share): each item is then decoded once. A batch from a few partitions
 * (librdkafka queues a fetch's messages partition by partition) is shared
 * by entity instead, every applier decoding every item. */
static bool spread_by_partition(tly_apply_t *ap, size_t na)
{
    size_t count[TLY_APPLY_THREADS_MAX] = {0}, most = 0;
    for (size_t i = 0; i < ap->nitems; i++) {
        uint64_t h = (uint64_t)ap->items[i].part * UINT64_C(0x9e3779b97f4a7c15);
        size_t k = (size_t)(h >> 33) % na;
        ap->by_part[i] = (uint8_t)k;
        if (++count[k] > most)
            most = count[k];
    }
    if (most * na * 4 > ap->nitems * 5)
        return false;
    for (size_t k = 0; k < na; k++) {
        ap->appliers[k].bypart = true;
        ap->appliers[k].nidx = 0;
    }
    for (size_t i = 0; i < ap->nitems; i++) {
        applier_t *a = &ap->appliers[ap->by_part[i]];
        a->idx[a->nidx++] = (uint32_t)i;
    }
    return true;
}

void tly_apply_batch(tly_apply_t *ap, tly_apply_item_t *items, size_t n, int64_t now_ms)
{
    if (n == 0)
        return;
    ap->items = items;
    ap->nitems = n;
    ap->now_ms = now_ms;
    applier_t *self = &ap->appliers[0];
    if (ap->nworkers == 0 || n < SPREAD_MIN) {
        atomic_fetch_add_explicit(&ap->alone, 1, memory_order_relaxed);
        self->bypart = false;
        self->nshares = 1;
        apply_list(ap, self);
    } else {
        size_t na = ap->nworkers + 1;
        if (spread_by_partition(ap, na)) {
            atomic_fetch_add_explicit(&ap->bypart, 1, memory_order_relaxed);
        } else {
            atomic_fetch_add_explicit(&ap->shared, 1, memory_order_relaxed);
            for (size_t k = 0; k < na; k++) {
                ap->appliers[k].bypart = false;
                ap->appliers[k].nshares = (uint32_t)na;
            }
        }
        pthread_mutex_lock(&ap->mu);
        ap->gen++;
        ap->busy = ap->nworkers;
        pthread_cond_broadcast(&ap->go);
        pthread_mutex_unlock(&ap->mu);
        apply_list(ap, self);
        pthread_mutex_lock(&ap->mu);
        while (ap->busy > 0)
            pthread_cond_wait(&ap->done, &ap->mu);
        pthread_mutex_unlock(&ap->mu);
    }
    ap->items = NULL;
    ap->nitems = 0;
}

void tly_apply_stats(const tly_apply_t *ap, tly_apply_stats_t *st)
{
    st->alone = atomic_load_explicit(&ap->alone, memory_order_relaxed);
    st->bypart = atomic_load_explicit(&ap->bypart, memory_order_relaxed);
    st->shared = atomic_load_explicit(&ap->shared, memory_order_relaxed);
}

tly_apply_t *tly_apply_new(const tly_featset_t *fs, tly_store_t *store, const tly_shard_t *shard,
                           size_t nthreads)
{
    tly_apply_t *ap = xrealloc(NULL, sizeof *ap);
    *ap = (tly_apply_t){.fs = fs, .store = store, .shard = shard};
    atomic_init(&ap->alone, 0);
    atomic_init(&ap->bypart, 0);
    atomic_init(&ap->shared, 0);
    pthread_mutex_init(&ap->mu, NULL);
    pthread_cond_init(&ap->go, NULL);
    pthread_cond_init(&ap->done, NULL);
    ap->ndecs = fs->ntopics + 1;
    ap->nappliers = nthreads < 1                       ? 1
                    : nthreads > TLY_APPLY_THREADS_MAX ? TLY_APPLY_THREADS_MAX
                                                       : nthreads;
    ap->appliers = xrealloc(NULL, ap->nappliers * sizeof *ap->appliers);
    for (size_t k = 0; k < ap->nappliers; k++) {
        applier_t *a = &ap->appliers[k];
        *a = (applier_t){.ap = ap, .share = (uint32_t)k, .nshares = 1};
        a->idx = xrealloc(NULL, TLY_APPLY_BATCH_MAX * sizeof *a->idx);
        a->decs = xrealloc(NULL, (AHEAD + 1) * ap->ndecs * sizeof *a->decs);
        for (size_t r = 0; r <= AHEAD; r++) {
            tly_decoder_t **set = &a->decs[r * ap->ndecs];
            for (size_t t = 0; t < fs->ntopics; t++)
                set[t] = tly_decoder_new_rules(fs, &fs->topics[t]);
            set[fs->ntopics] = tly_decoder_new(fs);
        }
    }
    ap->by_part = xrealloc(NULL, TLY_APPLY_BATCH_MAX * sizeof *ap->by_part);
    return ap;
}

size_t tly_apply_start(tly_apply_t *ap)
{
    for (size_t k = ap->nworkers + 1; k < ap->nappliers; k++) {
        ap->appliers[k].gen0 = ap->gen; /* gen is written by this thread only */
        int rc = pthread_create(&ap->appliers[k].thread, NULL, worker_main, &ap->appliers[k]);
        if (rc != 0) {
            tly_warn("source: cannot start apply thread %zu of %zu (%s); going on with %zu", k + 1,
                     ap->nappliers, strerror(rc), k);
            break;
        }
        ap->nworkers++;
    }
    return ap->nworkers + 1;
}

void tly_apply_stop(tly_apply_t *ap)
{
    if (ap->nworkers == 0)
        return;
    pthread_mutex_lock(&ap->mu);
    ap->quit = true;
    pthread_cond_broadcast(&ap->go);
    pthread_mutex_unlock(&ap->mu);
    for (size_t k = 1; k <= ap->nworkers; k++)
        pthread_join(ap->appliers[k].thread, NULL);
    ap->nworkers = 0;
    ap->quit = false;
}

void tly_apply_free(tly_apply_t *ap)
{
    if (ap == NULL)
        return;
    tly_apply_stop(ap);
    for (size_t k = 0; k < ap->nappliers; k++) {
        for (size_t i = 0; i < (AHEAD + 1) * ap->ndecs; i++)
            tly_decoder_free(ap->appliers[k].decs[i]);
        free(ap->appliers[k].decs);
        free(ap->appliers[k].idx);
    }
    free(ap->appliers);
    free(ap->by_part);
    pthread_mutex_destroy(&ap->mu);
    pthread_cond_destroy(&ap->go);
    pthread_cond_destroy(&ap->done);
    free(ap);
}
