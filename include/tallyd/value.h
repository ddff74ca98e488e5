/*
 * value.h — a typed scalar as events carry it and queries return it.
 *
 * A tly_value_t never owns its string: `s` borrows from the decoded payload
 * (decode), from a caller's buffer (store reads) or from the config.
 * Pure; any thread.
 */
#ifndef TALLYD_VALUE_H
#define TALLYD_VALUE_H

#include <stdint.h>

typedef enum {
    TLY_V_NIL = 0, /* absent / JSON null / empty window for min, max, last */
    TLY_V_INT,     /* int64 */
    TLY_V_DOUBLE,  /* finite double */
    TLY_V_STR,     /* bytes s[0..len), not NUL-terminated */
    TLY_V_BOOL     /* i is 0 or 1 */
} tly_vtype_t;

typedef struct {
    tly_vtype_t type;
    uint32_t len; /* TLY_V_STR only */
    union {
        int64_t i;
        double d;
        const char *s;
    } u;
} tly_value_t;

#endif
