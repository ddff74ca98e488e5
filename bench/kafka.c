/*
 * kafka.c — tallyd end to end against Kafka: ingest rate of a real tallyd
 * process next to a bare librdkafka consumer and next to the loader a team
 * would write instead (librdkafka → pipelined HINCRBY into redis-server), and
 * freshness (produce call → visible in a query) at a steady event rate.
 *
 * Ingest. N events shaped like the demo stream (config/demo.yaml: Zipf users
 * and pins, impression/closeup/click/save/hide at 70/15/9/4/2 %, dwell_ms on
 * most, ts within the minute before generation) are preloaded into one topic,
 * keyed by user id with the Java partitioner (murmur2_random):
 *   - real broker (--bootstrap, scripts/kafka.sh): a new topic of
 *     --partitions partitions, produced with lz4 batches (untimed);
 *   - mock cluster (--mockkafka): tests/integration/mockkafka.c's binary, a
 *     child process holding librdkafka's mock cluster (3 brokers), fed the
 *     same events from a file; it reports once it holds all N.
 * On each cluster, one after the other (never concurrently), from the
 * earliest offset of every partition:
 *   bare    a consumer in this process that only polls and frees (own group,
 *           assign, auto.offset.reset=earliest, no commit; librdkafka's
 *           default fetch properties but tallyd's queued.min.messages, the
 *           only one tallyd sets on a real broker);
 *   tallyd  `tallyd --config <generated>` (the demo's features, kafka.mode
 *           replica, kafka.start earliest); its rate comes from its own
 *           counters: INFO source polled every 5 ms over RESP until
 *           events_applied + events_rejected = N;
 *   redis   the peer loader: the same consumer plus jsmn parsing and, per
 *           event, the Redis commands that keep the demo's features (see
 *           loader_event), pipelined, flushed every --pipeline commands.
 *   tallyd, kafka.threads: 1  the same with one thread decoding and
 *           applying (the poll thread), to show what the others add.
 * With --tuned K=V, on the real broker, the bare/tallyd pair once more with
 * one more consumer property (given to tallyd through kafka.properties).
 * Rates run from the first message seen (bare, redis) or the first INFO poll
 * that shows an applied event (tallyd) to the N-th, so connection set-up is
 * out of the rate and printed separately ("start→N"). Every tallyd and redis
 * run is checked against the generator: clicks:7d of the 10 most-clicking
 * users and 10 others must equal the counts generated.
 *
 * Freshness. On the real broker, a second tallyd reads a new empty topic;
 * this process produces to it at --rate events/s (paced against the
 * monotonic clock; linger.ms --linger, default 5, acks=all, no
 * compression), --warmup seconds unsampled (default 30: a freshly started
 * broker's JIT and heap take about that long to settle under this traffic;
 * bench/README.md), then --duration seconds. Every
 * --sample-th event of the timed part goes to a user id used by no other
 * event, with its pin_id a unique marker; a poller thread on its own
 * connection asks `RECENT user <id> recent COUNT 1` for the oldest
 * POLL_BATCH pending samples once per round (one pipelined batch per round,
 * rounds --poll-us apart) until the reply holds the marker. Latency = the
 * poll reply that shows it minus the moment just before rd_kafka_producev:
 * an upper bound that includes up to one poll interval and one round trip.
 * The delivery report (broker ack) latency of the same samples, and ack →
 * visible, are printed next to it. Why linger.ms 5 and not 0: with 0 (and
 * 1) the single-node test broker's acks fell seconds behind at 10,000/s on
 * this machine (bench/README.md).
 *
 * Threads: main (everything), librdkafka's threads, and during freshness
 * the poller thread (reads the sample table up to the published count,
 * writes only the visible times of samples; main reads them after join).
 * Children (tallyd, mockkafka) die with this process (PR_SET_PDEATHSIG) and
 * are stopped on every exit path; the broker and redis-server belong to the
 * caller (bench/run.sh step_kafka).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#define JSMN_STATIC
#include <jsmn.h>

#include "tallyd/config.h"

#include "bench_gen.h"
#include "bench_proc.h"

#define DEMO_CONFIG     "config/demo.yaml"
#define DEFAULT_EVENTS  1000000u
#define QUICK_EVENTS    100000u
#define DEFAULT_REPS    3 /* runs of each bare and tallyd ingest row */
#define MAX_EVENTS      20000000u
#define USER_ZIPF_S     0.7
#define PIN_ZIPF_S      1.0
#define INFO_POLL_NS    (INT64_C(5) * 1000000)
#define CATCHUP_NS      (INT64_C(600) * 1000000000)
#define READY_NS        (INT64_C(30) * 1000000000)
#define FRESH_USER_BASE INT64_C(900000000) /* sampled users: no other event has them */
#define FRESH_DRAIN_NS  (INT64_C(10) * 1000000000)
#define POLL_BATCH      32 /* oldest pending samples asked per poll round */
#define CHECK_USERS     20
#define MOCK_PER_PART   8000 /* events per mock partition: well under its 5 MiB */

enum { ACT_IMPRESSION, ACT_CLOSEUP, ACT_CLICK, ACT_SAVE, ACT_HIDE, ACT__COUNT };
static const char *const action_names[ACT__COUNT] = {"impression", "closeup", "click", "save",
                                                     "hide"};
static const unsigned action_cum[ACT__COUNT] = {70, 85, 94, 98, 100};

typedef struct {
    size_t nevents;
    bool quick;
    const char *bootstrap; /* real broker, or NULL */
    const char *mockkafka; /* mockkafka binary, or NULL */
    const char *tallyd;
    int redis_port; /* 0: no loader rows */
    int partitions; /* real broker topic */
    int mock_partitions;
    int pipeline; /* loader commands per flush */
    double rate, duration_s, warmup_s;
    int sample;
    int poll_us;
    int linger_ms;         /* freshness producer */
    const char *props[16]; /* --property K=V: every consumer, tallyd's too */
    int nprops;
    const char *tuned; /* the tuned rows' property, or NULL */
    bool only[3];      /* real, mock, fresh */
    int reps;          /* runs of each bare and tallyd row, in turn; the best is kept */
} opts_t;

/* ---- failure and children ------------------------------------------------ */

#define MAX_CHILDREN 4
static pid_t children[MAX_CHILDREN];
static char tmpdir[256];
static bool keep_tmpdir;

static void child_add(pid_t pid)
{
    for (int i = 0; i < MAX_CHILDREN; i++)
        if (children[i] <= 0) {
            children[i] = pid;
            return;
        }
}

/* SIGTERM, up to 20 s for a clean exit (tallyd may write a snapshot), then
 * SIGKILL. */
static void child_stop(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (int t = 0; t < 2000; t++) {
        if (waitpid(pid, NULL, WNOHANG) != 0)
            goto reaped;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
reaped:
    for (int i = 0; i < MAX_CHILDREN; i++)
        if (children[i] == pid)
            children[i] = -1;
}

static void cleanup(void)
{
    for (int i = 0; i < MAX_CHILDREN; i++)
        if (children[i] > 0)
            child_stop(children[i]);
    if (tmpdir[0] && !keep_tmpdir) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
        if (system(cmd) != 0)
            fprintf(stderr, "kafka: could not remove %s\n", tmpdir);
    } else if (tmpdir[0]) {
        fprintf(stderr, "kafka: logs and configs kept in %s\n", tmpdir);
    }
}

