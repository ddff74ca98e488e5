#!/usr/bin/env python3
"""Durability of tallyd's snapshots against a real Apache Kafka broker
(scripts/kafka.sh): kill -9 at random moments while a stream is produced,
damaged snapshot files, and a graceful shutdown. Every value of every user
and pin is compared with the ground truth of e2e.py's model each time:
nothing lost, nothing counted twice.

1. Crash loop. One topic of 8 partitions; a producer thread writes a seeded
   stream (e2e.py's generator, keyed by user id with the Java client's
   murmur2) at a steady rate for about 40 s. Meanwhile tallyd (snapshot
   every 1s, keep 3) is started, killed with SIGKILL at a random moment
   after it answers PING, and started again, at least MIN_KILLS times. Half
   the kills come after a random delay (0.3-2.5 s); a quarter wait for a
   snapshot writer's temp file to appear and kill at once (the writer is
   then mid-write: a random kill rarely is, writing takes a few tens of ms
   a second), a quarter wait for a new snapshot file to appear (killed
   between the rename and the commit). The run during which the stream
   ends is killed as it ends. A kill counts as mid-snapshot when, right
   before SIGKILL, a temp file of a live writer forked by this tallyd
   existed or INFO said snapshot_in_progress:1; it counts as interrupted
   when that writer's temp file was left behind without its snapshot. Every restart must find every snapshot file whole
   (a crash leaves at worst a stale temp file: snapshots_rejected 0), and no
   writer may outlive its killed tallyd. Once the stream has ended, a final
   start must restore a snapshot, read only the messages after it, reach
   every partition's end, and hold exactly the model's values: FEATURES of
   every user and pin, RECENT of every user, and FEATURES ... META of every
   id (last event time, lag 0, and the watermark: the newest event time
   consumed, as an uninterrupted run would report it; INFO watermark_ms
   too).
2. Damaged snapshots. After a SIGTERM (exit 0, exactly `keep` files, no
   temp file left), the newest file is truncated to half its size and one
   byte in the middle of the next is flipped: the restart rejects both
   (snapshots_rejected 2), restores the third (restored_snapshot_ms is the
   time in its name) and, caught up, holds the model's values. Then every
   file is damaged (truncated, a payload byte flipped, a header byte
   flipped): the restart rejects them all and rebuilds from Kafka history
   (restored_snapshot_ms -1, every message consumed once), values exact.
3. Graceful shutdown. Caught up, with the stream stopped: SIGTERM ends
   tallyd with exit 0 within 15 s, a snapshot newer than the SIGTERM
   appears, the group's committed offsets are the end offsets; the restart
   restores that snapshot and consumes nothing (messages_consumed stays 0
   after loading:0), values exact.

Time: T0 is the wall clock at start; event times run up to ASOF = T0 + 240 s
and every query evaluates at ASOF; every catch-up must end before ASOF
(asserted), so the store is exact there whatever ingest clock applied.

Run: /usr/bin/python3 tests/integration/kafka_durability.py (a broker from
TLY_KAFKA_BOOTSTRAP, else one started for this run; see kafka_common.py).
"""

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
import yaml  # noqa: E402
from harness import Failure, Mismatches  # noqa: E402
from kafka_common import E  # noqa: E402

# bench/soak.sh runs the same test longer: TLY_DURABILITY_STREAM_S seconds of
# stream (same rate) and at least TLY_DURABILITY_KILLS kills.
STREAM_S = int(os.environ.get("TLY_DURABILITY_STREAM_S", "40"))  # stream spread over this
NEVENTS = 1_500 * STREAM_S  # well-formed events of the stream (15 malformed besides)
PARTITIONS = 8
LEAD_MS = max(240_000, (STREAM_S + 200) * 1000)
SEED = E.SEED + 707
MIN_KILLS = int(os.environ.get("TLY_DURABILITY_KILLS", "20"))
KILL_DELAY_S = (0.3, 2.5)  # random kill moment after tallyd answers PING
AIM_WAIT_S = 2.5           # an aimed kill waits at most this long for its moment
SNAPSHOT = {"every": "1s", "keep": 3}
STOP_WAIT_S = 15           # SIGTERM to exit


# ------------------------------------------------------------ files and processes

