/*
 * decode.c — JSON event payloads → tly_event_t (see decode.h).
 *
 * One pass over the payload checks it against the JSON grammar (RFC 8259):
 * structure, separators, number and literal syntax, string escapes and
 * UTF-8. The same pass extracts the top-level members whose key is a
 * referenced field. (It replaced jsmn plus a second walk over jsmn's tokens:
 * jsmn is lenient, so every byte had to be checked again; one pass costs
 * less than jsmn alone. bench/README.md has both figures.) Plain keys and
 * string values of at most fifteen bytes, the usual kind, are read a word
 * or two at a time.
 *
 * Shapes: a producer writes its events alike (the same keys in the same
 * order, the same spacing), so a decoder keeps the bytes between the values
 * of a few accepted events (shape_t) and reads a payload that has those
 * bytes by comparing them and scanning the values alone, with the same
 * checks and extraction as the walk. Those bytes came from a payload the
 * walk accepted, so one that matches them is what the walk would have read,
 * member for member; anything else (a byte off, a value of another kind)
 * goes to the walk from the start.
 *
 * Rejection precedence, so that each payload has exactly one reason:
 * EV_TOO_LARGE, then the first of EV_TOO_COMPLEX (the 257th token: each
 * object, array, key and value is one) and EV_BAD_JSON (a grammar error) met
 * reading left to right, then EV_NOT_OBJECT, then the first field error in
 * document order (EV_WRONG_TYPE, EV_VALUE_TOO_LONG, or EV_BAD_TIME for the
 * time field), then EV_MISSING_TIME / EV_BAD_TIME.
 *
 * Decisions (README material):
 *  - Strings must be valid UTF-8 (no overlongs, no surrogates, ≤ U+10FFFF);
 *    \uXXXX escapes decode to UTF-8, a lone surrogate escape is invalid.
 *  - A JSON null is an absent field (TLY_V_NIL); a null time is missing.
 *  - A referenced key whose value is wrong in itself (an object or array,
 *    EV_WRONG_TYPE; a string over max_string, EV_VALUE_TOO_LONG; a number
 *    beyond double range, EV_WRONG_TYPE; EV_BAD_TIME for each when it is the
 *    time field) rejects the event even if a later duplicate of the key would
 *    be fine; otherwise the last duplicate wins, and the time unit's rules
 *    (below) judge only the last time value.
 *  - A number that overflows a double (1e999) in a referenced field is
 *    EV_WRONG_TYPE: it has no finite value to count.
 *  - events.max_string counts decoded bytes. A key written with escapes
 *    ("us\u0065r_id") matches the field it spells.
 *  - The time field: any rejection of its value is EV_BAD_TIME. Numeric times
 *    are converted exactly from the decimal text, never through binary
 *    floating point, so 1700000000.123 s is 1700000000123 ms; seconds round
 *    down to the millisecond; milliseconds must be whole (1.7e12 is fine,
 *    1.5 is not). Plausible times are [1970-01-01, 2101-01-01) UTC.
 *  - A UTF-8 byte-order mark that opens the payload is skipped (RFC 8259
 *    §8.1 lets a parser ignore it); anywhere else it is an error.
 *  - Doubles are parsed with strtod, which follows LC_NUMERIC: the daemon must
 *    keep the "C" numeric locale.
 *
 * Threads: a decoder is used by one thread at a time (its scratch is per
 * call); the featset it borrows is read only.
 *
 * Memory invariant: the scratch buffer holds at least len + 1 bytes for a
 * payload of len bytes. Decoded strings are never longer than their raw text
 * and every string or number is decoded at most once per member, so the bytes
 * committed to scratch plus one temporary (a key or a number being parsed)
 * never exceed len + 1; each write is bounds-checked anyway.
 */
#include "tallyd/decode.h"

#include "bytes_int.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The word-at-a-time readers (head_word, digits8, string_run, short_string)
 * need a little-endian host; elsewhere, or when built with TLY_PORTABLE (as
 * `make test` builds one copy of test_decode, so that they are tested on
 * every host), bytes are read one at a time. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && !defined(TLY_PORTABLE)
#define DECODE_WORDS 1
#else
#define DECODE_WORDS 0
#endif

/* 2101-01-01T00:00:00Z: 131 years after 1970, 32 of them leap (1972…2096). */
#define TIME_MAX_MS (INT64_C(47847) * 86400000)

/* A value's length is kept in 32 bits (tly_value_t.len). */
#define DECODE_MAX_LEN ((size_t)INT_MAX - 1)

/* Open-addressing table of field ids by key name; at most 64 fields, so a
 * quarter full at worst and a miss almost always costs one probe. */
#define FIELD_SLOTS 256u

/* Shapes: the bytes between the values of an event that was accepted,
 * kept so that the next events of that shape (a producer writes every
 * event the same way: keys in one order, the same spacing) are read by
 * comparing those bytes and scanning only the values. Members whose value
 * is a number or a string only; at most SHAPE_MEMBERS of them. */
#define SHAPES           4
#define SHAPE_MEMBERS    16
#define SHAPE_BYTES      480 /* a shape's bytes between values, at most */
#define SHAPE_LEARN_RATE 16  /* of the events no shape reads, one teaches one */

typedef struct {
    uint32_t nmem;
    uint16_t pre_off[SHAPE_MEMBERS + 1]; /* member i's bytes before its value; */
    uint8_t pre_len[SHAPE_MEMBERS + 1];  /* [nmem]: the bytes after the last */
    int8_t fid[SHAPE_MEMBERS];           /* the field its key names, or -1 */
    uint8_t kind[SHAPE_MEMBERS];         /* V_NUM or V_STR */
    char bytes[SHAPE_BYTES];
} shape_t;

struct tly_decoder {
    const tly_featset_t *fs;
    tly_event_rules_t rules; /* time field and limits in force (a copy) */
    uint32_t name_len[TLY_MAX_FIELDS];
    uint64_t name_head[TLY_MAX_FIELDS]; /* head_word() of each name */
    uint8_t slot[FIELD_SLOTS]; /* field id + 1; 0 = empty */
    char *scratch;             /* decoded strings; see the memory invariant */
    size_t cap;
    size_t used;
    /* shapes learnt (see shape_t), the one read last, the next to replace,
     * and how many leading members each two have alike */
    shape_t shapes[SHAPES];
    uint32_t nshapes, last, victim;
    uint8_t alike[SHAPES][SHAPES];
    uint32_t misses; /* events no shape read */
    bool shapes_off; /* tly_decoder_set_shapes */
    uint64_t shaped; /* events a shape read */
    /* the members of the event being scanned, when it may teach a shape:
     * where each value starts and ends, its field and kind */
    uint32_t lstart[SHAPE_MEMBERS], lend[SHAPE_MEMBERS];
    int8_t lfid[SHAPE_MEMBERS];
    uint8_t lkind[SHAPE_MEMBERS];
};

