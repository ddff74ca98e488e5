/*
 * store_table.c — one shard of the entity table: an open-addressed array of
 * record pointers with linear probing, written by one thread at a time (the
 * shard's mutex) and probed by readers without locks under rcu_read_lock().
 *
 * A slot is one 64-bit word: 0 (empty), TOMB (a removed record), or a
 * record's address in the low 48 bits with 16 bits of its key's hash above
 * them. A probe compares those bits first and loads a record only when they
 * match, so passing the other records of a probe sequence costs no cache
 * miss; the record it loads is the one the caller goes on to use. (ck_hs,
 * used before, stores bare pointers in Debian's build and compares every
 * occupied slot it passes by loading the record.)
 *
 * Concurrency: the writer stores slots with release, readers load them with
 * acquire, so a record's immutable fields are visible to a reader that finds
 * it. A slot only ever changes empty → record, record → its replacement
 * (the same key), record → TOMB, or TOMB → record; a reader that misses a
 * record added or removed while it probed linearises before or after that
 * change. When the array must grow (or be rebuilt without tombstones), the
 * writer fills a new array, publishes it with a release store and frees the
 * old one after a grace period; readers still in the old one see a frozen
 * but valid table. Every array is at most half full (records + tombstones),
 * so every probe reaches an empty slot, and is rebuilt smaller when fewer
 * than a sixteenth of its slots hold records.
 */
#include <stdio.h>
#include <stdlib.h>

#include "store_int.h"

#define TOMB      UINT64_C(1)
#define PTR_BITS  48
#define PTR_MASK  ((UINT64_C(1) << PTR_BITS) - 1)
#define MIN_SLOTS 64

/* Cache lines of a record tbl_prefetch_ent asks for: the header and id
 * (which may straddle into the second line), then the first state words,
 * where the segment walk starts. One writer on the ingest benchmark (row c,
 * best of 3, three rounds): 805/744/752 ns per event with one line,
 * 620/683/656 with four; 6, 8, 12 and 16 lines were no better. */
#define PF_LINES 4

/* The 16 hash bits kept in a slot: above the index bits any shard uses
 * (a shard has far fewer than 2^42 slots) and below the shard-picking top
 * bits (58..63). */
static uint64_t tag_of(unsigned long h)
{
    return ((uint64_t)h >> 42 & 0xffff) << PTR_BITS;
}

static ent_t *slot_ent(uint64_t s)
{
    return (ent_t *)(uintptr_t)(s & PTR_MASK);
}

/* A slot keeps 48 bits of address: true of user-space heap addresses on
 * x86-64 and arm64 Linux, unless the allocator tags its pointers (memory
 * tagging, HWASan), which tbl_init finds out at start-up. */
static void check_addr(const void *p)
{
    if ((uintptr_t)p & ~(uintptr_t)PTR_MASK) {
        fprintf(stderr,
                "tallyd: heap address %p does not fit 48 bits; the entity table "
                "cannot run with a pointer-tagging allocator\n",
                p);
        abort();
    }
}

/* Whether e's key is (type, id[0..len)). A record's id is zero-padded to
 * whole words, so an id of up to sixteen bytes compares by one or two word
 * loads, not a memcmp call. */
static bool key_eq(const ent_t *e, uint32_t type, const char *id, size_t len)
{
    if (e->type != type || e->idlen != len)
        return false;
    if (len == 0)
        return true; /* an empty id has no words: the first word is state */
    const char *k = ent_id(e);
    uint64_t a0, b0;
    memcpy(&a0, k, 8);
    if (len < 8)
        return a0 == tail_bytes(id, len);
    memcpy(&b0, id, 8);
    if (len > 16)
        return a0 == b0 && memcmp(k + 8, id + 8, len - 8) == 0;
    uint64_t a1, b1;
    memcpy(&a1, k + len - 8, 8);
    memcpy(&b1, id + len - 8, 8);
    return ((a0 ^ b0) | (a1 ^ b1)) == 0;
}

static tslots_t *slots_new(size_t n)
{
    tslots_t *a = store_xmalloc(sizeof *a + n * sizeof a->slot[0]);
    a->mask = n - 1;
    atomic_init(&a->frozen, false);
    for (size_t i = 0; i < n; i++)
        atomic_init(&a->slot[i], 0);
    return a;
}

static void deferred_free_cb(struct rcu_head *head)
{
    tly_rcu_tsan_acquire();
    tslots_t *a = caa_container_of(head, tslots_t, rcu);
    free(a);
}

void tbl_init(shard_t *sh, uint64_t seed)
{
    tslots_t *a = slots_new(MIN_SLOTS);
    check_addr(a);
    atomic_init(&sh->arr, a);
    sh->used = 0;
    sh->live = 0;
    sh->seed = seed;
    atomic_init(&sh->bytes, (int64_t)(sizeof(tslots_t) + MIN_SLOTS * sizeof(uint64_t)));
    pthread_mutex_init(&sh->mu, NULL);
}

