/*
 * server.c — the RESP server: libuv loops, listeners, client connections,
 * backpressure and limits.
 *
 * Threads. tly_server_new runs on the main thread: it binds and listens on
 * server.threads TCP sockets, all on server.listen with SO_REUSEPORT (the
 * kernel spreads connections over them), and on the optional unix socket,
 * and initialises one uv_loop_t per thread with its stop handle (uv_async).
 * tly_server_start, still on the main thread and before any loop runs, opens
 * each loop's listening handle and timer, then starts one thread per loop;
 * the thread registers with RCU, owns a command scratch and runs its loop
 * until stopped. Loop 0 also serves the unix socket. A client lives its
 * whole life on the loop that accepted it: its handle, buffers, parser and
 * session are touched by that thread only. Other threads reach a loop only
 * through uv_async_send (tly_server_stop_async), so source threads never
 * touch a libuv handle. Counters in d->server are relaxed atomics: loops
 * write them, INFO reads them.
 *
 * A client's buffers (all owned by the client, freed in its close callback):
 *   in    bytes read and not yet executed; libuv reads straight into it.
 *   out   replies of executed commands not yet handed to the kernel.
 *   wbuf  replies handed to uv_write and not yet written. At most one write
 *         is in flight; replies made meanwhile go to out, so replies leave in
 *         request order.
 * The queued output is out plus the unwritten part of wbuf. A write first
 * tries uv_try_write and queues only what the kernel did not take.
 *
 * Execution. A read only appends to `in` and puts the client on the loop's
 * ready list; the loop's check handle, after each poll, executes the ready
 * clients in the order they were read (check_cb). With several ready, it
 * first parses each one's first request and hints the store about the
 * entity it reads, so the cache misses of finding those entities overlap;
 * replies then leave in one burst of writes per poll, as Redis writes its
 * replies before it polls again. Within one client's pipeline, the request
 * after the one about to run is parsed ahead and hinted the same way. Both
 * parse with the loop's own parser (peek), so a request's turn parses it
 * again, with the client's.
 *
 * Backpressure. Before each request is executed the queued output is
 * compared with server.output_soft_limit: above it, execution stops and the
 * client's reads are stopped, so the kernel's buffers push back on the
 * client. When a write completes and the queue is at or below the soft limit,
 * execution resumes with the input already buffered, then reading resumes;
 * the pending request's deadline starts again then. A paused client whose
 * unread output has not shrunk for server.output_stall (the timer checks
 * client_unread: this end's buffers, libuv's and the kernel's) is read on
 * regardless of the soft limit until its output drains below it
 * (unthrottled): a client that writes its whole pipeline before reading a
 * reply, as redis-py's pipelines do, would otherwise wait on tallyd while
 * tallyd waits on it. A reply that takes the queue above
 * server.max_output_buffer closes the client at once (one WARN line), as
 * Redis's client-output-buffer-limit does; so does a client that never
 * reads, once its replies reach that cap.
 *
 * Limits. The parser enforces server.max_args, server.max_bulk and an inline
 * line of at most min(64 KiB, server.max_query_buffer); a request whose
 * bytes exceed server.max_query_buffer while still incomplete is a protocol
 * error ("request too large"). Until a client has authenticated (only when
 * server.requirepass is set) the limits are tight — 16 arguments, 1024-byte
 * arguments, 4096-byte requests — so an anonymous peer cannot make the
 * server buffer much; after a command that authenticates, the configured
 * limits apply. A protocol error replies "-ERR Protocol error: <why>" and
 * the client is closed once that is written; other clients are unaffected.
 * Beyond server.max_clients (counted over all loops) a connection gets
 * "-ERR max number of clients reached" and is closed. What every client's
 * buffers hold is counted over all loops (client_account, after each read
 * and each completed write); above server.max_clients_memory a loop closes
 * its clients holding more than an even share of it, or wakes the other
 * loops to close theirs (evict_clients). A timer per loop
 * closes clients that neither sent nor received a byte for
 * server.idle_timeout, and clients whose current request began arriving
 * more than server.request_timeout ago, or whose last READ_CHUNK bytes did
 * (a client sending byte by byte): a long request that keeps arriving is
 * not cut, however long the loop, busy with other clients, takes to read
 * it.
 *
 * Closing politely. After QUIT or a protocol error the client is draining:
 * nothing more is executed, bytes still arriving are read and dropped (a
 * socket closed with unread input sends a reset, which can destroy the reply
 * in flight at the peer), the replies are written, the write side is shut
 * down, and the connection closes at the peer's EOF, or DRAIN_MS after the
 * shutdown, or when it has sent DRAIN_BYTES more. A peer's EOF closes the
 * client once its queued replies are written.
 */
#include "tallyd/server.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "tallyd/commands.h"
#include "tallyd/log.h"
#include "tallyd/rcu.h"
#include "tallyd/resp.h"

#define LISTEN_BACKLOG 511
#define READ_CHUNK     (16u << 10) /* bytes offered to each read */
#define KEEP_BUF       (64u << 10) /* an empty buffer larger than this is freed */
#define INLINE_MAX     (64u << 10) /* longest inline request line */
#define KEEPALIVE_S    300
/* Limits before AUTH when server.requirepass is set. */
#define UNAUTH_MAX_ARGS  16
#define UNAUTH_MAX_BULK  1024
#define UNAUTH_MAX_QUERY 4096
/* A draining client is closed this long after its write side was shut
 * down, or once it has sent this many more bytes. */
#define DRAIN_MS         1000
#define DRAIN_BYTES      (1u << 20)
#define MAXCLIENTS_REPLY "-ERR max number of clients reached\r\n"
/* Ready clients whose first request check_cb hints to the store before it
 * executes them; any beyond are executed without. */
#define HINT_CLIENTS 64
/* Bytes of a request parsed ahead to hint it to the store (peek): a longer
 * one is not parsed twice. */
#define PEEK_MAX 4096

typedef struct server_loop server_loop_t;
typedef struct client client_t;

typedef enum {
    CLIENT_OPEN = 0, /* executing requests */
    CLIENT_DRAINING, /* QUIT, protocol error or peer EOF: writing what is left */
    CLIENT_CLOSING   /* uv_close called; freed in client_close_cb */
} client_state_t;

