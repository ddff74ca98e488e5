/*
 * decode.c — JSON event payloads → tly_event_t (see decode.h).
 *
 * jsmn tokenises the payload. jsmn is lenient: it accepts `{"a" 1}`, `[1,,2]`,
 * bare words, raw control characters in strings and several top-level values.
 * So a second pass walks jsmn's token tree and checks every byte of the
 * payload against the JSON grammar (RFC 8259): the separators between tokens,
 * number and literal syntax, string escapes and UTF-8. The same walk extracts
 * the top-level members whose key is a referenced field.
 *
 * Rejection precedence, so that each payload has exactly one reason:
 * EV_TOO_LARGE, EV_TOO_COMPLEX, EV_BAD_JSON, EV_NOT_OBJECT, then the first
 * field error in document order (EV_WRONG_TYPE, EV_VALUE_TOO_LONG, or
 * EV_BAD_TIME for the time field), then EV_MISSING_TIME / EV_BAD_TIME.
 *
 * Decisions (README material):
 *  - Strings must be valid UTF-8 (no overlongs, no surrogates, ≤ U+10FFFF);
 *    \uXXXX escapes decode to UTF-8, a lone surrogate escape is invalid.
 *  - A JSON null is an absent field (TLY_V_NIL); a null time is missing.
 *  - A referenced key whose value is an object or array rejects the event
 *    with EV_WRONG_TYPE (EV_BAD_TIME for the time field), even if a later
 *    duplicate of the key would be fine; otherwise the last duplicate wins.
 *  - A number that overflows a double (1e999) in a referenced field is
 *    EV_WRONG_TYPE: it has no finite value to count.
 *  - events.max_string counts decoded bytes. A key written with escapes
 *    ("us\u0065r_id") matches the field it spells.
 *  - The time field: any rejection of its value is EV_BAD_TIME. Numeric times
 *    are converted exactly from the decimal text, never through binary
 *    floating point, so 1700000000.123 s is 1700000000123 ms; seconds round
 *    down to the millisecond; milliseconds must be whole (1.7e12 is fine,
 *    1.5 is not). Plausible times are [1970-01-01, 2101-01-01) UTC.
 *  - Doubles are parsed with strtod, which follows LC_NUMERIC: the daemon must
 *    keep the "C" numeric locale.
 *
 * Threads: a decoder is used by one thread at a time (its tokens and scratch
 * are per call); the featset it borrows is read only.
 *
 * Memory invariant: the scratch buffer holds at least len + 1 bytes for a
 * payload of len bytes. Decoded strings are never longer than their raw text
 * and every string or number is decoded at most once per member, so the bytes
 * committed to scratch plus one temporary (a key or a number being parsed)
 * never exceed len + 1; each write is bounds-checked anyway.
 */
#include "tallyd/decode.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Parent links make closing brackets O(depth) instead of O(tokens). */
#define JSMN_STATIC
#define JSMN_PARENT_LINKS
#include <jsmn.h>

/* 2101-01-01T00:00:00Z: 131 years after 1970, 32 of them leap (1972…2096). */
#define TIME_MAX_MS (INT64_C(47847) * 86400000)

/* jsmn keeps positions in int. */
#define DECODE_MAX_LEN ((size_t)INT_MAX - 1)

/* Open-addressing table of field ids by key name; at most 64 fields, so a
 * quarter full at worst and a miss almost always costs one probe. */
#define FIELD_SLOTS 256u

struct tly_decoder {
    const tly_featset_t *fs;
    tly_event_rules_t rules; /* time field and limits in force (a copy) */
    uint32_t name_len[TLY_MAX_FIELDS];
    uint64_t name_head[TLY_MAX_FIELDS]; /* head_word() of each name */
    uint8_t slot[FIELD_SLOTS]; /* field id + 1; 0 = empty */
    char *scratch;             /* decoded strings; see the memory invariant */
    size_t cap;
    size_t used;
    jsmntok_t toks[TLY_DECODE_MAX_TOKENS];
};

/* One decode call: the payload, its tokens, and what extraction found. */
typedef struct {
    tly_decoder_t *dec;
    const char *js;
    size_t len;
    int ntok;
    tly_event_t *ev;
    tly_err_t err; /* first field error, in document order */
    int time_tok;  /* value token of the last time-field member, or -1 */
    bool escaped;  /* the last string checked holds a backslash escape */
    bool is_int;   /* the last primitive checked is an integer */
    bool small;    /* ... of at most 18 digits, whose magnitude is `mag` */
    uint64_t mag;
} walk_t;

