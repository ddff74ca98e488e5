/*
 * store.c — the concurrent entity table and per-feature state.
 *
 * Table: liburcu's cds_lfht, keyed by (entity type, id). Lookups and inserts
 * run under rcu_read_lock(); a record that is replaced (it grew) or expired
 * is unlinked and freed with call_rcu, so a reader holding a pointer never
 * sees it freed.
 *
 * Record: one allocation — a 32-byte header, the id (padded to 8 bytes),
 * then the state in 64-bit words. A record that needs more room is copied
 * into a larger one, which replaces it in the table (cds_lfht_replace); the
 * old one is marked DEAD and retired. State has two encodings:
 *
 *  compact — while an entity is small (most are: a user with three events),
 *    its state is the log of the events themselves, byte-packed:
 *      varint zigzag(time − previous time), varint mask (bit s: the feature
 *      in slot s took the event), one 2-bit tag per value field of the
 *      entity type (nil, int, double, string), then each value (zigzag
 *      varint; 8 bytes; string as varint (len << 1) + bytes, or varint
 *      (intern id << 1 | 1) for short strings in the store's intern table).
 *    Every answer is computed from the log at read time. Past
 *    COMPACT_MAX_BYTES or COMPACT_MAX_EVENTS the log is replayed into the
 *    word encoding.
 *
 *  words — word 0 is the newest event time; then segments sorted by id
 *    (feature slot × TLY_MAX_WINDOWS + window):
 *      header  = seg id (bits 0..15) | payload words (bits 16..47)
 *      count   one word per bucket: bucket << 32 | n
 *      sum/min/max/avg: bucket << 32 | float << 31 | n, then the value bits
 *      last/last_k: item count, then items oldest → newest, each
 *        [words | nvals << 32] [time] [values…] [words]; a value is a tag
 *        word (type | len << 8) and its payload words.
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
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tallyd/rcu.h"
#include "tallyd/window.h"

#if defined(__SANITIZE_THREAD__)
char tly_rcu_tsan_sync, tly_lfht_tsan_sync;
/* TSan does not model fences (gcc refuses them under -fsanitize=thread).
 * Every access to shared state here is atomic, so without the fences TSan
 * still checks what it can: that nothing shared is read or written plainly. */
#define fence(order) ((void)0)
#else
#define fence(order) atomic_thread_fence(order)
#endif

#define SEG_ID(h) ((uint32_t)((h)&0xffffu))
#define SEG_LEN(h) ((uint32_t)(((h) >> 16) & 0xffffffffu))
#define SEG_HDR(id, len) ((uint64_t)(id) | ((uint64_t)(len) << 16))
#define N_MASK 0x7fffffffu
#define FLOAT_BIT 0x80000000u

#define F_DEAD 0x1u  /* replaced or expired: go back to the table */
#define F_WORDS 0x2u /* word encoding (else compact) */

#define COMPACT_MAX_BYTES 192  /* a larger log is replayed into words */
#define COMPACT_MAX_EVENTS 16
#define COMPACT_MAX_SLOTS 63   /* feature slots a mask can name */
#define INTERN_SLOTS 65536     /* power of two; ids fit 16 bits */
#define INTERN_MAX (INTERN_SLOTS / 2)
#define INTERN_MAXLEN 32

enum { TAG_NIL = 0, TAG_INT = 1, TAG_DBL = 2, TAG_STR = 3 };

typedef struct ent {
    struct cds_lfht_node node; /* table linkage (liburcu) */
    /* Sequence lock: odd while a writer is inside. Writers CAS even → odd;
     * readers load it with acquire before and relaxed after reading. Its
     * first release store also publishes the immutable fields. */
    _Atomic uint32_t seq;
    uint16_t type;          /* entity type; immutable */
    uint8_t idlen;          /* immutable */
    _Atomic uint8_t flags;  /* F_DEAD (under the lock), F_WORDS (immutable) */
    uint32_t cap;           /* state capacity in words; immutable */
    _Atomic uint32_t used;  /* words (F_WORDS) or log bytes; writer under lock */
    /* followed by the id (padded to 8 bytes), then `cap` state words that
     * the writer stores and readers load with __atomic builtins */
} ent_t;

typedef struct {
    struct rcu_head rcu;
    void *ptr;
} retired_t;

typedef struct tstats {
    struct tstats *next; /* list of the store's per-thread counters */
    /* Written by the owning thread with relaxed stores; summed by any. */
    _Atomic int64_t entities, bytes, applied, updates, expired, interned_bytes;
    _Atomic uint64_t dropped[TLY_E__COUNT];
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
} etype_t;

struct tly_store {
    const tly_featset_t *fs;
    struct cds_lfht *ht;
    uint64_t gen;            /* unique per store, keys the thread cache */
    pthread_mutex_t mu;      /* guards `stats` list insertion */
    tstats_t *_Atomic stats; /* per-thread counters (push-only list) */
    etype_t *etypes;         /* by entity index; immutable */
    uint8_t (*vidx)[TLY_MAX_ITEM_VALUES]; /* by feature: value → vf index */
    /* Intern table for short strings of compact logs: slots are written
     * once (CAS from NULL) and never freed before the store. */
    istr_t *_Atomic intern[INTERN_SLOTS];
    _Atomic uint32_t ninterned;
};

static _Atomic uint64_t store_gen;
static _Thread_local struct {
    uint64_t gen;
    tstats_t *st;
} tls;

/* ---- small helpers ---------------------------------------------------- */

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "tallyd: out of memory allocating %zu bytes\n", n);
        abort();
    }
    return p;
}

static tstats_t *my_stats(tly_store_t *store)
{
    if (tls.gen == store->gen)
        return tls.st;
    tstats_t *st = xmalloc(sizeof *st);
    memset(st, 0, sizeof *st);
    pthread_mutex_lock(&store->mu);
    st->next = atomic_load_explicit(&store->stats, memory_order_relaxed);
    atomic_store_explicit(&store->stats, st, memory_order_release);
    pthread_mutex_unlock(&store->mu);
    tls.gen = store->gen;
    tls.st = st;
    return st;
}

static void stat_add(_Atomic int64_t *c, int64_t d)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + d,
                          memory_order_relaxed);
}

static void stat_drop(tly_store_t *store, tly_err_t why)
{
    _Atomic uint64_t *c = &my_stats(store)->dropped[why];
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static size_t id_words(size_t idlen)
{
    return (idlen + 7) / 8;
}

static const char *ent_id(const ent_t *e)
{
    return (const char *)(e + 1);
}

static uint64_t *ent_words(const ent_t *e)
{
    return (uint64_t *)((char *)(uintptr_t)(e + 1) + 8 * id_words(e->idlen));
}

static uint64_t ld(const ent_t *e, uint32_t i)
{
    return __atomic_load_n(&ent_words(e)[i], __ATOMIC_RELAXED);
}

static void st(ent_t *e, uint32_t i, uint64_t v)
{
    __atomic_store_n(&ent_words(e)[i], v, __ATOMIC_RELAXED);
}

static uint32_t used_of(const ent_t *e)
{
    uint32_t u = atomic_load_explicit(&e->used, memory_order_relaxed);
    uint32_t lim = (atomic_load_explicit(&e->flags, memory_order_relaxed) & F_WORDS)
                       ? e->cap
                       : e->cap * 8;
    return u > lim ? lim : u;
}

static bool is_words(const ent_t *e)
{
    return (atomic_load_explicit(&e->flags, memory_order_relaxed) & F_WORDS) != 0;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

static uint64_t hash_bytes(uint64_t seed, const char *s, size_t n)
{
    uint64_t h = seed ^ n;
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, s, 8);
        h = (h ^ mix64(k)) * UINT64_C(0x9e3779b97f4a7c15);
        s += 8;
        n -= 8;
    }
    uint64_t k = 0;
    memcpy(&k, s, n);
    return mix64(h ^ k);
}

