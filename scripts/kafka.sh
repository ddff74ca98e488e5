#!/usr/bin/env bash
# A local Apache Kafka broker for the real-broker tests and for trying tallyd
# against real Kafka: one KRaft node (broker and controller in one JVM) on
# loopback.
#
# Usage: scripts/kafka.sh start|stop|status [--dir DIR]     (DIR: build/kafka)
#
# start   Resolves Apache Kafka (version in scripts/kafka/pom.xml) and its
#         runtime dependencies from Maven Central into the local Maven
#         repository (~/.m2; the resolved classpath is remembered in the
#         cache below, so later runs do not run Maven), formats a fresh
#         storage directory (DIR/data, removed first) with a new cluster id,
#         starts the broker on a free loopback port and a free controller
#         port with the machine's Java (17 or later; JAVA overrides), waits
#         until it answers a metadata request listing itself as a live
#         broker, writes DIR/bootstrap (host:port) and DIR/pid, and prints
#         "KAFKA 127.0.0.1:PORT". Already running (DIR/pid alive): prints the
#         same line and changes nothing. Any failure (no Java, Maven cannot
#         fetch, format fails, the broker dies or does not answer within
#         TLY_KAFKA_START_TIMEOUT seconds, default 120, stretched by
#         TLY_TEST_TIMEOUT_MULT) exits non-zero saying why, and a broker it
#         started is stopped again.
# stop    SIGTERM to the pid in DIR/pid, SIGKILL after 30 s; removes nothing
#         (DIR/kafka.log keeps the broker's log). After the first run of a
#         Kafka/Java version it also builds the class-data archive that
#         makes later starts fast (see cds_key; ~10 s of CPU, once).
# status  Prints "running 127.0.0.1:PORT pid N" (exit 0) or "stopped" (exit 3).
#
# Settings are those of a single node: replication factor 1 for the internal
# topics, no initial rebalance delay, 8 partitions per topic by default, no
# topic auto-creation, no retention limit (tests produce events weeks old
# on purpose), a 512 MiB heap.
#
# JVM: by default tuned for a fast start on a small machine (C1 only, the
# serial collector). TLY_KAFKA_JVM=stock runs the broker with the JVM
# settings of Kafka's own bin/kafka-server-start.sh instead (1 GiB heap, G1
# with a 20 ms pause goal, the full JIT): slower to start, steadier under
# load; the benchmarks use it. TLY_KAFKA_JVM=zgc: the stock settings with
# the Z collector instead of G1.
#
# Cache: TLY_KAFKA_CACHE (default ~/.cache/tallyd-kafka) keeps the resolved
# classpath and the class-data archive across runs and work trees, as ~/.m2
# keeps the jars.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

