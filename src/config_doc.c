/*
 * config_doc.c — the configuration described for people: `--help-config`
 * (plain text, or the Markdown table of the README) generated from the key
 * table, and `--check-config`'s one-screen summary of a loaded config.
 *
 * Pure: writes to the FILE it is given; any thread.
 */
#include "tallyd/config.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "config_int.h"
#include "tallyd/window.h"

static const char *type_name(key_type_t type)
{
    static const char *const names[] = {
        [K_STRING] = "string",
        [K_INT] = "int",
        [K_DURATION] = "duration",
        [K_BOOL] = "bool",
        [K_ENUM] = "enum",
        [K_AGG] = "enum",
        [K_STRINGS] = "string list",
        [K_DURATIONS] = "duration list",
        [K_MAP] = "map",
        [K_WHERE] = "map",
        [K_FEATURES] = "list of features",
        [K_TOPICS] = "topic list",
    };
    return names[type];
}

/* Writes the default of def as shown in the reference. */
static void default_text(const key_def_t *def, char *buf, size_t cap)
{
    if (def->flags & F_REQUIRED)
        snprintf(buf, cap, "required");
    else if ((def->type == K_STRINGS || def->type == K_TOPICS) && def->def)
        snprintf(buf, cap, "[%s]", def->def);
    else if (def->type == K_MAP)
        snprintf(buf, cap, "{}");
    else if (def->type == K_STRING && def->def)
        snprintf(buf, cap, "\"%s\"", def->def);
    else if (def->def)
        snprintf(buf, cap, "%s", def->def);
    else if (strcmp(def->key, "features[].hop") == 0)
        snprintf(buf, cap, "per window");
    else if (def->scope == S_TOPIC && strstr(def->key, ".events."))
        snprintf(buf, cap, "%s", strstr(def->key, ".events.") + 1); /* the top-level key */
    else
        snprintf(buf, cap, "none");
}

/* Writes the accepted values of def: range, choices or form. */
static void accepts_text(const key_def_t *def, char *buf, size_t cap)
{
    if (def->type == K_ENUM || def->type == K_AGG || def->choices)
        tly_config_choices_text(def, buf, cap);
    else if (def->flags & F_IDENT)
        snprintf(buf, cap, "[A-Za-z0-9_]+");
    else if (def->flags & F_ADDR)
        snprintf(buf, cap, "host:port");
    else
        tly_config_range_text(def, buf, cap);
}

/* Prints text with Markdown table cell metacharacters escaped. */
static void md_cell(FILE *out, const char *text)
{
    fputs("| ", out);
    for (; *text; text++) {
        if (*text == '|')
            fputc('\\', out);
        fputc(*text, out);
    }
    fputc(' ', out);
}

/* Prints text word-wrapped at width columns, each line indented. */
static void print_wrapped(FILE *out, const char *text, int indent, int width)
{
    int col = 0;
    while (*text) {
        int n = (int)strcspn(text, " ");
        if (col > 0 && col + 1 + n > width) {
            fputc('\n', out);
            col = 0;
        }
        if (col == 0)
            col = fprintf(out, "%*s%.*s", indent, "", n, text);
        else
            col += fprintf(out, " %.*s", n, text);
        text += n;
        text += strspn(text, " ");
    }
    fputc('\n', out);
}

void tly_config_help(FILE *out, int markdown)
{
    char dflt[TEXT_CAP], accepts[TEXT_CAP];
    if (markdown) {
        fputs("| key | type | default | accepts | description |\n"
              "| --- | --- | --- | --- | --- |\n",
              out);
    } else {
        fputs("tallyd configuration keys (YAML). Sections and keys are optional unless\n"
              "marked required; unknown keys are errors. Durations are <n>ms|s|m|h|d.\n"
              "A list key also accepts a single value; `key:` with no value keeps the\n"
              "default. Omit events.time to use the Kafka message timestamp.\n",
              out);
    }
    for (size_t i = 0; i < tly_config_nkeys; i++) {
        const key_def_t *def = &tly_config_keys[i];
        default_text(def, dflt, sizeof dflt);
        accepts_text(def, accepts, sizeof accepts);
        if (markdown) {
            char key[PATH_CAP];
            snprintf(key, sizeof key, "`%s`", def->key);
            md_cell(out, key);
            md_cell(out, type_name(def->type));
            md_cell(out, dflt);
            md_cell(out, accepts);
            md_cell(out, def->doc);
            fputs("|\n", out);
        } else {
            fprintf(out, "\n%s (%s%s%s; %s%s)\n", def->key, type_name(def->type),
                    accepts[0] ? ": " : "", accepts, def->flags & F_REQUIRED ? "" : "default ",
                    dflt);
            print_wrapped(out, def->doc, 4, 78);
        }
    }
}

