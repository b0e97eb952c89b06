//! Properties checked by the fuzz targets (`fuzz/`) and by the corpus replay test.
//!
//! Each function takes arbitrary bytes, runs one parser or the decision on them, and asserts a
//! property that must hold for every input: not just "no panic", but that what is accepted is
//! consistent. A violated property panics (that is how libFuzzer records a finding). These
//! functions are test support; nothing on the request path calls them.

// Panicking is how a property reports a finding to libFuzzer and to the replay test.
#![allow(clippy::panic)]

use std::net::IpAddr;

use base64::Engine as _;

use crate::compile::compile;
use crate::config::{
    AccountDoc, AccountStatus, ApiDoc, ConfigDoc, KeyDoc, Role, SecretDoc, Settings, SCHEMA_V1,
};
use crate::credential::{parse_authorization, Credential, EnabledSchemes};
use crate::decision::{decide, Decision};
use crate::digest::Digester;
use crate::headers::{parse_header_map, serialize_header_map, AuthorizationHeader, RequestHead};
use crate::ip::{parse_cidr, parse_client_address, IpAllowlist};
use crate::path::{canonicalize, Template, TemplateMatch};

/// An accepted `Authorization` value yields one credential, and its canonical re-encoding
/// (padded base64, `Basic` spelled canonically) yields the same credential: two encodings of one
/// credential are one rate-limit subject.
pub fn authorization(data: &[u8]) {
    let Ok(cred) = parse_authorization(data, EnabledSchemes::ALL) else {
        return;
    };
    match &cred {
        Credential::Basic { user, secret } => {
            assert!(
                !user.is_empty() && !user.contains(&b':'),
                "user must be non-empty, colon-free"
            );
            let mut joined = user.clone();
            joined.push(b':');
            joined.extend_from_slice(secret);
            let canonical = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(&joined)
            );
            assert_eq!(
                parse_authorization(canonical.as_bytes(), EnabledSchemes::ALL).ok(),
                Some(cred)
            );
        }
        Credential::Bearer { token } => {
            assert!(!token.is_empty() && !token.contains(&b' ') && !token.contains(&b','));
            let canonical = [b"Bearer ".as_slice(), token].concat();
            assert_eq!(
                parse_authorization(&canonical, EnabledSchemes::ALL).ok(),
                Some(cred)
            );
        }
    }
}

/// A path canonicalisation accepts re-canonicalises to itself and contains nothing that could
/// name a different resource upstream.
pub fn path(data: &[u8]) {
    let Some(c) = canonicalize(data) else { return };
    let s = c.as_str();
    assert_eq!(
        canonicalize(s.as_bytes()).as_ref(),
        Some(&c),
        "not a fixed point: {s:?}"
    );
    assert!(s.starts_with('/') && s.is_ascii());
    assert!(
        !s.contains("//")
            && !s.contains('\\')
            && !s.contains(';')
            && !s.contains('?')
            && !s.contains('#')
    );
    for seg in c.segments() {
        assert!(seg != "." && seg != "..", "dot segment in {s:?}");
    }
    let lower = s.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%25", "%2e", "%00"] {
        assert!(!lower.contains(bad), "{bad} survived in {s:?}");
    }
}

/// Template compile and match never panic; a bound `{account_sid}` is a substring of one path
/// segment.
pub fn template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (t, p) = text.split_once('\n').unwrap_or((&text, "/"));
    let Ok(template) = Template::parse(t) else {
        return;
    };
    let Some(path) = canonicalize(p.as_bytes()) else {
        return;
    };
    if let TemplateMatch::Yes {
        account_sid: Some(a),
    } = template.matches(&path)
    {
        assert!(!a.is_empty() && path.segments().any(|s| s.contains(a)));
    }
}

