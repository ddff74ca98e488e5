/*
 * shard.c — ownership and owner addresses in kafka.mode shard (shard.h).
 *
 * State read by query threads: `nparts` and the `owned` bitmap are atomics
 * written by the source's poll thread (relaxed: a reader that sees a stale
 * bit answers as the ownership was an instant earlier, which a rebalance
 * makes true for some moment anyway; the source refuses queries with
 * -LOADING while a new assignment catches up). Owner addresses live in
 * `addr[p]` under `mu`, written by the endpoints thread.
 *
 * The endpoints thread: one consumer assigned every partition of
 * kafka.endpoints_topic from the beginning (no group: nothing committed),
 * and one producer (idempotent, acks all) that publishes "G/p" → advertise
 * for each partition this instance is assigned. Records of other groups are
 * ignored; a record with an empty value clears the address.
 *
 * The last record of a key wins, and records from different instances land
 * in the order their producers get through, not in the order of the
 * rebalances: a previous owner's record delayed by retries can land after
 * the new owner's, and a record the brokers refused never lands. Either
 * way the others would name the wrong instance until the next rebalance.
 * So the endpoints thread checks every ENDPOINTS_RETRY_MS that the topic
 * names this instance for each partition it owns, and publishes again
 * those it did not name in two checks running (one check could fall
 * between a publication and its reading back).
 */
#include "tallyd/shard.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "source_int.h"
#include "tallyd/log.h"

#define OWNED_WORDS         (TLY_SHARD_MAX_PARTITIONS / 64)
#define ENDPOINTS_POLL_MS   100
#define ENDPOINTS_RETRY_MS  2000
#define ADMIN_TIMEOUT_MS    5000

struct tly_shard {
    const tly_config_t *cfg;

    /* written by the poll thread, read by any (relaxed) */
    _Atomic int32_t nparts;
    _Atomic int32_t counts[TLY_SHARD_COUNTS]; /* counts the topics grew to; 0: none */
    _Atomic uint64_t routes_gen;              /* tly_shard_routes_gen */
    _Atomic uint64_t owned[OWNED_WORDS];
    _Atomic uint64_t moved, published, endpoint_errors;
    /* rd_kafka_resp_err_t of the latest failed delivery: the delivery
     * callback writes, the endpoints thread reads (relaxed) */
    _Atomic int last_delivery_err;

    /* owner addresses: endpoints thread writes, any thread copies; under mu */
    pthread_mutex_t mu;
    char (*addr)[TLY_SHARD_ADDR_MAX]; /* TLY_SHARD_MAX_PARTITIONS entries, "" unknown */

    /* set once by start, before the thread runs */
    char advertise[TLY_SHARD_ADDR_MAX];
    rd_kafka_t *writer, *reader;
    bool create; /* the endpoints thread creates the topic first */
    pthread_t thread;
    bool running;
    atomic_bool stop;

    /* endpoints thread only: records naming no address, and when the
     * last was logged */
    uint64_t bad_records;
    int64_t bad_logged_ms;
};

int32_t tly_partition_of(const void *key, size_t len, int32_t nparts)
{
    /* librdkafka's murmur2 partitioner is the Java client's; with a non-NULL
     * key it uses neither the topic handle nor the opaques. */
    static const char empty[1] = "";
    return rd_kafka_msg_partitioner_murmur2(NULL, key != NULL ? key : empty, len, nparts, NULL,
                                            NULL);
}

tly_shard_t *tly_shard_new(const tly_config_t *cfg, const tly_featset_t *fs)
{
    (void)fs;
    if (cfg->kafka.mode != TLY_MODE_SHARD)
        return NULL;
    tly_shard_t *sh = calloc(1, sizeof *sh);
    char(*addr)[TLY_SHARD_ADDR_MAX] = calloc(TLY_SHARD_MAX_PARTITIONS, sizeof *addr);
    if (sh == NULL || addr == NULL) {
        fputs("tallyd: out of memory\n", stderr);
        abort();
    }
    sh->cfg = cfg;
    sh->addr = addr;
    sh->bad_logged_ms = INT64_MIN / 2;
    pthread_mutex_init(&sh->mu, NULL);
    atomic_init(&sh->stop, false);
    return sh;
}

/* ---- ownership (poll thread writes) ------------------------------------------ */

