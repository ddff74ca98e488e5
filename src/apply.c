/*
 * apply.c — a batch decoded and applied by several appliers (apply.h).
 *
 * A batch is applied by up to nthreads appliers: applier 0 is the thread
 * that calls tly_apply_batch (the source's poll thread), the others are
 * workers woken through mu/go for each batch. A batch that spans enough
 * partitions is spread by partition (spread_by_partition): each applier
 * decodes and applies the items of its partitions whole, in batch order.
 * Otherwise (librdkafka queues a fetch's messages partition by partition,
 * so a batch mostly comes from one partition) the appliers share it by
 * entity, in two phases:
 *
 *   1. decode: the appliers take chunks of CHUNK items in turn (an atomic
 *      counter hands them out, so a worker woken late takes fewer) and
 *      decode each item once, into the batch-wide `decoded` records: the
 *      verdict, the event, and its entity ids rendered and hashed
 *      (tly_store_hint). The strings of a decoded event point into the
 *      payload, which lives until the batch is done, or into the
 *      decoder's scratch (strings with escapes), which the decoder's next
 *      call overwrites: those, and the rendered ids, are copied into the
 *      chunk's own bytes. An item whose copies do not fit is marked redo.
 *   2. apply: once every item is decoded (a barrier: the `ndecoded`
 *      counter, and `decoded_cv` for those that wait), each applier walks
 *      all items in batch order and applies the entities whose ids hash to
 *      it (tly_store_prefetch_slots, tly_store_apply_hinted); it decodes
 *      the redo items itself, as every applier did with every item before.
 *      Applier 0 applies every item (its apply gives the verdict); the
 *      others pass over those of which they own no entity.
 *
 * Pipelined (tly_apply_stage/submit/wait, apply.h): the caller runs
 * phase 1 alone, whole, into one of two record sets while the workers
 * apply the batch before from the other; submit hands the staged batch to
 * the workers and returns, and the caller polls the next batch meanwhile.
 * The batch is shared by store shard as in phase 2, with no barrier: the
 * workers own the shards below `cut` (worker k the k − 1-th of nworkers
 * shares of them; worker 1 writes the verdicts), the caller the shards from
 * `cut` on, which it applies in tly_apply_wait before it waits for the
 * workers. The cut moves one shard a batch towards whichever side waited
 * for the other. That keeps the source's poll thread (poll, collect,
 * settle) off the appliers' path, where tly_apply_batch has it wait for
 * them, and lets it apply what its time allows.
 *
 * So a message is decoded once (not once per applier) and its ids are
 * rendered and hashed once. Either way every entity's events from one
 * partition are applied by one applier in batch order, the order Kafka
 * gives them. Small batches, and all of them while no worker runs, are
 * applied by applier 0 alone: waking a worker costs more than it saves;
 * they, and the batches spread by partition, decode each item once as it
 * is, streaming (apply_list decodes AHEAD items ahead).
 *
 * Memory (allocated once, when there are workers): a decoded record is
 * DECODED_HEAD bytes and the event's first ap->evsize bytes — its header
 * and vals[0..nfields), not the whole tly_event_t with its TLY_MAX_FIELDS
 * values (about 1 KB): 152 bytes for config/demo.yaml's 5 fields, 1,096
 * at the most (64); times TLY_APPLY_BATCH_MAX items, 0.6 MB to 4.5 MB.
 * The chunks' bytes are CHUNK_BYTES for CHUNK items (256 bytes an item,
 * where ids of a few entity types and the odd escaped string take tens),
 * 1 MB, of which a batch touches what it writes.
 *
 * Threads: the workers only decode and apply (RCU-registered); between the
 * start and the end of a batch they read the items and each writes the
 * verdicts (err, time_ms) of its own items; tly_apply_batch waits for all
 * of them before it returns, so the caller owns the items again.
 *
 * A staged batch's records are written by the caller before the hand-out
 * (under mu) that publishes them, into the set the batch in flight does
 * not use; the caller takes the items back at tly_apply_wait (under mu,
 * after every worker's decrement).
 *
 * Invariants: a worker touches a batch only between the gen bump that
 * hands it out and its own decrement of busy; the verdict of each item is
 * written by exactly one applier; a decoded record (and its chunk's bytes)
 * is written by the one applier that took its chunk, and read by the
 * others only after the barrier, which orders them (release by the
 * fetch-add that counts the chunk, acquire by the load that sees all
 * counted).
 */
