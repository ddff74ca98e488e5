#!/usr/bin/env python3
"""Bad input against a real tallyd: malformed requests, oversized lengths,
slow and flooding clients, too many connections. Each case asserts the
documented error text (Redis's wording: "-ERR Protocol error: ..." then the
connection closes) or the close itself, and a separate well-behaved client
keeps getting correct answers throughout (a thread asking PING and a
FEATURES value known from the data, plus a check after every case).

Config: config/demo.yaml's features; server.max_clients 20,
server.request_timeout 2s, other limits at their defaults (max_args 65536,
max_bulk 65536, output_soft_limit 1 MiB).

Run: /usr/bin/python3 tests/integration/badinput.py
"""

import json
import os
import random
import select
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
from harness import Closed, Failure, RespError  # noqa: E402

TOPIC = "engagements"
MAX_CLIENTS = 20
REQUEST_TIMEOUT_S = 2
USER = 42
CLICKS = 7
RSS_BOUND_KB = 200 * 1024
FLOOD_BYTES = 1 << 30
FLOOD_SENT_BOUND = 64 << 20
PROTO_ERR = "ERR Protocol error: "


class Watcher(threading.Thread):
    """The well-behaved client: PING and FEATURES user 42 clicks:1h in a loop
    on its own connection; records every wrong answer."""

    def __init__(self, port, asof):
        super().__init__(daemon=True)
        self.cli = H.Client(port, timeout=10)
        self.asof = asof
        self.want = [b"clicks:1h", CLICKS]
        self.stop_ev = threading.Event()
        self.errors = []
        self.rounds = 0

    def once(self, cli):
        r = cli.pipeline([("PING",), ("FEATURES", "user", USER, "clicks:1h", "ASOF", self.asof)])
        if r[0] != "PONG" or not H.same(r[1], self.want):
            return f"got {r!r}, want ['PONG', {self.want!r}]"
        return None

    def run(self):
        while not self.stop_ev.is_set():
            try:
                err = self.once(self.cli)
            except Exception as e:  # a closed or timed-out connection is a failure
                err = f"{type(e).__name__}: {e}"
            if err:
                self.errors.append(err)
                if len(self.errors) > 20:
                    return
            self.rounds += 1
            self.stop_ev.wait(0.02)  # pacing of the background client, not a sync

    def stop(self):
        self.stop_ev.set()
        self.join(10 * H.MULT)
        self.cli.close()


class Ctx:
    pass


def setup():
    H.check_binaries(H.TALLYD, H.MOCKKAFKA)
    c = Ctx()
    t0 = int(time.time() * 1000)
    c.asof = (t0 + 60_000) // 1000 * 1000
    c.tmp = H.make_tmpdir("tly-bad-")
    lines = []
    for i in range(CLICKS):
        ev = {"user_id": USER, "pin_id": 100 + i, "action": "click", "dwell_ms": 10, "ts": t0 - 600_000 + i}
        lines.append(f"{USER}\t{json.dumps(ev)}")
    for i in range(5):
        ev = {"user_id": USER + 1 + i, "pin_id": 7, "action": "impression", "dwell_ms": 3, "ts": t0 - 1000}
        lines.append(f"{USER + 1 + i}\t{json.dumps(ev)}")
    path = Path(c.tmp) / "events.tsv"
    path.write_text("\n".join(lines) + "\n")
    c.kafka = H.MockKafka(TOPIC, 4, path)
    c.port = H.free_port()
    c.config_path, _ = H.write_config(c.tmp, c.kafka.bootstrap, c.port, TOPIC, server_extra={
        "max_clients": MAX_CLIENTS, "request_timeout": f"{REQUEST_TIMEOUT_S}s"})
    c.tallyd = H.Tallyd(c.config_path, c.port, c.tmp)
    c.tallyd.wait_ingested(c.kafka.produced)
    c.watcher = Watcher(c.port, c.asof)
    err = c.watcher.once(c.watcher.cli)
    if err:
        raise RuntimeError(f"the well-behaved client's first query: {err}")
    c.watcher.start()
    return c


