/*
 * store.c — the concurrent entity table and per-feature state.
 *
 * Table: TLY_STORE_SHARDS shards, each an open-addressed array of tagged
 * record pointers (store_table.c) written by one thread at a time, keyed by
 * (entity type, id); the hash's top bits pick the shard. Readers look up
 * without locks under rcu_read_lock(); writers that add, replace or remove a
 * record hold the shard's mutex. (liburcu's cds_lfht was measured first: at
 * 10^5–10^6 records its lookups cost 3–5 cache misses, ~500 ns here, and
 * dominated ingest; then Concurrency Kit's ck_hs, which loads every record
 * a probe passes; see bench/README.md.) A record that is replaced (it grew) or
 * expired is unlinked and freed after an RCU grace period, so a reader
 * holding a pointer never sees it freed.
 *
 * Record: one allocation — a 16-byte header, the id (padded to 8 bytes),
 * then the state in 64-bit words. A new record is allocated with room for
 * the event that creates it. A record that needs more room is copied into a
 * larger one, which replaces it in its table slot; the old one is marked
 * DEAD and retired. State has two encodings:
 *
 *  compact — while an entity is small (most are: a user with three events),
 *    its state is the log of the events themselves, byte-packed:
 *      varint zigzag(time, or for all but the first record time − first
 *      record's time), varint mask (bit s: the feature in slot s took the
 *      event), one 2-bit tag per value field of the
 *      entity type (nil, int, double, string), then each value (zigzag
 *      varint; 8 bytes, a bool among them as NaN bits store_log.c tells
 *      apart; string as varint (len << 1) + bytes, or varint
 *      (intern id << 1 | 1) for short strings in the store's intern table).
 *    Every answer is computed from the log at read time; appending never
 *    decodes it. An event that would take the log past COMPACT_MAX_BYTES
 *    replays it into the word encoding.
 *
 *  words — word 0 is the newest event time; then segments sorted by id
 *    (SID_WINDOW(feature slot, window), then SID_ITEMS(slot) last):
 *      header  = seg id (bits 0..15) | payload words (bits 16..47)
 *      count   one word per bucket: bucket << 32 | n
 *      sum/min/max/avg: bucket << 32 | float << 31 | n, then the value bits
 *      last/last_k: the count word (count | item width << 32 | packed
 *        << 48), then items oldest → newest. Packed (a list whose first
 *        item's values were all numbers, booleans or interned strings):
 *        a schema word (nvals << 32 | a 4-bit type a value), then items
 *        [payload of each value] [time], nvals + 1 words; an item that does
 *        not fit the schema turns the list tagged (store_words.c). Tagged:
 *        [words | nvals << 32] [values…] [time] [words]; a value is a tag
 *        word (type | len << 8) and its payload words. Time and length end
 *        the item, so a backward walk loads both without waiting on one.
 *    Buckets older than the window's range at the writer's `now` are pruned
 *    when the segment is written.
 *
 * Concurrency: each record has a sequence lock. A writer makes `seq` odd
 * with a CAS (writers of one record serialise there), writes with relaxed
 * atomic stores and makes `seq` even with a release store. Readers load
 * `seq` (acquire), copy or fold with relaxed loads, fence, and retry if
 * `seq` changed or was odd; a DEAD record sends them back to the table.
 * Readers bound every offset by the record's immutable capacity, so a torn
 * read can make them retry but never read out of bounds.
 *
 * Counters are per thread (no shared cache line on the ingest path) and
 * summed by tly_store_stats().
 */
#include "tallyd/store.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <time.h>

#include "store_int.h"
#include "tallyd/window.h"

#ifdef TLY_MIMALLOC
#include <mimalloc.h>
#endif

#if defined(__SANITIZE_THREAD__)
char tly_rcu_tsan_sync, tly_table_tsan_sync;
#endif

_Thread_local unsigned tly_rcu_depth; /* rcu.h */

/* A batch of records to free after a grace period: one call_rcu per
 * RETIRE_BATCH retirements, not one per record. */
typedef struct retired {
    struct rcu_head rcu;
    tstats_t *home;       /* the retiring thread's counters: ready goes there */
    struct retired *next; /* in home->ready */
    uint32_t n;
    void *ptr[RETIRE_BATCH];
} retired_t;

static _Atomic uint64_t store_gen;
static _Thread_local struct {
    uint64_t gen;
    tstats_t *st;
} tls;

/* ---- small helpers ---------------------------------------------------- */

void *store_xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "tallyd: out of memory allocating %zu bytes\n", n);
        abort();
    }
    return p;
}

tstats_t *store_thread_stats(tly_store_t *store)
{
    if (tls.gen == store->gen)
        return tls.st;
    tstats_t *st = store_xmalloc(sizeof *st);
    memset(st, 0, sizeof *st);
    atomic_init(&st->ready, NULL);
    pthread_mutex_lock(&store->mu);
    st->next = atomic_load_explicit(&store->stats, memory_order_relaxed);
    atomic_store_explicit(&store->stats, st, memory_order_release);
    pthread_mutex_unlock(&store->mu);
    tls.gen = store->gen;
    tls.st = st;
    return st;
}

static void stat_drop(tly_store_t *store, tly_err_t why)
{
    _Atomic uint64_t *c = &store_thread_stats(store)->dropped[why];
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static shard_t *shard_of(tly_store_t *store, unsigned long h)
{
    return &store->shards[(h >> 58) & (TLY_STORE_SHARDS - 1)];
}

/* ---- records: allocation, replacement, retirement ------------------------ */

/* Allocates a record with room for `words` state words (more if the
 * allocator's size class leaves room), locked by the caller (seq odd). */
static ent_t *ent_alloc(tly_store_t *store, uint32_t type, const char *id, size_t idlen,
                        uint8_t mode, uint32_t words)
{
    size_t head = sizeof(ent_t) + 8 * id_words(idlen);
    ent_t *e = store_xmalloc(head + 8 * (size_t)words);
    size_t usable = malloc_usable_size(e);
    e->type = (uint16_t)type;
    e->idlen = (uint8_t)idlen;
    e->cap = (uint32_t)((usable - head) / 8);
    e->mode = mode;
    atomic_init(&e->used, 0);
    memset((char *)(e + 1), 0, 8 * id_words(idlen));
    memcpy((char *)(e + 1), id, idlen);
    atomic_store_explicit(&e->seq, 1, memory_order_release);
    stat_add(&store_thread_stats(store)->bytes, (int64_t)usable);
    return e;
}

/* After the grace period (call_rcu thread): hands the batch back to the
 * thread that retired it. Freeing it there keeps the records in that
 * thread's allocator caches, where its next records come from; a free from
 * this thread would go through the arena's lock and bins instead. */
static void retired_ready_cb(struct rcu_head *head)
{
    tly_rcu_tsan_acquire();
    retired_t *r = caa_container_of(head, retired_t, rcu);
    tstats_t *home = r->home;
    r->next = atomic_load_explicit(&home->ready, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&home->ready, &r->next, r, memory_order_release,
                                                  memory_order_relaxed))
        ;
}

/* Frees the batches in ts->ready (the owner thread, or tly_store_free). */
static void retire_reap(tstats_t *ts)
{
    retired_t *r = atomic_exchange_explicit(&ts->ready, NULL, memory_order_acquire);
    while (r) {
        retired_t *next = r->next;
        for (uint32_t i = 0; i < r->n; i++)
            free(r->ptr[i]);
        free(r);
        r = next;
    }
}

/* Frees what earlier batches made ready, and hands the thread's pending
 * retirements to call_rcu. */
static void retire_flush(tstats_t *ts)
{
    if (atomic_load_explicit(&ts->ready, memory_order_relaxed))
        retire_reap(ts);
    retired_t *r = ts->retired;
    if (r && r->n) {
        ts->retired = NULL;
        r->home = ts;
        tly_call_rcu(&r->rcu, retired_ready_cb);
    }
}

/* Frees ent after a grace period; its bytes leave the count now. A thread
 * batches its retirements, so up to RETIRE_BATCH - 1 retired records wait
 * for the thread's next retirement, sweep, or tly_store_free(), and batches
 * past their grace period wait for the thread's next flush. */
static void ent_retire(tly_store_t *store, ent_t *ent)
{
    tstats_t *ts = store_thread_stats(store);
    stat_add(&ts->bytes, -(int64_t)malloc_usable_size(ent));
    if (!ts->retired) {
        ts->retired = store_xmalloc(sizeof *ts->retired);
        ts->retired->n = 0;
    }
    ts->retired->ptr[ts->retired->n++] = ent;
    if (ts->retired->n == RETIRE_BATCH)
        retire_flush(ts);
}

/* The seq value after one more writer step: bits 0..30 count, SEQ_DEAD kept. */
static uint32_t seq_next(uint32_t s)
{
    return (s & SEQ_DEAD) | ((s + 1) & ~SEQ_DEAD);
}

static void ent_lock(ent_t *ent)
{
    for (;;) {
        uint32_t s = atomic_load_explicit(&ent->seq, memory_order_relaxed);
        if (!(s & 1) && atomic_compare_exchange_weak_explicit(
                            &ent->seq, &s, seq_next(s), memory_order_acquire, memory_order_relaxed))
            break;
        caa_cpu_relax();
    }
    fence(memory_order_release);
}

static void ent_unlock(ent_t *ent)
{
    uint32_t s = atomic_load_explicit(&ent->seq, memory_order_relaxed);
    atomic_store_explicit(&ent->seq, seq_next(s), memory_order_release);
}

/* Marks a record replaced or expired. Under its lock. */
static void ent_mark_dead(ent_t *ent)
{
    uint32_t s = atomic_load_explicit(&ent->seq, memory_order_relaxed);
    atomic_store_explicit(&ent->seq, s | SEQ_DEAD, memory_order_relaxed);
}

/* Whether a record was replaced or expired. Under its lock. */
static bool ent_dead(const ent_t *ent)
{
    return (atomic_load_explicit(&ent->seq, memory_order_relaxed) & SEQ_DEAD) != 0;
}

/* Puts e (locked) in the table in place of old (locked, in the table):
 * old is marked DEAD, unlocked and retired. */
