/*
 * config.c — YAML file → validated, immutable tly_config_t.
 *
 * One table, tly_config_keys[], describes every key tallyd accepts: its dotted path
 * ("server.listen", "features[].windows"), type, default, range, doc, and
 * where its value lives in tly_config_t or tly_feature_cfg_t. The same table
 * drives parsing, validation, defaults, freeing and `--help-config`, so a key
 * added to the table is parsed, documented and freed with no other change.
 *
 * Parsing walks libyaml's document tree (yaml_parser_load), so every node
 * carries its line: every error is "FILE:LINE: key.path: sentence". A YAML
 * null (`key:` with nothing after it, `~`) means "not given": the key keeps
 * its default, and a required key is still missing. A list key also accepts
 * a single value (`key: user_id` is `key: [user_id]`).
 *
 * Invariants: unknown keys, duplicate keys in one mapping and nodes of the
 * wrong kind are errors; *out is written only on success, and a failed load
 * frees everything it built. Feature-level checks that need the whole
 * feature set (key fields shared per entity, limits of feature.h) are left to
 * tly_featset_compile().
 *
 * Pure: no threads, no clocks. Any thread may load; a loaded config is
 * immutable.
 */
#include "tallyd/config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "tallyd/window.h"
#include "config_int.h"

#define CONFIG_MAX_BYTES (4u << 20) /* a config file larger than this is refused */
/* Collections nested deeper than this are refused before the file is
 * loaded: tallyd's own keys nest at most six deep (kafka.topics[].events.time), and libyaml's
 * scanner takes time quadratic in the depth (100,000 '[' took 30 s), so without a bound a broken
 * file could stall start-up instead of failing it. */
#define CONFIG_MAX_DEPTH 32
/* Entries one list or mapping may hold, checked before the file is loaded:
 * tallyd's longest lists hold at most 1024 features, and its checks for
 * repeated keys, topics, features and `where` values compare each entry
 * with the ones before (100,000 keys took 27 s), so without a bound a
 * file within CONFIG_MAX_BYTES could stall start-up for minutes. */
#define CONFIG_MAX_ENTRIES 4096
/* YAML nodes a file may stand for, an alias counting as every node of what
 * it repeats: the loader walks an aliased mapping again at every alias,
 * repeat checks and all, so without this bound a small file of aliases to
 * one large mapping could stall start-up (130 KB took 50 s). 1024 features
 * of a dozen nodes each fit many times over. */
#define CONFIG_MAX_NODES 65536

/* The enum fields are stored through an int (memcpy), so they must be one. */
_Static_assert(sizeof(tly_kafka_mode_t) == sizeof(int), "enum size");
_Static_assert(sizeof(tly_kafka_start_t) == sizeof(int), "enum size");
_Static_assert(sizeof(tly_time_unit_t) == sizeof(int), "enum size");
_Static_assert(sizeof(tly_agg_kind_t) == sizeof(int), "enum size");

const choice_t tly_config_mode_choices[] = {
    {"shard", TLY_MODE_SHARD}, {"replica", TLY_MODE_REPLICA}, {NULL, 0}};
const choice_t tly_config_start_choices[] = {{"window", TLY_START_WINDOW},
                                             {"earliest", TLY_START_EARLIEST},
                                             {"latest", TLY_START_LATEST},
                                             {NULL, 0}};
const choice_t tly_config_unit_choices[] = {
    {"ms", TLY_TIME_MS}, {"s", TLY_TIME_S}, {"iso8601", TLY_TIME_ISO8601}, {NULL, 0}};
const choice_t tly_config_format_choices[] = {{"json", 0}, {NULL, 0}};

#define FIELD_(T, m)   .off = offsetof(T, m), .size = sizeof(((T *)0)->m)
#define CFG(m)         FIELD_(tly_config_t, m)
#define CFGLIST(n, m)  .count_off = offsetof(tly_config_t, n), CFG(m)
#define FEAT(m)        .scope = S_FEATURE, FIELD_(tly_feature_cfg_t, m)
#define TOPIC(m)       .scope = S_TOPIC, FIELD_(tly_topic_cfg_t, m)
#define FEATLIST(n, m) .count_off = offsetof(tly_feature_cfg_t, n), FEAT(m)
#define SEC(n)         ((n)*TLY_MS_SECOND)
#define HOUR(n)        ((n)*TLY_MS_HOUR)
#define DAY(n)         ((n)*TLY_MS_DAY)

/* One row: path, type, default, min, max, flags, choices, storage, doc. */
#define KEY(path, ty, dflt, lo, hi, fl, ch, storage, text)                                         \
    {                                                                                              \
        .key = path, .type = ty, .def = dflt, .min = lo, .max = hi, .flags = fl, .choices = ch,    \
        storage, .doc = text                                                                       \
    }

/* Every key. Order is the order of `--help-config`; a section's keys stay
 * together (the unknown-key hint lists them). */
