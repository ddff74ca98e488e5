/*
 * mockkafka.c — a Kafka cluster for the integration tests: librdkafka's
 * mock cluster (a real Kafka-protocol server on loopback, 3 brokers with
 * ids 1..3) living in this process, with one topic filled from an events
 * file, optionally a steady stream of more events, and a control channel on
 * stdin that injects faults while a consumer reads.
 *
 * Usage: mockkafka [--rate N --stream STREAM_FILE] TOPIC PARTITIONS EVENTS_FILE
 *   EVENTS_FILE and STREAM_FILE lines are "<key>\t<json payload>"; each is
 *   produced with that key, partitioned with murmur2_random (what Java
 *   producers do), in file order (idempotent producer: the order of one
 *   key's events is kept, and a retried batch is never written twice — a
 *   plain producer would write duplicates under injected errors, and no
 *   consumer could tell them from real events).
 *   EVENTS_FILE is produced at once; STREAM_FILE, after the `start` command,
 *   at N events per second (evenly paced in ticks of a few milliseconds).
 * Stdout: "BOOTSTRAP <servers>" once the cluster is up, "PRODUCED <n>" once
 * every delivery report of EVENTS_FILE arrived and the cluster holds all n
 * messages. The process then keeps the cluster alive until stdin reaches
 * EOF, the `quit` command or SIGTERM / SIGINT, and exits 0. Any error while
 * setting up: a message on stderr, exit 2.
 *
 * Commands (stdin, one per line, executed in order; each answered by a line
 * "OK <command as given>" or "ERR <why>", after its result lines if any):
 *   start                          begin producing STREAM_FILE at the rate
 *   broker-down <id>               disconnect a broker, refuse connections
 *                                  (-1: all brokers)
 *   broker-up <id>                 accept connections again (-1: all)
 *   fetch-errors <n> <err> [<id>]  the next n Fetch requests fail with err
 *                                  (a name such as NOT_LEADER_OR_FOLLOWER,
 *                                  UNKNOWN_TOPIC_OR_PART, REQUEST_TIMED_OUT,
 *                                  _TRANSPORT, or a number); with <id>, those
 *                                  sent to that broker only
 *   fetch-errors-left <id>         "LEFT <n>": errors still on that broker's
 *                                  Fetch stack (the cluster-wide stack cannot
 *                                  be counted)
 *   request-errors <api> <n> <err> [<id>]
 *                                  the same for any request type (a name such
 *                                  as Heartbeat or OffsetCommit, or an
 *                                  ApiKey); err NO_ERROR makes a marker: the
 *                                  request that takes it is served normally,
 *                                  and errors-left shows it arrived
 *   errors-left <id> [<api>]       "LEFT <n>" of that broker's stack for api
 *                                  (default Fetch)
 *   coordinator <group> <id>       move the group's coordinator
 *   leader <partition> <id>        move a partition's leader (-1: none)
 *                                  (broker-down and leader drain the
 *                                  producer first, see below)
 *   follower <partition> <id>      set a partition's preferred read replica
 *   progress                       "PROGRESS sent=<n> delivered=<n>
 *                                  failed=<n> total=<n>" (seed included)
 *   wait-produced                  waits until every stream event was sent and
 *                                  every delivery report arrived, checks the
 *                                  cluster holds exactly those messages, then
 *                                  "PRODUCED <n>" (seed + stream)
 *   quit                           stop and exit 0
 * The mock changes its state synchronously: once "OK" is printed, the
 * cluster behaves the new way for every later request.
 *
 * Limits of librdkafka 2.0.2's mock that the tests must respect: a
 * partition keeps at most 5 MiB or 100,000 message batches (older data is
 * dropped silently, hence the low-watermark check), a new group's first join
 * waits 3 s, and there are no admin APIs (a failed admin call can hang
 * rd_kafka_destroy), so none are used here. And it does not check an
 * idempotent producer's sequence numbers: when a leader moves, 2.0.2's
 * producer can send a partition's next batch to the new leader while an
 * earlier one is still being retried at the old leader; the mock appends
 * the later batch, the producer takes that as proof the earlier one was
 * written ("implicitly acked") and reports it delivered — lost (seen in
 * about 1 run in 7 with the leaders moved mid-stream). So broker-down and
 * leader first wait until every message sent so far is delivered (no
 * Produce request in flight), leader then refreshes the producer's
 * metadata so its next batches go to the new leader, and the stream's
 * schedule shifts by that pause (a few milliseconds; the consumer still
 * sees the change mid-stream). wait-produced checks the cluster holds
 * exactly what was reported delivered, and says per partition where not.
 *
 * Threads: main, plus librdkafka's internal threads. The main thread paces
 * the stream, serves delivery reports and reads commands, between poll(2)
 * waits on stdin of a few milliseconds. The signal handler only sets a flag
 * that the main loop polls.
 *
 * Invariants: an event is either delivered or reported (setting up: the
 * run fails; wait-produced: ERR); events are produced in file order.
 */
