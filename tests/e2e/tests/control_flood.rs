//! The control plane survives its own clients: while its API is hammered with bad credentials
//! from 127.0.0.1 (a bounded flood), a revocation still reaches a live edge within 2 s. The
//! flood is refused with the edge's codes (401, then 429 `too_many_failed_auth` once the
//! address is over its limit), and the edge's feed, read on the control plane's pool of read
//! connections with an edge token the limiter never meets, does not stall.
//! Real control plane (`keygate-control serve`), real Envoy (2 workers), real sockets.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_e2e::{wait, ControlPlane, Echo, Envoy, EnvoyBuilder, Req};
use serde_json::json;

const WORKERS: u32 = 2;
/// Flood threads, and the most requests they send in all (bounded in count and time).
const FLOODERS: usize = 4;
const FLOOD_MAX: u32 = 40_000;
const FLOOD_MAX_TIME: Duration = Duration::from_secs(12);

fn start_envoy(cp: &ControlPlane, echo: &Echo) -> Envoy {
    EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(json!({})))
        .cluster("keygate_control", cp.port())
        .concurrency(WORKERS)
        .upstream_port(echo.port())
        .use_remote_address(true)
        .xff_num_trusted_hops(1)
        .start()
}

/// Every one of 2 × WORKERS fresh connections gets `status` (each from its own client address,
/// so the edge's failed-auth limiter never answers for the test's own probes).
fn all(envoy: &Envoy, req: &Req, status: u16) -> bool {
    (0..2 * WORKERS).all(|_| req.send_from_new_client(envoy.port()).status == status)
}

/// Polls `f` every 20 ms until it returns true or `limit` passes; returns the time it took.
fn within(limit: Duration, f: impl FnMut() -> bool) -> Option<Duration> {
    wait::within_every(Duration::from_millis(20), limit, f)
}

#[test]
fn a_revocation_reaches_a_live_edge_within_two_seconds_while_the_api_is_flooded() {
    let cp = ControlPlane::start();
    let echo = Echo::start();
    let envoy = start_envoy(&cp, &echo);
    cp.patch_account(json!({"limits": {"rate": {"requests": 1_000_000, "per": "1m"}}}));
    let (sid, secret) = cp.create_key_v1(json!({
        "role": "main",
        "limits": {"rate": {"requests": 1_000_000, "per": "1m"}},
    }));
    let calls = format!("/v2/accounts/{}/calls", cp.account_sid());
    let req = Req::get(&calls).basic(&sid, &secret);
    within(Duration::from_secs(15), || all(&envoy, &req, 200))
        .unwrap_or_else(|| panic!("key not admitted; Envoy log:\n{}", envoy.logs()));

    // The flood: wrong auth tokens for the account, on the management API, from 127.0.0.1.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU32::new(0));
    let port = cp.port();
    let flood_path = format!("/v1/accounts/{}/keys", cp.account_sid());
    let account = cp.account_sid().to_owned();
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|i| {
            let (stop, sent) = (stop.clone(), sent.clone());
            let (path, account) = (flood_path.clone(), account.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut seen: Vec<u16> = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < FLOOD_MAX_TIME
                    && sent.fetch_add(1, Ordering::Relaxed) < FLOOD_MAX
                {
                    let r = Req::get(&path)
                        .basic(&account, format!("at_live_wrong{i}"))
                        .try_send(port);
                    if let Ok(r) = r {
                        seen.push(r.status);
                    }
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));

    // The revocation, by the operator, in the middle of the flood.
    let path = format!("/v1/accounts/{}/keys/{sid}", cp.account_sid());
    let r = cp.send(&Req::delete(&path).bearer(cp.cred("KEYGATE_ADMIN_TOKEN")));
    assert_eq!(r.status, 204, "{r:?}");
    let took = within(Duration::from_secs(10), || all(&envoy, &req, 401));
    let flooding_when_refused = !stop.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let statuses: Vec<u16> = flooders
        .into_iter()
        .flat_map(|t| t.join().expect("flooder"))
        .collect();
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    eprintln!(
        "flood: {} requests ({} 401, {} 429); revocation refused at the edge after {took:?}",
        statuses.len(),
        count(401),
        count(429)
    );
    let took =
        took.unwrap_or_else(|| panic!("revoked key still admitted; Envoy log:\n{}", envoy.logs()));
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    assert!(
        flooding_when_refused,
        "the flood was still running when the edge refused the key"
    );
    // The flood was refused, never served: 401 until the address was over its limit, then 429.
    assert_eq!(count(401) + count(429), statuses.len(), "{statuses:?}");
    assert!(
        count(429) > count(401),
        "the limiter took over: {statuses:?}"
    );
    assert!(
        statuses.len() >= 1_000,
        "a real flood: {} requests",
        statuses.len()
    );
}
