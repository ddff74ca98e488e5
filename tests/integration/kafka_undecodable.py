#!/usr/bin/env python3
"""A message batch that librdkafka cannot decode must not stop its partition.

librdkafka 2.0.2 decompresses a batch into at most receive.message.max.bytes;
a batch that would decompress to more fails with "Invalid compressed data",
and the consumer fetches that same batch again and again, never past it.
tallyd skips such a batch one offset at a time (INFO messages_undecodable)
and goes on. Once a second fetch of the same offset failed alike, it finds
where such a batch ends by probing: seeks that double their distance until
one lands past it, then halve the gap. On
a real broker (scripts/kafka.sh), a topic of 2 partitions, tallyd with
receive.message.max.bytes 1,100,000:
  partition 0: offset 0 a click of user 1, 1 a 4 MB record alone in its
               zstd batch, 2 a click of user 1, 3..42 forty 30 KB records in
               one zstd batch (1.2 MB together, each under the limit), 43 a
               click of user 1;
  partition 1: three clicks of user 2, then five 300 KB records in one
               batch (offsets 3..7), the partition's last.
The records of the three large batches are skipped, nothing else: user 1
counts 3 clicks, user 2 3, messages_undecodable is 46, both partitions end
at lag 0, the log names the skipped ranges 1..1, 3..42 and 3..7, tallyd
kept answering meanwhile, and after a graceful stop the group's committed
offsets are the partitions' ends (44 and 8).

A second topic skips such a batch while the consumer is behind and fetches
come 5 ms apart, so that librdkafka hands tallyd many messages at once and,
after a seek of the probing, those in hand can still hold the partition's
earlier fetches (the same batch failing again), which the seek outdated:
tallyd must drop them, as librdkafka drops the outdated messages it still
holds (taken as answers to the probe, they skip or double count clicks).
4 partitions, tallyd started once all is produced:
  partition 0: offset 0 a 4 MB record alone in its zstd batch, then
               BUSY_TAIL clicks of user 3 (offsets 1..BUSY_TAIL);
  partitions 1..3: BUSY_CLICKS clicks each, of users 1000p .. 1000p+249 in
               turn, lz4 batches.
Every click is applied exactly once (user 3 counts BUSY_TAIL, each other
user BUSY_CLICKS / 250), messages_undecodable is 1.

Run: build/venv/bin/python tests/integration/kafka_undecodable.py (a broker
from TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402

FEATURES = [{"name": "clicks", "entity": "user", "key": "user_id", "where": {"action": "click"},
             "agg": "count", "windows": ["1h"]}]
PROPERTIES = {"fetch.max.bytes": "1048576", "receive.message.max.bytes": "1100000"}
BIG = 4_000_000  # alone: decompresses past receive.message.max.bytes
SMALL = 30_000   # forty in one batch: 1.2 MB together, each under the limit
TAIL = 300_000   # five in one batch, the last of partition 1
BUSY_TAIL = 3000       # clicks after the big record of the busy topic's partition 0
BUSY_CLICKS = 200_000  # clicks in each of its partitions 1..3
BUSY_USERS = 250       # users per partition 1..3


def click(user, ts):
    return json.dumps({"user_id": user, "pin_id": 9, "action": "click", "dwell_ms": 10,
                       "ts": ts}).encode()


def zstd_producer(bootstrap):
    """A producer whose batch is what one flush sends (or 5 s of a stall),
    zstd-compressed, records up to 20 MB."""
    return K.Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "compression.type": "zstd",
        "message.max.bytes": 20_000_000,
        "batch.size": 20_000_000,
        "linger.ms": 5000,
        "log_level": 3,
    })


def produce(r):
    """Produces the module comment's layout; returns the offsets the broker
    gave each partition's records, in order."""
    prod = zstd_producer(r.bootstrap)
    offsets, errors = {0: [], 1: []}, []

    def report(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            offsets[msg.partition()].append(msg.offset())

    def send(partition, value, flush=True):
        prod.produce(r.topic, value=value, partition=partition, on_delivery=report)
        if flush and prod.flush(60 * H.MULT):
            errors.append("flush timed out")

    ts = r.t0 - 60_000
    send(0, click(1, ts))
    send(0, b"[" * BIG)
    send(0, click(1, ts + 1))
    for i in range(40):  # one batch: one flush for all
        send(0, b"[" * SMALL, flush=i == 39)
    send(0, click(1, ts + 2))
    for i in range(3):
        send(1, click(2, ts + i))
    for i in range(5):
        send(1, b"[" * TAIL, flush=i == 4)
    if errors:
        raise RuntimeError(f"producing: {errors[:3]}")
    return offsets


def setup():
    r = K.new_run("undecodable", 0, partitions=2)
    r.offsets = produce(r)
    port = H.free_port()
    r.path, r.cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "earliest",
                                   FEATURES, properties=PROPERTIES)
    r.tallyd = K.Tallyd(r.path, port, r.tmp)
    r.pongs = 0  # PINGs answered while a batch was being skipped
    started = time.monotonic()
    c = r.tallyd.client()
    end = H.deadline(60)
    try:
        while True:  # until the 6 decodable messages are in and every lag is 0
            skipping = ("cannot decode" in r.tallyd.log_path.read_text(errors="replace")
                        and c.info().get("lag") != "0")
            if c.cmd("PING") == "PONG" and skipping:
                r.pongs += 1
            info = c.info()
            lags = [v for k, v in info.items() if k.startswith("partition_")]
            if (int(info.get("events_applied", "0")) >= 6 and info.get("lag") == "0"
                    and len(lags) == 2 and all(v.endswith("lag=0") for v in lags)):
                break
            if time.monotonic() > end:
                raise RuntimeError("tallyd did not get past the undecodable batches: "
                                   + ", ".join(f"{k}={v}" for k, v in info.items()
                                               if k.startswith(("partition_", "messages_",
                                                                "events_", "lag")))
                                   + "\n" + r.tallyd.log_tail())
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
        r.info = info
        print(f"# past the undecodable batches in {time.monotonic() - started:.2f} s", flush=True)
    finally:
        c.close()
    return r


