//! `keygate-soak` (`make soak`): millions of requests through a 4-worker Envoy running the real
//! filter in control-plane mode (a real keygate-control on SQLite in a temporary directory), while
//! the control plane's API creates, regenerates and deletes keys the whole time. It fails, with
//! one exact message per broken check, if
//!
//! - **vm**: a wasm VM was created, reloaded or lost during the run (every `wasm.*` stat of
//!   Envoy's admin `/stats` is the same at the end as at the start, and Envoy is still the
//!   process that started), or the filter counted a rejected config or a limiter store failure;
//! - **classes**: any reply was not of its request's expected class ([`mix`]), or a request
//!   failed at the transport level;
//! - **stats**: keygate's own counters disagree with the client's (`wasmcustom.keygate.allowed`
//!   and every `denied.<code>`, as deltas over the run);
//! - **limits**: a limited key (near its own or its API's limit all the time, or pulsed: see
//!   [`mix::Pulse`]) admitted more than GCRA allows in some window ([`limits`]), or admitted less
//!   than half of what GCRA allows over the run while asked for twice as much;
//! - **upstream**: the echo upstream did not receive exactly the requests answered 200;
//! - **memory**: Envoy's RSS (sampled every [`RSS_EVERY`]) is more than [`RSS_TOLERANCE_PCT`] %
//!   higher in the last third of the run (median) than in the second (the first is warm-up).
//!
//! Progress every [`PROGRESS_EVERY`], a summary table at the end, the figures as JSON in
//! `target/soak/soak-<stamp>.json`. Environment: `SOAK_REQUESTS` (default 10,000,000),
//! `SOAK_SECONDS` (a time cap, none by default), `SOAK_CONNECTIONS` (default 16),
//! `SOAK_FAULT=near-limit` (creates the near-limit keys with 60 per 10 s while the limit check
//! holds them to 50: the run must fail, which shows the check can), and the harness's
//! `KEYGATE_ENVOY`, `KEYGATE_WASM`, `KEYGATE_CONTROL`.
//!
//! Test support: failing loudly is its job, so the workspace's panic denials are lifted here as
//! in the harness library.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

mod churn;
mod limits;
mod load;
mod mix;
mod report;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate_e2e::{paths, wait, ControlPlane, Echo, Envoy, EnvoyBuilder, Req};
use serde_json::{json, Value};

use churn::{Api, Churn};
use load::{Budget, Progress, Tally};
use mix::{Class, Key, Pool, Pulse, Rate, Target};
use report::{thousands, Verdict};

const WORKERS: u32 = 4;
const DEFAULT_REQUESTS: u64 = 10_000_000;
const DEFAULT_CONNECTIONS: usize = 16;
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const RSS_EVERY: Duration = Duration::from_secs(2);
const RSS_TOLERANCE_PCT: f64 = 5.0;
/// The load stops early after this many unexpected replies and transport errors.
const MAX_FAILURES: u64 = 1_000;

const NEAR_KEYS: usize = 8;
const NEAR_RATE: Rate = Rate {
    requests: 50,
    per_s: 10,
};
/// The near-limit keys' rate under `SOAK_FAULT=near-limit` (checked as [`NEAR_RATE`]).
const FAULT_NEAR_RATE: Rate = Rate {
    requests: 60,
    per_s: 10,
};
const API_KEYS: usize = 4;
const API_RATE: Rate = Rate {
    requests: 30,
    per_s: 6,
};
const PULSED_KEYS: usize = 4;
const PULSED_RATE: Rate = Rate {
    requests: 100,
    per_s: 10,
};
const FAR_KEYS: usize = 8;
const FAR_RATE: Rate = Rate {
    requests: 1_000_000,
    per_s: 60,
};
/// The account's own rate and in-flight limit: far above what the soak sends.
const ACCOUNT_RATE: Rate = Rate {
    requests: 10_000_000,
    per_s: 60,
};
const ACCOUNT_CONCURRENCY: u32 = 200;

/// Wall-clock time in µs since the Unix epoch (the clock the filter reads through Envoy).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().replace(['_', ','], "").parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

struct Options {
    requests: u64,
    seconds: Option<u64>,
    connections: usize,
    fault: bool,
}