#include <errno.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MOCK_BROKERS     3
#define MAX_LINE         (1 << 20)
#define MAX_CMD          4096
#define FLUSH_TIMEOUT_MS 120000
#define QUERY_TIMEOUT_MS 10000
#define TICK_MS          2   /* stream pacing and command latency */
#define IDLE_MS          200 /* stdin wait when there is nothing to pace */
#define FETCH_API_KEY    1   /* Kafka protocol ApiKey of FetchRequest */
#define MAX_ERRORS       100000
#define DRAIN_TIMEOUT_MS 30000

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("mockkafka: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (p == NULL)
        die("out of memory (%zu bytes)", n);
    return p;
}

static void conf_set(rd_kafka_conf_t *conf, const char *key, const char *value)
{
    char err[256];
    if (rd_kafka_conf_set(conf, key, value, err, sizeof err) != RD_KAFKA_CONF_OK)
        die("librdkafka config %s=%s: %s", key, value, err);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#define MAX_PARTS 1024

typedef struct {
    size_t delivered;
    size_t failed;
    char first_error[256]; /* the first failed delivery's reason */
    /* per partition: deliveries and the next offset after the newest one,
     * to say where the cluster and the reports disagree */
    size_t part_delivered[MAX_PARTS];
    int64_t part_end[MAX_PARTS];
} delivery_t;

static void delivery_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    delivery_t *dl = opaque;
    if (m->err) {
        if (dl->failed == 0)
            snprintf(dl->first_error, sizeof dl->first_error, "%s", rd_kafka_err2str(m->err));
        if (dl->failed++ < 3)
            fprintf(stderr, "mockkafka: delivery failed: %s\n", rd_kafka_err2str(m->err));
    } else {
        dl->delivered++;
        if (m->partition >= 0 && m->partition < MAX_PARTS) {
            dl->part_delivered[m->partition]++;
            if (m->offset + 1 > dl->part_end[m->partition])
                dl->part_end[m->partition] = m->offset + 1;
        }
    }
}

/* One event of a file: key and payload point into a line the array owns. */
typedef struct {
    char *line; /* owned; "key\0payload" */
    size_t klen, plen;
} record_t;

typedef struct {
    record_t *items;
    size_t n, cap;
} records_t;

/* Reads every non-empty line of path into out (appended). */
static void read_records(const char *path, records_t *out)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        die("cannot open %s: %s", path, strerror(errno));
    char *line = xmalloc(MAX_LINE);
    size_t lineno = 0;
    while (fgets(line, MAX_LINE, f) != NULL) {
        lineno++;
        size_t len = strlen(line);
        if (len > 0 && line[len - 1] == '\n')
            line[--len] = '\0';
        else if (!feof(f))
            die("%s:%zu: line longer than %d bytes", path, lineno, MAX_LINE - 1);
        if (len == 0)
            continue;
        char *tab = memchr(line, '\t', len);
        if (tab == NULL)
            die("%s:%zu: no tab between key and payload", path, lineno);
        if (out->n == out->cap) {
            out->cap = out->cap ? 2 * out->cap : 4096;
            out->items = realloc(out->items, out->cap * sizeof *out->items);
            if (out->items == NULL)
                die("out of memory reading %s", path);
        }
        record_t *r = &out->items[out->n++];
        r->klen = (size_t)(tab - line);
        r->plen = len - r->klen - 1;
        r->line = xmalloc(len + 1);
        memcpy(r->line, line, len + 1);
        r->line[r->klen] = '\0';
    }
    if (ferror(f))
        die("reading %s: %s", path, strerror(errno));
    fclose(f);
    free(line);
}

