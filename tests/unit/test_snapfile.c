/*
 * test_snapfile.c — the snapshot file format: crc32c against a bitwise
 * reference, the byte layout against a hand-written encoder, round trips,
 * every truncation and every single-bit flip of a small file ending in an
 * error without ever handing out a wrong block, crafted frames that lie
 * about their lengths, prune and list, abort and commit leaving exactly the
 * right files, and write failures (ENOSPC, EIO, short and interrupted
 * writes) injected through the write hook of snapfile_int.h.
 *
 * Every test runs in its own mkdtemp directory under /tmp, removed after.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zstd.h>

#include "snapfile_int.h"
#include "tallyd/snapfile.h"

#define MIB (1024u * 1024u)

/* ------------------------------------------------------------- fixtures */

static int setup_dir(void **state)
{
    char *dir = strdup("/tmp/tly-snapfile-XXXXXX");
    if (dir == NULL || mkdtemp(dir) == NULL)
        return -1;
    *state = dir;
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if (flag == FTW_DP)
        chmod(path, 0700); /* harmless for files; undoes a test's chmod 0500 */
    return remove(path);
}

static int teardown_dir(void **state)
{
    char *dir = *state;
    chmod(dir, 0700);
    int rc = nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
    snapfile_set_write_hook(NULL);
    snapfile_set_fsync_hook(NULL);
    return rc;
}

/* ------------------------------------------------------------- helpers */

/* The definition, bit by bit: the ground truth for the table version. */
static uint32_t ref_crc32c(uint32_t crc, const void *p, size_t n)
{
    const uint8_t *b = p;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= b[i];
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    }
    return ~crc;
}

static uint64_t rng_state;

static uint64_t rng(void)
{
    /* xorshift64*, fixed seeds per test: failures replay */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * UINT64_C(2685821657736338717);
}

static void fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(rng() >> 56);
}

static void fill_text(uint8_t *p, size_t n)
{
    static const char words[] = "user 42 clicked item 7 in category shoes; ";
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)words[(i + i / 997) % (sizeof words - 1)];
}

typedef struct {
    uint32_t type;
    size_t len;
    uint8_t *data;
} block_t;

static void free_blocks(block_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(b[i].data);
}

static char *path_in(const char *dir, const char *name)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", dir, name) > 0);
    return p;
}

/* Writes a committed snapshot of blocks into dir; returns its path. */
static char *write_snapshot(const char *dir, int64_t ms, uint64_t hash, const block_t *b, size_t n)
{
    char err[512] = "";
    tly_snapw_t *w = tly_snapw_open(dir, ms, hash, err, sizeof err);
    if (w == NULL)
        fail_msg("open: %s", err);
    for (size_t i = 0; i < n; i++) {
        tly_err_t rc = tly_snapw_block(w, b[i].type, b[i].data, b[i].len, err, sizeof err);
        if (rc != TLY_OK)
            fail_msg("block %zu: %s", i, err);
    }
    char path[4096];
    if (tly_snapw_commit(w, path, sizeof path, err, sizeof err) != TLY_OK)
        fail_msg("commit: %s", err);
    return strdup(path);
}

enum { READ_OK, READ_ERROR, READ_WRONG_DATA };

/* Reads path to its end. Returns READ_OK when every block equals the
 * expected one and the end block is reached, READ_ERROR when opening or
 * reading fails after only correct blocks came out, READ_WRONG_DATA when a
 * block differs from the expected one or the reader claims a good end with
 * blocks missing. Checks that a finished reader repeats its result. */
static int read_outcome(const char *path, const block_t *b, size_t n, char *err, size_t errlen)
{
    tly_snapr_t *r = tly_snapr_open(path, err, errlen);
    if (r == NULL)
        return READ_ERROR;
    size_t i = 0;
    int out;
    for (;;) {
        uint32_t type;
        const void *data;
        size_t len;
        int rc = tly_snapr_next(r, &type, &data, &len, err, errlen);
        if (rc < 0) {
            out = READ_ERROR;
            break;
        }
        if (rc == 0) {
            out = i == n ? READ_OK : READ_WRONG_DATA;
            break;
        }
        assert_int_equal(rc, 1);
        assert_non_null(data);
        if (i >= n || type != b[i].type || len != b[i].len ||
            (len > 0 && memcmp(data, b[i].data, len) != 0)) {
            out = READ_WRONG_DATA;
            break;
        }
        i++;
    }
    if (out != READ_WRONG_DATA) {
        uint32_t type;
        const void *data;
        size_t len;
        char again[512];
        int rc = tly_snapr_next(r, &type, &data, &len, again, sizeof again);
        assert_int_equal(rc, out == READ_OK ? 0 : -1);
        if (rc < 0)
            assert_string_equal(again, err);
    }
    tly_snapr_close(r);
    return out;
}

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long size = ftell(f);
    assert_true(size >= 0);
    rewind(f);
    uint8_t *p = malloc((size_t)size + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    *n = (size_t)size;
    return p;
}

static void spill(const char *path, const void *p, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, p, n), (ssize_t)n);
    close(fd);
}

/* Names in dir other than . and .., sorted, joined with '\n'. */
static char *dir_names(const char *dir)
{
    struct dirent **list;
    int n = scandir(dir, &list, NULL, alphasort);
    assert_true(n >= 0);
    char *out = calloc(1, 1);
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        const char *s = list[i]->d_name;
        if (strcmp(s, ".") != 0 && strcmp(s, "..") != 0) {
            size_t k = strlen(s);
            out = realloc(out, used + k + 2);
            memcpy(out + used, s, k);
            used += k;
            out[used++] = '\n';
            out[used] = '\0';
        }
        free(list[i]);
    }
    free(list);
    return out;
}

