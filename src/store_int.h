/*
 * store_int.h — what the three files of the store part share: the record
 * layout, the store struct, word access helpers and the functions each file
 * offers the others. Private to src/store*.c (and nothing else includes it).
 *
 *   store.c        the table, records, locking, apply/read/sweep, counters
 *   store_words.c  the word encoding of large records (buckets, items)
 *   store_log.c    the compact encoding of small records (event logs) and
 *                  the intern table
 *
 * See store.c for the encodings and the concurrency protocol.
 */
#ifndef TALLYD_STORE_INT_H
#define TALLYD_STORE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "tallyd/rcu.h"
#include "tallyd/store.h"
#include "tallyd/window.h"

#include "bytes_int.h"

#if defined(__SANITIZE_THREAD__)
/* TSan does not model fences (gcc refuses them under -fsanitize=thread).
 * Every access to shared state here is atomic, so without the fences TSan
 * still checks what it can: that nothing shared is read or written plainly. */
#define fence(order) ((void)0)
#else
#define fence(order) atomic_thread_fence(order)
#endif

#define F_WORDS  0x2u        /* ent_t.mode: word encoding (else compact) */
#define F_BUILD  0x4u        /* ent_t.mode: being built, not in the table yet */
#define SEQ_DEAD 0x80000000u /* in ent_t.seq: replaced or expired */

#define COMPACT_MAX_BYTES   192                     /* a larger log is replayed into words */
#define COMPACT_MAX_EVENTS  (COMPACT_MAX_BYTES / 2) /* records are >= 2 bytes */
#define COMPACT_SLACK_WORDS 1     /* spare state words when a compact record grows */
#define COMPACT_MAX_SLOTS   63    /* feature slots a mask can name */
#define REC_BUF             (COMPACT_MAX_BYTES + 32) /* bytes to encode one log record in */
#define INTERN_SLOTS        65536 /* power of two; ids fit 16 bits */
#define INTERN_MAX          (INTERN_SLOTS / 2)
#define INTERN_MAXLEN       32

typedef struct ent {
    /* Sequence lock: odd while a writer is inside (bits 0..30 count writes);
     * bit 31 (SEQ_DEAD) is set under the lock when the record is replaced
     * or expired, and sends readers and writers back to the table. Writers
     * CAS even → odd; readers load it with acquire before and relaxed after
     * reading. Its first release store publishes the immutable fields. */
    _Atomic uint32_t seq;
    uint16_t type;         /* entity type; immutable */
    uint8_t idlen;         /* immutable */
    uint8_t mode;          /* F_WORDS or 0; immutable */
    uint32_t cap;          /* state capacity in words; immutable */
    _Atomic uint32_t used; /* words (F_WORDS) or log bytes; writer under lock */
    /* followed by the id (padded to 8 bytes), then `cap` state words that
     * the writer stores and readers load with __atomic builtins */
} ent_t;

#define RETIRE_BATCH 64

typedef struct tstats {
    struct tstats *next;     /* list of the store's per-thread counters */
    struct retired *retired; /* owner thread only (and tly_store_free) */
    /* Batches past their grace period, pushed by the call_rcu thread and
     * freed by the owner thread (retire_flush), so that records go back to
     * the allocator of the thread that allocates them. */
    _Atomic(struct retired *) ready;
    /* Written by the owning thread with relaxed stores; summed by any. */
    _Atomic int64_t entities, bytes, applied, updates, expired, dropped_entities, interned_bytes;
    _Atomic uint64_t dropped[TLY_E__COUNT];
    uint32_t cap_tick; /* owner thread: applies since it last summed the bytes */
} tstats_t;

typedef struct {
    uint32_t len;
    char s[];
} istr_t;

/* Per entity type: the value fields its features read, in one order. */
typedef struct {
    uint32_t nvf;
    uint32_t vf[TLY_MAX_ITEM_VALUES]; /* field ids */
    bool compact;                     /* may use the compact encoding */
    /* Words the last compact record of this type turned into (a hint, any
     * thread): the next conversion starts that large. */
    _Atomic uint32_t conv_words;
} etype_t;

/* What tly_store_apply reads of a feature for every event, packed small
 * and in the order it reads them (entity type, then slot). */
enum { PF_PLAIN, PF_NUMERIC, PF_ITEMS }; /* count; sum/min/max/avg; last/last_k */
typedef struct {
    uint64_t conds;     /* the feature's `where` condition bits */
    int64_t horizon_ms; /* its horizon */
    uint64_t bit;       /* its slot's bit in a compact log's mask (0: none) */
    uint32_t id;        /* feature id */
    uint32_t value;     /* its first value field */
    uint8_t kind;       /* PF_* */
} pfeat_t;

