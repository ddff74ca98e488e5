#!/usr/bin/env python3
"""Disk faults on snapshot writes, against a real Apache Kafka broker
(scripts/kafka.sh) and a real tallyd whose system calls are tampered with by
strace (-e inject): while fsync(2) fails with EIO, and then with ENOSPC,
every snapshot attempt fails; the failure is counted (INFO persistence
snapshots_failed, last_snapshot_error) and logged (ERROR lines naming the
cause), the snapshots already on disk stay byte for byte what they were, no
temp file is left behind, the consumer group's committed offsets stay where
the last durable snapshot put them, and tallyd goes on consuming and
answering with exact values. Once the fault is gone (strace detaches), the
next snapshot is written, its offsets are committed up to the end of the
topic, and it restores exactly after a crash.

What the injections simulate. EIO on fsync: a device that fails while the
page cache is written back, which Linux reports at fsync (the common place
an I/O error surfaces for buffered writes). ENOSPC on fsync: a disk that
fills up during writeback; fsync(2) lists ENOSPC, and on thin-provisioned
volumes, NFS and other filesystems with deferred allocation the space runs
out after write(2) succeeded. Only fsync is tampered with because it is the
one system call that nothing but the snapshot writer makes (the temp file
and the directory; tly_snap_prune's directory fsync runs only after a
successful writer): write(2) is also tallyd's logging and librdkafka's
wake-ups, and strace counts `when=` per process, so it cannot pick out the
writer's writes. ENOSPC returned by write(2) itself, short writes and
zero-byte writes are covered by tests/unit/test_snapfile.c's write hook.

Sequence (one topic, e2e.py's seeded stream cut into four batches, one
consumer group throughout, one snapshot directory, snapshot.every 1s):
  1. tallyd runs normally over batch 1, writes periodic snapshots, and on
     SIGTERM a final one; its offsets are committed (the batch's ends).
     Those files and offsets are "the good state".
  2. tallyd restarts under `strace -e inject=fsync:error=EIO`: it restores
     the good snapshot, consumes batch 2, and every snapshot fails; checked
     as above. SIGTERM then makes the final snapshot fail too: exit 1,
     nothing committed, the good files intact.
  3. tallyd restarts under `strace -e inject=fsync:error=ENOSPC`: it restores
     the good snapshot again (the failed ones left nothing usable), replays
     batch 2 and consumes batch 3; every snapshot fails; checked again.
  4. strace is sent SIGTERM: it detaches and tallyd runs on untraced (the
     disk "came back"). Batch 4 is produced; a snapshot is written, newer
     than the good ones, and the offsets are committed up to the ends.
  5. tallyd is killed (SIGKILL, no final snapshot) and restarted without
     strace: it restores that snapshot and every value is exact.
Values are compared with e2e.py's ground truth of the batches produced so
far (every FEATURES of every user and pin, every user's RECENT).

strace runs with -D (as tallyd's grandchild, so tallyd stays this test's
child) and -I1 (so SIGTERM makes it detach); -f follows the forked writers.
When ptrace is not permitted here, the test fails saying so.

Run: TLY_KAFKA_BOOTSTRAP=host:port /usr/bin/python3
tests/integration/kafka_diskfault.py (without it, a broker is started for
the run; see kafka_common.py).
"""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import kafka_common as K  # noqa: E402
from harness import Failure, Mismatches  # noqa: E402
from kafka_common import E  # noqa: E402

PARTITIONS = 8
NEVENTS = 24_000           # well-formed events (e2e.py's malformed ones on top)
CUTS = (0.5, 0.7, 0.85)    # where batches 2, 3 and 4 start, as fractions of the lines
LEAD_MS = 240_000          # ASOF is this far after the start (ingest must end before it)
SNAPSHOT_EVERY = "1s"
SNAPSHOT_KEEP = 3
SEED = E.SEED + 404
STRACE = shutil.which("strace")
SNAP_NAME = re.compile(r"snapshot-(\d+)\.tly")
TMP_NAME = re.compile(r"\.tmp-(\d+)-(\d+)\.tly")


