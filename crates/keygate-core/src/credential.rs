//! Parsing the `Authorization` header: HTTP Basic (RFC 7617) and Bearer (RFC 6750).
//!
//! Input is the raw header value as bytes. The parse is all-or-nothing: a value is either one
//! well-formed credential or an error, never a partial credential.
//!
//! Grammar accepted (RFC 7235 §2.1): `scheme 1*SP token68 *SP`, scheme case-insensitive,
//! `token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
//! A Basic token68 must also be canonical standard base64 (padding optional) that decodes to
//! `user ":" secret`, split at the first colon, with a non-empty user.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use crate::reason::Reason;

/// Longest `Authorization` value considered; longer ones are malformed.
pub const MAX_AUTHORIZATION_LEN: usize = 4096;

/// Standard alphabet, padding optional, non-canonical trailing bits refused, so one credential
/// has exactly one accepted encoding up to padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(false),
);

/// A parsed credential. Secrets are kept out of `Debug`.
#[derive(PartialEq, Eq)]
pub enum Credential<'a> {
    /// `user` is the key SID or account SID; `secret` the key secret or auth token.
    Basic { user: Vec<u8>, secret: Vec<u8> },
    /// The whole token, e.g. `sk_live_...`.
    Bearer { token: &'a [u8] },
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", &String::from_utf8_lossy(user))
                .field("secret", &"<redacted>")
                .finish(),
            Credential::Bearer { .. } => f.write_str("Bearer { token: <redacted> }"),
        }
    }
}

/// Which schemes a config enables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnabledSchemes {
    pub basic: bool,
    pub bearer: bool,
}

impl EnabledSchemes {
    pub const ALL: EnabledSchemes = EnabledSchemes {
        basic: true,
        bearer: true,
    };
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
}

/// `1*tchar-ish *"="`: at least one non-`=` character, `=` only at the end.
fn is_token68(t: &[u8]) -> bool {
    let body_len = t.iter().position(|&b| b == b'=').unwrap_or(t.len());
    body_len > 0
        && t[..body_len].iter().all(|&b| is_token68_char(b))
        && t[body_len..].iter().all(|&b| b == b'=')
}

/// Parses one `Authorization` header value.
pub fn parse_authorization(
    value: &[u8],
    schemes: EnabledSchemes,
) -> Result<Credential<'_>, Reason> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(Reason::MalformedCredentials);
    }
    // token68 has no comma, so a comma means several credentials: a comma-joined list, or two
    // `Authorization` headers that the proxy folded into one line (Envoy does for HTTP/1).
    if value.contains(&b',') {
        return Err(Reason::MultipleCredentials);
    }
    let value = trim_ows(value);
    let Some(sp) = value.iter().position(|&b| b == b' ') else {
        // A lone word: either a scheme with no credentials or garbage.
        return Err(
            if value.is_empty() || value.iter().all(|&b| b.is_ascii_alphabetic()) {
                scheme_reason(value, schemes)
            } else {
                Reason::MalformedCredentials
            },
        );
    };
    let scheme = &value[..sp];
    if !scheme.iter().all(|&b| is_tchar(b)) {
        return Err(Reason::MalformedCredentials);
    }
    let token = trim_ows(&value[sp..]);
    let is_basic = scheme.eq_ignore_ascii_case(b"basic");
    let is_bearer = scheme.eq_ignore_ascii_case(b"bearer");
    if !(is_basic && schemes.basic || is_bearer && schemes.bearer) {
        return Err(Reason::UnsupportedScheme);
    }
    if !is_token68(token) {
        return Err(Reason::MalformedCredentials);
    }
    if is_bearer {
        return Ok(Credential::Bearer { token });
    }
    let decoded = BASE64
        .decode(token)
        .map_err(|_| Reason::MalformedCredentials)?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(Reason::MalformedCredentials)?;
    if colon == 0 {
        return Err(Reason::MalformedCredentials);
    }
    // RFC 7617 forbids control characters in the user-id and password.
    if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(Reason::MalformedCredentials);
    }
    let secret = decoded[colon + 1..].to_vec();
    let mut user = decoded;
    user.truncate(colon);
    Ok(Credential::Basic { user, secret })
}

