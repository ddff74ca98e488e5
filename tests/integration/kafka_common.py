"""Shared machinery of the real-broker tests (tests/integration/kafka_*.py):
an Apache Kafka broker from scripts/kafka.sh, topics created and events
produced with confluent_kafka (Debian's python3-confluent-kafka, librdkafka
underneath), and tallyd configurations pointing at the broker.

The broker: when TLY_KAFKA_BOOTSTRAP is set (scripts/run-tests.sh starts one
broker for the whole phase and stops it at the end), it is used as is;
otherwise the first test that needs one runs `scripts/kafka.sh start` with
its own directory (build/kafka-itest) and stops it when the test exits, on
every exit path the harness covers. Every test creates its own topics (a
per-run suffix), so tests sharing a broker never see each other's events.

Events are produced keyed by user id with the Java client's partitioner
(murmur2_random), idempotence on, and each message's Kafka timestamp set
explicitly to the event's time, so seeking by time is deterministic.
"""

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import yaml  # noqa: E402

try:
    from confluent_kafka import Producer, TopicPartition, Consumer
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
except ImportError as e:  # reported by the test as a setup failure
    Producer = None
    IMPORT_ERROR = e
else:
    IMPORT_ERROR = None

KAFKA_SH = H.REPO / "scripts" / "kafka.sh"
RUN_ID = f"{os.getpid()}-{int(time.time())}"

_own_broker = []


def _stop_own_broker():
    for d in _own_broker:
        subprocess.run(["bash", str(KAFKA_SH), "stop", "--dir", d],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120 * H.MULT)
    _own_broker.clear()


def broker():
    """host:port of the broker the tests use (see the module comment).
    Raises RuntimeError saying why when none can be had."""
    if IMPORT_ERROR is not None:
        raise RuntimeError(f"confluent_kafka is not importable ({IMPORT_ERROR}): "
                           f"install python3-confluent-kafka (make deps)")
    bs = os.environ.get("TLY_KAFKA_BOOTSTRAP")
    if bs:
        return bs
    d = str(H.BUILD / "kafka-itest")
    p = subprocess.run(["bash", str(KAFKA_SH), "start", "--dir", d], capture_output=True,
                       text=True, timeout=600 * H.MULT)
    if p.returncode != 0 or not p.stdout.startswith("KAFKA "):
        raise RuntimeError(f"scripts/kafka.sh start failed (exit {p.returncode}):\n"
                           f"{p.stdout}{p.stderr}")
    if d not in _own_broker:
        _own_broker.append(d)
        atexit.register(_stop_own_broker)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, _on_signal)
    return p.stdout.split()[1]


def _on_signal(sig, frame):
    # harness's handler ends with os._exit, which skips atexit: stop the
    # broker first.
    try:
        _stop_own_broker()
    finally:
        H._on_signal(sig, frame)


def topic_name(base):
    return f"{base}-{RUN_ID}"


def create_topic(bootstrap, topic, partitions=8):
    """Creates topic (replication 1, no retention limit: the tests produce
    events weeks old) and waits until every partition has a leader."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1,
                                        config={"retention.ms": "-1"})],
                              request_timeout=30 * H.MULT)
    fut[topic].result(timeout=60 * H.MULT)
    end = H.deadline(60)
    while True:
        md = admin.list_topics(topic=topic, timeout=10 * H.MULT)
        t = md.topics.get(topic)
        if (t is not None and t.error is None and len(t.partitions) == partitions
                and all(p.leader >= 0 for p in t.partitions.values())):
            return
        if time.monotonic() > end:
            raise RuntimeError(f"topic {topic} has no leader for every partition: {t}")
        time.sleep(0.1)  # poll interval of a deadline-bounded wait


class Run:
    """What a test's setup gathers (see new_run)."""


