#!/usr/bin/env bash
# Postern's SSH front door side by side with an OpenSSH bastion (sshd as jump host) in
# front of a local sshd, in one run on this machine. Release build; needs root (the sshds
# log in as root with a throwaway key), openssh-server and python3.
#   bash benches/ssh-vs-openssh.sh            (SIZE_MIB=1024 RUNS=20 ECHOS=200 by default)
#   SSH_CIPHERS='["aes256-gcm@openssh.com"]'  sets the gateway's [ssh] ciphers
set -euo pipefail
SIZE=$(( ${SIZE_MIB:-1024} * 1024 * 1024 ))
RUNS=${RUNS:-20}
ECHOS=${ECHOS:-200}
source "$(dirname "$0")/lib.sh"
B="python3 $PWD/benches/ssh_bench.py"

ssh-keygen -q -t ed25519 -N '' -f "$W/user"
mkdir -p /run/sshd
start_sshd() { # name port
  ssh-keygen -q -t ed25519 -N '' -f "$W/$1_host"
  cat >"$W/$1.conf" <<CFG
Port $2
ListenAddress 127.0.0.1
HostKey $W/$1_host
PidFile $W/$1.pid
AuthorizedKeysFile $W/user.pub
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
Subsystem sftp internal-sftp
CFG
  /usr/sbin/sshd -D -f "$W/$1.conf" -E "$W/$1.log" & pids+=($!)
  echo "[127.0.0.1]:$2 $(cut -d' ' -f1,2 "$W/$1_host.pub")" >>"$W/known_hosts"
}
BASTION=$(port); TARGET=$(port); GW_SSH=$(port); GW_UDP=$(port)
start_sshd bastion "$BASTION"
start_sshd target "$TARGET"

cat >"$W/gateway.toml" <<CFG
data_dir = "$W/data"
[tunnel]
listen = "127.0.0.1:$GW_UDP"
[ssh]
listen = "127.0.0.1:$GW_SSH"
public_host = "127.0.0.1"
idle_timeout = "0"
${SSH_CIPHERS:+ciphers = $SSH_CIPHERS}
[[ssh.users]]
name = "root"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
allow_root = true   # the benchmark agent runs as root (docs/ssh.md, "Who sessions run as")
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & pids+=($!)
gateway_ready "$W/data"
enroll "$W/data" "127.0.0.1:$GW_UDP" bench "$W/agent"

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
    HostName 127.0.0.1
    Port $TARGET
    HostKeyAlias [127.0.0.1]:$TARGET
    ProxyJump root@bastion
Host *
    User root
    IdentityFile $W/user
    IdentitiesOnly yes
    BatchMode yes
    UserKnownHostsFile $W/known_hosts
CFG
} >"$W/ssh_config"
P="ssh -F $W/ssh_config root@bench.postern"
O="ssh -F $W/ssh_config target"
$P true && $O true   # both work before measuring

echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(ssh -V 2>&1)"
echo "### session setup: wall time of \`ssh HOST true\` (two hops each)"
echo -n "postern  (ssh root@bench.postern true):  "; $B setup "$RUNS" -- $P true
echo -n "openssh  (ssh -J bastion target true):   "; $B setup "$RUNS" -- $O true
echo "### throughput: $((SIZE >> 20)) MiB of zeros into 'cat > /dev/null'"
echo -n "postern:  "; $B pipe "$SIZE" -- $P 'cat > /dev/null'
echo -n "openssh:  "; $B pipe "$SIZE" -- $O 'cat > /dev/null'
echo "### throughput: $((SIZE >> 20)) MiB through ssh -L to a local TCP sink"
exec {SINKFD}< <($B sink)
SINK_PID=$!; pids+=($SINK_PID)
read -r -u "$SINKFD" SINK
L1=$(port); ssh -F "$W/ssh_config" -N -L "$L1:127.0.0.1:$SINK" root@bench.postern & pids+=($!)
echo -n "postern:  "; $B forward "$L1" "$SIZE"
L2=$(port); ssh -F "$W/ssh_config" -N -L "$L2:127.0.0.1:$SINK" target & pids+=($!)
echo -n "openssh:  "; $B forward "$L2" "$SIZE"
L3=$(port); "$T/postern" forward --gateway "127.0.0.1:$GW_SSH" --user root -i "$W/user" --known-hosts "$W/known_hosts" \
  bench "$L3:127.0.0.1:$SINK" 2>/dev/null & pids+=($!)
echo -n "postern forward (the client, one SSH layer):  "; $B forward "$L3" "$SIZE"
echo "### keystroke echo round trip (interactive shell, PTY)"
echo -n "postern:  "; $B echo "$ECHOS" -- ssh -F "$W/ssh_config" -tt root@bench.postern
echo -n "openssh:  "; $B echo "$ECHOS" -- ssh -F "$W/ssh_config" -tt target