/* A snapshot writer's entity type, as its layout item describes it: how
 * its records map onto ours (tly_store_load with feature hashes). */
typedef struct {
    bool seen;
    bool same;                      /* our layout: its records load as they are */
    int type;                       /* our entity type, -1: not loaded */
    uint32_t nslots;                /* the writer's features of the type */
    int32_t *slot_feat;             /* writer slot → our feature id, -1: not restored */
    uint32_t nvf;                   /* the writer's value fields */
    int field[TLY_MAX_ITEM_VALUES]; /* writer value field → our field id, -1: none */
} lmap_t;

#define TLY_STORE_SHARDS 64 /* power of two; picked by the hash's top bits */

/* One shard's slot array (store_table.c): a power of two of slots, each 0
 * (empty), 1 (a removed record) or a record's address (low 48 bits) with 16
 * bits of its hash. Replaced arrays are freed after a grace period. */
typedef struct {
    struct rcu_head rcu;
    uint64_t mask;       /* slots - 1; immutable */
    _Atomic bool frozen; /* set before a rebuild copies it (see tbl_replace) */
    _Atomic uint64_t slot[];
} tslots_t;

/* One shard of the entity table: an open-addressed slot array written by
 * one thread at a time and probed by readers without locks (under
 * rcu_read_lock: replaced slot arrays and records are freed after a grace
 * period); writers that add or remove a record take `mu`, always after the
 * record's own lock, never before; replacing a record needs only its lock
 * (tbl_replace takes `mu` itself when a rebuild got in the way). */
typedef struct {
    /* Read on every lookup by every thread: alone on its cache line, so a
     * writer taking `mu` or counting an insert does not evict it from the
     * other writers' caches. */
    _Alignas(64) tslots_t *_Atomic arr;
    _Alignas(64) size_t used; /* records + tombstones in arr; under mu */
    size_t live;           /* records in arr; under mu */
    _Atomic int64_t bytes; /* arr's size, for the store's memory count */
    uint64_t seed;         /* the store's hash_id seed; immutable */
    pthread_mutex_t mu;
} shard_t;

struct tly_store {
    const tly_featset_t *fs;
    shard_t *shards;                      /* TLY_STORE_SHARDS, immutable pointer */
    uint64_t gen;                         /* unique per store, keys the thread cache */
    uint64_t seed;                        /* hash_id's seed, random; immutable */
    pthread_mutex_t mu;                   /* guards `stats` list insertion */
    tstats_t *_Atomic stats;              /* per-thread counters (push-only list) */
    etype_t *etypes;                      /* by entity index; immutable but conv_words */
    uint8_t (*vidx)[TLY_MAX_ITEM_VALUES]; /* by feature: value → vf index */
    pfeat_t *pfeats;                      /* every feature; immutable */
    uint32_t *pfirst;                     /* by entity index: its first in pfeats */
    /* Intern table for short strings of compact logs: slots are written
     * once (CAS from NULL) and never freed before the store. */
    istr_t *_Atomic intern[INTERN_SLOTS];
    _Atomic uint32_t ninterned;
    /* Loading (one thread, before the store is shared): the writer's
     * entity types (TLY_MAX_ENTITIES, NULL until a layout item is read),
     * and by feature id whether a load restored the feature. */
    lmap_t *lmap;
    uint8_t *restored;
    /* The budgeted sweeper's place (tly_store_sweep with a budget; one such
     * sweeper at a time; tly_store_drop does not touch it): the shard, the
     * slot position in it, and the slot array that position counts in. */
    size_t sweep_shard, sweep_pos;
    const tslots_t *sweep_arr;
    /* tly_store_set_max_bytes's cap (0: none; set before writers start),
     * and whether the counted bytes were past it when last summed */
    int64_t max_bytes;
    atomic_bool full;
    /* Tests only (set before writers start): compact logs turn into words
     * by replaying every record, not by store_words_build. */
    bool replay_conversions;
    /* The distinct value fields of numeric features, whose kinds (absent,
     * a number, other) key apply_event's memo with the `where` outcome;
     * memo_ok when there are at most 32 of them and conditions are masks. */
    uint32_t numf[32];
    uint32_t nnumf;
    bool memo_ok;
};

static inline size_t id_words(size_t idlen)
{
    return (idlen + 7) / 8;
}

static inline const char *ent_id(const ent_t *e)
{
    return (const char *)(e + 1);
}