def t_layout(r):
    # the test means what it says only if the broker laid the records out so
    want = {0: list(range(44)), 1: list(range(8))}
    if r.offsets != want:
        raise H.Failure(f"the records got offsets {r.offsets}, want {want}")


def t_values(r):
    c = r.tallyd.client()
    try:
        got = {u: c.cmd("FEATURES", "user", str(u), "clicks:1h") for u in (1, 2)}
    finally:
        c.close()
    want = {1: [b"clicks:1h", 3], 2: [b"clicks:1h", 3]}
    if any(not H.same(got[u], want[u]) for u in want):
        raise H.Failure(f"FEATURES: got {got}, want {want}")


def t_counted(r):
    info = r.info
    want = {"messages_undecodable": "46", "messages_consumed": "6", "events_applied": "6",
            "events_rejected": "0"}
    got = {k: info.get(k) for k in want}
    if got != want:
        raise H.Failure(f"INFO: {got}, want {want}")
    if r.pongs < 1:
        raise H.Failure("no PING was answered while tallyd skipped a batch")


def t_logged(r):
    log = r.tallyd.log_path.read_text(errors="replace")
    for line in log.splitlines():
        if "skipped offsets" in line:
            print("# " + line.split(" source: ", 1)[-1], flush=True)
    for part, rng in ((0, "1..1"), (0, "3..42"), (1, "3..7")):
        want = f"{r.topic}[{part}]: skipped offsets {rng} of the batch that could not be decoded"
        if want not in log:
            raise H.Failure(f"the log lacks {want!r}:\n" + r.tallyd.log_tail())


def t_committed(r):
    rc = r.tallyd.close()
    r.tallyd = None
    if rc != 0:
        raise H.Failure(f"tallyd exited with {rc} on SIGTERM")
    got = K.committed(r.bootstrap, r.cfg["kafka"]["group"], [(r.topic, 0), (r.topic, 1)])
    want = {(r.topic, 0): 44, (r.topic, 1): 8}
    if got != want:
        raise H.Failure(f"committed offsets {got}, want {want}")


