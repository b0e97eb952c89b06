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

use keygate_core::config::{CorsPreflight, UnknownRoutes};
use keygate_core::headers::{AuthorizationHeader, RequestHead};
use keygate_core::testing::basic;
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

/// A case at `T0 - 100` from an unknown client address.
fn case<'a>(
    name: &'a str,
    method: &'a str,
    path: &'a str,
    auth: impl Into<Option<Vec<u8>>>,
    want: Result<Expect<'a>, Reason>,
) -> Case<'a> {
    Case {
        name,
        method,
        path,
        auth: auth.into(),
        ip: None,
        now: T0 - 100,
        want,
    }
}

impl<'a> Case<'a> {
    /// From client address `ip`.
    fn client(mut self, ip: &'a str) -> Case<'a> {
        self.ip = Some(ip);
        self
    }

    /// At `now` (Unix seconds).
    fn at(mut self, now: u64) -> Case<'a> {
        self.now = now;
        self
    }
}

/// Allowed as (account SID, key SID, role, API).
fn ok<'a>(
    acct: &'a str,
    key: Option<&'a str>,
    role: &'a str,
    api: Option<&'a str>,
) -> Result<Expect<'a>, Reason> {
    Ok((acct, key, role, api))
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

/// The decision table: name, method, path, `Authorization`, outcome, then the client address
/// and the time where they matter.
#[rustfmt::skip]
fn decision_cases() -> Vec<Case<'static>> {
    use Reason::*;
    let calls = "/v2/accounts/AC1/calls";
    let (ac2_calls, ac3_calls) = ("/v2/accounts/AC2/calls", "/v2/accounts/AC3/calls");
    let keys = "/2010-04-01/Accounts/AC1/Keys.json";
    let main = || basic("SKmain", "sk_live_main");
    let ip_key = || basic("SKip", "sk_live_ip");
    let ac3_key = || basic("SKac3", "sk_live_ac3");
    let main_calls = || ok("AC1", Some("SKmain"), "main", Some("calls"));
    let std_calls = |acct, key| ok(acct, Some(key), "standard", Some("calls"));
    vec![
        case("main key via Basic", "GET", calls, main(), main_calls()),
        case("main key via Bearer", "POST", "/v2/accounts/AC1/calls/CA9", bearer("sk_live_main"), main_calls()),
        case("query string ignored", "GET", "/v2/accounts/AC1/calls?limit=1", main(), main_calls()),
        case("account credentials are main-level", "DELETE", "/2010-04-01/Accounts/AC1/Keys/SKstd.json", basic("AC1", "tok_ac1"), ok("AC1", None, "account", Some("keys"))),
        case("main key may manage keys", "POST", keys, main(), ok("AC1", Some("SKmain"), "main", Some("keys"))),
        case("standard key may not manage keys", "POST", keys, ac3_key(), Err(AccountMismatch)).client("10.1.1.1"),
        case("standard key on management API", "GET", keys, basic("SKrot", "sk_live_new"), Err(PermissionDenied)),
        case("key restricted to calls", "GET", calls, basic("SKstd", "sk_live_std"), std_calls("AC1", "SKstd")),
        case("key restricted to calls, messages", "GET", "/2010-04-01/Accounts/AC1/Messages.json", basic("SKstd", "sk_live_std"), Err(PermissionDenied)),
        case("publishable key, publishable API", "GET", "/api/account/balance", bearer("pk_live_pub"), ok("AC1", Some("SKpub"), "publishable", Some("balance"))),
        case("publishable key, secret API", "GET", calls, bearer("pk_live_pub"), Err(PermissionDenied)),
        case("wrong account SID in path", "GET", ac2_calls, main(), Err(AccountMismatch)),
        case("unknown route", "GET", "/v3/other", main(), Err(UnknownRoute)),
        case("method not in API", "PUT", calls, main(), Err(UnknownRoute)),
        case("missing credentials", "GET", calls, None, Err(MissingCredentials)),
        case("unknown key", "GET", calls, basic("SKnope", "sk_live_main"), Err(InvalidCredentials)),
        case("wrong secret", "GET", calls, basic("SKmain", "sk_live_mainX"), Err(InvalidCredentials)),
        case("another key's secret", "GET", calls, basic("SKmain", "sk_live_std"), Err(InvalidCredentials)),
        case("unknown bearer", "GET", calls, bearer("sk_live_nope"), Err(InvalidCredentials)),
        case("auth token as bearer", "GET", calls, bearer("tok_ac1"), Err(InvalidCredentials)),
        case("disabled key", "GET", calls, basic("SKoff", "sk_live_off"), Err(InvalidCredentials)),
        case("key before expiry", "GET", calls, basic("SKexp", "sk_live_exp"), std_calls("AC1", "SKexp")).at(T0),
        case("key after expiry", "GET", calls, basic("SKexp", "sk_live_exp"), Err(InvalidCredentials)).at(T0 + 1),
        case("rotated: old secret in grace", "GET", calls, basic("SKrot", "sk_live_old"), std_calls("AC1", "SKrot")).at(T0),
        case("rotated: old secret after grace", "GET", calls, basic("SKrot", "sk_live_old"), Err(InvalidCredentials)).at(T0 + 1),
        case("rotated: old secret as bearer after grace", "GET", calls, bearer("sk_live_old"), Err(InvalidCredentials)).at(T0 + 1),
        case("rotated: new secret after grace", "GET", calls, basic("SKrot", "sk_live_new"), std_calls("AC1", "SKrot")).at(T0 + 1),
        case("suspended account", "GET", ac2_calls, basic("SKsusp", "sk_live_susp"), Err(AccountSuspended)),
        case("suspended account, wrong secret is still 401", "GET", ac2_calls, basic("SKsusp", "x"), Err(InvalidCredentials)),
        case("key allowlist, inside", "GET", calls, ip_key(), std_calls("AC1", "SKip")).client("192.0.2.9"),
        case("key allowlist, mapped IPv4 inside", "GET", calls, ip_key(), std_calls("AC1", "SKip")).client("::ffff:192.0.2.9"),
        case("key allowlist, IPv6 inside", "GET", calls, ip_key(), std_calls("AC1", "SKip")).client("2001:db8::5"),
        case("key allowlist, outside", "GET", calls, ip_key(), Err(IpNotAllowed)).client("127.0.0.1"),
        case("key allowlist, address unknown", "GET", calls, ip_key(), Err(IpNotAllowed)),
        case("account allowlist, inside", "GET", ac3_calls, ac3_key(), std_calls("AC3", "SKac3")).client("10.2.3.4"),
        case("account allowlist, outside", "GET", ac3_calls, ac3_key(), Err(IpNotAllowed)).client("11.2.3.4"),
        case("dot segments refused", "GET", "/v2/accounts/AC1/calls/../../AC2/calls", main(), Err(MalformedPath)),
        case("encoded slash refused", "GET", "/v2/accounts/AC1%2Fcalls", main(), Err(MalformedPath)),
        case("malformed credentials", "GET", calls, b"Basic !!!".to_vec(), Err(MalformedCredentials)),
        case("unsupported scheme", "GET", calls, b"Digest abc".to_vec(), Err(UnsupportedScheme)),
        case("percent-encoded unreserved matches", "GET", "/v2/%61ccounts/AC1/calls", main(), main_calls()),
    ]
}