static unsigned long hash_id(uint32_t type, const char *s, size_t n)
{
    return (unsigned long)hash_bytes(UINT64_C(0x9e3779b97f4a7c15) * (type + 1), s, n);
}

typedef struct {
    uint32_t type;
    const char *id;
    size_t len;
} key_t_;

static int match_cb(struct cds_lfht_node *node, const void *key)
{
    const ent_t *ent = caa_container_of(node, ent_t, node);
    const key_t_ *k = key;
    tly_lfht_tsan_subscribe();
    /* Acquire pairs with the creator's release of seq: it publishes id. */
    (void)atomic_load_explicit(&ent->seq, memory_order_acquire);
    return ent->type == k->type && ent->idlen == k->len && memcmp(ent_id(ent), k->id, k->len) == 0;
}

/* ---- records: allocation, replacement, retirement ------------------------ */

/* Allocates a record with room for `words` state words (more if the
 * allocator's size class leaves room), locked by the caller (seq odd). */
static ent_t *ent_alloc(tly_store_t *store, uint32_t type, const char *id, size_t idlen,
                        uint8_t flags, uint32_t words)
{
    size_t head = sizeof(ent_t) + 8 * id_words(idlen);
    ent_t *e = xmalloc(head + 8 * (size_t)words);
    size_t usable = malloc_usable_size(e);
    cds_lfht_node_init(&e->node);
    e->type = (uint16_t)type;
    e->idlen = (uint8_t)idlen;
    e->cap = (uint32_t)((usable - head) / 8);
    atomic_init(&e->flags, flags);
    atomic_init(&e->used, 0);
    memset((char *)(e + 1), 0, 8 * id_words(idlen));
    memcpy((char *)(e + 1), id, idlen);
    atomic_store_explicit(&e->seq, 1, memory_order_release);
    stat_add(&my_stats(store)->bytes, (int64_t)usable);
    return e;
}

static void retired_free_cb(struct rcu_head *head)
{
    tly_rcu_tsan_acquire();
    retired_t *r = caa_container_of(head, retired_t, rcu);
    free(r->ptr);
    free(r);
}

/* Frees ent after a grace period; its bytes leave the count now. */
static void ent_retire(tly_store_t *store, ent_t *ent)
{
    retired_t *r = xmalloc(sizeof *r);
    r->ptr = ent;
    stat_add(&my_stats(store)->bytes, -(int64_t)malloc_usable_size(ent));
    tly_call_rcu(&r->rcu, retired_free_cb);
}

static void ent_lock(ent_t *ent)
{
    for (;;) {
        uint32_t s = atomic_load_explicit(&ent->seq, memory_order_relaxed);
        if (!(s & 1) && atomic_compare_exchange_weak_explicit(
                            &ent->seq, &s, s + 1, memory_order_acquire, memory_order_relaxed))
            break;
        caa_cpu_relax();
    }
    fence(memory_order_release);
}

static void ent_unlock(ent_t *ent)
{
    uint32_t s = atomic_load_explicit(&ent->seq, memory_order_relaxed);
    atomic_store_explicit(&ent->seq, s + 1, memory_order_release);
}

/*
 * Replaces *entp (locked by the caller, in the table) with a copy in the
 * given encoding with room for `words` state words; copies `copy` words of
 * state when the encoding is unchanged. The old record is marked DEAD,
 * unlocked and retired; *entp becomes the new record, locked.
 */
static void ent_regrow(tly_store_t *store, ent_t **entp, uint8_t flags, uint32_t words,
                       uint32_t copy)
{
    ent_t *old = *entp;
    ent_t *e = ent_alloc(store, old->type, ent_id(old), old->idlen, flags, words);
    for (uint32_t i = 0; i < copy; i++)
        st(e, i, ld(old, i));
    atomic_store_explicit(&e->used, copy ? atomic_load_explicit(&old->used, memory_order_relaxed)
                                         : 0,
                          memory_order_relaxed);
    key_t_ key = {old->type, ent_id(old), old->idlen};
    unsigned long h = hash_id(old->type, ent_id(old), old->idlen);
    struct cds_lfht_iter it;
    cds_lfht_lookup(store->ht, h, match_cb, &key, &it);
    tly_lfht_tsan_publish();
    if (cds_lfht_iter_get_node(&it) != &old->node ||
        cds_lfht_replace(store->ht, &it, h, match_cb, &key, &e->node) != 0) {
        /* Only the lock holder can unlink a live record. */
        fprintf(stderr, "tallyd: entity table invariant broken in replace\n");
        abort();
    }
    atomic_store_explicit(&old->flags,
                          atomic_load_explicit(&old->flags, memory_order_relaxed) | F_DEAD,
                          memory_order_relaxed);
    ent_unlock(old);
    ent_retire(store, old);
    *entp = e;
}

/* Finds or inserts the record (type, id) and returns it locked and live.
 * Caller holds rcu_read_lock. */
static ent_t *ent_get_locked(tly_store_t *store, uint32_t type, const char *id, size_t len)
{
    key_t_ key = {type, id, len};
    unsigned long h = hash_id(type, id, len);
    for (;;) {
        struct cds_lfht_iter it;
        cds_lfht_lookup(store->ht, h, match_cb, &key, &it);
        struct cds_lfht_node *node = cds_lfht_iter_get_node(&it);
        ent_t *ent;
        if (node) {
            ent = caa_container_of(node, ent_t, node);
            ent_lock(ent);
        } else {
            uint8_t fl = store->etypes[type].compact ? 0 : F_WORDS;
            ent = ent_alloc(store, type, id, len, fl, fl ? 1 : 0); /* born locked */
            if (fl) {
                st(ent, 0, (uint64_t)INT64_MIN);
                atomic_store_explicit(&ent->used, 1, memory_order_relaxed);
            }
            tly_lfht_tsan_publish();
            node = cds_lfht_add_unique(store->ht, h, match_cb, &key, &ent->node);
            if (node != &ent->node) {
                stat_add(&my_stats(store)->bytes, -(int64_t)malloc_usable_size(ent));
                free(ent); /* never published */
                continue;
            }
            stat_add(&my_stats(store)->entities, 1);
        }
        if (!(atomic_load_explicit(&ent->flags, memory_order_relaxed) & F_DEAD))
            return ent;
        ent_unlock(ent); /* replaced or swept while we looked: look again */
    }
}

static ent_t *ent_find(tly_store_t *store, uint32_t type, const char *id, size_t len)
{
    key_t_ key = {type, id, len};
    struct cds_lfht_iter it;
    cds_lfht_lookup(store->ht, hash_id(type, id, len), match_cb, &key, &it);
    struct cds_lfht_node *node = cds_lfht_iter_get_node(&it);
    return node ? caa_container_of(node, ent_t, node) : NULL;
}

/* ---- word encoding: blocks of segments --------------------------------- */

/* Makes room for `extra` more words (may replace *entp). */
static void words_reserve(tly_store_t *store, ent_t **entp, uint32_t extra)
{
    ent_t *e = *entp;
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    if (used + extra <= e->cap)
        return;
    uint32_t cap = e->cap < 4 ? 4 : e->cap;
    while (cap < used + extra)
        cap = cap < 64 ? cap * 2 : cap + cap / 2;
    ent_regrow(store, entp, F_WORDS, cap, used);
}

