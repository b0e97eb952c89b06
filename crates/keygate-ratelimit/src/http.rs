//! The HTTP side: `/healthz` (the process answers), `/readyz` (limits loaded and Redis answers
//! PING, else 503 naming what is missing), `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::service::Shared;

const PING_TIMEOUT: Duration = Duration::from_secs(1);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let mut missing = Vec::new();
    if shared.limits().is_none() {
        missing.push("no limits loaded yet");
    }
    match shared.redis() {
        None => missing.push("Redis not connected yet"),
        Some(redis) => {
            let mut connection = redis.connection.clone();
            let ping = tokio::time::timeout(
                PING_TIMEOUT,
                redis::cmd("PING").query_async::<String>(&mut connection),
            )
            .await;
            if !matches!(ping, Ok(Ok(ref pong)) if pong == "PONG") {
                missing.push("Redis does not answer PING");
            }
        }
    }
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
            .into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match shared.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}