#include "tallyd/apply.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/decode.h"
#include "tallyd/log.h"
#include "tallyd/rcu.h"

#define SPREAD_MIN  64            /* smaller batches are applied by applier 0 alone */
#define AHEAD       2             /* items an applier decodes ahead of the one it applies */
#define CHUNK       64            /* items of a shared batch one applier decodes at a time */
#define CHUNK_BYTES (CHUNK * 256) /* their copied strings and ids */
#define NCHUNKS     ((TLY_APPLY_BATCH_MAX + CHUNK - 1) / CHUNK)
#define CUT_MIN     16 /* pipelined: the workers own at least these store shards */
#define CUT_MAX     64 /* ... and at most all of them */

/* One item of a batch shared by entity, as phase 1 left it for every
 * applier; the event's first evsize bytes follow (DECODED_HEAD on). */
typedef struct {
    tly_err_t err; /* decode_item's verdict; TLY_OK: the rest is set */
    bool redo;     /* the copies did not fit its chunk's bytes: decode again */
    bool matched;  /* held is set (tly_prefetch_t.matched) */
    uint8_t n;     /* entities hinted (tly_store_hint) */
    uint8_t entity[TLY_PREFETCH_MAX];
    uint8_t idlen[TLY_PREFETCH_MAX];
    uint16_t ids; /* where their ids start, one after another, in the chunk's bytes */
    unsigned long h[TLY_PREFETCH_MAX];
    uint64_t held; /* the `where` conditions the event meets (tly_prefetch_t.held) */
} decoded_t;

#define DECODED_HEAD ((sizeof(decoded_t) + 7) / 8 * 8)

_Static_assert(CHUNK_BYTES <= UINT16_MAX, "decoded_t.ids must reach every byte of a chunk");
_Static_assert(TLY_MAX_ENTITIES <= UINT8_MAX + 1, "decoded_t.entity holds an entity type");

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
    /* sharing a batch: the store shards whose entities it applies, and
     * whether it writes the verdicts (tly_prefetch_t.owned, counts) */
    uint64_t owned;
    bool counts;
} applier_t;

/* A batch and where its phase 1 records go. */
typedef struct {
    tly_apply_item_t *items;
    size_t n;
    int64_t now_ms;
    uint8_t *decoded; /* [TLY_APPLY_BATCH_MAX * rec_size]; NULL with one applier */
    char *bytes;      /* [NCHUNKS * CHUNK_BYTES] */
    bool pre;         /* decoded whole before the hand-out (tly_apply_stage) */
    /* shard mode: the partition counts its events are judged by, taken by
     * the caller when the batch was made (every applier judges alike) */
    tly_shard_routes_t routes;
} batch_t;

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
    /* the batch being applied: set by tly_apply_batch (or submit) before
     * it hands it out, read by the workers until they are done with it */
    batch_t cur; /* cur.pre: submitted and not waited for (in flight) */
    /* a pipelined batch decoded by the caller while cur is applied
     * (tly_apply_stage); its records are the other of the two sets */
    batch_t staged;
    /* Pipelined: the workers own the store shards below cut, the caller
     * (applier 0) those from cut on, which it applies in tly_apply_wait
     * before it waits; cut moves one shard a batch towards whoever waited
     * (caller's thread only). */
    uint32_t cut;
    bool cut_pinned; /* tly_apply_pin_cut: cut stays */
    /* A batch shared by entity (see the file comment): records of rec_size
     * bytes and each chunk's bytes, two sets (a pipelined batch is decoded
     * into one while the other is applied); NULL with one applier. */
    size_t evsize, rec_size;
    uint8_t *decoded_set[2];
    char *bytes_set[2];
    atomic_size_t next_chunk;  /* the next chunk to take */
    atomic_size_t ndecoded;    /* items decoded; all: phase 2 may start */
    pthread_cond_t decoded_cv; /* under mu: ndecoded reached nitems */
    /* handshake: tly_apply_batch bumps gen to hand out a batch; each worker
     * applies its part and decrements busy */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    uint64_t gen; /* under mu */
    size_t busy;  /* under mu */
    bool quit;    /* under mu */
    /* counters: written by the tly_apply_batch thread, read relaxed */
    atomic_uint_fast64_t alone, bypart, shared, pipelined;
    atomic_uint_fast64_t redecoded; /* by every applier (redo); any applier adds */
};

