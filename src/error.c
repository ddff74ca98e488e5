/*
 * error.c — tly_strerror() and tly_err_name(), generated from TLY_ERRORS.
 * Pure; any thread.
 */
#include "tallyd/error.h"

static const char *const err_text[] = {
#define TLY_ERR_TEXT_(name, text) text,
    TLY_ERRORS(TLY_ERR_TEXT_)
#undef TLY_ERR_TEXT_
};

static const char *const err_names[] = {
#define TLY_ERR_NAME_(name, text) #name,
    TLY_ERRORS(TLY_ERR_NAME_)
#undef TLY_ERR_NAME_
};

const char *tly_strerror(tly_err_t err)
{
    if ((unsigned)err >= TLY_E__COUNT)
        return "unknown error";
    return err_text[err];
}

const char *tly_err_name(tly_err_t err)
{
    if ((unsigned)err >= TLY_E__COUNT)
        return "UNKNOWN";
    return err_names[err];
}
