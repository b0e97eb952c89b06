//! Secrets and identifiers: made from the OS CSPRNG, shown once, stored as digests.
//!
//! [`Secret`] holds a plaintext between its creation and the one response that shows it; its
//! `Debug` and `Display` print `[redacted]`, and it has no `Serialize`, so it cannot end up in a
//! log line or a stored row by accident. What is stored is [`digest`]: the same SHA-256 the edge
//! computes (`keygate_core::digest`), safe because every secret carries about 190 bits of entropy.

use keygate_core::digest::Digester;
use keygate_core::secret_format::{self, SecretKind, RANDOM_BYTES};

use crate::error::{internal, Error};

/// A plaintext secret. Redacted in `Debug`/`Display`; read it with [`Secret::expose`].
pub struct Secret(String);

impl Secret {
    /// The plaintext, for the single response that shows it (and for tests).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| internal("OS random number generator failed", e))?;
    Ok(b)
}

/// A Twilio-style SID: two-letter prefix and 32 lowercase hex digits (128 random bits).
pub fn new_sid(prefix: &str) -> Result<String, Error> {
    Ok(format!("{prefix}{}", hex::encode(random::<16>()?)))
}

/// A checksummed keygate secret of the given kind (`sk_live_`, `pk_live_`, `at_live_`).
pub fn new_secret(kind: SecretKind) -> Result<Secret, Error> {
    // `encode` only fails if 64 random bytes hold fewer than 32 usable ones (p < 2^-100); retry.
    for _ in 0..4 {
        if let Some(s) = secret_format::encode(kind, &random::<RANDOM_BYTES>()?) {
            return Ok(Secret(s));
        }
    }
    Err(internal("secret generation", "random bytes exhausted"))
}

/// Operator credentials (not API keys, never sent to the edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorKind {
    /// Creates accounts, manages everything, reads the feed.
    Admin,
    /// Reads the edge feed only.
    Edge,
}

impl OperatorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorKind::Admin => "admin",
            OperatorKind::Edge => "edge",
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            OperatorKind::Admin => "kg_admin_",
            OperatorKind::Edge => "kg_edge_",
        }
    }

    pub fn parse(s: &str) -> Option<OperatorKind> {
        match s {
            "admin" => Some(OperatorKind::Admin),
            "edge" => Some(OperatorKind::Edge),
            _ => None,
        }
    }
}

/// An operator token: recognisable prefix and 256 random bits in hex.
pub fn new_operator_token(kind: OperatorKind) -> Result<Secret, Error> {
    Ok(Secret(format!(
        "{}{}",
        kind.prefix(),
        hex::encode(random::<32>()?)
    )))
}

/// The stored form of a secret: lowercase hex SHA-256, as the edge config carries it.
pub fn digest(secret: &[u8]) -> String {
    Digester::Sha256.digest_hex(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_well_formed_distinct_and_redacted() {
        let a = new_secret(SecretKind::SecretLive).unwrap();
        let b = new_secret(SecretKind::SecretLive).unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(secret_format::is_well_formed(a.expose().as_bytes()));
        assert!(a.expose().starts_with("sk_live_"));
        assert!(!format!("{a:?} {a}").contains(a.expose()));
    }

    #[test]
    fn sids_have_prefix_and_32_hex() {
        let s = new_sid("SK").unwrap();
        assert_eq!(s.len(), 34);
        assert!(s[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
}
