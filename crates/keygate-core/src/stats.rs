//! The filter's stats as data: every stat's name and kind ([`Stat`]), and what each thing the
//! core reports (the gate's [`GateStats`], the limiter's [`Counters`], the poller's [`Event`]s, a
//! new plugin configuration, the view in force) adds to them. The filter defines one Envoy metric
//! per [`Stat::all`] (Envoy prefixes `wasmcustom.`) and records the `(stat, value)` pairs these
//! functions return: a counter grows by `value`, a gauge is set to it.

use crate::gate::GateStats;
use crate::poller::Event;
use crate::published::Rejection;
use crate::ratelimit::{Counters, LimitKind};
use crate::view::{Configured, View};
use crate::Reason;

/// Whether a stat counts or holds a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One stat of the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// Requests forwarded.
    Allowed,
    /// Requests refused, per reason code.
    Denied(Reason),
    ConfigLoaded,
    ConfigRejected,
    /// The config version in force (gauge).
    ConfigVersion,
    ConfigFetches,
    ConfigFetchErrors,
    ConfigNotModified,
    ConfigPublished,
    ConfigStaleServed,
    /// Seconds since the control plane was last heard from (gauge).
    ConfigAge,
    CasRetries,
    RetriesExhausted,
    GarbageValues,
    StoreErrors,
    StoreFailuresAllowed,
    /// Requests over a limit in shadow mode (let through), per limit kind.
    ShadowLimited(LimitKind),
    /// Fleet limits: calls to the rate-limit service (leases asked for).
    FleetCalls,
    /// Fleet limits: hits the service granted as leases.
    FleetHitsLeased,
    /// Fleet limits: requests that waited for a lease.
    FleetWaits,
    /// Fleet limits: answers that failed (service or Redis down, timeout, bad reply).
    FleetErrors,
    /// Local limits: leases a VM took (a batch of a subject's requests it then spends without a
    /// shared-data call).
    Leases,
}

/// The stats that are neither per reason nor per limit kind, in [`Stat::index`] order.
const FIXED: [Stat; 20] = [
    Stat::Allowed,
    Stat::ConfigLoaded,
    Stat::ConfigRejected,
    Stat::ConfigVersion,
    Stat::ConfigFetches,
    Stat::ConfigFetchErrors,
    Stat::ConfigNotModified,
    Stat::ConfigPublished,
    Stat::ConfigStaleServed,
    Stat::ConfigAge,
    Stat::CasRetries,
    Stat::RetriesExhausted,
    Stat::GarbageValues,
    Stat::StoreErrors,
    Stat::StoreFailuresAllowed,
    Stat::FleetCalls,
    Stat::FleetHitsLeased,
    Stat::FleetWaits,
    Stat::FleetErrors,
    Stat::Leases,
];

impl Stat {
    /// Every stat, in [`Stat::index`] order.
    pub fn all() -> impl Iterator<Item = Stat> {
        let denied = Reason::ALL.into_iter().map(Stat::Denied);
        let shadow = LimitKind::ALL.into_iter().map(Stat::ShadowLimited);
        FIXED.into_iter().chain(denied).chain(shadow)
    }

    /// The stat's position in [`Stat::all`] (for a table of metric ids).
    pub fn index(self) -> usize {
        let position = |all: &[Stat]| all.iter().position(|s| *s == self).unwrap_or(0);
        match self {
            Stat::Denied(reason) => FIXED.len() + reason as usize,
            Stat::ShadowLimited(kind) => {
                let i = LimitKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
                FIXED.len() + Reason::ALL.len() + i
            }
            _ => position(&FIXED),
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Stat::ConfigVersion | Stat::ConfigAge => Kind::Gauge,
            _ => Kind::Counter,
        }
    }

