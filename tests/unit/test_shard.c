/*
 * test_shard.c — the partition of an id and the ownership router (shard.h).
 *
 * The hash values are Apache Kafka's own (UtilsTest.testMurmur2, the Java
 * client's murmur2 of these byte strings); the expected partitions are
 * computed here from them the way the Java partitioner does:
 * (hash & 0x7fffffff) % partitions.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "tallyd/config.h"
#include "tallyd/shard.h"

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(partition_of_matches_the_java_client),
        cmocka_unit_test(router_answers_owned_ids_and_moves_the_others),
        cmocka_unit_test(replica_mode_has_no_router),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
