//! Live config: the filter fetches the control plane's edge feed itself and publishes it to every
//! worker through shared data. Real control plane (`keygate-control`), real Envoy, real sockets.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use keygate_e2e::{ControlPlane, Echo, Envoy, EnvoyBuilder, Req, Response};
use serde_json::json;

const WORKERS: u32 = 4;

fn start_envoy(cp: &ControlPlane, echo: &Echo, extra: serde_json::Value) -> Envoy {
    EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(extra))
        .cluster("keygate_control", cp.port())
        .concurrency(WORKERS)
        .upstream_port(echo.port())
        .start()
}

/// Polls `f` every 50 ms until it returns true or `limit` passes; returns the time it took.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn calls_path(cp: &ControlPlane) -> String {
    format!("/v2/accounts/{}/calls", cp.account_sid())
}

/// Creates a key through the Twilio-compatible API; returns (sid, secret).
fn create_key(cp: &ControlPlane, key_type: &str) -> (String, String) {
    let path = format!("/2010-04-01/Accounts/{}/Keys.json", cp.account_sid());
    let r = cp.send(
        &cp.as_account(Req::post(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("FriendlyName=e2e&KeyType={key_type}")),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.body_json();
    (
        v["sid"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

fn delete_key(cp: &ControlPlane, sid: &str) {
    let path = format!("/2010-04-01/Accounts/{}/Keys/{sid}.json", cp.account_sid());
    let r = cp.send(&cp.as_account(Req::delete(path)));
    assert_eq!(r.status, 204, "{r:?}");
}

/// Sends `n` requests on fresh connections (spread over Envoy's workers).
fn statuses(envoy: &Envoy, req: &Req, n: usize) -> Vec<u16> {
    (0..n).map(|_| req.send(envoy.port()).status).collect()
}

fn all(envoy: &Envoy, req: &Req, status: u16) -> bool {
    statuses(envoy, req, 2 * WORKERS as usize)
        .iter()
        .all(|s| *s == status)
}

#[test]
fn a_created_key_works_at_the_edge_within_two_seconds_and_a_deleted_one_stops() {
    let cp = ControlPlane::start();
    let echo = Echo::start();
    let envoy = start_envoy(&cp, &echo, json!({}));
    // The initial config arrives first.
    within(Duration::from_secs(10), || {
        Req::get(calls_path(&cp)).send(envoy.port()).status != 503
    })
    .expect("first config");

    let (sid, secret) = create_key(&cp, "main");
    let req = Req::get(calls_path(&cp)).basic(&sid, &secret);
    let took =
        within(Duration::from_secs(10), || all(&envoy, &req, 200)).expect("new key admitted");
    eprintln!("create → admitted on every worker: {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let bearer = Req::get(calls_path(&cp)).bearer(&secret);
    assert!(all(&envoy, &bearer, 200));

    delete_key(&cp, &sid);
    let took =
        within(Duration::from_secs(10), || all(&envoy, &req, 401)).expect("deleted key refused");
    eprintln!("delete → refused on every worker: {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    assert!(all(&envoy, &bearer, 401));
    assert!(envoy.custom_metric("keygate.config.published").unwrap_or(0) >= 3);
    let r: Response = Req::get(calls_path(&cp))
        .basic(&sid, &secret)
        .send(envoy.port());
    assert_eq!(r.body_json()["error"]["code"], "invalid_credentials");
}
