/*
 * resp.h — the Redis protocol (RESP2 and RESP3): request parser and reply
 * writer.
 *
 * The parser reads requests from a client's input buffer: multibulk
 * ("*2\r\n$4\r\nPING\r\n$2\r\nhi\r\n") and inline ("PING hi\r\n", split on
 * white space, with "..." and '...' quoting as redis-cli's sdssplitargs
 * understands it; resp.c lists the rules). It is
 * incremental: the caller passes the unconsumed input again with more bytes
 * appended, and the parser resumes where it stopped, so a request arriving
 * byte by byte costs O(n), not O(n²). Multibulk arguments are returned as
 * offsets into the input so the caller may move its buffer between calls;
 * inline arguments, whose quotes and escapes must be undone, are copied into
 * the parser's scratch buffer. tly_resp_arg hides the difference.
 *
 * Every size that comes from the input is checked against the limits before
 * anything is allocated or waited for: a "*" count above max_args, a "$"
 * length above max_bulk or negative, an inline request longer than
 * max_inline, a malformed number or a missing CRLF is a protocol error with
 * a message for "-ERR Protocol error: <message>". The messages are Redis's
 * (networking.c): "invalid multibulk length", "expected '$', got 'x'",
 * "invalid bulk length", "too big mbulk count string", "too big bulk count
 * string", "too big inline request", "unbalanced quotes in request"; and,
 * where Redis does not check, "expected CRLF after bulk string" and "too
 * many arguments in inline request".
 *
 * The writer appends replies to a growable tly_buf_t. Functions that differ
 * between protocol versions take `proto` (2 or 3): maps are flat arrays in
 * RESP2, doubles and verbatim strings are bulk strings, nulls are "$-1",
 * booleans are integers 1/0. `proto` 3 selects RESP3; any other value RESP2.
 *
 * Pure: no I/O, no clocks, no threads. A parser or buffer is used by one
 * thread at a time. Allocation failure aborts (the daemon's policy).
 */
#ifndef TALLYD_RESP_H
#define TALLYD_RESP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/value.h"

/* A growable byte buffer (replies, and the server's input buffers). */
typedef struct {
    char *data;
    size_t len; /* bytes in use */
    size_t cap; /* bytes allocated */
} tly_buf_t;

/* A tly_buf_t starts zeroed ({0}); it grows geometrically, and allocation
 * failure aborts with a message.
 *
 * Empties and frees b's memory; b may be reused afterwards. */
void tly_buf_fini(tly_buf_t *b);
/* Ensures room for `more` bytes after len; returns data + len (the caller
 * writes there and then adds what it wrote to len). */
char *tly_buf_reserve(tly_buf_t *b, size_t more);
/* Appends p[0..n). */
void tly_buf_append(tly_buf_t *b, const void *p, size_t n);
/* Drops the first n bytes (n <= len), moving the rest to the front. */
void tly_buf_consume(tly_buf_t *b, size_t n);

/*
 * One argument of a parsed request: an offset and length, relative to the
 * start of the request in the input (multibulk), or to the parser's scratch
 * buffer (inline; see tly_resp_arg). Use tly_resp_arg or tly_resp_argv to
 * turn spans into pointers rather than adding `off` to the input yourself.
 */
typedef struct {
    size_t off;
    size_t len;
} tly_resp_span_t;

/* One argument as a pointer (what command handlers see). */
typedef struct {
    const char *ptr;
    size_t len;
} tly_arg_t;

typedef struct {
    size_t max_args;   /* "*" count limit, also the inline argument limit (>= 1) */
    size_t max_bulk;   /* "$" length limit */
    size_t max_inline; /* longest inline request line, CRLF excluded */
} tly_resp_limits_t;

/* The longest "*<count>" or "$<length>" line: its '\r' must come within the
 * line's first TLY_RESP_HEADER_MAX bytes, else the request is refused ("too
 * big mbulk count string" / "too big bulk count string"). */
#define TLY_RESP_HEADER_MAX 64

typedef enum {
    TLY_RESP_NEED = 0, /* incomplete: call again with more input */
    TLY_RESP_REQUEST,  /* a complete request: *consumed bytes, p->argc args */
    TLY_RESP_EMPTY,    /* an empty inline line or "*<n>" with n <= 0: *consumed bytes, skip */
    TLY_RESP_ERROR     /* protocol error: p->err says why; close the connection */
} tly_resp_status_t;

/* Parser state; fields are private to resp.c except argc, args, err and
 * scanned. */
typedef struct {
    tly_resp_limits_t lim;
    /* results of the last TLY_RESP_REQUEST, valid until the next call of
     * tly_resp_parse or tly_resp_parser_reset */
    size_t argc;
    tly_resp_span_t *args; /* argc spans (see tly_resp_span_t) */
    char err[128];         /* message of the last TLY_RESP_ERROR */
    /* bytes of input the parser has examined since init: stays O(total
     * input) however the input is split (tests check this) */
    uint64_t scanned;
    /* resume state */
    size_t pos;      /* bytes of the current request already parsed */
    size_t scan;     /* bytes of the current request searched for a line end */
    int64_t nargs;   /* multibulk count of the current request, -1 = not read */
    int64_t bulklen; /* length of the pending bulk, -1 = header not read */
    size_t cap;      /* spans allocated in args */
    int state;       /* where parsing resumes (resp.c) */
    bool inline_req; /* current request is inline: spans are into scratch */
    bool failed;     /* an error was returned; only reset clears it */
    char *scratch;   /* unescaped inline arguments */
    size_t scratch_cap;
    tly_arg_t *argv; /* cap pointers filled by tly_resp_argv */
} tly_resp_parser_t;

