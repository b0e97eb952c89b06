//! Test support (the `testing` feature, never enabled by the filter): the one fake of the gate's
//! [`Host`], built with `with_*` methods, and the small helpers the core's tests and benches
//! share. The fake shared store itself is [`crate::store::testing::FakeStore`].

use std::cell::Cell;
use std::net::IpAddr;

use base64::Engine as _;

use crate::gate::{shared_failed_auth_key, FailedAuthKey, Host};
use crate::local::VmLocal;
pub use crate::store::testing::FakeStore;
use crate::store::SharedStore;

/// The tests' reference time, 2026-11-24T10:00:00Z ([`T0_STR`]), in Unix seconds.
pub const T0: u64 = 1_795_514_400;
/// [`T0`] as the config documents write it.
pub const T0_STR: &str = "2026-11-24T10:00:00Z";

/// An `Authorization` value `Basic base64(user ":" secret)`.
pub fn basic(user: &str, secret: &str) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
    format!("Basic {encoded}").into_bytes()
}

/// The gate's host with everything under the test's control: a [`FakeStore`], a clock that
/// moves only when told, the client address, the VM id, and the failed-auth key.
///
/// The fields are public so a test can move the clock or the client between requests
/// (`host.now_us.set(..)`, `host.ip.set(..)`) and inject store faults (`host.store.conflicts`).
pub struct FakeHost {
    pub store: FakeStore,
    /// Microseconds since the Unix epoch; starts at [`T0`].
    pub now_us: Cell<u64>,
    /// Starts at 203.0.113.9.
    pub ip: Cell<Option<IpAddr>>,
    pub vm_id: u64,
    /// What this host's random source gives for the shared failed-auth key (`None`: it fails).
    pub random: Cell<Option<[u8; 16]>>,
    /// A key used as it is, bypassing the shared store ([`FakeHost::with_failed_auth_key`]).
    fixed_key: Option<FailedAuthKey>,
    /// A VM's own state, as the filter has ([`FakeHost::with_local`]); none by default.
    pub local: Option<VmLocal>,
}

impl Default for FakeHost {
    fn default() -> FakeHost {
        FakeHost::new()
    }
}

impl FakeHost {
    /// A host at [`T0`], client 203.0.113.9, VM 1, its failed-auth key drawn with seed 1.
    pub fn new() -> FakeHost {
        FakeHost {
            store: FakeStore::new(),
            now_us: Cell::new(T0 * 1_000_000),
            ip: Cell::new(Some(IpAddr::from([203, 0, 113, 9]))),
            vm_id: 1,
            random: Cell::new(Some(key_bytes(1))),
            fixed_key: None,
            local: None,
        }
    }

    /// With a VM's own state (leases, kept slots, clear addresses, a digest memo), as in the
    /// filter.
    pub fn with_local(mut self) -> FakeHost {
        self.local = Some(VmLocal::with_memo_key(key_bytes(2)));
        self
    }

    /// The clock at `now_us` microseconds since the Unix epoch.
    pub fn with_now_us(self, now_us: u64) -> FakeHost {
        self.now_us.set(now_us);
        self
    }

    /// The client address Envoy computed (`None`: it has none).
    pub fn with_client_ip(self, ip: Option<IpAddr>) -> FakeHost {
        self.ip.set(ip);
        self
    }

    pub fn with_vm_id(mut self, vm_id: u64) -> FakeHost {
        self.vm_id = vm_id;
        self
    }

    /// The random source gives 16 bytes drawn from a generator seeded with `seed`, so the
    /// failed-auth key the store ends up holding is known to the test.
    pub fn with_key_seed(self, seed: u64) -> FakeHost {
        self.random.set(Some(key_bytes(seed)));
        self
    }

    /// The failed-auth key is `key`, as it is, without the shared store (as a benchmark wants:
    /// no store read for it).
    pub fn with_failed_auth_key(mut self, key: FailedAuthKey) -> FakeHost {
        self.fixed_key = Some(key);
        self
    }
}

impl Host for FakeHost {
    fn now_us(&self) -> u64 {
        self.now_us.get()
    }
    fn client_ip(&self) -> Option<IpAddr> {
        self.ip.get()
    }
    fn store(&self) -> &dyn SharedStore {
        &self.store
    }
    fn vm_id(&self) -> u64 {
        self.vm_id
    }
    fn local(&self) -> Option<&VmLocal> {
        self.local.as_ref()
    }
    // As the filter does: the process's key from the shared store, created on first use.
    fn failed_auth_key(&self) -> Option<FailedAuthKey> {
        match &self.fixed_key {
            Some(key) => Some(key.clone()),
            None => shared_failed_auth_key(&self.store, &mut || self.random.get()),
        }
    }
}

/// SplitMix64: a fixed, seedable stand-in for a random source.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 16 bytes from a SplitMix64 generator seeded with `seed`.
pub fn key_bytes(seed: u64) -> [u8; 16] {
    let mut state = seed;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&splitmix(&mut state).to_le_bytes());
    b[8..].copy_from_slice(&splitmix(&mut state).to_le_bytes());
    b
}
