# Shared set-up for the end-to-end benchmark scripts (sourced, not run): a release build
# (PROFILE=debug for scripts whose result does not depend on it, such as recording sizes),
# a scratch directory removed on exit together with every process started in the
# background (append PIDs to `pids`), free loopback ports, and helpers to wait for a gateway
# and to enroll agents. Needs python3.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROFILE=${PROFILE:-release}
# NO_BUILD=1: use the binaries already in the target directory (built by one cargo call of
# your own, e.g. together with postern-benches, so features resolve once).
[ -n "${NO_BUILD:-}" ] ||
  cargo build --profile "$([ "$PROFILE" = debug ] && echo dev || echo "$PROFILE")" --locked -p postern-gateway -p postern-tunnel --bins >/dev/null
T=${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# gateway_ready DATA_DIR: wait (at most 5 s) for the gateway's admin socket.
gateway_ready() { for _ in $(seq 1 100); do [ -S "$1/admin.sock" ] && return 0; sleep 0.05; done; echo "gateway did not start" >&2; exit 1; }

# enroll DATA_DIR TUNNEL_ADDR NAME STATE_DIR [postern-agent run ARGS...]: a token named NAME
# (labels from $LABELS, default env=bench), join, `run` in the background, wait until online.
# With AGENT_NETNS set, the agent joins and runs inside that network namespace.
enroll() {
  local data=$1 tunnel=$2 name=$3 state=$4 tok token pin in_ns=()
  shift 4
  [ -z "${AGENT_NETNS:-}" ] || in_ns=(ip netns exec "$AGENT_NETNS")
  tok=$("$T/postern" --data-dir "$data" token create --name "$name" --labels "${LABELS:-env=bench}" --json)
  token=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])' <<<"$tok")
  pin=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["ca_pin"])' <<<"$tok")
  "${in_ns[@]}" "$T/postern-agent" --state-dir "$state" join --gateway "$tunnel" --token "$token" --ca-pin "$pin" >/dev/null
  POSTERN_LOG=warn "${in_ns[@]}" "$T/postern-agent" --state-dir "$state" run "$@" & pids+=($!)
  wait_online "$data" "$name" yes
}

# wait_online DATA_DIR NAME yes|no: wait (at most 10 s) until the gateway lists agent NAME as
# online (yes) or not (no).
wait_online() {
  local want=$([ "$3" = yes ] && echo True || echo False)
  for _ in $(seq 1 100); do
    "$T/postern" --data-dir "$1" instances --json |
      python3 -c "import json,sys;sys.exit(0 if any(i['name']=='$2' and i['online']==$want for i in json.load(sys.stdin)) else 1)" &&
      return 0
    sleep 0.1
  done
  echo "agent $2 did not go online=$3" >&2; exit 1
}

# known_hosts DATA_DIR: the gateway's @cert-authority line.
known_hosts() { "$T/postern" --data-dir "$1" ssh-config --known-hosts-file /dev/null | sed -n '/^@cert-authority/p'; }

# start_postgres DB: a throwaway PostgreSQL on loopback (initdb runs as the postgres user, so
# this needs root) with an empty database DB; sets PGPORT and URL, stopped on exit.
start_postgres() {
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | head -1)
  PGPORT=$(port)
  mkdir -p "$W/pg" && chown postgres "$W" "$W/pg"
  runuser -u postgres -- "$PGBIN/initdb" -D "$W/pg/data" -U postgres -A trust --no-sync >/dev/null
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$W/pg/data" -l "$W/pg/log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $W/pg" start >/dev/null
  trap 'runuser -u postgres -- "$PGBIN/pg_ctl" -D "$W/pg/data" -m immediate stop >/dev/null 2>&1 || true; cleanup' EXIT
  psql -h 127.0.0.1 -p "$PGPORT" -U postgres -Atc "CREATE DATABASE $1" >/dev/null
  URL="postgres://postgres@127.0.0.1:$PGPORT/$1"
}