/* One connection. Loop thread only. */
struct client {
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } h;
    server_loop_t *lp;
    client_t *prev, *next;   /* lp->clients, while not closing */
    client_t *yprev, *ynext; /* lp->yielded, while yielded */
    client_t *rprev, *rnext; /* lp->ready, while ready */
    client_t *dprev, *dnext; /* srv->dir from client_start to client_close (srv->dir_mu) */
    client_state_t state;
    bool reading;       /* uv_read_start in effect */
    bool paused;        /* execution stopped by server.output_soft_limit */
    bool unthrottled;   /* paused with no reply read for server.output_stall: the
                         * soft limit is off until the output drains below it */
    bool writing;       /* a uv_write of wbuf is in flight */
    bool shut;          /* uv_shutdown issued */
    bool peer_eof;      /* the peer closed its side: close once written */
    bool counted;       /* counted in d->server.connected */
    bool parser_ready;  /* parser initialised */
    bool limits_authed; /* parser has the configured (not the tight) limits */
    bool req_started;   /* in holds the first bytes of a request since req_start */
    bool yielded;       /* on lp->yielded: reading resumes in the next iteration */
    bool ready;         /* on lp->ready: read this iteration, executed in check_cb */
    tly_session_t session;
    tly_resp_parser_t parser;
    size_t max_query; /* current bound of one pending request */
    tly_buf_t in, out, wbuf;
    size_t woff;          /* bytes of wbuf written before uv_write took it */
    uint64_t last_io;     /* uv_now of the last byte read or written */
    uint64_t req_start;   /* uv_now when the pending request's first byte came */
    size_t req_mark;      /* in.len when req_start was set */
    uint64_t drain_since; /* uv_now of the shutdown of a draining client */
    size_t drained;       /* bytes dropped while draining */
    size_t mem;           /* bytes counted in d->server.clients_memory */
    uint64_t stall_since; /* paused: uv_now when the unread output last shrank */
    size_t stall_left;    /* paused: client_unread() then */
    uv_write_t wreq;
    uv_shutdown_t sreq;
};

/* One event loop and its thread. Fields are written by the main thread
 * before the loop's thread starts (or after it is joined) and by that thread
 * while it runs; other threads touch only `stop` (immutable after
 * tly_server_new; uv_async_send), `kill` (uv_async_send, while `listed`,
 * under srv->dir_mu, is not 0) and `listed` (under srv->dir_mu). */
struct server_loop {
    tly_server_t *srv;
    size_t index;
    uv_loop_t loop;
    bool loop_ready;     /* uv_loop_init done: uv_loop_close owed */
    bool thread_started; /* uv_thread_join owed */
    uv_thread_t thread;
    int tcp_fd;  /* listening socket until a handle owns it; -1 after */
    int unix_fd; /* loop 0's unix socket until a handle owns it; -1 after */
    uv_async_t *stop;
    uv_async_t *kill; /* from any loop: close the clients CLIENT KILL marked, and
                       * those over their memory share (evict_clients) */
    size_t listed;    /* its clients in the directory (srv->dir_mu): while
                       * any is, its loop runs and `kill` is open */
    uv_tcp_t *listener;
    uv_pipe_t *unix_listener;
    uv_timer_t *timer;
    uv_prepare_t *prepare; /* resumes the yielded clients before each poll */
    uv_check_t *check;     /* executes the clients read in each poll (check_cb) */
    client_t *clients;
    client_t *yielded;
    client_t *ready, *ready_tail;       /* read in this iteration's poll, in order */
    tly_prefetch_t hints[HINT_CLIENTS]; /* check_cb's, one per ready client */
    tly_resp_parser_t peek;             /* peek's (the loop's thread) */
    tly_cmd_scratch_t *scratch;
    bool stopping;
    char discard[READ_CHUNK]; /* bytes of draining clients land here */
};

struct tly_server {
    tly_daemon_t *d;
    size_t nloops;
    server_loop_t *loops;
    char *unix_path;                   /* owned; NULL when no unix socket is bound */
    char where[INET6_ADDRSTRLEN + 16]; /* bound "host:port", for logs */
    atomic_bool stop_sent;             /* tly_server_stop_async ran */
    bool started;
    /* the client directory (tly_server_each_client): every open client of
     * every loop, newest at dir, oldest at dir_tail */
    pthread_mutex_t dir_mu;
    client_t *dir, *dir_tail;
};

/* ---- helpers ------------------------------------------------------------ */

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (p == NULL) {
        fprintf(stderr, "tallyd: out of memory allocating %zu bytes\n", n * size);
        abort();
    }
    return p;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void stat_add(atomic_uint_fast64_t *v, uint64_t n)
{
    atomic_fetch_add_explicit(v, n, memory_order_relaxed);
}

static void free_handle_cb(uv_handle_t *h)
{
    free(h);
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* Formats an inet address as "ip:port", IPv6 as "[ip]:port" (Redis's
 * convention in CLIENT LIST). */
static void format_addr(const struct sockaddr *sa, char *out, size_t cap)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
        snprintf(out, cap, "%s:%u", ip, (unsigned)ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof ip);
        snprintf(out, cap, "[%s]:%u", ip, (unsigned)ntohs(in6->sin6_port));
    } else {
        snprintf(out, cap, "?:0");
    }
}

/* ---- binding (main thread) ---------------------------------------------- */

bool tly_split_addr(const char *addr, char *host, size_t hostcap, char *port, size_t portcap)
{
    const char *colon = strrchr(addr, ':');
    if (colon == NULL)
        return false;
    const char *h = addr;
    size_t hlen = (size_t)(colon - addr);
    if (hlen > 0 && h[0] == '[') {
        if (hlen < 2 || h[hlen - 1] != ']')
            return false;
        h++;
        hlen -= 2;
    }
    const char *p = colon + 1;
    size_t plen = strlen(p);
    if (hlen >= hostcap || plen == 0 || plen >= portcap || plen > 5)
        return false;
    for (size_t i = 0; i < plen; i++)
        if (p[i] < '0' || p[i] > '9')
            return false;
    if (atoi(p) > 65535)
        return false;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    memcpy(port, p, plen + 1);
    return true;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static int new_socket(int family, bool reuseport)
{
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/*
 * Binds and listens on every loop's socket at addr. Returns 0, or an errno.
 * The sockets share the port through SO_REUSEPORT, which would also let a
 * second tallyd of the same user bind it and silently take half the
 * connections; a probe socket without SO_REUSEPORT goes first, so a port
 * already listened on fails with EADDRINUSE as without SO_REUSEPORT. A port
 * of 0 is resolved by the probe and then used by every socket.
 */
static int bind_all(tly_server_t *srv, const struct sockaddr *sa, socklen_t salen)
{
    struct sockaddr_storage addr;
    socklen_t len = salen;
    int err = 0, probe = -1;
    memcpy(&addr, sa, salen);

    probe = new_socket(sa->sa_family, false);
    if (probe < 0 || bind(probe, (struct sockaddr *)&addr, len) != 0 ||
        getsockname(probe, (struct sockaddr *)&addr, &len) != 0) {
        err = errno;
        goto out;
    }
    close_fd(&probe);
    for (size_t i = 0; i < srv->nloops; i++) {
        int fd = new_socket(sa->sa_family, true);
        if (fd < 0 || bind(fd, (struct sockaddr *)&addr, len) != 0 ||
            listen(fd, LISTEN_BACKLOG) != 0) {
            err = errno;
            if (fd >= 0)
                close(fd);
            goto out;
        }
        srv->loops[i].tcp_fd = fd;
    }
    format_addr((struct sockaddr *)&addr, srv->where, sizeof srv->where);
    srv->d->tcp_port = addr.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&addr)->sin6_port)
                                                  : ntohs(((struct sockaddr_in *)&addr)->sin_port);
out:
    close_fd(&probe);
    if (err != 0)
        for (size_t i = 0; i < srv->nloops; i++)
            close_fd(&srv->loops[i].tcp_fd);
    return err;
}

