/*
 * test_table.c — one shard of the entity table (store_table.c): finds,
 * inserts, replacements and removals against a plain list of what was put
 * in; keys that share a probe run and their 16 hash bits, so that only the
 * id tells them apart; growth and shrinking; and readers probing without
 * locks while a writer inserts, replaces, removes and rebuilds.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "store_int.h"
#include "tallyd/config.h"
#include "tallyd/feature.h"

static ent_t *rec_new(uint32_t type, const char *id)
{
    size_t len = strlen(id);
    ent_t *e = calloc(1, sizeof(ent_t) + 8 * id_words(len));
    assert_non_null(e);
    e->type = (uint16_t)type;
    e->idlen = (uint8_t)len;
    memcpy((char *)(e + 1), id, len);
    return e;
}

static unsigned long h_of(const ent_t *e)
{
    return hash_id(0, e->type, ent_id(e), e->idlen);
}

static ent_t *get(const shard_t *sh, uint32_t type, const char *id)
{
    size_t len = strlen(id);
    return tbl_get(sh, hash_id(0, type, id, len), type, id, len);
}

static int64_t bytes_of(const shard_t *sh)
{
    return atomic_load_explicit(&sh->bytes, memory_order_relaxed);
}

typedef struct {
    struct rcu_head rcu;
    ent_t *e;
} retired_t;

static void rec_free_cb(struct rcu_head *head)
{
    tly_rcu_tsan_acquire();
    retired_t *r = caa_container_of(head, retired_t, rcu);
    free(r->e);
    free(r);
}

/* Frees a record once no reader can hold it. */
static void rec_retire(ent_t *e)
{
    retired_t *r = malloc(sizeof *r);
    assert_non_null(r);
    r->e = e;
    tly_call_rcu(&r->rcu, rec_free_cb);
}

#define N 50000

static void test_insert_find_replace_remove_against_a_list(void **state)
{
    (void)state;
    tly_rcu_thread_online();
    shard_t sh;
    tbl_init(&sh, 0);
    int64_t empty_bytes = bytes_of(&sh);
    static ent_t *recs[2][N];
    char id[32];
    /* the same id under two entity types is two keys */
    for (int i = 0; i < N; i++)
        for (uint32_t t = 0; t < 2; t++) {
            snprintf(id, sizeof id, "k%d", i);
            recs[t][i] = rec_new(t, id);
            assert_true(tbl_insert(&sh, h_of(recs[t][i]), recs[t][i]));
        }
    assert_int_equal(sh.live, 2 * N);
    assert_true(bytes_of(&sh) >= (int64_t)(2 * 2 * N * sizeof(uint64_t))); /* <= half full */
    tly_rcu_read_lock();
    for (int i = 0; i < N; i++) {
        snprintf(id, sizeof id, "k%d", i);
        assert_ptr_equal(get(&sh, 0, id), recs[0][i]);
        assert_ptr_equal(get(&sh, 1, id), recs[1][i]);
        assert_null(get(&sh, 2, id));
        snprintf(id, sizeof id, "x%d", i);
        assert_null(get(&sh, 0, id));
    }
    tly_rcu_read_unlock();
    /* a key that is there cannot go in twice */
    ent_t *dup = rec_new(1, "k7");
    size_t used = sh.used;
    assert_false(tbl_insert(&sh, h_of(dup), dup));
    assert_int_equal(sh.used, used);
    assert_int_equal(sh.live, 2 * N);
    /* every record is visited exactly once */
    static bool visited[2][N];
    size_t pos = 0, seen = 0;
    for (ent_t *e; (e = tbl_next(&sh, &pos)) != NULL; seen++) {
        assert_true(e->type < 2);
        int i = atoi(ent_id(e) + 1);
        assert_ptr_equal(recs[e->type][i], e);
        assert_false(visited[e->type][i]);
        visited[e->type][i] = true;
    }
    assert_int_equal(seen, 2 * N);

    /* remove type 0's odd ids; replace type 1's multiples of 3 */
    for (int i = 1; i < N; i += 2) {
        assert_true(tbl_remove(&sh, h_of(recs[0][i]), recs[0][i]));
        assert_false(tbl_remove(&sh, h_of(recs[0][i]), recs[0][i])); /* gone already */
        rec_retire(recs[0][i]);
        recs[0][i] = NULL;
    }
    for (int i = 0; i < N; i += 3) {
        snprintf(id, sizeof id, "k%d", i);
        ent_t *e = rec_new(1, id);
        assert_false(tbl_replace(&sh, h_of(e), dup, e)); /* dup is not in the table */
        assert_true(tbl_replace(&sh, h_of(e), recs[1][i], e));
        rec_retire(recs[1][i]);
        recs[1][i] = e;
    }
    free(dup);
    tly_rcu_read_lock();
    for (int i = 0; i < N; i++) {
        snprintf(id, sizeof id, "k%d", i);
        assert_ptr_equal(get(&sh, 0, id), recs[0][i]); /* NULL for the removed */
        assert_ptr_equal(get(&sh, 1, id), recs[1][i]);
    }
    tly_rcu_read_unlock();
    /* removed keys go back in (tombstones are reused) */
    for (int i = 1; i < N; i += 4) {
        snprintf(id, sizeof id, "k%d", i);
        recs[0][i] = rec_new(0, id);
        assert_true(tbl_insert(&sh, h_of(recs[0][i]), recs[0][i]));
    }
    tly_rcu_read_lock();
    for (int i = 0; i < N; i++) {
        snprintf(id, sizeof id, "k%d", i);
        assert_ptr_equal(get(&sh, 0, id), recs[0][i]);
    }
    tly_rcu_read_unlock();

    /* remove everything: the table shrinks back to its first size */
    int64_t full_bytes = bytes_of(&sh);
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < N; i++)
            if (recs[t][i]) {
                assert_true(tbl_remove(&sh, h_of(recs[t][i]), recs[t][i]));
                rec_retire(recs[t][i]);
            }
    assert_int_equal(sh.live, 0);
    assert_true(bytes_of(&sh) < full_bytes);
    assert_int_equal(bytes_of(&sh), empty_bytes);
    pos = 0;
    assert_null(tbl_next(&sh, &pos));
    tly_rcu_barrier();
    tbl_destroy(&sh);
    tly_rcu_thread_offline();
}

