/*
 * feature.h — feature specs compiled from the config.
 *
 * Compilation turns the config's features into a tly_featset_t:
 *  - the event fields any feature references (keys, where, values) get dense
 *    ids, so decode extracts only those into tly_event_t.vals[id];
 *  - features are grouped by entity type; all features of one entity type
 *    share the same key fields (a config error otherwise), so one event
 *    yields at most one entity id per entity type;
 *  - `where` values are pre-parsed for each event type they may meet;
 *  - windows get their hops (default rule of window.h) and bucket counts.
 *
 * Matching rules (documented in the README): a `where` condition holds when
 * the event field exists and equals one of the listed values — a string field
 * compares as text, an integer field with a value that parses as the same
 * int64, a float field with the same double, a bool with true/false. A
 * missing field fails the condition (the event is not counted; it is not an
 * error). All conditions must hold.
 *
 * Entity ids: a key field that is a string is used as is; an integer is
 * rendered in decimal; a composite key joins its parts with '|'. Floats,
 * bools, null and missing keys are rejected (EV_WRONG_TYPE / EV_MISSING_KEY).
 *
 * Pure; a compiled featset is immutable and read from any thread.
 */
#ifndef TALLYD_FEATURE_H
#define TALLYD_FEATURE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tallyd/agg.h"
#include "tallyd/config.h"
#include "tallyd/error.h"
#include "tallyd/value.h"

#define TLY_MAX_FIELDS   64   /* distinct event fields referenced */
#define TLY_MAX_FEATURES 1024 /* features in one config */
#define TLY_MAX_WINDOWS  16   /* windows of one feature */
#define TLY_MAX_ID       512  /* bytes of an entity id (composite included) */
#define TLY_MAX_ENTITIES 64   /* entity types in one config */
#define TLY_MAX_ITEM_VALUES 8    /* value fields of one last/last_k feature */

/* One event as the features see it: the referenced fields by field id, and
 * the event time. Strings borrow from the payload or the decoder's scratch. */
typedef struct {
    int64_t time_ms;
    /* Bit e set: the event does not feed entity type e (its topic is keyed
     * by another entity type); 0 feeds every type. */
    uint64_t skip_entities;
    /* The event is already in the state a snapshot restored: it feeds only
     * the features that were not restored (tly_store_restored). */
    bool replayed;
    uint32_t nfields;
    tly_value_t vals[TLY_MAX_FIELDS]; /* TLY_V_NIL when absent */
} tly_event_t;

typedef struct {
    int64_t len_ms;
    int64_t hop_ms;
    uint32_t nbuckets; /* len/hop + 1 */
    char label[24];    /* "5m", as written in queries (name:label) */
    char *qname;       /* "name:label", the name replies carry (owned) */
    size_t qname_len;
} tly_window_t;

/* One accepted `where` value, pre-parsed. */
typedef struct {
    const char *text; /* the YAML scalar (borrowed from the config) */
    size_t len;
    bool has_int, has_double, has_bool;
    int64_t i;
    double d;
    bool b;
} tly_match_value_t;

/* An open-addressed index of the strings of a long `where` list (more than
 * TLY_MATCH_SCAN; shorter ones are scanned): a lookup hashes the string
 * once and compares about one candidate. */
typedef struct {
    const char *text; /* NULL: an empty slot */
    size_t len;
    uint32_t id; /* the string's index in the list indexed */
} tly_str_slot_t;

typedef struct {
    size_t mask;           /* slots - 1 */
    tly_str_slot_t *slots; /* owned; NULL: no index, scan the list */
} tly_str_index_t;

#define TLY_MATCH_SCAN 8 /* string lists up to this long are scanned */

typedef struct {
    uint32_t field;
    size_t nvalues;
    tly_match_value_t *values;
    /* the same values by type, for matching in O(log n) or O(1) whatever
     * the list's length */
    tly_str_index_t strs; /* over values[].text */
    size_t nints;
    int64_t *ints; /* the values that are integers, sorted (owned) */
    size_t ndoubles;
    double *doubles; /* ... that are numbers, sorted (owned) */
    unsigned bools;  /* bit 0: false is listed; bit 1: true is */
} tly_where_t;

