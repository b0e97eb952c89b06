//! Leases: a VM reserves a batch of a subject's requests with the compare-and-swap that admits
//! one, then spends the batch from its own memory, with no shared-data call, until it is spent
//! or [`TTL_US`] old.
//!
//! **Never more than the limit.** A lease is a reservation in the record, `(slot, vm_id,
//! reserved, expiry)`, with `reserved = count × T`. While it lives every VM counts it as taken
//! *now*: a slot's TAT is read as `max(TAT, now) + Σ reserved` of the other VMs' live leases, so
//! the record's free tokens plus every VM's unspent ones never exceed what GCRA holds. The
//! tokens a VM spends are charged to the TAT when the lease ends, at that moment (after every
//! request that spent them, which is never fewer than GCRA would charge): the VM ends it with
//! its next compare-and-swap on the subject or from the root's tick before it expires
//! ([`RateLeases::sweep`]), charging what it spent. A lease nobody ended (its VM gone, a tick
//! late) is charged whole at its expiry by the next writer. So the VMs together admit no more
//! than one bucket of capacity `L` refilled at `1/T`: exactly the limit without leases, as an
//! upper bound (the model test checks the admitted stream against GCRA).
//!
//! **Only far from the limit, and only as large as the VM uses.** A VM leases on a subject only
//! after a first request there without one, and while at least [`MIN_LEFT`] requests are left
//! after the one admitted; a lease is at most `left / DIVISOR` and [`MAX_LEASE`], and starts at 1,
//! doubling each time one is spent before its end, and falling to what was spent when one ends
//! unspent. A subject near its limit is taken request by request, as without leases, so a limit
//! that is reached is reached exactly (every exact-limit test with limits below 64 runs as
//! before). What leases can cost is the other side: requests refused while another VM holds
//! unspent reservations, at most their sum, each under 1/16 of what was left.
//!
//! A lease is per VM (single-threaded): [`RateLeases`] lives in the filter's VM state and is
//! reached through [`Local`]; the control plane's door takes every request from its store.

use std::cell::RefCell;
use std::collections::HashMap;

use super::{compact, rewrite, tat_of, upsert, Check, Counters, Rate, Record};
use crate::store::SharedStore;

/// How long a VM may spend a lease.
pub const TTL_US: u64 = 1_000_000;
/// How long a VM remembers how much it used of a subject's last lease.
pub const HISTORY_US: u64 = 2_000_000;
/// A lease is at most this fraction of what is left.
pub const DIVISOR: u64 = 16;
/// No lease unless at least this many requests are left after the one admitted.
pub const MIN_LEFT: u64 = 64;
/// The largest lease.
pub const MAX_LEASE: u64 = 64;
/// Live leases kept in one record (a VM finding it full takes request by request).
pub const MAX_ENTRIES: usize = 32;

/// A lease as the record holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub slot: u32,
    pub vm_id: u64,
    /// `count × T` of the slot's rate when taken.
    pub reserved_us: u64,
    pub expiry_us: u64,
}

/// Charges every lease of `record` past its expiry, whole, at its expiry (oldest first).
pub(super) fn fold_expired(record: &mut Record, now: u64) {
    let mut expired: Vec<Entry> = (record.leases.iter())
        .filter(|l| l.expiry_us <= now)
        .copied()
        .collect();
    if expired.is_empty() {
        return;
    }
    expired.sort_unstable_by_key(|l| l.expiry_us);
    for l in expired {
        let tat = tat_of(&record.tats, l.slot).max(l.expiry_us);
        upsert(&mut record.tats, l.slot, tat.saturating_add(l.reserved_us));
    }
    record.leases.retain(|l| l.expiry_us > now);
}

/// What the other VMs' live leases on `slot` reserve, in µs of its TAT.
pub(super) fn reserved(record: &Record, slot: u32, vm_id: u64, now: u64) -> u64 {
    (record.leases.iter())
        .filter(|l| l.slot == slot && l.vm_id != vm_id && l.expiry_us > now)
        .map(|l| l.reserved_us)
        .fold(0u64, u64::saturating_add)
}

