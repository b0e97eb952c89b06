//! The view of the fleet: which edges poll the change feed, the config version each holds, and
//! how far behind it is.
//!
//! An edge names itself on its feed requests (`GET /v1/edge/changes?...&edge=<id>&region=<r>`,
//! from the `edge_id` and `region` of its plugin configuration). The version it holds is the
//! request's `known` (the version in force, sent on the first request of every update); a
//! first page with `since=0` and no `known` says it holds nothing yet (0); any other page says
//! nothing about it. Sightings are ordered by their time in milliseconds, so a replica that
//! writes an older sighting after another replica wrote a newer one changes nothing. Each
//! replica keeps the sightings in memory and writes them to the database once a second in one
//! transaction (`edges` table; no config version is bumped), so every replica answers for the
//! whole fleet and a poll costs no write of its own. Edges not seen for `edge_ttl` (default 10
//! minutes) age out of the view and the table.
//!
//! `GET /v1/edge/fleet` (admin token) answers
//! `{"version": <current>, "edges": [{"id", "region", "version", "last_seen", "lag_s"}]}`;
//! `lag_s` is 0 for an edge at the current version, else the seconds since the first version
//! newer than the one it holds was published (as this replica saw it: each replica remembers
//! when it learned of the last 4096 versions; older than that, since the oldest it remembers).
//! `GET /v1/edge/fleet?version=V` answers `{"version": V, "edges": n, "at_or_above": k}`: a
//! change committed at V is in force at k of the n edges.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;

use crate::auth::Caller;
use crate::error::Error;
use crate::model::{now, rfc3339};

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
use crate::store::EdgeSeen;
use crate::AppState;

/// Default time after which an edge that stopped polling leaves the view.
pub const DEFAULT_EDGE_TTL: Duration = Duration::from_secs(600);

/// How many versions' publication times a replica remembers (for `lag_s`).
const REMEMBERED_VERSIONS: usize = 4096;

/// Whether `s` may name an edge or a region: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn is_edge_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// The message of a refused `edge` or `region` parameter.
pub const EDGE_NAME_RULE: &str = "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' and '.'";

/// One replica's part of the fleet view.
#[derive(Debug)]
pub struct Fleet {
    ttl: Duration,
    /// Sightings not yet written, by edge id (the newest wins).
    pending: Mutex<HashMap<String, EdgeSeen>>,
    /// When this replica learned of each recent version (unix seconds).
    published_at: Mutex<BTreeMap<u64, i64>>,
}

impl Fleet {
    pub fn new(ttl: Duration, version: u64) -> Fleet {
        Fleet {
            ttl,
            pending: Mutex::new(HashMap::new()),
            published_at: Mutex::new(BTreeMap::from([(version, now())])),
        }
    }

    /// Notes that an edge asked for the feed, holding `version` if the request says.
    pub fn saw(&self, id: &str, region: &str, version: Option<u64>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let held = pending.get(id).and_then(|e| e.version);
        let seen = EdgeSeen {
            id: id.to_owned(),
            region: region.to_owned(),
            version: version.or(held),
            last_seen_ms: now_ms(),
        };
        pending.insert(seen.id.clone(), seen);
    }

    /// Notes when this replica learned of `version`.
    pub fn published(&self, version: u64) {
        let mut at = self.published_at.lock().unwrap_or_else(|p| p.into_inner());
        at.entry(version).or_insert_with(now);
        while at.len() > REMEMBERED_VERSIONS {
            at.pop_first();
        }
    }

    /// The oldest sighting still in the view, in unix milliseconds.
    pub(crate) fn oldest_kept_ms(&self) -> i64 {
        now_ms().saturating_sub(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX))
    }

    /// Seconds an edge holding `version` has been behind `current`, at `now`.
    pub(crate) fn lag_s(&self, version: u64, current: u64, now: i64) -> i64 {
        if version >= current {
            return 0;
        }
        let at = self.published_at.lock().unwrap_or_else(|p| p.into_inner());
        let since = at
            .range(version.saturating_add(1)..)
            .next()
            .or_else(|| at.iter().next())
            .map_or(now, |(_, t)| *t);
        (now - since).max(0)
    }
}

impl AppState {
    /// Writes the sightings noted since the last flush (and forgets edges older than the TTL).
    pub async fn flush_fleet(&self) -> Result<(), Error> {
        let fleet = self.fleet();
        let batch: Vec<EdgeSeen> = {
            let mut pending = fleet.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().map(|(_, v)| v).collect()
        };
        let forget_before_ms = fleet.oldest_kept_ms();
        self.db()
            .write(move |tx| tx.note_edges(&batch, forget_before_ms))
            .await
    }
}

impl AppState {
    /// The current version and the edges in the view, this replica's own sightings included
    /// (written first).
    pub async fn edges_now(&self) -> Result<(u64, Vec<EdgeSeen>), Error> {
        self.flush_fleet().await?;
        let since = self.fleet().oldest_kept_ms();
        let (current, edges) = self
            .db()
            .read(move |tx| Ok((tx.version()?, tx.edges(since)?)))
            .await?;
        self.published(current);
        Ok((current, edges))
    }
}

/// Writes sightings once a second, forever.
pub async fn flush_every_second(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Err(e) = state.flush_fleet().await {
            tracing::warn!(error = ?e, "fleet view not written");
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/edge/fleet", get(fleet))
}

async fn fleet(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    caller.require_admin()?;
    let fields: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|_| Error::bad("query", "must be URL-encoded"))?;
    let asked = fields
        .iter()
        .rev()
        .find(|(k, _)| k == "version")
        .map(|(_, v)| {
            v.parse::<u64>()
                .map_err(|_| Error::bad("version", "must be a whole number (a config version)"))
        })
        .transpose()?;
    let (current, edges) = state.edges_now().await?;
    if let Some(v) = asked {
        let at_or_above = edges.iter().filter(|e| e.version.unwrap_or(0) >= v).count();
        return Ok(Json(json!({
            "version": v,
            "edges": edges.len(),
            "at_or_above": at_or_above,
        }))
        .into_response());
    }
    let t = now();
    let edges: Vec<_> = edges
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "region": e.region,
                "version": e.version.unwrap_or(0),
                "last_seen": rfc3339(e.last_seen_ms / 1000),
                "lag_s": state.fleet().lag_s(e.version.unwrap_or(0), current, t),
            })
        })
        .collect();
    Ok(Json(json!({ "version": current, "edges": edges })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_names() {
        for ok in ["edge-a", "in1", "pop.fra-3", "E_1", &"a".repeat(64)] {
            assert!(is_edge_name(ok), "{ok}");
        }
        for bad in ["", "edge a", "édge", "a/b", "x%20", &"a".repeat(65)] {
            assert!(!is_edge_name(bad), "{bad}");
        }
    }

    #[test]
    fn lag_counts_from_the_first_newer_version() {
        let fleet = Fleet::new(DEFAULT_EDGE_TTL, 5);
        {
            let mut at = fleet.published_at.lock().unwrap();
            at.clear();
            at.extend([(5, 1000), (7, 1010), (9, 1030)]);
        }
        assert_eq!(fleet.lag_s(9, 9, 1100), 0);
        assert_eq!(fleet.lag_s(10, 9, 1100), 0);
        // Holding 7: behind since 9 was published.
        assert_eq!(fleet.lag_s(7, 9, 1100), 70);
        // Holding 6: behind since 7.
        assert_eq!(fleet.lag_s(6, 9, 1100), 90);
        // Holding 1: behind since 5, the oldest remembered.
        assert_eq!(fleet.lag_s(1, 9, 1100), 100);
    }
}
