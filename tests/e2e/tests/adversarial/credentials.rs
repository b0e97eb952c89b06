//! 1. Credential encoding: scheme case, spacing, padding, alphabets, lengths, control and
//!    non-UTF-8 bytes, duplicate and comma-joined credentials.

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine as _;
use keygate_e2e::{demo, EnvoyBuilder, Req};

use crate::common::*;

/// The forms of the `STD` canary's Basic credential the cases are built from.
struct Encodings {
    /// Standard base64 with padding (what `Req::basic` sends); ends in `==`, contains a `+`.
    padded: String,
    unpadded: String,
    url_safe: String,
    /// The same bytes, but the last character before the padding carries non-zero trailing bits.
    non_canonical: String,
}

fn encodings() -> Encodings {
    let padded = b64(STD.sid, STD.secret.as_bytes());
    assert!(
        padded.ends_with("==") && padded.contains('+'),
        "fixture: {padded}"
    );
    let unpadded = padded.trim_end_matches('=').to_owned();
    let url_safe = URL_SAFE.encode(format!("{}:{}", STD.sid, STD.secret));
    assert_ne!(url_safe, padded, "fixture: the URL-safe form must differ");
    let non_canonical = {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut v = unpadded.clone().into_bytes();
        let last = v.last_mut().unwrap();
        let i = alphabet.iter().position(|c| c == last).unwrap();
        *last = alphabet[(i + 1) % 64];
        let s = String::from_utf8(v).unwrap() + "==";
        assert_eq!(
            STANDARD.decode(&s).ok(),
            None,
            "fixture: non-canonical form must not decode strictly"
        );
        s
    };
    Encodings {
        padded,
        unpadded,
        url_safe,
        non_canonical,
    }
}

/// `Basic <base64 of user:secret>`.
fn basic_of(user: impl AsRef<[u8]>, secret: &[u8]) -> String {
    format!("Basic {}", b64(user, secret))
}

