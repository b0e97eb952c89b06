//! The edge feeds: `GET /v1/edge/config`, the complete edge config at the current version, and
//! `GET /v1/edge/changes`, the same state as pages of what changed since a version.
//!
//! The body is a `keygate.config/v1` document (keygate-core's `ConfigDoc`: digests only, never
//! secrets) with `settings.check_secret_format: true`. `ETag` is `"<version>"`; a request whose
//! `If-None-Match` names the current version gets 304, or, with `?wait=N` (seconds, at most 60),
//! is held until the version changes (then 200 with the new document) or `N` seconds pass (304).
//! Each version is serialized once, checked with the edge's own compiler (a document the edge
//! would refuse is never served), and cached. Edges authenticate with an edge token (Bearer).
//!
//! `/v1/edge/changes?since=V&after=SID&limit=N` serves a `keygate.changes/v1` page
//! (keygate-core's `ChangesPage`): the accounts and keys changed after version `V` (0: all of
//! them), ascending by SID from after `SID`, at most `N` (1–10000, default 1000), deleted ones
//! by SID only, every record checked with the edge's compiler. Each page is one read transaction
//! at its `version` (the `ETag`); `next` is the cursor for the following page. With
//! `known=K&wait=W` it long-polls: while the version is at most `K` it waits up to `W` seconds
//! (at most 60) for a change, and answers 304 if none came. `edge=ID&region=R` name the
//! asking edge for the fleet view ([`crate::fleet`]).

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use std::time::Duration;

use crate::auth::Caller;
use crate::error::{internal, Error};
use crate::{service, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/edge/config", get(config))
        .route("/v1/edge/changes", get(changes))
}

/// Longest long-poll.
pub const MAX_WAIT_SECONDS: u64 = 60;

pub(crate) fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// Whether `If-None-Match` names `version` (strong or weak form, or `*`).
pub(crate) fn not_modified(headers: &HeaderMap, version: u64) -> bool {
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

/// The query's fields; a repeated field's last value counts.
fn query_fields(query: Option<&str>) -> Result<Vec<(String, String)>, Error> {
    serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|_| Error::bad("query", "must be URL-encoded"))
}

fn field<'q>(fields: &'q [(String, String)], name: &str) -> Option<&'q str> {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn wait_of(fields: &[(String, String)]) -> Result<u64, Error> {
    match field(fields, "wait") {
        None => Ok(0),
        Some(v) => v
            .parse::<u64>()
            .map(|w| w.min(MAX_WAIT_SECONDS))
            .map_err(|_| Error::bad("wait", "must be a whole number of seconds")),
    }
}

fn wait_param(query: Option<&str>) -> Result<u64, Error> {
    wait_of(&query_fields(query)?)
}

/// The parameters of `GET /v1/edge/changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChangesQuery {
    since: u64,
    after: String,
    limit: usize,
    known: Option<u64>,
    wait: u64,
    /// The edge's name and region, for the fleet view (see [`crate::fleet`]).
    edge: Option<(String, String)>,
}

/// Default page size of the change feed.
pub const DEFAULT_CHANGES_LIMIT: usize = 1000;

/// Whether `s` may be a change-feed cursor: a SID, 1 to 64 of `[A-Za-z0-9_-]`.
fn is_cursor(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ChangesQuery {
    fn parse(query: Option<&str>) -> Result<ChangesQuery, Error> {
        let fields = query_fields(query)?;
        let version = |name: &str| -> Result<Option<u64>, Error> {
            field(&fields, name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| Error::bad(name, "must be a whole number (a config version)"))
                })
                .transpose()
        };
        let since = version("since")?.unwrap_or(0);
        let known = version("known")?;
        let after = field(&fields, "after").unwrap_or("").to_owned();
        if !after.is_empty() && !is_cursor(&after) {
            return Err(Error::bad(
                "after",
                "must be a SID: 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
            ));
        }
        let limit = match field(&fields, "limit") {
            None => DEFAULT_CHANGES_LIMIT,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=service::MAX_CHANGES_LIMIT).contains(l))
                .ok_or_else(|| {
                    Error::bad(
                        "limit",
                        format!("must be between 1 and {}", service::MAX_CHANGES_LIMIT),
                    )
                })?,
        };
        let name = |param: &str| -> Result<Option<String>, Error> {
            match field(&fields, param) {
                None => Ok(None),
                Some(v) if crate::fleet::is_edge_name(v) => Ok(Some(v.to_owned())),
                Some(_) => Err(Error::bad(param, crate::fleet::EDGE_NAME_RULE)),
            }
        };
        let edge = match (name("edge")?, name("region")?) {
            (Some(id), region) => Some((id, region.unwrap_or_default())),
            (None, Some(_)) => return Err(Error::bad("region", "needs edge")),
            (None, None) => None,
        };
        Ok(ChangesQuery {
            since,
            after,
            limit,
            known,
            wait: wait_of(&fields)?,
            edge,
        })
    }
}

