#!/usr/bin/python3
"""restart.py — restart-to-ready time of tallyd from a snapshot against a
rebuild from Kafka history, what writing a snapshot costs (write time, size,
the ingest pause of the fork), and the same restart for redis-server from an
RDB file of a comparable dataset.

Stream. ENTITIES users (1,000,000; --quick: 100,000), each with 1 or 2
events shaped like config/demo.yaml's stream ({"user_id", "pin_id",
"action", "dwell_ms", "ts"}: impression / closeup / click / save / hide at
70 / 15 / 9 / 4 / 2 %, dwell_ms on 92 % of non-hide events), pins Zipf(1.0)
over --pins ids, event times uniform over the last 55 minutes (nothing is
late for any window). Preloaded, keyed by user id (murmur2_random, lz4),
into a new topic of --partitions partitions on a real broker
(scripts/kafka.sh); checked: the high watermarks sum to the events produced.
Then a bare consumer reads the whole topic once, untimed, so that run A
does not pay alone for the broker's first reads.

Runs, one after the other, each a `tallyd --config <generated>` with the
features of config/demo.yaml, kafka.mode replica, kafka.start window:
  A. rebuild: empty snapshot dir, snapshot.every 1d (none falls due): time
     from spawn to the first INFO poll showing loading:0 (polled every
     --poll-ms, 20), VmRSS then; time until every message is consumed;
     SIGTERM and the time to exit (that writes the final snapshot).
  B. rebuild with snapshot.every 1s in a second empty dir: the same timings
     (the consume rate with periodic snapshots against A's), every fork seen
     (its last_snapshot_pause_us next to VmRSS and VmPTE of that moment);
     then waits for a snapshot started after the last message was consumed,
     reads INFO persistence, and SIGTERMs (final snapshot; time to exit).
  C. restore: B's config and dir again: time from spawn to loading:0,
     restored_entities (must equal B's entity count), messages_consumed once
     ready (should be ~0: the snapshot's positions cover the topic). The
     log's timestamps split the time: snapshot loaded, partitions assigned,
     caught up (readiness needs each partition's high watermark, which
     librdkafka learns from a fetch response; a broker holds a fetch at the
     end of a partition up to fetch.wait.max.ms, 500 by default).
  D. under load: C's tallyd keeps running while a producer (a child process
     of this script) streams --rate events/s into the topic; at least
     --load-snapshots periodic snapshots and --load-seconds seconds; reports
     every fork's pause and the consume rate while a writer runs against
     while none runs.
  C2. restore once more (C's final snapshot) with one more librdkafka
     property, --c2-property (default fetch.wait.max.ms=50; none skips).
  E. peer (unless --no-redis): redis-server, no persistence configured,
     loaded through `redis-cli --pipe` with the state the loader of
     bench/kafka.c keeps for the same events (per user a hash of bucketed
     counts plus last_action and a list for recent; per pin a hash), written
     as one HSET / RPUSH per key; BGSAVE (fork time: latest_fork_usec), SAVE
     (timed), SHUTDOWN NOSAVE, then a new redis-server on the same RDB: time
     from spawn to the first PING answered PONG (not -LOADING).
  F. fork probe (unless --fork-probe-mib ''): a plain python3 process with
     64, 256, 1024, 2048 MiB written times fork() in the parent, 5 times
     each: what page-table copying costs per GiB of RSS on this machine.
Checks: every tallyd run must show each generated user's clicks:7d and
dwell:1d for 20 users (10 busiest, 10 spread) as generated, and the restore
the same entity count; exit status 1 when any check fails.

Children (tallyd, redis-server, the producer) die with this process
(PR_SET_PDEATHSIG) and are stopped on every exit path; their pids go to
--pidfile for the caller's trap. The broker belongs to the caller
(bench/run.sh step_restart).
"""
import argparse
import atexit
import bisect
import calendar
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DEMO_CONFIG = "config/demo.yaml"
ACTIONS = ("impression", "closeup", "click", "save", "hide")
ACTION_CUM = (70, 85, 94, 98, 100)
CHECK_USERS = 20
# Hop of each window under tallyd's default rule, as bench/kafka.c's loader.
HOPS = {"5m": 10000, "1h": 60000, "1d": 300000, "7d": 3600000}

children = []  # subprocess.Popen
opts = None


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Failed(Exception):
    pass


# ---- processes ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(argv, logpath):
    f = open(logpath, "wb")
    p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         preexec_fn=_die_with_parent)
    f.close()
    children.append(p)
    if opts is not None and opts.pidfile:
        with open(opts.pidfile, "a") as pf:
            pf.write("%d %s\n" % (p.pid, os.path.basename(argv[0])))
    return p


def stop(p, sig=signal.SIGTERM, timeout=60.0):
    """Signals p and waits for it (SIGKILL after timeout); returns seconds."""
    if p.poll() is not None:
        return 0.0
    t0 = time.monotonic()
    p.send_signal(sig)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return time.monotonic() - t0


def cleanup():
    for p in children:
        if p.poll() is None:
            p.kill()
            p.wait()


def on_signal(sig, _frame):
    cleanup()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_status(pid):
    """VmRSS and VmPTE of pid in KiB (0 when unreadable)."""
    rss = pte = 0
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmPTE:"):
                    pte = int(line.split()[1])
    except OSError:
        pass
    return rss, pte