const key_def_t tly_config_keys[] = {
    KEY("server.listen", K_STRING, "127.0.0.1:7379", 0, 0, F_ADDR | F_NONEMPTY, NULL,
        CFG(server.listen),
        "Address of the RESP (Redis protocol) server, host:port (port 0: any free port, logged "
        "and shown by INFO). A non-loopback address needs "
        "server.requirepass."),
    KEY("server.admin", K_STRING, "127.0.0.1:9779", 0, 0, F_ADDR, NULL, CFG(server.admin),
        "Address of the HTTP admin server (/metrics, /healthz, /readyz), host:port; \"\" "
        "disables it."),
    KEY("server.advertise", K_STRING, "", 0, 0, F_ADDR, NULL, CFG(server.advertise),
        "Address other instances and clients reach this one at, host:port, named in -MOVED "
        "replies (shard mode); \"\": server.listen's host (this host's name when it is a "
        "wildcard) with the port actually bound."),
    KEY("server.requirepass", K_STRING, "", 0, 512, 0, NULL, CFG(server.requirepass),
        "Password clients send with AUTH; \"\" means no authentication (allowed only on a "
        "loopback listen address). At most 512 bytes: it must fit the request limits of "
        "clients not yet authenticated."),
    KEY("server.max_clients", K_INT, "10000", 1, 1000000, 0, NULL, CFG(server.max_clients),
        "Most client connections open at once; further connections are refused."),
    KEY("server.threads", K_INT, "1", 1, 64, 0, NULL, CFG(server.threads),
        "Query threads, each with its own event loop."),
    KEY("server.unix", K_STRING, "", 0, 0, 0, NULL, CFG(server.unix_path),
        "Path of an additional unix-domain socket for RESP clients; \"\" disables it."),
    KEY("server.max_args", K_INT, "65536", 8, 1048576, 0, NULL, CFG(server.max_args),
        "Most arguments in one request (MFEATURES ids and names included)."),
    KEY("server.max_bulk", K_INT, "65536", 1024, 536870912, 0, NULL, CFG(server.max_bulk),
        "Longest single argument of a request, in bytes; at most server.max_query_buffer."),
    KEY("server.max_query_buffer", K_INT, "16777216", 65536, 1073741824, 0, NULL,
        CFG(server.max_query_buffer),
        "Most bytes of one client's request that may be pending before it is complete; a "
        "larger request is a protocol error. At least server.max_bulk, at most "
        "server.max_clients_memory."),
    KEY("server.max_output_buffer", K_INT, "67108864", 65536, 4294967296, 0, NULL,
        CFG(server.max_output_buffer),
        "Most reply bytes queued for one client; a client that stops reading is "
        "disconnected when its replies reach this. At least server.output_soft_limit, at "
        "most server.max_clients_memory."),
    KEY("server.output_soft_limit", K_INT, "1048576", 4096, 4294967296, 0, NULL,
        CFG(server.output_soft_limit),
        "While a client has more reply bytes queued than this, its requests are not read "
        "(unless it stalls: server.output_stall); at most server.max_output_buffer."),
    KEY("server.output_stall", K_DURATION, "1s", 100, DAY(365), 0, NULL,
        CFG(server.output_stall_ms),
        "A client whose requests are not read (server.output_soft_limit) and that reads none "
        "of its replies for this long has its requests read again, its replies queued up to "
        "server.max_output_buffer: a client that writes its whole pipeline before it reads "
        "(redis-py's pipelines do) would otherwise wait on tallyd while tallyd waits on it, "
        "and a client that never reads is disconnected at that cap. Reading is judged by the "
        "reply bytes the kernel still holds for the client, which fall in steps of TCP "
        "window updates (about 128 KiB on loopback): keep this well above the time the "
        "slowest client takes to read that much. At server.idle_timeout or more, such a "
        "client waits until that closes it."),
    KEY("server.max_clients_memory", K_INT, "1073741824", 1048576, 1099511627776, 0, NULL,
        CFG(server.max_clients_memory),
        "Most bytes the buffers of all clients together may hold (pending requests, queued "
        "replies, request parsing); above it, clients holding more than an even share of it "
        "(this over the clients connected) are disconnected, unauthenticated ones first, then "
        "the largest, until the clients hold less. At least server.max_query_buffer and "
        "server.max_output_buffer."),
    KEY("server.idle_timeout", K_DURATION, "1h", SEC(1), DAY(365), 0, NULL,
        CFG(server.idle_timeout_ms), "A client that sends nothing for this long is disconnected."),
    KEY("server.request_timeout", K_DURATION, "10s", 100, HOUR(1), 0, NULL,
        CFG(server.request_timeout_ms),
        "A request still incomplete this long after its first byte, or after its latest 16 KiB, "
        "closes the connection (a client sending byte by byte); a long request that keeps "
        "arriving is not cut, however long the server, busy with others, takes to read it."),
    KEY("server.max_reply_values", K_INT, "100000", 1000, 1000000000, 0, NULL,
        CFG(server.max_reply_values),
        "Most values one FEATURES or MFEATURES reply may hold (ids × names × windows); a "
        "larger request is refused before any work is done. A command holds its event loop "
        "while it runs, about 0.2 µs a value (measured on a 2-vCPU VM: 224 ms for 975,000), "
        "so this bounds how long one request can delay the other clients of that loop."),

    KEY("kafka.brokers", K_STRING, "localhost:9092", 0, 0, F_NONEMPTY, NULL, CFG(kafka.brokers),
        "Kafka bootstrap servers, host:port[,host:port...]; \"embedded\" starts librdkafka's "
        "in-process mock cluster (the demo)."),
    KEY("kafka.group", K_STRING, "tallyd", 0, 0, F_NONEMPTY, NULL, CFG(kafka.group),
        "Consumer group id."),
    KEY("kafka.topics", K_TOPICS, "engagements", 0, 0, F_NONEMPTY, NULL,
        CFGLIST(kafka.ntopics, kafka.topic_cfgs),
        "Topics the events are read from: each a name, or a mapping with the "
        "kafka.topics[].* keys below, whose events settings apply to that topic only."),
    KEY("kafka.topics[].name", K_STRING, NULL, 0, 0, F_REQUIRED | F_NONEMPTY, NULL, TOPIC(name),
        "Topic name."),
    KEY("kafka.topics[].key", K_STRING, NULL, 0, 0, F_NONEMPTY, NULL, TOPIC(key_entity),
        "Entity type whose id is the topic's message key (the id as text, partitioned with "
        "murmur2 as the Java client does): the topic's events feed only that entity type's "
        "features. Required in shard mode when the features have several entity types."),
    KEY("kafka.topics[].events.time.field", K_STRING, NULL, 0, 0, F_REQUIRED | F_NONEMPTY, NULL,
        TOPIC(time_field),
        "Event field holding the event time of this topic's events; required when "
        "events.time is given. Default: events.time."),
    KEY("kafka.topics[].events.time.unit", K_ENUM, "ms", 0, 0, 0, tly_config_unit_choices,
        TOPIC(time_unit), "How the topic's events.time.field is read (see events.time.unit)."),
    KEY("kafka.topics[].events.max_future_skew", K_DURATION, NULL, 1, DAY(1), 0, NULL,
        TOPIC(max_future_skew_ms),
        "Events of this topic further than this ahead of the wall clock are dropped and "
        "counted."),
    KEY("kafka.topics[].events.max_bytes", K_INT, NULL, 64, 16777216, 0, NULL, TOPIC(max_bytes),
        "Largest event payload accepted from this topic, in bytes."),
    KEY("kafka.topics[].events.max_string", K_INT, NULL, 1, 65536, 0, NULL, TOPIC(max_string),
        "Longest string an event of this topic may carry in a field a feature reads."),
    KEY("kafka.mode", K_ENUM, "replica", 0, 0, 0, tly_config_mode_choices, CFG(kafka.mode),
        "replica: this instance consumes every partition (a full copy per sidecar); shard: "
        "the consumer group spreads partitions over instances, every topic names its key "
        "entity (kafka.topics[].key), and ids owned elsewhere get -MOVED."),
    KEY("kafka.start", K_ENUM, "window", 0, 0, 0, tly_config_start_choices, CFG(kafka.start),
        "Where consumption starts without a snapshot: window = the oldest event a window still "
        "counts (now minus the longest window, down to the start of its hop); earliest; "
        "latest (but a partition added to a topic already read starts at its beginning)."),
    KEY("kafka.properties", K_MAP, NULL, 0, 0, 0, NULL,
        CFGLIST(kafka.nproperties, kafka.properties),
        "librdkafka properties passed through verbatim (security.protocol, sasl.*, ssl.* ...), "
        "name: value. tallyd's own default queued.min.messages is 1000000 (librdkafka's is "
        "100000). librdkafka stops fetching while its local queue holds that many messages or "
        "queued.max.messages.kbytes of them; tallyd then asks the partition leaders for their "
        "end offsets as the queue drains (INFO fetch_nudges), which wakes the fetcher at once "
        "where librdkafka 2.0.2 would wait up to a second. enable.partition.eof is tallyd's "
        "(true): the end-of-partition events move positions past transaction markers."),
    KEY("kafka.endpoints_topic", K_STRING, "tallyd.endpoints", 0, 0, F_NONEMPTY, NULL,
        CFG(kafka.endpoints_topic),
        "Shard mode: compacted topic where each instance publishes server.advertise for the "
        "partitions it owns, so -MOVED replies can name the owner; created if missing."),
    KEY("kafka.threads", K_INT, "2", 1, 64, 0, NULL, CFG(kafka.threads),
        "Threads that decode and apply events, the consumer's poll thread among them. With 2 "
        "or more, a batch of 64 messages or more is pipelined: the poll thread decodes it and "
        "hands it to the other threads, which apply it while the poll thread polls and "
        "decodes the next batch; the entities are split by id hash, and the poll thread "
        "applies a share of them itself as its time allows (INFO batches_pipelined). A batch "
        "from many partitions is split by partition instead. An entity's events from one "
        "partition are applied in offset order by one thread, whatever the message keys; 1 "
        "decodes and applies everything on the poll thread."),
    KEY("kafka.ready_lag", K_INT, "1000", 0, 1000000000, 0, NULL, CFG(kafka.ready_lag),
        "After an assignment, queries get -LOADING until every assigned partition is at most "
        "this many messages behind its end (clients may opt into stale reads with CLIENT "
        "STALE ON)."),

    KEY("events.format", K_STRING, "json", 0, 0, 0, tly_config_format_choices, CFG(events.format),
        "Payload format."),
    KEY("events.time.field", K_STRING, NULL, 0, 0, F_REQUIRED | F_NONEMPTY, NULL,
        CFG(events.time_field),
        "Event field holding the event time; required when events.time is given. Without "
        "events.time, the Kafka message timestamp is the event time."),
    KEY("events.time.unit", K_ENUM, "ms", 0, 0, 0, tly_config_unit_choices, CFG(events.time_unit),
        "How events.time.field is read: epoch milliseconds, epoch seconds, or an ISO 8601 "
        "string."),
    KEY("events.max_future_skew", K_DURATION, "1m", 1, DAY(1), 0, NULL,
        CFG(events.max_future_skew_ms),
        "Events further than this ahead of the wall clock are dropped and counted."),
    KEY("events.max_bytes", K_INT, "65536", 64, 16777216, 0, NULL, CFG(events.max_bytes),
        "Largest event payload accepted, in bytes; larger ones are dropped and counted."),
    KEY("events.max_string", K_INT, "256", 1, 65536, 0, NULL, CFG(events.max_string),
        "Longest string (bytes, after unescaping) an event may carry in a field a feature "
        "reads; an event with a longer one is dropped and counted."),

    KEY("store.max_memory", K_INT, "0", 0, INT64_C(1) << 50, 0, NULL, CFG(store.max_memory),
        "Bytes of entity state (INFO used_memory) past which an event's new entities are not "
        "created (counted as dropped_ev_store_full); entities already held keep taking events, "
        "and their records may still grow. 0: no limit."),
    KEY("store.idle_ttl", K_DURATION, "7d", SEC(1), DAY(365), 0, NULL, CFG(store.idle_ttl_ms),
        "Horizon of last and last_k: older items are not returned and older events are "
        "dropped as late; an entity expires once its newest event is older than this and "
        "than all its windows."),
    KEY("store.sweep_every", K_DURATION, "10s", SEC(1), HOUR(1), 0, NULL, CFG(store.sweep_every_ms),
        "Time the sweeper that expires idle entities takes to pass over all of them, in "
        "steps of 256 of them spread evenly over it (larger steps only when a pass would not "
        "fit otherwise)."),

    KEY("snapshot.dir", K_STRING, "/var/lib/tallyd", 0, 0, 0, NULL, CFG(snapshot.dir),
        "Directory holding state snapshots (created if missing); \"\" turns snapshots off. "
        "Not used with the embedded cluster, which holds only one run's events."),
    KEY("snapshot.every", K_DURATION, "30s", SEC(1), DAY(1), 0, NULL, CFG(snapshot.every_ms),
        "Period between snapshots."),
    KEY("snapshot.keep", K_INT, "3", 1, 100, 0, NULL, CFG(snapshot.keep),
        "Snapshots kept on disk; older ones are deleted."),

    KEY("demo.events_per_sec", K_INT, "20000", 1, 10000000, 0, NULL, CFG(demo.events_per_sec),
        "Events per second the demo generator produces (kafka.brokers: embedded)."),
    KEY("demo.users", K_INT, "100000", 1, 1000000000, 0, NULL, CFG(demo.users),
        "Distinct users in the demo stream."),
    KEY("demo.pins", K_INT, "1000000", 1, 1000000000, 0, NULL, CFG(demo.pins),
        "Distinct pins in the demo stream."),
    KEY("demo.seed", K_INT, "42", 0, 0, 0, NULL, CFG(demo.seed),
        "Random seed of the demo stream: the same seed gives the same stream."),
    KEY("demo.history", K_INT, "200000", 0, 2000000, 0, NULL, CFG(demo.history),
        "Events the demo generator first produces spread over the day before it starts, so "
        "that 1h and 1d windows differ from 5m from the first query; 0 for none."),

    KEY("features", K_FEATURES, NULL, 0, 0, F_REQUIRED, NULL, CFGLIST(nfeatures, features),
        "The features to compute: a list of at least one mapping with the features[].* keys "
        "below."),
    KEY("features[].name", K_STRING, NULL, 0, 0, F_REQUIRED | F_IDENT, NULL, FEAT(name),
        "Feature name, unique within its entity; queries ask for name or name:window."),
    KEY("features[].entity", K_STRING, NULL, 0, 0, F_REQUIRED | F_IDENT, NULL, FEAT(entity),
        "Entity type the feature is kept for (user, pin ...); queries name it."),
    KEY("features[].key", K_STRINGS, NULL, 0, 0, F_REQUIRED | F_NONEMPTY, NULL,
        FEATLIST(nkeys, keys),
        "Event field(s) identifying the entity; a list makes a composite key (id parts joined "
        "with |, each | or \\ in a string part preceded by \\). An id is at most 255 bytes. "
        "Every feature of one entity uses the same key."),
    KEY("features[].where", K_WHERE, NULL, 0, 0, 0, NULL, FEATLIST(nwhere, where),
        "Conditions that must all hold: field: value, or field: [v1, v2] for any of the "
        "values. A missing field fails its condition."),
    KEY("features[].agg", K_AGG, NULL, 0, 0, F_REQUIRED, NULL, FEAT(agg), "Aggregation."),
    KEY("features[].value", K_STRINGS, NULL, 0, 0, 0, NULL, FEATLIST(nvalues, values),
        "Event field(s) aggregated: exactly one numeric field for sum/min/max/avg, one to eight "
        "for last/last_k, none for count."),
    KEY("features[].windows", K_DURATIONS, NULL, SEC(1), DAY(365), F_SECONDS | F_INCREASING, NULL,
        FEATLIST(nwindows, windows_ms),
        "Trailing windows in increasing order, whole seconds; required for "
        "count/sum/min/max/avg, not allowed for last/last_k."),
    KEY("features[].hop", K_DURATION, NULL, SEC(1), DAY(365), F_SECONDS, NULL, FEAT(hop_ms),
        "Bucket width, whole seconds, dividing every window. Default per window: the largest "
        "of 1s, 10s, 1m, 5m, 1h, 1d giving at least 30 buckets."),
    KEY("features[].k", K_INT, NULL, 1, 10000, 0, NULL, FEAT(k),
        "Items last_k keeps, newest first (required for last_k; last keeps 1)."),
};

