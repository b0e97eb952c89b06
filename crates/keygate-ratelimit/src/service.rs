//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over limitador's Redis storage.
//!
//! One call is one reservation: the counters of every descriptor (see [`crate::limits`]) go to
//! limitador's `AsyncCounterStorage::reserve` together, which runs its `SCRIPT_RESERVE` — one
//! Lua script, so atomic in Redis — admitting `hits_addend` against every counter or against
//! none. An admitted call holds `hits_addend` on each counter for the rest of the counter's
//! window (the hold's lifetime is clamped to the window by the script); the hold is never
//! committed or released, so it is the count: every later call in the window sees it, and it
//! lapses exactly when the window does. No counting happens here: this module picks counters,
//! calls the script and reads what it answered.
//!
//! Why not `check_and_update`: limitador's Redis `check_and_update` reads, then increments, in
//! two round trips ("does not guarantee exact limits"), so concurrent calls can over-admit.
//! Why not `commit_reservation` after the reservation: a commit increments the counter before it
//! releases the hold, so for a moment the hits count twice and a concurrent call can be refused
//! with room left; holding for the whole window is exact both ways.
//!
//! The cost of holding: the script walks a counter's live holds on every call, one per admitted
//! call in the window (at most `max_value` of them, fewer with leases of many hits). Holds
//! expire by this process's clock (limitador computes them from `SystemTime::now()`), so
//! replicas of this service sharing one Redis need synchronised clocks: one whose clock runs
//! ahead by d lets holds lapse d early at the end of a window.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use limitador::counter::Counter;
use limitador::reservation::ReservationId;
use limitador::storage::redis::AsyncRedisStorage;
use limitador::storage::{AsyncCounterStorage, Authorization};
use tonic::Status;

use crate::limits::LimitSet;
use crate::metrics::{kind, Metrics};

/// How long one request waits for Redis before it is answered UNAVAILABLE.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The limits version in force: the set and the control plane's version of it (0 for a file).
#[derive(Debug)]
pub struct Loaded {
    pub limits: LimitSet,
    pub version: u64,
}

/// What every request and the HTTP side share.
pub struct Shared {
    limits: RwLock<Option<Arc<Loaded>>>,
    redis: RwLock<Option<Redis>>,
    pub metrics: Metrics,
}

/// The connection to Redis, once made: limitador's storage and the connection manager under it
/// (PING for `/readyz`). Both reconnect by themselves after an outage.
#[derive(Clone)]
pub struct Redis {
    pub storage: AsyncRedisStorage,
    pub connection: redis::aio::ConnectionManager,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            limits: RwLock::new(None),
            redis: RwLock::new(None),
            metrics: Metrics::default(),
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Puts a new set in force, whole: requests already running keep the set they started with.
    pub fn put_limits(&self, loaded: Loaded) {
        self.metrics.limits_loaded.set(loaded.limits.len() as i64);
        self.metrics.config_version.set(loaded.version);
        self.metrics.config_updates.inc();
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(loaded));
    }

    pub fn limits(&self) -> Option<Arc<Loaded>> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn put_redis(&self, redis: Redis) {
        *self.redis.write().unwrap_or_else(|e| e.into_inner()) = Some(redis);
    }

    pub fn redis(&self) -> Option<Redis> {
        self.redis.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Answers one `ShouldRateLimit`.
    pub async fn should_rate_limit(
        &self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, Status> {
        self.metrics.requests.inc();
        let result = self.decide(request).await;
        match &result {
            Ok(response) if response.overall_code == Code::OverLimit as i32 => {
                self.metrics.over_limit.inc();
            }
            Ok(_) => {}
            Err((kind, _)) => self.metrics.error(kind),
        }
        result.map_err(|(_, status)| status)
    }

    async fn decide(
        &self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, (&'static str, Status)> {
        check_request(&request)
            .map_err(|m| (kind::INVALID_REQUEST, Status::invalid_argument(m)))?;
        let Some(loaded) = self.limits() else {
            return Err((
                kind::NO_LIMITS,
                Status::unavailable("keygate-ratelimit: no limits loaded yet"),
            ));
        };
        let hits = u64::from(request.hits_addend.max(1));

        // Every descriptor's counters, in one list; `owner[i]` is counter i's descriptor.
        let mut counters: Vec<Counter> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (d, descriptor) in request.descriptors.iter().enumerate() {
            let entries = descriptor
                .entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()));
            let found = loaded
                .limits
                .counters(&request.domain, entries)
                .map_err(|e| {
                    tracing::error!(descriptor = d, error = %e, "a limit failed on a descriptor");
                    (
                        kind::LIMIT_EVALUATION,
                        Status::internal(format!("keygate-ratelimit: descriptors[{d}]: {e}")),
                    )
                })?;
            owner.extend(std::iter::repeat_n(d, found.len()));
            counters.extend(found);
        }

        let admitted = if counters.is_empty() {
            true
        } else {
            self.reserve(&mut counters, hits).await?
        };
        if admitted && !counters.is_empty() {
            self.metrics.hits_granted.inc_by(hits);
        }

        let mut by_descriptor: HashMap<usize, Vec<&Counter>> = HashMap::new();
        for (counter, d) in counters.iter().zip(&owner) {
            by_descriptor.entry(*d).or_default().push(counter);
        }
        let statuses = (0..request.descriptors.len())
            .map(|d| status_of(by_descriptor.get(&d).map(Vec::as_slice), admitted, hits))
            .collect();
        Ok(RateLimitResponse {
            overall_code: if admitted { Code::Ok } else { Code::OverLimit } as i32,
            statuses,
            ..RateLimitResponse::default()
        })
    }

    /// The reservation: true when `hits` were admitted on every counter (and are now held for
    /// the rest of each counter's window), false when none was counted.
    async fn reserve(
        &self,
        counters: &mut Vec<Counter>,
        hits: u64,
    ) -> Result<bool, (&'static str, Status)> {
        let unavailable = || {
            (
                kind::REDIS,
                Status::unavailable("keygate-ratelimit: Redis is unavailable"),
            )
        };
        let Some(redis) = self.redis() else {
            return Err(unavailable());
        };
        // The hold must outlive every counter's window; the script clamps it to each window's end.
        let hold_for = counters
            .iter()
            .map(Counter::window)
            .max()
            .unwrap_or_default();
        let started = Instant::now();
        let reserved = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis
                .storage
                .reserve(counters, &ReservationId::new(), hits, hits, hold_for),
        )
        .await;
        self.metrics
            .redis_seconds
            .observe(started.elapsed().as_secs_f64());
        match reserved {
            Ok(Ok(Authorization::Ok)) => Ok(true),
            Ok(Ok(Authorization::Limited(_))) => Ok(false),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Redis failed a reservation");
                Err(unavailable())
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = REDIS_TIMEOUT.as_millis() as u64,
                    "Redis did not answer a reservation in time"
                );
                Err(unavailable())
            }
        }
    }
}