    /// The stat's name as the filter defines it.
    pub fn name(self) -> String {
        let name = match self {
            Stat::Allowed => "allowed",
            Stat::Denied(reason) => return format!("keygate.denied.{}", reason.code()),
            Stat::ConfigLoaded => "config.loaded",
            Stat::ConfigRejected => "config.rejected",
            Stat::ConfigVersion => "config.version",
            Stat::ConfigFetches => "config.fetches",
            Stat::ConfigFetchErrors => "config.fetch_errors",
            Stat::ConfigNotModified => "config.not_modified",
            Stat::ConfigPublished => "config.published",
            Stat::ConfigStaleServed => "config.stale_served",
            Stat::ConfigAge => "config.age_seconds",
            Stat::CasRetries => "ratelimit.cas_retries",
            Stat::Leases => "ratelimit.leases",
            Stat::RetriesExhausted => "ratelimit.retries_exhausted",
            Stat::GarbageValues => "ratelimit.garbage_values",
            Stat::StoreErrors => "ratelimit.store_errors",
            Stat::StoreFailuresAllowed => "ratelimit.store_failures_allowed",
            Stat::FleetCalls => "fleet.calls",
            Stat::FleetHitsLeased => "fleet.hits_leased",
            Stat::FleetWaits => "fleet.waits",
            Stat::FleetErrors => "fleet.errors",
            Stat::ShadowLimited(kind) => {
                return format!("keygate.ratelimit.shadow_limited.{}", kind.name())
            }
        };
        format!("keygate.{name}")
    }
}

impl Counters {
    /// The limiter's counters as stat increments.
    pub fn stats(&self) -> [(Stat, u64); 5] {
        [
            (Stat::CasRetries, self.cas_retries.into()),
            (Stat::Leases, self.leases.into()),
            (Stat::RetriesExhausted, self.retries_exhausted.into()),
            (Stat::GarbageValues, self.garbage_values.into()),
            (Stat::StoreErrors, self.store_errors.into()),
        ]
    }
}

impl GateStats {
    /// What one request through the gate adds to the stats.
    pub fn stats(&self) -> impl Iterator<Item = (Stat, u64)> + '_ {
        let allowed = (
            Stat::StoreFailuresAllowed,
            self.store_failures_allowed.into(),
        );
        let shadow = (self.shadow_limited.iter()).map(|kind| (Stat::ShadowLimited(*kind), 1));
        self.counters
            .stats()
            .into_iter()
            .chain([allowed])
            .chain(shadow)
    }
}

impl Event {
    /// What a poller event adds to the stats (the age and version gauges are set).
    pub fn stats(&self) -> Vec<(Stat, u64)> {
        match self {
            Event::Age(s) => vec![(Stat::ConfigAge, *s)],
            Event::Fetch => vec![(Stat::ConfigFetches, 1)],
            Event::Failed => vec![(Stat::ConfigFetchErrors, 1)],
            Event::NotModified => vec![(Stat::ConfigNotModified, 1)],
            Event::Published(f) => {
                vec![(Stat::ConfigPublished, 1), (Stat::ConfigVersion, f.version)]
            }
            Event::Rejected(Rejection::NotNewer { .. } | Rejection::Invalid(_)) => {
                vec![(Stat::ConfigRejected, 1)]
            }
            _ => Vec::new(),
        }
    }
}

impl Configured {
    /// A new plugin configuration: rejected, or loaded (a blank one is neither), and the static
    /// version gauge.
    pub fn stats(&self) -> Vec<(Stat, u64)> {
        let mut out = Vec::new();
        if !self.accepted {
            out.push((Stat::ConfigRejected, 1));
        } else if self.source.is_some() {
            out.push((Stat::ConfigLoaded, 1));
        }
        out.extend(self.version.map(|v| (Stat::ConfigVersion, v)));
        out
    }
}