impl Options {
    fn from_env() -> Options {
        let fault = match std::env::var("SOAK_FAULT").ok().as_deref() {
            None | Some("") => false,
            Some("near-limit") => true,
            Some(other) => panic!("SOAK_FAULT={other:?}: the only fault is \"near-limit\""),
        };
        Options {
            requests: env_number("SOAK_REQUESTS").unwrap_or(DEFAULT_REQUESTS),
            seconds: env_number("SOAK_SECONDS"),
            connections: env_number("SOAK_CONNECTIONS")
                .map(|n| n as usize)
                .unwrap_or(DEFAULT_CONNECTIONS)
                .max(1),
            fault,
        }
    }
}

fn main() -> ExitCode {
    let opts = Options::from_env();
    // The control plane's per-credential rate (600 a minute) would refuse the churn's calls; it
    // is not what the soak is about. Set before any thread starts; the child inherits it.
    std::env::set_var("KEYGATE_CREDENTIAL_RATE", "off");

    let cp = ControlPlane::start();
    println!(
        "soak: control plane on 127.0.0.1:{} (SQLite in a temporary directory)",
        cp.port()
    );
    let other_account = create_account(&cp);
    cp.patch_account(json!({"limits": {
        "rate": ACCOUNT_RATE.json(), "concurrency": ACCOUNT_CONCURRENCY
    }}));
    let api = Api { cp: &cp };
    let near_rate = if opts.fault {
        FAULT_NEAR_RATE
    } else {
        NEAR_RATE
    };
    let pool = |n: usize, name: &str, limits: Value| -> Vec<Key> {
        (0..n)
            .map(|i| {
                api.create_with(json!({
                    "role": "standard", "friendly_name": format!("soak-{name}-{i}"), "limits": limits
                }))
                .unwrap_or_else(|e| panic!("soak: {e}"))
            })
            .collect()
    };
    let near = pool(NEAR_KEYS, "near", json!({"rate": near_rate.json()}));
    let api_keys = pool(
        API_KEYS,
        "api",
        json!({"rate": FAR_RATE.json(), "apis": {"calls": API_RATE.json()}}),
    );
    let pulsed = pool(PULSED_KEYS, "pulsed", json!({"rate": PULSED_RATE.json()}));
    let far = pool(FAR_KEYS, "far", json!({"rate": FAR_RATE.json()}));
    let publishable = api
        .create_with(json!({
            "role": "publishable", "friendly_name": "soak-publishable",
            "limits": {"rate": FAR_RATE.json()}
        }))
        .unwrap_or_else(|e| panic!("soak: {e}"));

    let echo = Echo::start_counting();
    let mut envoy = EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(json!({})))
        .cluster("keygate_control", cp.port())
        .concurrency(WORKERS)
        .upstream_port(echo.port())
        .use_remote_address(true)
        .xff_num_trusted_hops(1)
        .log_level("warning")
        .no_access_log()
        .start();
    let pid = envoy.pid();
    println!(
        "soak: Envoy pid {pid}, {WORKERS} workers, listener 127.0.0.1:{}, admin 127.0.0.1:{}; filter {}",
        envoy.port(),
        envoy.admin_port(),
        paths::wasm_path().display()
    );

    let churn = Arc::new(Churn::default());
    let target = Target {
        account: cp.account_sid().to_owned(),
        other_account,
        near,
        near_rate,
        api: api_keys,
        api_rate: API_RATE,
        pulsed,
        pulsed_rate: PULSED_RATE,
        pulse: Pulse::new(PULSED_KEYS),
        far,
        publishable,
        churn: Arc::clone(&churn),
    };
    wait_until_known(&envoy, &target);

    let start_stats = report::stats(&envoy);
    let echo_start = echo.received();
    let progress = Progress::default();
    let stop_churn = AtomicBool::new(false);
    let started = Instant::now();
    let started_us = now_us();
    let stamp = report::stamp();
    let budget = Budget {
        requests: opts.requests,
        deadline: opts.seconds.map(|s| started + Duration::from_secs(s)),
        max_failures: MAX_FAILURES,
    };
    println!(
        "soak: {} requests{} over {} connections; churn: {} key lives at a time and a bulk thread",
        thousands(opts.requests),
        opts.seconds
            .map(|s| format!(" (at most {s} s)"))
            .unwrap_or_default(),
        opts.connections,
        churn::SLOTS
    );

    let mut rss: Vec<(f64, u64)> = Vec::new();
    let tally = thread::scope(|s| {
        let churners: Vec<_> = (0..churn::SLOTS)
            .map(|_| s.spawn(|| churn.run_slot(&api, FAR_RATE, &stop_churn)))
            .chain([s.spawn(|| churn.run_bulk(&api, FAR_RATE, &stop_churn))])
            .collect();
        // The mix draws churned keys from the start: wait for the first.
        let first_key = wait::within(Duration::from_secs(30), || churn.pick(0).is_some());
        assert!(
            first_key.is_some(),
            "soak: the churn created no key within 30 s"
        );
        let generators: Vec<_> = (0..opts.connections)
            .map(|id| {
                let (target, budget, progress) = (&target, &budget, &progress);
                let port = envoy.port();
                s.spawn(move || load::generate(id, port, target, budget, progress, started))
            })
            .collect();
        monitor(&progress, &generators, pid, started, &opts, &mut rss);
        let mut tally = Tally::default();
        for g in generators {
            tally.merge(g.join().expect("generator thread"));
        }
        stop_churn.store(true, Ordering::Relaxed);
        for c in churners {
            c.join().expect("churn thread");
        }
        tally
    });
    let elapsed = started.elapsed();
    let ended_us = now_us();

    let running = envoy.is_running();
    let verdicts = check(&Run {
        envoy: &envoy,
        running,
        pid,
        echo: &echo,
        echo_start,
        start_stats: &start_stats,
        tally: &tally,
        progress: &progress,
        rss: &rss,
        started_us,
        ended_us: ended_us.max(started_us),
    });
    let outcome = Outcome {
        tally: &tally,
        progress: &progress,
        churn: &churn,
        verdicts: &verdicts,
        elapsed,
        rss: &rss,
    };
    summarize(&outcome);
    write_json(&opts, &stamp, &outcome);
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| v.failure.is_some()).collect();
    if failed.is_empty() {
        println!("soak: PASSED ({} checks)", verdicts.len());
        ExitCode::SUCCESS
    } else {
        for v in &failed {
            println!(
                "soak: FAILED {}: {}",
                v.check,
                v.failure.as_deref().unwrap_or("")
            );
        }
        ExitCode::FAILURE
    }
}

