/*
 * main.c — tallyd's command line.
 *
 *   tallyd --config FILE                run the daemon on FILE
 *   tallyd --check-config FILE          validate FILE, print its summary
 *   tallyd --help-config [--markdown]   reference of every config key
 *   tallyd --help | --version
 *
 * Exit status: 0 success (and after SIGTERM/SIGINT); 1 the config is invalid
 * (its error on stderr, "FILE:LINE: key.path: sentence") or start-up failed
 * (address in use, bad kafka.properties ...) or the Kafka consumer hit a fatal
 * error; 2 wrong usage. A config is valid when tly_config_load() accepts it
 * and tly_featset_compile() compiles its features, so --check-config catches
 * every config error that --config would.
 *
 * Start-up order: config → store → server (binds, so a busy port fails
 * before anything runs) → source (and, for kafka.brokers: embedded, the
 * in-process mock cluster and the demo generator) → loops. Shut-down is the
 * reverse: stop accepting and close clients, stop the generator, stop the
 * consumer (committing stored offsets), free the store.
 *
 * Signals: SIGINT, SIGTERM, SIGHUP are blocked in every thread and taken by
 * the main thread with sigtimedwait, between which it runs the expiry
 * sweeper and prints progress lines; SIGHUP reopens the log (--log); SIGPIPE is
 * ignored (a client that goes away is seen as a write error).
 *
 * Runs on the main thread; the daemon context lives on its stack.
 */
#include "tallyd/config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tallyd/admin.h"
#include "tallyd/daemon.h"
#include "tallyd/demo.h"
#include "tallyd/feature.h"
#include "tallyd/log.h"
#include "tallyd/rcu.h"
#include "tallyd/server.h"
#include "tallyd/snapshot.h"
#include "tallyd/source.h"
#include "tallyd/store.h"
#include "tallyd/version.h"

#define ERR_CAP 1024

enum { EXIT_INVALID = 1, EXIT_USAGE = 2 };

enum {
    OPT_CONFIG = 256,
    OPT_CHECK_CONFIG,
    OPT_HELP_CONFIG,
    OPT_MARKDOWN,
    OPT_HELP,
    OPT_VERSION,
    OPT_LOG
};

static void usage(FILE *out)
{
    fputs("usage: tallyd --config FILE [--log FILE]   run the daemon (log lines appended to\n"
          "                                          FILE, reopened on SIGHUP; default stderr)\n"
          "       tallyd --check-config FILE          validate FILE and summarise its features\n"
          "       tallyd --help-config [--markdown]   list every configuration key\n"
          "       tallyd --help | --version\n",
          out);
}

/* Loads path and compiles its features. Returns TLY_OK with *cfg and *fs
 * (caller frees both, fs first), or prints the error to stderr. */
