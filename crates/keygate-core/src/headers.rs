//! The request as the decision sees it, read from the host's header map as bytes.
//!
//! The filter fetches all request headers with one host call, in proxy-wasm's serialized map
//! format; [`parse_header_map`] splits it without copying and without trusting it (a malformed
//! buffer yields `None`, never a panic). Header values stay bytes: non-UTF-8 is data, not an error.

/// Splits proxy-wasm's serialized header map: `u32 count`, `count × (u32 name_len, u32 value_len)`,
/// then each name and value followed by a NUL byte. All integers little-endian.
pub fn parse_header_map(buf: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if buf.is_empty() {
        return Some(Vec::new());
    }
    let read_u32 = |at: usize| -> Option<usize> {
        let b = buf.get(at..at.checked_add(4)?)?;
        usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok()
    };
    let count = read_u32(0)?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    if data > buf.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let name_len = read_u32(4 + i * 8)?;
        let value_len = read_u32(8 + i * 8)?;
        let name_end = data.checked_add(name_len)?;
        let name = buf.get(data..name_end)?;
        let value_start = name_end.checked_add(1)?;
        let value_end = value_start.checked_add(value_len)?;
        let value = buf.get(value_start..value_end)?;
        // Both terminators must be inside the buffer and be NUL bytes.
        if buf.get(name_end) != Some(&0) || buf.get(value_end) != Some(&0) {
            return None;
        }
        pairs.push((name, value));
        data = value_end.checked_add(1)?;
    }
    Some(pairs)
}

/// How many `Authorization` headers the request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationHeader<'a> {
    Absent,
    One(&'a [u8]),
    Many,
}

/// The parts of a request the decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub authorization: AuthorizationHeader<'a>,
    /// `Origin` and `Access-Control-Request-Method` both present (a CORS preflight if `OPTIONS`).
    pub cors_preflight_headers: bool,
}

impl<'a> RequestHead<'a> {
    /// Picks the fields out of a header list (names compared ASCII-case-insensitively).
    pub fn from_pairs(pairs: &[(&'a [u8], &'a [u8])]) -> RequestHead<'a> {
        let mut head = RequestHead {
            method: b"",
            path: b"",
            authorization: AuthorizationHeader::Absent,
            cors_preflight_headers: false,
        };
        let (mut origin, mut acrm) = (false, false);
        for &(name, value) in pairs {
            if name == b":method" {
                head.method = value;
            } else if name == b":path" {
                head.path = value;
            } else if name.eq_ignore_ascii_case(b"authorization") {
                head.authorization = match head.authorization {
                    AuthorizationHeader::Absent => AuthorizationHeader::One(value),
                    _ => AuthorizationHeader::Many,
                };
            } else if name.eq_ignore_ascii_case(b"origin") {
                origin = true;
            } else if name.eq_ignore_ascii_case(b"access-control-request-method") {
                acrm = true;
            }
        }
        head.cors_preflight_headers = origin && acrm;
        head
    }
}

/// Whether `name` spells one of `identity` with `_` for `-`, in any case
/// (`x_keygate_key_sid`): upstreams that fold `_` into `-` (CGI, WSGI, Rack, PHP) would read it as
/// the identity.
pub fn is_identity_lookalike(name: &[u8], identity: &[Box<str>; 4]) -> bool {
    name.contains(&b'_')
        && identity.iter().any(|h| {
            h.len() == name.len()
                && h.bytes().zip(name).all(|(want, &got)| {
                    let got = if got == b'_' {
                        b'-'
                    } else {
                        got.to_ascii_lowercase()
                    };
                    want == got
                })
        })
}

/// The names among `pairs` (a request's headers or trailers) that keygate removes: client copies
/// of the identity headers `names`, their `_` look-alikes and, unless `keep_authorization`,
/// `Authorization`. Each name once, in order of first appearance.
pub fn client_copies<'a>(
    pairs: &[(&'a [u8], &'a [u8])],
    names: &[Box<str>; 4],
    keep_authorization: bool,
) -> Vec<&'a [u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for &(name, _) in pairs {
        let identity = names
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
            || is_identity_lookalike(name, names);
        let auth = !keep_authorization && name.eq_ignore_ascii_case(b"authorization");
        if (identity || auth) && !out.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            out.push(name);
        }
    }
    out
}

