//! Table-driven tests of `decide` against one fixture config.
//!
//! Fixture plaintexts (digests are computed below, never stored):
//! - account AC1 (active, auth token `tok_ac1`), AC2 (suspended), AC3 (active, allowlist 10.0.0.0/8)
//! - SKmain  / `sk_live_main`      main, AC1
//! - SKstd   / `sk_live_std`       standard, AC1, apis [calls]
//! - SKpub   / `pk_live_pub`       publishable, AC1
//! - SKip    / `sk_live_ip`        standard, AC1, allowlist 192.0.2.0/24 + 2001:db8::/32
//! - SKrot   / `sk_live_old` (not_after T0) and `sk_live_new`: a rotated key
//! - SKoff   / `sk_live_off`       disabled
//! - SKexp   / `sk_live_exp`       expires_at T0
//! - SKsusp  / `sk_live_susp`      AC2 (suspended)
//! - SKac3   / `sk_live_ac3`       AC3 (account allowlist)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;

use base64::Engine as _;
use keygate_core::config::{CorsPreflight, UnknownRoutes};
use keygate_core::headers::{AuthorizationHeader, RequestHead};
use keygate_core::{
    compile::compile_doc, decide, CompiledConfig, Decision, Identity, PrincipalKind, Reason,
};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

mod common;
use common::{fixture_doc, T0};

fn fixture() -> CompiledConfig {
    compile_doc(&fixture_doc()).unwrap()
}

fn basic(user: &str, secret: &str) -> Vec<u8> {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    )
    .into_bytes()
}

fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

type Expect<'a> = (&'a str, Option<&'a str>, &'a str, Option<&'a str>);

struct Case<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    auth: Option<Vec<u8>>,
    ip: Option<&'a str>,
    now: u64,
    /// (account SID, key SID, role, API) or the denial.
    want: Result<Expect<'a>, Reason>,
}

fn run(cfg: &CompiledConfig, c: &Case<'_>) -> Decision {
    let head = RequestHead {
        method: c.method.as_bytes(),
        path: c.path.as_bytes(),
        authorization: match &c.auth {
            Some(a) => AuthorizationHeader::One(a),
            None => AuthorizationHeader::Absent,
        },
        cors_preflight_headers: false,
    };
    let ip = c.ip.map(|s| s.parse::<IpAddr>().unwrap());
    decide(cfg, &head, c.now, &mut || ip)
}

