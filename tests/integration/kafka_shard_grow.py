#!/usr/bin/env python3
"""Shard mode while the topic grows, against a real Apache Kafka broker
(scripts/kafka.sh). One tallyd in kafka.mode shard (it owns every
partition), kafka.start latest, librdkafka's default metadata refresh
(topic.metadata.refresh.interval.ms 5 minutes, far longer than this test).

A topic of 4 partitions; tallyd starts and is assigned all 4. Batch A: 3
events for each of 400 users, keyed by user id (murmur2, as the Java
client). The topic then grows to 6 partitions, and a new producer, which
sees all 6, sends batch B: 3 more events for each of those users and 3 for
400 new ones. Under the new count, many users' events land in a partition
other than their old one: in partitions 0-3, where the count tallyd knew
(4) names another partition, and in the new partitions 4 and 5, which tallyd's
group learns of only at a rebalance.

tallyd must take every event: it looks the partition count up when an
event seems misrouted, applies those routed by the new count, and its
group rebalances to 6 partitions long before the 5-minute refresh; the new
partitions are read from their beginning although kafka.start is latest
(they were added after tallyd started). Checked against a model computed
here from what was produced: every user's count and sum of a per-event
sequence number (a double or a missing event would show), rejected_ev_
misrouted 1 (the control below), 6 partitions, lag 0. A control event keyed by an id of
another partition (misrouted under both counts) is still rejected.

Run: build/venv/bin/python tests/integration/kafka_shard_grow.py (a broker
from TLY_KAFKA_BOOTSTRAP, else one started for this run).
"""

import json
import signal
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
import kafka_shard as S  # noqa: E402

GROWN = 6  # not a multiple of 4: keys also move between the old partitions
USERS_A = 400
USERS_B = 400
PER_USER = 3
FEATURES = [
    {"name": "n", "entity": "user", "key": "user_id", "agg": "count", "windows": ["1d"]},
    {"name": "s", "entity": "user", "key": "user_id", "agg": "sum", "value": "seq",
     "windows": ["1d"]},
]


def murmur2_partition(key, n):
    """Kafka's default partitioner among n partitions, by kafka_shard.py's
    murmur2 (written from Kafka's definition and checked there against
    Kafka's test vectors and the broker's placement): the independent judge
    of where a key belongs."""
    return (S.murmur2(key.encode()) & 0x7fffffff) % n


class Model:
    def __init__(self):
        self.n, self.s = {}, {}

    def add(self, user, seq):
        self.n[user] = self.n.get(user, 0) + 1
        self.s[user] = self.s.get(user, 0) + seq


def events(users, seq0, ts, model):
    """PER_USER events for each user: (key, payload, ts) records."""
    out, seq = [], seq0
    for _ in range(PER_USER):
        for u in users:
            seq += 1
            ev = {"user_id": u, "pin_id": 1, "action": "click", "dwell_ms": 1, "ts": ts,
                  "seq": seq}
            out.append((str(u), json.dumps(ev), ts))
            model.add(u, seq)
    return out, seq


def wait_for(t, cond, seconds, what):
    cli = t.client()
    end = H.deadline(seconds)
    try:
        while True:
            if t.proc.poll() is not None:
                raise H.Failure(f"tallyd exited with {t.proc.returncode}:\n" + t.log_tail())
            info = cli.info()
            if cond(info):
                return info
            if time.monotonic() > end:
                raise H.Failure(f"{what} within {seconds * H.MULT:.0f} s; INFO "
                                f"messages_consumed {info.get('messages_consumed')}, partitions "
                                f"{info.get('partitions')}, lag {info.get('lag')}:\n"
                                + t.log_tail())
            time.sleep(0.1)  # poll interval of a deadline-bounded wait
    finally:
        cli.close()


def setup():
    x = K.new_run("shardgrow", 0, 4)
    x.port = H.free_port()
    x.path, x.cfg = K.write_config(x.tmp, x.bootstrap, x.port, x.topic, "shard", "latest",
                                   FEATURES, name="tallyd-shardgrow")
    x.cfg["server"]["advertise"] = f"127.0.0.1:{x.port}"
    x.cfg["kafka"]["topics"] = [{"name": x.topic, "key": "user"}]
    x.cfg["kafka"]["endpoints_topic"] = K.topic_name("tly-shardgrow-endpoints")
    x.cfg["kafka"]["properties"] = {"session.timeout.ms": "6000"}
    with open(x.path, "w") as f:
        yaml.safe_dump(x.cfg, f, sort_keys=False)
    x.model = Model()
    x.t = K.Tallyd(x.path, x.port, x.tmp, name="tallyd-shardgrow")
    try:
        wait_for(x.t, lambda i: i.get("partitions") == "4" and i.get("loading") == "0", 60,
                 "tallyd was not assigned the 4 partitions")
        ts = int(time.time() * 1000) - 60_000
        users_a = list(range(1, USERS_A + 1))
        recs_a, seq = events(users_a, 0, ts, x.model)
        K.produce(x.bootstrap, x.topic, recs_a)
        x.produced = len(recs_a)
        wait_for(x.t, lambda i: int(i.get("messages_consumed", 0)) >= x.produced, 60,
                 f"tallyd did not consume batch A ({x.produced} messages)")
        grow_admin = K.AdminClient({"bootstrap.servers": x.bootstrap})
        fut = grow_admin.create_partitions([K.NewPartitions(x.topic, GROWN)],
                                           request_timeout=30 * H.MULT)
        fut[x.topic].result(timeout=60 * H.MULT)
        users_b = users_a + list(range(100_001, 100_001 + USERS_B))
        recs_b, seq = events(users_b, seq, ts + 1000, x.model)
        x.seq = seq
        per_part = K.produce(x.bootstrap, x.topic, recs_b)
        x.produced += len(recs_b)
        # the premises: batch B went by the new count, into old partitions
        # where the old count names another one, and into new partitions
        x.moved_old = sum(1 for u in users_b if murmur2_partition(str(u), GROWN) < 4
                          and murmur2_partition(str(u), GROWN) != murmur2_partition(str(u), 4))
        x.in_new = sum(n for p, n in per_part.items() if p >= 4)
        if x.moved_old == 0 or x.in_new == 0:
            raise RuntimeError(f"batch B did not reach both kinds of partition: {per_part}")
        # the control: keyed by an id of another partition under both counts
        bad = next(u for u in range(200_000, 300_000)
                   if murmur2_partition(str(u), GROWN) != 0 and murmur2_partition(str(u), 4) != 0)
        x.bad_user = bad
        ev = {"user_id": bad, "pin_id": 1, "action": "click", "dwell_ms": 1, "ts": ts,
              "seq": 1}
        prod = K.Producer({"bootstrap.servers": x.bootstrap, "log_level": 3})
        prod.produce(x.topic, value=json.dumps(ev), key=str(bad), partition=0, timestamp=ts)
        if prod.flush(30 * H.MULT):
            raise RuntimeError("the control event was not delivered")
        x.produced += 1
    except Exception:
        x.t.close()
        raise
    print(f"# broker {x.bootstrap}, topic {x.topic}: 4 -> {GROWN} partitions, {x.produced} messages; "
          f"batch B: {x.moved_old} users routed into another old partition, {x.in_new} events "
          f"in the new partitions", flush=True)
    return x


