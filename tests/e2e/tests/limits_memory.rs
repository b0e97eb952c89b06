//! Shared-data memory stays flat however long limits run: one value per subject, never one per
//! time window.
//!
//! 2000 keys, each limited per key (5 per second) and per key × API (5 per second on `calls`),
//! so 4000 rate subjects plus the account's. Several rounds, each about 1.2 s apart so every
//! window rolls over, send each key two requests on a few keep-alive connections. After every
//! round the test samples Envoy's RSS (`/proc/<pid>/status` VmRSS) and the admin `/memory`
//! allocated bytes. Round 1 creates every subject, so its growth is what one window's worth of
//! subjects costs: a design keyed by window would pay that again every round. From round 2 to the
//! last, allocated bytes must grow by less than that one-off cost (and under 1 MiB), RSS by under
//! 2 MiB.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use keygate_e2e::demo::{CALLS, MESSAGES};
use keygate_e2e::{demo, Conn, Echo, Envoy, EnvoyBuilder, Req};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

const KEYS: usize = 2000;
const ROUNDS: usize = 8;
const CONNS: usize = 8;
const PER_KEY_PER_ROUND: usize = 2;
const ROUND_SPACING: Duration = Duration::from_millis(1200);
const MIB: i64 = 1024 * 1024;

/// (sid, secret) of generated key `i`.
fn key(i: usize) -> (String, String) {
    (format!("SKmem{i:05}"), format!("sk_live_memory{i:05}"))
}

fn config() -> Value {
    let mut config = demo::config();
    config["apis"][0]["limit"] = json!({"requests": 5, "per": "1s"});
    config["limits"] = json!({"key": {"standard": {"requests": 5, "per": "1s"}}});
    let keys = config["keys"].as_array_mut().unwrap();
    for i in 0..KEYS {
        let (sid, secret) = key(i);
        keys.push(json!({
            "sid": sid,
            "account_sid": demo::ACCOUNT_SID,
            "role": "standard",
            "secrets": [{"digest": hex::encode(Sha256::digest(secret.as_bytes()))}]
        }));
    }
    config
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    rss_kib: i64,
    allocated: i64,
}

fn sample(envoy: &Envoy) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{}/status", envoy.pid()))
        .expect("read Envoy's /proc status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    let memory = envoy.admin_get("/memory").body_json();
    let allocated = memory["allocated"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .or_else(|| memory["allocated"].as_i64())
        .unwrap_or_else(|| panic!("no allocated bytes in /memory: {memory}"));
    Sample { rss_kib, allocated }
}

/// One round: every key `PER_KEY_PER_ROUND` times, keys split over the connections.
/// Returns how many requests were admitted.
fn round(conns: &mut [Conn]) -> usize {
    let barrier = Arc::new(Barrier::new(conns.len()));
    thread::scope(|s| {
        let workers: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(c, conn)| {
                let barrier = Arc::clone(&barrier);
                s.spawn(move || {
                    barrier.wait();
                    let mut ok = 0;
                    for i in (c..KEYS).step_by(CONNS) {
                        let (sid, secret) = key(i);
                        let req = Req::get(CALLS).basic(&sid, &secret);
                        for _ in 0..PER_KEY_PER_ROUND {
                            let res = conn.send(&req).expect("request on a keep-alive connection");
                            assert_eq!(res.status, 200, "{sid}: {res:?}");
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

#[test]
fn shared_data_memory_stays_flat_over_many_windows_for_thousands_of_subjects() {
    let echo = Echo::start_on("127.0.0.1", 0).unwrap();
    let envoy = EnvoyBuilder::new()
        .plugin_config_json(&config())
        .concurrency(4)
        .upstream_port(echo.port())
        .log_level("warning")
        .start();
    let mut conns: Vec<Conn> = (0..CONNS)
        .map(|_| Conn::open(envoy.port()).unwrap())
        .collect();

    // Warm up the connections and every worker's VM on a key outside the measured set.
    for conn in &mut conns {
        let res = conn
            .send(&Req::get(MESSAGES).basic(demo::MAIN.sid, demo::MAIN.secret))
            .unwrap();
        assert_eq!(res.status, 200, "{res:?}");
    }
    let mut samples = vec![sample(&envoy)];
    eprintln!(
        "memory: {KEYS} keys x 2 limits (5/s each), {PER_KEY_PER_ROUND} requests per key per round, rounds {ROUND_SPACING:?} apart"
    );
    eprintln!(
        "memory: round 0 (before): VmRSS {} KiB, allocated {} B",
        samples[0].rss_kib, samples[0].allocated
    );
    for r in 1..=ROUNDS {
        let started = Instant::now();
        let admitted = round(&mut conns);
        assert_eq!(admitted, KEYS * PER_KEY_PER_ROUND);
        echo.clear(); // the echo's own record of requests is the test's memory, not Envoy's
        let s = sample(&envoy);
        let prev = samples[samples.len() - 1];
        eprintln!(
            "memory: round {r}: {admitted} admitted in {:?}; VmRSS {} KiB ({:+} KiB), allocated {} B ({:+} B)",
            started.elapsed(),
            s.rss_kib,
            s.rss_kib - prev.rss_kib,
            s.allocated,
            s.allocated - prev.allocated
        );
        samples.push(s);
        if let Some(rest) = ROUND_SPACING.checked_sub(started.elapsed()) {
            thread::sleep(rest);
        }
    }

    // What one window's worth of subjects costs (round 1 created them all).
    let creation = samples[1].allocated - samples[0].allocated;
    let alloc_growth = samples[ROUNDS].allocated - samples[2].allocated;
    let rss_growth_kib = samples[ROUNDS].rss_kib - samples[2].rss_kib;
    eprintln!(
        "memory: creating 4000 subjects cost {creation} B allocated; rounds 2..{ROUNDS}: {alloc_growth:+} B allocated, {rss_growth_kib:+} KiB RSS (a per-window design would add about {} B)",
        creation * (ROUNDS as i64 - 2)
    );
    assert!(
        creation > 4000 * 32,
        "creating 4000 subjects should show in allocated bytes (else this test measures nothing): {samples:?}"
    );
    assert!(
        alloc_growth < creation.min(MIB),
        "allocated grew {alloc_growth} B from round 2 to round {ROUNDS}: {samples:?}"
    );
    assert!(
        rss_growth_kib * 1024 < 2 * MIB,
        "RSS grew {rss_growth_kib} KiB from round 2 to round {ROUNDS}: {samples:?}"
    );
    assert_eq!(
        envoy.custom_metric("keygate.denied.rate_limited_key"),
        Some(0)
    );
    assert_eq!(
        envoy.custom_metric("keygate.denied.rate_limited_api"),
        Some(0)
    );
}
