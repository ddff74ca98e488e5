/*
 * source_int.h — what source.c shares with the other Kafka clients of
 * tallyd (shard.c's endpoint producer and reader).
 */
#ifndef TALLYD_SOURCE_INT_H
#define TALLYD_SOURCE_INT_H

#include <stdbool.h>

#include <librdkafka/rdkafka.h>

/* librdkafka log callback: forwards to tly_log at the matching level.
 * librdkafka's threads; calls tly_log only. */
void tly_source_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf);

/* How long closing a consumer may wait for the brokers. */
#define TLY_KAFKA_CLOSE_TIMEOUT_MS 10000

/* Closes and destroys consumer rk (`who` names it in the log): with
 * commit, first commits the offsets stored for its assignment. Serves the
 * rebalance and commit callbacks on the calling thread. When the brokers
 * do not answer within timeout_ms (a cluster that went away), the consumer
 * is left as it is, with a warning (the group drops the member after its
 * session timeout): librdkafka cannot destroy it without the brokers, so
 * only a process about to exit may call this. Returns false then. */
bool tly_kafka_close(rd_kafka_t *rk, bool commit, int timeout_ms, const char *who);

#endif
