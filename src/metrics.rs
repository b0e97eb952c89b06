//! The filter's Envoy stats (`wasmcustom.keygate.*`): counter ids, defined once per VM.

use keygate_core::gate::GateStats;
use keygate_core::ratelimit::{Counters, LimitKind};
use keygate_core::Reason;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Counter ids, defined once per VM. A failed definition leaves the id `None` (stat missing, not
/// a crash).
#[derive(Default)]
pub struct Metrics {
    pub allowed: Option<u32>,
    denied: [Option<u32>; Reason::ALL.len()],
    pub config_loaded: Option<u32>,
    pub config_rejected: Option<u32>,
    pub config_version: Option<u32>,
    pub config_fetches: Option<u32>,
    pub config_fetch_errors: Option<u32>,
    pub config_not_modified: Option<u32>,
    pub config_published: Option<u32>,
    pub config_stale_served: Option<u32>,
    pub config_age: Option<u32>,
    cas_retries: Option<u32>,
    retries_exhausted: Option<u32>,
    garbage_values: Option<u32>,
    store_errors: Option<u32>,
    store_failures_allowed: Option<u32>,
    shadow_limited: [Option<u32>; LimitKind::ALL.len()],
}

impl Metrics {
    pub fn define() -> Metrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let mut m = Metrics {
            allowed: counter("keygate.allowed"),
            config_loaded: counter("keygate.config.loaded"),
            config_rejected: counter("keygate.config.rejected"),
            config_version: hostcalls::define_metric(MetricType::Gauge, "keygate.config.version")
                .ok(),
            config_fetches: counter("keygate.config.fetches"),
            config_fetch_errors: counter("keygate.config.fetch_errors"),
            config_not_modified: counter("keygate.config.not_modified"),
            config_published: counter("keygate.config.published"),
            config_stale_served: counter("keygate.config.stale_served"),
            config_age: hostcalls::define_metric(MetricType::Gauge, "keygate.config.age_seconds")
                .ok(),
            cas_retries: counter("keygate.ratelimit.cas_retries"),
            retries_exhausted: counter("keygate.ratelimit.retries_exhausted"),
            garbage_values: counter("keygate.ratelimit.garbage_values"),
            store_errors: counter("keygate.ratelimit.store_errors"),
            store_failures_allowed: counter("keygate.ratelimit.store_failures_allowed"),
            ..Metrics::default()
        };
        for (slot, reason) in m.denied.iter_mut().zip(Reason::ALL) {
            *slot = counter(&format!("keygate.denied.{}", reason.code()));
        }
        for (slot, kind) in m.shadow_limited.iter_mut().zip(LimitKind::ALL) {
            *slot = counter(&format!("keygate.ratelimit.shadow_limited.{}", kind.name()));
        }
        m
    }

    pub fn set(id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    fn add(id: Option<u32>, n: u32) {
        if let (Some(id), true) = (id, n > 0) {
            let _ = hostcalls::increment_metric(id, i64::from(n));
        }
    }

    pub fn counters(&self, c: &Counters) {
        Metrics::add(self.cas_retries, c.cas_retries);
        Metrics::add(self.retries_exhausted, c.retries_exhausted);
        Metrics::add(self.garbage_values, c.garbage_values);
        Metrics::add(self.store_errors, c.store_errors);
    }

    pub fn gate(&self, stats: &GateStats) {
        self.counters(&stats.counters);
        Metrics::add(self.store_failures_allowed, stats.store_failures_allowed);
        for kind in &stats.shadow_limited {
            let i = LimitKind::ALL.iter().position(|k| k == kind).unwrap_or(0);
            Metrics::bump(self.shadow_limited.get(i).copied().flatten());
        }
    }

    pub fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn denied(&self, reason: Reason) {
        Metrics::bump(self.denied.get(reason as usize).copied().flatten());
    }
}
