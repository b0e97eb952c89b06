#!/usr/bin/env bash
# The keygate fleet demo (`make run-fleet`): the control plane as two replicas on one Postgres,
# and two Envoy edges each fed by both. Run from anywhere; it works from the repository root.
# Ctrl-C stops everything, Postgres included.
#
#   Postgres   127.0.0.1:$PG_PORT (default 15432): a cluster of its own in .run-fleet/pg
#              (scripts/pg-cluster.sh; as root the server runs as the postgres user)
#   control    https://127.0.0.1:8088 and https://127.0.0.1:8089: keygate-control replicas on the
#              same database, both serving the whole API and the change feed, with one
#              certificate (keygate-control tls-init, CA in .run-fleet/tls, made afresh each start)
#   edges      http://127.0.0.1:10000 (edge-a, region us1, admin :9901) and
#              http://127.0.0.1:10001 (edge-b, region in1, admin :9902): Envoy with the filter in
#              control-plane mode, rendered from envoy/envoy-fleet.yaml; each edge's cluster
#              lists both replicas and health-checks them (/readyz), so it fails over. The first
#              account's home region is us1 (the default): edge-a serves it, edge-b answers 404
#              wrong_region until the operator adds in1 to its regions (the help says how)
#   upstream   127.0.0.1:$ECHO_PORT (keygate-echo)
#
# The first start initializes the database and its credentials go to .run-fleet/credentials.env,
# exactly as `make run` writes .run/credentials.env. A later start reuses the cluster, the
# database and the credentials.
#
# Env: ENVOY (binary), ECHO_BIN (keygate-echo), ECHO_PORT (default 18080), CONTROL_BIN
# (keygate-control), RATELIMIT_BIN (keygate-ratelimit), RUN_DIR (default .run-fleet), PG_PORT
# (default 15432), REDIS_PORT (default 16379).
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY=${ENVOY:-.venv/bin/envoy}
ECHO_BIN=${ECHO_BIN:-target/release/keygate-echo}
ECHO_PORT=${ECHO_PORT:-18080}
CONTROL_BIN=${CONTROL_BIN:-target/release/keygate-control}
RATELIMIT_BIN=${RATELIMIT_BIN:-target/release/keygate-ratelimit}
REDIS_PORT=${REDIS_PORT:-16379}
RUN_DIR=${RUN_DIR:-.run-fleet}
PG_PORT=${PG_PORT:-15432}
REPLICAS=(127.0.0.1:8088 127.0.0.1:8089)
# Per edge: id, region, gate port, admin port.
EDGES=("edge-a us1 10000 9901" "edge-b in1 10001 9902")

# Everything secret lives in $RUN_DIR (git-ignored), in files readable by this user only. The
# directory itself is 711: as root, Postgres runs as the postgres user and must reach $RUN_DIR/pg
# (which scripts/pg-cluster.sh makes 700 and gives to that user).
umask 077
mkdir -p "$RUN_DIR"
chmod 711 "$RUN_DIR"
PG_DIR=$RUN_DIR/pg
CREDS=$RUN_DIR/credentials.env
FIRST_OUT=$RUN_DIR/first-start.out
TLS_DIR=$RUN_DIR/tls

pids=()
pg_started=
cleanup() {
  local pid
  trap - INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n $pg_started ]]; then scripts/pg-cluster.sh stop "$PG_DIR" || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { echo "fleet: $*" >&2; exit 1; }

# True once something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in "${REPLICAS[@]##*:}" 10000 10001 9901 9902 "$ECHO_PORT" 8081 8082 "$REDIS_PORT"; do
  listening "$port" && die "127.0.0.1:$port is already in use (another demo running?)"
done

# Postgres. The URL (it holds the password) reaches the replicas through KEYGATE_DATABASE, never
# their command lines.
pg_started=1
KEYGATE_DATABASE=$(scripts/pg-cluster.sh start "$PG_DIR" "$PG_PORT") \
  || die "Postgres did not start (scripts/pg-cluster.sh start $PG_DIR $PG_PORT)"
export KEYGATE_DATABASE

# One CA and server certificate for both replicas (keygate-control, localhost, 127.0.0.1, ::1),
# made afresh on every start; the CA's private key is never written.
rm -rf "$TLS_DIR"
"$CONTROL_BIN" tls-init --dir "$TLS_DIR" >/dev/null 2>>"$RUN_DIR/control-a.log" \
  || die "keygate-control tls-init failed; see $RUN_DIR/control-a.log"