/* Ids searched offline so that under one seed they all fall into one shard
 * and one home slot of a 64-slot array (what a producer could look for
 * were the hash fixed) scatter under a store's own seed; two stores draw
 * different seeds. */
static void test_ids_crafted_against_one_seed_scatter_under_a_stores_seed(void **state)
{
    (void)state;
    enum { K = 200 };
    static char ids[K][32];
    int found = 0;
    for (long n = 0; found < K && n < 100000000L; n++) {
        char id[32];
        int len = snprintf(id, sizeof id, "%ld", n);
        unsigned long h = hash_id(0, 0, id, (size_t)len);
        if ((h >> 58) == 0 && (h & 63) == 0)
            memcpy(ids[found++], id, (size_t)len + 1);
    }
    assert_int_equal(found, K);
    tly_config_t *cfg;
    tly_featset_t *fs;
    char err[256];
    assert_int_equal(
        tly_config_load_string("features:\n  - { name: c, entity: user, key: user_id, agg: count,"
                               " windows: [1h] }\n",
                               "seed.yaml", &cfg, err, sizeof err),
        TLY_OK);
    assert_int_equal(tly_featset_compile(cfg, &fs, err, sizeof err), TLY_OK);
    tly_store_t *a = tly_store_new(fs), *b = tly_store_new(fs);
    assert_true(a->seed != b->seed);
    /* under a's seed: how many share the most common (shard, home slot) of
     * 64 x 64; K / 4096 on average */
    static unsigned char per[64 * 64];
    memset(per, 0, sizeof per);
    int most = 0;
    for (int i = 0; i < K; i++) {
        unsigned long h = hash_id(a->seed, 0, ids[i], strlen(ids[i]));
        int c = ++per[(h >> 58) << 6 | (h & 63)];
        most = c > most ? c : most;
    }
    assert_in_range(most, 1, 6);
    tly_store_free(a);
    tly_store_free(b);
    tly_featset_free(fs);
    tly_config_free(cfg);
}

/* Keys whose hashes share the first slot (of 64) and the 16 bits the slot
 * keeps: only their ids tell them apart. Found by search. */
