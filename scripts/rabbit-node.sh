#!/usr/bin/env bash
# Private RabbitMQ nodes for tests that must stop or restart a broker, made with nothing but the
# installed rabbitmq-server: each node is NAME@localhost with its own AMQP and distribution
# ports on 127.0.0.1, no plugins, and its data, logs, pid file and configuration under
# $AMQP_QUEUE_NODES_DIR/NAME (default ${TMPDIR:-/tmp}/amqp-queue-nodes/NAME). The machine's own
# broker is never touched: every rabbitmqctl call names the private node with -n.
#
# Usage:
#   scripts/rabbit-node.sh start NAME AMQP_PORT [DIST_PORT]
#       starts the node detached (DIST_PORT defaults to AMQP_PORT+20000), waits until it is
#       up (RABBIT_NODE_TIMEOUT seconds, default 60) and prints its AMQP URL as the last line
#   scripts/rabbit-node.sh stop NAME          stops the node and waits for its process to end
#   scripts/rabbit-node.sh remove NAME        stops the node if it runs and deletes its directory
#   scripts/rabbit-node.sh status NAME        "running", "app stopped" or "not running" (exit 0,
#                                             1 or 3) and the AMQP URL
#   scripts/rabbit-node.sh stop_app NAME      rabbitmqctl -n NAME@localhost stop_app
#   scripts/rabbit-node.sh start_app NAME     start_app, then waits until the app is up
#   scripts/rabbit-node.sh restart_app NAME SECONDS   stop_app, SECONDS down, start_app
#   scripts/rabbit-node.sh url NAME           the node's AMQP URL
#   scripts/rabbit-node.sh ctl NAME ARGS...   any rabbitmqctl command, with -n NAME@localhost
#   scripts/rabbit-node.sh list               the node directories and whether each runs
# NAME may also be given as NAME@localhost. guest/guest may log in from loopback only.
#
# The node is an ordinary one otherwise: `rabbitmqctl -n NAME@localhost stop_app` (start_app,
# await_startup, ...) works on it directly, as root (the wrapper in /usr/sbin) or as the user
# that started it (/usr/lib/rabbitmq/bin/rabbitmqctl, the same Erlang cookie).
#
# Users: as root the Debian wrappers run the node and rabbitmqctl as the rabbitmq user (so they
# share its Erlang cookie, and the node directory is handed to that user); any other user runs
# the scripts under /usr/lib/rabbitmq/bin directly, with that user's ~/.erlang.cookie (created
# by the first node). The rabbitmq user itself is treated like any other user, so the Debian
# wrapper cannot redirect a private node's output over the machine broker's startup log.
set -euo pipefail

# Nothing from the caller's or the machine's RabbitMQ/Erlang environment may reach a private
# node or its rabbitmqctl: a leaked RABBITMQ_NODENAME or RABBITMQ_DIST_PORT would aim them at
# the machine's broker or at a wrong port.
while IFS= read -r variable; do
  unset "$variable"
done < <(compgen -e | grep -E '^(RABBITMQ_|ERL_|CONF_ENV_FILE$|NODENAME$|NODE_PORT$)' || true)

BASE=${AMQP_QUEUE_NODES_DIR:-${TMPDIR:-/tmp}/amqp-queue-nodes}
TIMEOUT=${RABBIT_NODE_TIMEOUT:-60}
HOST=localhost
SERVICE_USER=rabbitmq
EPMD=$(command -v epmd || echo /usr/lib/erlang/bin/epmd)

if [ "$(id -u)" -eq 0 ] && [ -x /usr/sbin/rabbitmq-server ] && id "$SERVICE_USER" >/dev/null 2>&1; then
  AS_SERVICE_USER=1
  SERVER=/usr/sbin/rabbitmq-server
  CTL=/usr/sbin/rabbitmqctl
else
  AS_SERVICE_USER=0
  if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
    CTL=/usr/lib/rabbitmq/bin/rabbitmqctl
  else
    SERVER=$(command -v rabbitmq-server || echo rabbitmq-server)
    CTL=$(command -v rabbitmqctl || echo rabbitmqctl)
  fi
fi

die() {
  echo "rabbit-node: $*" >&2
  exit 1
}

usage() {
  if [ "${1:-2}" -eq 0 ]; then
    sed -n '/^# Usage:/,/^# NAME may/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  else
    sed -n '/^# Usage:/,/^# NAME may/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  fi
  exit "${1:-2}"
}

# NAME or NAME@localhost -> NAME; only characters safe in a node name and a directory name.
node_name() {
  local name=${1%@"$HOST"}
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]] || die "bad node name '$1' (letters, digits, - and _)"
  echo "$name"
}

