/*
 * admin.c — the HTTP admin server (see admin.h): /healthz, /readyz and
 * /metrics in Prometheus text exposition format 0.0.4.
 *
 * Threads. tly_admin_start binds server.admin itself (so a failure names
 * the address and the errno sentence), hands the listening socket to
 * libmicrohttpd and lets MHD's one internal polling thread (epoll) accept
 * connections and run answer() for every request. tly_admin_stop joins
 * that thread. answer() reads only what is safe from any thread: relaxed
 * atomics in d->server, tly_store_stats (atomics), tly_source_ready (one
 * atomic), tly_source_stats (copies the published partition table under a
 * mutex the poll thread takes about once a second, never per message) and
 * tly_shard_stats. So a scrape never holds up ingest or queries, and a
 * stuck scraper holds up only other scrapers: MHD's connection limits (in
 * all, and per client address, so one host cannot take every slot), its
 * idle timeout and the request deadline bound what it can take. MHD's
 * timeout is one of inactivity, which every byte restarts; so a reaper
 * thread shuts down every connection that has not delivered a whole
 * request within ADMIN_DEADLINE_MS of its opening or of its last answer
 * (tallyd_admin_request_timeouts_total): a client that sends a byte every
 * few seconds on every slot its address may hold keeps other clients from
 * that address out for that long at most. Refusals at the per-address
 * limit are counted (tallyd_admin_connections_refused_total); at the limit
 * in all, MHD stops accepting, and new connections wait in the listen
 * backlog until a slot frees.
 *
 * The reaper and MHD's thread share the table of open connections under
 * a mutex: MHD removes a connection from it (MHD_CONNECTION_NOTIFY_CLOSED)
 * before it closes the socket, so the reaper never shuts down a
 * descriptor that was closed and reused.
 *
 * Invariants: every /metrics family is written as "# HELP", "# TYPE", then
 * its samples, each family once; names start with tallyd_; counters end in
 * _total; label values are escaped (backslash, double quote, newline). The
 * body is built in a growable buffer, so any number of partitions fits; MHD
 * frees it after sending.
 */
#include "tallyd/admin.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "tallyd/error.h"
#include "tallyd/log.h"
#include "tallyd/server.h"
#include "tallyd/shard.h"
#include "tallyd/snapshot.h"
#include "tallyd/version.h"

#define ADMIN_MAX_CONNECTIONS 64u /* scrapers and probes; more are refused */
#define ADMIN_PER_IP          8u  /* of them from one address: one host cannot take all */
#define ADMIN_TIMEOUT_S       5u  /* an idle connection is closed */
#define ADMIN_DEADLINE_MS     10000 /* a request must arrive whole within this */
/* An idle kept-alive connection is closed by MHD's idle timeout, uncounted,
 * well before the deadline would cut (and count) it. */
_Static_assert(ADMIN_TIMEOUT_S * 1000 * 2 <= ADMIN_DEADLINE_MS, "idle timeout first");
#define ADMIN_REAP_MS         250   /* how often the reaper looks */
#define ADMIN_BACKLOG         16
#define ADMIN_PARTS_FIRST     64 /* first guess of the partition count */

/* Process-wide (one admin server per daemon): connections refused at the
 * limits, and requests answered 4xx. */
static atomic_uint_fast64_t admin_refused, admin_bad_requests, admin_timeouts;

int64_t tly_admin_deadline_ms = ADMIN_DEADLINE_MS;

/* An open connection: its socket and when its current request began to be
 * due (its opening, or its last answer); fd -1: a free slot. */
typedef struct {
    int fd;
    bool cut; /* shut down by the reaper */
    int64_t since_ms;
} aconn_t;

struct tly_admin {
    tly_daemon_t *d;        /* borrowed */
    struct MHD_Daemon *mhd; /* owns the listening socket */
    int port;               /* bound port */
    atomic_bool starting;   /* MHD's messages during start-up are WARN, later DEBUG */
    pthread_mutex_t mu;     /* conns, stop */
    pthread_cond_t wake;    /* the reaper's sleep, cut short by stop */
    pthread_t reaper;
    bool reaper_started, stop;
    aconn_t conns[ADMIN_MAX_CONNECTIONS + 8]; /* MHD may briefly hold a few more */
};

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- /metrics ----------------------------------------------------------- */