def temp_files(d):
    """{name: (ms, pid)} of the writers' temp files ".tmp-<ms>-<pid>.tly" in d."""
    out = {}
    for n in os.listdir(d) if os.path.isdir(d) else []:
        if n.startswith(".tmp-") and n.endswith(".tly"):
            ms, _, pid = n[len(".tmp-"):-len(".tly")].partition("-")
            out[n] = (int(ms), int(pid))
    return out


def proc_stat(pid):
    """(state, ppid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def live_writers(d, parent):
    """Temp files in d whose writer is a live child of process parent."""
    out = {}
    for n, (ms, pid) in temp_files(d).items():
        st = proc_stat(pid)
        if st is not None and st[0] not in ("Z", "X") and st[1] == parent:
            out[n] = (ms, pid)
    return out


def children_of(parent):
    """Live processes whose parent is parent (the snapshot writers of a tallyd)."""
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            st = proc_stat(int(e))
            if st is not None and st[1] == parent and st[0] not in ("Z", "X"):
                out.append(int(e))
    return out


def persistence(cli):
    return H.parse_info(cli.cmd("INFO", "persistence").decode())


def num(info, key, default=-1):
    try:
        return int(info.get(key, default))
    except ValueError:
        return default


def start(r, name):
    t = K.Tallyd(r.config_path, r.port, r.tmp, name=name)
    r.started += 1
    return t


def sigterm(t, seconds=STOP_WAIT_S):
    """SIGTERM; returns (exit status or None if still running after seconds,
    seconds taken). A tallyd still running then is killed."""
    if t is None:
        raise Failure("no tallyd running (an earlier step failed)")
    t0 = time.monotonic()
    t.proc.terminate()
    try:
        rc = t.proc.wait(seconds * H.MULT)
    except Exception:
        rc = None
    took = time.monotonic() - t0
    t.close()
    return rc, took


# ------------------------------------------------------------ the stream

class Stream(threading.Thread):
    """Produces records at a steady rate over STREAM_S seconds (settings of
    kafka_common.produce); per_part counts the delivery reports."""

    def __init__(self, bootstrap, topic, records):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.records = bootstrap, topic, records
        self.per_part, self.errors = {}, []
        self.done = threading.Event()
        self.left = None
        self.sent = 0

    def run(self):
        try:
            self._run()
        except Exception as e:  # reported by the crash loop
            self.errors.append(f"producer thread: {e!r}")
        finally:
            self.done.set()

    def _run(self):
        from confluent_kafka import Producer
        prod = Producer({
            "bootstrap.servers": self.bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "linger.ms": 20,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 200000,
            "log_level": 3,
        })

        def report(err, msg):
            if err is not None:
                self.errors.append(str(err))
            else:
                self.per_part[msg.partition()] = self.per_part.get(msg.partition(), 0) + 1

        rate = len(self.records) / STREAM_S
        t0 = time.monotonic()
        for i, (key, payload, ts) in enumerate(self.records):
            if i % 50 == 0:
                ahead = t0 + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing of the steady rate, not a synchronisation
            while True:
                try:
                    prod.produce(self.topic, value=payload, key=key, timestamp=ts,
                                 on_delivery=report)
                    break
                except BufferError:
                    prod.poll(0.05)  # the local queue is full: serve delivery reports
            prod.poll(0)
            self.sent = i + 1
        self.left = prod.flush(120 * H.MULT)


# ------------------------------------------------------------ checks

def wait_at_end(r, t, seconds=60):
    """Polls INFO until tallyd serves (loading:0) and every partition is at
    its end (position = high = messages produced into it, lag 0). Returns
    the INFO dict; raises Failure with what differs at the deadline."""
    c = t.client()
    end = H.deadline(seconds)
    want = {p: {"position": str(n), "high": str(n), "lag": "0"} for p, n in r.per_part.items()}
    try:
        while True:
            if t.proc.poll() is not None:
                raise Failure(f"tallyd exited with {t.proc.returncode} while catching up:\n"
                              + t.log_tail())
            info = c.info()
            got = {p: parse_partition(info.get(f"partition_{r.topic}_{p}")) for p in want}
            if info.get("loading") == "0" and info.get("lag") == "0" and got == want:
                r.caught_up_ms = int(time.time() * 1000)
                return info
            if time.monotonic() > end:
                bad = {p: g for p, g in got.items() if g != want[p]}
                raise Failure(f"not at the end within {seconds * H.MULT:.0f} s: loading="
                              f"{info.get('loading')} lag={info.get('lag')}, partitions "
                              f"differing {bad} (want {want})\n" + t.log_tail())
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
    finally:
        c.close()


def parse_partition(v):
    try:
        return dict(x.split("=", 1) for x in v.split(",")) if v else {}
    except ValueError:
        return {"unparsable": v}


def check_values(r, t, which):
    """which "values": every FEATURES value of every user and pin and every
    user's RECENT items; "meta": FEATURES ... META of every user and pin
    (last event time, watermark, lag 0) and INFO watermark_ms. Compared with
    the model; integer values off in either direction are tallied (above:
    counted twice; below: lost)."""
    m = Mismatches()
    if t is None or t.proc.poll() is not None:
        raise Failure("no tallyd running (an earlier step failed)" if t is None else
                      f"tallyd exited with {t.proc.returncode}:\n" + t.log_tail())
    cmds, wants = r.checks[which]
    cli = t.client(timeout=60)
    try:
        got = E.batched(cli, cmds)
        if which == "meta":
            m.eq(cli.info().get("watermark_ms"), str(r.model.watermark),
                 "INFO watermark_ms (the newest event time consumed)")
    finally:
        cli.close()
    diffs, higher, lower = H.differing(cmds, got, wants)
    if diffs:
        m.add(f"summary: {len(diffs)} of {len(cmds)} replies differ; {higher} integer values "
              f"or RECENT lengths above the truth, {lower} below")
    m.eq(len(got), len(cmds), "replies")
    for cmd, g, w in diffs:
        m.eq(g, w, " ".join(map(str, cmd)))
    m.check(r.caught_up_ms < r.asof, f"caught up at {r.caught_up_ms}, after ASOF {r.asof} "
            f"(machine too slow? the ground truth at ASOF then no longer applies)")
    if t.proc.poll() is not None:
        m.add(f"tallyd exited with {t.proc.returncode} during the reads:\n" + t.log_tail())
    m.done()


# ------------------------------------------------------------ setup

def last_event_fed(model, events):
    """{(entity, id): newest time of an event surely kept that gives some
    feature of the entity a value}. e2e.py's model counts as an entity's
    event every event matching one of its features, also one lacking the
    value field its only matching feature aggregates (a pin's "hide" without
    dwell_ms matches only max_dwell); tallyd's meta:last_event_ms skips
    those. Which is meant is not this test's question: both are accepted."""
    out = {}
    for ev in events:
        if ev is None:
            continue
        for f in model.feats:
            if not f.matches(ev) or any(k not in ev for k in f.key):
                continue
            if any(v not in ev for v in f.value):
                continue
            if ev["ts"] >= model.asof - f.horizon + f.slack:
                k = (f.entity, f.entity_id(ev))
                out[k] = max(out.get(k, -1), ev["ts"])
    return out