def new_run(name, lead_ms, partitions=8):
    """A Run for test `name` with t0 (now, ms), asof (t0 + lead_ms, to the
    second), tmp (a new temporary directory), bootstrap (the broker) and a
    new topic of `partitions` partitions, after checking that tallyd is
    built."""
    H.check_binaries(H.TALLYD)
    r = Run()
    r.t0 = int(time.time() * 1000)
    r.asof = (r.t0 + lead_ms) // 1000 * 1000
    r.tmp = H.make_tmpdir(f"tly-kafka-{name}-")
    r.bootstrap = broker()
    r.topic = topic_name(f"tly-{name}")
    create_topic(r.bootstrap, r.topic, partitions)
    return r


def send(prod, topic, records, report):
    """Hands records, a list of (key, payload, timestamp_ms) or (key,
    payload, timestamp_ms, partition), to producer prod in order, serving
    delivery reports (to report) while its local queue is full. Without a
    partition, prod's partitioner picks one."""
    for key, payload, ts, *part in records:
        where = {"partition": part[0]} if part else {}
        while True:
            try:
                prod.produce(topic, value=payload, key=key, timestamp=ts, on_delivery=report,
                             **where)
                break
            except BufferError:
                prod.poll(0.05)  # the local queue is full: serve delivery reports
        prod.poll(0)