void tly_shard_set_partitions(tly_shard_t *sh, int32_t nparts)
{
    if (atomic_load_explicit(&sh->nparts, memory_order_relaxed) != nparts)
        atomic_fetch_add_explicit(&sh->routes_gen, 1, memory_order_relaxed);
    atomic_store_explicit(&sh->nparts, nparts, memory_order_relaxed);
    tly_shard_note_count(sh, nparts);
}

void tly_shard_note_count(tly_shard_t *sh, int32_t nparts)
{
    if (nparts <= 0)
        return;
    for (int i = 0; i < TLY_SHARD_COUNTS; i++)
        if (atomic_load_explicit(&sh->counts[i], memory_order_relaxed) == nparts)
            return;
    /* the oldest goes: counts[0] is the newest */
    for (int i = TLY_SHARD_COUNTS - 1; i > 0; i--)
        atomic_store_explicit(&sh->counts[i],
                              atomic_load_explicit(&sh->counts[i - 1], memory_order_relaxed),
                              memory_order_relaxed);
    atomic_store_explicit(&sh->counts[0], nparts, memory_order_relaxed);
    atomic_fetch_add_explicit(&sh->routes_gen, 1, memory_order_relaxed);
}

int32_t tly_shard_max_count(const tly_shard_t *sh)
{
    int32_t max = 0;
    for (int i = 0; i < TLY_SHARD_COUNTS; i++) {
        int32_t n = atomic_load_explicit(&sh->counts[i], memory_order_relaxed);
        if (n > max)
            max = n;
    }
    return max;
}

void tly_shard_routes(const tly_shard_t *sh, tly_shard_routes_t *out)
{
    int32_t cur = atomic_load_explicit(&sh->nparts, memory_order_relaxed);
    out->n = 0;
    if (cur <= 0)
        return;
    out->count[out->n++] = cur;
    for (int i = 0; i < TLY_SHARD_COUNTS; i++) {
        int32_t n = atomic_load_explicit(&sh->counts[i], memory_order_relaxed);
        if (n > cur)
            out->count[out->n++] = n;
    }
}

uint64_t tly_shard_routes_gen(const tly_shard_t *sh)
{
    return atomic_load_explicit(&sh->routes_gen, memory_order_relaxed);
}

bool tly_shard_routes_place(const tly_shard_routes_t *r, const char *id, size_t len, int32_t p)
{
    if (r->n == 0)
        return true;
    for (size_t i = 0; i < r->n; i++)
        if (tly_partition_of(id, len, r->count[i]) == p)
            return true;
    return false;
}

int32_t tly_shard_partitions(const tly_shard_t *sh)
{
    return atomic_load_explicit(&sh->nparts, memory_order_relaxed);
}

bool tly_shard_owns(const tly_shard_t *sh, int32_t p)
{
    if (p < 0 || p >= TLY_SHARD_MAX_PARTITIONS)
        return false;
    return atomic_load_explicit(&sh->owned[p / 64], memory_order_relaxed) >> (p % 64) & 1;
}

static void publish_endpoint(tly_shard_t *sh, int32_t p)
{
    if (sh->writer == NULL || sh->advertise[0] == '\0')
        return;
    /* The group's name has no length limit of its own (Kafka's is 32,767
     * bytes): the key is sized for it, never cut or skipped. */
    size_t cap = strlen(sh->cfg->kafka.group) + 16;
    char *key = malloc(cap);
    if (key == NULL) {
        fputs("tallyd: out of memory\n", stderr);
        abort();
    }
    int klen = snprintf(key, cap, "%s/%" PRId32, sh->cfg->kafka.group, p);
    rd_kafka_resp_err_t err = rd_kafka_producev(
        sh->writer, RD_KAFKA_V_TOPIC(sh->cfg->kafka.endpoints_topic),
        RD_KAFKA_V_KEY(key, (size_t)klen), RD_KAFKA_V_VALUE(sh->advertise, strlen(sh->advertise)),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
    free(key);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        atomic_fetch_add_explicit(&sh->endpoint_errors, 1, memory_order_relaxed);
        tly_warn("shard: publishing the owner of partition %" PRId32 " failed: %s", p,
                 rd_kafka_err2str(err));
    }
    /* counted as published when delivered (delivery_cb) */
}