static void on_signal(int sig)
{
    for (int i = 0; i < MAX_CHILDREN; i++)
        if (children[i] > 0)
            kill(children[i], SIGKILL);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("kafka: FAILED: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    keep_tmpdir = true;
    exit(1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        die("out of memory (%zu bytes)", n);
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        die("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

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

static double self_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU time all CPUs spent busy so far (/proc/stat: everything but idle
 * and iowait), in ns; -1 if unreadable. */
static int64_t system_busy_ns(void)
{
    FILE *f = fopen("/proc/stat", "r");
    if (f == NULL)
        return -1;
    unsigned long long v[8] = {0};
    int got = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                     &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (got != 8)
        return -1;
    unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    return (int64_t)(busy * (1000000000ULL / (unsigned long long)sysconf(_SC_CLK_TCK)));
}

static void sleep_ns(int64_t d)
{
    if (d <= 0)
        return;
    struct timespec ts = {.tv_sec = d / 1000000000, .tv_nsec = d % 1000000000};
    nanosleep(&ts, NULL);
}

/* Starts argv with stdout and stderr into logpath (and stdin from in_fd
 * unless -1, stdout into out_fd unless -1); the child dies with us. */
static pid_t spawn(char *const argv[], const char *logpath, int in_fd, int out_fd)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        if (in_fd >= 0)
            dup2(in_fd, 0);
        if (out_fd >= 0)
            dup2(out_fd, 1);
        execv(argv[0], argv);
        fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    child_add(pid);
    return pid;
}

/* Connects to 127.0.0.1:port until PING answers PONG; a child pid that exits
 * meanwhile fails at once (pid 0: no child to watch). */
static redisContext *connect_ready(int port, pid_t pid, const char *what, const char *log)
{
    int64_t deadline = mono_ns() + READY_NS;
    for (;;) {
        redisContext *c = redisConnect("127.0.0.1", port);
        if (c && !c->err) {
            redisReply *r = redisCommand(c, "PING");
            bool ok = r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
            if (r)
                freeReplyObject(r);
            if (ok)
                return c;
        }
        if (c)
            redisFree(c);
        if (pid > 0 && waitpid(pid, NULL, WNOHANG) == pid) {
            for (int i = 0; i < MAX_CHILDREN; i++)
                if (children[i] == pid)
                    children[i] = -1;
            die("%s exited during start-up; see %s", what, log);
        }
        if (mono_ns() > deadline)
            die("%s did not answer PING on port %d; see %s", what, port, log);
        usleep(20000);
    }
}

/* The integer after "field:" in an INFO text, or -1. */
static long long info_get(const char *text, const char *field)
{
    size_t fl = strlen(field);
    for (const char *p = text; p && *p;) {
        if (strncmp(p, field, fl) == 0 && p[fl] == ':')
            return strtoll(p + fl + 1, NULL, 10);
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return -1;
}

/* ---- the stream ------------------------------------------------------------ */

typedef struct {
    rng_t r;
    zipf_t zu, zp;
    uint64_t users, pins;
} gen_t;

typedef struct {
    uint64_t user, pin;
    int act;
    int64_t dwell; /* -1: absent */
} draw_t;

static void gen_draw(gen_t *g, draw_t *d)
{
    d->user = rank_to_id(zipf_draw(&g->zu, &g->r), g->users);
    d->pin = rank_to_id(zipf_draw(&g->zp, &g->r), g->pins);
    unsigned roll = (unsigned)rng_below(&g->r, 100);
    d->act = 0;
    while (roll >= action_cum[d->act])
        d->act++;
    d->dwell = -1;
    if (d->act != ACT_HIDE && rng_below(&g->r, 100) < 92) {
        static const int64_t lo[ACT__COUNT] = {200, 1000, 500, 500, 0};
        static const int64_t span[ACT__COUNT] = {2800, 59000, 19500, 19500, 1};
        d->dwell = lo[d->act] + (int64_t)rng_below(&g->r, (uint64_t)span[d->act]);
    }
}

static int render(char *buf, size_t cap, const draw_t *d, int64_t ts)
{
    if (d->dwell >= 0)
        return snprintf(buf, cap,
                        "{\"user_id\": %" PRIu64 ", \"pin_id\": %" PRIu64
                        ", \"action\": \"%s\", \"dwell_ms\": %" PRId64 ", \"ts\": %" PRId64 "}",
                        d->user, d->pin, action_names[d->act], d->dwell, ts);
    return snprintf(buf, cap,
                    "{\"user_id\": %" PRIu64 ", \"pin_id\": %" PRIu64
                    ", \"action\": \"%s\", \"ts\": %" PRId64 "}",
                    d->user, d->pin, action_names[d->act], ts);
}

typedef struct {
    size_t n;
    char *arena;
    size_t *off;
    uint32_t *len;
    uint32_t *user;
    uint32_t *gt_clicks; /* [users + 1] */
    uint64_t users;
    size_t bytes;
    int64_t check_ids[CHECK_USERS]; /* users whose clicks:7d are checked */
    int ncheck;
} stream_t;

static void stream_generate(stream_t *sm, gen_t *g, size_t n)
{
    memset(sm, 0, sizeof *sm);
    sm->n = n;
    sm->users = g->users;
    size_t cap = n * 112 + 256, used = 0;
    sm->arena = xmalloc(cap);
    sm->off = xmalloc(n * sizeof *sm->off);
    sm->len = xmalloc(n * sizeof *sm->len);
    sm->user = xmalloc(n * sizeof *sm->user);
    sm->gt_clicks = xcalloc(g->users + 1, sizeof *sm->gt_clicks);
    int64_t now = wall_ms();
    for (size_t i = 0; i < n; i++) {
        draw_t d;
        gen_draw(g, &d);
        int64_t ts = now - (int64_t)rng_below(&g->r, 60001);
        int w = render(sm->arena + used, cap - used, &d, ts);
        if (w < 0 || (size_t)w >= cap - used)
            die("payload arena too small (generator bug)");
        sm->off[i] = used;
        sm->len[i] = (uint32_t)w;
        sm->user[i] = (uint32_t)d.user;
        used += (size_t)w;
        if (d.act == ACT_CLICK)
            sm->gt_clicks[d.user]++;
    }
    sm->bytes = used;
    /* The 10 users with the most clicks, and 10 spread over the id space
     * (0 clicks counts too: both servers must then say 0). */
    for (int k = 0; k < CHECK_USERS / 2; k++) {
        uint64_t best = 1;
        for (uint64_t u = 1; u <= sm->users; u++) {
            bool taken = false;
            for (int j = 0; j < sm->ncheck; j++)
                taken |= sm->check_ids[j] == (int64_t)u;
            if (!taken && sm->gt_clicks[u] > sm->gt_clicks[best])
                best = u;
        }
        sm->check_ids[sm->ncheck++] = (int64_t)best;
    }
    for (int k = 0; sm->ncheck < CHECK_USERS; k++)
        sm->check_ids[sm->ncheck++] = (int64_t)(1 + (uint64_t)k * sm->users / (CHECK_USERS / 2));
}

/* ---- librdkafka helpers ----------------------------------------------------- */

static void conf_set(rd_kafka_conf_t *conf, const char *key, const char *value)
{
    char err[256];
    if (rd_kafka_conf_set(conf, key, value, err, sizeof err) != RD_KAFKA_CONF_OK)
        die("librdkafka config %s=%s: %s", key, value, err);
}

typedef struct {
    size_t delivered, failed;
    int64_t *ack_ns; /* freshness: per sample, the delivery report time */
} dr_t;

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    dr_t *dr = opaque;
    if (m->err) {
        if (dr->failed++ < 3)
            fprintf(stderr, "kafka: delivery failed: %s\n", rd_kafka_err2str(m->err));
        return;
    }
    dr->delivered++;
    if (dr->ack_ns != NULL && m->_private != NULL)
        dr->ack_ns[(uintptr_t)m->_private - 1] = mono_ns();
}

/* Creates topic with nparts partitions (no retention limit) through the
 * admin API of rk, and waits until every partition has a leader. */
static void create_topic(rd_kafka_t *rk, const char *topic, int nparts)
{
    char err[512];
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topic, nparts, 1, err, sizeof err);
    if (nt == NULL)
        die("topic %s: %s", topic, err);
    rd_kafka_NewTopic_set_config(nt, "retention.ms", "-1");
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_CreateTopics(rk, &nt, 1, NULL, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 60000);
    if (ev == NULL)
        die("creating topic %s: no answer within 60 s", topic);
    const rd_kafka_CreateTopics_result_t *res = rd_kafka_event_CreateTopics_result(ev);
    size_t cnt = 0;
    const rd_kafka_topic_result_t **tr =
        res ? rd_kafka_CreateTopics_result_topics(res, &cnt) : NULL;
    if (rd_kafka_event_error(ev) || cnt != 1 || rd_kafka_topic_result_error(tr[0]))
        die("creating topic %s: %s", topic,
            rd_kafka_event_error(ev) ? rd_kafka_event_error_string(ev)
            : cnt == 1               ? rd_kafka_topic_result_error_string(tr[0])
                                     : "no result");
    rd_kafka_event_destroy(ev);
    rd_kafka_queue_destroy(q);
    rd_kafka_NewTopic_destroy(nt);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    int64_t deadline = mono_ns() + INT64_C(60) * 1000000000;
    for (;;) {
        const struct rd_kafka_metadata *md = NULL;
        bool ok = false;
        if (rd_kafka_metadata(rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
            ok = md->topic_cnt == 1 && md->topics[0].err == 0 &&
                 md->topics[0].partition_cnt == nparts;
            for (int p = 0; ok && p < md->topics[0].partition_cnt; p++)
                ok = md->topics[0].partitions[p].leader >= 0;
        }
        if (md)
            rd_kafka_metadata_destroy(md);
        if (ok)
            break;
        if (mono_ns() > deadline)
            die("topic %s: partitions without a leader after 60 s", topic);
        usleep(100000);
    }
    rd_kafka_topic_destroy(rkt);
}

/* Sum of the high watermarks of topic's partitions (low must be 0). */
static int64_t topic_messages(rd_kafka_t *rk, const char *topic, int nparts)
{
    int64_t total = 0;
    for (int p = 0; p < nparts; p++) {
        int64_t lo, hi;
        rd_kafka_resp_err_t e = rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, 10000);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
            die("watermarks of %s/%d: %s", topic, p, rd_kafka_err2str(e));
        if (lo != 0)
            die("%s/%d starts at offset %" PRId64 ", not 0", topic, p, lo);
        total += hi;
    }
    return total;
}

/* Preloads the stream into a new topic on the real broker (untimed). */
static void preload_real(const opts_t *o, const stream_t *sm, const char *topic)
{
    char err[512];
    dr_t dr = {0};
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", o->bootstrap);
    conf_set(conf, "partitioner", "murmur2_random");
    conf_set(conf, "linger.ms", "20");
    conf_set(conf, "batch.num.messages", "10000");
    conf_set(conf, "compression.type", "lz4");
    conf_set(conf, "queue.buffering.max.messages", "1000000");
    conf_set(conf, "queue.buffering.max.kbytes", "1048576");
    conf_set(conf, "log.connection.close", "false");
    rd_kafka_conf_set_opaque(conf, &dr);
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL)
        die("cannot create producer: %s", err);
    create_topic(rk, topic, o->partitions);
    for (size_t i = 0; i < sm->n; i++) {
        char key[16];
        int klen = snprintf(key, sizeof key, "%" PRIu32, sm->user[i]);
        for (;;) {
            rd_kafka_resp_err_t e =
                rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, (size_t)klen),
                                  RD_KAFKA_V_VALUE(sm->arena + sm->off[i], sm->len[i]),
                                  RD_KAFKA_V_MSGFLAGS(0), RD_KAFKA_V_END);
            if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
                break;
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                die("produce: %s", rd_kafka_err2str(e));
            rd_kafka_poll(rk, 10);
        }
        rd_kafka_poll(rk, 0);
    }
    if (rd_kafka_flush(rk, 300000) != RD_KAFKA_RESP_ERR_NO_ERROR || dr.failed ||
        dr.delivered != sm->n)
        die("preloading %s: %zu of %zu delivered, %zu failed", topic, dr.delivered, sm->n,
            dr.failed);
    int64_t held = topic_messages(rk, topic, o->partitions);
    if (held != (int64_t)sm->n)
        die("the broker holds %" PRId64 " messages of %s, produced %zu", held, topic, sm->n);
    rd_kafka_destroy(rk);
}