/// Serializes pairs in proxy-wasm's map format (used by tests and fakes of the host).
pub fn serialize_header_map(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len32(pairs.len()));
    for (n, v) in pairs {
        out.extend_from_slice(&len32(n.len()));
        out.extend_from_slice(&len32(v.len()));
    }
    for (n, v) in pairs {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn round_trips_including_non_utf8_values() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":path", b"/x"),
            (b"authorization", b"Basic abc"),
            (b"x-odd", b"\xff\xfe\x00z"),
            (b"empty", b""),
        ];
        let buf = serialize_header_map(&pairs);
        assert_eq!(parse_header_map(&buf), Some(pairs));
    }

    #[test]
    fn truncated_or_lying_buffers_are_rejected_not_panicking() {
        let buf = serialize_header_map(&[(b"a", b"b"), (b"cc", b"dd")]);
        for cut in 1..buf.len() {
            assert_eq!(parse_header_map(&buf[..cut]), None, "cut at {cut}");
        }
        // count says 2^32-1 pairs
        assert_eq!(parse_header_map(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
        // a name length pointing past the end
        let mut lying = serialize_header_map(&[(b"a", b"b")]);
        lying[4] = 200;
        assert_eq!(parse_header_map(&lying), None);
        // Lengths that do not land on the NUL terminators (found by the header_map fuzz target).
        let mut misaligned = serialize_header_map(&[(b"ab", b"cd")]);
        misaligned[4] = 1;
        assert_eq!(parse_header_map(&misaligned), None);
        assert_eq!(parse_header_map(&[]), Some(vec![]));
    }

    #[test]
    fn head_counts_authorization_headers() {
        let one: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":path", b"/p"),
            (b"authorization", b"Bearer t"),
        ];
        let h = RequestHead::from_pairs(&one);
        assert_eq!(
            (h.method, h.path, h.authorization),
            (
                &b"GET"[..],
                &b"/p"[..],
                AuthorizationHeader::One(b"Bearer t")
            )
        );
        let two: Vec<(&[u8], &[u8])> = vec![
            (b"authorization", b"Bearer t"),
            (b"Authorization", b"Basic x"),
        ];
        assert_eq!(
            RequestHead::from_pairs(&two).authorization,
            AuthorizationHeader::Many
        );
        assert_eq!(
            RequestHead::from_pairs(&[]).authorization,
            AuthorizationHeader::Absent
        );
    }

    #[test]
    fn preflight_needs_both_cors_headers() {
        let both: Vec<(&[u8], &[u8])> = vec![
            (b"origin", b"https://a"),
            (b"access-control-request-method", b"POST"),
        ];
        assert!(RequestHead::from_pairs(&both).cors_preflight_headers);
        assert!(!RequestHead::from_pairs(&both[..1]).cors_preflight_headers);
    }

    fn names() -> [Box<str>; 4] {
        [
            "x-keygate-account-sid".into(),
            "x-keygate-key-sid".into(),
            "x-keygate-role".into(),
            "x-keygate-api".into(),
        ]
    }

    #[test]
    fn lookalikes_are_exact_spellings_only() {
        let names = names();
        assert!(is_identity_lookalike(b"x_keygate_key_sid", &names));
        assert!(is_identity_lookalike(b"X_Keygate-Key_Sid", &names));
        assert!(
            !is_identity_lookalike(b"x-keygate-key-sid", &names),
            "no underscore: not a look-alike"
        );
        assert!(!is_identity_lookalike(b"x_keygate_key_sid_", &names));
        assert!(!is_identity_lookalike(b"x_keygate_key", &names));
    }

    #[test]
    fn client_copies_name_identity_headers_lookalikes_and_authorization_once() {
        let names: [Box<str>; 4] = [
            "x-keygate-account-sid".into(),
            "x-keygate-key-sid".into(),
            "x-keygate-role".into(),
            "x-keygate-api".into(),
        ];
        let pairs: [(&[u8], &[u8]); 5] = [
            (b"X-Keygate-Role", b"main"),
            (b"x_keygate_key_sid", b"SK1"),
            (b"authorization", b"Basic x"),
            (b"x-keygate-role", b"admin"),
            (b"accept", b"*/*"),
        ];
        let all: [&[u8]; 3] = [b"X-Keygate-Role", b"x_keygate_key_sid", b"authorization"];
        assert_eq!(client_copies(&pairs, &names, false), all);
        assert_eq!(client_copies(&pairs, &names, true), all[..2]);
    }
}
