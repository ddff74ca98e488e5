#!/usr/bin/env python3
"""A tallyd whose local fetch queue fills again and again while it catches up
with a real Apache Kafka broker (scripts/kafka.sh) must keep consuming.

librdkafka 2.0.2 stops fetching a partition while the consumer queue holds
queued.min.messages messages, and decides again only when something wakes
its broker thread, or after a second. tallyd nudges it as the queue drains
(INFO fetch_nudges). Here the queue holds 300 messages and a fetch brings at
most 4 KiB per partition, about one producer batch of 40 events (the
broker returns whole batches), so the fetcher stops every fetch or two: the
40,000 events below would take over a minute of one-second waits without
the nudges. The test wants them all consumed, the malformed ones rejected,
every partition at its end, within 40 s (stretched by TLY_TEST_TIMEOUT_MULT),
and at least one nudge counted; then every user's and pin's values equal
the ground truth (e2e.py's model).

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


def setup():
    r = K.new_run("fetch", LEAD_MS, PARTITIONS)
    ev, lines, r.users, r.pins = E.generate(r.asof, nevents=NEVENTS, seed=E.SEED + 303)
    r.per_part = K.produce(r.bootstrap, r.topic, K.records(ev, lines, r.asof - E.HOUR),
                           batch=BATCH)
    r.produced = len(lines)
    port = H.free_port()
    path, cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "earliest",
                               K.FEATURES)
    cfg["kafka"]["properties"] = {"queued.min.messages": "300",
                                  "max.partition.fetch.bytes": "4096"}
    with open(path, "w") as f:
        K.yaml.safe_dump(cfg, f, sort_keys=False)
    r.model = E.Model(cfg, ev, r.asof, r.t0)
    t = K.Tallyd(path, port, r.tmp)
    r.info = K.wait_caught_up(t, r.produced, seconds=CATCH_UP_S)
    r.c = K.ctx(t, cfg, path, r.model, r.asof, r.users, r.pins, r.produced,
                int(time.time() * 1000), r.tmp)
    print(f"# broker {r.bootstrap}, topic {r.topic}: {r.produced} messages in batches of "
          f"{BATCH}; fetch_nudges {r.info.get('fetch_nudges')}", flush=True)
    return r


def t_ingest(r):
    K.check_ingest(r.c, r.info, r.produced, r.per_part, r.topic, E.BAD_JSON + E.MISSING_TIME)


def t_nudged(r):
    n = int(r.info.get("fetch_nudges", "0"))
    if n < 1:
        raise H.Failure(f"INFO fetch_nudges {n}: the fetcher was never nudged, yet its queue "
                        f"of 300 filled while {r.produced} messages were read")


def main():
    suite = H.Suite("kafka_fetch")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_fetch_setup_catches_up_with_a_small_fetch_queue", e)
        return suite.finish()
    suite.run("fetch_small_queue_consumes_every_partition_and_message_once", t_ingest, r)
    suite.run("fetch_small_queue_counts_its_nudges", t_nudged, r)
    K.run_truth_checks(suite, r.c, prefix="fetch_")
    r.c.cli.close()
    alive = r.c.tallyd.proc.poll() is None
    rc = r.c.tallyd.close()
    if not alive or rc != 0:
        suite.fail_setup("tallyd_stays_up_and_exits_0_on_sigterm",
                         f"tallyd {'died during the run' if not alive else 'exited'} with {rc}:\n"
                         + r.c.tallyd.log_tail())
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