static tly_err_t load(const char *path, tly_config_t **cfg, tly_featset_t **fs)
{
    char err[ERR_CAP];
    tly_config_t *loaded = NULL;
    tly_featset_t *compiled = NULL;
    tly_err_t rc = tly_config_load(path, &loaded, err, sizeof err);
    if (rc == TLY_OK)
        rc = tly_featset_compile(loaded, &compiled, err, sizeof err);
    if (rc == TLY_OK)
        rc = tly_source_check_properties(loaded, err, sizeof err);
    if (rc != TLY_OK) {
        fprintf(stderr, "%s\n", err);
        tly_featset_free(compiled); /* compiled before the properties were refused */
        tly_config_free(loaded);
        return rc;
    }
    *cfg = loaded;
    *fs = compiled;
    return TLY_OK;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool is_embedded(const tly_config_t *cfg)
{
    return strcmp(cfg->kafka.brokers, "embedded") == 0;
}

/* The demo's welcome: queries that work when pasted (the generator's ids
 * are Zipf ranks, so user 1 and pins 1..50 are the busiest). */
static void print_demo_banner(const tly_daemon_t *d)
{
    int port = d->tcp_port;
    printf("\n"
           "tallyd %s is serving the embedded demo on 127.0.0.1:%d\n"
           "  an in-process Kafka cluster (librdkafka's mock) gets about %" PRId64
           " engagement events/s\n"
           "  from a seeded generator; tallyd consumes them like any Kafka topic.\n"
           "\n"
           "Paste these into another terminal:\n"
           "  redis-cli -p %d FEATURES user 1\n"
           "  redis-cli -p %d MFEATURES pin 50",
           TALLYD_VERSION, port, d->cfg->demo.events_per_sec, port, port);
    for (int i = 1; i <= 50; i++)
        printf(" %d", i);
    printf(" impressions:1h clicks:1h\n"
           "  redis-cli -p %d RECENT user 1 recent COUNT 10\n"
           "  redis-cli -p %d CATALOG\n"
           "  redis-cli -p %d INFO source\n"
           "\n"
           "Progress every 5 s below; Ctrl-C stops.\n\n",
           port, port, port);
    fflush(stdout);
}

static void progress(tly_daemon_t *d, uint64_t *last_applied, int64_t *last_ms, int64_t now)
{
    tly_source_stats_t src;
    tly_source_stats(d->source, &src, NULL, 0);
    tly_store_stats_t st;
    tly_store_stats(d->store, &st);
    double secs = (double)(now - *last_ms) / 1000.0;
    double rate = secs > 0 ? (double)(src.applied - *last_applied) / secs : 0;
    tly_info("consumed %" PRIu64 " events (%.0f/s), %" PRIu64 " rejected, %" PRIu64
             " entities, %.1f MB, lag %" PRId64 ", %zu partitions",
             src.applied, rate, src.rejected, st.entities, (double)st.bytes / 1e6, src.lag,
             src.npartitions);
    *last_applied = src.applied;
    *last_ms = now;
}

/* The address this instance names as the owner of its partitions (shard
 * mode): server.advertise, else server.listen's host — this host's name
 * when it is a wildcard — with the port actually bound. */
static void advertise_address(const tly_daemon_t *d, char *buf, size_t cap)
{
    if (d->cfg->server.advertise[0] != '\0') {
        snprintf(buf, cap, "%s", d->cfg->server.advertise);
        return;
    }
    char host[200], port[8];
    if (!tly_split_addr(d->cfg->server.listen, host, sizeof host, port, sizeof port))
        host[0] = '\0'; /* the config checked it: not reached */
    if (host[0] == '\0' || strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0 ||
        strcmp(host, "*") == 0) {
        if (gethostname(host, sizeof host) != 0)
            snprintf(host, sizeof host, "localhost");
        host[sizeof host - 1] = '\0';
    }
    snprintf(buf, cap, strchr(host, ':') != NULL ? "[%s]:%d" : "%s:%d", host, d->tcp_port);
}

/* Runs the daemon until SIGINT/SIGTERM or a fatal consumer error. */
static int run(const tly_config_t *cfg, const tly_featset_t *fs)
{
    char err[ERR_CAP] = "";
    int status = EXIT_INVALID;
    tly_server_t *server = NULL;
    tly_source_t *source = NULL;
    tly_demo_t *demo = NULL;
    tly_admin_t *admin = NULL;
    bool embedded = is_embedded(cfg), consuming = false;

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* inherited by every thread */
    signal(SIGPIPE, SIG_IGN);

    tly_rcu_thread_online(); /* the sweeper runs here */
    tly_daemon_t d = {.cfg = cfg, .fs = fs, .started_ms = wall_ms()};
    atomic_init(&d.server.next_client_id, 1);
    tly_snapshotter_t *snap = tly_snapshot_new(cfg);
    d.snapshot = snap;
    d.store = snap != NULL ? tly_snapshot_restore(snap, fs) : NULL;
    if (d.store == NULL)
        d.store = tly_store_new(fs);
    tly_store_set_max_bytes(d.store, cfg->store.max_memory);
    tly_info("tallyd %s starting with %s: %zu features over %zu entity types", TALLYD_VERSION,
             cfg->path, fs->nfeats, fs->nentities);

    server = tly_server_new(&d, err, sizeof err);
    if (server == NULL)
        goto fail;
    source = tly_source_new(cfg, fs, d.store, err, sizeof err);
    if (source == NULL)
        goto fail;
    d.source = source;
    if (embedded) {
        demo = tly_demo_start(cfg, tly_source_bootstrap(source), err, sizeof err);
        if (demo == NULL)
            goto fail;
    }
    char advertise[TLY_SHARD_ADDR_MAX];
    advertise_address(&d, advertise, sizeof advertise);
    if (tly_source_set_advertise(source, advertise) != TLY_OK) {
        snprintf(err, sizeof err, "server.advertise: \"%s\" is too long", advertise);
        goto fail;
    }
    if (snap != NULL)
        tly_snapshot_attach(snap, d.store, source);
    if (tly_source_start(source, err, sizeof err) != TLY_OK)
        goto fail;
    consuming = true;
    if (tly_server_start(server, err, sizeof err) != TLY_OK)
        goto fail;
    admin = tly_admin_start(&d, err, sizeof err);
    if (admin == NULL && err[0] != '\0')
        goto fail; /* tly_admin_start logged its address when it started */
    if (embedded)
        print_demo_banner(&d);

    status = EXIT_SUCCESS;
    int64_t every = embedded ? 5000 : 60000;
    int64_t now = wall_ms(), next_progress = now + every;
    int64_t last_ms = now;
    uint64_t last_applied = 0;
    /* the sweeper's steps, paced on the monotonic clock */
    tly_sweep_pace_t pace = {0};
    int64_t last_sweep = mono_ms(), next_sweep = last_sweep;
    for (;;) {
        int64_t wait = next_sweep - mono_ms();
        wait = wait < 0 ? 0 : wait < TLY_SWEEP_WAIT_MAX_MS ? wait : TLY_SWEEP_WAIT_MAX_MS;
        struct timespec tick = {.tv_sec = 0, .tv_nsec = (long)wait * 1000000L};
        int sig = sigtimedwait(&sigs, NULL, &tick);
        if (sig == SIGINT || sig == SIGTERM) {
            tly_info("%s: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
            break;
        }
        if (sig == SIGHUP) {
            int rc = tly_log_reopen();
            if (rc > 0)
                tly_info("SIGHUP: reopened the log %s", tly_log_path());
            else if (rc == 0)
                tly_info("SIGHUP: the log goes to stderr (no --log); nothing to reopen");
            else
                tly_error("SIGHUP: cannot reopen the log %s: %s; lines go on to the file open "
                          "before",
                          tly_log_path(), strerror(errno));
        }
        const char *fatal = tly_source_fatal(source);
        if (fatal != NULL) {
            tly_error("stopping: the Kafka consumer failed: %s", fatal);
            status = EXIT_INVALID;
            break;
        }
        now = wall_ms();
        int64_t mono = mono_ms();
        if (mono >= next_sweep) {
            /* One pass over every entity per store.sweep_every, in small
             * steps spread over it (tly_sweep_pace: a step holds the CPU,
             * which the query loop may share); a step holds a shard's lock
             * for at most 1,024 records. */
            tly_store_stats_t st;
            tly_store_stats(d.store, &st);
            int64_t next_wait;
            size_t visit = tly_sweep_pace(&pace, st.entities, cfg->store.sweep_every_ms,
                                          mono - last_sweep, &next_wait);
            size_t gone = tly_store_sweep(d.store, now, visit);
            if (gone > 0)
                tly_debug("sweeper expired %zu entities", gone);
            last_sweep = mono;
            next_sweep = mono + next_wait;
        }
        if (now >= next_progress) {
            progress(&d, &last_applied, &last_ms, now);
            next_progress = now + every;
        }
    }
    goto out;

fail:
    tly_error("%s", err);
out:
    /* Stop accepting and close the clients, then the final snapshot of
     * everything applied, committed before the consumer closes. */
    tly_admin_stop(admin);
    if (server != NULL)
        tly_server_stop_async(server);
    tly_server_free(server);
    tly_demo_stop(demo);
    if (snap != NULL && consuming && status == EXIT_SUCCESS) {
        tly_source_halt(source);
        if (tly_snapshot_final(snap, source) != TLY_OK)
            status = EXIT_INVALID;
    }
    tly_source_free(source);
    d.source = NULL;
    tly_snapshot_free(snap);
    d.snapshot = NULL;
    tly_store_free(d.store);
    tly_rcu_thread_offline();
    if (status == EXIT_SUCCESS)
        tly_info("stopped");
    return status;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, OPT_CONFIG},
        {"check-config", required_argument, NULL, OPT_CHECK_CONFIG},
        {"help-config", no_argument, NULL, OPT_HELP_CONFIG},
        {"markdown", no_argument, NULL, OPT_MARKDOWN},
        {"help", no_argument, NULL, OPT_HELP},
        {"version", no_argument, NULL, OPT_VERSION},
        {"log", required_argument, NULL, OPT_LOG},
        {NULL, 0, NULL, 0},
    };
    int mode = 0, markdown = 0, opt;
    const char *path = NULL, *log_file = NULL;

    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case OPT_MARKDOWN:
            markdown = 1;
            break;
        case OPT_LOG:
            log_file = optarg;
            break;
        case OPT_CONFIG:
        case OPT_CHECK_CONFIG:
            path = optarg;
            /* fall through */
        case OPT_HELP_CONFIG:
        case OPT_HELP:
        case OPT_VERSION:
            if (mode != 0) { /* one action per run */
                usage(stderr);
                return EXIT_USAGE;
            }
            mode = opt;
            break;
        default: /* getopt_long has named the bad option */
            usage(stderr);
            return EXIT_USAGE;
        }
    }
    if (optind < argc || mode == 0 || (markdown && mode != OPT_HELP_CONFIG) ||
        (log_file != NULL && mode != OPT_CONFIG)) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (log_file != NULL && tly_log_open(log_file) != 0) {
        fprintf(stderr, "tallyd: cannot open log file %s: %s\n", log_file, strerror(errno));
        return EXIT_INVALID;
    }

    switch (mode) {
    case OPT_HELP:
        usage(stdout);
        return EXIT_SUCCESS;
    case OPT_VERSION:
        printf("tallyd %s\n", TALLYD_VERSION);
        return EXIT_SUCCESS;
    case OPT_HELP_CONFIG:
        tly_config_help(stdout, markdown);
        return EXIT_SUCCESS;
    default:
        break;
    }

    tly_config_t *cfg = NULL;
    tly_featset_t *fs = NULL;
    if (load(path, &cfg, &fs) != TLY_OK)
        return EXIT_INVALID;
    int status = EXIT_SUCCESS;
    if (mode == OPT_CHECK_CONFIG) {
        tly_config_summary(cfg, stdout);
    } else {
        status = run(cfg, fs);
    }
    tly_featset_free(fs);
    tly_config_free(cfg);
    return status;
}