def meta_pairs(model, fed, entity, i):
    """The model's FEATURES ... META pairs, meta:last_event_ms also
    accepting the value of last_event_fed."""
    pairs = model.features(entity, i, meta=True)
    alt = fed.get((entity, i), -1)
    out = []
    for n, v in pairs:
        if n == "meta:last_event_ms":
            opts = v.options if isinstance(v, H.OneOf) else [v]
            if alt not in opts:
                v = H.OneOf(opts + [alt])
        out.append((n, v))
    return out


def setup():
    r = K.new_run("durability", LEAD_MS, PARTITIONS)
    events, lines, users, pins = E.generate(r.asof, nevents=NEVENTS, seed=SEED)
    r.records = K.records(events, lines, r.asof - E.HOUR)
    r.produced = len(r.records)
    r.bad = sum(1 for ev in events if ev is None)
    r.port = H.free_port()
    r.config_path, r.cfg = K.write_config(r.tmp, r.bootstrap, r.port, r.topic, "replica",
                                          "earliest", K.FEATURES, name="tallyd")
    r.snapdir = str(Path(r.tmp) / "snapshots")
    r.cfg["snapshot"] = dict(r.cfg.get("snapshot") or {}, dir=r.snapdir, **SNAPSHOT)
    # events run up to ASOF, LEAD_MS ahead of the start: none may be "future"
    r.cfg["events"]["max_future_skew"] = f"{LEAD_MS // 60_000 + 5}m"
    with open(r.config_path, "w") as f:
        yaml.safe_dump(r.cfg, f, sort_keys=False)
    r.group = r.cfg["kafka"]["group"]
    r.model = model = E.Model(r.cfg, events, r.asof, r.t0)
    ids = {"user": users + E.UNKNOWN_USERS, "pin": pins + E.UNKNOWN_PINS}
    r.checks = {"values": ([], []), "meta": ([], [])}
    cmds, wants = r.checks["values"]
    for entity in ("user", "pin"):
        for i in ids[entity]:
            cmds.append(("FEATURES", entity, i, "ASOF", r.asof))
            wants.append(E.resp2_pairs(model.features(entity, i)))
    for i in ids["user"]:
        cmds.append(("RECENT", "user", i, "recent", "ASOF", r.asof))
        wants.append(model.recent("user", i, "recent"))
    cmds, wants = r.checks["meta"]
    fed = last_event_fed(model, events)
    for entity in ("user", "pin"):
        for i in ids[entity]:
            cmds.append(("FEATURES", entity, i, "ASOF", r.asof, "META"))
            wants.append(E.resp2_pairs(meta_pairs(model, fed, entity, i)))
    r.started = 0
    r.t = None
    r.per_part = {}
    r.caught_up_ms = 0
    print(f"# broker {r.bootstrap}, topic {r.topic}: {r.produced} messages to stream over "
          f"{STREAM_S} s; {len(model.ids['user'])} users and {len(model.ids['pin'])} pins with "
          f"kept events; {sum(len(c) for c, _ in r.checks.values())} queries per check; "
          f"ASOF={r.asof}", flush=True)
    return r


