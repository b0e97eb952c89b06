//! The filter's Envoy stats (`wasmcustom.keygate.*`, named and counted by
//! [`keygate_core::stats`]): metric ids, defined once per VM, and the host calls that record.
//! Counters are counted in the VM's memory and added to Envoy's on the root's tick
//! ([`Metrics::flush`], every 250 ms), so a request makes no host call for its stats; gauges
//! are set at once.

use std::cell::RefCell;

use keygate_core::stats::{Kind, Stat};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Metric ids by [`Stat::index`]. A failed definition leaves the id `None` (stat missing, not a
/// crash).
pub struct Metrics {
    ids: Vec<Option<u32>>,
    /// Counts not yet added to Envoy's counters, by [`Stat::index`].
    pending: RefCell<Vec<u64>>,
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
        let ids: Vec<Option<u32>> = Stat::all().map(define).collect();
        Metrics {
            pending: RefCell::new(vec![0; ids.len()]),
            ids,
        }
    }

    /// Adds each value to its counter (counted here until the next [`Metrics::flush`]) or sets
    /// its gauge to it.
    pub fn record(&self, stats: impl IntoIterator<Item = (Stat, u64)>) {
        for (stat, value) in stats {
            match stat.kind() {
                Kind::Counter if value == 0 => {}
                Kind::Counter => {
                    if let Some(n) = self.pending.borrow_mut().get_mut(stat.index()) {
                        *n = n.saturating_add(value);
                    }
                }
                Kind::Gauge => {
                    if let Some(&Some(id)) = self.ids.get(stat.index()) {
                        let _ = hostcalls::record_metric(id, value);
                    }
                }
            }
        }
    }

    /// Adds what was counted since the last flush to Envoy's counters (one host call per counter
    /// that moved).
    pub fn flush(&self) {
        let mut pending = self.pending.borrow_mut();
        for (n, id) in pending.iter_mut().zip(&self.ids) {
            if *n == 0 {
                continue;
            }
            if let Some(id) = id {
                let _ = hostcalls::increment_metric(*id, i64::try_from(*n).unwrap_or(i64::MAX));
            }
            *n = 0;
        }
    }

    /// Adds 1 to `stat`.
    pub fn bump(&self, stat: Stat) {
        self.record([(stat, 1)]);
    }
}
