/*
 * error.h — the one error enum of tallyd.
 *
 * Every fallible function returns a tly_err_t. The list below is the single
 * source: the enum, tly_strerror() and tly_err_name() are generated from it,
 * and the decode/apply rejection reasons are part of it so that one counter
 * array indexed by tly_err_t can count every kind of dropped event.
 *
 * Pure; callable from any thread.
 */
#ifndef TALLYD_ERROR_H
#define TALLYD_ERROR_H

/* X(NAME, "sentence") — NAME becomes TLY_E_NAME (TLY_OK for OK). */
#define TLY_ERRORS(X)                                                                              \
    X(OK, "success")                                                                               \
    X(NOMEM, "out of memory")                                                                      \
    X(INVAL, "invalid argument")                                                                   \
    X(CONFIG, "invalid configuration")                                                             \
    X(IO, "input/output error")                                                                    \
    X(NOTFOUND, "not found")                                                                       \
    X(RANGE, "value out of range")                                                                 \
    X(FULL, "limit reached")                                                                       \
    /* event rejection reasons (counted per reason) */                                             \
    X(EV_TOO_LARGE, "event payload exceeds events.max_bytes")                                      \
    X(EV_BAD_JSON, "event payload is not valid JSON")                                              \
    X(EV_NOT_OBJECT, "event payload is not a JSON object")                                         \
    X(EV_TOO_COMPLEX, "event has more JSON tokens than the decoder allows (256)")                  \
    X(EV_MISSING_KEY, "event lacks a key field a feature needs")                                   \
    X(EV_WRONG_TYPE, "event field has the wrong type")                                             \
    X(EV_VALUE_TOO_LONG, "event string value exceeds events.max_string")                           \
    X(EV_MISSING_TIME, "event lacks the configured time field")                                    \
    X(EV_BAD_TIME, "event time is not in the configured unit or format")                           \
    X(EV_LATE, "event is older than the longest window")                                           \
    X(EV_FUTURE, "event is further in the future than max_future_skew")                            \
    X(EV_MISROUTED, "event's key entity id hashes (murmur2) to another partition than its own")    \
    X(EV_STORE_FULL, "the store holds store.max_memory: the event's new entity was not created")

typedef enum {
#define TLY_ERR_ENUM_(name, text) TLY_E_##name,
    TLY_ERRORS(TLY_ERR_ENUM_)
#undef TLY_ERR_ENUM_
        TLY_E__COUNT
} tly_err_t;

#define TLY_OK TLY_E_OK

/* Returns a static sentence describing err ("unknown error" if out of range). */
const char *tly_strerror(tly_err_t err);

/* Returns the static upper-case name of err without prefix ("EV_LATE"). */
const char *tly_err_name(tly_err_t err);

#endif
