//! Usage from the edges: `POST /v1/edge/usage` takes an edge's batch (keygate-core's
//! [`UsageBatch`], checked with [`check_batch`]) and applies it once whatever how often it is
//! sent; `GET /v1/accounts/{sid}/usage` answers counts per minute or per hour; key responses
//! show when each key and secret was last used ([`last_used_json`]).
//!
//! Storage (both backends, [`crate::store::Tx`]): each entry adds to a minute row and to its
//! hour's row (`usage_counts`, width 60 and 3600) per outcome (`allowed` or a reason code), so
//! the hourly roll-up is always there; minute rows are kept for `--usage-retention-days`
//! (default 7), hour rows for `--usage-hourly-retention-days` (default 400), both pruned by
//! [`prune_every_minute`]. A batch's id is recorded in the same transaction as its counts
//! (`usage_batches`), and a batch whose id is there is acknowledged without applying it again;
//! ids are remembered for [`BATCH_MEMORY_S`] (an edge retries a batch for seconds to minutes,
//! never a day). A secret is found by its owner (key, or account for its own credentials) and
//! the first 16 hex digits of its digest; the use of a secret deleted meanwhile is dropped, the
//! key's last use is kept.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use keygate_core::usage::{check_batch, UsageBatch};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::Error;
use crate::model::{parse_rfc3339, rfc3339, StoredSecret};
use crate::store::{LastUsed, Tx, UsagePrune, UsageRow};
use crate::{parse_json, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/edge/usage", post(receive))
        .route("/v1/accounts/{sid}/usage", get(query))
}

/// How long applied batch ids are remembered.
pub const BATCH_MEMORY_S: i64 = 86_400;
/// Default retention of minute counts, in days.
pub const DEFAULT_RETENTION_DAYS: u64 = 7;
/// Default retention of hour counts, in days.
pub const DEFAULT_HOURLY_RETENTION_DAYS: u64 = 400;
/// Most buckets one query answers.
pub const MAX_BUCKETS: i64 = 1440;

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Applies `batch` once: false (and nothing written) if its id was applied before.
pub fn apply(tx: &mut dyn Tx, batch: &UsageBatch, now: i64) -> Result<bool, Error> {
    if !tx.claim_usage_batch(&batch.batch, now)? {
        return Ok(false);
    }
    let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    for e in &batch.entries {
        let minute = big(e.minute);
        let key_sid = e.key_sid.clone().unwrap_or_default();
        let outcomes = (e.allowed > 0)
            .then_some(("allowed", e.allowed))
            .into_iter()
            .chain(e.denied.iter().map(|(r, n)| (r.as_str(), *n)))
            .filter(|(_, n)| *n > 0);
        for (outcome, n) in outcomes {
            for width in [60, 3600] {
                tx.add_usage(&UsageRow {
                    account_sid: e.account_sid.clone(),
                    key_sid: key_sid.clone(),
                    width,
                    start: minute - minute % width,
                    outcome: outcome.to_owned(),
                    n: big(n),
                })?;
            }
        }
        let owner = e.key_sid.as_deref().unwrap_or(&e.account_sid);
        let mut last = None;
        for s in &e.secrets {
            let at = big(s.last_used_s);
            tx.note_secret_used(owner, &s.id, at)?;
            last = last.max(Some(at));
        }
        if let (Some(key), Some(at)) = (&e.key_sid, last) {
            tx.note_key_used(key, at)?;
        }
    }
    Ok(true)
}

/// `POST /v1/edge/usage` (edge or admin token): `{"applied": true}` the first time a batch id
/// is seen, `{"applied": false}` after (both 200: the edge stops sending it either way).
async fn receive(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, Error> {
    if !matches!(caller, Caller::Edge | Caller::Admin) {
        return Err(Error::Forbidden(
            "only edge tokens (or the admin token) may send usage",
        ));
    }
    let batch: UsageBatch = parse_json(&body)?;
    check_batch(&batch).map_err(Error::BadRequest)?;
    let dropped = batch.dropped;
    let (id, entries) = (batch.batch.clone(), batch.entries.len());
    let applied = state
        .db()
        .write(move |tx| apply(tx, &batch, now_s()))
        .await?;
    if dropped > 0 && applied {
        tracing::warn!(batch = %id, dropped, "an edge dropped usage counts (its record was full)");
    }
    tracing::debug!(batch = %id, entries, applied, "usage batch");
    Ok(Json(json!({ "applied": applied })))
}

/// The parameters of `GET /v1/accounts/{sid}/usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub key_sid: Option<String>,
    pub from: i64,
    pub to: i64,
    /// 60 or 3600.
    pub width: i64,
}

