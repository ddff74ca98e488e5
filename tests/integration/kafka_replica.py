#!/usr/bin/env python3
"""Two tallyd instances in kafka.mode replica on one topic of a real Apache
Kafka broker (scripts/kafka.sh): each must hold every partition and so every
entity. Both use the same kafka.group, as sidecars deployed from one config
would: in replica mode the group only carries committed offsets (for lag
tools), never the assignment, and committed offsets never decide where a
fresh process starts.

Sequence: a first batch of seeded events (e2e.py's stream) is produced;
instance A starts (kafka.start earliest), catches up and commits offsets;
instance B then starts with the same group and must still read everything
from the beginning; instance C (kafka.start latest, its own group) starts
next and must be assigned every partition at the first batch's end, as
offsets; a second batch is produced while all three run, and C must read
it alone, to the new ends. Afterwards
both INFOs show all 8 partitions at their ends with every message consumed
once, and every value of every user and pin on each instance equals the
ground truth of both batches (e2e.py's model).

Transactions: a topic of 3 partitions written by a transactional producer
(kafka_common.produce_transactions): a committed transaction, an aborted one,
a committed one, so every partition's log ends with a commit marker (a
control record no consumer receives) and holds aborted records and their
marker in between. Instance T (no snapshots, kafka.ready_lag 0) must apply
exactly the committed events (every value equal to the model of those
alone), and its position must reach past the final markers: INFO lag 0,
every partition line position == high == the broker's high watermark,
loading 0, META's lag 0, and the group's committed offsets at the ends too.
Instance S (snapshots on) catches up and stops with SIGTERM; its restart
resumes every partition at that end from the final snapshot, consumes
nothing and is ready. Last, instance V (snapshots every second) catches up
and commits the ends; an aborted transaction then moves the ends without a
message to consume, and a snapshot must still follow that commits the new
ends.

Run: build/venv/bin/python tests/integration/kafka_replica.py (a broker from
TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
from kafka_common import E  # noqa: E402

NBATCH1 = 60_000
NBATCH2 = 20_000
PARTITIONS = 8
LEAD_MS = 240_000
TXN_EVENTS = 3_000
TXN_PARTITIONS = 3


def setup():
    r = K.new_run("replica", LEAD_MS, PARTITIONS)
    ev1, lines1, r.users, r.pins = E.generate(r.asof, nevents=NBATCH1, seed=E.SEED + 101)
    ev2, lines2, _, _ = E.generate(r.asof, nevents=NBATCH2, seed=E.SEED + 202)
    r.per_part = K.produce(r.bootstrap, r.topic, K.records(ev1, lines1, r.asof - E.HOUR))
    r.group = f"tly-replica-{K.RUN_ID}"
    r.nodes = []
    for name in ("a", "b"):
        port = H.free_port()
        path, cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "earliest",
                                   K.FEATURES, name=f"tallyd-{name}", group=r.group)
        t = K.Tallyd(path, port, r.tmp, name=f"tallyd-{name}")
        r.nodes.append((name, t, path, cfg, port))
        # B starts once A has caught up (and committed offsets under the group).
        K.wait_caught_up(t, len(lines1))
    # C starts at the end (kafka.start latest) once the first batch is in:
    # its partitions must be assigned at those ends as offsets, and it must
    # read exactly the second batch.
    r.ends1 = dict(r.per_part)
    port = H.free_port()
    path, _ = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "latest",
                             K.FEATURES, name="tallyd-c")
    r.latest = K.Tallyd(path, port, r.tmp, name="tallyd-c")
    K.wait_caught_up(r.latest, 0)
    # The second batch arrives while all three run.
    for p, n in K.produce(r.bootstrap, r.topic, K.records(ev2, lines2, r.asof - E.HOUR)).items():
        r.per_part[p] = r.per_part.get(p, 0) + n
    r.produced = len(lines1) + len(lines2)
    K.wait_caught_up(r.latest, len(lines2))
    r.latest_info = wait_positions(r.latest, r.topic, r.per_part)
    r.model = E.Model(r.nodes[0][3], ev1 + ev2, r.asof, r.t0)
    r.ctxs = []
    for name, t, path, cfg, port in r.nodes:
        info = K.wait_caught_up(t, r.produced)
        c = K.ctx(t, cfg, path, r.model, r.asof, r.users, r.pins, r.produced,
                  int(time.time() * 1000), r.tmp)
        c.info, c.port = info, port
        r.ctxs.append((name, c))
    print(f"# broker {r.bootstrap}, topic {r.topic}: {len(lines1)} + {len(lines2)} messages; "
          f"both instances caught up; ASOF={r.asof}", flush=True)
    return r


def t_ingest(r, c):
    K.check_ingest(c, c.info, r.produced, r.per_part, r.topic, 2 * (E.BAD_JSON + E.MISSING_TIME))


def wait_positions(t, topic, want, seconds=30):
    """Polls INFO until every partition line of topic shows the position in
    want (partition lines are published once a second, so a count that is
    already final can come with lines from before it). Returns the last
    INFO; the test judges it."""
    cli = t.client()
    end = H.deadline(seconds)
    try:
        while True:
            info = cli.info()
            lines = {p: info.get(f"partition_{topic}_{p}", "") for p in want}
            if all(f"position={n}," in lines[p] for p, n in want.items()):
                return info
            if time.monotonic() > end:
                return info
            time.sleep(0.1)  # poll interval of a deadline-bounded wait
    finally:
        cli.close()


def t_latest_starts_at_the_ends(r):
    """C (kafka.start latest, started between the batches) was assigned every
    partition at the first batch's end, as a number in its log, and read the
    second batch alone, to the new ends."""
    m = H.Mismatches()
    log = r.latest.log_path.read_text()
    line = next((x for x in log.splitlines() if "source: assigned" in x), "")
    want = " ".join(f"{r.topic}[{p}]@{r.ends1.get(p, 0)}" for p in range(PARTITIONS))
    m.check(line.endswith(want), f"assignment log line {line!r}, want it to end with {want!r}")
    info = r.latest_info
    m.eq(int(info.get("messages_consumed", -1)), r.produced - sum(r.ends1.values()),
         "C's INFO messages_consumed (the second batch)")
    for p in range(PARTITIONS):
        n = r.per_part.get(p, 0)
        v = info.get(f"partition_{r.topic}_{p}")
        parts = dict(x.split("=", 1) for x in v.split(",")) if v else {}
        m.eq(parts, {"position": str(n), "high": str(n), "lag": "0"},
             f"C's INFO partition_{r.topic}_{p}")
    m.done()


def t_committed_offsets(r):
    """Both instances committed under the one group: the group's committed
    offsets reach every partition's end (they serve lag tools)."""
    keys = [(r.topic, p) for p in range(PARTITIONS)]
    end = H.deadline(30)
    while True:
        offs = {p: off for (_, p), off in K.committed(r.bootstrap, r.group, keys).items()}
        if offs == r.per_part:
            return
        if time.monotonic() > end:
            raise H.Failure(f"committed offsets of group {r.group}: {offs}, want the ends "
                            f"{r.per_part}")
        time.sleep(0.2)  # commits are periodic; poll with a deadline


