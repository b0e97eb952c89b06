//! Regeneration with grace (default 48 h, 0 = now, early revocation, concurrent calls), the
//! edge feed (ETag / 304, long-poll, authentication), and the round trip: what the control plane
//! serves, the edge's compiler accepts and its decision honours.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use keygate_control::secret::digest;
use serde_json::{json, Value};

async fn new_key(s: &InProc, role: &str) -> (String, String) {
    let r = s
        .client
        .post_form(
            &keys_path(&s.creds.account_sid),
            &s.account_auth(),
            &[("KeyType", role)],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    (
        v["sid"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

fn regenerate_path(s: &InProc, sid: &str) -> String {
    format!("/v1/accounts/{}/keys/{sid}/regenerate", s.creds.account_sid)
}

fn key_secrets(doc: &Value, sid: &str) -> Vec<Value> {
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["sid"] == sid)
        .unwrap()["secrets"]
        .as_array()
        .unwrap()
        .clone()
}

fn not_after_of(secrets: &[Value], secret: &str) -> Option<Option<i64>> {
    let d = digest(secret.as_bytes());
    secrets.iter().find(|s| s["digest"] == d.as_str()).map(|s| {
        s["not_after"]
            .as_str()
            .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regeneration_keeps_the_old_secret_for_48_hours_by_default() {
    let s = InProc::start().await;
    let (sid, old) = new_key(&s, "standard").await;
    let before = now_unix() as i64;
    let r = s
        .client
        .json(
            "POST",
            &regenerate_path(&s, &sid),
            &s.account_auth(),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let new = r.json()["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(r.json()["secrets"].as_array().unwrap().len(), 2);

    let doc = s.client.feed(&s.creds.edge).await;
    let secrets = key_secrets(&doc, &sid);
    assert_eq!(
        not_after_of(&secrets, &new),
        Some(None),
        "the new secret is current"
    );
    let grace_end = not_after_of(&secrets, &old).unwrap().unwrap();
    assert!(
        (grace_end - (before + 172_800)).abs() <= 5,
        "not_after {grace_end} ≈ now + 48 h"
    );

    let calls = calls_path(&s.creds.account_sid);
    let now = now_unix();
    assert!(edge_decides(&doc, "GET", &calls, &Auth::basic(&sid, &old), now).is_ok());
    assert!(edge_decides(&doc, "GET", &calls, &Auth::bearer(&new), now).is_ok());
    let after_grace = grace_end as u64 + 1;
    assert_eq!(
        edge_decides(&doc, "GET", &calls, &Auth::basic(&sid, &old), after_grace),
        Err("invalid_credentials".into())
    );
    assert!(edge_decides(&doc, "GET", &calls, &Auth::basic(&sid, &new), after_grace).is_ok());

    // A per-call grace.
    let r = s
        .client
        .json(
            "POST",
            &regenerate_path(&s, &sid),
            &s.account_auth(),
            json!({"grace_seconds": 600}),
        )
        .await;
    let newer = r.json()["secret"].as_str().unwrap().to_owned();
    let secrets = key_secrets(&s.client.feed(&s.creds.edge).await, &sid);
    let end = not_after_of(&secrets, &new).unwrap().unwrap();
    assert!((end - (now_unix() as i64 + 600)).abs() <= 5);
    assert_eq!(not_after_of(&secrets, &newer), Some(None));
    assert_eq!(
        secrets.len(),
        3,
        "both earlier secrets keep their own grace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_zero_revokes_the_old_secret_at_once_and_previous_secrets_can_be_revoked_early() {
    let s = InProc::start().await;
    let (sid, old) = new_key(&s, "main").await;
    let ac = s.creds.account_sid.clone();
    let r = s
        .client
        .json(
            "POST",
            &regenerate_path(&s, &sid),
            &s.account_auth(),
            json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(r.status, 200);
    let new = r.json()["secret"].as_str().unwrap().to_owned();
    let doc = s.client.feed(&s.creds.edge).await;
    let secrets = key_secrets(&doc, &sid);
    assert_eq!(secrets.len(), 1);
    assert_eq!(
        not_after_of(&secrets, &old),
        None,
        "the old digest is gone from the feed"
    );
    // The control plane refuses it too (a main key could otherwise still manage keys).
    assert_eq!(
        s.client
            .get(&keys_path(&ac), &Auth::basic(&sid, &old))
            .await
            .status,
        401
    );
    assert_eq!(
        s.client
            .get(&keys_path(&ac), &Auth::basic(&sid, &new))
            .await
            .status,
        200
    );

    // Early revocation of a secret in its grace period.
    let r = s
        .client
        .json(
            "POST",
            &regenerate_path(&s, &sid),
            &Auth::basic(&sid, &new),
            json!({}),
        )
        .await;
    let newest = r.json()["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        key_secrets(&s.client.feed(&s.creds.edge).await, &sid).len(),
        2
    );
    assert_eq!(
        s.client
            .get(&keys_path(&ac), &Auth::basic(&sid, &new))
            .await
            .status,
        200,
        "in grace"
    );
    let prev = format!("/v1/accounts/{ac}/keys/{sid}/secrets/previous");
    let r = s.client.delete(&prev, &Auth::basic(&sid, &newest)).await;
    assert_eq!(r.status, 204);
    let doc = s.client.feed(&s.creds.edge).await;
    let secrets = key_secrets(&doc, &sid);
    assert_eq!(secrets.len(), 1);
    assert_eq!(not_after_of(&secrets, &newest), Some(None));
    assert_eq!(
        s.client
            .get(&keys_path(&ac), &Auth::basic(&sid, &new))
            .await
            .status,
        401
    );
    let calls = calls_path(&ac);
    assert_eq!(
        edge_decides(&doc, "GET", &calls, &Auth::basic(&sid, &new), now_unix()),
        Err("invalid_credentials".into())
    );
    // Revoking when there is nothing to revoke changes nothing.
    let v = doc["version"].as_u64().unwrap();
    assert_eq!(s.client.delete(&prev, &s.account_auth()).await.status, 204);
    assert_eq!(
        s.client.feed(&s.creds.edge).await["version"]
            .as_u64()
            .unwrap(),
        v
    );
    // Unknown key: 404 for both.
    let unknown = "SK00000000000000000000000000000000";
    assert_eq!(
        s.client
            .json(
                "POST",
                &regenerate_path(&s, unknown),
                &s.account_auth(),
                json!({})
            )
            .await
            .status,
        404
    );
    assert_eq!(
        s.client
            .delete(
                &format!("/v1/accounts/{ac}/keys/{unknown}/secrets/previous"),
                &s.account_auth()
            )
            .await
            .status,
        404
    );
    let r = s
        .client
        .json(
            "POST",
            &regenerate_path(&s, &sid),
            &s.account_auth(),
            json!({"grace_seconds": 99_999_999}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("grace_seconds: must be at most"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_regenerations_never_leave_a_secret_nobody_holds() {
    let s = InProc::start().await;
    for _round in 0..5 {
        let (sid, original) = new_key(&s, "standard").await;
        let path = regenerate_path(&s, &sid);
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (c, p, a) = (s.client.clone(), path.clone(), s.account_auth());
                tokio::spawn(async move { c.json("POST", &p, &a, json!({})).await })
            })
            .collect();
        let mut held: BTreeSet<String> = BTreeSet::from([digest(original.as_bytes())]);
        let mut returned = Vec::new();
        for call in calls {
            let r = call.await.unwrap();
            assert!(r.status == 200 || r.status == 409, "{}", r.text);
            if r.status == 200 {
                let secret = r.json()["secret"].as_str().unwrap().to_owned();
                held.insert(digest(secret.as_bytes()));
                returned.push(secret);
            }
        }
        assert!(!returned.is_empty());
        let secrets = key_secrets(&s.client.feed(&s.creds.edge).await, &sid);
        let in_feed: BTreeSet<String> = secrets
            .iter()
            .map(|s| s["digest"].as_str().unwrap().to_owned())
            .collect();
        assert!(
            in_feed.is_subset(&held),
            "a valid secret nobody was given: {in_feed:?} vs {held:?}"
        );
        let current: Vec<&Value> = secrets
            .iter()
            .filter(|s| s["not_after"].is_null())
            .collect();
        assert_eq!(current.len(), 1, "exactly one current secret");
        assert!(returned
            .iter()
            .any(|r| digest(r.as_bytes()) == current[0]["digest"].as_str().unwrap()));
        // Every secret handed out still works (the others are in grace).
        for r in &returned {
            assert!(not_after_of(&secrets, r).is_some());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_needs_an_edge_credential_and_answers_304_for_its_etag() {
    let s = InProc::start().await;
    let c = &s.client;
    let r = c.get("/v1/edge/config", &Auth::None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "missing_credentials");
    let r = c.get("/v1/edge/config", &Auth::bearer("kg_edge_00")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_credentials");
    assert_eq!(
        c.get("/v1/edge/config", &s.account_auth()).await.status,
        403
    );
    assert_eq!(c.get("/v1/edge/config", &s.admin()).await.status, 200);

    let edge = Auth::bearer(&s.creds.edge);
    let r = c.get("/v1/edge/config", &edge).await;
    assert_eq!(r.status, 200);
    let v = r.json()["version"].as_u64().unwrap();
    assert_eq!(r.header("etag"), Some(format!("\"{v}\"")));
    assert_eq!(r.json()["settings"]["check_secret_format"], true);
    let inm = |t: &str| [("if-none-match", t.to_owned())];
    for tag in [
        format!("\"{v}\""),
        format!("W/\"{v}\""),
        format!("\"1\", \"{v}\""),
    ] {
        let h = inm(&tag);
        let r = c
            .send(
                "GET",
                "/v1/edge/config",
                &edge,
                None,
                &[(h[0].0, h[0].1.as_str())],
            )
            .await;
        assert_eq!(r.status, 304, "{tag}");
        assert_eq!(r.header("etag"), Some(format!("\"{v}\"")));
    }
    let r = c
        .send(
            "GET",
            "/v1/edge/config",
            &edge,
            None,
            &[("if-none-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, 200);
    // Every change bumps the version; the ETag follows.
    new_key(&s, "standard").await;
    let r = c
        .send(
            "GET",
            "/v1/edge/config",
            &edge,
            None,
            &[("if-none-match", &format!("\"{v}\""))],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"].as_u64(), Some(v + 1));
    let r = c.get("/v1/edge/config?wait=soon", &edge).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("wait: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_the_new_version_as_soon_as_it_changes() {
    let s = InProc::start().await;
    let edge = Auth::bearer(&s.creds.edge);
    let v = s.client.feed(&s.creds.edge).await["version"]
        .as_u64()
        .unwrap();
    let etag = format!("\"{v}\"");

    // No change: 304 after the wait.
    let started = Instant::now();
    let r = s
        .client
        .send(
            "GET",
            "/v1/edge/config?wait=1",
            &edge,
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, 304);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A change during the wait: 200 with the new version, well before the 20 s timeout.
    let c = s.client.clone();
    let (e, t) = (edge.clone(), etag.clone());
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        c.send(
            "GET",
            "/v1/edge/config?wait=20",
            &e,
            None,
            &[("if-none-match", &t)],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished());
    new_key(&s, "main").await;
    let r = poll.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"].as_u64(), Some(v + 1));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_sees_changes_made_by_the_cli_in_another_process() {
    let s = InProc::start().await;
    let edge = Auth::bearer(&s.creds.edge);
    let v = s.client.feed(&s.creds.edge).await["version"]
        .as_u64()
        .unwrap();
    let c = s.client.clone();
    let (e, t) = (edge.clone(), format!("\"{v}\""));
    let poll = tokio::spawn(async move {
        c.send(
            "GET",
            "/v1/edge/config?wait=20",
            &e,
            None,
            &[("if-none-match", &t)],
        )
        .await
    });
    let printed = cli(
        &["account", "create", "--name", "from the cli"],
        &s.database,
    );
    let (sid, token) = (printed.get("ACCOUNT_SID"), printed.get("AUTH_TOKEN"));
    let started = Instant::now();
    let r = poll.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["sid"] == sid.as_str()));
    // The new account's credentials work at once, here and at the edge.
    assert_eq!(
        s.client
            .get(&keys_path(&sid), &Auth::basic(&sid, &token))
            .await
            .status,
        200
    );
    let calls = calls_path(&sid);
    assert_eq!(
        edge_decides(&doc, "POST", &calls, &Auth::basic(&sid, &token), now_unix()),
        Ok("calls".into())
    );
}

/// What the control plane serves, keygate-core's compiler accepts, and `decide` honours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_the_served_document_compiles_and_admits_the_created_keys() {
    let s = InProc::start().await;
    let ac = s.creds.account_sid.clone();
    let (main_sid, main) = new_key(&s, "main").await;
    let (std_sid, std) = new_key(&s, "standard").await;
    let (pub_sid, publ) = new_key(&s, "publishable").await;
    let r = s
        .client
        .get("/v1/edge/config", &Auth::bearer(&s.creds.edge))
        .await;
    let doc = r.json();
    // The served bytes themselves compile, with the edge's parser (deny_unknown_fields).
    let compiled = keygate_core::compile::compile(r.text.as_bytes()).unwrap();
    assert_eq!(compiled.version(), doc["version"].as_u64().unwrap());
    assert_eq!(compiled.counts(), (1, 3, 4));
    assert!(!r.text.contains(&main) && !r.text.contains(&std) && !r.text.contains(&publ));

    let now = now_unix();
    let calls = calls_path(&ac);
    let keys = keys_path(&ac);
    let d = |m: &str, p: &str, a: Auth| edge_decides(&doc, m, p, &a, now);
    assert_eq!(
        d("GET", &calls, Auth::basic(&main_sid, &main)),
        Ok("calls".into())
    );
    assert_eq!(d("POST", &calls, Auth::bearer(&std)), Ok("calls".into()));
    assert_eq!(
        d("GET", &calls, Auth::basic(&std_sid, &std)),
        Ok("calls".into())
    );
    assert_eq!(
        d("GET", "/api/account/balance", Auth::bearer(&publ)),
        Ok("balance".into())
    );
    assert_eq!(
        d("GET", &calls, Auth::basic(&pub_sid, &publ)),
        Err("permission_denied".into())
    );
    // The management API: the edge and the control plane agree on who may call it.
    assert_eq!(
        d("GET", &keys, Auth::basic(&main_sid, &main)),
        Ok("keys".into())
    );
    assert_eq!(
        d("GET", &keys, Auth::basic(&std_sid, &std)),
        Err("permission_denied".into())
    );
    assert_eq!(
        d("GET", &keys, Auth::basic(&ac, &s.creds.auth_token)),
        Ok("keys".into())
    );
    // A mistyped secret is refused by its checksum, a foreign account SID is 404.
    let mut typo = std.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    assert_eq!(
        d(
            "GET",
            &calls,
            Auth::bearer(std::str::from_utf8(&typo).unwrap())
        ),
        Err("invalid_credentials".into())
    );
    assert_eq!(
        d("GET", "/v2/accounts/ACother/calls", Auth::bearer(&std)),
        Err("account_mismatch".into())
    );
}
