#!/usr/bin/env bash
# The keygate demo. Run from anywhere; it works from the repository root. Ctrl-C stops everything.
#
#   scripts/demo.sh            (`make run`) the control plane (keygate-control on 127.0.0.1:8088
#                              over TLS, database .run/keygate.db, a CA and certificate made
#                              afresh in .run/tls), the echo upstream, and Envoy with the filter
#                              in control-plane mode (envoy/envoy-control-plane.yaml, rendered
#                              with the edge token into .run/envoy.yaml)
#   scripts/demo.sh static     (`make run-static`) the echo upstream and Envoy with the static demo
#                              config (envoy/envoy.yaml): no control plane
#
# Env: ENVOY (binary), ECHO_BIN (keygate-echo), ECHO_PORT (default 18080), CONTROL_BIN
# (keygate-control), RUN_DIR (default .run).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-control-plane}
ENVOY=${ENVOY:-.venv/bin/envoy}
ECHO_BIN=${ECHO_BIN:-target/release/keygate-echo}
ECHO_PORT=${ECHO_PORT:-18080}
CONTROL_BIN=${CONTROL_BIN:-target/release/keygate-control}
RUN_DIR=${RUN_DIR:-.run}
CONTROL=127.0.0.1:8088
GATE=http://127.0.0.1:10000

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# True once something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_echo() {
  "$ECHO_BIN" --port "$ECHO_PORT" --bind 127.0.0.1 &
  pids+=($!)
  sleep 0.3
  if ! kill -0 "${pids[-1]}" 2>/dev/null; then
    echo "demo: the echo upstream did not start (is 127.0.0.1:$ECHO_PORT in use?)" >&2
    exit 1
  fi
}

if [[ $MODE == static ]]; then
  start_echo
  cat <<TRY

keygate demo (static config): gate $GATE, admin http://127.0.0.1:9901, upstream echo 127.0.0.1:$ECHO_PORT
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
  exit
fi

[[ $MODE == control-plane ]] || { echo "usage: $0 [static]" >&2; exit 2; }

# Everything secret lives in $RUN_DIR (git-ignored), readable by this user only.
umask 077
mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"
DB=$RUN_DIR/keygate.db
CREDS=$RUN_DIR/credentials.env
FIRST_OUT=$RUN_DIR/first-start.out
TLS_DIR=$RUN_DIR/tls

if listening "${CONTROL##*:}"; then
  echo "demo: $CONTROL is already in use (another keygate-control?)" >&2
  exit 1
fi

# The feed goes over TLS. A new CA and server certificate (for keygate-control, localhost,
# 127.0.0.1, ::1) on every start: the CA's private key is never written, so nothing can be
# signed with it later, and nothing here expires between runs.
rm -rf "$TLS_DIR"
"$CONTROL_BIN" tls-init --dir "$TLS_DIR" >/dev/null 2>>"$RUN_DIR/control.log" \
  || { echo "demo: keygate-control tls-init failed; see $RUN_DIR/control.log" >&2; exit 1; }

# On an empty database `serve` initializes it and prints the credentials once, on stdout.
"$CONTROL_BIN" serve --data "$DB" --listen "$CONTROL" --log-format text \
  --tls-cert "$TLS_DIR/server.pem" --tls-key "$TLS_DIR/server.key" \
  >"$FIRST_OUT" 2>>"$RUN_DIR/control.log" &
pids+=($!)
for _ in $(seq 100); do
  listening "${CONTROL##*:}" && break
  kill -0 "${pids[-1]}" 2>/dev/null || { echo "demo: keygate-control exited; see $RUN_DIR/control.log" >&2; tail -5 "$RUN_DIR/control.log" >&2; exit 1; }
  sleep 0.1
done
listening "${CONTROL##*:}" || { echo "demo: keygate-control did not start; see $RUN_DIR/control.log" >&2; exit 1; }

if grep -q '^KEYGATE_EDGE_TOKEN=' "$FIRST_OUT"; then
  mv "$FIRST_OUT" "$CREDS"
  echo "demo: new database $DB; its credentials (shown once) are in $CREDS"
else
  rm -f "$FIRST_OUT"
  if ! grep -q '^KEYGATE_EDGE_TOKEN=' "$CREDS" 2>/dev/null; then
    # A database from an earlier run whose credentials file is gone: mint a new edge token.
    {
      echo "# Edge credential minted by scripts/demo.sh (the original ones were not kept):"
      "$CONTROL_BIN" edge-token create --data "$DB" 2>>"$RUN_DIR/control.log" | grep -E '^[A-Z_]+='
    } >>"$CREDS"
    echo "demo: $CREDS had no edge token; minted a new one into it (older credentials are not recoverable)"
  fi
fi
chmod 600 "$CREDS"
EDGE_TOKEN=$(grep -E '^KEYGATE_EDGE_TOKEN=' "$CREDS" | tail -1 | cut -d= -f2-)
[[ $EDGE_TOKEN =~ ^[A-Za-z0-9_]+$ ]] || { echo "demo: unexpected edge token format in $CREDS" >&2; exit 1; }

# The edge token goes into the rendered bootstrap only, never into the committed template; the
# CA to trust is the one just made.
sed -e "s|kg_edge_REPLACE_ME|$EDGE_TOKEN|" -e "s|\.run/tls/ca\.pem|$TLS_DIR/ca.pem|" \
  envoy/envoy-control-plane.yaml >"$RUN_DIR/envoy.yaml"

start_echo

cat <<TRY

keygate demo with its control plane:
  gate     $GATE   (Envoy, filter in control-plane mode; admin http://127.0.0.1:9901)
  control  https://$CONTROL   (keygate-control over TLS, CA $TLS_DIR/ca.pem; log $RUN_DIR/control.log, database $DB)
  upstream 127.0.0.1:$ECHO_PORT   (keygate-echo)

Credentials (admin token, first account SID + auth token, edge token) are in $CREDS
(mode 600). In another terminal:

  set -a; source $CREDS; set +a
  curl -s --cacert $TLS_DIR/ca.pem -u "\$ACCOUNT_SID:\$AUTH_TOKEN" \\
       -X POST https://$CONTROL/v1/accounts/\$ACCOUNT_SID/keys \\
       -H 'content-type: application/json' -d '{"role":"main"}' | tee key.json
  curl -i -u "\$(jq -r .sid key.json):\$(jq -r .secret key.json)" $GATE/v2/accounts/\$ACCOUNT_SID/calls

A key created, rotated or deleted through the API reaches the gate within a second (long-poll).
Access-log lines appear below. Ctrl-C stops Envoy, the control plane and the echo.

TRY

"$ENVOY" -c "$RUN_DIR/envoy.yaml" --disable-hot-restart --use-dynamic-base-id --concurrency 2 -l warning