static void put(tly_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(tly_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *w = tly_buf_reserve(b, 128);
    int n = vsnprintf(w, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= b->cap - b->len) { /* did not fit: grow and print again */
        w = tly_buf_reserve(b, (size_t)n + 1);
        va_start(ap, fmt);
        vsnprintf(w, (size_t)n + 1, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
}

/* Appends s as a label value: backslash, double quote and newline escaped
 * as the exposition format requires. */
static void put_label_value(tly_buf_t *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            tly_buf_append(b, "\\\\", 2);
        else if (*s == '"')
            tly_buf_append(b, "\\\"", 2);
        else if (*s == '\n')
            tly_buf_append(b, "\\n", 2);
        else
            tly_buf_append(b, s, 1);
    }
}

/* "# HELP" and "# TYPE" of one family; help texts are constants without
 * backslashes or newlines. */
static void family(tly_buf_t *b, const char *name, const char *type, const char *help)
{
    put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void counter(tly_buf_t *b, const char *name, const char *help, uint64_t v)
{
    family(b, name, "counter", help);
    put(b, "%s %" PRIu64 "\n", name, v);
}

static void gauge(tly_buf_t *b, const char *name, const char *help, int64_t v)
{
    family(b, name, "gauge", help);
    put(b, "%s %" PRId64 "\n", name, v);
}

static uint64_t load(atomic_uint_fast64_t *v)
{
    return atomic_load_explicit(v, memory_order_relaxed);
}

/* A reason label: tly_err_name lower-cased ("ev_bad_json"). */
static void reason_name(tly_err_t e, char *dst, size_t cap)
{
    const char *src = tly_err_name(e);
    size_t i = 0;
    for (; src[i] && i + 1 < cap; i++)
        dst[i] = (src[i] >= 'A' && src[i] <= 'Z') ? (char)(src[i] - 'A' + 'a') : src[i];
    dst[i] = '\0';
}

/* One sample per event rejection reason (every EV_* reason, even at 0, so
 * rate() sees a series from the start), plus any other reason counted. */
static void by_reason(tly_buf_t *b, const char *name, const char *help, const uint64_t *by)
{
    family(b, name, "counter", help);
    for (int e = 0; e < TLY_E__COUNT; e++) {
        if (e < TLY_E_EV_TOO_LARGE && by[e] == 0)
            continue;
        char reason[40];
        reason_name((tly_err_t)e, reason, sizeof reason);
        put(b, "%s{reason=\"%s\"} %" PRIu64 "\n", name, reason, by[e]);
    }
}

/* Why the process does not serve, or NULL when it does: a source exists and
 * its poll thread has stopped (a fatal error, or not started). */
static const char *unhealthy(tly_daemon_t *d, char *why, size_t cap)
{
    if (d->source == NULL)
        return NULL;
    const char *fatal = tly_source_fatal(d->source);
    tly_source_stats_t st;
    tly_source_stats(d->source, &st, NULL, 0);
    if (fatal == NULL && st.running)
        return NULL;
    if (fatal != NULL)
        snprintf(why, cap, "kafka consumer failed: %s", fatal);
    else
        snprintf(why, cap, "kafka consumer is not running");
    for (char *p = why; *p; p++) /* one line */
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    return why;
}

/* Source counters and up to *nparts partitions (malloc'd into *parts; the
 * caller frees). The table is copied again, larger, when a rebalance grew
 * it between two copies; after a few tries what fits is kept. */
static void source_snapshot(tly_source_t *src, tly_source_stats_t *st, tly_partition_stat_t **parts,
                            size_t *nparts)
{
    size_t cap = ADMIN_PARTS_FIRST;
    tly_partition_stat_t *p = NULL;
    for (int tries = 0;; tries++) {
        p = realloc(p, cap * sizeof *p);
        if (p == NULL) {
            fputs("tallyd: out of memory (admin partition table)\n", stderr);
            abort();
        }
        tly_source_stats(src, st, p, cap);
        if (st->npartitions <= cap || tries == 3)
            break;
        cap = st->npartitions + 64;
    }
    *parts = p;
    *nparts = st->npartitions < cap ? st->npartitions : cap;
}

static void metrics_source(tly_daemon_t *d, tly_buf_t *b)
{
    tly_source_stats_t st;
    tly_partition_stat_t *parts = NULL;
    size_t np = 0;
    if (d->source != NULL) {
        source_snapshot(d->source, &st, &parts, &np);
    } else {
        memset(&st, 0, sizeof st);
        st.lag = 0; /* nothing to consume: nothing behind */
        st.watermark_ms = -1;
    }

    gauge(b, "tallyd_kafka_consumer_running", "1 while the Kafka consumer's poll thread runs.",
          st.running ? 1 : 0);
    gauge(b, "tallyd_kafka_partitions_assigned", "Partitions in the current assignment.",
          (int64_t)st.npartitions);
    counter(b, "tallyd_kafka_messages_consumed_total", "Kafka messages consumed.", st.messages);
    counter(b, "tallyd_events_applied_total", "Events decoded and passed to the store.",
            st.applied);
    by_reason(b, "tallyd_events_rejected_total",
              "Events rejected by the decoder, by reason (their offsets are still committed).",
              st.rejected_by);
    counter(b, "tallyd_kafka_consumer_errors_total", "Consumer errors reported by librdkafka.",
            st.errors);
    counter(b, "tallyd_kafka_rebalances_total", "Assignment changes.", st.rebalances);
    counter(b, "tallyd_kafka_offset_resets_total",
            "Offset resets: a partition's position was out of range.", st.gaps);
    counter(b, "tallyd_kafka_offset_reset_skipped_messages_total",
            "Messages offset resets skipped that Kafka had deleted before they were applied.",
            st.gap_messages);
    counter(b, "tallyd_kafka_messages_undecodable_total",
            "Offsets skipped because librdkafka could not decode their message batch.",
            st.undecodable);
    counter(b, "tallyd_kafka_fetch_nudges_total",
            "End-offset requests sent to wake librdkafka's fetcher after its queue was full.",
            st.fetch_nudges);
    counter(b, "tallyd_kafka_fetch_idle_nudges_total",
            "Of those, the ones sent after an empty poll while a partition was behind.",
            st.fetch_idle_nudges);
    counter(b, "tallyd_kafka_batches_alone_total",
            "Batches of messages applied by the poll thread alone (small, or kafka.threads 1).",
            st.batches_alone);
    counter(b, "tallyd_kafka_batches_shared_total",
            "Batches decoded and applied by the poll thread and the apply threads together.",
            st.batches_shared);
    counter(b, "tallyd_kafka_batches_by_partition_total",
            "Batches spread over the appliers by partition.", st.batches_by_partition);
    counter(b, "tallyd_kafka_batches_pipelined_total",
            "Batches decoded by the poll thread and applied by the apply threads while it polled "
            "the next.",
            st.batches_pipelined);

    /* Unknown values (no high watermark yet, no event yet) have no sample
     * rather than a made-up number. */
    family(b, "tallyd_kafka_lag_messages", "gauge",
           "Messages behind the high watermarks, summed over assigned partitions whose lag is "
           "known.");
    if (st.lag >= 0)
        put(b, "tallyd_kafka_lag_messages %" PRId64 "\n", st.lag);
    family(b, "tallyd_kafka_partition_lag_messages", "gauge",
           "Messages behind the high watermark, per assigned partition whose lag is known.");
    for (size_t i = 0; i < np; i++) {
        if (parts[i].lag < 0)
            continue;
        put(b, "tallyd_kafka_partition_lag_messages{topic=\"");
        put_label_value(b, parts[i].topic);
        put(b, "\",partition=\"%" PRId32 "\"} %" PRId64 "\n", parts[i].partition, parts[i].lag);
    }
    family(b, "tallyd_kafka_watermark_ms", "gauge",
           "Event time (epoch milliseconds) of the newest event applied.");
    if (st.watermark_ms >= 0)
        put(b, "tallyd_kafka_watermark_ms %" PRId64 "\n", st.watermark_ms);
    free(parts);

    tly_shard_t *sh = d->source != NULL ? tly_source_shard(d->source) : NULL;
    if (sh != NULL) {
        tly_shard_stats_t ss;
        tly_shard_stats(sh, &ss);
        gauge(b, "tallyd_shard_partitions_owned", "Shard mode: partitions this instance owns.",
              (int64_t)ss.nowned);
        gauge(b, "tallyd_shard_endpoints_known",
              "Shard mode: partitions whose owner's address is known.", (int64_t)ss.known);
        counter(b, "tallyd_shard_moved_total", "Shard mode: -MOVED replies given.", ss.moved);
        counter(b, "tallyd_shard_endpoints_published_total",
                "Shard mode: endpoint records delivered.", ss.published);
        counter(b, "tallyd_shard_endpoint_errors_total",
                "Shard mode: endpoint publish or read failures.", ss.endpoint_errors);
    }
}

static void metrics_store(tly_daemon_t *d, tly_buf_t *b)
{
    tly_store_stats_t st;
    tly_store_stats(d->store, &st);
    gauge(b, "tallyd_entities", "Entity records held, all entity types.", (int64_t)st.entities);
    gauge(b, "tallyd_store_bytes",
          "Heap bytes held by entity records, interned strings and the entity table.",
          (int64_t)st.bytes);
    gauge(b, "tallyd_interned_strings", "Short strings in the intern table.", (int64_t)st.interned);
    gauge(b, "tallyd_interned_bytes", "Bytes of interned strings (part of tallyd_store_bytes).",
          (int64_t)st.interned_bytes);
    gauge(b, "tallyd_table_bytes",
          "Bytes of the entity table's slot arrays (part of "
          "tallyd_store_bytes).",
          (int64_t)st.table_bytes);
    counter(b, "tallyd_events_updated_total", "Events that updated at least one feature.",
            st.events_applied);
    counter(b, "tallyd_feature_updates_total", "Feature updates applied.", st.updates);
    by_reason(b, "tallyd_feature_updates_dropped_total", "Feature updates dropped, by reason.",
              st.dropped);
    counter(b, "tallyd_entities_expired_total", "Entity records removed by the expiry sweeper.",
            st.expired);
    counter(b, "tallyd_entities_dropped_total",
            "Entity records removed because their partition went to another instance.",
            st.dropped_entities);
}

static void metrics_server(tly_daemon_t *d, tly_buf_t *b)
{
    tly_server_stats_t *s = &d->server;
    gauge(b, "tallyd_clients_connected", "Open RESP client connections.",
          (int64_t)load(&s->connected));
    gauge(b, "tallyd_clients_max", "server.max_clients.", d->cfg->server.max_clients);
    counter(b, "tallyd_connections_total", "RESP connections accepted.",
            load(&s->connections_total));
    counter(b, "tallyd_connections_rejected_total",
            "RESP connections refused at server.max_clients.", load(&s->rejected_maxclients));
    counter(b, "tallyd_commands_total", "Commands executed.", load(&s->commands));
    counter(b, "tallyd_protocol_errors_total", "Connections closed for malformed RESP.",
            load(&s->protocol_errors));
    counter(b, "tallyd_output_buffer_disconnects_total",
            "Connections closed at server.max_output_buffer.", load(&s->output_overflows));
    counter(b, "tallyd_clients_evicted_total",
            "Connections closed at server.max_clients_memory (the client holding the most).",
            load(&s->evicted_clients));
    gauge(b, "tallyd_clients_memory_bytes",
          "Bytes the buffers of all RESP clients hold (pending requests, queued replies).",
          (int64_t)load(&s->clients_memory));
    counter(b, "tallyd_timeout_disconnects_total",
            "Connections closed by the idle or request timeout.", load(&s->timeouts));
    counter(b, "tallyd_auth_failures_total", "AUTH attempts with a wrong password.",
            load(&s->auth_failures));
    counter(b, "tallyd_output_stalls_total",
            "Clients paused at server.output_soft_limit that read no reply for a second and "
            "were read on, up to server.max_output_buffer.",
            load(&s->output_stalls));
    counter(b, "tallyd_read_yields_total",
            "Reads that filled their buffer and ended the client's turn of the event loop.",
            load(&s->read_yields));
    counter(b, "tallyd_hinted_requests_total",
            "Requests read in one loop iteration with other clients' whose entity was looked "
            "up ahead of executing them.",
            load(&s->hinted_requests));
    counter(b, "tallyd_net_input_bytes_total", "Bytes read from RESP clients.", load(&s->bytes_in));
    counter(b, "tallyd_net_output_bytes_total", "Bytes written to RESP clients.",
            load(&s->bytes_out));
}

void tly_admin_metrics(tly_daemon_t *d, int64_t now_ms, tly_buf_t *out)
{
    char why[256];
    family(out, "tallyd_build_info", "gauge", "Always 1; the version is a label.");
    put(out, "tallyd_build_info{version=\"");
    put_label_value(out, TALLYD_VERSION);
    put(out, "\"} 1\n");
    gauge(out, "tallyd_up", "Always 1 while the admin server answers.", 1);
    gauge(out, "tallyd_healthy", "1 when /healthz answers 200.",
          unhealthy(d, why, sizeof why) == NULL ? 1 : 0);
    gauge(out, "tallyd_ready", "1 when /readyz answers 200 (the source caught up).",
          tly_source_ready(d->source) ? 1 : 0);
    family(out, "tallyd_start_time_seconds", "gauge", "Start time, seconds since the epoch.");
    put(out, "tallyd_start_time_seconds %.3f\n", (double)d->started_ms / 1000.0);
    family(out, "tallyd_uptime_seconds", "gauge", "Seconds since start.");
    put(out, "tallyd_uptime_seconds %.3f\n",
        (double)(now_ms > d->started_ms ? now_ms - d->started_ms : 0) / 1000.0);
    metrics_source(d, out);
    metrics_store(d, out);
    metrics_server(d, out);
    if (d->snapshot != NULL) {
        tly_snapshot_stats_t ss;
        tly_snapshot_stats(d->snapshot, &ss);
        counter(out, "tallyd_snapshots_written_total", "Snapshots made durable.", ss.written);
        counter(out, "tallyd_snapshots_failed_total",
                "Snapshot attempts that failed (disk full, I/O error, ...).", ss.failed);
        counter(out, "tallyd_snapshots_rejected_total",
                "Snapshots found unusable at start-up (corrupt, truncated, other format).",
                ss.rejected);
        counter(out, "tallyd_snapshots_outdated_total",
                "Snapshots passed over at start-up: written for other definitions of every "
                "feature.",
                ss.outdated);
        gauge(out, "tallyd_snapshot_in_progress", "1 while a snapshot writer runs.",
              ss.in_progress ? 1 : 0);
        family(out, "tallyd_last_snapshot_timestamp_seconds", "gauge",
               "Creation time of the newest durable snapshot, seconds since the epoch; -1 none.");
        put(out, "tallyd_last_snapshot_timestamp_seconds %.3f\n",
            ss.last_ms < 0 ? -1.0 : (double)ss.last_ms / 1000.0);
    }
    counter(out, "tallyd_admin_connections_refused_total",
            "Admin HTTP connections refused at the connection limits (in all, per address).",
            load(&admin_refused));
    counter(out, "tallyd_admin_bad_requests_total",
            "Admin HTTP requests answered 4xx (unknown path, method not allowed).",
            load(&admin_bad_requests));
    counter(out, "tallyd_admin_request_timeouts_total",
            "Admin HTTP connections shut down for not delivering a whole request in time.",
            load(&admin_timeouts));
}

/* ---- HTTP --------------------------------------------------------------- */

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *type,
                             char *body, size_t len, enum MHD_ResponseMemoryMode mode)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, mode);
    if (r == NULL) {
        if (mode == MHD_RESPMEM_MUST_FREE)
            free(body);
        return MHD_NO;
    }
    enum MHD_Result ok = MHD_YES;
    if (MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type) != MHD_YES ||
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store") != MHD_YES)
        ok = MHD_NO;
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED &&
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD") != MHD_YES)
        ok = MHD_NO;
    if (ok == MHD_YES)
        ok = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result reply_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
    if (status >= 400 && status < 500)
        atomic_fetch_add_explicit(&admin_bad_requests, 1, memory_order_relaxed);
    return reply(conn, status, "text/plain; charset=utf-8", (char *)text, strlen(text),
                 MHD_RESPMEM_MUST_COPY);
}

