//! Rate and concurrency limits in a real Envoy with four workers: counts are exact across workers.
//!
//! Every test starts its own echo upstream and Envoy (`--concurrency 4`, so four filter VMs share
//! one shared-data store) with a variant of the demo config, then fires requests from many
//! threads, each on its own keep-alive connection, released together by a barrier so the first
//! requests of a brand-new subject reach every worker at once (the insert-if-absent path). Limits
//! use a one-hour period so nothing refills during a test; counts are asserted exactly, and on
//! what the upstream received, not only on what the client saw. Nothing here asserts a duration.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use keygate_e2e::demo::{self, DemoKey, BALANCE, CALLS, MAIN, MESSAGES, PUBLISHABLE, STANDARD};
use keygate_e2e::{Conn, Echo, Envoy, EnvoyBuilder, Req, Response};
use serde_json::{json, Value};

const WORKERS: u32 = 4;
/// Generous bound for anything we wait for (never an assertion about speed).
const PATIENCE: Duration = Duration::from_secs(20);

/// The demo config with `limits` set and an extra `slow` API for `/__slow/**` (the echo holds
/// those requests for the number of milliseconds in the path).
fn config_with(limits: Value) -> Value {
    let mut config = demo::config();
    config["limits"] = limits;
    config["apis"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "slow", "methods": ["GET"], "paths": ["/__slow/**"]}));
    config
}

fn start(config: &Value) -> (Echo, Envoy) {
    let echo = Echo::start();
    let envoy = EnvoyBuilder::new()
        .plugin_config_json(config)
        .concurrency(WORKERS)
        .upstream_port(echo.port())
        .start();
    (echo, envoy)
}

fn get(path: &str, key: DemoKey) -> Req {
    Req::get(path).basic(key.sid, key.secret)
}

fn wrong_secret(path: &str, key: DemoKey) -> Req {
    Req::get(path).basic(key.sid, "sk_live_notTheSecret")
}

/// Runs one thread per plan entry. Each opens its own connection, waits at a shared barrier, then
/// sends its requests in order on that keep-alive connection (reopening only if Envoy closed it
/// after a response). Returns the responses in plan order.
fn burst(port: u16, plan: Vec<Vec<Req>>) -> Vec<Vec<Response>> {
    let barrier = Arc::new(Barrier::new(plan.len()));
    let threads: Vec<_> = plan
        .into_iter()
        .map(|reqs| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut conn = Conn::open(port).expect("connect to Envoy");
                barrier.wait();
                let mut out = Vec::with_capacity(reqs.len());
                for req in &reqs {
                    let res = conn.send(req).expect("request on a keep-alive connection");
                    if res
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case(b"close"))
                    {
                        conn = Conn::open(port).expect("reconnect to Envoy");
                    }
                    out.push(res);
                }
                out
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// `threads` connections, each sending `req` `per_thread` times.
fn same_request(req: &Req, threads: usize, per_thread: usize) -> Vec<Vec<Req>> {
    vec![vec![req.clone(); per_thread]; threads]
}

/// `"ok"` for a 200, else the error code of the JSON body (status-prefixed if it has none).
fn outcome(res: &Response) -> String {
    if res.status == 200 {
        return "ok".to_string();
    }
    match serde_json::from_slice::<Value>(&res.body) {
        Ok(v) if v["error"]["code"].is_string() => v["error"]["code"].as_str().unwrap().to_string(),
        _ => format!("{} {}", res.status, res.body_text()),
    }
}

fn tally<'a>(responses: impl IntoIterator<Item = &'a Response>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for res in responses {
        *counts.entry(outcome(res)).or_insert(0) += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_string(), *n))
        .collect()
}

fn metric(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .custom_metric(name)
        .unwrap_or_else(|| panic!("no wasmcustom.{name} in /stats"))
}

