#!/usr/bin/env bash
# Makes sure the local services the tests and the demo need are up: starts an installed but
# stopped one, installs a missing one with apt-get when running as root, and otherwise stops
# with a message naming what is missing.
# `chromium` is the headless browser the console's tests drive (Debian's chromium and
# chromium-driver); it is installed, never started.
# Usage: scripts/services.sh [rabbitmq] [postgres] [redis] [mosquitto] [chromium]
set -euo pipefail

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(rabbitmq postgres redis)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local name=$1 port=$2 seconds=${3:-60}
  for _ in $(seq "$seconds"); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "services: $name did not open 127.0.0.1:$port within ${seconds}s" >&2
  return 1
}

apt_updated=0
install_packages() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "services: $* not installed; install it (Debian: apt-get install $*)" \
      "or point the tests at a running one" >&2
    return 1
  fi
  if [ $apt_updated -eq 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  echo "services: installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  command -v rabbitmq-server >/dev/null 2>&1 || install_packages rabbitmq-server
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached
  wait_for_port RabbitMQ 5672 120
  rabbitmqctl await_startup >/dev/null 2>&1 || true
}

ensure_postgres() {
  port_open 5432 && return 0
  command -v pg_ctlcluster >/dev/null 2>&1 || install_packages postgresql
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  wait_for_port PostgreSQL 5432 60
}

ensure_redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null 2>&1 || install_packages redis-server
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for_port Redis 6379 30
}

ensure_mosquitto() {
  port_open 1883 && return 0
  command -v mosquitto >/dev/null 2>&1 || install_packages mosquitto
  echo "services: starting Mosquitto"
  # Mosquitto 2 without a configuration listens on the loopback interface only.
  mosquitto -d -p 1883
  wait_for_port Mosquitto 1883 30
}

ensure_chromium() {
  local missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  [ ${#missing[@]} -eq 0 ] || install_packages "${missing[@]}"
}

for service in "${wanted[@]}"; do
  case "$service" in
    rabbitmq) ensure_rabbitmq ;;
    postgres) ensure_postgres ;;
    redis) ensure_redis ;;
    mosquitto) ensure_mosquitto ;;
    chromium) ensure_chromium ;;
    *) echo "services: unknown service $service" >&2; exit 2 ;;
  esac
done
