#!/usr/bin/env bash
# The web console's terminal, end to end on this machine: a release gateway with `[web]`, one
# local agent, headless Chromium (Debian's /usr/bin/chromium through playwright-core, which
# `npm ci` installs in tests/oidc) driven by benches/web_terminal.mjs.
#   1. keystroke echo: one key at a time in the browser's terminal, from keydown to the
#      character in the xterm.js buffer, and the same echo through `ssh -tt` to the same
#      instance through the gateway (benches/ssh_bench.py); both run `stty raw -echo; exec cat`.
#   2. load: CLIENTS terminal WebSockets from one browser page, a command a second each for
#      DURATION seconds; the gateway's RSS and CPU from /proc.
# Release build; needs root (the agent runs as root), node, python3, chromium, openssh-client.
#   bash benches/web-terminal.sh            (ECHOS=200 CLIENTS=100 DURATION=30 by default)
set -euo pipefail
ECHOS=${ECHOS:-200}
CLIENTS=${CLIENTS:-100}
DURATION=${DURATION:-30}
source "$(dirname "$0")/lib.sh"
[ -d tests/oidc/node_modules/playwright-core ] || (cd tests/oidc && npm ci --no-audit --no-fund >/dev/null)
B="python3 $PWD/benches/ssh_bench.py"
D="node $PWD/benches/web_terminal.mjs"

ssh-keygen -q -t ed25519 -N '' -f "$W/user"
GW_SSH=$(port); GW_UDP=$(port); WEB=$(port)
cat >"$W/gateway.toml" <<CFG
data_dir = "$W/data"
[tunnel]
listen = "127.0.0.1:$GW_UDP"
[ssh]
listen = "127.0.0.1:$GW_SSH"
public_host = "127.0.0.1"
idle_timeout = "0"
[web]
enabled = true
listen = "127.0.0.1:$WEB"
[[ssh.users]]
name = "bench"
keys = ["$(cat "$W/user.pub")"]
instances = ["*"]
allow_root = true   # the benchmark agent runs as root (docs/ssh.md, "Who sessions run as")
CFG
POSTERN_LOG=warn "$T/postern" --config "$W/gateway.toml" gateway >"$W/gateway.log" 2>&1 & GW_PID=$!; pids+=($GW_PID)
gateway_ready "$W/data"
enroll "$W/data" "127.0.0.1:$GW_UDP" bench "$W/agent"
AGENT_PID=${pids[-1]}

known_hosts "$W/data" >"$W/known_hosts"
"$T/postern" --data-dir "$W/data" ssh-config --user bench --known-hosts-file "$W/known_hosts" | sed -n '1,/^$/p' >"$W/ssh_config"
cat >>"$W/ssh_config" <<CFG
Host *
    IdentityFile $W/user
    IdentitiesOnly yes
    BatchMode yes
    UserKnownHostsFile $W/known_hosts
CFG
ssh -F "$W/ssh_config" bench@bench.postern true
link() { "$T/postern" web-login --gateway "127.0.0.1:$GW_SSH" --user bench -i "$W/user" --known-hosts "$W/known_hosts" 2>/dev/null; }
link | grep -q "^https://127.0.0.1:$WEB/signin?token=" || { echo "web-login gave no link" >&2; exit 1; }

# live_sessions: how many sessions the gateway has open.
live_sessions() { "$T/postern" --data-dir "$W/data" sessions --json | python3 -c 'import json,sys;print(len(json.load(sys.stdin)))'; }
rss() { awk '/^VmRSS/{print $2}' "/proc/$GW_PID/status"; }   # KiB

echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(/usr/bin/chromium --version 2>/dev/null), $(ssh -V 2>&1)"
echo "### keystroke echo round trip (PTY, \`stty raw -echo; exec cat\`), $ECHOS keys"
$D echo "$(link)" bench "$ECHOS" >"$W/echo.json"
python3 - "$W/echo.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
e, i = j["echo"], j["injected"]
def line(what, s):
    print(f"{what}:  median {s['median']:.2f} ms  p90 {s['p90']:.2f} ms  (n={s['n']})")