/// Prints the CAS figures and how many downstream connections each worker accepted (evidence
/// that the burst really reached every worker), and checks no update gave up.
fn report_contention(envoy: &Envoy, test: &str) {
    let stats = envoy.stats();
    let per_worker: Vec<&str> = stats
        .lines()
        .filter(|l| {
            l.starts_with("listener.127.0.0.1_")
                && l.contains(".worker_")
                && l.contains("downstream_cx_total")
        })
        .collect();
    eprintln!(
        "{test}: cas_retries={} retries_exhausted={} garbage_values={} store_errors={}; {per_worker:?}",
        metric(envoy, "keygate.ratelimit.cas_retries"),
        metric(envoy, "keygate.ratelimit.retries_exhausted"),
        metric(envoy, "keygate.ratelimit.garbage_values"),
        metric(envoy, "keygate.ratelimit.store_errors"),
    );
    for name in [
        "keygate.ratelimit.retries_exhausted",
        "keygate.ratelimit.garbage_values",
        "keygate.ratelimit.store_errors",
    ] {
        assert_eq!(metric(envoy, name), 0, "{name}");
    }
}

/// Checks a 429 from a rate limit: Retry-After of at least a second, and `RateLimit-Policy` /
/// `RateLimit` naming `kind` with quota `q` over a one-hour window and nothing remaining.
fn assert_rate_limited(res: &Response, code: &str, kind: &str, q: u32) {
    assert_eq!(res.status, 429, "{res:?}");
    assert_eq!(res.body_json()["error"]["code"], code, "{res:?}");
    let retry_after: u64 = res
        .header_str("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After: {res:?}"));
    assert!(retry_after >= 1, "{res:?}");
    assert_eq!(
        res.header_str("ratelimit-policy"),
        Some(format!("\"{kind}\";q={q};w=3600").as_str()),
        "{res:?}"
    );
    let state = res.header_str("ratelimit").unwrap_or_default();
    let prefix = format!("\"{kind}\";r=0;t=");
    let reset: u64 = state
        .strip_prefix(&prefix)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("RateLimit {state:?} is not {prefix}<seconds>: {res:?}"));
    assert!((1..=3600).contains(&reset), "{res:?}");
}

fn hour(requests: u32) -> Value {
    json!({"requests": requests, "per": "1h"})
}

#[test]
fn a_new_key_admits_exactly_its_limit_when_its_first_requests_hit_four_workers_at_once() {
    const LIMIT: usize = 20;
    let (echo, envoy) = start(&config_with(json!({"key": {"main": hour(20)}})));

    let responses = burst(envoy.port(), same_request(&get(CALLS, MAIN), 64, 4));
    let all: Vec<&Response> = responses.iter().flatten().collect();
    assert_eq!(
        tally(all.iter().copied()),
        counts(&[("ok", LIMIT), ("rate_limited_key", 256 - LIMIT)])
    );
    for res in all.iter().filter(|r| r.status == 429) {
        assert_rate_limited(res, "rate_limited_key", "key", 20);
    }
    assert_eq!(
        echo.captured().len(),
        LIMIT,
        "the upstream saw exactly the admitted requests"
    );

    assert_eq!(metric(&envoy, "keygate.allowed"), LIMIT as u64);
    assert_eq!(
        metric(&envoy, "keygate.denied.rate_limited_key"),
        (256 - LIMIT) as u64,
        "the denial counter equals the 429s the clients saw"
    );
    report_contention(&envoy, "per-key limit");
}

/// `n` generated standard keys of ACdemo0001 (`SKlim00000`.. with secret
/// `sk_live_limits00000`..), added to `config`; returns (sid, secret) pairs.
fn add_generated_keys(config: &mut Value, n: usize) -> Vec<(String, String)> {
    use sha2::{Digest as _, Sha256};
    let pairs: Vec<(String, String)> = (0..n)
        .map(|i| (format!("SKlim{i:05}"), format!("sk_live_limits{i:05}")))
        .collect();
    let keys = config["keys"].as_array_mut().unwrap();
    for (sid, secret) in &pairs {
        keys.push(json!({
            "sid": sid,
            "account_sid": demo::ACCOUNT_SID,
            "role": "standard",
            "secrets": [{"digest": hex::encode(Sha256::digest(secret.as_bytes()))}]
        }));
    }
    pairs
}