static void le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* The format written by hand: header, frames, end block (see snapfile.h). */
static size_t enc_header(uint8_t *p, uint32_t version, uint64_t hash, int64_t ms)
{
    memcpy(p, "TLYSNAP", 8);
    le32(p + 8, version);
    le64(p + 12, hash);
    le64(p + 20, (uint64_t)ms);
    le32(p + 28, ref_crc32c(0, p, 28));
    return 32;
}

static size_t enc_frame(uint8_t *p, uint32_t type, uint32_t raw_len, const void *payload,
                        uint32_t comp_len)
{
    le32(p, type);
    le32(p + 4, raw_len);
    le32(p + 8, comp_len);
    memcpy(p + 16, payload, comp_len);
    le32(p + 12, ref_crc32c(ref_crc32c(0, p, 12), p + 16, comp_len));
    return 16 + (size_t)comp_len;
}

static size_t enc_end(uint8_t *p, uint64_t blocks, uint64_t raw_total)
{
    uint8_t payload[16];
    le64(payload, blocks);
    le64(payload + 8, raw_total);
    return enc_frame(p, 0, 16, payload, 16);
}

/* ------------------------------------------------------------ write hook */

static int hook_calls;
static int hook_fail_at; /* 1-based call that fails; 0: none */
static int hook_errno;
static size_t hook_max_chunk; /* 0: no limit */
static int hook_eintr_every;  /* 0: never */

static ssize_t test_write(int fd, const void *buf, size_t n)
{
    hook_calls++;
    if (hook_fail_at != 0 && hook_calls >= hook_fail_at) {
        errno = hook_errno;
        return -1;
    }
    if (hook_eintr_every != 0 && hook_calls % hook_eintr_every == 0) {
        errno = EINTR;
        return -1;
    }
    if (hook_max_chunk != 0 && n > hook_max_chunk)
        n = hook_max_chunk;
    return write(fd, buf, n);
}

static void hook_set(int fail_at, int err, size_t max_chunk, int eintr_every)
{
    hook_calls = 0;
    hook_fail_at = fail_at;
    hook_errno = err;
    hook_max_chunk = max_chunk;
    hook_eintr_every = eintr_every;
    snapfile_set_write_hook(test_write);
}

/* --------------------------------------------------------------- tests */

static void test_crc32c_check_value_empty_incremental_and_reference(void **state)
{
    (void)state;
    assert_int_equal(tly_crc32c(0, "123456789", 9), 0xE3069283u);
    assert_int_equal(ref_crc32c(0, "123456789", 9), 0xE3069283u);
    assert_int_equal(tly_crc32c(0, "", 0), 0);
    assert_int_equal(tly_crc32c(0, NULL, 0), 0);

    uint8_t buf[1000];
    rng_state = 0x5eed0001;
    fill_random(buf, sizeof buf);
    uint32_t whole = tly_crc32c(0, buf, sizeof buf);
    assert_int_equal(whole, ref_crc32c(0, buf, sizeof buf));
    for (size_t cut = 0; cut <= sizeof buf; cut++)
        assert_int_equal(tly_crc32c(tly_crc32c(0, buf, cut), buf + cut, sizeof buf - cut), whole);
    /* every table entry is exercised by random bytes at every length 0..300 */
    for (size_t n = 0; n <= 300; n++)
        assert_int_equal(tly_crc32c(0, buf + 7, n), ref_crc32c(0, buf + 7, n));
    /* a single-bit change anywhere changes the crc */
    for (size_t i = 0; i < 64; i++) {
        buf[i] ^= 0x10;
        assert_int_not_equal(tly_crc32c(0, buf, sizeof buf), whole);
        buf[i] ^= 0x10;
    }
}

static void test_file_layout_matches_the_hand_encoder(void **state)
{
    const char *dir = *state;
    uint8_t payload[] = "hello hello hello hello";
    block_t b = {0x01020304u, sizeof payload, payload};
    char *path = write_snapshot(dir, 1234, UINT64_C(0x1122334455667788), &b, 1);
    char *want = path_in(dir, "snapshot-0000000001234.tly");
    assert_string_equal(path, want);

    /* the expected bytes: our header, a frame holding exactly the compressed
     * bytes zstd level 1 produces for the payload, the end block */
    uint8_t comp[256];
    size_t clen = ZSTD_compress(comp, sizeof comp, payload, sizeof payload, 1);
    assert_false(ZSTD_isError(clen));
    uint8_t expect[512];
    size_t n = enc_header(expect, 2, UINT64_C(0x1122334455667788), 1234);
    n += enc_frame(expect + n, 0x01020304u, sizeof payload, comp, (uint32_t)clen);
    n += enc_end(expect + n, 1, sizeof payload);

    size_t got_n;
    uint8_t *got = slurp(path, &got_n);
    assert_int_equal(got_n, n);
    assert_memory_equal(got, expect, n);
    assert_memory_equal(got, "TLYSNAP\0\2\0\0\0\x88\x77\x66\x55\x44\x33\x22\x11\xd2\x04", 22);
    free(got);
    free(path);
    free(want);
}

