/*
 * config_int.h — what config.c (parsing) and config_doc.c (--help-config,
 * --check-config's summary) share: the key table and its types.
 *
 * Pure data and pure functions; any thread.
 */
#ifndef TALLYD_CONFIG_INT_H
#define TALLYD_CONFIG_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/config.h"

#define PATH_CAP 256 /* longest key path in messages */
#define TEXT_CAP 160 /* choice lists, ranges, key name lists */

typedef enum {
    K_STRING,    /* char * */
    K_INT,       /* int64_t, or uint32_t when the field is 4 bytes */
    K_DURATION,  /* int64_t milliseconds */
    K_BOOL,      /* bool */
    K_ENUM,      /* an int-sized C enum, from `choices` */
    K_AGG,       /* tly_agg_kind_t, via tly_agg_parse() */
    K_STRINGS,   /* size_t count + char ** */
    K_DURATIONS, /* size_t count + int64_t * */
    K_MAP,       /* size_t count + tly_kv_t * (name → scalar text) */
    K_WHERE,     /* size_t count + tly_where_cfg_t * */
    K_FEATURES,  /* the `features:` list */
    K_TOPICS     /* `kafka.topics`: names or {name, events} mappings */
} key_type_t;

/* Which struct a key's value lives in. */
typedef enum {
    S_CONFIG = 0, /* tly_config_t */
    S_FEATURE,    /* tly_feature_cfg_t, one per features[] item */
    S_TOPIC       /* tly_topic_cfg_t, one per kafka.topics[] mapping */
} key_scope_t;

enum {
    F_REQUIRED = 1u << 0,   /* must appear whenever its parent mapping does */
    F_NONEMPTY = 1u << 1,   /* string: not ""; list: at least one item */
    F_IDENT = 1u << 2,      /* [A-Za-z0-9_]+ */
    F_ADDR = 1u << 3,       /* host:port ("" passes unless F_NONEMPTY) */
    F_SECONDS = 1u << 4,    /* duration: whole seconds */
    F_INCREASING = 1u << 5, /* duration list: strictly increasing */
};

typedef struct {
    const char *name;
    int value;
} choice_t;

typedef struct {
    const char *key; /* dotted path; "features[]." prefixes feature keys,
                        "kafka.topics[]." topic keys */
    key_type_t type;
    const char *def;  /* default as YAML text; NULL: none */
    int64_t min, max; /* int/duration range, checked when min < max */
    const char *doc;
    unsigned flags;
    const choice_t *choices; /* K_ENUM, and K_STRING restricted to a set */
    key_scope_t scope;       /* the struct off/count_off are in */
    size_t off, size;        /* the value (array pointer for lists) */
    size_t count_off;        /* list types: the size_t item count */
} key_def_t;

/* Every key; order is the order of `--help-config`. */
extern const key_def_t tly_config_keys[];
extern const size_t tly_config_nkeys;
extern const choice_t tly_config_mode_choices[], tly_config_start_choices[],
    tly_config_unit_choices[], tly_config_format_choices[];

/* Appends text to the NUL-terminated buf (cap bytes), truncating. */
void tly_config_append(char *buf, size_t cap, const char *text);
/* "a|b|c" of an enum or aggregation key, "" otherwise. */
void tly_config_choices_text(const key_def_t *def, char *buf, size_t cap);
/* "1ms..1d" or "1..64" when the key has a range, "" otherwise. */
void tly_config_range_text(const key_def_t *def, char *buf, size_t cap);

#endif
