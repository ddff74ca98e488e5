#!/usr/bin/env bash
# bench/run.sh — runs tallyd's benchmarks and prints their tables.
#
# `make bench` builds every bench/*.c into $BUILD/bench/ and then runs this
# script from anywhere; it works from the repository root. The benchmarks are
# a sequence of steps: each step is a function `step_<name>` that runs one
# benchmark and prints its table, self-contained (its own flags, its own
# environment knobs). Add a benchmark by writing its step function and adding
# its name to STEPS; a failing step is reported and does not stop the others.
#
# Usage: bench/run.sh [STEP...]        (default: every step in STEPS)
# Environment:
#   BUILD        build directory holding bench/ (default: build)
#   INGEST_ARGS  extra flags for build/bench/ingest, e.g. "--quick" or
#                "--events 500000" (see `build/bench/ingest --help`)
#   QUERY_ARGS   extra flags for build/bench/query, e.g. "--quick" (see
#                `build/bench/query --help`)
set -uo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
STEPS=(ingest memory query kafka restart)

# need STEP FILE... — fails the step, saying how to get it, unless every
# FILE is executable; "redis-server" stands for the installed command.
need() {
  local step=$1 f
  shift
  for f in "$@"; do
    if [ "$f" = redis-server ]; then
      command -v redis-server >/dev/null 2>&1 && continue
      echo "$step: redis-server is not installed (make deps installs it)" >&2
      return 1
    fi
    [ -x "$f" ] && continue
    echo "$step: $f is missing; build it with 'make $f'" >&2
    return 1
  done
}