static void test_round_trip_blocks_of_every_size_into_a_new_nested_dir(void **state)
{
    char *dir = path_in(*state, "a/b/c");
    rng_state = 0x5eed0002;
    block_t b[6] = {
        {1, 0, NULL},  {2, 1, NULL}, {3, MIB, NULL}, {4, MIB, NULL}, {0xffffffffu, 3000, NULL},
        {1, 17, NULL},
    };
    for (size_t i = 0; i < 6; i++) {
        b[i].data = malloc(b[i].len + 1);
        if (i == 2)
            fill_text(b[i].data, b[i].len);
        else
            fill_random(b[i].data, b[i].len);
    }
    char *path = write_snapshot(dir, 1700000000123, UINT64_C(0xfeedfacecafebeef), b, 6);
    char *want = path_in(dir, "snapshot-1700000000123.tly");
    assert_string_equal(path, want);
    /* the text MiB compresses, the random one does not */
    size_t size;
    uint8_t *bytes = slurp(path, &size);
    assert_in_range(size, MIB + 3000, MIB + MIB / 4);
    free(bytes);

    char err[512] = "";
    tly_snapr_t *r = tly_snapr_open(path, err, sizeof err);
    assert_non_null(r);
    assert_true(tly_snapr_defs_hash(r) == UINT64_C(0xfeedfacecafebeef));
    assert_true(tly_snapr_created(r) == 1700000000123);
    tly_snapr_close(r);
    assert_int_equal(read_outcome(path, b, 6, err, sizeof err), READ_OK);

    /* exactly the final file, no temp */
    char *names = dir_names(dir);
    assert_string_equal(names, "snapshot-1700000000123.tly\n");
    free(names);
    free_blocks(b, 6);
    free(path);
    free(want);
    free(dir);
}

static void test_largest_block_round_trips_and_larger_is_refused(void **state)
{
    const char *dir = *state;
    char err[512];
    block_t b = {9, TLY_SNAP_MAX_RAW, calloc(1, TLY_SNAP_MAX_RAW + 1)};
    assert_non_null(b.data);
    b.data[TLY_SNAP_MAX_RAW - 1] = 0x5a;
    tly_snapw_t *w = tly_snapw_open(dir, 5, 0, err, sizeof err);
    assert_non_null(w);
    assert_int_equal(tly_snapw_block(w, 9, b.data, TLY_SNAP_MAX_RAW + 1, err, sizeof err),
                     TLY_E_RANGE);
    assert_non_null(strstr(err, "exceeds the limit"));
    assert_int_equal(tly_snapw_block(w, 0, "x", 1, err, sizeof err), TLY_E_INVAL);
    /* neither refusal wrote anything: the writer goes on */
    assert_int_equal(tly_snapw_block(w, 9, b.data, b.len, err, sizeof err), TLY_OK);
    char path[4096];
    assert_int_equal(tly_snapw_commit(w, path, sizeof path, err, sizeof err), TLY_OK);
    assert_int_equal(read_outcome(path, &b, 1, err, sizeof err), READ_OK);
    free(b.data);
}

/* The small file of the corruption tests: five blocks, about 3 KB. */
static char *small_snapshot(const char *dir, block_t *b)
{
    rng_state = 0x5eed0003;
    const uint32_t types[5] = {1, 2, 3, 4, 0x80000001u};
    const size_t lens[5] = {0, 1, 1200, 6000, 900};
    for (size_t i = 0; i < 5; i++) {
        b[i] = (block_t){types[i], lens[i], malloc(lens[i] + 1)};
        if (i == 3)
            fill_text(b[i].data, lens[i]);
        else
            fill_random(b[i].data, lens[i]);
    }
    return write_snapshot(dir, 42, 7, b, 5);
}

/* Why every truncation is caught: a prefix shorter than the 32-byte header
 * fails in open ("truncated header", or "not a tallyd snapshot" when it is
 * empty); a cut inside a frame's 16 bytes or its payload is a short read
 * ("truncated"), or, for the payload, a comp_len longer than the bytes left;
 * a cut exactly between frames leaves a file without its end block. */
static void test_truncation_at_every_length_is_an_error(void **state)
{
    const char *dir = *state;
    block_t b[5];
    char *path = small_snapshot(dir, b);
    size_t size;
    uint8_t *bytes = slurp(path, &size);
    assert_in_range(size, 2000, 4096);
    char *cut = path_in(dir, "cut.tly");
    char err[512];
    for (size_t n = 0; n < size; n++) {
        spill(cut, bytes, n);
        err[0] = '\0';
        int out = read_outcome(cut, b, 5, err, sizeof err);
        if (out != READ_ERROR)
            fail_msg("truncated at %zu of %zu: outcome %d", n, size, out);
        assert_non_null(strstr(err, cut)); /* the sentence names the file */
    }
    spill(cut, bytes, size);
    assert_int_equal(read_outcome(cut, b, 5, err, sizeof err), READ_OK);
    free(cut);
    free(bytes);
    free(path);
    free_blocks(b, 5);
}

/* Why a flip of any bit in any byte is caught:
 * - header bytes 0-7 are the magic (compared), 8-11 the version (must be
 *   1), 12-27 are covered by the header crc, 28-31 are the crc itself;
 * - in each frame, bytes 0-11 (type, raw_len, comp_len) and the payload are
 *   covered by the frame crc (a flipped comp_len also moves the payload's
 *   end, so the crc is computed over other bytes, or it runs past the file),
 *   bytes 12-15 are the crc itself;
 * - the end block is a frame too: a flipped type 0 makes it a data block
 *   whose crc (over the type) no longer matches; its payload (the totals) is
 *   under its crc;
 * - nothing may follow the end block, so no byte lies outside a check.
 * The test flips each of the 8 bits of every byte, one at a time. */
static void test_every_single_bit_flip_is_an_error(void **state)
{
    const char *dir = *state;
    block_t b[5];
    char *path = small_snapshot(dir, b);
    size_t size;
    uint8_t *bytes = slurp(path, &size);
    char *bad = path_in(dir, "bad.tly");
    spill(bad, bytes, size);
    int fd = open(bad, O_WRONLY);
    assert_true(fd >= 0);
    char err[512];
    for (size_t i = 0; i < size; i++) {
        for (int bit = 0; bit < 8; bit++) {
            uint8_t v = bytes[i] ^ (uint8_t)(1u << bit);
            assert_int_equal(pwrite(fd, &v, 1, (off_t)i), 1);
            int out = read_outcome(bad, b, 5, err, sizeof err);
            if (out != READ_ERROR)
                fail_msg("bit %d of byte %zu flipped: outcome %d", bit, i, out);
        }
        assert_int_equal(pwrite(fd, &bytes[i], 1, (off_t)i), 1);
    }
    close(fd);
    assert_int_equal(read_outcome(bad, b, 5, err, sizeof err), READ_OK);
    free(bad);
    free(bytes);
    free(path);
    free_blocks(b, 5);
}