/* Resolves server.listen and binds the first address that works. */
static bool bind_tcp(tly_server_t *srv, char *errbuf, size_t errlen)
{
    const char *listen = srv->d->cfg->server.listen;
    char host[256], port[8];
    if (!tly_split_addr(listen, host, sizeof host, port, sizeof port)) {
        snprintf(errbuf, errlen, "server.listen %s: not host:port (IPv6 as [addr]:port)", listen);
        return false;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | (host[0] ? 0 : AI_PASSIVE)};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (rc != 0) {
        snprintf(errbuf, errlen, "server.listen %s: %s", listen,
                 rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        return false;
    }
    int err = EADDRNOTAVAIL;
    for (const struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
            continue;
        err = bind_all(srv, ai->ai_addr, ai->ai_addrlen);
        if (err == 0)
            break;
    }
    freeaddrinfo(res);
    if (err != 0) {
        snprintf(errbuf, errlen, "server.listen %s: %s", listen, strerror(err));
        return false;
    }
    return true;
}

/* Binds and listens on the unix socket at path, removing a stale socket
 * file first (one nobody accepts on). */
static bool bind_unix(tly_server_t *srv, const char *path, char *errbuf, size_t errlen)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sun.sun_path) {
        snprintf(errbuf, errlen, "server.unix %s: longer than %zu bytes", path,
                 sizeof sun.sun_path - 1);
        return false;
    }
    memcpy(sun.sun_path, path, strlen(path) + 1);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            snprintf(errbuf, errlen, "server.unix %s: exists and is not a socket", path);
            return false;
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        bool live = probe >= 0 && connect(probe, (struct sockaddr *)&sun, sizeof sun) == 0;
        if (probe >= 0)
            close(probe);
        if (live) {
            snprintf(errbuf, errlen, "server.unix %s: %s", path, strerror(EADDRINUSE));
            return false;
        }
        unlink(path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sun, sizeof sun) != 0) {
        snprintf(errbuf, errlen, "server.unix %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return false;
    }
    srv->loops[0].unix_fd = fd;
    srv->unix_path = strdup(path); /* from now on tly_server_free removes the file */
    if (srv->unix_path == NULL) {
        fprintf(stderr, "tallyd: out of memory\n");
        abort();
    }
    if (listen(fd, LISTEN_BACKLOG) != 0) {
        snprintf(errbuf, errlen, "server.unix %s: %s", path, strerror(errno));
        return false;
    }
    return true;
}

/* ---- clients (loop thread) ---------------------------------------------- */

static void client_flush(client_t *c);
static void client_process(client_t *c);
static void client_pump(client_t *c, bool run);

static size_t client_queued(const client_t *c)
{
    return c->out.len + (c->writing ? c->wbuf.len - c->woff : 0);
}

/* Reply bytes the client has not read yet, as far as this end can tell:
 * those not handed to libuv, those in its write queue and those in the
 * kernel's send queue (TIOCOUTQ; for TCP, sent and not acknowledged too).
 * While execution is paused no reply is added, so this falls exactly when
 * the client reads, however much the kernel buffers in between. */
static size_t client_unread(client_t *c)
{
    size_t n = c->out.len + uv_stream_get_write_queue_size(&c->h.stream);
    uv_os_fd_t fd;
    int q = 0;
    if (uv_fileno(&c->h.handle, &fd) == 0 && ioctl(fd, TIOCOUTQ, &q) == 0 && q > 0)
        n += (size_t)q;
    return n;
}

static void shrink(tly_buf_t *b)
{
    if (b->len == 0 && b->cap > KEEP_BUF)
        tly_buf_fini(b);
}

/* Takes c off lp->yielded. */
static void client_unyield(client_t *c)
{
    if (!c->yielded)
        return;
    if (c->yprev != NULL)
        c->yprev->ynext = c->ynext;
    else
        c->lp->yielded = c->ynext;
    if (c->ynext != NULL)
        c->ynext->yprev = c->yprev;
    c->yprev = c->ynext = NULL;
    c->yielded = false;
}

/* Puts c, which read input, on lp->ready: check_cb executes it. */
static void client_ready(client_t *c)
{
    if (c->ready)
        return;
    c->ready = true;
    c->rnext = NULL;
    c->rprev = c->lp->ready_tail;
    if (c->rprev != NULL)
        c->rprev->rnext = c;
    else
        c->lp->ready = c;
    c->lp->ready_tail = c;
}

static void client_unready(client_t *c)
{
    if (!c->ready)
        return;
    if (c->rprev != NULL)
        c->rprev->rnext = c->rnext;
    else
        c->lp->ready = c->rnext;
    if (c->rnext != NULL)
        c->rnext->rprev = c->rprev;
    else
        c->lp->ready_tail = c->rprev;
    c->rprev = c->rnext = NULL;
    c->ready = false;
}

static void client_close_cb(uv_handle_t *h)
{
    client_t *c = h->data;
    tly_buf_fini(&c->in);
    tly_buf_fini(&c->out);
    tly_buf_fini(&c->wbuf);
    if (c->parser_ready)
        tly_resp_parser_fini(&c->parser);
    free(c);
}

/* Lists c in the client directory. c's loop thread. */
static void dir_add(client_t *c)
{
    tly_server_t *srv = c->lp->srv;
    pthread_mutex_lock(&srv->dir_mu);
    c->dprev = NULL;
    c->dnext = srv->dir;
    if (srv->dir != NULL)
        srv->dir->dprev = c;
    else
        srv->dir_tail = c;
    srv->dir = c;
    c->lp->listed++;
    pthread_mutex_unlock(&srv->dir_mu);
}

/* Takes c out of the client directory; after this no other loop reaches
 * its session. c's loop thread; c was listed (client_close runs only for
 * clients client_start began). */
static void dir_remove(client_t *c)
{
    tly_server_t *srv = c->lp->srv;
    pthread_mutex_lock(&srv->dir_mu);
    if (c->dprev != NULL)
        c->dprev->dnext = c->dnext;
    else
        srv->dir = c->dnext;
    if (c->dnext != NULL)
        c->dnext->dprev = c->dprev;
    else
        srv->dir_tail = c->dprev;
    c->dprev = c->dnext = NULL;
    c->lp->listed--;
    pthread_mutex_unlock(&srv->dir_mu);
}

/* Closes c now; pending writes are cancelled. Idempotent. */
static void client_close(client_t *c)
{
    if (c->state == CLIENT_CLOSING)
        return;
    c->state = CLIENT_CLOSING;
    client_unyield(c);
    client_unready(c);
    if (c->prev != NULL)
        c->prev->next = c->next;
    else if (c->lp->clients == c)
        c->lp->clients = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    dir_remove(c);
    /* the buffers are freed in client_close_cb: no longer the clients'
     * (uncounted before the connection, so that a reader who sees it gone
     * sees its bytes gone too) */
    atomic_fetch_sub_explicit(&c->lp->srv->d->server.clients_memory, c->mem, memory_order_relaxed);
    c->mem = 0;
    if (c->counted)
        atomic_fetch_sub_explicit(&c->lp->srv->d->server.connected, 1, memory_order_relaxed);
    uv_close(&c->h.handle, client_close_cb);
}

/* Bytes c's buffers hold: input, queued and in-flight output, the parser's
 * spans, pointers and inline scratch. */
static size_t client_memory(const client_t *c)
{
    size_t n = c->in.cap + c->out.cap + c->wbuf.cap;
    if (c->parser_ready)
        n += c->parser.cap * (sizeof *c->parser.args + sizeof *c->parser.argv) +
             c->parser.scratch_cap;
    return n;
}

