#!/usr/bin/env bash
# The RDP front door in one run on this machine: FreeRDP 2 connection setup (TLS,
# +auth-only) to xrdp directly vs through gateway and agent with a routing token, the token
# request itself, and bytes relayed per second into a TCP sink (direct, RDP door, --local).
# Release build; needs root, xrdp, xvfb, freerdp2-x11 and python3.
#   bash benches/rdp.sh            (RUNS=20 SIZE_MIB=1024 by default)
set -euo pipefail
RUNS=${RUNS:-20}
SIZE=$(( ${SIZE_MIB:-1024} * 1024 * 1024 ))
source "$(dirname "$0")/lib.sh"
B="python3 $PWD/benches/ssh_bench.py"
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# xrdp (TLS; no sesman needed for +auth-only) and a display for xfreerdp.
XRDP=$(port)
mkdir -p /run/xrdp/sockdir && chmod 3777 /run/xrdp/sockdir
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
sed -e "s|^port=3389\$|port=tcp://127.0.0.1:$XRDP|" -e "s|^certificate=\$|certificate=$W/cert.pem|" \
    -e "s|^key_file=\$|key_file=$W/key.pem|" -e "s|^LogFile=xrdp.log|LogFile=$W/xrdp.log|" \
    -e 's|^EnableSyslog=true|EnableSyslog=false|' /etc/xrdp/xrdp.ini >"$W/xrdp.ini"
xrdp --nodaemon -c "$W/xrdp.ini" >/dev/null 2>&1 & pids+=($!)
exec {XFD}< <(Xvfb -displayfd 1 -screen 0 1024x768x24 -nolisten tcp 2>/dev/null)
pids+=($!)
read -r -u "$XFD" DNUM
export DISPLAY=":$DNUM" HOME="$W/home"
mkdir -p "$HOME"
wait_port "$XRDP"

# A TCP sink standing in for an RDP server, for byte rates.
exec {SINKFD}< <($B sink)
pids+=($!)
read -r -u "$SINKFD" SINK

ssh-keygen -q -t ed25519 -N '' -f "$W/user"
GW_SSH=$(port); GW_UDP=$(port); GW_RDP=$(port)
cat >"$W/gateway.toml" <<CFG
data_dir = "$W/data"
[tunnel]
listen = "127.0.0.1:$GW_UDP"
[ssh]
listen = "127.0.0.1:$GW_SSH"
public_host = "127.0.0.1"
idle_timeout = "0"
[[ssh.users]]
name = "bench"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
actions = ["rdp"]
[rdp]
enabled = true
listen = "127.0.0.1:$GW_RDP"
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & pids+=($!)
gateway_ready "$W/data"
agent() { # name rdp_address
  printf '[limits]\nrdp_address = "%s"\n' "$2" >"$W/$1.toml"
  enroll "$W/data" "127.0.0.1:$GW_UDP" "$1" "$W/$1" --config "$W/$1.toml"
}
agent win "127.0.0.1:$XRDP"
agent sink "127.0.0.1:$SINK"
known_hosts "$W/data" >"$W/known_hosts"
R="$T/postern rdp --gateway 127.0.0.1:$GW_SSH --user bench -i $W/user --known-hosts $W/known_hosts"
token() { $R "$1" --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])'; }
XF="timeout 60 xfreerdp /cert:ignore +auth-only /sec:tls /u:bench /p:x /log-level:OFF"

echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, FreeRDP $(xfreerdp --version | grep -o '[0-9][0-9.]*' | head -1), xrdp $(xrdp --version 2>&1 | grep -o '[0-9][0-9.]*' | head -1)"
echo "### connection setup: xfreerdp +auth-only (TLS) to xrdp"
for _ in $(seq 1 "$RUNS"); do token win; done >"$W/tokens"
echo -n "direct to xrdp:                        "; $B setup "$RUNS" -- $XF "/v:127.0.0.1:$XRDP"
echo -n "through gateway + agent (token ready): "; $B setup-tokens "$W/tokens" -- $XF "/v:127.0.0.1:$GW_RDP" "/pcb:{}"
echo -n "token request (postern rdp --json):    "; $B setup "$RUNS" -- $R win --json
echo "### bytes relayed: $((SIZE >> 20)) MiB of zeros into a TCP sink"
echo -n "direct TCP:                 "; $B forward "$SINK" "$SIZE"
echo -n "RDP door (token):           "; $B forward "$GW_RDP" "$SIZE" "$(token sink)"
L=$(port)
$R sink --local "$L" 2>/dev/null & pids+=($!)
wait_port "$L"
echo -n "postern rdp --local (SSH):  "; $B forward "$L" "$SIZE"
