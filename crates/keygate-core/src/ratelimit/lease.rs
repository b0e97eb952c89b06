//! Leases: a VM takes a batch of a subject's requests with the compare-and-swap that admits one,
//! then spends the batch from its own memory, with no shared-data call, until it is spent or
//! [`TTL_US`] old.
//!
//! **Never more than the limit.** The record holds every live lease `(slot, vm_id, count,
//! expiry)`; its tokens are charged to the slot's TAT when taken, and while a lease lives the
//! slot's TAT counts as at least `now + outstanding × T` for every other VM. So the tokens
//! anyone can take from the record, plus every VM's unspent lease, never exceed what GCRA holds
//! for the subject at that moment: the VMs together are one token bucket of capacity `L`
//! refilled at `1/T`, exactly the limit without leases. A VM spends a lease only before its
//! expiry; the unspent part goes back (TAT moved back by `unspent × T`) when the VM takes its
//! next lease on the slot, or from the root's tick once expired ([`RateLeases::sweep`]).
//!
//! **Only far from the limit.** A lease is taken only while at least [`MIN_LEFT`] requests are
//! left after the one being admitted, and is `left / DIVISOR` of them, at most [`MAX_LEASE`]. A
//! subject nearer its limit is taken request by request, as without leases, so a limit that is
//! reached is reached exactly (every exact-limit test with limits below 64 runs as before). What
//! leases can cost is the other side: requests refused while another VM holds unspent tokens,
//! at most the other VMs' leases, each under 1/16 of what was left when it was taken and
//! returned within [`TTL_US`] plus a tick.
//!
//! A lease is per VM (single-threaded): [`RateLeases`] lives in the filter's VM state and is
//! reached through [`Local`]; the control plane's door takes every request from its store.

use std::cell::RefCell;
use std::collections::HashMap;

use super::{compact, decode, encode, tat_of, upsert, Check, Counters, Rate, Record};
use crate::store::{SetError, SharedStore};

/// How long a VM may spend a lease.
pub const TTL_US: u64 = 1_000_000;
/// A lease is this fraction of what is left.
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
    pub count: u32,
    pub expiry_us: u64,
}

/// The lease to take when `left` requests remain after the one being admitted.
pub(super) fn extra(left: u64) -> u64 {
    if left < MIN_LEFT {
        return 0;
    }
    (left / DIVISOR).min(MAX_LEASE)
}

/// Tokens other VMs' live leases on `slot` hold (this VM's were taken out before).
pub(super) fn outstanding(record: &Record, slot: u32, now: u64) -> u64 {
    (record.leases.iter())
        .filter(|l| l.slot == slot && l.expiry_us > now)
        .map(|l| u64::from(l.count))
        .sum()
}

/// Ends this VM's leases on `slots`: their unspent tokens go back to the TAT, their entries go.
pub(super) fn give_back_held(record: &mut Record, held: &[Held], slots: &[u32], vm_id: u64) {
    for h in held.iter().filter(|h| slots.contains(&h.slot)) {
        let unspent = u64::from(h.granted.saturating_sub(h.spent));
        if unspent > 0 {
            let back = tat_of(&record.tats, h.slot)
                .saturating_sub(unspent.saturating_mul(h.rate.interval_us()));
            upsert(&mut record.tats, h.slot, back);
        }
    }
    (record.leases).retain(|e| !(e.vm_id == vm_id && slots.contains(&e.slot)));
}

/// A lease this VM holds on one slot of a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    slot: u32,
    /// The rate it was taken under (a lease of another rate is not spent, only given back).
    rate: Rate,
    granted: u32,
    spent: u32,
    expiry_us: u64,
    /// The slot's TAT after the request that took the lease, less the lease itself.
    tat_after: u64,
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
                    let t = h.rate.interval_us();
                    (i, h.tat_after + u64::from(h.spent) * t)
                })
                .collect(),
        )
    }

    /// After this VM's compare-and-swap on a subject: its leases on `slots` were given back and,
    /// if `extra` > 0, a new one of `extra` taken on each slot of `taken`.
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
        held.retain(|h| !slots.contains(&h.slot));
        if extra > 0 {
            held.extend(taken.iter().map(|&(i, tat_after)| Held {
                slot: checks[i].slot,
                rate: checks[i].rate,
                granted: extra,
                spent: 0,
                expiry_us: now + TTL_US,
                tat_after,
            }));
        }
        if held.is_empty() {
            map.remove(&first.store_key);
        }
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

    /// Subjects with a lease held.
    pub fn len(&self) -> usize {
        self.held.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.borrow().is_empty()
    }

    /// Ends every lease past its expiry (call from a tick): what one left unspent goes back to
    /// its record (one compare-and-swap per such subject), so memory holds only the leases of the
    /// last [`TTL_US`] and an idle VM holds no tokens. Returns the subjects given back to.
    pub fn sweep(
        &self,
        store: &dyn SharedStore,
        vm_id: u64,
        now: u64,
        max_retries: u32,
        counters: &mut Counters,
    ) -> usize {
        let mut ended: Vec<(String, Vec<Held>)> = Vec::new();
        self.held.borrow_mut().retain(|key, held| {
            let (old, live): (Vec<Held>, Vec<Held>) =
                held.iter().partition(|h| h.expiry_us <= now);
            if old.iter().any(|h| h.spent < h.granted) {
                ended.push((key.clone(), old));
            }
            *held = live;
            !held.is_empty()
        });
        let mut returned = 0;
        for (key, old) in &ended {
            let slots: Vec<u32> = old.iter().map(|h| h.slot).collect();
            for attempt in 0..=max_retries {
                if attempt > 0 {
                    counters.cas_retries += 1;
                }
                let Ok(Some((bytes, cas))) = store.get(key) else {
                    break;
                };
                let Some(mut record) = decode(&bytes) else {
                    break;
                };
                give_back_held(&mut record, old, &slots, vm_id);
                compact(&mut record, now);
                match store.set(key, &encode(&record), cas) {
                    Ok(()) => {
                        returned += 1;
                        break;
                    }
                    Err(SetError::CasMismatch) => continue,
                    Err(SetError::Other) => break,
                }
            }
        }
        returned
    }
}
