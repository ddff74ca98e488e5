/*
 * snapfile.h — the snapshot file format: writing, reading, listing and
 * pruning snapshot files. Pure file I/O; what goes into the blocks is the
 * caller's business.
 *
 * A snapshot is written to "dir/.tmp-<created_ms>-<pid>.tly" and renamed to
 * "dir/snapshot-<created_ms>.tly" (created_ms zero-padded to 13 digits, so
 * names sort by time) only once it is complete and fsynced: a snapshot file
 * that exists is whole. Layout (all integers little-endian):
 *
 *   header (32 bytes): "TLYSNAP\0", version u32 (2; 1 is read too), defs_hash u64,
 *                      created_ms i64, crc32c of the 28 bytes before it u32
 *   blocks:            type u32 (!= 0), raw_len u32 (<= 64 MiB), comp_len u32,
 *                      crc u32, then comp_len bytes: one zstd frame (level 1)
 *                      that decompresses to raw_len bytes
 *   end block:         type 0, raw_len = comp_len = 16, crc u32, then
 *                      block count u64 and total raw bytes u64 (stored, not
 *                      compressed); nothing may follow it
 *
 * A frame's crc is the crc32c of its first 12 bytes (type, raw_len,
 * comp_len) followed by its comp_len payload bytes, so a damaged type or
 * length is caught at that block, not only by the end block's totals.
 *
 * Threads: a writer or reader is used by one thread at a time; distinct
 * objects may be used on different threads. tly_crc32c is pure.
 */
#ifndef TALLYD_SNAPFILE_H
#define TALLYD_SNAPFILE_H

#include <stddef.h>
#include <stdint.h>

#include "tallyd/error.h"

/* The version written: 2 since entity state may hold packed item lists
 * (store_words.c), which a reader of version 1 would call malformed; a
 * version 1 file, which holds none, reads the same. */
#define TLY_SNAP_VERSION     2u
#define TLY_SNAP_VERSION_MIN 1u /* the oldest version read */
#define TLY_SNAP_HEADER_SIZE 32u
#define TLY_SNAP_FRAME_SIZE  16u
/* Largest raw (uncompressed) block the writer accepts and the reader reads. */
#define TLY_SNAP_MAX_RAW (64u << 20)

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of p[0..n), continuing
 * from crc (0 to start): tly_crc32c(0, "123456789", 9) == 0xE3069283, and
 * tly_crc32c(tly_crc32c(0, a, n), b, m) is the crc of a followed by b.
 * p may be NULL when n is 0. Pure; any thread. */
uint32_t tly_crc32c(uint32_t crc, const void *p, size_t n);

typedef struct tly_snapw tly_snapw_t;

/* Starts a snapshot in dir (created, with its parents, if missing): creates
 * the temp file "dir/.tmp-<created_ms>-<pid>.tly" (O_EXCL) and writes the
 * header. created_ms must be >= 0. Returns a writer the caller owns (end it
 * with tly_snapw_commit or tly_snapw_abort), or NULL with a sentence naming
 * the path and the reason in err (err may be NULL). */
tly_snapw_t *tly_snapw_open(const char *dir, int64_t created_ms, uint64_t defs_hash, char *err,
                            size_t errlen);

/* Appends one block of caller-defined type (!= 0): data[0..len) compressed
 * with zstd level 1. data is borrowed (may be NULL when len is 0).
 * Returns TLY_OK; TLY_E_INVAL for type 0; TLY_E_RANGE for len over
 * TLY_SNAP_MAX_RAW (nothing written, the writer stays usable); TLY_E_IO with
 * a sentence ending in strerror(errno) ("...: No space left on device") when
 * the write fails, after which the writer only accepts tly_snapw_abort. */
tly_err_t tly_snapw_block(tly_snapw_t *w, uint32_t type, const void *data, size_t len, char *err,
                          size_t errlen);

/* Writes the end block, fsyncs the file, renames it to
 * "dir/snapshot-<created_ms>.tly" (replacing a snapshot of the same
 * created_ms), fsyncs dir, and frees w (always: w is gone when this returns).
 * Returns TLY_OK with the final path in path_out (truncated to cap; path_out
 * may be NULL), or TLY_E_IO with a sentence: then the temp file has been
 * removed (the sentence says so if even that failed) and the previous
 * snapshots are untouched. Exception: when only the directory fsync after the
 * rename fails, the new file stays under its final name (it is whole, but
 * its name may not survive a crash) and TLY_E_IO is still returned. */