pub(crate) fn not_modified_response(version: u64) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(&etag(version)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

async fn config(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    caller.may_read_feed()?;
    let wait = wait_param(query.as_deref())?;
    let mut versions = state.subscribe();
    let current = state.db().read(|c| c.version()).await?;
    state.published(current);
    if not_modified(&headers, current) {
        if wait == 0 {
            return Ok(not_modified_response(current));
        }
        let mut closing = state.closing();
        let _open = crate::ops::LongPoll::open(state.metrics());
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
    Ok(json_response(body, version))
}

/// A JSON answer of the feed at `version` (`ETag`, never cached without revalidation).
fn json_response(body: axum::body::Bytes, version: u64) -> Response {
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
    resp
}

async fn changes(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    caller.may_read_feed()?;
    let q = ChangesQuery::parse(query.as_deref())?;
    if let Some((id, region)) = &q.edge {
        // The version in force if the request says (`known`); a first page from 0 without it:
        // nothing in force yet; any other page: not said.
        let held = q
            .known
            .or((q.since == 0 && q.after.is_empty()).then_some(0));
        state.fleet().saw(id, region, held);
    }
    if let Some(known) = q.known {
        let mut versions = state.subscribe();
        let mut current = state.db().read(|c| c.version()).await?;
        state.published(current);
        if current <= known && q.wait > 0 {
            let mut closing = state.closing();
            let _open = crate::ops::LongPoll::open(state.metrics());
            tokio::select! {
                _ = versions.wait_for(|v| *v > known) => {}
                () = tokio::time::sleep(Duration::from_secs(q.wait)) => {}
                _ = closing.wait_for(|c| *c) => {}
            }
            current = state.db().read(|c| c.version()).await?;
        }
        if current <= known {
            return Ok(not_modified_response(current));
        }
    }
    let cat = state.catalog().clone();
    let ChangesQuery {
        since,
        after,
        limit,
        ..
    } = q;
    let page = state
        .db()
        .read(move |c| service::read_changes(c, &cat, since, &after, limit))
        .await?;
    state.published(page.version);
    // Checking and serializing a page of up to 10 000 records is CPU work: off the runtime, and
    // without holding the connection.
    let (version, body) = tokio::task::spawn_blocking(move || {
        service::check_page(&page)?;
        let json =
            serde_json::to_vec(&page).map_err(|e| internal("serialize change feed page", e))?;
        Ok::<_, Error>((page.version, json))
    })
    .await
    .map_err(|e| internal("change feed task failed", e))??;
    Ok(json_response(axum::body::Bytes::from(body), version))
}

impl AppState {
    /// The serialized edge config at the current version (built once per version).
    pub async fn feed(&self) -> Result<(u64, axum::body::Bytes), Error> {
        let mut cache = self.inner.feed.lock().await;
        let cached = cache.as_ref().map(|(v, _)| *v);
        let cat = self.catalog().clone();
        let fresh = self
            .db()
            .read(move |c| {
                if Some(c.version()?) == cached {
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
        cache.clone().ok_or(Error::Internal)
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<ChangesQuery, String> {
        ChangesQuery::parse(Some(q)).map_err(|e| e.message())
    }

    #[test]
    fn change_feed_parameters() {
        assert_eq!(
            parse(""),
            Ok(ChangesQuery {
                since: 0,
                after: String::new(),
                limit: DEFAULT_CHANGES_LIMIT,
                known: None,
                wait: 0,
                edge: None,
            })
        );
        let q = parse("since=7&after=SK0a_-Z&limit=10000&known=9&wait=600&other=1").unwrap();
        assert_eq!(
            (q.since, q.after.as_str(), q.limit, q.known, q.wait),
            (7, "SK0a_-Z", 10_000, Some(9), MAX_WAIT_SECONDS)
        );
        assert_eq!(
            parse("limit=1&limit=2").unwrap().limit,
            2,
            "the last one counts"
        );
        assert!(parse(&format!("after={}", "a".repeat(64))).is_ok());
        assert!(parse("after=").is_ok());
        for (q, msg) in [
            ("limit=0", "limit: must be between 1 and 10000"),
            ("limit=10001", "limit: must be between 1 and 10000"),
            ("limit=-1", "limit: must be between 1 and 10000"),
            ("limit=ten", "limit: must be between 1 and 10000"),
            (
                "since=-1",
                "since: must be a whole number (a config version)",
            ),
            (
                "since=1.5",
                "since: must be a whole number (a config version)",
            ),
            (
                "known=x",
                "known: must be a whole number (a config version)",
            ),
            ("wait=soon", "wait: must be a whole number of seconds"),
        ] {
            assert_eq!(parse(q).unwrap_err(), msg, "{q}");
        }
        let after = "after: must be a SID: 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'";
        for bad in ["SK%20x", "a.b", "%C3%A9", "SK%27--"] {
            assert_eq!(parse(&format!("after={bad}")).unwrap_err(), after, "{bad}");
        }
        assert_eq!(
            parse(&format!("after={}", "a".repeat(65))).unwrap_err(),
            after
        );
    }
}