/// Creates a second account (admin token) and returns its SID.
fn create_account(cp: &ControlPlane) -> String {
    let r = cp.send(
        &Req::post("/v1/accounts")
            .bearer(cp.cred("KEYGATE_ADMIN_TOKEN"))
            .json(&json!({"friendly_name": "soak-other"})),
    );
    assert_eq!(r.status, 201, "create the second account: {r:?}");
    r.body_json()["sid"]
        .as_str()
        .expect("the second account's sid")
        .to_owned()
}

/// Waits until the edge knows every pool key: each is refused with 404 `account_mismatch` on
/// the other account's path (so that no quota is spent).
fn wait_until_known(envoy: &Envoy, target: &Target) {
    let path = format!("/v2/accounts/{}/calls", target.other_account);
    let keys = target
        .near
        .iter()
        .chain(&target.api)
        .chain(&target.pulsed)
        .chain(&target.far)
        .chain([&target.publishable]);
    for key in keys {
        let req = Req::get(&path).basic(&key.sid, &key.secret);
        let known = wait::within(Duration::from_secs(60), || {
            req.send_from_new_client(envoy.port()).status == 404
        });
        assert!(
            known.is_some(),
            "soak: the edge did not learn key {} within 60 s; Envoy log:\n{}",
            key.sid,
            envoy.logs()
        );
    }
}

