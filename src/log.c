/*
 * log.c — timestamped log lines on stderr or a file.
 *
 * Each line is formatted into a stack buffer and written with one write(2)
 * (O_APPEND for files), so concurrent threads never interleave within a
 * line. The file descriptor is swapped atomically on reopen; a line written
 * during the swap goes to the old or the new file, never nowhere.
 */
#include "tallyd/log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LINE_CAP 2048

static atomic_int log_level = TLY_LOG_INFO;
static atomic_int log_fd = 2;
static char *log_path; /* set by tly_log_open on the main thread only */

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

void tly_log_set_level(tly_log_level_t level)
{
    atomic_store(&log_level, (int)level);
}

static int open_path(const char *path)
{
    return open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

int tly_log_open(const char *path)
{
    if (path == NULL) {
        int old = atomic_exchange(&log_fd, 2);
        if (old != 2)
            close(old);
        free(log_path);
        log_path = NULL;
        return 0;
    }
    int fd = open_path(path);
    if (fd < 0)
        return -1;
    char *copy = strdup(path);
    if (copy == NULL) {
        close(fd);
        errno = ENOMEM;
        return -1;
    }
    free(log_path);
    log_path = copy;
    int old = atomic_exchange(&log_fd, fd);
    if (old != 2)
        close(old);
    return 0;
}

int tly_log_fd(void)
{
    return atomic_load(&log_fd);
}

int tly_log_reopen(void)
{
    if (log_path == NULL)
        return 0;
    int fd = open_path(log_path);
    if (fd < 0)
        return -1; /* keep writing to the old file rather than losing lines */
    int old = atomic_exchange(&log_fd, fd);
    if (old != 2)
        close(old);
    return 1;
}

const char *tly_log_path(void)
{
    return log_path;
}

void tly_log(tly_log_level_t level, const char *fmt, ...)
{
    if ((int)level < atomic_load_explicit(&log_level, memory_order_relaxed))
        return;
    char line[LINE_CAP];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ tallyd[%ld] %s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, (long)getpid(),
                     level_names[level <= TLY_LOG_ERROR ? level : TLY_LOG_ERROR]);
    if (n < 0 || (size_t)n >= sizeof line)
        return;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2)
        len = sizeof line - 2; /* truncated: keep the newline */
    line[len++] = '\n';
    ssize_t w = write(atomic_load(&log_fd), line, len);
    (void)w; /* nowhere to report a failed log write */
}

void *tly_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n != 0 ? n : 1);
    if (q == NULL) {
        tly_error("out of memory (%zu bytes)", n);
        abort();
    }
    return q;
}
