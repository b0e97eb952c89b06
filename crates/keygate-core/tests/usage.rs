//! The gate counts usage for the principal that authenticated and the secret that matched
//! (plaintexts of the fixture's secrets in `decide.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keygate_core::compile::compile_doc;
use keygate_core::config::RateDoc;
use keygate_core::digest::Digester;
use keygate_core::gate::{evaluate, GateStats, Verdict};
use keygate_core::headers::{AuthorizationHeader, RequestHead};
use keygate_core::testing::{basic, FakeHost};
use keygate_core::usage::{flush, read_record, UsageEntry};
use keygate_core::CompiledConfig;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

mod common;
use common::{fixture_doc, T0};

fn run(cfg: &CompiledConfig, host: &FakeHost, auth: &[u8], path: &str) -> Verdict {
    let head = RequestHead {
        method: b"GET",
        path: path.as_bytes(),
        authorization: AuthorizationHeader::One(auth),
        cors_preflight_headers: false,
    };
    evaluate(cfg, &head, host, &mut GateStats::default())
}

/// The secret id the usage names: the first 8 bytes of its SHA-256, in hex.
fn tag(secret: &str) -> String {
    Digester::Sha256.digest_hex(secret.as_bytes())[..16].to_owned()
}

fn entries(host: &FakeHost) -> Vec<UsageEntry> {
    let local = host.local.as_ref().unwrap();
    assert!(flush(&host.store, &local.usage, 1));
    read_record(&host.store).map(|r| r.acc).unwrap_or_default()
}

fn entry<'a>(all: &'a [UsageEntry], key: Option<&str>) -> &'a UsageEntry {
    all.iter()
        .find(|e| e.key_sid.as_deref() == key)
        .unwrap_or_else(|| panic!("no entry for {key:?} in {all:?}"))
}

const CALLS: &str = "/v2/accounts/AC1/calls";

#[test]
fn each_request_that_authenticated_is_counted_for_its_key_and_the_secret_that_matched() {
    let mut doc = fixture_doc();
    doc.limits.key.standard = Some(RateDoc {
        requests: 3,
        per: "1h".into(),
        shadow: false,
        scope: Default::default(),
    });
    let cfg = compile_doc(&doc).unwrap();
    // Before the old secret's grace ends (T0), both of SKrot's secrets work.
    let host = FakeHost::new()
        .with_local()
        .with_now_us((T0 - 30) * 1_000_000);
    host.local.as_ref().unwrap().usage.enable(true);
    let old = basic("SKrot", "sk_live_old");
    let new = basic("SKrot", "sk_live_new");
    assert!(matches!(
        run(&cfg, &host, &old, CALLS),
        Verdict::Allow { .. }
    ));
    assert!(matches!(
        run(&cfg, &host, &new, CALLS),
        Verdict::Allow { .. }
    ));
    assert!(matches!(
        run(&cfg, &host, &new, CALLS),
        Verdict::Allow { .. }
    ));
    // The fourth is over the key's rate: denied, still this key's and this secret's.
    assert!(matches!(run(&cfg, &host, &new, CALLS), Verdict::Deny(_)));
    // A standard key outside its APIs, and the account's own token.
    let std = basic("SKstd", "sk_live_std");
    let msgs = "/2010-04-01/Accounts/AC1/Messages.json";
    assert!(matches!(run(&cfg, &host, &std, msgs), Verdict::Deny(_)));
    let account = basic("AC1", "tok_ac1");
    assert!(matches!(
        run(&cfg, &host, &account, CALLS),
        Verdict::Allow { .. }
    ));
    // Failed authentication belongs to no key: not counted.
    let wrong = basic("SKrot", "sk_live_wrong");
    assert!(matches!(run(&cfg, &host, &wrong, CALLS), Verdict::Deny(_)));

    let all = entries(&host);
    assert_eq!(all.len(), 3, "{all:?}");
    let rot = entry(&all, Some("SKrot"));
    assert_eq!(rot.minute % 60, 0);
    assert_eq!(rot.account_sid, "AC1");
    assert_eq!(rot.allowed, 3);
    assert_eq!(
        rot.denied.iter().collect::<Vec<_>>(),
        vec![(&"rate_limited_key".to_owned(), &1)]
    );
    let n_of = |e: &UsageEntry, secret: &str| {
        e.secrets
            .iter()
            .find(|s| s.id == tag(secret))
            .map(|s| (s.n, s.last_used_s))
    };
    assert_eq!(n_of(rot, "sk_live_old"), Some((1, T0 - 30)));
    assert_eq!(n_of(rot, "sk_live_new"), Some((3, T0 - 30)));
    let std_e = entry(&all, Some("SKstd"));
    assert_eq!(std_e.allowed, 0);
    assert_eq!(std_e.denied.get("permission_denied"), Some(&1));
    let acct = entry(&all, None);
    assert_eq!(
        (acct.allowed, n_of(acct, "tok_ac1")),
        (1, Some((1, T0 - 30)))
    );

    // After the grace, the old secret no longer authenticates: nothing more for it.
    host.now_us.set((T0 + 1) * 1_000_000);
    assert!(matches!(run(&cfg, &host, &old, CALLS), Verdict::Deny(_)));
    let local = host.local.as_ref().unwrap();
    assert!(local.usage.is_empty());
}

#[test]
fn a_vm_without_usage_on_counts_nothing() {
    let cfg = compile_doc(&fixture_doc()).unwrap();
    let host = FakeHost::new().with_local();
    let main = basic("SKmain", "sk_live_main");
    assert!(matches!(
        run(&cfg, &host, &main, CALLS),
        Verdict::Allow { .. }
    ));
    assert!(host.local.as_ref().unwrap().usage.is_empty());
}