static void test_keys_sharing_slot_and_tag_are_told_apart_by_id(void **state)
{
    (void)state;
    tly_rcu_thread_online();
    enum { K = 4 };
    char ids[K][32];
    unsigned long want = 0;
    int found = 0;
    for (long n = 0; found < K && n < 400000000L; n++) {
        char id[32];
        int len = snprintf(id, sizeof id, "c%ld", n);
        unsigned long h = hash_id(0, 0, id, (size_t)len);
        unsigned long key = (h & 63) | (h >> 42 & 0xffff) << 6;
        if (found == 0)
            want = key;
        if (key == want)
            memcpy(ids[found++], id, (size_t)len + 1);
    }
    assert_int_equal(found, K);
    shard_t sh;
    tbl_init(&sh, 0); /* 64 slots: all four start at the same slot */
    ent_t *r[K];
    for (int i = 0; i < K; i++) {
        r[i] = rec_new(0, ids[i]);
        assert_true(tbl_insert(&sh, h_of(r[i]), r[i]));
    }
    tly_rcu_read_lock();
    for (int i = 0; i < K; i++)
        assert_ptr_equal(get(&sh, 0, ids[i]), r[i]);
    tly_rcu_read_unlock();
    /* removing one in the middle of the run leaves the later ones found */
    assert_true(tbl_remove(&sh, h_of(r[1]), r[1]));
    tly_rcu_read_lock();
    assert_null(get(&sh, 0, ids[1]));
    assert_ptr_equal(get(&sh, 0, ids[2]), r[2]);
    assert_ptr_equal(get(&sh, 0, ids[3]), r[3]);
    tly_rcu_read_unlock();
    /* a key past the tombstone is still there: inserting it again fails
     * and takes no slot */
    ent_t *again = rec_new(0, ids[2]);
    assert_false(tbl_insert(&sh, h_of(again), again));
    free(again);
    assert_int_equal(sh.used, K);
    assert_int_equal(sh.live, K - 1);
    /* replacing the last one touches only its slot */
    ent_t *r3 = rec_new(0, ids[3]);
    assert_true(tbl_replace(&sh, h_of(r3), r[3], r3));
    tly_rcu_read_lock();
    assert_ptr_equal(get(&sh, 0, ids[3]), r3);
    assert_ptr_equal(get(&sh, 0, ids[2]), r[2]);
    assert_ptr_equal(get(&sh, 0, ids[0]), r[0]);
    tly_rcu_read_unlock();
    /* the removed key comes back into the tombstone's slot */
    ent_t *r1 = rec_new(0, ids[1]);
    assert_true(tbl_insert(&sh, h_of(r1), r1));
    tly_rcu_read_lock();
    assert_ptr_equal(get(&sh, 0, ids[1]), r1);
    tly_rcu_read_unlock();
    assert_int_equal(sh.used, K); /* no new slot taken */
    free(r[1]);
    free(r[3]);
    size_t pos = 0;
    for (ent_t *e; (e = tbl_next(&sh, &pos)) != NULL;)
        free(e);
    tbl_destroy(&sh);
    tly_rcu_thread_offline();
}

/* ---- readers during writes ----------------------------------------------- */

#define STABLE 2000
#define CHURN  20000
#define ROUNDS 6

typedef struct {
    shard_t sh;
    _Atomic bool done;
    _Atomic long lookups, misses, wrong, arrays; /* arrays: changes of sh.arr a reader saw */
} conc_t;

static void *reader_main(void *arg)
{
    conc_t *c = arg;
    tly_rcu_thread_online();
    unsigned seed = 12345;
    long lookups = 0, misses = 0, wrong = 0, arrays = 0;
    const tslots_t *last = NULL;
    char id[32];
    while (!atomic_load_explicit(&c->done, memory_order_acquire)) {
        tly_rcu_read_lock();
        const tslots_t *now = atomic_load_explicit(&c->sh.arr, memory_order_acquire);
        arrays += now != last; /* compared, never dereferenced after the unlock */
        last = now;
        for (int k = 0; k < 64; k++) {
            seed = seed * 1103515245u + 12345u;
            int i = (int)(seed >> 8) % STABLE;
            int len = snprintf(id, sizeof id, "s%d", i);
            ent_t *e = tbl_get(&c->sh, hash_id(0, 0, id, (size_t)len), 0, id, (size_t)len);
            lookups++;
            if (!e)
                misses++; /* a stable key is always in the table */
            else if (e->idlen != len || memcmp(ent_id(e), id, (size_t)len) != 0)
                wrong++;
        }
        tly_rcu_read_unlock();
    }
    atomic_fetch_add(&c->lookups, lookups);
    atomic_fetch_add(&c->misses, misses);
    atomic_fetch_add(&c->wrong, wrong);
    atomic_fetch_add(&c->arrays, arrays);
    tly_rcu_thread_offline();
    return NULL;
}

