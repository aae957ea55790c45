#!/usr/bin/env bash
# End-to-end load benchmark: one gateway, N simulated agents (real QUIC + mTLS connections),
# gateway RSS per idle agent and idle CPU; then a real postern-agent's idle RSS and the
# binary sizes. Release build. Usage: bash benches/load.sh [AGENT_COUNTS...] (default 1000 10000);
# TRANSPORTS="quic tcp" (the default) says which transports the simulated agents use.
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("${@:-1000 10000}")
[ $# -gt 0 ] || counts=(1000 10000)
IDLE=${IDLE:-30}
# 10,000 TCP agents are 10,000 sockets in the driver as in the gateway.
ulimit -n "$(ulimit -Hn)"
read -r -a transports <<<"${TRANSPORTS:-quic tcp}"

cargo build --release --locked -p postern-gateway -p postern-tunnel -p postern-benches --bins
T=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
gw_pid=""
cleanup() { [ -n "$gw_pid" ] && kill "$gw_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

start_gateway() { # dir port
  mkdir -p "$1"
  cat >"$1/gateway.toml" <<TOML
data_dir = "$1/data"
[tunnel]
listen = "127.0.0.1:$2"
[ssh]
enabled = false
[testing]
bulk_enroll = true
TOML
  POSTERN_LOG=warn "$T/postern" --config "$1/gateway.toml" gateway >"$1/gateway.log" 2>&1 &
  gw_pid=$!
  for _ in $(seq 1 200); do [ -S "$1/data/admin.sock" ] && return 0; sleep 0.05; done
  echo "gateway did not start" >&2; cat "$1/gateway.log" >&2; return 1
}

stop_gateway() { kill -TERM "$gw_pid"; wait "$gw_pid" 2>/dev/null || true; gw_pid=""; }

echo "## $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
for n in "${counts[@]}"; do
  for transport in "${transports[@]}"; do
    port=$(free_port)
    start_gateway "$work/gw-$n-$transport" "$port"
    echo "### $n simulated agents, $transport"
    "$T/postern-load" --data-dir "$work/gw-$n-$transport/data" --gateway "127.0.0.1:$port" --gateway-pid "$gw_pid" \
      --agents "$n" --idle-secs "$IDLE" --transport "$transport"
    stop_gateway
  done
done

echo "### real agent, idle, on each transport"
port=$(free_port)
start_gateway "$work/gw-agent" "$port"
tok=$("$T/postern" --data-dir "$work/gw-agent/data" token create --json)
token=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])' <<<"$tok")
pin=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["ca_pin"])' <<<"$tok")
"$T/postern-agent" --state-dir "$work/agent" join --gateway "127.0.0.1:$port" --token "$token" --ca-pin "$pin" >/dev/null
for transport in quic tcp; do
  POSTERN_LOG=warn "$T/postern-agent" --state-dir "$work/agent" run --transport "$transport" &
  agent_pid=$!
  sleep "$IDLE"
  rss=$(awk '/VmRSS/{print $2}' "/proc/$agent_pid/status")
  t0=$(awk '{print $14+$15}' "/proc/$agent_pid/stat"); sleep 10; t1=$(awk '{print $14+$15}' "/proc/$agent_pid/stat")
  echo "agent idle RSS ($transport): ${rss} KiB; agent CPU over 10 s idle: $(( (t1 - t0) * 10 )) ms"
  kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
done
stop_gateway
echo "binary sizes (release, stripped): postern-agent $(stat -c %s $T/postern-agent) bytes, postern $(stat -c %s $T/postern) bytes"
