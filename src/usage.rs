//! Usage in the glue: every VM adds what it counted into the process's record on the root's
//! tick, and the elected poller VM sends the process's batches ([`keygate_core::usage`]) with
//! `dispatch_http_call` (`POST /v1/edge/usage`, the edge token as Bearer).

use std::time::Duration;

use keygate_core::decision::Allow;
use keygate_core::plugin::ControlPlane;
use keygate_core::poller::{elect, Level};
use keygate_core::reason::Reason;
use keygate_core::usage::{flush, usage_path, Post, SendEvent, Sender};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

use crate::host::{log, now_us, VmState};

/// The batches' edge name when the plugin configuration gives no `edge_id`.
const DEFAULT_EDGE_NAME: &str = "edge";

struct Envoy<'a> {
    cp: &'a ControlPlane,
}

impl Post for Envoy<'_> {
    fn post(&mut self, body: &[u8]) -> Option<u32> {
        let cp = self.cp;
        let bearer = format!("Bearer {}", cp.token);
        let path = usage_path(&cp.path);
        let headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", &path),
            (":authority", &cp.authority),
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ];
        let timeout = Duration::from_millis(cp.timeout_ms);
        match hostcalls::dispatch_http_call(&cp.cluster, headers, Some(body), vec![], timeout) {
            Ok(token) => Some(token),
            Err(status) => {
                let msg = format!(
                    "usage batch not sent (cluster {:?}): {status:?}",
                    cp.cluster
                );
                log(Level::Warn, &msg);
                None
            }
        }
    }

    fn report(&mut self, event: SendEvent) {
        let line = match event {
            SendEvent::Failed { status } => format!(
                "usage batch not acknowledged: status {:?}; sending it again",
                String::from_utf8_lossy(&status)
            ),
            SendEvent::Refused { seq, status } => format!(
                "usage batch {seq} refused by the control plane (status {:?}); dropped",
                String::from_utf8_lossy(&status)
            ),
            SendEvent::Sent { .. } | SendEvent::Acknowledged { .. } | SendEvent::NotSent => return,
        };
        log(Level::Warn, &line);
    }
}

/// A nonce for the process's batches, if this VM creates the record: random, or the clock.
fn nonce() -> u64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => now_us(),
    }
}

/// The root's tick (at the poller's period): adds this VM's counts into the process's record;
/// on the elected poller VM, sends the batch due.
pub fn on_tick(vm: &VmState, cp: &ControlPlane, sender: &mut Sender) {
    if !vm.local.usage.is_enabled() {
        return;
    }
    let _ = flush(vm, &vm.local.usage, nonce());
    let now = now_us();
    let id = vm.vm_id.get();
    if !sender.in_flight() && !elect(vm, id, now / 1_000_000) {
        return;
    }
    let edge = cp.edge_id.as_deref().unwrap_or(DEFAULT_EDGE_NAME);
    sender.on_tick(vm, edge, now, id, &mut Envoy { cp });
}

/// An answer to an HTTP call of the root: true if it was the sender's.
pub fn on_response(vm: &VmState, cp: &ControlPlane, sender: &mut Sender, token: u32) -> bool {
    if !sender.in_flight() {
        return false;
    }
    let status = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
        .ok()
        .and_then(|h| h.into_iter().find(|(n, _)| n == ":status").map(|(_, v)| v))
        .unwrap_or_default();
    let id = vm.vm_id.get();
    sender.on_response(vm, token, &status, now_us(), id, &mut Envoy { cp })
}

/// Counts a request the fleet tier decided (the gate counted every other one).
pub fn fleet_decided(vm: &VmState, allow: &Allow, now: u64, denied: Option<Reason>) {
    let Some(used) = allow.used() else {
        return;
    };
    match denied {
        None => vm.local.usage.allowed(&used, now),
        Some(reason) => vm.local.usage.denied(&used, now, reason),
    }
}