# ------------------------------------------------------------ 1. crash loop

class Kills:
    def __init__(self):
        self.n = 0
        self.kinds = {"random": 0, "aim-writer": 0, "aim-renamed": 0}
        self.mid_kinds = dict.fromkeys(self.kinds, 0)
        self.with_children = 0   # a child process (a writer) was alive at the kill
        self.mid = 0             # a live writer's temp file or snapshot_in_progress:1
        self.interrupted = 0     # ... and its temp file left behind without its snapshot
        self.no_snapshot_yet = 0  # killed before this run's first snapshot was durable
        self.after_rename = 0    # a new snapshot file had appeared (aim-renamed, found)
        self.restores = 0        # starts that restored a snapshot
        self.runs_written = 0    # snapshots made durable by the killed runs (their INFO)


def kill_one(r, t, k, kind, rng, m, cut):
    """Waits for the kill moment of kind, then SIGKILLs t; updates k. When
    cut (an Event) is set meanwhile, the kill comes at once."""
    cli = t.client()
    try:
        delay = rng.uniform(*KILL_DELAY_S) if kind == "random" else rng.uniform(0.0, 0.6)
        cut_short = cut.wait(delay)  # the random kill moment
        found = False
        if kind != "random" and not cut_short:
            before = {n for _, n in K.snapshot_files(r.snapdir)}
            end = time.monotonic() + AIM_WAIT_S
            while time.monotonic() < end and not found:
                if kind == "aim-writer":
                    found = bool(live_writers(r.snapdir, t.pid))
                else:
                    found = any(n not in before for _, n in K.snapshot_files(r.snapdir))
                if not found:
                    time.sleep(0.001)  # poll interval of a bounded wait for the moment
        if t.proc.poll() is not None:
            m.add(f"tallyd {t.log_path.name} exited by itself with {t.proc.returncode}:\n"
                  + t.log_tail())
            t.close()
            return
        # Right before SIGKILL: its child processes, INFO, the writers' temp
        # files, then the kill.
        children = children_of(t.pid)
        info = persistence(cli)
        writers = live_writers(r.snapdir, t.pid)
        os.kill(t.pid, signal.SIGKILL)
    finally:
        cli.close()
    t.proc.wait()
    t.close()
    k.n += 1
    k.kinds[kind] += 1
    k.after_rename += kind == "aim-renamed" and found
    k.runs_written += num(info, "snapshots_written", 0)
    if num(info, "snapshots_written", 0) == 0:
        k.no_snapshot_yet += 1
    mid = bool(writers) or info.get("snapshot_in_progress") == "1"
    k.mid += mid
    k.mid_kinds[kind] += mid
    k.with_children += bool(children)
    # No writer outlives its tallyd (PR_SET_PDEATHSIG in the writer).
    end = H.deadline(5)
    while any(alive(p) for p in children) and time.monotonic() < end:
        time.sleep(0.01)  # poll interval of a deadline-bounded wait
    left = [p for p in children if alive(p)]
    if left:
        m.add(f"kill {k.n}: process(es) {left} forked by tallyd {t.pid} still run 5 s after "
              f"its SIGKILL")
        for p in left:
            os.kill(p, signal.SIGKILL)
    names = {n for _, n in K.snapshot_files(r.snapdir)}
    tmps = temp_files(r.snapdir)
    for n, (ms, pid) in writers.items():
        if n in tmps and f"snapshot-{ms:013d}.tly" not in names:
            k.interrupted += 1
            break