static inline uint64_t *ent_words(const ent_t *e)
{
    return (uint64_t *)((char *)(uintptr_t)(e + 1) + 8 * id_words(e->idlen));
}

/* Word i through the record's words pointer (ent_words(e); stale once the
 * record regrows). For loops that store: after each atomic store through
 * st() the compiler loads the record's idlen and works out ent_words(e)
 * again for the next. */
static inline uint64_t wld(const uint64_t *w, uint32_t i)
{
    return __atomic_load_n(&w[i], __ATOMIC_RELAXED);
}

static inline void wst(uint64_t *w, uint32_t i, uint64_t v)
{
    __atomic_store_n(&w[i], v, __ATOMIC_RELAXED);
}

static inline uint64_t ld(const ent_t *e, uint32_t i)
{
    return wld(ent_words(e), i);
}

static inline void st(ent_t *e, uint32_t i, uint64_t v)
{
    wst(ent_words(e), i, v);
}

static inline uint32_t used_of(const ent_t *e)
{
    uint32_t u = atomic_load_explicit(&e->used, memory_order_relaxed);
    uint32_t lim = (e->mode & F_WORDS) ? e->cap : e->cap * 8;
    return u > lim ? lim : u;
}

static inline bool is_words(const ent_t *e)
{
    return (e->mode & F_WORDS) != 0;
}

static inline void stat_add(_Atomic int64_t *c, int64_t d)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + d,
                          memory_order_relaxed);
}

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

/* s[0..n) (n < 8) as the low bytes of a word, as memcpy into a zeroed word
 * gives on the host; without memcpy's call (n varies), which costs more
 * than the hash itself for the short ids and strings hashed per event. */
static inline uint64_t tail_bytes(const char *s, size_t n)
{
    uint64_t k = 0;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const unsigned char *u = (const unsigned char *)s;
    if (n >= 4) { /* two overlapping 4-byte loads */
        uint32_t lo, hi;
        memcpy(&lo, u, 4);
        memcpy(&hi, u + n - 4, 4);
        k = lo | (uint64_t)hi << (8 * (n - 4));
    } else if (n > 0) { /* bytes 0, n/2 and n-1 cover 1..3 */
        k = u[0] | (uint64_t)u[n / 2] << (8 * (n / 2)) | (uint64_t)u[n - 1] << (8 * (n - 1));
    }
#else
    memcpy(&k, s, n);
#endif
    return k;
}

static inline uint64_t hash_bytes(uint64_t seed, const char *s, size_t n)
{
    uint64_t h = seed ^ n;
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, s, 8);
        h = (h ^ mix64(k)) * UINT64_C(0x9e3779b97f4a7c15);
        s += 8;
        n -= 8;
    }
    return mix64(h ^ tail_bytes(s, n));
}

_Static_assert(sizeof(unsigned long) == 8, "shards, slots and tags take bits of a 64-bit hash");

/* The table's hash of an entity key. seed is the store's, random per
 * process (tly_store_new), so that ids from a topic cannot be chosen
 * offline to fall into one probe run of the linear-probing table. */
static inline unsigned long hash_id(uint64_t seed, uint32_t type, const char *s, size_t n)
{
    return (unsigned long)hash_bytes(seed ^ UINT64_C(0x9e3779b97f4a7c15) * (type + 1), s, n);
}

/* store_table.c: the shard's table. tbl_get, tbl_prefetch and
 * tbl_prefetch_ent are for readers (under rcu_read_lock); tbl_next needs mu
 * or no writer at all (a rebuild between two calls would move what *pos
 * counts); tbl_replace needs old's record lock and not mu (it may take mu);
 * the others need mu. h is hash_id of the record's key. */
void tbl_init(shard_t *sh, uint64_t seed); /* seed: the store's hash_id seed */
void tbl_destroy(shard_t *sh); /* frees the array, not the records */
ent_t *tbl_get(const shard_t *sh, unsigned long h, uint32_t type, const char *id, size_t len);
void tbl_prefetch(const shard_t *sh, unsigned long h);     /* the key's first slot */
/* the first lines of the record the key's tag names */
void tbl_prefetch_ent(const shard_t *sh, unsigned long h);
/* the lines after those of that record in use, up to max_lines in all */
void tbl_prefetch_rest(const shard_t *sh, unsigned long h, size_t max_lines);
bool tbl_insert(shard_t *sh, unsigned long h, ent_t *e);   /* false: the key is there */
bool tbl_replace(shard_t *sh, unsigned long h, const ent_t *old, ent_t *e);
bool tbl_remove(shard_t *sh, unsigned long h, const ent_t *e);
ent_t *tbl_next(const shard_t *sh, size_t *pos); /* from *pos = 0; NULL at the end */