/* The mock cluster: mockkafka as a child, fed the stream from a file. */
typedef struct {
    pid_t pid;
    FILE *in, *out;
    char bootstrap[1024];
} mock_t;

static void mock_start(const opts_t *o, const stream_t *sm, const char *topic, mock_t *m)
{
    char path[300], log[300], parts[16], line[1024];
    snprintf(path, sizeof path, "%s/events.tsv", tmpdir);
    snprintf(log, sizeof log, "%s/mockkafka.log", tmpdir);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        die("cannot write %s: %s", path, strerror(errno));
    for (size_t i = 0; i < sm->n; i++)
        fprintf(f, "%" PRIu32 "\t%.*s\n", sm->user[i], (int)sm->len[i], sm->arena + sm->off[i]);
    if (fclose(f) != 0)
        die("cannot write %s", path);
    int to_child[2], from_child[2];
    if (pipe(to_child) != 0 || pipe(from_child) != 0)
        die("pipe: %s", strerror(errno));
    snprintf(parts, sizeof parts, "%d", o->mock_partitions);
    char *argv[] = {(char *)o->mockkafka, (char *)topic, parts, path, NULL};
    m->pid = spawn(argv, log, to_child[0], from_child[1]);
    close(to_child[0]);
    close(from_child[1]);
    m->in = fdopen(to_child[1], "w");
    m->out = fdopen(from_child[0], "r");
    m->bootstrap[0] = '\0';
    while (fgets(line, sizeof line, m->out) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "BOOTSTRAP ", 10) == 0)
            snprintf(m->bootstrap, sizeof m->bootstrap, "%s", line + 10);
        else if (strncmp(line, "PRODUCED ", 9) == 0) {
            if (strtoull(line + 9, NULL, 10) != sm->n)
                die("mockkafka holds %s messages, wanted %zu", line + 9, sm->n);
            return;
        }
    }
    die("mockkafka exited before holding the events; see %s", log);
}

static void mock_stop(mock_t *m)
{
    if (m->in) {
        fputs("quit\n", m->in);
        fclose(m->in);
        m->in = NULL;
    }
    for (int t = 0; t < 1000 && waitpid(m->pid, NULL, WNOHANG) == 0; t++)
        usleep(10000);
    child_stop(m->pid);
    if (m->out)
        fclose(m->out);
    m->out = NULL;
}

/* A consumer of every partition of topic from the beginning, as the bare
 * consumer and the loader use it: own group, no commits, librdkafka's
 * default fetch properties but tallyd's queued.min.messages. With
 * librdkafka's 100,000, a consumer that falls behind its fetcher for a
 * moment fills its queue and then waits up to a second for the next fetch
 * (librdkafka 2.0.2; tallyd nudges the fetcher, this consumer does not):
 * the bare consumer ran at 0.9M or 2.6M events/s from one run to the next,
 * which made its ratios say little. */
static const opts_t *g_opts; /* for --property in consumer_new */
/* One more KEY=VALUE for every consumer of the current run (the tuned rows),
 * or NULL. */
static const char *run_prop;
/* kafka.threads of the tallyd being started; 0: tallyd's default */
static int run_threads;

/* Applies "KEY=VALUE" to conf. */
static void conf_kv(rd_kafka_conf_t *conf, const char *prop)
{
    char kv[256];
    snprintf(kv, sizeof kv, "%s", prop);
    char *eq = strchr(kv, '=');
    if (eq == NULL)
        die("property %s: want KEY=VALUE", kv);
    *eq = '\0';
    conf_set(conf, kv, eq + 1);
}

static rd_kafka_t *consumer_new(const char *bootstrap, const char *group, const char *topic,
                                int nparts)
{
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", bootstrap);
    conf_set(conf, "group.id", group);
    conf_set(conf, "auto.offset.reset", "earliest");
    conf_set(conf, "enable.auto.commit", "false");
    conf_set(conf, "enable.auto.offset.store", "false");
    conf_set(conf, "enable.partition.eof", "false");
    conf_set(conf, "log.connection.close", "false");
    conf_set(conf, "queued.min.messages", "1000000");
    for (int i = 0; g_opts && i < g_opts->nprops; i++)
        conf_kv(conf, g_opts->props[i]);
    if (run_prop != NULL)
        conf_kv(conf, run_prop);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (rk == NULL)
        die("cannot create consumer: %s", err);
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(nparts);
    for (int p = 0; p < nparts; p++)
        rd_kafka_topic_partition_list_add(parts, topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
    if (rd_kafka_assign(rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
        die("rd_kafka_assign failed");
    rd_kafka_topic_partition_list_destroy(parts);
    return rk;
}

/* ---- results ------------------------------------------------------------------- */

typedef struct {
    bool done;
    size_t n;   /* events at the end */
    size_t c0;  /* events already counted at t_first */
    int64_t t0; /* start: consumer created / tallyd spawned */
    int64_t t_first;
    int64_t t_end;
    double cpu;  /* CPU-seconds of the consuming process over [t0, t_end] */
    double cpu2; /* redis-server's, for the loader */
    double busy; /* CPUs the whole machine kept busy over [t0, t_end] (all processes) */
    int64_t busy0;
    char note[256];
    char runs[96]; /* with --reps: every run's events/s, in order */
} result_t;

static void row_busy(result_t *r)
{
    int64_t b = system_busy_ns();
    r->busy = r->busy0 >= 0 && b >= 0 && r->t_end > r->t0
                  ? (double)(b - r->busy0) / (double)(r->t_end - r->t0)
                  : -1;
}

static double res_rate(const result_t *r)
{
    return r->t_end > r->t_first ? (double)(r->n - r->c0) * 1e9 / (double)(r->t_end - r->t_first)
                                 : 0;
}

/* Keeps in *best the faster of *best and run r (rep `rep` of a row), and
 * lists every run's rate in best->runs. */
static void keep_best(result_t *best, const result_t *r, int rep)
{
    char runs[sizeof best->runs] = "";
    if (rep > 0)
        memcpy(runs, best->runs, sizeof runs);
    size_t len = strnlen(runs, sizeof runs - 1);
    snprintf(runs + len, sizeof runs - len, "%s%.0f", rep ? ", " : "", res_rate(r));
    if (rep == 0 || res_rate(r) > res_rate(best))
        *best = *r;
    memcpy(best->runs, runs, sizeof runs);
}

/* ---- bare consumer -------------------------------------------------------------- */

static void run_bare(const char *bootstrap, const char *topic, int nparts, size_t n, result_t *r)
{
    char group[64];
    snprintf(group, sizeof group, "tly-bench-bare-%d-%" PRId64, (int)getpid(), mono_ns());
    double c0 = self_cpu_s();
    memset(r, 0, sizeof *r);
    r->t0 = mono_ns();
    r->busy0 = system_busy_ns();
    rd_kafka_t *rk = consumer_new(bootstrap, group, topic, nparts);
    size_t seen = 0, errors = 0;
    while (seen < n) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (m == NULL) {
            if (mono_ns() - r->t0 > CATCHUP_NS)
                die("bare consumer saw %zu of %zu messages before the deadline", seen, n);
            continue;
        }
        if (m->err) {
            if (errors++ < 3)
                fprintf(stderr, "kafka: bare consumer: %s\n", rd_kafka_message_errstr(m));
        } else if (seen++ == 0) {
            r->t_first = mono_ns();
            r->c0 = 1;
        }
        rd_kafka_message_destroy(m);
    }
    r->t_end = mono_ns();
    row_busy(r);
    r->cpu = self_cpu_s() - c0;
    r->n = seen;
    r->done = true;
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
}

/* ---- tallyd ---------------------------------------------------------------------- */

static void write_config(const char *path, int port, const char *bootstrap, const char *topic,
                         const char *name, const opts_t *o)
{
    FILE *in = fopen(DEMO_CONFIG, "r");
    if (in == NULL)
        die("cannot open %s (run from the repository root): %s", DEMO_CONFIG, strerror(errno));
    FILE *out = fopen(path, "w");
    if (out == NULL)
        die("cannot write %s: %s", path, strerror(errno));
    fprintf(out,
            "# generated by bench/kafka.c: the features of %s\n"
            "server:\n  listen: 127.0.0.1:%d\n  admin: \"\"\n"
            "kafka:\n  brokers: \"%s\"\n  group: tly-bench-kafka-%s-%d\n  topics: [%s]\n"
            "  mode: replica\n  start: earliest\n",
            DEMO_CONFIG, port, bootstrap, name, (int)getpid(), topic);
    if (run_threads > 0)
        fprintf(out, "  threads: %d\n", run_threads);
    const char *props[17];
    int np = 0;
    for (int i = 0; i < o->nprops; i++)
        props[np++] = o->props[i];
    if (run_prop != NULL)
        props[np++] = run_prop;
    if (np > 0)
        fprintf(out, "  properties:\n");
    for (int i = 0; i < np; i++) {
        const char *eq = strchr(props[i], '=');
        if (eq == NULL)
            die("property %s: want KEY=VALUE", props[i]);
        fprintf(out, "    \"%.*s\": \"%s\"\n", (int)(eq - props[i]), props[i], eq + 1);
    }
    fprintf(out,
            "events:\n  time: { field: ts, unit: ms }\n"
            "snapshot:\n  dir: %s/snapshots-%s\n  every: 1d\n",
            tmpdir, name);
    char line[4096];
    bool copying = false;
    while (fgets(line, sizeof line, in)) {
        if (strncmp(line, "features:", 9) == 0)
            copying = true;
        else if (copying && line[0] != ' ' && line[0] != '#' && line[0] != '\n' && line[0] != '-')
            copying = false;
        if (copying)
            fputs(line, out);
    }
    fclose(in);
    if (fclose(out) != 0)
        die("cannot write %s", path);
}

typedef struct {
    pid_t pid;
    int port;
    redisContext *c;
    char log[300];
} tallyd_t;

static void tallyd_start(const opts_t *o, const char *bootstrap, const char *topic,
                         const char *name, tallyd_t *t)
{
    char cfg[300];
    t->port = free_port();
    snprintf(cfg, sizeof cfg, "%s/%s.yaml", tmpdir, name);
    snprintf(t->log, sizeof t->log, "%s/%s.log", tmpdir, name);
    write_config(cfg, t->port, bootstrap, topic, name, o);
    char *argv[] = {(char *)o->tallyd, "--config", cfg, NULL};
    t->pid = spawn(argv, t->log, -1, -1);
    t->c = connect_ready(t->port, t->pid, "tallyd", t->log);
}

static void tallyd_stop(tallyd_t *t)
{
    if (t->c)
        redisFree(t->c);
    t->c = NULL;
    child_stop(t->pid);
    t->pid = -1;
}

/* INFO source of t: consumed, applied, rejected, partitions. */
static void tallyd_counts(tallyd_t *t, long long v[5])
{
    redisReply *r = redisCommand(t->c, "INFO source");
    if (r == NULL)
        die("tallyd INFO: %s (see %s)", t->c->errstr, t->log);
    if (r->type != REDIS_REPLY_STRING)
        die("tallyd INFO replied type %d (see %s)", r->type, t->log);
    v[0] = info_get(r->str, "messages_consumed");
    v[1] = info_get(r->str, "events_applied");
    v[2] = info_get(r->str, "events_rejected");
    v[3] = info_get(r->str, "partitions");
    v[4] = info_get(r->str, "loading");
    freeReplyObject(r);
}

/* The integer value of reply r, a number or a numeric string; -1 if none. */
static long long reply_int(const redisReply *r)
{
    if (r->type == REDIS_REPLY_INTEGER)
        return r->integer;
    if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS)
        return strtoll(r->str, NULL, 10);
    return -1;
}

/* clicks:7d of user id from tallyd: FEATURES replies name/value pairs. */
static long long tallyd_clicks(tallyd_t *t, int64_t id)
{
    redisReply *r = redisCommand(t->c, "FEATURES user %lld clicks:7d", (long long)id);
    if (r == NULL)
        die("tallyd FEATURES: %s", t->c->errstr);
    long long v = -2;
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1)
        v = reply_int(r->element[r->elements - 1]);
    freeReplyObject(r);
    return v;
}

