/*
 * demo.h — the seeded engagement generator of the embedded demo.
 *
 * The generator (pure, tly_demo_gen_*) turns a seed into an endless,
 * reproducible stream of engagement events shaped like config/demo.yaml
 * expects:
 *   {"user_id":17,"pin_id":90210,"action":"click","dwell_ms":5400,"ts":1764300000123}
 * Users and pins are Zipf-distributed (a few heavy users and viral pins, a
 * long tail); actions follow a funnel: impression ≫ closeup > click > save >
 * hide; dwell_ms depends on the action. Event times are given by the caller.
 *
 * The producer (tly_demo_start) runs one thread that produces the stream to
 * a Kafka topic keyed by user id: first demo.history events with times
 * spread over the day before start (as fast as the cluster takes them), then
 * demo.events_per_sec with event time = the wall clock at production.
 */
#ifndef TALLYD_DEMO_H
#define TALLYD_DEMO_H

#include <stddef.h>
#include <stdint.h>

#include "tallyd/config.h"

/* --- pure generator --- */
typedef struct tly_demo_gen tly_demo_gen_t;

/* A generator for `users` users and `pins` pins (>= 1) seeded with seed.
 * Aborts on OOM. */
tly_demo_gen_t *tly_demo_gen_new(uint64_t seed, uint64_t users, uint64_t pins);
void tly_demo_gen_free(tly_demo_gen_t *gen);
/* Writes the next event with time ts_ms as JSON into buf (cap >= 160
 * bytes), NUL-terminated. Returns its length; *user_id receives the user id
 * (the Kafka key). */
size_t tly_demo_gen_next(tly_demo_gen_t *gen, int64_t ts_ms, char *buf, size_t cap,
                         uint64_t *user_id);

/* --- producer thread --- */
typedef struct tly_demo tly_demo_t;

/* Starts producing cfg->demo's stream to cfg->kafka.topics[0] on the cluster
 * at bootstrap. Returns NULL with errbuf filled on failure. Main thread. */
tly_demo_t *tly_demo_start(const tly_config_t *cfg, const char *bootstrap, char *errbuf,
                           size_t errlen);
/* Events produced (delivered) so far. Any thread. */
uint64_t tly_demo_produced(const tly_demo_t *demo);
/* Stops the thread, flushes, frees. NULL ok. Main thread. */
void tly_demo_stop(tly_demo_t *demo);

#endif