#define NOT_FOUND "not found: try /metrics, /healthz, /readyz\n"

typedef enum { PAGE_HEALTHZ, PAGE_READYZ, PAGE_METRICS } page_t;

static const struct {
    const char *path;
    page_t page;
} pages[] = {
    {"/healthz", PAGE_HEALTHZ},
    {"/readyz", PAGE_READYZ},
    {"/metrics", PAGE_METRICS},
};

static enum MHD_Result answer_readyz(tly_daemon_t *d, struct MHD_Connection *conn)
{
    if (tly_source_ready(d->source))
        return reply_text(conn, MHD_HTTP_OK, "ready\n");
    tly_source_stats_t st;
    tly_source_stats(d->source, &st, NULL, 0); /* not ready: a source exists */
    char text[128];
    if (st.npartitions == 0)
        snprintf(text, sizeof text, "loading: no partitions assigned yet\n");
    else if (st.lag < 0)
        snprintf(text, sizeof text, "loading: lag not known yet (%zu partitions assigned)\n",
                 st.npartitions);
    else
        snprintf(text, sizeof text, "loading: lag %" PRId64 " messages\n", st.lag);
    return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, text);
}

/* MHD's access handler, on MHD's thread. The URL comes without its query
 * string. A GET or HEAD is answered on the second call, once the request
 * is complete: a reply queued on the first call makes MHD close the
 * connection, and scrapers keep theirs alive. Any other method is refused
 * on the first call, so its body is never read (MHD discards it and closes
 * the connection). */