/* What the scan learnt about one value. */
typedef enum { V_STR, V_NUM, V_TRUE, V_FALSE, V_NULL, V_OBJECT, V_ARRAY } vkind_t;

typedef struct {
    vkind_t kind;
    const char *p; /* a string's body (between the quotes) or a number's text */
    size_t n;
    bool escaped; /* a string holding a backslash escape */
    bool is_int;  /* a number with neither fraction nor exponent */
    bool small;   /* ... of at most 18 digits, whose magnitude is `mag` */
    uint64_t mag;
} val_t;

/* One decode call: the payload, where the scan is, and what it extracted. */
typedef struct {
    tly_decoder_t *dec;
    const char *js;
    size_t len;
    size_t pos;   /* next byte to read */
    int ntok;     /* tokens met so far */
    bool complex; /* the scan stopped at token TLY_DECODE_MAX_TOKENS + 1 */
    tly_event_t *ev;
    tly_err_t err;      /* first field error, in document order */
    const char *time_p; /* text of the last time-field value extracted, or NULL */
    size_t time_n;
    bool learn;    /* noting the top-level members for a shape */
    uint32_t nmem; /* ... how many, or SHAPE_MEMBERS + 1: not a shape */
} walk_t;

/* The first eight bytes of a key s[0..n) as a word, zero-padded when n < 8.
 * `avail` bytes may be read at s (avail >= n): with eight of them, one load
 * and a mask (little-endian: the first bytes are the low ones). */
static uint64_t head_word(const char *s, size_t n, size_t avail)
{
    uint64_t w = 0;
#if DECODE_WORDS
    if (avail >= 8) {
        memcpy(&w, s, 8);
        return n >= 8 ? w : w & ((UINT64_C(1) << (8 * n)) - 1);
    }
#else
    (void)avail;
#endif
    memcpy(&w, s, n < 8 ? n : 8);
    return w;
}

/* Slot hash of a key: its head word and its length. Keys that share both
 * collide, which costs a probe, never a wrong match. */
static uint32_t hash_name(uint64_t head, size_t n)
{
    return (uint32_t)(((head ^ n) * UINT64_C(0x9E3779B97F4A7C15)) >> 40);
}

/* Returns the field id named s[0..n), whose head_word() is head, or -1. */
static inline int lookup_head(const tly_decoder_t *dec, const char *s, size_t n, uint64_t head)
{
    uint32_t i = hash_name(head, n) & (FIELD_SLOTS - 1);
    for (;;) {
        unsigned id = dec->slot[i];
        if (id == 0)
            return -1;
        id--;
        if (dec->name_len[id] == n && dec->name_head[id] == head &&
            (n <= 8 || memcmp(dec->fs->fields[id] + 8, s + 8, n - 8) == 0))
            return (int)id;
        i = (i + 1) & (FIELD_SLOTS - 1);
    }
}

/* Returns the field id named s[0..n), or -1; avail as for head_word(). */
static int lookup_field(const tly_decoder_t *dec, const char *s, size_t n, size_t avail)
{
    return lookup_head(dec, s, n, head_word(s, n, avail));
}

tly_decoder_t *tly_decoder_new(const tly_featset_t *fs)
{
    if (fs == NULL) {
        fprintf(stderr, "tallyd: tly_decoder_new: invalid featset\n");
        abort();
    }
    return tly_decoder_new_rules(fs, &fs->events);
}

tly_decoder_t *tly_decoder_new_rules(const tly_featset_t *fs, const tly_event_rules_t *rules)
{
    if (fs == NULL || rules == NULL || fs->nfields > TLY_MAX_FIELDS ||
        fs->nfeat_fields > fs->nfields || rules->time_field >= (int)fs->nfields) {
        fprintf(stderr, "tallyd: tly_decoder_new: invalid featset\n");
        abort();
    }
    tly_decoder_t *dec = calloc(1, sizeof *dec);
    if (dec == NULL) {
        fprintf(stderr, "tallyd: out of memory creating a decoder\n");
        abort();
    }
    dec->fs = fs;
    dec->rules = *rules;
    for (size_t id = 0; id < fs->nfields; id++) {
        /* Another topic's time field is not this decoder's business: an
         * event carrying it must not be judged by it. */
        if (id >= fs->nfeat_fields && (int)id != rules->time_field)
            continue;
        size_t n = strlen(fs->fields[id]);
        dec->name_len[id] = (uint32_t)(n > UINT32_MAX ? UINT32_MAX : n);
        dec->name_head[id] = head_word(fs->fields[id], n, n);
        uint32_t i = hash_name(dec->name_head[id], n) & (FIELD_SLOTS - 1);
        while (dec->slot[i] != 0)
            i = (i + 1) & (FIELD_SLOTS - 1);
        dec->slot[i] = (uint8_t)(id + 1);
    }
    return dec;
}

void tly_decoder_free(tly_decoder_t *dec)
{
    if (dec == NULL)
        return;
    free(dec->scratch);
    free(dec);
}

/* --- lexical checks ----------------------------------------------------- */

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static size_t skip_ws(const char *js, size_t pos, size_t len)
{
    /* Every JSON whitespace byte is <= ' ': most calls stop at the first test. */
    while (pos < len && (unsigned char)js[pos] <= ' ' &&
           (js[pos] == ' ' || js[pos] == '\t' || js[pos] == '\n' || js[pos] == '\r'))
        pos++;
    return pos;
}

/* Reads the run of decimal digits that begins p[0..8) (eight bytes may be
 * read) and folds it into *acc: *acc * 10^k + their value. Returns k, the
 * run's length (0…8). A byte is a digit when its high nibble is 3 and adding
 * 6 keeps it so; a carry out of a byte comes only from a byte >= 0xFA, a
 * non-digit, so the lowest non-digit byte is found exactly. The digits are
 * then moved to the top of the word (as if led by zeros) and combined in
 * pairs, fours and eights. */