def raw(c, timeout=10):
    s = socket.create_connection(("127.0.0.1", c.port), timeout=timeout * H.MULT)
    return s


def read_all(s, seconds=10):
    """Reads until the server closes the connection; returns (bytes, closed).
    closed is False when the deadline passed with the connection open."""
    data = b""
    end = H.deadline(seconds)
    s.settimeout(0.2)
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def expect_error_close(c, payload, want, what):
    """Sends payload; the reply must be exactly the error line `want`, then the
    connection closes."""
    s = raw(c)
    try:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before taking it all; the reply is what counts
        data, closed = read_all(s)
    finally:
        s.close()
    wantb = f"-{want}\r\n".encode()
    if data != wantb or not closed:
        raise Failure(f"{what}: got {data[:300]!r} ({'closed' if closed else 'still open'}), "
                      f"want {wantb!r} then close")


def info(c):
    cli = c.tallyd.client()
    try:
        return cli.info()
    finally:
        cli.close()


def check_watcher(c, what):
    """The well-behaved client's state after a case, and one fresh query."""
    if c.tallyd.proc.poll() is not None:
        raise Failure(f"tallyd exited with {c.tallyd.proc.returncode} during {what}:\n"
                      + c.tallyd.log_tail())
    if c.watcher.errors:
        raise Failure(f"the well-behaved client got wrong answers during {what}: "
                      + "; ".join(c.watcher.errors[:3]))
    cli = H.Client(c.port)
    try:
        err = c.watcher.once(cli)
    finally:
        cli.close()
    if err:
        raise Failure(f"a fresh client after {what}: {err}")


def case(fn):
    def wrapped(c):
        fn(c)
        check_watcher(c, fn.__name__)
    wrapped.__name__ = fn.__name__
    wrapped.inner = fn
    return wrapped


# ---------------------------------------------------------------- cases

@case
def negative_multibulk_count_is_an_empty_request(c):
    # Redis skips "*0", "*-1" and any negative count; the connection goes on.
    s = H.Client(c.port)
    try:
        s.send(b"*-1\r\n*-5\r\n*0\r\n*1\r\n$4\r\nPING\r\n")
        r = s.read()
        if r != "PONG":
            raise Failure(f"got {r!r}, want PONG after the empty requests")
    finally:
        s.close()


@case
def huge_multibulk_count_is_a_protocol_error(c):
    expect_error_close(c, b"*99999999999\r\n$4\r\nPING\r\n", PROTO_ERR + "invalid multibulk length",
                       "*99999999999")
    expect_error_close(c, b"*9223372036854775808\r\n", PROTO_ERR + "invalid multibulk length",
                       "*2^63 (overflow)")
    expect_error_close(c, b"*12x\r\n", PROTO_ERR + "invalid multibulk length", "*12x")


@case
def million_arguments_exceed_max_args(c):
    n = 1_000_000
    head = b"*%d\r\n" % n
    # The start of the million (small, so tallyd reads it all before it closes
    # and no reset overtakes the reply); the header alone decides.
    body = b"$1\r\na\r\n" * 100
    expect_error_close(c, head + body, PROTO_ERR + "invalid multibulk length",
                       "1,000,000 arguments (max_args 65536)")
    # max_args itself is allowed: 65536 arguments reach the command.
    n = 65536 - 4
    ids = [str(USER)] * n
    cli = H.Client(c.port, timeout=30)
    try:
        r = cli.cmd("MFEATURES", "user", n, *ids, "clicks:1h")
    finally:
        cli.close()
    if not (isinstance(r, list) and len(r) == n and all(x == [CLICKS] for x in r)):
        raise Failure(f"MFEATURES with 65536 arguments: got {H.short(r)}, want {n} x [{CLICKS}]")