/// A value with no credentials after the scheme: known schemes are malformed, others unsupported.
fn scheme_reason(word: &[u8], schemes: EnabledSchemes) -> Reason {
    let known = (word.eq_ignore_ascii_case(b"basic") && schemes.basic)
        || (word.eq_ignore_ascii_case(b"bearer") && schemes.bearer);
    if known || word.is_empty() {
        Reason::MalformedCredentials
    } else {
        Reason::UnsupportedScheme
    }
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn basic(user: &str, secret: &str) -> Credential<'static> {
        Credential::Basic {
            user: user.as_bytes().to_vec(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    fn parse(v: &[u8]) -> Result<Credential<'_>, Reason> {
        parse_authorization(v, EnabledSchemes::ALL)
    }

    #[test]
    fn rfc7617_examples() {
        // RFC 7617 §2: "Aladdin" / "open sesame".
        assert_eq!(
            parse(b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
            Ok(basic("Aladdin", "open sesame"))
        );
        // RFC 7617 §2.1 charset example: "test" / "123£" in UTF-8.
        assert_eq!(
            parse(b"Basic dGVzdDoxMjPCow=="),
            Ok(basic("test", "123\u{a3}"))
        );
    }

    #[test]
    fn scheme_is_case_insensitive_and_padding_optional() {
        for v in [
            &b"basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="[..],
            b"BASIC QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
            b"bAsIc QWxhZGRpbjpvcGVuIHNlc2FtZQ",
            b"Basic   QWxhZGRpbjpvcGVuIHNlc2FtZQ==  ",
        ] {
            assert_eq!(
                parse(v),
                Ok(basic("Aladdin", "open sesame")),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn secret_may_contain_colons_split_at_first() {
        // "SK1:a:b:c"
        assert_eq!(parse(b"Basic U0sxOmE6Yjpj"), Ok(basic("SK1", "a:b:c")));
    }

    #[test]
    fn empty_secret_is_a_credential_empty_user_is_not() {
        // "SK1:" and ":secret"
        assert_eq!(parse(b"Basic U0sxOg=="), Ok(basic("SK1", "")));
        assert_eq!(
            parse(b"Basic OnNlY3JldA=="),
            Err(Reason::MalformedCredentials)
        );
    }

    #[test]
    fn bearer_token_is_taken_whole() {
        assert_eq!(
            parse(b"Bearer sk_live_abc123"),
            Ok(Credential::Bearer {
                token: b"sk_live_abc123"
            })
        );
        assert_eq!(
            parse(b"bearer  pk_live_x~y.z+/=="),
            Ok(Credential::Bearer {
                token: b"pk_live_x~y.z+/=="
            })
        );
    }

    #[test]
    fn malformed_values_are_refused_whole() {
        let cases: &[(&[u8], Reason)] = &[
            (b"", Reason::MalformedCredentials),
            (b"Basic", Reason::MalformedCredentials),
            (b"Basic ", Reason::MalformedCredentials),
            (b"Bearer", Reason::MalformedCredentials),
            // not base64 / no colon ("Aladdin" alone)
            (b"Basic !!!!", Reason::MalformedCredentials),
            (b"Basic QWxhZGRpbg==", Reason::MalformedCredentials),
            // URL-safe alphabet is not RFC 7617 base64 ("??>" encodes to Pz8+ / Pz8-)
            (b"Basic Pz8-Ojo6", Reason::MalformedCredentials),
            // non-canonical trailing bits ("QR==" has bits set after the last full byte)
            (b"Basic QR==", Reason::MalformedCredentials),
            // '=' in the middle, comma-joined schemes, space inside the token
            (b"Basic QW=xh", Reason::MalformedCredentials),
            (b"Basic QWxh, Bearer abc", Reason::MultipleCredentials),
            (b"Basic QWxh,Bearer abc", Reason::MultipleCredentials),
            (b"Bearer abc def", Reason::MalformedCredentials),
            (b"Bearer abc,def", Reason::MultipleCredentials),
            // control and non-UTF-8 bytes
            (b"Bearer abc\x00", Reason::MalformedCredentials),
            (b"Bearer \xff\xfe", Reason::MalformedCredentials),
            (b"\xffBasic abc", Reason::MalformedCredentials),
            (b"Digest username=\"x\"", Reason::UnsupportedScheme),
            (b"Negotiate abc", Reason::UnsupportedScheme),
            (b"Token", Reason::UnsupportedScheme),
        ];
        for (v, want) in cases {
            assert_eq!(
                parse(v).err(),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn overlong_values_are_malformed() {
        let mut v = b"Bearer ".to_vec();
        v.extend(std::iter::repeat_n(b'a', MAX_AUTHORIZATION_LEN));
        assert_eq!(parse(&v).err(), Some(Reason::MalformedCredentials));
    }

    #[test]
    fn disabled_schemes_are_unsupported() {
        let only_basic = EnabledSchemes {
            basic: true,
            bearer: false,
        };
        assert_eq!(
            parse_authorization(b"Bearer abc", only_basic).err(),
            Some(Reason::UnsupportedScheme)
        );
        let only_bearer = EnabledSchemes {
            basic: false,
            bearer: true,
        };
        assert_eq!(
            parse_authorization(b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", only_bearer).err(),
            Some(Reason::UnsupportedScheme)
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = basic("SK1", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        let b = Credential::Bearer {
            token: b"sk_live_hunter2",
        };
        assert!(!format!("{b:?}").contains("hunter2"));
    }
}
