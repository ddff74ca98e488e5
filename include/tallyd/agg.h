/*
 * agg.h — aggregation kinds and the kernels that fold them.
 *
 * A windowed aggregation (count, sum, min, max, avg) keeps one cell per
 * bucket. tly_agg_cell_add() folds one event value into a bucket's cell,
 * tly_agg_cell_merge() folds a bucket's cell into a window accumulator, and
 * tly_agg_result() turns the accumulator into the reply value. last and
 * last_k keep items, not cells (see store.c); last is last_k with k = 1.
 *
 * Numeric rules: a cell stays int64 while every value added is an integer and
 * the int64 sum does not overflow; otherwise it holds a double (flag
 * TLY_CELL_FLOAT). min/max compare numerically across int and double. count
 * ignores values. avg is sum/n as a double. An empty window gives count 0,
 * sum 0, min/max/avg nil.
 *
 * Pure; any thread.
 */
#ifndef TALLYD_AGG_H
#define TALLYD_AGG_H

#include <stdbool.h>
#include <stdint.h>

#include "tallyd/error.h"
#include "tallyd/value.h"

typedef enum {
    TLY_AGG_COUNT = 0,
    TLY_AGG_SUM,
    TLY_AGG_MIN,
    TLY_AGG_MAX,
    TLY_AGG_AVG,
    TLY_AGG_LAST,
    TLY_AGG_LAST_K,
    TLY_AGG__COUNT
} tly_agg_kind_t;

/* Parses "count", "sum", … into *kind. Returns TLY_OK or TLY_E_INVAL. */
tly_err_t tly_agg_parse(const char *name, tly_agg_kind_t *kind);

/* Returns the static lower-case name of kind. */
const char *tly_agg_name(tly_agg_kind_t kind);

/* True for the bucketed kinds (count, sum, min, max, avg). */
bool tly_agg_windowed(tly_agg_kind_t kind);

/* True when the kind reads a numeric value field (sum, min, max, avg). */
bool tly_agg_numeric(tly_agg_kind_t kind);

#define TLY_CELL_FLOAT 0x1u

/* One bucket's (or one window's) state. `n` counts events; `bits` holds an
 * int64 or, with TLY_CELL_FLOAT in flags, a double's bit pattern. */
typedef struct {
    uint32_t n;
    uint32_t flags;
    int64_t bits;
} tly_cell_t;

/* An empty cell. */
#define TLY_CELL_INIT ((tly_cell_t){0, 0, 0})

/* Folds numeric value v (TLY_V_INT or TLY_V_DOUBLE; ignored for count) into
 * cell c. n saturates at UINT32_MAX. */
void tly_agg_cell_add(tly_agg_kind_t kind, tly_cell_t *c, const tly_value_t *v);

/* Folds bucket cell b into accumulator acc (same rules as add). */
void tly_agg_cell_merge(tly_agg_kind_t kind, tly_cell_t *acc, const tly_cell_t *b);

/* Turns an accumulator into the reply value: count → INT; sum → INT or
 * DOUBLE (0 when empty); min/max → INT, DOUBLE or NIL; avg → DOUBLE or NIL. */
tly_value_t tly_agg_result(tly_agg_kind_t kind, const tly_cell_t *acc);

#endif