@case
def negative_and_huge_bulk_lengths_are_protocol_errors(c):
    for hdr in (b"$-1", b"$-3", b"$99999999999", b"$65537", b"$4x"):
        expect_error_close(c, b"*1\r\n" + hdr + b"\r\nPING\r\n", PROTO_ERR + "invalid bulk length",
                           hdr.decode())
    # At the limit (max_bulk 65536) an argument is accepted.
    cli = H.Client(c.port)
    try:
        r = cli.cmd("ECHO", b"x" * 65536)
    finally:
        cli.close()
    if r != b"x" * 65536:
        raise Failure(f"ECHO of 65536 bytes: got {H.short(r)}")


@case
def malformed_multibulk_framing_is_a_protocol_error(c):
    expect_error_close(c, b"*1\r\nPING\r\n", PROTO_ERR + "expected '$', got 'P'", "no '$'")
    expect_error_close(c, b"*1\r\n$4\r\nPINGxx\r\n", PROTO_ERR + "expected CRLF after bulk string",
                       "bulk without CRLF")


@case
def unterminated_lines_are_refused(c):
    # A count line that never ends, and an inline line that never ends.
    expect_error_close(c, b"*" + b"1" * 70_000, PROTO_ERR + "too big mbulk count string",
                       "endless '*' line")
    expect_error_close(c, b"*1\r\n$" + b"1" * 70_000, PROTO_ERR + "too big bulk count string",
                       "endless '$' line")
    expect_error_close(c, b"PING " + b"A" * (1 << 20), PROTO_ERR + "too big inline request",
                       "1 MiB inline line without newline")


@case
def unbalanced_quote_inline_is_a_protocol_error(c):
    expect_error_close(c, b'FEATURES "user 42\r\n', PROTO_ERR + "unbalanced quotes in request",
                       "FEATURES \"user 42")
    # Balanced quotes in an inline request are fine.
    s = raw(c)
    try:
        s.sendall(b'FEATURES "user" \'42\' clicks:1h ASOF ' + str(c.asof).encode() + b"\r\n")
        cli = H.Client.__new__(H.Client)
        cli.sock, cli.buf = s, b""
        r = cli.read()
    finally:
        s.close()
    if not H.same(r, [b"clicks:1h", CLICKS]):
        raise Failure(f"quoted inline FEATURES: got {r!r}")


@case
def binary_garbage_gets_an_error_not_a_crash(c):
    rng = random.Random(7)
    # Starting like a multibulk: a protocol error and a close.
    garbage = b"*\xff" + bytes(rng.randrange(256) for _ in range(8)) + b"\r\n" + \
        bytes(rng.randrange(256) for _ in range(4096))
    s = raw(c)
    try:
        try:
            s.sendall(garbage)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = read_all(s)
    finally:
        s.close()
    if not (data.startswith(b"-ERR Protocol error: ") and data.endswith(b"\r\n") and closed):
        raise Failure(f"'*'+binary: got {data[:200]!r} ({'closed' if closed else 'open'})")
    # Inline binary without quotes or line breaks: an unknown command.
    body = bytes(b for b in (rng.randrange(256) for _ in range(3000))
                 if b not in b"\r\n\"' \t\v\f\x00*")[:2000]
    cli = H.Client(c.port)
    try:
        cli.send(b"\x01" + body + b"\r\nPING\r\n")
        r1 = cli.read()
        r2 = cli.read()
    finally:
        cli.close()
    if not (isinstance(r1, RespError) and str(r1).startswith("ERR unknown command '") and r2 == "PONG"):
        raise Failure(f"inline binary: got {H.short(r1)}, {r2!r}; want ERR unknown command, PONG")