#[test]
fn two_thousand_brand_new_keys_hit_in_lockstep_on_six_connections_are_each_admitted_once() {
    // Every connection walks the keys in the same order, so the first requests of each new key
    // reach several workers at nearly the same moment: 2000 chances of an insert-if-absent race.
    // A lost race shows up as a key admitted twice. (Real races are rare on a 2-core machine, 0
    // to 10 CAS retries per run, but enough: a filter whose inserts were blind writes failed this
    // test in 6 runs out of 6.)
    const KEYS: usize = 2000;
    const LIMIT: usize = 1;
    const CONNS: usize = 6;
    let mut config = config_with(json!({"key": {"standard": hour(1)}}));
    let keys = add_generated_keys(&mut config, KEYS);
    let (echo, envoy) = start(&config);

    let walk: Vec<Req> = keys
        .iter()
        .map(|(sid, secret)| Req::get(CALLS).basic(sid, secret))
        .collect();
    let responses = burst(envoy.port(), vec![walk; CONNS]);
    assert_eq!(
        tally(responses.iter().flatten()),
        counts(&[
            ("ok", KEYS * LIMIT),
            ("rate_limited_key", KEYS * (CONNS - LIMIT))
        ])
    );
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in echo.captured() {
        *per_key
            .entry(r.header_str("x-keygate-key-sid").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    let wrong: Vec<_> = per_key.iter().filter(|(_, n)| **n != LIMIT).collect();
    assert!(
        wrong.is_empty(),
        "keys not admitted exactly {LIMIT} times: {wrong:?}"
    );
    assert_eq!(per_key.len(), KEYS);
    assert_eq!(
        metric(&envoy, "keygate.denied.rate_limited_key"),
        (KEYS * (CONNS - LIMIT)) as u64
    );
    report_contention(&envoy, "2000 new keys");
}

#[test]
fn an_account_limit_is_shared_exactly_by_all_keys_of_the_account() {
    const LIMIT: usize = 30;
    let (echo, envoy) = start(&config_with(json!({"account": hour(30)})));

    // Three keys of ACdemo0001 at once, 16 connections each, 5 requests per connection.
    let mut plan = same_request(&get(CALLS, MAIN), 16, 5);
    plan.extend(same_request(&get(CALLS, STANDARD), 16, 5));
    plan.extend(same_request(&get(BALANCE, PUBLISHABLE), 16, 5));
    let responses = burst(envoy.port(), plan);
    let all: Vec<&Response> = responses.iter().flatten().collect();
    assert_eq!(
        tally(all.iter().copied()),
        counts(&[("ok", LIMIT), ("rate_limited_account", 240 - LIMIT)])
    );
    for res in all.iter().filter(|r| r.status == 429) {
        assert_rate_limited(res, "rate_limited_account", "account", 30);
    }
    let per_key: BTreeMap<String, usize> =
        echo.captured().iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.header_str("x-keygate-key-sid").unwrap_or("?").to_string())
                .or_insert(0) += 1;
            m
        });
    eprintln!("account limit: admitted per key {per_key:?}");
    assert_eq!(per_key.values().sum::<usize>(), LIMIT, "{per_key:?}");
    assert_eq!(
        metric(&envoy, "keygate.denied.rate_limited_account"),
        (240 - LIMIT) as u64
    );
    report_contention(&envoy, "account limit");
}

#[test]
fn a_key_api_limit_is_exact_and_leaves_the_keys_other_apis_alone() {
    // `calls` allows 15 per key per hour by default; the standard key's own override is 4.
    let mut config = config_with(json!({}));
    config["apis"][0]["limit"] = hour(15);
    let standard = config["keys"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|k| k["sid"] == STANDARD.sid)
        .unwrap();
    standard["limits"] = json!({"apis": {"calls": hour(4)}});
    let (echo, envoy) = start(&config);

    let mut plan = same_request(&get(CALLS, MAIN), 32, 4); // 128 on calls
    plan.extend(same_request(&get(MESSAGES, MAIN), 8, 4)); // 32 on messages, no limit
    plan.extend(same_request(&get(CALLS, STANDARD), 16, 2)); // 32 on calls, own limit 4
    let responses = burst(envoy.port(), plan);
    let main_calls: Vec<&Response> = responses[..32].iter().flatten().collect();
    let main_messages: Vec<&Response> = responses[32..40].iter().flatten().collect();
    let standard_calls: Vec<&Response> = responses[40..].iter().flatten().collect();

    assert_eq!(
        tally(main_calls.iter().copied()),
        counts(&[("ok", 15), ("rate_limited_api", 128 - 15)])
    );
    assert_eq!(tally(main_messages.iter().copied()), counts(&[("ok", 32)]));
    assert_eq!(
        tally(standard_calls.iter().copied()),
        counts(&[("ok", 4), ("rate_limited_api", 32 - 4)])
    );
    for res in main_calls.iter().filter(|r| r.status == 429) {
        assert_rate_limited(res, "rate_limited_api", "key_api", 15);
    }
    for res in standard_calls.iter().filter(|r| r.status == 429) {
        assert_rate_limited(res, "rate_limited_api", "key_api", 4);
    }
    // After the burst the main key is still refused on calls and still admitted on messages.
    assert_eq!(
        outcome(&get(CALLS, MAIN).send(envoy.port())),
        "rate_limited_api"
    );
    assert_eq!(outcome(&get(MESSAGES, MAIN).send(envoy.port())), "ok");
    assert_eq!(echo.captured().len(), 15 + 32 + 4 + 1);
    report_contention(&envoy, "key x API limit");
}