/* Initialises p with limits lim (copied). */
void tly_resp_parser_init(tly_resp_parser_t *p, const tly_resp_limits_t *lim);
/* Frees p's memory. */
void tly_resp_parser_fini(tly_resp_parser_t *p);
/* Replaces p's limits (e.g. tighter ones until a client has authenticated,
 * as Redis does). Checks already passed by a partly parsed request stand;
 * call it between requests. */
void tly_resp_parser_set_limits(tly_resp_parser_t *p, const tly_resp_limits_t *lim);
/*
 * Parses the request at the start of in[0..len): the client's unconsumed
 * input, which on a TLY_RESP_NEED return must be passed again (possibly
 * moved) with more bytes appended; the parser resumes where it stopped and
 * does not look at the bytes it has already parsed again. On
 * TLY_RESP_REQUEST, p->argc (>= 1) and p->args describe the request and
 * *consumed is its size; the caller uses the arguments (tly_resp_arg,
 * tly_resp_argv), then drops *consumed bytes and calls again for the next
 * pipelined request. On TLY_RESP_EMPTY the caller drops *consumed bytes and
 * calls again. *consumed is written on REQUEST and EMPTY only, and never
 * exceeds len.
 * After TLY_RESP_ERROR every further call returns TLY_RESP_ERROR until
 * tly_resp_parser_reset.
 * The decision for a request depends only on its bytes, never on how they
 * were split between calls.
 */
tly_resp_status_t tly_resp_parse(tly_resp_parser_t *p, const char *in, size_t len,
                                 size_t *consumed);
/*
 * Argument i (< p->argc) of the last TLY_RESP_REQUEST, whose input started
 * at `in` (the same bytes passed to tly_resp_parse, possibly moved, not yet
 * dropped): returns a pointer into `in` (multibulk) or into the parser's
 * scratch (inline, where quotes and escapes have been undone) and sets *len.
 * Valid until the input is dropped or the parser is called again.
 */
const char *tly_resp_arg(const tly_resp_parser_t *p, const char *in, size_t i, size_t *len);
/* All p->argc arguments of the last TLY_RESP_REQUEST as tly_resp_arg gives
 * them, in an array the parser owns (same lifetime as tly_resp_arg's). */
const tly_arg_t *tly_resp_argv(tly_resp_parser_t *p, const char *in);
/* Forgets any partly parsed request and a previous error. */
void tly_resp_parser_reset(tly_resp_parser_t *p);
/* Between requests (no request partly parsed): drops the last request's
 * results, as the next tly_resp_parse would, and gives back its memory
 * above the small sizes kept, so that an idle connection does not hold
 * what its last large request needed. No-op in the middle of a request. */
void tly_resp_parser_trim(tly_resp_parser_t *p);
/* True when some bytes of a request have been parsed but it is not complete
 * (the server's request deadline runs while this holds). */
bool tly_resp_parser_pending(const tly_resp_parser_t *p);

/* --- reply writer --- */
void tly_resp_simple(tly_buf_t *b, const char *text); /* +text; CR/LF replaced by spaces */
/* -text; the text's first word is the error code ("ERR", "NOFEATURE" ...).
 * CR/LF in the text are replaced by spaces. */
void tly_resp_error(tly_buf_t *b, const char *text);
void tly_resp_errorf(tly_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tly_resp_int(tly_buf_t *b, int64_t v);
void tly_resp_bulk(tly_buf_t *b, const char *s, size_t len);
void tly_resp_bulkstr(tly_buf_t *b, const char *s);        /* NUL-terminated */
void tly_resp_null(tly_buf_t *b, int proto);               /* $-1 | _ */
void tly_resp_array(tly_buf_t *b, size_t n);               /* *n */
void tly_resp_map(tly_buf_t *b, int proto, size_t npairs); /* *2n | %n */
void tly_resp_set(tly_buf_t *b, int proto, size_t n);      /* *n | ~n */
/* A double: RESP3 ",<v>", RESP2 a bulk string. Printed with the fewest
 * significant digits ("%.<n>g", n <= 17) that read back as the same double,
 * integers below 1e17 without an exponent: 1.5 → "1.5", 0.1 → "0.1",
 * 3.0 → "3", 100.0 → "100", 1e17 → "1e+17", 1e-5 → "1e-05"; infinities and
 * NaN as "inf", "-inf", "nan". */
void tly_resp_double(tly_buf_t *b, int proto, double v);
void tly_resp_bool(tly_buf_t *b, int proto, bool v); /* :1/:0 | #t/#f */
/* Text such as INFO's: RESP3 verbatim "=<len + 4>\r\ntxt:<text>\r\n", RESP2
 * a bulk string of the text. */
void tly_resp_verbatim(tly_buf_t *b, int proto, const char *s, size_t len);
/* A tly_value_t: nil → null, int → integer, double → double, string → bulk,
 * bool → bool; an unknown type → null. */
void tly_resp_value(tly_buf_t *b, int proto, const tly_value_t *v);

#endif
