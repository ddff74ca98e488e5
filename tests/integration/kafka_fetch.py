#!/usr/bin/env python3
"""A tallyd whose local fetch queue fills again and again while it catches up
with a real Apache Kafka broker (scripts/kafka.sh) must keep consuming.

librdkafka 2.0.2 stops fetching a partition while the consumer queue holds
queued.min.messages messages or queued.max.messages.kbytes of them, and
decides again only when something wakes its broker thread, or after a
second. tallyd nudges it as the queue drains (INFO fetch_nudges). Two
instances read the same topic of 40,000 events in producer batches of 40,
with fetches of at most 4 KiB per partition (about one batch: the broker
returns whole batches):
  - count: a queue of 300 messages;
  - bytes: a queue of 16 KiB (about 170 of these events), which tallyd
    judges from the mean payload it polls.
Either way the fetcher stops every fetch or two: the 40,000 events would
take over a minute of one-second waits without the nudges. Each instance
must consume them all within 40 s (stretched by TLY_TEST_TIMEOUT_MULT),
reject the malformed ones and end every partition at lag 0. Its nudges must
mostly be the ones sent as the queue drains: at least one, and no fewer than
the idle nudges (sent after an empty 100 ms poll while behind, which alone
would also catch up within 40 s, a tenth of a second per refill). Then every
user's and pin's values on each equal the ground truth (e2e.py's model).

Run: build/venv/bin/python tests/integration/kafka_fetch.py (a broker from
TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
from kafka_common import E  # noqa: E402

NEVENTS = 40_000
PARTITIONS = 8
BATCH = 40
LEAD_MS = 240_000
CATCH_UP_S = 40
CASES = [
    ("count", {"queued.min.messages": "300", "max.partition.fetch.bytes": "4096"}),
    ("bytes", {"queued.max.messages.kbytes": "16", "max.partition.fetch.bytes": "4096"}),
]


def setup():
    r = K.new_run("fetch", LEAD_MS, PARTITIONS)
    ev, lines, r.users, r.pins = E.generate(r.asof, nevents=NEVENTS, seed=E.SEED + 303)
    r.per_part = K.produce(r.bootstrap, r.topic, K.records(ev, lines, r.asof - E.HOUR),
                           batch=BATCH)
    r.produced = len(lines)
    runs = []
    for name, props in CASES:
        port = H.free_port()
        path, cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "earliest",
                                   K.FEATURES, name=f"tallyd-{name}", properties=props)
        runs.append((name, props, port, path, cfg))
    r.model = E.Model(runs[0][4], ev, r.asof, r.t0)  # the same features for both
    r.ctxs = []
    for name, props, port, path, cfg in runs:
        t = K.Tallyd(path, port, r.tmp, name=f"tallyd-{name}")
        info = K.wait_caught_up(t, r.produced, seconds=CATCH_UP_S)
        c = K.ctx(t, cfg, path, r.model, r.asof, r.users, r.pins, r.produced,
                  int(time.time() * 1000), r.tmp)
        c.info, c.props = info, props
        r.ctxs.append((name, c))
        print(f"# {name}: {r.produced} messages in batches of {BATCH}, {props}: "
              f"fetch_nudges {info.get('fetch_nudges')}, of them idle "
              f"{info.get('fetch_idle_nudges')}", flush=True)
    return r


def t_ingest(r, c):
    K.check_ingest(c, c.info, r.produced, r.per_part, r.topic, E.BAD_JSON + E.MISSING_TIME)


def t_nudged(r, c):
    idle = int(c.info.get("fetch_idle_nudges", "0"))
    drain = int(c.info.get("fetch_nudges", "0")) - idle
    if drain < 1 or idle > drain:
        raise H.Failure(f"INFO: {drain} nudges as the queue drained, {idle} after an empty "
                        f"poll; want at least one of the first kind and no more of the second, "
                        f"as the queue ({c.props}) filled while {r.produced} messages were read")


def main():
    suite = H.Suite("kafka_fetch")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_fetch_setup_catches_up_with_small_fetch_queues", e)
        return suite.finish()
    for name, c in r.ctxs:
        suite.run(f"fetch_{name}_cap_consumes_every_partition_and_message_once", t_ingest, r, c)
        suite.run(f"fetch_{name}_cap_counts_its_nudges", t_nudged, r, c)
        K.run_truth_checks(suite, c, prefix=f"fetch_{name}_")
    K.close_ctxs(suite, r.ctxs)
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