def busy_cpu_s():
    """CPU-seconds all CPUs spent busy so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


# ---- a small RESP client ------------------------------------------------------

class RespError(str):
    pass


class Resp:
    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def close(self):
        self.f.close()
        self.sock.close()

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.f.readline()
        if not line:
            raise ConnectionError("connection closed")
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            return RespError(rest.decode())
        if t in (b":", b","):
            return int(rest) if t == b":" else float(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2].decode()
        if t in (b"*", b"%"):
            n = int(rest) * (2 if t == b"%" else 1)
            return None if n < 0 else [self._read() for _ in range(n)]
        if t == b"_":
            return None
        raise ConnectionError("unexpected reply %r" % line)


def info(c, *sections):
    r = c.call("INFO", *sections)
    if isinstance(r, RespError) or r is None:
        raise Failed("INFO replied %r" % r)
    d = {}
    for line in r.split("\r\n"):
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            d[k] = v
    return d


def geti(d, k):
    try:
        return int(d.get(k, "-1"))
    except ValueError:
        return -1


# ---- the stream ---------------------------------------------------------------

def generate(n_users, n_pins, seed):
    """Returns (payloads, keys, events, gt, check_ids, entities expected)."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    weights = [0.0] * n_pins
    acc = 0.0
    for k in range(n_pins):
        acc += (k + 1) ** -1.0
        weights[k] = acc
    n_events = 0
    per_user = [1 + (rng.random() < 0.5) for _ in range(n_users)]
    n_events = sum(per_user)
    pin_ranks = rng.choices(range(n_pins), cum_weights=weights, k=n_events)
    payloads, keys, events = [], [], []
    gt = {}  # user id -> [clicks, dwell sum]
    e = 0
    rnd = rng.random
    for i in range(n_users):
        uid = (i * 2654435761) % n_users + 1  # a permutation of 1..n (prime multiplier)
        key = str(uid).encode()
        clicks = dwell_sum = 0
        for _ in range(per_user[i]):
            pin = (pin_ranks[e] * 2654435761) % n_pins + 1
            e += 1
            a = bisect.bisect_right(ACTION_CUM, int(rnd() * 100))
            ts = now - 1000 - int(rnd() * (55 * 60 * 1000))
            if a != 4 and rnd() < 0.92:
                dwell = 100 + int(rnd() * 29900)
                payloads.append(('{"user_id": %d, "pin_id": %d, "action": "%s", "dwell_ms": %d, '
                                 '"ts": %d}' % (uid, pin, ACTIONS[a], dwell, ts)).encode())
                dwell_sum += dwell
            else:
                dwell = -1
                payloads.append(('{"user_id": %d, "pin_id": %d, "action": "%s", "ts": %d}'
                                 % (uid, pin, ACTIONS[a], ts)).encode())
            keys.append(key)
            events.append((uid, pin, a, dwell, ts))
            clicks += a == 2
        gt[uid] = (clicks, dwell_sum)
    busiest = sorted(gt, key=lambda u: (-gt[u][0], u))[:CHECK_USERS // 2]
    spread = [(k * n_users) // (CHECK_USERS // 2) + 1 for k in range(CHECK_USERS // 2)]
    check_ids = busiest + [u for u in spread if u not in busiest]
    return payloads, keys, events, gt, check_ids


def preload(bootstrap, topic, partitions, payloads, keys):
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, partitions, 1)])[topic]
    fut.result(30)
    errors = []
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                  "linger.ms": 20, "batch.num.messages": 10000, "compression.type": "lz4",
                  "queue.buffering.max.messages": 1000000,
                  "queue.buffering.max.kbytes": 1048576,
                  "error_cb": lambda err: errors.append(str(err))})
    produce = p.produce
    for i in range(len(payloads)):
        while True:
            try:
                produce(topic, payloads[i], keys[i])
                break
            except BufferError:
                p.poll(0.01)
        if i % 10000 == 0:
            p.poll(0)
    left = p.flush(300)
    if left:
        raise Failed("preload: %d messages not delivered (%s)" % (left, errors[:3]))
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "tly-bench-restart-check"})
    held = sum(c.get_watermark_offsets(TopicPartition(topic, k), timeout=10)[1]
               for k in range(partitions))
    c.close()
    if held != len(payloads):
        raise Failed("the broker holds %d messages of %s, produced %d"
                     % (held, topic, len(payloads)))


