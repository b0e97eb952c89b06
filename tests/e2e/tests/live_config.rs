//! Live config: the filter fetches the control plane's edge feed itself and publishes it to every
//! worker through shared data. Real control plane (`keygate-control`), real Envoy (4 workers),
//! real sockets; a fault-injecting proxy ([`FaultyProxy`]) where the feed must go wrong.
//!
//! Every test ends with a leak scan: no secret or token created in the test appears in Envoy's
//! log or access log, the control plane's log or database files, or any request an upstream
//! received (the create and regenerate responses are the only place they may appear).

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate_e2e::faulty::{Fault, FaultyProxy};
use keygate_e2e::wait::within;
use keygate_e2e::{CapturedRequest, ControlPlane, Echo, Envoy, EnvoyBuilder, Req, Response};
use serde_json::json;

const WORKERS: u32 = 4;

/// Envoy whose `keygate_control` cluster is 127.0.0.1:`feed_port` (the control plane itself, or
/// a proxy in front of it).
fn start_envoy_via(
    feed_port: u16,
    cp: &ControlPlane,
    echo: &Echo,
    extra: serde_json::Value,
) -> Envoy {
    EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(extra))
        .cluster("keygate_control", feed_port)
        .concurrency(WORKERS)
        .upstream_port(echo.port())
        .use_remote_address(true)
        .xff_num_trusted_hops(1)
        .start()
}

fn start_envoy(cp: &ControlPlane, echo: &Echo, extra: serde_json::Value) -> Envoy {
    start_envoy_via(cp.port(), cp, echo, extra)
}

/// A rate no test reaches: these tests poll the edge many times a second, and the catalogue's
/// defaults (200 a minute per key and per account) are not what they test.
fn unlimited() -> serde_json::Value {
    json!({"requests": 1_000_000, "per": "1m"})
}

/// Lifts the first account's rate limit (admin `PATCH`).
fn lift_account_limit(cp: &ControlPlane) {
    cp.patch_account(json!({"limits": {"rate": unlimited()}}));
}

/// Creates a key with `role` and no practical rate limit; returns `(sid, secret)`.
fn create_key(cp: &ControlPlane, role: &str) -> (String, String) {
    cp.create_key_v1(json!({"role": role, "friendly_name": "e2e", "limits": {"rate": unlimited()}}))
}

fn basic(cp: &ControlPlane, sid: &str, secret: &str) -> Req {
    Req::get(cp.calls_path()).basic(sid, secret)
}

/// Sends `req` as if from a client address no other request used (a trusted hop's
/// `X-Forwarded-For`), so the per-address failed-authentication limit (30 a minute in the
/// control plane's catalogue) never refuses the test's own probes of revoked keys.
fn send(envoy: &Envoy, req: &Req) -> Response {
    req.send_from_new_client(envoy.port())
}

/// Sends `n` requests on fresh connections (spread over Envoy's workers).
fn responses(envoy: &Envoy, req: &Req, n: usize) -> Vec<Response> {
    (0..n).map(|_| send(envoy, req)).collect()
}

fn statuses(envoy: &Envoy, req: &Req, n: usize) -> Vec<u16> {
    responses(envoy, req, n).iter().map(|r| r.status).collect()
}

/// Every one of 2 × WORKERS fresh connections gets `status`.
fn all(envoy: &Envoy, req: &Req, status: u16) -> bool {
    statuses(envoy, req, 2 * WORKERS as usize)
        .iter()
        .all(|s| *s == status)
}

fn metric(envoy: &Envoy, name: &str) -> u64 {
    envoy.custom_metric(name).unwrap_or(0)
}

/// Waits for the first config (the account's path stops answering 503).
fn wait_first_config(envoy: &Envoy, cp: &ControlPlane) {
    within(Duration::from_secs(15), || {
        send(envoy, &Req::get(cp.calls_path())).status != 503
    })
    .unwrap_or_else(|| panic!("no first config; Envoy log:\n{}", envoy.logs()));
}

fn version_header(r: &Response) -> Option<u64> {
    r.header_str("x-keygate-config-version")?.parse().ok()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `YYYY-MM-DDTHH:MM:SSZ` → Unix seconds.
fn parse_rfc3339_utc(s: &str) -> u64 {
    let n = |r: std::ops::Range<usize>| -> i64 { s[r].parse().unwrap() };
    assert!(s.len() == 20 && s.ends_with('Z'), "not RFC 3339 UTC: {s}");
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)).unwrap()
}

