#!/usr/bin/env python3
"""A feature definition changes between two runs of tallyd (real broker).

Run 1 consumes a first batch of seeded events with e2e.py's features and
stops with SIGTERM, leaving a final snapshot. Run 2 starts with one pin
feature changed (`impressions` gets a `7d` window besides `1h` and `1d`)
after a second batch arrived: every other feature is restored from the
snapshot, `impressions` is rebuilt from Kafka history (INFO persistence
names it), the history is read again but feeds only `impressions` below
the snapshot's offsets, and every value of every user and pin equals the
ground truth for the new definitions over both batches (nothing counted
twice). A snapshot is written once the rebuild is done; run 3, with the
new definitions, restores everything from it and reads nothing.

Run 4, after run 3, removes one user feature and changes nothing else:
every other feature restores and nothing is read again.

Run 2b proves the other pin features were loaded, not rebuilt: it starts
from a copy of run 1's snapshot with `kafka.start: latest`, so history
below the snapshot's offsets is not read at all; `impressions` then counts
the second batch only while every other pin feature still counts both.

Run: build/venv/bin/python tests/integration/kafka_redefine.py (a broker
from TLY_KAFKA_BOOTSTRAP, else one started for this run).
"""

import copy
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
import yaml  # noqa: E402
from kafka_common import E  # noqa: E402

NBATCH1 = 30_000
NBATCH2 = 10_000
PARTITIONS = 8
LEAD_MS = 240_000


class Run:
    pass


def changed_features():
    feats = copy.deepcopy(K.FEATURES)
    hits = [f for f in feats if f["entity"] == "pin" and f["name"] == "impressions"]
    if len(hits) != 1:
        raise RuntimeError("the features have no single pin feature 'impressions' to change")
    hits[0]["windows"] = list(hits[0]["windows"]) + ["7d"]
    return feats


def start(r, features, name, start_at="earliest", snapdir=None, port=None, events=None):
    path, cfg = K.write_config(r.tmp, r.bootstrap, port or r.port, r.topic, "replica", start_at,
                               features, name=name, group=f"{r.group}-{name}")
    cfg["snapshot"] = {"dir": str(snapdir or r.snapdir), "every": "1s", "keep": 3}
    if events:
        cfg["events"] = dict(cfg.get("events") or {}, **events)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return K.Tallyd(path, port or r.port, r.tmp, name=name), cfg, path


def stop(t):
    rc = t.close()
    if rc != 0:
        raise H.Failure(f"tallyd exited with {rc} on SIGTERM:\n{t.log_tail()}")


def persistence(t):
    c = t.client()
    try:
        text = c.cmd("INFO", "persistence")
    finally:
        c.close()
    return H.parse_info(text.decode())


def wait_ready(t, name):
    """Waits until queries are served: after a restore that means caught up,
    so any replay of history is in messages_consumed by then."""
    end = H.deadline(30)
    while t.client().info().get("loading") != "0":
        if time.monotonic() > end:
            raise H.Failure(f"{name} still loading:\n" + t.log_tail())
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


def check_values(r, t, cfg, path, model):
    """FEATURES of every user and pin against model."""
    c = K.ctx(t, cfg, path, model, r.asof, r.users, r.pins, r.produced,
              int(time.time() * 1000), r.tmp)
    try:
        E.t_features_all(c, "user", c.users, 2)
        E.t_features_all(c, "pin", c.pins, 2)
    finally:
        c.cli.close()


def setup():
    H.check_binaries(H.TALLYD)
    r = Run()
    r.t0 = int(time.time() * 1000)
    r.asof = (r.t0 + LEAD_MS) // 1000 * 1000
    r.tmp = H.make_tmpdir("tly-kafka-redefine-")
    r.snapdir = Path(r.tmp) / "snapshots"
    r.bootstrap = K.broker()
    r.topic = K.topic_name("tly-redefine")
    r.group = f"tly-redefine-{K.RUN_ID}"
    r.port = H.free_port()
    K.create_topic(r.bootstrap, r.topic, PARTITIONS)
    ev1, lines1, r.users, r.pins = E.generate(r.asof, nevents=NBATCH1, seed=E.SEED + 303)
    ev2, lines2, users2, pins2 = E.generate(r.asof, nevents=NBATCH2, seed=E.SEED + 404)
    r.users = sorted(set(r.users) | set(users2))
    r.pins = sorted(set(r.pins) | set(pins2))
    r.per_part = K.produce(r.bootstrap, r.topic, K.records(ev1, lines1, r.asof - E.HOUR))

    # Run 1: the original definitions, stopped with SIGTERM (final snapshot).
    t1, _, _ = start(r, K.FEATURES, "tallyd-1")
    K.wait_caught_up(t1, len(lines1))
    r.info1 = t1.client().info()
    stop(t1)
    r.snapdir_b = Path(r.tmp) / "snapshots-run1"
    shutil.copytree(r.snapdir, r.snapdir_b)
    r.ev1, r.ev2 = ev1, ev2

    # The second batch arrives while tallyd is down; run 2 has new definitions.
    for p, n in K.produce(r.bootstrap, r.topic, K.records(ev2, lines2, r.asof - E.HOUR)).items():
        r.per_part[p] = r.per_part.get(p, 0) + n
    r.produced = len(lines1) + len(lines2)
    r.features2 = changed_features()
    t2, cfg2, path2 = start(r, r.features2, "tallyd-2")
    r.info2 = K.wait_caught_up(t2, r.produced)
    r.pers2 = persistence(t2)
    r.model = E.Model(cfg2, ev1 + ev2, r.asof, r.t0)
    r.c2 = K.ctx(t2, cfg2, path2, r.model, r.asof, r.users, r.pins, r.produced,
                 int(time.time() * 1000), r.tmp)
    r.bad = 2 * (E.BAD_JSON + E.MISSING_TIME)
    print(f"# broker {r.bootstrap}, topic {r.topic}: {len(lines1)} messages, then "
          f"{len(lines2)} with pin 'impressions' redefined; ASOF={r.asof}", flush=True)
    return r


