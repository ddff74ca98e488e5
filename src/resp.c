/*
 * resp.c — the Redis protocol: incremental request parser and reply writer
 * (see resp.h).
 *
 * The parser is a small state machine over one request at a time:
 *
 *   START ──'*'──▶ COUNT ──n>0──▶ BULKHDR ──▶ BULKBODY ──(n args)──▶ done
 *     │                 └─n<=0─▶ EMPTY          ▲            │
 *     └──other──▶ INLINE ──'\n'──▶ done         └────────────┘
 *
 * Resume state lives in the parser (pos, scan, nargs, bulklen, argc), so a
 * call after TLY_RESP_NEED continues where the previous one stopped:
 * `pos` is the end of the last fully parsed unit (header line or bulk),
 * `scan` the end of the bytes already searched for the current line's end.
 * Every byte of a header or inline line is searched once and a bulk's body
 * is never looked at (only the CRLF after it), so parsing costs O(bytes)
 * however the input is split. `scanned` counts the bytes examined so the
 * tests can check that.
 *
 * Invariants:
 *  - every decision (request, empty, or which error) depends only on the
 *    request's bytes, never on where the input was split: each check looks
 *    at a fixed prefix of the current line (a header's '\r' must come within
 *    TLY_RESP_HEADER_MAX bytes, an inline line's '\n' within max_inline + 2)
 *    and is taken as soon as that prefix is available;
 *  - pos <= scan <= the length of the input seen so far;
 *  - nothing is allocated from an unchecked size: the span array grows as
 *    bulk headers arrive, up to the "*" count, which is <= max_args; the
 *    inline scratch is at most max_inline bytes;
 *  - after an error the parser answers TLY_RESP_ERROR until reset.
 *
 * Inline requests follow redis-cli's sdssplitargs: leading white space
 * (isspace) is skipped; an unquoted argument ends at a space, tab, CR or LF;
 * "..." understands \n \r \t \b \a \xHH and \<any> (that character);
 * '...' understands \'; a closing quote must be followed by white space or
 * the end of the line, and an unterminated quote is "unbalanced quotes in
 * request". Unlike Redis, a NUL byte is ordinary data rather than the end of
 * the line, and more than max_args arguments is an error.
 *
 * The writer appends RESP2/RESP3 replies to a tly_buf_t.
 *
 * Threads: none of its own; a parser or buffer is used by one thread at a
 * time. Allocation failure aborts.
 */
#include "tallyd/resp.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ST_START = 0, ST_INLINE, ST_COUNT, ST_BULKHDR, ST_BULKBODY };

/* Between requests, memory above these sizes is given back, so one huge
 * request does not pin its buffers for the connection's lifetime. */
#define KEEP_SPANS   1024
#define KEEP_SCRATCH 16384

/* ---- memory ------------------------------------------------------------- */

static void *resp_realloc(void *ptr, size_t n)
{
    void *q = realloc(ptr, n ? n : 1);
    if (q == NULL) {
        fprintf(stderr, "tallyd: out of memory allocating %zu bytes\n", n);
        abort();
    }
    return q;
}