static enum MHD_Result answer(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **req_cls)
{
    tly_admin_t *a = cls;
    (void)version;
    (void)upload;

    size_t k = 0, n = sizeof pages / sizeof pages[0];
    while (k < n && strcmp(url, pages[k].path) != 0)
        k++;
    bool readonly =
        strcmp(method, MHD_HTTP_METHOD_GET) == 0 || strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    if (!readonly)
        return k == n ? reply_text(conn, MHD_HTTP_NOT_FOUND, NOT_FOUND)
                      : reply_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n");
    if (*req_cls == NULL) {
        *req_cls = a; /* non-NULL: the first call is over */
        return MHD_YES;
    }
    if (*upload_size > 0) { /* a GET with a body: ignored */
        *upload_size = 0;
        return MHD_YES;
    }
    if (k == n)
        return reply_text(conn, MHD_HTTP_NOT_FOUND, NOT_FOUND);

    switch (pages[k].page) {
    case PAGE_HEALTHZ: {
        char why[300], line[320];
        if (unhealthy(a->d, why, sizeof why) == NULL)
            return reply_text(conn, MHD_HTTP_OK, "ok\n");
        snprintf(line, sizeof line, "%s\n", why);
        return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, line);
    }
    case PAGE_READYZ:
        return answer_readyz(a->d, conn);
    case PAGE_METRICS: {
        tly_buf_t body = {0};
        tly_admin_metrics(a->d, wall_ms(), &body);
        /* MHD frees body.data with free() once sent (tly_buf_t is malloc'd). */
        return reply(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body.data,
                     body.len, MHD_RESPMEM_MUST_FREE);
    }
    }
    return MHD_NO;
}

