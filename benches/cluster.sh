#!/usr/bin/env bash
# Two gateways of one cluster on this machine (PostgreSQL store, cluster keys): a user on
# gateway A reaching an agent connected to A, and one connected to B (through B, peering).
# Release build; needs root (initdb runs as the postgres user; sessions run as root with a
# throwaway key), postgresql and python3.
#   bash benches/cluster.sh             (SIZE_MIB=512 RUNS=20 by default)
set -euo pipefail
SIZE=$(( ${SIZE_MIB:-512} * 1024 * 1024 ))
RUNS=${RUNS:-20}
source "$(dirname "$0")/lib.sh"
B="python3 $PWD/benches/ssh_bench.py"

start_postgres bench

"$T/postern" audit keygen "$W/cluster.key" >/dev/null
ssh-keygen -q -t ed25519 -N '' -f "$W/user"
gateway() { # id: writes $W/$1.toml, starts it, sets GW_SSH_<id>, GW_UDP_<id>
  local ssh udp
  ssh=$(port); udp=$(port)
  cat >"$W/$1.toml" <<CFG
data_dir = "$W/$1"
[tunnel]
listen = "127.0.0.1:$udp"
[ssh]
listen = "127.0.0.1:$ssh"
public_host = "127.0.0.1"
idle_timeout = "0"
[store]
url = "$URL"
[cluster]
gateway_id = "$1"
key_file = "$W/cluster.key"
CFG
  [ "$1" = a ] && "$T/postern" --config "$W/a.toml" cluster init >/dev/null
  POSTERN_LOG=warn "$T/postern" --config "$W/$1.toml" gateway >"$W/$1.log" 2>&1 & pids+=($!)
  gateway_ready "$W/$1"
  eval "GW_SSH_$1=$ssh GW_UDP_$1=$udp"
}
gateway a
gateway b
enroll "$W/a" "127.0.0.1:$GW_UDP_a" on-a "$W/agent-a"
# The agent on B: enrolled and online at B (enroll waits for B to list it).
enroll "$W/b" "127.0.0.1:$GW_UDP_b" on-b "$W/agent-b"

cat >"$W/policy.toml" <<'POL'
name = "bench"
[[statement]]
effect = "allow"
users = ["root"]
actions = ["exec", "port-forward"]
instances = ["*"]
forward_to = ["127.0.0.1:*"]
allow_root = true
POL
"$T/postern" --data-dir "$W/a" user add root --key-file "$W/user.pub" >/dev/null
"$T/postern" --data-dir "$W/a" policy apply "$W/policy.toml" >/dev/null
echo "@cert-authority [127.0.0.1]:* $(known_hosts "$W/a" | cut -d' ' -f3-)" >"$W/known_hosts"
S="ssh -p $GW_SSH_a -i $W/user -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile=$W/known_hosts"
for i in $(seq 1 50); do $S root%on-b@127.0.0.1 true 2>/dev/null && break; sleep 0.2; done
$S root%on-a@127.0.0.1 true && $S root%on-b@127.0.0.1 true   # both work before measuring

echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(ssh -V 2>&1)"
echo "### session setup: wall time of \`ssh -p A root%INSTANCE@127.0.0.1 true\`"
echo -n "agent on A (local):            "; $B setup "$RUNS" -- $S root%on-a@127.0.0.1 true
echo -n "agent on B (through B):        "; $B setup "$RUNS" -- $S root%on-b@127.0.0.1 true
echo "### throughput: $((SIZE >> 20)) MiB through ssh -L (user on A) to a local TCP sink"
exec {SINKFD}< <($B sink)
SINK_PID=$!; pids+=($SINK_PID)
read -r -u "$SINKFD" SINK
L1=$(port); $S -N -L "$L1:127.0.0.1:$SINK" root%on-a@127.0.0.1 & pids+=($!)
L2=$(port); $S -N -L "$L2:127.0.0.1:$SINK" root%on-b@127.0.0.1 & pids+=($!)
for p in $L1 $L2; do for _ in $(seq 1 100); do python3 -c "import socket;socket.create_connection(('127.0.0.1',$p),1)" 2>/dev/null && break; sleep 0.05; done; done
echo -n "agent on A (local):            "; $B forward "$L1" "$SIZE"
echo -n "agent on B (through B):        "; $B forward "$L2" "$SIZE"
