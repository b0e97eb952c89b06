//! The whole per-request gate: failed-authentication limiter, [`crate::decide`], then rate and
//! concurrency limits. The host is reached through the narrow [`Host`] trait, so this runs the
//! same against Envoy (the filter's implementation) and against the fakes in tests.
//!
//! Order:
//! 1. if a failed-auth limit is configured and the request carries credentials, refuse with 429
//!    when **both** of the client address's buckets are exhausted, before any secret is compared
//!    (so a guesser learns nothing more once limited);
//! 2. [`crate::decide`]; an `invalid_credentials` denial takes one from each of the client's two
//!    buckets;
//! 3. for an authenticated request, take from key × API, key and account rates, all or nothing;
//! 4. then a concurrency slot for the account; if refused, the rates taken in 3 are given back.
//!
//! A request that fails authentication therefore consumes nothing from any key or account
//! quota, and a request refused by one limit consumes nothing from the others.
//!
//! ## The failed-authentication limiter
//!
//! A client address (IPv6 masked to `ipv6_prefix`) is hashed with SipHash-2-4 under a random
//! 128-bit [`FailedAuthKey`] into two distinct buckets of `buckets` (`kg:fa:2:{bucket}`, one GCRA
//! record each). A failure takes one from both; a request is refused only while both are
//! exhausted (a count-min sketch). Without the key nobody can tell which buckets an address
//! uses, so an attacker can only poison buckets blindly, and must poison both of a victim's:
//! with `n` client subjects it exhausts at most `2n` buckets, and a given client is locked out
//! with probability about `(1 − e^(−2n/B))²` (README, "Limits"). The key is per Envoy process
//! (every VM of the process shares the buckets, so they share the key):
//! [`shared_failed_auth_key`] stores it once under [`FAILED_AUTH_KEY`].

use std::fmt;
use std::net::IpAddr;

use siphasher::sip128::SipHasher24;

use crate::compile::{Catalog, CompiledConfig, Directory, LimitRate};
use crate::concurrency::{Acquire, Inflight};
use crate::config::LimitScope;
use crate::decision::{
    decide_in_region, denied_after_authentication, Allow, ClientAddress, Decision,
};
use crate::digest::{Digest32, Digester};
use crate::fleet::lease::Need;
use crate::fleet::Subject;
use crate::headers::{AuthorizationHeader, RequestHead};
use crate::local::VmLocal;
use crate::ratelimit::lease::Local;
use crate::ratelimit::{
    Admission, Check, Counters, LimitKind, Limiter, OnStoreError, Quota, Taken,
};
use crate::reason::Reason;
use crate::store::{
    account_inflight_key, account_rate_key, compare_and_swap, failed_auth_bucket_key, key_rate_key,
    Change, SharedStore, FAILED_AUTH_KEY,
};
use crate::usage::Used;

pub use crate::concurrency::{InflightTicket, INFLIGHT_HEARTBEAT_S, INFLIGHT_LEASE_S};

/// What the gate needs from the host.
pub trait Host {
    /// Wall-clock time in microseconds since the Unix epoch.
    fn now_us(&self) -> u64;
    /// The client address Envoy computed; may be called more than once (cache it).
    fn client_ip(&self) -> Option<IpAddr>;
    fn store(&self) -> &dyn SharedStore;
    /// This VM's identity for concurrency leases.
    fn vm_id(&self) -> u64;
    /// The process's failed-auth hashing key: the same for every VM sharing [`Host::store`]
    /// (see [`shared_failed_auth_key`]); `None` if it cannot be had (no randomness, store
    /// error), which the limiter treats as a store failure. Asked only when the limiter runs.
    fn failed_auth_key(&self) -> Option<FailedAuthKey>;
    /// This VM's own state (leases, kept slots, addresses found clear), in a filter's VM; `None`
    /// (the control plane's door) takes everything from the store.
    fn local(&self) -> Option<&VmLocal> {
        None
    }
}

/// The secret key of the failed-auth limiter's hash: 128 random bits, one per Envoy process (or
/// per control-plane process). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct FailedAuthKey([u8; 16]);

impl FailedAuthKey {
    /// A key from 16 bytes that must come from a cryptographic random source.
    pub const fn from_bytes(bytes: [u8; 16]) -> FailedAuthKey {
        FailedAuthKey(bytes)
    }
}

impl fmt::Debug for FailedAuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FailedAuthKey(..)")
    }
}