/* The first eight bytes of a key s[0..n) as a word, zero-padded when n < 8.
 * `avail` bytes may be read at s (avail >= n): with eight of them, one load
 * and a mask (little-endian: the first bytes are the low ones). */
static uint64_t head_word(const char *s, size_t n, size_t avail)
{
    uint64_t w = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
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

/* Returns the field id named s[0..n), or -1; avail as for head_word(). */
static int lookup_field(const tly_decoder_t *dec, const char *s, size_t n, size_t avail)
{
    uint64_t head = head_word(s, n, avail);
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

/* True when js[p..next) is whitespace around one `sep` (or only whitespace
 * when sep is 0). The usual forms ("", ":", ": ", ",", ", ") are told at a
 * glance; anything else is walked byte by byte. */
static bool json_gap(const char *js, size_t p, size_t next, char sep)
{
    if (next < p)
        return false;
    size_t n = next - p;
    if (sep == 0 ? n == 0 : n >= 1 && n <= 2 && js[p] == sep && (n == 1 || js[p + 1] == ' '))
        return true;
    size_t q = skip_ws(js, p, next);
    if (sep != 0) {
        if (q >= next || js[q] != sep)
            return false;
        q = skip_ws(js, q + 1, next);
    }
    return q == next;
}

/* Where token t's text begins: the opening quote of a string. Negative
 * for a token jsmn left without a position. */
static ptrdiff_t tok_begin(const jsmntok_t *t)
{
    return t->type == JSMN_STRING ? (ptrdiff_t)t->start - 1 : (ptrdiff_t)t->start;
}

/* True when p[0..n) is a JSON number; *is_int when it has neither fraction
 * nor exponent. The integer part's digits are summed on the way: *small
 * when there are at most 18 of them (below 10^18, so the sum cannot
 * overflow), and then *mag is their value. */
static bool json_number(const char *p, size_t n, bool *is_int, bool *small, uint64_t *mag)
{
    size_t i = 0;
    if (i < n && p[i] == '-')
        i++;
    if (i >= n)
        return false;
    size_t first = i;
    uint64_t acc = 0; /* wraps harmlessly beyond 19 digits: then unused */
    if (p[i] == '0') {
        i++;
    } else if (p[i] >= '1' && p[i] <= '9') {
        while (i < n && is_digit(p[i]))
            acc = acc * 10 + (unsigned)(p[i++] - '0');
    } else {
        return false;
    }
    *small = i - first <= 18;
    *mag = acc;
    *is_int = true;
    if (i < n && p[i] == '.') {
        i++;
        *is_int = false;
        if (i >= n || !is_digit(p[i]))
            return false;
        while (i < n && is_digit(p[i]))
            i++;
    }
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        i++;
        *is_int = false;
        if (i < n && (p[i] == '+' || p[i] == '-'))
            i++;
        if (i >= n || !is_digit(p[i]))
            return false;
        while (i < n && is_digit(p[i]))
            i++;
    }
    return i == n;
}

static bool literal_is(const char *p, size_t n, const char *lit, size_t litlen)
{
    return n == litlen && memcmp(p, lit, n) == 0;
}

/* True when p[0..n) is a valid JSON primitive (true, false, null, number);
 * the number's facts go to w (see json_number). */
static bool json_primitive(const char *p, size_t n, walk_t *w)
{
    w->is_int = false;
    switch (p[0]) {
    case 't':
        return literal_is(p, n, "true", 4);
    case 'f':
        return literal_is(p, n, "false", 5);
    case 'n':
        return literal_is(p, n, "null", 4);
    default:
        return json_number(p, n, &w->is_int, &w->small, &w->mag);
    }
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

/* Length of the prefix of s[0..n) made of bytes that stand for themselves in
 * a JSON string: printable ASCII other than the backslash. Tests eight bytes
 * at a time (each test is exact: any byte >= 0x80, < 0x20 or == '\\' stops
 * it), then byte by byte. */
static size_t plain_prefix(const char *s, size_t n)
{
    const uint64_t ones = UINT64_C(0x0101010101010101), high = ones * 0x80;
    size_t i = 0;
    for (; n - i >= 8; i += 8) {
        uint64_t x;
        memcpy(&x, s + i, 8);
        uint64_t bs = x ^ (ones * '\\');
        if (((x | ((x - ones * 0x20) & ~x) | ((bs - ones) & ~bs)) & high) != 0)
            break;
    }
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c >= 0x80 || c == '\\')
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
            if (exp < 1000000) /* far beyond any plausible time either way */
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

/* Converts value token vi, just checked by check_value (w->escaped, w->is_int,
 * w->small and w->mag describe it), into ev->vals[fid]. */
static void extract(walk_t *w, int fid, int vi)
{
    tly_decoder_t *dec = w->dec;
    const jsmntok_t *t = &dec->toks[vi];
    const char *p = w->js + t->start;
    size_t n = (size_t)(t->end - t->start);
    tly_value_t v = {.type = TLY_V_NIL};

    switch (t->type) {
    case JSMN_STRING:
        if (w->escaped) {
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
        v.type = TLY_V_STR;
        v.len = (uint32_t)n;
        v.u.s = p;
        break;
    case JSMN_PRIMITIVE:
        if (p[0] == 't' || p[0] == 'f') {
            v.type = TLY_V_BOOL;
            v.u.i = p[0] == 't';
        } else if (p[0] == 'n') {
            v.type = TLY_V_NIL;
        } else {
            if (w->is_int && w->small) {
                v.type = TLY_V_INT;
                v.u.i = p[0] == '-' ? -(int64_t)w->mag : (int64_t)w->mag;
            } else if (w->is_int && parse_int64(p, n, &v.u.i)) {
                v.type = TLY_V_INT;
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
                v.type = TLY_V_DOUBLE;
                v.u.d = d;
            }
        }
        break;
    default: /* object or array */
        field_error(w, fid, TLY_E_EV_WRONG_TYPE);
        return;
    }
    w->ev->vals[fid] = v;
    if (fid == dec->rules.time_field)
        w->time_tok = vi;
}

/* Looks up the field a key token names, decoding escapes if it has any. */
static int key_field(walk_t *w, const jsmntok_t *t, bool escaped)
{
    const char *p = w->js + t->start;
    size_t n = (size_t)(t->end - t->start);
    if (!escaped) /* the closing quote and more follow: len - start > n */
        return lookup_field(w->dec, p, n, w->len - (size_t)t->start);
    char *tmp = scratch_at(w->dec, n); /* temporary: not committed */
    ptrdiff_t dn = tmp != NULL ? json_string(p, n, tmp) : -1;
    return dn < 0 ? -1 : lookup_field(w->dec, tmp, (size_t)dn, (size_t)dn);
}

static int check_value(walk_t *w, int i, size_t *pos, bool top);

/* Checks string token i, which must open at *pos; sets w->escaped. Returns
 * i + 1 or -1. */
static int check_string(walk_t *w, int i, size_t *pos)
{
    const jsmntok_t *t = &w->dec->toks[i];
    if (t->type != JSMN_STRING || t->start < 1 || t->end < t->start || (size_t)t->end >= w->len ||
        *pos != (size_t)t->start - 1)
        return -1;
    if (w->js[t->start - 1] != '"' || w->js[t->end] != '"')
        return -1;
    const char *s = w->js + t->start;
    size_t n = (size_t)(t->end - t->start), k = plain_prefix(s, n);
    w->escaped = false;
    if (k < n) {
        if (json_string(s + k, n - k, NULL) < 0)
            return -1;
        w->escaped = memchr(s + k, '\\', n - k) != NULL;
    }
    *pos = (size_t)t->end + 1;
    return i + 1;
}

/* Checks object or array token i at *pos and its subtree; with top, extracts
 * the object's referenced members. Returns the index after the subtree or -1. */
static int check_container(walk_t *w, int i, size_t *pos, bool top)
{
    const jsmntok_t *t = &w->dec->toks[i];
    bool object = t->type == JSMN_OBJECT;
    char close = object ? '}' : ']';
    size_t p = *pos;
    int j = i + 1;

    if (t->start < 0 || (size_t)t->start != p || t->end <= t->start || (size_t)t->end > w->len)
        return -1;
    if (w->js[p] != (object ? '{' : '['))
        return -1;
    p++;
    /* Each member or element begins where its first token's text does:
     * the bytes before it must be the separator and whitespace. */
    for (int k = 0; k < t->size; k++) {
        if (j >= w->ntok)
            return -1;
        ptrdiff_t at = tok_begin(&w->dec->toks[j]);
        if (at < 0 || (size_t)at > w->len || !json_gap(w->js, p, (size_t)at, k > 0 ? ',' : 0))
            return -1;
        p = (size_t)at;
        if (object) {
            int key = j;
            if ((j = check_string(w, j, &p)) < 0)
                return -1;
            bool key_escaped = w->escaped;
            if (j >= w->ntok)
                return -1;
            at = tok_begin(&w->dec->toks[j]);
            if (at < 0 || (size_t)at > w->len || !json_gap(w->js, p, (size_t)at, ':'))
                return -1;
            p = (size_t)at;
            int vi = j;
            if ((j = check_value(w, j, &p, false)) < 0)
                return -1;
            if (top && w->err == TLY_OK) {
                int fid = key_field(w, &w->dec->toks[key], key_escaped);
                if (fid >= 0)
                    extract(w, fid, vi);
            }
        } else if ((j = check_value(w, j, &p, false)) < 0) {
            return -1;
        }
    }
    p = skip_ws(w->js, p, w->len);
    if (p >= w->len || w->js[p] != close || p + 1 != (size_t)t->end)
        return -1;
    *pos = p + 1;
    return j;
}

/* Checks the value whose first token is i and which must begin at *pos.
 * Recursion depth is bounded by TLY_DECODE_MAX_TOKENS. */
static int check_value(walk_t *w, int i, size_t *pos, bool top)
{
    const jsmntok_t *t = &w->dec->toks[i];
    switch (t->type) {
    case JSMN_STRING:
        return check_string(w, i, pos);
    case JSMN_PRIMITIVE:
        if (t->start < 0 || (size_t)t->start != *pos || t->end <= t->start ||
            (size_t)t->end > w->len ||
            !json_primitive(w->js + t->start, (size_t)(t->end - t->start), w))
            return -1;
        *pos = (size_t)t->end;
        return i + 1;
    case JSMN_OBJECT:
    case JSMN_ARRAY:
        return check_container(w, i, pos, top);
    default:
        return -1;
    }
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
    if (v->type == TLY_V_NIL || w->time_tok < 0)
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
        const jsmntok_t *tok = &w->dec->toks[w->time_tok];
        if (!number_to_ms(w->js + tok->start, (size_t)(tok->end - tok->start), s ? 3 : 0, !s, &t))
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

tly_err_t tly_decode_json(tly_decoder_t *dec, const char *payload, size_t len, int64_t kafka_ts_ms,
                          tly_event_t *ev)
{
    const tly_featset_t *fs = dec->fs;
    jsmn_parser parser;

    if (payload == NULL)
        len = 0;
    if ((dec->rules.max_bytes > 0 && len > (uint64_t)dec->rules.max_bytes) || len > DECODE_MAX_LEN)
        return TLY_E_EV_TOO_LARGE;
    /* jsmn stops at a NUL byte (JSON never holds a raw one); the walk below
     * checks every byte, so a NUL anywhere is rejected there, or by jsmn
     * itself inside a string or an unclosed container. */
    if (len == 0)
        return TLY_E_EV_BAD_JSON;

    jsmn_init(&parser);
    int ntok = jsmn_parse(&parser, payload, len, dec->toks, TLY_DECODE_MAX_TOKENS);
    if (ntok == JSMN_ERROR_NOMEM)
        return TLY_E_EV_TOO_COMPLEX;
    if (ntok <= 0)
        return TLY_E_EV_BAD_JSON;

    scratch_reserve(dec, len + 1);
    dec->used = 0;
    ev->nfields = (uint32_t)fs->nfields;
    ev->replayed = false;
    ev->skip_entities =
        dec->rules.key_entity >= 0 ? ~(UINT64_C(1) << dec->rules.key_entity) : 0;
    for (size_t i = 0; i < fs->nfields; i++)
        ev->vals[i] = (tly_value_t){.type = TLY_V_NIL};

    walk_t w = {.dec = dec,
                .js = payload,
                .len = len,
                .ntok = ntok,
                .ev = ev,
                .err = TLY_OK,
                .time_tok = -1};
    size_t pos = skip_ws(payload, 0, len);
    bool object = dec->toks[0].type == JSMN_OBJECT;
    int next = check_value(&w, 0, &pos, object);
    if (next != ntok || skip_ws(payload, pos, len) != len)
        return TLY_E_EV_BAD_JSON;
    if (!object)
        return TLY_E_EV_NOT_OBJECT;
    if (w.err != TLY_OK)
        return w.err;
    return event_time(&w, kafka_ts_ms);
}
