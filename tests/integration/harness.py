"""Shared machinery of the integration tests: start a Kafka mock cluster
(build/itest/mockkafka) and a real tallyd, talk RESP to it over TCP, report
cmocka-style lines that scripts/run-tests.sh sums.

Every child process is registered and killed on every exit path (atexit,
SIGTERM/SIGINT/SIGHUP, and PR_SET_PDEATHSIG in the child should this
process be killed outright). Waits poll a condition against a deadline
that TLY_TEST_TIMEOUT_MULT stretches; nothing sleeps as synchronisation.

Environment: TLY_BUILD (build directory holding tallyd and itest/, default
build; e.g. an ASan build), TLY_TEST_TIMEOUT_MULT (deadline multiplier),
TLY_E2E_ONLY / TLY_BAD_ONLY (run only the cases whose name contains it).
A run that passes removes its temporary directory; a failing one keeps it
(config, events, tallyd.log) and says where.
"""

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / os.environ.get("TLY_BUILD", "build")
MULT = float(os.environ.get("TLY_TEST_TIMEOUT_MULT", "1") or "1")
TALLYD = BUILD / "tallyd"
MOCKKAFKA = BUILD / "itest" / "mockkafka"
HIREDIS_CLIENT = BUILD / "itest" / "hiredis_client"


def deadline(seconds):
    return time.monotonic() + seconds * MULT


# ---------------------------------------------------------------- processes

_children = []


def _pdeathsig():
    # The child dies with us even if we are SIGKILLed (Linux prctl).
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(args, **kw):
    p = subprocess.Popen([str(a) for a in args], preexec_fn=_pdeathsig, **kw)
    _children.append(p)
    return p