static void ent_replace(tly_store_t *store, ent_t *old, ent_t *e)
{
    unsigned long h = hash_id(store->seed, old->type, ent_id(old), old->idlen);
    shard_t *sh = shard_of(store, h);
    tly_tsan_publish();
    bool ok = tbl_replace(sh, h, old, e); /* takes sh->mu only if a rebuild got in the way */
    if (!ok) {
        /* Only the lock holder can unlink a live record. */
        fprintf(stderr, "tallyd: entity table invariant broken in replace\n");
        abort();
    }
    ent_mark_dead(old);
    ent_unlock(old);
    ent_retire(store, old);
}

/*
 * Replaces *entp (locked by the caller, in the table) with a copy in the
 * given encoding with room for `words` state words; copies `copy` words of
 * state when the encoding is unchanged. The old record is marked DEAD,
 * unlocked and retired; *entp becomes the new record, locked. A record
 * being built (F_BUILD) is copied without the table and freed at once: no
 * other thread has seen it.
 */
void store_regrow(tly_store_t *store, ent_t **entp, uint8_t mode, uint32_t words, uint32_t copy)
{
    ent_t *old = *entp;
    bool build = (old->mode & F_BUILD) != 0;
    ent_t *e = ent_alloc(store, old->type, ent_id(old), old->idlen,
                         (uint8_t)(mode | (build ? F_BUILD : 0)), words);
    /* plain copy: e is not published yet, and old is only read (its writer
     * is us, under its lock) */
    memcpy(ent_words(e), ent_words(old), 8 * (size_t)copy);
    atomic_store_explicit(&e->used,
                          copy ? atomic_load_explicit(&old->used, memory_order_relaxed) : 0,
                          memory_order_relaxed);
    if (build) {
        stat_add(&store_thread_stats(store)->bytes, -(int64_t)malloc_usable_size(old));
        free(old);
    } else {
        ent_replace(store, old, e);
    }
    *entp = e;
}

ent_t *store_build(tly_store_t *store, const ent_t *old, uint8_t mode, uint32_t words)
{
    return ent_alloc(store, old->type, ent_id(old), old->idlen, (uint8_t)(mode | F_BUILD), words);
}

void store_publish(tly_store_t *store, ent_t *old, ent_t *e)
{
    e->mode &= (uint8_t)~F_BUILD; /* before the table's release store publishes it */
    ent_replace(store, old, e);
}

/* Finds or inserts the record (type, id) and returns it locked and live.
 * With ev (may be NULL), a new compact record is sized for ev (feature
 * mask), the event about to be applied to it, and *nfirst is the length of
 * ev's log record encoded into first[REC_BUF], for the caller to
 * append (store_compact_append); else *nfirst is 0 and the caller applies
 * ev as usual. Caller holds rcu_read_lock. */
static ent_t *ent_get_locked(tly_store_t *store, uint32_t type, const char *id, size_t len,
                             unsigned long h, const tly_event_t *ev, uint64_t mask, uint8_t *first,
                             size_t *nfirst)
{
    *nfirst = 0;
    shard_t *sh = shard_of(store, h);
    for (;;) {
        ent_t *ent = tbl_get(sh, h, type, id, len);
        if (ent) {
            tly_tsan_subscribe();
            ent_lock(ent);
        } else {
            uint8_t fl = store->etypes[type].compact ? 0 : F_WORDS;
            uint32_t words = fl ? 1 : 0;
            if (!fl && ev)
                *nfirst = store_compact_first(store, &store->etypes[type], ev, mask, first, &words);
            ent = ent_alloc(store, type, id, len, fl, words); /* born locked */
            if (fl) {
                st(ent, 0, (uint64_t)INT64_MIN);
                atomic_store_explicit(&ent->used, 1, memory_order_relaxed);
            }
            tly_tsan_publish();
            pthread_mutex_lock(&sh->mu);
            bool added = tbl_insert(sh, h, ent);
            pthread_mutex_unlock(&sh->mu);
            if (!added) {
                stat_add(&store_thread_stats(store)->bytes, -(int64_t)malloc_usable_size(ent));
                free(ent); /* never published: another writer inserted it first */
                *nfirst = 0;
                continue;
            }
            stat_add(&store_thread_stats(store)->entities, 1);
        }
        if (!ent_dead(ent))
            return ent;
        ent_unlock(ent); /* replaced or swept while we looked: look again */
    }
}

static ent_t *ent_find(tly_store_t *store, uint32_t type, const char *id, size_t len)
{
    unsigned long h = hash_id(store->seed, type, id, len);
    ent_t *ent = tbl_get(shard_of(store, h), h, type, id, len);
    if (ent)
        tly_tsan_subscribe();
    return ent;
}

/* ---- public API --------------------------------------------------------- */

/* A seed for hash_id from the kernel's random source; should it fail (no
 * getrandom), the clock and an address, still unknown to a producer. */
static uint64_t random_seed(void)
{
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed = (uint64_t)ts.tv_nsec * UINT64_C(0x9e3779b97f4a7c15) ^ (uint64_t)ts.tv_sec ^
               (uint64_t)(uintptr_t)&seed;
    }
    return seed;
}

tly_store_t *tly_store_new(const tly_featset_t *fs)
{
    tly_store_t *store = store_xmalloc(sizeof *store);
    memset(store, 0, sizeof *store);
    store->fs = fs;
    store->gen = atomic_fetch_add(&store_gen, 1) + 1;
    pthread_mutex_init(&store->mu, NULL);
    atomic_init(&store->stats, NULL);
    atomic_init(&store->ninterned, 0);
    atomic_init(&store->full, false);
    for (size_t i = 0; i < INTERN_SLOTS; i++)
        atomic_init(&store->intern[i], NULL);

    store->etypes = store_xmalloc(sizeof *store->etypes * (fs->nentities ? fs->nentities : 1));
    store->vidx = store_xmalloc(sizeof *store->vidx * (fs->nfeats ? fs->nfeats : 1));
    store->restored = store_xmalloc(fs->nfeats ? fs->nfeats : 1);
    memset(store->restored, 0, fs->nfeats ? fs->nfeats : 1);
    store->lmap = NULL;
    store->pfeats = store_xmalloc(sizeof *store->pfeats * (fs->nfeats ? fs->nfeats : 1));
    store->pfirst = store_xmalloc(sizeof *store->pfirst * (fs->nentities ? fs->nentities : 1));
    for (size_t e = 0, n = 0; e < fs->nentities; e++) {
        store->pfirst[e] = (uint32_t)n;
        for (size_t i = 0; i < fs->entities[e].nfeats; i++) {
            const tly_feat_t *feat = &fs->feats[fs->entities[e].feats[i]];
            store->pfeats[n++] = (pfeat_t){
                .conds = feat->conds,
                .horizon_ms = feat->horizon_ms,
                .bit = feat->slot < 64 ? UINT64_C(1) << feat->slot : 0,
                .id = feat->id,
                .value = feat->nvalues ? feat->values[0] : 0,
                .kind = tly_agg_numeric(feat->agg)    ? PF_NUMERIC
                        : tly_agg_windowed(feat->agg) ? PF_PLAIN
                                                      : PF_ITEMS,
            };
        }
    }
    store->memo_ok = fs->match_masks;
    for (size_t i = 0; i < fs->nfeats; i++) {
        const tly_feat_t *feat = &fs->feats[i];
        if (!tly_agg_numeric(feat->agg) || feat->nvalues == 0)
            continue;
        uint32_t j = 0;
        while (j < store->nnumf && store->numf[j] != feat->values[0])
            j++;
        if (j < store->nnumf)
            continue;
        if (j == 32)
            store->memo_ok = false;
        else
            store->numf[store->nnumf++] = feat->values[0];
    }
    for (size_t e = 0; e < fs->nentities; e++) {
        etype_t *et = &store->etypes[e];
        const tly_entity_t *ent = &fs->entities[e];
        et->nvf = 0;
        et->compact = ent->nfeats <= COMPACT_MAX_SLOTS;
        atomic_init(&et->conv_words, 0);
        for (size_t i = 0; i < ent->nfeats; i++) {
            const tly_feat_t *feat = &fs->feats[ent->feats[i]];
            for (size_t v = 0; v < feat->nvalues; v++) {
                uint32_t j = 0;
                while (j < et->nvf && et->vf[j] != feat->values[v])
                    j++;
                if (j == et->nvf) {
                    if (et->nvf == TLY_MAX_ITEM_VALUES) {
                        et->compact = false;
                        continue;
                    }
                    et->vf[et->nvf++] = feat->values[v];
                }
                store->vidx[feat->id][v] = (uint8_t)j;
            }
        }
    }

    if (posix_memalign((void **)&store->shards, 64, sizeof(shard_t) * TLY_STORE_SHARDS) != 0) {
        fprintf(stderr, "tallyd: cannot allocate the entity table\n");
        abort();
    }
    store->seed = random_seed();
    for (size_t i = 0; i < TLY_STORE_SHARDS; i++)
        tbl_init(&store->shards[i], store->seed);
    return store;
}

void tly_store_free(tly_store_t *store)
{
    if (!store)
        return;
    /* No other thread uses the store any more: free records directly. */
    for (tstats_t *ts = atomic_load_explicit(&store->stats, memory_order_acquire); ts;
         ts = ts->next)
        retire_flush(ts);
    for (size_t i = 0; i < TLY_STORE_SHARDS; i++) {
        shard_t *sh = &store->shards[i];
        size_t pos = 0;
        for (ent_t *e; (e = tbl_next(sh, &pos)) != NULL;)
            free(e);
        tbl_destroy(sh);
    }
    tly_rcu_barrier(); /* every batch is now ready */
    for (tstats_t *ts = atomic_load_explicit(&store->stats, memory_order_acquire); ts;
         ts = ts->next)
        retire_reap(ts);
    free(store->shards);
    for (size_t i = 0; i < INTERN_SLOTS; i++)
        free(atomic_load_explicit(&store->intern[i], memory_order_relaxed));
    tstats_t *s = atomic_load_explicit(&store->stats, memory_order_acquire);
    while (s) {
        tstats_t *next = s->next;
        free(s);
        s = next;
    }
    pthread_mutex_destroy(&store->mu);
    if (tls.gen == store->gen)
        tls.gen = 0;
    free(store->etypes);
    free(store->pfeats);
    free(store->pfirst);
    free(store->vidx);
    free(store->restored);
    for (size_t t = 0; store->lmap != NULL && t < TLY_MAX_ENTITIES; t++)
        free(store->lmap[t].slot_feat);
    free(store->lmap);
    free(store);
}

/* What one event does to one entity type: its id and the matched features
 * (a run of apply_scratch.feats). */
