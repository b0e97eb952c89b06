//! The host as keygate-core sees it: Envoy shared data as a [`SharedStore`], the request's view
//! ([`Host`]), and the byte-level reads the request path needs.

use std::cell::{Cell, OnceCell};
use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use keygate_core::concurrency::next_vm_id;
use keygate_core::gate::{shared_failed_auth_key, FailedAuthKey, Host};
use keygate_core::ip::parse_client_address;
use keygate_core::local::VmLocal;
use keygate_core::poller::Level;
use keygate_core::store::{SetError, SharedStore, StoreError, ANCHOR_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, Status};

use crate::metrics::Metrics;

/// Per-VM state shared by the root context and every HTTP context of this VM: the shared-data
/// anchor, the VM id, its leases and slots, the failed-auth key, the stats' ids and the tick.
pub struct VmState {
    anchor_cas: Cell<u32>,
    pub vm_id: Cell<u64>,
    /// What this VM keeps between requests: rate leases, concurrency slots, clear addresses.
    pub local: VmLocal,
    /// The process's failed-auth hashing key, once this VM has read (or created) it.
    failed_auth_key: OnceCell<FailedAuthKey>,
    pub metrics: Metrics,
    /// The root's tick period.
    pub ticks: Ticks,
}

/// The root's one tick period, the shortest of three: the poller's (or the concurrency
/// heartbeat's), the fleet leases' and [`FLUSH_MS`] (always on: the counters are flushed on
/// every tick); the poller's work runs at its own period ([`Ticks::base_due`]).
#[derive(Default)]
pub struct Ticks {
    base_ms: Cell<u64>,
    fleet_ms: Cell<u64>,
    last_base_us: Cell<u64>,
}

/// The longest a VM waits to add what it counted to Envoy's counters.
pub const FLUSH_MS: u64 = 250;

impl Ticks {
    /// The poller's or heartbeat's period (`None`: no such work).
    pub fn set_base(&self, ms: Option<u64>) {
        self.base_ms.set(ms.unwrap_or(0));
        self.apply();
    }

    /// The fleet leases' period (`None`: no leases).
    pub fn set_fleet(&self, ms: Option<u64>) {
        self.fleet_ms.set(ms.unwrap_or(0));
        self.apply();
    }

    fn apply(&self) {
        let period = [self.base_ms.get(), self.fleet_ms.get(), FLUSH_MS]
            .into_iter()
            .filter(|ms| *ms > 0)
            .min()
            .unwrap_or(FLUSH_MS);
        let _ = hostcalls::set_tick_period(Duration::from_millis(period));
    }

    /// Whether this tick runs the poller's work (at its own period, not a shorter one).
    pub fn base_due(&self, now_us: u64) -> bool {
        due(&self.last_base_us, self.base_ms.get(), now_us)
    }
}

/// Whether work of period `ms` (0: none) last run at `last` is due at `now_us`; if so, records
/// that it runs now.
fn due(last: &Cell<u64>, ms: u64, now_us: u64) -> bool {
    let period_us = ms.saturating_mul(1000);
    if period_us == 0 {
        return false;
    }
    // A tick early by up to a millisecond still counts (ticks are not exact).
    if now_us.saturating_sub(last.get()) + 1000 < period_us {
        return false;
    }
    last.set(now_us);
    true
}

/// Envoy shared data as keygate-core's [`SharedStore`]; the anchor CAS lives in the VM state.
impl SharedStore for VmState {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), Some(cas))) => Ok(Some((v, cas))),
            Ok((Some(v), None)) => Ok(Some((v, 0))),
            Ok((None, _)) => Ok(None),
            Err(_) => Err(StoreError),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        match hostcalls::set_shared_data(key, Some(value), Some(cas)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Other),
        }
    }

    fn absent_cas(&self) -> u32 {
        self.anchor_cas.get()
    }
}

impl VmState {
    pub fn start() -> VmState {
        let state = VmState {
            anchor_cas: Cell::new(0),
            vm_id: Cell::new(0),
            // Without a random key there is no digest memo (every secret is digested).
            local: random_key().map_or_else(VmLocal::default, VmLocal::with_memo_key),
            failed_auth_key: OnceCell::new(),
            metrics: Metrics::define(),
            ticks: Ticks::default(),
        };
        let _ = hostcalls::set_shared_data(ANCHOR_KEY, Some(b"1"), None);
        if let Ok((_, Some(cas))) = hostcalls::get_shared_data(ANCHOR_KEY) {
            state.anchor_cas.set(cas);
        }
        state.vm_id.set(next_vm_id(&state));
        state
    }
}

/// The gate's view of the host for one request.
pub struct RequestHost<'a> {
    vm: &'a VmState,
    /// The clock, read when first asked (a stream's end often needs none).
    now_us: OnceCell<u64>,
    /// The client address, read when the gate first asks.
    client_ip: OnceCell<Option<IpAddr>>,
}

impl<'a> RequestHost<'a> {
    /// A view that reads the clock when first asked.
    pub fn new(vm: &'a VmState) -> RequestHost<'a> {
        RequestHost {
            vm,
            now_us: OnceCell::new(),
            client_ip: OnceCell::new(),
        }
    }

    /// A view at a clock reading the caller already has (one host call per request, not two).
    pub fn at(vm: &'a VmState, now: u64) -> RequestHost<'a> {
        RequestHost {
            vm,
            now_us: OnceCell::from(now),
            client_ip: OnceCell::new(),
        }
    }
}

impl Host for RequestHost<'_> {
    fn now_us(&self) -> u64 {
        *self.now_us.get_or_init(now_us)
    }

    fn client_ip(&self) -> Option<IpAddr> {
        *self.client_ip.get_or_init(|| {
            let address = hostcalls::get_property(vec!["source", "address"]).ok()??;
            parse_client_address(&address)
        })
    }

    fn store(&self) -> &dyn SharedStore {
        self.vm
    }

    fn vm_id(&self) -> u64 {
        self.vm.vm_id.get()
    }

    fn local(&self) -> Option<&VmLocal> {
        Some(&self.vm.local)
    }

    /// The key in shared data (`kg:fa:key`), created by the first VM of the process that needs
    /// it from WASI `random_get`; cached per VM once read.
    fn failed_auth_key(&self) -> Option<FailedAuthKey> {
        if let Some(key) = self.vm.failed_auth_key.get() {
            return Some(key.clone());
        }
        let key = shared_failed_auth_key(self.vm, &mut random_key)?;
        let _ = self.vm.failed_auth_key.set(key.clone());
        Some(key)
    }
}

/// 16 bytes from the host's random source (WASI `random_get`, which Envoy implements).
fn random_key() -> Option<[u8; 16]> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).ok()?;
    Some(bytes)
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// All of a header map (request headers, request trailers, ...) in proxy-wasm's serialized form,
/// as bytes. The SDK's own getter decodes names with `unwrap`; this one leaves every byte to the
/// panic-free parser in keygate-core.
pub fn header_map(map: MapType) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to a buffer it allocated through this module's exported
    // allocator (proxy_on_memory_allocate) and its size; we take ownership of exactly that.
    unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => Vec::new(),
        }
    }
}

/// Logs `msg` at the core's `level`.
pub fn log(level: Level, msg: &str) {
    let level = match level {
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    };
    let _ = hostcalls::log(level, msg);
}

pub fn now_us() -> u64 {
    // Without a clock every time-limited secret must fail closed: pretend it is the far future.
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
        })
}
