/*
 * store.h — the concurrent entity table and per-feature aggregate state.
 *
 * Entities (one record per entity type × id) live in a sharded hash table
 * that readers probe without locks (open-addressed, one writer at a time per
 * shard, memory freed through RCU). Each record holds the state of every
 * feature of its entity type in one allocation: a small entity keeps the
 * byte-packed log of its events (about 100 bytes for a user with a few
 * events); a larger one keeps per-window buckets that grow with the buckets
 * actually used.
 *
 * Threads: tly_store_apply() may run on many writer threads at once;
 * tly_store_read() and tly_store_recent() on many reader threads at once.
 * Every such thread must be registered with RCU (rcu.h). Writers of one
 * entity serialise on that entity's sequence lock; readers never take a
 * lock: they retry if a writer changed the entity while they read it, so a
 * reply for one entity reflects a prefix of its events. The sweeper
 * (tly_store_sweep) may run on any registered thread.
 *
 * Retention: bucket state older than a window's range at the writer's `now`
 * is dropped on write, so reads are exact for any `now` at or after the
 * latest `now` passed to apply (reads at an earlier ASOF may miss expired
 * buckets).
 */
#ifndef TALLYD_STORE_H
#define TALLYD_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/error.h"
#include "tallyd/feature.h"
#include "tallyd/value.h"

typedef struct tly_store tly_store_t;

/* One value request: a feature and one of its windows (ignored for
 * last/last_k, which read the newest item). */
typedef struct {
    uint32_t feat;
    uint32_t window;
} tly_featwin_t;

/* One last/last_k item. Strings point into the caller's string buffer. */
typedef struct {
    int64_t time_ms;
    uint32_t nvals;
    tly_value_t vals[TLY_MAX_ITEM_VALUES];
} tly_item_t;

typedef struct {
    uint64_t entities;              /* live records, all types */
    uint64_t bytes;                 /* heap bytes held by records, interned
                                       strings (malloc_usable_size) and the
                                       table's slot arrays */
    uint64_t table_bytes;           /* the slot arrays (part of `bytes`; an
                                       empty store holds 64 small ones) */
    uint64_t interned;              /* short strings in the intern table */
    uint64_t interned_bytes;        /* their bytes (part of `bytes`; kept until
                                       the store is freed) */
    uint64_t events_applied;        /* events that updated at least one feature */
    uint64_t updates;               /* feature updates */
    uint64_t expired;               /* records removed by the sweeper */
    uint64_t dropped_entities;      /* records removed by tly_store_drop */
    uint64_t dropped[TLY_E__COUNT]; /* feature updates dropped, by reason */
} tly_store_stats_t;

/* Returns a new, empty store for fs (borrowed; must outlive the store).
 * Aborts with a message on allocation failure. Any thread. */
tly_store_t *tly_store_new(const tly_featset_t *fs);

/* Frees the store and every record. No other thread may use it any more;
 * the caller must be an RCU-registered thread. NULL is allowed. */
void tly_store_free(tly_store_t *store);

/*
 * Applies one decoded event at wall time now_ms: every feature whose filter
 * matches gets the event in its entity's state. Per feature, an event older
 * than the feature's horizon (EV_LATE) or later than now + max_future_skew
 * (EV_FUTURE) is dropped and counted; a missing or malformed key is counted
 * per entity type. Returns TLY_OK when the event updated at least one
 * feature or matched none; otherwise the first reason it was dropped.
 * `partition` and `offset` record provenance (partition < 0: unknown).
 * Writer threads; RCU-registered.
 */
tly_err_t tly_store_apply(tly_store_t *store, const tly_event_t *ev, int32_t partition,
                          int64_t offset, int64_t now_ms);