/* Shard mode: an event must arrive on the partition of its key entity's
 * id, or its owner would never see it (EV_MISROUTED: the producer did not
 * key by the id, or used another partitioner), under one of the counts of
 * routes (the batch's snapshot: tly_shard_routes). An event without that
 * id is left to the store, which counts it as EV_MISSING_KEY. */
static tly_err_t check_route(const tly_apply_t *ap, const tly_shard_routes_t *routes,
                             const tly_event_rules_t *rules, const tly_event_t *ev,
                             int32_t partition)
{
    if (routes->n == 0 || rules->key_entity < 0)
        return TLY_OK;
    char id[TLY_MAX_ID];
    size_t len = 0;
    if (tly_entity_id(ap->fs, (uint32_t)rules->key_entity, ev, id, sizeof id, &len) != TLY_OK)
        return TLY_OK;
    return tly_shard_routes_place(routes, id, len, partition) ? TLY_OK : TLY_E_EV_MISROUTED;
}

/* Decodes one item of batch b into *ev with the applier's decoder set r
 * (of AHEAD + 1): TLY_OK, or why the event is rejected. Writes nothing
 * shared. */
static tly_err_t decode_item(const tly_apply_t *ap, const applier_t *a, size_t r, const batch_t *b,
                             const tly_apply_item_t *it, tly_event_t *ev)
{
    const int64_t now_ms = b->now_ms;
    size_t di = it->topic >= 0 ? (size_t)it->topic : ap->ndecs - 1;
    const tly_event_rules_t *rules = it->topic >= 0 ? &ap->fs->topics[it->topic] : &ap->fs->events;
    tly_err_t err = tly_decode_json(a->decs[r * ap->ndecs + di], it->payload,
                                    it->payload ? it->len : 0, it->kafka_ts_ms, ev);
    /* The store drops events beyond the loosest max_future_skew of all
     * topics; a topic with a tighter one is held to it here. */
    if (err == TLY_OK && rules->max_future_skew_ms < ap->fs->max_future_skew_ms &&
        ev->time_ms > now_ms + rules->max_future_skew_ms)
        err = TLY_E_EV_FUTURE;
    if (err == TLY_OK && ap->shard != NULL)
        err = check_route(ap, &b->routes, rules, ev, it->partition);
    if (err == TLY_OK && it->replayed)
        ev->replayed = true;
    return err;
}

static decoded_t *decoded_of(const tly_apply_t *ap, const batch_t *b, size_t i)
{
    return (decoded_t *)(b->decoded + i * ap->rec_size);
}

/* Copies ev's strings that do not point into the item's payload (those
 * with escapes, in the decoder's scratch) to bytes[*used..CHUNK_BYTES) and
 * points ev at the copies; false when they do not fit. */
static bool keep_strings(tly_event_t *ev, const tly_apply_item_t *it, char *bytes, size_t *used)
{
    uintptr_t lo = (uintptr_t)it->payload, hi = lo + it->len;
    for (uint32_t f = 0; f < ev->nfields; f++) {
        tly_value_t *v = &ev->vals[f];
        uintptr_t at = (uintptr_t)v->u.s;
        if (v->type != TLY_V_STR || (at >= lo && at <= hi && v->len <= hi - at))
            continue;
        if (v->len > CHUNK_BYTES - *used)
            return false;
        memcpy(bytes + *used, v->u.s, v->len);
        v->u.s = bytes + *used;
        *used += v->len;
    }
    return true;
}

/* Copies the ids, hashes and held conditions of pf into d and
 * bytes[*used..CHUNK_BYTES); false when the ids do not fit. */
