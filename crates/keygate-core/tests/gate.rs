//! The whole gate against a fake host: fake shared store, settable clock and client address.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::net::IpAddr;

use base64::Engine as _;
use keygate_core::compile::compile_doc;
use keygate_core::config::*;
use keygate_core::gate::{evaluate, release, GateStats, Host, Verdict};
use keygate_core::headers::{AuthorizationHeader, RequestHead};
use keygate_core::ratelimit::testing::FakeStore;
use keygate_core::ratelimit::{Counters, LimitKind, SharedStore};
use keygate_core::{CompiledConfig, Reason};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

mod common;
use common::{fixture_doc, T0};

struct FakeHost {
    store: FakeStore,
    now_us: Cell<u64>,
    ip: Cell<Option<IpAddr>>,
    vm_id: u64,
}

impl FakeHost {
    fn new() -> FakeHost {
        FakeHost {
            store: FakeStore::new(),
            now_us: Cell::new(T0 * 1_000_000),
            ip: Cell::new("203.0.113.9".parse().ok()),
            vm_id: 1,
        }
    }
}

impl Host for FakeHost {
    fn now_us(&self) -> u64 {
        self.now_us.get()
    }
    fn client_ip(&self) -> Option<IpAddr> {
        self.ip.get()
    }
    fn store(&self) -> &dyn SharedStore {
        &self.store
    }
    fn vm_id(&self) -> u64 {
        self.vm_id
    }
}

fn rate(requests: u32, per: &str) -> RateDoc {
    RateDoc {
        requests,
        per: per.into(),
        shadow: false,
    }
}

fn basic(user: &str, secret: &str) -> Vec<u8> {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    )
    .into_bytes()
}

fn run(cfg: &CompiledConfig, host: &FakeHost, auth: &[u8], path: &str) -> (Verdict, GateStats) {
    let head = RequestHead {
        method: b"GET",
        path: path.as_bytes(),
        authorization: AuthorizationHeader::One(auth),
        cors_preflight_headers: false,
    };
    let mut stats = GateStats::default();
    let v = evaluate(cfg, &head, host, &mut stats);
    (v, stats)
}

fn outcome(v: &Verdict) -> Result<(), Reason> {
    match v {
        Verdict::Allow { .. } => Ok(()),
        Verdict::Deny(d) => Err(d.reason),
    }
}

const CALLS: &str = "/v2/accounts/AC1/calls";

#[test]
fn key_limit_admits_exactly_l_and_says_when_to_retry() {
    let mut doc = fixture_doc();
    doc.limits.key.main = Some(rate(3, "1m"));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let auth = basic("SKmain", "sk_live_main");
    let got: Vec<_> = (0..5)
        .map(|_| outcome(&run(&cfg, &host, &auth, CALLS).0))
        .collect();
    assert_eq!(
        got,
        vec![
            Ok(()),
            Ok(()),
            Ok(()),
            Err(Reason::RateLimitedKey),
            Err(Reason::RateLimitedKey)
        ]
    );
    match run(&cfg, &host, &auth, CALLS).0 {
        Verdict::Deny(d) => {
            assert_eq!(d.retry_after_s, Some(20));
            let q = d.quota.unwrap();
            assert_eq!(
                (q.kind, q.remaining, q.rate.requests),
                (LimitKind::Key, 0, 3)
            );
        }
        other => panic!("{other:?}"),
    }
    host.now_us.set(host.now_us.get() + 20_000_000);
    assert_eq!(outcome(&run(&cfg, &host, &auth, CALLS).0), Ok(()));
}