/* What a prefetch hint found out, for its second step and the apply. */
#define TLY_PREFETCH_MAX 4 /* entity types hinted per event */
typedef struct {
    uint32_t n;
    /* the entities this applier applies, by store shard (bit s: shard s,
     * tly_store_shares), and whether it counts the event and gives its
     * verdict (tly_store_prefetch_share's; every shard, counting,
     * otherwise) */
    uint64_t owned;
    bool counts;
    unsigned long h[TLY_PREFETCH_MAX];
    /* tly_store_prefetch only: the entity type and rendered id behind each
     * hash, which tly_store_apply_hinted takes instead of rendering again */
    bool ids;
    /* with ids, when the featset tests `where` conditions by masks: the
     * conditions the event meets (tly_featset_match), so that the apply,
     * maybe on another thread, need not read the event's strings again */
    bool matched;
    uint64_t held;
    uint32_t entity[TLY_PREFETCH_MAX];
    uint8_t idlen[TLY_PREFETCH_MAX];
    char id[TLY_PREFETCH_MAX][UINT8_MAX];
} tly_prefetch_t;

/*
 * Hints that ev will be applied soon; changes nothing. This first step
 * starts loading the table slots of the event's entities (the first
 * TLY_PREFETCH_MAX types it feeds) into the cache and fills *pf;
 * tly_store_prefetch_records(pf), an apply or so later when the slots have
 * arrived, starts loading the records they name. A writer that decodes a
 * few events ahead and hints them overlaps those cache misses with the
 * apply of the events before (the table and the records are far larger than
 * the cache). These three hint functions run inside the caller's RCU
 * read-side section (tly_rcu_read_lock): a writer or a query takes one
 * around many hints.
 */
void tly_store_prefetch(tly_store_t *store, const tly_event_t *ev, tly_prefetch_t *pf);

/*
 * Appliers that all see the same events share the entities by the store
 * shard their id hashes to (the hash's top six bits): an applier owns a set
 * of shards, as a mask (bit s: shard s). tly_store_shares gives share
 * `share` of `nshares` (the shards s with s % nshares == share);
 * TLY_STORE_ALL_SHARDS is one applier's. Owned sets of the appliers of one
 * batch must be disjoint and cover every shard.
 */
#define TLY_STORE_ALL_SHARDS UINT64_MAX
uint64_t tly_store_shares(uint32_t share, uint32_t nshares);

/*
 * tly_store_prefetch for an applier that owns the shards `owned`:
 * tly_store_apply_hinted then applies only the entities of those shards,
 * and so every entity's events are applied by one applier, in the order
 * given. Each applier decides alike whether the event is rejected; exactly
 * one, `counts`, counts the event (applied, dropped) and only its verdict
 * need be kept. Hints only its own entities.
 */
void tly_store_prefetch_share(tly_store_t *store, const tly_event_t *ev, uint64_t owned,
                              bool counts, tly_prefetch_t *pf);

/*
 * tly_store_prefetch_share in two halves, for appliers that share one
 * decode of each event: tly_store_hint, the same for every share, renders
 * and hashes ev's entity ids into *pf (as one applier's) and loads nothing;
 * tly_store_prefetch_slots then makes *pf (or a copy) the hint of an
 * applier owning `owned` (`counts` as above), starts loading the table
 * slots of its entities that fall to it and returns how many do. tly_store_hint reads the featset
 * and the store's hash seed, not the table: any thread, no RCU section needed;
 * tly_store_prefetch_slots runs inside the caller's RCU read-side section
 * like the others.
 */
void tly_store_hint(const tly_store_t *store, const tly_event_t *ev, tly_prefetch_t *pf);
uint32_t tly_store_prefetch_slots(tly_store_t *store, tly_prefetch_t *pf, uint64_t owned,
                                  bool counts);

/* The first step for one entity that a read will ask for soon (MFEATURES
 * hints the ids after the one it reads). */
void tly_store_prefetch_id(tly_store_t *store, uint32_t entity, const char *id, size_t idlen,
                           tly_prefetch_t *pf);

/* The second step: the records of what *pf names. */
void tly_store_prefetch_records(tly_store_t *store, const tly_prefetch_t *pf);

/* A third step for reads, once the records' first lines have arrived: the
 * rest of each record (its length is in its first line), up to
 * TLY_PREFETCH_READ_LINES cache lines. A read of every feature walks most
 * of a record; an apply touches a few of its segments and needs only the
 * second step. */
#define TLY_PREFETCH_READ_LINES 64
void tly_store_prefetch_rest(tly_store_t *store, const tly_prefetch_t *pf);