void tly_buf_fini(tly_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

char *tly_buf_reserve(tly_buf_t *b, size_t more)
{
    if (b->cap - b->len >= more)
        return b->data + b->len;
    if (more > SIZE_MAX - b->len) {
        fprintf(stderr, "tallyd: buffer size overflow (%zu + %zu bytes)\n", b->len, more);
        abort();
    }
    size_t need = b->len + more;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    b->data = resp_realloc(b->data, cap);
    b->cap = cap;
    return b->data + b->len;
}

void tly_buf_append(tly_buf_t *b, const void *p, size_t n)
{
    if (n == 0)
        return;
    memcpy(tly_buf_reserve(b, n), p, n);
    b->len += n;
}

void tly_buf_consume(tly_buf_t *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

/* ---- parser ------------------------------------------------------------- */

void tly_resp_parser_set_limits(tly_resp_parser_t *p, const tly_resp_limits_t *lim)
{
    p->lim = *lim;
    if (p->lim.max_args == 0) /* a request has at least one argument */
        p->lim.max_args = 1;
}

void tly_resp_parser_init(tly_resp_parser_t *p, const tly_resp_limits_t *lim)
{
    memset(p, 0, sizeof *p);
    tly_resp_parser_set_limits(p, lim);
    tly_resp_parser_reset(p);
}

void tly_resp_parser_fini(tly_resp_parser_t *p)
{
    free(p->args);
    free(p->argv);
    free(p->scratch);
    p->args = NULL;
    p->argv = NULL;
    p->scratch = NULL;
    p->cap = 0;
    p->scratch_cap = 0;
    p->argc = 0;
}

/* Forgets the current request's progress (not its results). */
static void request_reset(tly_resp_parser_t *p)
{
    p->pos = 0;
    p->scan = 0;
    p->nargs = -1;
    p->bulklen = -1;
    p->state = ST_START;
}

void tly_resp_parser_reset(tly_resp_parser_t *p)
{
    request_reset(p);
    p->argc = 0;
    p->inline_req = false;
    p->failed = false;
    p->err[0] = '\0';
}

bool tly_resp_parser_pending(const tly_resp_parser_t *p)
{
    return !p->failed && p->state != ST_START;
}

static tly_resp_status_t fail(tly_resp_parser_t *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static tly_resp_status_t fail(tly_resp_parser_t *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof p->err, fmt, ap);
    va_end(ap);
    p->failed = true;
    p->argc = 0;
    request_reset(p);
    return TLY_RESP_ERROR;
}

/* Makes room for one more span; `limit` caps the array (the "*" count or
 * max_args), and the caller has checked argc < limit. */
static void spans_grow(tly_resp_parser_t *p, size_t limit)
{
    if (p->argc < p->cap)
        return;
    size_t cap = p->cap ? p->cap * 2 : 8;
    if (cap > limit)
        cap = limit;
    p->args = resp_realloc(p->args, cap * sizeof *p->args);
    p->argv = resp_realloc(p->argv, cap * sizeof *p->argv);
    p->cap = cap;
}

/* Parses a decimal int64 as Redis's string2ll does: optional '-', no '+',
 * no leading zeros, no "-0", no spaces, no overflow. */
static bool parse_ll(const char *s, size_t n, int64_t *out)
{
    if (n == 0 || n > 20)
        return false;
    if (n == 1 && s[0] == '0') {
        *out = 0;
        return true;
    }
    bool neg = false;
    size_t i = 0;
    if (s[0] == '-') {
        neg = true;
        i = 1;
        if (n == 1)
            return false;
    }
    if (s[i] < '1' || s[i] > '9')
        return false;
    uint64_t v = 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > (uint64_t)INT64_MAX + 1)
            return false;
        *out = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v;
    } else {
        if (v > (uint64_t)INT64_MAX)
            return false;
        *out = (int64_t)v;
    }
    return true;
}

/*
 * Reads the header line that starts at p->pos (its type byte already
 * checked; p->scan > p->pos). Returns 1 with *val set when the whole line
 * "<type><number>\r\n" is there (p->pos is then past it), 0 when more input
 * is needed, -1 when the line has no '\r' within TLY_RESP_HEADER_MAX bytes,
 * -2 when the number is malformed or '\r' is not followed by '\n'.
 */
static int read_header(tly_resp_parser_t *p, const char *in, size_t len, int64_t *val)
{
    size_t limit = p->pos + TLY_RESP_HEADER_MAX;
    size_t end = len < limit ? len : limit;
    if (p->scan < end) {
        const char *cr = memchr(in + p->scan, '\r', end - p->scan);
        if (cr == NULL) {
            p->scanned += end - p->scan;
            p->scan = end;
        } else {
            size_t at = (size_t)(cr - in);
            p->scanned += at - p->scan;
            p->scan = at; /* stays on the '\r' until its '\n' arrives */
        }
    }
    if (p->scan == limit)
        return -1;
    if (p->scan >= len || in[p->scan] != '\r' || p->scan + 1 >= len)
        return 0;
    p->scanned += 2;
    if (in[p->scan + 1] != '\n')
        return -2;
    if (!parse_ll(in + p->pos + 1, p->scan - p->pos - 1, val))
        return -2;
    p->pos = p->scan + 2;
    p->scan = p->pos;
    return 1;
}

