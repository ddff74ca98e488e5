#!/usr/bin/env python3
"""kafka.start: window starts a partition at the first event any window can
still count, which the window rule puts up to one hop before now minus the
window.

A window of W with hop h counts, at now, the events from
floor(now / h) * h - W on (README "Windows"). One feature, clicks over 10m
with a 5m hop, on a real broker (scripts/kafka.sh), a topic of 1 partition,
events produced in time order with their times as Kafka timestamps
(S = floor(now / 5m) * 5m - 10m at produce time):
  - 3 clicks of user 1 at S - 1 s: outside the window, never read;
  - 4 clicks at S + 1 s: inside it, though older than now - 10m;
  - 2 clicks at now - 60 s.
A fresh tallyd with kafka.start: window reads the 6 that count and no
other: messages_consumed is 6 and clicks:10m ASOF the produce time is 6.
The test starts 30 s to 210 s into a 5-minute period (it waits for one when
it is not), so that S + 1 s is more than 30 s before now - 10m and S stays
the window's start until the end.

Run: build/venv/bin/python tests/integration/kafka_window_start.py (a broker
from TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402

HOP = 300_000
WINDOW = 600_000
FEATURES = [{"name": "clicks", "entity": "user", "key": "user_id", "where": {"action": "click"},
             "agg": "count", "windows": ["10m"], "hop": "5m"}]


def click(ts):
    return json.dumps({"user_id": 1, "pin_id": 9, "action": "click", "dwell_ms": 10, "ts": ts})


def wait_for_period_middle():
    """Returns now (ms) once it is 30 s to 210 s into a 5-minute period."""
    while True:
        now = int(time.time() * 1000)
        into = now % HOP
        if 30_000 <= into <= 210_000:
            return now
        # a wall-clock precondition, not a race: the period's middle comes
        # within 90 s
        time.sleep(min(1.0, ((30_000 - into) % HOP) / 1000 + 0.01))


def setup():
    r = K.new_run("winstart", 0, partitions=1)
    r.now = wait_for_period_middle()
    r.start = r.now // HOP * HOP - WINDOW
    recs = ([("1", click(r.start - 1000), r.start - 1000)] * 3
            + [("1", click(r.start + 1000), r.start + 1000)] * 4
            + [("1", click(r.now - 60_000), r.now - 60_000)] * 2)
    K.produce(r.bootstrap, r.topic, recs)
    port = H.free_port()
    r.path, r.cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "window",
                                   FEATURES)
    r.tallyd = K.Tallyd(r.path, port, r.tmp)
    c = r.tallyd.client()
    end = H.deadline(60)
    try:
        while True:  # until the partition is at its end
            info = c.info()
            lags = [v for k, v in info.items() if k.startswith("partition_")]
            if info.get("lag") == "0" and len(lags) == 1 and lags[0].endswith("lag=0"):
                break
            if time.monotonic() > end:
                raise RuntimeError(f"tallyd did not reach the partition's end: {lags}\n"
                                   + r.tallyd.log_tail())
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
        r.info = info
        r.clicks = c.cmd("FEATURES", "user", "1", "clicks:10m", "ASOF", str(r.now))
    finally:
        c.close()
    return r


def t_read_what_counts(r):
    got = {k: r.info.get(k) for k in ("messages_consumed", "events_applied")}
    want = {"messages_consumed": "6", "events_applied": "6"}
    if got != want:
        raise H.Failure(f"INFO {got}, want {want}: the 3 events before the window's start "
                        f"(S = {r.start}) unread, the 6 from it on read")


def t_counts(r):
    if not H.same(r.clicks, [b"clicks:10m", 6]):
        raise H.Failure(f"FEATURES user 1 clicks:10m ASOF {r.now}: {r.clicks!r}, want 6")


def main():
    suite = H.Suite("kafka_window_start")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("window_start_setup_reaches_the_end", e)
        return suite.finish()
    suite.run("window_start_reads_from_the_window_rules_start_and_not_before", t_read_what_counts,
              r)
    suite.run("window_start_counts_the_events_a_hop_before_now_minus_the_window", t_counts, r)
    r.tallyd.close()
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
