# Shared by bench/run and bench/profile: sourced, not run.
#
# Expects $root (the repository) and $work (a temp dir the caller removes);
# sets $upstream_port and $hop_port, and defines the helpers below.

need() { command -v "$1" >/dev/null 2>&1; }

# Installs Debian packages that are missing (by the command they provide).
apt_install() { # command:package ...
  local missing=()
  for pair in "$@"; do need "${pair%%:*}" || missing+=("${pair#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]}..." >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts one nginx (one worker) on 127.0.0.1: an upstream answering every
# path with the shipped menu mock (~1 KB of JSON), and a proxy_pass hop in
# front of it with upstream keep-alive. Stopped by stop_nginx. The config
# is written by Python, so nothing in the JSON is expanded by the shell.
start_nginx() {
  upstream_port=$(free_port); hop_port=$(free_port)
  mkdir -p "$work/tmp"
  python3 - "$root/mocks/menu.json" "$work" "$upstream_port" "$hop_port" > "$work/nginx.conf" <<'PY'
import json, sys
menu, work, upstream, hop = sys.argv[1:5]
body = json.dumps(json.load(open(menu)))
# nginx reads `$` in a string as a variable and has no escape for it.
if "$" in body:
    sys.exit("the menu mock holds a `$`, which nginx's `return` cannot send")
body = body.replace("\\", "\\\\").replace("'", "\\'")
print(f"""worker_processes 1;
daemon on;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/tmp/body;
  proxy_temp_path {work}/tmp/proxy;
  fastcgi_temp_path {work}/tmp/fastcgi;
  uwsgi_temp_path {work}/tmp/uwsgi;
  scgi_temp_path {work}/tmp/scgi;
  keepalive_requests 1000000;
  upstream menu_upstream {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{upstream};
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}
  server {{
    listen 127.0.0.1:{hop};
    location / {{
      proxy_pass http://menu_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}""")
PY
  nginx -c "$work/nginx.conf"
}

stop_nginx() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
}

# The caller key every measured request carries, as a production channel's
# would (the example project declares caller keys).
bench_key=bench-web-app-key-0123456789abcdef

# Sets the array service_env: the environment of `serve` in production
# mode with every service on the nginx upstream, the caller keys and channel
# secrets set, and no
# HTTP proxy (which would put service calls on the proxied path); use as
# env "${service_env[@]}" PORT=... cmd
set_service_environment() {
  local upstream="http://127.0.0.1:$upstream_port"
  service_env=(-u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy -u ALL_PROXY -u all_proxy
    MCP_ENV=production LOG_LEVEL=warn LOG_FORMAT=json "MCP_PROJECT_DIR=$root"
    # Every request is one user's and one key's: lift their rates (still
    # checked on every request, as in production; the in-flight cap stays
    # as shipped).
    PER_USER_RATE=1000000/s PER_KEY_RATE=1000000/s
    "WEB_APP_API_KEY=$bench_key" PARTNER_API_KEY=bench-partner-key-0123456789abcdef
    # The example project's channels are declared; production needs their
    # secrets (the platform APIs are never called by the measured routes).
    TELEGRAM_SECRET_TOKEN=bench-telegram-secret TELEGRAM_BOT_TOKEN=123:bench-bot-token
    SLACK_SIGNING_SECRET=bench-slack-signing-secret SLACK_BOT_TOKEN=xoxb-bench
    WHATSAPP_VERIFY_TOKEN=bench-wa-verify WHATSAPP_APP_SECRET=bench-wa-app-secret
    WHATSAPP_ACCESS_TOKEN=bench-wa-access TWILIO_AUTH_TOKEN=bench-twilio-token
    TWILIO_PUBLIC_URL=https://bench.example.test/channels/sms
    "MENU_SERVICE_URL=$upstream/menu" "ORDER_SERVICE_URL=$upstream/order"
    "RECOMMEND_SERVICE_URL=$upstream/recommend" "TRACKING_SERVICE_URL=$upstream/tracking"
    "PROFILE_SERVICE_URL=$upstream/profile")
}

# Waits until /health answers on $1, polling every 10 ms `tries` times
# (1000 unless given: 10 s); prints the ms it took, or fails showing the end
# of the log $2.
wait_ready() { # port log [tries]
  local started; started=$(date +%s%N)
  for _ in $(seq "${3:-1000}"); do
    if curl -sf "http://127.0.0.1:$1/health" >/dev/null; then
      echo $(( ($(date +%s%N) - started) / 1000000 ))
      return 0
    fi
    sleep 0.01
  done
  echo "the service on port $1 did not become ready; its log:" >&2
  tail -20 "$2" >&2
  return 1
}

# wrk scripts POSTing the menu request and the fallback request, with the
# caller key (nginx ignores it).
write_wrk_scripts() {
  local body_menu='{"text":"Can you read me the menu?","user_id":"bench"}'
  local body_fallback='{"text":"this is nice","user_id":"bench"}'
  local script='wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer %s"\n'
  printf "$script" "'$body_menu'" "$bench_key" > "$work/menu.lua"
  printf "$script" "'$body_fallback'" "$bench_key" > "$work/fallback.lua"
}
