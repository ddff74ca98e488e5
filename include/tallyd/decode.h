/*
 * decode.h — event payload → tly_event_t.
 *
 * JSON objects are checked against the JSON grammar in one pass that also
 * extracts the top-level keys some feature references (nested objects and
 * arrays are checked, not extracted). Integers become TLY_V_INT (int64; an integer that does
 * not fit is a double), numbers with a fraction or exponent TLY_V_DOUBLE,
 * strings TLY_V_STR (escapes decoded into the decoder's scratch), true/false
 * TLY_V_BOOL, null TLY_V_NIL. When a key repeats, the last one wins, unless
 * an earlier value is one that rejects the event (an object or array, a
 * string over max_string, a number beyond double range): see decode.c.
 *
 * Event time comes from the configured field (ms, s or ISO 8601) or, with no
 * time field, from the Kafka message timestamp passed in. Each decoder reads
 * by one set of event rules: the top level's, or one topic's
 * (kafka.topics[].events overrides).
 *
 * A rejected payload leaves nothing behind: the caller applies only events
 * for which decode returned TLY_OK.
 *
 * A decoder is used by one thread at a time (it owns a scratch buffer);
 * make one per source thread.
 */
#ifndef TALLYD_DECODE_H
#define TALLYD_DECODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/error.h"
#include "tallyd/feature.h"

typedef struct tly_decoder tly_decoder_t;

/* Most JSON tokens one payload may hold (each object, array, key and value is
 * one token); a payload with more is rejected with EV_TOO_COMPLEX, unless a
 * grammar error (EV_BAD_JSON) comes before the first token too many. */
#define TLY_DECODE_MAX_TOKENS 256

/* Returns a new decoder for fs (borrowed; must outlive it) reading events
 * by the top-level events.* settings (fs->events). Aborts on OOM. */
tly_decoder_t *tly_decoder_new(const tly_featset_t *fs);

/* Same, reading events by rules (copied; e.g. &fs->topics[i] for a topic's
 * events): its time field and unit, max_bytes and max_string. Time fields
 * of other topics are not extracted (they stay TLY_V_NIL). Aborts on OOM,
 * or when rules' time field is not one of fs's fields. */
tly_decoder_t *tly_decoder_new_rules(const tly_featset_t *fs, const tly_event_rules_t *rules);

/* Frees dec. NULL is allowed. */
void tly_decoder_free(tly_decoder_t *dec);

/*
 * Decodes payload[0..len) into *ev. kafka_ts_ms is used as the event time
 * when the featset has no time field (pass -1 if unknown: then such a config
 * rejects with EV_MISSING_TIME). Returns TLY_OK, or one of the TLY_E_EV_*
 * reasons (EV_TOO_LARGE, EV_BAD_JSON, EV_NOT_OBJECT, EV_TOO_COMPLEX,
 * EV_WRONG_TYPE, EV_VALUE_TOO_LONG, EV_MISSING_TIME, EV_BAD_TIME).
 * String values in *ev stay valid until the next call on dec or until payload
 * is freed, whichever comes first. On any error *ev may be partly written and
 * must not be used.
 */
tly_err_t tly_decode_json(tly_decoder_t *dec, const char *payload, size_t len, int64_t kafka_ts_ms,
                          tly_event_t *ev);

/* Whether dec reads payloads by the shapes it learnt from earlier ones (on
 * by default). A shape is the bytes between the values of an accepted
 * event; a payload with the same bytes there has its values scanned and
 * checked alone, the same result as the whole grammar walk, which reads
 * every other payload. Off: the walk reads every payload (tests compare
 * the two). */
void tly_decoder_set_shapes(tly_decoder_t *dec, bool on);

/* How many payloads dec read by a shape. */
uint64_t tly_decoder_shaped(const tly_decoder_t *dec);

/* Parses an ISO 8601 UTC time ("2026-11-22T04:16:21Z", optional .fff and
 * ±hh:mm) into epoch ms. Returns TLY_OK or TLY_E_EV_BAD_TIME. Event times, in
 * every unit, must lie in [1970-01-01T00:00:00Z, 2101-01-01T00:00:00Z). */
tly_err_t tly_decode_iso8601(const char *s, size_t len, int64_t *ms);

#endif
