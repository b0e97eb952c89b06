//! Control-plane mode: the host calls of [`keygate_core::poller`] (the elected poller's state
//! machine): `dispatch_http_call` to the configured cluster with the edge token as Bearer, the
//! call's `:status` and body, the tick period, and its events as logs and stats.

use std::time::Duration;

use keygate_core::plugin::ControlPlane;
use keygate_core::poller::{Clock, Dispatch, Env, Event, Level, Request};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

use crate::host::{log, now_us, Ticks, VmState};
use crate::metrics::Metrics;

/// Envoy as the poller's host, for one callback.
struct Host<'a> {
    cp: &'a ControlPlane,
    metrics: &'a Metrics,
    ticks: &'a Ticks,
    /// The size of the answer's body being handled.
    body_size: usize,
}

struct EnvoyClock;

impl Clock for EnvoyClock {
    fn now_us(&self) -> u64 {
        now_us()
    }
}

impl Dispatch for Host<'_> {
    fn send(&mut self, request: &Request) -> Option<u32> {
        let cp = self.cp;
        let bearer = format!("Bearer {}", cp.token);
        let headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", &request.path),
            (":authority", &cp.authority),
            ("authorization", &bearer),
            ("accept", "application/json"),
        ];
        let timeout = Duration::from_millis(cp.timeout_ms);
        match hostcalls::dispatch_http_call(&cp.cluster, headers, None, vec![], timeout) {
            Ok(token) => Some(token),
            Err(status) => {
                let cluster = &cp.cluster;
                let msg = format!("control plane fetch not sent (cluster {cluster:?}): {status:?}");
                log(Level::Warn, &msg);
                None
            }
        }
    }

    fn status(&mut self) -> Vec<u8> {
        hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
            .ok()
            .and_then(|h| h.into_iter().find(|(n, _)| n == ":status").map(|(_, v)| v))
            .unwrap_or_default()
    }

    fn body(&mut self) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, self.body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn tick_every(&mut self, ms: u64) {
        self.ticks.set_base(Some(ms));
    }

    fn report(&mut self, event: Event) {
        self.metrics.record(event.stats());
        if let Some((level, line)) = event.log_line() {
            log(level, &line);
        }
    }
}

/// Runs `f` (a tick, or the answer to a call whose body is `body_size` bytes) on the poller
/// with Envoy as its host.
pub fn run(vm: &VmState, cp: &ControlPlane, body_size: usize, f: impl FnOnce(&mut Env<'_>)) {
    let mut host = Host {
        cp,
        metrics: &vm.metrics,
        ticks: &vm.ticks,
        body_size,
    };
    f(&mut Env {
        store: vm,
        vm_id: vm.vm_id.get(),
        control_plane: cp,
        clock: &EnvoyClock,
        dispatch: &mut host,
    });
}