/// An accepted CIDR has no host bits and is not a /0; IPv4 peers and their IPv4-mapped IPv6
/// forms are judged alike; client-address parsing never panics.
pub fn cidr(data: &[u8]) {
    let _ = parse_client_address(data);
    let text = String::from_utf8_lossy(data);
    let (entry, probe) = text.split_once(' ').unwrap_or((&text, "10.1.2.3"));
    let Ok(net) = parse_cidr(entry) else { return };
    assert!(net.prefix_len() > 0 && net.network() == net.addr());
    let Ok(list) = IpAllowlist::parse(&[entry.to_owned()]) else {
        panic!("parse_cidr accepted {entry:?} but the allowlist refused it");
    };
    if let Ok(IpAddr::V4(v4)) = probe.parse::<IpAddr>() {
        assert_eq!(
            list.contains(IpAddr::V4(v4)),
            list.contains(IpAddr::V6(v4.to_ipv6_mapped()))
        );
    }
}

/// Arbitrary bytes either fail to compile or compile deterministically to a config the decision
/// can run on without panicking.
pub fn config(data: &[u8]) {
    let Ok(a) = compile(data) else { return };
    let b = compile(data).ok();
    assert_eq!(
        Some((a.version(), a.counts())),
        b.map(|b| (b.version(), b.counts()))
    );
    let head = RequestHead {
        method: b"GET",
        path: b"/v2/accounts/AC1/calls",
        authorization: AuthorizationHeader::One(b"Basic U0sxOnNlY3JldA=="),
        cors_preflight_headers: false,
    };
    let _ = decide(&a, &head, 1_800_000_000, &mut || "127.0.0.1".parse().ok());
}

/// proxy-wasm header maps: never panic; what parses re-serialises to a prefix of the input.
pub fn header_map(data: &[u8]) {
    let Some(pairs) = parse_header_map(data) else {
        return;
    };
    let again = serialize_header_map(&pairs);
    assert!(data.starts_with(&again) || (pairs.is_empty() && data.is_empty()));
    let _ = RequestHead::from_pairs(&pairs);
}

/// The fixed config the `decide` target judges against (plaintexts: `SK1`/`s3cret-one`,
/// `SK2`/`s3cret-two`, account `AC1` token `tok-ac1`).
pub fn decide_fixture() -> ConfigDoc {
    let d = |s: &str| SecretDoc {
        digest: Digester::Sha256.digest_hex(s.as_bytes()),
        not_after: None,
    };
    let api = |name: &str, paths: &[&str], publishable: bool, management: bool| ApiDoc {
        name: name.into(),
        methods: vec!["GET".into(), "POST".into()],
        paths: paths.iter().map(|p| p.to_string()).collect(),
        publishable,
        management,
        limit: None,
    };
    let key = |sid: &str, role: Role, secret: &str, apis: Option<Vec<String>>| KeyDoc {
        sid: sid.into(),
        account_sid: "AC1".into(),
        role,
        secrets: vec![d(secret)],
        expires_at: None,
        enabled: true,
        apis,
        allowed_ips: None,
        limits: None,
    };
    ConfigDoc {
        schema: SCHEMA_V1.into(),
        version: 1,
        settings: Settings::default(),
        apis: vec![
            api(
                "calls",
                &["/v2/accounts/{account_sid}/calls/**"],
                false,
                false,
            ),
            api(
                "keys",
                &["/2010-04-01/Accounts/{account_sid}/Keys/{sid}.json"],
                false,
                true,
            ),
            api("balance", &["/api/balance"], true, false),
        ],
        accounts: vec![AccountDoc {
            sid: "AC1".into(),
            status: AccountStatus::Active,
            auth_tokens: vec![d("tok-ac1")],
            allowed_ips: None,
            limits: None,
            region: None,
            regions: None,
        }],
        keys: vec![
            key("SK1", Role::Main, "s3cret-one", None),
            key(
                "SK2",
                Role::Publishable,
                "s3cret-two",
                Some(vec!["balance".into()]),
            ),
        ],
        limits: Default::default(),
    }
}

