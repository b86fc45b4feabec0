#!/usr/bin/env bash
# A local three-node RabbitMQ cluster made of private nodes (scripts/rabbit-node.sh): c1, c2
# and c3 @localhost, each with its own AMQP and distribution ports on 127.0.0.1 and its data
# under $AMQP_QUEUE_CLUSTER_DIR (default ${TMPDIR:-/tmp}/amqp-queue-cluster). The machine's
# own broker is never touched: every rabbitmqctl call names a private node with -n.
#
# Usage:
#   scripts/cluster.sh start    starts the three nodes (or finds them already running and
#                               clustered), joins c2 and c3 to c1, waits until cluster_status
#                               lists three running nodes, and prints the nodes' AMQP URLs,
#                               comma-separated, as its last line
#   scripts/cluster.sh stop     stops the three nodes and deletes their directories
#   scripts/cluster.sh status   cluster_status as c1 sees it
#   scripts/cluster.sh urls     the AMQP URLs, comma-separated
#   scripts/cluster.sh ctl NODE ARGS...   rabbitmqctl -n NODE@localhost ARGS (NODE: c1, c2, c3)
#   scripts/cluster.sh kill NODE  SIGKILL to the node's Erlang VM (a crash: nothing is flushed,
#                               no peer is told); its data directory stays
#   scripts/cluster.sh revive NODE  starts a killed or stopped node again on its data; it
#                               rejoins the cluster it was a member of
#   scripts/cluster.sh partition NODE  cuts NODE off from the other two (a network partition
#                               between Erlang nodes; AMQP clients still reach every node)
#   scripts/cluster.sh heal NODE  ends that partition and waits until NODE runs again as one
#                               of three members
#
# The nodes run with cluster_partition_handling = pause_minority, RabbitMQ's advice for a
# cluster of three: a node cut off from the other two pauses (closes its client connections
# and listeners) until it sees them again, so no client works on the minority side.
#
# Ports: CLUSTER_BASE_PORT (default 5681) for c1, +1 for c2, +2 for c3; distribution ports
# 20000 above. CLUSTER_PREFIX (default c) names the nodes PREFIX1..PREFIX3, so a second
# cluster (the test suite's) can run beside this one on other ports and another directory. The nodes share the Erlang cookie that rabbit-node.sh gives every private node
# (as root: the rabbitmq user's; otherwise the caller's ~/.erlang.cookie).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODE_SCRIPT="$HERE/rabbit-node.sh"
export AMQP_QUEUE_NODES_DIR=${AMQP_QUEUE_CLUSTER_DIR:-${TMPDIR:-/tmp}/amqp-queue-cluster}
BASE_PORT=${CLUSTER_BASE_PORT:-5681}
TIMEOUT=${CLUSTER_TIMEOUT:-90}
PREFIX=${CLUSTER_PREFIX:-c}
[[ $PREFIX =~ ^[A-Za-z][A-Za-z0-9_-]{0,40}$ ]] || { echo "cluster: bad CLUSTER_PREFIX '$PREFIX'" >&2; exit 1; }
NODES=("${PREFIX}1" "${PREFIX}2" "${PREFIX}3")
FIRST=${NODES[0]}
# For every start of a node, revive included (rabbit-node.sh writes its rabbitmq.conf then).
PAUSE_MINORITY="cluster_partition_handling = pause_minority"
export RABBIT_NODE_EXTRA_CONF="$PAUSE_MINORITY${RABBIT_NODE_EXTRA_CONF:+
$RABBIT_NODE_EXTRA_CONF}"

die() {
  echo "cluster: $*" >&2
  exit 1
}

node() { "$NODE_SCRIPT" "$@"; }

port_of() {
  local i
  for i in "${!NODES[@]}"; do
    if [ "${NODES[$i]}" = "$1" ]; then
      echo $((BASE_PORT + i))
      return
    fi
  done
  die "no node $1 in the cluster (${NODES[*]})"
}