#define NKEYS (sizeof tly_config_keys / sizeof tly_config_keys[0])
const size_t tly_config_nkeys = NKEYS;

/* librdkafka properties that tallyd sets from its own keys. */
static const struct {
    const char *property, *use;
} reserved_properties[] = {
    {"bootstrap.servers", "kafka.brokers"},
    {"metadata.broker.list", "kafka.brokers"},
    {"group.id", "kafka.group"},
};

/* State of one load. seen[i] is the value node of tly_config_keys[i] in the
 * mapping being parsed (feature keys are reset per feature); NULL: absent. */
typedef struct {
    const char *name; /* file name for messages */
    yaml_document_t *doc;
    tly_config_t *cfg;
    char *errbuf;
    size_t errlen;
    yaml_node_t *seen[NKEYS];
} parse_t;

/* ---------------------------------------------------------------------------
 * Durations, integers, names
 */

static const struct {
    const char *suffix;
    int64_t ms;
} duration_units[] = {
    {"d", TLY_MS_DAY}, {"h", TLY_MS_HOUR}, {"m", TLY_MS_MINUTE}, {"s", TLY_MS_SECOND}, {"ms", 1},
};

#define NUNITS (sizeof duration_units / sizeof duration_units[0])

tly_err_t tly_duration_parse(const char *text, int64_t *ms)
{
    if (text == NULL || !isdigit((unsigned char)text[0]))
        return TLY_E_INVAL;
    const char *s = text;
    int64_t n = 0;
    bool overflow = false;
    for (; isdigit((unsigned char)*s); s++) {
        int digit = *s - '0';
        if (n > (INT64_MAX - digit) / 10)
            overflow = true;
        else
            n = n * 10 + digit;
    }
    for (size_t i = 0; i < NUNITS; i++) {
        if (strcmp(s, duration_units[i].suffix) != 0)
            continue;
        if (n == 0 && !overflow)
            return TLY_E_INVAL; /* durations are positive */
        if (overflow || n > INT64_MAX / duration_units[i].ms)
            return TLY_E_RANGE;
        *ms = n * duration_units[i].ms;
        return TLY_OK;
    }
    return TLY_E_INVAL;
}

char *tly_duration_format(int64_t ms, char *buf, size_t cap)
{
    if (ms == 0) {
        snprintf(buf, cap, "0s");
        return buf;
    }
    for (size_t i = 0; i < NUNITS; i++) {
        if (ms % duration_units[i].ms == 0) {
            snprintf(buf, cap, "%" PRId64 "%s", ms / duration_units[i].ms,
                     duration_units[i].suffix);
            break;
        }
    }
    return buf;
}

/* Parses a decimal int64 ("-12", "300"; no '+', spaces or other bases).
 * Returns TLY_OK, TLY_E_INVAL or TLY_E_RANGE; *v written only on success. */
static tly_err_t parse_int(const char *text, int64_t *v)
{
    const char *digits = text[0] == '-' ? text + 1 : text;
    if (!isdigit((unsigned char)digits[0]))
        return TLY_E_INVAL;
    char *end;
    errno = 0;
    long long x = strtoll(text, &end, 10);
    if (*end != '\0')
        return TLY_E_INVAL;
    if (errno == ERANGE)
        return TLY_E_RANGE;
    *v = x;
    return TLY_OK;
}

static bool is_ident(const char *s)
{
    if (*s == '\0')
        return false;
    for (; *s; s++) {
        if (!isalnum((unsigned char)*s) && *s != '_')
            return false;
    }
    return true;
}

/* Splits "host:port" / "[v6]:port"; true when well formed. */
static bool addr_split(const char *s, const char **port, size_t *hostlen)
{
    const char *colon = strrchr(s, ':');
    if (colon == NULL || colon == s)
        return false;
    size_t hlen = (size_t)(colon - s);
    if (s[0] == '[') {
        if (hlen < 3 || s[hlen - 1] != ']')
            return false;
    } else if (memchr(s, ':', hlen) != NULL) {
        return false; /* a bare IPv6 address: ambiguous, needs [brackets] */
    }
    const char *p = colon + 1;
    size_t plen = strlen(p);
    if (plen == 0 || plen > 5 || strspn(p, "0123456789") != plen)
        return false;
    long n = strtol(p, NULL, 10);
    if (n < 0 || n > 65535) /* 0: any free port (INFO tcp_port tells which) */
        return false;
    *port = p;
    *hostlen = hlen;
    return true;
}

bool tly_config_addr_ok(const char *s)
{
    const char *port;
    size_t hostlen;
    return addr_split(s, &port, &hostlen);
}

static bool addr_is_loopback(const char *s)
{
    const char *port;
    size_t hlen;
    if (!addr_split(s, &port, &hlen))
        return false;
    if ((hlen == 9 && strncmp(s, "localhost", 9) == 0) ||
        (hlen == 5 && strncmp(s, "[::1]", 5) == 0))
        return true;
    /* 127.0.0.0/8 as a numeric address only: a host name starting "127."
     * resolves to whatever its DNS says */
    char host[INET_ADDRSTRLEN];
    struct in_addr a;
    if (hlen >= sizeof host)
        return false;
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    return inet_pton(AF_INET, host, &a) == 1 && ntohl(a.s_addr) >> 24 == 127;
}

/* ---------------------------------------------------------------------------
 * Key table look-ups and text for messages and help
 */

static int find_key(const char *key)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (strcmp(tly_config_keys[i].key, key) == 0)
            return (int)i;
    }
    return -1;
}

/* True when some key lies below `key` ("events.time" for events.time.*). */
static bool is_section(const char *key)
{
    size_t n = strlen(key);
    for (size_t i = 0; i < NKEYS; i++) {
        if (strncmp(tly_config_keys[i].key, key, n) == 0 && tly_config_keys[i].key[n] == '.')
            return true;
    }
    return false;
}

/* True when `parent` is key's path minus its last component. */
static bool parent_is(const char *key, const char *parent)
{
    const char *dot = strrchr(key, '.');
    size_t n = dot ? (size_t)(dot - key) : 0;
    return strlen(parent) == n && strncmp(key, parent, n) == 0;
}

/* The last component of a key path. */
static const char *leaf(const char *key)
{
    const char *dot = strrchr(key, '.');
    return dot ? dot + 1 : key;
}

/* Appends to buf (cap bytes, NUL-terminated) as much of the text as fits. */
void tly_config_append(char *buf, size_t cap, const char *text)
{
    size_t used = strlen(buf);
    if (used + 1 < cap)
        snprintf(buf + used, cap - used, "%s", text);
}

/* Writes the names one level below tkey ("listen, admin, ...") into buf. */
static void child_names(const char *tkey, char *buf, size_t cap)
{
    size_t plen = strlen(tkey), prevlen = 0;
    const char *prev = NULL;
    buf[0] = '\0';
    for (size_t i = 0; i < NKEYS; i++) {
        const char *k = tly_config_keys[i].key;
        if (plen > 0) {
            if (strncmp(k, tkey, plen) != 0 || k[plen] != '.')
                continue;
            k += plen + 1;
        }
        size_t n = strcspn(k, ".");
        if (memchr(k, '[', n) != NULL || (prev && n == prevlen && strncmp(k, prev, n) == 0))
            continue;
        char name[64];
        snprintf(name, sizeof name, "%s%.*s", buf[0] ? ", " : "", (int)n, k);
        tly_config_append(buf, cap, name);
        prev = k;
        prevlen = n;
    }
}

/* Writes the accepted values of an enum-like key ("shard|replica"). */
void tly_config_choices_text(const key_def_t *def, char *buf, size_t cap)
{
    buf[0] = '\0';
    if (def->type == K_AGG) {
        for (int i = 0; i < TLY_AGG__COUNT; i++) {
            if (i > 0)
                tly_config_append(buf, cap, "|");
            tly_config_append(buf, cap, tly_agg_name((tly_agg_kind_t)i));
        }
        return;
    }
    for (const choice_t *c = def->choices; c && c->name; c++) {
        if (c != def->choices)
            tly_config_append(buf, cap, "|");
        tly_config_append(buf, cap, c->name);
    }
}

