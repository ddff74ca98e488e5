#!/usr/bin/env python3
"""The expiry sweeper of a running tallyd: an entity whose newest event is
older than its horizon is removed within store.sweep_every (and one step's
wait) of that, by the steps tallyd's main thread takes in turn. A real
tallyd on the embedded mock cluster, fed live events by the demo generator
(2,000 a second, event time = the wall clock), with features whose horizon
is 2 s (count windows of 2 s, nothing kept longer) and store.sweep_every 1s;
no Kafka broker needed.

Checked, from INFO sampled every 100 ms for 12 s: expired_entities grows
while the generator runs; and at every sample from the sixth second on,
the entities held are at most twice the events applied in the 4.5 s before
(each event names one user and one pin; a held entity has an event at most
2 s + 1 s + 0.25 s old by event time, which the 1.25 s left cover from
production to apply). Without the sweeper the store would hold every user
and pin seen since the start."""
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

HORIZON_S = 2.0
SWEEP_EVERY_S = 1.0
STEP_WAIT_MAX_S = 0.25  # TLY_SWEEP_WAIT_MAX_MS
SLACK_S = 1.25
RATE = 2000
RUN_S = 12.0


def config(tmp, port):
    cfg = H.demo_config()
    cfg["server"] = {"listen": f"127.0.0.1:{port}", "admin": ""}
    cfg["snapshot"] = {"dir": str(Path(tmp) / "snapshots")}
    cfg["store"] = {"sweep_every": f"{SWEEP_EVERY_S:.0f}s"}
    cfg["demo"] = dict(cfg.get("demo", {}), events_per_sec=RATE, history=0)
    w = f"{HORIZON_S:.0f}s"
    cfg["features"] = [
        {"name": "clicks", "entity": "user", "key": "user_id", "where": {"action": "click"},
         "agg": "count", "windows": [w], "hop": "1s"},
        {"name": "events", "entity": "user", "key": "user_id", "agg": "count",
         "windows": [w], "hop": "1s"},
        {"name": "impressions", "entity": "pin", "key": "pin_id", "agg": "count",
         "windows": [w], "hop": "1s"},
    ]
    path = Path(tmp) / "tallyd.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def t_idle_entities_expire_while_serving(tmp):
    port = H.free_port()
    td = H.Tallyd(config(tmp, port), port, tmp)
    try:
        c = td.client()
        samples = []  # (seconds since start, events_applied, entities, expired_entities)
        t0 = time.monotonic()
        while time.monotonic() - t0 < RUN_S * H.MULT:
            if td.proc.poll() is not None:
                raise H.Failure(f"tallyd exited with {td.proc.returncode}:\n{td.log_tail()}")
            i = c.info()
            samples.append((time.monotonic() - t0, int(i["events_applied"]),
                            int(i["entities"]), int(i["expired_entities"])))
            time.sleep(0.1)  # the sampling interval, not a synchronisation
        c.close()
        m = H.Mismatches()
        applied_end, expired_end = samples[-1][1], samples[-1][3]
        m.check(applied_end > RATE * 4, f"only {applied_end} events applied in {RUN_S:.0f} s")
        m.check(expired_end > 0, f"nothing expired in {RUN_S:.0f} s ({applied_end} applied)")
        back = HORIZON_S + SWEEP_EVERY_S + STEP_WAIT_MAX_S + SLACK_S
        checked = 0
        for t, applied, entities, _ in samples:
            if t < 6.0:
                continue
            # events applied since t - back: from the last sample at or
            # before then (an earlier sample only loosens the bound)
            before = [s[1] for s in samples if s[0] <= t - back]
            if not before:
                continue
            bound = 2 * (applied - before[-1])
            checked += 1
            m.check(entities <= bound,
                    f"at {t:.1f} s: {entities} entities held, more than twice the "
                    f"{applied - before[-1]} events applied in the {back} s before")
        m.check(checked >= 20, f"only {checked} samples checked")
        m.done()
    finally:
        td.close()


def main():
    H.check_binaries(H.TALLYD)
    tmp = H.make_tmpdir("tly-sweeper-")
    suite = H.Suite("sweeper")
    suite.run("idle_entities_expire_while_serving", t_idle_entities_expire_while_serving, tmp)
    return H.finish(suite, tmp)


if __name__ == "__main__":
    sys.exit(main())
