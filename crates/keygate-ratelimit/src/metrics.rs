//! What `/metrics` reports, in Prometheus' text format (names prefixed `keygate_ratelimit_`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The kinds of `errors_total`.
pub mod kind {
    /// A request's Redis call failed or timed out (answered UNAVAILABLE).
    pub const REDIS: &str = "redis";
    /// A request came before any limits were loaded (answered UNAVAILABLE).
    pub const NO_LIMITS: &str = "no_limits";
    /// A request the protocol refuses (answered INVALID_ARGUMENT).
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// A limit's condition or variable failed on a descriptor (answered INTERNAL).
    pub const LIMIT_EVALUATION: &str = "limit_evaluation";
    /// The control plane could not be reached or answered an error status (last set kept).
    pub const CONTROL_PLANE: &str = "control_plane";
    /// A limits document was refused (last set kept).
    pub const BAD_LIMITS: &str = "bad_limits";
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Counter,
    pub hits_granted: Counter,
    pub over_limit: Counter,
    pub errors: Family<KindLabels, Counter>,
    pub limits_loaded: Gauge,
    pub config_version: Gauge<u64, AtomicU64>,
    pub config_updates: Counter,
    pub redis_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keygate_ratelimit");
        let requests = Counter::default();
        let hits_granted = Counter::default();
        let over_limit = Counter::default();
        let errors = Family::<KindLabels, Counter>::default();
        let limits_loaded = Gauge::default();
        let config_version = Gauge::<u64, AtomicU64>::default();
        let config_updates = Counter::default();
        // 50 us .. ~3.3 s.
        let redis_seconds = Histogram::new(exponential_buckets(0.000_05, 3.0, 11));
        registry.register(
            "requests",
            "ShouldRateLimit calls answered, whatever the answer",
            requests.clone(),
        );
        registry.register(
            "hits_granted",
            "hits granted (the sum of hits_addend of OK answers that counted a limit)",
            hits_granted.clone(),
        );
        registry.register(
            "over_limit",
            "ShouldRateLimit calls answered OVER_LIMIT",
            over_limit.clone(),
        );
        registry.register(
            "errors",
            "errors by kind: redis, no_limits, invalid_request, limit_evaluation, control_plane, bad_limits",
            errors.clone(),
        );
        registry.register(
            "limits_loaded",
            "limits in force (0 until a set is loaded)",
            limits_loaded.clone(),
        );
        registry.register(
            "config_version",
            "the control plane's config version of the limits in force (its ETag; 0 for a file)",
            config_version.clone(),
        );
        registry.register(
            "config_updates",
            "limit sets put in force",
            config_updates.clone(),
        );
        registry.register(
            "redis_seconds",
            "the reservation script's round trip to Redis, errors included",
            redis_seconds.clone(),
        );
        Metrics {
            registry,
            requests,
            hits_granted,
            over_limit,
            errors,
            limits_loaded,
            config_version,
            config_updates,
            redis_seconds,
        }
    }
}

impl Metrics {
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// The registry in Prometheus' text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }
}
