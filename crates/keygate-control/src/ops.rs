//! Operations: `/healthz`, `/readyz` and `/metrics`.
//!
//! - `GET /healthz`: 200 `{"status":"ok"}` while the process serves (no credential, no
//!   database access): for a supervisor's liveness probe.
//! - `GET /readyz`: 200 `{"status":"ready","version":V}` when the database answers and has
//!   applied every migration this binary knows; else 503 `{"status":"unavailable","reason"}`.
//!   No credential: Envoy's health checks of the control-plane cluster use it, so an edge's
//!   feed requests go to a replica that can answer them.
//! - `GET /metrics` (admin token): Prometheus text format. Requests by route template, method
//!   and status; open long-polls; the config version; edges in the fleet view and each one's
//!   version and lag; database transaction latency by kind (read, write) and write transactions
//!   by outcome (commit, rollback).

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::auth::Caller;
use crate::error::{internal, Error};
use crate::model::now;
use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    pub edge: String,
    pub region: String,
}

/// One server's metrics and the registry that reports them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub long_polls: Gauge,
    version: Gauge,
    edges: Gauge,
    edge_version: Family<EdgeLabels, Gauge>,
    edge_lag: Family<EdgeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keygate_control");
        let requests = Family::<RequestLabels, Counter>::default();
        let long_polls = Gauge::default();
        let version = Gauge::default();
        let edges = Gauge::default();
        let edge_version = Family::<EdgeLabels, Gauge>::default();
        let edge_lag = Family::<EdgeLabels, Gauge>::default();
        registry.register(
            "requests",
            "HTTP requests by method, route template and status",
            requests.clone(),
        );
        registry.register(
            "long_polls_open",
            "Feed requests waiting for a change",
            long_polls.clone(),
        );
        registry.register(
            "config_version",
            "The config version this replica knows",
            version.clone(),
        );
        registry.register(
            "edges",
            "Edges in the fleet view (seen within the edge TTL)",
            edges.clone(),
        );
        registry.register(
            "edge_version",
            "The config version each edge holds",
            edge_version.clone(),
        );
        registry.register(
            "edge_lag_seconds",
            "Seconds each edge has been behind the current version (0: current)",
            edge_lag.clone(),
        );
        registry.register(
            "db_transaction_seconds",
            "Database transactions by kind (read, write), waiting for a connection included",
            crate::store::DB.seconds.clone(),
        );
        registry.register(
            "db_write_transactions",
            "Write transactions by outcome (commit, rollback)",
            crate::store::DB.writes.clone(),
        );
        Metrics {
            registry,
            requests,
            long_polls,
            version,
            edges,
            edge_version,
            edge_lag,
        }
    }
}

/// Counts a long-poll as open while alive.
pub struct LongPoll<'a>(&'a Gauge);

impl<'a> LongPoll<'a> {
    pub fn open(m: &'a Metrics) -> LongPoll<'a> {
        m.long_polls.inc();
        LongPoll(&m.long_polls)
    }
}

impl Drop for LongPoll<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Paths answered before authentication (no credential needed, nothing secret in them).
pub fn is_open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.db().ready().await {
        Ok(version) => {
            state.published(version);
            Json(json!({"status": "ready", "version": version})).into_response()
        }
        Err(reason) => {
            tracing::warn!(reason = %reason, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "reason": reason})),
            )
                .into_response()
        }
    }
}

async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, Error> {
    caller.require_admin()?;
    let (current, edges) = state.edges_now().await?;
    let m = state.metrics();
    let t = now();
    m.version.set(i64::try_from(current).unwrap_or(i64::MAX));
    m.edges.set(i64::try_from(edges.len()).unwrap_or(i64::MAX));
    m.edge_version.clear();
    m.edge_lag.clear();
    for e in &edges {
        let labels = EdgeLabels {
            edge: e.id.clone(),
            region: e.region.clone(),
        };
        m.edge_version
            .get_or_create(&labels)
            .set(i64::try_from(e.version.unwrap_or(0)).unwrap_or(i64::MAX));
        m.edge_lag.get_or_create(&labels).set(state.fleet().lag_s(
            e.version.unwrap_or(0),
            current,
            t,
        ));
    }
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &m.registry)
        .map_err(|e| internal("encode metrics", e))?;
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(resp)
}