#[test]
fn account_limit_spans_keys_and_a_refusal_consumes_nothing_else() {
    let mut doc = fixture_doc();
    doc.limits.account = Some(rate(2, "1m"));
    doc.limits.key.main = Some(rate(100, "1m"));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let main = basic("SKmain", "sk_live_main");
    let rot = basic("SKrot", "sk_live_new");
    assert_eq!(outcome(&run(&cfg, &host, &main, CALLS).0), Ok(()));
    assert_eq!(outcome(&run(&cfg, &host, &rot, CALLS).0), Ok(()));
    let key_before = host.store.tat("kg:rl:2:k:SKmain");
    assert_eq!(
        outcome(&run(&cfg, &host, &main, CALLS).0),
        Err(Reason::RateLimitedAccount)
    );
    assert_eq!(
        host.store.tat("kg:rl:2:k:SKmain"),
        key_before,
        "key quota untouched by an account refusal"
    );
    // Another account is not affected.
    let ac3 = basic("SKac3", "sk_live_ac3");
    host.ip.set("10.0.0.1".parse().ok());
    assert_eq!(
        outcome(&run(&cfg, &host, &ac3, "/v2/accounts/AC3/calls").0),
        Ok(())
    );
}

#[test]
fn per_api_limits_default_from_the_api_and_override_per_key() {
    let mut doc = fixture_doc();
    doc.apis[0].limit = Some(rate(1, "1m"));
    let rot = doc.keys.iter_mut().find(|k| k.sid == "SKrot").unwrap();
    rot.limits = Some(KeyLimitsDoc {
        rate: None,
        apis: [("calls".to_owned(), rate(2, "1m"))].into(),
    });
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let main = basic("SKmain", "sk_live_main");
    assert_eq!(outcome(&run(&cfg, &host, &main, CALLS).0), Ok(()));
    assert_eq!(
        outcome(&run(&cfg, &host, &main, CALLS).0),
        Err(Reason::RateLimitedApi)
    );
    // Other APIs of the same key are not limited by it.
    assert_eq!(
        outcome(&run(&cfg, &host, &main, "/2010-04-01/Accounts/AC1/Messages.json").0),
        Ok(())
    );
    let rot = basic("SKrot", "sk_live_new");
    assert_eq!(outcome(&run(&cfg, &host, &rot, CALLS).0), Ok(()));
    assert_eq!(outcome(&run(&cfg, &host, &rot, CALLS).0), Ok(()));
    assert_eq!(
        outcome(&run(&cfg, &host, &rot, CALLS).0),
        Err(Reason::RateLimitedApi)
    );
}

