//! Shared data stays bounded under churn: Envoy's shared data cannot delete a key, so what the
//! edge publishes must not leave a name (or a value) behind for every key and secret that ever
//! existed.
//!
//! A real control plane and a real Envoy (2 workers). Keys go through create → regenerate
//! (grace 0) → delete, in batches of [`BATCH`]; after each step the test waits until the edge
//! has that step in force (the batch's last key admitted, admitted with its new secret, refused),
//! so every key, each of its two secrets and its deletion were published in both slots. Envoy's
//! admin `/memory` (allocated bytes: shared data lives in Envoy's heap; the VMs' linear memory
//! does not count there) is sampled after the warm-up ([`WARM_UP`] cycles) and at the end: the
//! growth between must stay under [`TOLERANCE`]. Measured (2 cores, debug control plane, 71 s):
//! +44 KB from cycle 2,000 to 10,000. The layout before buckets (a name per SID and per Bearer
//! digest, tombstones and rotated-out digests kept) grew by 10.3 MB (1.3 KB a cycle) and fails.
//!
//! `KEYGATE_CHURN_CYCLES` overrides the number of cycles (10,000).
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::thread;
use std::time::{Duration, Instant};

use keygate_e2e::{ControlPlane, Echo, Envoy, EnvoyBuilder, Req, Response};
use serde_json::json;

const CYCLES: usize = 10_000;
const WARM_UP: usize = 2_000;
const BATCH: usize = 100;
/// Control-plane calls in flight at once.
const CALLERS: usize = 4;
const TOLERANCE: i64 = 1024 * 1024;

fn cycles() -> usize {
    std::env::var("KEYGATE_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES)
}

/// Sends `req` as if from a client address no other request used (a trusted hop's
/// `X-Forwarded-For`), so the failed-authentication limit never refuses the probes of revoked
/// keys.
fn send(envoy: &Envoy, req: &Req) -> Response {
    req.send_from_new_client(envoy.port())
}

/// Polls until the edge answers `status` to `req`.
fn wait_for(envoy: &Envoy, req: &Req, status: u16, what: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if send(envoy, req).status == status {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("{what}: never {status}\n{}", envoy.logs());
}

fn allocated(envoy: &Envoy) -> i64 {
    let memory = envoy.admin_get("/memory").body_json();
    memory["allocated"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .or_else(|| memory["allocated"].as_i64())
        .unwrap_or_else(|| panic!("no allocated bytes in /memory: {memory}"))
}

/// Runs `f` over `items` on [`CALLERS`] threads; results in order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(CALLERS).max(1);
    thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(|| c.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("caller thread"))
            .collect()
    })
}

#[test]
fn shared_data_stays_flat_through_create_regenerate_delete_churn() {
    let cycles = cycles();
    // The control plane's own per-credential rate (600 a minute by default) is not what this
    // test is about: it makes three calls a cycle as fast as it can. (The one test of this
    // binary: nothing else reads the environment meanwhile.)
    std::env::set_var("KEYGATE_CREDENTIAL_RATE", "off");
    let cp = ControlPlane::start();
    cp.patch_account(json!({"limits": {"rate": {"requests": 1_000_000, "per": "1m"}}}));
    let echo = Echo::start();
    let envoy = EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(json!({})))
        .cluster("keygate_control", cp.port())
        .concurrency(2)
        .upstream_port(echo.port())
        .use_remote_address(true)
        .xff_num_trusted_hops(1)
        .start();
    let calls = format!("/v2/accounts/{}/calls", cp.account_sid());
    let probe = |sid: &str, secret: &str| Req::get(&calls).basic(sid, secret);
    let steady = cp.create_key_v1(json!({"role": "main", "friendly_name": "steady"}));
    wait_for(&envoy, &probe(&steady.0, &steady.1), 200, "steady key");

    let started = Instant::now();
    let mut warm = None;
    let mut done = 0;
    while done < cycles {
        let n = BATCH.min(cycles - done);
        let created: Vec<(String, String)> = parallel(&vec![(); n], |_| {
            cp.create_key_v1(json!({"role": "standard", "friendly_name": "churn"}))
        });
        let (last, first_secret) = created.last().cloned().unwrap();
        wait_for(&envoy, &probe(&last, &first_secret), 200, "created");
        let regenerated: Vec<String> = parallel(&created, |(sid, _)| {
            let r = cp.regenerate_key(sid, 0);
            r["secret"].as_str().expect("new secret").to_owned()
        });
        let second_secret = regenerated.last().cloned().unwrap();
        wait_for(&envoy, &probe(&last, &second_secret), 200, "regenerated");
        wait_for(&envoy, &probe(&last, &first_secret), 401, "old secret");
        parallel(&created, |(sid, _)| cp.delete_key(sid));
        wait_for(&envoy, &probe(&last, &second_secret), 401, "deleted");
        done += n;
        if done == WARM_UP.min(cycles) && warm.is_none() {
            warm = Some((done, allocated(&envoy), started.elapsed()));
        }
    }
    let end = allocated(&envoy);
    let (at, warm_bytes, warm_time) = warm.unwrap();
    let growth = end - warm_bytes;
    eprintln!(
        "{cycles} cycles in {:?} ({at} cycles in {warm_time:?}); /memory allocated {warm_bytes} after {at}, {end} at {cycles}: {growth:+} bytes ({:+.1} per cycle)",
        started.elapsed(),
        growth as f64 / (cycles - at).max(1) as f64,
    );
    wait_for(
        &envoy,
        &probe(&steady.0, &steady.1),
        200,
        "steady key at the end",
    );
    assert_eq!(
        envoy.custom_metric("keygate.config.rejected").unwrap_or(0),
        0
    );
    assert!(
        growth < TOLERANCE,
        "shared data grew by {growth} bytes from cycle {at} to {cycles} (tolerance {TOLERANCE})"
    );
}