/* Writes "1..64" or "1s..1d" for a key with a range, else "". */
void tly_config_range_text(const key_def_t *def, char *buf, size_t cap)
{
    char lo[32], hi[32];
    buf[0] = '\0';
    if (def->min >= def->max)
        return;
    if (def->type == K_DURATION || def->type == K_DURATIONS)
        snprintf(buf, cap, "%s..%s", tly_duration_format(def->min, lo, sizeof lo),
                 tly_duration_format(def->max, hi, sizeof hi));
    else if (def->type == K_STRING)
        snprintf(buf, cap, "%" PRId64 "..%" PRId64 " bytes", def->min, def->max);
    else
        snprintf(buf, cap, "%" PRId64 "..%" PRId64, def->min, def->max);
}

/* ---------------------------------------------------------------------------
 * Errors and YAML nodes
 */

static tly_err_t fail(parse_t *p, const yaml_node_t *at, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int line_of(const yaml_node_t *node)
{
    return node ? (int)node->start_mark.line + 1 : 1;
}

/* Writes "FILE:LINE: path: <fmt>" (path NULL: "FILE:LINE: <fmt>") into the
 * caller's errbuf; returns TLY_E_CONFIG. */
static tly_err_t vfail_at(parse_t *p, size_t line, const char *path, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));
static tly_err_t vfail_at(parse_t *p, size_t line, const char *path, const char *fmt, va_list ap)
{
    if (p->errlen == 0)
        return TLY_E_CONFIG;
    int n = path ? snprintf(p->errbuf, p->errlen, "%s:%zu: %s: ", p->name, line,
                            path[0] ? path : "(top level)")
                 : snprintf(p->errbuf, p->errlen, "%s:%zu: ", p->name, line);
    if (n >= 0 && (size_t)n < p->errlen)
        vsnprintf(p->errbuf + n, p->errlen - (size_t)n, fmt, ap);
    return TLY_E_CONFIG;
}

static tly_err_t fail(parse_t *p, const yaml_node_t *at, const char *path, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tly_err_t rc = vfail_at(p, (size_t)line_of(at), path, fmt, ap);
    va_end(ap);
    return rc;
}

static tly_err_t nomem(parse_t *p)
{
    if (p->errlen > 0)
        snprintf(p->errbuf, p->errlen, "%s: out of memory", p->name);
    return TLY_E_NOMEM;
}

static yaml_node_t *node_at(parse_t *p, int index)
{
    return yaml_document_get_node(p->doc, index);
}

static const char *kind_name(const yaml_node_t *node)
{
    switch (node->type) {
    case YAML_SEQUENCE_NODE:
        return "a list";
    case YAML_MAPPING_NODE:
        return "a mapping";
    default:
        return "a single value";
    }
}

/* True for a plain empty, ~ or null scalar: "not given". */
static bool is_null(const yaml_node_t *node)
{
    if (node == NULL)
        return true;
    if (node->type != YAML_SCALAR_NODE || node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    const char *s = (const char *)node->data.scalar.value;
    return s[0] == '\0' || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 ||
           strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0;
}

/* Returns the text of a scalar node, or fails for any other kind. */
static tly_err_t get_scalar(parse_t *p, const yaml_node_t *node, const char *path,
                            const char **text)
{
    if (node->type != YAML_SCALAR_NODE)
        return fail(p, node, path, "expected a single value, found %s", kind_name(node));
    const char *s = (const char *)node->data.scalar.value;
    if (strlen(s) != node->data.scalar.length)
        return fail(p, node, path, "contains a NUL character");
    *text = s;
    return TLY_OK;
}

static void set_path(char *buf, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Writes a key path into buf (PATH_CAP bytes). A path from a pathological
 * file may be cut short; messages stay readable. */
static void set_path(char *buf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, PATH_CAP, fmt, ap);
    va_end(ap);
}

static void join_key(char *buf, const char *path, const char *key)
{
    set_path(buf, "%s%s%s", path, path[0] ? "." : "", key);
}

static void join_index(char *buf, const char *path, size_t i)
{
    set_path(buf, "%s[%zu]", path, i);
}

/* A list key accepts a single scalar as a one-item list. */
static size_t list_len(const yaml_node_t *node)
{
    if (node->type != YAML_SEQUENCE_NODE)
        return 1;
    return (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
}

/* The i-th item of a list (or the scalar itself) and its key path. */
static yaml_node_t *list_item(parse_t *p, yaml_node_t *node, size_t i, const char *path,
                              char *ipath)
{
    if (node->type != YAML_SEQUENCE_NODE) {
        set_path(ipath, "%s", path);
        return node;
    }
    join_index(ipath, path, i);
    return node_at(p, node->data.sequence.items.start[i]);
}

/* The text of a list item, which must be given: a null item ([~], [null],
 * [a, ]) is an error, not the text "~". */
static tly_err_t item_scalar(parse_t *p, const yaml_node_t *item, const char *ipath,
                             const char **text)
{
    if (is_null(item))
        return fail(p, item, ipath, "needs a value (a list item may not be empty or null)");
    return get_scalar(p, item, ipath, text);
}

/* Fails unless node is a mapping whose keys are distinct scalars. */
static tly_err_t check_mapping(parse_t *p, const yaml_node_t *node, const char *path,
                               const char *what)
{
    if (node->type != YAML_MAPPING_NODE)
        return fail(p, node, path, "expected %s, found %s", what, kind_name(node));
    const yaml_node_pair_t *start = node->data.mapping.pairs.start;
    for (const yaml_node_pair_t *a = start; a < node->data.mapping.pairs.top; a++) {
        const yaml_node_t *ka = node_at(p, a->key);
        if (ka->type != YAML_SCALAR_NODE)
            return fail(p, ka, path, "a key must be a plain name, not %s", kind_name(ka));
        if (strlen((const char *)ka->data.scalar.value) != ka->data.scalar.length)
            return fail(p, ka, path, "a key contains a NUL character");
        for (const yaml_node_pair_t *b = start; b < a; b++) {
            const yaml_node_t *kb = node_at(p, b->key);
            if (strcmp((const char *)ka->data.scalar.value, (const char *)kb->data.scalar.value) ==
                0) {
                char sub[PATH_CAP];
                join_key(sub, path, (const char *)ka->data.scalar.value);
                return fail(p, ka, sub, "duplicate key (first given at line %d)", line_of(kb));
            }
        }
    }
    return TLY_OK;
}

/* ---------------------------------------------------------------------------
 * Values: check text against a key and store it
 */

static bool is_list(key_type_t type)
{
    return type == K_STRINGS || type == K_DURATIONS || type == K_MAP || type == K_WHERE ||
           type == K_TOPICS;
}

static void *field_of(void *base, const key_def_t *def)
{
    return (char *)base + def->off;
}

static size_t *count_of(void *base, const key_def_t *def)
{
    return (size_t *)(void *)((char *)base + def->count_off);
}

static tly_err_t dup_into(parse_t *p, char **slot, const char *text)
{
    char *s = strdup(text);
    if (s == NULL)
        return nomem(p);
    free(*slot);
    *slot = s;
    return TLY_OK;
}

/* A value as an error message quotes it: whole up to SHOWN_MAX bytes, else
 * its first bytes (never half a UTF-8 character) and "...", so that the
 * reason after it is not cut off with it. */
#define SHOWN_MAX 64
static const char *shown(const char *text, char buf[SHOWN_MAX + 4])
{
    size_t n = strlen(text);
    if (n <= SHOWN_MAX)
        return text;
    n = SHOWN_MAX - 4;
    while (n > 0 && ((unsigned char)text[n] & 0xC0) == 0x80)
        n--;
    memcpy(buf, text, n);
    memcpy(buf + n, "...", 4);
    return buf;
}

/* Checks a string (or string-list item) against def's flags and choices. */
static tly_err_t check_string(parse_t *p, const key_def_t *def, const char *text,
                              const yaml_node_t *node, const char *path)
{
    char sb[SHOWN_MAX + 4];
    char choices[TEXT_CAP];
    if (text[0] == '\0' && (def->flags & F_NONEMPTY || def->type == K_STRINGS))
        return fail(p, node, path, "must not be empty");
    if (def->type == K_STRING && def->max > def->min && strlen(text) > (size_t)def->max)
        return fail(p, node, path, "is %zu bytes long; at most %" PRId64 " are allowed",
                    strlen(text), def->max);
    if (def->flags & F_IDENT && !is_ident(text))
        return fail(p, node, path, "\"%s\" may use only letters, digits and _", shown(text, sb));
    if (def->flags & F_ADDR && text[0] != '\0') {
        const char *port;
        size_t hostlen;
        if (!addr_split(text, &port, &hostlen))
            return fail(p, node, path, "\"%s\" is not host:port (e.g. 127.0.0.1:7379)",
                        shown(text, sb));
    }
    if (def->choices != NULL) {
        for (const choice_t *c = def->choices; c->name; c++) {
            if (strcmp(c->name, text) == 0)
                return TLY_OK;
        }
        tly_config_choices_text(def, choices, sizeof choices);
        return fail(p, node, path, "\"%s\" is not one of %s", shown(text, sb), choices);
    }
    return TLY_OK;
}

/* Parses a duration for def (single or list item) with its checks. */
static tly_err_t check_duration(parse_t *p, const key_def_t *def, const char *text,
                                const yaml_node_t *node, const char *path, int64_t *ms)
{
    char sb[SHOWN_MAX + 4];
    char range[TEXT_CAP];
    int64_t v = 0;
    tly_err_t rc = tly_duration_parse(text, &v);
    tly_config_range_text(def, range, sizeof range);
    if (rc == TLY_E_INVAL) {
        /* a zero with a unit ("0s") is a duration, just not a positive one */
        size_t z = strspn(text, "0");
        char one[32];
        int64_t unused;
        if (z > 0 && text[z] != '\0' && !isdigit((unsigned char)text[z]) &&
            snprintf(one, sizeof one, "1%s", text + z) < (int)sizeof one &&
            tly_duration_parse(one, &unused) == TLY_OK)
            return range[0]
                       ? fail(p, node, path, "%s is out of range (%s)", shown(text, sb), range)
                       : fail(p, node, path, "%s: a duration must be positive", shown(text, sb));
        return fail(p, node, path, "\"%s\" is not a duration (use <n>ms|s|m|h|d)", shown(text, sb));
    }
    if (def->flags & F_SECONDS && rc == TLY_OK && v % TLY_MS_SECOND != 0)
        return fail(p, node, path,
                    "\"%s\" is not a whole number of seconds (windows and hops are whole "
                    "seconds, at least 1s)",
                    shown(text, sb));
    if (rc == TLY_E_RANGE && range[0] == '\0')
        return fail(p, node, path, "%s does not fit in 64 bits of milliseconds", shown(text, sb));
    if (rc == TLY_E_RANGE || (range[0] && (v < def->min || v > def->max)))
        return fail(p, node, path, "%s is out of range (%s)", shown(text, sb), range);
    *ms = v;
    return TLY_OK;
}

/* Converts the scalar text of a single-valued key and stores it in base.
 * node (may be NULL for defaults) gives the line of errors. */
static tly_err_t set_scalar(parse_t *p, const key_def_t *def, const char *text,
                            const yaml_node_t *node, const char *path, void *base)
{
    char sb[SHOWN_MAX + 4];
    char range[TEXT_CAP];
    void *field = field_of(base, def);
    int64_t v = 0;
    tly_err_t rc;

    switch (def->type) {
    case K_STRING:
        rc = check_string(p, def, text, node, path);
        return rc ? rc : dup_into(p, field, text);
    case K_INT:
        rc = parse_int(text, &v);
        tly_config_range_text(def, range, sizeof range);
        if (rc == TLY_E_INVAL)
            return fail(p, node, path, "\"%s\" is not an integer", shown(text, sb));
        if (rc == TLY_E_RANGE && range[0] == '\0')
            return fail(p, node, path, "%s does not fit in a 64-bit integer", shown(text, sb));
        if (rc == TLY_E_RANGE || (range[0] && (v < def->min || v > def->max)))
            return fail(p, node, path, "%s is out of range (%s)", shown(text, sb), range);
        if (def->size == sizeof(uint32_t)) {
            uint32_t u = (uint32_t)v; /* the range keeps it within 32 bits */
            memcpy(field, &u, sizeof u);
        } else {
            memcpy(field, &v, sizeof v);
        }
        return TLY_OK;
    case K_DURATION:
        rc = check_duration(p, def, text, node, path, &v);
        if (rc == TLY_OK)
            memcpy(field, &v, sizeof v);
        return rc;
    case K_BOOL: {
        bool b = strcmp(text, "true") == 0;
        if (!b && strcmp(text, "false") != 0)
            return fail(p, node, path, "\"%s\" is not true or false", shown(text, sb));
        memcpy(field, &b, sizeof b);
        return TLY_OK;
    }
    case K_ENUM:
        rc = check_string(p, def, text, node, path);
        for (const choice_t *c = def->choices; rc == TLY_OK && c->name; c++) {
            if (strcmp(c->name, text) == 0) {
                memcpy(field, &c->value, sizeof c->value);
                break;
            }
        }
        return rc;
    case K_AGG: {
        tly_agg_kind_t kind;
        if (tly_agg_parse(text, &kind) != TLY_OK) {
            tly_config_choices_text(def, range, sizeof range);
            return fail(p, node, path, "\"%s\" is not an aggregation (use %s)", shown(text, sb),
                        range);
        }
        memcpy(field, &kind, sizeof kind);
        return TLY_OK;
    }
    default:
        return fail(p, node, path, "internal error: key type %d is not a scalar", def->type);
    }
}

static tly_err_t parse_strings(parse_t *p, const key_def_t *def, yaml_node_t *node,
                               const char *path, void *base)
{
    char ipath[PATH_CAP];
    const char *text;
    if (node->type == YAML_MAPPING_NODE)
        return fail(p, node, path, "expected a list, found a mapping");
    size_t n = list_len(node);
    if (n == 0 && def->flags & F_NONEMPTY)
        return fail(p, node, path, "needs at least one item");
    char **items = calloc(n ? n : 1, sizeof *items);
    if (items == NULL)
        return nomem(p);
    *count_of(base, def) = n; /* owned by the config from here on */
    *(char ***)field_of(base, def) = items;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = list_item(p, node, i, path, ipath);
        tly_err_t rc = item_scalar(p, item, ipath, &text);
        if (rc == TLY_OK)
            rc = check_string(p, def, text, item, ipath);
        if (rc == TLY_OK)
            rc = dup_into(p, &items[i], text);
        if (rc != TLY_OK)
            return rc;
    }
    return TLY_OK;
}

static tly_err_t parse_durations(parse_t *p, const key_def_t *def, yaml_node_t *node,
                                 const char *path, void *base)
{
    char ipath[PATH_CAP], prev[32];
    const char *text;
    if (node->type == YAML_MAPPING_NODE)
        return fail(p, node, path, "expected a list, found a mapping");
    size_t n = list_len(node);
    int64_t *items = calloc(n ? n : 1, sizeof *items);
    if (items == NULL)
        return nomem(p);
    *count_of(base, def) = n;
    *(int64_t **)field_of(base, def) = items;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = list_item(p, node, i, path, ipath);
        tly_err_t rc = item_scalar(p, item, ipath, &text);
        if (rc == TLY_OK)
            rc = check_duration(p, def, text, item, ipath, &items[i]);
        if (rc != TLY_OK)
            return rc;
        if (def->flags & F_INCREASING && i > 0 && items[i] <= items[i - 1])
            return fail(p, item, ipath,
                        "%s is not longer than the window before it (%s); list windows in "
                        "increasing order",
                        text, tly_duration_format(items[i - 1], prev, sizeof prev));
    }
    return TLY_OK;
}