static void free_records(records_t *rs)
{
    for (size_t i = 0; i < rs->n; i++)
        free(rs->items[i].line);
    free(rs->items);
    rs->items = NULL;
    rs->n = rs->cap = 0;
}

/* Enqueues one record. Returns false when the local queue is full (retry
 * after serving delivery reports); any other failure is fatal. */
static bool produce_one(rd_kafka_t *rk, const char *topic, const record_t *r)
{
    rd_kafka_resp_err_t e =
        rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(r->line, r->klen),
                          RD_KAFKA_V_VALUE(r->line + r->klen + 1, r->plen),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
    if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
        return true;
    if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
        die("produce: %s", rd_kafka_err2str(e));
    return false;
}

/* Produces every record at once; returns the number of messages. */
static size_t produce_all(rd_kafka_t *rk, const char *topic, const records_t *rs)
{
    for (size_t i = 0; i < rs->n; i++) {
        while (!produce_one(rk, topic, &rs->items[i]))
            rd_kafka_poll(rk, 10); /* the queue drains as deliveries complete */
        rd_kafka_poll(rk, 0);
    }
    return rs->n;
}

/* Checks that the cluster holds exactly n messages from offset 0 on.
 * Returns NULL, or why not (a static buffer). */
static const char *check_watermarks(rd_kafka_t *rk, const char *topic, int nparts, size_t n,
                                    const delivery_t *dl)
{
    static char why[8192];
    int64_t total = 0;
    int64_t his[MAX_PARTS];
    for (int p = 0; p < nparts; p++) {
        int64_t lo, hi;
        rd_kafka_resp_err_t e =
            rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, QUERY_TIMEOUT_MS);
        /* A leader moved since the producer last asked: refresh, retry. */
        for (int attempt = 0; attempt < 20 && (e == RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION ||
                                               e == RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE);
             attempt++) {
            const struct rd_kafka_metadata *md = NULL;
            if (rd_kafka_metadata(rk, 1, NULL, &md, QUERY_TIMEOUT_MS) == RD_KAFKA_RESP_ERR_NO_ERROR)
                rd_kafka_metadata_destroy(md);
            rd_kafka_poll(rk, 100);
            e = rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, QUERY_TIMEOUT_MS);
        }
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            snprintf(why, sizeof why, "watermarks of %s/%d: %s", topic, p, rd_kafka_err2str(e));
            return why;
        }
        if (lo != 0) {
            snprintf(why, sizeof why,
                     "the mock cluster dropped the first %" PRId64
                     " messages of %s/%d (it keeps 5 MiB or 100,000 batches per partition)",
                     lo, topic, p);
            return why;
        }
        total += hi;
        his[p] = hi;
    }
    if (total != (int64_t)n) {
        int used = snprintf(why, sizeof why,
                            "the cluster holds %" PRId64 " messages, produced %zu; per partition "
                            "high watermark/deliveries/offset after the newest delivery:",
                            total, n);
        for (int p = 0; p < nparts && used >= 0 && (size_t)used < sizeof why; p++)
            used += snprintf(why + used, sizeof why - (size_t)used, " %d:%" PRId64 "/%zu/%" PRId64,
                             p, his[p], dl->part_delivered[p], dl->part_end[p]);
        return why;
    }
    return NULL;
}

/* ---- control ------------------------------------------------------------- */

