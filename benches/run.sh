#!/usr/bin/env bash
# `postern run` across many real agents on this machine: wall time and gateway CPU for one
# command on every instance, at several concurrency limits. Release build; python3.
#   bash benches/run.sh            (AGENTS=100 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${AGENTS:-100}
cargo build --release --locked -p postern-gateway -p postern-tunnel --bins >/dev/null
T=$PWD/target/release
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

ssh-keygen -q -t ed25519 -N '' -f "$W/user"
GW_SSH=$(port); GW_UDP=$(port)
cat >"$W/gateway.toml" <<CFG
data_dir = "$W/data"
[tunnel]
listen = "127.0.0.1:$GW_UDP"
[ssh]
listen = "127.0.0.1:$GW_SSH"
public_host = "127.0.0.1"
idle_timeout = "0"
[audit]
fail_closed = true
[[ssh.users]]
name = "bench"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & GW_PID=$!; pids+=($GW_PID)
for _ in $(seq 1 100); do [ -S "$W/data/admin.sock" ] && break; sleep 0.05; done
A="$T/postern --data-dir $W/data"
echo "enrolling $AGENTS agents..." >&2
for i in $(seq -w 1 "$AGENTS"); do
  tok=$($A token create --name "node-$i" --labels env=bench --json)
  token=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])' <<<"$tok")
  pin=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["ca_pin"])' <<<"$tok")
  "$T/postern-agent" --state-dir "$W/a$i" join --gateway "127.0.0.1:$GW_UDP" --token "$token" --ca-pin "$pin" >/dev/null
  POSTERN_LOG=warn "$T/postern-agent" --state-dir "$W/a$i" run & pids+=($!)
done
for _ in $(seq 1 200); do
  n=$($A instances --json | python3 -c 'import json,sys;print(sum(1 for i in json.load(sys.stdin) if i["online"]))')
  [ "$n" -ge "$AGENTS" ] && break; sleep 0.1
done
"$T/postern" --data-dir "$W/data" ssh-config --known-hosts-file /dev/null | sed -n '/^@cert-authority/p' >"$W/known_hosts"
export POSTERN_GATEWAY="127.0.0.1:$GW_SSH" POSTERN_USER=bench
U="$T/postern"
UA=(-i "$W/user" --known-hosts "$W/known_hosts")
cpu() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }   # utime + stime, clock ticks
TCK=$(getconf CLK_TCK)

echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $AGENTS agents online (one machine: gateway, agents and client share the cores)"
echo "| command | max concurrency | wall | gateway CPU | result |"
echo "|---|---|---|---|---|"
for cmd in "true" "uname -a; sleep 1"; do
  for c in 10 25 100; do
    c0=$(cpu); t0=$(date +%s.%N)
    res=$("$U" run "${UA[@]}" --targets env=bench --max-concurrency "$c" --output-dir "$W/out-$c" --json -- "$cmd" 2>/dev/null |
      python3 -c 'import json,sys;s=json.load(sys.stdin);print("%d/%d ok" % (s["success"], s["total"]))')
    t1=$(date +%s.%N); c1=$(cpu)
    python3 -c 'import sys;c,n,t0,t1,c0,c1,tck,r=sys.argv[1:];print(f"| `{c}` | {n} | {float(t1)-float(t0):.2f} s | {(int(c1)-int(c0))/int(tck):.2f} s | {r} |")' \
      "$cmd" "$c" "$t0" "$t1" "$c0" "$c1" "$TCK" "$res"
  done
done
