//! In-flight (concurrency) limits per account, in the shared CAS store.
//!
//! One store value per account holds a small table of leases, one per VM that has requests of that
//! account in flight: `(vm_id, count, heartbeat)`. The account's in-flight total is the sum over
//! live leases. A VM counts up when it admits a request and down when the stream ends, however it
//! ends; while it has requests in flight it refreshes its heartbeat from a timer. A VM that crashed
//! or was replaced stops refreshing, and its lease is ignored and pruned once `lease_s` old, so a
//! dead VM cannot hold slots forever. The table is bounded by the number of live VMs (plus dead
//! ones until pruned), never by the number of requests or by time.

use crate::ratelimit::Counters;
use crate::store::{
    compare_and_swap, Change, SetError, SharedStore, StoreError, LEASES_TAG, VM_SEQ_KEY,
};

/// Seconds after which a VM's in-flight lease stops counting unless refreshed.
pub const INFLIGHT_LEASE_S: u64 = 10;
/// How often a VM with requests in flight should refresh its leases
/// ([`crate::local::HeldSlots::heartbeat`]).
pub const INFLIGHT_HEARTBEAT_S: u64 = 2;

/// A slot held for the request's lifetime; give it back with [`crate::gate::release`] when the stream ends.
/// It carries what giving it back needs, so the stream's end needs no config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightTicket {
    pub store_key: String,
    /// The compare-and-swap tries of the config that took the slot.
    pub max_cas_retries: u32,
    /// The account's limit when the slot was taken (whether the VM may keep it idle).
    pub limit: u32,
}

impl InflightTicket {
    /// Gives the slot back in the shared record (the VM `vm_id`'s lease on the account).
    pub fn give_back(
        &self,
        store: &dyn SharedStore,
        vm_id: u64,
        now_s: u64,
        counters: &mut Counters,
    ) {
        let slots = Inflight {
            store,
            max_retries: self.max_cas_retries,
            lease_s: INFLIGHT_LEASE_S,
            vm_id,
        };
        slots.release(&self.store_key, 1, now_s, counters);
    }
}

/// Value format: [`LEASES_TAG`], then entries of `vm_id u64, count u32, heartbeat_s u64` (LE).
const ENTRY: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    vm_id: u64,
    count: u32,
    heartbeat_s: u64,
}

fn encode(leases: &[Lease]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + leases.len() * ENTRY);
    v.push(LEASES_TAG);
    for l in leases {
        v.extend_from_slice(&l.vm_id.to_le_bytes());
        v.extend_from_slice(&l.count.to_le_bytes());
        v.extend_from_slice(&l.heartbeat_s.to_le_bytes());
    }
    v
}

fn decode(bytes: &[u8]) -> Option<Vec<Lease>> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != LEASES_TAG || rest.len() % ENTRY != 0 {
        return None;
    }
    let u64_at = |c: &[u8], at: usize| {
        c.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let u32_at = |c: &[u8], at: usize| {
        c.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
    };
    rest.chunks_exact(ENTRY)
        .map(|c| {
            Some(Lease {
                vm_id: u64_at(c, 0)?,
                count: u32_at(c, 8)?,
                heartbeat_s: u64_at(c, 12)?,
            })
        })
        .collect()
}

/// This VM's identity for leases: the next value of the process's counter ([`VM_SEQ_KEY`],
/// created with an insert-if-absent), or 0 if the store does not answer.
pub fn next_vm_id(store: &dyn SharedStore) -> u64 {
    compare_and_swap(store, VM_SEQ_KEY, 64, |value| {
        let prev = value
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map_or(0, u64::from_le_bytes);
        let next = prev.wrapping_add(1);
        Some(Change::Write(next.to_le_bytes().to_vec(), next))
    })
    .unwrap_or(0)
}

/// Outcome of taking a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Acquired,
    /// The account already has `limit` requests in flight.
    Refused,
    /// The store could not answer (counted); the caller applies its store-error policy.
    Failed,
}