/// Arbitrary requests against [`decide_fixture`]: an allowed request carries a credential whose
/// digest is in the config for the principal it was admitted as, and the path it was admitted
/// on canonicalises.
pub fn decide_request(data: &[u8]) {
    thread_local! {
        static CFG: Option<crate::CompiledConfig> = compile(
            serde_json::to_string(&decide_fixture()).unwrap_or_default().as_bytes()
        ).ok();
    }
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let auth = parts.next();
    let head = RequestHead {
        method,
        path,
        authorization: auth.map_or(AuthorizationHeader::Absent, AuthorizationHeader::One),
        cors_preflight_headers: false,
    };
    CFG.with(|cfg| {
        let Some(cfg) = cfg else {
            panic!("the fixture must compile")
        };
        let Decision::Allow(allow) = decide(cfg, &head, 1_800_000_000, &mut || None) else {
            return;
        };
        let Some(id) = allow.identity() else {
            panic!("preflight is disabled in the fixture")
        };
        assert!(canonicalize(path).is_some());
        let cred = auth.and_then(|a| parse_authorization(a, EnabledSchemes::ALL).ok());
        let secret = match &cred {
            Some(Credential::Basic { secret, .. }) => secret.as_slice(),
            Some(Credential::Bearer { token }) => token,
            None => panic!("allowed without a parseable credential"),
        };
        let digest = Digester::Sha256.digest_hex(secret);
        let doc = decide_fixture();
        let known = match id.key_sid {
            Some(k) => doc
                .keys
                .iter()
                .any(|key| key.sid == k && key.secrets.iter().any(|s| s.digest == digest)),
            None => doc.accounts.iter().any(|a| {
                a.sid == id.account_sid && a.auth_tokens.iter().any(|s| s.digest == digest)
            }),
        };
        assert!(
            known,
            "allowed {id:?} with a secret whose digest is not in the config"
        );
    });
}

/// Arbitrary bytes as the answer to an edge's first change-feed request, on an empty store
/// (the first publication): the page parser and the whole page check never panic, a refused
/// page writes nothing that is in force, and an accepted page answers the request it was sent
/// for, names only a next cursor that may go into a request path, and holds only records that
/// compile on their own with its catalogue. A page that completes the walk is in force at its
/// version.
pub fn changes_page(data: &[u8]) {
    use crate::compile::{compile_account_record, compile_catalog, compile_key_record};
    use crate::published::{read_head, valid_next_cursor, Step, Update};
    use crate::store::testing::FakeStore;

    let store = FakeStore::new();
    let Ok(mut update) = Update::begin(&store) else {
        panic!("an empty store begins an update")
    };
    let Ok(page) = Update::parse(data) else {
        return;
    };
    let (since, after) = {
        let (s, a) = update.request();
        (s, a.to_owned())
    };
    let ahead = update.request_after(&page);
    let step = match update.apply_page(&store, &page, 1_800_000_000) {
        Ok(step) => step,
        Err(_) => {
            assert!(
                read_head(&store).is_none(),
                "a refused page put something in force"
            );
            return;
        }
    };
    assert_eq!((page.since, page.after.as_str()), (since, after.as_str()));
    if let Some(next) = &page.next {
        assert!(
            valid_next_cursor(&page.after, next),
            "accepted a next cursor {next:?} that may not go into a request path"
        );
        assert_eq!(ahead, Some((since, next.clone())));
    }
    let Ok(cat) = compile_catalog(&page.settings_doc()) else {
        panic!("accepted a page whose catalogue does not compile")
    };
    for k in &page.keys {
        assert!(
            compile_key_record(&cat, k).is_ok(),
            "accepted key {:?} that does not compile",
            k.sid
        );
    }
    for a in &page.accounts {
        assert!(
            compile_account_record(&cat, a).is_ok(),
            "accepted account {:?} that does not compile",
            a.sid
        );
    }
    match step {
        Step::Done(v) => {
            assert_eq!(v, page.version);
            assert!(page.next.is_none(), "done before the last page");
            assert_eq!(read_head(&store).map(|h| h.version), Some(v));
        }
        Step::More => assert!(page.next.is_some() || read_head(&store).is_none()),
        Step::Ready(_) => panic!("a first publication is not a warm-up"),
    }
}

/// Dispatches by fuzz target name (used by the corpus replay test).
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "authorization" => authorization(data),
        "path" => path(data),
        "template" => template(data),
        "cidr" => cidr(data),
        "config" => config(data),
        "header_map" => header_map(data),
        "decide" => decide_request(data),
        "changes_page" => changes_page(data),
        _ => return false,
    }
    true
}

/// Every fuzz target name.
pub const TARGETS: [&str; 8] = [
    "authorization",
    "path",
    "template",
    "cidr",
    "config",
    "header_map",
    "decide",
    "changes_page",
];