/// Ends this VM's live leases on `slots` in `record`: each charges what it spent, now.
pub(super) fn end_mine(record: &mut Record, held: &[Held], slots: &[u32], vm_id: u64, now: u64) {
    for h in held
        .iter()
        .filter(|h| h.granted > 0 && slots.contains(&h.slot))
    {
        let live = (record.leases.iter())
            .any(|l| l.vm_id == vm_id && l.slot == h.slot && l.expiry_us > now);
        if live {
            let t = h.rate.interval_us();
            let tat = tat_of(&record.tats, h.slot).max(now);
            upsert(&mut record.tats, h.slot, tat + u64::from(h.spent) * t);
        }
    }
    (record.leases).retain(|e| !(e.vm_id == vm_id && slots.contains(&e.slot)));
}

/// The lease to take when `left` requests remain after the one being admitted and the VM's
/// use suggests `size`.
pub(super) fn extra(left: u64, size: u64) -> u64 {
    if left < MIN_LEFT {
        return 0;
    }
    (left / DIVISOR).min(MAX_LEASE).min(size)
}

/// A lease this VM holds on one slot of a subject (or, with `granted` 0, what it remembers of
/// its last one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    slot: u32,
    /// The rate it was taken under (a lease of another rate is not spent, only ended).
    rate: Rate,
    granted: u32,
    spent: u32,
    expiry_us: u64,
    /// The slot's TAT after the request that took the lease, reservations included.
    tat_after: u64,
    /// The size of the next lease.
    next: u32,
}

impl Held {
    /// The size of the next lease after this one: twice it if spent whole, what was spent if
    /// not, at least 1.
    fn grown(&self) -> u32 {
        match self.granted {
            0 => self.next.max(1),
            g if self.spent >= g => g.saturating_mul(2),
            _ => self.spent.max(1),
        }
    }
}

/// What the limiter needs of the VM it runs in.
pub struct Local<'a> {
    pub leases: &'a RateLeases,
    /// The VM's identity in lease entries (the concurrency slots' `vm_id`).
    pub vm_id: u64,
}

/// The leases one VM holds, by subject (store key).
#[derive(Debug, Default)]
pub struct RateLeases {
    held: RefCell<HashMap<String, Vec<Held>>>,
}

impl RateLeases {
    /// The leases held on `store_key`.
    pub(super) fn held(&self, store_key: &str) -> Vec<Held> {
        (self.held.borrow().get(store_key)).map_or_else(Vec::new, Clone::clone)
    }

    /// The size this VM's use suggests for its next lease on `slot` (0: it has not used the
    /// subject lately, so no lease).
    pub(super) fn size(held: &[Held], slot: u32) -> u64 {
        (held.iter().find(|h| h.slot == slot)).map_or(0, |h| u64::from(h.grown()))
    }

    /// Takes one request of every check of `group` (one subject) from this VM's leases, all or
    /// nothing: `(check index, TAT as this VM sees it)` of each, or `None` to go to the store.
    pub(super) fn spend(
        &self,
        checks: &[Check],
        group: &[usize],
        now: u64,
    ) -> Option<Vec<(usize, u64)>> {
        let first = checks.get(*group.first()?)?;
        let mut map = self.held.borrow_mut();
        let held = map.get_mut(&first.store_key)?;
        let mut at = Vec::with_capacity(group.len());
        for &i in group {
            let c = &checks[i];
            let h = held.iter().position(|h| {
                h.slot == c.slot && h.rate == c.rate && h.spent < h.granted && h.expiry_us > now
            });
            match h {
                Some(h) if !c.shadow => at.push((i, h)),
                _ => return None,
            }
        }
        Some(
            at.into_iter()
                .map(|(i, h)| {
                    let h = &mut held[h];
                    h.spent += 1;
                    (i, h.tat_after)
                })
                .collect(),
        )
    }

    /// After this VM's compare-and-swap on a subject: its leases on `slots` ended and, if
    /// `extra` > 0, a new one of `extra` was taken on each slot of `taken`; else it remembers
    /// the size for next time.
    pub(super) fn took(
        &self,
        checks: &[Check],
        taken: &[(usize, u64)],
        slots: &[u32],
        extra: u32,
        now: u64,
    ) {
        let Some(first) = taken.first().map(|(i, _)| &checks[*i]) else {
            return;
        };
        let mut map = self.held.borrow_mut();
        let held = map.entry(first.store_key.clone()).or_default();
        let before = held.clone();
        held.retain(|h| !slots.contains(&h.slot));
        held.extend(taken.iter().map(|&(i, tat_after)| {
            let slot = checks[i].slot;
            let next = (before.iter().find(|h| h.slot == slot)).map_or(1, Held::grown);
            Held {
                slot,
                rate: checks[i].rate,
                granted: extra,
                spent: 0,
                expiry_us: now + if extra > 0 { TTL_US } else { HISTORY_US },
                tat_after,
                next: if extra > 0 { extra } else { next },
            }
        }));
    }

