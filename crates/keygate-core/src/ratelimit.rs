//! Rate limits in a shared compare-and-swap store (Envoy shared data), exact across workers.
//!
//! Algorithm: GCRA (a virtual-time token bucket). Each limited subject (a key, an account, a key
//! × API pair, a client-IP bucket) is **one** store value: its theoretical arrival time (TAT) in
//! microseconds. A limit of `L` requests per period `P` has emission interval `T = P / L`; a
//! request at `now` is admitted iff `max(TAT, now) − now ≤ (L − 1)·T`, which sets
//! `TAT = max(TAT, now) + T`. Bursts of exactly `L` pass from idle, then one per `T`. Refused
//! requests write nothing. Nothing is keyed by time window, so memory is bounded by the number of
//! subjects, never by time (Envoy cannot delete shared-data keys).
//!
//! Updates are read → compute → compare-and-swap, retried a bounded number of times. A missing
//! subject must be created so that two workers cannot both win: the host inserts a missing key
//! whatever CAS value is passed, but rejects any CAS that is not the entry's current one once the
//! key exists. CAS values come from one process-wide counter, so the CAS of a *different* key
//! (the store's "absent CAS", e.g. that of an anchor key written at start-up) can never be the
//! current CAS of a subject: writing a new subject with it is an insert-if-absent.
//!
//! Several limits apply to one request (key, account, key × API). They are taken in order; if a
//! later one refuses, the earlier ones are given back (their TAT moved back by `T`), so a request
//! refused by one limit consumes nothing from the others.

use std::fmt;

use crate::store::{SetError, SharedStore, StoreError, RATE_LEASED_TAG, RATE_TAG};

pub mod lease;

/// One rate limit: `requests` per `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u32,
    pub period_us: u64,
}

impl Rate {
    /// Emission interval `T`, at least 1 µs.
    pub fn interval_us(self) -> u64 {
        (self.period_us / u64::from(self.requests.max(1))).max(1)
    }

    /// Burst tolerance `(L − 1)·T`.
    fn tolerance_us(self) -> u64 {
        self.interval_us()
            .saturating_mul(u64::from(self.requests.saturating_sub(1)))
    }
}

/// What kind of limit a subject is, for replies and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Key,
    Account,
    KeyApi,
    FailedAuth,
}

impl LimitKind {
    pub const ALL: [LimitKind; 4] = [
        LimitKind::Key,
        LimitKind::Account,
        LimitKind::KeyApi,
        LimitKind::FailedAuth,
    ];

    /// Name used in `RateLimit-Policy` and stat names.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Key => "key",
            LimitKind::Account => "account",
            LimitKind::KeyApi => "key_api",
            LimitKind::FailedAuth => "failed_auth",
        }
    }
}

/// One limit applied to one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Shared-data key of the subject's record.
    pub store_key: String,
    /// Which TAT of the record this limit uses. Limits of one subject (a key's own rate and its
    /// per-API rates) share one record, so one read and one CAS take them all.
    pub slot: u32,
    pub rate: Rate,
    pub kind: LimitKind,
    /// Count what would be refused, refuse nothing.
    pub shadow: bool,
}

/// What to do when the store cannot give an answer (retries exhausted, unreadable value, error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    Deny,
    Allow,
}

/// Counters the caller turns into stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub cas_retries: u32,
    /// Leases taken ([`lease`]).
    pub leases: u32,
    pub retries_exhausted: u32,
    pub garbage_values: u32,
    pub store_errors: u32,
}

/// Quota left under one limit after a decision, for `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub kind: LimitKind,
    pub rate: Rate,
    pub remaining: u32,
    /// Seconds until the quota is whole again.
    pub reset_s: u64,
}

/// The result of taking a set of limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Every enforced limit admitted; `tightest` is the one with the least quota left.
    Admitted {
        tightest: Option<Quota>,
        shadow_limited: Vec<LimitKind>,
        /// The checks that actually took a request (for [`Limiter::give_back`]).
        taken: Vec<Taken>,
    },
    /// Refused by `quota.kind`; retry after `retry_after_s` seconds.
    Limited { quota: Quota, retry_after_s: u64 },
    /// The store failed and the configured outcome is to deny.
    StoreFailure,
}

