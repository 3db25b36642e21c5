#!/usr/bin/env bash
# One entry point for a fresh machine: sets up everything, then runs the demo
# or the test suite.   bash infra/run.sh demo | test [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${ERASURE_VENV:-$ROOT/.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[run.sh] %s\n' "$*" >&2; }

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  # torch first, pinned to the CPU wheel on this kind of machine, so that the
  # project's torch range is already satisfied and no CUDA build is pulled.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    log "installing torch 2.13.0 (CPU)"
    "$VENV/bin/pip" install -q "torch==2.13.0"
  fi
  local stamp="$VENV/.erasure-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing the project and its dependencies"
    "$VENV/bin/pip" install -q -e ".[test]"
    touch "$stamp"
  fi
}

postgres_up() {
  "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import sys, psycopg
psycopg.connect(sys.argv[1], connect_timeout=3).close()
PY
}

setup_postgres() {
  # Tests need a real PostgreSQL; use the local server, or start a throwaway one.
  local url="${ERASURE_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
  if postgres_up "$url"; then export ERASURE_TEST_POSTGRES_URL="$url"; return; fi
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    sleep 2
    if postgres_up "$url"; then export ERASURE_TEST_POSTGRES_URL="$url"; return; fi
  fi
  local bindir; bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  if [ -z "$bindir" ]; then
    log "installing the PostgreSQL server from Debian packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  fi
  local dir="$ROOT/.pgtmp" port=55432
  log "starting a throwaway PostgreSQL cluster in $dir on port $port"
  rm -rf "$dir"; mkdir -p "$dir"; chown postgres "$dir"
  # initdb refuses to run as root: run the cluster as the postgres user.
  su postgres -s /bin/sh -c "$bindir/initdb -D $dir/data -A trust -U postgres >/dev/null"
  su postgres -s /bin/sh -c "$bindir/pg_ctl -D $dir/data -o '-p $port -k $dir -c listen_addresses=127.0.0.1' -l $dir/log -w start >/dev/null"
  export ERASURE_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
  trap 'su postgres -s /bin/sh -c "$bindir/pg_ctl -D $dir/data -m fast stop >/dev/null" || true' EXIT
}

setup_browser() {
  # The console's browser tests drive Debian's chromium headless (Playwright pointed at
  # /usr/bin/chromium); nothing downloads a browser build.
  if command -v chromium >/dev/null; then return; fi
  log "installing chromium from Debian packages (for the console's browser tests)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
}

cmd="${1:-}"; shift || true
case "$cmd" in
  demo)
    setup_python
    exec "$VENV/bin/erasure" demo "$@"
    ;;
  test)
    setup_python
    setup_postgres
    setup_browser
    log "running the test suite (PostgreSQL: ${ERASURE_TEST_POSTGRES_URL##*@})"
    "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash infra/run.sh demo|test [args...]" >&2
    exit 2
    ;;
esac