static int check_tallyd(tallyd_t *t, const stream_t *sm, char *note, size_t cap)
{
    int bad = 0;
    for (int k = 0; k < sm->ncheck; k++) {
        long long got = tallyd_clicks(t, sm->check_ids[k]);
        if (got != (long long)sm->gt_clicks[sm->check_ids[k]]) {
            if (bad++ == 0)
                snprintf(note, cap, "user %" PRId64 " clicks:7d: tallyd %lld, generated %u",
                         sm->check_ids[k], got, sm->gt_clicks[sm->check_ids[k]]);
        }
    }
    return bad;
}

static void run_tallyd(const opts_t *o, const char *bootstrap, const char *topic,
                       const stream_t *sm, const char *name, result_t *r, int *bad)
{
    tallyd_t t = {0};
    memset(r, 0, sizeof *r);
    r->t0 = mono_ns();
    r->busy0 = system_busy_ns();
    tallyd_start(o, bootstrap, topic, name, &t);
    long long v[5];
    for (;;) {
        tallyd_counts(&t, v);
        int64_t now = mono_ns();
        long long done = v[1] + v[2];
        if (done > 0 && r->t_first == 0) {
            r->t_first = now;
            r->c0 = (size_t)done;
        }
        if (done >= (long long)sm->n) {
            r->t_end = now;
            break;
        }
        if (now - r->t0 > CATCHUP_NS)
            die("tallyd applied %lld of %zu events before the deadline (see %s)", done, sm->n,
                t.log);
        if (waitpid(t.pid, NULL, WNOHANG) == t.pid)
            die("tallyd exited while consuming; see %s", t.log);
        sleep_ns(INFO_POLL_NS);
    }
    row_busy(r);
    r->cpu = cpu_seconds(t.pid);
    r->n = (size_t)(v[1] + v[2]);
    r->done = true;
    /* Untimed: queries answer -LOADING until the source publishes that it
     * caught up (at most about a second later). */
    int64_t ready_by = mono_ns() + READY_NS;
    while (v[4] != 0) {
        if (mono_ns() > ready_by)
            die("tallyd still loading %d s after applying every event (see %s)",
                (int)(READY_NS / 1000000000), t.log);
        sleep_ns(INFO_POLL_NS);
        tallyd_counts(&t, v);
    }
    /* how its batches were applied (apply.h) */
    redisReply *info = redisCommand(t.c, "INFO source");
    if (info == NULL || info->type != REDIS_REPLY_STRING)
        die("tallyd INFO source failed (see %s)", t.log);
    int len = snprintf(r->note, sizeof r->note,
                       "batches alone %lld, shared %lld, by partition %lld, pipelined %lld",
                       info_get(info->str, "batches_alone"), info_get(info->str, "batches_shared"),
                       info_get(info->str, "batches_by_partition"),
                       info_get(info->str, "batches_pipelined"));
    freeReplyObject(info);
    if (v[2] != 0)
        snprintf(r->note + len, sizeof r->note - (size_t)len, "; %lld events rejected", v[2]);
    *bad = check_tallyd(&t, sm, r->note, sizeof r->note);
    tallyd_stop(&t);
}

/* ---- the Redis loader ------------------------------------------------------------- */

/* Hop of each window under config/demo.yaml's default rule (the largest of
 * 1s, 10s, 1m, 5m, 1h, 1d giving at least 30 buckets). */
typedef struct {
    const char *name;
    int64_t hop_ms;
} win_t;

static const win_t W5M = {"5m", 10000}, W1H = {"1h", 60000}, W1D = {"1d", 300000},
                   W7D = {"7d", 3600000};

typedef struct {
    redisContext *c;
    size_t pending; /* commands appended, replies not read */
    size_t commands;
    int pipeline;
} loader_t;

static void loader_flush(loader_t *l)
{
    for (size_t i = 0; i < l->pending; i++) {
        void *reply = NULL;
        if (redisGetReply(l->c, &reply) != REDIS_OK)
            die("redis: %s", l->c->errstr);
        redisReply *r = reply;
        if (r->type == REDIS_REPLY_ERROR)
            die("redis replied an error: %s", r->str);
        freeReplyObject(r);
    }
    l->pending = 0;
}

static void loader_cmd_done(loader_t *l)
{
    l->commands++;
    if (++l->pending >= (size_t)l->pipeline)
        loader_flush(l);
}

static void hincr(loader_t *l, const char *ent, const char *id, const char *feat, const win_t *w,
                  int64_t ts, long long by)
{
    redisAppendCommand(l->c, "HINCRBY %s:%s %s:%s:%lld %lld", ent, id, feat, w->name,
                       (long long)(ts - ts % w->hop_ms), by);
    loader_cmd_done(l);
}

static bool tok_is(const char *js, const jsmntok_t *t, const char *s)
{
    size_t n = strlen(s);
    return t->type == JSMN_STRING && (size_t)(t->end - t->start) == n &&
           memcmp(js + t->start, s, n) == 0;
}

/* One event → the commands keeping config/demo.yaml's features:
 *   user:<id>  clicks|saves|hides:{5m,1h,1d,7d}:<bucket> HINCRBY 1 (by action),
 *              engaged:{1h,1d}:<bucket> HINCRBY 1 (click or save),
 *              dwell:{1h,1d}:<bucket> HINCRBY dwell_ms, last_action HSET;
 *   user:<id>:recent  LPUSH "pin_id,action,ts" + LTRIM 0 99 (last_k 100);
 *   pin:<id>   impressions|closeups|clicks|saves:{1h,1d}:<bucket> HINCRBY 1,
 *              avg_dwell_sum:1d and avg_dwell_n:1d HINCRBY on closeups with
 *              dwell_ms.
 * Returns false for an event it cannot read. */
