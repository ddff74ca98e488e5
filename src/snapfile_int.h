/*
 * snapfile_int.h — test hook of snapfile.c: the write(2) it calls.
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

#endif