typedef struct {
    uint32_t entity;
    uint32_t first, nfeats;
    uint64_t mask; /* feature slots, for the compact log */
    unsigned long h; /* hash_id of the id */
    size_t idlen;
    const char *idp; /* the id: the hint's, or id[] */
    char id[TLY_MAX_ID];
} plan_t;

/* Per-thread scratch of tly_store_apply (too large for the stack). */
static _Thread_local struct {
    plan_t plans[TLY_MAX_ENTITIES];
    uint32_t feats[TLY_MAX_FEATURES];
    uint8_t first[REC_BUF]; /* a new record's first log record */
} apply_scratch;

/* Phase 1 of apply_event for the events alike in what decides it: their
 * `where` outcome (held), the kinds of their numeric values (sig) and the
 * entity types they skip. A memo is written from an event phase 1 took
 * whole, rejecting nothing and dropping no feature as late: its plans
 * (entity type, features, slots) and matched features, with what a later
 * event must still pass to take them as they are: no feature late (at or
 * after now minus the shortest horizon), no string of an item longer than
 * max_string. Ids are the event's own. Per thread, by store generation. */
#define MEMO_SLOTS 32
#define MEMO_PLANS 4
#define MEMO_FEATS 32
#define MEMO_ITEMF 8
typedef struct {
    uint64_t gen; /* the store's; 0: empty */
    uint64_t held, sig, skip;
    int64_t min_horizon_ms;
    uint32_t nplans, nmatched, nitemf;
    struct {
        uint32_t entity, first, nfeats;
        uint64_t mask;
    } plan[MEMO_PLANS];
    uint32_t matched[MEMO_FEATS];
    uint32_t itemf[MEMO_ITEMF]; /* value fields of the matched items */
} memo_t;
static _Thread_local memo_t memos[MEMO_SLOTS];

/* Whether the entity of hash h falls to the applier owning the shards
 * `owned`: by its shard (the top six bits), so that appliers sharing a
 * batch write disjoint shards — no slot array, shard mutex or table rebuild
 * is touched by two of them (row g of bench/ingest: 2-8 % faster than by
 * other bits of the hash, three rounds in turn). */
static bool share_owns(unsigned long h, uint64_t owned)
{
    return owned >> ((uint64_t)h >> 58 & (TLY_STORE_SHARDS - 1)) & 1;
}

_Static_assert(TLY_STORE_SHARDS == 64, "an owned set is a 64-bit mask of shards");

uint64_t tly_store_shares(uint32_t share, uint32_t nshares)
{
    uint64_t m = 0;
    for (uint32_t s = 0; s < TLY_STORE_SHARDS; s++)
        if (nshares <= 1 || s % nshares == share)
            m |= UINT64_C(1) << s;
    return m;
}

void tly_store_prefetch(tly_store_t *store, const tly_event_t *ev, tly_prefetch_t *pf)
{
    tly_store_prefetch_share(store, ev, TLY_STORE_ALL_SHARDS, true, pf);
}

/* tly_store_hint and tly_store_prefetch_slots in one loop (the hot path of
 * an applier that decodes what it applies; test_store checks that the two
 * agree). */
void tly_store_prefetch_share(tly_store_t *store, const tly_event_t *ev, uint64_t owned,
                              bool counts, tly_prefetch_t *pf)
{
    const tly_featset_t *fs = store->fs;
    size_t len;
    pf->n = 0;
    pf->ids = true;
    pf->matched = fs->match_masks;
    pf->held = fs->match_masks ? tly_featset_match(fs, ev) : 0;
    pf->owned = owned;
    pf->counts = counts;
    for (uint32_t e = 0; e < fs->nentities && pf->n < TLY_PREFETCH_MAX; e++) {
        char *id = pf->id[pf->n];
        /* an id too long for the hint is left to the apply, which rejects
         * it (plans take at most UINT8_MAX bytes) */
        if (!(ev->skip_entities >> e & 1) &&
            tly_entity_id(fs, e, ev, id, sizeof pf->id[0], &len) == TLY_OK) {
            unsigned long h = hash_id(store->seed, e, id, len);
            if (share_owns(h, owned))
                tbl_prefetch(shard_of(store, h), h);
            pf->entity[pf->n] = e;
            pf->idlen[pf->n] = (uint8_t)len;
            pf->h[pf->n++] = h;
        }
    }
}

void tly_store_hint(const tly_store_t *store, const tly_event_t *ev, tly_prefetch_t *pf)
{
    const tly_featset_t *fs = store->fs;
    size_t len;
    pf->n = 0;
    pf->ids = true;
    pf->matched = fs->match_masks;
    pf->held = fs->match_masks ? tly_featset_match(fs, ev) : 0;
    pf->owned = TLY_STORE_ALL_SHARDS;
    pf->counts = true;
    for (uint32_t e = 0; e < fs->nentities && pf->n < TLY_PREFETCH_MAX; e++) {
        char *id = pf->id[pf->n];
        /* an id too long for the hint is left to the apply, which rejects
         * it (plans take at most UINT8_MAX bytes) */
        if (!(ev->skip_entities >> e & 1) &&
            tly_entity_id(fs, e, ev, id, sizeof pf->id[0], &len) == TLY_OK) {
            pf->entity[pf->n] = e;
            pf->idlen[pf->n] = (uint8_t)len;
            pf->h[pf->n++] = hash_id(store->seed, e, id, len);
        }
    }
}

uint32_t tly_store_prefetch_slots(tly_store_t *store, tly_prefetch_t *pf, uint64_t owned,
                                  bool counts)
{
    uint32_t mine = 0;
    pf->owned = owned;
    pf->counts = counts;
    for (uint32_t i = 0; i < pf->n; i++)
        if (share_owns(pf->h[i], owned)) {
            tbl_prefetch(shard_of(store, pf->h[i]), pf->h[i]);
            mine++;
        }
    return mine;
}

void tly_store_prefetch_id(tly_store_t *store, uint32_t entity, const char *id, size_t idlen,
                           tly_prefetch_t *pf)
{
    unsigned long h = hash_id(store->seed, entity, id, idlen);
    tbl_prefetch(shard_of(store, h), h);
    pf->n = 1;
    pf->owned = TLY_STORE_ALL_SHARDS;
    pf->counts = true;
    pf->h[0] = h;
    pf->ids = false;
    pf->matched = false;
}

void tly_store_prefetch_records(tly_store_t *store, const tly_prefetch_t *pf)
{
    for (uint32_t i = 0; i < pf->n; i++)
        if (share_owns(pf->h[i], pf->owned))
            tbl_prefetch_ent(shard_of(store, pf->h[i]), pf->h[i]);
}

void tly_store_prefetch_rest(tly_store_t *store, const tly_prefetch_t *pf)
{
    for (uint32_t i = 0; i < pf->n; i++)
        if (share_owns(pf->h[i], pf->owned))
            tbl_prefetch_rest(shard_of(store, pf->h[i]), pf->h[i], TLY_PREFETCH_READ_LINES);
}

/* The store's counted bytes: tly_store_stats' bytes. */
static int64_t counted_bytes(const tly_store_t *store)
{
    int64_t bytes = 0;
    for (size_t i = 0; i < TLY_STORE_SHARDS; i++)
        bytes += atomic_load_explicit(&store->shards[i].bytes, memory_order_relaxed);
    for (tstats_t *s = atomic_load_explicit(&store->stats, memory_order_acquire); s; s = s->next)
        bytes += atomic_load_explicit(&s->bytes, memory_order_relaxed);
    return bytes;
}

static void refresh_full(tly_store_t *store)
{
    atomic_store_explicit(&store->full,
                          store->max_bytes > 0 && counted_bytes(store) > store->max_bytes,
                          memory_order_relaxed);
}

void tly_store_set_max_bytes(tly_store_t *store, int64_t max_bytes)
{
    store->max_bytes = max_bytes > 0 ? max_bytes : 0;
    refresh_full(store);
}

/* The id and hash of plan pl's entity: rendered and hashed by the
 * prefetch (hint, which outlives the apply), or here. */
static tly_err_t plan_id(const tly_store_t *store, plan_t *pl, const tly_event_t *ev,
                         const tly_prefetch_t *hint)
{
    uint32_t k = 0;
    while (hint && k < hint->n && hint->entity[k] != pl->entity)
        k++;
    if (hint && k < hint->n) {
        pl->idp = hint->id[k];
        pl->idlen = hint->idlen[k];
        pl->h = hint->h[k];
        return TLY_OK;
    }
    pl->idp = pl->id;
    tly_err_t err = tly_entity_id(store->fs, pl->entity, ev, pl->id, sizeof pl->id, &pl->idlen);
    if (err == TLY_OK && pl->idlen > UINT8_MAX)
        err = TLY_E_EV_VALUE_TOO_LONG;
    if (err == TLY_OK)
        pl->h = hash_id(store->seed, pl->entity, pl->id, pl->idlen);
    return err;
}

/* Writes memo mo from the plans phase 1 made of an event in full (no
 * rejection, no late feature), when they fit. */
static void memo_put(const tly_store_t *store, memo_t *mo, uint64_t held, uint64_t sig,
                     uint64_t skip, const plan_t *plans, size_t nplans, const uint32_t *matched,
                     size_t nmatched)
{
    const tly_featset_t *fs = store->fs;
    if (nplans > MEMO_PLANS || nmatched > MEMO_FEATS)
        return;
    memo_t m = {.gen = store->gen, .held = held, .sig = sig, .skip = skip};
    m.min_horizon_ms = INT64_MAX;
    for (size_t p = 0; p < nplans; p++) {
        m.plan[p].entity = plans[p].entity;
        m.plan[p].first = plans[p].first;
        m.plan[p].nfeats = plans[p].nfeats;
        m.plan[p].mask = plans[p].mask;
    }
    for (size_t i = 0; i < nmatched; i++) {
        const tly_feat_t *feat = &fs->feats[matched[i]];
        m.matched[i] = matched[i];
        if (feat->horizon_ms < m.min_horizon_ms)
            m.min_horizon_ms = feat->horizon_ms;
        if (tly_agg_windowed(feat->agg))
            continue;
        for (size_t j = 0; j < feat->nvalues; j++) {
            uint32_t k = 0;
            while (k < m.nitemf && m.itemf[k] != feat->values[j])
                k++;
            if (k == MEMO_ITEMF)
                return;
            if (k == m.nitemf)
                m.itemf[m.nitemf++] = feat->values[j];
        }
    }
    m.nplans = (uint32_t)nplans;
    m.nmatched = (uint32_t)nmatched;
    *mo = m;
}