typedef struct {
    rd_kafka_mock_cluster_t *mc;
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt; /* the topic, for metadata refreshes */
    const char *topic;
    int nparts;
    delivery_t *dl;
    size_t seeded; /* messages of EVENTS_FILE */
    records_t stream;
    long rate;            /* stream events per second */
    bool streaming;       /* `start` was given */
    int64_t start_ms;     /* monotonic time of `start` */
    size_t sent;          /* stream records enqueued */
    bool waiting;         /* wait-produced pending */
    char waiting_cmd[64]; /* its text, for the OK line */
    bool quit;
    bool down[MOCK_BROKERS + 1]; /* brokers set down, by id */
} ctl_t;

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* Waits until every message enqueued so far has its delivery report, so
 * that no Produce request is in flight when the cluster changes under the
 * producer (see the file comment). Does nothing while a broker is down:
 * its partitions' messages wait for it, and nothing is in flight to it.
 * Returns false if the reports did not arrive in time. */
static bool drain(ctl_t *ctl)
{
    for (int b = 1; b <= MOCK_BROKERS; b++)
        if (ctl->down[b])
            return true;
    int64_t t = mono_ms();
    size_t want = ctl->seeded + ctl->sent;
    while (ctl->dl->delivered + ctl->dl->failed < want) {
        if (mono_ms() - t > DRAIN_TIMEOUT_MS)
            return false;
        rd_kafka_poll(ctl->rk, 5);
    }
    return true;
}

/* Pacing stood still since paused_at (a command drained the producer):
 * shift the stream's schedule by the pause, so the rate stays steady
 * instead of bursting to catch up. */
static void resume_stream(ctl_t *ctl, int64_t paused_at)
{
    if (ctl->streaming)
        ctl->start_ms += mono_ms() - paused_at;
}

/* Refreshes the producer's metadata of the topic, so its next batches go
 * to the partitions' new leaders rather than to the old ones (see the file
 * comment). */
static rd_kafka_resp_err_t refresh_metadata(ctl_t *ctl)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t err = rd_kafka_metadata(ctl->rk, 0, ctl->rkt, &md, QUERY_TIMEOUT_MS);
    if (md != NULL)
        rd_kafka_metadata_destroy(md);
    return err;
}

/* Parses a whole decimal integer in [lo, hi]. */
static bool parse_long(const char *s, long lo, long hi, long *out)
{
    if (s == NULL || *s == '\0')
        return false;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

/* An error code from its name as rd_kafka_err2name spells it (with or
 * without a leading "ERR_"), the protocol's newer name for a renamed code,
 * or a number. */
static bool parse_error(const char *s, rd_kafka_resp_err_t *out)
{
    static const struct {
        const char *alias;
        rd_kafka_resp_err_t code;
    } aliases[] = {
        {"NOT_LEADER_OR_FOLLOWER", RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION},
        {"UNKNOWN_TOPIC_OR_PARTITION", RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART},
    };
    long num;
    if (parse_long(s, -200, 1000, &num)) {
        *out = (rd_kafka_resp_err_t)num;
        return true;
    }
    if (strncmp(s, "ERR_", 4) == 0)
        s += 4;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++) {
        if (strcmp(s, aliases[i].alias) == 0) {
            *out = aliases[i].code;
            return true;
        }
    }
    const struct rd_kafka_err_desc *descs;
    size_t n;
    rd_kafka_get_err_descs(&descs, &n);
    for (size_t i = 0; i < n; i++) {
        if (descs[i].name != NULL && strcmp(descs[i].name, s) == 0) {
            *out = descs[i].code;
            return true;
        }
    }
    return false;
}

/* The Kafka protocol ApiKey from a request's name (as the protocol guide
 * spells it) or a number. */
static bool parse_api(const char *s, int16_t *out)
{
    static const struct {
        const char *name;
        int16_t key;
    } apis[] = {
        {"Produce", 0},         {"Fetch", 1},       {"ListOffsets", 2},      {"Metadata", 3},
        {"OffsetCommit", 8},    {"OffsetFetch", 9}, {"FindCoordinator", 10}, {"JoinGroup", 11},
        {"Heartbeat", 12},      {"LeaveGroup", 13}, {"SyncGroup", 14},       {"ApiVersions", 18},
        {"InitProducerId", 22},
    };
    long v;
    if (parse_long(s, 0, 100, &v)) {
        *out = (int16_t)v;
        return true;
    }
    for (size_t i = 0; i < sizeof apis / sizeof apis[0]; i++) {
        if (strcmp(s, apis[i].name) == 0) {
            *out = apis[i].key;
            return true;
        }
    }
    return false;
}