static void test_random_multi_bit_damage_is_an_error(void **state)
{
    const char *dir = *state;
    block_t b[5];
    char *path = small_snapshot(dir, b);
    size_t size;
    uint8_t *bytes = slurp(path, &size);
    uint8_t *copy = malloc(size);
    char *bad = path_in(dir, "bad.tly");
    char err[512];
    rng_state = 0x5eed0004;
    for (int round = 0; round < 3000; round++) {
        memcpy(copy, bytes, size);
        int flips = 2 + (int)(rng() % 15);
        /* half the rounds: a burst within 8 bytes; the others: anywhere */
        size_t base = (size_t)(rng() % size);
        for (int k = 0; k < flips; k++) {
            size_t at = round % 2 ? (size_t)(rng() % size) : (base + (size_t)(rng() % 8)) % size;
            copy[at] ^= (uint8_t)(1u << (rng() % 8));
        }
        if (memcmp(copy, bytes, size) == 0)
            continue; /* the flips cancelled out */
        spill(bad, copy, size);
        int out = read_outcome(bad, b, 5, err, sizeof err);
        if (out != READ_ERROR)
            fail_msg("round %d (%d flips): outcome %d", round, flips, out);
    }
    free(bad);
    free(copy);
    free(bytes);
    free(path);
    free_blocks(b, 5);
}

/* Reading path ends in an error whose sentence contains want; blocks that
 * come out before it must be the expected ones. */
static void expect_error(const char *path, const char *want, const block_t *b, size_t n)
{
    char err[512] = "";
    int out = read_outcome(path, b, n, err, sizeof err);
    assert_int_equal(out, READ_ERROR);
    if (strstr(err, want) == NULL)
        fail_msg("error \"%s\" lacks \"%s\"", err, want);
}

/* Frames with valid crcs that lie: the reader's bounds, not the crc, must
 * catch them, without allocating what they claim. */
static void test_crafted_files_with_valid_crcs_are_rejected(void **state)
{
    const char *dir = *state;
    char *path = path_in(dir, "crafted.tly");
    char want[600];
    uint8_t f[4096];
    uint8_t comp[256];
    uint8_t raw[100];
    memset(raw, 'z', sizeof raw);
    size_t clen = ZSTD_compress(comp, sizeof comp, raw, sizeof raw, 1);
    assert_false(ZSTD_isError(clen));
    size_t n;

    /* the reference file is accepted */
    n = enc_header(f, 1, 0, 0);
    n += enc_frame(f + n, 5, sizeof raw, comp, (uint32_t)clen);
    n += enc_end(f + n, 1, sizeof raw);
    spill(path, f, n);
    block_t ok = {5, sizeof raw, raw};
    char err[512];
    assert_int_equal(read_outcome(path, &ok, 1, err, sizeof err), READ_OK);
    /* so is the same at version 2, the one written now */
    n = enc_header(f, 2, 0, 0);
    n += enc_frame(f + n, 5, sizeof raw, comp, (uint32_t)clen);
    n += enc_end(f + n, 1, sizeof raw);
    spill(path, f, n);
    assert_int_equal(read_outcome(path, &ok, 1, err, sizeof err), READ_OK);

    /* header problems, each with its sentence */
    spill(path, "PK\3\4 not a snapshot at all, just some bytes....", 40);
    snprintf(want, sizeof want, "%s: not a tallyd snapshot", path);
    expect_error(path, want, &ok, 1);
    spill(path, "", 0);
    snprintf(want, sizeof want, "%s: truncated header", path);
    expect_error(path, want, &ok, 1);
    /* a FIFO of a snapshot's name: refused at once, not waited on */
    char *fifo = path_in(dir, "snapshot-9999999999999.tly");
    assert_int_equal(mkfifo(fifo, 0600), 0);
    snprintf(want, sizeof want, "%s: not a regular file", fifo);
    expect_error(fifo, want, &ok, 1);
    assert_int_equal(unlink(fifo), 0);
    free(fifo);
    enc_header(f, 7, 0, 0);
    spill(path, f, 32);
    snprintf(want, sizeof want, "%s: format version 7, this tallyd reads 1 to 2", path);
    expect_error(path, want, &ok, 1);
    enc_header(f, 0, 0, 0);
    spill(path, f, 32);
    snprintf(want, sizeof want, "%s: format version 0, this tallyd reads 1 to 2", path);
    expect_error(path, want, &ok, 1);
    enc_header(f, 1, 0, 0);
    f[20] ^= 1;
    spill(path, f, 32);
    snprintf(want, sizeof want, "%s: header checksum mismatch", path);
    expect_error(path, want, &ok, 1);

    /* raw length over 64 MiB */
    n = enc_header(f, 1, 0, 0);
    n += enc_frame(f + n, 5, TLY_SNAP_MAX_RAW + 1, comp, (uint32_t)clen);
    n += enc_end(f + n, 1, TLY_SNAP_MAX_RAW + 1);
    spill(path, f, n);
    expect_error(path, "exceeds the limit", &ok, 1);

    /* a compressed length of 4 GiB - 1 with 40 bytes in the file */
    n = enc_header(f, 1, 0, 0);
    n += enc_frame(f + n, 5, sizeof raw, comp, (uint32_t)clen);
    le32(f + 32 + 8, UINT32_MAX);
    le32(f + 32 + 12, ref_crc32c(ref_crc32c(0, f + 32, 12), f + 48, clen));
    spill(path, f, n);
    expect_error(path, "runs past the end of the file", &ok, 1);

    /* a frame claiming 99 raw bytes for a zstd frame of 100 */
    n = enc_header(f, 1, 0, 0);
    n += enc_frame(f + n, 5, sizeof raw - 1, comp, (uint32_t)clen);
    n += enc_end(f + n, 1, sizeof raw - 1);
    spill(path, f, n);
    expect_error(path, "not one zstd frame of 99 bytes", &ok, 1);

    /* a payload that is not zstd at all */
    n = enc_header(f, 1, 0, 0);
    n += enc_frame(f + n, 5, sizeof raw, raw, sizeof raw);
    n += enc_end(f + n, 1, sizeof raw);
    spill(path, f, n);
    expect_error(path, "not one zstd frame", &ok, 1);

    /* two zstd frames in one block: the second would be silently dropped */
    uint8_t two[512];
    memcpy(two, comp, clen);
    memcpy(two + clen, comp, clen);
    n = enc_header(f, 1, 0, 0);
    n += enc_frame(f + n, 5, sizeof raw, two, (uint32_t)(2 * clen));
    n += enc_end(f + n, 1, sizeof raw);
    spill(path, f, n);
    expect_error(path, "not one zstd frame", &ok, 1);

    /* end block totals that do not match: a block count, a byte total */
    n = enc_header(f, 1, 0, 0);
    n += enc_frame(f + n, 5, sizeof raw, comp, (uint32_t)clen);
    size_t good = n;
    n += enc_end(f + n, 2, sizeof raw);
    spill(path, f, n);
    expect_error(path, "end block counts 2 blocks", &ok, 1);
    n = good + enc_end(f + good, 1, sizeof raw + 1);
    spill(path, f, n);
    expect_error(path, "end block counts 1 blocks and 101 bytes", &ok, 1);

    /* no end block; an end block of the wrong size; bytes after the end */
    spill(path, f, good);
    expect_error(path, "without an end block", &ok, 1);
    uint8_t payload24[24] = {1};
    n = good + enc_frame(f + good, 0, 24, payload24, 24);
    spill(path, f, n);
    expect_error(path, "end block lengths 24/24", &ok, 1);
    n = good + enc_end(f + good, 1, sizeof raw);
    f[n++] = 0;
    spill(path, f, n);
    expect_error(path, "data after the end block", &ok, 1);
    n = good + enc_end(f + good, 1, sizeof raw);
    n += enc_end(f + n, 1, sizeof raw);
    spill(path, f, n);
    expect_error(path, "data after the end block", &ok, 1);

    /* not a regular file */
    expect_error(dir, dir, &ok, 1);
    free(path);
}

