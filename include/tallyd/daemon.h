/*
 * daemon.h — the one daemon context: the parts a running tallyd is made of,
 * passed explicitly to whoever needs them (no global state).
 *
 * main builds it at start-up and tears it down at exit; the server's loops
 * and the command handlers read it. Pointers are set before any thread
 * starts and never change afterwards; counters are atomics written by their
 * owning part (named per field) and read relaxed by INFO.
 */
#ifndef TALLYD_DAEMON_H
#define TALLYD_DAEMON_H

#include <stdatomic.h>
#include <stdint.h>

#include "tallyd/config.h"
#include "tallyd/feature.h"
#include "tallyd/source.h"
#include "tallyd/store.h"

/* Server counters; written by the server's loops, read by INFO. */
typedef struct {
    atomic_uint_fast64_t connected;          /* open client connections */
    atomic_uint_fast64_t connections_total;  /* accepted since start */
    atomic_uint_fast64_t rejected_maxclients; /* refused: server.max_clients */
    atomic_uint_fast64_t commands;           /* commands executed */
    atomic_uint_fast64_t protocol_errors;    /* connections closed for bad RESP */
    atomic_uint_fast64_t output_overflows;   /* closed at server.max_output_buffer */
    atomic_uint_fast64_t output_stalls;      /* paused clients read on (server.c STALL_MS) */
    atomic_uint_fast64_t evicted_clients;    /* closed at server.max_clients_memory */
    atomic_uint_fast64_t clients_memory;     /* bytes all clients' buffers hold */
    atomic_uint_fast64_t timeouts;           /* closed: idle or request timeout */
    atomic_uint_fast64_t auth_failures;      /* wrong AUTH passwords */
    atomic_uint_fast64_t read_yields;        /* full reads that ended a client's turn */
    atomic_uint_fast64_t hinted_requests;    /* read with others', their entity hinted first */
    atomic_uint_fast64_t bytes_in, bytes_out;
    atomic_uint_fast64_t next_client_id;     /* CLIENT ID source (starts at 1) */
} tly_server_stats_t;

typedef struct {
    const tly_config_t *cfg;
    const tly_featset_t *fs;
    tly_store_t *store;
    tly_source_t *source; /* NULL when no source runs (unit tests) */
    struct tly_snapshotter *snapshot; /* NULL when snapshots are off */
    struct tly_server *srv; /* set by tly_server_new; NULL when no server runs (unit tests) */
    int64_t started_ms;   /* wall clock at start-up */
    int tcp_port;         /* bound RESP port (after listen), for INFO */
    tly_server_stats_t server;
} tly_daemon_t;

#endif