/* Wakes every other loop that has clients, to run evict_clients. */
static void wake_other_loops(server_loop_t *lp)
{
    tly_server_t *srv = lp->srv;
    pthread_mutex_lock(&srv->dir_mu);
    for (size_t i = 0; i < srv->nloops; i++)
        if (&srv->loops[i] != lp && srv->loops[i].listed > 0)
            uv_async_send(srv->loops[i].kill);
    pthread_mutex_unlock(&srv->dir_mu);
}

/* Above server.max_clients_memory (counted over every loop): closes this
 * loop's clients that hold more than an even share of the cap (the cap over
 * the clients connected), unauthenticated ones first, then the largest,
 * until the clients hold less or none here is over its share. When the
 * clients hold more than the cap, some client holds more than its share;
 * if it is another loop's, and `wake`, this loop wakes the others, whose
 * kill_cb runs this (without waking anyone: no loop bounces the work on)
 * and closes it; this loop's clients, within their shares, stay. */
static void evict_clients(server_loop_t *lp, bool wake)
{
    tly_daemon_t *d = lp->srv->d;
    const uint64_t cap = (uint64_t)d->cfg->server.max_clients_memory;
    for (;;) {
        uint64_t total = atomic_load_explicit(&d->server.clients_memory, memory_order_relaxed);
        uint64_t clients = atomic_load_explicit(&d->server.connected, memory_order_relaxed);
        if (total <= cap)
            return;
        uint64_t share = cap / (clients > 0 ? clients : 1);
        client_t *big = NULL;
        for (client_t *c = lp->clients; c != NULL; c = c->next) {
            if (c->mem <= share)
                continue;
            if (big == NULL || (!c->session.authed && big->session.authed) ||
                (c->session.authed == big->session.authed && c->mem > big->mem))
                big = c;
        }
        if (big == NULL) {
            if (wake)
                wake_other_loops(lp);
            return;
        }
        stat_add(&d->server.evicted_clients, 1);
        tly_warn("client %" PRIu64 " (%s) closed: it held %zu bytes of buffers, over its share "
                 "(%" PRIu64 ") of server.max_clients_memory (%" PRId64 "), when the clients "
                 "held %" PRIu64,
                 big->session.id, big->session.addr, big->mem, share,
                 d->cfg->server.max_clients_memory, total);
        client_close(big);
    }
}

/* Brings c's share of d->server.clients_memory up to date, after a read or
 * a write changed its buffers; may close c, or others of its loop, when the
 * clients hold more than server.max_clients_memory. */
/* client_account without the eviction: whether all clients' buffers are
 * now over server.max_clients_memory. */
static bool client_account_only(client_t *c)
{
    if (c->state == CLIENT_CLOSING)
        return false;
    /* CLIENT LIST's omem: what is queued now, not when the last command ran */
    __atomic_store_n(&c->session.obuf, client_queued(c), __ATOMIC_RELAXED);
    size_t now = client_memory(c);
    if (now == c->mem)
        return false;
    tly_daemon_t *d = c->lp->srv->d;
    uint64_t total;
    if (now > c->mem)
        total = atomic_fetch_add_explicit(&d->server.clients_memory, now - c->mem,
                                          memory_order_relaxed) +
                (now - c->mem);
    else
        total = atomic_fetch_sub_explicit(&d->server.clients_memory, c->mem - now,
                                          memory_order_relaxed) -
                (c->mem - now);
    c->mem = now;
    return total > (uint64_t)d->cfg->server.max_clients_memory;
}

static void client_account(client_t *c)
{
    if (client_account_only(c))
        evict_clients(c->lp, true);
}

/* The parser limits of an authenticated session, or of one not
 * authenticated yet (tight); *max_query gets the bound of one pending
 * request. */
static tly_resp_limits_t parser_limits(const tly_config_t *cfg, bool authed, size_t *max_query)
{
    tly_resp_limits_t lim = {.max_args = (size_t)cfg->server.max_args,
                             .max_bulk = (size_t)cfg->server.max_bulk};
    *max_query = (size_t)cfg->server.max_query_buffer;
    if (!authed) {
        lim.max_args = min_size(lim.max_args, UNAUTH_MAX_ARGS);
        lim.max_bulk = min_size(lim.max_bulk, UNAUTH_MAX_BULK);
        *max_query = min_size(*max_query, UNAUTH_MAX_QUERY);
    }
    lim.max_inline = min_size(INLINE_MAX, *max_query);
    return lim;
}

/* Gives the parser the limits for an authenticated session or the tight
 * ones. Only between requests: the parser is re-initialised. */
static void client_set_limits(client_t *c, bool authed)
{
    tly_resp_limits_t lim = parser_limits(c->lp->srv->d->cfg, authed, &c->max_query);
    if (c->parser_ready)
        tly_resp_parser_fini(&c->parser);
    tly_resp_parser_init(&c->parser, &lim);
    c->parser_ready = true;
    c->limits_authed = authed;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    client_t *c = h->data;
    if (c->state != CLIENT_OPEN) {
        buf->base = c->lp->discard;
        buf->len = sizeof c->lp->discard;
        return;
    }
    buf->base = tly_buf_reserve(&c->in, READ_CHUNK);
    buf->len = READ_CHUNK;
}

static void read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

static void start_reading(client_t *c)
{
    if (c->reading || c->yielded || c->state == CLIENT_CLOSING)
        return;
    if (uv_read_start(&c->h.stream, alloc_cb, read_cb) != 0) {
        client_close(c);
        return;
    }
    c->reading = true;
}

static void stop_reading(client_t *c)
{
    if (!c->reading)
        return;
    uv_read_stop(&c->h.stream);
    c->reading = false;
}

/* Stops executing; what is queued is still written (client_flush), then the
 * connection is shut down. Input still arriving is dropped. */
static void client_drain(client_t *c)
{
    c->state = CLIENT_DRAINING;
    c->paused = false;
    c->in.len = 0;
    shrink(&c->in);
    if (!c->peer_eof)
        start_reading(c);
}

static void client_protocol_error(client_t *c, const char *why)
{
    stat_add(&c->lp->srv->d->server.protocol_errors, 1);
    tly_debug("client %" PRIu64 " (%s): protocol error: %s", c->session.id, c->session.addr, why);
    tly_resp_errorf(&c->out, "ERR Protocol error: %s", why);
    client_drain(c);
}

static void client_overflow(client_t *c)
{
    stat_add(&c->lp->srv->d->server.output_overflows, 1);
    tly_warn("client %" PRIu64 " (%s) closed: %zu reply bytes queued, over "
             "server.max_output_buffer (%" PRId64 ") of replies it has not read",
             c->session.id, c->session.addr, client_queued(c),
             c->lp->srv->d->cfg->server.max_output_buffer);
    client_close(c);
}

static void shutdown_cb(uv_shutdown_t *req, int status)
{
    client_t *c = req->data;
    if (status < 0 && status != UV_ECANCELED)
        client_close(c);
}

