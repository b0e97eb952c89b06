//! Fleet-wide limits with leases (issue 14): two real Envoy edges of four workers each, one real
//! keygate-ratelimit following a real control plane's export, one real Redis (keygate-redistest).
//!
//! - An account limited to 60 a minute fleet-wide, hit by 400 requests spread over both edges at
//!   once: at most 60 admitted and at least 60 − 8 × 3 (8 VMs each holding at most
//!   `max(1, 60 / 16)` leased hits unspent: the bound keygate_core::fleet::lease documents); the
//!   upstream receives exactly what was admitted; the rest get 429 `rate_limited_account`.
//! - The same for a key × API limit (429 `rate_limited_api`).
//! - Redis stopped: 503 `limiter_unavailable` with `Retry-After` (`on_store_error: deny`, the
//!   default), while the local tier still answers in front (a key over its local rate gets 429
//!   `rate_limited_key`); Redis back on the same port: admitted again, nothing restarted.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use keygate_e2e::{wait, ControlPlane, Echo, Envoy, EnvoyBuilder, RateLimitService, Req};
use keygate_redistest::RedisServer;
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(20);
const WORKERS: u32 = 4;

/// An edge of `workers` workers fed by `cp`, its fleet limits leased from `rls`.
fn edge(cp: &ControlPlane, rls: &RateLimitService, echo: &Echo, fleet: Value) -> Envoy {
    let mut config = cp.plugin_config(json!({}));
    config["fleet_limits"] = fleet;
    EnvoyBuilder::new()
        .plugin_config_json(&config)
        .cluster("keygate_control", cp.port())
        .grpc_cluster("keygate_ratelimit", rls.grpc_port())
        .upstream_port(echo.port())
        .concurrency(WORKERS)
        .start()
}

fn lease_config() -> Value {
    json!({"cluster": "keygate_ratelimit"})
}

/// Waits until `edge` judges with the control plane's config (a wrong secret gets 401, not the
/// 503 of no config yet): no request of the test's keys is spent on it.
fn until_configured(edge: &Envoy, cp: &ControlPlane, sid: &str) {
    let ok = wait::within(SETTLE, || {
        Req::get(cp.calls_path())
            .basic(sid, "not-the-secret")
            .send_from_new_client(edge.port())
            .status
            == 401
    });
    assert!(ok.is_some(), "edge never got its config:\n{}", edge.logs());
}

/// Per status: how many, and the error codes seen.
type Seen = BTreeMap<u16, (usize, Vec<String>)>;

