/*
 * test_admin.c — the HTTP admin server (admin.c) over real sockets: a small
 * HTTP/1.1 client written here talks to tly_admin_start's server on a free
 * loopback port. /metrics is checked against the text exposition format
 * (every family has one HELP and one TYPE line before its samples, samples
 * are `name{labels} value`, counters end in _total) and its values against
 * what the test put in: server counters set by hand, and store counts from
 * a model of which features each event matches (computed here, not by the
 * store). Waits have deadlines (TLY_TEST_TIMEOUT_MULT stretches them);
 * nothing sleeps to synchronise.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tallyd/admin.h"
#include "tallyd/snapshot.h"
#include "tallyd/decode.h"
#include "tallyd/log.h"
#include "tallyd/rcu.h"
#include "tallyd/version.h"

#define WAIT_MS 5000 /* default deadline of one wait, before the multiplier */
#define HOUR    INT64_C(3600000)
/* A wall time for the events (the store's `now`); the daemon's start is
 * a minute earlier. */
#define T INT64_C(1699920000000)

static const char *features_yaml =
    "events:\n"
    "  time: { field: ts, unit: ms }\n"
    "features:\n"
    "  - { name: clicks, entity: user, key: user_id, where: { action: click }, agg: count,"
    " windows: [1h] }\n"
    "  - { name: impressions, entity: pin, key: pin_id, where: { action: impression },"
    " agg: count, windows: [1h] }\n";

/* ---- time and deadlines ------------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double timeout_mult(void)
{
    const char *m = getenv("TLY_TEST_TIMEOUT_MULT");
    double mult = m != NULL ? atof(m) : 1.0;
    return mult < 1.0 ? 1.0 : mult;
}

static int64_t deadline_in(int64_t ms)
{
    return mono_ms() + (int64_t)((double)ms * timeout_mult());
}

static int remaining(int64_t deadline)
{
    int64_t left = deadline - mono_ms();
    return left > 0 ? (int)left : 0;
}

/* ---- fixture ------------------------------------------------------------ */

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_daemon_t d;
    tly_admin_t *admin;
    int port;
} fx_t;

/* Loads a config with server.admin = admin_addr and the features above,
 * builds the daemon context (no source) and, when start, the admin
 * server. */
static fx_t *fx_new(const char *admin_addr, bool start)
{
    fx_t *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    char err[512], yaml[2048];
    snprintf(yaml, sizeof yaml, "server:\n  admin: \"%s\"\n%s", admin_addr, features_yaml);
    if (tly_config_load_string(yaml, "admin.yaml", &fx->cfg, err, sizeof err) != TLY_OK ||
        tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK)
        fail_msg("%s", err);
    fx->d.cfg = fx->cfg;
    fx->d.fs = fx->fs;
    fx->d.store = tly_store_new(fx->fs);
    fx->d.started_ms = T - 60000;
    atomic_init(&fx->d.server.next_client_id, 1);
    if (start) {
        fx->admin = tly_admin_start(&fx->d, err, sizeof err);
        if (fx->admin == NULL)
            fail_msg("tly_admin_start: %s", err);
        fx->port = tly_admin_port(fx->admin);
        assert_true(fx->port > 0);
    }
    return fx;
}

static void fx_free(fx_t *fx)
{
    tly_admin_stop(fx->admin);
    tly_store_free(fx->d.store);
    tly_featset_free(fx->fs);
    tly_config_free(fx->cfg);
    free(fx);
}

/* ---- a tiny HTTP/1.1 client --------------------------------------------- */

typedef struct {
    int status;
    char *head; /* status line and headers, NUL-terminated */
    char *body; /* NUL-terminated; body_len bytes */
    size_t body_len;
} http_resp_t;

static void resp_free(http_resp_t *r)
{
    free(r->head);
    free(r->body);
    memset(r, 0, sizeof *r);
}

static int connect_port(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        fail_msg("connect to port %d: %s", port, strerror(errno));
    return fd;
}

static void send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            fail_msg("send: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

/* Value of header `name` in head (case-insensitive), or NULL; copies it
 * into out. */
static const char *header(const char *head, const char *name, char *out, size_t cap)
{
    size_t n = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line != NULL; line = strstr(line + 2, "\r\n")) {
        const char *h = line + 2;
        if (strncasecmp(h, name, n) == 0 && h[n] == ':') {
            h += n + 1;
            while (*h == ' ')
                h++;
            size_t len = strcspn(h, "\r\n");
            if (len >= cap)
                len = cap - 1;
            memcpy(out, h, len);
            out[len] = '\0';
            return out;
        }
    }
    return NULL;
}

/* Reads one response from fd (a HEAD response has no body); the body's
 * length is Content-Length, else everything up to EOF. */
