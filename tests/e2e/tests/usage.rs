//! Usage from the edge, end to end: a real control plane (SQLite) and a real Envoy of four
//! workers in control-plane mode. Every request goes through the filter; the VMs count in their
//! memory, add their counts into shared data on the tick, and the elected poller sends batches
//! to `POST /v1/edge/usage`.
//!
//! - Counts at the control plane equal what the echo upstream received (allowed) and the
//!   denials the clients were sent (by reason), within 10 s of the last request (the README's
//!   bound), through a `kill -9` and restart of the control plane in the middle of the traffic:
//!   nothing lost (the README: only an Envoy process that exits loses counts) and nothing counted
//!   twice (the counts stay equal after further send periods).
//! - After a regeneration with grace, the new secret's `last_used_at` appears while the old
//!   one's stops moving once clients stop presenting it.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate_e2e::wait::within;
use keygate_e2e::{ControlPlane, Echo, Envoy, EnvoyBuilder, Req};
use serde_json::{json, Value};

const WORKERS: u32 = 4;
/// Client threads (each request on its own connection, so they spread over the workers).
const CLIENTS: usize = 8;

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Unix seconds as the control plane writes them: `2026-11-24T10:00:00Z`.
fn rfc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// The inverse of [`rfc`].
fn parse_rfc(text: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| -> i64 { text[r].parse().unwrap() };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

/// What the clients were answered: 200s, and refusals by reason code.
#[derive(Default, Debug, Clone, PartialEq)]
struct Seen {
    allowed: u64,
    denied: BTreeMap<String, u64>,
}

/// Sends `n` requests of `req` from [`CLIENTS`] threads; tallies the answers into `seen`.
fn send_many(envoy: &Envoy, req: &Req, n: usize, seen: &Mutex<Seen>) {
    thread::scope(|s| {
        for c in 0..CLIENTS {
            let share = n / CLIENTS + usize::from(c < n % CLIENTS);
            s.spawn(move || {
                for _ in 0..share {
                    let r = req.send(envoy.port());
                    let mut seen = seen.lock().unwrap();
                    if r.status == 200 {
                        seen.allowed += 1;
                    } else {
                        let code = r.body_json()["error"]["code"]
                            .as_str()
                            .unwrap_or_else(|| panic!("{r:?}"))
                            .to_owned();
                        *seen.denied.entry(code).or_default() += 1;
                    }
                }
            });
        }
    });
}

/// The control plane's counts of `key_sid` summed over every minute bucket since `from`.
fn usage(cp: &ControlPlane, key_sid: &str, from: i64) -> Option<Seen> {
    let path = format!(
        "/v1/accounts/{}/usage?key_sid={key_sid}&from={}&to={}",
        cp.account_sid(),
        rfc(from - from % 60),
        rfc(now_s() + 60)
    );
    let r = cp.try_send(&cp.as_account(Req::get(path))).ok()?;
    assert_eq!(r.status, 200, "{r:?}");
    let mut total = Seen::default();
    for b in r.body_json()["buckets"].as_array().unwrap() {
        total.allowed += b["allowed"].as_u64().unwrap();
        for (reason, n) in b["denied"].as_object().unwrap() {
            *total.denied.entry(reason.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    Some(total)
}

fn key_json(cp: &ControlPlane, sid: &str) -> Value {
    let path = format!("/v1/accounts/{}/keys/{sid}", cp.account_sid());
    let r = cp.send(&cp.as_account(Req::get(path)));
    assert_eq!(r.status, 200, "{r:?}");
    r.body_json()
}

/// `(current secret's last_used_at, previous secret's)` as unix seconds.
fn last_uses(cp: &ControlPlane, sid: &str) -> (Option<i64>, Option<i64>) {
    let k = key_json(cp, sid);
    let at = |current: bool| {
        k["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["current"] == current)
            .and_then(|s| s["last_used_at"].as_str())
            .map(parse_rfc)
    };
    (at(true), at(false))
}

fn start() -> (ControlPlane, Echo, Envoy) {
    let cp = ControlPlane::start();
    // Room for the test's traffic: the account's own rate is not what is tested.
    cp.patch_account(json!({"limits": {"rate": {"requests": 1_000_000, "per": "1m"}}}));
    let echo = Echo::start_counting();
    let envoy = EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(json!({"edge_id": "e2e-usage"})))
        .cluster("keygate_control", cp.port())
        .upstream_port(echo.port())
        .concurrency(WORKERS)
        .no_access_log()
        .start();
    (cp, echo, envoy)
}

#[test]
fn times_are_written_as_the_control_plane_writes_them() {
    assert_eq!(rfc(1_795_514_400), "2026-11-24T10:00:00Z");
    assert_eq!(rfc(951_782_399), "2000-02-28T23:59:59Z");
    for t in [0, 951_868_800, 1_795_514_400, 4_102_444_799] {
        assert_eq!(parse_rfc(&rfc(t)), t);
    }
}

fn wait_admitted(envoy: &Envoy, req: &Req) {
    let ok = within(Duration::from_secs(30), || {
        req.send(envoy.port()).status == 200
    });
    assert!(ok.is_some(), "never admitted\n{}", envoy.logs());
}

#[test]
fn counts_equal_what_the_upstream_received_and_the_denials_sent_through_a_control_plane_restart() {
    let (mut cp, echo, envoy) = start();
    let from = now_s();
    // A key with its own rate (so some of its requests are refused), and one whose APIs do not
    // include `calls` (every request refused after authentication).
    let (key, secret) = cp.create_key_v1(json!({
        "role": "standard",
        // A day's period (one request refills every 2 min): nothing refills during the test.
        "limits": {"rate": {"requests": 700, "per": "24h"}}
    }));
    let (narrow, narrow_secret) =
        cp.create_key_v1(json!({"role": "standard", "apis": ["messages"]}));
    let req = Req::get(cp.calls_path()).basic(&key, &secret);
    let refused = Req::get(cp.calls_path()).basic(&narrow, &narrow_secret);
    let seen = Mutex::new(Seen::default());
    let refused_seen = Mutex::new(Seen::default());
    // The probe that waits for the key counts too.
    wait_admitted(&envoy, &req);
    seen.lock().unwrap().allowed += 1;
    echo_settles(&echo, 1);

    send_many(&envoy, &req, 300, &seen);
    send_many(&envoy, &refused, 40, &refused_seen);
    // The control plane goes away (kill -9) with batches in flight and counts piling up at the
    // edge, which keeps serving the config it holds; then it comes back on the same database.
    cp.kill();
    send_many(&envoy, &req, 300, &seen);
    send_many(&envoy, &refused, 40, &refused_seen);
    thread::sleep(Duration::from_secs(3));
    cp.restart();
    send_many(&envoy, &req, 300, &seen);
    send_many(&envoy, &refused, 40, &refused_seen);

    let seen = seen.into_inner().unwrap();
    let refused_seen = refused_seen.into_inner().unwrap();
    // The probe and 900 more: the key's rate admits 700 in the day.
    assert_eq!(seen.allowed, 700, "{seen:?}");
    assert_eq!(seen.denied.get("rate_limited_key"), Some(&201), "{seen:?}");
    assert_eq!(echo_settles(&echo, seen.allowed), seen.allowed);
    assert_eq!(refused_seen.allowed, 0);
    assert_eq!(refused_seen.denied.get("permission_denied"), Some(&120));

    let arrived = within(Duration::from_secs(10), || {
        usage(&cp, &key, from).as_ref() == Some(&seen)
            && usage(&cp, &narrow, from).as_ref() == Some(&refused_seen)
    });
    assert!(
        arrived.is_some(),
        "control plane: {:?} and {:?}; clients saw {seen:?} and {refused_seen:?}\n{}",
        usage(&cp, &key, from),
        usage(&cp, &narrow, from),
        envoy.logs()
    );
    // The restart was felt: the edge's sends failed while the control plane was down.
    assert!(
        envoy.logs().contains("usage batch not acknowledged"),
        "{}",
        envoy.logs()
    );
    // Nothing is counted twice: after several more send periods (and retries) the counts are
    // the same.
    thread::sleep(Duration::from_secs(5));
    assert_eq!(usage(&cp, &key, from), Some(seen.clone()));
    assert_eq!(usage(&cp, &narrow, from), Some(refused_seen));
    // The hourly buckets hold the same totals.
    let path = format!(
        "/v1/accounts/{}/usage?bucket=1h&key_sid={key}&from={}&to={}",
        cp.account_sid(),
        rfc(from - 3600),
        rfc(now_s() + 3600)
    );
    let hours = cp.send(&cp.as_account(Req::get(path))).body_json();
    let allowed: u64 = hours["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["allowed"].as_u64().unwrap())
        .sum();
    assert_eq!(allowed, seen.allowed);
}

/// Waits until the echo received `n` requests (it may still be reading the last ones); returns
/// what it received.
fn echo_settles(echo: &Echo, n: u64) -> u64 {
    let _ = within(Duration::from_secs(5), || echo.received() >= n);
    echo.received()
}

#[test]
fn after_a_regeneration_the_new_secrets_last_use_appears_and_the_old_ones_stops() {
    let (cp, _echo, envoy) = start();
    let (key, old) = cp.create_key_v1(json!({"role": "standard"}));
    let with_old = Req::get(cp.calls_path()).basic(&key, &old);
    wait_admitted(&envoy, &with_old);
    let seen = Mutex::new(Seen::default());
    send_many(&envoy, &with_old, 20, &seen);
    let used_old = now_s();
    let appeared = within(Duration::from_secs(10), || {
        last_uses(&cp, &key).0.is_some_and(|t| t >= used_old - 1)
    });
    assert!(appeared.is_some(), "{}", key_json(&cp, &key));
    assert_eq!(
        key_json(&cp, &key)["last_used_at"],
        key_json(&cp, &key)["secrets"][0]["last_used_at"]
    );

    // Regenerate with an hour's grace: both secrets work; clients move to the new one.
    let new = cp.regenerate_key(&key, 3600)["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let (none_yet, old_last) = last_uses(&cp, &key);
    assert_eq!(none_yet, None, "the new secret has not been used");
    let old_last = old_last.expect("the old secret keeps its last use");
    let with_new = Req::get(cp.calls_path()).basic(&key, &new);
    wait_admitted(&envoy, &with_new);
    // A second later (so the two are told apart), only the new secret is presented.
    thread::sleep(Duration::from_millis(1100));
    send_many(&envoy, &with_new, 20, &seen);
    let used_new = now_s();
    let appeared = within(Duration::from_secs(10), || {
        last_uses(&cp, &key).0.is_some_and(|t| t >= used_new - 1)
    });
    assert!(appeared.is_some(), "{}", key_json(&cp, &key));
    // Several send periods later the old secret's last use has not moved.
    thread::sleep(Duration::from_secs(3));
    let (new_last, still_old) = last_uses(&cp, &key);
    assert_eq!(still_old, Some(old_last));
    assert!(new_last.unwrap() > old_last);
    let k = key_json(&cp, &key);
    assert_eq!(k["last_used_at"], json!(rfc(new_last.unwrap())));
    assert_eq!(seen.into_inner().unwrap().allowed, 40);
}
