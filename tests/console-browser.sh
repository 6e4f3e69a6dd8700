#!/usr/bin/env bash
# Runs tests/console_browser.py (Playwright for Python, in a virtualenv under
# the target folder, driving the system's Chromium) against the binary serving
# a copy of the example project in development (mocks): a chat turn, its
# timeline and graph, live reload diagnostics, and "Save as test" followed by
# `mcp-orchestrator test`. Screenshots go to $SCREENSHOT_DIR (default
# docs/screenshots, the README's). .ci/run runs it (installing Chromium and
# Playwright when missing); by hand: tests/console-browser.sh
# (BIN=path/to/mcp-orchestrator to skip the build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
venv="$target/console-venv"
shots="${SCREENSHOT_DIR:-$root/docs/screenshots}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import playwright" 2>/dev/null ||
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$venv/bin/pip" install --quiet playwright

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "console-browser: /usr/bin/chromium is missing (apt-get install chromium)" >&2
    exit 1
  fi
fi

if [ -z "${BIN:-}" ]; then
  cargo build --quiet --manifest-path "$root/Cargo.toml"
  BIN="$target/debug/mcp-orchestrator"
fi
[ -x "$BIN" ] || { echo "console-browser: no binary at $BIN" >&2; exit 1; }

# The test edits a flow file and the console writes a test file: work on a copy.
work="$(mktemp -d)"
project="$work/project"
mkdir "$project"
for dir in flows schemas mocks docs; do
  if [ -d "$root/$dir" ]; then cp -R "$root/$dir" "$project/"; fi
done

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log="$work/server.log"
MCP_PROJECT_DIR="$project" PORT="$port" MCP_ENV=development LOG_LEVEL=warn "$BIN" serve >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT

deadline=$((SECONDS + 60))
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    echo "console-browser: the server did not answer /health on port $port" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done

"$venv/bin/pip" show playwright | sed -n 's/^Version: /playwright /p'
/usr/bin/chromium --version 2>/dev/null || true
status=0
"$venv/bin/python" "$root/tests/console_browser.py" "http://127.0.0.1:$port" "$project" "$BIN" "$shots" || status=$?
if [ "$status" -ne 0 ]; then
  echo "---- server log" >&2
  tail -n 50 "$log" >&2
fi
exit "$status"