# start_redis DIR — starts a redis-server without persistence on a free
# loopback port, its files in DIR, waits until it answers, prints the port.
start_redis() {
  local dir=$1 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  for _ in $(seq 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "$port"
}

# Ingest throughput: jsmn, decode, decode+apply with 1 and 2 writers, a bare
# librdkafka consumer on the in-process mock cluster, and the cost split of
# one writer (bench/README.md, "Ingest").
step_ingest() {
  local bin="$BUILD/bench/ingest"
  need ingest "$bin" || return 1
  # shellcheck disable=SC2086 # INGEST_ARGS is a flag list, split on purpose
  "$bin" ${INGEST_ARGS:-}
}

# Memory per entity: the store next to a local redis-server holding the same
# aggregates (bench/README.md, "Memory"). Starts its own redis-server on a
# free loopback port, with no persistence, and stops it afterwards.
#   MEMORY_ARGS  extra flags for build/bench/memory, e.g. "--sparse 200000"
step_memory() {
  local bin="$BUILD/bench/memory"
  need memory "$bin" redis-server || return 1
  local port dir rc
  dir=$(mktemp -d)
  port=$(start_redis "$dir")
  # shellcheck disable=SC2086 # MEMORY_ARGS is a flag list, split on purpose
  "$bin" --port "$port" ${MEMORY_ARGS:-}
  rc=$?
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1
  rm -rf "$dir"
  return $rc
}

# Query throughput and latency: tallyd next to redis-server serving the same
# aggregates, one load client for both (bench/README.md, "Queries"). The
# benchmark starts everything it measures itself: the Kafka mock cluster (in
# its own process), tallyd and redis-server on free loopback ports. It stops
# them on exit and on SIGINT/SIGTERM, and they get SIGKILL from the kernel if
# the benchmark dies (PR_SET_PDEATHSIG), so no trap is needed here.
#   QUERY_ARGS   extra flags for build/bench/query, e.g. "--quick"
step_query() {
  local bin="$BUILD/bench/query"
  need query "$bin" "$BUILD/tallyd" redis-server || return 1
  # shellcheck disable=SC2086 # QUERY_ARGS is a flag list, split on purpose
  "$bin" --tallyd "$BUILD/tallyd" ${QUERY_ARGS:-}
}

# Kafka end to end (bench/README.md, "Kafka: ingest end to end, freshness,
# and a Redis loader"): a real tallyd process consuming a preloaded topic
# from a real broker (scripts/kafka.sh) and from the mock cluster of
# build/itest/mockkafka, next to a bare librdkafka consumer and a pipelined
# HINCRBY loader into redis-server; then produce → visible latency at a
# steady rate. Starts the broker and redis-server on free loopback ports in
# a temporary directory and stops both on every exit path (the trap of the
# subshell); tallyd and mockkafka are children of the benchmark, which
# stops them itself (and the kernel kills them if it dies).
# The broker runs with Kafka's stock JVM settings (scripts/kafka.sh,
# TLY_KAFKA_JVM=stock) unless TLY_KAFKA_JVM says otherwise.
#   KAFKA_ARGS   extra flags for build/bench/kafka, e.g. "--quick"
step_kafka() {
  local bin="$BUILD/bench/kafka" mock="$BUILD/itest/mockkafka"
  need kafka "$bin" "$BUILD/tallyd" redis-server || return 1
  if [ ! -x "$mock" ]; then
    make --no-print-directory BUILD="$BUILD" "$mock" >&2 ||
      echo "kafka: $mock could not be built; the mock-cluster rows are skipped" >&2
  fi
  (
    dir=$(mktemp -d /tmp/tallyd-bench-kafka-step.XXXXXX)
    stop_all() {
      redis-cli -p "${port:-0}" shutdown nosave >/dev/null 2>&1
      bash scripts/kafka.sh stop --dir "$dir/kafka" >/dev/null 2>&1
      rm -rf "$dir"
    }
    trap stop_all EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    line=$(TLY_KAFKA_JVM=${TLY_KAFKA_JVM:-stock} bash scripts/kafka.sh start --dir "$dir/kafka") || {
      echo "kafka: scripts/kafka.sh start failed" >&2
      exit 1
    }
    bootstrap=${line#KAFKA }
    port=$(start_redis "$dir")
    args=(--tallyd "$BUILD/tallyd" --bootstrap "$bootstrap" --redis-port "$port")
    [ -x "$mock" ] && args+=(--mockkafka "$mock")
    # shellcheck disable=SC2086 # KAFKA_ARGS is a flag list, split on purpose
    TMPDIR=$dir "$bin" "${args[@]}" ${KAFKA_ARGS:-}
  )
}

# Restart to ready (bench/README.md, "Restart: from a snapshot vs from Kafka
# history"): tallyd rebuilding 1,000,000 users from a preloaded topic on a
# real broker, against tallyd restarting from its snapshot; the snapshot's
# write time, size and fork pause, also while a producer streams 20,000
# events/s; and redis-server restarting from an RDB of the same state as the
# peer. bench/restart.py (/usr/bin/python3, confluent_kafka) spawns tallyd,
# redis-server and its producer itself, with PR_SET_PDEATHSIG, and lists
# their pids in the step's directory; the trap of the subshell stops those
# that are still alive, the broker, and removes the directory on every exit
# path.
#   RESTART_ARGS  extra flags for bench/restart.py, e.g. "--quick" (100,000
#                 users) or "--no-redis" (see `bench/restart.py --help`)
step_restart() {
  need restart "$BUILD/tallyd" || return 1
  if ! /usr/bin/python3 -c 'import confluent_kafka' 2>/dev/null; then
    echo "restart: /usr/bin/python3 has no confluent_kafka (make deps installs python3-confluent-kafka)" >&2
    return 1
  fi
  (
    dir=$(mktemp -d /tmp/tallyd-bench-restart-step.XXXXXX)
    stop_all() {
      local pid name
      if [ -f "$dir/pids" ]; then
        while read -r pid name; do
          # only a process of ours: its name as spawned, still alive
          if kill -0 "$pid" 2>/dev/null && grep -qa "$name" "/proc/$pid/cmdline" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null
          fi
        done <"$dir/pids"
      fi
      bash scripts/kafka.sh stop --dir "$dir/kafka" >/dev/null 2>&1
      rm -rf "$dir"
    }
    trap stop_all EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    line=$(bash scripts/kafka.sh start --dir "$dir/kafka") || {
      echo "restart: scripts/kafka.sh start failed" >&2
      exit 1
    }
    # shellcheck disable=SC2086 # RESTART_ARGS is a flag list, split on purpose
    TMPDIR=$dir /usr/bin/python3 bench/restart.py --tallyd "$BUILD/tallyd" \
      --bootstrap "${line#KAFKA }" --pidfile "$dir/pids" ${RESTART_ARGS:-}
  )
}

if [ $# -gt 0 ]; then
  STEPS=("$@")
fi

failed=()
for step in "${STEPS[@]}"; do
  if ! declare -F "step_$step" >/dev/null; then
    echo "bench: no step named '$step' (known: $(declare -F | sed -n 's/^declare -f step_//p' | tr '\n' ' '))" >&2
    failed+=("$step")
    continue
  fi
  echo "=== bench: $step"
  if ! "step_$step"; then
    failed+=("$step")
  fi
  echo
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "bench: failed: ${failed[*]}"
  exit 1
fi
echo "bench: ${#STEPS[@]} step(s) done"
