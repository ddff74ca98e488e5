#!/usr/bin/env python3
"""Fault tests of tallyd's Kafka consumer: while a steady stream of events
flows through a Kafka mock cluster (build/itest/mockkafka, in its own
process, 3 brokers), the cluster misbehaves — a partition leader goes down
and comes back, the group coordinator goes down (briefly, and for longer
than the session timeout, which revokes the assignment), every broker goes
down at once, Fetch requests fail with retriable errors, the coordinator
moves, every partition's leader moves — and afterwards tallyd must hold
exactly what an undisturbed run holds: every value of every user and pin
(FEATURES, every feature and window) and every user's RECENT items equal
the ground truth computed from the event list (e2e.py's model, DESIGN.md
§3), and INFO counts every produced message exactly once. A duplicate or a
lost event fails the test, and the failure says how many values are above
the truth (duplicates) and below it (losses), with INFO and tallyd's
source log.

One event list and one ground truth serve every scenario: NSEED seeded
events over the last 8 days (e2e.py's generator, keyed by user, with its
malformed events) and NSTREAM more, evaluated at one ASOF far enough ahead
that every scenario ingests everything before it (each checks it). Each
scenario runs a fresh cluster and a fresh tallyd (shard mode, kafka.start
earliest): the seed is in the topic before tallyd starts; once tallyd has
consumed it, the stream is produced at RATE events/s; the fault is injected
once tallyd consumes the stream, and each step waits for evidence that the
fault took effect (a consumer error, the assignment lost and regained, the
injected errors consumed, a heartbeat at the new coordinator, consumption
past the change) — by polling with deadlines, never by sleeping. The mock's
producer is idempotent: its retries under the same faults never write
duplicates (mockkafka checks the cluster holds exactly the produced
messages before it says PRODUCED).

Last, SIGTERM, in replica and in shard mode. Early in the catch-up of the
seed: messages fetched ahead are still queued when the consumer closes, and
tallyd must drop them and exit 0 (librdkafka 2.0.2 aborts when they reach a
callback-only poll). And after the whole cluster is killed
(kill -9) once tallyd consumed the seed: it must log that the brokers did
not answer and exit 0 once its close deadline (10 s) passed, instead of
waiting for brokers that are gone (librdkafka's consumer close waits for
them as long as they stay away). Each time a final snapshot is written.

Leaders and the coordinator are set explicitly at the start: partition p is
led by broker p % 3 + 1, the group's coordinator is broker 1.

Run: /usr/bin/python3 tests/integration/kafka_faults.py
Environment: as harness.py (TLY_BUILD, TLY_TEST_TIMEOUT_MULT), and
TLY_FAULTS_ONLY (run only the scenarios whose name contains it),
TLY_FAULTS_EXTRA=1 (also run EXTRA_SCENARIOS: faults a correct broker does
not produce, kept to reproduce what tallyd does then).
"""

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e as E  # noqa: E402
import harness as H  # noqa: E402
from harness import Failure, Mismatches  # noqa: E402

TOPIC = "engagements"
PARTITIONS = 8
BROKERS = (1, 2, 3)
COORDINATOR = 1
NSEED = 50_000    # well-formed seeded events (e2e.py's malformed ones come on top)
NSTREAM = 15_000  # events of the steady stream
RATE = 2_500      # stream events per second: the stream lasts 6 s
SEED = 20261123
# ASOF is this far after the start: every scenario must have ingested
# everything by then (each checks it). Events up to ASOF - 1 s exist, so
# events.max_future_skew is raised to 1h.
LEAD_MS = 600_000
# Heartbeats every 500 ms make the consumer notice a coordinator change or
# outage quickly; the session timeout is librdkafka's default unless a
# scenario lowers it.
BASE_PROPERTIES = {"heartbeat.interval.ms": "500"}
SHORT_SESSION = {"session.timeout.ms": "6000"}


def leader_of(p):
    return p % len(BROKERS) + 1