def stop(p, timeout=10):
    """SIGTERM, then SIGKILL after timeout; returns the exit status."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout * MULT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in _children:
        _children.remove(p)
    return p.returncode


def cleanup():
    for p in list(_children):
        try:
            stop(p, timeout=5)
        except Exception:
            pass


def _on_signal(sig, frame):
    cleanup()
    os._exit(128 + sig)


atexit.register(cleanup)
for _s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_s, _on_signal)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class MockKafka:
    """build/itest/mockkafka: a 3-broker mock cluster holding one topic."""

    def __init__(self, topic, partitions, events_path):
        self.proc = spawn([MOCKKAFKA, topic, partitions, events_path],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.bootstrap = self._expect("BOOTSTRAP")
        self.produced = int(self._expect("PRODUCED"))

    def _expect(self, word):
        # readline blocks until the helper prints or exits: no polling needed.
        line = self.proc.stdout.readline()
        if not line.startswith(word + " "):
            rc = stop(self.proc)
            raise RuntimeError(f"mockkafka: expected '{word} ...', got {line!r} (exit {rc})")
        return line.split(" ", 1)[1].strip()

    def close(self):
        try:
            self.proc.stdin.close()
        except Exception:
            pass
        return stop(self.proc)


# ---------------------------------------------------------------- config

def demo_config():
    with open(REPO / "config" / "demo.yaml") as f:
        return yaml.safe_load(f)


def write_config(tmpdir, bootstrap, port, topic, server_extra=None, features=None):
    """A copy of config/demo.yaml's events and features with the test's own
    kafka, server and snapshot sections. Returns (path, config dict)."""
    cfg = demo_config()
    cfg.pop("demo", None)
    cfg["server"] = {"listen": f"127.0.0.1:{port}", "admin": ""}
    cfg["server"].update(server_extra or {})
    cfg["kafka"] = {
        "brokers": bootstrap,
        "topics": [topic],
        "start": "earliest",
        "group": f"tly-itest-{os.getpid()}-{port}",
    }
    cfg.setdefault("events", {})["max_future_skew"] = "5m"
    cfg["snapshot"] = {"dir": str(Path(tmpdir) / "snapshots")}
    if features is not None:
        cfg["features"] = features
    path = Path(tmpdir) / "tallyd.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, cfg


# ---------------------------------------------------------------- RESP

class RespError(Exception):
    """An error reply (kept as a value; raised only where asked)."""

    def __eq__(self, other):
        return isinstance(other, RespError) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def __repr__(self):
        return f"-{self}"


class Double(float):
    """A RESP3 double, kept distinct from a bulk string."""


class Closed(Exception):
    pass


class Client:
    """A minimal RESP2/RESP3 client on a blocking socket with a timeout.
    Replies: int, bytes (bulk/verbatim), str (status), None, list,
    dict (RESP3 map), Double, bool, RespError."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout * MULT)
        self.buf = b""

    def close(self):
        self.sock.close()

    @staticmethod
    def encode(*args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if not isinstance(a, bytes):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise Closed("connection closed by the server")
        self.buf += chunk

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill()

    def _bytes(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode(errors="backslashreplace")
        if t == b"-":
            return RespError(rest.decode(errors="backslashreplace"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._bytes(n)
        if t in (b"*", b"~", b">"):
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        if t == b"%":
            n = int(rest)
            d = {}
            for _ in range(n):
                k = self.read()
                d[k] = self.read()
            return d
        if t == b"_":
            return None
        if t == b",":
            return Double(float(rest))
        if t == b"#":
            return rest == b"t"
        if t == b"=":
            return self._bytes(int(rest))[4:]
        if t == b"(":
            return int(rest)
        raise ValueError(f"unknown RESP type in {line[:40]!r}")

    def cmd(self, *args):
        self.send(self.encode(*args))
        return self.read()

    def pipeline(self, cmds):
        """Sends every command in one stream and reads the replies. The
        sending runs in a thread while the replies are read: a server that
        stops reading while its replies are unread (backpressure) would
        otherwise deadlock with a client that writes everything first."""
        data = b"".join(self.encode(*c) for c in cmds)
        err = []

        def sender():
            try:
                self.sock.sendall(data)
            except OSError as e:
                err.append(e)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        try:
            out = [self.read() for _ in cmds]
        finally:
            t.join()
        if err:
            raise err[0]
        return out

    def read_or_closed(self):
        """The next reply, or Closed() when the server closed the connection
        (a reset counts as closed)."""
        try:
            return self.read()
        except (Closed, ConnectionResetError) as e:
            return Closed(str(e))

    def info(self):
        text = self.cmd("INFO")
        if isinstance(text, RespError):
            raise RuntimeError(f"INFO failed: {text}")
        return parse_info(text.decode())


def parse_info(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        k, v = line.split(":", 1)
        out[k] = v
    return out


# ---------------------------------------------------------------- tallyd

class Tallyd:
    def __init__(self, config_path, port, tmpdir, ping_ok=("PONG",)):
        """Starts tallyd and waits until PING gets one of ping_ok (with a
        password set, PING before AUTH may be refused)."""
        self.port = port
        self.ping_ok = ping_ok
        self.log_path = Path(tmpdir) / "tallyd.log"
        self.log = open(self.log_path, "w")
        self.proc = spawn([TALLYD, "--config", config_path], stdout=self.log,
                          stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self._wait_serving()

    def log_tail(self, n=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_serving(self):
        end = deadline(20)
        last = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tallyd exited with {self.proc.returncode} at start-up:\n"
                                   + self.log_tail())
            try:
                c = Client(self.port, timeout=2)
                r = c.cmd("PING")
                c.close()
                if any(same(r, ok) for ok in self.ping_ok):
                    return
                last = r
            except OSError as e:
                last = e
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
        raise RuntimeError(f"tallyd did not answer PING on port {self.port} within "
                           f"{20 * MULT:.0f} s (last: {last!r}):\n" + self.log_tail())

    def client(self, timeout=10):
        return Client(self.port, timeout=timeout)

    def wait_ingested(self, produced, seconds=60, auth=None):
        """Polls INFO until every produced message is consumed and applied or
        rejected. Returns the last INFO dict."""
        c = self.client()
        if auth is not None:
            r = c.cmd("AUTH", auth)
            if r != "OK":
                raise RuntimeError(f"AUTH: {r!r}")
        end = deadline(seconds)
        info = {}
        try:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tallyd exited with {self.proc.returncode}:\n"
                                       + self.log_tail())
                info = c.info()
                applied = int(info.get("events_applied", "0"))
                rejected = int(info.get("events_rejected", "0"))
                consumed = int(info.get("messages_consumed", "0"))
                # and, where tallyd reports it, until it serves (not -LOADING)
                if (consumed >= produced and applied + rejected >= produced
                        and info.get("loading", "0") == "0"):
                    return info
                time.sleep(0.05)
        finally:
            c.close()
        keys = ("messages_consumed", "events_applied", "events_rejected", "lag", "partitions",
                "consumer_errors")
        raise RuntimeError(f"tallyd did not ingest {produced} messages within "
                           f"{seconds * MULT:.0f} s: " +
                           ", ".join(f"{k}={info.get(k)}" for k in keys) + "\n" + self.log_tail())

    def rss_kb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1

    def close(self):
        rc = stop(self.proc)
        self.log.close()
        return rc


# ---------------------------------------------------------------- reporting

class Failure(Exception):
    pass


class Mismatches:
    """Collects mismatches; a test fails showing the first few and the total."""

    def __init__(self, show=8):
        self.items = []
        self.total = 0
        self.show = show

    def add(self, msg):
        self.total += 1
        if len(self.items) < self.show:
            self.items.append(msg)

    def check(self, cond, msg):
        if not cond:
            self.add(msg)
        return cond

    def eq(self, got, want, what):
        if not same(got, want):
            self.add(f"{what}: {first_difference(got, want)}")
            return False
        return True

    def done(self):
        if self.total:
            more = f"\n  ... {self.total - len(self.items)} more" if self.total > len(self.items) else ""
            raise Failure(f"{self.total} mismatch(es):\n  " + "\n  ".join(self.items) + more)


def first_difference(got, want, path=""):
    """Where got and want first differ, as text."""
    if isinstance(want, list) and isinstance(got, list):
        for i, (g, w) in enumerate(zip(got, want)):
            if not same(g, w):
                return first_difference(g, w, f"{path}[{i}]")
        if len(got) != len(want):
            return (f"at {path or 'top'}: {len(got)} elements, want {len(want)} "
                    f"(got {short(got, 200)}, want {short(want, 200)})")
    if isinstance(want, dict) and isinstance(got, dict):
        if list(got) != list(want):
            return f"at {path or 'top'}: keys {short(list(got), 400)}, want {short(list(want), 400)}"
        for k in want:
            if not same(got[k], want[k]):
                return first_difference(got[k], want[k], f"{path}[{k!r}]")
    return f"at {path or 'top'}: got {short(got)}, want {short(want)}"


def short(v, n=300):
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


class Dbl:
    """An expected double: equal to a Double/float of the same value, or (RESP2)
    a bulk string that parses to the same value."""

    def __init__(self, v):
        self.v = float(v)

    def __repr__(self):
        return f"Dbl({self.v!r})"


class JsonDbl(Dbl):
    """An expected double as redis-cli --json prints a RESP3 double: a JSON
    number (an integral double may print without a fraction)."""


class OneOf:
    """An expected value known only to be one of several."""

    def __init__(self, options):
        self.options = list(options)

    def __repr__(self):
        return f"OneOf({self.options!r})"


def differing(cmds, got, wants):
    """The replies that differ from the truth, [(cmd, got, want)], and how
    many integer values or RECENT lengths lie above and below it (counted
    twice: a duplicate; missing: a loss)."""
    diffs = [(c, g, w) for c, g, w in zip(cmds, got, wants) if not same(g, w)]
    higher = lower = 0
    for cmd, g, w in diffs:
        if cmd[0] == "RECENT" and isinstance(g, list):
            higher += len(g) > len(w)
            lower += len(g) < len(w)
        elif isinstance(g, list) and len(g) == len(w):
            for a, b in zip(g[1::2], w[1::2]):
                if isinstance(a, int) and isinstance(b, int):
                    higher += a > b
                    lower += a < b
    return diffs, higher, lower


def same(got, want):
    """Structural equality of a reply with an expected value; Dbl matches a
    double or its text; RESP2 text must be a plain decimal rendering."""
    if isinstance(want, OneOf):
        return any(same(got, w) for w in want.options)
    if isinstance(want, JsonDbl):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and got == want.v
    if isinstance(want, Dbl):
        if isinstance(got, (bytes, str)):
            try:
                text = got.decode() if isinstance(got, bytes) else got
                return float(text) == want.v and text.strip() == text
            except ValueError:
                return False
        return isinstance(got, float) and not isinstance(got, bool) and float(got) == want.v
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, int):
        return isinstance(got, int) and got == want
    if isinstance(want, list):
        return (isinstance(got, list) and len(got) == len(want)
                and all(same(g, w) for g, w in zip(got, want)))
    if isinstance(want, dict):
        return (isinstance(got, dict) and list(got.keys()) == list(want.keys())
                and all(same(got[k], want[k]) for k in want))
    return type(got) is type(want) and got == want


class Suite:
    """cmocka-style output: [ RUN ] / [ OK ] / [ FAILED ] per case, then the
    totals that scripts/run-tests.sh sums."""

    def __init__(self, name):
        self.name = name
        self.passed = []
        self.failed = []
        print(f"[==========] {name}", flush=True)

    def run(self, name, fn, *args):
        print(f"[ RUN      ] {name}", flush=True)
        t = time.monotonic()
        try:
            fn(*args)
        except Failure as e:
            print(f"  {e}", flush=True)
            print(f"[  FAILED  ] {name}", flush=True)
            self.failed.append(name)
            return False
        except Exception:
            print("  " + traceback.format_exc().replace("\n", "\n  "), flush=True)
            print(f"[  FAILED  ] {name}", flush=True)
            self.failed.append(name)
            return False
        print(f"[       OK ] {name} ({(time.monotonic() - t) * 1000:.0f} ms)", flush=True)
        self.passed.append(name)
        return True

    def fail_setup(self, name, err):
        print(f"[ RUN      ] {name}", flush=True)
        print(f"  {err}", flush=True)
        print(f"[  FAILED  ] {name}", flush=True)
        self.failed.append(name)

    def finish(self):
        print(f"[==========] {len(self.passed) + len(self.failed)} test(s) run.")
        print(f"[  PASSED  ] {len(self.passed)} test(s).")
        if self.failed:
            print(f"[  FAILED  ] {len(self.failed)} test(s), listed below:")
            for n in self.failed:
                print(f"[  FAILED  ] {n}")
        sys.stdout.flush()
        return 1 if self.failed else 0


def finish(suite, tmpdir):
    """Prints the totals; removes the run's directory when everything passed
    (on failure it stays, with tallyd.log, for a look)."""
    rc = suite.finish()
    if rc == 0:
        shutil.rmtree(tmpdir, ignore_errors=True)
    else:
        print(f"# logs and config kept in {tmpdir}", flush=True)
    return rc


def make_tmpdir(prefix):
    return tempfile.mkdtemp(prefix=prefix)


def check_binaries(*paths):
    missing = [str(p) for p in paths if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError("missing binaries (make unit-bins): " + ", ".join(missing))


DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(text):
    m = DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return int(m.group(1)) * UNIT_MS[m.group(2)]


def duration_label(ms):
    for unit in ("d", "h", "m", "s"):
        if ms % UNIT_MS[unit] == 0:
            return f"{ms // UNIT_MS[unit]}{unit}"
    return f"{ms}ms"
