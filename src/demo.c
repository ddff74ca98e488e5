/*
 * demo.c — the seeded engagement generator of the embedded demo (demo.h).
 *
 * Generator (pure): xoshiro256** seeded through splitmix64, so a seed gives
 * the same stream on every machine. Each event draws, in this order: the
 * user (Zipf), the pin (Zipf), the action, the dwell time. Ids are the
 * popularity ranks themselves (user 1 is the busiest user, pin 1 the most
 * viewed pin), which makes the demo easy to query; Kafka's murmur2
 * partitioner spreads them over partitions anyway.
 *
 * Zipf draws use rejection-inversion (W. Hörmann and G. Derflinger,
 * "Rejection-inversion to generate variates from monotone discrete
 * distributions", 1996): the pmf k^-s on 1..n is covered by the continuous
 * density x^-s on [0.5, n + 0.5]; a uniform draw of its integral is
 * inverted to x, rounded to k, and accepted when it falls in a sub-interval
 * of k's cell whose length is exactly k^-s (the density is convex, so the
 * cell's integral is at least k^-s). Constant memory and an expected number
 * of iterations close to 1 whatever n is — no table of n weights.
 *
 * Producer: one thread produces the stream at demo.events_per_sec in ticks
 * of 10 ms (each tick catches up to rate × elapsed time; after a stall of
 * more than a second it skips ahead instead of bursting), keyed by the
 * decimal user id with the Java client's partitioner (murmur2_random), and
 * serves delivery reports; tly_demo_produced counts delivered events.
 * Threads: start/stop on the main thread; the producer thread is private;
 * the delivered counter is an atomic read by any thread.
 */
#include "tallyd/demo.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "tallyd/log.h"

/* Popularity skew of users and pins: classic Zipf (s = 1): the top user
 * makes 1/H(n) of all events (8 % of 100,000 users), the long tail the
 * rest. */
#define ZIPF_S_USERS 1.0
#define ZIPF_S_PINS  1.0

#define TICK_NS        10000000LL /* produce every 10 ms */
#define FLUSH_MS       5000       /* longest wait for deliveries on stop */
#define FAIL_LOG_EVERY 1000       /* ms between delivery-failure lines */

enum { ACT_IMPRESSION, ACT_CLOSEUP, ACT_CLICK, ACT_SAVE, ACT_HIDE, ACT__COUNT };

static const char *const action_names[ACT__COUNT] = {"impression", "closeup", "click", "save",
                                                     "hide"};
/* The funnel, in percent, cumulative: 80 / 10 / 6 / 3 / 1. */
static const unsigned action_cum[ACT__COUNT] = {80, 90, 96, 99, 100};
/* dwell_ms range [lo, lo + span) by action: an impression is a glance, a
 * closeup a look at the pin, a click time on the linked page, a save a
 * short pause, a hide a quick dismissal. */
static const int64_t dwell_lo[ACT__COUNT] = {0, 2000, 1000, 500, 0};
static const int64_t dwell_span[ACT__COUNT] = {3001, 58001, 29001, 9501, 2001};

/* ---- PRNG: xoshiro256**, seeded with splitmix64 ------------------------------- */

typedef struct {
    uint64_t s[4];
} rng_t;