/// Fails if any of `secrets` appears in Envoy's log or access log, the control plane's log or
/// database files, or a request the echo upstream or the proxy received; and if the edge token
/// appears in Envoy's logs or at the echo upstream (the proxy sees it by design: it is the
/// feed's credential).
fn assert_no_leaks(
    secrets: &[&str],
    cp: &ControlPlane,
    envoy: &Envoy,
    echo: &Echo,
    proxy: Option<&FaultyProxy>,
) {
    let edge_token = cp.cred("KEYGATE_EDGE_TOKEN");
    let mut all: Vec<&str> = secrets.to_vec();
    all.extend([cp.cred("AUTH_TOKEN"), cp.cred("KEYGATE_ADMIN_TOKEN")]);
    let requests = |reqs: &[CapturedRequest]| -> Vec<u8> {
        let mut out = Vec::new();
        for r in reqs {
            out.extend(r.path.as_bytes());
            for (n, v) in &r.headers {
                out.extend(n.as_bytes());
                out.extend(v);
                // Basic credentials are base64: scan the decoded form too.
                if let Some(b64) = v.strip_prefix(b"Basic ") {
                    use base64::Engine as _;
                    if let Ok(d) = base64::engine::general_purpose::STANDARD.decode(b64) {
                        out.extend(d);
                    }
                }
            }
            out.extend(&r.body);
        }
        out
    };
    let echo_seen = requests(&echo.captured());
    let proxy_seen = proxy.map(|p| requests(&p.captured())).unwrap_or_default();
    let places: [(&str, Vec<u8>); 6] = [
        ("Envoy's log", envoy.logs().into_bytes()),
        ("Envoy's access log", envoy.access_log().into_bytes()),
        ("the control plane's log", cp.logs().into_bytes()),
        ("the control plane's database", cp.database_bytes()),
        ("requests the echo upstream received", echo_seen),
        ("requests the feed proxy received", proxy_seen),
    ];
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    for (place, bytes) in &places {
        for s in &all {
            assert!(!s.is_empty());
            assert!(
                !contains(bytes, s),
                "a secret ({}…) leaked into {place}",
                &s[..12]
            );
        }
    }
    // The scan reads real data: the proxy saw the edge token (its Bearer credential), the logs
    // are not empty.
    if proxy.is_some() {
        assert!(
            contains(&places[5].1, edge_token),
            "the scan misses the feed requests"
        );
    }
    for (place, bytes) in &places[..4] {
        assert!(!bytes.is_empty(), "nothing to scan in {place}");
    }
    for (place, bytes) in &places[..2] {
        assert!(
            !contains(bytes, edge_token),
            "the edge token leaked into {place}"
        );
    }
    assert!(
        !contains(&places[4].1, edge_token),
        "the edge token reached the echo upstream"
    );
}