/* Pushes count_s errors err_s on api's stack: broker_s's, or the
 * cluster's when NULL. Replies ERR and returns false on bad arguments or
 * a refusal. */
static bool push_errors(ctl_t *ctl, const char *cmd, int16_t api, const char *count_s,
                        const char *err_s, const char *broker_s)
{
    long count, broker = -1;
    rd_kafka_resp_err_t code, err = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (!parse_long(count_s, 1, MAX_ERRORS, &count)) {
        reply("ERR %s: count must be 1..%d, not '%s'", cmd, MAX_ERRORS, count_s);
        return false;
    }
    if (!parse_error(err_s, &code)) {
        reply("ERR %s: unknown error name '%s'", cmd, err_s);
        return false;
    }
    if (broker_s != NULL && !parse_long(broker_s, 1, MOCK_BROKERS, &broker)) {
        reply("ERR %s: broker id must be 1..%d, not '%s'", cmd, MOCK_BROKERS, broker_s);
        return false;
    }
    if (broker_s != NULL) {
        /* The broker stack takes (error, rtt) pairs; one at a time keeps
         * the varargs fixed. */
        for (long i = 0; i < count && err == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
            err = rd_kafka_mock_broker_push_request_error_rtts(ctl->mc, (int32_t)broker, api, 1,
                                                               code, 0);
    } else {
        rd_kafka_resp_err_t *codes = xmalloc((size_t)count * sizeof *codes);
        for (long i = 0; i < count; i++)
            codes[i] = code;
        rd_kafka_mock_push_request_errors_array(ctl->mc, api, (size_t)count, codes);
        free(codes);
    }
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        reply("ERR %s: %s", cmd, rd_kafka_err2str(err));
        return false;
    }
    return true;
}

/* Splits line into at most cap words (in place); returns the count, or
 * cap + 1 when there are more. */
static int split_words(char *line, char **words, int cap)
{
    int n = 0;
    char *save = NULL;
    for (char *w = strtok_r(line, " \t\r", &save); w != NULL; w = strtok_r(NULL, " \t\r", &save)) {
        if (n == cap)
            return cap + 1;
        words[n++] = w;
    }
    return n;
}

/* Executes one command line; the reply is printed here, except for
 * wait-produced, which sets ctl->waiting and is answered by the loop. */
