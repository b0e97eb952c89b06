//! The whole per-request gate: failed-authentication limiter, [`crate::decide`], then rate and
//! concurrency limits. The host is reached through the narrow [`Host`] trait, so this runs the
//! same against Envoy (the filter's implementation) and against the fakes in tests.
//!
//! Order:
//! 1. if a failed-auth limit is configured and the request carries credentials, refuse with 429
//!    when the client address's bucket is exhausted, before any secret is compared (so a guesser
//!    learns nothing more once limited);
//! 2. [`crate::decide`]; an `invalid_credentials` denial takes one from the client's bucket;
//! 3. for an authenticated request, take from key × API, key and account rates, all or nothing;
//! 4. then a concurrency slot for the account; if refused, the rates taken in 3 are given back.
//!
//! A request that fails authentication therefore consumes nothing from any key or account
//! quota, and a request refused by one limit consumes nothing from the others.

use std::net::IpAddr;

use crate::compile::{Catalog, CompiledConfig, Directory, LimitRate};
use crate::concurrency::{Acquire, Inflight};
use crate::decision::{decide_in, Allow, Decision};
use crate::headers::{AuthorizationHeader, RequestHead};
use crate::ratelimit::{
    Admission, Check, Counters, LimitKind, Limiter, OnStoreError, Quota, SharedStore,
};
use crate::reason::Reason;

/// Seconds after which a VM's in-flight lease stops counting unless refreshed.
pub const INFLIGHT_LEASE_S: u64 = 10;
/// How often a VM with requests in flight should call [`heartbeat`].
pub const INFLIGHT_HEARTBEAT_S: u64 = 2;

/// What the gate needs from the host.
pub trait Host {
    /// Wall-clock time in microseconds since the Unix epoch.
    fn now_us(&self) -> u64;
    /// The client address Envoy computed; may be called more than once (cache it).
    fn client_ip(&self) -> Option<IpAddr>;
    fn store(&self) -> &dyn SharedStore;
    /// This VM's identity for concurrency leases.
    fn vm_id(&self) -> u64;
}

/// A slot held for the request's lifetime; give it back with [`release`] when the stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightTicket {
    pub store_key: String,
}

/// A denial with what the reply needs beyond the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    pub retry_after_s: Option<u64>,
    /// The limit that refused, for `RateLimit-Policy` / `RateLimit`.
    pub quota: Option<Quota>,
}

impl Denial {
    fn plain(reason: Reason) -> Denial {
        Denial {
            reason,
            retry_after_s: None,
            quota: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow {
        /// Who was admitted (`allow.identity()`); `None` inside for a CORS preflight.
        allow: Allow,
        /// The tightest enforced limit after this request, when quota headers are on.
        quota: Option<Quota>,
        inflight: Option<InflightTicket>,
    },
    Deny(Denial),
}

/// What happened, for stats.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GateStats {
    pub counters: Counters,
    pub shadow_limited: Vec<LimitKind>,
    /// The store failed but the configured outcome let the request through.
    pub store_failures_allowed: u32,
}

fn reason_for(kind: LimitKind) -> Reason {
    match kind {
        LimitKind::Key => Reason::RateLimitedKey,
        LimitKind::Account => Reason::RateLimitedAccount,
        LimitKind::KeyApi => Reason::RateLimitedApi,
        LimitKind::FailedAuth => Reason::TooManyFailedAuth,
    }
}

/// 64-bit FNV-1a, to spread client addresses over the failed-auth buckets.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The slot of an API's rate in a key's record: a hash of the API's name (stable across config
/// versions, unlike its index), never 0 (the key's own rate).
pub fn api_slot(name: &str) -> u32 {
    let h = fnv1a(name.as_bytes());
    (h ^ (h >> 32)) as u32 | 1
}

fn failed_auth_check(cat: &Catalog, ip: IpAddr) -> Option<Check> {
    let fa = cat.limits.failed_auth?;
    let h = match ip.to_canonical() {
        IpAddr::V4(v4) => fnv1a(&v4.octets()),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let prefix = u32::from(fa.ipv6_prefix.min(128));
            let masked = if prefix == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - prefix))
            };
            fnv1a(&masked.to_be_bytes())
        }
    };
    let bucket = h % u64::from(fa.buckets.max(1));
    Some(Check {
        store_key: format!("kg:fa:2:{bucket}"),
        slot: 0,
        rate: fa.limit.rate,
        kind: LimitKind::FailedAuth,
        shadow: fa.limit.shadow,
    })
}