urls() {
  local name out=()
  for name in "${NODES[@]}"; do
    out+=("$(node url "$name")")
  done
  (IFS=,; echo "${out[*]}")
}

# How many of the three nodes c1 reports as running members of its cluster.
running_members() {
  node ctl "$FIRST" -q eval \
    "length([N || N <- rabbit_nodes:all_running(), lists:member(N, ['${NODES[0]}@localhost', '${NODES[1]}@localhost', '${NODES[2]}@localhost'])])." \
    2>/dev/null || echo 0
}

await_cluster() {
  local deadline=$(($(date +%s) + TIMEOUT))
  while [ "$(running_members)" != 3 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

start() {
  local began name running=0
  began=$(date +%s%N)
  for name in "${NODES[@]}"; do
    if node status "$name" >/dev/null 2>&1; then
      running=$((running + 1))
    fi
  done
  if [ "$running" -eq 3 ] && [ "$(running_members)" = 3 ]; then
    echo "cluster already running (${NODES[*]} under $AMQP_QUEUE_NODES_DIR)"
    urls
    return 0
  fi
  if [ "$running" -gt 0 ]; then
    echo "cluster: a partial cluster was found; removing it and starting afresh" >&2
    stop >/dev/null
  fi

  # The nodes boot in parallel (each takes seconds); each start waits for its own app.
  local pids=() failed=0
  mkdir -p "$AMQP_QUEUE_NODES_DIR"
  for name in "${NODES[@]}"; do
    node start "$name" "$(port_of "$name")" >"$AMQP_QUEUE_NODES_DIR/$name.start.log" 2>&1 &
    pids+=($!)
  done
  local i
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      failed=1
      cat "$AMQP_QUEUE_NODES_DIR/${NODES[$i]}.start.log" >&2
    fi
  done
  rm -f "$AMQP_QUEUE_NODES_DIR"/*.start.log
  if [ "$failed" -ne 0 ]; then
    stop >/dev/null 2>&1 || true
    die "a node did not start"
  fi

  # c2 and c3 join c1 one after the other (joining at once can race on the schema).
  # Their output (the join logs warnings and errors that are harmless here) is shown only
  # when the join fails.
  local join_log="$AMQP_QUEUE_NODES_DIR/join.log"
  for name in "${NODES[@]:1}"; do
    if ! { node ctl "$name" -q stop_app &&
      node ctl "$name" -q reset &&
      node ctl "$name" -q join_cluster "$FIRST@localhost" &&
      node start_app "$name"; } >"$join_log" 2>&1; then
      cat "$join_log" >&2
      stop >/dev/null 2>&1 || true
      die "$name@localhost could not join $FIRST@localhost"
    fi
  done
  rm -f "$join_log"
  if ! await_cluster; then
    node ctl "$FIRST" cluster_status >&2 || true
    stop >/dev/null 2>&1 || true
    die "the cluster did not report three running nodes within ${TIMEOUT}s"
  fi
  local ms=$((($(date +%s%N) - began) / 1000000))
  printf 'cluster of %s started in %d.%01ds (%s)\n' "${NODES[*]}" $((ms / 1000)) \
    $((ms % 1000 / 100)) "$AMQP_QUEUE_NODES_DIR"
  urls
}

stop() {
  local name
  # The last two first, so the node the others joined goes last.
  for name in "${NODES[2]}" "${NODES[1]}" "${NODES[0]}"; do
    node remove "$name"
  done
  rm -f "$AMQP_QUEUE_NODES_DIR"/*.start.log "$AMQP_QUEUE_NODES_DIR/join.log"
  rmdir "$AMQP_QUEUE_NODES_DIR" 2>/dev/null || true
}

# The OS pid of NODE's VM, checked against the pid file path in its environment (so a pid
# reused by another process is never taken for it); empty if it does not run.
vm_pid() {
  local pid_file="$AMQP_QUEUE_NODES_DIR/$1/pid" pid
  [ -s "$pid_file" ] || return 0
  pid=$(tr -dc '0-9' <"$pid_file")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "RABBITMQ_PID_FILE=$pid_file"; then
    echo "$pid"
  fi
}

kill_node() {
  local pid _
  port_of "$1" >/dev/null
  pid=$(vm_pid "$1")
  [ -n "$pid" ] || die "$1@localhost is not running"
  kill -KILL "$pid"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "killed $1@localhost (pid $pid)"
}

revive() {
  port_of "$1" >/dev/null
  [ -z "$(vm_pid "$1")" ] || die "$1@localhost still runs"
  node start "$1" "$(port_of "$1")" >/dev/null
  echo "revived $1@localhost"
}

# NODE's peers, as an Erlang list of node names.
peers_of() {
  local name out=()
  port_of "$1" >/dev/null
  for name in "${NODES[@]}"; do
    [ "$name" = "$1" ] || out+=("'$name@localhost'")
  done
  (IFS=,; echo "[${out[*]}]")
}

# A partition without touching the network (no firewall here, and the machine's own services
# share the loopback): each side is told a different Erlang cookie for the other, so every
# distribution handshake between them fails both ways, and their connections are dropped.
partition() {
  local peers name
  peers=$(peers_of "$1")
  node ctl "$1" -q eval \
    "[begin erlang:set_cookie(N, amqp_queue_cut_a), erlang:disconnect_node(N) end || N <- $peers], ok." \
    >/dev/null
  for name in "${NODES[@]}"; do
    [ "$name" = "$1" ] && continue
    node ctl "$name" -q eval \
      "erlang:set_cookie('$1@localhost', amqp_queue_cut_b), erlang:disconnect_node('$1@localhost'), ok." \
      >/dev/null
  done
  echo "partitioned $1@localhost from $peers"
}

heal() {
  local peers name deadline
  peers=$(peers_of "$1")
  node ctl "$1" -q eval "[erlang:set_cookie(N, erlang:get_cookie()) || N <- $peers], ok." >/dev/null
  for name in "${NODES[@]}"; do
    [ "$name" = "$1" ] && continue
    node ctl "$name" -q eval \
      "erlang:set_cookie('$1@localhost', erlang:get_cookie()), net_kernel:connect_node('$1@localhost'), ok." \
      >/dev/null
  done
  deadline=$(($(date +%s) + TIMEOUT))
  until [ "$(node ctl "$1" -q eval 'rabbit:is_running().' 2>/dev/null)" = true ] &&
    [ "$(running_members)" = 3 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$1@localhost did not rejoin within ${TIMEOUT}s"
    sleep 0.5
  done
  echo "healed $1@localhost"
}

[ $# -ge 1 ] || die "usage: $0 start|stop|status|urls|ctl NODE ARGS...|kill NODE|revive NODE|partition NODE|heal NODE"
command=$1
shift
case "$command" in
  start) start ;;
  stop) stop ;;
  status) node ctl "$FIRST" cluster_status ;;
  urls) urls ;;
  ctl)
    [ $# -ge 2 ] || die "usage: $0 ctl NODE ARGS..."
    node ctl "$@"
    ;;
  kill)
    [ $# -eq 1 ] || die "usage: $0 kill NODE"
    kill_node "$1"
    ;;
  revive)
    [ $# -eq 1 ] || die "usage: $0 revive NODE"
    revive "$1"
    ;;
  partition)
    [ $# -eq 1 ] || die "usage: $0 partition NODE"
    partition "$1"
    ;;
  heal)
    [ $# -eq 1 ] || die "usage: $0 heal NODE"
    heal "$1"
    ;;
  *) die "unknown command '$command' (start, stop, status, urls, ctl, kill, revive, partition, heal)" ;;
esac
