//! The host's shared store (Envoy shared data) as keygate sees it: the [`SharedStore`] trait with
//! compare-and-swap, its errors, the read-modify-write helper ([`compare_and_swap`]), and every
//! key keygate stores with the format of its value.
//!
//! Envoy's shared data is one key-value map per process, shared by every VM (workers and the
//! main thread). It cannot delete a key (only store an empty value), so no key is made from
//! something that grows without bound over time; every key keygate writes is in this list.
//! Values that can be read by another version of the filter start with a tag byte, so an
//! unknown layout reads as absent (or unreadable) instead of as something else.
//!
//! | key | value | written by |
//! |---|---|---|
//! | [`ANCHOR_KEY`] `kg:anchor` | `1`; only its CAS is used: the store's "absent CAS" ([`SharedStore::absent_cas`]) | every VM at start (the filter's `host`) |
//! | [`VM_SEQ_KEY`] `kg:vmseq` | the last VM identity handed out (u64) | every VM at start |
//! | [`FAILED_AUTH_KEY`] `kg:fa:key` | the process's [`crate::gate::FailedAuthKey`] (16 raw bytes) | [`crate::gate::shared_failed_auth_key`] |
//! | [`failed_auth_bucket_key`] `kg:fa:2:<bucket>` | a rate record ([`RATE_TAG`]) | the failed-auth limiter ([`crate::gate`]) |
//! | [`key_rate_key`] `kg:rl:2:k:<key SID>` | a rate record: slot 0 the key's own rate, [`crate::gate::api_slot`] per API | [`crate::gate`] via [`crate::ratelimit`] |
//! | [`account_rate_key`] `kg:rl:2:a:<account SID>` | a rate record (slot 0) | [`crate::gate`] via [`crate::ratelimit`] |
//! | [`account_inflight_key`] `kg:cc:1:a:<account SID>` | a lease table ([`LEASES_TAG`]) | [`crate::concurrency`] |
//! | [`POLLER_KEY`] `kg:cfg:poller` | the elected poller's VM id and heartbeat in seconds (u64, u64; no tag) | the filter's poller |
//! | [`HEAD_KEY`] `kg:cfg:head` | the published version in force ([`HEAD_TAG`]) | [`crate::published`] |
//! | [`EPOCH_KEY`] `kg:cfg:epoch` | the last epoch handed out ([`EPOCH_TAG`], u64) | [`crate::published`] |
//! | [`slot_state_key`] `kg:cfg:<slot>:state` | a slot's state ([`STATE_TAG`]) | [`crate::published`] |
//! | [`slot_settings_key`] `kg:cfg:<slot>:meta:-` | a slot's settings record ([`RECORD_TAG`], epoch, the version's settings, APIs and limits as JSON) | [`crate::published`] |
//! | [`put_bucket_key`] `kg:cfg:<slot>:b:<n>` | a bucket of published entries ([`BUCKET_TAG`]), or an empty value | [`crate::published`] |
//! | [`USAGE_KEY`] `kg:usage` | the process's usage counts and the batch being sent ([`USAGE_TAG`], then JSON: [`crate::usage::Record`]) | every VM's tick, the elected poller's sender ([`crate::usage`]) |
//!
//! Integers are little-endian. The value formats are described where they are encoded
//! (`ratelimit`, `concurrency`, `published::layout`). Keys made from a SID hold only SIDs a
//! config names (a published SID passes the SID alphabet check first), so their number follows
//! the live config.

use std::fmt::Write as _;

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

/// What a read-modify-write step makes of the value it read.
pub enum Change<T> {
    /// Store this value (if nobody wrote the key meanwhile) and answer `T`.
    Write(Vec<u8>, T),
    /// Answer `T` without writing.
    Keep(T),
}

/// Read, compute, compare-and-swap, up to `tries` times: `step` sees the current value (`None`
/// if the key is absent) and says what to store, or `None` to give up. A missing key is written
/// with the store's absent CAS, an insert-if-absent, so two writers cannot both create it. A
/// CAS mismatch (another writer got there first) reads again; a store error, `step` giving up
/// or running out of tries answers `None`.
pub fn compare_and_swap<T>(
    store: &dyn SharedStore,
    key: &str,
    tries: u32,
    mut step: impl FnMut(Option<&[u8]>) -> Option<Change<T>>,
) -> Option<T> {
    for _ in 0..tries {
        let (value, cas) = match store.get(key) {
            Ok(Some((v, cas))) => (Some(v), cas),
            Ok(None) => (None, store.absent_cas()),
            Err(StoreError) => return None,
        };
        match step(value.as_deref())? {
            Change::Keep(answer) => return Some(answer),
            Change::Write(new, answer) => match store.set(key, &new, cas) {
                Ok(()) => return Some(answer),
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Other) => return None,
            },
        }
    }
    None
}

/// Written at VM start; only its CAS is used (the absent CAS).
pub const ANCHOR_KEY: &str = "kg:anchor";
/// The counter handing out VM identities for concurrency leases.
pub const VM_SEQ_KEY: &str = "kg:vmseq";
/// The process's failed-auth hashing key (16 raw bytes).
pub const FAILED_AUTH_KEY: &str = "kg:fa:key";
/// The elected poller and its heartbeat.
pub const POLLER_KEY: &str = "kg:cfg:poller";
/// The published version in force.
pub const HEAD_KEY: &str = "kg:cfg:head";
/// The last epoch handed out to a published update.
pub const EPOCH_KEY: &str = "kg:cfg:epoch";
/// The process's usage counts and the batch being sent ([`crate::usage`]).
pub const USAGE_KEY: &str = "kg:usage";