#[test]
fn a_created_key_works_at_the_edge_within_two_seconds_and_a_deleted_one_stops() {
    let cp = ControlPlane::start();
    let echo = Echo::start();
    let envoy = start_envoy(&cp, &echo, json!({}));
    wait_first_config(&envoy, &cp);

    let (sid, secret) = cp.create_key("main");
    let req = basic(&cp, &sid, &secret);
    let took =
        within(Duration::from_secs(10), || all(&envoy, &req, 200)).expect("new key admitted");
    eprintln!("create → admitted on every worker: {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let bearer = Req::get(cp.calls_path()).bearer(&secret);
    assert!(all(&envoy, &bearer, 200));

    cp.delete_key(&sid);
    let took =
        within(Duration::from_secs(10), || all(&envoy, &req, 401)).expect("deleted key refused");
    eprintln!("delete → refused on every worker: {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    assert!(all(&envoy, &bearer, 401));
    assert!(metric(&envoy, "keygate.config.published") >= 3);
    let r: Response = send(&envoy, &basic(&cp, &sid, &secret));
    assert_eq!(r.body_json()["error"]["code"], "invalid_credentials");
    assert_no_leaks(&[&secret], &cp, &envoy, &echo, None);
}

#[test]
fn a_regenerated_key_takes_both_secrets_until_the_grace_deadline_then_only_the_new_one() {
    let cp = ControlPlane::start();
    lift_account_limit(&cp);
    let echo = Echo::start();
    let envoy = start_envoy(&cp, &echo, json!({}));
    wait_first_config(&envoy, &cp);
    let (sid, old) = create_key(&cp, "standard");
    let old_req = basic(&cp, &sid, &old);
    within(Duration::from_secs(10), || all(&envoy, &old_req, 200)).expect("key admitted");

    let rotated = cp.regenerate_key(&sid, 3);
    let new = rotated["secret"].as_str().unwrap().to_owned();
    let not_after = rotated["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] == false)
        .and_then(|s| s["not_after"].as_str())
        .map(parse_rfc3339_utc)
        .unwrap_or_else(|| panic!("no previous secret with not_after: {rotated}"));
    let new_req = basic(&cp, &sid, &new);
    let took = within(Duration::from_secs(10), || all(&envoy, &new_req, 200))
        .expect("new secret admitted");
    eprintln!("regenerate → new secret admitted on every worker: {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let left = not_after as f64 - unix_now();
    assert!(left > 0.5, "grace nearly over already ({left:.2} s left)");
    assert!(
        all(&envoy, &old_req, 200),
        "old secret refused during its grace"
    );
    assert!(all(&envoy, &Req::get(cp.calls_path()).bearer(&new), 200));
    assert!(all(&envoy, &Req::get(cp.calls_path()).bearer(&old), 200));

    // The old secret stops at its deadline, with no further config change.
    within(Duration::from_secs(10), || all(&envoy, &old_req, 401)).expect("old secret refused");
    let late = unix_now() - not_after as f64;
    eprintln!("old secret refused on every worker {late:.2} s after not_after");
    // Edges compare whole seconds: refused from the second after `not_after` at the latest.
    assert!(
        late >= -1.0,
        "refused {:.2} s before its grace ended",
        -late
    );
    assert!(
        late <= 2.0,
        "still admitted {late:.2} s after its grace ended"
    );
    assert!(all(&envoy, &Req::get(cp.calls_path()).bearer(&old), 401));
    let after = responses(&envoy, &new_req, 2 * WORKERS as usize);
    assert!(
        after.iter().all(|r| r.status == 200),
        "new secret must keep working: {:?}",
        after
            .iter()
            .map(|r| (r.status, r.body_text()))
            .collect::<Vec<_>>()
    );
    assert!(all(&envoy, &Req::get(cp.calls_path()).bearer(&new), 200));
    assert_no_leaks(&[&old, &new], &cp, &envoy, &echo, None);
}

#[test]
fn with_the_control_plane_down_the_edge_keeps_its_config_backs_off_and_catches_up_after_restart() {
    let mut cp = ControlPlane::start();
    lift_account_limit(&cp);
    let echo = Echo::start();
    let envoy = start_envoy(&cp, &echo, json!({}));
    wait_first_config(&envoy, &cp);
    let (kept, kept_secret) = create_key(&cp, "main");
    let (revoked, revoked_secret) = create_key(&cp, "standard");
    let kept_req = basic(&cp, &kept, &kept_secret);
    let revoked_req = basic(&cp, &revoked, &revoked_secret);
    within(Duration::from_secs(10), || all(&envoy, &revoked_req, 200)).expect("keys admitted");
    cp.delete_key(&revoked);
    within(Duration::from_secs(10), || all(&envoy, &revoked_req, 401)).expect("revoked");

    let (fetches0, errors0) = (
        metric(&envoy, "keygate.config.fetches"),
        metric(&envoy, "keygate.config.fetch_errors"),
    );
    cp.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(5) {
        let kept = responses(&envoy, &kept_req, 2 * WORKERS as usize);
        let gone = responses(&envoy, &revoked_req, 2 * WORKERS as usize);
        assert!(
            kept.iter().all(|r| r.status == 200),
            "valid key refused with the control plane down: {kept:?}"
        );
        assert!(
            gone.iter().all(|r| r.status == 401),
            "revoked key not refused with the control plane down: {gone:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (fetches, errors) = (
        metric(&envoy, "keygate.config.fetches") - fetches0,
        metric(&envoy, "keygate.config.fetch_errors") - errors0,
    );
    eprintln!("control plane down 5 s: {fetches} fetches, {errors} fetch errors");
    // The long-poll cut by the kill, then at least one retry 1–3 s later.
    assert!(
        errors >= 2,
        "the poller should keep trying ({errors} errors)"
    );
    assert!(fetches < 10, "no hot loop: {fetches} fetches in 5 s");

    let restarted = Instant::now();
    cp.restart();
    let (sid, secret) = create_key(&cp, "main");
    let created = Instant::now();
    let new_req = basic(&cp, &sid, &secret);
    let took = within(Duration::from_secs(60), || all(&envoy, &new_req, 200))
        .expect("a key created after the restart is admitted without restarting Envoy");
    eprintln!(
        "restart → key created {:?} later → admitted on every worker {took:?} after creation",
        created - restarted
    );
    assert!(
        took <= Duration::from_secs(2),
        "a key created right after the control plane came back took {took:?} to reach the edge \
         (the poller was backing off after {} failed fetches)",
        metric(&envoy, "keygate.config.fetch_errors")
    );
    assert!(all(&envoy, &kept_req, 200));
    assert!(all(&envoy, &revoked_req, 401));
    assert_no_leaks(
        &[&kept_secret, &revoked_secret, &secret],
        &cp,
        &envoy,
        &echo,
        None,
    );
}

#[test]
fn an_envoy_started_before_the_control_plane_answers_no_config_until_it_comes_up() {
    let mut cp = ControlPlane::initialized();
    let echo = Echo::start();
    let envoy = start_envoy(&cp, &echo, json!({}));
    let probe = basic(&cp, "SKnothing", "sk_live_nothing");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for r in responses(&envoy, &probe, WORKERS as usize) {
            assert_eq!(r.status, 503, "{r:?}");
            assert_eq!(r.body_json()["error"]["code"], "no_config");
            assert_eq!(r.header_str("retry-after"), Some("5"), "{r:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(metric(&envoy, "keygate.config.fetch_errors") >= 1);
    assert!(
        echo.captured().is_empty(),
        "nothing reaches the upstream before the first config"
    );

    let started = Instant::now();
    cp.restart();
    lift_account_limit(&cp);
    let (sid, secret) = create_key(&cp, "main");
    let req = basic(&cp, &sid, &secret);
    let took = within(Duration::from_secs(60), || all(&envoy, &req, 200)).unwrap_or_else(|| {
        panic!(
            "no service after the control plane came up:\n{}",
            envoy.logs()
        )
    });
    eprintln!(
        "control plane up → key admitted on every worker after {:?}",
        started.elapsed()
    );
    let _ = took;
    assert_eq!(send(&envoy, &basic(&cp, &sid, "sk_live_wrong")).status, 401);
    assert!(metric(&envoy, "keygate.config.published") >= 1);
    assert_no_leaks(&[&secret], &cp, &envoy, &echo, None);
}

/// One round of a corrupt feed: while `fault` is on, the control plane deletes a key; the edge
/// keeps judging with the version it has (the key still works, the response says which version
/// judged it) and counts the rejection in `counter`; back in pass-through the deletion arrives.
fn corrupt_round(
    cp: &ControlPlane,
    envoy: &Envoy,
    proxy: &FaultyProxy,
    fault: Fault,
    counter: &str,
) -> String {
    let (sid, secret) = create_key(cp, "standard");
    let req = basic(cp, &sid, &secret);
    within(Duration::from_secs(15), || all(envoy, &req, 200)).expect("key admitted");
    let good = cp.feed_version();
    let r = send(envoy, &req);
    assert_eq!(version_header(&r), Some(good), "{r:?}");

    let before = metric(envoy, counter);
    let damaged = proxy.damaged();
    proxy.set_fault(fault);
    cp.delete_key(&sid);
    let deleted_at = cp.feed_version();
    within(Duration::from_secs(10), || metric(envoy, counter) > before)
        .unwrap_or_else(|| panic!("{fault:?}: {counter} did not grow:\n{}", envoy.logs()));
    assert!(
        proxy.damaged() > damaged,
        "{fault:?}: the proxy damaged nothing"
    );
    for r in responses(envoy, &req, 2 * WORKERS as usize) {
        assert_eq!(r.status, 200, "{fault:?} changed the edge: {r:?}");
        assert_eq!(version_header(&r), Some(good), "{fault:?}: {r:?}");
    }
    assert_eq!(envoy.gauge("wasmcustom.keygate.config.version"), Some(good));

    proxy.set_fault(Fault::PassThrough);
    let took = within(Duration::from_secs(20), || all(envoy, &req, 401))
        .unwrap_or_else(|| panic!("{fault:?}: the deletion never arrived:\n{}", envoy.logs()));
    eprintln!(
        "{fault:?}: refused ({counter}), then the deletion arrived {took:?} after pass-through"
    );
    let r = send(envoy, &req);
    // A refusal before authentication does not say which version judged it; the gauge does.
    assert_eq!(version_header(&r), None, "{r:?}");
    assert_eq!(
        envoy.gauge("wasmcustom.keygate.config.version"),
        Some(deleted_at)
    );
    secret
}

/// A real control plane behind a fault-injecting proxy, a 4-worker Envoy reading through it, and
/// a key that stays valid throughout (the document always has a key to damage).
struct FaultyEdge {
    envoy: Envoy,
    echo: Echo,
    proxy: FaultyProxy,
    cp: ControlPlane,
    steady_req: Req,
    /// Every secret created, for the leak scan.
    secrets: Vec<String>,
}

impl FaultyEdge {
    fn start() -> FaultyEdge {
        let cp = ControlPlane::start();
        lift_account_limit(&cp);
        let proxy = FaultyProxy::start(cp.port());
        let echo = Echo::start();
        let envoy = start_envoy_via(
            proxy.port(),
            &cp,
            &echo,
            json!({"debug_version_header": true}),
        );
        wait_first_config(&envoy, &cp);
        let (steady, steady_secret) = create_key(&cp, "main");
        let steady_req = basic(&cp, &steady, &steady_secret);
        within(Duration::from_secs(10), || all(&envoy, &steady_req, 200)).expect("steady key");
        FaultyEdge {
            envoy,
            echo,
            proxy,
            cp,
            steady_req,
            secrets: vec![steady_secret],
        }
    }

    fn round(&mut self, fault: Fault, counter: &str) {
        let secret = corrupt_round(&self.cp, &self.envoy, &self.proxy, fault, counter);
        self.secrets.push(secret);
    }

    /// The steady key still works and no secret leaked anywhere.
    fn finish(&self) {
        assert!(all(&self.envoy, &self.steady_req, 200));
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        assert_no_leaks(
            &secrets,
            &self.cp,
            &self.envoy,
            &self.echo,
            Some(&self.proxy),
        );
    }
}

#[test]
fn malformed_feed_documents_change_nothing_at_the_edge() {
    let mut edge = FaultyEdge::start();
    for fault in [Fault::Truncate, Fault::InvalidJson] {
        edge.round(fault, "keygate.config.rejected");
    }
    // A body cut short by a closed connection never reaches the filter: a fetch error.
    edge.round(Fault::CutConnection, "keygate.config.fetch_errors");
    edge.finish();
}

#[test]
fn older_and_invalid_feed_documents_change_nothing_at_the_edge() {
    let mut edge = FaultyEdge::start();
    for fault in [Fault::ReplayFirst, Fault::FailsValidation] {
        edge.round(fault, "keygate.config.rejected");
    }
    let envoy = &edge.envoy;
    // The rejections are counted; their log lines reach the file with a later flush.
    let logged = |any: &[&str]| {
        within(Duration::from_secs(10), || {
            let logs = envoy.logs();
            any.iter().any(|needle| logs.contains(needle))
        })
        .is_some()
    };
    assert!(
        logged(&["rejected: not newer than"]),
        "replay not logged:\n{}",
        envoy.logs()
    );
    assert!(
        logged(&["allowed_ips[0]", "sid: invalid SID \"SK/../x\""]),
        "the validation error should name the place:\n{}",
        envoy.logs()
    );
    edge.finish();
}

/// A page whose `next` cursor is not a SID after its own cursor is refused before anything is
/// asked for with it: the crafted cursor never reaches a request path, the rejection is counted
/// and logged, and the version in force stays.
#[test]
fn a_crafted_next_cursor_is_refused_and_never_put_in_a_request_path() {
    let mut edge = FaultyEdge::start();
    let crafted = [
        "SK1&known=0&wait=0",
        "SK1/../../v1/accounts",
        "SKxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ];
    for next in crafted {
        // While the fault is on, a deletion is refused (and counted); the key keeps working.
        let (sid, secret) = create_key(&edge.cp, "standard");
        let req = basic(&edge.cp, &sid, &secret);
        within(Duration::from_secs(15), || all(&edge.envoy, &req, 200)).expect("key admitted");
        let before = metric(&edge.envoy, "keygate.config.rejected");
        edge.proxy.set_fault(Fault::CraftedNext(next));
        edge.cp.delete_key(&sid);
        within(Duration::from_secs(10), || {
            metric(&edge.envoy, "keygate.config.rejected") > before
        })
        .unwrap_or_else(|| panic!("{next:?}: not refused:\n{}", edge.envoy.logs()));
        assert!(all(&edge.envoy, &req, 200), "{next:?} changed the edge");
        edge.proxy.set_fault(Fault::PassThrough);
        within(Duration::from_secs(20), || all(&edge.envoy, &req, 401))
            .unwrap_or_else(|| panic!("{next:?}: the deletion never arrived"));
        edge.secrets.push(secret);
    }
    let envoy = &edge.envoy;
    within(Duration::from_secs(10), || {
        envoy.logs().contains("next: invalid next cursor")
    })
    .unwrap_or_else(|| panic!("the refusal is not logged:\n{}", envoy.logs()));
    let asked: Vec<String> = edge.proxy.captured().into_iter().map(|r| r.path).collect();
    for next in crafted {
        assert!(
            !asked.iter().any(|p| p.contains(&format!("after={next}"))),
            "{next:?} was asked for: {asked:?}"
        );
    }
    assert!(
        asked.iter().all(|p| !p.contains("/v1/accounts")),
        "{asked:?}"
    );
    edge.finish();
}

#[test]
fn on_stale_deny_answers_503_config_stale_once_the_control_plane_is_gone_too_long() {
    let mut cp = ControlPlane::start();
    lift_account_limit(&cp);
    let echo = Echo::start();
    let envoy = start_envoy(
        &cp,
        &echo,
        json!({"max_staleness_s": 2, "on_stale": "deny", "wait_s": 1}),
    );
    wait_first_config(&envoy, &cp);
    let (sid, secret) = create_key(&cp, "main");
    let req = basic(&cp, &sid, &secret);
    within(Duration::from_secs(10), || all(&envoy, &req, 200)).expect("key admitted");

    cp.kill();
    let killed = Instant::now();
    assert!(all(&envoy, &req, 200), "stale right after the kill");
    within(Duration::from_secs(10), || all(&envoy, &req, 503)).expect("stale config refused");
    eprintln!(
        "control plane killed → config_stale on every worker after {:?}",
        killed.elapsed()
    );
    let r = send(&envoy, &req);
    assert_eq!(r.body_json()["error"]["code"], "config_stale", "{r:?}");
    assert_eq!(r.header_str("retry-after"), Some("5"));
    assert!(metric(&envoy, "keygate.denied.config_stale") > 0);

    cp.restart();
    within(Duration::from_secs(60), || all(&envoy, &req, 200))
        .expect("fresh again after the control plane came back");
    eprintln!("restart → served again after {:?}", killed.elapsed());
    assert_no_leaks(&[&secret], &cp, &envoy, &echo, None);
}

#[test]
fn on_stale_serve_keeps_judging_with_the_last_config_and_counts_stale_requests() {
    let mut cp = ControlPlane::start();
    lift_account_limit(&cp);
    let echo = Echo::start();
    let envoy = start_envoy(
        &cp,
        &echo,
        json!({"max_staleness_s": 2, "on_stale": "serve", "wait_s": 1}),
    );
    wait_first_config(&envoy, &cp);
    let (sid, secret) = create_key(&cp, "main");
    let req = basic(&cp, &sid, &secret);
    within(Duration::from_secs(10), || all(&envoy, &req, 200)).expect("key admitted");
    assert_eq!(metric(&envoy, "keygate.config.stale_served"), 0);

    cp.kill();
    std::thread::sleep(Duration::from_secs(4));
    assert!(all(&envoy, &req, 200), "on_stale serve must keep serving");
    assert!(all(&envoy, &basic(&cp, &sid, "sk_live_wrong"), 401));
    let stale = metric(&envoy, "keygate.config.stale_served");
    eprintln!("4 s after the kill: stale_served = {stale}");
    assert!(
        stale >= 2 * 2 * u64::from(WORKERS),
        "stale_served = {stale}"
    );
    assert!(
        envoy
            .gauge("wasmcustom.keygate.config.age_seconds")
            .unwrap_or(0)
            >= 3
    );
    assert_no_leaks(&[&secret], &cp, &envoy, &echo, None);
}

/// With max_staleness_s shorter than the long-poll, an idle edge whose control plane is up must
/// not call its config stale: a long-poll in progress is contact.
#[test]
fn a_live_control_plane_is_not_stale_between_long_poll_answers() {
    let cp = ControlPlane::start();
    lift_account_limit(&cp);
    let echo = Echo::start();
    let envoy = start_envoy(
        &cp,
        &echo,
        json!({"max_staleness_s": 2, "on_stale": "deny", "wait_s": 10}),
    );
    wait_first_config(&envoy, &cp);
    let (sid, secret) = create_key(&cp, "main");
    let req = basic(&cp, &sid, &secret);
    within(Duration::from_secs(10), || all(&envoy, &req, 200)).expect("key admitted");
    std::thread::sleep(Duration::from_secs(4));
    let got = statuses(&envoy, &req, 2 * WORKERS as usize);
    assert!(
        got.iter().all(|s| *s == 200),
        "control plane up, long-poll open, yet: {got:?} ({:?})",
        send(&envoy, &req).body_text()
    );
    assert_no_leaks(&[&secret], &cp, &envoy, &echo, None);
}

/// Four workers, one poller: with a 2 s long-poll, an idle edge asks about once per 2 s (not four
/// times that), never two requests at once, and each is a long-poll the control plane holds.
#[test]
fn four_workers_share_one_poller_that_long_polls() {
    let cp = ControlPlane::start();
    lift_account_limit(&cp);
    let proxy = FaultyProxy::start(cp.port());
    let echo = Echo::start();
    let envoy = start_envoy_via(proxy.port(), &cp, &echo, json!({"wait_s": 2}));
    wait_first_config(&envoy, &cp);
    // Let the election settle and the first long-poll start.
    std::thread::sleep(Duration::from_secs(2));
    proxy.reset_max();
    let seen0 = proxy.captured().len();
    let fetches0 = metric(&envoy, "keygate.config.fetches");
    let not_modified0 = metric(&envoy, "keygate.config.not_modified");
    let feed_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("\"route\":\"/v1/edge/changes\""))
            .count()
    };
    let logged0 = feed_lines(&cp.logs());
    std::thread::sleep(Duration::from_secs(7));
    let fetches = metric(&envoy, "keygate.config.fetches") - fetches0;
    let not_modified = metric(&envoy, "keygate.config.not_modified") - not_modified0;
    let seen = proxy.captured().len() - seen0;
    let logged = feed_lines(&cp.logs()) - logged0;
    eprintln!(
        "7 s idle, 4 workers, wait_s 2: {fetches} fetches counted ({not_modified} answered 304), \
         {seen} feed requests seen, {logged} answered by the control plane, at most {} at once",
        proxy.max_in_flight()
    );
    // One poller: about 7 / 2 ≈ 3.5 long-polls; four pollers would make about 14.
    assert!((2..=5).contains(&fetches), "{fetches} fetches in 7 s");
    assert!((2..=5).contains(&seen), "{seen} feed requests in 7 s");
    assert!(
        (2..=5).contains(&logged),
        "{logged} feed requests answered in 7 s"
    );
    assert!(
        not_modified >= 2,
        "idle long-polls end in 304: {not_modified}"
    );
    assert_eq!(proxy.max_in_flight(), 1, "exactly one poller per Envoy");
    // Idle: every request is the long poll of the change feed (the version in force is known).
    let paths: std::collections::BTreeSet<_> = proxy.captured()[seen0..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with("/v1/edge/changes?since=")
                && p.contains("&known=")
                && p.ends_with("&wait=2")),
        "{paths:?}"
    );
    assert_no_leaks(&[], &cp, &envoy, &echo, Some(&proxy));
}

/// Publications logged by the poller: `(version, pages, records written)`.
fn publications(envoy: &Envoy) -> Vec<(u64, u64, u64)> {
    envoy
        .logs()
        .lines()
        .filter_map(|l| {
            let rest = l.split("config version ").nth(1)?;
            let (v, rest) = rest.split_once(" published from the control plane (")?;
            let (pages, rest) = rest.split_once(" pages, ")?;
            let (records, _) = rest.split_once(" records written")?;
            Some((v.parse().ok()?, pages.parse().ok()?, records.parse().ok()?))
        })
        .collect()
}

/// The feed walked three accounts and keys at a time: the first publication fetches everything
/// over many pages and writes it into both slots; after that an update fetches and writes only
/// what changed, from the first change on.
#[test]
fn a_feed_walked_in_small_pages_publishes_every_key_and_then_only_the_changes() {
    let cp = ControlPlane::start();
    lift_account_limit(&cp);
    let keys: Vec<(String, String)> = (0..14).map(|_| create_key(&cp, "standard")).collect();
    let echo = Echo::start();
    let envoy = start_envoy(&cp, &echo, json!({"page_size": 3}));
    wait_first_config(&envoy, &cp);
    for (sid, secret) in &keys {
        assert_eq!(send(&envoy, &basic(&cp, sid, secret)).status, 200, "{sid}");
    }
    // Envoy writes its log file from a flush thread (every 50 ms, later under load): the
    // publication that admitted the keys may not be in the file yet.
    within(Duration::from_secs(10), || !publications(&envoy).is_empty());
    let first = publications(&envoy);
    // At least 15 SIDs (the account and the 14 keys): at least 5 pages of 3. Each record, and
    // each key's Bearer-digest entry, is written into both slots.
    assert!(
        first
            .first()
            .is_some_and(|p| p.1 >= 5 && p.2 >= 2 * (15 + 14)),
        "first publication: {first:?}\n{}",
        envoy.logs()
    );
    // So no second walk warms the other slot, and even the first change travels alone.
    within(Duration::from_secs(10), || {
        envoy.logs().contains(", both slots)")
    })
    .unwrap_or_else(|| {
        panic!(
            "first walk not logged as filling both slots:\n{}",
            envoy.logs()
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !envoy.logs().contains("warmed up"),
        "a second walk:\n{}",
        envoy.logs()
    );
    let before = publications(&envoy).len();
    cp.delete_key(&keys[3].0);
    let gone = basic(&cp, &keys[3].0, &keys[3].1);
    let took = within(Duration::from_secs(10), || all(&envoy, &gone, 401)).expect("revoked");
    let (sid, secret) = create_key(&cp, "standard");
    let fresh = basic(&cp, &sid, &secret);
    within(Duration::from_secs(10), || all(&envoy, &fresh, 200)).expect("created");
    within(Duration::from_secs(10), || {
        publications(&envoy).len() > before
    });
    let later: Vec<_> = publications(&envoy).into_iter().skip(before).collect();
    eprintln!("revoked in {took:?}; publications after warm-up: {later:?}");
    assert!(!later.is_empty());
    for (v, pages, records) in &later {
        // A delta since the slot's own version: the changes of the last two versions (a
        // deletion, a key with its Bearer digest), never the 17 keys again.
        assert!(
            *pages <= 2 && *records <= 6,
            "version {v}: {pages} pages, {records} records"
        );
    }
    // A walk of many pages is all answers the poller asked for: no rejection, no error.
    assert_eq!(metric(&envoy, "keygate.config.rejected"), 0);
    assert_eq!(metric(&envoy, "keygate.config.fetch_errors"), 0);
    for (i, (sid, secret)) in keys.iter().enumerate() {
        let want = if i == 3 { 401 } else { 200 };
        assert_eq!(send(&envoy, &basic(&cp, sid, secret)).status, want, "{sid}");
    }
    let secrets: Vec<&str> = keys.iter().map(|(_, s)| s.as_str()).collect();
    assert_no_leaks(&secrets, &cp, &envoy, &echo, None);
}

/// A walk of several pages with a bad page after the first: the edge asks for each next page
/// before checking the current one, so the answer to that request is dropped; nothing of the
/// update is in force until a clean walk publishes all of it.
#[test]
fn a_bad_page_in_the_middle_of_a_walk_publishes_nothing_of_the_update() {
    let cp = ControlPlane::start();
    lift_account_limit(&cp);
    let proxy = FaultyProxy::start(cp.port());
    let echo = Echo::start();
    let envoy = start_envoy_via(proxy.port(), &cp, &echo, json!({"page_size": 3}));
    wait_first_config(&envoy, &cp);
    // Hold the edge back while the keys are made, so that they arrive as one update of several
    // pages (one at a time, each would travel alone on one page).
    proxy.set_fault(Fault::CutConnection);
    let errors0 = metric(&envoy, "keygate.config.fetch_errors");
    let fresh: Vec<(String, String)> = (0..9).map(|_| create_key(&cp, "standard")).collect();
    within(Duration::from_secs(10), || {
        metric(&envoy, "keygate.config.fetch_errors") > errors0
    })
    .expect("the edge tried to fetch the update");
    let rejected0 = metric(&envoy, "keygate.config.rejected");
    proxy.set_fault(Fault::FailsValidationOnLaterPages);
    within(Duration::from_secs(15), || {
        metric(&envoy, "keygate.config.rejected") >= rejected0 + 2
    })
    .unwrap_or_else(|| panic!("no rejected walk:\n{}", envoy.logs()));
    // Refused for the damaged record of a later page (the first page passed through).
    within(Duration::from_secs(10), || {
        envoy
            .logs()
            .contains("allowed_ips[0]: host bits set in \"10.0.0.1/8\"")
    })
    .unwrap_or_else(|| panic!("not refused for the damaged page:\n{}", envoy.logs()));
    for (sid, secret) in &fresh {
        let got = statuses(&envoy, &basic(&cp, sid, secret), 2 * WORKERS as usize);
        assert!(
            got.iter().all(|s| *s == 401),
            "{sid} from a refused update: {got:?}"
        );
    }
    proxy.set_fault(Fault::PassThrough);
    for (sid, secret) in &fresh {
        let req = basic(&cp, sid, secret);
        within(Duration::from_secs(15), || all(&envoy, &req, 200))
            .unwrap_or_else(|| panic!("{sid} not admitted after a clean walk"));
    }
    let secrets: Vec<&str> = fresh.iter().map(|(_, s)| s.as_str()).collect();
    assert_no_leaks(&secrets, &cp, &envoy, &echo, Some(&proxy));
}
