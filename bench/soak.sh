#!/usr/bin/env bash
# bench/soak.sh — the crash loop of tests/integration/kafka_durability.py,
# long: a seeded stream over SOAK_SECONDS (default 800) while tallyd is
# kill -9'd at random moments and restarted at least SOAK_KILLS times
# (default 500), then every value of every user and pin is compared with
# the ground truth; it prints the kills, how many landed mid-snapshot, and
# the lost/duplicated values (the test fails on any).
#
# Usage: bash bench/soak.sh   (from anywhere; starts and stops its own broker
# unless TLY_KAFKA_BOOTSTRAP names one). Needs `make` and `make deps` done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=build/venv/bin/python
[ -x "$PY" ] || PY=python3
export TLY_DURABILITY_STREAM_S=${SOAK_SECONDS:-800}
export TLY_DURABILITY_KILLS=${SOAK_KILLS:-500}
exec "$PY" tests/integration/kafka_durability.py