/// Concurrency slots over a shared store.
pub struct Inflight<'s, S: SharedStore + ?Sized> {
    pub store: &'s S,
    pub max_retries: u32,
    /// Age after which a VM's lease no longer counts.
    pub lease_s: u64,
    /// This VM's identity (unique per VM instance in the process).
    pub vm_id: u64,
}

enum Op {
    Acquire(u32),
    Release(u32),
    Heartbeat,
}

impl<S: SharedStore + ?Sized> Inflight<'_, S> {
    /// Takes a slot if the account has fewer than `limit` live requests in flight.
    pub fn acquire(&self, key: &str, limit: u32, now_s: u64, counters: &mut Counters) -> Acquire {
        self.acquire_counted(key, limit, now_s, counters).0
    }

    /// [`Inflight::acquire`], with the account's live total in flight after it.
    pub fn acquire_counted(
        &self,
        key: &str,
        limit: u32,
        now_s: u64,
        counters: &mut Counters,
    ) -> (Acquire, u32) {
        self.update(key, Op::Acquire(limit), now_s, counters)
    }

    /// Gives back `n` slots taken by this VM.
    pub fn release(&self, key: &str, n: u32, now_s: u64, counters: &mut Counters) {
        let _ = self.update(key, Op::Release(n), now_s, counters);
    }

    /// Refreshes this VM's lease (call periodically while it has requests in flight).
    pub fn heartbeat(&self, key: &str, now_s: u64, counters: &mut Counters) {
        let _ = self.update(key, Op::Heartbeat, now_s, counters);
    }

    /// The live in-flight total (for tests and stats).
    pub fn total(&self, key: &str, now_s: u64) -> Option<u32> {
        let (bytes, _) = self.store.get(key).ok()??;
        let leases = decode(&bytes)?;
        Some(
            leases
                .iter()
                .filter(|l| self.live(l, now_s))
                .map(|l| l.count)
                .sum(),
        )
    }

    fn live(&self, l: &Lease, now_s: u64) -> bool {
        l.vm_id == self.vm_id || l.heartbeat_s.saturating_add(self.lease_s) >= now_s
    }

    fn update(&self, key: &str, op: Op, now_s: u64, counters: &mut Counters) -> (Acquire, u32) {
        for attempt in 0..=self.max_retries {
            if attempt > 0 {
                counters.cas_retries += 1;
            }
            let (mut leases, cas) = match self.store.get(key) {
                Ok(Some((bytes, cas))) => match decode(&bytes) {
                    Some(l) => (l, cas),
                    None => {
                        counters.garbage_values += 1;
                        let _ = self.store.set(key, &encode(&[]), cas);
                        return (Acquire::Failed, 0);
                    }
                },
                Ok(None) => (Vec::new(), self.store.absent_cas()),
                Err(StoreError) => {
                    counters.store_errors += 1;
                    return (Acquire::Failed, 0);
                }
            };
            leases.retain(|l| self.live(l, now_s) && (l.count > 0 || l.vm_id == self.vm_id));
            let mine = match leases.iter().position(|l| l.vm_id == self.vm_id) {
                Some(i) => i,
                None => {
                    if matches!(op, Op::Release(_) | Op::Heartbeat) {
                        // Nothing of ours to give back or refresh (e.g. already pruned).
                        return (Acquire::Acquired, 0);
                    }
                    leases.push(Lease {
                        vm_id: self.vm_id,
                        count: 0,
                        heartbeat_s: now_s,
                    });
                    leases.len() - 1
                }
            };
            let total: u64 = leases.iter().map(|l| u64::from(l.count)).sum();
            let total = u32::try_from(total).unwrap_or(u32::MAX);
            match op {
                Op::Acquire(limit) => {
                    if total >= limit {
                        return (Acquire::Refused, total);
                    }
                    leases[mine].count += 1;
                    leases[mine].heartbeat_s = now_s;
                }
                Op::Release(n) => {
                    leases[mine].count = leases[mine].count.saturating_sub(n);
                    if leases[mine].count == 0 {
                        leases.remove(mine);
                    }
                }
                Op::Heartbeat => leases[mine].heartbeat_s = now_s,
            }
            match self.store.set(key, &encode(&leases), cas) {
                Ok(()) => {
                    let after = matches!(op, Op::Acquire(_));
                    return (Acquire::Acquired, total + u32::from(after));
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Other) => {
                    counters.store_errors += 1;
                    return (Acquire::Failed, 0);
                }
            }
        }
        counters.retries_exhausted += 1;
        (Acquire::Failed, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::FakeStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn vm(store: &FakeStore, id: u64) -> Inflight<'_, FakeStore> {
        Inflight {
            store,
            max_retries: 4,
            lease_s: 10,
            vm_id: id,
        }
    }

    #[test]
    fn slots_are_shared_across_vms_and_given_back() {
        let store = FakeStore::new();
        let (a, b) = (vm(&store, 1), vm(&store, 2));
        let mut n = Counters::default();
        assert_eq!(a.acquire("acc", 3, 100, &mut n), Acquire::Acquired);
        assert_eq!(b.acquire("acc", 3, 100, &mut n), Acquire::Acquired);
        assert_eq!(b.acquire("acc", 3, 100, &mut n), Acquire::Acquired);
        assert_eq!(a.acquire("acc", 3, 100, &mut n), Acquire::Refused);
        assert_eq!(a.total("acc", 100), Some(3));
        b.release("acc", 1, 101, &mut n);
        assert_eq!(a.acquire("acc", 3, 101, &mut n), Acquire::Acquired);
        assert_eq!(a.total("acc", 101), Some(3));
    }

    #[test]
    fn a_dead_vm_cannot_hold_slots_forever() {
        let store = FakeStore::new();
        let (dead, alive) = (vm(&store, 1), vm(&store, 2));
        let mut n = Counters::default();
        for _ in 0..2 {
            assert_eq!(dead.acquire("acc", 2, 100, &mut n), Acquire::Acquired);
        }
        assert_eq!(alive.acquire("acc", 2, 105, &mut n), Acquire::Refused);
        // The dead VM never heartbeats again; after the lease its slots are free.
        assert_eq!(alive.acquire("acc", 2, 111, &mut n), Acquire::Acquired);
        assert_eq!(alive.total("acc", 111), Some(1));
    }

    #[test]
    fn heartbeat_keeps_long_requests_counted() {
        let store = FakeStore::new();
        let (long, other) = (vm(&store, 1), vm(&store, 2));
        let mut n = Counters::default();
        assert_eq!(long.acquire("acc", 1, 100, &mut n), Acquire::Acquired);
        for t in (102..200).step_by(2) {
            long.heartbeat("acc", t, &mut n);
            assert_eq!(
                other.acquire("acc", 1, t, &mut n),
                Acquire::Refused,
                "t={t}"
            );
        }
    }

    #[test]
    fn conflicts_retry_and_garbage_is_repaired() {
        let store = FakeStore::new();
        let a = vm(&store, 1);
        let mut n = Counters::default();
        store.conflicts.set(2);
        assert_eq!(a.acquire("acc", 5, 100, &mut n), Acquire::Acquired);
        assert_eq!(n.cas_retries, 2);
        store.raw_set("bad", b"\x02short");
        assert_eq!(a.acquire("bad", 5, 100, &mut n), Acquire::Failed);
        assert_eq!(n.garbage_values, 1);
        assert_eq!(a.acquire("bad", 5, 100, &mut n), Acquire::Acquired);
        store.conflicts.set(100);
        assert_eq!(a.acquire("acc", 5, 100, &mut n), Acquire::Failed);
        assert_eq!(n.retries_exhausted, 1);
    }

    #[test]
    fn value_size_is_bounded_by_live_vms() {
        let store = FakeStore::new();
        let mut n = Counters::default();
        for round in 0..50u64 {
            // A new VM every round (reloads), each leaving one request in flight.
            let v = vm(&store, round + 10);
            assert_eq!(
                v.acquire("acc", 1000, round * 20, &mut n),
                Acquire::Acquired
            );
        }
        let (bytes, _) = store.get("acc").unwrap().unwrap();
        assert!(
            bytes.len() <= 1 + 2 * ENTRY,
            "only leases younger than the lease survive: {} bytes",
            bytes.len()
        );
    }
}