static void read_response(int fd, bool head_only, http_resp_t *r)
{
    int64_t deadline = deadline_in(WAIT_MS);
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t head_len = 0;
    long content_length = -1;
    bool eof = false;
    for (;;) {
        if (head_len == 0) {
            char *end = len >= 4 ? memmem(buf, len, "\r\n\r\n", 4) : NULL;
            if (end != NULL) {
                head_len = (size_t)(end - buf) + 4;
                char *h = malloc(head_len + 1);
                assert_non_null(h);
                memcpy(h, buf, head_len);
                h[head_len] = '\0';
                r->head = h;
                char cl[32];
                if (header(h, "Content-Length", cl, sizeof cl) != NULL)
                    content_length = atol(cl);
                if (head_only)
                    content_length = 0;
            }
        }
        if (head_len > 0 && content_length >= 0 && len >= head_len + (size_t)content_length)
            break;
        if (eof)
            break;
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int pr = poll(&pfd, 1, remaining(deadline));
        if (pr == 0)
            fail_msg("no complete HTTP response within the deadline (%zu bytes read)", len);
        ssize_t n = recv(fd, buf + len, cap - len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail_msg("recv: %s", strerror(errno));
        if (n == 0)
            eof = true;
        len += (size_t)n;
    }
    if (head_len == 0)
        fail_msg("connection closed before the response headers (%zu bytes)", len);
    assert_int_equal(strncmp(r->head, "HTTP/1.1 ", 9), 0);
    r->status = atoi(r->head + 9);
    size_t blen = content_length >= 0 ? (size_t)content_length : len - head_len;
    assert_true(len >= head_len + blen);
    r->body = malloc(blen + 1);
    assert_non_null(r->body);
    memcpy(r->body, buf + head_len, blen);
    r->body[blen] = '\0';
    r->body_len = blen;
    free(buf);
}

/* One request on a fresh connection ("Connection: close"); returns the
 * response and checks the server then closes the connection. */
static http_resp_t http(int port, const char *method, const char *path)
{
    int fd = connect_port(port);
    char req[512];
    int n = snprintf(req, sizeof req,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s\r\n", method,
                     path, strcmp(method, "POST") == 0 ? "Content-Length: 0\r\n" : "");
    send_all(fd, req, (size_t)n);
    http_resp_t r = {0};
    read_response(fd, strcmp(method, "HEAD") == 0, &r);
    /* nothing follows the response: the next read is EOF */
    char extra;
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    assert_int_equal(poll(&pfd, 1, remaining(deadline_in(WAIT_MS))), 1);
    assert_int_equal(recv(fd, &extra, 1, 0), 0);
    close(fd);
    return r;
}

/* ---- a parser of the text exposition format ----------------------------- */

#define MAX_FAMILIES 128
#define MAX_SAMPLES  4096

typedef struct {
    char name[96];
    char type[16];
    bool help, typed;
    bool closed; /* another family's lines came after this one's */
} family_t;

typedef struct {
    char name[96];
    char labels[256]; /* as written, unescaped: `topic="a\"b",partition="0"` → a"b */
    double value;
} sample_t;

typedef struct {
    family_t fam[MAX_FAMILIES];
    size_t nfam;
    sample_t s[MAX_SAMPLES];
    size_t n;
} metrics_t;

static bool name_char(char c, bool first)
{
    return isalpha((unsigned char)c) || c == '_' || c == ':' ||
           (!first && isdigit((unsigned char)c));
}

static family_t *family_of(metrics_t *m, const char *name, size_t len, bool create)
{
    for (size_t i = 0; i < m->nfam; i++)
        if (strlen(m->fam[i].name) == len && strncmp(m->fam[i].name, name, len) == 0)
            return &m->fam[i];
    if (!create)
        return NULL;
    assert_true(m->nfam < MAX_FAMILIES);
    assert_true(len < sizeof m->fam[0].name);
    family_t *f = &m->fam[m->nfam++];
    memset(f, 0, sizeof *f);
    memcpy(f->name, name, len);
    return f;
}

/* Marks every family but f as closed: their lines are over. */
static void now_in(metrics_t *m, family_t *f)
{
    for (size_t i = 0; i < m->nfam; i++)
        if (&m->fam[i] != f && (m->fam[i].help || m->fam[i].typed))
            m->fam[i].closed = true;
}

/* Parses `{a="x",b="y"}` at *p into out (`a=x,b=y` with escapes resolved);
 * fails the test on a malformed label set. */
static void parse_labels(const char **pp, char *out, size_t cap)
{
    const char *p = *pp + 1;
    size_t o = 0;
    while (*p != '}') {
        if (o > 0 && o + 1 < cap)
            out[o++] = ',';
        if (!name_char(*p, true))
            fail_msg("bad label name at \"%.20s\"", p);
        while (name_char(*p, false)) {
            if (o + 1 < cap)
                out[o++] = *p;
            p++;
        }
        if (p[0] != '=' || p[1] != '"')
            fail_msg("label without =\" at \"%.20s\"", p);
        if (o + 1 < cap)
            out[o++] = '=';
        p += 2;
        while (*p != '"') {
            char c = *p;
            if (c == '\0' || c == '\n')
                fail_msg("unterminated label value");
            if (c == '\\') {
                p++;
                if (*p == 'n')
                    c = '\n';
                else if (*p == '\\' || *p == '"')
                    c = *p;
                else
                    fail_msg("bad escape \\%c in a label value", *p);
            }
            if (o + 1 < cap)
                out[o++] = c;
            p++;
        }
        p++;
        if (*p == ',')
            p++;
        else if (*p != '}')
            fail_msg("expected , or } after a label at \"%.20s\"", p);
    }
    out[o] = '\0';
    *pp = p + 1;
}

/* Parses body into m, failing the test on anything the format forbids or
 * tallyd's conventions exclude. */
static void parse_metrics(const char *body, metrics_t *m)
{
    memset(m, 0, sizeof *m);
    const char *p = body;
    assert_true(*body != '\0');
    while (*p) {
        const char *eol = strchr(p, '\n');
        if (eol == NULL)
            fail_msg("last line has no newline: \"%s\"", p);
        if (p[0] == '#') {
            bool help = strncmp(p, "# HELP ", 7) == 0, type = strncmp(p, "# TYPE ", 7) == 0;
            if (!help && !type)
                fail_msg("comment other than HELP/TYPE: %.*s", (int)(eol - p), p);
            const char *name = p + 7;
            size_t len = 0;
            while (name_char(name[len], len == 0))
                len++;
            if (len == 0 || name[len] != ' ')
                fail_msg("bad HELP/TYPE line: %.*s", (int)(eol - p), p);
            family_t *f = family_of(m, name, len, true);
            if (f->closed)
                fail_msg("family %s continues after another family", f->name);
            now_in(m, f);
            if (help) {
                if (f->help)
                    fail_msg("second HELP for %s", f->name);
                if (f->typed)
                    fail_msg("HELP after TYPE for %s", f->name);
                f->help = true;
                if (eol == name + len + 1)
                    fail_msg("empty HELP for %s", f->name);
            } else {
                if (f->typed)
                    fail_msg("second TYPE for %s", f->name);
                size_t tl = (size_t)(eol - (name + len + 1));
                if (tl == 0 || tl >= sizeof f->type)
                    fail_msg("bad TYPE for %s", f->name);
                memcpy(f->type, name + len + 1, tl);
                f->type[tl] = '\0';
                f->typed = true;
                if (strcmp(f->type, "counter") != 0 && strcmp(f->type, "gauge") != 0)
                    fail_msg("%s has TYPE %s (tallyd has counters and gauges)", f->name, f->type);
            }
        } else {
            assert_true(m->n < MAX_SAMPLES);
            sample_t *s = &m->s[m->n++];
            size_t len = 0;
            while (name_char(p[len], len == 0))
                len++;
            if (len == 0 || len >= sizeof s->name)
                fail_msg("bad sample line: %.*s", (int)(eol - p), p);
            memcpy(s->name, p, len);
            s->name[len] = '\0';
            family_t *f = family_of(m, p, len, false);
            if (f == NULL || !f->help || !f->typed)
                fail_msg("sample of %s before its HELP and TYPE", s->name);
            if (f->closed)
                fail_msg("sample of %s after another family began", s->name);
            const char *q = p + len;
            s->labels[0] = '\0';
            if (*q == '{')
                parse_labels(&q, s->labels, sizeof s->labels);
            if (*q != ' ')
                fail_msg("no space before the value: %.*s", (int)(eol - p), p);
            q++;
            char *end;
            s->value = strtod(q, &end);
            if (end == q || end != eol)
                fail_msg("bad value (or a timestamp) in: %.*s", (int)(eol - p), p);
        }
        p = eol + 1;
    }
    for (size_t i = 0; i < m->nfam; i++) {
        const family_t *f = &m->fam[i];
        size_t nl = strlen(f->name);
        if (!f->help || !f->typed)
            fail_msg("%s lacks HELP or TYPE", f->name);
        if (strncmp(f->name, "tallyd_", 7) != 0)
            fail_msg("%s is not prefixed tallyd_", f->name);
        bool total = nl > 6 && strcmp(f->name + nl - 6, "_total") == 0;
        if (strcmp(f->type, "counter") == 0 && !total)
            fail_msg("counter %s does not end in _total", f->name);
        if (strcmp(f->type, "gauge") == 0 && total)
            fail_msg("gauge %s ends in _total", f->name);
    }
}

/* The value of the sample name{labels} (labels as parse_labels writes
 * them, "" for none); fails when absent or repeated. */
static double metric(const metrics_t *m, const char *name, const char *labels)
{
    const sample_t *found = NULL;
    for (size_t i = 0; i < m->n; i++) {
        if (strcmp(m->s[i].name, name) == 0 && strcmp(m->s[i].labels, labels) == 0) {
            if (found != NULL)
                fail_msg("%s{%s} appears twice", name, labels);
            found = &m->s[i];
        }
    }
    if (found == NULL)
        fail_msg("no sample %s{%s}", name, labels);
    return found->value;
}

static size_t samples_of(const metrics_t *m, const char *name)
{
    size_t n = 0;
    for (size_t i = 0; i < m->n; i++)
        n += strcmp(m->s[i].name, name) == 0;
    return n;
}

static const family_t *family_named(const metrics_t *m, const char *name)
{
    for (size_t i = 0; i < m->nfam; i++)
        if (strcmp(m->fam[i].name, name) == 0)
            return &m->fam[i];
    fail_msg("no family %s", name);
    return NULL;
}

/* ---- events and their model ---------------------------------------------- */

typedef struct {
    int user, pin;
    const char *action;
    int64_t age_ms; /* before T */
} ev_t;

/* Applies evs to the store at T through the decoder. */
static void apply_events(fx_t *fx, const ev_t *evs, size_t n)
{
    tly_decoder_t *dec = tly_decoder_new(fx->fs);
    for (size_t i = 0; i < n; i++) {
        char json[256];
        snprintf(json, sizeof json,
                 "{\"user_id\":%d,\"pin_id\":%d,\"action\":\"%s\",\"ts\":%" PRId64 "}", evs[i].user,
                 evs[i].pin, evs[i].action, T - evs[i].age_ms);
        tly_event_t ev;
        assert_int_equal(tly_decode_json(dec, json, strlen(json), -1, &ev), TLY_OK);
        tly_store_apply(fx->d.store, &ev, 0, (int64_t)i, T);
    }
    tly_decoder_free(dec);
}

/* The model: clicks (user, action click) and impressions (pin, action
 * impression), each with a one-hour horizon; an event older than that is
 * dropped (EV_LATE) and creates nothing. Counts the distinct records,
 * the events that updated some feature, and the late drops. */
static void model(const ev_t *evs, size_t n, uint64_t *entities, uint64_t *updated, uint64_t *late)
{
    int users[64], pins[64];
    size_t nu = 0, np = 0;
    *entities = *updated = *late = 0;
    for (size_t i = 0; i < n; i++) {
        bool click = strcmp(evs[i].action, "click") == 0;
        bool impression = strcmp(evs[i].action, "impression") == 0;
        if (!click && !impression)
            continue;
        if (evs[i].age_ms > HOUR) {
            (*late)++;
            continue;
        }
        (*updated)++;
        int *ids = click ? users : pins;
        size_t *nids = click ? &nu : &np;
        int id = click ? evs[i].user : evs[i].pin;
        bool seen = false;
        for (size_t k = 0; k < *nids; k++)
            seen = seen || ids[k] == id;
        if (!seen)
            ids[(*nids)++] = id;
    }
    *entities = nu + np;
}

/* ---- tests -------------------------------------------------------------- */

static void test_healthz_is_ok_without_a_source(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    http_resp_t r = http(fx->port, "GET", "/healthz");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "ok\n");
    char v[128];
    assert_non_null(header(r.head, "Content-Type", v, sizeof v));
    assert_string_equal(v, "text/plain; charset=utf-8");
    resp_free(&r);
    fx_free(fx);
}

