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

/// Errors of the shared store other than a CAS mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreError;

/// Outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    Other,
}

/// The host's shared key-value store with compare-and-swap (Envoy shared data).
pub trait SharedStore {
    /// The value and its CAS, or `None` if the key does not exist.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `value` if the key's current CAS is `cas`; a missing key is always inserted.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
    /// A non-zero CAS that belongs to another key, used to create missing subjects.
    fn absent_cas(&self) -> u32;
}

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
    /// Shared-data key of the subject.
    pub store_key: String,
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
        /// Indices of the checks that actually took a request (for [`Limiter::give_back`]).
        taken: Vec<usize>,
    },
    /// Refused by `quota.kind`; retry after `retry_after_s` seconds.
    Limited { quota: Quota, retry_after_s: u64 },
    /// The store failed and the configured outcome is to deny.
    StoreFailure,
}

/// Value format: tag byte 1, then the TAT in µs, little-endian.
const TAG: u8 = 1;

fn encode(tat_us: u64) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[0] = TAG;
    v[1..].copy_from_slice(&tat_us.to_le_bytes());
    v
}

fn decode(bytes: &[u8]) -> Option<u64> {
    match bytes {
        [TAG, rest @ ..] if rest.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(rest);
            Some(u64::from_le_bytes(b))
        }
        _ => None,
    }
}

/// The limiter: store, retry bound and failure policy.
pub struct Limiter<'s, S: SharedStore + ?Sized> {
    pub store: &'s S,
    pub max_retries: u32,
    pub on_store_error: OnStoreError,
}

/// Result of one subject's update.
enum Step {
    Admitted { tat_after: u64 },
    Refused { tat: u64 },
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
    /// Takes one request from every check, all or nothing.
    pub fn admit(&self, checks: &[Check], now_us: u64, counters: &mut Counters) -> Admission {
        let mut taken: Vec<usize> = Vec::with_capacity(checks.len());
        let mut tightest: Option<Quota> = None;
        let mut shadow_limited = Vec::new();
        for (i, check) in checks.iter().enumerate() {
            match self.take(check, now_us, counters) {
                Step::Admitted { tat_after } => {
                    taken.push(i);
                    let q = quota(check, tat_after, now_us);
                    if tightest.is_none_or(|t| q.remaining < t.remaining) {
                        tightest = Some(q);
                    }
                }
                Step::Refused { .. } if check.shadow => shadow_limited.push(check.kind),
                Step::Refused { tat } => {
                    self.give_back(checks, &taken, now_us, counters);
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
                    if self.on_store_error == OnStoreError::Deny && !check.shadow {
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
                Some(t) => t,
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

    fn take(&self, check: &Check, now: u64, counters: &mut Counters) -> Step {
        let t = check.rate.interval_us();
        for attempt in 0..=self.max_retries {
            if attempt > 0 {
                counters.cas_retries += 1;
            }
            let (tat, cas) = match self.store.get(&check.store_key) {
                Ok(Some((bytes, cas))) => match decode(&bytes) {
                    Some(tat) => (tat, cas),
                    None => {
                        // Unreadable: count it, repair it (so the subject is not stuck), and
                        // let the configured outcome decide this request.
                        counters.garbage_values += 1;
                        let _ = self.store.set(&check.store_key, &encode(now), cas);
                        return Step::Failed;
                    }
                },
                Ok(None) => (0, self.store.absent_cas()),
                Err(StoreError) => {
                    counters.store_errors += 1;
                    return Step::Failed;
                }
            };
            let base = tat.max(now);
            if base - now > check.rate.tolerance_us() {
                return Step::Refused { tat: base };
            }
            let tat_after = base + t;
            match self.store.set(&check.store_key, &encode(tat_after), cas) {
                Ok(()) => return Step::Admitted { tat_after },
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

    /// Undoes the takes of an admission (`taken` indexes `checks`) after a later, separate
    /// limit refused: moves each TAT back by `T` (never below `now`).
    pub fn give_back(&self, checks: &[Check], taken: &[usize], now: u64, counters: &mut Counters) {
        for &i in taken {
            let check = &checks[i];
            for attempt in 0..=self.max_retries {
                if attempt > 0 {
                    counters.cas_retries += 1;
                }
                let Ok(Some((bytes, cas))) = self.store.get(&check.store_key) else {
                    break;
                };
                let Some(tat) = decode(&bytes) else { break };
                let back = tat.saturating_sub(check.rate.interval_us()).max(now);
                match self.store.set(&check.store_key, &encode(back), cas) {
                    Ok(()) => break,
                    Err(SetError::CasMismatch) => continue,
                    Err(SetError::Other) => break,
                }
            }
        }
    }
}

/// Test support: a fake of Envoy shared data with the host's exact CAS rules and fault injection.
pub mod testing {
    use super::{decode, SetError, SharedStore, StoreError};
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// A fake of Envoy shared data with the host's exact CAS rules, and fault injection.
    #[derive(Default)]
    pub struct FakeStore {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        /// Number of upcoming `set`s that fail with a CAS mismatch (a racing writer).
        pub conflicts: Cell<u32>,
        pub fail_gets: Cell<bool>,
        pub sets: Cell<u32>,
    }

    impl FakeStore {
        pub fn new() -> FakeStore {
            let s = FakeStore {
                next_cas: Cell::new(1),
                ..FakeStore::default()
            };
            // The anchor whose CAS serves as the absent CAS.
            let _ = s.set("anchor", b"", 0);
            s
        }
        fn cas(&self) -> u32 {
            let c = self.next_cas.get();
            self.next_cas.set(c + 1);
            c
        }
        pub fn raw_set(&self, key: &str, v: &[u8]) {
            let c = self.cas();
            self.map
                .borrow_mut()
                .insert(key.to_owned(), (v.to_vec(), c));
        }
        pub fn tat(&self, key: &str) -> Option<u64> {
            self.map.borrow().get(key).and_then(|(v, _)| decode(v))
        }
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            if self.fail_gets.get() {
                return Err(StoreError);
            }
            Ok(self.map.borrow().get(key).cloned())
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            self.sets.set(self.sets.get() + 1);
            if self.conflicts.get() > 0 {
                self.conflicts.set(self.conflicts.get() - 1);
                // A racing writer got there first: it bumps the CAS.
                let current = self.map.borrow().get(key).cloned();
                if let Some((v, _)) = current {
                    let c = self.cas();
                    self.map.borrow_mut().insert(key.to_owned(), (v, c));
                }
                return Err(SetError::CasMismatch);
            }
            let current = self.map.borrow().get(key).map(|(_, c)| *c);
            if let Some(cur) = current {
                if cas != 0 && cas != cur {
                    return Err(SetError::CasMismatch);
                }
            }
            let c = self.cas();
            self.map
                .borrow_mut()
                .insert(key.to_owned(), (value.to_vec(), c));
            Ok(())
        }
        fn absent_cas(&self) -> u32 {
            self.map.borrow().get("anchor").map_or(0, |(_, c)| *c)
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FakeStore;
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: u64 = 1_000_000;
    const MIN: u64 = 60 * SEC;
    const NOW: u64 = 1_700_000_000 * SEC;

    fn check(key: &str, requests: u32, period_us: u64, kind: LimitKind) -> Check {
        Check {
            store_key: key.into(),
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
        store.set("new", &encode(NOW + 1), absent).unwrap();
        assert_eq!(
            store.set("new", &encode(NOW + 2), absent),
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
}
