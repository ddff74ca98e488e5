/*
 * agg.c — aggregation kinds and the cell kernels (see agg.h for the rules).
 *
 * Invariant: a cell with TLY_CELL_FLOAT holds a double in `bits`; without it
 * an int64. Adding a double, or an int that would overflow the int64 sum,
 * converts the cell to double first. Pure; any thread.
 */
#include "tallyd/agg.h"

#include <string.h>

static const char *const agg_names[TLY_AGG__COUNT] = {
    [TLY_AGG_COUNT] = "count",   [TLY_AGG_SUM] = "sum", [TLY_AGG_MIN] = "min",
    [TLY_AGG_MAX] = "max",       [TLY_AGG_AVG] = "avg", [TLY_AGG_LAST] = "last",
    [TLY_AGG_LAST_K] = "last_k",
};

tly_err_t tly_agg_parse(const char *name, tly_agg_kind_t *kind)
{
    for (int i = 0; i < TLY_AGG__COUNT; i++) {
        if (strcmp(name, agg_names[i]) == 0) {
            *kind = (tly_agg_kind_t)i;
            return TLY_OK;
        }
    }
    return TLY_E_INVAL;
}

const char *tly_agg_name(tly_agg_kind_t kind)
{
    if ((unsigned)kind >= TLY_AGG__COUNT)
        return "unknown";
    return agg_names[kind];
}

bool tly_agg_windowed(tly_agg_kind_t kind)
{
    return kind <= TLY_AGG_AVG;
}

bool tly_agg_numeric(tly_agg_kind_t kind)
{
    return kind >= TLY_AGG_SUM && kind <= TLY_AGG_AVG;
}

static double bits_to_double(int64_t bits)
{
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static int64_t double_to_bits(double d)
{
    int64_t bits;
    memcpy(&bits, &d, sizeof bits);
    return bits;
}

static double cell_as_double(const tly_cell_t *c)
{
    return (c->flags & TLY_CELL_FLOAT) ? bits_to_double(c->bits) : (double)c->bits;
}

static void cell_to_float(tly_cell_t *c)
{
    if (!(c->flags & TLY_CELL_FLOAT)) {
        c->bits = double_to_bits((double)c->bits);
        c->flags |= TLY_CELL_FLOAT;
    }
}

static uint32_t sat_add(uint32_t a, uint32_t b)
{
    return (a > UINT32_MAX - b) ? UINT32_MAX : a + b;
}

/* Compares int64 i with double d exactly (<0, 0, >0): converting i to a
 * double rounds it past 2^53, which made 2^53 + 1 equal to 2^53. d is
 * finite (JSON has no NaN or infinity). */
static int cmp_int_double(int64_t i, double d)
{
    if (d >= 9223372036854775808.0) /* 2^63: above every int64 */
        return -1;
    if (d < -9223372036854775808.0)
        return 1;
    int64_t whole = (int64_t)d; /* exact: |d| < 2^63, truncated toward 0 */
    if (i != whole)
        return i < whole ? -1 : 1;
    double frac = d - (double)whole; /* exact */
    return (frac < 0) - (frac > 0);
}

/* Folds a numeric operand (is_float, i or d) into a non-count cell whose
 * operand count is n_add (>= 1). */
static void fold(tly_agg_kind_t kind, tly_cell_t *c, bool is_float, int64_t i, double d,
                 uint32_t n_add)
{
    bool empty = c->n == 0;
    c->n = sat_add(c->n, n_add);
    switch (kind) {
    case TLY_AGG_SUM:
    case TLY_AGG_AVG: {
        int64_t r;
        if (!is_float && !(c->flags & TLY_CELL_FLOAT) && !__builtin_add_overflow(c->bits, i, &r)) {
            c->bits = r;
            return;
        }
        cell_to_float(c);
        c->bits = double_to_bits(bits_to_double(c->bits) + (is_float ? d : (double)i));
        return;
    }
    case TLY_AGG_MIN:
    case TLY_AGG_MAX: {
        bool want_min = kind == TLY_AGG_MIN;
        if (empty) {
            c->flags = is_float ? TLY_CELL_FLOAT : 0;
            c->bits = is_float ? double_to_bits(d) : i;
            return;
        }
        bool cur_float = (c->flags & TLY_CELL_FLOAT) != 0;
        int cmp; /* the operand against the cell's value: <0, 0, >0 */
        if (!is_float && !cur_float)
            cmp = (i > c->bits) - (i < c->bits);
        else if (is_float && cur_float) {
            double cur = bits_to_double(c->bits);
            cmp = (d > cur) - (d < cur);
        } else if (is_float)
            cmp = -cmp_int_double(c->bits, d);
        else
            cmp = cmp_int_double(i, bits_to_double(c->bits));
        bool better = want_min ? cmp < 0 : cmp > 0;
        if (better) {
            c->flags = is_float ? TLY_CELL_FLOAT : 0;
            c->bits = is_float ? double_to_bits(d) : i;
        }
        return;
    }
    default:
        return;
    }
}

void tly_agg_cell_add(tly_agg_kind_t kind, tly_cell_t *c, const tly_value_t *v)
{
    if (kind == TLY_AGG_COUNT) {
        c->n = sat_add(c->n, 1);
        return;
    }
    if (v->type == TLY_V_INT)
        fold(kind, c, false, v->u.i, 0, 1);
    else if (v->type == TLY_V_DOUBLE)
        fold(kind, c, true, 0, v->u.d, 1);
}

void tly_agg_cell_merge(tly_agg_kind_t kind, tly_cell_t *acc, const tly_cell_t *b)
{
    if (b->n == 0)
        return;
    if (kind == TLY_AGG_COUNT) {
        acc->n = sat_add(acc->n, b->n);
        return;
    }
    bool is_float = (b->flags & TLY_CELL_FLOAT) != 0;
    fold(kind, acc, is_float, is_float ? 0 : b->bits, is_float ? bits_to_double(b->bits) : 0, b->n);
}

tly_value_t tly_agg_result(tly_agg_kind_t kind, const tly_cell_t *acc)
{
    tly_value_t v = {.type = TLY_V_NIL};
    switch (kind) {
    case TLY_AGG_COUNT:
        v.type = TLY_V_INT;
        v.u.i = acc->n;
        break;
    case TLY_AGG_SUM:
        if (acc->flags & TLY_CELL_FLOAT) {
            v.type = TLY_V_DOUBLE;
            v.u.d = bits_to_double(acc->bits);
        } else {
            v.type = TLY_V_INT;
            v.u.i = acc->n ? acc->bits : 0;
        }
        break;
    case TLY_AGG_MIN:
    case TLY_AGG_MAX:
        if (acc->n == 0)
            break;
        if (acc->flags & TLY_CELL_FLOAT) {
            v.type = TLY_V_DOUBLE;
            v.u.d = bits_to_double(acc->bits);
        } else {
            v.type = TLY_V_INT;
            v.u.i = acc->bits;
        }
        break;
    case TLY_AGG_AVG:
        if (acc->n == 0)
            break;
        v.type = TLY_V_DOUBLE;
        v.u.d = cell_as_double(acc) / (double)acc->n;
        break;
    default:
        break;
    }
    return v;
}
