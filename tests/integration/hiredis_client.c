/*
 * hiredis_client.c — a hiredis (C) client for the integration tests.
 *
 * Usage: hiredis_client HOST PORT [BATCH]
 * Reads commands from stdin, one per line, arguments separated by single
 * spaces (no quoting: the tests' arguments hold no spaces), sends them
 * pipelined BATCH at a time (default 1000; 1 = one round trip each) and
 * prints one line per reply, in order, in this canonical text form:
 *   integer  :<n>
 *   bulk     "<text>"    with \\ \" \n \r \t escaped and other bytes outside
 *                        0x20..0x7e as \xHH
 *   status   +"<text>"   (same escaping)
 *   error    -"<text>"
 *   nil      nil         (nil bulk and nil array)
 *   array    [e1,e2,...] elements in the same form, recursively; [] empty
 * The Python side parses these lines back into values (e2e.py).
 *
 * hiredis 0.14 (Debian 12) predates RESP3, so this client speaks RESP2 only.
 *
 * Exit: 0 after the last reply; 2 on a usage or connection error; 3 when
 * the connection fails mid-run (the error is printed on stderr).
 * Threads: one.
 */
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LINE  (4 << 20)
#define MAX_ARGS  65536
#define DEF_BATCH 1000

static void put_text(FILE *out, const char *s, size_t len)
{
    fputc('"', out);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '\\':
            fputs("\\\\", out);
            break;
        case '"':
            fputs("\\\"", out);
            break;
        case '\n':
            fputs("\\n", out);
            break;
        case '\r':
            fputs("\\r", out);
            break;
        case '\t':
            fputs("\\t", out);
            break;
        default:
            if (c < 0x20 || c > 0x7e)
                fprintf(out, "\\x%02x", c);
            else
                fputc(c, out);
        }
    }
    fputc('"', out);
}

static void put_reply(FILE *out, const redisReply *r)
{
    switch (r->type) {
    case REDIS_REPLY_INTEGER:
        fprintf(out, ":%lld", r->integer);
        break;
    case REDIS_REPLY_STRING:
        put_text(out, r->str, r->len);
        break;
    case REDIS_REPLY_STATUS:
        fputc('+', out);
        put_text(out, r->str, r->len);
        break;
    case REDIS_REPLY_ERROR:
        fputc('-', out);
        put_text(out, r->str, r->len);
        break;
    case REDIS_REPLY_NIL:
        fputs("nil", out);
        break;
    case REDIS_REPLY_ARRAY:
        fputc('[', out);
        for (size_t i = 0; i < r->elements; i++) {
            if (i > 0)
                fputc(',', out);
            put_reply(out, r->element[i]);
        }
        fputc(']', out);
        break;
    default:
        fprintf(out, "?type%d", r->type);
        break;
    }
}

/* Splits line in place on spaces into argv/argl; returns argc. */
static int split_args(char *line, const char **argv, size_t *argl, int max)
{
    int argc = 0;
    char *p = line;
    while (*p != '\0' && argc < max) {
        while (*p == ' ')
            p++;
        if (*p == '\0')
            break;
        char *start = p;
        while (*p != '\0' && *p != ' ')
            p++;
        argv[argc] = start;
        argl[argc] = (size_t)(p - start);
        argc++;
        if (*p == ' ')
            *p++ = '\0';
    }
    return argc;
}

/* Reads the replies of `pending` sent commands and prints them. */
static int drain(redisContext *c, size_t pending)
{
    for (size_t i = 0; i < pending; i++) {
        void *reply = NULL;
        if (redisGetReply(c, &reply) != REDIS_OK || reply == NULL) {
            fprintf(stderr, "hiredis_client: reading a reply: %s\n",
                    c->errstr[0] ? c->errstr : "connection closed");
            return -1;
        }
        put_reply(stdout, reply);
        fputc('\n', stdout);
        freeReplyObject(reply);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: hiredis_client HOST PORT [BATCH]\n");
        return 2;
    }
    int port = atoi(argv[2]);
    long batch = argc == 4 ? atol(argv[3]) : DEF_BATCH;
    if (port <= 0 || port > 65535 || batch < 1) {
        fprintf(stderr, "hiredis_client: bad PORT or BATCH\n");
        return 2;
    }
    redisContext *c = redisConnect(argv[1], port);
    if (c == NULL || c->err) {
        fprintf(stderr, "hiredis_client: cannot connect to %s:%d: %s\n", argv[1], port,
                c ? c->errstr : "out of memory");
        return 2;
    }
    char *line = malloc(MAX_LINE);
    const char **args = malloc(MAX_ARGS * sizeof *args);
    size_t *argl = malloc(MAX_ARGS * sizeof *argl);
    if (line == NULL || args == NULL || argl == NULL) {
        fprintf(stderr, "hiredis_client: out of memory\n");
        return 2;
    }
    int rc = 0;
    size_t pending = 0;
    while (fgets(line, MAX_LINE, stdin) != NULL) {
        size_t len = strlen(line);
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        int n = split_args(line, args, argl, MAX_ARGS);
        if (n == 0)
            continue;
        if (redisAppendCommandArgv(c, n, args, argl) != REDIS_OK) {
            fprintf(stderr, "hiredis_client: queueing a command: %s\n", c->errstr);
            rc = 3;
            goto out;
        }
        if (++pending == (size_t)batch) {
            if (drain(c, pending) != 0) {
                rc = 3;
                goto out;
            }
            pending = 0;
        }
    }
    if (drain(c, pending) != 0)
        rc = 3;
out:
    fflush(stdout);
    free(line);
    free(args);
    free(argl);
    redisFree(c);
    return rc;
}