#[test]
fn decision_table() {
    let cfg = fixture();
    let now = T0 - 100;
    let ok = |acct: &'static str,
              key: Option<&'static str>,
              role: &'static str,
              api: Option<&'static str>| Ok((acct, key, role, api));
    let cases = vec![
        Case {
            name: "main key via Basic",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: ok("AC1", Some("SKmain"), "main", Some("calls")),
        },
        Case {
            name: "main key via Bearer",
            method: "POST",
            path: "/v2/accounts/AC1/calls/CA9",
            auth: Some(bearer("sk_live_main")),
            ip: None,
            now,
            want: ok("AC1", Some("SKmain"), "main", Some("calls")),
        },
        Case {
            name: "query string ignored",
            method: "GET",
            path: "/v2/accounts/AC1/calls?limit=1",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: ok("AC1", Some("SKmain"), "main", Some("calls")),
        },
        Case {
            name: "account credentials are main-level",
            method: "DELETE",
            path: "/2010-04-01/Accounts/AC1/Keys/SKstd.json",
            auth: Some(basic("AC1", "tok_ac1")),
            ip: None,
            now,
            want: ok("AC1", None, "account", Some("keys")),
        },
        Case {
            name: "main key may manage keys",
            method: "POST",
            path: "/2010-04-01/Accounts/AC1/Keys.json",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: ok("AC1", Some("SKmain"), "main", Some("keys")),
        },
        Case {
            name: "standard key may not manage keys",
            method: "POST",
            path: "/2010-04-01/Accounts/AC1/Keys.json",
            auth: Some(basic("SKac3", "sk_live_ac3")),
            ip: Some("10.1.1.1"),
            now,
            want: Err(Reason::AccountMismatch),
        },
        Case {
            name: "standard key on management API",
            method: "GET",
            path: "/2010-04-01/Accounts/AC1/Keys.json",
            auth: Some(basic("SKrot", "sk_live_new")),
            ip: None,
            now,
            want: Err(Reason::PermissionDenied),
        },
        Case {
            name: "key restricted to calls",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKstd", "sk_live_std")),
            ip: None,
            now,
            want: ok("AC1", Some("SKstd"), "standard", Some("calls")),
        },
        Case {
            name: "key restricted to calls, messages",
            method: "GET",
            path: "/2010-04-01/Accounts/AC1/Messages.json",
            auth: Some(basic("SKstd", "sk_live_std")),
            ip: None,
            now,
            want: Err(Reason::PermissionDenied),
        },
        Case {
            name: "publishable key, publishable API",
            method: "GET",
            path: "/api/account/balance",
            auth: Some(bearer("pk_live_pub")),
            ip: None,
            now,
            want: ok("AC1", Some("SKpub"), "publishable", Some("balance")),
        },
        Case {
            name: "publishable key, secret API",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(bearer("pk_live_pub")),
            ip: None,
            now,
            want: Err(Reason::PermissionDenied),
        },
        Case {
            name: "wrong account SID in path",
            method: "GET",
            path: "/v2/accounts/AC2/calls",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: Err(Reason::AccountMismatch),
        },
        Case {
            name: "unknown route",
            method: "GET",
            path: "/v3/other",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: Err(Reason::UnknownRoute),
        },
        Case {
            name: "method not in API",
            method: "PUT",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: Err(Reason::UnknownRoute),
        },
        Case {
            name: "missing credentials",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: None,
            ip: None,
            now,
            want: Err(Reason::MissingCredentials),
        },
        Case {
            name: "unknown key",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKnope", "sk_live_main")),
            ip: None,
            now,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "wrong secret",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKmain", "sk_live_mainX")),
            ip: None,
            now,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "another key's secret",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKmain", "sk_live_std")),
            ip: None,
            now,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "unknown bearer",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(bearer("sk_live_nope")),
            ip: None,
            now,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "auth token as bearer",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(bearer("tok_ac1")),
            ip: None,
            now,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "disabled key",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKoff", "sk_live_off")),
            ip: None,
            now,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "key before expiry",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKexp", "sk_live_exp")),
            ip: None,
            now: T0,
            want: ok("AC1", Some("SKexp"), "standard", Some("calls")),
        },
        Case {
            name: "key after expiry",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKexp", "sk_live_exp")),
            ip: None,
            now: T0 + 1,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "rotated: old secret in grace",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKrot", "sk_live_old")),
            ip: None,
            now: T0,
            want: ok("AC1", Some("SKrot"), "standard", Some("calls")),
        },
        Case {
            name: "rotated: old secret after grace",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKrot", "sk_live_old")),
            ip: None,
            now: T0 + 1,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "rotated: old secret as bearer after grace",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(bearer("sk_live_old")),
            ip: None,
            now: T0 + 1,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "rotated: new secret after grace",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKrot", "sk_live_new")),
            ip: None,
            now: T0 + 1,
            want: ok("AC1", Some("SKrot"), "standard", Some("calls")),
        },
        Case {
            name: "suspended account",
            method: "GET",
            path: "/v2/accounts/AC2/calls",
            auth: Some(basic("SKsusp", "sk_live_susp")),
            ip: None,
            now,
            want: Err(Reason::AccountSuspended),
        },
        Case {
            name: "suspended account, wrong secret is still 401",
            method: "GET",
            path: "/v2/accounts/AC2/calls",
            auth: Some(basic("SKsusp", "x")),
            ip: None,
            now,
            want: Err(Reason::InvalidCredentials),
        },
        Case {
            name: "key allowlist, inside",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKip", "sk_live_ip")),
            ip: Some("192.0.2.9"),
            now,
            want: ok("AC1", Some("SKip"), "standard", Some("calls")),
        },
        Case {
            name: "key allowlist, mapped IPv4 inside",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKip", "sk_live_ip")),
            ip: Some("::ffff:192.0.2.9"),
            now,
            want: ok("AC1", Some("SKip"), "standard", Some("calls")),
        },
        Case {
            name: "key allowlist, IPv6 inside",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKip", "sk_live_ip")),
            ip: Some("2001:db8::5"),
            now,
            want: ok("AC1", Some("SKip"), "standard", Some("calls")),
        },
        Case {
            name: "key allowlist, outside",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKip", "sk_live_ip")),
            ip: Some("127.0.0.1"),
            now,
            want: Err(Reason::IpNotAllowed),
        },
        Case {
            name: "key allowlist, address unknown",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(basic("SKip", "sk_live_ip")),
            ip: None,
            now,
            want: Err(Reason::IpNotAllowed),
        },
        Case {
            name: "account allowlist, inside",
            method: "GET",
            path: "/v2/accounts/AC3/calls",
            auth: Some(basic("SKac3", "sk_live_ac3")),
            ip: Some("10.2.3.4"),
            now,
            want: ok("AC3", Some("SKac3"), "standard", Some("calls")),
        },
        Case {
            name: "account allowlist, outside",
            method: "GET",
            path: "/v2/accounts/AC3/calls",
            auth: Some(basic("SKac3", "sk_live_ac3")),
            ip: Some("11.2.3.4"),
            now,
            want: Err(Reason::IpNotAllowed),
        },
        Case {
            name: "dot segments refused",
            method: "GET",
            path: "/v2/accounts/AC1/calls/../../AC2/calls",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: Err(Reason::MalformedPath),
        },
        Case {
            name: "encoded slash refused",
            method: "GET",
            path: "/v2/accounts/AC1%2Fcalls",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: Err(Reason::MalformedPath),
        },
        Case {
            name: "malformed credentials",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(b"Basic !!!".to_vec()),
            ip: None,
            now,
            want: Err(Reason::MalformedCredentials),
        },
        Case {
            name: "unsupported scheme",
            method: "GET",
            path: "/v2/accounts/AC1/calls",
            auth: Some(b"Digest abc".to_vec()),
            ip: None,
            now,
            want: Err(Reason::UnsupportedScheme),
        },
        Case {
            name: "percent-encoded unreserved matches",
            method: "GET",
            path: "/v2/%61ccounts/AC1/calls",
            auth: Some(basic("SKmain", "sk_live_main")),
            ip: None,
            now,
            want: ok("AC1", Some("SKmain"), "main", Some("calls")),
        },
    ];
    for c in &cases {
        let got = match run(&cfg, c) {
            Decision::Allow(a) => {
                let id: Identity<'_> = a.identity().expect("identity");
                assert_eq!(
                    id.kind == PrincipalKind::Key,
                    id.key_sid.is_some(),
                    "{}",
                    c.name
                );
                Ok((
                    id.account_sid.to_owned(),
                    id.key_sid.map(str::to_owned),
                    id.role.to_owned(),
                    id.api.map(str::to_owned),
                ))
            }
            Decision::Deny(r) => Err(r),
        };
        let want = c.want.map(|(a, k, r, api)| {
            (
                a.to_owned(),
                k.map(str::to_owned),
                r.to_owned(),
                api.map(str::to_owned),
            )
        });
        assert_eq!(got, want, "case {:?}", c.name);
    }
}

