//! Leased fleet limits: a VM reserves hits ahead from the rate-limit service (one
//! `ShouldRateLimit` with `hits_addend = B`) and spends them locally, so most requests make no
//! remote call.
//!
//! **Exact as an upper bound.** The service grants a lease only if all of its `B` hits fit in
//! the subject's window (all or nothing, counted in Redis), and a VM spends only hits it was
//! granted, only inside the window they were granted in (a lease ends at the send time of its
//! request plus the `duration_until_reset` the service answered, which is never later than the
//! window's real end). So the fleet never admits more than the limit in a window.
//!
//! **The loss, bounded.** Hits leased and not spent before the window ends are lost for that
//! window. A lease is sized from the last `limit_remaining` this VM heard for the subject in
//! the window (the whole limit when it has heard nothing): `B = clamp(remaining / divisor, 1,
//! max_lease)`, at most `Bcap = min(max_lease, max(1, limit / divisor))`. A VM asks for the next
//! lease ahead, while it still holds some, once it is below half of a lease of at least
//! [`ASK_AHEAD_FROM`] hits. So each VM holds at most `Bcap` unspent hits of a subject when
//! `Bcap < 4`, and at most `Bcap + ⌈Bcap/2⌉ − 1` otherwise; a window admits at least
//! `limit − V × that` when demand lasts to its end (`V` the number of VMs, workers × edges, that
//! hold a lease of it). With the defaults (`max_lease` 100, `divisor` 16), a limit of 60 a
//! minute on 2 edges of 4 workers loses at most 8 × 3 = 24; a hot key limited to 100,000 a
//! minute takes 100 hits per call.
//!
//! A service answer of OVER_LIMIT with some hits left (`B` did not fit) asks again at once for
//! what is left; with none left, the subject is refused on this VM until the window's end
//! without asking again. A subject the service has no limit for is leased like any other (its
//! lease ends after the rate's period).
//!
//! The VM's requests wait (bounded by `timeout`) while a lease they need and do not have is
//! being asked for; at most one ask per subject per VM is in flight at a time. A lease of at
//! least [`ASK_AHEAD_FROM`] hits that runs below half is asked for ahead, by the root on its
//! next tick ([`Leases::due`]), while the requests spend the rest: when a tick plus a round trip
//! is shorter than half a lease's worth of traffic, no request waits for a lease.

use std::collections::HashMap;

use super::{rls, Subject};
use crate::compile::{ConfigError, LimitRate};
use crate::ratelimit::LimitKind;

/// The `fleet_limits` section of the plugin configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLimits {
    pub mode: FleetMode,
    /// Envoy cluster of the rate-limit service (lease mode).
    pub cluster: String,
    /// Rate-limit domain (default `keygate`).
    pub domain: String,
    /// How long a request waits for a lease before the failure mode applies (default 200 ms).
    pub timeout_ms: u64,
    /// Largest lease (default 100).
    pub max_lease: u32,
    /// A lease is the remaining hits over this (default 16).
    pub lease_divisor: u32,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetLimitsDoc {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_lease: Option<u32>,
    #[serde(default)]
    lease_divisor: Option<u32>,
}

