#!/usr/bin/env bash
# Runs the official MCP Python SDK (PyPI `mcp`, in a virtualenv under
# target/) against the binary serving the example project in development
# (mocks), with a caller key: it prints the tool list and one call's result.
# Not part of CI (it needs PyPI); run it by hand: tests/mcp-python-client.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/target/mcp-python"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import mcp" 2>/dev/null || "$venv/bin/pip" install --quiet mcp
cargo build --quiet --manifest-path "$root/Cargo.toml"
bin="$root/target/debug/mcp-orchestrator"
[ -n "${CARGO_TARGET_DIR:-}" ] && bin="$CARGO_TARGET_DIR/debug/mcp-orchestrator"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key="python-client-key-$(date +%s)"
log="$(mktemp)"
MCP_PROJECT_DIR="$root" PORT="$port" PARTNER_API_KEY="$key" LOG_LEVEL=warn "$bin" serve >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 200); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.05
done
"$venv/bin/pip" show mcp | sed -n 's/^Version: /python mcp SDK /p'
MCP_KEY="$key" "$venv/bin/python" "$root/tests/mcp_client.py" "http://127.0.0.1:$port/mcp" "$@"