static bool keep_ids(decoded_t *d, const tly_prefetch_t *pf, char *bytes, size_t *used)
{
    d->n = (uint8_t)pf->n;
    d->ids = (uint16_t)*used;
    d->matched = pf->matched;
    d->held = pf->held;
    for (uint32_t j = 0; j < pf->n; j++) {
        if (pf->idlen[j] > CHUNK_BYTES - *used)
            return false;
        memcpy(bytes + *used, pf->id[j], pf->idlen[j]);
        *used += pf->idlen[j];
        d->entity[j] = (uint8_t)pf->entity[j];
        d->idlen[j] = pf->idlen[j];
        d->h[j] = pf->h[j];
    }
    return true;
}

/* Phase 1 for chunk c of batch b: decodes its items into their records,
 * with the applier's decoder set 0. */
static void decode_chunk(tly_apply_t *ap, applier_t *a, const batch_t *b, size_t c)
{
    size_t lo = c * CHUNK, hi = lo + CHUNK < b->n ? lo + CHUNK : b->n;
    char *bytes = &b->bytes[c * CHUNK_BYTES];
    size_t used = 0;
    uint64_t redo = 0;
    tly_event_t ev;
    tly_prefetch_t pf;
    for (size_t i = lo; i < hi; i++) {
        decoded_t *d = decoded_of(ap, b, i);
        d->redo = false;
        d->err = decode_item(ap, a, 0, b, &b->items[i], &ev);
        if (d->err != TLY_OK)
            continue;
        tly_store_hint(ap->store, &ev, &pf);
        size_t mark = used;
        if (!keep_strings(&ev, &b->items[i], bytes, &used) || !keep_ids(d, &pf, bytes, &used)) {
            d->redo = true;
            used = mark;
            redo++;
            continue;
        }
        memcpy((uint8_t *)d + DECODED_HEAD, &ev, ap->evsize);
    }
    if (redo > 0)
        atomic_fetch_add_explicit(&ap->redecoded, redo, memory_order_relaxed);
}

/* Phase 1 and the barrier: decodes chunks until none is left, then waits
 * until the others decoded theirs. */
static void decode_shared(tly_apply_t *ap, applier_t *a)
{
    const size_t n = ap->cur.n, nchunks = (n + CHUNK - 1) / CHUNK;
    size_t c;
    while ((c = atomic_fetch_add_explicit(&ap->next_chunk, 1, memory_order_relaxed)) < nchunks) {
        decode_chunk(ap, a, &ap->cur, c);
        size_t k = c + 1 < nchunks ? CHUNK : n - c * CHUNK;
        if (atomic_fetch_add_explicit(&ap->ndecoded, k, memory_order_acq_rel) + k == n) {
            /* under mu: a waiter checks the count under it before it
             * sleeps, so it cannot miss this */
            pthread_mutex_lock(&ap->mu);
            pthread_cond_broadcast(&ap->decoded_cv);
            pthread_mutex_unlock(&ap->mu);
        }
    }
    if (atomic_load_explicit(&ap->ndecoded, memory_order_acquire) == n)
        return;
    pthread_mutex_lock(&ap->mu);
    while (atomic_load_explicit(&ap->ndecoded, memory_order_acquire) < n)
        pthread_cond_wait(&ap->decoded_cv, &ap->mu);
    pthread_mutex_unlock(&ap->mu);
}

/* Phase 2's view of item i for applier a: its decode's verdict, and on
 * TLY_OK the event in *ev and its hint in *pf, the share's table slots
 * being loaded. A redo item is decoded again with decoder set r.
 *
 * *skip: the item is TLY_OK but a, not share 0 (whose apply also gives the
 * verdict and counts the event), owns none of its hinted entities, so the
 * store would apply nothing of it here. With at most TLY_PREFETCH_MAX
 * entity types the hint holds every entity the event feeds whose id
 * renders, and an id that does not render rejects the event for every
 * share (when a feature of its entity type matches). */
