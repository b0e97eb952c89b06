"""`make bench-ladder`: what one host call of each kind costs on this Envoy.

bench/ladder-filter is the wasm floor (one read of the Authorization header) plus N host calls of
one kind per request (`{"call": "<kind>", "n": N}`, kinds in KINDS). Method, the same as
`make bench` (bench/run.py, whose Envoy, wrk and measure this reuses):
1. a direct_response bootstrap per (kind, N) and one for bare Envoy (bench/gen.py);
2. BENCH_REPEATS rounds; each runs bare Envoy and then every kind at every N in NS once, the
   order reversed on odd rounds (linear drift cancels): a fresh Envoy, `--concurrency 1` pinned to
   CPU 1, `wrk -t1 -c32` pinned to CPU 0, BENCH_WARMUP s of warm-up then BENCH_SECONDS s measured,
   Envoy CPU per request from /proc/<pid>/stat;
3. per kind and round, the least-squares slope of Envoy CPU µs/request against N is the cost of
   one call, and req/s at the top N over N = 0 the throughput kept; the median over rounds of each;
4. bench/results/ladder-<stamp>.json and bench/results/ladder-latest.md (also printed), with the
   machine description and the load average seen.

Other benchmarks on the machine (another session's `make bench`) pin the same CPUs: before each
measurement this waits while one runs (a load generator, wrk or keygate-bench-load, or an Envoy on
a bootstrap under target/bench*; at most BENCH_QUIET_WAIT s, default 600), and measures again (at
most twice more) when other processes took more than 10% of Envoy's core, keeping the attempt they
disturbed least; the JSON keeps the waits and the discarded attempts' foreign load.

Environment: BENCH_REPEATS (3), BENCH_SECONDS (5), BENCH_WARMUP (1), BENCH_CONNECTIONS (32),
BENCH_ONLY (comma-separated kinds), BENCH_NS (0,1,2,4,8: the calls per request), BENCH_START_TIMEOUT
(600), BENCH_QUIET_WAIT (600).
The results file is written after every measurement: `ladder.py --resume <json>` finishes an
interrupted run (a kind's round that lacks some N is measured again whole); `ladder.py --report
<json>` rewrites ladder-latest.md from a results file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen  # noqa: E402
import run  # noqa: E402

# This harness's defaults (short runs); run.measure reads them from its module.
run.SECONDS = run.env_int("BENCH_SECONDS", 5)
run.WARMUP = run.env_int("BENCH_WARMUP", 1)
REPEATS = run.env_int("BENCH_REPEATS", 3)
ONLY = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]
QUIET_WAIT = run.env_int("BENCH_QUIET_WAIT", 600)
FOREIGN_MAX = 0.10  # share of Envoy's core others may use before a measurement is taken again
RETRIES = 2
LOAD_GENERATORS = ("wrk", "keygate-bench-load")

LADDER_WASM = gen.ROOT / "target/bench-ladder/wasm32-wasip1/release/keygate_bench_ladder.wasm"
# The rungs: calls per request (BENCH_NS; 0 first, at most 64, the filter's limit). On a noisy
# machine a taller ladder (say 0,8,16,32) resolves the cheap calls better.
NS = [int(s) for s in os.environ.get("BENCH_NS", "0,1,2,4,8").split(",") if s]

# Kind, what one call is (as keygate's request path makes it).
KINDS = [
    ("none", "nothing (the floor at every N: the harness's noise)"),
    ("header", "get one request header (`:path`)"),
    ("header_map", "read the whole request header map (proxy_get_header_map_pairs)"),
    ("property", "get_property(source.address)"),
    ("clock", "get_current_time"),
    ("shared_get", "get_shared_data of a 13-byte record"),
    ("shared_get_cas", "get_shared_data + set_shared_data with its CAS (a rate take)"),
    ("header_add", "add_http_request_header, a distinct name"),
    ("header_map_set", "set_map_bytes: the whole request map + 1 header (route cache cleared)"),
    ("header_remove", "remove_http_request_header of an absent name (route cache cleared)"),
    ("set_property", "set_property of filter state keygate.x<i>, a SID-sized value"),
    ("metric", "increment_metric on a counter"),
    ("log_debug", "log at debug, below Envoy's level (dropped)"),
]


def log(msg: str) -> None:
    print(f"[ladder {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def other_load_generators() -> list[int]:
    """Pids of load generators, and of Envoys another benchmark started (bootstraps under
    target/bench*), running now: this harness's own have all exited by then."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            comm = (proc / "comm").read_text().strip()
            argv = (proc / "cmdline").read_bytes().split(b"\0") if comm == "envoy" else []
        except OSError:
            continue
        if comm in LOAD_GENERATORS or any(b"/target/bench" in a for a in argv):
            pids.append(int(proc.name))
    return pids


