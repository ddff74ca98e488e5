#!/usr/bin/env python3
"""tallyd's bootstrap by time against a real Apache Kafka broker
(scripts/kafka.sh): with kafka.start window, a fresh process must start each
partition at the first offset whose timestamp is at or after S(now), the
oldest event time a feature still counts (rd_kafka_offsets_for_times, which
a real broker answers from its time index), so it reads exactly the events
that can still matter and none older. By the window rule S(T) is the least,
over every window (W, hop h), of floor(T / h) * h - W, and for last/last_k
T - horizon (seek_at below).

The topic holds seeded events (e2e.py's stream) whose times are moved so
that they cover the last 10 days except for a gap around the seek point:
some are older than 8 days, some between 8 days and S(T0) - 60 s, the rest
in [S(T0 + 15 min), ASOF). They are produced in time order (each
partition's timestamps non-decreasing) with each message's Kafka timestamp
set to its event time. tallyd is assigned its partitions at some wall time T
in [T0, T0 + 15 min) (asserted), so its seek point S(T) falls in the gap
and the messages it must consume are exactly those with timestamp >=
S(T0 + 15 min): INFO messages_consumed must equal that count (not one more
once every partition is at its end), and every value of every user and pin
must equal the ground truth of those events.

Where tallyd reports `loading` in INFO (the Source section), queries made
while it loads must answer -LOADING and queries after it has caught up
normal values: the test issues INFO / FEATURES / INFO in one pipeline
repeatedly from start-up until caught up and judges each FEATURES reply by
the loading state on both sides of it. With kafka.ready_lag 0 (set where
tallyd has it), the first normal answer must already be the ground truth.

Run: build/venv/bin/python tests/integration/kafka_bootstrap.py (a broker
from TLY_KAFKA_BOOTSTRAP, else one started for this run; see
kafka_common.py).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
from harness import Failure, Mismatches, RespError  # noqa: E402
from kafka_common import E  # noqa: E402

NEVENTS = 120_000
PARTITIONS = 8
LEAD_MS = 240_000
GAP_BEFORE_MS = 60_000      # no event in [S(T0) - this, S(T0 + GAP_AFTER_MS))
GAP_AFTER_MS = 15 * E.MIN   # bound on (assignment wall time - T0)
OLDEST_MS = 10 * E.DAY      # the oldest events are this old at T0


def remap(ts, lo, hi, lo2, hi2):
    """ts in [lo, hi] moved linearly to [lo2, hi2]: monotone, so order and
    ties (equal times) are kept."""
    return lo2 + (ts - lo) * (hi2 - lo2) // (hi - lo)


def seek_at(feats, t):
    """S(t): the oldest event time any of feats (e2e.Feat) still counts at t,
    by the window rule (README "Windows"); t - horizon for last/last_k."""
    return min(t - f.horizon if f.itemized else min(t // h * h - w for _, w, h in f.windows)
               for f in feats)


def stream(r, horizon):
    """e2e.py's stream with its times moved around the seek point and sorted.
    Returns (events, records): events in produce order (None for the
    malformed ones), records (key, payload, Kafka timestamp) likewise."""
    events, lines, r.users, r.pins = E.generate(r.asof, nevents=NEVENTS, seed=E.SEED + 303)
    lo, hi = r.asof - 8 * E.DAY, r.asof
    cut = r.asof - horizon - 30 * E.MIN  # ~1/8 of the 8-day events fall before it
    rows, last = [], r.asof - E.HOUR
    for i, (ev, line) in enumerate(zip(events, lines)):
        key, payload = line.split("\t", 1)
        if ev is not None:
            ts = ev["ts"]
            if ts < cut:
                ts = remap(ts, lo, cut, r.t0 - OLDEST_MS, r.seek_first - GAP_BEFORE_MS - 1)
            else:
                ts = remap(ts, cut, hi, r.seek_lo, hi)
            ev = dict(ev, ts=ts)
            payload = json.dumps(ev, separators=(",", ":"))
            last = ts
        rows.append((last, i, ev, key, payload))
    rows.sort(key=lambda x: (x[0], x[1]))  # time order; ties keep their arrival order
    return [x[2] for x in rows], [(x[3], x[4], x[0]) for x in rows]


def observe_loading(r):
    """From start-up until caught up: INFO, FEATURES, INFO in one pipeline,
    repeatedly. Returns [(loading before, reply, loading after, INFO after)]."""
    cli = r.tallyd.client()
    obs = []
    user = r.users[0]
    end = H.deadline(120)
    try:
        while time.monotonic() < end:
            a, reply, b = cli.pipeline([("INFO",), ("FEATURES", "user", user, "ASOF", r.asof),
                                        ("INFO",)])
            ia = H.parse_info(a.decode()) if isinstance(a, bytes) else {}
            ib = H.parse_info(b.decode()) if isinstance(b, bytes) else {}
            obs.append((ia.get("loading"), reply, ib.get("loading"), ib))
            consumed = int(ib.get("messages_consumed", "0"))
            done = int(ib.get("events_applied", "0")) + int(ib.get("events_rejected", "0"))
            # stop after a whole observation past catch-up (both INFOs say
            # loading:0), not at the one that straddles the transition
            if (ia.get("loading") in (None, "0") and ib.get("loading") in (None, "0")
                    and consumed >= r.expected and done >= r.expected):
                break
            if r.tallyd.proc.poll() is not None:
                break
            time.sleep(0.01)  # poll interval of a deadline-bounded wait
    finally:
        cli.close()
    return obs


def setup():
    r = K.new_run("bootstrap", LEAD_MS, PARTITIONS)
    port = H.free_port()
    path, cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "window", K.FEATURES)
    r.cfg, r.path, r.port = cfg, path, port
    # tallyd's seek horizon: the longest window, or store.idle_ttl for
    # last/last_k, over every feature (DESIGN.md §3, feature.h).
    ttl = H.duration_ms(cfg.get("store", {}).get("idle_ttl", "7d"))
    feats = [E.Feat(d, ttl) for d in cfg["features"]]
    r.horizon = max(f.horizon for f in feats)
    r.seek_first = seek_at(feats, r.t0)  # the seek point at T0 ...
    r.seek_lo = seek_at(feats, r.t0 + GAP_AFTER_MS)  # ... and at T0 + 15 min: read from here
    events, recs = stream(r, r.horizon)
    r.produced = len(recs)
    r.per_part = K.produce(r.bootstrap, r.topic, recs)
    if sum(r.per_part.values()) != r.produced:
        raise RuntimeError(f"produced {sum(r.per_part.values())} of {r.produced} messages")
    read = [ts >= r.seek_lo for _, _, ts in recs]
    r.expected = sum(read)
    r.expected_bad = sum(1 for ev, rd in zip(events, read) if rd and ev is None)
    r.older_8d = sum(1 for _, _, ts in recs if ts < r.t0 - 8 * E.DAY)
    r.skipped = r.produced - r.expected
    r.ready_lag_set = "ready_lag" in cfg["kafka"]
    r.tallyd = K.Tallyd(path, port, r.tmp)
    r.loading = observe_loading(r)
    # The model sees exactly the events tallyd must read, in produce order.
    r.model = E.Model(cfg, [ev if rd else None for ev, rd in zip(events, read)], r.asof, r.t0)
    r.info = K.wait_caught_up(r.tallyd, r.expected)
    r.caught_up_ms = int(time.time() * 1000)
    r.ctx = K.ctx(r.tallyd, cfg, path, r.model, r.asof, r.users, r.pins, r.expected,
                  r.caught_up_ms, r.tmp)
    r.ctx.port = port
    print(f"# broker {r.bootstrap}, topic {r.topic}: {r.produced} messages, {r.expected} at or "
          f"after S(T0 + {GAP_AFTER_MS // E.MIN}m) = T0 - {r.t0 - r.seek_lo} ms, {r.skipped} older "
          f"({r.older_8d} older than 8 days); caught up {r.caught_up_ms - r.t0} ms after T0; "
          f"{len(r.loading)} loading observations", flush=True)
    return r


def t_assignment_in_time(r):
    """The seek point S(T) lies in the gap of event times only while
    the assignment (before catch-up) happened less than GAP_AFTER after T0."""
    if r.caught_up_ms - r.t0 >= GAP_AFTER_MS:
        raise Failure(f"caught up {r.caught_up_ms - r.t0} ms after T0, not within "
                      f"{GAP_AFTER_MS} ms: the expected count no longer follows (slow machine?)")


def t_consumes_exactly_from_seek(r):
    m = Mismatches()
    info = r.info
    m.eq(int(info.get("messages_consumed", -1)), r.expected,
         f"INFO messages_consumed (messages with timestamp >= {r.seek_lo}; "
         f"{r.produced} in the topic)")
    m.eq(int(info.get("events_rejected", -1)), r.expected_bad, "INFO events_rejected")
    m.eq(int(info.get("events_applied", -1)), r.expected - r.expected_bad, "INFO events_applied")
    m.eq(info.get("partitions"), str(PARTITIONS), "INFO partitions")
    m.eq(info.get("watermark_ms"), str(r.model.watermark), "INFO watermark_ms")
    for p, n in sorted(r.per_part.items()):
        v = info.get(f"partition_{r.topic}_{p}")
        parts = dict(x.split("=", 1) for x in v.split(",")) if v else {}
        m.eq(parts, {"position": str(n), "high": str(n), "lag": "0"},
             f"INFO partition_{r.topic}_{p}")
    m.check(r.skipped > 0 and r.older_8d > 0,
            f"the stream should hold events before the seek point ({r.skipped}) and older than "
            f"8 days ({r.older_8d})")
    m.done()


def t_nothing_older_read_later(r):
    """Once at the end of every partition, nothing more is consumed (the
    older messages were skipped, not delayed)."""
    cli = r.tallyd.client()
    try:
        for _ in range(5):
            info = cli.info()
            if int(info.get("messages_consumed", -1)) != r.expected:
                raise Failure(f"messages_consumed {info.get('messages_consumed')} after catch-up, "
                              f"want {r.expected}")
            time.sleep(0.2)  # observation period: a late re-read would show
    finally:
        cli.close()


def t_loading_then_answers(r):
    obs = r.loading
    if not obs:
        raise Failure("no observation made (tallyd exited?):\n" + r.tallyd.log_tail())
    if all(before is None and after is None for before, _, after, _ in obs):
        print("#   INFO has no 'loading' field in this build: the -LOADING checks are "
              "skipped", flush=True)
        return
    m = Mismatches()
    loading_seen = normal_seen = 0
    first_normal = None
    for before, reply, after, info in obs:
        if before == "1" and after == "1":
            loading_seen += 1
            m.check(isinstance(reply, RespError) and str(reply).startswith("LOADING"),
                    f"while INFO says loading:1, FEATURES answered {H.short(reply)}, "
                    f"want -LOADING")
        elif before == "0" and after == "0":
            normal_seen += 1
            m.check(isinstance(reply, list), f"after loading:0, FEATURES answered "
                    f"{H.short(reply)}, want values")
            if first_normal is None:
                first_normal = (reply, info)
    m.check(obs[-1][2] == "0", f"INFO still says loading:{obs[-1][2]} after catch-up")
    m.check(normal_seen > 0, "no query answered normally after catch-up")
    if first_normal is not None and r.ready_lag_set:
        # kafka.ready_lag 0: ready only once every message present at
        # assignment is applied, so the first normal answer is final.
        reply, info = first_normal
        m.eq(int(info.get("messages_consumed", -1)), r.expected,
             "INFO messages_consumed when loading turned 0 (kafka.ready_lag 0)")
        m.eq(reply, E.resp2_pairs(r.model.features("user", r.users[0])),
             f"first normal FEATURES user {r.users[0]} (kafka.ready_lag 0)")
    print(f"#   {loading_seen} queries answered while loading, {normal_seen} after; "
          f"{len(obs) - loading_seen - normal_seen} at the transition", flush=True)
    if loading_seen == 0:
        print("#   loading ended before the first query: -LOADING not observable in this run",
              flush=True)
    m.done()


def main():
    suite = H.Suite("kafka_bootstrap")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_bootstrap_setup_produces_and_tallyd_catches_up", e)
        return suite.finish()
    suite.run("assignment_happened_before_the_gap_ends", t_assignment_in_time, r)
    suite.run("window_start_consumes_exactly_messages_since_now_minus_horizon",
              t_consumes_exactly_from_seek, r)
    suite.run("window_start_never_reads_older_messages", t_nothing_older_read_later, r)
    suite.run("queries_answer_loading_until_caught_up_then_values", t_loading_then_answers, r)
    K.run_truth_checks(suite, r.ctx, prefix="window_")
    r.ctx.cli.close()
    alive = r.tallyd.proc.poll() is None
    rc = r.tallyd.close()
    if not alive or rc != 0:
        suite.fail_setup("tallyd_stays_up_and_exits_0_on_sigterm",
                         f"tallyd {'died during the run' if not alive else 'exited'} with {rc}:\n"
                         + r.tallyd.log_tail())
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
