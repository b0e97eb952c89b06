//! The store's own measurements, process-wide: every transaction's latency by kind (read,
//! write; waiting for a connection included) and write outcomes. The store records them;
//! [`crate::ops`] reports them in `/metrics`.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 us .. ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
}

/// The database's own measurements, process-wide (the store records them; every registry
/// reports them).
#[derive(Debug)]
pub struct DbMetrics {
    pub seconds: Histograms<KindLabels>,
    pub writes: Family<OutcomeLabels, Counter>,
}

pub static DB: LazyLock<DbMetrics> = LazyLock::new(|| DbMetrics {
    seconds: Family::new_with_constructor(latency_histogram),
    writes: Family::default(),
});

impl DbMetrics {
    /// Records one transaction of `kind` that started at `started` and ended with `ok`.
    pub fn observe(&self, kind: &'static str, started: Instant, ok: bool) {
        self.seconds
            .get_or_create(&KindLabels { kind })
            .observe(started.elapsed().as_secs_f64());
        if kind == "write" {
            let outcome = if ok { "commit" } else { "rollback" };
            self.writes.get_or_create(&OutcomeLabels { outcome }).inc();
        }
    }
}