#[test]
fn decision_table() {
    let cfg = fixture();
    let cases = decision_cases();
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

/// What `auth` gets for `path` at an edge in `edge` (`None`: an edge with no region), and
/// whether the client address was read.
fn at_edge(
    cfg: &CompiledConfig,
    edge: Option<&str>,
    path: &str,
    auth: &[u8],
) -> (Result<String, Reason>, bool) {
    use keygate_core::decision::decide_in_region;
    let h = head("GET", path, AuthorizationHeader::One(auth), false);
    let mut read = false;
    let d = decide_in_region(
        &cfg.catalog,
        &cfg.directory,
        edge,
        &h,
        T0 - 100,
        &mut || {
            read = true;
            "10.0.0.1".parse().ok()
        },
    );
    let d = match d {
        Decision::Allow(a) => Ok(a.identity().map(|i| i.account_sid.to_owned()).unwrap()),
        Decision::Deny(r) => Err(r),
    };
    (d, read)
}

/// Name, edge region, path, `Authorization`, outcome (the account admitted), address read.
type RegionCase<'a> = (
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a [u8],
    Result<&'a str, Reason>,
    bool,
);

#[test]
fn an_account_is_served_only_in_its_regions_at_an_edge_that_has_one() {
    use Reason::*;
    let mut doc = fixture_doc();
    // AC1: home us1. AC2 (suspended): home us1. AC3 (allowlist 10.0.0.0/8): home us1, also in1.
    doc.accounts[0].region = Some("us1".into());
    doc.accounts[1].region = Some("us1".into());
    doc.accounts[2].region = Some("us1".into());
    doc.accounts[2].regions = Some(vec!["in1".into()]);
    let cfg = compile_doc(&doc).unwrap();
    let calls = "/v2/accounts/AC1/calls";
    let main = basic("SKmain", "sk_live_main");
    let token = basic("AC1", "tok_ac1");
    let wrong = basic("SKmain", "sk_live_nope");
    let susp = basic("SKsusp", "sk_live_susp");
    let ac3 = basic("SKac3", "sk_live_ac3");
    let ac3_calls = "/v2/accounts/AC3/calls";
    #[rustfmt::skip]
    let cases: [RegionCase<'_>; 12] = [
        ("home region", Some("us1"), calls, &main, Ok("AC1"), false),
        ("no edge region serves all", None, calls, &main, Ok("AC1"), false),
        ("another region", Some("in1"), calls, &main, Err(WrongRegion), false),
        ("account credentials too", Some("in1"), calls, &token, Err(WrongRegion), false),
        ("a wrong secret is still invalid_credentials", Some("in1"), calls, &wrong, Err(InvalidCredentials), false),
        ("suspension first", Some("in1"), "/v2/accounts/AC2/calls", &susp, Err(AccountSuspended), false),
        ("before the allowlist: no address read", Some("eu1"), ac3_calls, &ac3, Err(WrongRegion), false),
        ("further region", Some("in1"), ac3_calls, &ac3, Ok("AC3"), true),
        ("home of a multi-region account", Some("us1"), ac3_calls, &ac3, Ok("AC3"), true),
        ("before the route: another account's path", Some("in1"), "/v2/accounts/AC2/calls", &main, Err(WrongRegion), false),
        ("before the route: an unknown one", Some("in1"), "/v3/other", &main, Err(WrongRegion), false),
        ("a prefix is not the region", Some("us"), calls, &main, Err(WrongRegion), false),
    ];
    for (name, edge, path, auth, want, read) in cases {
        let got = at_edge(&cfg, edge, path, auth);
        assert_eq!(got, (want.map(str::to_owned), read), "{name}");
    }
}

