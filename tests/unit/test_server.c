/*
 * test_server.c — the RESP server over real sockets: a daemon context built
 * by hand (a one-feature config, an empty store, no source), the server on
 * 127.0.0.1 port 0 (and a unix socket), and raw blocking or nonblocking
 * client sockets that write requests and compare replies byte for byte with
 * RESP written out here. Waits poll with deadlines (stretched by
 * TLY_TEST_TIMEOUT_MULT); nothing sleeps to synchronise.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "tallyd/commands.h"
#include "tallyd/decode.h"
#include "tallyd/log.h"
#include "tallyd/rcu.h"
#include "tallyd/server.h"

#define WAIT_MS 5000 /* default deadline of one wait, before the multiplier */

static const char *features_yaml =
    "features:\n"
    "  - { name: clicks, entity: user, key: user_id, agg: count, windows: [1m] }\n";

typedef struct {
    tly_config_t *cfg;
    tly_featset_t *fs;
    tly_daemon_t d;
    tly_server_t *srv;
    char dir[64]; /* temporary directory of the unix socket, "" = none */
    char unix_path[128];
} fx_t;

/* ---- time and deadlines ------------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t deadline_in(int64_t ms)
{
    const char *m = getenv("TLY_TEST_TIMEOUT_MULT");
    double mult = m != NULL ? atof(m) : 1.0;
    if (mult < 1.0)
        mult = 1.0;
    return mono_ms() + (int64_t)((double)ms * mult);
}

static int remaining(int64_t deadline)
{
    int64_t left = deadline - mono_ms();
    return left > 0 ? (int)left : 0;
}

/* ---- fixture ------------------------------------------------------------ */

/* Loads "server:" with `listen` (port 0: any free port), the keys in
 * server_keys (lines indented by two spaces) and, when with_unix, a unix
 * socket in a fresh directory; starts the server. */
static const char *unix_name = "tallyd.sock"; /* the socket's file in fx->dir */

static fx_t *fx_start_at(const char *listen, const char *server_keys, bool with_unix)
{
    fx_t *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    char err[512], yaml[2048], unix_line[256] = "";
    if (with_unix) {
        snprintf(fx->dir, sizeof fx->dir, "/tmp/tallyd-test-XXXXXX");
        assert_non_null(mkdtemp(fx->dir));
        snprintf(fx->unix_path, sizeof fx->unix_path, "%s/%s", fx->dir, unix_name);
        unix_name = "tallyd.sock"; /* for the next fixture */
        snprintf(unix_line, sizeof unix_line, "  unix: %s\n", fx->unix_path);
    }
    snprintf(yaml, sizeof yaml, "server:\n  listen: \"%s\"\n%s%s%s", listen, server_keys, unix_line,
             features_yaml);
    if (tly_config_load_string(yaml, "server.yaml", &fx->cfg, err, sizeof err) != TLY_OK ||
        tly_featset_compile(fx->cfg, &fx->fs, err, sizeof err) != TLY_OK)
        fail_msg("%s", err);
    fx->d.cfg = fx->cfg;
    fx->d.fs = fx->fs;
    fx->d.store = tly_store_new(fx->fs);
    fx->d.started_ms = 1700000000000;
    atomic_init(&fx->d.server.next_client_id, 1);
    fx->srv = tly_server_new(&fx->d, err, sizeof err);
    if (fx->srv == NULL)
        fail_msg("%s", err);
    assert_true(fx->d.tcp_port > 0);
    if (tly_server_start(fx->srv, err, sizeof err) != TLY_OK)
        fail_msg("%s", err);
    return fx;
}

static fx_t *fx_start(const char *server_keys)
{
    return fx_start_at("127.0.0.1:0", server_keys, false);
}

/* Stops and frees the server (tly_server_free asserts uv_loop_close() == 0
 * for every loop) and everything else. */
static void fx_stop(fx_t *fx)
{
    tly_server_stop_async(fx->srv);
    tly_server_free(fx->srv);
    if (fx->dir[0] != '\0') {
        struct stat st;
        assert_int_equal(lstat(fx->unix_path, &st), -1); /* the server removed it */
        rmdir(fx->dir);
    }
    tly_store_free(fx->d.store);
    tly_featset_free(fx->fs);
    tly_config_free(fx->cfg);
    free(fx);
}

static uint64_t stat_of(atomic_uint_fast64_t *v)
{
    return atomic_load_explicit(v, memory_order_relaxed);
}

/* Waits until lo <= *v <= hi; false at the deadline. */
static bool wait_stat_in(atomic_uint_fast64_t *v, uint64_t lo, uint64_t hi)
{
    int64_t deadline = deadline_in(WAIT_MS);
    while (stat_of(v) < lo || stat_of(v) > hi) {
        if (mono_ms() > deadline)
            return false;
        poll(NULL, 0, 1); /* a counter has no file descriptor to wait on */
    }
    return true;
}

/* Waits until *v == want; false at the deadline. */
static bool wait_stat(atomic_uint_fast64_t *v, uint64_t want)
{
    return wait_stat_in(v, want, want);
}

/* ---- client sockets ----------------------------------------------------- */

/* A loopback connection to port whose kernel buffers are rcvbuf and
 * sndbuf bytes (0: the kernel's own, autotuned), set before connect. */
static int connect_tcp_buffers(int port, int rcvbuf, int sndbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (sndbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sin, sizeof sin), 0);
    return fd;
}

static int connect_tcp(int port)
{
    return connect_tcp_buffers(port, 0, 0);
}

static int connect_unix(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    snprintf(sun.sun_path, sizeof sun.sun_path, "%s", path);
    assert_int_equal(connect(fd, (struct sockaddr *)&sun, sizeof sun), 0);
    return fd;
}

static void set_nonblocking(int fd)
{
    assert_int_equal(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), 0);
}

/* Writes all of p[0..n); false if the peer went away. */
static bool send_all(int fd, const void *p, size_t n)
{
    const char *s = p;
    int64_t deadline = deadline_in(WAIT_MS);
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            s += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return false;
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        assert_true(poll(&pfd, 1, remaining(deadline)) > 0);
    }
    return true;
}

static void send_str(int fd, const char *s)
{
    assert_true(send_all(fd, s, strlen(s)));
}

/* Reads until n bytes have come, EOF or the deadline; returns the count. */
static size_t recv_n(int fd, char *buf, size_t n, int64_t deadline)
{
    size_t got = 0;
    while (got < n) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, remaining(deadline)) <= 0)
            break;
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
            break;
        if (r > 0)
            got += (size_t)r;
    }
    return got;
}

/* Reads everything until EOF (true) or the deadline (false); keeps the first
 * cap - 1 bytes in buf, NUL-terminated, and their count in *len. A reset
 * counts as EOF. */
static bool recv_to_eof(int fd, char *buf, size_t cap, size_t *len)
{
    int64_t deadline = deadline_in(WAIT_MS);
    size_t got = 0;
    char tmp[4096];
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, remaining(deadline)) <= 0)
            return false;
        ssize_t r = recv(fd, tmp, sizeof tmp, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno == ECONNRESET))
            break;
        if (r < 0)
            continue;
        size_t keep = (size_t)r < cap - 1 - got ? (size_t)r : cap - 1 - got;
        memcpy(buf + got, tmp, keep);
        got += keep;
    }
    buf[got] = '\0';
    *len = got;
    return true;
}

/* Reads strlen(want) bytes and compares them with want. */
static void expect(int fd, const char *want)
{
    size_t n = strlen(want);
    char *got = malloc(n + 1);
    assert_non_null(got);
    size_t have = recv_n(fd, got, n, deadline_in(WAIT_MS));
    got[have] = '\0';
    assert_int_equal(have, n);
    assert_memory_equal(got, want, n);
    free(got);
}

/* Reads a bulk string reply and compares it with want[0..n). */
static void expect_bulk(int fd, const char *want, size_t n)
{
    char head[32];
    snprintf(head, sizeof head, "$%zu\r\n", n);
    expect(fd, head);
    char *got = malloc(n + 2);
    assert_non_null(got);
    assert_int_equal(recv_n(fd, got, n + 2, deadline_in(WAIT_MS)), n + 2);
    assert_memory_equal(got, want, n);
    assert_memory_equal(got + n, "\r\n", 2);
    free(got);
}

/* Sends INFO stats on fd and returns the value of `field`. */
static uint64_t info_stat(int fd, const char *field)
{
    send_str(fd, "INFO stats\r\n");
    char head[32];
    size_t n = 0;
    int64_t deadline = deadline_in(WAIT_MS);
    while (n < sizeof head - 1 && (n < 2 || head[n - 1] != '\n'))
        assert_int_equal(recv_n(fd, head + n++, 1, deadline), 1);
    head[n] = '\0';
    assert_int_equal(head[0], '$');
    size_t len = (size_t)atol(head + 1);
    char *text = malloc(len + 3);
    assert_non_null(text);
    assert_int_equal(recv_n(fd, text, len + 2, deadline), len + 2);
    text[len] = '\0';
    char key[64];
    snprintf(key, sizeof key, "\n%s:", field);
    const char *at = strstr(text, key);
    assert_non_null(at);
    uint64_t v = strtoull(at + strlen(key), NULL, 10);
    free(text);
    return v;
}