void tly_shard_assigned(tly_shard_t *sh, const int32_t *parts, size_t n)
{
    uint64_t bits[OWNED_WORDS] = {0};
    for (size_t i = 0; i < n; i++)
        if (parts[i] >= 0 && parts[i] < TLY_SHARD_MAX_PARTITIONS)
            bits[parts[i] / 64] |= UINT64_C(1) << (parts[i] % 64);
    for (size_t w = 0; w < OWNED_WORDS; w++)
        atomic_store_explicit(&sh->owned[w], bits[w], memory_order_relaxed);
    for (int32_t p = 0; p < TLY_SHARD_MAX_PARTITIONS; p++)
        if (bits[p / 64] >> (p % 64) & 1)
            publish_endpoint(sh, p);
}

void tly_shard_revoked(tly_shard_t *sh)
{
    for (size_t w = 0; w < OWNED_WORDS; w++)
        atomic_store_explicit(&sh->owned[w], 0, memory_order_relaxed);
}

/* ---- reads (any thread) ---------------------------------------------------- */

int32_t tly_shard_route(tly_shard_t *sh, const char *id, size_t len, char *owner, size_t cap)
{
    int32_t n = atomic_load_explicit(&sh->nparts, memory_order_relaxed);
    if (n <= 0)
        return -1;
    int32_t p = tly_partition_of(id, len, n);
    if (tly_shard_owns(sh, p))
        return -1;
    atomic_fetch_add_explicit(&sh->moved, 1, memory_order_relaxed);
    if (owner != NULL && cap > 0) {
        pthread_mutex_lock(&sh->mu);
        /* never send a client back here: that address no longer owns p */
        if (strcmp(sh->addr[p], sh->advertise) == 0)
            owner[0] = '\0';
        else
            snprintf(owner, cap, "%s", sh->addr[p]);
        pthread_mutex_unlock(&sh->mu);
    }
    return p;
}

size_t tly_shard_owned(const tly_shard_t *sh, int32_t *parts, size_t cap)
{
    size_t n = 0;
    for (int32_t p = 0; p < TLY_SHARD_MAX_PARTITIONS; p++)
        if (tly_shard_owns(sh, p)) {
            if (n < cap)
                parts[n] = p;
            n++;
        }
    return n;
}

const char *tly_shard_advertise(const tly_shard_t *sh)
{
    return sh->advertise;
}

void tly_shard_stats(tly_shard_t *sh, tly_shard_stats_t *st)
{
    memset(st, 0, sizeof *st);
    st->nparts = atomic_load_explicit(&sh->nparts, memory_order_relaxed);
    st->nowned = tly_shard_owned(sh, NULL, 0);
    st->moved = atomic_load_explicit(&sh->moved, memory_order_relaxed);
    st->published = atomic_load_explicit(&sh->published, memory_order_relaxed);
    st->endpoint_errors = atomic_load_explicit(&sh->endpoint_errors, memory_order_relaxed);
    int32_t n = st->nparts > 0 && st->nparts <= TLY_SHARD_MAX_PARTITIONS ? st->nparts : 0;
    pthread_mutex_lock(&sh->mu);
    for (int32_t p = 0; p < n; p++)
        st->known += sh->addr[p][0] != '\0';
    pthread_mutex_unlock(&sh->mu);
}

/* ---- the endpoints thread ---------------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* An owner address as a record carries it: host:port in printable ASCII
 * without spaces, shorter than TLY_SHARD_ADDR_MAX. */
