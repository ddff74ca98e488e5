/*
 * corpus.h — replays a fuzz target's corpus in a unit test: every regular
 * file of a directory, read whole, handed to the target's checks. Included
 * by the unit tests after <cmocka.h>; a test binary is one thread.
 */
#ifndef TALLYD_TEST_CORPUS_H
#define TALLYD_TEST_CORPUS_H

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

/* Receives one corpus file: its path and bytes (buf[len] is readable). */
typedef void (*corpus_check_cb)(void *ctx, const char *path, const uint8_t *buf, size_t len);

/* Calls check on every regular file of dir (relative to the repository
 * root, where `make test` runs) and returns how many there were; fails the
 * test when dir cannot be opened. */
static int corpus_replay(const char *dir, corpus_check_cb check, void *ctx)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        fail_msg("cannot open %s (run from the repository root)", dir);
    int files = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        char path[512];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        FILE *fp = fopen(path, "rb");
        assert_non_null(fp);
        size_t cap = (size_t)st.st_size + 1;
        uint8_t *buf = malloc(cap);
        assert_non_null(buf);
        size_t len = fread(buf, 1, cap, fp);
        fclose(fp);
        check(ctx, path, buf, len);
        free(buf);
        files++;
    }
    closedir(d);
    return files;
}

#endif
