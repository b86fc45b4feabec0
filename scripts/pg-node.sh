#!/usr/bin/env bash
# A private PostgreSQL server for trials that restart the database: `initdb` + `pg_ctl` on a
# directory of its own and a loopback port of its own, trust authentication, never the
# machine's server on 5432. As root the server runs as the postgres user (PostgreSQL refuses
# to run as root) and its directory is handed to that user.
#
# Usage:
#   scripts/pg-node.sh start DIR PORT        initdb DIR (if it is empty), start the server on
#                                            127.0.0.1:PORT, wait until it accepts connections;
#                                            prints its SQLAlchemy URL as the last line
#   scripts/pg-node.sh restart DIR fast|immediate   pg_ctl restart -m MODE
#   scripts/pg-node.sh stop DIR [fast|immediate]    pg_ctl stop (default fast)
#   scripts/pg-node.sh start_again DIR       start a stopped server (same port and data)
#   scripts/pg-node.sh remove DIR            stop the server if it runs, delete DIR
#   scripts/pg-node.sh url DIR               the server's URL
set -euo pipefail

BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$BIN/pg_ctl" ] || { echo "pg-node: no pg_ctl under /usr/lib/postgresql/*/bin (set PG_BIN)" >&2; exit 1; }
SERVICE_USER=postgres

die() {
  echo "pg-node: $*" >&2
  exit 1
}

as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$SERVICE_USER" -- "$@"
  else
    "$@"
  fi
}

url() { echo "postgresql+asyncpg://postgres@127.0.0.1:$(cat "$1/port")/postgres"; }

wait_ready() {
  local dir=$1 _
  for _ in $(seq 300); do
    if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$(cat "$dir/port")" -U postgres; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$dir/server.log" >&2 || true
  die "the server of $dir did not accept connections within 30 s"
}

pg_ctl() {
  local dir=$1
  shift
  as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 "$@" >/dev/null
}

start() {
  local dir=$1 port=$2
  [[ $port =~ ^[0-9]+$ ]] || die "bad port '$port'"
  [ "$port" != 5432 ] || die "5432 is the machine's server"
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    chown "$SERVICE_USER:" "$dir"
  fi
  echo "$port" >"$dir/port"
  if [ ! -s "$dir/data/PG_VERSION" ]; then
    as_owner "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  # Sockets in the directory itself (not /var/run/postgresql, which the machine's server owns).
  pg_ctl "$dir" -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=200" start
  wait_ready "$dir"
  url "$dir"
}

[ $# -ge 2 ] || die "usage: $0 start|restart|stop|start_again|remove|url DIR [...]"
command=$1
dir=$(realpath -m "$2")
shift 2
case "$command" in
  start) [ $# -eq 1 ] || die "usage: start DIR PORT"; start "$dir" "$1" ;;
  restart)
    mode=${1:-fast}
    [[ $mode =~ ^(fast|immediate|smart)$ ]] || die "bad mode '$mode'"
    port=$(cat "$dir/port")
    pg_ctl "$dir" -m "$mode" -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=200" restart
    wait_ready "$dir"
    ;;
  stop)
    mode=${1:-fast}
    [[ $mode =~ ^(fast|immediate|smart)$ ]] || die "bad mode '$mode'"
    pg_ctl "$dir" -m "$mode" stop
    ;;
  start_again)
    port=$(cat "$dir/port")
    pg_ctl "$dir" -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=200" start
    wait_ready "$dir"
    ;;
  remove)
    if [ -f "$dir/data/postmaster.pid" ]; then
      pg_ctl "$dir" -m immediate stop || true
    fi
    rm -rf -- "$dir"
    ;;
  url) url "$dir" ;;
  *) die "unknown command '$command'" ;;
esac