/// Value format: [`RATE_TAG`], then `(slot: u32, TAT in µs: u64)` entries, little-endian. A slot
/// that is absent (or whose TAT has passed) has its whole quota. A record on which a VM holds a
/// lease ([`lease`]) is [`RATE_LEASED_TAG`], the number of TAT entries (u8), those entries, then
/// `(slot: u32, vm_id: u64, reserved µs: u64, expiry in µs: u64)` lease entries; without a lease
/// the record is written in the first form again, byte for byte what it would be without leases.
const ENTRY: usize = 12;
const LEASE_ENTRY: usize = 28;
/// Entries kept per record: a key's own rate plus per-API rates; beyond that the entries whose
/// TAT is furthest in the past are dropped first (they are the closest to a full quota anyway).
const MAX_ENTRIES: usize = 64;

type Entries = Vec<(u32, u64)>;

/// A subject's record: the TAT of each slot and the leases VMs hold on them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Record {
    tats: Entries,
    leases: Vec<lease::Entry>,
}

fn encode(record: &Record) -> Vec<u8> {
    let leased = !record.leases.is_empty();
    let mut v =
        Vec::with_capacity(2 + record.tats.len() * ENTRY + record.leases.len() * LEASE_ENTRY);
    if leased {
        v.push(RATE_LEASED_TAG);
        // `compact` keeps at most MAX_ENTRIES (64) TAT entries.
        v.push(u8::try_from(record.tats.len()).unwrap_or(u8::MAX));
    } else {
        v.push(RATE_TAG);
    }
    for (slot, tat) in record.tats.iter().take(usize::from(u8::MAX)) {
        v.extend_from_slice(&slot.to_le_bytes());
        v.extend_from_slice(&tat.to_le_bytes());
    }
    for l in &record.leases {
        v.extend_from_slice(&l.slot.to_le_bytes());
        v.extend_from_slice(&l.vm_id.to_le_bytes());
        v.extend_from_slice(&l.reserved_us.to_le_bytes());
        v.extend_from_slice(&l.expiry_us.to_le_bytes());
    }
    v
}