# Starts replica $1 (a or b) on $2; its stdout goes to $3.
start_replica() {
  local name=$1 addr=$2 out=$3 log=$RUN_DIR/control-$1.log
  "$CONTROL_BIN" serve --listen "$addr" --log-format text \
    --tls-cert "$TLS_DIR/server.pem" --tls-key "$TLS_DIR/server.key" >"$out" 2>>"$log" &
  pids+=($!)
  for _ in $(seq 150); do
    listening "${addr##*:}" && return
    kill -0 "${pids[-1]}" 2>/dev/null || { tail -5 "$log" >&2; die "replica $name exited; see $log"; }
    sleep 0.1
  done
  die "replica $name did not start on $addr; see $log"
}

# On an empty database the first replica initializes it and prints the credentials once, on
# stdout; the second starts on the initialized database.
start_replica a "${REPLICAS[0]}" "$FIRST_OUT"
if grep -q '^KEYGATE_EDGE_TOKEN=' "$FIRST_OUT"; then
  mv "$FIRST_OUT" "$CREDS"
  echo "fleet: new database on 127.0.0.1:$PG_PORT; its credentials (shown once) are in $CREDS"
else
  rm -f "$FIRST_OUT"
  if ! grep -q '^KEYGATE_EDGE_TOKEN=' "$CREDS" 2>/dev/null; then
    # A database from an earlier run whose credentials file is gone: mint a new edge token.
    {
      echo "# Edge credential minted by scripts/fleet.sh (the original ones were not kept):"
      "$CONTROL_BIN" edge-token create 2>>"$RUN_DIR/control-a.log" | grep -E '^[A-Z_]+='
    } >>"$CREDS"
    echo "fleet: $CREDS had no edge token; minted a new one into it (older credentials are not recoverable)"
  fi
fi
chmod 600 "$CREDS"
start_replica b "${REPLICAS[1]}" /dev/null
EDGE_TOKEN=$(grep -E '^KEYGATE_EDGE_TOKEN=' "$CREDS" | tail -1 | cut -d= -f2-)
[[ $EDGE_TOKEN =~ ^[A-Za-z0-9_]+$ ]] || die "unexpected edge token format in $CREDS"

# Redis (counters only: nothing persisted) and keygate-ratelimit, which leases fleet limits to
# both edges and follows replica a's export of them (the edge token from the environment).
mkdir -p "$RUN_DIR/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$RUN_DIR/redis" --save '' \
  --appendonly no --daemonize no >"$RUN_DIR/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do listening "$REDIS_PORT" && break; sleep 0.1; done
listening "$REDIS_PORT" || die "Redis did not start; see $RUN_DIR/redis.log"
KEYGATE_EDGE_TOKEN=$EDGE_TOKEN "$RATELIMIT_BIN" --listen 127.0.0.1:8081 --http 127.0.0.1:8082 \
  --redis "redis://127.0.0.1:$REDIS_PORT" --control-plane "https://${REPLICAS[0]}" \
  --control-ca "$TLS_DIR/ca.pem" --log-format text 2>>"$RUN_DIR/ratelimit.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:8082/readyz >/dev/null 2>&1 && break
  kill -0 "${pids[-1]}" 2>/dev/null || die "keygate-ratelimit exited; see $RUN_DIR/ratelimit.log"
  sleep 0.1
done
curl -sf http://127.0.0.1:8082/readyz >/dev/null 2>&1 || die "keygate-ratelimit not ready; see $RUN_DIR/ratelimit.log"

"$ECHO_BIN" --port "$ECHO_PORT" --bind 127.0.0.1 &
pids+=($!)
sleep 0.3
kill -0 "${pids[-1]}" 2>/dev/null || die "the echo upstream did not start (is 127.0.0.1:$ECHO_PORT in use?)"

# Each edge: the template with the edge token (only in the rendered file), the CA just made, its
# own ports, id and region.
envoys=()
for edge in "${EDGES[@]}"; do
  read -r id region gate admin <<<"$edge"
  sed -e "s|kg_edge_REPLACE_ME|$EDGE_TOKEN|" -e "s|\.run/tls/ca\.pem|$TLS_DIR/ca.pem|" \
    -e "s|port_value: 10000 }|port_value: $gate }|" -e "s|port_value: 9901 }|port_value: $admin }|" \
    -e "s|\"edge_id\": \"edge-a\"|\"edge_id\": \"$id\"|" -e "s|\"region\": \"us1\"|\"region\": \"$region\"|" \
    -e "s|inline_string: \"edge-a |inline_string: \"$id |" \
    envoy/envoy-fleet.yaml >"$RUN_DIR/envoy-$id.yaml"
  "$ENVOY" -c "$RUN_DIR/envoy-$id.yaml" --disable-hot-restart --use-dynamic-base-id --concurrency 2 \
    -l warning --log-path "$RUN_DIR/envoy-$id.log" &
  pids+=($!)
  envoys+=($!)
done

cat <<TRY