/// The process's failed-auth key from `store` ([`FAILED_AUTH_KEY`]), created on first use: the
/// first caller stores 16 bytes from `random` with an insert-if-absent (the store's absent CAS),
/// and every caller then uses whatever the store holds, so all VMs sharing the store agree. A
/// value of the wrong length is replaced the same way (with its own CAS). `None` if the store
/// fails or `random` does.
pub fn shared_failed_auth_key(
    store: &dyn SharedStore,
    random: &mut dyn FnMut() -> Option<[u8; 16]>,
) -> Option<FailedAuthKey> {
    // Another VM may store one first: it is read on the next round.
    compare_and_swap(store, FAILED_AUTH_KEY, 8, |value| {
        match value.map(<[u8; 16]>::try_from) {
            Some(Ok(bytes)) => Some(Change::Keep(FailedAuthKey(bytes))),
            Some(Err(_)) | None => {
                let fresh = random()?;
                Some(Change::Write(fresh.to_vec(), FailedAuthKey(fresh)))
            }
        }
    })
}

/// What a request is judged against: a catalogue and where its principals are looked up. A
/// static config ([`CompiledConfig`]), the published version in force ([`crate::view::View`]),
/// or the two held apart ([`Parts`]).
pub trait InForce {
    fn catalog(&self) -> &Catalog;
    fn directory(&self) -> &dyn Directory;
    /// The edge's region (`None`: an edge that serves every account, as the control plane's
    /// door).
    fn region(&self) -> Option<&str> {
        None
    }
}

impl InForce for CompiledConfig {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn directory(&self) -> &dyn Directory {
        &self.directory
    }
}

/// A catalogue and a directory held apart (the control plane's door reads principals from its
/// database).
pub struct Parts<'a> {
    pub catalog: &'a Catalog,
    pub directory: &'a dyn Directory,
}

impl InForce for Parts<'_> {
    fn catalog(&self) -> &Catalog {
        self.catalog
    }

    fn directory(&self) -> &dyn Directory {
        self.directory
    }
}

/// The host as the decision's source of the client address, and of digests (the VM's memo);
/// it keeps who authenticated, for usage.
struct ViaHost<'h, 'u>(&'h dyn Host, &'u mut Option<Used>);

impl ClientAddress for ViaHost<'_, '_> {
    fn client_ip(&mut self) -> Option<IpAddr> {
        self.0.client_ip()
    }

    fn digest(&mut self, digester: &Digester, secret: &[u8]) -> Digest32 {
        match self.0.local() {
            Some(local) => local.digests.digest(digester, secret),
            None => digester.digest(secret),
        }
    }

    fn authenticated(&mut self) {
        if let Some(local) = self.0.local() {
            local.digests.authenticated();
        }
    }

    fn admitted_as(&mut self, used: &Used) {
        if self.0.local().is_some_and(|l| l.usage.is_enabled()) {
            *self.1 = Some(used.clone());
        }
    }
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

    /// Whether the request's credential had authenticated when it was refused (see
    /// [`denied_after_authentication`]): only such replies may describe the deployment.
    pub fn authenticated(&self) -> bool {
        denied_after_authentication(self.reason)
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
        /// Fleet-scope limits still to take (the local ones and the concurrency slot are
        /// taken): the request goes on only once [`crate::fleet::lease`] admits it.
        fleet: Option<Box<FleetHold>>,
    },
    Deny(Denial),
}

/// What an allowed request still owes the fleet, and what to give back if the fleet refuses it.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetHold {
    pub needs: Vec<Need>,
    /// The local limits taken.
    checks: Vec<Check>,
    taken: Vec<Taken>,
    max_retries: u32,
    on_store_error: OnStoreError,
}

impl FleetHold {
    /// The outcome configured for a limiter that cannot answer.
    pub fn on_store_error(&self) -> OnStoreError {
        self.on_store_error
    }

    /// The denial when a fleet limit of `kind` (rate `limit`) is over until `retry_after_s`.
    pub fn refused(&self, kind: LimitKind, limit: LimitRate, retry_after_s: u64) -> Denial {
        Denial {
            reason: reason_for(kind),
            retry_after_s: Some(retry_after_s),
            quota: Some(Quota {
                kind,
                rate: limit.rate,
                remaining: 0,
                reset_s: retry_after_s,
            }),
        }
    }