def t_crash_loop(r):
    k = r.kills = Kills()
    m = Mismatches()
    rng = random.Random(SEED + 1)
    stream = r.stream = Stream(r.bootstrap, r.topic, r.records)
    stream.start()
    t_start = time.monotonic()
    end = H.deadline(STREAM_S + 90)
    rejected = 0
    try:
        while not (stream.done.is_set() and k.n >= MIN_KILLS):
            if time.monotonic() > end:
                m.add(f"crash loop still running after {time.monotonic() - t_start:.0f} s "
                      f"({k.n} kills, {stream.sent} of {r.produced} produced)")
                break
            t = r.t = start(r, f"tallyd-{r.started + 1:02d}")
            cli = t.client()
            try:
                info = persistence(cli)
            finally:
                cli.close()
            if num(info, "restored_snapshot_ms") > 0:
                k.restores += 1
            if num(info, "snapshots_rejected") != 0:
                rejected += num(info, "snapshots_rejected")
                m.add(f"start {r.started} ({t.log_path.name}) rejected "
                      f"{info.get('snapshots_rejected')} snapshot(s) left by a kill -9: a crash "
                      f"must leave only whole snapshots:\n" + t.log_tail(10))
            kind = ("random", "aim-writer", "random", "aim-renamed")[k.n % 4]
            # The run during which the stream ends (once enough kills are
            # done) is killed as it ends: the final start then has messages
            # to read after its snapshot.
            cut = (stream.done if not stream.done.is_set() and k.n + 1 >= MIN_KILLS
                   else threading.Event())
            kill_one(r, t, k, kind, rng, m, cut)
            r.t = None
    finally:
        stream.join(STREAM_S + 120 * H.MULT)
    loop_s = time.monotonic() - t_start
    m.check(not stream.is_alive(), "the producer thread did not end")
    m.check(not stream.errors and stream.left == 0,
            f"producing: {stream.left} undelivered, errors {stream.errors[:3]}")
    r.per_part = dict(sorted(stream.per_part.items()))
    m.eq(sum(r.per_part.values()), r.produced, "messages delivered")
    m.eq(sorted(r.per_part), list(range(PARTITIONS)), "partitions that received messages")
    print(f"# {k.n} kills ({k.mid} mid-snapshot), {k.restores} restores from snapshot, "
          f"in {r.started} starts over {loop_s:.1f} s; kills: {k.kinds['random']} at random "
          f"moments ({k.mid_kinds['random']} mid-snapshot), {k.kinds['aim-writer']} aimed at a "
          f"writer's temp file ({k.mid_kinds['aim-writer']}), {k.kinds['aim-renamed']} aimed "
          f"just after a snapshot's rename ({k.after_rename} found one; "
          f"{k.mid_kinds['aim-renamed']} before the writer was reaped); {k.interrupted} left "
          f"the writer's temp file without its snapshot; {k.with_children} with a writer "
          f"process alive, none outliving tallyd; {k.no_snapshot_yet} before the run's first "
          f"durable snapshot; {k.runs_written} snapshots written by the killed runs; "
          f"{rejected} rejected at restarts", flush=True)
    m.check(k.n >= MIN_KILLS, f"{k.n} kills, want at least {MIN_KILLS}")
    # A kill aimed at a writer's temp file lands while the writer is writing
    # (the file appears at the writer's start; the kill follows within a
    # millisecond or two), so mid-snapshot kills can be forced.
    m.check(k.mid >= 1, "no kill landed while a snapshot was being written")
    m.check(k.interrupted >= 1, "no kill interrupted a writer (its temp file left behind)")
    m.check(k.restores >= MIN_KILLS // 2, f"only {k.restores} of {r.started} starts restored "
            f"a snapshot")
    m.done()