static void test_readers_always_find_stable_keys_while_the_writer_churns(void **state)
{
    (void)state;
    static conc_t c;
    tbl_init(&c.sh, 0);
    atomic_init(&c.done, false);
    tly_rcu_thread_online();
    static ent_t *stable[STABLE];
    char id[32];
    for (int i = 0; i < STABLE; i++) {
        snprintf(id, sizeof id, "s%d", i);
        stable[i] = rec_new(0, id);
        pthread_mutex_lock(&c.sh.mu);
        assert_true(tbl_insert(&c.sh, h_of(stable[i]), stable[i]));
        pthread_mutex_unlock(&c.sh.mu);
    }
    pthread_t rd[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&rd[i], NULL, reader_main, &c), 0);
    /* each round: CHURN keys in (the array grows several times), every
     * stable record replaced by a copy, the churn keys out again (it
     * shrinks) */
    static ent_t *churn[CHURN];
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < CHURN; i++) {
            snprintf(id, sizeof id, "c%d.%d", round, i);
            churn[i] = rec_new(0, id);
            pthread_mutex_lock(&c.sh.mu);
            assert_true(tbl_insert(&c.sh, h_of(churn[i]), churn[i]));
            pthread_mutex_unlock(&c.sh.mu);
        }
        for (int i = 0; i < STABLE; i++) {
            snprintf(id, sizeof id, "s%d", i);
            ent_t *e = rec_new(0, id);
            assert_true(tbl_replace(&c.sh, h_of(e), stable[i], e)); /* takes mu if it must */
            rec_retire(stable[i]);
            stable[i] = e;
        }
        for (int i = 0; i < CHURN; i++) {
            pthread_mutex_lock(&c.sh.mu);
            assert_true(tbl_remove(&c.sh, h_of(churn[i]), churn[i]));
            pthread_mutex_unlock(&c.sh.mu);
            rec_retire(churn[i]);
        }
    }
    atomic_store_explicit(&c.done, true, memory_order_release);
    for (int i = 0; i < 2; i++)
        pthread_join(rd[i], NULL);
    printf("# %ld lookups during %d rounds of %d inserts, %d replacements, %d removals; "
           "the readers saw the slot array change %ld times\n",
           (long)c.lookups, ROUNDS, CHURN, STABLE, CHURN, (long)c.arrays);
    assert_true(c.lookups > 0);
    assert_true(c.arrays > 2); /* 2 first sightings, then at least one rebuild */
    assert_int_equal(c.misses, 0);
    assert_int_equal(c.wrong, 0);
    assert_int_equal(c.sh.live, STABLE);
    for (int i = 0; i < STABLE; i++)
        free(stable[i]);
    tly_rcu_barrier();
    tbl_destroy(&c.sh);
    tly_rcu_thread_offline();
}

/* ---- replacements during another writer's rebuilds --------------------- */

#define KEPT 64

typedef struct {
    shard_t sh;
    _Atomic bool done;
    ent_t *kept[KEPT]; /* the latest record of each kept key; the replacer's */
    ent_t **old;       /* every replaced record, freed at the end (never
                        * earlier: a lost replacement must leave the table
                        * pointing at a live record the check can read) */
    size_t nold, capold;
    long replaced, refused;
} repl_t;

/* Replaces the kept keys' records over and over, without the shard's mutex
 * (each record's lock is implied: this thread alone replaces them). */