/// Until every generator is done: RSS every [`RSS_EVERY`], a progress line every
/// [`PROGRESS_EVERY`].
fn monitor(
    progress: &Progress,
    generators: &[thread::ScopedJoinHandle<'_, Tally>],
    pid: u32,
    started: Instant,
    opts: &Options,
    rss: &mut Vec<(f64, u64)>,
) {
    let mut last_print = Instant::now();
    let mut last_done = 0u64;
    while !generators.iter().all(|g| g.is_finished()) {
        thread::sleep(Duration::from_millis(100));
        let t = started.elapsed().as_secs_f64();
        if rss
            .last()
            .is_none_or(|(at, _)| t - at >= RSS_EVERY.as_secs_f64())
        {
            if let Some(kib) = report::rss_kib(pid) {
                rss.push((t, kib));
            }
        }
        if last_print.elapsed() >= PROGRESS_EVERY {
            let done = progress.done.load(Ordering::Relaxed);
            let rate = (done - last_done) as f64 / last_print.elapsed().as_secs_f64();
            let pct = |n: u64| 100.0 * n as f64 / done.max(1) as f64;
            println!(
                "soak: {:>7.1} s  {}/{} requests  {:.0} req/s  200 {:.1} %  429 {:.1} %  other 4xx {:.1} %  unexpected {}  transport errors {}  Envoy RSS {:.1} MiB",
                t,
                thousands(done),
                thousands(opts.requests),
                rate,
                pct(progress.ok.load(Ordering::Relaxed)),
                pct(progress.limited.load(Ordering::Relaxed)),
                pct(progress.denied_4xx.load(Ordering::Relaxed)),
                progress.unexpected.load(Ordering::Relaxed),
                progress.transport_errors.load(Ordering::Relaxed),
                rss.last().map(|r| r.1 as f64 / 1024.0).unwrap_or(0.0),
            );
            last_print = Instant::now();
            last_done = done;
        }
    }
    if let Some(kib) = report::rss_kib(pid) {
        rss.push((started.elapsed().as_secs_f64(), kib));
    }
}

struct Run<'a> {
    envoy: &'a Envoy,
    /// Whether Envoy was still running when the load ended.
    running: bool,
    pid: u32,
    echo: &'a Echo,
    echo_start: u64,
    start_stats: &'a BTreeMap<String, u64>,
    tally: &'a Tally,
    progress: &'a Progress,
    rss: &'a [(f64, u64)],
    /// When the load started and ended, wall clock (µs).
    started_us: u64,
    ended_us: u64,
}

