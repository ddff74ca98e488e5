/*
 * admin.h — the HTTP admin server: /healthz, /readyz and /metrics
 * (Prometheus text exposition format 0.0.4) on server.admin.
 *
 * The server is libmicrohttpd with its own polling thread; it reads only
 * the daemon context's atomics and the parts' stats functions, which are
 * thread-safe and never wait on the ingest or query paths, so a slow or
 * hostile scraper cannot stall either. GET and HEAD only.
 *
 * Threads: tly_admin_start/stop on the main thread; requests are answered
 * on libmicrohttpd's thread; tly_admin_metrics on any thread.
 */
#ifndef TALLYD_ADMIN_H
#define TALLYD_ADMIN_H

#include <stddef.h>
#include <stdint.h>

#include "tallyd/daemon.h"
#include "tallyd/resp.h"

typedef struct tly_admin tly_admin_t;

/*
 * Starts the admin HTTP server on d->cfg->server.admin ("host:port",
 * "[v6]:port"; port 0 = any free port, see tly_admin_port). d is borrowed
 * and must outlive the server (stop it before freeing the source, store or
 * config). Returns the server (free with tly_admin_stop), or NULL with a
 * sentence naming the address in err (address in use, bad address, thread
 * failure); NULL with err[0] == '\0' when server.admin is "" (disabled).
 * Main thread.
 */
tly_admin_t *tly_admin_start(tly_daemon_t *d, char *err, size_t errlen);

/* The TCP port the server is bound to. a must not be NULL. Any thread. */
int tly_admin_port(const tly_admin_t *a);

/* Stops the server: closes the listening socket and every connection and
 * joins libmicrohttpd's thread (a request being answered finishes first;
 * none waits on a client). Frees a. NULL ok. Main thread. */
void tly_admin_stop(tly_admin_t *a);

/* How long a connection may take to deliver a whole request, from its
 * opening or its last answer, before it is shut down (10 s; tests shorten
 * it before tly_admin_start). */
extern int64_t tly_admin_deadline_ms;

/*
 * Appends the /metrics body for d at wall time now_ms (uptime) to out:
 * every family with one # HELP and one # TYPE line before its samples,
 * names prefixed tallyd_, counters ending in _total. Reads atomics and
 * stats functions only. Any thread.
 */
void tly_admin_metrics(tly_daemon_t *d, int64_t now_ms, tly_buf_t *out);

#endif
