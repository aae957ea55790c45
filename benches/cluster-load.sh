#!/usr/bin/env bash
# Many agents over two gateways of a cluster (PostgreSQL store, cluster keys): N simulated
# agents (real QUIC + mTLS connections, postern-load), half on each gateway. Reports each
# gateway's RSS per idle agent, the store's transactions per second while everything is idle,
# then kills gateway A (SIGKILL) and times its agents' move to B. Release build; needs root
# (initdb runs as the postgres user), postgresql and python3.
#   bash benches/cluster-load.sh            (AGENTS=10000 IDLE=30 by default)
set -euo pipefail
N=${AGENTS:-10000}
HALF=$(( N / 2 ))
IDLE=${IDLE:-30}
source "$(dirname "$0")/lib.sh"
cargo build --release --locked -p postern-benches --bins >/dev/null
start_postgres bench

"$T/postern" audit keygen "$W/cluster.key" >/dev/null
gateway() { # id port
  cat >"$W/$1.toml" <<CFG
data_dir = "$W/$1"
[tunnel]
listen = "127.0.0.1:$2"
max_enrollments = 1024
[ssh]
enabled = false
[store]
url = "$URL"
[cluster]
gateway_id = "$1"
key_file = "$W/cluster.key"
[testing]
bulk_enroll = true
CFG
  [ "$1" = a ] && "$T/postern" --config "$W/a.toml" cluster init >/dev/null
  POSTERN_LOG=warn "$T/postern" --config "$W/$1.toml" gateway >"$W/$1.log" 2>&1 & pids+=($!)
  gateway_ready "$W/$1"
}
online() { "$T/postern" --data-dir "$W/$1" instances --json | python3 -c 'import json,sys;print(sum(1 for i in json.load(sys.stdin) if i["online"]))'; }
xacts() { psql -h 127.0.0.1 -p "$PGPORT" -U postgres -Atc "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'bench'"; }

PA=$(port); PB=$(port)
gateway a "$PA"; PID_A=${pids[-1]}
gateway b "$PB"; PID_B=${pids[-1]}
echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $N simulated agents over two gateways"
# B's half first: measured, then kept connected while A's half runs.
"$T/postern-load" --data-dir "$W/b" --gateway "127.0.0.1:$PB" --gateway-pid "$PID_B" \
  --agents "$HALF" --idle-secs "$IDLE" --linger-secs $(( IDLE * 4 + 120 )) >"$W/load-b.json" 2>"$W/load-b.log" & pids+=($!)
until grep -q '"gateway_rss_kib_per_agent"' "$W/load-b.json" 2>/dev/null; do sleep 1; done
# A's half: measured, then A is killed and they move to B.
"$T/postern-load" --data-dir "$W/a" --gateway "127.0.0.1:$PA" --gateway-pid "$PID_A" \
  --agents "$HALF" --idle-secs $(( IDLE + 25 )) --failover "127.0.0.1:$PB" --failover-data-dir "$W/b" \
  --failover-expect-online "$N" >"$W/load-a.json" 2>"$W/load-a.log" & LOAD_A=$!; pids+=($LOAD_A)
until [ "$(online a 2>/dev/null || echo 0)" -ge "$HALF" ]; do sleep 1; done
sleep 10   # the connections' own writes (agent_seen, locations) settle first
x0=$(xacts); sleep 15; x1=$(xacts)
echo "### store at idle ($N agents connected, two gateways): $(( (x1 - x0) / 15 )) transactions/s (pg_stat_database over 15 s)"
wait "$LOAD_A"
echo "### gateway B (its own $HALF agents, measured before A's moved in)"; cat "$W/load-b.json"
echo "### gateway A, then killed: its $HALF agents move to B"; cat "$W/load-a.json"