static uint64_t splitmix64_next(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static void rng_seed(rng_t *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64_next(&seed);
}

static uint64_t rng_next(rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t out = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return out;
}

/* Uniform in [0, 1) with 53 random bits. */
static double rng_unit(rng_t *r)
{
    return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

/* Uniform in [0, n) for n < 2^53 (all the spans used here). */
static uint64_t rng_below(rng_t *r, uint64_t n)
{
    return (uint64_t)(rng_unit(r) * (double)n);
}

/* ---- Zipf by rejection-inversion -------------------------------------------- */

typedef struct {
    uint64_t n;
    double s;
    double h_lo;    /* Hint(1.5) - h(1): the lower end of the integral range */
    double h_hi;    /* Hint(n + 0.5) */
    double squeeze; /* quick accept when k - x <= squeeze */
} zipf_t;

/* (e^t - 1) / t and log(1 + t) / t, continuous at t = 0. */
static double expm1_over(double t)
{
    return fabs(t) > 1e-8 ? expm1(t) / t : 1.0 + t / 2.0;
}

static double log1p_over(double t)
{
    return fabs(t) > 1e-8 ? log1p(t) / t : 1.0 - t / 2.0;
}

/* The density x^-s. */
static double zipf_h(const zipf_t *z, double x)
{
    return exp(-z->s * log(x));
}

/* An antiderivative of x^-s: (x^(1-s) - 1) / (1 - s), or log x at s = 1. */
static double zipf_hint(const zipf_t *z, double x)
{
    double lx = log(x);
    return expm1_over((1.0 - z->s) * lx) * lx;
}

/* The inverse of zipf_hint. */
static double zipf_hint_inv(const zipf_t *z, double y)
{
    double t = y * (1.0 - z->s);
    if (t < -1.0)
        t = -1.0; /* rounding at the lower end; the result is clamped anyway */
    return exp(log1p_over(t) * y);
}

static void zipf_init(zipf_t *z, uint64_t n, double s)
{
    z->n = n;
    z->s = s;
    z->h_lo = zipf_hint(z, 1.5) - 1.0;
    z->h_hi = zipf_hint(z, (double)n + 0.5);
    z->squeeze = 2.0 - zipf_hint_inv(z, zipf_hint(z, 2.5) - zipf_h(z, 2.0));
}

/* A rank in 1..n with probability proportional to rank^-s. */
static uint64_t zipf_draw(const zipf_t *z, rng_t *r)
{
    for (;;) {
        double u = z->h_hi + rng_unit(r) * (z->h_lo - z->h_hi);
        double x = zipf_hint_inv(z, u);
        double kd = floor(x + 0.5);
        uint64_t k = kd < 1.0 ? 1 : kd > (double)z->n ? z->n : (uint64_t)kd;
        if ((double)k - x <= z->squeeze ||
            u >= zipf_hint(z, (double)k + 0.5) - zipf_h(z, (double)k))
            return k;
    }
}

/* ---- generator --------------------------------------------------------------- */

struct tly_demo_gen {
    rng_t rng;
    zipf_t users, pins;
};

tly_demo_gen_t *tly_demo_gen_new(uint64_t seed, uint64_t users, uint64_t pins)
{
    tly_demo_gen_t *gen = malloc(sizeof *gen);
    if (gen == NULL) {
        tly_error("demo: out of memory");
        abort();
    }
    rng_seed(&gen->rng, seed);
    zipf_init(&gen->users, users ? users : 1, ZIPF_S_USERS);
    zipf_init(&gen->pins, pins ? pins : 1, ZIPF_S_PINS);
    return gen;
}

void tly_demo_gen_free(tly_demo_gen_t *gen)
{
    free(gen);
}

size_t tly_demo_gen_next(tly_demo_gen_t *gen, int64_t ts_ms, char *buf, size_t cap,
                         uint64_t *user_id)
{
    uint64_t user = zipf_draw(&gen->users, &gen->rng);
    uint64_t pin = zipf_draw(&gen->pins, &gen->rng);
    unsigned roll = (unsigned)rng_below(&gen->rng, 100), act = 0;
    while (roll >= action_cum[act])
        act++;
    int64_t dwell = dwell_lo[act] + (int64_t)rng_below(&gen->rng, (uint64_t)dwell_span[act]);
    int w = snprintf(buf, cap,
                     "{\"user_id\":%" PRIu64 ",\"pin_id\":%" PRIu64
                     ",\"action\":\"%s\",\"dwell_ms\":%" PRId64 ",\"ts\":%" PRId64 "}",
                     user, pin, action_names[act], dwell, ts_ms);
    *user_id = user;
    if (w < 0 || cap == 0)
        return 0;
    return (size_t)w < cap ? (size_t)w : cap - 1;
}

/* ---- producer thread ----------------------------------------------------------- */

struct tly_demo {
    rd_kafka_t *rk;
    char *topic;         /* owned */
    tly_demo_gen_t *gen; /* producer thread */
    int64_t rate;        /* events per second */
    int64_t history;     /* events backfilled over the previous day first */
    pthread_t thread;
    atomic_bool stop;               /* written by tly_demo_stop */
    atomic_uint_fast64_t delivered; /* written by the delivery callback */
    atomic_uint_fast64_t failed;    /* written by the delivery callback */
    int64_t fail_log_ms;            /* delivery callback's thread only */
};

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void demo_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    tly_log_level_t lvl = level <= 3   ? TLY_LOG_ERROR
                          : level == 4 ? TLY_LOG_WARN
                          : level <= 6 ? TLY_LOG_INFO
                                       : TLY_LOG_DEBUG;
    tly_log(lvl, "kafka: %s: %s: %s", rd_kafka_name(rk), fac, buf);
}

/* Runs inside rd_kafka_poll/flush: the producer thread, or the main thread
 * in tly_demo_stop after the join. */
static void delivery_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    tly_demo_t *demo = opaque;
    (void)rk;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        atomic_fetch_add_explicit(&demo->delivered, 1, memory_order_relaxed);
        return;
    }
    atomic_fetch_add_explicit(&demo->failed, 1, memory_order_relaxed);
    int64_t now = wall_ms();
    if (now - demo->fail_log_ms >= FAIL_LOG_EVERY) {
        demo->fail_log_ms = now;
        tly_warn("demo: delivery failed: %s (%" PRIu64 " failures so far)",
                 rd_kafka_err2str(m->err), (uint64_t)atomic_load(&demo->failed));
    }
}