    /// Gives back one request taken from the lease on `check`'s slot (a later limit refused the
    /// request); `false` if that lease is gone (then the store takes it back).
    pub(super) fn unspend(&self, check: &Check, now: u64) -> bool {
        let mut map = self.held.borrow_mut();
        let Some(held) = map.get_mut(&check.store_key) else {
            return false;
        };
        match held
            .iter_mut()
            .find(|h| h.slot == check.slot && h.spent > 0 && h.expiry_us > now)
        {
            Some(h) => {
                h.spent -= 1;
                true
            }
            None => false,
        }
    }

    /// Subjects with a lease held or remembered.
    pub fn len(&self) -> usize {
        self.held.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.borrow().is_empty()
    }

    /// Ends every lease that expires within `horizon_us` (call from a tick at most
    /// `horizon_us / 2` apart, so a lease is ended by its VM before it expires): one
    /// compare-and-swap per such subject charges what was spent. Forgets what is older than
    /// [`HISTORY_US`]. Returns the subjects written.
    pub fn sweep(
        &self,
        store: &dyn SharedStore,
        vm_id: u64,
        now: u64,
        horizon_us: u64,
        max_retries: u32,
        counters: &mut Counters,
    ) -> usize {
        let mut ending: Vec<(String, Vec<Held>)> = Vec::new();
        self.held.borrow_mut().retain(|key, held| {
            let due: Vec<Held> = (held.iter())
                .filter(|h| h.granted > 0 && h.expiry_us <= now + horizon_us)
                .copied()
                .collect();
            if due.iter().any(|h| h.expiry_us > now) {
                ending.push((key.clone(), due));
            }
            for h in held.iter_mut() {
                if h.granted > 0 && h.expiry_us <= now + horizon_us {
                    *h = Held {
                        next: h.grown(),
                        granted: 0,
                        spent: 0,
                        expiry_us: now + HISTORY_US,
                        ..*h
                    };
                }
            }
            held.retain(|h| h.expiry_us > now);
            !held.is_empty()
        });
        let mut written = 0;
        for (key, due) in &ending {
            let slots: Vec<u32> = due.iter().map(|h| h.slot).collect();
            let wrote = rewrite(store, key, max_retries, counters, |record| {
                fold_expired(record, now);
                end_mine(record, due, &slots, vm_id, now);
                compact(record, now);
            });
            written += usize::from(wrote);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Admission, Check, Counters, LimitKind, Limiter, OnStoreError, Rate};
    use super::*;
    use crate::store::testing::FakeStore;
    use crate::store::RATE_TAG;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: u64 = 1_000_000;
    const MS: u64 = 1_000;
    const NOW: u64 = 1_700_000_000 * SEC;
    /// The filter's tick, and the horizon it sweeps with.
    const TICK: u64 = 250 * MS;
    const HORIZON: u64 = 2 * TICK;

    fn check(key: &str, slot: u32, requests: u32, period_us: u64, kind: LimitKind) -> Check {
        Check {
            store_key: key.into(),
            slot,
            rate: Rate {
                requests,
                period_us,
            },
            kind,
            shadow: false,
        }
    }

    /// VM `vm` of a process whose VMs share `store`.
    fn limiter<'s>(
        store: &'s FakeStore,
        leases: &'s RateLeases,
        vm: u64,
    ) -> Limiter<'s, FakeStore> {
        Limiter {
            store,
            max_retries: 8,
            on_store_error: OnStoreError::Deny,
            local: Some(Local { leases, vm_id: vm }),
        }
    }

    fn admitted(a: &Admission) -> bool {
        matches!(a, Admission::Admitted { .. })
    }

    fn granted(leases: &RateLeases, key: &str) -> u32 {
        leases.held(key).first().map_or(0, |h| h.granted - h.spent)
    }

    /// Requests on VM `vm` at `now` until it holds a lease of `n` unspent on `c`'s subject.
    fn lease_up(store: &FakeStore, leases: &RateLeases, vm: u64, c: &[Check], n: u32, now: u64) {
        let mut counters = Counters::default();
        for _ in 0..200 {
            if granted(leases, &c[0].store_key) == n {
                return;
            }
            assert!(admitted(&limiter(store, leases, vm).admit(
                c,
                now,
                &mut counters
            )));
        }
        panic!("no lease of {n}");
    }

    /// A reference GCRA over the admitted stream: every admission must conform to `rate`
    /// on its own (one bucket of capacity L, refilled at 1/T), or the VMs together admitted
    /// more than the limit.
    fn conforms(rate: Rate, times: &mut [u64]) -> Result<(), String> {
        times.sort_unstable();
        let t = rate.interval_us();
        let tol = t * u64::from(rate.requests - 1);
        let mut tat = 0u64;
        for (n, &at) in times.iter().enumerate() {
            let base = tat.max(at);
            if base - at > tol {
                return Err(format!(
                    "admission {n} at +{} µs is over the limit",
                    at - NOW
                ));
            }
            tat = base + t;
        }
        Ok(())
    }

    /// xorshift64*, a fixed seedable order for the interleavings.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn many_vms_with_leases_never_admit_more_than_the_limit() {
        // 6 VMs (Envoy at 4 workers), a key rate and a key × API rate in one record and an
        // account rate, requests in random order at random small steps of time, bursts, pauses
        // within a lease's life and idle gaps; every VM sweeps on its tick, except that one VM's
        // ticks are sometimes late (its leases expire unswept), 30 orders.
        let key = Rate {
            requests: 3000,
            period_us: 60 * SEC,
        };
        // Fast rates: they refill more in a lease's life than a lease holds, so a lease that
        // were not counted against the other VMs would let them admit over it.
        let api = Rate {
            requests: 600,
            period_us: SEC,
        };
        let account = Rate {
            requests: 2500,
            period_us: 5 * SEC,
        };
        let mut leased = 0;
        for seed in 1..=30u64 {
            let store = FakeStore::new();
            let vms: Vec<RateLeases> = (0..6).map(|_| RateLeases::default()).collect();
            let checks = [
                check("k", 7, api.requests, api.period_us, LimitKind::KeyApi),
                check("k", 0, key.requests, key.period_us, LimitKind::Key),
                check(
                    "a",
                    0,
                    account.requests,
                    account.period_us,
                    LimitKind::Account,
                ),
            ];
            let mut state = seed * 0x9e37_79b9;
            let mut now = NOW;
            let mut next_tick = NOW + TICK;
            let mut times = Vec::new();
            let mut n = Counters::default();
            for _ in 0..12_000 {
                let r = next(&mut state);
                now += match r % 2000 {
                    0 => 3 * SEC,                   // idle: leases expire
                    1..=3 => 300_000 + r % 600_000, // a pause within a lease's life
                    4..=40 => r % 20_000,           // up to 20 ms
                    _ => r % 500,                   // a burst: 4,000 a second
                };
                while next_tick <= now {
                    for (v, leases) in vms.iter().enumerate() {
                        // VM 6's tick is late one time in three.
                        if v == 5 && next(&mut state).is_multiple_of(3) {
                            continue;
                        }
                        leases.sweep(&store, v as u64 + 1, next_tick, HORIZON, 8, &mut n);
                    }
                    next_tick += TICK;
                }
                let v = (r >> 32) as usize % vms.len();
                let l = limiter(&store, &vms[v], v as u64 + 1);
                if l.local
                    .as_ref()
                    .is_some_and(|l| l.leases.spend(&checks, &[0, 1], now).map(|_| ()).is_some())
                {
                    // Peeked: put it back, the admission below takes it again.
                    for c in &checks[..2] {
                        assert!(vms[v].unspend(c, now));
                    }
                    leased += 1;
                }
                if admitted(&l.admit(&checks, now, &mut n)) {
                    times.push(now);
                }
            }
            for rate in [key, api, account] {
                conforms(rate, &mut times.clone())
                    .unwrap_or_else(|e| panic!("seed {seed}, {rate:?}: {e}"));
            }
        }
        assert!(leased > 30 * 1000, "leases were used: {leased} requests");
    }

    #[test]
    fn a_lease_taken_before_the_bucket_refilled_still_counts_against_the_other_vms() {
        // 2,500 per 5 s (T = 2 ms). VM a holds a lease of 64 taken from a full bucket; 200 ms
        // later the bucket has refilled, and VM b bursts while a spends its lease: at that
        // instant the two together admit the burst capacity, not the capacity plus a's lease.
        let store = FakeStore::new();
        let (a, b) = (RateLeases::default(), RateLeases::default());
        let c = [check("acct", 0, 2500, 5 * SEC, LimitKind::Account)];
        let mut n = Counters::default();
        lease_up(&store, &a, 1, &c, 64, NOW);
        let used = store.sets.get(); // a's requests so far: fewer than 130
        let at = NOW + 200 * MS;
        let by_b = (0..3000)
            .filter(|_| admitted(&limiter(&store, &b, 2).admit(&c, at, &mut n)))
            .count();
        let by_a = (0..100)
            .filter(|_| admitted(&limiter(&store, &a, 1).admit(&c, at, &mut n)))
            .count();
        assert_eq!((by_b, by_a), (2500 - 64, 64), "{used}");
    }

    #[test]
    fn a_lease_its_vm_never_ended_is_charged_whole_at_its_expiry() {
        // VM a spends its whole lease of 64 just before it expires and never ends it (no tick):
        // b, right after the expiry, finds those 64 charged at the expiry, not refilled.
        let store = FakeStore::new();
        let (a, b) = (RateLeases::default(), RateLeases::default());
        let c = [check("acct", 0, 2500, 5 * SEC, LimitKind::Account)];
        let mut n = Counters::default();
        lease_up(&store, &a, 1, &c, 64, NOW);
        let expiry = a.held("acct")[0].expiry_us;
        let late = expiry - 1;
        let by_a = (0..64)
            .filter(|_| admitted(&limiter(&store, &a, 1).admit(&c, late, &mut n)))
            .count();
        assert_eq!(by_a, 64);
        let after = expiry + 1;
        let by_b = (0..3000)
            .filter(|_| admitted(&limiter(&store, &b, 2).admit(&c, after, &mut n)))
            .count();
        assert_eq!(by_b, 2500 - 64);
        let mut times = vec![late; 64];
        times.extend(std::iter::repeat_n(after, by_b));
        conforms(c[0].rate, &mut times).unwrap();
    }

    #[test]
    fn a_burst_on_every_vm_admits_exactly_the_limit() {
        // All at one instant, VMs in turn: every lease ends spent, so nothing is lost.
        for vms_n in [2usize, 4, 6] {
            let store = FakeStore::new();
            let vms: Vec<RateLeases> = (0..vms_n).map(|_| RateLeases::default()).collect();
            let c = [check("k", 0, 1000, 60 * SEC, LimitKind::Key)];
            let mut n = Counters::default();
            let ok = (0..3000)
                .filter(|i| {
                    let v = i % vms_n;
                    admitted(&limiter(&store, &vms[v], v as u64 + 1).admit(&c, NOW, &mut n))
                })
                .count();
            assert_eq!(ok, 1000, "{vms_n} VMs");
        }
    }

    #[test]
    fn near_the_limit_there_is_no_lease_and_the_record_is_as_without_leases() {
        let store = FakeStore::new();
        let leases = RateLeases::default();
        let c = [check("k", 0, 64, 60 * SEC, LimitKind::Key)];
        let mut n = Counters::default();
        let l = limiter(&store, &leases, 1);
        for _ in 0..64 {
            assert!(admitted(&l.admit(&c, NOW, &mut n)));
        }
        assert!(!admitted(&l.admit(&c, NOW, &mut n)));
        assert_eq!(granted(&leases, "k"), 0);
        assert_eq!(store.map.borrow()["k"].0[0], RATE_TAG, "no lease entry");
        assert_eq!(
            store.sets.get(),
            1 + 64,
            "one write per admission, as without leases"
        );
    }

    #[test]
    fn leases_start_at_one_and_double_while_spent_whole() {
        let store = FakeStore::new();
        let leases = RateLeases::default();
        let c = [check("k", 0, 1_000_000, 3600 * SEC, LimitKind::Key)];
        let mut n = Counters::default();
        let l = limiter(&store, &leases, 1);
        let mut grants = Vec::new();
        let sets = store.sets.get();
        for _ in 0..300 {
            let before = store.sets.get();
            assert!(admitted(&l.admit(&c, NOW, &mut n)));
            if store.sets.get() > before {
                grants.push(granted(&leases, "k"));
            }
        }
        assert_eq!(&grants[..9], &[0, 1, 2, 4, 8, 16, 32, 64, 64]);
        // 300 requests: 1 + 2 + 3 + 5 + 9 + 17 + 33 = 70 in 7 writes, then one per 65.
        assert_eq!(store.sets.get() - sets, 7 + (300u32 - 70).div_ceil(65));
    }

    #[test]
    fn a_vm_ends_its_lease_on_its_tick_and_another_vm_gets_what_it_left() {
        let store = FakeStore::new();
        let (a, b) = (RateLeases::default(), RateLeases::default());
        let c = [check("k", 0, 200, 60 * SEC, LimitKind::Key)];
        let mut n = Counters::default();
        // a: a request without a lease, then leases of 1, 2 and 4 spent whole, each taken with
        // a request, and one of 8 it does not spend.
        lease_up(&store, &a, 1, &c, 8, NOW);
        let by_a = 1 + (1 + 1) + (1 + 2) + (1 + 4) + 1;
        let by_b = (0..300)
            .filter(|_| admitted(&limiter(&store, &b, 2).admit(&c, NOW, &mut n)))
            .count();
        assert_eq!(by_b, 200 - by_a - 8, "a's lease is reserved");
        // a's tick, before the lease expires: the 8 go back, b gets exactly those.
        let tick = NOW + 600 * MS;
        assert_eq!(a.sweep(&store, 1, tick, HORIZON, 8, &mut n), 1);
        assert_eq!(granted(&a, "k"), 0);
        let refill = 600 * MS / (60 * SEC / 200); // what the bucket refilled meanwhile
        let by_b = (0..300)
            .filter(|_| admitted(&limiter(&store, &b, 2).admit(&c, tick, &mut n)))
            .count() as u64;
        assert_eq!(by_b, 8 + refill);
        // What a remembers: it used none of that lease, so its next is 1.
        assert_eq!(RateLeases::size(&a.held("k"), 0), 1);
    }

    #[test]
    fn a_request_refused_by_a_later_limit_gives_its_leased_token_back_to_the_lease() {
        let store = FakeStore::new();
        let leases = RateLeases::default();
        let key = check("k", 0, 10_000, 60 * SEC, LimitKind::Key);
        let account = check("a", 0, 1000, 60 * SEC, LimitKind::Account);
        let mut n = Counters::default();
        let l = limiter(&store, &leases, 1);
        lease_up(&store, &leases, 1, std::slice::from_ref(&key), 4, NOW);
        // The account (a separate subject, never used on this VM) is exhausted by another VM.
        let other = RateLeases::default();
        for _ in 0..1000 {
            assert!(admitted(&limiter(&store, &other, 2).admit(
                std::slice::from_ref(&account),
                NOW,
                &mut n
            )));
        }
        let both = [key.clone(), account];
        assert!(!admitted(&l.admit(&both, NOW, &mut n)));
        assert_eq!(
            granted(&leases, "k"),
            4,
            "the key's token went back to the lease"
        );
        let sets = store.sets.get();
        assert!(admitted(&l.admit(std::slice::from_ref(&key), NOW, &mut n)));
        assert_eq!(store.sets.get(), sets, "spent from the lease, no write");
        assert_eq!(granted(&leases, "k"), 3);
    }

    #[test]
    fn a_lease_of_another_rate_is_ended_not_spent() {
        let store = FakeStore::new();
        let leases = RateLeases::default();
        let mut n = Counters::default();
        let l = limiter(&store, &leases, 1);
        let old = [check("k", 0, 1000, 60 * SEC, LimitKind::Key)];
        lease_up(&store, &leases, 1, &old, 4, NOW);
        assert!(admitted(&l.admit(&old, NOW, &mut n)));
        let tat = store.tat("k").unwrap();
        // The config changes the key's rate: the next request goes to the store, which charges
        // the 1 spent of the old lease (T = 60 ms) and the request under the new rate (600 ms).
        let new = [check("k", 0, 100, 60 * SEC, LimitKind::Key)];
        let sets = store.sets.get();
        assert!(admitted(&l.admit(&new, NOW, &mut n)));
        assert_eq!(store.sets.get(), sets + 1);
        assert_eq!(store.tat("k").unwrap(), tat + 60 * MS + 600 * MS);
    }
}
