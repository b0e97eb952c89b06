//! The format of keygate secrets: recognisable, checksummed, high-entropy.
//!
//! `<kind>_<32 base62 chars of randomness><6 base62 chars of CRC-32>`, e.g.
//! `sk_live_4eC39HqLyjWDarjtT1zdp7dcWBnQ6zR20Ni5M1`. The prefix lets people and secret scanners
//! recognise a leaked keygate secret; the checksum lets the edge refuse a mistyped or made-up
//! token without a lookup. 32 base62 characters carry about 190 bits, so a fast digest (SHA-256)
//! of the secret is safe to store.
//!
//! The control plane generates secrets with [`encode`] from OS randomness; the filter checks
//! Bearer tokens with [`is_well_formed`] when `settings.check_secret_format` is on.

/// Secret kinds and their prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// Server-side secret key (`main` and `standard` keys).
    SecretLive,
    SecretTest,
    /// Client-side publishable key.
    PublishableLive,
    PublishableTest,
    /// Account auth token.
    AuthToken,
}

impl SecretKind {
    pub const ALL: [SecretKind; 5] = [
        SecretKind::SecretLive,
        SecretKind::SecretTest,
        SecretKind::PublishableLive,
        SecretKind::PublishableTest,
        SecretKind::AuthToken,
    ];

    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::SecretLive => "sk_live_",
            SecretKind::SecretTest => "sk_test_",
            SecretKind::PublishableLive => "pk_live_",
            SecretKind::PublishableTest => "pk_test_",
            SecretKind::AuthToken => "at_live_",
        }
    }
}

/// Characters of randomness.
pub const BODY_LEN: usize = 32;
/// Characters of checksum.
pub const CHECKSUM_LEN: usize = 6;
/// Random bytes [`encode`] needs (more than enough to draw 32 base62 characters without bias).
pub const RANDOM_BYTES: usize = 64;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn base62_fixed(mut n: u32, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
}

fn checksum(prefix_and_body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut out = [0u8; CHECKSUM_LEN];
    base62_fixed(crc32fast::hash(prefix_and_body), &mut out);
    out
}

/// Builds a secret from random bytes (from the OS CSPRNG). Bytes ≥ 248 are skipped so every
/// character is uniform over 62 (248 = 4 × 62); `None` only if the bytes run out, which with
/// 64 bytes for 32 characters has probability below 2^-100.
pub fn encode(kind: SecretKind, random: &[u8; RANDOM_BYTES]) -> Option<String> {
    let mut s = String::with_capacity(kind.prefix().len() + BODY_LEN + CHECKSUM_LEN);
    s.push_str(kind.prefix());
    let mut body = 0;
    for &b in random.iter() {
        if body == BODY_LEN {
            break;
        }
        if b < 248 {
            s.push(char::from(ALPHABET[usize::from(b % 62)]));
            body += 1;
        }
    }
    if body < BODY_LEN {
        return None;
    }
    let sum = checksum(s.as_bytes());
    s.extend(sum.iter().map(|&c| char::from(c)));
    Some(s)
}

/// Whether a token has a known prefix, the right length and alphabet, and a matching checksum.
pub fn is_well_formed(token: &[u8]) -> bool {
    let Some(kind) = SecretKind::ALL
        .iter()
        .find(|k| token.starts_with(k.prefix().as_bytes()))
    else {
        return false;
    };
    let want_len = kind.prefix().len() + BODY_LEN + CHECKSUM_LEN;
    if token.len() != want_len {
        return false;
    }
    let (head, sum) = token.split_at(want_len - CHECKSUM_LEN);
    head[kind.prefix().len()..]
        .iter()
        .all(|b| b.is_ascii_alphanumeric())
        && checksum(head) == sum
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn bytes(seed: u8) -> [u8; RANDOM_BYTES] {
        let mut b = [0u8; RANDOM_BYTES];
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed
                .wrapping_mul(31)
                .wrapping_add((i as u8).wrapping_mul(97));
        }
        b
    }

    #[test]
    fn generated_secrets_are_well_formed_and_recognisable() {
        for kind in SecretKind::ALL {
            let s = encode(kind, &bytes(7)).unwrap();
            assert!(s.starts_with(kind.prefix()), "{s}");
            assert_eq!(s.len(), 8 + BODY_LEN + CHECKSUM_LEN);
            assert!(is_well_formed(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn any_single_character_change_breaks_the_checksum() {
        let s = encode(SecretKind::SecretLive, &bytes(3))
            .unwrap()
            .into_bytes();
        for i in 8..s.len() {
            let mut t = s.clone();
            t[i] = if t[i] == b'a' { b'b' } else { b'a' };
            assert!(!is_well_formed(&t), "position {i}");
        }
    }

    #[test]
    fn foreign_or_truncated_tokens_are_not_well_formed() {
        let s = encode(SecretKind::PublishableLive, &bytes(9)).unwrap();
        assert!(!is_well_formed(&s.as_bytes()[..s.len() - 1]));
        assert!(!is_well_formed(format!("{s}x").as_bytes()));
        assert!(!is_well_formed(
            s.replacen("pk_live_", "xk_live_", 1).as_bytes()
        ));
        assert!(!is_well_formed(b"sk_live_demoMain0001"));
        assert!(!is_well_formed(b""));
    }

    #[test]
    fn biased_bytes_are_skipped_and_exhaustion_is_reported() {
        let all_high = [255u8; RANDOM_BYTES];
        assert_eq!(encode(SecretKind::SecretLive, &all_high), None);
        let mut mixed = [250u8; RANDOM_BYTES];
        for b in mixed.iter_mut().skip(32) {
            *b = 61;
        }
        let s = encode(SecretKind::SecretLive, &mixed).unwrap();
        assert_eq!(&s[8..8 + BODY_LEN], "z".repeat(BODY_LEN));
    }
}