/* A multibulk request of the given arguments (NUL-terminated strings). */
static size_t build_request(char *out, size_t cap, size_t argc, const char *const *argv)
{
    size_t n = (size_t)snprintf(out, cap, "*%zu\r\n", argc);
    for (size_t i = 0; i < argc; i++)
        n += (size_t)snprintf(out + n, cap - n, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
    assert_true(n < cap);
    return n;
}

/* A request stream, the replies it should get and room for the replies. */
typedef struct {
    char *req, *want, *got;
    size_t rlen, wlen;
} pipe_bufs_t;

static pipe_bufs_t pipe_bufs_new(size_t cap)
{
    pipe_bufs_t b = {malloc(cap), malloc(cap), malloc(cap), 0, 0};
    assert_non_null(b.req);
    assert_non_null(b.want);
    assert_non_null(b.got);
    return b;
}

static void pipe_bufs_free(pipe_bufs_t *b)
{
    free(b->req);
    free(b->want);
    free(b->got);
}

/* ---- tests -------------------------------------------------------------- */

static void read_line(int fd, char *buf, size_t cap);
static char *client_list(int fd, const char *rest);

static void test_ping_over_raw_socket_returns_pong(void **state)
{
    (void)state;
    fx_t *fx = fx_start("");
    int fd = connect_tcp(fx->d.tcp_port);
    send_str(fd, "PING\r\n*1\r\n$4\r\nPING\r\n");
    expect(fd, "+PONG\r\n+PONG\r\n");
    assert_true(wait_stat(&fx->d.server.connected, 1));
    assert_int_equal(stat_of(&fx->d.server.connections_total), 1);
    close(fd);
    assert_true(wait_stat(&fx->d.server.connected, 0));
    fx_stop(fx);
}

static void test_pipelined_requests_in_one_write_come_back_in_order(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  threads: 2\n");
    enum { N = 1000 };
    size_t cap = N * 64;
    pipe_bufs_t b = pipe_bufs_new(cap);
    for (int i = 0; i < N; i++) {
        char arg[16];
        snprintf(arg, sizeof arg, "m%d", i);
        if (i % 2 == 0) {
            const char *argv[] = {"PING"};
            b.rlen += build_request(b.req + b.rlen, cap - b.rlen, 1, argv);
            b.wlen += (size_t)snprintf(b.want + b.wlen, cap - b.wlen, "+PONG\r\n");
        } else {
            const char *argv[] = {"ECHO", arg};
            b.rlen += build_request(b.req + b.rlen, cap - b.rlen, 2, argv);
            b.wlen +=
                (size_t)snprintf(b.want + b.wlen, cap - b.wlen, "$%zu\r\n%s\r\n", strlen(arg), arg);
        }
    }
    int fd = connect_tcp(fx->d.tcp_port);
    assert_true(send_all(fd, b.req, b.rlen));
    assert_int_equal(recv_n(fd, b.got, b.wlen, deadline_in(WAIT_MS)), b.wlen);
    assert_memory_equal(b.got, b.want, b.wlen);
    assert_int_equal(stat_of(&fx->d.server.commands), N);
    assert_int_equal(stat_of(&fx->d.server.bytes_in), b.rlen);
    close(fd);
    pipe_bufs_free(&b);
    fx_stop(fx);
}

/* A client whose pipeline keeps its socket full ends its turn after each
 * full read (read_yields) and resumes in the next loop iteration: every
 * reply comes back, in order, and another client is answered meanwhile. */
static void test_deep_pipeline_yields_between_reads_and_stays_in_order(void **state)
{
    (void)state;
    fx_t *fx = fx_start("");
    enum { N = 20000 };
    size_t cap = (size_t)N * 160;
    pipe_bufs_t b = pipe_bufs_new(cap);
    for (int i = 0; i < N; i++) {
        char arg[112];
        snprintf(arg, sizeof arg, "r%06d-%0100d", i, 0);
        const char *argv[] = {"ECHO", arg};
        b.rlen += build_request(b.req + b.rlen, cap - b.rlen, 2, argv);
        b.wlen +=
            (size_t)snprintf(b.want + b.wlen, cap - b.wlen, "$%zu\r\n%s\r\n", strlen(arg), arg);
    }
    const char *req = b.req, *want = b.want;
    char *got = b.got;
    size_t rlen = b.rlen, wlen = b.wlen;
    int hog = connect_tcp(fx->d.tcp_port), other = connect_tcp(fx->d.tcp_port);
    size_t sent = 0, have = 0;
    bool other_done = false;
    int64_t deadline = deadline_in(4 * WAIT_MS);
    while (have < wlen) {
        struct pollfd pfd = {.fd = hog, .events = POLLIN | (sent < rlen ? POLLOUT : 0)};
        assert_true(poll(&pfd, 1, remaining(deadline)) > 0);
        if (sent < rlen) {
            ssize_t w = send(hog, req + sent, rlen - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0)
                sent += (size_t)w;
        }
        ssize_t r = recv(hog, got + have, wlen - have, MSG_DONTWAIT);
        if (r > 0)
            have += (size_t)r;
        if (!other_done && have > 0 && sent < rlen) { /* while the pipeline runs */
            send_str(other, "PING\r\n");
            expect(other, "+PONG\r\n");
            other_done = true;
        }
    }
    assert_int_equal(have, wlen);
    assert_memory_equal(got, want, wlen);
    assert_true(stat_of(&fx->d.server.read_yields) >= 1);
    if (!other_done) { /* the pipeline ended first: still answered */
        send_str(other, "PING\r\n");
        expect(other, "+PONG\r\n");
    }
    close(hog);
    close(other);
    pipe_bufs_free(&b);
    fx_stop(fx);
}

/* Applies n clicks of user `id` to the fixture's store, 5 s before the
 * wall clock (without events.time, the message timestamp is the event
 * time). The test thread is RCU-registered (main). */
static void add_clicks(fx_t *fx, int id, int n)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    tly_decoder_t *dec = tly_decoder_new(fx->fs);
    char json[64];
    int len = snprintf(json, sizeof json, "{\"user_id\": %d}", id);
    for (int i = 0; i < n; i++) {
        tly_event_t ev;
        assert_int_equal(tly_decode_json(dec, json, (size_t)len, now - 5000, &ev), TLY_OK);
        assert_int_equal(tly_store_apply(fx->d.store, &ev, 0, i, now), TLY_OK);
    }
    tly_decoder_free(dec);
}

/* FEATURES user <id> as a multibulk request; returns its length. */
static size_t features_request(char *buf, size_t cap, int id)
{
    char arg[16];
    snprintf(arg, sizeof arg, "%d", id);
    const char *argv[] = {"FEATURES", "user", arg};
    return build_request(buf, cap, 3, argv);
}

/* The reply to FEATURES user <id> when the user has n clicks (RESP2: the
 * map as a flat array of name and value). */
static void expect_clicks(int fd, int n)
{
    char want[64];
    snprintf(want, sizeof want, "*2\r\n$9\r\nclicks:1m\r\n:%d\r\n", n);
    expect(fd, want);
}

/*
 * Requests from many clients read in one poll are hinted to the store
 * together and then executed (server.c, check_cb): every client gets its
 * own entity's reply, whatever state its first request was in when
 * hinted. Each round, N clients write at once, each asking for another
 * user (user u holds u clicks); client 0 sends half a request first and
 * the rest after the others, client 1 two requests in one write; in the
 * first round one client sends a malformed request and another its request
 * followed by its EOF. Rounds go on until the server has hinted requests
 * read together (hinted_requests), at most 200.
 */
static void test_requests_read_together_each_get_their_own_reply(void **state)
{
    (void)state;
    enum { N = 40, ROUNDS = 200 };
    fx_t *fx = fx_start("");
    for (int u = 1; u <= N; u++)
        add_clicks(fx, u, u);
    int fd[N];
    for (int i = 0; i < N; i++)
        fd[i] = connect_tcp(fx->d.tcp_port);
    int bad = connect_tcp(fx->d.tcp_port), eof = connect_tcp(fx->d.tcp_port);
    assert_true(wait_stat(&fx->d.server.connected, N + 2));
    char req[128] = "", two[256];
    int r = 0;
    for (; r < ROUNDS && (r < 3 || stat_of(&fx->d.server.hinted_requests) == 0); r++) {
        size_t half = features_request(req, sizeof req, 1 + r % N) / 2;
        assert_true(send_all(fd[0], req, half));
        for (int i = 1; i < N; i++) {
            int user = 1 + (i + r) % N;
            size_t len = features_request(two, sizeof two, user);
            if (i == 1)
                len += features_request(two + len, sizeof two - len, N + 1 - user);
            assert_true(send_all(fd[i], two, len));
            if (r == 0 && i == N / 2) {
                char last[128];
                size_t elen = features_request(last, sizeof last, 7);
                send_str(bad, "*abc\r\n");
                assert_true(send_all(eof, last, elen));
                assert_int_equal(shutdown(eof, SHUT_WR), 0);
            }
        }
        assert_true(send_all(fd[0], req + half, strlen(req + half)));
        for (int i = 0; i < N; i++) {
            int user = 1 + (i + r) % N;
            expect_clicks(fd[i], user);
            if (i == 1)
                expect_clicks(fd[i], N + 1 - user);
        }
        if (r == 0) {
            char buf[256];
            size_t got;
            assert_true(recv_to_eof(bad, buf, sizeof buf, &got));
            assert_string_equal(buf, "-ERR Protocol error: invalid multibulk length\r\n");
            assert_true(recv_to_eof(eof, buf, sizeof buf, &got));
            assert_string_equal(buf, "*2\r\n$9\r\nclicks:1m\r\n:7\r\n");
        }
    }
    assert_true(stat_of(&fx->d.server.hinted_requests) > 0);
    assert_int_equal(stat_of(&fx->d.server.protocol_errors), 1);
    /* every request ran: N + 1 a round, and the EOF client's */
    assert_int_equal(stat_of(&fx->d.server.commands), (uint64_t)r * (N + 1) + 1);
    close(bad);
    close(eof);
    for (int i = 0; i < N; i++)
        close(fd[i]);
    fx_stop(fx);
}