/// Every check, in the order of the module documentation.
fn check(run: &Run<'_>) -> Vec<Verdict> {
    let ok_count = run.progress.ok.load(Ordering::Relaxed);
    // The client's count of each denial code.
    let mut client_codes: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, label), n) in &run.tally.replies {
        let mut parts = label.split(' ');
        if let (Some(status), Some(code)) = (parts.next(), parts.next()) {
            if status != "200" && !code.starts_with('(') {
                *client_codes.entry(code.to_owned()).or_insert(0) += n;
            }
        }
    }
    let delta = |end: &BTreeMap<String, u64>, name: &str| {
        end.get(name).copied().unwrap_or(0) as i128
            - run.start_stats.get(name).copied().unwrap_or(0) as i128
    };
    // keygate's counters may be flushed on a tick: wait (a little) for them to agree.
    let agree = |end: &BTreeMap<String, u64>| -> Vec<String> {
        let mut off = Vec::new();
        let allowed = delta(end, "wasmcustom.keygate.allowed");
        if allowed != i128::from(ok_count) {
            off.push(format!(
                "wasmcustom.keygate.allowed +{allowed}, the client counted {ok_count} 200s"
            ));
        }
        let names = end
            .keys()
            .filter_map(|n| n.strip_prefix("wasmcustom.keygate.denied."))
            .map(str::to_owned)
            .chain(client_codes.keys().cloned())
            .collect::<std::collections::BTreeSet<String>>();
        for code in names {
            let stat = delta(end, &format!("wasmcustom.keygate.denied.{code}"));
            let client = client_codes.get(&code).copied().unwrap_or(0);
            if stat != i128::from(client) {
                off.push(format!(
                    "wasmcustom.keygate.denied.{code} +{stat}, the client counted {client}"
                ));
            }
        }
        off
    };
    let mut end_stats = report::stats(run.envoy);
    let _ = wait::within(Duration::from_secs(15), || {
        end_stats = report::stats(run.envoy);
        agree(&end_stats).is_empty()
    });
    let mut verdicts = Vec::new();

    // vm
    let mut vm_changes: Vec<String> = run
        .start_stats
        .keys()
        .chain(end_stats.keys())
        .filter(|n| n.starts_with("wasm."))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|n| delta(&end_stats, n) != 0)
        .map(|n| {
            format!(
                "{n} {} -> {}",
                run.start_stats.get(n.as_str()).copied().unwrap_or(0),
                end_stats.get(n.as_str()).copied().unwrap_or(0)
            )
        })
        .collect();
    for name in [
        "wasmcustom.keygate.config.rejected",
        "wasmcustom.keygate.ratelimit.retries_exhausted",
        "wasmcustom.keygate.ratelimit.garbage_values",
        "wasmcustom.keygate.ratelimit.store_errors",
        "wasmcustom.keygate.ratelimit.store_failures_allowed",
    ] {
        let d = delta(&end_stats, name);
        if d != 0 {
            vm_changes.push(format!("{name} +{d}"));
        }
    }
    if !run.running || run.envoy.pid() != run.pid {
        vm_changes.push(format!("Envoy (pid {}) is no longer running", run.pid));
    }
    let vm_figure = format!(
        "wasm.envoy.wasm.runtime.v8.created {}, active {}, wasm_vm_count {}, vm_reload {}",
        end_stats
            .get("wasm.envoy.wasm.runtime.v8.created")
            .copied()
            .unwrap_or(0),
        end_stats
            .get("wasm.envoy.wasm.runtime.v8.active")
            .copied()
            .unwrap_or(0),
        end_stats.get("wasm.wasm_vm_count").copied().unwrap_or(0),
        end_stats
            .get("wasm.keygate.vm_reload")
            .copied()
            .unwrap_or(0),
    );
    verdicts.push(Verdict {
        check: "vm",
        failure: (!vm_changes.is_empty()).then(|| {
            format!(
                "a wasm VM or the filter's store changed during the run: {}",
                vm_changes.join("; ")
            )
        }),
        figure: format!("unchanged from start to end: {vm_figure}"),
    });

    // classes
    let unexpected = run.progress.unexpected.load(Ordering::Relaxed);
    let transport = run.progress.transport_errors.load(Ordering::Relaxed);
    let done = run.progress.done.load(Ordering::Relaxed);
    let first = run
        .progress
        .failures
        .lock()
        .expect("failures")
        .first()
        .cloned()
        .unwrap_or_default();
    verdicts.push(Verdict {
        check: "classes",
        failure: (unexpected + transport > 0).then(|| {
            format!(
                "{unexpected} replies of an unexpected class and {transport} transport errors in {done} requests; first: {first}"
            )
        }),
        figure: format!("{} requests, {unexpected} unexpected, {transport} transport errors", thousands(done)),
    });

    // stats
    let off = agree(&end_stats);
    verdicts.push(Verdict {
        check: "stats",
        failure: (!off.is_empty()).then(|| {
            format!("keygate's counters disagree with the client's: {}", off.join("; "))
        }),
        figure: format!(
            "wasmcustom.keygate.allowed +{} = 200s counted; every denied.<code> = the client's count",
            thousands(ok_count)
        ),
    });

    // limits
    for (check, pool, rate) in [
        ("limits (near-limit keys)", Pool::Near, NEAR_RATE),
        ("limits (API-limited keys)", Pool::Api, API_RATE),
        ("limits (pulsed keys)", Pool::Pulsed, PULSED_RATE),
    ] {
        verdicts.push(limit_verdict(
            check,
            pool,
            run.tally,
            rate,
            (run.started_us, run.ended_us),
        ));
    }

    // upstream
    let received = run.echo.received() - run.echo_start;
    verdicts.push(Verdict {
        check: "upstream",
        failure: (received != ok_count).then(|| {
            format!("the echo upstream received {received} requests, the client counted {ok_count} 200s")
        }),
        figure: format!("{} received = 200s counted", thousands(received)),
    });

    // memory
    verdicts.push(match report::thirds(run.rss) {
        Some((second, last, n)) if n >= 3 => {
            let growth = 100.0 * (last as f64 - second as f64) / second as f64;
            let figure = format!(
                "RSS median {:.1} MiB in the second third, {:.1} MiB in the last ({growth:+.2} %, {} samples)",
                second as f64 / 1024.0,
                last as f64 / 1024.0,
                run.rss.len()
            );
            Verdict {
                check: "memory",
                failure: (growth > RSS_TOLERANCE_PCT).then(|| {
                    format!("Envoy's {figure}: more than +{RSS_TOLERANCE_PCT} %")
                }),
                figure,
            }
        }
        _ => Verdict {
            check: "memory",
            failure: Some(format!(
                "too few RSS samples to judge ({}, one every {} s; the run needs at least 18 s)",
                run.rss.len(),
                RSS_EVERY.as_secs()
            )),
            figure: String::new(),
        },
    });
    verdicts
}