static bool loader_event(loader_t *l, const char *js, size_t len)
{
    jsmn_parser p;
    jsmntok_t tok[32];
    jsmn_init(&p);
    int nt = jsmn_parse(&p, js, len, tok, 32);
    if (nt < 1 || tok[0].type != JSMN_OBJECT)
        return false;
    char user[24] = "", pin[24] = "", action[16] = "";
    long long dwell = -1, ts = -1;
    for (int i = 1; i + 1 < nt; i += 2) {
        const jsmntok_t *k = &tok[i], *v = &tok[i + 1];
        int vl = v->end - v->start;
        const char *vs = js + v->start;
        if (tok_is(js, k, "user_id") && vl < (int)sizeof user)
            snprintf(user, sizeof user, "%.*s", vl, vs);
        else if (tok_is(js, k, "pin_id") && vl < (int)sizeof pin)
            snprintf(pin, sizeof pin, "%.*s", vl, vs);
        else if (tok_is(js, k, "action") && vl < (int)sizeof action)
            snprintf(action, sizeof action, "%.*s", vl, vs);
        else if (tok_is(js, k, "dwell_ms"))
            dwell = strtoll(vs, NULL, 10);
        else if (tok_is(js, k, "ts"))
            ts = strtoll(vs, NULL, 10);
    }
    if (!user[0] || !pin[0] || !action[0] || ts < 0)
        return false;
    static const win_t *const all4[] = {&W5M, &W1H, &W1D, &W7D};
    const char *cnt = strcmp(action, "click") == 0  ? "clicks"
                      : strcmp(action, "save") == 0 ? "saves"
                      : strcmp(action, "hide") == 0 ? "hides"
                                                    : NULL;
    if (cnt)
        for (int w = 0; w < 4; w++)
            hincr(l, "user", user, cnt, all4[w], ts, 1);
    if (strcmp(action, "click") == 0 || strcmp(action, "save") == 0) {
        hincr(l, "user", user, "engaged", &W1H, ts, 1);
        hincr(l, "user", user, "engaged", &W1D, ts, 1);
    }
    if (dwell >= 0) {
        hincr(l, "user", user, "dwell", &W1H, ts, dwell);
        hincr(l, "user", user, "dwell", &W1D, ts, dwell);
    }
    redisAppendCommand(l->c, "LPUSH user:%s:recent %s,%s,%lld", user, pin, action, ts);
    loader_cmd_done(l);
    redisAppendCommand(l->c, "LTRIM user:%s:recent 0 99", user);
    loader_cmd_done(l);
    redisAppendCommand(l->c, "HSET user:%s last_action %s", user, action);
    loader_cmd_done(l);
    const char *pf = strcmp(action, "impression") == 0 ? "impressions"
                     : strcmp(action, "closeup") == 0  ? "closeups"
                     : strcmp(action, "click") == 0    ? "clicks"
                     : strcmp(action, "save") == 0     ? "saves"
                                                       : NULL;
    if (pf) {
        hincr(l, "pin", pin, pf, &W1H, ts, 1);
        hincr(l, "pin", pin, pf, &W1D, ts, 1);
    }
    if (strcmp(action, "closeup") == 0 && dwell >= 0) {
        hincr(l, "pin", pin, "avg_dwell_sum", &W1D, ts, dwell);
        hincr(l, "pin", pin, "avg_dwell_n", &W1D, ts, 1);
    }
    return true;
}

/* clicks:7d of user id in Redis: the sum of its clicks:7d:* buckets. */
static long long redis_clicks(redisContext *c, int64_t id)
{
    redisReply *r = redisCommand(c, "HGETALL user:%lld", (long long)id);
    if (r == NULL)
        die("redis HGETALL: %s", c->errstr);
    long long sum = 0;
    if (r->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i + 1 < r->elements; i += 2)
            if (strncmp(r->element[i]->str, "clicks:7d:", 10) == 0)
                sum += reply_int(r->element[i + 1]);
    freeReplyObject(r);
    return sum;
}

static void run_loader(const opts_t *o, const char *bootstrap, const char *topic, int nparts,
                       const stream_t *sm, result_t *r, int *bad)
{
    redisContext *c = connect_ready(o->redis_port, 0, "redis-server", "its log");
    redisReply *rr = redisCommand(c, "FLUSHALL");
    if (rr)
        freeReplyObject(rr);
    rr = redisCommand(c, "INFO server");
    pid_t rpid = rr && rr->type != REDIS_REPLY_ERROR ? (pid_t)info_get(rr->str, "process_id") : -1;
    if (rr)
        freeReplyObject(rr);
    char group[64];
    snprintf(group, sizeof group, "tly-bench-loader-%d-%" PRId64, (int)getpid(), mono_ns());
    loader_t l = {.c = c, .pipeline = o->pipeline};
    memset(r, 0, sizeof *r);
    double c0 = self_cpu_s(), rc0 = rpid > 0 ? cpu_seconds(rpid) : 0;
    r->t0 = mono_ns();
    r->busy0 = system_busy_ns();
    rd_kafka_t *rk = consumer_new(bootstrap, group, topic, nparts);
    size_t seen = 0, unreadable = 0;
    while (seen < sm->n) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (m == NULL) {
            if (mono_ns() - r->t0 > CATCHUP_NS)
                die("loader saw %zu of %zu messages before the deadline", seen, sm->n);
            continue;
        }
        if (!m->err) {
            if (seen++ == 0) {
                r->t_first = mono_ns();
                r->c0 = 1;
            }
            if (!loader_event(&l, m->payload, m->len))
                unreadable++;
        }
        rd_kafka_message_destroy(m);
    }
    loader_flush(&l);
    r->t_end = mono_ns();
    row_busy(r);
    r->cpu = self_cpu_s() - c0;
    r->cpu2 = rpid > 0 ? cpu_seconds(rpid) - rc0 : -1;
    r->n = seen;
    r->done = true;
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    snprintf(r->note, sizeof r->note, "%zu commands (%.2f per event)%s", l.commands,
             (double)l.commands / (double)seen, unreadable ? ", some events unreadable" : "");
    *bad = 0;
    for (int k = 0; k < sm->ncheck; k++) {
        long long got = redis_clicks(c, sm->check_ids[k]);
        if (got != (long long)sm->gt_clicks[sm->check_ids[k]] && (*bad)++ == 0)
            snprintf(r->note, sizeof r->note,
                     "user %" PRId64 " clicks:7d: redis %lld, generated %u", sm->check_ids[k], got,
                     sm->gt_clicks[sm->check_ids[k]]);
    }
    redisFree(c);
}

/* ---- freshness -------------------------------------------------------------------- */

typedef struct {
    int64_t user;   /* unique user id; pin_id is the sample index (the marker) */
    int64_t t_prod; /* just before rd_kafka_producev */
    int64_t t_vis;  /* the poll reply that showed it; 0: not yet */
} sample_t;

typedef struct {
    sample_t *s;
    size_t cap;
    _Atomic size_t published; /* samples [0, published) are filled in */
    _Atomic bool producing_done;
    int port;
    int poll_us;
    int64_t deadline_after_done;
    size_t rounds, requests;
    char err[256];
} poller_t;

/* Whether a RECENT reply holds marker as an item's pin_id. */
static bool reply_has(const redisReply *r, const char *marker)
{
    if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_INTEGER ||
        r->type == REDIS_REPLY_STATUS) {
        char buf[32];
        const char *s = r->str;
        if (r->type == REDIS_REPLY_INTEGER) {
            snprintf(buf, sizeof buf, "%lld", r->integer);
            s = buf;
        }
        return strcmp(s, marker) == 0;
    }
    if (r->type == REDIS_REPLY_ARRAY) /* hiredis 0.14: RESP2 only */
        for (size_t i = 0; i < r->elements; i++)
            if (reply_has(r->element[i], marker))
                return true;
    return false;
}