class Run:
    pass


# ------------------------------------------------------------------ helpers

def committed_offsets(r):
    """{partition: offset} the consumer group has committed (a negative
    offset: none)."""
    keys = [(r.topic, p) for p in range(PARTITIONS)]
    return {p: off for (_, p), off in K.committed(r.bootstrap, r.group, keys).items()}


def wait_committed(r, want, seconds=20):
    """Polls the committed offsets until they equal want (commits are
    asynchronous). Returns the seconds it took."""
    t0 = time.monotonic()
    end = H.deadline(seconds)
    while True:
        got = committed_offsets(r)
        if got == want:
            return time.monotonic() - t0
        if time.monotonic() > end:
            raise Failure(f"committed offsets of group {r.group}: {got}, want {want}")
        time.sleep(0.2)  # poll interval of a deadline-bounded wait


def ends(r):
    """The end offset of every partition after the batches produced so far."""
    return {p: r.per_part.get(p, 0) for p in range(PARTITIONS)}


def produce_batch(r, i):
    lo, hi = r.bounds[i], r.bounds[i + 1]
    recs = K.records(r.events[lo:hi], r.lines[lo:hi], r.asof - E.HOUR)
    for p, n in K.produce(r.bootstrap, r.topic, recs).items():
        r.per_part[p] = r.per_part.get(p, 0) + n
    r.nproduced = hi


def snapshot_files(r):
    """{name: sha256} of the snapshot files in the directory."""
    out = {}
    for name in sorted(os.listdir(r.snapdir)):
        if SNAP_NAME.fullmatch(name):
            out[name] = hashlib.sha256((r.snapdir / name).read_bytes()).hexdigest()
    return out


def process_alive(pid):
    """Whether pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def leftover_temp_files(r):
    """Temp files whose writer is gone: a writer that fails removes its temp
    file before it exits, one that succeeds renames it, so a temp file of a
    process that no longer runs was left behind. (A running writer's temp
    file is legitimate.)"""
    out = []
    for name in sorted(os.listdir(r.snapdir)):
        m = TMP_NAME.fullmatch(name)
        if m and not process_alive(int(m.group(2))) and (r.snapdir / name).exists():
            out.append(name)
    return out


def info(t):
    c = t.client()
    try:
        return c.info()
    finally:
        c.close()


def persistence(i):
    keys = ("snapshots_written", "snapshots_failed", "snapshot_in_progress", "last_snapshot_ms",
            "last_snapshot_error", "restored_snapshot_ms", "snapshots_rejected")
    return ", ".join(f"{k}={i.get(k)}" for k in keys)


def wait_info(t, cond, what, seconds=30):
    end = H.deadline(seconds)
    while True:
        if t.proc.poll() is not None:
            raise Failure(f"tallyd exited with {t.proc.returncode} while waiting for {what}:\n"
                          + t.log_tail())
        i = info(t)
        if cond(i):
            return i
        if time.monotonic() > end:
            raise Failure(f"waited {seconds * H.MULT:.0f} s for {what}; INFO: {persistence(i)}\n"
                          + t.log_tail())
        time.sleep(0.1)  # poll interval of a deadline-bounded wait


def num(i, key):
    return int(i.get(key, "-1"))


def positions(i, topic):
    out = {}
    for p in range(PARTITIONS):
        v = i.get(f"partition_{topic}_{p}", "")
        parts = dict(x.split("=", 1) for x in v.split(",")) if v else {}
        out[p] = int(parts.get("position", "-1"))
    return out


def tracer_pid(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def log_lines(t, level, *needles):
    """tallyd's log lines at level containing every needle."""
    text = t.log_path.read_text(errors="replace")
    return [ln for ln in text.splitlines()
            if f" {level} " in ln and all(n in ln for n in needles)]