static tly_err_t parse_map(parse_t *p, const key_def_t *def, yaml_node_t *node, const char *path,
                           void *base)
{
    char sub[PATH_CAP];
    const char *name, *text;
    tly_err_t rc = check_mapping(p, node, path, "a mapping of name: value");
    if (rc != TLY_OK)
        return rc;
    size_t n = (size_t)(node->data.mapping.pairs.top - node->data.mapping.pairs.start);
    tly_kv_t *kvs = calloc(n ? n : 1, sizeof *kvs);
    if (kvs == NULL)
        return nomem(p);
    *count_of(base, def) = n;
    *(tly_kv_t **)field_of(base, def) = kvs;
    for (size_t i = 0; i < n; i++) {
        const yaml_node_pair_t *pair = &node->data.mapping.pairs.start[i];
        yaml_node_t *key = node_at(p, pair->key), *val = node_at(p, pair->value);
        name = (const char *)key->data.scalar.value;
        join_key(sub, path, name);
        if (name[0] == '\0')
            return fail(p, key, path, "a name must not be empty");
        for (size_t r = 0; r < sizeof reserved_properties / sizeof reserved_properties[0]; r++) {
            if (strcmp(name, reserved_properties[r].property) == 0)
                return fail(p, key, sub, "set by tallyd; use %s instead",
                            reserved_properties[r].use);
        }
        if (is_null(val))
            return fail(p, val, sub, "needs a value");
        if ((rc = get_scalar(p, val, sub, &text)) != TLY_OK)
            return rc;
        if ((rc = dup_into(p, &kvs[i].key, name)) != TLY_OK ||
            (rc = dup_into(p, &kvs[i].value, text)) != TLY_OK)
            return rc;
        kvs[i].line = line_of(key);
    }
    return TLY_OK;
}

static tly_err_t parse_where(parse_t *p, const key_def_t *def, yaml_node_t *node, const char *path,
                             void *base)
{
    char sub[PATH_CAP], ipath[PATH_CAP];
    const char *text;
    tly_err_t rc = check_mapping(p, node, path, "a mapping of field: value");
    if (rc != TLY_OK)
        return rc;
    size_t n = (size_t)(node->data.mapping.pairs.top - node->data.mapping.pairs.start);
    tly_where_cfg_t *where = calloc(n ? n : 1, sizeof *where);
    if (where == NULL)
        return nomem(p);
    *count_of(base, def) = n;
    *(tly_where_cfg_t **)field_of(base, def) = where;
    for (size_t i = 0; i < n; i++) {
        const yaml_node_pair_t *pair = &node->data.mapping.pairs.start[i];
        yaml_node_t *key = node_at(p, pair->key), *val = node_at(p, pair->value);
        const char *field = (const char *)key->data.scalar.value;
        join_key(sub, path, field);
        where[i].line = line_of(key);
        if (field[0] == '\0')
            return fail(p, key, path, "a field name must not be empty");
        if ((rc = dup_into(p, &where[i].field, field)) != TLY_OK)
            return rc;
        if (is_null(val))
            return fail(p, val, sub, "needs a value or a list of values");
        if (val->type == YAML_MAPPING_NODE)
            return fail(p, val, sub, "expected a value or a list of values, found a mapping");
        size_t nv = list_len(val);
        if (nv == 0)
            return fail(p, val, sub, "needs at least one value");
        if ((where[i].values = calloc(nv, sizeof *where[i].values)) == NULL)
            return nomem(p);
        where[i].nvalues = nv;
        for (size_t j = 0; j < nv; j++) {
            yaml_node_t *item = list_item(p, val, j, sub, ipath);
            if ((rc = item_scalar(p, item, ipath, &text)) != TLY_OK ||
                (rc = dup_into(p, &where[i].values[j], text)) != TLY_OK)
                return rc;
        }
    }
    return TLY_OK;
}