valid_port() {
  if ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1024 ] || [ "$1" -gt 65535 ]; then
    die "bad port '$1' (1024-65535)"
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ctl() {
  local name=$1
  shift
  "$CTL" -n "$name@$HOST" "$@"
}

# Whether process PID runs and is the VM of node NAME: its environment names the node's pid
# file, so a pid reused by another process is not taken for it.
is_vm() {
  kill -0 "$2" 2>/dev/null &&
    tr '\0' '\n' 2>/dev/null <"/proc/$2/environ" | grep -qxF "RABBITMQ_PID_FILE=$BASE/$1/pid"
}

# The node's OS process, from the pid file the node writes; empty if it is not running.
node_pid() {
  local pid_file="$BASE/$1/pid" pid
  [ -s "$pid_file" ] || return 0
  pid=$(tr -dc '0-9' <"$pid_file")
  if [ -n "$pid" ] && is_vm "$1" "$pid"; then
    echo "$pid"
  fi
}

# The distribution port epmd has for node NAME on this host, empty if none is registered.
epmd_port() {
  "$EPMD" -names 2>/dev/null |
    awk -v name="$1" '$1 == "name" && $2 == name && $3 == "at" && $4 == "port" { print $5 }'
}

# rabbitmqctl -n NAME@localhost reaches whichever node has that name: before it is aimed at a
# node, the node must be the private one started here (its VM runs from this directory and
# epmd has it on the distribution port it was given), never the machine's broker.
require_private() {
  local name=$1 dist_port registered
  [ -s "$BASE/$name/dist_port" ] || die "no private node $name under $BASE"
  dist_port=$(cat "$BASE/$name/dist_port")
  registered=$(epmd_port "$name")
  if [ -z "$(node_pid "$name")" ] || [ "$registered" != "$dist_port" ]; then
    die "$name@$HOST is not running as the private node of $BASE/$name"
  fi
}

amqp_url() {
  local port_file="$BASE/$1/amqp_port"
  [ -s "$port_file" ] || die "no node $1 under $BASE"
  echo "amqp://guest:guest@127.0.0.1:$(cat "$port_file")/"
}

log_tail() {
  local log
  for log in "$BASE/$1/log/$1@$HOST.log" "$BASE/$1/startup.log"; do
    if [ -s "$log" ]; then
      echo "--- last lines of $log:" >&2
      tail -n 25 "$log" >&2
    fi
  done
}

# Waits until the rabbit app runs on the node: await_startup fails at once while the node is
# not yet registered with epmd, so it is retried until the deadline.
await_app() {
  local name=$1 deadline=$(($(date +%s) + TIMEOUT)) left
  while :; do
    left=$((deadline - $(date +%s)))
    if [ "$left" -le 0 ]; then
      return 1
    fi
    if ctl "$name" -q await_startup --timeout "$left" >/dev/null 2>&1; then
      return 0
    fi
    if [ -s "$BASE/$name/pid" ] && [ -z "$(node_pid "$name")" ]; then
      return 1 # the node wrote its pid file and its process has gone: it crashed
    fi
    sleep 0.3
  done
}

start() {
  if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
  local name amqp_port=$2 dist_port=${3:-$(($2 + 20000))} dir
  name=$(node_name "$1")
  valid_port "$amqp_port"
  valid_port "$dist_port"
  dir="$BASE/$name"
  [ -z "$(node_pid "$name")" ] || die "node $name@$HOST already runs (pid $(node_pid "$name"))"
  # Another node by that name (the machine's broker is rabbit@localhost) would answer every
  # rabbitmqctl -n call meant for this one.
  [ -z "$(epmd_port "$name")" ] || die "a node named $name@$HOST already runs; choose another name"
  local port
  for port in "$amqp_port" "$dist_port"; do
    ! port_open "$port" || die "127.0.0.1:$port is already in use"
  done

  mkdir -p "$dir"
  rm -f "$dir/pid"
  echo "$amqp_port" >"$dir/amqp_port"
  echo "$dist_port" >"$dir/dist_port"
  echo "[]." >"$dir/enabled_plugins" # no management, no prometheus: only AMQP 0-9-1
  # Instead of /etc/rabbitmq/rabbitmq-env.conf, sourced by the server's start script as the
  # node's user. As root the node starts through su, whose PAM session resets the open-file
  # soft limit to 1024: RabbitMQ then budgets 927 handles, a quorum queue takes about five
  # on each node, and past ~300 of them (1,500 handles) the node stops accepting AMQP
  # connections, each waiting for a handle. The soft limit is raised to the hard one.
  echo 'ulimit -S -n "$(ulimit -H -n)" 2>/dev/null || true' >"$dir/rabbitmq-env.conf"
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$amqp_port
loopback_users.guest = true
EOF
  # Settings a trial needs (e.g. a low channel_max), one rabbitmq.conf line each.
  if [ -n "${RABBIT_NODE_EXTRA_CONF:-}" ]; then
    printf '%s\n' "$RABBIT_NODE_EXTRA_CONF" >>"$dir/rabbitmq.conf"
  fi
  if [ "$AS_SERVICE_USER" -eq 1 ]; then
    chown -R "$SERVICE_USER:" "$dir"
    runuser -u "$SERVICE_USER" -- test -w "$dir" ||
      die "$dir is not writable by $SERVICE_USER (a parent directory closed to it?); set AMQP_QUEUE_NODES_DIR"
  fi

  # -detached forks the VM and returns; its crash dump stays in the node directory too.
  (cd "$dir" && env \
    RABBITMQ_NODENAME="$name@$HOST" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$amqp_port" \
    RABBITMQ_DIST_PORT="$dist_port" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    ERL_CRASH_DUMP="$dir/erl_crash.dump" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$SERVER" -detached >"$dir/startup.log" 2>&1) ||
    {
      log_tail "$name"
      die "rabbitmq-server -detached failed for $name@$HOST"
    }

  if ! await_app "$name"; then
    log_tail "$name"
    stop_node "$name" >/dev/null 2>&1 || true
    die "node $name@$HOST did not start within ${TIMEOUT}s (RABBIT_NODE_TIMEOUT); see $dir/log"
  fi
  echo "started $name@$HOST (AMQP 127.0.0.1:$amqp_port, distribution 127.0.0.1:$dist_port, $dir)"
  amqp_url "$name"
}