static void touch(const char *dir, const char *name)
{
    char *p = path_in(dir, name);
    spill(p, "x", 1);
    free(p);
}

static bool exists(const char *dir, const char *name)
{
    char *p = path_in(dir, name);
    bool yes = access(p, F_OK) == 0;
    free(p);
    return yes;
}

/* Before a write: the temp files of a dead writer and of this process (a pid
 * given to it again) go, whatever their time; another live process's stay,
 * and so do snapshots and other files. */
static void test_clean_tmp_drops_dead_and_own_writers_temps_only(void **state)
{
    const char *dir = *state;
    uint8_t one = 1;
    block_t b = {1, 1, &one};
    free(write_snapshot(dir, 1000, 0, &b, 1));
    pid_t dead = fork();
    assert_true(dead >= 0);
    if (dead == 0)
        _exit(0);
    assert_int_equal(waitpid(dead, NULL, 0), dead);
    char dead_tmp[128], own_tmp[128], other_tmp[128];
    snprintf(dead_tmp, sizeof dead_tmp, ".tmp-9000-%ld.tly", (long)dead); /* after the snapshot */
    snprintf(own_tmp, sizeof own_tmp, ".tmp-9000-%ld.tly", (long)getpid());
    /* a live process that is not this one: the parent (the test runner's
     * shell, or init) */
    snprintf(other_tmp, sizeof other_tmp, ".tmp-9000-%ld.tly", (long)getppid());
    touch(dir, dead_tmp);
    touch(dir, own_tmp);
    touch(dir, other_tmp);
    touch(dir, ".tmp-1-0.tly"); /* pid 0 is not a writer: left alone */
    touch(dir, "notes.txt");
    assert_int_equal(tly_snap_clean_tmp(dir), 2);
    char *names = dir_names(dir);
    char expect[512];
    snprintf(expect, sizeof expect, ".tmp-1-0.tly\n%s\nnotes.txt\nsnapshot-0000000001000.tly\n",
             other_tmp);
    assert_string_equal(names, expect);
    free(names);
    assert_int_equal(tly_snap_clean_tmp(dir), 0);
    char *missing = path_in(dir, "missing");
    assert_int_equal(tly_snap_clean_tmp(missing), 0);
    free(missing);
}