def produce(bootstrap, topic, records, on_delivered=None, batch=10000):
    """Produces records, a list of (key, payload, timestamp_ms), in order,
    in batches of at most `batch` messages.
    Returns the number of messages per partition (from the delivery
    reports); on_delivered(msg), when given, sees every delivered message.
    Raises RuntimeError when any message fails."""
    prod = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "partitioner": "murmur2_random",
        "linger.ms": 20,
        "batch.num.messages": batch,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200000,
        "log_level": 3,  # errors only: retries while the broker warms up are normal
    })
    errors = []
    per_part = {}

    def report(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            per_part[msg.partition()] = per_part.get(msg.partition(), 0) + 1
            if on_delivered is not None:
                on_delivered(msg)

    send(prod, topic, records, report)
    left = prod.flush(120 * H.MULT)
    if left or errors:
        raise RuntimeError(f"producing to {topic}: {left} message(s) undelivered, "
                           f"{len(errors)} failed (first: {errors[:3]})")
    return per_part


def produce_transactions(bootstrap, topic, txns):
    """Produces txns, a list of (records, commit) with records as produce()
    takes them, each as one transaction of one transactional producer (keyed
    and partitioned as produce() does), committed or aborted as `commit`
    says. An aborted transaction's records are flushed to the broker before
    the abort, so they and their abort marker occupy offsets in the log as
    the committed ones and their commit markers do.
    Returns the committed messages per partition (from the delivery
    reports). Raises RuntimeError when any message fails."""
    prod = Producer({
        "bootstrap.servers": bootstrap,
        "transactional.id": f"tly-txn-{RUN_ID}-{topic}",
        "partitioner": "murmur2_random",
        "linger.ms": 20,
        "log_level": 3,
    })
    timeout = 60 * H.MULT
    prod.init_transactions(timeout)
    per_part, errors = {}, []
    for records, commit in txns:
        got = {}

        def report(err, msg, got=got):
            if err is not None:
                errors.append(str(err))
            else:
                got[msg.partition()] = got.get(msg.partition(), 0) + 1

        prod.begin_transaction()
        send(prod, topic, records, report)
        left = prod.flush(timeout)
        if left or errors:
            raise RuntimeError(f"producing to {topic} in a transaction: {left} message(s) "
                               f"undelivered, {len(errors)} failed (first: {errors[:3]})")
        if commit:
            prod.commit_transaction(timeout)
            for p, n in got.items():
                per_part[p] = per_part.get(p, 0) + n
        else:
            prod.abort_transaction(timeout)
    return per_part


def end_offsets(bootstrap, topic, partitions=8):
    """{partition: high watermark} as the broker reports it."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tly-probe-{RUN_ID}",
                  "enable.auto.commit": False})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10 * H.MULT)[1]
                for p in range(partitions)}
    finally:
        c.close()


def committed(bootstrap, group, keys):
    """{(topic, partition): offset} the consumer group has committed for keys,
    an iterable of (topic, partition); a negative offset: none."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                     "enable.auto.commit": False, "log_level": 3})
    try:
        got = cons.committed([TopicPartition(t, p) for t, p in keys], timeout=10 * H.MULT)
        return {(tp.topic, tp.partition): tp.offset for tp in got}
    finally:
        cons.close()


def snapshot_files(d):
    """[(ms, name)] of the snapshot files in directory d, newest first."""
    out = []
    for n in os.listdir(d) if os.path.isdir(d) else []:
        if n.startswith("snapshot-") and n.endswith(".tly"):
            out.append((int(n[len("snapshot-"):-len(".tly")]), n))
    return sorted(out, reverse=True)


def tallyd_knows(key):
    """Whether this tallyd build has config key `key` (tallyd --help-config)."""
    p = subprocess.run([str(H.TALLYD), "--help-config"], capture_output=True, text=True,
                       timeout=30 * H.MULT)
    return any(line.split(" ", 1)[0] == key for line in p.stdout.splitlines())


def write_config(tmpdir, bootstrap, port, topic, mode, start, features, name="tallyd",
                 group=None, properties=None):
    """config/demo.yaml's events with the given features, pointing at the
    broker (kafka.mode, kafka.start as given; a fresh group id unless given;
    kafka.properties when given).
    Where tallyd has kafka.ready_lag, it is 0: queries answer -LOADING
    until every message that existed at assignment is applied. Returns
    (path, config dict)."""
    path, cfg = H.write_config(tmpdir, bootstrap, port, topic, features=features)
    cfg["kafka"]["mode"] = mode
    cfg["kafka"]["start"] = start
    cfg["kafka"]["group"] = group or f"tly-{name}-{RUN_ID}-{port}"
    if tallyd_knows("kafka.ready_lag"):
        cfg["kafka"]["ready_lag"] = 0
    if properties:
        cfg["kafka"]["properties"] = properties
    path = Path(tmpdir) / f"{name}.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, cfg


class Tallyd(H.Tallyd):
    """harness.Tallyd with its own log file name (several run at once)."""

    def __init__(self, config_path, port, tmpdir, name="tallyd"):
        self.port = port
        self.ping_ok = ("PONG",)
        self.log_path = Path(tmpdir) / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = H.spawn([H.TALLYD, "--config", config_path], stdout=self.log,
                            stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self._wait_serving()


# ------------------------------------------------------------ ground truth

import e2e as E  # noqa: E402  (the model, the stream and the checks of e2e.py)

FEATURES = H.demo_config()["features"] + E.EXTRA_FEATURES


class Produced:
    """What the checks of e2e.py read as c.kafka."""

    def __init__(self, produced):
        self.produced = produced


def records(events, lines, default_ts):
    """(key, payload, Kafka timestamp) per line of e2e.generate(): the
    timestamp is the event's time; a malformed event (None) takes its
    predecessor's, or default_ts at the start."""
    out, last = [], default_ts
    for ev, line in zip(events, lines):
        key, payload = line.split("\t", 1)
        if ev is not None:
            last = ev["ts"]
        out.append((key, payload, last))
    return out


def ctx(tallyd, cfg, config_path, model, asof, users, pins, produced, ingested_ms, tmp):
    """A context as e2e.py's checks take it (c.tallyd, c.model, c.asof ...)."""
    c = E.Ctx()
    c.tallyd, c.cfg, c.config_path, c.model = tallyd, cfg, config_path, model
    c.asof, c.ingested_ms, c.tmp = asof, ingested_ms, tmp
    c.users = users + E.UNKNOWN_USERS
    c.pins = pins + E.UNKNOWN_PINS
    c.kafka = Produced(produced)
    c.cli = tallyd.client()
    return c


def truth_checks(prefix):
    """e2e.py's checks of values against the ground truth, by name."""
    return [
        (f"{prefix}features_every_user_resp2_matches_ground_truth", E.t_features_all, "user", 2),
        (f"{prefix}features_every_pin_resp2_matches_ground_truth", E.t_features_all, "pin", 2),
        (f"{prefix}features_every_user_resp3_matches_ground_truth", E.t_features_all, "user", 3),
        (f"{prefix}mfeatures_every_pin_matches_ground_truth", E.t_mfeatures),
        (f"{prefix}recent_every_user_matches_ground_truth", E.t_recent_all),
        (f"{prefix}recent_options_sample_match_ground_truth", E.t_recent_options),
        (f"{prefix}features_named_subsets_match_ground_truth", E.t_named),
        (f"{prefix}features_meta_has_last_event_watermark_and_zero_lag", E.t_meta),
    ]


def run_truth_checks(suite, c, prefix=""):
    for name, fn, *args in truth_checks(prefix):
        if c.tallyd.proc.poll() is not None:
            suite.fail_setup(name, f"tallyd exited with {c.tallyd.proc.returncode}:\n"
                             + c.tallyd.log_tail())
            continue
        if fn is E.t_features_all:
            ids = c.users if args[0] == "user" else c.pins
            suite.run(name, fn, c, args[0], ids, args[1])
        else:
            suite.run(name, fn, c, *args)


def close_ctxs(suite, ctxs):
    """Closes each (name, ctx)'s client and stops its tallyd; a tallyd that
    died during the run or did not exit 0 on SIGTERM fails the suite."""
    for name, c in ctxs:
        try:
            c.cli.close()
        except OSError:  # a client whose tallyd was killed
            pass
        alive = c.tallyd.proc.poll() is None
        rc = c.tallyd.close()
        if not alive or rc != 0:
            suite.fail_setup(f"tallyd_{name}_stays_up_and_exits_0_on_sigterm",
                             f"tallyd {name} {'died during the run' if not alive else 'exited'} "
                             f"with {rc}:\n" + c.tallyd.log_tail())


def check_ingest(c, info, produced, per_part, topic, bad):
    """INFO after catch-up: every message consumed once, the malformed ones
    rejected, every partition at its end with lag 0 and its high watermark
    the number of messages produced into it."""
    m = H.Mismatches()
    m.eq(int(info.get("messages_consumed", -1)), produced, "INFO messages_consumed")
    m.eq(int(info.get("events_rejected", -1)), bad, "INFO events_rejected")
    m.eq(int(info.get("events_applied", -1)), produced - bad, "INFO events_applied")
    m.eq(info.get("partitions"), str(len(per_part)), "INFO partitions")
    m.eq(info.get("watermark_ms"), str(c.model.watermark), "INFO watermark_ms")
    m.eq(info.get("consumer_errors"), "0", "INFO consumer_errors")
    for p, n in sorted(per_part.items()):
        v = info.get(f"partition_{topic}_{p}")
        parts = dict(x.split("=", 1) for x in v.split(",")) if v else {}
        m.eq(parts, {"position": str(n), "high": str(n), "lag": "0"},
             f"INFO partition_{topic}_{p}")
    m.check(c.ingested_ms < c.asof,
            f"ingest finished at {c.ingested_ms}, after ASOF {c.asof} (machine too slow? the "
            f"ground truth at ASOF then no longer applies)")
    m.done()


def wait_caught_up(tallyd, want_consumed, seconds=120):
    """Polls INFO until want_consumed messages are consumed and applied or
    rejected and every partition's lag is 0 (positions are published
    periodically). Returns the INFO dict."""
    info = tallyd.wait_ingested(want_consumed, seconds=seconds)
    c = tallyd.client()
    end = H.deadline(30)
    try:
        while True:
            info = c.info()
            lags = [v for k, v in info.items() if k.startswith("partition_")]
            if info.get("lag") == "0" and lags and all(v.endswith("lag=0") for v in lags):
                return info
            if time.monotonic() > end:
                return info  # the checks say what is wrong
            time.sleep(0.1)  # poll interval of a deadline-bounded wait
    finally:
        c.close()
