/*
 * main.c — tallyd's command line.
 *
 *   tallyd --config FILE                run the daemon on FILE
 *   tallyd --check-config FILE          validate FILE, print its summary
 *   tallyd --help-config [--markdown]   reference of every config key
 *   tallyd --help | --version
 *
 * Exit status: 0 success; 1 the config is invalid (its error on stderr,
 * "FILE:LINE: key.path: sentence"); 2 wrong usage, or `--config` while the
 * serving layer is not built yet. A config is valid when tly_config_load()
 * accepts it and tly_featset_compile() compiles its features, so
 * --check-config catches every error that --config would.
 *
 * Runs on the main thread only; owns no global state.
 */
#include "tallyd/config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "tallyd/feature.h"
#include "tallyd/version.h"

#define ERR_CAP 1024

enum { EXIT_INVALID = 1, EXIT_USAGE = 2 };

enum { OPT_CONFIG = 256, OPT_CHECK_CONFIG, OPT_HELP_CONFIG, OPT_MARKDOWN, OPT_HELP, OPT_VERSION };

static void usage(FILE *out)
{
    fputs("usage: tallyd --config FILE                run the daemon\n"
          "       tallyd --check-config FILE          validate FILE and summarise its features\n"
          "       tallyd --help-config [--markdown]   list every configuration key\n"
          "       tallyd --help | --version\n",
          out);
}

/* Loads path and compiles its features. Returns TLY_OK with *cfg and *fs
 * (caller frees both, fs first), or prints the error to stderr. */
static tly_err_t load(const char *path, tly_config_t **cfg, tly_featset_t **fs)
{
    char err[ERR_CAP];
    tly_config_t *loaded = NULL;
    tly_featset_t *compiled = NULL;
    tly_err_t rc = tly_config_load(path, &loaded, err, sizeof err);
    if (rc == TLY_OK)
        rc = tly_featset_compile(loaded, &compiled, err, sizeof err);
    if (rc != TLY_OK) {
        fprintf(stderr, "%s\n", err);
        tly_config_free(loaded);
        return rc;
    }
    *cfg = loaded;
    *fs = compiled;
    return TLY_OK;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, OPT_CONFIG},
        {"check-config", required_argument, NULL, OPT_CHECK_CONFIG},
        {"help-config", no_argument, NULL, OPT_HELP_CONFIG},
        {"markdown", no_argument, NULL, OPT_MARKDOWN},
        {"help", no_argument, NULL, OPT_HELP},
        {"version", no_argument, NULL, OPT_VERSION},
        {NULL, 0, NULL, 0},
    };
    int mode = 0, markdown = 0, opt;
    const char *path = NULL;

    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case OPT_MARKDOWN:
            markdown = 1;
            break;
        case OPT_CONFIG:
        case OPT_CHECK_CONFIG:
            path = optarg;
            /* fall through */
        case OPT_HELP_CONFIG:
        case OPT_HELP:
        case OPT_VERSION:
            if (mode != 0) { /* one action per run */
                usage(stderr);
                return EXIT_USAGE;
            }
            mode = opt;
            break;
        default: /* getopt_long has named the bad option */
            usage(stderr);
            return EXIT_USAGE;
        }
    }
    if (optind < argc || mode == 0 || (markdown && mode != OPT_HELP_CONFIG)) {
        usage(stderr);
        return EXIT_USAGE;
    }

    switch (mode) {
    case OPT_HELP:
        usage(stdout);
        return EXIT_SUCCESS;
    case OPT_VERSION:
        printf("tallyd %s\n", TALLYD_VERSION);
        return EXIT_SUCCESS;
    case OPT_HELP_CONFIG:
        tly_config_help(stdout, markdown);
        return EXIT_SUCCESS;
    default:
        break;
    }

    tly_config_t *cfg = NULL;
    tly_featset_t *fs = NULL;
    if (load(path, &cfg, &fs) != TLY_OK)
        return EXIT_INVALID;
    int status = EXIT_SUCCESS;
    if (mode == OPT_CHECK_CONFIG) {
        tly_config_summary(cfg, stdout);
    } else {
        fputs("tallyd: serving is not implemented yet\n", stderr);
        status = EXIT_USAGE;
    }
    tly_featset_free(fs);
    tly_config_free(cfg);
    return status;
}