#[test]
fn failed_authentication_consumes_nothing_from_the_key() {
    const LIMIT: usize = 20;
    // No failed-auth limiter: wrong secrets are refused but must not touch the key's quota.
    let (echo, envoy) = start(&config_with(json!({"key": {"main": hour(20)}})));

    let first = burst(
        envoy.port(),
        same_request(&wrong_secret(CALLS, MAIN), 32, 4),
    );
    assert_eq!(
        tally(first.iter().flatten()),
        counts(&[("invalid_credentials", 128)])
    );

    // Then right and wrong secrets for the same key, interleaved, all at once.
    let mut plan = Vec::new();
    for _ in 0..32 {
        plan.push(vec![get(CALLS, MAIN); 4]);
        plan.push(vec![wrong_secret(CALLS, MAIN); 4]);
    }
    let second = burst(envoy.port(), plan);
    let right: Vec<&Response> = second.iter().step_by(2).flatten().collect();
    let wrong: Vec<&Response> = second.iter().skip(1).step_by(2).flatten().collect();
    assert_eq!(
        tally(right.iter().copied()),
        counts(&[("ok", LIMIT), ("rate_limited_key", 128 - LIMIT)])
    );
    assert_eq!(
        tally(wrong.iter().copied()),
        counts(&[("invalid_credentials", 128)])
    );
    assert_eq!(echo.captured().len(), LIMIT);
    assert_eq!(metric(&envoy, "keygate.denied.invalid_credentials"), 256);
    report_contention(&envoy, "failed auth consumes nothing");
}

#[test]
fn a_request_refused_for_concurrency_gives_back_the_rate_it_took() {
    // The key may make 6 requests an hour; the account 2 at a time. Two slow requests hold both
    // slots (and 2 of the 6). Everything sent meanwhile is refused for concurrency after taking
    // from the key's rate, so it must give that back: afterwards exactly 4 more are admitted.
    let config = config_with(json!({"key": {"main": hour(6)}, "account_concurrency": 2}));
    let (echo, envoy) = start(&config);
    let port = envoy.port();

    let slow: Vec<_> = (0..2)
        .map(|_| thread::spawn(move || get("/__slow/5000", MAIN).send(port)))
        .collect();
    wait_until("2 slow requests at the upstream", || echo.in_flight() == 2);
    let meanwhile = burst(port, same_request(&get(CALLS, MAIN), 24, 2));
    let held = echo.in_flight();
    for t in slow {
        assert_eq!(outcome(&t.join().unwrap()), "ok");
    }
    assert_eq!(
        held, 2,
        "the slow requests were still held during the burst"
    );
    assert_eq!(
        tally(meanwhile.iter().flatten()),
        counts(&[("concurrency_limited", 48)])
    );
    for res in meanwhile.iter().flatten() {
        assert_eq!(res.header_str("retry-after"), Some("1"), "{res:?}");
    }

    let after: Vec<Response> = (0..10).map(|_| get(CALLS, MAIN).send(port)).collect();
    assert_eq!(
        tally(&after),
        counts(&[("ok", 4), ("rate_limited_key", 6)]),
        "48 refusals for concurrency must have consumed nothing from the key's 6 an hour"
    );
    assert_eq!(echo.captured().len(), 6);
    report_contention(&envoy, "give-back");
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn account_concurrency_admits_exactly_n_in_flight_and_frees_slots_at_stream_end() {
    const N: usize = 5;
    let (echo, envoy) = start(&config_with(json!({"account_concurrency": 5})));
    let port = envoy.port();

    // N + 3 requests the upstream holds for 5 s, all at once on their own connections.
    let (tx, rx) = mpsc::channel();
    let barrier = Arc::new(Barrier::new(N + 3));
    let threads: Vec<_> = (0..N + 3)
        .map(|_| {
            let (tx, barrier) = (tx.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                let mut conn = Conn::open(port).unwrap();
                barrier.wait();
                let res = conn.send(&get("/__slow/5000", MAIN)).unwrap();
                tx.send(res).unwrap();
            })
        })
        .collect();
    wait_until("N slow requests at the upstream", || echo.in_flight() == N);
    // The 3 extra ones are refused at once, not queued behind the held ones.
    let refused: Vec<Response> = (0..3).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
    let held = echo.in_flight();
    assert_eq!(
        tally(&refused),
        counts(&[("concurrency_limited", 3)]),
        "{refused:?}"
    );
    assert_eq!(held, N, "the refusals came back while N requests were held");
    for res in &refused {
        assert_eq!(res.header_str("retry-after"), Some("1"), "{res:?}");
    }
    for t in threads {
        t.join().unwrap();
    }
    let admitted: Vec<Response> = rx.try_iter().collect();
    assert_eq!(tally(&admitted), counts(&[("ok", N)]));
    assert_eq!(echo.max_in_flight(), N);

    // Slots come back when streams end: N requests fit again, one at a time or N at a time.
    assert_eq!(outcome(&get(CALLS, MAIN).send(port)), "ok");
    let again = burst(port, same_request(&get("/__slow/300", MAIN), N, 1));
    assert_eq!(tally(again.iter().flatten()), counts(&[("ok", N)]));
    assert_eq!(metric(&envoy, "keygate.denied.concurrency_limited"), 3);
    report_contention(&envoy, "concurrency");
}