static void test_readyz_is_ready_without_a_source(void **state)
{
    (void)state;
    assert_true(tly_source_ready(NULL));
    fx_t *fx = fx_new("127.0.0.1:0", true);
    http_resp_t r = http(fx->port, "GET", "/readyz");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "ready\n");
    resp_free(&r);
    /* the query string is not part of the path */
    r = http(fx->port, "GET", "/readyz?verbose=1");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "ready\n");
    resp_free(&r);
    fx_free(fx);
}

static void test_metrics_parse_and_report_what_was_put_in(void **state)
{
    (void)state;
    static const ev_t evs[] = {
        {7, 100, "click", 30000},    {8, 100, "impression", 60000}, {7, 101, "click", 120000},
        {9, 102, "click", 2 * HOUR}, {8, 103, "impression", 1000},  {10, 104, "save", 5000},
    };
    size_t nevs = sizeof evs / sizeof evs[0];
    uint64_t entities, updated, late;
    model(evs, nevs, &entities, &updated, &late);
    assert_int_equal(entities, 3); /* user 7, pins 100 and 103 */

    fx_t *fx = fx_new("127.0.0.1:0", true);
    apply_events(fx, evs, nevs);
    atomic_store(&fx->d.server.commands, 42);
    atomic_store(&fx->d.server.connected, 3);
    atomic_store(&fx->d.server.connections_total, 17);
    atomic_store(&fx->d.server.protocol_errors, 2);
    atomic_store(&fx->d.server.bytes_out, UINT64_C(123456789012));

    int64_t before = T; /* uptime is at least (wall now - start) > 1 minute */
    http_resp_t r = http(fx->port, "GET", "/metrics");
    assert_int_equal(r.status, 200);
    char v[128];
    assert_non_null(header(r.head, "Content-Type", v, sizeof v));
    assert_string_equal(v, "text/plain; version=0.0.4; charset=utf-8");

    metrics_t *m = malloc(sizeof *m);
    assert_non_null(m);
    parse_metrics(r.body, m);

    assert_true(metric(m, "tallyd_up", "") == 1);
    assert_true(metric(m, "tallyd_ready", "") == 1);
    assert_true(metric(m, "tallyd_healthy", "") == 1);
    assert_true(metric(m, "tallyd_build_info", "version=" TALLYD_VERSION) == 1);
    assert_true(metric(m, "tallyd_uptime_seconds", "") >=
                (double)(before - fx->d.started_ms) / 1000);
    assert_true(metric(m, "tallyd_start_time_seconds", "") == (double)fx->d.started_ms / 1000);
    assert_true(metric(m, "tallyd_commands_total", "") == 42);
    assert_true(metric(m, "tallyd_clients_connected", "") == 3);
    assert_true(metric(m, "tallyd_connections_total", "") == 17);
    assert_true(metric(m, "tallyd_protocol_errors_total", "") == 2);
    assert_true(metric(m, "tallyd_net_output_bytes_total", "") == 123456789012.0);
    assert_true(metric(m, "tallyd_clients_max", "") == 10000);

    assert_true(metric(m, "tallyd_entities", "") == (double)entities);
    assert_true(metric(m, "tallyd_events_updated_total", "") == (double)updated);
    assert_true(metric(m, "tallyd_feature_updates_total", "") == (double)updated);
    assert_true(metric(m, "tallyd_feature_updates_dropped_total", "reason=ev_late") ==
                (double)late);
    assert_true(metric(m, "tallyd_store_bytes", "") > 0);
    assert_true(metric(m, "tallyd_entities_expired_total", "") == 0);

    /* every event rejection reason has its series, at 0 without a source */
    size_t nreasons = 0;
    for (int e = TLY_E_EV_TOO_LARGE; e < TLY_E__COUNT; e++, nreasons++) {
        char labels[64];
        snprintf(labels, sizeof labels, "reason=%s", tly_err_name((tly_err_t)e));
        for (char *c = labels; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        assert_true(metric(m, "tallyd_events_rejected_total", labels) == 0);
    }
    assert_int_equal(samples_of(m, "tallyd_events_rejected_total"), nreasons);
    assert_int_equal(samples_of(m, "tallyd_feature_updates_dropped_total"), nreasons);
    assert_string_equal(family_named(m, "tallyd_events_rejected_total")->type, "counter");
    assert_string_equal(family_named(m, "tallyd_entities")->type, "gauge");

    /* no source: nothing consumed, nothing behind, no partition, no event
     * time known */
    assert_true(metric(m, "tallyd_kafka_messages_consumed_total", "") == 0);
    assert_true(metric(m, "tallyd_kafka_lag_messages", "") == 0);
    assert_true(metric(m, "tallyd_kafka_partitions_assigned", "") == 0);
    assert_int_equal(samples_of(m, "tallyd_kafka_partition_lag_messages"), 0);
    assert_int_equal(samples_of(m, "tallyd_kafka_watermark_ms"), 0);
    (void)family_named(m, "tallyd_kafka_watermark_ms"); /* the family is still declared */

    free(m);
    resp_free(&r);
    fx_free(fx);
}

static void test_metrics_uptime_is_now_minus_start(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", false);
    tly_buf_t b = {0};
    tly_admin_metrics(&fx->d, fx->d.started_ms + 12345, &b);
    tly_buf_append(&b, "", 1);
    assert_non_null(strstr(b.data, "\ntallyd_uptime_seconds 12.345\n"));
    metrics_t *m = malloc(sizeof *m);
    assert_non_null(m);
    parse_metrics(b.data, m);
    assert_true(metric(m, "tallyd_uptime_seconds", "") == 12.345);
    free(m);
    tly_buf_fini(&b);
    fx_free(fx);
}

static void test_head_has_the_headers_and_no_body(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    http_resp_t get = http(fx->port, "GET", "/healthz");
    http_resp_t head = http(fx->port, "HEAD", "/healthz"); /* http() checks EOF follows */
    assert_int_equal(head.status, 200);
    char v1[32], v2[32];
    assert_non_null(header(head.head, "Content-Length", v1, sizeof v1));
    assert_non_null(header(get.head, "Content-Length", v2, sizeof v2));
    assert_string_equal(v1, v2);
    assert_int_equal(head.body_len, 0);
    resp_free(&get);
    resp_free(&head);
    fx_free(fx);
}

static void test_other_methods_get_405_with_allow(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    static const char *methods[] = {"POST", "PUT", "DELETE", "OPTIONS"};
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
        http_resp_t r = http(fx->port, methods[i], "/metrics");
        assert_int_equal(r.status, 405);
        char v[64];
        assert_non_null(header(r.head, "Allow", v, sizeof v));
        assert_string_equal(v, "GET, HEAD");
        resp_free(&r);
    }
    fx_free(fx);
}