/* Prints items joined with sep. */
static void print_list(FILE *out, char *const *items, size_t n, const char *sep)
{
    for (size_t i = 0; i < n; i++)
        fprintf(out, "%s%s", i ? sep : "", items[i]);
}

static const char *choice_name(const choice_t *choices, int value)
{
    for (const choice_t *c = choices; c->name; c++) {
        if (c->value == value)
            return c->name;
    }
    return "?";
}

static void summary_feature(const tly_feature_cfg_t *feat, FILE *out)
{
    char len[32], hop[32];
    fprintf(out, "  %-16s %-6s", feat->name, tly_agg_name(feat->agg));
    for (size_t w = 0; w < feat->nwhere; w++) {
        const tly_where_cfg_t *where = &feat->where[w];
        fprintf(out, "%s%s %s ", w ? " and " : "  where ", where->field,
                where->nvalues > 1 ? "in" : "=");
        print_list(out, where->values, where->nvalues, "|");
    }
    if (feat->nvalues > 0) {
        fprintf(out, "  value%s ", feat->nvalues > 1 ? "s" : "");
        print_list(out, feat->values, feat->nvalues, ", ");
    }
    if (feat->agg == TLY_AGG_LAST_K)
        fprintf(out, "  k %" PRIu32, feat->k);
    fputc('\n', out);
    for (size_t w = 0; w < feat->nwindows; w++) {
        int64_t h = feat->hop_ms ? feat->hop_ms : tly_window_default_hop(feat->windows_ms[w]);
        fprintf(out, "%s%s (hop %s, %" PRId64 " buckets)", w ? ", " : "    windows ",
                tly_duration_format(feat->windows_ms[w], len, sizeof len),
                tly_duration_format(h, hop, sizeof hop),
                tly_window_nbuckets(feat->windows_ms[w], h));
    }
    if (feat->nwindows > 0)
        fputc('\n', out);
}

void tly_config_summary(const tly_config_t *cfg, FILE *out)
{
    char skew[32];
    size_t nentities = 0;
    for (size_t i = 0; i < cfg->nfeatures; i++) {
        size_t j = 0;
        while (j < i && strcmp(cfg->features[j].entity, cfg->features[i].entity) != 0)
            j++;
        nentities += j == i;
    }
    fprintf(out, "%s: ok, %zu feature%s over %zu entit%s\n", cfg->path, cfg->nfeatures,
            cfg->nfeatures == 1 ? "" : "s", nentities, nentities == 1 ? "y" : "ies");
    fprintf(out, "source  kafka %s, topics ", cfg->kafka.brokers);
    print_list(out, cfg->kafka.topics, cfg->kafka.ntopics, ", ");
    fprintf(out, ", mode %s, start %s\n",
            choice_name(tly_config_mode_choices, (int)cfg->kafka.mode),
            choice_name(tly_config_start_choices, (int)cfg->kafka.start));
    if (cfg->events.time_field)
        fprintf(out, "time    event field %s (%s)", cfg->events.time_field,
                choice_name(tly_config_unit_choices, (int)cfg->events.time_unit));
    else
        fputs("time    Kafka message timestamp", out);
    fprintf(out, ", max future skew %s\n",
            tly_duration_format(cfg->events.max_future_skew_ms, skew, sizeof skew));
    for (size_t i = 0; i < cfg->kafka.ntopics; i++) {
        const tly_topic_cfg_t *t = &cfg->kafka.topic_cfgs[i];
        if (!t->own_events)
            continue;
        fprintf(out, "topic   %s: ", t->name);
        if (t->time_field)
            fprintf(out, "event field %s (%s)", t->time_field,
                    choice_name(tly_config_unit_choices, (int)t->time_unit));
        else
            fputs("Kafka message timestamp", out);
        fprintf(out, ", max future skew %s, max bytes %" PRId64 ", max string %" PRId64 "\n",
                tly_duration_format(t->max_future_skew_ms, skew, sizeof skew), t->max_bytes,
                t->max_string);
    }
    fprintf(out, "serve   RESP %s%s, admin %s\n", cfg->server.listen,
            cfg->server.requirepass[0] ? " (AUTH required)" : "",
            cfg->server.admin[0] ? cfg->server.admin : "off");

    /* Entities in order of first appearance, each with its features. */
    for (size_t i = 0; i < cfg->nfeatures; i++) {
        const tly_feature_cfg_t *first = &cfg->features[i];
        size_t j = 0;
        while (j < i && strcmp(cfg->features[j].entity, first->entity) != 0)
            j++;
        if (j < i)
            continue;
        fprintf(out, "\nentity %s, key ", first->entity);
        print_list(out, first->keys, first->nkeys, ", ");
        fputc('\n', out);
        for (j = i; j < cfg->nfeatures; j++) {
            if (strcmp(cfg->features[j].entity, first->entity) == 0)
                summary_feature(&cfg->features[j], out);
        }
    }
}