impl View<'_> {
    /// A stale config served, and the version gauge when this request compiled a new version.
    pub fn stats(&self) -> impl Iterator<Item = (Stat, u64)> {
        let stale = self.stale_served.then_some((Stat::ConfigStaleServed, 1));
        stale
            .into_iter()
            .chain(self.compiled.map(|v| (Stat::ConfigVersion, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poller::Finished;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn names_kinds_and_indexes() {
        let names: Vec<String> = Stat::all().map(Stat::name).collect();
        let fixed = [
            "keygate.allowed",
            "keygate.config.loaded",
            "keygate.config.rejected",
            "keygate.config.version",
            "keygate.config.fetches",
            "keygate.config.fetch_errors",
            "keygate.config.not_modified",
            "keygate.config.published",
            "keygate.config.stale_served",
            "keygate.config.age_seconds",
            "keygate.ratelimit.cas_retries",
            "keygate.ratelimit.retries_exhausted",
            "keygate.ratelimit.garbage_values",
            "keygate.ratelimit.store_errors",
            "keygate.ratelimit.store_failures_allowed",
            "keygate.fleet.calls",
            "keygate.fleet.hits_leased",
            "keygate.fleet.waits",
            "keygate.fleet.errors",
            "keygate.ratelimit.leases",
        ];
        assert_eq!(names[..20], fixed);
        assert_eq!(names[20], "keygate.denied.no_config");
        assert_eq!(names[38], "keygate.denied.config_stale");
        assert_eq!(names[39], "keygate.denied.wrong_region");
        assert_eq!(names[40], "keygate.ratelimit.shadow_limited.key");
        assert_eq!(names[43], "keygate.ratelimit.shadow_limited.failed_auth");
        assert_eq!(names.len(), 44);
        for (i, stat) in Stat::all().enumerate() {
            assert_eq!(stat.index(), i, "{stat:?}");
            let gauge = matches!(stat, Stat::ConfigVersion | Stat::ConfigAge);
            assert_eq!(stat.kind() == Kind::Gauge, gauge, "{stat:?}");
        }
    }

    #[test]
    fn gate_stats_add_counters_store_failures_and_shadow_kinds() {
        let stats = GateStats {
            counters: Counters {
                cas_retries: 3,
                leases: 0,
                retries_exhausted: 0,
                garbage_values: 1,
                store_errors: 2,
            },
            shadow_limited: vec![LimitKind::Account, LimitKind::KeyApi],
            store_failures_allowed: 1,
        };
        let got: Vec<_> = stats.stats().collect();
        assert_eq!(
            got,
            [
                (Stat::CasRetries, 3),
                (Stat::Leases, 0),
                (Stat::RetriesExhausted, 0),
                (Stat::GarbageValues, 1),
                (Stat::StoreErrors, 2),
                (Stat::StoreFailuresAllowed, 1),
                (Stat::ShadowLimited(LimitKind::Account), 1),
                (Stat::ShadowLimited(LimitKind::KeyApi), 1),
            ]
        );
    }

    #[test]
    fn poller_events_count_and_set_gauges() {
        let finished = Finished {
            version: 7,
            pages: 1,
            records: 2,
            emptied: 0,
            ms: 3,
            both_slots: false,
        };
        let not_newer = Rejection::NotNewer {
            offered: 6,
            in_force: 7,
        };
        let cases = [
            (Event::Age(12), vec![(Stat::ConfigAge, 12)]),
            (Event::Fetch, vec![(Stat::ConfigFetches, 1)]),
            (Event::Failed, vec![(Stat::ConfigFetchErrors, 1)]),
            (Event::NotModified, vec![(Stat::ConfigNotModified, 1)]),
            (
                Event::Published(finished.clone()),
                vec![(Stat::ConfigPublished, 1), (Stat::ConfigVersion, 7)],
            ),
            (Event::Rejected(not_newer), vec![(Stat::ConfigRejected, 1)]),
            (Event::Rejected(Rejection::Store), vec![]),
            (Event::Rejected(Rejection::Superseded), vec![]),
            (Event::WarmedUp(finished), vec![]),
            (Event::Gone, vec![]),
            (Event::FetchFailed(b"503".to_vec()), vec![]),
            (Event::StateRefused, vec![]),
        ];
        for (event, want) in cases {
            assert_eq!(event.stats(), want, "{event:?}");
        }
    }

    #[test]
    fn configurations_count_as_loaded_rejected_or_neither() {
        let source = crate::view::Source::None;
        let doc = br#"{"schema": "keygate.config/v1", "version": 4}"#;
        let loaded = source.configure(doc);
        assert!(loaded.accepted, "{:?}", loaded.log);
        let want = [(Stat::ConfigLoaded, 1), (Stat::ConfigVersion, 4)];
        assert_eq!(loaded.stats(), want);
        assert_eq!(source.configure(b"{").stats(), [(Stat::ConfigRejected, 1)]);
        assert_eq!(source.configure(b" \n").stats(), []);
    }
}