static void test_unknown_paths_get_404(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    static const char *paths[] = {"/nope", "/", "/metrics/", "/healthzz", "/HEALTHZ"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        http_resp_t r = http(fx->port, "GET", paths[i]);
        assert_int_equal(r.status, 404);
        resp_free(&r);
    }
    fx_free(fx);
}

static double admin_counter(int port, const char *name)
{
    http_resp_t r = http(port, "GET", "/metrics");
    assert_int_equal(r.status, 200);
    metrics_t *m = malloc(sizeof *m);
    assert_non_null(m);
    parse_metrics(r.body, m);
    double v = metric(m, name, "");
    free(m);
    resp_free(&r);
    return v;
}

/* One address holds at most 8 connections; the 9th is refused and counted,
 * and 4xx answers are counted. */
static void test_per_address_limit_refuses_and_counts(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    double refused = admin_counter(fx->port, "tallyd_admin_connections_refused_total");
    double bad = admin_counter(fx->port, "tallyd_admin_bad_requests_total");
    http_resp_t nf = http(fx->port, "GET", "/nope");
    assert_int_equal(nf.status, 404);
    resp_free(&nf);
    assert_true(admin_counter(fx->port, "tallyd_admin_bad_requests_total") == bad + 1);

    int held[8];
    static const char partial[] = "GET /healthz HTTP/1.1\r\n"; /* no end of headers */
    for (int i = 0; i < 8; i++) {
        held[i] = connect_port(fx->port);
        send_all(held[i], partial, sizeof partial - 1);
    }
    /* the 9th from the same address: accepted by the kernel, closed by
     * the server without an answer */
    int fd = connect_port(fx->port);
    static const char req[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    send_all(fd, req, sizeof req - 1);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[64];
    ssize_t got = recv(fd, buf, sizeof buf, 0);
    assert_true(got == 0 || (got < 0 && errno == ECONNRESET));
    close(fd);
    for (int i = 0; i < 8; i++)
        close(held[i]);
    /* until the server has seen those 8 close, a new connection from this
     * address may still be refused: wait until one is answered (on a loaded
     * host libmicrohttpd may hold the slots until its 5 s idle timeout) */
    int64_t deadline = deadline_in(20000);
    for (;;) {
        int probe = connect_port(fx->port);
        send_all(probe, req, sizeof req - 1);
        setsockopt(probe, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        got = recv(probe, buf, sizeof buf, 0);
        close(probe);
        if (got > 0)
            break;
        if (mono_ms() > deadline)
            fail_msg("no connection answered after the held ones closed");
        usleep(100000);
    }
    while (admin_counter(fx->port, "tallyd_admin_connections_refused_total") < refused + 1) {
        if (mono_ms() > deadline)
            fail_msg("the refused connection was not counted");
        usleep(10000);
    }
    fx_free(fx);
}

/* With snapshots on, their counters are in /metrics (none written yet). */
static void test_snapshot_counters_in_metrics(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", false);
    fx->d.snapshot = tly_snapshot_new(fx->cfg); /* the default directory; nothing written */
    assert_non_null(fx->d.snapshot);
    tly_buf_t body = {0};
    tly_admin_metrics(&fx->d, T, &body);
    tly_buf_append(&body, "", 1);
    metrics_t *m = malloc(sizeof *m);
    assert_non_null(m);
    parse_metrics(body.data, m);
    assert_true(metric(m, "tallyd_snapshots_written_total", "") == 0);
    assert_true(metric(m, "tallyd_snapshots_failed_total", "") == 0);
    assert_true(metric(m, "tallyd_snapshots_rejected_total", "") == 0);
    assert_true(metric(m, "tallyd_snapshot_in_progress", "") == 0);
    assert_true(metric(m, "tallyd_last_snapshot_timestamp_seconds", "") == -1);
    free(m);
    tly_buf_fini(&body);
    tly_snapshot_free(fx->d.snapshot);
    fx->d.snapshot = NULL;
    fx_free(fx);
}

/* Two requests on one kept-alive connection. */
static void test_keep_alive_serves_a_second_request(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    int fd = connect_port(fx->port);
    static const char req[] = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    for (int i = 0; i < 2; i++) {
        send_all(fd, req, sizeof req - 1);
        http_resp_t r = {0};
        read_response(fd, false, &r);
        assert_int_equal(r.status, 200);
        assert_string_equal(r.body, "ok\n");
        resp_free(&r);
    }
    close(fd);
    fx_free(fx);
}

/* A connection that trickles its request (a byte every 100 ms, so never
 * idle) is shut down once it has taken longer than the request deadline,
 * and counted; a kept-alive connection whose requests each arrive in time
 * is not, however long it lives. */
static void test_a_request_trickled_past_the_deadline_is_cut_and_counted(void **state)
{
    (void)state;
    const int64_t deadline_ms = 1500;
    tly_admin_deadline_ms = deadline_ms;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    double cut0 = admin_counter(fx->port, "tallyd_admin_request_timeouts_total");

    /* every slot this address may hold, trickling */
    enum { N = 8 };
    int fd[N];
    int64_t opened[N], closed[N];
    static const char head[] = "GET /healthz HTTP/1.1\r\nX-Slow: ";
    for (int i = 0; i < N; i++) {
        fd[i] = connect_port(fx->port);
        send_all(fd[i], head, sizeof head - 1);
        opened[i] = mono_ms();
        closed[i] = -1;
    }
    int64_t give_up = deadline_in(deadline_ms + 20000);
    for (int open = N; open > 0;) {
        if (mono_ms() > give_up)
            fail_msg("%d trickling connections still open %" PRId64 " ms after the deadline", open,
                     (int64_t)20000);
        usleep(100000);
        for (int i = 0; i < N; i++) {
            if (closed[i] >= 0)
                continue;
            char c;
            ssize_t got = recv(fd[i], &c, 1, MSG_DONTWAIT);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK) ||
                send(fd[i], "a", 1, MSG_NOSIGNAL) < 0) {
                closed[i] = mono_ms();
                open--;
            }
        }
    }
    for (int i = 0; i < N; i++) {
        /* not before the deadline: each had sent a byte within 100 ms */
        assert_true(closed[i] - opened[i] >= deadline_ms);
        close(fd[i]);
    }
    assert_true(admin_counter(fx->port, "tallyd_admin_request_timeouts_total") >= cut0 + N);

    /* four requests 700 ms apart on one connection: 2.1 s in all, each in
     * time */
    int ka = connect_port(fx->port);
    static const char req[] = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    for (int i = 0; i < 4; i++) {
        if (i > 0)
            usleep(700000);
        send_all(ka, req, sizeof req - 1);
        http_resp_t r = {0};
        read_response(ka, false, &r);
        assert_int_equal(r.status, 200);
        resp_free(&r);
    }
    close(ka);
    fx_free(fx);
    tly_admin_deadline_ms = 10000;
}