#if DECODE_WORDS
/* digits8 of the eight bytes x (little-endian: p[0] the lowest). */
static inline __attribute__((always_inline)) size_t digits8_word(uint64_t x, uint64_t *acc)
{
    static const uint64_t pow10[9] = {1,      10,      100,      1000,     10000,
                                      100000, 1000000, 10000000, 100000000};
    const uint64_t hi = UINT64_C(0xF0F0F0F0F0F0F0F0), threes = UINT64_C(0x3030303030303030);
    uint64_t bad = ((x & hi) ^ threes) | (((x + UINT64_C(0x0606060606060606)) & hi) ^ threes);
    size_t k = bad == 0 ? 8 : (size_t)__builtin_ctzll(bad) / 8;
    if (k == 0)
        return 0;
    uint64_t d = (x - threes) << (8 * (8 - k)); /* k < 8: the non-digits shift out */
    if (k == 8)
        d = x - threes;
    d = (d * 10 + (d >> 8)) & UINT64_C(0x00FF00FF00FF00FF);
    d = (d * 100 + (d >> 16)) & UINT64_C(0x0000FFFF0000FFFF);
    d = (d * 10000 + (d >> 32)) & UINT64_C(0x00000000FFFFFFFF);
    *acc = *acc * pow10[k] + d;
    return k;
}
#endif

static size_t digits8(const char *p, uint64_t *acc)
{
#if DECODE_WORDS
    uint64_t x;
    memcpy(&x, p, 8);
    return digits8_word(x, acc);
#else
    size_t k = 0;
    while (k < 8 && is_digit(p[k]))
        *acc = *acc * 10 + (unsigned)(p[k++] - '0');
    return k;
#endif
}

/* Scans the number at p[0..n) (it begins with '-' or a digit, or is not a
 * number; `back` bytes before p may be read too: digits near the end of
 * the payload are read by the word that ends it) and returns its length,
 * or 0 when it is malformed. The number
 * ends at the first byte that cannot continue it; what follows is the
 * caller's to check. The integer part's digits are summed on the way:
 * v->small when there are at most 18 of them (below 10^18, so the sum
 * cannot overflow), and then v->mag is their value. */
static size_t json_number_walk(const char *p, size_t n, size_t back, val_t *v);

/* json_number's usual case, inline where it is called: an integer of 1 to
 * 15 digits, the first not 0, with at least eight bytes to read after its
 * sign, read by one or two words (the second, when fewer than eight bytes
 * follow the first eight, the word that ends the payload); the number's
 * next byte must be read and must not continue it. Anything else goes to
 * json_number_walk. */
static inline __attribute__((always_inline)) size_t json_number(const char *p, size_t n,
                                                                size_t back, val_t *v)
{
#if DECODE_WORDS
    size_t sign = p[0] == '-';
    const char *q = p + sign;
    if (n >= 8 + sign && q[0] >= '1' && q[0] <= '9') {
        const size_t m = n - sign; /* bytes from q on */
        uint64_t x, acc = 0;
        memcpy(&x, q, 8);
        size_t k = digits8_word(x, &acc);
        if (k == 8 && m >= 16) {
            memcpy(&x, q + 8, 8);
            k += digits8_word(x, &acc);
        } else if (k == 8) {
            /* the m - 8 < 8 bytes after the first eight, at the top of the
             * word that ends the payload (zeros come in: not digits) */
            memcpy(&x, p + n - 8, 8);
            k += m == 8 ? 0 : digits8_word(x >> (8 * (16 - m)), &acc);
        }
        if (k < 16 && k < m && q[k] != '.' && q[k] != 'e' && q[k] != 'E') {
            v->small = true;
            v->mag = acc;
            v->is_int = true;
            return sign + k;
        }
    }
#endif
    return json_number_walk(p, n, back, v);
}

static __attribute__((noinline)) size_t json_number_walk(const char *p, size_t n, size_t back,
                                                         val_t *v)
{
    size_t i = 0;
    if (p[0] == '-')
        i++;
    if (i >= n)
        return 0;
    size_t first = i;
    uint64_t acc = 0; /* wraps harmlessly beyond 19 digits: then unused */
    if (p[i] == '0') {
        i++;
    } else if (p[i] >= '1' && p[i] <= '9') {
        size_t k = 8;
        while (n - i >= 8 && k == 8) {
            k = digits8(p + i, &acc);
            i += k;
        }
        if (k == 8 && i < n) { /* fewer than eight bytes were left */
#if DECODE_WORDS
            if (back + n >= 8) {
                /* the eight bytes that end the payload, the ones read
                 * already shifted out (zeros come in: not digits) */
                uint64_t x;
                memcpy(&x, p + n - 8, 8);
                i += digits8_word(x >> (8 * (8 - (n - i))), &acc);
            }
#else
            (void)back;
#endif
            while (i < n && is_digit(p[i]))
                acc = acc * 10 + (unsigned)(p[i++] - '0');
        }
    } else {
        return 0;
    }
    v->small = i - first <= 18;
    v->mag = acc;
    v->is_int = true;
    if (i < n && p[i] == '.') {
        i++;
        v->is_int = false;
        if (i >= n || !is_digit(p[i]))
            return 0;
        while (i < n && is_digit(p[i]))
            i++;
    }
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        i++;
        v->is_int = false;
        if (i < n && (p[i] == '+' || p[i] == '-'))
            i++;
        if (i >= n || !is_digit(p[i]))
            return 0;
        while (i < n && is_digit(p[i]))
            i++;
    }
    return i;
}

static bool utf8_cont(unsigned char c)
{
    return (c & 0xC0) == 0x80;
}

/* Returns the length of the well-formed UTF-8 sequence (2…4 bytes) at p, or 0
 * (overlong, surrogate, beyond U+10FFFF, truncated or stray byte). */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
    unsigned c = p[0];
    if (c >= 0xC2 && c <= 0xDF)
        return n >= 2 && utf8_cont(p[1]) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        unsigned lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        return n >= 3 && p[1] >= lo && p[1] <= hi && utf8_cont(p[2]) ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        unsigned lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        return n >= 4 && p[1] >= lo && p[1] <= hi && utf8_cont(p[2]) && utf8_cont(p[3]) ? 4 : 0;
    }
    return 0;
}

static bool hex4(const char *p, size_t n, unsigned *out)
{
    if (n < 4)
        return false;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            return false;
        v = v << 4 | d;
    }
    *out = v;
    return true;
}