static void write_cb(uv_write_t *req, int status)
{
    client_t *c = req->data;
    c->writing = false;
    if (c->state == CLIENT_CLOSING)
        return; /* cancelled by uv_close */
    if (status < 0) {
        client_close(c);
        return;
    }
    stat_add(&c->lp->srv->d->server.bytes_out, c->wbuf.len - c->woff);
    c->last_io = uv_now(&c->lp->loop);
    c->wbuf.len = 0;
    c->woff = 0;
    shrink(&c->wbuf);
    client_pump(c, false);
    client_account(c);
}

/* Hands c->out to the kernel: uv_try_write, then uv_write for the rest
 * unless a write is already in flight (write_cb calls again). A draining
 * client whose output is all written is shut down, or closed after EOF. */
static void client_flush(client_t *c)
{
    if (c->state == CLIENT_CLOSING || c->writing)
        return;
    if (c->out.len > 0) {
        uv_buf_t b = uv_buf_init(c->out.data, 0);
        b.len = c->out.len;
        int n = uv_try_write(&c->h.stream, &b, 1);
        if (n < 0 && n != UV_EAGAIN) {
            client_close(c);
            return;
        }
        size_t done = n > 0 ? (size_t)n : 0;
        if (done > 0) {
            stat_add(&c->lp->srv->d->server.bytes_out, done);
            c->last_io = uv_now(&c->lp->loop);
        }
        if (done == c->out.len) {
            c->out.len = 0;
            shrink(&c->out);
        } else {
            tly_buf_t empty = c->wbuf; /* len 0: no write in flight */
            c->wbuf = c->out;
            c->out = empty;
            c->woff = done;
            uv_buf_t rest = uv_buf_init(c->wbuf.data + done, 0);
            rest.len = c->wbuf.len - done;
            c->wreq.data = c;
            if (uv_write(&c->wreq, &c->h.stream, &rest, 1, write_cb) != 0) {
                client_close(c);
                return;
            }
            c->writing = true;
            return;
        }
    }
    if (c->state != CLIENT_DRAINING)
        return;
    if (c->peer_eof) {
        client_close(c);
    } else if (!c->shut) {
        c->shut = true;
        c->drain_since = uv_now(&c->lp->loop);
        c->sreq.data = c;
        if (uv_shutdown(&c->sreq, &c->h.stream, shutdown_cb) != 0)
            client_close(c);
    }
}

/* Parses the request at the start of c's p[0..len) with the loop's own
 * parser, looking at PEEK_MAX bytes at most, and hints the store about the
 * entity it reads (its table slot) into *pf; nothing (pf->n = 0) for an
 * incomplete or malformed request, or a client not authenticated
 * (tly_command_hint hints nothing before AUTH). The request is parsed again
 * in its turn, with the client's parser. */
static void peek(client_t *c, const char *p, size_t len, tly_prefetch_t *pf)
{
    server_loop_t *lp = c->lp;
    pf->n = 0;
    if (len == 0 || !c->session.authed)
        return;
    size_t used;
    tly_resp_parser_reset(&lp->peek);
    if (tly_resp_parse(&lp->peek, p, len < PEEK_MAX ? len : PEEK_MAX, &used) != TLY_RESP_REQUEST)
        return;
    tly_rcu_read_lock();
    tly_command_hint(lp->srv->d, &c->session, tly_resp_argv(&lp->peek, p), lp->peek.argc, pf);
    tly_rcu_read_unlock();
}

/* Executes the complete requests in c->in, in order, until the input is used
 * up, the output passes the soft limit (c->paused), or the client stops
 * executing (QUIT, protocol error, output overflow). */
static void client_process(client_t *c)
{
    server_loop_t *lp = c->lp;
    tly_daemon_t *d = lp->srv->d;
    size_t soft = (size_t)d->cfg->server.output_soft_limit;
    size_t hard = (size_t)d->cfg->server.max_output_buffer;
    int64_t now_ms = wall_ms();
    size_t off = 0;
    tly_prefetch_t next; /* the next request of a pipeline, hinted (peek) */

    while (c->state == CLIENT_OPEN && off < c->in.len) {
        if (client_queued(c) > soft && !c->unthrottled) {
            c->paused = true;
            c->stall_since = uv_now(&lp->loop);
            c->stall_left = SIZE_MAX;
            break;
        }
        const char *req = c->in.data + off;
        size_t used = 0;
        tly_resp_status_t st = tly_resp_parse(&c->parser, req, c->in.len - off, &used);
        if (st == TLY_RESP_NEED)
            break;
        if (st == TLY_RESP_ERROR) {
            client_protocol_error(c, c->parser.err);
            return;
        }
        if (used > c->max_query) {
            /* as when it is still arriving: the limit does not depend on
             * how the bytes were split into reads */
            client_protocol_error(c, "request too large");
            return;
        }
        if (st == TLY_RESP_REQUEST) {
            /* the next request of a pipeline: its slot now, its record
             * once this one has run */
            peek(c, req + used, c->in.len - off - used, &next);
            const tly_arg_t *argv = tly_resp_argv(&c->parser, req);
            /* read by other loops' CLIENT LIST (commands.h) */
            __atomic_store_n(&c->session.last_ms, now_ms, __ATOMIC_RELAXED);
            __atomic_store_n(&c->session.qbuf, c->in.len - off, __ATOMIC_RELAXED);
            __atomic_store_n(&c->session.obuf, client_queued(c), __ATOMIC_RELAXED);
            tly_command_exec(d, &c->session, lp->scratch, argv, c->parser.argc, &c->out, now_ms);
            if (next.n > 0) {
                tly_rcu_read_lock();
                tly_store_prefetch_records(d->store, &next);
                tly_store_prefetch_rest(d->store, &next);
                tly_rcu_read_unlock();
            }
        }
        off += used;
        if (client_queued(c) > hard) {
            client_overflow(c);
            return;
        }
        if (c->session.close_after) {
            client_drain(c);
            return;
        }
        if (c->session.authed != c->limits_authed)
            client_set_limits(c, c->session.authed);
    }
    if (c->state != CLIENT_OPEN)
        return;
    tly_buf_consume(&c->in, off);
    __atomic_store_n(&c->session.qbuf, c->in.len, __ATOMIC_RELAXED);
    if (c->paused)
        return; /* what is left may be complete requests: no deadline runs */
    if (c->in.len > c->max_query) {
        client_protocol_error(c, "request too large");
        return;
    }
    if (c->in.len == 0) {
        c->req_started = false;
        shrink(&c->in);
        tly_resp_parser_trim(&c->parser); /* an idle client holds little */
    } else if (off > 0 || !c->req_started || c->in.len - c->req_mark >= READ_CHUNK) {
        /* a new request, or READ_CHUNK more of this one: it is arriving,
         * not trickling in, and its deadline starts again */
        c->req_started = true;
        c->req_start = uv_now(&lp->loop);
        c->req_mark = c->in.len;
    }
}

/* Ends a pause: execution goes on with the input already read. The time
 * spent paused was tallyd's choice, so the pending request's deadline
 * starts again (client_process sets it for what is left). */
static void resume(client_t *c)
{
    c->paused = false;
    c->req_started = false;
}

/*
 * Executes (when `run`) and writes, and again while the kernel takes every
 * reply at once after the soft limit paused execution (no write completion
 * would come to resume it). Then reads while executing, and not while paused.
 */