# ------------------------------------------------------------------ cluster

class Cluster:
    """build/itest/mockkafka in stream mode, driven over its stdin."""

    def __init__(self, tmp, seed_path, stream_path):
        self.log_path = Path(tmp) / "mockkafka.log"
        self.log = open(self.log_path, "w")
        self.proc = H.spawn([H.MOCKKAFKA, "--rate", RATE, "--stream", stream_path, TOPIC,
                             PARTITIONS, seed_path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        # A reader thread turns stdout into a queue, so every wait has a
        # deadline (a blocking readline has none).
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.bootstrap = self._expect("BOOTSTRAP", 30)
        self.seeded = int(self._expect("PRODUCED", 120))

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next(self, seconds, what):
        try:
            line = self.lines.get(timeout=seconds * H.MULT)
        except queue.Empty:
            raise Failure(f"mockkafka: no answer to '{what}' within {seconds * H.MULT:.0f} s")
        if line is None:
            rc = self.proc.wait()
            raise Failure(f"mockkafka exited with {rc} waiting for '{what}': "
                          f"{self.log_path.read_text()[-2000:]}")
        return line

    def _expect(self, word, seconds):
        line = self._next(seconds, word)
        if not line.startswith(word + " "):
            raise Failure(f"mockkafka: expected '{word} ...', got {line!r}")
        return line.split(" ", 1)[1].strip()

    def cmd(self, text, seconds=15):
        """Sends one command; returns its result lines (before the OK)."""
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        out = []
        while True:
            line = self._next(seconds, text)
            if line == "OK " + text:
                return out
            if line.startswith("ERR"):
                raise Failure(f"mockkafka '{text}': {line}")
            out.append(line)

    def progress(self):
        """(sent, delivered, total) with the seed included."""
        fields = dict(kv.split("=") for kv in self.cmd("progress")[0].split()[1:])
        return int(fields["sent"]), int(fields["delivered"]), int(fields["total"])

    def close(self):
        if self.proc.poll() is None:
            try:
                self.cmd("quit", seconds=15)
            except Exception:
                pass
        try:
            self.proc.stdin.close()
        except Exception:
            pass
        rc = H.stop(self.proc)
        self.log.close()
        return rc


# ------------------------------------------------------------------ helpers

class Run:
    """One scenario's cluster, tallyd and client (and the shared Data)."""


def source_log(run, n=40):
    """tallyd's log lines about its source and librdkafka, the last n."""
    try:
        lines = run.tallyd.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    picked = [ln for ln in lines if "source:" in ln or "kafka:" in ln]
    return "\n    ".join(picked[-n:])


INFO_KEYS = ("messages_consumed", "events_applied", "events_rejected", "consumer_errors",
             "partitions", "lag", "watermark_ms")


def info_summary(info):
    parts = [f"{k}={info.get(k)}" for k in INFO_KEYS]
    parts += [f"{k}={v}" for k, v in info.items() if k.startswith("partition_")]
    return ", ".join(parts)


def wait_info(run, cond, what, seconds=30):
    """Polls INFO until cond(info) holds; returns that INFO. Fails with the
    last INFO and tallyd's source log otherwise."""
    end = H.deadline(seconds)
    info = {}
    while True:
        if run.tallyd.proc.poll() is not None:
            raise Failure(f"tallyd exited with {run.tallyd.proc.returncode} waiting for {what}:\n"
                          f"    {source_log(run)}")
        info = run.cli.info()
        if cond(info):
            return info
        if time.monotonic() > end:
            raise Failure(f"waited {seconds * H.MULT:.0f} s for {what}; last INFO: "
                          f"{info_summary(info)}\n  tallyd log:\n    {source_log(run)}")
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


def num(info, key):
    return int(info.get(key, "-1"))


def positions(info):
    """{partition: (position, high)} from INFO's partition_<topic>_<n> lines."""
    out = {}
    for k, v in info.items():
        if k.startswith(f"partition_{TOPIC}_"):
            f = dict(kv.split("=") for kv in v.split(","))
            out[int(k.rsplit("_", 1)[1])] = (int(f["position"]), int(f["high"]))
    return out


def consumed(run, n, what, seconds=30):
    """Waits until tallyd consumed at least n messages in all."""
    return wait_info(run, lambda i: num(i, "messages_consumed") >= n, what, seconds)


def stream_running(run):
    """Fails unless the stream is still being produced (the fault must hit
    a live stream, not a finished one)."""
    sent, _, total = run.kafka.progress()
    if sent >= total:
        raise Failure(f"the stream ended ({sent} of {total} sent) before the fault: lower "
                      f"RATE or raise NSTREAM")
    return sent


# ------------------------------------------------------------------ faults

def fault_leader_down(run):
    """Broker 2 (leader of some partitions, not the coordinator) goes down
    until tallyd has felt it (a consumer error) while the other brokers'
    partitions keep flowing, then comes back."""
    b = 2
    before = num(run.cli.info(), "consumer_errors")
    stream_running(run)
    run.kafka.cmd(f"broker-down {b}")
    wait_info(run, lambda i: num(i, "consumer_errors") > before,
              f"a consumer error after broker {b} went down")
    mark = num(run.cli.info(), "messages_consumed")
    consumed(run, mark + 200, "consumption from the brokers still up")
    run.kafka.cmd(f"broker-up {b}")
    sent, _, _ = run.kafka.progress()
    consumed(run, sent, f"consumption past the outage of broker {b}")


def fault_coordinator_down(run):
    """The coordinator (broker 1, also a partition leader) goes down for
    less than the session timeout: no rebalance needed, nothing lost."""
    b = COORDINATOR
    before = num(run.cli.info(), "consumer_errors")
    stream_running(run)
    run.kafka.cmd(f"broker-down {b}")
    wait_info(run, lambda i: num(i, "consumer_errors") > before,
              f"a consumer error after coordinator {b} went down")
    mark = num(run.cli.info(), "messages_consumed")
    consumed(run, mark + 200, "consumption from the brokers still up")
    run.kafka.cmd(f"broker-up {b}")
    sent, _, _ = run.kafka.progress()
    consumed(run, sent, f"consumption past the outage of broker {b}")


def fault_coordinator_down_past_session(run):
    """The coordinator stays down past session.timeout.ms: the consumer
    loses its assignment (tallyd's INFO partitions drops to 0), rejoins once
    the broker is back and is assigned every partition again — each resumes
    where this process left it."""
    b = COORDINATOR
    stream_running(run)
    run.kafka.cmd(f"broker-down {b}")
    wait_info(run, lambda i: num(i, "partitions") == 0,
              "the assignment to be lost after the session timeout", seconds=40)
    run.kafka.cmd(f"broker-up {b}")
    wait_info(run, lambda i: num(i, "partitions") == PARTITIONS,
              "every partition to be assigned again", seconds=40)
    sent, _, _ = run.kafka.progress()
    consumed(run, sent, "consumption past the reassignment")


def fault_all_brokers_down(run):
    """Every broker goes down at once (consumer and producer both lose the
    cluster) until tallyd has felt it, then all come back."""
    before = num(run.cli.info(), "consumer_errors")
    stream_running(run)
    run.kafka.cmd("broker-down -1")
    wait_info(run, lambda i: num(i, "consumer_errors") > before,
              "a consumer error after every broker went down")
    run.kafka.cmd("broker-up -1")
    sent, _, _ = run.kafka.progress()
    consumed(run, sent, "consumption past the outage of the whole cluster")


FETCH_ERRORS = ("NOT_LEADER_OR_FOLLOWER", "UNKNOWN_TOPIC_OR_PART", "REQUEST_TIMED_OUT")


def wait_fetch_errors_consumed(run, brokers):
    end = H.deadline(30)
    while True:
        left = {b: int(run.kafka.cmd(f"fetch-errors-left {b}")[0].split()[1]) for b in brokers}
        if not any(left.values()):
            return
        if time.monotonic() > end:
            raise Failure(f"injected Fetch errors not consumed within {30 * H.MULT:.0f} s: "
                          f"left per broker {left}\n  tallyd log:\n    {source_log(run)}")
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


def fault_fetch_errors(run):
    """Every broker fails its next Fetch requests with retriable errors
    (not leader, unknown partition, timed out), 2 of each kind."""
    stream_running(run)
    for b in BROKERS:
        for err in FETCH_ERRORS:
            run.kafka.cmd(f"fetch-errors 2 {err} {b}")
    wait_fetch_errors_consumed(run, BROKERS)
    sent, _, _ = run.kafka.progress()
    consumed(run, sent, "consumption past the Fetch errors")


def fault_coordinator_moves(run):
    """The group's coordinator moves 1 → 2 → 3 mid-stream. Each move is
    confirmed by a Heartbeat reaching the new coordinator (a no-error entry
    pushed on its Heartbeat stack, consumed by that request)."""
    for b in (2, 3):
        stream_running(run)
        run.kafka.cmd(f"coordinator {run.group} {b}")
        run.kafka.cmd(f"request-errors Heartbeat 1 NO_ERROR {b}")
        end = H.deadline(30)
        while int(run.kafka.cmd(f"errors-left {b} Heartbeat")[0].split()[1]) > 0:
            if time.monotonic() > end:
                raise Failure(f"no Heartbeat reached the new coordinator {b} within "
                              f"{30 * H.MULT:.0f} s\n  tallyd log:\n    {source_log(run)}")
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
    sent, _, _ = run.kafka.progress()
    consumed(run, sent, "consumption past the coordinator moves")


def fault_leaders_move(run):
    """Every partition's leader moves to the next broker mid-stream; the old
    leaders refuse the partitions' Fetch requests from then on, so what is
    produced after the move reaches tallyd only from the new leaders."""
    stream_running(run)
    for p in range(PARTITIONS):
        run.kafka.cmd(f"leader {p} {leader_of(p) % len(BROKERS) + 1}")
    sent, _, total = run.kafka.progress()
    consumed(run, min(sent + 2000, total), "consumption from the new leaders")


def fault_spurious_offset_out_of_range(run):
    """Broker 2 answers one Fetch with OFFSET_OUT_OF_RANGE although the
    offset is inside the log (a correct broker does not; after an unclean
    leader election a real one answers it for offsets past its shorter
    log)."""
    stream_running(run)
    run.kafka.cmd("fetch-errors 1 OFFSET_OUT_OF_RANGE 2")
    wait_fetch_errors_consumed(run, [2])
    sent, _, _ = run.kafka.progress()
    consumed(run, sent, "consumption past the out-of-range answer")


SCENARIOS = [
    ("leader_broker_down_then_up_loses_and_duplicates_nothing", fault_leader_down, {}),
    ("coordinator_broker_down_briefly_loses_and_duplicates_nothing", fault_coordinator_down, {}),
    ("coordinator_down_past_session_timeout_reassigns_without_duplicates",
     fault_coordinator_down_past_session, SHORT_SESSION),
    ("all_brokers_down_then_up_loses_and_duplicates_nothing", fault_all_brokers_down, {}),
    ("fetch_errors_on_every_broker_lose_and_duplicate_nothing", fault_fetch_errors, {}),
    ("coordinator_moves_twice_loses_and_duplicates_nothing", fault_coordinator_moves, {}),
    ("every_partition_leader_moves_loses_and_duplicates_nothing", fault_leaders_move, {}),
]
EXTRA_SCENARIOS = [
    ("spurious_offset_out_of_range_resumes_at_position_without_duplicates",
     fault_spurious_offset_out_of_range, {}),
]


# ------------------------------------------------------------------ the run

class Data:
    """The events, files and expected answers every scenario shares: one
    ground truth at one ASOF, far enough ahead for every scenario to finish
    ingesting before it."""

    def __init__(self, tmp):
        self.t0 = int(time.time() * 1000)
        self.asof = (self.t0 + LEAD_MS) // 1000 * 1000
        self.events, lines, users, pins = E.generate(self.asof, nevents=NSEED + NSTREAM,
                                                     seed=SEED)
        self.produced = len(lines)
        self.bad = sum(1 for ev in self.events if ev is None)
        cut = len(lines) - NSTREAM
        self.nseed = cut
        self.seed_path = Path(tmp) / "seed.tsv"
        self.stream_path = Path(tmp) / "stream.tsv"
        self.seed_path.write_text("\n".join(lines[:cut]) + "\n")
        self.stream_path.write_text("\n".join(lines[cut:]) + "\n")
        # Shard mode (the group's coordinator matters): the topic is keyed by
        # user, so only user features can be fed from it.
        self.features = [f for f in H.demo_config()["features"] + E.EXTRA_FEATURES
                         if f["entity"] == "user"]
        self.model = E.Model({"features": self.features}, self.events, self.asof, self.t0)
        self.cmds, self.wants = [], []
        for entity, ids in (("user", users + E.UNKNOWN_USERS),):
            for i in ids:
                self.cmds.append(("FEATURES", entity, i, "ASOF", self.asof))
                self.wants.append(E.resp2_pairs(self.model.features(entity, i)))
        for i in users + E.UNKNOWN_USERS:
            self.cmds.append(("RECENT", "user", i, "recent", "ASOF", self.asof))
            self.wants.append(self.model.recent("user", i, "recent"))


def start(data, tmp, properties, mode="shard"):
    """A fresh cluster holding the seed, and a fresh tallyd (kafka.mode
    `mode`) to consume it; the stream is not started yet."""
    run = Run()
    run.tmp = tmp
    run.data = data
    run.produced = data.produced
    run.kafka = Cluster(tmp, data.seed_path, data.stream_path)
    try:
        if run.kafka.seeded != data.nseed:
            raise Failure(f"mockkafka seeded {run.kafka.seeded} of {data.nseed} events")
        port = H.free_port()
        config_path, cfg = H.write_config(tmp, run.kafka.bootstrap, port, TOPIC,
                                          features=data.features)
        cfg["kafka"]["mode"] = mode
        cfg["kafka"]["properties"] = dict(BASE_PROPERTIES, **properties)
        cfg["events"]["max_future_skew"] = "1h"
        with open(config_path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        run.group = cfg["kafka"]["group"]
        run.kafka.cmd(f"coordinator {run.group} {COORDINATOR}")
        for p in range(PARTITIONS):
            run.kafka.cmd(f"leader {p} {leader_of(p)}")
        run.tallyd = H.Tallyd(config_path, port, tmp)
    except BaseException:
        run.kafka.close()
        raise
    run.cli = run.tallyd.client()
    return run


def check_info(run, info, m, when):
    d = run.data
    m.eq(num(info, "messages_consumed"), d.produced, f"INFO messages_consumed ({when})")
    m.eq(num(info, "events_applied"), d.produced - d.bad, f"INFO events_applied ({when})")
    m.eq(num(info, "events_rejected"), d.bad, f"INFO events_rejected ({when})")
    m.eq(num(info, "partitions"), PARTITIONS, f"INFO partitions ({when})")
    m.eq(num(info, "watermark_ms"), d.model.watermark, f"INFO watermark_ms ({when})")
    pos = positions(info)
    m.eq(sum(p for p, _ in pos.values()), d.produced,
         f"INFO sum of partition positions ({when})")


def compare_everything(run, m):
    """Every FEATURES value of every user and pin, and every user's RECENT
    items, against the model; integer values off in either direction are
    tallied (more: duplicates; fewer: losses)."""
    d = run.data
    got = E.batched(run.cli, d.cmds)
    diffs, higher, lower = H.differing(d.cmds, got, d.wants)
    if diffs:
        m.add(f"summary: {len(diffs)} of {len(d.cmds)} replies differ; {higher} integer values "
              f"or RECENT lengths above the truth (duplicates), {lower} below (losses)")
    for cmd, g, w in diffs:
        m.eq(g, w, " ".join(map(str, cmd)))
    return len(d.cmds)


def scenario(data, index, fault, properties, parent_tmp):
    tmp = Path(parent_tmp) / f"s{index}"
    tmp.mkdir()
    run = start(data, tmp, properties)
    try:
        # The stream starts once the seed is in, and the fault hits once
        # tallyd consumes the stream.
        consumed(run, data.nseed, "tallyd to consume the seeded events")
        run.kafka.cmd("start")
        consumed(run, data.nseed + NSTREAM // 10, "tallyd to consume the stream")
        fault(run)
        produced = int(run.kafka.cmd("wait-produced", seconds=120)[0].split()[1])
        if produced != data.produced:
            raise Failure(f"mockkafka produced {produced}, the events number {data.produced}")
        # Every message applied or rejected: done. More than produced is a
        # duplicate — also done waiting, and the checks below say so.
        # (The partition table INFO shows is republished within a second.)
        # And tallyd serves queries (loading:0): after the assignment a
        # fault brought back, the partitions' end offsets are looked up
        # beside the consumption, and the last message can be applied
        # before the last end is known.
        info = wait_info(run, lambda i: (num(i, "events_applied") + num(i, "events_rejected")
                                         >= data.produced
                                         and num(i, "messages_consumed") >= data.produced
                                         and sum(p for p, _ in positions(i).values())
                                         >= data.produced
                                         and i.get("loading", "0") == "0"),
                         f"all {data.produced} messages to be applied or rejected, and "
                         f"tallyd to serve queries", seconds=60)
        ingested_ms = int(time.time() * 1000)
        m = Mismatches()
        check_info(run, info, m, "after ingest")
        m.check(ingested_ms < data.asof,
                f"ingest finished at {ingested_ms}, after ASOF {data.asof}: the ground truth "
                f"no longer applies (machine too slow? raise LEAD_MS)")
        nqueries = compare_everything(run, m)
        # Nothing arrives late either: the counts stay exact.
        check_info(run, run.cli.info(), m, "after the comparisons")
        try:
            m.done()
        except Failure as e:
            raise Failure(f"{e}\n  INFO now: {info_summary(run.cli.info())}\n"
                          f"  tallyd log:\n    {source_log(run)}")
        print(f"  # {data.produced} messages ({data.nseed} seeded, {NSTREAM} streamed at "
              f"{RATE}/s), {nqueries} queries exact; consumer_errors="
              f"{info.get('consumer_errors')}", flush=True)
    finally:
        run.cli.close()
        alive = run.tallyd.proc.poll() is None
        rc = run.tallyd.close()
        run.kafka.close()
    if not alive or rc != 0:
        raise Failure(f"tallyd {'died' if not alive else 'exited'} with {rc}:\n"
                      + run.tallyd.log_tail())


CLOSE_TIMEOUT_S = 10  # TLY_KAFKA_CLOSE_TIMEOUT_MS in src/source_int.h


def sigterm_scenario(data, index, mode, parent_tmp, cluster_gone):
    """SIGTERM as soon as tallyd starts consuming the seed (cluster_gone
    False): the messages it fetched ahead and has not polled yet wait in the
    consumer queue when the consumer closes, and are dropped (not applied,
    their offsets not committed); tallyd exits 0 at once. Or after kill -9 of the whole
    cluster (cluster_gone True): tallyd cannot leave its group or commit,
    and must not wait for brokers that are gone; it says so and exits 0
    once the close deadline passes. Either way the final snapshot is
    written."""
    tmp = Path(parent_tmp) / f"s{index}"
    tmp.mkdir()
    run = start(data, tmp, {}, mode=mode)
    try:
        if cluster_gone:
            consumed(run, data.nseed, "tallyd to consume the seeded events")
            run.kafka.proc.kill()
            run.kafka.proc.wait()
            at = data.nseed
        else:
            end = H.deadline(30)
            while (at := num(run.cli.info(), "messages_consumed")) == 0:
                if time.monotonic() > end:
                    raise Failure("tallyd consumed nothing in 30 s:\n    " + source_log(run))
                time.sleep(0.005)  # poll interval: SIGTERM early in the catch-up
        run.cli.close()
        snapdir = tmp / "snapshots"
        sent_ms = int(time.time() * 1000)
        t0 = time.monotonic()
        run.tallyd.proc.terminate()
        bound = ((CLOSE_TIMEOUT_S if cluster_gone else 0) + 20) * H.MULT
        try:
            rc = run.tallyd.proc.wait(bound)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        log = run.tallyd.log_path.read_text(errors="replace")
        m = Mismatches()
        m.eq(rc, 0, f"exit status {took:.1f} s after SIGTERM (None: still running after "
                    f"{bound:.0f} s)")
        m.eq("brokers did not answer within" in log, cluster_gone,
             "the log says the brokers did not answer the close")
        finals = [n for n in os.listdir(snapdir) if n.startswith("snapshot-")
                  and n.endswith(".tly") and int(n[len("snapshot-"):-len(".tly")]) >= sent_ms]
        m.check(len(finals) == 1, f"one snapshot created after the SIGTERM (at {sent_ms}), got "
                                  f"{sorted(os.listdir(snapdir))}")
        try:
            m.done()
        except Failure as e:
            raise Failure(f"{e}\n  tallyd log:\n" + run.tallyd.log_tail())
        print(f"  # {mode} mode: exit {rc} {took:.1f} s after SIGTERM "
              f"{'with the cluster gone' if cluster_gone else 'while catching up'} (consumed "
              f"{at} of {data.nseed} seeded messages then)", flush=True)
    finally:
        run.tallyd.close()
        run.kafka.close()


def main():
    suite = H.Suite("kafka_faults")
    tmp = H.make_tmpdir("tly-faults-")
    t = time.monotonic()
    try:
        H.check_binaries(H.TALLYD, H.MOCKKAFKA)
        data = Data(tmp)
    except Exception as e:
        suite.fail_setup("kafka_faults_setup_generates_events_and_ground_truth", e)
        return H.finish(suite, tmp)
    print(f"# {data.produced} events ({data.nseed} seeded, {NSTREAM} streamed), "
          f"{len(data.cmds)} queries per scenario, ASOF={data.asof}; setup "
          f"{time.monotonic() - t:.1f} s", flush=True)
    only = os.environ.get("TLY_FAULTS_ONLY")
    scenarios = SCENARIOS + (EXTRA_SCENARIOS if os.environ.get("TLY_FAULTS_EXTRA") else [])
    for index, (name, fault, properties) in enumerate(scenarios):
        if only and only not in name:
            continue
        suite.run(name, scenario, data, index, fault, properties, tmp)
    sigterms = [(f"sigterm_while_catching_up_drops_queued_messages_exits_0_{mode}", mode, False)
                for mode in ("replica", "shard")]
    sigterms += [(f"sigterm_with_the_cluster_gone_exits_after_the_close_deadline_{mode}", mode,
                  True) for mode in ("replica", "shard")]
    for index, (name, mode, gone) in enumerate(sigterms, start=len(scenarios)):
        if not only or only in name:
            suite.run(name, sigterm_scenario, data, index, mode, tmp, gone)
    print(f"# {time.monotonic() - t:.1f} s in all", flush=True)
    return H.finish(suite, tmp)


if __name__ == "__main__":
    sys.exit(main())