/* Writes code point cp as UTF-8 to dst (when not NULL); returns its length. */
static size_t put_utf8(char *dst, unsigned cp)
{
    unsigned char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (unsigned char)(0xC0 | cp >> 6);
        b[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | cp >> 12);
        b[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | cp >> 18);
        b[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        b[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    if (dst != NULL)
        memcpy(dst, b, n);
    return n;
}

/* The high bit of each byte of x that is >= 0x80, < 0x20, '"' or '\\': a
 * byte that does not stand for itself in a JSON string. Exact up to and
 * including the lowest such byte (the subtractions borrow only out of a
 * flagged byte), so on a little-endian machine the lowest flag marks the
 * first of them. */
static uint64_t run_flags(uint64_t x)
{
    const uint64_t ones = UINT64_C(0x0101010101010101), high = ones * 0x80;
    uint64_t q = x ^ (ones * '"'), b = x ^ (ones * '\\');
    return (x | ((x - ones * 0x20) & ~x) | ((q - ones) & ~q) | ((b - ones) & ~b)) & high;
}

/* Length of the prefix of s[0..n) made of bytes that stand for themselves in
 * a JSON string: printable ASCII other than the quote and the backslash.
 * Tests eight bytes at a time. */
static size_t string_run(const char *s, size_t n)
{
    size_t i = 0;
    for (; n - i >= 8; i += 8) {
        uint64_t x;
        memcpy(&x, s + i, 8);
        uint64_t m = run_flags(x);
        if (m != 0) {
#if DECODE_WORDS
            return i + (size_t)__builtin_ctzll(m) / 8;
#else
            break;
#endif
        }
    }
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c >= 0x80 || c == '"' || c == '\\')
            break;
        i++;
    }
    return i;
}

/*
 * Validates the body of a JSON string, s[0..n) between the quotes, and when
 * dst is not NULL writes its decoded bytes there (never more than n). Returns
 * the decoded length, or -1 for a raw control character, a bad escape, a lone
 * surrogate or malformed UTF-8.
 */
static ptrdiff_t json_string(const char *s, size_t n, char *dst)
{
    size_t i = 0, o = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\\') {
            unsigned cp;
            if (i + 1 >= n)
                return -1;
            char e = s[i + 1];
            i += 2;
            switch (e) {
            case '"':
            case '\\':
            case '/':
                cp = (unsigned char)e;
                break;
            case 'b':
                cp = '\b';
                break;
            case 'f':
                cp = '\f';
                break;
            case 'n':
                cp = '\n';
                break;
            case 'r':
                cp = '\r';
                break;
            case 't':
                cp = '\t';
                break;
            case 'u':
                if (!hex4(s + i, n - i, &cp))
                    return -1;
                i += 4;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    unsigned lo;
                    if (n - i < 6 || s[i] != '\\' || s[i + 1] != 'u' ||
                        !hex4(s + i + 2, n - i - 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                        return -1;
                    i += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    return -1;
                }
                break;
            default:
                return -1;
            }
            o += put_utf8(dst != NULL ? dst + o : NULL, cp);
        } else if (c < 0x20) {
            return -1;
        } else if (c < 0x80) {
            if (dst != NULL)
                dst[o] = (char)c;
            o++;
            i++;
        } else {
            size_t k = utf8_seq((const unsigned char *)s + i, n - i);
            if (k == 0)
                return -1;
            if (dst != NULL)
                memcpy(dst + o, s + i, k);
            o += k;
            i += k;
        }
    }
    return (ptrdiff_t)o;
}

/* --- numbers and times --------------------------------------------------- */

/* Parses a validated JSON integer p[0..n); false when it does not fit int64.
 * (Integers of at most 18 digits never get here: json_number sums them.) */
static bool parse_int64(const char *p, size_t n, int64_t *out)
{
    bool neg = p[0] == '-';
    uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    uint64_t acc = 0;
    for (size_t i = neg; i < n; i++) {
        unsigned d = (unsigned)(p[i] - '0');
        if (acc > (limit - d) / 10)
            return false;
        acc = acc * 10 + d;
    }
    if (!neg)
        *out = (int64_t)acc;
    else if (acc == (uint64_t)INT64_MAX + 1)
        *out = INT64_MIN;
    else
        *out = -(int64_t)acc;
    return true;
}

/*
 * Converts a validated JSON number p[0..n), scaled by 10^scale, to a whole
 * number of milliseconds, exactly and rounding down. With whole_only, digits
 * below the millisecond must be zero. Returns false unless the result lies in
 * [0, TIME_MAX_MS) (any negative nonzero number is before 1970).
 */
static bool number_to_ms(const char *p, size_t n, int scale, bool whole_only, int64_t *ms)
{
    size_t i = 0;
    bool neg = false;
    if (p[0] == '-') {
        neg = true;
        i = 1;
    }
    size_t int_a = i;
    while (i < n && is_digit(p[i]))
        i++;
    size_t nint = i - int_a, frac_a = i, nfrac = 0;
    if (i < n && p[i] == '.') {
        frac_a = ++i;
        while (i < n && is_digit(p[i]))
            i++;
        nfrac = i - frac_a;
    }
    int64_t exp = 0;
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        bool eneg = false;
        i++;
        if (i < n && (p[i] == '+' || p[i] == '-'))
            eneg = p[i++] == '-';
        for (; i < n; i++)
            /* Digits can offset an exponent as large as the payload is
             * long (up to 2^31 bytes): stop only far beyond that. */
            if (exp < (INT64_C(1) << 40))
                exp = exp * 10 + (p[i] - '0');
        if (eneg)
            exp = -exp;
    }
    /* The digits D (integer then fraction digits) stand for D × 10^low ms,
     * low being the power of ten of the last digit. */
    size_t ndig = nint + nfrac;
    int64_t low = exp + scale - (int64_t)nfrac;
    uint64_t acc = 0;
    bool nonzero = false, below_ms = false;
    for (size_t j = 0; j < ndig; j++) {
        char c = j < nint ? p[int_a + j] : p[frac_a + j - nint];
        unsigned d = (unsigned)(c - '0');
        int64_t place = (int64_t)(ndig - 1 - j) + low;
        if (d != 0)
            nonzero = true;
        if (place >= 0) {
            if (acc >= (uint64_t)TIME_MAX_MS)
                return false;
            acc = acc * 10 + d;
        } else if (d != 0) {
            below_ms = true;
        }
    }
    for (int64_t k = 0; k < low && acc != 0; k++) {
        if (acc >= (uint64_t)TIME_MAX_MS)
            return false;
        acc *= 10;
    }
    if ((neg && nonzero) || (whole_only && below_ms) || acc >= (uint64_t)TIME_MAX_MS)
        return false;
    *ms = (int64_t)acc;
    return true;
}