static void run_command(ctl_t *ctl, const char *text)
{
    char buf[MAX_CMD];
    size_t len = strnlen(text, sizeof buf - 1);
    memcpy(buf, text, len);
    buf[len] = '\0';
    char *w[6];
    int n = split_words(buf, w, 5);
    if (n == 0)
        return; /* blank line */
    const char *cmd = w[0];
    long a, b;
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;

    if (strcmp(cmd, "start") == 0 && n == 1) {
        if (ctl->rate == 0) {
            reply("ERR start: no --stream file was given");
            return;
        }
        if (ctl->streaming) {
            reply("ERR start: the stream was started before");
            return;
        }
        ctl->streaming = true;
        ctl->start_ms = mono_ms();
    } else if ((strcmp(cmd, "broker-down") == 0 || strcmp(cmd, "broker-up") == 0) && n == 2) {
        if (!parse_long(w[1], -1, MOCK_BROKERS, &a) || a == 0) {
            reply("ERR %s: broker id must be 1..%d or -1 (all), not '%s'", cmd, MOCK_BROKERS, w[1]);
            return;
        }
        bool down = strcmp(cmd, "broker-down") == 0;
        int64_t paused_at = mono_ms();
        if (down && !drain(ctl)) {
            reply("ERR %s: the producer did not drain within %d ms", cmd, DRAIN_TIMEOUT_MS);
            return;
        }
        err = down ? rd_kafka_mock_broker_set_down(ctl->mc, (int32_t)a)
                   : rd_kafka_mock_broker_set_up(ctl->mc, (int32_t)a);
        resume_stream(ctl, paused_at);
        for (int i = 1; i <= MOCK_BROKERS && err == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
            if (a == -1 || a == i)
                ctl->down[i] = down;
    } else if (strcmp(cmd, "fetch-errors") == 0 && (n == 3 || n == 4)) {
        if (!push_errors(ctl, cmd, FETCH_API_KEY, w[1], w[2], n == 4 ? w[3] : NULL))
            return;
    } else if (strcmp(cmd, "request-errors") == 0 && (n == 4 || n == 5)) {
        int16_t api;
        if (!parse_api(w[1], &api)) {
            reply("ERR %s: unknown API '%s'", cmd, w[1]);
            return;
        }
        if (!push_errors(ctl, cmd, api, w[2], w[3], n == 5 ? w[4] : NULL))
            return;
    } else if ((strcmp(cmd, "fetch-errors-left") == 0 && n == 2) ||
               (strcmp(cmd, "errors-left") == 0 && (n == 2 || n == 3))) {
        size_t left = 0;
        int16_t api = FETCH_API_KEY;
        if (!parse_long(w[1], 1, MOCK_BROKERS, &a)) {
            reply("ERR %s: broker id must be 1..%d, not '%s'", cmd, MOCK_BROKERS, w[1]);
            return;
        }
        if (n == 3 && !parse_api(w[2], &api)) {
            reply("ERR %s: unknown API '%s'", cmd, w[2]);
            return;
        }
        err = rd_kafka_mock_broker_error_stack_cnt(ctl->mc, (int32_t)a, api, &left);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
            reply("LEFT %zu", left);
    } else if (strcmp(cmd, "coordinator") == 0 && n == 3) {
        if (!parse_long(w[2], 1, MOCK_BROKERS, &b)) {
            reply("ERR coordinator: broker id must be 1..%d, not '%s'", MOCK_BROKERS, w[2]);
            return;
        }
        err = rd_kafka_mock_coordinator_set(ctl->mc, "group", w[1], (int32_t)b);
    } else if ((strcmp(cmd, "leader") == 0 || strcmp(cmd, "follower") == 0) && n == 3) {
        if (!parse_long(w[1], 0, ctl->nparts - 1, &a)) {
            reply("ERR %s: partition must be 0..%d, not '%s'", cmd, ctl->nparts - 1, w[1]);
            return;
        }
        if (!parse_long(w[2], -1, MOCK_BROKERS, &b) || b == 0) {
            reply("ERR %s: broker id must be 1..%d or -1 (none), not '%s'", cmd, MOCK_BROKERS,
                  w[2]);
            return;
        }
        bool leader = strcmp(cmd, "leader") == 0;
        int64_t paused_at = mono_ms();
        if (!drain(ctl)) {
            reply("ERR %s: the producer did not drain within %d ms", cmd, DRAIN_TIMEOUT_MS);
            return;
        }
        err =
            leader
                ? rd_kafka_mock_partition_set_leader(ctl->mc, ctl->topic, (int32_t)a, (int32_t)b)
                : rd_kafka_mock_partition_set_follower(ctl->mc, ctl->topic, (int32_t)a, (int32_t)b);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR && leader && b != -1)
            err = refresh_metadata(ctl);
        resume_stream(ctl, paused_at);
    } else if (strcmp(cmd, "progress") == 0 && n == 1) {
        reply("PROGRESS sent=%zu delivered=%zu failed=%zu total=%zu", ctl->seeded + ctl->sent,
              ctl->dl->delivered, ctl->dl->failed, ctl->seeded + ctl->stream.n);
    } else if (strcmp(cmd, "wait-produced") == 0 && n == 1) {
        ctl->waiting = true;
        snprintf(ctl->waiting_cmd, sizeof ctl->waiting_cmd, "%s", cmd);
        return; /* answered by the loop */
    } else if (strcmp(cmd, "quit") == 0 && n == 1) {
        ctl->quit = true;
    } else {
        reply("ERR unknown command or wrong arguments: '%.200s'", text);
        return;
    }
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        reply("ERR %s: %s", cmd, rd_kafka_err2str(err));
        return;
    }
    reply("OK %s", text);
}

