#!/usr/bin/env bash
# Creates the Python environment the integration tests run in: a virtualenv
# at build/venv on top of Debian's python3 (--system-site-packages, so
# python3-yaml and friends stay visible) with redis-py pinned to a 5.x
# release (RESP3 support needs redis-py >= 5; Debian 12 ships 4.3.4), and
# hiredis-py pinned to a 3.x release: it bundles hiredis 1.x, whose reader
# speaks RESP3 (Debian 12's libhiredis 0.14.1 does not), and redis-py uses
# it as a parser when a test asks for it.
# Idempotent: does nothing when the venv already has the pinned versions.
# Prints the interpreter to use as its last line. If PyPI cannot be reached,
# the venv is still created (redis-py 4.3.4 from Debian shows through) and
# the exit status is 0: the RESP3 redis-py tests then fail, saying why.
set -u
cd "$(dirname "$0")/.."

REDIS_PY_VERSION=5.3.1
HIREDIS_PY_VERSION=3.5.0
VENV=build/venv
PY=$VENV/bin/python

have_pinned() {
  [ -x "$PY" ] && "$PY" -c "import redis, hiredis, sys; sys.exit(redis.__version__ != '$REDIS_PY_VERSION' or hiredis.__version__ != '$HIREDIS_PY_VERSION')" 2>/dev/null
}

if have_pinned; then
  echo "pydeps: $VENV has redis-py $REDIS_PY_VERSION and hiredis-py $HIREDIS_PY_VERSION" >&2
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
    "redis==$REDIS_PY_VERSION" "hiredis==$HIREDIS_PY_VERSION" >&2; then
  echo "pydeps: could not install redis==$REDIS_PY_VERSION and hiredis==$HIREDIS_PY_VERSION" \
    "from PyPI; the RESP3 redis-py and hiredis-py tests will fail" >&2
fi
echo "$PY"