#[rustfmt::skip]
fn credential_cases() -> Vec<Case> {
    let Encodings { padded, unpadded, url_safe, non_canonical } = encodings();
    let ok = || allow(STD.sid, "standard", "calls", CALLS);
    let main_ok = || allow(MAIN.sid, "main", "calls", CALLS);
    let invalid = || deny(401, "invalid_credentials");
    let malformed = || deny(400, "malformed_credentials");
    let multiple = || deny(400, "multiple_credentials");
    let unsupported = || deny(401, "unsupported_scheme");
    let missing = || deny(401, "missing_credentials");
    let envoy_400 = || Expect::Envoy(400);
    let long_secret = "x".repeat(5000);
    // A Bearer value of exactly 4096 bytes is still considered (and unknown); one more is not.
    let bearer_4096 = format!("Bearer {}", "t".repeat(4096 - 7));
    let bearer_4097 = format!("Bearer {}", "t".repeat(4097 - 7));
    let std_secret = STD.secret.as_bytes();
    let basic = format!("Basic {padded}");
    let main_bearer = format!("Bearer {}", MAIN.secret);
    let in_target = demo::MAIN;

    vec![
        case("Basic, canonical", auth(&basic), ok()),
        case("scheme lowercase `basic`", auth(format!("basic {padded}")), ok()),
        case("scheme uppercase `BASIC`", auth(format!("BASIC {padded}")), ok()),
        case("scheme mixed case `bAsIc`", auth(format!("bAsIc {padded}")), ok()),
        case("three spaces between scheme and token", auth(format!("Basic   {padded}")), ok()),
        case("trailing spaces", auth(format!("Basic {padded}   ")), ok()),
        case("leading spaces", auth(format!("   Basic {padded}")), ok()),
        case("padding absent admits the same key", auth(format!("Basic {unpadded}")), ok()),
        case("header name in capitals", Req::get(CALLS).header("AUTHORIZATION", &basic), ok()),
        case("tab instead of space after the scheme", auth(format!("Basic\t{padded}")), malformed()),
        // FINDING (minor, not a security issue): partial padding is accepted (base64's
        // `DecodePaddingMode::Indifferent`), so one credential has three encodings, not two. The
        // decoded bytes are the same, so it admits the same key and nothing else.
        case("one `=` where two are due (lenient, same key)", auth(format!("Basic {unpadded}=")), ok()),
        case("three `=`", auth(format!("Basic {unpadded}===")), malformed()),
        case("URL-safe base64 alphabet", auth(format!("Basic {url_safe}")), malformed()),
        case("non-canonical trailing bits", auth(format!("Basic {non_canonical}")), malformed()),
        case("base64 with an inner space", auth(format!("Basic {} {}", &padded[..8], &padded[8..])), malformed()),
        case("empty user `:secret`", auth(basic_of(b"", std_secret)), malformed()),
        case("empty password `SK...:`", auth(basic_of(STD.sid, b"")), invalid()),
        case("no colon", auth(format!("Basic {}", STANDARD.encode(format!("{}{}", STD.sid, STD.secret)))), malformed()),
        case("space after the SID", auth(basic_of(format!("{} ", STD.sid), std_secret)), invalid()),
        case("secret plus one byte", auth(basic_of(STD.sid, format!("{}x", STD.secret).as_bytes())), invalid()),
        case("5000-byte Basic secret", auth(basic_of(STD.sid, long_secret.as_bytes())), malformed()),
        case("5000-byte Bearer token", auth(format!("Bearer {long_secret}")), malformed()),
        case("Authorization of exactly 4096 bytes", auth(bearer_4096), invalid()),
        case("Authorization of 4097 bytes", auth(bearer_4097), malformed()),
        case("\\x01 inside the decoded secret", auth(basic_of(STD.sid, b"sk_live_\x01CANARYx")), malformed()),
        case("\\x7f inside the decoded secret", auth(basic_of(STD.sid, b"sk_live_\x7fCANARYx")), malformed()),
        case("\\x00 inside the decoded user", auth(basic_of("SKcanary\x00std01", std_secret)), malformed()),
        case("raw \\x01 in the header value", auth(b"Bearer abc\x01def"), envoy_400()),
        case("raw \\x7f in the header value", auth(b"Bearer abc\x7fdef"), envoy_400()),
        case("raw NUL in the header value", auth(b"Bearer abc\x00def"), envoy_400()),
        // Envoy's codec unfolds obs-fold into one line (RFC 9112 §5.2 lets a proxy replace it with
        // SP) before the filter runs: the same credential, so the same key.
        case("obs-fold continuation line (Envoy unfolds it)", auth(format!("Basic\r\n {padded}")), ok()),
        case("non-UTF-8 bytes in the raw value", auth(b"Basic \xff\xfe\xfd"), malformed()),
        case("non-UTF-8 Bearer token", auth(b"Bearer sk_live_\xc3\x28"), malformed()),
        case("non-UTF-8 in the decoded secret", auth(basic_of(STD.sid, b"sk_live_\xff\xfe")), invalid()),
        case("non-UTF-8 in the decoded user", auth(basic_of(b"SK\xff\xfe", std_secret)), invalid()),
        case("non-UTF-8 in an unrelated header is forwarded untouched", auth(&basic).header("x-odd", b"\xff\xfe\x80latin\xe9"), ok())
            .with_check(|s| assert_eq!(s.header("x-odd"), Some(&b"\xff\xfe\x80latin\xe9"[..]))),
        case("two Authorization headers: valid then invalid", auth(&basic).header("authorization", "Basic !!!!"), multiple()),
        case("two Authorization headers: invalid then valid", auth("Basic !!!!").header("authorization", &basic), multiple()),
        case("two identical valid Authorization headers", auth(&basic).header("authorization", &basic), multiple()),
        case("two headers of different case", auth(&basic).header("Authorization", &main_bearer), multiple()),
        case("comma-joined schemes", auth(format!("Basic {padded}, Bearer {}", MAIN.secret)), multiple()),
        case("trailing comma", auth(format!("Basic {padded},")), multiple()),
        case("Bearer carrying a Basic-looking token", auth(format!("Bearer {padded}")), invalid()),
        case("Basic carrying a Bearer token", auth(format!("Basic {}", MAIN.secret)), malformed()),
        case("Bearer", auth(&main_bearer), main_ok()),
        case("lowercase `bearer`", auth(format!("bearer {}", MAIN.secret)), main_ok()),
        case("uppercase `BEARER`", auth(format!("BEARER {}", MAIN.secret)), main_ok()),
        case("Bearer with trailing spaces", auth(format!("Bearer {}  ", MAIN.secret)), main_ok()),
        case("Bearer with the SID:secret pair", auth(format!("Bearer {}:{}", MAIN.sid, MAIN.secret)), malformed()),
        case("scheme only `Basic`", auth("Basic"), malformed()),
        case("scheme only `Bearer` with trailing space", auth("Bearer "), malformed()),
        case("empty Authorization value", auth(""), malformed()),
        case("scheme `Digest`", auth("Digest username=\"SKcanarystd01\""), unsupported()),
        case("scheme `Token`", auth(format!("Token {}", MAIN.secret)), unsupported()),
        case("lone word `Negotiate`", auth("Negotiate"), unsupported()),
        case("Proxy-Authorization instead of Authorization", Req::get(CALLS).header("proxy-authorization", &basic), missing()),
        case("look-alike header `Authorisation`", Req::get(CALLS).header("authorisation", &basic), missing()),
        // Not canary secrets: these land in the request target, which the access log records.
        case("credential in the query string", Req::get(format!("{CALLS}?api_key={}", in_target.secret)), missing()),
        case("userinfo in an absolute-form target", Req::get(format!("http://{}:{}@127.0.0.1{CALLS}", in_target.sid, in_target.secret)), missing()),
    ]
}

#[test]
fn credential_encoding_family() {
    Bench::run_family(
        EnvoyBuilder::new(),
        "credential encoding",
        &credential_cases(),
    );
}
