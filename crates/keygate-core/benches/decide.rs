//! Criterion benchmarks of the pure decision logic, natively (`cargo bench -p keygate-core`), so
//! a regression in the logic shows without Envoy. The key sets follow `bench/gen.py`: key i has
//! SID `SK` + 32 hex digits of i, ten keys per account, secret `sk_live_` + 32 hex digits; key 0
//! carries the full pipeline (API list, IP allowlist 127.0.0.1/32, key, key × API and account
//! rates, account concurrency, failed-auth limiter), with limits no run can reach.
//!
//! Groups:
//! - `decide`: `keygate_core::decide` (Basic/Bearer parsing, path canonicalisation, SHA-256,
//!   lookups, allowlist, route match, permissions) at 1k and 100k keys, and a wrong secret;
//! - `gate`: the whole `gate::evaluate` (decide + every rate limit + concurrency slot) against
//!   the core's fake host (`testing::FakeHost`: the in-memory fake of Envoy shared data), then
//!   the slot's release;
//! - `headers`: splitting proxy-wasm's serialized header map into a `RequestHead`;
//! - `compile`: the config compile step at 1k keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use keygate_core::digest::Digester;
use keygate_core::gate::{self, FailedAuthKey, GateStats, Verdict};
use keygate_core::headers::{parse_header_map, serialize_header_map};
use keygate_core::ratelimit::Counters;
use keygate_core::testing::{self, FakeHost};
use keygate_core::{compile, decide, CompiledConfig, Decision, RequestHead};

const HUGE: &str = r#"{"requests":1000000000,"per":"1h"}"#;
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn key_sid(i: usize) -> String {
    format!("SK{i:032x}")
}

fn account_sid(i: usize) -> String {
    format!("AC{:032x}", i / 10)
}

/// Deterministic per-key secret (the generator in bench/gen.py uses a different derivation;
/// only the shape matters here).
fn secret(i: usize) -> String {
    format!(
        "sk_live_{:032x}",
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    )
}