fn u32_at(c: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(c.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(c: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(c.get(at..at + 8)?.try_into().ok()?))
}

fn decode_tats(bytes: &[u8]) -> Option<Entries> {
    if !bytes.len().is_multiple_of(ENTRY) {
        return None;
    }
    (bytes.chunks_exact(ENTRY))
        .map(|c| Some((u32_at(c, 0)?, u64_at(c, 4)?)))
        .collect()
}

fn decode(bytes: &[u8]) -> Option<Record> {
    match bytes {
        [RATE_TAG, rest @ ..] => Some(Record {
            tats: decode_tats(rest)?,
            leases: Vec::new(),
        }),
        [RATE_LEASED_TAG, n, rest @ ..] => {
            let split = usize::from(*n) * ENTRY;
            let (tats, leases) = (rest.get(..split)?, rest.get(split..)?);
            if !leases.len().is_multiple_of(LEASE_ENTRY) {
                return None;
            }
            let leases = (leases.chunks_exact(LEASE_ENTRY))
                .map(|c| {
                    Some(lease::Entry {
                        slot: u32_at(c, 0)?,
                        vm_id: u64_at(c, 4)?,
                        reserved_us: u64_at(c, 12)?,
                        expiry_us: u64_at(c, 20)?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Record {
                tats: decode_tats(tats)?,
                leases,
            })
        }
        _ => None,
    }
}

fn tat_of(entries: &[(u32, u64)], slot: u32) -> u64 {
    entries
        .iter()
        .find(|(s, _)| *s == slot)
        .map_or(0, |(_, t)| *t)
}

fn upsert(entries: &mut Entries, slot: u32, tat: u64) {
    match entries.iter_mut().find(|(s, _)| *s == slot) {
        Some(e) => e.1 = tat,
        None => entries.push((slot, tat)),
    }
}

/// Drops entries that carry no information any more (TAT not after `now`; expired leases are
/// charged first) and bounds the rest.
fn compact(record: &mut Record, now: u64) {
    lease::fold_expired(record, now);
    let entries = &mut record.tats;
    entries.retain(|(_, t)| *t > now);
    if entries.len() > MAX_ENTRIES {
        entries.sort_unstable_by_key(|e| std::cmp::Reverse(e.1));
        entries.truncate(MAX_ENTRIES);
    }
}

/// The limiter: store, retry bound and failure policy, and (in a VM of the filter) the leases
/// this VM holds.
pub struct Limiter<'s, S: SharedStore + ?Sized> {
    pub store: &'s S,
    pub max_retries: u32,
    pub on_store_error: OnStoreError,
    /// This VM's leases ([`lease`]); `None` takes every request from the store.
    pub local: Option<lease::Local<'s>>,
}

/// One limit a request took, and whether from this VM's lease (given back to it) or the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Index into the checks.
    pub index: usize,
    pub leased: bool,
}

/// Result of one subject's update (all its limits of one request).
enum Step {
    /// `(check index, TAT after)` of every limit taken; the shadow limits that would refuse.
    Admitted {
        taken: Vec<(usize, u64)>,
        shadow_refused: Vec<usize>,
        leased: bool,
    },
    Refused {
        index: usize,
        tat: u64,
    },
    Failed,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

fn quota(check: &Check, tat_after: u64, now: u64) -> Quota {
    let t = check.rate.interval_us();
    let used = tat_after.saturating_sub(now);
    let free = (check.rate.tolerance_us() + t).saturating_sub(used);
    Quota {
        kind: check.kind,
        rate: check.rate,
        remaining: u32::try_from(free / t)
            .unwrap_or(u32::MAX)
            .min(check.rate.requests),
        reset_s: ceil_div(used, 1_000_000),
    }
}

impl<S: SharedStore + ?Sized> Limiter<'_, S> {
    /// Takes one request from every check, all or nothing. Checks with the same `store_key`
    /// are taken together: one read and one compare-and-swap for the subject, or none when this
    /// VM's lease on every one of them has a request left.
    pub fn admit(&self, checks: &[Check], now_us: u64, counters: &mut Counters) -> Admission {
        let mut taken: Vec<Taken> = Vec::with_capacity(checks.len());
        let mut tightest: Option<Quota> = None;
        let mut shadow_limited = Vec::new();
        for group in groups(checks) {
            let local = (self.local.as_ref()).and_then(|l| l.leases.spend(checks, &group, now_us));
            let step = match local {
                Some(took) => Step::Admitted {
                    taken: took,
                    shadow_refused: Vec::new(),
                    leased: true,
                },
                None => self.take(checks, &group, now_us, counters),
            };
            match step {
                Step::Admitted {
                    taken: took,
                    shadow_refused,
                    leased,
                } => {
                    for (i, tat_after) in took {
                        taken.push(Taken { index: i, leased });
                        let q = quota(&checks[i], tat_after, now_us);
                        if tightest.is_none_or(|t| q.remaining < t.remaining) {
                            tightest = Some(q);
                        }
                    }
                    shadow_limited.extend(shadow_refused.iter().map(|&i| checks[i].kind));
                }
                Step::Refused { index, tat } => {
                    self.give_back(checks, &taken, now_us, counters);
                    let check = &checks[index];
                    let retry_after_us = tat
                        .saturating_sub(now_us)
                        .saturating_sub(check.rate.tolerance_us());
                    return Admission::Limited {
                        quota: Quota {
                            remaining: 0,
                            ..quota(check, tat, now_us)
                        },
                        retry_after_s: ceil_div(retry_after_us, 1_000_000).max(1),
                    };
                }
                Step::Failed => {
                    let enforced = group.iter().any(|&i| !checks[i].shadow);
                    if self.on_store_error == OnStoreError::Deny && enforced {
                        self.give_back(checks, &taken, now_us, counters);
                        return Admission::StoreFailure;
                    }
                }
            }
        }
        Admission::Admitted {
            tightest,
            shadow_limited,
            taken,
        }
    }

    /// Reads a subject without taking from it: would a request be refused now? Used by the
    /// failed-authentication limiter before the credential is checked.
    pub fn would_refuse(&self, check: &Check, now_us: u64, counters: &mut Counters) -> Option<u64> {
        let tat = match self.store.get(&check.store_key) {
            Ok(Some((bytes, _))) => match decode(&bytes) {
                Some(r) => tat_of(&r.tats, check.slot),
                None => {
                    counters.garbage_values += 1;
                    return (self.on_store_error == OnStoreError::Deny).then_some(1);
                }
            },
            Ok(None) => return None,
            Err(StoreError) => {
                counters.store_errors += 1;
                return (self.on_store_error == OnStoreError::Deny).then_some(1);
            }
        };
        let base = tat.max(now_us);
        (base - now_us > check.rate.tolerance_us())
            .then(|| ceil_div(base - now_us - check.rate.tolerance_us(), 1_000_000).max(1))
    }

    /// Takes one request from each of `group` (indices into `checks`, one subject) in the store;
    /// with leases on, this VM gives back what its earlier lease on these slots left unspent and
    /// takes a new one when the subject is far from its limits ([`lease::extra`]).
    fn take(&self, checks: &[Check], group: &[usize], now: u64, counters: &mut Counters) -> Step {
        let Some(&first) = group.first() else {
            return Step::Admitted {
                taken: Vec::new(),
                shadow_refused: Vec::new(),
                leased: false,
            };
        };
        let store_key = &checks[first].store_key;
        let local = self.local.as_ref();
        let held = local.map(|l| l.leases.held(store_key)).unwrap_or_default();
        let slots: Vec<u32> = group.iter().map(|&i| checks[i].slot).collect();
        for attempt in 0..=self.max_retries {
            if attempt > 0 {
                counters.cas_retries += 1;
            }
            let (mut record, cas) = match self.store.get(store_key) {
                Ok(Some((bytes, cas))) => match decode(&bytes) {
                    Some(r) => (r, cas),
                    None => {
                        // Unreadable: count it, repair it (so the subject is not stuck), and
                        // let the configured outcome decide this request.
                        counters.garbage_values += 1;
                        let _ = self.store.set(store_key, &encode(&Record::default()), cas);
                        return Step::Failed;
                    }
                },
                Ok(None) => (Record::default(), self.store.absent_cas()),
                Err(StoreError) => {
                    counters.store_errors += 1;
                    return Step::Failed;
                }
            };
            // Leases past their expiry are charged whole; this VM's own on these slots end here
            // and charge what they spent.
            lease::fold_expired(&mut record, now);
            let vm_id = local.map_or(0, |l| l.vm_id);
            if local.is_some() {
                lease::end_mine(&mut record, &held, &slots, vm_id, now);
            }
            // The checks of one subject use distinct slots: each reads its own entry, plus what
            // the other VMs' leases on it reserve.
            let mut bases = Vec::with_capacity(group.len());
            let mut shadow_refused = Vec::new();
            let mut extra = u64::MAX;
            for &i in group {
                let check = &checks[i];
                let t = check.rate.interval_us();
                let own = tat_of(&record.tats, check.slot).max(now);
                let base = own.saturating_add(lease::reserved(&record, check.slot, vm_id, now));
                if base - now > check.rate.tolerance_us() {
                    if check.shadow {
                        shadow_refused.push(i);
                        continue;
                    }
                    return Step::Refused {
                        index: i,
                        tat: base,
                    };
                }
                let left = (check.rate.tolerance_us() - (base - now)) / t;
                let size = lease::RateLeases::size(&held, check.slot);
                extra = extra.min(if check.shadow {
                    0
                } else {
                    lease::extra(left, size)
                });
                bases.push((i, own, base));
            }
            if bases.is_empty() {
                return Step::Admitted {
                    taken: Vec::new(),
                    shadow_refused,
                    leased: false,
                };
            }
            let extra = match local {
                Some(_)
                    if shadow_refused.is_empty() && record.leases.len() < lease::MAX_ENTRIES =>
                {
                    u32::try_from(extra).unwrap_or(0)
                }
                _ => 0,
            };
            let mut taken = Vec::with_capacity(bases.len());
            for &(i, own, base) in &bases {
                let check = &checks[i];
                let t = check.rate.interval_us();
                upsert(&mut record.tats, check.slot, own + t);
                if let (Some(l), true) = (local, extra > 0) {
                    record.leases.push(lease::Entry {
                        slot: check.slot,
                        vm_id: l.vm_id,
                        reserved_us: u64::from(extra) * t,
                        expiry_us: now + lease::TTL_US,
                    });
                }
                // As this VM sees it: this request and every lease, its own included.
                taken.push((i, base + t + u64::from(extra) * t));
            }
            compact(&mut record, now);
            match self.store.set(store_key, &encode(&record), cas) {
                Ok(()) => {
                    if let Some(l) = local {
                        l.leases.took(checks, &taken, &slots, extra, now);
                        counters.leases += u32::from(extra > 0);
                    }
                    return Step::Admitted {
                        taken,
                        shadow_refused,
                        leased: false,
                    };
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Other) => {
                    counters.store_errors += 1;
                    return Step::Failed;
                }
            }
        }
        counters.retries_exhausted += 1;
        Step::Failed
    }

    /// Undoes the takes of an admission after a later, separate limit refused: one taken from
    /// this VM's lease goes back to the lease; one taken from the store moves its TAT back by
    /// `T` (never below `now`), one CAS per subject.
    pub fn give_back(&self, checks: &[Check], taken: &[Taken], now: u64, counters: &mut Counters) {
        let mut from_store = Vec::with_capacity(taken.len());
        for t in taken {
            let check = &checks[t.index];
            let unspent =
                t.leased && (self.local.as_ref()).is_some_and(|l| l.leases.unspend(check, now));
            if !unspent {
                from_store.push(t.index);
            }
        }
        for group in groups_of(checks, &from_store) {
            let Some(&first) = group.first() else {
                continue;
            };
            let store_key = &checks[first].store_key;
            rewrite(
                self.store,
                store_key,
                self.max_retries,
                counters,
                |record| {
                    for &i in &group {
                        let check = &checks[i];
                        let back = tat_of(&record.tats, check.slot)
                            .saturating_sub(check.rate.interval_us())
                            .max(now);
                        upsert(&mut record.tats, check.slot, back);
                    }
                    compact(record, now);
                },
            );
        }
    }
}

/// Read, `edit`, compare-and-swap a subject's record that exists and reads, retried up to
/// `max_retries` times on a conflict (counted); an absent or unreadable record, or a store
/// error, is left as it is. Whether it was written.
fn rewrite<S: SharedStore + ?Sized>(
    store: &S,
    store_key: &str,
    max_retries: u32,
    counters: &mut Counters,
    mut edit: impl FnMut(&mut Record),
) -> bool {
    for attempt in 0..=max_retries {
        if attempt > 0 {
            counters.cas_retries += 1;
        }
        let Ok(Some((bytes, cas))) = store.get(store_key) else {
            return false;
        };
        let Some(mut record) = decode(&bytes) else {
            return false;
        };
        edit(&mut record);
        match store.set(store_key, &encode(&record), cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Other) => return false,
        }
    }
    false
}

/// The checks grouped by subject, each group in the order of its first check.
fn groups(checks: &[Check]) -> Vec<Vec<usize>> {
    let all: Vec<usize> = (0..checks.len()).collect();
    groups_of(checks, &all)
}

/// `indices` (into `checks`) grouped by subject, in order of first appearance.
fn groups_of(checks: &[Check], indices: &[usize]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for &i in indices {
        match out.iter_mut().find(|g| {
            g.first()
                .is_some_and(|&f| checks[f].store_key == checks[i].store_key)
        }) {
            Some(g) => g.push(i),
            None => out.push(vec![i]),
        }
    }
    out
}

/// Test support: what a rate record in the fake store holds.
#[cfg(any(test, feature = "testing"))]
impl crate::store::testing::FakeStore {
    /// The TAT of slot 0 of a subject (`None` if the record is absent or unreadable).
    pub fn tat(&self, key: &str) -> Option<u64> {
        self.tat_at(key, 0)
    }

    /// The TAT of `slot` of a subject.
    pub fn tat_at(&self, key: &str, slot: u32) -> Option<u64> {
        self.map
            .borrow()
            .get(key)
            .and_then(|(v, _)| decode(v))
            .map(|r| tat_of(&r.tats, slot))
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::FakeStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: u64 = 1_000_000;
    const MIN: u64 = 60 * SEC;
    const NOW: u64 = 1_700_000_000 * SEC;

    fn check(key: &str, requests: u32, period_us: u64, kind: LimitKind) -> Check {
        Check {
            store_key: key.into(),
            slot: 0,
            rate: Rate {
                requests,
                period_us,
            },
            kind,
            shadow: false,
        }
    }

    fn limiter(store: &FakeStore) -> Limiter<'_, FakeStore> {
        Limiter {
            store,
            max_retries: 4,
            on_store_error: OnStoreError::Deny,
            local: None,
        }
    }

    fn tats(entries: &[(u32, u64)]) -> Record {
        Record {
            tats: entries.to_vec(),
            leases: Vec::new(),
        }
    }

    fn admitted(a: &Admission) -> bool {
        matches!(a, Admission::Admitted { .. })
    }

    #[test]
    fn burst_of_exactly_l_then_refill_one_per_interval() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let c = [check("k", 10, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        let results: Vec<bool> = (0..15)
            .map(|_| admitted(&l.admit(&c, NOW, &mut n)))
            .collect();
        assert_eq!(results.iter().filter(|a| **a).count(), 10);
        assert!(results[..10].iter().all(|a| *a));
        // T = 6 s: just before one interval nothing new, at it exactly one.
        assert!(!admitted(&l.admit(&c, NOW + 6 * SEC - 1, &mut n)));
        assert!(admitted(&l.admit(&c, NOW + 6 * SEC, &mut n)));
        assert!(!admitted(&l.admit(&c, NOW + 6 * SEC, &mut n)));
        // After a whole idle period the full burst is back, not more.
        let later = NOW + 10 * MIN;
        assert_eq!(
            (0..20)
                .filter(|_| admitted(&l.admit(&c, later, &mut n)))
                .count(),
            10
        );
    }

    #[test]
    fn refused_request_reports_retry_after_and_quota() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let c = [check("k", 2, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        let a1 = l.admit(&c, NOW, &mut n);
        match a1 {
            Admission::Admitted {
                tightest: Some(q), ..
            } => {
                assert_eq!(q.remaining, 1);
                assert_eq!(q.reset_s, 30);
            }
            other => panic!("{other:?}"),
        }
        let _ = l.admit(&c, NOW, &mut n);
        match l.admit(&c, NOW, &mut n) {
            Admission::Limited {
                quota,
                retry_after_s,
            } => {
                assert_eq!(quota.kind, LimitKind::Key);
                assert_eq!(quota.remaining, 0);
                assert_eq!(retry_after_s, 30);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn window_edge_uses_virtual_time_not_fixed_windows() {
        // 2 per minute: two at t=59 s and two more at t=61 s must not both pass (a fixed
        // window would allow 4 within 2 s).
        let store = FakeStore::new();
        let l = limiter(&store);
        let c = [check("k", 2, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        let at = |s| NOW + s * SEC;
        assert!(admitted(&l.admit(&c, at(59), &mut n)));
        assert!(admitted(&l.admit(&c, at(59), &mut n)));
        assert!(!admitted(&l.admit(&c, at(61), &mut n)));
        assert!(admitted(&l.admit(&c, at(89), &mut n)));
    }

    #[test]
    fn refusal_by_one_limit_consumes_nothing_from_the_others() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let mut n = Counters::default();
        let key = check("key", 100, MIN, LimitKind::Key);
        let api = check("key_api", 1, MIN, LimitKind::KeyApi);
        assert!(admitted(&l.admit(&[key.clone(), api.clone()], NOW, &mut n)));
        let before = store.tat("key");
        for _ in 0..5 {
            assert!(matches!(
                l.admit(&[key.clone(), api.clone()], NOW, &mut n),
                Admission::Limited {
                    quota: Quota {
                        kind: LimitKind::KeyApi,
                        ..
                    },
                    ..
                }
            ));
        }
        assert_eq!(
            store.tat("key"),
            before,
            "key budget untouched by refused requests"
        );
    }

    #[test]
    fn cas_conflicts_are_retried_and_counted() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let c = [check("k", 10, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        store.conflicts.set(3);
        assert!(admitted(&l.admit(&c, NOW, &mut n)));
        assert_eq!(n.cas_retries, 3);
        assert_eq!(n.retries_exhausted, 0);
    }

    #[test]
    fn retry_exhaustion_is_counted_and_denies_by_default() {
        let store = FakeStore::new();
        let c = [check("k", 10, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        store.conflicts.set(100);
        assert_eq!(
            limiter(&store).admit(&c, NOW, &mut n),
            Admission::StoreFailure
        );
        assert_eq!(n.retries_exhausted, 1);
        assert_eq!(n.cas_retries, 4);
        store.conflicts.set(100);
        let allow = Limiter {
            store: &store,
            max_retries: 4,
            on_store_error: OnStoreError::Allow,
            local: None,
        };
        assert!(admitted(&allow.admit(&c, NOW, &mut n)));
        assert_eq!(n.retries_exhausted, 2);
    }

    #[test]
    fn garbage_value_is_counted_repaired_and_denied() {
        let store = FakeStore::new();
        store.raw_set("k", b"\x07garbage");
        let l = limiter(&store);
        let c = [check("k", 10, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        assert_eq!(l.admit(&c, NOW, &mut n), Admission::StoreFailure);
        assert_eq!(n.garbage_values, 1);
        assert!(store.tat("k").is_some(), "value repaired");
        assert!(admitted(&l.admit(&c, NOW, &mut n)));
    }

    #[test]
    fn store_errors_follow_the_policy() {
        let store = FakeStore::new();
        store.fail_gets.set(true);
        let c = [check("k", 10, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        assert_eq!(
            limiter(&store).admit(&c, NOW, &mut n),
            Admission::StoreFailure
        );
        assert_eq!(n.store_errors, 1);
    }

    #[test]
    fn first_write_of_a_new_subject_cannot_be_won_twice() {
        // Two workers both read "missing"; the first creates the subject; the second's write,
        // made with the absent CAS, must fail and be retried against the real value.
        let store = FakeStore::new();
        let absent = store.absent_cas();
        assert!(store.get("new").unwrap().is_none());
        store
            .set("new", &encode(&tats(&[(0, NOW + 1)])), absent)
            .unwrap();
        assert_eq!(
            store.set("new", &encode(&tats(&[(0, NOW + 2)])), absent),
            Err(SetError::CasMismatch)
        );
        assert_eq!(store.tat("new"), Some(NOW + 1));
        // And through the limiter: L = 1, two "simultaneous" first requests, one admitted.
        let l = limiter(&store);
        let c = [check("fresh", 1, MIN, LimitKind::Key)];
        let mut n = Counters::default();
        assert!(admitted(&l.admit(&c, NOW, &mut n)));
        assert!(!admitted(&l.admit(&c, NOW, &mut n)));
    }

    #[test]
    fn shadow_limits_count_but_do_not_refuse() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let mut c = check("k", 1, MIN, LimitKind::Account);
        c.shadow = true;
        let mut n = Counters::default();
        assert!(admitted(&l.admit(std::slice::from_ref(&c), NOW, &mut n)));
        match l.admit(std::slice::from_ref(&c), NOW, &mut n) {
            Admission::Admitted { shadow_limited, .. } => {
                assert_eq!(shadow_limited, vec![LimitKind::Account])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn would_refuse_reads_without_taking() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let c = check("ip", 2, MIN, LimitKind::FailedAuth);
        let mut n = Counters::default();
        assert_eq!(l.would_refuse(&c, NOW, &mut n), None);
        let _ = l.admit(std::slice::from_ref(&c), NOW, &mut n);
        let _ = l.admit(std::slice::from_ref(&c), NOW, &mut n);
        let sets = store.sets.get();
        assert_eq!(l.would_refuse(&c, NOW, &mut n), Some(30));
        assert_eq!(store.sets.get(), sets, "no write");
    }

    #[test]
    fn memory_is_one_value_per_subject_whatever_the_time() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let mut n = Counters::default();
        for minute in 0..500 {
            for s in 0..20 {
                let c = [check(&format!("s{s}"), 5, MIN, LimitKind::Key)];
                let _ = l.admit(&c, NOW + minute * MIN, &mut n);
            }
        }
        assert_eq!(store.map.borrow().len(), 21, "20 subjects + the anchor");
    }

    fn slotted(key: &str, slot: u32, requests: u32, kind: LimitKind) -> Check {
        Check {
            slot,
            ..check(key, requests, MIN, kind)
        }
    }

    #[test]
    fn limits_of_one_subject_are_taken_with_one_read_and_one_write() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let mut n = Counters::default();
        let checks = [
            slotted("k", 7, 2, LimitKind::KeyApi),
            slotted("k", 0, 3, LimitKind::Key),
            slotted("a", 0, 100, LimitKind::Account),
        ];
        let sets = store.sets.get();
        assert!(admitted(&l.admit(&checks, NOW, &mut n)));
        assert_eq!(
            store.sets.get() - sets,
            2,
            "one write for the key's two limits, one for the account"
        );
        assert_eq!(store.map.borrow().len(), 3, "two records + the anchor");
        assert!(admitted(&l.admit(&checks, NOW, &mut n)));
        // The API slot (2 a minute) refuses the third: nothing is taken from the key's own
        // slot or from the account.
        let key_before = store.tat_at("k", 0);
        let account_before = store.tat("a");
        match l.admit(&checks, NOW, &mut n) {
            Admission::Limited { quota, .. } => assert_eq!(quota.kind, LimitKind::KeyApi),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.tat_at("k", 0), key_before);
        assert_eq!(store.tat("a"), account_before);
        // Another API of the same key has its own slot; the key's own rate (3) still binds.
        let other_api = [
            slotted("k", 9, 2, LimitKind::KeyApi),
            slotted("k", 0, 3, LimitKind::Key),
        ];
        assert!(admitted(&l.admit(&other_api, NOW, &mut n)));
        match l.admit(&other_api, NOW, &mut n) {
            Admission::Limited { quota, .. } => assert_eq!(quota.kind, LimitKind::Key),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.tat_at("k", 9),
            Some(NOW + 30 * SEC),
            "slot 9 took exactly one"
        );
    }

    #[test]
    fn a_later_refusal_gives_back_every_slot_of_a_subject_in_one_write() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let mut n = Counters::default();
        let checks = [
            slotted("k", 5, 10, LimitKind::KeyApi),
            slotted("k", 0, 10, LimitKind::Key),
            slotted("a", 0, 1, LimitKind::Account),
        ];
        assert!(admitted(&l.admit(&checks, NOW, &mut n)));
        let (api, key) = (store.tat_at("k", 5), store.tat_at("k", 0));
        let sets = store.sets.get();
        assert!(matches!(
            l.admit(&checks, NOW, &mut n),
            Admission::Limited { .. }
        ));
        assert_eq!((store.tat_at("k", 5), store.tat_at("k", 0)), (api, key));
        assert_eq!(
            store.sets.get() - sets,
            2,
            "take and give back, one write each"
        );
    }

    #[test]
    fn a_shadow_slot_counts_without_refusing_its_subject() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let mut n = Counters::default();
        let mut api = slotted("k", 3, 1, LimitKind::KeyApi);
        api.shadow = true;
        let checks = [api, slotted("k", 0, 10, LimitKind::Key)];
        assert!(admitted(&l.admit(&checks, NOW, &mut n)));
        match l.admit(&checks, NOW, &mut n) {
            Admission::Admitted { shadow_limited, .. } => {
                assert_eq!(shadow_limited, vec![LimitKind::KeyApi]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.tat_at("k", 0),
            Some(NOW + 12 * SEC),
            "the key took both"
        );
        assert_eq!(
            store.tat_at("k", 3),
            Some(NOW + 60 * SEC),
            "the shadow slot took one"
        );
    }

    #[test]
    fn records_stay_small_and_old_bytes_are_garbage() {
        let store = FakeStore::new();
        let l = limiter(&store);
        let mut n = Counters::default();
        for slot in 1..=200 {
            let c = [slotted("k", slot, 5, LimitKind::KeyApi)];
            assert!(admitted(&l.admit(&c, NOW, &mut n)));
        }
        let len = store.map.borrow()["k"].0.len();
        assert_eq!(len, 1 + 12 * MAX_ENTRIES, "bounded");
        // An hour later every entry has expired: the next write drops them.
        let c = [slotted("k", 1, 5, LimitKind::KeyApi)];
        assert!(admitted(&l.admit(&c, NOW + 60 * MIN, &mut n)));
        assert_eq!(store.map.borrow()["k"].0.len(), 1 + 12);
        // A value in another format (the one-TAT format of earlier versions) is garbage:
        // counted, repaired, and the configured outcome applies.
        let mut old = vec![1u8];
        old.extend_from_slice(&NOW.to_le_bytes());
        store.raw_set("k", &old);
        assert!(matches!(l.admit(&c, NOW, &mut n), Admission::StoreFailure));
        assert_eq!(n.garbage_values, 1);
        assert!(admitted(&l.admit(&c, NOW, &mut n)));
    }
}