stop_node() {
  local name=$1 pid
  pid=$(node_pid "$name")
  if [ -z "$pid" ]; then
    echo "node $name@$HOST is not running"
    return 0
  fi
  # SIGTERM stops RabbitMQ gracefully (as rabbitmqctl stop does, a second and a half sooner);
  # the pid is this node's VM, checked by node_pid. The node deletes its pid file as it
  # begins to stop, so the process itself is watched. SIGKILL if it has not ended in 30 s.
  kill -TERM "$pid" 2>/dev/null || true
  local _
  for _ in $(seq 300); do
    is_vm "$name" "$pid" || break
    sleep 0.1
  done
  if is_vm "$name" "$pid"; then
    echo "rabbit-node: $name@$HOST still runs 30 s after SIGTERM; killing pid $pid" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  echo "stopped $name@$HOST"
}

remove() {
  local name=$1
  stop_node "$name"
  if [ -d "$BASE/$name" ]; then
    rm -rf -- "${BASE:?}/${name:?}"
  fi
  echo "removed $BASE/$name"
}

status() {
  local name=$1
  if [ -z "$(node_pid "$name")" ] || [ "$(epmd_port "$name")" != "$(cat "$BASE/$name/dist_port")" ]; then
    echo "$name@$HOST: not running"
    return 3
  fi
  if [ "$(ctl "$name" -q eval 'rabbit:is_running().' 2>/dev/null)" = true ]; then
    echo "$name@$HOST: running $(amqp_url "$name")"
    return 0
  fi
  echo "$name@$HOST: app stopped $(amqp_url "$name")"
  return 1
}

start_app() {
  local name=$1
  require_private "$name"
  ctl "$name" -q start_app
  await_app "$name" || die "the app on $name@$HOST did not start within ${TIMEOUT}s"
}

list() {
  local dir name
  [ -d "$BASE" ] || return 0
  for dir in "$BASE"/*/; do
    [ -d "$dir" ] || continue
    name=$(basename "$dir")
    if [ -n "$(node_pid "$name")" ]; then
      echo "$name running (pid $(node_pid "$name")) $dir"
    else
      echo "$name stopped $dir"
    fi
  done
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  start) start "$@" ;;
  list) [ $# -eq 0 ] || usage; list ;;
  stop | remove | status | stop_app | start_app | url)
    [ $# -eq 1 ] || usage
    name=$(node_name "$1")
    case "$command" in
      stop) stop_node "$name" ;;
      remove) remove "$name" ;;
      status) status "$name" ;;
      stop_app) require_private "$name" && ctl "$name" -q stop_app ;;
      start_app) start_app "$name" ;;
      url) amqp_url "$name" ;;
    esac
    ;;
  restart_app)
    [ $# -eq 2 ] || usage
    name=$(node_name "$1")
    [[ $2 =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad number of seconds '$2'"
    require_private "$name"
    ctl "$name" -q stop_app
    sleep "$2"
    start_app "$name"
    ;;
  ctl)
    [ $# -ge 2 ] || usage
    name=$(node_name "$1")
    shift
    require_private "$name"
    ctl "$name" "$@"
    ;;
  -h | --help | help) usage 0 ;;
  *) usage ;;
esac
