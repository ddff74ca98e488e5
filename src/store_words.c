/*
 * store_words.c — the word encoding of large records: per-window bucket
 * segments and last/last_k item lists (layout in store.c's opening comment).
 *
 * Writers call in holding the record's lock and may replace the record when
 * it must grow (store_regrow): every function that can grow takes ent_t **.
 * Readers call in under rcu_read_lock inside a seqlock read; they bound every
 * offset by `used`, set *bad on data that cannot be consistent, and never
 * write.
 */
#include <stdio.h>

#include "store_int.h"
#include "tallyd/window.h"

#define SEG_ID(h)        ((uint32_t)((h)&0xffffu))
#define SEG_LEN(h)       ((uint32_t)(((h) >> 16) & 0xffffffffu))
#define SEG_HDR(id, len) ((uint64_t)(id) | ((uint64_t)(len) << 16))
#define N_MASK           0x7fffffffu
#define FLOAT_BIT        0x80000000u
#define TAG(type, len)   ((uint64_t)(type) | ((uint64_t)(len) << 8))
#define TAG_TYPE(w)      ((tly_vtype_t)((w)&0xff))
#define TAG_LEN(w)       ((uint32_t)((w) >> 8))
#define TAG_ISTR         0x83    /* an interned string: the payload word is its id */
#define UW_MIXED         0xffffu /* item list whose items differ in width */
#define AHEAD_ITEMS_MIN  64u     /* items after the writer's now kept, at least */

/* Makes room for `extra` more words (may replace *entp). */
static void words_reserve(tly_store_t *store, ent_t **entp, uint32_t extra)
{
    ent_t *e = *entp;
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    if (used + extra <= e->cap)
        return;
    uint32_t cap = e->cap < 4 ? 4 : e->cap;
    while (cap < used + extra)
        cap = cap < 256 ? cap * 2 : cap + cap / 2;
    store_regrow(store, entp, F_WORDS, cap, used);
}

/* Shrinks a mostly empty record. */
static void words_maybe_shrink(tly_store_t *store, ent_t **entp)
{
    ent_t *e = *entp;
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    if (e->cap <= 32 || used * 4 > e->cap)
        return;
    store_regrow(store, entp, F_WORDS, used + used / 2 + 2, used);
}

/* Moves words [from, from + n) to `to` (ranges may overlap). An insert
 * before the item lists moves them all (hundreds of words for a last_k of
 * 100), so outside TSan this is memmove, not a relaxed store per word: the
 * writer holds the record's seqlock (seq odd), and a reader that loads
 * words while they move sees seq odd or changed when it checks and retries;
 * it bounds every offset by the immutable capacity, so even a torn copy
 * cannot take it out of bounds. Under TSan, which would rightly call the
 * plain stores racing with those loads a race, word by word as atomics. */
static void words_move(ent_t *e, uint32_t to, uint32_t from, uint32_t n)
{
#if defined(__SANITIZE_THREAD__)
    if (to > from)
        for (uint32_t i = n; i > 0; i--)
            st(e, to + i - 1, ld(e, from + i - 1));
    else
        for (uint32_t i = 0; i < n; i++)
            st(e, to + i, ld(e, from + i));
#else
    memmove(ent_words(e) + to, ent_words(e) + from, 8 * (size_t)n);
#endif
}

/* Inserts n zero words at pos (room must exist). */
static void words_open(ent_t *e, uint32_t pos, uint32_t n)
{
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    words_move(e, pos + n, pos, used - pos);
    uint64_t *w = ent_words(e);
    for (uint32_t i = 0; i < n; i++)
        wst(w, pos + i, 0);
    atomic_store_explicit(&e->used, used + n, memory_order_relaxed);
}

/* Removes n words at pos. */
static void words_close(ent_t *e, uint32_t pos, uint32_t n)
{
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    words_move(e, pos, pos + n, used - pos - n);
    atomic_store_explicit(&e->used, used - n, memory_order_relaxed);
}

/* Finds segment sid among the words [1, used): its header offset and
 * *found, or where it would be inserted. */
/* store_seg_find from a segment header at `start` known to hold an id <= sid
 * (or 1). */