/// One bucket of the failed-auth limiter.
pub fn failed_auth_bucket_key(bucket: u32) -> String {
    format!("kg:fa:2:{bucket}")
}

/// A key's rates (its own and its per-API rates, one slot each).
pub fn key_rate_key(key_sid: &str) -> String {
    format!("kg:rl:2:k:{key_sid}")
}

/// An account's rate.
pub fn account_rate_key(account_sid: &str) -> String {
    format!("kg:rl:2:a:{account_sid}")
}

/// An account's in-flight leases.
pub fn account_inflight_key(account_sid: &str) -> String {
    format!("kg:cc:1:a:{account_sid}")
}

/// A published slot's state.
pub fn slot_state_key(slot: u8) -> String {
    format!("kg:cfg:{slot}:state")
}

/// A published slot's settings record (its version's settings, APIs and limits).
pub fn slot_settings_key(slot: u8) -> String {
    format!("kg:cfg:{slot}:meta:-")
}

/// Writes `kg:cfg:<slot>:b:<n>` into `key` (reusing its buffer; a slot other than 0 is 1).
pub fn put_bucket_key(key: &mut String, slot: u8, n: u32) {
    key.clear();
    let _ = write!(key, "kg:cfg:{}:b:{n}", if slot == 0 { 0 } else { 1 });
}

/// A rate record: then `(slot u32, TAT in µs u64)` entries.
pub const RATE_TAG: u8 = 2;
/// A rate record on which VMs hold leases: then the TAT entries' count (u8), those entries and
/// `(slot u32, vm_id u64, count u32, expiry_us u64)` lease entries.
pub const RATE_LEASED_TAG: u8 = 13;
/// A lease table: then `(vm_id u64, count u32, heartbeat_s u64)` entries.
pub const LEASES_TAG: u8 = 2;
/// A published settings record: then its epoch (u64) and the payload.
pub const RECORD_TAG: u8 = 7;
/// The epoch counter: then the last epoch (u64).
pub const EPOCH_TAG: u8 = 9;
/// The published head, a slot's state and a bucket, of the layout with buckets. The head and
/// state of the layout before buckets (tags 6 and 8) read as absent, so a filter upgraded in a
/// running Envoy starts over.
pub const HEAD_TAG: u8 = 10;
pub const STATE_TAG: u8 = 11;
pub const BUCKET_TAG: u8 = 12;
/// The usage record: then JSON ([`crate::usage::Record`]).
pub const USAGE_TAG: u8 = 14;

/// Test support (the `testing` feature): a fake of Envoy shared data with the host's exact CAS
/// rules and fault injection.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::{SetError, SharedStore, StoreError};
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// A fake of Envoy shared data with the host's exact CAS rules, and fault injection (what a
    /// rate record holds: `ratelimit`'s `FakeStore::tat`).
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

#[cfg(test)]
mod tests {
    use super::testing::FakeStore;
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn bump(value: Option<&[u8]>) -> Option<Change<u8>> {
        let next = match value {
            Some([n]) => n.checked_add(1)?,
            Some(_) => return None,
            None => 1,
        };
        Some(Change::Write(vec![next], next))
    }

    #[test]
    fn compare_and_swap_creates_updates_and_reads_again_after_a_conflict() {
        let store = FakeStore::new();
        assert_eq!(compare_and_swap(&store, "k", 3, bump), Some(1));
        assert_eq!(compare_and_swap(&store, "k", 3, bump), Some(2));
        // Two racing writers: the third try wins, on top of what the racer left.
        store.conflicts.set(2);
        assert_eq!(compare_and_swap(&store, "k", 3, bump), Some(3));
        assert_eq!(store.map.borrow()["k"].0, vec![3]);
    }

    #[test]
    fn compare_and_swap_gives_up_on_conflicts_errors_and_its_step() {
        let store = FakeStore::new();
        store.conflicts.set(3);
        assert_eq!(compare_and_swap(&store, "k", 3, bump), None, "out of tries");
        assert_eq!(compare_and_swap(&store, "k", 3, bump), Some(1));
        store.raw_set("k", b"xy");
        let sets = store.sets.get();
        assert_eq!(compare_and_swap(&store, "k", 3, bump), None, "step gave up");
        assert_eq!(store.sets.get(), sets, "nothing written");
        let kept = compare_and_swap(&store, "k", 3, |v| Some(Change::Keep(v.map(<[u8]>::len))));
        assert_eq!(kept, Some(Some(2)));
        store.fail_gets.set(true);
        assert_eq!(compare_and_swap(&store, "k", 3, bump), None, "store error");
    }

    #[test]
    fn key_formats() {
        let mut bucket = String::from("left over");
        put_bucket_key(&mut bucket, 7, 12);
        assert_eq!(bucket, "kg:cfg:1:b:12");
        assert_eq!(slot_state_key(0), "kg:cfg:0:state");
        assert_eq!(slot_settings_key(1), "kg:cfg:1:meta:-");
        assert_eq!(key_rate_key("SK1"), "kg:rl:2:k:SK1");
        assert_eq!(account_rate_key("AC1"), "kg:rl:2:a:AC1");
        assert_eq!(account_inflight_key("AC1"), "kg:cc:1:a:AC1");
        assert_eq!(failed_auth_bucket_key(65535), "kg:fa:2:65535");
    }
}