static void *replacer_main(void *arg)
{
    repl_t *c = arg;
    tly_rcu_thread_online();
    while (!atomic_load_explicit(&c->done, memory_order_acquire)) {
        for (int i = 0; i < KEPT; i++) {
            ent_t *e = rec_new(0, ent_id(c->kept[i]));
            tly_rcu_read_lock();
            bool ok = tbl_replace(&c->sh, h_of(e), c->kept[i], e);
            tly_rcu_read_unlock();
            if (!ok) {
                c->refused++;
                free(e);
                continue;
            }
            if (c->nold == c->capold) {
                c->capold = c->capold ? 2 * c->capold : 1024;
                c->old = realloc(c->old, c->capold * sizeof *c->old);
                assert_non_null(c->old);
            }
            c->old[c->nold++] = c->kept[i];
            c->kept[i] = e;
            c->replaced++;
        }
    }
    tly_rcu_thread_offline();
    return NULL;
}

/* One writer replaces records without the mutex while another, under it,
 * inserts and removes enough keys to rebuild the array again and again (a
 * rebuild may copy a slot just before the replacement swaps it). Afterwards
 * every kept key must name the record its last replacement put in. */
static void test_replacements_survive_another_writers_rebuilds(void **state)
{
    (void)state;
    static repl_t c;
    const char *scale = getenv("TLY_TEST_SCALE");
    int rounds = scale && strcmp(scale, "small") == 0 ? 40 : 300;
    tbl_init(&c.sh, 0);
    atomic_init(&c.done, false);
    tly_rcu_thread_online();
    char id[32];
    for (int i = 0; i < KEPT; i++) {
        snprintf(id, sizeof id, "k%d", i);
        c.kept[i] = rec_new(0, id);
        pthread_mutex_lock(&c.sh.mu);
        assert_true(tbl_insert(&c.sh, h_of(c.kept[i]), c.kept[i]));
        pthread_mutex_unlock(&c.sh.mu);
    }
    pthread_t rp;
    assert_int_equal(pthread_create(&rp, NULL, replacer_main, &c), 0);
    static ent_t *churn[4096];
    long rebuilds = 0;
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < 4096; i++) { /* grows 64 → 16384 slots */
            snprintf(id, sizeof id, "c%d", i);
            churn[i] = rec_new(0, id);
            pthread_mutex_lock(&c.sh.mu);
            const tslots_t *before = atomic_load_explicit(&c.sh.arr, memory_order_relaxed);
            assert_true(tbl_insert(&c.sh, h_of(churn[i]), churn[i]));
            rebuilds += atomic_load_explicit(&c.sh.arr, memory_order_relaxed) != before;
            pthread_mutex_unlock(&c.sh.mu);
        }
        for (int i = 0; i < 4096; i++) { /* and shrinks back */
            pthread_mutex_lock(&c.sh.mu);
            const tslots_t *before = atomic_load_explicit(&c.sh.arr, memory_order_relaxed);
            assert_true(tbl_remove(&c.sh, h_of(churn[i]), churn[i]));
            rebuilds += atomic_load_explicit(&c.sh.arr, memory_order_relaxed) != before;
            pthread_mutex_unlock(&c.sh.mu);
            rec_retire(churn[i]);
        }
    }
    atomic_store_explicit(&c.done, true, memory_order_release);
    pthread_join(rp, NULL);
    printf("# %ld replacements (%ld refused) during %ld rebuilds\n", c.replaced, c.refused,
           rebuilds);
    assert_int_equal(c.refused, 0);
    assert_true(c.replaced > 0);
    assert_true(rebuilds >= 2L * rounds);
    tly_rcu_read_lock();
    for (int i = 0; i < KEPT; i++)
        assert_ptr_equal(get(&c.sh, 0, ent_id(c.kept[i])), c.kept[i]);
    tly_rcu_read_unlock();
    assert_int_equal(c.sh.live, KEPT);
    for (int i = 0; i < KEPT; i++)
        free(c.kept[i]);
    for (size_t i = 0; i < c.nold; i++)
        free(c.old[i]);
    free(c.old);
    tly_rcu_barrier();
    tbl_destroy(&c.sh);
    tly_rcu_thread_offline();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_insert_find_replace_remove_against_a_list),
        cmocka_unit_test(test_keys_sharing_slot_and_tag_are_told_apart_by_id),
        cmocka_unit_test(test_ids_crafted_against_one_seed_scatter_under_a_stores_seed),
        cmocka_unit_test(test_readers_always_find_stable_keys_while_the_writer_churns),
        cmocka_unit_test(test_replacements_survive_another_writers_rebuilds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
