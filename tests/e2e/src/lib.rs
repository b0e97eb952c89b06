//! End-to-end harness for keygate: everything a test needs to drive the real filter inside a real
//! Envoy over real sockets on 127.0.0.1.
//!
//! - [`echo`]: an HTTP/1.1 upstream that answers 200 with a JSON echo of what it received and
//!   records every request (header values as raw bytes) so tests can assert what got through.
//! - [`client`]: a raw HTTP/1.1 client over `std::net::TcpStream` that can send any bytes
//!   (duplicate headers, non-UTF-8 values, odd paths) and parses responses with `httparse`.
//! - [`envoy`]: renders a bootstrap around the filter, starts Envoy on ephemeral ports, waits for
//!   readiness and exposes the admin API (stats, counters, logs). Killed on drop.
//! - [`demo`]: the documented demo account, keys and secrets, and the demo plugin config.
//! - [`paths`]: where the workspace, the Envoy binary and the built filter live.
//! - [`ratelimit`]: a real keygate-ratelimit (the fleet limits' service) over a real Redis.
//! - [`wait`]: polled waits ([`wait::within`]).
//!
//! This crate is test support: failing loudly with a helpful message is its job, so the
//! workspace's `panic`/`expect`/`unwrap` denials (meant for code on the request path) are lifted
//! here.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

pub mod client;
pub mod control;
pub mod demo;
pub mod echo;
pub mod envoy;
pub mod faulty;
pub mod paths;
pub mod ratelimit;
pub mod wait;

mod server;
mod wire;

pub use client::{Conn, Req, Response};
pub use control::ControlPlane;
pub use echo::{CapturedRequest, Echo};
pub use envoy::{Envoy, EnvoyBuilder, StartError};
pub use ratelimit::RateLimitService;