# ------------------------------------------------------------ transactions

def txn_config(x, name, snapshots):
    """A replica config for the transactional topic (kafka.ready_lag 0);
    snapshots off unless asked for. Returns (path, cfg, port)."""
    port = H.free_port()
    path, cfg = K.write_config(x.tmp, x.bootstrap, port, x.topic, "replica", "earliest",
                               K.FEATURES, name=name)
    if not snapshots:
        cfg["snapshot"] = {"dir": ""}
        with open(path, "w") as f:
            K.yaml.safe_dump(cfg, f, sort_keys=False)
    return path, cfg, port


def wait_consumed(t, want, seconds=60):
    """Polls INFO until want messages are consumed and applied or rejected
    (readiness is not waited for: the tests judge it). Returns INFO."""
    cli = t.client()
    end = H.deadline(seconds)
    try:
        while True:
            if t.proc.poll() is not None:
                raise RuntimeError(f"tallyd exited with {t.proc.returncode}:\n" + t.log_tail())
            info = cli.info()
            done = int(info.get("events_applied", "0")) + int(info.get("events_rejected", "0"))
            if int(info.get("messages_consumed", "0")) >= want and done >= want:
                return info
            if time.monotonic() > end:
                raise RuntimeError(f"tallyd consumed {info.get('messages_consumed')} of {want} "
                                   f"messages within {seconds * H.MULT:.0f} s:\n" + t.log_tail())
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
    finally:
        cli.close()