/* One string value that distinct `where` conditions on one field list. */
typedef struct {
    const char *text; /* borrowed from the config */
    size_t len;
    uint64_t conds; /* the conditions (bits of tly_featset_t.conds) listing it */
} tly_match_lit_t;

/* The distinct `where` conditions on one event field. */
typedef struct {
    uint32_t field;
    uint64_t conds;        /* bits of tly_featset_t.conds */
    size_t nlits;          /* distinct string values they list */
    tly_match_lit_t *lits; /* owned */
    tly_str_index_t index; /* over lits[].text */
} tly_cond_field_t;

typedef struct {
    uint32_t id;      /* index in featset.feats */
    const char *name; /* borrowed from the config */
    size_t name_len;
    uint32_t entity;  /* index in featset.entities */
    uint32_t slot;    /* index among its entity's features */
    size_t nwhere;
    tly_where_t *where;
    uint64_t conds; /* its where conditions as bits of featset.conds (if match_masks) */
    tly_agg_kind_t agg;
    size_t nvalues; /* value fields (field ids) */
    uint32_t *values;
    size_t nwindows;
    tly_window_t *windows;
    uint32_t k;         /* last_k capacity (1 for last) */
    int64_t horizon_ms; /* longest window; store.idle_ttl for last/last_k */
} tly_feat_t;

typedef struct {
    const char *name; /* entity type ("user") */
    size_t nkeys;
    uint32_t *keys; /* key field ids */
    size_t nfeats;
    uint32_t *feats;    /* feature ids, in config order */
    int64_t horizon_ms; /* max horizon of its features */
} tly_entity_t;

/* How the events of one source are read: the top-level events.* settings,
 * or one kafka.topics entry's (its own overrides, the rest inherited). */
typedef struct {
    const char *topic; /* borrowed from the config; NULL for the top level */
    int time_field;    /* field id of the event time, -1: Kafka timestamp */
    tly_time_unit_t time_unit;
    int64_t max_future_skew_ms;
    int64_t max_bytes;
    int64_t max_string;
    int key_entity; /* entity type whose id is the message key; -1: none */
} tly_event_rules_t;

typedef struct {
    size_t nfields;
    char **fields; /* field names by id (owned) */
    /* Fields with id < nfeat_fields are read by features (keys, where,
     * values); the ids above are time fields read by nothing else. */
    size_t nfeat_fields;
    /* The top-level events.* settings (time_field, time_unit and max_bytes
     * repeat them). max_future_skew_ms and max_string are the loosest of the
     * top level and every topic: the store's backstop; each topic's decoder
     * and source apply the topic's own. */
    int time_field;
    tly_time_unit_t time_unit;
    int64_t max_future_skew_ms;
    int64_t max_string;
    int64_t max_bytes;
    tly_event_rules_t events;
    size_t ntopics;            /* = config kafka.ntopics */
    tly_event_rules_t *topics; /* aligned with the config's kafka.topics */
    size_t nentities;
    tly_entity_t *entities;
    size_t nfeats;
    tly_feat_t *feats;
    /* The distinct `where` conditions of all features (same field, same
     * values in the same order), each tested once per event by
     * tly_featset_match(), grouped by field. match_masks: there are at most
     * 64, so that the bits of a uint64_t name them (else tly_feat_match()
     * alone serves). */
    bool match_masks;
    size_t nconds;
    const tly_where_t **conds; /* borrowed from feats[].where (owned array) */
    size_t ncond_fields;
    tly_cond_field_t *cond_fields;
} tly_featset_t;

/*
 * Compiles cfg's features. cfg must outlive the featset (names are
 * borrowed). Returns TLY_OK and *out (caller frees with tly_featset_free), or
 * TLY_E_CONFIG with "FILE:LINE: features[i].key: sentence" in errbuf.
 */
tly_err_t tly_featset_compile(const tly_config_t *cfg, tly_featset_t **out, char *errbuf,
                              size_t errlen);

/* Frees fs. NULL is allowed. */
void tly_featset_free(tly_featset_t *fs);

/* Returns the entity index named name[0..len), or -1. */
int tly_featset_entity(const tly_featset_t *fs, const char *name, size_t len);

/* Returns the field id named name[0..len), or -1. */
int tly_featset_field(const tly_featset_t *fs, const char *name, size_t len);

