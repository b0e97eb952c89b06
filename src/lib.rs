//! keygate-filter: the proxy-wasm glue around `keygate-core`.
//!
//! This is the only crate that talks to the host. It reads the request headers with one host
//! call, asks [`keygate_core::decide`], and either sends the denial or rewrites the request's
//! identity headers. It holds no decision logic of its own.
//!
//! Invariants kept here:
//! - every host call goes through the `Result`-returning `hostcalls` functions or our own
//!   byte-level header read, so non-UTF-8 input cannot panic the VM;
//! - a config that fails to compile never replaces the one in force;
//! - client-sent copies of identity headers never reach the upstream;
//! - secrets are never logged (only SIDs, counts and versions are).

mod glue;
mod host;
mod metrics;
mod poller;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(glue::KeygateRoot::default())
    });
}}