static bool record_addr_ok(const char *v, size_t n, char *out)
{
    if (n == 0 || n >= TLY_SHARD_ADDR_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (v[i] <= ' ' || v[i] > '~')
            return false;
    memcpy(out, v, n);
    out[n] = '\0';
    return tly_config_addr_ok(out);
}

/* A record "G/p" → "host:port" read from the endpoints topic. A value that
 * is not an address (written by something other than a tallyd) makes the
 * owner of p unknown: counted, logged at most every ENDPOINTS_RETRY_MS,
 * never repeated to clients. A tombstone (no value) does the same,
 * uncounted. Endpoints thread. */
static void take_record(tly_shard_t *sh, const rd_kafka_message_t *m)
{
    const char *group = sh->cfg->kafka.group;
    size_t glen = strlen(group);
    const char *key = m->key;
    if (key == NULL || m->key_len <= glen + 1 || m->key_len > glen + 11 ||
        memcmp(key, group, glen) != 0 || key[glen] != '/')
        return;
    int32_t p = 0;
    for (size_t i = glen + 1; i < m->key_len; i++) {
        if (key[i] < '0' || key[i] > '9')
            return;
        p = p * 10 + (key[i] - '0');
        if (p >= TLY_SHARD_MAX_PARTITIONS)
            return;
    }
    size_t vlen = m->payload != NULL ? m->len : 0;
    char addr[TLY_SHARD_ADDR_MAX] = "";
    if (vlen > 0 && !record_addr_ok(m->payload, vlen, addr)) {
        addr[0] = '\0';
        atomic_fetch_add_explicit(&sh->endpoint_errors, 1, memory_order_relaxed);
        sh->bad_records++;
        int64_t now = mono_ms();
        if (now - sh->bad_logged_ms >= ENDPOINTS_RETRY_MS) {
            tly_warn("shard: %s[%" PRId32 "]@%" PRId64 " names no host:port for partition %" PRId32
                     " (%zu bytes); its owner is unknown until a valid record (%" PRIu64
                     " such records so far)",
                     sh->cfg->kafka.endpoints_topic, m->partition, m->offset, p, vlen,
                     sh->bad_records);
            sh->bad_logged_ms = now;
        }
    }
    pthread_mutex_lock(&sh->mu);
    memcpy(sh->addr[p], addr, sizeof addr);
    pthread_mutex_unlock(&sh->mu);
}

/* Assigns every partition of the endpoints topic to the reader, from the
 * beginning. False while its metadata is not available yet. */
static bool assign_reader(tly_shard_t *sh)
{
    const char *topic = sh->cfg->kafka.endpoints_topic;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(sh->reader, topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t err = rkt != NULL ? rd_kafka_metadata(sh->reader, 0, rkt, &md, 1000)
                                          : rd_kafka_last_error();
    bool ok = err == RD_KAFKA_RESP_ERR_NO_ERROR && md->topic_cnt == 1 && !md->topics[0].err &&
              md->topics[0].partition_cnt > 0;
    if (ok) {
        rd_kafka_topic_partition_list_t *parts =
            rd_kafka_topic_partition_list_new(md->topics[0].partition_cnt);
        for (int i = 0; i < md->topics[0].partition_cnt; i++)
            rd_kafka_topic_partition_list_add(parts, topic, md->topics[0].partitions[i].id)
                ->offset = RD_KAFKA_OFFSET_BEGINNING;
        err = rd_kafka_assign(sh->reader, parts);
        rd_kafka_topic_partition_list_destroy(parts);
        ok = err == RD_KAFKA_RESP_ERR_NO_ERROR;
    }
    if (md != NULL)
        rd_kafka_metadata_destroy(md);
    if (rkt != NULL)
        rd_kafka_topic_destroy(rkt);
    return ok;
}

static void create_topic(tly_shard_t *sh);

/* Endpoints thread, once the reader reads the topic: publishes again the
 * address of each partition owned here that the topic named for another
 * instance, or for none, at this check and at the previous one (`suspect`,
 * this thread's). */
static void republish_owned(tly_shard_t *sh, uint64_t suspect[OWNED_WORDS])
{
    int32_t again[TLY_SHARD_MAX_PARTITIONS];
    size_t n = 0;
    pthread_mutex_lock(&sh->mu);
    for (int32_t p = 0; p < TLY_SHARD_MAX_PARTITIONS; p++) {
        uint64_t bit = UINT64_C(1) << (p % 64);
        if (!tly_shard_owns(sh, p) || strcmp(sh->addr[p], sh->advertise) == 0) {
            suspect[p / 64] &= ~bit;
        } else if (suspect[p / 64] & bit) {
            again[n++] = p;
            suspect[p / 64] &= ~bit;
        } else {
            suspect[p / 64] |= bit;
        }
    }
    pthread_mutex_unlock(&sh->mu);
    for (size_t i = 0; i < n; i++)
        publish_endpoint(sh, again[i]);
    if (n > 0) {
        int err = atomic_load_explicit(&sh->last_delivery_err, memory_order_relaxed);
        tly_warn("shard: %s names another owner, or none, for %zu partitions owned here; "
                 "publishing them again%s%s",
                 sh->cfg->kafka.endpoints_topic, n, err ? "; last delivery error: " : "",
                 err ? rd_kafka_err2str((rd_kafka_resp_err_t)err) : "");
    }
}

static void *endpoints_main(void *arg)
{
    tly_shard_t *sh = arg;
    bool assigned = false;
    unsigned attempts = 0;
    if (sh->create)
        create_topic(sh);
    uint64_t suspect[OWNED_WORDS] = {0};
    int64_t next_check = mono_ms() + ENDPOINTS_RETRY_MS;
    while (!atomic_load_explicit(&sh->stop, memory_order_relaxed)) {
        int64_t now = mono_ms();
        if (assigned && now >= next_check) {
            republish_owned(sh, suspect);
            next_check = now + ENDPOINTS_RETRY_MS;
        }
        if (!assigned) {
            assigned = assign_reader(sh);
            if (!assigned && attempts++ % 10 == 0)
                tly_warn("shard: endpoints topic %s is not readable yet; retrying",
                         sh->cfg->kafka.endpoints_topic);
        }
        rd_kafka_poll(sh->writer, 0);
        rd_kafka_message_t *m = rd_kafka_consumer_poll(sh->reader, ENDPOINTS_POLL_MS);
        if (m == NULL)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
            take_record(sh, m);
        else if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
            atomic_fetch_add_explicit(&sh->endpoint_errors, 1, memory_order_relaxed);
        rd_kafka_message_destroy(m);
    }
    return NULL;
}

static void delivery_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    tly_shard_t *sh = opaque;
    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        /* logged when published again (republish_owned), once a check */
        atomic_fetch_add_explicit(&sh->endpoint_errors, 1, memory_order_relaxed);
        atomic_store_explicit(&sh->last_delivery_err, (int)m->err, memory_order_relaxed);
    } else {
        atomic_fetch_add_explicit(&sh->published, 1, memory_order_relaxed);
    }
}