/* ---------------------------------------------------------------------------
 * Mappings, features, the document
 */

static tly_err_t parse_features(parse_t *p, yaml_node_t *node, const char *path);
static tly_err_t parse_topics(parse_t *p, const key_def_t *def, yaml_node_t *node,
                              const char *path);

static tly_err_t parse_value(parse_t *p, const key_def_t *def, yaml_node_t *node, const char *path,
                             void *base)
{
    const char *text;
    tly_err_t rc;
    switch (def->type) {
    case K_STRINGS:
        return parse_strings(p, def, node, path, base);
    case K_DURATIONS:
        return parse_durations(p, def, node, path, base);
    case K_MAP:
        return parse_map(p, def, node, path, base);
    case K_WHERE:
        return parse_where(p, def, node, path, base);
    case K_FEATURES:
        return parse_features(p, node, path);
    case K_TOPICS:
        return parse_topics(p, def, node, path);
    default:
        rc = get_scalar(p, node, path, &text);
        return rc ? rc : set_scalar(p, def, text, node, path, base);
    }
}

/*
 * Parses mapping `map` whose keys live under table prefix tkey ("server",
 * "features[]", "" for the top level); path is the same place as messages
 * name it ("features[2]"). base is the struct the keys store into. map may be
 * NULL or null (an empty mapping).
 */
static tly_err_t parse_mapping(parse_t *p, yaml_node_t *map, const char *tkey, const char *path,
                               void *base)
{
    char tsub[PATH_CAP], sub[PATH_CAP], names[TEXT_CAP * 2];
    tly_err_t rc;

    if (!is_null(map)) {
        if ((rc = check_mapping(p, map, path, "a mapping (key: value)")) != TLY_OK)
            return rc;
        for (yaml_node_pair_t *pair = map->data.mapping.pairs.start;
             pair < map->data.mapping.pairs.top; pair++) {
            yaml_node_t *key = node_at(p, pair->key), *val = node_at(p, pair->value);
            const char *name = (const char *)key->data.scalar.value;
            join_key(tsub, tkey, name);
            join_key(sub, path, name);
            /* A dotted name would reach a table path from the wrong place
             * ("features[].k" at the top level): only plain names match. */
            int idx = strpbrk(name, ".[") ? -1 : find_key(tsub);
            rc = TLY_OK;
            if (idx >= 0 && !is_null(val)) {
                p->seen[idx] = val;
                rc = parse_value(p, &tly_config_keys[idx], val, sub, base);
            } else if (idx < 0 && !strpbrk(name, ".[") && is_section(tsub)) {
                if (!is_null(val)) /* a null section is an absent one */
                    rc = parse_mapping(p, val, tsub, sub, base);
            } else if (idx < 0) {
                child_names(tkey, names, sizeof names);
                rc = fail(p, key, sub, "unknown key (%sknown here: %s)",
                          strchr(name, '.') ? "write nested mappings, not dotted names; " : "",
                          names);
            }
            if (rc != TLY_OK)
                return rc;
        }
    }
    for (size_t i = 0; i < NKEYS; i++) {
        if (tly_config_keys[i].flags & F_REQUIRED && p->seen[i] == NULL &&
            parent_is(tly_config_keys[i].key, tkey)) {
            join_key(sub, path, leaf(tly_config_keys[i].key));
            return fail(p, map, sub, "required key is missing");
        }
    }
    return TLY_OK;
}

static yaml_node_t *seen_node(parse_t *p, const char *key)
{
    int idx = find_key(key);
    return idx >= 0 ? p->seen[idx] : NULL;
}

/* The line of the value given for key, or 0 when it was not given. */
static int seen_line(parse_t *p, const char *key)
{
    yaml_node_t *node = seen_node(p, key);
    return node != NULL ? line_of(node) : 0;
}

/* The checks of one feature that involve several of its keys. */
static tly_err_t check_feature(parse_t *p, size_t i, yaml_node_t *map, const char *path)
{
    tly_feature_cfg_t *feat = &p->cfg->features[i];
    yaml_node_t *value = seen_node(p, "features[].value");
    yaml_node_t *windows = seen_node(p, "features[].windows");
    yaml_node_t *hop = seen_node(p, "features[].hop"), *k = seen_node(p, "features[].k");
    const char *agg = tly_agg_name(feat->agg);
    char sub[PATH_CAP], hoptext[32], wtext[32];

    for (size_t j = 0; j < i; j++) {
        const tly_feature_cfg_t *other = &p->cfg->features[j];
        if (strcmp(other->entity, feat->entity) == 0 && strcmp(other->name, feat->name) == 0) {
            join_key(sub, path, "name");
            return fail(p, seen_node(p, "features[].name"), sub,
                        "\"%s\" is already a feature of entity \"%s\" (features[%zu], line %d)",
                        feat->name, feat->entity, j, other->line);
        }
    }

    join_key(sub, path, "value");
    if (feat->agg == TLY_AGG_COUNT) {
        if (value)
            return fail(p, value, sub, "count counts events and takes no value; remove value");
    } else if (tly_agg_numeric(feat->agg)) {
        if (value == NULL)
            return fail(p, map, sub, "%s needs the numeric event field to aggregate", agg);
        if (feat->nvalues != 1)
            return fail(p, value, sub, "%s takes exactly one value field, not %zu", agg,
                        feat->nvalues);
    } else if (value == NULL || feat->nvalues == 0) {
        return fail(p, value ? value : map, sub, "%s needs the event field(s) to keep", agg);
    }

    join_key(sub, path, "windows");
    if (tly_agg_windowed(feat->agg)) {
        if (windows == NULL || feat->nwindows == 0)
            return fail(p, windows ? windows : map, sub, "%s needs windows, e.g. [1h, 1d]", agg);
        for (size_t w = 0; hop && w < feat->nwindows; w++) {
            if (feat->windows_ms[w] % feat->hop_ms != 0) {
                join_key(sub, path, "hop");
                return fail(p, hop, sub, "%s does not divide window %s",
                            tly_duration_format(feat->hop_ms, hoptext, sizeof hoptext),
                            tly_duration_format(feat->windows_ms[w], wtext, sizeof wtext));
            }
        }
    } else {
        if (windows)
            return fail(p, windows, sub,
                        "%s keeps the newest items and takes no windows; "
                        "remove windows",
                        agg);
        join_key(sub, path, "hop");
        if (hop)
            return fail(p, hop, sub, "%s has no windows and takes no hop; remove hop", agg);
    }

    join_key(sub, path, "k");
    if (feat->agg == TLY_AGG_LAST_K) {
        if (k == NULL)
            return fail(p, map, sub, "last_k needs k, the number of items to keep (1..10000)");
    } else if (k) {
        return fail(p, k, sub, "k is only for last_k%s",
                    feat->agg == TLY_AGG_LAST ? " (last keeps one item)" : "");
    } else if (feat->agg == TLY_AGG_LAST) {
        feat->k = 1;
    }
    return TLY_OK;
}

static tly_err_t parse_features(parse_t *p, yaml_node_t *node, const char *path)
{
    char sub[PATH_CAP];
    tly_config_t *cfg = p->cfg;
    if (node->type != YAML_SEQUENCE_NODE)
        return fail(p, node, path, "expected a list of features, found %s", kind_name(node));
    size_t n = list_len(node);
    if (n == 0)
        return fail(p, node, path, "needs at least one feature");
    if ((cfg->features = calloc(n, sizeof *cfg->features)) == NULL)
        return nomem(p);
    cfg->nfeatures = n;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = list_item(p, node, i, path, sub);
        if (item->type != YAML_MAPPING_NODE)
            return fail(p, item, sub,
                        "expected a feature mapping ({name: ..., agg: ...}), "
                        "found %s",
                        kind_name(item));
        cfg->features[i].line = line_of(item);
        for (size_t k = 0; k < NKEYS; k++) {
            if (tly_config_keys[k].scope == S_FEATURE)
                p->seen[k] = NULL;
        }
        tly_err_t rc = parse_mapping(p, item, "features[]", sub, &cfg->features[i]);
        if (rc == TLY_OK) {
            /* for the errors found when the features are compiled */
            cfg->features[i].lines.name = seen_line(p, "features[].name");
            cfg->features[i].lines.entity = seen_line(p, "features[].entity");
            cfg->features[i].lines.key = seen_line(p, "features[].key");
            cfg->features[i].lines.agg = seen_line(p, "features[].agg");
            cfg->features[i].lines.value = seen_line(p, "features[].value");
            cfg->features[i].lines.windows = seen_line(p, "features[].windows");
            cfg->features[i].lines.hop = seen_line(p, "features[].hop");
            cfg->features[i].lines.k = seen_line(p, "features[].k");
            rc = check_feature(p, i, item, sub);
        }
        if (rc != TLY_OK)
            return rc;
    }
    return TLY_OK;
}

/*
 * kafka.topics: a list whose items are topic names or mappings of the
 * kafka.topics[].* keys (a single name or mapping is a one-item list).
 * Fills cfg->kafka.topic_cfgs and the aligned array of names; the events
 * settings an entry leaves out are filled in by resolve_topics().
 */