def setup_txn():
    x = K.new_run("txn", LEAD_MS, TXN_PARTITIONS)
    ev, lines, x.users, x.pins = E.generate(x.asof, nevents=TXN_EVENTS, seed=E.SEED + 404)
    recs = K.records(ev, lines, x.asof - E.HOUR)
    a, b = len(recs) * 2 // 5, len(recs) * 3 // 5
    x.per_part = K.produce_transactions(x.bootstrap, x.topic,
                                        [(recs[:a], True), (recs[a:b], False), (recs[b:], True)])
    kept = ev[:a] + ev[b:]
    x.produced = len(kept)
    x.bad = sum(1 for e in kept if e is None)
    x.aborted = b - a
    x.highs = K.end_offsets(x.bootstrap, x.topic, TXN_PARTITIONS)
    # The premise: markers (and the aborted records) lie between the
    # committed messages and every partition's end.
    if (sorted(x.per_part) != list(range(TXN_PARTITIONS))
            or sum(x.per_part.values()) != x.produced
            or any(x.highs[p] <= x.per_part[p] for p in x.per_part)):
        raise RuntimeError(f"committed messages per partition {x.per_part} (of {x.produced}), "
                           f"high watermarks {x.highs}: want markers after every partition's "
                           f"messages")
    x.group = f"tly-txn-{K.RUN_ID}"
    path, cfg, port = txn_config(x, "tallyd-txn", snapshots=False)
    cfg["kafka"]["group"] = x.group
    with open(path, "w") as f:
        K.yaml.safe_dump(cfg, f, sort_keys=False)
    t = K.Tallyd(path, port, x.tmp, name="tallyd-txn")
    x.model = E.Model(cfg, kept, x.asof, x.t0)  # while tallyd ingests
    try:
        info = wait_consumed(t, x.produced)
    except Exception:
        t.close()
        raise
    x.c = K.ctx(t, cfg, path, x.model, x.asof, x.users, x.pins, x.produced,
                int(time.time() * 1000), x.tmp)
    x.c.info = info
    print(f"# broker {x.bootstrap}, topic {x.topic}: transactions of {a} (committed), "
          f"{x.aborted} (aborted), {len(recs) - b} (committed) messages; committed per "
          f"partition {sorted(x.per_part.items())}, high watermarks {sorted(x.highs.items())}",
          flush=True)
    return x


def partition_lines(info, topic):
    return {int(k.rsplit("_", 1)[1]): dict(kv.split("=", 1) for kv in v.split(","))
            for k, v in info.items() if k.startswith(f"partition_{topic}_")}


def wait_at_ends(x, t):
    """Polls INFO until lag is 0, not loading, and every partition's
    position and high are the broker's high watermark; the last INFO and
    whether that happened (within 30 s: an end-of-partition event follows
    the last fetch within fetch.wait.max.ms)."""
    want = {p: {"position": str(h), "high": str(h), "lag": "0"} for p, h in x.highs.items()}
    cli = t.client()
    end = H.deadline(30)
    try:
        while True:
            info = cli.info()
            if (info.get("lag") == "0" and info.get("loading") == "0"
                    and partition_lines(info, x.topic) == want):
                return info, True
            if time.monotonic() > end:
                return info, False
            time.sleep(0.1)  # poll interval of a deadline-bounded wait
    finally:
        cli.close()


def describe_position(info, x):
    return (f"INFO lag={info.get('lag')}, loading={info.get('loading')}, partitions "
            f"{partition_lines(info, x.topic)}; broker high watermarks {x.highs}")


def t_txn_reaches_end(x):
    """Positions move past the final commit markers: lag 0, position ==
    high == the broker's end on every partition, ready with ready_lag 0."""
    info, ok = wait_at_ends(x, x.c.tallyd)
    if not ok:
        raise H.Failure("positions did not reach the ends past the transaction markers: "
                        + describe_position(info, x))


def t_txn_applies_committed_only(x):
    info = x.c.cli.info()
    m = H.Mismatches()
    m.eq(int(info.get("messages_consumed", -1)), x.produced, "INFO messages_consumed")
    m.eq(int(info.get("events_rejected", -1)), x.bad, "INFO events_rejected")
    m.eq(int(info.get("events_applied", -1)), x.produced - x.bad, "INFO events_applied")
    m.eq(info.get("offset_resets"), "0", "INFO offset_resets")
    m.eq(info.get("consumer_errors"), "0", "INFO consumer_errors")
    m.eq(info.get("watermark_ms"), str(x.model.watermark), "INFO watermark_ms")
    m.done()