keygate fleet demo:
  edges    http://127.0.0.1:10000 (edge-a, us1; admin :9901)   http://127.0.0.1:10001 (edge-b, in1; admin :9902)
  control  https://${REPLICAS[0]}   https://${REPLICAS[1]}   (two replicas over TLS, CA $TLS_DIR/ca.pem;
           logs $RUN_DIR/control-{a,b}.log)
  database Postgres on 127.0.0.1:$PG_PORT, cluster in $PG_DIR (log $PG_DIR/postgres.log)
  upstream 127.0.0.1:$ECHO_PORT   (keygate-echo)
  limits   keygate-ratelimit on 127.0.0.1:8081 (gRPC; /readyz, /metrics on :8082), Redis on
           127.0.0.1:$REDIS_PORT (logs $RUN_DIR/ratelimit.log, $RUN_DIR/redis.log)

Credentials (admin token, first account SID + auth token, edge token) are in $CREDS
(mode 600). The edges are two regions: edge-a is us1, edge-b is in1. The first account
(\$ACCOUNT_SID) lives in us1 (its home region), so edge-a serves it and edge-b answers 404
wrong_region, until the operator lets it use in1 too (PATCH regions). In another terminal:
create a key through one replica, use it at both edges, add in1 to the account's regions, use it
at edge-b again, delete the key through the other replica, and ask either replica which edges
hold the deletion:

  set -a; source $CREDS; set +a
  CA=$TLS_DIR/ca.pem
  curl -s --cacert \$CA -u "\$ACCOUNT_SID:\$AUTH_TOKEN" -X POST https://${REPLICAS[0]}/v1/accounts/\$ACCOUNT_SID/keys \\
       -H 'content-type: application/json' -d '{"role":"main"}' | tee key.json
  curl -si -u "\$(jq -r .sid key.json):\$(jq -r .secret key.json)" http://127.0.0.1:10000/v2/accounts/\$ACCOUNT_SID/calls
  curl -si -u "\$(jq -r .sid key.json):\$(jq -r .secret key.json)" http://127.0.0.1:10001/v2/accounts/\$ACCOUNT_SID/calls
  curl -s --cacert \$CA -H "authorization: Bearer \$KEYGATE_ADMIN_TOKEN" -X PATCH https://${REPLICAS[0]}/v1/accounts/\$ACCOUNT_SID \\
       -H 'content-type: application/json' -d '{"regions":["in1"]}' | jq '{region, regions}'
  curl -si -u "\$(jq -r .sid key.json):\$(jq -r .secret key.json)" http://127.0.0.1:10001/v2/accounts/\$ACCOUNT_SID/calls
  curl -s --cacert \$CA -u "\$ACCOUNT_SID:\$AUTH_TOKEN" -X DELETE -w '%{http_code}\\n' \\
       https://${REPLICAS[1]}/v1/accounts/\$ACCOUNT_SID/keys/\$(jq -r .sid key.json)
  curl -s --cacert \$CA -H "authorization: Bearer \$KEYGATE_ADMIN_TOKEN" https://${REPLICAS[1]}/v1/edge/fleet | jq

A limit that holds across both edges: give the account 60 requests a minute fleet-wide, then
send 100 through both edges (with a new key: the deleted one is refused). About 60 get 200, the
rest 429 rate_limited_account, whichever edge they went to:

  curl -s --cacert \$CA -H "authorization: Bearer \$KEYGATE_ADMIN_TOKEN" -X PATCH https://${REPLICAS[0]}/v1/accounts/\$ACCOUNT_SID \\
       -H 'content-type: application/json' -d '{"limits":{"rate":{"requests":60,"per":"1m","scope":"fleet"}}}' | jq .limits
  curl -s --cacert \$CA -u "\$ACCOUNT_SID:\$AUTH_TOKEN" -X POST https://${REPLICAS[0]}/v1/accounts/\$ACCOUNT_SID/keys \\
       -H 'content-type: application/json' -d '{"role":"main"}' > key.json
  for i in \$(seq 100); do curl -s -o /dev/null -w '%{http_code}\\n' -u "\$(jq -r .sid key.json):\$(jq -r .secret key.json)" \\
       http://127.0.0.1:1000\$((i % 2))/v2/accounts/\$ACCOUNT_SID/calls; done | sort | uniq -c

Stop a replica (kill its pid) and the edges keep being fed by the other. Access-log lines of both
edges appear below, each starting with the edge's id. Ctrl-C stops everything, Postgres included.

TRY

# Until an edge exits (or Ctrl-C, which reaches the Envoys too: they stop with status 0).
status=0
wait -n "${envoys[@]}" || status=$?
[[ $status == 0 ]] || die "an Envoy exited with status $status; see $RUN_DIR/envoy-edge-*.log"
