#!/usr/bin/env bash
# Run the whole Postern test suite: unit, golden, fuzz-budget, tunnel integration and
# end-to-end tests with the real binaries. On Debian as root it installs what the tests
# need (nftables, iproute2, python3, tmux, procps, OpenSSH client, server and
# sftp-server, xrdp, Xvfb, FreeRDP 2 client and shadow server, winpr-utils, openssl,
# Chromium, dpkg-dev and systemd for the Debian packages, asciinema and moto from PyPI,
# cargo-deb from crates.io, and the test OpenID Provider's node modules from npm);
# elsewhere it says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
command -v pgrep >/dev/null 2>&1 || need+=(procps)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
[ -x /usr/lib/openssh/sftp-server ] || need+=(openssh-sftp-server)
# RDP: xrdp and FreeRDP's shadow server as hosts, xfreerdp (under Xvfb) as the client.
command -v xrdp >/dev/null 2>&1 || [ -x /usr/sbin/xrdp ] || need+=(xrdp)
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb)
command -v xfreerdp >/dev/null 2>&1 || need+=(freerdp2-x11)
command -v freerdp-shadow-cli >/dev/null 2>&1 || need+=(freerdp2-shadow-x11)
command -v winpr-hash >/dev/null 2>&1 || need+=(winpr-utils)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The tunnel's TCP fallback through an HTTP proxy (ssh.rs).
command -v tinyproxy >/dev/null 2>&1 || need+=(tinyproxy)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
# The Debian packages (packages.rs): cargo-deb asks dpkg-shlibdeps for the dependencies,
# the units are checked with systemd-analyze, the gateway's postinst runs adduser.
command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v adduser >/dev/null 2>&1 || [ -x /usr/sbin/adduser ] || need+=(adduser)
# Single sign-on: the test OpenID Provider (tests/oidc) runs on node; Chromium is its browser.
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
# Metrics: a real Prometheus scrapes the gateway (metrics.rs).
[ -x /usr/bin/prometheus ] || need+=(prometheus)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing test dependencies: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing test dependencies: ${need[*]} (install them, or run as root on Debian)" >&2
    exit 1
  fi
fi

# An OS account with a real shell for the login tests (ssh LOGIN@instance runs as it;
# nobody's shell on Debian is nologin). The tests check that it exists.
if ! id -u postern-login >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    useradd --system --no-create-home --home-dir / --shell /bin/sh postern-login
  else
    echo "missing the OS account postern-login (run as root, or: useradd --system -M -d / -s /bin/sh postern-login)" >&2
    exit 1
  fi
fi

# An unprivileged account for the docs tours (tests/tests/docs.rs run the README as it):
# its home is only ever a fresh directory mounted over /home in the tour's own namespace.
if ! id -u postern-tour >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    useradd --system --no-create-home --home-dir /home/postern-tour --shell /bin/sh postern-tour
  else
    echo "missing the OS account postern-tour (run as root, or: useradd --system -M -d /home/postern-tour -s /bin/sh postern-tour)" >&2
    exit 1
  fi
fi

# asciinema (PyPI) checks that session recordings are valid asciicast v2.
if ! command -v asciinema >/dev/null 2>&1; then
  echo "installing asciinema (pip)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'asciinema>=2.3,<3'
fi

# moto (PyPI) is the S3-compatible object store the audit upload tests start and stop.
if ! command -v moto_server >/dev/null 2>&1; then
  echo "installing moto_server (pip)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'moto[server,s3]>=5,<6'
fi

# The test OpenID Provider and its browser drivers (tests/oidc), exactly as locked; skipped
# when node_modules already holds this lock file's modules.
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
  echo "node $(node --version) is too old for tests/oidc: it needs node 20 or later" >&2
  exit 1
fi
if ! cmp -s tests/oidc/package-lock.json tests/oidc/node_modules/.postern-installed-lock; then
  echo "installing tests/oidc node modules (npm ci)"
  (cd tests/oidc && npm ci --quiet --no-audit --no-fund --no-progress >/dev/null)
  cp tests/oidc/package-lock.json tests/oidc/node_modules/.postern-installed-lock
fi

# cargo-deb builds the Debian packages (packages.rs; docs/operations.md), at this version.
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
  echo "installing cargo-deb $cargo_deb_version (cargo install)"
  cargo install --quiet --locked cargo-deb --version "$cargo_deb_version"
fi

# The end-to-end tests start the real binaries from target/debug.
cargo build --workspace --bins --locked
# Budget for the property-based decoder fuzzing (proto/tests/fuzz.rs).
export PROPTEST_CASES="${PROPTEST_CASES:-4096}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