def wait_committed(x, group, want, what):
    """Polls the committed offsets of group on the transactional topic until
    they equal want ({partition: offset}); H.Failure, saying `what`, at the
    deadline (commits are periodic)."""
    keys = [(x.topic, p) for p in range(TXN_PARTITIONS)]
    end = H.deadline(30)
    while True:
        offs = {p: off for (_, p), off in K.committed(x.bootstrap, group, keys).items()}
        if offs == want:
            return
        if time.monotonic() > end:
            raise H.Failure(f"{what}: committed offsets of group {group}: {offs}, want {want}")
        time.sleep(0.2)  # commits are periodic; poll with a deadline


def t_txn_commits_ends(x):
    """The group's committed offsets (for lag tools) reach the ends past the
    markers too, not the last message + 1."""
    wait_committed(x, x.group, x.highs,
                   f"the ends (committed messages per partition: {x.per_part})")


def start_at_ends(x, path, port, name, what):
    """Starts a tallyd on the transactional topic and waits until it consumed
    every committed message and stands at the ends; closes it and raises
    H.Failure, saying `what`, if it does not."""
    t = K.Tallyd(path, port, x.tmp, name=name)
    try:
        wait_consumed(t, x.produced)
        info, ok = wait_at_ends(x, t)
        if not ok:
            raise H.Failure(f"{what}: " + describe_position(info, x))
    except BaseException:
        t.close()
        raise
    return t


def t_txn_resumes_at_ends_from_snapshot(x):
    """A snapshot taken at the ends resumes there: the restart consumes
    nothing and is ready at once, every partition at its end."""
    path, cfg, port = txn_config(x, "tallyd-txn-snap", snapshots=True)
    t = start_at_ends(x, path, port, "tallyd-txn-snap", "before the restart")
    rc = t.close()
    if rc != 0:
        raise H.Failure(f"tallyd exited {rc} on SIGTERM:\n" + t.log_tail())
    t = K.Tallyd(path, port, x.tmp, name="tallyd-txn-snap2")
    try:
        info, ok = wait_at_ends(x, t)
        m = H.Mismatches()
        m.check(ok, "after the restart: " + describe_position(info, x))
        m.eq(info.get("messages_consumed"), "0", "INFO messages_consumed after the restart")
        m.check(int(info.get("restored_snapshot_ms", "-1")) > 0,
                f"INFO restored_snapshot_ms={info.get('restored_snapshot_ms')}: no snapshot "
                f"was restored")
        m.done()
    finally:
        t.close()


def t_txn_snapshot_commits_ends_moved_without_messages(x):
    """With snapshots on, offsets are committed only as a snapshot covers
    them. An aborted transaction moves every partition it touched past its
    records and abort marker, and none of them is a message tallyd receives
    (read_committed): a snapshot must still follow, so the group's committed
    offsets reach the new ends, not stay where the last message left them."""
    path, cfg, port = txn_config(x, "tallyd-txn-every", snapshots=True)
    group = f"tly-txn-every-{K.RUN_ID}"
    cfg["kafka"]["group"] = group
    cfg["snapshot"]["every"] = "1s"
    cfg["snapshot"]["dir"] = str(Path(x.tmp) / "snapshots-every")
    with open(path, "w") as f:
        K.yaml.safe_dump(cfg, f, sort_keys=False)
    t = start_at_ends(x, path, port, "tallyd-txn-every", "before the aborted transaction")
    try:
        wait_committed(x, group, x.highs, "before the aborted transaction")
        ev, lines, _, _ = E.generate(x.asof, nevents=300, seed=E.SEED + 505)
        K.produce_transactions(x.bootstrap, x.topic,
                               [(K.records(ev, lines, x.asof - E.HOUR), False)])
        highs = K.end_offsets(x.bootstrap, x.topic, TXN_PARTITIONS)
        if highs == x.highs:
            raise RuntimeError(f"the aborted transaction left the ends at {highs}")
        wait_committed(x, group, highs, "after the aborted transaction")
        cli = t.client()
        try:
            consumed = cli.info().get("messages_consumed")
        finally:
            cli.close()
        if consumed != str(x.produced):
            raise H.Failure(f"INFO messages_consumed={consumed}, want {x.produced}: an "
                            f"aborted record was delivered")
    finally:
        t.close()