usage() {
  echo "usage: scripts/kafka.sh start|stop|status [--dir DIR]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
CMD=$1
shift
DIR=build/kafka
while [ $# -gt 0 ]; do
  case $1 in
    --dir)
      [ $# -ge 2 ] || usage
      DIR=$2
      shift 2
      ;;
    *) usage ;;
  esac
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

JAVA=${JAVA:-java}
PY=/usr/bin/python3
POM=$REPO/scripts/kafka/pom.xml
MULT=${TLY_TEST_TIMEOUT_MULT:-1}
HOST=127.0.0.1
# Machine-wide cache (like ~/.m2): resolved classpaths and class-data archives.
CACHE=${TLY_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tallyd-kafka}
mkdir -p "$CACHE"

die() {
  echo "kafka.sh: $*" >&2
  exit 1
}

# The pid in DIR/pid when that process is alive and is this DIR's broker (a
# reused pid belonging to something else does not count).
broker_pid() {
  local pid
  [ -f "$DIR/pid" ] || return 1
  pid=$(cat "$DIR/pid")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $DIR/server.properties" || return 1
  echo "$pid"
}

# Exit 0 when the broker at $1 answers a metadata request listing at least
# one live broker (a fenced broker is not listed, so this also means it
# accepts topics).
probe() {
  "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys
from confluent_kafka.admin import AdminClient
a = AdminClient({"bootstrap.servers": sys.argv[1], "socket.timeout.ms": 2000,
                 "log_level": 0})
md = a.list_topics(timeout=2)
sys.exit(0 if md.brokers else 1)
EOF
}

secs() { # seconds * TLY_TEST_TIMEOUT_MULT, as an integer
  awk -v s="$1" -v m="$MULT" 'BEGIN { printf "%d", s * m + 0.5 }'
}

check_tools() {
  command -v "$JAVA" >/dev/null 2>&1 || die "no Java ('$JAVA' not found): install openjdk-17-jre-headless (make deps)"
  local v
  v=$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  [ -n "$v" ] && [ "$v" -ge 17 ] || die "Kafka 4 needs Java 17 or later; '$JAVA' is version '${v:-unknown}'"
  command -v mvn >/dev/null 2>&1 || die "no Maven (mvn) to fetch Kafka with: install maven (make deps)"
  "$PY" -c 'import confluent_kafka' 2>/dev/null ||
    die "$PY has no confluent_kafka (used to see that the broker answers): install python3-confluent-kafka (make deps)"
}

# Prints the broker's classpath. Maven resolves it (downloading what the
# local repository lacks); the result is cached in CACHE under the pom's
# checksum and reused while every jar on it still exists.
classpath() {
  local key cp jar ok=1 file
  key=$(sha256sum "$POM" | cut -d' ' -f1)
  file=$CACHE/classpath-$key
  if [ -f "$file" ]; then
    cp=$(cat "$file")
    IFS=: read -r -a jars <<<"$cp"
    for jar in "${jars[@]}"; do
      [ -f "$jar" ] || ok=0
    done
    if [ "$ok" -eq 1 ] && [ -n "$cp" ]; then
      echo "$cp"
      return 0
    fi
  fi
  echo "kafka.sh: resolving Kafka with Maven (the first run downloads about 60 MB into ~/.m2)" >&2
  if ! mvn -B -q -f "$POM" dependency:build-classpath -Dmdep.includeScope=runtime \
    -Dmdep.outputFile="$file.tmp.$$" >"$DIR/mvn.log" 2>&1; then
    rm -f "$file.tmp.$$"
    tail -30 "$DIR/mvn.log" >&2
    die "Maven could not resolve Kafka from $POM (is Maven Central reachable? log: $DIR/mvn.log)"
  fi
  mv "$file.tmp.$$" "$file"
  cat "$file"
}

# Class data sharing. Loading and verifying Kafka's ~7,000 classes from the
# jars is most of a cold start (tens of seconds on a busy 2-core machine); a
# CDS archive of them makes format and start take a few seconds. A broker
# started without an archive records the classes it loads
# (-XX:DumpLoadedClassList to DIR/classes.lst); `stop`, once that broker
# has exited, builds the archive from the list (java -Xshare:dump) into the
# cache. The archive is only valid for this classpath, these jars and this
# Java build, so its name is a checksum of all three; a stale or unreadable
# archive is a warning to the JVM, which then loads classes from the jars.
cds_key() { # classpath
  local jars
  IFS=: read -r -a jars <<<"$1"
  { "$JAVA" -version 2>&1; echo "$1"; stat -c '%n %s %Y' "${jars[@]}"; } | sha256sum | cut -d' ' -f1
}

# Builds the archive DIR/cds.pending names from DIR/classes.lst. Run by stop
# after the broker exited; failures only cost speed, so they are reported
# and otherwise ignored.
cds_dump() {
  [ -f "$DIR/cds.pending" ] && [ -s "$DIR/classes.lst" ] || return 0
  local jsa cp
  jsa=$(sed -n 1p "$DIR/cds.pending")
  cp=$(sed -n 2p "$DIR/cds.pending")
  rm -f "$DIR/cds.pending"
  [ -f "$jsa" ] && return 0
  echo "kafka.sh: building the class-data archive for faster starts (once per Kafka/Java version)" >&2
  if "$JAVA" -Xshare:dump -XX:SharedClassListFile="$DIR/classes.lst" \
    -XX:SharedArchiveFile="$jsa.tmp.$$" -cp "$cp" >"$DIR/cds.log" 2>&1; then
    mv "$jsa.tmp.$$" "$jsa"
  else
    rm -f "$jsa.tmp.$$"
    echo "kafka.sh: building $jsa failed (log: $DIR/cds.log); starts stay slower" >&2
  fi
}

free_ports() { # prints two distinct free loopback ports
  "$PY" - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

cluster_id() { # Kafka's Uuid text: 16 random bytes, base64url, no padding
  "$PY" - <<'EOF'
import base64, os
while True:
    s = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    if not s.startswith("-"):  # would read as an option
        print(s)
        break
EOF
}

write_properties() { # port, controller port
  cat >"$DIR/server.properties" <<EOF
# Written by scripts/kafka.sh: one KRaft node on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$2
listeners=PLAINTEXT://$HOST:$1,CONTROLLER://$HOST:$2
advertised.listeners=PLAINTEXT://$HOST:$1
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DIR/data
num.partitions=8
default.replication.factor=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.ms=-1
log.cleaner.dedupe.buffer.size=8388608
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
EOF
}

start() {
  local pid
  if pid=$(broker_pid); then
    local bs
    bs=$(cat "$DIR/bootstrap" 2>/dev/null || true)
    [ -n "$bs" ] && probe "$bs" || die "a broker (pid $pid) runs for $DIR but does not answer at '${bs:-?}'; scripts/kafka.sh stop --dir $DIR first"
    echo "KAFKA $bs"
    return 0
  fi
  check_tools
  local cp ports port cport id deadline
  cp=$(classpath)
  rm -rf "$DIR/data" "$DIR/bootstrap" "$DIR/pid"
  mkdir -p "$DIR/data" "$DIR/logs"
  ports=$(free_ports)
  port=${ports% *}
  cport=${ports#* }
  write_properties "$port" "$cport"
  id=$(cluster_id)
  # Start-up cost dominates on a small shared machine: C1 only (the JIT's
  # C2 compiles compete with start-up for the cores and a test broker does
  # not need C2's code), the serial collector (no GC threads) and an
  # application class-data archive (cds_key).
  local jvm=(-Xmx512m -Xms64m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData)
  case ${TLY_KAFKA_JVM:-small} in
  small) ;;
  stock) # bin/kafka-server-start.sh's KAFKA_HEAP_OPTS and kafka-run-class.sh's
    # KAFKA_JVM_PERFORMANCE_OPTS
    jvm=(-Xmx1G -Xms1G -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
      -XX:MaxInlineLevel=15) ;;
  zgc) # the stock settings with Java's low-pause collector instead of G1
    jvm=(-Xmx1G -Xms1G -server -XX:+UseZGC -XX:+ExplicitGCInvokesConcurrent
      -XX:MaxInlineLevel=15) ;;
  *) die "TLY_KAFKA_JVM must be small, stock or zgc, not ${TLY_KAFKA_JVM}" ;;
  esac
  jvm+=(-Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$REPO/scripts/kafka/log4j2.properties"
    "-Dkafka.logs.dir=$DIR/logs")
  local jsa cds=() list=()
  jsa=$CACHE/kafka-$(cds_key "$cp").jsa
  rm -f "$DIR/classes.lst" "$DIR/cds.pending"
  if [ "${TLY_KAFKA_JVM:-small}" != small ]; then
    : # the class-data archive is built for the small settings' collector
  elif [ -f "$jsa" ]; then
    cds=("-XX:SharedArchiveFile=$jsa")
  else
    list=("-XX:DumpLoadedClassList=$DIR/classes.lst")
    printf '%s\n%s\n' "$jsa" "$cp" >"$DIR/cds.pending"
  fi
  if ! "$JAVA" "${jvm[@]}" "${cds[@]}" -cp "$cp" kafka.tools.StorageTool format -t "$id" \
    -c "$DIR/server.properties" >"$DIR/format.log" 2>&1; then
    cat "$DIR/format.log" >&2
    die "formatting the storage directory $DIR/data failed (log: $DIR/format.log)"
  fi
  # setsid: the broker outlives this script and is not in its caller's
  # process group; every stream is redirected so no caller's pipe stays open.
  setsid "$JAVA" "${jvm[@]}" "${cds[@]}" "${list[@]}" -cp "$cp" kafka.Kafka "$DIR/server.properties" \
    </dev/null >"$DIR/kafka.log" 2>&1 &
  pid=$!
  echo "$pid" >"$DIR/pid"
  deadline=$((SECONDS + $(secs "${TLY_KAFKA_START_TIMEOUT:-120}")))
  while ! probe "$HOST:$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -40 "$DIR/kafka.log" >&2
      die "the broker exited during start-up (log: $DIR/kafka.log)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -40 "$DIR/kafka.log" >&2
      stop_pid "$pid"
      die "the broker did not answer on $HOST:$port within $(secs "${TLY_KAFKA_START_TIMEOUT:-120}") s (log: $DIR/kafka.log)"
    fi
    sleep 0.2 # poll interval of the deadline-bounded wait above
  done
  echo "$HOST:$port" >"$DIR/bootstrap"
  echo "KAFKA $HOST:$port"
}

stop_pid() { # TERM, then KILL after the deadline
  local pid=$1 end
  kill -TERM "$pid" 2>/dev/null || return 0
  end=$((SECONDS + $(secs 30)))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$end" ]; then
      echo "kafka.sh: broker pid $pid ignored SIGTERM for 30 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1 # poll interval of the deadline-bounded wait above
  done
  # The broker is our child only when this same script started it; wait
  # for it where possible so no zombie is left.
  wait "$pid" 2>/dev/null || true
}

case $CMD in
  start) start ;;
  stop)
    if pid=$(broker_pid); then
      stop_pid "$pid"
      echo "kafka.sh: stopped broker pid $pid"
      cds_dump
    else
      echo "kafka.sh: no broker running for $DIR"
    fi
    ;;
  status)
    if pid=$(broker_pid); then
      echo "running $(cat "$DIR/bootstrap" 2>/dev/null || echo starting) pid $pid"
    else
      echo "stopped"
      exit 3
    fi
    ;;
  *) usage ;;
esac