/* Enqueues the stream records due by now at the configured rate. */
static void pace_stream(ctl_t *ctl)
{
    if (!ctl->streaming || ctl->sent == ctl->stream.n)
        return;
    int64_t elapsed = mono_ms() - ctl->start_ms;
    size_t due = (size_t)((double)elapsed * (double)ctl->rate / 1000.0) + 1;
    if (due > ctl->stream.n)
        due = ctl->stream.n;
    while (ctl->sent < due && produce_one(ctl->rk, ctl->topic, &ctl->stream.items[ctl->sent]))
        ctl->sent++;
}

/* Answers a pending wait-produced once everything is delivered. */
static void finish_wait(ctl_t *ctl)
{
    size_t total = ctl->seeded + ctl->stream.n;
    if (!ctl->waiting)
        return;
    if (ctl->rate > 0 && !ctl->streaming) {
        ctl->waiting = false;
        reply("ERR wait-produced: the stream was not started");
        return;
    }
    if (ctl->sent < ctl->stream.n || ctl->dl->delivered + ctl->dl->failed < total)
        return;
    ctl->waiting = false;
    if (ctl->dl->failed > 0) {
        reply("ERR wait-produced: %zu of %zu messages failed delivery (first: %s)", ctl->dl->failed,
              total, ctl->dl->first_error);
        return;
    }
    const char *why = check_watermarks(ctl->rk, ctl->topic, ctl->nparts, total, ctl->dl);
    if (why != NULL) {
        reply("ERR wait-produced: %s", why);
        return;
    }
    reply("PRODUCED %zu", total);
    reply("OK %s", ctl->waiting_cmd);
}

/* Serves the stream and the commands until quit, EOF or a signal. */
static void control_loop(ctl_t *ctl)
{
    static char in[MAX_CMD];
    size_t used = 0;
    bool eof = false;
    while (!stop_requested && !ctl->quit) {
        pace_stream(ctl);
        rd_kafka_poll(ctl->rk, 0);
        finish_wait(ctl);
        /* Commands run one after another: a pending wait holds the rest. */
        while (!ctl->waiting && !ctl->quit) {
            char *nl = memchr(in, '\n', used);
            if (nl == NULL)
                break;
            *nl = '\0';
            run_command(ctl, in);
            size_t rest = used - (size_t)(nl + 1 - in);
            memmove(in, nl + 1, rest);
            used = rest;
        }
        if (ctl->quit || (eof && !ctl->waiting))
            break;
        if (used == sizeof in) {
            reply("ERR command line longer than %zu bytes", sizeof in - 1);
            used = 0;
        }
        bool busy = (ctl->streaming && ctl->sent < ctl->stream.n) || ctl->waiting;
        struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
        int r = poll(&pfd, eof ? 0 : 1, busy ? TICK_MS : IDLE_MS);
        if (r < 0 && errno != EINTR)
            die("poll: %s", strerror(errno));
        if (r > 0) {
            ssize_t got = read(STDIN_FILENO, in + used, sizeof in - used);
            if (got > 0)
                used += (size_t)got;
            else if (got == 0 || (errno != EINTR && errno != EAGAIN))
                eof = true; /* the test is gone; finish what it asked */
        }
        if (eof && !ctl->waiting)
            break;
    }
}

static void usage(void) __attribute__((noreturn));
static void usage(void)
{
    fprintf(stderr,
            "usage: mockkafka [--rate N --stream STREAM_FILE] TOPIC PARTITIONS EVENTS_FILE\n");
    exit(2);
}