def t_partial_restore(r):
    """Run 2 restored every feature but pin `impressions` from the snapshot."""
    m = H.Mismatches()
    p = r.pers2
    m.check(int(p.get("restored_snapshot_ms", "-1")) > 0,
            f"restored_snapshot_ms {p.get('restored_snapshot_ms')}: no snapshot restored")
    m.eq(p.get("restored_entity_types"), "user", "INFO restored_entity_types")
    m.eq(p.get("rebuilt_entity_types"), "", "INFO rebuilt_entity_types (pins are partly restored)")
    m.eq(p.get("rebuilt_features"), "pin.impressions", "INFO rebuilt_features")
    m.eq(p.get("snapshots_rejected"), "0", "INFO snapshots_rejected")
    restored, before = int(p.get("restored_entities", "0")), int(r.info1.get("entities", "0"))
    users1 = len({ev["user_id"] for ev in r.ev1 if ev is not None and "user_id" in ev})
    m.check(users1 < restored <= before,
            f"restored_entities {restored}: want more than run 1's {users1} users (pins are "
            f"restored too) and at most the {before} entities run 1 held")
    m.done()


def t_ingest(r):
    """The history is read again (the pins need it): every message once."""
    K.check_ingest(r.c2, r.info2, r.produced, r.per_part, r.topic, r.bad)


def t_snapshot_after_rebuild(r):
    """Once the rebuild is past the restored offsets a snapshot is written
    for the new definitions; run 3 restores everything and reads nothing."""
    t2 = r.c2.tallyd
    end = H.deadline(30)
    while int(persistence(t2).get("snapshots_written", "0")) < 1:
        if time.monotonic() > end:
            raise H.Failure("no snapshot written after the rebuild:\n" + t2.log_tail())
        time.sleep(0.1)  # snapshot.every is 1 s; poll with a deadline
    r.c2.cli.close()
    stop(t2)
    t3, cfg3, path3 = start(r, r.features2, "tallyd-3")
    info3 = t3.client().info()
    pers3 = persistence(t3)
    m = H.Mismatches()
    m.eq(pers3.get("restored_entity_types"), "user,pin", "run 3 INFO restored_entity_types")
    m.eq(pers3.get("rebuilt_entity_types"), "", "run 3 INFO rebuilt_entity_types")
    wait_ready(t3, "run 3")
    info3 = t3.client().info()
    m.eq(info3.get("messages_consumed"), "0", "run 3 INFO messages_consumed")
    m.done()
    r.c3 = K.ctx(t3, cfg3, path3, r.model, r.asof, r.users, r.pins, r.produced,
                 int(time.time() * 1000), r.tmp)


def t_removed_feature_resumes(r):
    """Run 4: a user feature removed and nothing else changed: every other
    feature restores, nothing is read again, the values stay exact."""
    feats = [f for f in r.features2
             if not (f["entity"] == "user" and f["name"] == "min_click_dwell")]
    if len(feats) != len(r.features2) - 1:
        raise H.Failure("the features have no single user feature 'min_click_dwell' to remove")
    t, cfg, path = start(r, feats, "tallyd-4")
    try:
        wait_ready(t, "run 4")
        m = H.Mismatches()
        pers = persistence(t)
        m.eq(pers.get("rebuilt_features"), "", "run 4 INFO rebuilt_features")
        m.eq(pers.get("restored_entity_types"), "user,pin", "run 4 INFO restored_entity_types")
        m.eq(t.client().info().get("messages_consumed"), "0", "run 4 INFO messages_consumed")
        m.done()
        check_values(r, t, cfg, path, E.Model(cfg, r.ev1 + r.ev2, r.asof, r.t0))
    finally:
        rc = t.close()
    if rc != 0:
        raise H.Failure(f"tallyd 4 exited with {rc} on SIGTERM")