def t_final_restart(r):
    """After the crash loop, with the stream ended: the restart restores a
    snapshot, reads only the messages after it, reaches every end."""
    t = r.t = start(r, "tallyd-final")
    info = wait_at_end(r, t)
    m = Mismatches()
    consumed = num(info, "messages_consumed")
    r.final_restored = num(info, "restored_snapshot_ms")
    m.check(r.final_restored > 0, f"restored_snapshot_ms {r.final_restored}: no snapshot restored")
    m.check(num(info, "restored_entities") > 0,
            f"restored_entities {info.get('restored_entities')}")
    m.eq(num(info, "snapshots_rejected"), 0, "INFO snapshots_rejected")
    m.check(0 <= consumed < r.produced, f"messages_consumed {consumed}, want fewer than the "
            f"{r.produced} in the topic (the snapshot's positions were not used)")
    m.eq(num(info, "events_applied") + num(info, "events_rejected"), consumed,
         "INFO events_applied + events_rejected (each consumed message once)")
    m.eq(info.get("consumer_errors"), "0", "INFO consumer_errors")
    print(f"# final start after the crash loop: restored the snapshot of {r.final_restored} "
          f"({info.get('restored_entities')} entities), then consumed {consumed} of "
          f"{r.produced} messages", flush=True)
    m.done()


# ------------------------------------------------------------ 2. damaged snapshots

def t_sigterm_leaves_keep(r):
    """SIGTERM: exit 0; exactly `keep` snapshot files; no temp file left."""
    rc, took = sigterm(r.t)
    r.t = None
    m = Mismatches()
    m.eq(rc, 0, f"exit status after SIGTERM ({took:.1f} s)")
    files = K.snapshot_files(r.snapdir)
    m.eq(len(files), SNAPSHOT["keep"], f"snapshot files {[n for _, n in files]}")
    m.eq(sorted(temp_files(r.snapdir)), [], "temp files left")
    m.done()


def truncate_half(path):
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return f"truncated {size} -> {size // 2} bytes"


def flip_byte(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 0xFF]))
    return f"byte {at} flipped"


def t_fallback_third(r):
    files = K.snapshot_files(r.snapdir)
    if len(files) < 3:
        raise Failure(f"need 3 snapshot files, have {[n for _, n in files]}")
    p0 = os.path.join(r.snapdir, files[0][1])
    p1 = os.path.join(r.snapdir, files[1][1])
    what = [f"{files[0][1]} {truncate_half(p0)}",
            f"{files[1][1]} {flip_byte(p1, os.path.getsize(p1) // 2)}"]
    t = r.t = start(r, "tallyd-fallback")
    info = wait_at_end(r, t)
    m = Mismatches()
    m.eq(num(info, "snapshots_rejected"), 2, "INFO snapshots_rejected")
    m.eq(num(info, "restored_snapshot_ms"), files[2][0],
         f"INFO restored_snapshot_ms (the third file is {files[2][1]})")
    m.eq(num(info, "events_applied") + num(info, "events_rejected"),
         num(info, "messages_consumed"), "INFO events_applied + events_rejected")
    m.check(t.proc.poll() is None, f"tallyd exited with {t.proc.returncode}")
    print(f"# fallback: {'; '.join(what)}; restored {files[2][1]}, then consumed "
          f"{info.get('messages_consumed')} messages", flush=True)
    m.done()


def t_all_damaged_rebuild(r):
    rc, took = sigterm(r.t)
    r.t = None
    if rc != 0:
        raise Failure(f"SIGTERM before damaging every snapshot: exit {rc} after {took:.1f} s")
    files = K.snapshot_files(r.snapdir)
    if not files:
        raise Failure("no snapshot file to damage")
    what = []
    for i, (_, n) in enumerate(files):
        p = os.path.join(r.snapdir, n)
        if i % 3 == 0:
            what.append(f"{n} {truncate_half(p)}")
        elif i % 3 == 1:
            what.append(f"{n} {flip_byte(p, os.path.getsize(p) // 2)}")
        else:
            what.append(f"{n} {flip_byte(p, 20)} (in the header's created_ms)")
    t = r.t = start(r, "tallyd-rebuild")
    info = wait_at_end(r, t)
    m = Mismatches()
    m.eq(num(info, "snapshots_rejected"), len(files), "INFO snapshots_rejected")
    m.eq(num(info, "restored_snapshot_ms"), -1, "INFO restored_snapshot_ms")
    m.eq(num(info, "restored_entities"), 0, "INFO restored_entities")
    m.eq(num(info, "messages_consumed"), r.produced, "INFO messages_consumed (the whole topic)")
    m.eq(num(info, "events_rejected"), r.bad, "INFO events_rejected")
    m.eq(num(info, "events_applied"), r.produced - r.bad, "INFO events_applied")
    m.check(t.proc.poll() is None, f"tallyd exited with {t.proc.returncode}")
    print(f"# all damaged: {'; '.join(what)}; rebuilt from Kafka history", flush=True)
    m.done()