static tly_err_t parse_topics(parse_t *p, const key_def_t *def, yaml_node_t *node, const char *path)
{
    char ipath[PATH_CAP];
    const char *text;
    tly_config_t *cfg = p->cfg;
    size_t n = list_len(node);
    if (n == 0)
        return fail(p, node, path, "needs at least one item");
    tly_topic_cfg_t *topics = calloc(n, sizeof *topics);
    char **names = calloc(n, sizeof *names);
    if (topics == NULL || names == NULL) {
        free(topics);
        free(names);
        return nomem(p);
    }
    *count_of(cfg, def) = n; /* owned by the config from here on */
    *(tly_topic_cfg_t **)field_of(cfg, def) = topics;
    cfg->kafka.topics = names;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = list_item(p, node, i, path, ipath);
        tly_err_t rc = TLY_OK;
        topics[i].line = line_of(item);
        if (item->type == YAML_MAPPING_NODE) {
            for (size_t k = 0; k < NKEYS; k++) {
                if (tly_config_keys[k].scope == S_TOPIC)
                    p->seen[k] = NULL;
            }
            rc = parse_mapping(p, item, "kafka.topics[]", ipath, &topics[i]);
            topics[i].own_events = true;
        } else if (item->type == YAML_SCALAR_NODE) {
            if ((rc = item_scalar(p, item, ipath, &text)) == TLY_OK &&
                (rc = check_string(p, def, text, item, ipath)) == TLY_OK)
                rc = dup_into(p, &topics[i].name, text);
        } else {
            rc = fail(p, item, ipath,
                      "expected a topic name or a mapping {name: ..., events: {...}}, found %s",
                      kind_name(item));
        }
        if (rc != TLY_OK)
            return rc;
        names[i] = topics[i].name;
        for (size_t j = 0; j < i; j++) {
            if (strcmp(names[j], names[i]) == 0)
                return fail(p, item, ipath, "topic \"%s\" is listed twice (first at line %d)",
                            names[i], topics[j].line);
        }
    }
    return TLY_OK;
}

/* Gives every topic the top-level events settings it does not override.
 * Runs after the top-level defaults are in place. */
static tly_err_t resolve_topics(parse_t *p)
{
    tly_config_t *cfg = p->cfg;
    for (size_t i = 0; i < cfg->kafka.ntopics; i++) {
        tly_topic_cfg_t *t = &cfg->kafka.topic_cfgs[i];
        bool own = t->time_field != NULL || t->max_future_skew_ms || t->max_bytes || t->max_string;
        t->own_events = t->own_events && own;
        if (t->time_field == NULL) {
            t->time_unit = cfg->events.time_unit;
            if (cfg->events.time_field != NULL) {
                tly_err_t rc = dup_into(p, &t->time_field, cfg->events.time_field);
                if (rc != TLY_OK)
                    return rc;
            }
        } else if (t->time_unit == TLY_TIME_KAFKA) {
            t->time_unit = TLY_TIME_MS; /* the unit's default when a time is given */
        }
        if (t->max_future_skew_ms == 0)
            t->max_future_skew_ms = cfg->events.max_future_skew_ms;
        if (t->max_bytes == 0)
            t->max_bytes = cfg->events.max_bytes;
        if (t->max_string == 0)
            t->max_string = cfg->events.max_string;
    }
    return TLY_OK;
}

/* Fills every section key the file did not set with its default. */
static tly_err_t apply_defaults(parse_t *p)
{
    tly_config_t *cfg = p->cfg;
    for (size_t i = 0; i < NKEYS; i++) {
        const key_def_t *def = &tly_config_keys[i];
        if (def->scope != S_CONFIG || def->def == NULL || p->seen[i] != NULL)
            continue;
        tly_err_t rc;
        if (def->type == K_TOPICS) {
            tly_topic_cfg_t *topics = calloc(1, sizeof *topics);
            char **names = calloc(1, sizeof *names);
            if (topics == NULL || names == NULL) {
                free(topics);
                free(names);
                return nomem(p);
            }
            *count_of(cfg, def) = 1;
            *(tly_topic_cfg_t **)field_of(cfg, def) = topics;
            cfg->kafka.topics = names;
            rc = dup_into(p, &topics[0].name, def->def);
            names[0] = topics[0].name;
            /* errors about the default topic (its key in shard mode) point
             * at kafka.mode, the choice that makes it needed */
            const yaml_node_t *mode = seen_node(p, "kafka.mode");
            topics[0].line = mode != NULL ? line_of(mode) : 0;
        } else if (def->type == K_STRINGS) {
            char **items = calloc(1, sizeof *items);
            if (items == NULL)
                return nomem(p);
            *count_of(cfg, def) = 1;
            *(char ***)field_of(cfg, def) = items;
            rc = dup_into(p, &items[0], def->def);
        } else {
            rc = set_scalar(p, def, def->def, NULL, def->key, cfg);
        }
        if (rc != TLY_OK)
            return rc;
    }
    /* events.time.unit has a default for when events.time is given; without
     * it the Kafka timestamp is the event time. */
    if (cfg->events.time_field == NULL)
        cfg->events.time_unit = TLY_TIME_KAFKA;
    return resolve_topics(p);
}

/* Checks that involve keys of several sections. */
/* Fails on two limits where `small` (value a) must not exceed `big`
 * (value b), naming the one the file set: `small` when it set it, else
 * `big`, whose value then clashes with small's default. */
static tly_err_t limits_clash(parse_t *p, const char *small, int64_t a, const char *big, int64_t b,
                              const char *why)
{
    yaml_node_t *at = seen_node(p, small);
    if (at != NULL || seen_node(p, big) == NULL)
        return fail(p, at, small, "%" PRId64 " is larger than %s (%" PRId64 ")%s", a, big, b, why);
    return fail(p, seen_node(p, big), big,
                "%" PRId64 " is smaller than %s (%" PRId64 ", its default); raise it or lower %s",
                b, small, a, small);
}

static tly_err_t check_config(parse_t *p)
{
    const tly_config_t *cfg = p->cfg;
    tly_err_t rc;
    if (!addr_is_loopback(cfg->server.listen) && cfg->server.requirepass[0] == '\0')
        return fail(p, seen_node(p, "server.listen"), "server.listen",
                    "%s accepts clients from other hosts; set server.requirepass, or listen "
                    "on 127.0.0.1",
                    cfg->server.listen);
    if (cfg->server.max_bulk > cfg->server.max_query_buffer &&
        (rc = limits_clash(p, "server.max_bulk", cfg->server.max_bulk, "server.max_query_buffer",
                           cfg->server.max_query_buffer,
                           "; a request holding it could never be read")) != TLY_OK)
        return rc;
    if (cfg->server.output_soft_limit > cfg->server.max_output_buffer &&
        (rc = limits_clash(p, "server.output_soft_limit", cfg->server.output_soft_limit,
                           "server.max_output_buffer", cfg->server.max_output_buffer, "")) !=
            TLY_OK)
        return rc;
    if (cfg->server.max_query_buffer > cfg->server.max_clients_memory &&
        (rc = limits_clash(p, "server.max_query_buffer", cfg->server.max_query_buffer,
                           "server.max_clients_memory", cfg->server.max_clients_memory,
                           "; a client sending a request that large would be closed")) != TLY_OK)
        return rc;
    if (cfg->server.max_output_buffer > cfg->server.max_clients_memory &&
        (rc = limits_clash(p, "server.max_output_buffer", cfg->server.max_output_buffer,
                           "server.max_clients_memory", cfg->server.max_clients_memory,
                           "; a client with that much to read would be closed")) != TLY_OK)
        return rc;
    return TLY_OK;
}

/* Writes libyaml's complaint as "FILE:LINE: YAML syntax error: ...". */
static tly_err_t syntax_error(parse_t *p, const yaml_parser_t *parser, const char *yaml, size_t len)
{
    if (parser->error == YAML_MEMORY_ERROR)
        return nomem(p);
    size_t line = parser->problem_mark.line + 1;
    if (parser->error == YAML_READER_ERROR) { /* reader errors carry a byte offset */
        line = 1;
        for (size_t i = 0; i < parser->problem_offset && i < len; i++)
            line += yaml[i] == '\n';
    }
    if (p->errlen == 0)
        return TLY_E_CONFIG;
    int n = snprintf(p->errbuf, p->errlen, "%s:%zu: YAML syntax error: %s", p->name, line,
                     parser->problem ? parser->problem : "unknown problem");
    if (parser->context && n >= 0 && (size_t)n < p->errlen)
        snprintf(p->errbuf + n, p->errlen - (size_t)n, " (%s at line %zu)", parser->context,
                 parser->context_mark.line + 1);
    return TLY_E_CONFIG;
}

