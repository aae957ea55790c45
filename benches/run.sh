#!/usr/bin/env bash
# `postern run` across many real agents on this machine: wall time and gateway CPU for one
# command on every instance, at several concurrency limits. Release build; python3.
#   bash benches/run.sh            (AGENTS=100 by default)
set -euo pipefail
AGENTS=${AGENTS:-100}
source "$(dirname "$0")/lib.sh"

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
allow_root = true   # the benchmark agent runs as root (docs/ssh.md, "Who sessions run as")
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & GW_PID=$!; pids+=($GW_PID)
gateway_ready "$W/data"
echo "enrolling $AGENTS agents..." >&2
for i in $(seq -w 1 "$AGENTS"); do enroll "$W/data" "127.0.0.1:$GW_UDP" "node-$i" "$W/a$i"; done
known_hosts "$W/data" >"$W/known_hosts"
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