static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    /* Howard Hinnant's days_from_civil: proleptic Gregorian, day 0 = 1970-01-01. */
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static bool is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

/* Reads n decimal digits at s into *v. */
static bool digits(const char *s, int n, unsigned *v)
{
    unsigned acc = 0;
    for (int i = 0; i < n; i++) {
        if (!is_digit(s[i]))
            return false;
        acc = acc * 10 + (unsigned)(s[i] - '0');
    }
    *v = acc;
    return true;
}

tly_err_t tly_decode_iso8601(const char *s, size_t len, int64_t *ms)
{
    static const unsigned mdays[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    unsigned y, mo, d, h, mi, sec;

    /* YYYY-MM-DDTHH:MM:SS is 19 bytes; a zone designator follows. */
    if (s == NULL || len < 20)
        return TLY_E_EV_BAD_TIME;
    if (!digits(s, 4, &y) || s[4] != '-' || !digits(s + 5, 2, &mo) || s[7] != '-' ||
        !digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't') || !digits(s + 11, 2, &h) ||
        s[13] != ':' || !digits(s + 14, 2, &mi) || s[16] != ':' || !digits(s + 17, 2, &sec))
        return TLY_E_EV_BAD_TIME;
    if (mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 59)
        return TLY_E_EV_BAD_TIME;
    if (d > mdays[mo - 1] + (mo == 2 && is_leap(y)))
        return TLY_E_EV_BAD_TIME;

    size_t i = 19;
    int64_t frac = 0;
    if (s[i] == '.') {
        size_t a = ++i;
        while (i < len && is_digit(s[i])) {
            if (i - a < 3) /* digits past the millisecond are dropped: round down */
                frac = frac * 10 + (s[i] - '0');
            i++;
        }
        if (i == a)
            return TLY_E_EV_BAD_TIME;
        for (size_t k = i - a; k < 3; k++)
            frac *= 10;
    }

    int64_t offset_ms = 0;
    if (i < len && (s[i] == 'Z' || s[i] == 'z')) {
        i++;
    } else if (i < len && (s[i] == '+' || s[i] == '-')) {
        unsigned oh, om;
        if (len - i < 6 || !digits(s + i + 1, 2, &oh) || s[i + 3] != ':' ||
            !digits(s + i + 4, 2, &om) || oh > 23 || om > 59)
            return TLY_E_EV_BAD_TIME;
        offset_ms = ((int64_t)oh * 60 + om) * 60000;
        if (s[i] == '-')
            offset_ms = -offset_ms;
        i += 6;
    } else {
        return TLY_E_EV_BAD_TIME;
    }
    if (i != len)
        return TLY_E_EV_BAD_TIME;

    int64_t t = days_from_civil(y, mo, d) * 86400000 + (int64_t)h * 3600000 + (int64_t)mi * 60000 +
                (int64_t)sec * 1000 + frac - offset_ms;
    if (t < 0 || t >= TIME_MAX_MS)
        return TLY_E_EV_BAD_TIME;
    *ms = t;
    return TLY_OK;
}

/* --- the walk ------------------------------------------------------------ */

/* Reserves n bytes of scratch; NULL only if the memory invariant broke. */
static char *scratch_at(tly_decoder_t *dec, size_t n)
{
    if (n > dec->cap - dec->used)
        return NULL;
    return dec->scratch + dec->used;
}

/* Sets w->err to e unless an earlier member already failed. */
static void field_error(walk_t *w, int fid, tly_err_t e)
{
    if (w->err == TLY_OK)
        w->err = fid == w->dec->rules.time_field ? TLY_E_EV_BAD_TIME : e;
}

/* Converts value v, just scanned, into ev->vals[fid]: extract's cases
 * past the usual two. */
static __attribute__((noinline)) void extract_rest(walk_t *w, int fid, const val_t *v)
{
    tly_decoder_t *dec = w->dec;
    const char *p = v->p;
    size_t n = v->n;
    tly_value_t out = {.type = TLY_V_NIL};

    switch (v->kind) {
    case V_STR:
        if (v->escaped) {
            char *dst = scratch_at(dec, n);
            ptrdiff_t dn = dst != NULL ? json_string(p, n, dst) : -1;
            if (dn < 0) {
                field_error(w, fid, TLY_E_EV_BAD_JSON);
                return;
            }
            dec->used += (size_t)dn;
            p = dst;
            n = (size_t)dn;
        }
        if (dec->rules.max_string > 0 && n > (uint64_t)dec->rules.max_string) {
            field_error(w, fid, TLY_E_EV_VALUE_TOO_LONG);
            return;
        }
        out.type = TLY_V_STR;
        out.len = (uint32_t)n;
        out.u.s = p;
        break;
    case V_TRUE:
    case V_FALSE:
        out.type = TLY_V_BOOL;
        out.u.i = v->kind == V_TRUE;
        break;
    case V_NULL:
        break;
    case V_NUM:
        if (v->is_int && v->small) {
            out.type = TLY_V_INT;
            out.u.i = p[0] == '-' ? -(int64_t)v->mag : (int64_t)v->mag;
        } else if (v->is_int && parse_int64(p, n, &out.u.i)) {
            out.type = TLY_V_INT;
        } else {
            /* strtod needs a terminator: parse a copy. */
            char *num = scratch_at(dec, n + 1);
            if (num == NULL) {
                field_error(w, fid, TLY_E_EV_BAD_JSON);
                return;
            }
            memcpy(num, p, n);
            num[n] = '\0';
            double d = strtod(num, NULL);
            if (!isfinite(d)) {
                field_error(w, fid, TLY_E_EV_WRONG_TYPE);
                return;
            }
            out.type = TLY_V_DOUBLE;
            out.u.d = d;
        }
        break;
    default: /* object or array */
        field_error(w, fid, TLY_E_EV_WRONG_TYPE);
        return;
    }
    w->ev->vals[fid] = out;
    if (fid == dec->rules.time_field) {
        w->time_p = v->p;
        w->time_n = v->n;
    }
}

/* Converts value v, just scanned, into ev->vals[fid]. The usual values
 * (a plain string within max_string, an integer of up to 18 digits) here,
 * the rest in extract_rest. */