/// The plugin configuration's `fleet_limits` section (beside a static document's fields or
/// beside `control_plane`), if any: `{"cluster": "ratelimit"}` at least in lease mode (the
/// default), or `{"mode": "envoy"}` when Envoy's ratelimit filter after keygate enforces them.
pub fn parse_fleet_limits(json: &[u8]) -> Result<Option<FleetLimits>, ConfigError> {
    let e = |path: &str, message: &str| ConfigError {
        path: format!("fleet_limits{path}"),
        message: message.to_owned(),
    };
    // A blank or malformed configuration is the plugin configuration's to judge and report
    // (`plugin::parse_plugin_config`); there is no section in it.
    let Ok(probe) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Ok(None);
    };
    let Some(section) = probe.get("fleet_limits") else {
        return Ok(None);
    };
    let d: FleetLimitsDoc = serde_path_to_error::deserialize(section).map_err(|x| {
        let inner = x.path().to_string();
        ConfigError {
            path: match inner.as_str() {
                "." => "fleet_limits".to_owned(),
                p => format!("fleet_limits.{p}"),
            },
            message: x.inner().to_string(),
        }
    })?;
    let mode = match d.mode.as_deref() {
        None | Some("lease") => FleetMode::Lease,
        Some("envoy") => FleetMode::Envoy,
        Some(_) => return Err(e(".mode", "must be \"lease\" or \"envoy\"")),
    };
    let cluster = d.cluster.unwrap_or_default();
    if mode == FleetMode::Lease && cluster.is_empty() {
        return Err(e(
            ".cluster",
            "must name the Envoy cluster of the rate-limit service",
        ));
    }
    let domain = d.domain.unwrap_or_else(|| super::DEFAULT_DOMAIN.to_owned());
    if domain.is_empty() || domain.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(e(".domain", "must be a non-empty printable name"));
    }
    let timeout_ms = d.timeout_ms.unwrap_or(200);
    if !(10..=5_000).contains(&timeout_ms) {
        return Err(e(".timeout_ms", "must be between 10 and 5000"));
    }
    let max_lease = d.max_lease.unwrap_or(100);
    if !(1..=10_000).contains(&max_lease) {
        return Err(e(".max_lease", "must be between 1 and 10000"));
    }
    let lease_divisor = d.lease_divisor.unwrap_or(16);
    if !(1..=1_000).contains(&lease_divisor) {
        return Err(e(".lease_divisor", "must be between 1 and 1000"));
    }
    Ok(Some(FleetLimits {
        mode,
        cluster,
        domain,
        timeout_ms,
        max_lease,
        lease_divisor,
    }))
}

/// Who enforces fleet-scope limits at this edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetMode {
    /// keygate, by leases from the rate-limit service.
    Lease,
    /// Envoy's `envoy.filters.http.ratelimit` after keygate (one call per request): keygate
    /// does not count them.
    Envoy,
}

/// Leases smaller than this are never asked for ahead (near the limit, or small limits: the
/// loss bound stays one lease per VM).
pub const ASK_AHEAD_FROM: u32 = 4;

/// Hard cap on the subjects a VM keeps leases of; past it, the pools whose window has ended
/// are dropped first.
pub const MAX_POOLS: usize = 65_536;

/// A fleet limit a request must take one hit from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub subject: Subject,
    pub limit: LimitRate,
}

/// What a VM holds of one subject.
#[derive(Debug, Default, Clone)]
struct Pool {
    tokens: u32,
    /// The leased hits may be spent while `now < valid_until_us`.
    valid_until_us: u64,
    /// The last `limit_remaining` heard in the current window.
    remaining: Option<u32>,
    /// The service said none are left: refuse until then.
    exhausted_until_us: u64,
    /// The one request in flight for this subject: (hits asked, sent at, owner).
    in_flight: Option<(u32, u64, u32)>,
    /// Hits of the last lease granted (asking ahead starts below half of it).
    last_lease: u32,
    /// The limit it was last claimed under (to size a lease asked for ahead).
    limit: Option<LimitRate>,
    /// In [`Leases::due`]: below half of its last lease, to be asked for ahead.
    due: bool,
}

/// Ask the service for `hits` of `subject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub subject: Subject,
    pub hits: u32,
}

/// Whether a request may go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// One hit of every need was taken from this VM's leases.
    Admitted,
    /// A need is over its limit for the rest of its window.
    Refused {
        kind: LimitKind,
        limit: LimitRate,
        retry_after_s: u64,
    },
    /// Wait for leases; send these asks (the needs without one in flight).
    Wait(Vec<Ask>),
}

/// The service's answer to one ask, as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The hits were granted. `remaining`/`reset_us` are absent when the service has no limit
    /// for the subject.
    Granted {
        remaining: Option<u32>,
        reset_us: Option<u64>,
    },
    /// The hits did not fit; `remaining` are left in the window.
    OverLimit {
        remaining: u32,
        reset_us: Option<u64>,
    },
    /// No usable answer (gRPC error, timeout, a reply that does not decode).
    Failed,
}

/// What to do after an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Leases changed: let the waiting requests claim again.
    Claim,
    /// Ask again at once for fewer hits (what is left).
    AskAgain(Ask),
    /// The service failed: the waiting requests of this subject get the failure mode.
    Failed,
}

/// This VM's leases.
#[derive(Debug)]
pub struct Leases {
    pools: HashMap<Subject, Pool>,
    /// Subjects whose lease ran below half: asked for ahead on the next tick ([`Leases::due`]).
    due: Vec<Subject>,
    pub max_lease: u32,
    pub divisor: u32,
    pub timeout_us: u64,
}