void tbl_destroy(shard_t *sh)
{
    free(atomic_load_explicit(&sh->arr, memory_order_relaxed));
    pthread_mutex_destroy(&sh->mu);
}

ent_t *tbl_get(const shard_t *sh, unsigned long h, uint32_t type, const char *id, size_t len)
{
    const tslots_t *a = atomic_load_explicit(&sh->arr, memory_order_acquire);
    uint64_t tag = tag_of(h);
    for (size_t i = h & a->mask;; i = (i + 1) & a->mask) {
        uint64_t s = atomic_load_explicit(&a->slot[i], memory_order_acquire);
        if (s == 0)
            return NULL;
        if ((s & ~PTR_MASK) == tag && s != TOMB) {
            ent_t *e = slot_ent(s);
            if (key_eq(e, type, id, len))
                return e;
        }
    }
}

void tbl_prefetch(const shard_t *sh, unsigned long h)
{
    const tslots_t *a = atomic_load_explicit(&sh->arr, memory_order_acquire);
    __builtin_prefetch(&a->slot[h & a->mask]);
}

/* The first record on hash h's probe sequence whose tag matches h's (the
 * key's record, most likely), or NULL; loads no record. */
static const ent_t *tagged(const shard_t *sh, unsigned long h)
{
    const tslots_t *a = atomic_load_explicit(&sh->arr, memory_order_acquire);
    uint64_t tag = tag_of(h);
    for (size_t i = h & a->mask;; i = (i + 1) & a->mask) {
        uint64_t s = atomic_load_explicit(&a->slot[i], memory_order_relaxed);
        if (s == 0)
            return NULL;
        if ((s & ~PTR_MASK) == tag && s != TOMB)
            return slot_ent(s);
    }
}

/* Prefetches the first PF_LINES cache lines of the record the slot of hash
 * h points to, when its tag matches. */
void tbl_prefetch_ent(const shard_t *sh, unsigned long h)
{
    const char *r = (const char *)tagged(sh, h);
    if (r != NULL)
        for (int l = 0; l < PF_LINES; l++)
            __builtin_prefetch(r + 64 * l);
}

void tbl_prefetch_rest(const shard_t *sh, unsigned long h, size_t max_lines)
{
    const ent_t *e = tagged(sh, h);
    if (e == NULL)
        return;
    size_t bytes = (size_t)((const char *)ent_words(e) - (const char *)e) +
                   (is_words(e) ? 8 * (size_t)used_of(e) : used_of(e));
    size_t lines = (bytes + 63) / 64;
    if (lines > max_lines)
        lines = max_lines;
    for (size_t l = PF_LINES; l < lines; l++)
        __builtin_prefetch((const char *)e + 64 * l);
}

/* Rebuilds the array without tombstones at the smallest size that leaves
 * it under half full, and publishes it: grown at half full, an array
 * doubles. Under the shard's mutex. */
static void tbl_rebuild(shard_t *sh)
{
    tslots_t *old = atomic_load_explicit(&sh->arr, memory_order_relaxed);
    /* Frozen before any slot is read: a replacer that finds it unfrozen
     * after its swap knows this copy sees the swap (tbl_replace). */
    atomic_store_explicit(&old->frozen, true, memory_order_seq_cst);
    atomic_thread_fence(memory_order_seq_cst);
    size_t n = MIN_SLOTS;
    while (n <= 2 * (sh->live + 1))
        n *= 2;
    tslots_t *a = slots_new(n);
    for (size_t i = 0; i <= old->mask; i++) {
        /* acquire: a replacement publishes its record without the mutex */
        uint64_t s = atomic_load_explicit(&old->slot[i], memory_order_acquire);
        if (s == 0 || s == TOMB)
            continue;
        const ent_t *e = slot_ent(s);
        size_t j = hash_id(sh->seed, e->type, ent_id(e), e->idlen) & a->mask;
        while (atomic_load_explicit(&a->slot[j], memory_order_relaxed) != 0)
            j = (j + 1) & a->mask;
        atomic_store_explicit(&a->slot[j], s, memory_order_relaxed);
    }
    sh->used = sh->live;
    atomic_store_explicit(&sh->bytes, (int64_t)(sizeof(tslots_t) + n * sizeof(uint64_t)),
                          memory_order_relaxed);
    atomic_store_explicit(&sh->arr, a, memory_order_release);
    tly_rcu_tsan_release();
    tly_call_rcu(&old->rcu, deferred_free_cb);
}

