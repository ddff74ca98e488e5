#!/usr/bin/env bash
# Installs the Debian packages tallyd needs to build, test and benchmark.
# Idempotent: packages already present are skipped; apt is only touched when
# something is missing. Must run as root (or with sudo available).
set -euo pipefail

PKGS=(
  build-essential pkg-config
  librdkafka-dev libuv1-dev liburcu-dev libcmocka-dev
  libyaml-dev libjsmn-dev libhiredis-dev libzstd-dev libmicrohttpd-dev libmimalloc-dev
  redis-server redis-tools kcat
  openjdk-17-jre-headless maven
  python3 python3-venv python3-redis python3-confluent-kafka
  clang clang-format-14 clang-tidy-14 cppcheck libclang-rt-14-dev
  valgrind linux-perf time strace
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "deps: missing packages: ${missing[*]}" >&2
    echo "deps: run 'make deps' as root, or install them with apt-get" >&2
    exit 1
  fi
fi

echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "deps: done"
