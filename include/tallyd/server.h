/*
 * server.h — the RESP server on libuv.
 *
 * server.threads loops, each on its own thread with its own listening
 * socket bound with SO_REUSEPORT to server.listen (the kernel spreads
 * connections over them), plus the optional unix socket on loop 0. Each
 * client connection: read → tly_resp_parse → tly_command_exec → replies
 * queued in order → written. Limits (config server.*): max clients, max
 * arguments, max bulk, max query buffer, output soft limit (reading pauses)
 * and hard limit (disconnect), idle timeout, request deadline.
 *
 * Threads: tly_server_new/run/stop/free on the main thread; tly_server_stop
 * may also be called from a signal-handling context through
 * tly_server_stop_async (it only does uv_async_send).
 */
#ifndef TALLYD_SERVER_H
#define TALLYD_SERVER_H

#include "tallyd/daemon.h"
#include "tallyd/error.h"

typedef struct tly_server tly_server_t;

/* Creates the server: binds the listeners now (so a bad address fails at
 * start-up with a sentence in errbuf) and sets d->tcp_port. Loops do not run
 * until tly_server_start. Returns NULL on failure. Main thread. */
tly_server_t *tly_server_new(tly_daemon_t *d, char *errbuf, size_t errlen);
/* Starts the loop threads. Main thread. */
tly_err_t tly_server_start(tly_server_t *srv, char *errbuf, size_t errlen);
/* Asks every loop to stop accepting, close its clients and exit. Safe to call
 * from any thread (uv_async_send). */
void tly_server_stop_async(tly_server_t *srv);
/* Waits for the loop threads to exit, closes every handle
 * (uv_loop_close() == 0 is asserted) and frees. NULL ok. Main thread. */
void tly_server_free(tly_server_t *srv);

#endif
