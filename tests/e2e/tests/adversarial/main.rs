//! Adversarial end-to-end suite (issue "Hardening", part 2): what an attacker can send a real
//! Envoy 1.40 running the built filter, family by family.
//!
//! 1. credential encoding (scheme case, spacing, padding, alphabets, lengths, control and
//!    non-UTF-8 bytes, duplicate and comma-joined credentials);
//! 2. path tricks against per-API permissions, with Envoy's path normalisation off and on;
//! 3. the client address: spoofed forwarding headers, and what a trusted-hop listener does;
//! 4. identity spoofing: client-sent `x-keygate-*` headers never reach the upstream;
//! 5. indistinguishable failures: byte-identical 401s, and a wrong secret costs the same however
//!    many leading bytes match.
//!
//! Every case asserts status, reason code and body, the relevant headers, and what the upstream
//! received (nothing for a denial, exactly the expected identity for an allow); after every case a
//! valid request must still pass (the VM survived). When Envoy answers before the filter runs
//! (its own 400 for bytes its codec refuses) the case says so (`Expect::Envoy`), and the upstream
//! must still have seen nothing. At the end of each test the `keygate.denied.<code>` and
//! `keygate.allowed` counters must equal what the cases sent, and Envoy's log (with `wasm:trace`),
//! its access log and every upstream-captured request are scanned for every CANARY secret, in
//! plaintext and in each base64 form a Basic header can take.
//!
//! Plaintexts of the fixtures are in the `Canary` constants; the config stores their SHA-256.
//!
//! One file a family (`credentials`, `paths`, `client_address`, `identity`, `failures`), sharing
//! the fixtures, the case runner and the assertions in `common`. One family:
//! `cargo test -p keygate-e2e --test adversarial paths::`.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

mod common;

mod client_address;
mod credentials;
mod failures;
mod identity;
mod paths;