static void test_next_name_follows_the_newest_file_when_the_clock_is_behind_it(void **state)
{
    const char *dir = *state;
    char *missing = path_in(dir, "missing");
    assert_int_equal(tly_snap_next_ms(missing, 1234), 1234);
    free(missing);
    assert_int_equal(tly_snap_next_ms(dir, 1234), 1234); /* empty */
    uint8_t one = 1;
    block_t b = {1, 1, &one};
    free(write_snapshot(dir, 100, 0, &b, 1));
    free(write_snapshot(dir, 5000, 0, &b, 1)); /* written while the clock ran ahead */
    touch(dir, ".tmp-3000-1.tly");             /* temp files do not count */
    touch(dir, "snapshot-x.tly");
    assert_int_equal(tly_snap_next_ms(dir, 9000), 9000);
    assert_int_equal(tly_snap_next_ms(dir, 5001), 5001);
    assert_int_equal(tly_snap_next_ms(dir, 5000), 5001);
    assert_int_equal(tly_snap_next_ms(dir, 1000), 5001); /* the clock stepped back */
    /* written under that name, it is the newest: listed first, kept by prune */
    free(write_snapshot(dir, tly_snap_next_ms(dir, 1000), 0, &b, 1));
    assert_int_equal(tly_snap_next_ms(dir, 1001), 5002);
    char **paths = NULL;
    assert_int_equal(tly_snap_list(dir, &paths), 3);
    char *want = path_in(dir, "snapshot-0000000005001.tly");
    assert_string_equal(paths[0], want);
    free(want);
    tly_snap_list_free(paths);
    assert_int_equal(tly_snap_prune(dir, 1, 5001), 2 + 1); /* 5000, 100 and the stale temp */
    char *names = dir_names(dir);
    assert_string_equal(names, "snapshot-0000000005001.tly\nsnapshot-x.tly\n");
    free(names);
}

static void test_prune_keeps_newest_and_drops_stale_temps_list_is_newest_first(void **state)
{
    const char *dir = *state;
    uint8_t one = 1;
    block_t b = {1, 1, &one};
    for (int64_t ms = 1000; ms <= 5000; ms += 1000)
        free(write_snapshot(dir, ms, 0, &b, 1));

    pid_t dead = fork();
    assert_true(dead >= 0);
    if (dead == 0)
        _exit(0);
    assert_int_equal(waitpid(dead, NULL, 0), dead);
    assert_int_equal(kill(dead, 0), -1);
    assert_int_equal(errno, ESRCH);

    char name[128];
    snprintf(name, sizeof name, ".tmp-9000-%ld.tly", (long)dead); /* newer, dead: goes */
    touch(dir, name);
    char live_new[128], live_old[128];
    snprintf(live_new, sizeof live_new, ".tmp-9000-%ld.tly", (long)getpid()); /* stays */
    touch(dir, live_new);
    snprintf(live_old, sizeof live_old, ".tmp-4999-%ld.tly", (long)getpid()); /* older: goes */
    touch(dir, live_old);
    touch(dir, "notes.txt");
    touch(dir, "snapshot-abc.tly");
    touch(dir, ".tmp-1-0.tly"); /* pid 0 is not a writer: left alone */

    assert_int_equal(tly_snap_prune(dir, 3, INT64_MAX), 4);
    assert_false(exists(dir, name));
    assert_false(exists(dir, live_old));
    assert_true(exists(dir, live_new));

    char **paths;
    assert_int_equal(tly_snap_list(dir, &paths), 3);
    const int64_t want[3] = {5000, 4000, 3000};
    for (int i = 0; i < 3; i++) {
        char n13[64];
        snprintf(n13, sizeof n13, "snapshot-%013lld.tly", (long long)want[i]);
        char *p = path_in(dir, n13);
        assert_string_equal(paths[i], p);
        free(p);
    }
    assert_null(paths[3]);
    tly_snap_list_free(paths);

    char *names = dir_names(dir);
    char expect[512];
    snprintf(expect, sizeof expect,
             ".tmp-1-0.tly\n%s\nnotes.txt\nsnapshot-0000000003000.tly\n"
             "snapshot-0000000004000.tly\nsnapshot-0000000005000.tly\nsnapshot-abc.tly\n",
             live_new);
    assert_string_equal(names, expect);
    free(names);

    /* nothing more to do */
    assert_int_equal(tly_snap_prune(dir, 3, INT64_MAX), 0);
    /* a file named later than the snapshot just written (4000 here) is
     * neither kept in its place nor deleted */
    touch(dir, "snapshot-9999999999999.tly");
    assert_int_equal(tly_snap_prune(dir, 1, 4000), 1); /* 3000 */
    assert_true(exists(dir, "snapshot-0000000004000.tly"));
    assert_true(exists(dir, "snapshot-0000000005000.tly"));
    assert_true(exists(dir, "snapshot-9999999999999.tly"));
    assert_false(exists(dir, "snapshot-0000000003000.tly"));
    /* keep 0 deletes every snapshot, and the live writer's temp file now
     * older than the newest snapshot seen (9999999999999) */
    assert_int_equal(tly_snap_prune(dir, 0, INT64_MAX), 4);
    assert_false(exists(dir, live_new));
    assert_int_equal(tly_snap_list(dir, &paths), 0);
    assert_null(paths[0]);
    tly_snap_list_free(paths);

    char *missing = path_in(dir, "missing");
    assert_int_equal(tly_snap_prune(missing, 1, INT64_MAX), 0);
    assert_int_equal(tly_snap_list(missing, &paths), 0);
    assert_null(paths[0]);
    tly_snap_list_free(paths);
    tly_snap_list_free(NULL);
    free(missing);
}

static void test_abort_leaves_nothing_commit_leaves_only_the_final_file(void **state)
{
    const char *dir = *state;
    char err[512];
    tly_snapw_t *w = tly_snapw_open(dir, 77, 1, err, sizeof err);
    assert_non_null(w);
    char tmp[128];
    snprintf(tmp, sizeof tmp, ".tmp-77-%ld.tly\n", (long)getpid());
    char *names = dir_names(dir);
    assert_string_equal(names, tmp);
    free(names);
    assert_int_equal(tly_snapw_block(w, 1, "abc", 3, err, sizeof err), TLY_OK);
    tly_snapw_abort(w);
    tly_snapw_abort(NULL);
    names = dir_names(dir);
    assert_string_equal(names, "");
    free(names);

    w = tly_snapw_open(dir, 78, 1, err, sizeof err);
    assert_non_null(w);
    assert_int_equal(tly_snapw_block(w, 1, "abc", 3, err, sizeof err), TLY_OK);
    assert_int_equal(tly_snapw_commit(w, NULL, 0, err, sizeof err), TLY_OK);
    names = dir_names(dir);
    assert_string_equal(names, "snapshot-0000000000078.tly\n");
    free(names);

    /* a negative time, and a directory path that is a file */
    assert_null(tly_snapw_open(dir, -1, 1, err, sizeof err));
    assert_non_null(strstr(err, "negative"));
    char *file = path_in(dir, "snapshot-0000000000078.tly");
    assert_null(tly_snapw_open(file, 1, 1, err, sizeof err));
    assert_non_null(strstr(err, file));
    free(file);
}

