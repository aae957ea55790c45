#!/usr/bin/env bash
# Postern over an emulated WAN link, side by side with an OpenSSH bastion. The agent (and the
# target sshd, and a TCP sink) live in a network namespace whose only way out is a userspace
# link emulator (postern-linkem: TUN interfaces, delay/jitter/loss/rate/queue per direction);
# the gateway, the OpenSSH bastion and the ssh client stay in this namespace. Both paths cross
# the emulated link exactly once:
#   postern:  ssh -L -> gateway SSH door (loopback) -> tunnel (QUIC or TCP) over the link -> agent -> sink
#   openssh:  ssh -J bastion (loopback) -> target sshd over the link -> sink
# Release build; needs root (namespaces, TUN, the sshds), openssh-server and python3.
#   bash benches/wan.sh                        all of RTTS="0 20 50 100" x LOSSES="0 0.5 1"
#   RTTS=50 LOSSES="0 1" bash benches/wan.sh   a subset
# Other knobs: SIZE_MIB=128, ECHOS=100 (keystroke echo at ECHO_RTT=50 ms), RATE=1gbit,
# QUEUE=4MiB, JITTER=0ms, TRANSPORTS="quic tcp" (the agent's --transport values to try),
# TRANSFER_TIMEOUT=300 (seconds; a transfer that takes longer reports "failed").
set -euo pipefail
SIZE=$(( ${SIZE_MIB:-128} * 1024 * 1024 ))
RTTS=${RTTS:-0 20 50 100}
LOSSES=${LOSSES:-0 0.5 1}
ECHOS=${ECHOS:-100}
ECHO_RTT=${ECHO_RTT:-50}
RATE=${RATE:-1gbit}
QUEUE=${QUEUE:-4MiB}
JITTER=${JITTER:-0ms}
TRANSPORTS=${TRANSPORTS:-quic tcp}
TRANSFER_TIMEOUT=${TRANSFER_TIMEOUT:-300}
source "$(dirname "$0")/lib.sh"
[ -n "${NO_BUILD:-}" ] || cargo build --profile "$([ "$PROFILE" = debug ] && echo dev || echo "$PROFILE")" --locked \
  -p postern-benches --bin postern-linkem >/dev/null
B="python3 $PWD/benches/ssh_bench.py"

# One namespace and link per run, named after this shell so parallel runs do not collide.
NS=plem-$$
IF=plem$$
NET=10.77.$(( $$ % 250 + 1 ))
GW_ADDR=$NET.1 AGENT_ADDR=$NET.2
ip netns add "$NS"
# Agents run as children of `ip netns exec`, out of reach of cleanup's kill: end them by name.
trap 'pkill -TERM -f -- "postern-agent --state-dir $W/" || true; cleanup; ip netns del "$NS" 2>/dev/null || true' EXIT
# Killed (e.g. by timeout): exit, so the EXIT trap kills every child at once. Long waits below
# are `wait`s on background jobs, which a signal interrupts (a foreground child would delay
# the trap until it ended).
trap 'exit 143' TERM INT HUP
in_ns() { ip netns exec "$NS" "$@"; }
exec {LINK}> >("$T/postern-linkem" --ns-a "$NS" --addr-a "$AGENT_ADDR" --addr-b "$GW_ADDR" --ifname "$IF" \
  --rate "$RATE" --queue "$QUEUE" >"$W/linkem.out" 2>"$W/linkem.err")
pids+=($!)
for _ in $(seq 1 100); do grep -q ready "$W/linkem.out" 2>/dev/null && break; sleep 0.05; done
grep -q ready "$W/linkem.out" || { echo "postern-linkem did not start: $(cat "$W/linkem.err")" >&2; exit 1; }
# link RTT_MS LOSS: new conditions for both directions (half the round trip each way). TCP's
# per-destination metrics cache would carry one cell's ssthresh into the next: flush it.
link() {
  echo "--delay $(( $1 / 2 ))ms --jitter $JITTER --loss $2 --rate $RATE --queue $QUEUE" >&"$LINK"
  ip tcp_metrics flush "$AGENT_ADDR" 2>/dev/null || true
  in_ns ip tcp_metrics flush "$GW_ADDR" 2>/dev/null || true
  sleep 0.2
}

ssh-keygen -q -t ed25519 -N '' -f "$W/user"
mkdir -p /run/sshd
start_sshd() { # name listen-address port [netns]
  ssh-keygen -q -t ed25519 -N '' -f "$W/$1_host"
  cat >"$W/$1.conf" <<CFG
Port $3
ListenAddress $2
HostKey $W/$1_host
PidFile $W/$1.pid
AuthorizedKeysFile $W/user.pub
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
CFG
  ${4:+ip netns exec "$4"} /usr/sbin/sshd -D -f "$W/$1.conf" -E "$W/$1.log" & pids+=($!)
  echo "[$2]:$3 $(cut -d' ' -f1,2 "$W/$1_host.pub")" >>"$W/known_hosts"
}
BASTION=$(port); GW_SSH=$(port); GW_UDP=$(port)
start_sshd bastion 127.0.0.1 "$BASTION"
start_sshd target "$AGENT_ADDR" 22 "$NS"