static tly_err_t load_shared(tly_apply_t *ap, const applier_t *a, size_t r, size_t i,
                             tly_event_t *ev, tly_prefetch_t *pf, bool *skip)
{
    const decoded_t *d = decoded_of(ap, &ap->cur, i);
    *skip = false;
    if (d->redo) {
        tly_err_t err = decode_item(ap, a, r, &ap->cur, &ap->cur.items[i], ev);
        if (err == TLY_OK)
            tly_store_prefetch_share(ap->store, ev, a->owned, a->counts, pf);
        return err;
    }
    if (d->err != TLY_OK)
        return d->err;
    const char *id = &ap->cur.bytes[i / CHUNK * CHUNK_BYTES + d->ids];
    pf->n = d->n;
    pf->ids = true;
    pf->matched = d->matched;
    pf->held = d->held;
    for (uint32_t j = 0; j < d->n; j++) {
        pf->entity[j] = d->entity[j];
        pf->idlen[j] = d->idlen[j];
        pf->h[j] = d->h[j];
        memcpy(pf->id[j], id, d->idlen[j]);
        id += d->idlen[j];
    }
    uint32_t mine = tly_store_prefetch_slots(ap->store, pf, a->owned, a->counts);
    if (mine == 0 && !a->counts && ap->fs->nentities <= TLY_PREFETCH_MAX) {
        *skip = true;
        return TLY_OK;
    }
    memcpy(ev, (const uint8_t *)d + DECODED_HEAD, ap->evsize);
    return TLY_OK;
}

/*
 * An applier. With bypart, it applies the items of its partitions whole,
 * in batch order (alone: the whole batch). Otherwise it is share
 * `a->share` of `a->nshares`: it decodes its part of the batch
 * (decode_shared), then walks every item, in order, and applies the
 * entities of each event that fall to it. Either way every entity's events
 * from one partition are applied by one applier in offset order, whatever
 * keys the messages carry. Sharing, each applier decides alike whether an
 * event is rejected (the decode's verdict is the same for all, and the
 * store's too); share 0 alone writes the items' verdicts. It decodes (or,
 * sharing, loads) AHEAD items ahead of the one it applies and hints the
 * store about them (the item two ahead its table slots, the next one its
 * records), so that the cache misses of finding their entities overlap the
 * apply before. Decoding does not depend on the store, so the order of
 * applies is unchanged.
 */