/* MHD's error log: WARN while starting (the reason a start failed), DEBUG
 * afterwards (clients that hang up mid-reply are not the operator's
 * concern). */
static void mhd_log(void *cls, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    tly_admin_t *a = cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    /* MHD refuses over-limit connections itself (total or per address)
     * and says only this */
    if (strstr(line, "connection limit") != NULL)
        atomic_fetch_add_explicit(&admin_refused, 1, memory_order_relaxed);
    tly_log(atomic_load(&a->starting) ? TLY_LOG_WARN : TLY_LOG_DEBUG, "admin: %s", line);
}

/* ---- the request deadline ----------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* MHD's thread: a connection opened or closed. */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_ctx,
                          enum MHD_ConnectionNotificationCode toe)
{
    tly_admin_t *a = cls;
    pthread_mutex_lock(&a->mu);
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        *socket_ctx = NULL;
        for (size_t i = 0; ci != NULL && i < sizeof a->conns / sizeof a->conns[0]; i++)
            if (a->conns[i].fd < 0) {
                a->conns[i] = (aconn_t){.fd = ci->connect_fd, .since_ms = mono_ms()};
                *socket_ctx = &a->conns[i];
                break;
            }
    } else if (*socket_ctx != NULL) {
        ((aconn_t *)*socket_ctx)->fd = -1;
        *socket_ctx = NULL;
    }
    pthread_mutex_unlock(&a->mu);
}

