/*
 * log.h — tallyd's log lines.
 *
 * One line per message on stderr (or the file given to tly_log_open):
 *   2026-11-22T06:30:00.123Z tallyd[4242] INFO source: assigned 8 partitions
 * A line is written with one write(2), so lines of different threads never
 * interleave. tly_log_reopen (SIGHUP) reopens the file for log rotation.
 *
 * Any thread. The log target is the only process-wide state outside the
 * daemon context: a process has one stderr.
 */
#ifndef TALLYD_LOG_H
#define TALLYD_LOG_H

typedef enum { TLY_LOG_DEBUG = 0, TLY_LOG_INFO, TLY_LOG_WARN, TLY_LOG_ERROR } tly_log_level_t;

/* Sets the lowest level written (default INFO). */
void tly_log_set_level(tly_log_level_t level);
/* Sends lines to path (appending) instead of stderr; NULL: stderr. Returns 0
 * or -1 with errno set. Main thread. */
int tly_log_open(const char *path);
/* Reopens the file given to tly_log_open (after rotation). Returns 1 when it
 * did, 0 when lines go to stderr (nothing to reopen), -1 with errno set when
 * the file cannot be opened (lines go on to the file open before). Main
 * thread. */
int tly_log_reopen(void);
/* The path given to tly_log_open, or NULL for stderr. Main thread. */
const char *tly_log_path(void);
/* The descriptor lines are written to (2 = stderr). Any thread. */
int tly_log_fd(void);
void tly_log(tly_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define tly_debug(...) tly_log(TLY_LOG_DEBUG, __VA_ARGS__)
#define tly_info(...)  tly_log(TLY_LOG_INFO, __VA_ARGS__)
#define tly_warn(...)  tly_log(TLY_LOG_WARN, __VA_ARGS__)
#define tly_error(...) tly_log(TLY_LOG_ERROR, __VA_ARGS__)

#include <stddef.h>

/* realloc(p, n) (n 0 is taken as 1), or, when memory runs out, an error
 * line and abort(). Any thread. */
void *tly_xrealloc(void *p, size_t n);

#endif
