#!/usr/bin/env bash
# The SSH door under a flood of unauthenticated connections from one source (issue 15):
# 127.0.0.1 holds IDLE idle TCP connections (they never send a version line; the gateway
# closes those beyond [ssh] max_startups_per_source, and the flood reopens them) and opens
# RATE garbage connections a second, for SECS seconds; meanwhile `ssh alice@gateway whoami`
# (a gateway command, no agent needed) runs from 127.0.0.2 one after another, timed (p50,
# p99, failures), and the gateway's RSS is read before, during and after. Loopback only; the
# flood is bounded in count and time and stops by itself. Release build; needs python3 and ssh.
#   IDLE=2000 RATE=20 SECS=30 bash benches/ssh-flood.sh
set -euo pipefail
IDLE=${IDLE:-2000}; RATE=${RATE:-20}; SECS=${SECS:-30}
[ "$IDLE" -le 20000 ] && [ "$RATE" -le 1000 ] && [ "$SECS" -le 600 ] || { echo "IDLE<=20000 RATE<=1000 SECS<=600" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)"
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
[[ssh.users]]
name = "alice"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
allow_root = true   # the benchmark agent runs as root (docs/ssh.md, "Who sessions run as")
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway 2>"$W/gateway.log" & GW=$!; pids+=($GW)
gateway_ready "$W/data"
known_hosts "$W/data" >"$W/known_hosts"
rss_mb() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$GW/status"; }
rss() { echo "$(rss_mb) MB"; }
fds() { ls "/proc/$GW/fd" | wc -l; }
# One timed `ssh whoami` from 127.0.0.2: prints milliseconds, or "fail".
probe() {
  python3 - "$GW_SSH" "$W" <<'PY'
import subprocess, sys, time
port, w = sys.argv[1], sys.argv[2]
t = time.monotonic()
r = subprocess.run(["timeout", "30", "ssh", "-p", port, "-b", "127.0.0.2", "-i", f"{w}/user",
    "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={w}/known_hosts",
    "alice@127.0.0.1", "whoami"], stdin=subprocess.DEVNULL, capture_output=True)
print(f"{(time.monotonic()-t)*1000:.0f}" if r.returncode == 0 and b"127.0.0.2" in r.stdout else "fail")
PY
}
summary() {
  python3 -c '
import sys
v=[l.strip() for l in open(sys.argv[1]) if l.strip()]
ok=sorted(float(x) for x in v if x!="fail")
q=lambda p: ok[min(len(ok)-1,int(p*len(ok)))] if ok else float("nan")
print(f"{len(v)} runs, {len(v)-len(ok)} failed, p50 {q(0.5):.0f} ms, p99 {q(0.99):.0f} ms, max {ok[-1] if ok else 0:.0f} ms")' "$1"
}

echo "before: RSS $(rss), $(fds) descriptors"
for _ in $(seq 1 10); do probe; done >"$W/base.txt"
echo "ssh whoami from 127.0.0.2, no flood: $(summary "$W/base.txt")"

# The flood, in the background: it ends by itself after SECS seconds.
python3 - "$GW_SSH" "$IDLE" "$RATE" "$SECS" >"$W/flood.txt" <<'PY' &
import socket, sys, time, selectors
port, idle, rate, secs = (int(a) for a in sys.argv[1:])
end = time.monotonic() + secs
held, opened, refused, garbage = [], 0, 0, 0
def connect():
    s = socket.socket(); s.setblocking(False)
    try: s.connect_ex(("127.0.0.1", port))
    except OSError: s.close(); return None
    return s
next_garbage = time.monotonic()
while time.monotonic() < end:
    # Keep IDLE connections open: reopen those the gateway closed.
    alive = []
    for s in held:
        try:
            if s.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                s.close(); refused += 1; continue
        except BlockingIOError: pass
        except OSError: s.close(); refused += 1; continue
        alive.append(s)
    held = alive
    while len(held) < idle and time.monotonic() < end:
        s = connect()
        if s is None: break
        held.append(s); opened += 1
        if opened % 200 == 0: break
    now = time.monotonic()
    while next_garbage <= now:
        s = connect()
        if s:
            try: s.send(b"GET / HTTP/1.0\r\n\r\n" * 4)
            except OSError: pass
            s.close(); garbage += 1
        next_garbage += 1 / rate
    time.sleep(0.05)
for s in held: s.close()
print(f"flood: {opened} idle connections opened ({refused} closed by the gateway), {garbage} garbage connections")
PY
FLOOD=$!; pids+=($FLOOD)
sleep 2
echo "during: RSS $(rss), $(fds) descriptors"
: >"$W/flood-probes.txt"; PEAK=0
while kill -0 "$FLOOD" 2>/dev/null; do
  probe >>"$W/flood-probes.txt"; r=$(rss_mb); [ "$r" -gt "$PEAK" ] && PEAK=$r
done
echo "during: peak RSS $PEAK MB"
wait "$FLOOD" || true
cat "$W/flood.txt"
echo "ssh whoami from 127.0.0.2 during the flood: $(summary "$W/flood-probes.txt")"
sleep 3
echo "after: RSS $(rss), $(fds) descriptors"
echo "gateway log: $(wc -l <"$W/gateway.log") lines"
