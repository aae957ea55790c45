#!/usr/bin/env bash
# Bytes of recording per byte of output for output that is not text: an exec session
# printing SIZE bytes of /dev/zero, then SIZE bytes of /dev/urandom, then SIZE bytes of
# text, through a recording gateway. Reports each recording's size divided by the output's
# size. The size does not depend on the build, so PROFILE=debug (the default here) is fine.
#   bash benches/recording-size.sh            (SIZE=10000000 by default)
set -euo pipefail
SIZE=${SIZE:-10000000}
PROFILE=${PROFILE:-debug}
source "$(dirname "$0")/lib.sh"
ssh-keygen -q -t ed25519 -N '' -f "$W/user"
udp=$(port); ssh=$(port)
cat >"$W/gateway.toml" <<CFG
data_dir = "$W/data"
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
[audit]
max_recording_bytes = 0   # no limit: measure the whole recording
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & pids+=($!)
gateway_ready "$W/data"
enroll "$W/data" "127.0.0.1:$udp" box "$W/agent"
known_hosts "$W/data" >"$W/known_hosts"

echo "## $(date -u +%Y-%m-%dT%H:%MZ): recording bytes per output byte, $SIZE bytes per session"
for src in "head -c $SIZE /dev/zero" "head -c $SIZE /dev/urandom" "head -c $SIZE /dev/zero | tr '\\000' a"; do
  before=$( (ls "$W/data/recordings" 2>/dev/null || true) | sort)
  out=$(ssh -p "$ssh" -i "$W/user" -o IdentitiesOnly=yes -o BatchMode=yes -o "UserKnownHostsFile=$W/known_hosts" \
    bench%box@127.0.0.1 "$src" </dev/null | wc -c)
  cast=$(comm -13 <(echo "$before") <(ls "$W/data/recordings" | sort))
  size=$(stat -c %s "$W/data/recordings/$cast")
  python3 -c "import sys; o,s=int(sys.argv[2]),int(sys.argv[3]); print(f'{sys.argv[1]:45} output {o:>10}  recording {s:>10}  {s/o:.3f} bytes/byte')" "$src" "$out" "$size"
done