static void apply_list(tly_apply_t *ap, applier_t *a)
{
    tly_event_t ev[AHEAD + 1];
    tly_prefetch_t pf[AHEAD + 1];
    tly_err_t err[AHEAD + 1];
    bool skip[AHEAD + 1] = {false}; /* load_shared's */
    for (size_t r = 0; r <= AHEAD; r++)
        err[r] = TLY_E_EV_BAD_JSON; /* each is set before it is read */
    size_t n = a->bypart ? a->nidx : ap->cur.n;
    const uint32_t *idx = a->bypart ? a->idx : NULL;
    const uint64_t owned = a->bypart ? TLY_STORE_ALL_SHARDS : a->owned;
    const bool verdicts = a->bypart || a->counts;
    /* from the batch-wide records: a shared batch, or a pipelined one
     * (decoded before it was handed out) */
    const bool shared = !a->bypart && (owned != TLY_STORE_ALL_SHARDS || ap->cur.pre);
    if (shared && !ap->cur.pre)
        decode_shared(ap, a);
    /* One read-side section for the whole list (at most
     * TLY_APPLY_BATCH_MAX items, a few ms): the store's own lock and unlock
     * for each hint and apply then nest, which skips their memory
     * barriers. Nothing here waits for a grace period. */
    tly_rcu_read_lock();
    for (size_t k = 0; k < n + AHEAD; k++) {
        if (k < n && shared) {
            size_t r = k % (AHEAD + 1);
            err[r] = load_shared(ap, a, r, k, &ev[r], &pf[r], &skip[r]);
        } else if (k < n) {
            size_t r = k % (AHEAD + 1);
            err[r] = decode_item(ap, a, r, &ap->cur, &ap->cur.items[idx ? idx[k] : k], &ev[r]);
            if (err[r] == TLY_OK)
                tly_store_prefetch_share(ap->store, &ev[r], owned, verdicts, &pf[r]);
        }
        if (k >= 1 && k - 1 < n && err[(k - 1) % (AHEAD + 1)] == TLY_OK &&
            !skip[(k - 1) % (AHEAD + 1)])
            tly_store_prefetch_records(ap->store, &pf[(k - 1) % (AHEAD + 1)]);
        if (k >= AHEAD) {
            size_t r = (k - AHEAD) % (AHEAD + 1);
            tly_apply_item_t *it = &ap->cur.items[idx ? idx[k - AHEAD] : k - AHEAD];
            int64_t time_ms = -1;
            if (err[r] == TLY_OK && !skip[r]) {
                /* the store's verdict: rejected whole (a future time, a
                 * missing key, ...), or taken, though maybe late for every
                 * feature (counted by the store per feature) */
                tly_err_t aerr = tly_store_apply_hinted(ap->store, &ev[r], &pf[r], it->partition,
                                                        it->offset, ap->cur.now_ms);
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

/* Which of na appliers takes item i's partition when a batch is spread by
 * partition. */
static size_t part_applier(const tly_apply_item_t *it, size_t na)
{
    uint64_t h = (uint64_t)it->part * UINT64_C(0x9e3779b97f4a7c15);
    return (size_t)(h >> 33) % na;
}

/* Whether items[0..n) spread evenly enough over na appliers by partition
 * (no applier more than a quarter over its share). Writes nothing. */
static bool spreads_by_partition(const tly_apply_item_t *items, size_t n, size_t na)
{
    size_t count[TLY_APPLY_THREADS_MAX] = {0}, most = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = part_applier(&items[i], na);
        if (++count[k] > most)
            most = count[k];
    }
    return most * na * 4 <= n * 5;
}

/* Lists each applier's items by partition, in batch order, when that
 * spreads them evenly enough: each applier then takes its items whole,
 * with no barrier. A batch from a few partitions (librdkafka queues a
 * fetch's messages partition by partition) is shared by entity instead. */
static bool spread_by_partition(tly_apply_t *ap, size_t na)
{
    if (!spreads_by_partition(ap->cur.items, ap->cur.n, na))
        return false;
    for (size_t k = 0; k < na; k++) {
        ap->appliers[k].bypart = true;
        ap->appliers[k].nidx = 0;
    }
    for (size_t i = 0; i < ap->cur.n; i++) {
        applier_t *a = &ap->appliers[part_applier(&ap->cur.items[i], na)];
        a->idx[a->nidx++] = (uint32_t)i;
    }
    return true;
}

/* Hands the batch in ap->cur to the workers (gen bump under mu) and
 * counts them busy. */
static void hand_out(tly_apply_t *ap)
{
    pthread_mutex_lock(&ap->mu);
    ap->gen++;
    ap->busy = ap->nworkers;
    pthread_cond_broadcast(&ap->go);
    pthread_mutex_unlock(&ap->mu);
}

/* Waits until no worker is busy with the batch handed out. */
static void wait_workers(tly_apply_t *ap)
{
    pthread_mutex_lock(&ap->mu);
    while (ap->busy > 0)
        pthread_cond_wait(&ap->done, &ap->mu);
    pthread_mutex_unlock(&ap->mu);
}

void tly_apply_batch(tly_apply_t *ap, tly_apply_item_t *items, size_t n, int64_t now_ms)
{
    if (n == 0)
        return;
    tly_apply_wait(ap); /* one batch at a time */
    ap->cur = (batch_t){.items = items,
                        .n = n,
                        .now_ms = now_ms,
                        .decoded = ap->decoded_set[0],
                        .bytes = ap->bytes_set[0]};
    if (ap->shard != NULL)
        tly_shard_routes(ap->shard, &ap->cur.routes);
    applier_t *self = &ap->appliers[0];
    if (ap->nworkers == 0 || n < SPREAD_MIN) {
        atomic_fetch_add_explicit(&ap->alone, 1, memory_order_relaxed);
        self->bypart = false;
        self->owned = TLY_STORE_ALL_SHARDS;
        self->counts = true;
        apply_list(ap, self);
    } else {
        size_t na = ap->nworkers + 1;
        if (spread_by_partition(ap, na)) {
            atomic_fetch_add_explicit(&ap->bypart, 1, memory_order_relaxed);
        } else {
            atomic_fetch_add_explicit(&ap->shared, 1, memory_order_relaxed);
            for (size_t k = 0; k < na; k++) {
                ap->appliers[k].bypart = false;
                ap->appliers[k].owned = tly_store_shares((uint32_t)k, (uint32_t)na);
                ap->appliers[k].counts = k == 0;
            }
            /* before the hand-out, which publishes them under mu */
            atomic_store_explicit(&ap->next_chunk, 0, memory_order_relaxed);
            atomic_store_explicit(&ap->ndecoded, 0, memory_order_relaxed);
        }
        hand_out(ap);
        apply_list(ap, self);
        wait_workers(ap);
    }
    ap->cur = (batch_t){0};
}

tly_err_t tly_apply_again(tly_apply_t *ap, tly_apply_item_t *it, int64_t now_ms)
{
    tly_event_t ev;
    batch_t b = {.now_ms = now_ms}; /* judged by the counts known now */
    if (ap->shard != NULL)
        tly_shard_routes(ap->shard, &b.routes);
    tly_err_t err = decode_item(ap, &ap->appliers[0], 0, &b, it, &ev);
    int64_t time_ms = -1;
    if (err == TLY_OK) {
        tly_rcu_read_lock();
        err = tly_store_apply(ap->store, &ev, it->partition, it->offset, now_ms);
        tly_rcu_read_unlock();
        if (err == TLY_OK)
            time_ms = ev.time_ms;
        else if (err == TLY_E_EV_LATE)
            err = TLY_OK;
    }
    it->err = err;
    it->time_ms = time_ms;
    return err;
}

void tly_apply_pin_cut(tly_apply_t *ap, uint32_t cut)
{
    ap->cut = cut < CUT_MIN ? CUT_MIN : cut > CUT_MAX ? CUT_MAX : cut;
    ap->cut_pinned = true;
}

uint32_t tly_apply_cut(const tly_apply_t *ap)
{
    return ap->cut;
}

bool tly_apply_pipelines(const tly_apply_t *ap)
{
    return ap->nworkers > 0;
}

bool tly_apply_stage(tly_apply_t *ap, tly_apply_item_t *items, size_t n, int64_t now_ms)
{
    /* spread by partition, all appliers decode and apply at once: better
     * than one applying while the caller polls */
    if (ap->nworkers > 0 && spreads_by_partition(items, n, ap->nworkers + 1))
        return false;
    /* the set cur does not use (cur's, while it is in flight) */
    size_t set = ap->cur.pre && ap->cur.decoded == ap->decoded_set[0] ? 1 : 0;
    ap->staged = (batch_t){.items = items,
                           .n = n,
                           .now_ms = now_ms,
                           .decoded = ap->decoded_set[set],
                           .bytes = ap->bytes_set[set],
                           .pre = true};
    if (ap->shard != NULL)
        tly_shard_routes(ap->shard, &ap->staged.routes);
    if (ap->nworkers == 0)
        return true; /* tly_apply_submit applies it, decoding as it goes */
    const size_t nchunks = (n + CHUNK - 1) / CHUNK;
    for (size_t c = 0; c < nchunks; c++)
        decode_chunk(ap, &ap->appliers[0], &ap->staged, c);
    return true;
}

void tly_apply_submit(tly_apply_t *ap)
{
    tly_apply_wait(ap);
    if (ap->staged.n == 0)
        return;
    if (ap->nworkers == 0) {
        /* no worker (stopped, or none started): applied here, as a batch */
        batch_t b = ap->staged;
        ap->staged = (batch_t){0};
        tly_apply_batch(ap, b.items, b.n, b.now_ms);
        return;
    }
    atomic_fetch_add_explicit(&ap->pipelined, 1, memory_order_relaxed);
    ap->cur = ap->staged;
    ap->staged = (batch_t){0};
    /* shared by entity: the workers split the shards below cut (worker k
     * share k − 1 of them; worker 1 writes the verdicts), the caller takes
     * the rest in tly_apply_wait */
    const uint64_t below = ap->cut >= 64 ? TLY_STORE_ALL_SHARDS : (UINT64_C(1) << ap->cut) - 1;
    for (size_t k = 1; k <= ap->nworkers; k++) {
        ap->appliers[k].bypart = false;
        ap->appliers[k].owned = tly_store_shares((uint32_t)(k - 1), (uint32_t)ap->nworkers) & below;
        ap->appliers[k].counts = k == 1;
    }
    ap->appliers[0].bypart = false;
    ap->appliers[0].owned = ~below;
    ap->appliers[0].counts = false;
    hand_out(ap);
}

bool tly_apply_wait(tly_apply_t *ap)
{
    if (!ap->cur.pre)
        return false;
    if (ap->appliers[0].owned != 0)
        apply_list(ap, &ap->appliers[0]); /* the caller's shards */
    /* the one who waits gets less next time */
    pthread_mutex_lock(&ap->mu);
    bool workers_done = ap->busy == 0;
    pthread_mutex_unlock(&ap->mu);
    if (!ap->cut_pinned && workers_done && ap->cut < CUT_MAX)
        ap->cut++;
    else if (!ap->cut_pinned && !workers_done && ap->cut > CUT_MIN)
        ap->cut--;
    wait_workers(ap);
    ap->cur = (batch_t){0};
    return true;
}

void tly_apply_stats(const tly_apply_t *ap, tly_apply_stats_t *st)
{
    st->alone = atomic_load_explicit(&ap->alone, memory_order_relaxed);
    st->bypart = atomic_load_explicit(&ap->bypart, memory_order_relaxed);
    st->shared = atomic_load_explicit(&ap->shared, memory_order_relaxed);
    st->pipelined = atomic_load_explicit(&ap->pipelined, memory_order_relaxed);
    st->redecoded = atomic_load_explicit(&ap->redecoded, memory_order_relaxed);
}

tly_apply_t *tly_apply_new(const tly_featset_t *fs, tly_store_t *store, const tly_shard_t *shard,
                           size_t nthreads)
{
    tly_apply_t *ap = tly_xrealloc(NULL, sizeof *ap);
    *ap = (tly_apply_t){.fs = fs, .store = store, .shard = shard};
    atomic_init(&ap->alone, 0);
    atomic_init(&ap->bypart, 0);
    atomic_init(&ap->shared, 0);
    atomic_init(&ap->pipelined, 0);
    atomic_init(&ap->redecoded, 0);
    atomic_init(&ap->next_chunk, 0);
    atomic_init(&ap->ndecoded, 0);
    pthread_cond_init(&ap->decoded_cv, NULL);
    pthread_mutex_init(&ap->mu, NULL);
    pthread_cond_init(&ap->go, NULL);
    pthread_cond_init(&ap->done, NULL);
    ap->ndecs = fs->ntopics + 1;
    ap->cut = CUT_MAX;
    ap->nappliers = nthreads < 1                       ? 1
                    : nthreads > TLY_APPLY_THREADS_MAX ? TLY_APPLY_THREADS_MAX
                                                       : nthreads;
    ap->appliers = tly_xrealloc(NULL, ap->nappliers * sizeof *ap->appliers);
    for (size_t k = 0; k < ap->nappliers; k++) {
        applier_t *a = &ap->appliers[k];
        *a = (applier_t){.ap = ap, .owned = TLY_STORE_ALL_SHARDS, .counts = true};
        a->idx = tly_xrealloc(NULL, TLY_APPLY_BATCH_MAX * sizeof *a->idx);
        a->decs = tly_xrealloc(NULL, (AHEAD + 1) * ap->ndecs * sizeof *a->decs);
        for (size_t r = 0; r <= AHEAD; r++) {
            tly_decoder_t **set = &a->decs[r * ap->ndecs];
            for (size_t t = 0; t < fs->ntopics; t++)
                set[t] = tly_decoder_new_rules(fs, &fs->topics[t]);
            set[fs->ntopics] = tly_decoder_new(fs);
        }
    }
    ap->evsize = offsetof(tly_event_t, vals) + fs->nfields * sizeof(tly_value_t);
    ap->rec_size = (DECODED_HEAD + ap->evsize + 7) / 8 * 8;
    if (ap->nappliers > 1) {
        for (size_t k = 0; k < 2; k++) {
            ap->decoded_set[k] = tly_xrealloc(NULL, TLY_APPLY_BATCH_MAX * ap->rec_size);
            ap->bytes_set[k] = tly_xrealloc(NULL, NCHUNKS * CHUNK_BYTES);
        }
    }
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
    (void)tly_apply_wait(ap);
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
    for (size_t k = 0; k < 2; k++) {
        free(ap->decoded_set[k]);
        free(ap->bytes_set[k]);
    }
    pthread_cond_destroy(&ap->decoded_cv);
    pthread_mutex_destroy(&ap->mu);
    pthread_cond_destroy(&ap->go);
    pthread_cond_destroy(&ap->done);
    free(ap);
}