/* tly_window_range of win at now_ms, remembered per thread: a query reads
 * the same few windows at the same now for many entities (MFEATURES: 500
 * ids), a writer applies a batch at one now, and the range costs three
 * 64-bit divisions. Four entries, keyed by
 * everything the range depends on (length, hop, now), never by address: a
 * featset freed and another compiled may reuse the windows' memory. */
static inline void store_window_range(const tly_window_t *win, int64_t now_ms, int64_t *lo,
                                      int64_t *hi)
{
    static _Thread_local struct {
        int64_t len, hop, now, lo, hi;
    } memo[4];
    size_t i = (size_t)((uint64_t)(win->len_ms ^ win->hop_ms) * UINT64_C(0x9e3779b97f4a7c15) >> 62);
    if (memo[i].len != win->len_ms || memo[i].hop != win->hop_ms || memo[i].now != now_ms) {
        tly_window_range(now_ms, win->len_ms, win->hop_ms, &memo[i].lo, &memo[i].hi);
        memo[i].len = win->len_ms;
        memo[i].hop = win->hop_ms;
        memo[i].now = now_ms;
    }
    *lo = memo[i].lo;
    *hi = memo[i].hi;
}

/* The values of one record decoded from a log (its time and mask are in
 * log_t's ts and masks; its index is its arrival order). */
typedef struct {
    tly_value_t vals[TLY_MAX_ITEM_VALUES];
} rec_t;

typedef struct {
    uint8_t bytes[COMPACT_MAX_BYTES + 8];
    size_t nbytes;
    rec_t recs[COMPACT_MAX_EVENTS];
    size_t nrecs;
    /* each record's time and feature mask, apart from its values, for the
     * scans that read only them (a count, a window's filter) */
    int64_t ts[COMPACT_MAX_EVENTS];
    uint64_t masks[COMPACT_MAX_EVENTS];
} log_t;

/* Segment ids: windowed features' segments first (slot × TLY_MAX_WINDOWS +
 * window), last/last_k item lists after all of them, so that appending an
 * item — every event — shifts no other segment. */
#define SID_WINDOW(slot, w) ((uint32_t)(slot)*TLY_MAX_WINDOWS + (uint32_t)(w))
#define SID_ITEMS(slot)     (0x8000u + (uint32_t)(slot))

/* store.c */
void *store_xmalloc(size_t n);
tstats_t *store_thread_stats(tly_store_t *store);
void store_regrow(tly_store_t *store, ent_t **entp, uint8_t mode, uint32_t words, uint32_t copy);
/* A record with old's key, locked and empty, that no other thread can see
 * (F_BUILD): while it is built, store_regrow swaps it for a larger copy
 * without the table or a grace period. store_publish puts it in old's
 * place (old: locked, in the table; it is retired) and clears F_BUILD. */
ent_t *store_build(tly_store_t *store, const ent_t *old, uint8_t mode, uint32_t words);
void store_publish(tly_store_t *store, ent_t *old, ent_t *e);

/* store_words.c */
uint32_t store_seg_find(const ent_t *e, uint32_t used, uint32_t sid, bool *found);
/* Whether a word-encoded record read from a snapshot is one the writer can
 * take: segments in increasing id order, each of a feature of the record's
 * type (a window it has, whole buckets of its aggregation in increasing
 * order; or a well-formed item list), nothing past `used`. */
bool store_words_valid(const tly_store_t *store, const ent_t *e);
void store_words_apply(tly_store_t *store, ent_t **entp, const tly_entity_t *etype, uint64_t mask,
                       const uint32_t *feats, uint32_t nfeats, const tly_event_t *ev,
                       int64_t now_ms);
/* Builds a word record's segments from a compact log at once: the same
 * words as replaying the log's records one at a time through
 * store_words_apply at now_ms would write. Windows are built whole; an
 * item list too when none of its items would be trimmed or dropped and
 * all share one packed schema. The record (a store_build, not yet
 * published) holds no segment yet; its word 0 becomes the newest record's
 * time. Returns the mask of the item features left for the caller to
 * replay record by record (and only those). */
uint64_t store_words_build(tly_store_t *store, ent_t **entp, const tly_entity_t *etype,
                           const log_t *lg, int64_t now_ms);