#[test]
fn a_request_whose_client_disconnects_gives_its_concurrency_slot_back() {
    const N: usize = 3;
    let (echo, envoy) = start(&config_with(json!({"account_concurrency": 3})));
    let port = envoy.port();
    let slow = get("/__slow/6000", MAIN);

    // N requests held at the upstream, written without waiting for their answers.
    let mut conns: Vec<Conn> = (0..N)
        .map(|_| {
            let mut conn = Conn::open(port).unwrap();
            conn.write_raw(&slow.to_bytes(port)).unwrap();
            conn
        })
        .collect();
    wait_until("N slow requests at the upstream", || echo.in_flight() == N);
    assert_eq!(outcome(&get(CALLS, MAIN).send(port)), "concurrency_limited");

    // One client goes away mid-request: Envoy resets the stream, the filter releases its slot.
    drop(conns.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused_before_release = 0;
    loop {
        match outcome(&get(CALLS, MAIN).send(port)).as_str() {
            "ok" => break,
            "concurrency_limited" if Instant::now() < deadline => {
                refused_before_release += 1;
                thread::sleep(Duration::from_millis(20));
            }
            other => panic!("the disconnected request's slot was not given back: {other}"),
        }
    }
    eprintln!("disconnect: {refused_before_release} refusals before the slot came back");

    // And N are in flight again: one more slow request is admitted, then the account is full.
    let mut extra = Conn::open(port).unwrap();
    extra.write_raw(&slow.to_bytes(port)).unwrap();
    let slow_seen = |echo: &Echo| {
        echo.captured()
            .iter()
            .filter(|r| r.path.starts_with("/__slow/"))
            .count()
    };
    wait_until("the extra slow request at the upstream", || {
        slow_seen(&echo) == N + 1
    });
    assert_eq!(outcome(&get(CALLS, MAIN).send(port)), "concurrency_limited");
    let still_held = conns
        .iter_mut()
        .all(|c| !c.peer_closed(Duration::from_millis(1)));
    assert!(
        still_held,
        "the original slow requests were still in flight"
    );

    for mut conn in conns.into_iter().chain([extra]) {
        assert_eq!(outcome(&conn.read_response(false).unwrap()), "ok");
    }
    assert_eq!(outcome(&get(CALLS, MAIN).send(port)), "ok");
    report_contention(&envoy, "disconnect");
}

#[test]
fn shadow_limits_admit_everything_and_count_what_they_would_refuse() {
    let shadow = json!({"requests": 10, "per": "1h", "shadow": true});
    let (echo, envoy) = start(&config_with(json!({"key": {"main": shadow}})));

    let responses = burst(envoy.port(), same_request(&get(CALLS, MAIN), 40, 2));
    assert_eq!(tally(responses.iter().flatten()), counts(&[("ok", 80)]));
    assert_eq!(echo.captured().len(), 80);
    assert_eq!(metric(&envoy, "keygate.ratelimit.shadow_limited.key"), 70);
    assert_eq!(metric(&envoy, "keygate.denied.rate_limited_key"), 0);
    assert_eq!(metric(&envoy, "keygate.allowed"), 80);
    report_contention(&envoy, "shadow");
}

#[test]
fn quota_headers_on_success_count_down_to_the_refusal() {
    // 5 an hour: one request every 720 s.
    let config = config_with(json!({"key": {"main": hour(5)}, "quota_headers": true}));
    let (_echo, envoy) = start(&config);
    let mut conn = Conn::open(envoy.port()).unwrap();
    for used in 1..=5u64 {
        let res = conn.send(&get(CALLS, MAIN)).unwrap();
        assert_eq!(res.status, 200, "{res:?}");
        assert_eq!(
            res.header_str("ratelimit-policy"),
            Some("\"key\";q=5;w=3600")
        );
        let state = res.header_str("ratelimit").unwrap_or_default();
        let (remaining, reset) = state
            .strip_prefix("\"key\";r=")
            .and_then(|s| s.split_once(";t="))
            .and_then(|(r, t)| Some((r.parse::<u64>().ok()?, t.parse::<u64>().ok()?)))
            .unwrap_or_else(|| panic!("RateLimit {state:?}"));
        assert_eq!(remaining, 5 - used, "{res:?}");
        // The quota is whole again `used` intervals from now (less the time the test took).
        assert!(reset > (used - 1) * 720 && reset <= used * 720, "{res:?}");
    }
    let refused = conn.send(&get(CALLS, MAIN)).unwrap();
    assert_rate_limited(&refused, "rate_limited_key", "key", 5);
}

// ---- Failed-auth limiter -------------------------------------------------------------------

/// A TCP connection to 127.0.0.1:`port` from `local` (any 127/8 address: Linux routes the whole
/// block to `lo`), so Envoy sees a different `source.address`. std cannot bind before connecting,
/// hence the three libc calls.
#[cfg(target_os = "linux")]
fn connect_from(local: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;

    #[repr(C)]
    struct SockaddrIn {
        sin_family: u16,
        sin_port: [u8; 2],
        sin_addr: [u8; 4],
        sin_zero: [u8; 8],
    }
    extern "C" {
        fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
        fn bind(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
        fn connect(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
        fn close(fd: i32) -> i32;
    }
    const AF_INET: i32 = 2;
    const SOCK_STREAM: i32 = 1;
    const SOCK_CLOEXEC: i32 = 0o2_000_000;
    let addr = |ip: Ipv4Addr, port: u16| SockaddrIn {
        sin_family: AF_INET as u16,
        sin_port: port.to_be_bytes(),
        sin_addr: ip.octets(),
        sin_zero: [0; 8],
    };
    let (from, to) = (addr(local, 0), addr(Ipv4Addr::LOCALHOST, port));
    let len = std::mem::size_of::<SockaddrIn>() as u32;
    // SAFETY: plain socket syscalls on a descriptor we own; the sockaddr structs outlive the
    // calls; on success the descriptor is handed to TcpStream, which closes it.
    unsafe {
        let fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        if bind(fd, &from, len) != 0 || connect(fd, &to, len) != 0 {
            let e = io::Error::last_os_error();
            close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// Sends `req` on a fresh connection from `local` and reads one reply (framed by its
/// Content-Length, which Envoy's local replies and the echo both send).
#[cfg(target_os = "linux")]
fn send_from(local: Ipv4Addr, port: u16, req: Req) -> Response {
    let mut stream =
        connect_from(local, port).unwrap_or_else(|e| panic!("connect from {local}: {e}"));
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(&req.to_bytes(port)).unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "connection closed mid-reply: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = parsed.parse(&raw) else {
            continue;
        };
        let headers: Vec<(String, Vec<u8>)> = parsed
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .expect("a reply with Content-Length");
        if raw.len() >= head_len + length {
            return Response {
                status: parsed.code.unwrap_or(0),
                reason: parsed.reason.unwrap_or("").to_string(),
                headers,
                body: raw[head_len..head_len + length].to_vec(),
            };
        }
    }
}

#[cfg(target_os = "linux")]
#[test]
fn the_failed_auth_limiter_locks_out_the_guessing_address_only() {
    const ATTACKER: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const VICTIM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    // The buckets are keyed per Envoy process (unknown to the test): with the default 65536, the
    // victim's two buckets are both among the attacker's two with probability 1/C(65536, 2).
    let config = config_with(json!({"failed_auth": {"requests": 5, "per": "1h"}}));
    let (echo, envoy) = start(&config);
    let port = envoy.port();

    for _ in 0..5 {
        let res = send_from(ATTACKER, port, wrong_secret(CALLS, MAIN));
        assert_eq!(outcome(&res), "invalid_credentials", "{res:?}");
    }
    let locked = send_from(ATTACKER, port, wrong_secret(CALLS, MAIN));
    assert_rate_limited(&locked, "too_many_failed_auth", "failed_auth", 5);
    // Once limited, the address is refused before any secret is compared, even the right one.
    let right_from_attacker = send_from(ATTACKER, port, get(CALLS, MAIN));
    assert_rate_limited(
        &right_from_attacker,
        "too_many_failed_auth",
        "failed_auth",
        5,
    );
    // Requests without credentials are not the limiter's business.
    assert_eq!(
        outcome(&send_from(ATTACKER, port, Req::get(CALLS))),
        "missing_credentials"
    );

    // The key's owner elsewhere is not locked out, and has a fresh budget of its own.
    let victim = send_from(VICTIM, port, get(CALLS, MAIN));
    assert_eq!(outcome(&victim), "ok", "{victim:?}");
    assert_eq!(
        echo.captured()[0].header_str("x-keygate-key-sid"),
        Some(MAIN.sid)
    );
    assert_eq!(
        outcome(&send_from(VICTIM, port, wrong_secret(CALLS, MAIN))),
        "invalid_credentials"
    );
    assert_eq!(echo.captured().len(), 1);
    assert_eq!(metric(&envoy, "keygate.denied.too_many_failed_auth"), 2);
    assert_eq!(metric(&envoy, "keygate.denied.invalid_credentials"), 6);
    let in_log: Vec<String> = envoy
        .wait_access_log(10, PATIENCE)
        .into_iter()
        .filter(|l| l.contains("client=127.0.0.2"))
        .collect();
    assert_eq!(
        in_log.len(),
        2,
        "Envoy saw the victim's address: {in_log:?}"
    );
}

#[test]
fn concurrent_guesses_from_one_address_are_limited_without_admitting_anyone() {
    // Under a parallel burst the limiter reads before it compares and takes after, so guesses
    // already past the read on other workers when the 5th failure lands are still compared: at
    // most 5 + (workers - 1) get 401, every other one 429, and no guess ever gets through.
    let config = config_with(json!({"failed_auth": {"requests": 5, "per": "1h"}}));
    let (echo, envoy) = start(&config);
    let responses = burst(
        envoy.port(),
        same_request(&wrong_secret(CALLS, MAIN), 32, 4),
    );
    let seen = tally(responses.iter().flatten());
    eprintln!("parallel guesses: {seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 128);
    let compared = seen.get("invalid_credentials").copied().unwrap_or(0);
    assert!(
        (5..=5 + WORKERS as usize - 1).contains(&compared),
        "{seen:?}"
    );
    assert_eq!(
        seen,
        counts(&[
            ("invalid_credentials", compared),
            ("too_many_failed_auth", 128 - compared)
        ])
    );
    assert!(echo.captured().is_empty());
    assert_eq!(
        outcome(&get(CALLS, MAIN).send(envoy.port())),
        "too_many_failed_auth"
    );
}

// ---- Leases (far from a limit, a worker spends a batch without shared data) ------------------

#[test]
fn a_large_limit_is_spent_from_leases_and_never_exceeded_across_four_workers() {
    // 1,000 an hour: far from the limit each worker reserves a batch of the key's requests (1,
    // then doubling, at most 64 and 1/16 of what is left) and spends it without shared data;
    // under 64 left every request is taken from the record, as without leases.
    const LIMIT: usize = 1000;
    // A day's period: one request refills every 86.4 s, so nothing refills during the test.
    let day = json!({"requests": 1000, "per": "24h"});
    let (echo, envoy) = start(&config_with(json!({"key": {"main": day}})));
    let port = envoy.port();
    // Under the limit: every request gets in.
    let under = burst(port, same_request(&get(CALLS, MAIN), 24, 30));
    assert_eq!(tally(under.iter().flatten()), counts(&[("ok", 720)]));
    let leases = metric(&envoy, "keygate.ratelimit.leases");
    assert!(leases > 0, "the burst was served from leases");

    // Every lease has ended 1 s after it was taken (its worker's tick ends it, or the next
    // writer charges it whole at its expiry).
    // Over the limit: never more than what is left.
    thread::sleep(Duration::from_millis(1500));
    let over = burst(port, same_request(&get(CALLS, MAIN), 32, 20));
    let all: Vec<&Response> = over.iter().flatten().collect();
    let counted = tally(all.iter().copied());
    let ok = counted.get("ok").copied().unwrap_or(0);
    assert_eq!(
        counted,
        counts(&[("ok", ok), ("rate_limited_key", 640 - ok)]),
        "nothing but admissions and key refusals"
    );
    let first = 720 + ok;
    assert!(
        first <= LIMIT,
        "{first} admitted against a limit of {LIMIT}"
    );

    // Then one connection (one worker) gets what is left.
    thread::sleep(Duration::from_millis(1500));
    let mut conn = Conn::open(port).unwrap();
    let mut second = 0;
    loop {
        let res = conn.send(&get(CALLS, MAIN)).unwrap();
        if res.status != 200 {
            assert_eq!(outcome(&res), "rate_limited_key", "{res:?}");
            break;
        }
        second += 1;
        assert!(second <= LIMIT, "runaway");
    }
    let total = first + second;
    eprintln!(
        "leases: {leases} taken under the limit; 720 + {ok} admitted, {second} after: {total}"
    );
    assert!(
        total <= LIMIT,
        "{total} admitted against a limit of {LIMIT}"
    );
    // What leases may cost: a lease its worker could not end before it expired is charged whole
    // (at most 64 per worker); with ticks on time nothing is lost.
    assert!(
        total >= LIMIT - 4 * 64,
        "{total}: more lost than four workers' leases"
    );
    assert_eq!(
        echo.captured().len(),
        total,
        "the upstream saw exactly the admitted"
    );
    assert_eq!(metric(&envoy, "keygate.allowed"), total as u64);
}

#[test]
fn kept_concurrency_slots_never_let_more_than_the_limit_in_flight() {
    // A limit of 64: a worker keeps up to 8 released slots for its next requests while the
    // account is at most half full; they stay counted as that worker's, so the total in flight
    // never passes the limit.
    const N: usize = 64;
    let (echo, envoy) = start(&config_with(json!({"account_concurrency": 64})));
    let port = envoy.port();
    // Quick requests on 16 connections: every worker ends up keeping some slots.
    let warm = burst(port, same_request(&get(CALLS, MAIN), 16, 20));
    assert_eq!(tally(warm.iter().flatten()), counts(&[("ok", 320)]));

    let slow = |n: usize, ms: u32| {
        let (tx, rx) = mpsc::channel();
        let barrier = Arc::new(Barrier::new(n));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (tx, barrier) = (tx.clone(), Arc::clone(&barrier));
                thread::spawn(move || {
                    let mut conn = Conn::open(port).unwrap();
                    barrier.wait();
                    tx.send(conn.send(&get(&format!("/__slow/{ms}"), MAIN)).unwrap())
                        .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all: Vec<Response> = rx.try_iter().collect();
        tally(&all)
    };
    // 80 held requests at once: never more than 64 at the upstream; at least 64 less what the
    // workers that got none of them keep (8 each).
    let held = slow(N + 16, 2000);
    let admitted = held.get("ok").copied().unwrap_or(0);
    assert_eq!(
        held,
        counts(&[("ok", admitted), ("concurrency_limited", N + 16 - admitted)])
    );
    assert!(
        echo.max_in_flight() <= N,
        "{} in flight",
        echo.max_in_flight()
    );
    assert!(admitted >= N - 3 * 8, "{admitted} admitted");
    eprintln!("kept slots: {admitted} of {N} admitted with slots kept");

    // Kept slots that no request takes go back at the heartbeat (every 2 s): after two, the
    // limit is whole again and exactly 64 of 72 held requests get in.
    thread::sleep(Duration::from_millis(4500));
    let again = slow(N + 8, 2000);
    assert_eq!(again, counts(&[("ok", N), ("concurrency_limited", 8)]));
    assert!(echo.max_in_flight() <= N);
}