cat >"$W/gateway.toml" <<CFG
data_dir = "$W/data"
[tunnel]
listen = "$GW_ADDR:$GW_UDP"
[ssh]
listen = "127.0.0.1:$GW_SSH"
public_host = "127.0.0.1"
idle_timeout = "0"
[[ssh.users]]
name = "root"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
allow_root = true   # the benchmark agent runs as root (docs/ssh.md, "Who sessions run as")
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & pids+=($!)
gateway_ready "$W/data"
# The agent's transport flag is newer than this script; without it the agent uses QUIC.
transport_flag=$("$T/postern-agent" run --help 2>&1 | grep -q -- '--transport' && echo yes || true)
declare -A AGENT
AGENT_NETNS=$NS enroll "$W/data" "$GW_ADDR:$GW_UDP" wan-quic "$W/agent-quic" ${transport_flag:+--transport quic}
AGENT[wan-quic]=${pids[-1]}
HOSTS=(wan-quic)
if [[ " $TRANSPORTS " == *" tcp "* ]]; then
  if [ -n "$transport_flag" ]; then
    AGENT_NETNS=$NS enroll "$W/data" "$GW_ADDR:$GW_UDP" wan-tcp "$W/agent-tcp" --transport tcp
    AGENT[wan-tcp]=${pids[-1]}
    HOSTS+=(wan-tcp)
  else
    echo "note: this postern-agent has no --transport flag (agent over TCP not built yet): no TCP column" >&2
  fi
fi

# reconnect: every agent opens a fresh tunnel under the link's current conditions. A
# congestion controller keeps what it learnt about the path (quinn's BBR the smallest RTT it
# ever saw, for the connection's whole life): a tunnel opened while the link had no delay
# would carry that into every cell.
reconnect() {
  local h transport
  for h in "${HOSTS[@]}"; do
    transport=${h#wan-}
    # `ip netns exec` runs the agent as its child: signal the agent itself.
    pkill -TERM -f -- "postern-agent --state-dir $W/agent-$transport " || true
    wait "${AGENT[$h]}" 2>/dev/null || true
    wait_online "$W/data" "$h" no
    POSTERN_LOG=warn in_ns "$T/postern-agent" --state-dir "$W/agent-$transport" run \
      ${transport_flag:+--transport $transport} & pids+=($!)
    AGENT[$h]=$!
    wait_online "$W/data" "$h" yes
  done
}

"$T/postern" --data-dir "$W/data" ssh-config --known-hosts-file "$W/known_hosts" >"$W/printed"
sed -n '/^@cert-authority/p' "$W/printed" >>"$W/known_hosts"
{
  sed -n '1,/^$/p' "$W/printed"
  cat <<CFG
Host bastion
    HostName 127.0.0.1
    Port $BASTION
    HostKeyAlias [127.0.0.1]:$BASTION
Host target
    HostName $AGENT_ADDR
    Port 22
    HostKeyAlias [$AGENT_ADDR]:22
    ProxyJump root@bastion
Host *
    User root
    IdentityFile $W/user
    IdentitiesOnly yes
    BatchMode yes
    UserKnownHostsFile $W/known_hosts
CFG
} >"$W/ssh_config"
for h in "${HOSTS[@]}"; do ssh -F "$W/ssh_config" "root@$h.postern" true; done
ssh -F "$W/ssh_config" target true

exec {SINKFD}< <(in_ns $B sink)
pids+=($!)
read -r -u "$SINKFD" SINK

# through HOST: sets R to the MiB/s of SIZE bytes through a fresh `ssh -L` to the sink (HOST
# as ssh names it), or "failed".
through() {
  local l ssh_pid fwd out
  l=$(port)
  ssh -F "$W/ssh_config" -N -L "$l:127.0.0.1:$SINK" "$1" & ssh_pid=$!
  timeout "$TRANSFER_TIMEOUT" $B forward "$l" "$SIZE" >"$W/forward.out" 2>/dev/null & fwd=$!
  pids+=("$ssh_pid" "$fwd")
  if wait "$fwd"; then out=$(cat "$W/forward.out"); else out="failed"; fi
  kill "$ssh_pid" 2>/dev/null; wait "$ssh_pid" 2>/dev/null || true
  R=${out%% MiB/s*}
}
ratio() { python3 -c "import sys;a,b=sys.argv[1:];print(f'{float(a)/float(b):.2f}' if a.replace('.','').isdigit() and b.replace('.','').isdigit() and float(b)>0 else '-')" "$1" "$2"; }

echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(ssh -V 2>&1)"
echo "link: postern-linkem, rate $RATE, queue $QUEUE, jitter $JITTER; $((SIZE >> 20)) MiB through ssh -L to a TCP sink behind the link"
echo
has_tcp=$([ ${#HOSTS[@]} -gt 1 ] && echo 1 || echo "")
echo "| RTT | loss | Postern, QUIC (MiB/s) |${has_tcp:+ Postern, TCP (MiB/s) |} OpenSSH -J (MiB/s) | QUIC / OpenSSH |${has_tcp:+ TCP / OpenSSH |}"
echo "|---|---|---|${has_tcp:+---|}---|---|${has_tcp:+---|}"
for rtt in $RTTS; do
  for loss in $LOSSES; do
    link "$rtt" "$loss"
    reconnect
    through root@wan-quic.postern; q=$R
    [ -z "$has_tcp" ] || { through root@wan-tcp.postern; t=$R; }
    through target; o=$R
    echo "| $rtt ms | $loss % | $q |${has_tcp:+ $t |} $o | $(ratio "$q" "$o") |${has_tcp:+ $(ratio "$t" "$o") |}"
  done
done

echo
echo "### keystroke echo round trip at $ECHO_RTT ms RTT, no loss (interactive shell, PTY; $ECHOS keys)"
link "$ECHO_RTT" 0
reconnect
for h in "${HOSTS[@]}"; do
  echo -n "postern ($h):  "; $B echo "$ECHOS" -- ssh -F "$W/ssh_config" -tt "root@$h.postern"
done
echo -n "openssh (-J):  "; $B echo "$ECHOS" -- ssh -F "$W/ssh_config" -tt target
