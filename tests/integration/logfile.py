#!/usr/bin/env python3
"""tallyd --log FILE: log lines go to FILE instead of stderr, and SIGHUP
reopens it, so a log rotated by renaming (logrotate without copytruncate)
goes on in a new file at the same path while nothing more lands in the old
one. A real tallyd on the embedded mock cluster with config/demo.yaml's
features and a slow demo generator; no Kafka broker needed.

Checked: tallyd serves with --log; its start-up lines are in FILE and none
on stderr (stdout keeps the demo's banner); after the file is renamed and SIGHUP sent, a new FILE appears
holding the reopen line; when the path cannot be opened at a SIGHUP the
error lands in the file still open; the shutdown lines of SIGTERM land in
the newest file, not in the renamed ones; tallyd exits 0. Without --log,
SIGHUP says there is nothing to reopen. --log with another action, and a log
path that cannot be opened, are refused at once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402


def config(tmp, port):
    cfg = H.demo_config()
    cfg["server"] = {"listen": f"127.0.0.1:{port}", "admin": ""}
    cfg["snapshot"] = {"dir": str(Path(tmp) / "snapshots")}
    cfg["demo"] = dict(cfg.get("demo", {}), events_per_sec=100, history=0)
    path = Path(tmp) / "tallyd.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def wait_for(cond, seconds, what):
    end = H.deadline(seconds)
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)  # poll interval of a deadline-bounded wait
    raise H.Failure(f"{what} within {seconds * H.MULT:.0f} s")


def read(p):
    try:
        return Path(p).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def t_log_file_and_sighup_reopen(tmp):
    port = H.free_port()
    log = Path(tmp) / "tallyd.log"
    err_path = Path(tmp) / "stderr.txt"
    # stdout: the demo's banner and progress lines, for a terminal
    with open(err_path, "w") as err, open(Path(tmp) / "stdout.txt", "w") as out:
        proc = H.spawn([H.TALLYD, "--config", config(tmp, port), "--log", log],
                       stdout=out, stderr=err)
    try:
        def serving():
            if proc.poll() is not None:
                raise H.Failure(f"tallyd exited with {proc.returncode}:\n{read(err_path)}"
                                f"{read(log)}")
            try:
                c = H.Client(port, timeout=2)
                ok = c.cmd("PING") == "PONG"
                c.close()
                return ok
            except OSError:
                return False
        wait_for(serving, 20, "tallyd did not answer PING")
        m = H.Mismatches()
        first = read(log)
        m.check(" INFO " in first, f"no INFO line in {log}: {first[:300]!r}")
        m.eq(read(err_path), "", "stderr with --log")
        rotated = Path(tmp) / "tallyd.log.1"
        os.rename(log, rotated)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: f"SIGHUP: reopened the log {log}" in read(log), 10,
                 f"no new {log} with the reopen line after SIGHUP")
        # the path cannot be opened at the next rotation (a directory took
        # it): the error goes to the file still open, and lines go on there
        rotated2 = Path(tmp) / "tallyd.log.2"
        os.rename(log, rotated2)
        os.mkdir(log)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: f"SIGHUP: cannot reopen the log {log}: Is a directory" in
                 read(rotated2), 10, f"no error line in {rotated2} after SIGHUP")
        os.rmdir(log)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: f"SIGHUP: reopened the log {log}" in read(log), 10,
                 f"no new {log} with the reopen line after the second SIGHUP")
        before, before2 = read(rotated), read(rotated2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30 * H.MULT)
        m.eq(rc, 0, "exit status after SIGTERM")
        after = read(log)
        m.check("SIGTERM: shutting down" in after and " stopped" in after,
                f"the shutdown lines are not in the new {log}: {after[-400:]!r}")
        m.eq(read(rotated), before, f"{rotated} after the reopen (nothing more written)")
        m.eq(read(rotated2), before2, f"{rotated2} after the reopen (nothing more written)")
        m.check("SIGTERM" not in read(rotated) + read(rotated2), "a rotated file got the "
                "shutdown lines")
        m.eq(read(err_path), "", "stderr with --log")
        m.done()
    finally:
        H.stop(proc)


def t_sighup_without_log_says_so(tmp):
    port = H.free_port()
    err_path = Path(tmp) / "stderr-nolog.txt"
    with open(err_path, "w") as err, open(Path(tmp) / "stdout-nolog.txt", "w") as out:
        proc = H.spawn([H.TALLYD, "--config", config(tmp, port)], stdout=out, stderr=err)
    try:
        wait_for(lambda: " INFO " in read(err_path), 20, "no INFO line on stderr")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: the log goes to stderr (no --log); nothing to reopen" in
                 read(err_path), 10, "no line on stderr after SIGHUP")
        m = H.Mismatches()
        m.check("reopened" not in read(err_path), "stderr claims a reopen without --log")
        proc.send_signal(signal.SIGTERM)
        m.eq(proc.wait(timeout=30 * H.MULT), 0, "exit status after SIGTERM")
        m.done()
    finally:
        H.stop(proc)


def t_log_refused_without_config_or_unopenable(tmp):
    m = H.Mismatches()
    r = subprocess.run([H.TALLYD, "--check-config", "config/demo.yaml", "--log",
                        str(Path(tmp) / "x.log")], capture_output=True, text=True,
                       cwd=H.REPO, timeout=30)
    m.eq(r.returncode, 2, "--log with --check-config: exit status")
    m.check("usage:" in r.stderr, f"--log with --check-config: stderr {r.stderr!r}")
    bad = Path(tmp) / "no-such-dir" / "tallyd.log"
    r = subprocess.run([H.TALLYD, "--config", "config/demo.yaml", "--log", str(bad)],
                       capture_output=True, text=True, cwd=H.REPO, timeout=30)
    m.eq(r.returncode, 1, "unopenable --log: exit status")
    m.check(f"cannot open log file {bad}: No such file or directory" in r.stderr,
            f"unopenable --log: stderr {r.stderr!r}")
    m.done()


def main():
    H.check_binaries(H.TALLYD)
    tmp = H.make_tmpdir("tly-logfile-")
    suite = H.Suite("logfile")
    suite.run("log_file_gets_the_lines_sighup_reopens_it_after_a_rename",
              t_log_file_and_sighup_reopen, tmp)
    suite.run("sighup_without_log_says_there_is_nothing_to_reopen",
              t_sighup_without_log_says_so, tmp)
    suite.run("log_with_another_action_or_unopenable_path_is_refused",
              t_log_refused_without_config_or_unopenable, tmp)
    return H.finish(suite, tmp)


if __name__ == "__main__":
    sys.exit(main())
