/*
 * test_shard.c — the partition of an id and the ownership router (shard.h).
 *
 * The hash values are Apache Kafka's own (UtilsTest.testMurmur2, the Java
 * client's murmur2 of these byte strings); the expected partitions are
 * computed here from them the way the Java partitioner does:
 * (hash & 0x7fffffff) % partitions.
 */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "tallyd/config.h"
#include "tallyd/shard.h"

#include "rdkafka_tsan.h"

static const struct {
    const char *key;
    int32_t java_hash;
} kafka_vectors[] = {
    {"21", -973932308},
    {"foobar", -790332482},
    {"a-little-bit-long-string", -985981536},
    {"a-little-bit-longer-string", -1486304829},
    {"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971},
    {"abc", 479470107},
};

static int32_t java_partition(int32_t hash, int32_t n)
{
    return (int32_t)(((uint32_t)hash & 0x7fffffffu) % (uint32_t)n);
}

static void partition_of_matches_the_java_client(void **state)
{
    (void)state;
    static const int32_t counts[] = {1, 2, 3, 8, 12, 50, 1000};
    for (size_t i = 0; i < sizeof kafka_vectors / sizeof kafka_vectors[0]; i++)
        for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
            const char *k = kafka_vectors[i].key;
            int32_t got = tly_partition_of(k, strlen(k), counts[c]);
            int32_t want = java_partition(kafka_vectors[i].java_hash, counts[c]);
            if (got != want)
                fail_msg("\"%s\" over %d partitions: %d, the Java client says %d", k, counts[c],
                         got, want);
        }
    /* a worked value: foobar → 1357151166 → 16 of 50 */
    assert_int_equal(tly_partition_of("foobar", 6, 50), 16);
}

/* Kafka's Utils.murmur2 as the Java source defines it (seed 0x9747b28c,
 * m 0x5bd1e995, r 24; bytes read as unsigned, & 0xff), in Java's int
 * arithmetic: the judge for keys the vectors above do not cover. */
static int32_t java_murmur2(const unsigned char *data, size_t length)
{
    const uint32_t seed = 0x9747b28cu, m = 0x5bd1e995u;
    uint32_t h = seed ^ (uint32_t)length;
    size_t length4 = length / 4;
    for (size_t i = 0; i < length4; i++) {
        size_t i4 = i * 4;
        uint32_t k = (uint32_t)(data[i4 + 0] & 0xff) + ((uint32_t)(data[i4 + 1] & 0xff) << 8) +
                     ((uint32_t)(data[i4 + 2] & 0xff) << 16) +
                     ((uint32_t)(data[i4 + 3] & 0xff) << 24);
        k *= m;
        k ^= k >> 24;
        k *= m;
        h *= m;
        h ^= k;
    }
    switch (length % 4) {
    case 3:
        h ^= (uint32_t)(data[(length & ~(size_t)3) + 2] & 0xff) << 16;
        /* fall through */
    case 2:
        h ^= (uint32_t)(data[(length & ~(size_t)3) + 1] & 0xff) << 8;
        /* fall through */
    case 1:
        h ^= (uint32_t)(data[length & ~(size_t)3] & 0xff);
        h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return (int32_t)h;
}

/* The empty id, bytes of 0x80 and above (UTF-8 ids), every length modulo
 * 4, keys at every alignment, and hashes with the sign bit set all land
 * where the Java client puts them. */
static void partition_of_matches_java_for_empty_high_byte_and_unaligned_keys(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof kafka_vectors / sizeof kafka_vectors[0]; i++) {
        const char *k = kafka_vectors[i].key;
        assert_int_equal(java_murmur2((const unsigned char *)k, strlen(k)),
                         kafka_vectors[i].java_hash);
    }
    static const int32_t counts[] = {1, 3, 8, 12, 1000, 1024};
    static unsigned char buf[64 + 8];
    uint64_t x = 0x243f6a8885a308d3u;
    int negative = 0;
    for (int round = 0; round < 4000; round++) {
        size_t len = (size_t)round % 40, off = (size_t)round / 40 % 8;
        for (size_t i = 0; i < len; i++) {
            x = x * 6364136223846793005u + 1442695040888963407u;
            buf[off + i] = (unsigned char)(x >> 56) | (round % 2 ? 0x80 : 0);
        }
        int32_t hash = java_murmur2(buf + off, len);
        negative += hash < 0;
        for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
            int32_t want = java_partition(hash, counts[c]);
            int32_t got = tly_partition_of(buf + off, len, counts[c]);
            if (got != want)
                fail_msg("%zu bytes at offset %zu over %d partitions: %d, Java says %d", len, off,
                         counts[c], got, want);
        }
    }
    assert_true(negative > 1000); /* the sign bit was exercised */
    /* the empty id: Java hashes the empty array (a String key "" is not
     * null), 0x106e08d9 by the definition above (and by a Python
     * rendering of it) */
    assert_int_equal(java_murmur2((const unsigned char *)"", 0), 275646681);
    assert_int_equal(tly_partition_of("", 0, 1000), 275646681 % 1000);
    assert_int_equal(tly_partition_of(NULL, 0, 1000), 275646681 % 1000);
}

