//! What one VM keeps to itself between requests, so that most requests make no shared-data call:
//! its rate leases ([`RateLeases`]), its concurrency slots with the few it keeps for its next
//! requests ([`HeldSlots`]), and the client addresses it found clear of the failed-auth limiter
//! a moment ago ([`ClearAddresses`]). Single-threaded, like the VM; the filter holds one
//! [`VmLocal`] per VM and hands it to the gate through `crate::gate::Host::local`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;

use siphasher::sip128::{Hasher128 as _, SipHasher24};

use crate::concurrency::{Inflight, InflightTicket, INFLIGHT_LEASE_S};
use crate::digest::{Digest32, Digester};
use crate::ratelimit::lease::RateLeases;
use crate::ratelimit::Counters;
use crate::store::SharedStore;

/// A VM's own state for the request path.
#[derive(Debug, Default)]
pub struct VmLocal {
    pub rates: RateLeases,
    pub slots: HeldSlots,
    pub clear: ClearAddresses,
    pub digests: DigestMemo,
    pub usage: crate::usage::Usage,
}

impl VmLocal {
    /// With a digest memo keyed by `memo_key` (16 bytes from the host's random source); the
    /// default has none.
    pub fn with_memo_key(memo_key: [u8; 16]) -> VmLocal {
        VmLocal {
            digests: DigestMemo::keyed(memo_key),
            ..VmLocal::default()
        }
    }
}

/// Slots are kept for the VM's next requests only on accounts whose limit is at least this.
pub const POOL_MIN_LIMIT: u32 = 64;
/// At most this many idle slots kept per account per VM.
pub const POOL_MAX: u32 = 8;

/// This VM's side of an account's concurrency slots.
#[derive(Debug, Default, Clone, Copy)]
struct Account {
    /// Requests in flight here.
    in_flight: u32,
    /// Slots the record counts for this VM that no request holds: the next request takes one
    /// without a shared-data call.
    idle: u32,
    /// An idle slot was taken since the last heartbeat.
    used: bool,
    /// The account's total in flight (every VM) when this VM last wrote the record.
    total: u32,
}

/// The concurrency slots this VM holds, by account: what its heartbeat refreshes, and the idle
/// ones it keeps.
///
/// **Never more than the limit.** An idle slot stays counted in the shared record as this VM's
/// (its lease entry's count), so every VM still sees it taken; handing it to the VM's next
/// request changes nothing anyone else can see. A released slot is kept idle only when the
/// account's limit is at least [`POOL_MIN_LIMIT`], its total in flight was at most half of it at
/// this VM's last write, and fewer than [`POOL_MAX`] are idle here; an account near its limit
/// gives every slot back at once, as without the pool. Idle slots not used between two
/// heartbeats go back at the heartbeat.
#[derive(Debug, Default)]
pub struct HeldSlots(RefCell<HashMap<String, Account>>);

impl HeldSlots {
    /// Counts a slot an allowed request took.
    pub fn hold(&self, ticket: &InflightTicket) {
        let mut map = self.0.borrow_mut();
        map.entry(ticket.store_key.clone()).or_default().in_flight += 1;
    }

    /// Takes one of this VM's idle slots of the account (the caller then holds it with
    /// [`HeldSlots::hold`]).
    pub fn take_idle(&self, store_key: &str) -> bool {
        let mut map = self.0.borrow_mut();
        match map.get_mut(store_key) {
            Some(a) if a.idle > 0 => {
                a.idle -= 1;
                a.used = true;
                true
            }
            _ => false,
        }
    }

    /// What this VM's last write of the account's record found in flight.
    pub fn seen(&self, store_key: &str, total: u32) {
        let mut map = self.0.borrow_mut();
        map.entry(store_key.to_owned()).or_default().total = total;
    }