def t_loaded_not_rebuilt(r):
    """Run 2b: from run 1's snapshot with kafka.start latest, nothing below
    the snapshot's offsets is read: impressions counts the second batch
    only, every other feature both batches, so they came from the snapshot."""
    t, cfg, path = start(r, r.features2, "tallyd-2b", start_at="latest", snapdir=r.snapdir_b,
                         port=H.free_port())
    try:
        info = K.wait_caught_up(t, len(r.ev2))
        both = E.Model(cfg, r.ev1 + r.ev2, r.asof, r.t0)
        second = E.Model(cfg, [None] * len(r.ev1) + r.ev2, r.asof, r.t0)
        fi = [i for i, f in enumerate(both.feats) if f.entity == "pin" and f.name == "impressions"]
        for key in [k for k in both.kept if k[0] == fi[0]]:
            del both.kept[key]
        both.kept.update({k: v for k, v in second.kept.items() if k[0] == fi[0]})
        check_values(r, t, cfg, path, both)
        m = H.Mismatches()
        m.eq(info.get("messages_consumed"), str(len(r.ev2)),
             "INFO messages_consumed (the second batch only)")
        m.eq(persistence(t).get("rebuilt_features"), "pin.impressions", "INFO rebuilt_features")
        m.done()
    finally:
        rc = t.close()
    if rc != 0:
        raise H.Failure(f"tallyd 2b exited with {rc} on SIGTERM")


def t_every_feature_redefined_passes_over_snapshots(r):
    """Run 5: events.max_future_skew changed (what gets an event rejected, so
    every feature's definition): every snapshot is passed over as outdated,
    not counted as damaged, and every feature is rebuilt from history."""
    snapdir = Path(r.tmp) / "snapshots-run5"
    shutil.copytree(r.snapdir, snapdir)
    files = K.snapshot_files(snapdir)
    if not files:
        raise H.Failure(f"no snapshot in {snapdir} to pass over")
    # 6m instead of the tests' 5m: no event of the stream is further ahead
    t, cfg, path = start(r, r.features2, "tallyd-5", snapdir=snapdir, port=H.free_port(),
                         events={"max_future_skew": "6m"})
    try:
        info = K.wait_caught_up(t, r.produced)
        m = H.Mismatches()
        pers = persistence(t)
        m.eq(pers.get("snapshots_outdated"), str(len(files)),
             f"INFO snapshots_outdated ({[n for _, n in files]})")
        m.eq(pers.get("snapshots_rejected"), "0", "INFO snapshots_rejected")
        m.eq(pers.get("restored_snapshot_ms"), "-1", "INFO restored_snapshot_ms")
        m.eq(info.get("messages_consumed"), str(r.produced), "INFO messages_consumed (all)")
        log = Path(t.log_path).read_text(errors="replace")
        m.check("written for other definitions of every feature" in log and " WARN snapshot"
                not in log, "the log does not say why each snapshot was passed over, or "
                "warns about it")
        m.done()
        check_values(r, t, cfg, path, E.Model(cfg, r.ev1 + r.ev2, r.asof, r.t0))
    finally:
        rc = t.close()
    if rc != 0:
        raise H.Failure(f"tallyd 5 exited with {rc} on SIGTERM")


def main():
    suite = H.Suite("kafka_redefine")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_redefine_setup_two_runs_catch_up", e)
        return suite.finish()
    suite.run("redefined_pins_rebuilt_users_restored_from_the_snapshot", t_partial_restore, r)
    suite.run("history_read_again_every_message_once", t_ingest, r)
    K.run_truth_checks(suite, r.c2, prefix="after_redefinition_")
    suite.run("snapshot_after_rebuild_then_restart_reads_nothing", t_snapshot_after_rebuild, r)
    if getattr(r, "c3", None) is not None:
        for name, fn, *args in K.truth_checks("after_restart_")[:2]:
            ids = r.c3.users if args[0] == "user" else r.c3.pins
            suite.run(name, fn, r.c3, args[0], ids, args[1])
        r.c3.cli.close()
        rc = r.c3.tallyd.close()
        if rc != 0:
            suite.fail_setup("tallyd_3_exits_0_on_sigterm", f"exit {rc}:\n"
                             + r.c3.tallyd.log_tail())
    if getattr(r, "c3", None) is not None:
        suite.run("removed_feature_restores_the_rest_and_reads_nothing",
                  t_removed_feature_resumes, r)
    suite.run("unchanged_pin_features_loaded_not_rebuilt_with_start_latest",
              t_loaded_not_rebuilt, r)
    suite.run("every_feature_redefined_snapshots_passed_over_as_outdated_all_rebuilt",
              t_every_feature_redefined_passes_over_snapshots, r)
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