/*
 * A pipeline of reads on one connection: the server parses each request's
 * successor ahead to hint the store (server.c, peek_next), then parses it
 * again in its turn. Every reply is its own user's, in order, whatever the
 * next request is: another FEATURES, an inline one, one longer than
 * PEEK_MAX (an unknown user, whose id is 5,000 bytes: no clicks), a PING,
 * or the first half of one whose rest comes later.
 */
static void test_pipelined_reads_each_get_their_own_reply(void **state)
{
    (void)state;
    enum { N = 60 };
    fx_t *fx = fx_start("");
    for (int u = 1; u <= N; u++)
        add_clicks(fx, u, u);
    size_t cap = 64 * 1024, len = 0;
    char *req = malloc(cap), *want = malloc(cap);
    assert_non_null(req);
    assert_non_null(want);
    size_t wlen = 0;
    for (int u = 1; u <= N; u++) {
        if (u % 10 == 3) {
            len += (size_t)snprintf(req + len, cap - len, "FEATURES user %d\r\n", u);
        } else if (u % 10 == 5) {
            char id[5001];
            memset(id, '9', 5000);
            id[5000] = '\0';
            const char *argv[] = {"FEATURES", "user", id};
            len += build_request(req + len, cap - len, 3, argv);
            wlen += (size_t)snprintf(want + wlen, cap - wlen, "*2\r\n$9\r\nclicks:1m\r\n:0\r\n");
            len += (size_t)snprintf(req + len, cap - len, "PING\r\n");
            wlen += (size_t)snprintf(want + wlen, cap - wlen, "+PONG\r\n");
            len += features_request(req + len, cap - len, u);
        } else {
            len += features_request(req + len, cap - len, u);
        }
        wlen += (size_t)snprintf(want + wlen, cap - wlen, "*2\r\n$9\r\nclicks:1m\r\n:%d\r\n", u);
    }
    size_t last = features_request(req + len, cap - len, 17);
    int fd = connect_tcp(fx->d.tcp_port);
    assert_true(send_all(fd, req, len + last / 2));
    char *got = malloc(wlen);
    assert_non_null(got);
    assert_int_equal(recv_n(fd, got, wlen, deadline_in(WAIT_MS)), wlen);
    assert_memory_equal(got, want, wlen);
    assert_true(send_all(fd, req + len + last / 2, last - last / 2));
    expect_clicks(fd, 17);
    close(fd);
    free(got);
    free(want);
    free(req);
    fx_stop(fx);
}

static void test_unix_socket_serves_requests_and_is_removed(void **state)
{
    (void)state;
    fx_t *fx = fx_start_at("127.0.0.1:0", "", true);
    int fd = connect_unix(fx->unix_path);
    send_str(fd, "ECHO hello\r\nCLIENT ID\r\n");
    expect(fd, "$5\r\nhello\r\n:1\r\n");
    close(fd);
    fx_stop(fx); /* asserts the socket file is gone */
}

/* A unix socket path near the longest a socket can have (107 bytes): its
 * clients' addr is the whole path and ":0", and CLIENT KILL ADDR finds
 * them by it. */
static void test_long_unix_socket_path_names_its_clients_whole(void **state)
{
    (void)state;
    /* 83 bytes after the directory's 24 ("/tmp/tallyd-test-XXXXXX/"): 107 */
    unix_name = "a-long-socket-file-name-so-that-the-whole-path-nears-"
                "the-limit-of-sun-path-xyz.sock";
    fx_t *fx = fx_start_at("127.0.0.1:0", "", true);
    assert_int_equal(strlen(fx->unix_path), 107);
    int u = connect_unix(fx->unix_path);
    send_str(u, "CLIENT INFO\r\n");
    char head[32];
    read_line(u, head, sizeof head);
    size_t n = (size_t)strtoul(head + 1, NULL, 10);
    char *info = malloc(n + 3);
    assert_non_null(info);
    assert_int_equal(recv_n(u, info, n + 2, deadline_in(WAIT_MS)), n + 2);
    info[n] = '\0';
    char want[320];
    snprintf(want, sizeof want, " addr=%s:0 laddr=%s:0 ", fx->unix_path, fx->unix_path);
    if (strstr(info, want) == NULL)
        fail_msg("CLIENT INFO lacks \"%s\":\n%s", want, info);
    int t = connect_tcp(fx->d.tcp_port);
    char kill[256];
    snprintf(kill, sizeof kill, "CLIENT KILL ADDR %s:0\r\n", fx->unix_path);
    send_str(t, kill);
    expect(t, ":1\r\n");
    char rest[64];
    size_t len;
    assert_true(recv_to_eof(u, rest, sizeof rest, &len));
    assert_int_equal(len, 0);
    free(info);
    close(u);
    close(t);
    fx_stop(fx);
}

/* CLIENT LIST's omem is what a client has queued now: nothing, once it
 * read its replies (not the bytes queued when its last command ran). */
static void test_client_list_omem_is_zero_once_replies_are_read(void **state)
{
    (void)state;
    fx_t *fx = fx_start("");
    int a = connect_tcp(fx->d.tcp_port);
    send_str(a, "CLIENT SETNAME omem-probe\r\nECHO abcdefgh\r\nCLIENT ID\r\n");
    expect(a, "+OK\r\n$8\r\nabcdefgh\r\n:1\r\n");
    int b = connect_tcp(fx->d.tcp_port);
    char *all = client_list(b, "");
    const char *line = strstr(all, " name=omem-probe ");
    assert_non_null(line);
    const char *omem = strstr(line, " omem=");
    assert_non_null(omem);
    assert_int_equal(strtoul(omem + 6, NULL, 10), 0);
    free(all);
    close(a);
    close(b);
    fx_stop(fx);
}

static void test_protocol_error_closes_only_that_client(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  threads: 2\n");
    int bad = connect_tcp(fx->d.tcp_port), good = connect_tcp(fx->d.tcp_port);
    send_str(good, "PING\r\n");
    expect(good, "+PONG\r\n");
    /* a valid request first: its reply comes before the error */
    send_str(bad, "PING\r\n*abc\r\nPING\r\n");
    char buf[256];
    size_t len;
    assert_true(recv_to_eof(bad, buf, sizeof buf, &len));
    assert_string_equal(buf, "+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n");
    assert_int_equal(stat_of(&fx->d.server.protocol_errors), 1);
    send_str(good, "ECHO still-here\r\n");
    expect(good, "$10\r\nstill-here\r\n");
    close(bad);
    close(good);
    fx_stop(fx);
}

static void test_max_clients_refuses_the_third_connection(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  threads: 2\n  max_clients: 2\n");
    int a = connect_tcp(fx->d.tcp_port), b = connect_tcp(fx->d.tcp_port);
    send_str(a, "PING\r\n");
    expect(a, "+PONG\r\n");
    send_str(b, "PING\r\n");
    expect(b, "+PONG\r\n");
    int c = connect_tcp(fx->d.tcp_port);
    char buf[256];
    size_t len;
    assert_true(recv_to_eof(c, buf, sizeof buf, &len));
    assert_string_equal(buf, "-ERR max number of clients reached\r\n");
    assert_int_equal(stat_of(&fx->d.server.rejected_maxclients), 1);
    assert_int_equal(stat_of(&fx->d.server.connected), 2);
    close(c);
    /* a slot freed is a slot usable */
    close(a);
    assert_true(wait_stat(&fx->d.server.connected, 1));
    int d = connect_tcp(fx->d.tcp_port);
    send_str(d, "PING\r\n");
    expect(d, "+PONG\r\n");
    close(b);
    close(d);
    fx_stop(fx);
}