static tly_resp_status_t parse_multibulk(tly_resp_parser_t *p, const char *in, size_t len,
                                         size_t *consumed)
{
    for (;;) {
        int64_t v = 0;
        int rc;
        switch (p->state) {
        case ST_COUNT:
            rc = read_header(p, in, len, &v);
            if (rc == 0)
                return TLY_RESP_NEED;
            if (rc == -1)
                return fail(p, "too big mbulk count string");
            if (rc == -2 || (v > 0 && (uint64_t)v > p->lim.max_args))
                return fail(p, "invalid multibulk length");
            if (v <= 0) { /* "*0", "*-1", "*-10": nothing to run (Redis) */
                *consumed = p->pos;
                request_reset(p);
                return TLY_RESP_EMPTY;
            }
            p->nargs = v;
            p->state = ST_BULKHDR;
            break;
        case ST_BULKHDR:
            if (p->scan == p->pos) { /* the type byte is not checked yet */
                if (p->pos >= len)
                    return TLY_RESP_NEED;
                p->scanned++;
                unsigned char c = (unsigned char)in[p->pos];
                if (c != '$') {
                    if (c >= 0x20 && c < 0x7f) /* printable ASCII, whatever the locale */
                        return fail(p, "expected '$', got '%c'", c);
                    return fail(p, "expected '$', got '\\x%02x'", c);
                }
                p->scan = p->pos + 1;
            }
            rc = read_header(p, in, len, &v);
            if (rc == 0)
                return TLY_RESP_NEED;
            if (rc == -1)
                return fail(p, "too big bulk count string");
            if (rc == -2 || v < 0 || (uint64_t)v > p->lim.max_bulk)
                return fail(p, "invalid bulk length");
            spans_grow(p, (size_t)p->nargs);
            p->bulklen = v;
            p->state = ST_BULKBODY;
            break;
        case ST_BULKBODY: {
            /* The body itself is never examined, only the CRLF after it;
             * each of those two bytes is checked as soon as it is there. */
            uint64_t bl = (uint64_t)p->bulklen;
            uint64_t avail = len - p->pos;
            if (avail > bl && in[p->pos + bl] != '\r')
                return fail(p, "expected CRLF after bulk string");
            if (avail > bl + 1 && in[p->pos + bl + 1] != '\n')
                return fail(p, "expected CRLF after bulk string");
            if (avail < bl + 2)
                return TLY_RESP_NEED;
            p->scanned += 2;
            p->args[p->argc].off = p->pos;
            p->args[p->argc].len = (size_t)bl;
            p->argc++;
            p->pos += (size_t)bl + 2;
            p->scan = p->pos;
            p->bulklen = -1;
            if (p->argc == (uint64_t)p->nargs) {
                *consumed = p->pos;
                request_reset(p);
                return TLY_RESP_REQUEST;
            }
            p->state = ST_BULKHDR;
            break;
        }
        default:
            return fail(p, "internal error: bad parser state");
        }
    }
}

