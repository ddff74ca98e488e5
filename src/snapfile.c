/*
 * snapfile.c — the snapshot file format (layout in tallyd/snapfile.h):
 * CRC-32C, the writer (temp file, zstd blocks, end block, fsync, rename,
 * directory fsync), the reader that validates every byte it hands out, and
 * listing and pruning of a snapshot directory.
 *
 * Invariants:
 * - A "snapshot-*.tly" file only ever appears by rename(2) of a complete,
 *   fsynced temp file, so a crash leaves the previous snapshots and at
 *   worst a stale ".tmp-*" file that tly_snap_prune removes.
 * - The reader trusts no length it reads: each is checked against the
 *   format's limits and against the bytes left in the file before anything
 *   is allocated or read, and a block is handed out only after its crc (which
 *   covers its type and lengths) and its decompressed size have been checked.
 *
 * Threads: any, one thread per writer or reader at a time. The write hook
 * and the fsync hook (snapfile_int.h) are the file's only mutable statics and are for
 * tests.
 */
#include "tallyd/snapfile.h"
#include "tallyd/log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "snapfile_int.h"

static const char magic[8] = {'T', 'L', 'Y', 'S', 'N', 'A', 'P', '\0'};

#define END_PAYLOAD 16u /* block count u64, total raw bytes u64 */

/* Names: SNAP_PREFIX + 13 digits + SUFFIX; TMP_PREFIX + ms + '-' + pid + SUFFIX. */
#define SNAP_PREFIX "snapshot-"
#define TMP_PREFIX  ".tmp-"
#define SUFFIX      ".tly"

/* ---------------------------------------------------------------- crc32c */

/* Table for the reflected polynomial 0x82F63B78: entry i is the crc of the
 * byte i shifted through 8 rounds (the test checks it against a bitwise
 * implementation). */