# ------------------------------------------------------------ 3. graceful shutdown

def committed(r):
    """{partition: offset} the group has committed."""
    keys = [(r.topic, p) for p in range(PARTITIONS)]
    return {p: off for (_, p), off in K.committed(r.bootstrap, r.group, keys).items()}


def t_graceful(r):
    """Caught up, stream stopped: SIGTERM -> exit 0 within STOP_WAIT_S, a
    snapshot created after the SIGTERM, committed offsets = end offsets."""
    wait_at_end(r, r.t)
    newest = K.snapshot_files(r.snapdir)[:1]
    sent_ms = int(time.time() * 1000)
    rc, took = sigterm(r.t)
    r.t = None
    m = Mismatches()
    m.eq(rc, 0, f"exit status {took:.1f} s after SIGTERM (bound {STOP_WAIT_S} s)")
    files = K.snapshot_files(r.snapdir)
    r.final_snapshot = files[0] if files else (-1, "")
    m.check(bool(files) and (not newest or files[0][0] > newest[0][0]) and files[0][0] >= sent_ms,
            f"newest snapshot {files[:1]}, before SIGTERM {newest}: want one created at or "
            f"after the SIGTERM ({sent_ms})")
    m.eq(sorted(temp_files(r.snapdir)), [], "temp files left")
    got = committed(r)
    m.eq(got, r.per_part, f"committed offsets of group {r.group} (the end offsets)")
    end = K.end_offsets(r.bootstrap, r.topic, PARTITIONS)
    m.eq(end, r.per_part, "the broker's end offsets")
    print(f"# SIGTERM: exit {rc} in {took:.2f} s; final snapshot {r.final_snapshot[1]}; "
          f"committed {sum(v for v in got.values() if v > 0)} of {r.produced}", flush=True)
    m.done()


def t_restart_replays_nothing(r):
    t = r.t = start(r, "tallyd-clean")
    info = wait_at_end(r, t)
    m = Mismatches()
    m.eq(num(info, "restored_snapshot_ms"), r.final_snapshot[0], "INFO restored_snapshot_ms")
    m.eq(num(info, "snapshots_rejected"), 0, "INFO snapshots_rejected")
    m.eq(num(info, "messages_consumed"), 0, "INFO messages_consumed at loading:0")
    # It stays 0 over more than a snapshot period (nothing replayed later).
    cli = t.client()
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            info = cli.info()
            if num(info, "messages_consumed") != 0:
                break
            time.sleep(0.1)  # poll interval of a bounded observation
    finally:
        cli.close()
    m.eq(num(info, "messages_consumed"), 0, "INFO messages_consumed 1.5 s after loading:0")
    m.done()


DAY_MS = 86_400_000


def t_future_named_snapshot_restored(r):
    """The clock ran a day ahead while the oldest snapshot was written, and
    was stepped back: that file now has the newest name. It is restored
    (its positions match its state, so the rest is read from Kafka)."""
    rc, took = sigterm(r.t)
    r.t = None
    if rc != 0:
        raise Failure(f"SIGTERM before renaming a snapshot: exit {rc} after {took:.1f} s")
    files = K.snapshot_files(r.snapdir)
    if len(files) < 2:
        raise Failure(f"need 2 snapshot files, have {[n for _, n in files]}")
    old_ms, old_name = files[-1]
    r.future_ms = int(time.time() * 1000) + DAY_MS
    future = f"snapshot-{r.future_ms:013d}.tly"
    os.rename(os.path.join(r.snapdir, old_name), os.path.join(r.snapdir, future))
    t = r.t = start(r, "tallyd-future")
    info = wait_at_end(r, t)
    m = Mismatches()
    # the header keeps the time it was written at: only the renamed file has it
    m.eq(num(info, "restored_snapshot_ms"), old_ms, f"INFO restored_snapshot_ms ({old_name} "
         f"renamed {future})")
    m.eq(num(info, "snapshots_rejected"), 0, "INFO snapshots_rejected")
    print(f"# {old_name} renamed {future}: restored, then consumed "
          f"{info.get('messages_consumed')} messages", flush=True)
    m.done()