def wait_quiet() -> float:
    """Waits (at most QUIET_WAIT s) while another load generator runs; returns the seconds waited."""
    t0 = time.monotonic()
    said = False
    while other_load_generators() and time.monotonic() - t0 < QUIET_WAIT:
        if not said:
            log(f"another benchmark's load generator is running ({other_load_generators()}): waiting")
            said = True
        time.sleep(1)
    return time.monotonic() - t0


def measure_once(c: dict, path: Path) -> dict:
    e = run.Envoy(f"ladder-{c['name']}", path, 1, run.ENVOY_CPU)
    e.start()
    try:
        e.wait_ready()
        status = run.request(e.port, gen.bench_path(), c["auth"])
        if status != 200:
            raise RuntimeError(f"{c['name']}: got {status}, not 200")
        m = run.measure(e, c["auth"], False)
        if c["kind"] == "metric" and c["n"]:
            m["metric"] = e.counter("wasmcustom.ladder.calls")
    finally:
        e.stop()
    m["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return m


def configurations(kinds: list[str], ns: list[int]) -> list[dict]:
    confs = [{"name": "bare", "kind": None, "n": None, "filters": lambda: [], "auth": None}]
    for kind in kinds:
        for n in ns:
            config = json.dumps({"call": kind, "n": n})
            confs.append({
                "name": f"{kind}_{n}",
                "kind": kind,
                "n": n,
                "filters": (lambda c=config: [gen.wasm_filter("ladder", LADDER_WASM, c)]),
                "auth": gen.basic_header(),
            })
    return confs


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def main(resume: Path | None = None) -> int:
    run.OUT.mkdir(parents=True, exist_ok=True)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    for f in (run.ENVOY, LADDER_WASM):
        if not f.exists():
            raise SystemExit(f"bench-ladder: {f} missing (make bench-ladder builds it)")
    if resume:
        json_path = resume.resolve()
        result = json.loads(json_path.read_text())
        result.setdefault("resumed", []).append(datetime.now(timezone.utc).isoformat())
        kinds = list(result["kinds"])
        ns, repeats = result["params"]["ns"], result["params"]["repeats"]
        run.SECONDS, run.WARMUP = result["params"]["seconds"], result["params"]["warmup"]
        drop_partial_rounds(result)
    else:
        ns, repeats = NS, REPEATS
        if len(ns) < 2 or ns[0] != 0 or ns != sorted(set(ns)) or ns[-1] > 64:
            raise SystemExit(f"bench-ladder: BENCH_NS must rise from 0 to at most 64, not {ns}")
        kinds = [k for k, _ in KINDS if not ONLY or k in ONLY]
        if not kinds:
            raise SystemExit(f"bench-ladder: BENCH_ONLY names no kind of {', '.join(k for k, _ in KINDS)}")
        started = datetime.now(timezone.utc)
        json_path = run.RESULTS / f"ladder-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        result = {
            "started": started.isoformat(),
            "machine": run.machine(),
            "params": {
                "repeats": repeats, "seconds": run.SECONDS, "warmup": run.WARMUP,
                "connections": run.CONNECTIONS, "ns": ns, "envoy_cpu": run.ENVOY_CPU, "wrk_cpu": run.WRK_CPU,
            },
            "wasm_bytes": LADDER_WASM.stat().st_size,
            "kinds": {k: {"label": label} for k, label in KINDS if k in kinds},
            "configs": {},
        }
    confs = configurations(kinds, ns)
    for c in confs:
        result["configs"].setdefault(c["name"], {"kind": c["kind"], "n": c["n"], "runs": []})
    log(f"machine: {result['machine']}")
    log(f"{len(confs)} configurations x {repeats} rounds x ({run.WARMUP} + {run.SECONDS}) s; "
        f"results (after every measurement) in {json_path.relative_to(gen.ROOT)}")

    d = run.OUT / "ladder"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c in confs:
        paths[c["name"]] = d / f"{c['name']}.json"
        gen.write_json(paths[c["name"]], gen.static_bootstrap(c["filters"]()))

    for rnd in range(repeats):
        order = confs if rnd % 2 == 0 else list(reversed(confs))
        for c in order:
            runs = result["configs"][c["name"]]["runs"]
            if any(r["round"] == rnd for r in runs):
                continue  # measured before a resume
            # The attempt others disturbed least is kept.
            waited, tries = 0.0, []
            for _ in range(RETRIES + 1):
                waited += wait_quiet()
                tries.append(measure_once(c, paths[c["name"]]))
                if tries[-1]["foreign_load_envoy_cpu"] <= FOREIGN_MAX:
                    break
                log(f"{c['name']}: others used {tries[-1]['foreign_load_envoy_cpu'] * 100:.0f}% of Envoy's core: again")
            m = min(tries, key=lambda t: t["foreign_load_envoy_cpu"])
            noisy = [t["foreign_load_envoy_cpu"] for t in tries if t is not m]
            m.update(round=rnd, waited_s=waited, discarded_foreign_load=noisy)
            runs.append(m)
            write_atomic(json_path, json.dumps(result, indent=1) + "\n")
            flag = "" if m["errors"] == 0 else f"  ERRORS {m['errors']}"
            log(
                f"round {rnd + 1}/{repeats} {c['name']:<18} {m['rps']:>8.0f} req/s  "
                f"cpu {m['cpu_us_per_req']:5.2f} us/req  foreign load {m['foreign_load_envoy_cpu'] * 100:3.0f}%  "
                f"load {' '.join(m['loadavg'])}{flag}"
            )

    result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result["finished"] = datetime.now(timezone.utc).isoformat()
    summarize(result)
    write_atomic(json_path, json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (run.RESULTS / "ladder-latest.md").write_text(md)
    print(md)
    log(f"wrote {json_path.relative_to(gen.ROOT)}, bench/results/ladder-latest.md")
    return 0


def drop_partial_rounds(result: dict) -> None:
    """Before a resume: a kind's round missing some N loses the N it has, so that a slope's points
    are all measured together (within minutes of each other)."""
    ns = result["params"]["ns"]
    for kind in result["kinds"]:
        names = [f"{kind}_{n}" for n in ns]
        for rnd in range(result["params"]["repeats"]):
            runs = {n: result["configs"].get(n, {}).get("runs", []) for n in names}
            have = [n for n in names if any(r["round"] == rnd for r in runs[n])]
            if have and len(have) < len(names):
                for n in have:
                    c = result["configs"][n]
                    c["runs"] = [r for r in c["runs"] if r["round"] != rnd]
                log(f"resume: {kind} round {rnd + 1} had {len(have)} of {len(names)} rungs: all again")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize(result: dict) -> None:
    cfgs = result["configs"]
    ns = result["params"]["ns"]
    rounds = range(result["params"]["repeats"])
    bare = {r["round"]: r for r in cfgs["bare"]["runs"]}
    for kind, k in result["kinds"].items():
        by_round = {rnd: {} for rnd in rounds}
        for n in ns:
            for r in cfgs[f"{kind}_{n}"]["runs"]:
                by_round[r["round"]][n] = r
        slopes, ratios, cpu0, cpu8, over_bare = [], [], [], [], []
        for rnd, runs in by_round.items():
            if set(runs) != set(ns):
                continue
            slopes.append(slope([(n, runs[n]["cpu_us_per_req"]) for n in ns]))
            ratios.append(runs[ns[-1]]["rps"] / runs[0]["rps"])
            cpu0.append(runs[0]["cpu_us_per_req"])
            cpu8.append(runs[ns[-1]]["cpu_us_per_req"])
            if rnd in bare:
                over_bare.append(runs[0]["cpu_us_per_req"] - bare[rnd]["cpu_us_per_req"])
        k["slopes_us"] = slopes
        k["per_call_us"] = run.median(slopes)
        k["rps_ratio_top"] = run.median(ratios)
        k["cpu_us_n0"] = run.median(cpu0)
        k["cpu_us_top"] = run.median(cpu8)
        k["n0_over_bare_us"] = run.median(over_bare)
        k["errors"] = sum(r["errors"] for n in ns for r in cfgs[f"{kind}_{n}"]["runs"])
        foreign = [r["foreign_load_envoy_cpu"] for n in ns for r in cfgs[f"{kind}_{n}"]["runs"]]
        k["foreign_median"], k["foreign_max"] = run.median(foreign), max(foreign, default=float("nan"))
    b = cfgs["bare"]["runs"]
    result["bare"] = {
        "rps": run.median([r["rps"] for r in b]),
        "cpu_us_per_req": run.median([r["cpu_us_per_req"] for r in b]),
    }


def markdown(result: dict) -> str:
    p, m = result["params"], result["machine"]
    runs = [r for c in result["configs"].values() for r in c["runs"]]
    foreign = sorted(r["foreign_load_envoy_cpu"] for r in runs)
    load1 = sorted(float(r["loadavg"][0]) for r in runs if r.get("loadavg"))
    top = p["ns"][-1]
    lines = [
        f"Run {result['started'][:19]}Z: {p['repeats']} alternating rounds x {p['seconds']} s "
        f"(+{p['warmup']} s warm-up) per (kind, N), N in {{{', '.join(map(str, p['ns']))}}}, wrk -t1 "
        f"-c{p['connections']} on CPU {p['wrk_cpu']}, Envoy --concurrency 1 on CPU {p['envoy_cpu']}, "
        f"direct_response; {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Envoy {m['envoy']}, {m['wrk']}; load average {' '.join(m['loadavg_start'])} at start, "
        f"{' '.join(m.get('loadavg_end', ['?']))} at end"
        + (f" (1-minute load seen after the runs: median {run.median(load1):.2f}, max {load1[-1]:.2f})" if load1 else "")
        + ".",
        "",
        f"Bare Envoy: {result['bare']['rps']:,.0f} req/s, {result['bare']['cpu_us_per_req']:.2f} µs Envoy CPU "
        "per request (medians).",
        "",
        "Per-call cost: the least-squares slope of Envoy CPU µs/request against N within a round, "
        f"median over rounds (each round's slope listed); x req/s: N = {top} over N = 0 in the "
        "same round, median.",
        "",
        f"| call (one of N per request) | µs per call | rounds' slopes | CPU µs/req N=0 | N={top} | x req/s N={top} | others on Envoy's core, median / max |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    kinds = sorted(result["kinds"].items(), key=lambda kv: -kv[1]["per_call_us"] if kv[0] != "none" else float("inf"))
    for kind, k in kinds:
        err = f" ⚠ {k['errors']} errors" if k["errors"] else ""
        slopes = ", ".join(f"{s:.2f}" for s in k["slopes_us"])
        lines.append(
            f"| `{kind}`: {k['label']}{err} | {k['per_call_us']:.2f} | {slopes} | {k['cpu_us_n0']:.2f} | "
            f"{k['cpu_us_top']:.2f} | {k['rps_ratio_top']:.2f} | "
            f"{k['foreign_median'] * 100:.0f}% / {k['foreign_max'] * 100:.0f}% |"
        )
    if foreign:
        waited = sum(r.get("waited_s", 0) for r in runs)
        unknown = sum(1 for r in runs if "waited_s" not in r)
        again = sum(len(r.get("discarded_foreign_load", [])) for r in runs)
        lines += ["", f"Noise: other processes used a median {run.median(foreign) * 100:.0f}% "
                      f"(max {foreign[-1] * 100:.0f}%) of Envoy's core during the measured runs; "
                      f"{waited:.0f} s waited for another benchmark's load generator or Envoy to finish"
                      + (f" (not recorded for {unknown} measurements)" if unknown else "")
                      + f", {again} measurements taken again (others above {FOREIGN_MAX * 100:.0f}% of "
                      "Envoy's core). A slope's own noise is what `none` shows (no call at any N)."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    if result.get("resumed"):
        lines += ["", f"Resumed (`--resume`) at {', '.join(t[:19] + 'Z' for t in result['resumed'])}."]
    return "\n".join(lines) + "\n"


def report(json_path: Path) -> int:
    result = json.loads(json_path.read_text())
    summarize(result)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (run.RESULTS / "ladder-latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "--report":
            sys.exit(report(Path(sys.argv[2])))
        if len(sys.argv) == 3 and sys.argv[1] == "--resume":
            sys.exit(main(Path(sys.argv[2])))
        sys.exit(main())
    finally:
        run.stop_all()
