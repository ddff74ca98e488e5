/*
 * shard.h — which instance owns an id in kafka.mode shard, and where it is.
 *
 * In shard mode every topic is keyed by one entity type (the message key is
 * the entity id as text) and all topics have the same partition count, so
 * one partition number names the owner of an id of any entity type: the
 * instance the consumer group assigned that partition to. An id's partition
 * is computed as the Java producer does: murmur2 of the key bytes, made
 * positive, modulo the partition count.
 *
 * Owners publish "the instance at host:port owns partition p of group G" to
 * a compacted topic (kafka.endpoints_topic; key "G/p", value "host:port"),
 * and every instance reads that topic from the beginning, so a -MOVED reply
 * can name the owner. The entries are advisory: an owner that died stays
 * named until the new owner publishes.
 *
 * Threads: tly_shard_new/start/free on the main thread; set_partitions,
 * assigned and revoked on the source's poll thread; tly_shard_route and
 * tly_shard_stats on any thread (query threads): they read atomics and take
 * a mutex only to copy an owner's address. The shard runs one thread of its
 * own that reads the endpoints topic and serves the publishing producer.
 */
#ifndef TALLYD_SHARD_H
#define TALLYD_SHARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/config.h"
#include "tallyd/feature.h"

#define TLY_SHARD_MAX_PARTITIONS 1024 /* partitions of a topic in shard mode */
#define TLY_SHARD_ADDR_MAX       256  /* bytes of an advertised address, NUL included */

typedef struct tly_shard tly_shard_t;

typedef struct {
    int32_t nparts;      /* partitions per topic, 0 unknown */
    size_t nowned;       /* partitions owned */
    size_t known;        /* partitions whose owner address is known */
    uint64_t moved;      /* -MOVED answers given */
    uint64_t published;  /* endpoint records delivered */
    uint64_t endpoint_errors; /* publish or read failures */
} tly_shard_stats_t;

/* The partition of key[0..len) among nparts (> 0), as the Java client's
 * default partitioner and librdkafka's murmur2_random place a keyed
 * message. Pure; any thread. */
int32_t tly_partition_of(const void *key, size_t len, int32_t nparts);

/* Returns a new shard router for cfg/fs (borrowed), or NULL when cfg is not
 * in shard mode. */
tly_shard_t *tly_shard_new(const tly_config_t *cfg, const tly_featset_t *fs);

/*
 * Starts publishing and reading endpoints through the brokers at bootstrap
 * (embedded: the caller created the endpoints topic; else it is created,
 * compacted, when missing). `advertise` is this instance's address
 * ("host:port"). Returns false with errbuf filled when the Kafka clients
 * cannot be created; a broker that cannot be reached is retried.
 */
bool tly_shard_start(tly_shard_t *sh, const char *bootstrap, bool embedded, const char *advertise,
                     char *errbuf, size_t errlen);

/* Stops the endpoints thread and frees sh. NULL is allowed. */
void tly_shard_free(tly_shard_t *sh);

/* Poll thread: the topics' partition count (0: unknown), the one queries
 * are routed by; the routes (tly_shard_routes) start again from it. */
void tly_shard_set_partitions(tly_shard_t *sh, int32_t nparts);
int32_t tly_shard_partitions(const tly_shard_t *sh);

/* Poll thread: notes nparts (> 0) as a count the topics have, maybe grown
 * to before the group rebalanced to it (the last TLY_SHARD_COUNTS counts
 * noted; those above the current count are routes). */
#define TLY_SHARD_COUNTS 4
void tly_shard_note_count(tly_shard_t *sh, int32_t nparts);

/* Any thread: the largest count known, current or noted (0: none). */
int32_t tly_shard_max_count(const tly_shard_t *sh);

/* The partition counts an event may be placed by: the current one, and
 * those noted above it (the topics grew; the group has not rebalanced to
 * them yet), so that an event a producer placed by the new count before
 * this instance's group learnt it is taken. A snapshot, so that every
 * applier of a batch judges by the same counts. */
typedef struct {
    int32_t count[TLY_SHARD_COUNTS + 1];
    size_t n; /* 0: no count known yet, every event passes */
} tly_shard_routes_t;

/* Poll thread (the only writer of the counts): the current snapshot, and
 * a number that changes whenever the snapshot would. */
void tly_shard_routes(const tly_shard_t *sh, tly_shard_routes_t *out);
uint64_t tly_shard_routes_gen(const tly_shard_t *sh);

/* Whether a key whose id is id[0..len) belongs in partition p by one of
 * the counts of r (true when r has none). Pure. */
bool tly_shard_routes_place(const tly_shard_routes_t *r, const char *id, size_t len, int32_t p);

/* Poll thread: the partitions assigned to this instance (each listed once
 * or more, any order); publishes their endpoint. */
void tly_shard_assigned(tly_shard_t *sh, const int32_t *parts, size_t n);

/* Poll thread: nothing is owned until the next assignment. */
void tly_shard_revoked(tly_shard_t *sh);

/* True when this instance owns partition p. */
bool tly_shard_owns(const tly_shard_t *sh, int32_t p);

/*
 * Where id[0..len) (of any entity type) lives: -1 when this instance answers
 * it (it owns the partition, or the partition count is not known yet);
 * else its partition, with the owner's address copied into owner (cap
 * bytes; "" when unknown) and the moved counter raised. Any thread.
 */
int32_t tly_shard_route(tly_shard_t *sh, const char *id, size_t len, char *owner, size_t cap);

/* The owned partitions, ascending, into parts (at most cap); returns how
 * many there are. Any thread. */
size_t tly_shard_owned(const tly_shard_t *sh, int32_t *parts, size_t cap);

const char *tly_shard_advertise(const tly_shard_t *sh);
void tly_shard_stats(tly_shard_t *sh, tly_shard_stats_t *st);

#endif