static void test_request_over_max_query_buffer_is_a_protocol_error(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  max_query_buffer: 65536\n  max_bulk: 65536\n");
    int fd = connect_tcp(fx->d.tcp_port);
    enum { BIG = 60000 };
    char *arg = malloc(BIG + 1);
    assert_non_null(arg);
    memset(arg, 'q', BIG);
    arg[BIG] = '\0';
    /* one bulk below the limit is fine */
    char head[64];
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", BIG);
    send_str(fd, head);
    assert_true(send_all(fd, arg, BIG));
    send_str(fd, "\r\n");
    expect_bulk(fd, arg, BIG);
    /* a request over the limit that arrives in one write, completed by
     * the read that takes it past the limit, is refused all the same */
    int one = connect_tcp(fx->d.tcp_port);
    snprintf(head, sizeof head, "*3\r\n$4\r\nECHO\r\n$%d\r\n", BIG);
    char *whole = malloc(2 * BIG + 64);
    assert_non_null(whole);
    size_t wl = (size_t)snprintf(whole, 64, "%s", head);
    memcpy(whole + wl, arg, BIG);
    wl += BIG;
    wl += (size_t)sprintf(whole + wl, "\r\n$%d\r\n", 6000);
    memset(whole + wl, 'r', 6000);
    wl += 6000;
    memcpy(whole + wl, "\r\n", 2);
    wl += 2;
    send_all(one, whole, wl); /* the server may be gone before the end */
    char one_buf[256];
    size_t one_len;
    assert_true(recv_to_eof(one, one_buf, sizeof one_buf, &one_len));
    assert_string_equal(one_buf, "-ERR Protocol error: request too large\r\n");
    close(one);
    free(whole);
    assert_int_equal(stat_of(&fx->d.server.protocol_errors), 1);
    /* two of them in one pending request are over 64 KiB */
    snprintf(head, sizeof head, "*3\r\n$4\r\nECHO\r\n$%d\r\n", BIG);
    send_str(fd, head);
    assert_true(send_all(fd, arg, BIG));
    snprintf(head, sizeof head, "\r\n$%d\r\n", BIG);
    send_str(fd, head);
    send_all(fd, arg, 10000); /* the server may be gone before the end */
    char buf[256];
    size_t len;
    assert_true(recv_to_eof(fd, buf, sizeof buf, &len));
    assert_string_equal(buf, "-ERR Protocol error: request too large\r\n");
    assert_int_equal(stat_of(&fx->d.server.protocol_errors), 2);
    close(fd);
    free(arg);
    fx_stop(fx);
}

/* Byte i of the stream of replies to ECHO <ARG x's>. */
#define ARG 4000
static char echo_reply_byte(size_t i)
{
    static const char head[] = "$4000\r\n";
    size_t k = i % (sizeof head - 1 + ARG + 2);
    if (k < sizeof head - 1)
        return head[k];
    k -= sizeof head - 1;
    return k < ARG ? 'x' : (k == ARG ? '\r' : '\n');
}

static void test_client_that_never_reads_is_paused_and_bounded(void **state)
{
    (void)state;
    /* output_stall: the client stays paused however long it reads nothing */
    fx_t *fx = fx_start("  threads: 2\n  output_soft_limit: 4096\n  max_output_buffer: 65536\n"
                        "  output_stall: 1h\n");
    const size_t reply_len = 7 + ARG + 2;
    char *req = malloc(ARG + 64);
    assert_non_null(req);
    size_t req_len = (size_t)snprintf(req, 64, "*2\r\n$4\r\nECHO\r\n$%d\r\n", ARG);
    memset(req + req_len, 'x', ARG);
    req_len += ARG;
    memcpy(req + req_len, "\r\n", 2);
    req_len += 2;

    /* keep the kernel's share of the test small */
    int slow = connect_tcp_buffers(fx->d.tcp_port, 16384, 65536);
    set_nonblocking(slow);

    /* Send until the socket stays full: the server stopped reading. */
    size_t started = 0, pos = 0; /* requests begun; bytes of the current one sent */
    int64_t deadline = deadline_in(4 * WAIT_MS);
    for (;;) {
        ssize_t n = send(slow, req + pos, req_len - pos, MSG_NOSIGNAL);
        if (n > 0) {
            if (pos == 0)
                started++;
            pos = (pos + (size_t)n) % req_len;
            continue;
        }
        assert_true(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
        struct pollfd pfd = {.fd = slow, .events = POLLOUT};
        if (poll(&pfd, 1, 300) == 0)
            break;
        assert_true(mono_ms() < deadline);
    }
    /* replies far beyond max_output_buffer were asked for, and the client is
     * still connected: the server held its output at the soft limit */
    assert_true(started * reply_len > 2 * 65536);
    int other = connect_tcp(fx->d.tcp_port);
    send_str(other, "PING\r\n");
    expect(other, "+PONG\r\n");
    assert_int_equal(info_stat(other, "output_buffer_disconnects"), 0);
    assert_int_equal(stat_of(&fx->d.server.output_overflows), 0);

    /* Now read: every reply arrives, in order, and the rest of the request
     * that was cut short gets through. */
    size_t total = started * reply_len, got = 0;
    char buf[16384];
    deadline = deadline_in(4 * WAIT_MS);
    while (got < total) {
        struct pollfd pfd = {.fd = slow, .events = (short)(POLLIN | (pos ? POLLOUT : 0))};
        assert_true(poll(&pfd, 1, remaining(deadline)) > 0);
        if (pos != 0 && (pfd.revents & POLLOUT)) {
            ssize_t n = send(slow, req + pos, req_len - pos, MSG_NOSIGNAL);
            if (n > 0)
                pos = (pos + (size_t)n) % req_len;
        }
        ssize_t r = recv(slow, buf, sizeof buf, 0);
        if (r < 0 && errno == EAGAIN)
            continue;
        assert_true(r > 0);
        for (ssize_t i = 0; i < r; i++)
            if (buf[i] != echo_reply_byte(got + (size_t)i))
                fail_msg("reply byte %zu is wrong", got + (size_t)i);
        got += (size_t)r;
        assert_true(got <= total);
    }
    assert_int_equal(pos, 0);
    assert_true(send_all(slow, "PING\r\n", 6));
    expect(slow, "+PONG\r\n");
    assert_int_equal(stat_of(&fx->d.server.output_overflows), 0);
    close(slow);
    close(other);
    free(req);
    fx_stop(fx);
}

/* An ECHO of ARG 'x's: its request into buf (ARG + 64 bytes); its length. */
static size_t echo_request(char *buf)
{
    size_t n = (size_t)snprintf(buf, 64, "*2\r\n$4\r\nECHO\r\n$%d\r\n", ARG);
    memset(buf + n, 'x', ARG);
    n += ARG;
    memcpy(buf + n, "\r\n", 2);
    return n + 2;
}

/* Reads n bytes of the ECHO reply stream (echo_reply_byte) and checks them. */
static void expect_echoes(int fd, size_t n)
{
    char buf[16384];
    size_t got = 0;
    int64_t deadline = deadline_in(WAIT_MS);
    while (got < n) {
        size_t want = n - got < sizeof buf ? n - got : sizeof buf;
        size_t r = recv_n(fd, buf, want, deadline);
        assert_int_equal(r, want);
        for (size_t i = 0; i < r; i++)
            if (buf[i] != echo_reply_byte(got + i))
                fail_msg("reply byte %zu is wrong", got + i);
        got += r;
    }
}

/* A client that writes its whole pipeline before it reads a reply, as
 * redis-py's pipelines do: once its replies pass the soft limit the server
 * stops reading, and the client blocks in its writes. After output_stall
 * without a reply read, the server reads on (replies up to the hard cap),
 * so the writes finish and every reply arrives, in order. 16 MB of
 * requests and of replies: more than the kernel's buffers hold on either
 * side. */
static void test_client_that_writes_its_whole_pipeline_first_is_read_on(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  output_soft_limit: 4096\n  max_output_buffer: 67108864\n"
                        "  output_stall: 200ms\n");
    enum { N = 4000 };
    char one[ARG + 64];
    size_t one_len = echo_request(one);
    char *req = malloc(N * one_len);
    assert_non_null(req);
    for (size_t i = 0; i < N; i++)
        memcpy(req + i * one_len, one, one_len);
    int fd = connect_tcp_buffers(fx->d.tcp_port, 65536, 65536);
    assert_true(send_all(fd, req, N * one_len)); /* blocks until the server reads on */
    expect_echoes(fd, N * (7 + ARG + 2));
    send_str(fd, "PING\r\n");
    expect(fd, "+PONG\r\n");
    assert_true(stat_of(&fx->d.server.output_stalls) >= 1);
    assert_int_equal(stat_of(&fx->d.server.output_overflows), 0);
    int other = connect_tcp(fx->d.tcp_port);
    assert_true(info_stat(other, "output_stalls") >= 1);
    close(other);
    close(fd);
    free(req);
    fx_stop(fx);
}

/* A client that never reads: paused at the soft limit, then read on after
 * output_stall, until its replies reach max_output_buffer, where it is
 * disconnected; the others are served throughout. */
static void test_client_that_never_reads_is_closed_at_the_cap_after_the_stall(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  output_soft_limit: 4096\n  max_output_buffer: 262144\n"
                        "  output_stall: 200ms\n");
    char one[ARG + 64];
    size_t one_len = echo_request(one);
    int fd = connect_tcp_buffers(fx->d.tcp_port, 16384, 0);
    size_t sent = 0;
    while (sent < 100000 && stat_of(&fx->d.server.output_overflows) == 0) {
        if (!send_all(fd, one, one_len))
            break;
        sent++;
    }
    assert_true(wait_stat(&fx->d.server.output_overflows, 1));
    assert_true(sent < 100000);
    assert_true(stat_of(&fx->d.server.output_stalls) >= 1);
    int other = connect_tcp(fx->d.tcp_port);
    send_str(other, "PING\r\n");
    expect(other, "+PONG\r\n");
    close(other);
    char *sink = malloc(1 << 16);
    assert_non_null(sink);
    size_t len;
    assert_true(recv_to_eof(fd, sink, 1 << 16, &len));
    free(sink);
    close(fd);
    fx_stop(fx);
}

/* A request whose first bytes came before a pause (another request's reply
 * took the output over the soft limit) has its deadline start again when
 * the pause ends: the time paused was the server's. The first request
 * begins at 0 ms and completes at 600, with 20 ECHOs (80 KB of replies)
 * and the start of a PING; the client reads the replies, the server
 * resumes, and the PING's last bytes come at 1400 ms: past request_timeout
 * (1 s) from the first byte, within it from the resume. */