/* Shrinks a mostly empty record. */
static void words_maybe_shrink(tly_store_t *store, ent_t **entp)
{
    ent_t *e = *entp;
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    if (e->cap <= 32 || used * 4 > e->cap)
        return;
    ent_regrow(store, entp, F_WORDS, used + used / 2 + 2, used);
}

/* Inserts n zero words at pos (room must exist). */
static void words_open(ent_t *e, uint32_t pos, uint32_t n)
{
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    for (uint32_t i = used; i > pos; i--)
        st(e, i - 1 + n, ld(e, i - 1));
    for (uint32_t i = 0; i < n; i++)
        st(e, pos + i, 0);
    atomic_store_explicit(&e->used, used + n, memory_order_relaxed);
}

/* Removes n words at pos. */
static void words_close(ent_t *e, uint32_t pos, uint32_t n)
{
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    for (uint32_t i = pos + n; i < used; i++)
        st(e, i - n, ld(e, i));
    atomic_store_explicit(&e->used, used - n, memory_order_relaxed);
}

/* Finds segment sid among the words [1, used): its header offset and
 * *found, or where it would be inserted. */
static uint32_t seg_find(const ent_t *e, uint32_t used, uint32_t sid, bool *found)
{
    uint64_t off = 1; /* 64-bit: a torn length must not wrap it */
    *found = false;
    while (off < used) {
        uint64_t h = ld(e, (uint32_t)off);
        uint32_t id = SEG_ID(h);
        if (id == sid) {
            *found = true;
            return (uint32_t)off;
        }
        if (id > sid)
            return (uint32_t)off;
        off += 1 + (uint64_t)SEG_LEN(h);
    }
    return (uint32_t)(off > used ? used : off);
}

/* Header offset of segment sid, created with init_len zero words if absent. */
static uint32_t seg_get(tly_store_t *store, ent_t **entp, uint32_t sid, uint32_t init_len)
{
    ent_t *e = *entp;
    bool found;
    uint32_t off = seg_find(e, atomic_load_explicit(&e->used, memory_order_relaxed), sid, &found);
    if (!found) {
        words_reserve(store, entp, 1 + init_len); /* offsets survive a regrow */
        words_open(*entp, off, 1 + init_len);
        st(*entp, off, SEG_HDR(sid, init_len));
    }
    return off;
}

static void seg_set_len(ent_t *e, uint32_t off, uint32_t len)
{
    st(e, off, SEG_HDR(SEG_ID(ld(e, off)), len));
}

static uint32_t stride_of(tly_agg_kind_t kind)
{
    return kind == TLY_AGG_COUNT ? 1 : 2;
}

static void cell_load(const ent_t *e, uint32_t at, tly_agg_kind_t kind, tly_cell_t *c)
{
    uint64_t w0 = ld(e, at);
    if (kind == TLY_AGG_COUNT) {
        c->n = (uint32_t)w0;
        c->flags = 0;
        c->bits = 0;
        return;
    }
    c->n = (uint32_t)w0 & N_MASK;
    c->flags = ((uint32_t)w0 & FLOAT_BIT) ? TLY_CELL_FLOAT : 0;
    c->bits = (int64_t)ld(e, at + 1);
}

static void cell_store(ent_t *e, uint32_t at, uint32_t bucket, tly_agg_kind_t kind,
                       const tly_cell_t *c)
{
    if (kind == TLY_AGG_COUNT) {
        st(e, at, (uint64_t)bucket << 32 | c->n);
        return;
    }
    uint32_t n = c->n > N_MASK ? N_MASK : c->n;
    uint32_t fl = (c->flags & TLY_CELL_FLOAT) ? FLOAT_BIT : 0;
    st(e, at, (uint64_t)bucket << 32 | fl | n);
    st(e, at + 1, (uint64_t)c->bits);
}

/* Adds v at `bucket` to segment sid, pruning buckets below keep_lo. */
static void win_update(tly_store_t *store, ent_t **entp, uint32_t sid, tly_agg_kind_t kind,
                       uint32_t bucket, uint32_t keep_lo, const tly_value_t *v)
{
    uint32_t sw = stride_of(kind);
    uint32_t off = seg_get(store, entp, sid, 0);
    ent_t *e = *entp;
    uint32_t len = SEG_LEN(ld(e, off));
    uint32_t p = off + 1;

    uint32_t drop = 0;
    while (drop < len && (uint32_t)(ld(e, p + drop) >> 32) < keep_lo)
        drop += sw;
    if (drop) {
        words_close(e, p, drop);
        len -= drop;
        seg_set_len(e, off, len);
    }

    uint32_t i = len;
    while (i >= sw) {
        uint32_t eb = (uint32_t)(ld(e, p + i - sw) >> 32);
        if (eb == bucket) {
            tly_cell_t c;
            cell_load(e, p + i - sw, kind, &c);
            tly_agg_cell_add(kind, &c, v);
            cell_store(e, p + i - sw, bucket, kind, &c);
            if (drop)
                words_maybe_shrink(store, entp);
            return;
        }
        if (eb < bucket)
            break;
        i -= sw;
    }
    words_reserve(store, entp, sw);
    e = *entp;
    words_open(e, p + i, sw);
    tly_cell_t c = TLY_CELL_INIT;
    tly_agg_cell_add(kind, &c, v);
    cell_store(e, p + i, bucket, kind, &c);
    seg_set_len(e, off, len + sw);
}

#define TAG(type, len) ((uint64_t)(type) | ((uint64_t)(len) << 8))
#define TAG_TYPE(w) ((tly_vtype_t)((w)&0xff))
#define TAG_LEN(w) ((uint32_t)((w) >> 8))

static uint32_t value_words(const tly_value_t *v)
{
    switch (v->type) {
    case TLY_V_INT:
    case TLY_V_DOUBLE:
    case TLY_V_BOOL:
        return 2;
    case TLY_V_STR:
        return 1 + (v->len + 7) / 8;
    default:
        return 1;
    }
}

static void item_write(ent_t *e, uint32_t at, const tly_feat_t *feat, const tly_event_t *ev,
                       uint32_t words)
{
    st(e, at, words | (uint64_t)feat->nvalues << 32);
    st(e, at + 1, (uint64_t)ev->time_ms);
    uint32_t q = at + 2;
    for (size_t i = 0; i < feat->nvalues; i++) {
        const tly_value_t *v = &ev->vals[feat->values[i]];
        switch (v->type) {
        case TLY_V_INT:
        case TLY_V_BOOL:
            st(e, q++, TAG(v->type, 0));
            st(e, q++, (uint64_t)v->u.i);
            break;
        case TLY_V_DOUBLE: {
            uint64_t bits;
            memcpy(&bits, &v->u.d, 8);
            st(e, q++, TAG(v->type, 0));
            st(e, q++, bits);
            break;
        }
        case TLY_V_STR:
            st(e, q++, TAG(v->type, v->len));
            for (uint32_t o = 0; o < v->len; o += 8) {
                uint64_t w = 0;
                memcpy(&w, v->u.s + o, v->len - o < 8 ? v->len - o : 8);
                st(e, q++, w);
            }
            break;
        default:
            st(e, q++, TAG(TLY_V_NIL, 0));
            break;
        }
    }
    st(e, q, words);
}