def warm_read(bootstrap, topic, partitions, total):
    """Reads the whole topic once, untimed by the runs, so the first tallyd
    run does not pay for the broker's first reads (JIT, page cache);
    returns seconds."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "tly-bench-restart-warm",
                  "enable.auto.commit": False, "queued.min.messages": 1000000})
    c.assign([TopicPartition(topic, k, 0) for k in range(partitions)])
    t0 = time.monotonic()
    seen = 0
    while seen < total and time.monotonic() - t0 < 120:
        seen += len(c.consume(10000, 1.0))
    c.close()
    if seen < total:
        raise Failed("warm-up read: %d of %d messages in 120 s" % (seen, total))
    return time.monotonic() - t0


def steady_producer(argv):
    """--steady-producer BOOTSTRAP TOPIC RATE USERS PINS: produces RATE
    events/s (paced against the monotonic clock) until SIGTERM, then flushes
    and prints `produced N seconds S`."""
    from confluent_kafka import Producer
    bootstrap, topic, rate, users, pins = argv[0], argv[1], float(argv[2]), int(argv[3]), \
        int(argv[4])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                  "linger.ms": 5, "compression.type": "lz4"})
    rng = random.Random(7)
    sent = 0
    t0 = time.monotonic()
    while not stopping:
        due = int((time.monotonic() - t0) * rate)
        while sent < due:
            uid = rng.randrange(1, users + 1)
            a = bisect.bisect_right(ACTION_CUM, rng.randrange(100))
            v = ('{"user_id": %d, "pin_id": %d, "action": "%s", "dwell_ms": %d, "ts": %d}'
                 % (uid, rng.randrange(1, pins + 1), ACTIONS[a], rng.randrange(100, 30000),
                    int(time.time() * 1000)))
            try:
                p.produce(topic, v.encode(), str(uid).encode())
            except BufferError:
                break
            sent += 1
        p.poll(0)
        time.sleep(0.001)
    wall = time.monotonic() - t0
    left = p.flush(60)
    print("produced %d seconds %.3f undelivered %d" % (sent, wall, left), flush=True)


def fork_probe(argv):
    """--fork-probe MIB,...: for each size, grows this process to that many
    MiB of touched memory and times fork() in the parent (the child exits at
    once) 5 times; prints `mib rss_kib pte_kib median_us min_us` lines."""
    held = []
    for mb in (int(x) for x in argv[0].split(",")):
        have = sum(len(b) for b in held)
        if mb * 2**20 > have:
            held.append(bytearray(b"\x01") * (mb * 2**20 - have))  # written: resident
        times = []
        for _ in range(5):
            t0 = time.perf_counter_ns()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            times.append((time.perf_counter_ns() - t0) // 1000)
            os.waitpid(pid, 0)
        rss, pte = proc_status(os.getpid())
        times.sort()
        print("%d %d %d %d %d" % (mb, rss, pte, times[2], times[0]), flush=True)


def run_fork_probe():
    """The fork cost of a plain process against its size, on this machine."""
    if not opts.fork_probe_mib:
        return []
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--fork-probe",
                          opts.fork_probe_mib], capture_output=True, text=True, timeout=300,
                         preexec_fn=_die_with_parent)
    if out.returncode != 0:
        raise Failed("fork probe: %s" % out.stderr.strip())
    return [tuple(int(x) for x in line.split()) for line in out.stdout.splitlines()]


# ---- tallyd ---------------------------------------------------------------------

def write_config(path, port, bootstrap, topic, name, snapdir, every, extra_props=()):
    with open(DEMO_CONFIG) as f:
        lines = f.readlines()
    feats, copying = [], False
    for line in lines:
        if line.startswith("features:"):
            copying = True
        elif copying and line[:1] not in (" ", "#", "\n", "-"):
            copying = False
        if copying:
            feats.append(line)
    props = "".join("    \"%s\": \"%s\"\n" % tuple(kv.split("=", 1)) for kv in
                    list(opts.property) + list(extra_props))
    if props:
        props = "  properties:\n" + props
    with open(path, "w") as f:
        f.write("# generated by bench/restart.py: the features of %s\n"
                "server:\n  listen: 127.0.0.1:%d\n  admin: \"\"\n"
                "kafka:\n  brokers: \"%s\"\n  group: tly-bench-restart-%s-%d\n"
                "  topics: [%s]\n  mode: replica\n  start: window\n"
                "%s"
                "events:\n  time: { field: ts, unit: ms }\n"
                "snapshot:\n  dir: %s\n  every: %s\n  keep: 3\n"
                % (DEMO_CONFIG, port, bootstrap, name, os.getpid(), topic, props, snapdir,
                   every))
        f.writelines(feats)


class Tallyd:
    """One tallyd process; `poll` samples it every opts.poll_ms."""

    def __init__(self, name, cfg, port, logpath):
        self.name, self.cfg, self.port, self.log = name, cfg, port, logpath
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.p = spawn([opts.tallyd, "--config", cfg], logpath)
        self.listen_s = None
        self.c = None
        self.forks = []  # (seconds since spawn, pause µs, rss KiB, pte KiB)
        self._nforks = 0

    def connect(self, deadline_s=120.0):
        while self.c is None:
            if self.p.poll() is not None:
                raise Failed("tallyd (%s) exited with %s; see %s"
                             % (self.name, self.p.returncode, self.log))
            if time.monotonic() - self.t0 > deadline_s:
                raise Failed("tallyd (%s) did not listen within %.0f s" % (self.name, deadline_s))
            try:
                self.c = Resp(self.port)
                self.listen_s = time.monotonic() - self.t0
            except OSError:
                time.sleep(opts.poll_ms / 1000)
        return self.c

    def sample(self):
        """One poll: INFO source, persistence, memory; notes a new fork."""
        if self.p.poll() is not None:
            raise Failed("tallyd (%s) exited with %s; see %s"
                         % (self.name, self.p.returncode, self.log))
        d = info(self.c, "source", "persistence", "memory")
        d["_t"] = time.monotonic() - self.t0
        forks = (geti(d, "snapshots_written") + geti(d, "snapshots_failed")
                 + geti(d, "snapshot_in_progress"))
        if forks > self._nforks:
            rss, pte = proc_status(self.p.pid)
            self.forks.append((d["_t"], geti(d, "last_snapshot_pause_us"), rss, pte))
            self._nforks = forks
        return d

    def wait_ready(self, total, timeout_s=240.0):
        """Polls until loading:0 and then until `total` messages are consumed
        (total None: only ready). Returns a dict of timings."""
        self.connect()
        r = {}
        while True:
            d = self.sample()
            if "ready_s" not in r and d.get("loading") == "0":
                r["ready_s"] = d["_t"]
                r["ready_rss"] = proc_status(self.p.pid)[0]
                r["ready_consumed"] = geti(d, "messages_consumed")
                r["ready_entities"] = geti(d, "entities")
                r["ready_info"] = d
                if total is None:
                    return r
            if "ready_s" in r and geti(d, "messages_consumed") >= total:
                r["all_s"] = d["_t"]
                r["all_rss"] = proc_status(self.p.pid)[0]
                r["all_info"] = d
                return r
            if d["_t"] > timeout_s:
                raise Failed("tallyd (%s): %s messages consumed after %.0f s, want %s"
                             % (self.name, d.get("messages_consumed"), timeout_s, total))
            time.sleep(opts.poll_ms / 1000)

    def check(self, gt, check_ids):
        """clicks:7d and dwell:1d of the check users against the generator;
        returns a list of mismatches."""
        bad = []
        for uid in check_ids:
            r = self.c.call("FEATURES", "user", uid, "clicks:7d", "dwell:1d")
            vals = dict(zip(r[0::2], r[1::2])) if isinstance(r, list) else {}
            got = (int(vals.get("clicks:7d") or 0), int(vals.get("dwell:1d") or 0))
            if got != gt[uid]:
                bad.append("%s: user %d clicks:7d,dwell:1d = %s, generated %s"
                           % (self.name, uid, got, gt[uid]))
        return bad

    def shutdown(self):
        if self.c is not None:
            self.c.close()
            self.c = None
        self.term_wall = time.time()
        self.term_s = stop(self.p)
        return self.term_s

    def log_times(self, stages=None, since=None):
        """Seconds from spawn (or from the wall time `since`) to the first log
        line of each stage, a (name, regex) list, default the start-up stages
        (the log's millisecond timestamps against our wall clock)."""
        stages = stages or (("snapshot", r"snapshot: (restored|none in)"),
                            ("assigned", r"source: assigned"),
                            ("caught up", r"source: caught up"))
        ref = self.wall0 if since is None else since
        out = {}
        with open(self.log, errors="replace") as f:
            for line in f:
                m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ", line)
                if not m:
                    continue
                for name, pat in stages:
                    if name not in out and re.search(pat, line):
                        when = calendar.timegm(time.strptime(m.group(1)[:19],
                                                             "%Y-%m-%dT%H:%M:%S"))
                        out[name] = when + int(m.group(1)[20:]) / 1000 - ref
        return out

    def shutdown_stages(self):
        """After shutdown: seconds from our SIGTERM to tallyd's log lines
        of the way down, and to the exit."""
        st = self.log_times((("final snapshot written", r"final snapshot"),
                             ("source closed", r"source: stopped after"),
                             ("stopped", r"INFO stopped$")), since=self.term_wall)
        st["exit"] = self.term_s
        return st

    def log_ms(self, pattern):
        """The number a log line matching pattern captured, or None."""
        with open(self.log, errors="replace") as f:
            m = re.findall(pattern, f.read())
        return float(m[-1]) if m else None


def new_tallyd(name, snapdir, every, extra_props=()):
    port = free_port()
    cfg = os.path.join(opts.tmp, name + ".yaml")
    write_config(cfg, port, opts.bootstrap, opts.topic, name, snapdir, every, extra_props)
    return Tallyd(name, cfg, port, os.path.join(opts.tmp, name + ".log"))


def new_tallyd_same(prev, name):
    return Tallyd(name, prev.cfg, prev.port, os.path.join(opts.tmp, name + ".log"))


# ---- redis peer -----------------------------------------------------------------

def resp_cmd(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def redis_dataset(events, path):
    """Writes the final state bench/kafka.c's loader keeps for events as
    RESP commands (one HSET per hash, one RPUSH per recent list); returns
    (commands, keys)."""
    users, recent, pins = {}, {}, {}
    cnt_name = {2: "clicks", 3: "saves", 4: "hides"}
    pin_name = {0: "impressions", 1: "closeups", 2: "clicks", 3: "saves"}
    for uid, pin, a, dwell, ts in events:
        h = users.setdefault(uid, {})
        if a in cnt_name:
            for w in ("5m", "1h", "1d", "7d"):
                k = "%s:%s:%d" % (cnt_name[a], w, ts - ts % HOPS[w])
                h[k] = h.get(k, 0) + 1
        if a in (2, 3):
            for w in ("1h", "1d"):
                k = "engaged:%s:%d" % (w, ts - ts % HOPS[w])
                h[k] = h.get(k, 0) + 1
        if dwell >= 0:
            for w in ("1h", "1d"):
                k = "dwell:%s:%d" % (w, ts - ts % HOPS[w])
                h[k] = h.get(k, 0) + dwell
        h["last_action"] = ACTIONS[a]
        recent.setdefault(uid, []).append("%d,%s,%d" % (pin, ACTIONS[a], ts))
        if a in pin_name:
            ph = pins.setdefault(pin, {})
            for w in ("1h", "1d"):
                k = "%s:%s:%d" % (pin_name[a], w, ts - ts % HOPS[w])
                ph[k] = ph.get(k, 0) + 1
            if a == 1 and dwell >= 0:
                k = "avg_dwell_sum:1d:%d" % (ts - ts % HOPS["1d"])
                ph[k] = ph.get(k, 0) + dwell
                k = "avg_dwell_n:1d:%d" % (ts - ts % HOPS["1d"])
                ph[k] = ph.get(k, 0) + 1
    n = 0
    with open(path, "wb") as f:
        for kind, table in (("user", users), ("pin", pins)):
            for ident, h in table.items():
                args = ["HSET", "%s:%d" % (kind, ident)]
                for k, v in h.items():
                    args += [k, v]
                f.write(resp_cmd(args))
                n += 1
        for uid, items in recent.items():
            f.write(resp_cmd(["RPUSH", "user:%d:recent" % uid] + items[::-1]))
            n += 1
    return n, len(users) + len(pins) + len(recent)


def redis_start(port, rdir, name):
    p = spawn([opts.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", rdir, "--dbfilename", "dump.rdb"],
              os.path.join(opts.tmp, name + ".log"))
    return p, time.monotonic()


def redis_ready(p, port, t0, timeout_s=120.0):
    """Seconds from t0 to the first PING answered PONG (not -LOADING)."""
    c = None
    while True:
        if p.poll() is not None:
            raise Failed("redis-server exited with %s" % p.returncode)
        if time.monotonic() - t0 > timeout_s:
            raise Failed("redis-server not ready within %.0f s" % timeout_s)
        try:
            if c is None:
                c = Resp(port)
            if c.call("PING") == "PONG":
                return time.monotonic() - t0, c
        except OSError:
            c = None
        time.sleep(opts.poll_ms / 1000)


def run_redis(events, res):
    rdir = os.path.join(opts.tmp, "redis")
    os.makedirs(rdir)
    port = free_port()
    log("redis peer: writing the dataset as RESP")
    path = os.path.join(opts.tmp, "redis-load.resp")
    ncmd, nkeys = redis_dataset(events, path)
    p, t0 = redis_start(port, rdir, "redis-load")
    _, c = redis_ready(p, port, t0)
    log("redis peer: loading %d commands with redis-cli --pipe" % ncmd)
    t1 = time.monotonic()
    with open(path, "rb") as f:
        out = subprocess.run([opts.redis_cli, "-p", str(port), "--pipe"], stdin=f,
                             capture_output=True, text=True)
    res["load_s"] = time.monotonic() - t1
    if out.returncode != 0 or "errors: 0" not in out.stdout:
        raise Failed("redis-cli --pipe: %s %s" % (out.stdout.strip(), out.stderr.strip()))
    os.unlink(path)
    res["keys"] = c.call("DBSIZE")
    if res["keys"] != nkeys:
        raise Failed("redis holds %s keys, wrote %d" % (res["keys"], nkeys))
    res["commands"] = ncmd
    res["used_memory"] = int(info(c, "memory")["used_memory"])
    res["rss_before"] = proc_status(p.pid)[0]
    t1 = time.monotonic()
    if c.call("BGSAVE") is None:
        raise Failed("BGSAVE failed")
    while True:
        time.sleep(opts.poll_ms / 1000)
        d = info(c, "persistence", "stats")
        if d.get("rdb_bgsave_in_progress") == "0":
            break
    res["bgsave_s"] = time.monotonic() - t1
    if d.get("rdb_last_bgsave_status") != "ok":
        raise Failed("BGSAVE status %s" % d.get("rdb_last_bgsave_status"))
    res["fork_us"] = int(d["latest_fork_usec"])
    t1 = time.monotonic()
    r = c.call("SAVE")
    res["save_s"] = time.monotonic() - t1
    if r != "OK":
        raise Failed("SAVE replied %r" % r)
    res["rdb_bytes"] = os.stat(os.path.join(rdir, "dump.rdb")).st_size
    t1 = time.monotonic()
    try:
        c.call("SHUTDOWN", "NOSAVE")
    except ConnectionError:
        pass
    c.close()
    p.wait(60)
    res["shutdown_s"] = time.monotonic() - t1
    log("redis peer: restart from the RDB")
    p, t0 = redis_start(port, rdir, "redis-restart")
    res["ready_s"], c = redis_ready(p, port, t0)
    res["ready_rss"] = proc_status(p.pid)[0]
    res["keys_after"] = c.call("DBSIZE")
    try:
        c.call("SHUTDOWN", "NOSAVE")
    except ConnectionError:
        pass
    c.close()
    p.wait(60)
    if res["keys_after"] != res["keys"]:
        raise Failed("redis restored %s keys of %s" % (res["keys_after"], res["keys"]))


# ---- the runs --------------------------------------------------------------------

def wait_snapshot_after(t, done_t, every_s):
    """Polls t until a snapshot that covers every message is durable: one
    forked after the poll that first saw all messages consumed (done_t), or,
    when none is started (the newest already covered them: the snapshotter
    skips a period without new messages), no writer for 3 periods. Returns
    the INFO then."""
    quiet_since = None
    while True:
        d = t.sample()
        late = [f for f in t.forks if f[0] > done_t]
        if late and d.get("snapshot_in_progress") == "0" and \
                geti(d, "snapshots_written") + geti(d, "snapshots_failed") >= len(t.forks):
            return d
        if not late and d.get("snapshot_in_progress") == "0":
            quiet_since = quiet_since or d["_t"]
            if d["_t"] - quiet_since > 3 * every_s:
                return d
        else:
            quiet_since = None
        if d["_t"] - done_t > 120:
            raise Failed("no snapshot after ingest within 120 s")
        time.sleep(opts.poll_ms / 1000)


def run_load(t, res):
    """D: the producer streams while t takes periodic snapshots."""
    prod_log = os.path.join(opts.tmp, "producer.log")
    with open(prod_log, "wb") as f:
        prod = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--steady-producer",
                                 opts.bootstrap, opts.topic, str(opts.rate), str(opts.entities),
                                 str(opts.pins)], stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    children.append(prod)
    if opts.pidfile:
        with open(opts.pidfile, "a") as pf:
            pf.write("%d steady-producer\n" % prod.pid)
    forks0 = len(t.forks)
    samples = []
    b0 = busy_cpu_s()
    t_start = time.monotonic()
    while True:
        d = t.sample()
        d["_mono"] = time.monotonic()
        d["messages_consumed_i"] = geti(d, "messages_consumed")
        samples.append(d)
        el = d["_mono"] - t_start
        if el >= opts.load_seconds and len(t.forks) - forks0 >= opts.load_snapshots:
            break
        if el > opts.load_seconds + 90:
            raise Failed("only %d snapshots in %.0f s under load"
                         % (len(t.forks) - forks0, el))
        time.sleep(opts.poll_ms / 1000)
    res["busy"] = (busy_cpu_s() - b0) / (time.monotonic() - t_start)
    stop(prod)
    with open(prod_log) as f:
        m = re.search(r"produced (\d+) seconds ([\d.]+) undelivered (\d+)", f.read())
    if not m or int(m.group(3)) != 0:
        raise Failed("producer: see %s" % prod_log)
    res["produced"], res["produce_s"] = int(m.group(1)), float(m.group(2))
    # Drain: every produced message consumed.
    base = res["base_consumed"] = samples[0]["messages_consumed_i"]
    while True:
        d = t.sample()
        if geti(d, "messages_consumed") - base >= res["produced"]:
            break
        if time.monotonic() - t_start > opts.load_seconds + 150:
            raise Failed("under load: %d of %d produced messages consumed"
                         % (geti(d, "messages_consumed") - base, res["produced"]))
        time.sleep(opts.poll_ms / 1000)
    res["forks"] = t.forks[forks0:]
    res["info"] = d
    # Consume rate between polls, split by whether a writer ran at either end
    # of the interval; from 0.5 s after the first message consumed (the
    # producer starting up is not tallyd's pause).
    first = next((k for k, s in enumerate(samples) if s["messages_consumed_i"] > base),
                 len(samples) - 1)
    samples = [s for s in samples[first:] if s["_mono"] - samples[first]["_mono"] >= 0.5]
    run_n = run_s = idle_n = idle_s = 0.0
    stall = 0.0
    last_move = samples[0]["_mono"]
    for a, b in zip(samples, samples[1:]):
        dn = b["messages_consumed_i"] - a["messages_consumed_i"]
        ds = b["_mono"] - a["_mono"]
        if a.get("snapshot_in_progress") == "1" or b.get("snapshot_in_progress") == "1":
            run_n, run_s = run_n + dn, run_s + ds
        else:
            idle_n, idle_s = idle_n + dn, idle_s + ds
        if dn > 0:
            stall = max(stall, b["_mono"] - last_move)
            last_move = b["_mono"]
    res["rate_writer"] = run_n / run_s if run_s else float("nan")
    res["rate_idle"] = idle_n / idle_s if idle_s else float("nan")
    res["writer_share"] = run_s / (run_s + idle_s) if run_s + idle_s else 0
    res["stall_s"] = stall
    res["seconds"] = samples[-1]["_mono"] - samples[0]["_mono"]
    res["consumed"] = samples[-1]["messages_consumed_i"] - samples[0]["messages_consumed_i"]


def line_fit(pts):
    """(n, intercept, slope, r²) of a least-squares line through pts, or None."""
    if len(pts) < 3:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    return len(pts), my - slope * mx, slope, (sxy * sxy / (sxx * syy) if syy else 0.0)


def fmt(n):
    return "{:,}".format(int(n))


def mib(kib):
    return kib / 1024.0


def main():
    global opts
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tallyd", default="build/tallyd")
    ap.add_argument("--bootstrap", required=True, help="a real broker (scripts/kafka.sh)")
    ap.add_argument("--entities", type=int, default=None,
                    help="users (default 1000000; --quick 100000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pins", type=int, default=None,
                    help="distinct pins, Zipf(1.0) (default entities/20)")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--poll-ms", type=float, default=20)
    ap.add_argument("--rate", type=float, default=20000, help="events/s under load")
    ap.add_argument("--load-seconds", type=float, default=None,
                    help="least seconds under load (default 15; --quick 8)")
    ap.add_argument("--load-snapshots", type=int, default=6,
                    help="least periodic snapshots under load")
    ap.add_argument("--no-redis", action="store_true", help="skip the redis-server peer")
    ap.add_argument("--redis-server", default=shutil.which("redis-server"))
    ap.add_argument("--redis-cli", default=shutil.which("redis-cli"))
    ap.add_argument("--pidfile", default=None, help="append children's pids here")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--property", action="append", default=[], metavar="K=V",
                    help="a librdkafka property for tallyd (kafka.properties); repeatable")
    ap.add_argument("--c2-property", default="fetch.wait.max.ms=50", metavar="K=V",
                    help="the property of the second restart (none: no second restart)")
    ap.add_argument("--fork-probe-mib", default="64,256,1024,2048",
                    help="sizes of the plain-process fork probe ('' skips it)")
    opts = ap.parse_args()
    if opts.entities is None:
        opts.entities = 100000 if opts.quick else 1000000
    if opts.pins is None:
        opts.pins = max(1000, opts.entities // 20)
    if opts.load_seconds is None:
        opts.load_seconds = 8 if opts.quick else 15
    if opts.entities < 1000 or opts.partitions < 1 or opts.rate <= 0 or opts.poll_ms <= 0 or \
            any("=" not in kv for kv in opts.property) or \
            (opts.c2_property != "none" and "=" not in opts.c2_property):
        ap.error("bad arguments")
    if not opts.no_redis and not (opts.redis_server and opts.redis_cli):
        log("restart: redis-server or redis-cli missing; the redis rows are skipped")
        opts.no_redis = True
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    opts.tmp = tempfile.mkdtemp(prefix="tallyd-bench-restart-")
    atexit.register(shutil.rmtree, opts.tmp, True)
    try:
        return run()
    except Failed as e:
        log("restart: FAILED: %s" % e)
        for p in children:
            if p.poll() is None:
                p.kill()
        for name in sorted(os.listdir(opts.tmp)):
            if name.endswith(".log"):
                with open(os.path.join(opts.tmp, name), errors="replace") as f:
                    tail = f.readlines()[-15:]
                log("--- %s (last lines)\n%s" % (name, "".join(tail).rstrip()))
        return 1


def run():
    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    load1 = os.getloadavg()[0]
    from confluent_kafka import libversion
    print("tallyd restart benchmark: from a snapshot vs from Kafka history")
    print("machine: nproc %d, %s, librdkafka %s, load average %.2f%s"
          % (os.cpu_count(), model, libversion()[0], load1,
             " (busy: other processes share the CPUs)" if load1 > 0.5 else ""))
    t = time.monotonic()
    payloads, keys, events, gt, check_ids = generate(opts.entities, opts.pins, opts.seed)
    nbytes = sum(len(p) for p in payloads)
    print("stream: %s events (%.1f bytes each on average) for %s users, pins Zipf(1.0) over "
          "%s, times in the last hour; generated in %.1f s"
          % (fmt(len(payloads)), nbytes / len(payloads), fmt(opts.entities), fmt(opts.pins),
             time.monotonic() - t))
    opts.topic = "bench-restart-%d-%d" % (os.getpid(), int(time.time() * 1000))
    log("preloading %d events into %s (%d partitions) on %s"
        % (len(payloads), opts.topic, opts.partitions, opts.bootstrap))
    t = time.monotonic()
    preload(opts.bootstrap, opts.topic, opts.partitions, payloads, keys)
    print("preload: %s events into %s partitions in %.1f s (checked: the high watermarks sum to "
          "them)" % (fmt(len(payloads)), opts.partitions, time.monotonic() - t))
    del payloads, keys
    total = len(events)
    print("warm-up: the whole topic read once by a bare consumer in %.1f s (not timed in the runs)"
          % warm_read(opts.bootstrap, opts.topic, opts.partitions, total))
    bad = []

    # A. rebuild, no snapshot falls due.
    log("A. rebuild from Kafka history (snapshot.every 1d)")
    a = new_tallyd("rebuild", os.path.join(opts.tmp, "snap-a"), "1d")
    ra = a.wait_ready(total)
    ra["entities"] = geti(ra["all_info"], "entities")
    ra["listen_s"], ra["stages"] = a.listen_s, a.log_times()
    bad += a.check(gt, check_ids)
    ra["shutdown_s"] = a.shutdown()
    ra["final_ms"] = a.log_ms(r"final snapshot .* in (\d+) ms")
    ra["down"] = a.shutdown_stages()

    # B. rebuild with a snapshot every second.
    log("B. rebuild from Kafka history (snapshot.every 1s), then a snapshot after ingest")
    snapdir = os.path.join(opts.tmp, "snap-b")
    b = new_tallyd("rebuild-snap", snapdir, "1s")
    rb = b.wait_ready(total)
    rb["entities"] = geti(rb["all_info"], "entities")
    rb["listen_s"], rb["stages"] = b.listen_s, b.log_times()
    rb["forks_ingest"] = list(b.forks)
    d = wait_snapshot_after(b, rb["all_s"], 1.0)
    rb["snap_info"] = d
    rb["forks_after"] = b.forks[len(rb["forks_ingest"]):]
    path = d.get("last_snapshot_path", "")
    rb["file_bytes"] = os.stat(path).st_size if path and os.path.exists(path) else -1
    rb["entities_before"] = geti(d, "entities")
    bad += b.check(gt, check_ids)
    rb["shutdown_s"] = b.shutdown()
    rb["final_ms"] = b.log_ms(r"final snapshot .* in (\d+) ms")
    rb["down"] = b.shutdown_stages()
    finals = sorted(f for f in os.listdir(snapdir) if f.endswith(".tly"))
    rb["final_bytes"] = os.stat(os.path.join(snapdir, finals[-1])).st_size if finals else -1

    # C. restore from B's snapshot.
    log("C. restart from the snapshot")
    c = new_tallyd_same(b, "restore")
    rc = c.wait_ready(None)
    rc["listen_s"], rc["stages"] = c.listen_s, c.log_times()
    di = rc["ready_info"]
    rc["restored"] = geti(di, "restored_entities")
    rc["consumed"] = geti(di, "messages_consumed")
    rc["load_ms"] = c.log_ms(r"restored \d+ entities .* in ([\d.]+) ms")
    if rc["restored"] != rb["entities_before"] or geti(di, "entities") != rb["entities_before"]:
        bad.append("restore: restored_entities %d, entities %d, before the restart %d"
                   % (rc["restored"], geti(di, "entities"), rb["entities_before"]))
    bad += c.check(gt, check_ids)

    # D. under load.
    log("D. %.0f events/s for at least %.0f s and %d snapshots"
        % (opts.rate, opts.load_seconds, opts.load_snapshots))
    rd = {}
    run_load(c, rd)
    rd["rss"] = proc_status(c.p.pid)[0]
    rc["shutdown_s"] = c.shutdown()

    # C2. restore once more (C's final snapshot) with a shorter fetch wait.
    r2 = {}
    if opts.c2_property != "none":
        log("C2. restart from the newest snapshot with %s" % opts.c2_property)
        c2 = new_tallyd("restore-2", snapdir, "1s", [opts.c2_property])
        r2 = c2.wait_ready(None)
        r2["listen_s"], r2["stages"] = c2.listen_s, c2.log_times()
        r2["restored"] = geti(r2["ready_info"], "restored_entities")
        r2["consumed"] = geti(r2["ready_info"], "messages_consumed")
        r2["load_ms"] = c2.log_ms(r"restored \d+ entities .* in ([\d.]+) ms")
        c2.shutdown()

    # E. the peer.
    re_ = {}
    if not opts.no_redis:
        run_redis(events, re_)
    log("fork probe: a plain process of %s MiB" % opts.fork_probe_mib)
    probe = run_fork_probe()

    report(total, ra, rb, rc, r2, rd, re_, probe, bad)
    return 1 if bad else 0


def report(total, ra, rb, rc, r2, rd, re_, probe, bad):
    n = opts.entities
    print("\n## restart to ready: %s users (%s entities), %s events, real broker, %d partitions\n"
          % (fmt(n), fmt(ra["entities"]), fmt(total), opts.partitions))
    print("Time from spawn to the first INFO poll (every %g ms) showing loading:0; tallyd's "
          "kafka.ready_lag is 1000 messages per partition." % opts.poll_ms)
    print("\n| run | listening s | ready s | all consumed s | VmRSS at ready MiB | entities "
          "| ready vs A |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = ra["ready_s"]
    print("| A. rebuild from Kafka history (no snapshot due) | %.2f | %.2f | %.2f | %.0f | %s "
          "| 1.00x |" % (ra["listen_s"], ra["ready_s"], ra["all_s"], mib(ra["ready_rss"]),
                         fmt(ra["entities"])))
    print("| B. rebuild from Kafka history, snapshot every 1 s | %.2f | %.2f | %.2f | %.0f | %s "
          "| %.2fx |" % (rb["listen_s"], rb["ready_s"], rb["all_s"], mib(rb["ready_rss"]),
                         fmt(rb["entities"]), rb["ready_s"] / base))
    print("| C. restart from B's snapshot | %.2f | %.2f | - | %.0f | %s | %.3fx |"
          % (rc["listen_s"], rc["ready_s"], mib(rc["ready_rss"]), fmt(rc["restored"]),
             rc["ready_s"] / base))
    if r2:
        print("| C2. restart from C's final snapshot, %s | %.2f | %.2f | - | %.0f | %s | %.3fx |"
              % (opts.c2_property, r2["listen_s"], r2["ready_s"], mib(r2["ready_rss"]),
                 fmt(r2["restored"]), r2["ready_s"] / base))
    if re_:
        print("| peer: redis-server restart from its RDB | - | %.2f | - | %.0f | %s keys | %.3fx |"
              % (re_["ready_s"], mib(re_["ready_rss"]), fmt(re_["keys_after"]),
                 re_["ready_s"] / base))
    print("\nlistening: the first TCP connect accepted (the store is loaded before the server "
          "starts). ready vs A: ready s / A's ready s.")
    print("restore / rebuild (C / A, ready): %.3fx; rebuild / restore: %.1fx"
          % (rc["ready_s"] / base, base / rc["ready_s"]))
    if re_:
        print("redis restart from RDB / tallyd restore: %.2fx" % (re_["ready_s"] / rc["ready_s"]))
    print("messages consumed when ready: A %s, B %s, C %s (of %s); consume rate over spawn → all "
          "consumed: A %s events/s, B %s events/s (B/A %.2fx: periodic snapshots during catch-up)"
          % (fmt(ra["ready_consumed"]), fmt(rb["ready_consumed"]), fmt(rc["consumed"]),
             fmt(total), fmt(total / ra["all_s"]), fmt(total / rb["all_s"]),
             ra["all_s"] / rb["all_s"]))
    for name, r in (("A", ra), ("B", rb), ("C", rc), ("C2", r2)):
        if not r:
            continue
        st = r["stages"]
        print("%s, seconds from spawn in tallyd's log: %s" % (
            name, ", ".join("%s %.2f" % (k, st[k]) for k in ("snapshot", "assigned", "caught up")
                            if k in st)))
    if rc["load_ms"] is not None:
        print("C: the snapshot file loaded in %.0f ms (tallyd's log)%s" % (
            rc["load_ms"], "; C2: %.0f ms, %s messages consumed when ready"
            % (r2["load_ms"], fmt(r2["consumed"])) if r2 and r2["load_ms"] is not None else ""))
    print("C: restored_entities %s, entities before the restart %s: %s"
          % (fmt(rc["restored"]), fmt(rb["entities_before"]),
             "equal" if rc["restored"] == rb["entities_before"] else "DIFFERENT"))
    if re_:
        print("peer: %s keys (user hashes, user recent lists, pin hashes), used_memory %.0f MiB, "
              "loaded by redis-cli --pipe (%s commands) in %.1f s"
              % (fmt(re_["keys"]), re_["used_memory"] / 2**20, fmt(re_["commands"]),
                 re_["load_s"]))

    si = rb["snap_info"]
    print("\n## snapshot of %s entities (B: the newest once every message was consumed)\n"
          % fmt(rb["entities"]))
    print("| figure | tallyd | redis-server (peer) |")
    print("| --- | ---: | ---: |")
    peer = (lambda k, f: f % re_[k] if re_ else "-")
    print("| write time, last_snapshot_write_ms (fork → reaped, ~100 ms granularity) | %s ms | "
          "%s |" % (si.get("last_snapshot_write_ms"),
                    peer("bgsave_s", "BGSAVE %.2f s (polled)")))
    print("| size, last_snapshot_bytes | %s | - |" % fmt(geti(si, "last_snapshot_bytes")))
    print("| file on disk | %s bytes | %s |"
          % (fmt(rb["file_bytes"]), "RDB %s bytes" % fmt(re_["rdb_bytes"]) if re_ else "-"))
    print("| fork pause of that snapshot, last_snapshot_pause_us | %s µs | %s |"
          % (fmt(geti(si, "last_snapshot_pause_us")),
             "latest_fork_usec %s µs" % fmt(re_["fork_us"]) if re_ else "-"))
    print("| longest fork pause of the run, max_snapshot_pause_us | %s µs | - |"
          % fmt(geti(si, "max_snapshot_pause_us")))
    print("| snapshots during the rebuild (forks seen) | %d | - |" % len(rb["forks_ingest"]))
    print("| SIGTERM → exit (final snapshot written in-process) | %.2f s (final snapshot %s ms) | "
          "%s |"
          % (rb["shutdown_s"], "%.0f" % rb["final_ms"] if rb["final_ms"] is not None else "?",
             "SAVE %.2f s, SHUTDOWN NOSAVE %.2f s" % (re_["save_s"], re_["shutdown_s"])
             if re_ else "-"))
    print("| final snapshot file | %s bytes | - |" % fmt(rb["final_bytes"]))
    print("A's SIGTERM → exit (final snapshot of a store that never had one): %.2f s (final "
          "snapshot %s ms)" % (ra["shutdown_s"], "%.0f" % ra["final_ms"] if ra["final_ms"]
                                is not None else "?"))
    for name, r in (("A", ra), ("B", rb)):
        print("%s's way down, seconds from SIGTERM (tallyd's log): %s" % (name, ", ".join(
            "%s %.2f" % (k, v) for k, v in sorted(r["down"].items(), key=lambda kv: kv[1]))))

    print("\n## ingest under load: %.0f events/s asked, snapshot.every 1 s (C's process)\n"
          % opts.rate)
    pauses = [f[1] for f in rd["forks"]]
    print("| figure | value |")
    print("| --- | ---: |")
    print("| produced (events/s achieved) | %s in %.1f s (%s/s) |"
          % (fmt(rd["produced"]), rd["produce_s"], fmt(rd["produced"] / rd["produce_s"])))
    print("| consumed over the sampled %.1f s | %s (%s/s) |"
          % (rd["seconds"], fmt(rd["consumed"]), fmt(rd["consumed"] / rd["seconds"])))
    print("| periodic snapshots (forks) under load | %d |" % len(pauses))
    print("| their fork pauses, µs | %s |" % ", ".join(fmt(p) for p in pauses))
    print("| max of them / max_snapshot_pause_us of the process | %s / %s µs |"
          % (fmt(max(pauses)) if pauses else "-", fmt(geti(rd["info"], "max_snapshot_pause_us"))))
    print("| consume rate, 20-ms polls with a writer running (%.0f %% of the time) | %s/s |"
          % (100 * rd["writer_share"], fmt(rd["rate_writer"]) if rd["rate_writer"] ==
             rd["rate_writer"] else "-"))
    print("| consume rate, polls with no writer | %s/s |"
          % (fmt(rd["rate_idle"]) if rd["rate_idle"] == rd["rate_idle"] else "-"))
    print("| longest time with messages_consumed not moving | %.0f ms |" % (1000 * rd["stall_s"]))
    print("| VmRSS at the end | %.0f MiB |" % mib(rd["rss"]))
    print("| CPUs the machine kept busy | %.2f of %d |" % (rd["busy"], os.cpu_count()))

    print("\n## fork pause against resident memory (every fork seen in B and D)\n")
    print("| run | s since spawn | VmRSS MiB | VmPTE KiB | pause µs | µs per GiB of RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    pts = [("B", f) for f in rb["forks_ingest"]] + [("B after", f) for f in
                                                      rb.get("forks_after", [])] + \
        [("D", f) for f in rd["forks"]]
    for run_name, (ts, pause, rss, pte) in pts:
        print("| %s | %.2f | %.0f | %s | %s | %s |"
              % (run_name, ts, mib(rss), fmt(pte), fmt(pause),
                 fmt(pause / (rss / 2**20)) if rss else "-"))
    fit = line_fit([(f[2] / 2**20, f[1]) for _, f in pts if f[2] > 0])
    if fit:
        print("least squares over %d tallyd forks: pause ≈ %.0f µs + %.0f µs per GiB of VmRSS "
              "(r² %.2f); median pause %s µs" % (fit + (fmt(sorted(f[1] for _, f in pts)[
                  len(pts) // 2]),)))
    print("VmRSS and VmPTE are read at the poll that first sees the fork (≤ %g ms after it)."
          % opts.poll_ms)

    if probe:
        print("\nThe same machine's fork() of a plain process (python3, memory written so it is "
              "resident; median and minimum of 5, timed in the parent):\n")
        print("| touched MiB | VmRSS MiB | VmPTE KiB | fork median µs | fork min µs | median µs per "
              "GiB |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for mb, rss, pte, med, lo in probe:
            print("| %s | %.0f | %s | %s | %s | %s |" % (fmt(mb), mib(rss), fmt(pte), fmt(med),
                                                        fmt(lo), fmt(med / (rss / 2**20))))
        fit = line_fit([(r[1] / 2**20, r[3]) for r in probe])
        if fit:
            print("least squares: fork ≈ %.0f µs + %.0f µs per GiB of VmRSS (r² %.2f)" % fit[1:])

    if bad:
        print("\ncheck: FAILED")
        for line in bad[:10]:
            print("  " + line)
    else:
        print("\ncheck: clicks:7d and dwell:1d of %d users equal to the generator's in A, B "
              "and C; C restored B's entity count" % CHECK_USERS)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--steady-producer":
        steady_producer(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--fork-probe":
        fork_probe(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
