#!/usr/bin/env bash
# Cost of session recording on output throughput: the same session printing SIZE_MIB of text
# through the gateway, recorded (asciicast) and unrecorded (a second gateway with [audit]
# fail_closed = false whose recordings directory is unusable), RUNS times each, alternating.
# MODE=exec (default) runs it as an exec session without a terminal, the fastest path and so
# the worst case for recording; MODE=shell asks for a terminal (ssh -tt), as a shell session
# has. Reports wall time, the gateway's CPU time (user + system) and the whole machine's busy
# CPU time, which are steadier than wall time on a busy machine. Release build; needs
# openssh-client and python3.
#   bash benches/recording-overhead.sh        (SIZE_MIB=256 RUNS=5 MODE=exec by default)
set -euo pipefail
SIZE_MIB=${SIZE_MIB:-256}
RUNS=${RUNS:-5}
MODE=${MODE:-exec}
source "$(dirname "$0")/lib.sh"
ssh-keygen -q -t ed25519 -N '' -f "$W/user"

start() { # name extra-config
  local d="$W/$1" udp ssh
  udp=$(port); ssh=$(port)
  mkdir -p "$d"
  cat >"$d/gateway.toml" <<CFG
data_dir = "$d/data"
[tunnel]
listen = "127.0.0.1:$udp"
[ssh]
listen = "127.0.0.1:$ssh"
public_host = "127.0.0.1"
idle_timeout = "0"
[[ssh.users]]
name = "bench"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
allow_root = true   # the benchmark agent runs as root (docs/ssh.md, "Who sessions run as")
$2
CFG
  POSTERN_LOG=warn "$T/postern" --config "$d/gateway.toml" gateway >"$d/gateway.log" 2>&1 & pids+=($!)
  echo $! >"$d/gateway.pid"
  gateway_ready "$d/data"
  enroll "$d/data" "127.0.0.1:$udp" box "$d/agent"
  known_hosts "$d/data" >"$d/known_hosts"
  echo "$ssh" >"$d/port"
}
start recorded ""
start unrecorded $'[audit]\nfail_closed = false'
touch "$W/unrecorded/data/recordings"      # a file where the directory should be: no recording

run() { # name -> "wall-seconds gateway-cpu-seconds"
  local d="$W/$1"
  python3 - "$d" "$W/user" "$SIZE_MIB" "$MODE" <<'PY'
import os, subprocess, sys, time
d, key, mib, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pid = open(d + "/gateway.pid").read().strip()
def cpu():  # user + system seconds of the gateway process so far
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def busy():  # CPU seconds the whole machine spent not idle so far
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
c, b = cpu(), busy()
port = open(d + "/port").read().strip()
cmd = ["ssh", *(["-tt"] if mode == "shell" else []), "-p", port, "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
       "-o", "UserKnownHostsFile=" + d + "/known_hosts", "bench%box@127.0.0.1",
       f"head -c {mib << 20} /dev/zero | tr '\\000' a"]
t = time.monotonic()
p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, check=True)
assert len(p.stdout) == mib << 20, len(p.stdout)
print(f"{time.monotonic() - t:.3f}/{cpu() - c:.2f}/{busy() - b:.2f}")
PY
}
run recorded >/dev/null; run unrecorded >/dev/null   # warm up, and check both work
echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: ${SIZE_MIB} MiB of output per $MODE session, ${RUNS} runs each"
rec=(); unrec=()
for _ in $(seq 1 "$RUNS"); do rec+=("$(run recorded)"); unrec+=("$(run unrecorded)"); done
python3 - "$SIZE_MIB" "${rec[*]}" "${unrec[*]}" <<'PY'
import statistics, sys
mib = int(sys.argv[1])
rec = [tuple(map(float, x.split("/"))) for x in sys.argv[2].split()]
unrec = [tuple(map(float, x.split("/"))) for x in sys.argv[3].split()]
med = lambda xs, i: statistics.median(x[i] for x in xs)
r, u, rc, uc, rb, ub = med(rec, 0), med(unrec, 0), med(rec, 1), med(unrec, 1), med(rec, 2), med(unrec, 2)
print(f"recorded:    median {r:.2f} s  ({mib / r:.0f} MiB/s), gateway CPU {rc:.2f} s, machine CPU {rb:.2f} s   runs {[x[0] for x in rec]}")
print(f"unrecorded:  median {u:.2f} s  ({mib / u:.0f} MiB/s), gateway CPU {uc:.2f} s, machine CPU {ub:.2f} s   runs {[x[0] for x in unrec]}")
print(f"recording overhead: {100 * (r - u) / u:+.1f}% wall time, {100 * (rc - uc) / uc:+.1f}% gateway CPU, {100 * (rb - ub) / ub:+.1f}% machine CPU")
PY
ls "$W/recorded/data/recordings" | head -3 >/dev/null
