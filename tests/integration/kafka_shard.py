#!/usr/bin/env python3
"""Three tallyd instances in kafka.mode shard, one consumer group, against a
real Apache Kafka broker (scripts/kafka.sh). Two topics of 8 partitions hold
the same seeded events (e2e.py's stream, times over the last 8 days): one
keyed by user id, feeding only the user features (`key: user`), one keyed by
pin id, feeding only the pin features (`key: pin`). Keys are the ids as text,
partitioned with the Java client's murmur2 (librdkafka murmur2_random).

A murmur2 written here from Kafka's definition (Utils.murmur2: seed
0x9747b28c, m 0x5bd1e995, r 24; partition = (hash & 0x7fffffff) % 8) must
give Kafka's own test vectors and the partition of every produced message
as the producer's delivery reports state it: it is then the independent
judge of which partition, and so which instance, owns an id. Each topic also
holds one well-formed event per partition keyed by an id of the next
partition: it arrives where its entity id does not hash, so it must be
rejected (INFO rejected_ev_misrouted) and change nothing.

Once every instance has caught up (loading:0), the `owned` sets in INFO are
disjoint and cover partitions 0..7, and every instance knows the address of
every partition's owner, each user and pin id (and a few never seen) is
asked of all three: exactly the owner answers, with the ground truth of
e2e.py's model; the others reply `-MOVED <partition> <owner host:port>`.
RECENT does the same for users, MFEATURES per element for 500 pins.

Then the instance owning partition 0 is killed with SIGKILL. The group
notices within the session timeout (6 s here); the two survivors take its
partitions (eager range assignor: the survivors keep their order, so the
first one's range moves and it loses partitions while gaining others),
rebuild them from Kafka history and the same checks hold again. A survivor
that lost partitions reports their entities in dropped_entities; one that
kept its partitions drops nothing.

Every instance snapshots into a directory of its own every second (keep 3).
Before the kill, every instance has written a snapshot and the killed one's
newest durable snapshot holds the end of each of its partitions: the
group's committed offsets of them, committed only once a snapshot holding
them is durable, are the end offsets. After the checks on two instances the
killed one is started again with its own config (same port, same snapshot
directory): it restores that snapshot (restored_snapshot_ms is the newest
file's time, restored_entities within the model's count for its old
partitions) and the group becomes stable with three instances again. At
its first assignment the restarted instance drops the entities of the
snapshot's partitions it does not get back, resumes those it gets back at
the snapshot's offsets (the ends: nothing re-read) and rebuilds new ones
from history; the survivors drop the partitions they lose and rebuild those
they gain. So, with one rebalance, messages_consumed grows by exactly the
messages of the partitions each instance gained (the snapshot's partitions
count as held for the restarted one), rejected_ev_misrouted by their
misrouted events, dropped_entities stays within the model's bounds for the
partitions each lost, and the full checks hold a third time. The member
order follows the member ids the broker draws, so the restarted instance
gets its old range back in about one run of three (it reads nothing and
drops nothing) and another range otherwise (it drops every entity it
restored and rebuilds its new partitions).

Time: T0 is the wall clock at start; event times run up to ASOF = T0 + 240 s
and every query evaluates at ASOF. Every catch-up, the rebuild after the
kill included, must end before ASOF (asserted), so the store is exact there.

Run: build/venv/bin/python tests/integration/kafka_shard.py (a broker from
TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
import yaml  # noqa: E402
from harness import Failure, Mismatches, RespError  # noqa: E402
from kafka_common import E  # noqa: E402

NEVENTS = 60_000
PARTITIONS = 8
LEAD_MS = 240_000
NAMES = ("a", "b", "c")
KAFKA_PROPERTIES = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}
SNAPSHOT = {"every": "1s", "keep": 3}
SNAPSHOT_WAIT_S = 15  # for the killed instance's snapshot of its partitions' ends
MF_NAMES = ["impressions:1h", "avg_dwell:1d"]  # what MFEATURES asks for
MF_IDS = 500
MISROUTED_AT = -60_000  # time (from ASOF) of the misrouted events
RECENT_FEATURE = "recent"                      # the users' last_k feature
# Kafka's own vectors for Utils.murmur2 (clients' UtilsTest.testMurmur2):
# the signed 32-bit hash of each key's bytes.
MURMUR2_VECTORS = [
    ("21", -973932308),
    ("foobar", -790332482),
    ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    ("abc", 479470107),
]


# ------------------------------------------------------------ partitioner

def murmur2(data):
    """Kafka's Utils.murmur2 of bytes, as an unsigned 32-bit integer."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    n = len(data)
    h = (0x9747B28C ^ n) & mask
    for i in range(0, n - n % 4, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    tail, rest = n & ~3, n % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def signed32(x):
    return x - (1 << 32) if x & 0x80000000 else x


_partition_cache = {}


def partition_of(key):
    """The partition of a key (text or bytes) among PARTITIONS, as the Java
    client's default partitioner and librdkafka's murmur2_random place it."""
    if isinstance(key, str):
        key = key.encode()
    p = _partition_cache.get(key)
    if p is None:
        p = _partition_cache[key] = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
    return p


# ------------------------------------------------------------ producing

def keyed_records(events, lines, default_ts, entity):
    """(key, payload, Kafka timestamp) per line of e2e.generate() for the
    topic keyed by entity: the key is the event's user or pin id as text.
    A malformed event (None) keeps what kafka_common.records() gives it (the
    user id of its line) in the user topic; in the pin topic it takes the
    pin id its payload carries, if the payload is JSON with one (the events
    without a time field), else the line's key (a payload that is not JSON
    names no id: it is rejected as bad JSON, before any routing check)."""
    out = []
    for ev, (key, payload, ts) in zip(events, K.records(events, lines, default_ts)):
        if entity == "pin":
            if ev is not None:
                key = str(ev["pin_id"])
            else:
                try:
                    key = str(json.loads(payload)["pin_id"])
                except (ValueError, KeyError):
                    pass
        elif ev is not None and key != str(ev["user_id"]):
            raise RuntimeError(f"line key {key!r} is not the event's user id {ev['user_id']}")
        out.append((key, payload, ts))
    return out


def misrouted_records(r, entity, other_id):
    """One well-formed event per partition p of an id of partition p, keyed
    by an id of partition p + 1 (mod PARTITIONS): it arrives on a partition
    its entity id does not hash to, so it must be rejected
    (rejected_ev_misrouted) and change nothing (the model never sees it).
    other_id: the id of the other entity the event carries."""
    out = []
    for p in range(PARTITIONS):
        i = r.probe[entity][p]
        ev = {"user_id": int(i if entity == "user" else other_id),
              "pin_id": int(i if entity == "pin" else other_id),
              "action": "click", "dwell_ms": 1000, "ts": r.asof + MISROUTED_AT}
        out.append((r.probe[entity][(p + 1) % PARTITIONS], json.dumps(ev, separators=(",", ":")),
                    ev["ts"]))
    return out


def produce_checked(bootstrap, batches):
    """Produces batches, [(topic, records)], records (key, payload, ts) in
    order, with kafka_common.produce(). Every delivery report's partition is
    compared with partition_of(key). Returns ({topic: {partition:
    messages}}, reports checked, [mismatch descriptions]). Raises
    RuntimeError when a message fails."""
    wrong = []
    checked = [0]

    def check(msg):
        checked[0] += 1
        want = partition_of(msg.key())
        if msg.partition() != want:
            wrong.append(f"{msg.topic()} key {msg.key()!r}: delivered to partition "
                         f"{msg.partition()}, partition_of says {want}")

    per_part = {topic: K.produce(bootstrap, topic, records, on_delivered=check)
                for topic, records in batches}
    return per_part, checked[0], wrong


# ------------------------------------------------------------ instances

class Instance:
    def __init__(self, name, port, path, cfg, tallyd):
        self.name, self.port, self.path, self.cfg, self.tallyd = name, port, path, cfg, tallyd
        self.addr = f"127.0.0.1:{port}"
        self.cli = tallyd.client(timeout=30)

    def __repr__(self):
        return f"{self.name}({self.addr})"


def write_config(r, name, port):
    """kafka_common's configuration (kafka.start earliest, kafka.ready_lag 0
    where known) made a shard of the run's group: both topics with their
    key entity, the run's endpoints topic, this instance's advertised
    address, a short session timeout (a killed member leaves the group
    within 6 s) and a snapshot directory of its own (SNAPSHOT: every 1 s,
    keep 3)."""
    path, cfg = K.write_config(r.tmp, r.bootstrap, port, r.topics["user"], "shard", "earliest",
                               K.FEATURES, name=f"tallyd-{name}", group=r.group)
    cfg["server"]["advertise"] = f"127.0.0.1:{port}"
    cfg["kafka"]["topics"] = [{"name": r.topics["user"], "key": "user"},
                              {"name": r.topics["pin"], "key": "pin"}]
    cfg["kafka"]["endpoints_topic"] = r.endpoints_topic
    cfg["kafka"]["properties"] = dict(KAFKA_PROPERTIES)
    cfg["snapshot"] = {"dir": str(Path(r.tmp) / f"snapshots-{name}"), **SNAPSHOT}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, cfg


def parse_owned(v):
    """INFO owned: "0,3,5" -> frozenset; "" -> empty; absent/bad -> None."""
    if v is None:
        return None
    try:
        return frozenset(int(x) for x in v.split(",")) if v else frozenset()
    except ValueError:
        return None


def parse_partition_line(v):
    try:
        return dict(x.split("=", 1) for x in v.split(",")) if v else {}
    except ValueError:
        return {"unparsable": v}


def look(r, live):
    """One look at the live instances. Returns (problems, infos, owner):
    problems lists what keeps the group from the stable state (empty when
    stable), infos {name: INFO dict}, owner {partition: Instance} (None
    unless every owned set is known, disjoint and covers 0..7)."""
    problems, infos, owned = [], {}, {}
    for inst in live:
        if inst.tallyd.proc.poll() is not None:
            raise Failure(f"tallyd {inst.name} exited with {inst.tallyd.proc.returncode}:\n"
                          + inst.tallyd.log_tail())
        info = infos[inst.name] = inst.cli.info()
        if info.get("loading") != "0":
            problems.append(f"{inst.name} loading:{info.get('loading')}")
        if info.get("endpoints_known") != str(PARTITIONS):
            problems.append(f"{inst.name} endpoints_known:{info.get('endpoints_known')}")
        o = parse_owned(info.get("owned"))
        if o is None:
            problems.append(f"{inst.name} owned:{info.get('owned')!r} (not a partition list)")
        elif not o:
            problems.append(f"{inst.name} owns no partition")
        else:
            owned[inst.name] = o
    if len(owned) != len(live):
        return problems, infos, None
    every = sorted(p for o in owned.values() for p in o)
    if every != list(range(PARTITIONS)):
        problems.append("owned sets not disjoint or not covering 0..7: "
                        + ", ".join(f"{n}={sorted(o)}" for n, o in owned.items()))
        return problems, infos, None
    owner = {p: inst for inst in live for p in owned[inst.name]}
    # Every owned partition of both topics at its end.
    for inst in live:
        for p in sorted(owned[inst.name]):
            for topic in r.topics.values():
                n = r.per_part[topic].get(p, 0)
                got = parse_partition_line(infos[inst.name].get(f"partition_{topic}_{p}"))
                if got != {"position": str(n), "high": str(n), "lag": "0"}:
                    problems.append(f"{inst.name} partition_{topic}_{p}: {got}, want "
                                    f"position={n},high={n},lag=0")
    # Each partition's probe ids: the owner answers, the others name it.
    for inst in live:
        cmds = ([("FEATURES", "user", r.probe["user"][p], "clicks:5m", "ASOF", r.asof)
                 for p in range(PARTITIONS)]
                + [("FEATURES", "pin", r.probe["pin"][p], "impressions:1h", "ASOF", r.asof)
                   for p in range(PARTITIONS)])
        for cmd, got in zip(cmds, inst.cli.pipeline(cmds)):
            p = partition_of(cmd[2])
            if owner[p] is inst:
                if isinstance(got, RespError):
                    problems.append(f"{inst.name} owns {p} but answers {' '.join(cmd[:3])} "
                                    f"with -{got}")
            elif got != moved(p, owner[p]):
                problems.append(f"{inst.name}: {' '.join(cmd[:3])} -> {H.short(got, 120)}, "
                                f"want -{moved(p, owner[p])}")
    return problems, infos, owner


def moved(p, owner):
    return RespError(f"MOVED {p} {owner.addr}")


def wait_stable(r, live, seconds):
    """Polls look() until the live instances are stable; sets r.owner,
    r.owned, r.infos and r.stable_ms. Raises Failure with what still
    differed at the deadline."""
    end = H.deadline(seconds)
    while True:
        problems, infos, owner = look(r, live)
        if not problems:
            r.owner, r.infos = owner, infos
            r.owned = {inst.name: frozenset(p for p, o in owner.items() if o is inst)
                       for inst in live}
            r.stable_ms = int(time.time() * 1000)
            return
        if time.monotonic() > end:
            more = f" (+{len(problems) - 12} more)" if len(problems) > 12 else ""
            raise Failure(f"not stable within {seconds * H.MULT:.0f} s: "
                          + "; ".join(problems[:12]) + more + "\n"
                          + "\n".join(f"--- {i.name} log:\n{i.tallyd.log_tail(15)}"
                                      for i in live))
        time.sleep(0.2)  # poll interval of a deadline-bounded wait


def range_assignment(members):
    """Eager range assignor: members (in member-id order) get contiguous
    ranges, the first PARTITIONS % n one partition more."""
    n = len(members)
    out, start = {}, 0
    for i, m in enumerate(members):
        size = PARTITIONS // n + (1 if i < PARTITIONS % n else 0)
        out[m] = frozenset(range(start, start + size))
        start += size
    return out


# ------------------------------------------------------------ setup

class Run:
    pass


def setup():
    H.check_binaries(H.TALLYD)
    r = Run()
    r.t0 = int(time.time() * 1000)
    r.asof = (r.t0 + LEAD_MS) // 1000 * 1000
    r.tmp = H.make_tmpdir("tly-kafka-shard-")
    r.bootstrap = K.broker()
    r.topics = {"user": K.topic_name("tly-shard-by-user"), "pin": K.topic_name("tly-shard-by-pin")}
    r.endpoints_topic = K.topic_name("tly-shard-endpoints")
    r.group = f"tly-shard-{K.RUN_ID}"
    for topic in r.topics.values():
        K.create_topic(r.bootstrap, topic, PARTITIONS)
    events, lines, users, pins = E.generate(r.asof, nevents=NEVENTS, seed=E.SEED + 404)
    r.users = users + E.UNKNOWN_USERS
    r.pins = pins + E.UNKNOWN_PINS
    # A user and a pin of every partition, asked while waiting for stability.
    r.probe = {}
    for entity, ids in (("user", users), ("pin", pins)):
        r.probe[entity] = {}
        for i in ids:
            r.probe[entity].setdefault(partition_of(i), i)
        if len(r.probe[entity]) != PARTITIONS:
            raise RuntimeError(f"no {entity} id for partitions "
                               f"{sorted(set(range(PARTITIONS)) - set(r.probe[entity]))}")
    t = time.monotonic()
    r.records = {e: keyed_records(events, lines, r.asof - E.HOUR, e) for e in ("user", "pin")}
    r.records["user"] += misrouted_records(r, "user", pins[0])
    r.records["pin"] += misrouted_records(r, "pin", users[0])
    r.misrouted = {}  # partition -> misrouted messages in it (both topics)
    for e in ("user", "pin"):
        for key, _, _ in r.records[e][len(lines):]:
            r.misrouted[partition_of(key)] = r.misrouted.get(partition_of(key), 0) + 1
    r.per_part, r.checked, r.misplaced = produce_checked(
        r.bootstrap, [(r.topics[e], r.records[e]) for e in ("user", "pin")])
    r.produce_s = time.monotonic() - t
    r.produced = len(r.records["user"]) + len(r.records["pin"])
    r.nodes = []
    for name in NAMES:
        port = H.free_port()
        path, cfg = write_config(r, name, port)
        t = K.Tallyd(path, port, r.tmp, name=f"tallyd-{name}")
        r.nodes.append(Instance(name, port, path, cfg, t))
    r.started = time.monotonic()
    # The ground truth, while the instances ingest: both topics carry the
    # same events, each feeding its own entity's features.
    r.model = model = E.Model(r.nodes[0].cfg, events, r.asof, r.t0)
    r.want_features = {(e, i): E.resp2_pairs(model.features(e, i))
                       for e, ids in (("user", r.users), ("pin", r.pins)) for i in ids}
    r.want_recent = {i: model.recent("user", i, RECENT_FEATURE) for i in r.users}
    rng = random.Random(E.SEED + 405)
    r.mf_ids = rng.sample(pins, MF_IDS - len(E.UNKNOWN_PINS)) + E.UNKNOWN_PINS
    r.want_mf = {i: [v for _, v in model.features("pin", i, MF_NAMES)] for i in r.mf_ids}
    print(f"# broker {r.bootstrap}, topics {r.topics['user']} and {r.topics['pin']}: "
          f"{r.produced} messages ({2 * PARTITIONS} misrouted) in {r.produce_s:.1f} s; "
          f"{len(model.ids['user'])} users and {len(model.ids['pin'])} pins with kept events; "
          f"instances {', '.join(map(repr, r.nodes))}; ASOF={r.asof}", flush=True)
    return r


# ------------------------------------------------------------ checks

def t_murmur2(r):
    """The Python murmur2 gives Kafka's test vectors, and librdkafka's
    murmur2_random put every produced message where partition_of says."""
    m = Mismatches()
    for key, want in MURMUR2_VECTORS:
        m.eq(signed32(murmur2(key.encode())), want, f"murmur2({key!r})")
    m.eq(r.checked, r.produced, "delivery reports checked")
    for msg in r.misplaced:
        m.add(msg)
    for topic in r.topics.values():
        m.eq(sorted(r.per_part[topic]), list(range(PARTITIONS)),
             f"partitions of {topic} that received messages")
    m.done()


def t_stable(r, live, seconds):
    wait_stable(r, live, seconds)


def t_assignment(r, live, want):
    """mode:shard, endpoint: the advertised address, and the owned sets the
    eager range assignor gives (want: {name: partitions})."""
    m = Mismatches()
    for inst in live:
        info = r.infos[inst.name]
        m.eq(info.get("mode"), "shard", f"{inst.name} INFO mode")
        m.eq(info.get("endpoint"), inst.addr, f"{inst.name} INFO endpoint")
        m.eq(sorted(r.owned[inst.name]), sorted(want[inst.name]), f"{inst.name} owned partitions")
    m.check(r.stable_ms < r.asof, f"caught up at {r.stable_ms}, after ASOF {r.asof} (machine "
            f"too slow? the ground truth at ASOF then no longer applies)")
    m.done()


def misrouted_seen(info):
    # INFO lists a rejected_* counter only once it is non-zero.
    return int(info.get("rejected_ev_misrouted", "0"))


def t_misrouted(r, live, base, want, exact):
    """INFO rejected_ev_misrouted, less base, is want (exact) or at least
    want: the misrouted messages of the partitions read since base."""
    m = Mismatches()
    for inst in live:
        got = misrouted_seen(r.infos[inst.name]) - base.get(inst.name, 0)
        if exact:
            m.eq(got, want[inst.name], f"{inst.name} INFO rejected_ev_misrouted growth")
        else:
            m.check(got >= want[inst.name], f"{inst.name} INFO rejected_ev_misrouted {got}, want "
                    f">= {want[inst.name]} (the misrouted messages of its partitions "
                    f"{sorted(r.owned[inst.name])})")
    m.done()


def misrouted_in(r, parts):
    return sum(r.misrouted.get(p, 0) for p in parts)


def answers(r, live, cmds, want_of, what):
    """Sends cmds (each naming its id at index 2) to every live instance:
    the owner of the id's partition must reply want_of(cmd), every other
    instance -MOVED with the partition and the owner's address. Returns
    {name: MOVED replies seen}."""
    m = Mismatches()
    seen = {}
    for inst in live:
        seen[inst.name] = 0
        for cmd, got in zip(cmds, E.batched(inst.cli, cmds)):
            p = partition_of(cmd[2])
            owner = r.owner[p]
            if owner is inst:
                m.eq(got, want_of(cmd), f"{what} owner {inst.name}: {' '.join(map(str, cmd))}")
            else:
                seen[inst.name] += got == moved(p, owner)
                m.eq(got, moved(p, owner), f"{what} {inst.name} (partition {p} is "
                     f"{owner.name}'s): {' '.join(map(str, cmd[:3]))}")
    m.done()
    return seen


def t_features(r, live, entity):
    ids = r.users if entity == "user" else r.pins
    cmds = [("FEATURES", entity, i, "ASOF", r.asof) for i in ids]
    answers(r, live, cmds, lambda c: r.want_features[(entity, c[2])], "FEATURES")


def t_recent(r, live):
    cmds = [("RECENT", "user", i, RECENT_FEATURE, "ASOF", r.asof) for i in r.users]
    answers(r, live, cmds, lambda c: r.want_recent[c[2]], "RECENT")


def t_moved_counter(r, live):
    """INFO moved_replies grows by the MOVED replies an instance gave."""
    cmds = [("FEATURES", "user", i, "clicks:1h", "ASOF", r.asof) for i in r.users]
    before = {inst.name: int(inst.cli.info().get("moved_replies", -1)) for inst in live}
    seen = answers(r, live, cmds,
                   lambda c: E.resp2_pairs(r.model.features("user", c[2], ["clicks:1h"])),
                   "FEATURES")
    m = Mismatches()
    for inst in live:
        after = int(inst.cli.info().get("moved_replies", -1))
        m.eq(after - before[inst.name], seen[inst.name],
             f"{inst.name} INFO moved_replies {before[inst.name]} -> {after}: growth")
    m.done()


def t_mfeatures(r, live):
    """MFEATURES of 500 pins on each instance: owned ids' elements are the
    truth, the others' the MOVED error of their partition."""
    m = Mismatches()
    cmd = ("MFEATURES", "pin", len(r.mf_ids), *r.mf_ids, *MF_NAMES, "ASOF", r.asof)
    for inst in live:
        got = inst.cli.cmd(*cmd)
        want = [r.want_mf[i] if r.owner[partition_of(i)] is inst
                else moved(partition_of(i), r.owner[partition_of(i)]) for i in r.mf_ids]
        if not isinstance(got, list) or len(got) != len(want):
            m.add(f"{inst.name} MFEATURES pin {len(r.mf_ids)}: {H.short(got)}")
            continue
        for i, g, w in zip(r.mf_ids, got, want):
            m.eq(g, w, f"{inst.name} MFEATURES pin element of {i} (partition {partition_of(i)})")
    m.done()


def t_unchanged(r, live):
    """No rebalance happened while the checks ran (their verdicts hold for
    one assignment)."""
    m = Mismatches()
    for inst in live:
        info = inst.cli.info()
        m.eq(parse_owned(info.get("owned")), r.owned[inst.name], f"{inst.name} owned")
        m.eq(info.get("loading"), "0", f"{inst.name} loading")
    m.done()


def run_phase(suite, r, live, prefix):
    suite.run(f"{prefix}features_every_user_answered_by_owner_others_moved", t_features, r, live,
              "user")
    suite.run(f"{prefix}features_every_pin_answered_by_owner_others_moved", t_features, r, live,
              "pin")
    suite.run(f"{prefix}recent_every_user_answered_by_owner_others_moved", t_recent, r, live)
    suite.run(f"{prefix}info_moved_replies_counts_moved_replies", t_moved_counter, r, live)
    suite.run(f"{prefix}mfeatures_500_pins_owned_truth_others_moved_elements", t_mfeatures, r,
              live)
    suite.run(f"{prefix}no_rebalance_during_the_checks", t_unchanged, r, live)


def t_dropped_lower(r, survivors):
    """A survivor that lost partitions dropped their entities: at least
    every user and pin of those partitions with an event surely kept."""
    m = Mismatches()
    for inst in survivors:
        lost = r.lost[inst.name]
        if lost:
            m.check(r.dropped[inst.name] > 0,
                    f"{inst.name} lost partitions {sorted(lost)} but dropped_entities grew by "
                    f"{r.dropped[inst.name]}")
            m.check(r.dropped[inst.name] >= r.sure[inst.name],
                    f"{inst.name} lost partitions {sorted(lost)}: dropped_entities grew by "
                    f"{r.dropped[inst.name]}, fewer than the {r.sure[inst.name]} entities with "
                    f"events surely kept there")
    m.check(any(r.lost.values()), f"no instance lost a partition (before {r.before}, after "
            f"{r.owned}): {r.why_lost}")
    m.done()


def t_dropped_upper(r, survivors):
    """Partitions a survivor keeps are not dropped: a survivor that lost
    none drops nothing; one that lost some drops at most the entities that
    may exist in them."""
    m = Mismatches()
    for inst in survivors:
        if r.lost[inst.name]:
            m.check(r.dropped[inst.name] <= r.maybe[inst.name],
                    f"{inst.name} lost {sorted(r.lost[inst.name])}: dropped_entities grew by "
                    f"{r.dropped[inst.name]}, more than the {r.maybe[inst.name]} users and pins "
                    f"with events there (entities of kept partitions dropped?)")
        else:
            m.eq(r.dropped[inst.name], 0, f"{inst.name} kept {sorted(r.before[inst.name])}: "
                 f"dropped_entities growth")
    m.done()


def ends_of(r, parts):
    """{(topic, partition): end offset} of both topics' partitions parts."""
    return {(t, p): r.per_part[t].get(p, 0) for t in r.topics.values() for p in sorted(parts)}


def committed(r, keys):
    """The group's committed offsets {(topic, partition): offset} of keys."""
    return K.committed(r.bootstrap, r.group, keys)


def t_snapshots_before_kill(r, live, victim):
    """Every instance has written a snapshot, and the victim's newest
    durable snapshot holds the end of each of its partitions: tallyd
    commits a partition's offset only once a snapshot holding it is durable,
    and only the victim owns these partitions, so committed offsets equal
    to the end offsets mean such a snapshot is on disk. The checks after
    the first stable look gave it time; this bounds the wait."""
    want = ends_of(r, r.owned[victim.name])
    end = H.deadline(SNAPSHOT_WAIT_S)
    while True:
        written = {i.name: int(i.cli.info().get("snapshots_written", -1)) for i in live}
        got = committed(r, want)
        files = K.snapshot_files(victim.cfg["snapshot"]["dir"])
        # the newest durable snapshot covers the victim's latest assignment
        # change, so it holds exactly its partitions (an assignment change
        # makes a new snapshot due)
        vi = victim.cli.info()
        covers = (vi.get("last_snapshot_rebalances"), vi.get("rebalances"))
        if (all(w >= 1 for w in written.values()) and got == want and files
                and covers[0] == covers[1]):
            r.victim_files = files
            return
        if time.monotonic() > end:
            raise Failure(f"within {SNAPSHOT_WAIT_S * H.MULT:.0f} s: snapshots_written {written}; "
                          f"{victim.name}'s snapshot files {[n for _, n in files]}, the newest "
                          f"covering {covers[0]} of its {covers[1]} rebalances; committed "
                          f"offsets of its partitions {got}, want the ends {want}")
        time.sleep(0.2)  # poll interval of a deadline-bounded wait


def t_restart(r, victim):
    """The killed instance's snapshot directory holds the snapshot it wrote
    before the kill; the instance starts again with the same config."""
    files = K.snapshot_files(victim.cfg["snapshot"]["dir"])
    if not files:
        raise Failure(f"no snapshot file in {victim.cfg['snapshot']['dir']} after the kill "
                      f"(before it: {[n for _, n in r.victim_files]})")
    r.restart_file = files[0]
    t = K.Tallyd(victim.path, victim.port, r.tmp, name=f"tallyd-{victim.name}-restarted")
    r.restarted = Instance(victim.name, victim.port, victim.path, victim.cfg, t)


def t_restored(r, inst, held):
    """INFO of the restarted instance: the newest snapshot file restored,
    none rejected, its entities within the model's count for the snapshot's
    partitions (held). Its first assignment gives it all of them back (it
    drops nothing) or none (it drops every entity it restored): with three
    members the range assignor gives it either its old range or another."""
    info = r.infos[inst.name]
    m = Mismatches()
    num = {k: int(info.get(k, -1)) for k in ("restored_snapshot_ms", "restored_entities",
                                             "snapshots_rejected", "dropped_entities")}
    m.check(num["restored_snapshot_ms"] > 0, f"restored_snapshot_ms {num['restored_snapshot_ms']}: "
            f"no snapshot restored")
    m.eq(num["restored_snapshot_ms"], r.restart_file[0],
         f"INFO restored_snapshot_ms (the newest file is {r.restart_file[1]})")
    m.check(num["restored_entities"] > 0, f"restored_entities {num['restored_entities']}")
    sure, maybe = entities_in(r, held, True), entities_in(r, held, False)
    m.check(sure <= num["restored_entities"] <= maybe,
            f"restored_entities {num['restored_entities']}, want {sure}..{maybe} (the users and "
            f"pins of partitions {sorted(held)} with events surely kept .. with any event)")
    m.eq(num["snapshots_rejected"], 0, "INFO snapshots_rejected")
    owned = r.owned[inst.name]
    if held <= owned:
        m.eq(num["dropped_entities"], 0, f"INFO dropped_entities (owns {sorted(owned)}, all of "
             f"the snapshot's {sorted(held)})")
    elif not held & owned:
        m.eq(num["dropped_entities"], num["restored_entities"],
             f"INFO dropped_entities (owns {sorted(owned)}, none of the snapshot's "
             f"{sorted(held)}): restored_entities")
    else:
        m.add(f"owns {sorted(owned)}, part of the snapshot's {sorted(held)}: the range assignor "
              f"over three members gives either all or none of them")
    m.done()


def t_consumed(r, live, base, held):
    """With one rebalance (INFO rebalances grew by 2 on the survivors:
    revoke and assign, by 1 on the restarted instance: assign), each
    instance's messages_consumed grew by exactly the messages of the
    partitions it owns now and did not hold before (held: {name:
    partitions}, the snapshot's for the restarted instance, whose base is
    0): a partition held is not read again, a new one is read from its
    beginning."""
    m = Mismatches()
    for inst in live:
        info = r.infos[inst.name]
        b = base.get(inst.name, {})
        reb = int(info.get("rebalances", -1)) - b.get("rebalances", 0)
        got = int(info.get("messages_consumed", -1)) - b.get("messages_consumed", 0)
        gained = r.owned[inst.name] - held[inst.name]
        want = sum(ends_of(r, gained).values())
        r.consumed[inst.name] = got
        m.eq(reb, 1 if inst is r.restarted else 2, f"{inst.name} INFO rebalances growth")
        m.eq(got, want, f"{inst.name} INFO messages_consumed growth (held {sorted(held[inst.name])}"
             f", owns {sorted(r.owned[inst.name])}: the messages of {sorted(gained)} in both "
             f"topics)")
    m.done()


def entities_in(r, parts, sure):
    """Users and pins of the model in partitions parts: with an event surely
    kept (sure) or with any event that may be kept."""
    if sure:
        keys = r.model.last_event
    else:
        keys = {(e, i) for e in ("user", "pin") for i in r.model.ids[e]}
    return sum(1 for _, i in keys if partition_of(i) in parts)


def close_all(suite, nodes):
    K.close_ctxs(suite, [(inst.name, inst) for inst in nodes])


def main():
    suite = H.Suite("kafka_shard")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_shard_setup_produces_two_topics_and_starts_three_instances", e)
        return suite.finish()
    suite.run("python_murmur2_matches_kafka_vectors_and_every_delivery_report", t_murmur2, r)
    live = list(r.nodes)
    if not suite.run("shard3_owned_disjoint_cover_all_caught_up_endpoints_known", t_stable, r,
                     live, 90):
        close_all(suite, live)
        return H.finish(suite, r.tmp)
    stable_s = time.monotonic() - r.started
    order = sorted(live, key=lambda i: min(r.owned[i.name]))
    want = {i.name: p for i, p in range_assignment(order).items()}
    suite.run("shard3_mode_endpoint_and_range_assignment", t_assignment, r, live, want)
    suite.run("shard3_misrouted_events_rejected_in_owned_partitions", t_misrouted, r, live, {},
              {i.name: misrouted_in(r, r.owned[i.name]) for i in live}, False)
    print(f"# 3 instances stable by {stable_s:.1f} s after start (first look): "
          + ", ".join(f"{i.name} owns {sorted(r.owned[i.name])}" for i in live), flush=True)
    run_phase(suite, r, live, "shard3_")

    # kill -9 the owner of partition 0 (the first in member order), once its
    # snapshot holds its partitions' ends.
    victim = r.owner[0]
    survivors = [i for i in live if i is not victim]
    if not suite.run("shard3_every_instance_snapshotted_victims_snapshot_holds_its_ends",
                     t_snapshots_before_kill, r, live, victim):
        close_all(suite, live)
        return H.finish(suite, r.tmp)
    r.before = dict(r.owned)
    infos_before = {i.name: i.cli.info() for i in survivors}
    dropped_before = {n: int(info.get("dropped_entities", -1)) for n, info in infos_before.items()}
    misrouted_before = {n: misrouted_seen(info) for n, info in infos_before.items()}
    victim.cli.close()
    victim.tallyd.proc.kill()
    victim.tallyd.proc.wait()
    victim.tallyd.close()
    t_kill = time.monotonic()
    if not suite.run("shard2_after_kill9_survivors_own_all_rebuilt_endpoints_moved", t_stable,
                     r, survivors, 90):
        close_all(suite, survivors)
        return H.finish(suite, r.tmp)
    rebuild_s = time.monotonic() - t_kill
    order = [i for i in order if i is not victim]
    want = {i.name: p for i, p in range_assignment(order).items()}
    suite.run("shard2_mode_endpoint_and_range_assignment", t_assignment, r, survivors, want)
    suite.run("shard2_gained_partitions_read_again_misrouted_rejected", t_misrouted, r,
              survivors, misrouted_before,
              {i.name: misrouted_in(r, r.owned[i.name] - r.before[i.name]) for i in survivors},
              True)
    r.lost, r.dropped, r.sure, r.maybe = {}, {}, {}, {}
    for inst in survivors:
        r.lost[inst.name] = r.before[inst.name] - r.owned[inst.name]
        r.dropped[inst.name] = (int(r.infos[inst.name].get("dropped_entities", -1))
                                - dropped_before[inst.name])
        r.sure[inst.name] = entities_in(r, r.lost[inst.name], True)
        r.maybe[inst.name] = entities_in(r, r.lost[inst.name], False)
    r.why_lost = "the kill of partition 0's owner should move the first survivor's range"
    suite.run("shard2_survivor_losing_partitions_drops_their_entities", t_dropped_lower, r,
              survivors)
    suite.run("shard2_survivor_drops_nothing_of_partitions_it_keeps", t_dropped_upper, r,
              survivors)
    print(f"# kill -9 of {victim.name} (owned {sorted(r.before[victim.name])}): stable again "
          f"{rebuild_s:.1f} s later, "
          + ", ".join(f"{i.name} {sorted(r.before[i.name])} -> {sorted(r.owned[i.name])} "
                      f"dropped_entities +{r.dropped[i.name]} (model: {r.sure[i.name]}.."
                      f"{r.maybe[i.name]} in lost partitions)" for i in survivors), flush=True)
    run_phase(suite, r, survivors, "shard2_after_kill9_")

    # The killed instance starts again from its snapshot directory.
    held = dict(r.owned)
    held[victim.name] = r.before[victim.name]  # the partitions of its snapshot
    infos_before = {i.name: i.cli.info() for i in survivors}
    base = {n: {k: int(info.get(k, -1)) for k in ("messages_consumed", "rebalances")}
            for n, info in infos_before.items()}
    dropped_before = {n: int(info.get("dropped_entities", -1)) for n, info in infos_before.items()}
    misrouted_before = {n: misrouted_seen(info) for n, info in infos_before.items()}
    r.restarted = None
    if not suite.run("shard3_restart_of_killed_instance_finds_its_snapshot_and_serves",
                     t_restart, r, victim):
        close_all(suite, survivors)
        return H.finish(suite, r.tmp)
    t_restart_s = time.monotonic()
    live = survivors + [r.restarted]
    if not suite.run("shard3_after_restart_owned_disjoint_cover_all_caught_up_endpoints_known",
                     t_stable, r, live, 90):
        close_all(suite, live)
        return H.finish(suite, r.tmp)
    restart_s = time.monotonic() - t_restart_s
    order = sorted(live, key=lambda i: min(r.owned[i.name]))
    want = {i.name: p for i, p in range_assignment(order).items()}
    suite.run("shard3_after_restart_mode_endpoint_and_range_assignment", t_assignment, r, live,
              want)
    suite.run("shard3_after_restart_snapshot_restored_newest_file_model_entities", t_restored, r,
              r.restarted, held[victim.name])
    r.consumed = {}
    suite.run("shard3_after_restart_held_partitions_not_reread_gained_read_from_history",
              t_consumed, r, live, base, held)
    suite.run("shard3_after_restart_gained_partitions_misrouted_rejected", t_misrouted, r, live,
              misrouted_before, {i.name: misrouted_in(r, r.owned[i.name] - held[i.name])
                                 for i in live}, True)
    r.before = held
    r.lost, r.dropped, r.sure, r.maybe = {}, {}, {}, {}
    for inst in live:
        r.lost[inst.name] = held[inst.name] - r.owned[inst.name]
        r.dropped[inst.name] = (int(r.infos[inst.name].get("dropped_entities", -1))
                                - dropped_before.get(inst.name, 0))
        r.sure[inst.name] = entities_in(r, r.lost[inst.name], True)
        r.maybe[inst.name] = entities_in(r, r.lost[inst.name], False)
    r.why_lost = "the two survivors held all 8 partitions, the restarted instance takes some"
    suite.run("shard3_after_restart_partitions_lost_drop_their_entities", t_dropped_lower, r,
              live)
    suite.run("shard3_after_restart_partitions_kept_or_restored_not_dropped", t_dropped_upper, r,
              live)
    info = r.infos[victim.name]
    print(f"# restart of {victim.name} from {r.restart_file[1]} (its snapshot of "
          f"{sorted(held[victim.name])}): stable {restart_s:.1f} s later; restored "
          f"{info.get('restored_entities')} entities (model: "
          f"{entities_in(r, held[victim.name], True)}..{entities_in(r, held[victim.name], False)})"
          f", consumed {info.get('messages_consumed')} messages (rebalances "
          f"{info.get('rebalances')}); "
          + ", ".join(f"{i.name} {sorted(held[i.name])} -> {sorted(r.owned[i.name])} consumed "
                      f"+{r.consumed.get(i.name, '?')} dropped_entities +{r.dropped[i.name]} "
                      f"(model: {r.sure[i.name]}..{r.maybe[i.name]} in lost partitions)"
                      for i in live), flush=True)
    run_phase(suite, r, live, "shard3_after_restart_")
    close_all(suite, live)
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