static inline void extract(walk_t *w, int fid, const val_t *v)
{
    tly_value_t out;
    if (v->kind == V_NUM && v->is_int && v->small) {
        out.type = TLY_V_INT;
        out.len = 0;
        out.u.i = v->p[0] == '-' ? -(int64_t)v->mag : (int64_t)v->mag;
    } else if (v->kind == V_STR && !v->escaped &&
               (w->dec->rules.max_string <= 0 || v->n <= (uint64_t)w->dec->rules.max_string)) {
        out.type = TLY_V_STR;
        out.len = (uint32_t)v->n;
        out.u.s = v->p;
    } else {
        extract_rest(w, fid, v);
        return;
    }
    w->ev->vals[fid] = out;
    if (fid == w->dec->rules.time_field) {
        w->time_p = v->p;
        w->time_n = v->n;
    }
}

/* Looks up the field a key names, decoding escapes if it has any. */
static int key_field(walk_t *w, const val_t *key)
{
    if (!key->escaped) /* the closing quote and more follow: avail > n */
        return lookup_field(w->dec, key->p, key->n, w->len - (size_t)(key->p - w->js));
    char *tmp = scratch_at(w->dec, key->n); /* temporary: not committed */
    ptrdiff_t dn = tmp != NULL ? json_string(key->p, key->n, tmp) : -1;
    return dn < 0 ? -1 : lookup_field(w->dec, tmp, (size_t)dn, (size_t)dn);
}

/* Counts one more token; false (and w->complex) past the cap. */
static bool count_token(walk_t *w)
{
    if (++w->ntok <= TLY_DECODE_MAX_TOKENS)
        return true;
    w->complex = true;
    return false;
}

static void skip_gap(walk_t *w)
{
    w->pos = skip_ws(w->js, w->pos, w->len);
}

/* Skips whitespace, the byte c, and whitespace again; false when c is not
 * there. The usual forms (c alone, or followed by one space) take the
 * first tests. */
static inline bool skip_sep(walk_t *w, char c)
{
    const char *js = w->js;
    size_t p = w->pos, len = w->len;
    if (p >= len || js[p] != c) {
        p = skip_ws(js, p, len);
        if (p >= len || js[p] != c)
            return false;
    }
    p++;
    if (p < len && js[p] == ' ')
        p++;
    if (p < len && (unsigned char)js[p] <= ' ')
        p = skip_ws(js, p, len);
    w->pos = p;
    return true;
}

/* Scans the string whose opening quote is at w->pos, checking its body:
 * escapes, UTF-8, no raw control bytes. */
static bool scan_string(walk_t *w, val_t *v)
{
    const char *js = w->js;
    size_t len = w->len, body = w->pos + 1, i = body, odd = len;
    bool escaped = false;
    for (;;) {
        i += string_run(js + i, len - i);
        if (i >= len)
            return false;
        unsigned char c = (unsigned char)js[i];
        if (c == '"')
            break;
        if (c < 0x20)
            return false;
        if (odd == len)
            odd = i;
        if (c == '\\') {
            /* The escaped byte cannot end the string; json_string checks
             * the escape below. */
            if (len - i < 2)
                return false;
            escaped = true;
            i += 2;
        } else {
            i++; /* UTF-8, checked below */
        }
    }
    if (odd < i && json_string(js + odd, i - odd, NULL) < 0)
        return false;
    v->kind = V_STR;
    v->p = js + body;
    v->n = i - body;
    v->escaped = escaped;
    w->pos = i + 1;
    return true;
}

/* Reads the string whose opening quote is at w->pos when it is plain (no
 * escape, control or non-ASCII byte) and at most fifteen bytes long, the
 * usual kind of key and enumerated value, with one or two loads; sets
 * *head to its head_word(). Returns false, having changed nothing, for any
 * other string: scan_string reads those. */
static inline bool short_string(walk_t *w, val_t *v, uint64_t *head)
{
#if DECODE_WORDS
    if (w->len - w->pos < 9)
        return false;
    const char *s = w->js + w->pos + 1;
    uint64_t x;
    memcpy(&x, s, 8);
    uint64_t m = run_flags(x);
    size_t k = m != 0 ? (size_t)__builtin_ctzll(m) / 8 : 8;
    if (k == 8) {
        k = 16; /* unless the second word holds the flag */
        if (w->len - w->pos >= 17) {
            uint64_t x2;
            memcpy(&x2, s + 8, 8);
            m = run_flags(x2);
            if (m != 0)
                k = 8 + (size_t)__builtin_ctzll(m) / 8;
        }
    }
    if (k >= 16 || s[k] != '"')
        return false;
    v->kind = V_STR;
    v->p = s;
    v->n = k;
    v->escaped = false;
    *head = k >= 8 ? x : x & ((UINT64_C(1) << (8 * k)) - 1);
    w->pos += k + 2;
    return true;
#else
    (void)w;
    (void)v;
    (void)head;
    return false;
#endif
}

/* Scans the key whose opening quote is at w->pos; *headed tells whether
 * *head, its head_word(), was set on the way. */
static inline bool scan_key(walk_t *w, val_t *key, uint64_t *head, bool *headed)
{
    *headed = short_string(w, key, head);
    return *headed || scan_string(w, key);
}

static bool scan_value(walk_t *w, val_t *v, bool top);

/* The string value whose opening quote is at w->pos: one token. */
static inline bool scan_string_value(walk_t *w, val_t *v)
{
    uint64_t head;
    return count_token(w) && (short_string(w, v, &head) || scan_string(w, v));
}

/* The number value that begins at w->pos ('-' or a digit): one token,
 * counted before its syntax decides anything. */
static inline bool scan_number_value(walk_t *w, val_t *v)
{
    const char *p = w->js + w->pos;
    size_t k = json_number(p, w->len - w->pos, w->pos, v);
    if (!count_token(w) || k == 0)
        return false;
    v->kind = V_NUM;
    v->p = p;
    v->n = k;
    w->pos += k;
    return true;
}

/* scan_value for a member or element, with the usual values (strings and
 * numbers) read without a call. */
static inline bool scan_inner(walk_t *w, val_t *v)
{
    if (w->pos < w->len) {
        char c = w->js[w->pos];
        if (c == '"')
            return scan_string_value(w, v);
        if (c == '-' || is_digit(c))
            return scan_number_value(w, v);
    }
    return scan_value(w, v, false);
}