/* MHD's thread: a request was answered (or failed); the next one is due
 * from now. */
static void on_completed(void *cls, struct MHD_Connection *conn, void **req_ctx,
                         enum MHD_RequestTerminationCode toe)
{
    tly_admin_t *a = cls;
    (void)req_ctx;
    (void)toe;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    if (ci == NULL || ci->socket_context == NULL)
        return;
    pthread_mutex_lock(&a->mu);
    ((aconn_t *)ci->socket_context)->since_ms = mono_ms();
    pthread_mutex_unlock(&a->mu);
}

/* The reaper thread: shuts down connections past the deadline; MHD then
 * sees them end and closes them. */
static void *reaper_main(void *arg)
{
    tly_admin_t *a = arg;
    (void)pthread_setname_np(pthread_self(), "tly-admin-reap");
    pthread_mutex_lock(&a->mu);
    while (!a->stop) {
        int64_t now = mono_ms();
        for (size_t i = 0; i < sizeof a->conns / sizeof a->conns[0]; i++) {
            aconn_t *c = &a->conns[i];
            if (c->fd >= 0 && !c->cut && now - c->since_ms > tly_admin_deadline_ms) {
                (void)shutdown(c->fd, SHUT_RDWR);
                c->cut = true;
                atomic_fetch_add_explicit(&admin_timeouts, 1, memory_order_relaxed);
            }
        }
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until); /* the condvar's clock */
        until.tv_nsec += ADMIN_REAP_MS * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        (void)pthread_cond_timedwait(&a->wake, &a->mu, &until);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* ---- binding (main thread) ---------------------------------------------- */

/* Binds and listens on the first address of addr that works; returns the
 * socket and its port, or -1 with err filled. */
static int bind_admin(const char *addr, int *port, char *err, size_t errlen)
{
    char host[256], portstr[8];
    if (!tly_split_addr(addr, host, sizeof host, portstr, sizeof portstr)) {
        snprintf(err, errlen, "server.admin %s: not host:port (IPv6 as [addr]:port)", addr);
        return -1;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | (host[0] ? 0 : AI_PASSIVE)};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host[0] ? host : NULL, portstr, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "server.admin %s: %s", addr,
                 rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        return -1;
    }
    int fd = -1, e = EADDRNOTAVAIL;
    for (const struct addrinfo *ai = res; ai != NULL && fd < 0; ai = ai->ai_next) {
        if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
            continue;
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        struct sockaddr_storage sa;
        socklen_t salen = sizeof sa;
        /* SO_REUSEADDR: a restart may bind over TIME_WAIT, never over a
         * listener (Linux). */
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
            bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, ADMIN_BACKLOG) != 0 ||
            getsockname(fd, (struct sockaddr *)&sa, &salen) != 0) {
            e = errno;
            if (fd >= 0)
                close(fd);
            fd = -1;
            continue;
        }
        *port = sa.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&sa)->sin6_port)
                                         : ntohs(((struct sockaddr_in *)&sa)->sin_port);
    }
    freeaddrinfo(res);
    if (fd < 0)
        snprintf(err, errlen, "server.admin %s: %s", addr, strerror(e));
    return fd;
}