/* Inserts the event as an item of last/last_k feature feat, ordered by time
 * (equal times keep arrival order), keeping at most k (+ slack) items. */
static void lastk_update(tly_store_t *store, ent_t **entp, uint32_t sid, const tly_feat_t *feat,
                         const tly_event_t *ev)
{
    uint32_t off = seg_get(store, entp, sid, 1);
    ent_t *e = *entp;
    uint32_t len = SEG_LEN(ld(e, off));
    uint32_t p = off + 1;
    uint64_t count = ld(e, p);

    uint32_t at = p + len;
    while (at > p + 1) {
        uint32_t iw = (uint32_t)ld(e, at - 1);
        if (iw < 3 || iw > at - (p + 1))
            break;
        if ((int64_t)ld(e, at - iw + 1) <= ev->time_ms)
            break;
        at -= iw;
    }
    if (count >= feat->k && at == p + 1)
        return; /* older than all k kept items: it would be trimmed at once */

    uint32_t words = 3;
    for (size_t i = 0; i < feat->nvalues; i++)
        words += value_words(&ev->vals[feat->values[i]]);
    words_reserve(store, entp, words); /* offsets survive a regrow */
    e = *entp;
    words_open(e, at, words);
    item_write(e, at, feat, ev, words);
    len += words;
    count++;

    uint32_t slack = feat->k / 8 + 1;
    if (count >= (uint64_t)feat->k + slack) {
        uint64_t trim = count - feat->k;
        uint32_t q = p + 1, tw = 0;
        for (uint64_t t = 0; t < trim; t++) {
            uint32_t iw = (uint32_t)ld(e, q);
            q += iw;
            tw += iw;
        }
        words_close(e, p + 1, tw);
        len -= tw;
        count -= trim;
        st(e, p, count);
        seg_set_len(e, off, len);
        words_maybe_shrink(store, entp);
        return;
    }
    st(e, p, count);
    seg_set_len(e, off, len);
}

/* ---- compact encoding: the event log ----------------------------------- */

/* Up to COMPACT_MAX_EVENTS records decoded from a log. */
typedef struct {
    int64_t t;
    uint64_t mask;
    uint32_t pos; /* arrival order */
    tly_value_t vals[TLY_MAX_ITEM_VALUES];
} rec_t;

typedef struct {
    uint8_t bytes[COMPACT_MAX_BYTES + 8];
    size_t nbytes;
    rec_t recs[COMPACT_MAX_EVENTS];
    size_t nrecs;
} log_t;

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

static bool get_varint(const uint8_t *p, size_t end, size_t *at, uint64_t *v)
{
    uint64_t r = 0;
    for (unsigned shift = 0; shift < 64 && *at < end; shift += 7) {
        uint8_t b = p[(*at)++];
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return true;
        }
    }
    return false;
}

static uint64_t zigzag(int64_t v)
{
    return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
}