/* Raises or lowers CAP_DAC_OVERRIDE in the calling thread's effective set
 * (kept in its permitted set, so it can be raised again): without it, even
 * root meets a directory's permission bits. False if the kernel refuses. */
static bool dac_override(bool on)
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[_LINUX_CAPABILITY_U32S_3];
    if (syscall(SYS_capget, &h, d) != 0)
        return false;
    uint32_t bit = UINT32_C(1) << CAP_DAC_OVERRIDE;
    d[0].effective = on ? d[0].effective | bit : d[0].effective & ~bit;
    return syscall(SYS_capset, &h, d) == 0;
}

static void test_commit_into_unwritable_dir_fails_and_keeps_previous(void **state)
{
    const char *dir = *state;
    /* root ignores directory permissions unless it lowers CAP_DAC_OVERRIDE */
    bool as_root = geteuid() == 0;
    if (as_root && !dac_override(false))
        skip();
    uint8_t data[500];
    rng_state = 0x5eed0005;
    fill_random(data, sizeof data);
    block_t b = {3, sizeof data, data};
    char *prev = write_snapshot(dir, 100, 9, &b, 1);

    char err[512];
    tly_snapw_t *w = tly_snapw_open(dir, 200, 9, err, sizeof err);
    assert_non_null(w);
    assert_int_equal(tly_snapw_block(w, 3, data, sizeof data, err, sizeof err), TLY_OK);
    assert_int_equal(chmod(dir, 0500), 0);
    char path[4096] = "untouched";
    assert_int_equal(tly_snapw_commit(w, path, sizeof path, err, sizeof err), TLY_E_IO);
    assert_string_equal(path, "untouched");
    assert_non_null(strstr(err, "Permission denied"));
    assert_non_null(strstr(err, "snapshot-0000000000200.tly"));
    /* the temp file could not be removed either (that needs a writable
     * directory) and the sentence says so */
    assert_non_null(strstr(err, "temp file could not be removed"));

    /* nor can a new snapshot start */
    assert_null(tly_snapw_open(dir, 300, 9, err, sizeof err));
    assert_non_null(strstr(err, "Permission denied"));
    assert_int_equal(chmod(dir, 0700), 0);
    if (as_root)
        assert_true(dac_override(true));

    assert_int_equal(read_outcome(prev, &b, 1, err, sizeof err), READ_OK);
    char **paths;
    assert_int_equal(tly_snap_list(dir, &paths), 1);
    assert_string_equal(paths[0], prev);
    tly_snap_list_free(paths);
    free(prev);
}

static void test_enospc_on_a_block_write_then_abort_keeps_previous_and_next_succeeds(void **state)
{
    const char *dir = *state;
    block_t b[2];
    rng_state = 0x5eed0006;
    for (int i = 0; i < 2; i++) {
        b[i] = (block_t){(uint32_t)i + 1, 4000, malloc(4000)};
        fill_random(b[i].data, 4000);
    }
    char *prev = write_snapshot(dir, 100, 1, b, 2);
    char err[512];

    /* write 1 is the header, write 2 the first block */
    hook_set(2, ENOSPC, 0, 0);
    tly_snapw_t *w = tly_snapw_open(dir, 200, 1, err, sizeof err);
    assert_non_null(w);
    assert_int_equal(tly_snapw_block(w, 1, b[0].data, b[0].len, err, sizeof err), TLY_E_IO);
    assert_non_null(strstr(err, "No space left on device"));
    assert_non_null(strstr(err, ".tmp-200-"));
    /* a failed writer refuses more blocks and a commit */
    assert_int_equal(tly_snapw_block(w, 1, b[0].data, b[0].len, err, sizeof err), TLY_E_IO);
    tly_snapw_abort(w);
    char *names = dir_names(dir);
    assert_string_equal(names, "snapshot-0000000000100.tly\n");
    free(names);

    /* ENOSPC on the header: open fails and leaves nothing */
    hook_set(1, ENOSPC, 0, 0);
    assert_null(tly_snapw_open(dir, 201, 1, err, sizeof err));
    assert_non_null(strstr(err, "No space left on device"));
    names = dir_names(dir);
    assert_string_equal(names, "snapshot-0000000000100.tly\n");
    free(names);

    snapfile_set_write_hook(NULL);

    assert_int_equal(read_outcome(prev, b, 2, err, sizeof err), READ_OK);
    char *next = write_snapshot(dir, 300, 1, b, 2);
    assert_int_equal(read_outcome(next, b, 2, err, sizeof err), READ_OK);
    char **paths;
    assert_int_equal(tly_snap_list(dir, &paths), 2);
    assert_string_equal(paths[0], next);
    assert_string_equal(paths[1], prev);
    tly_snap_list_free(paths);
    free(next);
    free(prev);
    free_blocks(b, 2);
}