line("browser, keydown to the character in the xterm.js buffer", e["parsed"])
line("  keydown to the key sent (xterm.js, the page)", e["sent"])
line("  keydown to the echo arrived (the page's WebSocket)", e["arrived"])
line("  keydown to the character drawn (next animation frame)", e["rendered"])
line("  as Playwright saw it (with its round trips to the browser)", e["playwright"])
line("browser, key handed to xterm.js by script (term.input, no input event): in the buffer", i["parsed"])
line("  echo arrived", i["arrived"])
line("  drawn", i["rendered"])
PY
echo -n "node WebSocket client, no browser:  "
NODE_EXTRA_CA_CERTS="$W/data/ca.crt" node --no-warnings --experimental-websocket "$PWD/benches/web_terminal.mjs" wsecho "$(link)" bench "$ECHOS" |
  python3 -c 'import json,sys;s=json.load(sys.stdin)["wsecho"];print("median %.2f ms  p90 %.2f ms  (n=%d)" % (s["median"], s["p90"], s["n"]))'
SSH_ECHO=$($B echo "$ECHOS" -- ssh -F "$W/ssh_config" -tt bench@bench.postern)
echo "ssh -tt through the gateway:  $SSH_ECHO"
python3 -c 'import json,sys;b=json.load(open(sys.argv[1]))["echo"]["parsed"]["median"];s=float(sys.argv[2].split()[1]);print(f"ratio browser (in the buffer) / ssh, medians: {b/s:.1f}")' "$W/echo.json" "$SSH_ECHO"
for _ in $(seq 1 100); do [ "$(live_sessions)" = 0 ] && break; sleep 0.1; done

echo "### $CLIENTS terminals at once, a command a second each for $DURATION s"
IDLE=$(rss)
$D load "$(link)" bench "$CLIENTS" "$DURATION" "$GW_PID" "$(getconf CLK_TCK)" "$AGENT_PID" >"$W/load.json"
for _ in $(seq 1 200); do [ "$(live_sessions)" = 0 ] && break; sleep 0.1; done
AFTER_S=$(live_sessions); AFTER=$(rss)
python3 - "$W/load.json" "$IDLE" "$AFTER" "$AFTER_S" <<'PY'
import json, sys
l = json.load(open(sys.argv[1]))["load"]
idle, after, left = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r, t, o, y = l["rss_kib"], l["tick_ms"], l["open_ms"], l["ready_ms"]
mib = lambda k: f"{k / 1024:.1f} MiB"
print(f"terminals with a shell that answers: {l['started']}/{l['clients']} in {l['open_all_ms'] / 1000:.2f} s; "
      f"each to `started`: median {o['median']:.0f} ms, p90 {o['p90']:.0f} ms, max {o['max']:.0f} ms; "
      f"to its shell's first answer: median {y['median']:.0f} ms, p90 {y['p90']:.0f} ms, max {y['max']:.0f} ms")
print(f"commands: {l['ticks_sent']} sent, {l['ticks_lost']} without output within 5 s; failures: {l['failures']} {l['first_failures']}")
print(f"command round trip under load: median {t['median']:.2f} ms  p90 {t['p90']:.2f} ms  p99 {t['p99']:.2f} ms  max {t['max']:.2f} ms")
print(f"gateway RSS: idle {mib(idle)}, before {mib(r['before'])}, all open {mib(r['opened'])}, peak {mib(r['peak'])}, "
      f"after (sessions left: {left}) {mib(after)}; per terminal {(r['peak'] - r['before']) / max(1, l['started']):.0f} KiB (peak - before)")
c, w, s = l["cpu_percent"], l["wall_s"], l["cpu_seconds"]
print(f"gateway CPU: opening {c['opening']:.0f}% ({s['opening']:.2f} s in {w['opening']:.1f} s), "
      f"steady {c['steady']:.1f}% of a core ({s['steady']:.2f} s in {w['steady']:.1f} s), closing {c['closing']:.0f}%")
a, m = l["agent_cpu_percent"], l["machine_busy_percent"]
print(f"agent CPU (without its shells): opening {a['opening']:.0f}%, steady {a['steady']:.1f}% of a core; "
      f"machine busy (all {__import__('os').cpu_count()} cores, everything on it): opening {m['opening']:.0f}%, steady {m['steady']:.0f}%")
PY