static const uint32_t crc_table[256] = {
    0x00000000u, 0xF26B8303u, 0xE13B70F7u, 0x1350F3F4u, 0xC79A971Fu, 0x35F1141Cu, 0x26A1E7E8u,
    0xD4CA64EBu, 0x8AD958CFu, 0x78B2DBCCu, 0x6BE22838u, 0x9989AB3Bu, 0x4D43CFD0u, 0xBF284CD3u,
    0xAC78BF27u, 0x5E133C24u, 0x105EC76Fu, 0xE235446Cu, 0xF165B798u, 0x030E349Bu, 0xD7C45070u,
    0x25AFD373u, 0x36FF2087u, 0xC494A384u, 0x9A879FA0u, 0x68EC1CA3u, 0x7BBCEF57u, 0x89D76C54u,
    0x5D1D08BFu, 0xAF768BBCu, 0xBC267848u, 0x4E4DFB4Bu, 0x20BD8EDEu, 0xD2D60DDDu, 0xC186FE29u,
    0x33ED7D2Au, 0xE72719C1u, 0x154C9AC2u, 0x061C6936u, 0xF477EA35u, 0xAA64D611u, 0x580F5512u,
    0x4B5FA6E6u, 0xB93425E5u, 0x6DFE410Eu, 0x9F95C20Du, 0x8CC531F9u, 0x7EAEB2FAu, 0x30E349B1u,
    0xC288CAB2u, 0xD1D83946u, 0x23B3BA45u, 0xF779DEAEu, 0x05125DADu, 0x1642AE59u, 0xE4292D5Au,
    0xBA3A117Eu, 0x4851927Du, 0x5B016189u, 0xA96AE28Au, 0x7DA08661u, 0x8FCB0562u, 0x9C9BF696u,
    0x6EF07595u, 0x417B1DBCu, 0xB3109EBFu, 0xA0406D4Bu, 0x522BEE48u, 0x86E18AA3u, 0x748A09A0u,
    0x67DAFA54u, 0x95B17957u, 0xCBA24573u, 0x39C9C670u, 0x2A993584u, 0xD8F2B687u, 0x0C38D26Cu,
    0xFE53516Fu, 0xED03A29Bu, 0x1F682198u, 0x5125DAD3u, 0xA34E59D0u, 0xB01EAA24u, 0x42752927u,
    0x96BF4DCCu, 0x64D4CECFu, 0x77843D3Bu, 0x85EFBE38u, 0xDBFC821Cu, 0x2997011Fu, 0x3AC7F2EBu,
    0xC8AC71E8u, 0x1C661503u, 0xEE0D9600u, 0xFD5D65F4u, 0x0F36E6F7u, 0x61C69362u, 0x93AD1061u,
    0x80FDE395u, 0x72966096u, 0xA65C047Du, 0x5437877Eu, 0x4767748Au, 0xB50CF789u, 0xEB1FCBADu,
    0x197448AEu, 0x0A24BB5Au, 0xF84F3859u, 0x2C855CB2u, 0xDEEEDFB1u, 0xCDBE2C45u, 0x3FD5AF46u,
    0x7198540Du, 0x83F3D70Eu, 0x90A324FAu, 0x62C8A7F9u, 0xB602C312u, 0x44694011u, 0x5739B3E5u,
    0xA55230E6u, 0xFB410CC2u, 0x092A8FC1u, 0x1A7A7C35u, 0xE811FF36u, 0x3CDB9BDDu, 0xCEB018DEu,
    0xDDE0EB2Au, 0x2F8B6829u, 0x82F63B78u, 0x709DB87Bu, 0x63CD4B8Fu, 0x91A6C88Cu, 0x456CAC67u,
    0xB7072F64u, 0xA457DC90u, 0x563C5F93u, 0x082F63B7u, 0xFA44E0B4u, 0xE9141340u, 0x1B7F9043u,
    0xCFB5F4A8u, 0x3DDE77ABu, 0x2E8E845Fu, 0xDCE5075Cu, 0x92A8FC17u, 0x60C37F14u, 0x73938CE0u,
    0x81F80FE3u, 0x55326B08u, 0xA759E80Bu, 0xB4091BFFu, 0x466298FCu, 0x1871A4D8u, 0xEA1A27DBu,
    0xF94AD42Fu, 0x0B21572Cu, 0xDFEB33C7u, 0x2D80B0C4u, 0x3ED04330u, 0xCCBBC033u, 0xA24BB5A6u,
    0x502036A5u, 0x4370C551u, 0xB11B4652u, 0x65D122B9u, 0x97BAA1BAu, 0x84EA524Eu, 0x7681D14Du,
    0x2892ED69u, 0xDAF96E6Au, 0xC9A99D9Eu, 0x3BC21E9Du, 0xEF087A76u, 0x1D63F975u, 0x0E330A81u,
    0xFC588982u, 0xB21572C9u, 0x407EF1CAu, 0x532E023Eu, 0xA145813Du, 0x758FE5D6u, 0x87E466D5u,
    0x94B49521u, 0x66DF1622u, 0x38CC2A06u, 0xCAA7A905u, 0xD9F75AF1u, 0x2B9CD9F2u, 0xFF56BD19u,
    0x0D3D3E1Au, 0x1E6DCDEEu, 0xEC064EEDu, 0xC38D26C4u, 0x31E6A5C7u, 0x22B65633u, 0xD0DDD530u,
    0x0417B1DBu, 0xF67C32D8u, 0xE52CC12Cu, 0x1747422Fu, 0x49547E0Bu, 0xBB3FFD08u, 0xA86F0EFCu,
    0x5A048DFFu, 0x8ECEE914u, 0x7CA56A17u, 0x6FF599E3u, 0x9D9E1AE0u, 0xD3D3E1ABu, 0x21B862A8u,
    0x32E8915Cu, 0xC083125Fu, 0x144976B4u, 0xE622F5B7u, 0xF5720643u, 0x07198540u, 0x590AB964u,
    0xAB613A67u, 0xB831C993u, 0x4A5A4A90u, 0x9E902E7Bu, 0x6CFBAD78u, 0x7FAB5E8Cu, 0x8DC0DD8Fu,
    0xE330A81Au, 0x115B2B19u, 0x020BD8EDu, 0xF0605BEEu, 0x24AA3F05u, 0xD6C1BC06u, 0xC5914FF2u,
    0x37FACCF1u, 0x69E9F0D5u, 0x9B8273D6u, 0x88D28022u, 0x7AB90321u, 0xAE7367CAu, 0x5C18E4C9u,
    0x4F48173Du, 0xBD23943Eu, 0xF36E6F75u, 0x0105EC76u, 0x12551F82u, 0xE03E9C81u, 0x34F4F86Au,
    0xC69F7B69u, 0xD5CF889Du, 0x27A40B9Eu, 0x79B737BAu, 0x8BDCB4B9u, 0x988C474Du, 0x6AE7C44Eu,
    0xBE2DA0A5u, 0x4C4623A6u, 0x5F16D052u, 0xAD7D5351u,
};