static void *poller_main(void *arg)
{
    poller_t *pl = arg;
    redisContext *c = redisConnect("127.0.0.1", pl->port);
    if (c == NULL || c->err) {
        snprintf(pl->err, sizeof pl->err, "poller cannot connect");
        return NULL;
    }
    size_t lo = 0; /* every sample before lo is visible */
    size_t idx[POLL_BATCH];
    int64_t done_at = 0;
    for (;;) {
        size_t hi = atomic_load_explicit(&pl->published, memory_order_acquire);
        size_t k = 0;
        for (size_t i = lo; i < hi && k < POLL_BATCH; i++)
            if (pl->s[i].t_vis == 0) {
                idx[k++] = i;
                redisAppendCommand(c, "RECENT user %lld recent COUNT 1", (long long)pl->s[i].user);
            }
        for (size_t j = 0; j < k; j++) {
            void *reply = NULL;
            if (redisGetReply(c, &reply) != REDIS_OK) {
                snprintf(pl->err, sizeof pl->err, "poller: %s", c->errstr);
                redisFree(c);
                return NULL;
            }
            redisReply *r = reply;
            char marker[24];
            snprintf(marker, sizeof marker, "%zu", idx[j]);
            if (r->type != REDIS_REPLY_ERROR && reply_has(r, marker))
                pl->s[idx[j]].t_vis = mono_ns();
            freeReplyObject(r);
        }
        pl->requests += k;
        pl->rounds += k > 0;
        while (lo < hi && pl->s[lo].t_vis != 0)
            lo++;
        if (atomic_load_explicit(&pl->producing_done, memory_order_acquire)) {
            if (done_at == 0)
                done_at = mono_ns();
            if (lo == atomic_load(&pl->published) || mono_ns() - done_at > pl->deadline_after_done)
                break;
        }
        sleep_ns((int64_t)pl->poll_us * 1000);
    }
    redisFree(c);
    return NULL;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

typedef struct {
    bool done;
    size_t samples, visible, produced;
    double achieved_rate;
    double vis_ms[3], ack_ms[3], ackvis_ms[3]; /* p50, p99, max */
    double bench_cpu, tallyd_cpu, wall_s;
    size_t rounds, requests;
    size_t over, over_by_s[64]; /* samples over 20 ms, by second of the timed part */
    int nsec;
} fresh_t;

static void quantiles(int64_t *v, size_t n, double out[3])
{
    qsort(v, n, sizeof *v, cmp_i64);
    out[0] = n ? (double)v[(n - 1) / 2] / 1e6 : -1;
    out[1] = n ? (double)v[(size_t)((double)(n - 1) * 0.99)] / 1e6 : -1;
    out[2] = n ? (double)v[n - 1] / 1e6 : -1;
}

static void run_fresh(const opts_t *o, gen_t *g, const char *topic, fresh_t *f)
{
    char err[512];
    memset(f, 0, sizeof *f);
    dr_t dr = {0};
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", o->bootstrap);
    conf_set(conf, "partitioner", "murmur2_random");
    char linger[16];
    snprintf(linger, sizeof linger, "%d", o->linger_ms);
    conf_set(conf, "linger.ms", linger);
    conf_set(conf, "log.connection.close", "false");
    rd_kafka_conf_set_opaque(conf, &dr);
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL)
        die("cannot create producer: %s", err);
    create_topic(rk, topic, o->partitions);

    tallyd_t t = {0};
    tallyd_start(o, o->bootstrap, topic, "tallyd-fresh", &t);
    long long v[5];
    int64_t deadline = mono_ns() + READY_NS;
    do {
        if (mono_ns() > deadline)
            die("the freshness tallyd did not assign %d partitions (see %s)", o->partitions, t.log);
        sleep_ns(INFO_POLL_NS);
        tallyd_counts(&t, v);
    } while (v[3] < o->partitions);

    size_t total = (size_t)(o->rate * o->duration_s);
    size_t cap = total / (size_t)o->sample + 2;
    poller_t pl = {
        .cap = cap, .port = t.port, .poll_us = o->poll_us, .deadline_after_done = FRESH_DRAIN_NS};
    pl.s = xcalloc(cap, sizeof *pl.s);
    atomic_init(&pl.published, 0);
    atomic_init(&pl.producing_done, false);
    dr.ack_ns = xcalloc(cap, sizeof *dr.ack_ns);
    pthread_t th;
    if (pthread_create(&th, NULL, poller_main, &pl) != 0)
        die("cannot start the poller thread");

    size_t warm = (size_t)(o->rate * o->warmup_s);
    double period = 1e9 / o->rate;
    int64_t t0 = mono_ns();
    double bench_cpu0 = self_cpu_s(), tallyd_cpu0 = cpu_seconds(t.pid);
    int64_t t_timed = 0;
    size_t ns = 0;
    for (size_t i = 0; i < warm + total; i++) {
        int64_t due = t0 + (int64_t)((double)i * period);
        int64_t now = mono_ns();
        if (due > now)
            sleep_ns(due - now);
        if (i == warm) {
            t_timed = mono_ns();
            bench_cpu0 = self_cpu_s();
            tallyd_cpu0 = cpu_seconds(t.pid);
        }
        draw_t d;
        gen_draw(g, &d);
        bool sampled = i >= warm && (i - warm) % (size_t)o->sample == 0 && ns < cap;
        if (sampled) {
            d.user = (uint64_t)(FRESH_USER_BASE + (int64_t)ns);
            d.pin = ns;
            if (d.act == ACT_HIDE) /* every action lands in recent; keep dwell shapes */
                d.act = ACT_IMPRESSION;
        }
        char buf[256], key[24];
        int len = render(buf, sizeof buf, &d, wall_ms());
        int klen = snprintf(key, sizeof key, "%" PRIu64, d.user);
        if (sampled) {
            pl.s[ns].user = (int64_t)d.user;
            pl.s[ns].t_prod = mono_ns();
        }
        for (;;) {
            rd_kafka_resp_err_t e = rd_kafka_producev(
                rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, (size_t)klen),
                RD_KAFKA_V_VALUE(buf, (size_t)len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                RD_KAFKA_V_OPAQUE(sampled ? (void *)(uintptr_t)(ns + 1) : NULL), RD_KAFKA_V_END);
            if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
                break;
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                die("produce: %s", rd_kafka_err2str(e));
            rd_kafka_poll(rk, 1);
        }
        if (sampled)
            atomic_store_explicit(&pl.published, ++ns, memory_order_release);
        rd_kafka_poll(rk, 0);
    }
    int64_t t_end = mono_ns();
    f->wall_s = (double)(t_end - t_timed) / 1e9;
    f->achieved_rate = (double)total / f->wall_s;
    atomic_store_explicit(&pl.producing_done, true, memory_order_release);
    if (rd_kafka_flush(rk, 60000) != RD_KAFKA_RESP_ERR_NO_ERROR || dr.failed)
        die("freshness producer: %zu failed deliveries", dr.failed);
    pthread_join(th, NULL);
    f->bench_cpu = (self_cpu_s() - bench_cpu0) / f->wall_s;
    f->tallyd_cpu = (cpu_seconds(t.pid) - tallyd_cpu0) / f->wall_s;
    if (pl.err[0])
        die("%s", pl.err);
    f->samples = ns;
    f->produced = dr.delivered;
    f->rounds = pl.rounds;
    f->requests = pl.requests;
    int64_t *vis = xmalloc((ns + 1) * sizeof *vis), *ack = xmalloc((ns + 1) * sizeof *ack);
    int64_t *av = xmalloc((ns + 1) * sizeof *av);
    size_t nv = 0, na = 0, nav = 0;
    for (size_t i = 0; i < ns; i++) {
        if (pl.s[i].t_vis)
            vis[nv++] = pl.s[i].t_vis - pl.s[i].t_prod;
        if (dr.ack_ns[i])
            ack[na++] = dr.ack_ns[i] - pl.s[i].t_prod;
        if (pl.s[i].t_vis && dr.ack_ns[i])
            av[nav++] = pl.s[i].t_vis - dr.ack_ns[i];
        if (pl.s[i].t_vis == 0 || pl.s[i].t_vis - pl.s[i].t_prod > INT64_C(20) * 1000000) {
            int64_t sec = (pl.s[i].t_prod - t_timed) / 1000000000;
            f->over++;
            if (sec >= 0 && sec < 64)
                f->over_by_s[sec]++;
        }
    }
    f->nsec = (int)((t_end - t_timed + 999999999) / 1000000000);
    if (f->nsec > 64)
        f->nsec = 64;
    f->visible = nv;
    quantiles(vis, nv, f->vis_ms);
    quantiles(ack, na, f->ack_ms);
    quantiles(av, nav, f->ackvis_ms);
    free(av);
    f->done = true;
    free(vis);
    free(ack);
    free(pl.s);
    free(dr.ack_ns);
    tallyd_stop(&t);
    rd_kafka_destroy(rk);
}

/* ---- output -------------------------------------------------------------------------- */

static const char *fmt_count(double v, char *buf, size_t cap)
{
    char digits[32];
    snprintf(digits, sizeof digits, "%.0f", v < 0 ? 0 : v);
    size_t n = strlen(digits), o = 0;
    for (size_t i = 0; i < n && o + 2 < cap; i++) {
        if (i > 0 && (n - i) % 3 == 0)
            buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o] = '\0';
    return buf;
}

static void print_machine(void)
{
    char model[256];
    cpu_model(model, sizeof model);
    double load = load_average();
    printf("machine: nproc %ld, %s, librdkafka %s, load average %.2f%s\n",
           sysconf(_SC_NPROCESSORS_ONLN), model, rd_kafka_version_str(), load,
           load > 0.5 ? " (busy: other processes share the CPUs)" : "");
}

/* _T rows: the same pair with --tuned (one more consumer property), each
 * compared with the bare consumer of its own kind. */
typedef enum {
    ROW_BARE,
    ROW_TALLYD,
    ROW_TALLYD_1,
    ROW_REDIS,
    ROW_BARE_T,
    ROW_TALLYD_T,
    ROW__COUNT
} row_t;
static const char *const row_names[ROW__COUNT] = {
    "bare librdkafka consumer", "tallyd",
    "tallyd, kafka.threads: 1", "redis loader (HINCRBY, pipelined)",
    "bare consumer, tuned",     "tallyd, tuned"};