tly_admin_t *tly_admin_start(tly_daemon_t *d, char *err, size_t errlen)
{
    const char *addr = d->cfg->server.admin;
    if (errlen > 0)
        err[0] = '\0';
    if (addr == NULL || addr[0] == '\0')
        return NULL;

    tly_admin_t *a = calloc(1, sizeof *a);
    if (a == NULL) {
        fputs("tallyd: out of memory (admin)\n", stderr);
        abort();
    }
    a->d = d;
    atomic_init(&a->starting, true);
    pthread_mutex_init(&a->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* a wall-clock step cannot stall it */
    pthread_cond_init(&a->wake, &ca);
    pthread_condattr_destroy(&ca);
    for (size_t i = 0; i < sizeof a->conns / sizeof a->conns[0]; i++)
        a->conns[i].fd = -1;
    int mhd_fd = -1;
    int fd = bind_admin(addr, &a->port, err, errlen);
    if (fd < 0)
        goto fail;
    /* MHD closes the socket it is given in MHD_stop_daemon, but not on
     * every failed start: it gets a duplicate and this function always
     * closes its own, so a failure can at worst leak one descriptor
     * (the daemon then exits), never close one twice. */
    mhd_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (mhd_fd < 0) {
        snprintf(err, errlen, "server.admin %s: %s", addr, strerror(errno));
        goto fail;
    }
    a->mhd = MHD_start_daemon(
        MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, answer,
        a, /* the logger first, or MHD logs to stderr */
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, a, MHD_OPTION_LISTEN_SOCKET, (MHD_socket)mhd_fd,
        MHD_OPTION_CONNECTION_LIMIT, ADMIN_MAX_CONNECTIONS, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        ADMIN_PER_IP, MHD_OPTION_CONNECTION_TIMEOUT, ADMIN_TIMEOUT_S, MHD_OPTION_NOTIFY_CONNECTION,
        on_connection, a, MHD_OPTION_NOTIFY_COMPLETED, on_completed, a, MHD_OPTION_END);
    if (a->mhd == NULL) {
        snprintf(err, errlen,
                 "server.admin %s: the HTTP server (libmicrohttpd) did not start; see the log",
                 addr);
        goto fail;
    }
    close(fd);
    if (pthread_create(&a->reaper, NULL, reaper_main, a) == 0)
        a->reaper_started = true;
    else
        tly_warn("admin: the request-deadline thread did not start: slow requests are "
                 "closed only by the idle timeout");
    atomic_store(&a->starting, false);
    tly_info("admin: HTTP on %s (port %d): /metrics /healthz /readyz", addr, a->port);
    return a;
fail:
    if (fd >= 0)
        close(fd);
    pthread_cond_destroy(&a->wake);
    pthread_mutex_destroy(&a->mu);
    free(a);
    return NULL;
}

int tly_admin_port(const tly_admin_t *a)
{
    return a->port;
}

void tly_admin_stop(tly_admin_t *a)
{
    if (a == NULL)
        return;
    if (a->reaper_started) {
        pthread_mutex_lock(&a->mu);
        a->stop = true;
        pthread_cond_signal(&a->wake);
        pthread_mutex_unlock(&a->mu);
        pthread_join(a->reaper, NULL);
    }
    MHD_stop_daemon(a->mhd);
    pthread_cond_destroy(&a->wake);
    pthread_mutex_destroy(&a->mu);
    free(a);
}
