"""`make bench-live`: keygate in control-plane mode at many keys — start-up, memory, change
latency and per-request cost, against a real control plane holding LIVE_SIZES keys.

For each size N (LIVE_SIZES, default "1000,1000000"):
1. `keygate-control init` a fresh database and bulk-load N keys over 1000 accounts straight into
   SQLite (measurement only: the API is how keys are made; inserting a million through it would
   take an hour of fsyncs), then start `keygate-control serve` (time to listening recorded) and
   create LIVE_HOT (200) keys through the API: the keys the load generator uses.
2. For Envoy `--concurrency` 1 and 4: start Envoy with the filter in control-plane mode; record
   the time until the first request is admitted (the first full walk of the change feed), the
   time until both slots are complete (the first walk fills both), Envoy's RSS and allocated heap; then LIVE_CHANGES rounds
   of "create a key through the API → admitted at the edge" and "delete it → refused".
3. Per-request cost: one Envoy per size at `--concurrency 1`, all pinned to CPU 1, warm; then
   LIVE_REPEATS rounds, alternating the sizes, of `wrk -t1 -c32` pinned to CPU 0 rotating over
   the LIVE_HOT keys' Basic credentials for LIVE_SECONDS s. Envoy CPU per request from
   /proc/<pid>/stat. Ratios are taken within a round; the medians are reported.

LIVE_WASM_B=path/to/other.wasm adds, to the per-request rounds, one more warm Envoy at the first
size running that build of the filter (an A/B of two builds in the same run, as `make bench`'s
BENCH_WASM_B), reported as "<size> keys, build B" with its CPU per request over the first's.

Writes bench/results/live-latest.md (also printed) and bench/results/live-<timestamp>.json.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target/wasm32-wasip1/release/keygate_filter.wasm"
CONTROL = ROOT / "target/release/keygate-control"
ENVOY = next(iter(sorted(ROOT.glob(".venv/lib/python3*/site-packages/envoy/_bin/envoy"))), ROOT / ".venv/bin/envoy")
RESULTS = ROOT / "bench/results"
SIZES = [int(s) for s in os.environ.get("LIVE_SIZES", "1000,1000000").split(",") if s]
HOT = int(os.environ.get("LIVE_HOT", "200"))
CHANGES = int(os.environ.get("LIVE_CHANGES", "3"))
REPEATS = int(os.environ.get("LIVE_REPEATS", "3"))
SECONDS = int(os.environ.get("LIVE_SECONDS", "10"))
WORKERS = [int(s) for s in os.environ.get("LIVE_WORKERS", "1,4").split(",") if s]
WASM_B = os.environ.get("LIVE_WASM_B")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[live {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, token: str | None = None, body: dict | None = None,
         basic: tuple[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    if body is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    if basic:
        req.add_header("authorization", "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def until(f, limit: float, step: float = 0.01) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if f():
            return time.monotonic() - start
        time.sleep(step)
    raise TimeoutError(f"not within {limit} s")


def bulk_load(db: Path, n: int) -> None:
    """N keys over 1000 accounts, inserted in one transaction (the triggers log every SID)."""
    c = sqlite3.connect(db)
    t = int(time.time())
    accts = ["AC" + hashlib.md5(b"acct%d" % a).hexdigest() for a in range(1000)]
    c.execute("BEGIN IMMEDIATE")
    c.executemany(
        "INSERT INTO accounts (sid, friendly_name, status, region, allowed_ips, limits, created_at, updated_at)"
        " VALUES (?, NULL, 'active', 'us1', NULL, NULL, ?, ?)", [(a, t, t) for a in accts])
    batch = 50_000
    for start in range(0, n, batch):
        keys, secrets = [], []
        for i in range(start, min(n, start + batch)):
            sid = "SK" + hashlib.md5(b"key%d" % i).hexdigest()
            keys.append((sid, accts[i % 1000], t, t))
            secrets.append((hashlib.sha256(b"bulk-secret-%d" % i).hexdigest(), sid, t))
        c.executemany(
            "INSERT INTO keys (sid, account_sid, friendly_name, role, apis, allowed_ips, limits, expires_at,"
            " enabled, generation, created_at, updated_at) VALUES (?, ?, NULL, 'standard', NULL, NULL, NULL, NULL, 1, 0, ?, ?)",
            keys)
        c.executemany("INSERT INTO secrets (digest, owner_sid, not_after, created_at) VALUES (?, ?, NULL, ?)", secrets)
    # What `store::bump` does at the end of every API write: one new version, every SID the
    # triggers noted logged at it.
    c.execute("UPDATE config_version SET version = version + 1 WHERE id = 1")
    c.execute("INSERT INTO changelog (sid, version) SELECT sid, (SELECT version FROM config_version WHERE id = 1)"
              " FROM pending_changes WHERE true ON CONFLICT(sid) DO UPDATE SET version = excluded.version")
    c.execute("DELETE FROM pending_changes")
    c.execute("COMMIT")
    c.close()


class ControlPlane:
    def __init__(self, n: int, work: Path):
        self.n = n
        self.dir = work / f"cp-{n}"
        self.dir.mkdir()
        self.db = self.dir / "keygate.db"
        out = subprocess.run([str(CONTROL), "init", "--data", str(self.db)], capture_output=True, text=True, check=True)
        self.creds = dict(l.split("=", 1) for l in out.stdout.splitlines() if "=" in l and not l.startswith("#"))
        t = time.monotonic()
        bulk_load(self.db, n)
        self.load_s = time.monotonic() - t
        self.port = free_port()
        t = time.monotonic()
        self.proc = subprocess.Popen(
            [str(CONTROL), "serve", "--data", str(self.db), "--listen", f"127.0.0.1:{self.port}"],
            stdout=open(self.dir / "serve.out", "w"), stderr=open(self.dir / "serve.log", "w"))
        until(lambda: http("GET", self.url("/"))[0] != 0, 600, 0.1)
        self.start_s = time.monotonic() - t
        self.account = self.creds["ACCOUNT_SID"]
        # Lift the account's rate limit: the load generator sends far more than the catalogue's
        # default allows.
        http("PATCH", self.url(f"/v1/accounts/{self.account}"), self.admin,
             {"limits": {"rate": {"requests": 1_000_000_000, "per": "1h"}}})
        t = time.monotonic()
        self.hot = [self.create_key() for _ in range(HOT)]
        self.hot_create_s = time.monotonic() - t

    @property
    def admin(self) -> str:
        return self.creds["KEYGATE_ADMIN_TOKEN"]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def create_key(self) -> tuple[str, str]:
        status, body = http("POST", self.url(f"/v1/accounts/{self.account}/keys"), self.admin,
                            {"role": "standard", "limits": {"rate": {"requests": 1_000_000_000, "per": "1h"}}})
        if status != 201:
            raise RuntimeError(f"create key: {status} {body[:200]!r}")
        k = json.loads(body)
        return k["sid"], k["secret"]

    def delete_key(self, sid: str) -> None:
        status, _ = http("DELETE", self.url(f"/v1/accounts/{self.account}/keys/{sid}"), self.admin)
        if status != 204:
            raise RuntimeError(f"delete key: {status}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def bootstrap(path: Path, cp: ControlPlane, listen: int, admin: int, wasm: Path = WASM) -> None:
    plugin = json.dumps({"control_plane": {"cluster": "keygate_control", "authority": "keygate-control",
                                           "token": cp.creds["KEYGATE_EDGE_TOKEN"], "wait_s": 20}})
    path.write_text(json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "clusters": [{
                "name": "keygate_control", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "keygate_control", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": cp.port}}}}]}]},
            }],
            "listeners": [{
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress", "use_remote_address": True,
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.wasm", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                "config": {"root_id": "keygate", "vm_config": {
                                    "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(wasm)}}},
                                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin}}}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                    }}]}],
            }],
        },
    }))


class Envoy:
    def __init__(self, cp: ControlPlane, concurrency: int, work: Path, cpu: str | None = None,
                 wasm: Path = WASM):
        self.listen, self.admin = free_port(), free_port()
        name = f"envoy-{cp.n}-c{concurrency}-{self.listen}"
        self.log = work / f"{name}.log"
        cfg = work / f"{name}.json"
        bootstrap(cfg, cp, self.listen, self.admin, wasm)
        cmd = [str(ENVOY), "-c", str(cfg), "--concurrency", str(concurrency), "-l", "info",
               "--disable-hot-restart", "--use-dynamic-base-id", "--log-path", str(self.log),
               "--file-flush-interval-msec", "100"]
        if cpu is not None:
            cmd = ["taskset", "-c", cpu] + cmd
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.cp = cp

    def path(self) -> str:
        return f"http://127.0.0.1:{self.listen}/v2/accounts/{self.cp.account}/calls"

    def status(self, sid: str, secret: str) -> int:
        return http("GET", self.path(), basic=(sid, secret))[0]

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def rss_kib(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
        return out

    def allocated_mib(self) -> float:
        _, body = http("GET", f"http://127.0.0.1:{self.admin}/memory")
        return int(json.loads(body)["allocated"]) / 2**20

    def cpu_ticks(self) -> int:
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def publications(text: str) -> list[str]:
    return re.findall(r"config (?:version \d+ published|slot warmed up)[^\n]*", text)


def both_slots(text: str) -> bool:
    """Both slots complete: a first walk that filled both, or a warm-up of the other slot."""
    return "both slots)" in text or "warmed up" in text


def startup(cp: ControlPlane, c: int, work: Path) -> dict:
    env = Envoy(cp, c, work)
    sid, secret = cp.hot[0]
    until(lambda: env.status(sid, secret) == 200, 900, 0.05)
    first = time.monotonic() - env.started
    until(lambda: both_slots(env.logs()), 900, 0.1)
    warm = time.monotonic() - env.started
    time.sleep(2)
    mem = env.rss_kib()
    alloc = env.allocated_mib()
    created, deleted = [], []
    for _ in range(CHANGES):
        t = time.monotonic()
        nsid, nsecret = cp.create_key()
        until(lambda: env.status(nsid, nsecret) == 200, 60)
        created.append(time.monotonic() - t)
        t = time.monotonic()
        cp.delete_key(nsid)
        until(lambda: env.status(nsid, nsecret) == 401, 60)
        deleted.append(time.monotonic() - t)
    time.sleep(0.3)
    pubs = publications(env.logs())
    env.stop()
    row = {"keys": cp.n, "workers": c, "first_admitted_s": first, "warm_s": warm,
           "rss_mib": mem.get("VmRSS", 0) / 1024, "hwm_mib": mem.get("VmHWM", 0) / 1024, "allocated_mib": alloc,
           "create_to_admitted_s": statistics.median(created), "delete_to_refused_s": statistics.median(deleted),
           "publications": pubs}
    log(f"{cp.n} keys, {c} workers: first admitted {first:.1f} s, both slots {warm:.1f} s, RSS {row['rss_mib']:.0f} MiB, "
        f"allocated {alloc:.0f} MiB, create→200 {row['create_to_admitted_s']:.2f} s, delete→401 {row['delete_to_refused_s']:.2f} s")
    return row


def wrk_lua(cp: ControlPlane, work: Path) -> Path:
    auths = ["Basic " + base64.b64encode(f"{s}:{k}".encode()).decode() for s, k in cp.hot]
    lua = work / f"hot-{cp.n}.lua"
    lua.write_text(
        "local auths = {" + ",".join(f'"{a}"' for a in auths) + "}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #auths + 1\n"
        f'  return wrk.format("GET", "/v2/accounts/{cp.account}/calls", {{["Authorization"] = auths[i]}})\n'
        "end\n"
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("KG %d %d %d %d %d\\n", summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), summary.errors.status))\n'
        "end\n")
    return lua


def load(env: Envoy, lua: Path) -> dict:
    before = env.cpu_ticks()
    out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c32", f"-d{SECONDS}s", "--latency", "-s", str(lua),
                          f"http://127.0.0.1:{env.listen}/"], capture_output=True, text=True, check=True).stdout
    ticks = env.cpu_ticks() - before
    m = re.search(r"KG (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(out)
    reqs, dur_us, p50, p99, bad = map(int, m.groups())
    if bad:
        raise RuntimeError(f"{bad} non-2xx answers under load")
    return {"rps": reqs / (dur_us / 1e6), "p50_us": p50, "p99_us": p99, "cpu_us_per_req": ticks / CLK_TCK * 1e6 / reqs}


def main() -> int:
    for tool in (WASM, CONTROL, ENVOY):
        if not Path(tool).exists():
            print(f"missing {tool}: run `make bench-live` (it builds everything)", file=sys.stderr)
            return 2
    started = datetime.now(timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="keygate-live-"))
    log(f"work dir {work}; sizes {SIZES}, {HOT} hot keys, workers {WORKERS}")
    cps: list[ControlPlane] = []
    result: dict = {"started": started.isoformat(), "sizes": SIZES, "hot": HOT, "control_planes": [], "startup": [], "load": []}
    try:
        for n in SIZES:
            log(f"control plane with {n} keys: init, bulk load, serve, {HOT} keys through the API")
            cp = ControlPlane(n, work)
            cps.append(cp)
            result["control_planes"].append({"keys": n, "bulk_load_s": cp.load_s, "serve_ready_s": cp.start_s,
                                             "create_hot_s": cp.hot_create_s})
            log(f"  loaded in {cp.load_s:.1f} s, serving after {cp.start_s:.1f} s, {HOT} keys created in {cp.hot_create_s:.1f} s")
        for cp in cps:
            for c in WORKERS:
                result["startup"].append(startup(cp, c, work))
        log("per-request cost: one warm Envoy per size pinned to CPU 1, wrk pinned to CPU 0, alternating")
        envs = [Envoy(cp, 1, work, cpu="1") for cp in cps]
        labels = [str(cp.n) for cp in cps]
        if WASM_B:
            envs.append(Envoy(cps[0], 1, work, cpu="1", wasm=Path(WASM_B)))
            labels.append(f"{cps[0].n}_b")
            result["wasm_b"] = WASM_B
        for env in envs:
            sid, secret = env.cp.hot[0]
            until(lambda: env.status(sid, secret) == 200, 900, 0.1)
            until(lambda: both_slots(env.logs()), 900, 0.1)
        luas = [wrk_lua(env.cp, work) for env in envs]
        for env, lua in zip(envs, luas):  # warm-up pass (JIT, record caches)
            subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c32", "-d2s", "-s", str(lua), f"http://127.0.0.1:{env.listen}/"],
                           capture_output=True, check=True)
        for r in range(REPEATS):
            order = list(range(len(envs)))
            if r % 2:
                order.reverse()
            rnd = {}
            for i in order:
                m = load(envs[i], luas[i])
                rnd[labels[i]] = m
                log(f"  round {r + 1}: {labels[i]} keys: {m['rps']:.0f} req/s, p99 {m['p99_us']} µs, "
                    f"{m['cpu_us_per_req']:.1f} µs CPU/req")
            result["load"].append(rnd)
        for env in envs:
            env.stop()
    finally:
        for cp in cps:
            cp.stop()
    RESULTS.mkdir(exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"live-{stamp}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (RESULTS / "live-latest.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    lines = [f"# keygate live config at scale ({r['started'][:19]}Z)", "",
             f"Control plane: real `keygate-control`, keys bulk-loaded into SQLite, {r['hot']} more created through the API.", "",
             "| keys | bulk load | control plane serving after | workers | first request admitted | both slots complete | Envoy RSS | heap allocated | create → admitted | delete → refused |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cps = {c["keys"]: c for c in r["control_planes"]}
    for s in r["startup"]:
        c = cps[s["keys"]]
        lines.append(f"| {s['keys']:,} | {c['bulk_load_s']:.1f} s | {c['serve_ready_s']:.1f} s | {s['workers']} | {s['first_admitted_s']:.1f} s | "
                     f"{s['warm_s']:.1f} s | {s['rss_mib']:.0f} MiB | {s['allocated_mib']:.0f} MiB | {s['create_to_admitted_s']:.2f} s | {s['delete_to_refused_s']:.2f} s |")
    if r["load"]:
        sizes = r["sizes"]
        base = sizes[0]
        lines += ["", f"Per-request cost, `--concurrency 1`, wrk -t1 -c32 rotating over {r['hot']} keys, medians of {len(r['load'])} alternating rounds:", "",
                  f"| keys | req/s | p50 | p99 | Envoy CPU per request | req/s ratio to {base:,} keys |", "|---|---|---|---|---|---|"]
        rows = [(str(n), f"{n:,}") for n in sizes]
        if r.get("wasm_b"):
            rows.append((f"{base}_b", f"{base:,}, build B"))
        for key, name in rows:
            loads = [x for x in r["load"] if key in x]
            b = str(base)
            rps = statistics.median(x[key]["rps"] for x in loads)
            ratio = statistics.median(x[key]["rps"] / x[b]["rps"] for x in loads)
            lines.append(f"| {name} | {rps:.0f} | {statistics.median(x[key]['p50_us'] for x in loads) / 1000:.2f} ms | "
                         f"{statistics.median(x[key]['p99_us'] for x in loads) / 1000:.2f} ms | "
                         f"{statistics.median(x[key]['cpu_us_per_req'] for x in loads):.1f} µs | {ratio:.3f} |")
        if r.get("wasm_b"):
            b = str(base)
            diff = statistics.median(x[b]["cpu_us_per_req"] - x[f"{b}_b"]["cpu_us_per_req"] for x in r["load"])
            lines += ["", f"Build B ({r['wasm_b']}) at {base:,} keys: Envoy CPU per request of this build minus B's, "
                      f"within each round, median: {diff:+.2f} µs."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