/*
 * Resolves "name" or "name:window" among entity's features. Returns TLY_OK
 * with *feat (feature id) and *window (window index, or -1 when no window was
 * named), or TLY_E_NOTFOUND (no such feature, or no such window of it).
 */
tly_err_t tly_featset_resolve(const tly_featset_t *fs, uint32_t entity, const char *spec,
                              size_t len, uint32_t *feat, int *window);

/* True when every `where` condition of feat holds for ev. */
bool tly_feat_match(const tly_feat_t *feat, const tly_event_t *ev);

/* The earliest event time that can still change an answer of feat at
 * now_ms: the start of its widest window's range by the window rule (up to
 * a hop before now − W), or now − horizon for last/last_k. */
int64_t tly_feat_earliest(const tly_feat_t *feat, int64_t now_ms);

/*
 * The distinct `where` conditions that hold for ev, as bits of fs->conds;
 * only when fs->match_masks. A feature matches ev — tly_feat_match() is
 * true — exactly when (feat->conds & ~mask) == 0; each condition is tested
 * once per event, not once per feature that names it, and a string field
 * is compared once with each distinct value listed on it.
 */
uint64_t tly_featset_match(const tly_featset_t *fs, const tly_event_t *ev);

/* Whether ids are rendered a word at a time (little-endian hosts, unless
 * built with TLY_PORTABLE, which tests the byte-wise code on any host). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && !defined(TLY_PORTABLE)
#define TLY_ID_WORDS 1
#else
#define TLY_ID_WORDS 0
#endif

/* tly_entity_id for any id (tly_entity_id takes the usual one inline). */
tly_err_t tly_entity_id_any(const tly_featset_t *fs, uint32_t entity, const tly_event_t *ev,
                            char *buf, size_t cap, size_t *len);

#if TLY_ID_WORDS
/* The eight decimal digits of u < 10^8, leading zeros included, as bytes
 * 0..9 with the most significant first in memory (little-endian): the
 * halves of four digits, then pairs, then single digits split in every lane
 * at once by multiplying with a scaled reciprocal (exact for these ranges:
 * x * 5243 >> 19 is x / 100 for x < 10^4, x * 103 >> 10 is x / 10 for
 * x < 100). */
static inline uint64_t tly_digit_bytes8(uint64_t u)
{
    uint64_t x = u / 10000 | (u % 10000) << 32;
    uint64_t h = (x * 5243) >> 19 & UINT64_C(0x0000007F0000007F);
    x = (x - h * 100) << 16 | h;
    uint64_t t = (x * 103) >> 10 & UINT64_C(0x000F000F000F000F);
    return (x - t * 10) << 8 | t;
}
#endif

/*
 * Renders the id of entity type `entity` from ev into buf (cap bytes, not
 * NUL-terminated; the bytes of buf past the id, up to the eighth, may be
 * written too). Returns TLY_OK and *len, or EV_MISSING_KEY,
 * EV_WRONG_TYPE, or EV_VALUE_TOO_LONG (id longer than cap). The usual id,
 * one integer key of up to eight digits, is rendered here in one word (the
 * digits moved to its low bytes); any other by tly_entity_id_any.
 */
static inline tly_err_t tly_entity_id(const tly_featset_t *fs, uint32_t entity,
                                      const tly_event_t *ev, char *buf, size_t cap, size_t *len)
{
#if TLY_ID_WORDS
    const tly_entity_t *ent = &fs->entities[entity];
    if (ent->nkeys == 1 && cap >= 8 && ent->keys[0] < ev->nfields) {
        const tly_value_t *v = &ev->vals[ent->keys[0]];
        if (v->type == TLY_V_INT && v->u.i >= 0 && v->u.i < 100000000) {
            uint64_t x = tly_digit_bytes8((uint64_t)v->u.i);
            size_t d = x == 0 ? 1 : 8 - (size_t)__builtin_ctzll(x) / 8;
            x = (x | UINT64_C(0x3030303030303030)) >> (8 * (8 - d));
            memcpy(buf, &x, 8);
            *len = d;
            return TLY_OK;
        }
    }
#endif
    return tly_entity_id_any(fs, entity, ev, buf, cap, len);
}

#endif
