#!/usr/bin/env bash
# Policy decisions with the policy set loaded from PostgreSQL, as a cluster gateway loads it,
# and the store lookup of an instance each session's authorization makes (benches/benches/
# policy.rs with POSTERN_BENCH_PG_URL). Needs root (initdb runs as the postgres user) and
# postgresql.
#   bash benches/policy-pg.sh
set -euo pipefail
PROFILE=debug   # lib.sh's binaries are not used here; the bench builds itself (release)
source "$(dirname "$0")/lib.sh"
start_postgres bench
POSTERN_BENCH_PG_URL="$URL" cargo bench --locked -p postern-benches --bench policy -- \
  --warm-up-time 2 --measurement-time 5 2>&1 | grep -E "^(policy|store)|time:"