fn check(store_key: String, slot: u32, limit: LimitRate, kind: LimitKind) -> Check {
    Check {
        store_key,
        slot,
        rate: limit.rate,
        kind,
        shadow: limit.shadow,
    }
}

/// Runs the whole gate for one request against a static config.
pub fn evaluate(
    cfg: &CompiledConfig,
    head: &RequestHead<'_>,
    host: &dyn Host,
    stats: &mut GateStats,
) -> Verdict {
    evaluate_in(&cfg.catalog, &cfg.directory, head, host, stats)
}

/// Runs the whole gate for one request, looking principals up in `dir`.
pub fn evaluate_in(
    cat: &Catalog,
    dir: &dyn Directory,
    head: &RequestHead<'_>,
    host: &dyn Host,
    stats: &mut GateStats,
) -> Verdict {
    let now_us = host.now_us();
    let limiter = Limiter {
        store: host.store(),
        max_retries: cat.limits.max_cas_retries,
        on_store_error: cat.limits.on_store_error,
    };

    // 1. Failed-auth gate, only for requests that present credentials.
    let fa_check = match (cat.limits.failed_auth, head.authorization) {
        (Some(_), AuthorizationHeader::One(_) | AuthorizationHeader::Many) => {
            host.client_ip().and_then(|ip| failed_auth_check(cat, ip))
        }
        _ => None,
    };
    if let Some(c) = &fa_check {
        if let Some(retry_after_s) = limiter.would_refuse(c, now_us, &mut stats.counters) {
            if c.shadow {
                stats.shadow_limited.push(LimitKind::FailedAuth);
            } else {
                return Verdict::Deny(Denial {
                    reason: Reason::TooManyFailedAuth,
                    retry_after_s: Some(retry_after_s),
                    quota: Some(Quota {
                        kind: LimitKind::FailedAuth,
                        rate: c.rate,
                        remaining: 0,
                        reset_s: retry_after_s,
                    }),
                });
            }
        }
    }

    // 2. Authentication and authorization.
    let decision = decide_in(cat, dir, head, now_us / 1_000_000, &mut || host.client_ip());
    let allow = match decision {
        Decision::Deny(reason) => {
            if reason == Reason::InvalidCredentials {
                if let Some(c) = &fa_check {
                    let _ = limiter.admit(std::slice::from_ref(c), now_us, &mut stats.counters);
                }
            }
            return Verdict::Deny(Denial::plain(reason));
        }
        Decision::Allow(a) => a,
    };
    let Some(admitted) = &allow.admitted else {
        return Verdict::Allow {
            allow,
            quota: None,
            inflight: None,
        };
    };

    // 3. Rates: key × API, key, account. A key's own rate and its per-API rates live in one
    // record (slot 0 and a slot per API), taken with one read and one compare-and-swap.
    let account = &admitted.account;
    let key = admitted.key.as_deref();
    let mut checks = Vec::with_capacity(3);
    if let (Some(key), Some((api_idx, _))) = (key, &admitted.api) {
        let api_idx = *api_idx;
        let own = key
            .api_rates
            .iter()
            .find(|(i, _)| *i == api_idx)
            .map(|(_, r)| *r);
        let api = &cat.apis[api_idx as usize];
        if let Some(limit) = own.or(api.limit) {
            checks.push(check(
                format!("kg:rl:2:k:{}", key.sid),
                api_slot(&api.name),
                limit,
                LimitKind::KeyApi,
            ));
        }
    }
    if let Some(limit) = key.and_then(|k| k.rate) {
        checks.push(check(
            format!("kg:rl:2:k:{}", key.map_or("", |k| &*k.sid)),
            0,
            limit,
            LimitKind::Key,
        ));
    }
    if let Some(limit) = account.rate {
        checks.push(check(
            format!("kg:rl:2:a:{}", account.sid),
            0,
            limit,
            LimitKind::Account,
        ));
    }
    let (quota, taken) = if checks.is_empty() {
        (None, Vec::new())
    } else {
        match limiter.admit(&checks, now_us, &mut stats.counters) {
            Admission::Admitted {
                tightest,
                shadow_limited,
                taken,
            } => {
                stats.shadow_limited.extend(shadow_limited);
                (tightest, taken)
            }
            Admission::Limited {
                quota,
                retry_after_s,
            } => {
                return Verdict::Deny(Denial {
                    reason: reason_for(quota.kind),
                    retry_after_s: Some(retry_after_s),
                    quota: Some(quota),
                });
            }
            Admission::StoreFailure => {
                return Verdict::Deny(Denial {
                    reason: Reason::LimiterUnavailable,
                    retry_after_s: Some(1),
                    quota: None,
                });
            }
        }
    };
    if cat.limits.on_store_error == OnStoreError::Allow
        && stats.counters.retries_exhausted
            + stats.counters.garbage_values
            + stats.counters.store_errors
            > 0
    {
        stats.store_failures_allowed += 1;
    }

    // 4. Concurrency.
    let mut inflight = None;
    if let Some(limit) = account.concurrency {
        let store_key = format!("kg:cc:1:a:{}", account.sid);
        let slots = Inflight {
            store: host.store(),
            max_retries: cat.limits.max_cas_retries,
            lease_s: INFLIGHT_LEASE_S,
            vm_id: host.vm_id(),
        };
        match slots.acquire(&store_key, limit, now_us / 1_000_000, &mut stats.counters) {
            Acquire::Acquired => inflight = Some(InflightTicket { store_key }),
            Acquire::Refused => {
                limiter.give_back(&checks, &taken, now_us, &mut stats.counters);
                return Verdict::Deny(Denial {
                    reason: Reason::ConcurrencyLimited,
                    retry_after_s: Some(1),
                    quota: None,
                });
            }
            Acquire::Failed if cat.limits.on_store_error == OnStoreError::Deny => {
                limiter.give_back(&checks, &taken, now_us, &mut stats.counters);
                return Verdict::Deny(Denial {
                    reason: Reason::LimiterUnavailable,
                    retry_after_s: Some(1),
                    quota: None,
                });
            }
            Acquire::Failed => stats.store_failures_allowed += 1,
        }
    }

    Verdict::Allow {
        allow,
        quota: quota.filter(|_| cat.limits.quota_headers),
        inflight,
    }
}