def run_txn(suite):
    try:
        x = setup_txn()
    except Exception as e:
        suite.fail_setup("txn_setup_produces_transactions_and_tallyd_consumes_them", e)
        return None
    suite.run("txn_positions_reach_the_ends_past_commit_markers_and_ready", t_txn_reaches_end, x)
    suite.run("txn_applies_exactly_the_committed_events", t_txn_applies_committed_only, x)
    K.run_truth_checks(suite, x.c, prefix="txn_")
    suite.run("txn_committed_offsets_reach_the_ends", t_txn_commits_ends, x)
    K.close_ctxs(suite, [("txn", x.c)])
    suite.run("txn_restart_from_snapshot_resumes_at_the_ends", t_txn_resumes_at_ends_from_snapshot,
              x)
    # last: it moves the topic's ends
    suite.run("txn_snapshots_commit_ends_an_aborted_transaction_moved",
              t_txn_snapshot_commits_ends_moved_without_messages, x)
    return x


# ------------------------------------------------------------ a growing topic

GROW_EVENTS = 3_000


def grow_topic(x, partitions):
    """Raises the partition count of x.topic to `partitions` and waits until
    each has a leader."""
    admin = K.AdminClient({"bootstrap.servers": x.bootstrap})
    fut = admin.create_partitions([K.NewPartitions(x.topic, partitions)],
                                  request_timeout=30 * H.MULT)
    fut[x.topic].result(timeout=60 * H.MULT)
    end = H.deadline(60)
    while True:
        t = admin.list_topics(topic=x.topic, timeout=10 * H.MULT).topics.get(x.topic)
        if (t is not None and len(t.partitions) == partitions
                and all(p.leader >= 0 for p in t.partitions.values())):
            return
        if time.monotonic() > end:
            raise RuntimeError(f"topic {x.topic} did not reach {partitions} partitions: {t}")
        time.sleep(0.1)  # poll interval of a deadline-bounded wait


def produce_batch(x, seed, new_from):
    """Produces a batch of the seeded stream; returns (events, lines) after
    checking the premise that some of it went to partitions >= new_from."""
    ev, lines, users, pins = E.generate(x.asof, nevents=GROW_EVENTS, seed=seed)
    per_part = K.produce(x.bootstrap, x.topic, K.records(ev, lines, x.asof - E.HOUR))
    if sum(n for p, n in per_part.items() if p >= new_from) == 0:
        raise RuntimeError(f"no message went to the new partitions: {per_part}")
    x.users = sorted(set(x.users) | set(users))
    x.pins = sorted(set(x.pins) | set(pins))
    return ev, lines


def setup_grow():
    """A topic of 2 partitions, a first batch on it, then tallyd (kafka.start
    latest: it skips that batch by design; metadata refreshed every second);
    the topic grows to 4 partitions and a second batch follows, keyed over
    all 4: tallyd must assign the 2 new ones from their beginning and apply
    the whole second batch."""
    x = K.new_run("grow", LEAD_MS, 2)
    x.users, x.pins = [], []
    first, _ = produce_batch(x, E.SEED + 601, 0)
    x.port = H.free_port()
    x.path, x.cfg = K.write_config(x.tmp, x.bootstrap, x.port, x.topic, "replica", "latest",
                                   K.FEATURES, name="tallyd-grow",
                                   properties={"topic.metadata.refresh.interval.ms": "1000"})
    t = K.Tallyd(x.path, x.port, x.tmp, name="tallyd-grow")
    try:
        K.wait_caught_up(t, 0)
        grow_topic(x, 4)
        x.ev2, lines2 = produce_batch(x, E.SEED + 602, 2)
        x.produced = len(lines2)
        model = E.Model(x.cfg, x.ev2, x.asof, x.t0)
        info = wait_consumed(t, x.produced)
    except Exception:
        t.close()
        raise
    x.c = K.ctx(t, x.cfg, x.path, model, x.asof, x.users, x.pins, x.produced,
                int(time.time() * 1000), x.tmp)
    x.c.info = info
    print(f"# broker {x.bootstrap}, topic {x.topic}: {len(first)} messages before tallyd "
          f"started (skipped: start latest), then 2 -> 4 partitions and {x.produced} more",
          flush=True)
    return x


