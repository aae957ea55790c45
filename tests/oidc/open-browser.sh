#!/bin/sh
# A $BROWSER for end-to-end tests: `postern login` runs `$BROWSER URL`, and this signs in
# at the test OpenID Provider with headless Chromium (browser.mjs) as the user named in
# the environment:
#   POSTERN_TEST_OIDC_LOGIN, POSTERN_TEST_OIDC_PASSWORD, POSTERN_TEST_OIDC_OTP (optional).
# It waits until the browser lands on the client's loopback page and exits with
# browser.mjs's status (0: landed, 1: failed, with the reason on stderr). With
# POSTERN_TEST_OIDC_BROWSER_LOG set it returns at once instead, like a desktop browser
# launcher, and browser.mjs writes its output and exit status to that file.
set -eu
if [ "$#" -ne 1 ]; then
  echo "usage: $0 URL" >&2
  exit 2
fi
here=$(dirname "$0")
: "${POSTERN_TEST_OIDC_LOGIN:?set POSTERN_TEST_OIDC_LOGIN}"
: "${POSTERN_TEST_OIDC_PASSWORD:?set POSTERN_TEST_OIDC_PASSWORD}"
set -- "$here/browser.mjs" "$1" "$POSTERN_TEST_OIDC_LOGIN" "$POSTERN_TEST_OIDC_PASSWORD" ${POSTERN_TEST_OIDC_OTP:+"$POSTERN_TEST_OIDC_OTP"}
if [ -n "${POSTERN_TEST_OIDC_BROWSER_LOG:-}" ]; then
  log=$POSTERN_TEST_OIDC_BROWSER_LOG
  (set +e; node "$@" >"$log" 2>&1; echo "exit $?" >>"$log") </dev/null &
  exit 0
fi
exec node "$@"
