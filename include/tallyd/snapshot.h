/*
 * snapshot.h — periodic snapshots of the store with the Kafka positions they
 * cover, and recovery from them at start-up.
 *
 * A snapshot is one consistent cut: the poll thread, between two messages,
 * forks; the child writes the store and the positions of that instant to a
 * file (snapfile.h: temp file, fsync, rename, directory fsync) and exits,
 * while the parent goes on consuming at once — ingest pauses only for the
 * fork itself (the page tables are copied; the memory is shared copy-on-
 * write). When the child has exited 0, the parent commits the positions to
 * the consumer group (lag tools) and prunes old files. At shutdown the
 * final snapshot is written in-process after the poll thread stopped.
 *
 * Recovery: the newest snapshot whose checks pass (header, every block's
 * CRC32C, zstd, the store's own checks, the end block) and whose feature
 * definitions hash equals the config's is loaded; each partition resumes at
 * its stored position. A snapshot that fails is reported and the next older
 * one is tried; with none, tallyd rebuilds from Kafka history as
 * kafka.start says. When feature definitions changed, the features whose
 * definition is unchanged (a hash per feature, in the state's layout
 * items) are loaded, translated to the new records' layout, and the
 * others (new or changed) start empty and are rebuilt from history: those
 * partitions start where kafka.start says (no later than the stored
 * position), and events below the stored position are marked `replayed`,
 * which feeds only the features not restored (tly_source_catch_up).
 *
 * Threads: new/restore/final/free on the main thread; the checkpoint hook
 * on the source's poll thread; stats on any thread.
 */
#ifndef TALLYD_SNAPSHOT_H
#define TALLYD_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tallyd/config.h"
#include "tallyd/error.h"
#include "tallyd/feature.h"
#include "tallyd/source.h"
#include "tallyd/store.h"

typedef struct tly_snapshotter tly_snapshotter_t;

typedef struct {
    uint64_t written;          /* snapshots made durable */
    uint64_t failed;           /* snapshot attempts that failed (disk full, I/O error, ...) */
    bool in_progress;          /* a writer runs now */
    int64_t last_ms;           /* creation time of the newest durable snapshot, -1 none */
    int64_t last_write_ms;     /* how long writing it took */
    int64_t last_pause_us;     /* how long ingest paused to start it (the fork) */
    int64_t max_pause_us;      /* the longest such pause */
    uint64_t last_bytes;       /* its size */
    uint64_t last_rebalances;  /* the source's assignment changes it covers */
    uint64_t loaded_entities;  /* entities restored at start-up */
    int64_t loaded_ms;         /* creation time of the snapshot restored, -1 none */
    uint64_t rejected;         /* snapshots found unusable at start-up */
    uint64_t outdated;         /* passed over at start-up: every feature redefined since */
    uint64_t restored_types;   /* entity types whose features were all restored (bit per type) */
    uint64_t rebuilt_types;    /* entity types none of whose features were restored */
    uint64_t rebuilt_feats[TLY_MAX_FEATURES / 64]; /* features rebuilt: new or changed */
    char last_path[640];       /* the newest durable snapshot */
    char last_error[320];      /* the latest failure, "" none */
} tly_snapshot_stats_t;

/* The hash of cfg's feature definitions that a snapshot must match. */
uint64_t tly_snapshot_defs_hash(const tly_config_t *cfg);

/* The hash of feature i's definition (cfg->features[i]) together with the
 * rules that decide whether an event is accepted at all (fields read,
 * value checks, keys and filters per entity type, events.* and topic
 * limits, store.idle_ttl): a snapshot's state of the feature is restored
 * under cfg only when this is unchanged. */
uint64_t tly_snapshot_feature_hash(const tly_config_t *cfg, size_t i);

/* Returns a snapshotter for cfg's snapshot.* settings, or NULL when
 * snapshot.dir is "" (snapshots off). */
tly_snapshotter_t *tly_snapshot_new(const tly_config_t *cfg);

/*
 * Loads the newest usable snapshot into a new store for fs and keeps its
 * positions for tly_snapshot_attach. Returns the store, or NULL when no
 * snapshot was usable (each failure is logged). Main thread, before the
 * source starts; RCU-registered.
 */
tly_store_t *tly_snapshot_restore(tly_snapshotter_t *sn, const tly_featset_t *fs);

/* Gives src the restored positions (tly_source_resume_at) and makes it
 * call the periodic snapshot of store between messages. Before start. */
void tly_snapshot_attach(tly_snapshotter_t *sn, tly_store_t *store, tly_source_t *src);

/*
 * The shutdown snapshot: waits for a running writer, then writes the store
 * and src's positions in-process (src halted: nothing changes meanwhile),
 * and commits the positions once durable. Main thread.
 */
tly_err_t tly_snapshot_final(tly_snapshotter_t *sn, tly_source_t *src);

/* Waits for a running writer and frees sn. NULL ok. Main thread. */
void tly_snapshot_free(tly_snapshotter_t *sn);

void tly_snapshot_stats(tly_snapshotter_t *sn, tly_snapshot_stats_t *st);

#endif