static void test_request_timeout_starts_again_after_a_pause(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  output_soft_limit: 4096\n  request_timeout: 1s\n"
                        "  output_stall: 1h\n  idle_timeout: 30s\n");
    int fd = connect_tcp(fx->d.tcp_port);
    int64_t t0 = mono_ms();
    send_str(fd, "*1\r\n");
    struct timespec pause_ts = {0, 600 * 1000000L}; /* the scenario's timing */
    nanosleep(&pause_ts, NULL);
    enum { N = 20 };
    char one[ARG + 64];
    size_t one_len = echo_request(one);
    char *burst = malloc(16 + N * one_len + 16);
    assert_non_null(burst);
    size_t n = (size_t)snprintf(burst, 16, "$4\r\nPING\r\n");
    for (int i = 0; i < N; i++, n += one_len)
        memcpy(burst + n, one, one_len);
    memcpy(burst + n, "*1\r\n$4\r\nPI", 10);
    n += 10;
    assert_true(send_all(fd, burst, n));
    expect(fd, "+PONG\r\n");
    expect_echoes(fd, N * (7 + ARG + 2));
    int64_t at = t0 + 1400;
    if (mono_ms() < at) {
        int64_t ms = at - mono_ms();
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    send_str(fd, "NG\r\n");
    expect(fd, "+PONG\r\n");
    assert_int_equal(stat_of(&fx->d.server.timeouts), 0);
    free(burst);
    close(fd);
    fx_stop(fx);
}

static void test_output_over_max_output_buffer_closes_the_client(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  output_soft_limit: 65536\n  max_output_buffer: 65536\n"
                        "  max_bulk: 65536\n");
    /* The client never reads and the soft limit never pauses it (it equals
     * the hard one): once the kernel's buffers are full, the queue passes
     * 64 KiB and the server hangs up. */
    int fd = connect_tcp_buffers(fx->d.tcp_port, 4096, 0);
    enum { BIG = 40000, MAX_REQUESTS = 2000 };
    char *arg = malloc(BIG);
    assert_non_null(arg);
    memset(arg, 'o', BIG);
    char head[64];
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", BIG);
    int sent = 0;
    while (sent < MAX_REQUESTS && stat_of(&fx->d.server.output_overflows) == 0) {
        if (!send_all(fd, head, strlen(head)) || !send_all(fd, arg, BIG) ||
            !send_all(fd, "\r\n", 2))
            break;
        sent++;
    }
    assert_true(wait_stat(&fx->d.server.output_overflows, 1));
    assert_true(sent < MAX_REQUESTS);
    char *sink = malloc(1 << 16);
    assert_non_null(sink);
    size_t len;
    assert_true(recv_to_eof(fd, sink, 1 << 16, &len));
    assert_true(wait_stat(&fx->d.server.connected, 0));
    close(fd);
    free(sink);
    free(arg);
    fx_stop(fx);
}

/* Sends the rest of an ECHO of `total` bytes of data whose first `sent`
 * went already, and expects the echo. */
static void complete_echo(int fd, const char *data, size_t sent, size_t total)
{
    assert_true(send_all(fd, data + sent, total - sent));
    send_str(fd, "\r\n");
    expect_bulk(fd, data, total);
}

static void test_clients_over_max_clients_memory_lose_the_largest(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  max_clients_memory: 1048576\n  max_query_buffer: 1048576\n"
                        "  max_bulk: 1048576\n  max_output_buffer: 1048576\n");
    enum { B_BULK = 200000, B_FIRST = 150000, C_BULK = 1000000, C_SENT = 900000 };
    char *data = malloc(C_BULK);
    assert_non_null(data);
    memset(data, 'm', C_BULK);
    int a = connect_tcp(fx->d.tcp_port);
    send_str(a, "PING\r\n");
    expect(a, "+PONG\r\n");
    /* b: a request of 200,000 bytes, 150,000 of them sent (its buffer
     * grows to 256 KiB) */
    int b = connect_tcp(fx->d.tcp_port);
    char head[64];
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", B_BULK);
    send_str(b, head);
    assert_true(send_all(b, data, B_FIRST));
    assert_true(wait_stat_in(&fx->d.server.clients_memory, B_FIRST, UINT64_MAX));
    /* c: 900,000 bytes of a request of 1,000,000: its buffer grows to
     * 1 MiB, the clients together pass the cap, and c, the largest, goes */
    int c = connect_tcp(fx->d.tcp_port);
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", C_BULK);
    send_str(c, head);
    send_all(c, data, C_SENT); /* the server may close c before the end */
    char buf[256];
    size_t len;
    assert_true(recv_to_eof(c, buf, sizeof buf, &len));
    assert_int_equal(len, 0); /* closed without a reply */
    assert_int_equal(stat_of(&fx->d.server.evicted_clients), 1);
    assert_true(stat_of(&fx->d.server.clients_memory) <= 1048576);
    /* b completes its request and gets its answer; a still works */
    complete_echo(b, data, B_FIRST, B_BULK);
    send_str(a, "PING\r\n");
    expect(a, "+PONG\r\n");
    assert_int_equal(stat_of(&fx->d.server.evicted_clients), 1);
    assert_int_equal(info_stat(a, "evicted_clients"), 1);
    close(c);
    close(b);
    /* every client closed: nothing counted is left */
    close(a);
    assert_true(wait_stat(&fx->d.server.clients_memory, 0));
    free(data);
    fx_stop(fx);
}

static void test_clients_over_max_clients_memory_lose_unauthenticated_ones_first(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  requirepass: secret\n  max_clients_memory: 3145728\n"
                        "  max_query_buffer: 2097152\n  max_bulk: 2097152\n"
                        "  max_output_buffer: 3145728\n");
    enum { A_BULK = 1600000, A_FIRST = 1500000 };
    char *data = malloc(A_BULK);
    assert_non_null(data);
    memset(data, 'u', A_BULK);
    /* a: authenticated, 1,500,000 bytes of a request pending (a 2 MiB
     * buffer) */
    int a = connect_tcp(fx->d.tcp_port);
    send_str(a, "AUTH secret\r\n");
    expect(a, "+OK\r\n");
    char head[64];
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", A_BULK);
    send_str(a, head);
    assert_true(send_all(a, data, A_FIRST));
    assert_true(wait_stat_in(&fx->d.server.clients_memory, A_FIRST, UINT64_MAX));
    /* two idle clients: 4 connected, an even share is 768 KiB */
    int idle1 = connect_tcp(fx->d.tcp_port), idle2 = connect_tcp(fx->d.tcp_port);
    /* u: not authenticated, pipelines requests and never reads their
     * -NOAUTH replies: once a megabyte of them is queued (the output soft
     * limit) the clients pass 3 MiB; u holds less than a but over its
     * share, and goes first */
    int u = connect_tcp(fx->d.tcp_port);
    set_nonblocking(u);
    static const char req[] = "ECHO x\r\n";
    char chunk[4096];
    for (size_t i = 0; i + sizeof req - 1 <= sizeof chunk; i += sizeof req - 1)
        memcpy(chunk + i, req, sizeof req - 1);
    size_t chunk_len = sizeof chunk / (sizeof req - 1) * (sizeof req - 1);
    size_t sent = 0;
    int64_t deadline = deadline_in(WAIT_MS);
    while (stat_of(&fx->d.server.evicted_clients) == 0 && sent < (64u << 20)) {
        assert_true(mono_ms() < deadline);
        ssize_t w = send(u, chunk, chunk_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0)
            sent += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            break; /* closed */
        else
            poll(NULL, 0, 1); /* the server stopped reading u: wait for the eviction */
    }
    assert_true(wait_stat(&fx->d.server.evicted_clients, 1));
    char buf[64];
    size_t len;
    assert_true(recv_to_eof(u, buf, sizeof buf, &len)); /* its replies, then EOF */
    assert_memory_equal(buf, "-NOAUTH", 7);
    /* a, larger, stays: it completes its request and gets its answer */
    complete_echo(a, data, A_FIRST, A_BULK);
    assert_int_equal(stat_of(&fx->d.server.evicted_clients), 1);
    close(u);
    close(a);
    close(idle1);
    close(idle2);
    assert_true(wait_stat(&fx->d.server.clients_memory, 0));
    free(data);
    fx_stop(fx);
}

/* Reads one line (up to and without its \r\n) into buf. */
static void read_line(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    int64_t deadline = deadline_in(WAIT_MS);
    for (;;) {
        char ch;
        assert_int_equal(recv_n(fd, &ch, 1, deadline), 1);
        if (ch == '\n')
            break;
        assert_true(n + 1 < cap);
        buf[n++] = ch;
    }
    assert_true(n > 0 && buf[n - 1] == '\r');
    buf[n - 1] = '\0';
}

/* Sends "CLIENT LIST ..." (rest) and returns the reply's text (malloc'd). */
static char *client_list(int fd, const char *rest)
{
    char req[256], head[32];
    snprintf(req, sizeof req, "CLIENT LIST%s\r\n", rest);
    send_str(fd, req);
    read_line(fd, head, sizeof head);
    assert_int_equal(head[0], '$');
    size_t n = (size_t)strtoul(head + 1, NULL, 10);
    char *text = malloc(n + 3);
    assert_non_null(text);
    assert_int_equal(recv_n(fd, text, n + 2, deadline_in(WAIT_MS)), n + 2);
    text[n] = '\0';
    return text;
}