impl Leases {
    pub fn new(cfg: &FleetLimits) -> Leases {
        Leases {
            pools: HashMap::new(),
            due: Vec::new(),
            max_lease: cfg.max_lease.max(1),
            divisor: cfg.lease_divisor.max(1),
            timeout_us: cfg.timeout_ms.saturating_mul(1000),
        }
    }

    /// How many hits to ask for, knowing `known` are left in the window.
    fn lease_size(&self, known: u32) -> u32 {
        lease_size(known, self.divisor, self.max_lease)
    }

    /// Takes one hit of every need, or says why not. All or nothing: nothing is taken unless
    /// every need has a hit.
    pub fn claim(&mut self, needs: &[Need], now_us: u64) -> Claim {
        if self.pools.len() + needs.len() > MAX_POOLS {
            self.pools
                .retain(|_, p| p.valid_until_us > now_us || p.in_flight.is_some());
        }
        for need in needs {
            let pool = self.pools.entry(need.subject.clone()).or_default();
            if now_us >= pool.valid_until_us {
                // A new window: the old lease is worthless, and what was left is unknown.
                pool.tokens = 0;
                pool.remaining = None;
            }
            if now_us < pool.exhausted_until_us {
                return Claim::Refused {
                    kind: need.subject.limit_kind(),
                    limit: need.limit,
                    retry_after_s: (pool.exhausted_until_us - now_us)
                        .div_ceil(1_000_000)
                        .max(1),
                };
            }
        }
        let ready = needs
            .iter()
            .all(|n| self.pools.get(&n.subject).is_some_and(|p| p.tokens > 0));
        let timeout_us = self.timeout_us;
        if ready {
            for n in needs {
                let Some(p) = self.pools.get_mut(&n.subject) else {
                    continue;
                };
                p.tokens -= 1;
                p.limit = Some(n.limit);
                if !p.due && p.last_lease >= ASK_AHEAD_FROM && p.tokens < p.last_lease.div_ceil(2) {
                    p.due = true;
                    self.due.push(n.subject.clone());
                }
            }
            return Claim::Admitted;
        }
        let mut asks = Vec::new();
        for n in needs {
            let Some(pool) = self.pools.get(&n.subject) else {
                continue;
            };
            let waiting_on_one = pool
                .in_flight
                .is_some_and(|(_, sent, _)| now_us.saturating_sub(sent) <= timeout_us);
            if pool.tokens == 0 && !waiting_on_one {
                asks.push(Ask {
                    subject: n.subject.clone(),
                    hits: self.lease_size(pool.remaining.unwrap_or(n.limit.rate.requests)),
                });
            }
        }
        Claim::Wait(asks)
    }

    /// Records that `ask` was sent at `now_us` by context `owner`.
    pub fn sent(&mut self, ask: &Ask, now_us: u64, owner: u32) {
        let pool = self.pools.entry(ask.subject.clone()).or_default();
        pool.in_flight = Some((ask.hits, now_us, owner));
    }

    /// The ask for `subject` could not be sent, or its sender is gone (its answer will never
    /// come): a later claim asks again.
    pub fn forget(&mut self, subject: &Subject) {
        if let Some(p) = self.pools.get_mut(subject) {
            p.in_flight = None;
        }
    }

    /// Context `owner` ended: the asks it sent will not be answered to it.
    pub fn orphan(&mut self, owner: u32) {
        for p in self.pools.values_mut() {
            if p.in_flight.is_some_and(|(_, _, o)| o == owner) {
                p.in_flight = None;
            }
        }
    }