def produce_busy(r):
    """Produces the busy topic's layout (module comment)."""
    errors = []

    def report(err, msg):
        if err is not None:
            errors.append(str(err))

    big = zstd_producer(r.bootstrap)
    big.produce(r.topic, value=b"[" * BIG, partition=0, on_delivery=report)
    if big.flush(60 * H.MULT):
        errors.append("flush timed out")
    bulk = K.Producer({"bootstrap.servers": r.bootstrap, "enable.idempotence": True,
                       "compression.type": "lz4", "linger.ms": 20,
                       "queue.buffering.max.messages": 200_000, "log_level": 3})
    ts = r.t0 - 60_000
    records = [(None, click(3, ts + i % 1000), ts + i % 1000, 0) for i in range(BUSY_TAIL)]
    records += [(None, click(1000 * p + i % BUSY_USERS, ts + i % 1000), ts + i % 1000, p)
                for p in (1, 2, 3) for i in range(BUSY_CLICKS)]
    K.send(bulk, r.topic, records, report)
    if bulk.flush(120 * H.MULT):
        errors.append("flush timed out")
    if errors:
        raise RuntimeError(f"producing: {errors[:3]}")


def setup_busy():
    r = K.new_run("undecodable-busy", 0, partitions=4)
    started = time.monotonic()
    produce_busy(r)
    print(f"# busy topic produced in {time.monotonic() - started:.2f} s", flush=True)
    port = H.free_port()
    # probes answered while most clicks are still to come, not 500 ms apart
    props = dict(PROPERTIES, **{"fetch.error.backoff.ms": "5", "fetch.wait.max.ms": "5"})
    r.path, r.cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "earliest",
                                   FEATURES, properties=props)
    r.tallyd = K.Tallyd(r.path, port, r.tmp)
    r.info = K.wait_caught_up(r.tallyd, BUSY_TAIL + 3 * BUSY_CLICKS)
    return r


def t_busy_values(r):
    c = r.tallyd.client()
    try:
        want = {3: BUSY_TAIL}
        for p in (1, 2, 3):
            for u in range(BUSY_USERS):
                want[1000 * p + u] = BUSY_CLICKS // BUSY_USERS
        bad = {}
        for u, n in want.items():
            got = c.cmd("FEATURES", "user", str(u), "clicks:1h")
            if not H.same(got, [b"clicks:1h", n]):
                bad[u] = (got, n)
    finally:
        c.close()
    if bad:
        raise H.Failure(f"{len(bad)} of {len(want)} users wrong (got, want): "
                        f"{dict(list(bad.items())[:5])}")


def t_busy_counted(r):
    info = r.info
    want = {"messages_undecodable": "1", "events_applied": str(BUSY_TAIL + 3 * BUSY_CLICKS),
            "events_rejected": "0", "lag": "0"}
    got = {k: info.get(k) for k in want}
    if got != want:
        raise H.Failure(f"INFO: {got}, want {want}")


def main():
    suite = H.Suite("kafka_undecodable")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("undecodable_setup_consumes_past_undecodable_batches", e)
        return suite.finish()
    suite.run("undecodable_records_got_the_offsets_the_test_lays_out", t_layout, r)
    suite.run("undecodable_batches_skipped_and_every_other_event_applied", t_values, r)
    suite.run("undecodable_offsets_counted_and_tallyd_served_meanwhile", t_counted, r)
    suite.run("undecodable_ranges_logged_batch_by_batch", t_logged, r)
    suite.run("undecodable_offsets_committed_past_at_stop", t_committed, r)
    if r.tallyd is not None:
        r.tallyd.close()
    try:
        b = setup_busy()
    except Exception as e:
        suite.fail_setup("undecodable_busy_setup_consumes_past_the_batch", e)
        return H.finish(suite, r.tmp)
    suite.run("undecodable_busy_every_click_applied_once", t_busy_values, b)
    suite.run("undecodable_busy_offsets_counted", t_busy_counted, b)
    b.tallyd.close()
    if suite.failed:
        print(f"# the busy topic's logs and config kept in {b.tmp}", flush=True)
    else:
        shutil.rmtree(b.tmp, ignore_errors=True)
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