uint32_t tly_crc32c(uint32_t crc, const void *p, size_t n)
{
    const uint8_t *b = p;
    crc = ~crc;
    for (size_t i = 0; i < n; i++)
        crc = crc_table[(crc ^ b[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* --------------------------------------------------------------- helpers */

static ssize_t (*write_fn)(int, const void *, size_t) = write;
static int (*fsync_fn)(int) = fsync;

void snapfile_set_write_hook(snapfile_write_cb fn)
{
    write_fn = fn != NULL ? fn : write;
}

void snapfile_set_fsync_hook(snapfile_fsync_cb fn)
{
    fsync_fn = fn != NULL ? fn : fsync;
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

static char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    return memcpy(tly_xrealloc(NULL, n), s, n);
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Writes all of p[0..n) to fd, retrying on EINTR and short writes. Returns
 * 0, or -1 with errno set (ENOSPC when write returns 0). */
static int write_all(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t k = write_fn(fd, b, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0) {
            errno = ENOSPC;
            return -1;
        }
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Reads up to n bytes, retrying on EINTR and short reads. Returns the count
 * read (less than n only at end of file), or -1 with errno set. */
static ssize_t read_full(int fd, void *p, size_t n)
{
    uint8_t *b = p;
    size_t got = 0;
    while (got < n) {
        ssize_t k = read(fd, b + got, n - got);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0)
            break;
        got += (size_t)k;
    }
    return (ssize_t)got;
}

/* fsyncs the directory so a rename, unlink or mkdir in it is durable. */
static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync_fn(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* mkdir -p: creates dir and its missing parents (mode 0755), and syncs the
 * parent of each one it creates, so that a snapshot written into a new
 * directory does not vanish with its directory's entry after a power loss.
 * Returns 0 or -1 with a sentence. */
static int make_dirs(const char *dir, char *err, size_t errlen)
{
    if (dir[0] == '\0') {
        set_err(err, errlen, "the snapshot directory is an empty path");
        return -1;
    }
    char *path = xstrdup(dir);
    int rc = 0;
    for (char *p = path + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        if (mkdir(path, 0755) == 0) {
            /* the parent: the path up to its last '/', "/" or "." */
            char *slash = strrchr(path, '/');
            const char *parent = slash == NULL ? "." : slash == path ? "/" : path;
            if (slash != NULL && slash != path)
                *slash = '\0';
            int synced = sync_dir(parent);
            /* a parent this user may write in but not read (mode 0733)
             * cannot be opened to sync: its new entry is left to the
             * file system, as before */
            if (synced != 0 && (errno == EACCES || errno == EPERM))
                synced = 0;
            if (slash != NULL && slash != path)
                *slash = '/';
            if (synced != 0) {
                set_err(err, errlen, "cannot sync the directory holding %s: %s", path,
                        strerror(errno));
                rmdir(path); /* so that the next attempt creates and syncs it again */
                rc = -1;
                break;
            }
        } else if (errno != EEXIST) {
            set_err(err, errlen, "cannot create snapshot directory %s: %s", path, strerror(errno));
            rc = -1;
            break;
        }
        *p = c;
        if (c == '\0')
            break;
    }
    free(path);
    if (rc != 0)
        return rc;
    struct stat st;
    if (stat(dir, &st) != 0) {
        set_err(err, errlen, "snapshot directory %s: %s", dir, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        set_err(err, errlen, "snapshot directory %s: not a directory", dir);
        return -1;
    }
    return 0;
}

/* Parses s[0..n) as a decimal number without sign or leading junk. */
static bool parse_decimal(const char *s, size_t n, int64_t *out)
{
    if (n == 0 || n > 18)
        return false;
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

static bool ends_with_suffix(const char *name, size_t *stem)
{
    size_t n = strlen(name), k = strlen(SUFFIX);
    if (n < k || strcmp(name + n - k, SUFFIX) != 0)
        return false;
    *stem = n - k;
    return true;
}

/* "snapshot-<digits>.tly" -> ms. */
static bool parse_snap_name(const char *name, int64_t *ms)
{
    size_t stem, p = strlen(SNAP_PREFIX);
    if (strncmp(name, SNAP_PREFIX, p) != 0 || !ends_with_suffix(name, &stem) || stem < p)
        return false;
    return parse_decimal(name + p, stem - p, ms);
}

/* ".tmp-<digits>-<digits>.tly" -> ms, pid (> 0). */
static bool parse_tmp_name(const char *name, int64_t *ms, pid_t *pid)
{
    size_t stem, p = strlen(TMP_PREFIX);
    if (strncmp(name, TMP_PREFIX, p) != 0 || !ends_with_suffix(name, &stem) || stem < p)
        return false;
    const char *dash = memchr(name + p, '-', stem - p);
    if (dash == NULL)
        return false;
    int64_t v;
    size_t ms_len = (size_t)(dash - (name + p));
    if (!parse_decimal(name + p, ms_len, ms) ||
        !parse_decimal(dash + 1, stem - p - ms_len - 1, &v) || v <= 0 || v > INT_MAX)
        return false;
    *pid = (pid_t)v;
    return true;
}

/* ---------------------------------------------------------------- writer */

struct tly_snapw {
    int fd;
    char *dir;
    char *tmp_path;
    char *final_path;
    ZSTD_CCtx *cctx;
    uint8_t *buf; /* frame header + compressed bytes */
    size_t buf_cap;
    uint64_t blocks;
    uint64_t raw_total;
    bool failed; /* a write failed: the file is incomplete */
};

static char *path_join_fmt(const char *dir, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static char *path_join_fmt(const char *dir, const char *fmt, ...)
{
    char name[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    size_t n = strlen(dir) + 1 + strlen(name) + 1;
    char *p = tly_xrealloc(NULL, n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static void snapw_free(tly_snapw_t *w)
{
    if (w->fd >= 0)
        close(w->fd);
    ZSTD_freeCCtx(w->cctx);
    free(w->buf);
    free(w->dir);
    free(w->tmp_path);
    free(w->final_path);
    free(w);
}

/* Sends one frame (type, raw_len, already compressed payload at buf + 16)
 * to the file. */
static int write_frame(tly_snapw_t *w, uint32_t type, uint32_t raw_len, size_t comp_len)
{
    put32(w->buf, type);
    put32(w->buf + 4, raw_len);
    put32(w->buf + 8, (uint32_t)comp_len);
    uint32_t crc = tly_crc32c(0, w->buf, 12);
    put32(w->buf + 12, tly_crc32c(crc, w->buf + TLY_SNAP_FRAME_SIZE, comp_len));
    return write_all(w->fd, w->buf, TLY_SNAP_FRAME_SIZE + comp_len);
}

static void reserve(tly_snapw_t *w, size_t n)
{
    if (n > w->buf_cap) {
        w->buf = tly_xrealloc(w->buf, n);
        w->buf_cap = n;
    }
}

tly_snapw_t *tly_snapw_open(const char *dir, int64_t created_ms, uint64_t defs_hash, char *err,
                            size_t errlen)
{
    if (created_ms < 0) {
        set_err(err, errlen, "snapshot time %" PRId64 " ms is negative", created_ms);
        return NULL;
    }
    if (make_dirs(dir, err, errlen) != 0)
        return NULL;
    tly_snapw_t *w = tly_xrealloc(NULL, sizeof *w);
    *w = (tly_snapw_t){.fd = -1};
    w->dir = xstrdup(dir);
    w->tmp_path =
        path_join_fmt(dir, TMP_PREFIX "%" PRId64 "-%ld" SUFFIX, created_ms, (long)getpid());
    w->final_path = path_join_fmt(dir, SNAP_PREFIX "%013" PRId64 SUFFIX, created_ms);
    w->cctx = ZSTD_createCCtx();
    if (w->cctx == NULL) {
        fprintf(stderr, "tallyd: out of memory creating a zstd context\n");
        abort();
    }
    w->fd = open(w->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        set_err(err, errlen, "cannot create snapshot file %s: %s", w->tmp_path, strerror(errno));
        snapw_free(w);
        return NULL;
    }
    uint8_t h[TLY_SNAP_HEADER_SIZE];
    memcpy(h, magic, 8);
    put32(h + 8, TLY_SNAP_VERSION);
    put64(h + 12, defs_hash);
    put64(h + 20, (uint64_t)created_ms);
    put32(h + 28, tly_crc32c(0, h, 28));
    if (write_all(w->fd, h, sizeof h) != 0) {
        set_err(err, errlen, "cannot write snapshot file %s: %s", w->tmp_path, strerror(errno));
        tly_snapw_abort(w);
        return NULL;
    }
    return w;
}

tly_err_t tly_snapw_block(tly_snapw_t *w, uint32_t type, const void *data, size_t len, char *err,
                          size_t errlen)
{
    if (w->failed) {
        set_err(err, errlen, "snapshot file %s: an earlier write failed", w->tmp_path);
        return TLY_E_IO;
    }
    if (type == 0) {
        set_err(err, errlen, "snapshot block type 0 is reserved for the end block");
        return TLY_E_INVAL;
    }
    if (len > TLY_SNAP_MAX_RAW) {
        set_err(err, errlen, "snapshot block of %zu bytes exceeds the limit of %u bytes", len,
                TLY_SNAP_MAX_RAW);
        return TLY_E_RANGE;
    }
    size_t bound = ZSTD_compressBound(len);
    reserve(w, TLY_SNAP_FRAME_SIZE + bound);
    size_t comp = ZSTD_compressCCtx(w->cctx, w->buf + TLY_SNAP_FRAME_SIZE, bound,
                                    len != 0 ? data : "", len, 1);
    if (ZSTD_isError(comp)) {
        w->failed = true;
        set_err(err, errlen, "snapshot file %s: zstd: %s", w->tmp_path, ZSTD_getErrorName(comp));
        return TLY_E_IO;
    }
    if (write_frame(w, type, (uint32_t)len, comp) != 0) {
        w->failed = true;
        set_err(err, errlen, "cannot write snapshot file %s: %s", w->tmp_path, strerror(errno));
        return TLY_E_IO;
    }
    w->blocks++;
    w->raw_total += len;
    return TLY_OK;
}

tly_err_t tly_snapw_commit(tly_snapw_t *w, char *path_out, size_t cap, char *err, size_t errlen)
{
    tly_err_t rc = TLY_E_IO;
    bool renamed = false;
    if (w->failed) {
        set_err(err, errlen, "snapshot file %s: an earlier write failed", w->tmp_path);
        goto out;
    }
    reserve(w, TLY_SNAP_FRAME_SIZE + END_PAYLOAD);
    put64(w->buf + TLY_SNAP_FRAME_SIZE, w->blocks);
    put64(w->buf + TLY_SNAP_FRAME_SIZE + 8, w->raw_total);
    if (write_frame(w, 0, END_PAYLOAD, END_PAYLOAD) != 0) {
        set_err(err, errlen, "cannot write snapshot file %s: %s", w->tmp_path, strerror(errno));
        goto out;
    }
    if (fsync_fn(w->fd) != 0) {
        set_err(err, errlen, "cannot sync snapshot file %s: %s", w->tmp_path, strerror(errno));
        goto out;
    }
    int fd = w->fd;
    w->fd = -1;
    if (close(fd) != 0) {
        set_err(err, errlen, "cannot close snapshot file %s: %s", w->tmp_path, strerror(errno));
        goto out;
    }
    if (rename(w->tmp_path, w->final_path) != 0) {
        set_err(err, errlen, "cannot rename %s to %s: %s", w->tmp_path, w->final_path,
                strerror(errno));
        goto out;
    }
    renamed = true;
    /* The file is complete under its final name; only its name's durability
     * depends on this. Reported as a failure, but the file stays: it is whole
     * and readable, and removing it now could lose the only good snapshot. */
    if (sync_dir(w->dir) != 0) {
        set_err(err, errlen, "cannot sync snapshot directory %s: %s", w->dir, strerror(errno));
        goto out;
    }
    if (path_out != NULL && cap > 0)
        snprintf(path_out, cap, "%s", w->final_path);
    rc = TLY_OK;
out:
    if (rc != TLY_OK && !renamed && unlink(w->tmp_path) != 0 && errno != ENOENT && err != NULL &&
        errlen > 0) {
        size_t used = strlen(err);
        snprintf(err + used, errlen - used, " (and the temp file could not be removed: %s)",
                 strerror(errno));
    }
    snapw_free(w);
    return rc;
}

void tly_snapw_abort(tly_snapw_t *w)
{
    if (w == NULL)
        return;
    unlink(w->tmp_path);
    snapw_free(w);
}

/* ----------------------------------------------------------- dir listing */

typedef struct {
    int64_t ms;
    char *name;
} snap_entry_t;

static int by_ms_desc(const void *a, const void *b)
{
    const snap_entry_t *x = a, *y = b;
    if (x->ms != y->ms)
        return x->ms < y->ms ? 1 : -1;
    return -strcmp(x->name, y->name); /* same ms, different zero padding */
}

/* Collects dir's snapshot files, newest first. Returns the count (0 when the
 * directory cannot be read); *out is malloc'd, entries' names too. */
static size_t scan_snapshots(const char *dir, snap_entry_t **out)
{
    *out = NULL;
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    size_t n = 0, cap = 0;
    snap_entry_t *v = NULL;
    const struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        int64_t ms;
        if (!parse_snap_name(de->d_name, &ms))
            continue;
        if (n == cap) {
            cap = cap != 0 ? 2 * cap : 16;
            v = tly_xrealloc(v, cap * sizeof *v);
        }
        v[n++] = (snap_entry_t){ms, xstrdup(de->d_name)};
    }
    closedir(d);
    if (n > 1)
        qsort(v, n, sizeof *v, by_ms_desc);
    *out = v;
    return n;
}

int64_t tly_snap_next_ms(const char *dir, int64_t now_ms)
{
    snap_entry_t *v;
    size_t n = scan_snapshots(dir, &v);
    int64_t next = now_ms;
    if (n > 0 && v[0].ms >= now_ms)
        next = v[0].ms < INT64_MAX ? v[0].ms + 1 : INT64_MAX;
    for (size_t i = 0; i < n; i++)
        free(v[i].name);
    free(v);
    return next;
}

size_t tly_snap_list(const char *dir, char ***paths)
{
    snap_entry_t *v;
    size_t n = scan_snapshots(dir, &v);
    char **p = tly_xrealloc(NULL, (n + 1) * sizeof *p);
    for (size_t i = 0; i < n; i++) {
        p[i] = path_join_fmt(dir, "%s", v[i].name);
        free(v[i].name);
    }
    p[n] = NULL;
    free(v);
    *paths = p;
    return n;
}

void tly_snap_list_free(char **paths)
{
    if (paths == NULL)
        return;
    for (char **p = paths; *p != NULL; p++)
        free(*p);
    free(paths);
}

/* Whether pid is this process or one of its threads. */
static bool own_pid(pid_t pid)
{
    if (pid == getpid())
        return true;
    char task[64];
    snprintf(task, sizeof task, "/proc/self/task/%ld", (long)pid);
    return access(task, F_OK) == 0;
}

/* Deletes dir's temp files named before before_ms, or whose writer pid is
 * gone (kill(pid, 0) fails with ESRCH), or (own) is this process or one of
 * its threads. Returns how many; the caller syncs dir. */
static size_t remove_tmps(const char *dir, int64_t before_ms, bool own)
{
    size_t deleted = 0;
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    const struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        int64_t ms;
        pid_t pid;
        if (!parse_tmp_name(de->d_name, &ms, &pid))
            continue;
        if (ms >= before_ms && !(kill(pid, 0) != 0 && errno == ESRCH) && !(own && own_pid(pid)))
            continue; /* a live writer's */
        /* unlinking the current entry during readdir is allowed (POSIX
         * leaves only whether later-added entries show up unspecified) */
        char *p = path_join_fmt(dir, "%s", de->d_name);
        if (unlink(p) == 0)
            deleted++;
        free(p);
    }
    closedir(d);
    return deleted;
}

size_t tly_snap_prune(const char *dir, size_t keep, int64_t upto_ms)
{
    size_t deleted = 0;
    snap_entry_t *v;
    size_t n = scan_snapshots(dir, &v);
    size_t first = 0; /* v is newest first: skip the names after upto_ms */
    while (first < n && v[first].ms > upto_ms)
        first++;
    int64_t newest = first < n ? v[first].ms : INT64_MIN;
    for (size_t i = 0; i < n; i++) {
        if (i >= first + keep) {
            char *p = path_join_fmt(dir, "%s", v[i].name);
            if (unlink(p) == 0)
                deleted++;
            free(p);
        }
        free(v[i].name);
    }
    free(v);
    deleted += remove_tmps(dir, newest, false);
    if (deleted > 0)
        sync_dir(dir);
    return deleted;
}

size_t tly_snap_clean_tmp(const char *dir)
{
    size_t deleted = remove_tmps(dir, INT64_MIN, true);
    if (deleted > 0)
        sync_dir(dir);
    return deleted;
}

/* ---------------------------------------------------------------- reader */

struct tly_snapr {
    int fd;
    char *path;
    uint64_t defs_hash;
    int64_t created_ms;
    uint64_t offset; /* of the next frame */
    uint64_t size;   /* of the file at open */
    uint64_t blocks;
    uint64_t raw_total;
    ZSTD_DCtx *dctx;
    uint8_t *comp;
    size_t comp_cap;
    uint8_t *raw;
    size_t raw_cap;
    int state;  /* 1 reading, 0 ended well, -1 failed */
    char *fail; /* the sentence of the failure, repeated by later calls */
};

tly_snapr_t *tly_snapr_open(const char *path, char *err, size_t errlen)
{
    /* O_NONBLOCK: a FIFO (or device) of that name must not block the open;
     * only a regular file is read */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        set_err(err, errlen, "cannot open snapshot %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    uint8_t h[TLY_SNAP_HEADER_SIZE];
    if (fstat(fd, &st) != 0) {
        set_err(err, errlen, "cannot read snapshot %s: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        set_err(err, errlen, "%s: not a regular file", path);
        goto fail;
    }
    ssize_t got = read_full(fd, h, sizeof h);
    if (got < 0) {
        set_err(err, errlen, "cannot read snapshot %s: %s", path, strerror(errno));
        goto fail;
    }
    if (memcmp(h, magic, (size_t)got < 8 ? (size_t)got : 8) != 0) {
        set_err(err, errlen, "%s: not a tallyd snapshot", path);
        goto fail;
    }
    if ((size_t)got < sizeof h) {
        set_err(err, errlen, "%s: truncated header (%zd of %u bytes)", path, got,
                TLY_SNAP_HEADER_SIZE);
        goto fail;
    }
    /* The version before the crc: a later format may lay out the rest of the
     * header differently, and "version N" is the useful sentence then. */
    uint32_t version = get32(h + 8);
    if (version < TLY_SNAP_VERSION_MIN || version > TLY_SNAP_VERSION) {
        set_err(err, errlen, "%s: format version %" PRIu32 ", this tallyd reads %u to %u", path,
                version, TLY_SNAP_VERSION_MIN, TLY_SNAP_VERSION);
        goto fail;
    }
    if (tly_crc32c(0, h, 28) != get32(h + 28)) {
        set_err(err, errlen, "%s: header checksum mismatch", path);
        goto fail;
    }
    tly_snapr_t *r = tly_xrealloc(NULL, sizeof *r);
    *r = (tly_snapr_t){.fd = fd, .state = 1};
    r->path = xstrdup(path);
    r->defs_hash = get64(h + 12);
    r->created_ms = (int64_t)get64(h + 20);
    r->offset = TLY_SNAP_HEADER_SIZE;
    r->size = (uint64_t)st.st_size;
    return r;
fail:
    close(fd);
    return NULL;
}

uint64_t tly_snapr_defs_hash(const tly_snapr_t *r)
{
    return r->defs_hash;
}

int64_t tly_snapr_created(const tly_snapr_t *r)
{
    return r->created_ms;
}

static int reader_fail(tly_snapr_t *r, char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Records the failure sentence (prefixed with the path and the frame's
 * offset) and returns -1. */
static int reader_fail(tly_snapr_t *r, char *err, size_t errlen, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t n = strlen(r->path) + strlen(msg) + 64;
    r->fail = tly_xrealloc(NULL, n);
    snprintf(r->fail, n, "%s: block at offset %" PRIu64 ": %s", r->path, r->offset, msg);
    r->state = -1;
    set_err(err, errlen, "%s", r->fail);
    return -1;
}

/* Reads the end block's payload and checks the totals and that nothing
 * follows. */
static int read_end(tly_snapr_t *r, const uint8_t *f, char *err, size_t errlen)
{
    uint32_t raw_len = get32(f + 4), comp_len = get32(f + 8);
    if (raw_len != END_PAYLOAD || comp_len != END_PAYLOAD)
        return reader_fail(r, err, errlen, "end block lengths %" PRIu32 "/%" PRIu32 ", not %u",
                           raw_len, comp_len, END_PAYLOAD);
    uint8_t p[END_PAYLOAD + 1];
    ssize_t got = read_full(r->fd, p, sizeof p);
    if (got < 0)
        return reader_fail(r, err, errlen, "%s", strerror(errno));
    if ((size_t)got < END_PAYLOAD)
        return reader_fail(r, err, errlen, "truncated end block");
    if (tly_crc32c(tly_crc32c(0, f, 12), p, END_PAYLOAD) != get32(f + 12))
        return reader_fail(r, err, errlen, "end block checksum mismatch");
    uint64_t blocks = get64(p), raw_total = get64(p + 8);
    if (blocks != r->blocks || raw_total != r->raw_total)
        return reader_fail(r, err, errlen,
                           "end block counts %" PRIu64 " blocks and %" PRIu64
                           " bytes, the file held %" PRIu64 " and %" PRIu64,
                           blocks, raw_total, r->blocks, r->raw_total);
    if ((size_t)got > END_PAYLOAD)
        return reader_fail(r, err, errlen, "data after the end block");
    r->state = 0;
    return 0;
}

int tly_snapr_next(tly_snapr_t *r, uint32_t *type, const void **data, size_t *len, char *err,
                   size_t errlen)
{
    if (r->state <= 0) {
        if (r->state < 0)
            set_err(err, errlen, "%s", r->fail);
        return r->state;
    }
    uint8_t f[TLY_SNAP_FRAME_SIZE];
    ssize_t got = read_full(r->fd, f, sizeof f);
    if (got < 0)
        return reader_fail(r, err, errlen, "%s", strerror(errno));
    if (got == 0)
        return reader_fail(r, err, errlen, "file ends without an end block (truncated?)");
    if ((size_t)got < sizeof f)
        return reader_fail(r, err, errlen, "truncated block frame (%zd of %u bytes)", got,
                           TLY_SNAP_FRAME_SIZE);
    uint32_t t = get32(f), raw_len = get32(f + 4), comp_len = get32(f + 8);
    if (t == 0)
        return read_end(r, f, err, errlen);
    if (raw_len > TLY_SNAP_MAX_RAW)
        return reader_fail(r, err, errlen, "raw length %" PRIu32 " exceeds the limit of %u",
                           raw_len, TLY_SNAP_MAX_RAW);
    /* Bound the allocation by what the file can hold, not by what it says. */
    uint64_t left = r->size - (r->offset + TLY_SNAP_FRAME_SIZE);
    if (r->offset + TLY_SNAP_FRAME_SIZE > r->size || comp_len > left)
        return reader_fail(r, err, errlen,
                           "compressed length %" PRIu32 " runs past the end of the file", comp_len);
    if (comp_len > ZSTD_compressBound(raw_len))
        return reader_fail(r, err, errlen,
                           "compressed length %" PRIu32 " too large for raw length %" PRIu32,
                           comp_len, raw_len);
    if (comp_len > r->comp_cap) {
        r->comp = tly_xrealloc(r->comp, comp_len);
        r->comp_cap = comp_len;
    }
    got = read_full(r->fd, r->comp, comp_len);
    if (got < 0)
        return reader_fail(r, err, errlen, "%s", strerror(errno));
    if ((size_t)got < comp_len)
        return reader_fail(r, err, errlen, "truncated block (%zd of %" PRIu32 " bytes)", got,
                           comp_len);
    if (tly_crc32c(tly_crc32c(0, f, 12), r->comp, comp_len) != get32(f + 12))
        return reader_fail(r, err, errlen, "block checksum mismatch");
    /* The crc is not a signature: still check that the payload is exactly
     * one zstd frame of the announced size before decompressing. */
    if (ZSTD_findFrameCompressedSize(r->comp, comp_len) != comp_len ||
        ZSTD_getFrameContentSize(r->comp, comp_len) != raw_len)
        return reader_fail(r, err, errlen, "block is not one zstd frame of %" PRIu32 " bytes",
                           raw_len);
    if (r->dctx == NULL && (r->dctx = ZSTD_createDCtx()) == NULL) {
        fprintf(stderr, "tallyd: out of memory creating a zstd context\n");
        abort();
    }
    if (raw_len > r->raw_cap || r->raw == NULL) { /* never NULL, even for 0 bytes */
        r->raw = tly_xrealloc(r->raw, raw_len);
        r->raw_cap = raw_len;
    }
    size_t n = ZSTD_decompressDCtx(r->dctx, r->raw, raw_len, r->comp, comp_len);
    if (ZSTD_isError(n))
        return reader_fail(r, err, errlen, "zstd: %s", ZSTD_getErrorName(n));
    if (n != raw_len)
        return reader_fail(r, err, errlen, "decompressed to %zu bytes, the frame says %" PRIu32, n,
                           raw_len);
    r->offset += TLY_SNAP_FRAME_SIZE + comp_len;
    r->blocks++;
    r->raw_total += raw_len;
    *type = t;
    *data = r->raw;
    *len = raw_len;
    return 1;
}

void tly_snapr_close(tly_snapr_t *r)
{
    if (r == NULL)
        return;
    close(r->fd);
    ZSTD_freeDCtx(r->dctx);
    free(r->comp);
    free(r->raw);
    free(r->path);
    free(r->fail);
    free(r);
}