def check_model(x, parts, what):
    info = wait_for(x.t, lambda i: int(i.get("messages_consumed", 0)) >= x.produced and
                    i.get("partitions") == str(parts) and i.get("lag") == "0", 120,
                    f"tallyd did not consume every message of the {parts} partitions")
    m = H.Mismatches()
    m.eq(int(info.get("rejected_ev_misrouted", -1)), 1,
         f"INFO rejected_ev_misrouted (the control event alone), {what}")
    cli = x.t.client()
    try:
        wrong = []
        for u in sorted(x.model.n):
            got = cli.cmd("FEATURES", "user", u, "n:1d", "s:1d")
            want = [b"n:1d", x.model.n[u], b"s:1d", x.model.s[u]]
            if not H.same(got, want):
                wrong.append((u, got, want))
        m.check(not wrong, f"{len(wrong)} of {len(x.model.n)} users differ from the model "
                           f"{what}, first {wrong[:3]}")
        got = cli.cmd("FEATURES", "user", x.bad_user, "n:1d")
        m.check(H.same(got, [b"n:1d", 0]) or isinstance(got, H.RespError),
                f"the misrouted control event was counted: {got!r}")
    finally:
        cli.close()
    m.done()


def t_every_event_is_taken(x):
    check_model(x, GROWN, "after the growth")


def t_pipelined_batches_are_judged_again(x):
    """tallyd is stopped (SIGSTOP) while the topic grows again, 6 -> 9,
    and 12,000 events go into partition 0 for 4,000 users whose partition is
    0 by the new count and another one by the old: once it runs again it
    reads them in batches of one partition, which its two appliers pipeline
    (the next batch is decoded, by the old count, before the one before is
    settled and the count learnt); every one must be taken."""
    users = []
    u = 500_000
    while len(users) < 4000:
        if murmur2_partition(str(u), 9) == 0 and murmur2_partition(str(u), GROWN) != 0:
            users.append(u)
        u += 1
    ts = int(time.time() * 1000) - 30_000
    recs, x.seq = events(users, x.seq, ts, x.model)
    x.t.proc.send_signal(signal.SIGSTOP)
    try:
        admin = K.AdminClient({"bootstrap.servers": x.bootstrap})
        admin.create_partitions([K.NewPartitions(x.topic, 9)],
                                request_timeout=30 * H.MULT)[x.topic].result(timeout=60 * H.MULT)
        prod = K.Producer({"bootstrap.servers": x.bootstrap, "linger.ms": 20, "log_level": 3})
        failed = []
        for key, value, t in recs:  # into partition 0, where the new count puts them
            while True:
                try:
                    prod.produce(x.topic, value=value, key=key, partition=0, timestamp=t,
                                 on_delivery=lambda err, msg: err and failed.append(err))
                    break
                except BufferError:
                    prod.poll(0.05)  # the local queue is full: serve delivery reports
        if prod.flush(60 * H.MULT) or failed:
            raise H.Failure(f"batch C was not all delivered ({failed[:3]})")
    finally:
        x.t.proc.send_signal(signal.SIGCONT)
    x.produced += len(recs)
    check_model(x, 9, "after batch C")


def main():
    suite = H.Suite("kafka_shard_grow")
    try:
        x = setup()
    except Exception as e:
        suite.fail_setup("kafka_shard_grow_setup_grows_the_topic_under_tallyd", e)
        return suite.finish()
    suite.run("shard_every_event_routed_by_the_old_or_new_count_is_taken",
              t_every_event_is_taken, x)
    suite.run("shard_pipelined_batches_decoded_by_the_old_count_are_judged_again",
              t_pipelined_batches_are_judged_again, x)
    rc = x.t.close()
    if rc != 0:
        suite.fail_setup("shard_grow_tallyd_exits_0_on_sigterm", f"exit {rc}")
    return H.finish(suite, x.tmp)


if __name__ == "__main__":
    sys.exit(main())