#[test]
fn failed_authentication_is_limited_per_client_without_locking_out_the_victim() {
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(FailedAuthDoc {
        requests: 3,
        per: "1m".into(),
        shadow: false,
        buckets: None,
        ipv6_prefix: None,
    });
    doc.limits.key.main = Some(rate(100, "1m"));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let guess = basic("SKmain", "guess");
    let got: Vec<_> = (0..5)
        .map(|_| outcome(&run(&cfg, &host, &guess, CALLS).0))
        .collect();
    assert_eq!(got[..3], [Err(Reason::InvalidCredentials); 3]);
    assert_eq!(got[3..], [Err(Reason::TooManyFailedAuth); 2]);
    // Even the right secret from the attacker's address is refused before it is checked.
    let right = basic("SKmain", "sk_live_main");
    assert_eq!(
        outcome(&run(&cfg, &host, &right, CALLS).0),
        Err(Reason::TooManyFailedAuth)
    );
    // The victim, elsewhere, is not locked out, and failures consumed none of the key's quota.
    host.ip.set("198.51.100.1".parse().ok());
    assert_eq!(outcome(&run(&cfg, &host, &right, CALLS).0), Ok(()));
    match run(&cfg, &host, &right, CALLS).0 {
        Verdict::Allow { .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(
        host.store.tat("kg:rl:2:k:SKmain").unwrap() <= host.now_us.get() + 2 * 600_000,
        "only two requests taken"
    );
}

#[test]
fn ipv6_clients_share_a_bucket_per_prefix() {
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(FailedAuthDoc {
        requests: 2,
        per: "1m".into(),
        shadow: false,
        buckets: None,
        ipv6_prefix: Some(64),
    });
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let guess = basic("SKmain", "guess");
    host.ip.set("2001:db8:1:2::1".parse().ok());
    let _ = run(&cfg, &host, &guess, CALLS);
    host.ip.set("2001:db8:1:2::ffff".parse().ok());
    let _ = run(&cfg, &host, &guess, CALLS);
    host.ip.set("2001:db8:1:2:abcd::9".parse().ok());
    assert_eq!(
        outcome(&run(&cfg, &host, &guess, CALLS).0),
        Err(Reason::TooManyFailedAuth)
    );
}

#[test]
fn concurrency_limit_counts_in_flight_and_gives_rates_back_when_refusing() {
    let mut doc = fixture_doc();
    doc.limits.account_concurrency = Some(2);
    doc.limits.key.main = Some(rate(100, "1m"));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let auth = basic("SKmain", "sk_live_main");
    let t1 = match run(&cfg, &host, &auth, CALLS).0 {
        Verdict::Allow {
            inflight: Some(t), ..
        } => t,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        run(&cfg, &host, &auth, CALLS).0,
        Verdict::Allow {
            inflight: Some(_),
            ..
        }
    ));
    let tat_before = host.store.tat("kg:rl:2:k:SKmain");
    assert_eq!(
        outcome(&run(&cfg, &host, &auth, CALLS).0),
        Err(Reason::ConcurrencyLimited)
    );
    assert_eq!(
        host.store.tat("kg:rl:2:k:SKmain"),
        tat_before,
        "rate given back"
    );
    release(16, &t1, &host, &mut Counters::default());
    assert_eq!(outcome(&run(&cfg, &host, &auth, CALLS).0), Ok(()));
}

#[test]
fn shadow_limits_count_without_refusing() {
    let mut doc = fixture_doc();
    doc.limits.key.main = Some(RateDoc {
        requests: 1,
        per: "1m".into(),
        shadow: true,
    });
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let auth = basic("SKmain", "sk_live_main");
    assert!(run(&cfg, &host, &auth, CALLS).1.shadow_limited.is_empty());
    let (v, stats) = run(&cfg, &host, &auth, CALLS);
    assert_eq!(outcome(&v), Ok(()));
    assert_eq!(stats.shadow_limited, vec![LimitKind::Key]);
}

#[test]
fn exhausted_retries_deny_by_default_and_allow_when_configured() {
    let mut doc = fixture_doc();
    doc.limits.key.main = Some(rate(10, "1m"));
    doc.limits.max_cas_retries = Some(3);
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let auth = basic("SKmain", "sk_live_main");
    host.store.conflicts.set(1000);
    let (v, stats) = run(&cfg, &host, &auth, CALLS);
    assert_eq!(outcome(&v), Err(Reason::LimiterUnavailable));
    assert_eq!(stats.counters.retries_exhausted, 1);
    assert_eq!(stats.counters.cas_retries, 3);
    doc.limits.on_store_error = OnStoreErrorDoc::Allow;
    let cfg = compile_doc(&doc).unwrap();
    let (v, stats) = run(&cfg, &host, &auth, CALLS);
    assert_eq!(outcome(&v), Ok(()));
    assert_eq!(stats.store_failures_allowed, 1);
}

#[test]
fn quota_is_reported_only_when_configured() {
    let mut doc = fixture_doc();
    doc.limits.key.main = Some(rate(10, "1m"));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let auth = basic("SKmain", "sk_live_main");
    assert!(matches!(
        run(&cfg, &host, &auth, CALLS).0,
        Verdict::Allow { quota: None, .. }
    ));
    doc.limits.quota_headers = true;
    let cfg = compile_doc(&doc).unwrap();
    match run(&cfg, &host, &auth, CALLS).0 {
        Verdict::Allow { quota: Some(q), .. } => {
            assert_eq!((q.kind, q.remaining), (LimitKind::Key, 8))
        }
        other => panic!("{other:?}"),
    }
}