/* Applies ev's entities that fall to the applier owning the shards
 * `owned` (see tly_store_prefetch_share). Phase 1 runs whole in every
 * applier, so each decides alike, and the one that `counts` alone counts
 * the event: its drops and its apply. */
static tly_err_t apply_event(tly_store_t *store, const tly_event_t *ev, const tly_prefetch_t *hint,
                             uint64_t owned, bool counts, int64_t now_ms)
{
    const tly_featset_t *fs = store->fs;
    tly_err_t first_drop = TLY_OK;

    if (ev->time_ms > now_ms + fs->max_future_skew_ms) {
        if (counts)
            stat_drop(store, TLY_E_EV_FUTURE);
        return TLY_E_EV_FUTURE;
    }
    if (ev->time_ms < 0) {
        if (counts)
            stat_drop(store, TLY_E_EV_BAD_TIME);
        return TLY_E_EV_BAD_TIME;
    }

    /* Phase 1: decide everything that can reject the event, so a rejected
     * event changes nothing. Plans are built per entity type. */
    plan_t *plans = apply_scratch.plans;
    uint32_t *matched = apply_scratch.feats;
    size_t nplans = 0, nmatched = 0;
    /* locals, not loads from fs and ev per feature: the stores into the
     * plans below could alias them for all the compiler knows */
    const bool masks = fs->match_masks, replayed = ev->replayed;
    /* each distinct `where` condition tested once, not once per feature
     * (by the hint, when it did) */
    uint64_t held = !masks ? 0 : hint && hint->matched ? hint->held : tly_featset_match(fs, ev);
    memo_t *mo = NULL;
    uint64_t sig = 0;
    if (store->memo_ok && !replayed) {
        for (uint32_t i = 0; i < store->nnumf; i++) {
            tly_vtype_t t = ev->vals[store->numf[i]].type;
            sig |= (uint64_t)(t == TLY_V_NIL                        ? 0
                              : t == TLY_V_INT || t == TLY_V_DOUBLE ? 1
                                                                    : 2)
                   << (2 * i);
        }
        mo = &memos[mix64(held ^ sig * UINT64_C(0x9e3779b97f4a7c15) ^ ev->skip_entities) %
                    MEMO_SLOTS];
        if (mo->gen == store->gen && mo->held == held && mo->sig == sig &&
            mo->skip == ev->skip_entities && ev->time_ms >= now_ms - mo->min_horizon_ms) {
            bool fits = true;
            for (uint32_t i = 0; i < mo->nitemf; i++) {
                const tly_value_t *v = &ev->vals[mo->itemf[i]];
                fits = fits && !(v->type == TLY_V_STR && v->len > fs->max_string);
            }
            if (fits) {
                for (uint32_t p = 0; p < mo->nplans; p++) {
                    plan_t *pl = &plans[p];
                    pl->entity = mo->plan[p].entity;
                    pl->first = mo->plan[p].first;
                    pl->nfeats = mo->plan[p].nfeats;
                    pl->mask = mo->plan[p].mask;
                    tly_err_t err = plan_id(store, pl, ev, hint);
                    if (err != TLY_OK) {
                        if (counts)
                            stat_drop(store, err);
                        return err;
                    }
                }
                nplans = mo->nplans;
                matched = mo->matched;
                goto apply;
            }
            mo = NULL; /* not to be written over by this event */
        }
    }
    for (uint32_t e = 0; e < fs->nentities; e++) {
        const tly_entity_t *et = &fs->entities[e];
        plan_t *pl = NULL;
        if (ev->skip_entities >> e & 1)
            continue;
        const pfeat_t *pf = &store->pfeats[store->pfirst[e]];
        for (size_t i = 0, nfeats = et->nfeats; i < nfeats; i++, pf++) {
            /* the cheapest test first: most features fail their `where` */
            if (masks ? (pf->conds & ~held) != 0 : !tly_feat_match(&fs->feats[pf->id], ev))
                continue;
            if (replayed && store->restored[pf->id])
                continue; /* already in the state a snapshot restored */
            if (pf->kind == PF_NUMERIC) {
                const tly_value_t *v = &ev->vals[pf->value];
                if (v->type == TLY_V_NIL)
                    continue; /* numeric aggregations count events carrying the value */
                if (v->type != TLY_V_INT && v->type != TLY_V_DOUBLE) {
                    if (counts)
                        stat_drop(store, TLY_E_EV_WRONG_TYPE);
                    return TLY_E_EV_WRONG_TYPE;
                }
            } else if (pf->kind == PF_ITEMS) {
                const tly_feat_t *feat = &fs->feats[pf->id];
                for (size_t j = 0; j < feat->nvalues; j++) {
                    const tly_value_t *v = &ev->vals[feat->values[j]];
                    if (v->type == TLY_V_STR && v->len > fs->max_string) {
                        if (counts)
                            stat_drop(store, TLY_E_EV_VALUE_TOO_LONG);
                        return TLY_E_EV_VALUE_TOO_LONG;
                    }
                }
            }
            /* a window starts at or before now − its length: an event
             * within the horizon (the longest) is never late */
            if (ev->time_ms < now_ms - pf->horizon_ms &&
                ev->time_ms < tly_feat_earliest(&fs->feats[pf->id], now_ms)) {
                if (counts)
                    stat_drop(store, TLY_E_EV_LATE);
                if (first_drop == TLY_OK)
                    first_drop = TLY_E_EV_LATE;
                continue;
            }
            if (!pl) {
                pl = &plans[nplans];
                pl->entity = e;
                pl->first = (uint32_t)nmatched;
                pl->nfeats = 0;
                pl->mask = 0;
                tly_err_t err = plan_id(store, pl, ev, hint);
                if (err != TLY_OK) {
                    if (counts)
                        stat_drop(store, err);
                    return err;
                }
                nplans++;
            }
            matched[nmatched++] = pf->id;
            pl->nfeats++;
            pl->mask |= pf->bit;
        }
    }

    if (mo != NULL && first_drop == TLY_OK)
        memo_put(store, mo, held, sig, ev->skip_entities, plans, nplans, matched, nmatched);

apply:; /* C11: a label comes before a statement, not a declaration */
    /* Phase 2: apply, one record lock per entity. */
    tstats_t *ts = store_thread_stats(store);
    if (store->max_bytes > 0 && ++ts->cap_tick >= TLY_STORE_CAP_EVERY) {
        ts->cap_tick = 0;
        refresh_full(store);
    }
    const bool full =
        store->max_bytes > 0 && atomic_load_explicit(&store->full, memory_order_relaxed);
    tly_rcu_read_lock();
    for (size_t pi = 0; pi < nplans; pi++) {
        plan_t *pl = &plans[pi];
        if (!share_owns(pl->h, owned))
            continue;
        if (full &&
            tbl_get(shard_of(store, pl->h), pl->h, pl->entity, pl->idp, pl->idlen) == NULL) {
            stat_drop(store, TLY_E_EV_STORE_FULL); /* not held, and no room for it */
            continue;
        }
        size_t nfirst;
        ent_t *ent = ent_get_locked(store, pl->entity, pl->idp, pl->idlen, pl->h, ev, pl->mask,
                                    apply_scratch.first, &nfirst);
        const tly_entity_t *etype = &fs->entities[pl->entity];
        if (nfirst)
            store_compact_append(ent, apply_scratch.first, nfirst); /* born for it */
        else if (is_words(ent))
            store_words_apply(store, &ent, etype, pl->mask, matched + pl->first, pl->nfeats, ev,
                              now_ms);
        else
            store_compact_apply(store, &ent, etype, pl->mask, matched + pl->first, pl->nfeats, ev,
                                now_ms);
        ent_unlock(ent);
        stat_add(&ts->updates, pl->nfeats);
    }
    tly_rcu_read_unlock();
    if (nplans && counts)
        stat_add(&ts->applied, 1);
    return nplans ? TLY_OK : first_drop;
}

tly_err_t tly_store_apply(tly_store_t *store, const tly_event_t *ev, int32_t partition,
                          int64_t offset, int64_t now_ms)
{
    (void)partition;
    (void)offset;
    return apply_event(store, ev, NULL, TLY_STORE_ALL_SHARDS, true, now_ms);
}

tly_err_t tly_store_apply_hinted(tly_store_t *store, const tly_event_t *ev,
                                 const tly_prefetch_t *pf, int32_t partition, int64_t offset,
                                 int64_t now_ms)
{
    (void)partition;
    (void)offset;
    return apply_event(store, ev, pf->ids ? pf : NULL, pf->owned, pf->counts, now_ms);
}

/* ---- reads -------------------------------------------------------------- */

/* Begins a consistent read of the live record for (type, id): returns it
 * with *s0 (even), or NULL when the id is unknown. Caller holds
 * rcu_read_lock; `ent` is the previous attempt's record or NULL. */
static ent_t *read_begin(tly_store_t *store, ent_t *ent, uint32_t type, const char *id,
                         size_t idlen, uint32_t *s0)
{
    for (;;) {
        if (!ent) {
            ent = ent_find(store, type, id, idlen);
            if (!ent)
                return NULL;
        }
        uint32_t s = atomic_load_explicit(&ent->seq, memory_order_acquire);
        if (s & 1) {
            caa_cpu_relax();
            continue;
        }
        if (s & SEQ_DEAD) {
            ent = NULL; /* replaced or expired: ask the table again */
            continue;
        }
        *s0 = s;
        return ent;
    }
}

static bool read_valid(const ent_t *ent, uint32_t s0)
{
    fence(memory_order_acquire);
    return atomic_load_explicit(&ent->seq, memory_order_relaxed) == s0;
}

void (*store_read_hook)(void *ctx);
void *store_read_hook_ctx;

/* A private copy of a word record: its header, id and first `used` words,
 * each loaded as a reader loads it; NULL when out of memory. A read that
 * lost a race with a writer works on such a copy the next time, checking
 * the seqlock once the copy is taken: copying takes about as long as a
 * few values do, so a read of thousands of values of an entity written
 * more often than that read takes ends after one copy, where reading in
 * place again would start over for as long as the writes go on. */