/* tly_store_apply of the event that tly_store_prefetch filled *pf for,
 * unchanged since: the same result, without rendering and hashing the ids
 * again (for tly_store_prefetch_share: of pf's share of its entities). */
tly_err_t tly_store_apply_hinted(tly_store_t *store, const tly_event_t *ev,
                                 const tly_prefetch_t *pf, int32_t partition, int64_t offset,
                                 int64_t now_ms);

/*
 * Reads n windowed values of one entity at now_ms (the clock, or an ASOF)
 * into out[0..n). Windowed features give their aggregation result; last
 * gives the first value of the newest item at or before now_ms (nil when
 * none) and last_k its item count (the k newest at or before now_ms within
 * the feature's horizon, as tly_store_recent). Items accepted ahead of the
 * clock (within max_future_skew) count once now_ms reaches them: the
 * writers keep them on top of the k, up to max(k, 64) per list. A now_ms
 * before the now of an apply it follows may find fewer items in a
 * word-encoded record (the writer trimmed the list to the k newest at
 * its now) than a compact one holds. An unknown id gives the empty answers
 * (0 / nil). *last_ms (may be NULL) receives the entity's
 * latest event time, or -1 when the id is unknown. Strings returned by
 * `last` are copied into strbuf (strcap bytes); TLY_E_FULL if it is too
 * small. A record that does not decode (never written by this store) gives
 * nil for every value and TLY_E_IO. Reader threads; RCU-registered; never
 * blocks on writers.
 */
tly_err_t tly_store_read(tly_store_t *store, uint32_t entity, const char *id, size_t idlen,
                         const tly_featwin_t *req, size_t n, int64_t now_ms, tly_value_t *out,
                         int64_t *last_ms, char *strbuf, size_t strcap);

/*
 * Reads the newest items (newest first) of last/last_k feature `feat` for
 * one entity: of the k newest at or before asof_ms (the clock, or an ASOF;
 * see tly_store_read), at most cap with since_ms <= time. Items older than the feature's horizon
 * (store.idle_ttl) at asof_ms are not returned: the sweeper may have expired them. Strings are
 * copied into strbuf (strcap bytes). Writes *n. Returns TLY_OK, TLY_E_INVAL (feat is not
 * last/last_k of that entity), TLY_E_FULL (strbuf too small) or TLY_E_IO (a record that does not
 * decode: no items). Reader threads; RCU-registered.
 */
tly_err_t tly_store_recent(tly_store_t *store, uint32_t entity, const char *id, size_t idlen,
                           uint32_t feat, int64_t since_ms, int64_t asof_ms, tly_item_t *items,
                           size_t cap, size_t *n, char *strbuf, size_t strcap);

/*
 * Expires records whose newest event is older than their entity's horizon at
 * now_ms (the longest window, or store.idle_ttl when it keeps last/last_k).
 * max_visit 0: one pass over every record. max_visit > 0: visits at most
 * that many, going on from where the previous such call stopped (wrapping
 * around), and holds a shard's lock for at most 1,024 of them at a time, so
 * that a large store is swept in steps without holding up its writers; a
 * record may be missed by one pass when its shard's table is rebuilt
 * meanwhile (the next pass finds it). Returns the number removed; their
 * memory is freed after an RCU grace period. Any registered thread; one
 * sweeper at a time.
 */
size_t tly_store_sweep(tly_store_t *store, int64_t now_ms, size_t max_visit);

/*
 * Paces the sweeper: one pass over every record per `every_ms`
 * (store.sweep_every) in steps spread evenly over the period, each as small
 * as that allows — TLY_SWEEP_STEP records, more only when steps
 * TLY_SWEEP_WAIT_MIN_MS apart would not finish a pass in time — because a
 * step holds its CPU: where the query loop shares a CPU with the sweeper, a
 * step of 2,500 compact records (about 1.3 ms) every 250 ms put that long a
 * wait into one query in a hundred. Called after each wait with the
 * milliseconds since the previous call and the records held; returns how
 * many to visit now (at least TLY_SWEEP_FLOOR, so a small store is swept
 * whole at every step) and sets *wait_ms, the time until the next call
 * (TLY_SWEEP_WAIT_MIN_MS..TLY_SWEEP_WAIT_MAX_MS). Pure arithmetic on *p.
 */
