//! keygate-core: everything keygate decides, as plain Rust.
//!
//! This crate never depends on `proxy-wasm`. The filter crate reads the request from the host,
//! hands a [`RequestHead`] to [`decide`], and sends whatever [`Decision`] comes back. The control
//! plane serialises the same [`config`] types the filter compiles, and computes secret digests with
//! the same [`digest`] functions, so the two sides cannot drift.
//!
//! Flow: JSON bytes → [`config::ConfigDoc`] (wire types, serde) → [`compile::compile`] (validates
//! everything once, with path-prefixed errors, and builds lookup tables) → [`CompiledConfig`] →
//! [`decide`] per request (lookups only, no parsing of config).

pub mod compile;
pub mod concurrency;
pub mod config;
pub mod credential;
pub mod decision;
pub mod digest;
pub mod fleet;
pub mod gate;
pub mod headers;
pub mod ip;
pub mod local;
pub mod path;
pub mod plugin;
pub mod poller;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod props;
pub mod published;
pub mod ratelimit;
pub mod reason;
pub mod region;
pub mod secret_format;
pub mod stats;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod usage;
pub mod view;

pub use compile::{compile, Catalog, CompiledConfig, ConfigError, Directory};
pub use decision::{decide, decide_in, Allow, Decision, Identity, PrincipalKind};
pub use headers::RequestHead;
pub use reason::Reason;