/* isspace in the C locale, as sdssplitargs skips between arguments. */
static bool is_blank(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/*
 * Splits line[0..n) into arguments unescaped into p->scratch (which holds n
 * bytes: an argument never grows when unescaped). Returns NULL on success or
 * the error message.
 */
static const char *split_inline(tly_resp_parser_t *p, const unsigned char *line, size_t n)
{
    char *out = p->scratch;
    size_t o = 0, i = 0;
    p->argc = 0;
    for (;;) {
        while (i < n && is_blank(line[i]))
            i++;
        if (i == n)
            return NULL;
        if (p->argc == p->lim.max_args)
            return "too many arguments in inline request";
        size_t start = o;
        bool inq = false, insq = false, done = false;
        while (!done) {
            if (inq) {
                if (i == n)
                    return "unbalanced quotes in request";
                unsigned char c = line[i];
                if (c == '\\' && i + 3 < n && line[i + 1] == 'x' && hex_value(line[i + 2]) >= 0 &&
                    hex_value(line[i + 3]) >= 0) {
                    out[o++] = (char)(hex_value(line[i + 2]) * 16 + hex_value(line[i + 3]));
                    i += 4;
                } else if (c == '\\' && i + 1 < n) {
                    switch (line[i + 1]) {
                    case 'n':
                        c = '\n';
                        break;
                    case 'r':
                        c = '\r';
                        break;
                    case 't':
                        c = '\t';
                        break;
                    case 'b':
                        c = '\b';
                        break;
                    case 'a':
                        c = '\a';
                        break;
                    default:
                        c = line[i + 1];
                        break;
                    }
                    out[o++] = (char)c;
                    i += 2;
                } else if (c == '"') {
                    if (i + 1 < n && !is_blank(line[i + 1]))
                        return "unbalanced quotes in request";
                    done = true;
                    i++;
                } else {
                    out[o++] = (char)c;
                    i++;
                }
            } else if (insq) {
                if (i == n)
                    return "unbalanced quotes in request";
                unsigned char c = line[i];
                if (c == '\\' && i + 1 < n && line[i + 1] == '\'') {
                    out[o++] = '\'';
                    i += 2;
                } else if (c == '\'') {
                    if (i + 1 < n && !is_blank(line[i + 1]))
                        return "unbalanced quotes in request";
                    done = true;
                    i++;
                } else {
                    out[o++] = (char)c;
                    i++;
                }
            } else if (i == n) {
                done = true;
            } else {
                unsigned char c = line[i++];
                switch (c) {
                case ' ':
                case '\t':
                case '\r':
                case '\n':
                    done = true;
                    break;
                case '"':
                    inq = true;
                    break;
                case '\'':
                    insq = true;
                    break;
                default:
                    out[o++] = (char)c;
                    break;
                }
            }
        }
        spans_grow(p, p->lim.max_args);
        p->args[p->argc].off = start;
        p->args[p->argc].len = o - start;
        p->argc++;
    }
}

static tly_resp_status_t parse_inline(tly_resp_parser_t *p, const char *in, size_t len,
                                      size_t *consumed)
{
    /* The line may hold max_inline bytes, then "\r\n": a '\n' further on
     * means the line is too long, whatever follows. */
    size_t limit = p->lim.max_inline > SIZE_MAX - 2 ? SIZE_MAX : p->lim.max_inline + 2;
    size_t end = len < limit ? len : limit;
    const char *nl = NULL;
    if (p->scan < end) {
        nl = memchr(in + p->scan, '\n', end - p->scan);
        size_t stop = nl ? (size_t)(nl - in) + 1 : end;
        p->scanned += stop - p->scan;
        p->scan = nl ? (size_t)(nl - in) : end;
    }
    if (nl == NULL) {
        if (p->scan == limit)
            return fail(p, "too big inline request");
        return TLY_RESP_NEED;
    }
    size_t eol = p->scan;
    size_t n = eol > 0 && in[eol - 1] == '\r' ? eol - 1 : eol;
    if (n > p->lim.max_inline)
        return fail(p, "too big inline request");
    if (p->scratch_cap < n) {
        p->scratch = resp_realloc(p->scratch, n);
        p->scratch_cap = n;
    }
    const char *msg = split_inline(p, (const unsigned char *)in, n);
    if (msg != NULL)
        return fail(p, "%s", msg);
    *consumed = eol + 1;
    request_reset(p);
    return p->argc ? TLY_RESP_REQUEST : TLY_RESP_EMPTY;
}

/* Drops the previous request's results, and its memory above the KEEP_
 * sizes. Between requests only. */
static void drop_results(tly_resp_parser_t *p)
{
    p->argc = 0;
    p->inline_req = false;
    if (p->cap > KEEP_SPANS) {
        free(p->args);
        free(p->argv);
        p->args = NULL;
        p->argv = NULL;
        p->cap = 0;
    }
    if (p->scratch_cap > KEEP_SCRATCH) {
        free(p->scratch);
        p->scratch = NULL;
        p->scratch_cap = 0;
    }
}

void tly_resp_parser_trim(tly_resp_parser_t *p)
{
    if (p->state == ST_START && !p->failed)
        drop_results(p);
}

tly_resp_status_t tly_resp_parse(tly_resp_parser_t *p, const char *in, size_t len, size_t *consumed)
{
    if (p->failed)
        return TLY_RESP_ERROR;
    if (p->state == ST_START) {
        /* The previous request's results are dropped now, not before: the
         * caller may use them until this call. */
        drop_results(p);
        if (len == 0)
            return TLY_RESP_NEED;
        p->scanned++;
        if (in[0] == '*') {
            p->state = ST_COUNT;
            p->scan = 1;
        } else {
            p->state = ST_INLINE;
            p->inline_req = true;
        }
    } else if (len < p->scan || len < p->pos) {
        return fail(p, "internal error: input shorter than the part already parsed");
    }
    if (p->state == ST_INLINE)
        return parse_inline(p, in, len, consumed);
    return parse_multibulk(p, in, len, consumed);
}

const char *tly_resp_arg(const tly_resp_parser_t *p, const char *in, size_t i, size_t *len)
{
    if (i >= p->argc) {
        *len = 0;
        return NULL;
    }
    *len = p->args[i].len;
    return (p->inline_req ? p->scratch : in) + p->args[i].off;
}

const tly_arg_t *tly_resp_argv(tly_resp_parser_t *p, const char *in)
{
    for (size_t i = 0; i < p->argc; i++)
        p->argv[i].ptr = tly_resp_arg(p, in, i, &p->argv[i].len);
    return p->argv;
}

/* ---- writer ------------------------------------------------------------- */

/* Writes v in decimal at w (room for 20 digits and a sign); returns its
 * length. Replies are mostly small integers, and snprintf's generality was
 * a third of a FEATURES query's CPU. */
static size_t put_u64(char *w, uint64_t v)
{
    char tmp[20];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    for (size_t i = 0; i < n; i++)
        w[i] = tmp[n - 1 - i];
    return n;
}

/* Room for `more` bytes at the end of b; the call only when it must grow. */
static inline char *reserve(tly_buf_t *b, size_t more)
{
    if (b->cap - b->len >= more)
        return b->data + b->len;
    return tly_buf_reserve(b, more);
}

enum { HEADER_MAX = 24 }; /* type, sign, 20 digits, CR LF */

static const char digit_pairs[] = "00010203040506070809101112131415161718192021222324"
                                  "25262728293031323334353637383940414243444546474849"
                                  "50515253545556575859606162636465666768697071727374"
                                  "75767778798081828384858687888990919293949596979899";

/* Writes "<type><n>\r\n" at w; returns its length. */
static inline size_t header_at(char *w, char type, int64_t n)
{
    size_t k = 0;
    w[k++] = type;
    if (n >= 0 && n < 10) { /* most counts, small arrays, names */
        w[k++] = (char)('0' + n);
    } else if (n >= 10 && n < 100) {
        memcpy(w + k, digit_pairs + 2 * n, 2);
        k += 2;
    } else if (n < 0) {
        w[k++] = '-';
        k += put_u64(w + k, (uint64_t)0 - (uint64_t)n);
    } else {
        k += put_u64(w + k, (uint64_t)n);
    }
    w[k++] = '\r';
    w[k++] = '\n';
    return k;
}

/* Appends "<type><n>\r\n". */
static void put_header(tly_buf_t *b, char type, int64_t n)
{
    b->len += header_at(reserve(b, HEADER_MAX), type, n);
}

/* Appends "<type>text\r\n" with CR and LF in text replaced by spaces, so a
 * message can never end the line early or inject a reply. */
static void put_line(tly_buf_t *b, char type, const char *text)
{
    size_t n = strlen(text);
    char *w = tly_buf_reserve(b, n + 3);
    w[0] = type;
    for (size_t i = 0; i < n; i++)
        w[1 + i] = text[i] == '\r' || text[i] == '\n' ? ' ' : text[i];
    w[n + 1] = '\r';
    w[n + 2] = '\n';
    b->len += n + 3;
}

void tly_resp_simple(tly_buf_t *b, const char *text)
{
    put_line(b, '+', text);
}

void tly_resp_error(tly_buf_t *b, const char *text)
{
    put_line(b, '-', text);
}

void tly_resp_errorf(tly_buf_t *b, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        tly_resp_error(b, "ERR internal error formatting a reply");
        return;
    }
    if ((size_t)n < sizeof small) {
        tly_resp_error(b, small);
        return;
    }
    char *big = resp_realloc(NULL, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    tly_resp_error(b, big);
    free(big);
}

void tly_resp_int(tly_buf_t *b, int64_t v)
{
    put_header(b, ':', v);
}

void tly_resp_bulk(tly_buf_t *b, const char *s, size_t len)
{
    if (len > SIZE_MAX - HEADER_MAX - 2) {
        fprintf(stderr, "tallyd: buffer size overflow (bulk of %zu bytes)\n", len);
        abort();
    }
    char *w = reserve(b, HEADER_MAX + len + 2);
    size_t k = header_at(w, '$', (int64_t)len);
    memcpy(w + k, s, len);
    w[k + len] = '\r';
    w[k + len + 1] = '\n';
    b->len += k + len + 2;
}

void tly_resp_bulkstr(tly_buf_t *b, const char *s)
{
    tly_resp_bulk(b, s, strlen(s));
}

void tly_resp_null(tly_buf_t *b, int proto)
{
    if (proto == 3)
        tly_buf_append(b, "_\r\n", 3);
    else
        tly_buf_append(b, "$-1\r\n", 5);
}

/* Counts are sizes; the casts below are exact for any count that fits in
 * memory. */
void tly_resp_array(tly_buf_t *b, size_t n)
{
    put_header(b, '*', (int64_t)n);
}

void tly_resp_map(tly_buf_t *b, int proto, size_t npairs)
{
    if (proto == 3)
        put_header(b, '%', (int64_t)npairs);
    else
        put_header(b, '*', (int64_t)npairs * 2);
}

void tly_resp_set(tly_buf_t *b, int proto, size_t n)
{
    put_header(b, proto == 3 ? '~' : '*', (int64_t)n);
}

/* Writes v with the fewest significant digits that strtod reads back as v;
 * returns the length. out holds at least 32 bytes.
 * %g switches to an exponent once the exponent reaches the precision, so the
 * shortest form of 100 is "1e+02"; a number shown so with |v| in [1, 1e17)
 * is an integer (a non-integer below 2^52 needs a fractional digit to read
 * back, and every double from 2^52 up is an integer), which "%.0f" prints
 * exactly and more plainly: "100". */
static size_t format_double(char *out, size_t cap, double v)
{
    if (isnan(v))
        return (size_t)snprintf(out, cap, "nan");
    if (isinf(v))
        return (size_t)snprintf(out, cap, "%s", v > 0 ? "inf" : "-inf");
    int n = 0;
    for (int prec = 1; prec <= 17; prec++) {
        n = snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            break;
    }
    if (memchr(out, 'e', (size_t)n) != NULL && fabs(v) >= 1 && fabs(v) < 1e17)
        n = snprintf(out, cap, "%.0f", v);
    return (size_t)n;
}

void tly_resp_double(tly_buf_t *b, int proto, double v)
{
    char num[40];
    size_t n = format_double(num, sizeof num, v);
    if (proto == 3) {
        char *w = tly_buf_reserve(b, n + 3);
        w[0] = ',';
        memcpy(w + 1, num, n);
        memcpy(w + 1 + n, "\r\n", 2);
        b->len += n + 3;
    } else {
        tly_resp_bulk(b, num, n);
    }
}

void tly_resp_bool(tly_buf_t *b, int proto, bool v)
{
    if (proto == 3)
        tly_buf_append(b, v ? "#t\r\n" : "#f\r\n", 4);
    else
        tly_buf_append(b, v ? ":1\r\n" : ":0\r\n", 4);
}

void tly_resp_verbatim(tly_buf_t *b, int proto, const char *s, size_t len)
{
    if (proto != 3) {
        tly_resp_bulk(b, s, len);
        return;
    }
    char *w = tly_buf_reserve(b, 24);
    int k = snprintf(w, 24, "=%zu\r\n", len + 4);
    b->len += (size_t)k;
    tly_buf_append(b, "txt:", 4);
    tly_buf_append(b, s, len);
    tly_buf_append(b, "\r\n", 2);
}

void tly_resp_value(tly_buf_t *b, int proto, const tly_value_t *v)
{
    switch (v->type) {
    case TLY_V_INT:
        tly_resp_int(b, v->u.i);
        break;
    case TLY_V_DOUBLE:
        tly_resp_double(b, proto, v->u.d);
        break;
    case TLY_V_STR:
        tly_resp_bulk(b, v->u.s, v->len);
        break;
    case TLY_V_BOOL:
        tly_resp_bool(b, proto, v->u.i != 0);
        break;
    case TLY_V_NIL:
    default:
        tly_resp_null(b, proto);
        break;
    }
}