static int count_lines(const char *text)
{
    int n = 0;
    for (const char *p = text; (p = strchr(p, '\n')) != NULL; p++)
        n++;
    return n;
}

typedef struct {
    int fd;
    atomic_bool stop;
    bool ok;
} pinger_t;

/* Keeps its client busy (PING after PING) while others list and kill. */
static void *pinger_main(void *arg)
{
    pinger_t *p = arg;
    p->ok = true;
    while (!atomic_load(&p->stop) && p->ok) {
        char got[8];
        p->ok = send_all(p->fd, "PING\r\n", 6) &&
                recv_n(p->fd, got, 7, deadline_in(WAIT_MS)) == 7 &&
                memcmp(got, "+PONG\r\n", 7) == 0;
    }
    return NULL;
}

static void test_idle_client_gives_back_what_its_last_large_request_needed(void **state)
{
    (void)state;
    fx_t *fx = fx_start("");
    int fd = connect_tcp(fx->d.tcp_port);
    send_str(fd, "PING\r\n");
    expect(fd, "+PONG\r\n");
    assert_true(wait_stat_in(&fx->d.server.clients_memory, 1, UINT64_MAX));
    uint64_t idle = stat_of(&fx->d.server.clients_memory);
    /* 20,000 arguments: the parser needs 32 bytes each while it holds them */
    enum { ARGS = 20000 };
    char *req = malloc(ARGS * 8 + 64);
    assert_non_null(req);
    size_t n = (size_t)sprintf(req, "*%d\r\n$6\r\nNOSUCH\r\n", ARGS);
    for (int i = 1; i < ARGS; i++)
        n += (size_t)sprintf(req + n, "$1\r\nx\r\n");
    assert_true(send_all(fd, req, n));
    char line[8192];
    read_line(fd, line, sizeof line);
    assert_memory_equal(line, "-ERR unknown command 'NOSUCH'", 29);
    /* idle again: about what it held before, not 20,000 spans */
    assert_true(wait_stat_in(&fx->d.server.clients_memory, 0, idle + 64 * 1024));
    close(fd);
    assert_true(wait_stat(&fx->d.server.clients_memory, 0));
    free(req);
    fx_stop(fx);
}

static void test_client_list_and_kill_reach_every_loop(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  threads: 2\n");
    enum { N = 8 };
    int fd[N];
    uint64_t id[N];
    char addr[N][64];
    for (int i = 0; i < N; i++) {
        fd[i] = connect_tcp(fx->d.tcp_port);
        char line[64];
        send_str(fd[i], "CLIENT ID\r\n");
        read_line(fd[i], line, sizeof line);
        assert_int_equal(line[0], ':');
        id[i] = strtoull(line + 1, NULL, 10);
        struct sockaddr_in sin;
        socklen_t sl = sizeof sin;
        assert_int_equal(getsockname(fd[i], (struct sockaddr *)&sin, &sl), 0);
        snprintf(addr[i], sizeof addr[i], "127.0.0.1:%u", ntohs(sin.sin_port));
    }
    send_str(fd[1], "CLIENT SETNAME worker-1\r\n");
    expect(fd[1], "+OK\r\n");
    /* clients 2 and 3 stay busy on their loops while 0 lists and kills */
    pinger_t ping[2] = {{.fd = fd[2]}, {.fd = fd[3]}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, pinger_main, &ping[i]), 0);
    for (int round = 0; round < 50; round++) {
        char *all = client_list(fd[0], "");
        assert_int_equal(count_lines(all), N);
        for (int i = 0; i < N; i++) { /* each by its id and its address */
            char want[128];
            snprintf(want, sizeof want, "id=%" PRIu64 " addr=%s ", id[i], addr[i]);
            if (strstr(all, want) == NULL)
                fail_msg("CLIENT LIST lacks \"%s\":\n%s", want, all);
        }
        assert_non_null(strstr(all, " name=worker-1 "));
        free(all);
    }
    char rest[64];
    snprintf(rest, sizeof rest, " ID %" PRIu64 " %" PRIu64, id[4], id[5]);
    char *two = client_list(fd[0], rest);
    assert_int_equal(count_lines(two), 2);
    free(two);
    /* by id: client 4 is closed by its loop, without a reply */
    char req[160], buf[64];
    size_t len;
    snprintf(req, sizeof req, "CLIENT KILL ID %" PRIu64 "\r\n", id[4]);
    send_str(fd[0], req);
    expect(fd[0], ":1\r\n");
    assert_true(recv_to_eof(fd[4], buf, sizeof buf, &len));
    assert_int_equal(len, 0);
    /* by address, the old form: +OK; an address of no client: an error */
    snprintf(req, sizeof req, "CLIENT KILL %s\r\n", addr[5]);
    send_str(fd[0], req);
    expect(fd[0], "+OK\r\n");
    assert_true(recv_to_eof(fd[5], buf, sizeof buf, &len));
    send_str(fd[0], "CLIENT KILL 10.9.9.9:1\r\n");
    expect(fd[0], "-ERR No such client\r\n");
    /* every client but the caller (SKIPME yes by default) */
    for (int i = 0; i < 2; i++) {
        atomic_store(&ping[i].stop, true);
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_true(ping[i].ok);
    }
    send_str(fd[0], "CLIENT KILL USER default\r\n");
    expect(fd[0], ":5\r\n");
    for (int i = 1; i < N; i++)
        if (i != 4 && i != 5)
            assert_true(recv_to_eof(fd[i], buf, sizeof buf, &len));
    char *left = client_list(fd[0], "");
    assert_int_equal(count_lines(left), 1);
    free(left);
    /* the caller itself, with SKIPME no: the reply, then the close */
    snprintf(req, sizeof req, "CLIENT KILL ID %" PRIu64 " SKIPME no\r\n", id[0]);
    send_str(fd[0], req);
    assert_true(recv_to_eof(fd[0], buf, sizeof buf, &len));
    assert_string_equal(buf, ":1\r\n");
    assert_true(wait_stat(&fx->d.server.connected, 0));
    for (int i = 0; i < N; i++)
        close(fd[i]);
    fx_stop(fx);
}

/* The loop of client fd (CLIENT INFO's io-thread). */
static int client_loop(int fd)
{
    char head[32], line[1024];
    send_str(fd, "CLIENT INFO\r\n");
    read_line(fd, head, sizeof head);
    assert_int_equal(head[0], '$');
    size_t n = (size_t)strtoul(head + 1, NULL, 10);
    assert_true(n + 3 <= sizeof line);
    assert_int_equal(recv_n(fd, line, n + 2, deadline_in(WAIT_MS)), n + 2);
    line[n] = '\0';
    const char *at = strstr(line, " io-thread=");
    assert_non_null(at);
    return atoi(at + strlen(" io-thread="));
}

/* Over server.max_clients_memory, a client over its share is closed even
 * when it sits idle on another loop than the client whose read passed the
 * cap: that loop, with no client over its share, wakes the others. */
static void test_clients_over_max_clients_memory_are_found_on_other_loops(void **state)
{
    (void)state;
    enum { CAP = 1500000, H_BULK = 700000, H_FIRST = 600000, T_BULK = 400000, T_FIRST = 300000 };
    fx_t *fx = fx_start("  threads: 2\n  max_clients_memory: 1500000\n"
                        "  max_query_buffer: 1048576\n  max_bulk: 1048576\n"
                        "  max_output_buffer: 1048576\n");
    /* h on loop 0 and t on loop 1, however the kernel spreads connections */
    int h = -1, t = -1, spare[64], nspare = 0;
    while ((h < 0 || t < 0) && nspare < 64) {
        int fd = connect_tcp(fx->d.tcp_port);
        int loop = client_loop(fd);
        if (loop == 0 && h < 0)
            h = fd;
        else if (loop == 1 && t < 0)
            t = fd;
        else
            spare[nspare++] = fd;
    }
    assert_true(h >= 0 && t >= 0);
    for (int i = 0; i < nspare; i++)
        close(spare[i]);
    assert_true(wait_stat(&fx->d.server.connected, 2)); /* an even share: CAP / 2 */
    char *data = malloc(H_BULK);
    assert_non_null(data);
    memset(data, 'h', H_BULK);
    /* h: 600,000 bytes of a request pending, a 1 MiB buffer: over its
     * share, the clients under the cap */
    char head[64];
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", H_BULK);
    send_str(h, head);
    assert_true(send_all(h, data, H_FIRST));
    assert_true(wait_stat_in(&fx->d.server.clients_memory, 1048576, CAP));
    /* t: 300,000 bytes pending, a 512 KiB buffer, under its share: its
     * read passes the cap on loop 1, and loop 0 closes h */
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", T_BULK);
    send_str(t, head);
    assert_true(send_all(t, data, T_FIRST));
    char buf[256];
    size_t len;
    assert_true(recv_to_eof(h, buf, sizeof buf, &len));
    assert_int_equal(len, 0); /* closed without a reply */
    assert_int_equal(stat_of(&fx->d.server.evicted_clients), 1);
    /* t completes its request and gets its answer */
    complete_echo(t, data, T_FIRST, T_BULK);
    assert_int_equal(stat_of(&fx->d.server.evicted_clients), 1);
    close(h);
    close(t);
    assert_true(wait_stat(&fx->d.server.clients_memory, 0));
    free(data);
    fx_stop(fx);
}