/* The newest items of the list at off, newest first: of the k newest kept
 * at or before asof_ms, those at or after since_ms, at most cap. They agree
 * with store_log_recent's for the same events when asof_ms is at or after
 * the now of the record's last apply and at most max(k, AHEAD_ITEMS_MIN)
 * of its items were after that now; at an earlier asof_ms the writer may
 * have trimmed items the log still holds, and these are the newest of the
 * log's answer. */
size_t store_words_recent(const tly_store_t *store, const ent_t *e, uint32_t off, uint32_t used,
                          uint32_t k, int64_t since_ms, int64_t asof_ms, tly_item_t *items,
                          size_t cap, char *strbuf, size_t strcap, size_t *sused, bool *bad,
                          bool *full);
/* hint: a segment cursor, 1 at first, kept across one record's reads */
tly_value_t store_words_value(const ent_t *e, uint32_t used, const tly_feat_t *feat,
                              uint32_t window, int64_t now_ms, uint32_t *hint, bool *bad);

/* store_log.c */

/* The strings a thread interned last, by a few bits of their length and
 * first byte: an event stream repeats a handful of short strings (actions,
 * categories), and a hit compares the bytes once instead of hashing and
 * probing. Keyed by the store's generation, never its address; interned
 * strings live as long as their store. */
#define IMEMO_SLOTS 8
typedef struct {
    uint64_t gen;
    const istr_t *is;
    int id;
} imemo_t;
extern _Thread_local imemo_t store_imemo[IMEMO_SLOTS];

/* store_intern_get past its thread's memo (slot m). */
int store_intern_find(tly_store_t *store, const char *s, uint32_t len, size_t m);

/* Returns the intern id of s[0..len), inserting it if there is room, or -1
 * (too long, or the table is full). Writers. */
static inline __attribute__((always_inline)) int store_intern_get(tly_store_t *store, const char *s,
                                                                  uint32_t len)
{
    if (len > INTERN_MAXLEN)
        return -1;
    size_t m = (len ^ (uint32_t)(len ? (unsigned char)s[0] : 0) * 3u) & (IMEMO_SLOTS - 1);
    const imemo_t *im = &store_imemo[m];
    if (im->gen == store->gen && im->is->len == len && tly_bytes_eq(im->is->s, s, len))
        return im->id;
    return store_intern_find(store, s, len, m);
}
/* Returns interned string `id`, or NULL for an id never handed out. Any
 * thread; the string lives as long as the store. */
const istr_t *store_intern_str(const tly_store_t *store, uint64_t id);
void store_log_copy(const ent_t *e, log_t *lg);
bool store_log_decode(const tly_store_t *store, const etype_t *et, log_t *lg);
void store_compact_apply(tly_store_t *store, ent_t **entp, const tly_entity_t *etype, uint64_t mask,
                         const uint32_t *feats, uint32_t nfeats, const tly_event_t *ev,
                         int64_t now_ms);
/* Encodes ev (feature mask) as the first log record of a new compact record
 * of type et into rec (REC_BUF bytes) and returns its length, with
 * *words the state words that record should get: the log and the slack a
 * regrow would leave, so that a new entity is allocated once, not allocated
 * and at once replaced. Returns 0 (and *words 0) when the event does not fit
 * a log. Writers (may intern ev's strings). */
size_t store_compact_first(tly_store_t *store, const etype_t *et, const tly_event_t *ev,
                           uint64_t mask, uint8_t *rec, uint32_t *words);
/* Appends an encoded record (store_compact_first's, in the REC_BUF buffer
 * it was encoded into: the append reads whole words past its end) to a
 * locked compact record that has room for it. */
void store_compact_append(ent_t *e, const uint8_t *rec, size_t n);
size_t store_log_recent(const log_t *lg, uint32_t slot, uint32_t k, int64_t since_ms,
                        int64_t asof_ms, size_t cap, uint32_t *idx);
/* How many records store_log_recent would give with cap >= k, counted
 * without ordering them. */
size_t store_log_count(const log_t *lg, uint32_t slot, uint32_t k, int64_t since_ms,
                       int64_t asof_ms);
bool store_item_from_rec(const tly_store_t *store, const tly_feat_t *feat, const log_t *lg,
                         size_t i, tly_item_t *it, char *strbuf, size_t strcap, size_t *sused);
tly_value_t store_log_value(const tly_store_t *store, const log_t *lg, const tly_feat_t *feat,
                            uint32_t window, int64_t now_ms);

/* For tests: called by tly_store_read and tly_store_recent once an attempt
 * has read its values, before it checks them, as a writer's store would
 * land there (NULL, the default: nothing). */
extern void (*store_read_hook)(void *ctx);
extern void *store_read_hook_ctx;

#endif