static ent_t *words_copy(const ent_t *ent, uint32_t used)
{
    size_t idw = id_words(ent->idlen);
    ent_t *c = malloc(sizeof *c + 8 * (idw + (size_t)used));
    if (c == NULL)
        return NULL;
    atomic_init(&c->seq, 0);
    c->type = ent->type;
    c->idlen = ent->idlen;
    c->mode = ent->mode;
    c->cap = used;
    atomic_init(&c->used, used);
    memset(c + 1, 0, 8 * idw);
    memcpy(c + 1, ent_id(ent), ent->idlen);
    uint64_t *w = ent_words(c);
    for (uint32_t i = 0; i < used; i++)
        w[i] = ld(ent, i);
    return c;
}

/* What an attempt reads a word record from: the live record the first
 * time; after that a fresh private copy (*copy, replacing the last), with
 * *settled set as it is known consistent. NULL: the copy was torn, start
 * over. Out of memory: the live record, as the first time. */
static const ent_t *words_source(const ent_t *ent, uint32_t used, uint32_t s0, unsigned attempt,
                                 ent_t **copy, bool *settled)
{
    *settled = false;
    if (attempt == 0)
        return ent;
    free(*copy);
    *copy = words_copy(ent, used);
    if (*copy == NULL)
        return ent;
    if (!read_valid(ent, s0))
        return NULL;
    *settled = true;
    return *copy;
}

tly_err_t tly_store_read(tly_store_t *store, uint32_t entity, const char *id, size_t idlen,
                         const tly_featwin_t *req, size_t n, int64_t now_ms, tly_value_t *out,
                         int64_t *last_ms, char *strbuf, size_t strcap)
{
    const tly_featset_t *fs = store->fs;
    static _Thread_local log_t lg;
    tly_err_t err = TLY_OK;
    ent_t *ent = NULL, *copy = NULL;
    tly_rcu_read_lock();
    for (unsigned attempt = 0;; attempt++) {
        uint32_t s0 = 0;
        ent = read_begin(store, ent, entity, id, idlen, &s0);
        bool bad = false, full = false, words = ent && is_words(ent);
        uint32_t used = ent ? used_of(ent) : 0;
        size_t sused = 0;
        int64_t last = -1;
        uint32_t hint = 1; /* store_words_value's segment cursor, per attempt */
        err = TLY_OK;
        /* what the values are read from, and whether it is a copy already
         * known to be consistent (then no check follows the read) */
        const ent_t *src = ent;
        bool settled = false;
        if (ent && !words && (n > 0 || last_ms)) { /* decode only when asked */
            store_log_copy(ent, &lg);
            if (!read_valid(ent, s0))
                continue;
            settled = true;
            bad = !store_log_decode(store, &store->etypes[entity], &lg);
            for (size_t i = 0; last_ms && i < lg.nrecs; i++)
                last = lg.ts[i] > last ? lg.ts[i] : last;
        } else if (ent) {
            if (words && (src = words_source(ent, used, s0, attempt, &copy, &settled)) == NULL)
                continue;
            last = (int64_t)ld(src, 0);
        }
        for (size_t r = 0; r < n && !bad; r++) {
            const tly_feat_t *feat = &fs->feats[req[r].feat];
            tly_value_t *o = &out[r];
            if (tly_agg_windowed(feat->agg)) {
                if (req[r].window >= feat->nwindows) {
                    o->type = TLY_V_NIL;
                    err = TLY_E_INVAL;
                } else if (!ent) {
                    tly_cell_t none = TLY_CELL_INIT;
                    *o = tly_agg_result(feat->agg, &none);
                } else if (!words) {
                    *o = store_log_value(store, &lg, feat, req[r].window, now_ms);
                } else {
                    *o = store_words_value(src, used, feat, req[r].window, now_ms, &hint, &bad);
                }
                continue;
            }
            /* last: the newest item's first value; last_k: its item count */
            uint32_t k = feat->agg == TLY_AGG_LAST ? 1 : feat->k;
            int64_t since = now_ms - feat->horizon_ms;
            tly_item_t it;
            size_t got = 0;
            if (ent && !words && feat->agg == TLY_AGG_LAST_K) {
                got = store_log_count(&lg, feat->slot, k, since, now_ms);
            } else if (ent && !words) {
                uint32_t idx[COMPACT_MAX_EVENTS];
                got = store_log_recent(&lg, feat->slot, k, since, now_ms, k, idx);
                if (got &&
                    !store_item_from_rec(store, feat, &lg, idx[0], &it, strbuf, strcap, &sused))
                    full = true;
            } else if (ent) {
                bool found;
                uint32_t off = store_seg_find(src, used, SID_ITEMS(feat->slot), &found);
                if (found)
                    got = store_words_recent(store, src, off, used, k, since, now_ms,
                                             feat->agg == TLY_AGG_LAST ? &it : NULL, k, strbuf,
                                             strcap, &sused, &bad, &full);
            }
            if (feat->agg == TLY_AGG_LAST_K) {
                o->type = TLY_V_INT;
                o->u.i = (int64_t)got;
            } else if (got == 1 && it.nvals > 0 && !full) {
                *o = it.vals[0];
            } else {
                o->type = TLY_V_NIL;
            }
        }
        if (store_read_hook)
            store_read_hook(store_read_hook_ctx);
        bool valid = !ent || settled || read_valid(ent, s0);
        if (valid && bad) {
            /* A consistent copy that does not decode: a malformed record.
             * Answer nil rather than read it again forever. */
            for (size_t r = 0; r < n; r++)
                out[r] = (tly_value_t){.type = TLY_V_NIL};
            err = TLY_E_IO;
            break;
        }
        if (valid) {
            if (full)
                err = TLY_E_FULL;
            if (last_ms)
                *last_ms = last;
            break;
        }
    }
    tly_rcu_read_unlock();
    free(copy);
    return err;
}

tly_err_t tly_store_recent(tly_store_t *store, uint32_t entity, const char *id, size_t idlen,
                           uint32_t feat_id, int64_t since_ms, int64_t asof_ms, tly_item_t *items,
                           size_t cap, size_t *n, char *strbuf, size_t strcap)
{
    const tly_featset_t *fs = store->fs;
    if (feat_id >= fs->nfeats)
        return TLY_E_INVAL;
    const tly_feat_t *feat = &fs->feats[feat_id];
    if (feat->entity != entity || tly_agg_windowed(feat->agg))
        return TLY_E_INVAL;
    static _Thread_local log_t lg;
    tly_err_t err = TLY_OK;
    size_t got = 0;
    int64_t floor_ms = asof_ms - feat->horizon_ms;
    if (since_ms < floor_ms)
        since_ms = floor_ms;

    ent_t *ent = NULL, *copy = NULL;
    tly_rcu_read_lock();
    for (unsigned attempt = 0;; attempt++) {
        uint32_t s0 = 0;
        ent = read_begin(store, ent, entity, id, idlen, &s0);
        if (!ent) {
            got = 0;
            break;
        }
        bool bad = false, full = false, settled = false; /* as in tly_store_read */
        size_t sused = 0;
        uint32_t used = used_of(ent);
        got = 0;
        if (!is_words(ent)) {
            uint32_t idx[COMPACT_MAX_EVENTS];
            store_log_copy(ent, &lg);
            if (!read_valid(ent, s0))
                continue;
            settled = true;
            bad = !store_log_decode(store, &store->etypes[entity], &lg);
            size_t m =
                bad ? 0 : store_log_recent(&lg, feat->slot, feat->k, since_ms, asof_ms, cap, idx);
            for (size_t q = 0; q < m && !full; q++) {
                if (store_item_from_rec(store, feat, &lg, idx[q], &items[got], strbuf, strcap,
                                        &sused))
                    got++;
                else
                    full = true;
            }
        } else {
            const ent_t *src = words_source(ent, used, s0, attempt, &copy, &settled);
            if (src == NULL)
                continue;
            bool found;
            uint32_t off = store_seg_find(src, used, SID_ITEMS(feat->slot), &found);
            if (found)
                got = store_words_recent(store, src, off, used, feat->k, since_ms, asof_ms, items,
                                         cap, strbuf, strcap, &sused, &bad, &full);
        }
        if (store_read_hook)
            store_read_hook(store_read_hook_ctx);
        if (settled || read_valid(ent, s0)) {
            if (bad) { /* malformed (see tly_store_read): no items */
                got = 0;
                err = TLY_E_IO;
            } else if (full) {
                err = TLY_E_FULL;
            }
            break;
        }
    }
    tly_rcu_read_unlock();
    free(copy);
    *n = got;
    return err;
}

/* ---- expiry and counters ------------------------------------------------- */

/* The newest event time of a record; exact under its lock, a hint without. */
static int64_t ent_last(const tly_store_t *store, const ent_t *ent, log_t *lg)
{
    if (is_words(ent))
        return (int64_t)ld(ent, 0);
    int64_t last = INT64_MIN;
    store_log_copy(ent, lg);
    if (store_log_decode(store, &store->etypes[ent->type], lg))
        for (size_t i = 0; i < lg->nrecs; i++)
            last = lg->ts[i] > last ? lg->ts[i] : last;
    return last;
}

/* Which records remove_where() removes: those the sweeper finds expired,
 * or those the caller's predicate dooms. */
typedef struct {
    const tly_store_t *store;
    int64_t earliest[TLY_MAX_ENTITIES]; /* expiry: newest event before this */
    tly_store_doomed_fn doomed;         /* NULL: expiry */
    void *ctx;
} cull_t;

static bool culled(cull_t *cu, const ent_t *ent, log_t *lg)
{
    if (cu->doomed != NULL)
        return cu->doomed(ent->type, ent_id(ent), ent->idlen, cu->ctx);
    return ent_last(cu->store, ent, lg) < cu->earliest[ent->type];
}

#define SWEEP_CHUNK 1024 /* records a budgeted sweep visits per hold of a shard's lock */

/* Appends ent to the candidate list. */
static void cand_push(ent_t ***cand, size_t *cap, size_t *n, ent_t *ent)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 256;
        ent_t **grown = realloc(*cand, *cap * sizeof **cand);
        if (!grown) {
            fprintf(stderr, "tallyd: out of memory in the sweeper\n");
            abort();
        }
        *cand = grown;
    }
    (*cand)[(*n)++] = ent;
}

/* Removes the candidates of shard sh that cu still culls, each under its
 * record lock, taking the shard lock again only to unlink: the lock order
 * is always record, then shard. */
