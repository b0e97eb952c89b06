//! keygate-filter: the proxy-wasm glue around `keygate-core`.
//!
//! This is the only crate that talks to the host, and it decides nothing. It reads the request
//! headers with one host call, asks the core for the view in force
//! ([`keygate_core::view::Source::view`]) and the verdict ([`keygate_core::gate::evaluate`]:
//! failed-auth limiter, decision, rates, concurrency), and sends the reply or forwards the
//! request as [`keygate_core::view::View::answer`] says. In control-plane mode it drives the
//! core's poller ([`keygate_core::poller`]) with ticks and answers and makes its host calls.
//!
//! Modules: `contexts` (the root and HTTP contexts), `fleet` (fleet limits: leases asked for
//! with `dispatch_grpc_call`, requests waiting for them), `host` (shared data as the core's
//! `SharedStore`, the request's `Host`, byte-level header reads), `poller` (the poller's
//! `dispatch_http_call`, answers, tick period, logs and stats), `request` (the request's own host calls: forward with the identity headers, strip the
//! client's copies, send a local reply), `metrics` (an Envoy metric per
//! [`keygate_core::stats::Stat`], recording what the core counts), `usage` (the VM's usage
//! counts into shared data on the tick; the elected poller's `POST /v1/edge/usage`).
//!
//! Invariants kept here:
//! - every host call goes through the `Result`-returning `hostcalls` functions or our own
//!   byte-level header read, so non-UTF-8 input cannot panic the VM;
//! - a config that fails to compile never replaces the one in force;
//! - client-sent copies of identity headers never reach the upstream;
//! - secrets are never logged (only SIDs, counts and versions are).

mod contexts;
mod fleet;
mod host;
mod metrics;
mod poller;
mod request;
mod usage;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(contexts::KeygateRoot::new(context_id))
    });
}}
