#!/usr/bin/env bash
# Two replicas of mcp-orchestrator sharing their sessions through one Redis,
# on this machine, to try the Redis session store (no container images
# needed: it runs the local binaries).
#
# Starts, on 127.0.0.1:
#   - redis-server on $REDIS_PORT (default 6380), in a temporary directory,
#     nothing saved;
#   - `mcp-orchestrator serve` on each of $REPLICA_PORTS (default "8081 8082"),
#     with SESSION_STORE_URL pointing at that Redis;
#   - when nginx is installed (and NGINX is not "no"), nginx on $FRONT_PORT
#     (default 8080) sending requests to the replicas in turn (round robin),
#     as a load balancer would.
# Ctrl-C (or SIGTERM) stops all of them; so does any of them exiting.
#
# Environment: MCP_BIN (default target/dist/mcp-orchestrator, the production
# build, built with cargo when missing), MCP_PROJECT_DIR (default: this repository's example
# project), REDIS_PORT, REPLICA_PORTS, FRONT_PORT, NGINX=no.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${MCP_BIN:-target/dist/mcp-orchestrator}
project=${MCP_PROJECT_DIR:-.}
redis_port=${REDIS_PORT:-6380}
front_port=${FRONT_PORT:-8080}
read -r -a replica_ports <<<"${REPLICA_PORTS:-8081 8082}"

command -v redis-server >/dev/null || {
  echo "redis-server is not installed: apt-get install redis-server" >&2
  exit 2
}
command -v curl >/dev/null || {
  echo "curl is not installed: apt-get install curl" >&2
  exit 2
}
if [ ! -x "$bin" ]; then
  echo "building $bin..." >&2
  cargo build --profile dist --locked
fi

work=$(mktemp -d)
# nginx's workers (not root) write their temporary files here.
chmod 755 "$work"
pids=()
replica_pids=()
stop() {
  trap - EXIT INT TERM
  echo "stopping..." >&2
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  # Also a Redis started again by hand in this folder (after a stop for a
  # try), recognised by its working directory: never another one.
  if [ "$(redis-cli -p "$redis_port" config get dir 2>/dev/null | tail -1)" = "$work" ]; then
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT
trap 'exit 130' INT TERM

# Waits until `curl $1` succeeds, for at most 30 s.
wait_for() {
  for _ in $(seq 300); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "$1 did not answer within 30 s" >&2
  return 1
}

# Ports in use would make the replicas talk to, and this script stop,
# something else.
for port in "$redis_port" "${replica_ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; choose others (REDIS_PORT, REPLICA_PORTS)" >&2
    exit 1
  fi
done

redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work" --save "" \
  --appendonly no --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$redis_port" ping >/dev/null || {
  echo "redis-server did not start; see its log:" >&2
  cat "$work/redis.log" >&2
  exit 1
}

session_store_url="redis://127.0.0.1:$redis_port/0"
for port in "${replica_ports[@]}"; do
  PORT=$port MCP_PROJECT_DIR=$project SESSION_STORE_URL=$session_store_url \
    LOG_FORMAT=json "$bin" serve 2>"$work/replica-$port.log" &
  pids+=($!)
  replica_pids+=($!)
done
for port in "${replica_ports[@]}"; do
  wait_for "http://127.0.0.1:$port/health" || {
    cat "$work/replica-$port.log" >&2
    exit 1
  }
done

front=""
if [ "${NGINX:-yes}" != no ] && command -v nginx >/dev/null; then
  servers=""
  for port in "${replica_ports[@]}"; do servers+="    server 127.0.0.1:$port;"$'\n'; done
  mkdir -p "$work/nginx"
  cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon on;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx;
  upstream replicas {
$servers  }
  server {
    listen 127.0.0.1:$front_port;
    location / { proxy_pass http://replicas; }
  }
}
EOF
  nginx -c "$work/nginx.conf"
  wait_for "http://127.0.0.1:$front_port/health"
  front="http://127.0.0.1:$front_port"
fi

echo
echo "Redis:      $session_store_url   (redis-cli -p $redis_port)"
for port in "${replica_ports[@]}"; do
  echo "replica:    http://127.0.0.1:$port   (log: $work/replica-$port.log)"
done
if [ -n "$front" ]; then
  echo "front:      $front   (nginx, round robin over the replicas)"
  target=$front
else
  echo "front:      none (install nginx for a round-robin front); use the replicas directly"
  target="http://127.0.0.1:${replica_ports[0]}"
fi
cat <<EOF

Try it: four turns of one session, spread over the replicas, then the session:

  for i in 1 2 3 4; do
    curl -s $target/orchestrate -H 'content-type: application/json' \\
      -d '{"text":"I want to order","user_id":"u1","order_items":[{"id":"mn-01","quantity":1}]}'
    echo
  done
  redis-cli -p $redis_port hgetall mcp:session:u1:web     # turns 4, last_order_id
  curl -s $target/health                                   # "session_store": {"kind": "redis", ...}

Stop Redis to see turns still answered and /health say "session_store_unavailable",
then start it again: the replicas use it again by themselves.

  redis-cli -p $redis_port shutdown nosave
  redis-server --port $redis_port --bind 127.0.0.1 --dir $work --save "" --daemonize yes

Ctrl-C stops everything.
EOF

# Until Ctrl-C, or until a replica exits (Redis may be stopped and started
# again to try an outage).
wait -n "${replica_pids[@]}" || true
echo "a replica exited; its log:" >&2
for port in "${replica_ports[@]}"; do tail -n 5 "$work/replica-$port.log" >&2; done
exit 1
