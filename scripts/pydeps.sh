#!/usr/bin/env bash
# Creates the Python environment the integration tests run in: a virtualenv
# at build/venv on top of Debian's python3 (--system-site-packages, so
# python3-yaml and friends stay visible) with redis-py pinned to a 5.x
# release (RESP3 support needs redis-py >= 5; Debian 12 ships 4.3.4).
# Idempotent: does nothing when the venv already has the pinned version.
# Prints the interpreter to use as its last line. If PyPI cannot be reached,
# the venv is still created (redis-py 4.3.4 from Debian shows through) and
# the exit status is 0: the RESP3 redis-py tests then fail, saying why.
set -u
cd "$(dirname "$0")/.."

REDIS_PY_VERSION=5.3.1
VENV=build/venv
PY=$VENV/bin/python

have_pinned() {
  [ -x "$PY" ] && "$PY" -c "import redis, sys; sys.exit(redis.__version__ != '$REDIS_PY_VERSION')" 2>/dev/null
}

if have_pinned; then
  echo "pydeps: $VENV has redis-py $REDIS_PY_VERSION" >&2
  echo "$PY"
  exit 0
fi

if [ ! -x "$PY" ]; then
  if ! /usr/bin/python3 -m venv --system-site-packages "$VENV" >&2; then
    echo "pydeps: cannot create $VENV (is python3-venv installed? make deps)" >&2
    echo "/usr/bin/python3"
    exit 0
  fi
fi

if ! "$PY" -m pip install --quiet --disable-pip-version-check --timeout 20 \
    "redis==$REDIS_PY_VERSION" >&2; then
  echo "pydeps: could not install redis==$REDIS_PY_VERSION from PyPI;" \
    "the RESP3 redis-py tests will fail" >&2
fi
echo "$PY"
