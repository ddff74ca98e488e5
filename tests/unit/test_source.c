/*
 * test_source.c — the Kafka source (source.c) against its embedded cluster
 * (librdkafka's in-process mock): every produced event is applied or
 * rejected exactly once, the store holds exactly what a model computed here
 * says, rejections are counted by reason, positions and lag match the
 * partitions' end offsets, offsets are committed on stop; replica mode
 * assigns every partition and honours resume positions; a bad
 * kafka.properties entry is named in the error; the demo producer's stream
 * arrives whole; with several apply threads each key's events apply in
 * offset order. Without events.time the Kafka message timestamps are the
 * event times; two topics with their own time fields (ms and ISO 8601) feed
 * the same features; a resume position out of range is reset, counted as a
 * gap and everything is still applied; queries get -LOADING until the first
 * assignment caught up (unless CLIENT STALE ON); a rebalance drops revoked
 * partitions from the stats. On a mock cluster the test makes itself (to
 * inject faults: delayed fetches, forced rebalances, failing metadata): a
 * partition assigned again is behind, not ready, until what arrived while
 * it was away is applied, whatever librdkafka's cached end offset says; a
 * snapshot's offsets are committed only for the partitions still
 * assigned, so one revoked meanwhile keeps its new owner's commit;
 * partitions lost while the topic's partition count was unknown (its
 * metadata failing) have their entities and positions dropped once an
 * assignment knows it; an assignment whose end offsets cannot be looked
 * up (that same failing metadata) is made at once but not caught up until
 * they are.
 *
 * Waits poll tly_source_stats with a deadline (TLY_TEST_TIMEOUT_MULT
 * stretches it under sanitizers, and the injected delays with it); the only
 * sleep is the 10 ms between polls.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <inttypes.h>
#include <time.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "tallyd/commands.h"
#include "tallyd/config.h"
#include "tallyd/daemon.h"
#include "tallyd/demo.h"
#include "tallyd/feature.h"
#include "tallyd/rcu.h"
#include "tallyd/shard.h"
#include "tallyd/source.h"
#include "tallyd/store.h"

#include "rdkafka_tsan.h"

#define NPARTS     TLY_SOURCE_EMBEDDED_PARTITIONS
#define TOPIC      "events"
#define N_EVENTS   20000
#define N_USERS    200
#define N_PINS     50
#define DEADLINE_S 10

static const char *const actions[] = {"impression", "closeup", "click", "save", "hide"};

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* What TLY_TEST_TIMEOUT_MULT stretches waits (and injected delays) by. */
static int timeout_mult(void)
{
    const char *m = getenv("TLY_TEST_TIMEOUT_MULT");
    return m != NULL && atoi(m) > 0 ? atoi(m) : 1;
}

static int64_t deadline_after(int64_t seconds)
{
    return mono_ms() + seconds * 1000 * timeout_mult();
}

static void pause_10ms(void)
{
    struct timespec ts = {0, 10000000};
    nanosleep(&ts, NULL);
}

/* ---- fixture: config, featset, store, source ----------------------------------- */

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_store_t *store;
    tly_source_t *src;
} fixture_t;

/* Shard mode needs every topic keyed by an entity type and every entity
 * type keyed by a topic: its config has the user features only. */
static const char *const base_yaml = "kafka:\n"
                                     "  brokers: \"%s\"\n"
                                     "  group: %s\n"
                                     "  topics: [%s]\n"
                                     "  mode: %s\n"
                                     "  start: %s\n"
                                     "%s" /* more kafka keys */
                                     "events:\n"
                                     "  time: { field: ts, unit: ms }\n"
                                     "  max_bytes: 4096\n"
                                     "features:\n"
                                     "  - { name: clicks, entity: user, key: user_id, "
                                     "where: { action: click }, agg: count, windows: [1h] }\n"
                                     "  - { name: events, entity: user, key: user_id, "
                                     "agg: count, windows: [1h] }\n"
                                     "  - { name: dwell, entity: user, key: user_id, agg: sum, "
                                     "value: dwell_ms, windows: [1h] }\n"
                                     "  - { name: last_action, entity: user, key: user_id, "
                                     "agg: last, value: action }\n"
                                     "%s"  /* the pin feature (replica mode) */
                                     "%s"; /* more sections */

/* base_yaml for the brokers, group, mode, start, more kafka keys and more
 * sections. */
static void make_yaml_at(char *buf, size_t cap, const char *brokers, const char *group,
                         const char *mode, const char *start, const char *kafka_extra,
                         const char *extra)
{
    bool shard = strcmp(mode, "shard") == 0;
    snprintf(buf, cap, base_yaml, brokers, group, shard ? "{name: " TOPIC ", key: user}" : TOPIC,
             mode, start, kafka_extra,
             shard ? ""
                   : "  - { name: impressions, entity: pin, key: pin_id, "
                     "where: { action: impression }, agg: count, windows: [1h] }\n",
             extra);
}

/* make_yaml_at with the embedded cluster. */
static void make_yaml(char *buf, size_t cap, const char *group, const char *mode, const char *start,
                      const char *kafka_extra, const char *extra)
{
    make_yaml_at(buf, cap, "embedded", group, mode, start, kafka_extra, extra);
}