static size_t remove_cands(tly_store_t *store, shard_t *sh, cull_t *cu, ent_t **cand, size_t n,
                           log_t *lg)
{
    tstats_t *ts = store_thread_stats(store);
    size_t removed = 0;
    for (size_t c = 0; c < n; c++) {
        ent_t *ent = cand[c];
        ent_lock(ent);
        while (ent_dead(ent)) {
            /* Replaced since it was collected (a writer regrew it), or
             * removed: the table holds its successor under the same key,
             * or nothing. (Under rcu_read_lock: a dead record's key stays
             * readable.) */
            ent_t *next = tbl_get(sh, hash_id(store->seed, ent->type, ent_id(ent), ent->idlen),
                                  ent->type, ent_id(ent), ent->idlen);
            ent_unlock(ent);
            ent = next;
            if (ent == NULL)
                break;
            ent_lock(ent);
        }
        if (ent == NULL)
            continue;
        if (!culled(cu, ent, lg)) {
            ent_unlock(ent);
            continue;
        }
        pthread_mutex_lock(&sh->mu);
        bool gone = tbl_remove(sh, hash_id(store->seed, ent->type, ent_id(ent), ent->idlen), ent);
        pthread_mutex_unlock(&sh->mu);
        if (!gone) {
            fprintf(stderr, "tallyd: entity table invariant broken in sweep\n");
            abort();
        }
        ent_mark_dead(ent);
        stat_add(&ts->entities, -1);
        stat_add(cu->doomed ? &ts->dropped_entities : &ts->expired, 1);
        ent_unlock(ent);
        ent_retire(store, ent);
        removed++;
    }
    return removed;
}

/*
 * Removes the records cu culls. max_visit 0: one pass over every shard, each
 * shard's candidates collected under its lock in one go, so no record present
 * throughout is missed (tly_store_drop relies on that). max_visit > 0: visits
 * at most that many records, going on from where the last budgeted call
 * stopped and holding a shard's lock for at most SWEEP_CHUNK of them at a
 * time; if a shard's array was rebuilt in between, that shard starts over.
 */
static size_t remove_where(tly_store_t *store, cull_t *cu, size_t max_visit)
{
    size_t removed = 0, visited = 0, cap = 0, ncand = 0;
    ent_t **cand = NULL;
    static _Thread_local log_t lg;
    bool budgeted = max_visit > 0;
    size_t s = budgeted ? store->sweep_shard : 0;

    /* a budgeted call may start inside a shard and come back to that
     * shard's start: one shard more than a full pass */
    size_t npass = TLY_STORE_SHARDS + (budgeted ? 1 : 0);
    tly_rcu_read_lock();
    for (size_t shards = 0; shards < npass && !(budgeted && visited >= max_visit);) {
        shard_t *sh = &store->shards[s];
        size_t pos = 0, limit = SIZE_MAX;
        ent_t *seen = NULL;
        ncand = 0;
        pthread_mutex_lock(&sh->mu);
        const tslots_t *arr = atomic_load_explicit(&sh->arr, memory_order_relaxed);
        if (budgeted) {
            if (store->sweep_arr == arr)
                pos = store->sweep_pos;
            limit = max_visit - visited < SWEEP_CHUNK ? max_visit - visited : SWEEP_CHUNK;
        }
        for (size_t n = 0; n < limit; n++) {
            if ((seen = tbl_next(sh, &pos)) == NULL)
                break;
            visited++;
            tly_tsan_subscribe();
            if (culled(cu, seen, &lg))
                cand_push(&cand, &cap, &ncand, seen);
        }
        pthread_mutex_unlock(&sh->mu);
        removed += remove_cands(store, sh, cu, cand, ncand, &lg);
        bool done = seen == NULL; /* always, without a budget */
        if (budgeted) {
            store->sweep_pos = done ? 0 : pos;
            store->sweep_arr = done ? NULL : arr;
        }
        if (done) {
            s = (s + 1) % TLY_STORE_SHARDS;
            shards++;
        }
    }
    if (budgeted)
        store->sweep_shard = s;
    tly_rcu_read_unlock();
    free(cand);
    retire_flush(store_thread_stats(store));
    return removed;
}

size_t tly_store_sweep(tly_store_t *store, int64_t now_ms, size_t max_visit)
{
    const tly_featset_t *fs = store->fs;
    /* A record whose newest event is before every feature's earliest
     * relevant time can no longer change any answer at now or later. */
    cull_t cu = {.store = store};
    for (size_t e = 0; e < fs->nentities; e++) {
        cu.earliest[e] = INT64_MAX;
        for (size_t i = 0; i < fs->entities[e].nfeats; i++) {
            int64_t t = tly_feat_earliest(&fs->feats[fs->entities[e].feats[i]], now_ms);
            cu.earliest[e] = t < cu.earliest[e] ? t : cu.earliest[e];
        }
    }
    size_t n = remove_where(store, &cu, max_visit);
    if (store->max_bytes > 0)
        refresh_full(store);
    return n;
}

size_t tly_sweep_pace(tly_sweep_pace_t *p, uint64_t entities, int64_t every_ms, int64_t elapsed_ms,
                      int64_t *wait_ms)
{
    /* in records × every_ms, so that integers keep the fractions */
    const uint64_t per = every_ms > 0 ? (uint64_t)every_ms : 1, e = entities;
    /* the step: TLY_SWEEP_STEP, or what steps a minimum wait apart must
     * visit to keep up */
    uint64_t step = (e * TLY_SWEEP_WAIT_MIN_MS + per - 1) / per;
    step = step > TLY_SWEEP_STEP ? step : TLY_SWEEP_STEP;
    uint64_t dt = elapsed_ms <= 0 ? 0 : (uint64_t)elapsed_ms < per ? (uint64_t)elapsed_ms : per;
    p->owed += e * dt;
    /* never more than a pass behind */
    uint64_t pass = (e > step ? e : step) * per;
    p->owed = p->owed < pass ? p->owed : pass;
    uint64_t visit = (p->owed + per - 1) / per;
    visit = visit < step ? visit : step;
    p->owed = p->owed > visit * per ? p->owed - visit * per : 0;
    visit = visit > TLY_SWEEP_FLOOR ? visit : TLY_SWEEP_FLOOR;
    /* until a whole step is owed again */
    uint64_t wait = e == 0                  ? TLY_SWEEP_WAIT_MAX_MS
                    : p->owed >= step * per ? 0
                                            : (step * per - p->owed + e - 1) / e;
    wait = wait < TLY_SWEEP_WAIT_MAX_MS ? wait : TLY_SWEEP_WAIT_MAX_MS;
    *wait_ms = wait > TLY_SWEEP_WAIT_MIN_MS ? (int64_t)wait : TLY_SWEEP_WAIT_MIN_MS;
    return (size_t)visit;
}

size_t tly_store_drop(tly_store_t *store, tly_store_doomed_fn doomed, void *ctx)
{
    cull_t cu = {.store = store, .doomed = doomed, .ctx = ctx};
    return remove_where(store, &cu, 0);
}

/* ---- snapshots ------------------------------------------------------------ */

/* Block payloads of tly_store_dump: a run of items, each
 *   layout  [u8 3][u16 type][u16 len][type name][u32 nslots][nslots × u64 feature hash]
 *           [u8 nvf][nvf × ([u16 len][field name])]
 *   intern  [u8 1][u32 slot][u32 len][bytes]
 *   entity  [u8 2][u16 type][u8 idlen][u8 mode][u32 used][u32 nwords][id][nwords × u64]
 * little-endian, unaligned. Layout items (only with feature hashes) come
 * first, one per entity type of the writer. */
#define SNAP_ITEM_INTERN 1
#define SNAP_ITEM_ENTITY 2
#define SNAP_ITEM_LAYOUT 3
#define SNAP_BLOCK_BYTES (1u << 20)

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    tly_store_emit_fn emit;
    void *ctx;
    bool failed;
} dumper_t;

static void dump_put(dumper_t *d, const void *p, size_t n)
{
    if (d->len + n > d->cap) {
        size_t cap = d->cap ? d->cap : SNAP_BLOCK_BYTES;
        while (cap < d->len + n)
            cap *= 2;
        uint8_t *b = realloc(d->buf, cap);
        if (b == NULL) {
            d->failed = true;
            return;
        }
        d->buf = b;
        d->cap = cap;
    }
    memcpy(d->buf + d->len, p, n);
    d->len += n;
}

static void dump_flush(dumper_t *d, bool force)
{
    if (d->failed || d->len == 0 || (!force && d->len < SNAP_BLOCK_BYTES))
        return;
    if (!d->emit(d->ctx, d->buf, d->len))
        d->failed = true;
    d->len = 0;
}

static void put_u16(dumper_t *d, uint32_t v)
{
    uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    dump_put(d, b, 2);
}

static void put_u32(dumper_t *d, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    dump_put(d, b, 4);
}

static void put_name(dumper_t *d, const char *s)
{
    size_t n = strlen(s);
    n = n > UINT16_MAX ? UINT16_MAX : n;
    put_u16(d, (uint32_t)n);
    dump_put(d, s, n);
}

/* One layout item per entity type: what a store with other definitions
 * needs to find the features it shares with this one in our records. */
static void dump_layouts(dumper_t *d, const tly_store_t *store, const uint64_t *feat_hash)
{
    const tly_featset_t *fs = store->fs;
    for (uint32_t e = 0; e < fs->nentities && !d->failed; e++) {
        const tly_entity_t *et = &fs->entities[e];
        const etype_t *lt = &store->etypes[e];
        uint8_t kind = SNAP_ITEM_LAYOUT, nvf = (uint8_t)lt->nvf;
        dump_put(d, &kind, 1);
        put_u16(d, e);
        put_name(d, et->name);
        put_u32(d, (uint32_t)et->nfeats);
        for (size_t i = 0; i < et->nfeats; i++) {
            uint64_t h = feat_hash[et->feats[i]];
            put_u32(d, (uint32_t)h);
            put_u32(d, (uint32_t)(h >> 32));
        }
        dump_put(d, &nvf, 1);
        for (uint32_t j = 0; j < lt->nvf; j++)
            put_name(d, fs->fields[lt->vf[j]]);
    }
}

