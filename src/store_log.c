/*
 * store_log.c — the compact encoding of small records: each record's state
 * is the byte-packed log of its events (layout in store.c's opening
 * comment), answered by folding the log at read time, and replayed into the
 * word encoding once it would outgrow COMPACT_MAX_BYTES.
 * Also the intern table that turns short repeated strings (actions,
 * categories) into two-byte ids inside logs.
 *
 * Writers call in holding the record's lock; readers decode a private copy
 * of the log taken under the seqlock and get false from store_log_decode()
 * when the copy is torn.
 */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>

#include "store_int.h"
#include "tallyd/window.h"

enum { TAG_NIL = 0, TAG_INT = 1, TAG_DBL = 2, TAG_STR = 3 };

/* A bool is logged as TAG_DBL with these NaN bits, its value in the lowest
 * bit: an event's double is always finite, so no double is mistaken for
 * one, and the two-bit tags need no fifth value. (Logs written before bools
 * were kept apart hold them as TAG_INT: they read back as integers.) */
#define LOG_BOOL_BITS UINT64_C(0x7ff8b0010b0010b0)

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
    return ((uint64_t)v << 1) ^ (v < 0 ? UINT64_MAX : 0);
}

static int64_t unzigzag(uint64_t v)
{
    return (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
}

static int intern_insert(tly_store_t *store, const char *s, uint32_t len, uint32_t h);

_Thread_local imemo_t store_imemo[IMEMO_SLOTS];

/* store_intern_get past its thread's memo (slot m). */
int store_intern_find(tly_store_t *store, const char *s, uint32_t len, size_t m)
{
    uint32_t h = (uint32_t)hash_bytes(0x51ed27, s, len) & (INTERN_SLOTS - 1);
    for (uint32_t probe = 0; probe < INTERN_SLOTS; probe++, h = (h + 1) & (INTERN_SLOTS - 1)) {
        istr_t *cur = atomic_load_explicit(&store->intern[h], memory_order_acquire);
        if (!cur)
            return intern_insert(store, s, len, h);
        if (cur->len == len && tly_bytes_eq(cur->s, s, len)) {
            store_imemo[m].gen = store->gen;
            store_imemo[m].is = cur;
            store_imemo[m].id = (int)h;
            return (int)h;
        }
    }
    return -1;
}

/* store_intern_get's insertion, from the empty slot h its probe reached
 * (another writer may fill it first: then the probe goes on). */
static __attribute__((noinline)) int intern_insert(tly_store_t *store, const char *s, uint32_t len,
                                                   uint32_t h)
{
    istr_t *mine = NULL;
    for (uint32_t probe = 0; probe < INTERN_SLOTS; probe++, h = (h + 1) & (INTERN_SLOTS - 1)) {
        istr_t *cur = atomic_load_explicit(&store->intern[h], memory_order_acquire);
        if (!cur) {
            if (atomic_load_explicit(&store->ninterned, memory_order_relaxed) >= INTERN_MAX)
                break;
            if (!mine) {
                mine = store_xmalloc(sizeof *mine + len);
                mine->len = len;
                memcpy(mine->s, s, len);
            }
            if (atomic_compare_exchange_strong_explicit(
                    &store->intern[h], &cur, mine, memory_order_release, memory_order_acquire)) {
                atomic_fetch_add_explicit(&store->ninterned, 1, memory_order_relaxed);
                stat_add(&store_thread_stats(store)->bytes, (int64_t)malloc_usable_size(mine));
                stat_add(&store_thread_stats(store)->interned_bytes,
                         (int64_t)malloc_usable_size(mine));
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
void store_log_copy(const ent_t *e, log_t *lg)
{
    uint32_t n = used_of(e);
    if (n > COMPACT_MAX_BYTES)
        n = COMPACT_MAX_BYTES;
    for (uint32_t w = 0; w * 8 < n; w++) {
        uint64_t v = ld(e, w);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(lg->bytes + w * 8, &v, 8); /* the log's byte order is the host's */
#else
        for (int b = 0; b < 8; b++)
            lg->bytes[w * 8 + (uint32_t)b] = (uint8_t)(v >> (8 * b));
#endif
    }
    lg->nbytes = n;
}

/* Decodes lg->bytes into records; strings point into the log or the intern
 * table. Returns false on a malformed (torn) log. */
bool store_log_decode(const tly_store_t *store, const etype_t *et, log_t *lg)
{
    size_t at = 0;
    int64_t t = 0;
    lg->nrecs = 0;
    while (at < lg->nbytes) {
        if (lg->nrecs == COMPACT_MAX_EVENTS)
            return false;
        rec_t *r = &lg->recs[lg->nrecs];
        uint64_t v;
        int64_t rt;
        if (!get_varint(lg->bytes, lg->nbytes, &at, &v))
            return false;
        /* the first record's time is absolute, the others relative to it;
         * none is negative (tly_store_apply refuses such events), so the
         * difference to a new event's time cannot overflow either */
        if (lg->nrecs == 0)
            rt = unzigzag(v);
        else if (__builtin_add_overflow(t, unzigzag(v), &rt))
            return false;
        if (rt < 0)
            return false;
        if (lg->nrecs == 0)
            t = rt;
        lg->ts[lg->nrecs] = rt;
        if (!get_varint(lg->bytes, lg->nbytes, &at, &lg->masks[lg->nrecs]))
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
            case TAG_DBL: {
                if (at + 8 > lg->nbytes)
                    return false;
                uint64_t bits;
                memcpy(&bits, lg->bytes + at, 8);
                if ((bits & ~UINT64_C(1)) == LOG_BOOL_BITS) {
                    val->type = TLY_V_BOOL;
                    val->u.i = (int64_t)(bits & 1);
                } else {
                    val->type = TLY_V_DOUBLE;
                    memcpy(&val->u.d, &bits, 8);
                }
                at += 8;
                break;
            }
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

/* Encodes one event for entity type et with feature mask into buf
 * (REC_BUF bytes, written past cap as scratch), followed by eight zero
 * bytes. Returns the length, or 0 when it takes more than cap bytes. */
static size_t rec_encode(tly_store_t *store, const etype_t *et, const tly_event_t *ev,
                         int64_t base_t, uint64_t mask, uint8_t *buf, size_t cap)
{
    _Static_assert(REC_BUF >= COMPACT_MAX_BYTES + 32, "room for one value past the cap");
    _Static_assert(TLY_MAX_ITEM_VALUES <= 16, "the tags fit a 32-bit word");
    /* locals, not et's and ev's fields: every byte stored into buf could
     * alias them, and the compiler would load them again after each */
    const uint32_t nvf = et->nvf;
    const uint32_t *vf = et->vf;
    const tly_value_t *vals = ev->vals;
    uint32_t tags = 0;
    size_t n = 0;
    n += put_varint(buf + n, zigzag(ev->time_ms - base_t));
    n += put_varint(buf + n, mask);
    size_t tagat = n, tagbytes = (nvf + 3) / 4;
    n += tagbytes;
    for (uint32_t j = 0; j < nvf; j++) {
        const tly_value_t *v = &vals[vf[j]];
        uint32_t tag = TAG_NIL;
        if (n + 16 > REC_BUF)
            return 0;
        switch (v->type) {
        case TLY_V_INT:
            tag = TAG_INT;
            n += put_varint(buf + n, zigzag(v->u.i));
            break;
        case TLY_V_BOOL: {
            tag = TAG_DBL;
            uint64_t bits = LOG_BOOL_BITS | (v->u.i != 0);
            memcpy(buf + n, &bits, 8);
            n += 8;
            break;
        }
        case TLY_V_DOUBLE:
            tag = TAG_DBL;
            memcpy(buf + n, &v->u.d, 8);
            n += 8;
            break;
        case TLY_V_STR: {
            tag = TAG_STR;
            int id = store_intern_get(store, v->u.s, v->len);
            if (id >= 0) {
                n += put_varint(buf + n, (uint64_t)id << 1 | 1);
            } else {
                if (n + 10 + v->len > REC_BUF)
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
        tags |= tag << (2 * j);
    }
    /* the tag bytes, written once: no clearing before and no
     * read-modify-write of a byte per value */
    for (size_t b = 0; b < tagbytes; b++)
        buf[tagat + b] = (uint8_t)(tags >> (8 * b));
    if (n > cap)
        return 0;
    memset(buf + n, 0, 8); /* log_append appends whole words */
    return n;
}

/* Record i of lg as an event. */
static void ev_from_rec(const tly_featset_t *fs, const etype_t *et, const log_t *lg, size_t i,
                        tly_event_t *ev)
{
    memset(ev->vals, 0, sizeof ev->vals[0] * fs->nfields);
    ev->nfields = (uint32_t)fs->nfields;
    ev->time_ms = lg->ts[i];
    for (uint32_t j = 0; j < et->nvf; j++)
        ev->vals[et->vf[j]] = lg->recs[i].vals[j];
}

/* Replays a compact record's log into the word encoding. */
static void compact_to_words(tly_store_t *store, ent_t **entp, int64_t now_ms)
{
    const tly_featset_t *fs = store->fs;
    ent_t *old = *entp;
    etype_t *et = &store->etypes[old->type];
    const tly_entity_t *etype = &fs->entities[old->type];
    static _Thread_local log_t lg;
    store_log_copy(old, &lg);
    if (!store_log_decode(store, et, &lg)) {
        fprintf(stderr, "tallyd: corrupt compact entity state\n");
        abort();
    }
    /* Strings may point into lg.bytes: keep lg intact while replaying. The
     * word record is built out of sight (its regrows skip the table and
     * the grace period) and replaces the compact one once, at the end. */
    uint32_t guess = atomic_load_explicit(&et->conv_words, memory_order_relaxed);
    ent_t *e = store_build(store, old, F_WORDS, guess > 16 ? guess : 16);
    st(e, 0, (uint64_t)INT64_MIN);
    atomic_store_explicit(&e->used, 1, memory_order_relaxed);
    /* windowed segments built whole, item lists replayed in arrival order
     * (all of it replayed when a test asks, as the oracle of the build) */
    uint64_t replay =
        store->replay_conversions ? UINT64_MAX : store_words_build(store, &e, etype, &lg, now_ms);
    tly_event_t ev;
    for (size_t i = 0; replay && i < lg.nrecs; i++) {
        if (!(lg.masks[i] & replay))
            continue;
        ev_from_rec(fs, et, &lg, i, &ev);
        store_words_apply(store, &e, etype, lg.masks[i] & replay, NULL, (uint32_t)etype->nfeats,
                          &ev, now_ms);
    }
    atomic_store_explicit(&et->conv_words, atomic_load_explicit(&e->used, memory_order_relaxed),
                          memory_order_relaxed);
    store_publish(store, old, e);
    *entp = e;
}

/* A compact log longer than this (a handful of events) grows by half, not
 * by a quarter: it is on its way to the word form. */
#define GROW_AT 48

/* Words of state for a log of `need` bytes when the record (re)grows: one
 * spare word, a quarter more for short logs and half for longer ones: a
 * user with a few events stays tight, a busy one regrows every few events.
 * Sparse users (memory benchmark (a), 1-3 events) stay at 93 bytes per
 * entity either way; ingest row d gained about 3 % over six rounds. */
static uint32_t grow_words(size_t need)
{
    uint32_t words = (uint32_t)((need + 7) / 8);
    return words + COMPACT_SLACK_WORDS + (need > GROW_AT ? words / 2 : words / 4);
}

/* Appends bytes[0..n) at byte offset `at` of the record's log: whole words
 * stored atomically, the partly filled last word merged with its bytes.
 * bytes is a REC_BUF buffer from rec_encode: it reads up to 16 bytes past
 * n, of which the first eight are zero (the log's tail after `used`). */
static void log_append(ent_t *e, uint32_t at, const uint8_t *bytes, size_t n)
{
    _Static_assert(REC_BUF >= COMPACT_MAX_BYTES + 16, "room to read whole words past a record");
    uint32_t w = at / 8;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* the log's byte order is the host's: word i of the record, shifted up
     * by the partly filled word's bytes, the bytes it pushes out carried
     * into the next word */
    uint32_t off = at % 8, words = (uint32_t)((off + n + 7) / 8);
    uint64_t *dst = ent_words(e) + w;
    if (off == 0) {
        for (uint32_t i = 0; i < words; i++) {
            uint64_t x;
            memcpy(&x, bytes + 8 * i, 8);
            wst(dst, i, x);
        }
    } else {
        uint32_t sh = 8 * off;
        uint64_t carry = ld(e, w) & ((UINT64_C(1) << sh) - 1);
        for (uint32_t i = 0; i < words; i++) {
            uint64_t x;
            memcpy(&x, bytes + 8 * i, 8);
            wst(dst, i, carry | x << sh);
            carry = x >> (64 - sh);
        }
    }
#else
    uint64_t v = at % 8 ? ld(e, w) : 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t pos = at + (uint32_t)i;
        v |= (uint64_t)bytes[i] << (8 * (pos % 8));
        if (pos % 8 == 7 || i + 1 == n) {
            st(e, pos / 8, v);
            v = 0;
        }
    }
#endif
    atomic_store_explicit(&e->used, at + (uint32_t)n, memory_order_relaxed);
}

/* Appends the event to a compact record; replays the log into words when
 * it would pass COMPACT_MAX_BYTES. Only the first record's time is read:
 * appending never decodes the log. */
void store_compact_apply(tly_store_t *store, ent_t **entp, const tly_entity_t *etype, uint64_t mask,
                         const uint32_t *feats, uint32_t nfeats, const tly_event_t *ev,
                         int64_t now_ms)
{
    ent_t *e = *entp;
    const etype_t *et = &store->etypes[e->type];
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    int64_t base = 0;
    if (used) {
        uint8_t head[16];
        size_t at = 0;
        uint64_t v = 0;
        for (uint32_t w = 0; w < 2 && w * 8 < used; w++) { /* a word load, not one per byte */
            uint64_t word = ld(e, w);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            memcpy(head + w * 8, &word, 8);
#else
            for (uint32_t b = 0; b < 8; b++)
                head[w * 8 + b] = (uint8_t)(word >> (8 * b));
#endif
        }
        if (!get_varint(head, used < 16 ? used : 16, &at, &v)) {
            fprintf(stderr, "tallyd: corrupt compact entity state\n");
            abort();
        }
        base = unzigzag(v);
    }
    uint8_t rec[REC_BUF];
    size_t n = rec_encode(store, et, ev, base, mask, rec, COMPACT_MAX_BYTES - used);
    if (n == 0) {
        compact_to_words(store, entp, now_ms);
        store_words_apply(store, entp, etype, mask, feats, nfeats, ev, now_ms);
        return;
    }
    size_t need = used + n;
    if ((need + 7) / 8 > e->cap) {
        store_regrow(store, entp, 0, grow_words(need), (used + 7) / 8);
        e = *entp;
    }
    log_append(e, used, rec, n);
}

size_t store_compact_first(tly_store_t *store, const etype_t *et, const tly_event_t *ev,
                           uint64_t mask, uint8_t *rec, uint32_t *words)
{
    size_t n = rec_encode(store, et, ev, 0, mask, rec, COMPACT_MAX_BYTES);
    *words = n ? grow_words(n) : 0;
    return n;
}

void store_compact_append(ent_t *e, const uint8_t *rec, size_t n)
{
    log_append(e, atomic_load_explicit(&e->used, memory_order_relaxed), rec, n);
}

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

/* The records of lg that slot takes, newest first (time, then arrival), as
 * store_words_recent answers from the list the writer keeps: of the k
 * newest at or before asof_ms, the ones at or after since_ms, at most cap.
 * Returns how many, in idx. */
size_t store_log_recent(const log_t *lg, uint32_t slot, uint32_t k, int64_t since_ms,
                        int64_t asof_ms, size_t cap, uint32_t *idx)
{
    /* the k newest (time, then arrival) of the records considered, newest
     * first: a record that would land past k is dropped at once */
    uint32_t top[COMPACT_MAX_EVENTS] = {0};
    size_t ntop = 0;
    if (slot >= 64 || k == 0)
        return 0;
    const uint64_t bit = UINT64_C(1) << slot;
    for (size_t i = 0; i < lg->nrecs; i++) {
        int64_t t = lg->ts[i];
        if (!(lg->masks[i] & bit) || t > asof_ms)
            continue;
        size_t pos = ntop;
        while (pos > 0 && lg->ts[top[pos - 1]] <= t)
            pos--;
        if (pos >= k)
            continue;
        if (ntop < k)
            ntop++;
        for (size_t q = ntop - 1; q > pos; q--)
            top[q] = top[q - 1];
        top[pos] = (uint32_t)i;
    }
    size_t n = 0;
    for (size_t q = 0; q < ntop && n < cap; q++) {
        if (lg->ts[top[q]] < since_ms)
            break;
        idx[n++] = top[q];
    }
    return n;
}

size_t store_log_count(const log_t *lg, uint32_t slot, uint32_t k, int64_t since_ms,
                       int64_t asof_ms)
{
    if (slot >= 64)
        return 0;
    /* The records slot took in [since_ms, asof_ms] are the newest of those
     * at or before asof_ms: the k newest at or before asof_ms hold
     * min(k, in range) of them. */
    const uint64_t bit = UINT64_C(1) << slot;
    size_t in = 0;
    for (size_t i = 0; i < lg->nrecs; i++) {
        int64_t t = lg->ts[i];
        in += ((lg->masks[i] & bit) != 0) & (t >= since_ms) & (t <= asof_ms);
    }
    return in < k ? in : k;
}

/* Fills an item from record i of lg for feature feat. */
bool store_item_from_rec(const tly_store_t *store, const tly_feat_t *feat, const log_t *lg,
                         size_t i, tly_item_t *it, char *strbuf, size_t strcap, size_t *sused)
{
    const rec_t *r = &lg->recs[i];
    it->time_ms = lg->ts[i];
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
tly_value_t store_log_value(const tly_store_t *store, const log_t *lg, const tly_feat_t *feat,
                            uint32_t window, int64_t now_ms)
{
    const tly_window_t *win = &feat->windows[window];
    int64_t lo, hi;
    store_window_range(win, now_ms, &lo, &hi);
    /* Buckets lo..hi hold the times [lo·hop, (hi+1)·hop): compare times,
     * not one division per event (clamped where the product overflows). */
    int64_t t_lo, t_end;
    if (__builtin_mul_overflow(lo, win->hop_ms, &t_lo))
        t_lo = lo < 0 ? INT64_MIN : INT64_MAX;
    if (hi == INT64_MAX || __builtin_mul_overflow(hi + 1, win->hop_ms, &t_end))
        t_end = hi < 0 ? INT64_MIN : INT64_MAX;
    tly_cell_t acc = TLY_CELL_INIT;
    uint32_t vi = feat->nvalues ? store->vidx[feat->id][0] : 0;
    if (feat->slot >= 64)
        return tly_agg_result(feat->agg, &acc);
    uint64_t bit = UINT64_C(1) << feat->slot;
    if (feat->agg == TLY_AGG_COUNT) {
        /* without branches: which events match is unpredictable; at most
         * COMPACT_MAX_EVENTS, so no saturation to mind */
        for (size_t i = 0; i < lg->nrecs; i++)
            acc.n +=
                (uint32_t)((lg->masks[i] & bit) != 0) & (lg->ts[i] >= t_lo) & (lg->ts[i] < t_end);
        return tly_agg_result(feat->agg, &acc);
    }
    /* Integers too small for any sum of a log's records to overflow fold
     * alike in any order: in arrival order, without bucketing. */
    const int64_t small = INT64_MAX / COMPACT_MAX_EVENTS;
    bool ints = true;
    for (size_t i = 0; i < lg->nrecs && ints; i++) {
        if (!(lg->masks[i] & bit) || lg->ts[i] < t_lo || lg->ts[i] >= t_end)
            continue;
        const tly_value_t *v = &lg->recs[i].vals[vi];
        ints = feat->nvalues && v->type == TLY_V_INT && v->u.i > -small && v->u.i < small;
        if (ints)
            tly_agg_cell_add(feat->agg, &acc, v);
    }
    if (ints)
        return tly_agg_result(feat->agg, &acc);
    acc = TLY_CELL_INIT;
    /* Otherwise folded as the word encoding folds the same events: each
     * bucket's in arrival order into a cell, the cells merged in bucket
     * order. Double rounding, an integer sum's overflow into a double and
     * min/max ties between an integer and a double depend on that order,
     * and a record's answer must not change when it is replayed into
     * words. */
    uint32_t idx[COMPACT_MAX_EVENTS];
    int64_t bucket[COMPACT_MAX_EVENTS];
    size_t m = 0;
    for (size_t i = 0; i < lg->nrecs; i++) {
        if (!(lg->masks[i] & bit) || lg->ts[i] < t_lo || lg->ts[i] >= t_end)
            continue;
        int64_t b = tly_window_bucket(lg->ts[i], win->hop_ms);
        size_t at = m++; /* after every earlier record of the same or an older bucket */
        while (at > 0 && bucket[at - 1] > b) {
            bucket[at] = bucket[at - 1];
            idx[at] = idx[at - 1];
            at--;
        }
        bucket[at] = b;
        idx[at] = (uint32_t)i;
    }
    for (size_t q = 0; q < m;) {
        tly_cell_t c = TLY_CELL_INIT;
        size_t end = q;
        for (; end < m && bucket[end] == bucket[q]; end++)
            tly_agg_cell_add(feat->agg, &c, feat->nvalues ? &lg->recs[idx[end]].vals[vi] : NULL);
        tly_agg_cell_merge(feat->agg, &acc, &c);
        q = end;
    }
    return tly_agg_result(feat->agg, &acc);
}

const istr_t *store_intern_str(const tly_store_t *store, uint64_t id)
{
    if (id >= INTERN_SLOTS)
        return NULL;
    return atomic_load_explicit(&((tly_store_t *)(uintptr_t)store)->intern[id],
                                memory_order_acquire);
}