/* Notes a top-level member whose value spans [vstart, w->pos), for
 * shape_learn. */
static void note_member(walk_t *w, size_t vstart, int fid, const val_t *val)
{
    tly_decoder_t *dec = w->dec;
    if (w->nmem >= SHAPE_MEMBERS || (val->kind != V_NUM && val->kind != V_STR) ||
        w->pos > UINT32_MAX) {
        w->nmem = SHAPE_MEMBERS + 1;
        return;
    }
    dec->lstart[w->nmem] = (uint32_t)vstart;
    dec->lend[w->nmem] = (uint32_t)w->pos;
    dec->lfid[w->nmem] = (int8_t)fid;
    dec->lkind[w->nmem] = (uint8_t)val->kind;
    w->nmem++;
}

/* Scans the object or array opening at w->pos and everything in it; with
 * top, extracts the object's referenced members. */
static bool scan_container(walk_t *w, val_t *v, bool top)
{
    const char *js = w->js;
    bool object = js[w->pos] == '{';
    char close = object ? '}' : ']';
    w->pos++;
    skip_gap(w);
    if (w->pos < w->len && js[w->pos] == close) {
        w->pos++;
        v->kind = object ? V_OBJECT : V_ARRAY;
        return true;
    }
    for (;;) {
        val_t key, val;
        uint64_t head = 0;
        bool headed = false;
        /* A key is a string: any other byte is a grammar error. */
        if (object && (w->pos >= w->len || js[w->pos] != '"' || !count_token(w) ||
                       !scan_key(w, &key, &head, &headed) || !skip_sep(w, ':')))
            return false;
        size_t vstart = w->pos;
        if (!scan_inner(w, &val))
            return false;
        if (object && top && w->err == TLY_OK) {
            int fid = headed ? lookup_head(w->dec, key.p, key.n, head) : key_field(w, &key);
            if (fid >= 0)
                extract(w, fid, &val);
            if (w->learn)
                note_member(w, vstart, fid, &val);
        }
        if (w->pos < w->len && js[w->pos] == close) {
            w->pos++;
            break;
        }
        if (!skip_sep(w, ',')) {
            skip_gap(w);
            if (w->pos >= w->len || js[w->pos] != close)
                return false;
            w->pos++;
            break;
        }
    }
    v->kind = object ? V_OBJECT : V_ARRAY;
    return true;
}

/* Scans the value that must begin at w->pos. A byte that can begin a value
 * begins a token, counted before anything else about it is checked (so the
 * 257th token is EV_TOO_COMPLEX even when malformed); any other byte is a
 * grammar error. Recursion depth is bounded by TLY_DECODE_MAX_TOKENS: each
 * level is a token. */
static bool scan_value(walk_t *w, val_t *v, bool top)
{
    if (w->pos >= w->len)
        return false;
    const char *p = w->js + w->pos;
    size_t n = w->len - w->pos, k;
    switch (p[0]) {
    case '"':
        return scan_string_value(w, v);
    case '{':
    case '[':
        return count_token(w) && scan_container(w, v, top);
    case 't':
        v->kind = V_TRUE;
        k = n >= 4 && memcmp(p, "true", 4) == 0 ? 4 : 0;
        break;
    case 'f':
        v->kind = V_FALSE;
        k = n >= 5 && memcmp(p, "false", 5) == 0 ? 5 : 0;
        break;
    case 'n':
        v->kind = V_NULL;
        k = n >= 4 && memcmp(p, "null", 4) == 0 ? 4 : 0;
        break;
    default:
        if (p[0] != '-' && !is_digit(p[0]))
            return false;
        return scan_number_value(w, v);
    }
    /* What follows (a separator, whitespace, a closing bracket or the end)
     * is the caller's to check: "12ab" and "truex" fail there. */
    if (!count_token(w) || k == 0)
        return false;
    v->p = p;
    v->n = k;
    w->pos += k;
    return true;
}

/* Ensures scratch holds at least n bytes (the memory invariant). */
static void scratch_reserve(tly_decoder_t *dec, size_t n)
{
    if (dec->cap >= n)
        return;
    char *p = realloc(dec->scratch, n);
    if (p == NULL) {
        fprintf(stderr, "tallyd: out of memory growing the decoder's scratch to %zu bytes\n", n);
        abort();
    }
    dec->scratch = p;
    dec->cap = n;
}

static tly_err_t event_time(const walk_t *w, int64_t kafka_ts_ms)
{
    const tly_event_rules_t *rules = &w->dec->rules;
    tly_event_t *ev = w->ev;

    if (rules->time_field < 0) {
        if (kafka_ts_ms < 0)
            return TLY_E_EV_MISSING_TIME;
        ev->time_ms = kafka_ts_ms;
        return TLY_OK;
    }
    const tly_value_t *v = &ev->vals[rules->time_field];
    if (v->type == TLY_V_NIL || w->time_p == NULL)
        return TLY_E_EV_MISSING_TIME;

    int64_t t;
    switch (rules->time_unit) {
    case TLY_TIME_MS:
    case TLY_TIME_S: {
        if (v->type != TLY_V_INT && v->type != TLY_V_DOUBLE)
            return TLY_E_EV_BAD_TIME;
        bool s = rules->time_unit == TLY_TIME_S;
        if (v->type == TLY_V_INT) { /* the exact value of an integer token */
            int64_t max = s ? TIME_MAX_MS / 1000 : TIME_MAX_MS;
            if (v->u.i < 0 || v->u.i >= max)
                return TLY_E_EV_BAD_TIME;
            t = s ? v->u.i * 1000 : v->u.i;
            break;
        }
        if (!number_to_ms(w->time_p, w->time_n, s ? 3 : 0, !s, &t))
            return TLY_E_EV_BAD_TIME;
        break;
    }
    case TLY_TIME_ISO8601:
        if (v->type != TLY_V_STR || tly_decode_iso8601(v->u.s, v->len, &t) != TLY_OK)
            return TLY_E_EV_BAD_TIME;
        break;
    default:
        return TLY_E_EV_BAD_TIME;
    }
    ev->time_ms = t;
    return TLY_OK;
}

/* Whether shape s's bytes before member i (or, i == nmem, after its last)
 * are the payload's at w->pos: before a member they must be followed by
 * its value; after the last they must end the payload. */
