/*
 * snapfile_int.h — test hooks of snapfile.c: the write(2) and fsync(2) it
 * calls.
 *
 * Lets tests inject ENOSPC, EIO, EINTR and short writes without a full disk.
 * Not for the daemon: the hook is process-wide, so set it only while no
 * snapshot writer is in use on another thread.
 */
#ifndef TALLYD_SNAPFILE_INT_H
#define TALLYD_SNAPFILE_INT_H

#include <stddef.h>
#include <sys/types.h>

typedef ssize_t (*snapfile_write_cb)(int fd, const void *buf, size_t n);

/* Makes snapfile.c call fn instead of write(2); NULL restores write(2). */
void snapfile_set_write_hook(snapfile_write_cb fn);

typedef int (*snapfile_fsync_cb)(int fd);

/* Makes snapfile.c call fn instead of fsync(2) (files and directories);
 * NULL restores fsync(2). */
void snapfile_set_fsync_hook(snapfile_fsync_cb fn);

#endif