/* Produces one event at ts_ms; waits on a full queue. False when stopping. */
static bool produce_one(tly_demo_t *demo, int64_t ts_ms)
{
    char buf[192], key[24];
    uint64_t user;
    size_t len = tly_demo_gen_next(demo->gen, ts_ms, buf, sizeof buf, &user);
    int klen = snprintf(key, sizeof key, "%" PRIu64, user);
    for (;;) {
        rd_kafka_resp_err_t err = rd_kafka_producev(
            demo->rk, RD_KAFKA_V_TOPIC(demo->topic), RD_KAFKA_V_KEY(key, (size_t)klen),
            RD_KAFKA_V_VALUE(buf, len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
            return true;
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            atomic_fetch_add_explicit(&demo->failed, 1, memory_order_relaxed);
            tly_warn("demo: produce failed: %s", rd_kafka_err2str(err));
            return true; /* the event is lost; the stream goes on */
        }
        rd_kafka_poll(demo->rk, 10);
        if (atomic_load_explicit(&demo->stop, memory_order_relaxed))
            return false;
    }
}

/* The day before start, in time order, as fast as the cluster takes it, so
 * that the demo's 1h/1d/7d windows differ from its 5m ones from the start. */
static void produce_history(tly_demo_t *demo)
{
    const int64_t day = INT64_C(86400000);
    int64_t start = wall_ms() - day;
    for (int64_t i = 0; i < demo->history; i++) {
        if (!produce_one(demo, start + i * day / demo->history))
            return;
        if (i % 1000 == 0)
            rd_kafka_poll(demo->rk, 0);
    }
    if (demo->history > 0)
        tly_info("demo: backfilled %" PRId64 " events over the previous day", demo->history);
}

static void *demo_main(void *arg)
{
    tly_demo_t *demo = arg;
    produce_history(demo);
    int64_t t0 = mono_ns();
    int64_t sent = 0; /* events due so far that were produced (or skipped) */
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (!atomic_load_explicit(&demo->stop, memory_order_relaxed)) {
        int64_t elapsed = mono_ns() - t0;
        int64_t due = (int64_t)((double)demo->rate * ((double)elapsed / 1e9));
        if (due - sent > demo->rate)
            sent = due - demo->rate / 100; /* stalled > 1 s: skip, do not burst */
        while (sent < due && produce_one(demo, wall_ms()))
            sent++;
        rd_kafka_poll(demo->rk, 0);
        next.tv_nsec += TICK_NS;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        /* Pacing, not synchronisation: the next tick's time. */
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    return NULL;
}

static bool demo_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errbuf,
                          size_t errlen)
{
    char why[256];
    if (rd_kafka_conf_set(conf, name, value, why, sizeof why) == RD_KAFKA_CONF_OK)
        return true;
    snprintf(errbuf, errlen, "demo producer: %s=%s: %s", name, value, why);
    return false;
}

tly_demo_t *tly_demo_start(const tly_config_t *cfg, const char *bootstrap, char *errbuf,
                           size_t errlen)
{
    char why[256];
    if (cfg->kafka.ntopics == 0 || bootstrap == NULL || cfg->demo.events_per_sec <= 0 ||
        cfg->demo.users <= 0 || cfg->demo.pins <= 0) {
        snprintf(errbuf, errlen, "demo: needs a topic, a bootstrap and positive demo.* values");
        return NULL;
    }
    tly_demo_t *demo = calloc(1, sizeof *demo);
    if (demo == NULL) {
        tly_error("demo: out of memory");
        abort();
    }
    atomic_init(&demo->stop, false);
    atomic_init(&demo->delivered, 0);
    atomic_init(&demo->failed, 0);
    demo->rate = cfg->demo.events_per_sec;
    demo->history = cfg->demo.history;
    demo->topic = strdup(cfg->kafka.topics[0]);
    if (demo->topic == NULL) {
        tly_error("demo: out of memory");
        abort();
    }

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_opaque(conf, demo);
    rd_kafka_conf_set_log_cb(conf, demo_log_cb);
    rd_kafka_conf_set_dr_msg_cb(conf, delivery_cb);
    /* A queue of several seconds of events rides out a slow broker. */
    char queue[32];
    snprintf(queue, sizeof queue, "%" PRId64,
             demo->rate * 10 < 100000     ? 100000
             : demo->rate * 10 > 10000000 ? 10000000
                                          : demo->rate * 10);
    if (!demo_conf_set(conf, "bootstrap.servers", bootstrap, errbuf, errlen) ||
        !demo_conf_set(conf, "client.id", "tallyd-demo", errbuf, errlen) ||
        !demo_conf_set(conf, "linger.ms", "5", errbuf, errlen) ||
        !demo_conf_set(conf, "queue.buffering.max.messages", queue, errbuf, errlen) ||
        !demo_conf_set(conf, "partitioner", "murmur2_random", errbuf, errlen)) {
        rd_kafka_conf_destroy(conf);
        goto fail;
    }
    demo->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof why);
    if (demo->rk == NULL) {
        rd_kafka_conf_destroy(conf);
        snprintf(errbuf, errlen, "demo: cannot create the producer: %s", why);
        goto fail;
    }
    demo->gen = tly_demo_gen_new((uint64_t)cfg->demo.seed, (uint64_t)cfg->demo.users,
                                 (uint64_t)cfg->demo.pins);
    int rc = pthread_create(&demo->thread, NULL, demo_main, demo);
    if (rc != 0) {
        snprintf(errbuf, errlen, "demo: cannot start the producer thread: %s", strerror(rc));
        goto fail;
    }
    tly_info("demo: producing %" PRId64 " events/s to %s at %s (%" PRId64 " users, %" PRId64
             " pins, seed %" PRId64 ")",
             demo->rate, demo->topic, bootstrap, cfg->demo.users, cfg->demo.pins, cfg->demo.seed);
    return demo;
fail:
    if (demo->rk != NULL)
        rd_kafka_destroy(demo->rk);
    tly_demo_gen_free(demo->gen);
    free(demo->topic);
    free(demo);
    return NULL;
}

uint64_t tly_demo_produced(const tly_demo_t *demo)
{
    return demo ? atomic_load_explicit(&demo->delivered, memory_order_relaxed) : 0;
}

void tly_demo_stop(tly_demo_t *demo)
{
    if (demo == NULL)
        return;
    atomic_store(&demo->stop, true);
    pthread_join(demo->thread, NULL);
    if (rd_kafka_flush(demo->rk, FLUSH_MS) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        tly_warn("demo: %d events still undelivered after %d ms; dropping them",
                 rd_kafka_outq_len(demo->rk), FLUSH_MS);
        rd_kafka_purge(demo->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(demo->rk, 0);
    }
    tly_info("demo: stopped after %" PRIu64 " events delivered (%" PRIu64 " failed)",
             (uint64_t)atomic_load(&demo->delivered), (uint64_t)atomic_load(&demo->failed));
    rd_kafka_destroy(demo->rk);
    tly_demo_gen_free(demo->gen);
    free(demo->topic);
    free(demo);
}