/* A kept-alive connection left idle after an answer is closed by the idle
 * timeout (5 s), before the request deadline (10 s), and is not counted as
 * a request timeout. */
static void test_an_idle_kept_alive_connection_is_closed_uncounted(void **state)
{
    (void)state;
    tly_admin_deadline_ms = 10000;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    double cut0 = admin_counter(fx->port, "tallyd_admin_request_timeouts_total");
    int fd = connect_port(fx->port);
    static const char req[] = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    send_all(fd, req, sizeof req - 1);
    http_resp_t r = {0};
    read_response(fd, false, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    int64_t answered = mono_ms();
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    assert_int_equal(poll(&pfd, 1, 20000), 1); /* closed: readable at end of file */
    char c;
    assert_true(recv(fd, &c, 1, 0) <= 0);
    int64_t waited = mono_ms() - answered;
    close(fd);
    assert_true(waited >= 4000); /* not before the idle timeout (5 s, to a second) */
    assert_true(admin_counter(fx->port, "tallyd_admin_request_timeouts_total") == cut0);
    fx_free(fx);
}

static void test_port_in_use_fails_naming_the_address(void **state)
{
    (void)state;
    int busy = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(busy >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    assert_int_equal(bind(busy, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(busy, 1), 0);
    assert_int_equal(getsockname(busy, (struct sockaddr *)&sa, &len), 0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)ntohs(sa.sin_port));

    fx_t *fx = fx_new(addr, false);
    char err[256] = "untouched";
    assert_null(tly_admin_start(&fx->d, err, sizeof err));
    assert_non_null(strstr(err, addr));
    assert_non_null(strstr(err, "in use"));
    fx_free(fx);
    close(busy);
}

static void test_unassignable_address_fails_naming_it(void **state)
{
    (void)state;
    fx_t *fx = fx_new("192.0.2.1:0", false); /* TEST-NET-1: on no interface here */
    char err[256] = "untouched";
    assert_null(tly_admin_start(&fx->d, err, sizeof err));
    assert_non_null(strstr(err, "server.admin 192.0.2.1:0: "));
    fx_free(fx);
}

static void test_empty_address_disables_without_error(void **state)
{
    (void)state;
    fx_t *fx = fx_new("", false);
    char err[256] = "untouched";
    assert_null(tly_admin_start(&fx->d, err, sizeof err));
    assert_string_equal(err, "");
    tly_admin_stop(NULL);
    fx_free(fx);
}

/* 50 requests one after the other all succeed; stop then returns promptly
 * even with an idle client connected, and frees the port. */
static void test_fifty_sequential_requests_then_prompt_stop(void **state)
{
    (void)state;
    fx_t *fx = fx_new("127.0.0.1:0", true);
    static const char *paths[] = {"/healthz", "/readyz", "/metrics"};
    for (int i = 0; i < 50; i++) {
        http_resp_t r = http(fx->port, "GET", paths[i % 3]);
        assert_int_equal(r.status, 200);
        assert_true(r.body_len > 0);
        resp_free(&r);
    }
    int idle = connect_port(fx->port); /* connected, never sends */
    int port = fx->port;
    int64_t t0 = mono_ms();
    tly_admin_stop(fx->admin);
    fx->admin = NULL;
    int64_t took = mono_ms() - t0;
    assert_true(took < (int64_t)(1000 * timeout_mult()));
    /* the idle connection was closed */
    char c;
    struct pollfd pfd = {.fd = idle, .events = POLLIN};
    assert_int_equal(poll(&pfd, 1, remaining(deadline_in(WAIT_MS))), 1);
    assert_true(recv(idle, &c, 1, 0) <= 0);
    close(idle);
    /* the port is free again */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(fd, 1), 0);
    close(fd);
    fx_free(fx);
}

/* librdkafka under ThreadSanitizer crashes in its own threads (see
 * test_source.c): the test with a source is skipped there. */
#if defined(__SANITIZE_THREAD__)
#define SKIP_UNDER_TSAN() skip()
#else
#define SKIP_UNDER_TSAN() ((void)0)
#endif

/* × TLY_SOURCE_EMBEDDED_PARTITIONS partitions: more than admin.c's first
 * guess of the partition count (its copy is retried larger); the embedded
 * cluster takes about a third of a second per topic to create. */
#define NTOPICS 12

/* A real source on the embedded cluster with 12 topics (one named with a
 * double quote and a backslash): before it starts /healthz and /readyz
 * say why they are 503; once caught up both are 200 and /metrics lists
 * every partition's lag (96 of them), label values escaped. */
static void test_source_states_and_every_partition_in_metrics(void **state)
{
    (void)state;
    SKIP_UNDER_TSAN();
    char topics[NTOPICS * 16] = "", yaml[4096], err[512];
    for (int i = 0; i < NTOPICS; i++) {
        size_t len = strlen(topics);
        if (i == 0)
            snprintf(topics + len, sizeof topics - len, "'we\"ird\\topic'");
        else
            snprintf(topics + len, sizeof topics - len, ", adm%02d", i);
    }
    snprintf(yaml, sizeof yaml,
             "server:\n  admin: \"127.0.0.1:0\"\n"
             "kafka:\n  brokers: embedded\n  group: test-admin\n  mode: replica\n"
             "  start: earliest\n  topics: [%s]\n%s",
             topics, features_yaml);
    fx_t *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    if (tly_config_load_string(yaml, "admin.yaml", &fx->cfg, err, sizeof err) != TLY_OK ||
        tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK)
        fail_msg("%s", err);
    fx->d.cfg = fx->cfg;
    fx->d.fs = fx->fs;
    fx->d.store = tly_store_new(fx->fs);
    fx->d.started_ms = T;
    fx->d.source = tly_source_new(fx->cfg, fx->fs, fx->d.store, err, sizeof err);
    if (fx->d.source == NULL)
        fail_msg("source: %s", err);
    fx->admin = tly_admin_start(&fx->d, err, sizeof err);
    if (fx->admin == NULL)
        fail_msg("%s", err);
    fx->port = tly_admin_port(fx->admin);

    http_resp_t r = http(fx->port, "GET", "/healthz");
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "kafka consumer is not running\n");
    resp_free(&r);
    r = http(fx->port, "GET", "/readyz");
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "loading: no partitions assigned yet\n");
    resp_free(&r);

    if (tly_source_start(fx->d.source, err, sizeof err) != TLY_OK)
        fail_msg("start: %s", err);
    int64_t deadline = deadline_in(30000);
    for (;;) { /* /readyz itself is what is awaited */
        r = http(fx->port, "GET", "/readyz");
        bool ready = r.status == 200;
        if (ready)
            assert_string_equal(r.body, "ready\n");
        else
            assert_int_equal(strncmp(r.body, "loading: ", 9), 0);
        resp_free(&r);
        if (ready)
            break;
        if (remaining(deadline) == 0)
            fail_msg("/readyz not 200 within the deadline");
        struct pollfd none;
        poll(&none, 0, 20); /* between probes; the probe is the wait */
    }
    r = http(fx->port, "GET", "/healthz");
    assert_int_equal(r.status, 200);
    resp_free(&r);

    r = http(fx->port, "GET", "/metrics");
    assert_int_equal(r.status, 200);
    printf("# metrics body %zu bytes\n", r.body_len); /* all of it: read to Content-Length */
    metrics_t *m = malloc(sizeof *m);
    assert_non_null(m);
    parse_metrics(r.body, m);
    size_t nparts = (size_t)NTOPICS * TLY_SOURCE_EMBEDDED_PARTITIONS;
    assert_true(metric(m, "tallyd_ready", "") == 1);
    assert_true(metric(m, "tallyd_healthy", "") == 1);
    assert_true(metric(m, "tallyd_kafka_consumer_running", "") == 1);
    assert_true(metric(m, "tallyd_kafka_partitions_assigned", "") == (double)nparts);
    assert_true(metric(m, "tallyd_kafka_lag_messages", "") == 0);
    assert_int_equal(samples_of(m, "tallyd_kafka_partition_lag_messages"), nparts);
    for (int i = 0; i < NTOPICS; i++) {
        for (int p = 0; p < TLY_SOURCE_EMBEDDED_PARTITIONS; p++) {
            char labels[96];
            if (i == 0)
                snprintf(labels, sizeof labels, "topic=we\"ird\\topic,partition=%d", p);
            else
                snprintf(labels, sizeof labels, "topic=adm%02d,partition=%d", i, p);
            assert_true(metric(m, "tallyd_kafka_partition_lag_messages", labels) == 0);
        }
    }
    assert_non_null(strstr(r.body, "{topic=\"we\\\"ird\\\\topic\",partition=\"0\"} 0\n"));
    free(m);
    resp_free(&r);

    tly_admin_stop(fx->admin);
    fx->admin = NULL;
    tly_source_free(fx->d.source);
    fx_free(fx);
}