static inline bool shape_fits(const walk_t *w, const shape_t *s, uint32_t i)
{
    size_t n = s->pre_len[i], left = w->len - w->pos;
    return (i < s->nmem ? left > n : left == n) &&
           tly_bytes_eq(w->js + w->pos, s->bytes + s->pre_off[i], n);
}

/* Reads the payload by a learnt shape: every byte between the values is
 * the shape's, each value is scanned (and checked) as the grammar walk
 * would scan it, and the referenced ones are extracted in document order.
 * What the walk would have found is then found: the payload is an object
 * of those members, each key naming the field it named when learnt. When
 * the bytes part from the shape at some member, another shape alike up to
 * it may go on. False when no shape reads the payload through; then
 * *ev and w are partly written (the caller starts them again). */
static bool read_shaped(walk_t *w)
{
    tly_decoder_t *dec = w->dec;
    uint32_t t = dec->last;
    const shape_t *s = &dec->shapes[t];
    for (uint32_t i = 0;; i++) {
        if (!shape_fits(w, s, i)) {
            uint32_t c = 0;
            for (; c < dec->nshapes; c++)
                if (c != t && dec->alike[t][c] >= i && shape_fits(w, &dec->shapes[c], i))
                    break;
            if (c == dec->nshapes)
                return false;
            t = c;
            s = &dec->shapes[t];
        }
        w->pos += s->pre_len[i];
        if (i == s->nmem)
            break;
        val_t v;
        if (s->kind[i] == V_NUM) {
            const char *p = w->js + w->pos;
            size_t k = json_number(p, w->len - w->pos, w->pos, &v);
            if (k == 0)
                return false;
            v.kind = V_NUM;
            v.p = p;
            v.n = k;
            w->pos += k;
        } else {
            uint64_t head;
            if (w->js[w->pos] != '"' || !(short_string(w, &v, &head) || scan_string(w, &v)))
                return false;
        }
        if (s->fid[i] >= 0 && w->err == TLY_OK)
            extract(w, s->fid[i], &v);
    }
    dec->last = t;
    return true;
}

/* Keeps the shape of the payload just accepted (its members noted by the
 * walk), in place of the oldest learnt when all places are taken. */
static void shape_learn(tly_decoder_t *dec, const walk_t *w)
{
    if (w->nmem > SHAPE_MEMBERS)
        return;
    shape_t sh;
    size_t used = 0, prev = 0;
    for (uint32_t i = 0; i <= w->nmem; i++) {
        size_t end = i < w->nmem ? dec->lstart[i] : w->len, n = end - prev;
        if (n > UINT8_MAX || used + n > SHAPE_BYTES)
            return;
        sh.pre_off[i] = (uint16_t)used;
        sh.pre_len[i] = (uint8_t)n;
        memcpy(sh.bytes + used, w->js + prev, n);
        used += n;
        if (i < w->nmem) {
            sh.fid[i] = dec->lfid[i];
            sh.kind[i] = dec->lkind[i];
            prev = dec->lend[i];
        }
    }
    sh.nmem = w->nmem;
    uint32_t t = dec->nshapes < SHAPES ? dec->nshapes++ : dec->victim++ % SHAPES;
    dec->shapes[t] = sh;
    for (uint32_t c = 0; c < dec->nshapes; c++) {
        const shape_t *o = &dec->shapes[c];
        uint32_t i = 0;
        while (i < sh.nmem && i < o->nmem && sh.kind[i] == o->kind[i] && sh.fid[i] == o->fid[i] &&
               sh.pre_len[i] == o->pre_len[i] &&
               memcmp(sh.bytes + sh.pre_off[i], o->bytes + o->pre_off[i], sh.pre_len[i]) == 0)
            i++;
        dec->alike[t][c] = dec->alike[c][t] = (uint8_t)i;
    }
    dec->last = t;
}

void tly_decoder_set_shapes(tly_decoder_t *dec, bool on)
{
    dec->shapes_off = !on;
}

uint64_t tly_decoder_shaped(const tly_decoder_t *dec)
{
    return dec->shaped;
}

tly_err_t tly_decode_json(tly_decoder_t *dec, const char *payload, size_t len, int64_t kafka_ts_ms,
                          tly_event_t *ev)
{
    const tly_featset_t *fs = dec->fs;

    if (payload == NULL)
        len = 0;
    if ((dec->rules.max_bytes > 0 && len > (uint64_t)dec->rules.max_bytes) || len > DECODE_MAX_LEN)
        return TLY_E_EV_TOO_LARGE;

    scratch_reserve(dec, len + 1);
    dec->used = 0;
    ev->nfields = (uint32_t)fs->nfields;
    ev->replayed = false;
    ev->skip_entities =
        dec->rules.key_entity >= 0 ? ~(UINT64_C(1) << dec->rules.key_entity) : 0;
    for (size_t i = 0; i < fs->nfields; i++)
        ev->vals[i] = (tly_value_t){.type = TLY_V_NIL};

    walk_t w = {.dec = dec, .js = payload, .len = len, .ev = ev, .err = TLY_OK};
    if (dec->nshapes > 0 && !dec->shapes_off) {
        if (read_shaped(&w)) {
            dec->shaped++;
            return w.err != TLY_OK ? w.err : event_time(&w, kafka_ts_ms);
        }
        /* no shape reads it through: start again, by the grammar walk */
        for (size_t i = 0; i < fs->nfields; i++)
            ev->vals[i] = (tly_value_t){.type = TLY_V_NIL};
        dec->used = 0;
        w = (walk_t){.dec = dec, .js = payload, .len = len, .ev = ev, .err = TLY_OK};
    }
    w.learn = !dec->shapes_off && dec->misses++ % SHAPE_LEARN_RATE == 0;
    if (len >= 3 && memcmp(payload, "\xEF\xBB\xBF", 3) == 0)
        w.pos = 3; /* a leading byte-order mark, which RFC 8259 lets a parser ignore */
    val_t top;
    skip_gap(&w);
    bool ok = scan_value(&w, &top, true);
    if (ok) {
        skip_gap(&w);
        ok = w.pos == len;
    }
    if (!ok)
        return w.complex ? TLY_E_EV_TOO_COMPLEX : TLY_E_EV_BAD_JSON;
    if (top.kind != V_OBJECT)
        return TLY_E_EV_NOT_OBJECT;
    if (w.err != TLY_OK)
        return w.err;
    tly_err_t err = event_time(&w, kafka_ts_ms);
    if (err == TLY_OK && w.learn)
        shape_learn(dec, &w);
    return err;
}