fn head<'a>(
    method: &'a str,
    path: &'a str,
    auth: AuthorizationHeader<'a>,
    preflight: bool,
) -> RequestHead<'a> {
    RequestHead {
        method: method.as_bytes(),
        path: path.as_bytes(),
        authorization: auth,
        cors_preflight_headers: preflight,
    }
}

#[test]
fn two_authorization_headers_are_refused_before_any_lookup() {
    let cfg = fixture();
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::Many,
        false,
    );
    assert_eq!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Deny(Reason::MultipleCredentials)
    );
}

#[test]
fn malformed_path_is_checked_after_credential_syntax() {
    let cfg = fixture();
    let auth = basic("SKmain", "sk_live_main");
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls;x=1",
        AuthorizationHeader::One(&auth),
        false,
    );
    assert_eq!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Deny(Reason::MalformedPath)
    );
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls;x=1",
        AuthorizationHeader::One(b"Basic !"),
        false,
    );
    assert_eq!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Deny(Reason::MalformedCredentials)
    );
}

#[test]
fn cors_preflight_passes_only_when_enabled() {
    let h = head(
        "OPTIONS",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::Absent,
        true,
    );
    let deny = fixture();
    assert_eq!(
        decide(&deny, &h, T0, &mut || None),
        Decision::Deny(Reason::MissingCredentials)
    );
    let mut doc = fixture_doc();
    doc.settings.cors_preflight = CorsPreflight::Allow;
    let allow = compile_doc(&doc).unwrap();
    assert!(
        matches!(decide(&allow, &h, T0, &mut || None), Decision::Allow(a) if a.identity().is_none())
    );
    // An OPTIONS without both CORS headers is an ordinary request.
    let plain = head(
        "OPTIONS",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::Absent,
        false,
    );
    assert_eq!(
        decide(&allow, &plain, T0, &mut || None),
        Decision::Deny(Reason::MissingCredentials)
    );
}

#[test]
fn unknown_routes_allow_admits_only_unrestricted_secret_keys() {
    let mut doc = fixture_doc();
    doc.settings.unknown_routes = UnknownRoutes::Allow;
    let cfg = compile_doc(&doc).unwrap();
    let main = basic("SKmain", "sk_live_main");
    let h = head(
        "GET",
        "/v9/anything",
        AuthorizationHeader::One(&main),
        false,
    );
    assert!(
        matches!(decide(&cfg, &h, T0, &mut || None), Decision::Allow(a) if a.identity().is_some_and(|i| i.api.is_none()))
    );
    let restricted = basic("SKstd", "sk_live_std");
    let h = head(
        "GET",
        "/v9/anything",
        AuthorizationHeader::One(&restricted),
        false,
    );
    assert_eq!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Deny(Reason::PermissionDenied)
    );
    let publishable = bearer("pk_live_pub");
    let h = head(
        "GET",
        "/v9/anything",
        AuthorizationHeader::One(&publishable),
        false,
    );
    assert_eq!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Deny(Reason::PermissionDenied)
    );
}