tly_err_t tly_store_dump(tly_store_t *store, const uint64_t *feat_hash, tly_store_emit_fn emit,
                         void *ctx)
{
    dumper_t d = {.emit = emit, .ctx = ctx};
    if (feat_hash != NULL)
        dump_layouts(&d, store, feat_hash);
    for (uint32_t i = 0; i < INTERN_SLOTS && !d.failed; i++) {
        const istr_t *is = atomic_load_explicit(&store->intern[i], memory_order_acquire);
        if (is == NULL)
            continue;
        uint8_t kind = SNAP_ITEM_INTERN;
        dump_put(&d, &kind, 1);
        put_u32(&d, i);
        put_u32(&d, is->len);
        dump_put(&d, is->s, is->len);
        dump_flush(&d, false);
    }
    for (size_t s = 0; s < TLY_STORE_SHARDS && !d.failed; s++) {
        size_t pos = 0;
        const ent_t *e;
        while (!d.failed && (e = tbl_next(&store->shards[s], &pos)) != NULL) {
            if (atomic_load_explicit(&e->seq, memory_order_acquire) & SEQ_DEAD)
                continue;
            uint32_t used = used_of(e);
            uint32_t nwords = (e->mode & F_WORDS) ? used : (used + 7) / 8;
            uint8_t head[4] = {SNAP_ITEM_ENTITY, (uint8_t)e->type, (uint8_t)(e->type >> 8),
                               e->idlen};
            dump_put(&d, head, 4);
            dump_put(&d, &e->mode, 1);
            put_u32(&d, used);
            put_u32(&d, nwords);
            dump_put(&d, ent_id(e), e->idlen);
            for (uint32_t w = 0; w < nwords; w++) {
                uint64_t v = ld(e, w);
                put_u32(&d, (uint32_t)v);
                put_u32(&d, (uint32_t)(v >> 32));
            }
            dump_flush(&d, false);
        }
    }
    dump_flush(&d, true);
    free(d.buf);
    return d.failed ? TLY_E_IO : TLY_OK;
}

static bool get_bytes(const uint8_t *p, size_t n, size_t *at, void *out, size_t k)
{
    if (n - *at < k)
        return false;
    memcpy(out, p + *at, k);
    *at += k;
    return true;
}

static bool get_u16(const uint8_t *p, size_t n, size_t *at, uint32_t *v)
{
    uint8_t b[2];
    if (!get_bytes(p, n, at, b, 2))
        return false;
    *v = (uint32_t)b[0] | (uint32_t)b[1] << 8;
    return true;
}

