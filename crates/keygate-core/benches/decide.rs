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
//!   the in-memory fake of Envoy shared data, then the slot's release;
//! - `headers`: splitting proxy-wasm's serialized header map into a `RequestHead`;
//! - `compile`: the config compile step at 1k keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use keygate_core::digest::Digester;
use keygate_core::gate::{self, FailedAuthKey, GateStats, Host, Verdict};
use keygate_core::headers::parse_header_map;
use keygate_core::ratelimit::Counters;
use keygate_core::store::testing::FakeStore;
use keygate_core::store::SharedStore;
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

fn basic(i: usize, secret: &str) -> Vec<u8> {
    let raw = format!("{}:{secret}", key_sid(i));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
    .into_bytes()
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

/// proxy-wasm's serialized header map, as the host hands it over.
fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (n, v) in pairs {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
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

struct BenchHost {
    store: FakeStore,
}

impl Host for BenchHost {
    fn now_us(&self) -> u64 {
        u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        )
        .unwrap()
    }
    fn client_ip(&self) -> Option<IpAddr> {
        Some(LOOPBACK)
    }
    fn store(&self) -> &dyn SharedStore {
        &self.store
    }
    fn vm_id(&self) -> u64 {
        1
    }
    fn failed_auth_key(&self) -> Option<FailedAuthKey> {
        Some(FailedAuthKey::from_bytes([7; 16]))
    }
}

fn bench_gate(c: &mut Criterion) {
    let mut group = c.benchmark_group("gate");
    let path = path();
    let cfg = compiled(1_000);
    let auth = basic(0, &secret(0));
    let p = pairs(&path, &auth);
    let head = RequestHead::from_pairs(&p);
    let host = BenchHost {
        store: FakeStore::new(),
    };
    group.bench_function("evaluate_full_pipeline/1000", |b| {
        b.iter(|| {
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
    group.finish();
}

fn bench_headers(c: &mut Criterion) {
    let path = path();
    let auth = basic(0, &secret(0));
    let raw = serialize(&pairs(&path, &auth));
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