static tly_config_t *shard_config(void)
{
    char err[512] = "";
    tly_config_t *cfg = NULL;
    if (tly_config_load_string("kafka: { mode: shard, group: g, topics: [{name: t, key: user}] }\n"
                               "features:\n"
                               "  - { name: c, entity: user, key: user_id, agg: count, "
                               "windows: [1h] }\n",
                               "t.yaml", &cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    return cfg;
}

static void router_answers_owned_ids_and_moves_the_others(void **state)
{
    (void)state;
    tly_config_t *cfg = shard_config();
    tly_shard_t *sh = tly_shard_new(cfg, NULL);
    assert_non_null(sh);
    char owner[TLY_SHARD_ADDR_MAX] = "x";

    /* before the partition count is known, everything is answered here */
    assert_int_equal(tly_shard_route(sh, "21", 2, owner, sizeof owner), -1);

    tly_shard_set_partitions(sh, 8);
    int32_t p21 = java_partition(-973932308, 8), pfoo = java_partition(-790332482, 8);
    assert_true(p21 != pfoo); /* 4 and 6: the test needs two partitions */
    tly_shard_assigned(sh, &p21, 1);
    assert_int_equal(tly_shard_route(sh, "21", 2, owner, sizeof owner), -1);
    assert_int_equal(tly_shard_route(sh, "foobar", 6, owner, sizeof owner), pfoo);
    assert_string_equal(owner, ""); /* no owner address published yet */

    int32_t owned[8];
    assert_int_equal(tly_shard_owned(sh, owned, 8), 1);
    assert_int_equal(owned[0], p21);

    tly_shard_revoked(sh);
    assert_int_equal(tly_shard_owned(sh, owned, 8), 0);
    assert_int_equal(tly_shard_route(sh, "21", 2, owner, sizeof owner), p21);

    tly_shard_stats_t st;
    tly_shard_stats(sh, &st);
    assert_int_equal(st.nparts, 8);
    assert_int_equal(st.moved, 2);
    assert_int_equal(st.known, 0);
    tly_shard_free(sh);
    tly_config_free(cfg);
}

static void replica_mode_has_no_router(void **state)
{
    (void)state;
    char err[512] = "";
    tly_config_t *cfg = NULL;
    if (tly_config_load_string("kafka: { topics: [t] }\n"
                               "features:\n"
                               "  - { name: c, entity: user, key: user_id, agg: count, "
                               "windows: [1h] }\n",
                               "t.yaml", &cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    assert_null(tly_shard_new(cfg, NULL));
    tly_config_free(cfg);
}

/* ---- owner addresses through the endpoints topic (librdkafka's mock) -------- */

#define ENDPOINTS "test.endpoints"

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Deadlines for conditions awaited; TLY_TEST_TIMEOUT_MULT stretches them. */
static int64_t deadline_after(int64_t seconds)
{
    const char *m = getenv("TLY_TEST_TIMEOUT_MULT");
    return mono_ms() + seconds * 1000 * (m != NULL && atoi(m) > 0 ? atoi(m) : 1);
}

typedef struct {
    rd_kafka_t *host;
    rd_kafka_mock_cluster_t *mock;
    const char *bootstrap;
} mock_t;

static void mock_init(mock_t *mk)
{
    SKIP_UNDER_TSAN(); /* rdkafka_tsan.h */
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    mk->host = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    assert_non_null(mk->host);
    mk->mock = rd_kafka_mock_cluster_new(mk->host, 1);
    assert_non_null(mk->mock);
    assert_int_equal(rd_kafka_mock_topic_create(mk->mock, ENDPOINTS, 1, 1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    mk->bootstrap = rd_kafka_mock_cluster_bootstraps(mk->mock);
}

static void mock_fini(mock_t *mk)
{
    rd_kafka_mock_cluster_destroy(mk->mock);
    rd_kafka_destroy(mk->host);
}

static tly_config_t *shard_config_group(const char *group)
{
    char err[512] = "";
    char yaml[2048];
    snprintf(yaml, sizeof yaml,
             "kafka: { mode: shard, group: \"%s\", endpoints_topic: " ENDPOINTS ",\n"
             "         topics: [{name: t, key: user}] }\n"
             "features:\n"
             "  - { name: c, entity: user, key: user_id, agg: count, windows: [1h] }\n",
             group);
    tly_config_t *cfg = NULL;
    if (tly_config_load_string(yaml, "t.yaml", &cfg, err, sizeof err) != TLY_OK)
        fail_msg("config: %s", err);
    return cfg;
}

static tly_shard_t *shard_started(const tly_config_t *cfg, const mock_t *mk, const char *advertise)
{
    char err[512] = "";
    tly_shard_t *sh = tly_shard_new(cfg, NULL);
    assert_non_null(sh);
    if (!tly_shard_start(sh, mk->bootstrap, true, advertise, err, sizeof err))
        fail_msg("start: %s", err);
    return sh;
}

/* Waits until sh routes id to partition `part` with owner `want`; fails
 * naming what it saw at the deadline. */
static void await_owner(tly_shard_t *sh, const char *id, int32_t part, const char *want)
{
    int64_t deadline = deadline_after(10);
    char owner[TLY_SHARD_ADDR_MAX] = "";
    int32_t got = -2;
    while (mono_ms() < deadline) {
        got = tly_shard_route(sh, id, strlen(id), owner, sizeof owner);
        if (got == part && strcmp(owner, want) == 0)
            return;
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    tly_shard_stats_t st;
    tly_shard_stats(sh, &st);
    fail_msg("id %s: partition %d owner \"%s\", want %d \"%s\" (published %" PRIu64
             ", endpoint errors %" PRIu64 ")",
             id, got, owner, part, want, st.published, st.endpoint_errors);
}

/* Waits until sh counts `want` endpoint records delivered, and checks that
 * it stays there for a few of the endpoints thread's polls. */
static void await_published(tly_shard_t *sh, uint64_t want)
{
    int64_t deadline = deadline_after(10);
    tly_shard_stats_t st;
    tly_shard_stats(sh, &st);
    while (st.published < want && mono_ms() < deadline) {
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
        tly_shard_stats(sh, &st);
    }
    struct timespec settle = {0, 300000000};
    nanosleep(&settle, NULL);
    tly_shard_stats(sh, &st);
    if (st.published != want)
        fail_msg("published %" PRIu64 ", want %" PRIu64 " (endpoint errors %" PRIu64 ")",
                 st.published, want, st.endpoint_errors);
}

/* An owner's address reaches the other instances of its group, whatever
 * the length of the group's name (Kafka bounds a group id only by its
 * protocol's 32,767 bytes): the key "G/p" is not cut to a fixed buffer. */
static void owner_address_reaches_the_group_for_any_group_name_length(void **state)
{
    (void)state;
    mock_t mk;
    mock_init(&mk);
    static char long_group[601];
    memset(long_group, 'g', sizeof long_group - 1);
    const char *groups[] = {"g", long_group};
    int32_t p21 = java_partition(-973932308, 8);
    for (size_t i = 0; i < 2; i++) {
        tly_config_t *cfg = shard_config_group(groups[i]);
        tly_shard_t *a = shard_started(cfg, &mk, "127.0.0.1:7001");
        tly_shard_t *b = shard_started(cfg, &mk, "127.0.0.1:7002");
        tly_shard_set_partitions(a, 8);
        tly_shard_set_partitions(b, 8);
        tly_shard_assigned(a, &p21, 1);
        await_owner(b, "21", p21, "127.0.0.1:7001");
        tly_shard_free(b);
        tly_shard_free(a);
        tly_config_free(cfg);
    }
    mock_fini(&mk);
}

/* A new owner whose record is refused by the broker publishes it again
 * (while it still owns the partition): the others learn the new owner
 * instead of sending clients to the old one until the next rebalance. */
static void new_owner_is_published_again_after_a_failed_delivery(void **state)
{
    (void)state;
    mock_t mk;
    mock_init(&mk);
    tly_config_t *cfg = shard_config_group("g");
    tly_shard_t *a = shard_started(cfg, &mk, "127.0.0.1:7001");
    tly_shard_t *b = shard_started(cfg, &mk, "127.0.0.1:7002");
    tly_shard_t *c = shard_started(cfg, &mk, "127.0.0.1:7003");
    tly_shard_set_partitions(a, 8);
    tly_shard_set_partitions(b, 8);
    tly_shard_set_partitions(c, 8);
    int32_t p21 = java_partition(-973932308, 8);
    tly_shard_assigned(a, &p21, 1);
    await_owner(b, "21", p21, "127.0.0.1:7001");

    /* The rebalance moves the partition to c; the broker refuses c's
     * first record. */
    rd_kafka_mock_push_request_errors(mk.mock, 0 /* Produce */, 1,
                                      RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED);
    tly_shard_revoked(a);
    tly_shard_assigned(c, &p21, 1);
    await_owner(b, "21", p21, "127.0.0.1:7003");
    tly_shard_stats_t st;
    tly_shard_stats(c, &st);
    assert_true(st.endpoint_errors >= 1);
    /* published counts deliveries (reported to the producer after b may
     * have read the record): c's refused record is not one, a's is */
    await_published(c, 1);
    await_published(a, 1);
    tly_shard_stats(a, &st);
    assert_int_equal(st.endpoint_errors, 0);

    tly_shard_free(c);
    tly_shard_free(b);
    tly_shard_free(a);
    tly_config_free(cfg);
    mock_fini(&mk);
}

/* Produces key → value to the endpoints topic as any client could (value
 * NULL: a tombstone), and waits for its delivery. */
static void produce_endpoint(const mock_t *mk, const char *key, const char *value)
{
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", mk->bootstrap, err, sizeof err);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    assert_non_null(rk);
    assert_int_equal(rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(ENDPOINTS),
                                       RD_KAFKA_V_KEY(key, strlen(key)),
                                       RD_KAFKA_V_VALUE((void *)value, value ? strlen(value) : 0),
                                       RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(rd_kafka_flush(rk, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_destroy(rk);
}

/* Records of one partition's owners from different instances land in the
 * order their producers got through, not the order of the rebalances: the
 * previous owner's record, delayed (retries through a broker restart, say),
 * can land after the new owner's. The owner that reads a record naming
 * another for a partition it owns publishes its own again, so the others
 * do not keep sending clients to the previous owner. */
static void owner_publishes_again_over_a_late_record_of_the_previous_owner(void **state)
{
    (void)state;
    mock_t mk;
    mock_init(&mk);
    tly_config_t *cfg = shard_config_group("g");
    tly_shard_t *b = shard_started(cfg, &mk, "127.0.0.1:7002");
    tly_shard_t *c = shard_started(cfg, &mk, "127.0.0.1:7003");
    tly_shard_set_partitions(b, 8);
    tly_shard_set_partitions(c, 8);
    int32_t p21 = java_partition(-973932308, 8), pfoo = java_partition(-790332482, 8);
    assert_true(p21 != pfoo);
    tly_shard_assigned(c, &p21, 1);
    await_owner(b, "21", p21, "127.0.0.1:7003");

    /* the previous owner's record lands now, then a marker record of
     * another partition: once b read the marker it read the late record */
    char key[32];
    snprintf(key, sizeof key, "g/%d", p21);
    produce_endpoint(&mk, key, "127.0.0.1:7001");
    snprintf(key, sizeof key, "g/%d", pfoo);
    produce_endpoint(&mk, key, "marker:1");
    await_owner(b, "foobar", pfoo, "marker:1");
    await_owner(b, "21", p21, "127.0.0.1:7003");

    tly_shard_free(c);
    tly_shard_free(b);
    tly_config_free(cfg);
    mock_fini(&mk);
}

/* A record whose value is not host:port (written by something other than
 * a tallyd) makes the partition's owner unknown, counted, instead of being
 * repeated to clients in -MOVED; a valid record names the owner again. */
static void owner_record_that_is_not_an_address_is_refused(void **state)
{
    (void)state;
    mock_t mk;
    mock_init(&mk);
    tly_config_t *cfg = shard_config_group("g");
    tly_shard_t *b = shard_started(cfg, &mk, "127.0.0.1:7002");
    tly_shard_set_partitions(b, 8);
    int32_t p21 = java_partition(-973932308, 8);
    char key[32];
    snprintf(key, sizeof key, "g/%d", p21);
    static const char *const bad[] = {"127.0.0.1:7001\r\n+OK", "127.0.0.1", "host:99999",
                                      "two words:1",           "::1:7001",  "h\x7f:1"};
    uint64_t errors = 0;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        produce_endpoint(&mk, key, "127.0.0.1:7001");
        await_owner(b, "21", p21, "127.0.0.1:7001");
        produce_endpoint(&mk, key, bad[i]);
        await_owner(b, "21", p21, "");
        tly_shard_stats_t st;
        tly_shard_stats(b, &st);
        if (st.endpoint_errors != errors + 1)
            fail_msg("%s: endpoint errors %" PRIu64 ", want %" PRIu64, bad[i], st.endpoint_errors,
                     errors + 1);
        errors++;
    }
    produce_endpoint(&mk, key, "[::1]:7003");
    await_owner(b, "21", p21, "[::1]:7003");
    tly_shard_free(b);
    tly_config_free(cfg);
    mock_fini(&mk);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(partition_of_matches_the_java_client),
        cmocka_unit_test(partition_of_matches_java_for_empty_high_byte_and_unaligned_keys),
        cmocka_unit_test(router_answers_owned_ids_and_moves_the_others),
        cmocka_unit_test(replica_mode_has_no_router),
        cmocka_unit_test(owner_address_reaches_the_group_for_any_group_name_length),
        cmocka_unit_test(new_owner_is_published_again_after_a_failed_delivery),
        cmocka_unit_test(owner_publishes_again_over_a_late_record_of_the_previous_owner),
        cmocka_unit_test(owner_record_that_is_not_an_address_is_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
