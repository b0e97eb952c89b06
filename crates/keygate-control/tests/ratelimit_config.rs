//! Fleet-wide limits (`"scope": "fleet"`) at the control plane, over a real socket: the scope
//! round-trips through `/v1` and the catalogue to the edge feed, a fleet rate the compiler refuses
//! is refused with its message, and `GET /v1/edge/ratelimit-config` exports exactly the fleet
//! limits as envoyproxy/ratelimit's and Limitador's configuration (ETag / 304, 400, 401, 403).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use keygate_control::{ApiCatalog, Config};
use serde_json::{json, Value};

const EXPORT: &str = "/v1/edge/ratelimit-config";

fn fleet(requests: u32, per: &str) -> Value {
    json!({"requests": requests, "per": per, "scope": "fleet"})
}

fn local(requests: u32, per: &str) -> Value {
    json!({"requests": requests, "per": per})
}

async fn create_key(s: &InProc, body: Value) -> String {
    let ac = &s.creds.account_sid;
    let r = s
        .client
        .json(
            "POST",
            &format!("/v1/accounts/{ac}/keys"),
            &s.account_auth(),
            body,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["sid"].as_str().unwrap().to_owned()
}

/// The feed's record of `sid` (from `/v1/edge/changes?since=0`, one page).
async fn in_feed(s: &InProc, field: &str, sid: &str) -> Value {
    let r = s
        .client
        .get("/v1/edge/changes?since=0", &Auth::bearer(&s.creds.edge))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let page = r.json();
    page[field]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["sid"] == sid)
        .unwrap_or_else(|| panic!("{sid} not in the feed's {field}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_scope_round_trips_through_v1_and_reaches_the_feed() {
    let s = InProc::start().await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let sid = create_key(
        &s,
        json!({"role": "standard", "limits": {"rate": fleet(60, "1m"), "apis": {"calls": fleet(10, "1s")}}}),
    )
    .await;
    let kp = format!("/v1/accounts/{ac}/keys/{sid}");
    let k = c.get(&kp, &s.account_auth()).await.json();
    assert_eq!(k["limits"]["rate"], fleet(60, "1m"));
    assert_eq!(k["limits"]["apis"]["calls"], fleet(10, "1s"));
    let fed = in_feed(&s, "keys", &sid).await;
    assert_eq!(fed["limits"]["rate"], fleet(60, "1m"));
    assert_eq!(fed["limits"]["apis"]["calls"], fleet(10, "1s"));

    // Back to local: the field is left out (local is the default), in the API and the feed.
    let r = c
        .json(
            "PATCH",
            &kp,
            &s.account_auth(),
            json!({"limits": {"rate": local(60, "1m")}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["limits"]["rate"], local(60, "1m"));
    assert_eq!(
        in_feed(&s, "keys", &sid).await["limits"]["rate"],
        local(60, "1m")
    );

    // An account's limits are the operator's.
    let ap = format!("/v1/accounts/{ac}");
    let r = c
        .json(
            "PATCH",
            &ap,
            &s.admin(),
            json!({"limits": {"rate": fleet(200, "1m")}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["limits"]["rate"], fleet(200, "1m"));
    assert_eq!(
        c.get(&ap, &s.admin()).await.json()["limits"]["rate"],
        fleet(200, "1m")
    );
    assert_eq!(
        in_feed(&s, "accounts", &ac).await["limits"]["rate"],
        fleet(200, "1m")
    );
    let r = c
        .json(
            "POST",
            "/v1/accounts",
            &s.admin(),
            json!({"limits": {"rate": fleet(5, "1s")}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json()["limits"]["rate"], fleet(5, "1s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rate_the_compiler_refuses_is_refused_with_its_message() {
    let s = InProc::start().await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let keys = format!("/v1/accounts/{ac}/keys");
    let whole = "\"1500ms\": a fleet limit's period must be a whole number of seconds";
    let shadow = json!({"requests": 60, "per": "1m", "scope": "fleet", "shadow": true});
    for (body, message) in [
        (
            json!({"limits": {"rate": fleet(60, "1500ms")}}),
            format!("limits.rate.per: {whole}"),
        ),
        (
            json!({"limits": {"apis": {"calls": fleet(60, "1500ms")}}}),
            format!("limits.apis.calls.per: {whole}"),
        ),
        (
            json!({"limits": {"rate": shadow.clone()}}),
            "limits.rate.shadow: a fleet limit cannot be in shadow mode".to_owned(),
        ),
        (
            json!({"limits": {"rate": {"requests": 60, "per": "1m", "scope": "global"}}}),
            "limits.rate.scope: unknown variant `global`, expected `local` or `fleet`".to_owned(),
        ),
    ] {
        let r = c.json("POST", &keys, &s.account_auth(), body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "invalid_request");
        assert_eq!(r.json()["error"]["message"], message.as_str(), "{body}");
    }
    // The same for an account's rate (PATCH by the operator) and a key's PATCH.
    let r = c
        .json(
            "PATCH",
            &format!("/v1/accounts/{ac}"),
            &s.admin(),
            json!({"limits": {"rate": fleet(60, "1500ms")}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(
        r.json()["error"]["message"],
        format!("limits.rate.per: {whole}").as_str()
    );
    let sid = create_key(&s, json!({})).await;
    let r = c
        .json(
            "PATCH",
            &format!("{keys}/{sid}"),
            &s.account_auth(),
            json!({"limits": {"rate": fleet(60, "1500ms")}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(
        r.json()["error"]["message"],
        format!("limits.rate.per: {whole}").as_str()
    );
}

/// A catalogue (`--catalog`) with fleet defaults for accounts, a role and an API.
fn fleet_catalog() -> ApiCatalog {
    ApiCatalog::parse(
        json!({
            "apis": [
                {"name": "calls", "methods": ["GET"], "paths": ["/v2/accounts/{account_sid}/calls"],
                 "limit": fleet(10, "1s")},
                {"name": "messages", "methods": ["GET"], "paths": ["/v2/accounts/{account_sid}/messages"],
                 "limit": local(5, "1s")},
            ],
            "limits": {
                "account": fleet(200, "1m"),
                "key": {"main": local(50, "1m"), "standard": fleet(100, "1m")},
            },
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

#[test]
fn the_catalogue_takes_fleet_defaults_and_refuses_what_the_compiler_refuses() {
    let cat = fleet_catalog();
    assert_eq!(
        serde_json::to_value(&cat.limits).unwrap()["account"],
        fleet(200, "1m")
    );
    let bad = json!({"apis": [], "limits": {"account": fleet(200, "1500ms")}});
    assert_eq!(
        ApiCatalog::parse(bad.to_string().as_bytes()).unwrap_err(),
        "limits.account.per: \"1500ms\": a fleet limit's period must be a whole number of seconds"
    );
    let bad = json!({"apis": [{"name": "calls", "methods": ["GET"], "paths": ["/calls"],
                               "limit": fleet(1, "2500ms")}]});
    assert_eq!(
        ApiCatalog::parse(bad.to_string().as_bytes()).unwrap_err(),
        "apis[0].limit.per: \"2500ms\": a fleet limit's period must be a whole number of seconds"
    );
}

/// The subjects of the export test: accounts and keys with overrides of each kind.
struct Fixture {
    s: InProc,
    /// The first account (a fleet override) and a second one (a local override).
    ac_fleet: String,
    ac_local: String,
    /// Standard keys: a fleet override 30/h (and calls 2/s), a local one (and messages 7/day).
    k_fleet: String,
    k_local: String,
    /// A main key with a fleet rate of 5 per 90 s (not expressible in envoyproxy/ratelimit).
    k_main: String,
}

async fn fixture() -> Fixture {
    let s = InProc::start_with(Config {
        catalog: fleet_catalog(),
        ..Config::with_built_in_catalog().unwrap()
    })
    .await;
    let ac_fleet = s.creds.account_sid.clone();
    let r = s
        .client
        .json(
            "PATCH",
            &format!("/v1/accounts/{ac_fleet}"),
            &s.admin(),
            json!({"limits": {"rate": fleet(60, "1m")}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .client
        .json(
            "POST",
            "/v1/accounts",
            &s.admin(),
            json!({"limits": {"rate": local(30, "1m")}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let ac_local = r.json()["sid"].as_str().unwrap().to_owned();
    let k_fleet = create_key(
        &s,
        json!({"role": "standard", "limits": {"rate": fleet(30, "1h"), "apis": {"calls": fleet(2, "1s")}}}),
    )
    .await;
    let k_local = create_key(
        &s,
        json!({"role": "standard", "limits": {"rate": local(10, "1s"), "apis": {"messages": fleet(7, "1d")}}}),
    )
    .await;
    let k_main = create_key(
        &s,
        json!({"role": "main", "limits": {"rate": fleet(5, "90s")}}),
    )
    .await;
    Fixture {
        s,
        ac_fleet,
        ac_local,
        k_fleet,
        k_local,
        k_main,
    }
}

/// `items` sorted by their SID (the export lists subjects by SID), joined.
fn by_sid(mut items: Vec<(&str, String)>) -> String {
    items.sort_by(|a, b| a.0.cmp(b.0));
    items.into_iter().map(|(_, s)| s).collect()
}

/// The version the export's ETag names, and the body (asserts 200 and the headers).
async fn export(s: &InProc, format: &str) -> (u64, String) {
    let r = s
        .client
        .get(
            &format!("{EXPORT}?format={format}"),
            &Auth::bearer(&s.creds.edge),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/yaml")
    );
    assert_eq!(r.header("cache-control").as_deref(), Some("no-cache"));
    let etag = r.header("etag").unwrap();
    let version = etag.trim_matches('"').parse().unwrap();
    (version, r.text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_ratelimit_export_is_exactly_the_fleet_limits() {
    let f = fixture().await;
    let (version, body) = export(&f.s, "envoy-ratelimit").await;
    let accounts = by_sid(vec![
        (
            &f.ac_fleet,
            format!(
                "    - key: \"account_sid\"\n      value: \"{}\"\n      rate_limit:\n        unit: minute\n        requests_per_unit: 60\n",
                f.ac_fleet
            ),
        ),
        (
            &f.ac_local,
            format!(
                "    # account_sid={0} has a local limit of its own: not counted by the fleet\n    - key: \"account_sid\"\n      value: \"{0}\"\n      rate_limit:\n        unlimited: true\n",
                f.ac_local
            ),
        ),
    ]);
    let standard = by_sid(vec![
        (
            &f.k_fleet,
            format!(
                "        - key: \"key_sid\"\n          value: \"{}\"\n          rate_limit:\n            unit: hour\n            requests_per_unit: 30\n",
                f.k_fleet
            ),
        ),
        (
            &f.k_local,
            format!(
                "        # key_sid={0} has a local limit of its own: not counted by the fleet\n        - key: \"key_sid\"\n          value: \"{0}\"\n          rate_limit:\n            unlimited: true\n",
                f.k_local
            ),
        ),
    ]);
    let expected = format!(
        r#"# keygate fleet limits ("scope": "fleet") at config version {version}, for envoyproxy/ratelimit.
# Descriptors: keygate=account, account_sid; keygate=key, role, key_sid; keygate=key_api, api, key_sid.
domain: "keygate"
descriptors:
- key: "keygate"
  value: "account"
  descriptors:
    - key: "account_sid"
      rate_limit:
        unit: minute
        requests_per_unit: 200
{accounts}- key: "keygate"
  value: "key"
  descriptors:
    - key: "role"
      value: "main"
      descriptors:
        # keygate=key, role=main, key_sid={k_main}: 5 requests per 90s is left out: envoyproxy/ratelimit counts only per second, minute, hour or day
    - key: "role"
      value: "standard"
      descriptors:
        - key: "key_sid"
          rate_limit:
            unit: minute
            requests_per_unit: 100
{standard}- key: "keygate"
  value: "key_api"
  descriptors:
    - key: "api"
      value: "calls"
      descriptors:
        - key: "key_sid"
          rate_limit:
            unit: second
            requests_per_unit: 10
        - key: "key_sid"
          value: "{k_fleet}"
          rate_limit:
            unit: second
            requests_per_unit: 2
    - key: "api"
      value: "messages"
      descriptors:
        - key: "key_sid"
          value: "{k_local}"
          rate_limit:
            unit: day
            requests_per_unit: 7
"#,
        k_main = f.k_main,
        k_fleet = f.k_fleet,
        k_local = f.k_local,
    );
    assert_eq!(body, expected, "{body}");
    // Only the keys envoyproxy/ratelimit accepts (its config loader refuses any other:
    // validKeys in src/config/config_impl.go), units it knows, and a value where one is given.
    let doc: serde_yaml::Value = serde_yaml::from_str(&body).unwrap();
    check_envoy_keys(&doc);
}

fn check_envoy_keys(v: &serde_yaml::Value) {
    const VALID: [&str; 12] = [
        "domain",
        "key",
        "value",
        "descriptors",
        "rate_limit",
        "unit",
        "requests_per_unit",
        "unlimited",
        "shadow_mode",
        "name",
        "replaces",
        "detailed_metric",
    ];
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap();
                assert!(VALID.contains(&k), "envoyproxy/ratelimit refuses key {k:?}");
                if k == "unit" {
                    let unit = v.as_str().unwrap();
                    assert!(
                        ["second", "minute", "hour", "day"].contains(&unit),
                        "{unit}"
                    );
                }
                check_envoy_keys(v);
            }
        }
        serde_yaml::Value::Sequence(items) => items.iter().for_each(check_envoy_keys),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limitador_export_is_exactly_the_fleet_limits_one_per_subject() {
    let f = fixture().await;
    let (version, body) = export(&f.s, "limitador").await;
    let limit = |name: &str, max: u32, seconds: u64, conditions: &[String], variable: &str| {
        let mut s = format!(
            "- namespace: \"keygate\"\n  name: \"{name}\"\n  max_value: {max}\n  seconds: {seconds}\n  conditions:\n"
        );
        for c in conditions {
            s.push_str(&format!("    - {}\n", serde_json::Value::from(c.as_str())));
        }
        s.push_str(&format!(
            "  variables:\n    - \"descriptors[0].{variable}\"\n"
        ));
        s
    };
    let is = |k: &str, v: &str| format!("descriptors[0].{k} == '{v}'");
    let sorted = |a: &str, b: &str| {
        let mut v = [a.to_owned(), b.to_owned()];
        v.sort();
        format!("'{}', '{}'", v[0], v[1])
    };
    let mut expected = format!(
        "# keygate fleet limits (\"scope\": \"fleet\") at config version {version}, for Limitador (limits file).\n\
         # Each limit tests descriptors[0], the descriptor being checked; a default excludes the subjects\n\
         # that have an override, so exactly one limit applies to any subject.\n"
    );
    expected.push_str(&limit(
        "account",
        200,
        60,
        &[
            is("keygate", "account"),
            format!(
                "!(descriptors[0].account_sid in [{}])",
                sorted(&f.ac_fleet, &f.ac_local)
            ),
        ],
        "account_sid",
    ));
    expected.push_str(&limit(
        &format!("account/{}", f.ac_fleet),
        60,
        60,
        &[is("keygate", "account"), is("account_sid", &f.ac_fleet)],
        "account_sid",
    ));
    expected.push_str(&limit(
        &format!("key/main/{}", f.k_main),
        5,
        90,
        &[
            is("keygate", "key"),
            is("role", "main"),
            is("key_sid", &f.k_main),
        ],
        "key_sid",
    ));
    expected.push_str(&limit(
        "key/standard",
        100,
        60,
        &[
            is("keygate", "key"),
            is("role", "standard"),
            format!(
                "!(descriptors[0].key_sid in [{}])",
                sorted(&f.k_fleet, &f.k_local)
            ),
        ],
        "key_sid",
    ));
    expected.push_str(&limit(
        &format!("key/standard/{}", f.k_fleet),
        30,
        3600,
        &[
            is("keygate", "key"),
            is("role", "standard"),
            is("key_sid", &f.k_fleet),
        ],
        "key_sid",
    ));
    expected.push_str(&limit(
        "key_api/calls",
        10,
        1,
        &[
            is("keygate", "key_api"),
            is("api", "calls"),
            format!("!(descriptors[0].key_sid in ['{}'])", f.k_fleet),
        ],
        "key_sid",
    ));
    expected.push_str(&limit(
        &format!("key_api/calls/{}", f.k_fleet),
        2,
        1,
        &[
            is("keygate", "key_api"),
            is("api", "calls"),
            is("key_sid", &f.k_fleet),
        ],
        "key_sid",
    ));
    expected.push_str(&limit(
        &format!("key_api/messages/{}", f.k_local),
        7,
        86_400,
        &[
            is("keygate", "key_api"),
            is("api", "messages"),
            is("key_sid", &f.k_local),
        ],
        "key_sid",
    ));
    assert_eq!(body, expected, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fleet_limits_the_exports_are_empty() {
    let s = InProc::start().await;
    let (version, body) = export(&s, "envoy-ratelimit").await;
    assert!(
        body.ends_with(&format!(
            "config version {version}, for envoyproxy/ratelimit.\n# Descriptors: keygate=account, account_sid; keygate=key, role, key_sid; keygate=key_api, api, key_sid.\ndomain: \"keygate\"\ndescriptors: []\n"
        )),
        "{body}"
    );
    let (_, body) = export(&s, "limitador").await;
    assert!(
        body.ends_with("exactly one limit applies to any subject.\n[]\n"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_answers_304_for_its_etag_and_refuses_bad_requests() {
    let s = InProc::start().await;
    let c = &s.client;
    let edge = Auth::bearer(&s.creds.edge);
    let path = format!("{EXPORT}?format=limitador");
    let (version, _) = export(&s, "limitador").await;
    let tag = format!("\"{version}\"");
    for format in ["limitador", "envoy-ratelimit"] {
        let r = c
            .send(
                "GET",
                &format!("{EXPORT}?format={format}"),
                &edge,
                None,
                &[("if-none-match", tag.as_str())],
            )
            .await;
        assert_eq!(r.status, 304, "{}", r.text);
        assert_eq!(r.header("etag"), Some(tag.clone()));
        assert_eq!(r.text, "");
    }
    // A change makes a new version: the old ETag gets the new document.
    let ac = &s.creds.account_sid;
    let r = c
        .json(
            "PATCH",
            &format!("/v1/accounts/{ac}"),
            &s.admin(),
            json!({"limits": {"rate": fleet(60, "1m")}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c
        .send(
            "GET",
            &path,
            &edge,
            None,
            &[("if-none-match", tag.as_str())],
        )
        .await;
    assert_eq!(r.status, 200);
    let newer: u64 = r.header("etag").unwrap().trim_matches('"').parse().unwrap();
    assert!(newer > version);
    assert!(
        r.text.contains(&format!("name: \"account/{ac}\"")),
        "{}",
        r.text
    );

    for (query, message) in [
        ("", "format: required: envoy-ratelimit or limitador"),
        (
            "?format=json",
            "format: unknown format \"json\" (expected envoy-ratelimit or limitador)",
        ),
        (
            "?format=",
            "format: unknown format \"\" (expected envoy-ratelimit or limitador)",
        ),
    ] {
        let r = c.get(&format!("{EXPORT}{query}"), &edge).await;
        assert_eq!(r.status, 400, "{query}");
        assert_eq!(r.json()["error"]["code"], "invalid_request");
        assert_eq!(r.json()["error"]["message"], message, "{query}");
    }

    // Edge tokens and the admin token; nobody else.
    let r = c.get(&path, &Auth::None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "missing_credentials");
    let r = c.get(&path, &Auth::bearer("kg_edge_00")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_credentials");
    let r = c.get(&path, &s.account_auth()).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "forbidden");
    assert_eq!(c.get(&path, &s.admin()).await.status, 200);
}

/// The Limitador export read with limitador's own types (`Vec<Limit>` from YAML, as the Limitador
/// server and keygate-ratelimit read it), then matched against each subject's descriptor the
/// way keygate-ratelimit binds it (`descriptors[0]`): exactly one limit applies to every subject
/// the fleet counts, with its own rate, and none to a subject whose override is local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limitador_reads_the_export_and_one_limit_applies_per_subject() {
    use limitador::limit::{Context, Limit};
    use std::collections::HashMap;

    let f = fixture().await;
    let (_, body) = export(&f.s, "limitador").await;
    let limits: Vec<Limit> = serde_yaml::from_str(&body).expect("limitador's types read it");
    assert_eq!(limits.len(), 8);
    assert!(limits.iter().all(|l| l.namespace().as_ref() == "keygate"));

    // (descriptor entries, the one limit's (max_value, seconds), or None: no limit applies)
    type Descriptor<'a> = Vec<(&'a str, &'a str)>;
    let other_account = "AC00000000000000000000000000000000";
    let other_key = "SK00000000000000000000000000000000";
    let cases: Vec<(Descriptor, Option<(u64, u64)>)> = vec![
        (
            vec![("keygate", "account"), ("account_sid", &f.ac_fleet)],
            Some((60, 60)),
        ),
        (
            vec![("keygate", "account"), ("account_sid", &f.ac_local)],
            None,
        ),
        (
            vec![("keygate", "account"), ("account_sid", other_account)],
            Some((200, 60)),
        ),
        (
            vec![
                ("keygate", "key"),
                ("role", "standard"),
                ("key_sid", &f.k_fleet),
            ],
            Some((30, 3600)),
        ),
        (
            vec![
                ("keygate", "key"),
                ("role", "standard"),
                ("key_sid", &f.k_local),
            ],
            None,
        ),
        (
            vec![
                ("keygate", "key"),
                ("role", "standard"),
                ("key_sid", other_key),
            ],
            Some((100, 60)),
        ),
        (
            vec![("keygate", "key"), ("role", "main"), ("key_sid", &f.k_main)],
            Some((5, 90)),
        ),
        // The main role's default is local: another main key is not counted by the fleet.
        (
            vec![("keygate", "key"), ("role", "main"), ("key_sid", other_key)],
            None,
        ),
        (
            vec![
                ("keygate", "key_api"),
                ("api", "calls"),
                ("key_sid", &f.k_fleet),
            ],
            Some((2, 1)),
        ),
        (
            vec![
                ("keygate", "key_api"),
                ("api", "calls"),
                ("key_sid", other_key),
            ],
            Some((10, 1)),
        ),
        (
            vec![
                ("keygate", "key_api"),
                ("api", "messages"),
                ("key_sid", &f.k_local),
            ],
            Some((7, 86_400)),
        ),
        (
            vec![
                ("keygate", "key_api"),
                ("api", "messages"),
                ("key_sid", other_key),
            ],
            None,
        ),
        // A descriptor that is not keygate's matches nothing.
        (vec![("account_sid", &f.ac_fleet)], None),
    ];
    for (entries, want) in cases {
        let map: HashMap<String, String> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_owned(), vec![map]);
        let applying: Vec<(u64, u64)> = limits
            .iter()
            .filter(|l| l.applies(&ctx))
            .map(|l| (l.max_value(), l.seconds()))
            .collect();
        assert_eq!(
            applying,
            want.into_iter().collect::<Vec<_>>(),
            "{entries:?}"
        );
        // Each applying limit counts per subject: its variable resolves to the SID.
        for l in limits.iter().filter(|l| l.applies(&ctx)) {
            let vars = l.resolve_variables(&ctx).unwrap().unwrap();
            let sid = entries.last().unwrap().1;
            assert_eq!(vars.values().collect::<Vec<_>>(), vec![sid], "{entries:?}");
        }
    }
}