/// The limit check of one pool: no window over GCRA, and not under half of it when asked for
/// at least twice as much. `load` is when the load started and ended (wall clock, µs).
fn limit_verdict(
    check: &'static str,
    pool: Pool,
    tally: &Tally,
    rate: Rate,
    (started_us, ended_us): (u64, u64),
) -> Verdict {
    let mut by_key: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
    for &(k, s, r) in tally.admitted.get(&pool).into_iter().flatten() {
        by_key.entry(k).or_default().push((s, r));
    }
    let sent: BTreeMap<usize, u64> = tally
        .sent
        .iter()
        .filter(|((p, _), _)| *p == pool)
        .map(|(&(_, k), &n)| (k, n))
        .collect();
    let allowance = limits::allowance(rate.requests, rate.interval_us(), ended_us - started_us);
    let since_start = |us: u64| (us as f64 - started_us as f64) / 1e6;
    let mut over = Vec::new();
    let mut under = Vec::new();
    let mut tightest = f64::NEG_INFINITY;
    let mut total = 0u64;
    for (&k, &requests) in &sent {
        let mut pairs = by_key.remove(&k).unwrap_or_default();
        let count = pairs.len() as u64;
        total += count;
        if let Some(w) = limits::tightest_window(&mut pairs, rate.requests, rate.interval_us()) {
            tightest = tightest.max(w.excess);
            if w.excess > 0.0 {
                over.push(format!(
                    "key {k} ({}) admitted {} requests in {:.3} s (sent from {:+.3} s, answered by {:+.3} s of the load), GCRA allows at most {}",
                    rate.label(),
                    w.admitted,
                    (w.to_us - w.from_us) as f64 / 1e6,
                    since_start(w.from_us),
                    since_start(w.to_us),
                    w.allowed
                ));
            }
        }
        if requests >= 2 * allowance && count * 2 < allowance {
            under.push(format!(
                "key {k} ({}) admitted {count} of {requests} requests, GCRA allows {allowance} over the run",
                rate.label()
            ));
        }
    }
    let list = |items: &[String]| match items.len() {
        0..=3 => items.join("; "),
        n => format!("{}; and {} more keys", items[..3].join("; "), n - 3),
    };
    let failure = if !over.is_empty() {
        Some(format!("over the limit: {}", list(&over)))
    } else if !under.is_empty() {
        Some(format!("under half the limit: {}", list(&under)))
    } else {
        None
    };
    Verdict {
        check,
        failure,
        figure: format!(
            "{} keys at {}: {} admitted, GCRA allows {} per key over the run; tightest window {:+.2} requests from the bound",
            sent.len(),
            rate.label(),
            thousands(total),
            thousands(allowance),
            tightest
        ),
    }
}

/// What the run gave, for the summary and the JSON file.
struct Outcome<'a> {
    tally: &'a Tally,
    progress: &'a Progress,
    churn: &'a Churn,
    verdicts: &'a [Verdict],
    elapsed: Duration,
    rss: &'a [(f64, u64)],
}