/// What the protocol allows that this service does not do, refused rather than ignored.
fn check_request(request: &RateLimitRequest) -> Result<(), String> {
    if request.domain.is_empty() {
        return Err("keygate-ratelimit: the request's domain is empty".to_string());
    }
    if request.descriptors.is_empty() {
        return Err("keygate-ratelimit: the request has no descriptors".to_string());
    }
    for (d, descriptor) in request.descriptors.iter().enumerate() {
        if descriptor.hits_addend.is_some() || descriptor.is_negative_hits {
            return Err(format!(
                "keygate-ratelimit: descriptors[{d}]: a descriptor's own hits_addend is not \
                 supported: set the request's hits_addend"
            ));
        }
        if descriptor.limit.is_some() {
            return Err(format!(
                "keygate-ratelimit: descriptors[{d}]: a descriptor's limit override is not \
                 supported: limits come from the limits file"
            ));
        }
    }
    Ok(())
}

/// One descriptor's status: OK with no `current_limit` when no limit applies; otherwise the
/// most restrictive of its counters (the least left; when the call was refused, the least left
/// among those that refused it).
fn status_of(counters: Option<&[&Counter]>, admitted: bool, hits: u64) -> DescriptorStatus {
    let counters = counters.unwrap_or_default();
    let remaining = |c: &Counter| c.remaining().unwrap_or(c.max_value());
    // After a refusal a counter refused it when what it has left is less than the hits.
    let refusing = |c: &&&Counter| !admitted && remaining(c) < hits;
    let over = counters.iter().any(|c| refusing(&c));
    let shown = counters
        .iter()
        .filter(|c| !over || refusing(c))
        .min_by_key(|c| (remaining(c), c.expires_in().unwrap_or(c.window())));
    let Some(counter) = shown else {
        return DescriptorStatus {
            code: Code::Ok as i32,
            ..DescriptorStatus::default()
        };
    };
    let reset = counter.expires_in().unwrap_or(counter.window());
    DescriptorStatus {
        code: if over { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: Some(current_limit(counter.limit())),
        limit_remaining: u32::try_from(remaining(counter)).unwrap_or(u32::MAX),
        duration_until_reset: Some(PbDuration {
            seconds: i64::try_from(reset.as_secs()).unwrap_or(i64::MAX),
            nanos: reset.subsec_nanos() as i32,
        }),
        ..DescriptorStatus::default()
    }
}

/// `requests_per_unit` and `unit` when the window is exactly a second, minute, hour or day;
/// else unit UNKNOWN and the window in the name (`window 90s`, or `<name>, window 90s`).
fn current_limit(limit: &limitador::limit::Limit) -> RateLimit {
    let unit = match limit.seconds() {
        1 => Unit::Second,
        60 => Unit::Minute,
        3_600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Unknown,
    };
    let name = match (limit.name(), unit) {
        (name, Unit::Unknown) => match name {
            Some(name) => format!("{name}, window {}s", limit.seconds()),
            None => format!("window {}s", limit.seconds()),
        },
        (name, _) => name.unwrap_or_default().to_string(),
    };
    RateLimit {
        name,
        requests_per_unit: u32::try_from(limit.max_value()).unwrap_or(u32::MAX),
        unit: unit as i32,
    }
}