def t_grow_assigns_new_partitions(x):
    """The new partitions are assigned and read: 4 partition lines, every
    message of the second batch consumed once, lag 0."""
    info = K.wait_caught_up(x.c.tallyd, x.produced)
    m = H.Mismatches()
    m.eq(sorted(partition_lines(info, x.topic)), [0, 1, 2, 3], "INFO partition lines")
    m.eq(int(info.get("messages_consumed", -1)), x.produced, "INFO messages_consumed")
    m.eq(info.get("lag"), "0", "INFO lag")
    m.done()


def setup_grow_restart(x):
    """tallyd stops (a final snapshot of 4 partitions' positions); the topic
    grows to 6 partitions meanwhile and a third batch goes over all 6; the
    restart resumes the 4 from the snapshot and reads the 2 new ones from
    their beginning (kafka.start latest would skip them: tallyd read the
    topic before)."""
    rc = x.c.tallyd.close()
    if rc != 0:
        raise RuntimeError(f"tallyd exited {rc} on SIGTERM:\n" + x.c.tallyd.log_tail())
    grow_topic(x, 6)
    ev3, lines3 = produce_batch(x, E.SEED + 603, 4)
    x.produced3 = len(lines3)
    t = K.Tallyd(x.path, x.port, x.tmp, name="tallyd-grow2")
    try:
        model = E.Model(x.cfg, x.ev2 + ev3, x.asof, x.t0)
        info = wait_consumed(t, x.produced3)
    except Exception:
        t.close()
        raise
    x.c2 = K.ctx(t, x.cfg, x.path, model, x.asof, x.users, x.pins, x.produced + x.produced3,
                 int(time.time() * 1000), x.tmp)
    x.c2.info = info
    return x


def t_grow_restart_reads_partitions_added_while_down(x):
    info = K.wait_caught_up(x.c2.tallyd, x.produced3)
    m = H.Mismatches()
    m.eq(sorted(partition_lines(info, x.topic)), list(range(6)), "INFO partition lines")
    m.eq(int(info.get("messages_consumed", -1)), x.produced3,
         "INFO messages_consumed after the restart (the third batch alone)")
    m.check(int(info.get("restored_snapshot_ms", "-1")) > 0, "no snapshot was restored")
    m.done()


def run_grow(suite):
    try:
        x = setup_grow()
    except Exception as e:
        suite.fail_setup("grow_setup_new_partitions_are_read_while_running", e)
        return None
    suite.run("grow_new_partitions_are_assigned_from_their_beginning",
              t_grow_assigns_new_partitions, x)
    K.run_truth_checks(suite, x.c, prefix="grow_")
    x.c.cli.close()
    try:
        setup_grow_restart(x)
    except Exception as e:
        suite.fail_setup("grow_restart_setup_partitions_added_while_down_are_read", e)
        return x
    suite.run("grow_restart_reads_partitions_added_while_down",
              t_grow_restart_reads_partitions_added_while_down, x)
    K.run_truth_checks(suite, x.c2, prefix="grow_restart_")
    K.close_ctxs(suite, [("grow", x.c2)])
    return x


def main():
    suite = H.Suite("kafka_replica")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_replica_setup_two_instances_catch_up", e)
        r = None
    if r is not None:
        for name, c in r.ctxs:
            suite.run(f"replica_{name}_consumes_every_partition_and_message_once", t_ingest, r, c)
        for name, c in r.ctxs:
            K.run_truth_checks(suite, c, prefix=f"replica_{name}_")
        suite.run("replica_both_commit_offsets_under_the_shared_group", t_committed_offsets, r)
        suite.run("replica_start_latest_assigns_the_ends_and_reads_only_what_follows",
                  t_latest_starts_at_the_ends, r)
        K.close_ctxs(suite, r.ctxs)
        r.latest.close()
    x = run_txn(suite)
    g = run_grow(suite)
    rc = suite.finish()
    for run in (r, x, g):
        if run is None:
            continue
        if rc == 0:
            shutil.rmtree(run.tmp, ignore_errors=True)
        else:
            print(f"# logs and config kept in {run.tmp}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
