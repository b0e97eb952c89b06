#!/usr/bin/env bash
# The keygate demo (`make run`): the echo upstream in the background, Envoy in the foreground
# with envoy/envoy.yaml. Run from the repository root; Ctrl-C stops both.
# Env: ENVOY (binary), ECHO_BIN (keygate-echo binary), ECHO_PORT (default 18080).
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY=${ENVOY:-.venv/bin/envoy}
ECHO_BIN=${ECHO_BIN:-target/release/keygate-echo}
ECHO_PORT=${ECHO_PORT:-18080}
GATE=http://127.0.0.1:10000

"$ECHO_BIN" --port "$ECHO_PORT" --bind 127.0.0.1 &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true; wait "$echo_pid" 2>/dev/null || true' EXIT
sleep 0.3
if ! kill -0 "$echo_pid" 2>/dev/null; then
  echo "demo: the echo upstream did not start (is 127.0.0.1:$ECHO_PORT in use?)" >&2
  exit 1
fi

cat <<TRY

keygate demo: gate $GATE, admin http://127.0.0.1:9901, upstream echo 127.0.0.1:$ECHO_PORT
Demo credentials are listed in envoy/README.md. Try, from another terminal:

  curl -i $GATE/v2/accounts/ACdemo0001/calls
  curl -i -u SKdemomain01:sk_live_demoMain0001 $GATE/v2/accounts/ACdemo0001/calls
  curl -i -u ACdemo0001:demo_auth_token_0001 $GATE/2010-04-01/Accounts/ACdemo0001/Keys.json
  curl -i -u SKdemostd01:sk_live_demoStandard0001 $GATE/2010-04-01/Accounts/ACdemo0001/Messages.json
  curl -i -u SKdemopub01:pk_live_demoPublishable0001 $GATE/api/account/balance
  curl -i -u SKdemomain01:wrong-secret $GATE/v2/accounts/ACdemo0001/calls
  curl -s http://127.0.0.1:9901/stats | grep keygate

The 200 responses are the echo upstream showing the headers it received (identity headers
added, Authorization removed). Access-log lines appear below. Ctrl-C stops Envoy and the echo.

TRY

"$ENVOY" -c envoy/envoy.yaml --disable-hot-restart --use-dynamic-base-id --concurrency 2 -l warning
