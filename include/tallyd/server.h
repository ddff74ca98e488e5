/*
 * server.h — the RESP server on libuv.
 *
 * server.threads loops, each on its own thread with its own listening
 * socket bound with SO_REUSEPORT to server.listen (the kernel spreads
 * connections over them), plus the optional unix socket (server.unix) on
 * loop 0. Each client connection: read → tly_resp_parse → tly_command_exec
 * → replies queued in order → written. Limits (config server.*): max
 * clients, max arguments, max bulk, max query buffer, output soft limit
 * (reading pauses) and hard limit (disconnect), idle timeout, request
 * deadline; tighter limits before AUTH. server.c's opening comment spells
 * out the rules.
 *
 * Threads: tly_server_new/start/free on the main thread;
 * tly_server_stop_async from any thread, or from a signal handler (it only
 * does an atomic exchange and uv_async_send). While a loop runs, its libuv
 * handles are touched only by its thread; source threads never touch the
 * server.
 *
 * The process must ignore SIGPIPE (main does): libuv writes to sockets with
 * write(2), and a client that hangs up would otherwise kill the daemon.
 */
#ifndef TALLYD_SERVER_H
#define TALLYD_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include "tallyd/commands.h"
#include "tallyd/daemon.h"
#include "tallyd/error.h"

typedef struct tly_server tly_server_t;

/* Splits "host:port", "[v6]:port" or ":port" into host (may be "", no
 * brackets) and port (decimal, at most 65535). Returns false when
 * malformed. Pure; any thread. */
bool tly_split_addr(const char *addr, char *host, size_t hostcap, char *port, size_t portcap);

/* Creates the server: binds and listens now (so a bad or busy address fails
 * at start-up with a sentence in errbuf, e.g. "server.listen
 * 127.0.0.1:7379: Address already in use") and sets d->tcp_port (the port
 * the kernel chose when server.listen has port 0). Connections wait in the
 * backlog until tly_server_start runs the loops. d is borrowed and must
 * outlive the server. Returns NULL on failure. Main thread. */
tly_server_t *tly_server_new(tly_daemon_t *d, char *errbuf, size_t errlen);
/* Starts the loop threads. On failure errbuf says why; the caller still
 * calls tly_server_free. Main thread. */
tly_err_t tly_server_start(tly_server_t *srv, char *errbuf, size_t errlen);
/* Asks every loop to stop accepting, close its clients and exit. Safe to call
 * from any thread (uv_async_send). */
void tly_server_stop_async(tly_server_t *srv);
/* Stops the loops if tly_server_stop_async was not called, waits for the
 * loop threads to exit (every client is closed, every handle closed and
 * freed; uv_loop_close() == 0 is asserted), removes the unix socket file and
 * frees. Works whether or not tly_server_start ran or succeeded. NULL ok.
 * Main thread. */
void tly_server_free(tly_server_t *srv);

/* The client directory: every open client of every loop, for CLIENT LIST
 * and CLIENT KILL. Calls fn(ctx, s) for each client's session, under the
 * directory's lock, in order of connection (oldest first); fn reads
 * another loop's session only as commands.h allows, must not block, and
 * may call tly_server_kill_client. Loop threads. */
void tly_server_each_client(tly_server_t *srv, void (*fn)(void *ctx, tly_session_t *s), void *ctx);
/* From within tly_server_each_client: has s's loop close it (at once, with
 * what is queued for it unsent). */
void tly_server_kill_client(tly_server_t *srv, tly_session_t *s);
/* Sets s's name (len bytes, checked by the caller) under the directory's
 * lock. s's own loop thread. */
void tly_server_set_client_name(tly_server_t *srv, tly_session_t *s, const char *name, size_t len);

#endif