tly_err_t tly_snapw_commit(tly_snapw_t *w, char *path_out, size_t cap, char *err, size_t errlen);

/* Closes and removes the temp file and frees w. w may be NULL. */
void tly_snapw_abort(tly_snapw_t *w);

/* The name (created_ms) for dir's next snapshot: now_ms, or one past the
 * newest snapshot's name in dir when that is at or after now_ms (written
 * while the clock ran ahead, before it was stepped back). Names then follow
 * the order of the writes whatever the clock does, so the newest write is
 * the one restored first and the one pruning keeps. Returns now_ms when dir
 * is missing or holds no snapshot. */
int64_t tly_snap_next_ms(const char *dir, int64_t now_ms);

/* Deletes all but the newest `keep` snapshot files in dir named at or
 * before upto_ms (the snapshot just written: a file named later, from a
 * clock that ran ahead or put there by hand, would otherwise count among
 * the newest and get that one deleted; such files are left alone), and the
 * temp files (.tmp-<ms>-<pid>.tly) whose ms is older than the newest
 * snapshot kept or whose writer pid is gone (kill(pid, 0) fails with
 * ESRCH). Other files are left alone. Returns the number of files deleted
 * (0 when dir is missing). Must not run while this process has a writer open
 * on dir whose created_ms is older than dir's newest snapshot. */
size_t tly_snap_prune(const char *dir, size_t keep, int64_t upto_ms);

/* Deletes the temp files in dir that no writer is writing: those whose
 * writer pid is gone (kill(pid, 0) fails with ESRCH), or is this process
 * or one of its threads (a pid the kernel gave again to this process after
 * a restart, as in a container where tallyd starts the same way each
 * time). Called by a process with no writer of its own open on dir, before
 * it writes: a writer killed in the middle of a snapshot leaves a temp file
 * as large as a snapshot, which would otherwise stay until the next write
 * succeeds, and on a nearly full disk keep every write from succeeding.
 * Returns the number of files deleted. */
size_t tly_snap_clean_tmp(const char *dir);

/* Lists dir's snapshot files, newest first, as "dir/snapshot-<ms>.tly" paths.
 * Sets *paths to a NULL-terminated malloc'd array of malloc'd strings that
 * the caller frees with tly_snap_list_free (also when the count is 0).
 * Returns the count: 0 when dir is missing or holds no snapshot. */
size_t tly_snap_list(const char *dir, char ***paths);

/* Frees what tly_snap_list returned. paths may be NULL. */
void tly_snap_list_free(char **paths);

typedef struct tly_snapr tly_snapr_t;

/* Opens path and checks its header (magic, version, crc). Returns a reader
 * the caller owns (tly_snapr_close), or NULL with a sentence in err naming
 * the file and the problem: "<path>: not a tallyd snapshot", "<path>: header
 * checksum mismatch", "<path>: format version 7, this tallyd reads 1 to 2",
 * "<path>: truncated header (12 of 32 bytes)", or an open/read error. */
tly_snapr_t *tly_snapr_open(const char *path, char *err, size_t errlen);

/* The header's fields. */
uint64_t tly_snapr_defs_hash(const tly_snapr_t *r);
int64_t tly_snapr_created(const tly_snapr_t *r);

/* Reads the next block. Returns 1 with *type, *data and *len set (*data is
 * owned by r and valid until the next call or close; never NULL, also
 * when *len is 0); 0 at a valid end block when the block count and raw byte total
 * match and nothing follows; -1 with a sentence in err for any damage
 * (truncated frame, crc mismatch, zstd error, raw length different from the
 * frame's, a length over the limits, a missing end block, bytes after the
 * end block) or read error. Once it has returned 0 or -1 it keeps returning
 * that (with the same sentence). Allocates at most TLY_SNAP_MAX_RAW plus the
 * compressed size, and never more than the file holds for the compressed
 * bytes, whatever the file says. */
int tly_snapr_next(tly_snapr_t *r, uint32_t *type, const void **data, size_t *len, char *err,
                   size_t errlen);

/* Closes the file and frees r. r may be NULL. */
void tly_snapr_close(tly_snapr_t *r);

#endif