#define TLY_SWEEP_STEP        256
#define TLY_SWEEP_FLOOR       64
#define TLY_SWEEP_WAIT_MIN_MS 1
#define TLY_SWEEP_WAIT_MAX_MS 250
typedef struct {
    uint64_t owed; /* records owed to the pass so far, times every_ms */
} tly_sweep_pace_t;
size_t tly_sweep_pace(tly_sweep_pace_t *p, uint64_t entities, int64_t every_ms, int64_t elapsed_ms,
                      int64_t *wait_ms);

/* Decides whether tly_store_drop removes the record of entity type `type`
 * and id[0..len). Called with the store's locks held: must not use the
 * store. */
typedef bool (*tly_store_doomed_fn)(uint32_t type, const char *id, size_t len, void *ctx);

/*
 * Removes every record `doomed` picks (shard mode: the entities of revoked
 * partitions) and returns how many; memory is freed after an RCU grace
 * period. Readers never block; a concurrent writer may re-create a record
 * it applies to meanwhile. Any registered thread.
 */
size_t tly_store_drop(tly_store_t *store, tly_store_doomed_fn doomed, void *ctx);

/* Receives one block of tly_store_dump's output; false stops the dump. */
typedef bool (*tly_store_emit_fn)(void *ctx, const void *data, size_t len);

/*
 * Serialises every live record and the intern table into blocks of about
 * 1 MiB, handed to emit in order. feat_hash (NULL: none) gives each
 * feature's definition hash by feature id: with it the output starts with
 * one layout item per entity type (its name, its features' hashes in slot
 * order, the event fields its records hold), which lets a store with other
 * definitions load the features that did not change. For snapshots: the
 * caller guarantees no writer runs meanwhile (the forked child of the
 * writer thread, or a stopped source). TLY_E_IO when emit failed or memory
 * ran out.
 */
tly_err_t tly_store_dump(tly_store_t *store, const uint64_t *feat_hash, tly_store_emit_fn emit,
                         void *ctx);

/*
 * Adds the records of one block of tly_store_dump output to store (fresh).
 * feat_hash NULL: the same definitions wrote it (layout items are skipped)
 * and every feature is restored. Otherwise feat_hash gives our features'
 * definition hashes by feature id, and the dump must carry layout items: a
 * feature whose entity type (by name) had a feature with the same hash in
 * the writer is restored from the writer's state, the others start empty
 * (tly_store_restored tells which); records whose type is gone or that
 * kept no restored feature's state are left out. Every length, type and
 * state is checked: a malformed block gives TLY_E_INVAL and a sentence in
 * err; records added before it stay (the caller discards the store).
 * Writer thread; RCU-registered; before the store is shared.
 */
tly_err_t tly_store_load(tly_store_t *store, const void *data, size_t len,
                         const uint64_t *feat_hash, char *err, size_t errlen);

/* True when tly_store_load restored feature `feat`'s state. An event with
 * `replayed` set feeds only the features for which this is false. */
bool tly_store_restored(const tly_store_t *store, uint32_t feat);

/* Fills *st with the current counters. Any thread. */
void tly_store_stats(const tly_store_t *store, tly_store_stats_t *st);

/*
 * Caps the store's counted bytes (tly_store_stats' bytes) at max_bytes (0:
 * no cap, the default): while they are past it, an event's entities that
 * are not held yet are not created (each counted in dropped[EV_STORE_FULL]),
 * and those already held keep taking events. The bytes are summed every
 * TLY_STORE_CAP_EVERY applies of each writer and at every sweep, so the
 * store may pass the cap by what is created in between. Call before writers
 * start, or between their runs.
 */
#define TLY_STORE_CAP_EVERY 1024
void tly_store_set_max_bytes(tly_store_t *store, int64_t max_bytes);

/* Writes the allocator that serves this process's malloc, the one used_memory
 * is counted in (malloc_usable_size), into buf[0..cap): "mimalloc-2.0.9"
 * when release builds' mimalloc replaced malloc, else "libc". Any thread. */
void tly_store_allocator(char *buf, size_t cap);

#endif
