/*
 * source_int.h — what source.c shares with the other Kafka clients of
 * tallyd (shard.c's endpoint producer and reader).
 */
#ifndef TALLYD_SOURCE_INT_H
#define TALLYD_SOURCE_INT_H

#include <librdkafka/rdkafka.h>

/* librdkafka log callback: forwards to tly_log at the matching level.
 * librdkafka's threads; calls tly_log only. */
void tly_source_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf);

#endif