@case
def slow_client_is_closed_at_request_timeout(c):
    before = int(info(c).get("timeout_disconnects", "-1"))
    req = H.Client.encode("FEATURES", "user", USER, "clicks:1h", "ASOF", c.asof)
    # 1 byte per 100 ms: the request would take len(req)/10 s > request_timeout.
    assert len(req) / 10 > REQUEST_TIMEOUT_S + 1
    s = raw(c)
    start = time.monotonic()
    closed_at = None
    got = b""
    try:
        s.setblocking(False)
        for b in req:
            try:
                s.send(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            r, _, _ = select.select([s], [], [], 0.1)  # the 100 ms pacing, or an early close
            if r:
                try:
                    chunk = s.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                got += chunk
                if not chunk:
                    closed_at = time.monotonic()
                    break
    finally:
        s.close()
    if closed_at is None:
        raise Failure(f"a client sending 1 byte per 100 ms was not closed within "
                      f"{len(req) / 10:.1f} s (request_timeout {REQUEST_TIMEOUT_S} s); got {got!r}")
    took = closed_at - start
    if took < REQUEST_TIMEOUT_S - 0.2 or took > REQUEST_TIMEOUT_S + 2 * H.MULT:
        raise Failure(f"closed after {took:.2f} s, want about {REQUEST_TIMEOUT_S} s")
    if got not in (b"",):
        raise Failure(f"the slow client got {got!r} before the close, want nothing")
    after = int(info(c).get("timeout_disconnects", "-1"))
    if after != before + 1:
        raise Failure(f"INFO timeout_disconnects went {before} -> {after}, want +1")


@case
def flooding_client_that_never_reads_is_closed_at_the_cap(c):
    """Up to 1 GiB of pipelined CATALOG requests, never reading replies:
    tallyd stops reading (output_soft_limit), the client's replies do not
    move for server.output_stall (1 s), tallyd reads on until its replies
    reach server.max_output_buffer (64 MiB) and closes it: the sender is cut
    off long before 1 GiB and tallyd's memory stays bounded."""
    req = H.Client.encode("CATALOG")
    chunk = req * ((1 << 20) // len(req))
    clients0 = int(info(c)["connected_clients"])
    before = info(c)
    s = raw(c)
    s.setblocking(False)
    sent = 0
    rss_max = c.tallyd.rss_kb()
    closed = None
    end = H.deadline(60)
    try:
        view = memoryview(chunk)
        off = 0
        while sent < FLOOD_BYTES and time.monotonic() < end:
            _, w, _ = select.select([], [s], [], 0.1)
            rss_max = max(rss_max, c.tallyd.rss_kb())
            if not w:
                continue
            try:
                n = s.send(view[off:])
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                closed = e
                break
            sent += n
            off = (off + n) % len(chunk)
        rss_max = max(rss_max, c.tallyd.rss_kb())
        inf = info(c)
    finally:
        s.close()
    overflows = int(inf["output_buffer_disconnects"]) - int(before["output_buffer_disconnects"])
    stalls = int(inf["output_stalls"]) - int(before["output_stalls"])
    msg = (f"sent {sent / (1 << 20):.1f} MiB (bound {FLOOD_SENT_BOUND >> 20} MiB of "
           f"{FLOOD_BYTES >> 20} MiB), closed by tallyd: {closed!r}, tallyd peak RSS "
           f"{rss_max / 1024:.0f} MiB (bound {RSS_BOUND_KB / 1024:.0f} MiB), "
           f"output_buffer_disconnects +{overflows}, output_stalls +{stalls}")
    print(f"# {msg}", flush=True)
    if (closed is None or sent >= FLOOD_SENT_BOUND or rss_max >= RSS_BOUND_KB or
            overflows != 1 or stalls < 1):
        raise Failure(msg + "; want closed at the cap after a stall, within the bounds")
    # Its connection is released.
    end = H.deadline(10)
    while int(info(c)["connected_clients"]) != clients0:
        if time.monotonic() > end:
            raise Failure(f"connected_clients stayed at {info(c)['connected_clients']} after the "
                          f"flooding client closed, want {clients0}")
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


@case
def redis_py_pipeline_past_the_soft_limit_completes(c):
    """redis-py writes a whole pipeline before it reads a reply: 100,000
    FEATURES of every feature (hundreds of bytes a reply, far more than
    the kernel buffers and output_soft_limit hold) make tallyd pause that
    client while it is still writing. After output_stall tallyd reads on,
    and every reply comes back, each the value of the first."""
    import redis
    before = info(c)
    n = 100_000
    r = redis.Redis(host="127.0.0.1", port=c.port, socket_timeout=60 * H.MULT)
    try:
        p = r.pipeline(transaction=False)
        for _ in range(n):
            p.execute_command("FEATURES", "user", USER, "ASOF", c.asof)
        got = p.execute()
    finally:
        r.close()
    want = got[0] if got else None
    if not isinstance(want, list) or want[want.index(b"clicks:1h") + 1] != CLICKS:
        raise Failure(f"FEATURES user {USER}: {H.short(want)}, want clicks:1h {CLICKS} in it")
    wrong = [i for i, g in enumerate(got) if not H.same(g, want)]
    if len(got) != n or wrong:
        raise Failure(f"{len(got)} replies, {len(wrong)} wrong (first {wrong[:3]}: "
                      f"{[H.short(got[i]) for i in wrong[:3]]}), want {n} x {want!r}")
    inf = info(c)
    stalls = int(inf["output_stalls"]) - int(before["output_stalls"])
    print(f"# {n} pipelined FEATURES answered; output_stalls +{stalls}", flush=True)
    if stalls < 1:
        raise Failure("tallyd never paused the pipelining client: the case tests nothing")
    if int(inf["output_buffer_disconnects"]) != int(before["output_buffer_disconnects"]):
        raise Failure("the pipelining client was disconnected at the cap")


@case
def connections_beyond_max_clients_are_refused(c):
    base_cli = c.tallyd.client()
    try:
        base = int(base_cli.info()["connected_clients"])  # watcher + base_cli
        rejected0 = int(base_cli.info().get("rejected_connections", "-1"))
        socks = []
        try:
            for _ in range(10 * MAX_CLIENTS):
                socks.append(raw(c))
            results = []
            for s in socks:
                try:
                    s.sendall(b"PING\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                cli = H.Client.__new__(H.Client)
                cli.sock, cli.buf = s, b""
                r = cli.read_or_closed()
                if isinstance(r, RespError):
                    tail = cli.read_or_closed()  # then the close
                    if not isinstance(tail, Closed):
                        r = f"{r!r} without a close (then {tail!r})"
                results.append(r)
            accepted = sum(1 for r in results if r == "PONG")
            refused = sum(1 for r in results if r == RespError("ERR max number of clients reached"))
            want_acc = MAX_CLIENTS - base
            if accepted != want_acc or refused != len(socks) - want_acc:
                other = [r for r in results if r != "PONG"
                         and r != RespError("ERR max number of clients reached")][:3]
                raise Failure(f"{len(socks)} connections with {base} open and max_clients "
                              f"{MAX_CLIENTS}: {accepted} answered PONG (want {want_acc}), {refused} "
                              f"got '-ERR max number of clients reached' and a close (want "
                              f"{len(socks) - want_acc}); others: {other!r}")
            rejected1 = int(base_cli.info().get("rejected_connections", "-1"))
            if rejected1 - rejected0 != refused:
                raise Failure(f"INFO rejected_connections went {rejected0} -> {rejected1}, "
                              f"want +{refused}")
        finally:
            for s in socks:
                s.close()
        # Once they are gone, new clients are served again.
        end = H.deadline(10)
        while int(base_cli.info()["connected_clients"]) != base:
            if time.monotonic() > end:
                raise Failure("connected_clients did not return to "
                              f"{base} after closing the extra connections")
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
    finally:
        base_cli.close()


CLIENTS_MEMORY = 16 << 20
HOLDERS = 8
HOLD_BYTES = 3 << 20


@case
def clients_over_max_clients_memory_lose_the_largest(c):
    """A second tallyd with server.max_clients_memory 16 MiB: eight clients
    each leave 3 MiB of one request pending (a buffer of 4 MiB each, 32 MiB
    in all). Whenever the clients together pass 16 MiB, the largest of those
    over an even share is closed without a reply, so at most three stay; those stay
    connected, the count of buffers stays under the cap, and a client
    asking FEATURES is answered throughout."""
    tmp = Path(c.tmp) / "clients-memory"
    tmp.mkdir(exist_ok=True)
    port = H.free_port()
    path, _ = H.write_config(tmp, c.kafka.bootstrap, port, TOPIC, server_extra={
        "max_clients_memory": CLIENTS_MEMORY, "max_output_buffer": CLIENTS_MEMORY,
        "request_timeout": "5m"})
    t = H.Tallyd(path, port, tmp)
    socks = []
    try:
        t.wait_ingested(c.kafka.produced)
        cli = t.client()
        # 3 MiB of a request of 100 arguments of 60,000 bytes, never finished
        arg = b"$60000\r\n" + b"h" * 60000 + b"\r\n"
        payload = b"*100\r\n" + arg * (HOLD_BYTES // len(arg))
        info_bytes = len(H.Client.encode("INFO"))
        broken = 0
        closed = set()

        def note_closed():
            for s in socks:
                if s in closed or not select.select([s], [], [], 0)[0]:
                    continue
                try:
                    data = s.recv(4096)
                except ConnectionResetError:
                    data = b""
                if data:
                    raise Failure(f"a client over the cap got a reply: {data[:80]!r}")
                closed.add(s)

        for i in range(HOLDERS):
            # one holder at a time, each settled before the next: tallyd has
            # read all it sent (total_net_input_bytes, less this client's
            # INFO requests) or closed it
            before = int(cli.info()["total_net_input_bytes"])
            s = socket.create_connection(("127.0.0.1", port), timeout=30 * H.MULT)
            socks.append(s)
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                broken += 1  # closed while sending
            end = H.deadline(30)
            infos = 0
            while True:
                note_closed()
                if s in closed:
                    break
                infos += 1
                read = int(cli.info()["total_net_input_bytes"]) - before - infos * info_bytes
                if read >= len(payload):
                    break
                if time.monotonic() > end:
                    raise Failure(f"holder {i}: {read} of {len(payload)} bytes read, not closed, "
                                  f"after {30 * H.MULT:.0f} s")
                time.sleep(0.01)  # poll interval of a deadline-bounded wait
            got = cli.cmd("FEATURES", "user", USER, "clicks:1h", "ASOF", c.asof)
            if not H.same(got, [b"clicks:1h", CLICKS]):
                raise Failure(f"FEATURES while clients fill their buffers: {got!r}")
        inf = cli.info()
        evicted = int(inf.get("evicted_clients", "-1"))
        held = int(inf.get("clients_memory", "-1"))
        rss = t.rss_kb()
        # a connection counted as evicted is closed by the end of that loop
        # iteration, which may come just after the INFO reply
        end = H.deadline(10)
        note_closed()
        while len(closed) < evicted and time.monotonic() < end:
            time.sleep(0.01)  # poll interval of a deadline-bounded wait
            note_closed()
        closed = len(closed)
        msg = (f"{HOLDERS} clients holding {HOLD_BYTES >> 20} MiB each: evicted_clients "
               f"{evicted}, {closed} connections closed ({broken} while sending), "
               f"clients_memory {held} (cap {CLIENTS_MEMORY}), RSS {rss // 1024} MiB")
        print(f"# {msg}", flush=True)
        # 4 MiB buffers under a 16 MiB cap that the other clients' small
        # buffers also count against: three fit, the rest are closed
        if not (evicted == closed == HOLDERS - 3 and 0 < held <= CLIENTS_MEMORY):
            raise Failure(msg)
        if int(inf.get("maxclients_memory", "-1")) != CLIENTS_MEMORY:
            raise Failure(f"INFO maxclients_memory {inf.get('maxclients_memory')}")
        cli.close()
    finally:
        for s in socks:
            s.close()
        rc = t.close()
    if rc != 0:
        raise Failure(f"the second tallyd exited with {rc}:\n" + t.log_tail())


@case
def unauthenticated_clients_get_noauth_and_wrongpass(c):
    """A second tallyd with server.requirepass: commands before AUTH get
    -NOAUTH, a wrong password -WRONGPASS, the right one serves."""
    tmp = Path(c.tmp) / "auth"
    tmp.mkdir(exist_ok=True)
    port = H.free_port()
    path, _ = H.write_config(tmp, c.kafka.bootstrap, port, TOPIC,
                             server_extra={"requirepass": "s3cret"})
    t = H.Tallyd(path, port, tmp, ping_ok=("PONG", RespError("NOAUTH Authentication required.")))
    try:
        t.wait_ingested(c.kafka.produced, auth="s3cret")
        cli = t.client()
        try:
            got = [cli.cmd("FEATURES", "user", USER, "clicks:1h", "ASOF", c.asof),
                   cli.cmd("AUTH", "wrong"),
                   cli.cmd("FEATURES", "user", USER, "clicks:1h", "ASOF", c.asof),
                   cli.cmd("AUTH", "s3cret"),
                   cli.cmd("FEATURES", "user", USER, "clicks:1h", "ASOF", c.asof)]
        finally:
            cli.close()
        want = [RespError("NOAUTH Authentication required."),
                RespError("WRONGPASS invalid username-password pair or user is disabled."),
                RespError("NOAUTH Authentication required."), "OK", [b"clicks:1h", CLICKS]]
        if not H.same(got, want):
            raise Failure(H.first_difference(got, want))
    finally:
        rc = t.close()
    if rc != 0:
        raise Failure(f"the second tallyd exited with {rc}:\n" + t.log_tail())


def main():
    suite = H.Suite("badinput")
    try:
        c = setup()
    except Exception as e:
        suite.fail_setup("badinput_setup_starts_kafka_and_tallyd", e)
        return suite.finish()
    cases = [
        negative_multibulk_count_is_an_empty_request,
        huge_multibulk_count_is_a_protocol_error,
        million_arguments_exceed_max_args,
        negative_and_huge_bulk_lengths_are_protocol_errors,
        malformed_multibulk_framing_is_a_protocol_error,
        unterminated_lines_are_refused,
        unbalanced_quote_inline_is_a_protocol_error,
        binary_garbage_gets_an_error_not_a_crash,
        slow_client_is_closed_at_request_timeout,
        flooding_client_that_never_reads_is_closed_at_the_cap,
        redis_py_pipeline_past_the_soft_limit_completes,
        connections_beyond_max_clients_are_refused,
        clients_over_max_clients_memory_lose_the_largest,
        unauthenticated_clients_get_noauth_and_wrongpass,
    ]
    only = os.environ.get("TLY_BAD_ONLY")
    for fn in cases:
        if only and only not in fn.__name__:
            continue
        suite.run(fn.__name__, fn, c)
    c.watcher.stop()
    suite.run("well_behaved_client_was_answered_throughout", lambda: (
        (_ for _ in ()).throw(Failure("; ".join(c.watcher.errors[:5])))
        if c.watcher.errors or c.watcher.rounds == 0 else None))
    alive = c.tallyd.proc.poll() is None
    rc = c.tallyd.close()
    c.kafka.close()
    if not alive or rc != 0:
        suite.fail_setup("tallyd_stays_up_and_exits_0_on_sigterm",
                         f"tallyd {'died' if not alive else 'exited'} with {rc}:\n" + c.tallyd.log_tail())
    return H.finish(suite, c.tmp)


if __name__ == "__main__":
    sys.exit(main())