/* check_shape's refusal: "NAME:LINE: <message>"; returns TLY_E_CONFIG. */
static tly_err_t shape_error(parse_t *p, size_t line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static tly_err_t shape_error(parse_t *p, size_t line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tly_err_t rc = vfail_at(p, line, NULL, fmt, ap);
    va_end(ap);
    return rc;
}

/* Walks yaml[0..len)'s events and fails when collections nest deeper than
 * CONFIG_MAX_DEPTH or one holds more than CONFIG_MAX_ENTRIES entries,
 * naming the line of the first collection too deep or too long. A syntax
 * error ends the walk without a message: the load that follows reports it. */
static tly_err_t check_shape(parse_t *p, const char *yaml, size_t len)
{
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser))
        return nomem(p);
    yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, len);
    tly_err_t rc = TLY_OK;
    int depth = 0;
    /* per open collection: its entries' nodes so far (a mapping's keys and
     * values both count), the nodes it stands for so far (itself, nested
     * ones and what aliases repeat), whether it is a mapping, its first
     * line and its anchor (owned, NULL: none) */
    struct {
        size_t nodes, sub, line;
        bool map;
        char *anchor;
    } open[CONFIG_MAX_DEPTH + 1];
    /* anchors defined so far and the nodes each stands for (a later
     * definition of a name hides an earlier one) */
    struct {
        char *name;
        size_t size;
    } *anchors = NULL;
    size_t nanchors = 0, total = 0;
    for (;;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev))
            break;
        yaml_event_type_t type = ev.type;
        size_t line = ev.start_mark.line + 1;
        const yaml_char_t *anchor =
            type == YAML_SCALAR_EVENT           ? ev.data.scalar.anchor
            : type == YAML_SEQUENCE_START_EVENT ? ev.data.sequence_start.anchor
            : type == YAML_MAPPING_START_EVENT  ? ev.data.mapping_start.anchor
            : type == YAML_ALIAS_EVENT          ? ev.data.alias.anchor
                                                : NULL;
        char *name = anchor != NULL ? strdup((const char *)anchor) : NULL;
        yaml_event_delete(&ev);
        if (anchor != NULL && name == NULL) {
            rc = nomem(p);
            break;
        }
        if (type == YAML_STREAM_END_EVENT)
            break;
        bool start = type == YAML_SEQUENCE_START_EVENT || type == YAML_MAPPING_START_EVENT;
        /* the nodes this event stands for: an alias, those of its anchor;
         * a collection counts itself here and its entries as they come */
        size_t size = 0;
        if (type == YAML_ALIAS_EVENT) {
            size = 1;
            for (size_t a = nanchors; a-- > 0;)
                if (strcmp(anchors[a].name, name) == 0) {
                    size = anchors[a].size;
                    break;
                }
            free(name);
            name = NULL;
        } else if (start || type == YAML_SCALAR_EVENT) {
            size = 1;
        }
        total += size;
        if (total > CONFIG_MAX_NODES) {
            rc = shape_error(p, line,
                             "the file stands for more than %d YAML nodes (an alias counts as "
                             "what it repeats); tallyd's configs need far fewer",
                             CONFIG_MAX_NODES);
            free(name);
            break;
        }
        if (depth > 0 && size > 0) {
            size_t max = open[depth].map ? 2 * (size_t)CONFIG_MAX_ENTRIES : CONFIG_MAX_ENTRIES;
            if (++open[depth].nodes > max) {
                rc = shape_error(p, line,
                                 "the %s from line %zu holds more than %d entries; tallyd's "
                                 "longest lists hold its features, at most 1024",
                                 open[depth].map ? "mapping" : "list", open[depth].line,
                                 CONFIG_MAX_ENTRIES);
                free(name);
                break;
            }
            if (!start)
                open[depth].sub += size;
        }
        size_t closed = 0; /* a collection that ended: the nodes it stands for */
        if (start) {
            if (++depth > CONFIG_MAX_DEPTH) {
                rc = shape_error(p, line,
                                 "lists and mappings nest deeper than %d levels; tallyd's keys "
                                 "nest at most six",
                                 CONFIG_MAX_DEPTH);
                free(name);
                depth--;
                break;
            }
            open[depth].nodes = 0;
            open[depth].sub = 1;
            open[depth].line = line;
            open[depth].map = type == YAML_MAPPING_START_EVENT;
            open[depth].anchor = name;
            name = NULL;
        } else if ((type == YAML_SEQUENCE_END_EVENT || type == YAML_MAPPING_END_EVENT) &&
                   depth > 0) {
            closed = open[depth].sub;
            name = open[depth].anchor;
            open[depth].anchor = NULL;
            depth--;
            if (depth > 0)
                open[depth].sub += closed;
        } else if (type == YAML_SCALAR_EVENT) {
            closed = 1;
        }
        if (name != NULL) {
            void *grown = realloc(anchors, (nanchors + 1) * sizeof *anchors);
            if (grown == NULL) {
                free(name);
                rc = nomem(p);
                break;
            }
            anchors = grown;
            anchors[nanchors].name = name;
            anchors[nanchors++].size = closed;
        }
    }
    for (; depth > 0; depth--)
        free(open[depth].anchor);
    for (size_t a = 0; a < nanchors; a++)
        free(anchors[a].name);
    free(anchors);
    yaml_parser_delete(&parser);
    return rc;
}

/* Loads yaml[0..len) (name for messages). The one place a config is built. */
static tly_err_t load_buffer(const char *yaml, size_t len, const char *name, tly_config_t **out,
                             char *errbuf, size_t errlen)
{
    yaml_parser_t parser;
    yaml_document_t doc, extra;
    bool have_parser = false, have_doc = false;
    parse_t p = {.name = name, .doc = &doc, .errbuf = errbuf, .errlen = errlen};
    tly_err_t rc;

    if (errlen > 0)
        errbuf[0] = '\0';
    if ((p.cfg = calloc(1, sizeof *p.cfg)) == NULL || (p.cfg->path = strdup(name)) == NULL ||
        !yaml_parser_initialize(&parser)) {
        rc = nomem(&p);
        goto out;
    }
    have_parser = true;
    if ((rc = check_shape(&p, yaml, len)) != TLY_OK)
        goto out;
    yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, len);
    if (!yaml_parser_load(&parser, &doc)) {
        rc = syntax_error(&p, &parser, yaml, len);
        goto out;
    }
    have_doc = true;
    /* A second document would be silently ignored: refuse it. */
    if (!yaml_parser_load(&parser, &extra)) {
        rc = syntax_error(&p, &parser, yaml, len);
        goto out;
    }
    yaml_node_t *second = yaml_document_get_root_node(&extra);
    int second_line = second ? (int)second->start_mark.line + 1 : 0;
    yaml_document_delete(&extra);
    if (second_line > 0) {
        snprintf(errbuf, errlen,
                 "%s:%d: a config file holds one YAML document; remove the "
                 "second one",
                 name, second_line);
        rc = TLY_E_CONFIG;
        goto out;
    }

    if ((rc = parse_mapping(&p, yaml_document_get_root_node(&doc), "", "", p.cfg)) != TLY_OK ||
        (rc = apply_defaults(&p)) != TLY_OK || (rc = check_config(&p)) != TLY_OK)
        goto out;
    *out = p.cfg;
    p.cfg = NULL;
out:
    tly_config_free(p.cfg);
    if (have_doc)
        yaml_document_delete(&doc);
    if (have_parser)
        yaml_parser_delete(&parser);
    return rc;
}

tly_err_t tly_config_load_string(const char *yaml, const char *name, tly_config_t **out,
                                 char *errbuf, size_t errlen)
{
    return load_buffer(yaml, strlen(yaml), name, out, errbuf, errlen);
}

tly_err_t tly_config_load(const char *path, tly_config_t **out, char *errbuf, size_t errlen)
{
    char *buf = NULL;
    FILE *f = fopen(path, "rb");
    tly_err_t rc;

    if (f == NULL) {
        snprintf(errbuf, errlen, "%s: cannot open: %s", path, strerror(errno));
        return TLY_E_IO;
    }
    if ((buf = malloc(CONFIG_MAX_BYTES + 1)) == NULL) {
        snprintf(errbuf, errlen, "%s: out of memory", path);
        rc = TLY_E_NOMEM;
        goto out;
    }
    size_t len = fread(buf, 1, CONFIG_MAX_BYTES + 1, f);
    if (ferror(f)) {
        snprintf(errbuf, errlen, "%s: cannot read: %s", path, strerror(errno));
        rc = TLY_E_IO;
        goto out;
    }
    if (len > CONFIG_MAX_BYTES) {
        snprintf(errbuf, errlen, "%s: larger than %u MiB; is this a config file?", path,
                 CONFIG_MAX_BYTES >> 20);
        rc = TLY_E_CONFIG;
        goto out;
    }
    rc = load_buffer(buf, len, path, out, errbuf, errlen);
out:
    free(buf);
    fclose(f);
    return rc;
}

/* Frees what tly_config_keys says base owns (a tly_config_t, one feature or
 * one topic). */
static void free_fields(void *base, key_scope_t scope)
{
    for (size_t i = 0; i < NKEYS; i++) {
        const key_def_t *def = &tly_config_keys[i];
        if (def->scope != scope)
            continue;
        void *field = field_of(base, def);
        size_t n = is_list(def->type) ? *count_of(base, def) : 0;
        switch (def->type) {
        case K_STRING:
            free(*(char **)field);
            break;
        case K_STRINGS:
            for (size_t j = 0; j < n && *(char ***)field; j++)
                free((*(char ***)field)[j]);
            free(*(char ***)field);
            break;
        case K_DURATIONS:
            free(*(int64_t **)field);
            break;
        case K_MAP:
            for (size_t j = 0; j < n && *(tly_kv_t **)field; j++) {
                free((*(tly_kv_t **)field)[j].key);
                free((*(tly_kv_t **)field)[j].value);
            }
            free(*(tly_kv_t **)field);
            break;
        case K_WHERE:
            for (size_t j = 0; j < n && *(tly_where_cfg_t **)field; j++) {
                tly_where_cfg_t *w = &(*(tly_where_cfg_t **)field)[j];
                for (size_t v = 0; v < w->nvalues; v++)
                    free(w->values[v]);
                free(w->values);
                free(w->field);
            }
            free(*(tly_where_cfg_t **)field);
            break;
        case K_TOPICS:
            for (size_t j = 0; j < n && *(tly_topic_cfg_t **)field; j++)
                free_fields(&(*(tly_topic_cfg_t **)field)[j], S_TOPIC);
            free(*(tly_topic_cfg_t **)field);
            free(((tly_config_t *)base)->kafka.topics); /* the names belong to the topics */
            break;
        default:
            break;
        }
    }
}

void tly_config_free(tly_config_t *cfg)
{
    if (cfg == NULL)
        return;
    for (size_t i = 0; i < cfg->nfeatures; i++)
        free_fields(&cfg->features[i], S_FEATURE);
    free(cfg->features);
    free_fields(cfg, S_CONFIG);
    free(cfg->path);
    free(cfg);
}

/* ---------------------------------------------------------------------------
 * --help-config and --check-config output
 */