fn config_json(n: usize) -> String {
    let mut s = String::with_capacity(n * 160 + 2048);
    s.push_str(r#"{"schema":"keygate.config/v1","version":1,"#);
    s.push_str(r#""settings":{"realm":"keygate","secret_digest":"sha256"},"#);
    s.push_str(r#""apis":[{"name":"calls","methods":["GET","POST"],"paths":["/v2/accounts/{account_sid}/calls","/v2/accounts/{account_sid}/calls/**"]},"#);
    s.push_str(r#"{"name":"messages","methods":["GET","POST"],"paths":["/2010-04-01/Accounts/{account_sid}/Messages.json","/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json"]},"#);
    s.push_str(r#"{"name":"keys","management":true,"methods":["GET","POST","DELETE"],"paths":["/2010-04-01/Accounts/{account_sid}/Keys.json","/2010-04-01/Accounts/{account_sid}/Keys/{key_sid}.json"]},"#);
    s.push_str(r#"{"name":"balance","publishable":true,"methods":["GET"],"paths":["/api/account/balance"]}],"#);
    write!(s, r#""limits":{{"failed_auth":{HUGE}}},"accounts":["#).unwrap();
    for a in 0..n.div_ceil(10) {
        if a > 0 {
            s.push(',');
        }
        if a == 0 {
            write!(
                s,
                r#"{{"sid":"{}","status":"active","limits":{{"rate":{HUGE},"concurrency":100000}}}}"#,
                account_sid(0)
            )
            .unwrap();
        } else {
            write!(s, r#"{{"sid":"AC{a:032x}","status":"active"}}"#).unwrap();
        }
    }
    s.push_str(r#"],"keys":["#);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let digest = Digester::Sha256.digest_hex(secret(i).as_bytes());
        if i == 0 {
            write!(
                s,
                r#"{{"sid":"{}","account_sid":"{}","role":"standard","apis":["calls"],"allowed_ips":["127.0.0.1/32"],"limits":{{"rate":{HUGE},"apis":{{"calls":{HUGE}}}}},"secrets":[{{"digest":"{digest}"}}]}}"#,
                key_sid(0),
                account_sid(0)
            )
            .unwrap();
        } else {
            write!(
                s,
                r#"{{"sid":"{}","account_sid":"{}","role":"standard","secrets":[{{"digest":"{digest}"}}]}}"#,
                key_sid(i),
                account_sid(i)
            )
            .unwrap();
        }
    }
    s.push_str("]}");
    s
}

/// `Authorization: Basic` for key `i`.
fn basic(i: usize, secret: &str) -> Vec<u8> {
    testing::basic(&key_sid(i), secret)
}

fn path() -> Vec<u8> {
    format!("/v2/accounts/{}/calls", account_sid(0)).into_bytes()
}

/// A request as wrk sends it, after Envoy added its own headers.
fn pairs<'a>(path: &'a [u8], auth: &'a [u8]) -> Vec<(&'a [u8], &'a [u8])> {
    vec![
        (b":authority", b"127.0.0.1:10000"),
        (b":path", path),
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b"authorization", auth),
        (b"x-forwarded-proto", b"http"),
        (b"x-request-id", b"c5faed7d-5c11-44b7-8d1c-0c19ad4e9614"),
    ]
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn compiled(n: usize) -> CompiledConfig {
    compile(config_json(n).as_bytes()).expect("benchmark config compiles")
}

fn bench_decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    let path = path();
    let now = now_unix();
    for n in [1_000, 100_000] {
        let cfg = compiled(n);
        let auth = basic(0, &secret(0));
        let p = pairs(&path, &auth);
        let head = RequestHead::from_pairs(&p);
        assert!(matches!(
            decide(&cfg, &head, now, &mut || Some(LOOPBACK)),
            Decision::Allow(_)
        ));
        group.bench_with_input(BenchmarkId::new("basic_allow", n), &head, |b, head| {
            b.iter(|| decide(&cfg, black_box(head), now, &mut || Some(LOOPBACK)))
        });
        if n == 1_000 {
            let bearer = format!("Bearer {}", secret(0)).into_bytes();
            let p = pairs(&path, &bearer);
            let head = RequestHead::from_pairs(&p);
            assert!(matches!(
                decide(&cfg, &head, now, &mut || Some(LOOPBACK)),
                Decision::Allow(_)
            ));
            group.bench_with_input(BenchmarkId::new("bearer_allow", n), &head, |b, head| {
                b.iter(|| decide(&cfg, black_box(head), now, &mut || Some(LOOPBACK)))
            });
            let wrong = basic(0, "sk_live_ffffffffffffffffffffffffffffffff");
            let p = pairs(&path, &wrong);
            let head = RequestHead::from_pairs(&p);
            assert!(matches!(
                decide(&cfg, &head, now, &mut || Some(LOOPBACK)),
                Decision::Deny(_)
            ));
            group.bench_with_input(
                BenchmarkId::new("basic_wrong_secret", n),
                &head,
                |b, head| b.iter(|| decide(&cfg, black_box(head), now, &mut || Some(LOOPBACK))),
            );
        }
    }
    group.finish();
}

/// Microseconds since the Unix epoch, now.
fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

fn bench_gate(c: &mut Criterion) {
    let mut group = c.benchmark_group("gate");
    let path = path();
    let cfg = compiled(1_000);
    let auth = basic(0, &secret(0));
    let p = pairs(&path, &auth);
    let head = RequestHead::from_pairs(&p);
    // The wall clock, read at every request as the filter does; a fixed key (no store read).
    let host = FakeHost::new()
        .with_client_ip(Some(LOOPBACK))
        .with_failed_auth_key(FailedAuthKey::from_bytes([7; 16]));
    group.bench_function("evaluate_full_pipeline/1000", |b| {
        b.iter(|| {
            host.now_us.set(now_us());
            let mut stats = GateStats::default();
            let verdict = gate::evaluate(&cfg, black_box(&head), &host, &mut stats);
            match verdict {
                Verdict::Allow {
                    inflight: Some(ticket),
                    ..
                } => gate::release(&ticket, &host, &mut Counters::default()),
                other => panic!("the benchmark key must be admitted: {other:?}"),
            }
        })
    });
    // As the filter runs it: the VM's own state (leases, kept slots, clear addresses, digest memo).
    let vm = FakeHost::new()
        .with_client_ip(Some(LOOPBACK))
        .with_failed_auth_key(FailedAuthKey::from_bytes([7; 16]))
        .with_local();
    group.bench_function("evaluate_full_pipeline_vm_local/1000", |b| {
        b.iter(|| {
            vm.now_us.set(now_us());
            let mut stats = GateStats::default();
            let verdict = gate::evaluate(&cfg, black_box(&head), &vm, &mut stats);
            match verdict {
                Verdict::Allow {
                    inflight: Some(ticket),
                    ..
                } => {
                    let local = vm.local.as_ref().expect("local");
                    local.slots.hold(&ticket);
                    let now = || vm.now_us.get();
                    local.slots.release(
                        &ticket,
                        &vm.store,
                        vm.vm_id,
                        &now,
                        &mut Counters::default(),
                    );
                }
                other => panic!("the benchmark key must be admitted: {other:?}"),
            }
        })
    });
    group.finish();
}

fn bench_headers(c: &mut Criterion) {
    let path = path();
    let auth = basic(0, &secret(0));
    let raw = serialize_header_map(&pairs(&path, &auth));
    c.bench_function("headers/parse_header_map+from_pairs", |b| {
        b.iter(|| {
            let p = parse_header_map(black_box(&raw)).unwrap_or_default();
            black_box(RequestHead::from_pairs(&p).authorization);
        })
    });
}

fn bench_compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    let json = config_json(1_000);
    group.bench_function("keys/1000", |b| {
        b.iter_batched(
            || json.clone(),
            |j| compile(j.as_bytes()).expect("compiles"),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_decide,
    bench_gate,
    bench_headers,
    bench_compile
);
criterion_main!(benches);