static void print_rows(const char *cluster, const result_t rows[ROW__COUNT])
{
    char b1[32], b2[32];
    for (int i = 0; i < ROW__COUNT; i++) {
        const result_t *r = &rows[i];
        if (!r->done)
            continue;
        int pi = i >= ROW_BARE_T ? ROW_BARE_T : ROW_BARE;
        double peer = rows[pi].done ? res_rate(&rows[pi]) : 0;
        double rate = res_rate(r), wall = (double)(r->t_end - r->t0) / 1e9;
        char name[96];
        if (i >= ROW_BARE_T)
            snprintf(name, sizeof name, "%s, %s", i == ROW_BARE_T ? "bare consumer" : "tallyd",
                     g_opts && g_opts->tuned ? g_opts->tuned : "tuned");
        else
            snprintf(name, sizeof name, "%s", row_names[i]);
        char ratio[16], cpu[32];
        if (peer > 0)
            snprintf(ratio, sizeof ratio, "%.2fx", rate / peer);
        else
            snprintf(ratio, sizeof ratio, "n/a");
        if (i == ROW_REDIS && r->cpu2 >= 0)
            snprintf(cpu, sizeof cpu, "%.2f + redis %.2f", r->cpu / wall, r->cpu2 / wall);
        else
            snprintf(cpu, sizeof cpu, "%.2f", r->cpu / wall);
        printf("| %-11s | %-33s | %9s | %10s | %7s | %8.2f | %-17s | %4.2f |\n", cluster, name,
               fmt_count((double)r->n, b1, sizeof b1), fmt_count(rate, b2, sizeof b2), ratio, wall,
               cpu, r->busy);
    }
}

/* The bare consumer, tallyd and tallyd with kafka.threads 1 on one
 * cluster, o->reps times in turn (so that the host's drifts spread over
 * all three); each row keeps its fastest run. */
static void run_rows(const opts_t *o, const char *bootstrap, const char *topic, int nparts,
                     const stream_t *sm, const char *cluster, result_t rows[], int *bad_total)
{
    for (int rep = 0; rep < o->reps; rep++) {
        result_t r;
        int bad;
        char name[32];
        fprintf(stderr, "  bare consumer (run %d of %d)\n", rep + 1, o->reps);
        run_bare(bootstrap, topic, nparts, sm->n, &r);
        keep_best(&rows[ROW_BARE], &r, rep);
        fprintf(stderr, "  tallyd (run %d of %d)\n", rep + 1, o->reps);
        snprintf(name, sizeof name, "tallyd-%s-r%d", cluster, rep + 1);
        run_tallyd(o, bootstrap, topic, sm, name, &r, &bad);
        *bad_total += bad;
        keep_best(&rows[ROW_TALLYD], &r, rep);
        fprintf(stderr, "  tallyd, kafka.threads: 1 (run %d of %d)\n", rep + 1, o->reps);
        snprintf(name, sizeof name, "tallyd-%s-1-r%d", cluster, rep + 1);
        run_threads = 1;
        run_tallyd(o, bootstrap, topic, sm, name, &r, &bad);
        run_threads = 0;
        *bad_total += bad;
        keep_best(&rows[ROW_TALLYD_1], &r, rep);
    }
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: kafka --tallyd PATH [--bootstrap HOST:PORT] [--mockkafka PATH]\n"
            "             [--redis-port P] [--events N | --quick] [--partitions P]\n"
            "             [--mock-partitions P] [--pipeline N] [--rate R] [--duration S]\n"
            "             [--sample K] [--poll-us U] [--linger MS] [--warmup S]\n"
            "             [--property K=V] [--tuned K=V|none] [--only real,mock,fresh]\n"
            "             [--reps R]\n"
            "  --bootstrap   a real broker (scripts/kafka.sh): ingest rows and freshness\n"
            "  --mockkafka   build/itest/mockkafka: ingest rows on the mock cluster\n"
            "  --redis-port  a redis-server for the loader rows (FLUSHALL is sent!)\n"
            "  --events N    events preloaded (default %u; --quick: %u, 3 s of freshness)\n"
            "  --rate, --duration  freshness: events/s and seconds (default 10000, 10)\n"
            "  --sample K    every K-th freshness event is polled for (default 20)\n"
            "  --poll-us U   pause between poll rounds (default 500)\n"
            "  --warmup S    freshness: seconds produced before sampling starts (default 30;\n"
            "                --quick: 5)\n"
            "  --linger MS   linger.ms of the freshness producer (default 5; see bench/README.md)\n"
            "  --property K=V  a librdkafka property for every consumer (bare, loader, tallyd's\n"
            "                kafka.properties); repeatable\n"
            "  --tuned K=V   a bare consumer and a tallyd more on the real broker, with\n"
            "                this property (default: none)\n"
            "  --only LIST   parts to run: real (ingest on the broker), mock, fresh\n"
            "  --reps R      runs of each bare and tallyd ingest row, in turn; the fastest\n"
            "                is reported, every run's rate under the table (default %d;\n"
            "                --quick: 1)\n",
            DEFAULT_EVENTS, QUICK_EVENTS, DEFAULT_REPS);
}

static void parse_args(int argc, char **argv, opts_t *o)
{
    static const struct option longs[] = {{"tallyd", required_argument, NULL, 't'},
                                          {"bootstrap", required_argument, NULL, 'b'},
                                          {"mockkafka", required_argument, NULL, 'm'},
                                          {"redis-port", required_argument, NULL, 'r'},
                                          {"events", required_argument, NULL, 'n'},
                                          {"quick", no_argument, NULL, 'q'},
                                          {"partitions", required_argument, NULL, 'p'},
                                          {"mock-partitions", required_argument, NULL, 'M'},
                                          {"pipeline", required_argument, NULL, 'P'},
                                          {"rate", required_argument, NULL, 'R'},
                                          {"duration", required_argument, NULL, 'd'},
                                          {"sample", required_argument, NULL, 's'},
                                          {"poll-us", required_argument, NULL, 'u'},
                                          {"help", no_argument, NULL, 'h'},
                                          {"linger", required_argument, NULL, 'L'},
                                          {"only", required_argument, NULL, 'o'},
                                          {"warmup", required_argument, NULL, 'w'},
                                          {"property", required_argument, NULL, 'K'},
                                          {"tuned", required_argument, NULL, 'T'},
                                          {"reps", required_argument, NULL, 'X'},
                                          {NULL, 0, NULL, 0}};
    *o = (opts_t){.tallyd = "build/tallyd",
                  .partitions = 8,
                  .pipeline = 1000,
                  .rate = 10000,
                  .duration_s = -1,
                  .sample = 20,
                  .poll_us = 500,
                  .linger_ms = 5,
                  .warmup_s = -1};
    long n = -1;
    int c;
    bool any_only = false;
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 't':
            o->tallyd = optarg;
            break;
        case 'b':
            o->bootstrap = optarg;
            break;
        case 'm':
            o->mockkafka = optarg;
            break;
        case 'r':
            o->redis_port = atoi(optarg);
            break;
        case 'n':
            n = atol(optarg);
            break;
        case 'q':
            o->quick = true;
            break;
        case 'p':
            o->partitions = atoi(optarg);
            break;
        case 'M':
            o->mock_partitions = atoi(optarg);
            break;
        case 'P':
            o->pipeline = atoi(optarg);
            break;
        case 'R':
            o->rate = atof(optarg);
            break;
        case 'd':
            o->duration_s = atof(optarg);
            break;
        case 's':
            o->sample = atoi(optarg);
            break;
        case 'u':
            o->poll_us = atoi(optarg);
            break;
        case 'L':
            o->linger_ms = atoi(optarg);
            break;
        case 'w':
            o->warmup_s = atof(optarg);
            break;
        case 'T':
            o->tuned = strcmp(optarg, "none") == 0 ? NULL : optarg;
            break;
        case 'X':
            o->reps = atoi(optarg);
            if (o->reps < 1) {
                usage(stderr);
                exit(2);
            }
            break;
        case 'K':
            if (o->nprops == 16) {
                usage(stderr);
                exit(2);
            }
            o->props[o->nprops++] = optarg;
            break;
        case 'o':
            any_only = true;
            o->only[0] = strstr(optarg, "real") != NULL;
            o->only[1] = strstr(optarg, "mock") != NULL;
            o->only[2] = strstr(optarg, "fresh") != NULL;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (!any_only)
        o->only[0] = o->only[1] = o->only[2] = true;
    o->nevents = n > 0 ? (size_t)n : o->quick ? QUICK_EVENTS : DEFAULT_EVENTS;
    if (o->duration_s < 0)
        o->duration_s = o->quick ? 3 : 10;
    if (o->warmup_s < 0)
        o->warmup_s = o->quick ? 5 : 30;
    if (o->reps == 0)
        o->reps = o->quick ? 1 : DEFAULT_REPS;
    if (o->nevents > MAX_EVENTS || o->partitions < 1 || o->partitions > 1024 || o->pipeline < 1 ||
        o->rate < 1 || o->rate > 1e6 || o->duration_s <= 0 || o->warmup_s < 0 || o->sample < 1 ||
        o->poll_us < 0 || o->linger_ms < 0 || o->linger_ms > 1000) {
        usage(stderr);
        exit(2);
    }
    if (o->mock_partitions <= 0)
        o->mock_partitions = (int)((o->nevents / MOCK_PER_PART + 8) / 8 * 8);
    if (o->bootstrap == NULL && o->mockkafka == NULL) {
        fprintf(stderr, "kafka: give --bootstrap and/or --mockkafka\n");
        exit(2);
    }
}

