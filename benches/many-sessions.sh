#!/usr/bin/env bash
# Many sessions at once through one gateway (issue 20): SHELLS interactive shells (PTY,
# recorded, each typing one keystroke a second and timing its echo) and, after STEADY
# seconds of typing, TRANSFERS bulk transfers of MIB MiB each (`direct-tcpip` forwards, as
# `ssh -L`, into a TCP sink) at the same time, through one gateway's SSH door to AGENTS real
# `postern-agent`s on this machine. The driver (benches/src/bin/postern-many.rs) is one
# process holding one russh connection per session; it reports set-up, echo latency (p50,
# p99, max), aggregate throughput and failures, and the CPU and RSS of the gateway, the
# agents and itself in each phase. The shells run as a throwaway OS user whose login shell
# is /bin/sh (root's shell here is bash with a .bashrc that runs pyenv: a thousand of those
# starting at once is a benchmark of pyenv). Release build; loopback only; needs root (to
# add that user; the agents run as root), python3.
#   bash benches/many-sessions.sh        (SHELLS=1000 TRANSFERS=100 MIB=64 AGENTS=1 STEADY=30)
# AGENT_MAX_SESSIONS sets the agents' [limits] max_sessions (default: enough for all sessions).
# TRANSPORT=quic|tcp: the agents' --transport (default: theirs, auto).
set -euo pipefail
SHELLS=${SHELLS:-1000}; TRANSFERS=${TRANSFERS:-100}; MIB=${MIB:-64}; AGENTS=${AGENTS:-1}; STEADY=${STEADY:-30}
[ "$SHELLS" -le 5000 ] && [ "$TRANSFERS" -le 1000 ] && [ "$AGENTS" -ge 1 ] && [ "$AGENTS" -le 50 ] ||
  { echo "SHELLS<=5000 TRANSFERS<=1000 1<=AGENTS<=50" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)"
source "$(dirname "$0")/lib.sh"
cargo build --profile "$([ "$PROFILE" = debug ] && echo dev || echo "$PROFILE")" --locked -p postern-benches --bin postern-many >/dev/null

ssh-keygen -q -t ed25519 -N '' -f "$W/user"
RUN_AS=postern-many
id "$RUN_AS" >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /bin/sh "$RUN_AS"
GW_SSH=$(port); GW_UDP=$(port)
cat >"$W/gateway.toml" <<CFG
data_dir = "$W/data"
[tunnel]
listen = "127.0.0.1:$GW_UDP"
[ssh]
listen = "127.0.0.1:$GW_SSH"
public_host = "127.0.0.1"
idle_timeout = "0"
[[ssh.users]]
name = "root"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
run_as = "$RUN_AS"
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & GW=$!; pids+=($GW)
gateway_ready "$W/data"

cat >"$W/agent.toml" <<CFG
[limits]
run_as = ["$RUN_AS"]
max_sessions = ${AGENT_MAX_SESSIONS:-$(( (SHELLS + TRANSFERS) / AGENTS + 1 ))}
CFG
watch=(--watch "gateway=$GW")
instances=()
for i in $(seq 1 "$AGENTS"); do
  enroll "$W/data" "127.0.0.1:$GW_UDP" "many-$i" "$W/agent-$i" --config "$W/agent.toml" ${TRANSPORT:+--transport "$TRANSPORT"}
  watch+=(--watch "agent-$i=${pids[-1]}")
  instances+=("many-$i")
done

echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; $AGENTS agent(s), descriptors limit $(ulimit -n)"
"$T/postern-many" --gateway "127.0.0.1:$GW_SSH" --key "$W/user" --user root \
  --instances "$(IFS=,; echo "${instances[*]}")" --shells "$SHELLS" --transfers "$TRANSFERS" \
  --transfer-mib "$MIB" --steady-secs "$STEADY" "${watch[@]}"
echo "## gateway log: $(wc -l <"$W/gateway.log") lines (warnings and errors)"
sort "$W/gateway.log" | sed -E 's/^[^ ]+ +//' | cut -c1-200 | sort | uniq -c | sort -rn | head -10
echo "## recordings: $(ls "$W/data/recordings" | wc -l) files, $(du -sm "$W/data/recordings" | cut -f1) MiB"