static void test_slow_request_beyond_request_timeout_is_closed(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  request_timeout: 200ms\n  idle_timeout: 30s\n");
    int fd = connect_tcp(fx->d.tcp_port);
    int64_t start = mono_ms();
    send_str(fd, "*2\r\n$4\r\nECHO\r\n$100\r\n");
    /* one byte every 20 ms: never idle, never complete */
    int64_t deadline = deadline_in(WAIT_MS);
    size_t sent = 0;
    bool closed = false;
    while (!closed && mono_ms() < deadline) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 20) > 0) {
            char c;
            ssize_t r = recv(fd, &c, 1, 0);
            assert_true(r <= 0); /* no reply, just the close */
            closed = true;
        } else if (send(fd, "y", 1, MSG_NOSIGNAL) == 1) {
            sent++;
        } else {
            closed = true;
        }
    }
    assert_true(closed);
    assert_true(mono_ms() - start >= 200);
    assert_true(sent < 100); /* the request never completed */
    assert_true(wait_stat(&fx->d.server.timeouts, 1));
    close(fd);
    fx_stop(fx);
}

/* A request whose bytes all wait in the socket, but which the server reads
 * slowly — 16 KiB a loop iteration, while other clients' pipelines keep
 * every iteration busy — is late through no fault of its client:
 * request_timeout does not close it (only a client that itself sends too
 * slowly is cut). The big request is ECHO with 64,999 arguments, 4.6 MB,
 * about 290 reads, sent by a thread of its own that keeps its socket full;
 * 64 clients pipelining ECHOs of 1 KiB meanwhile. */
typedef struct {
    int fd;
    const char *p;
    size_t n;
    bool ok;
} sender_t;

static void *sender_main(void *arg)
{
    sender_t *s = arg;
    s->ok = send_all(s->fd, s->p, s->n);
    return NULL;
}

/* A client that reads its replies steadily but slowly (30 KB every 50 ms)
 * while its pipeline (150 ECHOs of 40 KB, from a thread) keeps arriving:
 * the kernel holds megabytes of replies between the two ends, so libuv's
 * own write queue stays flat for long spells although the client reads all
 * along (judged by it, the client was read on to the 1 MiB cap and closed
 * after 0.8 MB). That is progress, not a stall: the bytes the kernel still
 * holds for the client fall as it reads (in steps of TCP window updates,
 * 128 KiB or so on loopback, far inside output_stall's default of 1 s at
 * this pace), so it stays paced by the soft limit and gets every reply. */
static void test_client_reading_slowly_is_paced_not_read_on(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  output_soft_limit: 65536\n  max_output_buffer: 1048576\n"
                        "  max_bulk: 65536\n"); /* output_stall: its default, 1 s */
    enum { N = 150, BIG = 40000, CHUNK = 30000 };
    const char head[] = "*2\r\n$4\r\nECHO\r\n$40000\r\n";
    const size_t one_len = sizeof head - 1 + BIG + 2;
    char *req = malloc(N * one_len);
    assert_non_null(req);
    for (size_t i = 0; i < N; i++) {
        char *r = req + i * one_len;
        memcpy(r, head, sizeof head - 1);
        memset(r + sizeof head - 1, 'x', BIG);
        memcpy(r + sizeof head - 1 + BIG, "\r\n", 2);
    }
    int fd = connect_tcp(fx->d.tcp_port);
    sender_t snd = {.fd = fd, .p = req, .n = N * one_len};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, sender_main, &snd), 0);
    const char rhead[] = "$40000\r\n";
    const size_t reply_len = sizeof rhead - 1 + BIG + 2, total = N * reply_len;
    char *buf = malloc(CHUNK);
    assert_non_null(buf);
    size_t got = 0;
    int64_t deadline = deadline_in(6 * WAIT_MS);
    while (got < total) {
        struct timespec pace = {0, 50 * 1000000L}; /* the reader's pace, the scenario */
        nanosleep(&pace, NULL);
        size_t want = total - got < CHUNK ? total - got : CHUNK;
        size_t r = recv_n(fd, buf, want, deadline);
        if (r == 0)
            fail_msg("closed after %zu of %zu reply bytes (output_stalls %" PRIu64
                     ", output_buffer_disconnects %" PRIu64 ")",
                     got, total, stat_of(&fx->d.server.output_stalls),
                     stat_of(&fx->d.server.output_overflows));
        for (size_t i = 0; i < r; i++) {
            size_t k = (got + i) % reply_len;
            char want_byte = k < sizeof rhead - 1         ? rhead[k]
                             : k < sizeof rhead - 1 + BIG ? 'x'
                             : k == reply_len - 2         ? '\r'
                                                          : '\n';
            if (buf[i] != want_byte)
                fail_msg("reply byte %zu is wrong", got + i);
        }
        got += r;
    }
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_true(snd.ok);
    assert_int_equal(stat_of(&fx->d.server.output_overflows), 0);
    assert_int_equal(stat_of(&fx->d.server.output_stalls), 0);
    free(buf);
    free(req);
    close(fd);
    fx_stop(fx);
}

static void test_request_a_busy_server_reads_slowly_is_not_timed_out(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  request_timeout: 100ms\n  idle_timeout: 30s\n");
    enum { NHOG = 64, ARGS = 65000, HOG_REQS = 64 };
    size_t cap = (size_t)ARGS * 72 + 64;
    char *big = malloc(cap);
    assert_non_null(big);
    size_t blen = (size_t)snprintf(big, cap, "*%d\r\n$4\r\nECHO\r\n", ARGS);
    for (int i = 1; i < ARGS; i++)
        blen += (size_t)snprintf(big + blen, cap - blen, "$64\r\n%064d\r\n", i);
    /* one hog's pipeline, sent again and again; its replies are read and
     * dropped so that it is never paused for its output */
    char one[1200], pad[1001];
    memset(pad, 'h', 1000);
    pad[1000] = '\0';
    const char *argv[] = {"ECHO", pad};
    size_t olen = build_request(one, sizeof one, 2, argv);
    size_t hlen = olen * HOG_REQS;
    char *hreq = malloc(hlen), sink[65536];
    for (int r = 0; r < HOG_REQS; r++)
        memcpy(hreq + (size_t)r * olen, one, olen);
    int hog[NHOG];
    size_t hsent[NHOG];
    for (int h = 0; h < NHOG; h++) {
        hog[h] = connect_tcp(fx->d.tcp_port);
        set_nonblocking(hog[h]);
        hsent[h] = 0;
    }
    int fd = connect_tcp(fx->d.tcp_port);
    set_nonblocking(fd);
    sender_t snd = {fd, big, blen, false};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, sender_main, &snd), 0);
    char reply[256];
    size_t have = 0;
    bool closed = false;
    int64_t deadline = deadline_in(4 * WAIT_MS);
    while (!closed && (have < 2 || memcmp(reply + have - 2, "\r\n", 2) != 0)) {
        assert_true(mono_ms() < deadline);
        struct pollfd pfd[NHOG + 1];
        for (int h = 0; h < NHOG; h++)
            pfd[h] = (struct pollfd){.fd = hog[h], .events = POLLIN | POLLOUT};
        pfd[NHOG] = (struct pollfd){.fd = fd, .events = POLLIN};
        assert_true(poll(pfd, NHOG + 1, remaining(deadline)) > 0);
        for (int h = 0; h < NHOG; h++) {
            if (pfd[h].revents & POLLOUT) {
                ssize_t w = send(hog[h], hreq + hsent[h] % hlen, hlen - hsent[h] % hlen,
                                 MSG_NOSIGNAL | MSG_DONTWAIT);
                if (w > 0)
                    hsent[h] += (size_t)w;
            }
            if (pfd[h].revents & POLLIN)
                (void)recv(hog[h], sink, sizeof sink, MSG_DONTWAIT);
        }
        if (pfd[NHOG].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = recv(fd, reply + have, sizeof reply - 1 - have, MSG_DONTWAIT);
            if (r > 0)
                have += (size_t)r;
            else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
                closed = true;
        }
    }
    reply[have] = '\0';
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_false(closed);
    assert_true(snd.ok);
    assert_string_equal(reply, "-ERR wrong number of arguments for 'echo' command\r\n");
    assert_int_equal(stat_of(&fx->d.server.timeouts), 0);
    assert_true(stat_of(&fx->d.server.read_yields) >= 1);
    for (int h = 0; h < NHOG; h++)
        close(hog[h]);
    close(fd);
    free(big);
    free(hreq);
    fx_stop(fx);
}

static void test_idle_client_is_closed_after_idle_timeout(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  idle_timeout: 1s\n");
    int fd = connect_tcp(fx->d.tcp_port);
    send_str(fd, "PING\r\n");
    expect(fd, "+PONG\r\n");
    int64_t start = mono_ms();
    char buf[64];
    size_t len;
    assert_true(recv_to_eof(fd, buf, sizeof buf, &len));
    assert_int_equal(len, 0);
    assert_true(mono_ms() - start >= 900); /* the server's clock ticks in whole ms */
    assert_true(wait_stat(&fx->d.server.timeouts, 1));
    close(fd);
    fx_stop(fx);
}