int main(int argc, char **argv)
{
    opts_t o;
    char err[512];
    parse_args(argc, argv, &o);
    g_opts = &o;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    /* Under $TMPDIR when set: bench/run.sh points it into the step's own
     * directory, which its trap removes even when a signal ends us here. */
    const char *tmp = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/tallyd-bench-kafka-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(tmpdir) == NULL)
        die("mkdtemp: %s", strerror(errno));
    atexit(cleanup);

    tly_config_t *cfg = NULL;
    if (tly_config_load(DEMO_CONFIG, &cfg, err, sizeof err) != TLY_OK)
        die("%s (run from the repository root)", err);
    gen_t g;
    rng_seed(&g.r, (uint64_t)cfg->demo.seed);
    g.users = (uint64_t)cfg->demo.users;
    g.pins = (uint64_t)cfg->demo.pins;
    zipf_init(&g.zu, g.users, USER_ZIPF_S);
    zipf_init(&g.zp, g.pins, PIN_ZIPF_S);
    tly_config_free(cfg);

    printf("tallyd Kafka benchmark: ingest end to end, freshness, a Redis loader\n");
    print_machine();
    stream_t sm;
    stream_generate(&sm, &g, o.nevents);
    printf("stream: %zu events (%.1f bytes each on average), %" PRIu64 " users, %" PRIu64
           " pins (config/demo.yaml)\n",
           sm.n, (double)sm.bytes / (double)sm.n, g.users, g.pins);

    char topic[96];
    result_t real[ROW__COUNT] = {0}, mock[ROW__COUNT] = {0};
    int bad_total = 0, bad;
    if (o.bootstrap && o.only[0]) {
        snprintf(topic, sizeof topic, "bench-ingest-%d-%" PRId64, (int)getpid(), wall_ms());
        fprintf(stderr, "real broker %s: preloading %zu events into %s (%d partitions)\n",
                o.bootstrap, sm.n, topic, o.partitions);
        preload_real(&o, &sm, topic);
        run_rows(&o, o.bootstrap, topic, o.partitions, &sm, "real", real, &bad_total);
        if (o.redis_port) {
            fprintf(stderr, "  redis loader\n");
            run_loader(&o, o.bootstrap, topic, o.partitions, &sm, &real[ROW_REDIS], &bad);
            bad_total += bad;
        }
        if (o.tuned != NULL) {
            run_prop = o.tuned;
            fprintf(stderr, "  bare consumer, %s\n", o.tuned);
            run_bare(o.bootstrap, topic, o.partitions, sm.n, &real[ROW_BARE_T]);
            fprintf(stderr, "  tallyd, %s\n", o.tuned);
            run_tallyd(&o, o.bootstrap, topic, &sm, "tallyd-real-tuned", &real[ROW_TALLYD_T], &bad);
            bad_total += bad;
            run_prop = NULL;
        }
    }
    if (o.mockkafka && o.only[1]) {
        mock_t m = {0};
        snprintf(topic, sizeof topic, "bench-ingest");
        fprintf(stderr, "mock cluster: %zu events into %s (%d partitions) via %s\n", sm.n, topic,
                o.mock_partitions, o.mockkafka);
        mock_start(&o, &sm, topic, &m);
        run_rows(&o, m.bootstrap, topic, o.mock_partitions, &sm, "mock", mock, &bad_total);
        if (o.redis_port) {
            fprintf(stderr, "  redis loader\n");
            run_loader(&o, m.bootstrap, topic, o.mock_partitions, &sm, &mock[ROW_REDIS], &bad);
            bad_total += bad;
        }
        mock_stop(&m);
    }
    fresh_t fr = {0};
    if (o.bootstrap && o.only[2]) {
        snprintf(topic, sizeof topic, "bench-fresh-%d-%" PRId64, (int)getpid(), wall_ms());
        fprintf(stderr, "freshness: %.0f events/s for %.0f + %.0f s into %s\n", o.rate, o.warmup_s,
                o.duration_s, topic);
        run_fresh(&o, &g, topic, &fr);
    }

    printf("\n## ingest: events/s from the first event seen to the N-th (preloaded topic)\n\n");
    printf("| %-11s | %-33s | %9s | %10s | %7s | %8s | %-17s | %4s |\n", "cluster", "consumer", "N",
           "events/s", "vs bare", "start→N s", "cpu", "busy");
    printf("| ----------- | --------------------------------- | --------: | ---------: | ------: "
           "| -------: | ----------------- | ---: |\n");
    char label[64];
    snprintf(label, sizeof label, "real (%dp)", o.partitions);
    print_rows(label, real);
    snprintf(label, sizeof label, "mock (%dp)", o.mock_partitions);
    print_rows(label, mock);
    printf("start→N: consumer created / tallyd spawned until the N-th event. cpu: CPU-seconds "
           "per wall second of\nthe consuming process over start→N (the bare consumer and the "
           "loader run in this process).\nbusy: CPUs the whole machine kept busy over start→N "
           "(the consumer, the broker or mock, redis, and\nany other process; %ld CPUs).\n",
           sysconf(_SC_NPROCESSORS_ONLN));
    if (o.reps > 1)
        printf("each bare and tallyd row: the fastest of %d runs, taken in turn; every run's "
               "events/s:\n",
               o.reps);
    for (int i = 0; i < ROW__COUNT; i++) {
        if (real[i].done && real[i].runs[0] && o.reps > 1)
            printf("  real, %s: %s\n", row_names[i], real[i].runs);
        if (mock[i].done && mock[i].runs[0] && o.reps > 1)
            printf("  mock, %s: %s\n", row_names[i], mock[i].runs);
    }
    for (int i = 0; i < ROW__COUNT; i++) {
        if (real[i].done && real[i].note[0])
            printf("  real, %s: %s\n", row_names[i], real[i].note);
        if (mock[i].done && mock[i].note[0])
            printf("  mock, %s: %s\n", row_names[i], mock[i].note);
    }
    printf("check: clicks:7d of %d users (10 top clickers, 10 spread) against the generator: %s\n",
           sm.ncheck, bad_total ? "MISMATCH (see notes)" : "ok in every tallyd and redis run");
    const char *cl[2] = {"real broker", "mock cluster"};
    const result_t *rs[2] = {real, mock};
    if (real[ROW_BARE_T].done)
        printf("tuned: %s for every consumer (bare, and tallyd through kafka.properties)\n",
               o.tuned);
    for (int k = 0; k < 2; k++)
        for (int t = 0; t < 2; t++) {
            int b = t ? ROW_BARE_T : ROW_BARE, y = t ? ROW_TALLYD_T : ROW_TALLYD;
            if (!rs[k][b].done || !rs[k][y].done)
                continue;
            double ratio = res_rate(&rs[k][y]) / res_rate(&rs[k][b]);
            printf("target (%s%s): tallyd >= 0.8x the bare consumer: %.2fx, %s\n", cl[k],
                   t ? ", tuned" : ", tallyd's fetch settings", ratio,
                   ratio >= 0.8 ? "MET" : "NOT MET");
        }
    if (fr.done) {
        printf("\n## freshness: produce call → visible in RECENT, real broker, %d partitions\n\n",
               o.partitions);
        printf("producer: linger.ms=%d, acks=all, no compression; %.0f events/s asked, %.0f "
               "achieved over %.1f s (after %.0f s of warm-up)\n",
               o.linger_ms, o.rate, fr.achieved_rate, fr.wall_s, o.warmup_s);
        printf("sampled 1 in %d: %zu samples, %zu visible; poller: %zu rounds, %zu RECENT "
               "requests, %d µs between rounds\n",
               o.sample, fr.samples, fr.visible, fr.rounds, fr.requests, o.poll_us);
        printf("\n| latency | p50 ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: |\n");
        printf("| produce call → visible in RECENT | %.2f | %.2f | %.2f |\n", fr.vis_ms[0],
               fr.vis_ms[1], fr.vis_ms[2]);
        printf("| produce call → broker ack (delivery report) | %.2f | %.2f | %.2f |\n",
               fr.ack_ms[0], fr.ack_ms[1], fr.ack_ms[2]);
        printf("| broker ack → visible (same sample; negative: seen before the report was served) "
               "| %.2f | %.2f | %.2f |\n",
               fr.ackvis_ms[0], fr.ackvis_ms[1], fr.ackvis_ms[2]);
        printf("cpu during the timed part: this process (producer + poller) %.2f, tallyd %.2f\n",
               fr.bench_cpu, fr.tallyd_cpu);
        printf("samples over 20 ms (or never visible): %zu; by second of the timed part:", fr.over);
        for (int k = 0; k < fr.nsec; k++)
            printf(" %zu", fr.over_by_s[k]);
        printf("\n");
        bool met = fr.visible == fr.samples && fr.vis_ms[1] <= 20.0;
        printf("target: freshness p99 <= 20 ms: %.2f ms%s, %s\n", fr.vis_ms[1],
               fr.visible == fr.samples ? "" : " (some samples never became visible)",
               met ? "MET" : "NOT MET");
        if (fr.visible != fr.samples)
            bad_total++;
    }
    free(g.zu.cdf);
    free(g.zp.cdf);
    free(sm.arena);
    free(sm.off);
    free(sm.len);
    free(sm.user);
    free(sm.gt_clicks);
    return bad_total ? 1 : 0;
}