/// Gives back a concurrency slot when the request's stream ends, however it ends.
pub fn release(
    cfg_max_retries: u32,
    ticket: &InflightTicket,
    host: &dyn Host,
    counters: &mut Counters,
) {
    let slots = Inflight {
        store: host.store(),
        max_retries: cfg_max_retries,
        lease_s: INFLIGHT_LEASE_S,
        vm_id: host.vm_id(),
    };
    slots.release(&ticket.store_key, host.now_us() / 1_000_000, counters);
}

/// Refreshes this VM's lease on an account's slots (call every [`INFLIGHT_HEARTBEAT_S`] while
/// the VM has requests of that account in flight).
pub fn heartbeat(cfg_max_retries: u32, store_key: &str, host: &dyn Host, counters: &mut Counters) {
    let slots = Inflight {
        store: host.store(),
        max_retries: cfg_max_retries,
        lease_s: INFLIGHT_LEASE_S,
        vm_id: host.vm_id(),
    };
    slots.heartbeat(store_key, host.now_us() / 1_000_000, counters);
}

/// `RateLimit-Policy` and `RateLimit` header values (IETF draft-ietf-httpapi-ratelimit-headers).
pub fn ratelimit_headers(q: &Quota) -> (String, String) {
    let name = q.kind.name();
    let window_s = q.rate.period_us.div_ceil(1_000_000).max(1);
    (
        format!("\"{name}\";q={};w={window_s}", q.rate.requests),
        format!("\"{name}\";r={};t={}", q.remaining, q.reset_s),
    )
}