static void test_unauthenticated_big_argument_is_a_protocol_error(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  requirepass: secret\n");
    enum { BIG = 10240 };
    char *arg = malloc(BIG + 1);
    assert_non_null(arg);
    memset(arg, 'a', BIG);
    arg[BIG] = '\0';
    char head[64];

    int anon = connect_tcp(fx->d.tcp_port);
    send_str(anon, "PING\r\nECHO hi\r\n");
    expect(anon, "+PONG\r\n-NOAUTH Authentication required.\r\n");
    snprintf(head, sizeof head, "*2\r\n$4\r\nAUTH\r\n$%d\r\n", BIG);
    send_str(anon, head);
    send_all(anon, arg, BIG); /* the server may be gone before the end */
    char buf[256];
    size_t len;
    assert_true(recv_to_eof(anon, buf, sizeof buf, &len));
    assert_string_equal(buf, "-ERR Protocol error: invalid bulk length\r\n");
    assert_int_equal(stat_of(&fx->d.server.protocol_errors), 1);
    /* 16 arguments of 1,000 bytes, each within the anonymous limits, make a
     * request over 4 KiB: refused, though it arrives whole in one read */
    int many = connect_tcp(fx->d.tcp_port);
    char req[17000];
    size_t rl = (size_t)sprintf(req, "*16\r\n$4\r\nECHO\r\n");
    for (int i = 1; i < 16; i++) {
        rl += (size_t)sprintf(req + rl, "$1000\r\n");
        memset(req + rl, 'm', 1000);
        rl += 1000;
        rl += (size_t)sprintf(req + rl, "\r\n");
    }
    send_all(many, req, rl); /* the server may be gone before the end */
    assert_true(recv_to_eof(many, buf, sizeof buf, &len));
    assert_string_equal(buf, "-ERR Protocol error: request too large\r\n");
    assert_int_equal(stat_of(&fx->d.server.protocol_errors), 2);
    close(many);

    /* after AUTH the configured limits apply */
    int user = connect_tcp(fx->d.tcp_port);
    send_str(user, "AUTH secret\r\n");
    expect(user, "+OK\r\n");
    snprintf(head, sizeof head, "*2\r\n$4\r\nECHO\r\n$%d\r\n", BIG);
    send_str(user, head);
    assert_true(send_all(user, arg, BIG));
    send_str(user, "\r\n");
    expect_bulk(user, arg, BIG);
    close(anon);
    close(user);
    free(arg);
    fx_stop(fx);
}

static void test_quit_replies_then_closes_without_running_the_rest(void **state)
{
    (void)state;
    fx_t *fx = fx_start("");
    int fd = connect_tcp(fx->d.tcp_port);
    send_str(fd, "PING\r\nQUIT\r\nPING\r\n");
    char buf[64];
    size_t len;
    assert_true(recv_to_eof(fd, buf, sizeof buf, &len));
    assert_string_equal(buf, "+PONG\r\n+OK\r\n");
    assert_int_equal(stat_of(&fx->d.server.commands), 2);
    close(fd);
    fx_stop(fx);
}

static void test_bind_failure_names_the_address(void **state)
{
    (void)state;
    fx_t *fx = fx_start("  threads: 2\n");
    char yaml[512], err[256], want[256];
    snprintf(yaml, sizeof yaml, "server:\n  listen: 127.0.0.1:%d\n%s", fx->d.tcp_port,
             features_yaml);
    tly_config_t *cfg = NULL;
    assert_int_equal(tly_config_load_string(yaml, "busy.yaml", &cfg, err, sizeof err), TLY_OK);
    tly_daemon_t d = {.cfg = cfg};
    atomic_init(&d.server.next_client_id, 1);
    err[0] = '\0';
    assert_null(tly_server_new(&d, err, sizeof err));
    snprintf(want, sizeof want, "server.listen 127.0.0.1:%d: Address already in use",
             fx->d.tcp_port);
    assert_string_equal(err, want);
    assert_int_equal(d.tcp_port, 0);
    tly_config_free(cfg);
    fx_stop(fx);
}

static void test_ipv6_and_hostname_addresses(void **state)
{
    (void)state;
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    bool v6 = probe >= 0 && bind(probe, (struct sockaddr *)&sin6, sizeof sin6) == 0;
    if (probe >= 0)
        close(probe);
    if (v6) {
        fx_t *fx = fx_start_at("[::1]:0", "", false);
        int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sin6.sin6_port = htons((uint16_t)fx->d.tcp_port);
        assert_int_equal(connect(fd, (struct sockaddr *)&sin6, sizeof sin6), 0);
        send_str(fd, "PING\r\n");
        expect(fd, "+PONG\r\n");
        close(fd);
        fx_stop(fx);
    }
    /* "localhost" goes through the resolver; it names 127.0.0.1 or ::1 */
    fx_t *fx = fx_start_at("localhost:0", "", false);
    assert_true(fx->d.tcp_port > 0);
    fx_stop(fx);
}

static void test_free_with_clients_connected_returns_cleanly(void **state)
{
    (void)state;
    fx_t *fx = fx_start_at("127.0.0.1:0", "  threads: 2\n", true);
    int fds[4];
    fds[0] = connect_tcp(fx->d.tcp_port);
    fds[1] = connect_tcp(fx->d.tcp_port);
    fds[2] = connect_unix(fx->unix_path);
    fds[3] = connect_tcp(fx->d.tcp_port);
    for (int i = 0; i < 3; i++) {
        send_str(fds[i], "PING\r\n");
        expect(fds[i], "+PONG\r\n");
    }
    send_str(fds[3], "*2\r\n$4\r\nECHO\r\n$10\r\nhal"); /* a request half sent */
    assert_true(wait_stat(&fx->d.server.connected, 4));
    fx_stop(fx); /* uv_loop_close() == 0 is asserted inside */
    for (int i = 0; i < 4; i++) {
        char buf[64];
        size_t len;
        assert_true(recv_to_eof(fds[i], buf, sizeof buf, &len));
        close(fds[i]);
    }
}

static void test_stop_before_start_frees_cleanly(void **state)
{
    (void)state;
    char yaml[512], err[256];
    snprintf(yaml, sizeof yaml, "server:\n  listen: 127.0.0.1:0\n  threads: 3\n%s", features_yaml);
    tly_config_t *cfg = NULL;
    assert_int_equal(tly_config_load_string(yaml, "idle.yaml", &cfg, err, sizeof err), TLY_OK);
    tly_daemon_t d = {.cfg = cfg};
    atomic_init(&d.server.next_client_id, 1);
    tly_server_t *srv = tly_server_new(&d, err, sizeof err);
    assert_non_null(srv);
    tly_server_stop_async(srv);
    tly_server_free(srv);
    tly_config_free(cfg);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    tly_log_set_level(TLY_LOG_ERROR);
    tly_rcu_thread_online();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ping_over_raw_socket_returns_pong),
        cmocka_unit_test(test_pipelined_requests_in_one_write_come_back_in_order),
        cmocka_unit_test(test_deep_pipeline_yields_between_reads_and_stays_in_order),
        cmocka_unit_test(test_requests_read_together_each_get_their_own_reply),
        cmocka_unit_test(test_pipelined_reads_each_get_their_own_reply),
        cmocka_unit_test(test_unix_socket_serves_requests_and_is_removed),
        cmocka_unit_test(test_protocol_error_closes_only_that_client),
        cmocka_unit_test(test_max_clients_refuses_the_third_connection),
        cmocka_unit_test(test_request_over_max_query_buffer_is_a_protocol_error),
        cmocka_unit_test(test_long_unix_socket_path_names_its_clients_whole),
        cmocka_unit_test(test_client_list_omem_is_zero_once_replies_are_read),
        cmocka_unit_test(test_client_that_never_reads_is_paused_and_bounded),
        cmocka_unit_test(test_client_that_writes_its_whole_pipeline_first_is_read_on),
        cmocka_unit_test(test_client_that_never_reads_is_closed_at_the_cap_after_the_stall),
        cmocka_unit_test(test_client_reading_slowly_is_paced_not_read_on),
        cmocka_unit_test(test_request_timeout_starts_again_after_a_pause),
        cmocka_unit_test(test_output_over_max_output_buffer_closes_the_client),
        cmocka_unit_test(test_clients_over_max_clients_memory_lose_the_largest),
        cmocka_unit_test(test_clients_over_max_clients_memory_lose_unauthenticated_ones_first),
        cmocka_unit_test(test_clients_over_max_clients_memory_are_found_on_other_loops),
        cmocka_unit_test(test_idle_client_gives_back_what_its_last_large_request_needed),
        cmocka_unit_test(test_client_list_and_kill_reach_every_loop),
        cmocka_unit_test(test_slow_request_beyond_request_timeout_is_closed),
        cmocka_unit_test(test_request_a_busy_server_reads_slowly_is_not_timed_out),
        cmocka_unit_test(test_idle_client_is_closed_after_idle_timeout),
        cmocka_unit_test(test_unauthenticated_big_argument_is_a_protocol_error),
        cmocka_unit_test(test_quit_replies_then_closes_without_running_the_rest),
        cmocka_unit_test(test_bind_failure_names_the_address),
        cmocka_unit_test(test_ipv6_and_hostname_addresses),
        cmocka_unit_test(test_free_with_clients_connected_returns_cleanly),
        cmocka_unit_test(test_stop_before_start_frees_cleanly),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tly_rcu_thread_offline();
    return rc;
}
