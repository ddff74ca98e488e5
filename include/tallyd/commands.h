/*
 * commands.h — the command table and its handlers.
 *
 * One table of {name, arity, flags, handler, help} (see commands.c) drives
 * dispatch, the arity and authentication checks (made in one place, before
 * any handler runs), COMMAND COUNT/INFO/DOCS and the help text. Handlers
 * read the store under RCU, so they never wait for ingest.
 *
 * A session is one client connection's protocol state. The server owns it
 * and fills the fields marked (server); commands change the rest.
 * CLIENT LIST and CLIENT KILL read other loops' sessions (under the
 * server's client directory lock): their owners store last_ms, qbuf, obuf,
 * proto, last_cmd and kill with relaxed atomic stores, and change name only
 * under that lock (tly_server_set_client_name).
 *
 * Threads: tly_command_exec runs on the server's loop threads, each of
 * which is registered with RCU; one session is used by one thread.
 */
#ifndef TALLYD_COMMANDS_H
#define TALLYD_COMMANDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/daemon.h"
#include "tallyd/resp.h"

#define TLY_CLIENT_NAME_MAX 128
/* "ip:port", or a unix socket's path (sun_path: at most 107 bytes) and ":0" */
#define TLY_CLIENT_ADDR_MAX 112

typedef struct {
    uint64_t id;           /* (server) CLIENT ID */
    int fd;                /* (server) socket, -1 unknown */
    int loop;              /* (server) the event loop serving it (CLIENT LIST io-thread) */
    char addr[TLY_CLIENT_ADDR_MAX];  /* (server) peer "ip:port" or "/path:0" */
    char laddr[TLY_CLIENT_ADDR_MAX]; /* (server) local address */
    int64_t created_ms;    /* (server) connect time */
    int64_t last_ms;       /* (server) last request time */
    size_t qbuf, obuf;     /* (server) bytes pending in / out, for CLIENT INFO */
    int proto;             /* 2 or 3 (HELLO) */
    bool authed;           /* true when no password is set, or after AUTH */
    bool close_after;      /* QUIT: close once the reply is written */
    bool stale_ok;         /* CLIENT STALE ON: data commands run while loading */
    char name[TLY_CLIENT_NAME_MAX + 1]; /* CLIENT SETNAME, "" = none */
    const char *last_cmd;  /* lower-case name of the last command (static), or NULL */
    bool kill;             /* (server) CLIENT KILL: its loop closes it */
} tly_session_t;

/* Per-thread scratch for handlers (value arrays, string buffers), reused
 * between commands to keep the hot path free of malloc. */
typedef struct tly_cmd_scratch tly_cmd_scratch_t;
tly_cmd_scratch_t *tly_cmd_scratch_new(void);
void tly_cmd_scratch_free(tly_cmd_scratch_t *scratch);

/* Initialises a session for daemon d: RESP2, authenticated unless
 * server.requirepass is set. The server sets the (server) fields. */
void tly_session_init(tly_session_t *s, const tly_daemon_t *d);

/*
 * Executes argv[0..argc) (argc >= 1) for session s, appending exactly one
 * reply to out. now_ms is the wall clock (queries without ASOF evaluate
 * windows at it). Unknown commands, wrong arity and missing AUTH give the
 * Redis errors ("-ERR unknown command ...", "-ERR wrong number of
 * arguments for '...' command", "-NOAUTH Authentication required.").
 * Loop threads (RCU-registered).
 */
void tly_command_exec(tly_daemon_t *d, tly_session_t *s, tly_cmd_scratch_t *scratch,
                      const tly_arg_t *argv, size_t argc, tly_buf_t *out, int64_t now_ms);

/*
 * Hints the store about the entity a request will read (FEATURES and
 * RECENT: its id; MFEATURES: its first id): the first step of
 * tly_store_prefetch_id into *pf (pf->n = 0 when there is nothing to hint:
 * another command, an unknown entity type, a session not authenticated).
 * The server takes a loop's ready requests in three passes (this hint,
 * tly_store_prefetch_records, then tly_command_exec), so their cache misses
 * overlap. Changes nothing; inside the caller's RCU read-side section.
 */
void tly_command_hint(tly_daemon_t *d, const tly_session_t *s, const tly_arg_t *argv, size_t argc,
                      tly_prefetch_t *pf);

/* True when the command named argv0 may run before AUTH (AUTH, HELLO, PING,
 * QUIT): the server applies the tight unauthenticated limits otherwise. */
bool tly_command_allowed_unauth(const char *name, size_t len);

#endif