#[test]
fn regions_alone_or_neither_decide_where_an_account_is_served() {
    let mut doc = fixture_doc();
    // AC1 names further regions and no home; AC3 names none (every edge serves it).
    doc.accounts[0].regions = Some(vec!["in1".into(), "sg1".into()]);
    let cfg = compile_doc(&doc).unwrap();
    let main = basic("SKmain", "sk_live_main");
    let ac3 = basic("SKac3", "sk_live_ac3");
    let calls = "/v2/accounts/AC1/calls";
    for (edge, want) in [
        (Some("in1"), Ok("AC1")),
        (Some("sg1"), Ok("AC1")),
        (Some("us1"), Err(Reason::WrongRegion)),
        (None, Ok("AC1")),
    ] {
        let got = at_edge(&cfg, edge, calls, &main).0;
        assert_eq!(got, want.map(str::to_owned), "{edge:?}");
    }
    for edge in [Some("us1"), Some("in1"), None] {
        let got = at_edge(&cfg, edge, "/v2/accounts/AC3/calls", &ac3).0;
        assert_eq!(got, Ok("AC3".to_owned()), "{edge:?}");
    }
    // `decide` and `decide_in` are an edge with no region.
    let h = head("GET", calls, AuthorizationHeader::One(&main), false);
    assert!(matches!(
        decide(&cfg, &h, T0 - 100, &mut || None),
        Decision::Allow(_)
    ));
}