bool tbl_insert(shard_t *sh, unsigned long h, ent_t *e)
{
    check_addr(e);
    if (2 * (sh->used + 1) > atomic_load_explicit(&sh->arr, memory_order_relaxed)->mask + 1)
        tbl_rebuild(sh);
    tslots_t *a = atomic_load_explicit(&sh->arr, memory_order_relaxed);
    uint64_t tag = tag_of(h);
    size_t tomb = SIZE_MAX;
    for (size_t i = h & a->mask;; i = (i + 1) & a->mask) {
        uint64_t s = atomic_load_explicit(&a->slot[i], memory_order_acquire); /* see rebuild */
        if (s == TOMB) {
            if (tomb == SIZE_MAX)
                tomb = i;
            continue;
        }
        if (s == 0) {
            if (tomb == SIZE_MAX) {
                tomb = i;
                sh->used++;
            }
            break;
        }
        if ((s & ~PTR_MASK) == tag && key_eq(slot_ent(s), e->type, ent_id(e), e->idlen))
            return false;
    }
    atomic_store_explicit(&a->slot[tomb], tag | (uint64_t)(uintptr_t)e, memory_order_release);
    sh->live++;
    return true;
}

/* The slot of array a holding the slot word `want` (hash h), or NULL. */
static _Atomic uint64_t *slot_in(tslots_t *a, unsigned long h, uint64_t want)
{
    for (size_t i = h & a->mask;; i = (i + 1) & a->mask) {
        uint64_t s = atomic_load_explicit(&a->slot[i], memory_order_relaxed);
        if (s == 0)
            return NULL;
        if (s == want)
            return &a->slot[i];
    }
}

/* The slot holding `e` in the current array, or NULL. Under the mutex. */
static _Atomic uint64_t *slot_of(shard_t *sh, unsigned long h, const ent_t *e)
{
    return slot_in(atomic_load_explicit(&sh->arr, memory_order_relaxed), h,
                   tag_of(h) | (uint64_t)(uintptr_t)e);
}

/* Without the mutex: nothing but the holder of old's lock changes old's
 * slot, and inserts and removals leave other records' slots alone. Only a
 * rebuild (another writer, under the mutex) can copy the slot before the
 * swap into an array that replaces this one. A rebuild freezes the array
 * (seq_cst store and fence) before reading any slot; the swap is a seq_cst
 * RMW followed by a seq_cst load of the flag. If that load finds the array
 * unfrozen, it precedes the freeze in the single total order, so the
 * rebuild's fence follows the swap and its copy reads the new word. If it
 * finds it frozen, the swap may be lost in the copy: under the mutex
 * (after the rebuild published) the current array gets it. */
bool tbl_replace(shard_t *sh, unsigned long h, const ent_t *old, ent_t *e)
{
    check_addr(e);
    uint64_t from = tag_of(h) | (uint64_t)(uintptr_t)old, to = tag_of(h) | (uint64_t)(uintptr_t)e;
    tslots_t *a = atomic_load_explicit(&sh->arr, memory_order_acquire);
    _Atomic uint64_t *slot = slot_in(a, h, from);
    uint64_t seen = from;
    if (slot != NULL &&
        atomic_compare_exchange_strong_explicit(slot, &seen, to, memory_order_seq_cst,
                                                memory_order_relaxed) &&
        !atomic_load_explicit(&a->frozen, memory_order_seq_cst))
        return true;
    pthread_mutex_lock(&sh->mu);
    tslots_t *cur = atomic_load_explicit(&sh->arr, memory_order_relaxed);
    slot = slot_in(cur, h, from);
    if (slot != NULL)
        atomic_store_explicit(slot, to, memory_order_release);
    bool ok = slot != NULL || slot_in(cur, h, to) != NULL;
    pthread_mutex_unlock(&sh->mu);
    return ok;
}

bool tbl_remove(shard_t *sh, unsigned long h, const ent_t *e)
{
    _Atomic uint64_t *slot = slot_of(sh, h, e);
    if (!slot)
        return false;
    atomic_store_explicit(slot, TOMB, memory_order_release);
    sh->live--;
    if (sh->live * 16 < atomic_load_explicit(&sh->arr, memory_order_relaxed)->mask + 1 &&
        atomic_load_explicit(&sh->arr, memory_order_relaxed)->mask + 1 > MIN_SLOTS)
        tbl_rebuild(sh); /* mostly empty: give the memory back */
    return true;
}

ent_t *tbl_next(const shard_t *sh, size_t *pos)
{
    const tslots_t *a = atomic_load_explicit(&sh->arr, memory_order_acquire);
    while (*pos <= a->mask) {
        uint64_t s = atomic_load_explicit(&a->slot[(*pos)++], memory_order_acquire);
        if (s != 0 && s != TOMB)
            return slot_ent(s);
    }
    return NULL;
}
