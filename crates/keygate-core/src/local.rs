//! What one VM keeps to itself between requests, so that most requests make no shared-data call:
//! its rate leases ([`RateLeases`]), its concurrency slots with the few it keeps for its next
//! requests ([`HeldSlots`]), and the client addresses it found clear of the failed-auth limiter
//! a moment ago ([`ClearAddresses`]). Single-threaded, like the VM; the filter holds one
//! [`VmLocal`] per VM and hands it to the gate through [`crate::gate::Host::local`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;

use crate::concurrency::Inflight;
use crate::gate::{release, Host, InflightTicket, INFLIGHT_LEASE_S};
use crate::ratelimit::lease::RateLeases;
use crate::ratelimit::Counters;

/// A VM's own state for the request path.
#[derive(Debug, Default)]
pub struct VmLocal {
    pub rates: RateLeases,
    pub slots: HeldSlots,
    pub clear: ClearAddresses,
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
    pub fn release(&self, ticket: &InflightTicket, host: &dyn Host, counters: &mut Counters) {
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
            release(ticket, host, counters, 1);
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
        host: &dyn Host,
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
            store: host.store(),
            max_retries: retries,
            lease_s: INFLIGHT_LEASE_S,
            vm_id: host.vm_id(),
        };
        let now_s = host.now_us() / 1_000_000;
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