fn is_sid(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl UsageQuery {
    /// Parses `key_sid=&from=&to=&bucket=1m|1h` at `now`: `to` defaults to the end of the
    /// current bucket, `from` to an hour before `to` (`1m`: 60 buckets) or a day (`1h`: 24);
    /// `from` is rounded down to its bucket; at most [`MAX_BUCKETS`] buckets.
    pub fn parse(query: Option<&str>, now: i64) -> Result<UsageQuery, Error> {
        let fields: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|_| Error::bad("query", "must be URL-encoded"))?;
        let field = |name: &str| {
            fields
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let width = match field("bucket") {
            None | Some("1m") => 60,
            Some("1h") => 3600,
            Some(_) => return Err(Error::bad("bucket", "must be 1m or 1h")),
        };
        let key_sid = match field("key_sid") {
            None | Some("") => None,
            Some(k) if is_sid(k) => Some(k.to_owned()),
            Some(_) => {
                return Err(Error::bad(
                    "key_sid",
                    "must be a SID: 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
                ))
            }
        };
        // By default up to the end of the current bucket.
        let to = field("to")
            .map(|t| parse_rfc3339("to", t))
            .transpose()?
            .unwrap_or(now - now % width + width);
        let span = if width == 60 { 3600 } else { 86_400 };
        let from = field("from")
            .map(|t| parse_rfc3339("from", t))
            .transpose()?
            .unwrap_or(to - span);
        if from >= to {
            return Err(Error::bad("from", "must be before to"));
        }
        let from = from - from % width;
        if (to - from + width - 1) / width > MAX_BUCKETS {
            return Err(Error::bad(
                "to",
                format!("at most {MAX_BUCKETS} buckets after from (a day of 1m, 60 days of 1h)"),
            ));
        }
        Ok(UsageQuery {
            key_sid,
            from,
            to,
            width,
        })
    }
}

/// Every bucket of the query, oldest first, zeros included.
pub fn buckets(tx: &mut dyn Tx, account_sid: &str, q: &UsageQuery) -> Result<Value, Error> {
    let rows = tx.usage_counts(account_sid, q.key_sid.as_deref(), q.width, q.from, q.to)?;
    let mut by_start: BTreeMap<i64, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    let mut start = q.from;
    while start < q.to {
        by_start.insert(start, (0, BTreeMap::new()));
        start += q.width;
    }
    for (start, outcome, n) in rows {
        let b = by_start.entry(start).or_default();
        if outcome == "allowed" {
            b.0 += n;
        } else {
            *b.1.entry(outcome).or_default() += n;
        }
    }
    let buckets: Vec<Value> = by_start
        .into_iter()
        .map(|(start, (allowed, denied))| {
            json!({ "start": rfc3339(start), "allowed": allowed, "denied": denied })
        })
        .collect();
    Ok(json!({ "buckets": buckets }))
}

async fn query(
    State(state): State<AppState>,
    Path(sid): Path<String>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, Error> {
    caller.managing(&sid)?;
    let q = UsageQuery::parse(raw.as_deref(), now_s())?;
    let body = state
        .db()
        .read(move |tx| {
            if tx.get_account(&sid)?.is_none() {
                return Err(Error::NotFound);
            }
            buckets(tx, &sid, &q)
        })
        .await?;
    Ok(Json(body))
}

/// Adds `last_used_at` (RFC 3339 or `null`) to a key's JSON and to each of its `secrets[]`
/// (in `secrets`' order, the order the key's JSON lists them).
pub fn last_used_json(body: &mut Value, secrets: &[StoredSecret], last: &LastUsed) {
    body["last_used_at"] = json!(last.key.map(rfc3339));
    if let Some(list) = body["secrets"].as_array_mut() {
        for (item, s) in list.iter_mut().zip(secrets) {
            let at = (last.secrets.iter())
                .find(|(d, _)| *d == s.digest)
                .map(|(_, at)| rfc3339(*at));
            item["last_used_at"] = json!(at);
        }
    }
}

/// Forgets, every minute, minute counts older than `minutes_s`, hour counts older than
/// `hours_s`, batch ids older than [`BATCH_MEMORY_S`], and last uses of deleted secrets and keys.
pub async fn prune_every_minute(state: AppState, minutes_s: i64, hours_s: i64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        let now = now_s();
        let before = UsagePrune {
            minutes: now - minutes_s,
            hours: now - hours_s,
            batches: now - BATCH_MEMORY_S,
        };
        if let Err(e) = state.db().write(move |tx| tx.prune_usage(&before)).await {
            tracing::warn!(error = %e.message(), "usage pruning failed");
        }
    }
}

#[cfg(test)]
mod tests;