def write_config(r, name):
    port = H.free_port()
    path, cfg = K.write_config(r.tmp, r.bootstrap, port, r.topic, "replica", "earliest",
                               K.FEATURES, name=name, group=r.group)
    cfg["snapshot"] = {"dir": str(r.snapdir), "every": SNAPSHOT_EVERY, "keep": SNAPSHOT_KEEP}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    r.cfg = cfg
    return path, port


class TracedTallyd(H.Tallyd):
    """tallyd under `strace -D -I1 -f -e trace=fsync -e inject=fsync:error=ERR`:
    the Popen'd process execs tallyd (its pid is tallyd's), strace runs as
    its grandchild (TracerPid) and detaches on SIGTERM."""

    def __init__(self, config_path, port, tmpdir, name, errno_name):
        self.port = port
        self.ping_ok = ("PONG",)
        self.log_path = Path(tmpdir) / f"{name}.log"
        self.log = open(self.log_path, "w")
        if STRACE is None:
            raise Failure("strace is not installed (scripts/deps.sh installs it): this test "
                          "injects the disk faults with it")
        # -qq: no attach/exit notices; -o /dev/null: the trace itself is not
        # needed; -e trace=fsync: only fsync is traced and so injectable.
        self.proc = H.spawn([STRACE, "-D", "-I1", "-f", "-qq", "-o", "/dev/null",
                             "-e", "trace=fsync", "-e", f"inject=fsync:error={errno_name}",
                             H.TALLYD, "--config", config_path],
                            stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        try:
            self._wait_serving()
        except RuntimeError as e:
            raise Failure(f"tallyd did not start under strace (is ptrace permitted here? "
                          f"strace's errors are in the log): {e}")
        self.tracer = tracer_pid(self.pid)
        if self.tracer == 0:
            raise Failure("strace did not attach to tallyd (TracerPid 0): ptrace is not "
                          "permitted in this environment (seccomp, missing CAP_SYS_PTRACE or "
                          "kernel.yama.ptrace_scope), and this test needs it to inject the "
                          "faults:\n" + self.log_tail())

    def detach(self):
        """SIGTERM to strace: it detaches and exits; tallyd runs on."""
        try:
            comm = Path(f"/proc/{self.tracer}/comm").read_text().strip()
        except OSError:
            comm = ""
        if comm != "strace":
            raise Failure(f"tallyd's tracer {self.tracer} is {comm!r}, not strace")
        os.kill(self.tracer, signal.SIGTERM)
        end = H.deadline(10)
        while tracer_pid(self.pid) != 0 or process_alive(self.tracer):
            if time.monotonic() > end:
                raise Failure(f"strace (pid {self.tracer}) did not detach within "
                              f"{10 * H.MULT:.0f} s of SIGTERM")
            time.sleep(0.05)  # poll interval of a deadline-bounded wait


# ------------------------------------------------------------------ values

def model(r, nlines):
    if nlines not in r.models:
        r.models[nlines] = E.Model(r.cfg, r.events[:nlines], r.asof, r.t0)
    return r.models[nlines]


def compare_values(r, t, nlines):
    """Every FEATURES of every user and pin and every user's RECENT against
    the ground truth of the first nlines lines."""
    mod = model(r, nlines)
    cmds, wants = [], []
    for entity, ids in (("user", r.users), ("pin", r.pins)):
        for i in ids:
            cmds.append(("FEATURES", entity, i, "ASOF", r.asof))
            wants.append(E.resp2_pairs(mod.features(entity, i)))
    for i in r.users:
        cmds.append(("RECENT", "user", i, "recent", "ASOF", r.asof))
        wants.append(mod.recent("user", i, "recent"))
    c = t.client(timeout=60)
    try:
        got = E.batched(c, cmds)
    finally:
        c.close()
    m = Mismatches()
    m.check(int(time.time() * 1000) < r.asof,
            f"the comparison ran after ASOF {r.asof} (machine too slow? raise LEAD_MS)")
    bad = sum(1 for g, w in zip(got, wants) if not H.same(g, w))
    if bad:
        m.add(f"{bad} of {len(cmds)} replies differ from the ground truth of {nlines} lines")
    for cmd, g, w in zip(cmds, got, wants):
        m.eq(g, w, " ".join(map(str, cmd)))
    m.done()
    return len(cmds)


def wait_ingested(r, t, consumed):
    """Waits until tallyd consumed `consumed` messages since it started and
    every partition is at the end of what was produced."""
    K.wait_caught_up(t, consumed, seconds=60)
    want = ends(r)
    return wait_info(t, lambda i: positions(i, r.topic) == want,
                     f"every partition's position to reach {want}", seconds=20)


# ------------------------------------------------------------------ setup

def setup():
    H.check_binaries(H.TALLYD)
    r = Run()
    r.t0 = int(time.time() * 1000)
    r.asof = (r.t0 + LEAD_MS) // 1000 * 1000
    r.tmp = H.make_tmpdir("tly-kafka-diskfault-")
    r.snapdir = Path(r.tmp) / "snapshots"
    r.bootstrap = K.broker()
    r.topic = K.topic_name("tly-diskfault")
    r.group = f"tly-diskfault-{K.RUN_ID}"
    K.create_topic(r.bootstrap, r.topic, PARTITIONS)
    r.events, r.lines, users, pins = E.generate(r.asof, nevents=NEVENTS, seed=SEED)
    r.users = users + E.UNKNOWN_USERS
    r.pins = pins + E.UNKNOWN_PINS
    n = len(r.lines)
    r.bounds = [0] + [int(n * f) for f in CUTS] + [n]
    r.per_part = {}
    r.nproduced = 0
    r.models = {}
    r.tallyd = None
    r.stale_tmp = []
    return r


# ------------------------------------------------------------------ steps

def first_run(r):
    """Batch 1 through a normal tallyd: periodic snapshots, then the final
    one on SIGTERM, exit 0, offsets committed up to the batch's ends."""
    produce_batch(r, 0)
    path, port = write_config(r, "tallyd-1")
    t = r.tallyd = K.Tallyd(path, port, r.tmp, name="tallyd-1")
    wait_ingested(r, t, r.nproduced)
    i = wait_info(t, lambda i: num(i, "snapshots_written") >= 1, "a periodic snapshot")
    m = Mismatches()
    m.eq(num(i, "snapshots_failed"), 0, "INFO snapshots_failed")
    rc = t.close()
    r.tallyd = None
    m.eq(rc, 0, "tallyd's exit status on SIGTERM")
    m.check(log_lines(t, "INFO", "snapshot: final snapshot"),
            "no 'snapshot: final snapshot' line in the log")
    m.done()
    r.good = snapshot_files(r)
    if not r.good:
        raise Failure(f"no snapshot file in {r.snapdir} after the first run")
    r.good_newest = max(r.good)
    r.good_ms = int(SNAP_NAME.fullmatch(r.good_newest).group(1))
    r.good_ends = ends(r)
    secs = wait_committed(r, r.good_ends)
    print(f"  # {r.nproduced} messages; {len(r.good)} snapshot file(s), newest "
          f"{r.good_newest}; offsets committed ({secs:.1f} s after exit): {r.good_ends}",
          flush=True)


def fault_start(r, errno_name, name, batch):
    """Restarts tallyd under the injection, produces the next batch and waits
    until it is consumed and a snapshot covering it has failed."""
    path, port = write_config(r, name)
    t = r.tallyd = TracedTallyd(path, port, r.tmp, name, errno_name)
    i = info(t)
    m = Mismatches()
    m.eq(i.get("restored_snapshot_ms"), str(r.good_ms),
         "INFO restored_snapshot_ms (the newest good snapshot)")
    m.eq(i.get("snapshots_rejected"), "0", "INFO snapshots_rejected")
    m.done()
    produce_batch(r, batch)
    # Resumed at the good snapshot's positions: everything after them again.
    r.fault_consumed = r.nproduced - r.bounds[1]
    r.fault_info_ingested = wait_ingested(r, t, r.fault_consumed)
    r.fault_ingested_ms = int(time.time() * 1000)
    # A snapshot started after the catch-up covers positions past the good
    # snapshot's: wait for two failures, at least one of them started after.
    before = num(info(t), "snapshots_failed")
    r.fault_info = wait_info(
        t, lambda i: num(i, "snapshots_written") > 0
        or (num(i, "snapshots_failed") >= max(2, before + 2)),
        f"snapshot failures under injected {errno_name}")
    if num(r.fault_info, "snapshots_written") > 0:
        raise Failure(f"a snapshot succeeded under injected fsync {errno_name}: the injection "
                      f"did not take effect; INFO: {persistence(r.fault_info)}")
    print(f"  # tallyd {t.pid} traced by strace {t.tracer}; {r.fault_consumed} messages "
          f"consumed since the restore; INFO: {persistence(r.fault_info)}", flush=True)


def check_counted_and_logged(r, errno_text):
    """INFO counts the failures; the log has the writer's ERROR line naming
    the cause and the parent's ERROR line saying the previous snapshot
    stays."""
    t, i = r.tallyd, r.fault_info
    m = Mismatches()
    m.eq(num(i, "snapshots_written"), 0, "INFO snapshots_written")
    m.check(num(i, "snapshots_failed") >= 2, f"INFO snapshots_failed {i.get('snapshots_failed')}")
    m.check(i.get("last_snapshot_error", "") != "", "INFO last_snapshot_error is empty")
    m.eq(i.get("last_snapshot_ms"), "-1", "INFO last_snapshot_ms (none written by this process)")
    writer = log_lines(t, "ERROR", "snapshot: writer: cannot sync snapshot file", errno_text)
    m.check(len(writer) >= 2,
            f"{len(writer)} ERROR line(s) 'snapshot: writer: cannot sync snapshot file ...: "
            f"{errno_text}', want one per failed writer (>= 2)")
    # The writer is the forked child: its line carries its own pid, which is
    # also in its temp file's name.
    for ln in writer[:3]:
        m.check(f"tallyd[{t.pid}]" not in ln and re.search(r"tallyd\[(\d+)\].*\.tmp-\d+-\1\.tly",
                                                            ln) is not None,
                f"the writer's line is not from the forked writer: {ln}")
    parent = log_lines(t, "ERROR", f"tallyd[{t.pid}]", "snapshot: ",
                       "the previous snapshot stays in place and offsets are not committed "
                       "past it")
    m.check(len(parent) >= num(i, "snapshots_failed"),
            f"{len(parent)} ERROR line(s) of tallyd saying the previous snapshot stays, for "
            f"{i.get('snapshots_failed')} failures")
    m.done()


def check_error_names_cause(r, errno_text):
    """INFO last_snapshot_error gives the reason a periodic snapshot failed
    (the errno's text), not only that it failed."""
    got = info(r.tallyd).get("last_snapshot_error", "")
    if errno_text not in got:
        raise Failure(f"INFO last_snapshot_error is {got!r}: it does not name the cause "
                      f"({errno_text!r}; the log has it)")


def check_files_intact(r):
    """The snapshot files on disk are exactly the good ones, byte for byte,
    and no failed writer left its temp file. (A writer killed when a
    previous tallyd stopped may have left one: r.stale_tmp; the next
    successful snapshot's prune removes those.)"""
    m = Mismatches()
    now = snapshot_files(r)
    m.eq(sorted(now), sorted(r.good), "snapshot files in the directory")
    for name, sha in r.good.items():
        if name in now:
            m.eq(now[name], sha, f"sha256 of {name}")
    m.eq([f for f in leftover_temp_files(r) if f not in r.stale_tmp], [],
         "temp files whose writer has exited")
    m.done()


def check_serving_exact(r):
    """tallyd consumed from the good snapshot's positions and answers every
    query with the ground truth of everything produced so far."""
    t = r.tallyd
    m = Mismatches()
    i = r.fault_info_ingested
    m.eq(num(i, "messages_consumed"), r.fault_consumed,
         "INFO messages_consumed (resumed at the good snapshot's positions)")
    m.eq(positions(i, r.topic), ends(r), "INFO partition positions")
    m.check(r.fault_ingested_ms < r.asof, f"ingest ended at {r.fault_ingested_ms}, after ASOF")
    m.done()
    n = compare_values(r, t, r.nproduced)
    print(f"  # {n} queries exact over {r.nproduced} lines", flush=True)


def check_offsets_not_committed(r):
    """The group's committed offsets are still the good snapshot's, though
    tallyd consumed past them and failed snapshots covered more."""
    got = committed_offsets(r)
    if got != r.good_ends:
        raise Failure(f"committed offsets {got} moved from the good snapshot's {r.good_ends} "
                      f"(tallyd's positions: {ends(r)}) although no snapshot was durable")


def final_fails(r):
    """SIGTERM under the injection: the final snapshot fails, tallyd exits 1
    with the cause logged, the good files stay, nothing is committed."""
    t = r.tallyd
    rc = t.close()
    r.tallyd = None
    m = Mismatches()
    m.eq(rc, 1, "tallyd's exit status when the final snapshot fails")
    m.check(log_lines(t, "ERROR", f"tallyd[{t.pid}]", "snapshot: cannot sync snapshot file",
                      "Input/output error", "the previous snapshot stays in place"),
            "no ERROR line 'snapshot: cannot sync snapshot file ...: Input/output error; the "
            "previous snapshot stays in place ...' from the final snapshot")
    # The final snapshot removes its own temp file; a periodic writer killed
    # at shutdown (PR_SET_PDEATHSIG) may leave one, for the next prune.
    left = leftover_temp_files(r)
    m.eq([f for f in left if f.endswith(f"-{t.pid}.tly")], [], "the final snapshot's temp file")
    r.stale_tmp = [f for f in left if not f.endswith(f"-{t.pid}.tly")]
    m.done()
    check_files_intact(r)
    check_offsets_not_committed(r)


def recover(r):
    """strace detaches; tallyd runs on and serves; with nothing new to
    consume, the next period writes the snapshot that failed (a failed one is
    not "nothing new since the last"); batch 4 arrives."""
    t = r.tallyd
    t.detach()
    if t.proc.poll() is not None:
        raise Failure(f"tallyd exited with {t.proc.returncode} when strace detached:\n"
                      + t.log_tail())
    c = t.client()
    try:
        pong = c.cmd("PING")
    finally:
        c.close()
    if pong != "PONG":
        raise Failure(f"PING after strace detached: {pong!r}")
    # Writers run one at a time, each reaped (and a failure counted) before
    # the next starts: once one succeeded, every failure before it is counted.
    i = wait_info(t, lambda i: num(i, "snapshots_written") >= 1,
                  "a snapshot to be written with no new message since the failed ones")
    r.rec_failed = num(i, "snapshots_failed")
    produce_batch(r, 3)
    r.rec_consumed = r.nproduced - r.bounds[1]
    r.rec_info_ingested = wait_ingested(r, t, r.rec_consumed)
    r.rec_ingested_ms = int(time.time() * 1000)
    print(f"  # strace detached; {r.rec_consumed} messages consumed since the restore; "
          f"INFO: {persistence(i)}", flush=True)


def check_recovered_committed(r):
    """Offsets are committed only for a durable snapshot: reaching the ends
    means one covering every message was written."""
    secs = wait_committed(r, ends(r))
    print(f"  # offsets committed up to the ends {ends(r)} within {secs:.1f} s", flush=True)


def check_recovered_snapshot(r):
    """The newest snapshot is durable and newer than the good ones, no
    failure was counted after the first success, which cleared
    last_snapshot_error, and no temp file left by earlier runs is there."""
    i = info(r.tallyd)
    m = Mismatches()
    ms = int(i.get("last_snapshot_ms", "-1"))
    name = f"snapshot-{ms:013d}.tly"
    m.check(ms > r.good_ms, f"INFO last_snapshot_ms {ms} is not newer than {r.good_ms}")
    m.eq(i.get("last_snapshot_path"), str(r.snapdir / name), "INFO last_snapshot_path")
    m.check((r.snapdir / name).is_file(), f"{name} is not in {r.snapdir}")
    files = snapshot_files(r)
    m.eq(max(files) if files else None, name, "the newest snapshot file")
    m.check(len(files) <= SNAPSHOT_KEEP, f"{len(files)} snapshot files, keep is {SNAPSHOT_KEEP}")
    m.eq(num(i, "snapshots_failed"), r.rec_failed,
         "INFO snapshots_failed (none after the first snapshot written untraced)")
    m.eq(i.get("last_snapshot_error", ""), "",
         "INFO last_snapshot_error (cleared by the snapshot written)")
    m.eq(leftover_temp_files(r), [],
         f"temp files whose writer has exited (left by earlier runs: {r.stale_tmp})")
    m.done()


def check_recovered_exact(r):
    m = Mismatches()
    i = r.rec_info_ingested
    m.eq(num(i, "messages_consumed"), r.rec_consumed, "INFO messages_consumed")
    m.eq(positions(i, r.topic), ends(r), "INFO partition positions")
    m.check(r.rec_ingested_ms < r.asof, f"ingest ended at {r.rec_ingested_ms}, after ASOF")
    m.done()
    n = compare_values(r, r.tallyd, r.nproduced)
    print(f"  # {n} queries exact over {r.nproduced} lines", flush=True)


def failed_snapshot_retried(r):
    """After snapshots succeeded, one that fails (its directory replaced by a
    file) is tried again at the next period although nothing new arrived
    since: a failure is not "nothing new since the last snapshot". The
    messages that make it due are rejected ones (not JSON), so the values
    the later steps check stay the stream's."""
    t = r.tallyd
    i = info(t)
    written, failed = num(i, "snapshots_written"), num(i, "snapshots_failed")
    aside = r.snapdir.with_name(r.snapdir.name + ".aside")
    r.snapdir.rename(aside)
    try:
        r.snapdir.write_text("not a directory\n")
        recs = [(f"retry-{k}", f"not json {k}", r.asof - E.HOUR) for k in range(8)]
        for p, n in K.produce(r.bootstrap, r.topic, recs).items():
            r.per_part[p] = r.per_part.get(p, 0) + n
        wait_info(t, lambda i: num(i, "snapshots_failed") > failed,
                  "a snapshot to fail with its directory gone")
    finally:
        if r.snapdir.is_file():
            r.snapdir.unlink()
        aside.rename(r.snapdir)
    wait_info(t, lambda i: num(i, "snapshots_written") > written,
              "the failed snapshot to be tried again with no new message since")
    check_recovered_committed(r)


def crash_and_restore(r):
    """SIGKILL (no final snapshot), restart without strace: the newest
    snapshot, written after the fault and covering every message, restores;
    nothing is consumed again and every value is exact."""
    t = r.tallyd
    newest = max(snapshot_files(r))
    t.proc.kill()
    t.proc.wait()
    H.stop(t.proc)
    t.log.close()
    r.tallyd = None
    path, port = write_config(r, "tallyd-4")
    t = r.tallyd = K.Tallyd(path, port, r.tmp, name="tallyd-4")
    m = Mismatches()
    i = info(t)
    m.eq(i.get("restored_snapshot_ms"), str(int(SNAP_NAME.fullmatch(newest).group(1))),
         f"INFO restored_snapshot_ms (the newest file, {newest})")
    m.eq(i.get("snapshots_rejected"), "0", "INFO snapshots_rejected")
    i = wait_ingested(r, t, 0)
    m.eq(num(i, "messages_consumed"), 0, "INFO messages_consumed after the restore")
    m.done()
    n = compare_values(r, t, r.nproduced)
    rc = t.close()
    r.tallyd = None
    if rc != 0:
        raise Failure(f"tallyd exited with {rc} on SIGTERM:\n" + t.log_tail())
    print(f"  # restored {newest}; {n} queries exact", flush=True)


def steps():
    """(name, function, critical): a critical step failing ends the run (the
    later ones depend on it)."""
    eio, enospc = "Input/output error", "No space left on device"
    return [
        ("first_run_writes_snapshots_commits_their_offsets_exits_0", first_run, True),
        ("eio_restart_under_strace_restores_good_snapshot_and_snapshots_fail",
         lambda r: fault_start(r, "EIO", "tallyd-2", 1), True),
        ("eio_failures_counted_in_info_and_logged_with_the_cause",
         lambda r: check_counted_and_logged(r, eio), False),
        ("eio_info_last_snapshot_error_names_the_cause",
         lambda r: check_error_names_cause(r, eio), False),
        ("eio_previous_snapshots_stay_byte_identical_no_temp_files_left", check_files_intact,
         False),
        ("eio_tallyd_keeps_consuming_and_answers_exactly", check_serving_exact, False),
        ("eio_offsets_not_committed_past_the_good_snapshot", check_offsets_not_committed, False),
        ("eio_final_snapshot_fails_exit_1_good_files_kept_nothing_committed", final_fails, False),
        ("enospc_restart_under_strace_restores_good_snapshot_and_snapshots_fail",
         lambda r: fault_start(r, "ENOSPC", "tallyd-3", 2), True),
        ("enospc_failures_counted_in_info_and_logged_with_the_cause",
         lambda r: check_counted_and_logged(r, enospc), False),
        ("enospc_info_last_snapshot_error_names_the_cause",
         lambda r: check_error_names_cause(r, enospc), False),
        ("enospc_previous_snapshots_stay_byte_identical_no_temp_files_left", check_files_intact,
         False),
        ("enospc_tallyd_keeps_consuming_and_answers_exactly", check_serving_exact, False),
        ("enospc_offsets_not_committed_past_the_good_snapshot", check_offsets_not_committed,
         False),
        ("space_returns_strace_detaches_tallyd_serves_and_writes_a_snapshot", recover, True),
        ("space_returns_offsets_committed_up_to_the_ends", check_recovered_committed, False),
        ("space_returns_new_snapshot_newer_durable_temp_files_pruned",
         check_recovered_snapshot, False),
        ("space_returns_values_exact", check_recovered_exact, False),
        ("failed_snapshot_retried_at_the_next_period_without_new_messages",
         failed_snapshot_retried, False),
        ("space_returns_snapshot_restores_exactly_after_sigkill", crash_and_restore, False),
    ]


def main():
    suite = H.Suite("kafka_diskfault")
    t = time.monotonic()
    try:
        r = setup()
    except Exception as e:
        suite.fail_setup("kafka_diskfault_setup_topic_and_events", e)
        return suite.finish()
    print(f"# broker {r.bootstrap}, topic {r.topic}: {len(r.lines)} lines in 4 batches "
          f"{[b - a for a, b in zip(r.bounds, r.bounds[1:])]}; ASOF={r.asof}; snapshots in "
          f"{r.snapdir}", flush=True)
    todo = steps()
    for k, (name, fn, critical) in enumerate(todo):
        ok = suite.run(name, fn, r)
        if not ok and r.tallyd is not None and r.tallyd.proc.poll() is not None:
            suite.fail_setup(f"{name}_tallyd_alive",
                             f"tallyd exited with {r.tallyd.proc.returncode}:\n"
                             + r.tallyd.log_tail())
            critical = True
        if not ok and critical:
            for later, _, _ in todo[k + 1:]:
                suite.fail_setup(later, f"not run: {name} failed")
            break
    if r.tallyd is not None:
        r.tallyd.close()
    print(f"# {time.monotonic() - t:.1f} s", flush=True)
    return H.finish(suite, r.tmp)


if __name__ == "__main__":
    sys.exit(main())