static void client_pump(client_t *c, bool run)
{
    size_t soft = (size_t)c->lp->srv->d->cfg->server.output_soft_limit;
    for (;;) {
        if (run && c->state == CLIENT_OPEN)
            client_process(c);
        if (c->state == CLIENT_CLOSING)
            return;
        client_flush(c);
        if (c->unthrottled && client_queued(c) <= soft)
            c->unthrottled = false; /* it reads its replies: back to the soft limit */
        if (c->state != CLIENT_OPEN || !c->paused || client_queued(c) > soft)
            break;
        resume(c);
        run = true;
    }
    if (c->state != CLIENT_OPEN)
        return;
    if (c->paused)
        stop_reading(c);
    else
        start_reading(c);
}

/* One read per client per loop iteration. A read that filled its buffer
 * may have left more behind, and libuv would read again at once (up to 32
 * times), executing each chunk: a client that keeps its socket full — a
 * deep pipeline of large requests — would hold the loop while the others
 * wait. Such a client stops reading until the next iteration's prepare
 * callback, so every ready client gets its read in between. */
static void client_yield(client_t *c)
{
    stat_add(&c->lp->srv->d->server.read_yields, 1);
    stop_reading(c);
    c->yielded = true;
    c->yprev = NULL;
    c->ynext = c->lp->yielded;
    if (c->ynext != NULL)
        c->ynext->yprev = c;
    c->lp->yielded = c;
}

static void prepare_cb(uv_prepare_t *h)
{
    server_loop_t *lp = h->data;
    while (lp->yielded != NULL) {
        client_t *c = lp->yielded;
        client_unyield(c);
        if (c->state == CLIENT_DRAINING ? !c->peer_eof : !c->paused)
            start_reading(c);
    }
}

static void read_bytes(client_t *c, ssize_t nread)
{
    if (nread == 0 || c->state == CLIENT_CLOSING)
        return;
    if (nread < 0) {
        if (c->ready) {
            /* what it sent before its EOF is executed first (libuv ends a
             * client's reads at a short read and a full one yields, so EOF
             * comes in a later iteration; this keeps the order if not) */
            client_unready(c);
            client_pump(c, true);
            if (c->state == CLIENT_CLOSING)
                return;
        }
        /* EOF: the replies already made are still written; an error closes */
        if (nread != UV_EOF || client_queued(c) == 0) {
            client_close(c);
            return;
        }
        stop_reading(c);
        c->peer_eof = true;
        if (c->state == CLIENT_OPEN)
            client_drain(c);
        client_flush(c);
        return;
    }
    stat_add(&c->lp->srv->d->server.bytes_in, (uint64_t)nread);
    c->last_io = uv_now(&c->lp->loop);
    if (c->state == CLIENT_DRAINING) {
        c->drained += (size_t)nread;
        if (c->drained > DRAIN_BYTES)
            client_close(c);
        return;
    }
    c->in.len += (size_t)nread;
    client_ready(c);
    if ((size_t)nread == READ_CHUNK && c->reading)
        client_yield(c);
}

/*
 * Executes the clients read in this iteration's poll, in the order they
 * were read. With several, it first parses each one's first request and
 * hints the store about the entity it reads, then starts loading those
 * entities' records, then executes: the cache misses of finding them
 * overlap instead of coming one after the other (a loop serving many
 * clients has many requests in hand after each poll).
 */
static void check_cb(uv_check_t *h)
{
    server_loop_t *lp = h->data;
    if (lp->ready != NULL && lp->ready != lp->ready_tail) {
        size_t n = 0, hinted = 0;
        tly_rcu_read_lock();
        for (client_t *c = lp->ready; c != NULL && n < HINT_CLIENTS; c = c->rnext) {
            peek(c, c->in.data, c->in.len, &lp->hints[n]);
            hinted += lp->hints[n++].n > 0;
        }
        for (size_t i = 0; i < n; i++)
            tly_store_prefetch_records(lp->srv->d->store, &lp->hints[i]);
        for (size_t i = 0; i < n; i++)
            tly_store_prefetch_rest(lp->srv->d->store, &lp->hints[i]);
        tly_rcu_read_unlock();
        stat_add(&lp->srv->d->server.hinted_requests, hinted);
    }
    while (lp->ready != NULL) {
        client_t *c = lp->ready;
        client_unready(c);
        client_pump(c, true);
        client_account(c);
    }
}

static void read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf; /* the bytes are in c->in (or the discard buffer) */
    client_t *c = stream->data;
    read_bytes(c, nread);
    client_account(c);
}

static void client_start(client_t *c, bool is_unix)
{
    server_loop_t *lp = c->lp;
    tly_daemon_t *d = lp->srv->d;
    tly_session_t *s = &c->session;
    tly_session_init(s, d);
    s->id = atomic_fetch_add_explicit(&d->server.next_client_id, 1, memory_order_relaxed);
    uv_os_fd_t fd;
    s->fd = uv_fileno(&c->h.handle, &fd) == 0 ? fd : -1;
    s->loop = (int)c->lp->index;
    s->created_ms = s->last_ms = wall_ms();
    if (is_unix) {
        snprintf(s->addr, sizeof s->addr, "%s:0", lp->srv->unix_path);
        snprintf(s->laddr, sizeof s->laddr, "%s:0", lp->srv->unix_path);
    } else {
        struct sockaddr_storage ss;
        int len = sizeof ss;
        if (uv_tcp_getpeername(&c->h.tcp, (struct sockaddr *)&ss, &len) == 0)
            format_addr((struct sockaddr *)&ss, s->addr, sizeof s->addr);
        len = sizeof ss;
        if (uv_tcp_getsockname(&c->h.tcp, (struct sockaddr *)&ss, &len) == 0)
            format_addr((struct sockaddr *)&ss, s->laddr, sizeof s->laddr);
        uv_tcp_nodelay(&c->h.tcp, 1);
        uv_tcp_keepalive(&c->h.tcp, 1, KEEPALIVE_S);
    }
    client_set_limits(c, s->authed);
    c->last_io = uv_now(&lp->loop);
    c->next = lp->clients;
    if (lp->clients != NULL)
        lp->clients->prev = c;
    lp->clients = c;
    dir_add(c);
    start_reading(c);
}

static void accept_cb(uv_stream_t *listener, int status)
{
    server_loop_t *lp = listener->data;
    tly_daemon_t *d = lp->srv->d;
    if (status < 0) {
        tly_warn("accept: %s", uv_strerror(status));
        return;
    }
    bool is_unix = listener->type == UV_NAMED_PIPE;
    client_t *c = xcalloc(1, sizeof *c);
    c->lp = lp;
    if (is_unix)
        uv_pipe_init(&lp->loop, &c->h.pipe, 0);
    else
        uv_tcp_init(&lp->loop, &c->h.tcp);
    c->h.handle.data = c;
    c->state = CLIENT_CLOSING; /* not in lp->clients until client_start */
    int rc = uv_accept(listener, &c->h.stream);
    if (rc != 0) {
        tly_warn("accept: %s", uv_strerror(rc));
        uv_close(&c->h.handle, client_close_cb);
        return;
    }
    uint64_t n = atomic_fetch_add_explicit(&d->server.connected, 1, memory_order_relaxed) + 1;
    if (n > (uint64_t)d->cfg->server.max_clients) {
        atomic_fetch_sub_explicit(&d->server.connected, 1, memory_order_relaxed);
        stat_add(&d->server.rejected_maxclients, 1);
        /* a fresh socket's send buffer takes this whole; if not, the peer
         * sees the close alone */
        uv_buf_t b = uv_buf_init((char *)MAXCLIENTS_REPLY, sizeof MAXCLIENTS_REPLY - 1);
        int n_out = uv_try_write(&c->h.stream, &b, 1);
        if (n_out > 0)
            stat_add(&d->server.bytes_out, (uint64_t)n_out);
        uv_close(&c->h.handle, client_close_cb);
        return;
    }
    stat_add(&d->server.connections_total, 1);
    c->counted = true;
    c->state = CLIENT_OPEN;
    client_start(c, is_unix);
}