    /// Gives the slot back when the request's stream ends, however it ends: kept idle for this
    /// VM's next request when the account is far from its limit, else written back.
    /// `now_us` is read only if the slot is written back.
    pub fn release(
        &self,
        ticket: &InflightTicket,
        store: &dyn SharedStore,
        vm_id: u64,
        now_us: &dyn Fn() -> u64,
        counters: &mut Counters,
    ) {
        let keep = {
            let mut map = self.0.borrow_mut();
            let a = map.entry(ticket.store_key.clone()).or_default();
            a.in_flight = a.in_flight.saturating_sub(1);
            let far =
                ticket.limit >= POOL_MIN_LIMIT && u64::from(a.total) * 2 <= u64::from(ticket.limit);
            if far && a.idle < POOL_MAX {
                a.idle += 1;
                true
            } else {
                false
            }
        };
        if !keep {
            ticket.give_back(store, vm_id, now_us() / 1_000_000, counters);
        }
        let mut map = self.0.borrow_mut();
        if map
            .get(&ticket.store_key)
            .is_some_and(|a| a.in_flight == 0 && a.idle == 0)
        {
            map.remove(&ticket.store_key);
        }
    }

    /// Refreshes this VM's lease on every account with slots here, and gives back the idle
    /// slots no request took since the last heartbeat; `max_cas_retries` is asked only if there
    /// is one.
    pub fn heartbeat(
        &self,
        max_cas_retries: &mut dyn FnMut() -> u32,
        store: &dyn SharedStore,
        vm_id: u64,
        now_us: u64,
        counters: &mut Counters,
    ) {
        let held: Vec<(String, u32)> = {
            let mut map = self.0.borrow_mut();
            let mut out = Vec::new();
            for (key, a) in map.iter_mut() {
                let unused = if a.used { 0 } else { a.idle };
                a.idle -= unused;
                a.used = false;
                if a.in_flight + a.idle + unused > 0 {
                    out.push((key.clone(), unused));
                }
            }
            map.retain(|_, a| a.in_flight + a.idle > 0);
            out
        };
        if held.is_empty() {
            return;
        }
        let retries = max_cas_retries();
        let slots = Inflight {
            store,
            max_retries: retries,
            lease_s: INFLIGHT_LEASE_S,
            vm_id,
        };
        let now_s = now_us / 1_000_000;
        for (key, unused) in held {
            if unused > 0 {
                slots.release(&key, unused, now_s, counters);
            }
            slots.heartbeat(&key, now_s, counters);
        }
    }

    /// Slots in flight and idle on this VM for `store_key` (tests and stats).
    pub fn counts(&self, store_key: &str) -> (u32, u32) {
        (self.0.borrow().get(store_key)).map_or((0, 0), |a| (a.in_flight, a.idle))
    }
}

/// How long a client address found clear of the failed-auth limiter is not read again.
pub const CLEAR_TTL_US: u64 = 1_000_000;
/// Addresses remembered per VM (then the memory starts over).
pub const CLEAR_MAX: usize = 4096;

/// Client addresses whose failed-auth buckets had room a moment ago, so the pre-check does not
/// read them again for [`CLEAR_TTL_US`]. An address this VM records a failure for is forgotten
/// at once, so a guesser gains at most one attempt per VM per [`CLEAR_TTL_US`] over the limit
/// (the attempt that is then recorded), and a locked-out address is never remembered as clear.
#[derive(Debug, Default)]
pub struct ClearAddresses(RefCell<HashMap<IpAddr, u64>>);

impl ClearAddresses {
    pub fn is_clear(&self, ip: IpAddr, now_us: u64) -> bool {
        (self.0.borrow().get(&ip)).is_some_and(|&until| until > now_us)
    }

    pub fn mark(&self, ip: IpAddr, now_us: u64) {
        let mut map = self.0.borrow_mut();
        if map.len() >= CLEAR_MAX {
            map.clear();
        }
        map.insert(ip, now_us.saturating_add(CLEAR_TTL_US));
    }

    pub fn forget(&self, ip: IpAddr) {
        self.0.borrow_mut().remove(&ip);
    }
}

/// Digests remembered per VM.
pub const MEMO_MAX: usize = 4096;

