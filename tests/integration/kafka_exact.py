#!/usr/bin/env python3
"""tallyd against a real Apache Kafka broker (scripts/kafka.sh), one instance
in replica mode reading every partition: 200,000 seeded events (e2e.py's stream:
Zipf users and pins, times over the last 8 days, some ties, 15 malformed)
are produced keyed by user id with the Java client's partitioner into a
topic of 8 partitions, before tallyd starts with kafka.start earliest and a
fresh consumer group. Once INFO says every message was consumed and every
partition is at its end, every value of every user and pin must equal the
ground truth e2e.py's model computes from the event list alone.

Time: T0 is the wall clock at start; event times run up to ASOF = T0 + 240 s
and queries evaluate at ASOF (the store is exact for reads at or after its
ingest clock; the ingest test asserts ingest ended before ASOF).

Run: build/venv/bin/python tests/integration/kafka_exact.py (a broker from
TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
from kafka_common import E  # noqa: E402

NEVENTS = 200_000
PARTITIONS = 8
LEAD_MS = 240_000


def setup():
    H.check_binaries(H.TALLYD)
    c0 = E.Ctx()
    c0.t0 = int(time.time() * 1000)
    c0.asof = (c0.t0 + LEAD_MS) // 1000 * 1000
    c0.tmp = H.make_tmpdir("tly-kafka-exact-")
    bootstrap = K.broker()
    topic = K.topic_name("tly-exact")
    K.create_topic(bootstrap, topic, PARTITIONS)
    events, lines, users, pins = E.generate(c0.asof, nevents=NEVENTS)
    t = time.monotonic()
    per_part = K.produce(bootstrap, topic, K.records(events, lines, c0.asof - E.HOUR))
    produce_s = time.monotonic() - t
    produced = sum(per_part.values())
    if produced != len(lines):
        raise RuntimeError(f"produced {produced} of {len(lines)} messages")
    highs = K.end_offsets(bootstrap, topic, PARTITIONS)
    if highs != per_part:
        raise RuntimeError(f"high watermarks {highs} differ from the delivery reports {per_part}")
    port = H.free_port()
    path, cfg = K.write_config(c0.tmp, bootstrap, port, topic, "replica", "earliest", K.FEATURES)
    t = time.monotonic()
    tallyd = K.Tallyd(path, port, c0.tmp)
    model = E.Model(cfg, events, c0.asof, c0.t0)  # while tallyd ingests
    info = K.wait_caught_up(tallyd, produced)
    ingest_s = time.monotonic() - t
    c = K.ctx(tallyd, cfg, path, model, c0.asof, users, pins, produced,
              int(time.time() * 1000), c0.tmp)
    c.t0, c.info, c.per_part, c.topic, c.port = c0.t0, info, per_part, topic, port
    print(f"# broker {bootstrap}, topic {topic}: {produced} messages produced in "
          f"{produce_s:.1f} s ({sorted(per_part.items())}); tallyd caught up in "
          f"{ingest_s:.1f} s; {len(model.ids['user'])} users and {len(model.ids['pin'])} "
          f"pins with kept events; ASOF={c.asof} (ingest done {c.asof - c.ingested_ms} ms "
          f"before it)", flush=True)
    return c


def t_ingest(c):
    K.check_ingest(c, c.info, c.kafka.produced, c.per_part, c.topic,
                   E.BAD_JSON + E.MISSING_TIME)


def t_pipelined(c):
    """The default two apply threads pipeline a backlog: the poll thread
    decodes each batch of 64 or more messages and the apply thread applies
    it while the next is polled (the values checked below came that way)."""
    n = int(c.info.get("batches_pipelined", -1))
    if n <= 0:
        raise AssertionError(f"INFO batches_pipelined {n}, want > 0 for a backlog of "
                             f"{c.kafka.produced} messages with kafka.threads 2")


def t_info(c):
    E.TOPIC, E.PARTITIONS = c.topic, PARTITIONS
    E.t_info(c)


def main():
    suite = H.Suite("kafka_exact")
    try:
        c = setup()
    except Exception as e:
        suite.fail_setup("kafka_exact_setup_produces_and_tallyd_catches_up", e)
        return suite.finish()
    suite.run("single_instance_consumes_every_message_once", t_ingest, c)
    suite.run("info_partitions_at_end_with_real_high_watermarks", t_info, c)
    suite.run("backlog_batches_pipelined_by_default", t_pipelined, c)
    K.run_truth_checks(suite, c)
    c.cli.close()
    alive = c.tallyd.proc.poll() is None
    rc = c.tallyd.close()
    if not alive or rc != 0:
        suite.fail_setup("tallyd_stays_up_and_exits_0_on_sigterm",
                         f"tallyd {'died during the run' if not alive else 'exited'} with {rc}:\n"
                         + c.tallyd.log_tail())
    return H.finish(suite, c.tmp)


if __name__ == "__main__":
    sys.exit(main())
