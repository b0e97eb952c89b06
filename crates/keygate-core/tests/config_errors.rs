//! Config validation: every rejected document names the exact place and reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keygate_core::compile::{compile, parse};
use serde_json::{json, Value};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

mod common;

fn fixture_json() -> Value {
    serde_json::to_value(common::fixture_doc()).unwrap()
}

fn error_of(doc: &Value) -> String {
    match compile(doc.to_string().as_bytes()) {
        Ok(_) => "compiled".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn fixture_compiles_and_round_trips_through_the_wire_types() {
    let v = fixture_json();
    let cfg = compile(v.to_string().as_bytes()).unwrap();
    assert_eq!(cfg.version(), 7);
    assert_eq!(cfg.counts(), (3, 9, 4));
    let reparsed = parse(v.to_string().as_bytes()).unwrap();
    assert_eq!(reparsed, common::fixture_doc());
}

#[test]
fn rejected_documents_name_path_and_reason() {
    let h64 = "ab".repeat(32);
    type Edit = fn(&mut Value, &str);
    let cases: Vec<(&str, Edit, String)> = vec![
        ("schema", |v, _| v["schema"] = json!("keygate.config/v9"), r#"schema: unsupported schema "keygate.config/v9"; expected "keygate.config/v1""#.into()),
        ("unknown field", |v, _| v["keys"][3]["allowed_ip"] = json!([]), "keys[3].allowed_ip: unknown field `allowed_ip`, expected one of".into()),
        ("bad role", |v, _| v["keys"][1]["role"] = json!("admin"), "keys[1].role: unknown variant `admin`".into()),
        ("version type", |v, _| v["version"] = json!("7"), "version: invalid type: string \"7\", expected u64".into()),
        ("bad CIDR", |v, _| v["keys"][3]["allowed_ips"][0] = json!("10.0.0/8"), r#"keys[3].allowed_ips[0]: invalid CIDR "10.0.0/8""#.into()),
        ("host bits", |v, _| v["keys"][3]["allowed_ips"][1] = json!("2001:db8::1/32"), r#"keys[3].allowed_ips[1]: host bits set in "2001:db8::1/32"; did you mean "2001:db8::/32"?"#.into()),
        ("mapped range", |v, _| v["accounts"][2]["allowed_ips"][0] = json!("::ffff:0:0/96"), r#"accounts[2].allowed_ips[0]: "::ffff:0:0/96" covers IPv4-mapped IPv6 addresses (::ffff:0:0/96); write IPv4 CIDRs for IPv4 clients"#.into()),
        ("empty allowlist", |v, _| v["keys"][3]["allowed_ips"] = json!([]), "keys[3].allowed_ips: must not be empty; omit the field to allow any address".into()),
        ("digest length", |v, _| v["keys"][0]["secrets"][0]["digest"] = json!("abc"), "keys[0].secrets[0].digest: digest must be 64 lowercase hex characters, got 3 characters".into()),
        ("duplicate digest", |v, _| { let d = v["keys"][0]["secrets"][0]["digest"].clone(); v["keys"][2]["secrets"][0]["digest"] = d; }, "keys[2].secrets[0].digest: same digest as keys[0].secrets[0]; every secret must be unique".into()),
        ("duplicate digest in one key", |v, _| { let d = v["keys"][4]["secrets"][0]["digest"].clone(); v["keys"][4]["secrets"][1]["digest"] = d; }, "keys[4].secrets[1].digest: same digest as keys[4].secrets[0]; every secret must be unique".into()),
        ("no secrets", |v, _| v["keys"][0]["secrets"] = json!([]), "keys[0].secrets: must have at least one secret".into()),
        ("bad time", |v, _| v["keys"][6]["expires_at"] = json!("tomorrow"), r#"keys[6].expires_at: invalid RFC 3339 UTC time "tomorrow" (expected like "2026-11-24T10:00:00Z")"#.into()),
        ("bad not_after", |v, _| v["keys"][4]["secrets"][1]["not_after"] = json!("2026-13-01T00:00:00Z"), r#"keys[4].secrets[1].not_after: invalid RFC 3339 UTC time "2026-13-01T00:00:00Z" (expected like "2026-11-24T10:00:00Z")"#.into()),
        ("unknown account", |v, _| v["keys"][0]["account_sid"] = json!("AC404"), r#"keys[0].account_sid: unknown account "AC404""#.into()),
        ("duplicate key SID", |v, _| v["keys"][1]["sid"] = json!("SKmain"), r#"keys[1].sid: duplicate SID "SKmain" (also keys[0])"#.into()),
        ("key SID = account SID", |v, _| v["keys"][0]["sid"] = json!("AC2"), r#"keys[0].sid: duplicate SID "AC2" (also accounts[1])"#.into()),
        ("bad SID", |v, _| v["keys"][0]["sid"] = json!("SK main"), r#"keys[0].sid: invalid SID "SK main": use 1 to 64 ASCII letters, digits, '_' or '-'"#.into()),
        ("unknown API", |v, _| v["keys"][1]["apis"][0] = json!("fax"), r#"keys[1].apis[0]: unknown API "fax""#.into()),
        ("empty API list", |v, _| v["keys"][1]["apis"] = json!([]), "keys[1].apis: must not be empty; omit the field to allow every API the role allows".into()),
        ("publishable key, secret API", |v, _| v["keys"][2]["apis"] = json!(["balance", "calls"]), r#"keys[2].apis[1]: a publishable key can never call "calls" (not publishable)"#.into()),
        ("standard key, management API", |v, _| v["keys"][1]["apis"] = json!(["keys"]), r#"keys[1].apis[0]: a standard key can never call "keys" (a management API)"#.into()),
        ("duplicate API", |v, _| v["apis"][1]["name"] = json!("calls"), r#"apis[1].name: duplicate API name "calls" (also apis[0])"#.into()),
        ("bad template", |v, _| v["apis"][0]["paths"][1] = json!("/v2/accounts/{account_sid}//calls"), r#"apis[0].paths[1]: template "/v2/accounts/{account_sid}//calls": empty segment (doubled or trailing '/')"#.into()),
        ("bad method", |v, _| v["apis"][0]["methods"][0] = json!("get"), r#"apis[0].methods[0]: invalid method "get": use an uppercase HTTP method"#.into()),
        ("no paths", |v, _| v["apis"][0]["paths"] = json!([]), "apis[0].paths: must list at least one path template".into()),
        ("publishable management", |v, _| v["apis"][2]["publishable"] = json!(true), "apis[2]: an API cannot be both publishable and management".into()),
        ("hmac without key", |v, _| v["settings"]["secret_digest"] = json!("hmac-sha256"), r#"settings: secret_digest "hmac-sha256" needs hmac_key"#.into()),
        ("short hmac key", |v, _| { v["settings"]["secret_digest"] = json!("hmac-sha256"); v["settings"]["hmac_key"] = json!("abcd"); }, "settings: hmac_key must be at least 32 bytes, got 2".into()),
        ("no schemes", |v, _| v["settings"]["schemes"] = json!([]), r#"settings.schemes: must enable at least one of "basic", "bearer""#.into()),
        ("identity header clash", |v, _| v["settings"]["identity_headers"]["role"] = json!("x-keygate-account-sid"), r#"settings.identity_headers.role: "x-keygate-account-sid" is already used for account_sid"#.into()),
        ("identity header authorization", |v, _| v["settings"]["identity_headers"]["api"] = json!("authorization"), r#"settings.identity_headers.api: "authorization" cannot be an identity header"#.into()),
        ("realm quote", |v, _| v["settings"]["realm"] = json!("a\"b"), r#"settings.realm: must be non-empty printable ASCII without '"' or '\'"#.into()),
        ("zero requests", |v, _| v["limits"] = json!({"key": {"main": {"requests": 0, "per": "1m"}}}), "limits.key.main.requests: must be at least 1".into()),
        ("bad period", |v, _| v["limits"] = json!({"account": {"requests": 5, "per": "soon"}}), r#"limits.account.per: invalid duration "soon""#.into()),
        ("period too long", |v, _| v["apis"][0]["limit"] = json!({"requests": 5, "per": "2days"}), r#"apis[0].limit.per: "2days" is outside 1ms..24h"#.into()),
        ("unknown API limit", |v, _| v["keys"][0]["limits"] = json!({"apis": {"fax": {"requests": 1, "per": "1s"}}}), r#"keys[0].limits.apis.fax: unknown API "fax""#.into()),
        ("zero concurrency", |v, _| v["accounts"][0]["limits"] = json!({"concurrency": 0}), "accounts[0].limits.concurrency: must be at least 1".into()),
        ("limits unknown field", |v, _| v["limits"] = json!({"acount": {"requests": 1, "per": "1s"}}), "limits.acount: unknown field `acount`".into()),
        ("bad home region", |v, _| v["accounts"][2]["region"] = json!("US1"), r#"accounts[2].region: invalid region "US1": must be 1 to 32 lowercase letters, digits or '-'"#.into()),
        ("bad region in list", |v, _| v["accounts"][2]["regions"] = json!(["in1", "eu_1"]), r#"accounts[2].regions[1]: invalid region "eu_1": must be 1 to 32 lowercase letters, digits or '-'"#.into()),
        ("region too long", |v, _| v["accounts"][0]["regions"] = json!(["a".repeat(33)]), format!("accounts[0].regions[0]: invalid region \"{}\": must be 1 to 32 lowercase letters, digits or '-'", "a".repeat(33))),
        ("duplicate region", |v, _| v["accounts"][1]["regions"] = json!(["in1", "eu1", "in1"]), r#"accounts[1].regions[2]: duplicate region "in1" (also regions[0])"#.into()),
        ("home region repeated", |v, _| { v["accounts"][1]["region"] = json!("us1"); v["accounts"][1]["regions"] = json!(["in1", "us1"]); }, r#"accounts[1].regions[1]: duplicate region "us1" (the home region)"#.into()),
        ("empty regions", |v, _| v["accounts"][0]["regions"] = json!([]), "accounts[0].regions: must not be empty; omit the field for none".into()),
        ("17 regions", |v, _| v["accounts"][0]["regions"] = json!((0..17).map(|i| format!("r{i}")).collect::<Vec<_>>()), "accounts[0].regions: at most 16 regions".into()),
        ("16 regions and a home", |v, _| { v["accounts"][0]["region"] = json!("home"); v["accounts"][0]["regions"] = json!((0..16).map(|i| format!("r{i}")).collect::<Vec<_>>()); }, "compiled".into()),
        ("region type", |v, _| v["accounts"][0]["region"] = json!(1), "accounts[0].region: invalid type: integer `1`, expected a string".into()),
        ("wrong_region number", |v, _| v["settings"]["wrong_region"] = json!(401), r#"settings.wrong_region: must be "404" or "401" (a string)"#.into()),
        ("wrong_region unknown", |v, _| v["settings"]["wrong_region"] = json!("403"), r#"settings.wrong_region: must be "404" or "401" (a string)"#.into()),
        ("ok 64-hex digest still unique", |v, h| v["keys"][0]["secrets"][0]["digest"] = json!(h), "compiled".into()),
    ];
    for (name, edit, want) in cases {
        let mut v = fixture_json();
        edit(&mut v, &h64);
        let got = error_of(&v);
        // serde's messages end with " at line L column C"; compare the stable prefix.
        assert!(
            got.starts_with(&want),
            "case {name:?}:\n got: {got}\nwant: {want}"
        );
    }
}

#[test]
fn not_json_and_trailing_garbage_are_rejected() {
    assert!(compile(b"not json").is_err());
    let mut s = fixture_json().to_string();
    s.push_str(" {}");
    let e = compile(s.as_bytes()).unwrap_err();
    assert!(e.to_string().starts_with("trailing characters"), "{e}");
}

/// A record checked on its own (a change-feed page) must have distinct secrets; with many
/// secrets the check takes another route, with the same message.
#[test]
fn a_record_on_its_own_refuses_repeated_secrets() {
    use keygate_core::compile::{compile_catalog, compile_key_record_at};
    use keygate_core::config::{KeyDoc, SecretDoc};
    let doc = common::fixture_doc();
    let cat = compile_catalog(&doc).unwrap();
    let secret = |i: usize| SecretDoc {
        digest: format!("{i:064x}"),
        not_after: None,
    };
    for n in [2usize, 3, 40] {
        let mut key: KeyDoc = doc.keys[0].clone();
        key.secrets = (0..n).map(secret).collect();
        assert!(
            compile_key_record_at(&cat, &key, "keys[9]").is_ok(),
            "{n} distinct"
        );
        key.secrets[n - 1] = secret((n - 1) / 2);
        let e = compile_key_record_at(&cat, &key, "keys[9]").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "keys[9].secrets[{}].digest: same digest as keys[9].secrets[{}]; every secret must be unique",
                n - 1,
                (n - 1) / 2
            )
        );
    }
}

#[test]
fn regions_and_wrong_region_round_trip_and_are_omitted_when_unset() {
    use keygate_core::config::{Settings, WrongRegion};
    let mut doc = common::fixture_doc();
    let plain = serde_json::to_value(&doc).unwrap();
    assert!(plain["accounts"][0].get("region").is_none());
    assert!(plain["accounts"][0].get("regions").is_none());
    assert!(plain["settings"].get("wrong_region").is_none());
    doc.accounts[0].region = Some("us1".into());
    doc.accounts[0].regions = Some(vec!["in1".into(), "eu-west-1".into()]);
    doc.settings.wrong_region = WrongRegion::Unauthorized;
    let v = serde_json::to_value(&doc).unwrap();
    assert_eq!(v["accounts"][0]["region"], "us1");
    assert_eq!(v["accounts"][0]["regions"], json!(["in1", "eu-west-1"]));
    assert_eq!(v["settings"]["wrong_region"], "401");
    assert_eq!(parse(v.to_string().as_bytes()).unwrap(), doc);
    assert!(compile(v.to_string().as_bytes()).is_ok());
    let s: Settings = serde_json::from_value(json!({"wrong_region": "404"})).unwrap();
    assert_eq!(s.wrong_region, WrongRegion::NotFound);
    assert_eq!(Settings::default().wrong_region, WrongRegion::NotFound);
}