int main(int argc, char **argv)
{
    char err[512];
    long rate = 0;
    const char *stream_path = NULL;
    int argi = 1;
    while (argi < argc && strncmp(argv[argi], "--", 2) == 0) {
        if (strcmp(argv[argi], "--rate") == 0 && argi + 1 < argc) {
            if (!parse_long(argv[argi + 1], 1, 10000000, &rate))
                die("--rate must be 1..10000000 events per second, not '%s'", argv[argi + 1]);
        } else if (strcmp(argv[argi], "--stream") == 0 && argi + 1 < argc) {
            stream_path = argv[argi + 1];
        } else {
            usage();
        }
        argi += 2;
    }
    if (argc - argi != 3 || (rate > 0) != (stream_path != NULL))
        usage();
    const char *topic = argv[argi];
    long nparts;
    if (!parse_long(argv[argi + 1], 1, MAX_PARTS, &nparts))
        die("PARTITIONS must be 1..1024, not '%s'", argv[argi + 1]);
    const char *events_path = argv[argi + 2];

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* Read everything before the cluster starts: a bad file fails fast. */
    records_t seed = {0}, stream = {0};
    read_records(events_path, &seed);
    if (stream_path != NULL)
        read_records(stream_path, &stream);

    /* The cluster's host handle: it only carries the mock's threads. */
    rd_kafka_conf_t *hconf = rd_kafka_conf_new();
    conf_set(hconf, "log_level", "3");
    rd_kafka_t *host = rd_kafka_new(RD_KAFKA_PRODUCER, hconf, err, sizeof err);
    if (host == NULL)
        die("cannot create the mock cluster's host: %s", err);
    rd_kafka_mock_cluster_t *mc = rd_kafka_mock_cluster_new(host, MOCK_BROKERS);
    if (mc == NULL)
        die("cannot start librdkafka's mock cluster");
    const char *bootstraps = rd_kafka_mock_cluster_bootstraps(mc);
    if (rd_kafka_mock_topic_create(mc, topic, (int)nparts, 1) != RD_KAFKA_RESP_ERR_NO_ERROR)
        die("cannot create topic %s with %ld partitions", topic, nparts);
    printf("BOOTSTRAP %s\n", bootstraps);
    fflush(stdout);

    static delivery_t dl; /* large; zeroed */
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", bootstraps);
    conf_set(conf, "partitioner", "murmur2_random");
    conf_set(conf, "enable.idempotence", "true");
    conf_set(conf, "linger.ms", "5");
    conf_set(conf, "batch.num.messages", "10000");
    conf_set(conf, "queue.buffering.max.messages", "1000000");
    conf_set(conf, "queue.buffering.max.kbytes", "1048576");
    conf_set(conf, "log.connection.close", "false");
    /* Faults (a broker down for a while) must delay deliveries, not fail
     * them: no message times out within a test's life. */
    conf_set(conf, "message.timeout.ms", "600000");
    rd_kafka_conf_set_opaque(conf, &dl);
    rd_kafka_conf_set_dr_msg_cb(conf, delivery_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL)
        die("cannot create the producer: %s", err);

    size_t n = produce_all(rk, topic, &seed);
    free_records(&seed);
    if (rd_kafka_flush(rk, FLUSH_TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
        die("flush timed out with %d messages undelivered", rd_kafka_outq_len(rk));
    if (dl.failed > 0 || dl.delivered != n)
        die("%zu of %zu messages failed delivery", n - dl.delivered, n);
    const char *why = check_watermarks(rk, topic, (int)nparts, n, &dl);
    if (why != NULL)
        die("%s", why);
    printf("PRODUCED %zu\n", n);
    fflush(stdout);

    /* Keep the cluster up, and take commands, until the test lets go. */
    ctl_t ctl = {.mc = mc,
                 .rk = rk,
                 .rkt = rd_kafka_topic_new(rk, topic, NULL),
                 .topic = topic,
                 .nparts = (int)nparts,
                 .dl = &dl,
                 .seeded = n,
                 .stream = stream,
                 .rate = rate};
    if (ctl.rkt == NULL)
        die("cannot create a handle of topic %s: %s", topic,
            rd_kafka_err2str(rd_kafka_last_error()));
    control_loop(&ctl);
    rd_kafka_topic_destroy(ctl.rkt);
    free_records(&ctl.stream);
    /* Brokers left down would only slow the producer's shutdown. */
    rd_kafka_mock_broker_set_up(mc, -1);
    rd_kafka_destroy(rk);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(host);
    return 0;
}