/* ---- the client directory ------------------------------------------------ */

void tly_server_each_client(tly_server_t *srv, void (*fn)(void *ctx, tly_session_t *s), void *ctx)
{
    pthread_mutex_lock(&srv->dir_mu);
    for (client_t *c = srv->dir_tail; c != NULL; c = c->dprev)
        fn(ctx, &c->session);
    pthread_mutex_unlock(&srv->dir_mu);
}

void tly_server_kill_client(tly_server_t *srv, tly_session_t *s)
{
    (void)srv;
    client_t *c = (client_t *)((char *)s - offsetof(client_t, session));
    __atomic_store_n(&s->kill, true, __ATOMIC_RELAXED);
    /* listed, so its loop runs and its kill handle is open: a loop closes
     * (and so unlists, under the lock the caller holds) every client
     * before it closes that handle */
    uv_async_send(c->lp->kill);
}

void tly_server_set_client_name(tly_server_t *srv, tly_session_t *s, const char *name, size_t len)
{
    pthread_mutex_lock(&srv->dir_mu);
    memcpy(s->name, name, len);
    s->name[len] = '\0';
    pthread_mutex_unlock(&srv->dir_mu);
}

/* A CLIENT KILL marked some of this loop's clients, or another loop found
 * the clients over server.max_clients_memory and none of its own over its
 * share. */
static void kill_cb(uv_async_t *a)
{
    server_loop_t *lp = a->data;
    client_t *next;
    for (client_t *c = lp->clients; c != NULL; c = next) {
        next = c->next;
        if (__atomic_load_n(&c->session.kill, __ATOMIC_RELAXED)) {
            tly_info("client %" PRIu64 " (%s) closed by CLIENT KILL", c->session.id,
                     c->session.addr);
            client_close(c);
        }
    }
    evict_clients(lp, false);
}

/* ---- loops -------------------------------------------------------------- */

/* Closes idle clients, requests past their deadline, and draining clients
 * that outstayed DRAIN_MS; reads on paused clients that stalled. */
static void timer_cb(uv_timer_t *t)
{
    server_loop_t *lp = t->data;
    const tly_config_t *cfg = lp->srv->d->cfg;
    uint64_t now = uv_now(&lp->loop);
    uint64_t idle = (uint64_t)cfg->server.idle_timeout_ms;
    uint64_t deadline = (uint64_t)cfg->server.request_timeout_ms;
    uint64_t stall = (uint64_t)cfg->server.output_stall_ms;
    bool over = false; /* all clients' buffers over server.max_clients_memory */
    client_t *next;
    for (client_t *c = lp->clients; c != NULL; c = next) {
        next = c->next;
        if (c->state == CLIENT_DRAINING && c->shut && now - c->drain_since >= DRAIN_MS) {
            client_close(c);
        } else if (now - c->last_io >= idle) {
            stat_add(&lp->srv->d->server.timeouts, 1);
            tly_debug("client %" PRIu64 " (%s): idle timeout", c->session.id, c->session.addr);
            client_close(c);
        } else if (c->state == CLIENT_OPEN && !c->paused && c->req_started &&
                   now - c->req_start >= deadline) {
            stat_add(&lp->srv->d->server.timeouts, 1);
            tly_debug("client %" PRIu64 " (%s): request timeout (%zu bytes pending)", c->session.id,
                      c->session.addr, c->in.len);
            client_close(c);
        } else if (c->state == CLIENT_OPEN && c->paused) {
            size_t left = client_unread(c);
            if (left < c->stall_left) {
                c->stall_left = left;
                c->stall_since = now;
            } else if (now - c->stall_since >= stall) {
                stat_add(&lp->srv->d->server.output_stalls, 1);
                tly_debug("client %" PRIu64 " (%s): no reply read for %" PRIu64
                          " ms while paused; reading on up to server.max_output_buffer",
                          c->session.id, c->session.addr, now - c->stall_since);
                c->unthrottled = true;
                resume(c);
                client_pump(c, true);
                /* evicting here could close `next`: once the walk is done */
                over = client_account_only(c) || over;
            }
        }
    }
    if (over)
        evict_clients(lp, true);
}

/* Stops the loop: closes listeners, clients, the timer and this handle, after
 * which uv_run returns. Runs on the loop's thread (or, for a loop that never
 * started, on the main thread inside tly_server_free). */
static void stop_cb(uv_async_t *a)
{
    server_loop_t *lp = a->data;
    lp->stopping = true;
    if (lp->listener != NULL)
        uv_close((uv_handle_t *)lp->listener, free_handle_cb);
    if (lp->unix_listener != NULL)
        uv_close((uv_handle_t *)lp->unix_listener, free_handle_cb);
    if (lp->timer != NULL)
        uv_close((uv_handle_t *)lp->timer, free_handle_cb);
    if (lp->prepare != NULL)
        uv_close((uv_handle_t *)lp->prepare, free_handle_cb);
    if (lp->check != NULL)
        uv_close((uv_handle_t *)lp->check, free_handle_cb);
    lp->listener = NULL;
    lp->unix_listener = NULL;
    lp->timer = NULL;
    lp->prepare = NULL;
    lp->check = NULL;
    while (lp->clients != NULL)
        client_close(lp->clients);
    if (lp->kill != NULL) /* after the clients: none of this loop is listed now */
        uv_close((uv_handle_t *)lp->kill, free_handle_cb);
    lp->kill = NULL;
    uv_close((uv_handle_t *)a, free_handle_cb);
}

static void loop_thread(void *arg)
{
    server_loop_t *lp = arg;
    tly_rcu_thread_online();
    lp->scratch = tly_cmd_scratch_new();
    size_t max_query;
    /* peek parses for authenticated clients only */
    tly_resp_limits_t lim = parser_limits(lp->srv->d->cfg, true, &max_query);
    tly_resp_parser_init(&lp->peek, &lim);
    uv_run(&lp->loop, UV_RUN_DEFAULT);
    tly_resp_parser_fini(&lp->peek);
    tly_cmd_scratch_free(lp->scratch);
    lp->scratch = NULL;
    tly_rcu_thread_offline();
}

/* Creates an async handle on lp's loop whose callback gets lp (data).
 * Returns 0, or libuv's error (nothing is left to close). */
