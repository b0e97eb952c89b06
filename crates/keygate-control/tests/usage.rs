//! Usage over HTTP, on this run's backend (`KEYGATE_TEST_BACKEND`): `POST /v1/edge/usage`
//! applies a batch id once, `GET /v1/accounts/{sid}/usage` answers the buckets, and key
//! responses show each secret's and the key's `last_used_at`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use keygate_control::secret::digest;
use serde_json::{json, Value};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn rfc(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn usage_path(s: &InProc, query: &str) -> String {
    format!("/v1/accounts/{}/usage?{query}", s.creds.account_sid)
}

async fn post_batch(s: &InProc, auth: &Auth, batch: &Value) -> Resp {
    s.client
        .json("POST", "/v1/edge/usage", auth, batch.clone())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_counts_once_and_shows_in_buckets_and_last_use() {
    let s = InProc::start().await;
    let r = s
        .client
        .json(
            "POST",
            &keys_path_v1(&s),
            &s.account_auth(),
            json!({"role": "standard"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let key = r.json();
    let (sid, secret) = (
        key["sid"].as_str().unwrap().to_owned(),
        key["secret"].as_str().unwrap().to_owned(),
    );
    assert_eq!(key["last_used_at"], Value::Null);
    assert_eq!(key["secrets"][0]["last_used_at"], Value::Null);
    let tag = &digest(secret.as_bytes())[..16];
    let minute = now() - now() % 60 - 120;
    let used_at = minute + 42;
    let batch = json!({
        "batch": "edge-a.0123.1",
        "entries": [
            {"minute": minute, "account_sid": s.creds.account_sid, "key_sid": sid,
             "allowed": 7, "denied": {"rate_limited_key": 3},
             "secrets": [{"id": tag, "n": 10, "last_used_s": used_at}]},
            {"minute": minute + 60, "account_sid": s.creds.account_sid,
             "allowed": 2, "secrets": []}
        ]
    });
    let edge = Auth::bearer(&s.creds.edge);
    let r = post_batch(&s, &edge, &batch).await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"applied": true})),
        "{}",
        r.text
    );
    let r = post_batch(&s, &edge, &batch).await;
    assert_eq!((r.status, r.json()), (200, json!({"applied": false})));

    let from = rfc(minute);
    let to = rfc(minute + 180);
    let r = s
        .client
        .get(
            &usage_path(&s, &format!("from={from}&to={to}")),
            &s.account_auth(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({"buckets": [
            {"start": rfc(minute), "allowed": 7, "denied": {"rate_limited_key": 3}},
            {"start": rfc(minute + 60), "allowed": 2, "denied": {}},
            {"start": rfc(minute + 120), "allowed": 0, "denied": {}},
        ]})
    );
    // One key only: the account's own requests are not its.
    let r = s
        .client
        .get(
            &usage_path(&s, &format!("key_sid={sid}&from={from}&to={to}")),
            &s.account_auth(),
        )
        .await;
    let allowed: Vec<u64> = r.json()["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["allowed"].as_u64().unwrap())
        .collect();
    assert_eq!(allowed, vec![7, 0, 0]);
    // Hours: the hour holding `minute` (and, if the minutes span two hours, the next).
    let hour = minute - minute % 3600;
    let r = s
        .client
        .get(
            &usage_path(
                &s,
                &format!("bucket=1h&from={}&to={}", rfc(hour), rfc(hour + 7200)),
            ),
            &s.account_auth(),
        )
        .await;
    let total: u64 = r.json()["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["allowed"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 9);

    // The key's and its secret's last use.
    let r = s
        .client
        .get(&format!("{}/{sid}", keys_path_v1(&s)), &s.account_auth())
        .await;
    let k = r.json();
    assert_eq!(k["last_used_at"], json!(rfc(used_at)), "{k}");
    assert_eq!(k["secrets"][0]["last_used_at"], json!(rfc(used_at)));
    let list = s
        .client
        .get(&keys_path_v1(&s), &s.account_auth())
        .await
        .json();
    let listed = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["sid"] == sid.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["last_used_at"], json!(rfc(used_at)));
    // After a regeneration: the new secret has not been used, the old one keeps its last use.
    let r = s
        .client
        .json(
            "POST",
            &format!("{}/{sid}/regenerate", keys_path_v1(&s)),
            &s.account_auth(),
            json!({}),
        )
        .await;
    let secrets = r.json()["secrets"].as_array().unwrap().clone();
    let last: Vec<(bool, Value)> = secrets
        .iter()
        .map(|x| (x["current"].as_bool().unwrap(), x["last_used_at"].clone()))
        .collect();
    assert_eq!(
        last,
        vec![(true, Value::Null), (false, json!(rfc(used_at)))]
    );
}

fn keys_path_v1(s: &InProc) -> String {
    format!("/v1/accounts/{}/keys", s.creds.account_sid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_edges_send_usage_and_bad_batches_and_queries_are_refused_exactly() {
    let s = InProc::start().await;
    let batch = json!({"batch": "e.1.1", "entries": []});
    let r = post_batch(&s, &s.account_auth(), &batch).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(
        r.json()["error"]["message"],
        "only edge tokens (or the admin token) may send usage"
    );
    let edge = Auth::bearer(&s.creds.edge);
    for (body, msg) in [
        (
            json!({"batch": "e 1", "entries": []}),
            "batch: must be 1 to 200 characters of A-Z, a-z, 0-9, '_', '-' and '.'",
        ),
        (
            json!({"batch": "e.1.2", "entries": [{"minute": 61, "account_sid": "AC1"}]}),
            "entries[0].minute: must be a multiple of 60",
        ),
        (
            json!({"batch": "e.1.3", "entries": [{"minute": 60, "account_sid": "AC1",
                    "denied": {"bogus": 1}}]}),
            "entries[0].denied: unknown reason \"bogus\"",
        ),
    ] {
        let r = post_batch(&s, &edge, &body).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.json()["error"]["message"], msg);
    }
    let r = post_batch(&s, &edge, &json!({"batch": "e.1.4"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["message"],
        "body: missing field `entries`"
    );

    // The edge token reads no account's usage; bad parameters are 400 with the field named.
    let r = s.client.get(&usage_path(&s, ""), &edge).await;
    assert_eq!(r.status, 403, "{}", r.text);
    for (q, msg) in [
        ("bucket=1d", "bucket: must be 1m or 1h"),
        (
            "from=2026-11-24T10:00:00Z&to=2026-11-24T09:00:00Z",
            "from: must be before to",
        ),
    ] {
        let r = s.client.get(&usage_path(&s, q), &s.account_auth()).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.json()["error"]["message"], msg);
    }
    // The admin reads any account's; an unknown account is 404.
    let r = s.client.get(&usage_path(&s, ""), &s.admin()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["buckets"].as_array().unwrap().len(), 60);
    let r = s.client.get("/v1/accounts/ACnope/usage", &s.admin()).await;
    assert_eq!(r.status, 404);
}