static int64_t unzigzag(uint64_t v)
{
    return (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
}

/* Returns the intern id of s[0..len), inserting it if there is room, or -1. */
static int intern_get(tly_store_t *store, const char *s, uint32_t len)
{
    if (len > INTERN_MAXLEN)
        return -1;
    uint32_t h = (uint32_t)hash_bytes(0x51ed27, s, len) & (INTERN_SLOTS - 1);
    istr_t *mine = NULL;
    for (uint32_t probe = 0; probe < INTERN_SLOTS; probe++, h = (h + 1) & (INTERN_SLOTS - 1)) {
        istr_t *cur = atomic_load_explicit(&store->intern[h], memory_order_acquire);
        if (!cur) {
            if (atomic_load_explicit(&store->ninterned, memory_order_relaxed) >= INTERN_MAX)
                break;
            if (!mine) {
                mine = xmalloc(sizeof *mine + len);
                mine->len = len;
                memcpy(mine->s, s, len);
            }
            if (atomic_compare_exchange_strong_explicit(&store->intern[h], &cur, mine,
                                                        memory_order_release,
                                                        memory_order_acquire)) {
                atomic_fetch_add_explicit(&store->ninterned, 1, memory_order_relaxed);
                stat_add(&my_stats(store)->bytes, (int64_t)malloc_usable_size(mine));
                stat_add(&my_stats(store)->interned_bytes, (int64_t)malloc_usable_size(mine));
                return (int)h;
            }
        }
        if (cur->len == len && memcmp(cur->s, s, len) == 0) {
            free(mine);
            return (int)h;
        }
    }
    free(mine);
    return -1;
}

/* Copies the log of a compact record into lg->bytes (reader or writer). */
static void log_copy(const ent_t *e, log_t *lg)
{
    uint32_t n = used_of(e);
    if (n > COMPACT_MAX_BYTES)
        n = COMPACT_MAX_BYTES;
    for (uint32_t w = 0; w * 8 < n; w++) {
        uint64_t v = ld(e, w);
        for (int b = 0; b < 8; b++)
            lg->bytes[w * 8 + (uint32_t)b] = (uint8_t)(v >> (8 * b));
    }
    lg->nbytes = n;
}

/* Decodes lg->bytes into records; strings point into the log or the intern
 * table. Returns false on a malformed (torn) log. */
static bool log_decode(const tly_store_t *store, const etype_t *et, log_t *lg)
{
    size_t at = 0;
    int64_t t = 0;
    lg->nrecs = 0;
    while (at < lg->nbytes) {
        if (lg->nrecs == COMPACT_MAX_EVENTS)
            return false;
        rec_t *r = &lg->recs[lg->nrecs];
        uint64_t v;
        if (!get_varint(lg->bytes, lg->nbytes, &at, &v))
            return false;
        t += unzigzag(v);
        r->t = t;
        r->pos = (uint32_t)lg->nrecs;
        if (!get_varint(lg->bytes, lg->nbytes, &at, &r->mask))
            return false;
        size_t tagbytes = (et->nvf + 3) / 4;
        if (at + tagbytes > lg->nbytes)
            return false;
        const uint8_t *tags = lg->bytes + at;
        at += tagbytes;
        for (uint32_t j = 0; j < et->nvf; j++) {
            tly_value_t *val = &r->vals[j];
            switch ((tags[j / 4] >> (2 * (j % 4))) & 3) {
            case TAG_NIL:
                val->type = TLY_V_NIL;
                break;
            case TAG_INT:
                if (!get_varint(lg->bytes, lg->nbytes, &at, &v))
                    return false;
                val->type = TLY_V_INT;
                val->u.i = unzigzag(v);
                break;
            case TAG_DBL:
                if (at + 8 > lg->nbytes)
                    return false;
                val->type = TLY_V_DOUBLE;
                memcpy(&val->u.d, lg->bytes + at, 8);
                at += 8;
                break;
            default:
                if (!get_varint(lg->bytes, lg->nbytes, &at, &v))
                    return false;
                val->type = TLY_V_STR;
                if (v & 1) {
                    if ((v >> 1) >= INTERN_SLOTS)
                        return false;
                    istr_t *is = atomic_load_explicit(
                        &((tly_store_t *)(uintptr_t)store)->intern[v >> 1], memory_order_acquire);
                    if (!is)
                        return false;
                    val->len = is->len;
                    val->u.s = is->s;
                } else {
                    if ((v >> 1) > lg->nbytes - at)
                        return false;
                    val->len = (uint32_t)(v >> 1);
                    val->u.s = (const char *)lg->bytes + at;
                    at += v >> 1;
                }
                break;
            }
        }
        lg->nrecs++;
    }
    return true;
}

/* Encodes one event for entity type et with feature mask into out (at most
 * cap bytes). Returns the length, or 0 when it does not fit. */
static size_t rec_encode(tly_store_t *store, const etype_t *et, const tly_event_t *ev,
                         int64_t prev_t, uint64_t mask, uint8_t *out, size_t cap)
{
    uint8_t buf[COMPACT_MAX_BYTES + 32];
    size_t n = 0;
    n += put_varint(buf + n, zigzag(ev->time_ms - prev_t));
    n += put_varint(buf + n, mask);
    size_t tagat = n, tagbytes = (et->nvf + 3) / 4;
    memset(buf + n, 0, tagbytes);
    n += tagbytes;
    for (uint32_t j = 0; j < et->nvf; j++) {
        const tly_value_t *v = &ev->vals[et->vf[j]];
        unsigned tag = TAG_NIL;
        if (n + 16 > sizeof buf)
            return 0;
        switch (v->type) {
        case TLY_V_INT:
        case TLY_V_BOOL:
            tag = TAG_INT;
            n += put_varint(buf + n, zigzag(v->u.i));
            break;
        case TLY_V_DOUBLE:
            tag = TAG_DBL;
            memcpy(buf + n, &v->u.d, 8);
            n += 8;
            break;
        case TLY_V_STR: {
            tag = TAG_STR;
            int id = intern_get(store, v->u.s, v->len);
            if (id >= 0) {
                n += put_varint(buf + n, (uint64_t)id << 1 | 1);
            } else {
                if (n + 10 + v->len > sizeof buf)
                    return 0;
                n += put_varint(buf + n, (uint64_t)v->len << 1);
                memcpy(buf + n, v->u.s, v->len);
                n += v->len;
            }
            break;
        }
        default:
            break;
        }
        buf[tagat + j / 4] |= (uint8_t)(tag << (2 * (j % 4)));
    }
    if (n > cap)
        return 0;
    memcpy(out, buf, n);
    return n;
}

/* Writes bytes[from, to) of lg into the record's words. */
static void log_store(ent_t *e, const log_t *lg, size_t from, size_t to)
{
    for (size_t w = from / 8; w * 8 < to; w++) {
        uint64_t v = 0;
        for (int b = 0; b < 8; b++) {
            size_t i = w * 8 + (size_t)b;
            if (i < to)
                v |= (uint64_t)lg->bytes[i] << (8 * b);
        }
        st(e, (uint32_t)w, v);
    }
    atomic_store_explicit(&e->used, (uint32_t)to, memory_order_relaxed);
}

static void ev_from_rec(const tly_featset_t *fs, const etype_t *et, const rec_t *r,
                        tly_event_t *ev)
{
    memset(ev->vals, 0, sizeof ev->vals[0] * fs->nfields);
    ev->nfields = (uint32_t)fs->nfields;
    ev->time_ms = r->t;
    for (uint32_t j = 0; j < et->nvf; j++)
        ev->vals[et->vf[j]] = r->vals[j];
}

/* Applies one accepted event to a word-encoded record. */
static void words_apply(tly_store_t *store, ent_t **entp, const tly_entity_t *etype,
                        uint64_t mask, const uint32_t *feats, uint32_t nfeats,
                        const tly_event_t *ev, int64_t now_ms)
{
    const tly_featset_t *fs = store->fs;
    for (uint32_t fi = 0; fi < nfeats; fi++) {
        const tly_feat_t *feat = feats ? &fs->feats[feats[fi]] : &fs->feats[etype->feats[fi]];
        if (!feats && !(mask & (UINT64_C(1) << feat->slot)))
            continue;
        uint32_t sid = feat->slot * TLY_MAX_WINDOWS;
        if (!tly_agg_windowed(feat->agg)) {
            lastk_update(store, entp, sid, feat, ev);
            continue;
        }
        const tly_value_t *v = feat->nvalues ? &ev->vals[feat->values[0]] : NULL;
        for (size_t w = 0; w < feat->nwindows; w++) {
            const tly_window_t *win = &feat->windows[w];
            int64_t lo, hi;
            tly_window_range(now_ms, win->len_ms, win->hop_ms, &lo, &hi);
            int64_t bk = tly_window_bucket(ev->time_ms, win->hop_ms);
            if (bk < lo || bk < 0 || bk > UINT32_MAX)
                continue; /* outside this window; longer ones take it */
            win_update(store, entp, sid + (uint32_t)w, feat->agg, (uint32_t)bk,
                       lo < 0 ? 0 : (uint32_t)lo, v);
        }
    }
    ent_t *e = *entp;
    if (ev->time_ms > (int64_t)ld(e, 0))
        st(e, 0, (uint64_t)ev->time_ms);
}

/* Replays a compact record's log into the word encoding. */
static void compact_to_words(tly_store_t *store, ent_t **entp, int64_t now_ms)
{
    const tly_featset_t *fs = store->fs;
    ent_t *old = *entp;
    const etype_t *et = &store->etypes[old->type];
    const tly_entity_t *etype = &fs->entities[old->type];
    static _Thread_local log_t lg;
    log_copy(old, &lg);
    if (!log_decode(store, et, &lg)) {
        fprintf(stderr, "tallyd: corrupt compact entity state\n");
        abort();
    }
    /* Strings may point into lg.bytes: keep lg intact while replaying. */
    ent_regrow(store, entp, F_WORDS, 16, 0);
    ent_t *e = *entp;
    st(e, 0, (uint64_t)INT64_MIN);
    atomic_store_explicit(&e->used, 1, memory_order_relaxed);
    tly_event_t ev;
    for (size_t i = 0; i < lg.nrecs; i++) {
        ev_from_rec(fs, et, &lg.recs[i], &ev);
        words_apply(store, entp, etype, lg.recs[i].mask, NULL, (uint32_t)etype->nfeats, &ev,
                    now_ms);
    }
}

/* Appends the event to a compact record (converting it when full). */
static void compact_apply(tly_store_t *store, ent_t **entp, const tly_entity_t *etype,
                          uint64_t mask, const uint32_t *feats, uint32_t nfeats,
                          const tly_event_t *ev, int64_t now_ms)
{
    ent_t *e = *entp;
    const etype_t *et = &store->etypes[e->type];
    static _Thread_local log_t lg;
    log_copy(e, &lg);
    /* the previous record's time: decode (cheap: a few records) */
    int64_t prev = 0;
    size_t nrecs = 0;
    if (lg.nbytes) {
        if (!log_decode(store, et, &lg)) {
            fprintf(stderr, "tallyd: corrupt compact entity state\n");
            abort();
        }
        prev = lg.recs[lg.nrecs - 1].t;
        nrecs = lg.nrecs;
    }
    size_t n = nrecs < COMPACT_MAX_EVENTS
                   ? rec_encode(store, et, ev, prev, mask, lg.bytes + lg.nbytes,
                                COMPACT_MAX_BYTES - lg.nbytes)
                   : 0;
    if (n == 0) {
        compact_to_words(store, entp, now_ms);
        words_apply(store, entp, etype, mask, feats, nfeats, ev, now_ms);
        return;
    }
    size_t need = lg.nbytes + n;
    if ((need + 7) / 8 > e->cap) {
        ent_regrow(store, entp, 0, (uint32_t)((need + 7) / 8), 0);
        e = *entp;
        log_store(e, &lg, 0, need);
        return;
    }
    log_store(e, &lg, lg.nbytes, need);
}

/* ---- public API --------------------------------------------------------- */

tly_store_t *tly_store_new(const tly_featset_t *fs)
{
    tly_store_t *store = xmalloc(sizeof *store);
    memset(store, 0, sizeof *store);
    store->fs = fs;
    store->gen = atomic_fetch_add(&store_gen, 1) + 1;
    pthread_mutex_init(&store->mu, NULL);
    atomic_init(&store->stats, NULL);
    atomic_init(&store->ninterned, 0);
    for (size_t i = 0; i < INTERN_SLOTS; i++)
        atomic_init(&store->intern[i], NULL);

    store->etypes = xmalloc(sizeof *store->etypes * (fs->nentities ? fs->nentities : 1));
    store->vidx = xmalloc(sizeof *store->vidx * (fs->nfeats ? fs->nfeats : 1));
    for (size_t e = 0; e < fs->nentities; e++) {
        etype_t *et = &store->etypes[e];
        const tly_entity_t *ent = &fs->entities[e];
        et->nvf = 0;
        et->compact = ent->nfeats <= COMPACT_MAX_SLOTS;
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

    store->ht = cds_lfht_new_flavor(1024, 1024, 0, CDS_LFHT_AUTO_RESIZE | CDS_LFHT_ACCOUNTING,
                                    tly_rcu_flavor, NULL);
    if (!store->ht) {
        fprintf(stderr, "tallyd: cannot allocate the entity table\n");
        abort();
    }
    return store;
}

void tly_store_free(tly_store_t *store)
{
    if (!store)
        return;
    struct cds_lfht_iter it;
    struct cds_lfht_node *node;
    tly_rcu_read_lock();
    cds_lfht_for_each(store->ht, &it, node)
    {
        ent_t *ent = caa_container_of(node, ent_t, node);
        if (cds_lfht_del(store->ht, node) == 0)
            ent_retire(store, ent);
    }
    tly_rcu_read_unlock();
    tly_rcu_barrier();
    cds_lfht_destroy(store->ht, NULL);
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
    free(store->vidx);
    free(store);
}

/* What one event does to one entity type: its id and the matched features
 * (a run of apply_scratch.feats). */
typedef struct {
    uint32_t entity;
    uint32_t first, nfeats;
    uint64_t mask; /* feature slots, for the compact log */
    size_t idlen;
    char id[TLY_MAX_ID];
} plan_t;

/* Per-thread scratch of tly_store_apply (too large for the stack). */
static _Thread_local struct {
    plan_t plans[TLY_MAX_ENTITIES];
    uint32_t feats[TLY_MAX_FEATURES];
} apply_scratch;

/* The earliest event time that can still change an answer of feat at now:
 * the start of its widest window range, or now − idle_ttl for last/last_k. */
static int64_t feat_earliest(const tly_feat_t *feat, int64_t now_ms)
{
    if (feat->nwindows == 0)
        return now_ms - feat->horizon_ms;
    int64_t earliest = INT64_MAX;
    for (size_t w = 0; w < feat->nwindows; w++) {
        int64_t s = tly_window_start(now_ms, feat->windows[w].len_ms, feat->windows[w].hop_ms);
        if (s < earliest)
            earliest = s;
    }
    return earliest;
}

tly_err_t tly_store_apply(tly_store_t *store, const tly_event_t *ev, int32_t partition,
                          int64_t offset, int64_t now_ms)
{
    const tly_featset_t *fs = store->fs;
    (void)offset;
    (void)partition;
    tly_err_t first_drop = TLY_OK;

    if (ev->time_ms > now_ms + fs->max_future_skew_ms) {
        stat_drop(store, TLY_E_EV_FUTURE);
        return TLY_E_EV_FUTURE;
    }
    if (ev->time_ms < 0) {
        stat_drop(store, TLY_E_EV_BAD_TIME);
        return TLY_E_EV_BAD_TIME;
    }

    /* Phase 1: decide everything that can reject the event, so a rejected
     * event changes nothing. Plans are built per entity type. */
    plan_t *plans = apply_scratch.plans;
    uint32_t *matched = apply_scratch.feats;
    size_t nplans = 0, nmatched = 0;
    for (uint32_t e = 0; e < fs->nentities; e++) {
        const tly_entity_t *et = &fs->entities[e];
        plan_t *pl = NULL;
        for (size_t i = 0; i < et->nfeats; i++) {
            const tly_feat_t *feat = &fs->feats[et->feats[i]];
            if (!tly_feat_match(feat, ev))
                continue;
            if (tly_agg_numeric(feat->agg)) {
                const tly_value_t *v = &ev->vals[feat->values[0]];
                if (v->type == TLY_V_NIL)
                    continue; /* numeric aggregations count events carrying the value */
                if (v->type != TLY_V_INT && v->type != TLY_V_DOUBLE) {
                    stat_drop(store, TLY_E_EV_WRONG_TYPE);
                    return TLY_E_EV_WRONG_TYPE;
                }
            } else if (!tly_agg_windowed(feat->agg)) {
                for (size_t j = 0; j < feat->nvalues; j++) {
                    const tly_value_t *v = &ev->vals[feat->values[j]];
                    if (v->type == TLY_V_STR && v->len > fs->max_string) {
                        stat_drop(store, TLY_E_EV_VALUE_TOO_LONG);
                        return TLY_E_EV_VALUE_TOO_LONG;
                    }
                }
            }
            if (ev->time_ms < feat_earliest(feat, now_ms)) {
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
                tly_err_t err = tly_entity_id(fs, e, ev, pl->id, sizeof pl->id, &pl->idlen);
                if (err == TLY_OK && pl->idlen > UINT8_MAX)
                    err = TLY_E_EV_VALUE_TOO_LONG;
                if (err != TLY_OK) {
                    stat_drop(store, err);
                    return err;
                }
                nplans++;
            }
            matched[nmatched++] = et->feats[i];
            pl->nfeats++;
            if (feat->slot < 64)
                pl->mask |= UINT64_C(1) << feat->slot;
        }
    }

    /* Phase 2: apply, one record lock per entity. */
    tstats_t *ts = my_stats(store);
    tly_rcu_read_lock();
    for (size_t pi = 0; pi < nplans; pi++) {
        plan_t *pl = &plans[pi];
        ent_t *ent = ent_get_locked(store, pl->entity, pl->id, pl->idlen);
        const tly_entity_t *etype = &fs->entities[pl->entity];
        if (is_words(ent))
            words_apply(store, &ent, etype, pl->mask, matched + pl->first, pl->nfeats, ev,
                        now_ms);
        else
            compact_apply(store, &ent, etype, pl->mask, matched + pl->first, pl->nfeats, ev,
                          now_ms);
        ent_unlock(ent);
        stat_add(&ts->updates, pl->nfeats);
    }
    tly_rcu_read_unlock();
    if (nplans)
        stat_add(&ts->applied, 1);
    return nplans ? TLY_OK : first_drop;
}

/* ---- reads -------------------------------------------------------------- */

/* Copies s[0..len) into strbuf; false when it does not fit. */
static bool keep_str(const char *s, uint32_t len, char *strbuf, size_t strcap, size_t *sused,
                     const char **out)
{
    if (*sused + len > strcap)
        return false;
    memcpy(strbuf + *sused, s, len);
    *out = strbuf + *sused;
    *sused += len;
    return true;
}

/* Decodes the word-encoded item whose header is at q (bounded by end). */
static bool item_read(const ent_t *e, uint32_t q, uint32_t end, tly_item_t *it, char *strbuf,
                      size_t strcap, size_t *sused, bool *full)
{
    uint64_t h = ld(e, q);
    uint32_t words = (uint32_t)h, nv = (uint32_t)(h >> 32);
    if (words < 3 || words > end - q || nv > TLY_MAX_ITEM_VALUES)
        return false;
    it->time_ms = (int64_t)ld(e, q + 1);
    it->nvals = nv;
    uint32_t r = q + 2, stop = q + words - 1;
    for (uint32_t i = 0; i < nv; i++) {
        if (r >= stop)
            return false;
        uint64_t tag = ld(e, r++);
        tly_value_t *v = &it->vals[i];
        v->type = TAG_TYPE(tag);
        switch (v->type) {
        case TLY_V_INT:
        case TLY_V_BOOL:
        case TLY_V_DOUBLE: {
            if (r >= stop)
                return false;
            uint64_t w = ld(e, r++);
            if (v->type == TLY_V_DOUBLE)
                memcpy(&v->u.d, &w, 8);
            else
                v->u.i = (int64_t)w;
            break;
        }
        case TLY_V_STR: {
            uint32_t len = TAG_LEN(tag);
            if ((uint64_t)r + (len + 7) / 8 > stop)
                return false;
            if (*sused + len > strcap) {
                *full = true;
                return false;
            }
            char *dst = strbuf + *sused;
            for (uint32_t o = 0; o < len; o += 8) {
                uint64_t w = ld(e, r + o / 8);
                memcpy(dst + o, &w, len - o < 8 ? len - o : 8);
            }
            v->len = len;
            v->u.s = dst;
            *sused += len;
            r += (len + 7) / 8;
            break;
        }
        default:
            v->type = TLY_V_NIL;
            break;
        }
    }
    return true;
}

/* Reads up to cap of the k newest items of the last/last_k segment at off,
 * newest first, keeping those in [since_ms, asof_ms]; items == NULL only
 * counts. Sets *bad on torn data, *full when strbuf overflowed. */
static size_t words_recent(const ent_t *e, uint32_t off, uint32_t used, uint32_t k,
                           int64_t since_ms, int64_t asof_ms, tly_item_t *items, size_t cap,
                           char *strbuf, size_t strcap, size_t *sused, bool *bad, bool *full)
{
    uint32_t len = SEG_LEN(ld(e, off));
    uint32_t p = off + 1;
    if (len < 1 || (uint64_t)p + len > used) {
        *bad = true;
        return 0;
    }
    uint32_t at = p + len;
    size_t n = 0, seen = 0;
    while (at > p + 1 && n < cap && seen < k) {
        uint32_t iw = (uint32_t)ld(e, at - 1);
        if (iw < 3 || iw > at - (p + 1)) {
            *bad = true;
            return n;
        }
        at -= iw;
        seen++;
        int64_t t = (int64_t)ld(e, at + 1);
        if (t > asof_ms)
            continue;
        if (t < since_ms)
            break;
        if (items && !item_read(e, at, at + iw, &items[n], strbuf, strcap, sused, full)) {
            *bad = !*full;
            return n;
        }
        n++;
    }
    return n;
}

/* The k newest records of lg that slot takes, newest first (time, then
 * arrival), filtered to [since_ms, asof_ms]. Returns how many, in idx. */
static size_t log_recent(const log_t *lg, uint32_t slot, uint32_t k, int64_t since_ms,
                         int64_t asof_ms, size_t cap, uint32_t *idx)
{
    uint32_t top[COMPACT_MAX_EVENTS];
    size_t ntop = 0;
    for (size_t i = 0; i < lg->nrecs; i++) {
        const rec_t *r = &lg->recs[i];
        if (slot >= 64 || !(r->mask & (UINT64_C(1) << slot)))
            continue;
        size_t pos = ntop;
        while (pos > 0 && lg->recs[top[pos - 1]].t <= r->t)
            pos--;
        for (size_t q = ntop; q > pos; q--)
            top[q] = top[q - 1];
        top[pos] = (uint32_t)i;
        ntop++;
    }
    if (ntop > k)
        ntop = k;
    size_t n = 0;
    for (size_t q = 0; q < ntop && n < cap; q++) {
        int64_t t = lg->recs[top[q]].t;
        if (t > asof_ms)
            continue;
        if (t < since_ms)
            break;
        idx[n++] = top[q];
    }
    return n;
}

/* Fills an item from record r for feature feat. */
static bool item_from_rec(const tly_store_t *store, const tly_feat_t *feat, const rec_t *r,
                          tly_item_t *it, char *strbuf, size_t strcap, size_t *sused)
{
    it->time_ms = r->t;
    it->nvals = (uint32_t)feat->nvalues;
    for (size_t v = 0; v < feat->nvalues; v++) {
        const tly_value_t *src = &r->vals[store->vidx[feat->id][v]];
        it->vals[v] = *src;
        if (src->type == TLY_V_STR &&
            !keep_str(src->u.s, src->len, strbuf, strcap, sused, &it->vals[v].u.s))
            return false;
    }
    return true;
}

/* One windowed value from a compact log. */
static tly_value_t log_value(const tly_store_t *store, const log_t *lg, const tly_feat_t *feat,
                             uint32_t window, int64_t now_ms)
{
    const tly_window_t *win = &feat->windows[window];
    int64_t lo, hi;
    tly_window_range(now_ms, win->len_ms, win->hop_ms, &lo, &hi);
    tly_cell_t acc = TLY_CELL_INIT;
    uint32_t vi = feat->nvalues ? store->vidx[feat->id][0] : 0;
    for (size_t i = 0; i < lg->nrecs; i++) {
        const rec_t *r = &lg->recs[i];
        if (feat->slot >= 64 || !(r->mask & (UINT64_C(1) << feat->slot)))
            continue;
        int64_t b = tly_window_bucket(r->t, win->hop_ms);
        if (b < lo || b > hi)
            continue;
        tly_cell_t c = TLY_CELL_INIT;
        tly_agg_cell_add(feat->agg, &c, feat->nvalues ? &r->vals[vi] : NULL);
        tly_agg_cell_merge(feat->agg, &acc, &c);
    }
    return tly_agg_result(feat->agg, &acc);
}

/* One windowed value from a word-encoded record. */
static tly_value_t words_value(const ent_t *e, uint32_t used, const tly_feat_t *feat,
                               uint32_t window, int64_t now_ms, bool *bad)
{
    const tly_window_t *win = &feat->windows[window];
    int64_t lo, hi;
    tly_window_range(now_ms, win->len_ms, win->hop_ms, &lo, &hi);
    tly_cell_t acc = TLY_CELL_INIT;
    bool found;
    uint32_t off = seg_find(e, used, feat->slot * TLY_MAX_WINDOWS + window, &found);
    if (found) {
        uint32_t len = SEG_LEN(ld(e, off)), sw = stride_of(feat->agg);
        if ((uint64_t)off + 1 + len > used) {
            *bad = true;
            return acc.n ? tly_agg_result(feat->agg, &acc) : (tly_value_t){.type = TLY_V_NIL};
        }
        for (uint32_t i = 0; i + sw <= len; i += sw) {
            int64_t bk = (int64_t)(ld(e, off + 1 + i) >> 32);
            if (bk < lo || bk > hi)
                continue;
            tly_cell_t c;
            cell_load(e, off + 1 + i, feat->agg, &c);
            tly_agg_cell_merge(feat->agg, &acc, &c);
        }
    }
    return tly_agg_result(feat->agg, &acc);
}

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
        if (atomic_load_explicit(&ent->flags, memory_order_relaxed) & F_DEAD) {
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

tly_err_t tly_store_read(tly_store_t *store, uint32_t entity, const char *id, size_t idlen,
                         const tly_featwin_t *req, size_t n, int64_t now_ms, tly_value_t *out,
                         int64_t *last_ms, char *strbuf, size_t strcap)
{
    const tly_featset_t *fs = store->fs;
    static _Thread_local log_t lg;
    tly_err_t err = TLY_OK;
    ent_t *ent = NULL;
    tly_rcu_read_lock();
    for (;;) {
        uint32_t s0 = 0;
        ent = read_begin(store, ent, entity, id, idlen, &s0);
        bool bad = false, full = false, words = ent && is_words(ent);
        uint32_t used = ent ? used_of(ent) : 0;
        size_t sused = 0;
        int64_t last = -1;
        err = TLY_OK;
        if (ent && !words) {
            log_copy(ent, &lg);
            bad = !log_decode(store, &store->etypes[entity], &lg);
            for (size_t i = 0; i < lg.nrecs; i++)
                last = lg.recs[i].t > last ? lg.recs[i].t : last;
        } else if (ent) {
            last = (int64_t)ld(ent, 0);
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
                    *o = log_value(store, &lg, feat, req[r].window, now_ms);
                } else {
                    *o = words_value(ent, used, feat, req[r].window, now_ms, &bad);
                }
                continue;
            }
            /* last: the newest item's first value; last_k: its item count */
            uint32_t k = feat->agg == TLY_AGG_LAST ? 1 : feat->k;
            int64_t since = now_ms - feat->horizon_ms;
            tly_item_t it;
            size_t got = 0;
            if (ent && !words) {
                uint32_t idx[COMPACT_MAX_EVENTS];
                got = log_recent(&lg, feat->slot, k, since, now_ms, k, idx);
                if (got && feat->agg == TLY_AGG_LAST &&
                    !item_from_rec(store, feat, &lg.recs[idx[0]], &it, strbuf, strcap, &sused))
                    full = true;
            } else if (ent) {
                bool found;
                uint32_t off = seg_find(ent, used, feat->slot * TLY_MAX_WINDOWS, &found);
                if (found)
                    got = words_recent(ent, off, used, k, since, now_ms,
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
        if (!ent || (read_valid(ent, s0) && !bad)) {
            if (full)
                err = TLY_E_FULL;
            if (last_ms)
                *last_ms = last;
            break;
        }
    }
    tly_rcu_read_unlock();
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
    ent_t *ent = NULL;
    tly_rcu_read_lock();
    for (;;) {
        uint32_t s0 = 0;
        ent = read_begin(store, ent, entity, id, idlen, &s0);
        if (!ent) {
            got = 0;
            break;
        }
        bool bad = false, full = false;
        size_t sused = 0;
        uint32_t used = used_of(ent);
        got = 0;
        if (!is_words(ent)) {
            uint32_t idx[COMPACT_MAX_EVENTS];
            log_copy(ent, &lg);
            bad = !log_decode(store, &store->etypes[entity], &lg);
            size_t m = bad ? 0 : log_recent(&lg, feat->slot, feat->k, since_ms, asof_ms, cap, idx);
            for (size_t q = 0; q < m && !full; q++) {
                if (item_from_rec(store, feat, &lg.recs[idx[q]], &items[got], strbuf, strcap,
                                  &sused))
                    got++;
                else
                    full = true;
            }
        } else {
            bool found;
            uint32_t off = seg_find(ent, used, feat->slot * TLY_MAX_WINDOWS, &found);
            if (found)
                got = words_recent(ent, off, used, feat->k, since_ms, asof_ms, items, cap, strbuf,
                                   strcap, &sused, &bad, &full);
        }
        if (read_valid(ent, s0) && !bad) {
            if (full)
                err = TLY_E_FULL;
            break;
        }
    }
    tly_rcu_read_unlock();
    *n = got;
    return err;
}

/* ---- expiry and counters ------------------------------------------------- */

size_t tly_store_sweep(tly_store_t *store, int64_t now_ms, size_t max_visit)
{
    const tly_featset_t *fs = store->fs;
    struct cds_lfht_iter it;
    struct cds_lfht_node *node;
    size_t removed = 0, visited = 0;
    tstats_t *ts = my_stats(store);
    static _Thread_local log_t lg;

    /* A record whose newest event is before every feature's earliest
     * relevant time can no longer change any answer at now or later. */
    int64_t earliest[TLY_MAX_ENTITIES];
    for (size_t e = 0; e < fs->nentities; e++) {
        earliest[e] = INT64_MAX;
        for (size_t i = 0; i < fs->entities[e].nfeats; i++) {
            int64_t t = feat_earliest(&fs->feats[fs->entities[e].feats[i]], now_ms);
            earliest[e] = t < earliest[e] ? t : earliest[e];
        }
    }

    tly_rcu_read_lock();
    cds_lfht_for_each(store->ht, &it, node)
    {
        if (max_visit && visited++ >= max_visit)
            break;
        ent_t *ent = caa_container_of(node, ent_t, node);
        tly_lfht_tsan_subscribe();
        ent_lock(ent);
        if (atomic_load_explicit(&ent->flags, memory_order_relaxed) & F_DEAD) {
            ent_unlock(ent);
            continue;
        }
        int64_t last = INT64_MIN;
        if (is_words(ent)) {
            last = (int64_t)ld(ent, 0);
        } else {
            log_copy(ent, &lg);
            if (log_decode(store, &store->etypes[ent->type], &lg))
                for (size_t i = 0; i < lg.nrecs; i++)
                    last = lg.recs[i].t > last ? lg.recs[i].t : last;
        }
        if (last < earliest[ent->type] && cds_lfht_del(store->ht, node) == 0) {
            atomic_store_explicit(&ent->flags,
                                  atomic_load_explicit(&ent->flags, memory_order_relaxed) | F_DEAD,
                                  memory_order_relaxed);
            stat_add(&ts->entities, -1);
            stat_add(&ts->expired, 1);
            ent_unlock(ent);
            ent_retire(store, ent);
            removed++;
            continue;
        }
        ent_unlock(ent);
    }
    tly_rcu_read_unlock();
    return removed;
}

void tly_store_stats(const tly_store_t *store, tly_store_stats_t *out)
{
    memset(out, 0, sizeof *out);
    int64_t ents = 0, bytes = 0;
    for (tstats_t *s = atomic_load_explicit(&store->stats, memory_order_acquire); s;
         s = s->next) {
        ents += atomic_load_explicit(&s->entities, memory_order_relaxed);
        bytes += atomic_load_explicit(&s->bytes, memory_order_relaxed);
        out->events_applied += (uint64_t)atomic_load_explicit(&s->applied, memory_order_relaxed);
        out->updates += (uint64_t)atomic_load_explicit(&s->updates, memory_order_relaxed);
        out->expired += (uint64_t)atomic_load_explicit(&s->expired, memory_order_relaxed);
        out->interned_bytes +=
            (uint64_t)atomic_load_explicit(&s->interned_bytes, memory_order_relaxed);
        for (int i = 0; i < TLY_E__COUNT; i++)
            out->dropped[i] += atomic_load_explicit(&s->dropped[i], memory_order_relaxed);
    }
    out->interned = atomic_load_explicit(&store->ninterned, memory_order_relaxed);
    out->entities = ents > 0 ? (uint64_t)ents : 0;
    out->bytes = bytes > 0 ? (uint64_t)bytes : 0;
}