static void test_eio_on_the_end_block_fails_commit_and_removes_the_temp(void **state)
{
    const char *dir = *state;
    uint8_t data[64] = {1, 2, 3};
    block_t b = {1, sizeof data, data};
    char *prev = write_snapshot(dir, 100, 1, &b, 1);
    char err[512];
    hook_set(3, EIO, 0, 0); /* header, block, then the end block fails */
    tly_snapw_t *w = tly_snapw_open(dir, 200, 1, err, sizeof err);
    assert_non_null(w);
    assert_int_equal(tly_snapw_block(w, 1, data, sizeof data, err, sizeof err), TLY_OK);
    char path[4096] = "untouched";
    assert_int_equal(tly_snapw_commit(w, path, sizeof path, err, sizeof err), TLY_E_IO);
    assert_string_equal(path, "untouched");
    assert_non_null(strstr(err, "Input/output error"));
    assert_null(strstr(err, "could not be removed"));
    snapfile_set_write_hook(NULL);
    char *names = dir_names(dir);
    assert_string_equal(names, "snapshot-0000000000100.tly\n");
    free(names);
    assert_int_equal(read_outcome(prev, &b, 1, err, sizeof err), READ_OK);
    free(prev);
}

/* The fsync hook: records the path of every directory it is asked to sync
 * (from /proc/self/fd), fails the sync of fail_dir with EIO, and syncs the
 * rest. */
static char synced_dirs[8][4096];
static size_t nsynced;
static const char *fail_dir;

static int record_fsync(int fd)
{
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    struct stat st;
    if (n > 0 && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        target[n] = '\0';
        if (fail_dir != NULL && strcmp(target, fail_dir) == 0) {
            errno = EIO;
            return -1;
        }
        if (nsynced < 8)
            snprintf(synced_dirs[nsynced], sizeof synced_dirs[0], "%s", target);
        nsynced++;
    }
    return fsync(fd);
}

static void test_new_directories_are_synced_in_their_parents(void **state)
{
    char *top = realpath(*state, NULL); /* the names /proc reports */
    assert_non_null(top);
    char *n1 = path_in(top, "n1"), *n2 = path_in(top, "n1/n2");
    uint8_t data[16] = {7};
    block_t b = {1, sizeof data, data};
    char err[512] = "";

    /* the parent of n1 fails to sync: no snapshot, a sentence naming both */
    fail_dir = top;
    nsynced = 0;
    snapfile_set_fsync_hook(record_fsync);
    assert_null(tly_snapw_open(n2, 100, 1, err, sizeof err));
    char want[8192];
    snprintf(want, sizeof want, "cannot sync the directory holding %s: Input/output error", n1);
    assert_string_equal(err, want);
    struct stat st;
    assert_int_equal(stat(n1, &st), -1); /* removed, to be made again */

    /* creating n1 and n2 syncs their parents; the rename syncs n2 */
    fail_dir = NULL;
    nsynced = 0;
    free(write_snapshot(n2, 100, 1, &b, 1));
    assert_int_equal(nsynced, 3);
    assert_string_equal(synced_dirs[0], top);
    assert_string_equal(synced_dirs[1], n1);
    assert_string_equal(synced_dirs[2], n2);

    /* into the existing directory: only the rename's sync */
    nsynced = 0;
    free(write_snapshot(n2, 200, 1, &b, 1));
    assert_int_equal(nsynced, 1);
    assert_string_equal(synced_dirs[0], n2);
    snapfile_set_fsync_hook(NULL);
    free(n1);
    free(n2);
    free(top);
}

static ssize_t write_nothing(int fd, const void *buf, size_t n)
{
    (void)fd;
    (void)buf;
    (void)n;
    return 0;
}

static void test_short_interrupted_and_zero_writes(void **state)
{
    const char *dir = *state;
    block_t b[3];
    rng_state = 0x5eed0007;
    const size_t lens[3] = {5000, 0, 777};
    for (int i = 0; i < 3; i++) {
        b[i] = (block_t){(uint32_t)i + 1, lens[i], malloc(lens[i] + 1)};
        fill_random(b[i].data, lens[i]);
    }
    /* at most 7 bytes per call, EINTR on every third call */
    hook_set(0, 0, 7, 3);
    char *path = write_snapshot(dir, 1, 2, b, 3);
    assert_true(hook_calls > 5000 / 7);
    snapfile_set_write_hook(NULL);
    char err[512];
    assert_int_equal(read_outcome(path, b, 3, err, sizeof err), READ_OK);

    /* write(2) returning 0 forever is a full disk, not an endless loop */
    snapfile_set_write_hook(write_nothing);
    assert_null(tly_snapw_open(dir, 2, 2, err, sizeof err));
    assert_non_null(strstr(err, "No space left on device"));
    snapfile_set_write_hook(NULL);
    free(path);
    free_blocks(b, 3);
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, setup_dir, teardown_dir)
    const struct CMUnitTest tests[] = {
        T(test_crc32c_check_value_empty_incremental_and_reference),
        T(test_file_layout_matches_the_hand_encoder),
        T(test_round_trip_blocks_of_every_size_into_a_new_nested_dir),
        T(test_largest_block_round_trips_and_larger_is_refused),
        T(test_truncation_at_every_length_is_an_error),
        T(test_every_single_bit_flip_is_an_error),
        T(test_random_multi_bit_damage_is_an_error),
        T(test_crafted_files_with_valid_crcs_are_rejected),
        T(test_prune_keeps_newest_and_drops_stale_temps_list_is_newest_first),
        T(test_clean_tmp_drops_dead_and_own_writers_temps_only),
        T(test_next_name_follows_the_newest_file_when_the_clock_is_behind_it),
        T(test_abort_leaves_nothing_commit_leaves_only_the_final_file),
        T(test_commit_into_unwritable_dir_fails_and_keeps_previous),
        T(test_enospc_on_a_block_write_then_abort_keeps_previous_and_next_succeeds),
        T(test_eio_on_the_end_block_fails_commit_and_removes_the_temp),
        T(test_short_interrupted_and_zero_writes),
        T(test_new_directories_are_synced_in_their_parents),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