/// `total` requests with `(sid, secret)` on `path`, from 16 threads alternating the edges:
/// status → (count, the error codes seen).
fn burst(edges: &[&Envoy], path: &str, (sid, secret): &(String, String), total: usize) -> Seen {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let ports: Vec<u16> = edges.iter().map(|e| e.port()).collect();
    let threads = 16;
    thread::scope(|s| {
        for t in 0..threads {
            let (seen, ports) = (seen.clone(), ports.clone());
            s.spawn(move || {
                for i in 0..total / threads {
                    let port = ports[(t + i) % ports.len()];
                    let r = Req::get(path).basic(sid, secret).send(port);
                    let code = serde_json::from_slice::<Value>(&r.body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let mut seen = seen.lock().unwrap();
                    let e = seen.entry(r.status).or_default();
                    e.0 += 1;
                    if !e.1.contains(&code) {
                        e.1.push(code);
                    }
                }
            });
        }
    });
    Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
}

fn fleet_calls(edges: &[&Envoy]) -> u64 {
    edges
        .iter()
        .map(|e| e.custom_metric("keygate.fleet.calls").unwrap_or(0))
        .sum()
}

/// The lower bound of what a window admits under full demand: 60 − 8 VMs × max(1, 60 / 16).
const AT_LEAST: usize = 60 - 8 * 3;

/// A stack of two edges of four workers, one keygate-ratelimit and one Redis for a control plane
/// whose account gets `account` (a PATCH, if any) and a key made of `key`; 400 requests of that
/// key spread over both edges at once: between [`AT_LEAST`] and 60 admitted, exactly those
/// reach the upstream, the rest get 429 `refusal`, with far fewer remote calls than requests.
fn holds_across_two_edges(account: Option<Value>, key: Value, refusal: &str) {
    let redis = RedisServer::start().expect("redis");
    let cp = ControlPlane::start();
    if let Some(body) = account {
        cp.patch_account(body);
    }
    let key = cp.create_key_v1(key);
    let rls = RateLimitService::start(&redis.url(), &cp);
    let echo = Echo::start();
    let a = edge(&cp, &rls, &echo, lease_config());
    let b = edge(&cp, &rls, &echo, lease_config());
    until_configured(&a, &cp, &key.0);
    until_configured(&b, &cp, &key.0);
    echo.clear();

    let seen = burst(&[&a, &b], &cp.calls_path(), &key, 400);
    let admitted = seen.get(&200).map_or(0, |s| s.0);
    let refused = seen.get(&429).cloned().unwrap_or_default();
    let calls = fleet_calls(&[&a, &b]);
    eprintln!("admitted {admitted} of 400 ({seen:?}); {calls} calls to the service");
    assert!(
        (AT_LEAST..=60).contains(&admitted),
        "admitted {admitted}: {seen:?}"
    );
    assert_eq!(admitted + refused.0, 400, "{seen:?}");
    assert_eq!(refused.1, vec![refusal.to_owned()]);
    assert_eq!(
        echo.captured().len(),
        admitted,
        "the upstream got exactly the admitted requests"
    );
    assert!(calls < 400, "{calls} calls");
}

#[test]
fn an_account_limit_holds_across_two_edges_of_four_workers() {
    holds_across_two_edges(
        Some(json!({"limits": {"rate": {"requests": 60, "per": "1m", "scope": "fleet"}}})),
        json!({"role": "main"}),
        "rate_limited_account",
    );
}

#[test]
fn a_key_api_limit_holds_across_two_edges_of_four_workers() {
    holds_across_two_edges(
        None,
        json!({
            "role": "main",
            "limits": {"apis": {"calls": {"requests": 60, "per": "1m", "scope": "fleet"}}}
        }),
        "rate_limited_api",
    );
}

#[test]
fn redis_down_denies_with_limiter_unavailable_and_the_local_tier_still_answers() {
    let mut redis = RedisServer::start().expect("redis");
    let cp = ControlPlane::start();
    cp.patch_account(
        json!({"limits": {"rate": {"requests": 100000, "per": "1m", "scope": "fleet"}}}),
    );
    let key = cp.create_key_v1(json!({"role": "main"}));
    let local = cp.create_key_v1(json!({
        "role": "main",
        "limits": {"rate": {"requests": 2, "per": "1m"}}
    }));
    let rls = RateLimitService::start(&redis.url(), &cp);
    let echo = Echo::start();
    // Leases of one hit: every request asks the service.
    let a = edge(
        &cp,
        &rls,
        &echo,
        json!({"cluster": "keygate_ratelimit", "max_lease": 1}),
    );
    until_configured(&a, &cp, &key.0);
    let get = |(sid, secret): &(String, String)| {
        Req::get(cp.calls_path()).basic(sid, secret).send(a.port())
    };
    assert_eq!(get(&key).status, 200);
    assert_eq!(get(&local).status, 200);
    assert_eq!(get(&local).status, 200);

    redis.stop().expect("stop redis");
    let r = get(&key);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.body_json()["error"]["code"],
        "limiter_unavailable",
        "{r:?}"
    );
    assert_eq!(r.header_str("retry-after"), Some("1"));
    // The local tier is in front: the key over its own local rate is refused by it.
    let r = get(&local);
    assert_eq!(
        (r.status, r.body_json()["error"]["code"].clone()),
        (429, json!("rate_limited_key"))
    );
    assert!(a.custom_metric("keygate.fleet.errors").unwrap_or(0) >= 1);

    redis.start_again().expect("start redis again");
    let back = wait::within(SETTLE, || get(&key).status == 200);
    assert!(
        back.is_some(),
        "fleet limits never came back:\n{}",
        rls.logs()
    );
}

#[test]
fn a_hot_account_takes_its_leases_ahead_and_its_requests_do_not_wait_for_them() {
    let redis = RedisServer::start().expect("redis");
    let cp = ControlPlane::start();
    cp.patch_account(
        json!({"limits": {"rate": {"requests": 1_000_000, "per": "1m", "scope": "fleet"}}}),
    );
    // Its own local rate out of the way (the catalogue gives main keys 200 a minute).
    let key = cp.create_key_v1(
        json!({"role": "main", "limits": {"rate": {"requests": 1_000_000, "per": "1m"}}}),
    );
    let rls = RateLimitService::start(&redis.url(), &cp);
    let echo = Echo::start();
    let mut config = cp.plugin_config(json!({}));
    config["fleet_limits"] = lease_config();
    let a = EnvoyBuilder::new()
        .plugin_config_json(&config)
        .cluster("keygate_control", cp.port())
        .grpc_cluster("keygate_ratelimit", rls.grpc_port())
        .upstream_port(echo.port())
        .start();
    until_configured(&a, &cp, &key.0);
    for _ in 0..400 {
        let r = Req::get(cp.calls_path())
            .basic(&key.0, &key.1)
            .send(a.port());
        assert_eq!(r.status, 200, "{r:?}");
    }
    let (calls, waits) = (
        a.custom_metric("keygate.fleet.calls").unwrap_or(0),
        a.custom_metric("keygate.fleet.waits").unwrap_or(0),
    );
    let leased = a.custom_metric("keygate.fleet.hits_leased").unwrap_or(0);
    eprintln!("400 requests: {calls} calls, {waits} waited, {leased} hits leased");
    // Leases of 100, the next asked for when one is half spent: 4 or 5 calls, and only the very
    // first request waited for a lease.
    assert!((4..=5).contains(&calls), "{calls} calls");
    assert_eq!(waits, 1);
    assert_eq!(leased, 100 * calls);
}