    /// The service's answer to an ask of `hits` for `subject`, sent at `sent_us` under a limit
    /// whose period is `period_us`.
    pub fn answered(
        &mut self,
        subject: &Subject,
        hits: u32,
        sent_us: u64,
        period_us: u64,
        answer: Answer,
        now_us: u64,
    ) -> After {
        let (max_lease, divisor) = (self.max_lease, self.divisor);
        let pool = self.pools.entry(subject.clone()).or_default();
        if pool.in_flight.is_some_and(|(_, sent, _)| sent == sent_us) {
            pool.in_flight = None;
        }
        match answer {
            Answer::Granted {
                remaining,
                reset_us,
            } => {
                // The window ends no later than this (the service measured from after we sent).
                let ends = sent_us.saturating_add(reset_us.unwrap_or(period_us));
                let same_window = now_us < pool.valid_until_us
                    && ends.abs_diff(pool.valid_until_us) < period_us / 2;
                if same_window {
                    pool.valid_until_us = pool.valid_until_us.min(ends);
                    pool.tokens = pool.tokens.saturating_add(hits);
                } else {
                    pool.valid_until_us = ends;
                    pool.tokens = hits;
                }
                pool.last_lease = hits;
                pool.remaining = remaining.or(pool.remaining);
                After::Claim
            }
            Answer::OverLimit {
                remaining,
                reset_us,
            } => {
                let ends = sent_us.saturating_add(reset_us.unwrap_or(period_us));
                pool.remaining = Some(remaining);
                if remaining == 0 {
                    pool.exhausted_until_us = ends;
                    return After::Claim;
                }
                let hits = lease_size(remaining, divisor, max_lease).min(remaining);
                After::AskAgain(Ask {
                    subject: subject.clone(),
                    hits,
                })
            }
            Answer::Failed => After::Failed,
        }
    }

    /// The asks for leases running below half (each with its limit's period), to be sent now
    /// by a context that outlives them (the root, on its tick): the requests go on spending
    /// what is left meanwhile, and none waits for the next lease. Empties the list.
    pub fn due(&mut self, now_us: u64) -> Vec<(Ask, u64)> {
        let mut asks = Vec::new();
        for subject in std::mem::take(&mut self.due) {
            let asking = self.asking(&subject, now_us);
            let Some(p) = self.pools.get_mut(&subject) else {
                continue;
            };
            p.due = false;
            let Some(limit) = p.limit else {
                continue;
            };
            let live = now_us < p.valid_until_us && now_us >= p.exhausted_until_us;
            if live && !asking && p.tokens < p.last_lease.div_ceil(2) {
                let known = p.remaining.unwrap_or(limit.rate.requests);
                asks.push((
                    Ask {
                        subject,
                        hits: self.lease_size(known),
                    },
                    limit.rate.period_us,
                ));
            }
        }
        asks
    }

    /// Whether an ask for `subject` is on its way (and not yet past the timeout).
    pub fn asking(&self, subject: &Subject, now_us: u64) -> bool {
        self.pools.get(subject).is_some_and(|p| {
            p.in_flight
                .is_some_and(|(_, sent, _)| now_us.saturating_sub(sent) <= self.timeout_us)
        })
    }

    /// Subjects this VM holds something of (for tests and stats).
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

/// A lease's hits when `known` are left in the window (the whole limit when nothing was heard):
/// `clamp(known / divisor, 1, max_lease)`.
fn lease_size(known: u32, divisor: u32, max_lease: u32) -> u32 {
    (known / divisor).clamp(1, max_lease)
}

/// The request for an ask: one descriptor, `hits_addend` hits.
pub fn request(domain: &str, ask: &Ask) -> rls::RateLimitRequest {
    let entries = ask.subject.entries().into_iter();
    rls::RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: vec![rls::RateLimitDescriptor {
            entries: entries
                .map(|(key, value)| rls::Entry {
                    key: key.to_owned(),
                    value: value.to_owned(),
                })
                .collect(),
        }],
        hits_addend: ask.hits,
    }
}

/// Reads the service's reply to a one-descriptor request.
pub fn read_answer(reply: &rls::RateLimitResponse) -> Answer {
    let status = reply.statuses.first();
    let reset_us = status
        .and_then(|s| s.duration_until_reset.as_ref())
        .and_then(|d| {
            let s = u64::try_from(d.seconds).ok()?;
            let n = u64::try_from(d.nanos).ok()?;
            Some(s.saturating_mul(1_000_000).saturating_add(n / 1000))
        });
    let limited = status.and_then(|s| s.current_limit.as_ref()).is_some();
    let remaining = status.map_or(0, |s| s.limit_remaining);
    match rls::Code::try_from(reply.overall_code) {
        Ok(rls::Code::Ok) => Answer::Granted {
            remaining: limited.then_some(remaining),
            reset_us: if limited { reset_us } else { None },
        },
        Ok(rls::Code::OverLimit) => Answer::OverLimit {
            remaining,
            reset_us,
        },
        _ => Answer::Failed,
    }
}

#[cfg(test)]
mod tests;