#[test]
fn another_accounts_path_is_account_mismatch_whatever_the_method() {
    // `calls` takes GET and POST only: PUT matches no API, but the path still names AC2.
    let main = basic("SKmain", "sk_live_main");
    let std = basic("SKstd", "sk_live_std");
    for routes in [UnknownRoutes::Deny, UnknownRoutes::Allow] {
        let mut doc = fixture_doc();
        doc.settings.unknown_routes = routes;
        let cfg = compile_doc(&doc).unwrap();
        for (method, path, auth) in [
            ("PUT", "/v2/accounts/AC2/calls", &main),
            ("DELETE", "/v2/accounts/AC2/calls/CA1/x", &main),
            ("PATCH", "/2010-04-01/Accounts/AC3/Messages.json", &main),
            ("PUT", "/v2/accounts/AC2/calls", &std),
        ] {
            let h = head(method, path, AuthorizationHeader::One(auth), false);
            assert_eq!(
                decide(&cfg, &h, T0, &mut || None),
                Decision::Deny(Reason::AccountMismatch),
                "{routes:?} {method} {path}"
            );
        }
    }
    // A method mismatch on the principal's own account stays an unknown route: refused under
    // `deny`, let through (with no API) under `allow`.
    let own = head(
        "PUT",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::One(&main),
        false,
    );
    assert_eq!(
        decide(&fixture(), &own, T0, &mut || None),
        Decision::Deny(Reason::UnknownRoute)
    );
    let mut doc = fixture_doc();
    doc.settings.unknown_routes = UnknownRoutes::Allow;
    let allow = compile_doc(&doc).unwrap();
    match decide(&allow, &own, T0, &mut || None) {
        Decision::Allow(a) => {
            let id = a.identity().unwrap();
            assert_eq!((id.account_sid, id.api), ("AC1", None));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_address_is_read_only_when_an_allowlist_applies() {
    let cfg = fixture();
    let mut calls = 0;
    let main = basic("SKmain", "sk_live_main");
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::One(&main),
        false,
    );
    let _ = decide(&cfg, &h, T0, &mut || {
        calls += 1;
        None
    });
    assert_eq!(calls, 0);
    let ip = basic("SKip", "sk_live_ip");
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::One(&ip),
        false,
    );
    let _ = decide(&cfg, &h, T0, &mut || {
        calls += 1;
        "192.0.2.1".parse().ok()
    });
    assert_eq!(calls, 1);
}

#[test]
fn padded_and_unpadded_basic_reach_the_same_principal() {
    let cfg = fixture();
    // "SKmain:sk_live_main" encodes with one '=' of padding.
    let padded = basic("SKmain", "sk_live_main");
    assert!(padded.ends_with(b"="));
    let unpadded: Vec<u8> = padded.iter().copied().filter(|&b| b != b'=').collect();
    for auth in [padded, unpadded] {
        let h = head(
            "GET",
            "/v2/accounts/AC1/calls",
            AuthorizationHeader::One(&auth),
            false,
        );
        assert!(
            matches!(decide(&cfg, &h, T0, &mut || None), Decision::Allow(a) if a.identity().and_then(|i| i.key_sid) == Some("SKmain"))
        );
    }
}

#[test]
fn checked_secret_format_refuses_malformed_secrets_without_a_lookup() {
    use keygate_core::secret_format::{encode, SecretKind, RANDOM_BYTES};
    let good = encode(SecretKind::SecretLive, &[7u8; RANDOM_BYTES]).unwrap();
    let mut doc = fixture_doc();
    doc.settings.check_secret_format = true;
    doc.keys[0].secrets = vec![common::d(&good)];
    let cfg = compile_doc(&doc).unwrap();
    let ok = bearer(&good);
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::One(&ok),
        false,
    );
    assert!(matches!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Allow(_)
    ));
    let basic_ok = basic("SKmain", &good);
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::One(&basic_ok),
        false,
    );
    assert!(matches!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Allow(_)
    ));
    // The fixture's other keys have unformatted secrets: refused once the check is on.
    let legacy = basic("SKstd", "sk_live_std");
    let h = head(
        "GET",
        "/v2/accounts/AC1/calls",
        AuthorizationHeader::One(&legacy),
        false,
    );
    assert_eq!(
        decide(&cfg, &h, T0, &mut || None),
        Decision::Deny(Reason::InvalidCredentials)
    );
}
