//! The fleet view (`GET /v1/edge/fleet`), health (`/healthz`, `/readyz`) and `/metrics`, on
//! this run's backend.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use keygate_control::Config;
use serde_json::json;

async fn poll_as(s: &InProc, edge: &str, region: &str, known: u64) -> Resp {
    s.client
        .get(
            &format!(
                "/v1/edge/changes?since={known}&known={known}&wait=0&edge={edge}&region={region}"
            ),
            &Auth::bearer(&s.creds.edge),
        )
        .await
}

async fn current_version(s: &InProc) -> u64 {
    let r = s
        .client
        .get("/v1/edge/changes?since=0", &Auth::bearer(&s.creds.edge))
        .await;
    r.json()["version"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_shows_each_edge_its_version_and_where_a_change_is_in_force() {
    let s = InProc::start().await;
    let c = &s.client;
    let v1 = current_version(&s).await;
    // Two edges at the current version, then a change that only one of them picks up.
    assert_eq!(poll_as(&s, "edge-a", "us1", v1).await.status, 304);
    assert_eq!(poll_as(&s, "edge-b", "in1", v1).await.status, 304);
    let r = c
        .json(
            "POST",
            &format!("/v1/accounts/{}/keys", s.creds.account_sid),
            &s.account_auth(),
            json!({"role": "standard"}),
        )
        .await;
    assert_eq!(r.status, 201);
    let v2 = current_version(&s).await;
    assert!(v2 > v1);
    assert_eq!(poll_as(&s, "edge-a", "us1", v2).await.status, 304);

    let r = c.get("/v1/edge/fleet", &s.admin()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["version"], v2);
    let edges = v["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 2, "{v}");
    assert_eq!(
        (&edges[0]["id"], &edges[0]["region"], &edges[0]["version"]),
        (&json!("edge-a"), &json!("us1"), &json!(v2))
    );
    assert_eq!(edges[0]["lag_s"], 0);
    assert_eq!(
        (&edges[1]["id"], &edges[1]["region"], &edges[1]["version"]),
        (&json!("edge-b"), &json!("in1"), &json!(v1))
    );
    assert!(edges[1]["lag_s"].as_i64().unwrap() >= 0);
    let last_seen = edges[1]["last_seen"].as_str().unwrap();
    assert!(
        last_seen.ends_with('Z') && last_seen.len() == 20,
        "{last_seen}"
    );

    // "In force at k of n edges."
    let at = |v: u64| format!("/v1/edge/fleet?version={v}");
    assert_eq!(
        c.get(&at(v2), &s.admin()).await.json(),
        json!({"version": v2, "edges": 2, "at_or_above": 1})
    );
    assert_eq!(
        c.get(&at(v1), &s.admin()).await.json(),
        json!({"version": v1, "edges": 2, "at_or_above": 2})
    );
    assert_eq!(poll_as(&s, "edge-b", "in1", v2).await.status, 304);
    assert_eq!(
        c.get(&at(v2), &s.admin()).await.json(),
        json!({"version": v2, "edges": 2, "at_or_above": 2})
    );

    // Only the operator reads it; bad parameters are named.
    assert_eq!(c.get("/v1/edge/fleet", &Auth::None).await.status, 401);
    assert_eq!(
        c.get("/v1/edge/fleet", &Auth::bearer(&s.creds.edge))
            .await
            .status,
        403
    );
    assert_eq!(c.get("/v1/edge/fleet", &s.account_auth()).await.status, 403);
    let r = c.get("/v1/edge/fleet?version=x", &s.admin()).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["message"],
        "version: must be a whole number (a config version)"
    );
    let edge = Auth::bearer(&s.creds.edge);
    for (q, msg) in [
        (
            "edge=a%20b",
            "edge: must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' and '.'",
        ),
        (
            "edge=a&region=",
            "region: must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' and '.'",
        ),
        ("region=us1", "region: needs edge"),
    ] {
        let r = c.get(&format!("/v1/edge/changes?{q}"), &edge).await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json()["error"]["message"], msg, "{q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_that_stop_polling_age_out() {
    let s = InProc::start_with(Config {
        edge_ttl: Duration::from_secs(1),
        ..Config::with_built_in_catalog().unwrap()
    })
    .await;
    let v = current_version(&s).await;
    assert_eq!(poll_as(&s, "edge-a", "us1", v).await.status, 304);
    let count = |s: &InProc| {
        let (c, admin) = (s.client.clone(), s.admin());
        async move {
            c.get(&format!("/v1/edge/fleet?version={v}"), &admin)
                .await
                .json()["edges"]
                .as_u64()
                .unwrap()
        }
    };
    assert_eq!(count(&s).await, 1);
    // Last seen at second t, forgotten once the clock passes t + 1 (at most ~2 s from now).
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if count(&s).await == 0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "an edge silent for longer than the TTL left the view");
    // Polling again brings it back.
    assert_eq!(poll_as(&s, "edge-a", "us1", v).await.status, 304);
    assert_eq!(count(&s).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let s = InProc::start().await;
    let c = &s.client;
    let r = c.get("/healthz", &Auth::None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = c.get("/readyz", &Auth::None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(r.json()["version"], current_version(&s).await);
    // A credential, even a wrong one, changes nothing there (nothing is judged).
    assert_eq!(
        c.get("/healthz", &Auth::basic("ACnope", "nope"))
            .await
            .status,
        200
    );

    // A long-poll in flight is counted while it waits.
    let v = current_version(&s).await;
    let waiting = {
        let (c, edge) = (c.clone(), Auth::bearer(&s.creds.edge));
        tokio::spawn(async move {
            c.get(
                &format!("/v1/edge/changes?since={v}&known={v}&wait=2&edge=edge-m&region=us1"),
                &edge,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.get("/metrics", &Auth::None).await.status, 401);
    assert_eq!(c.get("/metrics", &s.account_auth()).await.status, 403);
    let r = c.get("/metrics", &s.admin()).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let m = r.text.clone();
    for line in [
        "keygate_control_long_polls_open 1".to_owned(),
        format!("keygate_control_config_version {v}"),
        "keygate_control_edges 1".to_owned(),
        format!("keygate_control_edge_version{{edge=\"edge-m\",region=\"us1\"}} {v}"),
        "keygate_control_edge_lag_seconds{edge=\"edge-m\",region=\"us1\"} 0".to_owned(),
        "keygate_control_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 2"
            .to_owned(),
        "keygate_control_requests_total{method=\"GET\",route=\"/metrics\",status=\"401\"} 1"
            .to_owned(),
    ] {
        assert!(m.lines().any(|l| l == line), "no line {line:?} in\n{m}");
    }
    for prefix in [
        "keygate_control_db_transaction_seconds_count{kind=\"read\"} ",
        "keygate_control_db_transaction_seconds_count{kind=\"write\"} ",
        "keygate_control_db_write_transactions_total{outcome=\"commit\"} ",
    ] {
        assert!(
            m.lines().any(|l| l.starts_with(prefix)),
            "no {prefix} in\n{m}"
        );
    }
    assert_eq!(waiting.await.unwrap().status, 304);
    let m = c.get("/metrics", &s.admin()).await.text;
    assert!(m.lines().any(|l| l == "keygate_control_long_polls_open 0"));
    // No secret in the metrics.
    for secret in [&s.creds.admin, &s.creds.auth_token, &s.creds.edge] {
        assert!(!m.contains(secret.as_str()));
    }
}

/// Two replicas on one database each hold a sighting of the same edge: the older one, written
/// last, changes nothing (sightings are ordered by time in milliseconds, not by which replica
/// writes last), and a page of a walk (no `known`) keeps the version held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_sighting_wins_whichever_replica_writes_last() {
    let x = InProc::start().await;
    let y = InProc::serve_with(
        tempfile::tempdir().unwrap(),
        x.database.clone(),
        x.creds.clone(),
        Config::with_built_in_catalog().unwrap(),
    )
    .await;
    let v1 = current_version(&x).await;
    let r = x
        .client
        .json(
            "POST",
            &format!("/v1/accounts/{}/keys", x.creds.account_sid),
            &x.account_auth(),
            json!({"role": "standard"}),
        )
        .await;
    assert_eq!(r.status, 201);
    let v2 = current_version(&x).await;
    // The edge held v1 when it asked X, then v2 when it asked Y.
    assert_eq!(poll_as(&x, "edge-a", "us1", v1).await.status, 200);
    assert_eq!(poll_as(&y, "edge-a", "us1", v2).await.status, 304);
    let view = |s: &InProc| {
        let (c, admin) = (s.client.clone(), s.admin());
        async move { c.get("/v1/edge/fleet", &admin).await.json()["edges"][0].clone() }
    };
    // Y writes its sighting, then X writes the older one.
    assert_eq!(view(&y).await["version"], v2);
    assert_eq!(
        view(&x).await["version"],
        v2,
        "the older sighting changed nothing"
    );
    // A page of a walk says nothing about the version held.
    let r = x
        .client
        .get(
            &format!("/v1/edge/changes?since={v1}&after=AC&limit=1&edge=edge-a&region=us1"),
            &Auth::bearer(&x.creds.edge),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(view(&x).await["version"], v2);
    // A first page from 0 without `known`: nothing in force (a restarted edge).
    let r = y
        .client
        .get(
            "/v1/edge/changes?since=0&edge=edge-a&region=us1",
            &Auth::bearer(&y.creds.edge),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(view(&y).await["version"], 0);
}
