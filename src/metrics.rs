//! The filter's Envoy stats (`wasmcustom.keygate.*`, named and counted by
//! [`keygate_core::stats`]): metric ids, defined once per VM, and the host calls that record.

use keygate_core::stats::{Kind, Stat};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Metric ids by [`Stat::index`]. A failed definition leaves the id `None` (stat missing, not a
/// crash).
pub struct Metrics {
    ids: Vec<Option<u32>>,
}

impl Metrics {
    pub fn define() -> Metrics {
        let define = |stat: Stat| {
            let kind = match stat.kind() {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            hostcalls::define_metric(kind, &stat.name()).ok()
        };
        Metrics {
            ids: Stat::all().map(define).collect(),
        }
    }

    /// Adds each value to its counter (nothing for 0) or sets its gauge to it.
    pub fn record(&self, stats: impl IntoIterator<Item = (Stat, u64)>) {
        for (stat, value) in stats {
            let Some(&Some(id)) = self.ids.get(stat.index()) else {
                continue;
            };
            let _ = match stat.kind() {
                Kind::Counter if value == 0 => Ok(()),
                Kind::Counter => {
                    hostcalls::increment_metric(id, value.try_into().unwrap_or(i64::MAX))
                }
                Kind::Gauge => hostcalls::record_metric(id, value),
            };
        }
    }

    /// Adds 1 to `stat`.
    pub fn bump(&self, stat: Stat) {
        self.record([(stat, 1)]);
    }
}