int main(void)
{
    tly_log_set_level(TLY_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_healthz_is_ok_without_a_source),
        cmocka_unit_test(test_readyz_is_ready_without_a_source),
        cmocka_unit_test(test_metrics_parse_and_report_what_was_put_in),
        cmocka_unit_test(test_metrics_uptime_is_now_minus_start),
        cmocka_unit_test(test_head_has_the_headers_and_no_body),
        cmocka_unit_test(test_other_methods_get_405_with_allow),
        cmocka_unit_test(test_unknown_paths_get_404),
        cmocka_unit_test(test_keep_alive_serves_a_second_request),
        cmocka_unit_test(test_snapshot_counters_in_metrics),
        cmocka_unit_test(test_per_address_limit_refuses_and_counts),
        cmocka_unit_test(test_a_request_trickled_past_the_deadline_is_cut_and_counted),
        cmocka_unit_test(test_an_idle_kept_alive_connection_is_closed_uncounted),
        cmocka_unit_test(test_port_in_use_fails_naming_the_address),
        cmocka_unit_test(test_unassignable_address_fails_naming_it),
        cmocka_unit_test(test_empty_address_disables_without_error),
        cmocka_unit_test(test_fifty_sequential_requests_then_prompt_stop),
        cmocka_unit_test(test_source_states_and_every_partition_in_metrics),
    };
    tly_rcu_thread_online(); /* the store's writer and its free */
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tly_rcu_thread_offline();
    return rc;
}