    /// When the rate-limit service cannot answer (or no service is configured): 503
    /// `limiter_unavailable` under `on_store_error: deny`, `None` (let it through, the local
    /// tier having admitted it) under `allow`.
    pub fn failed(&self) -> Option<Denial> {
        (self.on_store_error == OnStoreError::Deny).then_some(Denial {
            reason: Reason::LimiterUnavailable,
            retry_after_s: Some(1),
            quota: None,
        })
    }

    /// Gives back the local limits the request took (its concurrency slot is released with its
    /// ticket, as for any request).
    pub fn give_back(&self, host: &dyn Host, counters: &mut Counters) {
        let limiter = Limiter {
            store: host.store(),
            max_retries: self.max_retries,
            on_store_error: self.on_store_error,
            local: local(host),
        };
        limiter.give_back(&self.checks, &self.taken, host.now_us(), counters);
    }
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

/// The two distinct buckets (of `buckets`; one if `buckets` is 1) of client address `ip`
/// (IPv6 masked to its first `ipv6_prefix` bits) under `key`: SipHash-2-4's 128-bit output gives
/// two independent 64-bit indices. Without the key they cannot be computed, so nobody can pick
/// addresses that land on a given client's buckets.
pub fn failed_auth_buckets(
    key: &FailedAuthKey,
    buckets: u32,
    ipv6_prefix: u8,
    ip: IpAddr,
) -> [u32; 2] {
    let hasher = SipHasher24::new_with_key(&key.0);
    let (h1, h2) = match ip.to_canonical() {
        IpAddr::V4(v4) => hasher.hash(&v4.octets()),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let prefix = u32::from(ipv6_prefix.min(128));
            let masked = if prefix == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - prefix))
            };
            hasher.hash(&masked.to_be_bytes())
        }
    }
    .as_u64();
    let n = u64::from(buckets.max(1));
    let first = h1 % n;
    if n == 1 {
        return [0, 0];
    }
    // Uniform over the other n − 1 buckets.
    let mut second = h2 % (n - 1);
    if second >= first {
        second += 1;
    }
    // Both are below `buckets`, a u32.
    [first as u32, second as u32]
}

/// The limiter's checks for `ip`: one per distinct bucket.
fn failed_auth_checks(cat: &Catalog, key: &FailedAuthKey, ip: IpAddr) -> Vec<Check> {
    let Some(fa) = cat.limits.failed_auth else {
        return Vec::new();
    };
    let [a, b] = failed_auth_buckets(key, fa.buckets, fa.ipv6_prefix, ip);
    let bucket = |n: u32| Check {
        store_key: failed_auth_bucket_key(n),
        slot: 0,
        rate: fa.limit.rate,
        kind: LimitKind::FailedAuth,
        shadow: fa.limit.shadow,
    };
    if a == b {
        vec![bucket(a)]
    } else {
        vec![bucket(a), bucket(b)]
    }
}

fn limiter<'s>(cat: &Catalog, store: &'s dyn SharedStore) -> Limiter<'s, dyn SharedStore + 's> {
    Limiter {
        store,
        max_retries: cat.limits.max_cas_retries,
        on_store_error: cat.limits.on_store_error,
        local: None,
    }
}

/// The host's VM state as the limiter's leases.
fn local(host: &dyn Host) -> Option<Local<'_>> {
    host.local().map(|l| Local {
        leases: &l.rates,
        vm_id: host.vm_id(),
    })
}

/// The failed-auth pre-check, before any secret is compared: 429 `too_many_failed_auth` (with
/// `Retry-After` until one of the buckets has room again) when both of `ip`'s buckets are
/// exhausted. Reads one bucket when it has room, two otherwise; writes nothing. A bucket the
/// store cannot read counts as exhausted under `on_store_error: deny`. `None` when the catalogue
/// has no failed-auth limit, or the limit is in shadow mode (then counted in
/// `stats.shadow_limited`).
pub fn failed_auth_precheck(
    cat: &Catalog,
    key: &FailedAuthKey,
    store: &dyn SharedStore,
    ip: IpAddr,
    now_us: u64,
    stats: &mut GateStats,
) -> Option<Denial> {
    let checks = failed_auth_checks(cat, key, ip);
    let first = checks.first()?;
    let limiter = limiter(cat, store);
    let mut retry_after_s = u64::MAX;
    for c in &checks {
        // One bucket with room is enough.
        let r = limiter.would_refuse(c, now_us, &mut stats.counters)?;
        retry_after_s = retry_after_s.min(r);
    }
    if first.shadow {
        stats.shadow_limited.push(LimitKind::FailedAuth);
        return None;
    }
    Some(Denial {
        reason: Reason::TooManyFailedAuth,
        retry_after_s: Some(retry_after_s),
        quota: Some(Quota {
            kind: LimitKind::FailedAuth,
            rate: first.rate,
            remaining: 0,
            reset_s: retry_after_s,
        }),
    })
}