/* A configuration for the endpoint clients: the brokers and the
 * connection settings of kafka.properties (security.*, sasl.*, ssl.*). */
static rd_kafka_conf_t *client_conf(tly_shard_t *sh, const char *bootstrap, char *errbuf,
                                    size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char why[256];
    rd_kafka_conf_set_log_cb(conf, tly_source_log_cb);
    rd_kafka_conf_set_opaque(conf, sh);
    if (rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, why, sizeof why) != 0)
        goto fail;
    for (size_t i = 0; i < sh->cfg->kafka.nproperties; i++) {
        const tly_kv_t *kv = &sh->cfg->kafka.properties[i];
        if (strncmp(kv->key, "security.", 9) != 0 && strncmp(kv->key, "sasl.", 5) != 0 &&
            strncmp(kv->key, "ssl.", 4) != 0)
            continue;
        if (rd_kafka_conf_set(conf, kv->key, kv->value, why, sizeof why) != 0)
            goto fail;
    }
    return conf;
fail:
    snprintf(errbuf, errlen, "shard endpoints client: %s", why);
    rd_kafka_conf_destroy(conf);
    return NULL;
}

static bool set_all(rd_kafka_conf_t *conf, const char *const *kv, char *errbuf, size_t errlen)
{
    char why[256];
    for (size_t i = 0; kv[i] != NULL; i += 2)
        if (rd_kafka_conf_set(conf, kv[i], kv[i + 1], why, sizeof why) != 0) {
            snprintf(errbuf, errlen, "shard endpoints client: %s=%s: %s", kv[i], kv[i + 1], why);
            return false;
        }
    return true;
}

/* Creates the compacted endpoints topic unless it exists. Failures are
 * logged: the reader retries, and a broker with auto-creation makes it on
 * the first record (not compacted then, which only costs space). */