def t_next_snapshot_named_after_the_future_one(r):
    """SIGTERM: the final snapshot is named after the future-named file (the
    clock is a day behind it); the restart restores that one and reads
    nothing (before, the future-named file stayed newest and was restored
    again at every start)."""
    if r.t is None:
        raise Failure("no tallyd running (an earlier step failed)")
    r.t_future_log = r.t.log_path
    rc, took = sigterm(r.t)
    r.t = None
    m = Mismatches()
    m.eq(rc, 0, f"exit status {took:.1f} s after SIGTERM")
    files = K.snapshot_files(r.snapdir)
    newest = files[0][0] if files else -1
    # the periodic ones written since the start take future_ms + 1, + 2, ...
    # (a day ahead of the clock: no other name comes near)
    m.check(r.future_ms < newest < r.future_ms + 1000,
            f"the newest snapshot {files[:1]}: want one named just after {r.future_ms}")
    m.eq(len(files), SNAPSHOT["keep"], f"snapshot files {[n for _, n in files]}")
    log = Path(r.t_future_log).read_text(errors="replace")
    m.check("ahead of the clock" in log, "no warning in the log of the start with the "
            "future-named snapshot")
    t = r.t = start(r, "tallyd-after-future")
    info = wait_at_end(r, t)
    m.eq(num(info, "restored_snapshot_ms"), newest, "INFO restored_snapshot_ms")
    m.eq(num(info, "messages_consumed"), 0, "INFO messages_consumed at loading:0")
    m.done()


def t_values(r):
    check_values(r, r.t, "values")


def t_meta(r):
    check_values(r, r.t, "meta")


# ------------------------------------------------------------ main

def main():
    suite = H.Suite("kafka_durability")
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_durability_setup_topic_model_and_config", e)
        return suite.finish()
    steps = [
        ("crash_loop_kill9_at_random_moments_during_a_stream_some_mid_snapshot", t_crash_loop),
        ("restart_after_crash_loop_restores_a_snapshot_and_reads_only_the_rest",
         t_final_restart),
        ("after_crash_loop_every_value_equals_ground_truth", t_values),
        ("after_crash_loop_meta_and_watermark_equal_ground_truth", t_meta),
        ("sigterm_exits_0_keeps_3_snapshots_leaves_no_temp_file", t_sigterm_leaves_keep),
        ("truncated_and_flipped_snapshots_rejected_third_restored", t_fallback_third),
        ("after_fallback_to_third_every_value_equals_ground_truth", t_values),
        ("every_snapshot_damaged_rejected_rebuilt_from_kafka", t_all_damaged_rebuild),
        ("after_rebuild_every_value_equals_ground_truth", t_values),
        ("after_rebuild_meta_and_watermark_equal_ground_truth", t_meta),
        ("sigterm_exits_0_final_snapshot_commits_end_offsets", t_graceful),
        ("restart_after_sigterm_consumes_nothing", t_restart_replays_nothing),
        ("after_clean_restart_every_value_equals_ground_truth", t_values),
        ("after_clean_restart_meta_and_watermark_equal_ground_truth", t_meta),
        ("snapshot_named_a_day_ahead_is_restored_first", t_future_named_snapshot_restored),
        ("after_restoring_the_future_named_one_every_value_equals_ground_truth", t_values),
        ("next_snapshot_is_named_after_the_future_one_and_restored_next",
         t_next_snapshot_named_after_the_future_one),
        ("after_restoring_the_one_named_after_it_every_value_equals_ground_truth", t_values),
    ]
    for i, (name, fn) in enumerate(steps):
        ok = suite.run(f"durability_{name}", fn, r)
        # Every later step needs the whole stream in the topic.
        if fn is t_crash_loop and not ok and sum(r.per_part.values()) != r.produced:
            for later, _ in steps[i + 1:]:
                suite.fail_setup(f"durability_{later}", "not run: the stream was not produced")
            break
    if r.t is not None:
        alive_now = r.t.proc.poll() is None
        rc, _ = sigterm(r.t)
        if not alive_now or rc != 0:
            suite.fail_setup("durability_tallyd_stays_up_and_exits_0_on_sigterm",
                             f"tallyd {'died during the run' if not alive_now else 'exited'} "
                             f"with {rc}:\n" + r.t.log_tail())
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