/// Records one failed authentication from `ip`: takes one from each of its buckets that has
/// room, independently (an exhausted bucket does not stop the other from filling, so a
/// guesser's own pair always ends up exhausted).
pub fn failed_auth_record(
    cat: &Catalog,
    key: &FailedAuthKey,
    store: &dyn SharedStore,
    ip: IpAddr,
    now_us: u64,
    counters: &mut Counters,
) {
    let limiter = limiter(cat, store);
    for c in failed_auth_checks(cat, key, ip) {
        let _ = limiter.admit(std::slice::from_ref(&c), now_us, counters);
    }
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

/// Runs the whole gate for one request against the config in force, static or published: the
/// one entry point (the edge's filter and the control plane's door). The clock is read once.
///
/// In a filter's VM with usage on ([`crate::usage::Usage`]), a request whose credential
/// authenticated is counted for its principal and secret: allowed, or denied by reason; one
/// that still owes the fleet is counted when the fleet decides (by the glue).
pub fn evaluate(
    config: &dyn InForce,
    head: &RequestHead<'_>,
    host: &dyn Host,
    stats: &mut GateStats,
) -> Verdict {
    let mut used = None;
    let verdict = judge(config, head, host, stats, &mut used);
    if let (Some(vm), Some(used)) = (host.local(), &used) {
        match &verdict {
            Verdict::Allow { fleet: None, .. } => vm.usage.allowed(used, host.now_us()),
            Verdict::Allow { fleet: Some(_), .. } => {}
            Verdict::Deny(d) => vm.usage.denied(used, host.now_us(), d.reason),
        }
    }
    verdict
}

fn judge(
    config: &dyn InForce,
    head: &RequestHead<'_>,
    host: &dyn Host,
    stats: &mut GateStats,
    used: &mut Option<Used>,
) -> Verdict {
    let (cat, dir) = (config.catalog(), config.directory());
    let now_us = host.now_us();
    let limiter = Limiter {
        store: host.store(),
        max_retries: cat.limits.max_cas_retries,
        on_store_error: cat.limits.on_store_error,
        local: local(host),
    };
    let vm = host.local();

    // 1. Failed-auth gate, only for requests that present credentials.
    let failed_auth = match (cat.limits.failed_auth, head.authorization) {
        (Some(_), AuthorizationHeader::One(_) | AuthorizationHeader::Many) => host.client_ip(),
        _ => None,
    };
    let failed_auth = match (failed_auth, cat.limits.failed_auth) {
        (Some(ip), Some(fa)) => match host.failed_auth_key() {
            Some(key) => Some((ip, key)),
            // Without the key the buckets cannot be found: a store failure of the limiter,
            // answered as an unreadable bucket is.
            None => {
                stats.counters.store_errors += 1;
                if cat.limits.on_store_error == OnStoreError::Deny && !fa.limit.shadow {
                    return Verdict::Deny(Denial {
                        reason: Reason::TooManyFailedAuth,
                        retry_after_s: Some(1),
                        quota: Some(Quota {
                            kind: LimitKind::FailedAuth,
                            rate: fa.limit.rate,
                            remaining: 0,
                            reset_s: 1,
                        }),
                    });
                }
                // Counted in `store_failures_allowed` if the request is let through.
                None
            }
        },
        _ => None,
    };
    if let Some((ip, key)) = &failed_auth {
        // An address this VM found clear a moment ago is not read again (see ClearAddresses).
        if !vm.is_some_and(|v| v.clear.is_clear(*ip, now_us)) {
            let shadow_before = stats.shadow_limited.len();
            if let Some(denial) = failed_auth_precheck(cat, key, host.store(), *ip, now_us, stats) {
                return Verdict::Deny(denial);
            }
            if let (Some(v), true) = (vm, stats.shadow_limited.len() == shadow_before) {
                v.clear.mark(*ip, now_us);
            }
        }
    }

    // 2. Authentication and authorization.
    let now_s = now_us / 1_000_000;
    let region = config.region();
    let decision = decide_in_region(cat, dir, region, head, now_s, &mut ViaHost(host, used));
    let allow = match decision {
        Decision::Deny(reason) => {
            if let Some(v) = vm {
                v.digests.forget_pending();
            }
            if reason == Reason::InvalidCredentials {
                if let Some((ip, key)) = &failed_auth {
                    if let Some(v) = vm {
                        v.clear.forget(*ip);
                    }
                    failed_auth_record(cat, key, host.store(), *ip, now_us, &mut stats.counters);
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
            fleet: None,
        };
    };

    // 3. Rates: key × API, key, account. A key's own rate and its per-API rates live in one
    // record (slot 0 and a slot per API), taken with one read and one compare-and-swap.
    let account = &admitted.account;
    let key = admitted.key.as_deref();
    let mut checks = Vec::with_capacity(3);
    let mut fleet = Vec::new();
    if let (Some(key), Some((api_idx, _))) = (key, &admitted.api) {
        let api_idx = *api_idx;
        let own = key
            .api_rates
            .iter()
            .find(|(i, _)| *i == api_idx)
            .map(|(_, r)| *r);
        let api = &cat.apis[api_idx as usize];
        if let Some(limit) = own.or(api.limit).filter(|l| {
            local_tier(l, &mut fleet, || Subject::KeyApi {
                api: api.name.clone(),
                key_sid: key.sid.clone(),
            })
        }) {
            checks.push(check(
                key_rate_key(&key.sid),
                api_slot(&api.name),
                limit,
                LimitKind::KeyApi,
            ));
        }
    }
    let key_subject = |k: &crate::compile::Key| Subject::Key {
        role: k.role,
        key_sid: k.sid.clone(),
    };
    if let Some(limit) = key.and_then(|k| {
        k.rate
            .filter(|l| local_tier(l, &mut fleet, || key_subject(k)))
    }) {
        checks.push(check(
            key_rate_key(key.map_or("", |k| &*k.sid)),
            0,
            limit,
            LimitKind::Key,
        ));
    }
    let account_subject = || Subject::Account {
        account_sid: account.sid.clone(),
    };
    if let Some(limit) = account
        .rate
        .filter(|l| local_tier(l, &mut fleet, account_subject))
    {
        checks.push(check(
            account_rate_key(&account.sid),
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

    // 4. Concurrency: one of this VM's idle slots of the account if it has one, else the store.
    let mut inflight = None;
    if let Some(limit) = account.concurrency {
        let store_key = account_inflight_key(&account.sid);
        let idle = vm.is_some_and(|v| v.slots.take_idle(&store_key));
        let acquired = if idle {
            Acquire::Acquired
        } else {
            let slots = Inflight {
                store: host.store(),
                max_retries: cat.limits.max_cas_retries,
                lease_s: INFLIGHT_LEASE_S,
                vm_id: host.vm_id(),
            };
            let now_s = now_us / 1_000_000;
            let (acquired, total) =
                slots.acquire_counted(&store_key, limit, now_s, &mut stats.counters);
            if let (Some(v), Acquire::Acquired) = (vm, acquired) {
                v.slots.seen(&store_key, total);
            }
            acquired
        };
        match acquired {
            Acquire::Acquired => {
                inflight = Some(InflightTicket {
                    store_key,
                    max_cas_retries: cat.limits.max_cas_retries,
                    limit,
                })
            }
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

    let fleet = (!fleet.is_empty()).then(|| {
        Box::new(FleetHold {
            needs: fleet,
            checks,
            taken,
            max_retries: cat.limits.max_cas_retries,
            on_store_error: cat.limits.on_store_error,
        })
    });
    Verdict::Allow {
        allow,
        quota: quota.filter(|_| cat.limits.quota_headers),
        inflight,
        fleet,
    }
}

/// Keeps a local limit for the local tier (true); a fleet one becomes a [`Need`] of `subject`.
fn local_tier(limit: &LimitRate, fleet: &mut Vec<Need>, subject: impl FnOnce() -> Subject) -> bool {
    if limit.scope == LimitScope::Fleet {
        fleet.push(Need {
            subject: subject(),
            limit: *limit,
        });
        return false;
    }
    true
}

/// Gives back a concurrency slot when the request's stream ends, however it ends.
pub fn release(ticket: &InflightTicket, host: &dyn Host, counters: &mut Counters) {
    let now_s = host.now_us() / 1_000_000;
    ticket.give_back(host.store(), host.vm_id(), now_s, counters);
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
