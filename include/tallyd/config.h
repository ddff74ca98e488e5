/*
 * config.h — tallyd's typed, validated configuration.
 *
 * tly_config_load() reads a YAML file (libyaml) into a tly_config_t. Every
 * scalar key of every section is described by one table in config.c
 * ({key, type, default, min, max, doc}) which drives parsing, validation,
 * defaults and `tallyd --help-config`. Unknown keys are errors. Every error
 * names file, line and key path, e.g.
 *   config/bad.yaml:14: features[2].windows[1]: "90x" is not a duration
 *
 * Pure (no threads, no clocks); the loaded config is immutable and may be
 * read from any thread once loaded.
 */
#ifndef TALLYD_CONFIG_H
#define TALLYD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "tallyd/agg.h"
#include "tallyd/error.h"

/* How the event time field is interpreted. */
typedef enum {
    TLY_TIME_KAFKA = 0, /* no time field: the Kafka message timestamp */
    TLY_TIME_MS,        /* integer epoch milliseconds */
    TLY_TIME_S,         /* integer or fractional epoch seconds */
    TLY_TIME_ISO8601    /* "2026-11-22T04:16:21.123Z" or with ±hh:mm offset */
} tly_time_unit_t;

typedef enum { TLY_MODE_SHARD = 0, TLY_MODE_REPLICA } tly_kafka_mode_t;
typedef enum { TLY_START_WINDOW = 0, TLY_START_EARLIEST, TLY_START_LATEST } tly_kafka_start_t;

/* `where: { field: value }` or `where: { field: [v1, v2] }`. Values are kept
 * as the YAML scalar text; feature compilation interprets them against the
 * event field's type. */
typedef struct {
    char *field;
    size_t nvalues;
    char **values;
    int line;
} tly_where_cfg_t;

typedef struct {
    char *name;   /* unique within its entity; [A-Za-z0-9_]+ */
    char *entity; /* entity type, e.g. "user"; [A-Za-z0-9_]+ */
    size_t nkeys; /* >= 1: `key: user_id` or `key: [user_id, category]` */
    char **keys;
    size_t nwhere; /* all conditions must hold (AND); a list is OR */
    tly_where_cfg_t *where;
    tly_agg_kind_t agg;
    size_t nvalues; /* count: 0; sum/min/max/avg: 1; last/last_k: >= 1 */
    char **values;
    size_t nwindows;     /* count/sum/min/max/avg: >= 1; last/last_k: 0 */
    int64_t *windows_ms; /* strictly increasing */
    int64_t hop_ms;      /* 0: default per window (DESIGN §3); else divides all */
    uint32_t k;          /* last_k: 1..10000; last: 1; others 0 */
    int line;            /* line of the feature's mapping in the file */
    struct {             /* line of each key's value; 0: the key is absent */
        int name, entity, key, agg, value, windows, hop, k;
    } lines;
} tly_feature_cfg_t;

typedef struct {
    char *key;
    char *value;
    int line; /* of the key in the file */
} tly_kv_t;

/* One kafka.topics entry: the topic and how its events are read. An entry
 * is a name (`engagements`) or a mapping `{name: T, events: {time: {field,
 * unit}, max_future_skew, max_bytes, max_string}}`; every events setting
 * the entry does not give is the top-level events.* one, so these fields
 * always hold the settings in force for the topic. */
typedef struct {
    char *name;
    char *time_field;          /* NULL: the Kafka message timestamp */
    tly_time_unit_t time_unit; /* TLY_TIME_KAFKA exactly when time_field is NULL */
    int64_t max_future_skew_ms;
    int64_t max_bytes;
    int64_t max_string;
    char *key_entity; /* entity type keyed by the message key; NULL: none */
    bool own_events; /* the entry overrides some events.* setting */
    int line;        /* line of the entry in the file */
} tly_topic_cfg_t;