/// The digests of secrets that authenticated on this VM, so a client presenting the same secret
/// again costs a SipHash instead of a SHA-256 (or HMAC). Entries are found by SipHash-2-4's
/// 128-bit output of the presented secret under a per-VM random key, and hold the digest and
/// which digest function made it ([`Digester::fingerprint`]); the decision then compares that
/// digest with the principal's, in constant time, exactly as it compares a fresh one. Only the
/// digests of secrets that authenticated are kept (a guesser cannot fill it), never a secret.
/// Without the key nobody can choose a secret that collides with a remembered one: a wrong secret
/// is taken for a remembered one with probability 2^-128 per try. A lookup that hits takes less
/// time than one that misses; that tells a client only that its secret authenticated recently,
/// which the reply tells it anyway.
#[derive(Debug, Default)]
pub struct DigestMemo {
    key: Option<[u8; 16]>,
    map: RefCell<HashMap<u128, (u64, Digest32)>>,
    /// The last miss: remembered if the secret authenticates.
    pending: RefCell<Option<(u128, u64, Digest32)>>,
}

impl DigestMemo {
    pub fn keyed(key: [u8; 16]) -> DigestMemo {
        DigestMemo {
            key: Some(key),
            ..DigestMemo::default()
        }
    }

    /// The digest of `secret` under `digester`, remembered or computed.
    pub fn digest(&self, digester: &Digester, secret: &[u8]) -> Digest32 {
        let Some(key) = &self.key else {
            return digester.digest(secret);
        };
        let mut hasher = SipHasher24::new_with_key(key);
        std::hash::Hasher::write(&mut hasher, secret);
        let id = hasher.finish128().as_u128();
        let fingerprint = digester.fingerprint();
        if let Some((f, d)) = self.map.borrow().get(&id) {
            if *f == fingerprint {
                self.pending.borrow_mut().take();
                return *d;
            }
        }
        let digest = digester.digest(secret);
        *self.pending.borrow_mut() = Some((id, fingerprint, digest));
        digest
    }

    /// The secret last digested (and missed) authenticated: remember its digest.
    pub fn authenticated(&self) {
        let Some((id, fingerprint, digest)) = self.pending.borrow_mut().take() else {
            return;
        };
        let mut map = self.map.borrow_mut();
        if map.len() >= MEMO_MAX {
            map.clear();
        }
        map.insert(id, (fingerprint, digest));
    }

    /// Forgets the last miss (a request that did not authenticate).
    pub fn forget_pending(&self) {
        self.pending.borrow_mut().take();
    }

    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DigestAlgorithm;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_memo_answers_only_for_secrets_that_authenticated_and_only_under_their_digester() {
        let memo = DigestMemo::keyed([7; 16]);
        let sha = Digester::Sha256;
        let good = b"sk_live_the_real_secret";
        let wrong = b"sk_live_not_the_secret!";
        // A guess that fails is not remembered.
        assert_eq!(memo.digest(&sha, wrong), sha.digest(wrong));
        memo.forget_pending();
        assert!(memo.is_empty());
        // One that authenticates is, and answers next time with the same digest.
        assert_eq!(memo.digest(&sha, good), sha.digest(good));
        memo.authenticated();
        assert_eq!(memo.len(), 1);
        assert_eq!(memo.digest(&sha, good), sha.digest(good));
        // A hit leaves nothing pending: a later `authenticated` adds nothing.
        memo.authenticated();
        assert_eq!(memo.len(), 1);
        // Another secret is digested afresh, never answered with the remembered digest.
        assert_eq!(memo.digest(&sha, wrong), sha.digest(wrong));
        // Under another digest function (an HMAC key) the remembered SHA-256 is not used.
        let hmac = Digester::new(DigestAlgorithm::HmacSha256, Some(&[9; 32])).unwrap();
        assert_ne!(hmac.fingerprint(), sha.fingerprint());
        assert_eq!(memo.digest(&hmac, good), hmac.digest(good));
        let other = Digester::new(DigestAlgorithm::HmacSha256, Some(&[8; 32])).unwrap();
        assert_ne!(other.fingerprint(), hmac.fingerprint());
    }

    #[test]
    fn without_a_key_there_is_no_memo_and_a_full_memo_starts_over() {
        let memo = DigestMemo::default();
        let sha = Digester::Sha256;
        assert_eq!(memo.digest(&sha, b"x"), sha.digest(b"x"));
        memo.authenticated();
        assert!(memo.is_empty());
        let memo = DigestMemo::keyed([1; 16]);
        for i in 0..MEMO_MAX + 1 {
            let _ = memo.digest(&sha, format!("secret{i}").as_bytes());
            memo.authenticated();
        }
        assert_eq!(memo.len(), 1, "cleared when full, then the last one");
    }
}