static bool get_u32(const uint8_t *p, size_t n, size_t *at, uint32_t *v)
{
    uint8_t b[4];
    if (!get_bytes(p, n, at, b, 4))
        return false;
    *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return true;
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* True when a loaded record's state is well formed: a compact log that
 * decodes, or word segments in ascending order that end exactly at used. */
static bool snap_state_ok(const tly_store_t *store, const ent_t *e)
{
    if (!(e->mode & F_WORDS)) {
        static _Thread_local log_t lg;
        store_log_copy(e, &lg);
        return store_log_decode(store, &store->etypes[e->type], &lg);
    }
    return store_words_valid(store, e);
}

static tly_err_t snap_fail(char *err, size_t errlen, const char *what, size_t at)
{
    if (err != NULL && errlen > 0)
        snprintf(err, errlen, "%s at byte %zu of a state block", what, at);
    return TLY_E_INVAL;
}

/* Reads a layout item (its kind byte already taken). Without feature hashes
 * it is only stepped over. */
static tly_err_t load_layout(tly_store_t *store, const uint8_t *p, size_t n, size_t *at,
                             const uint64_t *feat_hash, char *err, size_t errlen, size_t item)
{
    const tly_featset_t *fs = store->fs;
    uint32_t wtype, nl, nslots, len;
    uint8_t nvf;
    if (!get_u16(p, n, at, &wtype) || !get_u16(p, n, at, &nl) || n - *at < nl)
        return snap_fail(err, errlen, "malformed layout", item);
    const char *name = (const char *)p + *at;
    *at += nl;
    if (!get_u32(p, n, at, &nslots) || nslots > TLY_MAX_FEATURES || (n - *at) / 8 < nslots)
        return snap_fail(err, errlen, "malformed layout", item);
    const uint8_t *hashes = p + *at;
    *at += 8 * (size_t)nslots;
    if (!get_bytes(p, n, at, &nvf, 1) || nvf > TLY_MAX_ITEM_VALUES)
        return snap_fail(err, errlen, "malformed layout", item);
    int field[TLY_MAX_ITEM_VALUES];
    for (uint32_t j = 0; j < nvf; j++) {
        if (!get_u16(p, n, at, &len) || n - *at < len)
            return snap_fail(err, errlen, "malformed layout", item);
        field[j] = tly_featset_field(fs, (const char *)p + *at, len);
        *at += len;
    }
    if (feat_hash == NULL)
        return TLY_OK;
    if (wtype >= TLY_MAX_ENTITIES)
        return snap_fail(err, errlen, "malformed layout", item);
    if (store->lmap == NULL) {
        store->lmap = store_xmalloc(sizeof *store->lmap * TLY_MAX_ENTITIES);
        memset(store->lmap, 0, sizeof *store->lmap * TLY_MAX_ENTITIES);
    }
    lmap_t *m = &store->lmap[wtype];
    if (m->seen)
        return snap_fail(err, errlen, "layout given twice", item);
    m->seen = true;
    m->nslots = nslots;
    m->nvf = nvf;
    memcpy(m->field, field, sizeof field);
    m->slot_feat = store_xmalloc(sizeof *m->slot_feat * (nslots ? nslots : 1));
    m->type = tly_featset_entity(fs, name, nl);
    const tly_entity_t *et = m->type >= 0 ? &fs->entities[m->type] : NULL;
    m->same = et != NULL && nslots == et->nfeats && nvf == store->etypes[m->type].nvf;
    for (uint32_t s = 0; s < nslots; s++) {
        uint64_t h = le64(hashes + 8 * (size_t)s);
        m->slot_feat[s] = -1;
        for (size_t i = 0; et != NULL && i < et->nfeats && m->slot_feat[s] < 0; i++)
            if (feat_hash[et->feats[i]] == h)
                m->slot_feat[s] = (int32_t)et->feats[i];
        if (m->slot_feat[s] >= 0) {
            for (uint32_t q = 0; q < s; q++)
                if (m->slot_feat[q] == m->slot_feat[s])
                    return snap_fail(err, errlen, "feature hash given twice in a layout", item);
            store->restored[m->slot_feat[s]] = 1;
        }
        m->same = m->same && m->slot_feat[s] == (int32_t)et->feats[s];
    }
    for (uint32_t j = 0; m->same && j < nvf; j++)
        m->same = field[j] == (int)store->etypes[m->type].vf[j];
    return TLY_OK;
}

/* Links a loaded record (locked, state checked) into the table. */
static tly_err_t load_insert(tly_store_t *store, ent_t *e, char *err, size_t errlen, size_t item)
{
    tstats_t *ts = store_thread_stats(store);
    ent_unlock(e);
    unsigned long h = hash_id(store->seed, e->type, ent_id(e), e->idlen);
    shard_t *sh = shard_of(store, h);
    tly_tsan_publish();
    pthread_mutex_lock(&sh->mu);
    bool added = tbl_insert(sh, h, e);
    pthread_mutex_unlock(&sh->mu);
    if (!added) {
        stat_add(&ts->bytes, -(int64_t)malloc_usable_size(e));
        free(e);
        return snap_fail(err, errlen, "entity given twice", item);
    }
    stat_add(&ts->entities, 1);
    return TLY_OK;
}

/* A segment of a record being remapped: its new id, where it was. */
typedef struct {
    uint32_t sid, off, len;
} seg_t;

static int seg_cmp(const void *a, const void *b)
{
    const seg_t *x = a, *y = b;
    return (x->sid > y->sid) - (x->sid < y->sid);
}

/* A word-encoded record of another layout: the segments of restored
 * features, renumbered to our slots and put back in order. Word 0, the
 * entity's newest event time, is kept: it may come from an event that fed
 * only a feature no longer defined (a compact record's is recomputed from
 * the events it keeps). */
static tly_err_t load_words_remap(tly_store_t *store, const lmap_t *m, const char *id, size_t idlen,
                                  const uint64_t *w, uint32_t used, char *err, size_t errlen,
                                  size_t item)
{
    const tly_featset_t *fs = store->fs;
    seg_t *segs = store_xmalloc(sizeof *segs * used);
    size_t nsegs = 0;
    uint32_t total = 1;
    uint64_t off = 1;
    int64_t prev = -1;
    tly_err_t rc = TLY_OK;
    while (off < used) {
        uint32_t sid = (uint32_t)(w[off] & 0xffffu);
        uint64_t len = (w[off] >> 16) & 0xffffffffu;
        bool items = sid >= SID_ITEMS(0);
        uint32_t slot = items ? sid - SID_ITEMS(0) : sid / TLY_MAX_WINDOWS;
        if ((int64_t)sid <= prev || len > used - off - 1 || slot >= m->nslots) {
            rc = snap_fail(err, errlen, "malformed entity state", item);
            goto out;
        }
        prev = sid;
        int32_t f = m->slot_feat[slot];
        if (f >= 0) {
            const tly_feat_t *feat = &fs->feats[f];
            if (items == tly_agg_windowed(feat->agg) ||
                (!items && sid % TLY_MAX_WINDOWS >= feat->nwindows)) {
                rc = snap_fail(err, errlen, "malformed entity state", item);
                goto out;
            }
            segs[nsegs++] = (seg_t){items ? SID_ITEMS(feat->slot)
                                          : SID_WINDOW(feat->slot, sid % TLY_MAX_WINDOWS),
                                    (uint32_t)off, (uint32_t)len};
            total += 1 + (uint32_t)len;
        }
        off += 1 + len;
    }
    if (nsegs == 0)
        goto out; /* nothing of it is restored */
    qsort(segs, nsegs, sizeof *segs, seg_cmp);
    ent_t *e = ent_alloc(store, (uint32_t)m->type, id, idlen, F_WORDS, total);
    st(e, 0, w[0]);
    uint32_t at = 1;
    for (size_t i = 0; i < nsegs; i++) {
        st(e, at++, (uint64_t)segs[i].len << 16 | segs[i].sid);
        for (uint32_t k = 0; k < segs[i].len; k++)
            st(e, at++, w[segs[i].off + 1 + k]);
    }
    atomic_store_explicit(&e->used, at, memory_order_relaxed);
    if (!store_words_valid(store, e)) {
        stat_add(&store_thread_stats(store)->bytes, -(int64_t)malloc_usable_size(e));
        free(e);
        rc = snap_fail(err, errlen, "malformed entity state", item);
        goto out;
    }
    rc = load_insert(store, e, err, errlen, item);
out:
    free(segs);
    return rc;
}

/* A compact record of another layout: its events replayed into the
 * restored features only, as the writer's features took them. */
static tly_err_t load_log_remap(tly_store_t *store, const lmap_t *m, const char *id, size_t idlen,
                                const uint64_t *w, uint32_t used, char *err, size_t errlen,
                                size_t item)
{
    static _Thread_local log_t lg;
    static _Thread_local tly_event_t ev;
    const tly_featset_t *fs = store->fs;
    const tly_entity_t *etype = &fs->entities[m->type];
    etype_t wt = {.nvf = m->nvf};
    for (uint32_t i = 0; i < used; i++)
        lg.bytes[i] = (uint8_t)(w[i / 8] >> (8 * (i % 8)));
    lg.nbytes = used;
    if (m->nslots > COMPACT_MAX_SLOTS || !store_log_decode(store, &wt, &lg))
        return snap_fail(err, errlen, "malformed entity state", item);
    uint32_t feats[COMPACT_MAX_SLOTS];
    int64_t now = INT64_MAX;
    bool any = false;
    for (size_t r = 0; r < lg.nrecs; r++) {
        if (lg.masks[r] >> m->nslots)
            return snap_fail(err, errlen, "malformed entity state", item);
        for (uint32_t s = 0; s < m->nslots && s < 64; s++)
            if ((lg.masks[r] >> s & 1) && m->slot_feat[s] >= 0) {
                any = true;
                now = lg.ts[r] < now ? lg.ts[r] : now;
            }
    }
    if (!any)
        return TLY_OK; /* nothing of it is restored */
    if (ent_find(store, (uint32_t)m->type, id, idlen) != NULL)
        return snap_fail(err, errlen, "entity given twice", item);
    /* The earliest event time as `now`: nothing is pruned that a later
     * `now` keeps. */
    tly_rcu_read_lock();
    size_t nfirst;
    ent_t *e =
        ent_get_locked(store, (uint32_t)m->type, id, idlen,
                       hash_id(store->seed, (uint32_t)m->type, id, idlen), NULL, 0, NULL, &nfirst);
    for (size_t r = 0; r < lg.nrecs; r++) {
        const rec_t *rec = &lg.recs[r];
        uint64_t mask = 0;
        uint32_t nf = 0;
        for (uint32_t s = 0; s < m->nslots && s < 64; s++)
            if ((lg.masks[r] >> s & 1) && m->slot_feat[s] >= 0) {
                const tly_feat_t *feat = &fs->feats[m->slot_feat[s]];
                feats[nf++] = feat->id;
                if (feat->slot < 64)
                    mask |= UINT64_C(1) << feat->slot;
            }
        if (nf == 0)
            continue;
        memset(ev.vals, 0, sizeof ev.vals[0] * fs->nfields);
        ev.nfields = (uint32_t)fs->nfields;
        ev.time_ms = lg.ts[r];
        ev.skip_entities = 0;
        ev.replayed = false;
        for (uint32_t j = 0; j < m->nvf; j++)
            if (m->field[j] >= 0)
                ev.vals[m->field[j]] = rec->vals[j];
        if (is_words(e))
            store_words_apply(store, &e, etype, mask, feats, nf, &ev, now);
        else
            store_compact_apply(store, &e, etype, mask, feats, nf, &ev, now);
    }
    ent_unlock(e);
    tly_rcu_read_unlock();
    return TLY_OK;
}

tly_err_t tly_store_load(tly_store_t *store, const void *data, size_t n, const uint64_t *feat_hash,
                         char *err, size_t errlen)
{
    const uint8_t *p = data;
    const tly_featset_t *fs = store->fs;
    size_t at = 0;
    tstats_t *ts = store_thread_stats(store);
    if (feat_hash == NULL)
        memset(store->restored, 1, fs->nfeats);
    while (at < n) {
        size_t item = at;
        uint8_t kind = p[at++];
        if (kind == SNAP_ITEM_LAYOUT) {
            tly_err_t rc = load_layout(store, p, n, &at, feat_hash, err, errlen, item);
            if (rc != TLY_OK)
                return rc;
            continue;
        }
        if (kind == SNAP_ITEM_INTERN) {
            uint32_t slot, len;
            if (!get_u32(p, n, &at, &slot) || !get_u32(p, n, &at, &len) || slot >= INTERN_SLOTS ||
                len > INTERN_MAXLEN || n - at < len)
                return snap_fail(err, errlen, "malformed intern string", item);
            istr_t *is = store_xmalloc(sizeof *is + len);
            is->len = len;
            memcpy(is->s, p + at, len);
            at += len;
            istr_t *none = NULL;
            if (!atomic_compare_exchange_strong(&store->intern[slot], &none, is)) {
                free(is);
                return snap_fail(err, errlen, "intern slot given twice", item);
            }
            atomic_fetch_add_explicit(&store->ninterned, 1, memory_order_relaxed);
            stat_add(&ts->bytes, (int64_t)malloc_usable_size(is));
            stat_add(&ts->interned_bytes, (int64_t)malloc_usable_size(is));
            continue;
        }
        uint8_t head[4];
        uint32_t used, nwords;
        if (kind != SNAP_ITEM_ENTITY || !get_bytes(p, n, &at, head, 4) ||
            !get_u32(p, n, &at, &used) || !get_u32(p, n, &at, &nwords))
            return snap_fail(err, errlen, "malformed entity", item);
        uint32_t type = head[0] | (uint32_t)head[1] << 8;
        uint8_t idlen = head[2], mode = head[3];
        bool words = mode == F_WORDS;
        if ((mode != 0 && !words) ||
            (words ? used < 1 || used != nwords
                   : used > COMPACT_MAX_BYTES || nwords != (used + 7) / 8) ||
            nwords > (n - at) / 8 || n - at < idlen + 8 * (size_t)nwords)
            return snap_fail(err, errlen, "malformed entity", item);
        const lmap_t *m = NULL;
        if (feat_hash != NULL) {
            if (store->lmap == NULL)
                return snap_fail(err, errlen,
                                 "no feature layouts (written by an older tallyd: it restores "
                                 "only under the definitions it was written for)",
                                 item);
            if (type >= TLY_MAX_ENTITIES || !store->lmap[type].seen)
                return snap_fail(err, errlen, "entity before its type's layout", item);
            m = &store->lmap[type];
            if (m->type < 0) { /* a type we no longer have: step over it */
                at += idlen + 8 * (size_t)nwords;
                continue;
            }
            type = (uint32_t)m->type;
        }
        if (type >= fs->nentities ||
            (!words && (m == NULL || m->same) && !store->etypes[type].compact))
            return snap_fail(err, errlen, "malformed entity", item);
        const char *id = (const char *)p + at;
        at += idlen;
        if (m != NULL && !m->same) {
            uint64_t *w = store_xmalloc(8 * (size_t)(nwords ? nwords : 1));
            for (uint32_t i = 0; i < nwords; i++)
                w[i] = le64(p + at + 8 * (size_t)i);
            at += 8 * (size_t)nwords;
            tly_err_t rc = words ? load_words_remap(store, m, id, idlen, w, used, err, errlen, item)
                                 : load_log_remap(store, m, id, idlen, w, used, err, errlen, item);
            free(w);
            if (rc != TLY_OK)
                return rc;
            continue;
        }
        ent_t *e = ent_alloc(store, type, id, idlen, mode, nwords ? nwords : 1);
        for (uint32_t w = 0; w < nwords; w++) {
            st(e, w, le64(p + at));
            at += 8;
        }
        atomic_store_explicit(&e->used, used, memory_order_relaxed);
        if (!snap_state_ok(store, e)) {
            stat_add(&ts->bytes, -(int64_t)malloc_usable_size(e));
            free(e);
            return snap_fail(err, errlen, "malformed entity state", item);
        }
        tly_err_t rc = load_insert(store, e, err, errlen, item);
        if (rc != TLY_OK)
            return rc;
    }
    return TLY_OK;
}

bool tly_store_restored(const tly_store_t *store, uint32_t feat)
{
    return feat < store->fs->nfeats && store->restored[feat] != 0;
}

void tly_store_allocator(char *buf, size_t cap)
{
#ifdef TLY_MIMALLOC
    /* linked is not enough: a libc found first would still serve malloc */
    void *p = calloc(1, 1); /* calloc: the check reads no unset byte */
    bool mi = p != NULL && mi_is_in_heap_region(p);
    free(p);
    if (mi) {
        int v = mi_version();
        snprintf(buf, cap, "mimalloc-%d.%d.%d", v / 100, v / 10 % 10, v % 10);
        return;
    }
#endif
    snprintf(buf, cap, "libc");
}

void tly_store_stats(const tly_store_t *store, tly_store_stats_t *out)
{
    memset(out, 0, sizeof *out);
    int64_t ents = 0, bytes = 0;
    for (size_t i = 0; i < TLY_STORE_SHARDS; i++)
        out->table_bytes +=
            (uint64_t)atomic_load_explicit(&store->shards[i].bytes, memory_order_relaxed);
    bytes += (int64_t)out->table_bytes;
    for (tstats_t *s = atomic_load_explicit(&store->stats, memory_order_acquire); s; s = s->next) {
        ents += atomic_load_explicit(&s->entities, memory_order_relaxed);
        bytes += atomic_load_explicit(&s->bytes, memory_order_relaxed);
        out->events_applied += (uint64_t)atomic_load_explicit(&s->applied, memory_order_relaxed);
        out->updates += (uint64_t)atomic_load_explicit(&s->updates, memory_order_relaxed);
        out->expired += (uint64_t)atomic_load_explicit(&s->expired, memory_order_relaxed);
        out->dropped_entities +=
            (uint64_t)atomic_load_explicit(&s->dropped_entities, memory_order_relaxed);
        out->interned_bytes +=
            (uint64_t)atomic_load_explicit(&s->interned_bytes, memory_order_relaxed);
        for (int i = 0; i < TLY_E__COUNT; i++)
            out->dropped[i] += atomic_load_explicit(&s->dropped[i], memory_order_relaxed);
    }
    out->interned = atomic_load_explicit(&store->ninterned, memory_order_relaxed);
    out->entities = ents > 0 ? (uint64_t)ents : 0;
    out->bytes = bytes > 0 ? (uint64_t)bytes : 0;
}