typedef struct {
    char *path; /* file the config was loaded from (owned) */

    struct {
        char *listen;      /* "host:port" */
        char *admin;       /* "host:port", "" disables */
        char *advertise;   /* "host:port" named in -MOVED, "" = derived */
        char *requirepass; /* "" = no auth */
        int64_t max_clients;
        int64_t threads;
        char *unix_path;            /* unix socket path, "" = none */
        int64_t max_args;           /* arguments per request */
        int64_t max_bulk;           /* bytes per argument */
        int64_t max_query_buffer;   /* bytes of one pending request */
        int64_t max_output_buffer;  /* queued reply bytes: disconnect */
        int64_t output_soft_limit;  /* queued reply bytes: stop reading */
        int64_t output_stall_ms;    /* paused and reading no reply this long: read on */
        int64_t max_clients_memory; /* all clients' buffers: disconnect the largest */
        int64_t idle_timeout_ms;    /* no bytes from the client: disconnect */
        int64_t request_timeout_ms; /* incomplete request this old: disconnect */
        int64_t max_reply_values;   /* values in one FEATURES/MFEATURES reply */
    } server;

    struct {
        char *brokers; /* "embedded" = in-process mock cluster */
        char *group;
        size_t ntopics;
        char **topics;               /* topic names; the strings belong to topic_cfgs */
        tly_topic_cfg_t *topic_cfgs; /* aligned with topics */
        tly_kafka_mode_t mode;
        tly_kafka_start_t start;
        size_t nproperties; /* passed through to librdkafka verbatim */
        tly_kv_t *properties;
        int64_t ready_lag; /* messages behind the end at which the source is caught up */
        int64_t threads;   /* decode+apply threads, the poll thread included */
        char *endpoints_topic; /* shard mode: where owners publish their address */
    } kafka;

    struct {
        char *format;     /* "json" */
        char *time_field; /* NULL when unit == TLY_TIME_KAFKA */
        tly_time_unit_t time_unit;
        int64_t max_future_skew_ms;
        int64_t max_bytes;  /* largest accepted payload */
        int64_t max_string; /* longest string in a field a feature reads */
    } events;

    struct {
        int64_t idle_ttl_ms;    /* horizon of last/last_k items (> 0) */
        int64_t max_memory;     /* bytes of state past which no entity is created; 0 none */
        int64_t sweep_every_ms; /* expiry sweeper period */
    } store;

    struct {
        char *dir;
        int64_t every_ms;
        int64_t keep;
    } snapshot;

    struct {
        int64_t events_per_sec;
        int64_t users;
        int64_t pins;
        int64_t seed;
        int64_t history; /* events backfilled over the previous day */
    } demo;

    size_t nfeatures;
    tly_feature_cfg_t *features;
} tly_config_t;

/*
 * Loads and validates the YAML file at path.
 * Returns TLY_OK and sets *out to a new config (caller frees with
 * tly_config_free), or TLY_E_CONFIG / TLY_E_IO / TLY_E_NOMEM with a sentence
 * of the form "FILE:LINE: KEY.PATH: what is wrong" in errbuf (errlen bytes,
 * always NUL-terminated). *out is written only on success.
 */
tly_err_t tly_config_load(const char *path, tly_config_t **out, char *errbuf, size_t errlen);

/* Same as tly_config_load but from a NUL-terminated string; `name` stands in
 * for the file name in messages. */
tly_err_t tly_config_load_string(const char *yaml, const char *name, tly_config_t **out,
                                 char *errbuf, size_t errlen);

/* Frees cfg and everything it owns. NULL is allowed. */
void tly_config_free(tly_config_t *cfg);

/* Prints the one-screen summary of `--check-config`: entities, their
 * features, aggregations, windows and hops, key fields and sources. */
void tly_config_summary(const tly_config_t *cfg, FILE *out);

/* Prints the reference of every key (`--help-config`), generated from the
 * key table: key, type, default, range, doc. `markdown` selects a Markdown
 * table (for the README) instead of plain text. */
void tly_config_help(FILE *out, int markdown);

/*
 * Parses a duration "<n>ms|s|m|h|d" (n a positive decimal integer).
 * Returns TLY_OK and writes *ms, or TLY_E_INVAL (text malformed) or
 * TLY_E_RANGE (overflow). *ms is written only on success.
 */
tly_err_t tly_duration_parse(const char *text, int64_t *ms);

/* True when s is "host:port" or "[v6]:port" as the address keys
 * (server.listen, server.advertise, ...) take it: a port of 0–65535, a
 * bare IPv6 address only in brackets. */
bool tly_config_addr_ok(const char *s);

/* Formats ms as the shortest exact duration ("5m", "90s", "1500ms") into
 * buf (cap bytes). Returns buf. */
char *tly_duration_format(int64_t ms, char *buf, size_t cap);

#endif
