//! The whole gate against a fake host: fake shared store, settable clock and client address.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;

use keygate_core::compile::compile_doc;
use keygate_core::config::*;
use keygate_core::fleet::Subject;
use keygate_core::gate::{
    evaluate, failed_auth_buckets, failed_auth_precheck, release, shared_failed_auth_key,
    FailedAuthKey, GateStats, Verdict,
};
use keygate_core::headers::{AuthorizationHeader, RequestHead};
use keygate_core::ratelimit::{Counters, LimitKind};
use keygate_core::store::FAILED_AUTH_KEY;
use keygate_core::testing::{basic, key_bytes, FakeHost, FakeStore};
use keygate_core::{CompiledConfig, Reason};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

mod common;
use common::{fixture_doc, T0};

fn rate(requests: u32, per: &str) -> RateDoc {
    RateDoc {
        requests,
        per: per.into(),
        shadow: false,
        scope: Default::default(),
    }
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
fn fleet_limits_are_left_to_the_fleet_and_local_ones_stay_exact_in_front() {
    let mut doc = fixture_doc();
    let fleet = |requests| RateDoc {
        scope: LimitScope::Fleet,
        ..rate(requests, "1m")
    };
    doc.limits.account = Some(fleet(60));
    doc.limits.key.main = Some(rate(2, "1m"));
    doc.apis[0].limit = Some(fleet(30));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let main = basic("SKmain", "sk_live_main");
    let needs = |v: &Verdict| match v {
        Verdict::Allow {
            fleet: Some(hold), ..
        } => hold
            .needs
            .iter()
            .map(|n| n.subject.clone())
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let (v, _) = run(&cfg, &host, &main, CALLS);
    assert_eq!(
        needs(&v),
        vec![
            Subject::KeyApi {
                api: "calls".into(),
                key_sid: "SKmain".into()
            },
            Subject::Account {
                account_sid: "AC1".into()
            },
        ]
    );
    // Nothing of the fleet limits is counted here; the key's local 2 a minute is.
    assert_eq!(host.store.tat("kg:rl:2:a:AC1"), None);
    assert_eq!(outcome(&run(&cfg, &host, &main, CALLS).0), Ok(()));
    assert_eq!(
        outcome(&run(&cfg, &host, &main, CALLS).0),
        Err(Reason::RateLimitedKey)
    );
    // The fleet's refusal gives the local limits back.
    let host = FakeHost::new();
    let (v, _) = run(&cfg, &host, &main, CALLS);
    let taken = host.store.tat("kg:rl:2:k:SKmain");
    assert!(taken.is_some());
    match v {
        Verdict::Allow {
            fleet: Some(hold), ..
        } => {
            hold.give_back(&host, &mut Counters::default());
        }
        other => panic!("{other:?}"),
    }
    assert!(host.store.tat("kg:rl:2:k:SKmain") < taken);
    // So the key's 2 a minute are both still there.
    assert_eq!(outcome(&run(&cfg, &host, &main, CALLS).0), Ok(()));
    assert_eq!(outcome(&run(&cfg, &host, &main, CALLS).0), Ok(()));
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

fn failed_auth_doc(requests: u32, buckets: u32, ipv6_prefix: u8) -> FailedAuthDoc {
    FailedAuthDoc {
        requests,
        per: "1h".into(),
        shadow: false,
        buckets: Some(buckets),
        ipv6_prefix: Some(ipv6_prefix),
    }
}

/// Sends wrong secrets from the host's address until it is refused before comparison; returns
/// how many were compared (401).
fn guess_until_locked(cfg: &CompiledConfig, host: &FakeHost, limit: u32) -> u32 {
    let guess = basic("SKmain", "guess");
    for compared in 0..=2 * limit {
        match outcome(&run(cfg, host, &guess, CALLS).0) {
            Err(Reason::InvalidCredentials) => {}
            Err(Reason::TooManyFailedAuth) => return compared,
            other => panic!("{other:?}"),
        }
    }
    panic!("{:?} was never locked out", host.ip.get())
}

/// A v4 address in 10/8 from a counter.
fn v4(i: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | i))
}

#[test]
fn a_client_is_refused_only_when_both_of_its_buckets_are_exhausted() {
    const B: u32 = 64;
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(failed_auth_doc(2, B, 64));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let key = FailedAuthKey::from_bytes(key_bytes(1));
    let victim: IpAddr = "198.51.100.7".parse().unwrap();
    let [v1, v2] = failed_auth_buckets(&key, B, 64, victim);
    assert_ne!(v1, v2, "two distinct buckets");
    // Attackers that share exactly one bucket with the victim (found with the key, which a
    // real attacker does not have).
    let sharing = |want: u32, avoid: u32| {
        (0..100_000)
            .map(v4)
            .find(|ip| {
                let pair = failed_auth_buckets(&key, B, 64, *ip);
                pair.contains(&want) && !pair.contains(&avoid)
            })
            .unwrap()
    };
    let right = basic("SKmain", "sk_live_main");

    host.ip.set(Some(sharing(v1, v2)));
    assert_eq!(guess_until_locked(&cfg, &host, 2), 2);
    host.ip.set(Some(victim));
    assert_eq!(
        outcome(&run(&cfg, &host, &right, CALLS).0),
        Ok(()),
        "one exhausted bucket of two does not refuse"
    );

    host.ip.set(Some(sharing(v2, v1)));
    assert_eq!(guess_until_locked(&cfg, &host, 2), 2);
    host.ip.set(Some(victim));
    match run(&cfg, &host, &right, CALLS).0 {
        Verdict::Deny(d) => {
            // 2 per hour: one comes back 30 minutes after the bucket filled.
            assert_eq!(
                (d.reason, d.retry_after_s, d.authenticated()),
                (Reason::TooManyFailedAuth, Some(1800), false)
            );
            assert_eq!(d.quota.unwrap().kind, LimitKind::FailedAuth);
        }
        other => panic!("both buckets exhausted: {other:?}"),
    }
    host.now_us.set(host.now_us.get() + 1800 * 1_000_000);
    assert_eq!(outcome(&run(&cfg, &host, &right, CALLS).0), Ok(()));
}

#[test]
fn a_guesser_is_locked_out_even_when_one_of_its_buckets_is_already_full() {
    // Its failures still fill the other bucket (taken independently, not all-or-nothing).
    const B: u32 = 64;
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(failed_auth_doc(3, B, 64));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    let key = FailedAuthKey::from_bytes(key_bytes(1));
    let first = v4(1);
    let [a, _] = failed_auth_buckets(&key, B, 64, first);
    let second = (2..100_000)
        .map(v4)
        .find(|ip| failed_auth_buckets(&key, B, 64, *ip)[1] == a)
        .unwrap();
    host.ip.set(Some(first));
    assert_eq!(guess_until_locked(&cfg, &host, 3), 3);
    host.ip.set(Some(second));
    assert_eq!(guess_until_locked(&cfg, &host, 3), 3);
}

#[test]
fn bucket_pairs_depend_on_the_key() {
    let ip: IpAddr = "198.51.100.7".parse().unwrap();
    let pairs: std::collections::HashSet<[u32; 2]> = (0..200)
        .map(|seed| {
            failed_auth_buckets(&FailedAuthKey::from_bytes(key_bytes(seed)), 65_536, 64, ip)
        })
        .collect();
    // 200 keys: a collision among random pairs of 65536 buckets has probability ~1e-5.
    assert_eq!(pairs.len(), 200, "different keys give different pairs");
    let key = FailedAuthKey::from_bytes(key_bytes(9));
    for i in 0..10_000 {
        let [a, b] = failed_auth_buckets(&key, 1000, 64, v4(i));
        assert!(a != b && a < 1000 && b < 1000, "{a} {b}");
    }
    assert_eq!(failed_auth_buckets(&key, 1, 64, ip), [0, 0]);
    // One IPv6 prefix is one subject; the next prefix is another.
    let in_48 = |s: &str| failed_auth_buckets(&key, 65_536, 48, s.parse().unwrap());
    assert_eq!(in_48("2001:db8:7::1"), in_48("2001:db8:7:ffff::9"));
    assert_ne!(in_48("2001:db8:7::1"), in_48("2001:db8:8::1"));
}

#[test]
fn an_attacker_who_finds_a_victims_buckets_offline_has_the_wrong_key() {
    // With the key, picking addresses that land on the victim's two buckets locks it out; the
    // same addresses chosen under any other key (all an attacker can compute offline) do not.
    const B: u32 = 4096;
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(failed_auth_doc(2, B, 64));
    let cfg = compile_doc(&doc).unwrap();
    let victim: IpAddr = "198.51.100.7".parse().unwrap();
    let right = basic("SKmain", "sk_live_main");
    let attack = |guessed_seed: u64, host: &FakeHost| {
        let guessed = FailedAuthKey::from_bytes(key_bytes(guessed_seed));
        let [v1, v2] = failed_auth_buckets(&guessed, B, 64, victim);
        for want in [v1, v2] {
            let ip = (0..1_000_000)
                .map(v4)
                .find(|ip| failed_auth_buckets(&guessed, B, 64, *ip).contains(&want))
                .unwrap();
            host.ip.set(Some(ip));
            guess_until_locked(&cfg, host, 2);
        }
        host.ip.set(Some(victim));
        outcome(&run(&cfg, host, &right, CALLS).0)
    };
    let real_seed = 77;
    assert_eq!(
        attack(real_seed, &FakeHost::new().with_key_seed(real_seed)),
        Err(Reason::TooManyFailedAuth)
    );
    let locked = (1000..1020)
        .filter(|&guess| attack(guess, &FakeHost::new().with_key_seed(real_seed)).is_err())
        .count();
    // Under the real key each wrong guess poisons 4 random buckets of 4096: the victim's pair
    // is among them with probability 6/C(4096, 2) < 1e-6.
    assert_eq!(locked, 0);
}

/// P(both of a client's two buckets are among those touched by `n` random distinct pairs of
/// `b` buckets) = 1 − 2·(1 − 2/b)^n + ((b−2)(b−3) / (b(b−1)))^n ≈ (1 − e^(−2n/b))².
fn lockout_probability(b: f64, n: f64) -> f64 {
    1.0 - 2.0 * (1.0 - 2.0 / b).powf(n) + ((b - 2.0) * (b - 3.0) / (b * (b - 1.0))).powf(n)
}

#[test]
fn an_attacker_without_the_key_locks_out_a_client_only_with_the_computed_probability() {
    // Each trial: a fresh process key; 100 attacking IPv6 /48s (one subject each with
    // ipv6_prefix 48), each guessing until it is itself refused, so every bucket of its pair is
    // exhausted; then 1000 clients elsewhere present the right secret.
    const B: u32 = 1024;
    const L: u32 = 2;
    const ATTACKERS: u32 = 100;
    const VICTIMS: u32 = 1000;
    const TRIALS: u64 = 8;
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(failed_auth_doc(L, B, 48));
    let cfg = compile_doc(&doc).unwrap();
    let right = basic("SKmain", "sk_live_main");
    let mut locked = 0u32;
    let mut compared = 0u32;
    for trial in 0..TRIALS {
        let host = FakeHost::new().with_key_seed(0x5eed_0000 + trial);
        for a in 0..ATTACKERS {
            // A different address of the same /48 for every guess changes nothing.
            host.ip.set(Some(
                format!("2001:db8:{a:x}:{trial:x}::1").parse().unwrap(),
            ));
            compared += guess_until_locked(&cfg, &host, L);
        }
        for v in 0..VICTIMS {
            host.ip.set(Some(IpAddr::V4(std::net::Ipv4Addr::new(
                198,
                18,
                (v >> 8) as u8,
                v as u8,
            ))));
            match outcome(&run(&cfg, &host, &right, CALLS).0) {
                Ok(()) => {}
                Err(Reason::TooManyFailedAuth) => locked += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    let samples = f64::from(VICTIMS) * TRIALS as f64;
    let measured = f64::from(locked) / samples;
    let expected = lockout_probability(f64::from(B), f64::from(ATTACKERS));
    eprintln!("locked out {locked} of {samples}: {measured:.4}, expected {expected:.4}");
    // Standard error ~6.5 % of the expectation here; ±25 % is about 4 of them. One bucket per
    // address (0.093) or refusing when either bucket is full (0.32) is far outside.
    assert!((0.0314 - expected).abs() < 0.0005, "{expected}");
    assert!(
        (measured - expected).abs() < 0.25 * expected,
        "{measured} vs {expected}"
    );
    // An attacker spends at most L failures per /48 (fewer where its pair was partly full).
    assert!(compared <= L * ATTACKERS * TRIALS as u32, "{compared}");
    assert!(compared >= ATTACKERS * TRIALS as u32, "{compared}");
}

#[test]
fn every_vm_of_a_process_uses_the_key_the_first_one_stored() {
    let store = FakeStore::new();
    let first = shared_failed_auth_key(&store, &mut || Some([1; 16])).unwrap();
    let second = shared_failed_auth_key(&store, &mut || Some([2; 16])).unwrap();
    assert_eq!(first, FailedAuthKey::from_bytes([1; 16]));
    assert_eq!(second, first, "the second VM reads the stored key");
    assert_eq!(format!("{first:?}"), "FailedAuthKey(..)", "Debug hides it");
    // A racing VM that inserts between our read and our write wins; we use its key.
    let raced = FakeStore::new();
    raced.raw_set("other", b"");
    let mut calls = 0;
    let got = shared_failed_auth_key(&raced, &mut || {
        calls += 1;
        if calls == 1 {
            raced.raw_set(FAILED_AUTH_KEY, &[9; 16]);
        }
        Some([3; 16])
    });
    assert_eq!(got, Some(FailedAuthKey::from_bytes([9; 16])));
    // A value of the wrong length is replaced; no randomness or no store gives no key.
    let bad = FakeStore::new();
    bad.raw_set(FAILED_AUTH_KEY, b"short");
    assert_eq!(
        shared_failed_auth_key(&bad, &mut || Some([4; 16])),
        Some(FailedAuthKey::from_bytes([4; 16]))
    );
    assert_eq!(
        shared_failed_auth_key(&FakeStore::new(), &mut || None),
        None
    );
    let down = FakeStore::new();
    down.fail_gets.set(true);
    assert_eq!(shared_failed_auth_key(&down, &mut || Some([5; 16])), None);
}

#[test]
fn without_a_key_the_limiter_follows_on_store_error() {
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(failed_auth_doc(3, 65_536, 64));
    let cfg = compile_doc(&doc).unwrap();
    let host = FakeHost::new();
    host.random.set(None);
    let right = basic("SKmain", "sk_live_main");
    let (v, stats) = run(&cfg, &host, &right, CALLS);
    match v {
        Verdict::Deny(d) => assert_eq!(
            (d.reason, d.retry_after_s),
            (Reason::TooManyFailedAuth, Some(1))
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(stats.counters.store_errors, 1);
    // Requests without credentials never need it.
    let head = RequestHead {
        method: b"GET",
        path: CALLS.as_bytes(),
        authorization: AuthorizationHeader::Absent,
        cors_preflight_headers: false,
    };
    let mut stats = GateStats::default();
    assert_eq!(
        outcome(&evaluate(&cfg, &head, &host, &mut stats)),
        Err(Reason::MissingCredentials)
    );
    doc.limits.on_store_error = OnStoreErrorDoc::Allow;
    let cfg = compile_doc(&doc).unwrap();
    let (v, stats) = run(&cfg, &host, &right, CALLS);
    assert_eq!(outcome(&v), Ok(()));
    assert_eq!(stats.store_failures_allowed, 1);
}

#[test]
fn the_precheck_reads_one_bucket_when_it_has_room_and_writes_nothing() {
    let mut doc = fixture_doc();
    doc.limits.failed_auth = Some(failed_auth_doc(1, 65_536, 64));
    let cfg = compile_doc(&doc).unwrap();
    let store = FakeStore::new();
    let key = FailedAuthKey::from_bytes([6; 16]);
    let ip: IpAddr = "192.0.2.1".parse().unwrap();
    let mut stats = GateStats::default();
    let now = T0 * 1_000_000;
    assert_eq!(
        failed_auth_precheck(&cfg.catalog, &key, &store, ip, now, &mut stats),
        None
    );
    assert_eq!(store.sets.get(), 1, "only the anchor was ever written");
    keygate_core::gate::failed_auth_record(
        &cfg.catalog,
        &key,
        &store,
        ip,
        now,
        &mut stats.counters,
    );
    let [a, b] = failed_auth_buckets(&key, 65_536, 64, ip);
    for n in [a, b] {
        assert!(
            store.tat(&format!("kg:fa:2:{n}")).unwrap() > now,
            "bucket {n} taken"
        );
    }
    let d = failed_auth_precheck(&cfg.catalog, &key, &store, ip, now, &mut stats).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_s),
        (Reason::TooManyFailedAuth, Some(3600))
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
    release(&t1, &host, &mut Counters::default());
    assert_eq!(outcome(&run(&cfg, &host, &auth, CALLS).0), Ok(()));
}

#[test]
fn shadow_limits_count_without_refusing() {
    let mut doc = fixture_doc();
    doc.limits.key.main = Some(RateDoc {
        requests: 1,
        per: "1m".into(),
        shadow: true,
        scope: Default::default(),
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

#[test]
fn a_remembered_secret_is_refused_once_its_grace_ends_or_the_key_loses_it() {
    // The VM's digest memo only saves digesting: the decision still compares with the key's
    // secrets as they are now, with their expiry.
    let doc = fixture_doc();
    let cfg = compile_doc(&doc).unwrap();
    let before = (T0 - 10) * 1_000_000;
    let host = FakeHost::new().with_local().with_now_us(before);
    let old = basic("SKrot", "sk_live_old");
    assert_eq!(outcome(&run(&cfg, &host, &old, CALLS).0), Ok(()));
    assert_eq!(outcome(&run(&cfg, &host, &old, CALLS).0), Ok(()));
    assert_eq!(host.local.as_ref().unwrap().digests.len(), 1);
    host.now_us.set((T0 + 1) * 1_000_000);
    assert_eq!(
        outcome(&run(&cfg, &host, &old, CALLS).0),
        Err(Reason::InvalidCredentials)
    );
    // The new secret, remembered, then taken off the key by a new config.
    let new = basic("SKrot", "sk_live_new");
    assert_eq!(outcome(&run(&cfg, &host, &new, CALLS).0), Ok(()));
    let mut doc = doc;
    let rot = doc.keys.iter_mut().find(|k| k.sid == "SKrot").unwrap();
    rot.secrets = vec![common::d("sk_live_newer")];
    let cfg = compile_doc(&doc).unwrap();
    assert_eq!(
        outcome(&run(&cfg, &host, &new, CALLS).0),
        Err(Reason::InvalidCredentials)
    );
    // A wrong secret is never remembered.
    let wrong = basic("SKmain", "sk_live_wrong");
    let remembered = host.local.as_ref().unwrap().digests.len();
    assert_eq!(
        outcome(&run(&cfg, &host, &wrong, CALLS).0),
        Err(Reason::InvalidCredentials)
    );
    assert_eq!(host.local.as_ref().unwrap().digests.len(), remembered);
}