static uint32_t seg_find_from(const ent_t *e, uint32_t used, uint32_t sid, uint32_t start,
                              bool *found)
{
    uint64_t off = start; /* 64-bit: a torn length must not wrap it */
    const uint64_t *w = ent_words(e);
    *found = false;
    while (off < used) {
        uint64_t h = wld(w, (uint32_t)off);
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
uint32_t store_seg_find(const ent_t *e, uint32_t used, uint32_t sid, bool *found)
{
    return seg_find_from(e, used, sid, 1, found);
}

static uint32_t seg_add(tly_store_t *store, ent_t **entp, uint32_t sid, uint32_t init_len,
                        uint32_t off);

/* Header offset of segment sid, created with init_len zero words if absent.
 * *hint is where the caller's previous segment of this event starts (or 1):
 * one event's features are applied in increasing segment order, so the
 * search resumes there instead of at the first segment. */
static inline uint32_t seg_get(tly_store_t *store, ent_t **entp, uint32_t sid, uint32_t init_len,
                               uint32_t *hint)
{
    ent_t *e = *entp;
    bool found;
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    uint32_t start = *hint < used && SEG_ID(ld(e, *hint)) <= sid ? *hint : 1;
    uint32_t off = seg_find_from(e, used, sid, start, &found);
    *hint = off;
    return found ? off : seg_add(store, entp, sid, init_len, off);
}

/* seg_get's rarer half, out of line: inserts segment sid at off. */
static __attribute__((noinline)) uint32_t seg_add(tly_store_t *store, ent_t **entp, uint32_t sid,
                                                  uint32_t init_len, uint32_t off)
{
    words_reserve(store, entp, 1 + init_len); /* offsets survive a regrow */
    words_open(*entp, off, 1 + init_len);
    st(*entp, off, SEG_HDR(sid, init_len));
    return off;
}

static void seg_set_len(ent_t *e, uint32_t off, uint32_t len)
{
    uint64_t *w = ent_words(e);
    wst(w, off, SEG_HDR(SEG_ID(wld(w, off)), len));
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
    uint64_t *w = ent_words(e);
    if (kind == TLY_AGG_COUNT) {
        wst(w, at, (uint64_t)bucket << 32 | c->n);
        return;
    }
    uint32_t n = c->n > N_MASK ? N_MASK : c->n;
    uint32_t fl = (c->flags & TLY_CELL_FLOAT) ? FLOAT_BIT : 0;
    wst(w, at, (uint64_t)bucket << 32 | fl | n);
    wst(w, at + 1, (uint64_t)c->bits);
}

/* Folds v into the cell of `bucket` at word `at` (count: its one word plus
 * one, saturating at UINT32_MAX as tly_agg_cell_add does). */
static void cell_fold(ent_t *e, uint32_t at, uint32_t bucket, tly_agg_kind_t kind,
                      const tly_value_t *v)
{
    if (kind == TLY_AGG_COUNT) {
        uint64_t w = ld(e, at);
        st(e, at, w + ((uint32_t)w != UINT32_MAX));
        return;
    }
    tly_cell_t c;
    cell_load(e, at, kind, &c);
    tly_agg_cell_add(kind, &c, v);
    cell_store(e, at, bucket, kind, &c);
}

/* Adds v at `bucket` to segment sid, pruning buckets below keep_lo. */
static void win_update(tly_store_t *store, ent_t **entp, uint32_t sid, tly_agg_kind_t kind,
                       uint32_t bucket, uint32_t keep_lo, const tly_value_t *v, uint32_t *hint)
{
    uint32_t sw = stride_of(kind);
    uint32_t off = seg_get(store, entp, sid, 0, hint);
    ent_t *e = *entp;
    uint64_t *ws = ent_words(e); /* until the record moves (words_reserve) */
    uint32_t len = SEG_LEN(wld(ws, off));
    uint32_t p = off + 1;

    uint32_t drop = 0;
    while (drop < len && (uint32_t)(wld(ws, p + drop) >> 32) < keep_lo)
        drop += sw;
    if (drop) {
        words_close(e, p, drop);
        len -= drop;
        seg_set_len(e, off, len);
    }

    uint32_t i = len;
    while (i >= sw) {
        uint32_t eb = (uint32_t)(wld(ws, p + i - sw) >> 32);
        if (eb == bucket) {
            cell_fold(e, p + i - sw, bucket, kind, v);
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

/* Words value v takes in an item: an interned string (id >= 0) is a tag
 * and its id, like a number. */
static uint32_t value_words(const tly_value_t *v, int id)
{
    switch (v->type) {
    case TLY_V_INT:
    case TLY_V_DOUBLE:
    case TLY_V_BOOL:
        return 2;
    case TLY_V_STR:
        return id >= 0 ? 2 : 1 + (v->len + 7) / 8;
    default:
        return 1;
    }
}

/* The one payload word of a number, a bool or an interned string (id). */
static uint64_t payload_word(const tly_value_t *v, int id)
{
    uint64_t x;
    if (v->type == TLY_V_DOUBLE)
        memcpy(&x, &v->u.d, 8);
    else if (v->type == TLY_V_STR)
        x = (uint64_t)id;
    else
        x = (uint64_t)v->u.i;
    return x;
}

static void item_write(ent_t *e, uint32_t at, const tly_feat_t *feat, const tly_event_t *ev,
                       const int *ids, uint32_t words)
{
    uint64_t *w = ent_words(e);
    const size_t nvalues = feat->nvalues;
    const uint32_t *values = feat->values;
    wst(w, at, words | (uint64_t)nvalues << 32);
    uint32_t q = at + 1;
    for (size_t i = 0; i < nvalues; i++) {
        const tly_value_t *v = &ev->vals[values[i]];
        switch (v->type) {
        case TLY_V_INT:
        case TLY_V_BOOL:
        case TLY_V_DOUBLE:
            wst(w, q++, TAG(v->type, 0));
            wst(w, q++, payload_word(v, -1));
            break;
        case TLY_V_STR:
            if (ids[i] >= 0) {
                wst(w, q++, TAG(TAG_ISTR, 0));
                wst(w, q++, payload_word(v, ids[i]));
                break;
            }
            wst(w, q++, TAG(v->type, v->len));
            for (uint32_t o = 0; o < v->len; o += 8) {
                uint64_t x = 0;
                memcpy(&x, v->u.s + o, v->len - o < 8 ? v->len - o : 8);
                wst(w, q++, x);
            }
            break;
        default:
            wst(w, q++, TAG(TLY_V_NIL, 0));
            break;
        }
    }
    wst(w, q, (uint64_t)ev->time_ms);
    wst(w, q + 1, words);
}

/* A packed item list (PACKED_BIT in its count word): the word after the
 * count holds the schema, nvals << 32 | a 4-bit PACK_* code per value, and
 * each item is its values' payload words then its time, nvals + 1 words,
 * with no tags and no widths. A list starts packed when its first item's
 * values all have a packed form (numbers, booleans, interned strings) and
 * turns into the tagged encoding (unpack_list) when an item of another
 * schema comes. Three words an item instead of seven for `recent` of
 * config/demo.yaml: less to search and to move at each insert. */
#define PACKED_BIT  (UINT64_C(1) << 48)
#define PACK_INT    1u
#define PACK_DOUBLE 2u
#define PACK_BOOL   3u
#define PACK_ISTR   4u

/* The PACK_* code of value v (id: its intern id when a string), or 0 when
 * it has no packed form (a missing value, a string too long to intern). */
static uint64_t pack_code(const tly_value_t *v, int id)
{
    switch (v->type) {
    case TLY_V_INT:
        return PACK_INT;
    case TLY_V_DOUBLE:
        return PACK_DOUBLE;
    case TLY_V_BOOL:
        return PACK_BOOL;
    case TLY_V_STR:
        return id < 0 ? 0 : PACK_ISTR;
    default:
        return 0;
    }
}

/* The packed schema of ev's values of feat (ids: their intern ids), or 0
 * when some value has no packed form. */
static uint64_t pack_schema(const tly_feat_t *feat, const tly_event_t *ev, const int *ids)
{
    uint64_t schema = (uint64_t)feat->nvalues << 32;
    for (size_t i = 0; i < feat->nvalues; i++) {
        uint64_t code = pack_code(&ev->vals[feat->values[i]], ids[i]);
        if (code == 0)
            return 0;
        schema |= code << (4 * i);
    }
    return schema;
}

/* Writes ev as a packed item at `at` (nvalues + 1 words). */
static void item_write_packed(ent_t *e, uint32_t at, const tly_feat_t *feat, const tly_event_t *ev,
                              const int *ids)
{
    uint64_t *w = ent_words(e);
    for (size_t i = 0; i < feat->nvalues; i++)
        wst(w, at + (uint32_t)i, payload_word(&ev->vals[feat->values[i]], ids[i]));
    wst(w, at + (uint32_t)feat->nvalues, (uint64_t)ev->time_ms);
}

/* Writes ev as an item of the list's encoding at `at`. */
static void item_put(ent_t *e, uint32_t at, bool packed, const tly_feat_t *feat,
                     const tly_event_t *ev, const int *ids, uint32_t words)
{
    if (packed)
        item_write_packed(e, at, feat, ev, ids);
    else
        item_write(e, at, feat, ev, ids, words);
}

/* Rewrites the packed list of the segment at off in the tagged encoding,
 * every item as wide (may replace *entp). The list holds an item at least
 * (packed_valid), so it only grows. */
static void unpack_list(tly_store_t *store, ent_t **entp, uint32_t off)
{
    ent_t *e = *entp;
    uint32_t p = off + 1, len = SEG_LEN(ld(e, off));
    uint64_t cw = ld(e, p), count = cw & 0xffffffffu, schema = ld(e, p + 1);
    uint32_t pw = (uint32_t)(cw >> 32) & 0xffffu, n = (uint32_t)(schema >> 32);
    uint32_t tw = 3 + 2 * n; /* header, a tag and a payload word a value, time, width */
    uint32_t newlen = 1 + (uint32_t)count * tw;
    words_reserve(store, entp, newlen - len);
    e = *entp;
    words_open(e, p + len, newlen - len);
    /* From the newest down: item i's tagged place starts past the packed
     * items before it (tw > pw), and it is read whole before it is
     * written. */
    for (uint64_t i = count; i-- > 0;) {
        uint32_t src = p + 2 + (uint32_t)i * pw, dst = p + 1 + (uint32_t)i * tw;
        uint64_t vals[TLY_MAX_ITEM_VALUES], t = ld(e, src + n);
        for (uint32_t j = 0; j < n; j++)
            vals[j] = ld(e, src + j);
        st(e, dst, tw | (uint64_t)n << 32);
        for (uint32_t j = 0; j < n; j++) {
            static const unsigned tag[] = {[PACK_INT] = TLY_V_INT,
                                           [PACK_DOUBLE] = TLY_V_DOUBLE,
                                           [PACK_BOOL] = TLY_V_BOOL,
                                           [PACK_ISTR] = TAG_ISTR};
            st(e, dst + 1 + 2 * j, TAG(tag[(schema >> (4 * j)) & 0xf], 0));
            st(e, dst + 2 + 2 * j, vals[j]);
        }
        st(e, dst + tw - 2, t);
        st(e, dst + tw - 1, tw);
    }
    st(e, p, count | (uint64_t)tw << 32);
    seg_set_len(e, off, newlen);
}

/* How many of the newest items of a list (items from `first` to `end`,
 * count of them, each time `tail` words before its item's end; pw: every
 * item's width when packed, 0 when each item ends with its width) are
 * newer than now_ms, up to max: items accepted within max_future_skew. */
static uint32_t items_after(const ent_t *e, uint32_t first, uint32_t end, uint32_t tail,
                            uint32_t pw, uint64_t count, int64_t now_ms, uint32_t max)
{
    uint32_t n = 0, at = end;
    while (n < max && n < count && at > first) {
        uint32_t iw = pw ? pw : (uint32_t)ld(e, at - 1);
        if (iw < tail + 1 || iw > at - first || (int64_t)ld(e, at - tail) <= now_ms)
            break;
        at -= iw;
        n++;
    }
    return n;
}

/* Whether a full packed list (count word at p, segment payload len, item
 * width uw) keeps none of an event older than all its kept items: the
 * insert would return at once, so an event of another shape need not turn
 * the list tagged first. */
static bool packed_drops(const ent_t *e, uint32_t p, uint32_t len, uint32_t uw, uint64_t count,
                         const tly_feat_t *feat, const tly_event_t *ev, int64_t now_ms)
{
    const uint32_t first = p + 2;
    if (count == 0 || uw < 2 || (uint64_t)count * uw != p + len - first ||
        (int64_t)ld(e, first + uw - 1) <= ev->time_ms)
        return false;
    const uint32_t ahead_max = feat->k > AHEAD_ITEMS_MIN ? feat->k : AHEAD_ITEMS_MIN;
    uint32_t ahead = 0;
    if ((int64_t)ld(e, p + len - 1) > now_ms)
        ahead = items_after(e, first, p + len, 1, uw, count, now_ms, ahead_max);
    return count >= (uint64_t)feat->k + ahead;
}

/* Inserts the event as an item of last/last_k feature feat, ordered by time
 * (equal times keep arrival order), keeping at most k (+ slack) items at or
 * before now_ms and, on top of them, up to max(k, AHEAD_ITEMS_MIN) items
 * after it (accepted within max_future_skew): a read at now_ms skips those
 * and still finds the k before it. */
static void lastk_update(tly_store_t *store, ent_t **entp, uint32_t sid, const tly_feat_t *feat,
                         const tly_event_t *ev, int64_t now_ms, uint32_t *hint)
{
    uint32_t off = seg_get(store, entp, sid, 1, hint);
    ent_t *e = *entp;
    uint32_t len = SEG_LEN(ld(e, off));
    uint32_t p = off + 1;
    uint64_t cw = ld(e, p);
    uint64_t count = cw & 0xffffffffu;
    uint32_t uw = (uint32_t)(cw >> 32) & 0xffffu; /* uniform item width, or UW_MIXED */
    bool packed = (cw & PACKED_BIT) != 0;

    int ids[TLY_MAX_ITEM_VALUES];
    uint32_t words = 3; /* the item's width, tagged */
    for (size_t i = 0; i < feat->nvalues; i++) {
        const tly_value_t *v = &ev->vals[feat->values[i]];
        /* store_intern_get answers a repeat (the item lists of one event
         * often name the same field) from its thread's memo */
        ids[i] = v->type == TLY_V_STR ? store_intern_get(store, v->u.s, v->len) : -1;
        words += value_words(v, ids[i]);
    }
    uint64_t schema = pack_schema(feat, ev, ids);
    if (count == 0 && !packed && len == 1 && schema != 0) {
        /* a new list, packed: the schema word after the count */
        words_reserve(store, entp, 1); /* offsets survive a regrow */
        e = *entp;
        words_open(e, p + 1, 1);
        st(e, p + 1, schema);
        len = 2;
        packed = true;
        uw = (uint32_t)feat->nvalues + 1;
        st(e, p, PACKED_BIT | (uint64_t)uw << 32);
        seg_set_len(e, off, len);
    } else if (packed && ld(e, p + 1) != schema) {
        if (packed_drops(e, p, len, uw, count, feat, ev, now_ms))
            return; /* it would be trimmed at once: no reason to unpack */
        unpack_list(store, entp, off);
        e = *entp;
        len = SEG_LEN(ld(e, off));
        uw = (uint32_t)(ld(e, p) >> 32) & 0xffffu;
        packed = false;
    }
    const uint32_t first = p + 1 + packed; /* the oldest item */
    const uint32_t tail = packed ? 1 : 2;  /* an item's time, from its end */
    const uint32_t iw = packed ? uw : words;

    /* Insertion point: after every item with time <= ev time. With items of
     * one width (packed, or tagged numbers and interned strings), a binary
     * search; otherwise a walk back from the newest. */
    uint32_t at = p + len;
    /* every kept item, and this one, as wide as the count word says */
    const bool uniform = count && uw == iw && (uint64_t)count * uw == p + len - first;
    if (uniform) {
        const uint64_t *w = ent_words(e);
        uint64_t lo = 0, hi = count;
        /* the two usual answers first, one load each: after the newest
         * item (events in time order) or before the oldest (an event too
         * old to be kept, once the list is full) */
        if ((int64_t)wld(w, p + len - tail) <= ev->time_ms)
            lo = count;
        else if ((int64_t)wld(w, first + uw - tail) > ev->time_ms)
            hi = 0;
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo) / 2;
            if ((int64_t)wld(w, first + (uint32_t)(mid * uw) + uw - tail) <= ev->time_ms)
                lo = mid + 1;
            else
                hi = mid;
        }
        at = first + (uint32_t)(lo * uw);
    } else {
        while (at > first) {
            uint32_t w = (uint32_t)ld(e, at - 1);
            if (w < 3 || w > at - first)
                break;
            if ((int64_t)ld(e, at - 2) <= ev->time_ms) /* independent of w's load */
                break;
            at -= w;
        }
    }
    /* the items to keep: k, and those after now_ms (usually none: one
     * load, of the newest item's time) */
    const uint32_t ahead_max = feat->k > AHEAD_ITEMS_MIN ? feat->k : AHEAD_ITEMS_MIN;
    uint32_t ahead = 0;
    if (count > 0 && (int64_t)ld(e, p + len - tail) > now_ms)
        ahead = items_after(e, first, p + len, tail, packed ? uw : 0, count, now_ms, ahead_max);
    const uint64_t keep = (uint64_t)feat->k + ahead;
    if (count >= keep && at == first)
        return; /* older than all k kept items: it would be trimmed at once */
    if (feat->k == 1 && count == 1 && uw == iw && at == first + iw && ev->time_ms <= now_ms) {
        /* last: the one item, older and as wide, would be trimmed at once
         * (slack 1) after this one is inserted after it: write it in its
         * place (not when this one is after now_ms: the older stays the
         * answer until then) */
        item_put(e, first, packed, feat, ev, ids, words);
        return;
    }
    if (uniform && count >= keep && ev->time_ms <= now_ms && at - first < p + len - at) {
        /* Full, and the item lands among the older half: drop the oldest
         * and move the items older than it down one place, fewer words
         * than opening a place would move; the k newest kept are the same
         * either way. */
        words_move(e, first, first + uw, at - first - uw);
        item_put(e, at - uw, packed, feat, ev, ids, words);
        return;
    }
    /* a width that does not fit the count word's 16 bits (an item of
     * several long strings) is stored as mixed */
    if (!packed)
        uw = words >= UW_MIXED ? UW_MIXED : count == 0 ? words : uw == words ? uw : UW_MIXED;

    words_reserve(store, entp, iw); /* offsets survive a regrow */
    e = *entp;
    words_open(e, at, iw);
    item_put(e, at, packed, feat, ev, ids, words);
    len += iw;
    count++;
    const uint64_t flag = packed ? PACKED_BIT : 0;

    uint32_t slack = feat->k / 8 + 1;
    uint64_t keep_now = keep + (ev->time_ms > now_ms && ahead < ahead_max);
    if (count >= keep_now + slack) {
        uint64_t trim = count - keep_now;
        uint32_t tw = 0;
        if (packed) {
            tw = (uint32_t)trim * uw;
        } else {
            uint32_t q = first;
            for (uint64_t t = 0; t < trim; t++) {
                uint32_t w = (uint32_t)ld(e, q);
                q += w;
                tw += w;
            }
        }
        words_close(e, first, tw);
        len -= tw;
        count -= trim;
        st(e, p, count | (uint64_t)uw << 32 | flag);
        seg_set_len(e, off, len);
        words_maybe_shrink(store, entp);
        return;
    }
    st(e, p, count | (uint64_t)uw << 32 | flag);
    seg_set_len(e, off, len);
}

/* Applies one accepted event to a word-encoded record. */
void store_words_apply(tly_store_t *store, ent_t **entp, const tly_entity_t *etype, uint64_t mask,
                       const uint32_t *feats, uint32_t nfeats, const tly_event_t *ev,
                       int64_t now_ms)
{
    const tly_featset_t *fs = store->fs;
    uint32_t hint = 1;
    {
        /* The segment walk loads one header after another; start loading
         * the lines it will pass (the windowed segments first, the item
         * lists' end last) all at once. */
        const ent_t *e = *entp;
        uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
        const uint64_t *w = ent_words(e);
        for (uint32_t i = 8, end = used < 128 ? used : 128; i < end; i += 8)
            __builtin_prefetch(w + i);
        if (used > 128) {
            __builtin_prefetch(w + used - 1);
            __builtin_prefetch(w + used - 9);
        }
    }
    for (uint32_t fi = 0; fi < nfeats; fi++) {
        const tly_feat_t *feat = feats ? &fs->feats[feats[fi]] : &fs->feats[etype->feats[fi]];
        if (!feats && !(mask & (UINT64_C(1) << feat->slot)))
            continue;
        if (!tly_agg_windowed(feat->agg)) {
            lastk_update(store, entp, SID_ITEMS(feat->slot), feat, ev, now_ms, &hint);
            continue;
        }
        const tly_value_t *v = feat->nvalues ? &ev->vals[feat->values[0]] : NULL;
        for (size_t w = 0; w < feat->nwindows; w++) {
            const tly_window_t *win = &feat->windows[w];
            int64_t lo, hi;
            store_window_range(win, now_ms, &lo, &hi);
            int64_t bk = tly_window_bucket(ev->time_ms, win->hop_ms);
            if (bk < lo || bk < 0 || bk > UINT32_MAX)
                continue; /* outside this window; longer ones take it */
            win_update(store, entp, SID_WINDOW(feat->slot, w), feat->agg, (uint32_t)bk,
                       lo < 0 ? 0 : (uint32_t)lo, v, &hint);
        }
    }
    ent_t *e = *entp;
    if (ev->time_ms > (int64_t)ld(e, 0))
        st(e, 0, (uint64_t)ev->time_ms);
}

/* One log record's bucket in a window, for store_words_build. */
typedef struct {
    uint32_t bucket;
    uint32_t rec;
} bucket_rec_t;

/* Appends the segment of window w of windowed feature feat built from the
 * records of lg that take it (bit: the feature's mask bit). */
static void build_window(tly_store_t *store, ent_t **entp, const tly_feat_t *feat, uint32_t w,
                         const log_t *lg, uint64_t bit, int64_t now_ms)
{
    const tly_agg_kind_t kind = feat->agg;
    const uint32_t sw = stride_of(kind);
    const uint32_t vj = feat->nvalues ? store->vidx[feat->id][0] : 0;
    const tly_window_t *win = &feat->windows[w];
    int64_t lo, hi;
    store_window_range(win, now_ms, &lo, &hi);
    /* the records this window takes, by bucket, each bucket's in arrival
     * order (an insertion sort: a few dozen records, most of them in one
     * bucket or in order) */
    bucket_rec_t br[COMPACT_MAX_EVENTS];
    size_t n = 0, nb = 0;
    for (size_t i = 0; i < lg->nrecs; i++) {
        if (!(lg->masks[i] & bit))
            continue;
        int64_t bk = tly_window_bucket(lg->ts[i], win->hop_ms);
        if (bk < lo || bk < 0 || bk > UINT32_MAX)
            continue; /* outside this window; longer ones take it */
        size_t at = n++;
        while (at > 0 && br[at - 1].bucket > (uint32_t)bk) {
            br[at] = br[at - 1];
            at--;
        }
        br[at] = (bucket_rec_t){(uint32_t)bk, (uint32_t)i};
    }
    for (size_t j = 0; j < n; j++)
        nb += j == 0 || br[j].bucket != br[j - 1].bucket;
    if (nb == 0)
        return;
    const uint32_t len = (uint32_t)nb * sw;
    words_reserve(store, entp, 1 + len);
    ent_t *e = *entp;
    const uint32_t off = atomic_load_explicit(&e->used, memory_order_relaxed);
    st(e, off, SEG_HDR(SID_WINDOW(feat->slot, w), len));
    uint32_t at = off + 1;
    for (size_t j = 0; j < n; j++) {
        const tly_value_t *v = feat->nvalues ? &lg->recs[br[j].rec].vals[vj] : NULL;
        if (j > 0 && br[j].bucket == br[j - 1].bucket) {
            cell_fold(e, at - sw, br[j].bucket, kind, v); /* as win_update does */
            continue;
        }
        tly_cell_t c = TLY_CELL_INIT;
        tly_agg_cell_add(kind, &c, v);
        cell_store(e, at, br[j].bucket, kind, &c);
        at += sw;
    }
    atomic_store_explicit(&e->used, at, memory_order_relaxed);
}

/* Appends the item list of last/last_k feature feat built from the
 * records of lg that take it, when lastk_update would have left a packed
 * list of them all (fewer than k: nothing trimmed or dropped) or, for
 * `last` (k = 1) with every item at or before now_ms, of the newest; and
 * all of one packed schema (a list never turned tagged on the way).
 * Returns false, having written nothing, otherwise. */
static bool build_items(tly_store_t *store, ent_t **entp, const tly_feat_t *feat, const log_t *lg,
                        uint64_t bit, int64_t now_ms)
{
    const uint32_t nv = (uint32_t)feat->nvalues;
    uint64_t pay[COMPACT_MAX_EVENTS][TLY_MAX_ITEM_VALUES];
    int64_t ts[COMPACT_MAX_EVENTS];
    uint32_t order[COMPACT_MAX_EVENTS]; /* taken records by time, then arrival */
    uint64_t schema0 = 0;
    size_t n = 0;
    for (size_t i = 0; i < lg->nrecs; i++) {
        if (!(lg->masks[i] & bit))
            continue;
        if (feat->k == 1 ? lg->ts[i] > now_ms : n + 1 >= feat->k)
            return false; /* the list may trim or drop: replayed */
        uint64_t schema = (uint64_t)nv << 32;
        for (uint32_t j = 0; j < nv; j++) {
            const tly_value_t *v = &lg->recs[i].vals[store->vidx[feat->id][j]];
            int id = v->type == TLY_V_STR ? store_intern_get(store, v->u.s, v->len) : -1;
            uint64_t code = pack_code(v, id);
            if (code == 0)
                return false;
            schema |= code << (4 * j);
            pay[n][j] = payload_word(v, id);
        }
        if (n == 0)
            schema0 = schema;
        else if (schema != schema0)
            return false; /* the list turns tagged on the way: replayed */
        ts[n] = lg->ts[i];
        size_t at = n;
        while (at > 0 && ts[order[at - 1]] > ts[n]) {
            order[at] = order[at - 1];
            at--;
        }
        order[at] = (uint32_t)n;
        n++;
    }
    if (n == 0)
        return true;
    size_t from = 0;
    if (feat->k == 1)
        from = n - 1; /* `last`: each item at or before now_ms replaced the
                       * one before it, or was older and dropped */
    /* the list as lastk_update leaves it: the count word, the schema, the
     * items oldest first, each its payload words and its time */
    const uint32_t uw = nv + 1, len = 2 + (uint32_t)(n - from) * uw;
    words_reserve(store, entp, 1 + len);
    ent_t *e = *entp;
    const uint32_t off = atomic_load_explicit(&e->used, memory_order_relaxed);
    st(e, off, SEG_HDR(SID_ITEMS(feat->slot), len));
    st(e, off + 1, (uint64_t)(n - from) | (uint64_t)uw << 32 | PACKED_BIT);
    st(e, off + 2, schema0);
    uint32_t at = off + 3;
    for (size_t r = from; r < n; r++) {
        for (uint32_t j = 0; j < nv; j++)
            st(e, at++, pay[order[r]][j]);
        st(e, at++, (uint64_t)ts[order[r]]);
    }
    atomic_store_explicit(&e->used, at, memory_order_relaxed);
    return true;
}

uint64_t store_words_build(tly_store_t *store, ent_t **entp, const tly_entity_t *etype,
                           const log_t *lg, int64_t now_ms)
{
    const tly_featset_t *fs = store->fs;
    uint64_t any = 0, replay = 0;
    int64_t newest = (int64_t)ld(*entp, 0);
    for (size_t i = 0; i < lg->nrecs; i++) {
        any |= lg->masks[i];
        if (lg->ts[i] > newest)
            newest = lg->ts[i];
    }
    st(*entp, 0, (uint64_t)newest);
    /* segments in increasing id order: every window's, then the lists */
    for (size_t fi = 0; fi < etype->nfeats; fi++) {
        const tly_feat_t *feat = &fs->feats[etype->feats[fi]];
        const uint64_t bit = UINT64_C(1) << feat->slot;
        if ((any & bit) && tly_agg_windowed(feat->agg))
            for (uint32_t w = 0; w < feat->nwindows; w++)
                build_window(store, entp, feat, w, lg, bit, now_ms);
    }
    for (size_t fi = 0; fi < etype->nfeats; fi++) {
        const tly_feat_t *feat = &fs->feats[etype->feats[fi]];
        const uint64_t bit = UINT64_C(1) << feat->slot;
        if ((any & bit) && !tly_agg_windowed(feat->agg) &&
            !build_items(store, entp, feat, lg, bit, now_ms))
            replay |= bit;
    }
    return replay;
}

/* The interned string `id` into v, its bytes copied to strbuf (*full when
 * they do not fit); false when the intern table has no such string. */
static bool istr_read(const tly_store_t *store, uint64_t id, tly_value_t *v, char *strbuf,
                      size_t strcap, size_t *sused, bool *full)
{
    const istr_t *is = store_intern_str(store, id);
    if (!is)
        return false;
    if (*sused + is->len > strcap) {
        *full = true;
        return false;
    }
    memcpy(strbuf + *sused, is->s, is->len);
    v->type = TLY_V_STR;
    v->len = is->len;
    v->u.s = strbuf + *sused;
    *sused += is->len;
    return true;
}

/* Decodes the word-encoded item whose header is at q (bounded by end). */
static bool item_read(const tly_store_t *store, const ent_t *e, uint32_t q, uint32_t end,
                      tly_item_t *it, char *strbuf, size_t strcap, size_t *sused, bool *full)
{
    uint64_t h = ld(e, q);
    uint32_t words = (uint32_t)h, nv = (uint32_t)(h >> 32);
    if (words < 3 || words > end - q || nv > TLY_MAX_ITEM_VALUES)
        return false;
    it->time_ms = (int64_t)ld(e, q + words - 2);
    it->nvals = nv;
    uint32_t r = q + 1, stop = q + words - 2;
    for (uint32_t i = 0; i < nv; i++) {
        if (r >= stop)
            return false;
        uint64_t tag = ld(e, r++);
        tly_value_t *v = &it->vals[i];
        unsigned tt = (unsigned)(tag & 0xff);
        v->type = (tly_vtype_t)tt;
        switch (tt) {
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
        case TAG_ISTR:
            if (r >= stop || !istr_read(store, ld(e, r++), v, strbuf, strcap, sused, full))
                return false;
            break;
        case TLY_V_STR: {
            uint32_t len = TAG_LEN(tag);
            if ((uint64_t)r + ((uint64_t)len + 7) / 8 > stop)
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

/* Decodes the packed item at q (schema: its list's). */
static bool item_read_packed(const tly_store_t *store, const ent_t *e, uint32_t q, uint64_t schema,
                             tly_item_t *it, char *strbuf, size_t strcap, size_t *sused, bool *full)
{
    uint32_t nv = (uint32_t)(schema >> 32);
    if (nv > TLY_MAX_ITEM_VALUES)
        return false;
    it->nvals = nv;
    it->time_ms = (int64_t)ld(e, q + nv);
    for (uint32_t i = 0; i < nv; i++) {
        uint64_t w = ld(e, q + i);
        tly_value_t *v = &it->vals[i];
        switch ((schema >> (4 * i)) & 0xf) {
        case PACK_INT:
            v->type = TLY_V_INT;
            v->u.i = (int64_t)w;
            break;
        case PACK_BOOL:
            v->type = TLY_V_BOOL;
            v->u.i = (int64_t)w;
            break;
        case PACK_DOUBLE:
            v->type = TLY_V_DOUBLE;
            memcpy(&v->u.d, &w, 8);
            break;
        case PACK_ISTR:
            if (!istr_read(store, w, v, strbuf, strcap, sused, full))
                return false;
            break;
        default:
            return false;
        }
    }
    return true;
}

/* Reads up to cap of the k newest items at or before asof_ms of the
 * last/last_k segment at off, newest first, keeping those at or after
 * since_ms; items == NULL only counts. Sets *bad on torn data, *full when strbuf overflowed. */
size_t store_words_recent(const tly_store_t *store, const ent_t *e, uint32_t off, uint32_t used,
                          uint32_t k, int64_t since_ms, int64_t asof_ms, tly_item_t *items,
                          size_t cap, char *strbuf, size_t strcap, size_t *sused, bool *bad,
                          bool *full)
{
    uint32_t len = SEG_LEN(ld(e, off));
    uint32_t p = off + 1;
    if (len < 1 || (uint64_t)p + len > used) {
        *bad = true;
        return 0;
    }
    uint64_t cw = ld(e, p), count = cw & 0xffffffffu, schema = 0;
    const bool packed = (cw & PACKED_BIT) != 0;
    const uint32_t pw = packed ? (uint32_t)(cw >> 32) & 0xffffu : 0; /* packed item width */
    const uint32_t first = p + 1 + packed, tail = packed ? 1 : 2;
    if (packed) {
        schema = len >= 2 ? ld(e, p + 1) : 0;
        if (len < 2 || pw < 2 || pw != (schema >> 32) + 1) {
            *bad = true;
            return 0;
        }
    }
    if (items == NULL && count > 0 && p + len > first) { /* a torn count may say 1 of none */
        /* Only counting, and the usual read at `now`: when the oldest kept
         * item is at or after since_ms and the newest at or before asof_ms,
         * every item is in range and the count word answers without a walk
         * (an item's time is `tail` words before its end: the oldest's
         * within its first width, the newest's before the segment's end). */
        uint32_t w0 = packed ? pw : (uint32_t)ld(e, first);
        if (w0 > tail && w0 <= p + len - first && (int64_t)ld(e, first + w0 - tail) >= since_ms &&
            (int64_t)ld(e, p + len - tail) <= asof_ms) {
            uint64_t n = count < k ? count : k;
            return n < cap ? (size_t)n : cap;
        }
    }
    uint32_t at = p + len;
    size_t n = 0, seen = 0;
    while (at > first && n < cap && seen < k) {
        uint32_t iw = packed ? pw : (uint32_t)ld(e, at - 1);
        if (iw <= tail || iw > at - first) {
            *bad = true;
            return n;
        }
        int64_t t = (int64_t)ld(e, at - tail);
        at -= iw;
        /* an item after asof_ms is not yet one of the k: at the clock,
         * one accepted ahead of it (the writer kept k before its now on
         * top of those) */
        if (t > asof_ms)
            continue;
        seen++;
        if (t < since_ms)
            break;
        if (items &&
            !(packed
                  ? item_read_packed(store, e, at, schema, &items[n], strbuf, strcap, sused, full)
                  : item_read(store, e, at, at + iw, &items[n], strbuf, strcap, sused, full))) {
            *bad = !*full;
            return n;
        }
        n++;
    }
    return n;
}

/* One windowed value from a word-encoded record. */
tly_value_t store_words_value(const ent_t *e, uint32_t used, const tly_feat_t *feat,
                              uint32_t window, int64_t now_ms, uint32_t *hint, bool *bad)
{
    const tly_window_t *win = &feat->windows[window];
    int64_t lo, hi;
    store_window_range(win, now_ms, &lo, &hi);
    tly_cell_t acc = TLY_CELL_INIT;
    bool found;
    uint32_t sid = SID_WINDOW(feat->slot, window), start = 1;
    /* Requests usually come in segment order: search on from the last one
     * found when its id is not past sid. */
    if (*hint > 1 && *hint < used && SEG_ID(ld(e, *hint)) <= sid)
        start = *hint;
    uint32_t off = seg_find_from(e, used, sid, start, &found);
    if (found) {
        uint32_t len = SEG_LEN(ld(e, off)), sw = stride_of(feat->agg);
        if ((uint64_t)off + 1 + len > used) {
            *bad = true;
            return acc.n ? tly_agg_result(feat->agg, &acc) : (tly_value_t){.type = TLY_V_NIL};
        }
        *hint = off;
        if (feat->agg == TLY_AGG_COUNT) {
            /* one word a bucket, bucket << 32 | n: sum the counts in range
             * (the saturation tly_agg_cell_merge applies, once at the end) */
            uint64_t n = 0;
            for (uint32_t i = 0; i < len; i++) {
                uint64_t w = ld(e, off + 1 + i);
                int64_t bk = (int64_t)(w >> 32);
                n += (bk >= lo && bk <= hi) ? (uint32_t)w : 0;
            }
            acc.n = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
            return tly_agg_result(feat->agg, &acc);
        }
        if (feat->agg == TLY_AGG_SUM || feat->agg == TLY_AGG_AVG) {
            /* integer cells summed without a call per bucket; a float cell
             * or an overflow leaves it to the loop below, which turns the
             * sum into a double as tly_agg_cell_merge does */
            uint64_t n = 0;
            int64_t sum = 0;
            bool whole = true;
            for (uint32_t i = 0; i + 2 <= len && whole; i += 2) {
                uint64_t w0 = ld(e, off + 1 + i);
                int64_t bk = (int64_t)(w0 >> 32);
                uint32_t cn = (uint32_t)w0 & N_MASK;
                if (bk < lo || bk > hi || cn == 0)
                    continue;
                whole = !(w0 & FLOAT_BIT) &&
                        !__builtin_add_overflow(sum, (int64_t)ld(e, off + 2 + i), &sum);
                n += cn;
            }
            if (whole) {
                acc.n = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
                acc.bits = sum;
                return tly_agg_result(feat->agg, &acc);
            }
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

/* The feature of entity type `type` in slot `slot`, or NULL. */
static const tly_feat_t *slot_feat(const tly_featset_t *fs, uint32_t type, uint32_t slot)
{
    const tly_entity_t *et = &fs->entities[type];
    for (size_t i = 0; i < et->nfeats; i++)
        if (fs->feats[et->feats[i]].slot == slot)
            return &fs->feats[et->feats[i]];
    return NULL;
}

/* A packed item list: the count word, the schema (one known code a value,
 * as many values as the feature keeps, nothing above them), then items of
 * that width, as many as counted and at least one, interned strings ones
 * the intern table holds, in time order. */
static bool packed_valid(const tly_store_t *store, const ent_t *e, uint32_t p, uint32_t len,
                         const tly_feat_t *feat)
{
    uint64_t cw = ld(e, p), count = cw & 0xffffffffu;
    uint32_t uw = (uint32_t)(cw >> 32) & 0xffffu;
    if (len < 2)
        return false;
    uint64_t schema = ld(e, p + 1);
    uint32_t nv = (uint32_t)(schema >> 32);
    /* never empty: the writer makes a list packed with its first item */
    if (nv != feat->nvalues || nv == 0 || nv > TLY_MAX_ITEM_VALUES || uw != nv + 1 ||
        (nv < 8 && (uint32_t)schema >> (4 * nv) != 0) || count == 0 ||
        (uint64_t)count * uw != len - 2)
        return false;
    for (uint32_t i = 0; i < nv; i++) {
        unsigned code = (unsigned)(schema >> (4 * i)) & 0xf;
        if (code < PACK_INT || code > PACK_ISTR)
            return false;
    }
    int64_t prev = INT64_MIN;
    for (uint32_t q = p + 2; q < p + len; q += uw) {
        for (uint32_t i = 0; i < nv; i++)
            if (((schema >> (4 * i)) & 0xf) == PACK_ISTR && !store_intern_str(store, ld(e, q + i)))
                return false; /* item_read_packed could not read it back */
        int64_t t = (int64_t)ld(e, q + nv);
        if (t < prev)
            return false;
        prev = t;
    }
    return true;
}

/* An item list: the count word, then items whose widths add up to the
 * segment, as many as counted, each as wide as the count word says when it
 * names one width, values tagged with their payload inside the item (an
 * interned string's id one the intern table holds), in time order. */
static bool items_valid(const tly_store_t *store, const ent_t *e, uint32_t p, uint32_t len,
                        const tly_feat_t *feat)
{
    if (len < 1)
        return false;
    uint64_t cw = ld(e, p);
    uint64_t count = cw & 0xffffffffu;
    uint32_t uw = (uint32_t)(cw >> 32) & 0xffffu;
    if (cw >> 49 != 0)
        return false;
    if (cw & PACKED_BIT)
        return packed_valid(store, e, p, len, feat);
    uint32_t q = p + 1, end = p + len;
    uint64_t seen = 0;
    int64_t prev = INT64_MIN;
    while (q < end) {
        uint64_t h = ld(e, q);
        uint32_t words = (uint32_t)h, nv = (uint32_t)(h >> 32);
        if (words < 3 || words > end - q || nv != feat->nvalues || ld(e, q + words - 1) != words ||
            (uw != UW_MIXED && words != uw))
            return false;
        uint64_t r = q + 1, stop = q + words - 2; /* 64-bit: a string length must not wrap r */
        for (uint32_t i = 0; i < nv; i++) {
            if (r >= stop)
                return false;
            uint64_t tag = ld(e, (uint32_t)r++);
            unsigned tt = (unsigned)(tag & 0xff);
            if (tt == TAG_ISTR && (r >= stop || !store_intern_str(store, ld(e, (uint32_t)r))))
                return false; /* item_read could not read it back */
            if (tt == TLY_V_INT || tt == TLY_V_BOOL || tt == TLY_V_DOUBLE || tt == TAG_ISTR)
                r++;
            else if (tt == TLY_V_STR)
                r += ((uint64_t)TAG_LEN(tag) + 7) / 8; /* no wrap to 0 near 2^32 */
            else if (tt != TLY_V_NIL)
                return false;
        }
        if (r != stop)
            return false;
        int64_t t = (int64_t)ld(e, q + words - 2);
        if (t < prev)
            return false;
        prev = t;
        seen++;
        q += words;
    }
    return seen == count && (uw == UW_MIXED || (uint64_t)count * uw == len - 1);
}

bool store_words_valid(const tly_store_t *store, const ent_t *e)
{
    const tly_featset_t *fs = store->fs;
    uint32_t used = atomic_load_explicit(&e->used, memory_order_relaxed);
    if (used < 1 || used > e->cap || e->type >= fs->nentities)
        return false;
    uint64_t off = 1;
    int64_t prev = -1;
    while (off < used) {
        uint64_t h = ld(e, (uint32_t)off);
        uint32_t sid = SEG_ID(h), len = SEG_LEN(h);
        if ((int64_t)sid <= prev || len > used - off - 1)
            return false;
        prev = sid;
        bool items = sid >= SID_ITEMS(0);
        uint32_t slot = items ? sid - SID_ITEMS(0) : sid / TLY_MAX_WINDOWS;
        const tly_feat_t *feat = slot_feat(fs, e->type, slot);
        if (feat == NULL || items == tly_agg_windowed(feat->agg))
            return false;
        uint32_t p = (uint32_t)off + 1;
        if (items) {
            if (!items_valid(store, e, p, len, feat))
                return false;
        } else {
            uint32_t sw = stride_of(feat->agg);
            if (sid % TLY_MAX_WINDOWS >= feat->nwindows || len % sw != 0)
                return false;
            for (uint32_t i = sw; i < len; i += sw) /* buckets in increasing order */
                if (ld(e, p + i) >> 32 <= ld(e, p + i - sw) >> 32)
                    return false;
        }
        off += 1 + (uint64_t)len;
    }
    return true;
}