fn summarize(o: &Outcome<'_>) {
    let Outcome {
        tally,
        progress,
        churn,
        verdicts,
        elapsed,
        rss,
    } = *o;
    let done = progress.done.load(Ordering::Relaxed);
    println!(
        "\nsoak: {} requests in {:.1} s ({:.0} req/s)\n",
        thousands(done),
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    println!(
        "{:<28} {:<52} {:>10}  replies",
        "class", "expects", "requests"
    );
    for (class, _) in Class::MIX {
        let replies: Vec<(&String, &u64)> = tally
            .replies
            .iter()
            .filter(|((c, _), _)| *c == class)
            .map(|((_, l), n)| (l, n))
            .collect();
        let total: u64 = replies.iter().map(|(_, n)| **n).sum();
        let detail: Vec<String> = replies
            .iter()
            .map(|(l, n)| format!("{l}: {}", thousands(**n)))
            .collect();
        println!(
            "{:<28} {:<52} {:>10}  {}",
            class.name(),
            class.expects(),
            thousands(total),
            detail.join("; ")
        );
    }
    println!(
        "\nchurn: {} keys created, {} regenerations, {} deleted, {} failed calls",
        thousands(churn.created.load(Ordering::Relaxed)),
        thousands(churn.regenerated.load(Ordering::Relaxed)),
        thousands(churn.deleted.load(Ordering::Relaxed)),
        churn.failed.load(Ordering::Relaxed)
    );
    for f in churn.failures.lock().expect("churn failures").iter() {
        println!("  churn failure: {f}");
    }
    if let (Some(first), Some(max)) = (rss.first(), rss.iter().map(|r| r.1).max()) {
        println!(
            "Envoy RSS: {:.1} MiB at the start, {:.1} MiB at most, {:.1} MiB at the end",
            first.1 as f64 / 1024.0,
            max as f64 / 1024.0,
            rss.last().map(|r| r.1).unwrap_or(0) as f64 / 1024.0
        );
    }
    for f in progress.failures.lock().expect("failures").iter() {
        println!("  unexpected: {f}");
    }
    println!();
    for v in verdicts {
        println!(
            "{:<28} {:<6} {}",
            v.check,
            if v.failure.is_some() { "FAIL" } else { "ok" },
            v.figure
        );
    }
    println!();
}

fn write_json(opts: &Options, (file_stamp, rfc3339): &(String, String), o: &Outcome<'_>) {
    let Outcome {
        tally,
        progress,
        churn,
        verdicts,
        elapsed,
        rss,
    } = *o;
    let done = progress.done.load(Ordering::Relaxed);
    let mut classes = serde_json::Map::new();
    for (class, weight) in Class::MIX {
        let replies: serde_json::Map<String, Value> = tally
            .replies
            .iter()
            .filter(|((c, _), _)| *c == class)
            .map(|((_, l), n)| (l.clone(), json!(n)))
            .collect();
        classes.insert(
            class.name().to_owned(),
            json!({"weight_per_1000": weight, "expects": class.expects(), "replies": replies}),
        );
    }
    let git = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(paths::workspace_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let doc = json!({
        "started_utc": rfc3339,
        "git_head": git,
        "requests_asked": opts.requests,
        "seconds_cap": opts.seconds,
        "fault": opts.fault.then_some("near-limit"),
        "connections": opts.connections,
        "envoy_workers": WORKERS,
        "requests": done,
        "seconds": elapsed.as_secs_f64(),
        "requests_per_second": done as f64 / elapsed.as_secs_f64().max(1e-9),
        "ok": progress.ok.load(Ordering::Relaxed),
        "limited": progress.limited.load(Ordering::Relaxed),
        "unexpected": progress.unexpected.load(Ordering::Relaxed),
        "transport_errors": progress.transport_errors.load(Ordering::Relaxed),
        "failures": *progress.failures.lock().expect("failures"),
        "classes": classes,
        "churn": {
            "created": churn.created.load(Ordering::Relaxed),
            "regenerated": churn.regenerated.load(Ordering::Relaxed),
            "deleted": churn.deleted.load(Ordering::Relaxed),
            "failed_calls": churn.failed.load(Ordering::Relaxed),
            "propagation_window_s": churn::PROPAGATION.as_secs(),
        },
        "rates": {
            "near": NEAR_RATE.label(), "api": API_RATE.label(), "pulsed": PULSED_RATE.label(),
            "far": FAR_RATE.label(), "account": ACCOUNT_RATE.label(),
        },
        "rss_kib": rss.iter().map(|(t, k)| json!([(t * 10.0).round() / 10.0, k])).collect::<Vec<_>>(),
        "checks": verdicts.iter().map(|v| json!({
            "check": v.check, "passed": v.failure.is_none(), "figure": v.figure, "failure": v.failure,
        })).collect::<Vec<_>>(),
    });
    let dir = paths::workspace_root().join("target/soak");
    let path = dir.join(format!("soak-{file_stamp}.json"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&doc).expect("serialize the figures"),
        )
    });
    match written {
        Ok(()) => println!("soak: figures in {}", path.display()),
        Err(e) => println!("soak: cannot write {}: {e}", path.display()),
    }
}
