#!/usr/bin/env bash
# Runs tallyd's test binaries and ends with one summary line:
#   "N passed, N failed"
# Usage: run-tests.sh            release unit tests + the concurrent tests under TSan
#                                + the integration tests (real tallyd, Kafka
#                                  mock cluster, Redis clients; tests/integration)
#                                + the same against a real Apache Kafka broker
#                                  (scripts/kafka.sh; needs Java 17 and Maven)
#        run-tests.sh BUILD_DIR  every unit test of that build (asan/tsan variants)
# Each binary is a cmocka suite; its "[  PASSED  ] N" / "[  FAILED  ] N" lines
# are summed, and so are the integration scripts' lines of the same form. A
# suite that crashes or exits non-zero without a FAILED line counts as one
# failure, so nothing fails silently.
set -u
cd "$(dirname "$0")/.."

passed=0
failed=0
failures=()

run_one() { # label, binary, [env...]
  local label=$1 bin=$2
  shift 2
  run_cmd "$label" env "$@" "$bin"
}

run_cmd() { # label, command...
  local label=$1
  shift
  local log
  log=$(mktemp)
  echo "--- $label"
  "$@" >"$log" 2>&1
  local rc=$?
  local p f
  p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
  f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
  p=${p:-0}
  f=${f:-0}
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    f=1
  fi
  if [ "$f" -ne 0 ] || [ "$rc" -ne 0 ]; then
    cat "$log"
    failures+=("$label")
  else
    grep -E '^\[ *(OK|PASSED) *\]|^# ' "$log" | grep -v '^\[       OK \]' || true
  fi
  passed=$((passed + p))
  failed=$((failed + f))
  rm -f "$log"
}

if [ $# -ge 1 ]; then
  dir=$1
  for t in "$dir"/tests/test_*; do
    [ -x "$t" ] || continue
    run_one "$(basename "$dir")/$(basename "$t")" "$t" TLY_TEST_SCALE=small \
      TSAN_OPTIONS="halt_on_error=1 exitcode=66 suppressions=$PWD/tests/tsan.supp"
  done
else
  for t in build/tests/test_*; do
    [ -x "$t" ] || continue
    run_one "$(basename "$t")" "$t"
  done
  # The concurrent tests again under ThreadSanitizer, at a documented
  # smaller scale (TLY_TEST_SCALE=small: see tests/unit/test_model.c).
  for name in test_table test_store test_model test_server test_commands test_apply; do
    t=build/tsan/tests/$name
    [ -x "$t" ] || continue
    run_one "tsan/$name" "$t" TLY_TEST_SCALE=small \
      TSAN_OPTIONS="halt_on_error=1 exitcode=66 suppressions=$PWD/tests/tsan.supp"
  done
  # decode.c and feature.c with the byte-at-a-time readers big-endian hosts
  # use (make test builds it with PORTABLE=1).
  t=build/portable/tests/test_decode
  [ -x "$t" ] && run_one "portable/test_decode" "$t"
  # Integration: a real tallyd fed through a Kafka mock cluster, queried with
  # redis-cli, hiredis and redis-py. The Python environment (redis-py 5 for
  # RESP3) comes from scripts/pydeps.sh. Each script stays far below its
  # time limit; the limit only stops a hang (the scripts clean up on SIGTERM).
  py=$(bash scripts/pydeps.sh | tail -1)
  for name in e2e badinput logfile sweeper; do
    run_cmd "integration/$name" timeout 240 "$py" "tests/integration/$name.py"
  done
  # Faults of the mock cluster (brokers down, Fetch errors, coordinator and
  # leader moves) during a steady stream: tallyd must still count each event
  # exactly once (about 2 minutes).
  run_cmd "integration/kafka_faults" timeout 420 "$py" "tests/integration/kafka_faults.py"
  # Integration against a real Apache Kafka broker (scripts/kafka.sh: Kafka
  # from Maven Central, run on the machine's Java): one broker for the
  # phase, stopped at the end whatever happened. A broker that cannot be
  # fetched or started is a failure, never a skip.
  kdir=build/kafka-test
  trap 'bash scripts/kafka.sh stop --dir "$kdir" >/dev/null 2>&1' EXIT
  echo "--- integration/kafka broker"
  klog=$(mktemp)
  if bash scripts/kafka.sh start --dir "$kdir" >"$klog" 2>&1; then
    grep '^KAFKA ' "$klog"
    bootstrap=$(sed -n 's/^KAFKA //p' "$klog")
    for name in kafka_exact kafka_replica kafka_fetch kafka_bootstrap kafka_window_start kafka_shard kafka_shard_grow kafka_durability kafka_diskfault kafka_redefine kafka_undecodable; do
      run_cmd "integration/$name" env TLY_KAFKA_BOOTSTRAP="$bootstrap" \
        timeout 240 "$py" "tests/integration/$name.py"
    done
  else
    cat "$klog"
    failures+=("integration/kafka-broker")
    failed=$((failed + 1))
  fi
  rm -f "$klog"
  bash scripts/kafka.sh stop --dir "$kdir"
  trap - EXIT
fi

echo
if [ ${#failures[@]} -gt 0 ]; then
  echo "failing suites: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
