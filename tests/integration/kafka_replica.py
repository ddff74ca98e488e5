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
from the beginning; a second batch is produced while both run. Afterwards
both INFOs show all 8 partitions at their ends with every message consumed
once, and every value of every user and pin on each instance equals the
ground truth of both batches (e2e.py's model).

Run: build/venv/bin/python tests/integration/kafka_replica.py (a broker from
TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

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
    # The second batch arrives while both run.
    for p, n in K.produce(r.bootstrap, r.topic, K.records(ev2, lines2, r.asof - E.HOUR)).items():
        r.per_part[p] = r.per_part.get(p, 0) + n
    r.produced = len(lines1) + len(lines2)
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


def main():
    suite = H.Suite("kafka_replica")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_replica_setup_two_instances_catch_up", e)
        return suite.finish()
    for name, c in r.ctxs:
        suite.run(f"replica_{name}_consumes_every_partition_and_message_once", t_ingest, r, c)
    for name, c in r.ctxs:
        K.run_truth_checks(suite, c, prefix=f"replica_{name}_")
    suite.run("replica_both_commit_offsets_under_the_shared_group", t_committed_offsets, r)
    K.close_ctxs(suite, r.ctxs)
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