static void create_topic(tly_shard_t *sh)
{
    char why[256];
    const char *topic = sh->cfg->kafka.endpoints_topic;
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topic, 1, -1, why, sizeof why);
    if (nt == NULL) {
        tly_warn("shard: cannot describe topic %s: %s", topic, why);
        return;
    }
    rd_kafka_NewTopic_set_config(nt, "cleanup.policy", "compact");
    rd_kafka_queue_t *q = rd_kafka_queue_new(sh->writer);
    rd_kafka_AdminOptions_t *opt = rd_kafka_AdminOptions_new(sh->writer, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_AdminOptions_set_request_timeout(opt, ADMIN_TIMEOUT_MS, why, sizeof why);
    rd_kafka_CreateTopics(sh->writer, &nt, 1, opt, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, ADMIN_TIMEOUT_MS + 2000);
    const rd_kafka_CreateTopics_result_t *res = ev ? rd_kafka_event_CreateTopics_result(ev) : NULL;
    if (res == NULL) {
        tly_warn("shard: creating topic %s: %s", topic,
                 ev ? rd_kafka_event_error_string(ev) : "no answer");
    } else {
        size_t n = 0;
        const rd_kafka_topic_result_t **tr = rd_kafka_CreateTopics_result_topics(res, &n);
        rd_kafka_resp_err_t err = n == 1 ? rd_kafka_topic_result_error(tr[0])
                                         : rd_kafka_event_error(ev);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
            tly_info("shard: created compacted topic %s for owner addresses", topic);
        else if (err != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
            tly_warn("shard: creating topic %s: %s", topic,
                     n == 1 && rd_kafka_topic_result_error_string(tr[0])
                         ? rd_kafka_topic_result_error_string(tr[0])
                         : rd_kafka_err2str(err));
    }
    if (ev != NULL)
        rd_kafka_event_destroy(ev);
    rd_kafka_AdminOptions_destroy(opt);
    rd_kafka_queue_destroy(q);
    rd_kafka_NewTopic_destroy(nt);
}

bool tly_shard_start(tly_shard_t *sh, const char *bootstrap, bool embedded, const char *advertise,
                     char *errbuf, size_t errlen)
{
    static const char *const writer_kv[] = {"client.id", "tallyd-endpoints", "linger.ms", "0",
                                            "enable.idempotence", "true", NULL};
    static const char *const reader_kv[] = {
        "client.id", "tallyd-endpoints", "group.id", "tallyd-endpoints-reader",
        "enable.auto.commit", "false", "enable.partition.eof", "false",
        /* a record per partition of the group's
         * topics: librdkafka's prefetch defaults
         * (100,000 messages, 64 MiB a partition)
         * are sized for event topics */
        "queued.min.messages", "1000", "queued.max.messages.kbytes", "1024", NULL};
    char why[256];
    snprintf(sh->advertise, sizeof sh->advertise, "%s", advertise);
    if (sh->advertise[0] == '\0') {
        /* Nothing to publish (no RESP server, as in tests of the source
         * alone): ownership still routes, owners stay unknown. */
        tly_info("shard: no address to advertise; owner addresses are not exchanged");
        return true;
    }

    rd_kafka_conf_t *conf = client_conf(sh, bootstrap, errbuf, errlen);
    if (conf == NULL || !set_all(conf, writer_kv, errbuf, errlen))
        goto fail;
    rd_kafka_conf_set_dr_msg_cb(conf, delivery_cb);
    sh->writer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof why);
    if (sh->writer == NULL) {
        snprintf(errbuf, errlen, "shard endpoints producer: %s", why);
        goto fail;
    }
    conf = client_conf(sh, bootstrap, errbuf, errlen);
    if (conf == NULL || !set_all(conf, reader_kv, errbuf, errlen))
        goto fail;
    sh->reader = rd_kafka_new(RD_KAFKA_CONSUMER, conf, why, sizeof why);
    if (sh->reader == NULL) {
        snprintf(errbuf, errlen, "shard endpoints consumer: %s", why);
        goto fail;
    }
    conf = NULL;
    rd_kafka_poll_set_consumer(sh->reader);
    sh->create = !embedded;
    int rc = pthread_create(&sh->thread, NULL, endpoints_main, sh);
    if (rc != 0) {
        snprintf(errbuf, errlen, "cannot start the shard endpoints thread: %s", strerror(rc));
        return false;
    }
    sh->running = true;
    tly_info("shard: this instance is %s; owners are published in %s", sh->advertise,
             sh->cfg->kafka.endpoints_topic);
    return true;
fail:
    if (conf != NULL)
        rd_kafka_conf_destroy(conf);
    return false;
}

void tly_shard_free(tly_shard_t *sh)
{
    if (sh == NULL)
        return;
    if (sh->running) {
        atomic_store(&sh->stop, true);
        pthread_join(sh->thread, NULL);
    }
    if (sh->reader != NULL) {
        tly_kafka_close(sh->reader, false, TLY_KAFKA_CLOSE_TIMEOUT_MS, "shard endpoints reader");
    }
    if (sh->writer != NULL) {
        rd_kafka_flush(sh->writer, 2000);
        rd_kafka_destroy(sh->writer);
    }
    pthread_mutex_destroy(&sh->mu);
    free(sh->addr);
    free(sh);
}