static void fixture_init(fixture_t *fx, const char *group, const char *mode, const char *start,
                         const char *extra)
{
    char yaml[4096], err[512] = "";
    make_yaml(yaml, sizeof yaml, group, mode, start, "", extra);
    memset(fx, 0, sizeof *fx);
    if (tly_config_load_string(yaml, "test.yaml", &fx->cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    if (tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK)
        fail_msg("featset: %s", err);
    fx->store = tly_store_new(fx->fs);
    fx->src = tly_source_new(fx->cfg, fx->fs, fx->store, err, sizeof err);
    if (fx->src == NULL)
        fail_msg("source: %s", err);
}

static void fixture_fini(fixture_t *fx)
{
    tly_source_free(fx->src);
    tly_store_free(fx->store);
    tly_featset_free(fx->fs);
    tly_config_free(fx->cfg);
}

/* Builds the fixture from a whole config text. */
static void fixture_init_yaml(fixture_t *fx, const char *yaml)
{
    char err[512] = "";
    memset(fx, 0, sizeof *fx);
    if (tly_config_load_string(yaml, "test.yaml", &fx->cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    if (tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK)
        fail_msg("featset: %s", err);
    fx->store = tly_store_new(fx->fs);
    fx->src = tly_source_new(fx->cfg, fx->fs, fx->store, err, sizeof err);
    if (fx->src == NULL)
        fail_msg("source: %s", err);
}

static void start_source(fixture_t *fx)
{
    char err[512] = "";
    if (tly_source_start(fx->src, err, sizeof err) != TLY_OK)
        fail_msg("start: %s", err);
}

/* ---- a plain librdkafka producer and offset queries --------------------------- */

static void conf_set(rd_kafka_conf_t *conf, const char *k, const char *v)
{
    char err[256];
    if (rd_kafka_conf_set(conf, k, v, err, sizeof err) != RD_KAFKA_CONF_OK)
        fail_msg("%s=%s: %s", k, v, err);
}

static rd_kafka_t *producer_new(const char *bootstrap)
{
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", bootstrap);
    conf_set(conf, "linger.ms", "5");
    conf_set(conf, "partitioner", "murmur2_random");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL)
        fail_msg("producer: %s", err);
    return rk;
}

/* Produces payload (NULL allowed: a tombstone) keyed by user. */
static void produce(rd_kafka_t *rk, uint64_t user, const char *payload, size_t len)
{
    char key[24];
    int klen = snprintf(key, sizeof key, "%" PRIu64, user);
    for (;;) {
        rd_kafka_resp_err_t e =
            rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(TOPIC), RD_KAFKA_V_KEY(key, (size_t)klen),
                              RD_KAFKA_V_VALUE((void *)payload, len),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
            return;
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            fail_msg("produce: %s", rd_kafka_err2str(e));
        rd_kafka_poll(rk, 10);
    }
}

/* Produces payload to topic keyed by user, with the message timestamp ts
 * (ms; 0: the producer's clock). */
static void produce_at(rd_kafka_t *rk, const char *topic, uint64_t user, const char *payload,
                       size_t len, int64_t ts)
{
    char key[24];
    int klen = snprintf(key, sizeof key, "%" PRIu64, user);
    for (;;) {
        rd_kafka_resp_err_t e =
            rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, (size_t)klen),
                              RD_KAFKA_V_VALUE((void *)payload, len), RD_KAFKA_V_TIMESTAMP(ts),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
            return;
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            fail_msg("produce: %s", rd_kafka_err2str(e));
        rd_kafka_poll(rk, 10);
    }
}

static void flush_producer(rd_kafka_t *rk)
{
    if (rd_kafka_flush(rk, 10000) != RD_KAFKA_RESP_ERR_NO_ERROR)
        fail_msg("flush: %d messages undelivered", rd_kafka_outq_len(rk));
}

/* End offsets of the topic's partitions, asked of the brokers. */
static int64_t end_offsets(rd_kafka_t *rk, int64_t hi[NPARTS])
{
    int64_t total = 0;
    for (int p = 0; p < NPARTS; p++) {
        int64_t lo;
        rd_kafka_resp_err_t e = rd_kafka_query_watermark_offsets(rk, TOPIC, p, &lo, &hi[p], 10000);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
            fail_msg("watermarks of %d: %s", p, rd_kafka_err2str(e));
        assert_int_equal(lo, 0);
        total += hi[p];
    }
    return total;
}

/* Waits until applied + rejected reaches n and every partition is assigned
 * at its end offset with lag 0; fills *st and parts. */
static void await_caught_up(fixture_t *fx, uint64_t n, const int64_t hi[NPARTS],
                            tly_source_stats_t *st, tly_partition_stat_t parts[NPARTS])
{
    int64_t deadline = deadline_after(DEADLINE_S);
    for (;;) {
        tly_source_stats(fx->src, st, parts, NPARTS);
        bool done = st->applied + st->rejected >= n && st->npartitions == NPARTS;
        for (size_t i = 0; done && i < NPARTS; i++)
            done = parts[i].position == hi[parts[i].partition] && parts[i].lag == 0;
        if (done)
            return;
        if (mono_ms() > deadline)
            fail_msg("not caught up: applied %" PRIu64 " + rejected %" PRIu64 " of %" PRIu64
                     ", %zu partitions, lag %" PRId64,
                     st->applied, st->rejected, n, st->npartitions, st->lag);
        pause_10ms();
    }
}

/* Flushes prod, checks the topic holds n messages, starts fx's source and
 * waits until it consumed all of them (await_caught_up). */
static void consume_all(fixture_t *fx, rd_kafka_t *prod, uint64_t n, tly_source_stats_t *st,
                        tly_partition_stat_t parts[NPARTS])
{
    flush_producer(prod);
    int64_t hi[NPARTS];
    assert_int_equal(end_offsets(prod, hi), n);
    start_source(fx);
    await_caught_up(fx, n, hi, st, parts);
}

/* ---- the model ---------------------------------------------------------------- */

typedef struct {
    int64_t clicks, events, dwell, last_ts;
    int last_action;
} user_model_t;

typedef struct {
    uint64_t user, pin;
    int action;
    int64_t dwell, ts;
} event_t;

/* Event i of the test stream: users, pins and actions from a fixed LCG;
 * times unique, spread over the 17 minutes before t0 and out of order
 * (7919 is prime to N_EVENTS, so i → 7919 i mod N is a permutation). */
static event_t event_at(uint64_t *lcg, int i, int64_t t0)
{
    event_t e;
    *lcg = *lcg * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
    uint64_t r = *lcg >> 33;
    e.user = 1 + r % N_USERS;
    e.pin = 1 + (r / N_USERS) % N_PINS;
    e.action = (int)((r / (N_USERS * N_PINS)) % 5);
    e.dwell = (int64_t)((r >> 3) % 10000);
    e.ts = t0 - 20 * 60 * 1000 + (int64_t)(((uint64_t)i * 7919) % N_EVENTS) * 50;
    return e;
}

static int64_t read_int(fixture_t *fx, const char *entity, uint64_t id, const char *spec)
{
    char idbuf[24], sbuf[64];
    int len = snprintf(idbuf, sizeof idbuf, "%" PRIu64, id);
    int ent = tly_featset_entity(fx->fs, entity, strlen(entity));
    uint32_t feat;
    int win;
    assert_true(ent >= 0);
    assert_int_equal(tly_featset_resolve(fx->fs, (uint32_t)ent, spec, strlen(spec), &feat, &win),
                     TLY_OK);
    tly_featwin_t req = {feat, win < 0 ? 0 : (uint32_t)win};
    tly_value_t out;
    assert_int_equal(tly_store_read(fx->store, (uint32_t)ent, idbuf, (size_t)len, &req, 1,
                                    wall_ms(), &out, NULL, sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(out.type, TLY_V_INT);
    return out.u.i;
}

static void assert_last_action(fixture_t *fx, uint64_t id, const user_model_t *m)
{
    char idbuf[24], sbuf[64];
    int len = snprintf(idbuf, sizeof idbuf, "%" PRIu64, id);
    int ent = tly_featset_entity(fx->fs, "user", 4);
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, (uint32_t)ent, "last_action", 11, &feat, &win),
                     TLY_OK);
    tly_featwin_t req = {feat, 0};
    tly_value_t out;
    int64_t last_ms;
    assert_int_equal(tly_store_read(fx->store, (uint32_t)ent, idbuf, (size_t)len, &req, 1,
                                    wall_ms(), &out, &last_ms, sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(last_ms, m->last_ts);
    assert_int_equal(out.type, TLY_V_STR);
    assert_int_equal(out.len, strlen(actions[m->last_action]));
    assert_memory_equal(out.u.s, actions[m->last_action], out.len);
}

/* ---- tests -------------------------------------------------------------------- */

static void test_every_event_applied_once_and_offsets_committed(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    fixture_t fx;
    fixture_init(&fx, "test-shard", "shard", "earliest", "");
    tly_rcu_thread_online();
    start_source(&fx);

    static user_model_t users[N_USERS + 1];
    memset(users, 0, sizeof users);
    int64_t t0 = wall_ms(), max_ts = -1;
    uint64_t lcg = 12345;
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    for (int i = 0; i < N_EVENTS; i++) {
        event_t e = event_at(&lcg, i, t0);
        char json[160];
        int len = snprintf(json, sizeof json,
                           "{\"user_id\": %" PRIu64 ", \"pin_id\": %" PRIu64
                           ", \"action\": \"%s\", \"dwell_ms\": %" PRId64 ", \"ts\": %" PRId64 "}",
                           e.user, e.pin, actions[e.action], e.dwell, e.ts);
        produce(prod, e.user, json, (size_t)len);
        user_model_t *m = &users[e.user];
        m->events++;
        m->clicks += e.action == 2;
        m->dwell += e.dwell;
        if (e.ts > m->last_ts) {
            m->last_ts = e.ts;
            m->last_action = e.action;
        }
        if (e.ts > max_ts)
            max_ts = e.ts;
    }
    /* Shard mode: user 21 keyed "abc" lands on partition 3 of 8 where 21
     * belongs on 4 (Kafka's murmur2 vectors: "21" -973932308, "abc"
     * 479470107, made positive, modulo 8): rejected as misrouted. */
    char misrouted[96];
    int mlen = snprintf(misrouted, sizeof misrouted,
                        "{\"user_id\": 21, \"action\": \"click\", \"ts\": %" PRId64 "}", t0);
    assert_int_equal(rd_kafka_producev(prod, RD_KAFKA_V_TOPIC(TOPIC), RD_KAFKA_V_KEY("abc", 3),
                                       RD_KAFKA_V_VALUE(misrouted, (size_t)mlen),
                                       RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    /* Malformed payloads: two not JSON (one a tombstone), one not an object,
     * one without its time, one over events.max_bytes. */
    static char big[5000];
    memset(big, ' ', sizeof big);
    big[0] = '{';
    big[sizeof big - 1] = '}';
    produce(prod, 1, "not json", 8);
    produce(prod, 2, NULL, 0);
    produce(prod, 3, "[1, 2, 3]", 9);
    produce(prod, 4, "{\"user_id\": 4, \"action\": \"click\"}", 33);
    produce(prod, 5, big, sizeof big);
    const uint64_t n_bad = 6;
    flush_producer(prod);
    int64_t hi[NPARTS];
    assert_int_equal(end_offsets(prod, hi), N_EVENTS + n_bad);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, N_EVENTS + n_bad, hi, &st, parts);
    assert_int_equal(st.messages, N_EVENTS + n_bad);
    assert_int_equal(st.applied, N_EVENTS);
    assert_int_equal(st.rejected, n_bad);
    assert_int_equal(st.rejected_by[TLY_E_EV_BAD_JSON], 2);
    assert_int_equal(st.rejected_by[TLY_E_EV_NOT_OBJECT], 1);
    assert_int_equal(st.rejected_by[TLY_E_EV_MISSING_TIME], 1);
    assert_int_equal(st.rejected_by[TLY_E_EV_TOO_LARGE], 1);
    assert_int_equal(st.rejected_by[TLY_E_EV_MISROUTED], 1);
    assert_int_equal(st.watermark_ms, max_ts);
    assert_int_equal(st.lag, 0);
    assert_true(st.running);
    assert_true(st.rebalances >= 1);
    assert_null(tly_source_fatal(fx.src));
    for (size_t i = 0; i < NPARTS; i++) {
        assert_string_equal(parts[i].topic, TOPIC);
        assert_int_equal(parts[i].high, hi[parts[i].partition]);
    }

    for (uint64_t u = 1; u <= N_USERS; u++) {
        assert_int_equal(read_int(&fx, "user", u, "events:1h"), users[u].events);
        assert_int_equal(read_int(&fx, "user", u, "clicks:1h"), users[u].clicks);
        assert_int_equal(read_int(&fx, "user", u, "dwell:1h"), users[u].dwell);
        if (users[u].events > 0)
            assert_last_action(&fx, u, &users[u]);
    }

    tly_source_stop(fx.src);
    tly_source_stop(fx.src); /* idempotent */
    tly_source_stats(fx.src, &st, NULL, 0);
    assert_false(st.running);
    assert_int_equal(st.applied, N_EVENTS);

    /* A fresh member of the same group sees the end offsets committed. */
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", tly_source_bootstrap(fx.src));
    conf_set(conf, "group.id", "test-shard");
    rd_kafka_t *cons = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (cons == NULL)
        fail_msg("consumer: %s", err);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(NPARTS);
    for (int p = 0; p < NPARTS; p++)
        rd_kafka_topic_partition_list_add(list, TOPIC, p);
    assert_int_equal(rd_kafka_committed(cons, list, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    for (int i = 0; i < list->cnt; i++) {
        assert_int_equal(list->elems[i].err, RD_KAFKA_RESP_ERR_NO_ERROR);
        assert_int_equal(list->elems[i].offset, hi[list->elems[i].partition]);
    }
    rd_kafka_topic_partition_list_destroy(list);
    rd_kafka_destroy(cons);
    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

static void test_replica_mode_assigns_all_partitions_and_resumes_at_given_offsets(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 2000 };
    fixture_t fx;
    fixture_init(&fx, "test-replica", "replica", "window", "");
    tly_rcu_thread_online();

    /* Produced before start; half of each partition is declared applied
     * already (as a snapshot would), so only the other half is consumed. */
    int64_t t0 = wall_ms();
    uint64_t lcg = 777;
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    for (int i = 0; i < N; i++) {
        event_t e = event_at(&lcg, i, t0);
        char json[160];
        int len = snprintf(json, sizeof json,
                           "{\"user_id\": %" PRIu64 ", \"pin_id\": %" PRIu64
                           ", \"action\": \"%s\", \"ts\": %" PRId64 "}",
                           e.user, e.pin, actions[e.action], e.ts);
        produce(prod, e.user, json, (size_t)len);
    }
    flush_producer(prod);
    int64_t hi[NPARTS];
    assert_int_equal(end_offsets(prod, hi), N);
    uint64_t expect = 0;
    for (int p = 0; p < NPARTS; p++) {
        assert_int_equal(tly_source_resume_at(fx.src, TOPIC, p, hi[p] / 2, -1), TLY_OK);
        expect += (uint64_t)(hi[p] - hi[p] / 2);
    }
    start_source(&fx);
    assert_int_equal(tly_source_resume_at(fx.src, TOPIC, 0, 0, -1), TLY_E_INVAL);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, expect, hi, &st, parts);
    assert_int_equal(st.applied, expect);
    assert_int_equal(st.rejected, 0);
    assert_int_equal(st.rebalances, 1);
    bool seen[NPARTS] = {false};
    for (size_t i = 0; i < NPARTS; i++)
        seen[parts[i].partition] = true;
    for (int p = 0; p < NPARTS; p++)
        assert_true(seen[p]);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* Produces n events {user_id, ts} of event_at (seed lcg, times from now)
 * and writes each partition's end into hi. */
static void produce_users(rd_kafka_t *prod, int n, uint64_t lcg, int64_t hi[NPARTS])
{
    int64_t before = end_offsets(prod, hi);
    int64_t t0 = wall_ms();
    for (int i = 0; i < n; i++) {
        event_t e = event_at(&lcg, i, t0);
        char json[160];
        int len = snprintf(json, sizeof json, "{\"user_id\": %" PRIu64 ", \"ts\": %" PRId64 "}",
                           e.user, e.ts);
        produce(prod, e.user, json, (size_t)len);
    }
    flush_producer(prod);
    assert_int_equal(end_offsets(prod, hi), before + n);
}

/* A partly restored partition (tly_source_catch_up) replays up to its
 * restored position; once the replay reaches it, the catch-up is over even
 * if nothing more arrives, so snapshots resume. */
static void test_catch_up_ends_when_the_replay_reaches_the_position(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 40 };
    fixture_t fx;
    fixture_init(&fx, "test-catchup", "replica", "earliest", "");
    tly_rcu_thread_online();
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    int64_t hi[NPARTS];
    produce_users(prod, N, 4242, hi);
    for (int p = 0; p < NPARTS; p++)
        if (hi[p] > 0)
            assert_int_equal(tly_source_catch_up(fx.src, TOPIC, p, hi[p], -1), TLY_OK);
    assert_true(tly_source_catching_up(fx.src));
    start_source(&fx);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, N, hi, &st, parts);
    assert_int_equal(st.applied, N);
    tly_source_halt(fx.src);
    assert_false(tly_source_catching_up(fx.src));
    tly_position_t pos[NPARTS];
    size_t npos = tly_source_positions(fx.src, pos, NPARTS);
    size_t want = 0;
    for (int p = 0; p < NPARTS; p++)
        want += hi[p] > 0;
    assert_int_equal(npos, want);
    for (size_t i = 0; i < npos; i++)
        assert_int_equal(pos[i].offset, hi[pos[i].partition]);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* A snapshot restored in part (features changed) also held a topic that
 * kafka.topics no longer lists: nothing of it is ever consumed again, so
 * nothing of it is replayed, and its partition must not keep the source
 * "catching up" (which holds back every snapshot) once the consumed
 * partitions' replays reached their restored positions. Its events stay in
 * the store's restored features, so its position stays too. */
static void test_catch_up_of_a_topic_no_longer_consumed_does_not_hold_snapshots(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 40, GONE_OFFSET = 77 };
    fixture_t fx;
    fixture_init(&fx, "test-catchup-gone", "replica", "earliest", "");
    tly_rcu_thread_online();
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    int64_t hi[NPARTS];
    produce_users(prod, N, 4343, hi);
    for (int p = 0; p < NPARTS; p++)
        if (hi[p] > 0)
            assert_int_equal(tly_source_catch_up(fx.src, TOPIC, p, hi[p], -1), TLY_OK);
    assert_int_equal(tly_source_catch_up(fx.src, "removed-topic", 0, GONE_OFFSET, -1), TLY_OK);
    start_source(&fx);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, N, hi, &st, parts);
    assert_int_equal(st.applied, N);
    tly_source_halt(fx.src);
    assert_false(tly_source_catching_up(fx.src));
    tly_position_t pos[NPARTS + 1];
    size_t npos = tly_source_positions(fx.src, pos, NPARTS + 1);
    size_t want = 1;
    for (int p = 0; p < NPARTS; p++)
        want += hi[p] > 0;
    assert_int_equal(npos, want);
    bool gone_seen = false;
    for (size_t i = 0; i < npos; i++) {
        if (strcmp(pos[i].topic, "removed-topic") == 0) {
            assert_int_equal(pos[i].partition, 0);
            assert_int_equal(pos[i].offset, GONE_OFFSET);
            gone_seen = true;
        } else {
            assert_string_equal(pos[i].topic, TOPIC);
            assert_int_equal(pos[i].offset, hi[pos[i].partition]);
        }
    }
    assert_true(gone_seen);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* A snapshot restored in part may hold a partition at offset 0 (it was
 * empty then). Its catch-up starts where kafka.start says but no later
 * than 0: at 0, so with start latest the events that arrived meanwhile are
 * all applied (none is below 0, so none is a replay), as a resume at 0
 * would. */
static void test_catch_up_to_offset_zero_starts_at_zero(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 40 };
    fixture_t fx;
    fixture_init(&fx, "test-catchup-zero", "replica", "latest", "");
    tly_rcu_thread_online();
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    int64_t hi[NPARTS];
    produce_users(prod, N, 4545, hi);
    static int64_t events_of[N_USERS + 1];
    memset(events_of, 0, sizeof events_of);
    uint64_t lcg = 4545;
    for (int i = 0; i < N; i++)
        events_of[event_at(&lcg, i, 0).user]++;
    for (int p = 0; p < NPARTS; p++)
        assert_int_equal(tly_source_catch_up(fx.src, TOPIC, p, 0, -1), TLY_OK);
    start_source(&fx);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, N, hi, &st, parts);
    assert_int_equal(st.applied, N);
    tly_source_halt(fx.src);
    assert_false(tly_source_catching_up(fx.src));
    for (uint64_t u = 1; u <= N_USERS; u++)
        assert_int_equal(read_int(&fx, "user", u, "events:1h"), events_of[u]);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* Kafka topic names run to 249 bytes. A snapshot's positions and the
 * stats name the partitions by the whole name: a position cut short names
 * no partition, so a restart would resume nothing there and start it by
 * kafka.start again (the snapshot's events applied twice), and the
 * position's commit would find no assigned partition. */
static void test_positions_and_stats_keep_a_topic_name_of_kafkas_longest(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 30 };
    char topic[250];
    for (size_t i = 0; i < sizeof topic - 1; i++)
        topic[i] = (char)('a' + i % 26);
    topic[sizeof topic - 1] = '\0';
    char yaml[4096];
    snprintf(yaml, sizeof yaml,
             "kafka:\n"
             "  brokers: embedded\n"
             "  group: test-long-topic\n"
             "  topics: [%s]\n"
             "  mode: replica\n"
             "  start: earliest\n"
             "events:\n"
             "  time: { field: ts, unit: ms }\n"
             "features:\n"
             "  - { name: events, entity: user, key: user_id, agg: count, windows: [1h] }\n",
             topic);
    fixture_t fx;
    fixture_init_yaml(&fx, yaml);
    tly_rcu_thread_online();
    start_source(&fx);
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    int64_t now = wall_ms();
    for (int i = 0; i < N; i++) {
        char json[96];
        int len = snprintf(json, sizeof json, "{\"user_id\": %d, \"ts\": %" PRId64 "}", i, now);
        produce_at(prod, topic, (uint64_t)i, json, (size_t)len, 0);
    }
    flush_producer(prod);
    int64_t hi[NPARTS], total = 0;
    for (int p = 0; p < NPARTS; p++) {
        int64_t lo;
        assert_int_equal(rd_kafka_query_watermark_offsets(prod, topic, p, &lo, &hi[p], 10000),
                         RD_KAFKA_RESP_ERR_NO_ERROR);
        total += hi[p];
    }
    assert_int_equal(total, N);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    int64_t deadline = deadline_after(DEADLINE_S);
    for (;;) {
        tly_source_stats(fx.src, &st, parts, NPARTS);
        bool done = st.applied == N && st.npartitions == NPARTS;
        for (size_t i = 0; done && i < NPARTS; i++)
            done = parts[i].position == hi[parts[i].partition];
        if (done)
            break;
        if (mono_ms() > deadline)
            fail_msg("not caught up: applied %" PRIu64 " of %d", st.applied, N);
        pause_10ms();
    }
    for (size_t i = 0; i < NPARTS; i++)
        assert_string_equal(parts[i].topic, topic);
    tly_source_halt(fx.src);
    tly_position_t pos[NPARTS];
    size_t npos = tly_source_positions(fx.src, pos, NPARTS);
    size_t want = 0;
    for (int p = 0; p < NPARTS; p++)
        want += hi[p] > 0;
    assert_int_equal(npos, want);
    for (size_t i = 0; i < npos; i++) {
        assert_string_equal(pos[i].topic, topic);
        assert_int_equal(pos[i].offset, hi[pos[i].partition]);
    }

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* A source pointed at a cluster by address (not "embedded") with start
 * window asks the brokers for the offsets at now - horizon. The mock
 * cluster has no offsets by time and answers "none", which means "no
 * message that recent": the source starts at the end, skipping the history
 * it cannot date, and applies only what arrives after its assignment. */
static void test_window_start_without_an_offset_for_the_time_begins_at_the_end(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { OLD = 500, NEW = 40 };
    fixture_t host;
    fixture_init(&host, "test-host", "replica", "earliest", "");
    tly_rcu_thread_online();
    const char *bootstrap = tly_source_bootstrap(host.src);
    int64_t t0 = wall_ms();
    uint64_t lcg = 99;
    rd_kafka_t *prod = producer_new(bootstrap);
    char json[160];
    for (int i = 0; i < OLD; i++) {
        event_t e = event_at(&lcg, i, t0);
        int len = snprintf(json, sizeof json, "{\"user_id\": %" PRIu64 ", \"ts\": %" PRId64 "}",
                           e.user, e.ts);
        produce(prod, e.user, json, (size_t)len);
    }
    flush_producer(prod);
    int64_t old_hi[NPARTS];
    assert_int_equal(end_offsets(prod, old_hi), OLD);

    char yaml[4096];
    make_yaml_at(yaml, sizeof yaml, bootstrap, "test-window", "replica", "window", "", "");
    fixture_t fx;
    fixture_init_yaml(&fx, yaml);
    assert_string_equal(tly_source_bootstrap(fx.src), bootstrap);
    start_source(&fx);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    int64_t deadline = deadline_after(DEADLINE_S);
    do {
        if (mono_ms() > deadline)
            fail_msg("no assignment");
        pause_10ms();
        tly_source_stats(fx.src, &st, parts, NPARTS);
    } while (st.npartitions < NPARTS);

    for (int i = 0; i < NEW; i++) {
        event_t e = event_at(&lcg, OLD + i, t0);
        int len = snprintf(json, sizeof json, "{\"user_id\": %" PRIu64 ", \"ts\": %" PRId64 "}",
                           e.user, e.ts);
        produce(prod, e.user, json, (size_t)len);
    }
    flush_producer(prod);
    int64_t hi[NPARTS];
    assert_int_equal(end_offsets(prod, hi), OLD + NEW);
    /* Wait until every partition that got new events was consumed to its
     * end; had the source started at the beginning, those partitions alone
     * would have brought old events too. */
    deadline = deadline_after(DEADLINE_S);
    for (;;) {
        tly_source_stats(fx.src, &st, parts, NPARTS);
        bool done = st.npartitions == NPARTS;
        for (size_t i = 0; done && i < NPARTS; i++) {
            int32_t p = parts[i].partition;
            if (hi[p] > old_hi[p])
                done = parts[i].position == hi[p];
        }
        if (done)
            break;
        if (mono_ms() > deadline)
            fail_msg("new events not consumed: applied %" PRIu64, st.applied);
        pause_10ms();
    }
    assert_int_equal(st.applied, NEW);
    assert_int_equal(st.rejected, 0);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    fixture_fini(&host);
    tly_rcu_thread_offline();
}

static void expect_property_error(const char *props, const char *needle)
{
    char yaml[4096], err[512] = "";
    tly_config_t *cfg = NULL;
    tly_featset_t *fs = NULL;
    make_yaml(yaml, sizeof yaml, "g", "shard", "earliest", props, "");
    if (tly_config_load_string(yaml, "test.yaml", &cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    if (tly_featset_compile(cfg, &fs, err, sizeof err) != TLY_OK)
        fail_msg("featset: %s", err);
    /* as --check-config sees it: with the file and the key's line (the
     * properties line, 7th of make_yaml's) */
    char want[256];
    snprintf(want, sizeof want, "test.yaml:7: %s", needle);
    assert_int_equal(tly_source_check_properties(cfg, err, sizeof err), TLY_E_CONFIG);
    if (strncmp(err, want, strlen(want)) != 0)
        fail_msg("check error \"%s\" does not start \"%s\"", err, want);
    tly_store_t *store = tly_store_new(fs);
    tly_source_t *src = tly_source_new(cfg, fs, store, err, sizeof err);
    assert_null(src);
    if (strstr(err, needle) == NULL)
        fail_msg("error \"%s\" does not contain \"%s\"", err, needle);
    tly_store_free(store);
    tly_featset_free(fs);
    tly_config_free(cfg);
}

static void test_bad_kafka_property_fails_naming_it(void **state)
{
    (void)state;
    tly_rcu_thread_online();
    expect_property_error("  properties: { fetch.wait.max.ms: banana }\n",
                          "kafka.properties.fetch.wait.max.ms: ");
    expect_property_error("  properties: { no.such.property: 1 }\n",
                          "kafka.properties.no.such.property: ");
    expect_property_error("  properties: { partition.assignment.strategy: cooperative-sticky }\n",
                          "kafka.properties.partition.assignment.strategy: ");
    expect_property_error("  properties: { enable.auto.offset.store: \"true\" }\n",
                          "kafka.properties.enable.auto.offset.store: ");
    /* end-of-partition events move positions past transaction markers */
    expect_property_error("  properties: { enable.partition.eof: false }\n",
                          "kafka.properties.enable.partition.eof: ");
    /* good ones pass the check (enable.partition.eof true is tallyd's own) */
    char yaml[4096], err[512] = "";
    tly_config_t *cfg = NULL;
    make_yaml(yaml, sizeof yaml, "g", "shard", "earliest",
              "  properties: { fetch.wait.max.ms: 100, partition.assignment.strategy: range, "
              "enable.partition.eof: true }\n",
              "");
    assert_int_equal(tly_config_load_string(yaml, "test.yaml", &cfg, err, sizeof err), TLY_OK);
    assert_int_equal(tly_source_check_properties(cfg, err, sizeof err), TLY_OK);
    tly_config_free(cfg);
    tly_rcu_thread_offline();
}

static void test_demo_stream_arrives_whole(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    fixture_t fx;
    fixture_init(&fx, "test-demo", "replica", "window",
                 "demo: { events_per_sec: 5000, users: 1000, pins: 10000, seed: 7, history: 0 }\n");
    tly_rcu_thread_online();
    start_source(&fx);
    char err[512] = "";
    tly_demo_t *demo = tly_demo_start(fx.cfg, tly_source_bootstrap(fx.src), err, sizeof err);
    if (demo == NULL)
        fail_msg("demo: %s", err);
    int64_t deadline = deadline_after(DEADLINE_S);
    while (tly_demo_produced(demo) < 5000) {
        if (mono_ms() > deadline)
            fail_msg("demo delivered only %" PRIu64 " events", tly_demo_produced(demo));
        pause_10ms();
    }
    tly_demo_stop(demo);

    rd_kafka_t *rk = producer_new(tly_source_bootstrap(fx.src));
    int64_t hi[NPARTS];
    int64_t produced = end_offsets(rk, hi);
    assert_true(produced >= 5000);
    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, (uint64_t)produced, hi, &st, parts);
    assert_int_equal(st.applied, produced);
    assert_int_equal(st.rejected, 0);
    tly_store_stats_t ss;
    tly_store_stats(fx.store, &ss);
    assert_int_equal(ss.events_applied, produced);

    rd_kafka_destroy(rk);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* ---- event times, topics, gaps, loading, rebalance ----------------------------- */

/* Waits until applied + rejected reaches n with nparts partitions assigned
 * and no lag; fills *st. */
static void await_total(fixture_t *fx, uint64_t n, size_t nparts, tly_source_stats_t *st)
{
    int64_t deadline = deadline_after(DEADLINE_S);
    for (;;) {
        tly_source_stats(fx->src, st, NULL, 0);
        if (st->applied + st->rejected >= n && st->npartitions == nparts && st->lag == 0)
            return;
        if (mono_ms() > deadline)
            fail_msg("not caught up: applied %" PRIu64 " + rejected %" PRIu64 " of %" PRIu64
                     ", %zu partitions, lag %" PRId64,
                     st->applied, st->rejected, n, st->npartitions, st->lag);
        pause_10ms();
    }
}

/* Formats epoch ms as ISO 8601 UTC with milliseconds. */
static void iso8601(int64_t ms, char *buf, size_t cap)
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(buf, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

#define USER_FEATURES                                                                              \
    "features:\n"                                                                                  \
    "  - { name: events, entity: user, key: user_id, agg: count, windows: [1h] }\n"                \
    "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"

static void assert_users(fixture_t *fx, const user_model_t *users)
{
    for (uint64_t u = 1; u <= N_USERS; u++) {
        assert_int_equal(read_int(fx, "user", u, "events:1h"), users[u].events);
        if (users[u].events > 0)
            assert_last_action(fx, u, &users[u]);
    }
}

static void model_add(user_model_t *m, int action, int64_t ts)
{
    m->events++;
    if (ts > m->last_ts) {
        m->last_ts = ts;
        m->last_action = action;
    }
}

/* Several appliers. Every user's and every pin's events carry the same
 * time, so only the order they are applied in decides RECENT's order
 * (equal times keep arrival order, newest first) and last's value: both
 * must follow the offsets. A user's events share its message key; a pin's
 * are all in one partition but each under another key (another user's),
 * as pins are fed by user-keyed events. The whole stream is produced
 * before the source starts, so the consumer queue holds thousands of
 * messages and the batches are spread over the appliers: by partition when
 * a batch spans enough of them, else by entity. */
#define ORD_USERS 120
#define ORD_PINS  96
#define ORD_EACH  60
#define ORD_K     40
static void check_order(fixture_t *fx, const char *entity, uint64_t id, int64_t time_ms,
                        int64_t count)
{
    int ent = tly_featset_entity(fx->fs, entity, strlen(entity));
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx->fs, (uint32_t)ent, "recent", 6, &feat, &win), TLY_OK);
    assert_int_equal(read_int(fx, entity, id, "n:1h"), count);
    assert_int_equal(read_int(fx, entity, id, "seq"), (int64_t)(id * 1000 + ORD_EACH - 1));
    char idbuf[24], sbuf[64];
    int len = snprintf(idbuf, sizeof idbuf, "%" PRIu64, id);
    tly_item_t it[ORD_K];
    size_t n = 0;
    assert_int_equal(tly_store_recent(fx->store, (uint32_t)ent, idbuf, (size_t)len, feat, INT64_MIN,
                                      wall_ms(), it, ORD_K, &n, sbuf, sizeof sbuf),
                     TLY_OK);
    assert_int_equal(n, ORD_K);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(it[i].time_ms, time_ms);
        assert_int_equal(it[i].vals[0].type, TLY_V_INT);
        assert_int_equal(it[i].vals[0].u.i, (int64_t)(id * 1000 + ORD_EACH - 1 - i));
    }
}

static void produce_to(rd_kafka_t *rk, int32_t partition, const char *key, const char *payload,
                       size_t len)
{
    for (;;) {
        rd_kafka_resp_err_t e = rd_kafka_producev(
            rk, RD_KAFKA_V_TOPIC(TOPIC), RD_KAFKA_V_PARTITION(partition),
            RD_KAFKA_V_KEY(key, strlen(key)), RD_KAFKA_V_VALUE((void *)payload, len),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
            return;
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            fail_msg("produce: %s", rd_kafka_err2str(e));
        rd_kafka_poll(rk, 10);
    }
}

static void appliers_keep_offset_order(int threads)
{
    fixture_t fx;
    char yaml[4096];
    snprintf(yaml, sizeof yaml,
             "kafka:\n  brokers: embedded\n  group: test-order-%d\n  topics: [" TOPIC "]\n"
             "  mode: replica\n  start: earliest\n  threads: %d\n"
             "events:\n  time: { field: ts, unit: ms }\n"
             "features:\n"
             "  - { name: n, entity: user, key: user_id, agg: count, windows: [1h] }\n"
             "  - { name: seq, entity: user, key: user_id, agg: last, value: seq }\n"
             "  - { name: recent, entity: user, key: user_id, agg: last_k, k: %d, "
             "value: [seq] }\n"
             "  - { name: n, entity: pin, key: pin_id, agg: count, windows: [1h] }\n"
             "  - { name: seq, entity: pin, key: pin_id, agg: last, value: pseq }\n"
             "  - { name: recent, entity: pin, key: pin_id, agg: last_k, k: %d, "
             "value: [pseq] }\n",
             threads, threads, ORD_K, ORD_K);
    fixture_init_yaml(&fx, yaml);
    assert_int_equal(fx.cfg->kafka.threads, threads);
    tly_rcu_thread_online();

    /* Users and pins interleaved round-robin; user u's j-th event has seq
     * u*1000+j, the user's one time and a pin of its own (ids above
     * 100000); pin q's j-th event goes to
     * partition q mod NPARTS under key "q-j", has pseq q*1000+j, the pin's
     * one time and a user of its own (ids above ORD_USERS). */
    int64_t t0 = wall_ms() - 60 * 1000;
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    for (int j = 0; j < ORD_EACH; j++) {
        for (uint64_t u = 1; u <= ORD_USERS; u++) {
            char json[128];
            int len = snprintf(json, sizeof json,
                               "{\"user_id\": %" PRIu64 ", \"seq\": %" PRIu64
                               ", \"pin_id\": %" PRIu64 ", \"pseq\": 0, \"ts\": %" PRId64 "}",
                               u, u * 1000 + (uint64_t)j, 100000 + u, t0 - (int64_t)u);
            produce(prod, u, json, (size_t)len);
        }
        for (uint64_t q = 1; q <= ORD_PINS; q++) {
            char json[160], key[32];
            uint64_t user = 1000 + q * ORD_EACH + (uint64_t)j;
            int len = snprintf(json, sizeof json,
                               "{\"user_id\": %" PRIu64 ", \"seq\": 0, \"pin_id\": %" PRIu64
                               ", \"pseq\": %" PRIu64 ", \"ts\": %" PRId64 "}",
                               user, q, q * 1000 + (uint64_t)j, t0 - 500 - (int64_t)q);
            snprintf(key, sizeof key, "%" PRIu64 "-%d", q, j);
            produce_to(prod, (int32_t)(q % NPARTS), key, json, (size_t)len);
        }
    }
    const uint64_t total = (uint64_t)(ORD_USERS + ORD_PINS) * ORD_EACH;
    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    consume_all(&fx, prod, total, &st, parts);
    assert_int_equal(st.applied, total);
    assert_int_equal(st.rejected, 0);

    for (uint64_t u = 1; u <= ORD_USERS; u++)
        check_order(&fx, "user", u, t0 - (int64_t)u, ORD_EACH);
    for (uint64_t q = 1; q <= ORD_PINS; q++)
        check_order(&fx, "pin", q, t0 - 500 - (int64_t)q, ORD_EACH);
    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

static void test_appliers_keep_each_entitys_offset_order(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    appliers_keep_offset_order(2);
    appliers_keep_offset_order(3);
    appliers_keep_offset_order(4);
}

/* One partition: every batch is shared by entity (each message decoded
 * once, apply.c), with rejections (bad JSON, a missing key, a future time)
 * mixed in and strings written with escapes (an id, a `where` value, a
 * last_k value); each user's events carry one time, so last and last_k
 * follow the offsets alone. Checked against a model, with 2 and 3
 * appliers. */
#define SH_USERS 29
#define SH_EACH  150
#define SH_K     12
typedef struct {
    int64_t n, clicks, ts;
    int last_action;
    int64_t seq[SH_EACH]; /* of the events taken, in offset order */
    size_t nseq;
} sh_model_t;

static rd_kafka_t *offsets_reader_new(const char *bootstrap, const char *group);
static void await_committed(rd_kafka_t *reader, const bool which[NPARTS],
                            const int64_t want[NPARTS], int64_t off[NPARTS]);

static void appliers_share_one_partition(int threads)
{
    fixture_t fx;
    char yaml[4096];
    snprintf(yaml, sizeof yaml,
             "kafka:\n  brokers: embedded\n  group: test-share-%d\n  topics: [" TOPIC "]\n"
             "  mode: replica\n  start: earliest\n  threads: %d\n"
             "events:\n  time: { field: ts, unit: ms }\n"
             "features:\n"
             "  - { name: n, entity: user, key: user_id, agg: count, windows: [1h] }\n"
             "  - { name: clicks, entity: user, key: user_id, where: { action: click }, "
             "agg: count, windows: [1h] }\n"
             "  - { name: last_action, entity: user, key: user_id, agg: last, value: action }\n"
             "  - { name: recent, entity: user, key: user_id, agg: last_k, k: %d, "
             "value: [seq, note] }\n",
             threads, threads, SH_K);
    fixture_init_yaml(&fx, yaml);
    tly_rcu_thread_online();

    static sh_model_t users[SH_USERS + 1];
    memset(users, 0, sizeof users);
    uint64_t want_rejected[TLY_E__COUNT] = {0}, want_applied = 0;
    int64_t t0 = wall_ms() - 60 * 1000;
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    const uint64_t total = (uint64_t)SH_USERS * SH_EACH;
    for (uint64_t i = 0; i < total; i++) {
        uint64_t u = 1 + i % SH_USERS;
        int action = (int)(i % 5);
        sh_model_t *m = &users[u];
        int64_t ts = t0 - (int64_t)u;
        bool future = i % 37 == 5, no_key = i % 41 == 9, bad = i % 43 == 13;
        if (future)
            ts = wall_ms() + 10 * 60 * 1000;
        char json[256], id[32], key[32];
        /* "u<u>", every third id written with an escape */
        snprintf(id, sizeof id, i % 3 == 0 ? "\\u0075%" PRIu64 : "u%" PRIu64, u);
        int len = snprintf(json, sizeof json,
                           "{%s%s%s\"seq\": %" PRIu64 ", \"action\": \"%s\", "
                           "\"note\": \"n%" PRIu64 "\\u00e9\\\"\", \"ts\": %" PRId64 "}",
                           no_key ? "" : "\"user_id\": \"", no_key ? "" : id, no_key ? "" : "\", ",
                           i, action == 2 && i % 2 == 0 ? "cl\\u0069ck" : actions[action], i, ts);
        assert_true(len > 0 && len < (int)sizeof json);
        if (bad)
            len -= 2;
        snprintf(key, sizeof key, "%" PRIu64, u);
        produce_to(prod, 0, key, json, (size_t)len);
        if (bad)
            want_rejected[TLY_E_EV_BAD_JSON]++;
        else if (future) /* the store judges the time first */
            want_rejected[TLY_E_EV_FUTURE]++;
        else if (no_key)
            want_rejected[TLY_E_EV_MISSING_KEY]++;
        if (bad || no_key || future)
            continue;
        want_applied++;
        m->n++;
        m->clicks += action == 2;
        m->ts = ts;
        m->last_action = action;
        m->seq[m->nseq++] = (int64_t)i;
    }
    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    consume_all(&fx, prod, total, &st, parts);
    assert_int_equal(st.applied, want_applied);
    assert_int_equal(st.rejected, total - want_applied);
    for (int e = 0; e < TLY_E__COUNT; e++)
        assert_int_equal(st.rejected_by[e], want_rejected[e]);
    /* with apply threads, batches of PIPELINE_MIN messages or more are
     * pipelined: the counts above went through that path */
    assert_true(st.batches_pipelined > 0);

    int ent = tly_featset_entity(fx.fs, "user", 4);
    uint32_t feat;
    int win;
    assert_int_equal(tly_featset_resolve(fx.fs, (uint32_t)ent, "recent", 6, &feat, &win), TLY_OK);
    for (uint64_t u = 1; u <= SH_USERS; u++) {
        const sh_model_t *m = &users[u];
        char id[32], sbuf[1024], note[32];
        int idlen = snprintf(id, sizeof id, "u%" PRIu64, u);
        int64_t got[2];
        tly_featwin_t req[2];
        const char *names[2] = {"n:1h", "clicks:1h"};
        for (int k = 0; k < 2; k++) {
            assert_int_equal(tly_featset_resolve(fx.fs, (uint32_t)ent, names[k], strlen(names[k]),
                                                 &req[k].feat, &win),
                             TLY_OK);
            req[k].window = (uint32_t)win;
        }
        tly_value_t out[2], last;
        assert_int_equal(tly_store_read(fx.store, (uint32_t)ent, id, (size_t)idlen, req, 2,
                                        wall_ms(), out, NULL, sbuf, sizeof sbuf),
                         TLY_OK);
        got[0] = out[0].u.i;
        got[1] = out[1].u.i;
        assert_int_equal(got[0], m->n);
        assert_int_equal(got[1], m->clicks);
        tly_featwin_t lreq;
        assert_int_equal(
            tly_featset_resolve(fx.fs, (uint32_t)ent, "last_action", 11, &lreq.feat, &win), TLY_OK);
        lreq.window = 0;
        int64_t last_ms;
        assert_int_equal(tly_store_read(fx.store, (uint32_t)ent, id, (size_t)idlen, &lreq, 1,
                                        wall_ms(), &last, &last_ms, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(last_ms, m->ts);
        assert_int_equal(last.type, TLY_V_STR);
        assert_int_equal(last.len, strlen(actions[m->last_action]));
        assert_memory_equal(last.u.s, actions[m->last_action], last.len);
        tly_item_t it[SH_K];
        size_t n = 0;
        assert_int_equal(tly_store_recent(fx.store, (uint32_t)ent, id, (size_t)idlen, feat,
                                          INT64_MIN, wall_ms(), it, SH_K, &n, sbuf, sizeof sbuf),
                         TLY_OK);
        assert_int_equal(n, SH_K);
        for (size_t j = 0; j < n; j++) {
            int64_t seq = m->seq[m->nseq - 1 - j]; /* newest first: the latest offsets */
            int nlen = snprintf(note, sizeof note, "n%" PRId64 "\xc3\xa9\"", seq);
            assert_int_equal(it[j].time_ms, m->ts);
            assert_int_equal(it[j].vals[0].type, TLY_V_INT);
            assert_int_equal(it[j].vals[0].u.i, seq);
            assert_int_equal(it[j].vals[1].type, TLY_V_STR);
            assert_int_equal(it[j].vals[1].len, nlen);
            assert_memory_equal(it[j].vals[1].u.s, note, (size_t)nlen);
        }
    }
    /* Stopped, the source has committed partition 0 at its end: every
     * message, applied or rejected, was settled in order. */
    tly_source_stop(fx.src);
    char group[32];
    snprintf(group, sizeof group, "test-share-%d", threads);
    rd_kafka_t *reader = offsets_reader_new(tly_source_bootstrap(fx.src), group);
    bool which[NPARTS] = {true};
    int64_t want[NPARTS] = {(int64_t)total}, off[NPARTS];
    await_committed(reader, which, want, off);
    rd_kafka_destroy(reader);
    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

static void test_appliers_share_one_partitions_batches_by_entity(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    appliers_share_one_partition(2);
    appliers_share_one_partition(3);
}

static void test_kafka_timestamp_is_the_event_time_without_events_time(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 600 };
    fixture_t fx;
    fixture_init_yaml(&fx, "kafka: { brokers: embedded, group: test-kts, topics: [" TOPIC "],"
                           " mode: replica, start: earliest }\n" USER_FEATURES);
    tly_rcu_thread_online();
    assert_int_equal(fx.fs->topics[0].time_field, -1);
    start_source(&fx);

    static user_model_t users[N_USERS + 1];
    memset(users, 0, sizeof users);
    int64_t t0 = wall_ms(), max_ts = -1;
    uint64_t lcg = 4242;
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    for (int i = 0; i < N; i++) {
        event_t e = event_at(&lcg, i, t0);
        /* a "ts" field that is not the event time: no events.time */
        char json[160];
        int len =
            snprintf(json, sizeof json, "{\"user_id\": %" PRIu64 ", \"action\": \"%s\", \"ts\": 5}",
                     e.user, actions[e.action]);
        produce_at(prod, TOPIC, e.user, json, (size_t)len, e.ts);
        model_add(&users[e.user], e.action, e.ts);
        if (e.ts > max_ts)
            max_ts = e.ts;
    }
    flush_producer(prod);

    tly_source_stats_t st;
    await_total(&fx, N, NPARTS, &st);
    assert_int_equal(st.applied, N);
    assert_int_equal(st.rejected, 0);
    assert_int_equal(st.watermark_ms, max_ts);
    assert_users(&fx, users);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

static void test_each_topic_reads_its_own_time_field_and_limits(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 1000 };
    fixture_t fx;
    fixture_init_yaml(&fx, "kafka:\n"
                           "  brokers: embedded\n"
                           "  group: test-topics\n"
                           "  mode: replica\n"
                           "  start: earliest\n"
                           "  topics:\n"
                           "    - { name: ta, events: { time: { field: ts, unit: ms } } }\n"
                           "    - name: tb\n"
                           "      events: { time: { field: at, unit: iso8601 }, max_bytes: 100 }\n"
                           "events: { max_bytes: 4096 }\n" USER_FEATURES);
    tly_rcu_thread_online();
    assert_int_equal(fx.fs->ntopics, 2);
    assert_true(fx.fs->topics[0].time_field >= 0);
    assert_true(fx.fs->topics[1].time_field >= 0);
    assert_int_equal(fx.fs->topics[1].time_unit, TLY_TIME_ISO8601);
    start_source(&fx);

    static user_model_t users[N_USERS + 1];
    memset(users, 0, sizeof users);
    int64_t t0 = wall_ms(), max_ts = -1;
    uint64_t lcg = 31337;
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    for (int i = 0; i < N; i++) {
        event_t e = event_at(&lcg, i, t0);
        char json[200], when[80];
        int len;
        /* Each topic's events carry the other's time field as garbage: a
         * decoder reading it would reject them. The message timestamps
         * (the producer's clock) are not the event times. */
        if (i % 2 == 0) {
            len = snprintf(json, sizeof json,
                           "{\"user_id\": %" PRIu64 ", \"action\": \"%s\", \"ts\": %" PRId64
                           ", \"at\": \"yesterday\"}",
                           e.user, actions[e.action], e.ts);
            produce_at(prod, "ta", e.user, json, (size_t)len, 0);
        } else {
            iso8601(e.ts, when, sizeof when);
            len = snprintf(json, sizeof json,
                           "{\"user_id\": %" PRIu64 ", \"at\": \"%s\", \"action\": \"%s\"}", e.user,
                           when, actions[e.action]);
            assert_true(len <= 100);
            produce_at(prod, "tb", e.user, json, (size_t)len, 0);
        }
        model_add(&users[e.user], e.action, e.ts);
        if (e.ts > max_ts)
            max_ts = e.ts;
    }
    /* Rejected by the topic's rules: tb has no "ts" time and a 100-byte
     * limit; ta has no "at" time. The long ta event is fine there. */
    char json[200];
    int len = snprintf(json, sizeof json,
                       "{\"user_id\": 1, \"action\": \"click\", \"ts\": %" PRId64 "}", t0 - 1000);
    produce_at(prod, "tb", 1, json, (size_t)len, 0);
    len = snprintf(json, sizeof json,
                   "{\"user_id\": 2, \"action\": \"click\", \"at\": \"2026-01-01T00:00:00Z\"}");
    produce_at(prod, "ta", 2, json, (size_t)len, 0);
    char when[80];
    iso8601(t0 - 2000, when, sizeof when);
    len = snprintf(json, sizeof json,
                   "{\"user_id\": 3, \"action\": \"click\", \"at\": \"%s\", \"pad\": \"%060d\"}",
                   when, 0);
    assert_true(len > 100);
    produce_at(prod, "tb", 3, json, (size_t)len, 0);
    len =
        snprintf(json, sizeof json,
                 "{\"user_id\": 4, \"action\": \"save\", \"ts\": %" PRId64 ", \"pad\": \"%060d\"}",
                 t0 - 3000, 0);
    produce_at(prod, "ta", 4, json, (size_t)len, 0);
    model_add(&users[4], 3, t0 - 3000);
    if (t0 - 3000 > max_ts)
        max_ts = t0 - 3000;
    /* Rejected whole by the store: a time a year ahead (past the default
     * max_future_skew of 1m), and no key. Neither is applied nor moves the
     * watermark. */
    len = snprintf(json, sizeof json, "{\"user_id\": 5, \"action\": \"click\", \"ts\": %" PRId64 "}",
                   (int64_t)(t0 + INT64_C(365) * 86400000));
    produce_at(prod, "ta", 5, json, (size_t)len, 0);
    len = snprintf(json, sizeof json, "{\"action\": \"click\", \"ts\": %" PRId64 "}", t0 - 500);
    produce_at(prod, "ta", 6, json, (size_t)len, 0);
    flush_producer(prod);

    tly_source_stats_t st;
    await_total(&fx, N + 6, 2 * NPARTS, &st);
    assert_int_equal(st.applied, N + 1);
    assert_int_equal(st.rejected, 5);
    assert_int_equal(st.rejected_by[TLY_E_EV_MISSING_TIME], 2);
    assert_int_equal(st.rejected_by[TLY_E_EV_TOO_LARGE], 1);
    assert_int_equal(st.rejected_by[TLY_E_EV_FUTURE], 1);
    assert_int_equal(st.rejected_by[TLY_E_EV_MISSING_KEY], 1);
    assert_int_equal(st.watermark_ms, max_ts);
    assert_users(&fx, users);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

static void test_out_of_range_position_is_reset_counted_and_nothing_is_lost(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 800 };
    fixture_t fx;
    fixture_init(&fx, "test-gap", "replica", "earliest", "");
    tly_rcu_thread_online();
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    int64_t hi[NPARTS];
    produce_users(prod, N, 555, hi);
    /* Positions past the end (a snapshot of a topic since recreated): Kafka
     * answers out of range, auto.offset.reset (earliest) moves each
     * partition back to its beginning. */
    uint64_t nonempty = 0;
    for (int p = 0; p < NPARTS; p++) {
        assert_int_equal(tly_source_resume_at(fx.src, TOPIC, p, hi[p] + 50, -1), TLY_OK);
        nonempty += hi[p] > 0;
    }
    start_source(&fx);

    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, N, hi, &st, parts);
    assert_int_equal(st.applied, N);
    assert_int_equal(st.gaps, nonempty);
    assert_int_equal(st.gap_messages, 0);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* A client of a daemon around fx's source, store and config, for running
 * commands: its session, scratch and reply buffer. */
typedef struct {
    tly_daemon_t d;
    tly_session_t s;
    tly_cmd_scratch_t *sc;
    tly_buf_t out;
} console_t;

static void console_open(const fixture_t *fx, console_t *c)
{
    memset(c, 0, sizeof *c);
    c->d.cfg = fx->cfg;
    c->d.fs = fx->fs;
    c->d.store = fx->store;
    c->d.source = fx->src;
    tly_session_init(&c->s, &c->d);
    c->sc = tly_cmd_scratch_new();
}

static void console_close(console_t *c)
{
    tly_buf_fini(&c->out);
    tly_cmd_scratch_free(c->sc);
}

/* Runs one command (space-separated words) on c; returns the reply (valid
 * until the next call). */
static const char *run(console_t *c, const char *line)
{
    char copy[512];
    snprintf(copy, sizeof copy, "%s", line);
    tly_arg_t argv[16];
    size_t argc = 0;
    for (char *save = NULL, *w = strtok_r(copy, " ", &save); w != NULL && argc < 16;
         w = strtok_r(NULL, " ", &save))
        argv[argc++] = (tly_arg_t){w, strlen(w)};
    c->out.len = 0;
    tly_command_exec(&c->d, &c->s, c->sc, argv, argc, &c->out, wall_ms());
    tly_buf_append(&c->out, "", 1);
    c->out.len--;
    return c->out.data;
}

static void test_queries_get_loading_until_caught_up_unless_stale_is_on(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 300 };
    char yaml[4096];
    make_yaml(yaml, sizeof yaml, "test-loading", "shard", "earliest", "  ready_lag: 0\n",
             "");
    fixture_t fx;
    fixture_init_yaml(&fx, yaml);
    tly_rcu_thread_online();
    int64_t t0 = wall_ms();
    uint64_t lcg = 8080;
    int64_t events_of_7 = 0;
    rd_kafka_t *prod = producer_new(tly_source_bootstrap(fx.src));
    for (int i = 0; i < N; i++) {
        event_t e = event_at(&lcg, i, t0);
        e.user = 1 + (uint64_t)i % 10;
        char json[160];
        int len = snprintf(json, sizeof json, "{\"user_id\": %" PRIu64 ", \"ts\": %" PRId64 "}",
                           e.user, e.ts);
        produce(prod, e.user, json, (size_t)len);
        events_of_7 += e.user == 7;
    }
    flush_producer(prod);

    console_t c;
    console_open(&fx, &c);
    assert_false(tly_source_ready(fx.src));
    /* Shard mode: the embedded coordinator waits 3 s before the first
     * assignment, so nothing is assigned yet. */
    start_source(&fx);
    assert_string_equal(run(&c, "FEATURES user 7 events:1h"),
                        "-LOADING tallyd is catching up with Kafka (lag not known yet: no "
                        "partitions assigned); retry, or CLIENT STALE ON to read anyway\r\n");
    assert_non_null(strstr(run(&c, "MFEATURES user 1 7"), "-LOADING "));
    assert_non_null(strstr(run(&c, "RECENT user 7 last_action"), "-LOADING "));
    assert_non_null(strstr(run(&c, "INFO source"), "\r\nloading:1\r\n"));
    assert_string_equal(run(&c, "CLIENT STALE ON"), "+OK\r\n");
    assert_string_equal(run(&c, "FEATURES user 7 events:1h"), "*2\r\n$9\r\nevents:1h\r\n:0\r\n");
    assert_string_equal(run(&c, "CLIENT STALE OFF"), "+OK\r\n");
    assert_non_null(strstr(run(&c, "CLIENT STALE MAYBE"), "-ERR unknown subcommand"));

    int64_t deadline = deadline_after(DEADLINE_S);
    while (!tly_source_ready(fx.src)) {
        if (mono_ms() > deadline)
            fail_msg("the source never became ready");
        pause_10ms();
    }
    /* Ready means caught up (ready_lag 0): every event is applied. */
    tly_source_stats_t st;
    tly_source_stats(fx.src, &st, NULL, 0);
    assert_true(st.ready);
    assert_int_equal(st.applied, N);
    assert_int_equal(st.lag, 0);
    char want[64];
    snprintf(want, sizeof want, "*2\r\n$9\r\nevents:1h\r\n:%" PRId64 "\r\n", events_of_7);
    assert_string_equal(run(&c, "FEATURES user 7 events:1h"), want);
    const char *info = run(&c, "INFO source");
    assert_non_null(strstr(info, "\r\nloading:0\r\n"));
    assert_non_null(strstr(info, "\r\noffset_resets:0\r\n"));

    console_close(&c);
    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    tly_rcu_thread_offline();
}

/* Waits until src has `want` partitions assigned and is ready; fills parts.
 * A group may need several rounds to settle (on a loaded machine the group
 * was seen revoking an assignment half a second after making it and
 * rebalancing again; the mock delays every first join by 3 s), hence three
 * times the usual deadline. */
static void await_assigned(tly_source_t *src, size_t want, tly_partition_stat_t parts[NPARTS],
                           tly_source_stats_t *st)
{
    int64_t deadline = deadline_after(3 * DEADLINE_S);
    for (;;) {
        tly_source_stats(src, st, parts, NPARTS);
        if (st->npartitions == want && st->ready)
            return;
        if (mono_ms() > deadline)
            fail_msg("%zu partitions assigned, want %zu", st->npartitions, want);
        pause_10ms();
    }
}

static void test_rebalance_drops_revoked_partitions_from_the_stats(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    static const char *const fast =
        "  properties: { heartbeat.interval.ms: 100, session.timeout.ms: 6000 }\n";
    char yaml[4096];
    make_yaml(yaml, sizeof yaml, "test-rebalance", "shard", "earliest", fast, "");
    fixture_t a;
    fixture_init_yaml(&a, yaml);
    tly_rcu_thread_online();
    start_source(&a);
    tly_source_stats_t st;
    tly_partition_stat_t pa[NPARTS], pb[NPARTS];
    await_assigned(a.src, NPARTS, pa, &st);
    uint64_t rebalances = st.rebalances;

    /* A second member of the group, on the first one's cluster. */
    make_yaml_at(yaml, sizeof yaml, tly_source_bootstrap(a.src), "test-rebalance", "shard",
                 "earliest", fast, "");
    fixture_t b;
    fixture_init_yaml(&b, yaml);
    start_source(&b);
    await_assigned(b.src, NPARTS / 2, pb, &st);
    await_assigned(a.src, NPARTS / 2, pa, &st);
    assert_true(st.rebalances > rebalances);
    bool owned[NPARTS] = {false};
    for (size_t i = 0; i < NPARTS / 2; i++) {
        assert_string_equal(pa[i].topic, TOPIC);
        assert_false(owned[pa[i].partition]);
        owned[pa[i].partition] = true;
    }
    for (size_t i = 0; i < NPARTS / 2; i++) {
        assert_false(owned[pb[i].partition]);
        owned[pb[i].partition] = true;
    }

    fixture_fini(&b);
    fixture_fini(&a);
    tly_rcu_thread_offline();
}

/* ---- a cluster of the test's own ---------------------------------------------- */

/* Kafka protocol request types (ApiKey), for the mock's fault injection. */
#define API_FETCH     1
#define API_HEARTBEAT 12

/* librdkafka's mock cluster made here rather than by a source
 * ("embedded"), so a test can reach into it; the sources reach it by
 * address, as a real cluster (and so ask it for end offsets at each
 * assignment, which they skip with "embedded"). TOPIC has NPARTS
 * partitions. */
typedef struct {
    rd_kafka_t *host;
    rd_kafka_mock_cluster_t *mock;
    const char *bootstrap; /* the mock's */
} cluster_t;

static void cluster_init(cluster_t *c)
{
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "log_level", "3"); /* the host handle has no brokers of its own */
    c->host = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (c->host == NULL)
        fail_msg("mock host: %s", err);
    c->mock = rd_kafka_mock_cluster_new(c->host, 3);
    assert_non_null(c->mock);
    assert_int_equal(rd_kafka_mock_topic_create(c->mock, TOPIC, NPARTS, 1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    c->bootstrap = rd_kafka_mock_cluster_bootstraps(c->mock);
}

static void cluster_fini(cluster_t *c)
{
    rd_kafka_mock_cluster_destroy(c->mock);
    rd_kafka_destroy(c->host);
}

/* kafka.properties entries for a group that rebalances within a few seconds
 * on the mock. Its coordinator waits session.timeout.ms - 1 s for the
 * members to join again, and 3 s before the first assignment, during which
 * a member must not time out. */
#define QUICK_GROUP "heartbeat.interval.ms: 100, session.timeout.ms: 3500"

/* Waits until src went through `more` more rebalance callbacks than
 * `since` counted and has `want` partitions; fills *st and parts (NULL:
 * not wanted). */
static void await_rebalanced(tly_source_t *src, uint64_t since, uint64_t more, size_t want,
                             tly_source_stats_t *st, tly_partition_stat_t parts[NPARTS])
{
    int64_t deadline = deadline_after(3 * DEADLINE_S);
    for (;;) {
        tly_source_stats(src, st, parts, parts != NULL ? NPARTS : 0);
        if (st->rebalances >= since + more && st->npartitions == want)
            return;
        if (mono_ms() > deadline)
            fail_msg("%" PRIu64 " rebalances since, want %" PRIu64 "; %zu partitions, want %zu",
                     st->rebalances - since, more, st->npartitions, want);
        pause_10ms();
    }
}

/* Waits until src holds `want` partitions and knows the end offset of
 * each (it looks them up just after an assignment); fills *st and parts. */
static void await_ends(tly_source_t *src, size_t want, tly_source_stats_t *st,
                       tly_partition_stat_t parts[NPARTS])
{
    int64_t deadline = deadline_after(DEADLINE_S);
    for (;;) {
        tly_source_stats(src, st, parts, NPARTS);
        bool known = st->npartitions == want;
        for (size_t i = 0; known && i < want; i++)
            known = parts[i].high >= 0;
        if (known)
            return;
        if (mono_ms() > deadline)
            fail_msg("%zu partitions, want %zu, not every end offset known", st->npartitions, want);
        pause_10ms();
    }
}

/* A partition assigned again, which received messages while it was away,
 * is behind until they are applied, even while librdkafka's cached end
 * offset (from its last fetch here) still says it is at the end: queries
 * get -LOADING. The consumer fetches from a follower (KIP-392) whose
 * answers the mock delays, while the leaders, on other brokers (other
 * connections), answer the source's end offset lookup, just after the
 * assignment, at once. */
static void
test_partition_assigned_again_is_behind_until_what_arrived_meanwhile_is_applied(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { OLD = 400, NEW = 200, LEADER = 1, FOLLOWER = 2 };
    const int fetch_delay_ms = 1000 * timeout_mult();
    cluster_t c;
    cluster_init(&c);
    /* FOLLOWER leads nothing (each change is a round trip to the mock's
     * thread, which can take it a second to notice: only those needed). */
    rd_kafka_t *probe = producer_new(c.bootstrap);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(probe, TOPIC, NULL);
    assert_int_equal(rd_kafka_metadata(probe, 0, rkt, &md, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(md->topics[0].partition_cnt, NPARTS);
    for (int i = 0; i < NPARTS; i++) {
        const rd_kafka_metadata_partition_t *mp = &md->topics[0].partitions[i];
        if (mp->leader == FOLLOWER)
            assert_int_equal(rd_kafka_mock_partition_set_leader(c.mock, TOPIC, mp->id, LEADER),
                             RD_KAFKA_RESP_ERR_NO_ERROR);
        assert_int_equal(rd_kafka_mock_partition_set_follower(c.mock, TOPIC, mp->id, FOLLOWER),
                         RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(probe);
    rd_kafka_t *prod = producer_new(c.bootstrap);
    int64_t old_hi[NPARTS], hi[NPARTS];
    produce_users(prod, OLD, 1717, old_hi);

    char yaml[4096];
    make_yaml_at(yaml, sizeof yaml, c.bootstrap, "test-again", "shard", "earliest",
                 "  ready_lag: 0\n  properties: { " QUICK_GROUP " }\n", "");
    fixture_t fx;
    fixture_init_yaml(&fx, yaml);
    tly_rcu_thread_online();
    start_source(&fx);
    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, OLD, old_hi, &st, parts);

    /* A rebalance (the coordinator answers a heartbeat "rebalance in
     * progress") revokes every partition and, seconds later, assigns them
     * again. Meanwhile more events arrive, some in every partition, and the
     * follower's next answers to fetches are delayed. */
    uint64_t since = st.rebalances;
    rd_kafka_mock_push_request_errors(c.mock, API_HEARTBEAT, 1,
                                      RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS);
    await_rebalanced(fx.src, since, 1, 0, &st, NULL);
    assert_int_equal(rd_kafka_mock_broker_push_request_error_rtts(
                         c.mock, FOLLOWER, API_FETCH, 2, RD_KAFKA_RESP_ERR_NO_ERROR, fetch_delay_ms,
                         RD_KAFKA_RESP_ERR_NO_ERROR, fetch_delay_ms),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    produce_users(prod, NEW, 2929, hi);
    for (int p = 0; p < NPARTS; p++)
        assert_true(hi[p] > old_hi[p]);
    tly_source_stats(fx.src, &st, NULL, 0);
    if (st.rebalances != since + 1)
        fail_msg("assigned again before the new events were produced");

    /* Assigned again: behind, though the first fetch has not answered. */
    await_rebalanced(fx.src, since, 2, NPARTS, &st, parts);
    await_ends(fx.src, NPARTS, &st, parts);
    tly_source_stats_t now;
    tly_source_stats(fx.src, &now, NULL, 0);
    if (now.applied != OLD)
        fail_msg("the first fetch (delayed %d ms) answered before the ends were known",
                 fetch_delay_ms);
    assert_false(st.ready);
    assert_int_equal(st.lag, NEW);
    for (size_t i = 0; i < NPARTS; i++) {
        int32_t p = parts[i].partition;
        assert_int_equal(parts[i].position, old_hi[p]);
        assert_int_equal(parts[i].high, hi[p]);
        assert_int_equal(parts[i].lag, hi[p] - old_hi[p]);
    }

    /* Ready only once everything that arrived meanwhile is applied. */
    int64_t deadline = deadline_after(DEADLINE_S);
    for (;;) {
        bool ready = tly_source_ready(fx.src);
        tly_source_stats(fx.src, &now, NULL, 0);
        if (ready && now.applied != OLD + NEW)
            fail_msg("ready with %" PRIu64 " of %d events applied", now.applied, OLD + NEW);
        if (ready)
            break;
        if (mono_ms() > deadline)
            fail_msg("never ready: applied %" PRIu64 ", lag %" PRId64, now.applied, now.lag);
        pause_10ms();
    }
    await_caught_up(&fx, OLD + NEW, hi, &st, parts);
    assert_int_equal(st.applied, OLD + NEW);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    cluster_fini(&c);
    tly_rcu_thread_offline();
}

/* The total lag is unknown (-1), not the sum of the others, while some
 * partition's is: here the partitions led by one broker, whose fetch
 * answers the mock delays, have no position yet, while the others are
 * read to their end (lag 0 each). Then everything is read and the lag is
 * 0. */
static void test_total_lag_is_unknown_while_a_partition_lag_is(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 400 };
    const int delay_ms = 4000 * timeout_mult();
    cluster_t c;
    cluster_init(&c);
    rd_kafka_t *prod = producer_new(c.bootstrap);
    int64_t hi[NPARTS];
    produce_users(prod, N, 4242, hi);
    /* the slow broker: the leader of partition 0, once every partition has
     * a leader; and which partitions it leads */
    bool slow[NPARTS] = {false};
    int nslow = 0;
    int32_t slow_broker = -1;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(prod, TOPIC, NULL);
    int64_t md_deadline = deadline_after(DEADLINE_S);
    while (slow_broker < 0) {
        const struct rd_kafka_metadata *md = NULL;
        assert_int_equal(rd_kafka_metadata(prod, 0, rkt, &md, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
        bool led = md->topics[0].partition_cnt == NPARTS;
        for (int i = 0; led && i < md->topics[0].partition_cnt; i++)
            led = md->topics[0].partitions[i].leader >= 0;
        for (int i = 0; led && i < md->topics[0].partition_cnt; i++)
            if (md->topics[0].partitions[i].id == 0)
                slow_broker = md->topics[0].partitions[i].leader;
        for (int i = 0; slow_broker >= 0 && i < md->topics[0].partition_cnt; i++) {
            const rd_kafka_metadata_partition_t *mp = &md->topics[0].partitions[i];
            if (mp->leader == slow_broker && hi[mp->id] > 0) {
                slow[mp->id] = true;
                nslow++;
            }
        }
        rd_kafka_metadata_destroy(md);
        if (slow_broker < 0) {
            assert_true(mono_ms() < md_deadline);
            pause_10ms();
        }
    }
    rd_kafka_topic_destroy(rkt);
    assert_true(nslow > 0 && nslow < NPARTS);
    assert_int_equal(rd_kafka_mock_broker_push_request_error_rtts(
                         c.mock, slow_broker, API_FETCH, 2, RD_KAFKA_RESP_ERR_NO_ERROR, delay_ms,
                         RD_KAFKA_RESP_ERR_NO_ERROR, delay_ms),
                     RD_KAFKA_RESP_ERR_NO_ERROR);

    char yaml[4096];
    make_yaml_at(yaml, sizeof yaml, c.bootstrap, "test-lag-unknown", "replica", "earliest",
                 "  ready_lag: 0\n", "");
    fixture_t fx;
    fixture_init_yaml(&fx, yaml);
    tly_rcu_thread_online();
    start_source(&fx);
    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    int64_t deadline = deadline_after(DEADLINE_S);
    for (;;) {
        tly_source_stats(fx.src, &st, parts, NPARTS);
        bool others = st.npartitions == NPARTS, waiting = true;
        for (size_t i = 0; others && i < NPARTS; i++) {
            int32_t p = parts[i].partition;
            if (slow[p])
                waiting = waiting && parts[i].position < 0;
            else
                others = parts[i].position == hi[p] && parts[i].lag == 0;
        }
        if (others && waiting)
            break;
        if (others && !waiting) {
            int64_t unread = 0;
            for (size_t i = 0; i < NPARTS; i++)
                unread += parts[i].position < 0;
            if (unread == 0)
                fail_msg("the delayed fetches (%d ms) answered before the others were read",
                         delay_ms);
        }
        if (mono_ms() > deadline)
            fail_msg("the partitions of brokers other than %d were not read to their end",
                     (int)slow_broker);
        pause_10ms();
    }
    assert_int_equal(st.lag, -1);
    assert_false(st.ready);
    await_caught_up(&fx, N, hi, &st, parts);
    assert_int_equal(st.lag, 0);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    cluster_fini(&c);
    tly_rcu_thread_offline();
}

/* Shard mode: between a revocation and the next assignment this instance
 * owns nothing, so queries get -LOADING (tly_source_ready false) until the
 * new assignment caught up; an empty "current assignment" is not caught
 * up. The mock's coordinator waits session.timeout.ms - 1 s (2.5 s) for
 * the member to join again, so the revoked state lasts that long. */
static void test_shard_mode_is_not_ready_between_revocation_and_assignment(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 200 };
    cluster_t c;
    cluster_init(&c);
    rd_kafka_t *prod = producer_new(c.bootstrap);
    int64_t hi[NPARTS];
    produce_users(prod, N, 6161, hi);
    char yaml[4096];
    make_yaml_at(yaml, sizeof yaml, c.bootstrap, "test-revoked", "shard", "earliest",
                 "  properties: { " QUICK_GROUP " }\n", "");
    fixture_t fx;
    fixture_init_yaml(&fx, yaml);
    tly_rcu_thread_online();
    start_source(&fx);
    tly_source_stats_t st;
    tly_partition_stat_t parts[NPARTS];
    await_caught_up(&fx, N, hi, &st, parts);
    int64_t deadline = deadline_after(DEADLINE_S);
    while (!tly_source_ready(fx.src)) {
        if (mono_ms() > deadline)
            fail_msg("never ready after catching up");
        pause_10ms();
    }

    uint64_t since = st.rebalances;
    rd_kafka_mock_push_request_errors(c.mock, API_HEARTBEAT, 1,
                                      RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS);
    await_rebalanced(fx.src, since, 1, 0, &st, NULL);
    bool ready = tly_source_ready(fx.src);
    tly_source_stats(fx.src, &st, NULL, 0);
    if (st.rebalances != since + 1)
        fail_msg("assigned again before readiness was looked at");
    assert_false(ready);
    assert_false(st.ready);

    /* Assigned again (nothing new arrived): ready once it caught up. */
    await_rebalanced(fx.src, since, 2, NPARTS, &st, NULL);
    deadline = deadline_after(DEADLINE_S);
    while (!tly_source_ready(fx.src)) {
        if (mono_ms() > deadline)
            fail_msg("never ready after the assignment");
        pause_10ms();
    }
    tly_source_stats(fx.src, &st, NULL, 0);
    assert_int_equal(st.applied, N);

    rd_kafka_destroy(prod);
    fixture_fini(&fx);
    cluster_fini(&c);
    tly_rcu_thread_offline();
}

/* A checkpoint hook that does what snapshot.c does, on the test's cue:
 * takes the positions (a snapshot begins), and later commits them (the
 * snapshot was written). Runs on the poll thread; the cue orders it with
 * the test's thread. */
enum { HOOK_IDLE, HOOK_TAKE, HOOK_TAKEN, HOOK_COMMIT, HOOK_COMMITTED };
typedef struct {
    atomic_int cue;
    tly_position_t pos[NPARTS]; /* written before TAKEN */
    size_t npos;
} snapshot_hook_t;

static void snapshot_hook_cb(void *ctx, tly_source_t *src)
{
    snapshot_hook_t *h = ctx;
    int cue = atomic_load(&h->cue);
    if (cue == HOOK_TAKE) {
        h->npos = tly_source_positions(src, h->pos, NPARTS);
        atomic_store(&h->cue, HOOK_TAKEN);
    } else if (cue == HOOK_COMMIT) {
        tly_source_commit(src, h->pos, h->npos);
        atomic_store(&h->cue, HOOK_COMMITTED);
    }
}

/* Gives the hook its cue and waits until it answers `done`. */
static void hook_cue(snapshot_hook_t *h, int cue, int done)
{
    atomic_store(&h->cue, cue);
    int64_t deadline = deadline_after(DEADLINE_S);
    while (atomic_load(&h->cue) != done) {
        if (mono_ms() > deadline)
            fail_msg("the checkpoint hook did not answer cue %d", cue);
        pause_10ms();
    }
}

/* A consumer that only reads group's committed offsets (it never joins). */
static rd_kafka_t *offsets_reader_new(const char *bootstrap, const char *group)
{
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", bootstrap);
    conf_set(conf, "group.id", group);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (rk == NULL)
        fail_msg("consumer: %s", err);
    return rk;
}

/* Waits until the committed offset of each partition p of TOPIC with
 * which[p] is want[p]; fills off with the last offsets read (-1001: none). */
static void await_committed(rd_kafka_t *reader, const bool which[NPARTS],
                            const int64_t want[NPARTS], int64_t off[NPARTS])
{
    int64_t deadline = deadline_after(DEADLINE_S);
    for (;;) {
        rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(NPARTS);
        for (int p = 0; p < NPARTS; p++)
            rd_kafka_topic_partition_list_add(list, TOPIC, p);
        assert_int_equal(rd_kafka_committed(reader, list, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
        bool done = true;
        for (int i = 0; i < list->cnt; i++) {
            int32_t p = list->elems[i].partition;
            assert_int_equal(list->elems[i].err, RD_KAFKA_RESP_ERR_NO_ERROR);
            off[p] = list->elems[i].offset;
            done = done && (!which[p] || off[p] == want[p]);
        }
        rd_kafka_topic_partition_list_destroy(list);
        if (done)
            return;
        if (mono_ms() > deadline)
            for (int p = 0; p < NPARTS; p++)
                if (which[p] && off[p] != want[p])
                    fail_msg("partition %d: committed %" PRId64 ", want %" PRId64, p, off[p],
                             want[p]);
        pause_10ms();
    }
}

/* A snapshot's positions, taken while the source held every partition,
 * are committed once it was written, by then after a rebalance gave half
 * the partitions to another member, which committed its own progress
 * there: only the partitions still assigned here get the snapshot's
 * offsets; the others keep their new owner's. */
static void
test_snapshot_commit_leaves_partitions_revoked_meanwhile_to_their_new_owner(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { OLD = 400, NEW = 200 };
    static const char *const group = "test-commit";
    cluster_t c;
    cluster_init(&c);
    rd_kafka_t *prod = producer_new(c.bootstrap);
    int64_t old_hi[NPARTS], hi[NPARTS];
    produce_users(prod, OLD, 3131, old_hi);

    /* A commits only through its hook (snapshot mode); B commits what it
     * applied every 100 ms. */
    char yaml[4096];
    make_yaml_at(yaml, sizeof yaml, c.bootstrap, group, "shard", "earliest",
                 "  properties: { " QUICK_GROUP ", auto.commit.interval.ms: 100 }\n", "");
    fixture_t a, b;
    fixture_init_yaml(&a, yaml);
    static snapshot_hook_t hook;
    atomic_init(&hook.cue, HOOK_IDLE);
    tly_source_set_checkpoint(a.src, snapshot_hook_cb, &hook);
    tly_rcu_thread_online();
    start_source(&a);
    tly_source_stats_t st;
    tly_partition_stat_t pa[NPARTS], pb[NPARTS];
    await_caught_up(&a, OLD, old_hi, &st, pa);
    hook_cue(&hook, HOOK_TAKE, HOOK_TAKEN);
    assert_int_equal(hook.npos, NPARTS);
    for (size_t i = 0; i < NPARTS; i++) {
        assert_string_equal(hook.pos[i].topic, TOPIC);
        assert_int_equal(hook.pos[i].offset, old_hi[hook.pos[i].partition]);
    }

    /* B joins: each gets half. B applies what arrives next and commits it;
     * A has committed nothing. */
    fixture_init_yaml(&b, yaml);
    start_source(&b);
    await_assigned(b.src, NPARTS / 2, pb, &st);
    await_assigned(a.src, NPARTS / 2, pa, &st);
    bool of_a[NPARTS] = {false}, of_b[NPARTS] = {false};
    for (size_t i = 0; i < NPARTS / 2; i++) {
        of_a[pa[i].partition] = true;
        of_b[pb[i].partition] = true;
    }
    for (int p = 0; p < NPARTS; p++)
        assert_true(of_a[p] != of_b[p]);
    produce_users(prod, NEW, 4141, hi);
    for (int p = 0; p < NPARTS; p++)
        assert_true(hi[p] > old_hi[p]);
    rd_kafka_t *reader = offsets_reader_new(c.bootstrap, group);
    int64_t off[NPARTS];
    await_committed(reader, of_b, hi, off);
    for (int p = 0; p < NPARTS; p++)
        if (of_a[p])
            assert_int_equal(off[p], RD_KAFKA_OFFSET_INVALID);

    /* The snapshot was written: A commits its positions. */
    hook_cue(&hook, HOOK_COMMIT, HOOK_COMMITTED);
    await_committed(reader, of_a, old_hi, off);
    for (int p = 0; p < NPARTS; p++)
        if (of_b[p] && off[p] != hi[p])
            fail_msg("partition %d, B's: committed %" PRId64 ", not B's %" PRId64, p, off[p],
                     hi[p]);

    rd_kafka_destroy(reader);
    rd_kafka_destroy(prod);
    /* A halted first does not join again when B leaves, which would hold
     * its close for the coordinator's wait. */
    tly_source_halt(a.src);
    fixture_fini(&b);
    fixture_fini(&a);
    cluster_fini(&c);
    tly_rcu_thread_offline();
}

/* Waits until the shard router of src knows `nparts` partitions per topic
 * (0: unknown) and owns `want` partitions, listed in owned. The router
 * learns the assignment before the source asks the brokers for the end
 * offsets, which cannot be answered while the topic's metadata fails. */
static void await_owned(tly_source_t *src, int32_t nparts, size_t want, bool owned[NPARTS])
{
    int64_t deadline = deadline_after(3 * DEADLINE_S);
    for (;;) {
        tly_shard_stats_t sh;
        tly_shard_stats(tly_source_shard(src), &sh);
        if (sh.nparts == nparts && sh.nowned == want)
            break;
        if (mono_ms() > deadline)
            fail_msg("%" PRId32 " partitions known, want %" PRId32 "; %zu owned, want %zu",
                     sh.nparts, nparts, sh.nowned, want);
        pause_10ms();
    }
    int32_t list[NPARTS];
    size_t n = tly_shard_owned(tly_source_shard(src), list, NPARTS);
    assert_int_equal(n, want);
    for (int p = 0; p < NPARTS; p++)
        owned[p] = false;
    for (size_t i = 0; i < n; i++)
        owned[list[i]] = true;
}

/* Waits until a and b hold half the partitions each: the group settled
 * (a member that missed a round, see await_halves_in_one_round, joins
 * again, and the other member with it). Fills *st with a's stats. */
static void await_halves(tly_source_t *a, tly_source_t *b, tly_source_stats_t *st)
{
    int64_t deadline = deadline_after(3 * DEADLINE_S);
    for (;;) {
        tly_source_stats_t sb;
        tly_source_stats(b, &sb, NULL, 0);
        tly_source_stats(a, st, NULL, 0);
        if (st->npartitions == NPARTS / 2 && sb.npartitions == NPARTS / 2)
            return;
        if (mono_ms() > deadline)
            fail_msg("%zu and %zu partitions, want %d each", st->npartitions, sb.npartitions,
                     NPARTS / 2);
        pause_10ms();
    }
}

/* After b joined and a was revoked (`since` counted a's rebalances
 * before): waits until the round that follows gave a and b half the
 * partitions each, and returns true; false when that took more than the
 * one round. librdkafka 2.0.2's mock cluster ends a round's sync with the
 * leader's SyncGroup and answers one that comes after it (a follower's,
 * late by a millisecond on a loaded host) "invalid request", where a broker
 * answers it with the member's assignment: that member joins again, and
 * the other one with it. Fills *st and parts with a's. */
static bool await_halves_in_one_round(tly_source_t *a, tly_source_t *b, uint64_t since,
                                      tly_source_stats_t *st, tly_partition_stat_t parts[NPARTS])
{
    int64_t deadline = deadline_after(3 * DEADLINE_S);
    for (;;) {
        tly_source_stats_t sb;
        tly_source_stats(b, &sb, NULL, 0);
        tly_source_stats(a, st, parts, NPARTS);
        if (st->rebalances > since + 2 || mono_ms() > deadline)
            return false;
        if (st->rebalances == since + 2 && st->npartitions == NPARTS / 2 &&
            sb.npartitions == NPARTS / 2)
            return true;
        pause_10ms();
    }
}

/* Checks the route src's router gives every user who has events: here (-1)
 * for the partitions held, the partition (moved) for the others. */
static void assert_routes(tly_source_t *src, const bool held[NPARTS], const int64_t *events_of,
                          const int32_t *partition_of)
{
    for (uint64_t u = 1; u <= N_USERS; u++) {
        if (events_of[u] == 0)
            continue;
        char id[24], owner[TLY_SHARD_ADDR_MAX];
        int klen = snprintf(id, sizeof id, "%" PRIu64, u);
        int32_t want = held[partition_of[u]] ? -1 : partition_of[u];
        int32_t got = tly_shard_route(tly_source_shard(src), id, (size_t)klen, owner, sizeof owner);
        if (got != want)
            fail_msg("user %" PRIu64 " of partition %" PRId32 " (%s here): route says %" PRId32
                     ", want %" PRId32,
                     u, partition_of[u], held[partition_of[u]] ? "held" : "lost", got, want);
    }
}

/* Shard mode: partitions lost at an assignment made while the topic's
 * partition count was unknown (its metadata failed) are dropped, entities
 * and positions, at the next assignment that knows the count. Meanwhile the
 * router keeps the count it knew (a topic's partition count never shrinks
 * and shard mode refuses counts that differ): ids of the lost partitions,
 * whose entities are still held, are moved, not answered here from state
 * that no longer follows their partitions, also once the metadata is back
 * and the instance serves queries again. While the metadata fails, the
 * end offsets of the partitions assigned cannot be looked up: the
 * assignment is made at once (the rebalance callback does not wait for
 * them) but is not caught up, so queries get -LOADING, until they are
 * looked up again. */
static void
test_partitions_lost_while_the_count_is_unknown_are_dropped_once_it_is_known(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    enum { N = 400 };
    const uint64_t seed = 5151;
    cluster_t c;
    cluster_init(&c);
    rd_kafka_t *prod = producer_new(c.bootstrap);
    int64_t hi[NPARTS];
    produce_users(prod, N, seed, hi);
    /* The model: each user's events and partition (librdkafka's
     * partitioner placed them, as produce() keys them). */
    static int64_t events_of[N_USERS + 1];
    static int32_t partition_of[N_USERS + 1];
    memset(events_of, 0, sizeof events_of);
    uint64_t lcg = seed;
    for (int i = 0; i < N; i++)
        events_of[event_at(&lcg, i, 0).user]++;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(prod, TOPIC, NULL);
    for (uint64_t u = 1; u <= N_USERS; u++) {
        char key[24];
        int klen = snprintf(key, sizeof key, "%" PRIu64, u);
        partition_of[u] =
            rd_kafka_msg_partitioner_murmur2_random(rkt, key, (size_t)klen, NPARTS, NULL, NULL);
    }
    rd_kafka_topic_destroy(rkt);

    char yaml[4096];
    make_yaml_at(yaml, sizeof yaml, c.bootstrap, "test-unknown", "shard", "earliest",
                 "  properties: { " QUICK_GROUP " }\n", "");
    fixture_t a, b;
    fixture_init_yaml(&a, yaml);
    tly_rcu_thread_online();
    start_source(&a);
    tly_source_stats_t st;
    tly_partition_stat_t pa[NPARTS];
    await_caught_up(&a, N, hi, &st, pa);

    /* B joins. While the coordinator waits for A to join again, the
     * topic's metadata starts failing: A gets half the partitions (the
     * group's assignor still knows the topic) without knowing how many
     * there are, and loses the other half. Nothing new arrives meanwhile,
     * so only the end offset lookups could tell A it is caught up. That
     * takes the round to go through once: in a second one, made while the
     * metadata fails, a member whose metadata no longer shows the topic
     * joins without it (librdkafka: "Subscribed topic not available") and
     * gets none of its partitions. If it did not, B leaves, the metadata
     * comes back, A holds every partition again, and B joins anew. */
    bool held_unknown[NPARTS], held[NPARTS];
    uint64_t dropped_before;
    for (int attempt = 1;; attempt++) {
        uint64_t since = st.rebalances;
        dropped_before = st.dropped_entities;
        fixture_init_yaml(&b, yaml);
        start_source(&b);
        await_rebalanced(a.src, since, 1, 0, &st, NULL);
        rd_kafka_mock_topic_set_error(c.mock, TOPIC, RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE);
        if (await_halves_in_one_round(a.src, b.src, since, &st, pa))
            break;
        if (attempt == 3)
            fail_msg("B's joining took more than one round %d times", attempt);
        print_message("B's joining took more than one round; again\n");
        fixture_fini(&b);
        rd_kafka_mock_topic_set_error(c.mock, TOPIC, RD_KAFKA_RESP_ERR_NO_ERROR);
        await_assigned(a.src, NPARTS, pa, &st);
    }
    for (size_t i = 0; i < NPARTS / 2; i++)
        assert_int_equal(pa[i].high, -1); /* its end is not known */
    assert_false(tly_source_ready(a.src));
    {
        /* A query says why: partitions are assigned, their ends unknown */
        console_t con;
        console_open(&a, &con);
        char want[256];
        snprintf(want, sizeof want,
                 "-LOADING tallyd is catching up with Kafka (lag not known yet: %d partitions "
                 "assigned, their end offsets not looked up yet); retry, or CLIENT STALE ON to "
                 "read anyway\r\n",
                 NPARTS / 2);
        assert_string_equal(run(&con, "FEATURES user 7 events:1h"), want);
        console_close(&con);
    }
    if (st.dropped_entities != dropped_before)
        fail_msg("A was assigned before the metadata failed");
    for (int p = 0; p < NPARTS; p++)
        held_unknown[p] = false;
    for (size_t i = 0; i < NPARTS / 2; i++)
        held_unknown[pa[i].partition] = true;
    assert_routes(a.src, held_unknown, events_of, partition_of);
    await_owned(a.src, NPARTS, NPARTS / 2, held);
    for (int p = 0; p < NPARTS; p++)
        assert_int_equal(held[p], held_unknown[p]);

    /* The metadata is back: A looks the ends up again and serves queries,
     * with no rebalance, so the count is still unknown to its assignment. */
    rd_kafka_mock_topic_set_error(c.mock, TOPIC, RD_KAFKA_RESP_ERR_NO_ERROR);
    await_assigned(a.src, NPARTS / 2, pa, &st); /* and serving queries */
    assert_routes(a.src, held_unknown, events_of, partition_of);
    uint64_t since = st.rebalances;

    /* A rebalance (a heartbeat answered "rebalance in progress") gives A
     * the same half, now knowing the count: the partitions it lost while
     * the count was unknown are dropped. */
    rd_kafka_mock_push_request_errors(c.mock, API_HEARTBEAT, 1,
                                      RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS);
    await_rebalanced(a.src, since, 2, NPARTS / 2, &st, NULL); /* revoked, assigned */
    await_halves(a.src, b.src, &st);
    await_owned(a.src, NPARTS, NPARTS / 2, held);
    await_assigned(a.src, NPARTS / 2, pa, &st);
    for (int p = 0; p < NPARTS; p++)
        assert_int_equal(held[p], held_unknown[p]);
    uint64_t dropped = 0;
    for (uint64_t u = 1; u <= N_USERS; u++)
        dropped += events_of[u] > 0 && !held[partition_of[u]];
    assert_true(dropped > 0);
    if (st.dropped_entities - dropped_before != dropped)
        fail_msg("%" PRIu64 " entities dropped, not the %" PRIu64
                 " of the partitions lost while the count was unknown",
                 st.dropped_entities - dropped_before, dropped);
    tly_source_halt(a.src);
    for (uint64_t u = 1; u <= N_USERS; u++)
        assert_int_equal(read_int(&a, "user", u, "events:1h"),
                         held[partition_of[u]] ? events_of[u] : 0);
    tly_position_t pos[NPARTS];
    size_t npos = tly_source_positions(a.src, pos, NPARTS);
    assert_int_equal(npos, NPARTS / 2);
    for (size_t i = 0; i < npos; i++) {
        assert_true(held[pos[i].partition]);
        assert_int_equal(pos[i].offset, hi[pos[i].partition]);
    }

    rd_kafka_destroy(prod);
    fixture_fini(&b);
    fixture_fini(&a);
    cluster_fini(&c);
    tly_rcu_thread_offline();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_event_applied_once_and_offsets_committed),
        cmocka_unit_test(test_replica_mode_assigns_all_partitions_and_resumes_at_given_offsets),
        cmocka_unit_test(test_catch_up_ends_when_the_replay_reaches_the_position),
        cmocka_unit_test(test_catch_up_of_a_topic_no_longer_consumed_does_not_hold_snapshots),
        cmocka_unit_test(test_catch_up_to_offset_zero_starts_at_zero),
        cmocka_unit_test(test_positions_and_stats_keep_a_topic_name_of_kafkas_longest),
        cmocka_unit_test(test_window_start_without_an_offset_for_the_time_begins_at_the_end),
        cmocka_unit_test(test_bad_kafka_property_fails_naming_it),
        cmocka_unit_test(test_demo_stream_arrives_whole),
        cmocka_unit_test(test_appliers_keep_each_entitys_offset_order),
        cmocka_unit_test(test_appliers_share_one_partitions_batches_by_entity),
        cmocka_unit_test(test_kafka_timestamp_is_the_event_time_without_events_time),
        cmocka_unit_test(test_each_topic_reads_its_own_time_field_and_limits),
        cmocka_unit_test(test_out_of_range_position_is_reset_counted_and_nothing_is_lost),
        cmocka_unit_test(test_queries_get_loading_until_caught_up_unless_stale_is_on),
        cmocka_unit_test(test_rebalance_drops_revoked_partitions_from_the_stats),
        cmocka_unit_test(
            test_partition_assigned_again_is_behind_until_what_arrived_meanwhile_is_applied),
        cmocka_unit_test(test_total_lag_is_unknown_while_a_partition_lag_is),
        cmocka_unit_test(
            test_snapshot_commit_leaves_partitions_revoked_meanwhile_to_their_new_owner),
        cmocka_unit_test(test_shard_mode_is_not_ready_between_revocation_and_assignment),
        cmocka_unit_test(
            test_partitions_lost_while_the_count_is_unknown_are_dropped_once_it_is_known),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
