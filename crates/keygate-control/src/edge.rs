//! The edge feed: `GET /v1/edge/config`, the complete edge config at the current version.
//!
//! The body is a `keygate.config/v1` document (keygate-core's `ConfigDoc`: digests only, never
//! secrets) with `settings.check_secret_format: true`. `ETag` is `"<version>"`; a request whose
//! `If-None-Match` names the current version gets 304, or, with `?wait=N` (seconds, at most 60),
//! is held until the version changes (then 200 with the new document) or `N` seconds pass (304).
//! Each version is serialized once, checked with the edge's own compiler (a document the edge
//! would refuse is never served), and cached. Edges authenticate with an edge token (Bearer).

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::time::Duration;

use crate::error::{internal, ApiError};
use crate::{service, store, AppState};

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/edge/config", get(config))
}

/// Longest long-poll.
pub const MAX_WAIT_SECONDS: u64 = 60;

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// Whether `If-None-Match` names `version` (strong or weak form, or `*`).
fn not_modified(headers: &HeaderMap, version: u64) -> bool {
    let want = etag(version);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == want)
        })
}

fn wait_param(query: Option<&str>) -> Result<u64, ApiError> {
    let fields: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|_| ApiError::bad("query", "must be URL-encoded"))?;
    match fields.iter().rev().find(|(k, _)| k == "wait") {
        None => Ok(0),
        Some((_, v)) => v
            .parse::<u64>()
            .map(|w| w.min(MAX_WAIT_SECONDS))
            .map_err(|_| ApiError::bad("wait", "must be a whole number of seconds")),
    }
}

fn not_modified_response(version: u64) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(&etag(version)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

async fn config(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    state.principal(&headers).await?.may_read_feed()?;
    let wait = wait_param(query.as_deref())?;
    let mut versions = state.subscribe();
    let current = state.db().call(|c| store::version(c)).await?;
    state.published(current);
    if not_modified(&headers, current) {
        if wait == 0 {
            return Ok(not_modified_response(current));
        }
        let mut closing = state.closing();
        tokio::select! {
            _ = versions.wait_for(|v| *v > current) => {}
            () = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = closing.wait_for(|c| *c) => {}
        }
    }
    let (version, body) = state.feed().await?;
    if not_modified(&headers, version) {
        return Ok(not_modified_response(version));
    }
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag(version)) {
        h.insert(header::ETAG, v);
    }
    Ok(resp)
}

impl AppState {
    /// The serialized edge config at the current version (built once per version).
    pub async fn feed(&self) -> Result<(u64, axum::body::Bytes), ApiError> {
        let mut cache = self.inner.feed.lock().await;
        let cached = cache.as_ref().map(|(v, _)| *v);
        let cat = self.catalog().clone();
        let fresh = self
            .db()
            .call(move |c| {
                if Some(store::version(c)?) == cached {
                    return Ok(None);
                }
                service::snapshot(c, &cat).map(Some)
            })
            .await?;
        if let Some(doc) = fresh {
            let json =
                serde_json::to_vec(&doc).map_err(|e| internal("serialize edge config", e))?;
            keygate_core::compile::compile(&json)
                .map_err(|e| internal("edge config does not compile", e))?;
            tracing::info!(
                version = doc.version,
                accounts = doc.accounts.len(),
                keys = doc.keys.len(),
                "edge config built"
            );
            self.published(doc.version);
            *cache = Some((doc.version, json.into()));
        }
        cache.clone().ok_or(ApiError::Internal)
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }
}