static int loop_async(server_loop_t *lp, uv_async_cb cb, uv_async_t **out)
{
    uv_async_t *a = xcalloc(1, sizeof *a);
    int rc = uv_async_init(&lp->loop, a, cb);
    if (rc != 0) {
        free(a);
        return rc;
    }
    a->data = lp;
    *out = a;
    return 0;
}

/* Opens lp's listening handles and timer. Main thread, loop not running. */
static bool loop_open(server_loop_t *lp, char *errbuf, size_t errlen)
{
    const tly_config_t *cfg = lp->srv->d->cfg;
    int rc;
    lp->listener = xcalloc(1, sizeof *lp->listener);
    uv_tcp_init(&lp->loop, lp->listener);
    lp->listener->data = lp;
    rc = uv_tcp_open(lp->listener, lp->tcp_fd);
    if (rc == 0) {
        lp->tcp_fd = -1; /* the handle owns it now */
        rc = uv_listen((uv_stream_t *)lp->listener, LISTEN_BACKLOG, accept_cb);
    }
    if (rc != 0) {
        snprintf(errbuf, errlen, "server.listen %s: %s", cfg->server.listen, uv_strerror(rc));
        return false;
    }
    if (lp->unix_fd >= 0) {
        lp->unix_listener = xcalloc(1, sizeof *lp->unix_listener);
        uv_pipe_init(&lp->loop, lp->unix_listener, 0);
        lp->unix_listener->data = lp;
        rc = uv_pipe_open(lp->unix_listener, lp->unix_fd);
        if (rc == 0) {
            lp->unix_fd = -1;
            rc = uv_listen((uv_stream_t *)lp->unix_listener, LISTEN_BACKLOG, accept_cb);
        }
        if (rc != 0) {
            snprintf(errbuf, errlen, "server.unix %s: %s", cfg->server.unix_path, uv_strerror(rc));
            return false;
        }
    }
    /* often enough that a deadline is overshot by at most a quarter */
    uint64_t period = 1000;
    if ((uint64_t)cfg->server.request_timeout_ms / 4 < period)
        period = (uint64_t)cfg->server.request_timeout_ms / 4;
    if ((uint64_t)cfg->server.idle_timeout_ms / 4 < period)
        period = (uint64_t)cfg->server.idle_timeout_ms / 4;
    if ((uint64_t)cfg->server.output_stall_ms / 4 < period)
        period = (uint64_t)cfg->server.output_stall_ms / 4;
    if (period < 10)
        period = 10;
    lp->timer = xcalloc(1, sizeof *lp->timer);
    uv_timer_init(&lp->loop, lp->timer);
    lp->timer->data = lp;
    uv_timer_start(lp->timer, timer_cb, period, period);
    lp->prepare = xcalloc(1, sizeof *lp->prepare);
    uv_prepare_init(&lp->loop, lp->prepare);
    lp->prepare->data = lp;
    uv_prepare_start(lp->prepare, prepare_cb);
    lp->check = xcalloc(1, sizeof *lp->check);
    uv_check_init(&lp->loop, lp->check);
    lp->check->data = lp;
    uv_check_start(lp->check, check_cb);
    return true;
}

/* ---- public ------------------------------------------------------------- */

tly_server_t *tly_server_new(tly_daemon_t *d, char *errbuf, size_t errlen)
{
    const tly_config_t *cfg = d->cfg;
    tly_server_t *srv = xcalloc(1, sizeof *srv);
    srv->d = d;
    pthread_mutex_init(&srv->dir_mu, NULL);
    srv->nloops = cfg->server.threads > 0 ? (size_t)cfg->server.threads : 1;
    srv->loops = xcalloc(srv->nloops, sizeof *srv->loops);
    atomic_init(&srv->stop_sent, false);
    for (size_t i = 0; i < srv->nloops; i++) {
        server_loop_t *lp = &srv->loops[i];
        lp->srv = srv;
        lp->index = i;
        lp->tcp_fd = -1;
        lp->unix_fd = -1;
    }
    for (size_t i = 0; i < srv->nloops; i++) {
        server_loop_t *lp = &srv->loops[i];
        int rc = uv_loop_init(&lp->loop);
        if (rc != 0) {
            snprintf(errbuf, errlen, "server: cannot create an event loop: %s", uv_strerror(rc));
            goto fail;
        }
        lp->loop_ready = true;
        if ((rc = loop_async(lp, stop_cb, &lp->stop)) != 0 ||
            (rc = loop_async(lp, kill_cb, &lp->kill)) != 0) {
            snprintf(errbuf, errlen, "server: cannot create an event loop: %s", uv_strerror(rc));
            goto fail;
        }
    }
    if (!bind_tcp(srv, errbuf, errlen))
        goto fail;
    if (cfg->server.unix_path != NULL && cfg->server.unix_path[0] != '\0' &&
        !bind_unix(srv, cfg->server.unix_path, errbuf, errlen))
        goto fail;
    tly_info("listening on %s (%zu thread%s)%s%s", srv->where, srv->nloops,
             srv->nloops == 1 ? "" : "s", srv->unix_path ? " and on " : "",
             srv->unix_path ? srv->unix_path : "");
    d->srv = srv;
    return srv;
fail:
    tly_server_free(srv);
    return NULL;
}

tly_err_t tly_server_start(tly_server_t *srv, char *errbuf, size_t errlen)
{
    if (srv->started) {
        snprintf(errbuf, errlen, "server: already started");
        return TLY_E_INVAL;
    }
    srv->started = true;
    for (size_t i = 0; i < srv->nloops; i++)
        if (!loop_open(&srv->loops[i], errbuf, errlen))
            return TLY_E_IO;
    for (size_t i = 0; i < srv->nloops; i++) {
        server_loop_t *lp = &srv->loops[i];
        int rc = uv_thread_create(&lp->thread, loop_thread, lp);
        if (rc != 0) {
            snprintf(errbuf, errlen, "server: cannot start a thread: %s", uv_strerror(rc));
            return TLY_E_IO;
        }
        lp->thread_started = true;
    }
    return TLY_OK;
}

void tly_server_stop_async(tly_server_t *srv)
{
    if (srv == NULL || atomic_exchange(&srv->stop_sent, true))
        return;
    for (size_t i = 0; i < srv->nloops; i++)
        if (srv->loops[i].stop != NULL)
            uv_async_send(srv->loops[i].stop);
}

void tly_server_free(tly_server_t *srv)
{
    if (srv == NULL)
        return;
    tly_server_stop_async(srv);
    for (size_t i = 0; i < srv->nloops; i++) {
        server_loop_t *lp = &srv->loops[i];
        if (lp->thread_started)
            uv_thread_join(&lp->thread);
        else if (lp->loop_ready)
            uv_run(&lp->loop, UV_RUN_DEFAULT); /* runs stop_cb, closes handles */
        if (lp->loop_ready) {
            int rc = uv_loop_close(&lp->loop);
            assert(rc == 0 && "a libuv handle outlived its loop");
            (void)rc;
        }
        close_fd(&lp->tcp_fd);
        close_fd(&lp->unix_fd);
    }
    if (srv->unix_path != NULL) {
        unlink(srv->unix_path);
        free(srv->unix_path);
    }
    free(srv->loops);
    if (srv->d->srv == srv)
        srv->d->srv = NULL;
    pthread_mutex_destroy(&srv->dir_mu);
    free(srv);
}
