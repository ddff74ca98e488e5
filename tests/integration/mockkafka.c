/*
 * mockkafka.c — a Kafka cluster for the integration tests: librdkafka's
 * mock cluster (a real Kafka-protocol server on loopback, 3 brokers) living
 * in this process, with one topic filled from an events file.
 *
 * Usage: mockkafka TOPIC PARTITIONS EVENTS_FILE
 *   EVENTS_FILE lines are "<key>\t<json payload>"; each is produced with that
 *   key, partitioned with murmur2_random (what Java producers do), in file
 *   order (idempotent producer: the order of one key's events is kept).
 * Stdout: "BOOTSTRAP <servers>" once the cluster is up, "PRODUCED <n>" once
 * every delivery report arrived and the cluster holds all n messages. The
 * process then keeps the cluster alive until stdin reaches EOF or SIGTERM /
 * SIGINT arrives, and exits 0. Any error: a message on stderr, exit 2.
 *
 * Threads: main, plus librdkafka's internal threads. The signal handler only
 * sets a flag that the main loop polls between poll(2) waits on stdin.
 *
 * Invariants: an event is either delivered or the run fails; the mock
 * cluster keeps at most 5 MiB per partition and silently drops older data
 * beyond that, so the low watermarks are checked to be 0 after producing.
 */
#include <errno.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MOCK_BROKERS     3
#define MAX_LINE         (1 << 20)
#define FLUSH_TIMEOUT_MS 120000
#define QUERY_TIMEOUT_MS 10000

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

static void conf_set(rd_kafka_conf_t *conf, const char *key, const char *value)
{
    char err[256];
    if (rd_kafka_conf_set(conf, key, value, err, sizeof err) != RD_KAFKA_CONF_OK)
        die("librdkafka config %s=%s: %s", key, value, err);
}

typedef struct {
    size_t delivered;
    size_t failed;
} delivery_t;

static void delivery_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    delivery_t *dl = opaque;
    if (m->err) {
        if (dl->failed++ < 3)
            fprintf(stderr, "mockkafka: delivery failed: %s\n", rd_kafka_err2str(m->err));
    } else {
        dl->delivered++;
    }
}

/* Produces every line of path; returns the number of messages. */
static size_t produce_file(rd_kafka_t *rk, const char *topic, const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        die("cannot open %s: %s", path, strerror(errno));
    char *line = malloc(MAX_LINE);
    if (line == NULL)
        die("out of memory");
    size_t n = 0, lineno = 0;
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
        size_t klen = (size_t)(tab - line);
        const char *payload = tab + 1;
        size_t plen = len - klen - 1;
        for (;;) {
            rd_kafka_resp_err_t e =
                rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(line, klen),
                                  RD_KAFKA_V_VALUE((void *)payload, plen),
                                  RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
            if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
                break;
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                die("%s:%zu: produce: %s", path, lineno, rd_kafka_err2str(e));
            rd_kafka_poll(rk, 10); /* the queue drains as deliveries complete */
        }
        rd_kafka_poll(rk, 0);
        n++;
    }
    if (ferror(f))
        die("reading %s: %s", path, strerror(errno));
    fclose(f);
    free(line);
    return n;
}

/* Checks that the cluster holds exactly n messages from offset 0 on. */
static void check_watermarks(rd_kafka_t *rk, const char *topic, int nparts, size_t n)
{
    int64_t total = 0;
    for (int p = 0; p < nparts; p++) {
        int64_t lo, hi;
        rd_kafka_resp_err_t e =
            rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, QUERY_TIMEOUT_MS);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
            die("watermarks of %s/%d: %s", topic, p, rd_kafka_err2str(e));
        if (lo != 0)
            die("the mock cluster dropped the first %" PRId64
                " messages of %s/%d (it keeps 5 MiB per partition)",
                lo, topic, p);
        total += hi;
    }
    if (total != (int64_t)n)
        die("the cluster holds %" PRId64 " messages, produced %zu", total, n);
}

int main(int argc, char **argv)
{
    char err[512];
    if (argc != 4) {
        fprintf(stderr, "usage: mockkafka TOPIC PARTITIONS EVENTS_FILE\n");
        return 2;
    }
    const char *topic = argv[1];
    char *end;
    long nparts = strtol(argv[2], &end, 10);
    if (*end != '\0' || nparts < 1 || nparts > 1024)
        die("PARTITIONS must be 1..1024, not '%s'", argv[2]);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

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

    delivery_t dl = {0, 0};
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    conf_set(conf, "bootstrap.servers", bootstraps);
    conf_set(conf, "partitioner", "murmur2_random");
    conf_set(conf, "enable.idempotence", "true");
    conf_set(conf, "linger.ms", "5");
    conf_set(conf, "batch.num.messages", "10000");
    conf_set(conf, "queue.buffering.max.messages", "1000000");
    conf_set(conf, "queue.buffering.max.kbytes", "1048576");
    conf_set(conf, "log.connection.close", "false");
    rd_kafka_conf_set_opaque(conf, &dl);
    rd_kafka_conf_set_dr_msg_cb(conf, delivery_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL)
        die("cannot create the producer: %s", err);

    size_t n = produce_file(rk, topic, argv[3]);
    if (rd_kafka_flush(rk, FLUSH_TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
        die("flush timed out with %d messages undelivered", rd_kafka_outq_len(rk));
    if (dl.failed > 0 || dl.delivered != n)
        die("%zu of %zu messages failed delivery", n - dl.delivered, n);
    check_watermarks(rk, topic, (int)nparts, n);
    rd_kafka_destroy(rk);
    printf("PRODUCED %zu\n", n);
    fflush(stdout);

    /* Keep the cluster up until the test lets go of us. */
    while (!stop_requested) {
        struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
        int r = poll(&pfd, 1, 200);
        if (r < 0 && errno != EINTR)
            die("poll: %s", strerror(errno));
        if (r > 0) {
            char buf[256];
            ssize_t got = read(STDIN_FILENO, buf, sizeof buf);
            if (got == 0 || (got < 0 && errno != EINTR && errno != EAGAIN))
                break; /* EOF: the test is gone */
        }
    }
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(host);
    return 0;
}
